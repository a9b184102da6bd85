"""The add-on's job runner against a real backend process on a random loopback port: the
scene -> rig -> backend -> import round trip, error reports, cancel, backend death and
re-fetch. Polling is driven by calling the runner (what the add-on's timer does)."""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from blender_support import (
    ROOT,
    addon_module,
    bpy,
    cube_surface_samples,
    emissive_cube,
    empty_scene,
    gaussian_sequence_arrays,
    opencv_ring,
    pump,
    use_cycles,
)

pytestmark = pytest.mark.blender

jobs = addon_module("jobs")
rig = addon_module("rig")
inputs = addon_module("inputs")
pointcloud = addon_module("pointcloud")
workflows = addon_module("workflows")
runtime = addon_module("runtime")
backend_process = addon_module("backend_process")
vendor_protocol = addon_module("vendor.protocol")
vendor_gaussians = addon_module("vendor.gaussians")

TIMEOUT = 180.0  # a hang guard, not a speed check: a loaded 2-core machine needs minutes


@pytest.fixture(scope="module")
def addon():
    module = addon_module()
    module.register()
    yield module
    module.unregister()


def backend_config(cache_dir, **overrides):
    """Start the backend the way the add-on does: the repository's .venv interpreter (the
    one running the tests where there is none), on a port the backend picks."""
    python = backend_process.default_python() or sys.executable
    return backend_process.LocalBackendConfig(python=str(python), repo=str(ROOT),
                                              cache_dir=str(cache_dir), device="cpu",
                                              **overrides)


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    local = backend_process.LocalBackend(backend_config(tmp_path_factory.mktemp("cache")))
    local.start()
    local.wait_ready(TIMEOUT)
    yield local
    local.stop()


@pytest.fixture
def runner(backend):
    run = jobs.JobRunner()
    run.connect(backend.address)
    pump(run.poll, lambda: run.backend_state == "ready", TIMEOUT)
    yield run
    run.close()


def finished(record):
    return lambda: record.state in jobs.FINAL_STATES


def ply_arrays(steps: list) -> dict[str, np.ndarray]:
    return {f"ply_{t:04d}": np.frombuffer(vendor_gaussians.ply_bytes(g), np.uint8)
            for t, g in enumerate(steps)}


def test_every_backend_error_code_has_a_user_message():
    assert set(vendor_protocol.ERROR_CODES) <= set(jobs.ERROR_HINTS)
    for code in vendor_protocol.ERROR_CODES:
        text = jobs.describe_error(code, "the backend said so")
        assert text.startswith("the backend said so") and f"[{code}]" in text


def test_welcome_is_read_and_mirrored(addon, runner):
    assert runner.backend_info["device"] == "cpu"
    assert {"convert", "render"} <= set(runner.backend_info["job_kinds"])


def cube_scene():
    """32x24 Cycles scene: an emissive cube moving along X over frames 1..3, and a ring of
    four cameras around it."""
    scene = empty_scene()
    use_cycles(scene)
    cube = emissive_cube(scene, half_size=0.4)
    animation = addon_module("animation")
    animation.set_keys(cube, "location", [1, 3], [-0.3, 0.3], "LINEAR", index=0)
    _, cameras = rig.create_rig_preset(scene, rig.RigPresetConfig(
        num_cameras=4, radius=3.0, height=0.8, focal_length=30.0, target=(0.0, 0.0, 0.0)))
    return scene, cube, cameras


def centroid(mask: np.ndarray) -> np.ndarray:
    """Mean (row, column) of a mask's pixels."""
    return np.argwhere(mask).mean(axis=0)


def masks_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def cube_gaussians(scene, cube, frames: list[int]) -> list:
    """Per frame: small opaque Gaussians in the cube's colour spread over its surface."""
    steps = []
    for t, frame in enumerate(frames):
        scene.frame_set(frame)
        means = cube_surface_samples(cube.matrix_world, 0.4, 3000 + 100 * t, seed=t)
        n = len(means)
        steps.append(vendor_gaussians.Gaussians.from_activated(
            means, np.tile([1.0, 0.0, 0.0, 0.0], (n, 1)), np.full((n, 3), 0.02),
            np.full(n, 0.95), np.tile([0.8, 0.3, 0.1], (n, 1))))
    return steps


