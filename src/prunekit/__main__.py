"""``python -m prunekit`` runs the command line (works without the console script on PATH)."""

import sys

from prunekit.cli import main

sys.exit(main())
