"""Rig extraction against hand-computed matrices and intrinsics, checked again against
Blender's own projection (`world_to_camera_view`), and the ring/arc presets."""

from __future__ import annotations

import math

import numpy as np
import pytest
from blender_support import add_camera, addon_module, bpy, empty_scene
from bpy_extras.object_utils import world_to_camera_view
from mathutils import Vector

pytestmark = pytest.mark.blender

rig = addon_module("rig")


def project_opencv(c2w: np.ndarray, intr: np.ndarray, point: np.ndarray) -> np.ndarray:
    """Pixel (u, v) of a world point through an OpenCV c2w [4, 4] and intrinsics [6]."""
    cam = np.linalg.inv(c2w) @ np.append(point, 1.0)
    fx, fy, cx, cy = intr[:4]
    return np.array([fx * cam[0] / cam[2] + cx, fy * cam[1] / cam[2] + cy])


def project_blender(scene, cam, point: np.ndarray) -> np.ndarray:
    """Pixel (u, v), top-left origin, of a world point as Blender's camera frame maps it."""
    width, height = rig.render_size(scene.render)
    ndc = world_to_camera_view(scene, cam, Vector(point))
    return np.array([ndc.x * width, (1.0 - ndc.y) * height])


def assert_projections_agree(scene, cam, c2w, intr, points):
    for point in points:
        np.testing.assert_allclose(project_opencv(c2w, intr, point),
                                   project_blender(scene, cam, point), atol=1e-3)


def test_plain_camera_matches_hand_computed_matrix():
    scene = empty_scene()
    scene.render.resolution_x, scene.render.resolution_y = 640, 480
    cam = add_camera(scene, "Plain", location=(1.0, 2.0, 3.0),
                     rotation=(math.pi / 2, 0.0, 0.0), lens=50.0)
    cam.data.clip_start, cam.data.clip_end = 0.5, 40.0
    result = rig.extract_rig(scene, [cam], 1, 1)
    # Rotated 90 degrees about X the camera looks along +Y with +Z up, so OpenCV's axes are
    # right = +X, down = -Z, forward = +Y.
    expected = np.array([[1.0, 0.0, 0.0, 1.0],
                         [0.0, 0.0, 1.0, 2.0],
                         [0.0, -1.0, 0.0, 3.0],
                         [0.0, 0.0, 0.0, 1.0]])
    np.testing.assert_allclose(result.c2w[0, 0], expected, atol=1e-6)
    fx = 50.0 * 640 / 36.0
    np.testing.assert_allclose(result.intrinsics[0, 0], [fx, fx, 320, 240, 640, 480])
    np.testing.assert_allclose(result.near_far[0, 0], [0.5, 40.0], rtol=1e-6)
    assert result.frames == [1] and result.camera_names == ["Plain"]
    assert_projections_agree(scene, cam, result.c2w[0, 0], result.intrinsics[0, 0],
                             [np.array([1.3, 7.0, 3.4]), np.array([-2.0, 9.0, 1.0])])


def test_shifted_vertically_fitted_sensor():
    scene = empty_scene()
    scene.render.resolution_x, scene.render.resolution_y = 400, 600
    scene.render.resolution_percentage = 50
    cam = add_camera(scene, "Shifted", rotation=(math.pi / 2, 0.0, 0.3), lens=30.0)
    cam.data.sensor_fit, cam.data.sensor_height = "VERTICAL", 24.0
    cam.data.shift_x, cam.data.shift_y = 0.1, -0.2
    intr = rig.extract_rig(scene, [cam], 1, 1).intrinsics[0, 0]
    # 200 x 300 px; the vertical fit makes the height the reference side: viewfac = 300.
    np.testing.assert_allclose(intr, [375.0, 375.0, 100 - 0.1 * 300, 150 - 0.2 * 300,
                                      200, 300])
    c2w = rig.extract_rig(scene, [cam], 1, 1).c2w[0, 0]
    assert_projections_agree(scene, cam, c2w, intr,
                             [np.array([0.5, 4.0, 0.3]), np.array([-1.0, 6.0, -1.2])])


