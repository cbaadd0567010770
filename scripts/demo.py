"""The main job end to end on an embedded default, offline, in about a minute on 2 CPU cores.

Builds a small Llama (from a config: no download), compresses its attention and MLP projections with
STABLE-RPS, fine-tunes it a few steps with the HF Trainer on embedded text (byte-level tokens), saves
the compressed checkpoint, reloads it, checks the reload is bit-identical, and prints the report.

    hf-roast demo [--compression 16] [--steps 40] [--output-dir roast-demo]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

import torch

TEXT = """\
Randomized parameter sharing stores the weights of a neural network in one small shared array.
Every weight of a compressed layer is read from that array through a cheap hash, so a model that
needed a gigabyte of weights can train and serve from a few tens of megabytes. ROAST hashes whole
tiles instead of single weights, so that a matrix multiplication can read each tile with one
contiguous load. STABLE-RPS folds the model-wide index onto the array with random cyclic shifts,
which recovers the dense model exactly when nothing is compressed and spreads the weights evenly
when the compression is an integer. It also rescales the gradient of each slot, so that training
stays stable whatever the scale of the layers that share it. The compressed model fine-tunes with
the usual trainer, saves only the shared array and the small dense parameters, and loads back
without ever allocating the dense weights it replaced.
"""


def build_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config)


def byte_dataset(text: str, block: int = 64) -> list[dict[str, list[int]]]:
    """Overlapping blocks of UTF-8 bytes (a 256-token vocabulary needs no tokenizer download)."""
    data = list(text.encode("utf-8"))
    return [
        {"input_ids": data[i : i + block], "labels": data[i : i + block]}
        for i in range(0, len(data) - block, block // 2)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-roast demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--compression", type=float, default=16.0, help="compression of the target modules")
    parser.add_argument("--steps", type=int, default=40, help="training steps")
    parser.add_argument("--lr", type=float, default=3e-3, help="learning rate (AdamW)")
    parser.add_argument(
        "--output-dir", default=None, help="where to save the checkpoint (default: a temp dir)"
    )
    args = parser.parse_args(argv)

    from transformers import Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    from hf_roast import RoastConfig, RoastModel, get_roast_model

    hf_logging.set_verbosity_error()
    model = build_model()
    dense_params = sum(p.numel() for p in model.parameters())
    roast = get_roast_model(model, RoastConfig(compression=args.compression, target_modules="all-linear"))
    print(f"dense model: {dense_params:,d} parameters")
    roast.print_trainable_parameters()

    output_dir = args.output_dir or tempfile.mkdtemp(prefix="roast-demo-")
    train = byte_dataset(TEXT)
    trainer = Trainer(
        model=roast,
        args=TrainingArguments(
            output_dir=output_dir,
            max_steps=args.steps,
            per_device_train_batch_size=8,
            learning_rate=args.lr,
            logging_steps=max(1, args.steps // 8),
            report_to=[],
            save_strategy="no",
            seed=0,
        ),
        train_dataset=train,
    )
    first = trainer.evaluate(train)["eval_loss"]
    trainer.train()
    last = trainer.evaluate(train)["eval_loss"]
    print(f"training loss on the demo text: {first:.3f} -> {last:.3f}")

    roast.save_pretrained(output_dir)
    reloaded = RoastModel.from_pretrained(output_dir)
    ids = torch.tensor([list(TEXT[:64].encode())])
    roast.eval()
    with torch.no_grad():
        same = torch.equal(roast(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    print(f"saved to {output_dir}; reloaded logits bit-identical: {same}")
    print("compression report:")
    print(json.dumps(reloaded.compression_report(), indent=2))
    if not same or not last < first:
        print("demo FAILED: the reload differs or the loss did not fall", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
