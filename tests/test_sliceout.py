"""SliceOut (hf_roast.sliceout): training steps that compute only the kept tile-aligned units of each block.

Checked against two independent references: a dense one (each layer's W materialised from z by an oracle
index map, the mask and the rescale applied by hand, autograd for dz), and the unsliced model whose
consumers' inputs are masked and rescaled by hooks (the whole Llama, attention included)."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_bert_classifier, tiny_gpt2, tiny_llama

from hf_roast import RoastConfig, RoastModel, SliceOut, enable_sliceout, get_roast_model
from hf_roast.layers import RoastLinear
from hf_roast.mapping import LayerMapping, MappingPlan, ModuleSpec
from hf_roast.sliceout import Member, _cut_of, kept_count, sliced_linear, sliceout_state

TILE = (16, 16)


def roast_llama(keep=1.0, mode="random", seed=0, tile=TILE, bias=True, enable=False, **config):
    """A tiny Llama (4 heads of 16, 2 key/value heads, MLP 96; biases everywhere) compressed 4x, in train mode.
    ``enable``: attach SliceOut even at keep 1 (config keep 1 attaches nothing)."""
    model = tiny_llama(attention_bias=bias, mlp_bias=bias)
    return compressed(model, keep, mode, seed, tile, enable, **config)


def compressed(model, keep, mode, seed, tile, enable, **config):
    """``model`` compressed 4x (random init) with SliceOut at ``keep``, biases made nonzero, in train mode."""
    cfg = RoastConfig(
        compression=4,
        init="random",
        tile=tile,
        sliceout_keep=keep,
        sliceout_mode=mode,
        sliceout_seed=seed,
        **config,
    )
    rm = get_roast_model(model, cfg)
    if enable and keep == 1.0:
        enable_sliceout(rm, 1.0, mode, seed)
    with torch.no_grad():  # biases start at zero: make them matter
        for _, layer in rm.roast_layers():
            if getattr(layer, "bias", None) is not None:
                layer.bias.normal_(0, 0.1)
    return rm.train()


def batch(seed=0, shape=(2, 11)):
    return torch.randint(3, 96, shape, generator=torch.Generator().manual_seed(seed))


def step(rm, ids, labels=None):
    """Loss, logits and the gradients of z and of every bias after one forward and backward (labels: the ids
    themselves, a causal LM's, unless given)."""
    rm.zero_grad(set_to_none=True)
    out = rm(input_ids=ids, labels=ids if labels is None else labels)
    out.loss.backward()
    biases = {
        n: p.grad.clone() for n, p in rm.named_parameters() if n.endswith("bias") and p.grad is not None
    }
    return out.loss.detach(), out.logits.detach(), rm.roast_store.z.grad.clone(), biases


def sliced_layers(rm):
    return [(n, m) for n, m in rm.roast_layers() if m.__dict__.get("_sliceout") is not None]


def current_cut(layer):
    site = layer.__dict__["_sliceout"]
    return site.block.cut(site.member, layer.layer_mapping())


def index_list(ids, size):
    return list(range(size))[ids] if isinstance(ids, slice) else ids.tolist()


def assert_bit_identical(results_a, results_b):
    """Two steps' results (tensors, or dicts of tensors) equal bit for bit."""
    for a, b in zip(results_a, results_b, strict=True):
        if isinstance(a, dict):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        else:
            assert torch.equal(a, b)


# ---- keep = 1 and eval: the model without SliceOut, bit for bit ------------------------------------------
def test_keep_one_is_bit_identical_forward_and_grads():
    plain = roast_llama()
    attached = roast_llama(enable=True)
    assert not sliced_layers(plain) and len(sliced_layers(attached)) == 14  # 2 x (q, k, v, o, gate, up, down)
    ids = batch()
    assert_bit_identical(step(plain, ids), step(attached, ids))


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_eval_runs_the_full_model_and_counts_no_step(family):
    build, ids = (roast_llama, batch()) if family == "llama" else (roast_bert, bert_batch()[0])
    full, sliced = build(), build(keep=0.5)
    full.eval(), sliced.eval()
    with torch.no_grad():
        assert torch.equal(full(input_ids=ids).logits, sliced(input_ids=ids).logits)
    assert sliceout_state(sliced).step == 0
    sliced.train(), full.train()
    with torch.no_grad():
        assert not torch.allclose(full(input_ids=ids).logits, sliced(input_ids=ids).logits)
    assert sliceout_state(sliced).step == 1


# ---- against the unsliced model with masked consumers (the whole Llama) ----------------------------------
def masked_reference(sliced, reference):
    """Hooks on ``reference``'s consumers that keep and rescale the inputs ``sliced``'s consumers kept."""
    handles = []
    for name, layer in sliced_layers(sliced):
        cut = current_cut(layer)
        if cut is None or cut.axis != "cols":  # this block keeps all its units at this keep
            continue
        mask = torch.zeros(cut.size)
        mask[index_list(cut.units, cut.size)] = cut.scale
        target = reference.get_submodule(f"base_model.{name}")
        handles.append(target.register_forward_pre_hook(lambda m, args, mask=mask: (args[0] * mask,)))
    return handles


@pytest.mark.parametrize("mode", ["random", "contiguous"])
@pytest.mark.parametrize("keep", [0.5, 0.75])
def test_matches_the_model_with_masked_consumers(mode, keep):
    sliced = roast_llama(keep=keep, mode=mode, seed=3)
    reference = roast_llama()
    ids = batch(1)
    for _ in range(2):  # two steps, two masks
        loss, logits, dz, db = step(sliced, ids)
        handles = masked_reference(sliced, reference)
        ref_loss, ref_logits, ref_dz, ref_db = step(reference, ids)
        for h in handles:
            h.remove()
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dz, ref_dz, rtol=1e-5, atol=1e-6)
        assert db.keys() == ref_db.keys()
        for k in db:
            torch.testing.assert_close(db[k], ref_db[k], rtol=1e-5, atol=1e-6, msg=k)
        # each block keeps round(keep * units); the MLPs (6 units) always drop some
        dropped = 0
        for block in sliceout_state(sliced).blocks:
            kept = block.kept_units()
            n_kept = (
                block.n_units if kept is None else kept[1] - kept[0] if isinstance(kept, tuple) else len(kept)
            )
            assert n_kept == kept_count(keep, block.n_units)
            dropped += n_kept < block.n_units
        assert dropped >= 2


