"""The named experiments and their arms, in the order they run (most important first).

``quick`` is a check of at most 40 minutes on 2 CPU cores; ``default`` decides the targets; ``full``
adds seeds, mappers and recovery variants; ``tiny`` runs every kind of arm on tiny synthetic sources for
the smoke tests.
"""

from __future__ import annotations

from dataclasses import replace

from .arms import Z_GROUP_SIZE, Arm

EXPERIMENTS = ("classification", "lm", "scratch")


def _roast(c, mapper="stable", emb=False, seed=0, **kw) -> Arm:
    tag = f"roast-{mapper}{'-emb' if emb else ''}-{c:g}x" + (f"-s{seed}" if seed else "")
    return Arm(
        tag + kw.pop("suffix", ""), "roast", c, mapper=mapper, compress_embeddings=emb, seed=seed, **kw
    )


def _prune(c, emb=False, seed=0, **kw) -> Arm:
    tag = f"prune{'-emb' if emb else ''}-{c:g}x" + (f"-s{seed}" if seed else "")
    return Arm(tag + kw.pop("suffix", ""), "prune", c, compress_embeddings=emb, seed=seed, **kw)


def _smaller(k, seed=0, lrs=None) -> Arm:
    name = f"smaller-{k}layers" + (f"-s{seed}" if seed else "")
    return Arm(name, "smaller", num_layers=k, seed=seed, lrs=lrs)


def _pooled(k, seed=0, own_grid=True) -> Arm:
    """The smaller model a user would build: the first k layers, mean-pooled, a linear head, on its own grid
    (``own_grid=False``: the setup's grid, as the tiny sweep's)."""
    name = f"smaller-mean-{k}layers" + (f"-s{seed}" if seed else "")
    lrs = (POOLED_EMBEDDING_LRS if k == 0 else POOLED_LRS) if own_grid else None
    return Arm(name, "smaller", num_layers=k, pooling="mean", seed=seed, lrs=lrs)


POOLED_EMBEDDING_LRS = (1e-3, 3e-3, 1e-2)
"""The 0-layer mean-pooled model's grid: only embeddings and a fresh head train, which want a high rate (a
probe of this grid chose 3e-3 on validation, 76.4 % test)."""
POOLED_LRS = (1e-4, 3e-4, 1e-3, 3e-3)
"""The k-layer mean-pooled models' grid: from the rate pre-trained layers fine-tune at to the embeddings' rate,
so that the chosen rate is bracketed whichever part needs the most."""
LOWBIT_QAT_LRS = (1e-4, 3e-4)
"""QAT of the low-bit arms: dense's faster rate and pruning's (the 2:4 mask makes it a pruned model)."""


def _lowbit(bits, sparsity=None, qat=True, lrs=None, seed=0) -> Arm:
    """Low-bit integer targets at ~3.1 bits per weight: 2:4 x int4 (QAT) and its dense int3 controls."""
    name = (
        ("sparse24-" if sparsity else "")
        + f"int{bits}-"
        + ("qat" if qat else "rtn")
        + (f"-s{seed}" if seed else "")
    )
    return Arm(name, "lowbit", z_bits=bits, sparsity=sparsity, qat=qat, lrs=lrs, seed=seed)


DENSE_LRS = (5e-5, 1e-4)
"""The dense model's grid: the usual BERT fine-tuning rates."""
DENSE_QUICK_LR = 1e-4
"""The rate dense picks from :data:`DENSE_LRS` on validation (both seeds); ``--quick`` trains only that one."""
BASELINE_LR = 3e-4
"""Pruned and smaller models recover best at a few times the dense rate (3e-4 won every earlier grid)."""
BASELINE_LRS = (1e-4, 3e-4)
RECIPE_LR = 5e-5
"""hf-roast arms take the dense fine-tuning rate and the recipe of :mod:`hf_roast.optim`, no grid."""


ATTENTION_HARDER = (("attention", 2.0),)
"""BERT's attention modules (``...attention.self.query`` ... ``attention.output.dense``) at twice the compression
of the others (the MLP's ``intermediate.dense`` and ``output.dense``, and the pooler); z as at the arm's compression."""
MLP_HARDER = (("attention", 0.5),)
"""The other way round: attention at half the others' compression, so the MLP is compressed twice as hard."""


def sharing_for_bytes(bytes_ratio: float, bits: int) -> float:
    """The sharing compression (values) whose z, packed at ``bits`` with one fp32 scale per group, stores
    the fp32 target modules in ``bytes_ratio`` times fewer bytes: c = ratio * (bits/8 + 4/G) / 4."""
    return bytes_ratio * (bits / 8 + 4 / Z_GROUP_SIZE) / 4


