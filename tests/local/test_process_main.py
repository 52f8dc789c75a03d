"""Programs run as ``__main__``: the PEP 371 example, main-module functions, the default hook."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import fabric.local
from tests.local.test_lifetime import wait_gone

METHODS = ["fork", "forkserver", "spawn"]
TIMEOUT = 60.0

# PEP 371's threaded example with the import line changed, nothing else: no
# ``if __name__ == "__main__"`` guard, a function of __main__ as the target.
PEP_371 = """\
from fabric.local import Process as worker

def afunc(number):
    print(number * 3)

t = worker(target=afunc, args=(4,))
t.start()
t.join()
"""


def run_script(tmp_path: Path, source: str, *args: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "main.py"
    script.write_text(source)
    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=tmp_path,
    )


def test_pep_371_example_runs_unchanged(tmp_path: Path) -> None:
    done = run_script(tmp_path, PEP_371)
    assert (done.returncode, done.stdout, done.stderr) == (0, "12\n", "")


@pytest.mark.parametrize("method", METHODS)
def test_pep_371_example_under_each_start_method(tmp_path: Path, method: str) -> None:
    source = f"import fabric.local\nfabric.local.set_start_method({method!r})\n" + PEP_371
    done = run_script(tmp_path, source)
    assert (done.returncode, done.stdout, done.stderr) == (0, "12\n", "")


MAIN_FUNCTIONS = """
import sys
import fabric.local

def triple(x):
    print("triple", x * 3, flush=True)

class Shouter(fabric.local.Process):
    def run(self):
        print("subclass", self.name, flush=True)

if __name__ == "__main__":
    ctx = fabric.local.get_context(sys.argv[1])
    factor = 5
    for target, args in [(triple, (2,)), (lambda: print("lambda", flush=True), ()),
                         (lambda x: print("closure", x * factor, flush=True), (2,))]:
        p = ctx.Process(target=target, args=args)
        p.start()
        p.join()
        assert p.exitcode == 0, p.exitcode
    p = type("S", (Shouter, ctx.Process), {})(name="shouty")
    p.start()
    p.join()
    print("parent done", flush=True)
"""


@pytest.mark.parametrize("method", METHODS)
def test_main_module_functions_lambdas_closures_and_subclasses(tmp_path: Path, method: str) -> None:
    done = run_script(tmp_path, MAIN_FUNCTIONS, method)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "triple 6",
        "lambda",
        "closure 10",
        "subclass shouty",
        "parent done",
    ]


RAISES = """
import sys
import fabric.local

class Custom(Exception):
    pass

def fail():
    raise Custom("went wrong in the child")

if __name__ == "__main__":
    p = fabric.local.get_context(sys.argv[1]).Process(target=fail, name="failing")
    p.start()
    p.join()
    print(p.exitcode, type(p.exception).__name__, p.exception, flush=True)
"""


@pytest.mark.parametrize("method", METHODS)
def test_default_excepthook_prints_the_traceback(tmp_path: Path, method: str) -> None:
    done = run_script(tmp_path, RAISES, method)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "1 Custom went wrong in the child\n"
    assert "Exception in process failing (pid " in done.stderr
    assert "Traceback (most recent call last):" in done.stderr
    assert ", in fail\n" in done.stderr
    assert "Custom: went wrong in the child" in done.stderr


# One os.write per line: two processes share the pipe, and print() may write a
# line and its newline separately.
JOINS_AT_EXIT = """
import os, sys
import fabric.local

def late():
    os.write(1, b"child finished\\n")

if __name__ == "__main__":
    fabric.local.get_context(sys.argv[1]).Process(target=late).start()
    os.write(1, b"main finished\\n")
"""


@pytest.mark.parametrize("method", METHODS)
def test_exit_waits_for_non_daemonic_children(tmp_path: Path, method: str) -> None:
    done = run_script(tmp_path, JOINS_AT_EXIT, method)
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()) == ["child finished", "main finished"]


SERVER_KILLED = """
import os, signal, sys
import fabric.local
from fabric.local import _popen_forkserver

def block_forever():
    signal.pause()

if __name__ == "__main__":
    ctx = fabric.local.get_context("forkserver")
    running = ctx.Process(target=block_forever)
    running.start()
    server = _popen_forkserver._Holder.server.proc
    server.kill()
    server.wait()
    running.join(30)
    print("orphan", running.exitcode, running.pid, flush=True)
    running.kill()  # the child outlived its server: the pidfd still reaches it
    again = ctx.Process(target=print, args=("restarted",))
    again.start()
    again.join(30)
    print("again", again.exitcode, flush=True)
"""


def test_fork_server_killed_is_replaced(tmp_path: Path) -> None:
    done = run_script(tmp_path, SERVER_KILLED)
    assert done.returncode == 0, done.stderr
    orphan, code, pid = done.stdout.splitlines()[0].split()
    assert (orphan, code) == ("orphan", "255")
    assert done.stdout.splitlines()[1:] == ["restarted", "again 0"]
    assert wait_gone(int(pid), TIMEOUT)
    assert "fork server died before reporting child" in done.stderr


# Modules a spawned child must not pay for before its target runs (each costs
# milliseconds; the fork server preloads them instead).
HEAVY = ["cloudpickle", "concurrent.futures", "ctypes", "logging", "typing", "zmq", "subprocess"]


def test_child_bootstrap_is_import_light() -> None:
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "import fabric.local._bootstrap\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules and m not in before))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


PRELOAD = """
import sys
import fabric.local

def report():
    print("wave" in sys.modules, flush=True)

if __name__ == "__main__":
    fabric.local.set_forkserver_preload(sys.argv[1:])
    p = fabric.local.get_context("forkserver").Process(target=report)
    p.start()
    p.join()
"""


@pytest.mark.parametrize(("modules", "loaded"), [([], "False"), (["wave"], "True")])
def test_forkserver_preload(tmp_path: Path, modules: list[str], loaded: str) -> None:
    done = run_script(tmp_path, PRELOAD, *modules)
    assert (done.returncode, done.stdout.strip()) == (0, loaded), done.stderr


def test_forkserver_preload_refuses_a_string() -> None:
    with pytest.raises(TypeError):
        fabric.local.set_forkserver_preload("numpy")  # type: ignore[arg-type]


RESOURCE_WARNINGS = """
import warnings
warnings.simplefilter("always", ResourceWarning)
import fabric.local

def nothing():
    pass

if __name__ == "__main__":
    for method in ["forkserver", "fork", "spawn", "fork"]:
        p = fabric.local.get_context(method).Process(target=nothing)
        p.start()
        p.join()
        p.close()
    print("done", flush=True)
"""


def test_no_resource_warnings_in_parent_or_children(tmp_path: Path) -> None:
    done = run_script(tmp_path, RESOURCE_WARNINGS)
    assert (done.returncode, done.stdout, done.stderr) == (0, "done\n", "")
