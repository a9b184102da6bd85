"""Camera rigs: preset rings and arcs of cameras, and the extraction of any set of Blender
cameras over a frame range into the wire convention (OpenCV c2w, pinhole intrinsics).

Intrinsics follow Blender's own view-plane computation (`BKE_camera_params_compute_viewplane`)
for a perspective camera rendering a W x H image (W = resolution_x * percentage // 100,
likewise H) with pixel aspect (ax, ay):

    ycor       = ay / ax                        (height of a pixel relative to its width)
    fit        = sensor_fit; AUTO means HORIZONTAL if W*ax >= H*ay else VERTICAL
    sensor     = sensor_height if fit is VERTICAL else sensor_width  (AUTO uses the width)
    viewfac    = W if fit is HORIZONTAL else ycor * H
    fx         = lens * viewfac / sensor
    fy         = fx / ycor
    cx         = W / 2 - shift_x * viewfac
    cy         = H / 2 + shift_y * viewfac / ycor

(shift is in units of the fitted image side; a positive shift_y moves the view up, which moves
the principal point down in OpenCV's top-left pixel frame). Pixel (0, 0) covers [0, 1]^2.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import bpy
import numpy as np
from mathutils import Vector

from . import animation
from .vendor import protocol, rigs

SENSOR_FITS = ("AUTO", "HORIZONTAL", "VERTICAL")


# ----------------------------------------------------------------------------- intrinsics

def render_size(render: bpy.types.RenderSettings) -> tuple[int, int]:
    """Output image size in pixels, as Blender computes it (integer percentage scaling)."""
    width = render.resolution_x * render.resolution_percentage // 100
    height = render.resolution_y * render.resolution_percentage // 100
    if width < 1 or height < 1:
        raise ValueError(f"render size {width}x{height} is empty; check the resolution and "
                         "percentage in the Output properties")
    return int(width), int(height)


def pinhole_intrinsics(lens: float, sensor_width: float, sensor_height: float,
                       sensor_fit: str, shift_x: float, shift_y: float, width: int,
                       height: int, pixel_aspect_x: float = 1.0,
                       pixel_aspect_y: float = 1.0) -> np.ndarray:
    """(fx, fy, cx, cy, width, height) of a Blender perspective camera; see the module
    docstring for the formulas. Lens and sensor sizes in millimetres."""
    if sensor_fit not in SENSOR_FITS:
        raise ValueError(f"sensor_fit must be one of {SENSOR_FITS}, got {sensor_fit!r}")
    if min(lens, sensor_width, sensor_height, pixel_aspect_x, pixel_aspect_y) <= 0:
        raise ValueError("lens, sensor size and pixel aspect must be positive")
    ycor = pixel_aspect_y / pixel_aspect_x
    fit = sensor_fit
    if fit == "AUTO":
        fit = "HORIZONTAL" if width * pixel_aspect_x >= height * pixel_aspect_y else "VERTICAL"
    sensor = sensor_height if sensor_fit == "VERTICAL" else sensor_width
    viewfac = width if fit == "HORIZONTAL" else ycor * height
    fx = lens * viewfac / sensor
    return np.array([fx, fx / ycor, width / 2.0 - shift_x * viewfac,
                     height / 2.0 + shift_y * viewfac / ycor, width, height], np.float64)


def camera_intrinsics(camera: bpy.types.Object, render: bpy.types.RenderSettings) -> np.ndarray:
    """Intrinsics [6] of a (possibly evaluated) camera object for the scene's render size.
    Orthographic and panoramic cameras raise ValueError."""
    data = camera.data
    if camera.type != "CAMERA":
        raise ValueError(f"object {camera.name!r} is a {camera.type}, not a camera")
    if data.type != "PERSP":
        kind = {"ORTHO": "orthographic", "PANO": "panoramic"}.get(data.type, data.type)
        raise ValueError(f"camera {camera.name!r} is {kind}; only perspective cameras can be "
                         "used for 4D generation")
    width, height = render_size(render)
    return pinhole_intrinsics(data.lens, data.sensor_width, data.sensor_height,
                              data.sensor_fit, data.shift_x, data.shift_y, width, height,
                              render.pixel_aspect_x, render.pixel_aspect_y)


# ----------------------------------------------------------------------------- extrinsics

def rigid_c2w(matrix_world) -> np.ndarray:
    """Blender camera-to-world [4, 4] with scale (and any shear) removed: columns are
    normalised, then the nearest rotation is taken (polar decomposition)."""
    mat = np.array(matrix_world, dtype=np.float64)
    if mat.shape != (4, 4):
        raise ValueError(f"matrix_world must be 4x4, got shape {mat.shape}")
    linear = mat[:3, :3]
    norms = np.linalg.norm(linear, axis=0)
    if norms.min() < 1e-12:
        raise ValueError("camera matrix has a zero scale axis")
    rot = linear / norms
    if np.abs(rot.T @ rot - np.eye(3)).max() > 1e-6:
        u, _, vt = np.linalg.svd(rot)
        rot = u @ vt
    if np.linalg.det(rot) < 0:
        raise ValueError("camera matrix is mirrored (negative scale); remove the negative "
                         "scale from the camera or its parents")
    out = np.eye(4)
    out[:3, :3] = rot
    out[:3, 3] = mat[:3, 3]
    return out


def opencv_c2w(matrix_world) -> np.ndarray:
    """OpenCV camera-to-world [4, 4] of a Blender camera's matrix_world (scale removed)."""
    return protocol.blender_to_opencv_c2w(rigid_c2w(matrix_world))