def assert_backend_sees_the_cube(runner, gaussians, extracted, t: int,
                                 blender_masks: np.ndarray) -> None:
    """The backend's renders of `gaussians` through the rig's cameras at timestep `t`
    cover what Blender's renders [V, H, W] covered."""
    render = runner.submit("render", {"near": 0.1},
                           {**gaussians.to_arrays(),
                            "c2w": extracted.c2w[:, t].astype(np.float32),
                            "intrinsics": extracted.intrinsics[:, t].astype(np.float32)})
    pump(runner.poll, finished(render), TIMEOUT)
    assert render.state == "done", render.error_text
    results = render.ordered_results("image")
    assert len(results) == len(blender_masks)
    for v, result in enumerate(results):
        backend_mask = result.arrays["alpha"][..., 0] > 0.5
        assert masks_iou(backend_mask, blender_masks[v]) > 0.6, v
        np.testing.assert_allclose(centroid(backend_mask), centroid(blender_masks[v]),
                                   atol=0.5)


def test_round_trip_scene_rig_backend_import(addon, runner, tmp_path):
    scene, cube, cameras = cube_scene()
    frames = [1, 2, 3]
    extracted = rig.extract_rig(scene, cameras, 1, 3)
    renders = inputs.render_rig(scene, cameras, frames, tmp_path / "rig")
    assert renders.shape == (4, 3, 24, 32, 3) and renders.dtype == np.uint8
    blender_masks = renders.max(axis=-1) > 40  # the cube emits, the film is black

    # Reconstruction: the request the Reconstruct button sends, answered by the shipped
    # reconstruction model with one Gaussian set per timestep.
    record = runner.submit("reconstruct", {},
                           {**extracted.to_arrays(), "images": renders})
    pump(runner.poll, finished(record), TIMEOUT)
    assert record.state == "done", record.error_text
    reconstructed, result_frames = record.gaussian_steps()
    assert result_frames == [0, 1, 2]
    assert all(len(step["means"]) > 0 and np.isfinite(step["means"]).all()
               for step in reconstructed)

    # Gaussians on the cube's surface per frame go through the backend (convert) and come
    # back as an imported asset.
    steps = cube_gaussians(scene, cube, frames)
    request = workflows.JobRequest("convert", {"direction": "ply_to_gaussians"},
                                   ply_arrays(steps), frames, "Cube Gaussians")
    record = workflows.submit_and_import(runner, scene, request)
    pump(runner.poll, finished(record), TIMEOUT)
    assert record.state == "done", record.error_text
    asset = bpy.data.objects[record.context["asset"]]
    for frame, step in zip(frames, steps):
        scene.frame_set(frame)
        depsgraph = bpy.context.evaluated_depsgraph_get()
        shown = [i.object.original for i in depsgraph.object_instances
                 if i.object.original.parent == asset]
        assert [len(o.data.vertices) for o in shown] == [len(step)], frame

    # The backend renders the imported Gaussians from the extracted rig where Blender
    # rendered the cube: camera conventions agree end to end.
    imported = pointcloud.mesh_gaussians(pointcloud.timestep_objects(asset)[1].data)
    assert_backend_sees_the_cube(runner, imported, extracted, 1, blender_masks[:, 1])

    # Cycles renders the imported asset (the cube hidden) at one frame where the backend's
    # rasterizer renders that timestep's Gaussians (at 32x24 a splat, dilated to 0.3 px^2,
    # reaches past the cube's edges, so the reference is the rasterizer, not the cube).
    from backend.render import rasterize_gaussians

    cube.hide_render = True
    scene.camera = cameras[0]
    scene.frame_set(2)
    scene.render.filepath = str(tmp_path / "asset.png")
    bpy.ops.render.render(write_still=True)
    pixels = inputs.read_image_rgb8(tmp_path / "asset.png")
    reference = rasterize_gaussians(steps[1], extracted.c2w[0, 1][None],
                                    extracted.intrinsics[0, 1][None]).rgb[0].numpy()
    shown, expected = pixels.max(axis=-1) > 40, reference.max(axis=-1) > 40 / 255
    assert masks_iou(shown, expected) > 0.7
    np.testing.assert_allclose(centroid(shown), centroid(expected), atol=0.5)
    assert masks_iou(expected, blender_masks[0, 1]) > 0.3, "the cube is where it was"


