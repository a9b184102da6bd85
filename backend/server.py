"""The backend server: a ROUTER socket, a job queue with one worker, progress, cancel, fetch.

The server's thread owns the ROUTER socket and all scheduling state. The worker thread runs
jobs and hands their messages back over an inproc PUSH/PULL pair, so no socket is shared
between threads. A malformed message gets an `error` reply; nothing a client sends can stop
the server."""

from __future__ import annotations

import json
import logging
import os
import threading
import traceback
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

import backend
from backend import protocol
from backend.cache import ResultCache
from backend.kinds import JOB_KINDS
from backend.worker import Job, ModelStore, Worker

log = logging.getLogger("backend.server")

LOOPBACK_HOSTS = ("127.", "localhost", "[::1]", "::1")


@dataclass
class ServerConfig:
    address: str = "tcp://127.0.0.1:5555"
    cache_dir: Path = field(default_factory=lambda: Path.cwd() / ".cache" / "results")
    ready_file: Path | None = None
    device: str = "auto"
    curve_secret_key: Path | None = None   # server's secret key file (zmq.auth format)
    curve_clients: Path | None = None      # folder of allowed client public keys; None = any
    heartbeat_ms: int = 2000
    limits: protocol.Limits = field(default_factory=protocol.Limits)


def is_loopback(address: str) -> bool:
    if address.startswith(("ipc://", "inproc://")):
        return True
    if not address.startswith("tcp://"):
        return False
    host = address[len("tcp://"):].rsplit(":", 1)[0]
    return host.startswith(LOOPBACK_HOSTS)


def bind_address(address: str) -> str:
    """tcp://host:0 means 'pick a free port' (zmq's wildcard port); localhost -> 127.0.0.1."""
    if address.startswith("tcp://"):
        host, _, port = address[len("tcp://"):].rpartition(":")
        host = "127.0.0.1" if host == "localhost" else host
        return f"tcp://{host}:{'*' if port in ('0', '*') else port}"
    return address


