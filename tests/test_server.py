"""The backend server as a real process on a random loopback port, talked to over real
ZeroMQ sockets by the real client. Every receive has a timeout."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import zmq

from backend import protocol
from backend.client import BackendClient, BackendTimeout
from support import ROOT, random_gaussian_arrays, ring_cameras, start_backend

TIMEOUT = 60.0


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    proc = start_backend(tmp_path_factory.mktemp("backend"))
    yield proc
    rc = proc.stop()
    assert rc == 0, proc.log()
    assert not proc.ready_file.exists(), "the ready file is removed on a clean shutdown"


@pytest.fixture
def client(backend):
    with BackendClient(backend.address) as c:
        yield c


def render_arrays(num_cams: int, size: int = 32, n: int = 300, seed: int = 0):
    c2w, intr = ring_cameras(num_cams, size=size)
    return {**random_gaussian_arrays(n, seed), "c2w": c2w, "intrinsics": intr}


def test_hello_gets_welcome(client):
    welcome = client.welcome(TIMEOUT)
    assert welcome["protocol"] == protocol.PROTOCOL_VERSION
    assert welcome["device"] == "cpu"
    assert {"render", "convert"} <= set(welcome["job_kinds"])
    assert welcome["limits"]["max_arrays"] == protocol.DEFAULT_LIMITS.max_arrays


def test_render_job_streams_images_and_keeps_them_on_disk(client, backend):
    outcome = client.run_job("render", {"near": 0.1}, render_arrays(3), timeout=TIMEOUT)
    assert outcome.ok, outcome.final.fields
    assert [r["index"] for r in outcome.results] == [0, 1, 2]
    for r in outcome.results:
        assert r.arrays["rgb"].shape == (32, 32, 3)
        assert r.arrays["alpha"].shape == (32, 32, 1)
        assert r.arrays["alpha"].max() > 0.5, "the Gaussians are in view of every camera"
    assert any(p["stage"] == "render" for p in outcome.progress)
    meta = json.loads((backend.cache_dir / "jobs" / outcome.job / "job.json").read_text())
    assert meta["state"] == "done" and meta["results"] == 3


def test_render_job_renders_in_the_mode_asked(client):
    """Gaussians render in the mode they were fitted in (a job's fit.json says which); the
    antialiased mode's opacity compensation dims splats thinner than the 0.3 px blur."""
    arrays = render_arrays(1, n=300)
    arrays["log_scales"] = np.full_like(arrays["log_scales"], np.log(1e-3))  # sub-pixel
    images = {}
    for mode in ("classic", "antialiased"):
        outcome = client.run_job("render", {"rasterize_mode": mode}, arrays, timeout=TIMEOUT)
        assert outcome.ok, outcome.final.fields
        images[mode] = outcome.results[0].arrays["alpha"]
    default = client.run_job("render", {}, arrays, timeout=TIMEOUT).results[0].arrays["alpha"]
    assert np.array_equal(default, images["classic"])
    assert images["antialiased"].sum() < 0.8 * images["classic"].sum()
    refused = client.run_job("render", {"rasterize_mode": "mip"}, arrays, timeout=TIMEOUT)
    assert not refused.ok and "rasterize_mode" in str(refused.final.fields)


def test_convert_round_trip_is_bit_exact(client):
    steps = [random_gaussian_arrays(50 + t, seed=t) for t in range(3)]
    to_ply = client.run_job("convert", {"direction": "gaussians_to_ply"},
                            protocol.pack_sequence(steps), timeout=TIMEOUT)
    assert to_ply.ok, to_ply.final.fields
    plys = {f"ply_{r['index']:04d}": np.array(r.arrays["ply"]) for r in to_ply.results}
    assert all(p[:3].tobytes() == b"ply" for p in plys.values())
    back = client.run_job("convert", {"direction": "ply_to_gaussians"}, plys, timeout=TIMEOUT)
    assert back.ok, back.final.fields
    for r, original in zip(back.results, steps):
        for name, arr in original.items():
            assert r.arrays[name].tobytes() == arr.tobytes(), name


@pytest.mark.parametrize("arrays, params, code, field", [
    ("nan_camera", {}, "bad_camera", "c2w"),
    ("scaled_camera", {}, "bad_camera", "c2w"),
    ("no_cameras", {}, "bad_input", "c2w"),
    ("bad_gaussians", {}, "bad_input", "arrays"),
    ("ok", {"near": -1}, "bad_field", "params.near"),
    ("ok", {"near": 2.0, "far": 1.0}, "bad_camera", "params.near"),
    ("ok", {"nearr": 0.1}, "bad_field", "params.nearr"),
])
def test_bad_job_input_gets_a_clear_error(client, arrays, params, code, field):
    good = render_arrays(2)
    cases = {"ok": good, "no_cameras": {k: v for k, v in good.items() if k != "c2w"}}
    cases["nan_camera"] = {**good, "c2w": good["c2w"].copy()}
    cases["nan_camera"]["c2w"][1, 0, 3] = np.inf
    cases["scaled_camera"] = {**good, "c2w": good["c2w"] * 2}
    cases["bad_gaussians"] = {**good, "quats": good["quats"][:, :3]}
    ref = client.submit("render", params, cases[arrays])
    reply = client.wait(lambda m: m.get("ref") == ref, TIMEOUT)
    assert reply.type == "error", reply
    assert (reply["code"], reply["field"]) == (code, field), reply.fields
    assert reply["message"]
    assert client.welcome(TIMEOUT)["protocol"] == protocol.PROTOCOL_VERSION


def test_protocol_level_errors(client, backend):
    client.send("welcome")
    assert client.wait(lambda m: True, TIMEOUT)["code"] == "unknown_type"
    ref = client.submit("teleport")
    reply = client.wait(lambda m: m.get("ref") == ref, TIMEOUT)
    assert (reply.type, reply["code"]) == ("error", "unknown_kind")
    first = client.run_job("render", {}, render_arrays(1), timeout=TIMEOUT)
    client.send("submit", job=first.job, kind="render", params={}, arrays=render_arrays(1))
    reply = client.wait(lambda m: m.job == first.job, TIMEOUT)
    assert (reply.type, reply["code"], reply["field"]) == ("error", "bad_field", "job"), \
        "clients do not choose job ids"
    client.fetch("no-such-job")
    assert client.wait(lambda m: m.job == "no-such-job", TIMEOUT)["code"] == "unknown_job"
    client.cancel(first.job)
    reply = client.wait(lambda m: m.job == first.job, TIMEOUT)
    assert reply["code"] == "unknown_job" and "done" in reply["message"]


def test_raw_garbage_frames_get_errors_and_the_server_keeps_serving(backend):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(backend.address)
    try:
        for frames in ([b"\x00\x01garbage"], [b"{}"], [b'{"v": 1, "type": "hello"}', b"x"]):
            sock.send_multipart(frames)
            assert sock.poll(int(TIMEOUT * 1000)), "the server answers every message"
            reply = protocol.decode(sock.recv_multipart())
            assert reply.type == "error" and reply["code"] in protocol.ERROR_CODES
    finally:
        sock.close()
    with BackendClient(backend.address) as c:
        assert c.welcome(TIMEOUT)["device"] == "cpu"


def test_two_clients_one_runs_the_other_queues(backend):
    with BackendClient(backend.address) as a, BackendClient(backend.address) as b:
        job_a = a.submit_job("render", {}, render_arrays(12, size=32, n=1000))
        ref_b = b.submit("render", {}, render_arrays(2))
        accepted_b = b.wait(lambda m: m.get("ref") == ref_b and m.type == "accepted", TIMEOUT)
        job_b = accepted_b.job
        assert accepted_b["position"] >= 1, "b waits behind a"
        out_b = b.collect(job_b, TIMEOUT)
        out_a = a.collect(job_a, TIMEOUT)
        assert out_a.ok and out_b.ok
        assert len(out_a.results) == 12 and len(out_b.results) == 2
        assert all(m.job == job_b for m in out_b.results), "each client gets its own results"
        meta = {j: json.loads((backend.cache_dir / "jobs" / j / "job.json").read_text())
                for j in (job_a, job_b)}
        assert meta[job_a]["finished"] <= meta[job_b]["finished"], "one job at a time, in order"


def test_cancel_mid_job(client, backend):
    job = client.submit_job("render", {}, render_arrays(400, size=48, n=2000))
    client.wait(lambda m: m.job == job and m.type == "result", TIMEOUT)
    client.cancel(job)
    outcome = client.collect(job, TIMEOUT)
    assert outcome.final.type == "cancelled"
    assert 1 + len(outcome.results) < 400, "the job stopped early"
    meta = json.loads((backend.cache_dir / "jobs" / job / "job.json").read_text())
    assert meta["state"] == "cancelled"
    assert client.welcome(TIMEOUT)["queue"] == 0


def test_cancel_queued_jobs_of_this_client(client):
    running = client.submit("render", {}, render_arrays(200, size=48, n=2000))
    queued = [client.submit("render", {}, render_arrays(1)) for _ in range(2)]
    client.cancel(scope="all")
    finals = {j: client.collect(j, TIMEOUT).final.type for j in [running, *queued]}
    assert finals == {j: "cancelled" for j in [running, *queued]}


CLIENT_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    from backend.client import BackendClient
    from test_server import render_arrays
    c = BackendClient({address!r})
    job = c.submit_job("render", {{}}, render_arrays(12, size=32, n=1000))
    c.wait(lambda m: m.job == job and m.type == "result", 60)
    print(job, flush=True)
    time.sleep(600)
""")


def test_client_killed_mid_job_then_fetch_from_a_new_client(backend):
    script = CLIENT_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"),
                                  address=backend.address)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        job = proc.stdout.readline().strip()
        assert job, "the client process submitted a job and saw a result"
    finally:
        proc.kill()
        proc.wait(10)
    with BackendClient(backend.address) as c:
        c.fetch(job)
        outcome = c.collect(job, TIMEOUT)
        assert outcome.ok, outcome.final.fields
        assert sorted(r["index"] for r in outcome.results) == list(range(12))
        # A finished job can be fetched again, from the cache on disk.
        again = BackendClient(backend.address)
        again.fetch(job)
        replay = again.collect(job, TIMEOUT)
        again.close()
        assert replay.ok and len(replay.results) == 12
        for x, y in zip(outcome.results, replay.results):
            assert x.arrays["rgb"].tobytes() == y.arrays["rgb"].tobytes()


def test_results_survive_a_backend_restart(tmp_path):
    first = start_backend(tmp_path / "a", cache_dir=tmp_path / "cache")
    try:
        with BackendClient(first.address) as c:
            done = c.run_job("render", {}, render_arrays(2), timeout=TIMEOUT)
            assert done.ok
    finally:
        assert first.stop() == 0
    second = start_backend(tmp_path / "b", cache_dir=tmp_path / "cache")
    try:
        with BackendClient(second.address) as c:
            c.fetch(done.job)
            replay = c.collect(done.job, TIMEOUT)
            assert replay.ok and len(replay.results) == 2
            np.testing.assert_array_equal(replay.results[1].arrays["rgb"],
                                          done.results[1].arrays["rgb"])
    finally:
        assert second.stop() == 0


def test_sigint_stops_the_server_cleanly(tmp_path):
    proc = start_backend(tmp_path)
    assert proc.stop(sig=2) == 0, proc.log()
    assert not proc.ready_file.exists()


def test_non_loopback_bind_needs_curve_keys(tmp_path):
    out = subprocess.run([sys.executable, "-m", "backend", "serve", "--address",
                          "tcp://0.0.0.0:0", "--cache-dir", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 2
    assert "CURVE" in out.stderr and "--curve-secret-key" in out.stderr


def test_curve_keys_admit_known_clients_only(tmp_path):
    keys = tmp_path / "keys"
    subprocess.run([sys.executable, "-m", "backend", "keys", str(keys)], cwd=ROOT, check=True,
                   capture_output=True, timeout=TIMEOUT)
    proc = start_backend(tmp_path, extra_args=[
        "--curve-secret-key", str(keys / "server.key_secret"),
        "--curve-clients", str(keys / "clients")])
    try:
        with BackendClient(proc.address, curve_server_public=keys / "server.key",
                           curve_client_secret=keys / "client.key_secret") as c:
            assert c.welcome(TIMEOUT)["device"] == "cpu"
        with BackendClient(proc.address) as plain, pytest.raises(BackendTimeout):
            plain.welcome(timeout=1.5)
    finally:
        assert proc.stop() == 0
