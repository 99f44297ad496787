"""`python -m tools.gpu_check`: see tools/gpu_check/cli.py."""

import sys

from tools.gpu_check.cli import main

if __name__ == "__main__":
    sys.exit(main())
