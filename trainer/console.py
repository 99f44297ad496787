"""Console output from the main process only; other ranks stay quiet unless something is wrong."""

from __future__ import annotations

import sys
from typing import Any

from accelerate import Accelerator
from rich.console import Console as RichConsole
from rich.syntax import Syntax


class Console:
    def __init__(self, accelerator: Accelerator) -> None:
        self.enabled = accelerator.is_main_process
        # Without a terminal (Slurm logs, pipes) rich writes plain text, no control sequences.
        self._rich = RichConsole(file=sys.stdout, highlight=False, soft_wrap=True)

    def print(self, *objects: Any, **kwargs: Any) -> None:
        if self.enabled:
            kwargs.setdefault("markup", False)  # log text such as "betas=[0.5, 0.999]" is not markup
            self._rich.print(*objects, **kwargs)

    def config(self, yaml_text: str) -> None:
        if self.enabled:
            self._rich.rule("resolved config")
            self._rich.print(Syntax(yaml_text.rstrip(), "yaml", theme="ansi_dark", background_color="default"))
            self._rich.rule()


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
