"""Open Blender scenes for judging the fitting stage and the learned models on worlds unlike
their procedural training scenes: a textured ground plane under a gradient sky, a sun with
shadows, 2-4 textured objects of which some move, a ring of cameras and held-out cameras.

Everything follows from a seeded `SceneSpec`: `scene_layout(spec)` (numpy only) says what is
where, `build_scene(spec)` makes it in Blender, `render_scene(spec, folder)` renders it.
Layout of one rendered scene folder (the ring is a scene folder `backend.data.folder` reads)::

    cameras.json            {"c2w": [V][T][4][4], "intrinsics": [V][T][6], "near_far": [n, f]}
                            OpenCV camera-to-world, (fx, fy, cx, cy, width, height) in pixels,
                            near/far the cameras' clip range
    view_00/0000.png ...    ring view 0 at timestep 0 (8-bit sRGB, Standard view transform)
    masks/view_00/0000.png  object ids per pixel (0 ground and sky, k object k-1 in scene.json)
    held_out/cameras.json   the same for the held-out cameras (not in the ring), with
    held_out/view_00/...    their frames and held_out/masks/
    scene.json              spec, render settings, objects per timestep, cameras, timings
    contact_sheet.png       ring views and held-out views at timestep 0, view 0 over time, masks

`load_scene(folder)` reads a folder back with numpy, imageio and json only (no Blender).
Command line (renders a seeded set, seed i for scene i; scenes already rendered with the same
spec and settings are skipped)::

    python -m backend.tools.scenes --out out/scenes --count 3 [--timesteps 8 --size 128]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
FORMAT_VERSION = 1
KINDS = ("sphere", "box", "torus", "cylinder")
PATTERNS = ("checker", "noise", "wave", "brick", "voronoi")
ACTION_RADIUS = 1.4  # objects stand in this disc around the origin
MASK_STEP = 40  # mask pass: object k renders with red k * MASK_STEP / 255 (Raw transform)


@dataclass
class SceneSpec:
    seed: int = 0
    timesteps: int = 8
    size: int = 128  # square frames, pixels
    ring_views: int = 8
    held_out_between: int = 2  # at the ring's elevation, halfway between ring cameras
    held_out_above: int = 2  # higher up, also halfway in azimuth
    num_objects: int = 0  # 0: 2-4 from the seed

    def check(self) -> None:
        if self.timesteps < 2 or self.size < 8 or self.ring_views < 1:
            raise ValueError(f"scene spec needs >= 2 timesteps, size >= 8 and a camera: {self}")
        if self.num_objects and not 1 <= self.num_objects <= len(KINDS):
            raise ValueError(f"num_objects must be 0 (from the seed) or 1-{len(KINDS)}")


# ---------------------------------------------------------------------------- layout (numpy)

def _colour(rng: np.random.Generator, saturation=(0.4, 0.9), value=(0.35, 0.9)) -> list:
    """A linear RGB colour from a random hue, saturation and value."""
    import colorsys

    rgb = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(*saturation), rng.uniform(*value))
    return [round(c ** 2.2, 4) for c in rgb]


def _object_shape(kind: str, rng: np.random.Generator) -> dict:
    """Size parameters, the footprint radius and the height of the centre above the ground."""
    if kind == "sphere":
        r = rng.uniform(0.28, 0.5)
        return {"radius": r, "footprint": r, "z": r, "rotation": [0.0, 0.0, 0.0]}
    if kind == "box":
        dims = rng.uniform(0.4, 0.85, 3)
        return {"dimensions": dims.tolist(), "footprint": 0.5 * math.hypot(*dims[:2]),
                "z": dims[2] / 2, "rotation": [0.0, 0.0, 0.0]}
    if kind == "cylinder":
        r, h = rng.uniform(0.18, 0.35), rng.uniform(0.5, 1.1)
        return {"radius": r, "depth": h, "footprint": r, "z": h / 2, "rotation": [0.0, 0.0, 0.0]}
    major, minor = rng.uniform(0.28, 0.42), rng.uniform(0.08, 0.14)  # standing upright
    return {"major_radius": major, "minor_radius": minor, "footprint": major + minor,
            "z": major + minor, "rotation": [math.pi / 2, 0.0, 0.0]}


def _paths_clear(objects: list[dict], samples: int = 11) -> bool:
    """Objects keep apart (footprints plus a margin) along their straight paths."""
    for s in np.linspace(0.0, 1.0, samples):
        xy = [np.add(o["start"][:2], s * np.subtract(o["end"][:2], o["start"][:2]))
              for o in objects]
        for i in range(len(objects)):
            for j in range(i):
                gap = objects[i]["footprint"] + objects[j]["footprint"] + 0.1
                if np.linalg.norm(xy[i] - xy[j]) < gap:
                    return False
    return all(np.hypot(*o["end"][:2]) <= ACTION_RADIUS + 0.3 for o in objects)


def _place_objects(spec: SceneSpec, rng: np.random.Generator) -> list[dict]:
    count = spec.num_objects or int(rng.integers(2, 5))
    kinds = list(rng.permutation(KINDS)[:count])
    moving = 1 if count <= 2 else int(rng.integers(1, count))
    for _ in range(1000):
        objects = []
        for k, kind in enumerate(kinds):
            shape = _object_shape(str(kind), rng)
            angle, dist = rng.uniform(0, 2 * np.pi), ACTION_RADIUS * np.sqrt(rng.uniform())
            start = [dist * math.cos(angle), dist * math.sin(angle), shape["z"]]
            end, turn = list(start), [0.0, 0.0, 0.0]
            if k < moving:
                heading, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.6, 1.1)
                end = [start[0] + length * math.cos(heading),
                       start[1] + length * math.sin(heading), start[2] + rng.uniform(0.3, 0.5)]
                turn = [rng.uniform(-0.4, 0.4), 0.0,
                        rng.choice([-1, 1]) * rng.uniform(1.0, 2.5)]
            objects.append({"name": f"{kind.capitalize()} {k}", "kind": str(kind),
                            "moving": k < moving, "start": start, "end": end, "turn": turn,
                            "pattern": str(rng.choice(PATTERNS)),
                            "pattern_scale": rng.uniform(3.0, 9.0),
                            "colours": [_colour(rng), _colour(rng, value=(0.15, 0.6))],
                            **shape})
        if _paths_clear(objects):
            return objects
    raise RuntimeError(f"could not place {count} objects for seed {spec.seed}")


def _camera_layout(spec: SceneSpec, rng: np.random.Generator) -> dict:
    """Ring elevation, lens and distance: the lens leaves the top ~20% of a ring frame to the
    sky (the horizon lies `elevation` above the optical axis); the distance frames the action."""
    elevation = rng.uniform(15.0, 30.0)
    lens = float(np.clip(10.8 / math.tan(math.radians(elevation)) * rng.uniform(0.8, 1.0),
                         18.0, 35.0))
    half_width = 18.0 / lens  # tan of the half field of view (36 mm sensor)
    distance = (ACTION_RADIUS + 0.5) / (half_width * rng.uniform(0.75, 0.9))
    step = 2 * np.pi / spec.ring_views
    ring = (-0.5 * np.pi + step * np.arange(spec.ring_views)).tolist()
    slots = spec.ring_views // max(1, spec.held_out_between + spec.held_out_above)
    halfway = [ring[(i * max(1, slots)) % spec.ring_views] + step / 2
               for i in range(spec.held_out_between + spec.held_out_above)]
    held = [{"azimuth": a, "elevation": elevation} for a in halfway[:spec.held_out_between]]
    held += [{"azimuth": a, "elevation": min(75.0, elevation + rng.uniform(25.0, 35.0))}
             for a in halfway[spec.held_out_between:]]
    return {"elevation": elevation, "lens": lens, "distance": distance,
            "target": [0.0, 0.0, 0.35], "ring_azimuths": ring, "held_out": held,
            "clip": [0.1, 100.0]}


def euler_xyz(angles) -> np.ndarray:
    """[3, 3] rotation of Blender's XYZ Euler angles (X applied first)."""
    (cx, cy, cz), (sx, sy, sz) = np.cos(angles), np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def scene_layout(spec: SceneSpec) -> dict:
    """What is where, from the seed alone (numpy only): objects, ground, sky, sun, cameras."""
    spec.check()
    rng = np.random.default_rng(spec.seed)
    objects = _place_objects(spec, rng)
    steps = np.linspace(0.0, 1.0, spec.timesteps)
    for obj in objects:
        start, end = np.array(obj["start"]), np.array(obj["end"])
        obj["location"] = [(start + s * (end - start)).tolist() for s in steps]
        obj["rotation_euler"] = [(np.add(obj["rotation"], s * np.array(obj["turn"]))).tolist()
                                 for s in steps]
        # a point inside the solid (a torus's centre is in its hole): on the tube's core
        local = [obj["major_radius"], 0.0, 0.0] if obj["kind"] == "torus" else [0.0, 0.0, 0.0]
        obj["inside_point"] = [(np.add(loc, euler_xyz(rot) @ local)).tolist()
                               for loc, rot in zip(obj["location"], obj["rotation_euler"])]
    ground = {"pattern": str(rng.choice(("checker", "brick", "tiles"))),
              "scale": rng.uniform(1.0, 3.0), "detail_scale": rng.uniform(6.0, 15.0),
              "colours": [_colour(rng, (0.1, 0.5), (0.5, 0.85)),
                          _colour(rng, (0.1, 0.6), (0.2, 0.5))]}
    sky = {"horizon": _colour(rng, (0.05, 0.25), (0.8, 0.95)),
           "zenith": _colour(rng, (0.35, 0.7), (0.55, 0.85)), "strength": 0.8}
    sun = {"elevation": rng.uniform(35.0, 60.0), "azimuth": rng.uniform(0.0, 360.0),
           "strength": rng.uniform(3.0, 4.0)}
    return {"objects": objects, "ground": ground, "sky": sky, "sun": sun,
            "cameras": _camera_layout(spec, rng)}


