"""Benchmark: one timestep of 1M Gaussians sent as a `result` over loopback TCP.

zmq path:    protocol.encode (no copy) -> send_multipart(copy=False) -> recv(copy=False) ->
             protocol.decode (zero-copy views).
pickle path: pickle.dumps(dict of arrays) -> send -> recv -> pickle.loads: what sending the
             same arrays without the protocol would cost.
Sender and receiver are separate processes; the receiver times from its request until the
last message is decoded. The receiver unpickles what arrives, so its socket admits only the
sender: ZAP with the PLAIN mechanism and a random password the sender reads from its stdin
(never from its command line); any other local process is refused at the handshake.
Both paths run in the same invocation, alternating, so the ratio is measured side by side
on the same machine state.
"""

from __future__ import annotations

import argparse
import json
import pickle
import secrets
import statistics
import subprocess
import sys
import time

import numpy as np
import zmq

from backend import protocol


def gaussian_arrays(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"means": rng.normal(size=(n, 3)).astype(np.float32),
            "quats": rng.normal(size=(n, 4)).astype(np.float32),
            "log_scales": rng.normal(size=(n, 3)).astype(np.float32),
            "opacity_logits": rng.normal(size=n).astype(np.float32),
            "sh0": rng.normal(size=(n, 3)).astype(np.float32)}


BENCH_USER = "bench-sender"


def open_receiver(ctx: zmq.Context):
    """The receiver's DEALER on a free loopback port, admitting only PLAIN peers with the
    returned password: (socket, address, password, authenticator to stop)."""
    from zmq.auth.thread import ThreadAuthenticator

    password = secrets.token_hex(16)
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_plain(domain="*", passwords={BENCH_USER: password})
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.plain_server = True
    sock.bind("tcp://127.0.0.1:*")
    return sock, sock.getsockopt_string(zmq.LAST_ENDPOINT), password, auth


def run_sender(address: str, n: int, password: str) -> None:
    arrays = gaussian_arrays(n)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 1000
    sock.plain_username = BENCH_USER.encode()
    sock.plain_password = password.encode()
    sock.connect(address)
    while True:
        ident, request = sock.recv_multipart()
        mode, count = request.decode().split()
        if mode == "quit":
            break
        for i in range(int(count)):
            if mode == "zmq":
                frames = protocol.encode("result", job="bench", arrays=arrays, index=i)
                sock.send_multipart([ident, *frames], copy=False)
            else:
                sock.send_multipart([ident, pickle.dumps(arrays)])
    sock.close()
    ctx.term()


def receive(sock: zmq.Socket, mode: str, count: int) -> float:
    start = time.perf_counter()
    sock.send(f"{mode} {count}".encode())
    checksum = 0.0
    for _ in range(count):
        if mode == "zmq":
            msg = protocol.decode(sock.recv_multipart(copy=False))
            arrays = msg.arrays
        else:
            arrays = pickle.loads(sock.recv())
        checksum += float(arrays["means"][-1, 0])
    elapsed = time.perf_counter() - start
    assert np.isfinite(checksum)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="build.py bench transfer")
    parser.add_argument("--gaussians", type=int, default=1_000_000)
    parser.add_argument("--messages", type=int, default=4, help="messages per timing")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument("--role", default="receiver", help=argparse.SUPPRESS)
    parser.add_argument("--address", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "sender":
        run_sender(args.address, args.gaussians, sys.stdin.readline().strip())
        return 0

    ctx = zmq.Context()
    sock, address, password, auth = open_receiver(ctx)
    sender = subprocess.Popen([sys.executable, "-m", "backend.tools.bench", "transfer", "--role",
                               "sender", "--address", address, "--gaussians",
                               str(args.gaussians)], stdin=subprocess.PIPE, text=True)
    sender.stdin.write(password + "\n")
    sender.stdin.close()
    time.sleep(0.5)  # let the sender connect before the first request
    nbytes = sum(a.nbytes for a in gaussian_arrays(args.gaussians).values())
    times: dict[str, list[float]] = {"zmq": [], "pickle": []}
    try:
        for mode in times:  # warm-up
            receive(sock, mode, 1)
        for _ in range(args.repeats):
            for mode in times:
                times[mode].append(receive(sock, mode, args.messages))
        sock.send(b"quit 0")
    finally:
        sender.wait(30)
        sock.close()
        auth.stop()
        ctx.term()
    gbps = {m: nbytes * args.messages / statistics.median(t) / 1e9 for m, t in times.items()}
    report = {"gaussians": args.gaussians, "message_bytes": nbytes,
              "messages_per_timing": args.messages, "repeats": args.repeats,
              "zmq_result_gbps": round(gbps["zmq"], 3),
              "pickle_baseline_gbps": round(gbps["pickle"], 3),
              "speedup": round(gbps["zmq"] / gbps["pickle"], 2),
              "median_s": {m: statistics.median(t) for m, t in times.items()}}
    print(f"{'path':<22}{'GB/s':>8}{'median s':>12}")
    print(f"{'zero-copy multipart':<22}{gbps['zmq']:>8.2f}{report['median_s']['zmq']:>12.4f}")
    print(f"{'pickle baseline':<22}{gbps['pickle']:>8.2f}{report['median_s']['pickle']:>12.4f}")
    print(f"speedup {report['speedup']}x ({args.gaussians} Gaussians, {nbytes / 1e6:.1f} MB "
          f"per message, {args.messages} messages per timing)")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