def prune_for_bytes(bytes_ratio: float) -> float:
    """The pruning compression (values) whose kept fp32 values plus a one-bit-per-weight mask fit in
    ``bytes_ratio`` times fewer bytes than the dense fp32 targets: 4/c + 1/8 <= 4/ratio bytes per weight."""
    return 1.0 / (1.0 / bytes_ratio - 1.0 / 32.0)


def _bits(bytes_ratio, bits, **kw) -> Arm:
    """hf-roast x an integer z at ``bytes_ratio`` of the dense targets' bytes (QAT, then served packed)."""
    c = sharing_for_bytes(bytes_ratio, bits)
    return _recipe(c, z_bits=bits, suffix=f"-int{bits}-{bytes_ratio:g}xbytes", **kw)


def _rtn(bits, **kw) -> Arm:
    """Per-group round-to-nearest of the fine-tuned dense targets (about 32 / (bits + 32/G) x of bytes)."""
    return Arm(f"rtn-int{bits}", "rtn", 1.0, z_bits=bits, **kw)


SMARTDEAL_LRS = (1e-4, 3e-4, 1e-3)
"""SmartDeal's own grid: the baselines' rates and one above (its coefficients train at scale 1, not the weights')."""


def _smartdeal(bytes_ratio, seed=0, **kw) -> Arm:
    """SmartDeal (``harness/smartdeal.py``) in ``bytes_ratio`` times fewer bytes than the fp32 targets."""
    name = f"smartdeal-{bytes_ratio:g}xbytes" + (f"-s{seed}" if seed else "")
    return Arm(name, "smartdeal", float(bytes_ratio), seed=seed, **kw)


def _recipe(c, **kw) -> Arm:
    """hf-roast as a user runs it: output-calibrated init, the fine-tuning recipe at the dense rate."""
    from hf_roast.optim import DEFAULT_HEAD_LR_RATIO, DEFAULT_UNCOMPRESSED_LR_RATIO, DEFAULT_Z_LR_RATIO

    recipe = kw.pop("recipe", (DEFAULT_Z_LR_RATIO, DEFAULT_UNCOMPRESSED_LR_RATIO, DEFAULT_HEAD_LR_RATIO))
    kw.setdefault("calibrate", True)
    return _roast(c, recipe=recipe, lrs=kw.pop("lrs", (RECIPE_LR,)), **kw)


SLICEOUT_FINETUNE_EQUAL_TIME = 1.14
"""The fine-tune's schedule (epochs x this) at which SliceOut keep 0.75 in contiguous mode spends the time of one
epoch at keep 1: ``python -m benchmarks.sliceout_step --model minilm --batch-size 32 --context 64 --steps 20``
measured its step at 0.879 of keep 1's on the 2-core CPU machine (random mode: 0.990, so its equal-steps arm is
also its equal-time arm within 1 %)."""

RECOVERY_BUDGETS = (1_000_000, 250_000, 62_500)
"""Tokens of task-agnostic recovery (``hf_roast.recover`` on Wikipedia) before the fine-tune, 4x apart, the largest
first (it decides the target). About 175 MFLOP a token on MiniLM: an hour per million tokens on one CPU core."""


def _tokens(n: int) -> str:
    return f"{n / 1e6:g}M" if n >= 1_000_000 else f"{n / 1e3:g}k"


def _recovered(c, tokens: int, **kw) -> Arm:
    """hf-roast with the recipe, recovered on ``tokens`` of unlabelled text before the fine-tune."""
    return _recipe(c, recover_tokens=tokens, suffix=f"-rec{_tokens(tokens)}", **kw)


DISTILL_HIDDEN = 3.0
"""Weight of the hidden-state term of the ``-kdh`` arms (``DistillationTrainer(hidden_weight=...)``)."""


