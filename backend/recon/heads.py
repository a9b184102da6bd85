"""Prediction heads: the camera head (camera token -> pose) and the DPT-style dense head.

Pose encoding, 9 numbers per camera: translation (3) and unit quaternion (w, x, y, z) of the
camera-to-world transform relative to the reference camera (view 0 at timestep 0, OpenCV
axes), then log(fx / W) and log(fy / H). The principal point is the image centre.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

POSE_ENCODING_SIZE = 9
IDENTITY_POSE = (0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0)


def quaternion_to_matrix(quats: Tensor) -> Tensor:
    """Unit (w, x, y, z) quaternions to rotation matrices: [..., 4] -> [..., 3, 3]."""
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    rows = [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]
    return torch.stack(rows, dim=-1).reshape(*quats.shape[:-1], 3, 3)


def matrix_to_quaternion(rot: Tensor) -> Tensor:
    """Rotation matrices to unit (w, x, y, z) quaternions with w >= 0: [..., 3, 3] -> [..., 4].

    Of the four algebraically equal formulas, each element uses the one whose divisor
    (twice the largest of |w|, |x|, |y|, |z|) is largest, which keeps it accurate.
    """
    m = rot.reshape(*rot.shape[:-2], 9).unbind(-1)
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = m
    four_sq = torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22,
                           1 - m00 + m11 - m22, 1 - m00 - m11 + m22], dim=-1)  # 4 q_i^2
    two_abs = torch.sqrt(four_sq.clamp(min=1e-12))  # [..., 4] = 2 |q_i|
    candidates = torch.stack([
        torch.stack([four_sq[..., 0], m21 - m12, m02 - m20, m10 - m01], dim=-1),
        torch.stack([m21 - m12, four_sq[..., 1], m01 + m10, m02 + m20], dim=-1),
        torch.stack([m02 - m20, m01 + m10, four_sq[..., 2], m12 + m21], dim=-1),
        torch.stack([m10 - m01, m02 + m20, m12 + m21, four_sq[..., 3]], dim=-1),
    ], dim=-2) / (2 * two_abs[..., None])  # [..., 4 candidates, 4]
    best = four_sq.argmax(dim=-1)  # [...]
    quats = torch.gather(candidates, -2, best[..., None, None].expand(*best.shape, 1, 4))[..., 0, :]
    quats = F.normalize(quats, dim=-1)
    return torch.where(quats[..., :1] < 0, -quats, quats)


def relative_to_reference(c2w: Tensor) -> Tensor:
    """Express a rig in the frame of its reference camera (view 0, timestep 0).

    c2w: [B, V, T, 4, 4] -> [B, V, T, 4, 4].
    """
    reference = torch.linalg.inv(c2w[:, :1, :1])  # [B, 1, 1, 4, 4]
    return reference @ c2w


def camera_to_pose_encoding(
    c2w: Tensor,  # [..., 4, 4] already relative to the reference camera
    intr: Tensor,  # [..., 6]
) -> Tensor:  # [..., 9]
    """Pose encoding of cameras; see the module docstring."""
    focal = torch.log(intr[..., 0:2] / intr[..., 4:6])  # [..., 2]
    return torch.cat([c2w[..., :3, 3], matrix_to_quaternion(c2w[..., :3, :3]), focal], dim=-1)


def pose_encoding_to_camera(
    encoding: Tensor,  # [..., 9]
    height: int,
    width: int,
) -> tuple[Tensor, Tensor]:  # c2w [..., 4, 4], intrinsics [..., 6]
    """Cameras from pose encodings, for images of `height` x `width` pixels."""
    lead = encoding.shape[:-1]
    c2w = torch.zeros(*lead, 4, 4, dtype=encoding.dtype, device=encoding.device)
    c2w[..., :3, :3] = quaternion_to_matrix(encoding[..., 3:7])
    c2w[..., :3, 3] = encoding[..., :3]
    c2w[..., 3, 3] = 1.0
    size = encoding.new_tensor([width, height])  # [2]
    focal = torch.exp(encoding[..., 7:9]) * size  # [..., 2]
    centre = (0.5 * size).expand(*lead, 2)
    intr = torch.cat([focal, centre, size.expand(*lead, 2)], dim=-1)
    return c2w, intr


class CameraHead(nn.Module):
    """Camera token [..., 2D] -> pose encoding [..., 9]; starts near the identity camera."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim, eps=1e-6)
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, POSE_ENCODING_SIZE)
        nn.init.normal_(self.fc2.weight, std=0.02)
        with torch.no_grad():
            self.fc2.bias.copy_(torch.tensor(IDENTITY_POSE))

    def forward(self, camera_tokens: Tensor) -> Tensor:
        """camera_tokens: [..., 2D] -> [..., 9]."""
        return self.fc2(F.gelu(self.fc1(self.norm(camera_tokens)), approximate="tanh"))


