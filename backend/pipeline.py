"""The product's main path: an input video and a camera rig -> a V x T grid -> Gaussians.

    video (row 0) [+ freeze-time column] + rig
      -> the largest centred crop of the model's aspect ratio, resized to the diffusion
         model's frame size (intrinsics cropped and scaled to match: pixels stay square)
      -> rig normalised to the scale the models were trained at
      -> diffusion sampling fills the grid (progress per step, cancellable)
      -> the grid resized to the reconstruction model's frame size
      -> feed-forward reconstruction: Gaussians per timestep
      -> the fitting stage: Gaussians optimised against the given frames at their resolution
         and the generated ones at the model's (started from plane-sweep stereo on the rig,
         with the feed-forward Gaussians where they agree with the frames if asked; with
         `fit: off` the feed-forward Gaussians are the result)
      -> Gaussians mapped back to the user's world (means and scales)

The shipped models saw scenes whose cameras stand `NOMINAL_CAMERA_DISTANCE` units from the
point they look at. A user's rig can be at any scale and anywhere, so it is moved and scaled
to that setting first (the point closest to every camera's optical axis goes to the origin)
and the Gaussians are mapped back afterwards; only distances change, never directions, so
the images and the frames the rig sees are untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from backend.cameras import scale_intrinsics
from backend.gaussians import Gaussians, GaussianSequence
from backend.job_params import JOB_PARAMS

FRAME_CHUNK = 16  # frames converted to float at once
NOMINAL_CAMERA_DISTANCE = 4.25  # centre of DataConfig.camera_distance's default range

Progress = Callable[[str, int, int, str], None]  # (stage, step, of, message)


class PipelineError(ValueError):
    """An input the pipeline cannot take; the message says which and why."""


# ------------------------------------------------------------------------------ frames

def frames_to_tensor(frames: np.ndarray, size: tuple[int, int]) -> Tensor:
    """uint8 (or float in [0, 1]) frames [..., H, W, 3] -> float32 [..., 3, h, w] in [0, 1],
    resampled with antialiasing when the size changes."""
    array = np.asarray(frames)
    if array.ndim < 3 or array.shape[-1] != 3 or min(array.shape[-3:-1]) < 1:
        raise PipelineError(f"frames must be [..., H, W, 3], got shape {list(array.shape)}")
    lead, (H, W) = array.shape[:-3], array.shape[-3:-1]
    flat = array.reshape(-1, H, W, 3)
    out = torch.empty(flat.shape[0], 3, *size)
    for start in range(0, flat.shape[0], FRAME_CHUNK):  # float copies of a few frames at a time
        x = torch.from_numpy(np.ascontiguousarray(flat[start:start + FRAME_CHUNK]))
        x = (x.float() / 255.0 if array.dtype == np.uint8 else x.float()).permute(0, 3, 1, 2)
        out[start:start + FRAME_CHUNK] = resize_frames(x, size)
    return out.reshape(*lead, 3, *size)


def resize_frames(frames: Tensor, size: tuple[int, int]) -> Tensor:
    """[..., 3, H, W] in [0, 1] -> [..., 3, h, w], antialiased bilinear (as is if equal)."""
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    flat = frames.reshape(-1, *frames.shape[-3:])
    out = F.interpolate(flat, size=tuple(size), mode="bilinear", antialias=True,
                        align_corners=False).clamp(0.0, 1.0)
    return out.reshape(*frames.shape[:-2], *size)


def model_crop(height: int, width: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width): the largest box centred in a `height` x `width`
    frame with the aspect ratio of `size` (h, w), so resizing it to `size` keeps pixels
    square. A frame of that aspect already is its own box."""
    h, w = size
    if width * h > height * w:  # wider than the model: keep the full height
        crop_h, crop_w = height, max(1, min(width, round(height * w / h)))
    else:
        crop_h, crop_w = max(1, min(height, round(width * h / w))), width
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def crop_intrinsics(intrinsics: np.ndarray, box: tuple[int, int, int, int], height: int,
                    width: int) -> np.ndarray:
    """Intrinsics [..., 6] of the crop `box` (in pixels of a `height` x `width` frame), in the
    intrinsics' own units (their width/height may differ from the frame's, same aspect)."""
    top, left, crop_h, crop_w = box
    intr = np.array(intrinsics, dtype=np.float64)
    sx, sy = intr[..., 4] / width, intr[..., 5] / height
    intr[..., 2] -= left * sx
    intr[..., 3] -= top * sy
    intr[..., 4], intr[..., 5] = crop_w * sx, crop_h * sy
    return intr


