"""Camera rig layouts: where the cameras of a ring or an arc stand around their target.

The one definition of ring and arc spacing, used by the add-on's rig presets, the backend's
test and benchmark rigs (`cameras.orbit_rig`) and the procedural training rigs. numpy only:
the add-on vendors this file.
"""

from __future__ import annotations

import math

import numpy as np

FULL_TURN = 2 * math.pi


def is_full_ring(arc: float) -> bool:
    """An arc of a full turn (or more) is a closed ring."""
    return arc >= FULL_TURN * (1 - 1e-9)


def ring_azimuths(num: int, arc: float = FULL_TURN, start: float = 0.0) -> np.ndarray:
    """[num] azimuths in radians, the first at `start`: a full ring spaces the cameras evenly
    around the circle; a shorter arc puts its first and last camera on its two ends."""
    if num < 1:
        raise ValueError(f"a rig needs at least one camera, got {num}")
    if not arc > 0:
        raise ValueError(f"the arc must be positive, got {arc}")
    steps = num if is_full_ring(arc) or num == 1 else num - 1
    return start + min(arc, FULL_TURN) * np.arange(num) / steps


def centred_ring_azimuths(num: int, arc: float, centre: float) -> np.ndarray:
    """[num] azimuths of a ring starting at `centre`, or of an arc centred on it (a single
    camera stands at the centre)."""
    if is_full_ring(arc) or num == 1:
        return ring_azimuths(num, arc, centre)
    return ring_azimuths(num, arc, centre - arc / 2)
