"""The product's main job, headless in real Blender: `python3 build.py demo`.

1. builds an animated scene (moving, turning coloured objects inside a textured backdrop;
   `demo_scene`),
2. adds a camera rig with the add-on's own operator,
3. renders every rig view with Blender (ground truth; view 0 is the input video and, in
   the row-and-column setting, the views' first frames are the freeze-time column),
4. starts the backend as a child process through the add-on and presses Generate (the
   add-on's operator renders camera 1 as the input video and sends the job), then
   Reconstruct (the operator renders every rig view over the same frames), each ending with
   the fitting stage; the add-on imports each result as an asset,
5. exports both assets as PLY sequences with the add-on's exporter,
6. renders each imported asset alone with Cycles from a camera that is not in the rig
   (over the fit's learned background, pixel-centre sampling) and saves the .blend,
7. scores the generated grid, our rasterizer's renders of both assets' Gaussians at the rig
   views and the novel view against Blender's own renders (next to the trivial copy
   baseline), and Cycles' render of each asset against our rasterizer's at the novel view,
   and writes everything to `out/demo/`.

Run it as `python -m backend.tools.demo [--views 4 --frames 8 ...]` with the repository's .venv
(it needs bpy); `build.py demo` does the set-up first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
os.environ.setdefault("BLENDER_USER_RESOURCES", str(ROOT / ".cache" / "blender"))

import bpy  # noqa: E402  (BLENDER_USER_RESOURCES must be set first)
import numpy as np  # noqa: E402

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from backend.tools.demo_scene import (  # noqa: E402
    add_novel_camera,
    add_rig,
    build_scene,
    hide_scene_content,
)

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


def render_camera(scene: bpy.types.Scene, camera: bpy.types.Object, frames: list[int],
                  folder: Path) -> np.ndarray:  # [T, H, W, 3] uint8
    from blender_addon import inputs

    return inputs.render_rig(scene, [camera], frames, folder)[0]


def world_color(scene: bpy.types.Scene, rgb=None) -> tuple:
    """The world's background colour (its Background node's, as Blender 5 worlds use nodes);
    set it to `rgb` when given. Returns the colour it had."""
    world = scene.world
    nodes = [n for n in world.node_tree.nodes if n.type == "BACKGROUND"] \
        if world.node_tree is not None else []
    old = tuple(nodes[0].inputs["Color"].default_value)[:3] if nodes else tuple(world.color)
    if rgb is not None:
        world.color = tuple(float(c) for c in rgb)
        for node in nodes:
            node.inputs["Color"].default_value = (*world.color, 1.0)
    return old


@dataclass
class JobAsset:
    """A finished job's imported asset and what the figures need of it."""

    kind: str  # generate | reconstruct
    root: str  # the asset's root object
    job_dir: Path
    fit: dict  # the job folder's fit.json ({} when the fit was off)
    steps: list  # Gaussians per timestep, read back from the imported meshes

    @property
    def background(self) -> np.ndarray:  # [3] the fit's learned background (black if none)
        return np.asarray(self.fit.get("background", (0.0, 0.0, 0.0)), np.float32)

    def layer(self) -> bpy.types.LayerCollection:
        collection = bpy.data.objects[self.root].users_collection[0]
        return bpy.context.view_layer.layer_collection.children[collection.name]


def run_job(operator, kind: str, timeout: float, log_tail) -> JobAsset:
    """Press Generate or Reconstruct, pump until the job is done and imported."""
    from blender_addon import jobs, pointcloud, runtime

    if operator() != {"FINISHED"}:
        raise RuntimeError(f"the {kind} operator failed: "
                           f"{bpy.context.window_manager.fourreal_status.job_error}")
    record = runtime.runner().latest()
    pump(lambda: record.state in jobs.FINAL_STATES, timeout)
    if record.state != "done" or "asset" not in record.context:
        raise RuntimeError(f"{kind} ended {record.state}: {record.error_text or ''} "
                           f"{record.message}\n{log_tail()}")
    from backend.gaussians import Gaussians

    root = bpy.data.objects[record.context["asset"]]
    steps = [Gaussians.from_arrays(g.to_arrays())  # either layout: one set that moves or
             for g in pointcloud.asset_sequence(root).frames]  # one object per timestep
    job_dir = Path(record.cache_dir)
    fit = json.loads((job_dir / "fit.json").read_text()) if (job_dir / "fit.json").is_file() \
        else {}
    return JobAsset(kind, root.name, job_dir, fit, steps)


