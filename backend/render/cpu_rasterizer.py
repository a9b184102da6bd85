"""The fast CPU rasterizer: numba kernels behind a torch.autograd.Function, `rasterize`'s API.

Same maths and conventions as the torch twin (`torch_rasterizer`, which the tests compare it
against): EWA projection with the 0.3 px blur and optional antialiasing compensation, alpha
clamped to 0.99 and skipped below 1/255, near/far culling, front-to-back compositing that
stops a pixel at transmittance 1e-4. Work runs in numba's parallel loops on every core:
projection over (image, Gaussian) pairs, binning over chunks of Gaussians and over tiles,
compositing over tiles, the projection's backward over blocks of Gaussians. Any number of
cameras and Gaussian sets go through in one call (see `backend.render.inputs`).

Intermediates are packed: pairs are kept per (tile, visible Gaussian), and per (image,
Gaussian) only where projected; gsplat's `packed` flag has no counterpart here. Gradients
flow to means, quats, scales, opacities and colours; cameras (viewmats, Ks) get none.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numba
import numpy as np
import torch
from torch import Tensor

from backend.render import cpu_project, cpu_raster
from backend.render.inputs import broadcast_raster_inputs
from backend.render.torch_rasterizer import RenderOutput

# Threading layer. numba's OpenMP layer starts a parallel loop in about 2 us, its work-queue
# layer in about 110 us (threads sleep between loops): a call runs 5-7 loops, so one 64 px image
# renders and back-propagates in 11 ms against 19 ms. But OpenMP threads spin after a loop
# (GOMP_SPINCOUNT, 300k by default), which on a busy CPU steals the time slices of the other
# thread and of torch's own OpenMP pool (a separate libgomp). So: OpenMP where numba finds it,
# with its spin cut to 10k (read once, when numba loads its libgomp; torch's libgomp is loaded
# already and keeps its own), else the work queue. An explicit NUMBA_THREADING_LAYER wins.
# Calls take a lock: the work-queue layer takes one caller at a time.
_SPINCOUNT = "10000"


def _start_threads() -> None:
    if "NUMBA_THREADING_LAYER" in os.environ:
        return
    numba.config.THREADING_LAYER = "default"
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "workqueue", "tbb"]
    before = os.environ.get("GOMP_SPINCOUNT")
    os.environ["GOMP_SPINCOUNT"] = before or _SPINCOUNT
    try:
        from numba.np.ufunc import parallel

        parallel._launch_threads()  # loads the layer (and libgomp) now, under this setting
    finally:  # child processes get the environment they had
        if before is None:
            del os.environ["GOMP_SPINCOUNT"]


_start_threads()
_KERNEL_LOCK = threading.Lock()
_BIN_CHUNK_MIN = 1024  # Gaussians per binning work item, at least


@dataclass
class CpuRasterizerConfig:
    tile_size: int = 16  # pixels per tile side
    # backward: one image per thread (True) or one tile per thread with per-thread gradient
    # rows (False); None picks by the number of images (at least 4 per thread: per image)
    grads_by_image: bool | None = None


@dataclass
class _Settings:
    cams_per_set: int
    width: int
    height: int
    near: float
    far: float
    antialiased: bool
    colors_per_camera: bool
    tile_size: int
    grads_by_image: bool | None

    def tiles(self) -> tuple[int, int]:
        return -(-self.width // self.tile_size), -(-self.height // self.tile_size)


def _numpy(t: Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _zeros(shape: tuple[int, ...], dtype=np.float64) -> np.ndarray:
    """np.zeros by np.empty and a fill: numpy advises huge pages for large empty arrays, but
    np.zeros' calloc maps zero pages lazily, one 4 KiB fault each on first write (a 64-camera
    step's pair gradients: 30k faults, tens of ms)."""
    out = np.empty(shape, dtype)
    out.fill(0)
    return out


