"""Random camera rigs around the scene, every camera looking at (near) the origin.

A rig is c2w [V, T, 4, 4] (OpenCV convention, float64) and intrinsics [V, T, 6]
(fx, fy, cx, cy, width, height). Kinds:
- orbit: a full ring, evenly spaced;
- arc: evenly spaced over part of a ring;
- jitter: random azimuth, distance, elevation and focal length per camera;
- animated: a ring or arc whose cameras travel, dolly, rise and zoom over time;
- rings: two or three rings at different elevations (the views split between them).

The dome family draws from the config's ranges (`RigRanges.from_config`); the open family
(`sample_open_rig`) first draws a distance in `open_camera_distance` and builds its ranges
around it, so one rig has cameras at one scale while rigs span the whole range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from backend.cameras import look_at_c2w
from backend.data.config import RIG_KINDS, DataConfig
from backend.rigs import ring_azimuths


@dataclass
class CameraPath:
    """Per-camera spherical placement over time, each array [V, T]."""

    azimuth: np.ndarray  # radians
    elevation: np.ndarray  # radians
    distance: np.ndarray
    focal: np.ndarray  # pixels
    target: np.ndarray  # [V, T, 3] point looked at


@dataclass(frozen=True)
class RigRanges:
    """Bounds a rig is drawn from: distances in world units, angles in degrees, focal
    lengths as fractions of the image width."""

    distance: tuple[float, float]
    elevation_deg: tuple[float, float]
    focal: tuple[float, float]
    arc_deg: tuple[float, float]
    target_jitter: float
    weights: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: DataConfig) -> RigRanges:
        return cls(config.camera_distance, config.elevation_deg, config.focal, config.arc_deg,
                   config.target_jitter, config.rig_weights)


def path_to_rig(path: CameraPath, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Cameras on the spherical placement: c2w [V, T, 4, 4], intrinsics [V, T, 6]."""
    cos_el = np.cos(path.elevation)
    offset = np.stack([cos_el * np.cos(path.azimuth), cos_el * np.sin(path.azimuth),
                       np.sin(path.elevation)], axis=-1) * path.distance[..., None]
    c2w = look_at_c2w(path.target + offset, path.target)
    intr = np.empty((*path.focal.shape, 6))
    intr[..., 0] = intr[..., 1] = path.focal
    intr[..., 2], intr[..., 3] = width / 2, height / 2
    intr[..., 4], intr[..., 5] = width, height
    return c2w, intr


def _uniform(rng: np.random.Generator, bounds: tuple[float, float], size=None):
    return rng.uniform(bounds[0], bounds[1], size=size)


def _ring_azimuths(rng: np.random.Generator, num_views: int, arc: float) -> np.ndarray:
    """A ring or arc (`backend.rigs`) starting at a random azimuth."""
    return ring_azimuths(num_views, arc, rng.uniform(0, 2 * math.pi))


def _arc_span(ranges: RigRanges, rng: np.random.Generator) -> float:
    return math.radians(rng.uniform(*ranges.arc_deg))


def _static_path(azimuth: np.ndarray, elevation, distance, focal, target, num_steps: int
                 ) -> CameraPath:
    """Cameras held still for all `num_steps` timesteps; per-view values broadcast to [V]."""
    num_views = len(azimuth)

    def over_time(value) -> np.ndarray:
        return np.broadcast_to(np.asarray(value, np.float64)[..., None],
                               (num_views, num_steps)).copy()

    target = np.broadcast_to(np.asarray(target, np.float64), (num_views, 3))
    return CameraPath(over_time(azimuth), over_time(np.broadcast_to(elevation, num_views)),
                      over_time(np.broadcast_to(distance, num_views)),
                      over_time(np.broadcast_to(focal, num_views)),
                      np.repeat(target[:, None], num_steps, axis=1))


def sample_path(kind: str, config: DataConfig, rng: np.random.Generator,
                ranges: RigRanges | None = None) -> CameraPath:
    """A camera placement of the given rig kind: `config` gives the grid size, `ranges` the
    bounds (the config's own when None)."""
    ranges = RigRanges.from_config(config) if ranges is None else ranges
    v, t = config.num_views, config.num_steps
    elevation_bounds = tuple(math.radians(e) for e in ranges.elevation_deg)
    focal_bounds = tuple(f * config.width for f in ranges.focal)
    target = rng.normal(size=3) * ranges.target_jitter / math.sqrt(3)
    if kind in ("orbit", "arc"):
        arc = 2 * math.pi if kind == "orbit" else _arc_span(ranges, rng)
        return _static_path(_ring_azimuths(rng, v, arc), _uniform(rng, elevation_bounds),
                            _uniform(rng, ranges.distance), _uniform(rng, focal_bounds),
                            target, t)
    if kind == "jitter":
        azimuth = np.sort(rng.uniform(0, 2 * math.pi, size=v))
        targets = target + rng.normal(size=(v, 3)) * ranges.target_jitter / math.sqrt(3)
        return _static_path(azimuth, _uniform(rng, elevation_bounds, v),
                            _uniform(rng, ranges.distance, v),
                            _uniform(rng, focal_bounds, v), targets, t)
    if kind == "animated":
        return _animated_path(config, ranges, rng, elevation_bounds, focal_bounds, target)
    if kind == "rings":
        return _rings_path(config, ranges, rng, elevation_bounds, focal_bounds, target)
    raise ValueError(f"rig kind: expected one of {RIG_KINDS}, got {kind!r}")


