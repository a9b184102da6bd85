"""Client of the backend server (numpy + pyzmq + standard library only).

The Blender add-on vendors this file next to `protocol.py`, and calls `poll()` from a
`bpy.app.timers` callback, so nothing here ever blocks unless asked to (`wait`, `run_job`).
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from . import protocol
from .protocol import Message

FINAL_TYPES = frozenset({"done", "cancelled", "error"})


# At most this many result ordinals are asked for in one `fetch` (the header stays small).
FETCH_CHUNK = 4000


class BackendTimeout(TimeoutError):
    """No expected reply arrived in time (the backend is busy, gone, or unreachable)."""


class JobRefused(RuntimeError):
    """The backend refused a submit; `reply` is its `error` message."""

    def __init__(self, reply: Message):
        super().__init__(f"[{reply.get('code')}] {reply.get('message')}")
        self.reply = reply


def missing_ordinals(results: Iterable[Message], count: int) -> list[int]:
    """Ordinals in [0, count) of results not among `results` (what to `fetch` again)."""
    have = {r.get("ordinal") for r in results}
    return [k for k in range(count) if k not in have]


@dataclass
class JobOutcome:
    """Everything one job sent: results in arrival order, progress events, the final message."""

    job: str
    accepted: Message | None = None
    results: list[Message] = field(default_factory=list)
    progress: list[Message] = field(default_factory=list)
    final: Message | None = None

    @property
    def ok(self) -> bool:
        return self.final is not None and self.final.type == "done"


class BackendClient:
    """A DEALER socket speaking the protocol. Not thread-safe: use it from one thread."""

    def __init__(self, address: str, *, curve_server_public: str | Path | None = None,
                 curve_client_secret: str | Path | None = None,
                 limits: protocol.Limits = protocol.DEFAULT_LIMITS,
                 context: zmq.Context | None = None, receive_hwm: int | None = None):
        self.address = address
        self.limits = limits
        self._own_context = context is None
        self.ctx = context or zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        if receive_hwm is not None:  # messages queued here before the backend holds them
            self.sock.rcvhwm = receive_hwm
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10000)
        if curve_server_public is not None:
            self._setup_curve(curve_server_public, curve_client_secret)
        self.sock.connect(address)
        self._backlog: deque[Message] = deque()
        self._refs: set[str] = set()  # references of the submits this client sent

    def _setup_curve(self, server_public: str | Path, client_secret: str | Path | None) -> None:
        import zmq.auth

        if client_secret is None:
            raise ValueError("CURVE needs the client's secret key file too")
        server_key, _ = zmq.auth.load_certificate(str(server_public))
        public, secret = zmq.auth.load_certificate(str(client_secret))
        if secret is None:
            raise ValueError(f"{client_secret} holds no secret key")
        self.sock.curve_serverkey = server_key
        self.sock.curve_publickey = public
        self.sock.curve_secretkey = secret

    def close(self) -> None:
        self.sock.close(0)
        if self._own_context:
            self.ctx.term()

    def __enter__(self) -> BackendClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ sending
    def send(self, msg_type: str, job: str | None = None,
             arrays: dict[str, np.ndarray] | None = None, **fields: Any) -> None:
        frames = protocol.encode(msg_type, job=job, arrays=arrays, **fields)
        self.sock.send_multipart(frames, copy=False)

    def hello(self, client: str = "") -> None:
        self.send("hello", client=client)

    def submit(self, kind: str, params: dict[str, Any] | None = None,
               arrays: dict[str, np.ndarray] | None = None) -> str:
        """Send a job; returns its request reference. The backend makes the job's id: its
        `accepted` reply (or an `error` refusing the job) carries this `ref` and the id.
        `collect` and `accepted` take the reference."""
        ref = uuid.uuid4().hex
        self._refs.add(ref)
        self.send("submit", arrays=arrays, kind=kind, params=params or {}, ref=ref)
        return ref

    def accepted(self, ref: str, timeout: float) -> str:
        """Wait for the reply to submit `ref`: the job id, or JobRefused with the error."""
        reply = self.wait(lambda m: m.get("ref") == ref and m.type in ("accepted", "error"),
                          timeout)
        if reply.type == "error":
            raise JobRefused(reply)
        return str(reply.job)

    def submit_job(self, kind: str, params: dict[str, Any] | None = None,
                   arrays: dict[str, np.ndarray] | None = None, timeout: float = 60.0) -> str:
        """Submit and wait for acceptance; returns the backend's job id."""
        return self.accepted(self.submit(kind, params, arrays), timeout)

    def cancel(self, job: str | None = None, scope: str = "job") -> None:
        """Cancel one job, or with scope 'queued'/'all' this client's queued/all jobs."""
        self.send("cancel", job=job, scope=scope)

    def fetch(self, job: str, ordinals: Iterable[int] | None = None) -> None:
        """Replay a job's stored results (all, or those `ordinals`), then its final message
        (or follow it while it still runs)."""
        if ordinals is None:
            self.send("fetch", job=job)
        else:
            self.send("fetch", job=job, ordinals=[int(k) for k in ordinals])

    def release(self) -> None:
        self.send("release")

    # ------------------------------------------------------------------ receiving
    def poll(self, timeout_ms: int = 0) -> list[Message]:
        """Return every message that has arrived (waiting at most `timeout_ms` for the
        first). A message the client cannot decode comes back as a local `error`."""
        out = list(self._backlog)
        self._backlog.clear()
        if out or self.sock.poll(timeout_ms, zmq.POLLIN):
            while True:
                try:
                    frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                out.append(self._decode(frames))
        return out

    def _decode(self, frames: list[Any]) -> Message:
        try:
            return protocol.decode(frames, self.limits)
        except protocol.ProtocolError as exc:
            return Message("error", None, {"code": exc.code, "message": "undecodable reply "
                                           f"from the backend: {exc.message}", "field": exc.field})

    def wait(self, match: Callable[[Message], bool], timeout: float) -> Message:
        """Block until a message satisfying `match` arrives; the others stay queued, in
        order, for the next poll()."""
        deadline = time.monotonic() + timeout
        kept: list[Message] = []
        try:
            while True:
                incoming = self.poll(0)
                for i, msg in enumerate(incoming):
                    if match(msg):
                        kept.extend(incoming[i + 1:])
                        return msg
                    kept.append(msg)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BackendTimeout(f"no reply from the backend at {self.address} within "
                                         f"{timeout:.1f} s")
                self.sock.poll(int(min(left, 0.5) * 1000) + 1, zmq.POLLIN)
        finally:
            self._backlog.extendleft(reversed(kept))

    def welcome(self, timeout: float = 10.0) -> Message:
        """Say hello and return the server's welcome (raises on error or timeout)."""
        self.hello()
        msg = self.wait(lambda m: m.type in ("welcome", "error") and m.job is None, timeout)
        if msg.type == "error":
            raise RuntimeError(f"backend refused hello: {msg.get('message')}")
        return msg

    def collect(self, job: str, timeout: float,
                on_event: Callable[[Message], None] | None = None) -> JobOutcome:
        """Block until `job` (a job id, or the reference `submit` returned) ends (done,
        cancelled or error); gather what it sent. Results missing when `done` arrives (its
        count says how many there are) are fetched again by their ordinals."""
        deadline = time.monotonic() + timeout

        def left() -> float:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BackendTimeout(f"job {job} did not finish within {timeout:.1f} s")
            return remaining

        outcome = JobOutcome(job)
        if job in self._refs:
            reply = self.wait(lambda m: m.get("ref") == job
                              and m.type in ("accepted", "error"), left())
            self._refs.discard(job)
            if on_event is not None:
                on_event(reply)
            if reply.type == "error":
                outcome.final = reply
                return outcome
            outcome.job, outcome.accepted = str(reply.job), reply
        seen: set[int] = set()
        while outcome.final is None:
            msg = self.wait(lambda m: m.job == outcome.job, left())
            if on_event is not None:
                on_event(msg)
            if msg.type == "result":
                if msg.get("ordinal") not in seen:
                    seen.add(msg.get("ordinal"))
                    outcome.results.append(msg)
            elif msg.type == "progress":
                outcome.progress.append(msg)
            elif msg.type == "accepted":
                outcome.accepted = msg
            elif msg.type == "done" and missing_ordinals(outcome.results, int(msg["results"])):
                missing = missing_ordinals(outcome.results, int(msg["results"]))
                self.fetch(outcome.job, missing[:FETCH_CHUNK])  # its replay ends in `done`
            elif msg.type in FINAL_TYPES:
                outcome.final = msg
        outcome.results.sort(key=lambda m: m.get("ordinal", 0))
        return outcome

    def run_job(self, kind: str, params: dict[str, Any] | None = None,
                arrays: dict[str, np.ndarray] | None = None, timeout: float = 600.0,
                on_event: Callable[[Message], None] | None = None) -> JobOutcome:
        """Submit and wait for the end: the simple blocking path for scripts and tests."""
        return self.collect(self.submit(kind, params, arrays), timeout, on_event)


def results_by_index(messages: Iterable[Message]) -> list[Message]:
    """Result messages ordered by their `index` field."""
    return sorted(messages, key=lambda m: int(m.get("index", 0)))