class ResidualConvUnit(nn.Module):
    """Two 3x3 convolutions with a skip connection: [M, F, h, w] -> [M, F, h, w]."""

    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """Merge a coarser path with a skip feature map, refine, resize to the next level."""

    def __init__(self, features: int, has_skip: bool):
        super().__init__()
        self.skip_unit = ResidualConvUnit(features) if has_skip else None
        self.unit = ResidualConvUnit(features)
        self.out = nn.Conv2d(features, features, 1)

    def forward(self, x: Tensor, skip: Tensor | None, size: tuple[int, int]) -> Tensor:
        """x, skip: [M, F, h, w] -> [M, F, size]."""
        if self.skip_unit is not None and skip is not None:
            x = x + self.skip_unit(skip)
        x = F.interpolate(self.unit(x), size=size, mode="bilinear", align_corners=False)
        return self.out(x)


class DenseHead(nn.Module):
    """DPT-style head: 4 token maps at 4 scales, fused coarse to fine, out at full resolution.

    The token maps of the 4 layers are resampled to 4x, 2x, 1x and 1/2x the patch grid,
    fused from the coarsest up, then upsampled to the image size, where the input frame is
    concatenated so the per-pixel outputs can follow image edges.
    """

    def __init__(self, in_dim: int, features: int, out_channels: int, image_channels: int,
                 init_std: float):
        super().__init__()
        widths = (features, 2 * features, 4 * features, 4 * features)
        self.norm = nn.LayerNorm(in_dim, eps=1e-6)
        self.projects = nn.ModuleList(nn.Conv2d(in_dim, c, 1) for c in widths)
        self.resamples = nn.ModuleList([
            nn.ConvTranspose2d(widths[0], widths[0], 4, stride=4),
            nn.ConvTranspose2d(widths[1], widths[1], 2, stride=2),
            nn.Identity(),
            nn.Conv2d(widths[3], widths[3], 3, stride=2, padding=1)])
        self.to_features = nn.ModuleList(
            nn.Conv2d(c, features, 3, padding=1, bias=False) for c in widths)
        self.fusions = nn.ModuleList(FusionBlock(features, has_skip=i > 0) for i in range(4))
        self.neck = nn.Conv2d(features, features // 2, 3, padding=1)
        hidden = max(32, features // 4)
        self.out1 = nn.Conv2d(features // 2 + image_channels, hidden, 3, padding=1)
        self.out2 = nn.Conv2d(hidden, out_channels, 1)
        nn.init.normal_(self.out2.weight, std=init_std)
        nn.init.zeros_(self.out2.bias)

    def forward(self, layers: list[Tensor], images: Tensor, patch_grid: tuple[int, int]
                ) -> Tensor:
        """layers: 4 x [M, h*w, 2D] patch tokens; images: [M, C, H, W] -> [M, out, H, W]."""
        h, w = patch_grid
        maps = []
        for tokens, project, resample, to_features in zip(
                layers, self.projects, self.resamples, self.to_features):
            x = self.norm(tokens).transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
            maps.append(to_features(resample(project(x))))  # [M, F, h_i, w_i]
        sizes = [m.shape[-2:] for m in maps]  # finest (4x) to coarsest (1/2x)
        x = self.fusions[0](maps[3], None, sizes[2])
        x = self.fusions[1](x, maps[2], sizes[1])
        x = self.fusions[2](x, maps[1], sizes[0])
        x = self.fusions[3](x, maps[0], (2 * sizes[0][0], 2 * sizes[0][1]))
        x = F.interpolate(self.neck(x), size=images.shape[-2:], mode="bilinear",
                          align_corners=False)
        x = torch.cat([x, images.to(x.dtype)], dim=1)
        return self.out2(F.relu(self.out1(x)))
