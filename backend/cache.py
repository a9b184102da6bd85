"""The result cache on disk: every job's state and every result message, written before it is
sent, so a client that went away can `fetch` them later (also after a backend restart).

Layout::

    <root>/jobs/<job id>/job.json             kind, params, owner, state, timestamps, count
    <root>/jobs/<job id>/results/00000.json   the result message's header (frame 0)
    <root>/jobs/<job id>/results/00000.bin    its array buffers, concatenated in header order
    <root>/jobs/<job id>/results/00000.sha256 SHA-256 of the header then the buffers
    <root>/jobs/<job id>/...                  user-facing outputs (PLY sequences, previews)

Durability: every file is written to a temporary name, flushed to disk (fsync) and renamed
over its final name, and the folder is synced after the rename, so a crash leaves either the
old file or the new one, never a torn one. A result is read back only if its checksum
matches (`CacheCorrupt` otherwise). At start-up `recover` marks jobs that a crash left
`queued` or `running` as failed. The cache folder is owner-only (0700).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

FINAL_STATES = frozenset({"done", "failed", "cancelled"})


class CacheCorrupt(Exception):
    """A stored result does not match its checksum (or is missing a part)."""

    def __init__(self, job: str, ordinal: int, why: str):
        super().__init__(f"cached result {ordinal} of job {job} is corrupt ({why}); run the "
                         "job again")
        self.job, self.ordinal = job, ordinal


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open folders; its renames are durable enough
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, chunks: list[Any], sync_dir: bool = True) -> None:
    """Write `chunks` to `path` through a synced temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0),
                 0o600)
    with open(fd, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if sync_dir:
        _fsync_dir(path.parent)


def _checksum(chunks: list[Any]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def folder_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


class ResultCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        (self.root / "jobs").mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)  # results are the users' data: owner-only
        self._finished: dict[str, tuple[float, int]] | None = None  # job -> (when, bytes)

    def job_dir(self, job: str) -> Path:
        return self.root / "jobs" / job

    def exists(self, job: str) -> bool:
        return (self.job_dir(job) / "job.json").is_file()

    def create(self, job: str, kind: str, params: dict[str, Any], owner: str = "") -> Path:
        folder = self.job_dir(job)
        (folder / "results").mkdir(parents=True, exist_ok=True)
        _fsync_dir(folder.parent)
        self._write_meta(job, {"job": job, "kind": kind, "params": params, "owner": owner,
                               "state": "queued", "created": time.time(), "results": 0,
                               "error": None})
        return folder

    def meta(self, job: str) -> dict[str, Any]:
        return json.loads((self.job_dir(job) / "job.json").read_text())

    def _write_meta(self, job: str, meta: dict[str, Any]) -> None:
        _atomic_write(self.job_dir(job) / "job.json", [json.dumps(meta, indent=1).encode()])

    def set_state(self, job: str, state: str, error: dict[str, str] | None = None) -> None:
        meta = self.meta(job)
        meta["state"] = state
        if error is not None:
            meta["error"] = error
        if state in FINAL_STATES:
            meta["finished"] = time.time()
        self._write_meta(job, meta)

    def add_result(self, job: str, ordinal: int, frames: list[Any]) -> None:
        """Store result `ordinal` (frames as produced by protocol.encode). The buffers are
        written as they are, without an intermediate copy; the checksum goes last, so a
        result without one was never completely written."""
        base = self.job_dir(job) / "results" / f"{ordinal:05d}"
        _atomic_write(base.with_suffix(".bin"), frames[1:], sync_dir=False)
        _atomic_write(base.with_suffix(".json"), [frames[0]], sync_dir=False)
        _atomic_write(base.with_suffix(".sha256"), [_checksum(frames).encode()])
        meta = self.meta(job)
        meta["results"] = max(int(meta["results"]), ordinal + 1)
        self._write_meta(job, meta)

    def result_frames(self, job: str, ordinal: int) -> list[bytes | memoryview]:
        """Read stored result `ordinal` back as message frames, checked against its
        checksum; CacheCorrupt naming the job when it does not match."""
        base = self.job_dir(job) / "results" / f"{ordinal:05d}"
        try:
            head = base.with_suffix(".json").read_bytes()
            blob = memoryview(base.with_suffix(".bin").read_bytes())
            expected = base.with_suffix(".sha256").read_text().strip()
        except FileNotFoundError as exc:
            raise CacheCorrupt(job, ordinal, f"{Path(exc.filename).name} is missing") from None
        if _checksum([head, blob]) != expected:
            raise CacheCorrupt(job, ordinal, "checksum mismatch")
        frames: list[bytes | memoryview] = [head]
        offset = 0
        for spec in json.loads(head)["arrays"]:
            size = _nbytes(spec)
            frames.append(blob[offset:offset + size])
            offset += size
        if offset != len(blob):
            raise CacheCorrupt(job, ordinal, f"{len(blob)} bytes stored, the header describes "
                               f"{offset}")
        return frames

    # ------------------------------------------------------------------ housekeeping
    def job_ids(self) -> list[str]:
        return sorted(p.name for p in (self.root / "jobs").iterdir() if p.is_dir())

    def recover(self) -> list[str]:
        """At start-up: jobs a crash left `queued` or `running` become `failed` (their
        stored results stay fetchable); half-written temporary files are removed. Returns
        the ids of the jobs marked."""
        marked = []
        for job in self.job_ids():
            for tmp in self.job_dir(job).rglob("*.tmp"):
                tmp.unlink(missing_ok=True)
            try:
                meta = self.meta(job)
            except (OSError, ValueError):
                continue  # a folder without a readable job.json is not a job
            if meta.get("state") in FINAL_STATES:
                continue
            self.set_state(job, "failed", {
                "code": "job_failed",
                "message": f"the backend stopped while this job was {meta.get('state')}; "
                           f"{meta.get('results', 0)} result(s) were kept"})
            marked.append(job)
        return marked

    def note_finished(self, job: str) -> None:
        """Count a job that just ended in the size index `evict` keeps."""
        if self._finished is not None and self.job_dir(job).is_dir():
            self._finished[job] = (time.time(), folder_bytes(self.job_dir(job)))

    def _scan_finished(self) -> dict[str, tuple[float, int]]:
        found = {}
        for job in self.job_ids():
            try:
                meta = self.meta(job)
            except (OSError, ValueError):
                continue
            if meta.get("state") in FINAL_STATES:
                when = float(meta.get("finished", meta.get("created", 0.0)))
                found[job] = (when, folder_bytes(self.job_dir(job)))
        return found

    def evict(self, max_bytes: int | None, max_age_s: float | None,
              active: set[str] = frozenset()) -> list[str]:
        """Delete finished jobs older than `max_age_s`, then the oldest finished first until
        the cache holds at most `max_bytes`; never a job in `active` (queued or running).
        Returns the ids deleted."""
        if max_bytes is None and max_age_s is None:
            return []
        if self._finished is None:
            self._finished = self._scan_finished()
        total = sum(size for _, size in self._finished.values())
        total += sum(folder_bytes(self.job_dir(job)) for job in active)
        now, deleted = time.time(), []
        for when, job in sorted((w, j) for j, (w, _) in self._finished.items()):
            too_old = max_age_s is not None and now - when > max_age_s
            too_big = max_bytes is not None and total > max_bytes
            if job in active or not (too_old or too_big):
                continue
            shutil.rmtree(self.job_dir(job), ignore_errors=True)
            total -= self._finished.pop(job)[1]
            deleted.append(job)
        return deleted


def _nbytes(spec: dict[str, Any]) -> int:
    n = np.dtype(spec["dtype"]).itemsize
    for d in spec["shape"]:
        n *= int(d)
    return n
