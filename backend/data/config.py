"""Configuration of the procedural 4D data generator."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields

RIG_KINDS = ("orbit", "arc", "jitter", "animated")


def _default_rig_weights() -> dict[str, float]:
    return {"orbit": 1.0, "arc": 1.0, "jitter": 1.0, "animated": 1.0}


@dataclass
class DataConfig:
    """What `make_sample` renders: grid size, scene content, rigs and the data mix.

    Distances are in world units (the objects live within `scene_radius` of the origin),
    focal lengths are fractions of the image width, angles are in degrees.
    """

    num_views: int = 4
    num_steps: int = 8
    height: int = 64
    width: int = 64
    seed: int = 0
    # scene content
    min_objects: int = 1
    max_objects: int = 4
    object_size: tuple[float, float] = (0.3, 0.6)
    scene_radius: float = 0.8
    motion_amplitude: float = 1.0  # 0 gives still objects; 1 the default motion
    backdrop: bool = True  # textured dome around the scene, else a flat background colour
    backdrop_radius: float = 8.0
    object_spacing_px: float = 1.4  # object splat spacing in pixels at the nominal distance
    backdrop_spacing_px: float = 3.0  # backdrop splat spacing in pixels, seen from the centre
    # rigs
    rig_weights: dict[str, float] = field(default_factory=_default_rig_weights)
    camera_distance: tuple[float, float] = (3.5, 5.0)
    elevation_deg: tuple[float, float] = (-5.0, 35.0)
    arc_deg: tuple[float, float] = (30.0, 180.0)  # angle spanned by an arc rig
    focal: tuple[float, float] = (0.9, 1.4)  # focal length / image width
    target_jitter: float = 0.15  # random offset of the point the cameras look at
    # data mix (the paper's recipe): fractions of static and 2D-transformed samples
    static_fraction: float = 0.2
    homography_fraction: float = 0.2
    reverse_views_probability: float = 0.5
    homography_strength: float = 1.0
    empty_alpha: float = 0.02  # depth is set to 0 where alpha is below this

    def __post_init__(self) -> None:
        self.object_size = tuple(self.object_size)
        self.camera_distance = tuple(self.camera_distance)
        self.elevation_deg = tuple(self.elevation_deg)
        self.arc_deg = tuple(self.arc_deg)
        self.focal = tuple(self.focal)
        self.rig_weights = dict(self.rig_weights)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        for name in ("num_views", "num_steps", "height", "width", "min_objects"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"DataConfig.{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_objects < self.min_objects:
            raise ValueError(f"DataConfig.max_objects: {self.max_objects} < min_objects "
                             f"{self.min_objects}")
        for name in ("object_size", "camera_distance", "elevation_deg", "arc_deg", "focal"):
            low, high = getattr(self, name)
            if not low <= high:
                raise ValueError(f"DataConfig.{name}: expected (low, high), got {(low, high)}")
        if self.object_size[0] <= 0 or self.focal[0] <= 0:
            raise ValueError("DataConfig.object_size and focal must be positive")
        if self.arc_deg[0] <= 0 or self.arc_deg[1] > 360:
            raise ValueError(f"DataConfig.arc_deg: expected angles in (0, 360], "
                             f"got {self.arc_deg}")
        if self.camera_distance[0] <= self.scene_radius + self.object_size[1]:
            raise ValueError("DataConfig.camera_distance: cameras would sit inside the scene")
        if self.backdrop_radius <= self.camera_distance[1] + 1.0:
            raise ValueError("DataConfig.backdrop_radius: must exceed camera_distance by > 1")
        if self.elevation_deg[0] < -80 or self.elevation_deg[1] > 80:
            raise ValueError(f"DataConfig.elevation_deg: keep within [-80, 80], "
                             f"got {self.elevation_deg}")
        if min(self.object_spacing_px, self.backdrop_spacing_px) <= 0:
            raise ValueError("DataConfig spacing_px values must be positive")
        unknown = sorted(set(self.rig_weights) - set(RIG_KINDS))
        if unknown:
            raise ValueError(f"DataConfig.rig_weights: unknown rig kinds {unknown}; "
                             f"known: {list(RIG_KINDS)}")
        weights = list(self.rig_weights.values())
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"DataConfig.rig_weights: need non-negative weights with a "
                             f"positive sum, got {self.rig_weights}")
        fractions = (self.static_fraction, self.homography_fraction,
                     self.reverse_views_probability)
        if any(not 0 <= p <= 1 for p in fractions) or sum(fractions[:2]) > 1:
            raise ValueError("DataConfig: static_fraction, homography_fraction and "
                             "reverse_views_probability must be in [0, 1], the first two "
                             "summing to at most 1")
        if self.motion_amplitude < 0 or self.homography_strength < 0:
            raise ValueError("DataConfig: motion_amplitude and homography_strength must be >= 0")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> DataConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"DataConfig: unknown fields {unknown}")
        return cls(**values)

    def fingerprint(self) -> str:
        """Short hash of every field: equal configs give equal samples for equal indices."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]
