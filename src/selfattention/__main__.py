"""``python -m selfattention``: the command line."""

from selfattention.cli import main

raise SystemExit(main())