def classification_arms(mode: str) -> list[tuple[int, Arm]]:
    """(tier, arm): tier 1 decides the targets (docs/results.md, Targets); later tiers add the recipe's ablations and seeds.

    Every arm trains on the full Rotten Tomatoes training split for one epoch (``python -m benchmarks.evaluate``'s
    defaults). hf-roast arms use the calibrated init and the fine-tuning recipe at the dense rate. The
    dense model picks its rate from a grid on validation; the baselines train at the rate that won
    their grids before (``BASELINE_LR``; ``--full`` adds their grids) because each run costs minutes.
    """
    if mode == "tiny":
        return [
            (1, Arm("dense", "dense")),
            (1, _recipe(4, lrs=None)),
            (1, _prune(4)),
            (1, _pooled(0, own_grid=False)),
            (1, _pooled(1, own_grid=False)),
            (2, _roast(4, single_lr=True, suffix="-onelr")),
            (2, _recipe(4, calibrate=False, lrs=None, suffix="-lsinit")),
            (2, _recipe(4, seed=1, lrs=None)),
            (2, _roast(8, emb=True, single_lr=True)),
            (2, _recipe(8, mapper="hashednet", lrs=None)),
            (3, _recipe(4, distill=True, lrs=None, suffix="-kd")),
            # TinyBERT-style: also match every layer's hidden states (the weight puts the term near the task
            # loss at the calibrated 4x init: hidden MSE 0.18 there)
            (3, _recipe(4, distill=True, distill_hidden=DISTILL_HIDDEN, lrs=None, suffix="-kdh")),
            (3, _prune(4, schedule=2.0, suffix="-sched2")),
            (3, _bits(16, 8, lrs=None)),
            (3, _bits(16, 4, lrs=None)),
            (3, _rtn(4, lrs=(BASELINE_LR,))),
            (3, _smartdeal(8)),
            (3, _lowbit(4, sparsity="2:4")),
            (3, _lowbit(3)),
            (3, _lowbit(3, qat=False)),
            (3, _recipe(4, compression_pattern=ATTENTION_HARDER, lrs=None, suffix="-attn2x")),
            (3, _recovered(4, 2000, lrs=None)),
        ]
    one = (BASELINE_LR,)
    if mode == "quick":
        # at most 40 minutes on 2 cores with the scratch subset: dense (the teacher), hf-roast at 4x with distillation
        # against pruning, and at 16x (within 1/8 of the bytes) against pruning
        return [
            (1, Arm("dense", "dense", lrs=(DENSE_QUICK_LR,))),
            (1, _recipe(4, distill=True, distill_hidden=DISTILL_HIDDEN, suffix="-kdh")),
            (1, _prune(4, lrs=one)),
            (1, _recipe(16)),
            (1, _prune(16, lrs=one)),
        ]
    arms = [(1, Arm("dense", "dense", lrs=DENSE_LRS)), (1, _recipe(4)), (1, _prune(4, lrs=one))]
    # the smaller models a user would build (mean-pooled; the [CLS]-pooled 0-layer model could only learn the
    # majority class), each on its own grid
    arms += [(1, _pooled(k)) for k in (0, 1, 2)]
    # second seeds at the rate each first seed's grid chose: within a point of hf-roast arms (0 layers: 8x and 32x;
    # 1 layer: 4x)
    arms += [(2, replace(_pooled(k, seed=1), lrs=(lr,))) for k, lr in ((0, 3e-3), (1, 1e-3))]
    arms += [(1, _recipe(16)), (1, _prune(16, lrs=one))]
    # what the calibrated init brings over plain least squares, at the same recipe
    arms += [(1, _recipe(4, calibrate=False, suffix="-lsinit"))]
    arms += [(1, _recipe(8)), (1, _prune(8, lrs=one))]
    arms += [(1, _recipe(32)), (1, _prune(32, lrs=one))]
    # the old way: plain least squares and one learning rate for every parameter
    arms += [(2, _roast(4, single_lr=True, lrs=(1e-4,), suffix="-onelr"))]
    arms += [(2, _recipe(16, calibrate=False, suffix="-lsinit"))]
    # a second seed where hf-roast and pruning are closest (8x)
    arms += [(2, _recipe(8, seed=1)), (2, _prune(8, seed=1, lrs=one))]
    # module-balanced gradients on z (it decides from-scratch training): does fine-tuning want it too?
    arms += [(2, _recipe(c, module_balance=True, suffix="-bal")) for c in (4, 16)]
    # recovery by distillation from the dense fine-tuned model, logits and every layer's hidden states: it decides
    # the 4x target (two seeds); pruning gets the same distillation
    kdh = {"distill": True, "distill_hidden": DISTILL_HIDDEN, "suffix": "-kdh"}
    arms += [(2, _recipe(4, **kdh)), (2, _recipe(4, seed=1, **kdh)), (2, _prune(4, lrs=one, **kdh))]
    arms += [(2, _recipe(c, **kdh)) for c in (8, 16)]
    # ~10x fewer target bytes without sharing (3.125 bits per weight): 2:4 magnitude sparsity x int4 (QAT),
    # and dense int3 at the same bytes, trained (QAT) and rounded after dense fine-tuning
    arms += [(2, _lowbit(4, sparsity="2:4", lrs=LOWBIT_QAT_LRS)), (2, _lowbit(3, lrs=LOWBIT_QAT_LRS))]
    arms += [(2, _lowbit(3, qat=False, lrs=DENSE_LRS))]
    # second seeds where the low-bit arms and SmartDeal came within a point of each other (80.2-80.5 %) or of
    # hf-roast x int4 (SmartDeal at 16x of bytes, 78.6 %), at the rates their grids chose
    arms += [(3, _lowbit(4, sparsity="2:4", lrs=(3e-4,), seed=1)), (3, _lowbit(3, lrs=(1e-4,), seed=1))]
    # task-agnostic recovery before the fine-tune (issue 27): what a token budget of distillation from the dense
    # model on Wikipedia buys at 16x and 8x, against the same arm without it and the mean-pooled embeddings
    arms += [(2, _recovered(c, t)) for c in (16, 8) for t in RECOVERY_BUDGETS]
    # SliceOut (issue 26) at keep 0.75 against roast-stable-16x: the same steps (random mode, whose step costs
    # about what keep 1's does), and the same time (contiguous mode, a few more steps)
    arms += [(3, _recipe(16, sliceout_keep=0.75, suffix="-keep0.75"))]
    equal_time = {"sliceout_mode": "contiguous", "schedule": SLICEOUT_FINETUNE_EQUAL_TIME}
    arms += [(3, _recipe(16, sliceout_keep=0.75, suffix="-keep0.75-contiguous-equaltime", **equal_time))]
    # a heavier hidden-state term (how far the weight of DISTILL_HIDDEN is from its best)
    for weight in (10, 30):
        heavier = {**kdh, "distill_hidden": float(weight), "suffix": f"-kdh{weight}"}
        arms += [(3, _recipe(4, **heavier)), (3, _recipe(4, seed=1, **heavier))]
    # more seeds where the 4x target is decided: dense (at the rate its grid chose) and the best distillation arm
    arms += [(3, Arm("dense-s1", "dense", seed=1, lrs=(DENSE_LRS[1],)))]
    arms += [(3, _recipe(4, seed=2, **{**kdh, "distill_hidden": 10.0, "suffix": "-kdh10"}))]
    if mode == "full":
        more = [_prune(c, lrs=BASELINE_LRS, suffix="-grid") for c in (4, 16)]
        more += [_recipe(c, seed=1) for c in (4, 16, 32)] + [_prune(c, seed=1, lrs=one) for c in (4, 16, 32)]
        more += [_recipe(c, mapper=m) for m in ("roast", "hashednet") for c in (8, 32)]
        more += [_recipe(c, distill=True, suffix="-kd") for c in (4, 16)]
        more += [_recipe(c, schedule=3.0, suffix="-sched3") for c in (4, 16)]
        more += [Arm("dense-sched3", "dense", schedule=3.0, lrs=DENSE_LRS)]
        more += [_recipe(2), _prune(2, lrs=one), _pooled(3)]
        # the [CLS]-pooled truncations measured before the mean-pooled ones replaced them
        more += [_smaller(k, lrs=one) for k in (0, 1, 2)]
        more += [_recipe(c, emb=True) for c in (10, 50)]
        # sharing x quantisation at equal bytes of the target modules (16x and 64x fewer than dense fp32):
        # hf-roast x int8 / x int4 (QAT) vs fp32 hf-roast vs pruning at the same bytes, and round-to-nearest
        # int8 / int4 of the dense targets (which cannot go below ~3.9x / ~7.5x of bytes on their own)
        more += [_bits(r, b) for r in (16, 64) for b in (8, 4)]
        # the 1/8-of-dense-bytes budget of the accuracy targets, met by each method's own layout:
        # hf-roast x int8 (2.06x sharing) and pruning with its mask (10.67x values)
        more += [_bits(8, 8), _prune(prune_for_bytes(8), lrs=one, suffix="-8xbytes")]
        # second seeds of the best sharing x bits arm at each of the quantisation targets' budgets
        more += [_bits(16, 4, seed=1), _bits(64, 8, seed=1)]
        more += [_recipe(64), _prune(64, lrs=one)]
        more += [_rtn(b, lrs=DENSE_LRS) for b in (8, 4)]
        # SmartDeal (issue 26, seed 003) at the 8x and 16x byte budgets, on its own grid
        more += [_smartdeal(r, lrs=SMARTDEAL_LRS) for r in (8, 16)]
        more += [_smartdeal(r, seed=1, lrs=(1e-3,)) for r in (8, 16)]
        # per-module budgets (RoastConfig.compression_pattern) at the very z of roast-stable-16x: attention
        # compressed twice as hard as the MLP (and pooler), then the other way round
        more += [_recipe(16, compression_pattern=ATTENTION_HARDER, suffix="-attn2x")]
        more += [_recipe(16, compression_pattern=MLP_HARDER, suffix="-mlp2x")]
        arms += [(3, a) for a in more]
    return arms


