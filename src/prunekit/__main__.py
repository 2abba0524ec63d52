"""``python -m prunekit`` runs the command line (works without the console script on PATH)."""

import sys

from .cli import main

sys.exit(main())
