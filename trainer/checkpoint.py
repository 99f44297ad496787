"""Atomic checkpoints: Accelerate's save_state/load_state plus a JSON train state.

Layout of `<run.dir>/checkpoints/`:

    step-00001000/            a complete checkpoint (only ever created by a rename)
        model.safetensors     G          (Accelerate)
        model_1.safetensors   D          (Accelerate)
        optimizer.bin, optimizer_1.bin, [scaler.pt], random_states_<rank>.pkl   (Accelerate)
        train_state.json      step, epoch, step in epoch, tracker run id, ...
        config.yaml           the resolved config of the run that wrote it
        manifest.json         size and sha256 of every file above; written last
        [generator_ema.safetensors]   EMA of G when train.ema_decay is set (trainer/ema.py)
    .tmp-step-00001500/       a save in progress, or one a crash interrupted: never loaded
    best.json                 the checkpoint with the best FID so far: rotation never removes it

A save writes into the temporary directory, fsyncs every file, writes the manifest, then renames
the directory: a crash at any point leaves either no `step-*` directory or a complete one.

The train state is JSON rather than an object registered with `accelerator.register_for_checkpointing`
because Accelerate reloads registered objects with `torch.load(weights_only=False)`, i.e. pickle,
which can run code. Everything else Accelerate loads with safetensors or `weights_only=True`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import shutil
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from accelerate.utils import load as accelerate_load

from trainer.config import Config, to_yaml
from trainer.errors import CheckpointError, CheckpointWriteError

CHECKPOINT_RE = re.compile(r"^step-(\d{8})$")
MANIFEST = "manifest.json"
TRAIN_STATE = "train_state.json"
BEST = "best.json"
FORMAT_VERSION = 1


@dataclass
class TrainState:
    """Where training stands; everything else needed to resume lives in Accelerate's files.

    The noise of step s on rank r is drawn from a generator seeded by (run.seed, r, s), so no RNG
    state needs saving for exact resume.
    """

    step: int = 0  # optimizer steps done (one D and one G update each)
    epoch: int = 0  # current epoch
    step_in_epoch: int = 0  # steps of `epoch` already done
    global_batch: int = 0
    tracker_run_id: str | None = None
    skipped_steps_d: int = 0  # fp16 steps the grad scaler skipped (overflow)
    skipped_steps_g: int = 0
    rollbacks: int = 0  # reloads after non-finite losses (train.on_nonfinite=rollback)

    @property
    def images_seen(self) -> int:
        return self.step * self.global_batch

    def to_json(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path) -> str | None:
    """None if the checkpoint at `path` is complete and intact, else what is wrong with it."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "no manifest.json (an interrupted save?)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        return "manifest.json is unreadable"
    for name, meta in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != meta["size"]:
            return f"{name} has {file.stat().st_size} bytes, expected {meta['size']}"
        if _sha256(file) != meta["sha256"]:
            return f"{name} does not match its checksum"
    return None


def _free_name(path: Path, tag: str) -> Path:
    """`step-00000020.damaged`, or `.damaged-2`, ...: a name that no checkpoint pattern matches."""
    candidate, n = path.with_name(f"{path.name}.{tag}"), 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{tag}-{n}")
    return candidate


