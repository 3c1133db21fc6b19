"""`python -m pipeline`: the `sketchgan` command line."""

import sys

from pipeline.cli import main

sys.exit(main())
