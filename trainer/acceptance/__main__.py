"""`python -m trainer.acceptance`: see trainer/acceptance/cli.py."""

import sys

from trainer.acceptance.cli import main

if __name__ == "__main__":
    sys.exit(main())
