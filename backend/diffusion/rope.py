"""3D rotary position embedding over a V x T grid read as one long video.

A token at view v, timestep t, patch row y and column x sits at position
(v*T_max + t, y, x); T_max >= T is a model constant, so a grid with fewer timesteps keeps the
positions it would have in a full-length grid. The hd/2 rotation pairs are split between the
axes: x and y get floor(hd/8) pairs each, the time axis the rest (half of them when hd is a
multiple of 8). Pairs are formed by the two halves of the head dim: channel i rotates with
channel i + hd/2. Within an axis with F pairs, pair j turns at frequency theta^(-j/F).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def rope_axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """Rotation pairs given to the (time, y, x) axes; they sum to head_dim // 2."""
    _check_positive_int("head_dim", head_dim)
    if head_dim % 2 or head_dim < 8:
        raise ValueError(f"head_dim must be even and >= 8 for 3D RoPE, got {head_dim}")
    pairs = head_dim // 2
    spatial = pairs // 4
    return pairs - 2 * spatial, spatial, spatial


def rope_3d_positions(
    num_views: int, num_steps: int, h: int, w: int, t_max: int, device=None,
) -> Tensor:  # [N, 3] int64, (v*T_max + t, y, x) per token in (v, t, y, x) order
    """Integer positions of the grid's tokens."""
    for name, value in (("num_views", num_views), ("num_steps", num_steps), ("h", h),
                        ("w", w), ("t_max", t_max)):
        _check_positive_int(name, value)
    if num_steps > t_max:
        raise ValueError(f"num_steps={num_steps} exceeds t_max={t_max}")
    v, t, y, x = torch.meshgrid(
        *(torch.arange(n, device=device) for n in (num_views, num_steps, h, w)), indexing="ij")
    return torch.stack([v * t_max + t, y, x], dim=-1).reshape(-1, 3)


def rope_angles_at(
    positions: Tensor,  # [N, 3] (time, y, x) positions, integer or real
    head_dim: int,
    theta: float = 10000.0,
) -> tuple[Tensor, Tensor]:  # cos, sin, each [N, hd//2] float32
    """cos and sin of the rotation angles at arbitrary 3D positions."""
    if positions.dim() != 2 or positions.shape[1] != 3:
        raise ValueError(f"positions must be [N, 3], got {tuple(positions.shape)}")
    if not theta > 0:
        raise ValueError(f"theta must be positive, got {theta}")
    angles = []
    for axis, pairs in enumerate(rope_axis_pairs(head_dim)):
        exponents = torch.arange(pairs, device=positions.device, dtype=torch.float64) / pairs
        inv_freq = theta ** -exponents  # [F]
        angles.append(positions[:, axis, None].double() * inv_freq)  # [N, F]
    angle = torch.cat(angles, dim=1)  # [N, hd//2]
    return angle.cos().float(), angle.sin().float()


@functools.lru_cache(maxsize=64)
def _grid_angles(num_views: int, num_steps: int, h: int, w: int, head_dim: int, t_max: int,
                 theta: float, device: str) -> tuple[Tensor, Tensor]:
    positions = rope_3d_positions(num_views, num_steps, h, w, t_max, device=device)  # [N, 3]
    return rope_angles_at(positions, head_dim, theta)


def rope_3d_angles(
    num_views: int, num_steps: int, h: int, w: int, head_dim: int, t_max: int,
    theta: float = 10000.0, device=None,
) -> tuple[Tensor, Tensor]:  # cos, sin, each [N, hd//2], N = V*T*h*w in (v, t, y, x) order
    """cos and sin of the grid's rotation angles, cached per shape and device.

    The returned tensors are shared between callers with the same arguments; do not modify
    them in place.
    """
    rope_axis_pairs(head_dim)
    device = str(torch.device("cpu" if device is None else device))
    return _grid_angles(num_views, num_steps, h, w, head_dim, t_max, float(theta), device)


def apply_rope(
    x: Tensor,  # [B, nh, N, hd]
    cos: Tensor,  # [N, hd//2]
    sin: Tensor,  # [N, hd//2]
) -> Tensor:  # [B, nh, N, hd], dtype of x
    """Rotate channel pairs (i, i + hd/2) of every token by its angles."""
    if x.dim() != 4:
        raise ValueError(f"x must be [B, nh, N, hd], got shape {tuple(x.shape)}")
    N, hd = x.shape[2], x.shape[3]
    if hd % 2:
        raise ValueError(f"head dim must be even, got {hd}")
    expected = (N, hd // 2)
    if tuple(cos.shape) != expected or tuple(sin.shape) != expected:
        raise ValueError(f"cos and sin must be [N, hd//2] = {list(expected)}, got "
                         f"{list(cos.shape)} and {list(sin.shape)}")
    compute = torch.promote_types(x.dtype, torch.float32)
    cos, sin = cos.to(device=x.device, dtype=compute), sin.to(device=x.device, dtype=compute)
    first, second = x.to(compute).chunk(2, dim=-1)  # each [B, nh, N, hd//2]
    rotated = torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)
    return rotated.to(x.dtype)
