"""Reasoning / answer split at </think>, identical at every chunk boundary."""

import itertools

import pytest

from step35_mlx.reasoning import ReasoningSplitter, split_reasoning

# (text, in_reasoning, expected reasoning, expected answer)
CASES = [
    ("I should greet.\n</think>\nHello!", True, "I should greet.", "Hello!"),
    ("plan\n</think>\n\nAnswer with blank line", True, "plan", "\nAnswer with blank line"),
    ("two newlines\n\n</think>\n\nA", True, "two newlines\n", "\nA"),
    ("no newlines</think>answer", True, "no newlines", "answer"),
    ("\n</think>\nempty reasoning", True, "", "empty reasoning"),
    ("</think>", True, "", ""),
    ("</think>\n", True, "", ""),
    ("never closed, all reasoning\n", True, "never closed, all reasoning\n", ""),
    ("ends in a partial tag </thi", True, "ends in a partial tag </thi", ""),
    ("<think>\nexplicit open\n</think>\nanswer", True, "explicit open", "answer"),
    ("  <think>x</think>y", True, "x", "y"),
    ("<thinking> is not the tag</think>ok", True, "<thinking> is not the tag", "ok"),
    ("a < b and c </ d\n</think>\nthe answer mentions </think> again", True,
     "a < b and c </ d", "the answer mentions </think> again"),
    ("plain answer, no reasoning", False, "", "plain answer, no reasoning"),
    ("<think>\nr\n</think>\na", False, "r", "a"),
    ("answer first <think>not reasoning</think>", False, "", "answer first <think>not reasoning</think>"),
    ("", True, "", ""),
    ("\n", True, "\n", ""),
]


def _stream(chunks, in_reasoning):
    s = ReasoningSplitter(in_reasoning)
    r, a = [], []
    for c in chunks:
        x, y = s.feed(c)
        r.append(x)
        a.append(y)
    x, y = s.finish()
    r.append(x)
    a.append(y)
    return "".join(r), "".join(a)


@pytest.mark.parametrize("text,in_reasoning,reasoning,answer", CASES)
def test_one_shot(text, in_reasoning, reasoning, answer):
    assert split_reasoning(text, in_reasoning) == (reasoning, answer)


@pytest.mark.parametrize("text,in_reasoning,reasoning,answer", CASES)
def test_every_chunk_boundary(text, in_reasoning, reasoning, answer):
    n = len(text)
    # every single cut, every pair of cuts, and one character at a time
    for i in range(n + 1):
        assert _stream([text[:i], text[i:]], in_reasoning) == (reasoning, answer), i
    if n <= 40:
        for i, j in itertools.combinations(range(n + 1), 2):
            assert _stream([text[:i], text[i:j], text[j:]], in_reasoning) == (reasoning, answer), (i, j)
    assert _stream(list(text), in_reasoning) == (reasoning, answer)


def test_streaming_holds_back_only_what_is_undecided():
    s = ReasoningSplitter()
    assert s.feed("thinking") == ("thinking", "")
    assert s.feed(" more\n") == (" more", "")  # the newline may belong to </think>
    assert s.feed("</thi") == ("", "")
    assert not s.reasoning_done
    assert s.feed("nk>") == ("", "")
    assert s.reasoning_done
    assert s.feed("\nHi") == ("", "Hi")
    assert s.feed(" there") == ("", " there")
    assert s.finish() == ("", "")
    assert (s.reasoning, s.answer) == ("thinking more", "Hi there")
