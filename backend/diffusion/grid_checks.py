"""Argument checks shared by the fused view-time attention kernels."""

from __future__ import annotations

import torch
from torch import Tensor


def require_positive_ints(**values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def grid_tokens_per_frame(
    q: Tensor,  # [B, nh, N, hd]
    k: Tensor,  # [B, nh, N, hd]
    v: Tensor,  # [B, nh, N, hd]
    num_views: int,
    num_steps: int,
) -> int:
    """Validate q, k, v against the grid and return P, the tokens per frame."""
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if tensor.dim() != 4:
            raise ValueError(f"{name} must be [B, nh, N, hd], got shape {tuple(tensor.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.device == k.device == v.device) or not (q.dtype == k.dtype == v.dtype):
        raise ValueError("q, k, v must share one device and dtype")
    require_positive_ints(num_views=num_views, num_steps=num_steps)
    n_tokens = q.shape[2]
    frames = num_views * num_steps
    if n_tokens == 0 or n_tokens % frames:
        raise ValueError(f"N={n_tokens} tokens is not a positive multiple of "
                         f"num_views*num_steps={frames}")
    if q.shape[3] == 0:
        raise ValueError("head dim hd must be positive")
    return n_tokens // frames


def needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
