"""The fitting stage: initialisation from the rig, density control, persistent identities,
rigidity losses, and a scene rendered by our rasterizer fitted back from its own renders."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from backend.cameras import c2w_to_viewmat, intrinsics_to_K, orbit_rig
from backend.fit import FitCancelled, FitConfig, FitTarget, fit_gaussians
from backend.fit import environment as environment_module
from backend.fit.density import GradientStats, densify_and_prune, reset_opacity
from backend.fit.environment import Environment
from backend.fit.init import InitPoints, plane_sweep_init, prior_points
from backend.fit.losses import nearest_neighbours, neighbour_weights, rigidity_losses
from backend.fit.state import FitGaussians, quat_multiply, quat_to_matrix
from backend.gaussians import Gaussians
from backend.render import rasterize_gaussians
from backend.tools.bench.fit import SKY, textured_scene

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BACKGROUND = torch.tensor(SKY)


def ring(num: int, size: int, height: float = 2.0, start: float = 0.0):
    return orbit_rig(num, radius=4.0, camera_height=height, focal=1.1 * size, width=size,
                     height=size, start_angle=start)


def renders(g: Gaussians, c2w, intr) -> torch.Tensor:  # -> [C, 3, H, W]
    """The scene's frames, drawn in the mode the fit renders in by default."""
    return rasterize_gaussians(g, c2w, intr, background=BACKGROUND,
                               rasterize_mode=FitConfig().rasterize_mode).rgb.permute(0, 3, 1, 2)


def over_environment(g: Gaussians, c2w, intr, report, mode: str) -> torch.Tensor:
    """Renders [C, H, W, 3] in the fit's rasterize mode over its learned environment (what
    rays that miss the Gaussians see)."""
    out = rasterize_gaussians(g, c2w, intr, rasterize_mode=mode)
    H, W = out.rgb.shape[1:3]
    behind = Environment.from_list(report.environment).image(
        c2w_to_viewmat(torch.as_tensor(c2w).float()),
        intrinsics_to_K(torch.as_tensor(intr).float()), W, H)
    return out.rgb + (1 - out.alpha) * behind


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(-10 * torch.log10((a - b).square().mean()))


def target(images, c2w, intr) -> FitTarget:  # one timestep: [V, 3, H, W]
    V = len(images)
    return FitTarget(images[:, None], torch.tensor(c2w)[:, None].float(),
                     torch.tensor(intr)[:, None].float(), torch.ones(V, 1))


def test_plane_sweep_puts_points_on_the_textured_surfaces():
    scene = textured_scene()
    c2w, intr = ring(8, 48)
    points = plane_sweep_init(renders(scene, c2w, intr), torch.tensor(c2w).float(),
                              torch.tensor(intr).float(), FitConfig(init_resolution=48),
                              torch.Generator().manual_seed(0))
    distance = torch.cdist(points.means, torch.tensor(scene.means)).min(dim=1).values
    assert len(points.means) > 1000
    # a point spread at random through the scene's box is this close about 1 time in 10
    assert (distance < 0.15).float().mean() > 0.7 and distance.median() < 0.12
    sky = points.means[:, 2] > 1.5  # nothing sits in the flat sky
    assert sky.float().mean() < 0.02
    # the ground (z = -0.5) is found, and the points seeded on it are flagged and lie on it
    normal, offset = points.plane
    assert normal[2] > 0.99 and abs(float(offset) - 0.5) < 0.08  # 2% of the distance
    assert points.ground.float().mean() > 0.3
    assert (points.means[points.ground] @ normal + offset).abs().max() < 1e-4


