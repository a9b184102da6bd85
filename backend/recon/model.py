"""The feed-forward 4D reconstruction model: a V x T grid of frames -> Gaussians per timestep.

Aggregator (frame / global / temporal attention) -> camera head on the camera tokens and a
DPT-style dense head on 4 intermediate layers. The dense head predicts, per pixel, depth
(`depth_activation`, see ReconConfig) and 14 Gaussian channels with Splatt3r-style
activations:

    offset   (3)  dir(x) * (exp(|x| - 6) - exp(-6)), in camera axes, rotated to world
    opacity  (1)  sigmoid(x + opacity_bias)
    scale    (3)  exp(x + scale_bias) * pixel footprint (depth / focal)
    rotation (4)  normalise(x + (1, 0, 0, 0)), in camera axes, composed with the camera's
    colour   (3)  pixel colour + x

Centre = unprojected depth through the camera + offset. With a rig given, the rig's own
camera of each (v, t) is used (so an animated rig is followed exactly) and the Gaussians are
in the rig's world frame; without one, the predicted cameras are used and the world frame is
that of the reference camera (view 0, timestep 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from backend.cameras import plucker_rays, scale_intrinsics, unproject_depth
from backend.checkpoint import PretrainedModel
from backend.gaussians import GaussianSequence
from backend.recon.aggregator import Aggregator
from backend.recon.config import ReconConfig
from backend.recon.heads import (
    CameraHead,
    DenseHead,
    matrix_to_quaternion,
    pose_encoding_to_camera,
)
from backend.recon.splats import GaussianBatch, check_camera_grid

GAUSSIAN_CHANNELS = 14
OFFSET_SHIFT = 6.0


def offset_activation(x: Tensor) -> Tensor:
    """dir(x) * (exp(|x| - 6) - exp(-6)) over the last axis: [..., 3] -> [..., 3]."""
    norm = x.norm(dim=-1, keepdim=True)
    magnitude = torch.exp(norm - OFFSET_SHIFT) - math.exp(-OFFSET_SHIFT)
    return x / norm.clamp(min=1e-12) * magnitude


def depth_activation(x: Tensor, config: ReconConfig) -> Tensor:
    """depth_scale * exp(r * tanh(x / r)), r = depth_log_range: [...] -> [...] positive."""
    r = config.depth_log_range
    return config.depth_scale * torch.exp(r * torch.tanh(x / r))


def quaternion_multiply(a: Tensor, b: Tensor) -> Tensor:
    """Hamilton product of (w, x, y, z) quaternions: [..., 4] x [..., 4] -> [..., 4]."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([aw * bw - ax * bx - ay * by - az * bz,
                        aw * bx + ax * bw + ay * bz - az * by,
                        aw * by - ax * bz + ay * bw + az * bx,
                        aw * bz + ax * by - ay * bx + az * bw], dim=-1)


def assemble_gaussians(
    depth: Tensor,  # [B, V, T, H, W] z-depth
    raw: Tensor,  # [B, V, T, 14, H, W] pre-activation Gaussian channels
    frames: Tensor,  # [B, V, T, 3, H, W]
    c2w: Tensor,  # [B, V, T, 4, 4]
    intr: Tensor,  # [B, V, T, 6]
    config: ReconConfig,
) -> GaussianBatch:
    """Pixel-aligned Gaussians in world space; see the module docstring for the activations."""
    B, V, T, H, W = depth.shape
    raw = raw.movedim(3, -1)  # [B, V, T, H, W, 14]
    rot = c2w[..., None, None, :3, :3]  # [B, V, T, 1, 1, 3, 3]
    offsets = (rot @ offset_activation(raw[..., 0:3])[..., None])[..., 0]
    means = unproject_depth(depth, c2w, intr) + offsets  # [B, V, T, H, W, 3]
    opacities = torch.sigmoid(raw[..., 3] + config.opacity_bias)
    scaled = scale_intrinsics(intr, W, H)
    focal = torch.sqrt(scaled[..., 0] * scaled[..., 1])[..., None, None]  # [B, V, T, 1, 1]
    footprint = (depth / focal)[..., None]  # [B, V, T, H, W, 1]
    scales = torch.exp(raw[..., 4:7] + config.scale_bias) * footprint
    identity = raw.new_tensor([1.0, 0.0, 0.0, 0.0])
    local_quats = F.normalize(raw[..., 7:11] + identity, dim=-1)
    camera_quats = matrix_to_quaternion(c2w[..., :3, :3])[..., None, None, :]
    quats = F.normalize(quaternion_multiply(camera_quats, local_quats), dim=-1)
    colors = frames.movedim(3, -1) + raw[..., 11:14]

    def per_timestep(x: Tensor) -> Tensor:  # [B, V, T, H, W, k] -> [B, T, V*H*W, k]
        return x.permute(0, 2, 1, 3, 4, 5).reshape(B, T, V * H * W, x.shape[-1])

    return GaussianBatch(means=per_timestep(means), quats=per_timestep(quats),
                         scales=per_timestep(scales),
                         opacities=per_timestep(opacities[..., None])[..., 0],
                         colors=per_timestep(colors))


@dataclass
class ReconOutput:
    gaussians: GaussianBatch  # [B, T, V*H*W, ...]
    depth: Tensor  # [B, V, T, H, W] z-depth used for the centres
    pose_encoding: Tensor  # [B, V, T, 9] camera head output (see heads.py)
    pred_c2w: Tensor  # [B, V, T, 4, 4] predicted cameras, reference-camera frame
    pred_intr: Tensor  # [B, V, T, 6]
    c2w: Tensor  # [B, V, T, 4, 4] cameras the Gaussians were placed with
    intr: Tensor  # [B, V, T, 6]


