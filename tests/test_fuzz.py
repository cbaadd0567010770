"""Fuzzing the configuration and the stored config: a valid model or a ValueError/TypeError naming the field.

Never a crash in native code, a hang, or a model that silently differs from what was saved.
"""

import json
import math
import shutil

import pytest
import torch
from helpers import inputs_for, tiny_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_roast import RoastConfig, RoastModel, get_roast_model

FIELDS = {
    "compression": st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(-5, 10**6),
        st.booleans(),
        st.text(max_size=3),
    ),
    "num_parameters": st.one_of(st.none(), st.integers(-5, 10**9), st.floats(), st.booleans()),
    "compression_pattern": st.one_of(
        st.none(),
        st.dictionaries(
            st.sampled_from(["mlp", "q_proj", r"layers\.0\..*", "(", "nothing", "(?i)mlp", ""]),
            st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 10**5), st.booleans()),
            max_size=3,
        ),
        st.lists(st.tuples(st.sampled_from(["mlp", "o_proj"]), st.integers(0, 64)), max_size=3),
        st.integers(),
    ),
    "target_modules": st.one_of(
        st.none(),
        st.sampled_from(["all-linear", ".*proj", "q_proj", "(", "nothing"]),
        st.lists(st.sampled_from(["q_proj", "v_proj", "mlp.up_proj", "lm_head", "nope"]), max_size=3),
        st.integers(),
    ),
    "exclude_modules": st.one_of(
        st.none(), st.lists(st.sampled_from(["k_proj", "down_proj"]), max_size=2), st.integers()
    ),
    "compress_embeddings": st.one_of(st.booleans(), st.integers(0, 2), st.none()),
    "mapper": st.one_of(st.sampled_from(["stable", "roast", "hashednet", "STABLE", ""]), st.integers()),
    "tile": st.one_of(
        st.tuples(st.integers(-2, 80), st.integers(-2, 80)),
        st.lists(st.integers(1, 16), max_size=3),
        st.none(),
    ),
    "sign": st.one_of(st.sampled_from(["none", "tile", "element", "both"]), st.none()),
    "seed": st.one_of(st.integers(-3, 2**64), st.floats(), st.booleans()),
    "init": st.sampled_from(["auto", "pretrained", "random", "zeros"]),
    "scaler": st.one_of(st.sampled_from(["v5", "v1", "none", "v9"]), st.none()),
    "dtype": st.sampled_from(["float32", "bfloat16", "float16", "float64", "int8"]),
    "backend": st.sampled_from(["auto", "torch", "cuda"]),
    "mapping_version": st.one_of(st.integers(-1, 3), st.booleans(), st.text(max_size=2)),
}
FIELD_NAMES = set(FIELDS) | {"in_features", "tile", "budget", "nothing to compress", "compression"}
MODEL = tiny_llama(hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1)


def _names_a_field(message: str) -> bool:
    return any(name in message for name in FIELD_NAMES)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({}, optional=FIELDS))
def test_fuzzed_roast_config_gives_a_model_or_a_named_error(kwargs):
    import copy

    try:
        config = RoastConfig(**kwargs)
        model = get_roast_model(copy.deepcopy(MODEL), config, show_progress=False)
    except (ValueError, TypeError) as e:
        assert _names_a_field(str(e)), f"{type(e).__name__} names no field: {e}"
        return
    with torch.no_grad():
        out = model(**inputs_for("llama")).logits
    assert torch.isfinite(out).all()
    assert model.roast_store.z.numel() >= 1


# ---- the stored roast_config.json ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "ckpt"
    rm = get_roast_model(tiny_llama(), RoastConfig(compression=8.0, tile=(16, 16)))
    rm.save_pretrained(path, model_card=False)
    with torch.no_grad():
        expected = rm(**inputs_for("llama")).logits
    return path, json.loads((path / "roast_config.json").read_text()), expected


JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=4),
    st.lists(st.integers(-3, 40), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)  # fmt: skip
PLAN_KEYS = ["mapper", "sign", "seed", "tile", "num_slots", "mapping_version", "modules"]
MODULE_KEYS = ["name", "kind", "rows", "cols", "scale", "tile_offset", "segment_start_tile", "segment_tiles"]


@st.composite
def edits(draw):
    """One to three edits: a top-level field, a plan field or one module's field, set to junk or dropped."""
    out = []
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["top", "plan", "module"]))
        key = draw(st.sampled_from({"top": sorted(FIELDS) + ["format_version", "plan", "plan_sha256"],
                                    "plan": PLAN_KEYS, "module": MODULE_KEYS}[where]))  # fmt: skip
        drop = draw(st.booleans()) and key != "name"
        out.append((where, key, drop, draw(JUNK), draw(st.integers(0, 13))))
    return out


def _apply(raw, edit_list):
    for where, key, drop, value, index in edit_list:
        target = raw
        if where in ("plan", "module"):
            target = raw.get("plan")
            if not isinstance(target, dict):
                continue
            if where == "module":
                modules = target.get("modules")
                if not isinstance(modules, list) or not modules:
                    continue
                target = modules[index % len(modules)]
                if not isinstance(target, dict):
                    continue
        if drop:
            target.pop(key, None)
        else:
            target[key] = value


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edit_list=edits())
def test_fuzzed_roast_config_json_loads_the_same_model_or_is_refused(checkpoint, edit_list, tmp_path_factory):
    path, raw, expected = checkpoint
    folder = tmp_path_factory.mktemp("edited")
    shutil.copytree(path, folder, dirs_exist_ok=True)
    edited = json.loads(json.dumps(raw))
    _apply(edited, edit_list)
    (folder / "roast_config.json").write_text(json.dumps(edited))
    try:
        loaded = RoastModel.from_pretrained(folder)
    except (ValueError, TypeError, FileNotFoundError) as e:
        assert _names_a_field(str(e)) or "plan" in str(e) or "format_version" in str(e), str(e)
        return
    with torch.no_grad():
        out = loaded(**inputs_for("llama")).logits
    assert torch.equal(out, expected), f"loaded a different model after {edit_list}"
    assert all(math.isfinite(v) for v in out.flatten().tolist()[:5])
