"""OpenAI Responses API: ``POST /v1/responses`` (what Codex CLI, openai-agents and the AI SDK speak).

A request's ``input`` (a string, or items: messages, ``reasoning``, ``function_call``,
``function_call_output``) is turned into OpenAI chat messages and mapped by
:func:`~step35_mlx.server.messages.openai_messages`, so it runs through the same
:class:`~step35_mlx.server.engine.Engine` (and prefix cache) as ``/v1/chat/completions``.
The reply becomes output items: a ``reasoning`` item (the model's reasoning as its
summary), a ``message`` with ``output_text``, then one ``function_call`` per tool call.
Streaming sends the documented event sequence, built by the same :class:`OutputBuilder`
as the non-streaming body, so both carry the same output.

``previous_response_id`` continues a conversation the server kept (``store``, on by default):
an LRU of the last :data:`STORE_SIZE` responses, in memory. As in OpenAI's API the earlier
``instructions`` are not carried over.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from typing import Any, AsyncIterator, Callable, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import Field, ValidationError

from ..results import GenerationChunk
from ..reasoning import THINK_CLOSE
from .constrain import request_constraint
from .engine import Engine, drain, first_chunk
from .errors import APIError, validation_error
from .messages import openai_messages, select_tools
from .reply import Reply, call_id, collect, sse
from .schemas import OAIMessage, _Loose
from .thinking import openai_reasoning_budget

STORE_SIZE = 256


class RespRequest(_Loose):
    """A ``POST /v1/responses`` body (unknown fields such as ``include``, ``store``, ``metadata`` are accepted)."""

    model: Optional[str] = None
    input: Union[str, list[dict]]
    instructions: Optional[str] = None
    tools: Optional[list[dict]] = None
    tool_choice: Union[str, dict, None] = None
    parallel_tool_calls: Optional[bool] = None
    reasoning: Optional[dict] = None
    max_output_tokens: Optional[int] = Field(None, ge=1)
    stream: Optional[bool] = False
    store: Optional[bool] = True
    previous_response_id: Optional[str] = None
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    seed: Optional[int] = None
    metadata: Optional[dict] = None


class ResponseStore:
    """The conversations behind stored responses: id -> chat messages (input and reply), least recently used out."""

    def __init__(self, size: int = STORE_SIZE) -> None:
        self.size = size
        self.items: OrderedDict[str, list[dict]] = OrderedDict()

    def get(self, rid: str) -> list[dict]:
        if rid not in self.items:
            raise APIError(400, f"previous_response_id: no stored response {rid!r} (the server keeps the last "
                                f"{self.size} responses made with store: true)", param="previous_response_id",
                           code="previous_response_not_found")
        self.items.move_to_end(rid)
        return self.items[rid]

    def put(self, rid: str, conversation: list[dict]) -> None:
        self.items[rid] = conversation
        self.items.move_to_end(rid)
        while len(self.items) > self.size:
            self.items.popitem(last=False)


# ---------------------------------------------------------------- request -> chat messages


def _text(content: Any, where: str) -> Any:
    """A message's content as chat content (a string, or text parts; the mapping refuses other parts)."""
    if isinstance(content, (str, list)) or content is None:
        return content
    raise APIError(400, f"{where}: content must be a string or a list of parts", param=where)


def input_messages(items: Union[str, list[dict]]) -> list[dict]:
    """Responses ``input`` -> OpenAI chat message dicts (consecutive calls share one assistant message)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict] = []
    reasoning: list[str] = []  # a reasoning item belongs to the next assistant turn
    for i, item in enumerate(items):
        where = f"input.{i}"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise APIError(400, f"{where}.role: must be user, system, developer or assistant",
                               param=f"{where}.role")
            msg = {"role": role, "content": _text(item.get("content"), f"{where}.content")}
            if role == "assistant" and reasoning:
                msg["reasoning_content"] = "".join(reasoning)
                reasoning = []
            out.append(msg)
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            reasoning += [p.get("text", "") for p in parts if isinstance(p, dict)]
        elif kind == "function_call":
            name, args = item.get("name"), item.get("arguments", "")
            if not isinstance(name, str):
                raise APIError(400, f"{where}.name: a function_call needs a string name", param=f"{where}.name")
            call = {"id": item.get("call_id"), "type": "function", "function": {"name": name, "arguments": args}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and not reasoning:
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call],
                            **({"reasoning_content": "".join(reasoning)} if reasoning else {})})
                reasoning = []
        elif kind == "function_call_output":
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": item.get("call_id"),
                        "content": output if isinstance(output, (str, list)) else json.dumps(output)})
        else:
            raise APIError(400, f"{where}.type: input items of type {kind!r} are not supported (message, reasoning, "
                                f"function_call, function_call_output)", param=f"{where}.type")
    return out


def namespaces(tools: list[dict] | None) -> dict[str, str]:
    """Function name -> its ``namespace`` tool's name, for the functions grouped in namespaces (Codex sends some)."""
    return {f.get("name"): t.get("name") for t in tools or [] if t.get("type") == "namespace"
            for f in t.get("tools") or [] if f.get("type") == "function"}