@pytest.mark.parametrize("mode", ["random", "contiguous"])
def test_dropped_tiles_get_no_gradient(mode):
    """z slots read only by dropped tiles get exactly zero gradient; the kept tiles' slots get one."""
    rm = roast_llama(keep=0.5, mode=mode, seed=1)
    _, _, dz, _ = step(rm, batch())
    plan = rm.plan
    kept = torch.zeros(plan.num_slot_tiles, dtype=torch.bool)
    for _, layer in sliced_layers(rm):
        cut = current_cut(layer)
        n_tr, n_tc = layer.spec.n_tile_rows(plan.tile), layer.spec.n_tile_cols(plan.tile)
        grid = layer.tile_slot.view(n_tr, n_tc)
        kept[(grid[cut.tiles] if cut.axis == "rows" else grid[:, cut.tiles]).flatten()] = True
    per_tile = dz.view(-1, plan.tile_numel)
    assert (~kept).sum() > 0 and kept.sum() > 0
    assert torch.all(per_tile[~kept] == 0)
    assert (per_tile[kept] != 0).any(dim=1).float().mean() > 0.99


# ---- against a dense reference: W materialised from z, the mask applied by hand -------------------------
def oracle(layer: RoastLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot of each weight, lambda * sign of each weight), read back through the layer (z = 1, z = 1..m)."""
    z = layer.roast_store.z
    saved = z.detach().clone()
    with torch.no_grad():
        z.fill_(1.0)
        scale = layer.materialize_weight(torch.float32)
        z.copy_(torch.arange(1, z.numel() + 1, dtype=z.dtype))
        index = (layer.materialize_weight(torch.float32) / scale).round().long() - 1
        z.copy_(saved)
    return index, scale


def dense_weight(layer, z):
    index, scale = oracle(layer)
    return z[index] * scale


@pytest.mark.parametrize("mode", ["random", "contiguous"])
def test_mlp_matches_a_dense_reference_on_odd_shapes(mode):
    """Odd shapes: a 8 x 12 tile (24-unit blocks), hidden 48, MLP 100 (a short last unit, a partial tile)."""
    model = tiny_llama(
        hidden_size=48, intermediate_size=100, num_attention_heads=4, num_key_value_heads=4, mlp_bias=True
    )
    cfg = RoastConfig(
        compression=3, init="random", tile=(8, 12), scaler="none", sliceout_keep=0.6, sliceout_mode=mode
    )
    rm = get_roast_model(model, cfg).train()
    mlp = rm.base_model.model.layers[1].mlp
    with torch.no_grad():
        for p in (mlp.gate_proj.bias, mlp.up_proj.bias, mlp.down_proj.bias):
            p.normal_(0, 0.1)
    x = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(0), requires_grad=True)
    z = rm.roast_store.z
    y = mlp(x)
    cut = current_cut(mlp.down_proj)
    assert cut.scale == 5 / 3 and cut.length < 100  # ceil(100 / 24) = 5 units, 3 kept
    grad_y = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, z, mlp.gate_proj.bias, mlp.up_proj.bias, mlp.down_proj.bias], grad_y)

    zr = z.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    biases = [mlp.gate_proj.bias, mlp.up_proj.bias, mlp.down_proj.bias]
    br = [b.detach().clone().requires_grad_() for b in biases]
    mask = torch.zeros(100)
    mask[index_list(cut.units, 100)] = 1.0
    gate = F.linear(xr, dense_weight(mlp.gate_proj, zr), br[0]) * mask
    up = F.linear(xr, dense_weight(mlp.up_proj, zr), br[1]) * mask
    hidden = F.silu(gate) * up
    want_y = F.linear(hidden * mask, dense_weight(mlp.down_proj, zr)) * cut.scale + br[2]
    want = torch.autograd.grad(want_y, [xr, zr, *br], grad_y)
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(("dx", "dz", "db_gate", "db_up", "db_down"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    assert torch.all(got[2][mask == 0] == 0) and torch.all(got[3][mask == 0] == 0)


def odd_layer_map(tile=(8, 16)):
    spec = ModuleSpec("q", "linear", 37, 45, 0.75)  # edge tiles in both dims
    plan = MappingPlan.build([spec], mapper="stable", sign="tile", seed=11, tile=tile, compression=2.0)
    return LayerMapping.build(plan, plan.spec("q"))


def dense_of(layer_map, z):
    from hf_roast.backends.pytorch import materialize_weight

    return materialize_weight(z, layer_map, torch.float32, scratch=False).clone()


@pytest.mark.parametrize("axis", ["rows", "cols"])
@pytest.mark.parametrize("kept", [[0, 4], [1, 2], (1, 3)])
def test_a_cut_reads_exactly_the_kept_part_of_w(axis, kept):
    """One tile per unit; the last unit is the partial edge tile (37 = 4 x 8 + 5 rows, 45 = 2 x 16 + 13 cols)."""
    lm = odd_layer_map()
    z = torch.randn(lm.plan.num_slots, generator=torch.Generator().manual_seed(0))
    size = 37 if axis == "rows" else 45
    t = 8 if axis == "rows" else 16
    n_units = math.ceil(size / t)
    kept_units = kept if isinstance(kept, tuple) else torch.tensor(kept)
    if isinstance(kept, list) and max(kept) >= n_units:
        kept_units = torch.tensor([k for k in kept if k < n_units])
    cut = _cut_of(kept_units, Member(axis, 1), t, size, n_units, "cpu")
    w = dense_of(lm, z)
    units = index_list(cut.units, size)
    sub = dense_of(lm.select_tiles(axis, cut.tiles, cut.length), z)
    assert torch.equal(sub, w[units] if axis == "rows" else w[:, units])
    x = torch.randn(3, 45, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(37, generator=torch.Generator().manual_seed(2))
    y = sliced_linear(x, z, bias, lm, "torch", cut)
    if axis == "rows":
        want = torch.zeros(3, 37)
        want[:, units] = x @ w[units].t() + bias[units]
    else:
        want = x[:, units] @ w[:, units].t() * cut.scale + bias
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_backends_agree_on_a_cut():
    """The PyTorch path with the CPU backend's W build (auto), without it (torch), and the CPU GEMV
    (no gradient, few rows) read the same compacted tables."""
    lm = odd_layer_map()
    z = torch.randn(lm.plan.num_slots, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 5, 45, generator=torch.Generator().manual_seed(1))
    for axis, size, t in (("rows", 37, 8), ("cols", 45, 16)):
        cut = _cut_of(torch.tensor([0, 2]), Member(axis, 1), t, size, math.ceil(size / t), "cpu")
        outs = {}
        for backend in ("torch", "auto"):
            zz, xx = z.clone().requires_grad_(), x.clone().requires_grad_()
            y = sliced_linear(xx, zz, None, lm, backend, cut)
            y.square().sum().backward()
            outs[backend] = (y.detach(), zz.grad, xx.grad)
            with torch.no_grad():
                outs[backend + "-nograd"] = sliced_linear(x[:1, :3], z, None, lm, backend, cut)
        for a, b in zip(outs["torch"], outs["auto"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(outs["torch-nograd"], outs["auto-nograd"], rtol=1e-5, atol=1e-5)


def test_triton_kernels_take_compacted_tables():
    """The Triton kernels (interpreter on CPU) read a cut's compacted tile tables like the PyTorch path."""
    pytest.importorskip("triton")
    from hf_roast.backends.pytorch import RoastLinearFunction
    from hf_roast.backends.triton import ops
    from hf_roast.backends.triton.available import interpreter_active

    if not interpreter_active() and not torch.cuda.is_available():
        pytest.skip("the Triton interpreter was not switched on before triton was imported")
    device = torch.device("cuda" if torch.cuda.is_available() and not interpreter_active() else "cpu")
    lm = odd_layer_map()
    lm = LayerMapping.build(lm.plan, lm.spec, device)
    gen = torch.Generator().manual_seed(0)
    z0 = torch.randn(lm.plan.num_slots, generator=gen).to(device)
    x0 = torch.randn(3, 45, generator=gen).to(device)
    for axis, size, t, kept in (("rows", 37, 8, [1, 4]), ("cols", 45, 16, [0, 2])):
        cut = _cut_of(torch.tensor(kept), Member(axis, 1), t, size, math.ceil(size / t), device)
        sub = lm.select_tiles(axis, cut.tiles, cut.length)
        x_in = x0 if axis == "rows" else x0[:, index_list(cut.units, size)]
        results = []
        for fn in (ops.triton_roast_linear, lambda x, z, b, m: RoastLinearFunction.apply(x, z, b, m)):
            x, z = x_in.clone().requires_grad_(), z0.clone().requires_grad_()
            y = fn(x, z, None, sub)
            y.square().sum().backward()
            results.append((y.detach(), x.grad, z.grad))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert results[0][0].shape[-1] == (cut.length if axis == "rows" else 37)


