"""The ASGI app: an OpenAI- and Anthropic-compatible HTTP server for one loaded model (``step35-mlx serve``).

Endpoints: ``/health``; OpenAI ``/v1/models``, ``/v1/models/{id}``, ``/v1/chat/completions``,
``/v1/completions`` (with ``echo``/``logprobs``), ``/v1/responses`` (in :mod:`.responses`); Anthropic
``/v1/messages``, ``/v1/messages/count_tokens``; vLLM's ``/tokenizer_info``, ``/tokenize``, ``/detokenize``
(in :mod:`.tokenize`, for lm-evaluation-harness). Stop strings apply to the answer only; thinking budgets
and the OpenAI effort mapping live in :mod:`step35_mlx.thinking`; ``max_tokens`` past the context is
clamped (finish ``"length"``).

One model instance serves one generation at a time. Requests wait in a bounded queue
(``max_queue`` waiting besides the one running; more get 429). All model work runs on
one worker thread and streams back through an asyncio queue. A client that goes away
stops its generation after the current token; the generator is closed, so the cache
rolls back to a consistent prefix.

Chat requests go through one :class:`~step35_mlx.session.ChatSession`: each request
replaces its history with the request's messages (``generate_for``), so a client that
resends the conversation with one more turn reuses the cached prefix and prefills only
the new tokens. The count is returned in the ``x-prefill-tokens`` header (and, for
OpenAI, ``usage.prompt_tokens_details.cached_tokens``; Anthropic, ``usage.cache_read_input_tokens``).
With ``prefix_cache`` (a :class:`~step35_mlx.prefix_cache.PrefixCache`) every request of every
client also reuses the prefixes cached by earlier requests, in RAM or on disk.

Errors come back as JSON in each API's own shape: OpenAI
``{"error": {"message", "type", "param", "code"}}``, Anthropic
``{"type": "error", "error": {"type", "message"}}``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..generate import GenerationChunk, check_prompt_ids, encode_prompt
from ..request_limits import DEFAULT_MAX_BODY_BYTES, RequestRejected, parse_json_body, read_body
from ..vision.files import has_vision
from ..vision.inputs import prepare as prepare_images
from .constrain import request_constraint
from .engine import ClientGone, Engine, drain, first_chunk
from .errors import APIError, as_api_error, error_response, log, validation_error
from .images import NO_VISION, ImagePolicy, ImageReader
from .messages import anthropic_messages, anthropic_tools, openai_messages, select_tools
from .reply import Reply, anthropic_usage, call_id, collect, sse
from .responses import add_responses_routes
from .schemas import AnthCountRequest, AnthRequest, OAIChatRequest, OAICompletionRequest
from .logprobs import chat_logprobs, completion_logprobs, implicit_bos, prompt_list, reply_ids
from .thinking import anthropic_request_thinking, openai_reasoning_budget
from .tokenize import add_tokenize_routes


def create_app(model: Any, tokenizer: Any, *, model_name: str = "step-3.5-flash", api_key: str | None = None,
               max_queue: int = 8, generation_config: dict | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, channel: Any = None, prefix_cache: Any = None,
               images: ImagePolicy | None = None, **defaults: Any) -> FastAPI:
    """The ASGI app serving ``model``; ``defaults`` are ChatSession sampling defaults (``max_context``, ``mtp``...).

    ``channel``: a ``distributed.serving.JobChannel`` when the model is split across ranks.
    ``images``: which pictures requests may carry (default: data URLs / base64 when the model has
    a vision tower, none otherwise).

    Request bodies over ``max_body_bytes`` get 413 before they are read whole.
    """
    engine = Engine(model, tokenizer, max_queue=max_queue, generation_config=generation_config, defaults=defaults,
                    channel=channel, prefix_cache=prefix_cache)
    policy = images or ImagePolicy(enabled=has_vision(model))
    if policy.enabled and not has_vision(model):
        raise ValueError(NO_VISION)
    app = FastAPI(title="step35-mlx", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(request, e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return error_response(request, APIError(e.status_code, str(e.detail)))

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, e: ClientGone):
        return JSONResponse({}, status_code=499)

    @app.exception_handler(Exception)
    async def _any_error(request: Request, e: Exception):
        log.error("request failed", exc_info=(type(e), e, e.__traceback__))
        return error_response(request, APIError(500, "internal error (logged by the server)", kind="server_error"))

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = given or auth[7:].strip()
        if given != api_key:
            raise APIError(401, "missing or invalid API key" if given else "missing API key: send "
                           "'Authorization: Bearer KEY' or 'x-api-key: KEY'", kind="authentication_error",
                           code="invalid_api_key")

    async def parse(request: Request, schema: type[BaseModel]) -> Any:
        check_key(request)
        try:
            data = parse_json_body(await read_body(request, max_body_bytes))
        except RequestRejected as e:
            raise APIError(e.status, e.message, kind="request_too_large" if e.status == 413 else "invalid_request_error") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            raise validation_error(e) from None

    def headers(first: GenerationChunk) -> dict:
        st = first.stats
        return {"x-prefill-tokens": str(st.prefill_tokens), "x-prompt-tokens": str(st.prompt_tokens)}

    @app.get("/health")
    async def health():
        out = {"status": "ok", "model": model_name, "busy": engine.inflight > 0,
               "queued": max(0, engine.inflight - 1), "max_queue": engine.max_queue}
        if prefix_cache is not None:
            out["prefix_cache"] = dataclasses.asdict(prefix_cache.usage())
        return out

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "step35-mlx"}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model_by_id(model_id: str, request: Request):
        check_key(request)
        if model_id != model_name:
            raise APIError(404, f"the model {model_id!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        return model_card()

    # ------------------------------------------------------------ OpenAI chat

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: OAIChatRequest = await parse(request, OAIChatRequest)
        messages = await run_in_threadpool(openai_messages, req.messages, ImageReader(policy))
        tools = select_tools(req.tools, req.tool_choice, anthropic=False)
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        settings = dict(max_tokens=req.max_completion_tokens or req.max_tokens, temperature=req.temperature,
                        top_p=req.top_p, top_k=req.top_k, seed=req.seed, stop=stops or None, clamp_max_tokens=True,
                        reasoning_budget=openai_reasoning_budget(req.reasoning_effort),
                        constraint=request_constraint(req.response_format, tools, req.tool_choice,
                                                      req.parallel_tool_calls))
        run = engine.chat(messages, tools, settings)
        first = await first_chunk(run, request)
        rid, now = call_id("chatcmpl-"), int(time.time())
        reply = Reply(engine, stops)

        async def logprobs(r: Reply) -> dict | None:
            """Chat logprobs of every generated token (reasoning included), scored after the reply."""
            if not req.logprobs:
                return None
            ids = list(tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True))
            gen = reply_ids(tokenizer, r.token_ids, "".join(r.text), engine.eos_ids(), r.stop_sequence is not None)
            return chat_logprobs(tokenizer, await engine.score(ids + gen, req.top_logprobs or 0, len(ids)), len(ids))

        if not req.stream:
            done = await collect(run, first, reply, request, lambda r: r)
            if not isinstance(done, Reply):
                return done  # the client went away
            return JSONResponse(_oai_chat_body(done, rid, now, await logprobs(done)), headers=headers(first))
        usage = bool((req.stream_options or {}).get("include_usage"))

        def chunk(delta: dict, finish: str | None = None, lp: dict | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            if lp is not None:
                choice["logprobs"] = lp
            return sse({"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                         "choices": [choice]})

        async def events() -> AsyncIterator[bytes]:
            yield chunk({"role": "assistant", "content": ""})
            async for c in drain(run, first):
                shown = reply.add(c)
                if c.reasoning:
                    yield chunk({"reasoning_content": c.reasoning})
                if shown:
                    yield chunk({"content": shown})
                for k, call in enumerate(c.tool_calls):
                    i = len(reply.tool_calls) - len(c.tool_calls) + k
                    yield chunk({"tool_calls": [{"index": i, "id": call_id("call_"), "type": "function",
                                                 "function": {"name": call.name,
                                                              "arguments": json.dumps(call.arguments,
                                                                                      ensure_ascii=False)}}]})
            yield chunk({}, reply.openai_finish(), await logprobs(reply))  # logprobs come whole, at the end
            if usage:
                yield sse({"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                            "choices": [], "usage": reply.openai_usage()})
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers(first))

    def _oai_chat_body(r: Reply, rid: str, now: int, logprobs: dict | None = None) -> dict:
        msg: dict[str, Any] = {"role": "assistant", "content": "".join(r.content),
                               "reasoning_content": "".join(r.reasoning) or None}
        if r.tool_calls:
            msg["tool_calls"] = [{"id": call_id("call_"), "type": "function",
                                  "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
                                 for c in r.tool_calls]
        return {"id": rid, "object": "chat.completion", "created": now, "model": model_name,
                "choices": [{"index": 0, "message": msg, "finish_reason": r.openai_finish(), "logprobs": logprobs}],
                "usage": r.openai_usage()}

    # ------------------------------------------------------------ OpenAI completions

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: OAICompletionRequest = await parse(request, OAICompletionRequest)
        prompts = prompt_list(req.prompt)
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        request_constraint(req.response_format, None, None)  # a bad format (or no grammar engine): 400 here
        settings = dict(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                        seed=req.seed, stop=stops or None, clamp_max_tokens=True, response_format=req.response_format)
        rid, now = call_id("cmpl-"), int(time.time())
        if len(prompts) > 1 or req.echo or req.logprobs is not None or req.max_tokens == 0:
            if req.stream:
                raise APIError(400, "stream: not supported with echo, logprobs, max_tokens 0 or several prompts",
                               param="stream")
            return await scored_completions(request, req, prompts, settings, stops, rid, now)
        run = engine.complete(prompts[0], settings)
        first = await first_chunk(run, request)
        reply = Reply(engine, stops)

        def body(r: Reply) -> JSONResponse:
            return JSONResponse({"id": rid, "object": "text_completion", "created": now, "model": model_name,
                                 "choices": [{"index": 0, "text": "".join(r.text), "finish_reason": r.finish,
                                              "logprobs": None}],
                                 "usage": r.openai_usage()}, headers=headers(first))

        if not req.stream:
            return await collect(run, first, reply, request, body)
        usage = bool((req.stream_options or {}).get("include_usage"))

        async def events() -> AsyncIterator[bytes]:
            async for c in drain(run, first):
                reply.add(c)
                yield sse({"id": rid, "object": "text_completion", "created": now, "model": model_name,
                            "choices": [{"index": 0, "text": c.text, "finish_reason": c.finish_reason,
                                         "logprobs": None}]})
            if usage:
                yield sse({"id": rid, "object": "text_completion", "created": now, "model": model_name,
                            "choices": [], "usage": reply.openai_usage()})
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers(first))

    async def scored_completions(request: Request, req: OAICompletionRequest, prompts: list, settings: dict,
                                 stops: list[str], rid: str, now: int) -> Any:
        """Completions with ``echo``, ``logprobs``, token-id prompts or several prompts: one choice per prompt."""
        choices, n_prompt, n_gen = [], 0, 0
        for index, p in enumerate(prompts):
            try:
                ids = encode_prompt(tokenizer, p)
                check_prompt_ids(ids, model.config.vocab_size)
            except (ValueError, TypeError) as e:
                raise APIError(400, f"prompt: {e}", param="prompt") from None
            text, gen, finish = "", [], "length"
            if req.max_tokens != 0:
                run = engine.complete(ids, settings)
                first = await first_chunk(run, request)
                reply = await collect(run, first, Reply(engine, stops), request, lambda r: r)
                if not isinstance(reply, Reply):
                    return reply  # the client went away
                text, finish = "".join(reply.text), reply.finish
                gen = reply_ids(tokenizer, reply.token_ids, text, engine.eos_ids(), reply.stop_sequence is not None)
                n_gen += reply.completion_tokens
            elif not 0 < len(ids) < engine.session.context_limit:
                raise APIError(400, f"prompt: {len(ids)} tokens do not fit the context", param="prompt")
            n_prompt += len(ids)
            prompt_text = p if isinstance(p, str) else tokenizer.decode(ids, skip_special_tokens=False)
            shown = prompt_text if req.echo else ""
            logprobs = None
            if req.logprobs is not None:
                since = implicit_bos(tokenizer, p, ids) if req.echo else len(ids)  # first token shown
                scored = await engine.score(ids + gen, req.logprobs, max(1, since))
                logprobs = completion_logprobs(tokenizer, scored, since, 0 if req.echo else len(prompt_text))
            choices.append({"index": index, "text": shown + text, "finish_reason": finish, "logprobs": logprobs})
        return {"id": rid, "object": "text_completion", "created": now, "model": model_name, "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}}

    # ------------------------------------------------------------ Anthropic messages

    @app.post("/v1/messages")
    async def messages(request: Request):
        req: AnthRequest = await parse(request, AnthRequest)
        msgs = await run_in_threadpool(anthropic_messages, req, ImageReader(policy))
        tools = select_tools(anthropic_tools(req.tools), req.tool_choice, anthropic=True)
        stops = list(req.stop_sequences or [])
        thinking = anthropic_request_thinking(req.thinking)
        settings = dict(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                        stop=stops or None, clamp_max_tokens=True, reasoning_budget=thinking.budget,
                        constraint=request_constraint(None, tools, req.tool_choice))
        run = engine.chat(msgs, tools, settings)
        first = await first_chunk(run, request)
        mid = call_id("msg_")
        reply = Reply(engine, stops)

        def body(r: Reply) -> JSONResponse:
            content: list[dict] = []
            if thinking.show and "".join(r.reasoning):
                content.append({"type": "thinking", "thinking": "".join(r.reasoning), "signature": ""})
            if "".join(r.content):
                content.append({"type": "text", "text": "".join(r.content)})
            for c in r.tool_calls:
                content.append({"type": "tool_use", "id": call_id("toolu_"), "name": c.name, "input": c.arguments})
            return JSONResponse({"id": mid, "type": "message", "role": "assistant", "model": model_name,
                                 "content": content, "stop_reason": r.anthropic_stop(),
                                 "stop_sequence": r.stop_sequence,
                                 "usage": r.anthropic_usage()},
                                headers=headers(first))

        if not req.stream:
            return await collect(run, first, reply, request, body)

        async def events() -> AsyncIterator[bytes]:
            yield sse({"type": "message_start", "message": {
                "id": mid, "type": "message", "role": "assistant", "model": model_name, "content": [],
                "stop_reason": None, "stop_sequence": None,
                "usage": anthropic_usage(first.stats, 0)}}, "message_start")
            index, open_kind = -1, None

            def start(kind: str, block: dict) -> list[bytes]:
                nonlocal index, open_kind
                out = stop_block()
                index += 1
                open_kind = kind
                out.append(sse({"type": "content_block_start", "index": index, "content_block": block},
                                "content_block_start"))
                return out

            def stop_block() -> list[bytes]:
                nonlocal open_kind
                if open_kind is None:
                    return []
                open_kind = None
                return [sse({"type": "content_block_stop", "index": index}, "content_block_stop")]

            def delta(d: dict) -> bytes:
                return sse({"type": "content_block_delta", "index": index, "delta": d}, "content_block_delta")

            async for c in drain(run, first):
                shown = reply.add(c)
                if c.reasoning and thinking.show:
                    if open_kind != "thinking":
                        for b in start("thinking", {"type": "thinking", "thinking": "", "signature": ""}):
                            yield b
                    yield delta({"type": "thinking_delta", "thinking": c.reasoning})
                if shown:
                    if open_kind != "text":
                        for b in start("text", {"type": "text", "text": ""}):
                            yield b
                    yield delta({"type": "text_delta", "text": shown})
                for call in c.tool_calls:
                    for b in start("tool_use", {"type": "tool_use", "id": call_id("toolu_"), "name": call.name,
                                                "input": {}}):
                        yield b
                    yield delta({"type": "input_json_delta",
                                 "partial_json": json.dumps(call.arguments, ensure_ascii=False)})
            for b in stop_block():
                yield b
            yield sse({"type": "message_delta",
                        "delta": {"stop_reason": reply.anthropic_stop(), "stop_sequence": reply.stop_sequence},
                        "usage": reply.anthropic_usage()},
                       "message_delta")
            yield sse({"type": "message_stop"}, "message_stop")

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers(first))

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request):
        req: AnthCountRequest = await parse(request, AnthCountRequest)
        msgs = await run_in_threadpool(anthropic_messages, req, ImageReader(policy))
        tools = select_tools(anthropic_tools(req.tools), req.tool_choice, anthropic=True)
        try:
            ids = list(tokenizer.apply_chat_template(msgs, tools=tools, add_generation_prompt=True))
            prepared = prepare_images(model, tokenizer, msgs, ids)
        except Exception as e:  # noqa: BLE001 - a template error is the request's fault
            raise as_api_error(e if isinstance(e, (ValueError, TypeError)) else ValueError(str(e))) from None
        return {"input_tokens": len(prepared.ids)}

    add_responses_routes(app, engine, parse=parse, headers=headers, model_name=model_name)
    add_tokenize_routes(app, tokenizer, vocab_size=model.config.vocab_size,
                        context_limit=engine.session.context_limit, parse=parse, check_key=check_key)
    return app
