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


class BackendTimeout(TimeoutError):
    """No expected reply arrived in time (the backend is busy, gone, or unreachable)."""


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
                 context: zmq.Context | None = None):
        self.address = address
        self.limits = limits
        self._own_context = context is None
        self.ctx = context or zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10000)
        if curve_server_public is not None:
            self._setup_curve(curve_server_public, curve_client_secret)
        self.sock.connect(address)
        self._backlog: deque[Message] = deque()

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
               arrays: dict[str, np.ndarray] | None = None, job: str | None = None) -> str:
        """Send a job; returns its id (made here, so replies can be matched at once)."""
        job = job or uuid.uuid4().hex
        self.send("submit", job=job, arrays=arrays, kind=kind, params=params or {})
        return job

    def cancel(self, job: str | None = None, scope: str = "job") -> None:
        """Cancel one job, or with scope 'queued'/'all' this client's queued/all jobs."""
        self.send("cancel", job=job, scope=scope)

    def fetch(self, job: str) -> None:
        self.send("fetch", job=job)

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
        """Block until `job` ends (done, cancelled or error); gather what it sent."""
        outcome = JobOutcome(job)
        deadline = time.monotonic() + timeout
        while outcome.final is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BackendTimeout(f"job {job} did not finish within {timeout:.1f} s")
            msg = self.wait(lambda m: m.job == job, left)
            if on_event is not None:
                on_event(msg)
            if msg.type == "result":
                outcome.results.append(msg)
            elif msg.type == "progress":
                outcome.progress.append(msg)
            elif msg.type == "accepted":
                outcome.accepted = msg
            elif msg.type in FINAL_TYPES:
                outcome.final = msg
        return outcome

    def run_job(self, kind: str, params: dict[str, Any] | None = None,
                arrays: dict[str, np.ndarray] | None = None, timeout: float = 600.0,
                on_event: Callable[[Message], None] | None = None) -> JobOutcome:
        """Submit and wait for the end: the simple blocking path for scripts and tests."""
        job = self.submit(kind, params, arrays)
        return self.collect(job, timeout, on_event)


def results_by_index(messages: Iterable[Message]) -> list[Message]:
    """Result messages ordered by their `index` field."""
    return sorted(messages, key=lambda m: int(m.get("index", 0)))
