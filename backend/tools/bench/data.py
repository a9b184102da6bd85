"""Benchmark the procedural data generator: samples per second in one process.

`python -m backend.tools.bench data [--json PATH] [--samples N] [--threads T]`

Cases are 4 views x 8 timesteps at 64x64 and 32x32 with the default data mix. By default torch
runs one thread, as in a DataLoader worker (the renderer's small tensors gain little from more,
and oversubscribed cores lose a lot). Wall time and this process's CPU time are both
reported: on a shared machine the CPU time is the steadier figure.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from backend.data.config import DataConfig
from backend.data.generator import make_sample


@dataclass
class DataBenchCase:
    name: str
    size: int  # square image side in pixels
    num_views: int = 4
    num_steps: int = 8


CASES = (DataBenchCase("4x8_64px", 64), DataBenchCase("4x8_32px", 32))


def time_case(case: DataBenchCase, num_samples: int) -> dict:
    config = DataConfig(num_views=case.num_views, num_steps=case.num_steps, height=case.size,
                        width=case.size)
    make_sample(config, num_samples)  # warm-up, outside the timed indices
    kinds: Counter[str] = Counter()
    gaussians = 0
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    for index in range(num_samples):
        sample = make_sample(config, index)
        kinds[sample.kind] += 1
        gaussians += len(sample.gaussians[0])
    wall, cpu = time.perf_counter() - wall_start, time.process_time() - cpu_start
    return {**asdict(case), "samples": num_samples, "samples_per_s": num_samples / wall,
            "wall_s_per_sample": wall / num_samples, "cpu_s_per_sample": cpu / num_samples,
            "mean_gaussians": gaussians / num_samples, "kinds": dict(kinds)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench data", description=__doc__)
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    parser.add_argument("--samples", type=int, default=10, help="samples timed per case")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.samples < 1:
        parser.error("--samples must be >= 1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rows = [time_case(case, args.samples) for case in CASES]
    print(f"data generator, {torch.get_num_threads()} threads, {args.samples} samples per case")
    print(f"{'case':<10} {'samples/s':>10} {'wall s':>8} {'cpu s':>8} {'gaussians':>10}  kinds")
    for row in rows:
        print(f"{row['name']:<10} {row['samples_per_s']:>10.2f} {row['wall_s_per_sample']:>8.3f} "
              f"{row['cpu_s_per_sample']:>8.3f} {row['mean_gaussians']:>10.0f}  {row['kinds']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": "cpu", "threads": torch.get_num_threads(),
                                         "cases": rows}, indent=2))
    return 0
