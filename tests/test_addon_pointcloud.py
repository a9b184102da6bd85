"""Imported Gaussian assets: attribute values and point counts per frame, the dilation from
the active camera, view-dependent colour, camera-facing splat quads, viewport decimation,
render settings, PLY sequence round trips, and a small Cycles render."""

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


# The configs here keep identity order (no sorting for EEVEE's blending), so attributes
# compare row by row; the depth order is tested in test_addon_identities.py.
POINTS = pointcloud.PointCloudConfig(viewport_display="POINTS", sorted_blending=False)
UNDILATED = pointcloud.PointCloudConfig(viewport_display="POINTS", dilation=0.0,
                                        sorted_blending=False)


def quat_matrices(quats: np.ndarray) -> np.ndarray:
    """[N, 3, 3] rotation matrices of quaternions (wxyz, normalised here)."""
    w, x, y, z = (quats / np.linalg.norm(quats, axis=1, keepdims=True)).T
    return np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                     2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                     2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
                    axis=1).reshape(-1, 3, 3)


def sh_colors(g, direction: np.ndarray) -> np.ndarray:
    """3DGS' view-dependent colour (gsplat's spherical_harmonics) at unit directions [N, 3]."""
    x, y, z = direction.T
    xx, yy, zz = x * x, y * y, z * z
    basis = [-0.4886025119029199 * y, 0.4886025119029199 * z, -0.4886025119029199 * x,
             1.0925484305920792 * x * y, -1.0925484305920792 * y * z,
             0.31539156525252005 * (2 * zz - xx - yy), -1.0925484305920792 * x * z,
             0.5462742152960396 * (xx - yy), -0.5900435899266435 * y * (3 * xx - yy),
             2.890611442640554 * x * y * z, -0.4570457994644658 * y * (4 * zz - xx - yy),
             0.3731763325901154 * z * (2 * zz - 3 * xx - 3 * yy),
             -0.4570457994644658 * x * (4 * zz - xx - yy), 1.445305721320277 * z * (xx - yy),
             -0.5900435899266435 * x * (xx - 3 * yy)]
    color = g.colors.astype(np.float64)
    for k in range(g.sh_rest.shape[1]):
        color = color + basis[k][:, None] * g.sh_rest[:, k]
    return np.maximum(color, 0.0)


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


