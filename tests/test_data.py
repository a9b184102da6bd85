"""Procedural 4D data: determinism, rig/depth consistency, the data mix, augmentation,
user scene folders and DataLoader datasets."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from backend.cameras import project_points, unproject_depth
from backend.data import (
    DataConfig,
    FolderDataset,
    GeneratedDataset,
    PoolConfig,
    SamplePool,
    make_sample,
    write_scene_folder,
)
from backend.data import dataset as dataset_module
from backend.data.augment import (
    crop_and_resize,
    flip_horizontal,
    homography_views,
    reverse_time,
    warp_images,
)
from backend.data.generator import choose_sample_kind, sample_rng
from backend.data.rigs import sample_rig
from backend.data.scenes import axis_angle_matrix

TINY = DataConfig(num_views=2, num_steps=2, height=24, width=24, max_objects=2, seed=7)
# Neighbouring cameras 15-20 degrees apart, so most surface points are seen by both.
NARROW_ARC = dict(num_views=3, num_steps=2, height=40, width=40, arc_deg=(30.0, 40.0),
                  rig_weights={"arc": 1.0}, static_fraction=0.0, homography_fraction=0.0,
                  reverse_views_probability=0.0, seed=3)


def _sample_at(image: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear values [M, C] of image [C, H, W] at pixel coordinates uv [M, 2]."""
    height, width = image.shape[-2:]
    grid = torch.stack([uv[:, 0] / width * 2 - 1, uv[:, 1] / height * 2 - 1], dim=-1)
    values = F.grid_sample(image[None].float(), grid[None, None].float(), align_corners=False)
    return values[0, :, 0].T


def reprojection(sample, t: int, a: int, b: int, camera_b_offset=None):
    """Surface pixels of view a reprojected into view b at timestep t.

    Returns how many landed inside view b, how many of those land where view b sees a surface
    at the same depth (2%), and the colour differences [K] at those pixels.
    """
    height, width = sample.frames.shape[-2:]
    covered = sample.alpha[a, t, 0] > 0.98
    points = unproject_depth(sample.depth[a, t, 0].double(), sample.c2w[a, t].double(),
                             sample.intrinsics[a, t].double())[covered]  # [M, 3]
    c2w_b = sample.c2w[b, t].double()
    if camera_b_offset is not None:
        c2w_b = c2w_b @ camera_b_offset
    uv, z = project_points(points, c2w_b, sample.intrinsics[b, t].double())
    inside = ((z > 0.1) & (uv[:, 0] >= 1) & (uv[:, 0] < width - 1)
              & (uv[:, 1] >= 1) & (uv[:, 1] < height - 1))
    uv, z = uv[inside], z[inside]
    depth_b = _sample_at(sample.depth[b, t], uv)[:, 0].double()
    alpha_b = _sample_at(sample.alpha[b, t], uv)[:, 0]
    same_surface = ((depth_b - z).abs() < 0.02 * z) & (alpha_b > 0.98)
    colour_a = sample.frames[a, t].permute(1, 2, 0)[covered][inside][same_surface]
    colour_b = _sample_at(sample.frames[b, t], uv[same_surface])
    return int(inside.sum()), int(same_surface.sum()), (colour_a - colour_b).abs().amax(-1)


def pooled_reprojection(samples, camera_b_offset=None) -> tuple[float, torch.Tensor]:
    """Fraction of same-surface landings and colour differences over neighbouring views."""
    landed = matched = 0
    colour_errors = []
    for sample in samples:
        for t in range(sample.num_steps):
            for a in range(sample.num_views - 1):
                n, k, errors = reprojection(sample, t, a, a + 1, camera_b_offset)
                landed, matched = landed + n, matched + k
                colour_errors.append(errors)
    assert landed > 200, "too few pixels landed in the neighbouring view to judge"
    return matched / landed, torch.cat(colour_errors)


def _small_turn(degrees: float) -> torch.Tensor:  # camera-space turn about its y axis
    turn = torch.eye(4, dtype=torch.float64)
    turn[:3, :3] = torch.as_tensor(axis_angle_matrix(np.array([0.0, 1.0, 0.0]),
                                                     math.radians(degrees)))
    return turn


@pytest.fixture(scope="module")
def object_samples():
    config = DataConfig(**NARROW_ARC, backdrop=False)
    return [make_sample(config, i) for i in range(2)]


@pytest.fixture(scope="module")
def backdrop_sample():
    return make_sample(DataConfig(**NARROW_ARC), 0)


# ---------------------------------------------------------------------------------------------
# Determinism, shapes, ranges


