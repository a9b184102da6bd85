"""Benchmark: one forward of the `tiny` reconstruction model, and refinement steps per second.

Each grid shape (views x timesteps at SIZE x SIZE) runs in a fresh subprocess, so its peak
memory is its own: on the CPU the subprocess's peak resident set size (getrusage max RSS,
which includes the interpreter, torch and the weights) and the rise over the RSS measured
just before the first forward; on CUDA, torch.cuda.max_memory_allocated. Inputs are seeded
random frames on an orbit rig and random (seeded) weights: timings do not depend on what the
model has learned. Refinement runs on the Gaussians of one such forward (4 views x 4
timesteps), one step = all timesteps rendered into all views plus one Adam update.
Paper anchor (Table S3, A100, 350x518 frames): 4 x 4 in 0.65 s, 4 x 16 in 2.17 s.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from backend.cameras import orbit_rig
from backend.checkpoint import count_parameters
from backend.recon import ReconConfig, ReconModel, refine

PAPER_ANCHOR = {"device": "A100", "resolution": "350x518", "forward_s": {"4x4": 0.65,
                                                                        "4x16": 2.17}}


def _inputs(views: int, steps: int, size: int, device: str):
    generator = torch.Generator().manual_seed(0)
    frames = torch.rand(1, views, steps, 3, size, size, generator=generator)
    c2w, intr = orbit_rig(views, focal=1.2 * size, width=size, height=size)
    c2w = torch.tensor(c2w, dtype=torch.float32)[None, :, None].expand(1, views, steps, 4, 4)
    intr = torch.tensor(intr, dtype=torch.float32)[None, :, None].expand(1, views, steps, 6)
    return frames.to(device), c2w.to(device), intr.to(device)


def _model(preset: str, device: str) -> ReconModel:
    torch.manual_seed(0)
    return ReconModel(ReconConfig.preset(preset)).to(device).eval()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_forward(preset: str, views: int, steps: int, size: int, repeats: int,
                    device: str) -> dict:
    """Time `repeats` forwards after one warm-up; runs inside the per-shape subprocess."""
    model = _model(preset, device)
    frames, c2w, intr = _inputs(views, steps, size, device)
    rss_before_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            _sync(device)
            start = time.perf_counter()
            model(frames, c2w, intr)
            _sync(device)
            times.append(time.perf_counter() - start)
    report = {"views": views, "timesteps": steps, "size": size,
              "median_s": round(statistics.median(times[1:]), 4),
              "times_s": [round(t, 4) for t in times[1:]]}
    if device == "cuda":
        report["peak_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        report["memory_measure"] = "torch.cuda.max_memory_allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        report["peak_memory_mib"] = round(peak, 1)
        report["peak_rise_mib"] = round(peak - rss_before_mib, 1)
        report["memory_measure"] = ("getrusage max RSS of a fresh subprocess; rise = over the "
                                    "RSS before the first forward")
    return report


def measure_refine(preset: str, size: int, refine_steps: int, device: str) -> dict:
    """Refinement steps per second on one forward's Gaussians (4 views x 4 timesteps)."""
    views, steps = 4, 4
    model = _model(preset, device)
    frames, c2w, intr = _inputs(views, steps, size, device)
    seq = model.reconstruct(frames[0], c2w[0], intr[0])
    args = (seq, frames[0], c2w[0], intr[0])
    refine(*args, steps=1, lr=0.1, device=device)  # warm-up
    _sync(device)
    start = time.perf_counter()
    refine(*args, steps=refine_steps, lr=0.1, device=device)
    _sync(device)
    elapsed = time.perf_counter() - start
    return {"views": views, "timesteps": steps, "size": size,
            "gaussians_per_timestep": len(seq[0]), "steps": refine_steps,
            "steps_per_s": round(refine_steps / elapsed, 3),
            "renders_per_s": round(refine_steps * views * steps / elapsed, 2)}


def _run_child(argv: list[str]) -> dict:
    cmd = [sys.executable, "-m", "backend.tools.bench", "recon", "--role", "child", *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed: {' '.join(cmd)}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _parse_shapes(text: str) -> list[tuple[int, int]]:
    try:
        shapes = [tuple(int(n) for n in item.split("x")) for item in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise ValueError(f"--shapes: expected e.g. 4x4,4x16 (views x timesteps), got {text!r}")
    return shapes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="build.py bench recon")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--shapes", default="4x4,4x16", help="views x timesteps, comma list")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--refine-steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads in the measuring subprocesses (0: torch default)")
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument("--role", default="parent", help=argparse.SUPPRESS)
    parser.add_argument("--task", default="forward", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shapes = _parse_shapes(args.shapes)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.role == "child":
        if args.task == "refine":
            result = measure_refine(args.preset, args.size, args.refine_steps, args.device)
        else:
            (views, steps), = shapes
            result = measure_forward(args.preset, views, steps, args.size, args.repeats,
                                     args.device)
        print(json.dumps(result))
        return 0
    common = ["--preset", args.preset, "--size", str(args.size), "--device", args.device,
              "--threads", str(args.threads)]
    forward = [_run_child([*common, "--shapes", f"{v}x{t}", "--repeats", str(args.repeats)])
               for v, t in shapes]
    refinement = _run_child([*common, "--task", "refine",
                             "--refine-steps", str(args.refine_steps)])
    with torch.device("meta"):
        counts = {name: count_parameters(ReconModel(ReconConfig.preset(name)))
                  for name in ("tiny", "small", "vggt-scale")}
    report = {"benchmark": "recon", "preset": args.preset, "device": args.device,
              "torch_threads": torch.get_num_threads(), "parameters": counts,
              "forward": forward, "refine": refinement, "paper_anchor": PAPER_ANCHOR}
    for item in forward:
        print(f"forward {item['views']}x{item['timesteps']} at {item['size']}px: "
              f"median {item['median_s']:.3f} s, peak {item['peak_memory_mib']} MiB")
    print(f"refine: {refinement['steps_per_s']} steps/s "
          f"({refinement['gaussians_per_timestep']} Gaussians x 4 timesteps, 4 views)")
    print("parameters: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in counts.items()))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
