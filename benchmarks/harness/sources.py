"""Model + data sources: the real ones (pinned wheels, see ``data.py``) and tiny synthetic stand-ins.

The tiny sources build models from configs and text from a few templates, so the smoke tests run the
whole pipeline in seconds on a fresh machine without the data packages.
"""

from __future__ import annotations

import random

import torch

from .classification import ClassificationSource
from .data import TextClassificationData, split_classification
from .language_model import LanguageModelSource

_POSITIVE = ["moving", "funny", "brilliant", "tender", "sharp", "warm", "gripping", "clever"]
_NEGATIVE = ["dull", "clumsy", "tedious", "flat", "muddled", "lifeless", "bland", "shrill"]
_NOUNS = ["film", "script", "cast", "story", "ending", "director", "score", "pace"]
_FILLERS = ["the", "a", "this", "its", "and", "but", "very", "often", "really", "is", "was", "feels"]


def tiny_sentences(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """Template reviews whose label is carried by the adjectives: learnable in a few steps."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        adjectives = _POSITIVE if label else _NEGATIVE
        words = [rng.choice(_FILLERS), rng.choice(_NOUNS), rng.choice(_FILLERS), rng.choice(adjectives)]
        words += [rng.choice(_FILLERS), rng.choice(adjectives)]
        rows.append((" ".join(words), label))
    return rows


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(_POSITIVE + _NEGATIVE + _NOUNS + _FILLERS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        eos_token="[EOS]",
        model_input_names=["input_ids", "attention_mask"],
    )


def tiny_classification_source(n: int = 160) -> ClassificationSource:
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = tiny_tokenizer()
    data = split_classification(
        tiny_sentences(n),
        ["negative", "positive"],
        val_size=n // 5,
        seed=0,
        description=f"{n} template sentences",
    )

    def load(num_labels: int):
        torch.manual_seed(1234)  # the same "pre-trained" weights for every arm
        config = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=32,
            num_labels=num_labels,
        )
        return BertForSequenceClassification(config)

    return ClassificationSource(
        "tiny-bert (config, random init)",
        load,
        tokenizer,
        data,
        recovery_text=lambda: [t for t, _ in tiny_sentences(200, seed=7)],
        recovery_text_description="200 template sentences (tiny)",
    )


def tiny_lm_source() -> LanguageModelSource:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    texts = [" ".join(t for t, _ in tiny_sentences(30, seed=s)) for s in range(10)]

    def load():
        torch.manual_seed(1234)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
        )
        return LlamaForCausalLM(config)

    return LanguageModelSource(
        "tiny-llama (config, random init)", load, tokenizer, texts[2:], texts[:2], "template text"
    )


def minilm_classification_source(train_size: int | None, val_size: int = 1000) -> ClassificationSource:
    from hf_roast.scripts.pinned_models import minilm_dir
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .data import PINNED, load_rotten_tomatoes, wikipedia_passages

    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    data: TextClassificationData = load_rotten_tomatoes(train_size=train_size, val_size=val_size)

    def load(num_labels: int):
        hf_logging.set_verbosity_error()  # the new classifier head is reported missing, as expected
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)

    return ClassificationSource(
        f"all-MiniLM-L6-v2 ({PINNED['minilm']['package']})",
        load,
        tokenizer,
        data,
        recovery_text=wikipedia_passages,
        recovery_text_description="Wikipedia passages (gensim 4.4.0's enwiki test dump, training articles)",
    )


DECODER_PASSAGE_CHARS = 2000
"""The recovered decoder's documents: runs of whole sentences of the training articles, across paragraphs, of about
2,000 characters (about 450 tokens, inside the 512-token truncation): long contexts, as perplexity reads, and
batches with little padding."""


def smollm2_source() -> LanguageModelSource:
    from hf_roast.scripts.pinned_models import smollm2_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data import PINNED, load_wikipedia_articles, split_articles, wikipedia_passages

    path = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train, held_out = split_articles(load_wikipedia_articles())

    def load():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    description = (
        f"enwiki test dump from {PINNED['enwiki']['package']}: {len(train) + len(held_out)} articles, every 5th "
        f"held out ({len(held_out)}), recovery trains on the other {len(train)}"
    )
    return LanguageModelSource(
        f"SmolLM2-135M-Instruct Q4_1->fp32 ({PINNED['smollm2']['package']})",
        load,
        tokenizer,
        train,
        held_out,
        description,
        recovery_text=lambda: wikipedia_passages(DECODER_PASSAGE_CHARS, across_paragraphs=True),
        recovery_text_description=(
            f"Wikipedia passages of ~{DECODER_PASSAGE_CHARS} characters ({PINNED['enwiki']['package']}'s "
            "enwiki test dump, training articles)"
        ),
    )
