"""Generator weights as W&B model artifacts (`log.wandb_artifacts`), uploaded or referenced in place.

One artifact collection per W&B run, `generator-<run id>` (type `model`); each logged version holds
`generator.safetensors` (and `generator_ema.safetensors` with an EMA) plus the run's `config.yaml`,
and carries the model settings, step and FID in its metadata. Aliases: `best` on each new lowest FID
(W&B moves it to the newest version that claims it), `final` on the weights of a finished run,
`step-<N>` on every version, and W&B's own `latest`.

Storage (`log.wandb_artifact_storage`): `upload` copies the files to W&B; `reference` records
`file://` references (path, size, checksum) to the files where they are, which is what a run
directory on a filesystem shared by the cluster wants: nothing is copied, and anyone on the cluster
can `artifact.download()` them. `auto` references when `run.dir` is on a network or parallel
filesystem (NFS, Lustre, GPFS, BeeGFS, CephFS, ...; read from /proc/mounts) and uploads otherwise.
A referenced best checkpoint is removed by rotation once a better one replaces it: the `best` alias
then points at the newer one, and the older version's reference dangles.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Filesystem types (as /proc/mounts names them) that a cluster's nodes share.
SHARED_FILESYSTEMS = {
    "nfs",
    "nfs4",
    "lustre",
    "gpfs",
    "beegfs",
    "cifs",
    "smb3",
    "smbfs",
    "ceph",
    "fuse.ceph",
    "fuse.cephfs",
    "glusterfs",
    "fuse.glusterfs",
    "panfs",
    "wekafs",
    "orangefs",
    "pvfs2",
    "fuse.sshfs",
    "9p",
    "virtiofs",
}


def _unescape(field: str) -> str:
    """/proc/mounts writes spaces, tabs, newlines and backslashes in paths as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def filesystem_type(path: Path, mounts: str | None = None) -> str | None:
    """The type of the filesystem holding `path` (its longest mount-point prefix), or None if unknown."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None
    target, missing = Path(os.path.abspath(path)), []
    while not target.exists() and target != target.parent:  # run.dir may not exist yet
        target, missing = target.parent, [target.name, *missing]
    target = target.resolve().joinpath(*missing)  # symbolic links resolved where they exist
    best: tuple[int, str] | None = None
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        mount_point = Path(_unescape(parts[1]))
        if target == mount_point or mount_point in target.parents:
            depth = len(mount_point.parts)
            if best is None or depth >= best[0]:
                best = (depth, parts[2])
    return best[1] if best else None


def storage(setting: str, run_dir: Path, mounts: str | None = None) -> tuple[str, str]:
    """(upload | reference, why) for `log.wandb_artifact_storage`."""
    if setting != "auto":
        return setting, f"log.wandb_artifact_storage={setting}"
    kind = filesystem_type(run_dir, mounts)
    if kind in SHARED_FILESYSTEMS:
        return "reference", f"run.dir is on a shared filesystem ({kind})"
    return "upload", f"run.dir is on a local filesystem ({kind or 'unknown'})"


def artifact_name(run_id: str) -> str:
    return f"generator-{run_id}"


def build(
    wandb: Any, run_id: str, files: Mapping[str, Path], how: str, metadata: dict[str, Any], description: str
) -> Any:
    """A wandb.Artifact of type `model` holding `files` (name in the artifact -> path here)."""
    artifact = wandb.Artifact(artifact_name(run_id), type="model", description=description, metadata=metadata)
    for name, path in files.items():
        if how == "reference":
            artifact.add_reference(Path(path).resolve().as_uri(), name=name)
        else:
            artifact.add_file(str(path), name=name)
    return artifact
