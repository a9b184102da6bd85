"""Imported Gaussian assets: attribute values and point counts per frame, splat geometry,
viewport decimation, PLY sequence round trips, and a small Cycles render."""

from __future__ import annotations

import math

import numpy as np
import pytest
from blender_support import add_camera, addon_module, bpy, empty_scene, gaussian_sequence_arrays

pytestmark = pytest.mark.blender

pointcloud = addon_module("pointcloud")
plyio = addon_module("plyio")
gaussians_mod = addon_module("vendor.gaussians")
Gaussians = gaussians_mod.Gaussians


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    c = np.maximum(c, 0.0)
    return np.where(c < 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def visible_geometry(scene, frame: int):
    """(object name, evaluated geometry) of every Gaussian geometry shown at `frame`."""
    scene.frame_set(frame)
    depsgraph = bpy.context.evaluated_depsgraph_get()
    return [(inst.object.name, inst.object.data) for inst in depsgraph.object_instances
            if inst.object.type == "POINTCLOUD"
            or (inst.object.type == "MESH" and len(inst.object.data.vertices))]


def attribute(geometry, name: str, width: int) -> np.ndarray:
    attr = geometry.attributes[name]
    key = {"FLOAT_VECTOR": "vector", "FLOAT_COLOR": "color"}.get(attr.data_type, "value")
    out = np.empty(len(attr.data) * width, np.float32)
    attr.data.foreach_get(key, out)
    return out.reshape(-1, width) if width > 1 else out


@pytest.fixture
def ply_folder(tmp_path):
    """Three timesteps of different sizes, with SH degree 1, numbered 0, 2 and 5."""
    steps = gaussian_sequence_arrays(3, 400, seed=3, sh_rest=3)
    sizes = [300, 250, 400]
    seq = gaussians_mod.GaussianSequence(
        [Gaussians.from_arrays({k: v[:n] for k, v in a.items()}) for a, n in zip(steps, sizes)],
        [0, 2, 5])
    gaussians_mod.write_ply_sequence(tmp_path / "in", seq)
    return tmp_path / "in", seq


def test_imported_sequence_shows_expected_values_per_frame(ply_folder):
    folder, seq = ply_folder
    scene = empty_scene()
    root = plyio.import_ply_sequence(scene, folder, frame_start=10)
    assert root.name == "in" and pointcloud.is_asset(root)
    assert [o[pointcloud.FRAME_PROP] for o in pointcloud.timestep_objects(root)] == [10, 12, 15]
    # frame -> timestep shown: the first holds before the sequence, the last after it.
    for frame, t in [(3, 0), (10, 0), (11, 0), (12, 1), (14, 1), (15, 2), (40, 2)]:
        shown = visible_geometry(scene, frame)
        assert [name for name, _ in shown] == [f"in t{t:04d}"], frame
        points = shown[0][1]
        g = seq[t]
        assert len(points.points) == len(g)
        np.testing.assert_allclose(attribute(points, "position", 3), g.means, atol=1e-6)
        np.testing.assert_allclose(attribute(points, "gs_color", 4)[:, :3],
                                   srgb_to_linear(g.colors), atol=2e-5)
        np.testing.assert_allclose(attribute(points, "gs_opacity", 1), g.opacities, atol=1e-5)
        np.testing.assert_allclose(attribute(points, "gs_scale", 3), g.scales, rtol=1e-5)
        hidden = [o.hide_render for o in pointcloud.timestep_objects(root)]
        assert hidden == [i != t for i in range(3)], "renders follow the same keys"


def test_export_writes_the_sequence_back_identically(ply_folder, tmp_path):
    folder, _ = ply_folder
    scene = empty_scene()
    root = plyio.import_ply_sequence(scene, folder, frame_start=1)
    paths = plyio.export_ply_sequence(pointcloud.timestep_objects(root)[1], tmp_path / "out")
    assert [p.name for p in paths] == ["frame_0000.ply", "frame_0002.ply", "frame_0005.ply"]
    for path in paths:
        assert path.read_bytes() == (folder / path.name).read_bytes()


def test_moved_asset_exports_in_world_space(ply_folder, tmp_path):
    folder, seq = ply_folder
    scene = empty_scene()
    root = plyio.import_ply_sequence(scene, folder)
    root.location = (1.0, 2.0, 3.0)
    root.rotation_euler = (0.0, 0.0, math.pi / 2)
    root.scale = (2.0, 2.0, 2.0)
    bpy.context.view_layer.update()
    out = gaussians_mod.read_ply_sequence(plyio.export_ply_sequence(root, tmp_path / "moved"))
    g, moved = seq[0], out[0]
    rotated = np.stack([-2 * g.means[:, 1], 2 * g.means[:, 0], 2 * g.means[:, 2]], axis=1)
    expected = rotated + np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(moved.means, expected, atol=1e-5)
    np.testing.assert_allclose(moved.log_scales, g.log_scales + math.log(2.0), atol=1e-5)
    root.scale = (1.0, 2.0, 1.0)
    bpy.context.view_layer.update()
    with pytest.raises(ValueError, match="non-uniform scale"):
        plyio.export_ply_sequence(root, tmp_path / "bad")


def test_splats_are_ellipsoids_oriented_by_the_normalised_quaternion():
    scene = empty_scene()
    arrays = gaussian_sequence_arrays(1, 40, seed=5)[0]
    arrays["quats"] *= 3.0  # unnormalised on purpose
    config = pointcloud.PointCloudConfig(viewport_display="SPLATS", sigma_extent=2.5)
    pointcloud.build_asset_from_arrays(scene, "Splats", [arrays], [1], config)
    (_, mesh), = visible_geometry(scene, 1)
    corners = attribute(mesh, "position", 3).reshape(40, 12, 3)  # 12 vertices per ico-sphere
    quats = arrays["quats"] / np.linalg.norm(arrays["quats"], axis=1, keepdims=True)
    for i in range(40):
        w, x, y, z = quats[i]
        rot = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])
        local = (corners[i] - arrays["means"][i]) @ rot / (2.5 * np.exp(arrays["log_scales"][i]))
        np.testing.assert_allclose(np.linalg.norm(local, axis=1), 1.0, atol=1e-4)
    assert {"gs_color", "gs_opacity", "gs_falloff"} <= set(mesh.attributes.keys())
    assert "gs_rotation" not in mesh.attributes, "raw attributes are dropped before realising"
    np.testing.assert_allclose(attribute(mesh, "gs_falloff", 1), 0.5 * 2.5 ** 2, rtol=1e-6)


