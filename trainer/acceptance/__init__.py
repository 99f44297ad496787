"""GPU acceptance: every CUDA claim of the trainer checked by one prepared command, within a time budget.

    python -m trainer.acceptance --out DIR --data cifar10-jpg.tar.gz     # on one GPU, about 7 minutes
    python -m trainer.acceptance --device cpu --tiny --out DIR           # every check at toy size on a CPU

Layout (kept apart from the trainer's own modules, which it drives through their command lines):

- `runner.py`: the generic part. Runs checks one after another, each in its own process tree with its
  own cap, inside a total budget; a check that raises, hangs or crashes is reported and the next runs.
  Standard library only, so a hung check can always be killed and reported.
- `checks.py`: the checks themselves (bf16/fp16/fp32, forced fp16 overflow, compile, bench, two ranks
  on one GPU, the full 25-epoch recipe and its samples), each a function of a `Context`.
- `report.py`: report.json, report.md and the log archive.
- `shim.py`: `trainer/train.py` with two test-only knobs (a forced grad-scaler start, a gloo process group).
- `cli.py`: the command line.
"""
