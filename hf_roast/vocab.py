"""Every vocabulary of hf_roast, defined once: the names a user, a file or a kernel can spell.

The config validates against these tuples, the CLI offers them as choices, the mapping checks its
inputs with :func:`check_choice`, and the Triton kernels derive their integer ids from their order
(:data:`MAPPER_IDS`, :data:`SIGN_IDS`). Nothing else in hf_roast spells a list of them.
"""

from __future__ import annotations

MAPPING_VERSION = 1
"""Version of the mapping formulas in :mod:`hf_roast.mapping`. Bump it whenever any of them changes: it is
stored in every checkpoint and checked on load."""

MAPPERS = ("stable", "roast", "hashednet")
"""Where a weight lives in z: STABLE-RPS RandomFold, ICML-2023 ROAST tile hashing, per-element HashedNet."""
SIGNS = ("none", "tile", "element")
"""The random sign g(i): none, one per mapping tile, or one per element."""
SCALERS = ("v5", "v1", "none")
"""The STABLE-RPS gradient scaler on dz."""
BACKENDS = ("auto", "torch", "triton", "cpu")
"""The execution path (see :mod:`hf_roast.backends.dispatch`): ``cpu`` is the fused gather-GEMV for inference on
CPU (:mod:`hf_roast.backends.cpu`), ``torch`` the PyTorch path only (no native code), ``triton`` the GPU kernels;
``auto`` picks per call."""
INITS = ("auto", "pretrained", "random")
"""How z is initialised."""
DTYPES = ("float32", "bfloat16", "float16")
"""Storage dtypes of z."""
MODULE_KINDS = ("linear", "conv1d", "embedding")
"""What a compressed module was: ``nn.Linear``, GPT-2's ``Conv1D`` (weight stored transposed), ``nn.Embedding``."""
Z_BITS = (32, 16, 8, 4)
"""Bits per stored value of z: 32 and 16 are floats (``dtype``); 8 and 4 are integers with a scale per group."""
Z_INT_BITS = (8, 4)
"""The integer grids of z (see :mod:`hf_roast.quant`)."""
SLICEOUT_MODES = ("random", "contiguous")
"""Which tile-aligned units SliceOut keeps in a training step (see :mod:`hf_roast.sliceout`): a random subset,
or one contiguous run at a random start."""
CALIBRATIONS = ("output", "diagonal")
"""How calibration data weights the pretrained projection (see :mod:`hf_roast.calibration`)."""
ENV_BACKEND = "HF_ROAST_BACKEND"
"""The environment variable that overrides every config's ``backend``."""

MAPPER_IDS = {name: i for i, name in enumerate(MAPPERS)}  # stable=0, roast=1, hashednet=2
"""The mappers as the integers the kernels take."""
SIGN_IDS = {name: i for i, name in enumerate(SIGNS)}  # none=0, tile=1, element=2
"""The sign modes as the integers the kernels take."""


def check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    """The one validation of a vocabulary value: a ValueError naming the field and the choices."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"Unknown {name} {value!r}: choose one of {', '.join(choices)}.")


def check_keep_fraction(keep) -> float:
    """The one validation of SliceOut's keep fraction (config field and runtime setter alike): a number in
    (0, 1], returned as a float."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:  # NaN fails too
        raise ValueError(
            f"sliceout_keep must be a fraction in (0, 1] (1.0: SliceOut off; 0.5 computes half of each block's units "
            f"per training step), got {keep!r}."
        )
    return float(keep)


def check_mapping_version(version, source: str = "") -> None:
    """The one check of a stored or configured mapping version: other formulas would read other slots."""
    if isinstance(version, bool) or version != MAPPING_VERSION:
        where = f"{source}: " if source else ""
        raise ValueError(
            f"{where}mapping_version={version!r}: written with ROAST mapping version {version}, but this hf_roast "
            f"implements version {MAPPING_VERSION}; the weights would be read from the wrong slots. Install the "
            "hf_roast release that wrote it."
        )