def model_frames(frames: np.ndarray, intrinsics: np.ndarray, size: tuple[int, int]
                 ) -> tuple[Tensor, np.ndarray]:
    """Frames [..., H, W, 3] as a model sees them: the centred crop of the model's aspect
    (`model_crop`) resized to `size` -> ([..., 3, h, w] in [0, 1], the crop's intrinsics
    [..., 6] in the input's units)."""
    H, W = np.asarray(frames).shape[-3:-1]
    box = model_crop(H, W, size)
    top, left, crop_h, crop_w = box
    cropped = np.asarray(frames)[..., top:top + crop_h, left:left + crop_w, :]
    return frames_to_tensor(cropped, size), crop_intrinsics(intrinsics, box, H, W)


def tensor_to_uint8(frames: Tensor) -> np.ndarray:  # [..., 3, h, w] in [0, 1] -> [..., h, w, 3]
    x = (frames.detach().float().clamp(0, 1) * 255.0 + 0.5).to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


# ------------------------------------------------------------------------ normalisation

@dataclass(frozen=True)
class RigFrame:
    """world = centre + normalised / scale."""

    centre: np.ndarray  # [3]
    scale: float

    def to_normalised(self, c2w: np.ndarray) -> np.ndarray:  # [..., 4, 4] -> [..., 4, 4]
        out = np.array(c2w, dtype=np.float64)
        out[..., :3, 3] = (out[..., :3, 3] - self.centre) * self.scale
        return out

    def to_world(self, g: Gaussians) -> Gaussians:
        return Gaussians(means=g.means / self.scale + self.centre.astype(np.float32),
                         quats=g.quats, log_scales=g.log_scales - math.log(self.scale),
                         opacity_logits=g.opacity_logits, sh0=g.sh0, sh_rest=g.sh_rest)


def rig_frame(c2w: np.ndarray) -> RigFrame:
    """The normalisation of a rig c2w [V, T, 4, 4] (OpenCV): its centre is the point nearest
    to every optical axis (least squares); the scale puts the cameras at the nominal
    distance on average. Axes that are (nearly) parallel or diverging give no such point:
    then the centre lies in front of the cameras' mean position, along their mean viewing
    direction, twice their spread away (at least one unit)."""
    c2w = np.asarray(c2w, dtype=np.float64).reshape(-1, 4, 4)
    origins, forward = c2w[:, :3, 3], c2w[:, :3, 2]  # [N, 3] each; OpenCV looks along +z
    forward = forward / np.linalg.norm(forward, axis=-1, keepdims=True)
    projectors = np.eye(3)[None] - forward[:, :, None] * forward[:, None, :]  # [N, 3, 3]
    system = projectors.sum(axis=0)
    rhs = (projectors @ origins[:, :, None]).sum(axis=0)[:, 0]
    eigenvalues = np.linalg.eigvalsh(system)
    if eigenvalues[0] > 1e-3 * len(origins):
        centre = np.linalg.solve(system, rhs)
        # a centre behind the cameras means the axes diverge: treat as parallel
        if np.mean(np.einsum("nk,nk->n", centre - origins, forward)) <= 0:
            centre = None
    else:
        centre = None
    if centre is None:
        mean_forward = forward.mean(axis=0)
        mean_forward /= max(np.linalg.norm(mean_forward), 1e-9)
        spread = np.linalg.norm(origins - origins.mean(axis=0), axis=-1).mean()
        centre = origins.mean(axis=0) + mean_forward * max(spread * 2.0, 1.0)
    distance = float(np.linalg.norm(origins - centre, axis=-1).mean())
    if not distance > 1e-9:
        raise PipelineError("the rig's cameras all sit on the point they look at")
    return RigFrame(centre=centre, scale=NOMINAL_CAMERA_DISTANCE / distance)


