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
    owner: str  # the identity that submitted it (see Server._identity)
    params: dict[str, Any]
    inputs: dict[str, Any]
    watchers: set[bytes] = field(default_factory=set)
    cancel_event: threading.Event = field(default_factory=threading.Event)
    state: str = "queued"
    forwarded: int = 0  # result messages already sent on to watchers
    announced: int = -1  # the queue position its watchers were last told


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

    def __init__(self, job: Job, cache: ResultCache, emit: Emit, device: str, models: ModelStore,
                 max_output_bytes: int | None = None):
        self.job = job
        self.cache = cache
        self.device = device
        self.models = models
        self._emit = emit
        self.out_dir = cache.job_dir(job.id)
        self.results = 0  # results stored and sent so far; the next one's ordinal
        self.output_bytes = 0
        self.max_output_bytes = max_output_bytes

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
        """Store one result on disk, then send it. Its `ordinal` field numbers the job's
        results from 0 (`done` carries their count), so a client sees what it missed."""
        if "ordinal" in fields:
            raise ValueError("a result's ordinal is set by the worker")
        frames = protocol.encode("result", job=self.job.id, arrays=arrays,
                                 ordinal=self.results, **fields)
        size = sum(memoryview(f).nbytes for f in frames)
        if self.max_output_bytes is not None and self.output_bytes + size > self.max_output_bytes:
            raise protocol.ProtocolError(
                "too_large", f"the job's results would exceed {self.max_output_bytes} bytes "
                f"(the backend's --max-job-output-mb); {self.results} result(s) were kept")
        self.output_bytes += size
        self.cache.add_result(self.job.id, self.results, frames)
        self.results += 1
        self._emit(self.job.id, b"result %d" % (self.results - 1), frames)


class Worker(threading.Thread):
    """Runs one job at a time on the device. Its messages go to the server's thread through
    a PUSH socket that this thread owns, connected to `events_addr` (inproc)."""

    def __init__(self, zctx: zmq.Context, events_addr: str, cache: ResultCache, device: str,
                 models: ModelStore, runners: dict[str, JobRunner],
                 max_output_bytes: int | None = None):
        super().__init__(name="backend-worker", daemon=True)
        self.max_output_bytes = max_output_bytes
        self.cache, self.device, self.models = cache, device, models
        self.runners = runners  # job kind -> its run(ctx, inputs)
        self._zctx, self._events_addr = zctx, events_addr
        self._sock: zmq.Socket | None = None
        self._todo: list[Job | None] = []
        self._cv = threading.Condition()
        self.death: str | None = None  # why the thread stopped, if it ever does
        self.reveal_paths = True  # `done` names the job's folder (single-user mode only)

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
        try:
            self._sock = self._zctx.socket(zmq.PUSH)
            self._sock.linger = 1000
            self._sock.connect(self._events_addr)
            while True:
                with self._cv:
                    while not self._todo:
                        self._cv.wait()
                    job = self._todo.pop(0)
                if job is None:
                    return
                self._run_one(job)
        except BaseException as exc:  # the server sees the thread end and reports it
            self.death = f"{type(exc).__name__}: {exc}"
            log.critical("the worker thread stopped:\n%s", traceback.format_exc())
        finally:
            if self._sock is not None:
                self._sock.close()

    def _run_one(self, job: Job) -> None:
        """Run one job to its final message, whatever it or the cache raises."""
        try:
            final = self._execute(job)
        except BaseException as exc:  # a bug in the bookkeeping itself: still a final reply
            log.error("job %s (%s): internal error:\n%s", job.id, job.kind,
                      traceback.format_exc())
            final = self._failed(job, "internal", f"{type(exc).__name__}: {exc}")
        self.emit(job.id, b"final", final)

    def _execute(self, job: Job) -> list[Any]:
        ctx = JobContext(job, self.cache, self.emit, self.device, self.models,
                         self.max_output_bytes)
        try:
            self.cache.set_state(job.id, "running")
            ctx.progress("started", 0, 1, f"{job.kind} on {self.device}")
            self.runners[job.kind](ctx, job.inputs)
            self.cache.set_state(job.id, "done")
            return protocol.encode("done", job=job.id, results=ctx.results,
                                   **({"cache_dir": str(ctx.out_dir)} if self.reveal_paths
                                      else {}))
        except JobCancelled:
            try:
                self.cache.set_state(job.id, "cancelled")
            except Exception as exc:
                log.error("job %s: could not record the cancel: %s", job.id, exc)
            return protocol.encode("cancelled", job=job.id)
        except protocol.ProtocolError as exc:
            return self._failed(job, exc.code, exc.message)
        except BaseException as exc:  # a failing job must never take the worker down
            log.error("job %s (%s) failed:\n%s", job.id, job.kind, traceback.format_exc())
            return self._failed(job, "job_failed", describe_exception(exc))

    def _failed(self, job: Job, code: str, message: str) -> list[Any]:
        """The job's error reply; recording the failure in the cache may fail too (a full
        disk, no file descriptors left, the job folder gone): the reply then says so."""
        try:
            self.cache.set_state(job.id, "failed", {"code": code, "message": message})
        except Exception as exc:
            log.error("job %s: could not record its failure in the cache: %s", job.id, exc)
            message = (f"{message} (recording the failure in the result cache failed too: "
                       f"{describe_exception(exc)})")
        return protocol.error_frames(code, message, job=job.id)


def describe_exception(exc: BaseException) -> str:
    """`Type: message` of an exception, without the file paths an OSError carries."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return f"{type(exc).__name__}: {exc}"
