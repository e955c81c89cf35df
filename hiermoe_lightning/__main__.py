"""``python -m hiermoe_lightning`` = the ``hiermoe`` console script."""

import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())
