"""An OpenAI- and Anthropic-compatible HTTP server for one loaded model (``step35-mlx serve``).

Endpoints: ``/health``; OpenAI ``/v1/models``, ``/v1/chat/completions``,
``/v1/completions``; Anthropic ``/v1/messages``.

One model instance serves one generation at a time. Requests wait in a bounded queue
(``max_queue`` waiting besides the one running; more get 429). All model work runs on
one worker thread and streams back through an asyncio queue. A client that goes away
stops its generation after the current token; the generator is closed, so the cache
rolls back to a consistent prefix.

Chat requests go through one :class:`~step35_mlx.session.ChatSession`: each request
replaces its history with the request's messages (``generate_for``), so a client that
resends the conversation with one more turn reuses the cached prefix and prefills only
the new tokens. The count is returned in the ``x-prefill-tokens`` header (and, for
OpenAI, ``usage.prompt_tokens_details.cached_tokens``).

Errors come back as JSON in each API's own shape: OpenAI
``{"error": {"message", "type", "param", "code"}}``, Anthropic
``{"type": "error", "error": {"type", "message"}}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable, Iterator, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .generate import GenerationChunk, stream_generate
from .request_limits import DEFAULT_MAX_BODY_BYTES, RequestRejected, parse_json_body, read_body
from .session import ChatSession

log = logging.getLogger("step35_mlx.server")

ANTHROPIC_PATHS = ("/v1/messages", "/v1/messages/count_tokens")


# ---------------------------------------------------------------- errors


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


_ANTHROPIC_KIND = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                   500: "api_error", 503: "overloaded_error"}
_OPENAI_KIND = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


def _is_anthropic(request: Request) -> bool:
    return request.url.path.rstrip("/") in ANTHROPIC_PATHS


def error_response(request: Request, err: APIError) -> JSONResponse:
    if _is_anthropic(request):
        kind = err.kind if err.kind in _ANTHROPIC_KIND.values() else _ANTHROPIC_KIND.get(err.status, "api_error")
        body: dict = {"type": "error", "error": {"type": kind, "message": err.message}}
    else:
        kind = err.kind if err.kind in _OPENAI_KIND.values() else _OPENAI_KIND.get(err.status, "server_error")
        body = {"error": {"message": err.message, "type": kind, "param": err.param, "code": err.code}}
    return JSONResponse(body, status_code=err.status)


def _validation_error(e: ValidationError) -> APIError:
    first = e.errors()[0] if e.errors() else {}
    loc = ".".join(str(p) for p in first.get("loc", ()))
    msg = first.get("msg", "invalid request")
    return APIError(400, f"{loc}: {msg}" if loc else msg, param=loc or None)


# ---------------------------------------------------------------- request models


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


class OAIFunction(_Loose):
    name: str
    arguments: Union[str, dict, None] = None


class OAIToolCall(_Loose):
    id: Optional[str] = None
    type: str = "function"
    function: OAIFunction


class OAIMessage(_Loose):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[dict], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[OAIToolCall]] = None
    tool_call_id: Optional[str] = None
    reasoning_content: Optional[str] = None


class _OAIRequest(_Loose):
    """Fields the OpenAI chat and completions requests share."""

    model: Optional[str] = None
    stream: bool = False
    stream_options: Optional[dict] = None
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    n: Optional[int] = Field(None, ge=1, le=1)


class OAIChatRequest(_OAIRequest):
    messages: list[OAIMessage] = Field(min_length=1)
    tools: Optional[list[dict]] = None
    tool_choice: Union[str, dict, None] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)


class OAICompletionRequest(_OAIRequest):
    prompt: Union[str, list[str]]
    max_tokens: Optional[int] = Field(16, ge=1)


class AnthMessage(_Loose):
    role: Literal["user", "assistant"]
    content: Union[str, list[dict]]


class AnthTool(_Loose):
    name: str
    description: Optional[str] = None
    input_schema: Optional[dict] = None


class AnthCountRequest(_Loose):
    model: str
    messages: list[AnthMessage] = Field(min_length=1)
    system: Union[str, list[dict], None] = None
    tools: Optional[list["AnthTool"]] = None
    tool_choice: Optional[dict] = None


class AnthRequest(_Loose):
    model: str
    max_tokens: int = Field(ge=1)
    messages: list[AnthMessage] = Field(min_length=1)
    system: Union[str, list[dict], None] = None
    tools: Optional[list[AnthTool]] = None
    tool_choice: Optional[dict] = None
    stream: bool = False
    stop_sequences: Optional[list[str]] = None
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)


# ---------------------------------------------------------------- message mapping


def _text_of(content: Any, where: str) -> str:
    """Text of a content value: a string, or a list of text parts/blocks (others are refused)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if not isinstance(block, dict):
            raise APIError(400, f"{where}: content parts must be objects", param=where)
        kind = block.get("type")
        if kind in ("text", "input_text", "output_text"):
            text = block.get("text")
            if not isinstance(text, str):
                raise APIError(400, f"{where}: a text part needs a string 'text'", param=where)
            parts.append(text)
        else:
            raise APIError(400, f"{where}: content of type {kind!r} is not supported (text only)", param=where)
    return "".join(parts)


