"""``python -m classicnets`` is the same as the ``classicnets`` command."""

import os
import sys

from classicnets.cli import main

if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun, leave without the interpreter's teardown: its process group already
        # destroyed and every file written (train.distributed.shutdown), a process can still be
        # aborted there by gloo's threads ("terminate called without an active exception",
        # about one run in ten here), and torchrun would report the whole job failed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(code or 0))
    sys.exit(code)
