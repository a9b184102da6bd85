"""Render open scenes (`backend.data.open_scenes`): the lit object Gaussians through the
rasterizer, the ground plane and the sky per pixel ray, then one composite by depth.

The ground and sky are evaluated at S x S sub-pixel rays (S from the image size) and averaged,
so the horizon and the ground's edge are anti-aliased and a pixel's ground coverage becomes
its alpha. Sky pixels have alpha 0 and depth 0 (nothing was hit); ground pixels have the
plane's exact z-depth; object pixels the rasterizer's expected depth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from backend.cameras import c2w_to_viewmat, intrinsics_to_K
from backend.data.open_scenes import LitState, OpenScene, visibility
from backend.data.open_textures import to_linear, to_srgb
from backend.data.sample import stack_timesteps
from backend.gaussians import Gaussians
from backend.render import rasterize


def supersampling(height: int, width: int) -> int:
    """Sub-pixel rays per pixel side for the ground and sky."""
    side = max(height, width)
    return 3 if side <= 64 else 2 if side <= 160 else 1


def _ray_directions(c2w: np.ndarray, intr: np.ndarray, s: int) -> np.ndarray:
    """World directions [H*s, W*s, 3] of sub-pixel rays of one camera, scaled so that their
    camera-space z is 1 (a hit at ray parameter t lies at z-depth t)."""
    fx, fy, cx, cy, width, height = (float(x) for x in intr)
    u = (np.arange(round(width) * s) + 0.5) / s
    v = (np.arange(round(height) * s) + 0.5) / s
    x, y = np.meshgrid((u - cx) / fx, (v - cy) / fy, indexing="xy")
    cam = np.stack([x, y, np.ones_like(x)], -1)
    return cam @ c2w[:3, :3].T


def _pool(values: np.ndarray, weights: np.ndarray, s: int, height: int, width: int
          ) -> tuple[np.ndarray, np.ndarray]:
    """Weighted means [H, W, D] of sub-pixel values [H*s*W*s, D] and the weight sums [H, W]."""
    d = values.shape[-1]
    total = (values * weights[:, None]).reshape(height, s, width, s, d).sum((1, 3))
    count = weights.reshape(height, s, width, s).sum((1, 3))
    return total / np.maximum(count, 1e-12)[..., None], count / (s * s)


@dataclass
class GroundRays:
    """What one camera's sub-pixel rays see of the ground and sky, before lighting (the same
    at every timestep the camera holds still)."""

    hit: np.ndarray  # [M] bool, rays that hit the ground
    points: np.ndarray  # [K, 3] world points hit
    albedo: np.ndarray  # [K, 3] linear albedo there
    inverse_depth: np.ndarray  # [M, 1] 1 / z-depth where hit, else 0
    sky: np.ndarray  # [H, W, 3] sRGB sky at the pixel centres
    s: int
    height: int
    width: int


def ground_rays(scene: OpenScene, c2w: np.ndarray, intr: np.ndarray, near: float, far: float
                ) -> GroundRays:
    """Intersect one camera's S x S sub-pixel rays with the ground and look up its texture,
    fading detail finer than a ray's footprint."""
    height, width = round(float(intr[5])), round(float(intr[4]))
    s = supersampling(height, width)
    dirs = _ray_directions(c2w, intr, s).reshape(-1, 3)  # [M, 3]
    origin, ground = c2w[:3, 3], scene.ground
    down = dirs[:, 2] < -1e-9
    t = np.where(down, (ground.height - origin[2]) / np.where(down, dirs[:, 2], -1.0), -1.0)
    hit = down & (t > near) & (t < far)
    points = origin + t[hit, None] * dirs[hit]
    uv = ground.to_uv(points[:, :2])
    inside = ground.contains(uv)
    hit[hit] = inside
    points, uv, t_hit = points[inside], uv[inside], t[hit]
    length = np.linalg.norm(dirs[hit], axis=-1)
    grazing = np.maximum(-dirs[hit, 2] / length, 0.02)
    footprint = t_hit * length / (float(intr[0]) * s) / np.sqrt(grazing)
    inverse = np.zeros((len(dirs), 1))
    inverse[hit, 0] = 1.0 / t_hit
    centres = _ray_directions(c2w, intr, 1).reshape(-1, 3)  # the sky is smooth: one ray
    sky = to_srgb(scene.sky.radiance(centres / np.linalg.norm(centres, axis=-1, keepdims=True),
                                     scene.light.direction))
    return GroundRays(hit, points, to_linear(ground.texture.albedo(uv, footprint)), inverse,
                      sky.reshape(height, width, 3), s, height, width)


