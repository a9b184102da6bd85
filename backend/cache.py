"""The result cache on disk: every job's state and every result message, written before it is
sent, so a client that went away can `fetch` them later (also after a backend restart).

Layout::

    <root>/jobs/<job id>/job.json             kind, params, state, timestamps, result count
    <root>/jobs/<job id>/results/00000.json   the result message's header (frame 0)
    <root>/jobs/<job id>/results/00000.bin    its array buffers, concatenated in header order
    <root>/jobs/<job id>/...                  user-facing outputs (PLY sequences, previews)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

FINAL_STATES = frozenset({"done", "failed", "cancelled"})


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class ResultCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        (self.root / "jobs").mkdir(parents=True, exist_ok=True)

    def job_dir(self, job: str) -> Path:
        return self.root / "jobs" / job

    def exists(self, job: str) -> bool:
        return (self.job_dir(job) / "job.json").is_file()

    def create(self, job: str, kind: str, params: dict[str, Any]) -> Path:
        folder = self.job_dir(job)
        (folder / "results").mkdir(parents=True, exist_ok=True)
        self._write_meta(job, {"job": job, "kind": kind, "params": params, "state": "queued",
                               "created": time.time(), "results": 0, "error": None})
        return folder

    def meta(self, job: str) -> dict[str, Any]:
        return json.loads((self.job_dir(job) / "job.json").read_text())

    def _write_meta(self, job: str, meta: dict[str, Any]) -> None:
        _atomic_write(self.job_dir(job) / "job.json", json.dumps(meta, indent=1).encode())

    def set_state(self, job: str, state: str, error: dict[str, str] | None = None) -> None:
        meta = self.meta(job)
        meta["state"] = state
        if error is not None:
            meta["error"] = error
        if state in FINAL_STATES:
            meta["finished"] = time.time()
        self._write_meta(job, meta)

    def add_result(self, job: str, frames: list[Any]) -> int:
        """Store one result message (frames as produced by protocol.encode); returns its
        ordinal. The buffers are written as they are, without an intermediate copy."""
        meta = self.meta(job)
        ordinal = int(meta["results"])
        base = self.job_dir(job) / "results" / f"{ordinal:05d}"
        with open(base.with_suffix(".bin.tmp"), "wb") as f:
            for buf in frames[1:]:
                f.write(buf)
        os.replace(base.with_suffix(".bin.tmp"), base.with_suffix(".bin"))
        _atomic_write(base.with_suffix(".json"), bytes(frames[0]))
        meta["results"] = ordinal + 1
        self._write_meta(job, meta)
        return ordinal

    def result_frames(self, job: str, ordinal: int) -> list[bytes | memoryview]:
        """Read stored result `ordinal` back as message frames."""
        base = self.job_dir(job) / "results" / f"{ordinal:05d}"
        head = base.with_suffix(".json").read_bytes()
        blob = memoryview(base.with_suffix(".bin").read_bytes())
        frames: list[bytes | memoryview] = [head]
        offset = 0
        for spec in json.loads(head)["arrays"]:
            size = _nbytes(spec)
            frames.append(blob[offset:offset + size])
            offset += size
        if offset != len(blob):
            raise ValueError(f"cached result {base} is corrupt: {len(blob)} bytes on disk, "
                             f"header describes {offset}")
        return frames


def _nbytes(spec: dict[str, Any]) -> int:
    n = np.dtype(spec["dtype"]).itemsize
    for d in spec["shape"]:
        n *= int(d)
    return n
