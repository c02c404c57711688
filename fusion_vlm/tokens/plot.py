"""Figure: visual tokens vs image resolution per model (the "hidden inefficiency" blog's Figure 1).

One panel per aspect ratio (square and 16:9 by default, the latter is where Pan&Scan
and AnyRes grids differ); x = image size in megapixels, y = tokens per image
(both log scale). Gemma 3 is drawn with and without Pan&Scan, and fusion-vlm twice:
the tokens its LLM sees (N) and the vision tokens entering its fusion module.
"""

from __future__ import annotations

from pathlib import Path

from fusion_vlm.tokens.calculator import count_visual_tokens, list_models


# Models whose curves coincide are drawn once, labelled with both names.
TWINS = {"qwen2.5-vl": "qwen2-vl", "instructblip": "blip-2"}


def _series(models, knobs):
    """(label, model, knobs, value-getter, linestyle, group index) for every curve to draw."""
    out, group = [], 0
    for name in models:
        if TWINS.get(name) in models:
            continue
        twin = next((t for t, base in TWINS.items() if base == name and t in models), None)
        label = f"{name} / {twin}" if twin else name
        kw = dict((knobs or {}).get(name, {}))
        if name == "gemma3":
            out.append(("gemma3", name, {**kw, "pan_and_scan": False}, lambda c: c.total, "-", group))
            out.append(("gemma3 Pan&Scan", name, {**kw, "pan_and_scan": True}, lambda c: c.total, "--", group))
        elif name == "fusion-vlm":
            out.append((f"fusion-vlm: LLM tokens (N={kw.get('n_queries', 256)})", name, kw, lambda c: c.total,
                        "-.", group))
            out.append(("fusion-vlm: fusion-module input", name, kw,
                        lambda c: c.details["fusion_vision_tokens"], ":", group))
        else:
            out.append((label, name, kw, lambda c: c.total, "-", group))
        group += 1
    return out


def plot_tokens_vs_resolution(path, models=None, knobs: dict | None = None, aspects=((1, 1), (16, 9)),
                              min_side: int = 64, max_side: int = 4096, points: int = 90):
    """Render the tokens-vs-resolution figure to ``path`` (PNG/PDF/SVG by suffix); returns the Path.

    ``models``: names from :func:`list_models` (default all); ``knobs``: {model: {knob: value}}
    passed to :func:`count_visual_tokens`; ``aspects``: (w, h) ratios, one panel each;
    the long side runs log-uniformly over [min_side, max_side] pixels in ``points`` steps.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(models or list_models())
    series = _series(models, knobs)
    colors = plt.get_cmap("tab10").colors
    fig, axes = plt.subplots(1, len(aspects), figsize=(7.5 * len(aspects), 6.2), sharey=True, squeeze=False)
    ratio = (max_side / min_side) ** (1 / max(points - 1, 1))
    longs = sorted({round(min_side * ratio**i) for i in range(points)})
    for ax, (aw, ah) in zip(axes[0], aspects):
        sizes = [(s, max(1, round(s * ah / aw))) if aw >= ah else (max(1, round(s * aw / ah)), s) for s in longs]
        for label, name, kw, value, style, group in series:
            xs, ys = [], []
            for w, h in sizes:
                try:
                    ys.append(value(count_visual_tokens(name, w, h, **kw)))
                    xs.append(w * h / 1e6)
                except ValueError:  # e.g. aspect ratios a model refuses
                    continue
            ax.plot(xs, ys, style, color=colors[group % len(colors)], label=label,
                    lw=2.4 if style != "-" else 1.8, drawstyle="steps-post")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"image size (megapixels), aspect {aw}:{ah}")
        ax.set_title(f"{aw}:{ah} images, long side {min_side}-{max_side} px")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("visual tokens per image (log scale)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=9, frameon=False)
    fig.suptitle("Visual tokens vs image resolution")
    fig.tight_layout(rect=(0, 0.06 + 0.03 * ((len(labels) - 1) // 5), 1, 0.96))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
