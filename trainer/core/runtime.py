"""The Accelerator for a run, and the config checks that depend on the hardware it found."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    TorchDynamoPlugin,
)

from trainer.core.config import Config
from trainer.util.errors import ConfigError
from trainer.util.ranks import launch_rank

SMALL_PER_RANK_BATCH = 8  # below this, per-rank BatchNorm statistics are noisy enough to hurt


def cpu_has_amx() -> bool:
    """Intel AMX (Sapphire Rapids and later): the only CPUs where bf16 autocast beats fp32 here.

    Measured on a 2-core CPU with AVX512-BF16 but no AMX (2026-11): bf16 73.7 img/s, fp32 77.4 img/s
    in trainer.bench; with AMX, bf16 was about 2x faster. torch's probe is private, hence the guard.
    """
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def resolve_precision(requested: str) -> str:
    """`train.mixed_precision` with `auto` replaced by what trains well and fast on this machine."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        device = torch.device("cuda", launch_rank(local=True) % torch.cuda.device_count())
        return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp16"
    return "bf16" if cpu_has_amx() else "no"


class _DDPLoggerWithoutConstructionLog(torch.distributed.Logger):
    """DDP's usage logger, minus the construction-time record that crashes under gloo debugging.

    With TORCH_DISTRIBUTED_DEBUG=DETAIL, torch wraps the gloo backend in a ProcessGroupWrapper (which
    checks that ranks call the same collectives with the same shapes), and DDP's construction log
    casts that wrapper to ProcessGroupGloo to read its thread count: a segmentation fault in every
    DDP constructor (torch 2.13, CPU). The record is telemetry only; everything else is torch's.
    """

    def set_construction_data_and_log(self, *args: Any, **kwargs: Any) -> None:
        pass


def allow_ddp_collective_checks() -> None:
    """Let DDP start under TORCH_DISTRIBUTED_DEBUG=DETAIL on gloo (see the class above); a no-op otherwise."""
    if (
        not torch.cuda.is_available()
        and torch.distributed.is_available()
        and torch.distributed.get_debug_level() == torch.distributed.DebugLevel.DETAIL
    ):
        torch.distributed.Logger = _DDPLoggerWithoutConstructionLog  # DDP builds its logger from here


def one_process_where_several_were_asked(environ: Mapping[str, str] = os.environ) -> str | None:
    """What to tell a user whose `accelerate launch` started one process although several were asked for.

    `accelerate launch --num_processes N` without `--multi_gpu` (or a config file saying MULTI_GPU)
    runs its "simple" launcher: one process, no WORLD_SIZE, but the MASTER_ADDR it sets for a
    multi-process launch. On a machine without GPUs that is easy to do and trains one process silently.
    """
    under_accelerate = "ACCELERATE_MIXED_PRECISION" in environ and "WORLD_SIZE" not in environ
    if not (under_accelerate and environ.get("MASTER_ADDR")):
        return None
    return (
        "warning: `accelerate launch` started ONE process, although it was asked for several "
        "(--num_processes > 1 or a multi-process config): without --multi_gpu, Accelerate runs a single "
        "process. For N processes add --multi_gpu (on a machine without GPUs too: they use the CPU, gloo), "
        "e.g. accelerate launch --multi_gpu --num_processes 2 trainer/train.py ..., or use "
        "--config_file launch/accelerate/one_node.yaml --num_processes N"
    )


