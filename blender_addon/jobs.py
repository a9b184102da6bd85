"""Jobs on the backend, driven without ever blocking Blender: `JobRunner.poll()` reads what
has arrived and returns at once; the add-on calls it from a `bpy.app.timers` callback
(tests and scripts call it in a loop).

The runner keeps one record per job (state, stage, step, results) and watches the backend:
a local backend process that exits, or a backend that stops answering while a job is active
(a `hello` ping goes unanswered), marks the active jobs `lost`. After a restart, `refetch`
asks the backend for a lost job by id: its cache replays what the job produced."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backend_process import BackendStartError, LocalBackend
from .vendor import protocol

# What each backend error code means for the user, and what to do about it.
ERROR_HINTS: dict[str, str] = {
    "bad_header": "The backend could not read the request: update the add-on and the backend "
                  "to the same version.",
    "bad_version": "The add-on and the backend speak different protocol versions: update both "
                   "to the same release.",
    "unknown_type": "The backend does not know this request: update the add-on and the "
                    "backend to the same version.",
    "bad_field": "A request field was refused: check the job settings.",
    "bad_array": "An input array was refused (type or size): check the inputs.",
    "too_large": "The job is too large for the backend: use fewer views, frames or pixels, or "
                 "start the backend with a larger --max-message-mb.",
    "bad_camera": "A camera was refused: use perspective cameras without zero or negative "
                  "scale, with clip start below clip end.",
    "bad_input": "The inputs do not fit together: check the frame range, the input video and "
                 "the rig.",
    "unknown_kind": "This backend cannot run this kind of job (its models may not be "
                    "installed yet).",
    "unknown_job": "The backend no longer knows this job (its cache was cleared, or this is "
                   "another backend).",
    "duplicate_job": "The job id is already in use on the backend: submit the job again.",
    "job_failed": "The job failed inside the backend: see the backend log.",
    "queue_full": "The backend's queue is full: wait for queued jobs to finish, or cancel "
                  "some.",
    "unavailable": "The backend cannot run jobs now (see its log; its disk may be full): "
                   "restart it.",
    "cache_corrupt": "A stored result of this job is damaged on the backend's disk: run the "
                     "job again.",
    "internal": "The backend hit an internal error (it keeps serving): see the backend log.",
    "backend_died": "The backend process stopped: restart it, then fetch the job again.",
    "backend_unreachable": "The backend stopped answering: check it is running and reachable, "
                           "then fetch the job again.",
    "start_failed": "The local backend could not start: check the Python interpreter and the "
                    "repository folder in the add-on preferences.",
}

ACTIVE_STATES = frozenset({"submitted", "queued", "running", "refetching"})
FINAL_STATES = frozenset({"done", "cancelled", "failed", "lost"})
MAX_FETCH_ROUNDS = 8  # fetches of missing results before a job is given up as failed
FETCH_CHUNK = 4000  # ordinals asked for in one fetch


def describe_error(code: str, message: str) -> str:
    """One line for the user: the backend's message, then what to do."""
    hint = ERROR_HINTS.get(code, "Unexpected error.")
    return f"{message} [{code}] {hint}" if message else f"[{code}] {hint}"


@dataclass
class RunnerConfig:
    """Timing of the runner's health checks (seconds)."""

    ping_after_s: float = 10.0  # ping a silent backend while a job is active
    dead_after_s: float = 20.0  # no answer this long after a ping: the backend is unreachable
    connect_timeout_s: float = 15.0  # no welcome this long after connecting: unreachable
    receive_hwm: int | None = None  # messages the socket queues (None: zmq's default)


