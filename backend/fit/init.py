"""Initial Gaussians from the rig's geometry: plane-sweep multi-view stereo at low resolution.

For every view, depth hypotheses (uniform in inverse depth) are swept through the scene; at
each hypothesis the view's pixels are projected into its nearest views and compared
(absolute colour difference over a small window). A pixel keeps its best depth when the
match is good (low cost), distinct (clearly better than the median hypothesis, which
rejects sky and flat colour) and geometrically consistent (another view's depth map agrees).
The kept pixels become Gaussians one pixel wide, with the pixel's colour. Nothing here
depends on what the learned models were trained on.

A feed-forward reconstruction can add points (`prior_points`), but only those that agree
with the frames: colour matched in at least two views, none of them in front of a surface
the stereo found.
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
UNIQUE_RATIO = 0.8  # ... and below this fraction of the best cost at a different depth
MIN_TEXTURE = 0.02  # local colour spread a pixel needs to be matched (flat sky has none)
WINDOW = 5  # matching window (pixels at the sweep resolution)
GROUND_SUPPORT = 0.15  # share of the matched points a ground plane must hold
GROUND_TOLERANCE = 0.03  # inlier distance to the plane (x the mean camera distance)
SKY_COLOUR = 0.1  # mean absolute difference from the sky's colour that still counts as sky
GROUND_FAR = 20.0  # ground points up to this many mean camera distances away
INIT_MAX_SIZE = 0.05  # largest initial splat (x the mean camera distance)
RING_HEIGHT_SPREAD = 0.05  # cameras within this x distance of one height form a flat ring
HORIZON_BAND = 3.0  # pixels (at the sweep resolution) either side of the horizon left out
GROUND_COST_SLACK = 2.0  # ground pixels may match this x worse than the kept stereo points
PLANE_SEARCH = 0.06  # the plane's offset is searched this far either way (x distance)
GROUND_NEAR = 2.0  # ... matching the ground within this x the mean camera distance
GROUND_TRUSTED_BEYOND = 1.5  # x each camera's distance to the rig centre (z-depth)
GROUND_PREFERENCE = 1.5  # the ground takes a pixel it matches within this x its best cost
PRIOR_COLOUR = 0.06  # mean absolute colour difference at which a view agrees with a point
PRIOR_DEPTH = 0.1  # relative depth difference from the stereo's surface that still agrees
PRIOR_VOTES = 2  # views that must agree
PRIOR_SHARE = 0.75  # ... and this share of the views that see the point


@dataclass
class InitPoints:
    means: Tensor  # [N, 3]
    colors: Tensor  # [N, 3] in [0, 1]
    sizes: Tensor  # [N] one pixel's footprint at the point's depth
    ground: Tensor | None = None  # [N] bool: seeded on the ground plane (None: no plane)
    plane: tuple[Tensor, Tensor] | None = None  # the ground: unit normal [3], offset []
    matched: bool = True  # False: no stereo (points spread through a ball instead)


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


def top_rows(images: Tensor) -> Tensor:  # [N, 3, H, W] -> [P, 3]
    """The pixels of the images' top sixteenth: sky or backdrop, usually."""
    return images[..., : max(1, images.shape[-2] // 16), :].permute(0, 2, 3, 1).reshape(-1, 3)


def match_cost(images: Tensor, viewmats: Tensor, intr: Tensor, sources: Tensor, r: int,
               points: Tensor) -> Tensor:
    """How badly view r's pixels match its source views if they lie at `points` [h, w, 3]:
    absolute colour difference averaged over a WINDOW, then over the better half of the
    sources (occlusions); inf where too few sources see the point. -> [h, w]"""
    h, w = images.shape[-2:]
    per_source = []
    for s in sources[r].tolist():
        uv, zs = _project(points, viewmats[s], intr[s])
        colour = _sample(images[s], uv, h, w)  # [h, w, 3]
        diff = (colour - images[r].permute(1, 2, 0)).abs().mean(dim=-1)
        per_source.append(diff.masked_fill(zs <= 0, float("nan")))
    stack = torch.stack(per_source)  # [S, h, w]
    valid = ~stack.isnan()
    window = F.avg_pool2d(stack.nan_to_num(1.0)[:, None], WINDOW, 1, WINDOW // 2,
                          count_include_pad=False)[:, 0]
    window = window.masked_fill(~valid, float("inf"))
    keep = max(1, math.ceil(stack.shape[0] / 2))
    return window.topk(keep, dim=0, largest=False).values.mean(dim=0)


def sweep_depths(images: Tensor, c2w: Tensor, intr: Tensor, depths: Tensor,
                 sources: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Plane sweep of every view against its source views.

    images [V, 3, h, w] in [0, 1]; c2w [V, 4, 4]; intr [V, 6] at (w, h); depths [V, D];
    sources [V, S]. Returns best depth [V, h, w], its cost [V, h, w] and the cost it is
    compared with [V, h, w]: the median over the hypotheses, or less when another depth
    nearly matches as well (scaled so `cost < DISTINCT_RATIO * it` tests both).
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
            costs.append(match_cost(images, viewmats, intr, sources, r,
                                    c2w[r, :3, 3] + rays * z))
        cost = torch.stack(costs)  # [D, h, w]
        value, index = cost.min(dim=0)
        best_depth[r] = _refine_depth(cost, index, depths[r])
        best_cost[r] = value
        # Uniqueness: the best cost away from the best hypothesis (an edge along the
        # epipolar lines, as the horizon seen from a ring at one height, matches at many).
        hypothesis = torch.arange(len(cost))[:, None, None]
        away = (hypothesis - index[None]).abs() > max(2, len(cost) // 8)
        finite = cost.masked_fill(~torch.isfinite(cost), float("nan"))
        median_cost[r] = torch.minimum(finite.nanmedian(dim=0).values,
                                       cost.masked_fill(~away, float("inf")).amin(dim=0)
                                       / DISTINCT_RATIO * UNIQUE_RATIO)
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


def rig_up(c2w: Tensor) -> Tensor:
    """The world's up as the cameras see it: the direction most perpendicular to every
    camera's right axis (cameras are seldom rolled), signed like their up axes. [3]"""
    right = c2w[:, :3, 0]
    up = torch.linalg.eigh(right.T @ right).eigenvectors[:, 0]
    return up if float(up @ -c2w[:, :3, 1].sum(dim=0)) >= 0 else -up


def fit_ground_plane(points: Tensor, c2w: Tensor) -> tuple[Tensor, Tensor] | None:
    """The ground under the rig: the plane perpendicular to the rig's up (`rig_up`) at the
    height band holding most of the points, below every camera. Returns (unit normal [3]
    pointing to the cameras, offset []) with n.x + d = 0, or None when no band holds
    GROUND_SUPPORT of the points. (Stereo points are too noisy to tilt a plane by; ground
    planes in scenes stand perpendicular to the cameras' up.)"""
    if len(points) < 50:
        return None
    scale = float(c2w[:, :3, 3].norm(dim=-1).mean())
    up = rig_up(c2w)
    heights = points @ up
    lowest_camera = float((c2w[:, :3, 3] @ up).min())
    below = heights[heights < lowest_camera - 0.1 * scale].sort().values
    if len(below) == 0:
        return None
    window = 2 * GROUND_TOLERANCE * scale
    ends = torch.searchsorted(below, below + window)
    counts = ends - torch.arange(len(below))
    best = int(counts.argmax())
    if counts[best] < GROUND_SUPPORT * len(points):
        return None
    level = below[best:int(ends[best])].median()
    return up, -level


def refine_plane_offset(images: Tensor, c2w: Tensor, intr: Tensor,
                        plane: tuple[Tensor, Tensor], sources: Tensor, usable: Tensor
                        ) -> tuple[Tensor, Tensor]:
    """The plane moved along its normal to where the views match it best (the median
    matching cost over the `usable` [V, h, w] pixels that meet it): the stereo points it was
    fitted to sit slightly in front of a surface seen at a grazing angle."""
    normal, offset = plane
    scale = float(c2w[:, :3, 3].norm(dim=-1).mean())
    best, best_score = offset, float("inf")
    for shift in torch.linspace(-PLANE_SEARCH, PLANE_SEARCH, 21).tolist():
        candidate = (normal, offset + shift * scale)
        _, _depth, hit, cost = ground_costs(images, c2w, intr, candidate, sources,
                                           GROUND_NEAR * scale)
        chosen = cost[hit & usable]
        chosen = chosen[torch.isfinite(chosen)]
        if len(chosen) > 100 and float(chosen.median()) < best_score:
            best, best_score = candidate[1], float(chosen.median())
    return normal, best


def ground_costs(images: Tensor, c2w: Tensor, intr: Tensor, plane: tuple[Tensor, Tensor],
                 sources: Tensor, far: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each pixel's ray against the ground plane: the point where it meets it [V, h, w, 3],
    that depth [V, h, w], whether it meets it in front of the camera within `far`
    [V, h, w] and the matching cost of that point in the source views [V, h, w] (as the
    sweep's). Sky pixels never meet it; an object's pixels match it poorly."""
    normal, offset = plane
    V, _, h, w = images.shape
    viewmats = c2w_to_viewmat(c2w)
    dirs = _directions(intr, h, w)
    all_points, all_depths, all_hits, all_costs = [], [], [], []
    for r in range(V):
        rays = dirs[r] @ c2w[r, :3, :3].T  # z-depth 1
        height = c2w[r, :3, 3] @ normal + offset
        along = rays @ normal
        depth = -height / along.masked_fill(along >= 0, -1e-12)
        hit = (along < -1e-6) & (depth * rays.norm(dim=-1) < far)
        depth = torch.where(hit, depth, torch.ones_like(depth))
        points = c2w[r, :3, 3] + rays * depth[..., None]
        cost = match_cost(images, viewmats, intr, sources, r, points)
        all_points.append(points)
        all_depths.append(depth)
        all_hits.append(hit)
        all_costs.append(torch.where(hit, cost, torch.full_like(cost, float("inf"))))
    return (torch.stack(all_points), torch.stack(all_depths), torch.stack(all_hits),
            torch.stack(all_costs))


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
    # A best match at either end of the sweep is unresolved (the horizon, where sky meets
    # the ground, matches "as far as possible"): such points float above and around the scene.
    step = inverse[0] - inverse[1]
    inside = (distance[:, None, None] / depth - inverse[-1] > 1.5 * step) & (
        inverse[0] - distance[:, None, None] / depth > 1.5 * step)
    good &= inside
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
    budget = config.init_max_points
    plane = fit_ground_plane(means, c2w) if config.init_ground else None
    if plane is not None:
        # The ground first, as far as it is seen and matches. With every ring camera at one
        # height, anything at eye level projects onto every view's horizon, so stereo alone
        # cannot tell the far ground's edge from points floating at eye level: a pixel the
        # ground explains about as well as its best depth is given to the ground.
        max_cost = float(torch.quantile(cost[good], config.init_cost_quantile))
        sky = top_rows(small).median(dim=0).values
        sky_coloured = (colours - sky).abs().mean(dim=-1) < SKY_COLOUR
        plane = refine_plane_offset(small, c2w, intr_small, plane, sources, ~sky_coloured)
        g_points, g_depth, g_hit, g_cost = ground_costs(
            small, c2w, intr_small, plane, sources, GROUND_FAR * distance.mean().item())
        explained = g_hit & (g_cost <= GROUND_PREFERENCE * cost.clamp(min=1e-3))
        height = points @ plane[0] + plane[1]
        tolerance = GROUND_TOLERANCE * distance.mean()
        # Sky-coloured pixels whose ray never meets the ground are sky: the environment.
        skyward = ~g_hit & sky_coloured
        objects = good & ~skyward & ((height > tolerance) | ~explained)
        heights = c2w[:, :3, 3] @ plane[0] + plane[1]
        if heights.std() < RING_HEIGHT_SPREAD * distance.mean():
            # Cameras at one height: pixels near the horizon have their epipolar lines along
            # it, so their depth is not determined (eye-level points match at any distance).
            rays = torch.einsum("vhwk,vjk->vhwj", dirs, c2w[:, :3, :3])
            slope = (rays @ plane[0]).abs() / rays.norm(dim=-1)
            objects &= slope > math.sin(HORIZON_BAND * math.atan(1 / intr_small[:, 0].mean()))
        # The ground wherever the ray meets it, unless a matched point stands in front.
        # (Sky-coloured pixels below the horizon see past the ground's edge.)
        # Near the rig the ground must match; far away (behind the scene) its texture is
        # too fine to match at the sweep resolution and the plane alone is trusted.
        far_ground = g_depth > GROUND_TRUSTED_BEYOND * distance[:, None, None]
        on_ground = (g_hit & ~sky_coloured & ~objects
                     & ((g_cost <= GROUND_COST_SLACK * max_cost) | far_ground))
        ground = (g_points[on_ground], colours[on_ground],
                  (g_depth / intr_small[:, 0, None, None])[on_ground])
        share = min(len(ground[0]), budget // 2)
        ground = _subsample(*ground, share, generator)
        means, colors, sizes = _subsample(points[objects], colours[objects],
                                          footprint[objects], budget - share, generator)
        on_ground = torch.cat([torch.zeros(len(means), dtype=torch.bool),
                               torch.ones(len(ground[0]), dtype=torch.bool)])
        means, colors, sizes = (torch.cat([means, ground[0]]), torch.cat([colors, ground[1]]),
                                torch.cat([sizes, ground[2]]))
    else:
        means, colors, sizes = _subsample(means, colors, sizes, budget, generator)
        on_ground = None
    # Far ground points have footprints of whole units: a splat that covers every pixel of
    # every view makes each rasterizer step cost (Gaussians x pixels).
    return InitPoints(means, colors, sizes.clamp(max=INIT_MAX_SIZE * distance.mean()),
                      on_ground, plane)


def _subsample(means: Tensor, colors: Tensor, sizes: Tensor, count: int,
               generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """At most `count` of the points, picked at random; sizes grow so coverage stays."""
    if len(means) <= count:
        return means, colors, sizes
    pick = torch.randperm(len(means), generator=generator)[:count]
    return means[pick], colors[pick], sizes[pick] * math.sqrt(len(means) / max(count, 1))


def _sphere_init(distance: float, config: FitConfig, generator: torch.Generator,
                 images: Tensor) -> InitPoints:
    """Points spread through a ball around the rig centre, coloured by the images' mean."""
    n = min(config.init_max_points, 5000)
    direction = F.normalize(torch.randn(n, 3, generator=generator), dim=-1)
    radius = distance * 0.5 * torch.rand(n, 1, generator=generator) ** (1 / 3)
    colour = images.mean(dim=(0, 2, 3))
    return InitPoints(direction * radius, colour.expand(n, 3).clone(),
                      torch.full((n,), distance * 0.02), matched=False)


def stereo_depth(points: Tensor, c2w: Tensor, intr: Tensor, h: int, w: int) -> Tensor:
    """[V, h, w]: the nearest of `points` [N, 3] in each view's pixels (inf where none)."""
    viewmats = c2w_to_viewmat(c2w)
    depth = torch.full((len(c2w), h * w), float("inf"))
    for v in range(len(c2w)):
        uv, z = _project(points, viewmats[v], intr[v])
        px, py = uv[:, 0].floor().long(), uv[:, 1].floor().long()
        inside = (z > 0) & (px >= 0) & (px < w) & (py >= 0) & (py < h)
        depth[v].scatter_reduce_(0, (py * w + px)[inside], z[inside], "amin")
    return depth.view(len(c2w), h, w)


def prior_points(means: Tensor, sizes: Tensor, images: Tensor, c2w: Tensor, intr: Tensor,
                 stereo: InitPoints, count: int) -> InitPoints:
    """The points of a feed-forward reconstruction (means [N, 3], sizes [N]) that agree with
    the frames (images [V, 3, h, w] with their c2w and intrinsics), coloured from them.

    A view sees a point when it lands inside the image, in front of the camera and not
    behind the stereo's surface there (depth within PRIOR_DEPTH, or no stereo point);
    a point that lands more than PRIOR_DEPTH in front of that surface in any view is
    dropped (it would hide what the frames show). The views that see a point agree when
    their colours there are within PRIOR_COLOUR of their median: a point in the right place
    shows the same surface to every view. Points that PRIOR_VOTES views and PRIOR_SHARE of
    the views that see them agree on are kept, at most `count`, most agreeing views first."""
    V, _, h, w = images.shape
    known = stereo_depth(stereo.means if stereo.matched else stereo.means[:0], c2w, intr, h, w)
    viewmats = c2w_to_viewmat(c2w)
    seen = torch.full((V, len(means), 3), float("nan"))
    in_front = torch.zeros(len(means), dtype=torch.bool)
    for v in range(V):
        uv, z = _project(means, viewmats[v], intr[v])
        colour = _sample(images[v], uv, h, w)
        inside = ~torch.isnan(colour[:, 0]) & (z > 0)
        px = uv[:, 0].floor().long().clamp(0, w - 1)
        py = uv[:, 1].floor().long().clamp(0, h - 1)
        surface = known[v, py, px]
        has = inside & torch.isfinite(surface)
        in_front |= has & (z < surface * (1 - PRIOR_DEPTH))
        visible = inside & (~has | (z <= surface * (1 + PRIOR_DEPTH)))
        seen[v, visible] = colour[visible]
    median = seen.nanmedian(dim=0).values  # [N, 3]
    votes = ((seen - median).abs().mean(dim=-1) < PRIOR_COLOUR).sum(dim=0)  # NaN: False
    views = (~torch.isnan(seen[..., 0])).sum(dim=0)
    keep = (votes >= PRIOR_VOTES) & (votes >= PRIOR_SHARE * views) & ~in_front
    order = torch.argsort(votes[keep], descending=True, stable=True)[:max(count, 0)]
    chosen = keep.nonzero().squeeze(1)[order]
    return InitPoints(means[chosen], median[chosen], sizes[chosen])