# ------------------------------------------------------------------------------ Blender

def _bpy():
    os.environ.setdefault("BLENDER_USER_RESOURCES", str(ROOT / ".cache" / "blender"))
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import bpy

    return bpy


def _node(tree, kind: str, **inputs):
    node = tree.nodes.new(kind)
    for name, value in inputs.items():
        node.inputs[name].default_value = value
    return node


def _pattern_factor(tree, pattern: str, scale: float, vector_socket):
    """A [0, 1] factor socket of a procedural pattern at `scale` over the given coordinates."""
    kinds = {"checker": "ShaderNodeTexChecker", "noise": "ShaderNodeTexNoise",
             "wave": "ShaderNodeTexWave", "brick": "ShaderNodeTexBrick",
             "voronoi": "ShaderNodeTexVoronoi", "tiles": "ShaderNodeTexVoronoi"}
    tex = _node(tree, kinds[pattern], Scale=scale)
    if pattern == "noise":
        tex.inputs["Detail"].default_value = 6.0
    if pattern == "brick":
        tex.inputs["Mortar Size"].default_value = 0.03
    if pattern == "tiles":
        tex.feature = "DISTANCE_TO_EDGE"
    tree.links.new(vector_socket, tex.inputs["Vector"])
    if pattern == "checker":
        return tex.outputs["Fac"]
    if pattern in ("voronoi", "tiles"):
        ramp = tree.nodes.new("ShaderNodeMapRange")
        ramp.inputs["From Max"].default_value = 0.08 if pattern == "tiles" else 1.0
        tree.links.new(tex.outputs["Distance"], ramp.inputs["Value"])
        return ramp.outputs["Result"]
    return tex.outputs["Fac"]


