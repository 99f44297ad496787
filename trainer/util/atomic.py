"""Atomic publication of files and directories: a reader sees the old version or the new one, never a part.

Every output of a run goes through here (checkpoints, best.json, config.yaml, sample grids, final
weights, the packed dataset, reference statistics, sampled images), so all of them behave the same:
write under a temporary name in the same directory, fsync, rename into place, fsync the directory
(otherwise a crash can lose the rename itself).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(path: Path) -> Path:
    """A sibling name no other writer uses: host and pid, since nodes share filesystems."""
    return path.with_name(f".tmp-{socket.gethostname()}-{os.getpid()}-{path.name}")


def write_atomic(path: Path, write: Callable[[Path], None], *, exclusive: bool = False) -> bool:
    """Publish `path` with the content `write(tmp)` puts in a temporary file. Returns whether this call published it.

    `exclusive`: never replace an existing `path`, because another process (another node, on a shared
    filesystem) may have it memory-mapped and replacing it under a reader is not safe everywhere.
    The file is then published with a hard link, which fails if `path` exists; "already there" is
    success (returns False) since the content is keyed by its name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        write(tmp)
        fsync_file(tmp)
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            except OSError:  # a filesystem without hard links: a rename that checks first (tiny race window)
                if path.exists():
                    return False
                os.replace(tmp, path)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def publish_dir(tmp: Path, final: Path) -> None:
    """fsync every file in the directory `tmp` and `tmp` itself, then rename it to `final` (which must not exist)."""
    for file in tmp.iterdir():
        if file.is_file():
            fsync_file(file)
    fsync_dir(tmp)
    os.rename(tmp, final)  # a directory rename fails rather than replace a non-empty `final`
    fsync_dir(final.parent)
