"""Run under `accelerate launch` with 2 processes: the "main decides" helpers give every rank the same answer or error.

Prints "ranks ok" on each rank when every check held there.
"""

import os

from accelerate import Accelerator

from trainer.util.errors import DataError, RunError
from trainer.util.ranks import main_decides, one_process_first


def expect_error(kind: type, fn, text: str) -> None:
    try:
        fn()
    except kind as exc:
        assert text in str(exc), str(exc)
    else:
        raise AssertionError(f"no {kind.__name__} on rank {os.environ['RANK']}")


def main() -> None:
    rank = int(os.environ["RANK"])
    # before the process group: only rank 0 works, the other gets its JSON answer or its error
    calls = []
    answer = one_process_first(lambda: calls.append(rank) or {"pack": "/cache/x.npy"}, name="check")
    assert answer == {"pack": "/cache/x.npy"} and calls == ([0] if rank == 0 else [])

    def fail():
        raise DataError("rank 0 found a broken dataset")

    expect_error(DataError if rank == 0 else Exception, lambda: one_process_first(fail, name="check-fail"), "broken dataset")

    accelerator = Accelerator(cpu=True)
    assert main_decides(accelerator, lambda: f"chosen by {rank}") == "chosen by 0"
    expect_error(DataError, lambda: main_decides(accelerator, fail), "broken dataset")

    def crash():
        raise KeyError("surprise")

    expect_error(KeyError if rank == 0 else RunError, lambda: main_decides(accelerator, crash), "surprise")
    accelerator.wait_for_everyone()
    print("ranks ok", flush=True)
    accelerator.end_training()


if __name__ == "__main__":
    main()
