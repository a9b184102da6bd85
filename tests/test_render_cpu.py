"""The numba CPU rasterizer against its reference twin (the torch rasterizer): values to 1e-4
and gradients to 1e-3 relative on seeded scenes full of edge cases, batched calls, modes."""

from __future__ import annotations

import math

import pytest
import torch
from test_render import orbit_cameras, random_scene

from backend.render import (
    CpuRasterizerConfig,
    RenderOutput,
    rasterize,
    rasterize_cpu,
    rasterize_torch,
)

NAMES = ("means", "quats", "scales", "opacities", "colors")


def edge_case_scene(seed: int, dtype=torch.float64, channels: int = 3) -> dict[str, torch.Tensor]:
    """A random cloud plus, in order, Gaussians that are: behind the cameras, huge (covering
    the image), sub-pixel, of zero opacity, needle-thin and rotated, near the image corners
    (straddling its border), past the far plane, with a zero quaternion."""
    gen = torch.Generator().manual_seed(seed)
    scene = random_scene(150, seed=seed, dtype=dtype, spread=0.8)
    scene["colors"] = torch.rand(150, channels, generator=gen, dtype=dtype)

    def add(means, scales, opacity=0.6, quats=None):
        k = means.shape[0]
        scene["means"] = torch.cat([scene["means"], means.to(dtype)])
        scene["scales"] = torch.cat([scene["scales"], scales.to(dtype).expand(k, 3)])
        scene["opacities"] = torch.cat([scene["opacities"],
                                        torch.full((k,), opacity, dtype=dtype)])
        scene["quats"] = torch.cat([scene["quats"], torch.randn(k, 4, generator=gen, dtype=dtype)
                                    if quats is None else quats.to(dtype)])
        scene["colors"] = torch.cat([scene["colors"],
                                     torch.rand(k, channels, generator=gen, dtype=dtype)])

    add(torch.tensor([[0.0, 0.0, 3.4], [0.3, -0.2, 4.5]]), torch.tensor([0.2]))  # behind some
    add(torch.tensor([[0.05, 0.1, -0.1]]), torch.tensor([[2.5, 1.5, 2.0]]), opacity=0.15)
    add(torch.rand(6, 3, generator=gen) - 0.5, torch.tensor([1e-4]))
    add(torch.rand(4, 3, generator=gen) - 0.5, torch.tensor([0.1]), opacity=0.0)
    add(torch.rand(6, 3, generator=gen) - 0.5, torch.tensor([[0.4, 0.01, 0.02]]), opacity=0.9)
    add(torch.tensor([[0.9, 0.9, 0.9], [-0.9, -0.9, 0.9], [0.9, -0.9, -0.9]]),
        torch.tensor([0.15]))
    add(torch.tensor([[0.0, 0.0, -60.0]]), torch.tensor([0.3]))
    add(torch.tensor([[0.1, 0.1, 0.1]]), torch.tensor([0.05]), quats=torch.zeros(1, 4))
    return scene


def cameras(num: int, width: int, height: int, dtype=torch.float64):
    """Orbit cameras with off-centre principal points, one of them inside the cloud."""
    viewmats, Ks = orbit_cameras(num, width, height, dtype=dtype)
    Ks = Ks.clone()
    Ks[:, 0, 2] += torch.linspace(-0.2, 0.15, num, dtype=dtype) * width
    Ks[:, 1, 2] += torch.linspace(0.1, -0.25, num, dtype=dtype) * height
    Ks[-1, 1, 1] *= 0.7  # non-square pixels
    viewmats = viewmats.clone()
    viewmats[0, 2, 3] -= 2.6  # camera 0 sits inside the cloud: Gaussians behind it
    return viewmats, Ks


def weighted_loss(out: RenderOutput, seed: int) -> torch.Tensor:
    stacked = torch.cat([out.rgb, out.alpha, out.alpha * out.depth], dim=-1)
    weights = torch.rand(stacked.shape, generator=torch.Generator().manual_seed(seed),
                         dtype=stacked.dtype)
    return (stacked * weights).sum()


def run_both(scene, viewmats, Ks, width, height, cpu_config=None, **kwargs):
    """Outputs and gradients of the CPU kernels and of the twin on the same inputs."""
    results = {}
    for name, fn in (("cpu", rasterize_cpu), ("torch", rasterize_torch)):
        params = {k: v.clone().requires_grad_() for k, v in scene.items()}
        extra = {"config": cpu_config} if name == "cpu" and cpu_config else {}
        out = fn(*(params[k] for k in NAMES), viewmats, Ks, width, height, **kwargs, **extra)
        weighted_loss(out, seed=99).backward()
        results[name] = (out, {k: params[k].grad for k in NAMES})
    return results


