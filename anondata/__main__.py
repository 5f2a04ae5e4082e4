"""`python -m anondata` runs the CLI, for environments without the console script."""

from .cli import main

raise SystemExit(main())
