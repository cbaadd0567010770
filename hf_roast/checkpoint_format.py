"""The on-disk contract of an hf_roast checkpoint: names, versions, and reading and validating what is stored.

Everything a reader must agree on with a writer lives here, and nothing else does:

* file and key names: ``roast_config.json`` (:data:`CONFIG_NAME`), ``quant_method: "roast"``
  (:data:`QUANT_METHOD`), the ``roast_store.z`` tensor (:data:`STORE_NAME`), the empty ``<module>.weight``
  markers (:data:`MARKER_SUFFIX`);
* the layout version (:data:`FORMAT_VERSION`) and the plan digest (``plan_sha256``);
* reading the stored ROAST config (:func:`read_roast_dict`), validating it (:func:`parse_roast_config`),
  the safetensors headers (:func:`tensor_headers`) and the no-pickle rule (:func:`check_no_pickle`).

It sits just above the config and the mapping and imports nothing else of hf_roast, so the writer
(:mod:`hf_roast.checkpoint.folder`), the transformers quantizer (:mod:`hf_roast.quantizer`) and the
model all read the same contract from below.
"""

from __future__ import annotations

import glob
import json
import os
import re
import warnings

from safetensors import SafetensorError, safe_open

from .config import RoastConfig
from .mapping import MappingPlan, plan_digest
from .quant import QuantizedZ
from .vocab import check_mapping_version

FORMAT_VERSION = "1.4"
"""Version of the on-disk layout (file names and keys), "major.minor"; independent of the mapping version.

1.0 (stored as the integer 1): the first layout. 1.1: adds ``plan_sha256``. 1.2: adds ``z_bits``,
``z_group_size`` and ``z_qat`` (absent: float z as before), and a packed z stored as ``roast_store.z_codes``
and ``roast_store.z_scales`` instead of ``roast_store.z``. 1.3: adds ``compression_pattern`` (a list of
``[key, compression]`` pairs, or null) and, under a pattern, each tile-mapper module's ``segment_start_tile``
and ``segment_tiles`` in the plan (absent: the module reads all of z, as before). 1.4: adds the optional
``recovery`` (:data:`RECOVERY_KEY`, an object: what ``hf-roast recover`` distilled the checkpoint on, for how
many tokens, from which teacher, to what loss; absent: no recorded recovery; a 1.3 reader ignores it with a
warning, as below, and loads the same weights). A reader loads any older
version and a newer minor one (ignoring the config keys it does not know, with a warning; a plan whose
modules carry keys it does not know is refused as malformed, since it would read other slots); it refuses a
newer major one.
"""

CONFIG_NAME = "roast_config.json"
"""The ROAST config and plan, beside transformers' ``config.json``."""
QUANT_METHOD = "roast"
"""``config.json``'s ``quantization_config.quant_method``: what transformers looks the quantizer up by."""
STORE_NAME = "roast_store"
"""The module that owns z; its state-dict key ``roast_store.z`` is z in the safetensors files."""
RECOVERY_KEY = "recovery"
"""``roast_config.json``'s optional record of a recovery run (:mod:`hf_roast.recovery`); provenance only: it
never changes how the weights are read."""
FORMAT_KEYS = frozenset({"plan", "plan_sha256", "quant_method", "format_version", RECOVERY_KEY})
"""Keys the format stores beside the RoastConfig fields (``quant_method`` in ``config.json``'s copy)."""
MARKER_SUFFIX = ".weight"
"""Each compressed module ``m`` stores an empty ``m.weight``: the tensor a dense model cannot load."""
SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
"""RoastConfig.dtype -> the safetensors header dtype of z."""
Z_KEY, Z_CODES_KEY, Z_SCALES_KEY = "z", "z_codes", "z_scales"
"""The store's tensors: float z (or the QAT master), or a packed z's integer codes and fp32 group scales."""
PACKED_DTYPES = {8: "I8", 4: "U8"}
"""z_bits -> the safetensors header dtype of ``z_codes`` (4 bits: two codes per byte)."""


