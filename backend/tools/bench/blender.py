"""Benchmark: importing per-timestep Gaussians into Blender as the add-on's animated asset.

import_s:    decoded wire arrays (T timesteps x N Gaussians) -> a playable asset: the meshes,
             attributes, Geometry Nodes, visibility keys, and the first frame evaluated.
             Median over fresh scenes.
frame_ms:    median time to change frame and evaluate the newly shown timestep (viewport
             points), first pass over the sequence.
replay_frame_ms: the same on a second pass (timesteps evaluated once stay evaluated).
splat_frame_ms: first-pass frame change with splats in the viewport (what a render evaluates).
render_s:    per engine, the median time to render one new frame at 32x32 with one sample
             (splats): scene preparation (geometry nodes, synchronisation, Cycles' BVH)
             dominates, so this is the per-frame preparation cost of a final render.
render_rss_mib: per engine, resident memory added after those renders.
import_rss_mib / played_rss_mib: resident memory added by one import, and after one pass.
Needs bpy (the development environment installs it) and the add-on from this repository.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]


def wire_arrays(num_steps: int, num_points: int) -> list[dict[str, np.ndarray]]:
    """Per timestep the arrays a `result` message decodes to (seeded)."""
    rng = np.random.default_rng(0)
    steps = []
    for _ in range(num_steps):
        steps.append({
            "means": rng.normal(size=(num_points, 3)).astype(np.float32),
            "quats": rng.normal(size=(num_points, 4)).astype(np.float32),
            "log_scales": rng.uniform(-4.0, -2.0, (num_points, 3)).astype(np.float32),
            "opacity_logits": rng.normal(size=num_points).astype(np.float32),
            "sh0": rng.normal(size=(num_points, 3)).astype(np.float32),
        })
    return steps


def resident_mib() -> float:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return float("nan")
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def bench_scene(bpy):
    """An empty file with a camera 8 units from the origin looking at it: the splats face
    the active camera and are dilated for its pixel size, so every Gaussian is in front."""
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    camera = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    camera.location, camera.rotation_euler = (0.0, -8.0, 0.0), (1.5707963, 0.0, 0.0)
    scene.collection.objects.link(camera)
    scene.camera = camera
    return scene


def time_import(bpy, pointcloud, steps) -> float:
    scene = bench_scene(bpy)
    start = time.perf_counter()
    pointcloud.build_asset_from_arrays(scene, "Bench", steps, list(range(1, len(steps) + 1)))
    scene.frame_set(1)
    bpy.context.evaluated_depsgraph_get()
    return time.perf_counter() - start


def time_frames(bpy, scene, frames: list[int]) -> float:
    times = []
    for frame in frames:
        start = time.perf_counter()
        scene.frame_set(frame)
        bpy.context.evaluated_depsgraph_get()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def time_renders(bpy, scene, engine: str, frames: list[int]) -> float:
    scene.render.engine = engine
    scene.render.resolution_x = scene.render.resolution_y = 32
    if engine == "CYCLES":
        scene.cycles.device, scene.cycles.samples = "CPU", 1
    else:
        scene.eevee.taa_render_samples = 1
    times = []
    for frame in frames:
        scene.frame_set(frame)
        start = time.perf_counter()
        bpy.ops.render.render()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(num_steps: int, num_points: int, repeats: int, engines: tuple[str, ...] = ()) -> dict:
    os.environ.setdefault("BLENDER_USER_RESOURCES", str(ROOT / ".cache" / "blender"))
    import bpy

    sys.path.insert(0, str(ROOT))
    from blender_addon import pointcloud

    steps = wire_arrays(num_steps, num_points)
    imports = [time_import(bpy, pointcloud, steps) for _ in range(repeats)]
    scene = bench_scene(bpy)
    before = resident_mib()
    root = pointcloud.build_asset_from_arrays(scene, "Bench", steps,
                                              list(range(1, num_steps + 1)),
                                              pointcloud.PointCloudConfig(viewport_display="POINTS"))
    scene.frame_set(1)
    bpy.context.evaluated_depsgraph_get()
    rss = resident_mib() - before
    frame_ms = time_frames(bpy, scene, list(range(2, num_steps + 1)))
    played = resident_mib() - before
    replay_ms = time_frames(bpy, scene, list(range(1, num_steps + 1)))
    config = pointcloud.read_settings(root)
    config.viewport_display = "SPLATS"
    pointcloud.apply_settings(root, config)
    splat_ms = time_frames(bpy, scene, list(range(2, min(num_steps, 6) + 1)))
    render_s, render_rss = {}, {}
    for k, engine in enumerate(engines):
        before_render = resident_mib()
        frames = [(2 * k + i) % num_steps + 1 for i in range(2)]
        render_s[engine] = time_renders(bpy, scene, engine, frames)
        render_rss[engine] = resident_mib() - before_render
    return {"timesteps": num_steps, "gaussians": num_points, "repeats": repeats,
            "import_s": statistics.median(imports), "import_s_all": imports,
            "frame_ms": frame_ms, "replay_frame_ms": replay_ms, "splat_frame_ms": splat_ms,
            "import_rss_mib": rss, "played_rss_mib": played,
            "render_s": render_s, "render_rss_mib": render_rss,
            "raw_mib": num_steps * num_points * 56 / 2**20,
            "blender": bpy.app.version_string}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="build.py bench blender", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timesteps", type=int, default=16)
    parser.add_argument("--gaussians", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines", default="CYCLES,BLENDER_EEVEE",
                        help="engines whose per-frame render preparation is timed ('' for none)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    if args.timesteps < 1 or args.gaussians < 1 or args.repeats < 1:
        parser.error("--timesteps, --gaussians and --repeats must be positive")
    engines = tuple(e for e in args.engines.split(",") if e)
    result = run(args.timesteps, args.gaussians, args.repeats, engines)
    runs = ", ".join(f"{t:.3f}" for t in result["import_s_all"])
    print(f"import {result['import_s']:.3f} s (runs {runs}); frame change "
          f"{result['frame_ms']:.1f} ms (points; {result['replay_frame_ms']:.1f} ms replayed), "
          f"{result['splat_frame_ms']:.0f} ms (splats); +{result['import_rss_mib']:.0f} MiB "
          f"resident after import, +{result['played_rss_mib']:.0f} MiB after one pass, for "
          f"{result['raw_mib']:.0f} MiB of Gaussians")
    for engine, seconds in result["render_s"].items():
        print(f"{engine}: {seconds:.2f} s per new frame at 32x32, 1 sample (preparation); "
              f"+{result['render_rss_mib'][engine]:.0f} MiB resident")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0
