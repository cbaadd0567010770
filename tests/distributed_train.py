"""Training steps on a tiny compressed Llama, for tests/test_distributed.py: run alone (1 process, the
reference) or under ``accelerate launch`` (2 processes over gloo). Rank 0 writes OUTPUT_DIR/result.pt.

Two runs share the launch (process start-up dominates their cost):
- ``trainer``: the HF Trainer, which accelerate wraps in DistributedDataParallel;
- ``fsdp2``: torch's FSDP2 (``fully_shard`` per decoder layer and the root) in a plain loop. accelerate
  1.15 does not enable FSDP on CPU (its state keeps ``MULTI_CPU``, i.e. DDP, and ignores the FSDP plugin),
  so FSDP2 is driven directly; on GPUs accelerate applies the same ``fully_shard`` calls.
"""

import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from datasets import Dataset
from transformers import Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import VOCAB, tiny_llama  # noqa: E402

from hf_roast import RoastConfig, get_roast_model  # noqa: E402

GLOBAL_BATCH = 8
STEPS = 4


def _model():
    return get_roast_model(tiny_llama(), RoastConfig(compression=4.0, tile=(16, 16)))


def _ids() -> np.ndarray:
    return np.random.default_rng(0).integers(3, VOCAB, size=(GLOBAL_BATCH * STEPS, 16))


def train_with_trainer(output_dir: str, per_device_batch: int) -> dict:
    """``STEPS`` Trainer steps at global batch ``GLOBAL_BATCH``: the logged losses and the final z."""
    ids = _ids()
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=STEPS,
        per_device_train_batch_size=per_device_batch,
        learning_rate=3e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        use_cpu=True,
        ddp_find_unused_parameters=False,
        disable_tqdm=True,
    )
    trainer = Trainer(model=_model(), args=args, train_dataset=data)
    trainer.train()
    return {
        "world_size": trainer.args.world_size,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "wrapped": type(trainer.model_wrapped).__name__,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "z": trainer.model.roast_store.z.detach().clone(),
    }


def train_with_fsdp2(shard: bool) -> dict:
    """``STEPS`` SGD steps at global batch ``GLOBAL_BATCH``; with ``shard`` each process holds half of z.

    Plain SGD keeps z's difference to the reference proportional to the gradients' rounding differences
    (Adam divides by sqrt(v), which blows a rounding difference up wherever a slot's gradient is near 0).
    """
    from torch.distributed.fsdp import fully_shard

    rank, world = (dist.get_rank(), dist.get_world_size()) if shard else (0, 1)
    rm = _model()
    rm.train()
    if shard:
        for layer in rm.base_model.model.layers:
            fully_shard(layer)
        fully_shard(rm.base_model)
    z = rm.roast_store.z
    local_numel = z.to_local().numel() if shard else z.numel()
    opt = torch.optim.SGD(rm.parameters(), lr=0.5)
    batches = torch.from_numpy(_ids()).split(GLOBAL_BATCH)
    losses = []
    for batch in batches:
        local = batch.chunk(world)[rank]
        loss = rm(input_ids=local, labels=local).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        if shard:
            dist.all_reduce(mean)
        losses.append(mean.item() / world)
    z = rm.roast_store.z
    full = z.full_tensor() if shard else z.detach()
    return {"losses": losses, "z": full.clone(), "z_local_numel": local_numel, "z_type": type(z).__name__}


def main(output_dir: str) -> None:
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    result = {"trainer": train_with_trainer(output_dir, GLOBAL_BATCH // world)}
    result["fsdp2"] = train_with_fsdp2(shard=world > 1)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(result, Path(output_dir) / "result.pt")


if __name__ == "__main__":
    main(sys.argv[1])
