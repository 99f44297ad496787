"""Regenerate the key tables of docs/configuration.md from the config schema.

    python -m tools.config_docs           # rewrite the generated part of the page in place
    python -m tools.config_docs --check   # exit 1 if the page differs from the schema (what the test checks)

The tables come from `trainer.core.config.describe_markdown`, i.e. from each key's `setting(default,
help, fixed_on_resume=...)`, the same text `--help` prints; the prose around them is written by hand.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.core.config import describe_markdown

PAGE = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
BEGIN = "<!-- generated from the schema (trainer/core/config.py) by `python -m tools.config_docs`: edit the schema, not this part -->"
END = "<!-- end of the generated part -->"


def render(page: str) -> str:
    """`page` with everything between the two markers replaced by the schema's tables."""
    if page.count(BEGIN) != 1 or page.count(END) != 1 or page.index(BEGIN) > page.index(END):
        raise SystemExit(f"{PAGE} must hold the markers once each, in order:\n{BEGIN}\n{END}")
    head, rest = page.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n\n{describe_markdown()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.config_docs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is stale; write nothing")
    args = parser.parse_args(argv)
    page = PAGE.read_text()
    fresh = render(page)
    if args.check:
        if fresh != page:
            print(f"{PAGE} is stale: run python -m tools.config_docs", file=sys.stderr)
            return 1
        return 0
    if fresh != page:
        PAGE.write_text(fresh)
        print(f"rewrote the key tables of {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
