"""Training of the 4D video diffusion model (rectified flow over V x T grids).

Frames are scaled to [-1, 1]. Each sample gets a cell mask from one of the paper's settings:
row 0 + column 0 given (a fixed-view video plus a freeze-time column), row 0 only, or random
cells. Plucker rays of the rig condition every cell; they are zero for samples whose
cameras do not describe the frames (2D-transformed videos).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from backend.cameras import plucker_rays
from backend.data import DataConfig
from backend.diffusion.cache import render_cache
from backend.diffusion.config import DiffusionConfig
from backend.diffusion.losses import TIME_DISTRIBUTIONS, rectified_flow_loss
from backend.diffusion.model import VideoDiT
from backend.train.common import (
    DistributedContext,
    TrainingJob,
    TrainLoopConfig,
    batch_stream,
    run_training,
    setup_distributed,
    training_samples,
    unwrap,
)

MASK_POLICIES = ("row_and_column", "row", "random")


def _default_data() -> DataConfig:
    return DataConfig(num_views=4, num_steps=8, height=64, width=64)


def _default_mask_weights() -> dict[str, float]:
    return {"row_and_column": 0.4, "row": 0.4, "random": 0.2}


@dataclass
class DiffusionTrainConfig(TrainLoopConfig):
    """Training of `VideoDiT`: model preset + overrides, data, and the cell-mask mix.

    The model's `image_size` is the data's frame size. `mask_weights` are the relative
    frequencies of the mask policies; "random" gives each cell with probability
    `random_given_fraction` (at least one cell given and one generated).
    `changed_pixel_weight` w > 0 weights each pixel whose colour differs from its view's
    first frame by more than `changed_pixel_threshold` (any channel, in [0, 1] units) by
    1 + w within its cell: the loss then pays for what moves, not only for the backdrop
    that a copy of the first frame already gets right.
    """

    preset: str = "tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=_default_data)
    mask_weights: dict[str, float] = field(default_factory=_default_mask_weights)
    random_given_fraction: float = 0.3
    time_distribution: str = "logit_normal"
    time_shift: float = 1.0
    terminal_fraction: float = 0.0
    gradient_checkpointing: bool = False
    changed_pixel_weight: float = 0.0
    changed_pixel_threshold: float = 0.05
    output_dir: str = "out/train/diffusion"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.mask_weights = dict(self.mask_weights)
        unknown = sorted(set(self.mask_weights) - set(MASK_POLICIES))
        weights = list(self.mask_weights.values())
        if unknown or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"DiffusionTrainConfig.mask_weights: need non-negative weights "
                             f"over {MASK_POLICIES} with a positive sum, got {self.mask_weights}")
        if not 0 < self.random_given_fraction < 1:
            raise ValueError(f"DiffusionTrainConfig.random_given_fraction: must be in (0, 1), "
                             f"got {self.random_given_fraction}")
        if self.time_distribution not in TIME_DISTRIBUTIONS:
            raise ValueError(f"DiffusionTrainConfig.time_distribution: expected one of "
                             f"{TIME_DISTRIBUTIONS}, got {self.time_distribution!r}")
        if not self.time_shift > 0 or not 0 <= self.terminal_fraction <= 1:
            raise ValueError(f"DiffusionTrainConfig: time_shift must be > 0 and "
                             f"terminal_fraction in [0, 1], got {self.time_shift} and "
                             f"{self.terminal_fraction}")
        if self.changed_pixel_weight < 0 or not 0 < self.changed_pixel_threshold < 1:
            raise ValueError(f"DiffusionTrainConfig: changed_pixel_weight must be >= 0 and "
                             f"changed_pixel_threshold in (0, 1), got "
                             f"{self.changed_pixel_weight} and {self.changed_pixel_threshold}")
        if self.data.num_views < 2 or self.data.num_steps < 2:
            raise ValueError("DiffusionTrainConfig.data: the mask settings need at least 2 "
                             "views and 2 timesteps")
        self.model_config()  # raises on a bad preset or override

    def model_config(self) -> DiffusionConfig:
        """The preset with the overrides applied and `image_size` set to the data's."""
        size = (self.data.height, self.data.width)
        overrides = dict(self.model_overrides)
        if "image_size" in overrides and tuple(overrides["image_size"]) != size:
            raise ValueError(f"model_overrides.image_size {overrides['image_size']} differs "
                             f"from the data's frame size {size}")
        overrides["image_size"] = size
        overrides.setdefault("trained_grid", (self.data.num_views, self.data.num_steps))
        return DiffusionConfig.preset(self.preset, **overrides)


