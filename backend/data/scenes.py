"""Procedural dynamic scenes made of 3D Gaussians: textured objects that move, rotate and
deform over time, inside a textured backdrop dome.

Every surface is covered by flat, disc-shaped Gaussians tangent to it, spaced about
`spacing` apart, so that the surface renders solid when `spacing` is close to the size of a
pixel. All randomness comes from the `numpy.random.Generator` passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from backend.gaussians import Gaussians

SHAPE_KINDS = ("sphere", "box", "torus", "capsule", "cylinder")
TEXTURE_KINDS = ("solid", "stripes", "checker", "gradient", "rings")
DISC_THICKNESS = 0.15  # normal-axis scale of a surface disc, relative to its radius
DISC_RADIUS = 0.7  # tangent-axis scale of a surface disc, relative to the spacing
GOLDEN_ANGLE = math.pi * (3.0 - math.sqrt(5.0))


@dataclass
class ObjectMotion:
    """How one object moves over normalised time tau in [0, 1]."""

    start: np.ndarray  # [3] centre at tau = 0
    velocity: np.ndarray  # [3] straight-line displacement over the clip
    wobble: np.ndarray  # [3] amplitude of a sinusoidal displacement
    wobble_phase: float
    spin_axis: np.ndarray  # [3] unit axis of rotation
    spin_angle: float  # radians turned over the clip
    base_rotation: np.ndarray  # [3, 3] orientation at tau = 0
    pulse: np.ndarray  # [3] relative per-axis scale change amplitude
    pulse_phase: float
    bend: float  # curvature (radians per unit length along local z) at the bend's peak
    bend_phase: float


@dataclass
class SceneObject:
    """A textured surface in local coordinates plus its motion."""

    kind: str
    points: np.ndarray  # [N, 3] local surface points
    normals: np.ndarray  # [N, 3] local unit normals
    colors: np.ndarray  # [N, 3] RGB in [0, 1]
    spacing: float  # distance between neighbouring points
    motion: ObjectMotion


@dataclass
class Backdrop:
    """A dome of inward-facing surface Gaussians around the scene."""

    points: np.ndarray  # [N, 3] world
    normals: np.ndarray  # [N, 3]
    colors: np.ndarray  # [N, 3]
    spacing: float


@dataclass
class Scene:
    objects: list[SceneObject]
    backdrop: Backdrop | None
    background: np.ndarray  # [3] colour behind everything (seen only without a backdrop)

    def gaussians_at(self, tau: float) -> Gaussians:
        """All Gaussians of the scene at normalised time `tau`."""
        parts = [object_gaussians(obj, tau) for obj in self.objects]
        if self.backdrop is not None:
            b = self.backdrop
            parts.append(surface_gaussians(b.points, b.normals, b.colors, b.spacing))
        return Gaussians.concat(parts)


# ---------------------------------------------------------------------------------------------
# Surface sampling (local coordinates, object roughly inside the unit-radius ball)


def fibonacci_sphere(count: int, rng: np.random.Generator) -> np.ndarray:  # -> [N, 3]
    """`count` nearly evenly spread unit vectors, randomly rotated about z."""
    count = max(count, 4)
    k = np.arange(count) + 0.5
    z = 1.0 - 2.0 * k / count
    ring = np.sqrt(np.clip(1.0 - z * z, 0.0, None))
    angle = GOLDEN_ANGLE * k + rng.uniform(0, 2 * math.pi)
    return np.stack([ring * np.cos(angle), ring * np.sin(angle), z], axis=-1)


def _sphere(radius: float, spacing: float, rng) -> tuple[np.ndarray, np.ndarray]:
    normals = fibonacci_sphere(int(4 * math.pi * radius**2 / spacing**2), rng)
    return radius * normals, normals


def _box(half: np.ndarray, spacing: float, rng) -> tuple[np.ndarray, np.ndarray]:
    points, normals = [], []
    for axis in range(3):
        u_axis, v_axis = (axis + 1) % 3, (axis + 2) % 3
        nu = max(2, round(2 * half[u_axis] / spacing))
        nv = max(2, round(2 * half[v_axis] / spacing))
        u = (np.arange(nu) + 0.5) / nu * 2 - 1
        v = (np.arange(nv) + 0.5) / nv * 2 - 1
        uu, vv = (g.ravel() for g in np.meshgrid(u, v, indexing="ij"))
        for sign in (-1.0, 1.0):
            face = np.zeros((len(uu), 3))
            face[:, axis] = sign * half[axis]
            face[:, u_axis], face[:, v_axis] = uu * half[u_axis], vv * half[v_axis]
            normal = np.zeros((len(uu), 3))
            normal[:, axis] = sign
            points.append(face)
            normals.append(normal)
    return np.concatenate(points), np.concatenate(normals)


def _torus(major: float, minor: float, spacing: float, rng) -> tuple[np.ndarray, np.ndarray]:
    nu = max(8, round(2 * math.pi * (major + minor) / spacing))
    nv = max(6, round(2 * math.pi * minor / spacing))
    u = 2 * math.pi * (np.arange(nu) + rng.uniform()) / nu
    v = 2 * math.pi * np.arange(nv) / nv
    uu, vv = (g.ravel() for g in np.meshgrid(u, v, indexing="ij"))
    normals = np.stack([np.cos(vv) * np.cos(uu), np.cos(vv) * np.sin(uu), np.sin(vv)], -1)
    centres = np.stack([major * np.cos(uu), major * np.sin(uu), np.zeros_like(uu)], -1)
    return centres + minor * normals, normals


def _tube(radius: float, half_length: float, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    nu = max(8, round(2 * math.pi * radius / spacing))
    nz = max(2, round(2 * half_length / spacing))
    u = 2 * math.pi * np.arange(nu) / nu
    z = ((np.arange(nz) + 0.5) / nz * 2 - 1) * half_length
    uu, zz = (g.ravel() for g in np.meshgrid(u, z, indexing="ij"))
    normals = np.stack([np.cos(uu), np.sin(uu), np.zeros_like(uu)], -1)
    return radius * normals + np.stack([0 * zz, 0 * zz, zz], -1), normals


def _capsule(radius: float, half_length: float, spacing: float, rng):
    tube_points, tube_normals = _tube(radius, half_length, spacing)
    cap_normals = fibonacci_sphere(int(4 * math.pi * radius**2 / spacing**2), rng)
    offset = np.where(cap_normals[:, 2:] >= 0, half_length, -half_length)
    cap_points = radius * cap_normals + np.concatenate([0 * offset, 0 * offset, offset], -1)
    return (np.concatenate([tube_points, cap_points]),
            np.concatenate([tube_normals, cap_normals]))


def _disc(radius: float, spacing: float, height: float, sign: float, rng):
    count = max(4, int(math.pi * radius**2 / spacing**2))
    k = np.arange(count) + 0.5
    r = radius * np.sqrt(k / count)
    angle = GOLDEN_ANGLE * k + rng.uniform(0, 2 * math.pi)
    points = np.stack([r * np.cos(angle), r * np.sin(angle), np.full(count, height)], -1)
    normals = np.zeros_like(points)
    normals[:, 2] = sign
    return points, normals


def _cylinder(radius: float, half_length: float, spacing: float, rng):
    parts = [_tube(radius, half_length, spacing),
             _disc(radius, spacing, half_length, 1.0, rng),
             _disc(radius, spacing, -half_length, -1.0, rng)]
    return np.concatenate([p for p, _ in parts]), np.concatenate([n for _, n in parts])


def sample_shape(kind: str, size: float, spacing: float,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Surface points and normals [N, 3] of a shape whose extent is about `size`."""
    if kind == "sphere":
        return _sphere(size, spacing, rng)
    if kind == "box":
        return _box(size * rng.uniform(0.5, 0.9, size=3), spacing, rng)
    if kind == "torus":
        minor = size * rng.uniform(0.25, 0.4)
        return _torus(size - minor, minor, spacing, rng)
    if kind == "capsule":
        radius = size * rng.uniform(0.3, 0.5)
        return _capsule(radius, size - radius, spacing, rng)
    if kind == "cylinder":
        return _cylinder(size * rng.uniform(0.4, 0.7), size * rng.uniform(0.5, 0.9), spacing, rng)
    raise ValueError(f"shape kind: expected one of {SHAPE_KINDS}, got {kind!r}")