SCRATCH_COMPRESSIONS = (4, 8, 16, 32)
SCRATCH_LRS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
"""Each method's grid (a factor of about 3 apart): wide enough that no method's best rate sits at an edge."""
SCRATCH_BUDGETS = (300, 1200)
"""Training steps of the two token budgets (4x apart)."""
SCRATCH_REST_LR = 1e-2
"""The split-rate protocol's fixed rate of everything outside the projections (embeddings, norms, LM head):
the rate pruning's one-rate grid chose, at which dense's projections already break (README, "From scratch")."""


SCRATCH_QUICK_RATES = {"roast": 1e-3, "narrower": 1e-3, "prune": 3e-3}
"""The projections' rates the split-rate grids chose at 4x, hf-roast with ``module_balance`` (``--quick`` runs
these three 4x arms at them instead of searching)."""


SLICEOUT_EQUAL_TIME_STEPS = 1216
"""Steps of keep 0.75 (random) that cost what 1,200 steps of keep 1 cost: 1,200 / the step-time ratio that
``python -m benchmarks.sliceout_step --steps 60`` measured on the 2-core CPU machine (0.987; docs/results.md,
SliceOut). At the 1.25x the target asks for it would be 1,500."""


def _scratch(method: str, c: float, steps: int, mapper="stable", lrs=None, suffix="", **kw) -> Arm:
    tags = {"roast": f"roast-{mapper}", "narrower": "narrower", "prune": "prune-init", "dense": "dense"}
    name = (
        f"dense{suffix}-{steps}steps" if method == "dense" else f"{tags[method]}-{c:g}x{suffix}-{steps}steps"
    )
    return Arm(name, method, float(c), mapper=mapper, steps=steps, lrs=lrs, **kw)