def render_asset_alone(scene: bpy.types.Scene, camera: bpy.types.Object, frames: list[int],
                       folder: Path, asset: JobAsset, assets: list[JobAsset]) -> np.ndarray:
    """Cycles render of one imported asset alone, as the rasterizer renders it: the scene's
    objects and the other assets hidden, the world set to the fit's learned background (Raw,
    set on import, shows it as stored), a 0.01 px box filter (pixel centres). [T, H, W, 3]"""
    cycles = scene.cycles
    saved = (cycles.pixel_filter_type, cycles.filter_width, world_color(scene, asset.background))
    for other in assets:
        other.layer().exclude = other is not asset
    hide_scene_content(True)
    cycles.pixel_filter_type, cycles.filter_width = "BOX", 0.01
    try:
        return render_camera(scene, camera, frames, folder)
    finally:
        hide_scene_content(False)
        cycles.pixel_filter_type, cycles.filter_width = saved[:2]
        world_color(scene, saved[2])
        for other in assets:
            other.layer().exclude = False


def score(prediction, truth, cells) -> dict[str, float]:
    """Mean PSNR/SSIM over the chosen cells; prediction, truth [V, T, 3, h, w] tensors."""
    from backend.train.evaluate import scored_cells

    psnr, ssim = scored_cells(prediction[None], truth[None], cells)
    return {"psnr": round(float(psnr.mean()), 3), "ssim": round(float(ssim.mean()), 4)}


def render_gaussians_at(steps, c2w: np.ndarray, intr: np.ndarray, size: tuple[int, int],
                        background: np.ndarray | None = None, mode: str = "classic"):
    """Our rasterizer's renders of Gaussians per timestep at cameras c2w [V, T, 4, 4],
    intrinsics [V, T, 6] scaled to `size`, over `background` [3] (default black), in
    rasterize mode `mode`: [V, T, 3, h, w] in [0, 1]."""
    import torch

    from backend.cameras import scale_intrinsics
    from backend.render import rasterize_gaussians

    h, w = size
    intr = scale_intrinsics(np.asarray(intr, np.float64), w, h).astype(np.float32)
    bg = torch.zeros(3) if background is None else torch.as_tensor(background).float()
    V, T = c2w.shape[:2]
    out = torch.zeros(V, T, 3, h, w)
    with torch.no_grad():
        for t, g in enumerate(steps):
            rendered = rasterize_gaussians(g, c2w[:, t].astype(np.float32), intr[:, t],
                                           device="cpu", background=bg, rasterize_mode=mode)
            out[:, t] = rendered.rgb.permute(0, 3, 1, 2).float().clamp(0, 1)
    return out