# ---------------------------------------------------------------------------- the steps

_GENERATE = JOB_PARAMS["generate"]


@dataclass
class GenerateSettings:
    """The pipeline's knobs; names, defaults and bounds are the job parameters'
    (`backend.job_params`), declared there once."""

    steps: int = _GENERATE["steps"].default
    guidance: float = _GENERATE["guidance"].default
    shift: float = _GENERATE["shift"].default
    seed: int = _GENERATE["seed"].default
    fit: str = _GENERATE["fit"].default
    fit_seconds: float = _GENERATE["fit_seconds"].default
    fit_resolution: int = _GENERATE["fit_resolution"].default
    generated_weight: float = _GENERATE["generated_weight"].default
    min_opacity: float = _GENERATE["min_opacity"].default
    fit_init: str = _GENERATE["fit_init"].default

    @property
    def fit_prior(self) -> bool:
        """Whether the fit starts from the feed-forward reconstruction's Gaussians too."""
        return self.fit != "off" and self.fit_init == "stereo+recon"

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> GenerateSettings:
        """The settings among a job's validated parameters (others are ignored here)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})


def window_size(diffusion) -> tuple[int, int]:
    """(views, timesteps) of one model call: the grid the model was trained on, within its
    RoPE tables (`max_views`, `t_max`)."""
    config = diffusion.config
    views, steps = getattr(config, "trained_grid", (0, 0))
    return (min(views or config.max_views, config.max_views),
            min(steps or config.t_max, config.t_max))


def grid_windows(num_views: int, num_steps: int, max_views: int, max_steps: int
                 ) -> list[tuple[list[int], list[int]]]:
    """The (views, timesteps) of each model call that together fill a grid larger than one
    call takes, in the order they must run.

    Every call holds view 0 (the input video, given) and up to `max_views` - 1 other views;
    time windows of `max_steps` overlap the previous one by at least one timestep, whose
    frames - generated by the previous window, or the freeze-time column in the first - are
    given to the next (the paper's row-and-column setting; the last window is moved back so
    it is full length, and then more generated columns are given). Windows run in time
    order, so those columns exist when a window needs them.
    """
    if num_views > max_views and max_views < 2:
        raise PipelineError(f"{num_views} views need windows of at least 2 views")
    if num_steps > max_steps and max_steps < 2:
        raise PipelineError(f"{num_steps} timesteps need windows of at least 2 timesteps")
    others = list(range(1, num_views))
    size = max(max_views - 1, 1)
    groups = [[0, *others[i:i + size]] for i in range(0, len(others), size)] or [[0]]
    windows, start = [], 0
    while True:
        end = min(start + max_steps, num_steps)
        windows.append(list(range(start, end)))
        if end == num_steps:
            break
        start = min(end - 1, num_steps - max_steps)
    return [(group, window) for window in windows for group in groups]


def generate_grid(
    diffusion,
    video: np.ndarray,  # [T, H, W, 3] uint8: row 0 (view 0 over time)
    c2w: np.ndarray,  # [V, T, 4, 4] normalised OpenCV camera-to-world
    intrinsics: np.ndarray,  # [V, T, 6] at the input resolution
    freeze: np.ndarray | None,  # [V, H, W, 3] uint8: column 0 (every view at t = 0)
    settings: GenerateSettings,
    progress: Progress | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> tuple[Tensor, Tensor, np.ndarray]:
    """Fill the grid with the diffusion model at its own frame size, in windows of the
    trained grid size when the grid is larger (see `grid_windows`). Input frames of another
    aspect ratio are cropped to the model's (`model_frames`). Returns the grid [V, T, 3, h, w]
    in [0, 1], the given mask [V, T] and the grid's intrinsics [V, T, 6] (at h x w)."""
    from backend.cameras import plucker_rays
    from backend.diffusion.sampler import EulerSampler

    V, T = c2w.shape[:2]
    h, w = diffusion.config.image_size
    device = next(diffusion.parameters()).device
    grid = torch.zeros(V, T, 3, h, w)
    known = torch.zeros(V, T, dtype=torch.bool)  # cells holding input frames
    grid[0], intr = model_frames(video, intrinsics, (h, w))
    known[0] = True
    if freeze is not None:  # cell (0, 0) keeps the video's first frame
        grid[1:, 0] = model_frames(freeze[1:], intrinsics[1:, 0], (h, w))[0]
        known[:, 0] = True
    intr = scale_intrinsics(intr, w, h)
    c2w32 = torch.as_tensor(c2w, dtype=torch.float32)
    intr32 = torch.as_tensor(intr, dtype=torch.float32)
    sampler = EulerSampler(steps=settings.steps, guidance=settings.guidance,
                           shift=settings.shift)
    generator = torch.Generator(device="cpu").manual_seed(int(settings.seed))
    windows = grid_windows(V, T, *window_size(diffusion))
    filled = known.clone()
    for number, (views, steps) in enumerate(windows):
        index = (torch.tensor(views)[:, None], torch.tensor(steps)[None, :])
        given = filled[index].clone()  # [v, t]: inputs, and cells earlier windows generated

        def report(step: int, of: int, number: int = number) -> None:
            if progress is not None:
                total = of * len(windows)
                where = f" (window {number + 1} of {len(windows)})" if len(windows) > 1 else ""
                progress("diffusion", number * of + step, total,
                         f"denoising step {number * of + step} of {total}{where}")

        cond = (grid[index] * 2 - 1)[None].to(device)  # [1, v, t, 3, h, w]
        window_rays = None
        if diffusion.config.use_camera_rays:  # [1, v, t, 6, h, w], one window at a time
            window_rays = plucker_rays(c2w32[index], intr32[index], h, w)[None].to(device)
        z = sampler.sample(diffusion, cond, given[None].to(device), rays=window_rays,
                           generator=generator, progress=report,
                           should_cancel=should_cancel)[0]
        out = ((z.float().cpu() + 1) / 2).clamp(0, 1)
        keep = filled[index]
        grid[index] = torch.where(keep[..., None, None, None], grid[index], out)
        filled[index] = True
    return grid, known, intr