def _arguments(raw: Any, where: str) -> dict:
    if raw is None or raw == "":
        return {}
    if isinstance(raw, dict):
        return raw
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, TypeError):
        raise APIError(400, f"{where}: function arguments must be a JSON object", param=where) from None
    if not isinstance(value, dict):
        raise APIError(400, f"{where}: function arguments must be a JSON object", param=where)
    return value


def openai_messages(messages: list[OAIMessage]) -> list[dict]:
    """OpenAI chat messages -> the chat template's messages (tool results carry the tool's name)."""
    out: list[dict] = []
    names: dict[str, str] = {}
    for i, m in enumerate(messages):
        where = f"messages.{i}"
        role = "system" if m.role == "developer" else m.role
        msg: dict[str, Any] = {"role": role, "content": _text_of(m.content, f"{where}.content")}
        if role == "assistant":
            if m.reasoning_content:
                msg["reasoning_content"] = m.reasoning_content
            if m.tool_calls:
                calls = []
                for j, c in enumerate(m.tool_calls):
                    if c.id:
                        names[c.id] = c.function.name
                    calls.append({"type": "function", "function": {
                        "name": c.function.name,
                        "arguments": _arguments(c.function.arguments, f"{where}.tool_calls.{j}.function.arguments")}})
                msg["tool_calls"] = calls
        elif role == "tool":
            msg["name"] = m.name or names.get(m.tool_call_id or "", "")
        out.append(msg)
    return out


def anthropic_tools(tools: list[AnthTool] | None) -> list[dict] | None:
    if not tools:
        return None
    return [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                              "parameters": t.input_schema or {"type": "object", "properties": {}}}}
            for t in tools]


