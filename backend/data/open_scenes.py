"""Open procedural scenes, like the ones Blender users build: textured objects standing on a
textured ground plane (finite, at a random height and extent) under a sky gradient or a flat
world colour, lit by a sun, an area light or an overcast sky, with cast shadows.

The objects are surface Gaussians (`backend.data.scenes`) whose colours carry the lighting of
each timestep: Lambert shading from the light, a hemisphere ambient term and shadows looked up
in shadow maps rendered from the light. The ground and the sky are not Gaussians: the
renderer (`backend.data.open_render`) intersects the pixel rays with the ground plane and
shades it with the same light and shadow maps, and the sky is a function of the direction
(no geometry: alpha 0 and depth 0 there). Everything is built to the scale of the rig, so a
rig 1.5 units away sees a table-top scene and one 15 units away a yard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from backend.cameras import c2w_to_viewmat, intrinsics_to_K, look_at_c2w
from backend.data.open_textures import GroundTexture, object_grain, to_linear, to_srgb
from backend.data.scenes import (
    SHAPE_KINDS,
    TEXTURE_KINDS,
    SceneObject,
    deform_object,
    random_color,
    random_motion,
    random_unit,
    sample_shape,
    surface_gaussians,
    texture_colors,
)
from backend.gaussians import Gaussians
from backend.render import rasterize

SPACING_PX = 1.4  # object splat spacing in pixels, seen from the nearest camera
MAX_SPLATS = 20000  # about the most splats of one object (caps very close objects)
SHADOW_RES = 96  # pixels across a shadow map
LIGHT_KINDS = ("sun", "area", "overcast")


@dataclass
class Sky:
    """World colour by direction (linear RGB): a horizon-to-zenith gradient above the
    horizon, a darker colour below it and a glow around the sun; "flat" is one colour."""

    kind: str  # "gradient" or "flat"
    horizon: np.ndarray  # [3]
    zenith: np.ndarray  # [3]
    below: np.ndarray  # [3]
    exponent: float
    glow: np.ndarray  # [3]
    glow_power: float

    def radiance(self, dirs: np.ndarray, sun: np.ndarray) -> np.ndarray:  # [N, 3] -> [N, 3]
        up = dirs[:, 2:]
        above = np.clip(up, 0.0, 1.0) ** self.exponent
        below = np.sqrt(np.clip(-4.0 * up, 0.0, 1.0))
        colour = np.where(up >= 0, self.horizon + (self.zenith - self.horizon) * above,
                          self.horizon + (self.below - self.horizon) * below)
        glow = np.clip(dirs @ sun, 0.0, 1.0) ** self.glow_power
        return colour + glow[:, None] * self.glow

    @classmethod
    def random(cls, rng: np.random.Generator) -> Sky:
        if rng.uniform() < 0.25:
            flat = to_linear(random_color(rng, 0.15, 0.85) * 0.3 + rng.uniform(0.2, 0.6))
            return cls("flat", flat, flat, flat, 1.0, np.zeros(3), 1.0)
        horizon = to_linear(_hsv(rng.uniform(0.45, 0.7), rng.uniform(0.03, 0.3),
                                 rng.uniform(0.75, 0.97)))
        hue = rng.uniform(0.55, 0.66) if rng.uniform() < 0.8 else rng.uniform()
        zenith = to_linear(_hsv(hue, rng.uniform(0.3, 0.75), rng.uniform(0.45, 0.88)))
        below = horizon * rng.uniform(0.25, 0.7)
        glow = to_linear(_hsv(rng.uniform(0.05, 0.15), 0.3, 1.0)) * rng.uniform(0.0, 0.35)
        return cls("gradient", horizon, zenith, below, rng.uniform(0.35, 1.0), glow,
                   rng.uniform(8.0, 48.0))


def _hsv(hue: float, sat: float, val: float) -> np.ndarray:
    rgb = np.clip(np.abs((hue * 6 + np.array([0.0, 4.0, 2.0])) % 6 - 3) - 1, 0, 1)
    return val * (1 - sat + sat * rgb)


@dataclass
class Light:
    """A sun (one direction), an area light or an overcast sky (several directions in a
    cone: soft shadows); `sun` is the light's linear irradiance, split between directions."""

    kind: str
    direction: np.ndarray  # [3] unit, towards the light
    directions: np.ndarray  # [K, 3] unit, the samples of the light
    sun: np.ndarray  # [3]
    ambient: np.ndarray  # [3]

    @classmethod
    def random(cls, rng: np.random.Generator, sky: Sky) -> Light:
        kind = LIGHT_KINDS[rng.choice(3, p=[0.5, 0.3, 0.2])]
        elevation, azimuth = math.radians(rng.uniform(20.0, 70.0)), rng.uniform(0, 2 * math.pi)
        direction = np.array([math.cos(elevation) * math.cos(azimuth),
                              math.cos(elevation) * math.sin(azimuth), math.sin(elevation)])
        spread = {"sun": 0.0, "area": rng.uniform(4.0, 10.0), "overcast": rng.uniform(20.0, 30.0)}
        directions = _cone(direction, math.radians(spread[kind]), 1 if kind == "sun" else 4)
        warm = np.array([1.0, rng.uniform(0.85, 1.0), rng.uniform(0.7, 0.95)])
        strength = rng.uniform(0.25, 0.45) if kind == "overcast" else rng.uniform(0.7, 1.0)
        tint = 0.5 + 0.5 * sky.zenith / max(sky.zenith.max(), 1e-6)
        ambient = tint * (rng.uniform(0.35, 0.55) if kind == "overcast"
                          else rng.uniform(0.15, 0.32))
        return cls(kind, direction, directions, warm * strength, ambient)


