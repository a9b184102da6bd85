"""Configuration of the procedural 4D data generator."""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, field, fields

RIG_KINDS = ("orbit", "arc", "jitter", "animated", "rings")
# "dome": objects inside a textured dome (the original family); "open": objects on an open
# ground plane under a sky, lit by a sun or area light with shadows; "mixed": each sample
# draws its family, open with probability `open_fraction`.
SCENE_KINDS = ("dome", "open", "mixed")
# Fields added after configs were first fingerprinted: left out of the fingerprint while they
# hold their defaults, so cached pools of earlier configs stay valid.
_LATER_FIELDS = ("scene_kind", "open_fraction", "open_camera_distance", "open_elevation_deg",
                 "open_focal", "open_rig_weights")


def _default_rig_weights() -> dict[str, float]:
    return {"orbit": 1.0, "arc": 1.0, "jitter": 1.0, "animated": 1.0}


def _default_open_rig_weights() -> dict[str, float]:
    return {"orbit": 1.0, "arc": 1.5, "jitter": 0.5, "animated": 1.0, "rings": 1.0}


@dataclass
class DataConfig:
    """What `make_sample` renders: grid size, scene content, rigs and the data mix.

    Distances are in world units (the objects live within `scene_radius` of the origin),
    focal lengths are fractions of the image width, angles are in degrees. Images may be
    non-square: pixels stay square (fx = fy) and the principal point is the image centre.

    The `open_*` fields shape the open family (`scene_kind` "open" or "mixed"): each rig
    draws a distance in `open_camera_distance` and the scene is built to its scale, so the
    fields for the dome's scene (`scene_radius`, `object_size`, `camera_distance`, backdrop)
    do not apply there; object counts, motion and the data mix do.
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
    # scene family and the open family's rigs
    scene_kind: str = "dome"  # one of SCENE_KINDS
    open_fraction: float = 0.5  # share of open samples when scene_kind is "mixed"
    open_camera_distance: tuple[float, float] = (1.5, 15.0)
    open_elevation_deg: tuple[float, float] = (3.0, 60.0)
    open_focal: tuple[float, float] = (0.6, 1.6)
    open_rig_weights: dict[str, float] = field(default_factory=_default_open_rig_weights)

    def __post_init__(self) -> None:
        self.object_size = tuple(self.object_size)
        self.camera_distance = tuple(self.camera_distance)
        self.elevation_deg = tuple(self.elevation_deg)
        self.arc_deg = tuple(self.arc_deg)
        self.focal = tuple(self.focal)
        self.rig_weights = dict(self.rig_weights)
        self.open_camera_distance = tuple(self.open_camera_distance)
        self.open_elevation_deg = tuple(self.open_elevation_deg)
        self.open_focal = tuple(self.open_focal)
        self.open_rig_weights = dict(self.open_rig_weights)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        for name in ("num_views", "num_steps", "height", "width", "min_objects"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"DataConfig.{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_objects < self.min_objects:
            raise ValueError(f"DataConfig.max_objects: {self.max_objects} < min_objects "
                             f"{self.min_objects}")
        for name in ("object_size", "camera_distance", "elevation_deg", "arc_deg", "focal",
                     "open_camera_distance", "open_elevation_deg", "open_focal"):
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
        for name in ("rig_weights", "open_rig_weights"):
            _check_rig_weights(name, getattr(self, name))
        self._validate_open()
        fractions = (self.static_fraction, self.homography_fraction,
                     self.reverse_views_probability)
        if any(not 0 <= p <= 1 for p in fractions) or sum(fractions[:2]) > 1:
            raise ValueError("DataConfig: static_fraction, homography_fraction and "
                             "reverse_views_probability must be in [0, 1], the first two "
                             "summing to at most 1")
        if self.motion_amplitude < 0 or self.homography_strength < 0:
            raise ValueError("DataConfig: motion_amplitude and homography_strength must be >= 0")

    def _validate_open(self) -> None:
        if self.scene_kind not in SCENE_KINDS:
            raise ValueError(f"DataConfig.scene_kind: expected one of {SCENE_KINDS}, "
                             f"got {self.scene_kind!r}")
        if not 0 <= self.open_fraction <= 1:
            raise ValueError(f"DataConfig.open_fraction: must be in [0, 1], "
                             f"got {self.open_fraction}")
        if self.open_camera_distance[0] < 0.5:
            raise ValueError("DataConfig.open_camera_distance: keep cameras >= 0.5 units away")
        if self.open_elevation_deg[0] < 1 or self.open_elevation_deg[1] > 80:
            raise ValueError(f"DataConfig.open_elevation_deg: keep within [1, 80] (cameras "
                             f"above the ground), got {self.open_elevation_deg}")
        if self.open_focal[0] <= 0:
            raise ValueError("DataConfig.open_focal must be positive")

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
        values = self.to_dict()
        for f in fields(DataConfig):
            if f.name in _LATER_FIELDS:
                default = f.default_factory() if f.default is MISSING else f.default
                if _same(values[f.name], default):
                    del values[f.name]
        text = json.dumps(values, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def _same(value, default) -> bool:
    return json.dumps(value, sort_keys=True) == json.dumps(
        list(default) if isinstance(default, tuple) else default, sort_keys=True)


def _check_rig_weights(name: str, weights: dict[str, float]) -> None:
    unknown = sorted(set(weights) - set(RIG_KINDS))
    if unknown:
        raise ValueError(f"DataConfig.{name}: unknown rig kinds {unknown}; "
                         f"known: {list(RIG_KINDS)}")
    values = list(weights.values())
    if any(w < 0 for w in values) or sum(values) <= 0:
        raise ValueError(f"DataConfig.{name}: need non-negative weights with a "
                         f"positive sum, got {weights}")
