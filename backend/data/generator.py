"""Render procedural 4D samples: `make_sample(config, index)`.

Each sample is deterministic in (config.seed, index). The mix follows the paper's recipe:
dynamic scenes seen by a rig; static scenes (one timestep rendered and copied to all T);
"2D-transformed" videos (one camera's video, the other views random homographies of it,
flagged `geometry_valid=False`); and random view-order reversal.

Two scene families (`DataConfig.scene_kind`): "dome" (objects inside a textured dome) and
"open" (objects on a ground plane under a sky, with a light and shadows,
`backend.data.open_scenes`); "mixed" draws the family per sample from its own random stream,
so a mixed config's dome samples equal those of the same config with scene_kind "dome".
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from backend.cameras import c2w_to_viewmat, intrinsics_to_K
from backend.data.augment import homography_views, reverse_views
from backend.data.config import DataConfig
from backend.data.open_render import render_open_grid
from backend.data.open_scenes import OpenScene, random_open_scene
from backend.data.rigs import sample_open_rig, sample_rig
from backend.data.sample import Sample, stack_timesteps
from backend.data.scenes import Scene, random_scene
from backend.gaussians import Gaussians
from backend.render import TorchRasterizerConfig, rasterize_torch

NEAR = 0.05
FAMILY_STREAM = 1  # the random stream that draws a mixed config's family per sample
# 8-pixel tiles suit these small images best: about 1.8x faster than 16 at 64x64 on the CPU.
RASTER_CONFIG = TorchRasterizerConfig(tile_size=8)


def sample_rng(config: DataConfig, index: int) -> np.random.Generator:
    """The random stream of sample `index`: independent across indices and seeds."""
    if index < 0 or config.seed < 0:
        raise ValueError(f"sample index and seed must be >= 0, got {index} and {config.seed}")
    return np.random.default_rng(np.random.SeedSequence([config.seed, index]))


def splat_spacings(config: DataConfig) -> tuple[float, float | None]:
    """World spacing of object and backdrop splats from their pixel spacings."""
    distance = float(np.mean(config.camera_distance))
    focal_px = float(np.mean(config.focal)) * config.width
    object_spacing = config.object_spacing_px * distance / focal_px
    backdrop_spacing = config.backdrop_spacing_px * (config.backdrop_radius + distance) / focal_px
    return object_spacing, backdrop_spacing if config.backdrop else None


def far_plane(config: DataConfig, family: str = "dome") -> float:
    """A far clipping distance beyond everything the rig can see (for the open family, the
    farthest ground: its half-size is at most 30 rig distances)."""
    if family == "open":
        return 60.0 * config.open_camera_distance[1]
    return 4.0 * (config.backdrop_radius + config.camera_distance[1])


def scene_family(config: DataConfig, index: int) -> str:
    """"dome" or "open" for sample `index` (drawn per sample when scene_kind is "mixed")."""
    if config.scene_kind != "mixed":
        return config.scene_kind
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, index, FAMILY_STREAM]))
    return "open" if rng.uniform() < config.open_fraction else "dome"


def open_scene_info(scene: OpenScene) -> dict:
    """What an open sample's scene is, for tests and evaluation (JSON-ready)."""
    return {"ground_height": scene.ground.height, "ground_half_size": scene.ground.half_size,
            "light_kind": scene.light.kind, "light_direction": scene.light.direction.tolist(),
            "sky_kind": scene.sky.kind, "scale": scene.scale,
            "num_objects": len(scene.objects)}


def make_scene(config: DataConfig, rng: np.random.Generator, motion_amplitude: float) -> Scene:
    object_spacing, backdrop_spacing = splat_spacings(config)
    num_objects = int(rng.integers(config.min_objects, config.max_objects + 1))
    return random_scene(rng, num_objects, object_spacing, backdrop_spacing,
                        config.backdrop_radius, config.object_size, config.scene_radius,
                        motion_amplitude)


def render_views(
    gaussians: Gaussians,
    c2w: np.ndarray,  # [C, 4, 4]
    intrinsics: np.ndarray,  # [C, 6]
    background: np.ndarray,  # [3]
    far: float,
    empty_alpha: float,
) -> tuple[Tensor, Tensor, Tensor]:  # rgb [C, 3, H, W], depth [C, 1, H, W], alpha [C, 1, H, W]
    """Render one timestep's Gaussians into C cameras; depth is 0 where alpha < empty_alpha."""
    height, width = round(float(intrinsics[0, 5])), round(float(intrinsics[0, 4]))
    tensors = gaussians.to_torch()
    viewmats = torch.as_tensor(c2w_to_viewmat(np.asarray(c2w, np.float64)), dtype=torch.float32)
    Ks = torch.as_tensor(intrinsics_to_K(np.asarray(intrinsics)), dtype=torch.float32)
    with torch.no_grad():
        out = rasterize_torch(tensors["means"], tensors["quats"], tensors["scales"],
                              tensors["opacities"], tensors["colors"], viewmats, Ks, width,
                              height, near=NEAR, far=far,
                              background=torch.as_tensor(background, dtype=torch.float32),
                              config=RASTER_CONFIG)
    rgb = out.rgb.clamp(0.0, 1.0).permute(0, 3, 1, 2)
    alpha = out.alpha.clamp(0.0, 1.0).permute(0, 3, 1, 2)
    depth = torch.where(alpha >= empty_alpha, out.depth.permute(0, 3, 1, 2), 0.0)
    return rgb.contiguous(), depth.contiguous(), alpha.contiguous()