def asset_figures(asset: JobAsset, cameras, novel, truth, truth_novel, cycles_novel,
                  generated_cells=None) -> tuple[dict[str, dict], object]:
    """The asset's Gaussians through our rasterizer (over the fit's background) at the rig
    views and at the novel view against Blender's renders of the scene, and the novel view
    against Cycles' render of the imported asset; all at the render resolution. `cameras`,
    `novel`: extracted rigs; truth [V, T, 3, H, W], truth_novel [1, T, 3, H, W] tensors,
    cycles_novel [T, H, W, 3] uint8. Returns the figures and the rig-view renders."""
    import torch

    from backend import pipeline

    size = tuple(truth.shape[-2:])
    mode = asset.fit.get("rasterize_mode", "classic")  # feed-forward Gaussians: classic
    rig_views = render_gaussians_at(asset.steps, cameras.c2w, cameras.intrinsics, size,
                                    asset.background, mode)
    at_novel = render_gaussians_at(asset.steps, novel.c2w, novel.intrinsics, size,
                                   asset.background, mode)
    quantised = (at_novel * 255).round() / 255  # as the 8-bit Cycles render is
    every_frame = torch.ones(at_novel.shape[:2], dtype=torch.bool)
    figures = {
        "rig_views": score(rig_views, truth, torch.ones(truth.shape[:2], dtype=torch.bool)),
        "novel_view": score(at_novel, truth_novel, every_frame),
        "cycles_vs_rasterizer": score(pipeline.frames_to_tensor(cycles_novel[None], size),
                                      quantised, every_frame),
    }
    if generated_cells is not None:
        figures["generated_cells"] = score(rig_views, truth, generated_cells)
    return figures, rig_views


def write_comparison(folder: Path, rows: list, given: np.ndarray, cell: int) -> Path:
    """One image of V x T grids of frames [V, T, 3, h, w] in [0, 1], one above the other
    (each cell resized to `cell` px; given cells framed in white)."""
    import imageio.v3 as iio

    from backend.pipeline import resize_frames, tensor_to_uint8

    folder.mkdir(parents=True, exist_ok=True)
    panels = []
    for grid in rows:
        frames = tensor_to_uint8(resize_frames(grid, (cell, cell)))  # [V, T, h, w, 3]
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


def write_render_strip(path: Path, rows: list[np.ndarray]) -> Path:
    """Rows of frames [T, H, W, 3] uint8 (Blender's render of the scene, then Cycles'
    renders of the imported assets), one column per frame."""
    import imageio.v3 as iio

    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [np.concatenate(list(frames), axis=1) for frames in rows]
    iio.imwrite(path, np.concatenate(lines, axis=0))
    return path


# --------------------------------------------------------------------------------- run

def prepare_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / "report.json").is_file() and not (out / DEMO_MARKER).is_file():
            raise ValueError(f"--out {out} is not empty and holds no earlier demo: choose "
                             "an empty or new folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text(
        "written by python -m backend.tools.demo; replaced on each run\n")


def start_backend(out: Path, config: DemoConfig):
    """The add-on starts the backend as a child process; returns it once it is ready."""
    from blender_addon import backend_process, runtime

    run_ = runtime.runner()
    local = backend_process.LocalBackend(backend_process.LocalBackendConfig(
        cache_dir=str(out / "backend-cache"), device=config.device))
    run_.start_local(local)
    runtime.ensure_polling()
    pump(lambda: run_.backend_state in ("ready", "dead", "unreachable"), 300)
    if run_.backend_state != "ready":
        raise RuntimeError(f"backend {run_.backend_state}: {run_.backend_error}\n"
                           f"{local.log_tail()}")
    return local, run_.backend_info.get("device", "?")


VIEW_SETTINGS = ("view_transform", "look", "exposure", "gamma")


def run_both_jobs(scene, out: Path, config: DemoConfig, log_tail, lap) -> list[JobAsset]:
    """Generate, then Reconstruct on the same rig and frames. Each operator renders its
    inputs from the scene as the user left it: Generate's import switches the view transform
    to Raw and adds an asset, so both are undone for Reconstruct's renders."""
    settings = scene.fourreal
    view = scene.view_settings
    saved_view = tuple(getattr(view, k) for k in VIEW_SETTINGS)
    settings.input_source = "RENDER"
    settings.render_folder = str(out / "input")
    settings.steps, settings.seed = config.steps, config.seed
    settings.fit_preset, settings.fit_seconds = config.fit, config.fit_seconds
    generated = run_job(bpy.ops.fourreal.generate, "generate", config.timeout_s, log_tail)
    lap("generate_and_import")
    generated.layer().exclude = True
    for key, value in zip(VIEW_SETTINGS, saved_view):
        setattr(view, key, value)
    settings.render_folder = str(out / "reconstruct-input")
    reconstructed = run_job(bpy.ops.fourreal.reconstruct, "reconstruct", config.timeout_s,
                            log_tail)
    generated.layer().exclude = False
    lap("reconstruct_and_import")
    return [generated, reconstructed]


