"""The ``fabric`` command line: ``demo``, ``broker``, ``keygen``, ``worker``.

Each layer registers its own subcommands; this module only wires them together
(it is the one place that plugs the remote layer's object host into the broker,
so ``fabric.broker`` itself never imports pickle). Logging is configured here
and nowhere else.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from fabric._version import __version__


def build_parser() -> argparse.ArgumentParser:
    """Return the parser with every layer's subcommands registered."""
    from fabric import demo
    from fabric.broker import cli as broker_cli
    from fabric.remote import cli as remote_cli

    parser = argparse.ArgumentParser(
        prog="fabric", description="Use every core, then every machine, with one API."
    )
    parser.add_argument("--version", action="version", version=f"fabric {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo.register(sub)
    broker_cli.register(sub, service_factories=remote_cli.broker_services())
    remote_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fabric`` command; return its exit status."""
    args = build_parser().parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return int(args.func(args) or 0)