# ---------------------------------------------------------------------------------------------
# Textures: colour as a function of position


def texture_colors(
    points: np.ndarray,  # [N, 3] positions the texture is painted by
    kind: str,
    color_a: np.ndarray,  # [3]
    color_b: np.ndarray,  # [3]
    frequency: float,  # pattern periods per unit length
    direction: np.ndarray,  # [3] unit axis of stripes and gradients
) -> np.ndarray:  # [N, 3]
    """Two-colour procedural texture: solid, stripes, checker, gradient or rings."""
    along = points @ direction
    if kind == "solid":
        mix = np.zeros(len(points))
    elif kind == "stripes":
        mix = (np.sin(2 * math.pi * frequency * along) > 0).astype(np.float64)
    elif kind == "checker":
        cells = np.floor(points * 2 * frequency).astype(np.int64).sum(-1)
        mix = (cells % 2).astype(np.float64)
    elif kind == "gradient":
        mix = np.clip(0.5 + 0.5 * along / max(np.abs(along).max(), 1e-6), 0.0, 1.0)
    elif kind == "rings":
        radial = np.linalg.norm(points - along[:, None] * direction, axis=-1)
        mix = 0.5 + 0.5 * np.sin(2 * math.pi * frequency * radial)
    else:
        raise ValueError(f"texture kind: expected one of {TEXTURE_KINDS}, got {kind!r}")
    return (1 - mix)[:, None] * color_a + mix[:, None] * color_b


