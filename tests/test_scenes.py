"""The open test scenes (backend/tools/scenes.py): one tiny scene rendered with Cycles, read
back without Blender, its cameras checked against the objects, Blender's own projection and
the rendered object masks."""

from __future__ import annotations

import numpy as np
import pytest
from blender_support import bpy
from bpy_extras.object_utils import world_to_camera_view
from mathutils import Vector

from backend.tools import scenes

pytestmark = pytest.mark.blender

SPEC = scenes.SceneSpec(seed=1, timesteps=2, size=32, ring_views=3, held_out_between=1,
                        held_out_above=0, num_objects=3)
RENDER = {"engine": "CYCLES", "samples": 2}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scene")
    info = scenes.render_scene(SPEC, folder, **RENDER)
    return folder, info, scenes.load_scene(folder)


def groups(data):
    """(frames, c2w, intrinsics, masks) of the ring and of the held-out cameras."""
    return [tuple(data[p + k] for k in ("frames", "c2w", "intrinsics", "masks"))
            for p in ("", "held_out_")]


def object_points(info, key: str = "inside_point") -> np.ndarray:
    """[N, T, 3] per object and timestep: its centre ("location") or a point inside it."""
    return np.array([o[key] for o in info["layout"]["objects"]])


def test_folder_loads_as_a_scene_folder(rendered):
    from backend.data.folder import read_cameras

    folder, info, data = rendered
    assert info == data["scene"]
    assert data["frames"].shape == (3, 2, 32, 32, 3) and data["frames"].dtype == np.uint8
    assert data["held_out_frames"].shape == (1, 2, 32, 32, 3)
    assert data["masks"].shape == (3, 2, 32, 32) and data["held_out_masks"].shape[0] == 1
    for sub, views in (("", 3), ("held_out", 1)):
        cams = read_cameras(folder / sub / "cameras.json")
        assert cams.c2w.shape == (views, 2, 4, 4) and cams.near_far == (0.1, 100.0)
    assert data["scene"]["spec"]["seed"] == 1
    assert (folder / "contact_sheet.png").is_file()
    assert scenes.is_rendered(SPEC, folder, **RENDER)
    assert not scenes.is_rendered(scenes.SceneSpec(seed=2, timesteps=2, size=32), folder)


def test_cameras_are_rigid_fixed_and_aimed_at_the_action(rendered):
    _, info, data = rendered
    target = np.array(info["layout"]["cameras"]["target"])
    ring_centres = data["c2w"][:, 0, :3, 3]
    for _, c2w, intr, _ in groups(data):
        rot = c2w[..., :3, :3]
        np.testing.assert_allclose(np.swapaxes(rot, -1, -2) @ rot, np.broadcast_to(
            np.eye(3), rot.shape), atol=1e-6)
        assert np.allclose(np.linalg.det(rot), 1.0)
        np.testing.assert_allclose(c2w[:, 1], c2w[:, 0], atol=1e-9)  # still over time
        for v in range(c2w.shape[0]):
            u, w, z = scenes.project(c2w[v, 0], intr[v, 0], target)
            assert z > 0 and abs(u - 16) < 0.5 and abs(w - 16) < 0.5  # looks at the target
    held = data["held_out_c2w"][:, 0, :3, 3]
    assert np.linalg.norm(held[:, None] - ring_centres[None], axis=-1).min() > 0.5


def test_projection_agrees_with_blender(rendered):
    _, info, data = rendered
    scene, _, ring, held = scenes.build_scene(SPEC)
    centres = object_points(info, "location")
    points = object_points(info)
    for cams, (_, c2w, intr, _) in zip((ring, held), groups(data)):
        for t in range(SPEC.timesteps):
            scene.frame_set(t + 1)
            for v, cam in enumerate(cams):
                for k, obj in enumerate(info["layout"]["objects"]):
                    live = np.array(bpy.data.objects[obj["name"]].matrix_world.translation)
                    np.testing.assert_allclose(live, centres[k, t], atol=1e-5)
                    inside = bpy.data.objects[obj["name"]].matrix_world @ Vector(
                        (obj.get("major_radius", 0.0), 0.0, 0.0))
                    np.testing.assert_allclose(np.array(inside), points[k, t], atol=1e-5)
                    ndc = world_to_camera_view(scene, cam, Vector(points[k, t]))
                    expected = [ndc.x * SPEC.size, (1 - ndc.y) * SPEC.size]
                    got = scenes.project(c2w[v, t], intr[v, t], points[k, t])[:2]
                    np.testing.assert_allclose(got, expected, atol=1e-3)


def test_object_centres_land_on_their_object(rendered):
    """A point inside each object projects onto its own mask, or onto an object nearer the
    camera: the OpenCV cameras on disk agree with the rendered pixels."""
    _, info, data = rendered
    centres = object_points(info)
    hits = np.zeros(len(centres), int)
    for _, c2w, intr, masks in groups(data):
        for v in range(c2w.shape[0]):
            for t in range(SPEC.timesteps):
                uvz = scenes.project(c2w[v, t], intr[v, t], centres[:, t])
                for k, (u, w, z) in enumerate(uvz):
                    assert 0 <= u < SPEC.size and 0 <= w < SPEC.size and z > 0
                    seen = int(masks[v, t, int(w), int(u)])
                    assert seen != 0, f"view {v} t {t}: object {k} lands on the background"
                    assert seen == k + 1 or uvz[seen - 1, 2] < z
                    hits[k] += seen == k + 1
    assert (hits > 0).all()


def test_moving_objects_change_the_frames_and_the_sky_is_above(rendered):
    _, info, data = rendered
    objects = info["layout"]["objects"]
    moving = [k + 1 for k, o in enumerate(objects) if o["moving"]]
    assert moving and len(moving) < len(objects)
    assert all(np.ptp(np.array(objects[k - 1]["location"]), axis=0).max() > 0.3
               for k in moving)
    frames, masks = data["frames"].astype(float), data["masks"]
    where = np.isin(masks, moving).any(axis=1)  # [V, H, W]: the moving object at either time
    change = np.abs(frames[:, 1] - frames[:, 0]).mean(axis=-1)  # [V, H, W]
    assert change[where].mean() > 20
    assert change[where].mean() > 4 * change[~where].mean()
    top = frames[:, 0, 0]  # [V, W, 3]: top rows of the ring views are sky (no objects)
    assert (masks[:, :, 0] == 0).all() and top.std(axis=1).max() < 3
