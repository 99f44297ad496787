"""trainer/core/runtime.py: what a run's hardware and process count allow, decided before training.

Precision `auto` per device, CUDA-graph compile modes refused for several processes, and per-rank
BatchNorm over tiny per-rank batches: what a CUDA cluster run would hit, reproduced on the CPU.
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch

from tests.conftest import SMOKE
from trainer.core import runtime
from trainer.core.config import load_config
from trainer.util.errors import ConfigError


# ---- precision, compile modes, small batches --------------------------------------------------------------
def test_precision_auto_picks_per_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "cpu_has_amx", lambda: False)
    assert runtime.resolve_precision("auto") == "no"  # CPU bf16 without AMX is slower than fp32
    monkeypatch.setattr(runtime, "cpu_has_amx", lambda: True)
    assert runtime.resolve_precision("auto") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert runtime.resolve_precision("auto") == "fp16"  # V100: no bf16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert runtime.resolve_precision("auto") == "bf16"
    assert runtime.resolve_precision("no") == "no"  # an explicit choice stays


def _fake_accelerator(processes: int, device: str = "cpu") -> types.SimpleNamespace:
    return types.SimpleNamespace(
        num_processes=processes, device=torch.device(device), mixed_precision="no", is_main_process=True
    )


def test_cuda_graph_compile_modes_are_refused_for_several_processes():
    cfg = load_config(str(SMOKE), ["train.compile=true", "train.compile_mode=reduce-overhead"])
    with pytest.raises(ConfigError, match="compile_mode=reduce-overhead is not supported with 2 processes"):
        runtime.check_against_hardware(cfg, _fake_accelerator(2))
    runtime.check_against_hardware(cfg, _fake_accelerator(1))  # one process may try them


def test_tiny_per_rank_batches_without_sync_bn_warn_once():
    cfg = load_config(str(SMOKE), ["train.batch_size=32"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runtime.check_against_hardware(cfg, _fake_accelerator(8))  # 4 images per rank, per-rank BatchNorm
        runtime.check_against_hardware(cfg, _fake_accelerator(2))  # 16 per rank: fine
    assert [str(w.message).split(";")[0] for w in caught] == [
        "each of the 8 processes normalises BatchNorm over its own 4 images (no SyncBatchNorm on cpu)"
    ]
