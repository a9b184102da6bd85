"""The product's main job, headless in real Blender: `python3 build.py demo`.

1. builds an animated scene (moving, turning coloured objects inside a textured backdrop),
2. adds a camera rig with the add-on's own operator,
3. renders every rig view with Blender (ground truth; view 0 is the input video and, in
   the row-and-column setting, the views' first frames are the freeze-time column),
4. starts the backend as a child process through the add-on and presses Generate (the
   add-on's operator renders camera 1 as the input video and sends the job),
5. imports the result (the add-on does it when the job is done), exports it as a PLY
   sequence with the add-on's exporter and saves the .blend,
6. renders the imported Gaussians with Cycles from a camera that is not in the rig, next
   to Blender's render of the real scene,
7. scores the generated grid and renders of the imported Gaussians against Blender's own
   renders, next to the trivial copy baseline, and writes everything to `out/demo/`.

Run it as `python -m backend.tools.demo [--views 4 --frames 8 ...]` with the repository's .venv
(it needs bpy); `build.py demo` does the set-up first.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("BLENDER_USER_RESOURCES", str(ROOT / ".cache" / "blender"))

import bpy  # noqa: E402  (BLENDER_USER_RESOURCES must be set first)
import numpy as np  # noqa: E402
from mathutils import Vector  # noqa: E402

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SETTINGS = ("row_and_column", "row_only")
DEMO_MARKER = ".fourreal-demo"  # marks a folder the demo may clear


@dataclass
class DemoConfig:
    out: Path = ROOT / "out" / "demo"
    views: int = 4
    frames: int = 8
    resolution: int = 128
    samples: int = 16  # Cycles samples per pixel
    steps: int = 1  # diffusion sampler steps (the shipped model is best in one)
    seed: int = 0
    setting: str = "row_and_column"
    fit: str = "fast"  # the fitting stage's preset ("off": feed-forward reconstruction only)
    fit_seconds: float = 0.0
    device: str = "auto"
    timeout_s: float = 1800.0


# --------------------------------------------------------------------------------- scene

def emission_material(name: str, colors: tuple, texture: str = "checker",
                      scale: float = 4.0) -> bpy.types.Material:
    """An emission material mixing two colours with a procedural texture (colours render as
    stored, like the unlit Gaussians the models were trained on)."""
    material = bpy.data.materials.new(name)
    if bpy.app.version < (5, 0, 0):
        material.use_nodes = True
    tree = material.node_tree
    tree.nodes.clear()
    output = tree.nodes.new("ShaderNodeOutputMaterial")
    emission = tree.nodes.new("ShaderNodeEmission")
    mix = tree.nodes.new("ShaderNodeMix")
    mix.data_type = "RGBA"
    mix.inputs["A"].default_value = (*colors[0], 1.0)
    mix.inputs["B"].default_value = (*colors[1], 1.0)
    if texture == "checker":
        tex = tree.nodes.new("ShaderNodeTexChecker")
        tex.inputs["Scale"].default_value = scale
        factor = tex.outputs["Fac"]
    elif texture == "wave":
        tex = tree.nodes.new("ShaderNodeTexWave")
        tex.inputs["Scale"].default_value = scale
        factor = tex.outputs["Fac"]
    else:
        tex = tree.nodes.new("ShaderNodeTexNoise")
        tex.inputs["Scale"].default_value = scale
        factor = tex.outputs["Fac"]
    tree.links.new(factor, mix.inputs["Factor"])
    tree.links.new(mix.outputs["Result"], emission.inputs["Color"])
    tree.links.new(emission.outputs[0], output.inputs["Surface"])
    return material


def _animate(obj: bpy.types.Object, frame_start: int, frame_end: int, start: dict,
             end: dict) -> None:
    """Linear keys on location/rotation between two poses."""
    for frame, pose in ((frame_start, start), (frame_end, end)):
        obj.location = pose["location"]
        obj.rotation_euler = pose.get("rotation", (0.0, 0.0, 0.0))
        obj.keyframe_insert("location", frame=frame)
        obj.keyframe_insert("rotation_euler", frame=frame)
    action = obj.animation_data.action if obj.animation_data else None
    curves = getattr(action, "fcurves", None) if action is not None else None
    if curves is None and action is not None:  # Blender 5 layered actions
        curves = [c for layer in action.layers for strip in layer.strips
                  for bag in strip.channelbags for c in bag.fcurves]
    for curve in curves or []:
        for key in curve.keyframe_points:
            key.interpolation = "LINEAR"


def build_scene(config: DemoConfig) -> bpy.types.Scene:
    """An empty file with three animated objects in a textured dome, Cycles on the CPU."""
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    scene.name = "4Real Demo"
    scene.frame_start, scene.frame_end = 1, config.frames
    scene.render.fps = 8
    scene.render.resolution_x = scene.render.resolution_y = config.resolution
    scene.render.resolution_percentage = 100
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = config.samples
    scene.cycles.use_denoising = False
    scene.cycles.max_bounces = 0  # emission only: camera rays see the colours directly
    scene.view_settings.view_transform = "Standard"
    world = bpy.data.worlds.new("Demo World")
    world.color = (0.05, 0.05, 0.05)
    scene.world = world
    last = config.frames

    def add(op, name: str, material: bpy.types.Material, **kwargs) -> bpy.types.Object:
        op(**kwargs)
        obj = bpy.context.active_object
        obj.name = name
        obj.data.materials.append(material)
        return obj

    sphere = add(bpy.ops.mesh.primitive_uv_sphere_add, "Ball",
                 emission_material("Ball", ((0.9, 0.2, 0.15), (1.0, 0.85, 0.2)), "wave", 3.0),
                 radius=0.32, segments=32, ring_count=16)
    _animate(sphere, 1, last, {"location": (-0.55, -0.3, 0.35)},
             {"location": (0.45, 0.1, -0.1), "rotation": (0.0, 0.0, 1.5)})
    cube = add(bpy.ops.mesh.primitive_cube_add, "Box",
               emission_material("Box", ((0.15, 0.35, 0.95), (0.95, 0.95, 0.9)), "checker", 3.0),
               size=0.5)
    _animate(cube, 1, last, {"location": (0.35, 0.45, -0.15)},
             {"location": (0.1, -0.35, 0.15), "rotation": (0.4, 0.0, math.pi / 2)})
    torus = add(bpy.ops.mesh.primitive_torus_add, "Ring",
                emission_material("Ring", ((0.1, 0.75, 0.3), (0.05, 0.3, 0.15)), "noise", 6.0),
                major_radius=0.3, minor_radius=0.1)
    _animate(torus, 1, last, {"location": (0.0, 0.0, 0.55), "rotation": (0.3, 0.0, 0.0)},
             {"location": (-0.2, 0.2, 0.45), "rotation": (1.6, 0.6, 0.0)})
    dome = add(bpy.ops.mesh.primitive_uv_sphere_add, "Backdrop",
               emission_material("Backdrop", ((0.55, 0.5, 0.42), (0.25, 0.3, 0.38)), "noise",
                                 2.5),
               radius=8.0, segments=48, ring_count=24)
    dome["fourreal_demo_backdrop"] = True
    scene.frame_set(1)
    return scene


def add_rig(config: DemoConfig) -> list[bpy.types.Object]:
    """The add-on's Add Camera Rig operator: an arc of cameras looking at the origin."""
    bpy.context.scene.cursor.location = (0.0, 0.0, 0.0)
    arc = 30.0 * (config.views - 1) if config.views > 1 else 1.0
    result = bpy.ops.fourreal.add_rig(num_cameras=config.views, radius=4.2, height=1.2,
                                      focal_length=40.0, arc_degrees=min(arc, 360.0))
    if result != {"FINISHED"}:
        raise RuntimeError(f"fourreal.add_rig returned {result}")
    from blender_addon import rig

    return rig.collection_cameras(bpy.context.scene.fourreal.rig_collection)


