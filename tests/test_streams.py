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


def test_split_linear_is_bit_identical_and_only_for_affine_quantized_layers():
    import mlx.nn as nn

    from step35_mlx.streams import SideStream, split_linear

    if mx.default_device() != mx.cpu:
        pytest.skip("two streams are a CPU-device feature")
    mx.random.seed(3)
    dense = nn.Linear(256, 1000, bias=False)
    q = nn.QuantizedLinear.from_linear(dense, group_size=64, bits=4)
    side = SideStream()
    for rows in (1, 3, 40):  # decode, a verify step, a prefill chunk
        x = mx.random.normal((1, rows, 256))
        y = split_linear(q, x, side)
        assert y.shape == (1, rows, 1000)
        assert mx.array_equal(y, q(x)).item()
        assert mx.array_equal(split_linear(dense, x, side), dense(x)).item()  # float layers run whole


def test_every_part_gets_the_side_stream_and_one_restores_it():
    model, _ = load("demo")
    if mx.default_device() != mx.cpu:
        pytest.skip("two streams are a CPU-device feature")
    assert use_two_streams(model)
    layers = list(model.layers) + list(model.model.mtp)
    assert model.head_side_stream is not None
    assert all(l.side_stream is not None and l.self_attn.side_stream is not None for l in layers)
    assert any(not l.is_moe for l in model.layers), "the demo has a dense layer: its split path is exercised"
    use_two_streams(model, False)
    assert model.head_side_stream is None
    assert all(l.side_stream is None and l.self_attn.side_stream is None for l in layers)
