"""Group-wise integer quantisation of the shared array z (``RoastConfig.z_bits`` 8 and 4): the one home
of its formulas.

z is cut into groups of ``group_size`` contiguous values. Every group lies inside one slot tile
(``group_size`` divides the tile size, and z is a whole number of aligned slot tiles), so a tile read is a
read of whole groups. Each group has one fp32 scale, ``absmax / QMAX[bits]``, and its values are stored as
symmetric integer codes in ``[-QMAX, QMAX]`` (round to nearest, ties to even): ``z ~ code * scale``.

No zero point: z is a least-squares projection of weights (or a Gaussian draw), centred on zero, so an
asymmetric grid would buy nothing for the byte it costs per group.

Storage (:class:`QuantizedZ`):

* 8 bits: ``codes`` int8, one per value;
* 4 bits: ``codes`` uint8, two per byte: value ``2i`` in the low nibble, ``2i + 1`` in the high one, each
  stored as ``code + 8`` (so 1..15);
* ``scales`` fp32, one per group.

The element formulas (:func:`storage_index`, :func:`group_of`, :func:`code_of`, :func:`dequantize_value`)
use plain integer arithmetic, so the PyTorch path calls them on tensors and the Triton kernels recompile the
very same functions (``hf_roast.backends.triton.mapping_jit``), as for the mapping formulas.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .vocab import Z_INT_BITS

QMAX = {8: 127, 4: 7}
"""Largest code magnitude of each integer grid (symmetric; 4-bit leaves code -8 unused)."""
NIBBLE_OFFSET = 8
"""A 4-bit code c is stored as the nibble c + 8."""


# --------------------------------------------------------------------------------------------------
# Element formulas: integer arithmetic only (>>, &, //, -, *), shared with the Triton kernels.
# --------------------------------------------------------------------------------------------------
def storage_index(index, bits):
    """Where z[index]'s code is stored: its own int8 at 8 bits, byte index // 2 at 4 bits."""
    if bits == 4:
        return index // 2
    return index


def group_of(index, group_size):
    """The scale group of z[index]."""
    return index // group_size


def code_of(raw, index, bits):
    """The signed code of z[index] from its stored unit ``raw`` (widened to a signed integer type)."""
    if bits == 4:
        return ((raw >> ((index & 1) * 4)) & 15) - NIBBLE_OFFSET
    return raw


def dequantize_value(code, scale):
    """code * scale, in fp32 (the caller passes the code as fp32)."""
    return code * scale


def formula_functions():
    """The element formulas, for recompilation by the Triton kernels."""
    return [storage_index, group_of, code_of, dequantize_value]


def formula_constants() -> dict[str, int]:
    return {"NIBBLE_OFFSET": NIBBLE_OFFSET}


# --------------------------------------------------------------------------------------------------
# Tensors.
# --------------------------------------------------------------------------------------------------
def check_bits(bits) -> int:
    if isinstance(bits, bool) or bits not in Z_INT_BITS:
        raise ValueError(
            f"bits={bits!r}: z is quantised to {' or '.join(map(str, Z_INT_BITS))} bits (32 and 16 are the "
            "float dtypes: RoastConfig.dtype)."
        )
    return int(bits)


def check_group(numel: int, group_size: int, tile_numel: int | None = None) -> None:
    """Every group must be whole (and, for the tile reads, inside one slot tile); ValueError naming the fix."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ValueError(f"group_size must be an even int >= 2 (e.g. 128), got {group_size!r}.")
    if tile_numel is not None and tile_numel % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide the mapping tile's {tile_numel} values: every group must "
            "lie inside one slot tile. Use a divisor of the tile size (128 for a 32x32 tile)."
        )
    if numel % group_size:
        raise ValueError(f"z has {numel} values, not a whole number of groups of {group_size}.")


def _scales_of(groups: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 ``(..., G)`` values -> the symmetric grid's scale of each group ``(...)``."""
    return groups.abs().amax(-1) / QMAX[bits]


