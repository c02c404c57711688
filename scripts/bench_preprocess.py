"""Benchmark: fusion_vlm ViewProcessor vs transformers' LlavaNextImageProcessor (CPU).

Both start from the same decoded RGB PIL images and end with normalised
float32 336-px view tensors.  The transformers side is its default
``LlavaNextImageProcessor`` (in transformers 5.x the torchvision-backed
implementation; built offline, default kwargs except size / crop_size set to
336 as in the llava-v1.6 checkpoints, so it also emits 336-px views), called
on the whole list with ``return_tensors="pt"``; ours is
``ViewProcessor().process_batch``.  The two are timed in alternating rounds
(so machine-load drift hits both), after a warm-up; the median round is
reported.  HD-9 gives more views per image than LLaVA-NeXT's AnyRes grid, so
views/s is the like-for-like throughput.

Usage: python scripts/bench_preprocess.py [--images 16] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import numpy as np
import torch
from PIL import Image

from fusion_vlm.views import ViewProcessor

SETS = {"1920x1080": (1920, 1080), "1008x1008": (1008, 1008), "4000x300": (4000, 300)}


def make_images(width: int, height: int, count: int, seed: int = 0) -> list[Image.Image]:
    """``count`` deterministic RGB images of smooth content plus mild noise, as decoded PIL images."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    images = []
    for _ in range(count):
        chans = []
        for _ in range(3):
            fx, fy, ph = rng.uniform(0.5, 6.0, 3).astype(np.float32)
            chans.append(np.sin(2 * np.pi * (fx * x + fy * y) + ph) * 100 + 127)
        noise = rng.normal(0, 8, (height, width, 3)).astype(np.float32)
        pixels = np.clip(np.stack(chans, -1) + noise, 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels))
    return images


def llava_next_processor():
    """transformers' default LlavaNextImageProcessor, emitting 336-px views (offline, no hub)."""
    from transformers import LlavaNextImageProcessor

    return LlavaNextImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})


def run_ours(proc: ViewProcessor, images: list[Image.Image]) -> list[int]:
    """Process ``images``; returns the number of views per image."""
    views, _ = proc.process_batch(images)
    assert all(v.shape[1:] == (3, 336, 336) and v.dtype == torch.float32 for v in views)
    return [v.shape[0] for v in views]


def run_theirs(proc, images: list[Image.Image]) -> list[int]:
    """Process ``images`` with transformers; returns the number of views per image."""
    pixel_values = proc(images=images, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape[-3:] == (3, 336, 336) and pixel_values.dtype == torch.float32
    return [pixel_values.shape[1]] * pixel_values.shape[0]


def time_rounds(fns: dict[str, Callable[[], list[int]]], repeats: int) -> dict[str, tuple[float, list[int]]]:
    """Warm up each fn once, then ``repeats`` alternating timed rounds; returns name -> (median s, views)."""
    views = {name: fn() for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), views[name]) for name in fns}


def main() -> None:
    """Run every image set and print the comparison table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16, help="images per set")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per processor")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (both)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    ours, theirs = ViewProcessor(), llava_next_processor()
    cls = type(theirs)
    print(f"transformers processor: {cls.__module__}.{cls.__name__} (bases: {[b.__name__ for b in cls.__mro__[1:3]]})")
    print(f"torch threads: {torch.get_num_threads()}, cpu count: {os.cpu_count()}, "
          f"load average: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print(f"{args.images} images per set, median of {args.repeats} alternating rounds after warm-up\n")
    header = f"{'set':<10} {'processor':<26} {'views/img':>9} {'images/s':>9} {'views/s':>9} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    for label, (width, height) in SETS.items():
        images = make_images(width, height, args.images, seed=width + height)
        fns = {
            "ViewProcessor (HD-9)": lambda: run_ours(ours, images),
            "LlavaNext (transformers)": lambda: run_theirs(theirs, images),
        }
        result = time_rounds(fns, args.repeats)
        rates = {name: sum(views) / seconds for name, (seconds, views) in result.items()}
        base = rates["LlavaNext (transformers)"]
        for name, (seconds, views) in result.items():
            per_img = "/".join(str(v) for v in sorted(set(views)))
            print(
                f"{label:<10} {name:<26} {per_img:>9} {len(views) / seconds:>9.1f} "
                f"{rates[name]:>9.1f} {rates[name] / base:>6.2f}x"
            )
    print("\nratio = views/s relative to LlavaNextImageProcessor on the same images")


if __name__ == "__main__":
    main()
