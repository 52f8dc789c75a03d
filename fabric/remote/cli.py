"""The remote layer's command line: ``fabric worker``, and the broker's object-host plug-in.

``register(subparsers)`` adds ``worker``; ``broker_services()`` gives the top-level
CLI the factories of the services ``fabric broker`` runs in its loop (the
built-in object host). ``python -m fabric.remote.cli worker ...`` also works, so
a Manager can start a node without the top-level CLI.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any


def broker_services() -> list[Callable[[], Any]]:
    """Return the factories of the services the broker hosts: the built-in object host."""
    from fabric.remote._service import BuiltinHostService

    return [BuiltinHostService]


def register(subparsers: Any) -> None:
    """Add the ``worker`` subcommand."""
    worker = subparsers.add_parser(
        "worker",
        help="run tasks from a broker on this machine's cores",
        description="Join the broker at ADDR as a worker node with N task processes. "
        "SIGTERM drains it (running tasks finish, no new ones start); a second SIGTERM stops it.",
    )
    worker.add_argument(
        "address",
        metavar="ADDR",
        help="the broker, e.g. tcp://10.0.0.5:5555 ('-': read it from stdin)",
    )
    worker.add_argument(
        "--processes", "-p", type=int, default=None, help="task processes (default: one per core)"
    )
    worker.add_argument(
        "--keys",
        metavar="DIR",
        default=None,
        help="key directory from 'fabric keygen' (worker.key_secret, broker.key)",
    )
    worker.add_argument("--name", default=None, help="node name (default: host-pid)")
    worker.add_argument(
        "--prefetch",
        type=_prefetch,
        default=None,
        metavar="N",
        help="tasks to hold beyond the free task processes, so each starts its next task "
        "without waiting for the broker (default: 4 per task process; the broker takes "
        "unstarted ones back when another node idles; 0: one task per free process)",
    )
    worker.add_argument("--parent", type=int, default=None, help=argparse.SUPPRESS)
    worker.set_defaults(func=run_worker)


def run_worker(args: argparse.Namespace) -> int:
    """Run a worker node until it is drained; return its exit status."""
    from fabric.remote._keys import CURVE_ENV, KEYS_ENV, curve_from_env, load_curve
    from fabric.remote._worker import WorkerNode

    if args.parent is not None:
        from fabric.remote._taskproc import _die_with_parent

        _die_with_parent(args.parent)
    env: dict[str, str] = {}
    if args.keys is not None:
        curve = load_curve(args.keys, "worker")
        env[KEYS_ENV] = os.path.abspath(args.keys)  # task processes use its client key
    else:
        curve = curve_from_env()  # an embedded cluster's throw-away keys
        if curve is not None:
            env[CURVE_ENV] = os.environ[CURVE_ENV]
    address = args.address if args.address != "-" else _address_from_stdin
    node = WorkerNode(
        address,
        processes=args.processes,
        name=args.name,
        curve=curve,
        env=env,
        prefetch=args.prefetch,
    )
    node.install_signal_handlers()
    return node.run()


def _prefetch(text: str) -> int:
    from fabric.remote._worker import check_prefetch

    try:
        return check_prefetch(int(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: an integer >= 0 is needed") from error


def _address_from_stdin() -> str:
    address = sys.stdin.readline().strip()
    if not address:
        raise SystemExit("fabric worker: no broker address on stdin")
    return address


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``python -m fabric.remote.cli``."""
    parser = argparse.ArgumentParser(prog="fabric")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
