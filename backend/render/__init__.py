"""Gaussian rasterization with one signature: gsplat on CUDA, numba kernels on the CPU, and the
pure-torch reference twin they are tested against."""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

from backend.cameras import c2w_to_viewmat, intrinsics_to_K
from backend.gaussians import Gaussians
from backend.render.inputs import RASTERIZE_MODES
from backend.render.torch_rasterizer import RenderOutput, TorchRasterizerConfig, rasterize_torch

BACKENDS = ("auto", "cpu", "torch", "gsplat")

__all__ = ["BACKENDS", "RASTERIZE_MODES", "RenderOutput", "TorchRasterizerConfig",
           "cpu_kernels_available", "rasterize", "rasterize_gaussians", "rasterize_torch"]


@functools.cache
def cpu_kernels_available() -> bool:
    """Whether numba imports here (wheels exist for the usual platforms; without it "auto"
    falls back to the torch twin on the CPU)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def __getattr__(name: str):  # the CPU kernels load numba only when asked for
    if name in ("CpuRasterizerConfig", "rasterize_cpu"):
        from backend.render import cpu_rasterizer

        return getattr(cpu_rasterizer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def rasterize(
    means: Tensor,  # [..., N, 3] world
    quats: Tensor,  # [..., N, 4] (w, x, y, z), normalised inside
    scales: Tensor,  # [..., N, 3] linear
    opacities: Tensor,  # [..., N]
    colors: Tensor,  # [..., N, D] RGB or features, or [..., C, N, D] per camera
    viewmats: Tensor,  # [..., C, 4, 4] world-to-camera, OpenCV convention
    Ks: Tensor,  # [..., C, 3, 3]
    width: int,
    height: int,
    near: float = 0.01,
    far: float = 1e10,
    background: Tensor | None = None,  # [D] or [..., C, D]
    backend: str = "auto",  # "auto" | "cpu" | "torch" | "gsplat"
    rasterize_mode: str = "classic",  # "classic" | "antialiased" (gsplat's)
    packed: bool = False,  # gsplat's packed intermediates; the CPU kernels always pack
) -> RenderOutput:
    """Render Gaussians into cameras: rgb [..., C, H, W, D], alpha and expected depth
    [..., C, H, W, 1]. The batch dims of means and viewmats broadcast (`backend.render.inputs`),
    so T timesteps' Gaussians [T, N, 3] render into their cameras [T, C, 4, 4] in one call.

    "auto" uses gsplat for CUDA tensors, else the numba CPU kernels, or the torch twin when
    gradients for the cameras are needed (the CPU kernels give none) or numba is missing.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        camera_grads = torch.is_grad_enabled() and (viewmats.requires_grad or Ks.requires_grad)
        backend = ("gsplat" if means.device.type == "cuda"
                   else "torch" if camera_grads or not cpu_kernels_available() else "cpu")
    args = (means, quats, scales, opacities, colors, viewmats, Ks, width, height, near, far,
            background)
    if backend == "gsplat":
        from backend.render.gsplat_rasterizer import rasterize_gsplat

        return rasterize_gsplat(*args, rasterize_mode=rasterize_mode, packed=packed)
    if backend == "cpu":
        from backend.render.cpu_rasterizer import rasterize_cpu

        return rasterize_cpu(*args, rasterize_mode=rasterize_mode)
    return rasterize_torch(*args, rasterize_mode=rasterize_mode)


def rasterize_gaussians(
    g: Gaussians,
    c2w,  # [C, 4, 4] camera-to-world, OpenCV convention (numpy or torch)
    intrinsics,  # [C, 6] (fx, fy, cx, cy, width, height)
    near: float = 0.01,
    far: float = 1e10,
    background: Tensor | None = None,  # [3] or [C, 3]
    backend: str = "auto",
    device: str | torch.device | None = None,
    rasterize_mode: str = "classic",  # "antialiased" for the fitting stage's Gaussians
) -> RenderOutput:
    """Render a `Gaussians` container from wire-convention cameras sharing one image size.

    The device defaults to that of `c2w` when it is a tensor, else the CPU. Render Gaussians
    in the mode they were fitted in (a job's `fit.json` says which: `rasterize_mode`).
    """
    if device is None:
        device = c2w.device if isinstance(c2w, Tensor) else "cpu"
    c2w = torch.as_tensor(np.asarray(c2w) if not isinstance(c2w, Tensor) else c2w)
    intrinsics = torch.as_tensor(
        np.asarray(intrinsics) if not isinstance(intrinsics, Tensor) else intrinsics)
    if c2w.ndim != 3 or c2w.shape[1:] != (4, 4):
        raise ValueError(f"c2w: expected shape [C, 4, 4], got {list(c2w.shape)}")
    if tuple(intrinsics.shape) != (c2w.shape[0], 6):
        raise ValueError(
            f"intrinsics: expected shape [{c2w.shape[0]}, 6], got {list(intrinsics.shape)}")
    sizes = intrinsics[:, 4:6].unique(dim=0)
    if sizes.shape[0] != 1:
        raise ValueError(f"intrinsics: cameras have different image sizes {sizes.tolist()}")
    width, height = (round(float(v)) for v in sizes[0])
    tensors = g.to_torch(device)
    dtype = tensors["means"].dtype
    viewmats = c2w_to_viewmat(c2w.to(device=device, dtype=torch.float64)).to(dtype)
    Ks = intrinsics_to_K(intrinsics.to(device=device, dtype=dtype))
    if background is not None:
        background = torch.as_tensor(background, device=device, dtype=dtype)
    return rasterize(tensors["means"], tensors["quats"], tensors["scales"],
                     tensors["opacities"], tensors["colors"], viewmats, Ks, width, height,
                     near=near, far=far, background=background, backend=backend,
                     rasterize_mode=rasterize_mode)
