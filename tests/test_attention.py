"""Fused view-time attention: flex and decomposed kernels against the dense-mask reference."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from backend.diffusion import attention
from backend.diffusion.attention import (
    decomposed_view_time_attention,
    flex_available,
    flex_block_size,
    full_attention,
    fused_view_time_attention,
    select_implementation,
    time_attention,
    view_attention,
    view_time_block_mask,
    view_time_mask,
)
from backend.diffusion.merged_attention import _other_views

# (B, nh, V, T, P): P below and above the 128-token flex block, not a multiple of it.
GRIDS = [(2, 3, 2, 3, 5), (2, 3, 4, 8, 16), (2, 3, 3, 2, 130)]
FLEX_GRIDS = GRIDS[1:]  # several blocks with frames split across them; padding (N = 780)
EDGE_GRIDS = [(1, 1, 1, 3, 4), (1, 2, 3, 1, 7)]  # one view; one timestep
HEAD_DIM = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _qkv(B, nh, V, T, P, dtype=torch.float32, seed=0, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)
    shape = (B, nh, V * T * P, HEAD_DIM)
    return [torch.randn(shape, generator=generator, dtype=dtype).requires_grad_(requires_grad)
            for _ in range(3)]


def _chunk_sizes(V, T, P, split_frames=False):
    """Score budgets for the chunkings of `decomposed`: the default (whole views, several
    heads), two timesteps of one head, and with `split_frames` half the tokens of a frame."""
    frame_bytes = 4 * P * (T * P + (V - 1) * P)  # float32 scores of one frame of queries
    return (None, 2 * frame_bytes) + ((frame_bytes // 2,) if split_frames else ())


def _reference(q, k, v, V, T):
    return fused_view_time_attention(q, k, v, V, T, impl="reference")


def test_mask_matches_definition_cell_by_cell():
    V, T, P = 3, 4, 2
    mask = view_time_mask(V, T, P)
    assert mask.shape == (V * T * P, V * T * P) and mask.dtype == torch.bool
    cells = list(itertools.product(range(V), range(T), range(P)))
    for (i, (vq, tq, _)), (j, (vk, tk, _)) in itertools.product(enumerate(cells), repeat=2):
        assert mask[i, j].item() == (vq == vk or tq == tk), (i, j)
    for V, T in [(3, 4), (8, 16), (1, 5)]:
        fraction = view_time_mask(V, T, 3).float().mean().item()
        assert fraction == pytest.approx((V + T - 1) / (V * T))


@pytest.mark.parametrize("grid", GRIDS + EDGE_GRIDS)
def test_decomposed_matches_reference(grid):
    V, T, P = grid[2:]
    q, k, v = _qkv(*grid)
    expected = _reference(q, k, v, V, T)
    few_frames = grid[0] * grid[1] * V * T <= 40  # splitting frames makes many small chunks
    for chunk_bytes in _chunk_sizes(V, T, P, split_frames=few_frames):
        out = decomposed_view_time_attention(q, k, v, V, T, score_chunk_bytes=chunk_bytes)
        error = (out - expected).abs().max().item()
        print(f"decomposed {grid} chunk={chunk_bytes}: max abs err {error:.2e}")
        assert out.shape == q.shape and error < 1e-5


@pytest.mark.parametrize("grid", GRIDS + EDGE_GRIDS[:1])
def test_decomposed_gradients_match_reference(grid):
    V, T, P = grid[2:]
    q, k, v = _qkv(*grid, dtype=torch.float64, seed=1, requires_grad=True)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(2),
                           dtype=torch.float64)
    expected = torch.autograd.grad(_reference(q, k, v, V, T), (q, k, v), grad_out)
    for chunk_bytes in _chunk_sizes(V, T, P):
        out = decomposed_view_time_attention(q, k, v, V, T, score_chunk_bytes=chunk_bytes)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        for name, got, want in zip("qkv", grads, expected, strict=True):
            error = (got - want).abs().max().item()
            print(f"decomposed grad {name} {grid} chunk={chunk_bytes}: max abs err {error:.2e}")
            assert error < 1e-10


def test_decomposed_gradients_float32():
    B, nh, V, T, P = GRIDS[1]
    q, k, v = _qkv(B, nh, V, T, P, seed=3, requires_grad=True)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(4))
    expected = torch.autograd.grad(_reference(q, k, v, V, T), (q, k, v), grad_out)
    before = [t.detach().clone() for t in (q, k, v)]
    out = fused_view_time_attention(q, k, v, V, T, impl="decomposed")
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad_out), expected, strict=True):
        assert (got - want).abs().max().item() < 1e-4
    assert all(torch.equal(t, b) for t, b in zip((q, k, v), before, strict=True))


def test_decomposed_is_exact_when_the_norm_bound_is_loose_or_scores_are_large():
    V, T, P = 3, 2, 4
    q, k, v = _qkv(1, 2, V, T, P, seed=12)
    # One key of huge norm orthogonal to every query: the |q|*max|k| shift underflows every
    # row, so rows fall back to the exact maximum.
    q[..., 0] = 0.0
    k[:, :, 5] = 0.0
    k[:, :, 5, 0] = 1e4
    # Large scores elsewhere must not overflow.
    q[:, 1] *= 40.0
    expected = _reference(q, k, v, V, T)
    out = fused_view_time_attention(q, k, v, V, T, impl="decomposed")
    assert torch.isfinite(out).all()
    assert (out - expected).abs().max().item() < 1e-5


def test_decomposed_keeps_low_precision_dtype():
    V, T = GRIDS[0][2:4]
    q, k, v = _qkv(*GRIDS[0], seed=11)
    low = [t.bfloat16().requires_grad_(True) for t in (q, k, v)]
    out = fused_view_time_attention(*low, V, T, impl="decomposed")
    assert out.dtype == torch.bfloat16
    expected = _reference(*(t.detach().float() for t in low), V, T)
    assert (out.float() - expected).abs().max().item() < 2e-2
    out.float().sum().backward()
    assert all(t.grad.dtype == torch.bfloat16 for t in low)


@pytest.mark.skipif(not flex_available("cpu"), reason="no C++ compiler for compiled flex")
@pytest.mark.parametrize("grid", FLEX_GRIDS)
def test_flex_matches_reference(grid):
    V, T = grid[2:4]
    q, k, v = _qkv(*grid, seed=5)
    with torch.no_grad():
        out = fused_view_time_attention(q, k, v, V, T, impl="flex")
    error = (out - _reference(q, k, v, V, T)).abs().max().item()
    print(f"flex {grid}: max abs err {error:.2e}")
    assert out.shape == q.shape and error < 1e-5


@pytest.mark.parametrize("grid", [(3, 2, 130), (3, 2, 64)])
def test_block_mask_is_cached_and_matches_the_pattern(grid):
    V, T, P = grid  # N = 780: the last block is partly padding; P = 64: 64-token blocks
    block_mask = view_time_block_mask(V, T, P, "cpu")
    assert view_time_block_mask(V, T, P, "cpu") is block_mask
    assert view_time_block_mask(V, T, P + 1, "cpu") is not block_mask
    assert block_mask.seq_lengths == (V * T * P, V * T * P)
    block = flex_block_size(P, "cpu")
    assert tuple(block_mask.BLOCK_SIZE) == (block, block)
    dense = block_mask.to_dense()[0, 0]  # [Nq blocks, Nkv blocks], 1 = block visited
    expected = view_time_mask(V, T, P)
    padded = torch.zeros(dense.shape[0] * block, dense.shape[1] * block, dtype=torch.bool)
    padded[:expected.shape[0], :expected.shape[1]] = expected
    any_allowed = padded.reshape(dense.shape[0], block, dense.shape[1], block).any(3).any(1)
    assert torch.equal(dense.bool(), any_allowed)


def test_flex_block_size_follows_the_frame_on_cpu():
    assert [flex_block_size(P, "cpu") for P in (64, 96, 128, 130, 256, 16)] == [
        64, 32, 128, 128, 128, 128]
    assert flex_block_size(64, "cuda") == 128


def test_auto_picks_merged_or_flex_without_grad_and_decomposed_with_grad(monkeypatch):
    q, k, v = _qkv(*GRIDS[0], requires_grad=True)
    assert select_implementation(q, k, v, "auto") == "decomposed"
    with torch.no_grad():
        assert select_implementation(q, k, v, "auto") == "merged"
    plain = [t.detach() for t in (q, k, v)]
    assert select_implementation(*plain, "auto") == "merged"
    monkeypatch.setattr(attention, "CONFIG", attention.ViewTimeAttentionConfig(
        cpu_inference="flex"))
    expected = "flex" if flex_available("cpu") else "decomposed"
    assert select_implementation(*plain, "auto") == expected
    assert select_implementation(*plain, "reference") == "reference"
    with pytest.raises(ValueError, match="impl"):
        select_implementation(*plain, "sparse")


def test_auto_with_grad_on_cpu_is_exact_and_differentiable():
    V, T = GRIDS[0][2:4]
    q, k, v = _qkv(*GRIDS[0], seed=6, requires_grad=True)
    out = fused_view_time_attention(q, k, v, V, T)
    torch.testing.assert_close(out, _reference(q, k, v, V, T), rtol=0, atol=1e-5)
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.skipif(not flex_available("cpu"), reason="no C++ compiler for compiled flex")
def test_auto_falls_back_when_flex_fails(monkeypatch):
    def broken_kernel():
        def fail(*args, **kwargs):
            raise RuntimeError("compiler exploded")
        return fail

    monkeypatch.setattr(attention, "_flex_kernel", broken_kernel)
    monkeypatch.setattr(attention, "_flex_failed_device_types", set())
    monkeypatch.setattr(attention, "CONFIG", attention.ViewTimeAttentionConfig(
        cpu_inference="flex"))
    V, T = GRIDS[0][2:4]
    q, k, v = _qkv(*GRIDS[0], seed=13)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="compiler exploded"):
        out = fused_view_time_attention(q, k, v, V, T)
    assert (out - _reference(q, k, v, V, T)).abs().max().item() < 1e-5
    with torch.no_grad():
        assert select_implementation(q, k, v, "auto") == "decomposed"
    with torch.no_grad(), pytest.raises(ValueError, match="not available"):
        fused_view_time_attention(q, k, v, V, T, impl="flex")


@pytest.mark.parametrize("exhausted", [
    torch.OutOfMemoryError("CUDA out of memory"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: not enough memory"),
])
def test_auto_keeps_flex_after_running_out_of_memory(monkeypatch, exhausted):
    def exhausted_kernel():
        def fail(*args, **kwargs):
            raise exhausted
        return fail

    monkeypatch.setattr(attention, "_flex_kernel", exhausted_kernel)
    monkeypatch.setattr(attention, "_flex_failed_device_types", set())
    monkeypatch.setattr(attention, "flex_available", lambda device: True)
    monkeypatch.setattr(attention, "CONFIG", attention.ViewTimeAttentionConfig(
        cpu_inference="flex"))
    V, T = GRIDS[0][2:4]
    q, k, v = _qkv(*GRIDS[0], seed=14)
    with torch.no_grad(), pytest.raises(type(exhausted), match="memory"):
        fused_view_time_attention(q, k, v, V, T)
    assert attention._flex_failed_device_types == set()
    with torch.no_grad():
        assert select_implementation(q, k, v, "auto") == "flex"


@pytest.mark.parametrize("grid", GRIDS + EDGE_GRIDS)
def test_merged_matches_reference(grid):
    V, T = grid[2:4]
    q, k, v = _qkv(*grid, seed=21)
    with torch.no_grad():
        out = fused_view_time_attention(q, k, v, V, T, impl="merged")
    error = (out - _reference(q, k, v, V, T)).abs().max().item()
    print(f"merged vs reference {grid}: max abs error {error:.2e}")
    assert error < 2e-5


def test_merged_is_exact_with_large_scores_and_keeps_the_dtype():
    V, T = GRIDS[1][2:4]
    q, k, v = _qkv(*GRIDS[1], seed=22)
    q = q * 12.0  # softmax nearly one-hot: the two streams' weights differ by exp(+-large)
    with torch.no_grad():
        out = fused_view_time_attention(q, k, v, V, T, impl="merged")
        assert (out - _reference(q, k, v, V, T)).abs().max().item() < 1e-4
        low = [t.bfloat16() for t in (q, k, v)]
        out16 = fused_view_time_attention(*low, V, T, impl="merged")
        rounded = _reference(*(t.float() for t in low), V, T)  # same inputs, float32
    assert out16.dtype == torch.bfloat16
    assert (out16.float() - rounded).abs().max().item() < 0.05


def test_merged_other_views_window_is_a_strided_view_of_each_timestep_twice():
    G, V, T, P, hd = 2, 4, 3, 2, 1
    # label every token with its (view, timestep) so the window's frames can be read off
    labels = torch.zeros(G, V, T, P, hd)
    for view in range(V):
        for step in range(T):
            labels[:, view, step] = 10 * view + step
    window = _other_views(labels)  # [G*T, V, (V-1)*P, hd]
    assert window.shape == (G * T, V, (V - 1) * P, hd)
    assert window.untyped_storage().nbytes() == 2 * labels.numel() * labels.element_size()
    for g in range(G):
        for step in range(T):
            for view in range(V):
                frames = window[g * T + step, view, ::P, 0].tolist()
                assert frames == [10 * ((view + d) % V) + step for d in range(1, V)]


def test_merged_with_packed_qkv_one_token_frames_and_float64():
    B, nh, V, T, P = 2, 3, 3, 4, 1
    generator = torch.Generator().manual_seed(24)
    # q, k, v as a model makes them: non-contiguous slices of one packed projection
    packed = torch.randn(B, V * T * P, 3, nh, HEAD_DIM, generator=generator)
    q, k, v = packed.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, nh, N, hd], strided
    assert not q.is_contiguous()
    with torch.no_grad():
        out = fused_view_time_attention(q, k, v, V, T, impl="merged")
        expected = _reference(*(t.double() for t in (q, k, v)), V, T)
        assert (out.double() - expected).abs().max().item() < 2e-6
        out64 = fused_view_time_attention(*(t.double() for t in (q, k, v)), V, T,
                                          impl="merged")
    assert out64.dtype == torch.float64
    assert (out64 - expected).abs().max().item() < 1e-12  # merged in float64, not float32


@pytest.mark.parametrize("path", ["cpu flash kernel", "plain matmuls"])
def test_merged_in_half_precision_stays_finite_and_close(path, monkeypatch):
    from backend.diffusion import merged_attention

    if path == "plain matmuls":  # the path that serves devices without the CPU kernel
        monkeypatch.setattr(merged_attention, "_CPU_FLASH_DTYPES", ())
    V, T = GRIDS[1][2:4]
    q, k, v = _qkv(*GRIDS[1], seed=23)
    q, k, v = q * 3.0, k * 3.0, v.half()  # random scores whose softmax is float16-rounded
    with torch.no_grad():
        out = fused_view_time_attention(q.half(), k.half(), v, V, T, impl="merged")
        expected = _reference(q.half().double(), k.half().double(), v.double(), V, T)
        assert out.dtype == torch.float16 and torch.isfinite(out).all()
        assert (out.double() - expected).abs().max().item() < 5e-3
        # every raw score 70 * 70 * 16 = 78400, past float16's largest value (65504)
        big = torch.full_like(v, 70.0)
        out = fused_view_time_attention(big, big, v, V, T, impl="merged")
        expected = _reference(big.double(), big.double(), v.double(), V, T)  # key means
    assert torch.isfinite(out).all()
    assert (out.double() - expected).abs().max().item() < 2e-3


def test_merged_with_grad_raises():
    q, k, v = _qkv(*GRIDS[0], requires_grad=True)
    with pytest.raises(ValueError, match="no backward pass"):
        fused_view_time_attention(q, k, v, 2, 3, impl="merged")


def test_flex_with_grad_on_cpu_raises():
    q, k, v = _qkv(*GRIDS[0], requires_grad=True)
    with pytest.raises(ValueError, match="no backward on the CPU"):
        fused_view_time_attention(q, k, v, 2, 3, impl="flex")


@pytest.mark.gpu
@pytest.mark.parametrize("grid", FLEX_GRIDS)
def test_flex_gradients_match_reference_on_cuda(grid):
    V, T = grid[2:4]
    q, k, v = (t.cuda().requires_grad_(True) for t in _qkv(*grid, seed=7))
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(8)).cuda()
    expected = torch.autograd.grad(_reference(q, k, v, V, T), (q, k, v), grad_out)
    out = fused_view_time_attention(q, k, v, V, T, impl="flex")
    torch.testing.assert_close(out, _reference(q, k, v, V, T), rtol=0, atol=1e-4)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-3)


def _masked_sdpa(q, k, v, mask):  # mask [N, N]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _grid_index(V, T, P):  # views and timesteps of the N flattened tokens, each [N]
    index = torch.arange(V * T * P)
    return index // (T * P), (index // P) % T


@pytest.mark.parametrize("grid", GRIDS[:2] + EDGE_GRIDS)
def test_view_and_time_attention_match_masked_sdpa(grid):
    V, T, P = grid[2:]
    q, k, v = _qkv(*grid, seed=9)
    view, step = _grid_index(V, T, P)
    same_view = view[:, None] == view[None, :]
    same_step = step[:, None] == step[None, :]
    torch.testing.assert_close(view_attention(q, k, v, V, T),
                               _masked_sdpa(q, k, v, same_view), rtol=0, atol=1e-5)
    torch.testing.assert_close(time_attention(q, k, v, V, T),
                               _masked_sdpa(q, k, v, same_step), rtol=0, atol=1e-5)
    torch.testing.assert_close(full_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_fused_differs_from_view_and_time_alone():
    V, T = GRIDS[1][2:4]
    q, k, v = _qkv(*GRIDS[1], seed=10)
    fused = fused_view_time_attention(q, k, v, V, T, impl="reference")
    for partial in (view_attention(q, k, v, V, T), time_attention(q, k, v, V, T)):
        assert (fused - partial).abs().max() > 1e-3


@pytest.mark.parametrize("shape, views, steps, message", [
    ((1, 1, 30, 8), 4, 3, "multiple"),
    ((1, 30, 8), 2, 3, r"\[B, nh, N, hd\]"),
    ((1, 1, 30, 8), 0, 3, "num_views"),
])
def test_bad_input_raises(shape, views, steps, message):
    x = torch.zeros(shape)
    for impl in ("reference", "decomposed", "auto"):
        with pytest.raises(ValueError, match=message):
            fused_view_time_attention(x, x, x, views, steps, impl=impl)


def test_mismatched_shapes_raise():
    q = torch.zeros(1, 1, 12, 8)
    with pytest.raises(ValueError, match="shapes differ"):
        fused_view_time_attention(q, q, torch.zeros(1, 1, 12, 4), 2, 3, impl="decomposed")


def test_attention_bench_times_the_chosen_kernels_and_pairs_the_rounds():
    from backend.tools.bench.attention import AttentionBenchConfig, time_shape

    config = AttentionBenchConfig(num_heads=2, head_dim=8, repeats=3, kernels=("merged",))
    result = time_shape(2, 3, 4, config, torch.device("cpu"))
    assert set(result["times_s"]) == {"merged_fwd", "full_fwd"}
    assert result["fastest_exact"] == "merged" and result["error_baseline"] == "decomposed"
    assert result["max_abs_err"]["merged"] < 1e-5
    assert len(result["paired_speedups"]) == 3
    assert result["paired_speedup_median"] == sorted(result["paired_speedups"])[1]
    assert result["ideal_speedup"] == pytest.approx(6 / 4)
    # a shape where no exact kernel could run still reports, without a speedup
    config = AttentionBenchConfig(num_heads=2, head_dim=8, repeats=1, kernels=("reference",),
                                  reference_mask_cap_bytes=0)
    result = time_shape(2, 3, 4, config, torch.device("cpu"))
    assert result["speedup_vs_full"] is None and "reference skipped" in result["notes"][0]


def test_attention_bench_refuses_a_kernel_list_without_an_exact_forward():
    from backend.tools.bench.attention import main

    with pytest.raises(ValueError, match="at least one exact forward kernel"):
        main(["--quick", "--only", "decomposed_fwd_bwd"])
    with pytest.raises(ValueError, match="unknown kernels"):
        main(["--quick", "--only", "merged,warp"])
