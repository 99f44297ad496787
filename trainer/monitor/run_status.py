"""`<run.dir>/status.json`: how the run's latest start stands or ended, for scripts and schedulers.

A launcher's exit status cannot always tell: `accelerate launch` (torchrun) exits 1 with a
`SignalException` traceback when it is sent SIGTERM, even after every worker wrote its stop
checkpoint and exited 0. The main process writes this file (atomically) when a start begins
(`running`), and when it ends: `finished`, `stopped` (a clean stop: resumable with the same command)
or `failed` (with the exit code and the error line). A file still saying `running` after the
processes are gone means a start that was killed (SIGKILL, a lost node): resume as usual.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from trainer.util.atomic import write_text_atomic

STATUS_FILE = "status.json"


class RunStatus:
    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / STATUS_FILE
        self.writing = False  # this process wrote `running`, so it owns the file until it ends

    def _write(self, state: str, **details: Any) -> None:
        record = {"state": state, **details, "host": socket.gethostname(), "pid": os.getpid()}
        record["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_text_atomic(self.path, json.dumps(record, indent=2) + "\n")

    def running(self, is_main_process: bool, step: int) -> None:
        if is_main_process:
            self._write("running", step=step)
            self.writing = True

    def ended(self, state: str, **details: Any) -> None:
        """finished | stopped (exit code 0) on the main process, once the run's last checkpoint is written."""
        if self.writing:
            self._write(state, exit_code=0, **details)
            self.writing = False

    def failed(self, exit_code: int, error: str) -> None:
        if self.writing:
            try:
                self._write("failed", exit_code=exit_code, error=error)
            except OSError:  # the disk that failed the run may fail this too: the error line says it all
                pass
            self.writing = False
