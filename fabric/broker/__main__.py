"""``python -m fabric.broker``: the broker's own subcommands, without the other layers."""

import argparse
import logging

from fabric.broker.cli import register


def main() -> int:
    """Run ``broker``, ``keygen`` or ``status``; return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m fabric.broker")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args()
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return int(args.func(args) or 0)


raise SystemExit(main())
