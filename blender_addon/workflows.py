"""What the Generate and Reconstruct buttons send, and how a job's Gaussians come back in.

A `generate` job carries the rig (c2w [V, T, 4, 4], intrinsics [V, T, 6]) and the first row
of the grid: a fixed-view video `video` [T, H, W, 3] uint8 (or
`params.video_path` for a movie clip the backend reads), optionally a freeze-time column
`freeze` [V, H, W, 3] uint8. A `reconstruct` job carries the rig and renders of every view
`images` [V, T, H, W, 3] uint8. Any job kind whose results are `gaussians` (fields index,
of, frame = timestep index) is imported the same way: timestep t lands on the scene frame
of the rig's timestep t."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import bpy
import numpy as np

from . import inputs, pointcloud, rig
from .jobs import JobRecord, JobRunner
from .vendor.gaussians import Gaussians


@dataclass
class JobRequest:
    """Everything a job submission needs, built from the scene."""

    kind: str
    params: dict[str, Any]
    arrays: dict[str, np.ndarray]
    frames: list[int]  # scene frame of each timestep
    name: str = "4D Result"
    context: dict[str, Any] = field(default_factory=dict)


def frame_range(scene: bpy.types.Scene, settings) -> tuple[int, int, int]:
    if settings.use_scene_range:
        return scene.frame_start, scene.frame_end, max(1, scene.frame_step)
    return settings.frame_start, settings.frame_end, settings.frame_step


def rig_cameras(context: bpy.types.Context, settings) -> list[bpy.types.Object]:
    if settings.rig_source == "COLLECTION":
        if settings.rig_collection is None:
            raise ValueError("choose the collection that holds the rig's cameras")
        cameras = rig.collection_cameras(settings.rig_collection)
    else:
        cameras = rig.sorted_cameras(context.selected_objects)
    if not cameras:
        raise ValueError("no cameras: select the rig's cameras or choose a rig collection")
    return cameras


def scene_rig(context: bpy.types.Context) -> tuple[list[bpy.types.Object], rig.Rig]:
    scene, settings = context.scene, context.scene.fourreal
    cameras = rig_cameras(context, settings)
    return cameras, rig.extract_rig(scene, cameras, *frame_range(scene, settings))


def scene_fps(scene: bpy.types.Scene) -> float:
    return scene.render.fps / scene.render.fps_base


def fit_params(settings) -> dict[str, Any]:
    """The fitting stage's parameters, shared by Generate and Reconstruct."""
    return {"fit": settings.fit_preset, "fit_seconds": float(settings.fit_seconds),
            "fit_init": settings.fit_init}


def generate_request(context: bpy.types.Context) -> JobRequest:
    scene, settings = context.scene, context.scene.fourreal
    cameras, extracted = scene_rig(context)
    params = {"fps": scene_fps(scene), "seed": settings.seed, "steps": settings.steps,
              "guidance": settings.guidance, **fit_params(settings)}
    arrays = extracted.to_arrays()
    if settings.input_source == "CLIP":
        params["video_path"] = inputs.movie_clip_path(settings.movie_clip)
    elif settings.input_source == "IMAGES":
        files = inputs.image_files(settings.image_folder)
        if len(files) < extracted.num_timesteps:
            raise ValueError(f"{len(files)} images for {extracted.num_timesteps} timesteps")
        arrays["video"] = inputs.read_images(files[:extracted.num_timesteps])
    else:
        arrays["video"] = inputs.render_rig(scene, cameras[:1], extracted.frames,
                                            settings.render_folder or None)[0]
    if settings.freeze_folder:
        files = inputs.image_files(settings.freeze_folder)
        if len(files) != extracted.num_views:
            raise ValueError(f"{len(files)} freeze-time images for {extracted.num_views} views")
        arrays["freeze"] = inputs.read_images(files)
    return JobRequest("generate", params, arrays, extracted.frames, f"{scene.name} 4D")


