"""Evaluation on a fixed, seeded held-out set: PSNR and SSIM against ground truth.

Diffusion, in the paper's two settings, each against its own trivial baseline:

- "row_and_column": row 0 (view 0 at every timestep) and column 0 (every view at timestep 0)
  are given; the baseline copies each view's timestep-0 frame to its later timesteps.
- "row_only": row 0 is given; the baseline copies the input view's frame at each timestep
  to the other views.

Scores are over the generated cells only, as the mean of per-frame PSNR / SSIM (PSNR is
capped at 120 dB for identical frames). Reconstruction: the model sees `num_views` views of
a sample with the rig, its Gaussians are rendered at `recon_held_out_views` further views,
and the renders are scored against them. Held-out samples are generator indices from
`HELD_OUT_START` on, far beyond any training stream.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from backend import models as registry
from backend.cameras import project_points, scale_intrinsics, unproject_depth
from backend.data import DataConfig, Sample, make_sample
from backend.devices import resolve_device
from backend.diffusion.model import VideoDiT
from backend.diffusion.sampler import EulerSampler
from backend.recon import ReconModel, render_gaussian_batch, ssim
from backend.train.diffusion import cache_for_batch, grid_rays

HELD_OUT_START = 1_000_000_000
SETTINGS = ("row_and_column", "row_only")
PSNR_CAP_MSE = 1e-12  # mean squared error floor: 120 dB
FAMILIES = ("dome", "open")
METRIC_KEYS = ("psnr_generated", "psnr_copy_baseline", "ssim_generated", "ssim_copy_baseline")


@dataclass
class EvalConfig:
    """The held-out set, the sampler and where the report goes.

    Frame size comes from the model's `image_size`; `data_overrides` sets any other
    `DataConfig` field of the held-out generator (its seed, rigs, ...); `families` lists the
    scene families scored, each setting `scene_kind` over `data_overrides`. `attention_impl`
    None keeps the model's own (normally "auto": the merged kernel on the CPU, compiled
    FlexAttention on CUDA).
    """

    num_samples: int = 8
    held_out_start: int = HELD_OUT_START
    held_out_kind: str = "dynamic"
    num_views: int = 4
    num_steps: int = 8
    recon_held_out_views: int = 2
    data_overrides: dict[str, Any] = field(default_factory=dict)
    families: tuple[str, ...] = FAMILIES
    sampler_steps: int = 16
    guidance: float = 1.0
    shift: float = 1.0
    batch_size: int = 4
    seed: int = 0
    grid_samples: int = 2
    attention_impl: str | None = None
    device: str = "auto"
    output_dir: str = "out/eval"

    def __post_init__(self) -> None:
        for name in ("num_samples", "num_views", "num_steps", "recon_held_out_views",
                     "sampler_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"EvalConfig.{name}: must be >= 1, got {getattr(self, name)}")
        if self.num_views < 2 or self.num_steps < 2:
            raise ValueError("EvalConfig: the diffusion settings need >= 2 views and timesteps")
        if self.held_out_kind not in ("dynamic", "static", "homography"):
            raise ValueError(f"EvalConfig.held_out_kind: expected dynamic, static or "
                             f"homography, got {self.held_out_kind!r}")
        if self.held_out_start < 0 or self.grid_samples < 1:
            raise ValueError("EvalConfig: held_out_start must be >= 0 and grid_samples >= 1")
        self.families = tuple(self.families)
        if not self.families or len(set(self.families)) != len(self.families) \
                or not set(self.families) <= set(FAMILIES):
            raise ValueError(f"EvalConfig.families: distinct names out of {FAMILIES}, "
                             f"got {self.families!r}")

    def data_config(self, image_size: tuple[int, int], num_views: int,
                    family: str | None = None) -> DataConfig:
        """The held-out generator's config; `family` sets its `scene_kind`."""
        height, width = image_size
        family_kind = {} if family is None else {"scene_kind": family}
        return DataConfig(**{"num_views": num_views, "num_steps": self.num_steps,
                             "height": height, "width": width, **self.data_overrides,
                             **family_kind})