def anthropic_messages(req: Any) -> list[dict]:
    """Anthropic system + messages -> the chat template's messages."""
    out: list[dict] = []
    if req.system:
        out.append({"role": "system", "content": _text_of(req.system, "system")})
    names: dict[str, str] = {}
    for i, m in enumerate(req.messages):
        where = f"messages.{i}.content"
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        text: list[str] = []
        thinking: list[str] = []
        calls: list[dict] = []
        results: list[dict] = []
        for j, b in enumerate(m.content):
            if not isinstance(b, dict):
                raise APIError(400, f"{where}.{j}: content blocks must be objects", param=f"{where}.{j}")
            kind = b.get("type")
            if kind == "text":
                if not isinstance(b.get("text"), str):
                    raise APIError(400, f"{where}.{j}.text: must be a string", param=f"{where}.{j}.text")
                text.append(b["text"])
            elif kind == "thinking" and m.role == "assistant":
                thinking.append(str(b.get("thinking") or ""))
            elif kind == "redacted_thinking" and m.role == "assistant":
                continue
            elif kind == "tool_use" and m.role == "assistant":
                name, args = b.get("name"), b.get("input", {})
                if not isinstance(name, str) or not isinstance(args, dict):
                    raise APIError(400, f"{where}.{j}: tool_use needs a string 'name' and an object 'input'",
                                   param=f"{where}.{j}")
                if isinstance(b.get("id"), str):
                    names[b["id"]] = name
                calls.append({"type": "function", "function": {"name": name, "arguments": args}})
            elif kind == "tool_result" and m.role == "user":
                content = b.get("content")
                body = _text_of(content if isinstance(content, (str, list)) or content is None else str(content),
                                f"{where}.{j}.content")
                if b.get("is_error"):
                    body = f"Error: {body}"
                results.append({"role": "tool", "name": names.get(str(b.get("tool_use_id")), ""), "content": body})
            else:
                raise APIError(400, f"{where}.{j}: block type {kind!r} is not supported in a {m.role} message",
                               param=f"{where}.{j}")
        if m.role == "assistant":
            msg: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
            if thinking:
                msg["reasoning_content"] = "".join(thinking)
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
        else:
            out.extend(results)
            if text or not results:
                out.append({"role": "user", "content": "".join(text)})
    return out


def _select_tools(tools: list[dict] | None, choice: Any, anthropic: bool) -> list[dict] | None:
    """Apply ``tool_choice``: none disables tools; a named tool keeps only that one; auto/required/any keep all."""
    if not tools:
        return None
    if anthropic:
        kind = (choice or {}).get("type", "auto")
        if kind == "none":
            return None
        if kind == "tool":
            keep = [t for t in tools if t["function"]["name"] == choice.get("name")]
            if not keep:
                raise APIError(400, f"tool_choice names an unknown tool {choice.get('name')!r}", param="tool_choice")
            return keep
        if kind not in ("auto", "any"):
            raise APIError(400, f"tool_choice.type {kind!r} is not one of auto, any, tool, none", param="tool_choice")
        return tools
    if choice is None or choice in ("auto", "required"):
        return tools
    if choice == "none":
        return None
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        keep = [t for t in tools if (t.get("function", t) or {}).get("name") == name]
        if not keep:
            raise APIError(400, f"tool_choice names an unknown function {name!r}", param="tool_choice")
        return keep
    raise APIError(400, f"tool_choice {choice!r} is not one of none, auto, required or a named function",
                   param="tool_choice")


# ---------------------------------------------------------------- the engine


class ClientGone(Exception):
    pass


_END = object()


