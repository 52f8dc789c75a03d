"""``python -m fabric`` runs the ``fabric`` command."""

from fabric.cli import main

raise SystemExit(main())
