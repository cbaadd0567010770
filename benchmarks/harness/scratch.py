"""Experiment 3: training a language model from scratch, the STABLE-RPS paper's actual claim.

Parameter sharing *from the start of training* is claimed to match or beat a smaller model and pruning
at the same number of stored values, across the compression range. Every arm here trains a
Llama-architecture byte-level LM from a random init on the same batches of Wikipedia text, for the same
number of steps with the same schedule, and is scored in bits per byte on held-out articles:

* ``dense``: the full model;
* hf-roast (``init="random"``) at c-fold compression of the projections, with any mapper;
* a narrower model whose projections store the same number of values (width ~ 1/sqrt(c), the MLP
  width solved so the count matches);
* magnitude pruning at init with a fixed mask, keeping the same number of projection values.

Each arm picks its learning rate from a small grid on a validation split of the training articles; the
held-out articles score the chosen run once. Bytes, not tokens, make the metric tokenizer-free.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from .arms import Arm
from .measure import ResourceMeter
from .training import single_rate_groups

BYTE_VOCAB = 257
"""256 byte values and an end-of-article token."""
EOS = 256


@dataclass
class ScratchSetup:
    """The recipe every arm shares: model shape, token budget, schedule and evaluation."""

    hidden_size: int = 256
    intermediate_size: int = 688
    num_layers: int = 4
    head_dim: int = 32
    context: int = 128
    batch_size: int = 8
    steps: int = 300
    warmup_fraction: float = 0.05
    lr_grid: tuple[float, ...] = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
    weight_decay: float = 0.0
    val_bytes: int = 65_536
    eval_bytes: int = 131_072
    seed: int = 0
    # every this many steps, score the validation bytes (the curve that shows whether training levelled off);
    # 0: no curve
    curve_every: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.curve_every:
            d.pop("curve_every")  # results written before the curve existed stay comparable
        d["lr_grid"] = list(self.lr_grid)
        d["tokens_per_arm"] = self.steps * self.batch_size * self.context
        return d


@dataclass
class ScratchSource:
    """Byte streams: training articles, a validation split of them (for the lr), held-out articles."""

    name: str
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    description: str = ""


def bytes_of(texts: list[str]) -> torch.Tensor:
    """UTF-8 bytes of each text followed by the end-of-article token."""
    ids: list[int] = []
    for text in texts:
        ids.extend(text.encode("utf-8"))
        ids.append(EOS)
    return torch.tensor(ids, dtype=torch.long)


def split_bytes(train_articles: list[str], held_out: list[str], val_every: int = 10) -> tuple:
    """(train, val, test) byte streams: every ``val_every``-th training article validates the lr."""
    val = [a for i, a in enumerate(train_articles) if i % val_every == 0]
    train = [a for i, a in enumerate(train_articles) if i % val_every != 0]
    return bytes_of(train), bytes_of(val), bytes_of(held_out)


def llama_config(
    setup: ScratchSetup,
    hidden: int | None = None,
    intermediate: int | None = None,
    head_dim: int | None = None,
):
    from transformers import LlamaConfig

    hidden = hidden or setup.hidden_size
    head_dim = head_dim or setup.head_dim
    heads = max(1, hidden // head_dim)
    if hidden % heads:
        raise ValueError(f"hidden size {hidden} is not a multiple of the head dim {head_dim}.")
    return LlamaConfig(
        vocab_size=BYTE_VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate or setup.intermediate_size,
        num_hidden_layers=setup.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=setup.context,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=EOS,
        pad_token_id=None,
    )


def projection_values(hidden: int, intermediate: int, num_layers: int) -> int:
    """Weights of the attention (q, k, v, o) and MLP (gate, up, down) projections of a Llama."""
    return num_layers * (4 * hidden * hidden + 3 * hidden * intermediate)


def narrower_shape(setup: ScratchSetup, budget: int) -> tuple[int, int, int]:
    """(hidden, intermediate, head_dim) of the narrower arm: width ~ dense / sqrt(c) in whole heads, then the
    MLP width that brings the projection count as close as possible to ``budget``.

    Below one head of ``setup.head_dim`` (from about 64x on the default model) the model keeps one head, as
    wide as the model: the power of two nearest the width, at least 4 (rotary embeddings need an even head).
    """
    dense = projection_values(setup.hidden_size, setup.intermediate_size, setup.num_layers)
    width = setup.hidden_size / math.sqrt(dense / budget)
    head_dim = setup.head_dim
    if width < setup.head_dim * 0.75:
        head_dim = max(4, 2 ** round(math.log2(width)))
    hidden = max(head_dim, head_dim * round(width / head_dim))
    per_layer = budget / setup.num_layers
    intermediate = max(1, round((per_layer - 4 * hidden * hidden) / (3 * hidden)))
    return hidden, intermediate, head_dim


def build_scratch_model(arm: Arm, setup: ScratchSetup) -> tuple[nn.Module, dict]:
    """The arm's freshly initialised model (seeded) and its storage accounting."""
    from transformers import LlamaForCausalLM, set_seed

    from hf_roast.config import RoastConfig
    from hf_roast.model import get_roast_model

    from .baselines import magnitude_prune, parameter_bytes

    dense_values = projection_values(setup.hidden_size, setup.intermediate_size, setup.num_layers)
    set_seed(arm.seed)
    roast_config = RoastConfig(
        compression=max(arm.compression, 1.0),
        target_modules="all-linear",
        mapper=arm.mapper if arm.method == "roast" else "stable",
        seed=arm.seed,
        init="random",
        scaler=arm.scaler,
        tile=arm.tile,
        module_balance=arm.module_balance,
        sliceout_keep=arm.sliceout_keep if arm.method == "roast" else 1.0,
        sliceout_mode=arm.sliceout_mode,
        sliceout_seed=arm.seed,
    )
    storage: dict = {"dense_target_values": dense_values, "dense_target_bytes": 4 * dense_values}
    if arm.method == "narrower":
        budget = _roast_budget(setup, arm)
        hidden, intermediate, head_dim = narrower_shape(setup, budget)
        model = LlamaForCausalLM(llama_config(setup, hidden, intermediate, head_dim))
        target = projection_values(hidden, intermediate, setup.num_layers)
        storage.update(hidden_size=hidden, intermediate_size=intermediate, head_dim=head_dim)
        values, nbytes = parameter_bytes(model)
    elif arm.method == "floor":
        model = LlamaForCausalLM(llama_config(setup))
        for weight in projection_weights(model):
            weight.requires_grad_(False)
            weight.zero_()  # no attention and no MLP: the residual stream is the byte's embedding
        target = 0
        values, nbytes = parameter_bytes(model)
        values, nbytes = values - dense_values, nbytes - 4 * dense_values
    else:
        model = LlamaForCausalLM(llama_config(setup))
        target = dense_values
        values, nbytes = parameter_bytes(model)
        if arm.method == "roast":
            model = get_roast_model(model, roast_config)
            target = model.compression_report()["target"]["stored_parameters"]
            values, nbytes = parameter_bytes(model)
        elif arm.method == "prune":
            generator = torch.Generator().manual_seed(arm.seed) if arm.prune_by == "random" else None
            pruned = magnitude_prune(model, roast_config, _roast_budget(setup, arm), generator)
            target = pruned["kept_values"]
            # the dense weight_orig stays a parameter while training; storage counts the kept values and
            # the sparsity pattern in place of the dense projections
            values += target - dense_values
            nbytes += pruned["stored_bytes"] - 4 * dense_values
            storage.update(
                target_bytes_values_only=pruned["values_bytes"],
                target_bytes_bitmask=pruned["values_bytes"] + pruned["bitmask_bytes"],
                target_bytes_csr=pruned["values_bytes"] + pruned["csr_index_bytes"],
                index_overhead_bytes=pruned["index_overhead_bytes"],
                index_format=pruned["index_format"],
            )
    storage.update(
        target_values=target,
        target_bytes=storage.get("target_bytes_values_only", 4 * target)
        + storage.get("index_overhead_bytes", 0),
        model_values=values,
        model_bytes=nbytes,
        target_ratio=dense_values / target if target else math.inf,
    )
    storage["training_memory"] = training_memory(model, storage)
    return model, storage


