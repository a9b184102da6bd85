"""The demo's animated Blender scene: three moving, turning objects with emission materials
inside a textured dome, the add-on's camera rig around them and a camera outside the rig."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parents[2]  # the repository
os.environ.setdefault("BLENDER_USER_RESOURCES", str(ROOT / ".cache" / "blender"))

import bpy  # noqa: E402  (BLENDER_USER_RESOURCES must be set first)
from mathutils import Vector  # noqa: E402

if TYPE_CHECKING:
    from backend.tools.demo import DemoConfig

SCENE_OBJECTS = ("Ball", "Box", "Ring", "Backdrop")


def emission_material(name: str, colors: tuple, texture: str = "checker",
                      scale: float = 4.0) -> bpy.types.Material:
    """An emission material mixing two colours with a procedural texture (colours render as
    stored, like the unlit Gaussians the models were trained on)."""
    material = bpy.data.materials.new(name)
    if bpy.app.version < (5, 0, 0):
        material.use_nodes = True
    tree = material.node_tree
    tree.nodes.clear()
    output = tree.nodes.new("ShaderNodeOutputMaterial")
    emission = tree.nodes.new("ShaderNodeEmission")
    mix = tree.nodes.new("ShaderNodeMix")
    mix.data_type = "RGBA"
    mix.inputs["A"].default_value = (*colors[0], 1.0)
    mix.inputs["B"].default_value = (*colors[1], 1.0)
    if texture == "checker":
        tex = tree.nodes.new("ShaderNodeTexChecker")
        tex.inputs["Scale"].default_value = scale
        factor = tex.outputs["Fac"]
    elif texture == "wave":
        tex = tree.nodes.new("ShaderNodeTexWave")
        tex.inputs["Scale"].default_value = scale
        factor = tex.outputs["Fac"]
    else:
        tex = tree.nodes.new("ShaderNodeTexNoise")
        tex.inputs["Scale"].default_value = scale
        factor = tex.outputs["Fac"]
    tree.links.new(factor, mix.inputs["Factor"])
    tree.links.new(mix.outputs["Result"], emission.inputs["Color"])
    tree.links.new(emission.outputs[0], output.inputs["Surface"])
    return material


def _animate(obj: bpy.types.Object, frame_start: int, frame_end: int, start: dict,
             end: dict) -> None:
    """Linear keys on location/rotation between two poses."""
    for frame, pose in ((frame_start, start), (frame_end, end)):
        obj.location = pose["location"]
        obj.rotation_euler = pose.get("rotation", (0.0, 0.0, 0.0))
        obj.keyframe_insert("location", frame=frame)
        obj.keyframe_insert("rotation_euler", frame=frame)
    action = obj.animation_data.action if obj.animation_data else None
    curves = getattr(action, "fcurves", None) if action is not None else None
    if curves is None and action is not None:  # Blender 5 layered actions
        curves = [c for layer in action.layers for strip in layer.strips
                  for bag in strip.channelbags for c in bag.fcurves]
    for curve in curves or []:
        for key in curve.keyframe_points:
            key.interpolation = "LINEAR"


def build_scene(config: DemoConfig) -> bpy.types.Scene:
    """An empty file with three animated objects in a textured dome, Cycles on the CPU."""
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    scene.name = "4Real Demo"
    scene.frame_start, scene.frame_end = 1, config.frames
    scene.render.fps = 8
    scene.render.resolution_x = scene.render.resolution_y = config.resolution
    scene.render.resolution_percentage = 100
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = config.samples
    scene.cycles.use_denoising = False
    scene.cycles.max_bounces = 0  # emission only: camera rays see the colours directly
    scene.view_settings.view_transform = "Standard"
    world = bpy.data.worlds.new("Demo World")
    world.color = (0.05, 0.05, 0.05)
    scene.world = world
    last = config.frames

    def add(op, name: str, material: bpy.types.Material, **kwargs) -> bpy.types.Object:
        op(**kwargs)
        obj = bpy.context.active_object
        obj.name = name
        obj.data.materials.append(material)
        return obj

    sphere = add(bpy.ops.mesh.primitive_uv_sphere_add, "Ball",
                 emission_material("Ball", ((0.9, 0.2, 0.15), (1.0, 0.85, 0.2)), "wave", 3.0),
                 radius=0.32, segments=32, ring_count=16)
    _animate(sphere, 1, last, {"location": (-0.55, -0.3, 0.35)},
             {"location": (0.45, 0.1, -0.1), "rotation": (0.0, 0.0, 1.5)})
    cube = add(bpy.ops.mesh.primitive_cube_add, "Box",
               emission_material("Box", ((0.15, 0.35, 0.95), (0.95, 0.95, 0.9)), "checker", 3.0),
               size=0.5)
    _animate(cube, 1, last, {"location": (0.35, 0.45, -0.15)},
             {"location": (0.1, -0.35, 0.15), "rotation": (0.4, 0.0, math.pi / 2)})
    torus = add(bpy.ops.mesh.primitive_torus_add, "Ring",
                emission_material("Ring", ((0.1, 0.75, 0.3), (0.05, 0.3, 0.15)), "noise", 6.0),
                major_radius=0.3, minor_radius=0.1)
    _animate(torus, 1, last, {"location": (0.0, 0.0, 0.55), "rotation": (0.3, 0.0, 0.0)},
             {"location": (-0.2, 0.2, 0.45), "rotation": (1.6, 0.6, 0.0)})
    dome = add(bpy.ops.mesh.primitive_uv_sphere_add, "Backdrop",
               emission_material("Backdrop", ((0.55, 0.5, 0.42), (0.25, 0.3, 0.38)), "noise",
                                 2.5),
               radius=8.0, segments=48, ring_count=24)
    dome["fourreal_demo_backdrop"] = True
    scene.frame_set(1)
    return scene


def add_rig(config: DemoConfig) -> list[bpy.types.Object]:
    """The add-on's Add Camera Rig operator: an arc of cameras looking at the origin."""
    bpy.context.scene.cursor.location = (0.0, 0.0, 0.0)
    arc = 30.0 * (config.views - 1) if config.views > 1 else 1.0
    result = bpy.ops.fourreal.add_rig(num_cameras=config.views, radius=4.2, height=1.2,
                                      focal_length=40.0, arc_degrees=min(arc, 360.0))
    if result != {"FINISHED"}:
        raise RuntimeError(f"fourreal.add_rig returned {result}")
    from blender_addon import rig

    return rig.collection_cameras(bpy.context.scene.fourreal.rig_collection)


def add_novel_camera(scene: bpy.types.Scene, cameras: list[bpy.types.Object]) -> bpy.types.Object:
    """A camera that is not in the rig: between the first two rig cameras, higher up."""
    a = cameras[0].matrix_world.translation
    b = cameras[min(1, len(cameras) - 1)].matrix_world.translation
    middle = (a + b) / 2
    direction = Vector((middle.x, middle.y, 0.0)).normalized()
    location = direction * 4.4 + Vector((0.0, 0.0, 2.0))
    data = bpy.data.cameras.new("Novel View")
    data.lens = 40.0
    cam = bpy.data.objects.new("Novel View", data)
    cam.location = location
    cam.rotation_mode = "QUATERNION"
    cam.rotation_quaternion = (-location).to_track_quat("-Z", "Y")
    scene.collection.objects.link(cam)
    return cam


def hide_scene_content(hidden: bool) -> None:
    """Hide (or show) the original objects in renders, leaving cameras and Gaussians."""
    for name in SCENE_OBJECTS:
        bpy.data.objects[name].hide_render = hidden