def test_non_square_pixel_aspect():
    scene = empty_scene()
    scene.render.resolution_x, scene.render.resolution_y = 320, 240
    scene.render.pixel_aspect_x, scene.render.pixel_aspect_y = 2.0, 1.0
    cam = add_camera(scene, "Wide pixels", rotation=(math.pi / 2, 0.0, 0.0), lens=35.0)
    cam.data.shift_y = 0.05
    result = rig.extract_rig(scene, [cam], 1, 1)
    intr = result.intrinsics[0, 0]
    # Pixels twice as wide as tall: ycor = 0.5, the horizontal fit spans 320 pixels, and a
    # unit of image height holds twice as many pixel rows as a unit of width holds columns.
    fx = 35.0 * 320 / 36.0
    np.testing.assert_allclose(intr, [fx, 2 * fx, 160, 120 + 0.05 * 320 / 0.5, 320, 240])
    assert_projections_agree(scene, cam, result.c2w[0, 0], intr,
                             [np.array([0.4, 5.0, 0.2]), np.array([-0.7, 3.0, -0.1])])


def test_animated_camera_parented_to_moving_scaled_empty():
    scene = empty_scene()
    parent = bpy.data.objects.new("Mover", None)
    scene.collection.objects.link(parent)
    parent.scale = (2.0, 2.0, 2.0)
    animation = addon_module("animation")
    animation.set_keys(parent, "location", [1, 3], [0.0, 2.0], "LINEAR", index=0)
    animation.set_keys(parent, "rotation_euler", [1, 3], [0.0, math.pi / 2], "LINEAR",
                       index=2)
    cam = add_camera(scene, "Child", location=(0.0, -3.0, 0.0),
                     rotation=(math.pi / 2, 0.0, 0.0))
    cam.parent = parent
    animation.set_keys(cam.data, "lens", [1, 3], [50.0, 70.0], "LINEAR")
    scene.frame_set(7)
    result = rig.extract_rig(scene, [cam], 1, 3)
    assert scene.frame_current == 7, "the scene frame is restored"
    for t, frame in enumerate([1, 2, 3]):
        theta = math.pi / 4 * (frame - 1)
        rz = np.array([[math.cos(theta), -math.sin(theta), 0.0],
                       [math.sin(theta), math.cos(theta), 0.0], [0.0, 0.0, 1.0]])
        position = np.array([frame - 1.0, 0.0, 0.0]) + rz @ np.array([0.0, -6.0, 0.0])
        rot_blender = rz @ np.array([[1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]])
        expected = np.eye(4)
        expected[:3, :3] = rot_blender @ np.diag([1.0, -1.0, -1.0])
        expected[:3, 3] = position
        np.testing.assert_allclose(result.c2w[0, t], expected, atol=1e-5)
        lens = 50.0 + 10.0 * (frame - 1)
        assert result.intrinsics[0, t, 0] == pytest.approx(lens * 32 / 36.0, rel=1e-5)


def test_a_camera_sheared_by_its_parent_is_refused_naming_the_parent():
    scene = empty_scene()
    parent = bpy.data.objects.new("Squash", None)
    scene.collection.objects.link(parent)
    parent.scale, parent.rotation_euler = (2.0, 0.7, 1.3), (0.3, 0.2, 0.1)
    cam = add_camera(scene, "Skewed", location=(0.2, 0.1, 1.0), rotation=(0.7, 0.4, 0.2))
    cam.parent = parent
    with pytest.raises(ValueError, match=r"'Skewed' is sheared .* parent 'Squash'"):
        rig.extract_rig(scene, [cam], 1, 1)