@dataclass
class JobRecord:
    """One job as the add-on sees it."""

    id: str
    kind: str
    state: str = "submitted"  # submitted queued running refetching done cancelled failed lost
    stage: str = ""
    step: int = 0
    of: int = 0
    message: str = ""
    error_code: str = ""
    error_message: str = ""
    results: list[protocol.Message] = field(default_factory=list)
    context: dict[str, Any] = field(default_factory=dict)  # e.g. the scene frames of results
    cache_dir: str = ""  # the backend's folder for this job (grid preview, PLY sequence)
    on_finish: Callable[[JobRecord], None] | None = None
    ref: str = ""  # the submit's reference; `id` is the backend's job id once accepted
    cancel_requested: bool = False  # cancel asked for before the backend named the job
    fetch_rounds: int = 0  # fetches of missing results since the last `done`

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def fraction(self) -> float:
        return min(max(self.step / self.of, 0.0), 1.0) if self.of > 0 else 0.0

    @property
    def error_text(self) -> str:
        return describe_error(self.error_code, self.error_message) if self.error_code else ""

    def ordered_results(self, content: str | None = None) -> list[protocol.Message]:
        """Results sorted by index, optionally only those of one `content` type."""
        chosen = [r for r in self.results if content is None or r.get("content") == content]
        return sorted(chosen, key=lambda r: int(r.get("index", 0)))

    def gaussian_steps(self) -> tuple[list[dict[str, np.ndarray]], list[int]]:
        """Per-timestep Gaussian arrays and their `frame` fields, from `gaussians` results."""
        results = self.ordered_results("gaussians")
        return ([dict(r.arrays) for r in results],
                [int(r.get("frame", r.get("index", 0))) for r in results])


