"""Sample transforms: view and time reversal, a mirror flip and crops that keep the cameras
consistent with the pixels, and the paper's "2D-transformed" videos (random homographies).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from backend.data.sample import Sample
from backend.gaussians import Gaussians

# Horizontal image flip = x -> -x in camera space, paired with a mirror of the world about
# its x = 0 plane so that camera-to-world stays a proper rotation.
_CAMERA_FLIP = torch.diag(torch.tensor([-1.0, 1.0, 1.0, 1.0], dtype=torch.float64))
_WORLD_MIRROR = _CAMERA_FLIP


def reverse_views(sample: Sample) -> Sample:
    """The same grid with its views in reverse order."""
    def flip(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.flip(0)

    return replace(sample, frames=flip(sample.frames), depth=flip(sample.depth),
                   alpha=flip(sample.alpha), c2w=flip(sample.c2w),
                   intrinsics=flip(sample.intrinsics),
                   views_reversed=not sample.views_reversed)


def reverse_time(sample: Sample) -> Sample:
    """The same grid played backwards (Gaussians per timestep reversed too)."""
    def flip(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.flip(1)

    gaussians = None if sample.gaussians is None else list(reversed(sample.gaussians))
    return replace(sample, frames=flip(sample.frames), depth=flip(sample.depth),
                   alpha=flip(sample.alpha), c2w=flip(sample.c2w),
                   intrinsics=flip(sample.intrinsics), gaussians=gaussians)


def mirror_gaussians(g: Gaussians) -> Gaussians:
    """Gaussians mirrored about the world's x = 0 plane."""
    means = g.means * np.array([-1.0, 1.0, 1.0], np.float32)
    quats = g.quats * np.array([1.0, 1.0, -1.0, -1.0], np.float32)  # M R M for M = diag(-1,1,1)
    return Gaussians(means=means, quats=quats, log_scales=g.log_scales,
                     opacity_logits=g.opacity_logits, sh0=g.sh0, sh_rest=g.sh_rest)


