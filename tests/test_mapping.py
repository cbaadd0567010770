"""The mapping is part of the checkpoint format: golden vectors pin it, oracles check its properties."""

import math

import pytest
import torch

from hf_roast.mapping import (
    MAPPERS,
    MIX_A,
    MIX_B,
    P31,
    MappingPlan,
    ModuleSpec,
    gradient_scaler,
    hash31,
    seed_constants,
)


def specs():
    return [
        ModuleSpec("a", "linear", 40, 24, 1.0),  # edge tiles in both dims with an 8x8 tile
        ModuleSpec("b", "linear", 16, 40, 0.5),
        ModuleSpec("c", "embedding", 10, 8, 2.0),
    ]


def plan_for(mapper="stable", sign="tile", compression=2.0, tile=(8, 8), seed=3, modules=None):
    return MappingPlan.build(
        modules or specs(), mapper=mapper, sign=sign, seed=seed, tile=tile, compression=compression
    )


def python_hash31(x: int, a: int, b: int) -> int:
    """Independent big-int reference of hash31 (Python ints never overflow)."""
    h = (a * (x % P31) + b) % P31
    h ^= h >> 13
    h = (MIX_A * ((h + x // P31) % P31) + MIX_B) % P31
    return h ^ (h >> 16)


# ---- golden vectors: a change to any formula or to seed derivation fails here ----------------------
def test_seed_constants_golden():
    assert seed_constants(0, "slot") == (617405911, 1101451694)
    assert seed_constants(0, "sign") == (1244472729, 153584149)
    assert seed_constants(7, "slot") == (1209176848, 547069342)


def test_hash31_golden():
    x = torch.tensor([0, 1, 2, 3, 12345, 2**31 - 1, 2**31, 2**40 + 17, 2**61 - 1], dtype=torch.int64)
    a, b = seed_constants(0, "slot")
    assert hash31(x, a, b).tolist() == [
        95673735,
        1958063647,
        970416764,
        677540605,
        690698480,
        1199202779,
        914104164,
        610727049,
        292696919,
    ]


def test_tile_slots_golden():
    stable = plan_for("stable")
    assert stable.num_slots == 896
    assert [stable.tile_slots(s).tolist() for s in stable.modules] == [
        [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 0, 1, 12],
        [13, 0, 1, 2, 3, 4, 5, 6, 7, 8],
        [9, 10],
    ]
    roast = plan_for("roast")
    assert [roast.tile_slots(s).tolist() for s in roast.modules] == [
        [2, 12, 9, 2, 0, 13, 9, 1, 0, 0, 2, 4, 10, 8, 2],
        [0, 9, 2, 3, 8, 10, 7, 0, 5, 8],
        [2, 9],
    ]
    assert stable.tile_scales(stable.modules[0]).tolist()[:8] == [-1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -1.0, 1.0]


def test_element_index_golden():
    rows = torch.tensor([0, 15])
    stable = plan_for("stable")
    assert stable.element_index(stable.modules[1], rows)[0][:, :6].tolist() == [
        [832, 833, 834, 835, 836, 837],
        [312, 313, 314, 315, 316, 317],
    ]
    hashed = plan_for("hashednet")
    assert hashed.element_index(hashed.modules[1], rows)[0][:, :6].tolist() == [
        [542, 618, 757, 676, 728, 828],
        [700, 847, 605, 626, 690, 715],
    ]


# ---- 64-bit safety ----------------------------------------------------------------------------------
def test_hash_is_exact_beyond_2_pow_31():
    xs = [2**31 + 5, 2**33 + 7, 3 * 2**40 + 11, 2**50 + 12345, 2**61 + 99, 2**62 - 1]
    for seed in (0, 1, 123456):
        a, b = seed_constants(seed, "slot")
        got = hash31(torch.tensor(xs, dtype=torch.int64), a, b).tolist()
        assert got == [python_hash31(x, a, b) for x in xs]


def test_plan_with_more_than_2_pow_31_weights():
    """A model-wide index over 2**31 (e.g. 2**21 tiles of 32x32) maps without overflow."""
    big = [ModuleSpec(f"m{i}", "linear", 32768, 16384, 1.0) for i in range(5)]  # 2.7e9 weights
    plan = MappingPlan.build(big, mapper="stable", sign="element", seed=0, tile=(32, 32), compression=64)
    last = plan.modules[-1]
    slots = plan.tile_slots(last)
    assert slots.min() >= 0 and slots.max() < plan.num_slot_tiles
    index, sign = plan.element_index(last, torch.tensor([last.rows - 1]))
    assert index.min() >= 0 and index.max() < plan.num_slots
    assert set(sign.unique().tolist()) <= {-1, 1}


# ---- STABLE-RPS properties ---------------------------------------------------------------------------
def test_stable_at_1x_is_a_bijection_even_with_padded_edge_tiles():
    # BERT-like: a tiny classifier (3 x 64) next to square layers; tiles are padded in virtual space.
    mods = [ModuleSpec("q", "linear", 64, 64, 1.0), ModuleSpec("classifier", "linear", 3, 64, 1.0)]
    plan = plan_for("stable", compression=1.0, tile=(16, 16), modules=mods)
    slots = torch.cat([plan.tile_slots(s) for s in plan.modules])
    assert plan.num_slots == plan.num_virtual
    assert sorted(slots.tolist()) == list(range(plan.num_slot_tiles))


@pytest.mark.parametrize("compression", [2, 3, 4, 8])
def test_stable_perfect_balance_at_integer_compression(compression):
    mods = [ModuleSpec(f"l{i}", "linear", 48, 96, 1.0) for i in range(4)]  # 4 * 18 = 72 tiles of 16x16
    plan = plan_for("stable", compression=compression, tile=(16, 16), modules=mods)
    counts = sum(plan.slot_counts(s) for s in plan.modules)
    assert plan.num_slot_tiles * compression == 72
    assert torch.all(counts == compression)


def test_roast_collides_at_1x_as_plain_hashing_does():
    mods = [ModuleSpec(f"l{i}", "linear", 64, 64, 1.0) for i in range(16)]
    plan = plan_for("roast", compression=1.0, tile=(8, 8), modules=mods)
    used = torch.unique(torch.cat([plan.tile_slots(s) for s in plan.modules])).numel()
    unused_fraction = 1 - used / plan.num_slot_tiles
    assert abs(unused_fraction - 1 / math.e) < 0.05  # about 1/e of the slots stay unused


def test_arange_oracle_reads_back_contiguous_aligned_tiles():
    """With z = arange(m), every mapping tile of W is one contiguous, aligned span of z, row-major."""
    from hf_roast.backends.pytorch import materialize_weight
    from hf_roast.mapping import LayerMapping

    plan = plan_for("stable", sign="none", compression=2.0)
    z = torch.arange(plan.num_slots, dtype=torch.float64)
    t = plan.tile_numel
    tr, tc = plan.tile
    for spec in plan.modules:
        spec.scale = 1.0
        lm = LayerMapping(plan, spec, plan.tile_slots(spec), plan.tile_scales(spec), None)
        w = materialize_weight(z, lm, torch.float64, scratch=False)
        assert w.shape == (spec.rows, spec.cols)
        for i in range(spec.n_tile_rows(plan.tile)):
            for j in range(spec.n_tile_cols(plan.tile)):
                block = w[i * tr : (i + 1) * tr, j * tc : (j + 1) * tc]
                start = int(block[0, 0])
                assert start % t == 0
                rr, cc = block.shape
                expected = start + torch.arange(rr)[:, None] * tc + torch.arange(cc)[None, :]
                assert torch.equal(block, expected.to(block.dtype))


@pytest.mark.parametrize("mapper", MAPPERS)
def test_mapping_is_deterministic_and_seeded(mapper):
    p1, p2, p3 = plan_for(mapper, seed=3), plan_for(mapper, seed=3), plan_for(mapper, seed=4)
    rows = torch.arange(16)
    i1, i2, i3 = (p.element_index(p.modules[1], rows)[0] for p in (p1, p2, p3))
    assert torch.equal(i1, i2)
    assert not torch.equal(i1, i3)


def test_hashednet_segments_partition_z():
    plan = plan_for("hashednet", compression=4.0)
    starts = [s.segment_start for s in plan.modules]
    sizes = [s.segment_size for s in plan.modules]
    assert starts[0] == 0 and sum(sizes) == plan.num_slots
    for spec in plan.modules:
        index, _ = plan.element_index(spec, torch.arange(spec.rows))
        assert index.min() >= spec.segment_start and index.max() < spec.segment_start + spec.segment_size


def test_plan_round_trips_through_dict():
    plan = plan_for("stable")
    again = MappingPlan.from_dict(plan.to_dict())
    assert again == plan


def test_gradient_scaler_v5_and_v1_by_hand():
    mods = [ModuleSpec("a", "linear", 16, 16, 2.0), ModuleSpec("b", "linear", 16, 16, 0.5)]
    plan = plan_for("stable", compression=2.0, tile=(8, 8), modules=mods)  # 8 tiles -> 4 slot tiles
    # Fold 0 = tiles 0..3 (all of "a"), fold 1 = tiles 4..7 (all of "b"): each slot gets one tile of each.
    v5 = gradient_scaler(plan, "v5")
    v1 = gradient_scaler(plan, "v1")
    assert torch.allclose(v5, torch.full_like(v5, 1 / (2.0**2 + 0.5**2)))
    assert torch.allclose(v1, torch.full_like(v1, 1 / ((2.0 + 0.5) ** 2 / 2)))
    assert gradient_scaler(plan, "none") is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(compression=1e9), "at most compression"),
        (dict(num_parameters=10**9, compression=None), "exceeds"),
    ],
)
def test_plan_budget_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MappingPlan.build(specs(), mapper="stable", sign="none", seed=0, tile=(8, 8), **kwargs)


