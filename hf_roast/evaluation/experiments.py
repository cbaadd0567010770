"""The named experiments and their arms, in the order they run (most important first).

``default`` is what fits in about an hour on 2 CPU cores; ``full`` adds the remaining arms of the
issue; ``tiny`` runs every kind of arm on tiny synthetic sources for the smoke tests.
"""

from __future__ import annotations

from .arms import Arm

EXPERIMENTS = ("classification", "lm")


def _roast(c, mapper="stable", emb=False, seed=0, **kw) -> Arm:
    tag = f"roast-{mapper}{'-emb' if emb else ''}-{c:g}x" + (f"-s{seed}" if seed else "")
    return Arm(tag + kw.pop("suffix", ""), "roast", c, mapper=mapper, compress_embeddings=emb, seed=seed, **kw)


def _prune(c, emb=False, seed=0, **kw) -> Arm:
    tag = f"prune{'-emb' if emb else ''}-{c:g}x" + (f"-s{seed}" if seed else "")
    return Arm(tag + kw.pop("suffix", ""), "prune", c, compress_embeddings=emb, seed=seed, **kw)


def _smaller(k, seed=0) -> Arm:
    return Arm(f"smaller-{k}layers" + (f"-s{seed}" if seed else ""), "smaller", num_layers=k, seed=seed)


def classification_arms(mode: str) -> list[Arm]:
    if mode == "tiny":
        return [
            Arm("dense", "dense"),
            _roast(4),
            _roast(4, seed=1),
            _roast(8, emb=True),
            _roast(8, mapper="hashednet"),
            _prune(4),
            _smaller(1),
            _roast(4, distill=True, suffix="-kd"),
            _roast(4, schedule=3.0, suffix="-sched3"),
        ]
    arms = [Arm("dense", "dense")]
    arms += [_roast(c) for c in (4, 16, 8, 32, 2)]
    arms += [_prune(c) for c in (4, 16, 8, 32, 2)]
    arms += [_smaller(k) for k in (1, 0, 2, 3)]
    arms += [_roast(4, seed=1), _roast(16, seed=1), _prune(4, seed=1), _prune(16, seed=1)]
    arms += [_roast(16, distill=True, suffix="-kd"), _prune(16, distill=True, suffix="-kd")]
    arms += [_roast(16, schedule=3.0, suffix="-sched3"), _prune(16, schedule=3.0, suffix="-sched3")]
    arms += [_roast(c, emb=True) for c in (10, 50)]
    arms += [_roast(c, mapper=m) for m in ("roast", "hashednet") for c in (8, 32)]
    if mode == "full":
        arms += [_roast(c, emb=True) for c in (2, 4, 8, 16, 32)]
        arms += [_prune(c, emb=True) for c in (10, 50)]
        arms += [_smaller(1, seed=1), _roast(8, seed=1), _prune(8, seed=1), _roast(32, seed=1), _prune(32, seed=1)]
        arms += [_roast(8, distill=True, suffix="-kd"), _prune(8, distill=True, suffix="-kd")]
        arms += [Arm("smaller-1layers-kd", "smaller", num_layers=1, distill=True)]
        arms += [_roast(8, schedule=3.0, suffix="-sched3"), _prune(8, schedule=3.0, suffix="-sched3")]
        arms += [_roast(16, distill=True, schedule=3.0, suffix="-kd-sched3")]
        arms += [_prune(16, distill=True, schedule=3.0, suffix="-kd-sched3")]
    return arms


def lm_arms(mode: str, recovery_steps: int) -> list[Arm]:
    steps = recovery_steps
    if mode == "tiny":
        return [Arm("dense", "dense"), _roast(1), _roast(4), _prune(4), _roast(4, recovery_steps=steps, suffix="-rec")]
    arms = [Arm("dense", "dense")] + [_roast(c) for c in (1, 2, 4, 8)] + [_prune(c) for c in (2, 4, 8)]
    arms += [_roast(c, recovery_steps=steps, suffix=f"-rec{steps}") for c in (4, 8)]
    arms += [_prune(c, recovery_steps=steps, suffix=f"-rec{steps}") for c in (4, 8)]
    if mode == "full":
        arms += [_roast(c, mapper=m) for m in ("roast", "hashednet") for c in (4, 8)]
    return arms