def textured_material(bpy, name: str, colours, pattern: str, scale: float,
                      detail_scale: float = 40.0, coords: str = "Object"):
    """Principled BSDF whose base colour mixes two colours by a pattern, with a fine noise
    modulating the brightness (detail that a fit has to recover)."""
    material = bpy.data.materials.new(name)
    material.diffuse_color = (*colours[0], 1.0)  # what Workbench shows
    if bpy.app.version < (5, 0, 0):
        material.use_nodes = True
    tree = material.node_tree
    tree.nodes.clear()
    coord = tree.nodes.new("ShaderNodeTexCoord")
    factor = _pattern_factor(tree, pattern, scale, coord.outputs[coords])
    mix = tree.nodes.new("ShaderNodeMix")
    mix.data_type = "RGBA"
    mix.inputs["A"].default_value = (*colours[0], 1.0)
    mix.inputs["B"].default_value = (*colours[1], 1.0)
    tree.links.new(factor, mix.inputs["Factor"])
    grain = _node(tree, "ShaderNodeTexNoise", Scale=detail_scale, Detail=4.0)
    tree.links.new(coord.outputs[coords], grain.inputs["Vector"])
    shade = tree.nodes.new("ShaderNodeMix")
    shade.data_type, shade.blend_type = "RGBA", "MULTIPLY"
    shade.inputs["Factor"].default_value = 0.45
    tree.links.new(mix.outputs["Result"], shade.inputs["A"])
    tree.links.new(grain.outputs["Color"], shade.inputs["B"])
    bsdf = _node(tree, "ShaderNodeBsdfPrincipled", Roughness=0.6)
    tree.links.new(shade.outputs["Result"], bsdf.inputs["Base Color"])
    out = tree.nodes.new("ShaderNodeOutputMaterial")
    tree.links.new(bsdf.outputs["BSDF"], out.inputs["Surface"])
    return material


