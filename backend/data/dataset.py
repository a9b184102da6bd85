"""Datasets for `torch.utils.data.DataLoader`: samples rendered on the fly, or a pool rendered
once (optionally cached on disk) and served again and again with cheap augmentation.

On a CPU a sample costs about as much to render as a training step costs to run, so the pool
is what keeps small-model training fed; on the fly is for machines with cores to spare.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from backend.data.augment import flip_horizontal, random_crop, reverse_time, reverse_views
from backend.data.config import DataConfig
from backend.data.generator import make_sample
from backend.data.sample import Sample


def shard_position() -> tuple[int, int]:
    """(this reader's shard, number of shards) over DataLoader workers and distributed ranks."""
    worker = get_worker_info()
    worker_id, num_workers = (0, 1) if worker is None else (worker.id, worker.num_workers)
    rank, world_size = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return rank * num_workers + worker_id, world_size * num_workers


class GeneratedDataset(IterableDataset):
    """Samples `start`, `start + 1`, ... rendered on the fly (endless when `num_samples` is None).

    Every DataLoader worker (and distributed rank) renders a disjoint share of the indices:
    shard k of n takes start + k, start + k + n, ...
    """

    def __init__(self, config: DataConfig, start: int = 0, num_samples: int | None = None,
                 as_tensors: bool = True):
        if start < 0 or (num_samples is not None and num_samples < 0):
            raise ValueError(f"GeneratedDataset: start and num_samples must be >= 0, "
                             f"got {start} and {num_samples}")
        self.config, self.start, self.num_samples = config, start, num_samples
        self.as_tensors = as_tensors

    def __iter__(self) -> Iterator:
        shard, num_shards = shard_position()
        stop = None if self.num_samples is None else self.start + self.num_samples
        for index in itertools.count(self.start + shard, num_shards):
            if stop is not None and index >= stop:
                return
            sample = make_sample(self.config, index)
            yield sample.to_tensors() if self.as_tensors else sample


class GeneratedIndexDataset(Dataset):
    """Map-style view of the generator: item i is sample `start + i` (e.g. a held-out set)."""

    def __init__(self, config: DataConfig, start: int, num_samples: int,
                 as_tensors: bool = True):
        if start < 0 or num_samples < 0:
            raise ValueError(f"GeneratedIndexDataset: start and num_samples must be >= 0, "
                             f"got {start} and {num_samples}")
        self.config, self.start, self.num_samples = config, start, num_samples
        self.as_tensors = as_tensors

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int):
        if not 0 <= i < self.num_samples:
            raise IndexError(f"GeneratedIndexDataset: index {i} out of range")
        sample = make_sample(self.config, self.start + i)
        return sample.to_tensors() if self.as_tensors else sample


@dataclass
class PoolConfig:
    """A pool of rendered samples and the augmentation applied each time one is served."""

    num_samples: int = 256
    start: int = 0  # generator index of the pool's first sample
    cache_dir: str | None = None  # folder to keep the rendered samples in (safetensors)
    render_workers: int = 0  # processes rendering the pool (0: this process)
    seed: int = 0  # augmentation and serving order
    reverse_views_probability: float = 0.5
    reverse_time_probability: float = 0.25
    flip_probability: float = 0.5
    crop_probability: float = 0.5
    crop_min_scale: float = 0.75

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.start < 0 or self.render_workers < 0:
            raise ValueError("PoolConfig: num_samples must be >= 1, start and render_workers "
                             ">= 0")
        for name in ("reverse_views_probability", "reverse_time_probability",
                     "flip_probability", "crop_probability"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"PoolConfig.{name}: must be in [0, 1]")
        if not 0 < self.crop_min_scale <= 1:
            raise ValueError(f"PoolConfig.crop_min_scale: must be in (0, 1], "
                             f"got {self.crop_min_scale}")


_META_KEYS = ("kind", "rig_kind", "geometry_valid", "views_reversed", "index", "near_far",
              "family", "scene_info")


def save_sample(sample: Sample, path: Path) -> None:
    """Grid, rig and flags of a sample (not its Gaussians) as one safetensors file."""
    meta = {key: getattr(sample, key) for key in _META_KEYS}
    tensors = {k: torch.from_numpy(v) for k, v in sample.to_arrays().items()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"sample": json.dumps(meta)})
    tmp.replace(path)


def load_sample(path: Path) -> Sample:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["sample"])
    tensors = load_file(str(path))
    near_far = None if meta["near_far"] is None else tuple(meta["near_far"])
    return Sample(**tensors, **{**meta, "near_far": near_far})


def _identity(item):
    return item


class SamplePool(IterableDataset):
    """`num_samples` generator samples rendered once, served endlessly with augmentation.

    Iterating yields `Sample.to_tensors()` dicts: each epoch is a seeded permutation of the
    pool split between DataLoader workers and ranks, and every served sample gets a random
    view reversal, time reversal, mirror flip and crop (cameras adjusted to match).
    `pool[i]` gives stored sample i unaugmented.
    """

    def __init__(self, data_config: DataConfig, pool_config: PoolConfig | None = None):
        self.data_config = data_config
        self.config = pool_config or PoolConfig()
        self.cache = None
        if self.config.cache_dir is not None:
            self.cache = Path(self.config.cache_dir) / f"pool_{data_config.fingerprint()}"
            self.cache.mkdir(parents=True, exist_ok=True)
            (self.cache / "data_config.json").write_text(
                json.dumps(data_config.to_dict(), indent=2))
        self.samples = self._fill()

    def _cache_path(self, index: int) -> Path | None:
        return None if self.cache is None else self.cache / f"sample_{index:07d}.safetensors"

    def _fill(self) -> list[Sample]:
        indices = range(self.config.start, self.config.start + self.config.num_samples)
        found = {i: load_sample(p) for i in indices
                 if (p := self._cache_path(i)) is not None and p.is_file()}
        missing = [i for i in indices if i not in found]
        for sample in self._render(missing):
            sample.gaussians = None
            if self.cache is not None:
                save_sample(sample, self._cache_path(sample.index))
            found[sample.index] = sample
        return [found[i] for i in indices]

    def _render(self, indices: list[int]) -> Iterator[Sample]:
        if not indices:
            return iter(())
        if self.config.render_workers == 0:
            return (make_sample(self.data_config, i) for i in indices)
        subset = torch.utils.data.Subset(
            GeneratedIndexDataset(self.data_config, 0, max(indices) + 1, as_tensors=False),
            indices)
        return iter(DataLoader(subset, batch_size=None, num_workers=self.config.render_workers,
                               collate_fn=_identity))

    @property
    def size(self) -> int:
        """Number of stored samples (no `__len__`: iteration is endless)."""
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]

    def augment(self, sample: Sample, rng: np.random.Generator) -> Sample:
        """A random view/time reversal, mirror flip and crop of `sample`."""
        c = self.config
        if rng.uniform() < c.reverse_views_probability:
            sample = reverse_views(sample)
        if rng.uniform() < c.reverse_time_probability:
            sample = reverse_time(sample)
        if rng.uniform() < c.flip_probability:
            sample = flip_horizontal(sample)
        if rng.uniform() < c.crop_probability:
            sample = random_crop(sample, rng, c.crop_min_scale)
        return sample

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        shard, num_shards = shard_position()
        rng = np.random.default_rng(np.random.SeedSequence([self.config.seed, shard]))
        for epoch in itertools.count():
            order = np.random.default_rng([self.config.seed, epoch]).permutation(self.size)
            for i in order[shard::num_shards]:
                yield self.augment(self.samples[int(i)], rng).to_tensors()

