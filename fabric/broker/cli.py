"""The ``fabric broker``, ``fabric keygen`` and ``fabric status`` subcommands.

Module-level imports stay light (argparse only): ``fabric --help`` must not
load zmq. ``register`` takes the factories of the services to plug into the
broker, so the top-level CLI can hand in the remote layer's object host
without this package importing it.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fabric.broker.service import Service

__all__ = ["register"]

DEFAULT_BIND = "tcp://127.0.0.1:5555"


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    service_factories: Iterable[Callable[[], Service]] = (),
) -> None:
    """Add the ``broker``, ``keygen`` and ``status`` subcommands to ``subparsers``."""
    factories = tuple(service_factories)
    broker = subparsers.add_parser("broker", help="run the broker that clients and workers join")
    broker.add_argument("--bind", default=DEFAULT_BIND, help=f"endpoint (default {DEFAULT_BIND})")
    broker.add_argument("--keys", metavar="DIR", help="key directory from `fabric keygen`")
    broker.add_argument("--journal", metavar="PATH", help="journal accepted tasks to PATH")
    broker.add_argument(
        "--fsync",
        choices=("always", "os", "never"),
        default="always",
        help="when journal writes are forced to disk (default always)",
    )
    broker.add_argument("--heartbeat", type=float, default=1.0, help="seconds (default 1)")
    broker.add_argument(
        "--liveness",
        type=int,
        default=5,
        help="missed heartbeats before a peer is dead (default 5)",
    )
    broker.add_argument("--max-tasks", type=int, default=100_000, help="back-pressure bound")
    broker.add_argument("--max-bytes", type=int, default=1 << 30, help="payload bytes bound")
    broker.add_argument("--max-retries", type=int, default=3, help="re-runs after worker loss")
    broker.add_argument("--no-services", action="store_true", help="run no built-in object host")
    broker.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback bind without keys (anyone may run code)",
    )
    broker.set_defaults(
        func=lambda args: _reporting(_run_broker, args, () if args.no_services else factories)
    )

    keygen = subparsers.add_parser("keygen", help="create the cluster's CURVE keys in DIR")
    keygen.add_argument("dir", metavar="DIR")
    keygen.add_argument(
        "--peer",
        action="append",
        metavar="NAME=ROLE[,ROLE]",
        default=[],
        help="a peer key and its roles (default: client, worker, admin)",
    )
    keygen.add_argument("--force", action="store_true", help="overwrite existing keys")
    keygen.set_defaults(func=lambda args: _reporting(_run_keygen, args))

    status = subparsers.add_parser("status", help="print the cluster seen by a broker")
    status.add_argument("address", nargs="?", default=DEFAULT_BIND)
    status.add_argument("--keys", metavar="DIR", help="key directory holding NAME.key_secret")
    status.add_argument("--name", default="admin", help="whose key to use (default admin)")
    status.add_argument("--json", action="store_true", help="print the raw statistics as JSON")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds to wait")
    status.set_defaults(func=lambda args: _reporting(_run_status, args))


def _reporting(command: Callable[..., int], *args: Any) -> int:
    """Run ``command``; turn the errors a user can fix into one line on stderr."""
    from fabric.errors import FabricError

    try:
        return command(*args)
    except (FabricError, OSError, ValueError) as exc:
        print(f"fabric: {exc}", file=sys.stderr)
        return 1


def _run_broker(args: argparse.Namespace, factories: Iterable[Callable[[], Service]]) -> int:
    from fabric.broker.scheduler import Limits
    from fabric.broker.server import Broker, is_loopback

    if args.insecure and not args.keys and not is_loopback(args.bind):
        print(
            f"WARNING: {args.bind} without keys: anyone who reaches it can run code on the workers",
            file=sys.stderr,
        )
    limits = Limits(
        max_tasks=args.max_tasks,
        max_bytes=args.max_bytes,
        max_retries=args.max_retries,
    )
    broker = Broker(
        args.bind,
        keys=args.keys,
        journal=args.journal,
        fsync=args.fsync,
        services=[factory() for factory in factories],
        heartbeat=args.heartbeat,
        liveness=args.liveness,
        limits=limits,
        insecure=args.insecure,
    )
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: broker.close())
    broker.serve_forever(
        on_ready=lambda: print(f"fabric broker listening on {broker.address}", flush=True)
    )
    return 0


def _run_keygen(args: argparse.Namespace) -> int:
    from fabric.broker.keys import generate

    peers: dict[str, list[str]] | None = None
    if args.peer:
        peers = {}
        for spec in args.peer:
            name, _, roles = spec.partition("=")
            peers[name] = roles.split(",") if roles else ["client"]
    written = generate(args.dir, peers, overwrite=args.force)
    print(f"wrote {len(written)} key files to {args.dir}:")
    print(f"  broker.key_secret    stays on the broker's host (fabric broker --keys {args.dir})")
    print("  broker.key           goes to every peer")
    print("  NAME.key_secret      goes to peer NAME only; allow/ROLE/NAME.key lets it in")
    return 0


def _run_status(args: argparse.Namespace) -> int:
    from fabric.broker.status import query

    stats = query(args.address, keys=args.keys, name=args.name, timeout=args.timeout)
    if args.json:
        print(json.dumps(stats, indent=2, default=str))
    else:
        print(render(stats))
    return 0


def render(stats: dict[str, Any]) -> str:
    """Format a broker's statistics for people."""
    lines = [
        f"queued {stats['queued']}  in flight {stats['in_flight']}  awaiting DONE "
        f"{stats['awaiting_done']}  done {stats['tasks_done']}  failed {stats['tasks_failed']}"
        f"  retries {stats['retries']}  busy rejections {stats['rejected_busy']}",
        f"sessions {stats['sessions']} (clients {stats['clients']}, workers {stats['workers']},"
        f" hosts {stats['hosts']})  journal {'on' if stats['journal'] else 'off'}"
        f"  throughput {stats.get('throughput', 0.0):.1f} tasks/s",
        "",
        f"{'worker':<20} {'host':<16} {'pid':>7} {'credit':>6} {'running':>7} {'done':>8}"
        f" {'heard':>8}",
    ]
    for w in stats["worker_list"]:
        lines.append(
            f"{w['name']:<20.20} {w['host']:<16.16} {w['pid']:>7} {w['credit']:>6}"
            f" {w['running']:>7} {w['done']:>8} {w['last_seen']:>6.1f}s"
        )
    return "\n".join(lines)
