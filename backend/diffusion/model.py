"""The 4D video diffusion transformer: a DiT over a views x timesteps grid of frames.

Tokens are patches of every grid cell, flattened in (v, t, y, x) order. Given cells are
conditioned by adding their patch-embedded frames (and a learned "given" embedding) to the
noisy tokens of those cells; Plucker camera rays are patch-embedded and added the same way.
Each block is pre-norm with AdaLN-zero modulation from the diffusion time, self-attention
with RMS qk-norm and 3D RoPE over the grid, optional cross-attention to a context, and a
GELU MLP. The network predicts the rectified-flow velocity `eps - z`.

With `conv_channels` > 0 a convolutional hourglass (`ConvHourglass`) wraps the transformer:
a per-frame conv stem over every per-pixel input adds its patch features to the tokens, and
a conv head refines the output at full resolution from the final tokens and the stem's
features, so local detail comes from convolutions and the transformer works on patches.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from backend.checkpoint import PretrainedModel
from backend.diffusion.attention import (
    full_attention,
    fused_view_time_attention,
    time_attention,
    view_attention,
)
from backend.diffusion.cache import CACHE_CHANNELS_EXTRA
from backend.diffusion.config import DiffusionConfig
from backend.diffusion.rope import apply_rope, rope_3d_angles

RAY_CHANNELS = 6
TIME_FREQUENCIES = 256


def patchify(frames: Tensor, patch_size: int) -> Tensor:
    """Cut every frame of a grid into patches, tokens in (v, t, y, x) order."""
    B, V, T, C, H, W = frames.shape  # frames: [B, V, T, C, H, W]
    p = patch_size
    x = frames.reshape(B, V, T, C, H // p, p, W // p, p)
    x = x.permute(0, 1, 2, 4, 6, 3, 5, 7)  # [B, V, T, h, w, C, p, p]
    return x.reshape(B, V * T * (H // p) * (W // p), C * p * p)  # [B, N, C*p*p]


def unpatchify(tokens: Tensor, num_views: int, num_steps: int, height: int, width: int,
               patch_size: int) -> Tensor:
    """Inverse of `patchify`: [B, N, C*p*p] tokens back to a [B, V, T, C, H, W] grid."""
    p = patch_size
    B, _, D = tokens.shape  # tokens: [B, N, C*p*p]
    C = D // (p * p)
    x = tokens.reshape(B, num_views, num_steps, height // p, width // p, C, p, p)
    x = x.permute(0, 1, 2, 5, 3, 6, 4, 7)  # [B, V, T, C, h, p, w, p]
    return x.reshape(B, num_views, num_steps, C, height, width)


def timestep_embedding(s: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of diffusion time s in [0, 1] (scaled by 1000): [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=s.device) / half)
    angles = 1000.0 * s.float()[:, None] * freqs[None]  # [B, dim/2]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # [B, dim]


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """AdaLN: x [B, N, D] scaled and shifted per sample by shift, scale [B, D]."""
    return x * (1 + scale[:, None]) + shift[:, None]


class SelfAttention(nn.Module):
    """Multi-head self-attention with RMS qk-norm, 3D RoPE and a grid attention pattern.

    pattern: "fused" (same view or same timestep), "view" (same view), "time" (same
    timestep) or "full" (every token).
    """

    def __init__(self, width: int, num_heads: int, pattern: str, impl: str = "auto"):
        super().__init__()
        self.num_heads = num_heads
        self.pattern = pattern
        self.impl = impl
        head_dim = width // num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.proj = nn.Linear(width, width)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, num_views: int, num_steps: int) -> Tensor:
        """q, k, v: [B, nh, N, hd] -> [B, nh, N, hd] under this layer's pattern."""
        if self.pattern == "fused":
            return fused_view_time_attention(q, k, v, num_views, num_steps, impl=self.impl)
        if self.pattern == "view":
            return view_attention(q, k, v, num_views, num_steps)
        if self.pattern == "time":
            return time_attention(q, k, v, num_views, num_steps)
        return full_attention(q, k, v)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, num_views: int,
                num_steps: int) -> Tensor:
        """x: [B, N, D]; cos, sin: [N, hd/2] -> [B, N, D]."""
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, nh, N, hd]
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        out = self.attend(q, k, v, num_views, num_steps)  # [B, nh, N, hd]
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class CrossAttention(nn.Module):
    """Attention from grid tokens to a context sequence (e.g. text), with RMS qk-norm."""

    def __init__(self, width: int, context_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        head_dim = width // num_heads
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(context_dim, 2 * width)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """x: [B, N, D]; context: [B, L, Dc] -> [B, N, D]."""
        B, N, D = x.shape
        L = context.shape[1]
        hd = D // self.num_heads
        q = self.q(self.norm(x)).reshape(B, N, self.num_heads, hd).transpose(1, 2)  # [B,nh,N,hd]
        kv = self.kv(context).reshape(B, L, 2, self.num_heads, hd)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, nh, L, hd]
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    """Two-layer GELU MLP: [..., D] -> [..., D]."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VideoDiTBlock(nn.Module):
    """One transformer block; the self-attention layout follows `config.attention`.

    fused / full: one attention sub-layer. sequential: a view-attention sub-layer then a
    time-attention sub-layer, each with its own weights and modulation. parallel: view and
    time attention read the same normalised input and their outputs are summed.
    """

    def __init__(self, config: DiffusionConfig):
        super().__init__()
        D, nh, impl = config.width, config.num_heads, config.attention_impl
        self.layout = config.attention
        patterns = {"fused": ["fused"], "full": ["full"], "sequential": ["view", "time"],
                    "parallel": ["view", "time"]}[config.attention]
        self.attentions = nn.ModuleList(SelfAttention(D, nh, p, impl) for p in patterns)
        attention_sublayers = 2 if config.attention == "sequential" else 1
        self.num_modulations = 3 * (attention_sublayers + 1)
        self.norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(D, self.num_modulations * D))
        self.cross = (CrossAttention(D, config.context_dim, nh)
                      if config.cross_attention else None)
        self.mlp = Mlp(D, config.mlp_width)

    def forward(self, x: Tensor, time_emb: Tensor, cos: Tensor, sin: Tensor, num_views: int,
                num_steps: int, context: Tensor | None) -> Tensor:
        """x: [B, N, D]; time_emb: [B, D]; cos, sin: [N, hd/2]; context: [B, L, Dc]."""
        mods = self.adaln(time_emb).chunk(self.num_modulations, dim=-1)  # each [B, D]
        grid = (cos, sin, num_views, num_steps)
        if self.layout == "sequential":
            for i, attention in enumerate(self.attentions):
                shift, scale, gate = mods[3 * i: 3 * i + 3]
                h = modulate(self.norm(x), shift, scale)
                x = x + gate[:, None] * attention(h, *grid)
        else:
            shift, scale, gate = mods[0:3]
            h = modulate(self.norm(x), shift, scale)
            x = x + gate[:, None] * sum(attention(h, *grid) for attention in self.attentions)
        if self.cross is not None:
            x = x + self.cross(x, context)
        shift, scale, gate = mods[-3:]
        return x + gate[:, None] * self.mlp(modulate(self.norm(x), shift, scale))


class ConvHourglass(nn.Module):
    """Full-resolution convolutions around the patch-level transformer (`conv_channels`).

    `stem` runs per frame over the stacked per-pixel inputs and returns full-resolution
    features F and their patch embedding, added to the tokens; `head` unpatchifies the final
    tokens into full-resolution features U, convolves [U, F] and returns a correction added
    to the output of `proj_out`. The head's last convolution starts at zero, so a fresh
    model's output equals that of the same model without the hourglass.
    """

    def __init__(self, in_channels: int, channels: int, width: int, patch_size: int,
                 out_channels: int):
        super().__init__()
        c, p = channels, patch_size
        self.patch_size = p
        self.stem_convs = nn.Sequential(
            nn.Conv2d(in_channels, c, 3, padding=1), nn.GELU(approximate="tanh"),
            nn.Conv2d(c, c, 3, padding=1), nn.GELU(approximate="tanh"))
        self.down = nn.Conv2d(c, width, kernel_size=p, stride=p)  # one output per patch
        self.up = nn.Linear(width, c * p * p)
        self.head_convs = nn.Sequential(
            nn.Conv2d(2 * c, c, 3, padding=1), nn.GELU(approximate="tanh"),
            nn.Conv2d(c, out_channels, 3, padding=1))

    def reset_parameters(self) -> None:
        """PyTorch's default convolution initialisation, the head's last convolution zero
        (`up`, a linear, is initialised with the model's other linears)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                module.reset_parameters()
        nn.init.zeros_(self.head_convs[-1].weight)
        nn.init.zeros_(self.head_convs[-1].bias)

    def stem(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """inputs: [B, V, T, Cin, H, W] per-pixel inputs -> (features F [B*V*T, c, H, W],
        patch features [B, V*T*h*w, D] in the token order of `patchify`)."""
        B, V, T = inputs.shape[:3]
        features = self.stem_convs(inputs.flatten(0, 2))  # [B*V*T, c, H, W]
        patches = self.down(features)  # [B*V*T, D, h, w]
        _, D, h, w = patches.shape
        patches = patches.reshape(B, V, T, D, h, w).permute(0, 1, 2, 4, 5, 3)  # [B,V,T,h,w,D]
        return features, patches.reshape(B, V * T * h * w, D)

    def head(self, tokens: Tensor, features: Tensor, num_views: int, num_steps: int) -> Tensor:
        """tokens: [B, N, D] (after the output norm and AdaLN); features: the stem's F
        [B*V*T, c, H, W] -> the output correction [B, V, T, C_out, H, W]."""
        B = tokens.shape[0]
        H, W = features.shape[-2:]
        up = unpatchify(self.up(tokens), num_views, num_steps, H, W, self.patch_size)
        both = torch.cat([up.flatten(0, 2), features], dim=1)  # [B*V*T, 2c, H, W]
        out = self.head_convs(both)  # [B*V*T, C_out, H, W]
        return out.reshape(B, num_views, num_steps, *out.shape[1:])


X0_MIN_TIME = 1e-4  # x0-predicting models divide by s: keep the velocity finite at s = 0


def _nearest_given(given: Tensor, axis_size: int) -> tuple[Tensor, Tensor]:
    """For each position along the last axis of `given` [..., L] (bool), the index of the
    nearest True position (earlier one on ties) and whether there is any: [..., L] each."""
    position = torch.arange(axis_size, device=given.device, dtype=torch.float32)
    distance = (position[:, None] - position[None, :]).abs()  # [L (to), L (from)]
    distance = distance + 0.25 * (position[None, :] > position[:, None])  # ties: earlier
    cost = torch.where(given[..., None, :], distance, float("inf"))  # [..., L, L]
    return cost.argmin(dim=-1), given.any(dim=-1, keepdim=True).expand_as(given)


def reference_frames(
    cond_frames: Tensor,  # [B, V, T, C, H, W]
    cell_mask: Tensor,  # [B, V, T] bool, True = given
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The frames each cell can lean on: its own view's given frame nearest in time
    (`by_view`), and the given frame at its own timestep in the nearest view (`by_time`),
    each [B, V, T, C, H, W] (zero where there is none), plus `reference` - by_view where
    its view has a given frame, else by_time - and `has_reference` [B, V, T] bool.

    Given row 0 and column 0, a cell's reference is its view's first frame; given row 0
    only, it is the input view's frame at the same timestep: the two copy baselines."""
    B, V, T = cell_mask.shape
    lead = (B, V, T, *cond_frames.shape[3:])
    t_index, has_view = _nearest_given(cell_mask, T)  # [B, V, T]
    by_view = torch.gather(cond_frames, 2, t_index.reshape(B, V, T, 1, 1, 1).expand(lead))
    v_index, has_time = _nearest_given(cell_mask.transpose(1, 2), V)  # [B, T, V]
    v_index, has_time = v_index.transpose(1, 2), has_time.transpose(1, 2)  # [B, V, T]
    by_time = torch.gather(cond_frames, 1, v_index.reshape(B, V, T, 1, 1, 1).expand(lead))
    by_view = torch.where(has_view[..., None, None, None], by_view, 0.0)
    by_time = torch.where(has_time[..., None, None, None], by_time, 0.0)
    reference = torch.where(has_view[..., None, None, None], by_view, by_time)
    return by_view, by_time, reference, has_view | has_time


class VideoDiT(PretrainedModel):
    """Velocity predictor for a [B, V, T, C, H, W] grid of frames; see the module docstring."""

    config_class = DiffusionConfig

    def __init__(self, config: DiffusionConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        D, p, C = config.width, config.patch_size, config.in_channels
        self.x_embed = nn.Linear(C * p * p, D)
        self.time_embed = nn.Sequential(nn.Linear(TIME_FREQUENCIES, D), nn.SiLU(),
                                        nn.Linear(D, D))
        if config.use_cell_conditioning:
            self.cond_embed = nn.Linear(C * p * p, D)
            self.given_embedding = nn.Parameter(torch.zeros(D))
            self.null_cond_embedding = nn.Parameter(torch.zeros(D))
        if config.use_camera_rays:
            self.ray_embed = nn.Linear(RAY_CHANNELS * p * p, D)
        if config.reference_conditioning:
            self.ref_embed = nn.Linear(2 * C * p * p, D)
            self.ref_embedding = nn.Parameter(torch.zeros(D))
        if config.cache_conditioning:
            self.cache_embed = nn.Linear((C + CACHE_CHANNELS_EXTRA) * p * p, D)
        self.blocks = nn.ModuleList(VideoDiTBlock(config) for _ in range(config.depth))
        self.norm_out = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.adaln_out = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.proj_out = nn.Linear(D, C * p * p)
        self.hourglass = None
        if config.conv_channels:
            # per-pixel inputs: x, the given frame, the two reference frames, the rays
            pixel_channels = (C + C * config.use_cell_conditioning
                              + 2 * C * config.reference_conditioning
                              + RAY_CHANNELS * config.use_camera_rays)
            self.hourglass = ConvHourglass(pixel_channels, config.conv_channels, D, p, C)
        self.reset_parameters()

    def set_attention_impl(self, impl: str) -> None:
        """Choose the fused view-time attention kernel of every self-attention layer
        (one of `ATTENTION_IMPLS`: "auto", "flex", "decomposed", "merged", "reference"); the
        config records the choice, so a checkpoint saved afterwards keeps it."""
        self.config = replace(self.config, attention_impl=impl)  # validates the name
        for module in self.modules():
            if isinstance(module, SelfAttention):
                module.impl = impl

    def reset_parameters(self) -> None:
        """DiT initialisation: Xavier linears, zero AdaLN gates and output projections (and
        the hourglass's last convolution)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for linear in self.time_embed[0::2]:
            nn.init.normal_(linear.weight, std=0.02)
        zeroed = [self.adaln_out[-1], self.proj_out]
        for block in self.blocks:
            zeroed.append(block.adaln[-1])
            if block.cross is not None:
                zeroed.append(block.cross.proj)
        for linear in zeroed:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        if self.config.use_cell_conditioning:
            nn.init.normal_(self.given_embedding, std=0.02)
            nn.init.normal_(self.null_cond_embedding, std=0.02)
        if self.config.reference_conditioning:
            nn.init.normal_(self.ref_embedding, std=0.02)
        if self.hourglass is not None:
            self.hourglass.reset_parameters()

    def _check_inputs(self, x: Tensor, s: Tensor, cond_frames: Tensor, cell_mask: Tensor,
                      rays: Tensor | None, context: Tensor | None,
                      cache: Tensor | None = None) -> None:
        cfg = self.config
        if x.ndim != 6:
            raise ValueError(f"x must be [B, V, T, C, H, W], got shape {tuple(x.shape)}")
        B, V, T, C, H, W = x.shape
        if cfg.in_channels != C:
            raise ValueError(f"x has {C} channels, the model expects {cfg.in_channels}")
        if H % cfg.patch_size or W % cfg.patch_size:
            raise ValueError(f"frame size {H}x{W} is not divisible by patch {cfg.patch_size}")
        if cfg.max_views < V or cfg.t_max < T:
            raise ValueError(f"grid {V} views x {T} timesteps exceeds max_views "
                             f"{cfg.max_views} / t_max {cfg.t_max}")
        if tuple(s.shape) != (B,):
            raise ValueError(f"s must have shape [{B}], got {tuple(s.shape)}")
        if cond_frames.shape != x.shape:
            raise ValueError(f"cond_frames shape {tuple(cond_frames.shape)} != x shape "
                             f"{tuple(x.shape)}")
        if cell_mask.dtype != torch.bool or tuple(cell_mask.shape) != (B, V, T):
            raise ValueError(f"cell_mask must be a bool tensor of shape {(B, V, T)}, got "
                             f"{cell_mask.dtype} {tuple(cell_mask.shape)}")
        if cfg.use_camera_rays != (rays is not None):
            raise ValueError("rays are required by this model" if cfg.use_camera_rays
                             else "this model was built without camera rays; pass rays=None")
        if rays is not None and tuple(rays.shape) != (B, V, T, RAY_CHANNELS, H, W):
            raise ValueError(f"rays must have shape {(B, V, T, RAY_CHANNELS, H, W)}, got "
                             f"{tuple(rays.shape)}")
        if cfg.cache_conditioning != (cache is not None):
            raise ValueError("a 3D cache render (cache=) is required by this model"
                             if cfg.cache_conditioning
                             else "this model was built without cache conditioning; pass "
                             "cache=None")
        cache_shape = (B, V, T, C + CACHE_CHANNELS_EXTRA, H, W)
        if cache is not None and tuple(cache.shape) != cache_shape:
            raise ValueError(f"cache must have shape {cache_shape}, got {tuple(cache.shape)}")
        if cfg.cross_attention != (context is not None):
            raise ValueError("context is required by this model" if cfg.cross_attention
                             else "this model has no cross-attention; pass context=None")
        if context is not None and (context.ndim != 3 or context.shape[0] != B
                                    or context.shape[2] != cfg.context_dim):
            raise ValueError(f"context must be [B={B}, L, {cfg.context_dim}], got "
                             f"{tuple(context.shape)}")

    def _condition_tokens(self, tokens: Tensor, cond_frames: Tensor, cell_mask: Tensor,
                          drop: Tensor) -> Tensor:
        """Add embedded given frames (or the null embedding where dropped) to given cells.

        tokens: [B, N, D]; cond_frames: [B, V, T, C, H, W]; cell_mask: [B, V, T]; drop: [B].
        """
        B, V, T = cell_mask.shape
        per_cell = tokens.shape[1] // (V * T)
        given = cell_mask.reshape(B, V * T).repeat_interleave(per_cell, dim=1)[..., None]
        frames = torch.where(cell_mask[..., None, None, None], cond_frames, 0.0)
        content = self.cond_embed(patchify(frames, self.config.patch_size))  # [B, N, D]
        content = torch.where(drop[:, None, None], self.null_cond_embedding, content)
        return tokens + torch.where(given, content + self.given_embedding, 0.0)

    def _checkpointed(self, fn, *args):
        """fn(*args), under gradient checkpointing when it is on and the model trains."""
        if self.gradient_checkpointing and self.training:
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, x: Tensor, s: Tensor, cond_frames: Tensor, cell_mask: Tensor,
                rays: Tensor | None = None, context: Tensor | None = None,
                drop_conditioning: Tensor | bool | None = None,
                cache: Tensor | None = None) -> Tensor:
        """Predict the velocity `eps - z` for the noisy grid x at diffusion time s.

        x, cond_frames: [B, V, T, C, H, W]; s: [B] in [0, 1]; cell_mask: [B, V, T] bool
        (True = given); rays: [B, V, T, 6, H, W]; context: [B, L, Dc]; cache: [B, V, T,
        C + 1, H, W] the 3D cache rendered into every cell (`render_cache`), for models with
        `cache_conditioning`.
        drop_conditioning: True or [B] bool - the unconditional branch of classifier-free
        guidance: given frames and context are replaced by null values, while which cells
        are given stays visible. Returns [B, V, T, C, H, W].

        With `reference_conditioning` each cell also sees its reference frames. With
        `prediction` "x0" the network estimates the clean cells (where a cell has a reference,
        as the reference plus a correction) and the velocity returned is (x - x0) / s, s
        clamped at `X0_MIN_TIME`: a fresh model's estimate is the reference itself. With
        `conv_channels` the hourglass's stem reads x, the given frames (zero outside given
        cells and where conditioning is dropped), the reference frames and the rays per pixel.
        """
        self._check_inputs(x, s, cond_frames, cell_mask, rays, context, cache)
        cfg = self.config
        B, V, T, _, H, W = x.shape  # x: [B, V, T, C, H, W]
        drop = torch.zeros(B, dtype=torch.bool, device=x.device)
        if drop_conditioning is not None:
            drop = drop | torch.as_tensor(drop_conditioning, device=x.device).bool()
        tokens = self.x_embed(patchify(x, cfg.patch_size))  # [B, N, D]
        if cfg.use_cell_conditioning:
            tokens = self._condition_tokens(tokens, cond_frames, cell_mask, drop)
        has_ref = pair = None
        if cfg.reference_conditioning:
            keep = cell_mask & ~drop[:, None, None]  # the null branch has no references
            by_view, by_time, reference, has_ref = reference_frames(cond_frames, keep)
            pair = torch.cat([by_view, by_time], dim=3)  # [B, V, T, 2C, H, W]
            per_cell = tokens.shape[1] // (V * T)
            flag = has_ref.reshape(B, V * T).repeat_interleave(per_cell, dim=1)[..., None]
            tokens = tokens + self.ref_embed(patchify(pair, cfg.patch_size)) \
                + torch.where(flag, self.ref_embedding, 0.0)
        if rays is not None:
            tokens = tokens + self.ray_embed(patchify(rays.to(tokens.dtype), cfg.patch_size))
        if cache is not None:  # the cache is made of given frames: null branch sees none
            cache = torch.where(drop[:, None, None, None, None, None], 0.0, cache)
            tokens = tokens + self.cache_embed(patchify(cache.to(tokens.dtype), cfg.patch_size))
        features = None
        if self.hourglass is not None:
            pixels = [x]  # every per-pixel input, each [B, V, T, *, H, W]
            if cfg.use_cell_conditioning:
                given = cell_mask & ~drop[:, None, None]  # dropped samples see no given frames
                pixels.append(torch.where(given[..., None, None, None], cond_frames, 0.0))
            if pair is not None:
                pixels.append(pair)
            if rays is not None:
                pixels.append(rays.to(x.dtype))
            stem_input = torch.cat(pixels, dim=3)  # [B, V, T, Cin, H, W]
            features, patches = self._checkpointed(self.hourglass.stem, stem_input)
            tokens = tokens + patches  # features: [B*V*T, c, H, W]
        if context is not None:
            context = torch.where(drop[:, None, None], 0.0, context)
        time_emb = self.time_embed(timestep_embedding(s, TIME_FREQUENCIES).to(tokens.dtype))
        cos, sin = rope_3d_angles(V, T, H // cfg.patch_size, W // cfg.patch_size,
                                  cfg.head_dim, cfg.t_max, device=x.device)  # each [N, hd/2]
        for block in self.blocks:
            tokens = self._checkpointed(block, tokens, time_emb, cos, sin, V, T, context)
        shift, scale = self.adaln_out(time_emb).chunk(2, dim=-1)  # each [B, D]
        tokens = modulate(self.norm_out(tokens), shift, scale)
        out = unpatchify(self.proj_out(tokens), V, T, H, W, cfg.patch_size)  # [B,V,T,C,H,W]
        if self.hourglass is not None:
            out = out + self._checkpointed(self.hourglass.head, tokens, features, V, T)
        if cfg.prediction == "velocity":
            return out
        if has_ref is not None:
            out = out + torch.where(has_ref[..., None, None, None], reference, 0.0)
        s_grid = s.clamp(min=X0_MIN_TIME).to(out.dtype).reshape(B, 1, 1, 1, 1, 1)
        return (x - out) / s_grid
