"""Reconstruction losses (SSIM, PSNR, depth, render and camera terms) and refinement."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from recon_scene import moving_spheres, orbit_grid, render_scene

from backend.gaussians import Gaussians, GaussianSequence
from backend.recon import (
    GaussianBatch,
    RefineConfig,
    camera_loss,
    depth_l1,
    psnr,
    reconstruction_loss,
    refine,
    sequence_photometric_loss,
    ssim,
)
from backend.recon.heads import camera_to_pose_encoding, relative_to_reference

SIZE = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_ssim_of_identical_images_is_one_and_noise_lowers_it():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 24, 24, generator=generator)
    torch.testing.assert_close(ssim(x, x), torch.ones(2))
    noisy = (x + 0.1 * torch.randn(x.shape, generator=generator)).clamp(0, 1)
    much_noisier = (x + 0.3 * torch.randn(x.shape, generator=generator)).clamp(0, 1)
    assert (ssim(x, much_noisier) < ssim(x, noisy)).all() and (ssim(x, noisy) < 0.99).all()
    torch.testing.assert_close(ssim(x, noisy), ssim(noisy, x))


def test_ssim_of_constant_images_matches_the_closed_form():
    a, b = 0.3, 0.7
    x = torch.full((1, 3, 16, 16), a, dtype=torch.float64)
    y = torch.full((1, 3, 16, 16), b, dtype=torch.float64)
    c1 = 0.01**2
    expected = torch.tensor([(2 * a * b + c1) / (a * a + b * b + c1)], dtype=torch.float64)
    torch.testing.assert_close(ssim(x, y), expected)  # no variance: the structure term is 1
    small = ssim(x[..., :5, :7], y[..., :5, :7])  # window shrinks to 5 for tiny images
    torch.testing.assert_close(small, expected)
    with pytest.raises(ValueError, match="ssim"):
        ssim(x, y[..., :8])


def test_psnr_and_depth_l1():
    x = torch.zeros(4, 4)
    assert math.isclose(float(psnr(x, x + 0.1)), 20.0, rel_tol=1e-5)
    pred = torch.tensor([1.0, 2.0, 5.0, 7.0])
    target = torch.tensor([2.0, 2.0, 0.0, float("inf")])  # last two: no ground truth
    assert math.isclose(float(depth_l1(pred, target)), 0.25)
    mask = torch.tensor([False, True, True, True])
    assert float(depth_l1(pred, target, mask)) == 0.0
    with pytest.raises(ValueError, match="depth shapes"):
        depth_l1(pred, target[:2])


def scene_gaussians(num_views: int, num_steps: int) -> tuple[GaussianBatch, object]:
    """Pixel-aligned Gaussians on the true surfaces of the test scene, one per pixel."""
    c2w, intr = orbit_grid(num_views, num_steps, SIZE)
    scene = render_scene(moving_spheres(num_steps), c2w, intr, SIZE)
    T, N = num_steps, num_views * SIZE * SIZE
    means = scene.points.permute(0, 2, 1, 3, 4, 5).reshape(1, T, N, 3)
    colors = scene.frames.permute(0, 2, 1, 4, 5, 3).reshape(1, T, N, 3)
    footprint = (scene.depth / (1.2 * SIZE)).permute(0, 2, 1, 3, 4).reshape(1, T, N, 1)
    batch = GaussianBatch(means=means, quats=torch.tensor([1.0, 0, 0, 0]).expand(1, T, N, 4),
                          scales=0.7 * footprint.expand(1, T, N, 3),
                          opacities=torch.full((1, T, N), 0.95), colors=colors)
    return batch, scene


def test_reconstruction_loss_renders_targets_and_reaches_the_gaussians():
    batch, scene = scene_gaussians(3, 2)
    batch.means.requires_grad_(True)
    loss = reconstruction_loss(batch, scene.frames, scene.c2w, scene.intr,
                               target_depth=scene.depth)
    assert loss.renders.rgb.shape == scene.frames.shape
    assert float(psnr(loss.renders.rgb.detach(), scene.frames)) > 20.0  # the truth renders well
    assert loss.depth.item() < 0.15 and loss.ssim.item() > 0.5  # blur and blended silhouettes
    loss.total.backward()
    assert torch.isfinite(batch.means.grad).all() and batch.means.grad.abs().sum() > 0
    # rendering timestep 1's targets with timestep 0's Gaussians is worse: the sphere moved
    swapped = reconstruction_loss(batch, scene.frames[:, :, 1:], scene.c2w[:, :, 1:],
                                  scene.intr[:, :, 1:], timesteps=[0])
    matched = reconstruction_loss(batch, scene.frames[:, :, 1:], scene.c2w[:, :, 1:],
                                  scene.intr[:, :, 1:], timesteps=[1])
    assert matched.total.item() < swapped.total.item()


def test_reconstruction_loss_rejects_bad_shapes():
    batch, scene = scene_gaussians(2, 1)
    with pytest.raises(ValueError, match="target_frames"):
        reconstruction_loss(batch, scene.frames[0], scene.c2w, scene.intr)
    with pytest.raises(ValueError, match="target cameras"):
        reconstruction_loss(batch, scene.frames, scene.c2w[:, :1], scene.intr[:, :1])
    with pytest.raises(ValueError, match="target_depth"):
        reconstruction_loss(batch, scene.frames, scene.c2w, scene.intr, scene.depth[..., :4])
    with pytest.raises(ValueError, match="timesteps"):
        reconstruction_loss(batch, scene.frames, scene.c2w, scene.intr, timesteps=[3])


def test_camera_loss_is_zero_at_the_truth_and_grows_with_error():
    c2w, intr = orbit_grid(3, 2, SIZE, drift=0.1)
    truth = camera_to_pose_encoding(relative_to_reference(c2w), intr)
    assert float(camera_loss(truth, c2w, intr)) < 1e-5
    off = truth.clone()
    off[..., :3] += 0.2
    worse = off.clone()
    worse[..., 7:9] += 0.3
    assert 0 < float(camera_loss(off, c2w, intr)) < float(camera_loss(worse, c2w, intr))
    with pytest.raises(ValueError, match="pose_encoding"):
        camera_loss(truth[..., :7], c2w, intr)


def perturbed_sequence(seed: int = 0):
    """The test scene's true Gaussians with jittered centres, colours and opacities."""
    batch, scene = scene_gaussians(2, 2)
    clean = batch.to_sequence()
    rng = np.random.default_rng(seed)
    noisy = [Gaussians(means=g.means + rng.normal(0, 0.02, g.means.shape), quats=g.quats,
                       log_scales=g.log_scales, opacity_logits=g.opacity_logits - 2.0,
                       sh0=g.sh0 + rng.normal(0, 0.5, g.sh0.shape)) for g in clean]
    return GaussianSequence(noisy, [10, 11]), scene


