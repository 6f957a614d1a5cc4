"""Entry point: `python -m server.bench --help`."""

import sys

from server.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