def training_memory(model: nn.Module, storage: dict) -> dict:
    """Bytes that training holds besides activations: trainable parameters, their gradients, AdamW's two
    moments, and the masks of pruning at init, as this harness trains (all fp32).

    Pruning here trains dense-sized ``weight_orig`` tensors under a dense fp32 mask; ``with_sparse_kernels``
    is what it would hold with kernels that store and update only the kept values (values, gradients and
    moments of the kept weights, plus the cheaper of a bitmask and CSR indices). The floor's frozen zero
    projections are not counted: a model without projections does not need them.
    """
    trainable = sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
    masks = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith("weight_mask"))
    memory = {
        "parameter_bytes": 4 * trainable,
        "gradient_bytes": 4 * trainable,
        "optimizer_bytes": 8 * trainable,
        "mask_bytes": masks,
    }
    memory["total_bytes"] = sum(memory.values())
    if "index_overhead_bytes" in storage:
        dense, kept = storage["dense_target_values"], storage["target_values"]
        memory["with_sparse_kernels_bytes"] = (
            16 * (trainable - dense + kept) + storage["index_overhead_bytes"]
        )
    return memory


def _roast_budget(setup: ScratchSetup, arm: Arm) -> int:
    """The length of z hf-roast gets at the arm's compression: every compressed arm stores this many."""
    from transformers import LlamaForCausalLM

    from hf_roast.config import RoastConfig
    from hf_roast.model import get_roast_model

    with torch.device("meta"):
        probe = LlamaForCausalLM(llama_config(setup))
    cfg = RoastConfig(compression=arm.compression, target_modules="all-linear", init="random", tile=arm.tile)
    return get_roast_model(probe, cfg).compression_report()["target"]["stored_parameters"]


