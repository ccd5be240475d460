"""``python -m classicnets`` is the same as the ``classicnets`` command."""

from classicnets.cli import entry

if __name__ == "__main__":
    entry()
