"""Numba kernels: tile binning, front-to-back compositing and its backward pass.

Projected pairs (`cpu_project.project_all`: proj [I, N, 12], valid [I, N]) are binned: each
kept Gaussian is appended, in index order, to every tile whose pixel centres its alpha >=
1/255 box covers (counted, then filled, over chunks of Gaussians in parallel), and each
tile's run is then sorted by depth (stable, so ties keep index order; tiles in parallel).
Tiles are composited in parallel. Inside a tile the loop runs Gaussian by
Gaussian over just the pixels of its ellipse that lie between each row's first and last
still-compositing pixel (the torch twin evaluates whole tiles): a pixel stops once its
transmittance would fall to 1e-4 or below, the tile once all its pixels have.

The backward pass walks each tile front to back again, recomputing the transmittance (no
division by 1 - alpha), and uses the final feature sums to get the light behind each
Gaussian: dL/dalpha_k = sum_f g_f (feat_kf T_k - behind_kf / (1 - alpha_k)) - g_T T / (1 -
alpha_k), with the sums over f taken once per pixel (sum_f g_f S_f) and per Gaussian.
Gradients land in rows per (image, Gaussian), without races: one image per thread when a
call has many images, else one tile per thread and a set of rows per thread.

Features per Gaussian are its D colour channels and its depth z (F = D + 1 columns of `sums`).

Kernels here and in `cpu_project` compile with numpy's error model: a division by zero gives
inf or nan instead of raising (none happens on kept pairs), which spares every division a
branch and lets numba drop the reference counting of array arguments in the per-pair helpers.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

from backend.render.cpu_project import ALPHA_MIN

ALPHA_MAX = 0.99
TRANSMITTANCE_MIN = 1e-4
GRAD_COLUMNS = 6  # centre x, y, conic a, b, c, opacity; then the F feature columns


@njit(cache=True, error_model="numpy", inline="always")
def proj_entry(proj, i, n):
    """Pair (image i, Gaussian n)'s projection as a tuple of its 12 values: unlike a view
    `proj[i, n]`, it costs no reference counting in the per-pair loops."""
    return (proj[i, n, 0], proj[i, n, 1], proj[i, n, 2], proj[i, n, 3], proj[i, n, 4],
            proj[i, n, 5], proj[i, n, 6], proj[i, n, 7], proj[i, n, 8], proj[i, n, 9],
            proj[i, n, 10], proj[i, n, 11])


@njit(cache=True, error_model="numpy", inline="always")
def pixel_box(proj_row, x0, y0, x1, y1):  # proj_row (12) -> pixel range [lo, hi) clipped
    col_lo = max(x0, math.ceil(proj_row[0] - proj_row[7] - 0.5))
    col_hi = min(x1, math.floor(proj_row[0] + proj_row[7] - 0.5) + 1)
    row_lo = max(y0, math.ceil(proj_row[1] - proj_row[8] - 0.5))
    row_hi = min(y1, math.floor(proj_row[1] + proj_row[8] - 0.5) + 1)
    return col_lo, col_hi, row_lo, row_hi


@njit(cache=True, error_model="numpy", inline="always")
def row_span(row, dy, c0, c1):  # columns [lo, hi) of row dy inside the alpha ellipse
    """The ellipse 0.5 (a dx^2 + c dy^2) + b dx dy <= log(255 opacity) (alpha >= 1/255) cut by
    one pixel row, widened by 1e-3 px against rounding."""
    a, b, c = row[2], row[3], row[4]
    disc = b * b * dy * dy - a * (c * dy * dy - 2.0 * row[9])
    if disc < 0.0:
        return c0, c0
    half, mid = math.sqrt(disc) * row[11], row[0] - b * dy * row[11] - 0.5
    return (max(c0, math.ceil(mid - half - 1e-3)),
            min(c1, math.floor(mid + half + 1e-3) + 1))


@njit(cache=True, error_model="numpy", inline="always")
def row_gaussian_start(row, dx, dy):
    """exp(-power) at the row's first pixel and its ratio to the next pixel's: along a row the
    power is quadratic in dx, so the Gaussian is two multiplies per pixel (g *= r, r *= exp(-a))
    instead of an exp. The blur bounds the conic (a <= 1/0.3), so nothing under- or overflows
    inside the ellipse."""
    a, b = row[2], row[3]
    power = 0.5 * (a * dx * dx + row[4] * dy * dy) + b * dx * dy
    return math.exp(-power), math.exp(-(a * dx + 0.5 * a + b * dy))


@njit(cache=True, error_model="numpy", inline="always")
def tile_box(proj, i, n, tile_size, width, height):
    """Tiles (x first, x last, y first, y last) whose pixel centres pair (i, n)'s alpha >= 1/255
    box covers; x last < x first when it covers none."""
    c0, c1, r0, r1 = pixel_box(proj_entry(proj, i, n), 0, 0, width, height)
    if c0 >= c1 or r0 >= r1:
        return 0, -1, 0, -1
    return c0 // tile_size, (c1 - 1) // tile_size, r0 // tile_size, (r1 - 1) // tile_size


@njit(cache=True, error_model="numpy", parallel=True)
def count_pairs(proj, valid, tile_size, tiles_x, width, height, chunk, boxes, chunk_counts):
    """boxes [I, N, 4] (int32): the tile box of every kept pair (see `tile_box`; empty for the
    others), and chunk_counts [I, C, tiles] (zeroed): pairs per tile from the Gaussians
    [c chunk, (c + 1) chunk) of image i. Work items are (image, chunk)."""
    n_total, chunks = valid.shape[1], chunk_counts.shape[1]
    for job in prange(valid.shape[0] * chunks):
        i, c = job // chunks, job % chunks
        for n in range(c * chunk, min((c + 1) * chunk, n_total)):
            tx0, tx1, ty0, ty1 = 0, -1, 0, -1
            if valid[i, n]:
                tx0, tx1, ty0, ty1 = tile_box(proj, i, n, tile_size, width, height)
            boxes[i, n, 0], boxes[i, n, 1], boxes[i, n, 2], boxes[i, n, 3] = tx0, tx1, ty0, ty1
            for ty in range(ty0, ty1 + 1):
                for tx in range(tx0, tx1 + 1):
                    chunk_counts[i, c, ty * tiles_x + tx] += 1


@njit(cache=True, error_model="numpy", parallel=True)
def fill_pairs(proj, boxes, tiles_x, chunk, chunk_start, pairs, depths):
    """pairs [P] (Gaussian index) and depths [P] per (tile, Gaussian) pair, each chunk's pairs
    of a tile from chunk_start [I, C, tiles] on, in index order (so chunk after chunk each
    tile's run is in index order)."""
    n_total, chunks = boxes.shape[1], chunk_start.shape[1]
    for job in prange(boxes.shape[0] * chunks):
        i, c = job // chunks, job % chunks
        cursor = chunk_start[i, c].copy()
        for n in range(c * chunk, min((c + 1) * chunk, n_total)):
            depth = proj[i, n, 6]
            for ty in range(boxes[i, n, 2], boxes[i, n, 3] + 1):
                for tx in range(boxes[i, n, 0], boxes[i, n, 1] + 1):
                    at = cursor[ty * tiles_x + tx]
                    pairs[at], depths[at] = n, depth
                    cursor[ty * tiles_x + tx] = at + 1


@njit(cache=True, error_model="numpy")
def _sort_run(keys, values, bits):
    """Stable sort of values [M] (int32) by keys [M] (uint64 below 2**bits), in place:
    insertion sort for short runs, else LSD radix by bytes, skipping bytes every key shares."""
    m = keys.shape[0]
    if m <= 48:
        for j in range(1, m):
            key, value, k = keys[j], values[j], j - 1
            while k >= 0 and keys[k] > key:
                keys[k + 1], values[k + 1] = keys[k], values[k]
                k -= 1
            keys[k + 1], values[k + 1] = key, value
        return
    src_k, src_v = keys, values
    dst_k, dst_v = np.empty_like(keys), np.empty_like(values)
    counts = np.empty(257, np.int64)
    swapped = False
    for shift in range(0, bits, 8):
        counts[:] = 0
        for j in range(m):
            counts[((src_k[j] >> shift) & 255) + 1] += 1
        if counts.max() == m:
            continue
        for d in range(1, 257):
            counts[d] += counts[d - 1]
        for j in range(m):
            d = (src_k[j] >> shift) & 255
            dst_k[counts[d]], dst_v[counts[d]] = src_k[j], src_v[j]
            counts[d] += 1
        src_k, dst_k, src_v, dst_v = dst_k, src_k, dst_v, src_v
        swapped = not swapped
    if swapped:
        values[:] = src_v


@njit(cache=True, error_model="numpy", parallel=True)
def sort_tiles(tile_start, pairs, depth_bits):
    """Each tile's run of pairs stably sorted by depth (depth_bits [P]: the depths' IEEE bits
    as unsigned integers, which sort like the positive depths)."""
    bits = depth_bits.itemsize * 8
    for tile in prange(tile_start.shape[0] - 1):
        first, last = tile_start[tile], tile_start[tile + 1]
        if last - first > 1:
            _sort_run(depth_bits[first:last].astype(np.uint64), pairs[first:last], bits)


@njit(cache=True, error_model="numpy", inline="always")
def tile_origin(tile, tiles_x, tiles_y, tile_size, width, height):
    i, local = tile // (tiles_x * tiles_y), tile % (tiles_x * tiles_y)
    x0, y0 = (local % tiles_x) * tile_size, (local // tiles_x) * tile_size
    return i, x0, y0, min(x0 + tile_size, width), min(y0 + tile_size, height)


@njit(cache=True, error_model="numpy", fastmath=True)
def _pair_forward(row, feat, rank, x0, y0, x1, y1, tile_size, local_t, local_sums, local_stop,
                  live_lo, live_hi):
    """Composite one Gaussian (projection row (12), features feat [F]) at place `rank` of a
    tile's run into the tile's per-pixel state; returns how many pixels it stopped. Per tile
    row only the columns [live_lo, live_hi) between its first and last still-compositing pixel
    are visited, and the bounds move inwards as pixels at them stop."""
    stopped = 0
    c0, c1, r0, r1 = pixel_box(row, x0, y0, x1, y1)
    for y in range(r0, r1):
        ly = y - y0
        lo, hi = max(c0, live_lo[ly]), min(c1, live_hi[ly])
        if lo >= hi:
            continue
        dy = y + 0.5 - row[1]
        s0, s1 = row_span(row, dy, lo, hi)
        g, ratio = row_gaussian_start(row, s0 + 0.5 - row[0], dy)
        row_stopped = False
        for x in range(s0, s1):
            gaussian = g
            g *= ratio
            ratio *= row[10]
            p = ly * tile_size + (x - x0)
            if local_stop[p] >= 0:
                continue
            alpha = row[5] * gaussian
            if alpha < ALPHA_MIN:
                continue
            alpha = min(alpha, ALPHA_MAX)
            t = local_t[p]
            after = t * (1.0 - alpha)
            if after <= TRANSMITTANCE_MIN:
                local_stop[p] = rank
                row_stopped = True
                stopped += 1
                continue
            weight = alpha * t
            for ch in range(feat.shape[0]):
                local_sums[p, ch] += weight * feat[ch]
            local_t[p] = after
        if row_stopped:
            lo, hi = live_lo[ly], live_hi[ly]
            while lo < hi and local_stop[ly * tile_size + lo - x0] >= 0:
                lo += 1
            while hi > lo and local_stop[ly * tile_size + hi - 1 - x0] >= 0:
                hi -= 1
            live_lo[ly], live_hi[ly] = lo, hi
    return stopped


@njit(cache=True, error_model="numpy", fastmath=True)
def forward_tile(tile, proj, colors, cams_per_set, colors_per_camera, tile_start, pairs,
                 tile_size, tiles_x, tiles_y, sums, transmittance, stops):
    """Composite one tile front to back in tile-local state, then write its pixels."""
    height, width, features = sums.shape[1:]
    num_sets = colors.shape[0] if not colors_per_camera else 1
    i, x0, y0, x1, y1 = tile_origin(tile, tiles_x, tiles_y, tile_size, width, height)
    target = i if colors_per_camera else (i // cams_per_set if num_sets > 1 else 0)
    first, last = tile_start[tile], tile_start[tile + 1]
    local_t = np.ones(tile_size * tile_size)
    local_sums = np.zeros((tile_size * tile_size, features))
    local_stop = np.full(tile_size * tile_size, -1, np.int64)  # -1: still compositing
    live_lo, live_hi = np.full(y1 - y0, x0), np.full(y1 - y0, x1)
    active = (x1 - x0) * (y1 - y0)
    feat = np.empty(features)
    for k in range(first, last):
        n = pairs[k]
        row = proj_entry(proj, i, n)
        for ch in range(features - 1):
            feat[ch] = colors[target, n, ch]
        feat[features - 1] = row[6]
        active -= _pair_forward(row, feat, k - first, x0, y0, x1, y1, tile_size, local_t,
                                local_sums, local_stop, live_lo, live_hi)
        if active == 0:
            break
    for y in range(y0, y1):
        for x in range(x0, x1):
            p = (y - y0) * tile_size + (x - x0)
            transmittance[i, y, x] = local_t[p]
            stops[i, y, x] = local_stop[p] if local_stop[p] >= 0 else last - first
            for ch in range(features):
                sums[i, y, x, ch] = local_sums[p, ch]


@njit(cache=True, error_model="numpy", parallel=True)
def composite_forward(proj, colors, cams_per_set, colors_per_camera, tile_start, pairs,
                      tile_size, tiles_x, tiles_y, sums, transmittance, stops):
    """Composite every tile: sums [I, H, W, F] (float64), transmittance [I, H, W] (float64)
    and stops [I, H, W] (int32, pairs of the tile's run a pixel used) are written in place.

    colors [I, N, D] with per-camera colours, else [G, N, D].
    """
    for tile in prange(tile_start.shape[0] - 1):
        forward_tile(tile, proj, colors, cams_per_set, colors_per_camera, tile_start, pairs,
                     tile_size, tiles_x, tiles_y, sums, transmittance, stops)


@njit(cache=True, error_model="numpy", fastmath=True)
def _backward_tile_state(i, x0, y0, x1, y1, tile_size, sums, transmittance, stops, grad_sums,
                         grad_transmittance):
    """Per pixel of a tile: sum_f g_f S_f + g_T T, the gradient-weighted light behind the first
    Gaussian; and the most pairs any of its pixels used."""
    behind_all = np.zeros(tile_size * tile_size)
    used = 0
    for y in range(y0, y1):
        for x in range(x0, x1):
            total = grad_transmittance[i, y, x] * transmittance[i, y, x]
            for ch in range(sums.shape[3]):
                total += grad_sums[i, y, x, ch] * sums[i, y, x, ch]
            behind_all[(y - y0) * tile_size + (x - x0)] = total
            used = max(used, stops[i, y, x])
    return behind_all, used


@njit(cache=True, error_model="numpy", fastmath=True)
def _pair_backward(row, feat, rank, i, x0, y0, x1, y1, tile_size, stops, live_lo, live_hi,
                   local_t, behind_all, in_front, grad_sums, acc):
    """One Gaussian (projection row (12), features feat [F]) at place `rank` of a tile's run:
    advance the tile's per-pixel state and write its gradients (see GRAD_COLUMNS) to acc
    [6+F]; returns whether it reached a pixel (else acc is zero). Per tile row only the
    columns [live_lo, live_hi) between its first and last pixel that used this place are
    visited; the bounds move inwards as the rank passes their pixels' stops."""
    features = feat.shape[0]
    for c in range(acc.shape[0]):
        acc[c] = 0.0
    reached = False
    c0, c1, r0, r1 = pixel_box(row, x0, y0, x1, y1)
    for y in range(r0, r1):
        ly = y - y0
        lo, hi = live_lo[ly], live_hi[ly]
        while lo < hi and rank >= stops[i, y, lo]:
            lo += 1
        while hi > lo and rank >= stops[i, y, hi - 1]:
            hi -= 1
        live_lo[ly], live_hi[ly] = lo, hi
        lo, hi = max(c0, lo), min(c1, hi)
        if lo >= hi:
            continue
        dy = y + 0.5 - row[1]
        s0, s1 = row_span(row, dy, lo, hi)
        g, ratio = row_gaussian_start(row, s0 + 0.5 - row[0], dy)
        for x in range(s0, s1):
            gaussian = g
            g *= ratio
            ratio *= row[10]
            if rank >= stops[i, y, x]:
                continue
            visible = row[5] * gaussian
            if visible < ALPHA_MIN:
                continue
            alpha = min(visible, ALPHA_MAX)
            p = (y - y0) * tile_size + (x - x0)
            reached = True
            t, keep = local_t[p], 1.0 - alpha
            weight = alpha * t
            g_feat = 0.0  # sum_f g_f feat_f
            for ch in range(features):
                gs = grad_sums[i, y, x, ch]
                g_feat += gs * feat[ch]
                acc[GRAD_COLUMNS + ch] += gs * weight
            own = g_feat * weight
            d_alpha = g_feat * t - (behind_all[p] - in_front[p] - own) / keep
            in_front[p] += own
            local_t[p] = t * keep
            if visible <= ALPHA_MAX:
                dx = x + 0.5 - row[0]
                d_power = -d_alpha * visible
                acc[0] -= d_power * (row[2] * dx + row[3] * dy)
                acc[1] -= d_power * (row[3] * dx + row[4] * dy)
                acc[2] += d_power * 0.5 * dx * dx
                acc[3] += d_power * dx * dy
                acc[4] += d_power * 0.5 * dy * dy
                acc[5] += d_alpha * gaussian  # d visible / d opacity
    return reached


@njit(cache=True, error_model="numpy", fastmath=True)
def backward_tile(tile, proj, colors, cams_per_set, colors_per_camera, tile_start, pairs,
                  tile_size, tiles_x, tiles_y, sums, transmittance, stops, grad_sums,
                  grad_transmittance, out, by_entry):
    """Add one tile's gradients (see GRAD_COLUMNS) for Gaussian n of image i to out[s, i, n],
    s = 0 with `by_entry` (one thread per image), else the calling thread's id."""
    height, width, features = sums.shape[1:]
    channels = features - 1
    num_sets = colors.shape[0] if not colors_per_camera else 1
    i, x0, y0, x1, y1 = tile_origin(tile, tiles_x, tiles_y, tile_size, width, height)
    target = i if colors_per_camera else (i // cams_per_set if num_sets > 1 else 0)
    first = tile_start[tile]
    local_t = np.ones(tile_size * tile_size)
    behind_all, used = _backward_tile_state(i, x0, y0, x1, y1, tile_size, sums, transmittance,
                                            stops, grad_sums, grad_transmittance)
    in_front = np.zeros(tile_size * tile_size)  # behind_all's part in front of the Gaussian
    live_lo, live_hi = np.full(y1 - y0, x0), np.full(y1 - y0, x1)
    feat, acc = np.empty(features), np.empty(GRAD_COLUMNS + features)
    slot = 0 if by_entry else numba.get_thread_id()
    for k in range(first, first + used):
        n = pairs[k]
        row = proj_entry(proj, i, n)
        for ch in range(channels):
            feat[ch] = colors[target, n, ch]
        feat[channels] = row[6]
        if _pair_backward(row, feat, k - first, i, x0, y0, x1, y1, tile_size, stops, live_lo,
                          live_hi, local_t, behind_all, in_front, grad_sums, acc):
            for c in range(acc.shape[0]):
                out[slot, i, n, c] += acc[c]


@njit(cache=True, error_model="numpy", parallel=True)
def composite_backward(proj, colors, cams_per_set, colors_per_camera, tile_start, pairs,
                       tile_size, tiles_x, tiles_y, sums, transmittance, stops, grad_sums,
                       grad_transmittance, out, by_entry):
    """Gradients from grad_sums [I, H, W, F] and grad_transmittance [I, H, W], given the
    forward's outputs, added to out [S, I, N, 6+F] (zeroed), which the caller sums over S:
    with `by_entry` one image per thread and S = 1 (for calls with many images), else one tile
    per thread and a slot per thread (S = number of threads), so no two threads share a row."""
    num_tiles = tile_start.shape[0] - 1
    args = (proj, colors, cams_per_set, colors_per_camera, tile_start, pairs, tile_size,
            tiles_x, tiles_y, sums, transmittance, stops, grad_sums, grad_transmittance, out,
            by_entry)
    if by_entry:
        tiles = num_tiles // sums.shape[0]
        for i in prange(sums.shape[0]):
            for tile in range(i * tiles, (i + 1) * tiles):
                backward_tile(tile, *args)
    else:
        for tile in prange(num_tiles):
            backward_tile(tile, *args)
