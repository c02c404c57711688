"""Loading checkpoints safely: no remote code from a checkpoint, offline means offline, strict weight loads."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from fusion_vlm.cli import main
from fusion_vlm.errors import CheckpointError


def _copy(src, dst, skip=()):
    dst.mkdir(parents=True)
    for f in src.rglob("*"):
        rel = f.relative_to(src)
        if f.is_file() and not any(rel == type(rel)(s) or type(rel)(s) in rel.parents for s in skip):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            (dst / rel).write_bytes(f.read_bytes())
    return dst


def _set_config(ckpt, **llm):
    cfg = yaml.safe_load((ckpt / "config.yaml").read_text())
    cfg["llm"].update(llm)
    (ckpt / "config.yaml").write_text(yaml.safe_dump(cfg))
    if "path" in llm:  # the LLM is now referenced, its weights not saved
        (ckpt / "llm_reference.json").write_text(json.dumps({"path": llm["path"], "weights_saved": False}))


# ----------------------------------------------------------------------------- a checkpoint cannot run code

EVIL_CODE = '''
import os
from pathlib import Path
Path(os.environ["FUSION_VLM_TEST_MARKER"]).write_text("the checkpoint's code ran")
from transformers import LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    model_type = "evil_llama"


class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
'''


@pytest.fixture()
def code_checkpoint(checkpoint, tmp_path, monkeypatch):
    """A checkpoint whose config asks for remote code and whose LLM folder ships a module that leaves a marker."""
    import transformers.dynamic_module_utils as dmu

    ckpt = _copy(checkpoint, tmp_path / "evil_ckpt", skip={"llm.safetensors"})
    llm = ckpt / "evil_llm"
    llm.mkdir()
    (llm / "evil_code.py").write_text(EVIL_CODE)
    (llm / "config.json").write_text(json.dumps({
        "model_type": "evil_llama", "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "evil_code.EvilConfig", "AutoModelForCausalLM": "evil_code.EvilForCausalLM"},
        "vocab_size": 260, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 4}))
    _set_config(ckpt, path=str(llm), trust_remote_code=True)
    marker = tmp_path / "marker.txt"
    monkeypatch.setenv("FUSION_VLM_TEST_MARKER", str(marker))
    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))  # keep the copied code in tmp
    return ckpt, marker


def test_checkpoint_config_cannot_turn_on_remote_code(code_checkpoint, tmp_path, capsys, caplog):
    from fusion_vlm.model import FusionVLM

    ckpt, marker = code_checkpoint
    with pytest.raises(Exception) as info:
        FusionVLM.from_pretrained(ckpt)
    assert not marker.exists(), "the checkpoint's code ran"
    assert isinstance(info.value, CheckpointError) and "--trust-remote-code" in str(info.value)
    assert "\n" not in str(info.value)
    assert any("asks for llm.trust_remote_code" in r.getMessage() for r in caplog.records)

    image = tmp_path / "img.png"
    from PIL import Image

    Image.new("RGB", (20, 20), "red").save(image)
    assert main(["generate", "--checkpoint", str(ckpt), "--image", str(image), "--question", "Q?"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--trust-remote-code" in err[0] and str(ckpt) in err[0]
    assert not marker.exists()


def test_explicit_trust_does_run_the_code(code_checkpoint):
    """Control: the same checkpoint does run its code when the caller allows it (so the test above is real)."""
    from fusion_vlm.model import FusionVLM

    ckpt, marker = code_checkpoint
    try:
        FusionVLM.from_pretrained(ckpt, trust_remote_code=True)
    except Exception:  # noqa: BLE001 - loading may fail later (no weights); only the import matters here
        pass
    assert marker.read_text() == "the checkpoint's code ran"


# ----------------------------------------------------------------------------- offline means offline

class Refused(Exception):
    pass


@pytest.fixture()
def hf_spy(monkeypatch):
    """Record the keyword arguments of every Hugging Face from_pretrained call, then stop the load."""
    import transformers

    calls = []

    def spy(name):
        def fake(path, *args, **kwargs):
            calls.append((name, str(path), kwargs))
            raise Refused(name)
        return classmethod(lambda cls, path, *a, **kw: fake(path, *a, **kw))

    for name in ("AutoTokenizer", "AutoModelForCausalLM", "AutoConfig", "AutoModel"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", spy(name))
    return calls


@pytest.mark.parametrize("offline", [True, False])
def test_hf_loads_honour_hf_hub_offline(hf_spy, monkeypatch, offline):
    from fusion_vlm.config import load_model_config
    from fusion_vlm.language import build_llm, load_tokenizer

    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cfg = load_model_config("tiny", ["llm.path=some-org/some-llm"]).llm
    with pytest.raises(Refused):
        load_tokenizer(cfg)
    with pytest.raises(Refused):
        build_llm(cfg, tokenizer=None, device="cpu")
    assert [c[0] for c in hf_spy] == ["AutoTokenizer", "AutoModelForCausalLM"]
    assert all(c[1] == "some-org/some-llm" and c[2]["local_files_only"] is offline for c in hf_spy)
    assert all(c[2]["trust_remote_code"] is False for c in hf_spy)


def test_checkpoint_referencing_its_llm_loads_it_offline(checkpoint, hf_spy, tmp_path, monkeypatch):
    """A paper-style checkpoint (LLM referenced, not saved): every load of the LLM stays local under HF_HUB_OFFLINE."""
    from fusion_vlm.model import FusionVLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt = _copy(checkpoint, tmp_path / "ref", skip={"llm.safetensors", "tokenizer"})
    _set_config(ckpt, path="meta-llama/Llama-2-7b-chat-hf", save_weights=False)
    with pytest.raises(Refused):
        FusionVLM.from_pretrained(ckpt)
    assert hf_spy and all(c[2]["local_files_only"] is True for c in hf_spy)


def test_divergence_model_loads_are_local(hf_spy, tmp_path):
    from fusion_vlm.analysis import divergence as dv

    with pytest.raises(Refused):
        dv.load_model(tmp_path)
    assert hf_spy and all(c[2]["local_files_only"] is True for c in hf_spy)


# ----------------------------------------------------------------------------- strict loads

def _edit_tensors(path, edit):
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("fname", ["llm.safetensors", "model.safetensors"])
def test_missing_or_unexpected_key_is_a_checkpoint_error(checkpoint, tmp_path, fname):
    from fusion_vlm.model import FusionVLM

    names = sorted(load_file(str(checkpoint / fname)))
    victim = next(k for k in names if k.endswith("weight"))

    extra = _copy(checkpoint, tmp_path / "extra")
    _edit_tensors(extra / fname, lambda s: s.__setitem__("stray.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected stray\.weight") as info:
        FusionVLM.from_pretrained(extra)
    assert fname in str(info.value)

    missing = _copy(checkpoint, tmp_path / "missing")
    _edit_tensors(missing / fname, lambda s: s.pop(victim))
    with pytest.raises(CheckpointError, match="missing " + victim.replace(".", r"\.")) as info:
        FusionVLM.from_pretrained(missing)
    assert fname in str(info.value)

    shape = _copy(checkpoint, tmp_path / "shape")
    _edit_tensors(shape / fname, lambda s: s.__setitem__(victim, torch.zeros(3, 1)))
    with pytest.raises(CheckpointError, match="shape of " + victim.replace(".", r"\.")):
        FusionVLM.from_pretrained(shape)


@pytest.mark.parametrize("fname", ["llm.safetensors", "model.safetensors"])
def test_truncated_or_garbage_safetensors_is_one_line(checkpoint, tmp_path, fname):
    from fusion_vlm.model import FusionVLM

    for kind, cut in (("truncated", lambda b: b[: len(b) // 2]), ("garbage", lambda b: b"not safetensors at all"),
                      ("empty", lambda b: b"")):
        ckpt = _copy(checkpoint, tmp_path / kind / fname)
        (ckpt / fname).write_bytes(cut((ckpt / fname).read_bytes()))
        with pytest.raises(CheckpointError) as info:
            FusionVLM.from_pretrained(ckpt)
        msg = str(info.value)
        assert str(ckpt / fname) in msg and "\n" not in msg, (kind, msg)


def test_saved_llm_weights_that_are_gone_are_refused(checkpoint, tmp_path):
    from fusion_vlm.model import FusionVLM

    ckpt = _copy(checkpoint, tmp_path / "nollm", skip={"llm.safetensors"})  # llm_reference.json: weights_saved
    with pytest.raises(CheckpointError, match="llm.safetensors is missing"):
        FusionVLM.from_pretrained(ckpt)


def test_strict_load_round_trip_is_exact(checkpoint):
    from fusion_vlm.model import FusionVLM

    loaded = FusionVLM.from_pretrained(checkpoint)
    saved = {**load_file(str(checkpoint / "model.safetensors")),
             **{f"llm.{k}": v for k, v in load_file(str(checkpoint / "llm.safetensors")).items()}}
    state = loaded.state_dict()
    assert set(saved) == set(state)
    assert all(torch.equal(state[k], v) for k, v in saved.items())
