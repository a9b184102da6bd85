"""Adaptive density control of 3DGS: clone small and split large Gaussians whose view-space
positional gradient is high, prune transparent and oversized ones, keep the count under a cap.

The CPU kernels return gradients for world-space means; the view-space gradient of a
Gaussian seen at depth z by a camera of focal length f is about |dL/dmean| * z / f per pixel
(the projection's Jacobian), in normalised image units (x width / 2) as in 3DGS, and per
image (the step's loss averages its images).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from backend.fit.state import SCALE_FLOOR, FitGaussians, inverse_sigmoid, quat_to_matrix

SPLIT_COUNT = 2
SPLIT_SHRINK = 1.6


@dataclass
class GradientStats:
    """Running view-space gradient norms per Gaussian."""

    total: Tensor = field(default_factory=lambda: torch.zeros(0))  # [N]
    count: Tensor = field(default_factory=lambda: torch.zeros(0))  # [N]

    def reset(self, n: int, device: torch.device | str = "cpu") -> None:
        self.total = torch.zeros(n, device=device)
        self.count = torch.zeros(n, device=device)

    def add(self, grad: Tensor, means: Tensor, viewmats: Tensor, Ks: Tensor,
            width: int) -> None:
        """grad/means [N, 3] world; viewmats [C, 4, 4], Ks [C, 3, 3] of the step's cameras."""
        if len(self.total) != len(means):
            self.reset(len(means), means.device)
        with torch.no_grad():
            z = (means @ viewmats[:, 2, :3].T + viewmats[:, 2, 3]).clamp(min=1e-6)  # [N, C]
            pixels = (z / Ks[:, 0, 0]).mean(dim=1)  # world units per pixel
            view_grad = grad.norm(dim=-1) * pixels * (width / 2.0) * len(viewmats)
            seen = grad.abs().sum(dim=-1) > 0
            self.total += view_grad * seen
            self.count += seen.float()

    def mean(self) -> Tensor:
        return self.total / self.count.clamp(min=1)


def densify_and_prune(g: FitGaussians, stats: GradientStats, grad_threshold: float,
                      split_size: float, prune_opacity: float, max_size: float,
                      max_count: int, generator: torch.Generator) -> dict[str, int]:
    """One round of density control on every timestep at once; returns what it did."""
    with torch.no_grad():
        n = len(g)
        device = g.log_scales.device
        grads = stats.mean() if len(stats.total) == n else torch.zeros(n, device=device)
        scales = torch.exp(g.log_scales)
        largest = scales.max(dim=-1).values
        chosen = grads > grad_threshold
        room = max(max_count - n, 0)
        if int(chosen.sum()) > room // SPLIT_COUNT:  # the highest gradients first
            order = torch.argsort(grads, descending=True)[:room // SPLIT_COUNT]
            chosen = torch.zeros(n, dtype=torch.bool, device=device)
            chosen[order] = True
        clone = chosen & (largest <= split_size)
        split = chosen & (largest > split_size)
        _clone(g, clone)
        _split(g, _padded(split, len(g)), generator)
        opacity = torch.sigmoid(g.opacity_logits)
        largest = torch.exp(g.log_scales).max(dim=-1).values
        keep = (opacity >= prune_opacity) & (largest <= max_size)
        keep[:n] &= ~split  # a split Gaussian is replaced by its two halves
        pruned = int((~keep[:n]).sum()) - int(split.sum())
        g.select(keep)
        stats.reset(len(g), device)
    return {"cloned": int(clone.sum()), "split": int(split.sum()), "pruned": pruned,
            "count": len(g)}


def _padded(mask: Tensor, n: int) -> Tensor:
    """`mask` extended with False to length n (Gaussians appended since it was made)."""
    return torch.cat([mask, torch.zeros(n - len(mask), dtype=torch.bool, device=mask.device)])


def _clone(g: FitGaussians, mask: Tensor) -> None:
    if not mask.any():
        return
    g.append([m[mask] for m in g.means], [q[mask] for q in g.quats], g.log_scales[mask],
             g.opacity_logits[mask], g.sh0[mask], g.filter_var[mask], g.ground[mask])


def _split(g: FitGaussians, mask: Tensor, generator: torch.Generator) -> None:
    """Each masked Gaussian -> SPLIT_COUNT samples of itself, SPLIT_SHRINK times smaller."""
    if not mask.any():
        return
    scales = torch.exp(g.log_scales[mask]).repeat(SPLIT_COUNT, 1)  # [M*2, 3]
    local = torch.randn(scales.shape, generator=generator).to(scales.device) * scales
    means, quats = [], []
    for m, q in zip(g.means, g.quats, strict=True):  # the same child at every timestep
        rot = quat_to_matrix(q[mask]).repeat(SPLIT_COUNT, 1, 1)
        means.append(m[mask].repeat(SPLIT_COUNT, 1) + (rot @ local[..., None])[..., 0])
        quats.append(q[mask].repeat(SPLIT_COUNT, 1))
    log_scales = torch.log((scales / SPLIT_SHRINK).clamp(min=SCALE_FLOOR))
    g.append(means, quats, log_scales, g.opacity_logits[mask].repeat(SPLIT_COUNT),
             g.sh0[mask].repeat(SPLIT_COUNT, 1), g.filter_var[mask].repeat(SPLIT_COUNT),
             g.ground[mask].repeat(SPLIT_COUNT))


def reset_opacity(g: FitGaussians, ceiling: float = 0.01, spare: Tensor | None = None
                  ) -> None:
    """3DGS's opacity reset: every opacity at most `ceiling`, so floaters must re-earn it
    (those in the `spare` [N] mask are left as they are)."""
    with torch.no_grad():
        ceiling_logit = inverse_sigmoid(torch.tensor(ceiling, device=g.opacity_logits.device))
        capped = torch.minimum(g.opacity_logits, ceiling_logit)
        if spare is not None:
            capped = torch.where(spare, g.opacity_logits, capped)
        g.opacity_logits = capped.clone().requires_grad_()