def test_unknown_mapper_error():
    with pytest.raises(ValueError, match="Unknown mapper"):
        MappingPlan.build(specs(), mapper="hashnet", sign="none", seed=0, tile=(8, 8), compression=2)


# ---- segments (RoastConfig.compression_pattern) -------------------------------------------------------
def pattern_plan(mapper="stable", sign="tile", compression=4.0, segments="ac,d", tile=(8, 8), modules=None):
    """Five modules: "a" and "c" claimed by key "ac" at 2x, "d" by key "d" at 1x, "b" and "e" pooled."""
    mods = modules or [
        ModuleSpec("a", "linear", 40, 24, 1.0),
        ModuleSpec("b", "linear", 16, 40, 0.5),
        ModuleSpec("c", "embedding", 10, 8, 2.0),
        ModuleSpec("d", "linear", 24, 16, 0.25),
        ModuleSpec("e", "linear", 32, 32, 1.5),
    ]
    if segments == "ac,d":
        segments = {"ac": (2.0, ["a", "c"]), "d": (1.0, ["d"])}
    return MappingPlan.build(
        mods, mapper=mapper, sign=sign, seed=3, tile=tile, compression=compression, segments=segments
    )


def test_segments_are_sized_per_key_and_laid_out_pooled_first():
    plan = pattern_plan()
    t = plan.tile_numel
    tiles = {s.name: s.n_tiles(plan.tile) for s in plan.modules}  # a 15, b 10, c 2, d 6, e 16
    pooled = math.ceil(math.ceil((tiles["b"] + tiles["e"]) * t / 4.0) / t)
    ac = math.ceil(math.ceil((tiles["a"] + tiles["c"]) * t / 2.0) / t)
    d = tiles["d"]
    assert plan.num_slot_tiles == pooled + ac + d  # z is the sum of the segments
    seg = {s.name: (s.segment_start_tile, s.segment_tiles) for s in plan.modules}
    assert seg == {
        "b": (0, pooled),
        "e": (0, pooled),
        "a": (pooled, ac),
        "c": (pooled, ac),
        "d": (pooled + ac, d),
    }
    plan.check()


