"""Per-scene refinement: a short Adam optimisation of feed-forward Gaussians against the frames.

Every Gaussian parameter is optimised (centres, rotations, log scales, opacity logits, DC
colour); higher SH bands, if any, are kept as they are. Centres move in units of each
Gaussian's initial size (mean of its three scales), so one learning rate suits any scene
scale. One step renders every timestep's Gaussians into all of that timestep's cameras and
takes one Adam step on `MSE + ssim_weight * (1 - SSIM)` summed over timesteps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from backend.cameras import c2w_to_viewmat, intrinsics_to_K, scale_intrinsics
from backend.gaussians import SH_C0, Gaussians, GaussianSequence
from backend.recon.losses import ssim
from backend.render import rasterize


@dataclass
class RefineConfig:
    """Loss weight and per-parameter learning-rate multipliers of `refine`."""

    ssim_weight: float = 0.2
    means_lr: float = 0.2  # x lr, in units of each Gaussian's initial size
    quats_lr: float = 0.2
    log_scales_lr: float = 0.5
    opacity_lr: float = 5.0
    colors_lr: float = 2.0  # on the DC SH coefficient (colour = 0.5 + 0.282 * sh0)
    background: tuple[float, float, float] | None = None
    render_backend: str = "auto"


ProgressCallback = Callable[[int, int, float], None]


def _as_tensor(name: str, value, shape_tail: tuple[int, ...], device) -> Tensor:
    tensor = torch.as_tensor(np.asarray(value) if not isinstance(value, Tensor) else value)
    tensor = tensor.to(device=device, dtype=torch.float32)
    if tensor.ndim != 2 + len(shape_tail) or tuple(tensor.shape[2:]) != shape_tail:
        want = ", ".join(["V", "T", *(str(s) for s in shape_tail)])
        raise ValueError(f"{name} must be [{want}], got {list(tensor.shape)}")
    return tensor


class _TimestepParams:
    """Trainable tensors of one timestep's Gaussians."""

    def __init__(self, g: Gaussians, device):
        def leaf(array: np.ndarray) -> Tensor:
            return torch.tensor(array, dtype=torch.float32, device=device, requires_grad=True)

        self.source = g
        self.means0 = torch.tensor(g.means, dtype=torch.float32, device=device)
        self.unit = torch.tensor(g.scales.mean(axis=1, keepdims=True), device=device)  # [N, 1]
        self.delta = torch.zeros_like(self.means0, requires_grad=True)  # [N, 3]
        self.quats, self.log_scales = leaf(g.quats), leaf(g.log_scales)
        self.opacity_logits, self.sh0 = leaf(g.opacity_logits), leaf(g.sh0)

    def groups(self, lr: float, config: RefineConfig) -> list[dict]:
        return [{"params": [self.delta], "lr": lr * config.means_lr},
                {"params": [self.quats], "lr": lr * config.quats_lr},
                {"params": [self.log_scales], "lr": lr * config.log_scales_lr},
                {"params": [self.opacity_logits], "lr": lr * config.opacity_lr},
                {"params": [self.sh0], "lr": lr * config.colors_lr}]

    def activated(self) -> dict[str, Tensor]:
        return {"means": self.means0 + self.unit * self.delta, "quats": self.quats,
                "scales": torch.exp(self.log_scales),
                "opacities": torch.sigmoid(self.opacity_logits),
                "colors": 0.5 + SH_C0 * self.sh0}

    def to_gaussians(self) -> Gaussians:
        with torch.no_grad():
            means = self.means0 + self.unit * self.delta
            return Gaussians(means=means.cpu().numpy(), quats=self.quats.cpu().numpy(),
                             log_scales=self.log_scales.cpu().numpy(),
                             opacity_logits=self.opacity_logits.cpu().numpy(),
                             sh0=self.sh0.cpu().numpy(), sh_rest=self.source.sh_rest)