def _sky_world(bpy, sky: dict):
    """A vertical gradient from the horizon colour to the zenith colour (no geometry)."""
    world = bpy.data.worlds.new("Sky")
    world.color = (0.0, 0.0, 0.0)  # Workbench background: the mask pass
    if bpy.app.version < (5, 0, 0):
        world.use_nodes = True
    tree = world.node_tree
    tree.nodes.clear()
    coord = tree.nodes.new("ShaderNodeTexCoord")
    split = tree.nodes.new("ShaderNodeSeparateXYZ")
    tree.links.new(coord.outputs["Generated"], split.inputs["Vector"])
    ramp = tree.nodes.new("ShaderNodeMapRange")
    ramp.inputs["From Max"].default_value = 0.6
    tree.links.new(split.outputs["Z"], ramp.inputs["Value"])
    mix = tree.nodes.new("ShaderNodeMix")
    mix.data_type = "RGBA"
    mix.inputs["A"].default_value = (*sky["horizon"], 1.0)
    mix.inputs["B"].default_value = (*sky["zenith"], 1.0)
    tree.links.new(ramp.outputs["Result"], mix.inputs["Factor"])
    background = _node(tree, "ShaderNodeBackground", Strength=sky["strength"])
    tree.links.new(mix.outputs["Result"], background.inputs["Color"])
    out = tree.nodes.new("ShaderNodeOutputWorld")
    tree.links.new(background.outputs["Background"], out.inputs["Surface"])
    return world


def _add_object(bpy, scene, obj: dict, frames: list[int]):
    from blender_addon import animation

    ops = bpy.ops.mesh
    kind = obj["kind"]
    if kind == "sphere":
        ops.primitive_uv_sphere_add(radius=obj["radius"], segments=48, ring_count=24)
    elif kind == "box":
        ops.primitive_cube_add(size=1.0)
    elif kind == "cylinder":
        ops.primitive_cylinder_add(radius=obj["radius"], depth=obj["depth"], vertices=48)
    else:
        ops.primitive_torus_add(major_radius=obj["major_radius"],
                                minor_radius=obj["minor_radius"], major_segments=48,
                                minor_segments=16)
    made = bpy.context.active_object
    made.name = obj["name"]
    if kind == "box":
        made.scale = obj["dimensions"]
    if kind != "box":
        bpy.ops.object.shade_smooth()
    made.data.materials.append(textured_material(
        bpy, obj["name"], obj["colours"], obj["pattern"], obj["pattern_scale"]))
    made.location, made.rotation_euler = obj["location"][0], obj["rotation_euler"][0]
    if obj["moving"]:
        ends = [obj["location"][0], obj["location"][-1]]
        turns = [obj["rotation_euler"][0], obj["rotation_euler"][-1]]
        for axis in range(3):
            animation.set_keys(made, "location", [frames[0], frames[-1]],
                               [e[axis] for e in ends], "LINEAR", index=axis)
            animation.set_keys(made, "rotation_euler", [frames[0], frames[-1]],
                               [e[axis] for e in turns], "LINEAR", index=axis)
    return made


