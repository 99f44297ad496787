"""Run under `accelerate launch`: writes which dataset indices each rank sees, per epoch.

Uses the trainer's own accelerator and dataloader builders on a dataset of indices.
Usage: check_sharding.py OUT_DIR DATASET_SIZE GLOBAL_BATCH [PACKED_NPY]
"""

import json
import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset

from trainer.core.config import load_config
from trainer.core.data import build_dataloader
from trainer.core.packed import PackedImages
from trainer.core.runtime import build_accelerator


class Indices(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(i)


def main() -> None:
    out, size, batch = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    cfg = load_config(None, [f"train.batch_size={batch}", "train.mixed_precision=no"])
    acc = build_accelerator(cfg)
    if len(sys.argv) > 4:  # a packed file whose image i encodes i in channels 0 (high) and 1 (low byte)
        packed = PackedImages(Path(sys.argv[4]), {})
        loader = acc.prepare(build_dataloader(packed, batch, num_workers=0))

        def decode(b: torch.Tensor) -> list[int]:
            return (b[:, 0, 0, 0].long() * 256 + b[:, 1, 0, 0].long()).tolist()
    else:
        loader = acc.prepare(build_dataloader(Indices(size), batch, num_workers=0))

        def decode(b: torch.Tensor) -> list[int]:
            return b.tolist()
    seen = {}
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        seen[f"epoch{epoch}"] = [decode(b) for b in loader]
    loader.set_epoch(1)  # what a mid-epoch resume after 2 steps iterates
    seen["epoch1_skip2"] = [decode(b) for b in acc.skip_first_batches(loader, 2)]
    (out / f"rank{acc.process_index}.json").write_text(json.dumps(seen))
    acc.end_training()


if __name__ == "__main__":
    main()
