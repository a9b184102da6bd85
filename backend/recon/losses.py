"""Training losses of the reconstruction model: photometric, depth and camera terms.

The photometric loss on renders at target views is `mse * MSE + ssim * (1 - SSIM)`. The
paper pairs MSE with LPIPS; SSIM stands in for the perceptual term here because it needs no
pretrained network. SSIM uses an 11-tap Gaussian window (sigma 1.5) over the valid region,
with the usual constants (0.01 L)^2 and (0.03 L)^2 for a data range L.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from backend.recon.heads import camera_to_pose_encoding, relative_to_reference
from backend.recon.splats import GaussianBatch, RenderedGrid, render_gaussian_batch


@dataclass
class ReconLossWeights:
    mse: float = 1.0
    ssim: float = 0.2  # weight of (1 - SSIM)
    depth: float = 0.5  # relative L1 of rendered depth where ground truth exists
    min_alpha_for_depth: float = 0.5  # rendered pixels thinner than this get no depth loss


@dataclass
class ReconLoss:
    total: Tensor  # [] weighted sum, differentiable
    mse: Tensor  # []
    ssim: Tensor  # [] mean SSIM (higher is better)
    depth: Tensor | None  # [] relative depth error, None without ground truth
    renders: RenderedGrid


def _gaussian_window(size: int, sigma: float, like: Tensor) -> Tensor:  # -> [size]
    coords = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    window = torch.exp(-0.5 * (coords / sigma) ** 2)
    return window / window.sum()


def ssim(
    x: Tensor,  # [..., C, H, W]
    y: Tensor,  # [..., C, H, W]
    window_size: int = 11,
    sigma: float = 1.5,
    data_range: float = 1.0,
) -> Tensor:  # [...] mean SSIM of each image
    """Structural similarity of image pairs (Wang et al. 2004), averaged over pixels and
    channels. The window shrinks (kept odd) for images smaller than `window_size`."""
    if x.shape != y.shape or x.ndim < 3:
        raise ValueError(f"ssim: expected two [..., C, H, W] tensors of one shape, got "
                         f"{list(x.shape)} and {list(y.shape)}")
    *lead, C, H, W = x.shape
    size = min(window_size, H, W)
    size -= 1 - size % 2
    window = _gaussian_window(size, sigma, x)
    kernel_h = window.reshape(1, 1, size, 1).expand(C, 1, size, 1)
    kernel_w = window.reshape(1, 1, 1, size).expand(C, 1, 1, size)

    def blur(img: Tensor) -> Tensor:  # [M, C, H, W] -> [M, C, H-s+1, W-s+1]
        return F.conv2d(F.conv2d(img, kernel_h, groups=C), kernel_w, groups=C)

    x, y = x.reshape(-1, C, H, W), y.reshape(-1, C, H, W)
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    structure = (2 * cov + c2) / (var_x + var_y + c2)
    return (luminance * structure).mean(dim=(1, 2, 3)).reshape(lead)


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:  # -> []
    """Peak signal-to-noise ratio in dB over all elements."""
    mse = (x.float() - y.float()).square().mean()
    return 10 * torch.log10(data_range**2 / mse.clamp(min=1e-12))


def depth_l1(
    pred: Tensor,  # [...] z-depth
    target: Tensor,  # [...] z-depth; <= 0 or non-finite marks no ground truth
    mask: Tensor | None = None,  # [...] bool, extra pixels to leave out when False
) -> Tensor:  # []
    """Mean |pred - target| / target over pixels with valid ground truth (0 if none)."""
    if pred.shape != target.shape:
        raise ValueError(f"depth shapes differ: {list(pred.shape)} vs {list(target.shape)}")
    valid = torch.isfinite(target) & (target > 0)
    if mask is not None:
        valid = valid & mask
    safe_target = torch.where(valid, target, torch.ones_like(target))
    error = torch.where(valid, (pred - safe_target).abs() / safe_target, torch.zeros_like(pred))
    return error.sum() / valid.sum().clamp(min=1)


def reconstruction_loss(
    pred_gaussians_per_t: GaussianBatch,
    target_frames: Tensor,  # [B, C, T, 3, H, W] in [0, 1]
    target_c2w: Tensor,  # [B, C, T, 4, 4]
    target_intr: Tensor,  # [B, C, T, 6]
    target_depth: Tensor | None = None,  # [B, C, T, H, W] z-depth, <= 0 where unknown
    weights: ReconLossWeights | None = None,
    timesteps: Sequence[int] | None = None,
    background: Tensor | None = None,  # [3]
) -> ReconLoss:
    """Render the predicted Gaussians at the target cameras and compare with the targets.

    Target column t is rendered from the Gaussians of timestep `timesteps[t]` (default t),
    so held-out views and any subset of timesteps can be supervised.
    """
    weights = weights or ReconLossWeights()
    if target_frames.ndim != 6 or target_frames.shape[3] != 3:
        raise ValueError(f"target_frames must be [B, C, T, 3, H, W], got "
                         f"{list(target_frames.shape)}")
    if tuple(target_c2w.shape[:3]) != tuple(target_frames.shape[:3]):
        raise ValueError(f"target cameras cover {list(target_c2w.shape[:3])} (B, C, T), "
                         f"frames {list(target_frames.shape[:3])}")
    H, W = target_frames.shape[-2:]
    if target_depth is not None and tuple(target_depth.shape) != (*target_frames.shape[:3], H, W):
        raise ValueError(f"target_depth must be {[*target_frames.shape[:3], H, W]}, got "
                         f"{list(target_depth.shape)}")
    renders = render_gaussian_batch(pred_gaussians_per_t, target_c2w, target_intr, H, W,
                                    timesteps=timesteps, background=background)
    target = target_frames.to(renders.rgb)
    mse = (renders.rgb - target).square().mean()
    ssim_value = ssim(renders.rgb, target).mean()
    total = weights.mse * mse + weights.ssim * (1 - ssim_value)
    depth = None
    if target_depth is not None:
        opaque = renders.alpha.detach() > weights.min_alpha_for_depth
        depth = depth_l1(renders.depth, target_depth.to(renders.depth), opaque)
        total = total + weights.depth * depth
    return ReconLoss(total=total, mse=mse, ssim=ssim_value, depth=depth, renders=renders)


def camera_loss(
    pose_encoding: Tensor,  # [B, V, T, 9] camera head output
    c2w: Tensor,  # [B, V, T, 4, 4] true cameras, any world frame
    intr: Tensor,  # [B, V, T, 6]
) -> Tensor:  # []
    """Auxiliary camera-head loss against a known rig, expressed in its reference frame:
    Huber on translation, 1 - |<q, q_true>| on rotation, L1 on log focal lengths."""
    if pose_encoding.shape[:3] != c2w.shape[:3] or pose_encoding.shape[-1] != 9:
        raise ValueError(f"pose_encoding {list(pose_encoding.shape)} does not match cameras "
                         f"{list(c2w.shape)}")
    target = camera_to_pose_encoding(relative_to_reference(c2w.to(pose_encoding)),
                                     intr.to(pose_encoding))
    translation = F.huber_loss(pose_encoding[..., :3], target[..., :3], delta=0.1)
    quats = F.normalize(pose_encoding[..., 3:7], dim=-1)
    rotation = (1 - (quats * target[..., 3:7]).sum(-1).abs()).mean()
    focal = (pose_encoding[..., 7:9] - target[..., 7:9]).abs().mean()
    return translation + rotation + focal
