"""Checking a GPU machine: one command that checks the stack and measures the trainer on this GPU.

    python -m tools.gpu_check --out DIR                        # on a GPU node, about 9 minutes
    python -m tools.gpu_check --device cpu --tiny --out DIR    # every check at toy size on a CPU

It needs the repository (configs, the classic reference loop), so it lives beside the trainer, not in
the installed package. docs/gpu.md is its user guide. Layout:

- `runner.py`: the generic part. Runs checks one after another, each in its own process tree with its
  own cap, inside a total budget; a check that raises, hangs or crashes is reported and the next runs;
  nothing it started is left running. Standard library only, so a hung check can always be killed.
- `checks.py`: the checks (environment, data, bench, the 64x64 quality verdict, bf16/fp16/fp32, fp16
  overflow, NCCL on one rank, two gloo ranks, compile and CUDA graphs, the full 25-epoch run), each
  a function of a `Context`, and their order and caps (`registry`).
- `report.py`: report.json, report.md (the headline answers first) and the log archive.
- `with_process_group.py`: the trainer's entry point in a process group set up first (NCCL with one
  rank, gloo with two on one GPU), and torch.compile's counters at exit.
- `fp16_overflow.py`: the GAN step in fp16 with the grad scaler started far too high.
- `cli.py`: the command line.
"""
