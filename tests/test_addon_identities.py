"""Sequences whose Gaussians keep their identities (the fitting stage's persistent Gaussians)
import as one point set that moves: its evaluated points follow each frame's means and
rotations (and move between frames, for motion blur), Cycles renders a frame as the
reference rasterizer renders that timestep, and the PLY export writes the sequence back.
Sequences without identities keep one object per timestep."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from blender_support import add_camera, addon_module, bpy, empty_scene, gaussian_sequence_arrays
from test_addon_fidelity import _quat_mul, reference, render, scores, synthetic_asset
from test_addon_pointcloud import attribute, dilated_scales, quat_matrices, visible_geometry

pytestmark = pytest.mark.blender

pointcloud = addon_module("pointcloud")
persistent = addon_module("persistent")
plyio = addon_module("plyio")
workflows = addon_module("workflows")
jobs = addon_module("jobs")
protocol = addon_module("vendor.protocol")
gaussians_mod = addon_module("vendor.gaussians")
Gaussians = gaussians_mod.Gaussians

UNDILATED = pointcloud.PointCloudConfig(viewport_display="POINTS", dilation=0.0)


def persistent_arrays(num_steps: int, num_points: int, seed: int = 0) -> list[dict]:
    """Wire arrays per timestep: shared colour, opacity and scales, moving means, new
    rotations at every timestep."""
    steps = gaussian_sequence_arrays(num_steps, num_points, seed=seed, sh_rest=3)
    for step in steps[1:]:
        for name in ("log_scales", "opacity_logits", "sh0", "sh_rest"):
            step[name] = steps[0][name].copy()
    return steps


def job_record(steps: list[dict], identities: bool | None, **fields) -> jobs.JobRecord:
    extra = {**fields, **({} if identities is None else {"identities": identities})}
    record = jobs.JobRecord(id="job1", kind="generate", state="done",
                            context={"frames": [1, 2, 3]})
    record.results = [protocol.Message("result", "job1", {"content": "gaussians", "index": t,
                                                          "frame": t, **extra}, arrays)
                      for t, arrays in enumerate(steps)]
    return record


def evaluated_points(scene, frame: int, subframe: float = 0.0):
    scene.frame_set(frame, subframe=subframe)
    depsgraph = bpy.context.evaluated_depsgraph_get()
    shown = [(inst.object.name, inst.object.data) for inst in depsgraph.object_instances
             if inst.object.type == "POINTCLOUD"]
    assert len(shown) == 1, [name for name, _ in shown]
    return shown[0]


def test_identity_results_import_as_one_object_that_follows_each_frame():
    scene = empty_scene()
    steps = persistent_arrays(3, 60, seed=1)
    root = workflows.import_results(scene, job_record(steps, True), "Fitted", UNDILATED)
    assert root[pointcloud.LAYOUT_PROP] == "PERSISTENT"
    # With motion blur on, the Gaussians keep their identity order (no sorting for EEVEE's
    # blending): the order motion blur pairs vertices by.
    scene.render.use_motion_blur = True
    (obj,) = root.children
    assert pointcloud.timestep_objects(root) == [] and pointcloud.asset_frames(root) == [1, 2, 3]
    stored = set(obj.data.attributes.keys())
    assert {f"gs_t_{kind}_{t}" for kind in ("position", "rotation") for t in range(3)} <= stored
    assert obj.animation_data.action is not None and obj.hide_render is False
    for frame, g in zip((1, 2, 3), steps):
        g = Gaussians.from_arrays(g)
        name, points = evaluated_points(scene, frame)
        assert name == obj.name, "the same object at every frame"
        np.testing.assert_allclose(attribute(points, "position", 3), g.means, atol=1e-6)
        np.testing.assert_allclose(attribute(points, "gs_mean", 3), g.means, atol=1e-6)
        np.testing.assert_allclose(attribute(points, "gs_opacity", 1), g.opacities, atol=1e-5)
        np.testing.assert_allclose(dilated_scales(points), g.scales, rtol=1e-5)
        rows = np.stack([attribute(points, f"gs_whiten_{k}", 3) for k in range(3)], axis=1)
        expected = quat_matrices(g.quats).transpose(0, 2, 1) / g.scales[:, :, None]
        np.testing.assert_allclose(rows, expected, rtol=1e-4, atol=1e-3)
        assert not [a.name for a in points.attributes if a.name.startswith("gs_t_")], \
            "the per-timestep attributes are dropped after picking"
    # Between frames (a subframe, as motion blur samples) the points move continuously.
    _, points = evaluated_points(scene, 1, subframe=0.25)
    np.testing.assert_allclose(attribute(points, "position", 3),
                               0.75 * steps[0]["means"] + 0.25 * steps[1]["means"], atol=1e-5)
    for frame, t in ((-5, 0), (40, 2)):  # held before the first and after the last timestep
        _, points = evaluated_points(scene, frame)
        np.testing.assert_allclose(attribute(points, "position", 3), steps[t]["means"],
                                   atol=1e-6)


def test_without_motion_blur_the_gaussians_are_drawn_back_to_front_for_the_active_camera():
    """EEVEE blends a mesh's faces in index order: without motion blur the evaluated points
    are the Gaussians sorted by decreasing depth of their means from the active camera."""
    scene = empty_scene()
    scene.camera = add_camera(scene, "View", location=(0.5, -4.0, 1.0),
                              rotation=(math.radians(80), 0.0, math.radians(5)))
    steps = persistent_arrays(2, 200, seed=3)
    workflows.import_results(scene, job_record(steps, True), "Fitted", UNDILATED)
    bpy.context.view_layer.update()
    view = np.array(scene.camera.matrix_world.to_3x3().col[2]) * -1.0
    for frame, step in ((1, steps[0]), (2, steps[1])):
        _, points = evaluated_points(scene, frame)
        shown = attribute(points, "position", 3)
        depth = (shown - np.array(scene.camera.location)) @ view
        assert np.all(np.diff(depth) <= 1e-5), "back to front"
        assert not np.allclose(shown, step["means"]), "the identity order is not depth order"
        np.testing.assert_allclose(shown[np.lexsort(shown.T)],
                                   step["means"][np.lexsort(step["means"].T)], atol=1e-6)
    scene.render.use_motion_blur = True  # the driver switches sorting off
    _, points = evaluated_points(scene, 1)
    np.testing.assert_allclose(attribute(points, "position", 3), steps[0]["means"], atol=1e-6)


def test_results_fitted_antialiased_are_drawn_with_the_opacity_compensation():
    steps = persistent_arrays(2, 30, seed=4)
    plain = workflows.import_results(empty_scene(), job_record(steps, True), "Plain")
    assert not pointcloud.read_settings(plain).antialiased
    fitted = workflows.import_results(
        empty_scene(), job_record(steps, True, rasterize_mode="antialiased"), "Fitted",
        pointcloud.PointCloudConfig(viewport_ratio=0.5))
    settings = pointcloud.read_settings(fitted)
    assert settings.antialiased and settings.viewport_ratio == 0.5  # the rest as asked


def test_sequences_without_identities_keep_one_object_per_timestep(tmp_path):
    shared = persistent_arrays(3, 40, seed=2)
    for identities in (None, False):  # no field, or identities: false
        root = workflows.import_results(empty_scene(), job_record(shared, identities), "R")
        assert root[pointcloud.LAYOUT_PROP] == "PER_TIMESTEP"
        assert len(pointcloud.timestep_objects(root)) == 3
    unshared = gaussian_sequence_arrays(3, 40, seed=2)  # flagged, but the colours differ
    root = workflows.import_results(empty_scene(), job_record(unshared, True), "R")
    assert len(pointcloud.timestep_objects(root)) == 3
    scene = empty_scene()
    seq = gaussians_mod.GaussianSequence([Gaussians.from_arrays(a) for a in unshared], [0, 1, 2])
    gaussians_mod.write_ply_sequence(tmp_path / "plain", seq)
    root = plyio.import_ply_sequence(scene, tmp_path / "plain", config=UNDILATED)
    assert len(pointcloud.timestep_objects(root)) == 3
    shown = visible_geometry(scene, 2)
    assert [name for name, _ in shown] == ["plain t0001"]
    with pytest.raises(ValueError, match=r"frame_0001\.ply has its log_scales differ"):
        plyio.import_ply_sequence(scene, tmp_path / "plain", persistent="PERSISTENT")


def test_ply_sequence_is_detected_and_exported_back_identically(tmp_path):
    steps = persistent_arrays(3, 50, seed=3)
    seq = gaussians_mod.GaussianSequence([Gaussians.from_arrays(a) for a in steps], [0, 2, 5])
    paths = gaussians_mod.write_ply_sequence(tmp_path / "in", seq)
    scene = empty_scene()
    root = plyio.import_ply_sequence(scene, tmp_path / "in", frame_start=1)
    assert pointcloud.persistent_object(root) is not None
    assert pointcloud.asset_frames(root) == [1, 3, 6]
    out = plyio.export_ply_sequence(root, tmp_path / "out")
    assert [p.name for p in out] == [p.name for p in paths]
    for path in out:
        assert path.read_bytes() == (tmp_path / "in" / path.name).read_bytes()
    kept = plyio.import_ply_sequence(scene, tmp_path / "in", persistent="PER_TIMESTEP")
    assert len(pointcloud.timestep_objects(kept)) == 3
    root.location = (0.0, 0.0, 1.0)  # a moved asset exports where it stands
    bpy.context.view_layer.update()
    moved = gaussians_mod.read_ply_sequence(plyio.export_ply_sequence(root, tmp_path / "moved"))
    np.testing.assert_allclose(moved[2].means, seq[2].means + np.array([0.0, 0.0, 1.0]),
                               atol=1e-6)


def moving_asset(num_steps: int = 3, count: int = 1500) -> list[Gaussians]:
    """The fidelity test's sharp asset, turning about Z and drifting along X over time."""
    base = synthetic_asset(count=count)
    steps = []
    for t in range(num_steps):
        angle = 0.25 * t
        c, s = math.cos(angle), math.sin(angle)
        rotation = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], np.float32)
        spin = np.array([[math.cos(angle / 2), 0.0, 0.0, math.sin(angle / 2)]])
        quats = _quat_mul(np.repeat(spin, len(base), axis=0), base.quats)
        steps.append(Gaussians(means=base.means @ rotation.T + np.array([0.15 * t, 0, 0],
                                                                       np.float32),
                               quats=quats.astype(np.float32), log_scales=base.log_scales,
                               opacity_logits=base.opacity_logits, sh0=base.sh0))
    return steps