def _photometric(tensors: dict[str, Tensor], frames: Tensor, viewmats: Tensor, Ks: Tensor,
                 config: RefineConfig) -> Tensor:
    """Loss of one timestep: tensors of N Gaussians; frames [V, 3, H, W]; cameras [V, ...]."""
    H, W = frames.shape[-2:]
    background = None
    if config.background is not None:
        background = torch.tensor(config.background, dtype=frames.dtype, device=frames.device)
    out = rasterize(**tensors, viewmats=viewmats, Ks=Ks, width=W, height=H,
                    background=background, backend=config.render_backend)
    rgb = out.rgb.permute(0, 3, 1, 2)  # [V, 3, H, W]
    mse = (rgb - frames).square().mean()
    return mse + config.ssim_weight * (1 - ssim(rgb, frames).mean())


def _prepare(gaussians_seq: GaussianSequence, frames, c2w, intr, device
             ) -> tuple[Tensor, Tensor, Tensor]:
    frames = torch.as_tensor(np.asarray(frames) if not isinstance(frames, Tensor) else frames)
    frames = frames.to(device=device, dtype=torch.float32)
    if frames.ndim != 5 or frames.shape[2] != 3:
        raise ValueError(f"frames must be [V, T, 3, H, W], got {list(frames.shape)}")
    V, T, _, H, W = frames.shape
    c2w = _as_tensor("c2w", c2w, (4, 4), device)
    intr = _as_tensor("intrinsics", intr, (6,), device)
    if tuple(c2w.shape[:2]) != (V, T) or tuple(intr.shape[:2]) != (V, T):
        raise ValueError(f"rig covers {list(c2w.shape[:2])} / {list(intr.shape[:2])} (V, T), "
                         f"frames {[V, T]}")
    if len(gaussians_seq) != T:
        raise ValueError(f"gaussians_seq has {len(gaussians_seq)} timesteps, frames have {T}")
    viewmats = c2w_to_viewmat(c2w.double()).float()  # [V, T, 4, 4]
    Ks = intrinsics_to_K(scale_intrinsics(intr, W, H))  # [V, T, 3, 3]
    return frames, viewmats, Ks


def sequence_photometric_loss(gaussians_seq: GaussianSequence, frames, c2w, intr,
                              config: RefineConfig | None = None, device="cpu") -> float:
    """The refinement objective (mean over timesteps) of a sequence, without optimising.

    frames: [V, T, 3, H, W]; c2w: [V, T, 4, 4]; intr: [V, T, 6].
    """
    config = config or RefineConfig()
    frames, viewmats, Ks = _prepare(gaussians_seq, frames, c2w, intr, device)
    with torch.no_grad():
        losses = [_photometric(_TimestepParams(g, device).activated(), frames[:, t],
                               viewmats[:, t], Ks[:, t], config)
                  for t, g in enumerate(gaussians_seq)]
    return float(torch.stack(losses).mean())


def refine(
    gaussians_seq: GaussianSequence,
    frames,  # [V, T, 3, H, W] in [0, 1], numpy or torch
    c2w,  # [V, T, 4, 4] OpenCV camera-to-world
    intr,  # [V, T, 6]
    steps: int,
    lr: float,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    config: RefineConfig | None = None,
    device: str | torch.device = "cpu",
) -> GaussianSequence:
    """Refine every timestep's Gaussians against the frames; see the module docstring.

    `progress(step, steps, loss)` is called after each step. When `should_cancel()` returns
    True the loop stops and the Gaussians refined so far are returned. With the default
    `RefineConfig` multipliers, lr = 0.1 is a good start (0.01 to 0.3 all converge on the
    test scenes).
    """
    if steps < 0 or not lr > 0:
        raise ValueError(f"need steps >= 0 and lr > 0, got steps={steps}, lr={lr}")
    config = config or RefineConfig()
    frames, viewmats, Ks = _prepare(gaussians_seq, frames, c2w, intr, device)
    params = [_TimestepParams(g, device) for g in gaussians_seq]
    optimizer = torch.optim.Adam([group for p in params for group in p.groups(lr, config)],
                                 eps=1e-15)
    for step in range(steps):
        if should_cancel is not None and should_cancel():
            break
        optimizer.zero_grad(set_to_none=True)
        loss = sum(_photometric(p.activated(), frames[:, t], viewmats[:, t], Ks[:, t], config)
                   for t, p in enumerate(params)) / len(params)
        loss.backward()
        optimizer.step()
        if progress is not None:
            progress(step + 1, steps, float(loss.detach()))
    return GaussianSequence([p.to_gaussians() for p in params],
                            list(gaussians_seq.frame_numbers))
