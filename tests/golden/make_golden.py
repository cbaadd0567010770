"""Write the golden checkpoints that pin the on-disk format and the mapping (run by hand, never by tests).

Each folder holds a checkpoint saved by this release and ``expected.safetensors`` (input ids and the
logits they gave). ``tests/test_golden.py`` loads every folder with today's code and must reproduce the
logits: a change to the mapping formulas, the key layout or the config that would make old checkpoints
load differently fails there. Never overwrite a folder; add a new one when the format moves on.

    python tests/golden/make_golden.py [NAME ...]  # from the repository root; NAMEs: only those fixtures
"""

import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from helpers import tiny_gpt2, tiny_llama  # noqa: E402

from hf_roast import RoastConfig, get_roast_model  # noqa: E402
from hf_roast.checkpoint_format import FORMAT_VERSION  # noqa: E402

FIXTURES = {
    "llama-stable-8x": (tiny_llama, RoastConfig(compression=8.0, tile=(16, 16))),
    "llama-hashednet-4x": (tiny_llama, RoastConfig(compression=4.0, mapper="hashednet")),
    "llama-stable-pattern": (
        tiny_llama,
        RoastConfig(compression=16.0, tile=(16, 16), compression_pattern={"mlp": 8.0, r"layers\.0\..*": 4.0}),
    ),
    "gpt2-roast-8x-embeddings": (
        tiny_gpt2,
        RoastConfig(
            compression=8.0,
            mapper="roast",
            sign="element",
            tile=(8, 8),
            compress_embeddings=True,
            exclude_modules=["wte"],
        ),
    ),
}


def main(names: list[str]) -> None:
    root = os.path.dirname(os.path.abspath(__file__))
    for name, (build, config) in FIXTURES.items():
        if names and name not in names:
            continue
        folder = os.path.join(root, f"v{FORMAT_VERSION}-{name}")
        if os.path.exists(folder):
            print(f"{folder} exists: left as it is")
            continue
        model = get_roast_model(build(seed=3), config)
        with torch.no_grad():  # a trained-looking z, not the projection's exact output
            model.roast_store.z.add_(
                0.01 * torch.randn(model.roast_store.z.shape, generator=torch.Generator().manual_seed(0))
            )
        model.save_pretrained(folder, model_card=False)
        ids = torch.tensor([[1, 5, 17, 42, 88, 3, 64, 9, 2]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        save_file(
            {"input_ids": ids, "logits": logits.contiguous()}, os.path.join(folder, "expected.safetensors")
        )
        print(f"wrote {folder}")


if __name__ == "__main__":
    main(sys.argv[1:])