def random_color(rng: np.random.Generator, low: float = 0.1, high: float = 0.95) -> np.ndarray:
    """A saturated-ish random RGB colour (random hue, saturation and value)."""
    hue, sat, val = rng.uniform(), rng.uniform(0.35, 1.0), rng.uniform(0.45, 1.0)
    rgb = np.clip(np.abs((hue * 6 + np.array([0.0, 4.0, 2.0])) % 6 - 3) - 1, 0, 1)
    return low + (high - low) * val * (1 - sat + sat * rgb)


def random_unit(rng: np.random.Generator) -> np.ndarray:  # -> [3]
    vector = rng.normal(size=3)
    return vector / max(np.linalg.norm(vector), 1e-9)


# ---------------------------------------------------------------------------------------------
# Rotations


def axis_angle_matrix(axis: np.ndarray, angle) -> np.ndarray:  # [3], [...] -> [..., 3, 3]
    """Rodrigues' rotation about a unit `axis` by `angle` (scalar or array of angles)."""
    angle = np.asarray(angle, np.float64)
    x, y, z = axis
    skew = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]], np.float64)
    sin, cos = np.sin(angle)[..., None, None], np.cos(angle)[..., None, None]
    return np.eye(3) + sin * skew + (1 - cos) * (skew @ skew)


def random_rotation(rng: np.random.Generator) -> np.ndarray:  # -> [3, 3]
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def normals_to_quats(normals: np.ndarray) -> np.ndarray:  # [N, 3] -> [N, 4] (w, x, y, z)
    """Unit quaternions rotating the +z axis onto each unit normal."""
    w = 1.0 + normals[:, 2]
    quats = np.stack([w, -normals[:, 1], normals[:, 0], np.zeros_like(w)], -1)
    flipped = w < 1e-6  # normal along -z: half-turn about x
    quats[flipped] = (0.0, 1.0, 0.0, 0.0)
    return quats / np.linalg.norm(quats, axis=-1, keepdims=True)


def surface_gaussians(
    points: np.ndarray,  # [N, 3]
    normals: np.ndarray,  # [N, 3] unit
    colors: np.ndarray,  # [N, 3]
    spacing: float,
    opacity: float = 0.98,
) -> Gaussians:
    """Flat discs tangent to the surface, radius ~`DISC_RADIUS * spacing`."""
    radius = DISC_RADIUS * spacing
    scales = np.tile(np.array([radius, radius, radius * DISC_THICKNESS]), (len(points), 1))
    return Gaussians.from_activated(
        means=points, quats=normals_to_quats(normals), scales=scales,
        opacities=np.full(len(points), opacity), colors=np.clip(colors, 0.0, 1.0))


# ---------------------------------------------------------------------------------------------
# Motion and deformation


def deform_object(obj: SceneObject, tau: float) -> tuple[np.ndarray, np.ndarray, float]:
    """World points [N, 3], unit normals [N, 3] and mean scale factor of `obj` at `tau`."""
    m = obj.motion
    curvature = m.bend * math.sin(2 * math.pi * tau + m.bend_phase)
    bend_angle = curvature * obj.points[:, 2]  # [N] rotation about local y, grows along z
    bend = axis_angle_matrix(np.array([0.0, 1.0, 0.0]), bend_angle)  # [N, 3, 3]
    points = (bend @ obj.points[..., None])[..., 0]
    normals = (bend @ obj.normals[..., None])[..., 0]
    pulse = 1.0 + m.pulse * math.sin(2 * math.pi * tau + m.pulse_phase)  # [3]
    points = points * pulse
    normals = normals / pulse
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    rotation = axis_angle_matrix(m.spin_axis, m.spin_angle * tau) @ m.base_rotation
    centre = (m.start + m.velocity * tau
              + m.wobble * math.sin(2 * math.pi * tau + m.wobble_phase))
    return points @ rotation.T + centre, normals @ rotation.T, float(np.cbrt(pulse.prod()))


