"""Shared training machinery: distributed set-up, mixed precision, EMA, learning-rate schedule,
checkpoints, the data stream, the progress line and the JSON-lines log.

Runs as one process on a CPU or a GPU, or under `torchrun` (one process per device, rank
and world size read from its environment variables; gloo on the CPU, NCCL on CUDA).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from backend.checkpoint import config_from_dict, config_to_dict, save_pretrained
from backend.data import DataConfig, GeneratedDataset, PoolConfig, SamplePool
from backend.devices import resolve_device

CHECKPOINTS_DIR = "checkpoints"
FINAL_MODEL_DIR = "model"
LOG_NAME = "log.jsonl"
TRAIN_CONFIG_NAME = "train_config.json"
TRAINER_STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.pt"
STEP_DIR = re.compile(r"^step_(\d{6,})$")


@dataclass
class TrainLoopConfig:
    """Options every trainer shares: optimisation, schedule, checkpoints, data feeding.

    `batch_size` is per process. `use_pool` None renders a `SamplePool` once on the CPU
    and streams fresh samples on CUDA. `resume` is "auto" (latest checkpoint in
    `output_dir`), "none", or a checkpoint folder. `max_minutes` ends a sitting early with a
    checkpoint; the next run resumes from it. `max_cpu_minutes` does the same by the CPU time
    this process has used since the sitting began (all its threads): equal compute for runs
    that share a loaded machine, where wall time would favour whichever ran alone.
    `init_weights` (a `save_pretrained` folder of the same model config, such as a shipped
    checkpoint) starts a run that has no checkpoint to resume from those weights, with a
    fresh optimizer and schedule: fine-tuning, or training on in a new sitting when only the
    exported weights were kept.
    """

    batch_size: int = 8
    steps: int = 1000
    lr: float = 3e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    output_dir: str = "out/train"
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    use_pool: bool | None = None
    pool: PoolConfig = field(default_factory=PoolConfig)
    max_minutes: float | None = None
    max_cpu_minutes: float | None = None
    resume: str = "auto"
    init_weights: str | None = None

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        name = type(self).__name__
        checks = [(k, getattr(self, k) >= 1, ">= 1") for k in
                  ("batch_size", "steps", "checkpoint_every", "log_every")]
        checks += [(k, getattr(self, k) >= 0, ">= 0") for k in
                   ("warmup_steps", "keep_checkpoints", "num_workers", "seed", "weight_decay",
                    "grad_clip")]
        checks += [("lr", self.lr > 0, "> 0"), ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1,
                    "in [0, 1]"), ("ema_decay", 0 <= self.ema_decay < 1, "in [0, 1)"),
                   ("max_minutes", self.max_minutes is None or self.max_minutes > 0,
                    "positive or None"),
                   ("max_cpu_minutes", self.max_cpu_minutes is None or self.max_cpu_minutes > 0,
                    "positive or None")]
        for key, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name}.{key}: must be {rule}, got {getattr(self, key)!r}")

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        """Rebuild the config, nested dataclass fields (data, pool, ...) included."""
        values = dict(values)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING \
                else f.default
            if dataclasses.is_dataclass(default) and isinstance(values.get(f.name), dict):
                values[f.name] = config_from_dict(type(default), values[f.name])
        return config_from_dict(cls, values)


# --------------------------------------------------------------------------- processes


@dataclass
class DistributedContext:
    """Where this process runs: its rank among `world_size` and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto") -> DistributedContext:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK, pick the device (`resolve_device`) and
    join the process group when there are several processes."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
    if world_size > 1 and resolved.type == "cpu":
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))
    return DistributedContext(rank, world_size, local_rank, resolved)


def teardown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: DistributedContext) -> None:
    if context.distributed:
        dist.barrier()


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# --------------------------------------------------------------------------- optimisation


def cosine_learning_rate(step: int, base_lr: float, warmup_steps: int, total_steps: int,
                         min_ratio: float) -> float:
    """Linear warm-up to `base_lr`, then a cosine decay to `min_ratio * base_lr` at the end."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: nn.Module, config: TrainLoopConfig) -> torch.optim.AdamW:
    """AdamW; biases, norms and embedding vectors (parameters with < 2 dims) get no decay."""
    decayed = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    plain = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decayed, "weight_decay": config.weight_decay},
              {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


class ExponentialMovingAverage:
    """A frozen copy of a model whose weights trail the trained ones.

    The decay ramps up as min(decay, (1 + step) / (10 + step)), so early averages are not
    dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        source = unwrap(model)
        for averaged, current in zip(self.model.parameters(), source.parameters(), strict=True):
            averaged.lerp_(current.detach(), 1.0 - decay)
        for averaged, current in zip(self.model.buffers(), source.buffers(), strict=True):
            averaged.copy_(current)