# ---- masks, steps, checkpointing ---------------------------------------------------------------------------
def test_masks_are_seeded_per_step_and_block():
    a, b = SliceOut(0.5, "random", seed=7), SliceOut(0.5, "random", seed=7)
    assert torch.equal(a.draw(0, 20), b.draw(0, 20))
    assert not torch.equal(a.draw(0, 20), a.draw(1, 20))  # blocks draw apart
    first = a.draw(0, 20)
    a.advance()
    assert not torch.equal(first, a.draw(0, 20))  # and steps
    assert len(first) == 10 and torch.equal(first, first.sort().values)
    c = SliceOut(0.3, "contiguous", seed=7)
    start, stop = c.draw(0, 20)
    assert stop - start == 6 and 0 <= start <= 14
    assert SliceOut(1.0).draw(0, 20) is None and SliceOut(0.99).draw(0, 20) is None  # rounds to all 20
    assert kept_count(0.01, 20) == 1


def test_gradient_checkpointing_recomputes_the_same_mask():
    plain, checkpointed = roast_llama(keep=0.5, seed=2), roast_llama(keep=0.5, seed=2)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = batch(4)
    got, want = step(checkpointed, ids), step(plain, ids)
    torch.testing.assert_close(got[1], want[1])
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-7)


def _llama_training_case(mode):
    ids = batch(5, (4, 16))
    return roast_llama(keep=0.5, mode=mode), {"input_ids": ids, "labels": ids}


