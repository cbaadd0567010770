"""Two processes on CPU (gloo) train like one at the same global batch: DDP through ``accelerate launch``
with the HF Trainer, and torch's FSDP2 sharding z. The work is in tests/distributed_train.py."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import distributed_train  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initial_z() -> torch.Tensor:
    return distributed_train._model().roast_store.z.detach()


@pytest.fixture(scope="module")
def one_and_two_processes(tmp_path_factory):
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        # --multi_gpu selects accelerate's torch.distributed launcher (its --cpu flag starts a single
        # process); with no GPU, or with use_cpu=True in the script, the processes run on CPU over gloo.
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        str(HERE / "distributed_train.py"), str(two),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    try:  # a hung rendezvous must not hang CI
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"accelerate launch timed out:\n{e.stdout}\n{e.stderr}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    distributed_train.main(str(one))  # the 1-process reference, in this process
    load = lambda d: torch.load(d / "result.pt", weights_only=False)  # noqa: E731
    return load(one), load(two)


def test_accelerate_ddp_with_two_processes_matches_one_process(one_and_two_processes):
    one, two = (r["trainer"] for r in one_and_two_processes)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert (
        two["distributed_type"] == "DistributedType.MULTI_CPU" and two["wrapped"] == "DistributedDataParallel"
    )
    # Same global batch of 8: 2 x 4 rows averaged by DDP's all-reduce of dz == 1 x 8 rows.
    torch.testing.assert_close(two["losses"], one["losses"], rtol=1e-5, atol=0)
    torch.testing.assert_close(two["z"], one["z"], rtol=1e-5, atol=1e-6)
    assert (one["z"] - initial_z()).abs().max() > 1e-3  # z really moved: the comparison is not vacuous


def test_fsdp2_shards_z_and_matches_one_process(one_and_two_processes):
    one, two = (r["fsdp2"] for r in one_and_two_processes)
    assert two["z_type"] == "DTensor" and two["z_local_numel"] * 2 == one["z"].numel()  # each rank holds half
    torch.testing.assert_close(two["losses"], one["losses"], rtol=1e-5, atol=0)
    torch.testing.assert_close(two["z"], one["z"], rtol=1e-5, atol=1e-6)
    assert (one["z"] - initial_z()).abs().max() > 1e-3
