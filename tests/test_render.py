"""Tests for the Gaussian rasterizers: analytic footprints, ordering, gradients, dense parity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from backend.cameras import c2w_to_viewmat, intrinsics_to_K, orbit_rig
from backend.gaussians import Gaussians
from backend.render import (
    RenderOutput,
    TorchRasterizerConfig,
    rasterize,
    rasterize_gaussians,
    rasterize_torch,
)


def pinhole(focal: float, width: int, height: int, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor([[[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]]], dtype=dtype)


def random_scene(num: int, seed: int, dtype=torch.float32, spread: float = 0.6,
                 scale_range=(0.03, 0.15), opacity_range=(0.1, 0.9)) -> dict[str, torch.Tensor]:
    """Gaussians scattered around the world origin, seen by the `orbit_cameras` rig."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = scale_range
    return {
        "means": (torch.rand(num, 3, generator=gen, dtype=dtype) * 2 - 1) * spread,
        "quats": torch.randn(num, 4, generator=gen, dtype=dtype),
        "scales": lo + (hi - lo) * torch.rand(num, 3, generator=gen, dtype=dtype),
        "opacities": opacity_range[0] + (opacity_range[1] - opacity_range[0])
        * torch.rand(num, generator=gen, dtype=dtype),
        "colors": torch.rand(num, 3, generator=gen, dtype=dtype),
    }


def orbit_cameras(num_views: int, width: int, height: int, dtype=torch.float32):
    c2w, intr = orbit_rig(num_views, radius=3.0, camera_height=0.8, focal=0.9 * width,
                          width=width, height=height)
    return (torch.as_tensor(c2w_to_viewmat(c2w), dtype=dtype),
            torch.as_tensor(intrinsics_to_K(intr), dtype=dtype))


# --- an independent dense reference: every Gaussian against every pixel, one by one -----------

def reference_render(scene, viewmats, Ks, width, height, near=0.01, far=1e10, background=None):
    """Straightforward per-Gaussian loop with the same 3DGS rules; small scenes only."""
    q = scene["quats"] / scene["quats"].norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    rot = torch.stack([
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], dim=-2)  # [N, 3, 3]
    cov3d = rot @ torch.diag_embed(scene["scales"] ** 2) @ rot.transpose(-1, -2)
    dtype = scene["means"].dtype
    cols = torch.arange(width, dtype=dtype) + 0.5
    rows = torch.arange(height, dtype=dtype) + 0.5
    py, px = torch.meshgrid(rows, cols, indexing="ij")  # [H, W]
    images, alphas, depths = [], [], []
    for index, (view, K) in enumerate(zip(viewmats, Ks, strict=True)):
        fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
        cam = scene["means"] @ view[:3, :3].T + view[:3, 3]  # [N, 3]
        transmittance = torch.ones(height, width, dtype=dtype)
        done = torch.zeros(height, width, dtype=torch.bool)
        rgb = torch.zeros(height, width, scene["colors"].shape[1], dtype=dtype)
        depth = torch.zeros(height, width, dtype=dtype)
        for i in torch.argsort(cam[:, 2], stable=True).tolist():
            cx_, cy_, cz = cam[i]
            if not near <= cz.item() <= far:
                continue
            margin_x, margin_y = 0.15 * width / fx, 0.15 * height / fy  # 30% of the half fov
            lim_x = (float(-cx / fx - margin_x), float((width - cx) / fx + margin_x))
            lim_y = (float(-cy / fy - margin_y), float((height - cy) / fy + margin_y))
            tx, ty = (cx_ / cz).clamp(*lim_x), (cy_ / cz).clamp(*lim_y)
            jac = torch.stack([torch.stack([fx / cz, fx * 0, -fx * tx / cz]),
                               torch.stack([fy * 0, fy / cz, -fy * ty / cz])])
            cov2d = jac @ view[:3, :3] @ cov3d[i] @ view[:3, :3].T @ jac.T
            cov2d = cov2d + 0.3 * torch.eye(2, dtype=dtype)
            conic = torch.linalg.inv(cov2d)
            dx, dy = px - (fx * cx_ / cz + cx), py - (fy * cy_ / cz + cy)
            power = 0.5 * (conic[0, 0] * dx * dx + conic[1, 1] * dy * dy) + conic[0, 1] * dx * dy
            alpha = (scene["opacities"][i] * torch.exp(-power)).clamp(max=0.99)
            alpha = torch.where(alpha >= 1 / 255, alpha, 0.0)
            next_t = transmittance * (1 - alpha)
            stop = (alpha > 0) & (next_t <= 1e-4) & ~done
            use = (alpha > 0) & ~done & ~stop
            weight = torch.where(use, alpha * transmittance, 0.0)
            rgb = rgb + weight[..., None] * scene["colors"][i]
            depth = depth + weight * cz
            transmittance = torch.where(use, next_t, transmittance)
            done = done | stop
        alpha_img = 1 - transmittance
        if background is not None:
            cam_background = background if background.ndim == 1 else background[index]
            rgb = rgb + transmittance[..., None] * cam_background
        images.append(rgb)
        alphas.append(alpha_img[..., None])
        depths.append((depth / alpha_img.clamp(min=1e-10))[..., None])
    return RenderOutput(torch.stack(images), torch.stack(alphas), torch.stack(depths))


