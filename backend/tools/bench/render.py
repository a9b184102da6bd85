"""Benchmark the rasterizers side by side: the numba kernels against the torch twin (and gsplat).

`python -m backend.tools.bench render [--json PATH] [--repeats R] [--only NAME ...]
[--case SIZExN[xVIEWS] ...] [--impl cpu torch gsplat] [--torch-threads T] [--parity]`

Per case: median wall seconds (and process CPU seconds) of forward and forward+backward after
one warm-up call, for each implementation, alternating within the run so both see the same
machine load; the speedup of the kernels over the twin (wall, and in CPU seconds); and the
fraction of the floor the kernels reach, where the floor is the issue's estimate: 1M
Gaussian-pixel evaluations per image at 80 flops each (forward+backward) on a 30 GFLOP/s
two-core CPU.

`--impl gsplat` (CUDA) renders the same scenes with gsplat, the inputs moved to the GPU once
and the device synchronised after each call. `--parity` compares each implementation's
forward images (rgb, alpha, expected depth) with the reference's on the same scene: the torch
twin when it runs, else the CPU kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from backend.cameras import c2w_to_viewmat, intrinsics_to_K, orbit_rig
from backend.render.cpu_project import num_threads
from backend.render.cpu_rasterizer import rasterize_cpu
from backend.render.torch_rasterizer import rasterize_torch

FLOOR_EVALS_PER_IMAGE = 1e6
FLOOR_FLOPS_PER_EVAL = 80
FLOOR_FLOPS_PER_S = 30e9
IMPLEMENTATIONS = {"cpu": rasterize_cpu, "torch": rasterize_torch, "gsplat": None}
GAUSSIAN_KEYS = ("means", "quats", "scales", "opacities", "colors")


@dataclass
class RenderBenchCase:
    name: str
    size: int  # square image side in pixels
    num_gaussians: int
    num_views: int = 1


CASES = (RenderBenchCase("64px_16k", 64, 16_384), RenderBenchCase("128px_50k", 128, 50_000),
         RenderBenchCase("256px_100k", 256, 100_000),
         RenderBenchCase("64cams_128px_50k", 128, 50_000, num_views=64))


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


def parse_case(text: str) -> RenderBenchCase:
    """`SIZExN` or `SIZExNxVIEWS` (e.g. 32x2000) as a case named after it."""
    try:
        numbers = [int(n) for n in text.lower().split("x")]
    except ValueError:
        numbers = []
    if len(numbers) not in (2, 3) or min(numbers) < 1:
        raise argparse.ArgumentTypeError(f"expected SIZExN or SIZExNxVIEWS, got {text!r}")
    return RenderBenchCase(f"{numbers[0]}px_{numbers[1]}" + (
        f"_{numbers[2]}cams" if len(numbers) == 3 else ""), *numbers)


def _implementation(name: str):
    """(rasterize function, device) of an implementation."""
    if name == "gsplat":
        from backend.render.gsplat_rasterizer import rasterize_gsplat

        return rasterize_gsplat, torch.device("cuda")
    return IMPLEMENTATIONS[name], torch.device("cpu")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _calls(case: RenderBenchCase, scene: dict[str, torch.Tensor], name: str) -> dict:
    fn, device = _implementation(name)
    scene = {key: value.to(device) for key, value in scene.items()}
    cameras = (scene["viewmats"], scene["Ks"], case.size, case.size)

    def forward() -> None:
        with torch.no_grad():
            fn(*(scene[k] for k in GAUSSIAN_KEYS), *cameras)
        _synchronize(device)

    def forward_backward() -> None:
        params = [scene[k].clone().requires_grad_() for k in GAUSSIAN_KEYS]
        out = fn(*params, *cameras)
        (out.rgb.sum() + out.depth.mean()).backward()
        _synchronize(device)

    return {"fwd_s": forward, "fwd_bwd_s": forward_backward}


def parity(case: RenderBenchCase, implementations: list[str]) -> dict:
    """Forward images of each implementation against the reference's (torch, else cpu)."""
    reference = "torch" if "torch" in implementations else "cpu"
    scene = make_scene(case)
    images = {}
    for name in dict.fromkeys([reference, *implementations]):
        fn, device = _implementation(name)
        on_device = {key: value.to(device) for key, value in scene.items()}
        with torch.no_grad():
            out = fn(*(on_device[k] for k in GAUSSIAN_KEYS), on_device["viewmats"],
                     on_device["Ks"], case.size, case.size)
        images[name] = {key: getattr(out, key).float().cpu() for key in ("rgb", "alpha", "depth")}
    figures = {"reference": reference}
    for name in implementations:
        if name == reference:
            continue
        row = {}
        for key in ("rgb", "alpha", "depth"):
            diff = (images[name][key] - images[reference][key]).abs()
            row[f"{key}_max_abs"] = float(diff.max())
            row[f"{key}_mean_abs"] = float(diff.mean())
        mse = float(((images[name]["rgb"] - images[reference]["rgb"]) ** 2).mean())
        row["rgb_psnr_db"] = float("inf") if mse == 0 else -10 * float(torch.log10(
            torch.tensor(mse)))
        figures[name] = row
    return figures


