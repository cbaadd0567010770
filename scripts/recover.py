"""``hf-roast recover MODEL --compression 16 --text FILE... --tokens N --output OUT``: compress, recover, save.

A compressed pre-trained model has lost most of what its dense weights held, and task data alone does not
bring it back. This job compresses the dense model (a folder or a Hub id; the calibrated init on a few
batches of the text with ``--calibrate``), distils the dense model into it on unlabelled text until the
token budget (:func:`hf_roast.recovery.recover`) and writes a checkpoint that records the recovery in
``roast_config.json`` and the model card. Text comes from plain files (one document per non-empty line) or
a ``datasets`` dataset (imported only when ``--dataset`` is given).
"""

from __future__ import annotations

import argparse
import os
import sys

CALIBRATION_BATCHES = 8
"""Batches of the text the calibrated init reads (``--calibrate``); 8 are plenty (docs/usage.md)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hf-roast recover",
        description="Compress a dense model and distil it back into the compressed one on unlabelled text.",
    )
    p.add_argument("model", help="Dense model: a folder written by save_pretrained, or a Hub id.")
    p.add_argument(
        "--compression", type=float, default=16.0, help="Dense weights per stored weight (default 16)."
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument("--text", nargs="+", metavar="FILE", help="Plain text files, one document per line.")
    source.add_argument("--dataset", help="A `datasets` dataset name (or local path) to read the text from.")
    p.add_argument("--split", default="train", help="The dataset's split (default train).")
    p.add_argument("--column", default="text", help="The dataset's text column (default text).")
    p.add_argument("--tokens", type=int, required=True, help="Token budget: stop after this many tokens.")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512, help="Tokens per document at most (truncated).")
    p.add_argument(
        "--lr", type=float, default=5e-5, help="The dense model's training rate (the recipe scales it)."
    )
    p.add_argument(
        "--hidden-weight",
        type=float,
        default=1.0,
        help="Weight of the hidden states' MSE beside the logits' KL (0: logits only, what a decoder such as "
        "Llama wants: its hidden states' MSE outweighs the KL; see docs/usage.md).",
    )
    p.add_argument("--calibrate", action="store_true", help="Calibrated init on a few batches of the text.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the data order and dropout.")
    p.add_argument("--output", required=True, help="Folder to write the recovered checkpoint into.")
    p.add_argument("--save-every", type=int, default=None, help="Write a checkpoint every this many tokens.")
    p.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Continue from the latest checkpoint in --output (default; --no-resume starts over).",
    )
    p.add_argument("--quiet", action="store_true", help="No progress bars.")
    return p


def read_text_files(paths: list[str]) -> list[str]:
    """One document per non-empty line of each file."""
    docs = []
    for path in paths:
        if not os.path.isfile(path):
            raise SystemExit(
                f"error: --text {path}: no such file. Pass plain text files, one document per line."
            )
        with open(path, encoding="utf-8") as f:
            docs += [line.strip() for line in f if line.strip()]
    if not docs:
        raise SystemExit(f"error: --text {' '.join(paths)} holds no text: every line is empty.")
    return docs


def read_dataset(name: str, split: str, column: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise SystemExit("error: --dataset needs the `datasets` package: pip install datasets.") from None
    data = datasets.load_dataset(name, split=split)
    if column not in data.column_names:
        raise SystemExit(
            f"error: {name} ({split}) has no column {column!r}; pick one of {data.column_names} with --column."
        )
    return data[column]


def load_dense(model: str):
    """The dense model with its own architecture class, from a folder (as ``hf-roast compress``) or the Hub."""
    if os.path.isdir(model):
        from hf_roast.scripts.compress_folder import load_dense as load_folder

        return load_folder(model)
    from transformers import AutoConfig

    from hf_roast.checkpoint.folder import model_class_for

    config = AutoConfig.from_pretrained(model)
    model_cls = model_class_for(getattr(config, "architectures", None))
    if model_cls is None:
        raise SystemExit(f"error: {model}'s config names no transformers architecture; set `architectures`.")
    return model_cls.from_pretrained(model, dtype="auto")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.text and not args.dataset:
        raise SystemExit(
            "error: no text to recover on: pass --text FILE... or --dataset NAME [--split --column]."
        )
    if os.path.abspath(args.output) == os.path.abspath(args.model):
        raise SystemExit("error: --output must differ from MODEL (the dense weights would be overwritten).")
    from transformers import AutoTokenizer

    from hf_roast import RoastConfig, get_roast_model
    from hf_roast.recovery import batch_indices, recover, tokenize_batch

    if args.text:
        docs = read_text_files(args.text)
        data = "text files " + ", ".join(os.path.basename(p) for p in args.text)
    else:
        docs = read_dataset(args.dataset, args.split, args.column)
        data = f"dataset {args.dataset} (split {args.split}, column {args.column})"
    try:
        config = RoastConfig(compression=args.compression)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    first = tokenize_batch(
        tokenizer, [docs[i] for i in batch_indices(len(docs), args.batch_size, args.seed, 0)], args.max_length
    )
    if int(first["attention_mask"].sum()) > args.tokens:
        raise SystemExit(
            f"error: --tokens {args.tokens:,} is less than one batch ({int(first['attention_mask'].sum()):,} tokens): "
            "raise --tokens or lower --batch-size / --max-length."
        )
    teacher = load_dense(args.model)
    # compressed in place, so a second copy; trained in fp32 (bf16 weights would lose the small updates)
    student_dense = load_dense(args.model).float()
    calibration = None
    if args.calibrate:
        calibration = [
            tokenize_batch(
                tokenizer,
                [docs[i] for i in batch_indices(len(docs), args.batch_size, args.seed + 1, s)],
                args.max_length,
            )
            for s in range(CALIBRATION_BATCHES)
        ]
    student = get_roast_model(
        student_dense, config, show_progress=not args.quiet, calibration_data=calibration
    )
    try:
        report = recover(
            student,
            teacher,
            docs,
            tokenizer,
            token_budget=args.tokens,
            batch_size=args.batch_size,
            max_length=args.max_length,
            lr=args.lr,
            hidden_weight=args.hidden_weight,
            output_dir=args.output,
            save_every=args.save_every,
            resume=args.resume,
            seed=args.seed,
            data_description=data,
            teacher_name=args.model,
            show_progress=not args.quiet,
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(
        f"recovered {args.compression:g}x on {report.tokens:,d} tokens ({report.steps} steps) of {data}: "
        f"distillation loss {report.losses[0]:.4f} -> {report.final_loss:.4f}; wrote {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