# ----------------------------------------------------------------------------- extraction

@dataclass
class Rig:
    """V cameras over T timesteps in the wire convention."""

    camera_names: list[str]
    frames: list[int]
    c2w: np.ndarray  # [V, T, 4, 4] OpenCV camera-to-world
    intrinsics: np.ndarray  # [V, T, 6] (fx, fy, cx, cy, width, height)
    near_far: np.ndarray  # [V, T, 2] clip start and end

    @property
    def num_views(self) -> int:
        return len(self.camera_names)

    @property
    def num_timesteps(self) -> int:
        return len(self.frames)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The rig's cameras as a grid job's submit message carries them (float32)."""
        return {protocol.C2W: self.c2w.astype(np.float32),
                protocol.INTRINSICS: self.intrinsics.astype(np.float32)}


def frame_list(frame_start: int, frame_end: int, frame_step: int = 1) -> list[int]:
    if frame_step < 1:
        raise ValueError(f"frame step must be at least 1, got {frame_step}")
    if frame_end < frame_start:
        raise ValueError(f"frame range {frame_start}..{frame_end} is empty")
    return list(range(frame_start, frame_end + 1, frame_step))


def extract_rig(scene: bpy.types.Scene, cameras: Sequence[bpy.types.Object],
                frame_start: int, frame_end: int, frame_step: int = 1) -> Rig:
    """Per camera and frame: c2w, intrinsics and near/far, read from the evaluated scene
    (parents, constraints, drivers and animation applied). The scene's frame is restored."""
    cameras = list(cameras)
    if not cameras:
        raise ValueError("no cameras given: select cameras or pick a rig collection")
    frames = frame_list(frame_start, frame_end, frame_step)
    for cam in cameras:
        camera_intrinsics(cam, scene.render)  # fail early on a wrong camera
    shape = (len(cameras), len(frames))
    c2w, intr, near_far = np.zeros((*shape, 4, 4)), np.zeros((*shape, 6)), np.zeros((*shape, 2))
    saved = (scene.frame_current, scene.frame_subframe)
    try:
        for t, frame in enumerate(frames):
            scene.frame_set(frame)
            depsgraph = bpy.context.evaluated_depsgraph_get()
            for v, cam in enumerate(cameras):
                evaluated = cam.evaluated_get(depsgraph)
                c2w[v, t], intr[v, t] = camera_pose_and_intrinsics(
                    cam, evaluated.matrix_world, camera_intrinsics(evaluated, scene.render))
                near_far[v, t] = (evaluated.data.clip_start, evaluated.data.clip_end)
    finally:
        scene.frame_set(saved[0], subframe=saved[1])
    rig = Rig([c.name for c in cameras], frames, c2w, intr, near_far)
    try:
        protocol.validate_rig(rig.c2w, rig.intrinsics, rig.near_far)
    except protocol.ProtocolError as exc:
        raise ValueError(f"rig is not valid: {exc.message}") from None
    return rig


