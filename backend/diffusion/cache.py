"""A 3D cache of the given frames rendered into every cell's camera (geometry-aware
conditioning, as GEN3C and ViewCrafter condition video models on renders of a point cache).

At each timestep t the given cells of that timestep are unprojected with their z-depth into
world points and splatted into the camera of every cell (v, t) with a z-buffer (nearest
point per pixel wins, one pixel per point). The network then corrects a warped guess
instead of inventing where things are: the input view's frame at timestep t, seen from
view v, places the moving objects of timestep t; the other given frames of t fill in.
Pixels nothing lands on are zero with coverage 0. The cell's own given frame is skipped
(a given cell needs no guess), so the cache never copies a cell onto itself. Pixels at depth
edges (a neighbour more than `EDGE_RATIO` nearer or farther) are left out: their depth blends
two surfaces and would float between them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from backend.cameras import project_points, scale_intrinsics, unproject_depth

CACHE_CHANNELS_EXTRA = 1  # coverage, after the colour channels
EDGE_RATIO = 0.1  # relative depth step to a 4-neighbour that marks a depth edge


def depth_edges(depth: Tensor) -> Tensor:  # [..., H, W] -> [..., H, W] bool
    """Pixels whose depth differs from a 4-neighbour's by more than `EDGE_RATIO` of the
    nearer of the two (an empty neighbour, depth <= 0, counts as an edge)."""
    H, W = depth.shape[-2:]
    flat = depth.reshape(-1, 1, H, W)
    padded = torch.nn.functional.pad(flat, (1, 1, 1, 1), mode="replicate")
    padded = padded.reshape(*depth.shape[:-2], H + 2, W + 2)
    edge = torch.zeros_like(depth, dtype=torch.bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        other = padded[..., dy:dy + H, dx:dx + W]
        nearer = torch.minimum(depth, other)
        edge |= (depth - other).abs() > EDGE_RATIO * nearer.clamp(min=0)
        edge |= other <= 0
    return edge


def render_cache(
    frames: Tensor,  # [B, V, T, C, H, W]
    depth: Tensor,  # [B, V, T, 1, H, W] z-depth, <= 0 where unknown
    c2w: Tensor,  # [B, V, T, 4, 4]
    intrinsics: Tensor,  # [B, V, T, 6]
    cell_mask: Tensor,  # [B, V, T] bool, True = given
    supersample: int = 2,
) -> Tensor:  # [B, V, T, C + 1, H, W]
    """The given frames of each timestep splatted into every cell's camera: colour (zero
    where nothing lands) and coverage (1 where a point landed). Each source pixel is cut
    into `supersample`^2 points (nearest colour and depth), so surfaces seen up to that
    much closer than in their source still cover their pixels."""
    B, V, T, C, H, W = frames.shape
    if depth.shape != (B, V, T, 1, H, W):
        raise ValueError(f"depth must be {(B, V, T, 1, H, W)}, got {tuple(depth.shape)}")
    if cell_mask.shape != (B, V, T):
        raise ValueError(f"cell_mask must be {(B, V, T)}, got {tuple(cell_mask.shape)}")
    dtype = torch.float32
    c2w, intrinsics = c2w.to(dtype), intrinsics.to(dtype)
    intrinsics = scale_intrinsics(intrinsics, W, H)
    k = int(supersample)
    if k < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    coarse = depth[:, :, :, 0].to(dtype)
    coarse = torch.where(depth_edges(coarse), 0.0, coarse)  # edges: no point
    fine = coarse.repeat_interleave(k, -2).repeat_interleave(k, -1)
    points = unproject_depth(fine, c2w, intrinsics)  # [B, V, T, kH, kW, 3]
    source_ok = (fine > 0) & cell_mask[..., None, None]  # [B, V, T, kH, kW]
    frames = frames.repeat_interleave(k, -2).repeat_interleave(k, -1)
    HW = H * W * k * k  # points per source cell
    # Sources (b, s, t) x targets (b, v, t): every source point into every target camera.
    src = points.permute(0, 2, 1, 3, 4, 5).reshape(B, T, 1, V * HW, 3)  # [B, T, 1, S*HW, 3]
    uv, z = project_points(src, c2w.permute(0, 2, 1, 3, 4), intrinsics.permute(0, 2, 1, 3))
    uv = torch.nan_to_num(uv)  # points at the camera plane; masked out below by z
    px, py = torch.floor(uv[..., 0]), torch.floor(uv[..., 1])  # the pixel holding the point
    ok = source_ok.permute(0, 2, 1, 3, 4).reshape(B, T, 1, V * HW).expand_as(z)
    # not the target cell itself: source view s != target view v
    source_view = torch.arange(V, device=z.device).repeat_interleave(HW)  # [S*HW]
    target_view = torch.arange(V, device=z.device)[:, None]  # [V, 1]
    ok = ok & (source_view[None] != target_view)[None, None]
    ok = ok & (z > 1e-6) & (px >= 0) & (px < W) & (py >= 0) & (py < H)
    target = (px.clamp(0, W - 1) * 1 + py.clamp(0, H - 1) * W).long()  # [B, T, V, S*HW]
    cells = torch.arange(B * T * V, device=z.device).reshape(B, T, V, 1) * (H * W)
    index = torch.where(ok, target + cells, B * T * V * H * W)  # misses to a spare slot
    flat_z = torch.where(ok, z, torch.inf).reshape(-1)
    nearest = torch.full((B * T * V * H * W + 1,), torch.inf, device=z.device)
    nearest.scatter_reduce_(0, index.reshape(-1), flat_z, reduce="amin")
    wins = ok.reshape(-1) & (flat_z <= nearest[index.reshape(-1)])
    colours = frames.to(dtype).permute(0, 2, 1, 4, 5, 3).reshape(B, T, 1, V * HW, C)
    colours = colours.expand(B, T, V, V * HW, C).reshape(-1, C)
    out = torch.zeros(B * T * V * H * W + 1, C + 1, device=z.device)
    # ties at equal depth: the point with the highest id wins
    ids = torch.arange(flat_z.numel(), device=z.device)
    best = torch.full_like(nearest, -1, dtype=torch.long)
    best.scatter_reduce_(0, index.reshape(-1)[wins], ids[wins], reduce="amax")
    wins = wins & (best[index.reshape(-1)] == ids)
    out.index_copy_(0, index.reshape(-1)[wins],
                    torch.cat([colours[wins], torch.ones_like(colours[wins, :1])], dim=1))
    out = out[:-1].reshape(B, T, V, H, W, C + 1).permute(0, 2, 1, 5, 3, 4)
    return out.to(frames.dtype).contiguous()