def test_same_index_gives_identical_sample_and_other_indices_differ():
    first, again = make_sample(TINY, 3), make_sample(TINY, 3)
    for name in ("frames", "depth", "alpha", "c2w", "intrinsics"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    assert np.array_equal(first.gaussians[1].means, again.gaussians[1].means)
    assert (first.kind, first.rig_kind) == (again.kind, again.rig_kind)
    other_index = make_sample(TINY, 4)
    other_seed = make_sample(replace(TINY, seed=8), 3)
    assert not torch.allclose(first.frames, other_index.frames)
    assert not torch.allclose(first.frames, other_seed.frames)


def test_sample_shapes_dtypes_and_ranges():
    sample = make_sample(TINY, 0, kind="dynamic")
    v, t, h, w = TINY.num_views, TINY.num_steps, TINY.height, TINY.width
    assert sample.frames.shape == (v, t, 3, h, w) and sample.frames.dtype == torch.float32
    assert sample.depth.shape == sample.alpha.shape == (v, t, 1, h, w)
    assert sample.c2w.shape == (v, t, 4, 4) and sample.intrinsics.shape == (v, t, 6)
    assert len(sample.gaussians) == t and len(sample.gaussians[0]) > 100
    assert sample.frames.min() >= 0 and sample.frames.max() <= 1
    assert sample.alpha.min() > 0.95 and sample.alpha.max() <= 1  # the backdrop covers all
    assert (sample.depth > 0).all()
    tensors = sample.to_tensors()
    assert tensors["geometry_valid"].item() and tensors["has_depth"].item()


def test_depth_is_zero_where_nothing_is_hit():
    config = replace(TINY, backdrop=False, max_objects=1)
    sample = make_sample(config, 1, kind="dynamic")
    empty = sample.alpha < config.empty_alpha
    assert empty.any() and (~empty).any()
    assert (sample.depth[empty] == 0).all()
    assert (sample.depth[sample.alpha > 0.5] > 1.0).all()  # cameras are > 1 unit away


# ---------------------------------------------------------------------------------------------
# Rig and depth consistency


def test_object_pixels_reproject_onto_the_same_surface(object_samples):
    matched, colour_errors = pooled_reprojection(object_samples)
    assert matched > 0.7
    assert colour_errors.median() < 0.02
    turned, _ = pooled_reprojection(object_samples, _small_turn(3.0))
    assert turned < 0.5, "a 3-degree camera error should break the check"


def test_backdrop_pixels_reproject_with_matching_colours(backdrop_sample):
    matched, colour_errors = pooled_reprojection([backdrop_sample])
    assert matched > 0.7
    assert colour_errors.median() < 0.02 and colour_errors.quantile(0.9) < 0.06


def test_mirror_flip_keeps_cameras_consistent(object_samples):
    flipped = [flip_horizontal(sample) for sample in object_samples]
    assert torch.equal(flipped[0].frames[..., 0], object_samples[0].frames[..., -1])
    rotations = flipped[0].c2w[..., :3, :3].double()
    assert torch.allclose(torch.linalg.det(rotations), torch.ones(()).double(), atol=1e-4)
    matched, colour_errors = pooled_reprojection(flipped)
    assert matched > 0.7 and colour_errors.median() < 0.02
    images_only = [replace(sample, frames=f.frames, depth=f.depth, alpha=f.alpha)
                   for sample, f in zip(object_samples, flipped)]
    assert pooled_reprojection(images_only)[0] < 0.3, "unadjusted cameras should fail"


def test_crop_keeps_cameras_consistent(object_samples):
    cropped = [crop_and_resize(sample, top=6, left=3, crop_height=30, crop_width=32)
               for sample in object_samples]
    assert cropped[0].frames.shape == object_samples[0].frames.shape
    matched, colour_errors = pooled_reprojection(cropped)
    assert matched > 0.7 and colour_errors.median() < 0.03
    stale = [replace(c, intrinsics=sample.intrinsics)
             for c, sample in zip(cropped, object_samples)]
    assert pooled_reprojection(stale)[0] < matched - 0.15, "unadjusted intrinsics should fail"
    with pytest.raises(ValueError, match="crop window"):
        crop_and_resize(object_samples[0], top=20, left=0, crop_height=30, crop_width=30)


# ---------------------------------------------------------------------------------------------
# Rigs


@pytest.mark.parametrize("kind", ["orbit", "arc", "jitter", "animated", "rings"])
def test_every_camera_looks_at_the_scene(kind):
    config = replace(TINY, num_views=5, num_steps=4)
    for seed in range(3):
        _, c2w, intr = sample_rig(config, np.random.default_rng(seed), kind)
        uv, z = project_points(torch.zeros(1, 3, dtype=torch.float64),
                               torch.as_tensor(c2w), torch.as_tensor(intr))
        assert (z > config.camera_distance[0] - 0.5).all()
        centre = intr[..., None, 2:4]
        assert (np.abs(uv.numpy() - centre) < 0.25 * config.width).all()


def test_animated_rigs_move_and_static_rigs_do_not():
    config = replace(TINY, num_views=3, num_steps=5)
    rng = np.random.default_rng(0)
    _, c2w, _ = sample_rig(config, rng, "animated")
    travel = np.linalg.norm(c2w[:, -1, :3, 3] - c2w[:, 0, :3, 3], axis=-1)
    assert (travel > 0.1).all()
    assert not np.allclose(c2w[:, 1], c2w[:, 0])
    for kind in ("orbit", "arc", "jitter"):
        _, c2w, _ = sample_rig(config, rng, kind)
        assert np.allclose(c2w, c2w[:, :1])


def test_focal_length_varies():
    config = replace(TINY, num_views=4, num_steps=3)
    _, _, jitter = sample_rig(config, np.random.default_rng(1), "jitter")
    assert np.ptp(jitter[:, 0, 0]) > 0.01 * config.width
    _, _, animated = sample_rig(config, np.random.default_rng(1), "animated")
    assert np.ptp(animated[0, :, 0]) > 0.01 * config.width
    focals = [sample_rig(config, np.random.default_rng(s), "orbit")[2][0, 0, 0]
              for s in range(4)]
    low, high = (f * config.width for f in config.focal)
    assert np.ptp(focals) > 0 and all(low <= f <= high for f in focals)


# ---------------------------------------------------------------------------------------------
# Data mix: static, 2D-transformed, view reversal


def test_static_sample_is_constant_over_time():
    sample = make_sample(TINY, 2, kind="static")
    assert sample.kind == "static" and sample.geometry_valid
    for name in ("frames", "depth", "alpha", "c2w", "intrinsics"):
        value = getattr(sample, name)
        assert torch.equal(value, value[:, :1].expand_as(value)), name
    assert np.array_equal(sample.gaussians[0].means, sample.gaussians[-1].means)


def test_dynamic_sample_changes_over_time():
    sample = make_sample(replace(TINY, rig_weights={"orbit": 1.0}), 2, kind="dynamic")
    assert not torch.allclose(sample.frames[:, 0], sample.frames[:, -1], atol=1e-3)


def test_homography_sample_is_flagged_and_synchronised():
    config = replace(TINY, num_views=3)
    sample = make_sample(config, 5, kind="homography")
    assert sample.kind == "homography" and not sample.geometry_valid
    assert not sample.to_tensors()["geometry_valid"].item()
    assert torch.equal(sample.c2w, sample.c2w[:1].expand_as(sample.c2w))
    assert not torch.allclose(sample.frames[1], sample.frames[0], atol=1e-3)


def test_homography_views_apply_one_warp_per_view():
    rng = np.random.default_rng(0)
    video = torch.rand(3, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    views, matrices = homography_views(video, 3, rng)
    assert views.shape == (3, 3, 2, 16, 16)
    assert torch.equal(views[0], video) and np.allclose(matrices[0], np.eye(3))
    for view in (1, 2):
        assert torch.allclose(views[view], warp_images(video, matrices[view]), atol=1e-6)
        assert not np.allclose(matrices[view], np.eye(3))


def test_warp_images_identity_and_shift():
    image = torch.zeros(1, 1, 8, 8)
    image[0, 0, 2, 3] = 1.0
    assert torch.allclose(warp_images(image, np.eye(3)), image, atol=1e-6)
    shift = np.eye(3)
    shift[0, 2] = 2 * (2.0 / 8)  # a pixel is 2/W wide: sample two to the right
    moved = warp_images(image, shift, mode="nearest")
    assert moved[0, 0, 2, 1] == 1.0 and moved.sum() == 1.0


def test_view_reversal_flips_the_view_axis():
    kept = make_sample(replace(TINY, reverse_views_probability=0.0), 6)
    flipped = make_sample(replace(TINY, reverse_views_probability=1.0), 6)
    assert flipped.views_reversed and not kept.views_reversed
    assert torch.equal(flipped.frames, kept.frames.flip(0))
    assert torch.equal(flipped.c2w, kept.c2w.flip(0))


def test_time_reversal_flips_the_time_axis():
    sample = make_sample(TINY, 1, kind="dynamic")
    backwards = reverse_time(sample)
    assert torch.equal(backwards.frames, sample.frames.flip(1))
    assert backwards.gaussians[0] is sample.gaussians[-1]


def test_data_mix_follows_the_configured_fractions():
    kinds = [choose_sample_kind(TINY, sample_rng(TINY, i)) for i in range(3000)]
    fractions = {k: kinds.count(k) / len(kinds) for k in ("static", "homography", "dynamic")}
    assert abs(fractions["static"] - TINY.static_fraction) < 0.03
    assert abs(fractions["homography"] - TINY.homography_fraction) < 0.03


@pytest.mark.parametrize("change", [
    {"num_views": 0}, {"max_objects": 0}, {"rig_weights": {"ring": 1.0}},
    {"rig_weights": {"orbit": 0.0}}, {"static_fraction": 0.7, "homography_fraction": 0.5},
    {"camera_distance": (1.0, 2.0)}, {"elevation_deg": (0.0, 89.0)}, {"focal": (1.0, 0.5)},
])
def test_bad_config_raises(change):
    with pytest.raises(ValueError, match="DataConfig"):
        replace(TINY, **change)


def test_config_round_trips_through_dict():
    assert DataConfig.from_dict(TINY.to_dict()) == TINY
    assert DataConfig.from_dict(TINY.to_dict()).fingerprint() == TINY.fingerprint()
    assert replace(TINY, seed=9).fingerprint() != TINY.fingerprint()
    with pytest.raises(ValueError, match="unknown fields"):
        DataConfig.from_dict({"num_views": 2, "views": 3})
    with pytest.raises(ValueError, match="index"):
        make_sample(TINY, -1)


# ---------------------------------------------------------------------------------------------
# User scene folders


@pytest.fixture(scope="module")
def folder_sample():
    return make_sample(replace(TINY, num_views=2, num_steps=3, height=24, width=32), 0)


def test_folder_round_trip_with_images(tmp_path, folder_sample):
    write_scene_folder(folder_sample, tmp_path / "scene_a")
    write_scene_folder(reverse_time(folder_sample), tmp_path / "scene_b")
    data = FolderDataset(tmp_path)
    assert len(data) == 2
    loaded = data[0]
    assert loaded.kind == "folder" and loaded.depth is None and loaded.alpha is None
    assert loaded.frames.shape == folder_sample.frames.shape
    assert (loaded.frames - folder_sample.frames).abs().max() <= 0.5 / 255 + 1e-6
    assert torch.allclose(loaded.c2w, folder_sample.c2w)
    assert torch.allclose(loaded.intrinsics, folder_sample.intrinsics)
    assert loaded.near_far == pytest.approx(folder_sample.near_far)
    assert torch.allclose(data[1].frames, loaded.frames.flip(1), atol=1e-6)
    tensors = loaded.to_tensors()
    assert not tensors["has_depth"].item() and tensors["depth"].shape == (2, 3, 1, 24, 32)


def test_folder_resizes_frames_and_intrinsics(tmp_path, folder_sample):
    write_scene_folder(folder_sample, tmp_path)
    loaded = FolderDataset(tmp_path, height=12, width=16)[0]
    assert loaded.frames.shape == (2, 3, 3, 12, 16)
    expected = folder_sample.intrinsics.clone()
    expected[..., :6] *= 0.5
    assert torch.allclose(loaded.intrinsics, expected)
    downsampled = F.avg_pool2d(folder_sample.frames.flatten(0, 1), 2).unflatten(0, (2, 3))
    assert (loaded.frames - downsampled).abs().mean() < 0.02


def test_folder_round_trip_with_mp4(tmp_path, folder_sample):
    pytest.importorskip("imageio_ffmpeg")
    write_scene_folder(folder_sample, tmp_path, video=True)
    assert (tmp_path / "view_00.mp4").is_file() and not (tmp_path / "view_00").exists()
    loaded = FolderDataset(tmp_path)[0]
    assert loaded.frames.shape == folder_sample.frames.shape
    assert (loaded.frames - folder_sample.frames).abs().mean() < 0.03  # lossy codec
    assert torch.allclose(loaded.c2w, folder_sample.c2w)


def _write_cameras(folder, **changes):
    cameras = json.loads((folder / "cameras.json").read_text())
    cameras.update(changes)
    (folder / "cameras.json").write_text(json.dumps(cameras))


def test_folder_errors_name_the_problem(tmp_path, folder_sample):
    with pytest.raises(ValueError, match="not found"):
        FolderDataset(tmp_path / "absent")
    scene = write_scene_folder(folder_sample, tmp_path / "scene")
    (tmp_path / "stray").mkdir()
    with pytest.raises(ValueError, match=r"stray.cameras\.json: missing"):
        FolderDataset(tmp_path)
    (tmp_path / "stray").rmdir()
    c2w = folder_sample.c2w.tolist()
    cases = [
        ({"c2w": c2w[:1]}, "'intrinsics' is"),
        ({"c2w": [[[1, 2, 3]]]}, "'c2w' must have shape"),
        ({"c2w": (folder_sample.c2w * 2).tolist()}, "rigid"),
        ({"near_far": [5, 1]}, "near_far"),
    ]
    for change, message in cases:
        write_scene_folder(folder_sample, scene)
        _write_cameras(scene, **change)
        with pytest.raises(ValueError, match=message):
            FolderDataset(tmp_path)
    write_scene_folder(folder_sample, scene)
    (scene / "cameras.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"cameras\.json: not readable JSON"):
        FolderDataset(tmp_path)


def test_folder_errors_for_frames(tmp_path, folder_sample):
    import imageio.v3 as iio

    scene = write_scene_folder(folder_sample, tmp_path)
    (scene / "view_01" / "0002.png").unlink()
    with pytest.raises(ValueError, match=r"view_01: 2 image files, but cameras.json has T=3"):
        FolderDataset(scene)
    write_scene_folder(folder_sample, scene)
    for frame in (scene / "view_01").iterdir():
        frame.unlink()
    (scene / "view_01").rmdir()
    with pytest.raises(ValueError, match="view_01: neither folder view_01/ nor video"):
        FolderDataset(scene)
    write_scene_folder(folder_sample, scene)
    iio.imwrite(scene / "view_00" / "0001.png", np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(ValueError, match=r"0001.png: size 10x10 differs"):
        FolderDataset(scene)[0]
    for frame in (scene / "view_00").iterdir():
        iio.imwrite(frame, np.zeros((24, 24, 3), np.uint8))
    with pytest.raises(ValueError, match="different aspect ratio"):
        FolderDataset(scene)[0]
    with pytest.raises(ValueError, match="height and width"):
        FolderDataset(scene, height=12)


# ---------------------------------------------------------------------------------------------
# DataLoader datasets and the sample pool


def test_dataloader_workers_render_disjoint_samples():
    loader = DataLoader(GeneratedDataset(TINY, start=10, num_samples=4), batch_size=None,
                        num_workers=2)
    items = list(loader)
    assert sorted(int(item["index"]) for item in items) == [10, 11, 12, 13]
    frames = [item["frames"] for item in items]
    for i in range(len(frames)):
        for j in range(i + 1, len(frames)):
            assert not torch.allclose(frames[i], frames[j])
    by_index = {int(item["index"]): item for item in items}
    assert torch.equal(by_index[12]["frames"], make_sample(TINY, 12).frames)


def test_generated_dataset_batches_with_default_collate():
    loader = DataLoader(GeneratedDataset(TINY, num_samples=2), batch_size=2)
    batch = next(iter(loader))
    assert batch["frames"].shape == (2, 2, 2, 3, 24, 24)
    assert batch["geometry_valid"].shape == (2,)


def test_sample_pool_caches_and_serves_augmented_samples(tmp_path, monkeypatch):
    pool_config = PoolConfig(num_samples=3, start=5, cache_dir=str(tmp_path), seed=1,
                             flip_probability=1.0, crop_probability=1.0)
    pool = SamplePool(TINY, pool_config)
    assert pool.size == 3 and pool[0].index == 5 and pool[0].gaussians is None
    assert len(list(tmp_path.glob("pool_*/sample_*.safetensors"))) == 3

    def refuse(*args, **kwargs):
        raise AssertionError("the cached pool should not render")

    monkeypatch.setattr(dataset_module, "make_sample", refuse)
    cached = SamplePool(TINY, pool_config)
    for i in range(3):
        assert torch.equal(cached[i].frames, pool[i].frames)
        assert cached[i].kind == pool[i].kind and cached[i].index == pool[i].index
    stream = iter(cached)
    served = [next(stream) for _ in range(6)]
    assert sorted(int(s["index"]) for s in served[:3]) == [5, 6, 7]  # one pass per epoch
    stored = {s.index: s for s in cached.samples}
    for item in served:
        assert item["frames"].shape == (2, 2, 3, 24, 24)
        assert not torch.equal(item["frames"], stored[int(item["index"])].frames)


def test_sample_pool_renders_with_worker_processes():
    pool = SamplePool(TINY, PoolConfig(num_samples=3, render_workers=2))
    assert [sample.index for sample in pool.samples] == [0, 1, 2]
    assert torch.equal(pool[2].frames, make_sample(TINY, 2).frames)
    with pytest.raises(ValueError, match="crop_min_scale"):
        PoolConfig(crop_min_scale=0.0)
