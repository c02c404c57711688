"""The CPU demo: a seeded synthetic world (:mod:`.world`, :mod:`.render`) and stage-0 stand-ins for the
pretrained parts (:mod:`.stage0`: a tiny contrastively trained CLIP and a tiny text-only Llama)."""