@pytest.mark.parametrize("scale", [(1.1, 1.0, 1.0), (2.0, 0.7, 1.3)])
def test_a_shear_the_intrinsics_absorb_is_represented_exactly(scale):
    """A camera turned about its own Y axis under a parent scaled along X and Z: the shear
    stays in the camera's X-Z plane, so principal point and focal lengths absorb it."""
    scene = empty_scene()
    scene.render.resolution_x, scene.render.resolution_y = 320, 240
    parent = bpy.data.objects.new("Stretch", None)
    scene.collection.objects.link(parent)
    parent.scale = (scale[0], 1.0, scale[2])
    parent.location = (0.3, -0.2, 0.1)
    cam = add_camera(scene, "Turned", location=(0.0, -4.0, 0.5),
                     rotation=(math.pi / 2, 0.0, 0.0))
    cam.parent = parent
    cam.rotation_euler = (math.pi / 2, 0.0, 0.0)
    cam.rotation_mode = "XYZ"
    cam.delta_rotation_euler = (0.0, 0.0, 0.0)
    cam.rotation_euler.rotate_axis("Y", 0.4)
    result = rig.extract_rig(scene, [cam], 1, 1)
    c2w, intr = result.c2w[0, 0], result.intrinsics[0, 0]
    np.testing.assert_allclose(c2w[:3, :3].T @ c2w[:3, :3], np.eye(3), atol=1e-9)
    assert not np.allclose(intr[2], 160.0), "the shear moved the principal point"
    assert_projections_agree(scene, cam, c2w, intr,
                             [np.array([0.5, 3.0, 0.3]), np.array([-1.0, 2.0, 1.2]),
                              np.array([0.0, 0.0, 0.0])])


@pytest.mark.parametrize("kind", ["ORTHO", "PANO"])
def test_orthographic_and_panoramic_cameras_are_refused(kind):
    scene = empty_scene()
    cam = add_camera(scene, f"Cam {kind}")
    cam.data.type = kind
    with pytest.raises(ValueError, match=f"Cam {kind}.*(orthographic|panoramic)"):
        rig.extract_rig(scene, [cam], 1, 2)


def test_bad_ranges_and_empty_selections_are_refused():
    scene = empty_scene()
    cam = add_camera(scene, "Cam")
    with pytest.raises(ValueError, match="no cameras"):
        rig.extract_rig(scene, [], 1, 2)
    with pytest.raises(ValueError, match="empty"):
        rig.extract_rig(scene, [cam], 5, 2)
    with pytest.raises(ValueError, match="step"):
        rig.extract_rig(scene, [cam], 1, 2, 0)
    with pytest.raises(ValueError, match="sensor_fit"):
        rig.pinhole_intrinsics(50, 36, 24, "DIAGONAL", 0, 0, 10, 10)


def test_ring_preset_cameras_look_at_the_target():
    scene = empty_scene()
    config = rig.RigPresetConfig(num_cameras=6, radius=3.0, height=0.5, target=(1.0, 0.0, 0.5))
    target, cameras = rig.create_rig_preset(scene, config)
    assert [c.name for c in rig.sorted_cameras(cameras)] == [c.name for c in cameras]
    result = rig.extract_rig(scene, cameras, 1, 1)
    assert result.c2w.shape == (6, 1, 4, 4)
    target_pos = np.array(config.target)
    for v in range(6):
        c2w = result.c2w[v, 0]
        to_target = target_pos - c2w[:3, 3]
        assert np.linalg.norm(to_target[:2]) == pytest.approx(3.0, rel=1e-6)
        # OpenCV forward (+Z column) points at the target.
        np.testing.assert_allclose(c2w[:3, 2], to_target / np.linalg.norm(to_target),
                                   atol=1e-6)
        # The image's down axis points down in the world.
        assert c2w[2, 1] < 0
    assert cameras[0].parent == target
    assert result.camera_names[0].endswith("Cam 00")


def test_arc_preset_with_animated_orbit_turns_the_rig():
    scene = empty_scene()
    config = rig.RigPresetConfig(num_cameras=3, arc_degrees=90.0, animate_orbit=True,
                                 orbit_degrees=180.0, frame_start=1, frame_end=11)
    _, cameras = rig.create_rig_preset(scene, config)
    result = rig.extract_rig(scene, cameras, 1, 11, 5)
    assert result.frames == [1, 6, 11]
    first, last = result.c2w[:, 0, :3, 3], result.c2w[:, 2, :3, 3]
    np.testing.assert_allclose(last[:, :2], -first[:, :2], atol=1e-5)  # half a turn
    angles = np.degrees(np.arctan2(first[:, 1], first[:, 0]))
    np.testing.assert_allclose(angles, [-135.0, -90.0, -45.0], atol=1e-4)
    arrays = result.to_arrays()
    assert arrays["c2w"].dtype == np.float32 and arrays["intrinsics"].shape == (3, 3, 6)