def frame_scene(steps, persistent_gaussians: bool, size: int = 32):
    """The timesteps on frames 0, 1, 2 before the fidelity test's camera, black behind."""
    scene = empty_scene()
    scene.render.resolution_x = scene.render.resolution_y = size
    scene.camera = add_camera(scene, "View", location=(0.6, -3.4, 1.2),
                              rotation=(math.radians(72), 0.0, math.radians(10)), lens=40)
    pointcloud.build_asset(scene, "Moving", steps, [0, 1, 2],
                           persistent_gaussians=persistent_gaussians)
    scene.render.film_transparent = False
    scene.render.image_settings.file_format = "PNG"
    scene.render.image_settings.color_mode = "RGB"
    return scene


def render_frame_two(steps, persistent_gaussians: bool, path: Path) -> tuple[float, float]:
    scene = frame_scene(steps, persistent_gaussians)
    scene.frame_set(2)
    image = render(scene, "CYCLES", 4, path)
    return scores(image, reference(scene, steps[2]))


def test_cycles_render_of_frame_two_matches_the_rasterizer(tmp_path):
    """Cycles (32x32, 4 samples) at frame 2 against the reference rasterizer's timestep 2:
    the per-timestep layout scores 33.6 dB here, the persistent one the same."""
    steps = moving_asset()
    per_timestep, _ = render_frame_two(steps, False, tmp_path / "per_timestep.png")
    moving, ssim = render_frame_two(steps, True, tmp_path / "persistent.png")
    print(f"frame 2: per-timestep {per_timestep:.2f} dB, persistent {moving:.2f} dB")
    assert per_timestep > 31.0
    assert moving > 31.0 and moving >= per_timestep - 0.5, (moving, per_timestep, ssim)


