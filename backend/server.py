"""The backend server: a ROUTER socket, a job queue with one worker, progress, cancel, fetch.

The server's thread owns the ROUTER socket and all scheduling state. The worker thread runs
jobs and hands their messages back over an inproc PUSH/PULL pair, so no socket is shared
between threads. A malformed message gets an `error` reply; nothing a client sends can stop
the server.

Delivery: the ROUTER runs with ROUTER_MANDATORY, so a message to a peer whose queue is full
is noticed, never silently dropped. Such a peer gets a backlog: its results are held back as
references into the result cache (read again when it reads again), its progress coalesced
per job, its other replies kept in order; the server logs that the peer cannot keep up.
Results carry their `ordinal` and `done` their count, so a client also sees a gap (a backlog
over its limit is dropped) and `fetch`es what it misses.

Users: a job belongs to the identity that submitted it (the CURVE public key when CURVE is
on, else the connection). In single-user mode (the default on loopback) every client is the
same user; otherwise fetch and cancel of another identity's job are refused as unknown."""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import os
import secrets
import threading
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

import backend
from backend import protocol
from backend.cache import CacheCorrupt, ResultCache
from backend.kinds import JOB_KINDS
from backend.worker import Job, ModelStore, Worker

log = logging.getLogger("backend.server")


@dataclass
class ServerConfig:
    address: str = "tcp://127.0.0.1:5555"
    cache_dir: Path = field(default_factory=lambda: Path.cwd() / ".cache" / "results")
    ready_file: Path | None = None
    device: str = "auto"
    curve_secret_key: Path | None = None   # server's secret key file (zmq.auth format)
    curve_clients: Path | None = None      # folder of allowed client public keys
    allow_any_client: bool = False         # CURVE without a client list (warned about)
    users: str = "auto"                    # single | multi | auto (single on loopback)
    input_folder: Path | None = None       # where params.video_path may read from
    heartbeat_ms: int = 2000
    limits: protocol.Limits = field(default_factory=protocol.Limits)
    max_queued: int = 256                  # queued jobs in total
    max_queued_per_client: int = 32        # queued jobs per identity
    max_cameras: int = 4096                # cameras (c2w matrices) per job
    max_job_output_bytes: int = 16 << 30   # results of one job
    cache_max_bytes: int | None = None     # evict the oldest finished jobs beyond this
    cache_max_age_s: float | None = None   # evict finished jobs older than this
    backlog_limit: int = 20_000            # messages held back for one slow peer
    send_hwm: int = 1000                   # messages zmq queues per peer before the backlog

    @property
    def single_user(self) -> bool:
        if self.users not in ("single", "multi", "auto"):
            raise ValueError(f"users must be single, multi or auto, got {self.users!r}")
        return self.users == "single" or (self.users == "auto" and is_loopback(self.address))


