"""``python -m benchmarks.gemv_threads``: the 1-against-2-thread timing of the hashed GEMV runs end to end."""

import torch


def test_gemv_threads_times_every_projection_kind_on_one_and_two_threads(capsys):
    from benchmarks.gemv_threads import KINDS, main

    threads = torch.get_num_threads()
    result = main(["--model", "tiny", "--rounds", "3"])
    assert torch.get_num_threads() == threads  # the caller's thread count is left as it was
    assert set(result) == set(KINDS)
    assert all(one > 0 and two > 0 for one, two in result.values())
    assert "1 thread" in capsys.readouterr().out
