"""Where the trainer keeps what it can rebuild: packed datasets, reference statistics, classifier weights."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache_dir(kind: str) -> Path:
    """Default of data.cache_dir / eval.cache_dir: $XDG_CACHE_HOME (or ~/.cache)/dcgan-trainer/<kind>."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dcgan-trainer" / kind