class Server:
    def __init__(self, config: ServerConfig):
        self.config = config
        from backend.devices import resolve_device  # torch: loaded when a server is made

        self.device = str(resolve_device(config.device))
        self.cache = ResultCache(config.cache_dir)
        self.models = ModelStore()
        self.ctx = zmq.Context()
        self.jobs: dict[str, Job] = {}       # queued and running jobs
        self.pending: deque[Job] = deque()
        self.running: Job | None = None
        self.endpoint: str | None = None
        self._stop = threading.Event()
        self._auth = None
        self._events_addr = f"inproc://worker-events-{uuid.uuid4().hex}"

    # ------------------------------------------------------------------ lifecycle
    def bind(self) -> str:
        cfg = self.config
        if not is_loopback(cfg.address) and cfg.curve_secret_key is None:
            raise ValueError(
                f"refusing to bind {cfg.address}: a non-loopback address exposes the backend "
                "to the network, so it needs CURVE encryption. Create keys with "
                "`python -m backend keys DIR` and pass --curve-secret-key DIR/server.key_secret "
                "(and --curve-clients DIR/clients to allow only known clients).")
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.linger = 0
        self.router.setsockopt(zmq.HEARTBEAT_IVL, cfg.heartbeat_ms)
        self.router.setsockopt(zmq.HEARTBEAT_TIMEOUT, cfg.heartbeat_ms * 5)
        if cfg.curve_secret_key is not None:
            self._setup_curve()
        self.router.bind(bind_address(cfg.address))
        self.endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.events = self.ctx.socket(zmq.PULL)
        self.events.linger = 0
        self.events.bind(self._events_addr)
        self.worker = Worker(self.ctx, self._events_addr, self.cache, self.device, self.models,
                             {name: kind.run for name, kind in JOB_KINDS.items()})
        self.worker.start()
        if cfg.ready_file is not None:
            self._write_ready_file(cfg.ready_file)
        log.info("serving on %s (device %s, cache %s)", self.endpoint, self.device,
                 self.cache.root)
        return self.endpoint

    def _setup_curve(self) -> None:
        import zmq.auth
        from zmq.auth.thread import ThreadAuthenticator

        public, secret = zmq.auth.load_certificate(str(self.config.curve_secret_key))
        if secret is None:
            raise ValueError(f"{self.config.curve_secret_key} holds no secret key")
        self._auth = ThreadAuthenticator(self.ctx)
        self._auth.start()
        clients = self.config.curve_clients
        self._auth.configure_curve(domain="*", location=str(clients) if clients
                                   else zmq.auth.CURVE_ALLOW_ANY)
        self.router.curve_publickey = public
        self.router.curve_secretkey = secret
        self.router.curve_server = True

    def _write_ready_file(self, path: Path) -> None:
        info = {"address": self.endpoint, "pid": os.getpid(), "device": self.device,
                "protocol": protocol.PROTOCOL_VERSION, "backend_version": backend.__version__}
        tmp = Path(str(path) + ".tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, path)

    def stop(self) -> None:
        """Ask the serving loop to end (safe from signal handlers and other threads)."""
        self._stop.set()

    def serve_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.events, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(100))
                if self.events in ready:
                    self._drain_events()
                if self.router in ready:
                    self._drain_requests()
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        if self.running is not None:
            self.running.cancel_event.set()
        self.worker.start_job(None)
        self.worker.join(timeout=30)
        if self.config.ready_file is not None:
            Path(self.config.ready_file).unlink(missing_ok=True)
        if self._auth is not None:
            self._auth.stop()
        self.router.close(0)
        self.events.close(0)
        self.ctx.term()
        log.info("stopped")

    # ------------------------------------------------------------------ worker events
    def _drain_events(self) -> None:
        while True:
            try:
                parts = self.events.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            job = self.jobs.get(parts[0].bytes.decode())
            if job is None:
                continue
            tag, frames = parts[1].bytes, parts[2:]
            if tag == b"result":
                job.forwarded += 1
            for ident in job.watchers:
                self._send(ident, frames)
            if tag == b"final":
                self._finish(job)

    def _finish(self, job: Job) -> None:
        self.jobs.pop(job.id, None)
        if self.running is job:
            self.running = None
        self._start_next()

    def _start_next(self) -> None:
        if self.running is None and self.pending:
            self.running = self.pending.popleft()
            self.running.state = "running"
            self.worker.start_job(self.running)
            self._announce_positions()

    def _announce_positions(self) -> None:
        ahead = 1 if self.running is not None else 0
        for i, job in enumerate(self.pending):
            pos = ahead + i
            frames = protocol.encode("progress", job=job.id, stage="queued", step=0, of=0,
                                     position=pos, message=f"queued: {pos} job(s) ahead")
            for ident in job.watchers:
                self._send(ident, frames)

    # ------------------------------------------------------------------ client requests
    def _send(self, ident: bytes, frames: list[Any]) -> None:
        try:
            self.router.send_multipart([ident, *frames], flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            # The peer's queue is full or gone; results stay in the cache for `fetch`.
            log.warning("dropped a message to a client that is not reading")
        except zmq.ZMQError as exc:
            log.warning("could not send to a client: %s", exc)

    def _drain_requests(self) -> None:
        for _ in range(64):  # stay responsive to worker events under a flood of requests
            try:
                parts = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._handle(parts[0].bytes, parts[1:])

    def _handle(self, ident: bytes, frames: list[Any]) -> None:
        job_id = None
        try:
            msg = protocol.decode(frames, self.config.limits)
            job_id = msg.job
            if msg.type not in protocol.CLIENT_TYPES:
                raise protocol.ProtocolError("unknown_type", f"'{msg.type}' is a message the "
                                             "server sends, not one it accepts", "type")
            getattr(self, f"_on_{msg.type}")(ident, msg)
        except protocol.ProtocolError as exc:
            self._send(ident, protocol.error_frames(exc.code, exc.message, job_id, exc.field))
        except Exception as exc:
            log.error("internal error handling a request:\n%s", traceback.format_exc())
            self._send(ident, protocol.error_frames(
                "internal", f"internal error: {type(exc).__name__}: {exc}", job_id))

    def _on_hello(self, ident: bytes, msg: protocol.Message) -> None:
        from backend.models import available_models

        self._send(ident, protocol.encode(
            "welcome", protocol=protocol.PROTOCOL_VERSION, backend_version=backend.__version__,
            device=self.device, job_kinds={k: v.description for k, v in JOB_KINDS.items()},
            models=available_models(), limits=self.config.limits.to_dict(),
            queue=len(self.pending) + (self.running is not None)))

    def _on_submit(self, ident: bytes, msg: protocol.Message) -> None:
        kind = protocol.require(msg, "kind", str)
        if kind not in JOB_KINDS:
            raise protocol.ProtocolError("unknown_kind", f"unknown job kind {kind!r} "
                                         f"(this backend has: {', '.join(sorted(JOB_KINDS))})",
                                         "kind")
        job_kind = JOB_KINDS[kind]
        params = job_kind.params.validate(msg.fields.get("params"), kind=kind)
        job_id = msg.job or uuid.uuid4().hex
        if job_id in self.jobs or self.cache.exists(job_id):
            raise protocol.ProtocolError("duplicate_job", f"job id {job_id!r} is already used",
                                         "job")
        inputs = job_kind.validate(msg, params)
        self.cache.create(job_id, kind, params)
        job = Job(job_id, kind, ident, params, inputs, watchers={ident})
        self.jobs[job_id] = job
        self.pending.append(job)
        position = len(self.pending) - 1 + (self.running is not None)
        self._send(ident, protocol.encode("accepted", job=job_id, kind=kind, position=position))
        self._start_next()
        self._announce_positions()

    def _on_cancel(self, ident: bytes, msg: protocol.Message) -> None:
        scope = protocol.require(msg, "scope", str, "job")
        if scope == "job":
            if msg.job is None:
                raise protocol.ProtocolError("bad_field", "cancel needs a job id (or scope "
                                             "'queued' / 'all')", "job")
            targets = [self._active_job(msg.job)]
        elif scope in ("queued", "all"):
            targets = [j for j in self.pending if j.owner == ident]
            if scope == "all" and self.running is not None and self.running.owner == ident:
                targets.append(self.running)
        else:
            raise protocol.ProtocolError("bad_field", f"unknown cancel scope {scope!r}",
                                         "scope")
        for job in targets:
            self._cancel(job)

    def _active_job(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is not None:
            return job
        if self.cache.exists(job_id):
            state = self.cache.meta(job_id)["state"]
            raise protocol.ProtocolError("unknown_job", f"job {job_id!r} is not queued or "
                                         f"running (it is {state})", "job")
        raise protocol.ProtocolError("unknown_job", f"no job {job_id!r} on this backend", "job")

    def _cancel(self, job: Job) -> None:
        if job is self.running:
            job.cancel_event.set()  # the worker replies `cancelled` at its next step
            return
        self.pending.remove(job)
        self.jobs.pop(job.id, None)
        self.cache.set_state(job.id, "cancelled")
        frames = protocol.encode("cancelled", job=job.id)
        for ident in job.watchers:
            self._send(ident, frames)
        self._announce_positions()

    def _on_fetch(self, ident: bytes, msg: protocol.Message) -> None:
        if msg.job is None:
            raise protocol.ProtocolError("bad_field", "fetch needs a job id", "job")
        job = self.jobs.get(msg.job)
        if job is not None:  # still queued or running: replay what was sent, then follow it
            for ordinal in range(job.forwarded):
                self._send(ident, self.cache.result_frames(job.id, ordinal))
            job.watchers.add(ident)
            self._send(ident, protocol.encode("progress", job=job.id, stage=job.state, step=0,
                                              of=0, message=f"attached to {job.state} job"))
            return
        if not self.cache.exists(msg.job):
            raise protocol.ProtocolError("unknown_job", f"no job {msg.job!r} in this "
                                         "backend's cache", "job")
        self._replay_finished(ident, msg.job)

    def _replay_finished(self, ident: bytes, job_id: str) -> None:
        meta = self.cache.meta(job_id)
        for ordinal in range(int(meta["results"])):
            self._send(ident, self.cache.result_frames(job_id, ordinal))
        state = meta["state"]
        if state == "done":
            final = protocol.encode("done", job=job_id, results=meta["results"],
                                    cache_dir=str(self.cache.job_dir(job_id)))
        elif state == "cancelled":
            final = protocol.encode("cancelled", job=job_id)
        else:
            err = meta.get("error") or {}
            final = protocol.error_frames(
                err.get("code", "job_failed"),
                err.get("message", f"the backend stopped while this job was {state}; "
                        f"{meta['results']} result(s) were kept"), job_id)
        self._send(ident, final)

    def _on_release(self, ident: bytes, msg: protocol.Message) -> None:
        freed = self.models.clear()
        self._send(ident, protocol.encode("released", models=freed))