def test_feed_forward_points_join_only_where_they_agree_with_the_frames():
    """A feed-forward prior is used only where it agrees with the inputs: the scene's own
    ground points mostly pass; the same points twice as far (the tiny model's failure on
    open scenes) or lifted off the ground mostly do not."""
    scene = textured_scene()
    c2w, intr = ring(8, 48)
    images = renders(scene, c2w, intr)
    c2w_t, intr_t = torch.tensor(c2w).float(), torch.tensor(intr).float()
    stereo = plane_sweep_init(images, c2w_t, intr_t, FitConfig(init_resolution=48),
                              torch.Generator().manual_seed(0))
    ground = torch.tensor(scene.means[:1600])  # textured_scene's ground comes first
    sizes = torch.full((len(ground),), 0.05)

    def kept(means: torch.Tensor) -> float:
        points = prior_points(means, sizes, images, c2w_t, intr_t, stereo, len(means))
        return len(points.means) / len(means)

    assert kept(ground) > 0.6
    assert kept(ground * 2.0) < 0.25
    assert kept(ground + torch.tensor([0.0, 0.0, 0.3])) < 0.25
    right = prior_points(ground, sizes, images, c2w_t, intr_t, stereo, 100)
    assert len(right.means) == 100 and right.colors.shape == (100, 3)  # the cap
    # with no stereo to check depth against, colour agreement alone decides
    unmatched = InitPoints(stereo.means, stereo.colors, stereo.sizes, matched=False)
    assert len(prior_points(ground, sizes, images, c2w_t, intr_t, unmatched, 10**6).means) > 0


def test_fitting_recovers_the_renders_of_a_scene_and_beats_copying_at_new_cameras():
    scene = textured_scene()
    c2w, intr = ring(8, 40)
    held_c2w, held_intr = ring(3, 40, height=2.5, start=0.4)
    config = FitConfig.preset("fast", static_steps=200, init_resolution=40, views_per_step=4)
    seq, _background, report = fit_gaussians([target(renders(scene, c2w, intr), c2w, intr)],
                                            config)
    assert len(seq) == 1 and report.steps["fit"] == 200
    fitted = over_environment(seq[0], c2w, intr, report, config.rasterize_mode)
    truth = renders(scene, c2w, intr).permute(0, 2, 3, 1)
    assert psnr(fitted, truth) > 35.0
    held_truth = renders(scene, held_c2w, held_intr)
    held = over_environment(seq[0], held_c2w, held_intr, report,
                            config.rasterize_mode)
    mean_colour = held_truth.mean(dim=(0, 2, 3), keepdim=True).expand_as(held_truth)
    assert psnr(held.permute(0, 3, 1, 2), held_truth) > psnr(mean_colour, held_truth) + 6.0


def ground_thickness(g: Gaussians) -> np.ndarray:
    """Per Gaussian on the fit's ground plane (the height most Gaussians share: the plane
    holds the ground's at one height), its extent along z over its mean size."""
    heights, counts = np.unique(g.means[:, 2], return_counts=True)
    on = g.means[:, 2] == heights[counts.argmax()]
    assert on.mean() > 0.5
    axes = quat_to_matrix(torch.tensor(g.quats[on])).numpy()  # columns the axes
    scales = np.exp(g.log_scales[on])
    along = np.linalg.norm(axes[:, 2, :] * scales, axis=1)
    return along / np.cbrt(scales.prod(axis=1))


def test_ground_flatness_makes_the_grounds_splats_flat():
    """The ring sees the ground at grazing angles; with the flatness term its splats come out
    as flat discs on the plane instead of round blobs (grain when seen from above)."""
    scene = textured_scene(ground_side=24)
    c2w, intr = ring(6, 32)
    images = renders(scene, c2w, intr)
    ratios = {}
    for weight in (0.0, 0.1):
        config = FitConfig.preset("fast", static_steps=80, init_resolution=32,
                                  ground_flatness=weight)
        seq, _, _ = fit_gaussians([target(images, c2w, intr)], config)
        ratios[weight] = float(np.median(ground_thickness(seq[0])))
    assert ratios[0.0] > 0.8 and ratios[0.1] < 0.75 * ratios[0.0], ratios