def _bert_training_case(mode):
    ids, labels = bert_batch(5, (8, 12))
    return roast_bert(keep=0.5, mode=mode), {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize("case", [_llama_training_case, _bert_training_case], ids=["llama", "bert"])
@pytest.mark.parametrize("mode", ["random", "contiguous"])
def test_a_tiny_model_trains_with_sliceout(mode, case):
    rm, inputs = case(mode)
    optimizer = torch.optim.AdamW(rm.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = rm(**inputs).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0] - 0.2
    assert sliceout_state(rm).step == 12
    rm.eval()
    with torch.no_grad():
        assert math.isfinite(rm(**inputs).loss.item())


def test_enable_again_changes_keep_and_keep_one_switches_off():
    rm = roast_llama(keep=0.5)
    state = sliceout_state(rm)
    assert enable_sliceout(rm, 0.75, "contiguous", 3) is state and (state.keep, state.mode, state.seed) == (
        0.75,
        "contiguous",
        3,
    )
    reference = roast_llama()
    enable_sliceout(rm, 1.0)
    ids = batch()
    assert torch.equal(step(rm, ids)[2], step(reference, ids)[2])


# ---- BERT-style encoder layers (attention.self.query/key/value -> attention.output.dense, intermediate -> output)
def roast_bert(keep=1.0, mode="random", seed=0, enable=False, **config):
    """A tiny BERT classifier (2 layers, 4 heads of 16, intermediate 128, no dropout) compressed 4x with 16 x 16
    tiles (4 attention units, 8 MLP units per layer), biases made nonzero, in train mode. ``enable``: attach
    SliceOut even at keep 1."""
    model = tiny_bert_classifier(
        intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    config = {"target_modules": "all-linear", "exclude_modules": ["classifier"], **config}
    return compressed(model, keep, mode, seed, TILE, enable, **config)


def bert_batch(seed=0, shape=(2, 11)):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 96, shape, generator=gen), torch.randint(0, 3, shape[:1], generator=gen)


BERT_MEMBERS = {
    "attention.self.query": ("attention", Member("rows", 1)),
    "attention.self.key": ("attention", Member("rows", 1)),
    "attention.self.value": ("attention", Member("rows", 1)),
    "attention.output.dense": ("attention", Member("cols", 1)),
    "intermediate.dense": ("", Member("rows", 1)),
    "output.dense": ("", Member("cols", 1)),
}


def test_bert_layers_are_an_attention_and_an_mlp_block():
    rm = roast_bert(keep=0.5)
    state = sliceout_state(rm)
    assert [(b.name, b.n_units) for b in state.blocks] == [
        ("bert.encoder.layer.0.attention", 4),  # a head of 16 per unit
        ("bert.encoder.layer.0", 8),  # 128 / 16
        ("bert.encoder.layer.1.attention", 4),
        ("bert.encoder.layer.1", 8),
    ] and not state.skipped
    sites = {
        n: (m.__dict__["_sliceout"].block.name, m.__dict__["_sliceout"].member) for n, m in sliced_layers(rm)
    }
    want = {}
    for i in range(2):
        prefix = f"bert.encoder.layer.{i}"
        for path, (block, member) in BERT_MEMBERS.items():
            want[f"{prefix}.{path}"] = (f"{prefix}.{block}".rstrip("."), member)
    assert sites == want  # the pooler and the (uncompressed) classifier stay whole
    # all-MiniLM-L6-v2's shapes (hidden 384, 12 heads of 32, intermediate 1536), default 32 x 32 tile
    mini = get_roast_model(
        tiny_bert_classifier(
            hidden_size=384, num_attention_heads=12, intermediate_size=1536, num_hidden_layers=1
        ),
        RoastConfig(compression=16, exclude_modules=["classifier"], sliceout_keep=0.5),
    )
    assert [(b.name, b.n_units) for b in sliceout_state(mini).blocks] == [
        ("bert.encoder.layer.0.attention", 12),
        ("bert.encoder.layer.0", 48),
    ]


def test_bert_keep_one_is_bit_identical_forward_and_grads():
    plain, attached = roast_bert(), roast_bert(enable=True)
    assert (
        not sliced_layers(plain) and len(sliced_layers(attached)) == 12
    )  # 2 x (q, k, v, o, intermediate, output)
    ids, labels = bert_batch()
    assert_bit_identical(step(plain, ids, labels), step(attached, ids, labels))


@pytest.mark.parametrize("mode", ["random", "contiguous"])
def test_bert_layer_matches_a_dense_reference(mode):
    """One BertLayer at keep 0.5 against a dense one: each W materialised from z, the dropped heads' q/k/v rows
    and MLP units zeroed, the consumers' kept columns rescaled by N / K, autograd for dx, dz and the biases. z
    tiles read only by dropped units get no gradient; the kept ones do."""
    rm = roast_bert(keep=0.5, mode=mode, seed=4, scaler="none")  # dz as autograd gives it
    layer = rm.base_model.bert.encoder.layer[1]
    attn, o, inter, out = layer.attention.self, layer.attention.output, layer.intermediate, layer.output
    producers = [attn.query, attn.key, attn.value, inter.dense]
    consumers = [o.dense, out.dense]
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    z = rm.roast_store.z
    y = layer(x)
    cuts = {m: current_cut(m) for m in producers + consumers}
    assert [cuts[m].scale for m in consumers] == [2.0, 2.0]  # 2 of 4 heads, 4 of 8 MLP units
    for producer, consumer in (
        (attn.query, o.dense),
        (attn.key, o.dense),
        (attn.value, o.dense),
        (inter.dense, out.dense),
    ):
        assert index_list(cuts[producer].units, 64 if consumer is o.dense else 128) == index_list(
            cuts[consumer].units, cuts[consumer].size
        )
    grad_y = torch.randn_like(y)
    linears = producers + consumers
    got = torch.autograd.grad(y, [x, z, *(m.bias for m in linears)], grad_y)

    zr = z.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    br = [m.bias.detach().clone().requires_grad_() for m in linears]
    masks = []
    for consumer in consumers:
        mask = torch.zeros(cuts[consumer].size)
        mask[index_list(cuts[consumer].units, cuts[consumer].size)] = 1.0
        masks.append(mask)
    heads = [F.linear(xr, dense_weight(m, zr), b) * masks[0] for m, b in zip(producers[:3], br[:3])]
    q, k, v = (t.view(2, 7, 4, 16).transpose(1, 2) for t in heads)
    context = (torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v).transpose(1, 2).reshape(2, 7, 64)
    attended = F.linear(context * masks[0], dense_weight(o.dense, zr)) * cuts[o.dense].scale + br[4]
    h = o.LayerNorm(attended + xr)
    hidden = F.gelu(F.linear(h, dense_weight(inter.dense, zr), br[3]) * masks[1])
    want_y = out.LayerNorm(
        F.linear(hidden * masks[1], dense_weight(out.dense, zr)) * cuts[out.dense].scale + br[5] + h
    )
    want = torch.autograd.grad(want_y, [xr, zr, *br], grad_y)
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    names = (
        "dx",
        "dz",
        "db_query",
        "db_key",
        "db_value",
        "db_intermediate",
        "db_attention_output",
        "db_output",
    )
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    for db, mask in zip(got[2:6], [masks[0]] * 3 + [masks[1]]):  # query, key, value, intermediate
        assert torch.all(db[mask == 0] == 0)
    assert (got[4][masks[0] == 1] != 0).all() and (
        got[5][masks[1] == 1] != 0
    ).all()  # (a key bias: ~0 anyway)
    # z: only this layer ran, so its kept tiles' slots are all that get a gradient
    plan = rm.plan
    kept = torch.zeros(plan.num_slot_tiles, dtype=torch.bool)
    for m in linears:
        cut = cuts[m]
        grid = m.tile_slot.view(m.spec.n_tile_rows(plan.tile), m.spec.n_tile_cols(plan.tile))
        kept[(grid[cut.tiles] if cut.axis == "rows" else grid[:, cut.tiles]).flatten()] = True
    per_tile = got[1].view(-1, plan.tile_numel)
    assert (~kept).sum() > 0 and kept.sum() > 0
    assert torch.all(per_tile[~kept] == 0)
    assert (per_tile[kept] != 0).any(dim=1).float().mean() > 0.99


# ---- configuration and checkpoints ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value, match",
    [
        ("sliceout_keep", 0.0, "sliceout_keep must be a fraction in"),
        ("sliceout_keep", 1.5, "sliceout_keep must be a fraction in"),
        ("sliceout_keep", float("nan"), "sliceout_keep must be a fraction in"),
        ("sliceout_keep", "0.5", "sliceout_keep must be a fraction in"),
        ("sliceout_keep", True, "sliceout_keep must be a fraction in"),
        ("sliceout_mode", "blocks", "Unknown sliceout_mode 'blocks'"),
        ("sliceout_seed", -1, "sliceout_seed must be an int"),
        ("sliceout_seed", 1.0, "sliceout_seed must be an int"),
    ],
)
def test_bad_config_values_are_refused(field, value, match):
    with pytest.raises(ValueError, match=match):
        RoastConfig(compression=4, **{field: value})


