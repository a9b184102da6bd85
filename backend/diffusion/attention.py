"""Fused view-time attention over a V x T grid of frames, and its masked variants.

Tokens of the grid are flattened in (v, t, p) order, idx = (v*T + t)*P + p, N = V*T*P.
In fused view-time attention a query at (v, t) sees a key at (v', t') iff v == v' or
t == t', all in one softmax. Implementations of `fused_view_time_attention`:

- ``reference``: SDPA with the dense [N, N] boolean mask; the twin the others are tested against.
- ``flex``: compiled FlexAttention with a cached block-sparse mask. Forward on CPU and CUDA;
  its backward exists only on CUDA.
- ``decomposed``: exact and differentiable on every device, from batched dense matmuls. Each
  query scores the keys of its own view (all timesteps) and the keys of its own timestep in
  the other views, each key once; both score sets share one softmax. Queries are chunked so
  the score tensors stay within a memory budget; the backward pass recomputes the
  probabilities from the saved log-sum-exp.
- ``merged`` (`merged_attention.py`): exact, forward only (no gradient), no compilation:
  two fused SDPA calls - own view over all timesteps, and own timestep over the other views
  (an overlapping strided window into one doubled copy of the keys) - each returning its
  log-sum-exp, merged as one softmax. Work V*T*P^2*(T+V-1), exactly the mask's, all of it
  in the CPU's fused flash kernel.
- ``auto``: without gradients ``merged`` on the CPU and ``flex`` where FlexAttention runs
  (CUDA); with gradients ``decomposed`` (also after flex has failed to compile on that
  device type).

The softmax scale is 1/sqrt(hd) everywhere.
"""

from __future__ import annotations

import math
import shutil
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from backend.diffusion.grid_checks import grid_tokens_per_frame, needs_grad, require_positive_ints
from backend.diffusion.merged_attention import merged_view_time_attention

IMPLEMENTATIONS = ("auto", "flex", "decomposed", "merged", "reference")


@dataclass(frozen=True)
class ViewTimeAttentionConfig:
    """Tuning of the fused view-time attention kernels."""

    flex_block_size: int = 128  # FlexAttention sparse block, in tokens (CPU: see below)
    flex_min_cpu_block_size: int = 32  # on the CPU a block may shrink to a frame, down to this
    eager_block_mask_max_tokens: int = 8192  # above this N the block mask is built compiled
    block_mask_cache_size: int = 32  # cached block masks, least recently used dropped
    flex_max_compiled_shapes: int = 64  # compiled flex kernels kept (one per grid shape)
    score_chunk_bytes: int = 32 * 2**20  # score tensor budget per chunk of `decomposed`
    cpu_inference: str = "merged"  # what 'auto' runs on the CPU without gradients: or "flex"


CONFIG = ViewTimeAttentionConfig()