def _look_at_camera(bpy, scene, name: str, target, azimuth: float, elevation: float,
                    distance: float, lens: float, clip):
    from mathutils import Vector

    el = math.radians(elevation)
    offset = Vector((distance * math.cos(el) * math.cos(azimuth),
                     distance * math.cos(el) * math.sin(azimuth), distance * math.sin(el)))
    data = bpy.data.cameras.new(name)
    data.lens, data.sensor_width, (data.clip_start, data.clip_end) = lens, 36.0, clip
    cam = bpy.data.objects.new(name, data)
    cam.location = Vector(target) + offset
    cam.rotation_mode = "QUATERNION"
    cam.rotation_quaternion = (-offset).to_track_quat("-Z", "Y")
    scene.collection.objects.link(cam)
    return cam


def build_scene(spec: SceneSpec):
    """A fresh headless Blender file holding the spec's scene; returns (scene, layout,
    ring cameras, held-out cameras). Frames 1..T are the timesteps."""
    bpy = _bpy()
    layout = scene_layout(spec)
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    scene.frame_start, scene.frame_end = 1, spec.timesteps
    scene.render.resolution_x = scene.render.resolution_y = spec.size
    scene.render.resolution_percentage = 100
    scene.view_settings.view_transform = "Standard"
    scene.world = _sky_world(bpy, layout["sky"])
    frames = list(range(1, spec.timesteps + 1))
    ground = layout["ground"]
    bpy.ops.mesh.primitive_plane_add(size=200.0)
    plane = bpy.context.active_object
    plane.name = "Ground"
    plane.data.materials.append(textured_material(
        bpy, "Ground", ground["colours"], ground["pattern"], ground["scale"],
        ground["detail_scale"]))
    for obj in layout["objects"]:
        _add_object(bpy, scene, obj, frames)
    sun = layout["sun"]
    bpy.ops.object.light_add(type="SUN", rotation=(math.radians(90 - sun["elevation"]), 0.0,
                                                   math.radians(sun["azimuth"])))
    light = bpy.context.active_object
    light.data.energy, light.data.angle = sun["strength"], math.radians(1.0)
    cams = layout["cameras"]
    common = (cams["target"], cams["distance"], cams["lens"], cams["clip"])
    ring = [_look_at_camera(bpy, scene, f"Ring {i:02d}", common[0], azimuth,
                            cams["elevation"], *common[1:])
            for i, azimuth in enumerate(cams["ring_azimuths"])]
    held = [_look_at_camera(bpy, scene, f"Held Out {i:02d}", common[0], cam["azimuth"],
                            cam["elevation"], *common[1:])
            for i, cam in enumerate(cams["held_out"])]
    scene.camera = ring[0]
    scene.frame_set(1)
    return scene, layout, ring, held


# ------------------------------------------------------------------------------ rendering

def _render_settings(bpy, scene, engine: str, samples: int, denoise: bool) -> None:
    scene.render.engine = engine
    scene.render.image_settings.file_format = "PNG"
    scene.render.image_settings.color_mode = "RGB"
    scene.render.image_settings.color_depth = "8"
    scene.render.film_transparent = False
    scene.view_settings.view_transform = "Standard"
    scene.view_settings.look = "None"
    if engine == "CYCLES":
        scene.cycles.device = "CPU"
        scene.cycles.samples = samples
        scene.cycles.use_denoising = denoise
        scene.cycles.seed = 0
        scene.cycles.max_bounces, scene.cycles.diffuse_bounces = 3, 2
        scene.cycles.glossy_bounces, scene.cycles.transmission_bounces = 1, 0
        scene.cycles.caustics_reflective = scene.cycles.caustics_refractive = False
        scene.render.use_persistent_data = True
    elif engine == "BLENDER_WORKBENCH":
        scene.display.shading.light = "STUDIO"
        scene.display.shading.color_type = "MATERIAL"
        scene.display.shading.show_shadows = True


def _render_views(bpy, scene, cameras, folder: Path, frames: list[int]) -> None:
    """Every camera at every frame into folder/view_XX/TTTT.png."""
    for t, frame in enumerate(frames):
        scene.frame_set(frame)
        for v, cam in enumerate(cameras):
            scene.camera = cam
            scene.render.filepath = str(folder / f"view_{v:02d}" / f"{t:04d}.png")
            bpy.ops.render.render(write_still=True)