class JobRunner:
    """Jobs on one backend (local child process or remote address) through the vendored
    client. Single-threaded: call every method, `poll` included, from Blender's main thread."""

    def __init__(self, config: RunnerConfig | None = None):
        self.config = config or RunnerConfig()
        self.client = None
        self.address: str | None = None
        self.local: LocalBackend | None = None
        self.backend_state = "stopped"  # stopped starting connecting ready dead unreachable
        self.backend_info: dict[str, Any] = {}
        self.backend_error = ""
        self.jobs: dict[str, JobRecord] = {}
        self.notices: list[tuple[str, str]] = []  # (level INFO|WARNING|ERROR, text) to show
        self._curve: dict[str, str | None] = {}
        self._last_heard = 0.0
        self._ping_sent: float | None = None
        self._connect_started = 0.0
        self._refetch_when_ready = False

    # ------------------------------------------------------------------ backend
    def start_local(self, backend: LocalBackend) -> None:
        """Start `backend` (returns at once); `poll` connects once its ready file appears."""
        self.disconnect()
        self.local = backend
        try:
            backend.start()
        except (ValueError, OSError) as exc:
            self._set_dead("start_failed", str(exc))
            raise
        self.backend_state, self.backend_error = "starting", ""

    def restart_local(self, refetch_lost: bool = True) -> None:
        """Stop and start the local backend again; lost jobs are fetched once it is up."""
        if self.local is None:
            raise ValueError("no local backend has been started")
        self.local.stop()
        self._refetch_when_ready = refetch_lost
        self.start_local(self.local)

    def stop_local(self) -> None:
        self.disconnect()
        if self.local is not None:
            self.local.stop()
        self.backend_state = "stopped"

    def connect(self, address: str, curve_server_public: str | None = None,
                curve_client_secret: str | None = None) -> None:
        """Open a client to `address` and say hello; `poll` sees the welcome."""
        from .vendor.client import BackendClient  # needs pyzmq: imported only when used

        if self.client is not None:
            self.client.close()
        self._curve = {"curve_server_public": curve_server_public or None,
                       "curve_client_secret": curve_client_secret or None}
        self.client = BackendClient(address, **self._curve,
                                    receive_hwm=self.config.receive_hwm)
        self.address = address
        self.backend_state, self.backend_error = "connecting", ""
        self._connect_started = self._last_heard = time.monotonic()
        self._ping_sent = None
        self.client.hello("blender-addon")

    def disconnect(self) -> None:
        if self.client is not None:
            self.client.close()
        self.client = None
        if self.backend_state in ("connecting", "ready"):
            self.backend_state = "stopped"

    def close(self) -> None:
        self.disconnect()
        if self.local is not None:
            self.local.stop()

    def release(self) -> None:
        """Ask the backend to free its models and GPU memory."""
        self._require_client().release()

    def _require_client(self):
        if self.client is None or self.backend_state not in ("connecting", "ready"):
            raise ValueError(f"the backend is not connected (it is {self.backend_state}): "
                             "start it or connect to its address first")
        return self.client

    # ------------------------------------------------------------------ jobs
    def submit(self, kind: str, params: dict[str, Any] | None = None,
               arrays: dict[str, np.ndarray] | None = None,
               context: dict[str, Any] | None = None,
               on_finish: Callable[[JobRecord], None] | None = None) -> JobRecord:
        """Send a job. `on_finish(record)` runs from `poll` when it is done, cancelled or
        failed (not when the backend is lost: the job may still be fetched)."""
        ref = self._require_client().submit(kind, params or {}, arrays or {})
        record = JobRecord(ref, kind, context=dict(context or {}), on_finish=on_finish,
                           ref=ref)
        self.jobs[ref] = record  # re-keyed by the backend's job id when it is accepted
        return record

    def latest(self) -> JobRecord | None:
        return next(reversed(self.jobs.values()), None)

    def active_jobs(self) -> list[JobRecord]:
        return [j for j in self.jobs.values() if j.active]

    def cancel(self, job_id: str | None = None) -> None:
        """Cancel one job (default: the latest active one)."""
        if job_id is None:
            active = self.active_jobs()
            if not active:
                raise ValueError("no job is running or queued")
            job_id = active[-1].id
        record = self.jobs.get(job_id)
        if record is not None and record.state == "submitted":
            record.cancel_requested = True  # sent once the backend names the job
            return
        self._require_client().cancel(job_id, "job")

    def cancel_queued(self) -> None:
        """Drop this client's queued jobs; the running one goes on."""
        self._require_client().cancel(None, "queued")

    def refetch(self, job_id: str) -> JobRecord:
        """Ask the backend for a job by id again (after a restart, or a job submitted from
        another Blender): its cached results are replayed, then its final state."""
        client = self._require_client()
        record = self.jobs.get(job_id) or JobRecord(job_id, "fetched")
        self.jobs[job_id] = record
        record.results.clear()
        record.fetch_rounds = 0
        record.state, record.error_code, record.error_message = "refetching", "", ""
        client.fetch(job_id)
        return record

    # ------------------------------------------------------------------ polling
    def poll(self) -> bool:
        """Handle everything that has arrived and check the backend's health; never blocks.
        Returns True when something changed (the UI redraws then)."""
        changed = self._poll_start()
        if self.local is not None and self.backend_state in ("connecting", "ready") \
                and not self.local.alive:
            self._backend_lost("backend_died", f"the local backend exited (code "
                               f"{self.local.exit_code}):\n{self.local.log_tail(8)}")
            return True
        if self.client is None:
            return changed
        messages = self.client.poll(0)
        if messages:
            self._last_heard, self._ping_sent = time.monotonic(), None
        for msg in messages:
            self._handle(msg)
        return self._check_silence() or changed or bool(messages)

    @property
    def busy(self) -> bool:
        """Whether anything needs frequent polling (starting, connecting or active jobs)."""
        return self.backend_state in ("starting", "connecting") or bool(self.active_jobs())

    def _poll_start(self) -> bool:
        if self.backend_state != "starting" or self.local is None:
            return False
        try:
            address = self.local.poll_ready()
        except BackendStartError as exc:
            self._set_dead("start_failed", str(exc))
            return True
        if address is None:
            return False
        self.connect(address)
        return True

    def _check_silence(self) -> bool:
        now = time.monotonic()
        if self.backend_state == "connecting":
            if now - self._connect_started > self.config.connect_timeout_s:
                self._backend_lost("backend_unreachable", f"no answer from {self.address} "
                                   f"within {self.config.connect_timeout_s:.0f} s")
                return True
            return False
        if self.backend_state != "ready" or not self.active_jobs():
            return False
        if self._ping_sent is None:
            if now - self._last_heard > self.config.ping_after_s:
                self.client.hello("blender-addon")
                self._ping_sent = now
            return False
        if now - self._ping_sent > self.config.dead_after_s - self.config.ping_after_s:
            self._backend_lost("backend_unreachable", f"the backend at {self.address} "
                               f"stopped answering")
            return True
        return False

    def _set_dead(self, code: str, message: str) -> None:
        self.backend_state = "dead"
        self.backend_error = describe_error(code, message)
        self.notices.append(("ERROR", self.backend_error))

    def _backend_lost(self, code: str, message: str) -> None:
        self._set_dead(code, message)
        if code == "backend_unreachable":
            self.backend_state = "unreachable"
        for record in self.active_jobs():
            record.state, record.error_code, record.error_message = "lost", code, message

    def _handle(self, msg: protocol.Message) -> None:
        ref = msg.get("ref")
        if isinstance(ref, str) and ref in self.jobs and self.jobs[ref].state == "submitted":
            self._answer_to_submit(self.jobs[ref], msg)
            return
        if msg.job is None:
            self._handle_backend_message(msg)
            return
        record = self.jobs.get(msg.job)
        if record is None:
            return  # a job of another client, or one this runner forgot
        if msg.type == "accepted":
            record.state = "queued"
        elif msg.type == "progress":
            stage = str(msg.get("stage", ""))
            record.state = "queued" if stage == "queued" else "running"
            record.stage, record.message = stage, str(msg.get("message", ""))
            record.step, record.of = int(msg.get("step", 0)), int(msg.get("of", 0))
        elif msg.type == "result":
            if msg.get("ordinal") in {r.get("ordinal") for r in record.results}:
                return  # already here (a fetch replays what it is asked for)
            record.results.append(msg)
            record.message = f"received {len(record.results)} of {msg.get('of', '?')}"
        elif msg.type == "done" and self._fetch_missing(record, int(msg.get("results", 0))):
            return
        elif msg.type in ("done", "cancelled", "error"):
            self._finish(record, msg)

    def _answer_to_submit(self, record: JobRecord, msg: protocol.Message) -> None:
        """The backend accepted the job (the record takes its job id) or refused it."""
        if msg.type == "error":
            self._finish(record, msg)
            return
        if msg.job is None:
            return
        record.id, record.state = str(msg.job), "queued"
        self.jobs = {(record.id if key == record.ref else key): value
                     for key, value in self.jobs.items()}
        if record.cancel_requested and self.client is not None:
            self.client.cancel(record.id, "job")

    def _fetch_missing(self, record: JobRecord, count: int) -> bool:
        """On `done`: when results are missing (by ordinal), fetch them and wait for the
        replay's `done`; True while that is under way."""
        have = {r.get("ordinal") for r in record.results}
        missing = [k for k in range(count) if k not in have]
        if not missing or self.client is None:
            return False
        if record.fetch_rounds >= MAX_FETCH_ROUNDS:
            record.context["missing_results"] = len(missing)
            return False
        record.fetch_rounds += 1
        record.state = "refetching"
        record.message = f"fetching {len(missing)} missing result(s)"
        self.client.fetch(record.id, missing[:FETCH_CHUNK])
        return True

    def _handle_backend_message(self, msg: protocol.Message) -> None:
        if msg.type == "welcome":
            self.backend_state, self.backend_error = "ready", ""
            self.backend_info = dict(msg.fields)
            if msg.get("healthy") is False:
                self.backend_error = describe_error("unavailable", str(msg.get("problem", "")))
                self.notices.append(("ERROR", self.backend_error))
            if self._refetch_when_ready:
                self._refetch_when_ready = False
                for record in [r for r in self.jobs.values() if r.state == "lost"]:
                    self.refetch(record.id)
        elif msg.type == "released":
            self.notices.append(("INFO", f"backend released {msg.get('models', 0)} model(s)"))
        elif msg.type == "error":
            text = describe_error(str(msg.get("code", "internal")), str(msg.get("message", "")))
            self.notices.append(("ERROR", text))

    def _finish(self, record: JobRecord, msg: protocol.Message) -> None:
        if msg.type == "done" and record.context.get("missing_results"):
            record.state, record.error_code = "failed", "job_failed"
            record.error_message = (f"{record.context['missing_results']} result(s) never "
                                    "arrived, also after fetching them again")
            self.notices.append(("ERROR", f"{record.kind} job failed: {record.error_text}"))
        elif msg.type == "done":
            record.state, record.stage, record.message = "done", "done", "finished"
            record.step = record.of = max(record.of, 1)
            record.cache_dir = str(msg.get("cache_dir", ""))
        elif msg.type == "cancelled":
            record.state, record.message = "cancelled", "cancelled"
        else:
            record.state = "failed"
            record.error_code = str(msg.get("code", "internal"))
            record.error_message = str(msg.get("message", ""))
            self.notices.append(("ERROR", f"{record.kind} job failed: {record.error_text}"))
        if record.on_finish is not None:
            try:
                record.on_finish(record)
            except Exception as exc:  # an import error must not stop the polling
                record.message = f"could not use the results: {exc}"
                self.notices.append(("ERROR", f"{record.kind} job finished but its results "
                                     f"could not be used: {type(exc).__name__}: {exc}"))
