"""CUDA rasterization through `gsplat.rasterization`, returning the torch renderer's outputs.

gsplat is imported only when this is called, so CPU-only installs never load it. The settings
match the torch renderer (classic 3DGS, 0.3 px blur, same near/far, expected depth), with one
difference: gsplat clamps alpha to 0.999 where the torch renderer clamps to 0.99, which only
matters for Gaussians with opacity above 0.99.
"""

from __future__ import annotations

from torch import Tensor

from backend.render.torch_rasterizer import BLUR_EPS, RenderOutput, check_raster_inputs


def rasterize_gsplat(
    means: Tensor,  # [N, 3] world
    quats: Tensor,  # [N, 4] (w, x, y, z), normalised inside
    scales: Tensor,  # [N, 3] linear
    opacities: Tensor,  # [N]
    colors: Tensor,  # [N, D]
    viewmats: Tensor,  # [C, 4, 4] world-to-camera, OpenCV convention
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    near: float = 0.01,
    far: float = 1e10,
    background: Tensor | None = None,  # [D] or [C, D]
) -> RenderOutput:
    """Render with gsplat's CUDA kernels; all tensors must be CUDA tensors."""
    background = check_raster_inputs(means, quats, scales, opacities, colors, viewmats, Ks,
                                     width, height, near, far, background)
    if means.device.type != "cuda":
        raise ValueError(f"rasterize_gsplat: needs CUDA tensors, got device {means.device}")
    from gsplat import rasterization

    channels = colors.shape[1]
    render, alpha, _ = rasterization(
        means=means, quats=quats, scales=scales, opacities=opacities, colors=colors,
        viewmats=viewmats.to(means), Ks=Ks.to(means), width=int(width), height=int(height),
        near_plane=near, far_plane=far, eps2d=BLUR_EPS, sh_degree=None, packed=False,
        backgrounds=None if background is None else background.contiguous(),
        render_mode="RGB+ED", rasterize_mode="classic",
    )  # render [C, H, W, D+1] (colour, expected depth), alpha [C, H, W, 1]
    return RenderOutput(rgb=render[..., :channels], alpha=alpha,
                        depth=render[..., channels:channels + 1])
