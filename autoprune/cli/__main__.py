"""`python -m autoprune.cli ARGS`: the same as the `autoprune` command."""

import sys

from . import main

sys.exit(main())
