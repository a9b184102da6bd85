"""The ``merged`` fused view-time attention kernel: exact, forward only, no compilation.

A query at (v, t) sees the keys of its own view at every timestep and the keys of its own
timestep in the other views. Two fused SDPA calls (the CPU's flash kernel) cover these
two disjoint sets, each returning its log-sum-exp, and their outputs are merged with
softmax weights from the two log-sum-exps - the same result as one softmax over the union.

- the view stream: per view, the T*P queries against the T*P keys of that view;
- the others stream: per timestep and view, the P queries of frame (v, t) against the
  (V-1)*P keys of the other views at t. The keys of a timestep are laid out twice in a row
  (views 0..V-1, 0..V-1), so the keys of "the views after v, cyclically" are the window
  starting at view v+1: one strided, overlapping view of that buffer serves every v, so
  the keys and values are copied once (doubled), not once per view.

The work is V*T*P^2*(T+V-1) scores: exactly the mask's, all of it in the fused kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from backend.diffusion.grid_checks import grid_tokens_per_frame, needs_grad

_CPU_FLASH_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def attention_with_lse(
    q: Tensor,  # [..., L, hd]
    k: Tensor,  # [..., S, hd] (any strides with a contiguous last dim)
    v: Tensor,  # [..., S, hd]
) -> tuple[Tensor, Tensor]:  # out [..., L, hd], log-sum-exp of the scaled scores [..., L]
    """Softmax attention with scale 1/sqrt(hd) that also returns each row's log-sum-exp.

    On the CPU the fused flash kernel (which reads strided keys in place); elsewhere plain
    matmuls in at least float32, cast back to the inputs' dtype at the end."""
    lead = q.shape[:-2]
    if q.device.type == "cpu" and q.dtype in _CPU_FLASH_DTYPES:
        def four_d(x: Tensor) -> Tensor:  # [..., L, hd] -> [b, 1 or heads, L, hd]
            if x.stride(-1) != 1:
                x = x.contiguous()
            return x if x.dim() == 4 else x.reshape(-1, 1, *x.shape[-2:])

        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            four_d(q), four_d(k), four_d(v))
        return out.reshape(*lead, *out.shape[-2:]), lse.reshape(*lead, lse.shape[-1])
    work = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(work) * q.shape[-1] ** -0.5) @ k.to(work).transpose(-1, -2)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.exp(scores - lse[..., None]) @ v.to(work)
    return out.to(q.dtype), lse


def _other_views(
    x: Tensor,  # [G, V, T, P, hd]
) -> Tensor:  # [G*T, V, (V-1)*P, hd]: row (g*T + t, v) = frames (v+1..v+V-1 mod V, t)
    G, V, T, P, hd = x.shape
    doubled = torch.empty(G, T, 2, V, P, hd, dtype=x.dtype, device=x.device)
    doubled[:, :, 0] = x.transpose(1, 2)
    doubled[:, :, 1] = doubled[:, :, 0]
    row = 2 * V * P * hd  # one timestep's doubled keys
    return doubled.as_strided((G * T, V, (V - 1) * P, hd), (row, P * hd, hd, 1),
                              storage_offset=P * hd)


def merged_view_time_attention(
    q: Tensor,  # [B, nh, N, hd]
    k: Tensor,  # [B, nh, N, hd]
    v: Tensor,  # [B, nh, N, hd]
    num_views: int,
    num_steps: int,
) -> Tensor:  # [B, nh, N, hd]
    """Exact fused view-time attention from two fused SDPA calls (no gradient)."""
    P = grid_tokens_per_frame(q, k, v, num_views, num_steps)
    if needs_grad(q, k, v):
        raise ValueError("the merged kernel has no backward pass: use impl='decomposed' (or "
                         "'flex' on CUDA) when gradients are needed")
    B, nh, N, hd = q.shape
    V, T, G = num_views, num_steps, B * nh
    with torch.no_grad():
        if V == 1:
            return attention_with_lse(*(x.reshape(G, T * P, hd) for x in (q, k, v)))[0] \
                .reshape(B, nh, N, hd)
        # the others stream first, so its doubled keys are freed before the view stream runs
        grid = [x.reshape(G, V, T, P, hd) for x in (q, k, v)]
        q_steps = grid[0].transpose(1, 2).reshape(G * T, V, P, hd)
        out_o, lse_o = attention_with_lse(q_steps, _other_views(grid[1]), _other_views(grid[2]))
        del q_steps
        out_v, lse_v = attention_with_lse(*(x.reshape(G, V, T * P, hd) for x in (q, k, v)))
        # both streams as [G, V, T, P, (hd)] grids, merged in at least float32 (in out_v's
        # buffer when that is already the merge dtype)
        work = torch.promote_types(q.dtype, torch.float32)
        out = out_v.reshape(G, V, T, P, hd).to(work)
        lse_v = lse_v.reshape(G, V, T, P).to(work)
        lse_o = lse_o.reshape(G, T, V, P).transpose(1, 2).to(work)
        shift = torch.maximum(lse_v, lse_o)
        w_v, w_o = (lse_v - shift).exp_(), (lse_o - shift).exp_()
        inverse_total = (w_v + w_o).reciprocal_()  # >= 1/2: one weight is exp(0)
        out.mul_((w_v * inverse_total)[..., None])
        out.addcmul_(out_o.reshape(G, T, V, P, hd).transpose(1, 2).to(out.dtype),
                     (w_o * inverse_total)[..., None])
    return out.to(q.dtype).reshape(B, nh, N, hd)
