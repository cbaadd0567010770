"""SmartDeal (Chen et al., "SmartDeal: Re-Modeling Deep Network Weights for Efficient Inference and Training") as a
fine-tuning baseline: every target weight is a small dense basis B times a sparse power-of-two coefficient matrix C.

Layout (the authors' for fully connected layers, generalised). Each output row of ``W`` (``out x in``) is padded with
zeros to a multiple of ``chunk`` and cut into chunks of ``chunk`` consecutive input weights, so ``W`` becomes
``out * in_p / chunk`` chunk-rows. ``rows_per_basis`` output rows form one block ``A`` (``m x chunk``, ``m =
rows_per_basis * in_p / chunk``), approximated as ``C (m x rank) @ B (rank x chunk)`` with the block's own basis.
The authors' code (``se/alg.py``: ``vector_decompose`` on every row of an FC weight, ``SELinear``) uses
``chunk = rank = 3`` and one 3x3 basis per output row (in 384 -> a 128 x 3 block): :data:`AUTHORS_LAYOUT`. Their
coefficients are stored sparse, so the compression comes from C's sparsity and its short codes, not from a low rank.

Coefficients: zero, or ``+-2**-e`` with ``e`` in ``0 .. 15`` (a 5-bit code: sign and a 4-bit exponent). The basis
absorbs every block's scale: each block is rescaled so that its largest coefficient is 1 before quantisation
(the authors clip at 32 instead; a fixed top keeps the 16 exponents where the coefficients are). Sparsity: the
authors zero the coefficients under a fixed threshold; a budget-matched baseline needs the bytes fixed, so we keep
the ``k`` coefficients whose weight-space contribution ``|C_ij| * ||B_j||`` is largest, ``k`` solved from the byte
budget (:func:`nonzeros_for_bytes`). The mask is fixed after the initialisation (as pruning's), so fine-tuning
cannot change the bytes.

Initialisation is the authors' alternating least squares (``core_decompose``): quantise C, solve B by least
squares, solve C by least squares, sparsify, repeat. Fine-tuning trains C's real-valued shadow and B in float;
the forward uses the masked power-of-two C and B fake-quantised to int8 with one fp32 scale per basis row, both
with a straight-through estimator.

Storage per matrix (:func:`packed_nbytes`): a bitmask over C's entries, a 5-bit code per non-zero (bit-packed),
B as int8 and its fp32 row scales. :mod:`.smartdeal_store` packs, saves and loads exactly these tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

EXPONENTS = 16
"""Coefficient magnitudes 2**0 .. 2**-15: the 4 exponent bits of a 5-bit code (the fifth is the sign)."""
CODE_BITS = 5
BASIS_QMAX = 127
"""B is stored as symmetric int8 codes, one fp32 absmax scale per basis row."""


@dataclass(frozen=True)
class Layout:
    """How a weight is cut into blocks ``A (m x chunk) ~ C (m x rank) @ B (rank x chunk)`` (module docstring)."""

    chunk: int = 3
    rank: int = 3
    rows_per_basis: int = 1

    def __post_init__(self):
        if min(self.chunk, self.rank, self.rows_per_basis) < 1 or self.rank > self.chunk:
            raise ValueError(f"{self}: chunk, rank and rows_per_basis are >= 1, and rank <= chunk.")

    def shapes(self, out_features: int, in_features: int) -> tuple[int, int, int]:
        """(blocks G, chunk-rows per block m, padded input width) of an ``out x in`` weight."""
        if out_features % self.rows_per_basis:
            raise ValueError(
                f"rows_per_basis={self.rows_per_basis} does not divide {out_features} output rows."
            )
        in_padded = math.ceil(in_features / self.chunk) * self.chunk
        return out_features // self.rows_per_basis, self.rows_per_basis * in_padded // self.chunk, in_padded


AUTHORS_LAYOUT = Layout(chunk=3, rank=3, rows_per_basis=1)
"""The SmartDeal code's FC layout: each output row is a (in/3) x 3 matrix with its own 3x3 basis."""
DEFAULT_LAYOUT = Layout(chunk=4, rank=4, rows_per_basis=8)
"""The arm's layout: square 4x4 bases shared by 8 output rows. On MiniLM's layer-2 projections it decomposes with
the least weight error of the layouts tried (relative error 0.255 at 8x fewer bytes, 0.58 at 16x; the authors'
0.277 and 0.662, their int8 basis and scales costing 11% of the 8x budget per 384 weights). Bases of lower rank
than the chunk were far worse (0.67 at 8x): these weights are not locally low-rank, so the basis pays for itself
only as a per-block change of coordinates that sparsifies C."""