def _cone(axis: np.ndarray, angle: float, count: int) -> np.ndarray:  # -> [count, 3]
    """`count` unit vectors on a circle of half-angle `angle` around `axis` (axis if 1)."""
    if count == 1 or angle == 0:
        return axis[None].copy()
    side = np.cross(axis, [0.0, 0.0, 1.0] if abs(axis[2]) < 0.9 else [1.0, 0.0, 0.0])
    side /= np.linalg.norm(side)
    other = np.cross(axis, side)
    turns = 2 * math.pi * np.arange(count) / count
    dirs = (math.cos(angle) * axis + math.sin(angle) * (np.cos(turns)[:, None] * side
                                                        + np.sin(turns)[:, None] * other))
    return dirs / np.linalg.norm(dirs, axis=-1, keepdims=True)


@dataclass
class Ground:
    """A square textured plane z = height, centred at `centre` [2] and turned by `yaw`."""

    height: float
    half_size: float
    centre: np.ndarray  # [2]
    yaw: float
    texture: GroundTexture

    def to_uv(self, xy: np.ndarray) -> np.ndarray:  # [N, 2] world -> [N, 2] plane
        cos, sin = math.cos(self.yaw), math.sin(self.yaw)
        rel = xy - self.centre
        return np.stack([cos * rel[:, 0] + sin * rel[:, 1], -sin * rel[:, 0] + cos * rel[:, 1]],
                        -1)

    def contains(self, uv: np.ndarray) -> np.ndarray:  # [N, 2] -> [N] bool
        return np.abs(uv).max(-1) <= self.half_size


@dataclass
class ShadowMap:
    """Coverage and depth of one group of objects seen from one light direction, with a
    one-texel empty border (nothing blocks the light outside the map)."""

    c2w: np.ndarray  # [4, 4]
    intrinsics: np.ndarray  # [6]
    alpha: np.ndarray  # [R + 2, R + 2]
    depth: np.ndarray  # [R + 2, R + 2]
    bias: float

    @classmethod
    def bordered(cls, c2w: np.ndarray, intrinsics: np.ndarray, alpha: np.ndarray,
                 depth: np.ndarray, bias: float) -> ShadowMap:
        return cls(c2w, intrinsics, np.pad(alpha, 1), np.pad(depth, 1), bias)

    def occlusion(self, points: np.ndarray) -> np.ndarray:  # [N, 3] -> [N] in [0, 1]
        """How much of the light the group blocks on its way to each point (bilinear)."""
        view = c2w_to_viewmat(self.c2w)
        cam = points @ view[:3, :3].T + view[:3, 3]
        focal, centre = self.intrinsics[0], self.intrinsics[2]
        side = self.alpha.shape[0]
        u = np.clip(focal * cam[:, 0] / cam[:, 2] + centre + 0.5, 0.0, side - 1.001)
        v = np.clip(focal * cam[:, 1] / cam[:, 2] + centre + 0.5, 0.0, side - 1.001)
        x0, y0 = u.astype(np.int64), v.astype(np.int64)
        wx, wy = u - x0, v - y0
        limit = cam[:, 2] - self.bias
        alpha, depth = self.alpha.ravel(), self.depth.ravel()
        out = np.zeros(len(points))
        for offset, weight in ((0, (1 - wx) * (1 - wy)), (1, wx * (1 - wy)),
                               (side, (1 - wx) * wy), (side + 1, wx * wy)):
            index = y0 * side + x0 + offset
            out += weight * alpha[index] * (depth[index] < limit)
        return np.clip(out, 0.0, 1.0)