def sample_cell_masks(
    batch_size: int,
    num_views: int,
    num_steps: int,
    weights: dict[str, float],
    random_given_fraction: float,
    rng: np.random.Generator,
) -> Tensor:  # [B, V, T] bool, True = given
    """One mask per sample, its policy drawn from `weights` (see `MASK_POLICIES`)."""
    names = [n for n in MASK_POLICIES if weights.get(n, 0) > 0]
    probabilities = np.array([weights[n] for n in names], dtype=np.float64)
    masks = np.zeros((batch_size, num_views, num_steps), dtype=bool)
    for b, policy in enumerate(rng.choice(names, size=batch_size, p=probabilities /
                                          probabilities.sum())):
        if policy in ("row", "row_and_column"):
            masks[b, 0, :] = True
        if policy == "row_and_column":
            masks[b, :, 0] = True
        if policy == "random":
            cells = rng.uniform(size=(num_views, num_steps)) < random_given_fraction
            flat = cells.reshape(-1)
            if flat.all() or not flat.any():  # keep one cell of each kind
                flat[:] = False
                flat[rng.integers(flat.size)] = True
            masks[b] = cells
    return torch.from_numpy(masks)


def grid_rays(
    c2w: Tensor,  # [B, V, T, 4, 4]
    intrinsics: Tensor,  # [B, V, T, 6]
    geometry_valid: Tensor,  # [B] bool
    height: int,
    width: int,
) -> Tensor:  # [B, V, T, 6, H, W]
    """Plucker rays of every cell; zero for samples whose rig does not describe the frames."""
    rays = plucker_rays(c2w.float(), intrinsics.float(), height, width)
    return torch.where(geometry_valid.reshape(-1, 1, 1, 1, 1, 1), rays, 0.0)


def changed_pixel_weights(frames: Tensor, weight: float, threshold: float
                          ) -> Tensor:  # [B, V, T, 1, H, W]
    """1 + weight where a pixel differs from the same view's first frame by more than
    `threshold` in any channel, else 1. frames: [B, V, T, 3, H, W] in [0, 1]."""
    changed = (frames - frames[:, :, :1]).abs().amax(dim=3, keepdim=True) > threshold
    return 1.0 + weight * changed.to(frames.dtype)


def cache_for_batch(z: Tensor, batch: dict[str, Tensor], cell_mask: Tensor) -> Tensor:
    """The 3D cache of the given cells rendered into every cell (`render_cache`), from the
    samples' depth; zero for samples whose depth or rig does not describe the frames."""
    cache = render_cache(z, batch["depth"], batch["c2w"], batch["intrinsics"], cell_mask)
    usable = batch["geometry_valid"].bool() & batch["has_depth"].bool()
    return torch.where(usable.reshape(-1, 1, 1, 1, 1, 1), cache, 0.0)


def diffusion_loss(model: nn.Module, batch: dict[str, Tensor], step: int,
                   config: DiffusionTrainConfig, rank: int
                   ) -> tuple[Tensor, dict[str, Tensor]]:
    """Rectified-flow loss of one batch; masks and noise are seeded by (seed, rank, step)."""
    frames = batch["frames"]  # [B, V, T, 3, H, W] in [0, 1]
    B, V, T, _, H, W = frames.shape
    rng = np.random.default_rng([config.seed, rank, step])
    cell_mask = sample_cell_masks(B, V, T, config.mask_weights, config.random_given_fraction,
                                  rng).to(frames.device)
    generator = torch.Generator(device=frames.device)
    generator.manual_seed(int(rng.integers(2**62)))
    model_config = unwrap(model).config
    rays = None
    if model_config.use_camera_rays:
        rays = grid_rays(batch["c2w"], batch["intrinsics"], batch["geometry_valid"], H, W)
    z = frames * 2.0 - 1.0
    cache = cache_for_batch(z, batch, cell_mask) if model_config.cache_conditioning else None
    pixel_weight = None
    if config.changed_pixel_weight > 0:
        pixel_weight = changed_pixel_weights(frames, config.changed_pixel_weight,
                                             config.changed_pixel_threshold)
    loss = rectified_flow_loss(model, z, cell_mask, rays=rays, generator=generator,
                               time_distribution=config.time_distribution,
                               time_shift=config.time_shift,
                               terminal_fraction=config.terminal_fraction,
                               cfg_dropout=model_config.cfg_dropout, cache=cache,
                               pixel_weight=pixel_weight)
    return loss, {"given_fraction": cell_mask.float().mean()}


def build_diffusion_job(config: DiffusionTrainConfig, context: DistributedContext
                        ) -> TrainingJob:
    """The model (seeded init), its data stream and loss, ready for `run_training`."""
    torch.manual_seed(config.seed)
    model_config = config.model_config()
    model = VideoDiT(model_config)
    model.gradient_checkpointing = config.gradient_checkpointing

    def make_batches(start_step: int):
        dataset = training_samples(config.data, config, context, start_step)
        return batch_stream(dataset, config.batch_size, config.num_workers, context.device)

    def compute_loss(wrapped: nn.Module, batch: dict[str, Tensor], step: int):
        return diffusion_loss(wrapped, batch, step, config, context.rank)

    return TrainingJob("diffusion", model, model_config, config, make_batches, compute_loss)


def train_diffusion(config: DiffusionTrainConfig,
                    context: DistributedContext | None = None) -> Path:
    """Train (or resume) and return the folder of the final EMA weights."""
    context = context or setup_distributed(config.device)
    return run_training(build_diffusion_job(config, context), context)