def test_viewport_ratio_decimates_and_settings_round_trip():
    scene = empty_scene()
    arrays = gaussian_sequence_arrays(2, 4000, seed=6)
    root = pointcloud.build_asset_from_arrays(scene, "Dense", arrays, [1, 2])
    settings = pointcloud.read_settings(root)
    assert settings == pointcloud.PointCloudConfig()
    settings.viewport_ratio = 0.25
    pointcloud.apply_settings(root, settings)
    assert pointcloud.read_settings(root).viewport_ratio == pytest.approx(0.25)
    counts = [len(geometry.points) for _, geometry in visible_geometry(scene, 2)]
    assert len(counts) == 1 and 800 < counts[0] < 1200
    settings.viewport_ratio = 0.0
    with pytest.raises(ValueError, match="viewport_ratio"):
        pointcloud.apply_settings(root, settings)


def test_bad_inputs_are_refused():
    scene = empty_scene()
    arrays = gaussian_sequence_arrays(2, 10)
    with pytest.raises(ValueError, match="one frame per timestep"):
        pointcloud.build_asset_from_arrays(scene, "X", arrays, [1])
    with pytest.raises(ValueError, match="strictly increasing"):
        pointcloud.build_asset_from_arrays(scene, "X", arrays, [3, 3])
    with pytest.raises(ValueError, match="render_display"):
        pointcloud.PointCloudConfig(render_display="VOXELS").check()


def test_cycles_render_of_one_frame_is_not_empty(tmp_path):
    scene = empty_scene()
    arrays = gaussian_sequence_arrays(2, 2000, seed=7)
    for step in arrays:
        step["sh0"][:] = (1.5, -0.5, -1.0)
        step["opacity_logits"][:] = 4.0
    pointcloud.build_asset_from_arrays(scene, "Lit", arrays, [1, 2])
    assert scene.cycles.transparent_max_bounces >= 64
    scene.camera = add_camera(scene, "Cam", location=(0, -3, 0), rotation=(math.pi / 2, 0, 0),
                              lens=35)
    scene.render.engine = "CYCLES"
    scene.cycles.samples, scene.cycles.device = 4, "CPU"
    scene.render.film_transparent = True
    scene.view_settings.view_transform = "Standard"
    scene.render.filepath = str(tmp_path / "frame.png")
    scene.frame_set(2)
    bpy.ops.render.render(write_still=True)
    image = bpy.data.images.load(str(tmp_path / "frame.png"))
    pixels = np.array(image.pixels[:]).reshape(24, 32, 4)
    assert pixels[..., 3].mean() > 0.1, "the Gaussians cover part of the frame"
    opaque = pixels[..., 3] > 0.9
    expected = np.clip(0.5 + gaussians_mod.SH_C0 * np.array([1.5, -0.5, -1.0]), 0, 1)
    np.testing.assert_allclose(pixels[opaque][:, :3].mean(axis=0), expected, atol=0.03)
