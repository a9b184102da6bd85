"""The job kinds that run the trained models: `generate` and `reconstruct`.

generate:    rig (c2w [V, T, 4, 4], intrinsics [V, T, 6], optional near_far [V, T, 2]) + the
             input video `video` [T, H, W, 3] uint8 (row 0: what camera 0 sees over time) or
             `params.video_path` (a movie file the backend reads) + optional `freeze`
             [V, H, W, 3] uint8 (column 0: every view at the first timestep)
             -> progress per denoising step -> one `grid` result (the generated frames,
             uint8 [V, T, h, w, 3] at the model's size) -> one `gaussians` result per
             timestep (fields index, of, frame = timestep).
reconstruct: rig + `images` [V, T, H, W, 3] uint8 -> one `gaussians` result per timestep.

params (all optional): seed, steps (sampler steps, default 1), guidance (1 = off), shift,
refine_steps (0 = no per-scene refinement), refine_lr, min_opacity, diffusion_model and
recon_model (names from `hello`'s model list; default the first shipped model of each kind),
fps (of the preview video). Frames of any size are resized to the models' size, the
intrinsics scaled with them; the Gaussians come back in the rig's own world units. The job
folder keeps grid.npy, the PNG frames, grid.mp4 and the PLY sequence under gaussians/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from backend import protocol
from backend.jobs import JobCancelled, JobContext, register

MAX_INPUT_PIXELS = 4096 * 4096
MAX_VIEWS, MAX_TIMESTEPS, MAX_CELLS = 64, 512, 4096  # grid size limits of one job
INT_PARAMS = {"seed": (0, 2**63 - 1), "steps": (1, 1000), "refine_steps": (0, 100000)}
FLOAT_PARAMS = {"guidance": (0.0, 100.0), "shift": (1e-3, 1e3), "refine_lr": (1e-6, 10.0),
                "min_opacity": (0.0, 0.99), "fps": (0.1, 1000.0)}
NAME_PARAMS = ("diffusion_model", "recon_model")


def _rig(msg: protocol.Message) -> dict[str, np.ndarray]:
    c2w = protocol.require_array(msg, "c2w", ndim=4, trailing=(4, 4), kinds="f")
    intr = protocol.require_array(msg, "intrinsics", ndim=3, trailing=(6,), kinds="f")
    near_far = msg.arrays.get("near_far")
    protocol.validate_rig(c2w, intr, near_far)
    V, T = c2w.shape[:2]
    if V < 2 or T < 1:
        raise protocol.ProtocolError("bad_input", f"the rig needs at least 2 views, got "
                                     f"{V} views x {T} timesteps", "c2w")
    if V > MAX_VIEWS or T > MAX_TIMESTEPS or V * T > MAX_CELLS:
        raise protocol.ProtocolError(
            "too_large", f"a grid of {V} views x {T} timesteps exceeds the limits of "
            f"{MAX_VIEWS} views, {MAX_TIMESTEPS} timesteps and {MAX_CELLS} frames", "c2w")
    from backend.pipeline import PipelineError, rig_frame

    c2w = np.array(c2w, np.float64)
    try:
        frame = rig_frame(c2w)
    except PipelineError as exc:
        raise protocol.ProtocolError("bad_camera", str(exc), "c2w") from None
    return {"c2w": c2w, "intrinsics": np.array(intr, np.float64), "frame": frame}


def _frames(msg: protocol.Message, name: str, lead: tuple[int, ...], what: str) -> np.ndarray:
    """uint8 frames [*lead, H, W, 3] whose size matches the intrinsics' image size."""
    arr = protocol.require_array(msg, name, ndim=len(lead) + 3, trailing=(3,), kinds="u")
    if arr.dtype != np.uint8:
        raise protocol.ProtocolError("bad_array", f"{name} must be uint8, got {arr.dtype}", name)
    if min(arr.shape[-3:-1]) < 1:
        raise protocol.ProtocolError("bad_input", f"{name}: empty frames of shape "
                                     f"{list(arr.shape)}", name)
    if tuple(arr.shape[:len(lead)]) != lead:
        raise protocol.ProtocolError("bad_input", f"{name} must hold {what} {list(lead)}, got "
                                     f"shape {list(arr.shape)}", name)
    if arr.shape[-3] * arr.shape[-2] > MAX_INPUT_PIXELS:
        raise protocol.ProtocolError("too_large", f"{name}: frames of {arr.shape[-2]}x"
                                     f"{arr.shape[-3]} exceed {MAX_INPUT_PIXELS} pixels", name)
    return arr