def test_moving_scene_keeps_identities_and_appearance_across_timesteps():
    c2w, intr = ring(6, 32)
    steps = [renders(textured_scene(blob_offset=(0.15 * t, 0.0, 0.2)), c2w, intr)
             for t in range(3)]
    images = torch.stack(steps, dim=1)  # [V, T, 3, H, W]
    T = images.shape[1]
    cams = torch.tensor(c2w)[:, None].float().expand(-1, T, -1, -1)
    intrs = torch.tensor(intr)[:, None].float().expand(-1, T, -1)
    config = FitConfig.preset("fast", static_steps=60, track_steps=15, init_resolution=32)
    seq, _, report = fit_gaussians([FitTarget(images, cams, intrs, torch.ones(6, T))], config)
    assert len(seq) == T and len({len(g) for g in seq}) == 1
    for g in seq[1:]:
        np.testing.assert_array_equal(g.sh0, seq[0].sh0)
        np.testing.assert_array_equal(g.log_scales, seq[0].log_scales)
    assert report.steps["track"] == 2 * 15
    red = seq[0].sh0[:, 0] > seq[0].sh0[:, 2] + 1.0  # the blob's Gaussians
    shift = (seq[2].means[red] - seq[0].means[red]).mean(axis=0)
    assert shift[0] > 0.1, shift  # the blob moved +x by 0.3; the fit followed it


def test_density_control_keeps_the_count_under_its_cap():
    generator = torch.Generator().manual_seed(0)
    n = 500
    g = FitGaussians.from_points(torch.randn(n, 3), torch.rand(n, 3), torch.full((n,), 0.05),
                                 0.5, num_steps=2)
    with torch.no_grad():
        g.opacity_logits[:50] = -10.0  # transparent: pruned
    stats = GradientStats()
    viewmats = torch.eye(4)[None].clone()
    viewmats[0, 2, 3] = 5.0
    Ks = torch.tensor([[[50.0, 0, 32], [0, 50.0, 32], [0, 0, 1]]])
    stats.add(torch.full((n, 3), 1.0), g.means[0].detach(), viewmats, Ks, 64)
    result = densify_and_prune(g, stats, grad_threshold=1e-6, split_size=0.04,
                               prune_opacity=0.02, max_size=10.0, max_count=700,
                               generator=generator)
    assert len(g) <= 700 and result["count"] == len(g)
    assert result["split"] > 0 and len(g.means) == len(g.quats) == 2
    assert all(len(m) == len(g) for m in g.means)
    assert (torch.sigmoid(g.opacity_logits) >= 0.02).all()


def test_ground_gaussians_stay_on_the_plane_through_density_control():
    generator = torch.Generator().manual_seed(0)
    n = 400
    means = torch.randn(n, 3)
    g = FitGaussians.from_points(means, torch.rand(n, 3), torch.full((n,), 0.05), 0.5,
                                 num_steps=2)
    g.ground = torch.arange(n) % 2 == 0
    normal, offset = torch.nn.functional.normalize(torch.tensor([0.2, 0.1, 1.0]), dim=0), \
        torch.tensor(0.3)
    with torch.no_grad():
        g.means[1] += 0.1  # timestep 1 elsewhere
    free = [m[~g.ground].detach().clone() for m in g.means]
    g.hold_on_plane(normal, offset)
    for m, before in zip(g.means, free, strict=True):
        assert (m[g.ground] @ normal + offset).abs().max() < 1e-5  # on the plane
        torch.testing.assert_close(m[~g.ground], before)  # the others untouched
    torch.testing.assert_close(g.means[0][g.ground], g.means[1][g.ground])  # static
    # density control hands the flag on to clones and split halves
    stats = GradientStats()
    viewmats = torch.eye(4)[None].clone()
    viewmats[0, 2, 3] = 5.0
    Ks = torch.tensor([[[50.0, 0, 32], [0, 50.0, 32], [0, 0, 1]]])
    stats.add(torch.full((n, 3), 1.0), g.means[0].detach(), viewmats, Ks, 64)
    densify_and_prune(g, stats, grad_threshold=1e-6, split_size=0.15, prune_opacity=0.02,
                      max_size=10.0, max_count=1200, generator=generator)
    assert len(g.ground) == len(g) > n and 0.4 < g.ground.float().mean() < 0.6
    g.hold_on_plane(normal, offset)
    assert (g.means[1][g.ground] @ normal + offset).abs().max() < 1e-5
    # the ground is a surface: kept opaque, spared by opacity resets
    g.hold_on_plane(normal, offset, opacity=0.8)
    assert (torch.sigmoid(g.opacity_logits[g.ground]) >= 0.8 - 1e-5).all()
    assert (torch.sigmoid(g.opacity_logits[~g.ground]) < 0.6).all()
    reset_opacity(g, 0.01, spare=g.ground)
    assert (torch.sigmoid(g.opacity_logits[g.ground]) >= 0.8 - 1e-5).all()
    assert (torch.sigmoid(g.opacity_logits[~g.ground]) <= 0.01 + 1e-6).all()