def object_gaussians(obj: SceneObject, tau: float) -> Gaussians:
    points, normals, scale = deform_object(obj, tau)
    return surface_gaussians(points, normals, obj.colors, obj.spacing * scale)


def random_motion(rng: np.random.Generator, start: np.ndarray, amplitude: float) -> ObjectMotion:
    """Translation path, spin and deformation; `amplitude` 0 gives a still object."""
    return ObjectMotion(
        start=start,
        velocity=amplitude * rng.uniform(-0.6, 0.6, size=3) * np.array([1.0, 1.0, 0.4]),
        wobble=amplitude * rng.uniform(-0.25, 0.25, size=3),
        wobble_phase=rng.uniform(0, 2 * math.pi),
        spin_axis=random_unit(rng),
        spin_angle=amplitude * rng.uniform(-math.pi, math.pi),
        base_rotation=random_rotation(rng),
        pulse=amplitude * rng.uniform(0.0, 0.25, size=3),
        pulse_phase=rng.uniform(0, 2 * math.pi),
        bend=amplitude * rng.uniform(-1.2, 1.2) * (rng.uniform() < 0.5),
        bend_phase=rng.uniform(0, 2 * math.pi),
    )


def random_object(rng: np.random.Generator, spacing: float, size_range: tuple[float, float],
                  start: np.ndarray, amplitude: float) -> SceneObject:
    """One randomly shaped, textured and animated object centred at `start` at tau = 0."""
    kind = SHAPE_KINDS[rng.integers(len(SHAPE_KINDS))]
    size = rng.uniform(*size_range)
    points, normals = sample_shape(kind, size, spacing, rng)
    texture = TEXTURE_KINDS[rng.integers(len(TEXTURE_KINDS))]
    colors = texture_colors(points, texture, random_color(rng), random_color(rng),
                            frequency=rng.uniform(1.0, 3.0) / size, direction=random_unit(rng))
    return SceneObject(kind, points, normals, colors, spacing, random_motion(rng, start, amplitude))


def random_backdrop(rng: np.random.Generator, radius: float, spacing: float) -> Backdrop:
    """A textured dome: a patterned floor below the horizon, sky-like walls above it."""
    directions = fibonacci_sphere(int(4 * math.pi * radius**2 / spacing**2), rng)
    points = radius * directions
    floor_level = -rng.uniform(0.05, 0.3)
    floor = texture_colors(points, TEXTURE_KINDS[rng.integers(1, 3)], random_color(rng),
                           random_color(rng), rng.uniform(0.15, 0.4), random_unit(rng))
    azimuth = np.arctan2(directions[:, 1], directions[:, 0])
    stripes = 0.5 + 0.5 * np.sin(rng.integers(3, 9) * azimuth + rng.uniform(0, 2 * math.pi))
    horizon, zenith = random_color(rng), random_color(rng)
    height = np.clip(directions[:, 2:], 0.0, 1.0)
    walls = (1 - height) * horizon + height * zenith
    walls = walls * (0.75 + 0.25 * stripes[:, None])
    colors = np.where(directions[:, 2:] < floor_level, floor, walls)
    return Backdrop(points, -directions, colors, spacing)


def random_scene(rng: np.random.Generator, num_objects: int, object_spacing: float,
                 backdrop_spacing: float | None, backdrop_radius: float,
                 size_range: tuple[float, float], scene_radius: float,
                 motion_amplitude: float) -> Scene:
    """Objects scattered within `scene_radius` of the origin, optionally inside a backdrop."""
    objects = []
    for _ in range(num_objects):
        start = rng.uniform(-1, 1, size=3) * np.array([scene_radius, scene_radius,
                                                       0.4 * scene_radius])
        objects.append(random_object(rng, object_spacing, size_range, start, motion_amplitude))
    backdrop = (None if backdrop_spacing is None
                else random_backdrop(rng, backdrop_radius, backdrop_spacing))
    return Scene(objects, backdrop, random_color(rng, 0.0, 1.0))
