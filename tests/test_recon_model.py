"""Reconstruction model: shapes, world-frame placement, temporal layers, camera tokens, I/O."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from recon_scene import moving_spheres, orbit_grid, render_scene

from backend.cameras import project_points
from backend.checkpoint import count_parameters, load_pretrained, save_pretrained
from backend.gaussians import GaussianSequence
from backend.recon import GaussianBatch, ReconConfig, ReconModel
from backend.recon.heads import (
    camera_to_pose_encoding,
    matrix_to_quaternion,
    pose_encoding_to_camera,
    quaternion_to_matrix,
    relative_to_reference,
)
from backend.recon.model import offset_activation

SIZE = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def debug_config(**overrides) -> ReconConfig:
    values = dict(patch_size=8, width=32, depth=2, num_heads=2, head_features=16,
                  dense_layers=(0, 0, 1, 1), image_size=(SIZE, SIZE))
    values.update(overrides)
    return ReconConfig(**values)


def make_model(seed: int = 0, **overrides) -> ReconModel:
    torch.manual_seed(seed)
    return ReconModel(debug_config(**overrides)).eval()


def random_frames(num_views: int, num_steps: int, seed: int = 0, size: int = SIZE):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(1, num_views, num_steps, 3, size, size, generator=generator)


def test_forward_shapes_and_ranges():
    model = make_model()
    B, V, T, H, W = 2, 3, 2, 16, 24
    frames = torch.rand(B, V, T, 3, H, W, generator=torch.Generator().manual_seed(1))
    c2w, intr = orbit_grid(V, T, SIZE)
    c2w, intr = c2w.expand(B, -1, -1, -1, -1), intr.expand(B, -1, -1, -1)
    with torch.no_grad():
        out = model(frames, c2w, intr)
    g, N = out.gaussians, V * H * W
    assert g.means.shape == (B, T, N, 3) and g.quats.shape == (B, T, N, 4)
    assert g.scales.shape == (B, T, N, 3) and g.opacities.shape == (B, T, N)
    assert g.colors.shape == (B, T, N, 3)
    assert out.depth.shape == (B, V, T, H, W)
    assert out.pose_encoding.shape == (B, V, T, 9)
    assert out.pred_c2w.shape == (B, V, T, 4, 4) and out.pred_intr.shape == (B, V, T, 6)
    torch.testing.assert_close(g.quats.norm(dim=-1), torch.ones(B, T, N))
    assert (g.scales > 0).all() and (g.opacities > 0).all() and (g.opacities < 1).all()
    assert (out.depth > 0).all()


def test_untrained_head_starts_at_its_documented_values():
    model = make_model()
    c2w, intr = orbit_grid(2, 1, SIZE)
    frames = random_frames(2, 1)
    with torch.no_grad():
        out = model(frames, c2w, intr)
    cfg, g = model.config, out.gaussians
    torch.testing.assert_close(out.depth, torch.full_like(out.depth, cfg.depth_scale),
                               rtol=0.02, atol=0.0)
    torch.testing.assert_close(g.opacities, torch.full_like(g.opacities, 1 / (1 + math.e**2)),
                               rtol=0.02, atol=0.0)
    footprint = cfg.depth_scale / (1.2 * SIZE)
    torch.testing.assert_close(g.scales, torch.full_like(g.scales, 0.5 * footprint),
                               rtol=0.03, atol=0.0)
    pixel_colours = frames.permute(0, 2, 1, 4, 5, 3).reshape(1, 1, -1, 3)
    torch.testing.assert_close(g.colors, pixel_colours, rtol=0.0, atol=0.02)


@pytest.mark.parametrize("drift", [0.0, 0.3])
def test_centres_land_on_true_surface_points(drift):
    """With the true depth given, every pixel's Gaussian sits on the surface it sees, in the
    rig's world frame, for every view and timestep (and an animated rig is followed)."""
    V, T = 3, 2
    c2w, intr = orbit_grid(V, T, SIZE, drift=drift)
    scene = render_scene(moving_spheres(T), c2w, intr, SIZE)
    model = make_model()
    with torch.no_grad():
        out = model(scene.frames, scene.c2w, scene.intr, known_depth=scene.depth)
    truth = scene.points.permute(0, 2, 1, 3, 4, 5).reshape(1, T, V * SIZE * SIZE, 3)
    torch.testing.assert_close(out.gaussians.means, truth, atol=2e-3, rtol=0.0)
    for v in range(V):  # each view's Gaussians project back onto its own pixel centres
        for t in range(T):
            means = out.gaussians.means[0, t].reshape(V, SIZE * SIZE, 3)[v]
            uv, _ = project_points(means, scene.c2w[0, v, t], scene.intr[0, v, t])
            grid = torch.stack(torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE),
                                              indexing="xy"), -1).reshape(-1, 2) + 0.5
            torch.testing.assert_close(uv, grid.float(), atol=0.02, rtol=0.0)


