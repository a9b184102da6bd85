"""What the job kinds share: Gaussians from wire arrays, the rig and frames of a grid job,
the pipeline's models from the registry, and sending Gaussians back in the rig's world."""

from __future__ import annotations

from typing import Any

import numpy as np

from backend import protocol
from backend.gaussians import Gaussians
from backend.worker import JobContext

GAUSSIAN_FIELDS = ("means", "quats", "log_scales", "opacity_logits", "sh0", "sh_rest")
MAX_INPUT_PIXELS = 4096 * 4096
MAX_VIEWS, MAX_TIMESTEPS, MAX_CELLS = 64, 512, 4096  # grid size limits of one job
RIG_ARRAYS = {protocol.C2W, protocol.INTRINSICS}


def gaussians_from_message(arrays: dict[str, np.ndarray], where: str = "") -> Gaussians:
    """Build a Gaussians container from wire arrays; ProtocolError naming what is wrong."""
    present = {k: v for k, v in arrays.items() if k in GAUSSIAN_FIELDS}
    try:
        return Gaussians.from_arrays(present)
    except (ValueError, KeyError, TypeError) as exc:
        raise protocol.ProtocolError("bad_input", f"{where}Gaussians: {exc}", "arrays") from None


def grid_rig(msg: protocol.Message) -> dict[str, np.ndarray]:
    """The rig of a grid job (c2w [V, T, 4, 4], intrinsics [V, T, 6]) checked, with its
    normalisation to the models' scale (`frame`)."""
    c2w = protocol.require_array(msg, protocol.C2W, ndim=4, trailing=(4, 4), kinds="f")
    intr = protocol.require_array(msg, protocol.INTRINSICS, ndim=3, trailing=(6,), kinds="f")
    protocol.validate_rig(c2w, intr)
    V, T = c2w.shape[:2]
    if V < 2 or T < 1:
        raise protocol.ProtocolError("bad_input", f"the rig needs at least 2 views, got "
                                     f"{V} views x {T} timesteps", protocol.C2W)
    if V > MAX_VIEWS or T > MAX_TIMESTEPS or V * T > MAX_CELLS:
        raise protocol.ProtocolError(
            "too_large", f"a grid of {V} views x {T} timesteps exceeds the limits of "
            f"{MAX_VIEWS} views, {MAX_TIMESTEPS} timesteps and {MAX_CELLS} frames", protocol.C2W)
    from backend.pipeline import PipelineError, rig_frame

    c2w = np.array(c2w, np.float64)
    try:
        frame = rig_frame(c2w)
    except PipelineError as exc:
        raise protocol.ProtocolError("bad_camera", str(exc), protocol.C2W) from None
    return {"c2w": c2w, "intrinsics": np.array(intr, np.float64), "frame": frame}


def grid_frames(msg: protocol.Message, name: str, lead: tuple[int, ...], what: str) -> np.ndarray:
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


def check_frame_size(frames: np.ndarray, intr: np.ndarray, name: str) -> None:
    """Frames must have the intrinsics' aspect ratio (any resolution is resampled)."""
    height, width = frames.shape[-3:-1]
    sizes = {(float(w), float(h)) for w, h in intr.reshape(-1, 6)[:, 4:6]}
    for w, h in sizes:
        if abs(width / height - w / h) > 0.02 * (w / h):
            raise protocol.ProtocolError(
                "bad_input", f"{name}: frames are {width}x{height} but the cameras' images are "
                f"{int(w)}x{int(h)} (aspect ratios differ)", name)


def pipeline_models(ctx: JobContext, params: dict[str, Any], need_diffusion: bool,
                    need_recon: bool = True) -> dict:
    """The pipeline's models by role ("diffusion", "reconstruction"), chosen by
    params.diffusion_model / params.recon_model (default: the first found), loaded through
    the model registry once and kept in the model store."""
    from backend import models as registry

    wanted = {"reconstruction": params.get("recon_model")} if need_recon else {}
    if need_diffusion:
        wanted["diffusion"] = params.get("diffusion_model")
    loaded = {}
    for role, name in wanted.items():
        field = "params.recon_model" if role == "reconstruction" else "params.diffusion_model"
        try:
            name, folder = registry.find_model(role, name)
        except registry.ModelNotFound as exc:
            raise protocol.ProtocolError("bad_input", str(exc), field) from None
        ctx.progress("load", 0, 1, f"loading {name}")
        loaded[role] = ctx.models.get(
            f"{folder}:{ctx.device}",
            lambda f=folder, r=role: registry.load_model(f, ctx.device, role=r))
    return loaded


def progress_reporter(ctx: JobContext):
    def report(stage: str, step: int, of: int, message: str) -> None:
        ctx.progress(stage, step, of, message)
    return report


def send_gaussians(ctx: JobContext, seq, frame, identities: bool = False,
                   rasterize_mode: str = "classic") -> None:
    """Send the Gaussians per timestep in the rig's world, one result each, and write them
    as a PLY sequence. `identities`: Gaussian i is the same Gaussian at every timestep (the
    fitting stage's persistent Gaussians: same count, shared colour, opacity and scales), so
    the add-on imports them as one point set that moves; each result carries the flag, and
    the rasterize mode the Gaussians are meant to be drawn in (the add-on's materials follow
    it)."""
    from backend.gaussians import GaussianSequence, write_ply_sequence

    world = [frame.to_world(g) for g in seq]
    for t, g in enumerate(world):
        ctx.result(g.to_arrays(), content="gaussians", index=t, of=len(world), frame=t,
                   identities=bool(identities), rasterize_mode=rasterize_mode)
    write_ply_sequence(ctx.out_dir / "gaussians", GaussianSequence(world))




def run_fit(ctx: JobContext, cells: list, c2w: np.ndarray, intrinsics: np.ndarray, settings,
            prior=None):
    """The fitting stage on the job's device, with progress and cancel (`prior`: the
    feed-forward Gaussians per timestep to start from where they agree with the frames);
    its report goes to fit.json in the job folder. Returns the Gaussians and the rasterize
    mode they were fitted in."""
    import json

    from backend import pipeline
    from backend.fit import FitCancelled
    from backend.worker import JobCancelled

    try:
        seq, report = pipeline.fit_cells(cells, c2w, intrinsics, settings, ctx.device,
                                         progress_reporter(ctx),
                                         ctx.job.cancel_event.is_set, prior=prior)
    except FitCancelled:
        raise JobCancelled(ctx.job.id) from None
    (ctx.out_dir / "fit.json").write_text(json.dumps(report, indent=2) + "\n")
    return seq, report["rasterize_mode"]