def _rings_path(config: DataConfig, ranges: RigRanges, rng: np.random.Generator,
                elevation_bounds: tuple[float, float], focal_bounds: tuple[float, float],
                target: np.ndarray) -> CameraPath:
    """Two or three full rings at spread-out elevations, views split evenly between them."""
    v = config.num_views
    num_rings = min(v, int(rng.integers(2, 4)))
    counts = np.full(num_rings, v // num_rings) + (np.arange(num_rings) < v % num_rings)
    low, high = elevation_bounds
    edges = np.linspace(low, high, num_rings + 1)
    elevations = edges[:-1] + rng.uniform(0.2, 0.8, num_rings) * np.diff(edges)
    start = rng.uniform(0, 2 * math.pi)
    azimuth = np.concatenate([ring_azimuths(int(n), 2 * math.pi, start + k * math.pi / n)
                              for k, n in enumerate(counts)])
    distance = _uniform(rng, ranges.distance) * rng.uniform(0.9, 1.1, num_rings)
    return _static_path(azimuth, np.repeat(elevations, counts), np.repeat(distance, counts),
                        _uniform(rng, focal_bounds), target, config.num_steps)


def _animated_path(config: DataConfig, ranges: RigRanges, rng: np.random.Generator,
                   elevation_bounds: tuple[float, float], focal_bounds: tuple[float, float],
                   target: np.ndarray) -> CameraPath:
    """A ring or arc travelling around the scene while dollying, rising and zooming."""
    v, t = config.num_views, config.num_steps
    tau = np.linspace(0.0, 1.0, t) if t > 1 else np.zeros(1)  # [T]
    arc = 2 * math.pi if rng.uniform() < 0.5 else _arc_span(ranges, rng)
    azimuth = _ring_azimuths(rng, v, arc)[:, None] + rng.uniform(-1, 1) * math.pi / 3 * tau
    el_low, el_high = elevation_bounds
    el_start, el_end = rng.uniform(el_low, el_high, size=2)
    elevation = np.broadcast_to(el_start + (el_end - el_start) * tau, (v, t))
    d_low, d_high = ranges.distance
    d_start, d_end = rng.uniform(d_low, d_high, size=2)
    distance = np.broadcast_to(d_start + (d_end - d_start) * tau, (v, t))
    f_start, f_end = rng.uniform(*focal_bounds, size=2)
    focal = np.broadcast_to(f_start + (f_end - f_start) * tau, (v, t))
    drift = rng.normal(size=3) * ranges.target_jitter / math.sqrt(3)
    targets = target + drift * (tau[:, None] - 0.5)  # [T, 3]
    return CameraPath(azimuth.copy(), elevation.copy(), distance.copy(), focal.copy(),
                      np.broadcast_to(targets, (v, t, 3)).copy())


def choose_rig_kind(config: DataConfig, rng: np.random.Generator,
                    weights: dict[str, float] | None = None) -> str:
    weights = config.rig_weights if weights is None else weights
    kinds = [k for k in RIG_KINDS if weights.get(k, 0) > 0]
    values = np.array([weights[k] for k in kinds], np.float64)
    return kinds[rng.choice(len(kinds), p=values / values.sum())]


def sample_rig(config: DataConfig, rng: np.random.Generator, kind: str | None = None
               ) -> tuple[str, np.ndarray, np.ndarray]:
    """(kind, c2w [V, T, 4, 4], intrinsics [V, T, 6]); the kind is drawn when not given."""
    kind = choose_rig_kind(config, rng) if kind is None else kind
    path = sample_path(kind, config, rng)
    c2w, intr = path_to_rig(path, config.width, config.height)
    return kind, c2w, intr


def open_rig_ranges(config: DataConfig, rng: np.random.Generator) -> RigRanges:
    """Ranges of one open-scene rig: a log-uniform distance in `open_camera_distance` and
    cameras within 25% of it; the point looked at jitters by 5% of it."""
    low, high = config.open_camera_distance
    distance = math.exp(rng.uniform(math.log(low), math.log(high)))
    return RigRanges((max(low, distance / 1.25), min(high, distance * 1.25)),
                     config.open_elevation_deg, config.open_focal, config.arc_deg,
                     0.05 * distance, config.open_rig_weights)


def sample_open_rig(config: DataConfig, rng: np.random.Generator, kind: str | None = None
                    ) -> tuple[str, np.ndarray, np.ndarray]:
    """An open-scene rig around the origin: (kind, c2w [V, T, 4, 4], intrinsics [V, T, 6]).

    As photographers do, the cameras look less steeply down than at the origin (by up to 60%
    of their elevation, at most 60% of the vertical half field of view), so the action sits
    lower in the frame and the horizon comes into view.
    """
    ranges = open_rig_ranges(config, rng)
    kind = choose_rig_kind(config, rng, ranges.weights) if kind is None else kind
    path = sample_path(kind, config, rng, ranges)
    c2w, intr = path_to_rig(path, config.width, config.height)
    half_fov = np.arctan(0.5 * config.height / path.focal)  # [V, T]
    relief = np.minimum(rng.uniform(0.0, 0.6) * path.elevation, 0.6 * half_fov)
    horizontal = path.distance * np.cos(path.elevation)
    rise = horizontal * (np.tan(path.elevation) - np.tan(path.elevation - relief))
    look_at = path.target + rise[..., None] * np.array([0.0, 0.0, 1.0])
    return kind, look_at_c2w(c2w[..., :3, 3], look_at), intr