def test_generate_operator_imports_the_generated_asset(addon, backend, tmp_path):
    scene, _, cameras = cube_scene()
    scene.frame_end = 2
    run = runtime.runner()
    run.connect(backend.address)
    try:
        pump(runtime.tick, lambda: run.backend_state == "ready", TIMEOUT)
        assert {"generate", "reconstruct"} <= set(run.backend_info["job_kinds"])
        scene.fourreal.rig_source = "COLLECTION"
        scene.fourreal.rig_collection = cameras[0].users_collection[0]
        scene.fourreal.render_folder = str(tmp_path / "input")
        scene.fourreal.steps = 1
        assert bpy.ops.fourreal.generate() == {"FINISHED"}
        assert bpy.app.timers.is_registered(runtime.tick), "the operator starts polling"
        record = run.latest()
        assert record.kind == "generate"
        pump(runtime.tick, finished(record), TIMEOUT)
        status = bpy.context.window_manager.fourreal_status
        assert status.job_state == "done", status.job_error
        assert len(list((tmp_path / "input").glob("*.png"))) == 2, "camera 1, frames 1-2"
        asset = bpy.data.objects[record.context["asset"]]
        assert len(pointcloud.asset_frames(asset)) == 2  # either layout
        job_dir = Path(record.cache_dir)
        assert (job_dir / "grid" / "grid.mp4").stat().st_size > 0
        assert len(list((job_dir / "gaussians").glob("*.ply"))) == 2
    finally:
        runtime.shutdown()


def test_cancel_running_and_queued_jobs(addon, runner):
    c2w, intr = opencv_ring(200, size=32)
    slow = {**gaussian_sequence_arrays(1, 5000, seed=1)[0], "c2w": c2w, "intrinsics": intr}
    first = runner.submit("render", {}, slow)
    second = runner.submit("render", {}, slow)
    pump(runner.poll, lambda: first.state == "running" and first.step > 0, TIMEOUT)
    runner.cancel_queued()
    pump(runner.poll, finished(second), TIMEOUT)
    runner.cancel()
    pump(runner.poll, finished(first), TIMEOUT)
    assert (first.state, second.state) == ("cancelled", "cancelled")
    assert 0 < len(first.results) < 200


def wait_for_cached_state(cache_dir, job_id: str, state: str) -> None:
    meta = cache_dir / "jobs" / job_id / "job.json"
    deadline = time.monotonic() + TIMEOUT
    while not (meta.exists() and json.loads(meta.read_text())["state"] == state):
        assert time.monotonic() < deadline, f"job {job_id} never reached {state}"
        time.sleep(0.02)


