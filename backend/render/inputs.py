"""Shape checks and broadcasting shared by every rasterizer: gsplat's batched input forms.

`rasterize` takes Gaussians `means [..., N, 3]` and cameras `viewmats [..., C, 4, 4]` whose
leading batch dims broadcast against each other (gsplat's convention), so one call renders
many timesteps' Gaussian sets into many cameras:

- `means [N, 3]`, `viewmats [C, 4, 4]`: one set into C cameras, outputs `[C, H, W, *]`;
- `means [T, N, 3]`, `viewmats [T, C, 4, 4]`: set t into its own C cameras, `[T, C, H, W, *]`;
- `means [N, 3]`, `viewmats [T, C, 4, 4]` or `means [T, N, 3]`, `viewmats [C, 4, 4]`: shared
  Gaussians or shared cameras across the batch.

Colours are `[..., N, D]` (one colour per Gaussian) or `[..., C, N, D]` (one per camera and
Gaussian, e.g. view-dependent colours evaluated beforehand). The background is `[D]`,
`[..., C, D]` or anything broadcasting to the latter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

RASTERIZE_MODES = ("classic", "antialiased")


@dataclass
class RasterBatch:
    """Inputs flattened to one batch dim B: image (b, c) renders Gaussian set `b % Bg`."""

    means: Tensor  # [Bg, N, 3], Bg == 1 or Bg == B
    quats: Tensor  # [Bg, N, 4]
    scales: Tensor  # [Bg, N, 3]
    opacities: Tensor  # [Bg, N]
    colors: Tensor  # [Bg, N, D] or, with `colors_per_camera`, [B, C, N, D]
    viewmats: Tensor  # [B, C, 4, 4]
    Ks: Tensor  # [B, C, 3, 3]
    background: Tensor | None  # [B, C, D]
    batch_shape: tuple[int, ...]  # the broadcast leading dims, () for the plain form
    colors_per_camera: bool

    def gaussian_set(self, b: int) -> int:
        return b if self.means.shape[0] > 1 else 0

    def unflatten(self, image: Tensor) -> Tensor:  # [B, C, ...] -> [..., C, ...]
        return image.reshape(*self.batch_shape, *image.shape[1:])


def _check_gaussians(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor,
                     colors: Tensor) -> None:
    if means.ndim < 2 or means.shape[-1] != 3:
        raise ValueError(f"means: expected shape [..., N, 3], got {list(means.shape)}")
    lead, n = tuple(means.shape[:-2]), means.shape[-2]
    for name, tensor, shape in (("quats", quats, (*lead, n, 4)), ("scales", scales, (*lead, n, 3)),
                                ("opacities", opacities, (*lead, n))):
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: expected shape {list(shape)}, got {list(tensor.shape)}")
    for name, tensor in (("means", means), ("quats", quats), ("scales", scales),
                         ("opacities", opacities), ("colors", colors)):
        if not tensor.is_floating_point() or tensor.dtype != means.dtype:
            raise ValueError(f"{name}: dtype {tensor.dtype} differs from means ({means.dtype})")
        if tensor.device != means.device:
            raise ValueError(f"{name}: on {tensor.device}, means on {means.device}")


def _check_scalars(width: int, height: int, near: float, far: float, mode: str) -> None:
    if int(width) != width or int(height) != height or width < 1 or height < 1:
        raise ValueError(f"width/height must be positive integers, got {width}x{height}")
    if not 0 < near < far:
        raise ValueError(f"near/far: need 0 < near < far, got near={near}, far={far}")
    if mode not in RASTERIZE_MODES:
        raise ValueError(f"rasterize_mode: expected one of {RASTERIZE_MODES}, got {mode!r}")


def broadcast_raster_inputs(
    means: Tensor,  # [..., N, 3]
    quats: Tensor,  # [..., N, 4]
    scales: Tensor,  # [..., N, 3]
    opacities: Tensor,  # [..., N]
    colors: Tensor,  # [..., N, D] or [..., C, N, D]
    viewmats: Tensor,  # [..., C, 4, 4]
    Ks: Tensor,  # [..., C, 3, 3]
    width: int,
    height: int,
    near: float,
    far: float,
    background: Tensor | None,  # [D] or broadcasting to [..., C, D]
    rasterize_mode: str = "classic",
) -> RasterBatch:
    """Validate `rasterize` arguments (ValueError names the first problem) and flatten them."""
    _check_gaussians(means, quats, scales, opacities, colors)
    _check_scalars(width, height, near, far, rasterize_mode)
    if viewmats.ndim < 3 or viewmats.shape[-2:] != (4, 4) or viewmats.shape[-3] < 1:
        raise ValueError(f"viewmats: expected shape [..., C, 4, 4], got {list(viewmats.shape)}")
    if tuple(Ks.shape) != (*viewmats.shape[:-2], 3, 3):
        raise ValueError(f"Ks: expected shape {[*viewmats.shape[:-2], 3, 3]}, "
                         f"got {list(Ks.shape)}")
    try:
        batch_shape = torch.broadcast_shapes(means.shape[:-2], viewmats.shape[:-3])
    except RuntimeError as error:
        raise ValueError(f"means {list(means.shape)} and viewmats {list(viewmats.shape)}: "
                         f"batch dims do not broadcast ({error})") from None
    num_cams, n = viewmats.shape[-3], means.shape[-2]
    batch = max(1, int(torch.Size(batch_shape).numel()))
    per_camera = colors.ndim == means.ndim + 1
    lead = (*means.shape[:-2], num_cams) if per_camera else tuple(means.shape[:-2])
    if colors.ndim not in (means.ndim, means.ndim + 1) or tuple(colors.shape[:-2]) != lead \
            or colors.shape[-2] != n or colors.shape[-1] < 1:
        raise ValueError(f"colors: expected shape [..., N={n}, D] or [..., C={num_cams}, N, D] "
                         f"matching means, got {list(colors.shape)}")

    def gaussians(t: Tensor, tail: tuple[int, ...]) -> Tensor:  # [..., *tail] -> [Bg, *tail]
        if t.shape[:t.ndim - len(tail)].numel() == 1:
            return t.reshape(1, *tail)
        return t.expand(*batch_shape, *tail).reshape(batch, *tail)

    g = {name: gaussians(t, (n, t.shape[-1]))
         for name, t in (("means", means), ("quats", quats), ("scales", scales))}
    g["opacities"] = gaussians(opacities, (n,))
    if per_camera:
        colors = colors.expand(*batch_shape, num_cams, n, colors.shape[-1]).reshape(
            batch, num_cams, n, colors.shape[-1])
    else:
        colors = gaussians(colors, (n, colors.shape[-1]))
    cams = viewmats.expand(*batch_shape, num_cams, 4, 4).reshape(batch, num_cams, 4, 4)
    Ks = Ks.expand(*batch_shape, num_cams, 3, 3).reshape(batch, num_cams, 3, 3)
    return RasterBatch(**g, colors=colors, viewmats=cams.to(means), Ks=Ks.to(means),
                       background=_broadcast_background(background, batch_shape, num_cams,
                                                        colors.shape[-1], means),
                       batch_shape=tuple(batch_shape), colors_per_camera=per_camera)


def _broadcast_background(background: Tensor | None, batch_shape: tuple[int, ...],
                          num_cams: int, channels: int, like: Tensor) -> Tensor | None:
    if background is None:
        return None
    target = (*batch_shape, num_cams, channels)
    try:
        expanded = torch.broadcast_to(background.to(like), target)
    except RuntimeError:
        raise ValueError(f"background: expected shape [{channels}] or broadcasting to "
                         f"{list(target)}, got {list(background.shape)}") from None
    return expanded.reshape(-1, num_cams, channels)