def export_and_render(scene, out: Path, assets: list[JobAsset], novel, frames: list[int],
                      truth_novel: np.ndarray) -> list[np.ndarray]:
    """PLY sequences of both assets, Cycles renders of each at the novel view, render.mp4,
    docs/render.png and the .blend (the Reconstruct asset excluded from its view layer)."""
    from backend import pipeline

    for asset, folder in zip(assets, ("gaussians", "gaussians-reconstruct")):
        bpy.context.view_layer.objects.active = bpy.data.objects[asset.root]
        if bpy.ops.fourreal.export_ply_sequence(filepath=str(out / folder)) != {"FINISHED"}:
            raise RuntimeError(f"the PLY export operator failed on the {asset.kind} asset")
    renders = [render_asset_alone(scene, novel, frames, out / "render" / a.kind, a, assets)
               for a in assets]
    pipeline.write_mp4(out / "render.mp4", np.concatenate([truth_novel, *renders], axis=2),
                       fps=scene.render.fps)
    write_render_strip(out / "docs" / "render.png", [truth_novel, *renders])
    shutil.copy(assets[0].job_dir / "grid" / "grid.mp4", out / "grid.mp4")
    assets[1].layer().exclude = True
    bpy.ops.wm.save_as_mainfile(filepath=str(out / "scene.blend"))
    return renders


def run(config: DemoConfig) -> dict:
    import blender_addon
    from blender_addon import inputs, runtime

    if config.setting not in SETTINGS:
        raise ValueError(f"--setting must be one of {SETTINGS}, got {config.setting!r}")
    out = Path(config.out)
    prepare_out(out)
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
        lap("scene")
        truth = inputs.render_rig(scene, cameras, frames, out / "blender" / "rig")
        truth_novel = render_camera(scene, novel, frames, out / "blender" / "novel")
        if config.setting == "row_and_column":
            write_png_folder(out / "blender" / "freeze", truth[:, 0])
            scene.fourreal.freeze_folder = str(out / "blender" / "freeze")
        lap("render_truth")
        local, device = start_backend(out, config)
        lap("backend_start")
        assets = run_both_jobs(scene, out, config, local.log_tail, lap)
        renders = export_and_render(scene, out, assets, novel, frames, truth_novel)
        lap("export_render_save")
        report = quality(config, scene, cameras, novel, truth, truth_novel, assets, renders)
        lap("quality")
        report.update({
            "device": device,
            "timings_s": {**timings, "total": round(time.perf_counter() - started, 2)},
            "outputs": {name: str(out / name) for name in
                        ("grid.mp4", "gaussians", "gaussians-reconstruct", "scene.blend",
                         "render.mp4")},
            "job_dirs": {a.kind: str(a.job_dir) for a in assets},
        })
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        return report
    finally:
        runtime.shutdown()
        blender_addon.unregister()


