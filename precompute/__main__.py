"""`python -m precompute ...`: see precompute/cli.py."""

import sys

from .cli import main

sys.exit(main())
