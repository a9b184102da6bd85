"""Running jobs: a queued job, the context a running job reports through, the models kept
between jobs, and the worker thread.

A job kind (`backend.kinds`) validates its message in the server's thread (so bad input is
refused before the job is accepted) and runs in the worker thread. It reports progress and
results through its `JobContext`; every result is written to the cache before it is sent."""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from backend import protocol
from backend.cache import ResultCache

log = logging.getLogger("backend.worker")


class JobCancelled(Exception):
    """Raised inside a job when its client asked to cancel it."""


@dataclass
class Job:
    id: str
    kind: str
    owner: bytes
    params: dict[str, Any]
    inputs: dict[str, Any]
    watchers: set[bytes] = field(default_factory=set)
    cancel_event: threading.Event = field(default_factory=threading.Event)
    state: str = "queued"
    forwarded: int = 0  # result messages already sent on to watchers


class ModelStore:
    """Models loaded by jobs, kept between jobs until `release`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, Any] = {}

    def get(self, key: str, load: Callable[[], Any]) -> Any:
        with self._lock:
            if key not in self._models:
                self._models[key] = load()
            return self._models[key]

    def clear(self) -> int:
        with self._lock:
            count = len(self._models)
            self._models.clear()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass
        return count


Emit = Callable[[str, bytes, list[Any]], None]  # (job id, tag, frames)
JobRunner = Callable[["JobContext", dict[str, Any]], None]  # a job kind's run(ctx, inputs)


class JobContext:
    """What a running job sees: its inputs' device, progress/result reporting, cancel checks."""

    def __init__(self, job: Job, cache: ResultCache, emit: Emit, device: str, models: ModelStore):
        self.job = job
        self.cache = cache
        self.device = device
        self.models = models
        self._emit = emit
        self.out_dir = cache.job_dir(job.id)

    def check_cancelled(self) -> None:
        if self.job.cancel_event.is_set():
            raise JobCancelled(self.job.id)

    def progress(self, stage: str, step: int, of: int, message: str = "") -> None:
        """Report progress; also the point where a cancel request takes effect."""
        self.check_cancelled()
        frames = protocol.encode("progress", job=self.job.id, stage=stage, step=int(step),
                                 of=int(of), message=message)
        self._emit(self.job.id, b"progress", frames)

    def result(self, arrays: dict[str, np.ndarray], **fields: Any) -> None:
        """Store one result on disk, then send it."""
        frames = protocol.encode("result", job=self.job.id, arrays=arrays, **fields)
        self.cache.add_result(self.job.id, frames)
        self._emit(self.job.id, b"result", frames)


class Worker(threading.Thread):
    """Runs one job at a time on the device. Its messages go to the server's thread through
    a PUSH socket that this thread owns, connected to `events_addr` (inproc)."""

    def __init__(self, zctx: zmq.Context, events_addr: str, cache: ResultCache, device: str,
                 models: ModelStore, runners: dict[str, JobRunner]):
        super().__init__(name="backend-worker", daemon=True)
        self.cache, self.device, self.models = cache, device, models
        self.runners = runners  # job kind -> its run(ctx, inputs)
        self._zctx, self._events_addr = zctx, events_addr
        self._sock: zmq.Socket | None = None
        self._todo: list[Job | None] = []
        self._cv = threading.Condition()

    def emit(self, job: str, tag: bytes, frames: list[Any]) -> None:
        """Send one message of `job` to the server thread (call from this thread only)."""
        assert self._sock is not None
        self._sock.send_multipart([job.encode(), tag, *frames], copy=False)

    def start_job(self, job: Job | None) -> None:
        """Hand over the next job (None stops the thread)."""
        with self._cv:
            self._todo.append(job)
            self._cv.notify()

    def run(self) -> None:
        self._sock = self._zctx.socket(zmq.PUSH)
        self._sock.linger = 1000
        self._sock.connect(self._events_addr)
        try:
            while True:
                with self._cv:
                    while not self._todo:
                        self._cv.wait()
                    job = self._todo.pop(0)
                if job is None:
                    return
                self._run_one(job)
        finally:
            self._sock.close()

    def _run_one(self, job: Job) -> None:
        ctx = JobContext(job, self.cache, self.emit, self.device, self.models)
        try:
            self.cache.set_state(job.id, "running")
            ctx.progress("started", 0, 1, f"{job.kind} on {self.device}")
            self.runners[job.kind](ctx, job.inputs)
            self.cache.set_state(job.id, "done")
            final = protocol.encode("done", job=job.id,
                                    results=self.cache.meta(job.id)["results"],
                                    cache_dir=str(ctx.out_dir))
        except JobCancelled:
            self.cache.set_state(job.id, "cancelled")
            final = protocol.encode("cancelled", job=job.id)
        except protocol.ProtocolError as exc:
            final = self._failed(job, exc.code, exc.message)
        except Exception as exc:  # a failing job must never take the server down
            log.error("job %s (%s) failed:\n%s", job.id, job.kind, traceback.format_exc())
            final = self._failed(job, "job_failed", f"{type(exc).__name__}: {exc}")
        self.emit(job.id, b"final", final)

    def _failed(self, job: Job, code: str, message: str) -> list[Any]:
        self.cache.set_state(job.id, "failed", {"code": code, "message": message})
        return protocol.error_frames(code, message, job=job.id)
