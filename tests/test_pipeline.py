"""The generate/reconstruct pipeline and its job kinds, through a real backend process.

The models here are freshly initialised tiny ones saved as real safetensors folders (the
quality of the shipped checkpoints is tested in test_checkpoints.py)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from backend import pipeline
from backend.checkpoint import save_pretrained
from backend.client import BackendClient
from backend.diffusion.config import DiffusionConfig
from backend.diffusion.model import VideoDiT
from backend.gaussians import Gaussians, read_ply_sequence
from backend.models import load_model
from backend.recon import ReconConfig, ReconModel
from backend.tools.bench.fit import synthetic_grid
from tests.support import random_gaussian_arrays, ring_cameras, start_backend

SIZE = 16


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    """A weights folder with one small diffusion and one small reconstruction model."""
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    diffusion = VideoDiT(DiffusionConfig.preset("tiny", image_size=(SIZE, SIZE), width=64,
                                                depth=2, num_heads=1, t_max=4, max_views=4))
    save_pretrained(root / "diffusion-test", diffusion, diffusion.config)
    recon_config = ReconConfig.preset("tiny", image_size=(SIZE, SIZE), width=64, depth=2,
                                      num_heads=2, head_features=16, dense_layers=(0, 1, 1, 1))
    recon = ReconModel(recon_config)
    save_pretrained(root / "recon-test", recon, recon_config)
    return root


def grid_rig(V: int, T: int, radius: float = 4.0, size: int = 32,
             offset=(0.0, 0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """A ring of V cameras held still for T timesteps: c2w [V, T, 4, 4], intrinsics [V, T, 6]."""
    c2w, intr = ring_cameras(V, radius=radius, size=size)
    c2w = c2w.astype(np.float64)
    c2w[:, :3, 3] += np.asarray(offset)
    return (np.repeat(c2w[:, None], T, axis=1).astype(np.float32),
            np.repeat(intr[:, None], T, axis=1).astype(np.float32))


# ---------------------------------------------------------------------------- in-process

def test_rig_frame_finds_the_point_a_ring_looks_at():
    c2w, _ = grid_rig(5, 2, radius=7.0, offset=(3.0, -2.0, 1.5))
    frame = pipeline.rig_frame(c2w)
    # ring_cameras look at the origin from height 0.8 at horizontal radius 7
    np.testing.assert_allclose(frame.centre, [3.0, -2.0, 1.5], atol=1e-4)
    distance = math.hypot(7.0, 0.8)
    assert frame.scale == pytest.approx(pipeline.NOMINAL_CAMERA_DISTANCE / distance, rel=1e-5)
    normalised = frame.to_normalised(c2w)
    distances = np.linalg.norm(normalised[..., :3, 3], axis=-1)
    np.testing.assert_allclose(distances, pipeline.NOMINAL_CAMERA_DISTANCE, rtol=1e-5)
    np.testing.assert_allclose(normalised[..., :3, :3], c2w[..., :3, :3], atol=1e-6)


def test_rig_frame_of_parallel_cameras_lies_in_front_of_them():
    c2w = np.tile(np.eye(4), (3, 1, 1, 1))  # [3, 1, 4, 4], all looking along +z
    c2w[:, 0, 0, 3] = [-1.0, 0.0, 1.0]
    frame = pipeline.rig_frame(c2w)
    assert frame.centre[2] > 0.5  # in front (OpenCV +z)
    assert np.isfinite(frame.scale) and frame.scale > 0


def test_to_world_undoes_the_normalisation():
    c2w, _ = grid_rig(4, 1, radius=10.0, offset=(1.0, 2.0, 3.0))
    frame = pipeline.rig_frame(c2w)
    g = Gaussians.from_arrays(random_gaussian_arrays(50, seed=1))
    world = frame.to_world(g)
    np.testing.assert_allclose((world.means - frame.centre) * frame.scale, g.means, atol=1e-4)
    np.testing.assert_allclose(world.log_scales, g.log_scales - math.log(frame.scale),
                               atol=1e-5)
    np.testing.assert_array_equal(world.sh0, g.sh0)


def test_frames_to_tensor_resizes_and_keeps_colours():
    frames = np.full((2, 3, 40, 60, 3), 200, dtype=np.uint8)
    frames[..., 0] = 10
    x = pipeline.frames_to_tensor(frames, (8, 12))
    assert x.shape == (2, 3, 3, 8, 12)
    np.testing.assert_allclose(x[:, :, 0].numpy(), 10 / 255, atol=1e-5)
    np.testing.assert_allclose(x[:, :, 1].numpy(), 200 / 255, atol=1e-5)
    back = pipeline.tensor_to_uint8(x)
    assert back.shape == (2, 3, 8, 12, 3) and back.dtype == np.uint8
    assert (back[..., 0] == 10).all() and (back[..., 2] == 200).all()


@pytest.mark.parametrize(("height", "width"), [(24, 40), (40, 24), (32, 32), (33, 50)])
def test_model_frames_crop_to_the_models_aspect_and_follow_the_intrinsics(height, width):
    """A frame of another aspect is cropped (centred, largest box), never squashed; a world
    point lands on the same content in the crop as in the frame."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (2, height, width, 3), dtype=np.uint8)
    intr = np.array([[30.0, 30.0, width / 2 + 1.5, height / 2 - 2.0, width, height]] * 2)
    model, model_intr = pipeline.model_frames(frames, intr, (8, 8))
    assert model.shape == (2, 3, 8, 8)
    top, left, crop_h, crop_w = pipeline.model_crop(height, width, (8, 8))
    assert crop_h == crop_w == min(height, width)
    assert (top, left) == ((height - crop_h) // 2, (width - crop_w) // 2)
    np.testing.assert_allclose(model_intr[:, 4:], [[crop_w, crop_h]] * 2)
    np.testing.assert_allclose(model_intr[:, 2:4], intr[:, 2:4] - [left, top])
    expected = pipeline.frames_to_tensor(frames[:, top:top + crop_h, left:left + crop_w], (8, 8))
    assert torch.equal(model, expected)
    # intrinsics given at another resolution than the frames (same aspect): crop in theirs
    doubled = intr * [1, 1, 2, 2, 2, 2] * [2, 2, 1, 1, 1, 1]
    _, doubled_crop = pipeline.model_frames(frames, doubled, (8, 8))
    np.testing.assert_allclose(doubled_crop, model_intr * 2)
    assert pipeline.model_crop(16, 32, (8, 16)) == (0, 0, 16, 32)  # already the aspect


def test_grid_preview_tiles_views_side_by_side():
    grid = np.zeros((3, 2, 4, 5, 3), dtype=np.uint8)
    grid[1, 1] = 255
    preview = pipeline.grid_preview(grid, scale=2)
    assert preview.shape == (2, 8, 30, 3)
    assert preview[1, :, 10:20].min() == 255 and preview[1, :, :10].max() == 0
    assert preview[0].max() == 0


def test_reconstruction_follows_the_rig_to_any_scale_and_place(weights_dir):
    """Scaling and moving the rig (and nothing else) scales and moves the Gaussians."""
    recon = load_model(weights_dir / "recon-test", "cpu")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(3, 2, SIZE, SIZE, 3), dtype=np.uint8)
    grid = pipeline.frames_to_tensor(images, (SIZE, SIZE))
    settings = pipeline.GenerateSettings()
    outputs = []
    base, intr = grid_rig(3, 2, radius=4.0, size=SIZE)
    for factor, offset in ((1.0, (0.0, 0.0, 0.0)), (10.0, (5.0, -3.0, 2.0))):
        c2w = base.astype(np.float64).copy()
        c2w[..., :3, 3] = c2w[..., :3, 3] * factor + offset
        frame = pipeline.rig_frame(c2w)
        seq = pipeline.reconstruct_grid(recon, grid, frame.to_normalised(c2w), intr, settings)
        outputs.append([frame.to_world(g) for g in seq])
    for small, large in zip(*outputs):
        np.testing.assert_allclose(large.means, small.means * 10 + [5.0, -3.0, 2.0], atol=2e-3)
        np.testing.assert_allclose(large.log_scales, small.log_scales + math.log(10), atol=1e-4)


