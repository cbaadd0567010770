"""Task-agnostic recovery (hf_roast.recovery, ``hf-roast recover``): the distillation loss falls on a causal LM
and on encoders, a resumed run equals an uninterrupted one, and the checkpoint records its recovery."""

from __future__ import annotations

import copy
import json
import os
import random

import pytest
import torch
import transformers as tf
from helpers import VOCAB, tiny_llama

from hf_roast import RoastConfig, RoastModel, get_roast_model
from hf_roast.checkpoint_format import FORMAT_VERSION, RECOVERY_KEY
from hf_roast.recovery import batch_indices, latest_checkpoint, lr_factor, recover


def tiny_tokenizer():
    """A word-level tokenizer over the tiny models' vocabulary (``t0`` ... ``t95``), built here: no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t3", pad_token="t0", eos_token="t2")


def tiny_texts(n: int = 64, seed: int = 0) -> list[str]:
    """Documents of 8-23 random words: a random teacher's predictions are all there is to learn."""
    rng = random.Random(seed)
    return [" ".join(f"t{rng.randrange(3, VOCAB)}" for _ in range(rng.randrange(8, 24))) for _ in range(n)]


def tiny_bert(cls=tf.BertForMaskedLM, seed: int = 0):
    torch.manual_seed(seed)
    config = tf.BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return cls(config).eval()


def compressed(teacher, compression: float = 8.0) -> RoastModel:
    return get_roast_model(copy.deepcopy(teacher), RoastConfig(compression=compression), show_progress=False)


RUN = dict(batch_size=8, max_length=32, lr=1e-3, hidden_weight=1.0, seed=0, show_progress=False)


def _falls(losses: list[float], k: int = 5) -> tuple[float, float]:
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


@pytest.mark.parametrize(
    "make",
    [tiny_llama, tiny_bert, lambda: tiny_bert(tf.BertModel)],
    ids=["llama", "bert-mlm", "bert-encoder-no-head"],
)
def test_the_distillation_loss_falls(make):
    """About 30 steps at 8x, fixed seeds: the mean of the last 5 steps' losses is well below the first 5's."""
    teacher = make()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = compressed(teacher)
    report = recover(student, teacher, tiny_texts(), tiny_tokenizer(), token_budget=5000, **RUN)
    assert report.steps >= 25 and report.tokens >= 5000
    first, last = _falls(report.losses)
    assert last < 0.7 * first, (first, last)
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())  # the teacher only teaches
    assert all(
        p.requires_grad for p in teacher.parameters()
    )  # and is left as it came (a copy stays trainable)


def test_the_data_order_and_the_schedule_are_pure_functions():
    assert batch_indices(10, 4, 0, 2) == batch_indices(10, 4, 0, 2)
    assert batch_indices(10, 4, 0, 2) != batch_indices(10, 4, 1, 2)
    epoch = [i for s in range(5) for i in batch_indices(10, 4, 3, s)][:10]
    assert sorted(epoch) == list(range(10))  # every document once per epoch
    assert lr_factor(0, 1000) < lr_factor(40, 1000) < lr_factor(50, 1000) == pytest.approx(1.0)
    assert lr_factor(1000, 1000) == 0.0


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    """Interrupted after the first checkpoint, then resumed: z, every other parameter and the losses equal the
    uninterrupted run's bitwise (same data and dropout per step, optimizer state restored exactly; CPU ops on
    the same shapes in the same order are deterministic)."""
    teacher = tiny_bert()  # dropout 0.1: resuming must restore its randomness too
    texts, tokenizer = tiny_texts(), tiny_tokenizer()
    whole = compressed(teacher)
    full = recover(whole, teacher, texts, tokenizer, token_budget=3000, **RUN)

    class Interrupt(Exception):
        pass

    interrupted = compressed(teacher)
    out = tmp_path / "run"
    real_save = RoastModel.save_pretrained

    def save_then_stop(self, path, **kwargs):
        real_save(self, path, **kwargs)
        if os.path.basename(path).startswith("checkpoint-"):
            save_then_stop.calls += 1
            if save_then_stop.calls == 2:  # the 2nd checkpoint's weights are written, its sidecar is not
                raise Interrupt

    save_then_stop.calls = 0
    RoastModel.save_pretrained = save_then_stop
    try:
        with pytest.raises(Interrupt):
            recover(
                interrupted,
                teacher,
                texts,
                tokenizer,
                token_budget=3000,
                output_dir=out,
                save_every=1000,
                **RUN,
            )
    finally:
        RoastModel.save_pretrained = real_save
    checkpoint = latest_checkpoint(out)  # the complete one: the 2nd lacks its sidecar
    assert checkpoint is not None and (out / os.path.basename(checkpoint)).is_dir()

    resumed = compressed(
        teacher
    )  # a fresh process would start from the compressed init, then load the checkpoint
    report = recover(
        resumed, teacher, texts, tokenizer, token_budget=3000, output_dir=out, save_every=1000, **RUN
    )
    assert report.losses == full.losses and report.steps == full.steps and report.tokens == full.tokens
    expected = dict(whole.get_base_model().named_parameters())
    for name, param in resumed.get_base_model().named_parameters():
        assert torch.equal(param, expected[name]), name

    with pytest.raises(ValueError, match="other lr"):  # resuming another run's checkpoint is refused
        recover(
            compressed(teacher),
            teacher,
            texts,
            tokenizer,
            token_budget=3000,
            output_dir=out,
            **(RUN | {"lr": 2e-3}),
        )