def reconstruct_grid(
    recon,
    grid: Tensor,  # [V, T, 3, h, w] in [0, 1]
    c2w: np.ndarray,  # [V, T, 4, 4] normalised
    intrinsics: np.ndarray,  # [V, T, 6] of the grid's frames, any resolution (rescaled here)
    settings: GenerateSettings,
    progress: Progress | None = None,
) -> GaussianSequence:  # in the normalised frame
    """Gaussians per timestep from a full grid by the feed-forward reconstruction model; a
    grid of another aspect ratio than the model's is cropped to it (`model_crop`)."""
    h, w = recon.config.image_size
    H, W = grid.shape[-2:]
    box = model_crop(H, W, (h, w))
    top, left, crop_h, crop_w = box
    frames = resize_frames(grid[..., top:top + crop_h, left:left + crop_w], (h, w))
    intr = crop_intrinsics(intrinsics, box, H, W)
    intr = scale_intrinsics(intr, w, h)
    c2w32 = torch.as_tensor(c2w, dtype=torch.float32)
    intr32 = torch.as_tensor(intr, dtype=torch.float32)
    if progress is not None:
        progress("reconstruct", 0, 1, "feed-forward reconstruction")
    with torch.no_grad():
        seq = recon.reconstruct(frames, c2w32, intr32, min_opacity=settings.min_opacity)
    if progress is not None:
        progress("reconstruct", 1, 1, f"{sum(len(g) for g in seq)} Gaussians")
    return seq


@dataclass
class FitCells:
    """Frames for the fitting stage: images [V, T, H, W, 3] uint8 (or float [V, T, 3, H, W]
    in [0, 1]) at one resolution with a weight per cell [V, T] (0: not fitted), and their
    intrinsics [V, T, 6] when they differ from the rig's (a model's crop)."""

    images: np.ndarray | Tensor
    weights: np.ndarray
    intrinsics: np.ndarray | None = None


