"""Run the trainer exactly as train.py does, and have every rank dump its final G and D state.

Accelerate keeps the prepared models in `accelerator._models`; a patched `end_training` (called
last by the loop) saves each rank's copy to <run.dir>/rank<r>_<model index>.safetensors.
"""

import sys
from pathlib import Path

# This checkout's trainer, as trainer/train.py imports it: a Slurm job does not get the tests'
# PYTHONPATH, and an installed (editable) trainer elsewhere would otherwise train instead.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from accelerate import Accelerator  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from trainer.core.config import parse_args  # noqa: E402
from trainer.train import main  # noqa: E402

_end_training = Accelerator.end_training


def _dump_then_end(self: Accelerator) -> None:
    run_dir = Path(parse_args(sys.argv[1:]).run.dir)
    for i, model in enumerate(self._models):
        state = {k: v.detach().cpu().contiguous() for k, v in self.unwrap_model(model).state_dict().items()}
        save_file(state, str(run_dir / f"rank{self.process_index}_{i}.safetensors"))
    _end_training(self)


Accelerator.end_training = _dump_then_end

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
