"""2:4 sparsity x int4 and dense int3 (benchmarks/harness/sparse_int4.py), and the mean-pooled smaller model.

Tiny BERTs from configs: the layer's invariants (2 of every 4 kept, codes on a symmetric zero-preserving grid,
the straight-through gradient), the saved file (a round trip gives the same logits, its tensors hold exactly
the bytes the arm reports), and padding that leaves the mean-pooled model's logits alone.
"""

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from benchmarks.harness import sparse_int4
from benchmarks.harness.arms import Arm, build_arm_model, finish_training
from benchmarks.harness.sparse_int4 import LowBitLinear, mask_2_4, pack_bits, unpack_bits


def tiny_bert(layers: int = 2) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=160,  # 160 inputs to output.dense: one whole group of 128 and a partial one of 32
    )
    return BertForSequenceClassification(config).eval()


def _sparse_arm(**kw) -> Arm:
    return Arm("s", "lowbit", z_bits=4, sparsity="2:4", qat=True, **kw)


def test_2_4_mask_keeps_exactly_the_two_largest_of_every_four():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    mask = mask_2_4(w)
    groups, keep = w.abs().view(8, 4, 4), mask.view(8, 4, 4)
    assert torch.all(keep.sum(-1) == 2)
    kept_min = groups.masked_fill(~keep, float("inf")).amin(-1)
    dropped_max = groups.masked_fill(keep, -1.0).amax(-1)
    assert torch.all(kept_min >= dropped_max)
    with pytest.raises(ValueError, match="multiple of 4"):
        mask_2_4(torch.randn(2, 6))


def test_codes_are_symmetric_int4_zero_preserving_with_a_scale_per_128_inputs():
    torch.manual_seed(0)
    layer = LowBitLinear(nn.Linear(160, 6), bits=4, sparse=True)
    layer.freeze()
    codes = layer.codes
    assert codes.dtype == torch.int8 and codes.min() >= -7 and codes.max() <= 7
    assert torch.all(codes[~layer.mask] == 0)  # pruned weights are exactly zero in what is stored
    assert torch.all(codes.abs().amax(1) == 7), "each row's largest weight sits on the grid's edge"
    assert layer.scales.dtype == torch.float16 and layer.scales.shape == (6, 2)  # 128 + a partial 32
    # the largest magnitude of each group of 128 inputs is 7 of its scale
    assert torch.all(codes[:, :128].abs().amax(1) == 7) and torch.all(codes[:, 128:].abs().amax(1) == 7)
    x = torch.zeros(1, 160)
    assert torch.all(layer(x) == layer.bias), "zero in, bias out: no zero-point offset"
    assert torch.equal(layer.stored_weight() == 0, codes == 0)


def test_straight_through_gradient_reaches_the_kept_master_weights_only():
    torch.manual_seed(0)
    layer = LowBitLinear(nn.Linear(16, 4), bits=4, sparse=True)
    x = torch.randn(5, 16)
    layer(x).sum().backward()
    # y = x W_q^T with dW_q/dW = identity (STE) times the mask: d sum(y) / dW[o, i] = mask[o, i] * sum_b x[b, i]
    expected = layer.mask.float() * x.sum(0)
    assert torch.allclose(layer.weight.grad, expected)
    assert not torch.allclose(layer.stored_weight(), layer.weight), (
        "the forward does use the quantised weight"
    )
    dense = LowBitLinear(nn.Linear(16, 4), bits=3, sparse=False)
    dense(x).sum().backward()
    assert torch.allclose(dense.weight.grad, x.sum(0).expand(4, 16))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bit_packing_round_trips_and_takes_ceil_of_n_bits_over_8_bytes(bits):
    m = 2 ** (bits - 1)
    values = torch.arange(-m, m).repeat(37)[:37]
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-37 * bits // 8)
    assert torch.equal(unpack_bits(packed, 37, bits, signed=True), values.to(torch.int16))
    positions = torch.tensor([0, 3, 1, 2, 3])
    assert torch.equal(unpack_bits(pack_bits(positions, 2), 5, 2, signed=False), positions.to(torch.int16))


