"""b-bit fields packed into bytes, least significant bit first, in a little-endian stream: the stored form of the
low-bit baselines' codes, indices and masks (:mod:`.sparse_int4`, :mod:`.smartdeal_store`), so that the bytes they
report are the bytes of a real file."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers in ``[-2^(b-1), 2^b)`` -> ``ceil(n * b / 8)`` uint8 holding their low ``b`` bits each."""
    fields = (values.reshape(-1).to(torch.int16) & (2**bits - 1)).to(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.uint8, device=fields.device)
    stream = ((fields.unsqueeze(-1) >> shifts) & 1).reshape(-1)
    stream = F.pad(stream, (0, -stream.numel() % 8)).reshape(-1, 8)
    weights = torch.arange(8, dtype=torch.uint8, device=fields.device)
    return (stream << weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int, bits: int, signed: bool) -> torch.Tensor:
    """The inverse of :func:`pack_bits`: ``n`` fields as int16 (two's complement when ``signed``)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.unsqueeze(-1) >> shifts) & 1).reshape(-1)[: n * bits].reshape(n, bits).to(torch.int16)
    values = (stream << torch.arange(bits, dtype=torch.int16, device=packed.device)).sum(
        -1, dtype=torch.int16
    )
    return values - (values >= 2 ** (bits - 1)).to(torch.int16) * 2**bits if signed else values