@pytest.mark.parametrize("mapper", MAPPERS)
def test_each_module_reads_only_from_its_segment(mapper):
    plan = pattern_plan(mapper, sign="element")
    t = plan.tile_numel
    spans = {}
    for spec in plan.modules:
        index, _ = plan.element_index(spec, torch.arange(spec.rows))
        if plan.is_tiled:
            lo, hi = spec.segment_start_tile * t, (spec.segment_start_tile + spec.segment_tiles) * t
        else:
            lo, hi = spec.segment_start, spec.segment_start + spec.segment_size
        assert lo <= index.min() and index.max() < hi, spec.name
        spans.setdefault(spec.name in ("a", "c"), set()).update(range(lo, hi))
    if plan.is_tiled:  # the pooled modules never read the keys' segments, and the other way round
        pooled = set(range(plan.modules[1].segment_tiles * t))
        for spec in (plan.spec("a"), plan.spec("c"), plan.spec("d")):
            index, _ = plan.element_index(spec, torch.arange(spec.rows))
            assert not pooled & set(index.flatten().tolist())
    else:  # hashednet: each key's span of z is split among its modules, in proportion to their sizes
        a, c = plan.spec("a"), plan.spec("c")
        pooled_end = plan.spec("e").segment_start + plan.spec("e").segment_size
        assert a.segment_start == pooled_end and c.segment_start == a.segment_start + a.segment_size
        assert (c.segment_start + c.segment_size - a.segment_start) % t == 0


def test_no_pattern_is_the_mapping_without_segments():
    for segments in (None, {}):
        plan = pattern_plan(segments=segments)
        assert all(s.segment_tiles == 0 and s.segment_start_tile == 0 for s in plan.modules)
        assert all("segment_tiles" not in m for m in plan.to_dict()["modules"])  # stored as before
    # the golden vectors of test_tile_slots_golden, through the segments code path
    stable = MappingPlan.build(
        specs(), mapper="stable", sign="tile", seed=3, tile=(8, 8), compression=2.0, segments={}
    )
    assert stable.tile_slots(stable.modules[2]).tolist() == [9, 10]