def reconstruct_request(context: bpy.types.Context) -> JobRequest:
    scene, settings = context.scene, context.scene.fourreal
    cameras, extracted = scene_rig(context)
    arrays = extracted.to_arrays()
    arrays["images"] = inputs.render_rig(scene, cameras, extracted.frames,
                                         settings.render_folder or None)
    params = {"seed": settings.seed, **fit_params(settings)}
    return JobRequest("reconstruct", params, arrays, extracted.frames,
                      f"{scene.name} Reconstruction")


def display_config(settings) -> pointcloud.PointCloudConfig:
    """Import defaults from the scene's add-on settings (the proxy, its extent and the
    dilation keep their defaults and are edited on the asset's 'Settings' node)."""
    return pointcloud.PointCloudConfig(
        viewport_display=settings.viewport_display, render_display=settings.render_display,
        viewport_ratio=settings.viewport_ratio)


def scene_frames(result_frames: Sequence[int], timestep_frames: Sequence[int]) -> list[int]:
    """Scene frame of each result: the rig's frame for timestep `frame`, or frames counted
    on from the rig's last frame for timesteps beyond it."""
    frames = list(timestep_frames) or [1]
    step = frames[1] - frames[0] if len(frames) > 1 else 1
    return [frames[f] if 0 <= f < len(frames) else frames[0] + f * step
            for f in result_frames]


def import_results(scene: bpy.types.Scene, record: JobRecord, name: str,
                   config: pointcloud.PointCloudConfig | None = None
                   ) -> bpy.types.Object | None:
    """Import a finished job's `gaussians` results as an asset; None if it sent none.
    Results that all say `identities: true` (the fitting stage's persistent Gaussians) are
    imported as one moving point set when their arrays agree (same count, shared colour,
    opacity and scales); otherwise, and for results without identities, one object per
    timestep. Results fitted in the antialiased rasterize mode are drawn with its opacity
    compensation."""
    steps, result_frames = record.gaussian_steps()
    if not steps:
        return None
    frames = scene_frames(result_frames, record.context.get("frames", []))
    results = record.ordered_results("gaussians")
    flagged = all(bool(r.get("identities")) for r in results)
    if any(r.get("rasterize_mode") == "antialiased" for r in results):  # drawn as fitted
        config = replace(config or pointcloud.PointCloudConfig(), antialiased=True)
    gaussians = [Gaussians.from_arrays(dict(a)) for a in steps]
    persistent = flagged and len(gaussians) > 1 and pointcloud.persistent.mismatch(
        gaussians) is None
    root = pointcloud.build_asset(scene, name, gaussians, frames, config,
                                  persistent_gaussians=persistent)
    root["fourreal_job"] = record.id
    record.context["asset"] = root.name
    return root


def finish_import(record: JobRecord, scene_name: str, asset_name: str,
                  config: pointcloud.PointCloudConfig | None = None) -> bpy.types.Object | None:
    """What a finished job does (from the polling timer): import its Gaussians into the
    scene, drop the received messages (the asset holds the data now) and push an undo step,
    so Ctrl+Z removes the import and not the user's edit before it."""
    target = bpy.data.scenes.get(scene_name)
    if record.state != "done" or target is None:
        return None
    root = import_results(target, record, asset_name, config)
    if root is not None:
        record.context["imported"] = len(record.results)
        record.results.clear()
        if bpy.ops.ed.undo_push.poll():
            bpy.ops.ed.undo_push(message=f"Import {root.name}")
    return root


def submit_and_import(runner: JobRunner, scene: bpy.types.Scene, request: JobRequest,
                      config: pointcloud.PointCloudConfig | None = None) -> JobRecord:
    """Submit a request; when it is done its Gaussians are imported into `scene`."""
    scene_name, asset_name = scene.name, request.name

    def on_finish(record: JobRecord) -> None:
        finish_import(record, scene_name, asset_name, config)

    context = {**request.context, "frames": request.frames, "scene": scene_name}
    return runner.submit(request.kind, request.params, request.arrays, context, on_finish)
