"""Camera maths for the backend, in the wire convention.

Wire convention: camera-to-world 4x4 matrices in the OpenCV convention (the camera looks down
+Z, +Y points down the image, +X right) and intrinsics per camera as
(fx, fy, cx, cy, width, height) in pixels. Pixel (row i, column j) covers [j, j+1] x [i, i+1],
so its centre is at (j + 0.5, i + 0.5). Blender cameras look down -Z with +Y up; the two
`*_c2w_to_*` functions convert between the conventions.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from backend.rigs import ring_azimuths

INTRINSICS_SIZE = 6


def _check_last_dims(name: str, array, dims: tuple[int, ...]) -> None:
    if tuple(array.shape[-len(dims):]) != dims or array.ndim < len(dims):
        want = ", ".join(str(d) for d in dims)
        raise ValueError(f"{name}: expected shape [..., {want}], got {list(array.shape)}")


def _to_tensor(name: str, value, dims: tuple[int, ...], like: Tensor | None = None) -> Tensor:
    tensor = torch.as_tensor(value)
    if like is not None:
        tensor = tensor.to(device=like.device, dtype=like.dtype)
    elif not tensor.is_floating_point():
        tensor = tensor.to(torch.get_default_dtype())
    _check_last_dims(name, tensor, dims)
    return tensor


def intrinsics_to_K(intr):  # [..., 6] -> [..., 3, 3]
    """(fx, fy, cx, cy, width, height) -> 3x3 pinhole matrix; numpy or torch in, same out."""
    _check_last_dims("intrinsics", intr, (INTRINSICS_SIZE,))
    fx, fy, cx, cy = intr[..., 0], intr[..., 1], intr[..., 2], intr[..., 3]
    if isinstance(intr, Tensor):
        zero, one = torch.zeros_like(fx), torch.ones_like(fx)
        rows = [torch.stack(r, dim=-1) for r in ((fx, zero, cx), (zero, fy, cy), (zero, zero, one))]
        return torch.stack(rows, dim=-2)
    intr = np.asarray(intr)
    K = np.zeros((*intr.shape[:-1], 3, 3), dtype=intr.dtype)
    K[..., 0, 0], K[..., 1, 1], K[..., 0, 2], K[..., 1, 2], K[..., 2, 2] = fx, fy, cx, cy, 1
    return K


def K_to_intrinsics(K, width: int, height: int):  # [..., 3, 3] -> [..., 6]
    """3x3 pinhole matrix and image size -> (fx, fy, cx, cy, width, height)."""
    _check_last_dims("K", K, (3, 3))
    values = [K[..., 0, 0], K[..., 1, 1], K[..., 0, 2], K[..., 1, 2]]
    if isinstance(K, Tensor):
        size = torch.tensor([width, height], dtype=K.dtype, device=K.device)
        return torch.cat([torch.stack(values, dim=-1), size.expand(*K.shape[:-2], 2)], dim=-1)
    size = np.broadcast_to(np.asarray([width, height], dtype=K.dtype), (*K.shape[:-2], 2))
    return np.concatenate([np.stack(values, axis=-1), size], axis=-1)


def c2w_to_viewmat(c2w):  # [..., 4, 4] -> [..., 4, 4]
    """Invert rigid camera-to-world matrices into world-to-camera (view) matrices."""
    _check_last_dims("c2w", c2w, (4, 4))
    rot, trans = c2w[..., :3, :3], c2w[..., :3, 3:]
    if isinstance(c2w, Tensor):
        rot_t = rot.transpose(-1, -2)
        top = torch.cat([rot_t, -rot_t @ trans], dim=-1)  # [..., 3, 4]
        return torch.cat([top, c2w.new_tensor([0, 0, 0, 1]).expand(*c2w.shape[:-2], 1, 4)], -2)
    c2w = np.asarray(c2w)
    view = np.zeros_like(c2w)
    rot_t = np.swapaxes(rot, -1, -2)
    view[..., :3, :3] = rot_t
    view[..., :3, 3:] = -rot_t @ trans
    view[..., 3, 3] = 1
    return view


def look_at_c2w(eye, target, up=(0.0, 0.0, 1.0)) -> np.ndarray:  # [..., 3] -> [..., 4, 4]
    """OpenCV camera-to-world matrix at `eye` looking at `target`, world `up` (Z up as Blender)."""
    eye, target = np.asarray(eye, np.float64), np.asarray(target, np.float64)
    up = np.asarray(up, np.float64)
    forward = target - eye
    forward_norm = np.linalg.norm(forward, axis=-1, keepdims=True)
    if (forward_norm < 1e-12).any():
        raise ValueError("look_at_c2w: eye and target coincide")
    forward = forward / forward_norm
    right = np.cross(forward, up)
    right_norm = np.linalg.norm(right, axis=-1, keepdims=True)
    if (right_norm < 1e-9).any():
        raise ValueError("look_at_c2w: viewing direction is parallel to `up`")
    right = right / right_norm
    down = np.cross(forward, right)
    shape = np.broadcast_shapes(eye.shape, target.shape, up.shape)[:-1]
    c2w = np.zeros((*shape, 4, 4))
    c2w[..., :3, 0], c2w[..., :3, 1], c2w[..., :3, 2] = right, down, forward
    c2w[..., :3, 3] = eye
    c2w[..., 3, 3] = 1.0
    return c2w


def orbit_rig(
    num_views: int,
    radius: float = 3.0,
    camera_height: float = 1.0,
    focal: float = 64.0,
    width: int = 64,
    height: int = 64,
    target=(0.0, 0.0, 0.0),
    start_angle: float = 0.0,
    arc: float = 2 * math.pi,
) -> tuple[np.ndarray, np.ndarray]:
    """Cameras evenly spaced on a horizontal circle around `target`, all looking at it.

    Returns c2w [V, 4, 4] (OpenCV) and intrinsics [V, 6] with the principal point centred.
    `camera_height` is the cameras' height above the target; `arc` the angle they span.
    """
    if num_views < 1 or radius <= 0 or focal <= 0 or width < 1 or height < 1:
        raise ValueError("orbit_rig: num_views, radius, focal, width, height must be positive")
    target = np.asarray(target, np.float64)
    angles = ring_azimuths(num_views, arc, start_angle)
    eyes = np.stack([radius * np.cos(angles), radius * np.sin(angles),
                     np.full(num_views, camera_height)], axis=-1) + target
    c2w = look_at_c2w(eyes, target[None])
    intr = np.tile(np.array([focal, focal, width / 2, height / 2, width, height], np.float64),
                   (num_views, 1))
    return c2w, intr


def scale_intrinsics(intr, width: int, height: int):  # [..., 6] -> [..., 6]
    """Intrinsics for the same camera resampled to an image of `width` x `height` pixels."""
    _check_last_dims("intrinsics", intr, (INTRINSICS_SIZE,))
    sx, sy = width / intr[..., 4], height / intr[..., 5]
    values = [intr[..., 0] * sx, intr[..., 1] * sy, intr[..., 2] * sx, intr[..., 3] * sy,
              intr[..., 4] * sx, intr[..., 5] * sy]
    if isinstance(intr, Tensor):
        return torch.stack(values, dim=-1)
    return np.stack(values, axis=-1)


def _image_size(intr: Tensor, height: int | None, width: int | None) -> tuple[int, int]:
    if (height is None) != (width is None):
        raise ValueError("pass both height and width, or neither")
    if height is not None and width is not None:
        if height < 1 or width < 1:
            raise ValueError(f"image size must be positive, got {height}x{width}")
        return int(height), int(width)
    sizes = intr[..., 4:6].reshape(-1, 2).unique(dim=0)
    if sizes.shape[0] != 1:
        raise ValueError("cameras have different image sizes; pass height and width")
    return int(sizes[0, 1]), int(sizes[0, 0])


def _camera_directions(intr: Tensor, height: int, width: int) -> Tensor:  # -> [..., H, W, 3]
    """Per-pixel directions in camera space with z = 1, through the pixel centres."""
    intr = scale_intrinsics(intr, width, height)
    fx, fy, cx, cy = (intr[..., i, None, None] for i in range(4))  # [..., 1, 1]
    u = torch.arange(width, dtype=intr.dtype, device=intr.device) + 0.5  # [W]
    v = torch.arange(height, dtype=intr.dtype, device=intr.device) + 0.5  # [H]
    x = ((u - cx) / fx).expand(*intr.shape[:-1], height, width)  # [..., 1, W] -> [..., H, W]
    y = ((v[:, None] - cy) / fy).expand(*intr.shape[:-1], height, width)  # [..., H, 1] -> ...
    return torch.stack([x, y, torch.ones_like(x)], dim=-1)


def pixel_rays(
    c2w,  # [..., 4, 4]
    intr,  # [..., 6]
    height: int | None = None,
    width: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Ray origins and unit directions through pixel centres, each [..., H, W, 3] (world).

    Without `height`/`width` the intrinsics' own image size is used; with them the
    intrinsics are rescaled to that size (e.g. rays on a downsampled latent grid).
    """
    c2w = _to_tensor("c2w", c2w, (4, 4))
    intr = _to_tensor("intrinsics", intr, (INTRINSICS_SIZE,), like=c2w)
    height, width = _image_size(intr, height, width)
    dirs_cam = _camera_directions(intr, height, width)  # [..., H, W, 3]
    rot = c2w[..., None, None, :3, :3]  # [..., 1, 1, 3, 3]
    dirs = torch.nn.functional.normalize((rot @ dirs_cam[..., None])[..., 0], dim=-1)
    origins = c2w[..., None, None, :3, 3].expand_as(dirs)
    return origins, dirs


