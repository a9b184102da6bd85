"""Reliability of the backend over real sockets: a worker that survives failing jobs and
failing cache writes, delivery that loses no message, job ownership, input paths, resource
limits, CURVE set-up, result integrity and the small protocol holes. Servers run as real
processes on random loopback ports (one in-process where its worker thread is stopped);
every receive has a timeout."""

from __future__ import annotations

import json
import shutil
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from backend import protocol
from backend.client import BackendClient
from support import ROOT, random_gaussian_arrays, ring_cameras, start_backend

TIMEOUT = 60.0


def render_arrays(num_cams: int, size: int = 16, n: int = 200, seed: int = 0):
    c2w, intr = ring_cameras(num_cams, size=size)
    return {**random_gaussian_arrays(n, seed), "c2w": c2w, "intrinsics": intr}


def tiny_convert():
    return protocol.pack_sequence([random_gaussian_arrays(8, seed=1)])


def job_meta(cache_dir: Path, job: str) -> dict:
    return json.loads((cache_dir / "jobs" / job / "job.json").read_text())


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    """A multi-user backend with small limits and an input folder."""
    root = tmp_path_factory.mktemp("strict")
    (root / "inputs").mkdir()
    proc = start_backend(root, extra_args=[
        "--users", "multi", "--input-folder", str(root / "inputs"), "--max-cameras", "64",
        "--max-job-output-mb", "1", "--max-queued-per-client", "200", "--max-queued", "200",
        "--send-hwm", "20", "--max-message-mb", "4"])
    proc.inputs = root / "inputs"
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """A backend with the defaults: single-user on loopback."""
    proc = start_backend(tmp_path_factory.mktemp("single"))
    yield proc
    assert proc.stop() == 0, proc.log()


# ----------------------------------------------------------------- 1. the worker survives

def test_worker_survives_when_recording_the_failure_fails_too(single):
    with BackendClient(single.address) as c:
        job = c.submit_job("render", {}, render_arrays(300, size=32, n=1000))
        c.wait(lambda m: m.job == job and m.type == "result", TIMEOUT)
        # The job folder disappears under the running job: its next result cannot be stored,
        # and neither can the failure.
        # (Moved away in one step, then deleted: the worker may be writing into it.)
        gone = single.cache_dir / f"gone-{job}"
        (single.cache_dir / "jobs" / job).rename(gone)
        shutil.rmtree(gone, ignore_errors=True)
        outcome = c.collect(job, TIMEOUT)
        assert outcome.final.type == "error", outcome.final
        assert outcome.final["code"] == "job_failed"
        assert "FileNotFoundError" in outcome.final["message"]
        assert "recording the failure" in outcome.final["message"]
        assert str(single.cache_dir) not in outcome.final["message"], "no server paths"
        after = c.run_job("convert", {"direction": "gaussians_to_ply"}, tiny_convert(),
                          timeout=TIMEOUT)
        assert after.ok, "the next job runs"


def test_a_stopped_worker_makes_the_server_report_itself_unhealthy(tmp_path):
    from backend.server import Server, ServerConfig

    server = Server(ServerConfig(address="tcp://127.0.0.1:0", cache_dir=tmp_path / "cache",
                                 device="cpu"))
    endpoint = server.bind()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with BackendClient(endpoint) as c:
            assert c.welcome(TIMEOUT)["healthy"] is True
            server.worker.start_job(None)  # the worker thread ends
            server.worker.join(TIMEOUT)
            ref = c.submit("convert", {"direction": "gaussians_to_ply"}, tiny_convert())
            reply = c.wait(lambda m: m.get("ref") == ref, TIMEOUT)
            assert (reply.type, reply["code"]) == ("error", "unavailable")
            assert "worker thread stopped" in reply["message"]
            welcome = c.welcome(TIMEOUT)
            assert welcome["healthy"] is False and "worker" in welcome["problem"]
    finally:
        server.stop()
        thread.join(TIMEOUT)


# ----------------------------------------------------------------- 2. no silent message loss

