"""`python -m mii ...` is the `mii` command."""

import sys

from mii.cli import main

sys.exit(main())