def _bin(proj: np.ndarray, valid: np.ndarray, s: _Settings) -> tuple[np.ndarray, np.ndarray]:
    """Pairs per tile, each tile's run depth-sorted: tile_start [I * tiles + 1] offsets and
    pairs [P] (Gaussian index). Counting and filling run over chunks of Gaussians of an image
    (several per thread even for one image), sorting over tiles."""
    num_images, n = valid.shape
    tiles_x, tiles_y = s.tiles()
    chunk = max(_BIN_CHUNK_MIN, -(-n // (4 * cpu_project.num_threads())))
    chunks = max(1, -(-n // chunk))
    chunk_counts = _zeros((num_images, chunks, tiles_x * tiles_y), np.int64)
    boxes = np.empty((num_images, n, 4), np.int32)
    cpu_raster.count_pairs(proj, valid, s.tile_size, tiles_x, s.width, s.height, chunk, boxes,
                           chunk_counts)
    tile_start = np.zeros(chunk_counts.shape[0] * chunk_counts.shape[2] + 1, np.int64)
    np.cumsum(chunk_counts.sum(axis=1).ravel(), out=tile_start[1:])
    chunk_start = np.cumsum(chunk_counts, axis=1) - chunk_counts  # within each tile's run
    chunk_start += tile_start[:-1].reshape(num_images, 1, -1)
    pairs = np.empty(int(tile_start[-1]), np.int32)
    depths = np.empty(pairs.shape[0], proj.dtype)
    cpu_raster.fill_pairs(proj, boxes, tiles_x, chunk, chunk_start, pairs, depths)
    cpu_raster.sort_tiles(tile_start, pairs,
                          depths.view(np.uint32 if proj.itemsize == 4 else np.uint64))
    return tile_start, pairs


def _forward_arrays(arrays: dict[str, np.ndarray], s: _Settings) -> dict[str, np.ndarray]:
    """Project, bin and composite; returns the outputs and what the backward pass needs."""
    num_images, n = arrays["viewmats"].shape[0], arrays["means"].shape[1]
    proj = np.empty((num_images, n, cpu_project.PROJ_WIDTH), arrays["means"].dtype)
    valid = np.empty((num_images, n), np.uint8)
    cpu_project.project_all(arrays["means"], arrays["quats"], arrays["scales"],
                            arrays["opacities"], arrays["viewmats"], arrays["Ks"],
                            s.cams_per_set, s.width, s.height, s.near, s.far, s.antialiased,
                            proj, valid)
    tiles_x, tiles_y = s.tiles()
    tile_start, pairs = _bin(proj, valid, s)
    features = arrays["colors"].shape[-1] + 1
    sums = np.empty((num_images, s.height, s.width, features))
    transmittance = np.empty((num_images, s.height, s.width))
    stops = np.empty((num_images, s.height, s.width), np.int32)
    cpu_raster.composite_forward(proj, arrays["colors"], s.cams_per_set, s.colors_per_camera,
                                 tile_start, pairs, s.tile_size, tiles_x, tiles_y, sums,
                                 transmittance, stops)
    return {"proj": proj, "valid": valid, "tile_start": tile_start, "pairs": pairs,
            "sums": sums, "transmittance": transmittance, "stops": stops}


def _backward_arrays(arrays: dict[str, np.ndarray], state: dict[str, np.ndarray],
                     grad_sums: np.ndarray, grad_transmittance: np.ndarray,
                     s: _Settings) -> list[np.ndarray]:
    """Gradients (float64) for means, quats, scales, opacities and colours."""
    tiles_x, tiles_y = s.tiles()
    dtype, features = arrays["means"].dtype, state["sums"].shape[-1]
    by_entry = s.grads_by_image
    if by_entry is None:
        by_entry = state["valid"].shape[0] >= 4 * cpu_project.num_threads()
    slots = 1 if by_entry else cpu_project.num_threads()
    entry_grads = _zeros((slots, *state["valid"].shape, cpu_raster.GRAD_COLUMNS + features),
                         dtype)
    cpu_raster.composite_backward(
        state["proj"], arrays["colors"], s.cams_per_set, s.colors_per_camera,
        state["tile_start"], state["pairs"], s.tile_size, tiles_x, tiles_y, state["sums"],
        state["transmittance"], state["stops"], grad_sums, grad_transmittance, entry_grads,
        by_entry)
    grads = [_zeros(arrays[name].shape) for name in
             ("means", "quats", "scales", "opacities", "colors")]
    cpu_project.project_all_backward(
        arrays["means"], arrays["quats"], arrays["scales"], arrays["opacities"],
        arrays["viewmats"], arrays["Ks"], s.cams_per_set, s.width, s.height, s.antialiased,
        s.colors_per_camera, state["valid"], entry_grads, *grads)
    return grads


class _CpuRasterize(torch.autograd.Function):
    """(Gaussians, cameras) -> feature sums [I, H, W, D+1] (colours, depth) and
    transmittance [I, H, W], with I = B*C images; backward by the numba kernels."""

    @staticmethod
    def forward(ctx, means, quats, scales, opacities, colors, viewmats, Ks, settings):
        # means [G, N, 3], quats [G, N, 4], scales [G, N, 3], opacities [G, N],
        # colors [G, N, D] or [I, N, D], viewmats [I, 4, 4], Ks [I, 3, 3]
        names = ("means", "quats", "scales", "opacities", "colors", "viewmats", "Ks")
        arrays = {name: _numpy(t) for name, t in
                  zip(names, (means, quats, scales, opacities, colors, viewmats, Ks),
                      strict=True)}
        with _KERNEL_LOCK:
            state = _forward_arrays(arrays, settings)
        ctx.arrays, ctx.state, ctx.settings = arrays, state, settings
        dtype = means.dtype
        return (torch.from_numpy(state["sums"]).to(dtype),
                torch.from_numpy(state["transmittance"]).to(dtype))

    @staticmethod
    def backward(ctx, grad_sums, grad_transmittance):
        # grad_sums [I, H, W, D+1], grad_transmittance [I, H, W], read in their own dtype
        with _KERNEL_LOCK:
            grads = _backward_arrays(ctx.arrays, ctx.state, _numpy(grad_sums),
                                     _numpy(grad_transmittance), ctx.settings)
        dtype = grad_sums.dtype
        return (*(torch.from_numpy(g).to(dtype) for g in grads), None, None, None)


def rasterize_cpu(
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
    rasterize_mode: str = "classic",  # "classic" | "antialiased"
    config: CpuRasterizerConfig | None = None,
) -> RenderOutput:
    """Render on the CPU with the numba kernels; outputs [..., C, H, W, *] like the twin."""
    config = config or CpuRasterizerConfig()
    if config.tile_size < 1:
        raise ValueError(f"CpuRasterizerConfig: tile_size must be positive, got {config}")
    batch = broadcast_raster_inputs(means, quats, scales, opacities, colors, viewmats, Ks,
                                    width, height, near, far, background, rasterize_mode)
    if means.device.type != "cpu":
        raise ValueError(f"rasterize_cpu: needs CPU tensors, got device {means.device}")
    if torch.is_grad_enabled() and (viewmats.requires_grad or Ks.requires_grad):
        raise ValueError("rasterize_cpu: no gradients for cameras; use backend='torch'")
    num_batch, num_cams = batch.viewmats.shape[:2]
    channels = batch.colors.shape[-1]
    settings = _Settings(num_cams, int(width), int(height), float(near), float(far),
                         rasterize_mode == "antialiased", batch.colors_per_camera,
                         config.tile_size, config.grads_by_image)
    colors = batch.colors.reshape(-1, *batch.colors.shape[-2:])  # [G or I, N, D]
    sums, transmittance = _CpuRasterize.apply(
        batch.means, batch.quats, batch.scales, batch.opacities, colors,
        batch.viewmats.reshape(-1, 4, 4), batch.Ks.reshape(-1, 3, 3), settings)
    image_shape = (num_batch, num_cams, int(height), int(width))
    sums = sums.reshape(*image_shape, channels + 1)
    transmittance = transmittance.reshape(*image_shape, 1)
    alpha = 1.0 - transmittance
    rgb = sums[..., :channels]
    if batch.background is not None:
        rgb = rgb + transmittance * batch.background[:, :, None, None, :]
    depth = sums[..., channels:] / alpha.clamp(min=1e-10)
    return RenderOutput(*(batch.unflatten(t) for t in (rgb, alpha, depth)))
