"""Task-agnostic recovery: distil the dense model into its compressed copy on generic unlabelled text.

Compressing a pre-trained model by sharing keeps about 1/c of each weight's energy, and task data alone does
not bring back what the model knew (docs/results.md). :func:`recover` teaches it back from the dense model
itself, before any task: the KL divergence between the teacher's and the student's logits (temperature 1,
non-padding positions), plus the mean squared error between every layer's hidden states (the widths always
match for hf-roast), with the recipe's parameter groups (:func:`hf_roast.optim.create_roast_optimizer`), a
linear warm-up and decay over the token budget, and a stop at the budget (non-padding tokens).

A run is a pure function of its arguments: the documents of step ``s`` are drawn from a permutation seeded by
``seed`` and the epoch, dropout is seeded by ``seed`` and ``s``, and the learning rate is a function of the
tokens seen. A checkpoint therefore needs only the weights (the student's own ``save_pretrained``), the
optimizer's state (safetensors, no pickle) and the step counters (JSON) for a resumed run to equal an
uninterrupted one.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field

import torch
from safetensors.torch import load_file, save_file

from .distill import distillation_loss, hidden_state_loss
from .model import RoastModel
from .optim import create_roast_optimizer

STATE_DIR = "recovery_state"
"""The sidecar inside each ``checkpoint-<step>`` folder (a subfolder, so the loader never sees its tensors)."""
OPTIMIZER_FILE, STATE_FILE = "optimizer.safetensors", "state.json"
CHECKPOINT = re.compile(r"checkpoint-(\d+)")
WARMUP_RATIO = 0.05
"""Share of the token budget spent warming the learning rate up (then it decays linearly to 0)."""
FINAL_LOSS_STEPS = 10
"""``final_loss`` is the mean over this many last steps: one step's loss is too noisy to record."""


@dataclass
class RecoveryReport:
    """What a recovery run did; :meth:`to_dict` is the ``recovery`` record of ``roast_config.json``."""

    tokens: int
    token_budget: int
    steps: int
    final_loss: float
    data: str
    teacher: str | None
    lr: float
    hidden_weight: float
    batch_size: int
    max_length: int
    seed: int
    losses: list[float] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        """The checkpoint's record (every field but the per-step losses, which stay in the report)."""
        d = asdict(self)
        d.pop("losses")
        return d


# ---- data ------------------------------------------------------------------------------------------
def documents(texts_or_dataset, text_column: str = "text") -> list[str]:
    """The non-empty documents of a sequence of strings or of a ``datasets.Dataset``'s ``text_column``."""
    if hasattr(texts_or_dataset, "column_names"):
        if text_column not in texts_or_dataset.column_names:
            raise ValueError(
                f"the dataset has no column {text_column!r} (it has {texts_or_dataset.column_names}): pass "
                "text_column= (--column) naming the column that holds the text."
            )
        texts_or_dataset = texts_or_dataset[text_column]
    if isinstance(texts_or_dataset, str):
        raise TypeError("pass a list of documents, not one string (wrap it: [text]).")
    docs = [t for t in texts_or_dataset if isinstance(t, str) and t.strip()]
    if not docs:
        raise ValueError(
            "no text to recover on: every document is empty. Pass text files or a dataset with text."
        )
    return docs


