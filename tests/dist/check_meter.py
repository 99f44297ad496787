"""Run under `accelerate launch`: each rank averages a window of known losses; writes the cross-rank means.

Uses the trainer's own accelerator builder and MetricMeter. Usage: check_meter.py OUT_DIR
Rank r adds the window WINDOWS[r] (three steps), then one more step (a second window after the reset).
"""

import json
import sys
from pathlib import Path

import torch

from trainer.core.config import load_config
from trainer.monitor.measurements import MetricMeter
from trainer.core.runtime import build_accelerator

WINDOWS = {
    0: [{"loss_D": 1.0, "loss_G": 0.5}, {"loss_D": 2.0, "loss_G": 0.5}, {"loss_D": 3.0, "loss_G": 2.0}],
    1: [{"loss_D": 5.0, "loss_G": 1.0}, {"loss_D": 7.0, "loss_G": 1.0}, {"loss_D": 9.0, "loss_G": 4.0}],
}
NEXT = {0: {"loss_D": 10.0, "loss_G": 0.0}, 1: {"loss_D": 20.0, "loss_G": 1.0}}


def main() -> None:
    out = Path(sys.argv[1])
    acc = build_accelerator(load_config(None, ["train.mixed_precision=no", "log.tracker=none"]))
    meter = MetricMeter()
    for step in WINDOWS[acc.process_index]:
        meter.add({name: torch.tensor(value, device=acc.device) for name, value in step.items()})
    first = meter.mean_across_ranks(acc)
    meter.add({name: torch.tensor(value, device=acc.device) for name, value in NEXT[acc.process_index].items()})
    second = meter.mean_across_ranks(acc)
    (out / f"rank{acc.process_index}.json").write_text(json.dumps({"first": first, "second": second}))
    acc.end_training()


if __name__ == "__main__":
    main()
