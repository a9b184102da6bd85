"""Command line: `python -m backend serve ...` runs the server; `python -m backend keys DIR`
creates CURVE key pairs for remote use."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path


def serve(args: argparse.Namespace) -> int:
    from backend import protocol
    from backend.server import Server, ServerConfig

    max_bytes = int(args.max_message_mb) << 20
    config = ServerConfig(
        address=args.address, cache_dir=Path(args.cache_dir), ready_file=args.ready_file,
        device=args.device, curve_secret_key=args.curve_secret_key,
        curve_clients=args.curve_clients, allow_any_client=args.allow_any_client,
        users=args.users, input_folder=args.input_folder,
        limits=protocol.Limits(max_total_bytes=max_bytes,
                               max_array_bytes=min(max_bytes, protocol.Limits.max_array_bytes)),
        max_queued=args.max_queued, max_queued_per_client=args.max_queued_per_client,
        max_cameras=args.max_cameras, max_job_output_bytes=int(args.max_job_output_mb) << 20,
        cache_max_bytes=None if args.cache_max_gb <= 0 else int(args.cache_max_gb * 2**30),
        cache_max_age_s=None if args.cache_max_age_days <= 0
        else args.cache_max_age_days * 86400.0,
        backlog_limit=args.backlog_limit, send_hwm=args.send_hwm)
    if args.allow_any_client:
        print("backend: WARNING: --allow-any-client admits anyone who has a CURVE key pair; "
              "pass --curve-clients DIR to admit only known clients", file=sys.stderr)
    try:
        server = Server(config)
        endpoint = server.bind()
    except (ValueError, OSError) as exc:
        print(f"backend: {exc}", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: server.stop())
    print(f"READY {endpoint}", flush=True)
    server.serve_forever()
    return 0


def keys(args: argparse.Namespace) -> int:
    import zmq.auth

    root = Path(args.folder)
    old_umask = os.umask(0o077)  # secret keys are never readable by others, not even briefly
    try:
        (root / "clients").mkdir(parents=True, exist_ok=True)
        server_pub, server_sec = zmq.auth.create_certificates(root, "server")
        client_pub, client_sec = zmq.auth.create_certificates(root, "client")
    finally:
        os.umask(old_umask)
    for secret in (server_sec, client_sec):
        os.chmod(secret, 0o600)
    # The server accepts the public keys found in clients/.
    (root / "clients" / Path(client_pub).name).write_bytes(Path(client_pub).read_bytes())
    print(f"server secret key: {server_sec}\nserver public key: {server_pub}\n"
          f"client secret key: {client_sec}\nallowed clients:   {root / 'clients'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the backend server")
    p.add_argument("--address", default="tcp://127.0.0.1:5555",
                   help="ZeroMQ address to bind; port 0 picks a free port (default %(default)s)")
    p.add_argument("--cache-dir", default=str(Path.cwd() / ".cache" / "results"),
                   help="where job results are kept for fetch (default %(default)s)")
    p.add_argument("--ready-file", type=Path, default=None,
                   help="write {address, pid, ...} as JSON here once bound")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--curve-secret-key", type=Path, default=None,
                   help="server secret key file (required for non-loopback addresses)")
    p.add_argument("--curve-clients", type=Path, default=None,
                   help="folder of allowed client public keys (required off loopback unless "
                   "--allow-any-client)")
    p.add_argument("--allow-any-client", action="store_true",
                   help="with CURVE and no --curve-clients: admit any client key (warned)")
    p.add_argument("--users", choices=("auto", "single", "multi"), default="auto",
                   help="single: every client may fetch and cancel every job; multi: only "
                   "its own (per CURVE key, else per connection); auto: single on loopback "
                   "(default %(default)s)")
    p.add_argument("--input-folder", type=Path, default=None,
                   help="folder params.video_path may read from (default: no paths accepted)")
    p.add_argument("--max-message-mb", type=int, default=2048,
                   help="largest accepted message and frame (default %(default)s MiB)")
    p.add_argument("--max-queued", type=int, default=256,
                   help="queued jobs in total (default %(default)s)")
    p.add_argument("--max-queued-per-client", type=int, default=32,
                   help="queued jobs per client (default %(default)s)")
    p.add_argument("--max-cameras", type=int, default=4096,
                   help="cameras per job (default %(default)s)")
    p.add_argument("--max-job-output-mb", type=int, default=16384,
                   help="results of one job (default %(default)s MiB)")
    p.add_argument("--cache-max-gb", type=float, default=50.0,
                   help="result cache size; the oldest finished jobs are evicted beyond it, "
                   "never a queued or running one; 0 = no limit (default %(default)s)")
    p.add_argument("--cache-max-age-days", type=float, default=0.0,
                   help="evict finished jobs older than this; 0 = keep (default %(default)s)")
    p.add_argument("--backlog-limit", type=int, default=20000,
                   help="messages held back for a client that is not reading before its "
                   "results are dropped (it fetches them) (default %(default)s)")
    p.add_argument("--send-hwm", type=int, default=1000,
                   help="messages queued per client by zmq before the backlog takes over "
                   "(default %(default)s)")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=serve)
    k = sub.add_parser("keys", help="create CURVE key pairs (server and one client) in FOLDER")
    k.add_argument("folder")
    k.set_defaults(func=keys)
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "INFO").upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