# --------------------------------------------------------------------------------------------------
# Storage: bytes of what is stored, and the sparsity a byte budget allows.
# --------------------------------------------------------------------------------------------------
def fixed_nbytes(out_features: int, in_features: int, layout: Layout) -> int:
    """Bytes that do not depend on the sparsity: C's bitmask, B's int8 codes and its fp32 row scales."""
    g, m, _ = layout.shapes(out_features, in_features)
    return math.ceil(g * m * layout.rank / 8) + g * layout.rank * layout.chunk + 4 * g * layout.rank


def packed_nbytes(out_features: int, in_features: int, layout: Layout, nonzeros: int) -> int:
    """Bytes of one stored matrix with ``nonzeros`` coefficients (each a bit-packed 5-bit code)."""
    return fixed_nbytes(out_features, in_features, layout) + math.ceil(nonzeros * CODE_BITS / 8)


def nonzeros_for_bytes(out_features: int, in_features: int, layout: Layout, budget: int) -> int:
    """The most coefficients whose storage fits in ``budget`` bytes; ValueError when even none fit."""
    g, m, _ = layout.shapes(out_features, in_features)
    spare = budget - fixed_nbytes(out_features, in_features, layout)
    if spare < 0:
        raise ValueError(
            f"{budget} bytes cannot hold the {out_features}x{in_features} weight's bitmask and basis in {layout} "
            f"({fixed_nbytes(out_features, in_features, layout)} bytes): use a larger chunk or rows_per_basis."
        )
    return min(g * m * layout.rank, spare * 8 // CODE_BITS)


# --------------------------------------------------------------------------------------------------
# Quantisers (and their straight-through versions).
# --------------------------------------------------------------------------------------------------
def exponents_of(c: torch.Tensor) -> torch.Tensor:
    """The code exponent ``e`` of each coefficient (``|c| ~ 2**-e``, nearest power in linear distance as the
    authors' ``nearestpow2``), clamped to ``0 .. EXPONENTS - 1``; meaningless where ``c == 0``."""
    a = c.detach().abs().float().clamp_min(torch.finfo(torch.float32).tiny)
    low = torch.floor(torch.log2(a))
    up = a > 1.5 * torch.exp2(low)  # nearer to the next power of two than to this one
    return (-(low + up.float())).clamp(0, EXPONENTS - 1).to(torch.int64)


def power_of_two(c: torch.Tensor) -> torch.Tensor:
    """``sign(c) * 2**-e`` with ``e`` from :func:`exponents_of` (exact powers of two; zero stays zero)."""
    magnitude = torch.ldexp(torch.ones_like(c, dtype=torch.float32), -exponents_of(c))
    return (torch.sign(c.detach()).float() * magnitude).to(c.dtype)


def basis_scales(b: torch.Tensor) -> torch.Tensor:
    """One fp32 scale per basis row (``absmax / 127``), for ``b`` of shape ``(G, rank, chunk)``."""
    return b.detach().float().abs().amax(-1) / BASIS_QMAX


def basis_codes(b: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 codes of ``b`` on its rows' grids (an all-zero row codes to 0)."""
    divisor = torch.where(scales > 0, scales, torch.ones_like(scales)).unsqueeze(-1)
    return torch.round(b.detach().float() / divisor).clamp_(-BASIS_QMAX, BASIS_QMAX).to(torch.int8)


def dequantize_basis(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return codes.float() * scales.unsqueeze(-1)


def straight_through(x: torch.Tensor, quantised: torch.Tensor) -> torch.Tensor:
    """``quantised`` in the forward (exactly: ``x - x`` is 0), the identity's gradient in the backward."""
    return quantised.detach() + (x - x.detach())


def block_view(w: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``w`` (``out x in``) as its blocks ``(G, m, chunk)``, zero-padded along the input dimension."""
    g, m, in_padded = layout.shapes(*w.shape)
    return F.pad(w, (0, in_padded - w.shape[1])).reshape(g, m, layout.chunk)


def weight_of(cq: torch.Tensor, bq: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The dense ``out x in`` weight of quantised coefficients ``(G, m, rank)`` and basis ``(G, rank, chunk)``: the
    one function the training forward and the loaded model both call, so that their outputs are identical."""
    return torch.bmm(cq, bq).reshape(out_features, -1)[:, :in_features]


# --------------------------------------------------------------------------------------------------
# Alternating least squares (the initialisation).
# --------------------------------------------------------------------------------------------------
def _solve_right(c: torch.Tensor, a: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_B ||A - C B|| per block (normal equations; a tiny ridge keeps all-zero columns of C solvable)."""
    ctc = c.transpose(1, 2) @ c
    eye = torch.eye(ctc.shape[-1], dtype=c.dtype, device=c.device)
    scale = ctc.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] + 1e-30
    return torch.linalg.solve(ctc + ridge * scale * eye, c.transpose(1, 2) @ a)


def _solve_left(b: torch.Tensor, a: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_C ||A - C B|| per block."""
    return _solve_right(b.transpose(1, 2), a.transpose(1, 2), ridge).transpose(1, 2)


def _normalise(c: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale every block so that its largest coefficient is 1 (B takes the scale; C @ B is unchanged)."""
    s = c.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-30)
    return c / s, b * s.transpose(1, 2)


def _top_mask(c: torch.Tensor, b: torch.Tensor, nonzeros: int) -> torch.Tensor:
    """Keep the ``nonzeros`` coefficients with the largest weight-space contribution ``|C_ij| * ||B_j||``."""
    score = c.abs() * b.norm(dim=-1).unsqueeze(1)
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=c.device)
    if nonzeros > 0:
        mask[torch.topk(score.flatten(), nonzeros, sorted=False).indices] = True
    return mask.view_as(c)


@dataclass
class Decomposition:
    """One matrix's initialisation: quantised coefficients, float basis, fixed mask and the error history."""

    cq: torch.Tensor  # (G, m, rank) exact signed powers of two, zero outside the mask
    basis: torch.Tensor  # (G, rank, chunk) float (the fine-tuned shadow; stored as int8 + row scales)
    mask: torch.Tensor  # (G, m, rank) bool
    errors: list[float]  # relative weight error ||W - C B|| / ||W|| after each B solve (float B)
    relative_error: float  # of the stored form: int8 B


@torch.no_grad()
def decompose(
    w: torch.Tensor, layout: Layout, nonzeros: int, iterations: int = 10, ridge: float = 1e-6
) -> Decomposition:
    """The authors' alternating least squares, with the budget's top-``nonzeros`` sparsity (module docstring).

    Start (``core_decompose``'s trivial init): C = A, B = I when the basis is square; the best rank-``rank``
    factors (SVD) otherwise. Then ``iterations`` times: normalise, sparsify and quantise C, solve B, solve C.
    """
    a = block_view(w.detach().double(), layout)
    if layout.rank == layout.chunk:
        c = a.clone()
        b = torch.eye(layout.chunk, dtype=a.dtype).expand(a.shape[0], -1, -1).clone()
    else:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        c, b = u[..., : layout.rank] * s[:, None, : layout.rank], vh[:, : layout.rank]
    norm = float(a.norm()) or 1.0
    errors: list[float] = []
    for step in range(iterations + 1):
        c, b = _normalise(c, b)
        mask = _top_mask(c, b, nonzeros)
        cq = power_of_two(c) * mask
        b = _solve_right(cq, a, ridge)
        errors.append(float((a - cq @ b).norm()) / norm)
        if step < iterations:
            c = _solve_left(b, a, ridge)
    bq = dequantize_basis(basis_codes(b, basis_scales(b)), basis_scales(b)).double()
    stored = float((a - cq @ bq).norm()) / norm
    return Decomposition(cq.float(), b.float(), mask, errors, stored)


# --------------------------------------------------------------------------------------------------
# The layer.
# --------------------------------------------------------------------------------------------------
class SmartDealLinear(nn.Module):
    """A linear layer whose weight is ``C @ B`` (module docstring). Trains C's shadow and B through their
    quantisers with a straight-through estimator; the forward is exactly what :func:`export` stores."""

    def __init__(self, in_features: int, out_features: int, layout: Layout, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.layout = in_features, out_features, layout
        g, m, _ = layout.shapes(out_features, in_features)
        self.coefficients = nn.Parameter(torch.zeros(g, m, layout.rank))
        self.basis = nn.Parameter(torch.zeros(g, layout.rank, layout.chunk))
        self.register_buffer("mask", torch.zeros(g, m, layout.rank, dtype=torch.bool))
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, layout: Layout, budget: int, iterations: int = 10
    ) -> SmartDealLinear:
        """Decompose ``linear``'s weight into at most ``budget`` stored bytes; the layer keeps the decomposition's
        errors in ``init_errors`` / ``init_relative_error``."""
        out_features, in_features = linear.weight.shape
        k = nonzeros_for_bytes(out_features, in_features, layout, budget)
        d = decompose(linear.weight, layout, k, iterations)
        layer = cls(in_features, out_features, layout, linear.bias).to(linear.weight.device)
        with torch.no_grad():
            layer.coefficients.copy_(d.cq)  # the shadow starts on its grid (the authors' set_mask)
            layer.basis.copy_(d.basis)
            layer.mask.copy_(d.mask)
        layer.init_errors, layer.init_relative_error = d.errors, d.relative_error
        return layer

    def quantised(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked power-of-two C, int8-grid B), each with a straight-through gradient to its shadow."""
        cq = straight_through(self.coefficients, power_of_two(self.coefficients)) * self.mask
        scales = basis_scales(self.basis)
        bq = straight_through(self.basis, dequantize_basis(basis_codes(self.basis, scales), scales))
        return cq, bq

    def materialize_weight(self) -> torch.Tensor:
        cq, bq = self.quantised()
        return weight_of(cq, bq, self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.materialize_weight().to(x.dtype), self.bias)

    def stored_nbytes(self) -> int:
        nonzeros = int((power_of_two(self.coefficients) * self.mask != 0).sum())
        return packed_nbytes(self.out_features, self.in_features, self.layout, nonzeros)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.layout}"


class DecodedSmartDealLinear(nn.Module):
    """A stored SmartDeal weight, decoded once: fixed C and B (buffers), for scoring and serving."""

    def __init__(self, cq: torch.Tensor, bq: torch.Tensor, in_features: int, out_features: int, bias=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("cq", cq)
        self.register_buffer("bq", bq)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = weight_of(self.cq, self.bq, self.out_features, self.in_features)
        return F.linear(x, w.to(x.dtype), self.bias)


# --------------------------------------------------------------------------------------------------
# Whole models.
# --------------------------------------------------------------------------------------------------
def smartdeal_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (n, m) for n, m in model.named_modules() if isinstance(m, (SmartDealLinear, DecodedSmartDealLinear))
    ]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def compress_model(
    model: nn.Module,
    targets: list[tuple[str, nn.Module, str]],
    bytes_ratio: float,
    layout: Layout = DEFAULT_LAYOUT,
    iterations: int = 10,
) -> dict:
    """Replace every target linear by a :class:`SmartDealLinear` that stores ``bytes_ratio`` times fewer bytes than
    its fp32 weight (each matrix's own budget, so the sparsity is uniform in bytes). Returns the accounting."""
    dense = stored = kept = basis_values = 0
    err_sq = ref_sq = 0.0
    for name, module, kind in targets:
        if kind != "linear":
            raise ValueError(f"{name}: SmartDeal here decomposes nn.Linear weights, not {kind}.")
        w = module.weight
        budget = math.floor(w.numel() * 4 / bytes_ratio)
        layer = SmartDealLinear.from_linear(module, layout, budget, iterations)
        replace_module(model, name, layer)
        nbytes = layer.stored_nbytes()
        if nbytes > budget:
            raise AssertionError(f"{name}: {nbytes} stored bytes exceed the budget of {budget}.")
        dense += w.numel() * 4
        stored += nbytes
        kept += int(layer.mask.sum())
        basis_values += layer.basis.numel()
        sq = float(w.detach().double().pow(2).sum())
        err_sq += layer.init_relative_error**2 * sq
        ref_sq += sq
    return {
        "dense_bytes": dense,
        "stored_bytes": stored,
        "kept_coefficients": kept,
        "basis_values": basis_values,
        "bytes_ratio": dense / stored,
        "init_relative_error": (err_sq / ref_sq) ** 0.5,
        "layout": {"chunk": layout.chunk, "rank": layout.rank, "rows_per_basis": layout.rows_per_basis},
    }