def wait_finished_on_disk(cache_dir: Path, job: str) -> None:
    import time

    deadline = time.monotonic() + TIMEOUT
    while job_meta(cache_dir, job)["state"] not in ("done", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"job {job} did not finish"
        time.sleep(0.02)


class CountingClient(BackendClient):
    fetches: list

    def fetch(self, job, ordinals=None):
        self.fetches.append(None if ordinals is None else list(ordinals))
        super().fetch(job, ordinals)


@pytest.mark.parametrize("backlog_limit", [20000, 3])
def test_a_late_reader_gets_every_result_and_done(tmp_path, backlog_limit):
    """150 images of 80 kB (more than zmq's queues and the socket buffers hold) to a client
    that reads only once the job has ended: held back by the server (a large backlog), or
    dropped and fetched again by the client by their ordinals (a tiny one)."""
    proc = start_backend(tmp_path, extra_args=["--send-hwm", "10", "--backlog-limit",
                                               str(backlog_limit)])
    try:
        with CountingClient(proc.address, receive_hwm=10) as c:
            c.fetches = []
            job = c.submit_job("render", {}, render_arrays(150, size=64, n=50))
            wait_finished_on_disk(proc.cache_dir, job)  # nothing read while the job ran
            outcome = c.collect(job, TIMEOUT)
        assert outcome.ok, outcome.final.fields
        assert [r["ordinal"] for r in outcome.results] == list(range(150))
        assert outcome.final["results"] == 150
        assert "cannot keep up" in proc.log()
        if backlog_limit < 150:
            assert "dropped" in proc.log()
            assert c.fetches and all(c.fetches), "the missing ordinals were fetched"
        else:
            assert c.fetches == [], "nothing was lost, nothing fetched"
    finally:
        assert proc.stop() == 0


def test_queue_positions_are_coalesced(strict):
    n = 120
    with BackendClient(strict.address) as c:
        refs = [c.submit("convert", {"direction": "gaussians_to_ply"}, tiny_convert())
                for _ in range(n)]
        outcomes = [c.collect(ref, TIMEOUT) for ref in refs]
    assert all(o.ok for o in outcomes)
    queued = sum(p.get("stage") == "queued" for o in outcomes for p in o.progress)
    # milestones: the last ten places and powers of two, at most once each per job
    assert queued <= n * (10 + n.bit_length()), queued


# ----------------------------------------------------------------- 3. job ownership

def test_job_ids_are_made_by_the_server_and_unguessable(single):
    with BackendClient(single.address) as c:
        ids = [c.submit_job("convert", {"direction": "gaussians_to_ply"}, tiny_convert())
               for _ in range(3)]
    assert len(set(ids)) == 3 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_another_clients_job_cannot_be_fetched_or_cancelled(strict):
    with BackendClient(strict.address) as a, BackendClient(strict.address) as b:
        job = a.submit_job("render", {}, render_arrays(40, size=32, n=1000))
        b.fetch(job)
        reply = b.wait(lambda m: m.job == job, TIMEOUT)
        b.fetch("0" * 32)
        nothing = b.wait(lambda m: m.job == "0" * 32, TIMEOUT)
        assert (reply.type, reply["code"]) == ("error", "unknown_job")
        assert reply["message"].replace(job, "X") == nothing["message"].replace("0" * 32, "X")
        b.cancel(job)
        assert b.wait(lambda m: m.job == job, TIMEOUT)["code"] == "unknown_job"
        outcome = a.collect(job, TIMEOUT)
        assert outcome.ok and len(outcome.results) == 40, "b's cancel had no effect"
        assert not any(m.job == job for m in b.poll(0)), "b never saw a's results"
        a.fetch(job)
        assert a.collect(job, TIMEOUT).ok, "the owner can fetch it"


def test_single_user_mode_lets_every_client_fetch(single):
    with BackendClient(single.address) as a, BackendClient(single.address) as b:
        assert a.welcome(TIMEOUT)["single_user"] is True
        done = a.run_job("convert", {"direction": "gaussians_to_ply"}, tiny_convert(),
                         timeout=TIMEOUT)
        b.fetch(done.job)
        assert b.collect(done.job, TIMEOUT).ok


def make_client_keys(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    _, secret = zmq.auth.create_certificates(folder, name)
    return Path(secret)


def test_with_curve_a_job_belongs_to_the_client_key(tmp_path):
    subprocess.run([sys.executable, "-m", "backend", "keys", str(tmp_path / "keys")], cwd=ROOT,
                   check=True, capture_output=True, timeout=TIMEOUT)
    keys = tmp_path / "keys"
    other = make_client_keys(tmp_path / "other", "other")
    shutil.copy(tmp_path / "other" / "other.key", keys / "clients")
    proc = start_backend(tmp_path, extra_args=[
        "--users", "multi", "--curve-secret-key", str(keys / "server.key_secret"),
        "--curve-clients", str(keys / "clients")])
    server_key = keys / "server.key"
    try:
        with BackendClient(proc.address, curve_server_public=server_key,
                           curve_client_secret=keys / "client.key_secret") as c:
            done = c.run_job("convert", {"direction": "gaussians_to_ply"}, tiny_convert(),
                             timeout=TIMEOUT)
            assert done.ok
        # The same key on a new connection owns the job; another admitted key does not.
        with BackendClient(proc.address, curve_server_public=server_key,
                           curve_client_secret=keys / "client.key_secret") as again:
            again.fetch(done.job)
            assert again.collect(done.job, TIMEOUT).ok
        with BackendClient(proc.address, curve_server_public=server_key,
                           curve_client_secret=other) as stranger:
            stranger.fetch(done.job)
            assert stranger.wait(lambda m: m.job == done.job, TIMEOUT)["code"] == "unknown_job"
    finally:
        assert proc.stop() == 0


# ----------------------------------------------------------------- 4. paths from the wire

def generate_arrays():
    from backend.cameras import orbit_rig

    c2w, intr = orbit_rig(2, radius=3.0, camera_height=0.5, focal=20.0, width=16, height=16)
    c2w = np.repeat(c2w[:, None], 2, axis=1).astype(np.float32)
    intr = np.repeat(intr[:, None], 2, axis=1).astype(np.float32)
    return {"c2w": c2w, "intrinsics": intr}


def refusal(client, kind, params, arrays):
    ref = client.submit(kind, params, arrays)
    reply = client.wait(lambda m: m.get("ref") == ref, TIMEOUT)
    assert reply.type == "error", reply
    return reply


def test_video_path_is_refused_outside_the_input_folder(strict, tmp_path):
    outside = tmp_path / "secret.mp4"
    outside.write_bytes(b"not a movie")
    (strict.inputs / "link.mp4").unlink(missing_ok=True)
    (strict.inputs / "link.mp4").symlink_to(outside)
    with BackendClient(strict.address) as c:
        replies = [refusal(c, "generate", {"video_path": p}, generate_arrays())
                   for p in (str(outside), str(tmp_path / "missing.mp4"), "../secret.mp4",
                             "link.mp4", "/etc/passwd")]
        inside = refusal(c, "generate", {"video_path": "absent.mp4"}, generate_arrays())
    texts = {r["message"] for r in replies}
    assert len(texts) == 1, "existing and missing files outside give the same answer"
    assert all((r["code"], r["field"]) == ("bad_input", "params.video_path") for r in replies)
    assert "no file 'absent.mp4'" in inside["message"]


def test_video_path_is_refused_without_an_input_folder(single):
    with BackendClient(single.address) as c:
        reply = refusal(c, "generate", {"video_path": "/etc/hostname"}, generate_arrays())
    assert reply["field"] == "params.video_path" and "--input-folder" in reply["message"]


# ----------------------------------------------------------------- 5. resource limits

def test_a_frame_over_the_message_limit_drops_the_peer(strict):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECTED)
    sock.connect(strict.address)
    try:
        sock.send_multipart([b'{"v": 1, "type": "hello"}', b"\0" * (5 << 20)])
        events = []
        while zmq.EVENT_DISCONNECTED not in events:
            assert monitor.poll(int(TIMEOUT * 1000)), f"no disconnect; events {events}"
            events.append(recv_monitor_message(monitor)["event"])
    finally:
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)
        ctx.term()
    with BackendClient(strict.address) as c:
        assert c.welcome(TIMEOUT)["limits"]["max_total_bytes"] == 4 << 20