def render_grid(
    scene: Scene,
    c2w: np.ndarray,  # [V, T, 4, 4]
    intrinsics: np.ndarray,  # [V, T, 6]
    config: DataConfig,
    still: bool = False,
) -> tuple[Tensor, Tensor, Tensor, list[Gaussians]]:
    """Frames [V, T, 3, H, W], depth and alpha [V, T, 1, H, W], Gaussians per timestep.

    With `still`, only timestep 0 is rendered (scene and cameras) and copied to every T.
    """
    num_steps = c2w.shape[1]
    far = far_plane(config)
    taus = np.linspace(0.0, 1.0, num_steps) if num_steps > 1 else np.zeros(1)
    rendered, gaussians = [], []
    for t in range(1 if still else num_steps):
        g = scene.gaussians_at(float(taus[t]))
        gaussians.append(g)
        rendered.append(render_views(g, c2w[:, t], intrinsics[:, t], scene.background, far,
                                     config.empty_alpha))
    return stack_timesteps(rendered, gaussians, num_steps)


def choose_sample_kind(config: DataConfig, rng: np.random.Generator) -> str:
    draw = rng.uniform()
    if draw < config.static_fraction:
        return "static"
    if draw < config.static_fraction + config.homography_fraction:
        return "homography"
    return "dynamic"


def _as_float32(array: np.ndarray) -> Tensor:
    return torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32)


def make_sample(config: DataConfig, index: int, kind: str | None = None,
                family: str | None = None) -> Sample:
    """Render sample `index`: deterministic in (config.seed, index).

    `kind` ("dynamic", "static" or "homography") overrides the config's data mix, `family`
    ("dome" or "open") the config's scene kind.
    """
    rng = sample_rng(config, index)
    drawn = choose_sample_kind(config, rng)
    kind = drawn if kind is None else kind
    if kind not in ("dynamic", "static", "homography"):
        raise ValueError(f"kind: expected 'dynamic', 'static' or 'homography', got {kind!r}")
    family = scene_family(config, index) if family is None else family
    if family not in ("dome", "open"):
        raise ValueError(f"family: expected 'dome' or 'open', got {family!r}")
    amplitude = 0.0 if kind == "static" else config.motion_amplitude
    scene_info = None
    if family == "open":
        rig_kind, c2w, intr = sample_open_rig(config, rng)
        c2w, intr = _still_rig(c2w, intr, kind == "static")
        num_objects = int(rng.integers(config.min_objects, config.max_objects + 1))
        scene = random_open_scene(rng, c2w, intr, num_objects, amplitude)
        scene_info = open_scene_info(scene)
        far = far_plane(config, "open")

        def render(c2w, intr, still=False):
            return render_open_grid(scene, c2w, intr, NEAR, far, config.empty_alpha, still)
    else:
        scene = make_scene(config, rng, amplitude)
        rig_kind, c2w, intr = sample_rig(config, rng)
        c2w, intr = _still_rig(c2w, intr, kind == "static")
        far = far_plane(config)

        def render(c2w, intr, still=False):
            return render_grid(scene, c2w, intr, config, still)
    if kind == "homography":
        frames, depth, alpha, gaussians = render(c2w[:1], intr[:1])
        stacked = torch.cat([frames[0], depth[0], alpha[0]], dim=1)  # [T, 5, H, W]
        warped, _ = homography_views(stacked, config.num_views, rng, config.homography_strength)
        frames, depth, alpha = (x.contiguous() for x in warped.split([3, 1, 1], dim=2))
        c2w = np.repeat(c2w[:1], config.num_views, axis=0)
        intr = np.repeat(intr[:1], config.num_views, axis=0)
    else:
        frames, depth, alpha, gaussians = render(c2w, intr, still=kind == "static")
    sample = Sample(frames=frames, c2w=_as_float32(c2w), intrinsics=_as_float32(intr),
                    depth=depth, alpha=alpha, gaussians=gaussians, kind=kind,
                    rig_kind=rig_kind, geometry_valid=kind != "homography", index=index,
                    near_far=(NEAR, far), family=family, scene_info=scene_info)
    if rng.uniform() < config.reverse_views_probability:
        sample = reverse_views(sample)
    return sample


def _still_rig(c2w: np.ndarray, intr: np.ndarray, still: bool) -> tuple[np.ndarray, np.ndarray]:
    """The rig with every timestep's cameras those of timestep 0 when `still`."""
    if not still:
        return c2w, intr
    num_steps = c2w.shape[1]
    return np.repeat(c2w[:, :1], num_steps, axis=1), np.repeat(intr[:, :1], num_steps, axis=1)