def training_windows(stream: torch.Tensor, setup: ScratchSetup) -> Callable[[int], torch.Tensor]:
    """Batch ``i`` of the shared schedule: the same random windows for every arm (seeded per step)."""
    span = setup.context + 1
    if len(stream) <= span:
        raise ValueError(f"training text has {len(stream)} bytes, fewer than one window of {span}.")

    def batch(step: int) -> torch.Tensor:
        rng = random.Random(setup.seed * 1_000_003 + step)
        starts = [rng.randrange(len(stream) - span) for _ in range(setup.batch_size)]
        return torch.stack([stream[s : s + span] for s in starts])

    return batch


@torch.no_grad()
def bits_per_byte(model: nn.Module, stream: torch.Tensor, context: int, max_bytes: int) -> float:
    """Mean next-byte cross-entropy in bits over non-overlapping windows of the first ``max_bytes``."""
    was_training = model.training
    model.eval()
    stream = stream[: max_bytes + 1]
    windows = [stream[s : s + context + 1] for s in range(0, len(stream) - 1, context)]
    windows = [w for w in windows if len(w) == context + 1]
    total, count = 0.0, 0
    for start in range(0, len(windows), 32):
        chunk = torch.stack(windows[start : start + 32])
        logits = model(input_ids=chunk[:, :-1]).logits.float()
        nll = nn.functional.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum")
        total += float(nll)
        count += chunk[:, 1:].numel()
    model.train(was_training)
    return total / count / math.log(2)


def projection_weights(model: nn.Module) -> list[nn.Parameter]:
    """The trainable values that stand for the projection weights: ``z`` for hf-roast, else the weight
    (``weight_orig`` when pruned) of every ``all-linear`` target module. Biases are not among them."""
    from hf_roast.checkpoint_format import STORE_NAME
    from hf_roast.config import RoastConfig
    from hf_roast.targets import find_targets

    store = getattr(model, STORE_NAME, None)
    if store is not None:
        return [store.z]
    targets = find_targets(model, RoastConfig(target_modules="all-linear"))
    found = []
    for _, module, _ in targets:
        weight = getattr(module, "weight_orig", None)
        found.append(weight if isinstance(weight, nn.Parameter) else module.weight)
    return found


def split_rate_groups(model: nn.Module, projection_lr: float, rest_lr: float) -> list[dict]:
    """Two optimizer groups: the projection weights at ``projection_lr`` (z's in weight units, see
    :func:`hf_roast.optim.z_weight_multiplier`) and every other trainable parameter at ``rest_lr``.

    Every arm shares ``rest_lr``: the embeddings, norms and LM head are the same in every arm but the
    narrower one, and one uniform rate cannot suit both them and the projections (see README, "From scratch").
    """
    from hf_roast.checkpoint_format import STORE_NAME
    from hf_roast.optim import z_weight_multiplier

    projections = [p for p in projection_weights(model) if p.requires_grad]
    multiplier = z_weight_multiplier(model) if getattr(model, STORE_NAME, None) is not None else 1.0
    ids = {id(p) for p in projections}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return [
        {"params": projections, "lr": projection_lr * multiplier, "name": "projections"},
        {"params": rest, "lr": rest_lr, "name": "rest"},
    ]