def _render_masks(bpy, scene, layout: dict, groups, frames: list[int]) -> None:
    """Object ids per pixel with Workbench (flat object colours, no antialiasing, Raw): object
    k renders red (k + 1) * MASK_STEP / 255; the ground and the sky are 0. Written as uint8
    ids (0 ground/sky, k + 1 object k)."""
    import imageio.v3 as iio

    scene.render.engine = "BLENDER_WORKBENCH"
    shading = scene.display.shading
    shading.light, shading.color_type = "FLAT", "OBJECT"
    shading.show_shadows = shading.show_cavity = False
    scene.display.render_aa = "OFF"
    scene.view_settings.view_transform = "Raw"
    names = {o["name"]: k + 1 for k, o in enumerate(layout["objects"])}
    for obj in scene.objects:
        if obj.type == "MESH":
            obj.color = (names.get(obj.name, 0) * MASK_STEP / 255.0, 0.0, 0.0, 1.0)
    scratch = groups[0][1] / "masks" / "scratch.png"
    for cameras, folder in groups:
        for t, frame in enumerate(frames):
            scene.frame_set(frame)
            for v, cam in enumerate(cameras):
                scene.camera, scene.render.filepath = cam, str(scratch)
                bpy.ops.render.render(write_still=True)
                ids = np.rint(iio.imread(scratch)[..., 0] / MASK_STEP).astype(np.uint8)
                out = folder / "masks" / f"view_{v:02d}" / f"{t:04d}.png"
                out.parent.mkdir(parents=True, exist_ok=True)
                iio.imwrite(out, ids)
    scratch.unlink()


def _write_cameras(path: Path, rig) -> None:
    near_far = [round(float(rig.near_far[..., 0].min()), 6),
                round(float(rig.near_far[..., 1].max()), 6)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"c2w": rig.c2w.tolist(), "intrinsics": rig.intrinsics.tolist(),
                                "near_far": near_far}))


def _settings(engine: str, samples: int, denoise: bool, masks: bool) -> dict:
    return {"engine": engine, "samples": samples, "denoise": denoise, "masks": masks,
            "format": FORMAT_VERSION}


def is_rendered(spec: SceneSpec, folder: str | Path, engine: str = "CYCLES", samples: int = 16,
                denoise: bool = False, masks: bool = True) -> bool:
    """The folder holds a finished render of this spec with these settings."""
    path = Path(folder) / "scene.json"
    if not path.is_file():
        return False
    try:
        done = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (done.get("spec") == asdict(spec)
            and done.get("render") == _settings(engine, samples, denoise, masks))


def render_scene(spec: SceneSpec, folder: str | Path, engine: str = "CYCLES", samples: int = 16,
                 denoise: bool = False, masks: bool = True, sheet: bool = True) -> dict:
    """Build the spec's scene and render every ring and held-out view at every timestep into
    `folder` (layout in the module docstring). Returns what scene.json holds."""
    from blender_addon import rig as addon_rig

    folder = Path(folder)
    (folder / "scene.json").unlink(missing_ok=True)  # written last: marks a finished render
    started = time.perf_counter()
    scene, layout, ring, held = build_scene(spec)
    bpy = _bpy()
    frames = list(range(1, spec.timesteps + 1))
    groups = [(ring, folder)] + ([(held, folder / "held_out")] if held else [])
    for cameras, where in groups:
        _write_cameras(where / "cameras.json",
                       addon_rig.extract_rig(scene, cameras, frames[0], frames[-1]))
    _render_settings(bpy, scene, engine, samples, denoise)
    for cameras, where in groups:
        _render_views(bpy, scene, cameras, where, frames)
    rendered = time.perf_counter()
    if masks:
        _render_masks(bpy, scene, layout, groups, frames)
    info = {"spec": asdict(spec), "render": _settings(engine, samples, denoise, masks),
            "layout": layout, "ring_cameras": [c.name for c in ring],
            "held_out_cameras": [c.name for c in held], "frames": frames,
            "seconds": {"render": rendered - started,
                        "masks": time.perf_counter() - rendered}}
    if sheet:
        write_contact_sheet(load_scene(folder), folder / "contact_sheet.png")
    (folder / "scene.json").write_text(json.dumps(info, indent=1))
    return info


# ------------------------------------------------------------------------ loading (numpy)

