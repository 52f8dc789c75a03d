"""Run the benchmark families and print (or write) their markdown tables.

python bench/run.py                 # every family, default repeats
python bench/run.py queues --repeats 3 --markdown docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def families() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def machine() -> str:
    import cloudpickle
    import zmq

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} cores, {cpu}; {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}; pyzmq {zmq.__version__} "
        f"(libzmq {zmq.zmq_version()}); cloudpickle {cloudpickle.__version__}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", nargs="*", help=f"among {', '.join(families())}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE.parent))
    out = [
        f"# Benchmarks\n\nMachine: {machine()}\n\n"
        f"Reproduce: `tox -e bench` (or `python bench/run.py --repeats {args.repeats}`).\n"
    ]
    for family in args.family or families():
        module = importlib.import_module(f"bench.bench_{family}")
        out.append(f"\n## {family}\n")
        for table in module.run(args.repeats):
            text = table.markdown()
            print(text, flush=True)
            out.append(text)
    if args.markdown:
        args.markdown.write_text("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
