"""The open scene family: ground plane under a sky with no dome, depth that puts the ground
where it is, shadows, rigs from 1.5 to 15 units, determinism and the mixed family."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from test_data import pooled_reprojection

from backend.cameras import project_points, unproject_depth
from backend.data import DataConfig, make_sample
from backend.data.augment import flip_horizontal
from backend.data.dataset import load_sample, save_sample
from backend.data.generator import NEAR, far_plane, scene_family
from backend.data.open_render import render_open_views
from backend.data.open_scenes import Light, LitState, random_open_scene, visibility
from backend.data.rigs import sample_open_rig

OPEN = DataConfig(num_views=4, num_steps=2, height=32, width=32, seed=11, scene_kind="open",
                  reverse_views_probability=0.0)


@pytest.fixture(scope="module")
def open_samples():
    return [make_sample(OPEN, i, kind="dynamic") for i in range(10)]


def test_open_samples_show_sky_and_no_dome(open_samples):
    views_with_sky = views = 0
    for sample in open_samples:
        assert sample.family == "open" and sample.scene_info["ground_half_size"] > 0
        sky = sample.alpha[:, :, 0] < OPEN.empty_alpha  # [V, T, H, W]
        assert (sample.depth[:, :, 0][sky] == 0).all()
        assert (sample.depth[sample.alpha > 0.5] > 0).all()
        views_with_sky += int(sky[:, 0, :4].flatten(1).float().mean(-1).gt(0.1).sum())
        views += sample.num_views
    assert views_with_sky > 0.5 * views, "the sky should be in view above the horizon"


def test_sky_pixels_look_up_and_ground_pixels_lie_on_the_ground():
    config = replace(OPEN, height=24, width=40)  # non-square: square pixels, centred
    ground_share = []
    for index in range(4):
        sample = make_sample(config, index, kind="static")
        height = sample.scene_info["ground_height"]
        covered = sample.alpha[:, 0, 0] > 0.999  # [V, H, W]
        points = unproject_depth(sample.depth[:, 0, 0].double(), sample.c2w[:, 0].double(),
                                 sample.intrinsics[:, 0].double())  # [V, H, W, 3]
        z = points[..., 2][covered]
        assert (z > height - 1e-3 * sample.scene_info["scale"]).all(), "below the ground"
        on_ground = (z - height).abs() < 1e-4 * (1.0 + abs(height))
        ground_share.append(float(on_ground.float().mean()))
        eye_z = sample.c2w[:, 0, 2, 3]  # rays from the camera to ground points go down
        assert (points[..., 2][covered][on_ground] < eye_z.max()).all()
    assert min(ground_share) > 0.2, "the ground should fill much of every view"


def test_ground_and_object_pixels_reproject_across_views():
    config = replace(OPEN, num_views=3, height=40, width=40, arc_deg=(30.0, 40.0),
                     open_rig_weights={"arc": 1.0}, open_camera_distance=(3.0, 6.0))
    samples = [make_sample(config, i, kind="static") for i in range(2)]
    matched, colour_errors = pooled_reprojection(samples)
    assert matched > 0.7
    assert colour_errors.median() < 0.02 and colour_errors.quantile(0.9) < 0.08
    flipped = [flip_horizontal(sample) for sample in samples]
    assert pooled_reprojection(flipped)[0] > 0.7
    x, y, z = samples[0].scene_info["light_direction"]
    assert flipped[0].scene_info["light_direction"] == [-x, y, z]


def _lit_scene(seed: int = 0):
    """A two-object scene under a high sun, one camera above it."""
    config = replace(OPEN, num_views=3, num_steps=1, height=48, width=48)
    rng = np.random.default_rng(seed)
    _, c2w, intr = sample_open_rig(config, rng, "orbit")
    scene = random_open_scene(rng, c2w, intr, 2, 0.0)
    direction = np.array([0.3, 0.2, 0.93]) / np.linalg.norm([0.3, 0.2, 0.93])
    scene.light = Light("sun", direction, direction[None], np.ones(3), np.full(3, 0.2))
    return config, scene, c2w[:, 0], intr[:, 0]


def test_shadows_darken_the_ground_on_the_side_away_from_the_light():
    config, scene, c2w, intr = _lit_scene()
    state = scene.state_at(0.0)
    far = far_plane(config, "open")
    rgb, depth, alpha = render_open_views(scene, state, c2w, intr, NEAR, far, 0.02)
    unshadowed = LitState(state.gaussians, [[]])
    rgb_free, _, _ = render_open_views(scene, unshadowed, c2w, intr, NEAR, far, 0.02)
    points = unproject_depth(depth[:, 0].double(), torch.as_tensor(c2w),
                             torch.as_tensor(intr))  # [C, H, W, 3]
    ground = ((points[..., 2] - scene.ground.height).abs() < 1e-4) & (alpha[:, 0] > 0.999)
    seen = points[ground].numpy()
    light = visibility(state.shadow_maps, seen)[0]
    shadowed, lit = light < 0.2, light > 0.999
    assert shadowed.sum() > 10 and lit.sum() > 100
    pixels, pixels_free = rgb.permute(0, 2, 3, 1)[ground], rgb_free.permute(0, 2, 3, 1)[ground]
    ratio = pixels[shadowed].mean() / pixels_free[shadowed].mean()
    assert ratio < 0.7, f"shadowed ground should be darker, ratio {ratio:.2f}"
    assert (pixels[lit] - pixels_free[lit]).abs().median() < 1e-3
    towards = scene.light.direction[:2] / np.linalg.norm(scene.light.direction[:2])
    for obj in scene.objects:  # the shadow falls on the side away from the light
        centre, size = obj.motion.start, np.abs(obj.points).max()
        height = centre[2] - scene.ground.height
        behind = centre[:2] - height * scene.light.direction[:2] / scene.light.direction[2]
        before = centre[:2] + 1.5 * size * towards
        on_ground = np.array([[*behind, scene.ground.height], [*before, scene.ground.height]])
        assert np.allclose(visibility(state.shadow_maps, on_ground)[0], [0.0, 1.0], atol=0.05)


def test_open_rigs_span_the_distance_range_and_see_the_scene():
    config = replace(OPEN, num_views=8, num_steps=3)
    distances, kinds = [], set()
    for seed in range(60):
        rng = np.random.default_rng(seed)
        kind, c2w, intr = sample_open_rig(config, rng)
        kinds.add(kind)
        eyes = c2w[..., :3, 3]
        distances.append(float(np.median(np.linalg.norm(eyes, axis=-1))))
        uv, z = project_points(torch.zeros(1, 3, dtype=torch.float64), torch.as_tensor(c2w),
                               torch.as_tensor(intr))
        assert (z > 0).all()
        inside = (uv >= 0) & (uv <= torch.as_tensor(intr[..., None, 4:6]))
        assert inside.all(), f"{kind}: the origin should be in every view"
    low, high = config.open_camera_distance
    assert min(distances) < 2.5 and max(distances) > 10
    assert all(low * 0.99 <= d <= high * 1.01 for d in distances)
    assert kinds == {"orbit", "arc", "jitter", "animated", "rings"}
    _, c2w, _ = sample_open_rig(config, np.random.default_rng(0), "rings")
    elevations = np.round(c2w[:, 0, 2, 3], 6)
    assert len(set(elevations)) >= 2, "rings at several elevations"
    _, c2w, _ = sample_open_rig(config, np.random.default_rng(0), "animated")
    assert (np.linalg.norm(c2w[:, -1, :3, 3] - c2w[:, 0, :3, 3], axis=-1) > 0).all()


@pytest.mark.parametrize("num_views", [1, 8])
def test_open_samples_with_one_to_eight_views(num_views):
    config = replace(OPEN, num_views=num_views, num_steps=2, height=16, width=16)
    sample = make_sample(config, 3)
    assert sample.frames.shape == (num_views, 2, 3, 16, 16)
    assert sample.frames.min() >= 0 and sample.frames.max() <= 1


def test_open_sample_is_deterministic_and_static_kinds_hold_still():
    first, again = make_sample(OPEN, 4), make_sample(OPEN, 4)
    for name in ("frames", "depth", "alpha", "c2w", "intrinsics"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    assert first.scene_info == again.scene_info
    assert not torch.allclose(first.frames, make_sample(OPEN, 5).frames)
    assert not torch.allclose(first.frames, make_sample(replace(OPEN, seed=12), 4).frames)
    still = make_sample(OPEN, 2, kind="static")
    assert torch.equal(still.frames, still.frames[:, :1].expand_as(still.frames))
    moving = make_sample(replace(OPEN, open_rig_weights={"orbit": 1.0}), 2, kind="dynamic")
    assert not torch.allclose(moving.frames[:, 0], moving.frames[:, -1], atol=1e-3)
    warped = make_sample(OPEN, 6, kind="homography")
    assert warped.family == "open" and not warped.geometry_valid


def test_mixed_family_draws_per_sample_and_keeps_dome_samples(tmp_path):
    mixed = replace(OPEN, num_views=2, height=16, width=16, scene_kind="mixed",
                    open_fraction=0.5)
    families = [scene_family(mixed, i) for i in range(400)]
    assert 0.4 < families.count("open") / len(families) < 0.6
    dome_index = families.index("dome")
    dome = make_sample(replace(mixed, scene_kind="dome"), dome_index)
    assert torch.equal(make_sample(mixed, dome_index).frames, dome.frames)
    sample = make_sample(mixed, families.index("open"))
    assert sample.family == "open"
    save_sample(sample, tmp_path / "sample.safetensors")
    loaded = load_sample(tmp_path / "sample.safetensors")
    assert loaded.family == "open" and loaded.scene_info == sample.scene_info


def test_open_config_fields_validate_and_keep_old_fingerprints():
    with pytest.raises(ValueError, match="scene_kind"):
        replace(OPEN, scene_kind="forest")
    with pytest.raises(ValueError, match="open_fraction"):
        replace(OPEN, open_fraction=1.5)
    with pytest.raises(ValueError, match="open_elevation_deg"):
        replace(OPEN, open_elevation_deg=(-10.0, 30.0))
    with pytest.raises(ValueError, match="open_rig_weights"):
        replace(OPEN, open_rig_weights={"spiral": 1.0})
    dome = DataConfig(num_views=2, num_steps=3, height=20, width=24, seed=5)
    assert dome.fingerprint() == "7222a763abde"  # as before the open family existed
    assert replace(dome, scene_kind="open").fingerprint() != dome.fingerprint()
    assert DataConfig.from_dict(OPEN.to_dict()) == OPEN