def test_predicted_depth_is_unprojected_through_the_rig():
    model = make_model()
    c2w, intr = orbit_grid(2, 2, SIZE)
    scene = render_scene(moving_spheres(2), c2w, intr, SIZE)
    with torch.no_grad():
        out = model(scene.frames, c2w, intr)
        again = model(scene.frames, c2w, intr, known_depth=out.depth)
    torch.testing.assert_close(again.gaussians.means, out.gaussians.means)


def test_zero_init_temporal_layers_leave_a_static_scene_identical_across_time():
    V, T = 2, 3
    frames = random_frames(V, 1).expand(1, V, T, 3, SIZE, SIZE).contiguous()
    c2w, intr = orbit_grid(V, T, SIZE)
    model = make_model()
    with torch.no_grad():
        out = model(frames, c2w, intr)
    for t in range(1, T):
        torch.testing.assert_close(out.depth[:, :, t], out.depth[:, :, 0], atol=1e-6, rtol=0)
        torch.testing.assert_close(out.gaussians.means[:, t], out.gaussians.means[:, 0],
                                   atol=1e-6, rtol=0)
    # the same weights without temporal layers give the same outputs: they are the identity
    plain = make_model(use_temporal_attention=False)
    plain.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(plain(frames, c2w, intr).depth, out.depth)
    # once trained away from zero, temporal layers see the timestep and break the symmetry
    with torch.no_grad():
        _, before = model.aggregator(frames)  # [1, V, T, N, 2D]
        for block in model.aggregator.blocks:
            torch.nn.init.normal_(block.frame_temporal.attn.proj.weight, std=0.5)
        _, after = model.aggregator(frames)
    torch.testing.assert_close(before[:, :, 1], before[:, :, 0], atol=1e-6, rtol=0)
    assert (after[:, :, 1] - after[:, :, 0]).abs().max() > 1e-3


@pytest.mark.parametrize("replacement", [True, False])
def test_camera_token_replacement_gives_one_camera_per_view(replacement):
    V, T = 3, 3
    frames = random_frames(V, T, seed=3)
    model = make_model(camera_token_replacement=replacement)
    c2w, intr = orbit_grid(V, T, SIZE)
    with torch.no_grad():
        out = model(frames, c2w, intr)
    spread = (out.pose_encoding - out.pose_encoding[:, :, :1]).abs().amax(dim=(0, 2, 3))  # [V]
    if replacement:
        assert (spread == 0).all()
        assert (out.pred_c2w == out.pred_c2w[:, :, :1]).all()
    else:
        assert (spread > 1e-6).all()


def test_without_a_rig_the_predicted_cameras_place_the_gaussians():
    model = make_model(use_camera_rays=False)
    frames = random_frames(2, 2, seed=4)
    with torch.no_grad():
        out = model(frames)
        placed = model(frames, out.pred_c2w, out.pred_intr)
    torch.testing.assert_close(out.c2w, out.pred_c2w)
    torch.testing.assert_close(placed.gaussians.means, out.gaussians.means)


def test_bad_inputs_raise_value_errors():
    model = make_model()
    frames = random_frames(2, 2)
    c2w, intr = orbit_grid(2, 2, SIZE)
    with pytest.raises(ValueError, match="frames must be"):
        model(frames[0], c2w, intr)
    with pytest.raises(ValueError, match="divisible by patch_size"):
        model(frames[..., :30], c2w, intr)
    with pytest.raises(ValueError, match="channels"):
        model(frames[:, :, :, :2], c2w, intr)
    with pytest.raises(ValueError, match="both c2w and intrinsics"):
        model(frames, c2w)
    with pytest.raises(ValueError, match="rig covers"):
        model(frames, c2w[:, :1], intr[:, :1])
    with pytest.raises(ValueError, match="known_depth"):
        model(frames, c2w, intr, known_depth=-torch.ones(1, 2, 2, SIZE, SIZE))
    with pytest.raises(ValueError, match="NaN"):
        model(frames * float("nan"), c2w, intr)