def held_out_samples(data: DataConfig, config: EvalConfig) -> list[Sample]:
    """The fixed held-out set: generator samples `held_out_start + i` of the chosen kind."""
    return [make_sample(data, config.held_out_start + i, kind=config.held_out_kind)
            for i in range(config.num_samples)]


def setting_mask(setting: str, num_views: int, num_steps: int) -> Tensor:  # [V, T] bool
    """Given cells of a diffusion setting (True = given)."""
    if setting not in SETTINGS:
        raise ValueError(f"setting: expected one of {SETTINGS}, got {setting!r}")
    mask = torch.zeros(num_views, num_steps, dtype=torch.bool)
    mask[0, :] = True
    if setting == "row_and_column":
        mask[:, 0] = True
    return mask


def copy_baseline(
    frames: Tensor,  # [B, V, T, 3, H, W]
    setting: str,
) -> Tensor:  # [B, V, T, 3, H, W]
    """The trivial prediction of a setting (see the module docstring)."""
    if setting == "row_and_column":
        return frames[:, :, :1].expand_as(frames)
    if setting == "row_only":
        return frames[:, :1].expand_as(frames)
    raise ValueError(f"setting: expected one of {SETTINGS}, got {setting!r}")


def frame_psnr(
    x: Tensor,  # [..., C, H, W] in [0, 1]
    y: Tensor,  # [..., C, H, W]
) -> Tensor:  # [...]
    """PSNR of each frame pair in dB, capped at 120 dB."""
    mse = (x.float() - y.float()).square().mean(dim=(-3, -2, -1))
    return 10 * torch.log10(1.0 / mse.clamp(min=PSNR_CAP_MSE))


def scored_cells(
    prediction: Tensor,  # [B, V, T, 3, H, W]
    truth: Tensor,  # [B, V, T, 3, H, W]
    cells: Tensor,  # [V, T] bool, the cells to score
) -> tuple[Tensor, Tensor]:  # PSNR, SSIM of each scored cell: [B * cells]
    pred, true = prediction[:, cells], truth[:, cells]  # [B, K, 3, H, W]
    return frame_psnr(pred, true).reshape(-1), ssim(pred.float(), true.float()).reshape(-1)


def load_model(kind: str, weights: str | Path, device: torch.device,
               attention_impl: str | None = None) -> tuple[nn.Module, Any]:
    """(model, config) of a checkpoint through the model registry; `kind` ("diffusion" or
    "recon") must match it, `attention_impl` chooses the diffusion model's kernel."""
    roles = {"diffusion": "diffusion", "recon": "reconstruction"}
    if kind not in roles:
        raise ValueError(f"model kind: expected 'diffusion' or 'recon', got {kind!r}")
    impl = attention_impl if kind == "diffusion" else None  # the recon model has one kernel
    model = registry.load_model(weights, device, role=roles[kind], attention_impl=impl)
    return model, model.config


def _stack(samples: list[Sample], name: str) -> Tensor:
    return torch.stack([getattr(s, name) for s in samples])


def generate_setting(model: VideoDiT, samples: list[Sample], setting: str,
                     config: EvalConfig, device: torch.device) -> tuple[Tensor, Tensor]:
    """Generated grids [B, V, T, 3, H, W] in [0, 1] and the setting's mask [V, T]."""
    V, T = samples[0].num_views, samples[0].num_steps
    mask = setting_mask(setting, V, T)
    sampler = EulerSampler(steps=config.sampler_steps, guidance=config.guidance,
                           shift=config.shift)
    outputs = []
    for first in range(0, len(samples), config.batch_size):
        chunk = samples[first:first + config.batch_size]
        frames = _stack(chunk, "frames").to(device)  # [b, V, T, 3, H, W]
        H, W = frames.shape[-2:]
        rays = None
        if model.config.use_camera_rays:
            valid = torch.tensor([s.geometry_valid for s in chunk], device=device)
            rays = grid_rays(_stack(chunk, "c2w").to(device),
                             _stack(chunk, "intrinsics").to(device), valid, H, W)
        generator = torch.Generator(device=device)
        seed = np.random.SeedSequence([config.seed, SETTINGS.index(setting), first])
        generator.manual_seed(int(seed.generate_state(1)[0]))
        cell_mask = mask.to(device).expand(len(chunk), V, T)
        cache = None
        if model.config.cache_conditioning:
            tensors = [s.to_tensors() for s in chunk]
            batch = {name: torch.stack([t[name] for t in tensors]).to(device)
                     for name in ("depth", "c2w", "intrinsics", "geometry_valid", "has_depth")}
            cache = cache_for_batch(frames * 2 - 1, batch, cell_mask)
        grid = sampler.sample(model, frames * 2 - 1, cell_mask, rays=rays, generator=generator,
                              cache=cache)
        outputs.append(((grid + 1) / 2).clamp(0, 1).cpu())
    return torch.cat(outputs), mask