def add_novel_camera(scene: bpy.types.Scene, cameras: list[bpy.types.Object]) -> bpy.types.Object:
    """A camera that is not in the rig: between the first two rig cameras, higher up."""
    a = cameras[0].matrix_world.translation
    b = cameras[min(1, len(cameras) - 1)].matrix_world.translation
    middle = (a + b) / 2
    direction = Vector((middle.x, middle.y, 0.0)).normalized()
    location = direction * 4.4 + Vector((0.0, 0.0, 2.0))
    data = bpy.data.cameras.new("Novel View")
    data.lens = 40.0
    cam = bpy.data.objects.new("Novel View", data)
    cam.location = location
    cam.rotation_mode = "QUATERNION"
    cam.rotation_quaternion = (-location).to_track_quat("-Z", "Y")
    scene.collection.objects.link(cam)
    return cam


# ------------------------------------------------------------------------------ helpers

def pump(until, timeout: float) -> None:
    """Drive the add-on's timer callback (no event loop runs headless) until `until()`."""
    from blender_addon import runtime

    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout:.0f} s")
        runtime.tick()
        time.sleep(0.05)


def write_png_folder(folder: Path, frames: np.ndarray) -> None:
    """uint8 frames [N, H, W, 3] as 000.png, 001.png, ... (the order the add-on reads)."""
    import imageio.v3 as iio

    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        iio.imwrite(folder / f"{i:03d}.png", frame)