def _read_frames(folder: Path, views: int, steps: int, grey: bool = False) -> np.ndarray:
    import imageio.v3 as iio

    out = []
    for v in range(views):
        images = [iio.imread(folder / f"view_{v:02d}" / f"{t:04d}.png") for t in range(steps)]
        out.append(np.stack([im if grey else im[..., :3] for im in images]))
    return np.stack(out)


def _load_group(folder: Path, prefix: str) -> dict:
    cams = json.loads((folder / "cameras.json").read_text())
    c2w = np.asarray(cams["c2w"], np.float64)  # [V, T, 4, 4]
    views, steps = c2w.shape[:2]
    out = {f"{prefix}c2w": c2w, f"{prefix}intrinsics": np.asarray(cams["intrinsics"], np.float64),
           f"{prefix}near_far": np.asarray(cams.get("near_far", [0.1, 100.0]), np.float64),
           f"{prefix}frames": _read_frames(folder, views, steps)}
    if (folder / "masks").is_dir():
        out[f"{prefix}masks"] = _read_frames(folder / "masks", views, steps, grey=True)
    return out


def load_scene(folder: str | Path) -> dict:
    """A rendered scene as numpy arrays: frames [V, T, H, W, 3] uint8, c2w [V, T, 4, 4]
    (OpenCV camera-to-world), intrinsics [V, T, 6], near_far [2], masks [V, T, H, W] uint8
    (when rendered), the same with a `held_out_` prefix, and `scene` (scene.json, or {} while
    it is not written yet)."""
    folder = Path(folder)
    out = _load_group(folder, "")
    if (folder / "held_out" / "cameras.json").is_file():
        out.update(_load_group(folder / "held_out", "held_out_"))
    path = folder / "scene.json"
    out["scene"] = json.loads(path.read_text()) if path.is_file() else {}
    return out


def project(c2w: np.ndarray, intrinsics: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Pixels (u, v) and depth [..., 3] of world points [..., 3] through an OpenCV c2w [4, 4]
    and intrinsics [6] (pixel (0, 0) covers [0, 1]^2)."""
    cam = (np.asarray(points) - c2w[:3, 3]) @ c2w[:3, :3]
    fx, fy, cx, cy = intrinsics[:4]
    z = cam[..., 2]
    return np.stack([fx * cam[..., 0] / z + cx, fy * cam[..., 1] / z + cy, z], axis=-1)


def contact_sheet(data: dict) -> np.ndarray:
    """[H', W', 3] uint8: ring views at timestep 0, held-out views at timestep 0, ring view 0
    over time, and the ring masks at timestep 0 (one row each)."""
    frames = data["frames"]
    rows = [frames[:, 0], frames[0]]
    if "held_out_frames" in data:
        rows.insert(1, data["held_out_frames"][:, 0])
    if "masks" in data:
        ids = data["masks"][:, 0].astype(np.int32) * MASK_STEP
        rows.append(np.repeat(np.clip(ids, 0, 255).astype(np.uint8)[..., None], 3, axis=-1))
    height, width = frames.shape[2:4]
    cols = max(len(r) for r in rows)
    sheet = np.full((len(rows) * (height + 2), cols * (width + 2), 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            y, x = i * (height + 2), j * (width + 2)
            sheet[y:y + height, x:x + width] = image
    return sheet


def write_contact_sheet(data: dict, path: str | Path) -> Path:
    import imageio.v3 as iio

    iio.imwrite(path, contact_sheet(data))
    return Path(path)


# --------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "scenes")
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--timesteps", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--engine", default="CYCLES", choices=("CYCLES", "BLENDER_WORKBENCH"))
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--denoise", action="store_true")
    parser.add_argument("--no-masks", dest="masks", action="store_false")
    args = parser.parse_args(argv)
    total = time.perf_counter()
    for seed in range(args.first_seed, args.first_seed + args.count):
        spec = SceneSpec(seed=seed, timesteps=args.timesteps, size=args.size,
                         ring_views=args.views)
        folder = args.out / f"scene_{seed:03d}"
        settings = (args.engine, args.samples, args.denoise, args.masks)
        if is_rendered(spec, folder, *settings):
            print(f"{folder}: already rendered, skipped", flush=True)
            continue
        started = time.perf_counter()
        render_scene(spec, folder, *settings)
        print(f"{folder}: rendered in {time.perf_counter() - started:.1f} s", flush=True)
    print(f"{args.count} scenes in {time.perf_counter() - total:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
