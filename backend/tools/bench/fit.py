"""Benchmark the fitting stage: a views x timesteps grid fitted at one resolution, the time
split by phase (initialisation, static fit, tracking, polish).

`python -m backend.tools.bench fit [--json PATH] [--views 8] [--timesteps 8] [--size 128]
[--preset default] [--scene FOLDER] [--device cpu|cuda]`

Without --scene the frames are rendered by our rasterizer from a seeded synthetic scene (a
ground of flat Gaussians with a random texture under a sky colour, and a red blob moving
across it); with --scene, a folder written by `backend.tools.scenes` (Blender renders).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from backend import pipeline
from backend.cameras import orbit_rig
from backend.gaussians import SH_C0, Gaussians
from backend.render import rasterize_gaussians

SKY = (0.55, 0.7, 0.9)


def textured_scene(seed: int = 0, blob_offset=(0.0, 0.0, 0.2), ground_side: int = 40,
                   blob_count: int = 300) -> Gaussians:
    """A ground of small flat Gaussians with a random texture and a red blob above it."""
    rng = np.random.default_rng(seed)
    xs = np.linspace(-2, 2, ground_side)
    X, Y = np.meshgrid(xs, xs)
    ground = np.stack([X.ravel(), Y.ravel(), np.full(X.size, -0.5)], 1)
    ground_colour = rng.uniform(0.05, 0.95, (X.size, 3))
    blob = rng.normal(size=(blob_count, 3)) * 0.2 + blob_offset
    means = np.concatenate([ground, blob]).astype(np.float32)
    colours = np.concatenate([ground_colour, np.tile([0.9, 0.15, 0.1], (blob_count, 1))])
    spacing = 4.0 / (ground_side - 1)
    log_scales = np.concatenate([
        np.tile(np.log([0.6 * spacing, 0.6 * spacing, 0.01]), (X.size, 1)),
        np.full((blob_count, 3), np.log(0.06))])
    n = len(means)
    return Gaussians(means=means, quats=np.tile([1.0, 0, 0, 0], (n, 1)),
                     log_scales=log_scales, opacity_logits=np.full(n, 4.0),
                     sh0=(colours - 0.5) / SH_C0)


def synthetic_grid(views: int, timesteps: int, size: int, seed: int = 0) -> dict:
    """Renders of the moving synthetic scene by a ring: frames [V, T, H, W, 3] uint8, c2w
    [V, T, 4, 4], intrinsics [V, T, 6]."""
    c2w, intr = orbit_rig(views, radius=4.0, camera_height=2.0, focal=1.1 * size,
                          width=size, height=size)
    frames = []
    for t in range(timesteps):
        scene = textured_scene(seed, blob_offset=(0.1 * t, 0.0, 0.2), ground_side=80)
        rgb = rasterize_gaussians(scene, c2w, intr, background=torch.tensor(SKY)).rgb
        frames.append((rgb.clamp(0, 1) * 255 + 0.5).byte().numpy())
    return {"frames": np.stack(frames, axis=1),
            "c2w": np.repeat(c2w[:, None], timesteps, axis=1),
            "intrinsics": np.repeat(intr[:, None], timesteps, axis=1)}


def run(args: argparse.Namespace) -> dict:
    if args.scene is not None:
        from backend.tools.scenes import load_scene

        data = load_scene(args.scene)
        source = str(args.scene)
    else:
        data = synthetic_grid(args.views, args.timesteps, args.size)
        source = "synthetic"
    frames, c2w, intr = data["frames"], data["c2w"], data["intrinsics"]
    V, T = frames.shape[:2]
    frame = pipeline.rig_frame(c2w)
    settings = pipeline.GenerateSettings(fit=args.preset, fit_resolution=max(frames.shape[2:4]))
    started = time.perf_counter()
    _seq, summary = pipeline.fit_cells([pipeline.FitCells(frames, np.ones((V, T), np.float32))],
                                      frame.to_normalised(c2w), intr, settings,
                                      device=args.device)
    total = time.perf_counter() - started
    return {"source": source, "views": V, "timesteps": T, "size": list(frames.shape[2:4]),
            "preset": args.preset, "device": args.device, "total_s": round(total, 2),
            "phase_s": summary["seconds"], "steps": summary["steps"],
            "gaussians": summary["gaussians"], "initial_gaussians": summary["initial_gaussians"],
            "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "machine": platform.machine()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.tools.bench fit",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--timesteps", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--scene", type=Path)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