def hide_scene_content(hidden: bool) -> None:
    """Hide (or show) the original objects in renders, leaving cameras and Gaussians."""
    for name in ("Ball", "Box", "Ring", "Backdrop"):
        bpy.data.objects[name].hide_render = hidden


def render_camera(scene: bpy.types.Scene, camera: bpy.types.Object, frames: list[int],
                  folder: Path) -> np.ndarray:  # [T, H, W, 3] uint8
    from blender_addon import inputs

    return inputs.render_rig(scene, [camera], frames, folder)[0]


def score(prediction, truth, cells) -> dict[str, float]:
    """Mean PSNR/SSIM over the chosen cells; prediction, truth [V, T, 3, h, w] tensors."""
    from backend.train.evaluate import scored_cells

    psnr, ssim = scored_cells(prediction[None], truth[None], cells)
    return {"psnr": round(float(psnr.mean()), 3), "ssim": round(float(ssim.mean()), 4)}


def render_gaussians_at(steps, c2w: np.ndarray, intr: np.ndarray, size: tuple[int, int]):
    """Our rasterizer's renders of Gaussians per timestep at cameras c2w [V, T, 4, 4],
    intrinsics [V, T, 6] scaled to `size`: [V, T, 3, h, w] in [0, 1]."""
    import torch

    from backend.cameras import scale_intrinsics
    from backend.render import rasterize_gaussians

    h, w = size
    intr = scale_intrinsics(np.asarray(intr, np.float64), w, h).astype(np.float32)
    V, T = c2w.shape[:2]
    out = torch.zeros(V, T, 3, h, w)
    with torch.no_grad():
        for t, g in enumerate(steps):
            rendered = rasterize_gaussians(g, c2w[:, t].astype(np.float32), intr[:, t],
                                           device="cpu",
                                           background=torch.zeros(3))
            out[:, t] = rendered.rgb.permute(0, 3, 1, 2).float().clamp(0, 1)
    return out


