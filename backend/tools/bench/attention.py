"""Benchmark fused view-time attention kernels against full and dense-masked attention.

`python -m backend.tools.bench attention [--json PATH] [--quick] [--device cpu|cuda] [--repeats R]
[--threads T] [--shape VxTxP] [--only KERNEL,...]`

For each grid V x T and tokens per frame P (4 heads of 64, B=1, float32) it times, in one
process and with repeats interleaved between implementations: flex (forward), decomposed
(forward, and forward+backward), merged (forward), flex forward+backward (CUDA only: its
backward does not exist on the CPU), reference (dense-mask SDPA, skipped when
its mask would exceed a memory cap) and full attention (SDPA, no mask). Times are medians
after a warm-up call; process CPU times are reported beside the wall times. The speedup is
full attention's median over the fastest exact kernel's; `paired` is the median over rounds
of each round's own ratio (steadier on a shared machine, where load comes and goes).

Peak memory of one call, measured in a second pass after all timings: on CUDA,
`torch.cuda.max_memory_allocated` above the level before the call. On the CPU (Linux with
glibc), the process's peak resident set above the resident set before the call, read from
VmHWM after resetting it through /proc/self/clear_refs; for this pass malloc is set to map
every block over 64 KiB separately, so freed tensors leave the resident set and it tracks
live allocations. Elsewhere memory is not measured.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import re
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from backend.diffusion.attention import (
    decomposed_view_time_attention,
    flex_available,
    flex_view_time_attention,
    full_attention,
    merged_view_time_attention,
    reference_attention,
)


@dataclass
class AttentionBenchConfig:
    grids: tuple[tuple[int, int], ...] = ((4, 8), (8, 8), (8, 16))  # (V, T)
    tokens_per_frame: tuple[int, ...] = (64, 128, 256)
    num_heads: int = 4
    head_dim: int = 64
    batch: int = 1
    repeats: int = 3
    reference_mask_cap_bytes: int = 2 * 2**30  # bool mask + its float32 form, [N, N] each
    kernels: tuple[str, ...] = ()  # run only these (full_fwd always runs); empty: all


EXACT = ("flex_fwd", "decomposed_fwd", "merged_fwd", "reference_fwd")
_MALLOC_MMAP_THRESHOLD, _MALLOC_TRIM_THRESHOLD = -3, -1  # glibc mallopt parameters


class PeakMemory:
    """Peak extra memory of one call on a device (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method: str | None = None
        self._release_free_heap = None

    def prepare(self) -> str | None:
        """Set up measuring (changes malloc behaviour on the CPU); returns the method or None."""
        if self.device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated above the level before the call"
            return self.method
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._status("VmHWM")
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            if not (libc.mallopt(_MALLOC_MMAP_THRESHOLD, 1 << 16)
                    and libc.mallopt(_MALLOC_TRIM_THRESHOLD, 1 << 16)):
                return None
            self._release_free_heap = libc.malloc_trim
        except (OSError, ValueError, AttributeError):
            return None
        self.method = ("peak resident set above the resident set before the call "
                       "(VmHWM reset via /proc/self/clear_refs; blocks > 64 KiB mmapped)")
        return self.method

    @staticmethod
    def _status(field: str) -> int:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
        if match is None:
            raise ValueError(f"no {field} in /proc/self/status")
        return int(match.group(1)) * 1024

    def measure(self, fn) -> int | None:
        if self.method is None:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            fn()
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - before
        self._release_free_heap(0)  # freed heap left from earlier calls would hide new use
        Path("/proc/self/clear_refs").write_text("5")
        before = self._status("VmRSS")
        fn()
        return self._status("VmHWM") - before


def _inputs(V: int, T: int, P: int, config: AttentionBenchConfig, device: torch.device):
    generator = torch.Generator(device=device).manual_seed(0)
    shape = (config.batch, config.num_heads, V * T * P, config.head_dim)  # [B, nh, N, hd]
    return [torch.randn(shape, generator=generator, device=device) for _ in range(4)]


def _make_calls(V: int, T: int, P: int, config: AttentionBenchConfig, device: torch.device,
                notes: list[str] | None = None):
    """name -> zero-argument call; forward calls return their output, the backward one None."""
    q, k, v, grad_out = _inputs(V, T, P, config, device)  # each [B, nh, N, hd]
    N = q.shape[2]
    notes = [] if notes is None else notes

    def no_grad(fn):
        def call():
            with torch.no_grad():
                return fn(q, k, v)
        return call

    def decomposed_fwd_bwd():
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        decomposed_view_time_attention(*leaves, V, T).backward(grad_out)

    def flex_fwd_bwd():
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        flex_view_time_attention(*leaves, V, T).backward(grad_out)

    def requested(kernel: str) -> bool:  # full attention always runs
        return not config.kernels or kernel in config.kernels

    calls = {}
    if requested("flex"):
        if flex_available(device):
            calls["flex_fwd"] = no_grad(lambda *a: flex_view_time_attention(*a, V, T))
        else:
            notes.append(f"flex skipped: FlexAttention not available on {device}")
    if requested("decomposed"):
        calls["decomposed_fwd"] = no_grad(lambda *a: decomposed_view_time_attention(*a, V, T))
    if requested("merged"):
        calls["merged_fwd"] = no_grad(lambda *a: merged_view_time_attention(*a, V, T))
    if requested("decomposed_fwd_bwd"):
        calls["decomposed_fwd_bwd"] = decomposed_fwd_bwd
    if requested("flex_fwd_bwd"):
        if device.type == "cuda" and flex_available(device):
            calls["flex_fwd_bwd"] = flex_fwd_bwd
        else:
            notes.append(f"flex_fwd_bwd skipped: FlexAttention's backward runs only on CUDA "
                         f"(device {device})")
    mask_bytes = 5 * N * N
    if requested("reference"):
        if mask_bytes <= config.reference_mask_cap_bytes:
            calls["reference_fwd"] = no_grad(lambda *a: reference_attention(*a, V, T))
        else:
            notes.append(f"reference skipped: dense mask {mask_bytes / 2**30:.1f} GiB exceeds "
                         f"the {config.reference_mask_cap_bytes / 2**30:.1f} GiB cap")
    calls["full_fwd"] = no_grad(full_attention)
    return calls


def _timed(call, device: torch.device) -> tuple[float, float]:
    """Wall and process CPU seconds of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start_wall, time.process_time() - start_cpu


def _errors(outputs: dict) -> tuple[dict, str]:
    """Max abs error of flex and decomposed against reference (or decomposed if it did not run)."""
    baseline = "reference_fwd" if "reference_fwd" in outputs else "decomposed_fwd"
    errors = {}
    for name in ("flex_fwd", "decomposed_fwd", "merged_fwd"):
        if name in outputs and name != baseline:
            diff = (outputs[name] - outputs[baseline]).abs().max().item()
            errors[name.removesuffix("_fwd")] = diff
    return errors, baseline.removesuffix("_fwd")


def time_shape(V: int, T: int, P: int, config: AttentionBenchConfig,
               device: torch.device) -> dict:
    """Times, speedups and errors of every implementation on one grid shape."""
    notes: list[str] = []
    calls = _make_calls(V, T, P, config, device, notes)
    outputs = {name: call() for name, call in calls.items()}  # warm-up (flex compiles here)
    exact = [name for name in EXACT if name in calls]
    if exact and "reference_fwd" not in outputs and "decomposed_fwd" not in outputs:
        q, k, v, _ = _inputs(V, T, P, config, device)  # the same seeded inputs, untimed
        with torch.no_grad():
            outputs["decomposed_fwd"] = decomposed_view_time_attention(q, k, v, V, T)
    errors, error_baseline = _errors({n: o for n, o in outputs.items() if o is not None})
    del outputs
    wall: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(config.repeats):  # interleaved, so load changes hit every kernel alike
        for name, call in calls.items():
            wall_s, cpu_s = _timed(call, device)
            wall[name].append(wall_s)
            cpu[name].append(cpu_s)
    times = {name: statistics.median(values) for name, values in wall.items()}
    cpu_times = {name: statistics.median(values) for name, values in cpu.items()}
    shape = {"views": V, "steps": T, "tokens_per_frame": P, "tokens": V * T * P,
             "times_s": times, "cpu_times_s": cpu_times, "ideal_speedup": V * T / (V + T - 1),
             "max_abs_err": errors, "error_baseline": error_baseline, "notes": notes}
    if not exact:
        notes.append("no exact fused kernel ran at this shape (see the notes above): no speedup")
        return {**shape, "fastest_exact": None, "speedup_vs_full": None,
                "fraction_of_ideal": None, "paired_speedups": [],
                "paired_speedup_median": None, "paired_fraction_of_ideal": None,
                "speedup_vs_full_cpu_time": None}
    fastest = min(exact, key=times.__getitem__)
    fastest_cpu = min(exact, key=cpu_times.__getitem__)
    speedup = times["full_fwd"] / times[fastest]
    # each round's full time over the same round's fastest-kernel time: a load change that
    # lasts a round hits both, so the median of these ratios is steadier than a ratio of medians
    paired = [f / x for f, x in zip(wall["full_fwd"], wall[fastest], strict=True)]
    ideal = shape["ideal_speedup"]
    return {
        **shape, "fastest_exact": fastest.removesuffix("_fwd"),
        "speedup_vs_full": speedup, "fraction_of_ideal": speedup / ideal,
        "paired_speedups": paired, "paired_speedup_median": statistics.median(paired),
        "paired_fraction_of_ideal": statistics.median(paired) / ideal,
        "speedup_vs_full_cpu_time": cpu_times["full_fwd"] / cpu_times[fastest_cpu],
    }


def measure_shape(V: int, T: int, P: int, config: AttentionBenchConfig,
                  memory: PeakMemory) -> dict:
    """Peak extra bytes of one call of every implementation (after a warm-up call)."""
    peaks = {}
    for name, call in _make_calls(V, T, P, config, memory.device).items():
        call()
        peaks[name] = memory.measure(call)
    return peaks


def _grid_name(result: dict) -> str:
    return f"{result['views']}x{result['steps']}x{result['tokens_per_frame']}"


def _format_row(result: dict) -> str:
    times = result["times_s"]
    cells = [f"{times[name]:9.3f}" if name in times else f"{'-':>9}"
             for name in ("flex_fwd", "decomposed_fwd", "merged_fwd", "decomposed_fwd_bwd",
                          "flex_fwd_bwd", "reference_fwd", "full_fwd")]
    errors = result["max_abs_err"]
    worst = max(errors.values()) if errors else float("nan")
    if result["speedup_vs_full"] is None:
        figures = f"{'-':>8} {result['ideal_speedup']:6.2f}x {'-':>6} {'-':>7} {'-':>8}"
    else:
        figures = (f"{result['speedup_vs_full']:7.2f}x {result['ideal_speedup']:6.2f}x "
                   f"{100 * result['fraction_of_ideal']:5.0f}% "
                   f"{100 * result['paired_fraction_of_ideal']:6.0f}% "
                   f"{result['speedup_vs_full_cpu_time']:7.2f}x")
    return (f"{_grid_name(result):>10} {result['tokens']:>6} {' '.join(cells)} {figures} "
            f"{worst:9.1e}")


HEADER = (f"{'V x T x P':>10} {'N':>6} {'flex':>9} {'decomp':>9} {'merged':>9} {'dec f+b':>9} "
          f"{'flex f+b':>9} {'ref':>9} {'full':>9} {'speedup':>8} {'ideal':>7} {'frac':>6} "
          f"{'paired':>7} {'cpu-spd':>8} "
          f"{'max err':>9}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench attention", description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="smallest shape only (smoke test)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=AttentionBenchConfig.repeats)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--shape", help="one grid VxTxP only, e.g. 8x16x256")
    parser.add_argument("--only", help="comma-separated kernels to time beside full attention "
                        "(flex, decomposed, merged, decomposed_fwd_bwd, flex_fwd_bwd, "
                        "reference)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda given but CUDA is not available")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    kernels = tuple(name.strip() for name in (args.only or "").split(",") if name.strip())
    exact = {name.removesuffix("_fwd") for name in EXACT}
    known = exact | {"decomposed_fwd_bwd", "flex_fwd_bwd"}
    if set(kernels) - known:
        raise ValueError(f"--only: unknown kernels {sorted(set(kernels) - known)}; "
                         f"choose from {sorted(known)}")
    if kernels and not set(kernels) & exact:
        raise ValueError("--only: name at least one exact forward kernel to compare with full "
                         "attention (flex, decomposed, merged or reference)")
    config = AttentionBenchConfig(repeats=args.repeats, kernels=kernels)
    if args.quick:
        config.grids, config.tokens_per_frame = config.grids[:1], config.tokens_per_frame[:1]
    device = torch.device(args.device)
    shapes = [(V, T, P) for V, T in config.grids for P in config.tokens_per_frame]
    if args.shape:
        try:
            shapes = [tuple(int(n) for n in args.shape.lower().split("x"))]
        except ValueError:
            raise ValueError(f"--shape: expected VxTxP such as 8x16x256, got {args.shape!r}") \
                from None
        if len(shapes[0]) != 3 or min(shapes[0]) < 1:
            raise ValueError(f"--shape: expected three positive numbers, got {args.shape!r}")
    print(f"fused view-time attention, {config.num_heads} heads x {config.head_dim}, "
          f"B={config.batch}, float32, {device}, {torch.get_num_threads()} threads; "
          f"wall seconds, median of {config.repeats}")
    print(HEADER)
    results = []
    for shape in shapes:
        results.append(time_shape(*shape, config, device))
        print(_format_row(results[-1]), flush=True)
    memory = PeakMemory(device)
    print(f"peak memory per call, MiB ({memory.prepare() or 'not measured on this system'}):")
    for shape, result in zip(shapes, results, strict=True):
        result["peak_memory_bytes"] = measure_shape(*shape, config, memory)
        cells = [f"{name}={value / 2**20:.0f}" for name, value in
                 result["peak_memory_bytes"].items() if value is not None]
        print(f"{_grid_name(result):>10} " + " ".join(cells), flush=True)
    for result in results:
        for note in result["notes"]:
            print(f"{_grid_name(result)}: {note}")
    if args.json:
        report = {"benchmark": "attention", "device": str(device), "torch": torch.__version__,
                  "threads": torch.get_num_threads(), "memory_method": memory.method,
                  "config": asdict(config), "results": results}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0
