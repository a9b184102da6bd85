"""Benchmark: does the fused attention saving survive in the whole model?

One forward of the `small` preset with fused attention against the same model with full
attention (same weights shapes, same grid), and one full denoising step (a 1-step Euler
sample, i.e. one model call with given cells and camera rays) of the `tiny` preset on a
4 x 8 grid. Median of `--repeats` after one warm-up, in one run, so the ratio is side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from backend.diffusion.config import DiffusionConfig
from backend.diffusion.model import VideoDiT
from backend.diffusion.sampler import EulerSampler


def time_call(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):  # allocations (and any compilation) before timing
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def grid_inputs(config: DiffusionConfig, views: int, steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h, w = config.image_size
    shape = (1, views, steps, config.in_channels, h, w)
    x = torch.randn(shape, generator=g)
    mask = torch.zeros(1, views, steps, dtype=torch.bool)
    mask[:, 0] = True
    mask[:, :, 0] = True
    rays = torch.randn(1, views, steps, 6, h, w, generator=g) if config.use_camera_rays else None
    return x, mask, rays


def model_forward_seconds(preset: str, attention: str, impl: str, views: int, steps: int,
                          repeats: int, warmup: int = 1) -> float:
    torch.manual_seed(0)
    config = DiffusionConfig.preset(preset, attention=attention, attention_impl=impl)
    model = VideoDiT(config).eval()
    x, mask, rays = grid_inputs(config, views, steps)
    s = torch.full((1,), 0.5)
    with torch.no_grad():
        return time_call(lambda: model(x, s, x, mask, rays=rays), repeats, warmup)


def denoising_step_seconds(views: int, steps: int, impl: str, repeats: int) -> float:
    config = DiffusionConfig.preset("tiny", attention_impl=impl)
    model = VideoDiT(config).eval()
    x, mask, rays = grid_inputs(config, views, steps)
    sampler = EulerSampler(steps=1)
    return time_call(lambda: sampler.sample(model, x, mask, rays=rays,
                                            generator=torch.Generator().manual_seed(0)), repeats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="build.py bench diffusion")
    parser.add_argument("--grid", default="4x8", help="views x timesteps for the small model")
    parser.add_argument("--impl", default="auto",
                        help="fused attention implementation (auto: merged on the CPU, flex on "
                             "CUDA)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed calls of the small model first (0 for long forwards of "
                             "a kernel that needs no compilation)")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    views, steps = (int(v) for v in args.grid.split("x"))
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError("--repeats must be at least 1 and --warmup at least 0")
    fused = model_forward_seconds("small", "fused", args.impl, views, steps, args.repeats,
                                  args.warmup)
    full = model_forward_seconds("small", "full", args.impl, views, steps, args.repeats,
                                 args.warmup)
    step = denoising_step_seconds(4, 8, args.impl, args.repeats)
    ideal = views * steps / (views + steps - 1)
    report = {"device": "cpu", "threads": torch.get_num_threads(), "grid": [views, steps],
              "impl": args.impl, "repeats": args.repeats, "warmup": args.warmup,
              "small_forward_fused_s": fused, "small_forward_full_s": full,
              "small_model_speedup": full / fused, "attention_ideal_speedup": ideal,
              "tiny_denoising_step_4x8_s": step}
    print(f"small preset, {views}x{steps} grid: fused {fused:.2f} s, full {full:.2f} s, "
          f"model speedup {full / fused:.2f}x (attention-only ideal {ideal:.2f}x)")
    print(f"tiny preset, one denoising step on a 4x8 grid of 64x64: {step:.2f} s")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