def write_comparison(folder: Path, truth, generated, rendered, given: np.ndarray) -> Path:
    """One image: rows of Blender's renders | the generated grid | renders of the imported
    Gaussians, each a V x T grid of frames (given cells framed in white)."""
    import imageio.v3 as iio

    from backend.pipeline import tensor_to_uint8

    folder.mkdir(parents=True, exist_ok=True)
    panels = []
    for grid in (truth, generated, rendered):
        frames = tensor_to_uint8(grid)  # [V, T, h, w, 3]
        V, T, h, w, _ = frames.shape
        padded = np.zeros((V, T, h + 2, w + 2, 3), np.uint8)
        padded[:, :, 1:-1, 1:-1] = frames
        padded[given, 0, :] = padded[given, -1, :] = 255
        padded[given, :, 0] = padded[given, :, -1] = 255
        panels.append(padded.transpose(0, 2, 1, 3, 4).reshape(V * (h + 2), T * (w + 2), 3))
        panels.append(np.zeros((4, T * (w + 2), 3), np.uint8))
    image = np.concatenate(panels[:-1], axis=0)
    scale = max(1, 256 // image.shape[1] + 1)
    path = folder / "comparison.png"
    iio.imwrite(path, image.repeat(scale, axis=0).repeat(scale, axis=1))
    return path


def write_render_strip(path: Path, truth: np.ndarray, rendered: np.ndarray) -> Path:
    """Blender's render of the scene (top row) and of the imported Gaussians (bottom row),
    one column per frame: [T, H, W, 3] each."""
    import imageio.v3 as iio

    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [np.concatenate(list(frames), axis=1) for frames in (truth, rendered)]
    iio.imwrite(path, np.concatenate(rows, axis=0))
    return path


# --------------------------------------------------------------------------------- run

def run(config: DemoConfig) -> dict:
    import blender_addon
    from backend import pipeline
    from backend.gaussians import Gaussians
    from blender_addon import backend_process, jobs, pointcloud, rig, runtime

    if config.setting not in SETTINGS:
        raise ValueError(f"--setting must be one of {SETTINGS}, got {config.setting!r}")
    out = Path(config.out)
    if out.exists() and any(out.iterdir()):
        if not (out / "report.json").is_file() and not (out / DEMO_MARKER).is_file():
            raise ValueError(f"--out {out} is not empty and holds no earlier demo: choose "
                             "an empty or new folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text(
        "written by python -m backend.tools.demo; replaced on each run\n")
    timings: dict[str, float] = {}
    started = clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 2)
        clock = now
        print(f"[demo] {name}: {timings[name]:.1f} s", flush=True)

    blender_addon.register()
    try:
        scene = build_scene(config)
        cameras = add_rig(config)
        novel = add_novel_camera(scene, cameras)
        frames = list(range(1, config.frames + 1))
        extracted = rig.extract_rig(scene, cameras, 1, config.frames, 1)
        lap("scene")

        from blender_addon import inputs

        truth = inputs.render_rig(scene, cameras, frames, out / "blender" / "rig")
        truth_novel = render_camera(scene, novel, frames, out / "blender" / "novel")
        settings = scene.fourreal
        if config.setting == "row_and_column":
            write_png_folder(out / "blender" / "freeze", truth[:, 0])
            settings.freeze_folder = str(out / "blender" / "freeze")
        lap("render_truth")

        run_ = runtime.runner()
        local = backend_process.LocalBackend(backend_process.LocalBackendConfig(
            cache_dir=str(out / "backend-cache"), device=config.device))
        run_.start_local(local)
        runtime.ensure_polling()
        pump(lambda: run_.backend_state in ("ready", "dead", "unreachable"), 300)
        if run_.backend_state != "ready":
            raise RuntimeError(f"backend {run_.backend_state}: {run_.backend_error}\n"
                               f"{local.log_tail()}")
        device = run_.backend_info.get("device", "?")
        lap("backend_start")

        settings.input_source = "RENDER"
        settings.render_folder = str(out / "input")
        settings.steps, settings.seed = config.steps, config.seed
        settings.fit_preset, settings.fit_seconds = config.fit, config.fit_seconds
        if bpy.ops.fourreal.generate() != {"FINISHED"}:
            raise RuntimeError("the Generate operator failed: "
                               f"{bpy.context.window_manager.fourreal_status.job_error}")
        record = run_.latest()
        pump(lambda: record.state in jobs.FINAL_STATES, config.timeout_s)
        if record.state != "done" or "asset" not in record.context:
            raise RuntimeError(f"generate ended {record.state}: {record.error_text or ''} "
                               f"{record.message}\n{local.log_tail()}")
        lap("generate_and_import")

        asset = bpy.data.objects[record.context["asset"]]
        bpy.context.view_layer.objects.active = asset
        gaussians_dir = out / "gaussians"
        if bpy.ops.fourreal.export_ply_sequence(filepath=str(gaussians_dir)) != {"FINISHED"}:
            raise RuntimeError("the PLY export operator failed")
        job_dir = Path(record.cache_dir)
        shutil.copy(job_dir / "grid" / "grid.mp4", out / "grid.mp4")
        grid = np.load(job_dir / "grid" / "grid.npy")  # [V, T, h, w, 3] uint8
        steps = [Gaussians.from_arrays(pointcloud.mesh_gaussians(o.data).to_arrays())
                 for o in pointcloud.timestep_objects(asset)]
        hide_scene_content(True)
        gaussian_render = render_camera(scene, novel, frames, out / "render")
        hide_scene_content(False)
        pipeline.write_mp4(out / "render.mp4",
                           np.concatenate([truth_novel, gaussian_render], axis=2),
                           fps=scene.render.fps)
        write_render_strip(out / "docs" / "render.png", truth_novel, gaussian_render)
        bpy.ops.wm.save_as_mainfile(filepath=str(out / "scene.blend"))
        lap("export_render_save")

        size = grid.shape[2:4]
        truth_small = pipeline.frames_to_tensor(truth, size)  # [V, T, 3, h, w]
        generated = pipeline.frames_to_tensor(grid, size)
        given = np.zeros(grid.shape[:2], dtype=bool)
        given[0] = True
        if config.setting == "row_and_column":
            given[:, 0] = True
        import torch

        cells = torch.from_numpy(~given)
        copy = truth_small[:, :1].expand_as(truth_small) if config.setting == "row_and_column" \
            else truth_small[:1].expand_as(truth_small)
        gen_score, copy_score = score(generated, truth_small, cells), score(copy, truth_small,
                                                                             cells)
        rendered = render_gaussians_at(steps, extracted.c2w, extracted.intrinsics, size)
        all_cells = torch.ones(grid.shape[:2], dtype=torch.bool)
        recon_score = score(rendered, truth_small, all_cells)
        recon_generated = score(rendered, truth_small, cells)
        novel_rig = rig.extract_rig(scene, [novel], 1, config.frames, 1)
        novel_truth = pipeline.frames_to_tensor(truth_novel[None], size)
        novel_rendered = render_gaussians_at(steps, novel_rig.c2w, novel_rig.intrinsics, size)
        novel_score = score(novel_rendered, novel_truth, torch.ones(1, config.frames,
                                                                    dtype=torch.bool))
        write_comparison(out / "docs", truth_small, generated, rendered, given)
        lap("quality")
        report = {
            "setting": config.setting, "views": config.views, "timesteps": config.frames,
            "model_size": list(size), "input_resolution": config.resolution,
            "sampler_steps": config.steps, "seed": config.seed, "device": device,
            "psnr_generated": gen_score["psnr"], "ssim_generated": gen_score["ssim"],
            "psnr_copy_baseline": copy_score["psnr"], "ssim_copy_baseline": copy_score["ssim"],
            "psnr_recon": recon_score["psnr"], "ssim_recon": recon_score["ssim"],
            "psnr_recon_generated_cells": recon_generated["psnr"],
            "ssim_recon_generated_cells": recon_generated["ssim"],
            "psnr_recon_novel_view": novel_score["psnr"],
            "ssim_recon_novel_view": novel_score["ssim"],
            "gaussians_per_timestep": [len(g) for g in steps],
            "timings_s": {**timings, "total": round(time.perf_counter() - started, 2)},
            "outputs": {name: str(out / name) for name in
                        ("grid.mp4", "gaussians", "scene.blend", "render.mp4")},
            "job_dir": str(job_dir),
        }
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        return report
    finally:
        runtime.shutdown()
        blender_addon.unregister()