def batch_indices(num_documents: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The documents of step ``step``: a pure function of the seed and the step (so a resumed run sees the
    same data as an uninterrupted one). Position ``p`` of the endless stream is document ``perm_e[p % n]``,
    ``perm_e`` a permutation seeded by ``seed`` and the epoch ``e = p // n``."""
    out, perms = [], {}
    for p in range(step * batch_size, (step + 1) * batch_size):
        epoch = p // num_documents
        if epoch not in perms:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perms[epoch] = torch.randperm(num_documents, generator=g).tolist()
        out.append(perms[epoch][p % num_documents])
    return out


def tokenize_batch(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` (padded by hand: many causal-LM tokenizers have no
    pad token, and padded positions are masked out of every loss anyway)."""
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    ids = [x for x in ids if x]
    if not ids:
        raise ValueError("the tokenizer produced no tokens for a batch: check the text and the tokenizer.")
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def _fingerprint(docs: list[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode())
        h.update(b"\0")
    return h.hexdigest()


# ---- the loss --------------------------------------------------------------------------------------
def recovery_loss(
    student_out, teacher_out, attention_mask: torch.Tensor, hidden_weight: float
) -> torch.Tensor:
    """KL(teacher || student) on the logits at temperature 1, when the model has logits (a causal or masked
    LM head), plus ``hidden_weight`` times the hidden states' MSE. An encoder without a head has no logits:
    its hidden states are all there is to distil."""
    logits = getattr(student_out, "logits", None)
    loss = None
    if logits is not None:
        mask = attention_mask if logits.dim() == 3 else None
        loss = distillation_loss(logits, teacher_out.logits, temperature=1.0, mask=mask)
    if hidden_weight > 0:
        hidden = hidden_weight * hidden_state_loss(
            student_out.hidden_states, teacher_out.hidden_states, attention_mask
        )
        loss = hidden if loss is None else loss + hidden
    if loss is None:
        raise ValueError(
            "the model has no logits (an encoder without a head), so only its hidden states can be distilled: "
            "set hidden_weight > 0."
        )
    return loss


def lr_factor(tokens_seen: int, token_budget: int, warmup_ratio: float = WARMUP_RATIO) -> float:
    """Linear warm-up over the first ``warmup_ratio`` of the budget, then linear decay to 0 at the budget: a
    function of the tokens seen, so it needs no state of its own to resume."""
    progress = tokens_seen / token_budget
    if progress < warmup_ratio:
        return (progress + 1 / max(1, token_budget)) / warmup_ratio
    return max(0.0, (1 - progress) / (1 - warmup_ratio))


# ---- checkpoints -----------------------------------------------------------------------------------
def _optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def latest_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The ``checkpoint-<step>`` folder of ``output_dir`` with the highest step and a complete sidecar."""
    found = []
    for path in glob.glob(os.path.join(output_dir, "checkpoint-*")):
        m = CHECKPOINT.fullmatch(os.path.basename(path))
        if m and os.path.isfile(os.path.join(path, STATE_DIR, STATE_FILE)):
            found.append((int(m.group(1)), path))
    return max(found)[1] if found else None


def _save_checkpoint(student: RoastModel, optimizer, state: dict, record: dict, output_dir: str) -> str:
    """``checkpoint-<step>``: the student's own checkpoint, then the sidecar; the JSON goes last (by rename),
    so a folder without it is incomplete and never resumed from. Older checkpoints are removed after."""
    path = os.path.join(output_dir, f"checkpoint-{state['step']}")
    shutil.rmtree(
        os.path.join(path, STATE_DIR), ignore_errors=True
    )  # a stale sidecar must not pass as this one
    student.save_pretrained(path, recovery=record, model_card=False)
    sidecar = os.path.join(path, STATE_DIR)
    os.makedirs(sidecar, exist_ok=True)
    tensors, meta = _optimizer_state(optimizer)
    save_file(tensors, os.path.join(sidecar, OPTIMIZER_FILE))
    tmp = os.path.join(sidecar, STATE_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({**state, "optimizer": meta}, f)
    os.replace(tmp, os.path.join(sidecar, STATE_FILE))
    for old in glob.glob(os.path.join(output_dir, "checkpoint-*")):
        if os.path.abspath(old) != os.path.abspath(path) and CHECKPOINT.fullmatch(os.path.basename(old)):
            shutil.rmtree(old, ignore_errors=True)
    return path


def _resume(student: RoastModel, optimizer, path: str, run: dict) -> dict:
    """Load the weights and optimizer state of checkpoint ``path`` into ``student`` and ``optimizer``."""
    with open(os.path.join(path, STATE_DIR, STATE_FILE)) as f:
        state = json.load(f)
    stored = state["run"]
    differ = sorted(k for k in run if stored.get(k) != run[k])
    if differ:
        raise ValueError(
            f"{path} was written by a run with other {', '.join(differ)} "
            f"({', '.join(f'{k}={stored.get(k)!r}' for k in differ)}): resuming it would not continue that "
            "run. Pass the same arguments, resume=False (--no-resume) to start over, or another output folder."
        )
    loaded = RoastModel.from_pretrained(path)
    with torch.no_grad():
        target = student.get_base_model().state_dict()
        for name, value in loaded.get_base_model().state_dict().items():
            target[name].copy_(value)
    _load_optimizer_state(
        optimizer, load_file(os.path.join(path, STATE_DIR, OPTIMIZER_FILE)), state["optimizer"]
    )
    return state


# ---- the run ---------------------------------------------------------------------------------------
def _check(token_budget, batch_size, max_length, lr, hidden_weight, output_dir, save_every) -> None:
    for name, value in (
        ("token_budget", token_budget),
        ("batch_size", batch_size),
        ("max_length", max_length),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if not lr > 0:
        raise ValueError(f"lr must be > 0 (the rate you would train the dense model with), got {lr!r}.")
    if not hidden_weight >= 0:
        raise ValueError(f"hidden_weight must be >= 0 (0: logits only), got {hidden_weight!r}.")
    if save_every is not None and (output_dir is None or save_every < 1):
        raise ValueError("save_every needs an output_dir to save into, and a positive number of tokens.")


def recovery_step(
    student, teacher, docs: list[str], tokenizer, optimizer, base_lrs: list[float], state: dict
) -> int:
    """One step of recovery, advancing ``state`` (``step``, ``tokens``, ``losses`` and ``run``, the run's
    arguments as :func:`recover` records them); returns the step's non-padding tokens.

    The step's documents (:func:`batch_indices`), each group's rate at the tokens seen (``base_lrs`` times
    :func:`lr_factor`), the loss (:func:`recovery_loss`) with dropout seeded by the seed and the step, clipping,
    and the optimizer's step. :func:`recover` runs it; it is public so that a baseline with an optimizer of its own
    (a pruned dense model, say) recovers exactly as hf-roast does."""
    run, step = state["run"], state["step"]
    device = next(student.parameters()).device
    texts = [docs[i] for i in batch_indices(len(docs), run["batch_size"], run["seed"], step)]
    batch = {k: v.to(device) for k, v in tokenize_batch(tokenizer, texts, run["max_length"]).items()}
    factor = lr_factor(state["tokens"], run["token_budget"])
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["lr"] = base * factor
    want_hidden = run["hidden_weight"] > 0
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # dropout: a function of the seed and the step
        torch.manual_seed(run["seed"] * 1_000_003 + step)
        out = student(**batch, output_hidden_states=want_hidden)
        with torch.no_grad():
            target = teacher(**batch, output_hidden_states=want_hidden)
        loss = recovery_loss(out, target, batch["attention_mask"], run["hidden_weight"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    if run["max_grad_norm"]:
        torch.nn.utils.clip_grad_norm_(student.parameters(), run["max_grad_norm"])
    optimizer.step()
    seen = int(batch["attention_mask"].sum())
    state["step"], state["tokens"] = step + 1, state["tokens"] + seen
    state["losses"].append(float(loss.detach()))
    return seen


def recover(
    student: RoastModel,
    teacher,
    texts_or_dataset,
    tokenizer,
    *,
    token_budget: int,
    batch_size: int = 8,
    max_length: int = 512,
    lr: float = 5e-5,
    hidden_weight: float = 1.0,
    text_column: str = "text",
    output_dir: str | os.PathLike | None = None,
    save_every: int | None = None,
    resume: bool = True,
    seed: int = 0,
    max_grad_norm: float = 1.0,
    data_description: str | None = None,
    teacher_name: str | None = None,
    show_progress: bool = True,
) -> RecoveryReport:
    """Distil the dense ``teacher`` into the compressed ``student`` (in place) until ``token_budget``
    non-padding tokens have been seen; returns the :class:`RecoveryReport`.

    ``lr`` is the rate you would train the dense model with; the recipe's groups get their ratios of it.
    With ``output_dir``, a ``checkpoint-<step>`` folder is written every ``save_every`` tokens (the latest is
    kept), ``resume=True`` continues from the latest one, and the recovered student is saved to
    ``output_dir`` with its record in ``roast_config.json`` and the model card (the tokenizer beside it).

    Args:
        student: the compressed model (``get_roast_model``, ideally with ``calibration_data``); trained in place.
        teacher: the dense model it was compressed from (a separate copy: compression works in place). Only
            its forward runs, under ``no_grad``; it is put in eval mode and on the student's device.
        texts_or_dataset: a sequence of documents, or a ``datasets.Dataset`` whose ``text_column`` holds them.
        tokenizer: the model's tokenizer; documents are truncated to ``max_length`` tokens, not packed.
        token_budget: stop once this many non-padding tokens have been seen (at least one batch's worth).
        batch_size: documents per step.
        lr: the dense training rate; ``create_roast_optimizer`` gives each group its ratio of it.
        hidden_weight: weight of the hidden states' MSE beside the logits' KL (0: logits only).
        save_every: tokens between checkpoints (needs ``output_dir``); ``resume``: continue from the latest.
        seed: the data order and dropout of every step derive from it.
        data_description, teacher_name: what the record names (default: the number of documents, and the
            teacher's ``name_or_path``).
    """
    _check(token_budget, batch_size, max_length, lr, hidden_weight, output_dir, save_every)
    if not isinstance(student, RoastModel):
        raise TypeError("student must be a RoastModel: compress the dense model with get_roast_model first.")
    if student.roast_config.z_packed and not student.roast_config.z_qat:
        raise ValueError("a packed (quantised) z cannot be trained: recover a float z, then quantize_z().")
    docs = documents(texts_or_dataset, text_column)
    output_dir = os.fspath(output_dir) if output_dir is not None else None
    teacher_name = teacher_name or getattr(getattr(teacher, "config", None), "_name_or_path", None) or None
    data_description = data_description or f"{len(docs):,} documents"
    run = {
        "token_budget": token_budget,
        "batch_size": batch_size,
        "max_length": max_length,
        "lr": lr,
        "hidden_weight": hidden_weight,
        "seed": seed,
        "max_grad_norm": max_grad_norm,
        "data_sha256": _fingerprint(docs),
    }
    device = next(student.parameters()).device
    teacher.to(device).eval()  # its forward runs under no_grad; its requires_grad flags are left as they are
    optimizer = create_roast_optimizer(student, lr=lr)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    state = {"step": 0, "tokens": 0, "losses": [], "run": run}
    first = tokenize_batch(
        tokenizer, [docs[i] for i in batch_indices(len(docs), batch_size, seed, 0)], max_length
    )
    if int(first["attention_mask"].sum()) > token_budget:
        raise ValueError(
            f"token_budget={token_budget:,} is less than one batch ({int(first['attention_mask'].sum()):,} tokens): "
            "raise the budget (--tokens) or lower batch_size / max_length."
        )
    if resume and output_dir and (path := latest_checkpoint(output_dir)):
        state = _resume(student, optimizer, path, run)
    from tqdm.auto import tqdm

    bar = tqdm(
        total=token_budget, initial=state["tokens"], unit="tok", disable=not show_progress, desc="recover"
    )
    student.train()
    try:
        while state["tokens"] < token_budget:
            seen = recovery_step(student, teacher, docs, tokenizer, optimizer, base_lrs, state)
            bar.update(seen)
            bar.set_postfix(loss=f"{state['losses'][-1]:.4f}")
            if save_every and state["tokens"] // save_every > (state["tokens"] - seen) // save_every:
                if state["tokens"] < token_budget:
                    record = _report(state, run, data_description, teacher_name).to_dict()
                    _save_checkpoint(student, optimizer, state, record, output_dir)
    finally:
        bar.close()
        student.eval()
    report = _report(state, run, data_description, teacher_name)
    if output_dir:
        student.save_pretrained(output_dir, recovery=report.to_dict())
        tokenizer.save_pretrained(output_dir)
    return report


def _report(state: dict, run: dict, data: str, teacher: str | None) -> RecoveryReport:
    losses = state["losses"]
    tail = losses[-FINAL_LOSS_STEPS:]
    return RecoveryReport(
        tokens=state["tokens"],
        token_budget=run["token_budget"],
        steps=state["step"],
        final_loss=sum(tail) / len(tail) if tail else float("nan"),
        data=data,
        teacher=teacher,
        lr=run["lr"],
        hidden_weight=run["hidden_weight"],
        batch_size=run["batch_size"],
        max_length=run["max_length"],
        seed=run["seed"],
        losses=list(losses),
    )


__all__ = [
    "RecoveryReport",
    "batch_indices",
    "documents",
    "latest_checkpoint",
    "recover",
    "recovery_loss",
    "recovery_step",
]
