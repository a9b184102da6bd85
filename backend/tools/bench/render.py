"""Benchmark the pure-torch Gaussian rasterizer: forward and forward+backward timings.

`python -m backend.tools.bench render [--json PATH] [--repeats R] [--threads T]`
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from backend.cameras import c2w_to_viewmat, intrinsics_to_K, orbit_rig
from backend.render.torch_rasterizer import TorchRasterizerConfig, rasterize_torch


@dataclass
class RenderBenchCase:
    name: str
    size: int  # square image side in pixels
    num_gaussians: int
    num_views: int = 1


CASES = (RenderBenchCase("64px_16k", 64, 16_384), RenderBenchCase("256px_100k", 256, 100_000))


def make_scene(case: RenderBenchCase, seed: int = 0) -> dict[str, torch.Tensor]:
    """An object-like ball of Gaussians whose footprints are about 0.5-2 px, as recon emits."""
    gen = torch.Generator().manual_seed(seed)
    n = case.num_gaussians
    directions = torch.nn.functional.normalize(torch.randn(n, 3, generator=gen), dim=-1)
    radii = torch.rand(n, 1, generator=gen) ** (1 / 3)
    c2w, intr = orbit_rig(case.num_views, radius=3.0, camera_height=0.5, focal=0.9 * case.size,
                          width=case.size, height=case.size)
    pixel_footprint = 3.0 / (0.9 * case.size)  # world size of one pixel at the centre
    return {
        "means": directions * radii,
        "quats": torch.randn(n, 4, generator=gen),
        "scales": pixel_footprint * (0.5 + 1.5 * torch.rand(n, 3, generator=gen)),
        "opacities": 0.3 + 0.7 * torch.rand(n, generator=gen),
        "colors": torch.rand(n, 3, generator=gen),
        "viewmats": torch.as_tensor(c2w_to_viewmat(c2w), dtype=torch.float32),
        "Ks": torch.as_tensor(intrinsics_to_K(intr), dtype=torch.float32),
    }


def _median_seconds(fn, repeats: int) -> tuple[float, float]:
    """Median wall-clock and process CPU seconds of `fn` after one warm-up call."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def time_case(case: RenderBenchCase, repeats: int, config: TorchRasterizerConfig) -> dict:
    scene = make_scene(case)
    gaussian_keys = ("means", "quats", "scales", "opacities", "colors")

    def forward() -> None:
        with torch.no_grad():
            rasterize_torch(*(scene[k] for k in gaussian_keys), scene["viewmats"], scene["Ks"],
                            case.size, case.size, config=config)

    def forward_backward() -> None:
        params = [scene[k].clone().requires_grad_() for k in gaussian_keys]
        out = rasterize_torch(*params, scene["viewmats"], scene["Ks"], case.size, case.size,
                              config=config)
        (out.rgb.sum() + out.depth.mean()).backward()

    forward_s, forward_cpu_s = _median_seconds(forward, repeats)
    both_s, both_cpu_s = _median_seconds(forward_backward, repeats)
    return {**asdict(case), "forward_s": forward_s, "forward_backward_s": both_s,
            "forward_cpu_s": forward_cpu_s, "forward_backward_cpu_s": both_cpu_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench render", description=__doc__)
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--tile-size", type=int, default=TorchRasterizerConfig.tile_size)
    parser.add_argument("--chunk-size", type=int, default=TorchRasterizerConfig.chunk_size)
    parser.add_argument("--no-checkpoint", action="store_true")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    config = TorchRasterizerConfig(tile_size=args.tile_size, chunk_size=args.chunk_size,
                                   checkpoint=not args.no_checkpoint)
    rows = [time_case(case, args.repeats, config) for case in CASES]
    print(f"torch rasterizer, {torch.get_num_threads()} threads, {config}")
    print("median wall seconds (process CPU seconds in brackets)")
    print(f"{'case':<12} {'pixels':>9} {'gaussians':>10} {'forward':>16} {'fwd+bwd':>16}")
    for row in rows:
        print(f"{row['name']:<12} {row['size']}x{row['size']:<6} {row['num_gaussians']:>10} "
              f"{row['forward_s']:>7.3f} ({row['forward_cpu_s']:>6.3f}) "
              f"{row['forward_backward_s']:>7.3f} ({row['forward_backward_cpu_s']:>6.3f})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": "cpu", "threads": torch.get_num_threads(),
                                         "config": asdict(config), "cases": rows}, indent=2))
    return 0
