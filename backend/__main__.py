"""Command line: `python -m backend serve ...` runs the server; `python -m backend keys DIR`
creates CURVE key pairs for remote use."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path


def serve(args: argparse.Namespace) -> int:
    from backend import protocol
    from backend.server import Server, ServerConfig

    config = ServerConfig(
        address=args.address, cache_dir=Path(args.cache_dir), ready_file=args.ready_file,
        device=args.device, curve_secret_key=args.curve_secret_key,
        curve_clients=args.curve_clients,
        limits=protocol.Limits(max_total_bytes=int(args.max_message_mb) << 20))
    server = Server(config)
    try:
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
    (root / "clients").mkdir(parents=True, exist_ok=True)
    server_pub, server_sec = zmq.auth.create_certificates(root, "server")
    client_pub, client_sec = zmq.auth.create_certificates(root, "client")
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
                   help="folder of allowed client public keys (default: any client with keys)")
    p.add_argument("--max-message-mb", type=int, default=4096,
                   help="largest accepted message (default %(default)s MiB)")
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
