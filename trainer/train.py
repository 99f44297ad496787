"""Entry point: `accelerate launch trainer/train.py [--config FILE] [key=value ...]`.

Also `accelerate launch -m trainer.train ...`, and in one process `python trainer/train.py`,
`python -m trainer.train` or the console script `dcgan-train` (pyproject.toml). `--help` lists every
config key with its default and meaning; `--print-config` prints the resolved config and exits.
Reads the config, runs the loop, turns user errors into one line and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: import the package from the repository root, and keep trainer/ itself off
    # sys.path so its modules (data, models, ...) cannot shadow top-level packages.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from trainer.core.config import parse_args  # noqa: E402
from trainer.util.errors import RunError, UserError  # noqa: E402
from trainer.util.ranks import launch_rank  # noqa: E402


def _reports(exc: BaseException) -> bool:
    """The main process prints errors (they can come before the Accelerator exists: the launcher's RANK
    says which one it is); others reach it through trainer/util/ranks.py. Another process prints one
    only it can report (its node's preparation failed)."""
    return launch_rank() == 0 or getattr(exc, "report_here", False)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        from trainer.loop import train  # after config errors: they should not wait for torch imports

        train(cfg)
    except (UserError, RunError) as exc:
        if _reports(exc):
            print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