def test_cycles_motion_blur_matches_the_shutter_average(tmp_path):
    """Motion blur over frames 0.5-1.5 against the mean of the reference rasterizer's renders
    of the interpolated Gaussians: 34.1 dB here (32x32, 8 samples), 38.2 dB at 48x48 with
    16. With the material measuring from the centre frame's mean instead of the proxies'
    own offsets it was 22.4 dB at 48x48, hardly better than no blur (21.2 dB)."""
    steps = moving_asset(count=800)
    steps = [Gaussians(means=g.means + np.array([0.3 * t, 0.0, 0.0], np.float32), quats=g.quats,
                       log_scales=g.log_scales, opacity_logits=g.opacity_logits, sh0=g.sh0)
             for t, g in enumerate(steps)]
    scene = frame_scene(steps, persistent_gaussians=True)
    scene.frame_set(1)
    scene.render.use_motion_blur = True
    scene.render.motion_blur_shutter = 1.0
    scene.render.motion_blur_position = "CENTER"
    image = render(scene, "CYCLES", 8, tmp_path / "blurred.png")
    shutter = []
    for time in np.linspace(0.5, 1.5, 11):
        t = min(int(time), 1)
        f = float(time - t)
        between = Gaussians(means=(1 - f) * steps[t].means + f * steps[t + 1].means,
                            quats=steps[t].quats if f < 0.5 else steps[t + 1].quats,
                            log_scales=steps[t].log_scales, opacity_logits=steps[t].opacity_logits,
                            sh0=steps[t].sh0)
        shutter.append(reference(scene, between))
    blurred, _ = scores(image, np.mean(shutter, axis=0))
    sharp, _ = scores(image, reference(scene, steps[1]))
    print(f"motion blur: {blurred:.2f} dB against the shutter average, {sharp:.2f} dB sharp")
    assert blurred > 30.0 and blurred > sharp + 5.0


@pytest.fixture
def registered():
    module = addon_module()
    module.register()
    yield module
    module.unregister()


def test_import_operator_option_and_export_operator(tmp_path, registered):
    steps = persistent_arrays(2, 30, seed=4)
    seq = gaussians_mod.GaussianSequence([Gaussians.from_arrays(a) for a in steps], [1, 2])
    gaussians_mod.write_ply_sequence(tmp_path / "seq", seq)
    scene = empty_scene()
    assert bpy.ops.fourreal.import_ply_sequence(directory=str(tmp_path / "seq") + "/",
                                                persistent="PERSISTENT") == {"FINISHED"}
    root = next(o for o in scene.objects if pointcloud.is_asset(o))
    bpy.context.view_layer.objects.active = pointcloud.persistent_object(root)
    assert bpy.ops.fourreal.export_ply_sequence(filepath=str(tmp_path / "out")) == {"FINISHED"}
    for name in ("frame_0001.ply", "frame_0002.ply"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "seq" / name).read_bytes()
