"""``python -m adapter.cli``: the command line."""

import sys

from adapter.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