def flip_horizontal(sample: Sample) -> Sample:
    """Mirror every image left-right; cameras and Gaussians become those of the mirrored world.

    Depth is unchanged; a pixel's world point is mirrored about x = 0.
    """
    def flip(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.flip(-1)

    c2w = _WORLD_MIRROR @ sample.c2w.double() @ _CAMERA_FLIP  # [V, T, 4, 4]
    intr = sample.intrinsics.clone()
    intr[..., 2] = intr[..., 4] - intr[..., 2]
    gaussians = None if sample.gaussians is None else [mirror_gaussians(g)
                                                       for g in sample.gaussians]
    info = sample.scene_info
    if info is not None and "light_direction" in info:
        x, y, z = info["light_direction"]
        info = {**info, "light_direction": [-x, y, z]}
    return replace(sample, frames=flip(sample.frames), depth=flip(sample.depth),
                   alpha=flip(sample.alpha), c2w=c2w.to(sample.c2w.dtype), intrinsics=intr,
                   gaussians=gaussians, scene_info=info)


def _resize(
    images: Tensor,  # [V, T, C, h, w]
    height: int,
    width: int,
    mode: str,
) -> Tensor:  # [V, T, C, H, W]
    """Resample every image of a grid to `height` x `width`."""
    v, t = images.shape[:2]
    flat = images.flatten(0, 1)  # [V*T, C, h, w]
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    out = F.interpolate(flat, size=(height, width), mode=mode, **kwargs)
    return out.unflatten(0, (v, t))


def crop_and_resize(sample: Sample, top: int, left: int, crop_height: int, crop_width: int
                    ) -> Sample:
    """Crop every image to the window and resample it back to the sample's size.

    Intrinsics follow the crop and the scaling; depth is resampled with nearest neighbours so
    that object edges keep true depths.
    """
    height, width = sample.frames.shape[-2:]
    if not (top >= 0 and left >= 0 and crop_height >= 1 and crop_width >= 1
            and top + crop_height <= height and left + crop_width <= width):
        raise ValueError(f"crop window {(top, left, crop_height, crop_width)} is outside the "
                         f"{height}x{width} images")

    def crop(x: Tensor | None, mode: str) -> Tensor | None:
        if x is None:
            return None
        return _resize(x[..., top:top + crop_height, left:left + crop_width], height, width,
                       mode)

    sx, sy = width / crop_width, height / crop_height
    intr = sample.intrinsics.clone()
    intr[..., 0], intr[..., 2] = intr[..., 0] * sx, (intr[..., 2] - left) * sx
    intr[..., 1], intr[..., 3] = intr[..., 1] * sy, (intr[..., 3] - top) * sy
    frames = crop(sample.frames, "bilinear").clamp(0.0, 1.0)
    alpha = crop(sample.alpha, "bilinear")
    return replace(sample, frames=frames, depth=crop(sample.depth, "nearest"),
                   alpha=None if alpha is None else alpha.clamp(0.0, 1.0), intrinsics=intr)


def random_crop(sample: Sample, rng: np.random.Generator, min_scale: float) -> Sample:
    """A random window covering `min_scale`..1 of each side, resampled to full size."""
    if not 0 < min_scale <= 1:
        raise ValueError(f"min_scale: expected a value in (0, 1], got {min_scale}")
    height, width = sample.frames.shape[-2:]
    scale = rng.uniform(min_scale, 1.0)
    crop_h, crop_w = max(1, round(height * scale)), max(1, round(width * scale))
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    return crop_and_resize(sample, top, left, crop_h, crop_w)


# ---------------------------------------------------------------------------------------------
# 2D-transformed videos


def random_homography(rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """A random 3x3 homography in normalised image coordinates ([-1, 1], image edges at +-1).

    It maps output positions to source positions: a mild zoom-in, rotation, shift and
    perspective tilt, so the output mostly stays inside the source image.
    """
    angle = math.radians(10.0) * strength * rng.uniform(-1, 1)
    zoom = 1.0 - 0.15 * strength * rng.uniform(0.3, 1.0)
    shift = 0.1 * strength * rng.uniform(-1, 1, size=2)
    tilt = 0.15 * strength * rng.uniform(-1, 1, size=2)
    cos, sin = math.cos(angle) * zoom, math.sin(angle) * zoom
    return np.array([[cos, -sin, shift[0]], [sin, cos, shift[1]], [tilt[0], tilt[1], 1.0]])


def warp_images(
    images: Tensor,  # [N, C, H, W]
    homography,  # [3, 3] output -> source, normalised coordinates
    mode: str = "bilinear",
) -> Tensor:  # [N, C, H, W]
    """Resample images through a homography; outside the source the border is repeated."""
    n, _, height, width = images.shape
    matrix = torch.as_tensor(np.asarray(homography), dtype=images.dtype)
    ys = (torch.arange(height, dtype=images.dtype) * 2 + 1) / height - 1
    xs = (torch.arange(width, dtype=images.dtype) * 2 + 1) / width - 1
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # [H, W]
    points = torch.stack([grid_x, grid_y, torch.ones_like(grid_x)], dim=-1)  # [H, W, 3]
    mapped = points @ matrix.T
    source = mapped[..., :2] / mapped[..., 2:].clamp(min=1e-6)  # [H, W, 2]
    return F.grid_sample(images, source.expand(n, height, width, 2), mode=mode,
                         padding_mode="border", align_corners=False)


def homography_views(
    video: Tensor,  # [T, C, H, W]
    num_views: int,
    rng: np.random.Generator,
    strength: float = 1.0,
    mode: str = "bilinear",
) -> tuple[Tensor, np.ndarray]:  # [V, T, C, H, W], homographies [V, 3, 3]
    """A synchronised-rig imitation: view 0 is the video, each other view a fixed random
    homography of it."""
    if num_views < 1:
        raise ValueError(f"num_views: must be >= 1, got {num_views}")
    matrices = np.stack([np.eye(3)] + [random_homography(rng, strength)
                                       for _ in range(num_views - 1)])
    views = [video if i == 0 else warp_images(video, matrices[i], mode)
             for i in range(num_views)]
    return torch.stack(views), matrices
