"""2:4 magnitude sparsity x int4 (Deep Compression-style), and plain low-bit integer weights, for the target modules.

What a user who wants ~10x fewer bytes than fp32 without weight sharing would try:

* **2:4 sparsity**: in each group of 4 consecutive input weights of a row, the 2 largest in magnitude are kept
  (NVIDIA's structured-sparsity layout). The mask is **fixed at init** from the pre-trained magnitudes, as the
  harness's pruning baseline fixes its mask: it is the mask a one-shot pruner would ship, the pruned weights get
  zero gradient (forward ``weight * mask``), and the arm needs no mask schedule or dense-gradient regulariser
  (SR-STE) whose settings would be one more thing to tune for the baseline alone.
* **int-b values**: symmetric, zero-preserving codes in ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (int4: [-7, 7], code
  -8 unused, as hf-roast's own quantised z), one fp16 absmax scale per group of 128 consecutive input weights
  of a row (a partial last group when the row is shorter). Zero maps to code 0, so pruned weights stay exactly 0.
* **QAT**: the forward uses the quantised (masked) weight and passes the gradient straight through (STE) to an
  fp32 master; the scales follow the master's absmax at every step (no gradient). Round-to-nearest instead
  quantises the fine-tuned dense weights once.

Stored per target module (:func:`packed_nbytes`, and :func:`save_model`'s tensors, byte for byte): the kept
codes packed at b bits, a 2-bit position (0..3) per kept value inside its group of 4 (sparse only), and the fp16
scales. 2:4 x int4: (4 + 2) / 2 + 16 / 128 = 3.125 bits per dense weight (10.24x fewer bytes than fp32), the
same as dense int3 with fp16 scales, the control at equal bytes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .bitpack import pack_bits, unpack_bits

GROUP_SIZE = 128
"""Input weights per fp16 scale."""
INDEX_BITS = 2
"""Bits of a kept value's position inside its group of 4 (2:4 sparsity)."""
SCALE_DTYPE = torch.float16
FORMAT = "hf-roast-benchmarks lowbit v1"


def qmax(bits: int) -> int:
    """Largest code magnitude of the symmetric grid (one code, -2^(b-1), is left unused)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits}: the low-bit layer stores 2- to 8-bit codes.")
    return 2 ** (bits - 1) - 1


@torch.no_grad()
def mask_2_4(weight: torch.Tensor) -> torch.Tensor:
    """Boolean mask keeping the 2 largest-magnitude weights of every 4 consecutive inputs of each row."""
    rows, cols = weight.shape
    if cols % 4:
        raise ValueError(f"2:4 sparsity needs a multiple of 4 inputs, got {cols}.")
    groups = weight.detach().abs().reshape(rows, cols // 4, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(2, dim=-1).indices, True)
    return keep.reshape(rows, cols)


def _groups(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(rows, cols)`` -> ``(rows, ceil(cols / G), G)``, zero-padded (zeros change no absmax)."""
    rows, cols = weight.shape
    pad = -cols % group_size
    return F.pad(weight, (0, pad)).reshape(rows, -1, group_size)


@torch.no_grad()
def group_scales(weight: torch.Tensor, bits: int, group_size: int = GROUP_SIZE) -> torch.Tensor:
    """fp16 absmax / qmax of every group of ``group_size`` inputs of each row: ``(rows, ceil(cols / G))``."""
    absmax = _groups(weight.detach().float(), group_size).abs().amax(-1)
    return (absmax / qmax(bits)).clamp(max=torch.finfo(SCALE_DTYPE).max).to(SCALE_DTYPE)


def _expand(scales: torch.Tensor, cols: int, group_size: int) -> torch.Tensor:
    return scales.float().repeat_interleave(group_size, dim=1)[:, :cols]


