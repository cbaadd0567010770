"""The least-squares z against an independent weighted least-squares solve of the mapping's matrix."""

import pytest
import torch

from hf_roast.backends.pytorch import materialize_weight
from hf_roast.initialization import LeastSquaresZ, random_z
from hf_roast.mapping import LayerMapping, MappingPlan, ModuleSpec

SPECS = [ModuleSpec("q", "linear", 13, 11, 0.75), ModuleSpec("o", "linear", 9, 13, 1.5)]


def _plan(mapper: str, sign: str, compression: float) -> MappingPlan:
    return MappingPlan.build(SPECS, mapper=mapper, sign=sign, seed=5, tile=(4, 4), compression=compression)


def _mapping_matrix(plan: MappingPlan, spec: ModuleSpec) -> torch.Tensor:
    """Column j: the module's weights when z is the j-th unit vector (float64, built by the PyTorch path)."""
    layer_map = LayerMapping.build(plan, spec)
    columns = []
    for j in range(plan.num_slots):
        unit = torch.zeros(plan.num_slots)
        unit[j] = 1.0
        columns.append(materialize_weight(unit, layer_map, torch.float32, scratch=False).double().flatten())
    return torch.stack(columns, dim=1)


@pytest.mark.parametrize(
    "mapper,sign", [("stable", "tile"), ("stable", "element"), ("roast", "element"), ("hashednet", "element")]
)
@pytest.mark.parametrize("weighted", [False, True])
def test_least_squares_z_solves_the_weighted_least_squares_problem(mapper, sign, weighted):
    plan = _plan(mapper, sign, compression=3.0)
    g = torch.Generator().manual_seed(0)
    weights = {s.name: torch.randn(s.rows, s.cols, generator=g) for s in SPECS}
    columns = {s.name: torch.rand(1, s.cols, generator=g) + 0.1 for s in SPECS} if weighted else {}
    fit = LeastSquaresZ(plan)
    for spec in SPECS:
        fit.add(spec, weights[spec.name], columns.get(spec.name))
    z = fit.solve().double()
    # reference: minimise sum_i a_i (M z - w)_i^2 with a dense solver
    m = torch.cat([_mapping_matrix(plan, s) for s in SPECS])
    w = torch.cat([weights[s.name].double().flatten() for s in SPECS])
    a = torch.cat(
        [
            (columns[s.name].expand(s.rows, s.cols) if weighted else torch.ones(s.rows, s.cols))
            .double()
            .flatten()
            for s in SPECS
        ]
    )
    root = a.sqrt()[:, None]
    reference = torch.linalg.lstsq(m * root, (w * a.sqrt())[:, None], driver="gelsd").solution.flatten()
    read = (m != 0).any(
        dim=0
    )  # slots no weight reads are 0 in ours, arbitrary in lstsq's minimum-norm answer
    torch.testing.assert_close(z[read], reference[read], rtol=1e-5, atol=1e-6)


def test_least_squares_z_is_exact_at_1x():
    plan = _plan("stable", "tile", compression=1.0)
    g = torch.Generator().manual_seed(1)
    fit = LeastSquaresZ(plan)
    weights = {}
    for spec in SPECS:
        weights[spec.name] = torch.randn(spec.rows, spec.cols, generator=g) * spec.scale
        fit.add(spec, weights[spec.name])
    z = fit.solve()
    for spec in SPECS:
        got = materialize_weight(z, LayerMapping.build(plan, spec), torch.float32, scratch=False)
        torch.testing.assert_close(got, weights[spec.name], rtol=1e-6, atol=1e-6)


def test_random_z_is_seeded_and_leaves_the_global_rng_alone():
    plan = _plan("stable", "tile", compression=2.0)
    state = torch.get_rng_state()
    a, b = random_z(plan, 0.02, seed=3), random_z(plan, 0.02, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, random_z(plan, 0.02, seed=4))
    assert torch.equal(state, torch.get_rng_state())
    assert a.numel() == plan.num_slots and 0.01 < a.std().item() < 0.03