def _codes_of(values: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """Round fp32 values onto their group's grid: integer-valued fp32 codes (an all-zero group codes to 0)."""
    qmax = QMAX[bits]
    divisor = torch.where(scales > 0, scales, torch.ones_like(scales))
    return torch.round(values / divisor).clamp_(-qmax, qmax)


def _codes_and_scales(groups: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(..., G)`` values -> integer-valued fp32 codes of the same shape and fp32 scales ``(...)``."""
    scales = _scales_of(groups, bits)
    return _codes_of(groups, scales.unsqueeze(-1), bits), scales


def fake_quantize_groups(values: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """The values z would have after quantisation, for fp32 ``values`` whose last dim holds whole groups
    (quantisation-aware training; the gradient is passed straight through by the caller)."""
    shape = values.shape
    codes, scales = _codes_and_scales(values.float().reshape(*shape[:-1], -1, group_size), bits)
    return dequantize_value(codes, scales.unsqueeze(-1)).reshape(shape)


def group_scales(z: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """The fp32 scale of every group of z (QAT on the element paths: embeddings, hashednet)."""
    return _scales_of(z.detach().float().view(-1, group_size), bits)


def fake_quantize_at(z: torch.Tensor, index: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int):
    """The quantised value of z[index] given every group's scale (from :func:`group_scales`), fp32."""
    scale = scales[group_of(index, group_size)]
    return dequantize_value(_codes_of(z[index].float(), scale, bits), scale)


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    nibbles = (codes.to(torch.int16) + NIBBLE_OFFSET).to(torch.uint8)
    return nibbles[0::2] | (nibbles[1::2] << 4)


@dataclass
class QuantizedZ:
    """z as packed integer codes and one fp32 scale per group (see the module docstring)."""

    codes: torch.Tensor  # int8 [m] (8 bits) or uint8 [m / 2] (4 bits)
    scales: torch.Tensor  # fp32 [m / group_size]
    bits: int
    group_size: int

    @property
    def numel(self) -> int:
        return self.scales.numel() * self.group_size

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        return (
            self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()
        )

    @staticmethod
    def codes_dtype(bits: int) -> torch.dtype:
        return torch.int8 if check_bits(bits) == 8 else torch.uint8

    @staticmethod
    def codes_numel(numel: int, bits: int) -> int:
        return numel if check_bits(bits) == 8 else numel // 2

    @staticmethod
    def packed_nbytes(numel: int, bits: int, group_size: int) -> int:
        """Bytes of ``numel`` values packed at ``bits`` with one fp32 scale per group (a last group may be partial)."""
        return -(-numel * check_bits(bits) // 8) + 4 * -(-numel // group_size)

    @classmethod
    def quantize(
        cls, z: torch.Tensor, bits: int, group_size: int, tile_numel: int | None = None
    ) -> QuantizedZ:
        """Round-to-nearest group-wise quantisation of the 1-D float ``z``."""
        bits = check_bits(bits)
        check_group(z.numel(), group_size, tile_numel)
        codes, scales = _codes_and_scales(z.detach().float().reshape(-1, group_size), bits)
        codes = codes.reshape(-1).to(torch.int8)
        packed = codes if bits == 8 else _pack_nibbles(codes)
        return cls(packed.contiguous(), scales.contiguous(), bits, group_size)

    def values_at(self, index: torch.Tensor) -> torch.Tensor:
        """The dequantised fp32 values of z at ``index`` (any shape, int64)."""
        raw = self.codes[storage_index(index, self.bits)].to(torch.int64)
        code = code_of(raw, index, self.bits).to(torch.float32)
        return dequantize_value(code, self.scales[group_of(index, self.group_size)])

    def dequantize(self) -> torch.Tensor:
        """All of z in fp32 (tests, conversions; the execution paths read tiles or elements only)."""
        return self.values_at(torch.arange(self.numel, device=self.device))

    def tiles(self, slots: torch.Tensor, tile_numel: int) -> torch.Tensor:
        """The dequantised fp32 slot tiles ``z[s * T : s * T + T]`` for each ``s`` in ``slots``: ``(n, T)``.

        Reads only those tiles' codes and scales; nothing z-sized is built.
        """
        t, g = tile_numel, self.group_size
        raw = self.codes.view(-1, self.codes.numel() * t // self.numel).index_select(0, slots).to(torch.int64)
        element = torch.arange(t, device=raw.device)
        if self.bits == 4:
            raw = raw.repeat_interleave(2, dim=1)  # byte e // 2 of the tile for every element e
        code = code_of(raw, element, self.bits).to(torch.float32)
        scales = self.scales.view(-1, t // g).index_select(0, slots)
        return dequantize_value(code.view(len(slots), t // g, g), scales.unsqueeze(-1)).view(len(slots), t)

    def to(self, device) -> QuantizedZ:
        return QuantizedZ(self.codes.to(device), self.scales.to(device), self.bits, self.group_size)
