"""The named experiments and their arms, in the order they run (most important first).

``default`` is what fits in about an hour on 2 CPU cores; ``full`` adds the remaining arms of the
issue; ``tiny`` runs every kind of arm on tiny synthetic sources for the smoke tests.
"""

from __future__ import annotations

from .arms import Arm

EXPERIMENTS = ("classification", "lm")


def _roast(c, mapper="stable", emb=False, seed=0, **kw) -> Arm:
    tag = f"roast-{mapper}{'-emb' if emb else ''}-{c:g}x" + (f"-s{seed}" if seed else "")
    return Arm(
        tag + kw.pop("suffix", ""), "roast", c, mapper=mapper, compress_embeddings=emb, seed=seed, **kw
    )


def _prune(c, emb=False, seed=0, **kw) -> Arm:
    tag = f"prune{'-emb' if emb else ''}-{c:g}x" + (f"-s{seed}" if seed else "")
    return Arm(tag + kw.pop("suffix", ""), "prune", c, compress_embeddings=emb, seed=seed, **kw)


def _smaller(k, seed=0) -> Arm:
    return Arm(f"smaller-{k}layers" + (f"-s{seed}" if seed else ""), "smaller", num_layers=k, seed=seed)


def classification_arms(mode: str) -> list[tuple[int, Arm]]:
    """(tier, arm): tier 1 decides the issue's targets; later tiers add seeds, variants and mappers."""
    if mode == "tiny":
        return [
            (1, Arm("dense", "dense")),
            (1, _roast(4)),
            (1, _prune(4)),
            (1, _smaller(1)),
            (2, _roast(4, seed=1)),
            (2, _roast(4, norm_init=True, suffix="-norminit")),
            (2, _roast(8, emb=True)),
            (2, _roast(8, mapper="hashednet")),
            (3, _roast(4, distill=True, suffix="-kd")),
            (3, _roast(4, schedule=3.0, suffix="-sched3")),
        ]
    # default sweep (37.5 min measured on 2 cores): every arm that decides the targets, with 2 seeds
    # at 4x and 16x for each method, and the whole stable-mapper frontier from 2x to 32x
    arms = [(1, Arm("dense", "dense"))]
    arms += [(1, a) for a in (_roast(4), _prune(4), _roast(16), _prune(16), _smaller(1), _smaller(0))]
    arms += [(1, a) for a in (_roast(8), _prune(8), _roast(32), _prune(32))]
    arms += [(2, a) for a in (_roast(4, seed=1), _prune(4, seed=1), _roast(16, seed=1), _prune(16, seed=1))]
    arms += [(2, a) for a in (_smaller(1, seed=1), _smaller(0, seed=1))]
    arms += [(2, a) for a in (_roast(2), _prune(2), _smaller(2))]
    if mode == "full":
        # --full: the recovery recipes (distillation, a 3x schedule) at the headline budgets 4x and 16x,
        # the global-vs-local mapper comparison, embeddings, and the investigative init variant
        more = [_roast(c, mapper=m) for m in ("roast", "hashednet") for c in (8, 32)]
        for c in (4, 16):
            more += [_roast(c, distill=True, suffix="-kd"), _prune(c, distill=True, suffix="-kd")]
            more += [_roast(c, schedule=3.0, suffix="-sched3"), _prune(c, schedule=3.0, suffix="-sched3")]
        more += [_roast(c, emb=True) for c in (10, 50)]
        more += [_roast(c, norm_init=True, suffix="-norminit") for c in (4, 16)]
        more += [_smaller(3)]
        # does a longer schedule keep closing the gap at 4x? (3x closed it from 8.35 to 5.18 points)
        for seed in (0, 1):
            more += [_roast(4, seed=seed, schedule=6.0, suffix="-sched6")]
            more += [_prune(4, seed=seed, schedule=6.0, suffix="-sched6")]
        # the dense reference with the same longer schedules, so that longer-trained arms are compared fairly
        more += [Arm(f"dense-sched{k}", "dense", schedule=float(k)) for k in (3, 6)]
        arms += [(3, a) for a in more]
    return arms


def lm_arms(mode: str, recovery_steps: int) -> list[tuple[int, Arm]]:
    steps = recovery_steps
    if mode == "tiny":
        arms = [Arm("dense", "dense"), _roast(1), _roast(4), _prune(4)]
        return [(1, a) for a in arms] + [(3, _roast(4, recovery_steps=steps, suffix="-rec"))]
    arms = [(1, a) for a in (Arm("dense", "dense"), _roast(1), _roast(4), _prune(4), _roast(8), _prune(8))]
    arms += [(2, _roast(2)), (2, _prune(2)), (2, _roast(4, norm_init=True, suffix="-norminit"))]
    arms += [(3, _roast(c, recovery_steps=steps, suffix=f"-rec{steps}")) for c in (4, 8)]
    arms += [(3, _prune(c, recovery_steps=steps, suffix=f"-rec{steps}")) for c in (4, 8)]
    if mode == "full":
        arms += [(4, _roast(c, mapper=m)) for m in ("roast", "hashednet") for c in (4, 8)]
    return arms


def run_order(experiments: list[str], mode: str, recovery_steps: int) -> list[tuple[str, Arm]]:
    """All arms, tier by tier, experiments in the given order within a tier: partial sweeps stay useful."""
    tiered = []
    for order, experiment in enumerate(experiments):
        arms = classification_arms(mode) if experiment == "classification" else lm_arms(mode, recovery_steps)
        tiered += [(tier, order, i, experiment, arm) for i, (tier, arm) in enumerate(arms)]
    return [(experiment, arm) for *_, experiment, arm in sorted(tiered, key=lambda t: t[:3])]
