"""Parts of the demo report that are not statistics: the run's set-up (config, seeds, versions, wall
times) and the score plot with error bars."""

from __future__ import annotations

import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import numpy as np

PACKAGES = {"torch": "torch", "transformers": "transformers", "open_clip": "open_clip_torch",
            "deepspeed": "deepspeed", "fusion_vlm": "fusion_vlm"}  # report name -> distribution name


def git_commit(where: str | Path | None = None) -> str | None:
    """The commit checked out where fusion_vlm's source lives (``git rev-parse HEAD``), or None."""
    root = Path(where) if where is not None else Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        proc = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def versions() -> dict[str, str]:
    """{python, torch, transformers, open_clip, deepspeed, fusion_vlm, git_commit}: installed versions
    ("not installed" when absent) and the source's git commit ("unknown" outside a git checkout)."""
    out = {"python": platform.python_version()}
    for name, dist in PACKAGES.items():
        try:
            out[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["git_commit"] = git_commit() or "unknown"
    return out


def run_section(out: Path, cfg, ns, timings: dict) -> list[str]:
    """Markdown lines of the run's set-up (size, config, seeds, versions, wall time per stage); writes
    ``out/versions.json``."""
    ver = versions()
    seed = getattr(cfg, "seed", None)
    ver_record = {**ver, "seed": seed, "config": getattr(cfg, "name", None)}
    (out / "versions.json").write_text(json.dumps(ver_record, indent=2))
    lines = [f"Size: {cfg.train_images} train / {cfg.test_images} test images; N sweep {list(ns)} (N' = min(N, 8) "
             f"in training; every test question is asked alone with N fused tokens).", "",
             "## Run", "",
             f"Config `{getattr(cfg, 'name', '?')}` (the whole recipe: `config.yaml` beside this report). "
             f"Seed {seed}: the world, stage 0, stages 1-3 and evaluation; every bootstrap of this report uses "
             f"seed 0.", "", "| software | version |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in ver.items()]
    lines += standins_section(out / "stage0" / "standins.json")
    lines += ["", "## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    lines += [f"| total | {sum(timings.values()):.1f} |"]
    return lines


def standins_section(path: Path) -> list[str]:
    """Markdown lines on the stand-in CLIP and LLM (where they came from, their probe figures against the
    targets) from ``stage0/standins.json``; none when the file is absent."""
    from fusion_vlm.demo.standins import VISION_PROBES

    if not path.is_file():
        return []
    info = json.loads(path.read_text())
    lines = ["", "## Stand-ins", "", f"Source: {info.get('source')}."]
    probe = info.get("probe")
    if not probe:
        return lines
    targets = probe.get("targets", {})
    rand = probe.get("vision_random", {})
    lines += ["", "Linear probes on the frozen vision tower's tokens (test %, beside a random-initialised tower) "
              "and the text-only LLM answering from a scene-text context:", "",
              "| probe | stand-in | random tower | target |", "|---|---|---|---|"]
    for key, name in VISION_PROBES.items():
        if key in probe.get("vision", {}):
            r = f"{rand[key]:.1f}" if key in rand else "-"
            lines.append(f"| vision: {name} | {probe['vision'][key]:.1f} | {r} | >= {targets.get(key, '-')} |")
    for fam, acc in probe.get("llm", {}).get("scene", {}).items():
        lines.append(f"| LLM from scene text: {fam} | {acc:.1f} | - | >= {targets.get('llm_scene', '-')} |")
    return lines


def plot_scores(results: dict, rules: dict, path, n_boot: int = 2000) -> str:
    """One panel per family: each mode's figure vs N (log axis) with 95 % bootstrap error bars (one-N modes
    as single points), each shortcut rule as a dashed line with its 95 % band."""
    from fusion_vlm.analysis.plots import _log2_axis, _plt, _save
    from fusion_vlm.demo.results import _families, combo, metric_name, mode_ns, mode_order

    plt = _plt()
    fams = _families(results)
    cols = 3
    rows = -(-len(fams) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False, layout="constrained")
    modes = mode_order(results)
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(modes)}
    ns_of = mode_ns(results)
    all_n = sorted({n for _, n in results if n is not None})
    for ax, fam in zip(axes.flat, fams):
        for mode in modes:
            pts = [(n, combo([results[(mode, n)][fam]], n_boot=n_boot)) for n in ns_of[mode]
                   if fam in results[(mode, n)]]
            pts = [(n, iv) for n, iv in pts if iv is not None]
            if pts and pts[0][0] is None:  # a mode without N (e.g. all tokens): a dotted line with its band
                iv = pts[0][1]
                ax.axhline(iv[0], ls=":", lw=1.4, color=colors[mode], label=f"{mode} (all tokens)")
                ax.axhspan(iv[1], iv[2], color=colors[mode], alpha=0.12, lw=0)
                pts = pts[1:]
            if not pts:
                continue
            n = np.array([p[0] for p in pts], float)
            y = np.array([p[1][0] for p in pts])
            err = np.array([[p[1][0] - p[1][1] for p in pts], [p[1][2] - p[1][0] for p in pts]])
            ax.errorbar(n, y, yerr=err, fmt="o-" if len(pts) > 1 else "s", ms=3.5, capsize=2.5, lw=1.2,
                        color=colors[mode], label=mode)
        for k, (rule, rfams) in enumerate(rules.items()):
            iv = combo([rfams[fam]], n_boot=n_boot) if fam in rfams else None
            if iv is None:
                continue
            shade = 0.35 + 0.3 * k
            ax.axhline(iv[0], ls="--", lw=1, color=(shade, shade, shade), label=f"rule: {rule}")
            ax.axhspan(iv[1], iv[2], color=(shade, shade, shade), alpha=0.15, lw=0)
        _log2_axis(ax, all_n)
        ax.set_title(metric_name(fam), fontsize=9)
        ax.set_xlabel("query tokens N (log scale)", fontsize=7)
        ax.set_ylabel("%", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, framealpha=0.6)
    for ax in list(axes.flat)[len(fams):]:
        ax.axis("off")
    fig.suptitle("Demo scores vs N with 95 % bootstrap intervals over test images; rules as dashed bands",
                 fontsize=11)
    return _save(fig, path)