def scratch_arms(mode: str) -> list[tuple[int, Arm]]:
    """From-scratch LM arms. The learning-rate grids run on the short budget: once per method at 8x (or dense)
    in the one-rate protocol; at every compression in the split-rate protocol (hf-roast without
    ``module_balance``: at 4x and 8x). Every other arm takes its rate from its method's grid at its compression
    (else at 8x): the chosen rate on the same budget, the grid's two best on the long one (``python -m benchmarks.evaluate``
    fills it in, see ``benchmarks/evaluate.py``)."""
    if mode == "tiny":
        arms = [(1, _scratch(m, 4, 8, lrs=(3e-3,))) for m in ("dense", "roast", "narrower", "prune")]
        arms += [(2, _scratch("roast", 4, 8, lrs=(3e-3,), scaler="none", tile=(8, 8), suffix="-v"))]
        arms += [(2, _scratch("roast", 4, 8, lrs=(3e-3,), tile=(8, 8), sliceout_keep=0.5, suffix="-keep0.5"))]
        return arms + [
            (2, _scratch(m, 4, 8, lrs=(1e-3,), rest_lr=3e-3, suffix="-split")) for m in ("roast", "prune")
        ]
    short, long = SCRATCH_BUDGETS
    methods = ("roast", "narrower", "prune")
    split = {"rest_lr": SCRATCH_REST_LR, "suffix": "-split"}
    balanced = {"rest_lr": SCRATCH_REST_LR, "suffix": "-bal-split", "module_balance": True}
    if mode == "quick":
        # the 4x comparison of the split-rate protocol, at the rates its 4x grids chose (about 6 min)
        return [
            (1, _scratch(m, 4, short, lrs=(lr,), **(balanced if m == "roast" else split)))
            for m, lr in SCRATCH_QUICK_RATES.items()
        ]
    arms = [(1, _scratch("dense", 1, short, lrs=SCRATCH_LRS))]
    arms += [(1, _scratch(m, 8, short, lrs=SCRATCH_LRS)) for m in methods]
    arms += [(1, _scratch(m, c, short)) for c in (4, 16, 32) for m in methods]
    # does sharing want a higher rate on z than on the rest (each slot's gradient sums c weights')?
    arms += [(1, _scratch("roast", 8, short, recipe=(3.0, 1.0, 1.0), suffix="-zlr3"))]
    arms += [(1, _scratch("roast", 8, short, recipe=(0.3, 1.0, 1.0), suffix="-zlr0.3"))]
    # the split-rate protocol: the rest at SCRATCH_REST_LR in every arm, each method's grid on its projections
    arms += [(1, _scratch("dense", 1, short, lrs=SCRATCH_LRS, **split))]
    arms += [(1, _scratch(m, 8, short, lrs=SCRATCH_LRS, **split)) for m in methods]
    # 4x gets its own grid in this protocol (the rate that suits 8x is not the one that suits 4x: fewer weights
    # share a slot, so a step of z moves each weight more coherently)
    arms += [(1, _scratch(m, 4, short, lrs=SCRATCH_LRS, **split)) for m in methods]
    arms += [(1, _scratch("roast", c, short, **split)) for c in (16, 32)]
    # the baselines get grids at 16x and 32x too (pruning's best rate grows with sparsity: 3e-3 at 4x, 1e-2 at
    # 8x); hf-roast's arms there are the module-balanced ones below, with their own grids
    arms += [(1, _scratch(m, c, short, lrs=SCRATCH_LRS, **split)) for c in (16, 32) for m in methods[1:]]
    arms += [(2, _scratch("dense", 1, long))] + [(2, _scratch(m, 8, long)) for m in methods]
    arms += [(2, _scratch("dense", 1, long, **split))] + [(2, _scratch(m, 8, long, **split)) for m in methods]
    # does the gap close with training at a higher compression too?
    arms += [(2, _scratch(m, 16, long, **split)) for m in methods]
    # module-balanced gradients on z (RoastConfig.module_balance), in the split-rate protocol: its own grids
    arms += [(1, _scratch("roast", c, short, lrs=SCRATCH_LRS, **balanced)) for c in (8, 4)]
    arms += [(1, _scratch("roast", c, short, lrs=SCRATCH_LRS, **balanced)) for c in (16, 32)]
    arms += [(2, _scratch("roast", c, long, **balanced)) for c in (8, 16)]
    # the long budget at the ends of the range too (a 1,200-step arm searches the two best rates of its
    # compression's grid)
    arms += [(2, _scratch("roast", c, long, **balanced)) for c in (32, 4)]
    arms += [(2, _scratch(m, c, long, **split)) for c in (32, 4) for m in methods[1:]]
    # a second init seed where a gap to a baseline was within 0.03 before the 16x/32x grids (4x: the narrower
    # model; 32x: pruning)
    for c in (32, 4):
        arms += [(2, _scratch("roast", c, short, seed=1, **{**balanced, "suffix": "-bal-split-seed1"}))]
        arms += [
            (2, _scratch(m, c, short, seed=1, **{**split, "suffix": "-split-seed1"})) for m in methods[1:]
        ]
    # the papers' other mappers, in the same protocol
    arms += [
        (2, _scratch("roast", c, short, mapper=mp, **balanced))
        for c in (8, 32, 4, 16)
        for mp in ("roast", "hashednet")
    ]
    # SliceOut at keep 0.75 (RoastConfig.sliceout_keep) against roast-stable-16x-bal-split-1200steps, at that
    # arm's rate: the same steps, and the steps its training time buys at the step-time ratio that
    # ``python -m benchmarks.sliceout_step`` measures (SLICEOUT_EQUAL_TIME_STEPS)
    keep = {**balanced, "lrs": (3e-3,), "sliceout_keep": 0.75}
    for steps in (long, SLICEOUT_EQUAL_TIME_STEPS):
        arms += [(3, _scratch("roast", 16, steps, **{**keep, "suffix": "-bal-split-keep0.75"}))]
    # what the papers vary: the mapper, the gradient scaler, the tile
    arms += [(2, _scratch("roast", 8, short, mapper=mp)) for mp in ("roast", "hashednet")]
    arms += [(2, _scratch("roast", 8, short, scaler=sc, suffix=f"-{sc}scaler")) for sc in ("v1", "none")]
    arms += [(2, _scratch("roast", 8, short, tile=(8, 8), suffix="-tile8"))]
    if mode == "full":
        arms += [(3, _scratch(m, c, long)) for c in (4, 16, 32) for m in methods]
        arms += [
            (3, _scratch("roast", c, short, mapper=mp)) for mp in ("roast", "hashednet") for c in (4, 16, 32)
        ]
    return arms


