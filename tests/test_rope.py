"""3D rotary position embedding: layout, relative-position property, norm preservation."""

from __future__ import annotations

import pytest
import torch

from backend.diffusion.rope import (
    apply_rope,
    rope_3d_angles,
    rope_3d_positions,
    rope_angles_at,
    rope_axis_pairs,
)


def _scores_after_rope(q, k, positions, head_dim):  # q, k [1, 1, N, hd]; positions [N, 3]
    cos, sin = rope_angles_at(positions, head_dim)
    return apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).transpose(-1, -2)  # [1, 1, N, N]


def test_shapes_and_dtype():
    V, T, h, w, hd = 2, 3, 4, 5, 32
    cos, sin = rope_3d_angles(V, T, h, w, hd, t_max=4)
    assert cos.shape == sin.shape == (V * T * h * w, hd // 2)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x = torch.randn(2, 3, V * T * h * w, hd, generator=torch.Generator().manual_seed(0))
        out = apply_rope(x.to(dtype), cos, sin)
        assert out.shape == x.shape and out.dtype == dtype


def test_axis_split_covers_head_dim():
    assert rope_axis_pairs(64) == (16, 8, 8)
    assert rope_axis_pairs(8) == (2, 1, 1)
    for hd in range(8, 130, 2):
        time_pairs, y_pairs, x_pairs = rope_axis_pairs(hd)
        assert time_pairs + y_pairs + x_pairs == hd // 2
        assert y_pairs == x_pairs >= 1 and time_pairs >= y_pairs


def test_norm_is_preserved():
    generator = torch.Generator().manual_seed(1)
    cos, sin = rope_3d_angles(3, 2, 3, 3, 24, t_max=5)
    x = torch.randn(2, 2, cos.shape[0], 24, generator=generator, dtype=torch.float64)
    out = apply_rope(x, cos, sin)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out, x)


def test_scores_depend_only_on_position_differences():
    generator = torch.Generator().manual_seed(2)
    hd, n = 32, 40
    q = torch.randn(1, 1, n, hd, generator=generator, dtype=torch.float64)
    k = torch.randn(1, 1, n, hd, generator=generator, dtype=torch.float64)
    positions = torch.randint(0, 30, (n, 3), generator=generator)
    shift = torch.tensor([[17, 5, 9]])
    before = _scores_after_rope(q, k, positions, hd)
    after = _scores_after_rope(q, k, positions + shift, hd)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    moved_one_token = positions.clone()
    moved_one_token[0] += torch.tensor([3, 0, 0])
    changed = _scores_after_rope(q, k, moved_one_token, hd)
    assert (changed[0, 0, 0, 1:] - before[0, 0, 0, 1:]).abs().max() > 1e-3


def test_grid_scores_are_shift_invariant_inside_the_grid():
    # Tokens (v0, t0, y0, x0) and (v0, t1, y1, x1) against the same pair moved by one step,
    # one row and one column: same relative offset, same score.
    V, T, h, w, hd, t_max = 1, 3, 3, 3, 16, 3
    cos, sin = rope_3d_angles(V, T, h, w, hd, t_max)
    generator = torch.Generator().manual_seed(3)
    q_vec, k_vec = torch.randn(2, hd, generator=generator, dtype=torch.float64)

    def token(t, y, x):
        return (t * h + y) * w + x

    def score(query_token, key_token):
        x = torch.zeros(1, 1, cos.shape[0], hd, dtype=torch.float64)
        x[0, 0, query_token], x[0, 0, key_token] = q_vec, k_vec
        rotated = apply_rope(x, cos, sin)[0, 0]
        return rotated[query_token] @ rotated[key_token]

    first = score(token(0, 0, 0), token(1, 1, 0))
    shifted = score(token(1, 1, 1), token(2, 2, 1))
    torch.testing.assert_close(shifted, first, rtol=1e-5, atol=1e-5)


def test_views_continue_the_time_axis_at_t_max():
    hd, t_max, h, w = 16, 4, 2, 3
    positions = rope_3d_positions(2, 2, h, w, t_max)  # [N, 3]
    view1_t0 = 1 * 2 * h * w  # token (v=1, t=0, y=0, x=0)
    assert positions[view1_t0].tolist() == [t_max, 0, 0]
    cos, sin = rope_3d_angles(2, 2, h, w, hd, t_max)
    # In a single-view grid long enough to reach t = t_max, that token has the same angles.
    long_cos, long_sin = rope_3d_angles(1, t_max + 1, h, w, hd, t_max + 1)
    view0_tmax = t_max * h * w  # token (v=0, t=t_max, y=0, x=0)
    torch.testing.assert_close(cos[view1_t0], long_cos[view0_tmax])
    torch.testing.assert_close(sin[view1_t0], long_sin[view0_tmax])
    time_pairs = rope_axis_pairs(hd)[0]
    # Fewer timesteps than t_max: view 1 still starts at time position t_max, not at T.
    short_cos, _ = rope_3d_angles(2, 1, h, w, hd, t_max)
    torch.testing.assert_close(short_cos[h * w, :time_pairs], cos[view1_t0, :time_pairs])


def test_positions_follow_v_t_y_x_order():
    V, T, h, w, t_max = 2, 3, 2, 4, 5
    positions = rope_3d_positions(V, T, h, w, t_max)
    for v in range(V):
        for t in range(T):
            for y in range(h):
                for x in range(w):
                    index = ((v * T + t) * h + y) * w + x
                    assert positions[index].tolist() == [v * t_max + t, y, x]


def test_angles_are_cached_per_shape():
    first = rope_3d_angles(2, 2, 2, 2, 16, 3)
    assert rope_3d_angles(2, 2, 2, 2, 16, 3)[0] is first[0]
    assert rope_3d_angles(2, 2, 2, 2, 16, 4)[0] is not first[0]


@pytest.mark.parametrize("kwargs, message", [
    ({"head_dim": 6}, "head_dim"),
    ({"head_dim": 15}, "head_dim"),
    ({"num_steps": 5, "t_max": 4}, "t_max"),
    ({"num_views": 0}, "num_views"),
])
def test_bad_arguments_raise(kwargs, message):
    args = {"num_views": 2, "num_steps": 2, "h": 2, "w": 2, "head_dim": 16, "t_max": 4} | kwargs
    with pytest.raises(ValueError, match=message):
        rope_3d_angles(**args)


def test_apply_rope_rejects_mismatched_angles():
    cos, sin = rope_3d_angles(1, 2, 2, 2, 16, 2)
    with pytest.raises(ValueError, match="cos and sin"):
        apply_rope(torch.zeros(1, 1, 9, 16), cos, sin)