def codes_of(
    weight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int = GROUP_SIZE
) -> torch.Tensor:
    """Round onto each group's grid (fp16 scales, used in fp32): integer-valued fp32 codes; a zero scale codes 0."""
    s = _expand(scales, weight.shape[1], group_size)
    m = qmax(bits)
    return torch.where(s > 0, torch.round(weight.float() / torch.where(s > 0, s, 1.0)), 0.0).clamp(-m, m)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, group_size: int = GROUP_SIZE) -> torch.Tensor:
    return codes.float() * _expand(scales, codes.shape[1], group_size)


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int = GROUP_SIZE) -> torch.Tensor:
    """The weight as it will be stored, with the straight-through gradient (identity) to ``weight``."""
    scales = group_scales(weight, bits, group_size)
    stored = dequantize(codes_of(weight.detach(), scales, bits, group_size), scales, group_size)
    return weight + (stored.to(weight.dtype) - weight).detach()


class LowBitLinear(nn.Module):
    """An ``nn.Linear`` whose weight is stored as b-bit group codes, optionally 2:4 sparse.

    Training (QAT): an fp32 master ``weight`` (pruned entries zeroed, gradient masked), quantised in the forward
    with the straight-through estimator. :meth:`freeze` keeps only what is stored (``codes``, ``scales``,
    ``mask``) and the forward then uses exactly those, so scores are of the stored model.
    """

    def __init__(self, linear: nn.Linear, bits: int, sparse: bool, group_size: int = GROUP_SIZE):
        super().__init__()
        qmax(bits)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits, self.sparse, self.group_size = bits, sparse, group_size
        self.weight = linear.weight
        self.bias = linear.bias
        self.register_buffer("mask", mask_2_4(linear.weight) if sparse else None)
        self.register_buffer("codes", None)
        self.register_buffer("scales", None)
        if sparse:
            with torch.no_grad():
                self.weight.mul_(self.mask)  # the master holds exactly the kept weights from the start

    @property
    def frozen(self) -> bool:
        return self.codes is not None

    def masked_weight(self) -> torch.Tensor:
        return self.weight * self.mask if self.sparse else self.weight

    def stored_weight(self) -> torch.Tensor:
        """The weight the stored codes and scales give (frozen), or the fake-quantised master (training)."""
        if self.frozen:
            return dequantize(self.codes, self.scales, self.group_size)
        return fake_quantize(self.masked_weight(), self.bits, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.stored_weight().to(x.dtype), self.bias)

    @torch.no_grad()
    def freeze(self) -> None:
        """Quantise the master once more and drop it: from now on the layer is what is stored."""
        w = self.masked_weight().float()
        scales = group_scales(w, self.bits, self.group_size)
        self.set_stored(codes_of(w, scales, self.bits, self.group_size).to(torch.int8), scales, self.mask)

    def set_stored(self, codes: torch.Tensor, scales: torch.Tensor, mask: torch.Tensor | None) -> None:
        self.codes, self.scales, self.mask = codes, scales, mask
        if isinstance(self.weight, nn.Parameter):
            del self.weight
            self.register_parameter("weight", None)

    def extra_repr(self) -> str:
        sparsity = "2:4 sparse, " if self.sparse else ""
        return f"{self.in_features}, {self.out_features}, {sparsity}int{self.bits}, group {self.group_size}"


def packed_nbytes(
    rows: int, cols: int, bits: int, sparse: bool, group_size: int = GROUP_SIZE
) -> dict[str, int]:
    """Bytes of one module as :func:`save_model` stores it: codes, positions (sparse), fp16 scales."""
    kept = rows * cols // 2 if sparse else rows * cols
    out = {
        "kept_values": kept,
        "codes": math.ceil(kept * bits / 8),
        "index": math.ceil(kept * INDEX_BITS / 8) if sparse else 0,
        "scales": rows * math.ceil(cols / group_size) * torch.finfo(SCALE_DTYPE).bits // 8,
    }
    out["total"] = out["codes"] + out["index"] + out["scales"]
    return out


def install(model: nn.Module, names: list[str], bits: int, sparse: bool) -> list[LowBitLinear]:
    """Replace the named ``nn.Linear`` modules by :class:`LowBitLinear` (mask from their current magnitudes)."""
    layers = []
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, attr)
        if type(linear) is not nn.Linear:
            raise TypeError(
                f"{name} is a {type(linear).__name__}: the low-bit layer replaces nn.Linear only."
            )
        layer = LowBitLinear(linear, bits, sparse)
        setattr(parent, attr, layer)
        layers.append(layer)
    return layers


