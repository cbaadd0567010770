"""How z starts: the least-squares projection of dense weights, or a seeded random draw.

The least-squares z of a weighted fit ``min sum_i a_i (W'[i] - W[i])^2`` (``a_i``: 1 for plain least squares, the
input column's mean squared activation when calibrated) has a closed form because every weight reads exactly one
slot: ``z[j] = adjoint(a * W)[j] / adjoint(a, unsigned)[j]``, the adjoint of the mapping applied to the weighted
dense weights over its applied to the weights alone. Both sums build module by module, so the caller can free
each dense weight as soon as its module is accumulated. The output-error refinement that follows with full
calibration statistics is :func:`hf_roast.calibration.output_error_solve`.
"""

from __future__ import annotations

import dataclasses

import torch

from .backends.pytorch import mapping_adjoint
from .mapping import LayerMapping, MappingPlan, ModuleSpec


class LeastSquaresZ:
    """Accumulates the least-squares projection of dense weights onto z, one module at a time."""

    def __init__(self, plan: MappingPlan, device: torch.device | str | None = None):
        self.plan = plan
        self.device = device
        self._unsigned = dataclasses.replace(plan, sign="none")
        self.numerator = torch.zeros(plan.num_slots, dtype=torch.float32, device=device)
        self.denominator = torch.zeros_like(self.numerator)

    @torch.no_grad()
    def add(self, spec: ModuleSpec, weight: torch.Tensor, importance: torch.Tensor | None = None) -> None:
        """Fold one module's dense ``weight`` (``rows x cols``) in, each entry weighted by ``importance``."""
        w = weight.detach().float()
        importance = (
            torch.ones_like(w) if importance is None else importance.float().expand_as(w).contiguous()
        )
        layer_map = LayerMapping.build(self.plan, spec, self.device)
        self.numerator += mapping_adjoint(w * importance, layer_map, self.plan.num_slots)
        # the normal equations' diagonal: every slot's weights' squared scales, without the signs
        unsigned = LayerMapping(
            self._unsigned, spec, layer_map.tile_slot, layer_map.tile_scale.abs() * spec.scale, None
        )
        self.denominator += mapping_adjoint(importance, unsigned, self.plan.num_slots)

    @torch.no_grad()
    def solve(self) -> torch.Tensor:
        """z; a slot that no weight reads (possible only under odd compressions) stays 0."""
        safe = self.denominator.clamp_min(1e-30)
        return torch.where(self.denominator > 0, self.numerator / safe, torch.zeros_like(self.numerator))


def random_z(
    plan: MappingPlan, std: float, seed: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """A seeded normal z of standard deviation ``std``, drawn on CPU from a private generator (the global RNG
    is untouched, and the draw is the same on every device)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(plan.num_slots, generator=gen, dtype=torch.float32) * std).to(device)
