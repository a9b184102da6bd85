"""Numba kernels: EWA projection of Gaussians into cameras, forward and hand-written backward.

The maths is the torch twin's (`torch_rasterizer.project_gaussians`), one (image, Gaussian)
pair at a time: camera point p = R m + t, perspective Jacobian J at the frustum-clamped
tangent, T = J R Rq diag(s) (2x3), cov2d = T T^T + 0.3 I, conic = cov2d^-1, optional
antialiasing compensation sqrt(det(T T^T) / det(cov2d)) on the opacity, and the box of
alpha >= 1/255 around the projected centre. Images are the flattened (batch, camera) pairs;
image i reads Gaussian set `i // C` when there is one set per batch entry, else set 0.

Per-entry layout (`proj [I, N, PROJ_WIDTH]`): centre x, y; conic a, b, c; effective opacity;
depth z; box half extents x, y; then for the compositing loops log(255 opacity) (the power at
which alpha reaches 1/255), exp(-a) and 1/a. `valid [I, N]` marks kept pairs.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

ALPHA_MIN = 1.0 / 255.0
BLUR_EPS = 0.3
FRUSTUM_MARGIN = 0.3
PROJ_WIDTH = 12


@njit(cache=True, error_model="numpy", inline="always")
def quat_to_rotation(qw, qx, qy, qz):  # normalised (w, x, y, z) -> row-major 3x3 entries
    return (1 - 2 * (qy * qy + qz * qz), 2 * (qx * qy - qw * qz), 2 * (qx * qz + qw * qy),
            2 * (qx * qy + qw * qz), 1 - 2 * (qx * qx + qz * qz), 2 * (qy * qz - qw * qx),
            2 * (qx * qz - qw * qy), 2 * (qy * qz + qw * qx), 1 - 2 * (qx * qx + qy * qy))


@njit(cache=True, error_model="numpy", inline="always")
def normalised_quat(quats, g, n):  # quats [G, N, 4] -> (w, x, y, z), 1/|q|
    qw, qx, qy, qz = quats[g, n, 0], quats[g, n, 1], quats[g, n, 2], quats[g, n, 3]
    inv = 1.0 / max(math.sqrt(qw * qw + qx * qx + qy * qy + qz * qz), 1e-12)
    return qw * inv, qx * inv, qy * inv, qz * inv, inv


@njit(cache=True, error_model="numpy", inline="always")
def camera_point(means, viewmats, g, n, i):  # means [G, N, 3], viewmats [I, 4, 4]
    m0, m1, m2 = means[g, n, 0], means[g, n, 1], means[g, n, 2]
    return (viewmats[i, 0, 0] * m0 + viewmats[i, 0, 1] * m1 + viewmats[i, 0, 2] * m2
            + viewmats[i, 0, 3],
            viewmats[i, 1, 0] * m0 + viewmats[i, 1, 1] * m1 + viewmats[i, 1, 2] * m2
            + viewmats[i, 1, 3],
            viewmats[i, 2, 0] * m0 + viewmats[i, 2, 1] * m1 + viewmats[i, 2, 2] * m2
            + viewmats[i, 2, 3])


@njit(cache=True, error_model="numpy", inline="always")
def clamped_tangents(x, y, z, Ks, i, width, height):  # -> tan_x, tan_y, unclamped x, y
    fx, fy, cx, cy = Ks[i, 0, 0], Ks[i, 1, 1], Ks[i, 0, 2], Ks[i, 1, 2]
    margin_x, margin_y = FRUSTUM_MARGIN * 0.5 * width / fx, FRUSTUM_MARGIN * 0.5 * height / fy
    lo_x, hi_x = -cx / fx - margin_x, (width - cx) / fx + margin_x
    lo_y, hi_y = -cy / fy - margin_y, (height - cy) / fy + margin_y
    tx, ty = x / z, y / z
    return (min(max(tx, lo_x), hi_x), min(max(ty, lo_y), hi_y),
            lo_x < tx < hi_x, lo_y < ty < hi_y)


@njit(cache=True, error_model="numpy", inline="always")
def jacobian_rows(z, tan_x, tan_y, viewmats, Ks, i):  # A = J R_view, rows a0, a1 (2x3)
    jx, jy = Ks[i, 0, 0] / z, Ks[i, 1, 1] / z
    v = viewmats
    return (jx * (v[i, 0, 0] - tan_x * v[i, 2, 0]), jx * (v[i, 0, 1] - tan_x * v[i, 2, 1]),
            jx * (v[i, 0, 2] - tan_x * v[i, 2, 2]),
            jy * (v[i, 1, 0] - tan_y * v[i, 2, 0]), jy * (v[i, 1, 1] - tan_y * v[i, 2, 1]),
            jy * (v[i, 1, 2] - tan_y * v[i, 2, 2]))


@njit(cache=True, error_model="numpy", inline="always")
def half_covariance(a, r, s):  # a: 2x3 rows, r: 3x3 rotation, s: scales -> U = A Rq, T = U S
    u = (a[0] * r[0] + a[1] * r[3] + a[2] * r[6], a[0] * r[1] + a[1] * r[4] + a[2] * r[7],
         a[0] * r[2] + a[1] * r[5] + a[2] * r[8], a[3] * r[0] + a[4] * r[3] + a[5] * r[6],
         a[3] * r[1] + a[4] * r[4] + a[5] * r[7], a[3] * r[2] + a[4] * r[5] + a[5] * r[8])
    return u, (u[0] * s[0], u[1] * s[1], u[2] * s[2], u[3] * s[0], u[4] * s[1], u[5] * s[2])


@njit(cache=True, error_model="numpy", inline="always")
def project_one(means, quats, scales, opacities, viewmats, Ks, g, n, i, width, height,
                near, far, antialiased, proj):
    """Project Gaussian (g, n) into image i; fill proj[i, n] (12) and return whether it is
    kept. Arrays are indexed element by element: a view per pair would cost reference
    counting."""
    x, y, z = camera_point(means, viewmats, g, n, i)
    if not (near <= z <= far):
        return False
    tan_x, tan_y, _, _ = clamped_tangents(x, y, z, Ks, i, width, height)
    a = jacobian_rows(z, tan_x, tan_y, viewmats, Ks, i)
    qw, qx, qy, qz, _ = normalised_quat(quats, g, n)
    r = quat_to_rotation(qw, qx, qy, qz)
    s = (scales[g, n, 0], scales[g, n, 1], scales[g, n, 2])
    _, t = half_covariance(a, r, s)
    cov_a = t[0] * t[0] + t[1] * t[1] + t[2] * t[2] + BLUR_EPS
    cov_b = t[0] * t[3] + t[1] * t[4] + t[2] * t[5]
    cov_c = t[3] * t[3] + t[4] * t[4] + t[5] * t[5] + BLUR_EPS
    det = cov_a * cov_c - cov_b * cov_b
    if not det > 0:
        return False
    opacity = opacities[g, n]
    if antialiased:
        ratio = ((cov_a - BLUR_EPS) * (cov_c - BLUR_EPS) - cov_b * cov_b) / det
        opacity = opacity * math.sqrt(ratio) if ratio > 0 else 0.0
    if not opacity >= ALPHA_MIN:
        return False
    mx = Ks[i, 0, 0] * x / z + Ks[i, 0, 2]
    my = Ks[i, 1, 1] * y / z + Ks[i, 1, 2]
    extent = math.sqrt(2.0 * math.log(opacity / ALPHA_MIN))
    rx, ry = extent * math.sqrt(cov_a) * 1.001 + 0.01, extent * math.sqrt(cov_c) * 1.001 + 0.01
    if mx + rx <= 0 or mx - rx >= width or my + ry <= 0 or my - ry >= height:
        return False
    conic_a = cov_c / det
    proj[i, n, 0], proj[i, n, 1] = mx, my
    proj[i, n, 2], proj[i, n, 3], proj[i, n, 4] = conic_a, -cov_b / det, cov_a / det
    proj[i, n, 5], proj[i, n, 6], proj[i, n, 7], proj[i, n, 8] = opacity, z, rx, ry
    proj[i, n, 9], proj[i, n, 10] = 0.5 * extent * extent, math.exp(-conic_a)
    proj[i, n, 11] = 1.0 / conic_a
    return True


BLOCK = 256  # Gaussians per parallel work item


@njit(cache=True, error_model="numpy")
def _project_block(means, quats, scales, opacities, viewmats, Ks, g, i, first, last, width,
                   height, near, far, antialiased, proj, valid):
    for n in range(first, last):
        valid[i, n] = project_one(means, quats, scales, opacities, viewmats, Ks, g, n, i,
                                  width, height, near, far, antialiased, proj)


@njit(cache=True, error_model="numpy", parallel=True)
def project_all(means, quats, scales, opacities, viewmats, Ks, cams_per_set, width, height,
                near, far, antialiased, proj, valid):
    """Every (image, Gaussian) pair: proj [I, N, 12], valid [I, N] (uint8) filled in place.

    means [G, N, 3], quats [G, N, 4], scales [G, N, 3], opacities [G, N], viewmats [I, 4, 4],
    Ks [I, 3, 3]; image i uses Gaussian set i // cams_per_set when G > 1. Work items are
    blocks of Gaussians of one image, projected by a serial (fully inlined) loop.
    """
    num_images, n_total = valid.shape
    num_sets = means.shape[0]
    num_blocks = (n_total + BLOCK - 1) // BLOCK
    for job in prange(num_images * num_blocks):
        i, first = job // num_blocks, (job % num_blocks) * BLOCK
        g = i // cams_per_set if num_sets > 1 else 0
        _project_block(means, quats, scales, opacities, viewmats, Ks, g, i, first,
                       min(first + BLOCK, n_total), width, height, near, far, antialiased,
                       proj, valid)


@njit(cache=True, error_model="numpy", inline="always")
def rotation_backward(qw, qx, qy, qz, gr):  # gr: dL/dRq (row-major 9) -> dL/dq (normalised)
    return (2 * (-qz * gr[1] + qy * gr[2] + qz * gr[3] - qx * gr[5] - qy * gr[6] + qx * gr[7]),
            2 * (qy * gr[1] + qz * gr[2] + qy * gr[3] - 2 * qx * gr[4] - qw * gr[5]
                 + qz * gr[6] + qw * gr[7] - 2 * qx * gr[8]),
            2 * (-2 * qy * gr[0] + qx * gr[1] + qw * gr[2] + qx * gr[3] + qz * gr[5]
                 - qw * gr[6] + qz * gr[7] - 2 * qy * gr[8]),
            2 * (-2 * qz * gr[0] - qw * gr[1] + qx * gr[2] + qw * gr[3] - 2 * qz * gr[4]
                 + qy * gr[5] + qx * gr[6] + qy * gr[7]))


@njit(cache=True, error_model="numpy", inline="always")
def covariance_backward(cov_a, cov_b, cov_c, opacity, grad, antialiased):
    """dL/d(cov_a, cov_b, cov_c) and dL/d(raw opacity) from dL/d(conic, effective opacity)."""
    det = cov_a * cov_c - cov_b * cov_b
    k = (grad[2] * cov_c - grad[3] * cov_b + grad[4] * cov_a) / (det * det)
    d_a, d_b, d_c = grad[4] / det - k * cov_c, -grad[3] / det + 2 * cov_b * k, \
        grad[2] / det - k * cov_a
    if not antialiased:
        return d_a, d_b, d_c, grad[5]
    ratio = ((cov_a - BLUR_EPS) * (cov_c - BLUR_EPS) - cov_b * cov_b) / det
    comp = math.sqrt(ratio)
    d_ratio = grad[5] * opacity * 0.5 / comp / det
    return (d_a + d_ratio * (cov_c - BLUR_EPS - ratio * cov_c),
            d_b + d_ratio * 2 * cov_b * (ratio - 1),
            d_c + d_ratio * (cov_a - BLUR_EPS - ratio * cov_a), grad[5] * comp)


@njit(cache=True, error_model="numpy", inline="always")
def project_one_backward(means, quats, scales, opacities, viewmats, Ks, g, n, i, width, height,
                         antialiased, grad, d_means, d_quats, d_scales, d_opacities):
    """Add the gradients of kept pair (image i, Gaussian (g, n)) to the d_* arrays.

    grad [7]: dL/d(centre x, centre y, conic a, b, c, effective opacity, depth z).
    """
    x, y, z = camera_point(means, viewmats, g, n, i)
    tan_x, tan_y, free_x, free_y = clamped_tangents(x, y, z, Ks, i, width, height)
    a = jacobian_rows(z, tan_x, tan_y, viewmats, Ks, i)
    qw, qx, qy, qz, inv_norm = normalised_quat(quats, g, n)
    r = quat_to_rotation(qw, qx, qy, qz)
    s = (scales[g, n, 0], scales[g, n, 1], scales[g, n, 2])
    u, t = half_covariance(a, r, s)
    cov_a = t[0] * t[0] + t[1] * t[1] + t[2] * t[2] + BLUR_EPS
    cov_b = t[0] * t[3] + t[1] * t[4] + t[2] * t[5]
    cov_c = t[3] * t[3] + t[4] * t[4] + t[5] * t[5] + BLUR_EPS
    d_a, d_b, d_c, d_opacity = covariance_backward(
        cov_a, cov_b, cov_c, opacities[g, n], grad, antialiased)
    d_opacities[g, n] += d_opacity
    # T = U diag(s) with U = A Rq; cov_a = |T0|^2, cov_b = T0.T1, cov_c = |T1|^2 (+ blur)
    dt = (2 * d_a * t[0] + d_b * t[3], 2 * d_a * t[1] + d_b * t[4], 2 * d_a * t[2] + d_b * t[5],
          2 * d_c * t[3] + d_b * t[0], 2 * d_c * t[4] + d_b * t[1], 2 * d_c * t[5] + d_b * t[2])
    d_scales[g, n, 0] += dt[0] * u[0] + dt[3] * u[3]
    d_scales[g, n, 1] += dt[1] * u[1] + dt[4] * u[4]
    d_scales[g, n, 2] += dt[2] * u[2] + dt[5] * u[5]
    du = (dt[0] * s[0], dt[1] * s[1], dt[2] * s[2], dt[3] * s[0], dt[4] * s[1], dt[5] * s[2])
    gr = (a[0] * du[0] + a[3] * du[3], a[0] * du[1] + a[3] * du[4], a[0] * du[2] + a[3] * du[5],
          a[1] * du[0] + a[4] * du[3], a[1] * du[1] + a[4] * du[4], a[1] * du[2] + a[4] * du[5],
          a[2] * du[0] + a[5] * du[3], a[2] * du[1] + a[5] * du[4], a[2] * du[2] + a[5] * du[5])
    ga = (du[0] * r[0] + du[1] * r[1] + du[2] * r[2], du[0] * r[3] + du[1] * r[4] + du[2] * r[5],
          du[0] * r[6] + du[1] * r[7] + du[2] * r[8], du[3] * r[0] + du[4] * r[1] + du[5] * r[2],
          du[3] * r[3] + du[4] * r[4] + du[5] * r[5], du[3] * r[6] + du[4] * r[7] + du[5] * r[8])
    dq = rotation_backward(qw, qx, qy, qz, gr)
    dot = qw * dq[0] + qx * dq[1] + qy * dq[2] + qz * dq[3]
    d_quats[g, n, 0] += (dq[0] - qw * dot) * inv_norm
    d_quats[g, n, 1] += (dq[1] - qx * dot) * inv_norm
    d_quats[g, n, 2] += (dq[2] - qy * dot) * inv_norm
    d_quats[g, n, 3] += (dq[3] - qz * dot) * inv_norm
    v, fx, fy = viewmats, Ks[i, 0, 0], Ks[i, 1, 1]
    d_z = grad[6] - (ga[0] * a[0] + ga[1] * a[1] + ga[2] * a[2]
                     + ga[3] * a[3] + ga[4] * a[4] + ga[5] * a[5]) / z
    d_tan_x = -fx / z * (ga[0] * v[i, 2, 0] + ga[1] * v[i, 2, 1] + ga[2] * v[i, 2, 2])
    d_tan_y = -fy / z * (ga[3] * v[i, 2, 0] + ga[4] * v[i, 2, 1] + ga[5] * v[i, 2, 2])
    d_x, d_y = grad[0] * fx / z, grad[1] * fy / z
    d_z -= (grad[0] * fx * x + grad[1] * fy * y) / (z * z)
    if free_x:
        d_x += d_tan_x / z
        d_z -= d_tan_x * x / (z * z)
    if free_y:
        d_y += d_tan_y / z
        d_z -= d_tan_y * y / (z * z)
    for k in range(3):
        d_means[g, n, k] += v[i, 0, k] * d_x + v[i, 1, k] * d_y + v[i, 2, k] * d_z


@njit(cache=True, error_model="numpy")
def _backward_block(means, quats, scales, opacities, viewmats, Ks, g, images, first, last,
                    width, height, antialiased, colors_per_camera, valid, entry_grads,
                    d_means, d_quats, d_scales, d_opacities, d_colors):
    channels = entry_grads.shape[3] - 7
    grad = np.empty(7)
    for i in range(images[0], images[1]):
        target = i if colors_per_camera else g
        for n in range(first, last):
            if not valid[i, n]:
                continue
            nonzero = False
            for k in range(7):  # summing the partial sums (one per thread, or just one)
                grad[k] = 0.0
                for slot in range(entry_grads.shape[0]):
                    grad[k] += entry_grads[slot, i, n, k if k < 6 else 6 + channels]
                nonzero = nonzero or grad[k] != 0.0
            if nonzero:  # else hidden behind others or outside every pixel: nothing to add
                project_one_backward(means, quats, scales, opacities, viewmats, Ks, g, n, i,
                                     width, height, antialiased, grad, d_means, d_quats,
                                     d_scales, d_opacities)
            for ch in range(channels):
                for slot in range(entry_grads.shape[0]):
                    d_colors[target, n, ch] += entry_grads[slot, i, n, 6 + ch]


@njit(cache=True, error_model="numpy", parallel=True)
def project_all_backward(means, quats, scales, opacities, viewmats, Ks, cams_per_set, width,
                         height, antialiased, colors_per_camera, valid, entry_grads,
                         d_means, d_quats, d_scales, d_opacities, d_colors):
    """Gradients of every kept pair into the Gaussians' d_* arrays (float64, zeroed).

    entry_grads [S, I, N, 6+D+1]: dL/d(centre x, y, conic a, b, c, effective opacity, D colour
    channels, depth z) per pair, in S partial sums; d_colors [I, N, D] with per-camera
    colours, else [G, N, D].
    Work is split by blocks of Gaussians, so every gradient row has a single writer.
    """
    num_images, n_total = valid.shape
    num_sets = means.shape[0]
    num_blocks = (n_total + BLOCK - 1) // BLOCK
    for job in prange(num_sets * num_blocks):
        g, first = job // num_blocks, (job % num_blocks) * BLOCK
        images = (g * cams_per_set, (g + 1) * cams_per_set) if num_sets > 1 else (0, num_images)
        _backward_block(means, quats, scales, opacities, viewmats, Ks, g, images, first,
                        min(first + BLOCK, n_total), width, height, antialiased,
                        colors_per_camera, valid, entry_grads, d_means, d_quats, d_scales,
                        d_opacities, d_colors)


def num_threads() -> int:
    return numba.get_num_threads()
