"""Tests for the backend's camera maths (OpenCV wire convention)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.cameras import (
    K_to_intrinsics,
    c2w_to_viewmat,
    intrinsics_to_K,
    look_at_c2w,
    orbit_rig,
    pixel_rays,
    plucker_rays,
    project_points,
    scale_intrinsics,
    unproject_depth,
)


def rig(num_views: int = 3, width: int = 20, height: int = 14):
    c2w, intr = orbit_rig(num_views, radius=4.0, camera_height=1.5, focal=18.0, width=width,
                          height=height, target=(0.2, -0.1, 0.3))
    return torch.as_tensor(c2w), torch.as_tensor(intr)


def test_look_at_puts_target_on_optical_axis_at_principal_point():
    eye, target = np.array([3.0, -2.0, 1.5]), np.array([0.5, 0.4, 0.2])
    c2w = look_at_c2w(eye, target)
    rot = c2w[:3, :3]
    assert np.allclose(rot.T @ rot, np.eye(3)) and np.isclose(np.linalg.det(rot), 1.0)
    forward = (target - eye) / np.linalg.norm(target - eye)
    assert np.allclose(rot[:, 2], forward)
    intr = np.array([30.0, 32.0, 16.0, 12.0, 32.0, 24.0])
    uv, depth = project_points(np.stack([target, target + np.array([0, 0, 0.5])]), c2w, intr)
    assert torch.allclose(uv[0], torch.tensor([16.0, 12.0], dtype=uv.dtype))
    assert depth[0] == pytest.approx(np.linalg.norm(target - eye))
    assert uv[1, 1] < 12.0  # world up (+Z, as in Blender) appears above the centre: +Y is down


def test_look_at_rejects_degenerate_views():
    with pytest.raises(ValueError, match="coincide"):
        look_at_c2w([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="parallel"):
        look_at_c2w([0.0, 0.0, 5.0], [0.0, 0.0, 0.0])


def test_viewmat_inverts_c2w_numpy_and_torch():
    c2w, _ = rig(4)
    view = c2w_to_viewmat(c2w)
    assert view.shape == (4, 4, 4)
    assert torch.allclose(view @ c2w, torch.eye(4, dtype=c2w.dtype).expand(4, 4, 4), atol=1e-12)
    view_np = c2w_to_viewmat(c2w.numpy())
    assert isinstance(view_np, np.ndarray) and np.allclose(view_np, view.numpy())
    with pytest.raises(ValueError, match="c2w"):
        c2w_to_viewmat(np.eye(3))


def test_intrinsics_and_K_convert_both_ways():
    intr = np.array([[30.0, 31.0, 16.5, 12.5, 32, 24], [10.0, 11.0, 5.0, 6.0, 10, 12]])
    K = intrinsics_to_K(intr)
    assert K.shape == (2, 3, 3) and K[1, 0, 2] == 5.0 and K[0, 2, 2] == 1.0
    assert torch.allclose(intrinsics_to_K(torch.as_tensor(intr)), torch.as_tensor(K))
    assert np.allclose(K_to_intrinsics(K[:1], 32, 24), intr[:1])
    assert torch.allclose(K_to_intrinsics(torch.as_tensor(K[:1]), 32, 24),
                          torch.as_tensor(intr[:1]))
    with pytest.raises(ValueError, match="intrinsics"):
        intrinsics_to_K(np.zeros((2, 4)))


def test_unproject_then_project_returns_pixel_centres():
    c2w, intr = rig(3)
    gen = torch.Generator().manual_seed(0)
    depth = 1.0 + 3.0 * torch.rand(3, 14, 20, generator=gen, dtype=torch.float64)
    points = unproject_depth(depth, c2w, intr)  # [V, H, W, 3]
    assert points.shape == (3, 14, 20, 3)
    uv, z = project_points(points.reshape(3, -1, 3), c2w, intr)
    rows, cols = torch.meshgrid(torch.arange(14.0), torch.arange(20.0), indexing="ij")
    centres = torch.stack([cols + 0.5, rows + 0.5], -1).reshape(-1, 2).double()
    assert torch.allclose(uv, centres.expand(3, -1, -1), atol=1e-9)
    assert torch.allclose(z, depth.reshape(3, -1), atol=1e-12)


def test_pixel_rays_are_unit_and_start_at_camera():
    c2w, intr = rig(2, width=21, height=15)
    intr[:, 2], intr[:, 3] = 10.5, 7.5  # principal point on the centre of pixel (7, 10)
    origins, dirs = pixel_rays(c2w, intr)
    assert origins.shape == dirs.shape == (2, 15, 21, 3)
    assert torch.allclose(dirs.norm(dim=-1), torch.ones(2, 15, 21, dtype=dirs.dtype))
    assert torch.allclose(origins[:, 3, 4], c2w[:, :3, 3])
    assert torch.allclose(dirs[:, 7, 10], c2w[:, :3, 2])  # centre ray = optical axis


def test_rays_at_a_lower_resolution_rescale_the_intrinsics():
    c2w, intr = rig(2, width=20, height=14)
    origins, dirs = pixel_rays(c2w, intr, height=7, width=10)
    uv, _ = project_points((origins + 2.0 * dirs).reshape(2, -1, 3), c2w, intr)
    rows, cols = torch.meshgrid(torch.arange(7.0), torch.arange(10.0), indexing="ij")
    coarse = 2.0 * torch.stack([cols + 0.5, rows + 0.5], -1).reshape(-1, 2).double()
    assert torch.allclose(uv, coarse.expand(2, -1, -1), atol=1e-9)
    assert np.allclose(scale_intrinsics(np.array([20.0, 22, 10, 7, 20, 14]), 10, 7),
                       [10.0, 11, 5, 3.5, 10, 7])
    with pytest.raises(ValueError, match="both"):
        pixel_rays(c2w, intr, height=7)


def test_plucker_moment_is_orthogonal_to_direction_with_batched_shapes():
    c2w, intr = rig(6)
    c2w, intr = c2w.reshape(2, 3, 4, 4), intr.reshape(2, 3, 6)
    rays = plucker_rays(c2w, intr)
    assert rays.shape == (2, 3, 6, 14, 20)
    direction, moment = rays[:, :, :3], rays[:, :, 3:]
    assert torch.allclose((direction * moment).sum(2), torch.zeros(2, 3, 14, 20,
                                                                   dtype=rays.dtype), atol=1e-12)
    origins, _ = pixel_rays(c2w, intr)
    expected = torch.cross(origins, direction.movedim(2, -1), dim=-1).movedim(-1, 2)
    assert torch.allclose(moment, expected)
    assert plucker_rays(c2w[0, 0], intr[0, 0], 7, 10).shape == (6, 7, 10)


def test_orbit_rig_cameras_all_look_at_the_target():
    c2w, intr = orbit_rig(5, radius=2.0, camera_height=1.0, focal=25.0, width=32, height=24,
                          target=(0.0, 0.5, 0.2))
    assert c2w.shape == (5, 4, 4) and intr.shape == (5, 6)
    assert np.allclose(np.linalg.norm(c2w[:, :3, 3] - [0.0, 0.5, 0.2], axis=-1), np.sqrt(5.0))
    uv, depth = project_points(np.array([[0.0, 0.5, 0.2]]), c2w, intr)
    assert torch.allclose(uv[:, 0], torch.tensor([16.0, 12.0], dtype=uv.dtype))
    assert (depth > 0).all()
    with pytest.raises(ValueError, match="positive"):
        orbit_rig(0)
