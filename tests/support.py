"""Helpers shared by the tests: a real backend process on a random loopback port, and small
seeded scenes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from backend.cameras import orbit_rig

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 90.0


@dataclass
class BackendProcess:
    proc: subprocess.Popen
    address: str
    ready_file: Path
    cache_dir: Path
    log_path: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError(f"backend did not stop within {timeout} s on {sig}; "
                                     f"log:\n{self.log()}") from None
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def start_backend(tmp: Path, cache_dir: Path | None = None,
                  extra_args: list[str] | tuple[str, ...] = ()) -> BackendProcess:
    """Start `python -m backend serve` on a free loopback port and wait for its ready file."""
    tmp.mkdir(parents=True, exist_ok=True)
    ready = tmp / f"ready-{time.monotonic_ns()}.json"
    cache_dir = cache_dir or tmp / "cache"
    log_path = tmp / f"backend-{time.monotonic_ns()}.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "backend", "serve", "--address", "tcp://127.0.0.1:0",
           "--ready-file", str(ready), "--cache-dir", str(cache_dir), "--device", "cpu",
           *extra_args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"backend did not start: rc={proc.poll()} "
                                 f"log:\n{log_path.read_text(errors='replace')}")
        time.sleep(0.05)
    info = json.loads(ready.read_text())
    return BackendProcess(proc, info["address"], ready, cache_dir, log_path)


def random_gaussian_arrays(n: int, seed: int = 0, center=(0.0, 0.0, 0.0),
                           extent: float = 0.5) -> dict[str, np.ndarray]:
    """Wire arrays of `n` random Gaussians in a cube of half-size `extent` around `center`."""
    rng = np.random.default_rng(seed)
    quats = rng.normal(size=(n, 4)).astype(np.float32)
    quats /= np.linalg.norm(quats, axis=1, keepdims=True)
    return {
        "means": (rng.uniform(-extent, extent, (n, 3)) + np.asarray(center)).astype(np.float32),
        "quats": quats,
        "log_scales": rng.uniform(-4.0, -2.5, (n, 3)).astype(np.float32),
        "opacity_logits": rng.uniform(-1.0, 3.0, n).astype(np.float32),
        "sh0": rng.normal(0.0, 0.8, (n, 3)).astype(np.float32),
    }


def ring_cameras(num: int, radius: float = 3.0, size: int = 32,
                 focal: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`num` OpenCV cameras on a ring around the origin looking at it (world Z up):
    c2w [C, 4, 4] float32 and intrinsics [C, 6] float32."""
    c2w, intr = orbit_rig(num, radius=radius, camera_height=0.8, focal=focal or size * 1.2,
                          width=size, height=size)
    return c2w.astype(np.float32), intr.astype(np.float32)
