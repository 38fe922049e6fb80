"""``python -m engine`` runs the ``meter`` command line."""

from engine.cli import main

raise SystemExit(main())
