"""`trainer/train.py` with two test-only knobs, for acceptance checks that users must never need.

    DCGAN_ACCEPTANCE_INIT_SCALE=1099511627776 python -m trainer.acceptance.shim [train.py args]
    DCGAN_ACCEPTANCE_BACKEND=gloo accelerate launch --multi_gpu --num_processes 2 trainer/acceptance/shim.py ...

- DCGAN_ACCEPTANCE_INIT_SCALE: the fp16 grad scaler starts at this scale instead of 2**16. A start far
  above what fp16 gradients can hold forces overflow: the scaler skips steps and halves the scale until
  the gradients fit, which is the path (skip counting, loss-scale logging) the check measures.
- DCGAN_ACCEPTANCE_BACKEND: the process group backend of a multi-process launch. Accelerate picks NCCL
  on CUDA, and NCCL refuses two ranks on one GPU; gloo moves CUDA tensors through host memory and does
  not mind, so one GPU can still run DDP and SyncBatchNorm with two ranks. Accelerate puts every rank
  on cuda:(local rank % device count), i.e. all on cuda:0, but gives DDP device_ids=[local rank], so
  rank 1's DDP would move its inputs to cuda:1; ACCELERATE_BYPASS_DEVICE_MAP=true (set here) makes it
  pass no device_ids, and DDP then uses the module's own device.

Both are Accelerate's own handlers (GradScalerKwargs, InitProcessGroupKwargs), appended to whatever
the trainer passes when it builds its Accelerator; everything else is the trainer's entry point as is.
Every rank prints one "[acceptance shim]" line (backend, device, scaler) that the checks parse.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (accelerate launch needs a path): import the package from the repository root,
    # and keep this folder off sys.path, as trainer/train.py does.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parents[1]))

from trainer.train import main  # noqa: E402  (the trainer's entry point: re-point here if it moves)

INIT_SCALE_ENV = "DCGAN_ACCEPTANCE_INIT_SCALE"
BACKEND_ENV = "DCGAN_ACCEPTANCE_BACKEND"
MARK = "[acceptance shim]"


def requested_fields(environ: Mapping[str, str]) -> dict[type, dict]:
    """The Accelerate handler kinds the environment asks for, with the fields it sets on each."""
    # Imported here, not at the top: the checks read this module's names and should not pay for torch.
    from accelerate.utils import GradScalerKwargs, InitProcessGroupKwargs

    fields: dict[type, dict] = {}
    if environ.get(INIT_SCALE_ENV):
        fields[GradScalerKwargs] = {"init_scale": float(environ[INIT_SCALE_ENV])}
    # A backend only means something in a multi-process launch; alone, Accelerate would refuse it.
    if environ.get(BACKEND_ENV) and int(environ.get("WORLD_SIZE", "1")) > 1:
        fields[InitProcessGroupKwargs] = {"backend": environ[BACKEND_ENV]}
    return fields


def extra_handlers(environ: Mapping[str, str]) -> list:
    """The Accelerate handlers the environment asks for."""
    return [kind(**fields) for kind, fields in requested_fields(environ).items()]


def merge_handlers(trainers: list, requested: dict[type, dict]) -> list:
    """The trainer's handlers with the requested fields set: Accelerate takes one handler of each kind, so a
    kind the trainer passes too (its process-group timeout) keeps the trainer's other fields."""
    merged = list(trainers)
    for kind, fields in requested.items():
        same = [i for i, h in enumerate(merged) if type(h) is kind]
        if same:
            merged[same[0]] = dataclasses.replace(merged[same[0]], **fields)
        else:
            merged.append(kind(**fields))
    return merged


def install(environ: Mapping[str, str] = os.environ) -> None:
    """Make every Accelerator built from now on take the extra handlers, and report what it became."""
    from accelerate import Accelerator

    requested = requested_fields(environ)
    if any(kind.__name__ == "InitProcessGroupKwargs" for kind in requested):
        os.environ["ACCELERATE_BYPASS_DEVICE_MAP"] = "true"  # DDP without device_ids: see the module docstring
    original = Accelerator.__init__

    def __init__(self: Accelerator, *args, **kwargs) -> None:
        kwargs["kwargs_handlers"] = merge_handlers(kwargs.get("kwargs_handlers") or [], requested)
        original(self, *args, **kwargs)
        scale = self.scaler.get_scale() if self.scaler is not None else None
        print(
            f"{MARK} rank {self.process_index}/{self.num_processes} backend {self.state.backend} "
            f"distributed_type {self.distributed_type.value} device {self.device} "
            f"mixed_precision {self.mixed_precision} grad_scaler_init_scale {scale} "
            f"bypass_device_map {os.environ.get('ACCELERATE_BYPASS_DEVICE_MAP', 'false')}",
            file=sys.stderr,
            flush=True,
        )

    Accelerator.__init__ = __init__


if __name__ == "__main__":
    install()
    sys.exit(main(sys.argv[1:]))
