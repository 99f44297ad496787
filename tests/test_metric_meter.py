"""The logged loss rows: a window's steps averaged on each rank, then the ranks' averages averaged."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator

from tests.conftest import REPO, run_trainer
from trainer.monitor.measurements import MetricMeter

CHECK_METER = REPO / "tests" / "dist" / "check_meter.py"


def _add(meter: MetricMeter, **values: float) -> None:
    meter.add({name: torch.tensor(value) for name, value in values.items()})


def test_window_average_by_hand_and_reset_between_windows():
    accelerator = Accelerator(cpu=True)
    meter = MetricMeter()
    _add(meter, loss_D=1.0, loss_G=4.0)
    _add(meter, loss_D=2.0, loss_G=0.5)
    _add(meter, loss_D=6.0, loss_G=1.5)
    assert meter.mean_across_ranks(accelerator) == pytest.approx({"loss_D": 3.0, "loss_G": 2.0})
    assert meter.count == 0 and meter.mean_across_ranks(accelerator) == {}  # a new window starts empty
    _add(meter, loss_D=10.0, loss_G=-1.0)
    assert meter.mean_across_ranks(accelerator) == pytest.approx({"loss_D": 10.0, "loss_G": -1.0})


def test_reset_drops_a_window_half_summed():
    """What a rollback does: the steps it throws away do not leak into the next logged row."""
    accelerator = Accelerator(cpu=True)
    meter = MetricMeter()
    _add(meter, loss_D=100.0)
    meter.reset()
    _add(meter, loss_D=1.0)
    _add(meter, loss_D=3.0)
    assert meter.mean_across_ranks(accelerator) == pytest.approx({"loss_D": 2.0})


def test_a_section_names_the_metrics_where_the_collector_takes_them():
    accelerator = Accelerator(cpu=True)
    meter = MetricMeter()
    meter.add({"loss_D": torch.tensor(1.0)}, section="train")
    meter.add({"loss_D": torch.tensor(3.0)}, section="train")
    assert meter.mean_across_ranks(accelerator) == pytest.approx({"train/loss_D": 2.0})


@pytest.mark.slow
def test_two_ranks_average_their_window_averages(tmp_path):
    """tests/dist/check_meter.py: rank 0 logs loss_D 1, 2, 3 and rank 1 logs 5, 7, 9 in one window."""
    run_trainer([str(tmp_path)], processes=2, script=CHECK_METER, timeout=120)
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert rows[0] == rows[1]  # every rank gets the same row
    # window means: rank 0 (2, 1), rank 1 (7, 2); across ranks (4.5, 1.5)
    assert rows[0]["first"] == pytest.approx({"loss_D": 4.5, "loss_G": 1.5})
    # the next window holds one step per rank: nothing of the first is left
    assert rows[0]["second"] == pytest.approx({"loss_D": 15.0, "loss_G": 0.5})