def test_grid_windows_cover_the_grid_with_view_zero_and_an_overlapping_column():
    assert pipeline.grid_windows(3, 4, 4, 8) == [([0, 1, 2], [0, 1, 2, 3])]
    assert pipeline.grid_windows(5, 2, 4, 4) == [([0, 1, 2, 3], [0, 1]), ([0, 4], [0, 1])]
    assert pipeline.grid_windows(2, 10, 4, 4) == [([0, 1], [0, 1, 2, 3]), ([0, 1], [3, 4, 5, 6]),
                                                  ([0, 1], [6, 7, 8, 9])]
    windows = pipeline.grid_windows(8, 20, 4, 8)
    covered = {(v, t) for views, steps in windows for v in views for t in steps}
    assert covered == {(v, t) for v in range(8) for t in range(20)}
    assert all(views[0] == 0 and len(views) <= 4 and len(steps) <= 8
               for views, steps in windows)
    # the last window is moved back to full length; more generated columns are then given
    assert pipeline.grid_windows(2, 9, 4, 8) == [([0, 1], list(range(8))),
                                                 ([0, 1], list(range(1, 9)))]
    with pytest.raises(pipeline.PipelineError, match="at least 2 timesteps"):
        pipeline.grid_windows(2, 5, 4, 1)


