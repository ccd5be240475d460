"""``python -m classicnets`` is the same as the ``classicnets`` command."""

import sys

from classicnets.cli import main

if __name__ == "__main__":
    sys.exit(main())
