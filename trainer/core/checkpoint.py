"""Atomic checkpoints: Accelerate's save_state/load_state plus a JSON train state.

Layout of `<run.dir>/checkpoints/`:

    step-00001000/            a complete checkpoint (only ever created by a rename)
        model.safetensors     G          (Accelerate)
        model_1.safetensors   D          (Accelerate)
        optimizer.bin, optimizer_1.bin, [scaler.pt], random_states_<rank>.pkl   (Accelerate)
        train_state.json      step, epoch, step in epoch, tracker run id, ...
        config.yaml           the resolved config of the run that wrote it
        manifest.json         size and sha256 of every file above; written last
        [generator_ema.safetensors]   EMA of G when train.ema_decay is set (trainer/core/ema.py)
    .tmp-step-00001500/       a save in progress, or one a crash interrupted: never loaded
    best.json                 the checkpoint with the best FID so far: rotation never removes it

`manifest.json` also says what each file holds ("holds": G weights, D weights, G's Adam state, ...).

Beside `checkpoints/`, `generator.safetensors` (and `generator_ema.safetensors`, `discriminator.safetensors`)
are the newest checkpoint's weights as plain files, with the model settings and the step in their
metadata: every checkpoint refreshes them right after it is published (a crash in between leaves them
one checkpoint behind, and their `step` says so). `python -m trainer.export` writes the same files
from any checkpoint. This module owns every name above; the tools (evaluate, sample, export) find
checkpoints and generators through it.

A save writes into the temporary directory, fsyncs every file, writes the manifest, then renames
the directory: a crash at any point leaves either no `step-*` directory or a complete one.

The train state is JSON rather than an object registered with `accelerator.register_for_checkpointing`
because Accelerate reloads registered objects with `torch.load(weights_only=False)`, i.e. pickle,
which can run code. Everything else Accelerate loads with safetensors or `weights_only=True`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import load as accelerate_load
from safetensors.torch import load_file, save_file

from trainer.core.config import Config, ModelConfig, fixed_on_resume, flatten, load_config, to_dict, to_yaml
from trainer.core.models import Generator
from trainer.util.atomic import publish_dir, write_atomic, write_text_atomic
from trainer.util.errors import CheckpointError, CheckpointWriteError
from trainer.util.ranks import every_rank, main_decides

CHECKPOINT_RE = re.compile(r"^step-(\d{8})$")
MANIFEST = "manifest.json"
TRAIN_STATE = "train_state.json"
BEST = "best.json"
CONFIG = "config.yaml"
GENERATOR_FILE = "model.safetensors"  # Accelerate's name for the first prepared model: G (see loop.py)
DISCRIMINATOR_FILE = "model_1.safetensors"  # the second: D
EMA_FILE = "generator_ema.safetensors"  # written by trainer.core.ema's save hook
FINAL_GENERATOR = "generator.safetensors"  # the exports beside checkpoints/ (export_checkpoint)
FINAL_DISCRIMINATOR = "discriminator.safetensors"
FORMAT_VERSION = 1
MISNAMED = "named for another step"
# What each file of a checkpoint holds, for people reading manifest.json (Accelerate names them by
# the order the loop prepares G, D, G's optimizer, D's optimizer).
HOLDS = {
    GENERATOR_FILE: "G (generator) weights and BatchNorm statistics",
    DISCRIMINATOR_FILE: "D (discriminator) weights and BatchNorm statistics",
    "optimizer.bin": "G's Adam state",
    "optimizer_1.bin": "D's Adam state",
    EMA_FILE: "EMA of G's weights (train.ema_decay)",
    "scaler.pt": "fp16 grad scaler state",
    TRAIN_STATE: "step, epoch, position in the epoch, W&B run, ...",
    CONFIG: "the resolved config of the run that wrote it",
}


@dataclass
class TrainState:
    """Where training stands; everything else needed to resume lives in Accelerate's files.

    The noise of step s is drawn from a generator seeded by (run.seed, s) for the whole global batch
    (each rank takes its slice), so no RNG state needs saving for exact resume.
    """

    step: int = 0  # optimizer steps done (one D and one G update each)
    epoch: int = 0  # current epoch
    step_in_epoch: int = 0  # steps of `epoch` already done
    global_batch: int = 0
    tracker_run_id: str | None = None
    skipped_steps_d: int = 0  # fp16 steps the grad scaler skipped (overflow)
    skipped_steps_g: int = 0
    rollbacks: int = 0  # reloads after non-finite losses (train.on_nonfinite=rollback)
    precision: str | None = None  # the resolved train.mixed_precision (no | fp16 | bf16) that wrote it
    num_processes: int | None = None  # the processes that wrote it (None: written before this was recorded)
    sync_bn: bool | None = None  # whether they normalised BatchNorm over the global batch (SyncBatchNorm)
    evaluation_due: bool = False  # a stop saved this step before its due evaluation: the resume does it first
    tracker_run_name: str | None = None  # the W&B run's name and group, decided at its first start
    tracker_group: str | None = None
    slurm_jobs: list[dict[str, Any]] = field(default_factory=list)  # the Slurm job of every start, in order

    @property
    def images_seen(self) -> int:
        return self.step * self.global_batch

    def to_json(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


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
    named = CHECKPOINT_RE.match(path.name)
    if named and manifest.get("step") != int(named.group(1)):
        return f"{MISNAMED}: its manifest is of step {manifest.get('step')} (renamed or copied by hand?)"
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


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete-looking checkpoints in a `checkpoints/` directory (renamed into place), oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def read_best(directory: Path) -> dict[str, Any] | None:
    """The best checkpoint's record ({"checkpoint": "step-...", "step": ..., "fid": ...}) in `directory`, if any.

    A record without a finite FID (written by an older version) counts as none.
    """
    try:
        record = json.loads((directory / BEST).read_text())
    except (OSError, ValueError):
        return None
    # NaN (written by an older version), null or a string is no best at all: `fid < nan` is always
    # false and would block every later finite FID.
    fid = record.get("fid") if isinstance(record, dict) else None
    return record if isinstance(fid, (int, float)) and math.isfinite(fid) else None


class Checkpointer:
    def __init__(self, run_dir: Path, accelerator: Accelerator, keep: int) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.accelerator = accelerator
        self.keep = keep
        self.last_saved_step: int | None = None

    def complete(self) -> list[Path]:
        """Complete-looking checkpoints (renamed into place), oldest first."""
        return complete_checkpoints(self.dir)

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
            # Every rank writes its own files (RNG state); a failure on any rank stops them all alike.
            every_rank(acc, lambda: acc.save_state(str(tmp)))
            main_decides(acc, lambda: self._finish(tmp, final, state, cfg))
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
        self.last_saved_step = state.step
        return final

    def _finish(self, tmp: Path, final: Path, state: TrainState, cfg: Config) -> None:
        """Main process: train state, config, fsync, manifest last, then the atomic rename."""
        (tmp / TRAIN_STATE).write_text(json.dumps(state.to_json(), indent=2))
        (tmp / CONFIG).write_text(to_yaml(cfg))
        files = {
            file.name: {"size": file.stat().st_size, "sha256": _sha256(file), "holds": _holds(file.name)}
            for file in sorted(p for p in tmp.iterdir() if p.is_file())
        }
        (tmp / MANIFEST).write_text(
            json.dumps({"format_version": FORMAT_VERSION, "step": state.step, "files": files}, indent=2)
        )
        if final.exists():
            # Unreachable with one writer per run directory (the run lock) and the resume rules;
            # never overwrite a complete checkpoint, never keep an unbounded pile of copies.
            raise OSError(f"{final} already exists")
        publish_dir(tmp, final)
        export_checkpoint(final, self.dir.parent, cfg.model, state.step)  # the run root's weights: this step's
        self._rotate()

    def _rotate(self) -> None:
        best = (self.best() or {}).get("checkpoint")
        for old in self.complete()[: -self.keep]:
            if old.name != best:  # the best checkpoint is kept beside the newest ones
                shutil.rmtree(old, ignore_errors=True)

    # ---- best checkpoint (lowest FID) -------------------------------------------------------
    def best(self) -> dict[str, Any] | None:
        """The best checkpoint's record ({"checkpoint": "step-...", "step": ..., "fid": ...}), if any."""
        return read_best(self.dir)

    def keep_if_best(self, state: TrainState, cfg: Config, fid: float, details: dict[str, Any]) -> bool:
        """Collective. If `fid` beats the best so far: checkpoint this step (if not saved already),
        record it in best.json (atomically) and let the previous best go. Returns whether it did."""
        acc = self.accelerator
        best = main_decides(acc, self.best)
        if not (math.isfinite(fid) and (best is None or fid < best["fid"])):
            return False
        path = self.save(state, cfg)

        def record() -> None:
            best = {"checkpoint": path.name, "step": state.step, "fid": fid, **details}
            write_text_atomic(self.dir / BEST, json.dumps(best, indent=2))
            self._rotate()

        main_decides(acc, record)  # a failed write stops every rank, not the main process alone
        return True

    # ---- resume ---------------------------------------------------------------------------
    def find_resume_point(self, resume: str, cfg: Config, sync_bn: bool = False) -> Path | None:
        """Which checkpoint to start from, decided on the main process and shared with all ranks.

        Refuses (CheckpointError) before anything is written: an incompatible or incomplete
        checkpoint, `never` over existing checkpoints, forking a run in place, or another number of
        processes that changes the training (`sync_bn`: this run uses SyncBatchNorm).
        """

        def decide() -> str | None:
            choice = self._choose(resume)
            if choice is not None:
                _check_compatible(Path(choice), cfg, self.accelerator.mixed_precision)
                _check_process_count(Path(choice), cfg, self.accelerator.num_processes, sync_bn)
                _check_no_code_in_pickles(Path(choice))
            return choice

        choice = main_decides(self.accelerator, decide)
        return Path(choice) if choice else None

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
                        # Renamed, never deleted: out of the way of resume, rotation and later saves
                        # (a misnamed one would otherwise be resumed by its name and block that name's save).
                        aside = _free_name(bad, "misnamed" if why.startswith(MISNAMED) else "damaged")
                        os.replace(bad, aside)
                        what = "is " + why if why.startswith(MISNAMED) else f"is damaged ({why})"
                        warnings.warn(
                            f"checkpoint {bad} {what}; kept as {aside}, resuming from {candidate.name}",
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
        """Collective. Restores models, optimizers, scaler and RNG; returns the train state.

        Every rank reads the files itself; if any rank cannot, every rank stops with its message.
        """

        def restore() -> TrainState:
            try:
                state = TrainState.from_json(json.loads((path / TRAIN_STATE).read_text()))
                self.accelerator.load_state(str(path))
            except Exception as exc:  # safetensors/torch errors: shape mismatch, unsafe pickle, truncation
                raise CheckpointError(f"cannot load {path}: {(str(exc).splitlines() or [''])[0]}") from None
            return state

        state = every_rank(self.accelerator, restore)
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


def _check_compatible(path: Path, cfg: Config, precision: str) -> None:
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
    if state.precision not in (None, precision) and precision == "fp16":
        # bf16 <-> fp32 resumes exactly (weights and Adam states are fp32 either way); fp16 needs the
        # grad scaler's state, which only an fp16 checkpoint holds.
        raise CheckpointError(
            f"{path} was trained with precision {state.precision}, and this run uses fp16, whose grad scaler "
            f"state it does not hold; resume with train.mixed_precision={state.precision} or start a new run.dir"
        )
    if state.global_batch != cfg.train.batch_size:
        raise CheckpointError(
            f"{path} was trained with train.batch_size={state.global_batch} but this run has {cfg.train.batch_size}; "
            "resuming mid-epoch needs the same global batch (set it back, or start a new run.dir)"
        )
    _check_config_changes(path, OmegaConf.to_container(saved, resolve=True), cfg)


def _processes(n: int) -> str:
    return f"{n} process" + ("" if n == 1 else "es")


def _check_process_count(path: Path, cfg: Config, processes: int, sync_bn: bool) -> None:
    """Another number of processes than the checkpoint's: the data order and the noise are the same for
    any count (global batches, noise per global batch), so only BatchNorm can tell. Over the global
    batch in both runs (SyncBatchNorm, or one process) training continues as it would have, up to the
    order of floating-point sums: a note. Per process in either, its statistics come from another
    share of the batch, a trajectory change like any other: refused unless run.resume_changes=allow."""
    state = TrainState.from_json(json.loads((path / TRAIN_STATE).read_text()))
    before = state.num_processes
    if before is None or before == processes:
        return
    global_bn = (bool(state.sync_bn) or before == 1, sync_bn or processes == 1)
    counts = f"{path} was written by {_processes(before)}, this run has {processes}"
    if all(global_bn):
        print(
            f"note: {counts}; BatchNorm statistics are over the global batch in both (SyncBatchNorm or one "
            "process), so training continues as it would have, up to the order of floating-point sums",
            flush=True,
        )
        return
    why = (
        "each process normalises BatchNorm over its own share of the batch (no SyncBatchNorm), so its "
        "statistics, and the training, change with the number of processes"
    )
    if cfg.run.resume_changes != "allow":
        raise CheckpointError(
            f"{counts}: {why}. Resume with {before} processes, or continue with {processes} anyway with "
            "run.resume_changes=allow"
        )
    print(f"resuming with another number of processes (run.resume_changes=allow): {counts}; {why}", flush=True)


RESUME_KEYS = ("run.resume", "run.resume_changes")  # how to resume, not what: never reported as changes


def config_changes(saved: Mapping[str, Any], cfg: Config) -> list[tuple[str, Any, Any]]:
    """(key, the checkpoint's value, this run's) for every key that differs, in schema order.

    A trajectory key the checkpoint lacks (written before the key existed) had its default's
    behaviour there (a new key keeps the old behaviour by default, e.g. train.loss=bce), so it is
    compared with the default; other keys only one side has are not compared.
    """
    old, new = flatten(saved), flatten(to_dict(cfg))
    default = flatten(to_dict(Config()))
    for key in new.keys() - old.keys():
        if fixed_on_resume(key) and key in default:
            old[key] = default[key]
    return [
        (key, old[key], value)
        for key, value in new.items()
        if key in old and old[key] != value and key not in RESUME_KEYS
    ]


def _check_config_changes(path: Path, saved: Mapping[str, Any], cfg: Config) -> None:
    """Print what a resume changes; refuse changes to trajectory keys unless run.resume_changes=allow.

    Which keys change the trajectory (model, data, optimiser, precision, seed) is declared in the
    schema (`fixed_on_resume`); schedule, logging, checkpoint and evaluation keys may change freely.
    """
    changes = config_changes(saved, cfg)
    if not changes:
        return

    def listing(items: list[tuple[str, Any, Any]]) -> str:
        return "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in items)

    fixed = [change for change in changes if fixed_on_resume(change[0])]
    free = [change for change in changes if not fixed_on_resume(change[0])]
    if fixed and cfg.run.resume_changes != "allow":
        also = f" (also changed, allowed: {listing(free)})" if free else ""
        raise CheckpointError(
            f"resuming {path} with a config that changes the training trajectory: {listing(fixed)}{also}. "
            "Set them back to continue this run, start a new one (run.name=<new name>), or resume with the "
            "changes anyway with run.resume_changes=allow"
        )
    allowed = " (run.resume_changes=allow)" if fixed else ""
    print(f"resuming {path} with config changes{allowed}: {listing(changes)}", flush=True)


# ---- what the tools read: a run's checkpoints and generators ---------------------------------------
def run_dir_of(checkpoint: Path) -> Path:
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def find_checkpoint(target: str, best: bool = False) -> Path:
    """`target` itself if it is a checkpoint; in a run directory its newest intact checkpoint, or with
    `best` the one with the lowest FID. Raises CheckpointError. Reads only: never renames or writes."""
    path = Path(target)
    usage = "give a run directory (runs/<name>) or a checkpoint (runs/<name>/checkpoints/step-XXXXXXXX)"
    directory = path / "checkpoints"
    if (path / MANIFEST).is_file():
        if best:
            raise CheckpointError(f"--best needs a run directory, and {target} is a checkpoint; drop --best")
        checkpoint = path
    elif directory.is_dir() and best:
        record = read_best(directory)
        if record is None:
            raise CheckpointError(
                f"{directory} has no best checkpoint record ({BEST}): the run evaluated nothing "
                "(eval.every_epochs / eval.every_steps); drop --best"
            )
        checkpoint = directory / record["checkpoint"]
    elif directory.is_dir():
        intact = [p for p in complete_checkpoints(directory) if verify(p) is None]
        if not intact:
            raise CheckpointError(f"{directory} holds no complete checkpoint; {usage}")
        checkpoint = intact[-1]
    else:
        raise CheckpointError(f"{target} is neither a run directory nor a checkpoint; {usage}")
    problem = verify(checkpoint)
    if problem:
        raise CheckpointError(f"checkpoint {checkpoint} is damaged ({problem}); pick another one")
    return checkpoint


def load_generator(checkpoint: Path, model: ModelConfig, raw: bool = False) -> tuple[Generator, str]:
    """(generator in eval mode on the CPU, "ema" or "raw"): the EMA weights if the checkpoint has them
    and `raw` is not asked for."""
    use_ema = not raw and (checkpoint / EMA_FILE).is_file()
    generator = Generator(model.nz, model.ngf, model.resolution)
    generator.load_state_dict(load_file(str(checkpoint / (EMA_FILE if use_ema else GENERATOR_FILE))))
    return generator.eval().requires_grad_(False), "ema" if use_ema else "raw"


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """`target`, `--best` and `--raw` of the tools (evaluate, sample), as `find_checkpoint` and `load_generator` take them."""
    parser.add_argument("target", help="a run directory (its newest checkpoint) or a checkpoint directory")
    parser.add_argument("--best", action="store_true", help="the run's best checkpoint (lowest FID) instead")
    parser.add_argument("--raw", action="store_true", help="the raw generator even if the checkpoint has an EMA")


def checkpoint_config(checkpoint: Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The config the checkpoint was trained with, plus `key=value` overrides (e.g. eval.num_samples=50000)."""
    return load_config(str(checkpoint / CONFIG), overrides)


def _export_state(state: dict[str, Any], path: Path, model_cfg: ModelConfig, step: int) -> None:
    metadata = {"model": json.dumps(vars(model_cfg)), "step": str(step), "format": "pt"}
    write_atomic(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))


def _holds(name: str) -> str:
    if name.startswith("random_states_"):
        return f"RNG state of process {name.removeprefix('random_states_').split('.')[0]}"
    return HOLDS.get(name, "")


def weight_files(checkpoint: Path) -> dict[str, Path]:
    """Every network's weights in the checkpoint, under their exported names: G, its EMA, D."""
    return {**generator_files(checkpoint), FINAL_DISCRIMINATOR: checkpoint / DISCRIMINATOR_FILE}


def export_checkpoint(checkpoint: Path, out_dir: Path, model_cfg: ModelConfig, step: int) -> dict[str, Path]:
    """`weight_files` as plain safetensors files in `out_dir` (model settings and step in the metadata),
    each replaced atomically: what the run root holds, and what `python -m trainer.export` writes."""
    exported = {}
    for name, source in weight_files(checkpoint).items():
        if source.is_file():  # a checkpoint always has G and D; EMA only with train.ema_decay
            _export_state(load_file(str(source)), out_dir / name, model_cfg, step)
            exported[name] = out_dir / name
    return exported


def generator_files(checkpoint: Path) -> dict[str, Path]:
    """The checkpoint's generator weights under their exported names: generator.safetensors (G, as
    Accelerate saved it) and generator_ema.safetensors when the run keeps an EMA."""
    files = {FINAL_GENERATOR: checkpoint / GENERATOR_FILE}
    if (checkpoint / EMA_FILE).is_file():
        files[EMA_FILE] = checkpoint / EMA_FILE
    return files


def export_checkpoint_generators(checkpoint: Path, out_dir: Path, model_cfg: ModelConfig, step: int) -> dict[str, Path]:
    """`generator_files` rewritten into `out_dir` in the format of the end-of-run export (model settings
    in the metadata), so that every exported generator file reads the same way."""
    exported = {}
    for name, source in generator_files(checkpoint).items():
        _export_state(load_file(str(source)), out_dir / name, model_cfg, step)
        exported[name] = out_dir / name
    return exported