def summary(report: dict) -> str:
    t = report["timings_s"]
    return "\n".join([
        f"4Real demo: {report['views']} views x {report['timesteps']} timesteps at "
        f"{report['model_size'][1]}x{report['model_size'][0]} ({report['setting']}, "
        f"{report['sampler_steps']} sampler steps, {report['device']})",
        f"  generated views vs Blender:  PSNR {report['psnr_generated']:.2f} dB  "
        f"SSIM {report['ssim_generated']:.3f}",
        f"  copy baseline vs Blender:    PSNR {report['psnr_copy_baseline']:.2f} dB  "
        f"SSIM {report['ssim_copy_baseline']:.3f}",
        f"  Gaussians at the rig views:  PSNR {report['psnr_recon']:.2f} dB  "
        f"SSIM {report['ssim_recon']:.3f}",
        f"  Gaussians at a novel view:   PSNR {report['psnr_recon_novel_view']:.2f} dB  "
        f"SSIM {report['ssim_recon_novel_view']:.3f}",
        f"  {sum(report['gaussians_per_timestep'])} Gaussians over {report['timesteps']} "
        f"timesteps; total {t['total']:.0f} s (" + ", ".join(
            f"{k} {v:.0f} s" for k, v in t.items() if k != "total") + ")",
        f"  outputs in {Path(report['outputs']['grid.mp4']).parent}: grid.mp4, gaussians/, "
        f"scene.blend, render.mp4, report.json, docs/comparison.png, docs/render.png",
    ])


def main(argv: list[str] | None = None) -> int:
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(prog="python -m backend.tools.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=defaults.out)
    for name in ("views", "frames", "resolution", "samples", "steps", "seed"):
        parser.add_argument("--" + name.replace("_", "-"), type=int,
                            default=getattr(defaults, name))
    parser.add_argument("--setting", choices=SETTINGS, default=defaults.setting)
    parser.add_argument("--fit", choices=("off", "fast", "default", "quality"),
                        default=defaults.fit, help="the fitting stage's preset")
    parser.add_argument("--fit-seconds", type=float, default=defaults.fit_seconds,
                        help="time budget of the fit (0: the preset's steps)")
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--timeout-s", type=float, default=defaults.timeout_s)
    args = parser.parse_args(argv)
    config = DemoConfig(**vars(args))
    try:
        report = run(config)
    except (RuntimeError, TimeoutError, ValueError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    print(summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