def test_refinement_lowers_the_photometric_loss_of_a_perturbed_scene():
    seq, scene = perturbed_sequence()
    args = (scene.frames[0], scene.c2w[0], scene.intr[0])
    before = sequence_photometric_loss(seq, *args)
    reports = []
    refined = refine(seq, *args, steps=8, lr=0.1,
                     progress=lambda step, total, loss: reports.append((step, total, loss)))
    after = sequence_photometric_loss(refined, *args)
    assert after < 0.5 * before
    assert [r[0] for r in reports] == list(range(1, 9)) and all(r[1] == 8 for r in reports)
    assert reports[-1][2] < reports[0][2]
    assert refined.frame_numbers == [10, 11] and len(refined[0]) == len(seq[0])


def test_refinement_stops_when_cancelled_and_keeps_the_input_at_zero_steps():
    seq, scene = perturbed_sequence(seed=1)
    args = (scene.frames[0].numpy(), scene.c2w[0].numpy(), scene.intr[0].numpy())
    calls = []
    refine(seq, *args, steps=50, lr=0.1, progress=lambda *a: calls.append(a),
           should_cancel=lambda: len(calls) >= 2)
    assert len(calls) == 2
    unchanged = refine(seq, *args, steps=0, lr=0.1, config=RefineConfig(ssim_weight=0.0))
    np.testing.assert_allclose(unchanged[0].means, seq[0].means, atol=1e-6)
    np.testing.assert_allclose(unchanged[1].sh0, seq[1].sh0, atol=1e-6)


def test_refinement_rejects_bad_inputs():
    seq, scene = perturbed_sequence()
    frames, c2w, intr = scene.frames[0], scene.c2w[0], scene.intr[0]
    with pytest.raises(ValueError, match="frames must be"):
        refine(seq, frames[0], c2w, intr, steps=1, lr=0.1)
    with pytest.raises(ValueError, match="timesteps"):
        refine(seq, frames[:, :1], c2w[:, :1], intr[:, :1], steps=1, lr=0.1)
    with pytest.raises(ValueError, match="rig covers"):
        refine(seq, frames, c2w[:1], intr[:1], steps=1, lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        refine(seq, frames, c2w, intr, steps=1, lr=0.0)