def time_case(case: RenderBenchCase, repeats: int, implementations: list[str]) -> dict:
    """Median wall seconds per implementation and pass; calls alternate between them."""
    scene = make_scene(case)
    calls = {name: _calls(case, scene, name) for name in implementations}
    times = {name: {key: [] for key in ("fwd_s", "fwd_bwd_s", "fwd_cpu_s", "fwd_bwd_cpu_s")}
             for name in implementations}
    for name in implementations:  # warm-up: compilation, caches, allocator
        for call in calls[name].values():
            call()
    for _ in range(repeats):
        for name in implementations:
            for key, call in calls[name].items():
                start, start_cpu = time.perf_counter(), time.process_time()
                call()
                times[name][key].append(time.perf_counter() - start)
                times[name][key.replace("_s", "_cpu_s")].append(time.process_time() - start_cpu)
    row = {**asdict(case)}
    for name in implementations:
        for key, values in times[name].items():
            row[f"{name}_{key}"] = statistics.median(values)
    floor_s = (case.num_views * FLOOR_EVALS_PER_IMAGE * FLOOR_FLOPS_PER_EVAL
               / FLOOR_FLOPS_PER_S)
    row["floor_s"] = floor_s
    if "cpu" in implementations:
        row["cpu_fraction_of_floor"] = floor_s / row["cpu_fwd_bwd_s"]
    if {"cpu", "torch"} <= set(implementations):
        row["speedup_fwd_vs_torch"] = row["torch_fwd_s"] / row["cpu_fwd_s"]
        row["speedup_fwd_bwd_vs_torch"] = row["torch_fwd_bwd_s"] / row["cpu_fwd_bwd_s"]
        row["cpu_seconds_ratio_fwd_bwd"] = (row["torch_fwd_bwd_cpu_s"]
                                            / row["cpu_fwd_bwd_cpu_s"])
    return row


def _print_table(rows: list[dict]) -> None:
    print(f"{'case':<18} {'impl':<6} {'fwd s':>9} {'fwd+bwd s':>10} {'speedup':>9} "
          f"{'floor':>7}")
    for row in rows:
        for name in IMPLEMENTATIONS:
            if f"{name}_fwd_s" not in row:
                continue
            speedup = row.get("speedup_fwd_bwd_vs_torch") if name == "cpu" else None
            fraction = row.get("cpu_fraction_of_floor") if name == "cpu" else None
            print(f"{row['name']:<18} {name:<6} {row[f'{name}_fwd_s']:>9.4f} "
                  f"{row[f'{name}_fwd_bwd_s']:>10.4f} "
                  f"{'' if speedup is None else f'{speedup:.1f}x':>9} "
                  f"{'' if fraction is None else f'{fraction:.0%}':>7}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench render", description=__doc__)
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=[c.name for c in CASES],
                        help="run only these cases")
    parser.add_argument("--case", nargs="+", type=parse_case, default=[],
                        help="more cases SIZExN[xVIEWS]; without --only, only these run")
    parser.add_argument("--parity", action="store_true",
                        help="compare forward images with the reference implementation")
    parser.add_argument("--impl", nargs="+", choices=list(IMPLEMENTATIONS),
                        default=["cpu", "torch"], help="implementations to time")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch threads (the twin's fastest setting on a shared 2-core "
                             "machine; 0 keeps torch's default)")
    args = parser.parse_args(argv)
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    if "gsplat" in args.impl and not torch.cuda.is_available():
        raise ValueError("--impl gsplat needs CUDA, which is not available")
    cases = [c for c in CASES if (args.only and c.name in args.only)
             or not (args.only or args.case)] + args.case
    rows = []
    for case in cases:
        rows.append(time_case(case, args.repeats, args.impl))
        if args.parity:
            rows[-1]["parity"] = parity(case, args.impl)
            print(f"parity {case.name}: {rows[-1]['parity']}")
        _print_table(rows[-1:])
    load = os.getloadavg()
    machine = {"cpu_count": os.cpu_count(), "numba_threads": num_threads(),
               "torch_threads": torch.get_num_threads(), "load_average": load,
               "processor": platform.processor() or platform.machine()}
    print(f"machine: {machine}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        device = "cpu+cuda" if "gsplat" in args.impl else "cpu"
        args.json.write_text(json.dumps({"device": device, "machine": machine,
                                         "repeats": args.repeats, "cases": rows}, indent=2))
    return 0