def test_queue_caps_per_client_and_in_total(tmp_path):
    proc = start_backend(tmp_path, extra_args=["--max-queued-per-client", "2",
                                               "--max-queued", "3"])
    try:
        with BackendClient(proc.address) as a, BackendClient(proc.address) as b:
            slow = render_arrays(300, size=32, n=1000)
            a.submit_job("render", {}, slow)  # runs
            a.wait(lambda m: m.type == "progress" and m.get("stage") == "started", TIMEOUT)
            for _ in range(2):
                a.submit_job("render", {}, slow)
            assert refusal(a, "render", {}, slow)["code"] == "queue_full"
            b.submit_job("render", {}, slow)
            reply = refusal(b, "render", {}, slow)
            assert reply["code"] == "queue_full" and "full" in reply["message"]
            a.cancel(scope="all")
            b.cancel(scope="all")
    finally:
        assert proc.stop() == 0


def test_caps_on_cameras_and_output_per_job(strict):
    with BackendClient(strict.address) as c:
        reply = refusal(c, "render", {}, render_arrays(65))
        assert (reply["code"], reply["field"]) == ("too_large", "c2w")
        big = c.run_job("render", {}, render_arrays(64, size=64, n=50), timeout=TIMEOUT)
        assert big.final.type == "error" and big.final["code"] == "too_large"
        assert 0 < len(big.results) < 64
        assert c.run_job("render", {}, render_arrays(2), timeout=TIMEOUT).ok