def chat_tools(tools: list[dict] | None) -> list[dict] | None:
    """Responses function tools (flat, or grouped in ``namespace`` tools) -> chat tools.

    Hosted tools (``web_search``, ``file_search``, ``custom``...) are left out: the model sees function tools only.
    """
    flat = [f for t in tools or [] for f in (t.get("tools") or [] if t.get("type") == "namespace" else [t])]
    out = [{"type": "function", "function": {"name": t.get("name"), "description": t.get("description") or "",
                                             "parameters": t.get("parameters") or {"type": "object", "properties": {}}}}
           for t in flat if t.get("type") == "function"]
    return out or None


def chat_tool_choice(choice: Any) -> Any:
    """Responses ``tool_choice`` -> the chat form :func:`select_tools` takes."""
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    if isinstance(choice, dict):
        return "auto"  # allowed_tools / hosted-tool choices: every function tool stays available
    return choice


# ---------------------------------------------------------------- reply -> output items and events


class OutputBuilder:
    """Turns chunks into output items and the stream events that build them (sequence numbers included)."""

    def __init__(self, response: dict, namespaces: dict[str, str] | None = None) -> None:
        self.response = response
        self.namespaces = namespaces or {}
        self.output: list[dict] = response["output"]
        self.seq = 0
        self.open: dict | None = None  # the reasoning or message item being streamed
        self.pending_ws = ""  # trailing whitespace of the answer, held until real text follows
        self.raw = ""  # the raw text until ``</think>``
        self.thought = False
        self.reasoning_tokens = 0

    def event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return sse(data, kind)

    def snapshot(self, kind: str) -> bytes:
        return self.event(kind, response=self.response)

    def _add(self, item: dict) -> list[bytes]:
        self.output.append(item)
        return [self.event("response.output_item.added", output_index=len(self.output) - 1, item=_copy(item))]

    def close(self, status: str = "completed") -> list[bytes]:
        item, self.open = self.open, None
        if item is None:
            return []
        idx = len(self.output) - 1
        item["status"] = status
        if item["type"] == "reasoning":
            part = item["summary"][0]
            out = [self.event("response.reasoning_summary_text.done", item_id=item["id"], output_index=idx,
                              summary_index=0, text=part["text"]),
                   self.event("response.reasoning_summary_part.done", item_id=item["id"], output_index=idx,
                              summary_index=0, part=dict(part))]
        else:
            part = item["content"][0]
            out = [self.event("response.output_text.done", item_id=item["id"], output_index=idx, content_index=0,
                              text=part["text"], logprobs=[]),
                   self.event("response.content_part.done", item_id=item["id"], output_index=idx, content_index=0,
                              part=dict(part))]
        return out + [self.event("response.output_item.done", output_index=idx, item=_copy(item))]

    def reasoning(self, text: str) -> list[bytes]:
        out: list[bytes] = []
        if self.open is None or self.open["type"] != "reasoning":
            out += self.close()
            self.open = {"id": call_id("rs_"), "type": "reasoning", "summary": [], "status": "in_progress"}
            out += self._add(self.open)
            self.open["summary"].append({"type": "summary_text", "text": ""})
            out.append(self.event("response.reasoning_summary_part.added", item_id=self.open["id"],
                                  output_index=len(self.output) - 1, summary_index=0,
                                  part={"type": "summary_text", "text": ""}))
        self.open["summary"][0]["text"] += text
        return out + [self.event("response.reasoning_summary_text.delta", item_id=self.open["id"],
                                 output_index=len(self.output) - 1, summary_index=0, delta=text)]

    def text(self, text: str) -> list[bytes]:
        """Answer text; trailing whitespace is held back (dropped before a tool call, sent at the end otherwise)."""
        text, self.pending_ws = self.pending_ws + text, ""
        body = text.rstrip()
        self.pending_ws = text[len(body):]
        if not body:
            return []
        out: list[bytes] = []
        if self.open is None or self.open["type"] != "message":
            if self.output and self.output[-1]["type"] == "function_call":
                body = body.lstrip()
            out += self.close()
            self.open = {"id": call_id("msg_"), "type": "message", "role": "assistant", "status": "in_progress",
                         "content": []}
            out += self._add(self.open)
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            self.open["content"].append(part)
            out.append(self.event("response.content_part.added", item_id=self.open["id"],
                                  output_index=len(self.output) - 1, content_index=0, part=dict(part)))
        self.open["content"][0]["text"] += body
        return out + [self.event("response.output_text.delta", item_id=self.open["id"],
                                 output_index=len(self.output) - 1, content_index=0, delta=body, logprobs=[])]

    def call(self, name: str, arguments: dict) -> list[bytes]:
        out = self.close()
        self.pending_ws = ""  # whitespace between or around calls is not an answer
        args = json.dumps(arguments, ensure_ascii=False)
        item = {"id": call_id("fc_"), "type": "function_call", "call_id": call_id("call_"), "name": name,
                "arguments": "", "status": "in_progress"}
        if name in self.namespaces:
            item["namespace"] = self.namespaces[name]
        out += self._add(item)
        idx = len(self.output) - 1
        item["arguments"], item["status"] = args, "completed"
        return out + [self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=idx,
                                 delta=args),
                      self.event("response.function_call_arguments.done", item_id=item["id"], output_index=idx,
                                 arguments=args),
                      self.event("response.output_item.done", output_index=idx, item=_copy(item))]

    def feed(self, c: GenerationChunk) -> list[bytes]:
        """The events for one chunk (and the reasoning-token count: chunks up to the one closing ``</think>``)."""
        if not self.thought:
            self.reasoning_tokens += len(c.token_ids)
            self.raw += c.text
            self.thought = THINK_CLOSE in self.raw
        out: list[bytes] = []
        if c.reasoning:
            out += self.reasoning(c.reasoning)
        if c.content:
            out += self.text(c.content)
        for call in c.tool_calls:
            out += self.call(call.name, call.arguments)
        return out

    def finish(self, reply: Reply) -> list[bytes]:
        """Close the open item (its held-back whitespace sent) and fill in status and usage from ``reply``."""
        out: list[bytes] = []
        if self.open is not None and self.open["type"] == "message" and self.pending_ws:
            ws, self.pending_ws = self.pending_ws, ""
            self.open["content"][0]["text"] += ws
            out.append(self.event("response.output_text.delta", item_id=self.open["id"],
                                  output_index=len(self.output) - 1, content_index=0, delta=ws, logprobs=[]))
        status = "failed" if reply.finish is None else "incomplete" if reply.finish == "length" else "completed"
        out += self.close("completed" if status == "completed" else "incomplete")
        thought = any(it["type"] == "reasoning" for it in self.output)
        self.response.update(status=status, completed_at=int(time.time()),
                             incomplete_details={"reason": "max_output_tokens"} if status == "incomplete" else None,
                             usage=usage(reply, self.reasoning_tokens if thought else 0))
        if status == "failed":  # the generation broke off (the error is in the server's log)
            self.response["error"] = {"code": "server_error", "message": "the generation stopped with an error"}
        return out