def test_segment_tile_slots_golden():
    plan = pattern_plan()
    assert {s.name: plan.tile_slots(s).tolist() for s in plan.modules} == {
        # "a" and "c" share the 9 slot tiles 7..15: fold 0 (a's first 9 tiles) is a bijection on them
        "a": [11, 12, 13, 14, 15, 7, 8, 9, 10, 10, 11, 12, 13, 14, 15],
        "b": [2, 3, 4, 5, 6, 0, 1, 5, 6, 0],
        "c": [7, 8],
        "d": [20, 21, 16, 17, 18, 19],  # "d" at 1x: a bijection on its own segment, 16..21
        "e": [1, 2, 3, 4, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 6],
    }


def test_stable_segment_at_1x_is_a_bijection_and_balanced_elsewhere():
    mods = [ModuleSpec(f"l{i}", "linear", 48, 96, 1.0) for i in range(4)]  # 18 tiles of 16x16 each
    plan = pattern_plan(compression=2.0, tile=(16, 16), modules=mods, segments={"one": (1.0, ["l1", "l3"])})
    own = torch.cat([plan.tile_slots(plan.spec(n)) for n in ("l1", "l3")])
    start = plan.spec("l1").segment_start_tile
    assert sorted(own.tolist()) == list(range(start, start + 36))  # 1x within the segment: exact
    counts = sum(plan.slot_counts(plan.spec(n)) for n in ("l0", "l2"))
    assert torch.all(counts[:18] == 2) and torch.all(counts[18:] == 0)  # 2x pooled: perfectly balanced


@pytest.mark.parametrize("mapper", MAPPERS)
def test_slot_counts_and_scaler_match_an_element_oracle_under_a_pattern(mapper):
    """c_lj is the number of module l's weights on unit j (per element for hashednet, per slot tile: every
    element of the tile has that count, since these shapes have no edge tiles)."""
    mods = [
        ModuleSpec("a", "linear", 16, 24, 2.0),
        ModuleSpec("b", "linear", 24, 16, 0.5),
        ModuleSpec("c", "linear", 32, 8, 1.0),
        ModuleSpec("d", "linear", 8, 40, 0.75),
    ]
    plan = pattern_plan(mapper, modules=mods, compression=3.0, segments={"bd": (1.5, ["b", "d"])})
    unit = plan.scaler_unit()
    s_cl2 = torch.zeros(plan.num_slots, dtype=torch.float64)
    for spec in plan.modules:
        index, _ = plan.element_index(spec, torch.arange(spec.rows))
        per_element = torch.bincount(index.flatten(), minlength=plan.num_slots).double()
        counts = plan.slot_counts(spec)
        assert torch.equal(counts.repeat_interleave(unit), per_element), spec.name
        s_cl2 += per_element * spec.scale**2
    v5 = gradient_scaler(plan, "v5").double().repeat_interleave(unit)
    want = torch.where(s_cl2 > 0, 1 / s_cl2.clamp_min(1e-300), torch.ones_like(s_cl2))
    torch.testing.assert_close(v5, want, rtol=1e-6, atol=0)


def test_plan_with_segments_round_trips_and_bad_segments_are_refused():
    plan = pattern_plan()
    d = plan.to_dict()
    assert {m["name"]: m["segment_tiles"] for m in d["modules"]}["d"] == 6
    again = MappingPlan.from_dict(d)
    assert again == plan
    again.check()
    for edit, match in (
        (lambda m: m[3].update(segment_start_tile=m[3]["segment_start_tile"] + 1), "gap|overlap"),
        (lambda m: m[3].update(segment_tiles=0, segment_start_tile=0), "gap|overlap|empty"),
        (lambda m: m[1].update(segment_tiles=m[1]["segment_tiles"] + 1), "gap|overlap|cover"),
    ):
        broken = plan.to_dict()
        edit(broken["modules"])
        with pytest.raises(ValueError, match=match):
            MappingPlan.from_dict(broken).check()
    with pytest.raises(ValueError, match="claimed by both"):
        pattern_plan(segments={"x": (2.0, ["a"]), "y": (2.0, ["a", "b"])})
    with pytest.raises(
        ValueError, match=r"compression_pattern\['d'\]=8 .* less than one 8x8 mapping tile.*at most"
    ):
        pattern_plan(segments={"d": (8.0, ["d"])})


def test_num_parameters_with_segments_sizes_the_pooled_rest():
    plan = MappingPlan.build(
        specs(),
        mapper="stable",
        sign="tile",
        seed=3,
        tile=(8, 8),
        num_parameters=640,
        segments={"c": (1.0, ["c"])},
    )
    assert plan.num_slots == 640 and plan.spec("c").segment_tiles == 2 and plan.spec("a").segment_tiles == 8
    with pytest.raises(ValueError, match="every module matches a key"):
        MappingPlan.build(
            specs(), mapper="stable", sign="tile", seed=3, tile=(8, 8), num_parameters=640,
            segments={"all": (2.0, ["a", "b", "c"])},
        )  # fmt: skip
