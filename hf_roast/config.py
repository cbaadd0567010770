"""RoastConfig: what to compress, how hard, and with which mapping."""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import asdict, dataclass, field, fields

import torch

from .vocab import (
    BACKENDS,
    DTYPES,
    INITS,
    MAPPERS,
    MAPPING_VERSION,
    SCALERS,
    SIGNS,
    SLICEOUT_MODES,
    Z_BITS,
    Z_INT_BITS,
    check_choice,
    check_keep_fraction,
    check_mapping_version,
)

TRAINING_ONLY = ("sliceout_keep", "sliceout_mode", "sliceout_seed")
"""Fields that only change how a training step computes, never the weights: not stored in checkpoints (a loaded
model has their defaults; set them again to keep training with them)."""


@dataclass
class RoastConfig:
    """Configuration of ROAST / STABLE-RPS parameter sharing, in the style of a PEFT config."""

    compression: float | None = field(
        default=None,
        metadata={
            "help": "Dense weights of the target modules per stored weight of z (>= 1.0). 16 stores 1/16th. "
            "Defaults to 16 when num_parameters is not given either."
        },
    )
    num_parameters: int | None = field(
        default=None,
        metadata={"help": "An explicit budget: the length of the shared array z. Excludes `compression`."},
    )
    compression_pattern: dict[str, float] | None = field(
        default=None,
        metadata={
            "help": "Per-module budgets, like PEFT's rank_pattern: {key: compression}. A key matches a compressed "
            "module whose full name, or the name of a module containing it, equals the key or ends in '.' + key; "
            r"keys are regexes over whole name components (e.g. 'mlp', r'layers\.0\..*'). The first matching key "
            "wins. Each key's modules read from their own segment of z, sized from their weights at the key's "
            "compression (whole tiles); the other modules share the rest of z, sized at `compression` (or what "
            "`num_parameters` leaves). z is the sum of the segments. A key that matches no module, or whose "
            "segment is smaller than one tile, raises. Stored as [[key, compression], ...] to keep the order."
        },
    )
    target_modules: str | list[str] | None = field(
        default="all-linear",
        metadata={
            "help": "Modules to compress. 'all-linear': every nn.Linear / Conv1D but the output layer. Another "
            "string is a regex that must match the full module name; a list matches names exactly or by suffix."
        },
    )
    exclude_modules: str | list[str] | None = field(
        default=None,
        metadata={"help": "Modules never to compress: a full-match regex or a list of names/suffixes."},
    )
    compress_embeddings: bool = field(
        default=False,
        metadata={
            "help": "Also compress nn.Embedding tables (by rows); lookups gather only the rows they need."
        },
    )
    mapper: str = field(
        default="stable",
        metadata={
            "help": "'stable': STABLE-RPS RandomFold (exact at 1x, balanced). 'roast': ICML-2023 tile hashing. "
            "'hashednet': per-element hashing into per-module arrays (the baseline)."
        },
    )
    tile: tuple[int, int] | list[int] = field(
        default=(32, 32),
        metadata={
            "help": "Mapping tile (rows, cols) of a weight matrix read from one contiguous span of z. Part of "
            "the checkpoint format, independent of any kernel block size."
        },
    )
    sign: str = field(
        default="tile",
        metadata={"help": "Random sign g(i): 'none', 'tile' (one per mapping tile) or 'element'."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the hash; part of the checkpoint format."})
    init: str = field(
        default="auto",
        metadata={
            "help": "'pretrained': least-squares projection of the dense weights being replaced. 'random': "
            "z ~ N(0, 1) with each module's own init std as lambda. 'auto': pretrained when the model's "
            "weights are materialised, random otherwise."
        },
    )
    scaler: str = field(
        default="v5",
        metadata={"help": "STABLE-RPS gradient scaler applied to dz: 'v5' (default), 'v1' or 'none'."},
    )
    module_balance: bool = field(
        default=False,
        metadata={
            "help": "Training only: scale each module's gradient on z to the modules' common RMS before they are "
            "summed (one running scalar per module). Under Adam a shared slot otherwise steps for whichever module "
            "has the largest gradients there, and modules with small ones (attention queries and keys) barely "
            "train. Not part of the mapping or the checkpoint's weights. See hf_roast.balance."
        },
    )
    sliceout_keep: float = field(
        default=1.0,
        metadata={
            "help": "Training only: SliceOut. The fraction in (0, 1] of each block's units (whole attention heads "
            "with their key/value heads; tile-aligned blocks of MLP units) that a training step computes: the "
            "dropped units' tile rows of q/k/v/gate/up and tile columns of o/down are never read from z, "
            "multiplied or given a gradient, and o/down rescale what they sum by (units / kept units), like "
            "dropout. 1.0: off, bit for bit the model without it. model.eval() always runs the full model. "
            "Llama-style blocks (q/k/v/o_proj, gate/up/down_proj) or BERT-style ones (attention.self.query/key/"
            "value -> attention.output.dense, intermediate.dense -> output.dense) with sign 'tile' or 'none' and "
            "a tile mapper. "
            "Not stored in checkpoints. See hf_roast.sliceout."
        },
    )
    sliceout_mode: str = field(
        default="random",
        metadata={
            "help": "Training only: which units SliceOut keeps each step: 'random' (a uniform subset, unbiased "
            "after the rescale) or 'contiguous' (one run of units at a uniform start, as the SliceOut paper; "
            "units near the ends are kept less often). Not stored in checkpoints."
        },
    )
    sliceout_seed: int = field(
        default=0,
        metadata={
            "help": "Training only: seed of SliceOut's masks; the mask of a block at a step is a function of "
            "(seed, step, block), so a recomputed forward (gradient checkpointing) drops the same units. "
            "Not stored in checkpoints."
        },
    )
    dtype: str = field(
        default="float32",
        metadata={"help": "Storage dtype of z. It is cast to the activation dtype when read."},
    )
    backend: str = field(
        default="auto",
        metadata={
            "help": "Execution path: 'auto' (Triton kernels on CUDA when triton is installed; on CPU the fused "
            "gather-GEMV for inference calls of at most 16 rows; else PyTorch), 'torch', 'triton' or 'cpu'. "
            "The HF_ROAST_BACKEND environment variable overrides it."
        },
    )
    z_bits: int | None = field(
        default=None,
        metadata={
            "help": "Bits per stored value of z: 32 (float32), 16 (dtype bfloat16/float16), 8 or 4 (integers with "
            "one fp32 scale per group of z_group_size contiguous values). None: from `dtype` (32 or 16)."
        },
    )
    z_group_size: int = field(
        default=128,
        metadata={
            "help": "Values of z per quantisation scale (z_bits 8 and 4): an even number that divides the tile's "
            "size, so every group lies inside one slot tile."
        },
    )
    z_qat: bool = field(
        default=False,
        metadata={
            "help": "With z_bits 8 or 4: keep an fp32 master z and quantise it in every forward pass "
            "(quantisation-aware training, straight-through gradients). False: z is stored packed (inference)."
        },
    )
    mapping_version: int = field(
        default=MAPPING_VERSION,
        metadata={
            "help": "Version of the mapping formulas; a checkpoint made by another version refuses to load."
        },
    )

    def __post_init__(self) -> None:
        """Validate every field; each error is a ValueError that names the field and the fix."""
        if self.compression is not None and self.num_parameters is not None:
            raise ValueError("Give either `compression` or `num_parameters`, not both.")
        if self.compression is None and self.num_parameters is None:
            self.compression = 16.0
        if self.compression is not None:
            if (
                isinstance(self.compression, bool)
                or not isinstance(self.compression, (int, float))
                or not math.isfinite(self.compression)
            ):
                raise ValueError(f"compression must be a finite number >= 1.0, got {self.compression!r}.")
            if self.compression < 1.0:
                raise ValueError(
                    f"compression={self.compression} < 1.0 would store more weights than the dense model: "
                    "use compression >= 1.0 (1.0 is an exact copy with the stable mapper)."
                )
            self.compression = float(self.compression)
        self._check_compression_pattern()
        if self.num_parameters is not None and (
            isinstance(self.num_parameters, bool)
            or not isinstance(self.num_parameters, int)
            or self.num_parameters < 1
        ):
            raise ValueError(f"num_parameters must be a positive int, got {self.num_parameters!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {self.seed!r}.")
        if not isinstance(self.compress_embeddings, bool):
            raise ValueError(f"compress_embeddings must be True or False, got {self.compress_embeddings!r}.")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if not (
                value is None
                or isinstance(value, str)
                or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value))
            ):
                raise ValueError(f"{name} must be a string (regex), a list of names or None, got {value!r}.")
            if isinstance(value, str) and value != "all-linear":
                try:
                    re.compile(value)
                except re.error as e:
                    raise ValueError(f"{name}={value!r} is not a valid regular expression: {e}.") from e
        for name, choices in (
            ("mapper", MAPPERS),
            ("sign", SIGNS),
            ("init", INITS),
            ("scaler", SCALERS),
            ("dtype", DTYPES),
            ("backend", BACKENDS),
        ):
            check_choice(name, getattr(self, name), choices)
        tile = tuple(self.tile) if isinstance(self.tile, (list, tuple)) else None
        if (
            tile is None
            or len(tile) != 2
            or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 1 for t in tile)
        ):
            raise ValueError(f"tile must be two positive ints (rows, cols), got {self.tile!r}.")
        if tile[0] * tile[1] > 1 << 20:
            raise ValueError(f"tile {tile} holds over 2**20 weights: use a smaller tile such as (32, 32).")
        self.tile = tile
        if self.target_modules is None or (
            isinstance(self.target_modules, (list, tuple)) and not self.target_modules
        ):
            if not self.compress_embeddings:
                raise ValueError(
                    "target_modules is empty and compress_embeddings is False: nothing to compress."
                )
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.exclude_modules, tuple):
            self.exclude_modules = list(self.exclude_modules)
        self._check_z_bits()
        if not isinstance(self.module_balance, bool):
            raise ValueError(f"module_balance must be True or False, got {self.module_balance!r}.")
        self._check_sliceout()
        check_mapping_version(self.mapping_version)

    def _check_sliceout(self) -> None:
        """sliceout_keep in (0, 1], a known sliceout_mode, a non-negative int sliceout_seed."""
        self.sliceout_keep = check_keep_fraction(self.sliceout_keep)
        check_choice("sliceout_mode", self.sliceout_mode, SLICEOUT_MODES)
        seed = self.sliceout_seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"sliceout_seed must be an int in [0, 2**63), got {seed!r}.")

    def _check_compression_pattern(self) -> None:
        """A dict (or the stored list of [key, compression] pairs) of regex keys to compressions >= 1."""
        pattern = self.compression_pattern
        if pattern is None:
            return
        if isinstance(pattern, (list, tuple)):  # the stored form: pairs keep the order JSON would sort
            if not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pattern):
                raise ValueError(
                    f"compression_pattern must be a dict {{key: compression}} (or a list of [key, compression] "
                    f"pairs), got {pattern!r}."
                )
            keys = [k for k, _ in pattern]
            if len(set(map(repr, keys))) != len(keys):
                raise ValueError(f"compression_pattern repeats a key: {keys!r}.")
            pattern = dict(pattern)
        if not isinstance(pattern, dict):
            raise ValueError(
                f"compression_pattern must be a dict {{key: compression}} such as {{'mlp': 8}}, got {pattern!r}."
            )
        checked = {}
        for key, value in pattern.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"compression_pattern keys are module names or regexes, got {key!r}.")
            try:
                re.compile(f"(?:{key})")  # as a part of the name pattern it is matched in (no global flags)
            except re.error as e:
                raise ValueError(
                    f"compression_pattern key {key!r} is not a valid regular expression: {e}."
                ) from e
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(
                    f"compression_pattern[{key!r}] must be a finite number >= 1.0, got {value!r}."
                )
            if value < 1.0:
                raise ValueError(
                    f"compression_pattern[{key!r}]={value} < 1.0 would store more weights than the modules it "
                    "matches: use a compression >= 1.0."
                )
            checked[key] = float(value)
        self.compression_pattern = checked or None

    def _check_z_bits(self) -> None:
        """z_bits (resolved from dtype when None), z_group_size and z_qat; ValueErrors name the fix."""
        float_bits = 32 if self.dtype == "float32" else 16
        if self.z_bits is None:
            self.z_bits = float_bits
        if isinstance(self.z_bits, bool) or self.z_bits not in Z_BITS:
            raise ValueError(f"z_bits must be one of {', '.join(map(str, Z_BITS))}, got {self.z_bits!r}.")
        if self.z_bits in Z_INT_BITS:
            if self.dtype != "float32":
                raise ValueError(
                    f"z_bits={self.z_bits} stores integers with fp32 scales (and trains an fp32 master with "
                    f"z_qat): leave dtype='float32' (got {self.dtype!r})."
                )
        elif self.z_bits != float_bits:
            raise ValueError(
                f"z_bits={self.z_bits} disagrees with dtype={self.dtype!r} ({float_bits} bits): use "
                + ("dtype='bfloat16' or 'float16'" if self.z_bits == 16 else "dtype='float32'")
                + ", or z_bits=8 / 4 for integer storage."
            )
        g = self.z_group_size
        if isinstance(g, bool) or not isinstance(g, int) or g < 2 or g % 2 or g > 1 << 16:
            raise ValueError(f"z_group_size must be an even int in [2, 65536] (e.g. 128), got {g!r}.")
        if self.z_bits in Z_INT_BITS and (self.tile[0] * self.tile[1]) % g:
            raise ValueError(
                f"z_group_size={g} does not divide the {self.tile[0]}x{self.tile[1]} tile "
                f"({self.tile[0] * self.tile[1]} values): every group must lie inside one slot tile. Use a "
                "divisor of the tile size, such as 128 for a 32x32 tile."
            )
        if not isinstance(self.z_qat, bool):
            raise ValueError(f"z_qat must be True or False, got {self.z_qat!r}.")
        if self.z_qat and self.z_bits not in Z_INT_BITS:
            raise ValueError(
                f"z_qat=True trains against an integer grid: set z_bits=8 or 4 (got z_bits={self.z_bits})."
            )

    @property
    def z_packed(self) -> bool:
        """Whether z is stored as packed integers and scales (z_bits 8/4 without QAT)."""
        return self.z_bits in Z_INT_BITS and not self.z_qat

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_dict(self) -> dict:
        """The stored form (``roast_config.json``). Training-time options (:data:`TRAINING_ONLY`) are left
        out: they do not change the weights, so a checkpoint is the same file with or without them."""
        d = asdict(self)
        for name in TRAINING_ONLY:
            d.pop(name)
        d["tile"] = list(self.tile)
        if self.compression_pattern:  # pairs: JSON writers sort keys, and the order decides the first match
            d["compression_pattern"] = [[k, v] for k, v in self.compression_pattern.items()]
        if self.z_bits not in Z_INT_BITS:  # float z: its width is dtype's, stored once (as dtype)
            d["z_bits"] = None
        return d

    @classmethod
    def from_dict(cls, d: dict, format_keys: frozenset[str] = frozenset()) -> RoastConfig:
        """A config from a stored dict. ``format_keys`` are the checkpoint format's own keys beside the fields
        (:data:`hf_roast.checkpoint_format.FORMAT_KEYS`); other keys this release does not know (written by a
        newer minor format version) are ignored with a warning; the format version is checked by the loader."""
        if not isinstance(d, dict):
            raise ValueError(f"A RoastConfig is stored as a JSON object, got {type(d).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - format_keys)
        if unknown:
            warnings.warn(
                f"Ignoring RoastConfig keys {unknown}: they were written by a newer hf_roast. Upgrade hf_roast "
                "to use them.",
                stacklevel=2,
            )
        return cls(**{k: v for k, v in d.items() if k in known})
