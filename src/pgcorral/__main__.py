"""``python -m pgcorral`` runs the daemon, as the ``pgcorral`` command does."""

from pgcorral.cli.daemon import main

raise SystemExit(main())