def visibility(shadow_maps: list[list[ShadowMap]], points: np.ndarray) -> np.ndarray:
    """Fraction of each light sample reaching each point: [K, N] for points [N, 3], with
    maps [K light samples][groups]."""
    return np.stack([np.prod([1.0 - m.occlusion(points) for m in maps], axis=0)
                     if maps else np.ones(len(points)) for maps in shadow_maps])


@dataclass
class LitState:
    """One timestep: the lit object Gaussians and the shadow maps [K light samples][groups]."""

    gaussians: Gaussians
    shadow_maps: list[list[ShadowMap]]


@dataclass
class OpenScene:
    objects: list[SceneObject]  # colours: sRGB albedo
    groups: list[list[int]]  # objects sharing one shadow map (the action, the far props)
    ground: Ground
    sky: Sky
    light: Light
    scale: float  # radius of the action around the origin

    def object_surfaces(self, tau: float) -> list[tuple[np.ndarray, np.ndarray, float]]:
        """(points [N, 3], normals [N, 3], scale) per object at `tau`, lifted where needed
        so that no object sinks into the ground."""
        surfaces = []
        for obj in self.objects:
            points, normals, scale = deform_object(obj, tau)
            points[:, 2] += max(0.0, self.ground.height - points[:, 2].min())
            surfaces.append((points, normals, scale))
        return surfaces

    def state_at(self, tau: float) -> LitState:
        surfaces = self.object_surfaces(tau)
        by_group = [shadow_maps([surfaces[i] for i in group], [self.objects[i] for i in group],
                                self.light.directions) for group in self.groups]
        maps = [[group_maps[k] for group_maps in by_group]
                for k in range(len(self.light.directions))]
        parts = []
        for obj, (points, normals, scale) in zip(self.objects, surfaces, strict=True):
            colours = shade(obj.colors, normals, visibility(maps, points), self.light)
            parts.append(surface_gaussians(points, normals, colours, obj.spacing * scale))
        return LitState(Gaussians.concat(parts), maps)


def shade(albedo: np.ndarray, normals: np.ndarray, visible: np.ndarray, light: Light
          ) -> np.ndarray:  # sRGB [N, 3], [N, 3], [K, N] -> sRGB [N, 3]
    """Lambert shading by the light's samples with their visibility, plus hemisphere
    ambient light (the sky above gives more than the ground below)."""
    lambert = np.clip(normals @ light.directions.T, 0.0, None).T  # [K, N]
    direct = (lambert * visible).mean(0)
    hemisphere = 0.7 + 0.3 * normals[:, 2]
    irradiance = light.ambient * hemisphere[:, None] + light.sun * direct[:, None]
    return to_srgb(to_linear(albedo) * irradiance)