def camera_pose_and_intrinsics(camera: bpy.types.Object, matrix_world,
                               intrinsics: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV c2w [4, 4] and intrinsics [6] of a camera as Blender renders it. Blender (Cycles,
    EEVEE, `world_to_camera_view`) uses the camera's matrix_world with each axis normalised;
    under a non-uniformly scaled, rotated parent those axes are not orthogonal (a sheared
    camera). The projection is then factored as intrinsics x rotation (RQ decomposition):
    exact when the factor has no skew (the shear only moves the principal point and the focal
    lengths); otherwise ValueError naming the parent, never an approximate camera."""
    mat = np.array(matrix_world, dtype=np.float64)
    axes = mat[:3, :3] / np.linalg.norm(mat[:3, :3], axis=0)
    if np.abs(axes.T @ axes - np.eye(3)).max() <= 1e-6:
        return opencv_c2w(mat), intrinsics
    if np.linalg.det(axes) <= 0:
        rigid_c2w(mat)  # raises, naming the problem (mirrored or zero scale)
    fx, fy, cx, cy = intrinsics[:4]
    k_blender = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
    project = k_blender @ np.diag([1.0, -1.0, -1.0]) @ np.linalg.inv(axes)  # world -> pixels
    k, rot = _rq(project)
    k = k / k[2, 2]
    if abs(k[0, 1]) > 1e-6 * k[0, 0] or abs(k[1, 0]) > 1e-9 * k[1, 1]:
        raise ValueError(
            f"camera {camera.name!r} is sheared by the non-uniform scale of "
            f"{_scaling_parent(camera)}: Blender renders it with skewed pixels, which the "
            "pinhole intrinsics cannot represent. Apply the scale of that parent (Ctrl+A) or "
            "make it uniform.")
    c2w = np.eye(4)
    c2w[:3, :3] = rot.T
    c2w[:3, 3] = mat[:3, 3]
    return c2w, np.array([k[0, 0], k[1, 1], k[0, 2], k[1, 2], *intrinsics[4:6]])


def _rq(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """m [3, 3] = k @ rot with k upper triangular (positive diagonal), rot orthonormal."""
    flip = np.eye(3)[::-1]
    q, r = np.linalg.qr((flip @ m).T)
    k, rot = flip @ r.T @ flip, flip @ q.T
    signs = np.diag(np.sign(np.diag(k)))
    return k @ signs, signs @ rot


def _scaling_parent(camera: bpy.types.Object) -> str:
    """'its parent NAME' for the nearest ancestor scaled non-uniformly."""
    parent = camera.parent
    while parent is not None:
        scale = np.abs(np.array(parent.matrix_world.to_scale()))
        if scale.max() - scale.min() > 1e-6 * scale.max():
            return f"its parent {parent.name!r}"
        parent = parent.parent
    return "its parents"


def sorted_cameras(objects: Iterable[bpy.types.Object]) -> list[bpy.types.Object]:
    """The camera objects among `objects`, ordered by name (view 0 first)."""
    return sorted((o for o in objects if o.type == "CAMERA"), key=lambda o: o.name)


def collection_cameras(collection: bpy.types.Collection) -> list[bpy.types.Object]:
    return sorted_cameras(collection.all_objects)


# ----------------------------------------------------------------------------- presets

@dataclass
class RigPresetConfig:
    """A ring (arc_degrees = 360) or arc of cameras around a target empty."""

    num_cameras: int = 8
    radius: float = 4.0
    height: float = 1.0
    focal_length: float = 35.0
    sensor_width: float = 36.0
    arc_degrees: float = 360.0
    target: tuple[float, float, float] = (0.0, 0.0, 0.0)
    animate_orbit: bool = False
    orbit_degrees: float = 360.0
    frame_start: int = 1
    frame_end: int = 48
    clip_start: float = 0.1
    clip_end: float = 100.0
    name: str = "4D Rig"

    def check(self) -> None:
        if self.num_cameras < 1:
            raise ValueError(f"a rig needs at least one camera, got {self.num_cameras}")
        if self.radius <= 0 or self.focal_length <= 0 or self.sensor_width <= 0:
            raise ValueError("radius, focal length and sensor width must be positive")
        if not 0 < self.arc_degrees <= 360:
            raise ValueError(f"arc must be in (0, 360] degrees, got {self.arc_degrees}")
        if self.animate_orbit and self.frame_end <= self.frame_start:
            raise ValueError("an animated orbit needs frame_end > frame_start")


def ring_angles(num: int, arc_degrees: float) -> np.ndarray:
    """Camera angles about the target in radians, measured from +X: a full ring spaces the
    cameras evenly starting at -Y (Blender's front view); an arc is centred on -Y with its
    first and last camera on its ends."""
    return rigs.centred_ring_azimuths(num, math.radians(arc_degrees), -0.5 * np.pi)


def create_rig_preset(scene: bpy.types.Scene, config: RigPresetConfig
                      ) -> tuple[bpy.types.Object, list[bpy.types.Object]]:
    """A new collection holding a target empty and V cameras parented to it, all looking at
    it. With `animate_orbit` the empty turns by orbit_degrees about Z over the frame range
    (linear keys), carrying the cameras. Returns (target, cameras)."""
    config.check()
    collection = bpy.data.collections.new(config.name)
    scene.collection.children.link(collection)
    target = bpy.data.objects.new(f"{config.name} Target", None)
    target.empty_display_type = "SPHERE"
    target.empty_display_size = 0.25
    target.location = config.target
    collection.objects.link(target)
    cameras = []
    for i, angle in enumerate(ring_angles(config.num_cameras, config.arc_degrees)):
        data = bpy.data.cameras.new(f"{config.name} Cam {i:02d}")
        data.lens, data.sensor_width = config.focal_length, config.sensor_width
        data.clip_start, data.clip_end = config.clip_start, config.clip_end
        cam = bpy.data.objects.new(data.name, data)
        offset = Vector((config.radius * math.cos(angle), config.radius * math.sin(angle),
                         config.height))
        cam.location = offset
        cam.rotation_mode = "QUATERNION"
        cam.rotation_quaternion = (-offset).to_track_quat("-Z", "Y")
        cam.parent = target
        collection.objects.link(cam)
        cameras.append(cam)
    if config.animate_orbit:
        animation.set_keys(target, "rotation_euler", [config.frame_start, config.frame_end],
                           [0.0, math.radians(config.orbit_degrees)], "LINEAR", index=2)
    return target, cameras