# --------------------------------------------------------------------------- checkpoints


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (those with a trainer state) in `output_dir`, oldest first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / TRAINER_STATE_NAME).is_file()]
    return [p for _, p in sorted(found)]


def save_checkpoint(folder: Path, model: nn.Module, model_config: Any,
                    ema: ExponentialMovingAverage | None, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any]) -> Path:
    """Write model/ (and ema/) as safetensors + config.json, the optimizer state and the
    trainer state JSON; the folder appears complete or not at all."""
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_pretrained(partial / "model", unwrap(model), model_config)
    if ema is not None:
        save_pretrained(partial / "ema", ema.model, model_config)
    torch.save(optimizer.state_dict(), partial / OPTIMIZER_NAME)
    (partial / TRAINER_STATE_NAME).write_text(json.dumps(trainer_state, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    partial.replace(folder)
    return folder


def _config_differences(folder: Path, model_config: Any) -> list[str]:
    """Fields of `model_config` that differ from the config saved in `folder`."""
    try:
        header = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{folder}: unreadable config.json ({error})") from error
    expected = config_to_dict(model_config)
    found = header.get("config") if isinstance(header, dict) else None
    found = found if isinstance(found, dict) else {}
    return sorted(k for k in set(expected) | set(found) if expected.get(k) != found.get(k))


def _load_weights(module: nn.Module, folder: Path, model_config: Any,
                  same_config: bool = True) -> list[str]:
    """Load `folder`'s weights into `module`; returns the model config fields that differ.

    With `same_config` (resuming) any difference is refused; without it (initialising a
    new run) the weights need only match by name and shape."""
    differ = _config_differences(folder, model_config)
    if differ and same_config:
        raise ValueError(f"{folder}: checkpoint was trained with another model config "
                         f"(fields {', '.join(differ)} differ); use a new output_dir or "
                         f"resume='none'")
    try:
        state = load_file(str(folder / "model.safetensors"))
        module.load_state_dict(state, strict=True)
    except Exception as error:  # safetensors and load_state_dict raise several types
        because = f"; the model configs differ in {', '.join(differ)}" if differ else ""
        raise ValueError(f"{folder}: cannot load the weights ({error}){because}") from error
    return differ


def load_checkpoint(folder: str | Path, model: nn.Module, model_config: Any,
                    ema: ExponentialMovingAverage | None,
                    optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights, EMA and optimizer from a checkpoint folder; return its trainer state."""
    folder = Path(folder)
    if not (folder / TRAINER_STATE_NAME).is_file():
        raise ValueError(f"{folder}: not a checkpoint (no {TRAINER_STATE_NAME})")
    _load_weights(unwrap(model), folder / "model", model_config)
    if ema is not None:
        ema_folder = folder / "ema" if (folder / "ema").is_dir() else folder / "model"
        _load_weights(ema.model, ema_folder, model_config)
    device = next(unwrap(model).parameters()).device
    optimizer.load_state_dict(torch.load(folder / OPTIMIZER_NAME, map_location=device,
                                         weights_only=True))
    return json.loads((folder / TRAINER_STATE_NAME).read_text())


def prune_checkpoints(output_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep 0 keeps every one)."""
    if keep > 0:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def find_resume_checkpoint(config: TrainLoopConfig) -> Path | None:
    """The checkpoint `config.resume` asks for, or None to start from scratch."""
    if config.resume == "none":
        return None
    if config.resume == "auto":
        found = list_checkpoints(config.output_dir)
        return found[-1] if found else None
    folder = Path(config.resume)
    if not (folder / TRAINER_STATE_NAME).is_file():
        raise ValueError(f"resume: {folder} is not a checkpoint folder")
    return folder


# --------------------------------------------------------------------------- data


def training_samples(data: DataConfig, config: TrainLoopConfig, context: DistributedContext,
                     start_step: int) -> IterableDataset:
    """The endless sample stream of this process: a pool rendered once, or fresh renders.

    A pool is cached under `<output_dir>/pool` unless its config names a folder; rank 0
    renders it first and the other ranks load it. Resumed runs reseed the serving order, and
    fresh renders continue after the samples already consumed.
    """
    use_pool = context.device.type == "cpu" if config.use_pool is None else config.use_pool
    if not use_pool:
        start = start_step * config.batch_size * context.world_size
        return GeneratedDataset(data, start=start)
    pool_config = dataclasses.replace(
        config.pool, seed=config.pool.seed + start_step,
        cache_dir=config.pool.cache_dir or str(Path(config.output_dir) / "pool"))
    if context.is_main:
        print(f"sample pool: {pool_config.num_samples} samples, cached in "
              f"{pool_config.cache_dir}", file=sys.stderr)
        pool = SamplePool(data, pool_config)
    barrier(context)
    if not context.is_main:
        pool = SamplePool(data, pool_config)
    return pool


def batch_stream(dataset: IterableDataset, batch_size: int, num_workers: int,
                 device: torch.device) -> Iterator[dict[str, Tensor]]:
    """Endless batches of `dataset` on `device`."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=num_workers > 0)
    while True:
        for batch in loader:
            yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# --------------------------------------------------------------------------- reporting


def append_json_line(path: Path | None, record: dict[str, Any]) -> None:
    """Append `record` as one JSON line to `path` (None: not the main process, no-op)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def print_progress(name: str, step: int, total: int, loss: float, lr: float,
                   samples_per_s: float, samples_per_step: int, stream: TextIO | None = None
                   ) -> None:
    """One status line with an ETA: rewritten in place on a terminal, else one per call."""
    stream = stream or sys.stderr
    remaining = max(0, total - step) * samples_per_step / max(samples_per_s, 1e-9)
    minutes, seconds = divmod(round(remaining), 60)
    text = (f"{name} step {step}/{total} loss {loss:.4f} lr {lr:.2e} {samples_per_s:.2f} "
            f"samples/s eta {minutes // 60}:{minutes % 60:02d}:{seconds:02d}")
    if stream.isatty():
        stream.write("\r" + text + ("\n" if step >= total else ""))
    else:
        stream.write(text + "\n")
    stream.flush()


class MetricWindow:
    """Per-step metrics since the last log line."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps, self.started = 0, time.perf_counter()

    def add(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.steps += 1

    def close(self, context: DistributedContext) -> tuple[dict[str, float], int, float]:
        """Means over the window's steps and all processes, its steps and seconds; then
        start a new window."""
        keys = sorted(self.sums)
        totals = torch.tensor([self.sums[k] for k in keys] + [float(self.steps)],
                              dtype=torch.float64, device=context.device)
        if context.distributed:
            dist.all_reduce(totals)
        means = {k: float(totals[i] / totals[-1].clamp(min=1)) for i, k in enumerate(keys)}
        result = (means, self.steps, time.perf_counter() - self.started)
        self.__init__()
        return result


# --------------------------------------------------------------------------- the loop

LossFunction = Callable[[nn.Module, dict[str, Tensor], int], tuple[Tensor, dict[str, Tensor]]]


@dataclass
class TrainingJob:
    """What a model's trainer plugs into `run_training`.

    `make_batches(start_step)` gives this process's endless batches (on its device);
    `compute_loss(model, batch, step)` returns the loss and extra scalar metrics to log.
    """

    name: str
    model: nn.Module
    model_config: Any
    config: TrainLoopConfig
    make_batches: Callable[[int], Iterator[dict[str, Tensor]]]
    compute_loss: LossFunction


def _train_step(job: TrainingJob, model: nn.Module, optimizer: torch.optim.Optimizer,
                ema: ExponentialMovingAverage | None, batch: dict[str, Tensor], step: int,
                device: torch.device) -> tuple[dict[str, float], float]:
    config = job.config
    lr = cosine_learning_rate(step, config.lr, config.warmup_steps, config.steps,
                              config.min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast(device):
        loss, extra = job.compute_loss(model, batch, step)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{job.name}: loss is {float(loss)} at step {step}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(unwrap(model).parameters(), max_norm)
    optimizer.step()
    if ema is not None:
        ema.update(model, step)
    metrics = {"loss": float(loss.detach()), "grad_norm": float(grad_norm)}
    metrics.update({k: float(v.detach()) if isinstance(v, Tensor) else float(v)
                    for k, v in extra.items()})
    return metrics, lr


def _time_is_up(started: float, started_cpu: float, config: TrainLoopConfig,
                context: DistributedContext) -> bool:
    """Whether `max_minutes` of wall time or `max_cpu_minutes` of this process's CPU time
    have passed, as decided by rank 0 for every process."""
    if config.max_minutes is None and config.max_cpu_minutes is None:
        return False
    wall_up = (config.max_minutes is not None
               and time.perf_counter() - started > 60 * config.max_minutes)
    cpu_up = (config.max_cpu_minutes is not None
              and time.process_time() - started_cpu > 60 * config.max_cpu_minutes)
    flag = torch.tensor([float(wall_up or cpu_up)])
    if context.distributed:
        flag = flag.to(context.device)
        dist.broadcast(flag, src=0)
    return bool(flag.item())


def _resume(job: TrainingJob, model: nn.Module, ema: ExponentialMovingAverage | None,
            optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    state = {"step": 0, "samples_seen": 0, "elapsed_s": 0.0, "resumed_from": None}
    init = Path(job.config.init_weights) if job.config.init_weights else None
    if init is not None and not (init / "config.json").is_file():
        raise ValueError(f"init_weights: {init} is not a save_pretrained folder "
                         f"(no config.json)")
    folder = find_resume_checkpoint(job.config)
    if folder is not None:
        state = load_checkpoint(folder, model, job.model_config, ema, optimizer)
        state["resumed_from"] = str(folder)
        if init is not None:
            state["init_weights_ignored"] = f"resumed {folder} instead"
    elif init is not None:
        differ = _load_weights(unwrap(model), init, job.model_config, same_config=False)
        if ema is not None:
            ema.model.load_state_dict(unwrap(model).state_dict())
        state["initialised_from"] = str(init)
        state["init_config_differences"] = differ
    return state


def _window_record(window: MetricWindow, context: DistributedContext, samples_per_step: int,
                   state: dict[str, Any], started: float) -> dict[str, float]:
    """Metrics of the steps since the last log line, throughput and totals."""
    means, steps, seconds = window.close(context)
    elapsed = state["elapsed_s"] + time.perf_counter() - started
    return {**means, "samples_per_s": samples_per_step * steps / max(seconds, 1e-9),
            "samples_seen": state["samples_seen"], "elapsed_s": round(elapsed, 2)}


def _write_checkpoint(job: TrainingJob, model: nn.Module, ema: ExponentialMovingAverage | None,
                      optimizer: torch.optim.Optimizer, state: dict[str, Any], started: float,
                      context: DistributedContext) -> None:
    if context.is_main:
        elapsed = state["elapsed_s"] + time.perf_counter() - started
        trainer_state = {"model": job.name, "step": state["step"],
                         "samples_seen": state["samples_seen"], "elapsed_s": round(elapsed, 2),
                         "world_size": context.world_size, "config": job.config.to_dict()}
        folder = Path(job.config.output_dir) / CHECKPOINTS_DIR / f"step_{state['step']:06d}"
        save_checkpoint(folder, model, job.model_config, ema, optimizer, trainer_state)
        prune_checkpoints(job.config.output_dir, job.config.keep_checkpoints)
        append_json_line(Path(job.config.output_dir) / LOG_NAME,
                         {"event": "checkpoint", "step": state["step"], "path": str(folder)})
    barrier(context)


def run_training(job: TrainingJob, context: DistributedContext) -> Path:
    """Train until `config.steps` (or `max_minutes`), resuming from a checkpoint when asked;
    returns the folder of the final weights (the EMA weights when EMA is on)."""
    config, out = job.config, Path(job.config.output_dir)
    model = job.model.to(context.device)
    optimizer = make_optimizer(model, config)
    ema = ExponentialMovingAverage(model, config.ema_decay) if config.ema_decay > 0 else None
    state = _resume(job, model, ema, optimizer)
    wrapped = model
    if context.distributed:
        ids = [context.device.index] if context.device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    log = out / LOG_NAME if context.is_main else None
    if context.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / TRAIN_CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    append_json_line(log, {"event": "start", "model": job.name, "step": state["step"],
                           "resumed_from": state["resumed_from"],
                           **{key: state[key] for key in ("initialised_from",
                              "init_config_differences", "init_weights_ignored") if key in state},
                           "device": str(context.device),
                           "world_size": context.world_size,
                           "parameters": sum(p.numel() for p in model.parameters())})
    step = state["step"]
    batches = job.make_batches(step) if step < config.steps else iter(())
    window, started, started_cpu = MetricWindow(), time.perf_counter(), time.process_time()
    samples_per_step = config.batch_size * context.world_size
    while step < config.steps:
        metrics, lr = _train_step(job, wrapped, optimizer, ema, next(batches), step,
                                  context.device)
        step += 1
        window.add(metrics)
        stop = _time_is_up(started, started_cpu, config, context)
        last = stop or step == config.steps
        state.update(step=step, samples_seen=state["samples_seen"] + samples_per_step)
        if step % config.log_every == 0 or last:
            record = _window_record(window, context, samples_per_step, state, started)
            append_json_line(log, {"step": step, **record, "lr": lr})
            if context.is_main:
                print_progress(job.name, step, config.steps, record["loss"], lr,
                               record["samples_per_s"], samples_per_step)
        if step % config.checkpoint_every == 0 or last:
            _write_checkpoint(job, model, ema, optimizer, state, started, context)
        if stop:
            break
    final = out / FINAL_MODEL_DIR
    if context.is_main:
        save_pretrained(final, ema.model if ema is not None else model, job.model_config)
    barrier(context)
    return final