HIGH_COMPRESSIONS = (1024, 256, 64)
"""The from-scratch compressions where the STABLE-RPS paper says sharing pulls ahead; 1024x and 256x decide."""
HIGH_BUDGETS = (1200, 4800)
"""The grids' budget and the long one, at which dense should have levelled off on validation (its curve)."""
HIGH_CURVE_EVERY = 400
"""Steps between two points of every arm's validation curve."""
HIGH_GRIDS = {
    "roast": (3e-3, 1e-3, 1e-2),
    "prune": (3e-2, 1e-2, 1e-1, 3e-1),
    "narrower": (1e-2, 3e-2, 3e-3),
}
"""Each method's projection rates (rest at SCRATCH_REST_LR): first what its grids chose at 16x and 32x (hf-roast
with module_balance 3e-3, pruning 3e-2, the narrower model 1e-2), then one step either side; a breadth-first
sweep (``--rates-per-pass 1``) trains them in this order. Pruning's grid reaches 3e-1 because at 256x and 1024x
its best rate was 1e-1, the edge of the first grid: a baseline is only fair once its rate is bracketed."""
HIGH_DENSE_LRS = (3e-4, 1e-3)
"""Dense's two best projection rates of its 1,200-step split-rate grid (``scratch/dense-split-1200steps``)."""


