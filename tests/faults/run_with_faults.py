"""Run the trainer exactly as trainer/train.py does, with faults injected from the environment.

Test harness only. Each fault patches one library boundary, not the trainer's own logic:
  FAULT_SAVE_FAILS_AT_STEP=N   Accelerate's save_state writes its files for step N, then the disk
                               is "full": it raises OSError(ENOSPC) as a real write would.
  FAULT_NAN_AT_STEP=N:NET      after optimizer step N (first attempt only), NET's (generator or
                               discriminator) first conv weight becomes NaN, as after an exploding
                               gradient: the next losses are NaN.
  FAULT_FP16_SCALER=1          a real torch GradScaler on the CPU whose scale (2**126) overflows
                               every gradient, so the scaler skips steps as fp16 overflow does.
  FAULT_SLOW_PREPARE_S=S       the dataset's one-time preparation takes S seconds longer, as a large
                               folder on a network filesystem would.
  FAULT_PREPARE_FAILS=1        the dataset's preparation fails with a DataError (a bad dataset).
"""

import errno
import os
import sys
import time

import torch
from accelerate import Accelerator

import trainer.loop
import trainer.prepare
from trainer.core.step import GANStep
from trainer.train import main
from trainer.util.errors import DataError

if "FAULT_SAVE_FAILS_AT_STEP" in os.environ:
    failing_dir = f"step-{int(os.environ['FAULT_SAVE_FAILS_AT_STEP']):08d}"
    _save_state = Accelerator.save_state

    def save_state(self, output_dir=None, **kwargs):
        result = _save_state(self, output_dir, **kwargs)
        if str(output_dir).endswith(failing_dir):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(output_dir))
        return result

    Accelerator.save_state = save_state

if "FAULT_NAN_AT_STEP" in os.environ:
    nan_step, network = os.environ["FAULT_NAN_AT_STEP"].split(":")
    _call = GANStep.__call__

    def call(self, real, step, attempt=0):
        metrics = _call(self, real, step, attempt)
        if step + 1 == int(nan_step) and attempt == 0:
            model = self.G if network == "generator" else self.D
            first_conv = next(m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)))
            with torch.no_grad():
                first_conv.weight.fill_(float("nan"))
        return metrics

    GANStep.__call__ = call

if os.environ.get("FAULT_FP16_SCALER"):
    _build = trainer.loop.build_accelerator

    def build_accelerator(cfg, tracker_kwargs=None):
        accelerator = _build(cfg, tracker_kwargs)
        # What Accelerate builds for fp16 on a GPU; before prepare(), so the optimizers use it.
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**126, growth_interval=1_000_000)
        return accelerator

    trainer.loop.build_accelerator = build_accelerator

if "FAULT_SLOW_PREPARE_S" in os.environ or "FAULT_PREPARE_FAILS" in os.environ:
    _prepare_data = trainer.prepare.prepare_data

    def prepare_data(*args, **kwargs):
        time.sleep(float(os.environ.get("FAULT_SLOW_PREPARE_S", "0")))
        if os.environ.get("FAULT_PREPARE_FAILS"):
            raise DataError("injected: the dataset is broken (FAULT_PREPARE_FAILS)")
        return _prepare_data(*args, **kwargs)

    trainer.prepare.prepare_data = prepare_data

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
