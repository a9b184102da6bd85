"""Initial Gaussians from the rig's geometry: plane-sweep multi-view stereo at low resolution.

For every view, depth hypotheses (uniform in inverse depth) are swept through the scene; at
each hypothesis the view's pixels are projected into its nearest views and compared
(absolute colour difference over a small window). A pixel keeps its best depth when the
match is good (low cost), distinct (clearly better than the median hypothesis, which
rejects sky and flat colour) and geometrically consistent (another view's depth map agrees).
The kept pixels become Gaussians one pixel wide, with the pixel's colour. Nothing here
depends on what the learned models were trained on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from backend.cameras import c2w_to_viewmat, scale_intrinsics
from backend.fit.config import FitConfig

DEPTH_AGREEMENT = 0.05  # relative depth difference for two views to agree
DISTINCT_RATIO = 0.6  # best cost must be below this fraction of the median cost
MIN_TEXTURE = 0.02  # local colour spread a pixel needs to be matched (flat sky has none)
WINDOW = 5  # matching window (pixels at the sweep resolution)


@dataclass
class InitPoints:
    means: Tensor  # [N, 3]
    colors: Tensor  # [N, 3] in [0, 1]
    sizes: Tensor  # [N] one pixel's footprint at the point's depth


def _directions(intr: Tensor, h: int, w: int) -> Tensor:  # [V, 6] -> [V, h, w, 3] (z = 1)
    u = torch.arange(w, dtype=intr.dtype) + 0.5
    v = torch.arange(h, dtype=intr.dtype) + 0.5
    fx, fy, cx, cy = (intr[:, i, None, None] for i in range(4))
    x = (u[None, None, :] - cx) / fx
    y = (v[None, :, None] - cy) / fy
    x, y = torch.broadcast_tensors(x, y)
    return torch.stack([x, y, torch.ones_like(x)], dim=-1)


def _project(points: Tensor, viewmat: Tensor, intr: Tensor) -> tuple[Tensor, Tensor]:
    """points [..., 3] world -> pixel coordinates [..., 2] and z-depth [...] in one camera."""
    cam = points @ viewmat[:3, :3].T + viewmat[:3, 3]
    z = cam[..., 2]
    zs = z.clamp(min=1e-6)
    u = intr[0] * cam[..., 0] / zs + intr[2]
    v = intr[1] * cam[..., 1] / zs + intr[3]
    return torch.stack([u, v], dim=-1), z


def _sample(image: Tensor, uv: Tensor, h: int, w: int) -> Tensor:
    """image [3, h, w], uv [..., 2] pixels -> colours [..., 3] (NaN outside the image)."""
    grid = torch.stack([uv[..., 0] / w * 2 - 1, uv[..., 1] / h * 2 - 1], dim=-1)
    flat = grid.reshape(1, -1, 1, 2)
    out = F.grid_sample(image[None], flat, align_corners=False, padding_mode="border")
    out = out[0, :, :, 0].T.reshape(*uv.shape[:-1], 3)
    outside = (grid.abs() > 1).any(dim=-1)
    return out.masked_fill(outside[..., None], float("nan"))


def local_spread(images: Tensor) -> Tensor:  # [V, 3, h, w] -> [V, h, w]
    """Standard deviation of the colour in each pixel's matching window."""
    mean = F.avg_pool2d(images, WINDOW, 1, WINDOW // 2, count_include_pad=False)
    square = F.avg_pool2d(images * images, WINDOW, 1, WINDOW // 2, count_include_pad=False)
    return (square - mean * mean).clamp(min=0).mean(dim=1).sqrt()


def neighbour_views(c2w: Tensor, count: int) -> Tensor:  # [V, 4, 4] -> [V, count]
    """Each view's `count` nearest other views by camera position."""
    centres = c2w[:, :3, 3]
    dist = torch.cdist(centres, centres)
    dist.fill_diagonal_(float("inf"))
    return dist.topk(min(count, len(c2w) - 1), largest=False).indices


def sweep_depths(images: Tensor, c2w: Tensor, intr: Tensor, depths: Tensor,
                 sources: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Plane sweep of every view against its source views.

    images [V, 3, h, w] in [0, 1]; c2w [V, 4, 4]; intr [V, 6] at (w, h); depths [V, D];
    sources [V, S]. Returns best depth [V, h, w], its cost [V, h, w] and the median cost
    over the hypotheses [V, h, w].
    """
    V, _, h, w = images.shape
    viewmats = c2w_to_viewmat(c2w)
    dirs = _directions(intr, h, w)  # [V, h, w, 3]
    best_depth = torch.zeros(V, h, w)
    best_cost = torch.zeros(V, h, w)
    median_cost = torch.zeros(V, h, w)
    for r in range(V):
        rays = dirs[r] @ c2w[r, :3, :3].T  # [h, w, 3] world directions (z-depth 1)
        costs = []
        for z in depths[r]:
            points = c2w[r, :3, 3] + rays * z
            per_source = []
            for s in sources[r].tolist():
                uv, zs = _project(points, viewmats[s], intr[s])
                colour = _sample(images[s], uv, h, w)  # [h, w, 3]
                diff = (colour - images[r].permute(1, 2, 0)).abs().mean(dim=-1)
                diff = diff.masked_fill(zs <= 0, float("nan"))
                per_source.append(diff)
            stack = torch.stack(per_source)  # [S, h, w]
            valid = ~stack.isnan()
            filled = stack.nan_to_num(1.0)
            window = F.avg_pool2d(filled[:, None], WINDOW, 1, WINDOW // 2,
                                  count_include_pad=False)[:, 0]
            window = window.masked_fill(~valid, float("inf"))
            keep = max(1, math.ceil(stack.shape[0] / 2))  # the better half: occlusions
            costs.append(window.topk(keep, dim=0, largest=False).values.mean(dim=0))
        cost = torch.stack(costs)  # [D, h, w]
        value, index = cost.min(dim=0)
        best_depth[r] = _refine_depth(cost, index, depths[r])
        best_cost[r] = value
        finite = cost.masked_fill(~torch.isfinite(cost), float("nan"))
        median_cost[r] = finite.nanmedian(dim=0).values
    return best_depth, best_cost, median_cost


def _refine_depth(cost: Tensor, index: Tensor, depths: Tensor) -> Tensor:
    """Sub-hypothesis depth: the vertex of the parabola through the best cost and its two
    neighbours, interpolated in inverse depth. cost [D, h, w], index [h, w], depths [D]."""
    D = cost.shape[0]
    inner = index.clamp(1, D - 2)
    c0, c1, c2 = (cost.gather(0, (inner + k)[None])[0] for k in (-1, 0, 1))
    curvature = c0 - 2 * c1 + c2
    shift = 0.5 * (c0 - c2) / curvature.clamp(min=1e-12)
    ok = torch.isfinite(shift) & (curvature > 0) & (index == inner)
    shift = torch.where(ok, shift.clamp(-0.5, 0.5), torch.zeros_like(shift))
    inverse = 1.0 / depths
    step = inverse[1] - inverse[0]
    return 1.0 / (inverse[index] + shift * step)


def consistent(depth: Tensor, c2w: Tensor, intr: Tensor, sources: Tensor) -> Tensor:
    """[V, h, w] bool: the pixel's 3D point lands on a source view's depth map within
    DEPTH_AGREEMENT (at least one source)."""
    V, h, w = depth.shape
    viewmats = c2w_to_viewmat(c2w)
    dirs = _directions(intr, h, w)
    agree = torch.zeros(V, h, w, dtype=torch.bool)
    for r in range(V):
        points = c2w[r, :3, 3] + (dirs[r] * depth[r][..., None]) @ c2w[r, :3, :3].T
        for s in sources[r].tolist():
            uv, zs = _project(points, viewmats[s], intr[s])
            seen = _sample(depth[s][None].expand(3, h, w), uv, h, w)[..., 0]
            ok = (seen - zs).abs() < DEPTH_AGREEMENT * zs.clamp(min=1e-6)
            agree[r] |= ok & (zs > 0)
    return agree


def plane_sweep_init(images: Tensor, c2w: Tensor, intr: Tensor, config: FitConfig,
                     generator: torch.Generator) -> InitPoints:
    """Initial points from one timestep's views.

    images [V, 3, H, W] in [0, 1]; c2w [V, 4, 4] (the rig normalised with its centre at the
    origin); intr [V, 6]. With fewer than two views there is no stereo: points are spread
    on spheres around the rig centre instead.
    """
    V, _, H, W = images.shape
    scale = config.init_resolution / max(H, W)
    h, w = max(8, round(H * scale)), max(8, round(W * scale))
    small = F.interpolate(images, size=(h, w), mode="bilinear", antialias=True,
                          align_corners=False)
    intr_small = scale_intrinsics(intr, w, h)
    distance = c2w[:, :3, 3].norm(dim=-1).clamp(min=1e-6)  # [V] to the rig centre
    if V < 2:
        return _sphere_init(distance.mean().item(), config, generator, small)
    inverse = torch.linspace(1 / 0.3, 1 / 2.5, config.init_depths)  # 0.3x .. 2.5x distance
    depths = distance[:, None] / inverse[None, :]  # [V, D]
    sources = neighbour_views(c2w, 4)
    depth, cost, median = sweep_depths(small, c2w, intr_small, depths, sources)
    good = torch.isfinite(cost) & (cost < DISTINCT_RATIO * median)
    good &= local_spread(small) > MIN_TEXTURE
    if good.any():
        good &= cost <= torch.quantile(cost[good], config.init_cost_quantile)
    good &= consistent(depth, c2w, intr_small, sources)
    dirs = _directions(intr_small, h, w)
    points = c2w[:, None, None, :3, 3] + torch.einsum(
        "vhwk,vjk->vhwj", dirs * depth[..., None], c2w[:, :3, :3])
    colours = small.permute(0, 2, 3, 1)
    footprint = depth / intr_small[:, 0, None, None]  # one pixel at that depth
    means, colors, sizes = points[good], colours[good], footprint[good]
    if len(means) == 0:
        return _sphere_init(distance.mean().item(), config, generator, small)
    if len(means) > config.init_max_points:
        pick = torch.randperm(len(means), generator=generator)[:config.init_max_points]
        means, colors, sizes = means[pick], colors[pick], sizes[pick]
        sizes = sizes * math.sqrt(good.sum().item() / config.init_max_points)
    return InitPoints(means, colors, sizes)


def _sphere_init(distance: float, config: FitConfig, generator: torch.Generator,
                 images: Tensor) -> InitPoints:
    """Points spread through a ball around the rig centre, coloured by the images' mean."""
    n = min(config.init_max_points, 5000)
    direction = F.normalize(torch.randn(n, 3, generator=generator), dim=-1)
    radius = distance * 0.5 * torch.rand(n, 1, generator=generator) ** (1 / 3)
    colour = images.mean(dim=(0, 2, 3))
    return InitPoints(direction * radius, colour.expand(n, 3).clone(),
                      torch.full((n,), distance * 0.02))
