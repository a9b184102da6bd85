"""Pure-torch tile rasterizer for 3D Gaussians (3DGS maths), differentiable through autograd.

Projection: EWA splatting of the 3D covariance R S S^T R^T with the perspective Jacobian
(the tangent of the projected point clamped to the frustum plus a 30% margin), plus a 0.3 px
low-pass on the 2D covariance diagonal. Per pixel, alpha = opacity * exp(-0.5 d^T S^-1 d),
clamped to 0.99 and skipped below 1/255; Gaussians are composited front to back by camera
depth and a pixel stops once its transmittance would drop to 1e-4 or below.

Memory stays bounded: Gaussians are binned into square tiles (8x8 pixels by default) by the
box around their alpha >= 1/255 footprint, each tile's list is sorted by depth and consumed in
chunks, with transmittance carried from chunk to chunk. One step evaluates about
`max_evals_per_step` pixel-Gaussian pairs (at least `chunk_size` Gaussians per tile); with
`checkpoint` the backward pass recomputes a step instead of storing its intermediates, so
peak memory is one step's O(pixels * chunk) work plus a few values per pixel per step and the
per-Gaussian tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as run_checkpointed

from backend.render.inputs import broadcast_raster_inputs

ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.99
TRANSMITTANCE_MIN = 1e-4
BLUR_EPS = 0.3
FRUSTUM_MARGIN = 0.3
_LOG_TRANSMITTANCE_MIN = math.log(TRANSMITTANCE_MIN)
_EMPTY_LOG_OPACITY = -1e4  # padding slots: exp() of it is exactly zero


class RenderOutput(NamedTuple):
    rgb: Tensor  # [C, H, W, D]
    alpha: Tensor  # [C, H, W, 1]
    depth: Tensor  # [C, H, W, 1] expected z-depth, 0 where alpha == 0


@dataclass
class TorchRasterizerConfig:
    tile_size: int = 8  # pixels per tile side
    chunk_size: int = 16  # least Gaussians per tile composited in one step
    max_evals_per_step: int = 1 << 20  # pixel-Gaussian pairs evaluated in one step
    checkpoint: bool = True  # recompute steps in backward instead of storing them


def quat_scale_to_matrix(
    quats: Tensor,  # [N, 4] (w, x, y, z)
    scales: Tensor,  # [N, 3]
) -> Tensor:  # [N, 3, 3] R diag(s), so that the covariance is M M^T
    w, x, y, z = torch.nn.functional.normalize(quats, dim=-1).unbind(-1)
    rot = torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=-1).reshape(-1, 3, 3)
    return rot * scales[:, None, :]


@dataclass
class ProjectedGaussians:
    means2d: Tensor  # [C, N, 2] pixel coordinates of the projected centres
    conics: Tensor  # [C, N, 3] (a, b, c) of the inverse 2D covariance [[a, b], [b, c]]
    depths: Tensor  # [C, N] camera z of the centres
    radii: Tensor  # [C, N, 2] half extent (px) of the box holding alpha >= 1/255
    valid: Tensor  # [C, N] bool, False for culled Gaussians
    opacities: Tensor  # [C, N] opacity times the antialiasing compensation (if any)


def project_gaussians(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4]
    scales: Tensor,  # [N, 3]
    opacities: Tensor,  # [N]
    viewmats: Tensor,  # [C, 4, 4]
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    near: float,
    far: float,
    antialiased: bool = False,
) -> ProjectedGaussians:
    """EWA projection of every Gaussian into every camera, with culling.

    With `antialiased` (gsplat's "antialiased" mode, Mip-Splatting's 2D filter) the opacity
    is scaled by sqrt(det(cov2d) / det(cov2d + 0.3 I)), the blur's loss of peak density.
    """
    rot_view, trans_view = viewmats[:, None, :3, :3], viewmats[:, None, :3, 3]  # [C, 1, ...]
    means_cam = (rot_view @ means[None, :, :, None])[..., 0] + trans_view  # [C, N, 3]
    x, y, z = means_cam.unbind(-1)  # [C, N] each
    in_range = (z >= near) & (z <= far)
    z_safe = torch.where(in_range, z, torch.ones_like(z))
    fx, fy = Ks[:, None, 0, 0], Ks[:, None, 1, 1]  # [C, 1]
    cx, cy = Ks[:, None, 0, 2], Ks[:, None, 1, 2]
    margin_x, margin_y = FRUSTUM_MARGIN * 0.5 * width / fx, FRUSTUM_MARGIN * 0.5 * height / fy
    tan_x = torch.minimum(torch.maximum(x / z_safe, -cx / fx - margin_x),
                          (width - cx) / fx + margin_x)
    tan_y = torch.minimum(torch.maximum(y / z_safe, -cy / fy - margin_y),
                          (height - cy) / fy + margin_y)
    zeros = torch.zeros_like(z)
    jacobian = torch.stack([fx / z_safe, zeros, -fx * tan_x / z_safe,
                            zeros, fy / z_safe, -fy * tan_y / z_safe], dim=-1)
    jacobian = jacobian.reshape(*z.shape, 2, 3)  # [C, N, 2, 3]
    half_cov = jacobian @ rot_view @ quat_scale_to_matrix(quats, scales)[None]  # [C, N, 2, 3]
    cov_a = (half_cov[..., 0, :] ** 2).sum(-1) + BLUR_EPS  # [C, N]
    cov_b = (half_cov[..., 0, :] * half_cov[..., 1, :]).sum(-1)
    cov_c = (half_cov[..., 1, :] ** 2).sum(-1) + BLUR_EPS
    det = cov_a * cov_c - cov_b * cov_b
    det_safe = torch.where(det > 0, det, torch.ones_like(det))
    conics = torch.stack([cov_c / det_safe, -cov_b / det_safe, cov_a / det_safe], dim=-1)
    means2d = torch.stack([fx * x / z_safe + cx, fy * y / z_safe + cy], dim=-1)  # [C, N, 2]
    opacities = opacities[None].expand_as(z)
    if antialiased:
        det_orig = (cov_a - BLUR_EPS) * (cov_c - BLUR_EPS) - cov_b * cov_b
        ratio = det_orig / det_safe
        positive = ratio > 0  # a sqrt's gradient at 0 is infinite: keep it off the graph
        opacities = opacities * torch.where(positive, torch.where(positive, ratio, 1.0).sqrt(), 0.0)
    with torch.no_grad():
        opac = opacities.detach()
        extent = torch.sqrt(2 * torch.log(torch.clamp(opac / ALPHA_MIN, min=1.0)))
        radii = extent[..., None] * torch.stack([cov_a, cov_c], -1).sqrt() * 1.001 + 0.01
        lo, hi = means2d - radii, means2d + radii
        on_screen = ((hi[..., 0] > 0) & (lo[..., 0] < width)
                     & (hi[..., 1] > 0) & (lo[..., 1] < height))
        valid = in_range & (det > 0) & (opac >= ALPHA_MIN) & on_screen
    return ProjectedGaussians(means2d, conics, z, radii, valid, opacities)


@dataclass
class TileBins:
    entry_cams: Tensor  # [E] camera of each visible (camera, Gaussian) entry, by depth
    entry_gaussians: Tensor  # [E] Gaussian index of each entry
    pair_entries: Tensor  # [P] entry of each (tile, entry) pair, sorted by tile then depth
    tile_start: Tensor  # [C * tiles] first pair of each tile
    tile_count: Tensor  # [C * tiles] number of pairs of each tile


def bin_gaussians_to_tiles(
    proj: ProjectedGaussians, tiles_x: int, tiles_y: int, tile_size: int,
) -> TileBins:
    """Assign each visible Gaussian to the tiles its footprint box touches, depth-sorted."""
    with torch.no_grad():
        cams, gaussians = proj.valid.nonzero(as_tuple=True)  # [E] each
        order = torch.argsort(proj.depths.detach()[cams, gaussians], stable=True)
        cams, gaussians = cams[order], gaussians[order]
        centres = proj.means2d.detach()[cams, gaussians]  # [E, 2]
        radii = proj.radii[cams, gaussians]
        max_tile = torch.tensor([tiles_x - 1, tiles_y - 1], device=centres.device)
        lo = torch.floor((centres - radii) / tile_size).long().clamp(min=0)
        lo = torch.minimum(lo, max_tile)
        hi = torch.minimum(torch.floor((centres + radii) / tile_size).long(), max_tile)
        span = hi - lo + 1  # [E, 2]
        counts = span[:, 0] * span[:, 1]
        entries = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
        first = torch.cumsum(counts, 0) - counts
        local = torch.arange(len(entries), device=counts.device) - first[entries]
        tile_x = lo[entries, 0] + local % span[entries, 0]
        tile_y = lo[entries, 1] + local // span[entries, 0]
        tiles = (cams[entries] * tiles_y + tile_y) * tiles_x + tile_x
        tiles_sorted, perm = torch.sort(tiles, stable=True)
        num_tiles = proj.valid.shape[0] * tiles_x * tiles_y
        tile_count = torch.bincount(tiles_sorted, minlength=num_tiles)
        tile_start = torch.cumsum(tile_count, 0) - tile_count
    return TileBins(cams, gaussians, entries[perm], tile_start, tile_count)


def _composite_chunk(
    slot_entries: Tensor,  # [A, K] entry index per slot (A tiles, K Gaussians each)
    slot_valid: Tensor,  # [A, K] bool, False for padding
    pixel_x: Tensor,  # [A, S] pixel-centre x of the tile's columns (S = tile size)
    pixel_y: Tensor,  # [A, S] pixel-centre y of the tile's rows
    transmittance: Tensor,  # [A, S*S] carried in from earlier chunks
    done: Tensor,  # [A, S*S] bool, pixels that stopped compositing
    entries: Tensor,  # [E, 6+F] mean x, mean y, conic a, b, c, log opacity, F features
) -> tuple[Tensor, Tensor]:
    """Composite one depth-sorted chunk of Gaussians over a batch of tiles.

    The features are the colour channels, the depth and a column of ones. Returns their
    weighted sums [A, S*S, F] (the last channel is the total weight, i.e. the transmittance
    used up) and the updated done mask [A, S*S].
    """
    slots = entries.index_select(0, slot_entries.flatten()).view(*slot_entries.shape, -1)
    mean_x, mean_y, conic_a, conic_b, conic_c, log_opac = slots[..., :6].unbind(-1)  # [A, K]
    log_opac = torch.where(slot_valid, log_opac, _EMPTY_LOG_OPACITY)
    dx = pixel_x[:, :, None] - mean_x[:, None, :]  # [A, S, K] along a row
    dy = pixel_y[:, :, None] - mean_y[:, None, :]  # [A, S, K] along a column
    row_term = (log_opac[:, None] - 0.5 * conic_a[:, None] * dx * dx)[:, None]  # [A, 1, S, K]
    col_term = (-0.5 * conic_c[:, None] * dy * dy)[:, :, None]  # [A, S, 1, K]
    cross = (-conic_b[:, None] * dx)[:, None] * dy[:, :, None]  # [A, S, S, K]
    alpha = torch.exp(cross + row_term + col_term).flatten(1, 2)  # [A, S*S, K]
    alpha = torch.where(alpha >= ALPHA_MIN, alpha.clamp(max=ALPHA_MAX), 0.0)
    log_keep = torch.log1p(-alpha)
    log_start = torch.where(done, -math.inf, torch.log(transmittance.clamp(min=1e-30)))
    log_t = log_start[..., None] + torch.cumsum(log_keep, dim=-1)  # after each slot
    used = log_t > _LOG_TRANSMITTANCE_MIN
    weights = torch.where(used, alpha * torch.exp(log_t - log_keep), 0.0)  # [A, S*S, K]
    sums = weights @ slots[..., 6:]  # [A, S*S, F]
    return sums, done | (log_t[..., -1] <= _LOG_TRANSMITTANCE_MIN)


def _composite_tile_batch(
    tile_ids: Tensor,  # [B] tiles composited together
    bins: TileBins,
    entries: Tensor,  # [E, 6+F] packed per-entry parameters, see `_composite_chunk`
    grid: tuple[int, int, int, int, int],  # tiles_x, tiles_y, tile size, width, height
    config: TorchRasterizerConfig,
) -> tuple[Tensor, Tensor]:  # feature sums [B, S*S, D+1], transmittance [B, S*S]
    """Composite every Gaussian of a batch of tiles, chunk by chunk, front to back.

    Tiles leave the working set once their list is consumed or all their pixels are done;
    the chunk grows as the working set shrinks, keeping each step near the evaluation budget.
    """
    tiles_x, tiles_y, size, width, height = grid
    device, dtype = entries.device, entries.dtype
    start, count = bins.tile_start[tile_ids], bins.tile_count[tile_ids]  # [B]
    offsets = torch.arange(size, device=device)
    columns = (tile_ids % tiles_x)[:, None] * size + offsets  # [B, S]
    rows = ((tile_ids // tiles_x) % tiles_y)[:, None] * size + offsets
    done = ((columns >= width)[:, None, :] | (rows >= height)[:, :, None]).flatten(1)  # [B, S*S]
    work = {"position": torch.arange(len(tile_ids), device=device), "start": start,
            "count": count, "pixel_x": columns.to(dtype) + 0.5, "pixel_y": rows.to(dtype) + 0.5,
            "done": done, "transmittance": torch.ones(done.shape, device=device, dtype=dtype),
            "sums": torch.zeros(*done.shape, entries.shape[1] - 7, device=device, dtype=dtype)}
    finished = []
    consumed, last_pair = 0, len(bins.pair_entries) - 1
    track_grad = config.checkpoint and torch.is_grad_enabled() and entries.requires_grad
    while True:
        keep = (work["count"] > consumed) & ~work["done"].all(-1)
        if not bool(keep.all()):
            finished.append({k: v[~keep] for k, v in work.items()})
            work = {k: v[keep] for k, v in work.items()}
        num_active = len(work["position"])
        if num_active == 0:
            break
        chunk = max(config.chunk_size, config.max_evals_per_step // (num_active * size * size))
        chunk = min(chunk, int((work["count"] - consumed).max()))
        slots = consumed + torch.arange(chunk, device=device)
        args = (bins.pair_entries[(work["start"][:, None] + slots).clamp(max=last_pair)],
                slots < work["count"][:, None], work["pixel_x"], work["pixel_y"],
                work["transmittance"], work["done"], entries)
        if track_grad:
            sums, work["done"] = run_checkpointed(_composite_chunk, *args, use_reentrant=False)
        else:
            sums, work["done"] = _composite_chunk(*args)
        work["sums"] = work["sums"] + sums[..., :-1]
        work["transmittance"] = work["transmittance"] - sums[..., -1]
        consumed += chunk
    order = torch.argsort(torch.cat([part["position"] for part in finished]))
    return (torch.cat([part["sums"] for part in finished])[order],
            torch.cat([part["transmittance"] for part in finished])[order])


def rasterize_torch(
    means: Tensor,  # [..., N, 3] world
    quats: Tensor,  # [..., N, 4] (w, x, y, z), normalised inside
    scales: Tensor,  # [..., N, 3] linear
    opacities: Tensor,  # [..., N]
    colors: Tensor,  # [..., N, D] or [..., C, N, D]
    viewmats: Tensor,  # [..., C, 4, 4] world-to-camera, OpenCV convention
    Ks: Tensor,  # [..., C, 3, 3]
    width: int,
    height: int,
    near: float = 0.01,
    far: float = 1e10,
    background: Tensor | None = None,  # [D] or [..., C, D]
    config: TorchRasterizerConfig | None = None,
    rasterize_mode: str = "classic",  # "classic" | "antialiased"
) -> RenderOutput:
    """Render Gaussians into cameras with the tile rasterizer; see the module docstring.

    Batch dims broadcast as `backend.render.inputs` describes; outputs are [..., C, H, W, *].
    Each (batch, camera set) is rendered by its own call: this is the plain reference.
    """
    config = config or TorchRasterizerConfig()
    if config.tile_size < 1 or config.chunk_size < 1 or config.max_evals_per_step < 1:
        raise ValueError(f"TorchRasterizerConfig: sizes must be positive, got {config}")
    batch = broadcast_raster_inputs(means, quats, scales, opacities, colors, viewmats, Ks,
                                    width, height, near, far, background, rasterize_mode)
    outputs = []
    for b in range(batch.viewmats.shape[0]):
        g = batch.gaussian_set(b)
        outputs.append(_rasterize_cameras(
            batch.means[g], batch.quats[g], batch.scales[g], batch.opacities[g],
            batch.colors[b] if batch.colors_per_camera else batch.colors[g],
            batch.viewmats[b], batch.Ks[b], int(width), int(height), near, far,
            None if batch.background is None else batch.background[b],
            rasterize_mode == "antialiased", config))
    return RenderOutput(*(batch.unflatten(torch.stack(parts)) for parts in zip(*outputs)))


def _rasterize_cameras(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4]
    scales: Tensor,  # [N, 3]
    opacities: Tensor,  # [N]
    colors: Tensor,  # [N, D] or [C, N, D]
    viewmats: Tensor,  # [C, 4, 4]
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    near: float,
    far: float,
    background: Tensor | None,  # [C, D]
    antialiased: bool,
    config: TorchRasterizerConfig,
) -> RenderOutput:  # [C, H, W, *]
    proj = project_gaussians(means, quats, scales, opacities, viewmats, Ks, width, height,
                             near, far, antialiased)
    size = config.tile_size
    tiles_x, tiles_y = -(-width // size), -(-height // size)
    bins = bin_gaussians_to_tiles(proj, tiles_x, tiles_y, size)
    cams, gaussians = bins.entry_cams, bins.entry_gaussians
    depths = proj.depths[cams, gaussians]  # [E]
    entries = torch.cat([proj.means2d[cams, gaussians], proj.conics[cams, gaussians],
                         torch.log(proj.opacities[cams, gaussians])[:, None],
                         colors[cams, gaussians] if colors.ndim == 3 else colors[gaussians],
                         depths[:, None], torch.ones_like(depths)[:, None]], dim=-1)  # [E, 6+F]
    num_cams, num_tiles = viewmats.shape[0], viewmats.shape[0] * tiles_x * tiles_y
    tiles_per_batch = max(1, config.max_evals_per_step // (size * size * config.chunk_size))
    pieces = [_composite_tile_batch(torch.arange(first, min(first + tiles_per_batch, num_tiles),
                                                 device=means.device),
                                    bins, entries, (tiles_x, tiles_y, size, width, height),
                                    config)
              for first in range(0, num_tiles, tiles_per_batch)]
    sums, transmittance = (torch.cat(parts) for parts in zip(*pieces, strict=True))
    if len(cams) == 0:  # nothing visible: an empty sum keeps the outputs on the inputs' graph
        sums = sums + entries.sum()

    def to_image(per_tile: Tensor) -> Tensor:  # [C*tiles, S*S, D] -> [C, H, W, D]
        grid = per_tile.reshape(num_cams, tiles_y, tiles_x, size, size, -1)
        image = grid.permute(0, 1, 3, 2, 4, 5).reshape(num_cams, tiles_y * size,
                                                       tiles_x * size, -1)
        return image[:, :height, :width]

    transmittance = to_image(transmittance[..., None])  # [C, H, W, 1]
    alpha = 1.0 - transmittance
    channels = colors.shape[-1]
    rgb = to_image(sums[..., :channels])
    if background is not None:
        rgb = rgb + transmittance * background[:, None, None, :]
    depth = to_image(sums[..., channels:]) / alpha.clamp(min=1e-10)
    return RenderOutput(rgb=rgb, alpha=alpha, depth=depth)
