"""Helpers for the add-on tests: headless bpy, the add-on imported from the repository, empty
scenes and small seeded Gaussian sequences."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("BLENDER_USER_RESOURCES", str(ROOT / ".cache" / "blender"))

import bpy  # noqa: E402  (needs BLENDER_USER_RESOURCES set first)

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def addon_module(name: str = ""):
    """The add-on package `blender_addon` or its submodule `name`, imported from the
    repository (importing registers nothing)."""
    return importlib.import_module(f"blender_addon.{name}" if name else "blender_addon")


def empty_scene() -> bpy.types.Scene:
    """Reset Blender to an empty file and return its scene (1-based frames 1..24, 32x24 px)."""
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    scene.frame_start, scene.frame_end = 1, 24
    scene.render.resolution_x, scene.render.resolution_y = 32, 24
    scene.render.resolution_percentage = 100
    return scene


def add_camera(scene: bpy.types.Scene, name: str, location=(0.0, 0.0, 0.0),
               rotation=(0.0, 0.0, 0.0), lens: float = 50.0) -> bpy.types.Object:
    data = bpy.data.cameras.new(name)
    data.lens = lens
    cam = bpy.data.objects.new(name, data)
    cam.location = location
    cam.rotation_euler = rotation
    scene.collection.objects.link(cam)
    return cam


def gaussian_sequence_arrays(num_steps: int, num_points: int, seed: int = 0,
                             sh_rest: int = 0) -> list[dict[str, np.ndarray]]:
    """Per timestep: wire arrays of `num_points` seeded Gaussians that drift along +X."""
    rng = np.random.default_rng(seed)
    steps = []
    for t in range(num_steps):
        quats = rng.normal(size=(num_points, 4)).astype(np.float32)
        arrays = {
            "means": (rng.uniform(-0.5, 0.5, (num_points, 3))
                      + np.array([0.1 * t, 0.0, 0.0])).astype(np.float32),
            "quats": quats,
            "log_scales": rng.uniform(-3.5, -2.0, (num_points, 3)).astype(np.float32),
            "opacity_logits": rng.uniform(-1.0, 4.0, num_points).astype(np.float32),
            "sh0": rng.normal(0.0, 0.8, (num_points, 3)).astype(np.float32),
        }
        if sh_rest:
            arrays["sh_rest"] = rng.normal(0.0, 0.1, (num_points, sh_rest, 3)).astype(
                np.float32)
        steps.append(arrays)
    return steps


def pump(poll, until, timeout: float = 60.0, interval: float = 0.01):
    """Call `poll()` (what the add-on's timer calls) until `until()` is true; fails after
    `timeout` seconds instead of hanging."""
    import time

    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {timeout} s")
        poll()
        time.sleep(interval)


def emissive_cube(scene: bpy.types.Scene, half_size: float = 0.4,
                  color=(0.8, 0.3, 0.1)) -> bpy.types.Object:
    """A cube with an emission material, linked to the scene."""
    h = half_size
    verts = [(x, y, z) for x in (-h, h) for y in (-h, h) for z in (-h, h)]
    faces = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    mesh = bpy.data.meshes.new("Cube")
    mesh.from_pydata(verts, [], faces)
    material = bpy.data.materials.new("Cube Emission")
    if bpy.app.version < (5, 0, 0):
        material.use_nodes = True
    tree = material.node_tree
    tree.nodes.clear()
    emission = tree.nodes.new("ShaderNodeEmission")
    emission.inputs["Color"].default_value = (*color, 1.0)
    output = tree.nodes.new("ShaderNodeOutputMaterial")
    tree.links.new(emission.outputs[0], output.inputs["Surface"])
    mesh.materials.append(material)
    cube = bpy.data.objects.new("Cube", mesh)
    scene.collection.objects.link(cube)
    return cube


def cube_surface_samples(matrix_world, half_size: float, count: int,
                         seed: int = 0) -> np.ndarray:
    """[count, 3] seeded points spread over the surface of a cube, in world space."""
    rng = np.random.default_rng(seed)
    local = rng.uniform(-half_size, half_size, (count, 3))
    axis = rng.integers(0, 3, count)
    local[np.arange(count), axis] = np.where(rng.random(count) < 0.5, -half_size, half_size)
    mat = np.array(matrix_world)
    return (local @ mat[:3, :3].T + mat[:3, 3]).astype(np.float32)


def use_cycles(scene: bpy.types.Scene, samples: int = 4) -> None:
    """Cycles on the CPU, few samples, transparent film, colours as stored."""
    scene.render.engine = "CYCLES"
    scene.cycles.samples, scene.cycles.device = samples, "CPU"
    scene.cycles.use_denoising = False
    scene.render.film_transparent = True
    scene.view_settings.view_transform = "Standard"


def opencv_ring(num: int, radius: float = 3.0, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """`num` OpenCV cameras on a circle around the origin at height 0.5, looking at it:
    c2w [C, 4, 4] and intrinsics [C, 6], float32."""
    c2w = np.zeros((num, 4, 4), np.float32)
    for i, angle in enumerate(2 * np.pi * np.arange(num) / num):
        eye = np.array([radius * np.cos(angle), radius * np.sin(angle), 0.5])
        forward = -eye / np.linalg.norm(eye)
        right = np.cross(forward, [0.0, 0.0, 1.0])
        right /= np.linalg.norm(right)
        c2w[i, :3, :3] = np.stack([right, np.cross(forward, right), forward], axis=1)
        c2w[i, :3, 3], c2w[i, 3, 3] = eye, 1.0
    focal = 1.2 * size
    intrinsics = np.tile(np.array([focal, focal, size / 2, size / 2, size, size], np.float32),
                         (num, 1))
    return c2w, intrinsics