def assert_parity(results, value_tol=1e-4, grad_rtol=1e-3):
    (ours, our_grads), (ref, ref_grads) = results["cpu"], results["torch"]
    for name in ("rgb", "alpha"):
        error = (getattr(ours, name) - getattr(ref, name)).abs().max().item()
        assert error <= value_tol, f"{name}: differs from the twin by {error:.2e}"
    depth_error = (ours.alpha * ours.depth - ref.alpha * ref.depth).abs().max().item()
    assert depth_error <= value_tol * ref.depth.abs().max().item(), depth_error
    for name in NAMES:
        a, b = our_grads[name], ref_grads[name]
        assert torch.isfinite(a).all(), name
        scale = b.abs().max().item()
        error = (a - b).abs().max().item()
        assert error <= grad_rtol * scale, f"grad {name}: {error:.2e} vs scale {scale:.2e}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["classic", "antialiased"])
def test_edge_cases_match_twin(dtype, mode):
    scene = edge_case_scene(seed=1, dtype=dtype)
    viewmats, Ks = cameras(3, 45, 29, dtype=dtype)  # 16 px tiles: 3 x 2, partial at the edges
    background = torch.tensor([[0.1, 0.2, 0.3], [0.0, 0.5, 1.0], [0.9, 0.1, 0.4]], dtype=dtype)
    results = run_both(scene, viewmats, Ks, 45, 29, background=background, far=40.0,
                       rasterize_mode=mode)
    ours = results["cpu"][0]
    assert ours.rgb.shape == (3, 29, 45, 3) and ours.depth.shape == (3, 29, 45, 1)
    assert (ours.alpha > 0.9).any() and (ours.alpha < 0.05).any()
    assert_parity(results)


def test_opaque_layers_stop_pixels_like_the_twin():
    scene = edge_case_scene(seed=2)
    scene["opacities"][:60] = 0.995  # clamped to 0.99: pixels reach transmittance 1e-4
    scene["scales"][:60] *= 3
    viewmats, Ks = cameras(2, 33, 40)
    results = run_both(scene, viewmats, Ks, 33, 40)
    assert (results["cpu"][0].alpha > 1 - 1e-3).any()
    assert_parity(results)


def test_features_per_camera_colors_and_tile_sizes():
    scene = edge_case_scene(seed=3, channels=5)
    viewmats, Ks = cameras(2, 24, 20)
    per_camera = torch.rand(2, *scene["colors"].shape, generator=torch.Generator().manual_seed(4),
                            dtype=scene["colors"].dtype)
    results = run_both({**scene, "colors": per_camera}, viewmats, Ks, 24, 20,
                       background=torch.full((5,), 0.25, dtype=torch.float64))
    assert results["cpu"][1]["colors"].shape == (2, *scene["colors"].shape)
    assert_parity(results)
    args = [scene[k] for k in NAMES] + [viewmats, Ks, 24, 20]
    reference = rasterize_cpu(*args)
    for tile_size in (1, 5, 8, 32):
        other = rasterize_cpu(*args, config=CpuRasterizerConfig(tile_size=tile_size))
        for a, b in zip(reference, other, strict=True):
            assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("layout", ["own_cameras", "shared_gaussians", "shared_cameras"])
@pytest.mark.parametrize("grads_by_image", [False, True])
def test_timesteps_and_cameras_in_one_call(layout, grads_by_image):
    T, C, width, height = 3, 2, 26, 19
    sets = [edge_case_scene(seed=10 + t) for t in range(T)]
    scene = {k: torch.stack([s[k] for s in sets]) for k in NAMES}  # [T, N, ...]
    rigs = [cameras(C, width, height) for _ in range(T)]
    viewmats = torch.stack([v for v, _ in rigs])  # [T, C, 4, 4]
    for t in range(T):
        viewmats[t, :, :3, 3] += 0.1 * t  # each timestep's rig moves
    Ks = torch.stack([k for _, k in rigs])
    if layout == "shared_gaussians":
        scene = {k: v[0] for k, v in scene.items()}
    if layout == "shared_cameras":
        viewmats, Ks = viewmats[0], Ks[0]
    background = torch.rand(T, C, 3, generator=torch.Generator().manual_seed(5),
                            dtype=torch.float64)
    results = run_both(scene, viewmats, Ks, width, height, background=background,
                       cpu_config=CpuRasterizerConfig(grads_by_image=grads_by_image))
    assert results["cpu"][0].rgb.shape == (T, C, height, width, 3)
    assert_parity(results)
    # one camera of one timestep, rendered alone, is the same image
    t, c = 2, 1
    alone = rasterize_cpu(*(scene[k][t] if scene[k].ndim == sets[0][k].ndim + 1 else scene[k]
                            for k in NAMES),
                          viewmats[t, c:c + 1] if viewmats.ndim == 4 else viewmats[c:c + 1],
                          Ks[t, c:c + 1] if Ks.ndim == 4 else Ks[c:c + 1], width, height)
    batched = results["cpu"][0]
    assert torch.allclose(alone.alpha[0], batched.alpha[t, c], atol=1e-12)