def render(scene, viewmats, Ks, width, height, **kwargs) -> RenderOutput:
    return rasterize_torch(scene["means"], scene["quats"], scene["scales"], scene["opacities"],
                           scene["colors"], viewmats, Ks, width, height, **kwargs)


# --- analytic checks ---------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [0.05, 0.2])
def test_single_gaussian_matches_analytic_footprint(scale):
    focal, depth, width, height, opacity = 100.0, 5.0, 48, 40, 0.8
    color = torch.tensor([[0.2, 0.5, 0.9]])
    out = rasterize(torch.tensor([[0.0, 0.0, depth]]), torch.tensor([[1.0, 0, 0, 0]]),
                    torch.full((1, 3), scale), torch.tensor([opacity]), color,
                    torch.eye(4)[None], pinhole(focal, width, height), width, height)
    variance = (focal * scale / depth) ** 2 + 0.3
    cols = torch.arange(width) + 0.5 - width / 2
    rows = torch.arange(height) + 0.5 - height / 2
    dist2 = rows[:, None] ** 2 + cols[None, :] ** 2  # [H, W]
    alpha = opacity * torch.exp(-0.5 * dist2 / variance)
    alpha = torch.where(alpha >= 1 / 255, alpha, 0.0)
    assert torch.allclose(out.alpha[0, ..., 0], alpha, atol=1e-4)
    assert torch.allclose(out.rgb[0], alpha[..., None] * color[0], atol=1e-4)
    assert (out.alpha[0, ..., 0] > 0).sum() > 4


def test_depth_of_single_gaussian_is_its_distance():
    out = rasterize(torch.tensor([[0.1, -0.1, 3.5]]), torch.tensor([[0.9, 0.1, 0.2, 0.3]]),
                    torch.tensor([[0.1, 0.2, 0.05]]), torch.tensor([0.7]),
                    torch.rand(1, 3, generator=torch.Generator().manual_seed(0)),
                    torch.eye(4)[None], pinhole(60.0, 32, 32), 32, 32)
    covered = out.alpha[..., 0] > 0
    assert covered.sum() > 10
    assert torch.allclose(out.depth[..., 0][covered], torch.tensor(3.5), atol=1e-5)
    assert (out.depth[..., 0][~covered] == 0).all()