def test_cache_evicts_the_oldest_finished_jobs(tmp_path):
    # each job stores about 85 kB: the cap holds one, not two
    proc = start_backend(tmp_path, extra_args=["--cache-max-gb", str(120e3 / 2**30)])
    try:
        with BackendClient(proc.address) as c:
            first = c.run_job("render", {}, render_arrays(4, size=32), timeout=TIMEOUT)
            second = c.run_job("render", {}, render_arrays(4, size=32), timeout=TIMEOUT)
            assert first.ok and second.ok
            assert not (proc.cache_dir / "jobs" / first.job).exists()
            assert job_meta(proc.cache_dir, second.job)["state"] == "done"
            c.fetch(first.job)
            assert c.wait(lambda m: m.job == first.job, TIMEOUT)["code"] == "unknown_job"
    finally:
        assert proc.stop() == 0


# ----------------------------------------------------------------- 6. CURVE set-up

def run_serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "backend", "serve", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT)


def test_off_loopback_needs_a_client_list_or_an_explicit_flag(tmp_path):
    keys = tmp_path / "keys"
    subprocess.run([sys.executable, "-m", "backend", "keys", str(keys)], cwd=ROOT, check=True,
                   capture_output=True, timeout=TIMEOUT)
    out = run_serve("--address", "tcp://0.0.0.0:0", "--cache-dir", str(tmp_path / "c"),
                    "--curve-secret-key", str(keys / "server.key_secret"))
    assert out.returncode == 2
    assert "--curve-clients" in out.stderr and "--allow-any-client" in out.stderr
    assert "Traceback" not in out.stderr
    proc = start_backend(tmp_path, extra_args=[
        "--address", "tcp://0.0.0.0:0", "--curve-secret-key", str(keys / "server.key_secret"),
        "--allow-any-client"])
    try:
        assert "WARNING" in proc.log() and "--allow-any-client" in proc.log()
    finally:
        assert proc.stop() == 0


def test_secret_keys_cache_and_ready_file_are_owner_only(single, tmp_path):
    keys = tmp_path / "keys"
    subprocess.run([sys.executable, "-m", "backend", "keys", str(keys)], cwd=ROOT, check=True,
                   capture_output=True, timeout=TIMEOUT)
    for path in (keys / "server.key_secret", keys / "client.key_secret", single.cache_dir,
                 single.ready_file):
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path


# ----------------------------------------------------------------- 7. integrity