def test_3d_filter_bounds_thinness_keeps_the_integral_and_is_exported():
    # Two Gaussians in front of one camera (focal 50 px) at depths 5 and 10, one behind it.
    means = torch.tensor([[0.0, 0.0, 5.0], [0.0, 0.0, 10.0], [0.0, 0.0, -3.0]])
    g = FitGaussians.from_points(means, torch.rand(3, 3), torch.full((3,), 0.05), 0.5,
                                 num_steps=2)
    with torch.no_grad():
        g.log_scales[:] = torch.log(torch.tensor([0.3, 0.3, 1e-5]))  # flat discs
    c2w = torch.eye(4)[None]
    intr = torch.tensor([[50.0, 50.0, 32.0, 32.0, 64.0, 64.0]])
    g.set_filter([c2w, torch.zeros(0, 4, 4)], [intr, torch.zeros(0, 6)], 0.2)
    footprint = torch.tensor([5.0, 10.0, 10.0]) / 50.0  # unseen: the coarsest seen one
    torch.testing.assert_close(g.filter_var, 0.2 * footprint ** 2)
    scales, opacities = (x.detach() for x in g.filtered())
    assert (scales[:, 2] >= math.sqrt(0.2) * footprint * 0.999).all()  # no thinner than it
    raw = torch.exp(g.log_scales.detach())
    torch.testing.assert_close(opacities * scales.prod(dim=-1),
                               torch.sigmoid(g.opacity_logits.detach()) * raw.prod(dim=-1))
    exported = g.to_gaussians()[1]
    np.testing.assert_allclose(np.exp(exported.log_scales), scales.numpy(), rtol=1e-5)
    np.testing.assert_allclose(1 / (1 + np.exp(-exported.opacity_logits)), opacities.numpy(),
                               rtol=1e-4)
    g.select(torch.tensor([True, False, True]))  # the filter follows its Gaussians
    torch.testing.assert_close(g.filter_var, 0.2 * footprint[[0, 2]] ** 2)


def test_rigidity_losses_vanish_for_a_rigid_motion_only():
    torch.manual_seed(0)
    points = torch.randn(200, 3)
    quats = torch.nn.functional.normalize(torch.randn(200, 4), dim=-1)
    angle = 0.4
    turn = torch.tensor([math.cos(angle / 2), 0.0, 0.0, math.sin(angle / 2)])
    moved = points @ quat_to_matrix(turn).T + torch.tensor([1.0, -2.0, 0.5])
    moved_quats = quat_multiply(turn.expand(200, 4), quats)
    neighbours, distances = nearest_neighbours(points, 6)
    weights = neighbour_weights(distances)
    losses = rigidity_losses(moved, moved_quats, points, quats, points, neighbours, weights)
    assert all(float(x) < 1e-5 for x in losses), losses
    bent = moved + 0.1 * torch.randn_like(moved)
    losses = rigidity_losses(bent, moved_quats, points, quats, points, neighbours, weights)
    assert float(losses[0]) > 1e-2 and float(losses[2]) > 1e-3