def evaluate_diffusion(model: VideoDiT, samples: list[Sample], config: EvalConfig,
                       device: torch.device) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Scores of both settings and their image grids (ground truth | generated)."""
    truth = _stack(samples, "frames")  # [B, V, T, 3, H, W]
    settings, images = {}, {}
    for setting in SETTINGS:
        generated, mask = generate_setting(model, samples, setting, config, device)
        psnr_gen, ssim_gen = scored_cells(generated, truth, ~mask)
        psnr_copy, ssim_copy = scored_cells(copy_baseline(truth, setting), truth, ~mask)
        settings[setting] = {
            "psnr_generated": float(psnr_gen.mean()), "psnr_copy_baseline": float(psnr_copy.mean()),
            "ssim_generated": float(ssim_gen.mean()), "ssim_copy_baseline": float(ssim_copy.mean()),
            "psnr_gain_db": float(psnr_gen.mean() - psnr_copy.mean()),
            "generated_cells_per_sample": int((~mask).sum())}
        shown = slice(0, config.grid_samples)
        images[setting] = image_grid(truth[shown], generated[shown], mask)
    report: dict[str, Any] = {"model": "diffusion", "settings": settings,
                              **settings["row_and_column"]}
    report.update({f"{key}_row_only": settings["row_only"][key] for key in METRIC_KEYS})
    return report, images


def held_out_views(num_views: int, count: int, interior: bool,
                   rng: np.random.Generator) -> list[int]:
    """Views to hold out of a sample: random ones, or with `interior` random ones that are
    neither the rig's first nor its last camera (so that on arcs they are interpolated,
    not extrapolated; on rings every view is interior anyway)."""
    pool = range(1, num_views - 1) if interior and num_views - 2 >= count else range(num_views)
    return sorted(int(v) for v in rng.choice(list(pool), count, replace=False))


VISIBILITY_DEPTH_TOLERANCE = 0.05  # relative z-depth agreement for "the same surface point"


def seen_by_inputs(
    sample: Sample,
    view: int,
    inputs: list[int],
    tolerance: float = VISIBILITY_DEPTH_TOLERANCE,
) -> Tensor:  # [T, H, W] bool
    """Pixels of `view` whose surface point (ground-truth depth) some input view sees at
    the same timestep: it projects inside that view and agrees with its depth there (so
    occluded points do not count). Samples without depth raise ValueError."""
    if sample.depth is None:
        raise ValueError("the visibility ceiling needs samples with depth")
    H, W = sample.depth.shape[-2:]
    c2w, intr = sample.c2w.double(), sample.intrinsics.double()
    depth = sample.depth[:, :, 0].double()  # [V, T, H, W]
    points = unproject_depth(depth[view], c2w[view], intr[view]).reshape(-1, H * W, 3)
    seen = torch.zeros(depth.shape[1], H * W, dtype=torch.bool)  # [T, H*W]
    for source in inputs:
        scaled = scale_intrinsics(intr[source], W, H)  # [T, 6]
        uv, z = project_points(points, c2w[source], scaled)  # [T, H*W, 2], [T, H*W]
        inside = (z > 0) & (uv[..., 0] >= 0) & (uv[..., 0] < W) & (uv[..., 1] >= 0) \
            & (uv[..., 1] < H)
        x = uv[..., 0].clamp(0, W - 1).long()
        y = uv[..., 1].clamp(0, H - 1).long()
        there = torch.gather(depth[source].reshape(-1, H * W), 1, y * W + x)  # [T, H*W]
        seen |= inside & ((there - z).abs() <= tolerance * z.abs())
    return (seen & (depth[view].reshape(-1, H * W) > 0)).reshape(-1, H, W)


def visibility_ceiling(sample: Sample, held: list[int], inputs: list[int],
                       background: Tensor) -> tuple[Tensor, Tensor]:
    """Per-frame PSNR [len(held) * T] of the best render that invents nothing - exact
    wherever an input view saw the surface, `background` elsewhere - and the unseen
    fraction of each frame."""
    truth = sample.frames[held]  # [h, T, 3, H, W]
    seen = torch.stack([seen_by_inputs(sample, v, inputs) for v in held])  # [h, T, H, W]
    best = torch.where(seen[:, :, None], truth, background.view(1, 1, 3, 1, 1).to(truth))
    psnr = frame_psnr(best.reshape(-1, *truth.shape[2:]), truth.reshape(-1, *truth.shape[2:]))
    return psnr, 1.0 - seen.float().mean(dim=(-1, -2)).reshape(-1)


DEPTH_TOLERANCE = 0.1  # a sample's depth is "metric" when its median ratio is within 10%
GROUND_TOLERANCE = 1e-3  # ground pixels: world height within this x the scene's scale


def depth_scores(
    pred: Tensor,  # [V, T, H, W] predicted z-depth at the input views
    sample: Sample,
    views: list[int],  # the input views of `sample`, in `pred`'s order
) -> dict[str, float]:
    """One sample's depth against its ground truth at the input views: the median of
    predicted / true depth (1 is metric; the reconstruction's Gaussians sit at that depth)
    and the mean relative error |pred - true| / true, over the pixels with true depth
    (sky and empty pixels have none). Open scenes also split the ratio into the ground's
    pixels (their world point at the ground's height) and the objects'."""
    truth = sample.depth[views, :, 0].double()  # [V, T, H, W]
    pred = pred.double()
    if pred.shape != truth.shape:
        raise ValueError(f"depth_scores: predicted depth {list(pred.shape)} for true depth "
                         f"{list(truth.shape)}")
    valid = (truth > 0) & torch.isfinite(truth) & torch.isfinite(pred)
    if not bool(valid.any()):
        return {}
    ratio = pred / truth.clamp(min=1e-12)
    scores = {"median_ratio": float(ratio[valid].median()),
              "abs_rel": float((ratio[valid] - 1).abs().mean())}
    info = sample.scene_info or {}
    if "ground_height" in info:
        points = unproject_depth(truth, sample.c2w[views].double(),
                                 sample.intrinsics[views].double())  # [V, T, H, W, 3]
        tolerance = GROUND_TOLERANCE * max(float(info.get("scale", 1.0)), 1e-6)
        ground = valid & ((points[..., 2] - info["ground_height"]).abs() < tolerance)
        for name, mask in (("ground", ground), ("objects", valid & ~ground)):
            if bool(mask.any()):
                scores[f"median_ratio_{name}"] = float(ratio[mask].median())
    return scores


def summarise_depth(per_sample: list[dict[str, float]]) -> dict[str, float | None]:
    """Report keys from `depth_scores` of each sample: medians over samples of the median
    ratios, the mean relative error, and the share of samples within `DEPTH_TOLERANCE`."""
    def values(key: str) -> list[float]:
        return [s[key] for s in per_sample if key in s]

    def median(key: str) -> float | None:
        found = values(key)
        return float(np.median(found)) if found else None

    ratios = values("median_ratio")
    report = {"depth_median_ratio": median("median_ratio"),
              "depth_median_ratio_ground": median("median_ratio_ground"),
              "depth_median_ratio_objects": median("median_ratio_objects"),
              "depth_abs_rel": float(np.mean(values("abs_rel"))) if ratios else None,
              "depth_within_10pct": (float(np.mean([abs(r - 1) <= DEPTH_TOLERANCE
                                                    for r in ratios])) if ratios else None)}
    return report


def evaluate_recon(model: ReconModel, samples: list[Sample], config: EvalConfig,
                   device: torch.device) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Scores of renders at held-out views (and at the input views) and an image grid.

    `psnr_recon`/`ssim_recon` hold out interior views of each rig; `*_any_views` hold out
    views drawn from the whole rig, first and last camera included (extrapolation on arcs).
    Parts of the backdrop that no input view saw hold no Gaussians: renders fill them with
    the mean colour of the input frames (`*_black_background`: with black, as trained).
    `psnr_recon_visibility_ceiling` is what a reconstruction that invents nothing could reach
    at the same held-out views (exact wherever an input view saw the surface at that
    timestep, the fill colour elsewhere; `recon_held_out_unseen_fraction` of the pixels).
    `depth_*` score the predicted depth at the input views against the truth (see
    `depth_scores`; samples without metric depth are left out)."""
    scores: dict[str, list[Tensor]] = {k: [] for k in ("held", "held_ssim", "inputs", "any",
                                                      "any_ssim", "black", "ceiling",
                                                      "unseen")}
    truths, renders, depths = [], [], []
    for sample in samples:
        frames = sample.frames[None].to(device)  # [1, V, T, 3, H, W]
        c2w, intr = sample.c2w[None].to(device), sample.intrinsics[None].to(device)
        H, W = frames.shape[-2:]
        for interior in (True, False):
            rng = np.random.default_rng([config.seed, sample.index])
            held = held_out_views(sample.num_views, config.recon_held_out_views, interior, rng)
            inputs = [v for v in range(sample.num_views) if v not in held]
            background = frames[0, inputs].mean(dim=(0, 1, 3, 4))  # [3]
            with torch.no_grad():
                out = model(frames[:, inputs], c2w[:, inputs], intr[:, inputs])
                rgb = render_gaussian_batch(out.gaussians, c2w, intr, H, W,
                                            background=background).rgb.clamp(0, 1)
                black = None
                if interior:
                    black = render_gaussian_batch(out.gaussians, c2w, intr, H, W).rgb
            rgb, truth = rgb.cpu(), sample.frames[None]
            is_held = torch.zeros(sample.num_views, sample.num_steps, dtype=torch.bool)
            is_held[held] = True
            p, s = scored_cells(rgb, truth, is_held)
            if black is not None:
                scores["black"].append(scored_cells(black.clamp(0, 1).cpu(), truth, is_held)[0])
            if interior and sample.depth is not None and sample.geometry_valid:
                ceiling, unseen = visibility_ceiling(sample, held, inputs, background.cpu())
                scores["ceiling"].append(ceiling)
                scores["unseen"].append(unseen)
                depths.append(depth_scores(out.depth[0].cpu(), sample, inputs))
            if interior:
                scores["held"].append(p)
                scores["held_ssim"].append(s)
                scores["inputs"].append(scored_cells(rgb, truth, ~is_held)[0])
                truths.append(truth[0, held])
                renders.append(rgb[0, held])
            else:
                scores["any"].append(p)
                scores["any_ssim"].append(s)
    shown = slice(0, config.grid_samples)

    def mean(key: str) -> float | None:
        return float(torch.cat(scores[key]).mean()) if scores[key] else None

    report = {"model": "recon", "psnr_recon": mean("held"), "ssim_recon": mean("held_ssim"),
              "psnr_recon_input_views": mean("inputs"), "psnr_recon_any_views": mean("any"),
              "ssim_recon_any_views": mean("any_ssim"),
              "psnr_recon_black_background": mean("black"),
              "psnr_recon_visibility_ceiling": mean("ceiling"),
              "recon_held_out_unseen_fraction": mean("unseen"), "input_views": config.num_views,
              "held_out_views": config.recon_held_out_views, **summarise_depth(depths)}
    grid = image_grid(torch.stack(truths[shown]), torch.stack(renders[shown]))
    return report, {"recon": grid}


def _to_uint8(x: Tensor) -> np.ndarray:  # [3, H, W] in [0, 1] -> [H, W, 3]
    return (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def _panel(grid: Tensor, given: Tensor | None, gap: int) -> np.ndarray:
    """A [V, T, 3, H, W] grid as one image, rows = views; given cells get a green frame."""
    V, T, _, H, W = grid.shape
    panel = np.full((V * (H + gap) - gap, T * (W + gap) - gap, 3), 255, np.uint8)
    for v in range(V):
        for t in range(T):
            cell = _to_uint8(grid[v, t])
            if given is not None and bool(given[v, t]):
                cell[[0, -1], :] = (0, 200, 0)
                cell[:, [0, -1]] = (0, 200, 0)
            y, x = v * (H + gap), t * (W + gap)
            panel[y:y + H, x:x + W] = cell
    return panel


def image_grid(
    truth: Tensor,  # [B, V, T, 3, H, W] in [0, 1]
    generated: Tensor,  # [B, V, T, 3, H, W]
    given: Tensor | None = None,  # [V, T] bool, framed in the generated panel
    gap: int = 4,
) -> np.ndarray:  # [H', W', 3] uint8
    """Ground truth | generated side by side, one row of panels per sample."""
    rows = []
    for b in range(truth.shape[0]):
        left, right = _panel(truth[b], None, gap), _panel(generated[b], given, gap)
        spacer = np.full((left.shape[0], 4 * gap, 3), 255, np.uint8)
        rows.append(np.concatenate([left, spacer, right], axis=1))
    spacer = np.full((4 * gap, rows[0].shape[1], 3), 255, np.uint8)
    parts = [part for row in rows for part in (row, spacer)][:-1]
    return np.concatenate(parts, axis=0)


def grid_name(family: str, name: str) -> str:
    """File stem of an image grid: the dome family keeps the earlier names."""
    return f"grid_{name}" if family == "dome" else f"grid_{family}_{name}"


def run_evaluation(kind: str, weights: str | Path, config: EvalConfig) -> dict[str, Any]:
    """Evaluate one trained model on every family; write `eval_<kind>.json` and
    `grid_*.png` files. The first family's figures stay at the top level."""
    import imageio.v3 as iio

    device = resolve_device(config.device)
    impl = config.attention_impl
    model, model_config = load_model(kind, weights, device, impl)
    extra_views = config.recon_held_out_views if kind == "recon" else 0
    evaluate = evaluate_diffusion if kind == "diffusion" else evaluate_recon
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    families: dict[str, dict[str, Any]] = {}
    for family in config.families:
        data = config.data_config(model_config.image_size, config.num_views + extra_views,
                                  family)
        samples = held_out_samples(data, config)
        report, images = evaluate(model, samples, config, device)
        report.update(family=family, num_samples=len(samples),
                      held_out={"start": config.held_out_start, "kind": config.held_out_kind,
                                "data": data.to_dict()}, images={})
        for name, image in images.items():
            path = out / f"{grid_name(family, name)}.png"
            iio.imwrite(path, image)
            report["images"][name] = str(path)
        families[family] = report
    report = {**families[config.families[0]], "weights": str(weights),
              "eval_config": asdict(config), "families": families}
    (out / f"eval_{kind}.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def headline(diffusion: dict[str, Any], recon: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of one family's diffusion and recon reports."""
    figures = {key: diffusion[key] for key in METRIC_KEYS}
    figures.update({f"{key}_row_only": diffusion[f"{key}_row_only"] for key in METRIC_KEYS})
    figures.update(psnr_recon=recon["psnr_recon"], ssim_recon=recon["ssim_recon"],
                   psnr_recon_visibility_ceiling=recon["psnr_recon_visibility_ceiling"],
                   depth_median_ratio=recon["depth_median_ratio"])
    return figures


def evaluate_all(diffusion_weights: str | Path, recon_weights: str | Path,
                 config: EvalConfig) -> dict[str, Any]:
    """Both evaluations and one `report.json`: the first family's headline figures at the
    top level, every family's under `families`."""
    diffusion = run_evaluation("diffusion", diffusion_weights, config)
    recon = run_evaluation("recon", recon_weights, config)
    families = {family: headline(diffusion["families"][family], recon["families"][family])
                for family in config.families}
    report = {**families[config.families[0]], "families": families,
              "diffusion": diffusion, "recon": recon}
    path = Path(config.output_dir) / "report.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return report
