"""``fusion-vlm walkthrough``: one image and its questions through every step of the data path, with shapes."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("walkthrough", help="one image + questions through every step, shapes and token counts")
    p.add_argument("--config", default="tiny", help="preset name or YAML path (default: tiny)")
    p.add_argument("--image", default=None, help="image file (default: a generated 1008x756 picture)")
    p.add_argument("--question", action="append", default=None, help="question (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from fusion_vlm.config import load_model_config
    from fusion_vlm.demo_image import synthetic_image
    from fusion_vlm.errors import ConfigError, user_input
    from fusion_vlm.info import parameter_counts, token_accounting
    from fusion_vlm.model import FusionVLM
    from fusion_vlm.views import load_image

    torch.manual_seed(args.seed)
    questions = args.question or ["What colour is the square in the top left?", "How many shapes are there?"]
    with user_input(ConfigError):  # a missing preset / YAML file
        cfg = load_model_config(args.config)
    image = load_image(args.image, cfg.views.max_image_pixels) if args.image else synthetic_image()
    model = FusionVLM.from_config(cfg).eval()
    views, plan = model.processor.views(image)
    acct = token_accounting(model.config, image.width, image.height, len(questions))
    print(f"image {image.width}x{image.height} -> {plan.rows}x{plan.cols} local views + 1 global = "
          f"{plan.n_views} views of {model.config.views.view_size} px: tensor {tuple(views.shape)}")
    with torch.no_grad():
        patches = model.vision(views)
        merged = model.merge(patches)
    print(f"vision tower -> patch tokens {tuple(patches.shape)} ({acct.vision_tokens_before_merge} tokens)")
    print(f"merge -> {tuple(merged.shape)} = {acct.vision_tokens} vision tokens into the fusion module")
    print(f"fusion -> fused tokens per question {acct.fused_per_question}: the LLM sees {acct.fused_total} vision "
          f"tokens instead of {acct.vision_tokens} ({acct.reduction:.1f}x fewer)")
    answers = model.generate([image], [questions], max_new_tokens=args.max_new_tokens)[0]
    for q, a in zip(questions, answers):
        print(f"Q: {q}\nA: {a!r}")
    counts = parameter_counts(model)
    print("parameters: " + ", ".join(f"{k} {v['total']:,}" for k, v in counts.items()))
    print("(random weights: the answers are noise until the model is trained)")
    return 0
