"""Read W&B offline runs back (`<run.dir>/wandb/offline-run-*/run-<id>.wandb`), for tests.

wandb 0.31 no longer ships a Python reader for these files (`wandb.sdk.internal.datastore` is
gone; its Go core reads them), so this follows the file format: a 7-byte header (":W&B", magic,
version), then LevelDB log records in 32 KiB blocks (crc32, length, type; type 1 a whole record,
2/3/4 the first/middle/last piece of one), each a serialized `wandb.proto` Record. A run killed
mid-write may end in a partial record: it is dropped.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
RECORD_HEADER = 7  # crc32 (4), length (2), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(path: Path):
    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a W&B transaction log"
    pos, pieces = 7, []
    while pos + RECORD_HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < RECORD_HEADER:  # block trailer
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + RECORD_HEADER])
        if kind == 0:  # zero padding up to the end of the block
            pos += left_in_block
            continue
        end = pos + RECORD_HEADER + length
        if end > len(data):  # cut short by a kill
            return
        chunk = data[pos + RECORD_HEADER : end]
        pos = end
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pieces = [chunk]
        elif kind == MIDDLE:
            pieces.append(chunk)
        elif kind == LAST:
            yield b"".join([*pieces, chunk])


@dataclass
class OfflineRun:
    run_id: str = ""
    project: str = ""
    name: str = ""
    group: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per W&B step, in order
    step_metrics: dict[str, str] = field(default_factory=dict)  # define_metric: name or glob -> its x-axis
    summaries: dict[str, list[str]] = field(default_factory=dict)  # define_metric: name -> summary aggregates
    summary: dict[str, Any] = field(default_factory=dict)  # the run summary as its last updates left it
    artifacts: list[dict[str, Any]] = field(default_factory=list)  # logged artifacts: name, type, aliases, files
    exit_code: int | None = None
    sweep_id: str = ""  # the sweep of a run started by a W&B agent
    preempting: bool = False  # run.mark_preempting() was called: W&B requeues the run if it ends non-zero

    def rows_with(self, key: str) -> list[dict[str, Any]]:
        return [row for row in self.history if key in row]


def _set(target: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        target = target.setdefault(key, {})
    target[keys[-1]] = value


def read_offline_run(path: Path) -> OfflineRun:
    """Everything the tests look at in one `.wandb` file."""
    run = OfflineRun()
    for payload in _payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.run_id, run.project, run.name, run.group = r.run_id, r.project, r.display_name, r.run_group
            run.sweep_id = r.sweep_id
            run.tags = list(r.tags)
            for item in r.config.update:
                _set(run.config, [item.key] if item.key else list(item.nested_key), json.loads(item.value_json))
        elif kind == "config":
            for item in record.config.update:
                _set(run.config, [item.key] if item.key else list(item.nested_key), json.loads(item.value_json))
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set(row, [item.key] if item.key else list(item.nested_key), json.loads(item.value_json))
            run.history.append(row)
        elif kind == "metric":
            m = record.metric
            run.step_metrics[m.name or m.glob_name] = m.step_metric
            ops = [op for op in ("min", "max", "mean", "last", "first", "none") if getattr(m.summary, op, False)]
            if ops:
                run.summaries[m.name] = ops
        elif kind == "summary":
            for item in record.summary.update:
                _set(run.summary, [item.key] if item.key else list(item.nested_key), json.loads(item.value_json))
        elif kind == "artifact":
            a = record.artifact
            files = {entry.path: {"ref": entry.ref, "size": entry.size} for entry in a.manifest.contents}
            metadata = json.loads(a.metadata) if a.metadata else {}
            run.artifacts.append(
                {"name": a.name, "type": a.type, "aliases": list(a.aliases), "files": files, "metadata": metadata}
            )
        elif kind == "preempting":
            run.preempting = True
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def offline_run_files(run_dir: Path) -> list[Path]:
    """The `.wandb` files of every start of the run, oldest first (directory names start with the time)."""
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)