def plucker_rays(
    c2w,  # [..., 4, 4]
    intr,  # [..., 6]
    height: int | None = None,
    width: int | None = None,
) -> Tensor:  # [..., 6, H, W]
    """Plucker coordinates per pixel, channels first: (direction, origin x direction)."""
    origins, dirs = pixel_rays(c2w, intr, height, width)  # [..., H, W, 3] each
    rays = torch.cat([dirs, torch.cross(origins, dirs, dim=-1)], dim=-1)  # [..., H, W, 6]
    return rays.movedim(-1, -3)


def unproject_depth(
    depth,  # [..., H, W]
    c2w,  # [..., 4, 4]
    intr,  # [..., 6]
) -> Tensor:  # [..., H, W, 3]
    """World points seen at each pixel centre.

    `depth` is z-depth along the camera's +Z (optical) axis, not the distance along the ray.
    The intrinsics are rescaled to the depth map's size when the two differ.
    """
    c2w = _to_tensor("c2w", c2w, (4, 4))
    depth = torch.as_tensor(depth).to(device=c2w.device, dtype=c2w.dtype)
    if depth.ndim < 2:
        raise ValueError(f"depth: expected shape [..., H, W], got {list(depth.shape)}")
    intr = _to_tensor("intrinsics", intr, (INTRINSICS_SIZE,), like=c2w)
    height, width = depth.shape[-2:]
    dirs_cam = _camera_directions(intr, height, width)  # [..., H, W, 3]
    points_cam = dirs_cam * depth[..., None]
    rot = c2w[..., None, None, :3, :3]
    return (rot @ points_cam[..., None])[..., 0] + c2w[..., None, None, :3, 3]


def project_points(
    points,  # [..., N, 3] world
    c2w,  # [..., 4, 4]
    intr,  # [..., 6]
) -> tuple[Tensor, Tensor]:  # uv [..., N, 2], depth [..., N]
    """Pixel coordinates (pixel centres at +0.5) and z-depth of world points.

    Points at or behind the camera plane (depth <= 0) get meaningless pixel coordinates.
    """
    c2w = _to_tensor("c2w", c2w, (4, 4))
    points = _to_tensor("points", points, (3,), like=c2w)
    intr = _to_tensor("intrinsics", intr, (INTRINSICS_SIZE,), like=c2w)
    view = c2w_to_viewmat(c2w)
    points_cam = (view[..., None, :3, :3] @ points[..., None])[..., 0] + view[..., None, :3, 3]
    z = points_cam[..., 2]
    u = intr[..., None, 0] * points_cam[..., 0] / z + intr[..., None, 2]
    v = intr[..., None, 1] * points_cam[..., 1] / z + intr[..., None, 3]
    return torch.stack([u, v], dim=-1), z