def test_a_corrupt_cached_result_is_an_error_naming_the_job(single):
    with BackendClient(single.address) as c:
        done = c.run_job("render", {}, render_arrays(3), timeout=TIMEOUT)
        blob = single.cache_dir / "jobs" / done.job / "results" / "00001.bin"
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0x01
        blob.write_bytes(bytes(data))
        c.fetch(done.job)
        replay = c.collect(done.job, TIMEOUT)
    assert replay.final.type == "error" and replay.final["code"] == "cache_corrupt"
    assert done.job in replay.final["message"] and "result 1" in replay.final["message"]
    assert [r["ordinal"] for r in replay.results] == [0], "what is intact still arrives"


def test_jobs_interrupted_by_kill_are_marked_failed_at_start_up(tmp_path):
    cache = tmp_path / "cache"
    first = start_backend(tmp_path / "a", cache_dir=cache)
    with BackendClient(first.address) as c:
        job = c.submit_job("render", {}, render_arrays(300, size=32, n=1000))
        queued = c.submit_job("render", {}, render_arrays(2))
        c.wait(lambda m: m.job == job and m.type == "result", TIMEOUT)
    first.stop(sig=signal.SIGKILL)
    assert job_meta(cache, job)["state"] == "running"
    second = start_backend(tmp_path / "b", cache_dir=cache)
    try:
        for j in (job, queued):
            meta = job_meta(cache, j)
            assert meta["state"] == "failed" and "stopped while" in meta["error"]["message"]
        assert not list(cache.rglob("*.tmp")), "no half-written file is left"
        with BackendClient(second.address) as c:
            c.fetch(job)
            outcome = c.collect(job, TIMEOUT)
        assert outcome.final.type == "error" and outcome.results, "kept results replay"
        assert [r["ordinal"] for r in outcome.results] == list(range(len(outcome.results)))
    finally:
        assert second.stop() == 0


# ----------------------------------------------------------------- 8. small ones

def test_an_unbindable_address_exits_without_a_traceback(tmp_path):
    ctx = zmq.Context()
    taken = ctx.socket(zmq.REP)
    taken.linger = 0
    port = taken.bind_to_random_port("tcp://127.0.0.1")
    try:
        out = run_serve("--address", f"tcp://127.0.0.1:{port}", "--cache-dir",
                        str(tmp_path / "c"), "--device", "cpu")
    finally:
        taken.close(0)
        ctx.term()
    assert out.returncode == 2 and "cannot serve on" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_done_and_welcome_reveal_no_server_paths_to_other_users(strict, single):
    with BackendClient(strict.address) as c:
        welcome = c.welcome(TIMEOUT)
        done = c.run_job("render", {}, render_arrays(1), timeout=TIMEOUT)
    assert "cache_dir" not in done.final.fields
    assert str(strict.cache_dir) not in json.dumps(welcome.fields)
    assert all("path" not in m for m in welcome["models"].values())
    with BackendClient(single.address) as c:
        local = c.run_job("render", {}, render_arrays(1), timeout=TIMEOUT)
    assert Path(local.final["cache_dir"]).is_dir(), "a local user gets the job folder"


def test_the_transfer_bench_receiver_admits_only_its_sender():
    from backend.tools.bench import transfer

    ctx = zmq.Context()
    sock, address, password, auth = transfer.open_receiver(ctx)
    stranger = ctx.socket(zmq.ROUTER)
    stranger.linger = 0
    monitor = stranger.get_monitor_socket()
    try:
        stranger.connect(address)
        events = []
        while zmq.EVENT_HANDSHAKE_FAILED_AUTH not in events \
                and zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL not in events:
            assert zmq.EVENT_HANDSHAKE_SUCCEEDED not in events, "a stranger got in"
            assert monitor.poll(int(TIMEOUT * 1000)), f"no handshake result; events {events}"
            events.append(recv_monitor_message(monitor)["event"])
        friend = ctx.socket(zmq.DEALER)
        friend.linger = 0
        friend.plain_username = transfer.BENCH_USER.encode()
        friend.plain_password = password.encode()
        friend.connect(address)
        friend.send(b"ping")
        assert sock.poll(int(TIMEOUT * 1000)) and sock.recv() == b"ping"
        friend.close(0)
    finally:
        stranger.disable_monitor()
        monitor.close(0)
        stranger.close(0)
        sock.close(0)
        auth.stop()
        ctx.term()