def _check_size(frames: np.ndarray, intr: np.ndarray, name: str) -> None:
    """Frames must have the intrinsics' aspect ratio (any resolution is resampled)."""
    height, width = frames.shape[-3:-1]
    sizes = {(float(w), float(h)) for w, h in intr.reshape(-1, 6)[:, 4:6]}
    for w, h in sizes:
        if abs(width / height - w / h) > 0.02 * (w / h):
            raise protocol.ProtocolError(
                "bad_input", f"{name}: frames are {width}x{height} but the cameras' images are "
                f"{int(w)}x{int(h)} (aspect ratios differ)", name)


def _params(msg: protocol.Message) -> dict[str, Any]:
    params = protocol.require(msg, "params", dict, {})
    out: dict[str, Any] = {}
    for key, (low, high) in INT_PARAMS.items():
        if key in params:
            value = params[key]
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise protocol.ProtocolError("bad_field", f"params.{key} must be an integer in "
                                             f"[{low}, {high}], got {value!r}", "params")
            out[key] = value
    for key, (low, high) in FLOAT_PARAMS.items():
        if key in params:
            value = params[key]
            if (not isinstance(value, int | float) or isinstance(value, bool)
                    or not low <= value <= high):
                raise protocol.ProtocolError("bad_field", f"params.{key} must be a number in "
                                             f"[{low}, {high}], got {value!r}", "params")
            out[key] = float(value)
    for key in NAME_PARAMS:
        if key in params:
            if not isinstance(params[key], str) or not params[key]:
                raise protocol.ProtocolError("bad_field", f"params.{key} must be a model name",
                                             "params")
            out[key] = params[key]
    return out


def _settings(params: dict[str, Any]):
    from backend.pipeline import GenerateSettings

    names = ("steps", "guidance", "shift", "seed", "refine_steps", "refine_lr", "min_opacity")
    return GenerateSettings(**{k: params[k] for k in names if k in params})


def _models(ctx: JobContext, params: dict[str, Any], need_diffusion: bool):
    """The pipeline's models, loaded once and kept in the model store."""
    from backend import pipeline

    try:
        names = {"recon": pipeline.find_model(pipeline.RECON_CLASS, params.get("recon_model"))}
        if need_diffusion:
            names["diffusion"] = pipeline.find_model(pipeline.DIFFUSION_CLASS,
                                                     params.get("diffusion_model"))
    except pipeline.PipelineError as exc:
        raise protocol.ProtocolError("bad_input", str(exc), "params") from None
    models = {}
    for role, (name, folder) in names.items():
        cls = pipeline.RECON_CLASS if role == "recon" else pipeline.DIFFUSION_CLASS
        ctx.progress("load", 0, 1, f"loading {name}")
        models[role] = ctx.models.get(f"{cls}:{folder}:{ctx.device}",
                                      lambda c=cls, f=folder: pipeline.load_model(c, f,
                                                                                   ctx.device))
    return models


def _progress(ctx: JobContext):
    def report(stage: str, step: int, of: int, message: str) -> None:
        ctx.progress(stage, step, of, message)
    return report


def _send_gaussians(ctx: JobContext, seq, frame) -> None:
    from backend.gaussians import GaussianSequence, write_ply_sequence

    world = [frame.to_world(g) for g in seq]
    for t, g in enumerate(world):
        ctx.result(g.to_arrays(), content="gaussians", index=t, of=len(world), frame=t)
    write_ply_sequence(ctx.out_dir / "gaussians", GaussianSequence(world))


# ----------------------------------------------------------------------------- generate

