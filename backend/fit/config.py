"""Configuration of the fitting stage, with quality presets."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from backend.render.inputs import RASTERIZE_MODES

PRESETS = ("fast", "default", "quality")


@dataclass
class FitConfig:
    """How Gaussians are fitted to the user's frames.

    Phase 1 fits one set of Gaussians to the first timestep's cells with adaptive density
    control; phase 2 carries it to each later timestep (positions and rotations only, held
    together by rigidity losses); phase 3 polishes everything on cells of every timestep.
    Steps are per phase (phase 2: per timestep). Lengths are in units of the rig's mean
    camera distance, so one config suits any scene scale.
    """

    # ------------------------------------------------------------------ budget
    static_steps: int = 300
    track_steps: int = 40  # per later timestep
    joint_steps: int = 300  # on cells of every timestep: the input views gain ~2 dB over 60
    views_per_step: int = 4  # cells rendered in one step (the rest wait for later steps)
    max_seconds: float = 0.0  # 0: no limit; else the phases shrink to fit
    # ------------------------------------------------------------------ initialisation
    init_resolution: int = 64  # longest side of the plane-sweep images
    init_depths: int = 96  # depth hypotheses of the plane sweep
    init_max_points: int = 20000
    init_cost_quantile: float = 0.6  # keep the best-matching fraction of pixels
    init_opacity: float = 0.5
    init_ground: bool = True  # find a ground plane and seed it where the views match it
    ground_lock: bool = True  # Gaussians seeded on the ground stay on its plane ...
    ground_opacity: float = 0.5  # ... at least this opaque (opacity resets spare them)
    ground_flatness: float = 0.05  # weight of their extent along the normal over their size
    # ------------------------------------------------------------------ optimisation
    lr: float = 1.0  # multiplies every learning rate below
    means_lr: float = 4e-3  # x the mean camera distance
    quats_lr: float = 2e-2
    scales_lr: float = 1e-2  # of the log scales
    opacity_lr: float = 0.1  # of the opacity logits
    colors_lr: float = 2e-2  # of the DC SH coefficients
    background_lr: float = 2e-2
    environment_degree: int = 2  # a learned background varies with direction (0: one colour)
    ssim_weight: float = 0.2
    opacity_weight: float = 1e-3  # mean opacity penalty: fewer floaters
    filter_variance: float = 0.2  # 3D filter (Mip-Splatting), pixels^2 at the finest input view
    min_pixel_size: float = 0.5  # splats are kept at least this many pixels wide (sigma)
    # "classic": the 0.3 px^2 screen-space blur at full opacity, as 3DGS; "antialiased":
    # with gsplat's opacity compensation (a splat's light is spread over the blur, not added
    # to, so renders at other resolutions keep its energy; the add-on's materials compensate
    # alike for results that say so)
    rasterize_mode: str = "antialiased"
    pixel_size_weight: float = 1e-2
    # ------------------------------------------------------------------ density control
    densify_every: int = 50
    densify_until: float = 0.7  # fraction of the static phase
    densify_grad: float = 2e-4  # view-space positional gradient threshold (NDC units)
    split_size: float = 0.01  # Gaussians larger than this (x rig scale) are split
    prune_opacity: float = 0.02
    max_gaussians: int = 60000
    opacity_reset_every: int = 100  # steps (at a densification step); 0: no reset
    # ------------------------------------------------------------------ tracking
    rigidity_weight: float = 4.0
    rotation_weight: float = 1.0
    isometry_weight: float = 1.0
    neighbours: int = 8
    coarse_to_fine: bool = True  # the first third of the static phase at half resolution
    seed: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                continue
            if isinstance(value, int | float) and value < 0:
                raise ValueError(f"FitConfig.{f.name} must be >= 0, got {value!r}")
        if self.views_per_step < 1 or self.init_resolution < 8 or self.init_depths < 2:
            raise ValueError("FitConfig: views_per_step >= 1, init_resolution >= 8 and "
                             "init_depths >= 2 are needed")
        if self.environment_degree > 3:
            raise ValueError("FitConfig.environment_degree must be 0..3")
        if not 0 < self.init_cost_quantile <= 1 or not 0 < self.init_opacity < 1:
            raise ValueError("FitConfig: init_cost_quantile in (0, 1], init_opacity in (0, 1)")
        if self.rasterize_mode not in RASTERIZE_MODES:
            raise ValueError(f"FitConfig.rasterize_mode: expected one of {RASTERIZE_MODES}, "
                             f"got {self.rasterize_mode!r}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> FitConfig:
        """"fast" (previews), "default", "quality" (more steps and Gaussians)."""
        if name not in PRESETS:
            raise ValueError(f"fit preset: expected one of {PRESETS}, got {name!r}")
        base = {
            "fast": dict(static_steps=120, track_steps=15, joint_steps=0, views_per_step=3,
                         init_max_points=10000, max_gaussians=25000, densify_every=40,
                         opacity_reset_every=0),
            "default": {},
            "quality": dict(static_steps=800, track_steps=100, joint_steps=600,
                            views_per_step=6, init_max_points=40000, max_gaussians=150000,
                            opacity_reset_every=200),
        }[name]
        return replace(cls(), **{**base, **overrides})