def test_backend_death_is_reported_and_the_job_fetched_after_restart(addon, tmp_path):
    local = backend_process.LocalBackend(backend_config(tmp_path / "cache"))
    run = jobs.JobRunner()
    run.start_local(local)
    try:
        pump(run.poll, lambda: run.backend_state == "ready", TIMEOUT)
        scene = empty_scene()
        steps = [vendor_gaussians.Gaussians.from_arrays(a)
                 for a in gaussian_sequence_arrays(3, 50, seed=4)]
        request = workflows.JobRequest("convert", {"direction": "ply_to_gaussians"},
                                       ply_arrays(steps), [5, 6, 7], "Recovered")
        record = workflows.submit_and_import(run, scene, request)
        pump(run.poll, lambda: record.state != "submitted", TIMEOUT)  # the backend's job id
        wait_for_cached_state(tmp_path / "cache", record.id, "done")
        local.process.send_signal(signal.SIGKILL)
        local.process.wait(TIMEOUT)
        run.poll()
        assert run.backend_state == "dead" and "backend_died" in run.backend_error
        assert record.state == "lost" and "restart it" in record.error_text
        run.restart_local(refetch_lost=True)
        pump(run.poll, lambda: record.state in ("done", "failed", "cancelled"), TIMEOUT)
        assert record.state == "done" and record.context["imported"] == 3
        asset = bpy.data.objects[record.context["asset"]]
        assert [o[pointcloud.FRAME_PROP] for o in pointcloud.timestep_objects(asset)] == \
            [5, 6, 7]
    finally:
        run.close()
    assert local.process is None and local not in backend_process._RUNNING


def test_local_backend_start_failure_is_reported(tmp_path):
    with pytest.raises(ValueError, match="repository not found"):
        backend_process.LocalBackendConfig(repo=str(tmp_path)).resolved()
    config = backend_config(tmp_path / "cache", extra_args=["--no-such-option"])
    run = jobs.JobRunner()
    run.start_local(backend_process.LocalBackend(config))
    pump(run.poll, lambda: run.backend_state == "dead", TIMEOUT)
    assert "start_failed" in run.backend_error and "no-such-option" in run.backend_error


def test_silent_backend_is_detected(addon):
    # A DEALER connected to a port where nothing answers: the welcome never comes.
    run = jobs.JobRunner(jobs.RunnerConfig(connect_timeout_s=0.3))
    run.connect("tcp://127.0.0.1:9")
    pump(run.poll, lambda: run.backend_state == "unreachable", 10.0)
    assert "backend_unreachable" in run.backend_error
    run.close()


def test_submit_without_a_backend_is_refused():
    run = jobs.JobRunner()
    with pytest.raises(ValueError, match="not connected"):
        run.submit("render")
    with pytest.raises(ValueError, match="no local backend"):
        run.restart_local()


def test_scene_frames_of_results():
    assert workflows.scene_frames([0, 1, 2], [10, 12, 14]) == [10, 12, 14]
    assert workflows.scene_frames([0, 3], [10, 12]) == [10, 16]
    assert workflows.scene_frames([0, 1], []) == [1, 2]
    assert math.isclose(jobs.JobRecord("a", "b", step=3, of=4).fraction, 0.75)


def test_results_lost_to_a_slow_add_on_are_fetched_by_ordinal(addon, tmp_path):
    """A backend that drops what a busy Blender does not read (tiny queues): when `done`
    says more results exist than arrived, the runner fetches the missing ones itself."""
    from support import start_backend

    proc = start_backend(tmp_path, extra_args=["--send-hwm", "5", "--backlog-limit", "3"])
    run = jobs.JobRunner(jobs.RunnerConfig(receive_hwm=5))
    try:
        run.connect(proc.address)
        pump(run.poll, lambda: run.backend_state == "ready", TIMEOUT)
        c2w, intr = opencv_ring(150, size=64)
        record = run.submit("render", {}, {**gaussian_sequence_arrays(1, 50, seed=2)[0],
                                           "c2w": c2w, "intrinsics": intr})
        ref = record.id
        pump(run.poll, lambda: record.state != "submitted", TIMEOUT)
        assert record.id != ref and len(record.id) == 32, "the backend named the job"
        wait_for_cached_state(proc.cache_dir, record.id, "done")  # Blender was busy
        pump(run.poll, finished(record), TIMEOUT)
        assert record.state == "done", record.error_text
        assert record.fetch_rounds >= 1, "missing results were fetched"
        assert sorted(r["ordinal"] for r in record.results) == list(range(150))
    finally:
        run.close()
        assert proc.stop() == 0