def view_time_mask(
    num_views: int, num_steps: int, tokens_per_frame: int, device=None,
) -> Tensor:  # [N, N] bool, True = may attend
    """Dense fused view-time mask: query (v, t) may attend key (v', t') iff v == v' or t == t'."""
    require_positive_ints(num_views=num_views, num_steps=num_steps,
                          tokens_per_frame=tokens_per_frame)
    index = torch.arange(num_views * num_steps * tokens_per_frame, device=device)  # [N]
    view = index // (num_steps * tokens_per_frame)
    step = (index // tokens_per_frame) % num_steps
    return (view[:, None] == view[None, :]) | (step[:, None] == step[None, :])


def full_attention(
    q: Tensor,  # [B, nh, N, hd]
    k: Tensor,  # [B, nh, N, hd]
    v: Tensor,  # [B, nh, N, hd]
) -> Tensor:  # [B, nh, N, hd]
    """Unmasked self-attention over all N tokens (baseline)."""
    return F.scaled_dot_product_attention(q, k, v)


def view_attention(
    q: Tensor,  # [B, nh, N, hd]
    k: Tensor,  # [B, nh, N, hd]
    v: Tensor,  # [B, nh, N, hd]
    num_views: int,
    num_steps: int,
) -> Tensor:  # [B, nh, N, hd]
    """Each token attends the tokens of its own view at all timesteps."""
    grid_tokens_per_frame(q, k, v, num_views, num_steps)
    B, nh, N, hd = q.shape

    def by_view(x: Tensor) -> Tensor:  # [B, nh, N, hd] -> [B*nh, V, T*P, hd]
        return x.reshape(B * nh, num_views, N // num_views, hd)

    out = F.scaled_dot_product_attention(by_view(q), by_view(k), by_view(v))
    return out.reshape(B, nh, N, hd)


def time_attention(
    q: Tensor,  # [B, nh, N, hd]
    k: Tensor,  # [B, nh, N, hd]
    v: Tensor,  # [B, nh, N, hd]
    num_views: int,
    num_steps: int,
) -> Tensor:  # [B, nh, N, hd]
    """Each token attends the tokens of its own timestep in all views."""
    P = grid_tokens_per_frame(q, k, v, num_views, num_steps)
    B, nh, N, hd = q.shape
    V, T = num_views, num_steps

    def by_step(x: Tensor) -> Tensor:  # [B, nh, N, hd] -> [B*nh, T, V*P, hd]
        x = x.reshape(B * nh, V, T, P, hd).transpose(1, 2)
        return x.reshape(B * nh, T, V * P, hd)

    out = F.scaled_dot_product_attention(by_step(q), by_step(k), by_step(v))  # [B*nh, T, V*P, hd]
    out = out.reshape(B * nh, T, V, P, hd).transpose(1, 2)
    return out.reshape(B, nh, N, hd)


def reference_attention(
    q: Tensor,  # [B, nh, N, hd]
    k: Tensor,  # [B, nh, N, hd]
    v: Tensor,  # [B, nh, N, hd]
    num_views: int,
    num_steps: int,
) -> Tensor:  # [B, nh, N, hd]
    """Fused view-time attention as SDPA with the dense [N, N] boolean mask."""
    P = grid_tokens_per_frame(q, k, v, num_views, num_steps)
    mask = view_time_mask(num_views, num_steps, P, device=q.device)  # [N, N]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# ----------------------------------------------------------------------------- flex

_flex_lock = threading.Lock()
_compiled_flex = None
_compiled_block_mask_builder = None
_block_mask_cache: OrderedDict = OrderedDict()
_flex_failed_device_types: set[str] = set()  # where compiling flex failed under impl='auto'


def flex_available(device: torch.device | str) -> bool:
    """Whether compiled FlexAttention can run forward on `device` (CPU needs a C++ compiler)."""
    device_type = torch.device(device).type
    if device_type in _flex_failed_device_types:
        return False
    if device_type == "cuda":
        return torch.cuda.is_available()
    if device_type == "cpu":
        return any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++", "cl"))
    return False


def _view_time_mask_mod(num_steps: int, tokens_per_frame: int, num_tokens: int, constant):
    """mask_mod of the pattern from the flat index; keys past N (block padding) are masked.
    `constant` wraps the grid sizes: int (the kernel specialises on them) or a tensor
    constructor (one compiled block-mask builder serves every shape)."""
    frame, view_tokens = constant(tokens_per_frame), constant(num_steps * tokens_per_frame)
    steps, n_tokens = constant(num_steps), constant(num_tokens)

    def mask_mod(b, h, q_idx, kv_idx):
        same_view = (q_idx // view_tokens) == (kv_idx // view_tokens)
        same_step = ((q_idx // frame) % steps) == ((kv_idx // frame) % steps)
        return (same_view | same_step) & (kv_idx < n_tokens)

    return mask_mod


def flex_block_size(tokens_per_frame: int, device) -> int:
    """Sparse block size. The CPU kernel computes whole blocks, so there a block shrinks to
    the largest power of two dividing P (down to `flex_min_cpu_block_size`) and no block
    mixes frames; CUDA keeps `flex_block_size`, which its kernels' tiles require."""
    size = CONFIG.flex_block_size
    if torch.device(device).type == "cpu":
        while size > CONFIG.flex_min_cpu_block_size and tokens_per_frame % size:
            size //= 2
        if tokens_per_frame % size:
            size = CONFIG.flex_block_size
    return size


def view_time_block_mask(num_views: int, num_steps: int, tokens_per_frame: int, device):
    """FlexAttention BlockMask of the fused view-time pattern, cached per (V, T, P, N, device)."""
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

    global _compiled_block_mask_builder
    n_tokens = num_views * num_steps * tokens_per_frame
    device = torch.device(device)
    key = (num_views, num_steps, tokens_per_frame, n_tokens, str(device))
    with _flex_lock:
        if key in _block_mask_cache:
            _block_mask_cache.move_to_end(key)
            return _block_mask_cache[key]
        build = create_block_mask
        if n_tokens > CONFIG.eager_block_mask_max_tokens:
            # Eager construction materialises the [N, N] mask; compiled, it is fused.
            if _compiled_block_mask_builder is None:
                _compiled_block_mask_builder = torch.compile(create_block_mask, dynamic=True)
            build = _compiled_block_mask_builder
        sizes = (num_steps, tokens_per_frame, n_tokens)
        block = flex_block_size(tokens_per_frame, device)
        built = build(_view_time_mask_mod(*sizes, lambda n: torch.tensor(n, device=device)),
                      None, None, n_tokens, n_tokens, device=device, BLOCK_SIZE=block)
        block_mask = BlockMask.from_kv_blocks(
            built.kv_num_blocks, built.kv_indices, built.full_kv_num_blocks,
            built.full_kv_indices, BLOCK_SIZE=block,
            mask_mod=_view_time_mask_mod(*sizes, int), seq_lengths=(n_tokens, n_tokens))
        _block_mask_cache[key] = block_mask
        while len(_block_mask_cache) > CONFIG.block_mask_cache_size:
            _block_mask_cache.popitem(last=False)
        return block_mask


def _flex_kernel():
    """flex_attention under torch.compile, created once (eager flex materialises every score).
    Static shapes: one compilation per grid shape, but a kernel specialised to it."""
    global _compiled_flex
    with _flex_lock:
        if _compiled_flex is None:
            from torch.nn.attention.flex_attention import flex_attention

            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex


def flex_view_time_attention(
    q: Tensor,  # [B, nh, N, hd]
    k: Tensor,  # [B, nh, N, hd]
    v: Tensor,  # [B, nh, N, hd]
    num_views: int,
    num_steps: int,
) -> Tensor:  # [B, nh, N, hd]
    """Fused view-time attention with compiled FlexAttention and a block-sparse mask."""
    P = grid_tokens_per_frame(q, k, v, num_views, num_steps)
    if not flex_available(q.device):
        raise ValueError(f"FlexAttention is not available on device {q.device} (no CUDA or "
                         "C++ compiler, or it failed before)")
    if q.device.type != "cuda" and needs_grad(q, k, v):
        raise ValueError("FlexAttention has no backward on the CPU; use impl='decomposed' "
                         "(or 'auto', which picks it when gradients are needed)")
    block_mask = view_time_block_mask(num_views, num_steps, P, q.device)
    dynamo_config = torch._dynamo.config
    limit_name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else (
        "cache_size_limit")  # the older name
    with dynamo_config.patch(**{limit_name: CONFIG.flex_max_compiled_shapes}):
        return _flex_kernel()(q, k, v, block_mask=block_mask,
                              scale=1.0 / math.sqrt(q.shape[-1]))


# ----------------------------------------------------------------------------- decomposed
# Keys and values carry an extra column of ones. A query row extended by -shift then yields
# scores minus the shift straight from the matmul, and probabilities times the extended
# values yield the row sums in the last column, so no separate pass over the scores is
# needed for the max, the subtraction or the sums. Per-query tensors are stored view-major
# ([V, G, ...]) so that every chunk of queries is one contiguous block.

_MIN_ROW_SUM = math.exp(-30.0)  # below this the shift was too loose: redo with the row max


@dataclass(frozen=True)
class _GridLayout:
    """q, k, v arranged for the decomposed kernel, in the compute dtype; G = B*nh."""

    q_scaled: Tensor  # [V, G, T, P, hd], q times the softmax scale
    k_view: Tensor  # [V, G, T*P, hd+1], last column ones
    v_view: Tensor  # [V, G, T*P, hd+1], last column ones
    k_steps: Tensor  # [G, T, 2V, P, hd+1], views twice so others of v are v+1..v+V-1
    v_steps: Tensor  # [G, T, 2V, P, hd+1]


def _layout(q: Tensor, k: Tensor, v: Tensor, V: int, T: int, P: int) -> _GridLayout:
    B, nh, _, hd = q.shape
    G = B * nh
    compute = torch.promote_types(q.dtype, torch.float32)

    def extended(x: Tensor) -> Tensor:  # [B, nh, N, hd] -> [G, V, T, P, hd+1]
        x = x.to(compute).reshape(G, V, T, P, hd)
        return torch.cat([x, x.new_ones(G, V, T, P, 1)], dim=-1)

    def by_view(x: Tensor) -> Tensor:  # [G, V, T, P, hd+1] -> [V, G, T*P, hd+1]
        return x.transpose(0, 1).reshape(V, G, T * P, hd + 1)

    def doubled_by_step(x: Tensor) -> Tensor:  # [G, V, T, P, hd+1] -> [G, T, 2V, P, hd+1]
        return torch.cat([x.transpose(1, 2), x.transpose(1, 2)], dim=2)

    k_ext, v_ext = extended(k), extended(v)
    q_by_view = q.to(compute).reshape(G, V, T, P, hd).transpose(0, 1).contiguous()
    q_scaled = q_by_view * (1.0 / math.sqrt(hd))  # a new tensor: q itself stays untouched
    return _GridLayout(q_scaled=q_scaled, k_view=by_view(k_ext), v_view=by_view(v_ext),
                       k_steps=doubled_by_step(k_ext), v_steps=doubled_by_step(v_ext))


@dataclass(frozen=True)
class _Chunk:
    """Queries of some heads in one view, some timesteps, some tokens of each frame. Either all
    timesteps are taken or a single head, so every per-query block is contiguous."""

    view: int
    heads: slice
    steps: slice
    tokens: slice

    @property
    def sizes(self) -> tuple[int, int, int]:  # heads, timesteps, tokens per frame
        return tuple(part.stop - part.start for part in (self.heads, self.steps, self.tokens))

    @property
    def rows(self) -> tuple:  # index of the chunk's queries in a [V, G, T, P, ...] tensor
        return self.view, self.heads, self.steps, self.tokens


def _even_split(total: int, most: int) -> int:
    """Part size that splits `total` into equal parts of at most `most`."""
    parts = -(-total // max(1, most))
    return -(-total // parts)


def _chunk_plan(G: int, V: int, T: int, P: int, budget_elements: int):
    """(heads, timesteps, tokens) per chunk so one chunk has at most ~budget score elements."""
    keys = T * P + (V - 1) * P  # keys seen by each query
    if T * P * keys <= budget_elements:
        return _even_split(G, budget_elements // (T * P * keys)), T, P
    if P * keys <= budget_elements:
        return 1, _even_split(T, budget_elements // (P * keys)), P
    return 1, 1, _even_split(P, budget_elements // keys)


def _chunks(G: int, V: int, T: int, P: int, plan: tuple[int, int, int]):
    heads, steps, tokens = plan
    for g0 in range(0, G, heads):
        for view in range(V):
            for t0 in range(0, T, steps):
                for p0 in range(0, P, tokens):
                    yield _Chunk(view, slice(g0, min(G, g0 + heads)),
                                 slice(t0, min(T, t0 + steps)), slice(p0, min(P, p0 + tokens)))


def _score_buffers(lay: _GridLayout, plan: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
    """Two flat buffers reused by every chunk (own view, other views), allocated once."""
    V, G, T, P, _ = lay.q_scaled.shape
    rows = min(plan[0], G) * plan[1] * plan[2]
    return (lay.q_scaled.new_empty(rows * T * P), lay.q_scaled.new_empty(rows * (V - 1) * P))


def _take(buffers: tuple[Tensor, Tensor], view_shape: tuple, other_shape: tuple):
    return (buffers[0][:math.prod(view_shape)].view(view_shape),
            buffers[1][:math.prod(other_shape)].view(other_shape))


def _others(steps: Tensor, c: _Chunk) -> Tensor:  # [G, T, 2V, P, C] -> [g*t, (V-1)*P, C]
    """Keys, values or their gradients at the chunk's timesteps in the other views."""
    g, t, _ = c.sizes
    V, P, C = steps.shape[2] // 2, steps.shape[3], steps.shape[4]
    return steps[c.heads, c.steps, c.view + 1:c.view + V].view(g * t, (V - 1) * P, C)


def _chunk_scores(lay: _GridLayout, c: _Chunk, q_ext: Tensor, buffers, exp: bool = True):
    """exp(scores - shift) (or the raw shifted scores) of the chunk's queries, with q_ext the
    [V, G, T, P, hd+1] queries extended by -shift: own view [g, t*p, T*P] and other views at
    the same timestep [g*t, p, (V-1)*P], written into `buffers`."""
    g, t, p = c.sizes
    V, _, T, P, C = q_ext.shape
    q = q_ext[c.rows]  # [g, t, p, hd+1], contiguous
    s_view, s_other = _take(buffers, (g, t * p, T * P), (g * t, p, (V - 1) * P))
    torch.bmm(q.view(g, t * p, C), lay.k_view[c.view, c.heads].transpose(1, 2), out=s_view)
    torch.bmm(q.view(g * t, p, C), _others(lay.k_steps, c).transpose(1, 2), out=s_other)
    if exp:
        s_view.exp_()
        s_other.exp_()
    return s_view, s_other


def _attend_chunk(lay: _GridLayout, c: _Chunk, q_ext: Tensor, out_ext: Tensor, buffers):
    """Unnormalised outputs of the chunk, row sums in the last column, into out_ext[c.rows]."""
    g, t, p = c.sizes
    p_view, p_other = _chunk_scores(lay, c, q_ext, buffers)
    o = out_ext[c.rows].view(g, t * p, -1)
    torch.bmm(p_view, lay.v_view[c.view, c.heads], out=o)
    o.view(g * t, p, -1).baddbmm_(p_other, _others(lay.v_steps, c))


def _decomposed_forward(lay: _GridLayout, budget_elements: int):
    """Output [V, G, T, P, hd] and log-sum-exp [V, G, T, P, 1] of every query."""
    V, G, T, P, hd = lay.q_scaled.shape
    plan = _chunk_plan(G, V, T, P, budget_elements)
    buffers = _score_buffers(lay, plan)
    # Cauchy-Schwarz: |q|*max|k| bounds every score of a row, so exp(s - bound) <= 1.
    k_norm_max = lay.k_view[..., :hd].norm(dim=-1).amax(dim=(0, 2))  # [G]
    shift = lay.q_scaled.norm(dim=-1, keepdim=True) * k_norm_max[:, None, None, None]
    q_ext = torch.cat([lay.q_scaled, -shift], dim=-1)  # [V, G, T, P, hd+1]
    out_ext = q_ext.new_empty(q_ext.shape)
    for c in _chunks(G, V, T, P, plan):
        _attend_chunk(lay, c, q_ext, out_ext, buffers)
    loose = out_ext[..., hd] < _MIN_ROW_SUM  # [V, G, T, P]
    if bool(loose.any()):
        for c in (c for c in _chunks(G, V, T, P, plan) if bool(loose[c.rows].any())):
            g, t, p = c.sizes
            q_ext[c.rows][..., hd] = 0.0
            s_view, s_other = _chunk_scores(lay, c, q_ext, buffers, exp=False)
            row_max = s_view.amax(-1).view(g, t, p)
            if V > 1:
                row_max = torch.maximum(row_max, s_other.amax(-1).view(g, t, p))
            shift[c.rows] = row_max[..., None]
            q_ext[c.rows][..., hd] = -row_max
            _attend_chunk(lay, c, q_ext, out_ext, buffers)
    row_sum = out_ext[..., hd:]
    return out_ext[..., :hd] / row_sum, shift + row_sum.log()


def _decomposed_backward(lay: _GridLayout, out: Tensor, lse: Tensor, grad_out: Tensor,
                         budget_elements: int):
    """Gradients of q, k, v, each [G, V, T, P, hd], recomputing probabilities per chunk.
    out, grad_out [V, G, T, P, hd] and lse [V, G, T, P, 1] are view-major."""
    V, G, T, P, hd = lay.q_scaled.shape
    plan = _chunk_plan(G, V, T, P, budget_elements)
    scores, score_grads = _score_buffers(lay, plan), _score_buffers(lay, plan)
    # dS = P * (dO V^T - delta), delta = rowsum(dO * O): [dO, -delta] against the extended
    # values gives dO V^T - delta in one matmul.
    delta = (grad_out * out).sum(-1, keepdim=True)  # [V, G, T, P, 1]
    d_ext = torch.cat([grad_out, -delta], dim=-1)  # [V, G, T, P, hd+1]
    q_ext = torch.cat([lay.q_scaled, -lse], dim=-1)  # [V, G, T, P, hd+1]
    grad_q = lay.q_scaled.new_empty(lay.q_scaled.shape)
    grad_k_view = lay.q_scaled.new_zeros(V, G, T * P, hd)
    grad_v_view = torch.zeros_like(grad_k_view)
    grad_k_steps = lay.q_scaled.new_zeros(G, T, 2 * V, P, hd)
    grad_v_steps = torch.zeros_like(grad_k_steps)
    for c in _chunks(G, V, T, P, plan):
        g, t, p = c.sizes
        p_view, p_other = _chunk_scores(lay, c, q_ext, scores)
        d_rows, d_frames = d_ext[c.rows].view(g, t * p, -1), d_ext[c.rows].view(g * t, p, -1)
        q_rows, q_frames = q_ext[c.rows].view(g, t * p, -1), q_ext[c.rows].view(g * t, p, -1)
        grad_v_view[c.view, c.heads].baddbmm_(p_view.transpose(1, 2), d_rows[..., :hd])
        _others(grad_v_steps, c).baddbmm_(p_other.transpose(1, 2), d_frames[..., :hd])
        ds_view, ds_other = _take(score_grads, p_view.shape, p_other.shape)
        torch.bmm(d_rows, lay.v_view[c.view, c.heads].transpose(1, 2), out=ds_view).mul_(p_view)
        torch.bmm(d_frames, _others(lay.v_steps, c).transpose(1, 2), out=ds_other).mul_(p_other)
        grad_q_rows = grad_q[c.rows].view(g, t * p, hd)
        torch.bmm(ds_view, lay.k_view[c.view, c.heads, :, :hd], out=grad_q_rows)
        grad_q_rows.view(g * t, p, hd).baddbmm_(ds_other, _others(lay.k_steps, c)[..., :hd])
        grad_k_view[c.view, c.heads].baddbmm_(ds_view.transpose(1, 2), q_rows[..., :hd])
        _others(grad_k_steps, c).baddbmm_(ds_other.transpose(1, 2), q_frames[..., :hd])

    def fold(grad_view: Tensor, grad_steps: Tensor) -> Tensor:  # -> [G, V, T, P, hd]
        by_step = grad_steps[:, :, :V] + grad_steps[:, :, V:]  # [G, T, V, P, hd]
        return grad_view.view(V, G, T, P, hd).transpose(0, 1) + by_step.transpose(1, 2)

    grad_q = grad_q.mul_(1.0 / math.sqrt(hd)).transpose(0, 1)
    return grad_q, fold(grad_k_view, grad_k_steps), fold(grad_v_view, grad_v_steps)


class _DecomposedViewTimeAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, num_views, num_steps, budget_elements):
        B, nh, N, hd = q.shape
        P = N // (num_views * num_steps)
        lay = _layout(q, k, v, num_views, num_steps, P)
        out, lse = _decomposed_forward(lay, budget_elements)  # [V, G, T, P, hd], [.., 1]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.grid = (num_views, num_steps, P, budget_elements)
        return out.transpose(0, 1).reshape(B, nh, N, hd).to(q.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # grad_out [B, nh, N, hd]
        q, k, v, out, lse = ctx.saved_tensors
        V, T, P, budget_elements = ctx.grid
        lay = _layout(q, k, v, V, T, P)
        G = q.shape[0] * q.shape[1]
        grad_out = grad_out.to(out.dtype).reshape(G, V, T, P, -1).transpose(0, 1)
        grads = _decomposed_backward(lay, out, lse, grad_out, budget_elements)
        return (*(g.reshape(q.shape).to(q.dtype) for g in grads), None, None, None)


def decomposed_view_time_attention(
    q: Tensor,  # [B, nh, N, hd]
    k: Tensor,  # [B, nh, N, hd]
    v: Tensor,  # [B, nh, N, hd]
    num_views: int,
    num_steps: int,
    score_chunk_bytes: int | None = None,
) -> Tensor:  # [B, nh, N, hd]
    """Exact fused view-time attention from batched dense matmuls, differentiable everywhere.

    Scores against the own view ([G, V, T*P, T*P] in all) and against the same timestep of the
    other views ([G, T, V*P, (V-1)*P]) share one shift and one log-sum-exp per query; no
    [N, N] tensor is formed. Queries go in chunks whose scores fit in `score_chunk_bytes`
    (default `CONFIG.score_chunk_bytes`); the shift is the Cauchy-Schwarz bound |q|*max|k|,
    replaced by the exact row max for any chunk where the bound underflows.
    """
    grid_tokens_per_frame(q, k, v, num_views, num_steps)
    budget = CONFIG.score_chunk_bytes if score_chunk_bytes is None else score_chunk_bytes
    if budget <= 0:
        raise ValueError(f"score_chunk_bytes must be positive, got {budget}")
    return _DecomposedViewTimeAttention.apply(q, k, v, num_views, num_steps, max(1, budget // 4))


# ----------------------------------------------------------------------------- dispatch


def _is_out_of_memory(error: Exception) -> bool:
    """CUDA raises OutOfMemoryError; the CPU allocator a RuntimeError saying so."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text
                                                or "not enough memory" in text)


def select_implementation(q: Tensor, k: Tensor, v: Tensor, impl: str = "auto") -> str:
    """Resolve `impl`: when no gradient is needed (grad mode off or no input requires grad)
    'auto' is 'merged' on the CPU and 'flex' where FlexAttention runs; otherwise
    'decomposed'. If flex fails under 'auto' (say, the compiler breaks), 'auto' warns once and
    uses 'decomposed' on that device type from then on."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl != "auto":
        return impl
    if not needs_grad(q, k, v):
        if q.device.type == "cpu" and CONFIG.cpu_inference == "merged":
            return "merged"
        if flex_available(q.device):
            return "flex"
    return "decomposed"


def fused_view_time_attention(
    q: Tensor,  # [B, nh, N, hd], N = V*T*P in (v, t, p) order
    k: Tensor,  # [B, nh, N, hd]
    v: Tensor,  # [B, nh, N, hd]
    num_views: int,
    num_steps: int,
    impl: str = "auto",
) -> Tensor:  # [B, nh, N, hd]
    """One softmax over the keys of the same view or the same timestep (see module docstring
    for the implementations and what 'auto' picks)."""
    grid_tokens_per_frame(q, k, v, num_views, num_steps)
    chosen = select_implementation(q, k, v, impl)
    if chosen == "flex" and impl == "auto":
        try:
            return flex_view_time_attention(q, k, v, num_views, num_steps)
        except Exception as error:  # compilation failures surface as many exception types
            if _is_out_of_memory(error):
                raise  # not a compilation failure: flex stays on (decomposed would need more)
            _flex_failed_device_types.add(q.device.type)
            warnings.warn(f"FlexAttention failed on {q.device.type} ({error!r}); using the "
                          "decomposed kernel there from now on", RuntimeWarning, stacklevel=2)
            chosen = "decomposed"
    if chosen == "flex":
        return flex_view_time_attention(q, k, v, num_views, num_steps)
    if chosen == "decomposed":
        return decomposed_view_time_attention(q, k, v, num_views, num_steps)
    if chosen == "merged":
        return merged_view_time_attention(q, k, v, num_views, num_steps)
    return reference_attention(q, k, v, num_views, num_steps)
