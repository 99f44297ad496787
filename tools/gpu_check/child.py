"""`python -m tools.gpu_check.child SPEC.json`: one check in its own process (see runner.py).

A module of its own, not runner.py's `__main__`: run as `__main__`, runner.py would be a second copy
of itself, and a check's `raise Skip(...)` (the imported copy's class) would not match its `except`.
"""

import sys

from tools.gpu_check.runner import child_main

if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1]))
