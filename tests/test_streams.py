"""Two CPU streams give bit-identical results to one: prefill, decode, multi-row verify, and greedy MTP decoding."""

import mlx.core as mx
import pytest

from step35_mlx import load
from step35_mlx.generate import ar_tokens
from step35_mlx.sampling import SamplingParams
from step35_mlx.speculative import speculative_tokens
from step35_mlx.streams import use_two_streams


def _run(model, prompt):
    cache = model.make_cache()
    out = [model(prompt[None], cache)]  # prefill (expert-sorted path)
    out.append(model(mx.array([[7]]), cache))  # one decode row
    out.append(model(mx.array([[9, 11, 13]]), cache))  # a verify step of three rows
    greedy = SamplingParams(temperature=0.0)
    toks = []
    for t in ar_tokens(model, model.make_cache(), prompt, greedy):
        toks.append(t)
        if len(toks) == 24:
            break
    spec = []
    for t in speculative_tokens(model, model.make_cache(), prompt, greedy, depth=2):
        spec.append(t)
        if len(spec) == 24:
            break
    return out, toks, spec


def test_two_streams_are_bit_identical_to_one():
    model, tok = load("demo")
    prompt = mx.array(tok.encode("What does the with statement do?", add_special_tokens=False), dtype=mx.int32)
    one, toks1, spec1 = _run(model, prompt)
    if mx.default_device() != mx.cpu:
        assert not use_two_streams(model)  # never on the GPU
        pytest.skip("two streams are a CPU-device feature")
    assert use_two_streams(model)
    assert all(l.side_stream is not None for l in model.layers if l.is_moe)
    two, toks2, spec2 = _run(model, prompt)
    use_two_streams(model, False)
    assert all(l.side_stream is None for l in model.layers)
    for a, b in zip(one, two):
        assert mx.array_equal(a, b).item()
    assert toks1 == toks2 == spec1 == spec2


def test_two_streams_work_on_another_thread():
    """`serve` loads the model on one thread and generates on a worker thread (MLX streams are per thread)."""
    from concurrent.futures import ThreadPoolExecutor

    model, tok = load("demo")
    if mx.default_device() != mx.cpu:
        pytest.skip("two streams are a CPU-device feature")
    prompt = mx.array(tok.encode("What is a tuple?", add_special_tokens=False), dtype=mx.int32)
    one = _run(model, prompt)[1]
    assert use_two_streams(model)
    with ThreadPoolExecutor(max_workers=1) as pool:
        two = pool.submit(lambda: _run(model, prompt)[1]).result()
    use_two_streams(model, False)
    assert one == two
