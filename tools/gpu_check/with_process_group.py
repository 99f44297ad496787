"""`trainer/train.py` in a process group the GPU check sets up itself, for launches Accelerate would not make.

    torchrun --nproc_per_node 1 tools/gpu_check/with_process_group.py --backend nccl -- [train.py args]
    accelerate launch --multi_gpu --num_processes 2 tools/gpu_check/with_process_group.py --backend gloo -- ...
    python tools/gpu_check/with_process_group.py --counters FILE -- [train.py args]     (one process)

- `--backend`: the process group is created here, with this backend, before the trainer builds its
  Accelerator; Accelerate then uses the group it finds (it initialises one only when none exists).
  That is how one GPU runs two ranks (NCCL refuses two ranks on one device; gloo moves CUDA tensors
  through host memory), and how one rank runs NCCL (`accelerate launch --multi_gpu` wants two
  processes; torchrun does not). Before training, every rank checks the collectives DDP and
  SyncBatchNorm use (all_reduce, all_gather_into_tensor, broadcast) on its device and prints one
  `[gpu check]` line that the checks parse. Accelerate puts every rank of a one-GPU launch on
  cuda:0 but would give rank 1's DDP device_ids=[1]; ACCELERATE_BYPASS_DEVICE_MAP=true (set here
  for more ranks than GPUs) makes DDP use the module's own device.
- `--counters FILE`: at exit, torch.compile's counters (graph breaks, recompiles, inductor's CUDA
  graph skips) as JSON, so a check can tell whether CUDA graphs were really used.

Nothing of the trainer or of Accelerate is patched: this is the trainer's entry point, run after a
few lines of setup.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (launchers need a path): import from the repository root, not from this folder.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parents[1]))

MARK = "[gpu check]"


def check_collectives(backend: str) -> str:
    """Create the process group and run the collectives DDP and SyncBatchNorm need; returns the line to print."""
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
        if world > torch.cuda.device_count():
            os.environ["ACCELERATE_BYPASS_DEVICE_MAP"] = "true"  # DDP without device_ids: see the docstring
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend, timeout=timedelta(seconds=300))
    summed = torch.full((4,), float(rank + 1), device=device)
    dist.all_reduce(summed)
    gathered = torch.empty(world * 2, device=device)
    dist.all_gather_into_tensor(gathered, torch.full((2,), float(rank), device=device))
    sent = torch.tensor([42.0 if rank == 0 else 0.0], device=device)
    dist.broadcast(sent, src=0)
    ok = (
        summed.tolist() == [world * (world + 1) / 2] * 4
        and gathered.tolist() == [float(r) for r in range(world) for _ in range(2)]
        and sent.item() == 42.0
    )
    return (
        f"{MARK} rank {rank}/{world} backend {dist.get_backend()} device {device} "
        f"collectives {'ok' if ok else 'WRONG'} bypass_device_map {os.environ.get('ACCELERATE_BYPASS_DEVICE_MAP', 'false')}"
    )


def dump_counters(path: Path) -> None:
    """torch.compile's counters of this process (empty when nothing was compiled)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        counters = {}
    found = {str(group): {str(k): v for k, v in values.items()} for group, values in counters.items()}
    path.write_text(json.dumps(found, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", help="create the process group with this backend first (gloo, nccl)")
    parser.add_argument("--counters", type=Path, help="write torch.compile's counters here at exit")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then trainer/train.py's arguments")
    args = parser.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if args.backend:
        # One write per line: the ranks share the launcher's stderr, and print() writes the text and its
        # newline separately, so two ranks' lines could interleave into one the report cannot parse.
        sys.stderr.write(check_collectives(args.backend) + "\n")
        sys.stderr.flush()
    if args.counters:
        atexit.register(dump_counters, args.counters)
    from trainer.train import main as train  # the trainer's entry point, as `accelerate launch` would run it

    return train(train_args)


if __name__ == "__main__":
    sys.exit(main())
