"""Bounded soak of the backend (`slow`): several clients with many jobs and a late reader,
kill -9 and restart, a disk that refuses large files, descriptor pressure. Every job must end
with a final message or be recoverable by `fetch`; no stored result may be torn; the server's
descriptors and memory stay flat. Figures are printed for docs/RELIABILITY.md."""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from backend import protocol
from backend.cache import ResultCache
from backend.client import BackendClient
from support import ROOT, random_gaussian_arrays, ring_cameras, start_backend

pytestmark = pytest.mark.slow
TIMEOUT = 120.0


def convert_arrays(seed: int):
    return protocol.pack_sequence([random_gaussian_arrays(8, seed=seed)])


def render_arrays(num: int, size: int = 16):
    c2w, intr = ring_cameras(num, size=size)
    return {**random_gaussian_arrays(50, 0), "c2w": c2w, "intrinsics": intr}


def proc_stats(pid: int) -> tuple[int, int]:
    """(open descriptors, resident kB) of a process (Linux)."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text()
               .splitlines() if line.startswith("VmRSS"))
    return fds, rss


def submit_many(client: BackendClient, count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    jobs = []
    for i in range(count):
        if rng.random() < 0.8:
            jobs.append(client.submit_job("convert", {"direction": "gaussians_to_ply"},
                                          convert_arrays(seed * 1000 + i), TIMEOUT))
        else:
            jobs.append(client.submit_job("render", {}, render_arrays(rng.randint(1, 12)),
                                          TIMEOUT))
    return jobs


def test_soak_clients_late_reader_and_kill_9(tmp_path):
    cache = tmp_path / "cache"
    args = ["--max-queued-per-client", "300", "--max-queued", "900", "--send-hwm", "50"]
    proc = start_backend(tmp_path / "a", cache_dir=cache, extra_args=args)
    clients = [BackendClient(proc.address, receive_hwm=50) for _ in range(3)]
    per_client = 200
    try:
        warm = clients[0].run_job("render", {}, render_arrays(1), timeout=TIMEOUT)
        assert warm.ok
        start_stats = proc_stats(proc.proc.pid)
        jobs = {i: submit_many(c, per_client, i) for i, c in enumerate(clients)}
        finals = {}
        for i in (0, 1):  # two readers; client 2 reads only after the restart
            for job in jobs[i]:
                finals[job] = clients[i].collect(job, TIMEOUT)
        end_stats = proc_stats(proc.proc.pid)
        time.sleep(random.uniform(0.0, 0.5))
        proc.stop(sig=signal.SIGKILL)
    finally:
        for c in clients:
            c.close()
    assert all(o.final is not None for o in finals.values())
    assert sum(o.ok for o in finals.values()) == len(finals)
    restarted = start_backend(tmp_path / "b", cache_dir=cache, extra_args=args)
    try:
        recovered = 0
        with BackendClient(restarted.address) as late:
            for job in jobs[2]:
                late.fetch(job)
                outcome = late.collect(job, TIMEOUT)
                assert outcome.final is not None
                recovered += outcome.ok
                if outcome.ok:
                    assert [r["ordinal"] for r in outcome.results] == \
                        list(range(outcome.final["results"]))
        store = ResultCache(cache)
        torn = 0
        for job in store.job_ids():
            for k in range(int(store.meta(job)["results"])):
                store.result_frames(job, k)  # raises CacheCorrupt on a torn result
        assert not list(cache.rglob("*.tmp"))
    finally:
        assert restarted.stop() == 0
    figures = {"clients": 3, "jobs": 3 * per_client, "late_reader_jobs": per_client,
               "late_reader_recovered_done": recovered, "torn_results": torn,
               "server_fds_before_after": [start_stats[0], end_stats[0]],
               "server_rss_kb_before_after": [start_stats[1], end_stats[1]]}
    print("SOAK", json.dumps(figures))
    assert end_stats[0] <= start_stats[0] + 8, figures
    assert end_stats[1] <= start_stats[1] + 200_000, figures


def limited_backend(tmp: Path, fsize: int | None = None, nofile: int | None = None):
    def limit():
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG instead
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    tmp.mkdir(parents=True, exist_ok=True)
    ready = tmp / "ready.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    with open(tmp / "backend.log", "wb") as log:
        p = subprocess.Popen([sys.executable, "-m", "backend", "serve", "--address",
                              "tcp://127.0.0.1:0", "--ready-file", str(ready), "--cache-dir",
                              str(tmp / "cache"), "--device", "cpu"], cwd=ROOT, env=env,
                             stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit)
    deadline = time.monotonic() + 90
    while not ready.exists():
        assert p.poll() is None and time.monotonic() < deadline, \
            (tmp / "backend.log").read_text()
        time.sleep(0.05)
    return p, json.loads(ready.read_text())["address"]


def test_soak_full_disk_and_descriptor_pressure(tmp_path):
    survived = 0
    p, address = limited_backend(tmp_path / "disk", fsize=64 << 10)
    try:
        with BackendClient(address) as c:
            for round_ in range(10):
                big = c.run_job("render", {}, render_arrays(2, size=96), timeout=TIMEOUT)
                assert big.final.type == "error" and "File too large" in big.final["message"]
                survived += 1
                small = c.run_job("convert", {"direction": "gaussians_to_ply"},
                                  convert_arrays(round_), timeout=TIMEOUT)
                assert small.ok, small.final.fields
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
    p, address = limited_backend(tmp_path / "fds", nofile=160)
    ctx = zmq.Context()
    idle, outcomes = [], []
    c = BackendClient(address)
    try:
        c.welcome(TIMEOUT)  # connected before the flood
        for _ in range(300):  # idle peers holding connections until descriptors run out
            s = ctx.socket(zmq.DEALER)
            s.linger = 0
            s.connect(address)
            idle.append(s)
        time.sleep(1.0)
        for i in range(10):
            outcomes.append(c.run_job("convert", {"direction": "gaussians_to_ply"},
                                      convert_arrays(i), timeout=TIMEOUT))
        for s in idle:
            s.close(0)
        failed = sum(not o.ok for o in outcomes)
        assert all(o.final is not None for o in outcomes), "every job got a final message"
        time.sleep(1.0)
        assert c.run_job("convert", {"direction": "gaussians_to_ply"}, convert_arrays(99),
                         timeout=TIMEOUT).ok, "jobs run again once descriptors free up"
    finally:
        c.close()
        ctx.term()
        p.send_signal(signal.SIGTERM)
        p.wait(30)
    print("SOAK-LIMITS", json.dumps({"disk_full_failures_survived": survived,
                                     "fd_pressure_jobs": len(outcomes),
                                     "fd_pressure_failed_with_error": failed}))
