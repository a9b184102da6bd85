"""CUDA rasterization through `gsplat.rasterization`, returning the torch renderer's outputs.

gsplat is imported only when this is called, so CPU-only installs never load it. The settings
match the torch renderer (0.3 px blur, same near/far, expected depth, "classic" or
"antialiased" mode), with one difference: gsplat clamps alpha to 0.999 where the torch and CPU
renderers clamp to 0.99, which only matters for Gaussians with opacity above 0.99.
"""

from __future__ import annotations

from torch import Tensor

from backend.render.inputs import broadcast_raster_inputs
from backend.render.torch_rasterizer import BLUR_EPS, RenderOutput


def rasterize_gsplat(
    means: Tensor,  # [..., N, 3] world
    quats: Tensor,  # [..., N, 4] (w, x, y, z), normalised inside
    scales: Tensor,  # [..., N, 3] linear
    opacities: Tensor,  # [..., N]
    colors: Tensor,  # [..., N, D] or [..., C, N, D]
    viewmats: Tensor,  # [..., C, 4, 4] world-to-camera, OpenCV convention
    Ks: Tensor,  # [..., C, 3, 3]
    width: int,
    height: int,
    near: float = 0.01,
    far: float = 1e10,
    background: Tensor | None = None,  # [D] or [..., C, D]
    rasterize_mode: str = "classic",  # "classic" | "antialiased"
    packed: bool = False,  # gsplat's packed intermediates (memory for speed)
) -> RenderOutput:
    """Render with gsplat's CUDA kernels; all tensors must be CUDA tensors."""
    batch = broadcast_raster_inputs(means, quats, scales, opacities, colors, viewmats, Ks,
                                    width, height, near, far, background, rasterize_mode)
    if means.device.type != "cuda":
        raise ValueError(f"rasterize_gsplat: needs CUDA tensors, got device {means.device}")
    from gsplat import rasterization

    num_batch, channels = batch.viewmats.shape[0], batch.colors.shape[-1]

    def per_batch(t: Tensor) -> Tensor:  # [Bg, ...] -> [B, ...]
        return t.expand(num_batch, *t.shape[1:]).contiguous()

    render, alpha, _ = rasterization(
        means=per_batch(batch.means), quats=per_batch(batch.quats),
        scales=per_batch(batch.scales), opacities=per_batch(batch.opacities),
        colors=per_batch(batch.colors), viewmats=batch.viewmats, Ks=batch.Ks,
        width=int(width), height=int(height), near_plane=near, far_plane=far, eps2d=BLUR_EPS,
        sh_degree=None, packed=packed,
        backgrounds=None if batch.background is None else batch.background.contiguous(),
        render_mode="RGB+ED", rasterize_mode=rasterize_mode,
    )  # render [B, C, H, W, D+1] (colour, expected depth), alpha [B, C, H, W, 1]
    return RenderOutput(rgb=batch.unflatten(render[..., :channels]),
                        alpha=batch.unflatten(alpha),
                        depth=batch.unflatten(render[..., channels:channels + 1]))