@pytest.mark.parametrize(
    "arm", [_sparse_arm(), Arm("q", "lowbit", z_bits=3, qat=True)], ids=["2:4-int4", "int3"]
)
def test_saved_model_round_trips_and_holds_exactly_the_reported_bytes(tmp_path, arm):
    model, storage = build_arm_model(tiny_bert(), arm)
    ids = torch.randint(0, 60, (3, 9))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # a few QAT steps move codes and scales
    for _ in range(3):
        model.train()(input_ids=ids, labels=torch.tensor([0, 1, 0])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    finish_training(model, arm)
    model.eval()
    path = tmp_path / "model.safetensors"
    saved = sparse_int4.save_model(model, path)
    with safe_open(str(path), framework="pt") as f:
        sizes = {k: f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()}
    packed = sum(v for k, v in sizes.items() if k.rsplit(".", 1)[1] in ("codes", "index", "scales"))
    assert packed == saved["target"] == storage["target_bytes"]
    assert sum(sizes.values()) == saved["model"] == storage["model_bytes"]
    fresh, _ = build_arm_model(tiny_bert(), arm)  # untrained: everything must come from the file
    fresh.eval()
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, fresh(input_ids=ids).logits)
    sparse_int4.load_model(fresh, path)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, fresh(input_ids=ids).logits)
    assert all(layer.frozen for _, layer in sparse_int4.lowbit_layers(fresh))


def test_lowbit_bytes_are_about_3_125_bits_per_weight_and_equal_for_2_4_int4_and_int3():
    _, sparse = build_arm_model(tiny_bert(), _sparse_arm())
    _, int3 = build_arm_model(tiny_bert(), Arm("q", "lowbit", z_bits=3, qat=True))
    n = sparse["dense_target_values"]
    assert sparse["target_values"] == n // 2 and int3["target_values"] == n
    for s in (sparse, int3):
        bits_per_weight = 8 * s["target_bytes"] / n
        # 3 bits per weight + one fp16 scale per 128 inputs (tiny rows are 32 or 160 wide: more scales per weight)
        assert 3.125 <= bits_per_weight <= 3.0 + 16 / 32
    assert sparse["target_bytes"] == int3["target_bytes"]
    assert sparse["index_overhead_bytes"] == n // 2 * 2 // 8 and int3["index_overhead_bytes"] == 0
    real = sparse_int4.packed_nbytes(1536, 384, 4, True)  # a MiniLM projection: 128 divides its inputs
    assert 8 * real["total"] / (1536 * 384) == 3.125


def test_round_to_nearest_lowbit_trains_dense_and_quantises_at_the_end():
    arm = Arm("r", "lowbit", z_bits=3)
    model, storage = build_arm_model(tiny_bert(), arm)
    assert not sparse_int4.lowbit_layers(model) and "init_relative_error" not in storage
    finish_training(model, arm)
    layers = sparse_int4.lowbit_layers(model)
    assert layers and all(layer.frozen and layer.codes.abs().max() <= 3 for _, layer in layers)
    with pytest.raises(ValueError, match="low-bit arms"):
        Arm("bad", "prune", 4.0, sparsity="2:4")


@pytest.mark.parametrize("layers", [0, 1])
def test_mean_pooled_smaller_model_ignores_padding_and_stores_k_layers(layers):
    arm = Arm(f"m{layers}", "smaller", num_layers=layers, pooling="mean")
    model, storage = build_arm_model(tiny_bert(), arm)
    model.eval()
    a, b = torch.randint(1, 60, (1, 5)), torch.randint(1, 60, (1, 9))
    batch = torch.zeros(2, 9, dtype=torch.long)
    batch[0, :5], batch[1] = a[0], b[0]
    mask = (torch.arange(9) < torch.tensor([[5], [9]])).long()
    with torch.no_grad():
        alone = torch.cat([model(input_ids=a).logits, model(input_ids=b).logits])
        padded = model(input_ids=batch, attention_mask=mask).logits
        unmasked = model(input_ids=batch).logits  # pads counted as tokens: a different mean
    assert torch.allclose(alone, padded, atol=1e-5)
    assert not torch.allclose(alone[0], unmasked[0], atol=1e-3)
    per_layer = 4 * 32 * 32 + 2 * 32 * 160  # q, k, v, attention output; the MLP's two projections
    assert storage["target_values"] == layers * per_layer, "no pooler: only the kept layers' projections"
    assert model.encoder.pooler is None and model.classifier.out_features == 2
    assert storage["target_bytes"] == 4 * layers * per_layer