def quality(config: DemoConfig, scene, cameras, novel, truth: np.ndarray,
            truth_novel: np.ndarray, assets: list[JobAsset], renders: list[np.ndarray]) -> dict:
    """Every figure of the report, and docs/comparison.png."""
    import torch

    from backend import pipeline
    from blender_addon import rig

    grid = np.load(assets[0].job_dir / "grid" / "grid.npy")  # [V, T, h, w, 3] uint8
    size = grid.shape[2:4]
    truth_small = pipeline.frames_to_tensor(truth, size)  # [V, T, 3, h, w]
    generated = pipeline.frames_to_tensor(grid, size)
    given = np.zeros(grid.shape[:2], dtype=bool)
    given[0] = True
    if config.setting == "row_and_column":
        given[:, 0] = True
    cells = torch.from_numpy(~given)
    copy = truth_small[:, :1].expand_as(truth_small) if config.setting == "row_and_column" \
        else truth_small[:1].expand_as(truth_small)
    report = {
        "setting": config.setting, "views": config.views, "timesteps": config.frames,
        "model_size": list(size), "input_resolution": config.resolution,
        "sampler_steps": config.steps, "seed": config.seed, "fit": config.fit,
        "fit_seconds": config.fit_seconds, "cycles_samples": config.samples,
    }
    for name, figures in (("generated", score(generated, truth_small, cells)),
                          ("copy_baseline", score(copy, truth_small, cells))):
        report[f"psnr_{name}"], report[f"ssim_{name}"] = figures["psnr"], figures["ssim"]
    rig_cams = rig.extract_rig(scene, cameras, 1, config.frames, 1)
    novel_cam = rig.extract_rig(scene, [novel], 1, config.frames, 1)
    full = (config.resolution, config.resolution)
    truth_full = pipeline.frames_to_tensor(truth, full)
    truth_novel_full = pipeline.frames_to_tensor(truth_novel[None], full)
    rows = [truth_full, pipeline.resize_frames(generated, full)]
    for asset, cycles_novel in zip(assets, renders):
        figures, rig_views = asset_figures(
            asset, rig_cams, novel_cam, truth_full, truth_novel_full, cycles_novel,
            cells if asset.kind == "generate" else None)
        rows.append(rig_views)
        for name, values in figures.items():
            report[f"psnr_{asset.kind}_{name}"] = values["psnr"]
            report[f"ssim_{asset.kind}_{name}"] = values["ssim"]
        report[f"fit_{asset.kind}"] = asset.fit
        report[f"fit_s_{asset.kind}"] = round(sum(asset.fit.get("seconds", {}).values()), 2)
        report[f"gaussians_per_timestep_{asset.kind}"] = [len(g) for g in asset.steps]
    write_comparison(Path(config.out) / "docs", rows, given, min(64, config.resolution))
    return report


def summary(report: dict) -> str:
    t = report["timings_s"]

    def line(label: str, key: str) -> str:
        return (f"  {label:<44} PSNR {report['psnr_' + key]:6.2f} dB  "
                f"SSIM {report['ssim_' + key]:.3f}")

    res = report["input_resolution"]
    lines = [
        f"4Real demo: {report['views']} views x {report['timesteps']} timesteps, Blender "
        f"renders at {res}x{res}, model at {report['model_size'][1]}x"
        f"{report['model_size'][0]} ({report['setting']}, {report['sampler_steps']} sampler "
        f"steps, fit {report['fit']}, {report['device']})",
        line("generated views vs Blender (model size)", "generated"),
        line("copy baseline vs Blender (model size)", "copy_baseline"),
    ]
    for kind, label in (("generate", "Generate"), ("reconstruct", "Reconstruct")):
        lines += [
            f"  {label}: {sum(report['gaussians_per_timestep_' + kind])} Gaussians over "
            f"{report['timesteps']} timesteps, fit {report['fit_s_' + kind]:.1f} s",
            line("  Gaussians at the rig views vs Blender", f"{kind}_rig_views"),
            line("  Gaussians at a novel view vs Blender", f"{kind}_novel_view"),
            line("  novel view: Cycles vs our rasterizer", f"{kind}_cycles_vs_rasterizer"),
        ]
    lines += [
        f"  total {t['total']:.0f} s (" + ", ".join(
            f"{k} {v:.0f} s" for k, v in t.items() if k != "total") + ")",
        f"  outputs in {Path(report['outputs']['grid.mp4']).parent}: grid.mp4, gaussians/, "
        "gaussians-reconstruct/, scene.blend, render.mp4, report.json, docs/comparison.png, "
        "docs/render.png",
    ]
    return "\n".join(lines)


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
                        default=defaults.fit, help="the fitting stage's preset (both jobs)")
    parser.add_argument("--fit-seconds", type=float, default=defaults.fit_seconds,
                        help="time budget of each job's fit (0: the preset's steps)")
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