def shadow_maps(surfaces: list[tuple[np.ndarray, np.ndarray, float]],
                objects: list[SceneObject], directions: np.ndarray) -> list[ShadowMap]:
    """Render a group of objects from far along each light direction [K, 3] (nearly parallel
    rays), one map per direction."""
    points = np.concatenate([p for p, _, _ in surfaces])
    centre = 0.5 * (points.min(0) + points.max(0))
    radius = float(np.linalg.norm(points - centre, axis=-1).max()) * 1.05 + 1e-6
    distance = 40.0 * radius
    c2w = np.stack([look_at_c2w(centre + distance * d, centre,
                                (0.0, 0.0, 1.0) if abs(d[2]) < 0.99 else (1.0, 0.0, 0.0))
                    for d in directions])
    focal = 0.5 * SHADOW_RES * distance / radius
    intr = np.array([focal, focal, SHADOW_RES / 2, SHADOW_RES / 2, SHADOW_RES, SHADOW_RES])
    g = Gaussians.concat([surface_gaussians(p, n, np.ones_like(p), obj.spacing * s)
                          for (p, n, s), obj in zip(surfaces, objects, strict=True)]).to_torch()
    Ks = np.repeat(intrinsics_to_K(intr)[None], len(directions), axis=0)
    out = rasterize(g["means"], g["quats"], g["scales"], g["opacities"], g["colors"],
                    torch.as_tensor(c2w_to_viewmat(c2w), dtype=torch.float32),
                    torch.as_tensor(Ks, dtype=torch.float32),
                    SHADOW_RES, SHADOW_RES, near=distance - 2 * radius,
                    far=distance + 2 * radius)
    alpha = out.alpha[..., 0].double().numpy()
    depth = out.depth[..., 0].double().numpy()
    bias = 4 * radius / SHADOW_RES + 2 * max(obj.spacing for obj in objects)
    return [ShadowMap.bordered(c2w[k], intr, alpha[k], depth[k], bias)
            for k in range(len(directions))]


# ---------------------------------------------------------------------------------------------
# Layout


def _scene_scale(c2w: np.ndarray, intr: np.ndarray) -> tuple[float, float, float]:
    """(median camera distance to the origin, tan of the half field of view across the
    narrower image side, largest focal length in pixels)."""
    eyes = c2w[..., :3, 3].reshape(-1, 3)
    distance = float(np.median(np.linalg.norm(eyes, axis=-1)))
    half_side = 0.5 * float(np.min(intr[..., 4:6]))
    return distance, half_side / float(np.median(intr[..., 0])), float(intr[..., 0].max())


def _clearance(path: np.ndarray, eyes: np.ndarray) -> float:
    """Smallest distance between the object's centre path [S, 3] and any camera [M, 3]."""
    return float(np.linalg.norm(path[:, None] - eyes[None], axis=-1).min())


def _centre_path(obj: SceneObject, taus: np.ndarray) -> np.ndarray:  # -> [S, 3]
    m = obj.motion
    return (m.start + m.velocity * taus[:, None]
            + m.wobble * np.sin(2 * math.pi * taus[:, None] + m.wobble_phase))


@dataclass
class _Placed:
    obj: SceneObject  # surface still coarse, unpainted
    size: float
    path: np.ndarray  # [S, 3] centre over the clip


def _make_object(rng: np.random.Generator, size: float, start_xy: np.ndarray, ground: float,
                 amplitude: float, motion_scale: float, flying: bool) -> SceneObject:
    """A textured object of extent `size` resting on the ground at `start_xy` (or above)."""
    kind = SHAPE_KINDS[rng.integers(len(SHAPE_KINDS))]
    points, normals = sample_shape(kind, size, size / 12, rng)  # coarse, for the layout
    motion = random_motion(rng, np.zeros(3), amplitude)
    motion.velocity = motion.velocity * motion_scale * np.array([1.0, 1.0, 0.3])
    motion.wobble = motion.wobble * motion_scale
    motion.bend = motion.bend * min(1.0, 0.45 / size)
    lowest = float((points @ motion.base_rotation.T)[:, 2].min())
    lift = rng.uniform(0.3, 1.2) * size if flying else 0.0
    motion.start = np.array([start_xy[0], start_xy[1], ground - lowest + lift])
    return SceneObject(kind, points, normals, np.zeros_like(points), size / 12, motion)


def _finish_object(placed: _Placed, rng: np.random.Generator, spacing: float) -> SceneObject:
    """The object sampled at its final spacing and painted (sRGB albedo)."""
    obj, size = placed.obj, placed.size
    obj.points, obj.normals = sample_shape(obj.kind, size, spacing, rng)
    texture = TEXTURE_KINDS[rng.integers(len(TEXTURE_KINDS))]
    colours = texture_colors(obj.points, texture, random_color(rng), random_color(rng),
                             frequency=rng.uniform(1.0, 5.0) / size, direction=random_unit(rng))
    obj.colors = np.clip(colours * object_grain(obj.points, size, rng)[:, None], 0.0, 1.0)
    obj.spacing = spacing
    return obj


