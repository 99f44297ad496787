"""fp16 with the grad scaler started far too high: do the GAN step's skip counters see every skipped step?

    python -m tools.gpu_check.fp16_overflow --steps 40 --json OUT.json [--config FILE] [key=value ...]

A scale far above what fp16 gradients can hold forces overflow: the scaler skips optimizer steps and
halves the scale until the gradients fit. Both optimizers share Accelerate's one scaler and each
step ends with `scaler.update()`, so each skipped D or G step is one halving, and
skipped_steps_D + skipped_steps_G must equal log2(initial / final scale). A fused optimizer (the
trainer's on CUDA) skips inside, where Accelerate's `step_was_skipped` cannot see it; the step
counts skips from the scale going down (trainer/core/step.py). This runs that step with the
trainer's own Accelerator, networks, data and optimizers, as `python -m trainer.bench` does: the
only change is the scaler's starting scale, set on the Accelerator before `prepare` hands the
scaler to the optimizers. Exit 2 with the trainer's message where fp16 cannot run (a CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

FORCED_INIT_SCALE = 2.0**40  # fp16 gradients of this DCGAN overflow at any scale much above 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML config (default: the classic recipe)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--init-scale", type=float, default=FORCED_INIT_SCALE)
    parser.add_argument("--json", type=Path, required=True, help="write the figures here")
    args = parser.parse_intermixed_args(argv)

    import torch

    from trainer.core.config import load_config
    from trainer.core.data import load_dataset
    from trainer.core.runtime import build_accelerator, check_against_hardware
    from trainer.core.training import build_training
    from trainer.util.errors import UserError

    try:
        cfg = load_config(args.config, [*args.overrides, "train.mixed_precision=fp16"])
        accelerator = build_accelerator(cfg)
        use_sync_bn = check_against_hardware(cfg, accelerator)  # refuses fp16 off CUDA
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    accelerator.scaler = torch.amp.GradScaler(accelerator.device.type, init_scale=args.init_scale)
    dataset = load_dataset(cfg.data, cfg.model.resolution, cfg.run.seed)
    training = build_training(cfg, accelerator, use_sync_bn, dataset)  # what a training run builds
    step, finite = 0, True
    while step < args.steps:
        for real in training.loader:
            metrics = training.step(real, step)
            finite = finite and all(math.isfinite(float(metrics[k])) for k in ("loss_D", "loss_G"))
            step += 1
            if step == args.steps:
                break
    skipped_d, skipped_g = training.gan_step.skipped.tolist()
    figures = {
        "steps": step,
        "init_scale": args.init_scale,
        "final_loss_scale": float(accelerator.scaler.get_scale()),
        "skipped_steps_D": skipped_d,
        "skipped_steps_G": skipped_g,
        "losses_finite_after_skips": finite,
        "fused_adam": bool(training.opt_d.optimizer.defaults.get("fused")),
        "device": str(accelerator.device),
    }
    args.json.write_text(json.dumps(figures))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