def test_window_size_is_the_trained_grid_within_the_rope_tables(weights_dir):
    diffusion = load_model(weights_dir / "diffusion-test", "cpu")
    assert pipeline.window_size(diffusion) == (4, 4)  # not recorded: max_views x t_max
    diffusion.config.trained_grid = (3, 2)
    assert pipeline.window_size(diffusion) == (3, 2)


def test_a_grid_larger_than_a_window_keeps_inputs_and_fills_every_cell(weights_dir):
    diffusion = load_model(weights_dir / "diffusion-test", "cpu")
    diffusion.config.trained_grid = (3, 3)
    V, T = 5, 7
    c2w, intr = grid_rig(V, T, size=SIZE)
    rng = np.random.default_rng(4)
    video = rng.integers(0, 255, (T, SIZE, SIZE, 3), dtype=np.uint8)
    freeze = rng.integers(0, 255, (V, SIZE, SIZE, 3), dtype=np.uint8)
    events = []
    grid, known, grid_intr = pipeline.generate_grid(
        diffusion, video, pipeline.rig_frame(c2w).to_normalised(c2w), intr, freeze,
        pipeline.GenerateSettings(steps=2), lambda *e: events.append(e))
    assert grid.shape == (V, T, 3, SIZE, SIZE)
    np.testing.assert_allclose(grid_intr, intr, rtol=1e-6)  # square in, square model
    assert known[0].all() and known[:, 0].all() and not known[1:, 1:].any()
    np.testing.assert_array_equal(pipeline.tensor_to_uint8(grid[0]), video)
    np.testing.assert_array_equal(pipeline.tensor_to_uint8(grid[1:, 0]), freeze[1:])
    windows = pipeline.grid_windows(V, T, 3, 3)
    assert len(windows) == 2 * 3
    assert [e[1] for e in events] == list(range(1, 2 * len(windows) + 1))
    assert events[-1][2] == 2 * len(windows) and "window 6 of 6" in events[-1][3]
    assert (grid[1:, 1:].std(dim=(2, 3, 4)) > 0).all()  # every generated cell was filled


# ----------------------------------------------------------------- through the backend

