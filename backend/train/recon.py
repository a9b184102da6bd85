"""Training of the feed-forward 4D reconstruction model.

Each sample's views are split at random into `input_views` the model sees (all timesteps,
with the rig) and held-out views. The predicted Gaussians of each timestep are rendered at
the held-out views (and, by default, the input views too) for a random subset of
timesteps; the loss is MSE + SSIM on those renders, a depth term where the data has depth,
and an auxiliary camera-head term. Samples whose cameras do not describe their frames
(2D-transformed videos) are skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import IterableDataset

from backend.data import DataConfig, SamplePool
from backend.recon import ReconConfig, ReconLossWeights, ReconModel, camera_loss
from backend.recon import reconstruction_loss as render_loss
from backend.recon.losses import depth_l1
from backend.recon.splats import GaussianBatch
from backend.train.common import (
    DistributedContext,
    TrainingJob,
    TrainLoopConfig,
    batch_stream,
    run_training,
    setup_distributed,
    training_samples,
)


def _default_data() -> DataConfig:
    return DataConfig(num_views=6, num_steps=8, height=64, width=64, homography_fraction=0.0)


@dataclass
class ReconTrainConfig(TrainLoopConfig):
    """Training of `ReconModel`: model preset + overrides, data, the view split and losses.

    `data.num_views` counts input plus held-out views. The model sees `input_views` of them,
    or, with `min_input_views` set, a number drawn per step from [min_input_views,
    input_views] (one model for a single input video and for a full rig).
    `target_timesteps` timesteps are rendered per step (0: all of them). `input_depth_weight`
    adds the relative L1 of the model's own per-pixel depth against the true depth at the
    input views (metric depth, also where the renders are thin). The model's `image_size` is
    the data's frame size.
    """

    preset: str = "tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=_default_data)
    input_views: int = 4
    min_input_views: int | None = None
    input_depth_weight: float = 0.0
    target_timesteps: int = 4
    supervise_input_views: bool = True
    loss: ReconLossWeights = field(default_factory=ReconLossWeights)
    camera_weight: float = 0.1
    ema_decay: float = 0.0
    output_dir: str = "out/train/recon"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.input_views < self.data.num_views:
            raise ValueError(f"ReconTrainConfig.input_views: must be in [1, data.num_views = "
                             f"{self.data.num_views}), got {self.input_views}")
        if self.min_input_views is not None and not 1 <= self.min_input_views <= self.input_views:
            raise ValueError(f"ReconTrainConfig.min_input_views: must be in [1, input_views = "
                             f"{self.input_views}] or None, got {self.min_input_views}")
        if self.input_depth_weight < 0:
            raise ValueError(f"ReconTrainConfig.input_depth_weight: must be >= 0, got "
                             f"{self.input_depth_weight}")
        if not 0 <= self.target_timesteps <= self.data.num_steps:
            raise ValueError(f"ReconTrainConfig.target_timesteps: must be in [0, "
                             f"{self.data.num_steps}], got {self.target_timesteps}")
        if self.data.homography_fraction >= 1:
            raise ValueError("ReconTrainConfig.data.homography_fraction: must be < 1, "
                             "2D-transformed samples are skipped")
        if self.camera_weight < 0:
            raise ValueError(f"ReconTrainConfig.camera_weight: must be >= 0, "
                             f"got {self.camera_weight}")
        self.model_config()  # raises on a bad preset or override

    def model_config(self) -> ReconConfig:
        """The preset with the overrides applied and `image_size` set to the data's."""
        size = (self.data.height, self.data.width)
        overrides = dict(self.model_overrides)
        if "image_size" in overrides and tuple(overrides["image_size"]) != size:
            raise ValueError(f"model_overrides.image_size {overrides['image_size']} differs "
                             f"from the data's frame size {size}")
        overrides["image_size"] = size
        return ReconConfig.preset(self.preset, **overrides)


class GeometryValidSamples(IterableDataset):
    """Passes on only the samples whose depth and cameras describe their frames."""

    def __init__(self, source: IterableDataset):
        if isinstance(source, SamplePool) and not any(s.geometry_valid for s in source.samples):
            raise ValueError("the sample pool holds no sample with valid geometry")
        self.source = source

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return (item for item in self.source if bool(item["geometry_valid"]))