def test_config_validation_and_presets():
    with pytest.raises(ValueError, match="dense_layers"):
        debug_config(dense_layers=(0, 1, 2, 3))
    with pytest.raises(ValueError, match="num_heads"):
        debug_config(num_heads=3)
    with pytest.raises(ValueError, match="image_size"):
        debug_config(image_size=(30, 32))
    with pytest.raises(ValueError, match="unknown preset"):
        ReconConfig.preset("huge")
    config = ReconConfig.preset("tiny", depth_scale=2.0)
    assert config.depth_scale == 2.0
    assert ReconConfig.from_dict(config.to_dict()) == config


def test_preset_parameter_counts():
    counts = {}
    for name in ("tiny", "small", "vggt-scale"):
        with torch.device("meta"):
            counts[name] = count_parameters(ReconModel(ReconConfig.preset(name)))
    assert 1e6 < counts["tiny"] < 5e6
    assert 50e6 < counts["small"] < 200e6
    # 48 attention blocks of width 1024 (12.6M each) + 48 temporal layers (4.2M each)
    assert 0.8e9 < counts["vggt-scale"] < 0.9e9


def test_save_load_round_trip(tmp_path):
    model = make_model(seed=5)
    save_pretrained(tmp_path / "recon", model, model.config)
    loaded, config = load_pretrained(tmp_path / "recon", ReconModel, ReconConfig)
    assert config == model.config
    frames = random_frames(2, 2, seed=6)
    c2w, intr = orbit_grid(2, 2, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(loaded(frames, c2w, intr).gaussians.means,
                                   model(frames, c2w, intr).gaussians.means, rtol=0, atol=0)


def test_reconstruct_returns_a_sequence_and_drops_transparent_gaussians():
    model = make_model()
    frames = random_frames(2, 3, seed=7)[0].numpy()
    c2w, intr = orbit_grid(2, 3, SIZE)
    seq = model.reconstruct(frames, c2w[0].numpy(), intr[0].numpy(), frame_numbers=[4, 5, 6])
    assert isinstance(seq, GaussianSequence) and seq.frame_numbers == [4, 5, 6]
    assert all(len(g) == 2 * SIZE * SIZE for g in seq)
    batch = GaussianBatch(
        means=torch.zeros(1, 1, 4, 3), quats=torch.tensor([1.0, 0, 0, 0]).expand(1, 1, 4, 4),
        scales=torch.full((1, 1, 4, 3), 0.1), opacities=torch.tensor([[[0.001, 0.2, 0.5, 0.9]]]),
        colors=torch.rand(1, 1, 4, 3))
    kept = batch.to_sequence(min_opacity=0.1)[0]
    np.testing.assert_allclose(kept.opacities, [0.2, 0.5, 0.9], rtol=1e-5)
    with pytest.raises(ValueError, match="min_opacity"):
        batch.to_sequence(min_opacity=1.5)


def test_gradient_checkpointing_gives_the_same_gradients():
    frames = random_frames(2, 2, seed=8)
    c2w, intr = orbit_grid(2, 2, SIZE)
    grads = []
    for checkpointed in (False, True):
        model = make_model(seed=9).train()
        model.aggregator.gradient_checkpointing = checkpointed
        model(frames, c2w, intr).gaussians.means.sum().backward()
        grads.append(model.aggregator.patch_embed.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_rotation_and_pose_encoding_round_trips():
    generator = torch.Generator().manual_seed(10)
    quats = torch.nn.functional.normalize(torch.randn(64, 4, generator=generator), dim=-1)
    quats = torch.where(quats[:, :1] < 0, -quats, quats)
    rot = quaternion_to_matrix(quats)
    torch.testing.assert_close(rot @ rot.transpose(-1, -2), torch.eye(3).expand(64, 3, 3),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(matrix_to_quaternion(rot), quats, atol=1e-5, rtol=0)
    c2w, intr = orbit_grid(3, 2, SIZE, drift=0.2)
    relative = relative_to_reference(c2w.double()).float()
    torch.testing.assert_close(relative[:, 0, 0], torch.eye(4)[None], atol=1e-5, rtol=0)
    decoded_c2w, decoded_intr = pose_encoding_to_camera(
        camera_to_pose_encoding(relative, intr), SIZE, SIZE)
    torch.testing.assert_close(decoded_c2w, relative, atol=1e-5, rtol=0)
    torch.testing.assert_close(decoded_intr, intr)


def test_offset_activation():
    x = torch.tensor([[0.0, 0.0, 0.0], [6.0, 0.0, 0.0], [0.0, 0.0, -7.0]])
    expected = torch.tensor([[0.0, 0.0, 0.0], [1 - math.exp(-6), 0.0, 0.0],
                             [0.0, 0.0, -(math.e - math.exp(-6))]])
    torch.testing.assert_close(offset_activation(x), expected)