def _copy(item: dict) -> dict:
    return json.loads(json.dumps(item))


def usage(reply: Reply, reasoning_tokens: int) -> dict:
    return {"input_tokens": reply.prompt_tokens,
            "input_tokens_details": {"cached_tokens": reply.cached_tokens, "cache_write_tokens": 0},
            "output_tokens": reply.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": reply.prompt_tokens + reply.completion_tokens}


def assistant_turn(output: list[dict]) -> dict:
    """The reply's output items as one chat assistant message (for the stored conversation)."""
    text = "".join(p["text"] for it in output if it["type"] == "message" for p in it["content"])
    reasoning = "".join(p["text"] for it in output if it["type"] == "reasoning" for p in it["summary"])
    msg: dict[str, Any] = {"role": "assistant", "content": text}
    if reasoning:
        msg["reasoning_content"] = reasoning
    calls = [{"id": it["call_id"], "type": "function", "function": {"name": it["name"], "arguments": it["arguments"]}}
             for it in output if it["type"] == "function_call"]
    if calls:
        msg["tool_calls"] = calls
    return msg


class _Building(Reply):
    """A reply that also builds the output items as chunks arrive (the non-streaming body: same items as a stream)."""

    def __init__(self, engine: Engine, build: OutputBuilder) -> None:
        super().__init__(engine, [])
        self.build = build

    def add(self, c: GenerationChunk) -> None:
        super().add(c)
        self.build.feed(c)


# ---------------------------------------------------------------- the route


def text_format(text: Any) -> dict | None:
    """The Responses API's ``text.format`` as a chat ``response_format`` (``None`` for plain text)."""
    fmt = text.get("format") if isinstance(text, dict) else None
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return None
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}}
    return fmt


