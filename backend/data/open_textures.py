"""Textures of the open scenes: seeded value noise, ground patterns with fine grain, colours.

Ground patterns are functions of ground-plane coordinates (u, v) in world units. Each takes
the footprint of the sample on the ground (world units) and fades detail finer than the
footprint to its mean, so distant ground does not alias into noise. Colours are drawn in
sRGB and shaded in linear light (`to_linear`, `to_srgb`), as Blender's Standard view does.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

GROUND_PATTERNS = ("checker", "tiles", "brick", "planks", "patches")
# sRGB base colours of common ground materials: grass, dirt, sand, concrete, asphalt, wood,
# pale tiles, stone
GROUND_PALETTE = np.array([
    [0.33, 0.45, 0.20], [0.42, 0.33, 0.24], [0.76, 0.68, 0.52], [0.62, 0.62, 0.60],
    [0.28, 0.28, 0.30], [0.55, 0.38, 0.22], [0.85, 0.83, 0.78], [0.50, 0.47, 0.43],
])


def to_linear(srgb: np.ndarray) -> np.ndarray:
    return np.clip(srgb, 0.0, 1.0) ** 2.2


def to_srgb(linear: np.ndarray) -> np.ndarray:
    return np.clip(linear, 0.0, 1.0) ** (1.0 / 2.2)


@dataclass
class NoiseTable:
    """A seeded lattice for value noise: a permutation hash and one value per cell."""

    perm: np.ndarray  # [256] int64 permutation
    values: np.ndarray  # [256] float64 in [0, 1)

    @classmethod
    def random(cls, rng: np.random.Generator) -> NoiseTable:
        return cls(rng.permutation(256).astype(np.int64), rng.uniform(size=256))

    def cell_values(self, cells: np.ndarray) -> np.ndarray:  # [..., D] int -> [...]
        """A random value in [0, 1) per integer lattice cell (repeats every 256 cells)."""
        hashed = np.zeros(cells.shape[:-1], np.int64)
        for d in range(cells.shape[-1]):
            hashed = self.perm[(hashed + cells[..., d]) & 255]
        return self.values[hashed]

    def noise(self, points: np.ndarray) -> np.ndarray:  # [N, D] -> [N] in [0, 1]
        """Smoothly interpolated value noise with one lattice cell per unit."""
        base = np.floor(points)
        frac = points - base
        smooth = frac * frac * (3.0 - 2.0 * frac)
        base = base.astype(np.int64)
        sides = (1.0 - smooth, smooth)  # weights of the lower and upper corner per axis
        out = np.zeros(len(points))
        for corner in itertools.product((0, 1), repeat=points.shape[-1]):
            weight = sides[corner[0]][:, 0].copy()
            for d in range(1, len(corner)):
                weight *= sides[corner[d]][:, d]
            out += weight * self.cell_values(base + np.array(corner))
        return out

    def fbm(self, points: np.ndarray, frequency: float, octaves: int,
            footprint: np.ndarray | float = 0.0) -> np.ndarray:  # [N, D] -> [N] in [0, 1]
        """Octaves of value noise from `frequency` (cells per unit) up, each fading to its
        mean where it is finer than the footprint."""
        total, norm, amplitude = 0.5 * np.ones(len(points)), 0.0, 1.0
        for octave in range(octaves):
            scale = frequency * 2.0**octave
            shifted = points * scale + 17.0 * octave
            total = total + amplitude * antialias(footprint, scale) * (self.noise(shifted) - 0.5)
            norm += amplitude
            amplitude *= 0.5
        return np.clip(0.5 + (total - 0.5) / max(norm, 1e-9) * 1.6, 0.0, 1.0)


def antialias(footprint: np.ndarray | float, frequency: float) -> np.ndarray | float:
    """Weight in [0, 1] of a pattern of `frequency` (cycles per unit): 1 while a sample's
    footprint covers under a quarter period, 0 from three quarters on."""
    return np.clip(1.5 - 2.0 * np.asarray(footprint) * frequency, 0.0, 1.0)


def random_ground_colours(rng: np.random.Generator) -> np.ndarray:  # -> [2, 3] sRGB
    """A base and a secondary ground colour: mostly natural materials, sometimes any hue."""
    if rng.uniform() < 0.7:
        base = GROUND_PALETTE[rng.integers(len(GROUND_PALETTE))] * rng.uniform(0.8, 1.15, 3)
    else:
        hue = rng.uniform()
        rgb = np.clip(np.abs((hue * 6 + np.array([0.0, 4.0, 2.0])) % 6 - 3) - 1, 0, 1)
        sat, val = rng.uniform(0.15, 0.6), rng.uniform(0.35, 0.85)
        base = val * (1 - sat + sat * rgb)
    second = base * rng.uniform(0.45, 0.8) if rng.uniform() < 0.6 else \
        np.clip(base + rng.uniform(-0.25, 0.25, 3), 0.05, 0.95)
    return np.clip(np.stack([base, second]), 0.03, 0.95)


@dataclass
class GroundTexture:
    """A two-colour pattern on the ground plane times a fine grain."""

    pattern: str
    colours: np.ndarray  # [2, 3] sRGB: the main colour and the secondary (joints, patches)
    period: float  # world units of one pattern cell
    line_width: float  # joint width as a fraction of the period
    tint: float  # per-cell brightness variation
    grain_frequency: float  # cells per world unit of the fine grain
    grain: float  # strength of the grain in [0, 1)
    noise: NoiseTable

    @classmethod
    def random(cls, rng: np.random.Generator, scale: float) -> GroundTexture:
        """A random texture for a scene whose objects are about `scale` units across."""
        period = scale * np.exp(rng.uniform(np.log(0.15), np.log(1.5)))
        return cls(pattern=GROUND_PATTERNS[rng.integers(len(GROUND_PATTERNS))],
                   colours=random_ground_colours(rng), period=float(period),
                   line_width=rng.uniform(0.03, 0.1), tint=rng.uniform(0.0, 0.25),
                   grain_frequency=float(rng.uniform(4.0, 12.0) / period),
                   grain=rng.uniform(0.2, 0.5), noise=NoiseTable.random(rng))

    def albedo(self, uv: np.ndarray, footprint: np.ndarray) -> np.ndarray:
        """sRGB colours [N, 3] at ground coordinates uv [N, 2], footprints [N] (world units)."""
        mix, cell = self._pattern(uv / self.period, footprint / self.period)
        tint = 1.0 + self.tint * (2.0 * self.noise.cell_values(cell) - 1.0)
        colour = (1.0 - mix)[:, None] * self.colours[0] * tint[:, None] \
            + mix[:, None] * self.colours[1]
        grain = self.noise.fbm(uv, self.grain_frequency, 3, footprint)
        return np.clip(colour * (1.0 - self.grain * grain)[:, None] * (1.0 + 0.5 * self.grain),
                       0.0, 1.0)

    def _pattern(self, p: np.ndarray, footprint: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:  # mix [N] in [0, 1], cell [N, 2] int
        """The pattern in units of the period: the secondary colour's weight and the cell."""
        if self.pattern == "checker":
            cell = np.floor(p).astype(np.int64)
            mix = (cell.sum(-1) % 2).astype(np.float64)
            fade = antialias(footprint, 1.0)
            return fade * mix + (1.0 - fade) * 0.5, cell
        if self.pattern == "patches":
            field = self.noise.fbm(p, 1.0, 4, footprint)
            mix = np.clip((field - 0.5) * 6.0 + 0.5, 0.0, 1.0)
            return mix, np.floor(p * 3.0).astype(np.int64)
        if self.pattern == "brick":
            row = np.floor(p[:, 1] * 2.0)
            p = np.stack([p[:, 0] + 0.5 * (row % 2), p[:, 1] * 2.0], -1)
        elif self.pattern == "planks":
            p = np.stack([p[:, 0] * 0.25 + 0.5 * (np.floor(p[:, 1] * 3.0) % 2), p[:, 1] * 3.0],
                         -1)
        cell = np.floor(p).astype(np.int64)
        frac = p - cell
        edge = np.minimum(frac, 1.0 - frac).min(-1)  # distance to the nearest joint
        joints = (edge < self.line_width / 2).astype(np.float64)
        fade = antialias(footprint, 1.0 / self.line_width)
        return fade * joints + (1.0 - fade) * 2.0 * self.line_width, cell


def object_grain(points: np.ndarray, size: float, rng: np.random.Generator
                 ) -> np.ndarray:  # [N, 3] local points -> [N] brightness factors
    """Fine brightness grain on an object's surface (cells a few splats across)."""
    table = NoiseTable.random(rng)
    strength = rng.uniform(0.1, 0.45)
    grain = table.fbm(points, rng.uniform(3.0, 10.0) / size, 2)
    return 1.0 - strength * grain + 0.5 * strength