@dataclass
class ViewSplit:
    """Which views the model sees and which views and timesteps the loss renders."""

    inputs: list[int]
    targets: list[int]
    timesteps: list[int]


def choose_view_split(num_views: int, num_steps: int, config: ReconTrainConfig,
                      rng: np.random.Generator) -> ViewSplit:
    count = config.input_views
    if config.min_input_views is not None:
        count = int(rng.integers(config.min_input_views, config.input_views + 1))
    order = rng.permutation(num_views)
    inputs = sorted(int(v) for v in order[:count])
    held_out = sorted(int(v) for v in order[count:])
    targets = sorted(inputs + held_out) if config.supervise_input_views else held_out
    count = config.target_timesteps or num_steps
    timesteps = sorted(int(t) for t in rng.choice(num_steps, size=count, replace=False))
    return ViewSplit(inputs, targets, timesteps)


def _as_float32(gaussians: GaussianBatch) -> GaussianBatch:
    return GaussianBatch(**{f.name: getattr(gaussians, f.name).float()
                            for f in fields(GaussianBatch)})


def recon_loss(model: nn.Module, batch: dict[str, Tensor], step: int, config: ReconTrainConfig,
               rank: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Render loss at the split's target cells plus the camera term; split seeded by
    (seed, rank, step)."""
    frames = batch["frames"]  # [B, V, T, 3, H, W]
    c2w, intr = batch["c2w"], batch["intrinsics"]  # [B, V, T, 4, 4], [B, V, T, 6]
    split = choose_view_split(frames.shape[1], frames.shape[2], config,
                              np.random.default_rng([config.seed, rank, step]))
    out = model(frames[:, split.inputs], c2w[:, split.inputs], intr[:, split.inputs])
    has_depth = batch["has_depth"].reshape(-1, 1, 1, 1, 1).to(frames)
    depth = batch["depth"][:, :, :, 0] * has_depth  # [B, V, T, H, W], 0 = unknown

    def targets(x: Tensor) -> Tensor:  # [B, V, T, ...] -> [B, C, T', ...]
        return x[:, split.targets][:, :, split.timesteps]

    with torch.autocast(frames.device.type, enabled=False):
        rendered = render_loss(_as_float32(out.gaussians), targets(frames), targets(c2w),
                               targets(intr), target_depth=targets(depth), weights=config.loss,
                               timesteps=split.timesteps)
        cameras = camera_loss(out.pose_encoding.float(), c2w[:, split.inputs],
                              intr[:, split.inputs])
    total = rendered.total + config.camera_weight * cameras
    metrics = {"mse": rendered.mse, "ssim": rendered.ssim, "camera": cameras}
    if config.input_depth_weight > 0:
        input_depth = depth_l1(out.depth.float(), depth[:, split.inputs].float())
        total = total + config.input_depth_weight * input_depth
        metrics["input_depth"] = input_depth
    if rendered.depth is not None:
        metrics["depth"] = rendered.depth
    return total, metrics


def build_recon_job(config: ReconTrainConfig, context: DistributedContext) -> TrainingJob:
    """The model (seeded init), its data stream and loss, ready for `run_training`."""
    torch.manual_seed(config.seed)
    model_config = config.model_config()
    model = ReconModel(model_config)

    def make_batches(start_step: int):
        dataset = GeometryValidSamples(training_samples(config.data, config, context,
                                                        start_step))
        return batch_stream(dataset, config.batch_size, config.num_workers, context.device)

    def compute_loss(wrapped: nn.Module, batch: dict[str, Tensor], step: int):
        return recon_loss(wrapped, batch, step, config, context.rank)

    return TrainingJob("recon", model, model_config, config, make_batches, compute_loss)


def train_recon(config: ReconTrainConfig, context: DistributedContext | None = None) -> Path:
    """Train (or resume) and return the folder of the final weights."""
    context = context or setup_distributed(config.device)
    return run_training(build_recon_job(config, context), context)
