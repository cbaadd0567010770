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


def test_the_compiled_split_sorts_profiler_events_into_its_parts():
    """``--compile`` reads the profiler: the CPU path's op (its C++ kernel), guards, the graph's own wrapper,
    and the matrix products as wide as the vocabulary; nothing else is counted (the ops' Python CPU
    kernels, ``roast_linear``, are not what a compiled graph calls)."""
    from types import SimpleNamespace

    from benchmarks.decode_profile import compiled_split

    def event(key, total=0.0, own=0.0, shapes=None):
        return SimpleNamespace(key=key, cpu_time_total=total, self_cpu_time_total=own, input_shapes=shapes)

    events = [
        event("hf_roast::roast_linear_cpu", total=3000.0, own=2500.0),
        event("hf_roast::roast_linear_cpu", total=1000.0),
        event("hf_roast::roast_linear", total=500.0),
        event("TorchDynamo Cache Lookup", own=400.0),
        event("## Call CompiledFxGraph abc", total=9000.0, own=700.0),
        event("aten::mm", own=5000.0, shapes=[[1, 576], [576, 49152]]),
        event("aten::mm", own=800.0, shapes=[[1, 576], [576, 1536]]),  # a projection, not the output layer
        event("aten::add", own=100.0, shapes=[[49152], [49152]]),
    ]
    split = compiled_split(events, 49152)
    assert split == {
        "GEMV op": 0.004,
        "guards": 0.0004,
        "graph wrapper": 0.0007,
        "output layer": 0.005,
    }
