"""``hf-roast compress MODEL_DIR OUT_DIR --compression 16``: a dense HF model folder -> a ROAST checkpoint.

The dense model is loaded with its own architecture class (``config.json``'s ``architectures``),
compressed with least-squares initialisation by default (a progress bar runs over the modules), and
saved with ``RoastModel.save_pretrained``: ``config.json`` with ``quantization_config``,
``roast_config.json``, ``model.safetensors`` and the model card. Tokenizer and processor files are
copied, so that ``pipeline(..., model=OUT_DIR)`` works after ``import hf_roast``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

NOT_COPIED_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".h5",
    ".msgpack",
    ".ckpt",
    ".gguf",
    ".index.json",
)
NOT_COPIED_NAMES = {"config.json", "generation_config.json", "roast_config.json", "README.md"}


def build_parser() -> argparse.ArgumentParser:
    from hf_roast.config import RoastConfig
    from hf_roast.vocab import DTYPES, INITS, MAPPERS, SIGNS, Z_BITS

    defaults = RoastConfig()
    p = argparse.ArgumentParser(
        prog="hf-roast compress",
        description="Compress a local Hugging Face model folder into a ROAST / STABLE-RPS checkpoint.",
    )
    p.add_argument(
        "model_dir", help="Folder with config.json and the dense weights (save_pretrained output)."
    )
    p.add_argument("out_dir", help="Folder to write the compressed checkpoint into.")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--compression", type=float, help="Dense weights per stored weight (>= 1; default 16)."
    )
    budget.add_argument("--num-parameters", type=int, help="Explicit length of the shared array z.")
    p.add_argument(
        "--target-modules",
        nargs="+",
        default=None,
        help="'all-linear' (default), one full-match regex, or several names/suffixes.",
    )
    p.add_argument("--exclude-modules", nargs="+", default=None, help="Names/suffixes never to compress.")
    p.add_argument(
        "--compression-pattern",
        nargs="+",
        default=None,
        metavar="KEY=C",
        help="Per-module budgets (RoastConfig.compression_pattern): the modules a KEY matches read their own "
        "segment of z at compression C, e.g. mlp=8 'layers\\.0\\..*'=4; the first matching key wins.",
    )
    p.add_argument("--compress-embeddings", action="store_true", help="Also compress nn.Embedding tables.")
    p.add_argument("--mapper", default=defaults.mapper, choices=list(MAPPERS))
    p.add_argument("--tile", type=int, nargs=2, default=list(defaults.tile), metavar=("ROWS", "COLS"))
    p.add_argument("--sign", default=defaults.sign, choices=list(SIGNS))
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--init", default=defaults.init, choices=list(INITS))
    p.add_argument("--dtype", default=defaults.dtype, choices=list(DTYPES), help="Storage dtype of z.")
    p.add_argument(
        "--z-bits",
        type=int,
        default=None,
        choices=list(Z_BITS),
        help="Bits per stored value of z: 8 or 4 quantise it (one fp32 scale per --z-group-size values); "
        "default: from --dtype (32 or 16).",
    )
    p.add_argument("--z-group-size", type=int, default=defaults.z_group_size, help="Values of z per scale.")
    p.add_argument("--base-model", default=None, help="Hub repo id of the dense model, for the model card.")
    p.add_argument("--license", default=None, help="License for the card (default: the source README's).")
    p.add_argument("--quiet", action="store_true", help="No progress bar.")
    return p


def _target_modules(values: list[str] | None):
    if values is None:
        return "all-linear"
    return (
        values[0]
        if len(values) == 1 and (values[0] == "all-linear" or not values[0].isidentifier())
        else values
    )


def _compression_pattern(values: list[str] | None) -> list[tuple[str, float]] | None:
    """``KEY=C`` arguments as (key, compression) pairs, in order (the first matching key wins)."""
    if values is None:
        return None
    pairs = []
    for value in values:
        key, sep, number = value.rpartition("=")
        try:
            compression = float(number)
        except ValueError:
            compression = None
        if not sep or not key or compression is None:
            raise SystemExit(
                f"error: --compression-pattern {value!r}: write KEY=C, a module name, suffix or regex, then "
                "its compression (e.g. mlp=8)."
            )
        pairs.append((key, compression))
    return pairs


def _copy_side_files(model_dir: str, out_dir: str) -> list[str]:
    """Tokenizer / processor / chat-template files: everything but weights, configs and the card."""
    copied = []
    for name in sorted(os.listdir(model_dir)):
        src = os.path.join(model_dir, name)
        if not os.path.isfile(src) or name.startswith(".") or name in NOT_COPIED_NAMES:
            continue
        if name.endswith(NOT_COPIED_SUFFIXES):
            continue
        shutil.copy2(src, os.path.join(out_dir, name))
        copied.append(name)
    return copied


def load_dense(model_dir: str):
    from hf_roast.checkpoint.folder import model_class_for
    from hf_roast.checkpoint_format import QUANT_METHOD

    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise SystemExit(f"error: {model_dir} has no config.json: pass a folder written by save_pretrained.")
    with open(config_path) as f:
        raw = json.load(f)
    if (raw.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD:
        raise SystemExit(
            f"error: {model_dir} is already a ROAST checkpoint; compress the dense model instead."
        )
    archs = raw.get("architectures") or []
    model_cls = model_class_for(archs)
    if model_cls is None:
        raise SystemExit(
            f"error: {config_path} names no transformers architecture ({archs}); set `architectures`."
        )
    return model_cls.from_pretrained(model_dir, dtype="auto")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from hf_roast import RoastConfig, get_roast_model
    from hf_roast.checkpoint.card import read_card_metadata

    if os.path.abspath(args.model_dir) == os.path.abspath(args.out_dir):
        raise SystemExit(
            "error: OUT_DIR must differ from MODEL_DIR (the dense weights would be overwritten)."
        )
    try:
        config = RoastConfig(
            compression=args.compression,
            num_parameters=args.num_parameters,
            target_modules=_target_modules(args.target_modules),
            exclude_modules=args.exclude_modules,
            compression_pattern=_compression_pattern(args.compression_pattern),
            compress_embeddings=args.compress_embeddings,
            mapper=args.mapper,
            tile=tuple(args.tile),
            sign=args.sign,
            seed=args.seed,
            init=args.init,
            dtype=args.dtype,
            z_bits=args.z_bits,
            z_group_size=args.z_group_size,
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    dense = load_dense(args.model_dir)
    try:
        roast_model = get_roast_model(dense, config, show_progress=not args.quiet)
    except ValueError as e:  # e.g. a pattern key that matches no module
        raise SystemExit(f"error: {e}") from None
    license = args.license or read_card_metadata(args.model_dir).get("license")
    os.makedirs(args.out_dir, exist_ok=True)
    files = roast_model.save_pretrained(args.out_dir, base_model=args.base_model, license=license)
    copied = _copy_side_files(args.model_dir, args.out_dir)
    report = roast_model.compression_report()
    print(
        f"compressed {report['num_modules']} modules: {report['target']['dense_parameters']:,d} -> "
        f"{report['target']['stored_parameters']:,d} parameters ({report['target']['ratio']:.2f}x); whole model "
        f"{report['model']['dense_bytes'] / 2**20:.1f} MiB -> {report['model']['stored_bytes'] / 2**20:.1f} MiB; "
        f"z {report['z_bits']}-bit, {report['z_bytes']:,d} bytes"
    )
    print(f"wrote {args.out_dir}: {', '.join(sorted(set(files) | set(copied)))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