def is_loopback(address: str) -> bool:
    if address.startswith(("ipc://", "inproc://")):
        return True
    if not address.startswith("tcp://"):
        return False
    host = address[len("tcp://"):].rsplit(":", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return False  # a host name or interface: it may reach the network


def bind_address(address: str) -> str:
    """tcp://host:0 means 'pick a free port' (zmq's wildcard port); localhost -> 127.0.0.1."""
    if address.startswith("tcp://"):
        host, _, port = address[len("tcp://"):].rpartition(":")
        host = "127.0.0.1" if host == "localhost" else host
        return f"tcp://{host}:{'*' if port in ('0', '*') else port}"
    return address


class Backlog:
    """Messages held back for a peer that is not reading: items are ["frames", frames],
    ["cached", (job, ordinal)] (a result read from the cache when sent) or
    ["progress", frames] (one per job, replaced by newer progress)."""

    def __init__(self, lagging: bool):
        self.items: deque[list[Any]] = deque()
        self.progress: dict[str, list[Any]] = {}
        self.lagging = lagging  # the peer stopped reading (vs. a fetch replay being paced)
        self.held = self.dropped = 0

    def add(self, frames: list[Any] | None, cached: tuple[str, int] | None,
            progress_of: str | None) -> None:
        self.held += 1
        if cached is not None:
            self.items.append(["cached", cached])
        elif progress_of is not None and progress_of in self.progress:
            self.progress[progress_of][1] = frames
        else:
            item = ["progress" if progress_of else "frames", frames, progress_of]
            self.items.append(item)
            if progress_of:
                self.progress[progress_of] = item

    def shed(self) -> int:
        """Drop the results and progress held (a client fetches missing results by their
        ordinals); replies that end or answer something stay."""
        kept = deque(i for i in self.items if i[0] == "frames")
        dropped = len(self.items) - len(kept)
        self.items, self.progress = kept, {}
        self.dropped += dropped
        return dropped


class Server:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.single_user = config.single_user
        from backend.devices import resolve_device  # torch: loaded when a server is made
        from backend.kinds import generate

        generate.set_input_folder(config.input_folder)
        self.device = str(resolve_device(config.device))
        self.cache = ResultCache(config.cache_dir)
        self.models = ModelStore()
        self.ctx = zmq.Context()
        self.jobs: dict[str, Job] = {}       # queued and running jobs
        self.pending: deque[Job] = deque()
        self.running: Job | None = None
        self.endpoint: str | None = None
        self.backlogs: dict[bytes, Backlog] = {}
        self.problem: str | None = None      # why the server cannot run jobs, if it cannot
        self._positions_dirty = False
        self._stop = threading.Event()
        self._auth = None
        self._events_addr = f"inproc://worker-events-{secrets.token_hex(8)}"

    # ------------------------------------------------------------------ lifecycle
    def bind(self) -> str:
        """Bind and start the worker; ValueError (with the reason, no traceback) when the
        address or the keys cannot be used."""
        cfg = self.config
        self._check_exposure()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.linger = 0
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.SNDHWM, cfg.send_hwm)
        self.router.setsockopt(zmq.HEARTBEAT_IVL, cfg.heartbeat_ms)
        self.router.setsockopt(zmq.HEARTBEAT_TIMEOUT, cfg.heartbeat_ms * 5)
        # No frame larger than the protocol accepts is ever buffered: zmq drops the peer.
        lim = cfg.limits
        self.router.setsockopt(zmq.MAXMSGSIZE, max(lim.max_header_bytes,
                                                   min(lim.max_array_bytes,
                                                       lim.max_total_bytes)))
        try:
            if cfg.curve_secret_key is not None:
                self._setup_curve()
            self.router.bind(bind_address(cfg.address))
        except (zmq.ZMQError, OSError, ValueError) as exc:
            self._close_sockets()
            raise ValueError(f"cannot serve on {cfg.address}: {exc}") from None
        self.endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        for job in self.cache.recover():
            log.warning("job %s was interrupted by a previous stop; marked failed", job)
        self._evict()
        self.events = self.ctx.socket(zmq.PULL)
        self.events.linger = 0
        self.events.bind(self._events_addr)
        self.worker = Worker(self.ctx, self._events_addr, self.cache, self.device, self.models,
                             {name: kind.run for name, kind in JOB_KINDS.items()},
                             max_output_bytes=cfg.max_job_output_bytes)
        self.worker.reveal_paths = self.single_user
        self.worker.start()
        if cfg.ready_file is not None:
            self._write_ready_file(cfg.ready_file)
        log.info("serving on %s (device %s, %s mode)", self.endpoint, self.device,
                 "single-user" if self.single_user else "multi-user")
        return self.endpoint

    def _check_exposure(self) -> None:
        cfg = self.config
        if is_loopback(cfg.address):
            return
        if cfg.curve_secret_key is None:
            raise ValueError(
                f"refusing to bind {cfg.address}: a non-loopback address exposes the backend "
                "to the network, so it needs CURVE encryption. Create keys with "
                "`python -m backend keys DIR` and pass --curve-secret-key DIR/server.key_secret "
                "and --curve-clients DIR/clients.")
        if cfg.curve_clients is None and not cfg.allow_any_client:
            raise ValueError(
                f"refusing to bind {cfg.address} without a list of allowed clients: pass "
                "--curve-clients DIR (a folder of client public keys), or --allow-any-client "
                "to admit anyone who has a key pair")

    def _setup_curve(self) -> None:
        import zmq.auth
        from zmq.auth.thread import ThreadAuthenticator

        cfg = self.config
        public, secret = zmq.auth.load_certificate(str(cfg.curve_secret_key))
        if secret is None:
            raise ValueError(f"{cfg.curve_secret_key} holds no secret key")
        if cfg.curve_clients is not None and not Path(cfg.curve_clients).is_dir():
            raise ValueError(f"--curve-clients {cfg.curve_clients} is not a folder")
        if cfg.curve_clients is None:
            log.warning("CURVE without a client list: any client with a key pair is admitted "
                        "(--allow-any-client)")
        self._auth = ThreadAuthenticator(self.ctx)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=str(cfg.curve_clients)
                                   if cfg.curve_clients else zmq.auth.CURVE_ALLOW_ANY)
        self.router.curve_publickey = public
        self.router.curve_secretkey = secret
        self.router.curve_server = True

    def _write_ready_file(self, path: Path) -> None:
        info = {"address": self.endpoint, "pid": os.getpid(), "device": self.device,
                "protocol": protocol.PROTOCOL_VERSION, "backend_version": backend.__version__}
        tmp = Path(str(path) + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w") as f:
            f.write(json.dumps(info))
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
                ready = dict(poller.poll(10 if self.backlogs else 100))
                if self.events in ready:
                    self._drain_events()
                if self.router in ready:
                    self._drain_requests()
                self._check_worker()
                if self._positions_dirty:
                    self._announce_positions()
                if self.backlogs:
                    self._flush_backlogs()
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        if self.running is not None:
            self.running.cancel_event.set()
        self.worker.start_job(None)
        self.worker.join(timeout=30)
        if self.config.ready_file is not None:
            Path(self.config.ready_file).unlink(missing_ok=True)
        self._close_sockets()
        log.info("stopped")

    def _close_sockets(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        for name in ("router", "events"):
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close(0)
        self.ctx.term()

    # ------------------------------------------------------------------ worker events
    def _drain_events(self) -> None:
        while True:
            try:
                parts = self.events.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                self._on_event(parts)
            except Exception:  # a bug here must not stop the serving loop
                log.error("internal error handling a worker event:\n%s",
                          traceback.format_exc())

    def _on_event(self, parts: list[Any]) -> None:
        job = self.jobs.get(parts[0].bytes.decode())
        if job is None:
            return
        tag, frames = parts[1].bytes, parts[2:]
        cached = progress_of = None
        if tag.startswith(b"result"):
            ordinal = int(tag.split()[1])
            job.forwarded = ordinal + 1
            cached = (job.id, ordinal)
        elif tag == b"progress":
            progress_of = job.id
        if tag == b"final":
            self._finish(job)  # the cache is tidied before the client hears the job ended
        for peer in job.watchers:
            self._send(peer, frames, cached=cached, progress_of=progress_of)

    def _finish(self, job: Job) -> None:
        self.jobs.pop(job.id, None)
        if self.running is job:
            self.running = None
        self.cache.note_finished(job.id)
        self._start_next()
        self._evict()

    def _evict(self) -> None:
        cfg = self.config
        for job in self.cache.evict(cfg.cache_max_bytes, cfg.cache_max_age_s, set(self.jobs)):
            log.info("evicted finished job %s from the cache", job)

    def _start_next(self) -> None:
        if self.running is None and self.pending:
            self.running = self.pending.popleft()
            self.running.state = "running"
            self.worker.start_job(self.running)
            self._positions_dirty = True

    def _announce_positions(self) -> None:
        """Tell queued jobs their place, coalesced: once per loop turn at most, and only
        when a job reaches one of a few milestones (the last ten places and the powers of
        two), so a long queue costs O(n log n) messages in all, not O(n^2)."""
        self._positions_dirty = False
        ahead = 1 if self.running is not None else 0
        for i, job in enumerate(self.pending):
            pos = ahead + i
            if pos == job.announced or not (pos < 10 or pos & (pos - 1) == 0):
                continue
            job.announced = pos
            frames = protocol.encode("progress", job=job.id, stage="queued", step=0, of=0,
                                     position=pos, message=f"queued: {pos} job(s) ahead")
            for peer in job.watchers:
                self._send(peer, frames, progress_of=job.id)

    def _check_worker(self) -> None:
        """A worker thread that ended although asked to run: the server reports itself
        unhealthy (in `welcome` and to every submit) and fails the jobs it holds."""
        if self.problem is not None or self.worker.is_alive():
            return
        self.problem = f"the worker thread stopped ({self.worker.death or 'no reason given'})"
        log.critical("%s; no job can run until the backend is restarted", self.problem)
        for job in ([self.running] if self.running else []) + list(self.pending):
            try:
                self.cache.set_state(job.id, "failed", {"code": "unavailable",
                                                        "message": self.problem})
            except Exception as exc:
                log.error("job %s: could not record its failure: %s", job.id, exc)
            for peer in job.watchers:
                self._send(peer, protocol.error_frames("unavailable", self.problem, job.id))
        self.jobs.clear()
        self.pending.clear()
        self.running = None

    # ------------------------------------------------------------------ sending
    def _try_send(self, peer: bytes, frames: list[Any]) -> bool | None:
        """True when sent, False when the peer's queue is full, None when it is gone."""
        try:
            self.router.send_multipart([peer, *frames], flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                log.warning("could not send to a client: %s", exc)
            return None

    def _send(self, peer: bytes, frames: list[Any], cached: tuple[str, int] | None = None,
              progress_of: str | None = None) -> None:
        """Send now, or hold back in the peer's backlog while it is not reading."""
        box = self.backlogs.get(peer)
        if box is None:
            if self._try_send(peer, frames) is not False:
                return
            box = self.backlogs[peer] = Backlog(lagging=True)
            log.warning("client %s cannot keep up: holding its messages back (results are "
                        "re-read from the cache when it reads again)", peer.hex())
        box.add(frames, cached, progress_of)
        if len(box.items) > self.config.backlog_limit:
            dropped = box.shed()
            log.error("client %s is still not reading: dropped %d held-back results and "
                      "progress messages (it can fetch them)", peer.hex(), dropped)

    def _flush_backlogs(self) -> None:
        for peer, box in list(self.backlogs.items()):
            while box.items:
                item = box.items[0]
                if item[0] == "cached":
                    item[:] = ["frames", self._cached_result(*item[1]), None]
                sent = self._try_send(peer, item[1])
                if sent is False:
                    if not box.lagging:
                        box.lagging = True
                        log.warning("client %s cannot keep up with a fetch replay; pacing it",
                                    peer.hex())
                    break
                box.items.popleft()
                if item[0] == "progress":
                    box.progress.pop(item[2], None)
                if sent is None:
                    box.items.clear()  # the peer is gone; it can fetch later
            if not box.items:
                del self.backlogs[peer]
                if box.lagging:
                    log.info("client %s caught up (%d messages were held back, %d dropped)",
                             peer.hex(), box.held, box.dropped)

    def _cached_result(self, job: str, ordinal: int) -> list[Any]:
        try:
            return self.cache.result_frames(job, ordinal)
        except CacheCorrupt as exc:
            log.error("%s", exc)
            return protocol.error_frames("cache_corrupt", str(exc), job)
        except OSError as exc:
            return protocol.error_frames("unknown_job", f"result {ordinal} of job {job} is no "
                                         f"longer in the cache ({exc.strerror})", job)

    def _replay(self, peer: bytes, job: str, ordinals: list[int],
                final: list[Any] | None) -> None:
        """Queue stored results (read from the cache as the peer reads), then `final`."""
        box = self.backlogs.get(peer)
        if box is None:
            box = self.backlogs[peer] = Backlog(lagging=False)
        for ordinal in ordinals:
            box.add(None, (job, ordinal), None)
        if final is not None:
            box.add(final, None, None)
        self._flush_backlogs()

    # ------------------------------------------------------------------ client requests
    def _drain_requests(self) -> None:
        for _ in range(64):  # stay responsive to worker events under a flood of requests
            try:
                parts = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(parts) < 2:
                continue  # an empty message: nothing to answer
            self._handle(parts[0].bytes, self._identity(parts), parts[1:])

    def _identity(self, parts: list[Any]) -> str:
        """Who sent a message: the CURVE public key when CURVE is on, else the connection."""
        if self._auth is not None:
            try:
                return "curve:" + parts[1].get("User-Id")
            except (zmq.ZMQError, TypeError):
                pass
        return "conn:" + parts[0].bytes.hex()

    def _handle(self, peer: bytes, identity: str, frames: list[Any]) -> None:
        job_id, ref = None, None
        try:
            msg = protocol.decode(frames, self.config.limits)
            job_id = msg.job
            if msg.type == "submit" and protocol.is_valid_id(msg.get("ref")):
                ref = msg.get("ref")
            if msg.type not in protocol.CLIENT_TYPES:
                raise protocol.ProtocolError("unknown_type", f"'{msg.type}' is a message the "
                                             "server sends, not one it accepts", "type")
            getattr(self, f"_on_{msg.type}")(peer, identity, msg)
        except protocol.ProtocolError as exc:
            self._send(peer, protocol.error_frames(exc.code, exc.message, job_id, exc.field,
                                                   ref=ref))
        except Exception as exc:
            log.error("internal error handling a request:\n%s", traceback.format_exc())
            self._send(peer, protocol.error_frames(
                "internal", f"internal error: {type(exc).__name__}", job_id, ref=ref))

    def _on_hello(self, peer: bytes, identity: str, msg: protocol.Message) -> None:
        from backend.models import available_models

        self._check_worker()

        models = {name: {k: v for k, v in info.items() if k != "path"}
                  for name, info in available_models().items()}
        cfg = self.config
        self._send(peer, protocol.encode(
            "welcome", protocol=protocol.PROTOCOL_VERSION, backend_version=backend.__version__,
            device=self.device, job_kinds={k: v.description for k, v in JOB_KINDS.items()},
            models=models, limits=cfg.limits.to_dict(), single_user=self.single_user,
            healthy=self.problem is None, problem=self.problem,
            queue_limits={"max_queued": cfg.max_queued,
                          "max_queued_per_client": cfg.max_queued_per_client,
                          "max_cameras": cfg.max_cameras},
            queue=len(self.pending) + (self.running is not None)))

    def _on_submit(self, peer: bytes, identity: str, msg: protocol.Message) -> None:
        self._check_worker()
        if self.problem is not None:
            raise protocol.ProtocolError("unavailable", f"this backend cannot run jobs: "
                                         f"{self.problem}")
        if msg.job is not None:
            raise protocol.ProtocolError("bad_field", "job ids are made by the backend (the "
                                         "`accepted` reply carries it); send `ref` to match "
                                         "the reply to the request", "job")
        protocol.require(msg, "ref", str, None)
        if "ref" in msg.fields and not protocol.is_valid_id(msg["ref"]):
            raise protocol.ProtocolError("bad_field", "ref must be 1-64 characters of "
                                         "[A-Za-z0-9_-]", "ref")
        kind = protocol.require(msg, "kind", str)
        if kind not in JOB_KINDS:
            raise protocol.ProtocolError("unknown_kind", f"unknown job kind {kind!r} "
                                         f"(this backend has: {', '.join(sorted(JOB_KINDS))})",
                                         "kind")
        job_kind = JOB_KINDS[kind]
        params = job_kind.params.validate(msg.fields.get("params"), kind=kind)
        self._check_capacity(identity, msg)
        inputs = job_kind.validate(msg, params)
        job_id = secrets.token_hex(16)
        try:
            self.cache.create(job_id, kind, params, owner=identity)
        except OSError as exc:
            log.error("cannot store a new job: %s", exc)
            raise protocol.ProtocolError("unavailable", "the backend cannot store the job: "
                                         f"{exc.strerror}") from None
        job = Job(job_id, kind, identity, params, inputs, watchers={peer})
        self.jobs[job_id] = job
        self.pending.append(job)
        job.announced = position = len(self.pending) - 1 + (self.running is not None)
        self._send(peer, protocol.encode("accepted", job=job_id, ref=msg.get("ref"), kind=kind,
                                         position=position))
        self._start_next()

    def _check_capacity(self, identity: str, msg: protocol.Message) -> None:
        cfg = self.config
        if len(self.pending) >= cfg.max_queued:
            raise protocol.ProtocolError("queue_full", f"the backend's queue is full "
                                         f"({cfg.max_queued} jobs); submit again later")
        mine = sum(job.owner == identity for job in self.pending)
        if mine >= cfg.max_queued_per_client:
            raise protocol.ProtocolError("queue_full", f"you have {mine} queued jobs, the limit "
                                         f"per client is {cfg.max_queued_per_client}")
        c2w = msg.arrays.get(protocol.C2W)
        cameras = math.prod(c2w.shape[:-2]) if c2w is not None and c2w.ndim >= 2 else 0
        if cameras > cfg.max_cameras:
            raise protocol.ProtocolError("too_large", f"{cameras} cameras in one job, the "
                                         f"limit is {cfg.max_cameras}", protocol.C2W)

    def _may_use(self, identity: str, owner: str | None) -> bool:
        return self.single_user or owner == identity

    def _on_cancel(self, peer: bytes, identity: str, msg: protocol.Message) -> None:
        scope = protocol.require(msg, "scope", str, "job")
        if scope == "job":
            if msg.job is None:
                raise protocol.ProtocolError("bad_field", "cancel needs a job id (or scope "
                                             "'queued' / 'all')", "job")
            targets = [self._active_job(msg.job, identity)]
        elif scope in ("queued", "all"):
            targets = [j for j in self.pending if j.owner == identity]
            if scope == "all" and self.running is not None and self.running.owner == identity:
                targets.append(self.running)
        else:
            raise protocol.ProtocolError("bad_field", f"unknown cancel scope {scope!r}",
                                         "scope")
        for job in targets:
            self._cancel(job)

    def _unknown(self, job_id: str) -> protocol.ProtocolError:
        return protocol.ProtocolError("unknown_job", f"no job {job_id!r} of yours on this "
                                      "backend", "job")

    def _cached_meta(self, job_id: str, identity: str) -> dict[str, Any]:
        """A stored job's record, if it exists and this identity may see it."""
        try:
            meta = self.cache.meta(job_id) if self.cache.exists(job_id) else None
        except (OSError, ValueError):
            meta = None
        if meta is None or not self._may_use(identity, meta.get("owner")):
            raise self._unknown(job_id)
        return meta

    def _active_job(self, job_id: str, identity: str) -> Job:
        job = self.jobs.get(job_id)
        if job is not None and self._may_use(identity, job.owner):
            return job
        meta = self._cached_meta(job_id, identity)
        raise protocol.ProtocolError("unknown_job", f"job {job_id!r} is not queued or "
                                     f"running (it is {meta['state']})", "job")

    def _cancel(self, job: Job) -> None:
        if job is self.running:
            job.cancel_event.set()  # the worker replies `cancelled` at its next step
            return
        self.pending.remove(job)
        self.jobs.pop(job.id, None)
        try:
            self.cache.set_state(job.id, "cancelled")
            self.cache.note_finished(job.id)
        except OSError as exc:
            log.error("job %s: could not record the cancel: %s", job.id, exc)
        frames = protocol.encode("cancelled", job=job.id)
        for peer in job.watchers:
            self._send(peer, frames)
        self._positions_dirty = True

    def _on_fetch(self, peer: bytes, identity: str, msg: protocol.Message) -> None:
        if msg.job is None:
            raise protocol.ProtocolError("bad_field", "fetch needs a job id", "job")
        wanted = protocol.require(msg, "ordinals", list, None)
        job = self.jobs.get(msg.job)
        if job is not None and self._may_use(identity, job.owner):
            # still queued or running: replay what was sent, then follow it
            job.watchers.add(peer)
            self._replay(peer, job.id, _ordinals(wanted, job.forwarded), protocol.encode(
                "progress", job=job.id, stage=job.state, step=0, of=0,
                message=f"attached to {job.state} job"))
            return
        meta = self._cached_meta(msg.job, identity)
        count = int(meta["results"])
        self._replay(peer, msg.job, _ordinals(wanted, count), self._final_of(msg.job, meta))

    def _final_of(self, job_id: str, meta: dict[str, Any]) -> list[Any]:
        state = meta["state"]
        if state == "done":
            paths = {"cache_dir": str(self.cache.job_dir(job_id))} if self.single_user else {}
            return protocol.encode("done", job=job_id, results=meta["results"], **paths)
        if state == "cancelled":
            return protocol.encode("cancelled", job=job_id)
        err = meta.get("error") or {}
        return protocol.error_frames(
            err.get("code", "job_failed"),
            err.get("message", f"the backend stopped while this job was {state}; "
                    f"{meta['results']} result(s) were kept"), job_id)

    def _on_release(self, peer: bytes, identity: str, msg: protocol.Message) -> None:
        freed = self.models.clear()
        self._send(peer, protocol.encode("released", models=freed))


def _ordinals(wanted: list[Any] | None, count: int) -> list[int]:
    """The result ordinals a fetch asks for (all `count` when it names none)."""
    if wanted is None:
        return list(range(count))
    if not all(type(k) is int and 0 <= k < count for k in wanted):
        raise protocol.ProtocolError("bad_field", f"ordinals must be integers in [0, {count})",
                                     "ordinals")
    return sorted(set(wanted))