def test_fit_is_deterministic_and_cancellable():
    scene = textured_scene()
    c2w, intr = ring(4, 24)
    tgt = target(renders(scene, c2w, intr), c2w, intr)
    config = FitConfig.preset("fast", static_steps=20, init_resolution=24, seed=3)
    first, _, _ = fit_gaussians([tgt], config)
    again, _, _ = fit_gaussians([tgt], config)
    np.testing.assert_allclose(first[0].means, again[0].means, atol=1e-5)
    calls = []
    with pytest.raises(FitCancelled):
        fit_gaussians([tgt], config, progress=lambda *a: calls.append(a),
                      should_cancel=lambda: len(calls) >= 1)


def test_targets_and_configs_refuse_bad_input():
    with pytest.raises(ValueError, match="images must be"):
        FitTarget(torch.zeros(2, 3, 8, 8), torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 6),
                  torch.ones(2, 1))
    with pytest.raises(ValueError, match="weights must be"):
        FitTarget(torch.zeros(2, 1, 3, 8, 8), torch.eye(4).expand(2, 1, 4, 4),
                  torch.ones(2, 1, 6), torch.ones(2, 2))
    with pytest.raises(ValueError, match="preset"):
        FitConfig.preset("best")
    with pytest.raises(ValueError, match="rasterize_mode"):
        FitConfig(rasterize_mode="mip")
    with pytest.raises(ValueError, match="no cell"):
        c2w, intr = ring(2, 8)
        fit_gaussians([FitTarget(torch.zeros(2, 1, 3, 8, 8), torch.tensor(c2w)[:, None].float(),
                                 torch.tensor(intr)[:, None].float(), torch.zeros(2, 1))])


@pytest.mark.gpu
def test_fit_runs_on_cuda_through_gsplat():
    scene = textured_scene()
    c2w, intr = ring(8, 64)
    tgt = target(renders(scene, c2w, intr), c2w, intr)
    config = FitConfig.preset("fast", init_resolution=64)
    seq, _background, report = fit_gaussians([tgt], config, device="cuda")
    fitted = over_environment(seq[0], c2w, intr, report, config.rasterize_mode)
    assert psnr(fitted.permute(0, 3, 1, 2), renders(scene, c2w, intr)) > 30.0
    assert report.steps["fit"] == config.static_steps


def test_environment_is_a_colour_per_direction():
    c2w, intr = ring(2, 9)
    viewmats = c2w_to_viewmat(torch.tensor(c2w).float())
    Ks = intrinsics_to_K(torch.tensor(intr).float())
    rays = environment_module.ray_directions(viewmats, Ks, 9, 9)
    assert torch.allclose(rays.norm(dim=-1), torch.ones(2, 9, 9), atol=1e-5)
    forward = torch.tensor(c2w[:, :3, 2]).float()  # the centre pixel looks along +z
    assert torch.allclose(rays[:, 4, 4], forward, atol=1e-5)
    flat = Environment.constant(torch.tensor([0.2, 0.5, 0.9]), 2)
    assert torch.allclose(flat.image(viewmats, Ks, 9, 9), torch.tensor([0.2, 0.5, 0.9]),
                          atol=1e-6)
    # a gradient with height (z up) is one degree-1 coefficient: brighter looking up
    coeffs = flat.coeffs.clone()
    coeffs[2] = 0.3
    sky = Environment(coeffs)
    assert (sky(torch.tensor([0.0, 0.0, 1.0])) > sky(torch.tensor([0.0, 0.0, -1.0]))).all()
    assert Environment.from_list(sky.to_list()).coeffs.allclose(coeffs, atol=1e-5)
    with pytest.raises(ValueError, match="coefficients"):
        Environment(torch.zeros(5, 3))