def ground_and_sky(scene: OpenScene, state: LitState, rays: GroundRays
                   ) -> tuple[np.ndarray, ...]:
    """For one camera: ground colour [H, W, 3] (sRGB, mean over the rays that hit it), its
    coverage [H, W], its z-depth [H, W] (exact at the centres of fully covered pixels) and
    the sky colour [H, W, 3] at the pixel centres."""
    light = scene.light
    direct = (light.directions[:, 2:3] * visibility(state.shadow_maps, rays.points)).mean(0)
    irradiance = light.ambient + light.sun * direct[:, None]
    colour = np.zeros((len(rays.hit), 3))
    colour[rays.hit] = to_srgb(rays.albedo * irradiance)
    weights = rays.hit.astype(np.float64)
    size = (rays.s, rays.height, rays.width)
    ground_colour, coverage = _pool(colour, weights, *size)
    # inverse depth on a plane is affine in the pixel coordinates: its mean over a fully
    # covered pixel's sub-pixel grid is its value at the pixel centre
    ground_inverse, _ = _pool(rays.inverse_depth, weights, *size)
    ground_depth = np.where(coverage > 0, 1.0 / np.maximum(ground_inverse[..., 0], 1e-12), 0.0)
    return ground_colour, coverage, ground_depth, rays.sky


def _rasterize_objects(gaussians: Gaussians, c2w: np.ndarray, intr: np.ndarray, near: float,
                       far: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Objects alone: premultiplied rgb [C, H, W, 3], alpha [C, H, W], depth [C, H, W]."""
    height, width = round(float(intr[0, 5])), round(float(intr[0, 4]))
    g = gaussians.to_torch()
    viewmats = torch.as_tensor(c2w_to_viewmat(np.asarray(c2w, np.float64)), dtype=torch.float32)
    Ks = torch.as_tensor(intrinsics_to_K(np.asarray(intr)), dtype=torch.float32)
    with torch.no_grad():
        out = rasterize(g["means"], g["quats"], g["scales"], g["opacities"], g["colors"],
                        viewmats, Ks, width, height, near=near, far=far)
    alpha = out.alpha[..., 0].clamp(0.0, 1.0).double().numpy()
    return out.rgb.double().numpy(), alpha, out.depth[..., 0].double().numpy()


def render_open_views(
    scene: OpenScene,
    state: LitState,
    c2w: np.ndarray,  # [C, 4, 4]
    intrinsics: np.ndarray,  # [C, 6]
    near: float,
    far: float,
    empty_alpha: float,
    cache: dict | None = None,
) -> tuple[Tensor, Tensor, Tensor]:  # rgb [C, 3, H, W], depth [C, 1, H, W], alpha [C, 1, H, W]
    """Render one timestep into C cameras; depth is 0 where alpha < empty_alpha. `cache`
    keeps each camera's ground rays between the timesteps of one scene."""
    rgb_o, alpha_o, depth_o = _rasterize_objects(state.gaussians, c2w, intrinsics, near, far)
    cache = {} if cache is None else cache
    layers = []
    for c in range(len(c2w)):
        key = (c2w[c].tobytes(), np.asarray(intrinsics[c]).tobytes())
        if key not in cache:
            cache[key] = ground_rays(scene, c2w[c], intrinsics[c], near, far)
        layers.append(ground_and_sky(scene, state, cache[key]))
    ground, cover, depth_g, sky = (np.stack(parts) for parts in zip(*layers, strict=True))
    # objects in front of the ground, or the ground in front of what lies below or beyond it
    front = (depth_o <= depth_g) | (cover <= 0.0) | (alpha_o <= 0.0)
    a_o, a_g = alpha_o[..., None], cover[..., None]
    over_ground = rgb_o + (1 - a_o) * (a_g * ground + (1 - a_g) * sky)
    under_ground = a_g * ground + (1 - a_g) * (rgb_o + (1 - a_o) * sky)
    rgb = np.where(front[..., None], over_ground, under_ground)
    alpha = alpha_o + (1 - alpha_o) * cover
    weighted = np.where(front, alpha_o * depth_o + (1 - alpha_o) * cover * depth_g,
                        cover * depth_g + (1 - cover) * alpha_o * depth_o)
    depth = np.where(alpha >= empty_alpha, weighted / np.maximum(alpha, 1e-12), 0.0)

    def channels_first(x: np.ndarray) -> Tensor:  # [C, H, W, D] -> [C, D, H, W]
        return torch.as_tensor(np.ascontiguousarray(np.moveaxis(x, -1, 1)), dtype=torch.float32)

    return (channels_first(np.clip(rgb, 0.0, 1.0)), channels_first(depth[..., None]),
            channels_first(np.clip(alpha, 0.0, 1.0)[..., None]))


def render_open_grid(
    scene: OpenScene,
    c2w: np.ndarray,  # [V, T, 4, 4]
    intrinsics: np.ndarray,  # [V, T, 6]
    near: float,
    far: float,
    empty_alpha: float,
    still: bool = False,
) -> tuple[Tensor, Tensor, Tensor, list[Gaussians]]:
    """Frames [V, T, 3, H, W], depth and alpha [V, T, 1, H, W], lit object Gaussians per
    timestep (the ground and sky are not Gaussians). With `still`, timestep 0 is rendered and
    copied to every T."""
    num_steps = c2w.shape[1]
    taus = np.linspace(0.0, 1.0, num_steps) if num_steps > 1 else np.zeros(1)
    rendered, gaussians, cache = [], [], {}
    for t in range(1 if still else num_steps):
        state = scene.state_at(float(taus[t]))
        gaussians.append(state.gaussians)
        rendered.append(render_open_views(scene, state, c2w[:, t], intrinsics[:, t], near, far,
                                          empty_alpha, cache))
    return stack_timesteps(rendered, gaussians, num_steps)
