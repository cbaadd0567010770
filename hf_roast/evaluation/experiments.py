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
    arms = [(1, Arm("dense", "dense"))]
    arms += [(1, a) for a in (_roast(4), _prune(4), _roast(4, norm_init=True, suffix="-norminit"))]
    arms += [(1, a) for a in (_roast(16), _prune(16), _roast(8), _prune(8), _smaller(1), _smaller(0))]
    # the headline arms (4x: the budget where any method keeps signal in this short recipe)
    arms += [(2, _roast(4, schedule=3.0, suffix="-sched3")), (2, _prune(4, schedule=3.0, suffix="-sched3"))]
    arms += [(2, a) for a in (_roast(4, seed=1), _prune(4, seed=1))]
    arms += [(2, _roast(4, distill=True, suffix="-kd")), (2, _prune(4, distill=True, suffix="-kd"))]
    arms += [(2, a) for a in (_roast(16, seed=1), _prune(16, seed=1))]
    arms += [(3, a) for a in (_roast(32), _prune(32), _roast(2), _prune(2), _smaller(2))]
    arms += [(3, _roast(16, norm_init=True, suffix="-norminit"))]
    arms += [(3, _roast(c, emb=True)) for c in (10, 50)]
    arms += [(3, _roast(c, mapper=m)) for m in ("roast", "hashednet") for c in (8, 32)]
    arms += [(3, _roast(16, distill=True, suffix="-kd")), (3, _prune(16, distill=True, suffix="-kd"))]
    arms += [(3, _roast(16, schedule=3.0, suffix="-sched3")), (3, _prune(16, schedule=3.0, suffix="-sched3"))]
    if mode == "full":
        more = [_smaller(3)]
        more += [_roast(c, emb=True) for c in (2, 4, 8, 16, 32)] + [_prune(c, emb=True) for c in (10, 50)]
        more += [
            _smaller(1, seed=1),
            _roast(8, seed=1),
            _prune(8, seed=1),
            _roast(32, seed=1),
            _prune(32, seed=1),
        ]
        more += [_roast(8, distill=True, suffix="-kd"), _prune(8, distill=True, suffix="-kd")]
        more += [Arm("smaller-1layers-kd", "smaller", num_layers=1, distill=True)]
        more += [_roast(8, schedule=3.0, suffix="-sched3"), _prune(8, schedule=3.0, suffix="-sched3")]
        more += [_roast(16, distill=True, schedule=3.0, suffix="-kd-sched3")]
        more += [_prune(16, distill=True, schedule=3.0, suffix="-kd-sched3")]
        arms += [(4, a) for a in more]
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
