"""Job kind `reconstruct`: a full grid of images + rig -> Gaussians per timestep.

Arrays: the rig (c2w [V, T, 4, 4], intrinsics [V, T, 6]) + `images` [V, T, H, W, 3] uint8.
Results: one `gaussians` result per timestep. Parameters:
`backend.job_params.JOB_PARAMS["reconstruct"]`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from backend import protocol
from backend.kinds.base import JobKind, check_array_names
from backend.kinds.common import (
    RIG_ARRAYS,
    check_frame_size,
    grid_frames,
    grid_rig,
    pipeline_models,
    progress_reporter,
    run_fit,
    send_gaussians,
)
from backend.worker import JobContext


def validate_reconstruct(msg: protocol.Message, params: dict[str, Any]) -> dict[str, Any]:
    check_array_names(msg, RIG_ARRAYS | {"images"}, "reconstruct")
    rig = grid_rig(msg)
    V, T = rig["c2w"].shape[:2]
    images = grid_frames(msg, "images", (V, T), "one frame per view and timestep")
    check_frame_size(images, rig["intrinsics"], "images")
    return {**rig, "images": images, "params": params}


def run_reconstruct(ctx: JobContext, inputs: dict[str, Any]) -> None:
    from backend import pipeline

    params = inputs["params"]
    settings = pipeline.GenerateSettings.from_params(params)
    frame = inputs["frame"]
    c2w_n = frame.to_normalised(inputs["c2w"])
    V, T = inputs["c2w"].shape[:2]
    fitting = settings.fit != "off"
    seq = None
    if not fitting or settings.fit_prior:  # the feed-forward Gaussians
        models = pipeline_models(ctx, params, need_diffusion=False)
        size = tuple(models["reconstruction"].config.image_size)
        grid, grid_intr = pipeline.model_frames(inputs["images"], inputs["intrinsics"], size)
        seq = pipeline.reconstruct_grid(models["reconstruction"], grid, c2w_n, grid_intr,
                                        settings, progress_reporter(ctx))
    mode = "classic"  # how the feed-forward Gaussians are drawn
    if fitting:  # every given cell, at the user's resolution
        cells = [pipeline.FitCells(inputs["images"], np.ones((V, T), np.float32))]
        seq, mode = run_fit(ctx, cells, c2w_n, inputs["intrinsics"], settings, prior=seq)
    ctx.check_cancelled()
    send_gaussians(ctx, seq, frame, identities=fitting, rasterize_mode=mode)
    ctx.progress("done", 1, 1, f"{V} views x {T} timesteps")


KIND = JobKind("reconstruct", "a full grid of images [V, T, H, W, 3] + rig -> Gaussians per "
               "timestep", validate_reconstruct, run_reconstruct)