def high_tile(c: float) -> tuple[int, int]:
    """The mapping tile at a high compression: z holds ~3k values at 1024x, about three 32x32 tiles."""
    return (8, 8) if c >= 256 else (16, 16)


def _high(method: str, c: float, steps: int, seed: int = 0, lrs=None, grid_from=None, **kw) -> Arm:
    tile = high_tile(c)
    tags = {
        ("roast", "magnitude"): f"roast-stable-{c:g}x-t{tile[0]}-bal",
        ("prune", "magnitude"): f"prune-magnitude-{c:g}x",
        ("prune", "random"): f"prune-random-{c:g}x",
        ("narrower", "magnitude"): f"narrower-{c:g}x",
        ("dense", "magnitude"): "dense",
        ("floor", "magnitude"): "floor",
    }
    name = tags[method, kw.get("prune_by", "magnitude")] + (f"-seed{seed}" if seed else "") + f"-{steps}steps"
    extra = {"module_balance": True} if method == "roast" else {}
    compression = float(c) if method in ("roast", "prune", "narrower") else 1.0
    return Arm(
        name, method, compression, steps=steps, seed=seed, lrs=lrs, rest_lr=SCRATCH_REST_LR, tile=tile,
        grid_from=grid_from, **extra, **kw,
    )  # fmt: skip


def scratch_high_arms(mode: str) -> list[tuple[int, Arm]]:
    """From scratch at 64-1024x (``python -m benchmarks.evaluate --experiments scratch-high``): hf-roast with
    ``module_balance`` and small tiles against pruning at init (magnitude and random), the narrower model and
    the floor (no projection weights at all), each on its own rate grid at 1,200 steps, then the grid's two best
    rates at 4,800 steps, then a second init seed at the long budget's chosen rate. Every arm records its
    validation curve. Tiers: what decides first (1024x, 256x), 64x last."""
    methods = [("roast", {}), ("prune", {}), ("prune", {"prune_by": "random"}), ("narrower", {})]
    if mode == "tiny":
        arms = [(1, _high(m, 64, 8, lrs=HIGH_GRIDS[m][:2], **kw)) for m, kw in methods]
        arms += [(1, _high("floor", 1, 8, lrs=(SCRATCH_REST_LR,)))]
        arms += [(2, _high(m, 64, 16, grid_from=a.name, **kw)) for (m, kw), (_, a) in zip(methods, arms)]
        return arms
    short, long = HIGH_BUDGETS
    arms = []
    for tier, c in ((1, 1024), (1, 256), (4, 64)):
        grids = [_high(m, c, short, lrs=HIGH_GRIDS[m], **kw) for m, kw in methods]
        arms += [(tier, a) for a in grids]
        longs = [_high(m, c, long, grid_from=g.name, **kw) for (m, kw), g in zip(methods, grids)]
        arms += [(tier + 1, a) for a in longs]
        if c != 64:
            arms += [
                (3, _high(m, c, long, seed=1, grid_from=a.name, **kw)) for (m, kw), a in zip(methods, longs)
            ]
    arms += [
        (1, _high("floor", 1, short, lrs=(SCRATCH_REST_LR,))),
        (2, _high("floor", 1, long, lrs=(SCRATCH_REST_LR,))),
    ]
    arms += [(1, _high("dense", 1, long, lrs=HIGH_DENSE_LRS))]
    arms += [(3, _high("dense", 1, long, seed=1, grid_from=_high("dense", 1, long).name))]
    return arms


def _lm_recipe(c, **kw) -> Arm:
    """An LM arm as a user would run it: calibrated init, and the recipe at the LM's dense rate (the setup's)."""
    return _recipe(c, lrs=None, **kw)


