"""The aggregator: frame, global and temporal attention over a views x timesteps grid.

Every frame (v, t) becomes a token sequence: one camera token, `num_register_tokens`
register tokens, then its patch tokens (with a fixed 2D sinusoidal position code, plus the
patch-embedded Plucker rays of its camera when a rig is given). As in VGGT, view 0 gets its
own learned camera and register tokens so that it can anchor the reference frame, and the
other views share a second set. Each block runs:

    frame attention   (tokens of one frame)                     [B*V*T, N, D]
    temporal attention (one view, one token index, all T)        [B*V*N, T, D]
    global attention  (all views of one timestep)               [B*T, V*N, D]
    temporal attention                                           [B*V*N, T, D]

Temporal layers have a zero-initialised output projection, so at initialisation they are
the identity and the model reduces to a per-timestep VGGT-style aggregator.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from backend.recon.config import ReconConfig

RAY_CHANNELS = 6


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """Cut images into non-overlapping patches in row-major order."""
    *lead, C, H, W = images.shape  # images: [..., C, H, W]
    p = patch_size
    x = images.reshape(-1, C, H // p, p, W // p, p)  # [M, C, h, p, w, p]
    x = x.permute(0, 2, 4, 3, 5, 1)  # [M, h, w, p, p, C]
    return x.reshape(*lead, (H // p) * (W // p), p * p * C)  # [..., h*w, p*p*C]


def sinusoid(positions: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal codes of positions: [L] -> [L, dim] (dim even)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=positions.device) / half)
    angles = positions.float()[:, None] * freqs[None]  # [L, dim/2]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def position_codes_2d(h: int, w: int, dim: int, device: torch.device | str) -> Tensor:
    """Fixed 2D sinusoidal codes of an h x w patch grid: [h*w, dim]."""
    rows = sinusoid(torch.arange(h, device=device), dim // 2)  # [h, dim/2]
    cols = sinusoid(torch.arange(w, device=device), dim // 2)  # [w, dim/2]
    grid = torch.cat([rows[:, None].expand(h, w, -1), cols[None].expand(h, w, -1)], dim=-1)
    return grid.reshape(h * w, dim)


class Attention(nn.Module):
    """Multi-head self-attention with RMS qk-norm over [S, L, D] sequences."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        head_dim = width // num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        """x: [S, L, D] -> [S, L, D], attention within each of the S sequences."""
        S, L, D = x.shape
        qkv = self.qkv(x).reshape(S, L, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [S, nh, L, hd]
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(out.transpose(1, 2).reshape(S, L, D))


class TransformerBlock(nn.Module):
    """Pre-norm attention + GELU MLP over [S, L, D] sequences."""

    def __init__(self, width: int, num_heads: int, mlp_width: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, num_heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.fc1 = nn.Linear(width, mlp_width)
        self.fc2 = nn.Linear(mlp_width, width)

    def forward(self, x: Tensor) -> Tensor:
        """x: [S, L, D] -> [S, L, D]."""
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class TemporalAttention(nn.Module):
    """Residual attention across timesteps (same view, same token index), zero-initialised."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, num_heads)
        nn.init.zeros_(self.attn.proj.weight)
        nn.init.zeros_(self.attn.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, V, T, N, D] -> [B, V, T, N, D]."""
        B, V, T, N, D = x.shape
        seq = x.permute(0, 1, 3, 2, 4).reshape(B * V * N, T, D)  # [B*V*N, T, D]
        time_codes = sinusoid(torch.arange(T, device=x.device), D).to(x.dtype)  # [T, D]
        seq = seq + self.attn(self.norm(seq) + time_codes)
        return seq.reshape(B, V, N, T, D).permute(0, 1, 3, 2, 4)


class AggregatorBlock(nn.Module):
    """Frame attention, then global attention, each followed by optional temporal attention."""

    def __init__(self, config: ReconConfig):
        super().__init__()
        D, nh, hidden = config.width, config.num_heads, config.mlp_width
        self.frame = TransformerBlock(D, nh, hidden)
        self.glob = TransformerBlock(D, nh, hidden)
        self.frame_temporal = TemporalAttention(D, nh) if config.use_temporal_attention else None
        self.global_temporal = (TemporalAttention(D, nh) if config.use_temporal_attention
                                else None)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: [B, V, T, N, D] -> (frame output, global output), each [B, V, T, N, D]."""
        B, V, T, N, D = x.shape
        x = self.frame(x.reshape(B * V * T, N, D)).reshape(B, V, T, N, D)
        if self.frame_temporal is not None:
            x = self.frame_temporal(x)
        frame_out = x
        seq = x.permute(0, 2, 1, 3, 4).reshape(B * T, V * N, D)  # [B*T, V*N, D]
        x = self.glob(seq).reshape(B, T, V, N, D).permute(0, 2, 1, 3, 4)
        if self.global_temporal is not None:
            x = self.global_temporal(x)
        return frame_out, x


class Aggregator(nn.Module):
    """Tokens of a [B, V, T, C, H, W] grid through alternating attention blocks."""

    def __init__(self, config: ReconConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        D, p = config.width, config.patch_size
        self.patch_embed = nn.Linear(config.in_channels * p * p, D)
        self.ray_embed = nn.Linear(RAY_CHANNELS * p * p, D) if config.use_camera_rays else None
        # [2, 1 + R, D]: row 0 for view 0, row 1 shared by the other views
        self.special_tokens = nn.Parameter(torch.randn(2, config.tokens_per_frame_extra, D) * 0.02)
        self.blocks = nn.ModuleList(AggregatorBlock(config) for _ in range(config.depth))

    def embed(self, frames: Tensor, rays: Tensor | None) -> Tensor:
        """frames: [B, V, T, C, H, W]; rays: [B, V, T, 6, H, W] -> tokens [B, V, T, N, D]."""
        B, V, T, _, H, W = frames.shape
        p, D = self.config.patch_size, self.config.width
        patches = self.patch_embed(patchify(frames, p))  # [B, V, T, h*w, D]
        patches = patches + position_codes_2d(H // p, W // p, D, frames.device).to(patches.dtype)
        if rays is not None:
            if self.ray_embed is None:
                raise ValueError("this model was built without camera rays (use_camera_rays)")
            patches = patches + self.ray_embed(patchify(rays.to(patches.dtype), p))
        view_kind = (torch.arange(V, device=frames.device) > 0).long()  # [V]
        special = self.special_tokens[view_kind]  # [V, 1 + R, D]
        special = special[None, :, None].expand(B, V, T, -1, D).to(patches.dtype)
        return torch.cat([special, patches], dim=3)  # [B, V, T, N, D]

    def forward(self, frames: Tensor, rays: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
        """Features of the dense-head blocks and of the last block, each [B, V, T, N, 2D].

        Each block's frame-attention and global-attention outputs are concatenated, as in
        VGGT. frames: [B, V, T, C, H, W]; rays: [B, V, T, 6, H, W] Plucker rays or None.
        """
        x = self.embed(frames, rays)
        dense: dict[int, Tensor] = {}
        last = len(self.blocks) - 1
        for index, block in enumerate(self.blocks):
            if self.gradient_checkpointing and self.training:
                frame_out, x = checkpoint(block, x, use_reentrant=False)
            else:
                frame_out, x = block(x)
            if index in self.config.dense_layers or index == last:
                dense[index] = torch.cat([frame_out, x], dim=-1)
        return [dense[i] for i in self.config.dense_layers], dense[last]
