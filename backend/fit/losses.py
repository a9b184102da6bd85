"""Losses of the fitting stage: the photometric loss of 3DGS (L1 + D-SSIM) and the
local-rigidity, rotation-similarity and isometry losses of Dynamic 3D Gaussians (Luiten et
al., 2024) over each Gaussian's nearest neighbours."""

from __future__ import annotations

import torch
from torch import Tensor

from backend.fit.state import quat_conjugate, quat_multiply, quat_to_matrix
from backend.recon.losses import ssim

KNN_CHUNK = 1024


def photometric(rendered: Tensor, target: Tensor, weights: Tensor, ssim_weight: float
                ) -> Tensor:
    """(1 - l) L1 + l (1 - SSIM) per image, weighted: rendered/target [C, 3, H, W],
    weights [C]. Returns the weighted mean over the images."""
    l1 = (rendered - target).abs().mean(dim=(1, 2, 3))
    loss = (1 - ssim_weight) * l1
    if ssim_weight > 0:
        loss = loss + ssim_weight * (1 - ssim(rendered, target))
    return (loss * weights).sum() / weights.sum().clamp(min=1e-12)


def nearest_neighbours(points: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """points [N, 3] -> indices [N, k] of the k nearest other points and their distances."""
    k = min(k, len(points) - 1)
    if k < 1:
        return (torch.zeros(len(points), 0, dtype=torch.long, device=points.device),
                torch.zeros(len(points), 0, device=points.device))
    indices, distances = [], []
    for start in range(0, len(points), KNN_CHUNK):
        d = torch.cdist(points[start:start + KNN_CHUNK], points)
        rows = torch.arange(d.shape[0], device=points.device)
        d[rows, rows + start] = float("inf")
        value, index = d.topk(k, dim=1, largest=False)
        indices.append(index)
        distances.append(value)
    return torch.cat(indices), torch.cat(distances)


def neighbour_weights(distances: Tensor) -> Tensor:
    """exp(-lambda d^2), lambda set by the typical neighbour distance: [N, k]."""
    scale = distances.median().clamp(min=1e-12)
    return torch.exp(-0.5 * (distances / scale) ** 2)


def rigidity_losses(means: Tensor, quats: Tensor, prev_means: Tensor, prev_quats: Tensor,
                    first_means: Tensor, neighbours: Tensor, weights: Tensor
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Local rigidity, rotation similarity and isometry of timestep t against t-1 (and the
    first timestep, for isometry). means/prev_means/first_means [N, 3], quats/prev_quats
    [N, 4], neighbours [N, k], weights [N, k]. All three are zero for a rigid motion."""
    if neighbours.shape[1] == 0:
        zero = means.sum() * 0
        return zero, zero, zero
    qn = torch.nn.functional.normalize(quats, dim=-1)
    pn = torch.nn.functional.normalize(prev_quats, dim=-1)
    relative = quat_multiply(qn, quat_conjugate(pn))  # [N, 4] rotation from t-1 to t
    rot = quat_to_matrix(relative)  # [N, 3, 3]
    offset = means[neighbours] - means[:, None]  # [N, k, 3]
    prev_offset = prev_means[neighbours] - prev_means[:, None]
    carried = torch.einsum("nij,nkj->nki", rot, prev_offset)
    rigidity = (weights * (offset - carried).norm(dim=-1)).mean()
    rel_n = relative[neighbours]  # [N, k, 4]
    sign = torch.sign((rel_n * relative[:, None]).sum(-1, keepdim=True)).clamp(min=0) * 2 - 1
    rotation = (weights * (rel_n * sign - relative[:, None]).norm(dim=-1)).mean()
    first_offset = first_means[neighbours] - first_means[:, None]
    isometry = (weights * (offset.norm(dim=-1) - first_offset.norm(dim=-1)).abs()).mean()
    return rigidity, rotation, isometry