def z_tensor_headers(config: RoastConfig, plan: MappingPlan) -> dict[str, tuple[tuple[int, ...], str]]:
    """The (shape, safetensors dtype) of every stored tensor of z, by full key, as ``config`` says."""
    n = plan.num_slots
    if config.z_packed:
        return {
            f"{STORE_NAME}.{Z_CODES_KEY}": (
                (QuantizedZ.codes_numel(n, config.z_bits),),
                PACKED_DTYPES[config.z_bits],
            ),
            f"{STORE_NAME}.{Z_SCALES_KEY}": ((n // config.z_group_size,), "F32"),
        }
    return {f"{STORE_NAME}.{Z_KEY}": ((n,), SAFETENSORS_DTYPES[config.dtype])}


def roast_config_dict(config: RoastConfig, plan: MappingPlan, scaler: str) -> dict:
    """The content of ``roast_config.json`` (and of ``config.json``'s ``quantization_config``, less
    ``quant_method``): the RoastConfig fields, the format version, the plan, its digest and the scaler."""
    d = config.to_dict()
    d["format_version"] = FORMAT_VERSION
    d["plan"] = plan.to_dict()
    d["plan_sha256"] = plan.digest()
    d["scaler"] = scaler
    return d


# ---- reading and checking -------------------------------------------------------------------------
PICKLE_FILES = re.compile(r".*\.(bin|pt|pth|pkl|pickle|ckpt)")
TRAINER_STATE_FILES = re.compile(r"(optimizer|scheduler|scaler)\.pt|rng_state(_\d+)?\.pth|training_args\.bin")
"""What a Trainer checkpoint folder holds beside the model: never read by hf_roast, so never warned about."""


def check_no_pickle(directory: str) -> None:
    """Refuse a folder whose weights exist only as pickle files; warn that pickles beside safetensors are
    ignored. Unpickling can execute code, so hf_roast reads safetensors and JSON only."""
    names = sorted(os.listdir(directory))
    pickles = [n for n in names if PICKLE_FILES.fullmatch(n) and not TRAINER_STATE_FILES.fullmatch(n)]
    if not pickles:
        return
    if not any(n.endswith(".safetensors") for n in names):
        raise ValueError(
            f"{directory} holds weights only as pickle files {pickles[:4]}: hf_roast reads safetensors and JSON "
            "only, because loading a pickle can execute code from the file. Ask for (or write, from a model you "
            "trust) a safetensors checkpoint: RoastModel.save_pretrained writes one."
        )
    warnings.warn(
        f"Ignoring {pickles[:4]} in {directory}: hf_roast reads the safetensors weights only (a pickle can "
        "execute code when loaded).",
        stacklevel=3,
    )


def _weight_files(directory: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{directory} holds no .safetensors file: the checkpoint is incomplete.")
    return files


def _open_error(path: str, e: Exception) -> ValueError:
    return ValueError(
        f"Cannot read {path}: the file is truncated or corrupt ({e}). Download or save the checkpoint again."
    )


def tensor_headers(directory: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor's (shape, safetensors dtype such as ``"F32"``) from the headers, reading no data.

    Opening validates the header against the file size, so a truncated file fails here, with a clear
    message, rather than deep inside transformers.
    """
    headers: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in _weight_files(directory):
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    headers[key] = (tuple(piece.get_shape()), piece.get_dtype())
        except (SafetensorError, OSError, RuntimeError) as e:
            raise _open_error(path, e) from e
    return headers


def read_roast_dict(directory: str | os.PathLike) -> tuple[dict, str]:
    """The stored ROAST config: ``roast_config.json``, else ``config.json``'s ``quantization_config``."""
    path = os.path.join(directory, CONFIG_NAME)
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f), path
    hf_path = os.path.join(directory, "config.json")
    if os.path.isfile(hf_path):
        with open(hf_path) as f:
            qc = json.load(f).get("quantization_config") or {}
        if qc.get("quant_method") == QUANT_METHOD:
            return {k: v for k, v in qc.items() if k != "quant_method"}, hf_path
    raise FileNotFoundError(
        f"{directory} has neither {CONFIG_NAME} nor a config.json with quant_method 'roast': it is not an hf_roast "
        "checkpoint. Compress a dense model with get_roast_model or `hf-roast compress` first."
    )


def format_version(raw: dict, source: str) -> tuple[int, int]:
    """The stored ``format_version`` as (major, minor); 1.0 was written as the integer 1."""
    value = raw.get("format_version", 1)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value, 0
    if isinstance(value, str) and re.fullmatch(r"[1-9]\d*\.\d+", value):
        major, minor = value.split(".")
        return int(major), int(minor)
    raise ValueError(
        f"{source}: format_version {value!r} is not a version such as '1.1'; the file is damaged."
    )


def check_plan_digest(raw: dict, plan_raw: dict, fmt: tuple[int, int], source: str) -> None:
    """From format 1.1 on (or whenever a digest is stored), the plan must match its ``plan_sha256``."""
    if "plan_sha256" in raw or fmt >= (1, 1):
        if raw.get("plan_sha256") != plan_digest(plan_raw):
            raise ValueError(
                f"{source}: the plan does not match its plan_sha256 digest: the file was edited or damaged "
                "(a changed plan would read other weights). Download or save the checkpoint again."
            )


def parse_roast_config(raw: dict, source: str) -> tuple[RoastConfig, MappingPlan]:
    """RoastConfig and plan from a stored dict, checking the versions, the plan's digest and consistency.

    Every refusal is a ValueError that names the offending field.
    """
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: a ROAST config is a JSON object, got {type(raw).__name__}.")
    plan_raw = raw.get("plan")
    version = raw.get(
        "mapping_version", plan_raw.get("mapping_version") if isinstance(plan_raw, dict) else None
    )
    check_mapping_version(version, source)
    fmt = format_version(raw, source)
    ours = tuple(int(p) for p in FORMAT_VERSION.split("."))
    if fmt[0] > ours[0]:
        raise ValueError(
            f"{source} has checkpoint format_version {fmt[0]}.{fmt[1]}, a newer major version than this hf_roast "
            f"reads ({FORMAT_VERSION}): upgrade hf_roast."
        )
    if not isinstance(plan_raw, dict):
        raise ValueError(f"{source} has no module plan: it is not a complete hf_roast checkpoint.")
    check_plan_digest(raw, plan_raw, fmt, source)
    if not isinstance(raw.get(RECOVERY_KEY, {}), dict):
        raise ValueError(
            f"{source}: {RECOVERY_KEY!r} must be a JSON object (the record of a recovery run); the file was edited."
        )
    config = RoastConfig.from_dict(raw, FORMAT_KEYS)
    try:
        plan = MappingPlan.from_dict(plan_raw)
        plan.check()
    except (TypeError, KeyError, AttributeError, ValueError) as e:
        raise ValueError(f"{source}: the plan is malformed ({e}).") from e
    check_mapping_version(plan.mapping_version, f"{source} (plan)")
    mismatched = [
        name
        for name in ("mapper", "sign", "seed", "tile")
        if _as_tuple(getattr(plan, name)) != _as_tuple(getattr(config, name))
    ]
    if mismatched:
        raise ValueError(
            f"{source}: the plan disagrees with the config on {', '.join(mismatched)}; the file was edited."
        )
    return config, plan


def _as_tuple(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value
