"""vLLM's tokenizer endpoints: ``GET /tokenizer_info``, ``POST /tokenize``, ``POST /detokenize``.

lm-evaluation-harness's ``local-completions`` counts context tokens with them when both
``/tokenizer_info`` and ``/tokenize`` answer (its default ``tokenizer_backend=auto`` picks
``remote``), so the machine running lm-eval needs no copy of the model folder.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from fastapi import FastAPI, Request
from pydantic import Field

from ..generate import check_prompt_ids, encode_prompt
from ..text import check_text
from .errors import APIError
from .schemas import _Loose


class TokenizeRequest(_Loose):
    model: Optional[str] = None
    prompt: str
    add_special_tokens: bool = True  # the server's text rule (bos first); false: the text's own tokens


class DetokenizeRequest(_Loose):
    model: Optional[str] = None
    tokens: list[int] = Field(min_length=1)


def add_tokenize_routes(app: FastAPI, tokenizer: Any, *, vocab_size: int, context_limit: int, parse: Callable,
                        check_key: Callable[[Request], None]) -> None:
    """Register the three routes on ``app`` (the API key applies as on every other route)."""

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request):
        check_key(request)
        return {"tokenizer_class": type(getattr(tokenizer, "_tokenizer", tokenizer)).__name__,
                "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token,
                "chat_template": getattr(tokenizer, "chat_template", None), "model_max_length": context_limit}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req: TokenizeRequest = await parse(request, TokenizeRequest)
        try:
            check_text(req.prompt)
        except ValueError as e:
            raise APIError(400, f"prompt: {e}", param="prompt") from None
        ids = encode_prompt(tokenizer, req.prompt) if req.add_special_tokens else \
            list(tokenizer.encode(req.prompt, add_special_tokens=False))
        return {"tokens": ids, "count": len(ids), "max_model_len": context_limit}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req: DetokenizeRequest = await parse(request, DetokenizeRequest)
        try:
            check_prompt_ids(req.tokens, vocab_size)
        except ValueError as e:
            raise APIError(400, f"tokens: {e}", param="tokens") from None
        return {"prompt": tokenizer.decode(req.tokens, skip_special_tokens=False)}
