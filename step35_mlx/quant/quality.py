"""Quality of a quantized checkpoint against its reference: KL divergence and top-1 agreement.

``quant_eval(quantized_dir, reference_dir, text=... | tokens=...)`` runs both models on
the same token sample (teacher forcing, float32 compute) and compares their next-token
distributions position by position:

* ``kl``: mean over positions of KL(reference || quantized) in nats — how much
  probability mass the quantized model moves; 0 for identical models;
* ``kl_max`` and ``kl_p99``: the worst / 99th-percentile position;
* ``top1_agreement``: fraction of positions where both models' most likely next token
  is the same;
* ``nll_reference`` / ``nll_quantized`` (and ``ppl_*``): mean negative log-likelihood of
  the sample's actual next tokens under each model.

The models are loaded one after the other (the reference's log-probabilities are kept,
then it is freed), so peak memory is one model plus ``tokens x vocab`` floats. For the
full 196B model the bf16 reference does not fit a Mac; compare recipes against the
``q8`` conversion instead (its own KL to bf16 is small), or run on the demo model.
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np

DEFAULT_TEXT = (
    "The quick brown fox jumps over the lazy dog. In 1905 Albert Einstein published four papers that "
    "changed physics: on the photoelectric effect, Brownian motion, special relativity and the equivalence "
    "of mass and energy. def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n\nQuestion: What is the capital of France? Answer: Paris is the capital and largest city "
    "of France, on the Seine river. 12 * 13 = 156, and the square root of 144 is 12."
)


def _tokenize(folder: Path, text: str) -> list[int]:
    if not (folder / "tokenizer.json").exists() and not (folder / "tokenizer.model").exists():
        raise FileNotFoundError(f"{folder} has no tokenizer files; pass token ids instead of text")
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    return list(load_tokenizer(folder).encode(text))


def _log_probs(folder: Path, tokens: list[int], window: int) -> np.ndarray:
    import mlx.core as mx

    from ..loader import load_model

    model = load_model(folder, dtype=mx.float32)
    out = []
    for start in range(0, len(tokens), window):
        chunk = mx.array(tokens[start: start + window])[None]
        logits = model(chunk)[0].astype(mx.float32)
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        mx.eval(lp)
        out.append(np.array(lp))
    del model
    gc.collect()
    mx.clear_cache()
    return np.concatenate(out, axis=0)


def quant_eval(
    quantized_dir: str | Path,
    reference_dir: str | Path,
    text: str | None = None,
    tokens: list[int] | None = None,
    *,
    max_tokens: int = 512,
    window: int | None = None,
) -> dict:
    """Compare ``quantized_dir`` with ``reference_dir`` on ``tokens`` (or ``text``, tokenized
    with the quantized folder's tokenizer). ``window`` splits long samples into independent
    segments (default: ``max_tokens``). Returns the metrics described in the module docstring."""
    qdir, rdir = Path(quantized_dir), Path(reference_dir)
    for d in (qdir, rdir):
        if not d.is_dir():
            raise FileNotFoundError(f"folder not found: {d}")
    if tokens is None:
        tokens = _tokenize(qdir if (qdir / "tokenizer.json").exists() else rdir, text if text is not None else DEFAULT_TEXT)
    tokens = [int(t) for t in tokens][:max_tokens]
    if len(tokens) < 2:
        raise ValueError("need at least 2 tokens to compare next-token predictions")
    window = window or max_tokens
    ref = _log_probs(rdir, tokens, window)
    q = _log_probs(qdir, tokens, window)
    if ref.shape != q.shape:
        raise ValueError(f"vocabularies differ: reference {ref.shape[-1]}, quantized {q.shape[-1]}")
    p = np.exp(ref)
    kl = np.sum(p * (ref - q), axis=-1)
    kl = np.maximum(kl, 0.0)
    top1 = ref.argmax(-1) == q.argmax(-1)
    nxt = np.array(tokens[1:])
    rows = np.arange(len(tokens) - 1)
    # positions whose next token lies in another window are still valid teacher-forced predictions
    nll_ref = float(-ref[rows, nxt].mean())
    nll_q = float(-q[rows, nxt].mean())
    return {
        "kl": float(kl.mean()),
        "kl_p99": float(np.percentile(kl, 99)),
        "kl_max": float(kl.max()),
        "top1_agreement": float(top1.mean()),
        "nll_reference": nll_ref,
        "nll_quantized": nll_q,
        "ppl_reference": float(np.exp(nll_ref)),
        "ppl_quantized": float(np.exp(nll_q)),
        "num_tokens": len(tokens),
    }
