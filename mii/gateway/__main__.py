import sys

from mii.gateway.cli import main

sys.exit(main())
