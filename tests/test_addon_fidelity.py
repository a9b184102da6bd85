"""Fidelity of imported Gaussians in real Blender: a sharp synthetic asset (anisotropic flat
splats on a checkered sphere and box, soft floating blobs) imported with the add-on, rendered
by Cycles and EEVEE and compared with the backend's reference rasterizer at the same camera.

Run as a script for the full-size figures recorded in docs/BENCHMARKS.md:
    .venv/bin/python tests/test_addon_fidelity.py --size 192 --cycles-samples 16 \
        --eevee-samples 1 --out out/fidelity
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from blender_support import add_camera, addon_module, bpy, empty_scene

pytestmark = pytest.mark.blender

pointcloud = addon_module("pointcloud")
rig = addon_module("rig")
Gaussians = addon_module("vendor.gaussians").Gaussians


def _frame(normals: np.ndarray) -> np.ndarray:
    """Quaternions (wxyz) [N, 4] of rotations whose third axis is `normals` [N, 3]."""
    from mathutils import Vector

    quats = []
    for n in normals:
        q = Vector(n).to_track_quat("Z", "Y")
        quats.append((q.w, q.x, q.y, q.z))
    return np.array(quats, np.float32)


def _checker(points: np.ndarray, cell: float, dark, light) -> np.ndarray:
    parity = np.floor(points / cell).astype(int).sum(axis=1) % 2
    return np.where(parity[:, None] == 0, np.array(dark), np.array(light))


def synthetic_asset(seed: int = 0, count: int = 7000) -> Gaussians:
    """About `count` Gaussians: a checkered sphere and box of flat tangent splats (two tiny
    scales in the plane, a thin third), and soft coloured blobs floating around them."""
    rng = np.random.default_rng(seed)
    n_sphere, n_box, n_blob = int(count * 0.55), int(count * 0.4), count - int(count * 0.95)
    normals = rng.normal(size=(n_sphere, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    sphere_mu = normals * 0.55 + np.array([-0.45, 0.0, 0.1])
    sphere_rgb = _checker(normals * 0.55, 0.22, (0.9, 0.15, 0.1), (0.95, 0.9, 0.8))
    box = rng.uniform(-0.35, 0.35, (n_box, 3))
    axis = rng.integers(0, 3, n_box)
    box[np.arange(n_box), axis] = np.where(rng.random(n_box) < 0.5, -0.35, 0.35)
    box_normals = np.zeros_like(box)
    box_normals[np.arange(n_box), axis] = np.sign(box[np.arange(n_box), axis])
    box_mu = box + np.array([0.55, 0.1, -0.15])
    box_rgb = _checker(box, 0.175, (0.1, 0.2, 0.7), (0.2, 0.85, 0.3))
    blob_mu = rng.uniform(-1.0, 1.0, (n_blob, 3)) * np.array([1.3, 0.4, 1.0]) - (0, 0.6, 0)
    blob_rgb = rng.uniform(0.1, 1.0, (n_blob, 3))
    flat = np.log(np.stack([rng.uniform(0.02, 0.04, n_sphere + n_box),
                            rng.uniform(0.012, 0.03, n_sphere + n_box),
                            np.full(n_sphere + n_box, 0.002)], axis=1))
    blobs = np.log(rng.uniform(0.03, 0.09, (n_blob, 3)))
    surface_quats = _frame(np.concatenate([normals, box_normals]))
    twist = rng.uniform(0, np.pi, n_sphere + n_box)  # spin each splat about its normal
    spin = np.stack([np.cos(twist / 2), 0 * twist, 0 * twist, np.sin(twist / 2)], axis=1)
    surface_quats = _quat_mul(surface_quats, spin)
    opacities = np.concatenate([rng.uniform(0.85, 0.99, n_sphere + n_box),
                                rng.uniform(0.3, 0.8, n_blob)])
    return Gaussians.from_activated(
        means=np.concatenate([sphere_mu, box_mu, blob_mu]),
        quats=np.concatenate([surface_quats, rng.normal(size=(n_blob, 4))]),
        scales=np.exp(np.concatenate([flat, blobs])), opacities=opacities,
        colors=np.concatenate([sphere_rgb, box_rgb, blob_rgb]))


def _quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    w1, x1, y1, z1 = a.T
    w2, x2, y2, z2 = b.T
    return np.stack([w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2, w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
                     w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2, w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2],
                    axis=1)


def fidelity_scene(size: int, gaussians: Gaussians, config=None):
    """An empty scene (black, no world) with the asset imported and a camera looking at it."""
    scene = empty_scene()
    scene.render.resolution_x = scene.render.resolution_y = size
    scene.camera = add_camera(scene, "View", location=(0.6, -3.4, 1.2),
                              rotation=(math.radians(72), 0.0, math.radians(10)), lens=40)
    root = pointcloud.build_asset(scene, "Synthetic", [gaussians], [1], config)
    bpy.context.view_layer.update()
    scene.render.film_transparent = False
    scene.render.image_settings.file_format = "PNG"
    scene.render.image_settings.color_mode = "RGB"
    return scene, root


def render(scene, engine: str, samples: int, path: Path) -> np.ndarray:
    """Render the scene's camera with `engine`; [H, W, 3] float in 0..1 as written."""
    scene.render.engine = engine
    if engine == "CYCLES":
        scene.cycles.device, scene.cycles.samples = "CPU", samples
        scene.cycles.use_denoising = False
        scene.cycles.pixel_filter_type = "BOX"
        scene.cycles.filter_width = 0.01  # samples at pixel centres, as 3DGS does
    else:
        scene.eevee.taa_render_samples = samples
        scene.render.filter_size = 0.0
    scene.render.filepath = str(path)
    bpy.ops.render.render(write_still=True)
    image = bpy.data.images.load(str(path))
    w, h = image.size
    pixels = np.array(image.pixels[:], np.float32).reshape(h, w, -1)[::-1, :, :3].copy()
    bpy.data.images.remove(image)
    return pixels