class Run:
    """One generation on the worker thread; events come back through an asyncio queue."""

    def __init__(self, engine: "Engine", start: Callable[[], Iterator[GenerationChunk]]) -> None:
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.start = start
        self.done = False

    def _post(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is gone (server shutting down)
            pass

    def work(self) -> None:
        try:
            if self.cancelled.is_set():
                return
            gen = self.start()
            if self.engine.channel is not None:  # several ranks: stop where rank 0 stops
                from .distributed.serving import consume

                return consume(gen, self.engine.channel, self._post, self.cancelled.is_set)
            try:
                for chunk in gen:
                    self._post(chunk)
                    if chunk.finish_reason is not None or self.cancelled.is_set():
                        break
            finally:
                gen.close()  # an unfinished reply: the session settles its cache to a consistent prefix
        except BaseException as e:  # noqa: BLE001 - every failure goes back to the request
            self._post(e)
        finally:
            self._post(_END)
            try:
                self.loop.call_soon_threadsafe(self.engine._release)
            except RuntimeError:
                pass

    def cancel(self) -> None:
        self.cancelled.set()

    async def next(self, request: Request | None = None) -> Any:
        """The next chunk, an exception, or ``_END``; with ``request``, checks for a disconnect meanwhile."""
        while True:
            try:
                if request is None:
                    return await self.queue.get()
                return await asyncio.wait_for(self.queue.get(), 0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.cancel()
                    raise ClientGone() from None


class Engine:
    def __init__(self, model: Any, tokenizer: Any, *, max_queue: int, generation_config: dict | None,
                 defaults: dict, channel: Any = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.channel = channel  # distributed.serving.JobChannel when the model is split across ranks
        self.session = ChatSession(model, tokenizer, generation_config=generation_config, **defaults)
        self.generation_config = generation_config
        self.defaults = defaults
        self.max_queue = max_queue
        self.inflight = 0  # accepted requests not finished (one running, the rest waiting)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="step35-generate")
        self.served = 0

    def close(self) -> None:
        """Stop the worker thread (after the generation in progress, if any), and the other ranks."""
        if self.channel is not None:
            self.executor.submit(self.channel.share_job, {"kind": "exit"}).result()
        self.executor.shutdown(wait=True, cancel_futures=True)

    def _release(self) -> None:
        self.inflight -= 1

    def eos_ids(self) -> frozenset[int]:
        return self.session.settings().eos_ids

    def submit(self, start: Callable[[], Iterator[GenerationChunk]]) -> Run:
        if self.inflight > self.max_queue:
            raise APIError(429, f"the server is busy: {self.inflight - 1} requests are waiting "
                                f"(the queue holds {self.max_queue}); retry later", kind="rate_limit_error")
        run = Run(self, start)
        self.inflight += 1
        self.served += 1
        self.executor.submit(run.work)
        return run

    def chat(self, messages: list[dict], tools: list[dict] | None, settings: dict) -> Run:
        return self._job({"kind": "chat", "messages": messages, "tools": tools, "settings": settings})

    def complete(self, prompt: str, settings: dict) -> Run:
        return self._job({"kind": "complete", "prompt": prompt, "settings": settings})

    def start_completion(self, prompt: str, settings: dict) -> Iterator[GenerationChunk]:
        kw = {**self.defaults, **{k: v for k, v in settings.items() if v is not None}}
        return stream_generate(self.model, self.tokenizer, prompt, generation_config=self.generation_config, **kw)

    def _job(self, job: dict) -> Run:
        from .distributed.serving import run_job

        def start() -> Iterator[GenerationChunk]:
            if self.channel is not None:  # on the worker thread, so the ranks see jobs in order
                self.channel.share_job(job)
            return run_job(self, job)

        return self.submit(start)


def _as_api_error(e: BaseException) -> APIError:
    """Our ``ValueError`` messages and template errors are the request's fault and say what to fix;
    anything else is logged here and answered without its internal text."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ValueError) or type(e).__module__.startswith("jinja2"):
        return APIError(400, str(e))
    log.error("request failed", exc_info=(type(e), e, e.__traceback__))
    if isinstance(e, TypeError):
        return APIError(400, "the request holds a value of a type the server cannot use")
    return APIError(500, "generation failed with an internal error (logged by the server)", kind="server_error")


async def _first(run: Run, request: Request) -> GenerationChunk:
    """Wait for the first chunk (errors such as a prompt over the context surface here, before any response)."""
    try:
        item = await run.next(request)
    except ClientGone:
        raise
    except BaseException:
        run.cancel()
        raise
    if item is _END:
        raise APIError(500, "generation ended without output", kind="server_error")
    if isinstance(item, BaseException):
        raise _as_api_error(item)
    return item


# ---------------------------------------------------------------- reply accumulation


class Reply:
    """Everything a response needs from a chunk stream: texts, tool calls, finish reason, counts."""

    def __init__(self, engine: Engine, stops: list[str]) -> None:
        self.engine = engine
        self.stops = stops
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.text: list[str] = []
        self.tool_calls: list = []
        self.token_ids: list[int] = []
        self.finish: str | None = None
        self.stats = None
        self.stop_sequence: str | None = None

    def add(self, c: GenerationChunk) -> None:
        self.reasoning.append(c.reasoning)
        self.content.append(c.content)
        self.text.append(c.text)
        self.tool_calls += c.tool_calls
        self.token_ids += c.token_ids
        self.stats = c.stats
        if c.finish_reason is not None:
            self.finish = c.finish_reason
            if c.finish_reason == "stop" and self.stops and c.token_ids and c.token_ids[-1] not in self.engine.eos_ids():
                self.stop_sequence = self._which_stop()

    def _which_stop(self) -> str | None:
        shown = len("".join(self.text))
        full = self.engine.tokenizer.decode(self.token_ids, skip_special_tokens=False)
        hits = [(full.find(s, max(0, shown - len(s))), s) for s in self.stops]
        hits = [h for h in hits if h[0] >= 0]
        return min(hits)[1] if hits else self.stops[0]

    @property
    def prompt_tokens(self) -> int:
        return self.stats.prompt_tokens if self.stats else 0

    @property
    def completion_tokens(self) -> int:
        return self.stats.generation_tokens if self.stats else 0

    @property
    def cached_tokens(self) -> int:
        return (self.stats.prompt_tokens - self.stats.prefill_tokens) if self.stats else 0

    def openai_finish(self) -> str | None:
        if self.tool_calls:
            return "tool_calls"
        return self.finish

    def anthropic_stop(self) -> str:
        if self.tool_calls:
            return "tool_use"
        if self.finish == "length":
            return "max_tokens"
        if self.stop_sequence is not None:
            return "stop_sequence"
        return "end_turn"

    def openai_usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


def _call_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


def _sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    body = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"{head}data: {body}\n\n".encode()


# ---------------------------------------------------------------- the app


def create_app(model: Any, tokenizer: Any, *, model_name: str = "step-3.5-flash", api_key: str | None = None,
               max_queue: int = 8, generation_config: dict | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, channel: Any = None, **defaults: Any) -> FastAPI:
    """The ASGI app serving ``model``; ``defaults`` are ChatSession sampling defaults (``max_context``, ``mtp``...).

    Request bodies over ``max_body_bytes`` get 413 before they are read whole.
    """
    engine = Engine(model, tokenizer, max_queue=max_queue, generation_config=generation_config, defaults=defaults,
                    channel=channel)
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
            raise _validation_error(e) from None

    def headers(first: GenerationChunk) -> dict:
        st = first.stats
        return {"x-prefill-tokens": str(st.prefill_tokens), "x-prompt-tokens": str(st.prompt_tokens)}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "busy": engine.inflight > 0,
                "queued": max(0, engine.inflight - 1), "max_queue": engine.max_queue}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "step35-mlx"}]}

    # ------------------------------------------------------------ OpenAI chat

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: OAIChatRequest = await parse(request, OAIChatRequest)
        messages = openai_messages(req.messages)
        tools = _select_tools(req.tools, req.tool_choice, anthropic=False)
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        settings = dict(max_tokens=req.max_completion_tokens or req.max_tokens, temperature=req.temperature,
                        top_p=req.top_p, top_k=req.top_k, seed=req.seed, stop=stops or None)
        run = engine.chat(messages, tools, settings)
        first = await _first(run, request)
        rid, now = _call_id("chatcmpl-"), int(time.time())
        reply = Reply(engine, stops)
        if not req.stream:
            return await _collect(run, first, reply, request, lambda r: JSONResponse(_oai_chat_body(r, rid, now),
                                                                                      headers=headers(first)))
        usage = bool((req.stream_options or {}).get("include_usage"))

        def chunk(delta: dict, finish: str | None = None) -> bytes:
            return _sse({"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

        async def events() -> AsyncIterator[bytes]:
            yield chunk({"role": "assistant", "content": ""})
            async for c in _drain(run, first):
                reply.add(c)
                if c.reasoning:
                    yield chunk({"reasoning_content": c.reasoning})
                if c.content:
                    yield chunk({"content": c.content})
                for k, call in enumerate(c.tool_calls):
                    i = len(reply.tool_calls) - len(c.tool_calls) + k
                    yield chunk({"tool_calls": [{"index": i, "id": _call_id("call_"), "type": "function",
                                                 "function": {"name": call.name,
                                                              "arguments": json.dumps(call.arguments,
                                                                                      ensure_ascii=False)}}]})
            yield chunk({}, reply.openai_finish())
            if usage:
                yield _sse({"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                            "choices": [], "usage": reply.openai_usage()})
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers(first))

    def _oai_chat_body(r: Reply, rid: str, now: int) -> dict:
        msg: dict[str, Any] = {"role": "assistant", "content": "".join(r.content),
                               "reasoning_content": "".join(r.reasoning) or None}
        if r.tool_calls:
            msg["tool_calls"] = [{"id": _call_id("call_"), "type": "function",
                                  "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
                                 for c in r.tool_calls]
        return {"id": rid, "object": "chat.completion", "created": now, "model": model_name,
                "choices": [{"index": 0, "message": msg, "finish_reason": r.openai_finish(), "logprobs": None}],
                "usage": r.openai_usage()}

    # ------------------------------------------------------------ OpenAI completions

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: OAICompletionRequest = await parse(request, OAICompletionRequest)
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "prompt: exactly one prompt string is supported", param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise APIError(400, "prompt: must not be empty", param="prompt")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        settings = dict(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                        seed=req.seed, stop=stops or None)
        run = engine.complete(prompt, settings)
        first = await _first(run, request)
        rid, now = _call_id("cmpl-"), int(time.time())
        reply = Reply(engine, stops)

        def body(r: Reply) -> JSONResponse:
            return JSONResponse({"id": rid, "object": "text_completion", "created": now, "model": model_name,
                                 "choices": [{"index": 0, "text": "".join(r.text), "finish_reason": r.finish,
                                              "logprobs": None}],
                                 "usage": r.openai_usage()}, headers=headers(first))

        if not req.stream:
            return await _collect(run, first, reply, request, body)
        usage = bool((req.stream_options or {}).get("include_usage"))

        async def events() -> AsyncIterator[bytes]:
            async for c in _drain(run, first):
                reply.add(c)
                yield _sse({"id": rid, "object": "text_completion", "created": now, "model": model_name,
                            "choices": [{"index": 0, "text": c.text, "finish_reason": c.finish_reason,
                                         "logprobs": None}]})
            if usage:
                yield _sse({"id": rid, "object": "text_completion", "created": now, "model": model_name,
                            "choices": [], "usage": reply.openai_usage()})
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers(first))

    # ------------------------------------------------------------ Anthropic messages

    @app.post("/v1/messages")
    async def messages(request: Request):
        req: AnthRequest = await parse(request, AnthRequest)
        msgs = anthropic_messages(req)
        tools = _select_tools(anthropic_tools(req.tools), req.tool_choice, anthropic=True)
        stops = list(req.stop_sequences or [])
        settings = dict(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                        stop=stops or None)
        run = engine.chat(msgs, tools, settings)
        first = await _first(run, request)
        mid = _call_id("msg_")
        reply = Reply(engine, stops)

        def body(r: Reply) -> JSONResponse:
            content: list[dict] = []
            if "".join(r.reasoning):
                content.append({"type": "thinking", "thinking": "".join(r.reasoning), "signature": ""})
            if "".join(r.content):
                content.append({"type": "text", "text": "".join(r.content)})
            for c in r.tool_calls:
                content.append({"type": "tool_use", "id": _call_id("toolu_"), "name": c.name, "input": c.arguments})
            return JSONResponse({"id": mid, "type": "message", "role": "assistant", "model": model_name,
                                 "content": content, "stop_reason": r.anthropic_stop(),
                                 "stop_sequence": r.stop_sequence,
                                 "usage": {"input_tokens": r.prompt_tokens, "output_tokens": r.completion_tokens}},
                                headers=headers(first))

        if not req.stream:
            return await _collect(run, first, reply, request, body)

        async def events() -> AsyncIterator[bytes]:
            yield _sse({"type": "message_start", "message": {
                "id": mid, "type": "message", "role": "assistant", "model": model_name, "content": [],
                "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": first.stats.prompt_tokens, "output_tokens": 0}}}, "message_start")
            index, open_kind = -1, None

            def start(kind: str, block: dict) -> list[bytes]:
                nonlocal index, open_kind
                out = stop_block()
                index += 1
                open_kind = kind
                out.append(_sse({"type": "content_block_start", "index": index, "content_block": block},
                                "content_block_start"))
                return out

            def stop_block() -> list[bytes]:
                nonlocal open_kind
                if open_kind is None:
                    return []
                open_kind = None
                return [_sse({"type": "content_block_stop", "index": index}, "content_block_stop")]

            def delta(d: dict) -> bytes:
                return _sse({"type": "content_block_delta", "index": index, "delta": d}, "content_block_delta")

            async for c in _drain(run, first):
                reply.add(c)
                if c.reasoning:
                    if open_kind != "thinking":
                        for b in start("thinking", {"type": "thinking", "thinking": "", "signature": ""}):
                            yield b
                    yield delta({"type": "thinking_delta", "thinking": c.reasoning})
                if c.content:
                    if open_kind != "text":
                        for b in start("text", {"type": "text", "text": ""}):
                            yield b
                    yield delta({"type": "text_delta", "text": c.content})
                for call in c.tool_calls:
                    for b in start("tool_use", {"type": "tool_use", "id": _call_id("toolu_"), "name": call.name,
                                                "input": {}}):
                        yield b
                    yield delta({"type": "input_json_delta",
                                 "partial_json": json.dumps(call.arguments, ensure_ascii=False)})
            for b in stop_block():
                yield b
            yield _sse({"type": "message_delta",
                        "delta": {"stop_reason": reply.anthropic_stop(), "stop_sequence": reply.stop_sequence},
                        "usage": {"input_tokens": reply.prompt_tokens, "output_tokens": reply.completion_tokens}},
                       "message_delta")
            yield _sse({"type": "message_stop"}, "message_stop")

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers(first))

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request):
        req: AnthCountRequest = await parse(request, AnthCountRequest)
        msgs = anthropic_messages(req)
        tools = _select_tools(anthropic_tools(req.tools), req.tool_choice, anthropic=True)
        try:
            ids = tokenizer.apply_chat_template(msgs, tools=tools, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - a template error is the request's fault
            raise _as_api_error(e if isinstance(e, (ValueError, TypeError)) else ValueError(str(e))) from None
        return {"input_tokens": len(ids)}

    return app


async def _drain(run: Run, first: GenerationChunk) -> AsyncIterator[GenerationChunk]:
    """The chunks of a streaming response; a disconnect (cancellation) or early exit stops the generation."""
    try:
        yield first
        if first.finish_reason is not None:
            return
        while True:
            item = await run.next()
            if item is _END:
                return
            if isinstance(item, BaseException):
                return  # the response has started: end the stream (the chunks so far stand)
            yield item
            if item.finish_reason is not None:
                return
    finally:
        run.cancel()


async def _collect(run: Run, first: GenerationChunk, reply: Reply, request: Request,
                   build: Callable[[Reply], JSONResponse]) -> JSONResponse:
    """Gather a whole reply for a non-streaming response (a disconnect stops the generation)."""
    try:
        reply.add(first)
        item: Any = first
        while item.finish_reason is None:
            item = await run.next(request)
            if item is _END:
                break
            if isinstance(item, BaseException):
                raise _as_api_error(item)
            reply.add(item)
    except ClientGone:
        return JSONResponse({}, status_code=499)
    finally:
        run.cancel()
    return build(reply)