def test_the_checkpoint_records_its_recovery(tmp_path):
    import hf_roast

    assert hf_roast.recover is recover  # the public, lazily imported name
    teacher = tiny_llama()
    student = compressed(teacher)
    report = recover(
        student,
        teacher,
        tiny_texts(),
        tiny_tokenizer(),
        token_budget=800,
        output_dir=tmp_path,
        data_description="tiny random words",
        teacher_name="tiny/llama",
        **RUN,
    )
    raw = json.loads((tmp_path / "roast_config.json").read_text())
    assert raw["format_version"] == FORMAT_VERSION
    record = raw[RECOVERY_KEY]
    assert record == report.to_dict()
    assert record["tokens"] == report.tokens >= 800 and record["data"] == "tiny random words"
    assert record["teacher"] == "tiny/llama" and record["final_loss"] == pytest.approx(report.final_loss)
    assert "recovery" not in json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    card = (tmp_path / "README.md").read_text()
    assert f"on {report.tokens:,} tokens of tiny random words" in card and "tiny/llama" in card
    assert (tmp_path / "tokenizer.json").is_file()

    loaded = RoastModel.from_pretrained(
        tmp_path
    )  # no warning about an unknown key: "recovery" is the format's
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, student(input_ids=ids).logits)

    raw[RECOVERY_KEY] = "edited"
    (tmp_path / "roast_config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="'recovery' must be a JSON object"):
        RoastModel.from_pretrained(tmp_path)


def test_bad_inputs_name_the_problem_and_the_fix():
    teacher = tiny_llama()
    student = compressed(teacher)
    tokenizer = tiny_tokenizer()
    with pytest.raises(ValueError, match="less than one batch.*raise the budget"):
        recover(student, teacher, tiny_texts(), tokenizer, token_budget=10, **RUN)
    with pytest.raises(ValueError, match="every document is empty"):
        recover(student, teacher, ["", "  "], tokenizer, token_budget=1000, **RUN)
    with pytest.raises(ValueError, match="save_every needs an output_dir"):
        recover(student, teacher, tiny_texts(), tokenizer, token_budget=1000, save_every=100, **RUN)
    with pytest.raises(TypeError, match="get_roast_model"):
        recover(teacher, teacher, tiny_texts(), tokenizer, token_budget=1000, **RUN)
    encoder = tiny_bert(tf.BertModel)
    with pytest.raises(ValueError, match="hidden_weight > 0"):
        recover(
            compressed(encoder),
            encoder,
            tiny_texts(),
            tokenizer,
            token_budget=1000,
            **(RUN | {"hidden_weight": 0.0}),
        )


def test_the_cli_compresses_recovers_and_saves(tmp_path, capsys):
    from hf_roast.cli import main

    dense = tmp_path / "dense"
    tiny_llama().save_pretrained(dense)
    tiny_tokenizer().save_pretrained(dense)
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(tiny_texts(32)) + "\n")
    out = tmp_path / "out"
    args = [str(dense), "--compression", "8", "--text", str(text), "--tokens", "600", "--batch-size", "4"]
    args += ["--max-length", "32", "--lr", "1e-3", "--output", str(out), "--save-every", "300", "--quiet"]
    assert main(["recover", *args, "--calibrate"]) == 0
    assert "recovered 8x on" in capsys.readouterr().out
    record = json.loads((out / "roast_config.json").read_text())[RECOVERY_KEY]
    assert record["tokens"] >= 600 and record["data"] == "text files corpus.txt"
    assert record["teacher"] == str(dense)
    assert json.loads((out / "roast_config.json").read_text())["compression"] == 8.0
    assert RoastModel.from_pretrained(out).roast_config.compression == 8.0

    for bad, message in [
        (["--text", str(tmp_path / "missing.txt")], "no such file"),
        ([], "no text to recover on"),
        (["--text", str(text), "--tokens", "5"], "less than one batch"),
    ]:
        base = [str(dense), "--tokens", "600", "--output", str(tmp_path / "bad"), "--quiet"]
        with pytest.raises(SystemExit, match=message):
            main(["recover", *base, *bad])