def reference(scene, gaussians: Gaussians, mode: str = "classic") -> np.ndarray:
    """The backend's reference rasterizer at the scene camera, over black: [H, W, 3]."""
    import torch

    from backend.render import rasterize_gaussians

    c2w = rig.opencv_c2w(scene.camera.matrix_world)[None]
    intrinsics = rig.camera_intrinsics(scene.camera, scene.render)[None]
    with torch.no_grad():
        out = rasterize_gaussians(gaussians, c2w, intrinsics, backend="torch",
                                  rasterize_mode=mode)
    return out.rgb[0].clamp(0, 1).numpy()


def _blur(image: np.ndarray, size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Separable Gaussian window over H and W of [H, W, C], valid part only."""
    coords = np.arange(size) - (size - 1) / 2
    window = np.exp(-0.5 * (coords / sigma) ** 2)
    window /= window.sum()
    rows = sum(w * image[i:image.shape[0] - size + 1 + i] for i, w in enumerate(window))
    return sum(w * rows[:, i:rows.shape[1] - size + 1 + i] for i, w in enumerate(window))


def scores(image: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """PSNR (dB) and SSIM (Wang et al., 11-px Gaussian window) of [H, W, 3] images in 0..1,
    against the reference quantised to 8 bits as the render is."""
    x = image.astype(np.float64)
    y = np.round(np.clip(truth, 0, 1) * 255) / 255
    psnr = 10 * np.log10(1.0 / max(np.mean((x - y) ** 2), 1e-12))
    mu_x, mu_y = _blur(x), _blur(y)
    var_x, var_y = _blur(x * x) - mu_x**2, _blur(y * y) - mu_y**2
    cov = _blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)
            / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)))
    return float(psnr), float(ssim.mean())


def measure(size: int, cycles_samples: int, eevee_samples: int, out: Path,
            engines=("CYCLES", "BLENDER_EEVEE"), config=None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    gaussians = synthetic_asset()
    scene, _ = fidelity_scene(size, gaussians, config)
    mode = "antialiased" if config is not None and config.antialiased else "classic"
    truth = reference(scene, gaussians, mode)
    import imageio.v3 as iio

    iio.imwrite(out / "reference.png", (np.clip(truth, 0, 1) * 255).round().astype(np.uint8))
    results = {}
    for engine in engines:
        start = time.perf_counter()
        samples = cycles_samples if engine == "CYCLES" else eevee_samples
        image = render(scene, engine, samples, out / f"{engine.lower()}.png")
        results[engine] = (*scores(image, truth), time.perf_counter() - start)
    return results


@pytest.mark.parametrize(("engine", "samples", "sorted_blending", "floor"), [
    ("CYCLES", 4, True, 30.0),
    ("BLENDER_EEVEE", 1, True, 40.0),
    pytest.param("BLENDER_EEVEE", 16, False, 23.0, marks=pytest.mark.slow),  # ~2 min
])
def test_render_matches_reference_rasterizer(engine, samples, sorted_blending, floor, tmp_path):
    """Cycles and EEVEE at 64x64 against the reference rasterizer. The ico-sphere coverage,
    linear-light material without dilation scored 20.7 dB (Cycles) and 18.7 dB (EEVEE) here;
    this one 38.9 dB (Cycles, 4 samples), 47.7 dB (EEVEE sorted and blended, 1 sample) and
    24.4 dB (EEVEE dithered, 16 samples)."""
    config = pointcloud.PointCloudConfig(sorted_blending=sorted_blending)
    result = measure(64, samples, samples, tmp_path, engines=(engine,), config=config)
    psnr, ssim, _ = result[engine]
    assert psnr > floor, f"{engine}: PSNR {psnr:.2f} dB (SSIM {ssim:.3f})"


def test_antialiased_assets_render_as_the_rasterizers_antialiased_mode(tmp_path):
    """Gaussians fitted in gsplat's antialiased mode (their opacity spread over the 0.3 px
    blur): Cycles against the rasterizer in that mode, and against the classic mode, which
    the compensation must move it away from."""
    config = pointcloud.PointCloudConfig(antialiased=True)
    psnr, ssim, _ = measure(64, 4, 1, tmp_path, engines=("CYCLES",), config=config)["CYCLES"]
    assert psnr > 30.0, f"PSNR {psnr:.2f} dB (SSIM {ssim:.3f})"
    import imageio.v3 as iio

    cycles = iio.imread(tmp_path / "cycles.png")[..., :3].astype(np.float64) / 255
    gaussians = synthetic_asset()
    scene, _ = fidelity_scene(64, gaussians, pointcloud.PointCloudConfig())
    classic_psnr, _ = scores(cycles, reference(scene, gaussians, "classic"))
    assert psnr > classic_psnr + 1.0, (psnr, classic_psnr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--cycles-samples", type=int, default=16)
    parser.add_argument("--eevee-samples", type=int, default=1)
    parser.add_argument("--engines", default="CYCLES,BLENDER_EEVEE")
    parser.add_argument("--dithered", action="store_true",
                        help="EEVEE's dithered transparency instead of sorted blending")
    parser.add_argument("--out", type=Path, default=Path("out/fidelity"))
    args = parser.parse_args(argv)
    results = measure(args.size, args.cycles_samples, args.eevee_samples, args.out,
                      engines=tuple(args.engines.split(",")),
                      config=pointcloud.PointCloudConfig(sorted_blending=not args.dithered))
    for engine, (psnr, ssim, seconds) in results.items():
        print(f"{engine}: PSNR {psnr:.2f} dB  SSIM {ssim:.4f}  ({seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
