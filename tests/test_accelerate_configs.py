"""launch/accelerate/*.yaml mean to Accelerate what their comments say (Accelerate rejects unknown keys)."""

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

from tests.conftest import REPO

CONFIGS = REPO / "launch" / "accelerate"


@pytest.mark.parametrize(
    "name, distributed_type, machines, processes",
    [
        ("single_gpu", DistributedType.NO, 1, 1),
        ("one_node", DistributedType.MULTI_GPU, 1, 8),
        ("multi_node", DistributedType.MULTI_GPU, 2, 16),
    ],
)
def test_accelerate_config_files(name, distributed_type, machines, processes):
    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert config.distributed_type == distributed_type
    assert (config.num_machines, config.num_processes) == (machines, processes)
    assert config.gpu_ids == "all" and config.use_cpu is False
    assert config.mixed_precision == "no"  # the trainer's train.mixed_precision decides
    if machines > 1:  # torchrun's static rendezvous at main_process_ip:port (the script passes both)
        assert config.rdzv_backend == "static" and config.same_network is True