@pytest.fixture(scope="module")
def backend(tmp_path_factory, weights_dir):
    old = os.environ.get("FOURREAL_WEIGHTS")
    os.environ["FOURREAL_WEIGHTS"] = str(weights_dir)
    try:
        root = tmp_path_factory.mktemp("backend")
        (root / "inputs").mkdir()
        proc = start_backend(root, extra_args=["--input-folder", str(root / "inputs")])
        proc.input_folder = root / "inputs"
    finally:
        if old is None:
            os.environ.pop("FOURREAL_WEIGHTS")
        else:
            os.environ["FOURREAL_WEIGHTS"] = old
    yield proc
    proc.stop()


@pytest.fixture
def client(backend):
    c = BackendClient(backend.address)
    yield c
    c.close()


def video_arrays(V: int, T: int, size: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    c2w, intr = grid_rig(V, T, size=size)
    rng = np.random.default_rng(seed)
    return {"c2w": c2w, "intrinsics": intr,
            "video": rng.integers(0, 255, size=(T, size, size, 3), dtype=np.uint8)}


def test_generate_streams_a_grid_and_gaussians_per_timestep(client, backend):
    arrays = video_arrays(2, 2)
    arrays["freeze"] = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    outcome = client.run_job("generate", {"steps": 1, "seed": 3}, arrays, timeout=300)
    assert outcome.ok, outcome.final
    stages = [m["stage"] for m in outcome.progress]
    assert "diffusion" in stages and "fit" in stages and "reconstruct" not in stages
    grids = [m for m in outcome.results if m["content"] == "grid"]
    gaussians = [m for m in outcome.results if m["content"] == "gaussians"]
    assert len(grids) == 1 and grids[0].arrays["grid"].shape == (2, 2, SIZE, SIZE, 3)
    grid = grids[0].arrays["grid"]
    # given cells come back as given (resized): row 0 is the video, column 0 the freeze frames
    expected_row = pipeline.tensor_to_uint8(pipeline.frames_to_tensor(arrays["video"],
                                                                      (SIZE, SIZE)))
    np.testing.assert_array_equal(grid[0], expected_row)
    assert grid[1, 0].max() == 0
    assert [m["frame"] for m in gaussians] == [0, 1]
    assert all(m["of"] == 2 for m in gaussians)
    means = gaussians[0].arrays["means"]
    assert means.shape[1] == 3 and len(means) > 0 and np.isfinite(means).all()
    folder = backend.cache_dir / "jobs" / outcome.job
    assert (folder / "grid" / "grid.mp4").stat().st_size > 0
    assert np.load(folder / "grid" / "grid.npy").shape == (2, 2, SIZE, SIZE, 3)
    assert len(read_ply_sequence(folder / "gaussians")) == 2
    # one persistent set: the same Gaussians (count, colour, scale) at every timestep
    counts = {len(m.arrays["means"]) for m in gaussians}
    assert len(counts) == 1
    np.testing.assert_array_equal(gaussians[0].arrays["sh0"], gaussians[1].arrays["sh0"])
    report = json.loads((folder / "fit.json").read_text())
    assert report["preset"] == "default" and report["gaussians"] == counts.pop()
    assert report["rasterize_mode"] == "antialiased"  # how clients should render them
    assert set(report["seconds"]) >= {"init", "fit", "track"}


def test_generate_without_fit_uses_the_feed_forward_reconstruction(client):
    outcome = client.run_job("generate", {"steps": 1, "fit": "off"}, video_arrays(2, 2),
                             timeout=300)
    assert outcome.ok, outcome.final
    stages = [m["stage"] for m in outcome.progress]
    assert "reconstruct" in stages and "fit" not in stages


@pytest.mark.parametrize("fit", ["off", "fast"])
def test_generate_crops_a_wide_video_to_the_models_aspect(client, fit):
    """A 40x24 video is not squashed: the grid's row 0 is its centred 24x24 crop resized,
    and both the feed-forward reconstruction and the fit take the crop's intrinsics."""
    V, T = 2, 2
    c2w, _ = grid_rig(V, T)
    intr = np.tile(np.array([36.0, 36.0, 20.0, 12.0, 40.0, 24.0], np.float32), (V, T, 1))
    video = np.random.default_rng(7).integers(0, 255, (T, 24, 40, 3), dtype=np.uint8)
    outcome = client.run_job("generate", {"steps": 1, "fit": fit, "fit_seconds": 10},
                             {"c2w": c2w, "intrinsics": intr, "video": video}, timeout=300)
    assert outcome.ok, outcome.final
    grid = next(m.arrays["grid"] for m in outcome.results if m["content"] == "grid")
    expected = pipeline.tensor_to_uint8(pipeline.frames_to_tensor(video[:, :, 8:32],
                                                                  (SIZE, SIZE)))
    np.testing.assert_array_equal(grid[0], expected)
    gaussians = [m for m in outcome.results if m["content"] == "gaussians"]
    assert len(gaussians) == T and all(len(m.arrays["means"]) > 0 for m in gaussians)


def test_generate_is_deterministic_per_seed(client):
    arrays = video_arrays(2, 2, seed=1)
    grids = [client.run_job("generate", {"steps": 1, "seed": seed, "fit": "fast"}, arrays,
                            timeout=300)
             for seed in (5, 5, 6)]
    first, again, other = [next(m.arrays["grid"] for m in o.results if m["content"] == "grid")
                           for o in grids]
    np.testing.assert_array_equal(first, again)
    assert np.abs(first[1].astype(int) - other[1].astype(int)).max() > 0


def test_generate_reads_a_movie_file(client, backend):
    import imageio.v3 as iio

    arrays = video_arrays(2, 3)
    path = backend.input_folder / "input.mp4"  # paths are read inside --input-folder only
    iio.imwrite(path, np.repeat(arrays.pop("video"), 2, axis=0), fps=8, codec="libx264",
                macro_block_size=8)
    outcome = client.run_job("generate", {"steps": 1, "video_path": str(path), "fit": "fast"},
                             arrays, timeout=300)
    assert outcome.ok, outcome.final
    assert sum(m["content"] == "gaussians" for m in outcome.results) == 3


def test_reconstruct_job_returns_gaussians_in_world_units(client):
    c2w, intr = grid_rig(3, 2, radius=40.0, size=32)
    images = np.random.default_rng(2).integers(0, 255, (3, 2, 32, 32, 3), dtype=np.uint8)
    outcome = client.run_job("reconstruct", {}, {"c2w": c2w, "intrinsics": intr,
                                                 "images": images}, timeout=300)
    assert outcome.ok, outcome.final
    steps = [m for m in outcome.results if m["content"] == "gaussians"]
    assert [m["frame"] for m in steps] == [0, 1]
    means = steps[0].arrays["means"]
    # the rig stands 40 units out: depths of a few units at the nominal scale become tens
    radius = np.linalg.norm(means[:, :2], axis=1)
    assert np.median(radius) > 5.0


@pytest.mark.parametrize("kind", ["reconstruct", "generate"])
def test_fit_can_start_from_the_feed_forward_reconstruction(client, backend, kind):
    """fit_init "stereo+recon": the feed-forward model runs before the fit, and fit.json says
    how many of its Gaussians agreed with the frames and joined the initial points."""
    scene = synthetic_grid(3, 2, 32)
    params = {"fit": "fast", "fit_seconds": 10, "fit_init": "stereo+recon", "steps": 1}
    if kind == "reconstruct":
        params.pop("steps")
        arrays = {"c2w": scene["c2w"], "intrinsics": scene["intrinsics"],
                  "images": scene["frames"]}
    else:
        arrays = {"c2w": scene["c2w"], "intrinsics": scene["intrinsics"],
                  "video": scene["frames"][0]}
    outcome = client.run_job(kind, params, arrays, timeout=300)
    assert outcome.ok, outcome.final
    stages = [m["stage"] for m in outcome.progress]
    assert stages.index("reconstruct") < stages.index("fit")
    report = json.loads((backend.cache_dir / "jobs" / outcome.job / "fit.json").read_text())
    assert report["init"] == "stereo+recon"
    assert 0 <= report["prior_gaussians"] <= report["initial_gaussians"]
    gaussians = [m for m in outcome.results if m["content"] == "gaussians"]
    assert len(gaussians) == 2 and all(m["identities"] for m in gaussians)


@pytest.mark.parametrize("change, code, words", [
    (lambda a: a.update(video=a["video"][:1]), "bad_input", "one frame per timestep"),
    (lambda a: a.update(video=np.zeros((2, 32, 48, 3), np.uint8)), "bad_input",
     "aspect ratios differ"),
    (lambda a: a.update(video=a["video"].astype(np.float32)), "bad_array", "video"),
    (lambda a: a.pop("video"), "bad_input", "needs the input video"),
    (lambda a: a.update(freeze=np.zeros((3, 32, 32, 3), np.uint8)), "bad_input",
     "one frame per view"),
    (lambda a: a["c2w"].__setitem__((0, 0, 0, 0), 5.0), "bad_camera", "rigid"),
    (lambda a: a.update(params={"steps": 0}), "bad_field", "params.steps"),
    (lambda a: a.update(params={"guidance": "high"}), "bad_field", "params.guidance"),
    (lambda a: a.update(params={"video_path": "no-such-file.mp4"}), "bad_input",
     "no file 'no-such-file.mp4' in the backend's input folder"),
    (lambda a: a.update(params={"video_path": "/etc/hostname"}), "bad_input",
     "must name a file inside the backend's input folder"),
    (lambda a: a.update(video=np.zeros((2, 0, 32, 3), np.uint8)), "bad_input", "empty frames"),
    (lambda a: a.update(c2w=np.tile(a["c2w"][:, :1], (1, 600, 1, 1)),
                        intrinsics=np.tile(a["intrinsics"][:, :1], (1, 600, 1))),
     "too_large", "exceeds the limits"),
    (lambda a: a.update(params={"min_opacity": 1.0}), "bad_field", "params.min_opacity"),
    (lambda a: a.update(params={"guidence": 2.0}), "bad_field", "did you mean 'guidance'"),
    (lambda a: a.update(near_far=np.ones((2, 2, 2), np.float32)), "bad_input",
     "does not take the arrays near_far"),
])
def test_generate_refuses_bad_input_with_a_clear_error(client, change, code, words):
    arrays = video_arrays(2, 2)
    change(arrays)
    params = arrays.pop("params", {"steps": 1})
    if "video_path" in params:
        arrays.pop("video")
    outcome = client.run_job("generate", params, arrays, timeout=120)
    assert outcome.final.type == "error", outcome.final
    assert outcome.final["code"] == code
    assert words in outcome.final["message"]
    client.hello()
    assert client.wait(lambda m: m.type == "welcome", timeout=30)  # still serving


def test_generate_runs_grids_beyond_one_window(client):
    outcome = client.run_job("generate", {"steps": 1, "fit": "fast"}, video_arrays(5, 6),
                             timeout=300)
    assert outcome.ok, outcome.final
    grid = next(m.arrays["grid"] for m in outcome.results if m["content"] == "grid")
    assert grid.shape[:2] == (5, 6)
    assert sum(m["content"] == "gaussians" for m in outcome.results) == 6
    assert any("window 4 of 4" in m.get("message", "") for m in outcome.progress)


def test_unknown_model_name_lists_the_available_ones(client):
    outcome = client.run_job("generate", {"steps": 1, "diffusion_model": "huge"},
                             video_arrays(2, 2), timeout=120)
    assert outcome.final.type == "error" and "diffusion-test" in outcome.final["message"]


def test_cancel_during_generation(client):
    arrays = video_arrays(2, 2)
    job = client.submit_job("generate", {"steps": 200}, arrays, timeout=120)
    client.wait(lambda m: m.type == "progress" and m.get("stage") == "diffusion", timeout=120)
    client.cancel(job)
    outcome = client.collect(job, timeout=120)
    assert outcome.final.type == "cancelled"