def add_responses_routes(app: FastAPI, engine: Engine, *, parse: Callable, headers: Callable,
                         model_name: str, store_size: int = STORE_SIZE) -> ResponseStore:
    """Register ``POST /v1/responses`` on ``app``; returns the store of kept conversations."""
    store = ResponseStore(store_size)
    app.state.responses = store

    @app.post("/v1/responses")
    async def responses(request: Request):
        req: RespRequest = await parse(request, RespRequest)
        history = list(store.get(req.previous_response_id)) if req.previous_response_id else []
        conversation = history + input_messages(req.input)
        if not conversation:
            raise APIError(400, "input: must not be empty", param="input")
        system = [{"role": "system", "content": req.instructions}] if req.instructions else []
        try:
            parsed = [OAIMessage.model_validate(m) for m in system + conversation]
        except ValidationError as e:
            raise APIError(400, f"input: {validation_error(e).message}", param="input") from None
        messages = openai_messages(parsed)
        tools = select_tools(chat_tools(req.tools), chat_tool_choice(req.tool_choice), anthropic=False)
        effort = (req.reasoning or {}).get("effort") if isinstance(req.reasoning, dict) else None
        settings = dict(max_tokens=req.max_output_tokens, temperature=req.temperature, top_p=req.top_p,
                        top_k=req.top_k, seed=req.seed, clamp_max_tokens=True,
                        reasoning_budget=openai_reasoning_budget(effort),
                        constraint=request_constraint(text_format(getattr(req, "text", None)), tools,
                                                      chat_tool_choice(req.tool_choice), req.parallel_tool_calls))
        run = engine.chat(messages, tools, settings)
        first = await first_chunk(run, request)
        rid = call_id("resp_")
        response = {"id": rid, "object": "response", "created_at": int(time.time()), "status": "in_progress",
                    "model": model_name, "output": [], "instructions": req.instructions,
                    "previous_response_id": req.previous_response_id, "max_output_tokens": req.max_output_tokens,
                    "tools": req.tools or [], "tool_choice": req.tool_choice or "auto",
                    "parallel_tool_calls": req.parallel_tool_calls is not False,
                    "temperature": req.temperature, "top_p": req.top_p, "reasoning": req.reasoning,
                    "store": req.store is not False, "metadata": req.metadata or {},
                    "text": {"format": {"type": "text"}},
                    "truncation": "disabled", "incomplete_details": None, "error": None, "usage": None}
        build = OutputBuilder(response, namespaces(req.tools))

        def keep() -> None:
            if req.store is not False:
                store.put(rid, conversation + [assistant_turn(build.output)])

        if not req.stream:
            def body(r: Reply) -> JSONResponse:
                build.finish(r)
                keep()
                return JSONResponse(response, headers=headers(first))

            return await collect(run, first, _Building(engine, build), request, body)

        async def events() -> AsyncIterator[bytes]:
            reply = Reply(engine, [])
            yield build.snapshot("response.created")
            yield build.snapshot("response.in_progress")
            async for c in drain(run, first):
                reply.add(c)
                for b in build.feed(c):
                    yield b
            for b in build.finish(reply):
                yield b
            keep()
            yield build.snapshot(f"response.{response['status']}")

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers(first))

    return store
