"""Measured cost of every inference stage at the paper's widths, beside the cost model's prediction.

:func:`run_stage_bench` builds the paper model's parts (``configs/model/paper.yaml``: CLIP ViT-H/14 1280 wide
on 336-px views, fusion 1024 x 20, Llama-2-7B 4096 wide) with random weights at a chosen depth per stack,
and times, per N: vision tower (+ adapter) on the HD-9 views, merge, fusion of a first question
(``[vision][question][N slots]`` + projector), fusion of a later question that reuses the vision prefix's
keys/values, LLM prefill of ``[prompt][N][question]``, one decode step, and the same LLM stages for the
LLaVA-style baseline that feeds every merged vision token to the LLM. Every stage is timed in each of
``rounds`` rounds, the stages alternating inside a round (baseline and fusion path side by side under the
same load); the median is reported, in wall seconds and in CPU seconds of this process (less sensitive
to other programs on a shared machine).

Prediction: FLOPs from :mod:`fusion_vlm.tokens.cost` at the measured depths, turned into seconds with one
throughput, the one the baseline LLM prefill reached in the same run (its FLOPs / its median time). A
stage's ``measured / predicted`` is then its time per FLOP relative to the baseline prefill: 1 means as
efficient as the big LLM matmuls, 2 twice as slow per FLOP. The fused prefill's measured speed-up over
the baseline divided by the FLOP-predicted speed-up is the same comparison for the whole path
(:func:`speedup_ratio`). Times at the paper's depth scale each stack's time by full / measured depth.

Peak memory per stage: the kernel's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``)
minus the resident set before the stage, measured in the warm-up round with glibc's mmap threshold at 64 KiB
(``mallopt``) so that freed buffers return to the OS; beside it the cost model's KV-cache bytes of the
stage. The timed rounds run with the threshold at 32 MiB, as an ordinary process's allocator settles: with
every buffer a fresh mapping, page faults slow the allocation-heavy fused path more than the baseline.

:func:`join_costs` / :func:`plot_accuracy_vs_ttft` join the JSON with a sweep score CSV (``fusion-vlm fit
--costs``). Importing this module does not import torch.
"""

from __future__ import annotations

import inspect
import json
import statistics
import time
from dataclasses import asdict, dataclass, field

from fusion_vlm.tokens import cost

PAPER_DEPTH = {"vision": 32, "fusion": 20, "llm": 32}  # ViT-H/14, the fusion module, Llama-2-7B


@dataclass
class BenchSetup:
    """What to measure; depths are the blocks instantiated per stack (the paper's in PAPER_DEPTH)."""

    n_values: tuple[int, ...] = (8, 64, 256)  # N of the first question
    vision_layers: int = 2  # of 32 ViT-H/14 blocks
    fusion_layers: int = 20  # of 20 fusion blocks
    llm_layers: int = 4  # of 32 Llama-2-7B layers
    dtype: str = "bfloat16"  # every stage, both paths: float32 | bfloat16 (the paper's llm.dtype) | model
    #                          (as FusionVLM runs by default: vision, merge, fusion in float32, the LLM in llm.dtype)
    question_tokens: int = 32  # CLIP tokens in the fusion module and LLM tokens, per question
    prompt_tokens: int = 32  # chat-template tokens around the question (LLM only)
    decode_steps: int = 4  # decode steps timed per round (median per step)
    rounds: int = 3  # timed rounds (after one warm-up round); medians
    width: int = 1008  # image size in pixels: gives the views (10 for any square image at HD-9)
    height: int = 1008
    threads: int | None = None  # torch threads (None: torch's default)
    attention: str = "sdpa"  # attention of the fusion module and of the LLM, both paths: sdpa (PyTorch's kernel,
    #                          FusionVLM's default) | sdpa_blocked (fusion_vlm.attention)


@dataclass
class StageResult:
    """One stage at one N (None for stages that do not depend on N)."""

    stage: str
    n_queries: int | None
    wall_s: float  # median wall time
    cpu_s: float  # median CPU time of this process (all threads)
    flops: float  # cost model, at the measured depth
    predicted_s: float = 0.0  # flops / throughput of the baseline LLM prefill
    ratio: float = 0.0  # wall_s / predicted_s
    peak_bytes: int | None = None  # VmHWM - VmRSS before (see module doc); None where not measured
    kv_bytes: float = 0.0  # cost model: KV cache the stage leaves (LLM or fusion prefix)
    depth_scale: float = 1.0  # paper depth / measured depth of the stack the stage runs