def test_gradients_match_finite_differences():
    scene = random_scene(8, seed=6, dtype=torch.float64, spread=0.3, opacity_range=(0.2, 0.7))
    viewmats, Ks = cameras(2, 20, 12)
    viewmats[0, 2, 3] += 2.6  # keep every Gaussian in front of both cameras

    def images(*params):
        out = rasterize_cpu(*params, viewmats, Ks, 20, 12, rasterize_mode="antialiased")
        return out.rgb, out.alpha, out.depth

    inputs = tuple(scene[n].clone().requires_grad_() for n in NAMES)
    assert torch.autograd.gradcheck(images, inputs, eps=1e-6, atol=1e-5, rtol=1e-3,
                                    fast_mode=True)


def test_nothing_visible_and_degenerate_inputs_are_safe():
    scene = {k: v.requires_grad_() for k, v in random_scene(10, seed=7).items()}
    behind = torch.eye(4)[None].clone()
    behind[0, 2, 3] = -10.0
    K = torch.tensor([[[30.0, 0, 8], [0, 30.0, 8], [0, 0, 1]]])
    background = torch.tensor([0.3, 0.6, 0.9])
    out = rasterize_cpu(*(scene[k] for k in NAMES), behind, K, 16, 16, background=background)
    assert torch.equal(out.rgb, background.expand(1, 16, 16, 3))
    assert (out.alpha == 0).all() and (out.depth == 0).all()
    out.rgb.sum().backward()
    assert all(scene[k].grad is not None and (scene[k].grad == 0).all() for k in NAMES)
    flat = {k: v.detach().clone() for k, v in scene.items()}
    flat["scales"][:] = 0.0  # points: only the 0.3 px blur remains
    flat["quats"][:3] = 0.0
    front = torch.eye(4)[None].clone()
    front[0, 2, 3] = 3.0
    results = run_both({k: v.double() for k, v in flat.items()}, front.double(), K.double(),
                       16, 16)
    assert (results["cpu"][0].alpha > 0).any()
    assert_parity(results)


def test_auto_backend_picks_the_cpu_kernels():
    scene = random_scene(30, seed=8)
    viewmats, Ks = orbit_cameras(2, 24, 24)
    args = [scene[k] for k in NAMES] + [viewmats, Ks, 24, 24]
    auto, cpu, twin = rasterize(*args), rasterize(*args, backend="cpu"), rasterize_torch(*args)
    assert all(torch.equal(a, b) for a, b in zip(auto, cpu, strict=True))
    assert not torch.equal(auto.rgb, twin.rgb)  # a different implementation ran
    assert torch.allclose(auto.rgb, twin.rgb, atol=1e-5)
    posed = viewmats.clone().requires_grad_()  # camera gradients: only the twin has them
    out = rasterize(*args[:5], posed, Ks, 24, 24)
    out.rgb.sum().backward()
    assert posed.grad is not None and posed.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="cameras"):
        rasterize_cpu(*args[:5], posed, Ks, 24, 24)
    with pytest.raises(ValueError, match="rasterize_mode"):
        rasterize(*args, rasterize_mode="mip")
    with pytest.raises(ValueError, match="broadcast"):
        rasterize(*(a[None].expand(3, *a.shape) for a in args[:5]),
                  viewmats[None].expand(2, -1, -1, -1), Ks[None].expand(2, -1, -1, -1), 24, 24)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["classic", "antialiased"])
@pytest.mark.parametrize("packed", [False, True])
def test_cpu_kernels_match_gsplat(mode, packed):
    T, C, width, height = 2, 3, 96, 64
    sets = [random_scene(3000, seed=20 + t) for t in range(T)]
    scene = {k: torch.stack([s[k] for s in sets]) for k in NAMES}
    scene["opacities"] = scene["opacities"].clamp(max=0.98)  # gsplat clamps alpha at 0.999
    viewmats, Ks = (t[None].expand(T, -1, -1, -1).contiguous()
                    for t in orbit_cameras(C, width, height))
    background = torch.tensor([0.2, 0.1, 0.4])
    outputs, grads = {}, {}
    for backend, device in (("gsplat", "cuda"), ("cpu", "cpu")):
        params = {k: v.to(device).clone().requires_grad_() for k, v in scene.items()}
        out = rasterize(*(params[k] for k in NAMES), viewmats.to(device), Ks.to(device),
                        width, height, background=background.to(device), backend=backend,
                        rasterize_mode=mode, packed=packed)
        weighted_loss(RenderOutput(*(t.cpu() for t in out)), seed=3).backward()
        outputs[backend] = [t.detach().cpu() for t in out]
        grads[backend] = {k: params[k].grad.cpu() for k in NAMES}
    (rgb, alpha, depth), (ref_rgb, ref_alpha, ref_depth) = outputs["cpu"], outputs["gsplat"]
    assert (rgb - ref_rgb).abs().mean() < 1e-3 and (alpha - ref_alpha).abs().mean() < 1e-3
    covered = (alpha > 0.1) & (ref_alpha > 0.1)
    assert (depth - ref_depth).abs()[covered].mean() < 1e-3
    for name in NAMES:
        cosine = torch.nn.functional.cosine_similarity(
            grads["cpu"][name].flatten(), grads["gsplat"][name].flatten(), dim=0).item()
        assert cosine > 0.95 and math.isfinite(cosine), name