def lowbit_layers(model: nn.Module) -> list[tuple[str, LowBitLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LowBitLinear)]


def freeze(model: nn.Module) -> None:
    for _, layer in lowbit_layers(model):
        layer.freeze()


def pack_layer(layer: LowBitLinear) -> dict[str, torch.Tensor]:
    """The stored tensors of a frozen layer: ``codes`` (kept values, row-major), ``index`` (2:4), ``scales``."""
    if not layer.frozen:
        raise ValueError("freeze the layer before packing it: the master weight is not what is stored.")
    rows, cols = layer.codes.shape
    if not layer.sparse:
        return {"codes": pack_bits(layer.codes, layer.bits), "scales": layer.scales.contiguous()}
    positions = layer.mask.reshape(rows, cols // 4, 4).nonzero()[:, 2].reshape(rows, cols // 4, 2)
    kept = layer.codes.reshape(rows, cols // 4, 4).gather(-1, positions)
    return {
        "codes": pack_bits(kept, layer.bits),
        "index": pack_bits(positions, INDEX_BITS),
        "scales": layer.scales.contiguous(),
    }


def unpack_layer(layer: LowBitLinear, tensors: dict[str, torch.Tensor]) -> None:
    """Set a layer's stored state from :func:`pack_layer`'s tensors (it is then frozen)."""
    rows, cols = layer.out_features, layer.in_features
    kept = rows * cols // 2 if layer.sparse else rows * cols
    codes = unpack_bits(tensors["codes"], kept, layer.bits, signed=True).to(torch.int8)
    mask = None
    if layer.sparse:
        positions = unpack_bits(tensors["index"], kept, INDEX_BITS, signed=False).long()
        positions = positions.reshape(rows, cols // 4, 2)
        codes = torch.zeros(rows, cols // 4, 4, dtype=torch.int8).scatter_(
            -1, positions, codes.view(rows, -1, 2)
        )
        mask = (
            torch.zeros(rows, cols // 4, 4, dtype=torch.bool)
            .scatter_(-1, positions, True)
            .reshape(rows, cols)
        )
    layer.set_stored(codes.reshape(rows, cols), tensors["scales"].to(SCALE_DTYPE), mask)


def save_model(model: nn.Module, path: str | Path) -> dict[str, int]:
    """One safetensors file: every low-bit layer packed (``<name>.codes`` / ``.index`` / ``.scales``) and every
    other parameter as it is (tied ones once). Returns the bytes of its tensors: ``target`` (the packed
    layers) and ``model`` (all)."""
    from safetensors.torch import save_file

    layers = lowbit_layers(model)
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers:
        tensors.update({f"{name}.{k}": v.cpu() for k, v in pack_layer(layer).items()})
    target = sum(t.numel() * t.element_size() for t in tensors.values())
    for name, p in model.named_parameters():  # frozen layers have no master weight left; biases are here
        tensors[name] = p.detach().cpu().contiguous()
    layout = {
        n: [layer.out_features, layer.in_features, layer.bits, int(layer.sparse)] for n, layer in layers
    }
    save_file(
        tensors,
        str(path),
        metadata={"format": FORMAT, "group_size": str(GROUP_SIZE), "layers": json.dumps(layout)},
    )
    return {"target": target, "model": sum(t.numel() * t.element_size() for t in tensors.values())}


def load_model(model: nn.Module, path: str | Path) -> nn.Module:
    """Load :func:`save_model`'s file into a model with the same low-bit layers installed (frozen or not)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    if meta.get("format") != FORMAT or int(meta["group_size"]) != GROUP_SIZE:
        raise ValueError(f"{path} is not a {FORMAT} file with groups of {GROUP_SIZE}.")
    layout = json.loads(meta["layers"])
    layers = lowbit_layers(model)
    if {n: [m.out_features, m.in_features, m.bits, int(m.sparse)] for n, m in layers} != layout:
        raise ValueError(f"{path} holds other low-bit layers than the model: install the same ones first.")
    for name, layer in layers:
        unpack_layer(layer, {k.rpartition(".")[2]: tensors[k] for k in keys if k.rpartition(".")[0] == name})
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])
    return model
