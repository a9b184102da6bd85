"""Job kind `generate`: the input video (row 0) [+ freeze-time column] + rig -> the
generated grid and Gaussians per timestep.

Arrays: the rig (c2w [V, T, 4, 4], intrinsics [V, T, 6]) + the input video `video`
[T, H, W, 3] uint8 (what camera 0 sees over time) or `params.video_path` (a movie file the
backend reads) + optional `freeze` [V, H, W, 3] uint8 (every view at the first timestep).
Results: progress per denoising step, one `grid` result (the generated frames, uint8
[V, T, h, w, 3] at the model's size), then one `gaussians` result per timestep (fields
index, of, frame = timestep). Parameters: `backend.job_params.JOB_PARAMS["generate"]`.
Frames of any size are cropped to the models' aspect ratio (the largest centred box) and
resized to their size, the intrinsics cropped and scaled with them; the fitting stage sees
the input frames whole, at their own resolution. The Gaussians come back in the rig's own
world units. The job folder keeps grid.npy, the PNG frames, grid.mp4 and the PLY sequence
under gaussians/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from backend import protocol
from backend.kinds.base import JobKind, check_array_names
from backend.kinds.common import (
    MAX_INPUT_PIXELS,
    RIG_ARRAYS,
    check_frame_size,
    grid_frames,
    grid_rig,
    pipeline_models,
    progress_reporter,
    run_fit,
    send_gaussians,
)
from backend.worker import JobCancelled, JobContext


def validate_generate(msg: protocol.Message, params: dict[str, Any]) -> dict[str, Any]:
    check_array_names(msg, RIG_ARRAYS | {"video", "freeze"}, "generate")
    rig = grid_rig(msg)
    V, T = rig["c2w"].shape[:2]
    inputs: dict[str, Any] = {**rig, "params": params, "video": None, "video_path": None,
                              "freeze": None}
    if "video" in msg.arrays:
        inputs["video"] = grid_frames(msg, "video", (T,), "one frame per timestep")
        check_frame_size(inputs["video"], rig["intrinsics"][0], "video")
    elif params["video_path"] is not None:
        inputs["video_path"] = allowed_input_path(params["video_path"])
    else:
        raise protocol.ProtocolError("bad_input", "generate needs the input video: array "
                                     "'video' [T, H, W, 3] uint8 or params.video_path", "video")
    if "freeze" in msg.arrays:
        inputs["freeze"] = grid_frames(msg, "freeze", (V,), "one frame per view")
        check_frame_size(inputs["freeze"], rig["intrinsics"][:, 0], "freeze")
    return inputs


# The folder params.video_path may read from (`serve --input-folder`); None: paths from the
# wire are refused, so no client reads the server's files.
_INPUT_FOLDER: Path | None = None


def set_input_folder(folder: str | Path | None) -> None:
    """Allow params.video_path inside `folder` only (None: refuse every path)."""
    global _INPUT_FOLDER
    _INPUT_FOLDER = None if folder is None else Path(folder).resolve(strict=True)


def allowed_input_path(path: str) -> str:
    """`path` (relative to the input folder, or absolute) resolved, symbolic links included,
    if it lies inside the input folder and is a file. Anything outside is refused before the
    file system is asked about it, so the reply tells nothing about the server's files."""
    field = "params.video_path"
    if _INPUT_FOLDER is None:
        raise protocol.ProtocolError("bad_input", "params.video_path is not accepted by this "
                                     "backend (it was started without --input-folder); send "
                                     "the frames as the 'video' array", field)
    try:
        resolved = (_INPUT_FOLDER / path).resolve()
    except (OSError, RuntimeError, ValueError):
        resolved = None
    if resolved is None or not resolved.is_relative_to(_INPUT_FOLDER):
        raise protocol.ProtocolError("bad_input", "params.video_path must name a file inside "
                                     "the backend's input folder", field)
    if not resolved.is_file():
        raise protocol.ProtocolError("bad_input", f"params.video_path: no file {path!r} in the "
                                     "backend's input folder", field)
    return str(resolved)


