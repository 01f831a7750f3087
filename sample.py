"""Entry point: ``python sample.py ARGS`` is ``vrg sample ARGS`` (see ``vrg sample --help``)."""

import sys

from vrg_lightning.cli import main

if __name__ == "__main__":
    sys.exit(main(["sample", *sys.argv[1:]]))
