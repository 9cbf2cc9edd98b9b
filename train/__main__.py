"""`python -m train` runs the `longvu` command line."""

import sys

from train.cli import main

sys.exit(main())