def _place(rng: np.random.Generator, sizes: list[float], radius_range: tuple[float, float],
           ground: float, amplitude: float, motion_scale: float, eyes: np.ndarray,
           min_clearance: float, flying_share: float) -> list[_Placed]:
    """Objects at horizontal distances in `radius_range`, apart from each other and from
    every camera (a few tries each; an object that finds no room is left out)."""
    placed: list[_Placed] = []
    taus = np.linspace(0.0, 1.0, 9)
    low, high = radius_range
    for size in sizes:
        for _ in range(20):
            angle = rng.uniform(0, 2 * math.pi)
            radius = math.sqrt(rng.uniform(low * low, high * high))
            xy = radius * np.array([math.cos(angle), math.sin(angle)])
            obj = _make_object(rng, size, xy, ground, amplitude, motion_scale,
                               rng.uniform() < flying_share)
            path = _centre_path(obj, taus)
            apart = all(np.linalg.norm(path[:, :2] - p.path[:, :2], axis=-1).min()
                        > 0.9 * (size + p.size) for p in placed)
            if apart and _clearance(path, eyes) > 1.5 * size + min_clearance:
                placed.append(_Placed(obj, size, path))
                break
    return placed


def _splat_spacing(placed: _Placed, eyes: np.ndarray, focal_px: float) -> float:
    """About SPACING_PX pixels seen from the nearest camera, within [size/178, size/4]."""
    near = max(_clearance(placed.path, eyes) - 1.3 * placed.size, 0.3 * placed.size)
    low = placed.size * math.sqrt(20.0 / MAX_SPLATS)
    return min(max(SPACING_PX * near / focal_px, low), placed.size / 4)


def random_open_scene(rng: np.random.Generator, c2w: np.ndarray, intr: np.ndarray,
                      num_objects: int, amplitude: float) -> OpenScene:
    """An open scene for the rig c2w [V, T, 4, 4], intrinsics [V, T, 6] looking at about the
    origin: `num_objects` objects in the action plus up to three larger props farther out."""
    distance, tan_half, focal_px = _scene_scale(c2w, intr)
    eyes = c2w[..., :3, 3].reshape(-1, 3)
    scale = distance * tan_half * rng.uniform(0.3, 0.8)
    ground_z = min(-scale * rng.uniform(0.1, 0.8), float(eyes[:, 2].min()) - 0.03 * distance)
    sizes = list(scale * np.exp(rng.uniform(math.log(0.2), math.log(0.6), num_objects)))
    action = _place(rng, sizes, (0.0, scale), ground_z, amplitude, scale / 0.8, eyes,
                    0.1 * distance, 0.2)
    if not action:  # the rig left no room: one small object at the centre
        action = _place(rng, [0.2 * scale], (0.0, 0.0), ground_z, 0.0, 0.0, eyes, 0.0, 0.0)
    ring = float(np.linalg.norm(eyes[:, :2], axis=-1).max())
    num_props = int(rng.choice(4, p=[0.4, 0.3, 0.2, 0.1]))
    props = _place(rng, list(distance * rng.uniform(0.1, 0.4, num_props)),
                   (ring + 0.5 * distance, ring + 2.5 * distance), ground_z, 0.3 * amplitude,
                   scale / 0.8, eyes, 0.2 * distance, 0.0)
    objects = [_finish_object(p, rng, _splat_spacing(p, eyes, focal_px))
               for p in action + props]
    reach = max(float(np.abs(p.path[:, :2]).max()) + p.size for p in action + props)
    half_size = max(distance * math.exp(rng.uniform(0.0, math.log(30.0))), 1.3 * reach)
    room = (half_size - 1.2 * reach) / math.sqrt(2.0)  # the ground covers the objects
    ground = Ground(ground_z, half_size, rng.uniform(-room, room, 2), rng.uniform(0, 2 * math.pi),
                    GroundTexture.random(rng, scale))
    sky = Sky.random(rng)
    groups = [list(range(len(action)))] + ([list(range(len(action), len(objects)))]
                                           if props else [])
    return OpenScene(objects, groups, ground, sky, Light.random(rng, sky), scale)