def dilated_scales(geometry) -> np.ndarray:
    """[N, 3] standard deviations as drawn: the whitening rows have length 1 / scale."""
    rows = np.stack([attribute(geometry, f"gs_whiten_{k}", 3) for k in range(3)], axis=1)
    return 1.0 / np.linalg.norm(rows, axis=2)


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
    root = plyio.import_ply_sequence(scene, folder, frame_start=10, config=UNDILATED)
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
        np.testing.assert_allclose(attribute(points, "gs_opacity", 1), g.opacities, atol=1e-5)
        # Without dilation the whitening rows are R[:, k] / scale[k].
        np.testing.assert_allclose(dilated_scales(points), g.scales, rtol=1e-5)
        rows = np.stack([attribute(points, f"gs_whiten_{k}", 3) for k in range(3)], axis=1)
        expected = quat_matrices(g.quats).transpose(0, 2, 1) / g.scales[:, :, None]
        np.testing.assert_allclose(rows, expected, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(attribute(points, "gs_mean", 3), g.means, atol=1e-6)
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


def camera_scene(lens: float = 35.0):
    """An empty scene with a camera at (0.3, -3, 0.2) looking along +Y (64 x 48 px)."""
    scene = empty_scene()
    scene.render.resolution_x, scene.render.resolution_y = 64, 48
    scene.camera = add_camera(scene, "Cam", location=(0.3, -3.0, 0.2),
                              rotation=(math.pi / 2, 0, 0), lens=lens)
    return scene


def test_dilation_follows_the_active_camera_and_render_width():
    scene = camera_scene()
    g = Gaussians.from_arrays(gaussian_sequence_arrays(1, 50, seed=4)[0])
    pointcloud.build_asset(scene, "Dilated", [g], [1], POINTS)
    for percent in (100, 50):  # the driver follows the output size
        scene.render.resolution_percentage = percent
        (_, points), = visible_geometry(scene, 1)
        depth = g.means[:, 1] + 3.0
        pixel = 36.0 / 35.0 / (64 * percent / 100)  # sensor width / lens / pixels across
        expected = np.sqrt(g.scales**2 + 0.3 * (depth * pixel)[:, None] ** 2)
        np.testing.assert_allclose(dilated_scales(points), expected, rtol=1e-4)


def test_view_dependent_colour_from_the_camera_direction():
    scene = camera_scene()
    steps = [Gaussians.from_arrays(a) for a in gaussian_sequence_arrays(1, 60, seed=8,
                                                                        sh_rest=15)]
    root = pointcloud.build_asset(scene, "SH", steps, [1], POINTS)
    assert pointcloud.asset_group_of(root).nodes["Settings"].inputs["SH Degree"].default_value \
        == 3
    (_, points), = visible_geometry(scene, 1)
    direction = steps[0].means - np.array([0.3, -3.0, 0.2])
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    np.testing.assert_allclose(attribute(points, "gs_color", 4)[:, :3],
                               sh_colors(steps[0], direction), atol=1e-4)


def test_splats_are_camera_facing_quads_bounding_each_gaussian():
    scene = camera_scene()
    arrays = gaussian_sequence_arrays(1, 40, seed=5)[0]
    arrays["quats"] *= 3.0  # unnormalised on purpose
    g = Gaussians.from_arrays(arrays)
    pointcloud.build_asset(scene, "Splats", [g], [1],
                           pointcloud.PointCloudConfig(sorted_blending=False))
    (_, mesh), = visible_geometry(scene, 1)
    corners = attribute(mesh, "position", 3).reshape(40, 4, 3)
    assert np.ptp(corners[:, :, 1], axis=1).max() < 1e-5, "quads face the camera (along +Y)"
    np.testing.assert_allclose(corners.mean(axis=1), g.means, atol=1e-5)
    scales = dilated_scales(mesh)[::4]
    ray = g.means - np.array([0.3, -3.0, 0.2])
    ray /= np.linalg.norm(ray, axis=1, keepdims=True)
    covariance = np.einsum("nij,nj,nkj->nik", quat_matrices(g.quats), scales**2,
                           quat_matrices(g.quats))
    extent = np.minimum(np.sqrt(2 * np.log(255 * g.opacities)), 4.0)
    for axis, index in (((1.0, 0.0, 0.0), 0), ((0.0, 0.0, 1.0), 2)):
        a = np.array(axis) - np.outer(ray @ np.array(axis) / ray[:, 1], (0.0, 1.0, 0.0))
        half = np.sqrt(np.einsum("ni,nij,nj->n", a, covariance, a)) * extent * 1.1
        np.testing.assert_allclose(np.ptp(corners[:, :, index], axis=1) / 2, half, rtol=1e-4)
    assert {"gs_color", "gs_opacity", "gs_mean", "gs_whiten_0"} <= set(mesh.attributes.keys())
    offsets = attribute(mesh, "gs_offset", 3).reshape(40, 4, 3)  # what motion blur moves with
    np.testing.assert_allclose(offsets, corners - g.means[:, None], atol=1e-6)
    assert "gs_rotation" not in mesh.attributes, "raw attributes are dropped before realising"


def test_ico_sphere_proxies_hold_the_ellipsoid():
    scene = camera_scene()
    g = Gaussians.from_arrays(gaussian_sequence_arrays(1, 30, seed=9)[0])
    config = pointcloud.PointCloudConfig(splat_subdivisions=1, sigma_extent=2.5,
                                         sorted_blending=False)
    pointcloud.build_asset(scene, "Spheres", [g], [1], config)
    (_, mesh), = visible_geometry(scene, 1)
    corners = attribute(mesh, "position", 3).reshape(30, 12, 3)
    scales = dilated_scales(mesh)[::12]
    local = np.einsum("nvi,nij->nvj", corners - g.means[:, None], quat_matrices(g.quats))
    extent = np.minimum(np.sqrt(2 * np.log(255 * g.opacities)), 2.5)
    radius = np.linalg.norm(local / (scales * extent[:, None])[:, None], axis=2)
    np.testing.assert_allclose(radius, 1 / 0.7946436, rtol=1e-4)


def test_viewport_ratio_decimates_and_settings_round_trip():
    scene = empty_scene()
    arrays = gaussian_sequence_arrays(2, 4000, seed=6)
    root = pointcloud.build_asset_from_arrays(scene, "Dense", arrays, [1, 2], POINTS)
    settings = pointcloud.read_settings(root)
    assert settings == POINTS
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
    assert scene.view_settings.view_transform == "Raw", "set on import: values as stored"
    scene.render.filepath = str(tmp_path / "frame.png")
    scene.frame_set(2)
    bpy.ops.render.render(write_still=True)
    image = bpy.data.images.load(str(tmp_path / "frame.png"))
    pixels = np.array(image.pixels[:]).reshape(24, 32, 4)
    assert pixels[..., 3].mean() > 0.1, "the Gaussians cover part of the frame"
    opaque = pixels[..., 3] > 0.9
    expected = np.clip(0.5 + gaussians_mod.SH_C0 * np.array([1.5, -0.5, -1.0]), 0, 1)
    np.testing.assert_allclose(pixels[opaque][:, :3].mean(axis=0), expected, atol=0.03)