@pytest.mark.parametrize("reverse", [False, True])
def test_nearer_gaussian_dominates_regardless_of_order(reverse):
    means = torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, 4.0]])
    colors = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    args = [means, torch.tensor([[1.0, 0, 0, 0]] * 2), torch.tensor([[0.3] * 3, [0.6] * 3]),
            torch.tensor([0.95, 0.95]), colors]
    if reverse:
        args = [a.flip(0) for a in args]
    out = rasterize(*args, torch.eye(4)[None], pinhole(40.0, 32, 32), 32, 32)
    centre = out.rgb[0, 16, 16]
    assert centre[0] > 0.9 and centre[1] < 0.06
    near, far = (0.95 * math.exp(-0.5 * 0.5 / ((40 * s / z) ** 2 + 0.3))
                 for s, z in ((0.3, 2.0), (0.6, 4.0)))  # pixel centre (16.5, 16.5)
    expected_depth = (near * 2.0 + (1 - near) * far * 4.0) / (1 - (1 - near) * (1 - far))
    assert math.isclose(out.depth[0, 16, 16, 0].item(), expected_depth, rel_tol=1e-3)


# --- agreement with the dense reference --------------------------------------------------------

@pytest.mark.parametrize("config", [
    TorchRasterizerConfig(),
    TorchRasterizerConfig(tile_size=8, chunk_size=3, max_evals_per_step=2000),
    TorchRasterizerConfig(tile_size=16, chunk_size=5, max_evals_per_step=5000, checkpoint=False),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiles_match_dense_reference(config, dtype):
    scene = random_scene(40, seed=1, dtype=dtype)
    scene["opacities"][:8] = 0.99  # opaque layers make some pixels stop early
    viewmats, Ks = orbit_cameras(2, 37, 29, dtype=dtype)
    background = torch.tensor([0.1, 0.2, 0.3], dtype=dtype)
    out = render(scene, viewmats, Ks, 37, 29, background=background, config=config)
    ref = reference_render(scene, viewmats, Ks, 37, 29, background=background)
    assert out.rgb.shape == (2, 29, 37, 3)
    assert (out.alpha > 0.9).any() and (out.alpha == 0).any()
    # float32 depth is sum(w z) / alpha, ill-conditioned where alpha is tiny: compare alpha*depth
    for name, ours, theirs in (("rgb", out.rgb, ref.rgb), ("alpha", out.alpha, ref.alpha),
                               ("alpha*depth", out.alpha * out.depth, ref.alpha * ref.depth),
                               ("depth", out.depth, ref.depth)):
        if name == "depth" and dtype == torch.float32:
            continue
        error = (ours - theirs).abs().max().item()
        assert error < 1e-5, f"{name} differs from the dense reference by {error}"


def test_gradients_match_dense_reference():
    scene = random_scene(12, seed=2, dtype=torch.float64)
    scene = {k: v.requires_grad_() for k, v in scene.items()}
    viewmats, Ks = orbit_cameras(2, 20, 16, dtype=torch.float64)
    weights = torch.rand(2, 16, 20, 5, generator=torch.Generator().manual_seed(3),
                         dtype=torch.float64)

    def loss_grads(out: RenderOutput):
        stacked = torch.cat([out.rgb, out.alpha, out.depth], dim=-1)
        return torch.autograd.grad((stacked * weights).sum(), list(scene.values()))

    config = TorchRasterizerConfig(tile_size=8, chunk_size=4, max_evals_per_step=512)
    ours = loss_grads(render(scene, viewmats, Ks, 20, 16, config=config))
    ref = loss_grads(reference_render(scene, viewmats, Ks, 20, 16))
    for name, a, b in zip(scene, ours, ref, strict=True):
        assert torch.allclose(a, b, atol=1e-8, rtol=1e-6), name


# --- gradients ---------------------------------------------------------------------------------

def test_gradients_reach_every_parameter():
    scene = {k: v.requires_grad_() for k, v in random_scene(60, seed=4).items()}
    viewmats, Ks = orbit_cameras(3, 32, 32)
    out = render(scene, viewmats, Ks, 32, 32)
    target = torch.rand(out.rgb.shape, generator=torch.Generator().manual_seed(5))
    loss = ((out.rgb - target) ** 2).mean() + out.depth.mean() + out.alpha.mean()
    loss.backward()
    for name, tensor in scene.items():
        assert torch.isfinite(tensor.grad).all(), name
        assert tensor.grad.abs().sum() > 0, name


def test_gradients_match_finite_differences():
    base = random_scene(6, seed=6, dtype=torch.float64, spread=0.3, opacity_range=(0.2, 0.7))
    viewmats, Ks = orbit_cameras(2, 20, 12, dtype=torch.float64)
    names = list(base)
    config = TorchRasterizerConfig(tile_size=8, chunk_size=2, max_evals_per_step=256)

    def images(*params):
        out = render(dict(zip(names, params, strict=True)), viewmats, Ks, 20, 12, config=config)
        return out.rgb, out.alpha, out.depth

    inputs = tuple(base[n].clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(images, inputs, eps=1e-6, atol=1e-5, rtol=1e-3,
                                    fast_mode=True)


def test_checkpointing_does_not_change_gradients():
    viewmats, Ks = orbit_cameras(2, 40, 24)
    grads = []
    for use_checkpoint in (True, False):
        scene = {k: v.requires_grad_() for k, v in random_scene(80, seed=7).items()}
        config = TorchRasterizerConfig(chunk_size=4, max_evals_per_step=1024,
                                       checkpoint=use_checkpoint)
        out = render(scene, viewmats, Ks, 40, 24, config=config)
        (out.rgb.sum() + out.depth.sum()).backward()
        grads.append([t.grad for t in scene.values()])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


# --- scale, edge cases, input checks -----------------------------------------------------------

def test_large_scene_renders_memory_bounded():
    scene = random_scene(50_000, seed=8, spread=1.0, scale_range=(0.003, 0.02))
    viewmats, Ks = orbit_cameras(1, 128, 128)
    with torch.no_grad():
        out = render(scene, viewmats, Ks, 128, 128)
    assert out.rgb.shape == (1, 128, 128, 3)
    assert torch.isfinite(out.rgb).all() and torch.isfinite(out.depth).all()
    assert out.alpha.min() >= 0 and out.alpha.max() <= 1
    assert out.alpha.mean() > 0.5


def test_nothing_visible_gives_background_and_backward_works():
    scene = {k: v.requires_grad_() for k, v in random_scene(10, seed=9).items()}
    behind = torch.eye(4)[None].clone()
    behind[0, 2, 3] = -10.0  # every Gaussian lies behind the camera
    background = torch.tensor([0.3, 0.6, 0.9])
    out = render(scene, behind, pinhole(30.0, 16, 16), 16, 16, background=background)
    assert torch.equal(out.rgb, background.expand(1, 16, 16, 3))
    assert (out.alpha == 0).all() and (out.depth == 0).all()
    out.rgb.sum().backward()


def test_feature_channels_and_per_camera_background():
    scene = random_scene(30, seed=10)
    scene["colors"] = torch.rand(30, 5, generator=torch.Generator().manual_seed(11))
    viewmats, Ks = orbit_cameras(2, 24, 24)
    background = torch.rand(2, 5, generator=torch.Generator().manual_seed(12))
    out = render(scene, viewmats, Ks, 24, 24, background=background)
    ref = reference_render(scene, viewmats, Ks, 24, 24, background=background)
    assert out.rgb.shape == (2, 24, 24, 5)
    assert torch.allclose(out.rgb, ref.rgb, atol=1e-5)


def test_invalid_inputs_raise_value_error():
    scene = random_scene(4, seed=13)
    viewmats, Ks = orbit_cameras(1, 16, 16)
    args = [scene[k] for k in ("means", "quats", "scales", "opacities", "colors")]
    with pytest.raises(ValueError, match="quats"):
        rasterize(args[0], args[1][:, :3], *args[2:], viewmats, Ks, 16, 16)
    with pytest.raises(ValueError, match="Ks"):
        rasterize(*args, viewmats, Ks[:, :2], 16, 16)
    with pytest.raises(ValueError, match="background"):
        rasterize(*args, viewmats, Ks, 16, 16, background=torch.zeros(4))
    with pytest.raises(ValueError, match="near"):
        rasterize(*args, viewmats, Ks, 16, 16, near=0.0)
    with pytest.raises(ValueError, match="backend"):
        rasterize(*args, viewmats, Ks, 16, 16, backend="opengl")
    with pytest.raises(ValueError, match="CUDA"):
        rasterize(*args, viewmats, Ks, 16, 16, backend="gsplat")


def test_rasterize_gaussians_takes_wire_cameras():
    scene = random_scene(50, seed=14)
    g = Gaussians.from_activated(scene["means"], scene["quats"], scene["scales"],
                                 scene["opacities"], scene["colors"])
    c2w, intr = orbit_rig(3, radius=3.0, camera_height=0.5, focal=30.0, width=32, height=24)
    out = rasterize_gaussians(g, c2w, intr)
    viewmats = torch.as_tensor(c2w_to_viewmat(c2w), dtype=torch.float32)
    tensors = g.to_torch()
    direct = rasterize(tensors["means"], tensors["quats"], tensors["scales"],
                       tensors["opacities"], tensors["colors"], viewmats,
                       torch.as_tensor(intrinsics_to_K(intr), dtype=torch.float32), 32, 24)
    assert out.rgb.shape == (3, 24, 32, 3)
    assert torch.allclose(out.rgb, direct.rgb, atol=1e-5)
    assert out.alpha.max() > 0.5
    mixed = np.array(intr)
    mixed[1, 4:6] = [64, 48]
    with pytest.raises(ValueError, match="image sizes"):
        rasterize_gaussians(g, c2w, mixed)


# --- CUDA parity -------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gsplat_matches_torch_renderer_on_cuda():
    device = torch.device("cuda")
    scene = {k: v.to(device) for k, v in random_scene(2000, seed=15).items()}
    viewmats, Ks = (t.to(device) for t in orbit_cameras(3, 96, 64))
    background = torch.tensor([0.2, 0.1, 0.4], device=device)
    weights = torch.rand(3, 64, 96, 5, generator=torch.Generator().manual_seed(16)).to(device)
    outputs, grads = {}, {}
    for backend in ("gsplat", "torch"):
        params = {k: v.clone().requires_grad_() for k, v in scene.items()}
        out = rasterize(*params.values(), viewmats, Ks, 96, 64, background=background,
                        backend=backend)
        stacked = torch.cat([out.rgb, out.alpha, out.alpha * out.depth], dim=-1)
        (stacked * weights).sum().backward()
        outputs[backend] = out
        grads[backend] = {k: v.grad for k, v in params.items()}
    ours, theirs = outputs["torch"], outputs["gsplat"]
    for name in ("rgb", "alpha"):
        diff = (getattr(ours, name) - getattr(theirs, name)).abs()
        print(f"{name}: max abs error {diff.max().item():.2e}, mean {diff.mean().item():.2e}")
        assert diff.mean() < 1e-3
    covered = (ours.alpha > 0.1) & (theirs.alpha > 0.1)
    depth_diff = (ours.depth - theirs.depth).abs()[covered]
    print(f"depth: max abs error {depth_diff.max().item():.2e}")
    assert depth_diff.mean() < 1e-3
    for name in scene:
        a, b = grads["torch"][name].flatten(), grads["gsplat"][name].flatten()
        cosine = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
        print(f"grad {name}: cosine {cosine:.4f}")
        assert cosine > 0.95, name