def test_defaults_and_bad_runtime_values():
    cfg = RoastConfig(compression=4)
    assert (cfg.sliceout_keep, cfg.sliceout_mode, cfg.sliceout_seed) == (1.0, "random", 0)
    assert RoastConfig(compression=4, sliceout_keep=1).sliceout_keep == 1.0
    with pytest.raises(ValueError, match="keep must be a fraction"):
        SliceOut(0.0)
    with pytest.raises(ValueError, match="Unknown sliceout_mode"):
        SliceOut(0.5, "random").mode = "strided"


@pytest.mark.parametrize("overrides", [dict(mapper="hashednet"), dict(sign="element")])
def test_mappings_without_tile_tables_are_refused(overrides):
    with pytest.raises(ValueError, match="SliceOut computes whole tiles"):
        get_roast_model(
            tiny_llama(), RoastConfig(compression=4, init="random", sliceout_keep=0.5, **overrides)
        )


def test_models_without_llama_blocks_are_refused():
    with pytest.raises(ValueError, match="SliceOut found no block"):
        get_roast_model(tiny_gpt2(), RoastConfig(compression=4, init="random", sliceout_keep=0.5))


def test_single_unit_blocks_stay_whole_with_a_warning():
    """With 32 x 32 tiles the tiny Llama's attention (two key/value heads of 16) is one unit: left whole."""
    with pytest.warns(UserWarning, match="SliceOut leaves 2 block"):
        rm = get_roast_model(tiny_llama(), RoastConfig(compression=4, init="random", sliceout_keep=0.5))
    state = sliceout_state(rm)
    assert [b.name for b in state.blocks] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert state.skipped == ["model.layers.0.self_attn", "model.layers.1.self_attn"]