@dataclass
class BenchReport:
    """Every stage, the per-N time to first token and the fused-prefill speed-up ratios."""

    setup: dict
    throughput_flops_per_s: float  # baseline LLM prefill: flops / median wall time
    stages: list[StageResult] = field(default_factory=list)
    ttft: list[dict] = field(default_factory=list)  # per N: measured and paper-depth time to first token
    speedup: list[dict] = field(default_factory=list)  # per N: fused prefill (fusion + LLM) vs the baseline
    notes: list[str] = field(default_factory=list)

    def stage(self, name: str, n: int | None = None) -> StageResult:
        """The result of ``name`` at ``n``."""
        return next(s for s in self.stages if s.stage == name and s.n_queries == n)

    def to_json(self) -> dict:
        """JSON-ready dict (``fusion-vlm fit --costs`` reads its ``ttft`` rows)."""
        return asdict(self)


def _rss(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


MMAP_PEAK, MMAP_TIMED = 64 * 1024, 32 * 1024 * 1024  # glibc mmap threshold: peak-memory round, timed rounds


def _mmap_threshold(nbytes: int) -> bool:
    """Set glibc's ``M_MMAP_THRESHOLD`` (``mallopt``) of this process; False where there is no glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, nbytes))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _peak(fn) -> int | None:
    """Extra peak resident bytes while ``fn()`` runs, or None when the kernel counter cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = _rss("VmRSS")
    fn()
    peak = _rss("VmHWM")
    return None if before is None or peak is None else max(peak - before, 0)


def build_parts(setup: BenchSetup):
    """Paper-width parts at the setup's depths, random init, eval mode, in ``setup.dtype``.

    Returns (model config, dict of modules: tower, merge, fusion, projector, llm).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fusion_vlm.attention import set_llm_attention
    from fusion_vlm.fusion import FusionModule
    from fusion_vlm.language import Projector
    from fusion_vlm.merge import TokenMerge
    from fusion_vlm.training.memory_bench import bench_model_config
    from fusion_vlm.vision import VisionTower, build_clip

    cfg = bench_model_config(setup.vision_layers, setup.fusion_layers, setup.llm_layers, checkpointing=False)
    cfg.fusion.attn_implementation = setup.attention
    side, llm_dtype = (getattr(torch, d) for d in _dtypes(setup, cfg))
    clip = build_clip(cfg.vision, cfg.views.view_size)
    parts = {"tower": VisionTower(clip.visual, cfg.vision, cfg.fusion.hidden_size),
             "merge": TokenMerge(cfg.fusion.hidden_size, cfg.merge), "fusion": FusionModule(cfg.fusion),
             "projector": Projector(cfg.fusion.hidden_size, cfg.llm.tiny["hidden_size"], cfg.projector),
             "llm": LlamaForCausalLM(LlamaConfig(**cfg.llm.tiny))}
    set_llm_attention(parts["llm"], setup.attention)
    return cfg, {k: m.to(llm_dtype if k == "llm" else side).eval() for k, m in parts.items()}


def _dtypes(setup: BenchSetup, cfg) -> tuple[str, str]:
    """(dtype of vision/merge/fusion/projector, dtype of the LLM) for ``setup.dtype``."""
    if setup.dtype == "model":
        return "float32", cfg.llm.dtype
    if setup.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={setup.dtype!r}: expected float32, bfloat16 or model")
    return setup.dtype, setup.dtype


def _merge_flops(views: int, grid: int, width: int, cfg) -> float:
    """Stride-s k x k convolution width -> width over ``views`` grids of ``grid`` x ``grid`` (multiply-add = 2)."""
    from fusion_vlm.merge import merged_grid

    return 2.0 * views * merged_grid(grid, cfg) ** 2 * cfg.kernel_size ** 2 * width * width


def run_stage_bench(setup: BenchSetup, log=print) -> BenchReport:
    """Measure every stage (module doc) and predict it; returns the :class:`BenchReport`."""
    import torch
    from transformers import DynamicCache

    from fusion_vlm.tokens.models import count_fusion_vlm

    if setup.threads:
        torch.set_num_threads(setup.threads)
    torch.manual_seed(0)
    cfg, m = build_parts(setup)
    side_dtype, llm_dtype = _dtypes(setup, cfg)
    dtype = getattr(torch, llm_dtype)
    count = count_fusion_vlm(setup.width, setup.height, config=cfg)
    views, n_vis = count.details["local_views"] + 1, count.details["fusion_vision_tokens"]
    q, p, hid = setup.question_tokens, setup.prompt_tokens, cfg.llm.tiny["hidden_size"]
    vit = cost.vision_transformer(cfg)
    fus = cost.fusion_transformer(cfg.fusion)
    llm = cost.llm_transformer(cfg)
    grid = cfg.views.view_size // cfg.vision.patch_size
    pixels = torch.randn(views, 3, cfg.views.view_size, cfg.views.view_size)
    ids = list(range(1000, 1000 + q))
    emb = {t: (torch.randn(1, t, hid) * 0.02).to(dtype) for t in
           {p + n_vis + q, *(p + n + q for n in setup.n_values)}}
    scale = {"vision": PAPER_DEPTH["vision"] / setup.vision_layers, "fusion": PAPER_DEPTH["fusion"] /
             setup.fusion_layers, "llm": PAPER_DEPTH["llm"] / setup.llm_layers, "merge": 1.0}
    state = {}
    cache_kw = "cache" if "cache" in inspect.signature(m["llm"].model.forward).parameters else "past_key_values"

    def vision():
        state["patches"] = m["tower"](pixels)

    def merge():
        state["vision"] = m["merge"](state["patches"]).flatten(0, 1)

    def prefix():
        state["prefix"] = m["fusion"].encode_prefix(state["vision"])

    def fusion_first(n):
        return lambda: m["projector"](m["fusion"]([state["vision"]], [[ids]], n, n).groups[0][0])

    def fusion_later(n):
        return lambda: m["projector"](m["fusion"].fuse_with_prefix(state["prefix"], [ids], n)[0])

    def prefill(key, tokens):
        def run():
            cache = DynamicCache(config=m["llm"].config)
            h = m["llm"].model(inputs_embeds=emb[tokens], **{cache_kw: cache}, use_cache=True).last_hidden_state
            m["llm"].lm_head(h[:, -1])
            state[key] = (cache, tokens)
        return run

    def decode(key):
        def run():
            cache, tokens = state[key]
            x = emb[tokens][:, -1:]
            for step in range(setup.decode_steps):
                pos = torch.tensor([[tokens + step]])
                h = m["llm"].model(inputs_embeds=x, **{cache_kw: cache}, position_ids=pos,
                                   use_cache=True).last_hidden_state
                m["llm"].lm_head(h[:, -1])
            cache.crop(-setup.decode_steps)
        return run

    base_tokens = p + n_vis + q
    plan = [("vision", None, vision, cost.vision_encoder_flops(vit, views, grid * grid + 1)
             + 2.0 * views * grid * grid * vit.hidden * cfg.fusion.hidden_size, 0.0, "vision"),
            ("merge", None, merge, _merge_flops(views, grid, cfg.fusion.hidden_size, cfg.merge), 0.0, "merge"),
            ("fusion vision prefix", None, prefix, cost.prefill_flops(fus, n_vis, lm_head_tokens=0),
             cost.kv_cache_bytes(fus, n_vis, side_dtype), "fusion"),
            ("baseline LLM prefill", None, prefill("base", base_tokens), cost.prefill_flops(llm, base_tokens),
             cost.kv_cache_bytes(llm, base_tokens, llm_dtype), "llm"),
            ("baseline decode/token", None, decode("base"), cost.decode_flops(llm, base_tokens), 0.0, "llm")]
    for n in setup.n_values:
        plan += [("fusion first question", n, fusion_first(n), cost.fusion_flops(n_vis, q, n, 0, fus, hid,
                                                                                 fus.hidden), 0.0, "fusion"),
                 ("fusion later question (prefix reused)", n, fusion_later(n),
                  cost.fusion_flops(0, q, n, n_vis, fus, hid, fus.hidden), 0.0, "fusion"),
                 ("LLM prefill", n, prefill(f"n{n}", p + n + q), cost.prefill_flops(llm, p + n + q),
                  cost.kv_cache_bytes(llm, p + n + q, llm_dtype), "llm"),
                 ("decode/token", n, decode(f"n{n}"), cost.decode_flops(llm, p + n + q), 0.0, "llm")]
    times = {i: ([], []) for i in range(len(plan))}
    peaks = {}
    log(f"measuring {len(plan)} stages x {setup.rounds} rounds (+1 warm-up), vision/merge/fusion {side_dtype}, "
        f"LLM {llm_dtype}, "
        f"attention {m['llm'].config._attn_implementation}, {torch.get_num_threads()} threads; depths vision {setup.vision_layers}/32, fusion "
        f"{setup.fusion_layers}/20, LLM {setup.llm_layers}/32")
    with torch.inference_mode():
        exact_peaks = _mmap_threshold(MMAP_PEAK)  # freed buffers leave the resident set: peaks per stage
        for i, (_, _, fn, *_rest) in enumerate(plan):  # warm-up, and the peak memory of each stage
            peaks[i] = _peak(fn) if exact_peaks else None
        _mmap_threshold(MMAP_TIMED)
        for _ in range(setup.rounds):
            for i, (_, _, fn, *_rest) in enumerate(plan):
                w, c = time.perf_counter(), time.process_time()
                fn()
                times[i][0].append(time.perf_counter() - w)
                times[i][1].append(time.process_time() - c)
    steps = {i: setup.decode_steps if "decode" in plan[i][0] else 1 for i in times}
    stages = [StageResult(name, n, statistics.median(times[i][0]) / steps[i],
                          statistics.median(times[i][1]) / steps[i], flops, peak_bytes=peaks[i], kv_bytes=kv,
                          depth_scale=scale[stack])
              for i, (name, n, _, flops, kv, stack) in enumerate(plan)]
    base = next(s for s in stages if s.stage == "baseline LLM prefill")
    theta = base.flops / base.wall_s
    for s in stages:
        s.predicted_s = s.flops / theta
        s.ratio = s.wall_s / s.predicted_s
    report = BenchReport(asdict(setup), theta, stages)
    report.notes.append(f"attention {setup.attention} in the fusion module and the LLM (both paths)")
    report.notes.append(f"random weights; depths vision {setup.vision_layers}/32, fusion {setup.fusion_layers}/20, "
                        f"LLM {setup.llm_layers}/32 (paper-depth times scale each stack linearly)")
    _summaries(report, n_vis)
    return report


def speedup_ratio(report: BenchReport, n: int, time_key: str = "wall_s") -> dict:
    """Fused prefill (fusion first question + LLM prefill) vs the baseline LLM prefill, at the measured depth.

    Returns measured and FLOP-predicted speed-ups and their ratio (measured / predicted).
    """
    base = report.stage("baseline LLM prefill")
    fused = [report.stage("fusion first question", n), report.stage("LLM prefill", n)]
    measured = getattr(base, time_key) / sum(getattr(s, time_key) for s in fused)
    predicted = base.flops / sum(s.flops for s in fused)
    return {"n_queries": n, "measured": measured, "predicted": predicted, "ratio": measured / predicted,
            "time": time_key}


def _summaries(report: BenchReport, n_vis: int) -> None:
    shared = [report.stage("vision"), report.stage("merge")]
    shared_s = sum(s.wall_s for s in shared)
    shared_paper = sum(s.wall_s * s.depth_scale for s in shared)
    shared_pred = sum(s.predicted_s * s.depth_scale for s in shared)
    base = report.stage("baseline LLM prefill")
    report.ttft.append({"path": "baseline", "n_queries": n_vis, "ttft_s": shared_s + base.wall_s,
                        "ttft_paper_depth_s": shared_paper + base.wall_s * base.depth_scale,
                        "predicted_paper_depth_s": shared_pred + base.predicted_s * base.depth_scale})
    for n in report.setup["n_values"]:
        f, llm = report.stage("fusion first question", n), report.stage("LLM prefill", n)
        report.ttft.append({"path": "fusion", "n_queries": n, "ttft_s": shared_s + f.wall_s + llm.wall_s,
                            "ttft_paper_depth_s": shared_paper + f.wall_s * f.depth_scale
                            + llm.wall_s * llm.depth_scale,
                            "predicted_paper_depth_s": shared_pred + f.predicted_s * f.depth_scale
                            + llm.predicted_s * llm.depth_scale})
        report.speedup += [speedup_ratio(report, n, "wall_s"), speedup_ratio(report, n, "cpu_s")]


def format_report(report: BenchReport) -> str:
    """The stage table, the TTFT table and the speed-up ratios as text."""
    lines = [f"{'stage':<38}{'N':>5}{'wall s':>9}{'cpu s':>9}{'GFLOP':>9}{'pred s':>9}{'meas/pred':>10}"
             f"{'peak MiB':>10}{'KV MiB':>8}"]
    for s in report.stages:
        peak = "-" if s.peak_bytes is None else f"{s.peak_bytes / 2**20:.0f}"
        lines.append(f"{s.stage:<38}{s.n_queries if s.n_queries is not None else '-':>5}{s.wall_s:>9.3f}"
                     f"{s.cpu_s:>9.3f}{s.flops / 1e9:>9.1f}{s.predicted_s:>9.3f}{s.ratio:>10.2f}{peak:>10}"
                     f"{s.kv_bytes / 2**20:>8.1f}")
    lines.append(f"throughput of the baseline LLM prefill (the prediction's unit): "
                 f"{report.throughput_flops_per_s / 1e9:.1f} GFLOP/s")
    lines.append(f"\n{'time to first token':<22}{'N':>6}{'measured s':>12}{'paper depth s':>15}{'predicted s':>13}")
    for t in report.ttft:
        lines.append(f"{t['path']:<22}{t['n_queries']:>6}{t['ttft_s']:>12.3f}{t['ttft_paper_depth_s']:>15.3f}"
                     f"{t['predicted_paper_depth_s']:>13.3f}")
    lines.append(f"\n{'fused prefill vs baseline':<28}{'N':>5}{'measured x':>12}{'predicted x':>13}{'ratio':>8}")
    for s in report.speedup:
        lines.append(f"{'  by ' + s['time'].replace('_s', ' time'):<28}{s['n_queries']:>5}{s['measured']:>11.2f}x"
                     f"{s['predicted']:>12.2f}x{s['ratio']:>8.2f}")
    return "\n".join(lines + [f"note: {n}" for n in report.notes])


def load_costs(path) -> dict[int, float]:
    """{N: time to first token in seconds} of the fusion path from a bench JSON (paper depth when present).

    Raises ValueError naming the file when it holds no ``ttft`` rows.
    """
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    rows = [r for r in data.get("ttft", []) if r.get("path") == "fusion"] if isinstance(data, dict) else []
    if not rows:
        raise ValueError(f"{path}: no fusion 'ttft' rows (write it with scripts/bench_efficiency.py --json)")
    return {int(r["n_queries"]): float(r.get("ttft_paper_depth_s", r["ttft_s"])) for r in rows}


def join_costs(rows: list[dict], costs: dict[int, float]) -> list[dict]:
    """Score rows (metric, mode, n_queries, score) with a ``ttft_s`` column; rows whose N has no cost dropped."""
    return [{**r, "ttft_s": costs[int(r["n_queries"])]} for r in rows if int(r["n_queries"]) in costs]


def plot_accuracy_vs_ttft(joined: list[dict], path: str) -> str:
    """Score against measured time to first token, one panel per metric, one line per mode; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(r["metric"] for r in joined))
    cols = min(4, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        for mode in dict.fromkeys(r["mode"] for r in joined if r["metric"] == metric):
            pts = sorted((r["ttft_s"], float(r["score"]), int(r["n_queries"])) for r in joined
                         if r["metric"] == metric and r["mode"] == mode)
            ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], marker="o", label=mode)
            for x, y, n in pts:
                ax.annotate(f"N={n}", (x, y), fontsize=6, textcoords="offset points", xytext=(2, 2))
        ax.set_xscale("log")
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("time to first token (s)")
        ax.set_ylabel("score")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_cost_join(rows: list[dict], modes: list[str], costs_path: str, out_dir: str, plots: bool = True
                    ) -> list[str]:
    """``fusion-vlm fit --costs``: write accuracy_vs_ttft.csv (and .png) in ``out_dir``; returns the paths.

    ``rows``: score rows (metric, mode, n_queries, score) of ``modes``; ``costs_path``: a bench JSON.
    Raises DataError naming the file when it is unreadable or shares no N with the scores.
    """
    import csv
    import os

    from fusion_vlm.errors import DataError, user_input

    with user_input(DataError, costs_path):
        try:
            costs = load_costs(costs_path)
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read it: {err}") from None
    joined = join_costs([r for r in rows if r["mode"] in modes], costs)
    if not joined:
        have = sorted({int(r["n_queries"]) for r in rows})
        raise DataError(f"{costs_path}: no N in common with the scores (costs for N = {sorted(costs)}, "
                        f"scores for N = {have})")
    missing = sorted({int(r["n_queries"]) for r in rows} - set(costs))
    if missing:
        print(f"--costs: no measured time for N = {missing}; those points are left out")
    path = os.path.join(out_dir, "accuracy_vs_ttft.csv")
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["metric", "mode", "n_queries", "score", "ttft_s"])
        writer.writeheader()
        writer.writerows({k: r[k] for k in writer.fieldnames} for r in joined)
    written = [path]
    if plots:
        written.append(plot_accuracy_vs_ttft(joined, os.path.join(out_dir, "accuracy_vs_ttft.png")))
    return written