class ReconModel(PretrainedModel):
    """Feed-forward reconstruction of a [B, V, T, 3, H, W] grid; see the module docstring."""

    config_class = ReconConfig

    def __init__(self, config: ReconConfig):
        super().__init__()
        self.config = config
        self.aggregator = Aggregator(config)
        self.camera_head = CameraHead(2 * config.width, config.width)
        self.dense_head = DenseHead(2 * config.width, config.head_features,
                                    1 + GAUSSIAN_CHANNELS, config.in_channels,
                                    config.head_init_std)

    def _check_inputs(self, frames: Tensor, c2w: Tensor | None, intr: Tensor | None,
                      known_depth: Tensor | None) -> None:
        cfg = self.config
        if frames.ndim != 6:
            raise ValueError(f"frames must be [B, V, T, C, H, W], got {list(frames.shape)}")
        B, V, T, C, H, W = frames.shape
        if cfg.in_channels != C:
            raise ValueError(f"frames have {C} channels, the model expects {cfg.in_channels}")
        if H % cfg.patch_size or W % cfg.patch_size or min(B, V, T, H, W) < 1:
            raise ValueError(f"frame size {H}x{W} must be positive and divisible by "
                             f"patch_size {cfg.patch_size}")
        if not torch.isfinite(frames).all():
            raise ValueError("frames contain NaN or infinite values")
        if (c2w is None) != (intr is None):
            raise ValueError("pass both c2w and intrinsics, or neither")
        if c2w is not None and check_camera_grid(c2w, intr) != (B, V, T):
            raise ValueError(f"rig covers {list(c2w.shape[:3])} (B, V, T), frames {[B, V, T]}")
        if known_depth is not None:
            if tuple(known_depth.shape) != (B, V, T, H, W):
                raise ValueError(f"known_depth must be {[B, V, T, H, W]}, "
                                 f"got {list(known_depth.shape)}")
            if not (torch.isfinite(known_depth).all() and (known_depth > 0).all()):
                raise ValueError("known_depth must be finite and positive")

    def forward(self, frames: Tensor, c2w: Tensor | None = None, intr: Tensor | None = None,
                known_depth: Tensor | None = None) -> ReconOutput:
        """Gaussians of every timestep from frames [B, V, T, 3, H, W] in [0, 1].

        c2w: [B, V, T, 4, 4] OpenCV camera-to-world and intr: [B, V, T, 6] of the rig, or
        None to use the predicted cameras. known_depth: [B, V, T, H, W] z-depth (e.g. a
        renderer's depth pass) used instead of the predicted depth.
        """
        self._check_inputs(frames, c2w, intr, known_depth)
        cfg = self.config
        B, V, T, C, H, W = frames.shape
        if c2w is not None:
            c2w, intr = c2w.to(frames), intr.to(frames)
        rays = None
        if c2w is not None and cfg.use_camera_rays:
            rays = plucker_rays(c2w, intr, H, W)  # [B, V, T, 6, H, W]
        dense_layers, last = self.aggregator(frames, rays)  # each [B, V, T, N, 2D]
        camera_tokens = last[..., 0, :]  # [B, V, T, 2D]
        if cfg.camera_token_replacement:  # every (v, t) takes the token of (v, 0)
            pose_encoding = self.camera_head(camera_tokens[:, :, :1]).expand(B, V, T, -1)
        else:
            pose_encoding = self.camera_head(camera_tokens)  # [B, V, T, 9]
        pred_c2w, pred_intr = pose_encoding_to_camera(pose_encoding, H, W)
        patches = [x[..., cfg.tokens_per_frame_extra:, :].reshape(B * V * T, -1, x.shape[-1])
                   for x in dense_layers]  # 4 x [B*V*T, h*w, 2D]
        maps = self.dense_head(patches, frames.reshape(B * V * T, C, H, W),
                               (H // cfg.patch_size, W // cfg.patch_size))
        maps = maps.reshape(B, V, T, 1 + GAUSSIAN_CHANNELS, H, W)
        depth = depth_activation(maps[:, :, :, 0], cfg)  # [B, V, T, H, W]
        if known_depth is not None:
            depth = known_depth.to(frames)
        if c2w is None:
            c2w, intr = pred_c2w, pred_intr
        gaussians = assemble_gaussians(depth, maps[:, :, :, 1:], frames, c2w, intr, cfg)
        return ReconOutput(gaussians=gaussians, depth=depth, pose_encoding=pose_encoding,
                           pred_c2w=pred_c2w, pred_intr=pred_intr, c2w=c2w, intr=intr)

    @torch.no_grad()
    def reconstruct(self, frames, c2w=None, intr=None, min_opacity: float = 0.0,
                    frame_numbers: list[int] | None = None) -> GaussianSequence:
        """One grid (numpy or torch) to a `GaussianSequence`, without gradients.

        frames: [V, T, 3, H, W] in [0, 1]; c2w: [V, T, 4, 4]; intr: [V, T, 6]. Gaussians with
        opacity below `min_opacity` are dropped.
        """
        device = next(self.parameters()).device

        def batched(x):  # [...] -> [1, ...] float32 tensor on the model's device
            if x is None:
                return None
            x = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
            return x.to(device=device, dtype=torch.float32)[None]

        out = self(batched(frames), batched(c2w), batched(intr))
        return out.gaussians.to_sequence(0, min_opacity, frame_numbers)