def train_from_scratch(
    model: nn.Module,
    setup: ScratchSetup,
    lr: float,
    batches,
    recipe: tuple | None = None,
    rest_lr: float | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
) -> list[float]:
    """AdamW, linear warm-up then cosine decay to 10%; z gets ``lr`` in weight units (times the recipe's
    z ratio when given, see :mod:`hf_roast.optim`); with ``rest_lr``, ``lr`` is the projections' rate and
    every other parameter trains at ``rest_lr`` (:func:`split_rate_groups`); pruning masks stay fixed.
    ``on_checkpoint(step)`` is called every ``setup.curve_every`` steps (the validation curve)."""
    if recipe:
        from hf_roast.optim import RoastRecipe, roast_parameter_groups

        groups = roast_parameter_groups(model, lr, recipe=RoastRecipe(*recipe))
    elif rest_lr:
        groups = split_rate_groups(model, lr, rest_lr)
    else:
        groups, _ = single_rate_groups(model, lr)
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=setup.weight_decay, betas=(0.9, 0.95))
    warmup = max(1, int(setup.warmup_fraction * setup.steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, setup.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    losses = []
    for step in range(setup.steps):
        batch = batches(step)
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        if not torch.isfinite(loss):
            losses.append(float("nan"))
            break
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if on_checkpoint is not None and setup.curve_every and (step + 1) % setup.curve_every == 0:
            on_checkpoint(step + 1)
    return losses


def reusable_runs(previous: dict | None, arm: Arm, setup: ScratchSetup) -> dict[float, dict]:
    """Learning-rate runs of an earlier result of this arm that the current grid can keep, by rate.

    A run is kept only when the arm and the setup (but for the grid) are unchanged, and when its held-out
    score is known: stored per run, or as the result's own score for the run it selected.
    """
    if not previous:
        return {}
    same_setup = {**previous.get("setup", {}), "lr_grid": None} == {**setup.to_dict(), "lr_grid": None}
    defaults = Arm(arm.name, arm.method).to_dict()  # fields added since fill in at their defaults
    old_arm = {k: v for k, v in {**defaults, **previous.get("arm", {})}.items() if k != "lrs"}
    new_arm = {k: v for k, v in arm.to_dict().items() if k != "lrs"}
    if not same_setup or old_arm != new_arm:
        return {}
    kept = {}
    for run in previous.get("lr_search", []):
        run = dict(run)
        selected = run["lr"] == previous.get("selected_lr")
        if "test_bits_per_byte" not in run and selected:
            run["test_bits_per_byte"] = previous["bits_per_byte"]
        # the storage accounting is the arm's, whatever the rate; what pruning kept after training was
        # counted on the selected run only
        run["storage"] = dict(previous["storage"])
        if not selected:
            run["storage"].pop("kept_values_after_training", None)
        if "test_bits_per_byte" in run:
            kept[run["lr"]] = run
    return kept


def arm_setup(arm: Arm, setup: ScratchSetup) -> ScratchSetup:
    """The setup one arm trains with: its own budget and learning-rate grid."""
    setup = replace(setup, steps=arm.steps or setup.steps)
    return replace(setup, lr_grid=tuple(arm.lrs or setup.lr_grid))


def up_to_date(previous: dict | None, arm: Arm, setup: ScratchSetup) -> bool:
    """Whether an earlier result already holds a run at every rate of the arm's grid."""
    setup = arm_setup(arm, setup)
    return set(setup.lr_grid) <= set(reusable_runs(previous, arm, setup))


def run_scratch_arm(
    arm: Arm,
    source: ScratchSource,
    setup: ScratchSetup,
    previous: dict | None = None,
    on_run: Callable[[dict], None] | None = None,
    max_new_runs: int | None = None,
) -> tuple[dict, nn.Module | None]:
    """Train the arm once per learning rate, keep the best on validation, score it on held-out text.

    Every run is scored on held-out text too (selection uses validation only), so that a later, wider
    grid reuses the runs of ``previous`` (an earlier result of the same arm) and trains only new rates.
    ``on_run`` receives the result so far after each newly trained rate (saved, it makes a long arm resumable
    rate by rate). With ``max_new_runs`` it trains at most that many new rates and returns the result so far,
    marked ``"complete": False`` while rates remain (a breadth-first sweep: every arm's likeliest rate first).
    Returns the result and the selected model (None when the selected run was reused).
    """
    setup = arm_setup(arm, setup)
    batches = training_windows(source.train, setup)
    reused = reusable_runs(previous, arm, setup)
    runs, best, best_model, trained = [], None, None, 0
    with ResourceMeter() as whole:
        for lr in setup.lr_grid:
            if lr in reused:
                run, model = reused[lr], None
            elif max_new_runs is not None and trained >= max_new_runs:
                break
            else:
                model, run = _train_one_rate(arm, source, setup, lr, batches)
                trained += 1
            runs.append(run)
            if best is None or run["val_bits_per_byte"] < best["val_bits_per_byte"]:
                best, best_model = run, model
            if on_run is not None and lr not in reused and len(runs) < len(setup.lr_grid):
                on_run(_scratch_result(arm, source, setup, runs, best, whole))
    result = _scratch_result(arm, source, setup, runs, best, whole)
    if len(runs) < len(setup.lr_grid):
        result["complete"] = False
    if arm.method == "prune" and best_model is not None:
        from .baselines import finalize_pruning

        result["storage"]["kept_values_after_training"] = finalize_pruning(best_model)
    return result, best_model


def _train_one_rate(arm: Arm, source: ScratchSource, setup: ScratchSetup, lr: float, batches) -> tuple:
    model, storage = build_scratch_model(arm, setup)
    curve: list[list[float]] = []

    def checkpoint(step: int) -> None:
        curve.append([step, round(bits_per_byte(model, source.val, setup.context, setup.val_bytes), 4)])

    with ResourceMeter() as meter:
        losses = train_from_scratch(
            model, setup, lr, batches, arm.recipe, arm.rest_lr, on_checkpoint=checkpoint
        )
    diverged = not math.isfinite(losses[-1])
    run = {"lr": lr, "final_train_loss": losses[-1], "diverged": diverged}
    for split, stream, limit in (
        ("val", source.val, setup.val_bytes),
        ("test", source.test, setup.eval_bytes),
    ):
        run[f"{split}_bits_per_byte"] = (
            float("inf") if diverged else bits_per_byte(model, stream, setup.context, limit)
        )
    run["loss_curve"] = [round(x, 4) for x in losses[:: max(1, len(losses) // 50)]]
    if curve:
        run["val_curve"] = curve
    run.update(meter.as_dict())
    run["storage"] = storage
    return model, run


def _scratch_result(
    arm: Arm, source: ScratchSource, setup: ScratchSetup, runs: list, best: dict, whole
) -> dict:
    test = best["test_bits_per_byte"]
    return {
        "experiment": "scratch",
        "arm": arm.to_dict(),
        "source": source.name,
        "data": source.description,
        "setup": setup.to_dict(),
        "lr_search": [{k: v for k, v in r.items() if k != "storage"} for r in runs],
        "selected_lr": best["lr"],
        "val_bits_per_byte": best["val_bits_per_byte"],
        "bits_per_byte": test,
        "perplexity_per_byte": 2.0**test,
        "storage": dict(best["storage"]),
        "train_wall_seconds": best["wall_seconds"],
        "arm_wall_seconds": round(whole.seconds, 2),
        "arm_peak_rss_mb": round(whole.peak_rss / 2**20, 1),
    }


def wikipedia_bytes_source() -> ScratchSource:
    from .data import PINNED, load_wikipedia_articles, split_articles

    train, held_out = split_articles(load_wikipedia_articles())
    tr, val, test = split_bytes(train, held_out)
    description = (
        f"enwiki test dump from {PINNED['enwiki']['package']}, UTF-8 bytes: {len(tr):,} training bytes, "
        f"{len(val):,} validation bytes (every 10th training article), {len(test):,} held-out bytes "
        "(every 5th article)"
    )
    return ScratchSource("byte-level Llama from scratch", tr, val, test, description)


def tiny_bytes_source() -> ScratchSource:
    from .sources import tiny_sentences

    texts = [" ".join(t for t, _ in tiny_sentences(40, seed=s)) for s in range(12)]
    tr, val, test = split_bytes(texts[3:], texts[:3], val_every=4)
    return ScratchSource("tiny byte-level Llama", tr, val, test, "template text, bytes")