class Checkpointer:
    def __init__(self, run_dir: Path, accelerator: Accelerator, keep: int) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.accelerator = accelerator
        self.keep = keep
        self.last_saved_step: int | None = None

    def complete(self) -> list[Path]:
        """Complete-looking checkpoints (renamed into place), oldest first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
        return [p for _, p in sorted(found)]

    def newest(self) -> Path | None:
        found = self.complete()
        return found[-1] if found else None

    # ---- save -----------------------------------------------------------------------------
    def save(self, state: TrainState, cfg: Config) -> Path:
        """Collective: every rank must call it. Returns the final checkpoint directory."""
        final = self.dir / f"step-{state.step:08d}"
        if self.last_saved_step == state.step:
            return final
        tmp = self.dir / f".tmp-{final.name}"
        acc = self.accelerator
        if acc.is_main_process:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by a crash during an earlier save of this step
                shutil.rmtree(tmp)
        acc.wait_for_everyone()
        try:
            acc.save_state(str(tmp))
            acc.wait_for_everyone()  # every rank's RNG file is written
            if acc.is_main_process:
                self._finish(tmp, final, state, cfg)
        except Exception as exc:  # disk full, quota, I/O error: keep what is complete, stop clearly
            # Writers report a full disk differently (OSError, SafetensorError, torch's RuntimeError
            # "unexpected pos"), so catch them all; a partial .tmp dir is never loadable anyway.
            shutil.rmtree(tmp, ignore_errors=True)
            newest = self.newest()
            free = shutil.disk_usage(self.dir).free if self.dir.exists() else 0
            needed = sum(f.stat().st_size for f in newest.iterdir()) if newest else 0
            reason = (getattr(exc, "strerror", None) or str(exc) or type(exc).__name__).splitlines()[0][:200]
            if free < needed:  # torch.save reports a full disk as "unexpected pos": say it plainly
                reason = f"the disk is full: {free / 2**20:.1f} MiB free, a checkpoint takes {needed / 2**20:.1f} MiB; {reason}"
            raise CheckpointWriteError(
                f"could not write checkpoint {final.name} in {self.dir} ({reason}); "
                f"earlier checkpoints are intact (newest: {newest.name if newest else 'none'}). "
                "Free space or fix the storage, then run the same command to resume"
            ) from None
        acc.wait_for_everyone()
        self.last_saved_step = state.step
        return final

    def _finish(self, tmp: Path, final: Path, state: TrainState, cfg: Config) -> None:
        """Main process: train state, config, fsync, manifest last, then the atomic rename."""
        (tmp / TRAIN_STATE).write_text(json.dumps(state.to_json(), indent=2))
        (tmp / "config.yaml").write_text(to_yaml(cfg))
        files = {}
        for file in sorted(p for p in tmp.iterdir() if p.is_file()):
            _fsync_file(file)
            files[file.name] = {"size": file.stat().st_size, "sha256": _sha256(file)}
        manifest = tmp / MANIFEST
        manifest.write_text(
            json.dumps({"format_version": FORMAT_VERSION, "step": state.step, "files": files}, indent=2)
        )
        _fsync_file(manifest)
        _fsync_dir(tmp)
        if final.exists():  # cannot happen through `find_resume_point`; never overwrite one
            aside = _free_name(final, "superseded")
            warnings.warn(f"{final} already exists; it is kept as {aside}", stacklevel=2)
            os.replace(final, aside)
        os.replace(tmp, final)
        _fsync_dir(self.dir)
        self._rotate()

    def _rotate(self) -> None:
        best = (self.best() or {}).get("checkpoint")
        for old in self.complete()[: -self.keep]:
            if old.name != best:  # the best checkpoint is kept beside the newest ones
                shutil.rmtree(old, ignore_errors=True)

    # ---- best checkpoint (lowest FID) -------------------------------------------------------
    def best(self) -> dict[str, Any] | None:
        """The best checkpoint's record ({"checkpoint": "step-...", "step": ..., "fid": ...}), if any."""
        try:
            return json.loads((self.dir / BEST).read_text())
        except (OSError, ValueError):
            return None

    def keep_if_best(self, state: TrainState, cfg: Config, fid: float, details: dict[str, Any]) -> bool:
        """Collective. If `fid` beats the best so far: checkpoint this step (if not saved already),
        record it in best.json (atomically) and let the previous best go. Returns whether it did."""
        acc = self.accelerator
        decision = [False]
        if acc.is_main_process:
            best_fid = (self.best() or {}).get("fid")
            # A record without a finite FID (NaN written by an older version, null, a string) is no
            # best at all: `fid < nan` is always false and would block every later finite FID.
            has_best = isinstance(best_fid, (int, float)) and math.isfinite(best_fid)
            decision[0] = math.isfinite(fid) and (not has_best or fid < best_fid)
        broadcast_object_list(decision)
        if not decision[0]:
            return False
        path = self.save(state, cfg)
        if acc.is_main_process:
            tmp = self.dir / f".tmp-{BEST}"
            tmp.write_text(json.dumps({"checkpoint": path.name, "step": state.step, "fid": fid, **details}, indent=2))
            _fsync_file(tmp)
            os.replace(tmp, self.dir / BEST)
            _fsync_dir(self.dir)
            self._rotate()
        acc.wait_for_everyone()
        return True

    # ---- resume ---------------------------------------------------------------------------
    def find_resume_point(self, resume: str, cfg: Config) -> Path | None:
        """Which checkpoint to start from, decided on the main process and shared with all ranks.

        Refuses (CheckpointError) before anything is written: an incompatible or incomplete
        checkpoint, `never` over existing checkpoints, or forking a run in place.
        """
        choice: list[Any] = [None]
        if self.accelerator.is_main_process:
            try:
                choice[0] = self._choose(resume)
                if choice[0] is not None:
                    _check_compatible(Path(choice[0]), cfg)
                    _check_no_code_in_pickles(Path(choice[0]))
            except CheckpointError as exc:
                choice[0] = exc
        broadcast_object_list(choice)
        if isinstance(choice[0], CheckpointError):
            raise choice[0]
        return Path(choice[0]) if choice[0] else None

    def _choose(self, resume: str) -> str | None:
        if resume == "never":
            existing = self.complete()
            if existing:
                raise CheckpointError(
                    f"run.resume=never but {self.dir} already holds checkpoints (newest {existing[-1].name}); "
                    "use run.resume=auto to continue that run, or a new run.name / run.dir to start another"
                )
            return None
        if resume == "auto":
            damaged: list[tuple[Path, str]] = []
            for candidate in reversed(self.complete()):
                problem = verify(candidate)
                if problem is None:
                    for bad, why in damaged:
                        # Renamed, never deleted: out of the way of resume, rotation and later saves.
                        aside = _free_name(bad, "damaged")
                        os.replace(bad, aside)
                        warnings.warn(
                            f"checkpoint {bad} is damaged ({why}); kept as {aside}, resuming from {candidate.name}",
                            stacklevel=2,
                        )
                    return str(candidate)
                damaged.append((candidate, problem))
            if damaged:
                listed = "; ".join(f"{p.name}: {why}" for p, why in damaged[:3])
                raise CheckpointError(
                    f"every checkpoint in {self.dir} is damaged ({listed}); nothing was changed. "
                    "Restore one from a copy, or start over in a new run.dir"
                )
            return None
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(
                f"run.resume={resume!r} is not a directory; give a checkpoint directory, auto or never"
            )
        problem = verify(path)
        if problem:
            raise CheckpointError(f"run.resume={resume!r} is not a complete checkpoint: {problem}")
        newer = (
            [p for p in self.complete() if p.name > path.name] if path.resolve().parent == self.dir.resolve() else []
        )
        if newer:
            raise CheckpointError(
                f"run.resume={resume!r} is older than {newer[-1].name} in the same run; continuing from it here "
                f"would mix two histories. Start a new run from it: run.dir=<new dir> run.resume={resume}"
            )
        return str(path)

    def load(self, path: Path) -> TrainState:
        """Collective. Restores models, optimizers, scaler and RNG; returns the train state."""
        state = TrainState.from_json(json.loads((path / TRAIN_STATE).read_text()))
        try:
            self.accelerator.load_state(str(path))
        except Exception as exc:  # safetensors/torch errors: shape mismatch, unsafe pickle, truncation
            raise CheckpointError(f"cannot load {path}: {str(exc).splitlines()[0]}") from None
        self.last_saved_step = state.step
        return state


