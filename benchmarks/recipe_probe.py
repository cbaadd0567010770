"""``python -m benchmarks.recipe_probe``: fine-tune one recipe setting on a Rotten Tomatoes subset, print validation accuracy.

The probes that chose the defaults of :mod:`hf_roast.optim` and the calibrated init (README, "The
fine-tuning recipe and how its defaults were chosen"). One setting per call, one JSON line per result
(appended to ``--output``), so a grid runs as a shell loop and resumes by skipping finished lines.

    python -m benchmarks.recipe_probe --method dense --lr 5e-5
    python -m benchmarks.recipe_probe --compression 4 --init output --z-ratio 4 --uncompressed-ratio 20 --head-ratio 20
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.recipe_probe", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--method", choices=["roast", "dense"], default="roast")
    p.add_argument("--compression", type=float, default=4.0)
    p.add_argument("--lr", type=float, default=5e-5, help="The dense fine-tuning rate the recipe scales.")
    p.add_argument("--z-ratio", type=float, default=4.0)
    p.add_argument("--uncompressed-ratio", type=float, default=20.0)
    p.add_argument("--head-ratio", type=float, default=20.0)
    p.add_argument(
        "--init",
        choices=["ls", "diagonal", "output"],
        default="output",
        help="Plain least squares, or calibrated on 256 training sentences (diagonal / output error).",
    )
    p.add_argument("--train-size", type=int, default=4000)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output", default="recipe_probes.jsonl", help="JSON lines file results are appended to.")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

    from benchmarks.harness.arms import Arm, roast_config_for
    from benchmarks.harness.classification import _encode, accuracy, calibration_batches
    from benchmarks.harness.data import cache_dir
    from benchmarks.harness.sources import minilm_classification_source
    from hf_roast import RoastRecipe, get_roast_model
    from hf_roast.optim import roast_trainer_class

    if args.threads:
        torch.set_num_threads(args.threads)
    source = minilm_classification_source(args.train_size, 1000)
    data, tok = source.data, source.tokenizer
    train_set = _encode(tok, data.train_texts, data.train_labels, 64)
    val_set = _encode(tok, data.val_texts, data.val_labels, 64)
    set_seed(0)
    model = source.load_model(len(data.label_names))
    if args.method == "roast":
        calibration = None if args.init == "ls" else calibration_batches(train_set, tok, 32)
        model = get_roast_model(
            model,
            roast_config_for(Arm("probe", "roast", args.compression)),
            calibration_data=calibration,
            calibration=args.init if calibration else "output",
        )
    steps = math.ceil(len(train_set) / 32) * args.epochs
    training = TrainingArguments(
        output_dir=str(cache_dir() / "recipe-probe"),
        per_device_train_batch_size=32,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        warmup_steps=math.ceil(0.1 * steps),
        lr_scheduler_type="linear",
        seed=0,
        data_seed=0,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )
    kwargs = dict(
        model=model, args=training, train_dataset=train_set, data_collator=DataCollatorWithPadding(tok)
    )
    if args.method == "roast":
        recipe = RoastRecipe(args.z_ratio, args.uncompressed_ratio, args.head_ratio)
        trainer = roast_trainer_class()(roast_recipe=recipe, **kwargs)
    else:
        trainer = Trainer(**kwargs)
    start = time.perf_counter()
    loss = trainer.train().training_loss
    result = dict(vars(args), val_accuracy=accuracy(model, val_set, tok, 128), train_loss=loss)
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result))
    with Path(args.output).open("a") as f:
        f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
