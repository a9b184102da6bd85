"""Differentiable per-timestep Gaussians as tensors, their conversion and rendering."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from backend.cameras import c2w_to_viewmat, intrinsics_to_K, scale_intrinsics
from backend.gaussians import Gaussians, GaussianSequence
from backend.render import rasterize


@dataclass
class GaussianBatch:
    """Activated Gaussians of B samples x T timesteps, N Gaussians each, in world space.

    The N Gaussians of a timestep are the pixels of its V frames in (v, y, x) order.
    """

    means: Tensor  # [B, T, N, 3]
    quats: Tensor  # [B, T, N, 4] unit (w, x, y, z)
    scales: Tensor  # [B, T, N, 3] linear standard deviations
    opacities: Tensor  # [B, T, N] in (0, 1)
    colors: Tensor  # [B, T, N, 3] RGB

    @property
    def num_samples(self) -> int:
        return self.means.shape[0]

    @property
    def num_timesteps(self) -> int:
        return self.means.shape[1]

    def timestep(self, batch_index: int, t: int) -> dict[str, Tensor]:
        """Tensors of one sample and timestep: means [N, 3], quats, scales, opacities, colors."""
        return {name: getattr(self, name)[batch_index, t]
                for name in ("means", "quats", "scales", "opacities", "colors")}

    def to_gaussians(self, batch_index: int, t: int, min_opacity: float = 0.0) -> Gaussians:
        """One timestep as a `Gaussians` container, dropping those below `min_opacity`."""
        if not 0.0 <= min_opacity < 1.0:
            raise ValueError(f"min_opacity must be in [0, 1), got {min_opacity!r}")
        parts = {k: v.detach().float().cpu() for k, v in self.timestep(batch_index, t).items()}
        keep = parts["opacities"] >= min_opacity  # [N]
        scales = parts["scales"][keep].clamp(min=1e-12)
        return Gaussians.from_activated(parts["means"][keep], parts["quats"][keep], scales,
                                        parts["opacities"][keep], parts["colors"][keep])

    def to_sequence(self, batch_index: int = 0, min_opacity: float = 0.0,
                    frame_numbers: Sequence[int] | None = None) -> GaussianSequence:
        """All timesteps of one sample as a `GaussianSequence`."""
        if not 0 <= batch_index < self.num_samples:
            raise ValueError(f"batch_index {batch_index} out of range [0, {self.num_samples})")
        frames = [self.to_gaussians(batch_index, t, min_opacity)
                  for t in range(self.num_timesteps)]
        return GaussianSequence(frames, None if frame_numbers is None else list(frame_numbers))


@dataclass
class RenderedGrid:
    """Renders of C cameras over T timesteps for B samples."""

    rgb: Tensor  # [B, C, T, 3, H, W]
    alpha: Tensor  # [B, C, T, H, W]
    depth: Tensor  # [B, C, T, H, W] expected z-depth, 0 where nothing was hit


def check_camera_grid(c2w: Tensor, intr: Tensor, name: str = "") -> tuple[int, int, int]:
    """Validate c2w [B, C, T, 4, 4] and intr [B, C, T, 6]; return (B, C, T)."""
    if c2w.ndim != 5 or c2w.shape[-2:] != (4, 4):
        raise ValueError(f"{name}c2w must be [B, C, T, 4, 4], got {list(c2w.shape)}")
    if tuple(intr.shape) != (*c2w.shape[:3], 6):
        raise ValueError(f"{name}intrinsics must be {[*c2w.shape[:3], 6]}, got {list(intr.shape)}")
    if not (torch.isfinite(c2w).all() and torch.isfinite(intr).all()):
        raise ValueError(f"{name}cameras contain NaN or infinite values")
    return c2w.shape[0], c2w.shape[1], c2w.shape[2]


def render_gaussian_batch(
    gaussians: GaussianBatch,
    c2w: Tensor,  # [B, C, T, 4, 4] OpenCV camera-to-world
    intr: Tensor,  # [B, C, T, 6] (fx, fy, cx, cy, width, height)
    height: int,
    width: int,
    timesteps: Sequence[int] | None = None,
    background: Tensor | None = None,  # [3]
    backend: str = "auto",
) -> RenderedGrid:
    """Render every sample's Gaussians of each timestep into that timestep's cameras.

    Target column t uses the Gaussians of timestep `timesteps[t]` (default: t itself).
    Intrinsics are rescaled to `width` x `height`.
    """
    B, _, T = check_camera_grid(c2w, intr)
    if gaussians.num_samples != B:
        raise ValueError(f"cameras have {B} samples, gaussians {gaussians.num_samples}")
    timesteps = list(range(T)) if timesteps is None else [int(t) for t in timesteps]
    if len(timesteps) != T or any(not 0 <= t < gaussians.num_timesteps for t in timesteps):
        raise ValueError(f"timesteps must be {T} indices in [0, {gaussians.num_timesteps}), "
                         f"got {timesteps}")
    dtype, device = gaussians.means.dtype, gaussians.means.device
    c2w, intr = c2w.to(device), intr.to(device=device, dtype=dtype)
    Ks = intrinsics_to_K(scale_intrinsics(intr, width, height))  # [B, C, T, 3, 3]
    viewmats = c2w_to_viewmat(c2w.double()).to(dtype)  # [B, C, T, 4, 4]
    rgb, alpha, depth = [], [], []
    for b in range(B):
        for column, t in enumerate(timesteps):
            out = rasterize(**gaussians.timestep(b, t), viewmats=viewmats[b, :, column],
                            Ks=Ks[b, :, column], width=width, height=height,
                            background=background, backend=backend)
            rgb.append(out.rgb.permute(0, 3, 1, 2))  # [C, 3, H, W]
            alpha.append(out.alpha[..., 0])  # [C, H, W]
            depth.append(out.depth[..., 0])

    def grid(items: list[Tensor]) -> Tensor:  # B*T x [C, ...] -> [B, C, T, ...]
        stacked = torch.stack(items).reshape(B, T, *items[0].shape)
        return stacked.transpose(1, 2)

    return RenderedGrid(rgb=grid(rgb), alpha=grid(alpha), depth=grid(depth))