def fit_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """(h, w) with the longest side at most `longest`, the aspect ratio kept."""
    scale = min(1.0, longest / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def fit_cells(
    cells: list[FitCells],
    c2w: np.ndarray,  # [V, T, 4, 4] normalised
    intrinsics: np.ndarray,  # [V, T, 6] of any resolution (rescaled to each group's)
    settings: GenerateSettings,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    should_cancel: Callable[[], bool] | None = None,
    prior: GaussianSequence | None = None,
) -> tuple[GaussianSequence, dict[str, Any]]:
    """The fitting stage over groups of cells (the user's frames at their resolution, the
    generated ones at the model's), each resized to at most `settings.fit_resolution`;
    `prior`: feed-forward Gaussians per timestep (normalised frame) to start from where
    they agree with the frames. Returns the Gaussians (normalised frame; index i is the
    same Gaussian at every timestep) and a report (the learned background colour, time and
    steps per phase)."""
    from backend.fit import FitConfig, FitTarget, fit_gaussians

    targets = []
    for group in cells:
        images = group.images
        if isinstance(images, Tensor):  # [V, T, 3, H, W] float
            H, W = images.shape[-2:]
            frames = resize_frames(images, fit_size(H, W, settings.fit_resolution))
        else:
            H, W = images.shape[-3:-1]
            frames = frames_to_tensor(images, fit_size(H, W, settings.fit_resolution))
        own = intrinsics if group.intrinsics is None else group.intrinsics
        targets.append(FitTarget(frames, torch.as_tensor(c2w, dtype=torch.float32),
                                 torch.as_tensor(np.asarray(own), dtype=torch.float32),
                                 torch.as_tensor(group.weights, dtype=torch.float32)))
    config = FitConfig.preset(settings.fit, seed=int(settings.seed) % 2**63,
                              max_seconds=settings.fit_seconds)
    seq, background, report = fit_gaussians(targets, config, device=device,
                                            progress=progress, should_cancel=should_cancel,
                                            prior=None if prior is None else list(prior))
    if settings.min_opacity > 0:  # opacity is shared, so every timestep keeps the same ones
        keep = 1 / (1 + np.exp(-seq[0].opacity_logits)) >= settings.min_opacity
        seq = [g.subset(keep) for g in seq]
    summary = {"background": [round(float(c), 4) for c in background],
               "environment": report.environment,
               "preset": settings.fit, "rasterize_mode": config.rasterize_mode,
               "gaussians": len(seq[0]),
               "initial_gaussians": report.initial_count, "init": settings.fit_init,
               "prior_gaussians": report.prior_count, "seconds": report.seconds,
               "steps": report.steps}
    return GaussianSequence(seq), summary


def grid_preview(grid: np.ndarray, scale: int = 4) -> np.ndarray:
    """uint8 grid [V, T, h, w, 3] -> one video frame per timestep with the views side by
    side, upscaled (nearest) so small frames stay visible: [T, h*scale, V*w*scale, 3]."""
    V, T, h, w, _ = grid.shape
    tiles = grid.transpose(1, 2, 0, 3, 4).reshape(T, h, V * w, 3)
    return tiles.repeat(scale, axis=1).repeat(scale, axis=2)


def write_mp4(path: Path, frames: np.ndarray, fps: float) -> Path:
    """uint8 frames [N, H, W, 3] as an H.264 mp4 (sizes need only be multiples of 8)."""
    import imageio.v3 as iio

    iio.imwrite(path, frames, fps=fps, codec="libx264", macro_block_size=8)
    return path


def write_grid(folder: Path, grid: np.ndarray, fps: float = 8.0) -> dict[str, Path]:
    """The generated grid [V, T, h, w, 3] uint8 as grid.npy, PNG frames
    (frames/v00_t000.png) and an mp4 preview; returns the paths written."""
    import imageio.v3 as iio

    folder.mkdir(parents=True, exist_ok=True)
    frames_dir = folder / "frames"
    frames_dir.mkdir(exist_ok=True)
    np.save(folder / "grid.npy", grid)
    for v in range(grid.shape[0]):
        for t in range(grid.shape[1]):
            iio.imwrite(frames_dir / f"v{v:02d}_t{t:03d}.png", grid[v, t])
    mp4 = write_mp4(folder / "grid.mp4", grid_preview(grid), fps)
    return {"npy": folder / "grid.npy", "frames": frames_dir, "mp4": mp4}
