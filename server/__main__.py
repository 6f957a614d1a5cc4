"""`python -m server`: run Skiff (see server/launcher.py)."""

import sys

if __name__ == "__main__":
    from server.launcher import main

    sys.exit(main())