def test_checkpoints_do_not_store_sliceout(tmp_path):
    rm = roast_llama(keep=0.5, mode="contiguous", seed=9)
    assert not any(k.startswith("sliceout") for k in rm.roast_config.to_dict())
    rm.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "roast_config.json").read_text())
    assert not any(k.startswith("sliceout") for k in stored)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert not any(k.startswith("sliceout") for k in config)
    loaded = RoastModel.from_pretrained(tmp_path)
    assert loaded.roast_config.sliceout_keep == 1.0 and sliceout_state(loaded) is None
    ids = batch()
    rm.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, rm(input_ids=ids).logits)


def test_trainer_callback_sets_keep_per_step():
    import transformers

    from hf_roast import SliceOutCallback

    assert issubclass(SliceOutCallback, transformers.TrainerCallback)
    rm = roast_llama()
    callback = SliceOutCallback(lambda step, total: 0.5 if step < total - 1 else 1.0, mode="contiguous")
    state = transformers.TrainerState(global_step=0, max_steps=3)
    callback.on_step_begin(None, state, None, model=rm)
    sliceout = sliceout_state(rm)
    assert (sliceout.keep, sliceout.mode) == (0.5, "contiguous")
    state.global_step = 2
    callback.on_step_begin(None, state, None, model=copy.copy(rm))
    assert sliceout.keep == 1.0