def validate_generate(msg: protocol.Message) -> dict[str, Any]:
    rig = _rig(msg)
    V, T = rig["c2w"].shape[:2]
    params = _params(msg)
    raw = protocol.require(msg, "params", dict, {})
    inputs: dict[str, Any] = {**rig, "params": params, "video": None, "video_path": None,
                              "freeze": None}
    if "video" in msg.arrays:
        inputs["video"] = _frames(msg, "video", (T,), "one frame per timestep")
        _check_size(inputs["video"], rig["intrinsics"][0], "video")
    elif "video_path" in raw:
        path = raw["video_path"]
        if not isinstance(path, str) or not Path(path).is_file():
            raise protocol.ProtocolError("bad_input", f"params.video_path: no such file "
                                         f"{path!r} on the backend's machine", "params")
        inputs["video_path"] = path
    else:
        raise protocol.ProtocolError("bad_input", "generate needs the input video: array "
                                     "'video' [T, H, W, 3] uint8 or params.video_path", "video")
    if "freeze" in msg.arrays:
        inputs["freeze"] = _frames(msg, "freeze", (V,), "one frame per view")
        _check_size(inputs["freeze"], rig["intrinsics"][:, 0], "freeze")
    return inputs


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
                                     f"({type(exc).__name__}: {exc})", "params") from None
    if len(frames) < num_frames:
        raise protocol.ProtocolError("bad_input", f"params.video_path: {path!r} has "
                                     f"{len(frames)} frames, the rig has {num_frames} timesteps",
                                     "params")
    return np.stack(frames)


@register("generate", "input video (row 0) [+ freeze-time column] + rig -> generated grid "
          "and Gaussians per timestep", validate_generate)
def run_generate(ctx: JobContext, inputs: dict[str, Any]) -> None:
    from backend import pipeline
    from backend.diffusion.sampler import SamplingCancelled

    params, settings = inputs["params"], _settings(inputs["params"])
    c2w, intr = inputs["c2w"], inputs["intrinsics"]
    V, T = c2w.shape[:2]
    video = inputs["video"]
    if video is None:
        ctx.progress("input", 0, 1, "reading the input video")
        video = read_video(inputs["video_path"], T)
        _check_video_aspect(video, intr)
    models = _models(ctx, params, need_diffusion=True)
    frame = inputs["frame"]
    c2w_n = frame.to_normalised(c2w)
    try:
        grid, _ = pipeline.generate_grid(models["diffusion"], video, c2w_n, intr,
                                         inputs["freeze"], settings, _progress(ctx),
                                         ctx.job.cancel_event.is_set)
    except pipeline.PipelineError as exc:
        raise protocol.ProtocolError("bad_input", str(exc)) from None
    except SamplingCancelled:
        raise JobCancelled(ctx.job.id) from None
    grid_u8 = pipeline.tensor_to_uint8(grid)  # [V, T, h, w, 3]
    pipeline.write_grid(ctx.out_dir / "grid", grid_u8, fps=params.get("fps", 8.0))
    ctx.result({"grid": grid_u8}, content="grid", index=0, of=1)
    seq = pipeline.reconstruct_grid(models["recon"], grid, c2w_n, intr, settings,
                                    _progress(ctx), ctx.job.cancel_event.is_set)
    ctx.check_cancelled()
    _send_gaussians(ctx, seq, frame)
    ctx.progress("done", 1, 1, f"{V} views x {T} timesteps")


def _check_video_aspect(video: np.ndarray, intr: np.ndarray) -> None:
    try:
        _check_size(video, intr[0], "video_path")
    except protocol.ProtocolError as exc:
        raise protocol.ProtocolError("bad_input", exc.message, "params") from None


# -------------------------------------------------------------------------- reconstruct

def validate_reconstruct(msg: protocol.Message) -> dict[str, Any]:
    rig = _rig(msg)
    V, T = rig["c2w"].shape[:2]
    images = _frames(msg, "images", (V, T), "one frame per view and timestep")
    _check_size(images, rig["intrinsics"], "images")
    return {**rig, "images": images, "params": _params(msg)}


@register("reconstruct", "a full grid of images [V, T, H, W, 3] + rig -> Gaussians per "
          "timestep", validate_reconstruct)
def run_reconstruct(ctx: JobContext, inputs: dict[str, Any]) -> None:
    from backend import pipeline

    params, settings = inputs["params"], _settings(inputs["params"])
    models = _models(ctx, params, need_diffusion=False)
    frame = inputs["frame"]
    c2w_n = frame.to_normalised(inputs["c2w"])
    size = tuple(models["recon"].config.image_size)
    grid = pipeline.frames_to_tensor(inputs["images"], size)  # [V, T, 3, h, w]
    seq = pipeline.reconstruct_grid(models["recon"], grid, c2w_n, inputs["intrinsics"],
                                    settings, _progress(ctx), ctx.job.cancel_event.is_set)
    ctx.check_cancelled()
    _send_gaussians(ctx, seq, frame)
    V, T = inputs["c2w"].shape[:2]
    ctx.progress("done", 1, 1, f"{V} views x {T} timesteps")