def build_accelerator(cfg: Config, tracker_kwargs: Mapping[str, Any] | None = None) -> Accelerator:
    """The run's Accelerator; `tracker_kwargs` (log_with, ...) from `trainer.monitor.tracking.choose_tracker`."""
    allow_ddp_collective_checks()
    mistaken = one_process_where_several_were_asked()
    if mistaken:
        print(mistaken, file=sys.stderr, flush=True)
    # train.mixed_precision is the one setting: it overrides `accelerate launch --mixed_precision`
    # (Accelerate gives the constructor argument precedence over its launcher's environment).
    # torch >= 2.13 deprecates DDP's broadcast_buffers, which Accelerate always passes; its
    # replacement would not skip the init-time buffer sync that broadcast_buffers=False skips, and
    # Accelerate cannot pass it yet. Behaviour is unchanged, so keep the log clean.
    warnings.filterwarnings("ignore", message=r"`broadcast_buffers` is deprecated", category=FutureWarning)
    # Accelerate 1.x picks gloo (MULTI_CPU) for a multi-process launch only when told it is on the
    # CPU; otherwise each process would run alone. GPU runs are unaffected.
    multi_process_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    # Every training batch has the same shape, so cuDNN may time its kernels once and keep the fastest
    # (as the PyTorch DCGAN example does). fp32 convolutions stay TF32 on Ampere and later (torch's default).
    torch.backends.cudnn.benchmark = torch.cuda.is_available()
    try:
        return Accelerator(
            cpu=multi_process_cpu,
            mixed_precision=resolve_precision(cfg.train.mixed_precision),
            # Accelerate compiles after the DDP wrap, as DDP's compiled-graph support expects;
            # mode=reduce-overhead adds CUDA graphs.
            dynamo_plugin=TorchDynamoPlugin(
                backend="inductor" if cfg.train.compile else "no",
                mode=cfg.train.compile_mode if cfg.train.compile else None,
            ),
            # split_batches: the loader yields GLOBAL batches and each rank takes its slice, so the
            # data order is the same for any number of processes. The seedable sampler gives every
            # rank the same shuffle, reseeded from run.seed + epoch.
            # non_blocking: the pinned batch's copy to the GPU does not wait for the queued GPU work,
            # which would undo the step's freedom from host syncs.
            dataloader_config=DataLoaderConfiguration(
                split_batches=True, use_seedable_sampler=True, data_seed=cfg.run.seed, non_blocking=True
            ),
            # D runs on real and on fake batches before one backward; broadcasting BatchNorm
            # buffers between those forwards makes autograd fail ("modified by an inplace operation").
            kwargs_handlers=[
                DistributedDataParallelKwargs(broadcast_buffers=False),
                InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.dist.timeout_s)),
            ],
            **(tracker_kwargs or {}),
        )
    except ValueError as exc:  # e.g. bf16 on a GPU without bf16 support
        raise ConfigError(
            f"train.mixed_precision={resolve_precision(cfg.train.mixed_precision)} is not supported here: {exc}; "
            "try train.mixed_precision=fp16 or no"
        ) from None


def check_against_hardware(cfg: Config, accelerator: Accelerator) -> bool:
    """Raises ConfigError for settings this hardware cannot run; returns whether to use SyncBatchNorm."""
    n = accelerator.num_processes
    on_cuda = accelerator.device.type == "cuda"
    if cfg.train.batch_size % n:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} (the global batch) is not divisible by the {n} processes; "
            f"set train.batch_size to a multiple of {n}"
        )
    if cfg.train.compile and cfg.train.compile_mode != "default" and n > 1:
        # CUDA graphs with DDP and BatchNorm buffer updates have open upstream problems; allowed again
        # once a multi-GPU run shows they work (docs/performance.md).
        raise ConfigError(
            f"train.compile_mode={cfg.train.compile_mode} is not supported with {n} processes yet; "
            "use train.compile_mode=default, or one process"
        )
    if accelerator.mixed_precision == "fp16" and not on_cuda:
        raise ConfigError(
            f"train.mixed_precision=fp16 needs a GPU (this run is on {accelerator.device.type}); "
            "use train.mixed_precision=bf16 or no"
        )
    if cfg.train.sync_bn == "true" and not on_cuda:
        raise ConfigError(
            f"train.sync_bn=true needs CUDA: SyncBatchNorm does not run on {accelerator.device.type}; "
            "use train.sync_bn=auto or false"
        )
    sync_bn = cfg.train.sync_bn == "true" or (cfg.train.sync_bn == "auto" and on_cuda and n > 1)
    per_rank = cfg.train.batch_size // n
    if n > 1 and not sync_bn and per_rank < SMALL_PER_RANK_BATCH and accelerator.is_main_process:
        warnings.warn(
            f"each of the {n} processes normalises BatchNorm over its own {per_rank} images (no SyncBatchNorm "
            f"on {accelerator.device.type}); statistics that small can hurt training: use fewer processes "
            "or a larger train.batch_size",
            stacklevel=2,
        )
    return sync_bn
