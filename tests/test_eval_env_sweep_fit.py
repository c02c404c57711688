"""The evaluation venv runs the documented steps after a sweep: `fusion-vlm sweep` then `fusion-vlm fit`.

Runs only where VLMEvalKit is installed (``bash scripts/install_eval.sh``, then
``.venv-eval/bin/python -m pytest -m vlmeval tests/test_eval_env_sweep_fit.py``).
The sweep runs in-process on tiny checkpoints and a tiny yes/no TSV (registered
as a local file, sockets blocked) with scripted answers whose accuracy is set
by N; the fit runs as the user runs it, through this venv's ``fusion-vlm``
console script, and its exponents are checked against a least-squares line
fitted here with numpy.
"""

from __future__ import annotations

import csv
import importlib.metadata as md
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import POPE_COLORS

pytest.importorskip("vlmeval")
pytest.importorskip("pandas")  # the TinyPOPE fixture (conftest) writes its TSV with pandas

pytestmark = pytest.mark.vlmeval

REPO = Path(__file__).resolve().parents[1]
PAPER_CSV = REPO / "tests" / "data" / "paper_appendix_scores.csv"
CONSOLE = Path(sys.executable).with_name("fusion-vlm")  # the venv's own console script
EXTRAS = ("train", "eval", "dev")  # what scripts/install_eval.sh installs on top of the core dependencies
COLORS = POPE_COLORS  # TinyPOPE (conftest): "Is the image <colour>?", Yes for green and yellow
RIGHT_FOR = {2: {"red", "green"}, 4: {"red", "green", "blue"}, 8: set(COLORS)}  # N -> questions answered right


def _fusion_vlm(*args: str) -> subprocess.CompletedProcess:
    """Run this venv's ``fusion-vlm`` console script offline; returns the finished process."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", MPLBACKEND="Agg")
    return subprocess.run([str(CONSOLE), *args], capture_output=True, text=True, env=env, timeout=300, cwd=REPO)


def _read_csv(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_venv_has_every_requirement_of_the_package():
    """Every core requirement of fusion_vlm and of its installed extras is present at an allowed version."""
    from packaging.requirements import Requirement

    unmet = []
    for spec in md.requires("fusion_vlm") or []:
        req = Requirement(spec)
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in EXTRAS):
            continue  # an extra that scripts/install_eval.sh does not install
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            unmet.append(f"{req.name}: not installed")
            continue
        if not req.specifier.contains(version, prereleases=True):
            unmet.append(f"{req.name}: {version} not in {req.specifier}")
    assert not unmet, unmet


def test_console_script_fits_the_paper_scores(tmp_path):
    """README's `fusion-vlm fit --csv tests/data/paper_appendix_scores.csv` gives Table 1's b (tables only:
    its 6 plots take half a minute; the sweep test below checks a plot)."""
    out = tmp_path / "paper_fit"
    proc = _fusion_vlm("fit", "--csv", str(PAPER_CSV), "--out", str(out), "--no-plots")
    assert proc.returncode == 0, proc.stderr[-2000:]
    fits = {(r["metric"], r["mode"]): r for r in _read_csv(out / "fits.csv")}
    assert f"{float(fits[('Overall@POPE', 'vqq')]['b']):.4f}" == "-0.0503"  # paper Table 1
    assert f"{float(fits[('Overall@MMStar', 'vq_ft')]['b']):.4f}" == "-0.0235"
    assert {"vqq", "vq_ft", "vq"} <= {r["mode"] for r in _read_csv(out / "clusters.csv")}


def test_sweep_then_fit_in_this_venv(tmp_path, tiny_pope, monkeypatch):
    """sweep over N = 2, 4, 8 writes scores.csv; `fusion-vlm fit --csv` on it gives the log-log line's slope."""
    from fusion_vlm.cli import main
    from fusion_vlm.evaluation.runner import Runner
    from fusion_vlm.model import FusionVLM

    def scripted(self, images, questions, *args, **kwargs):
        """Right on RIGHT_FOR[N]'s colours, the opposite answer on the others: accuracy 50 / 75 / 100 %."""
        right = RIGHT_FOR[self.n_queries_used()]
        out = []
        for (q,) in questions:
            colour = next(c for c in COLORS if c in q)
            truth = colour in ("green", "yellow")
            out.append(["Yes" if truth == (colour in right) else "No"])
        return out

    monkeypatch.setattr(Runner, "answer", scripted)
    model = FusionVLM.from_config("tiny")
    ckpts = []
    for n in RIGHT_FOR:
        model.config.fusion.n_queries = n
        model.save_pretrained(tmp_path / f"n{n}")
        ckpts.append(f"{n}={tmp_path / f'n{n}'}")

    sweep = tmp_path / "sweep"
    assert main(["sweep", "--checkpoint", *ckpts, "--mode", "vqq", "--data", "TinyPOPE", "--out", str(sweep),
                 "--data-root", str(tiny_pope), "--max-new-tokens", "2"]) == 0
    scores = _read_csv(sweep / "scores.csv")
    acc = {int(r["n_queries"]): float(r["score"]) for r in scores if r["metric"] == "acc@TinyPOPE"}
    assert acc == {2: 50.0, 4: 75.0, 8: 100.0}

    out = tmp_path / "fit"
    proc = _fusion_vlm("fit", "--csv", str(sweep / "scores.csv"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    fits = {(r["metric"], r["mode"]): r for r in _read_csv(out / "fits.csv")}
    assert {(r["metric"], r["mode"]) for r in scores} == set(fits)
    # P = (a/N)^b  <=>  log P = b log a - b log N: b is minus the slope of the least-squares line
    slope, intercept = np.polyfit(np.log([2, 4, 8]), np.log([50.0, 75.0, 100.0]), 1)
    fit = fits[("acc@TinyPOPE", "vqq")]
    assert float(fit["b"]) == pytest.approx(-slope, rel=1e-4)
    assert float(fit["c"]) == pytest.approx(intercept, rel=1e-4)
    assert (out / "scaling_fits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # matplotlib drew it
