"""Analytic ray-traced scenes with exact depth for the reconstruction tests.

A scene is a few textured spheres (each possibly moving over time) inside a large textured
backdrop sphere that encloses the cameras, so every pixel hits a surface. Frames, z-depth
and surface points come from exact ray-sphere intersections through the pixel centres.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from backend.cameras import orbit_rig, pixel_rays


@dataclass
class Sphere:
    centres: np.ndarray  # [T, 3] centre at each timestep
    radius: float
    tint: tuple[float, float, float]


@dataclass
class SceneGrid:
    frames: Tensor  # [1, V, T, 3, H, W]
    depth: Tensor  # [1, V, T, H, W] z-depth
    points: Tensor  # [1, V, T, H, W, 3] surface point of each pixel
    c2w: Tensor  # [1, V, T, 4, 4]
    intr: Tensor  # [1, V, T, 6]


def orbit_grid(num_views: int, num_steps: int, size: int, radius: float = 3.0,
               drift: float = 0.0) -> tuple[Tensor, Tensor]:
    """Cameras on a ring, [1, V, T, 4, 4] and [1, V, T, 6]; `drift` (radians per timestep)
    turns the whole ring over time, making an animated rig."""
    c2w, intr = [], []
    for t in range(num_steps):
        cams, intrinsics = orbit_rig(num_views, radius=radius, camera_height=0.8,
                                     focal=1.2 * size, width=size, height=size,
                                     start_angle=drift * t)
        c2w.append(cams)
        intr.append(intrinsics)
    c2w = torch.tensor(np.stack(c2w, axis=1), dtype=torch.float32)[None]
    intr = torch.tensor(np.stack(intr, axis=1), dtype=torch.float32)[None]
    return c2w, intr


def _texture(points: Tensor, tint: Tensor, frequency: float) -> Tensor:  # [..., 3] -> [..., 3]
    pattern = torch.sin(frequency * points[..., 0]) * torch.cos(frequency * points[..., 1])
    pattern = pattern + 0.5 * torch.sin(frequency * points[..., 2])
    return (0.5 + 0.3 * pattern)[..., None] * tint


def _hit_distance(origins: Tensor, dirs: Tensor, centre: Tensor, radius: float) -> Tensor:
    """Distance along unit rays to the nearest forward hit, inf where missed: [..., 3] -> [...]."""
    rel = origins - centre
    b = (dirs * rel).sum(-1)
    disc = b * b - ((rel * rel).sum(-1) - radius**2)
    root = torch.sqrt(disc.clamp(min=0))
    near, far = -b - root, -b + root
    dist = torch.where(near > 1e-6, near, far)
    return torch.where((disc > 0) & (dist > 1e-6), dist, torch.full_like(dist, float("inf")))


def render_scene(spheres: list[Sphere], c2w: Tensor, intr: Tensor, size: int,
                 backdrop_radius: float = 7.0) -> SceneGrid:
    """Ray-trace the spheres and the backdrop for cameras [1, V, T, 4, 4] / [1, V, T, 6]."""
    origins, dirs = pixel_rays(c2w.double(), intr.double(), size, size)  # [1, V, T, H, W, 3]
    backdrop = _hit_distance(origins, dirs, origins.new_zeros(3), backdrop_radius)
    dist = backdrop
    points = origins + dist[..., None] * dirs
    colour = _texture(points, points.new_tensor([0.6, 0.7, 0.9]), 1.3)
    for sphere in spheres:
        centres = torch.as_tensor(sphere.centres, dtype=torch.float64)  # [T, 3]
        centre = centres[None, None, :, None, None, :]  # [1, 1, T, 1, 1, 3]
        hit = _hit_distance(origins, dirs, centre, sphere.radius)
        closer = hit < dist
        dist = torch.where(closer, hit, dist)
        surface = origins + hit.clamp(max=1e3)[..., None] * dirs
        tint = surface.new_tensor(sphere.tint)
        colour = torch.where(closer[..., None], _texture(surface - centre, tint, 5.0), colour)
    points = origins + dist[..., None] * dirs
    forward = c2w.double()[..., None, None, :3, 2]  # [1, V, T, 1, 1, 3]
    depth = dist * (dirs * forward).sum(-1)
    return SceneGrid(frames=colour.movedim(-1, 3).float().clamp(0, 1), depth=depth.float(),
                     points=points.float(), c2w=c2w, intr=intr)


def moving_spheres(num_steps: int, speed: float = 0.15) -> list[Sphere]:
    """Two spheres near the origin; the first slides along +x over time."""
    t = np.arange(num_steps, dtype=np.float64)[:, None]
    first = np.array([-0.4, 0.0, 0.0]) + speed * t * np.array([1.0, 0.0, 0.0])
    second = np.tile(np.array([0.5, 0.3, 0.2]), (num_steps, 1))
    return [Sphere(first, 0.7, (1.0, 0.55, 0.3)), Sphere(second, 0.45, (0.4, 1.0, 0.5))]