DECODER_RECOVERY_LRS = (1e-4, 3e-4, 1e-3)
"""The rates a decoder's recovery is tried at (the smallest budget, 4x; the larger budgets and 16x take its choice,
decided by the distillation loss of the run's last steps): the LM's dense rate and two above it."""
DECODER_RECOVERY_BUDGETS = (250_000, 1_000_000, 4_000_000)
"""Tokens of distillation from the dense SmolLM2 on passages of the training articles, 4x apart. About 1.1 GFLOP a
token with the teacher: hours per million tokens on one CPU core, seconds on a GPU."""


def _lm_recovered(method: str, c: float, tokens: int, lrs=None, grid_from=None) -> Arm:
    """A decoder compressed ``c`` times, then distilled from its dense self on ``tokens`` of text (pruning: the
    same loop, budget and rates); hf-roast as a user runs it (calibrated init, the recipe's groups)."""
    suffix = f"-rec{_tokens(tokens)}"
    if method == "roast":
        return _recipe(c, recover_tokens=tokens, suffix="-cal" + suffix, lrs=lrs, grid_from=grid_from)
    return _prune(c, recover_tokens=tokens, suffix=suffix, lrs=lrs, grid_from=grid_from)


def lm_recovered_arms(budgets=DECODER_RECOVERY_BUDGETS, lrs=DECODER_RECOVERY_LRS) -> list[tuple[int, Arm]]:
    """The grid at the smallest budget and 4x first, then every budget in increasing order (a sweep cut short
    still has whole budgets)."""
    grids = {m: _lm_recovered(m, 4, budgets[0], lrs=lrs) for m in ("roast", "prune")}
    arms = [(5, a) for a in grids.values()]
    for tier, tokens in enumerate(budgets):
        for c in (4, 16):
            for method, grid in grids.items():
                if (c, tokens) != (4, budgets[0]):
                    arms.append((5 + tier, _lm_recovered(method, c, tokens, grid_from=grid.name)))
    return arms


def lm_arms(mode: str, recovery_steps: int) -> list[tuple[int, Arm]]:
    steps = recovery_steps
    if mode == "tiny":
        arms = [Arm("dense", "dense"), _roast(1), _roast(4), _prune(4)]
        arms = [(1, a) for a in arms] + [(3, _roast(4, recovery_steps=steps, suffix="-rec"))]
        arms += [(3, _lm_recipe(4, recovery_steps=steps, suffix="-cal-rec"))]
        return arms + lm_recovered_arms(budgets=(256, 512), lrs=(1e-3, 3e-3))
    arms = [(1, a) for a in (Arm("dense", "dense"), _roast(1), _roast(4), _prune(4), _roast(8), _prune(8))]
    arms += [(2, _roast(2)), (2, _prune(2)), (2, _roast(4, norm_init=True, suffix="-norminit"))]
    arms += [(3, _roast(c, recovery_steps=steps, suffix=f"-rec{steps}")) for c in (4, 8)]
    arms += [(3, _prune(c, recovery_steps=steps, suffix=f"-rec{steps}")) for c in (4, 8)]
    # the user's default: calibrated init, then recovery with the fine-tuning recipe at the dense rate
    arms += [(3, _lm_recipe(c, suffix="-cal")) for c in (4, 8)]
    arms += [(3, _lm_recipe(c, recovery_steps=steps, suffix=f"-cal-rec{steps}")) for c in (4, 8)]
    # the recovered arms' baselines without any training: round-to-nearest of the dense weights (their starting
    # points, the compressed init before recovery, are recorded in their own results)
    arms += [(3, _rtn(8)), (3, _rtn(4))]
    if mode == "full":
        arms += [(4, _roast(c, mapper=m)) for m in ("roast", "hashednet") for c in (4, 8)]
        arms += lm_recovered_arms()  # hours per arm on a CPU: a GPU's sweep (README "Recovery")
    return arms


def run_order(experiments: list[str], mode: str, recovery_steps: int) -> list[tuple[str, Arm]]:
    """All arms, tier by tier, experiments in the given order within a tier: partial sweeps stay useful."""
    tiered = []
    for order, experiment in enumerate(experiments):
        if experiment == "classification":
            arms = classification_arms(mode)
        elif experiment == "scratch":
            arms = scratch_arms(mode)
        elif experiment == "scratch-high":
            arms = scratch_high_arms(mode)
        else:
            arms = lm_arms(mode, recovery_steps)
        tiered += [(tier, order, i, experiment, arm) for i, (tier, arm) in enumerate(arms)]
    return [(experiment, arm) for *_, experiment, arm in sorted(tiered, key=lambda t: t[:3])]
