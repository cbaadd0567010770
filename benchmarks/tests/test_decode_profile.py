"""``python -m benchmarks.decode_profile``: the split of a decode token runs end to end (tiny model)."""

import torch


def test_decode_profile_splits_a_token_into_gemv_output_layer_and_rest(capsys):
    from benchmarks.decode_profile import main

    threads = torch.get_num_threads()
    assert main(["--model", "tiny", "--new-tokens", "3", "--rounds", "1", "--threads", "1"]) == 0
    assert (
        torch.is_grad_enabled() and torch.get_num_threads() == threads
    )  # the caller's state is left as it was
    lines = capsys.readouterr().out.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("arm "))
    rows = {
        line.split()[0] + (" " + line.split()[1] if line.startswith("hf-roast") else ""): line
        for line in lines[header + 1 :]
    }
    assert set(rows) == {"dense", "hf-roast 16x"}
    dense_calls = float(rows["dense"].split()[4])
    roast_calls = float(rows["hf-roast 16x"].split()[5])
    assert dense_calls == 0  # a dense model never reaches the hashed GEMV
    assert roast_calls == 6 * 7  # every compressed projection of the 6-layer model, once per token