def _check_no_code_in_pickles(path: Path) -> None:
    """Refuse a checkpoint whose pickled files hold anything but tensors and plain data.

    Accelerate already loads optimizer and scaler states with `weights_only=True`, but it swallows
    any error while loading RNG states; this check covers every pickle file, up front, so a
    tampered checkpoint is refused with a clear error instead of being half loaded.
    """
    for file in sorted(path.iterdir()):
        if file.suffix in (".bin", ".pkl", ".pt", ".pth"):
            try:
                accelerate_load(file, map_location="cpu")  # weights_only=True, numpy RNG arrays allowed
            except pickle.UnpicklingError as exc:
                reason = str(exc).strip().splitlines()[-1][:200]
                raise CheckpointError(
                    f"refusing to load {file}: it holds pickled objects that could run code ({reason}); "
                    "only load checkpoints written by this trainer"
                ) from None


def _check_compatible(path: Path, cfg: Config) -> None:
    from omegaconf import OmegaConf

    data = json.loads((path / TRAIN_STATE).read_text())
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has train-state format {data.get('format_version')}; this trainer reads {FORMAT_VERSION}"
        )
    state = TrainState.from_json(data)
    saved = OmegaConf.load(path / "config.yaml")
    mismatched = [
        f"model.{k}: checkpoint {saved.model[k]}, this run {getattr(cfg.model, k)}"
        for k in ("resolution", "nz", "ngf", "ndf")
        if saved.model[k] != getattr(cfg.model, k)
    ]
    if mismatched:
        raise CheckpointError(
            f"{path} was trained with a different model ({'; '.join(mismatched)}); "
            "use the checkpoint's model settings or start a new run.dir"
        )
    if state.global_batch != cfg.train.batch_size:
        raise CheckpointError(
            f"{path} was trained with train.batch_size={state.global_batch} but this run has {cfg.train.batch_size}; "
            "resuming mid-epoch needs the same global batch (set it back, or start a new run.dir)"
        )
