"""fabric.remote stands without the local layer: importing it never imports fabric.local."""

import subprocess
import sys


def test_importing_fabric_remote_does_not_import_fabric_local() -> None:
    code = (
        "import sys, fabric.remote, fabric.remote.cli\n"
        "print(','.join(m for m in sys.modules if m.startswith('fabric.local')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