def read_video(path: str, num_frames: int) -> np.ndarray:  # -> [T, H, W, 3] uint8
    """The first `num_frames` frames of a movie file; ProtocolError when it is unreadable or
    too short."""
    import imageio.v3 as iio

    frames = []
    try:
        for frame in iio.imiter(path):
            frame = np.asarray(frame)
            if frame.ndim != 3 or frame.shape[-1] < 3 or frame.dtype != np.uint8:
                raise ValueError(f"frame {len(frames)} is {frame.dtype} {list(frame.shape)}, "
                                 "not 8-bit RGB")
            if frames and frame.shape != frames[0].shape[:2] + frame.shape[2:]:
                raise ValueError(f"frame {len(frames)} is {list(frame.shape)}, frame 0 "
                                 f"{list(frames[0].shape)}")
            if frame.shape[0] * frame.shape[1] > MAX_INPUT_PIXELS:
                raise ValueError(f"frames of {frame.shape[1]}x{frame.shape[0]} exceed "
                                 f"{MAX_INPUT_PIXELS} pixels")
            frames.append(frame[..., :3])
            if len(frames) == num_frames:
                break
    except Exception as exc:  # imageio raises many kinds for unreadable files
        raise protocol.ProtocolError("bad_input", f"params.video_path: cannot read {path!r} "
                                     f"({type(exc).__name__}: {exc})",
                                     "params.video_path") from None
    if len(frames) < num_frames:
        raise protocol.ProtocolError("bad_input", f"params.video_path: {path!r} has "
                                     f"{len(frames)} frames, the rig has {num_frames} timesteps",
                                     "params.video_path")
    return np.stack(frames)


def run_generate(ctx: JobContext, inputs: dict[str, Any]) -> None:
    from backend import pipeline
    from backend.diffusion.sampler import SamplingCancelled

    params = inputs["params"]
    settings = pipeline.GenerateSettings.from_params(params)
    c2w, intr = inputs["c2w"], inputs["intrinsics"]
    V, T = c2w.shape[:2]
    video = inputs["video"]
    if video is None:
        ctx.progress("input", 0, 1, "reading the input video")
        video = read_video(inputs["video_path"], T)
        _check_video_aspect(video, intr)
    fitting = settings.fit != "off"
    models = pipeline_models(ctx, params, need_diffusion=True,
                             need_recon=not fitting or settings.fit_prior)
    frame = inputs["frame"]
    c2w_n = frame.to_normalised(c2w)
    try:
        grid, _, grid_intr = pipeline.generate_grid(models["diffusion"], video, c2w_n, intr,
                                         inputs["freeze"], settings, progress_reporter(ctx),
                                         ctx.job.cancel_event.is_set)
    except pipeline.PipelineError as exc:
        raise protocol.ProtocolError("bad_input", str(exc)) from None
    except SamplingCancelled:
        raise JobCancelled(ctx.job.id) from None
    grid_u8 = pipeline.tensor_to_uint8(grid)  # [V, T, h, w, 3]
    pipeline.write_grid(ctx.out_dir / "grid", grid_u8, fps=params["fps"])
    ctx.result({"grid": grid_u8}, content="grid", index=0, of=1)
    if fitting:
        cells = _generate_cells(video, inputs["freeze"], grid, grid_intr, settings)
        prior = None
        if settings.fit_prior:
            prior = pipeline.reconstruct_grid(models["reconstruction"], grid, c2w_n, grid_intr,
                                              settings, progress_reporter(ctx))
        seq, mode = run_fit(ctx, cells, c2w_n, intr, settings, prior)
    else:
        mode = "classic"  # the feed-forward Gaussians
        seq = pipeline.reconstruct_grid(models["reconstruction"], grid, c2w_n, grid_intr,
                                        settings, progress_reporter(ctx))
    ctx.check_cancelled()
    send_gaussians(ctx, seq, frame, identities=fitting, rasterize_mode=mode)
    ctx.progress("done", 1, 1, f"{V} views x {T} timesteps")


def _generate_cells(video: np.ndarray, freeze: np.ndarray | None, grid, grid_intr,
                    settings) -> list:
    """The fit's cells: the input video (row 0) and the freeze-time column at their own
    resolution with weight 1, the generated cells at the model's (its crop, intrinsics
    `grid_intr`) with `generated_weight`."""
    from backend.pipeline import FitCells

    V, T = grid.shape[:2]
    row = np.zeros((V, T, *video.shape[1:]), np.uint8)
    row[0] = video
    weights = np.zeros((V, T), np.float32)
    weights[0] = 1.0
    cells = [FitCells(row, weights)]
    given = weights > 0
    if freeze is not None:
        column = np.zeros((V, T, *freeze.shape[1:]), np.uint8)
        column[1:, 0] = freeze[1:]
        column_weights = np.zeros((V, T), np.float32)
        column_weights[1:, 0] = 1.0
        cells.append(FitCells(column, column_weights))
        given |= column_weights > 0
    if settings.generated_weight > 0:
        cells.append(FitCells(grid, np.where(given, 0.0, settings.generated_weight),
                              grid_intr))
    return cells


def _check_video_aspect(video: np.ndarray, intr: np.ndarray) -> None:
    try:
        check_frame_size(video, intr[0], "video_path")
    except protocol.ProtocolError as exc:
        raise protocol.ProtocolError("bad_input", exc.message, "params.video_path") from None


KIND = JobKind("generate", "input video (row 0) [+ freeze-time column] + rig -> generated grid "
               "and Gaussians per timestep", validate_generate, run_generate)
