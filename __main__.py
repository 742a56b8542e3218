"""`python -m kineflow`: the `kineflow` command."""

import sys

from .runtime.cli import main

sys.exit(main())
