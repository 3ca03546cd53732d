"""Map OpenAI and Anthropic messages, tools and tool choices onto the chat template's message dicts."""

from __future__ import annotations

import json
import re
from typing import Any

from .errors import APIError
from .images import ImageReader
from .schemas import AnthTool, OAIMessage


def _text_of(content: Any, where: str) -> str:
    """Text of a content value: a string, or a list of text parts/blocks (others are refused)."""
    return str(_content_of(content, where, None))


def _content_of(content: Any, where: str, images: ImageReader | None) -> str | list[dict]:
    """A content value as the template takes it: a string, or (with images) a list of text and image parts.

    Image parts (OpenAI ``image_url``) are read through ``images``; without a reader they are refused.
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts: list[dict] = []
    for j, block in enumerate(content):
        if not isinstance(block, dict):
            raise APIError(400, f"{where}: content parts must be objects", param=where)
        kind = block.get("type")
        if kind in ("text", "input_text", "output_text"):
            text = block.get("text")
            if not isinstance(text, str):
                raise APIError(400, f"{where}: a text part needs a string 'text'", param=where)
            parts.append({"type": "text", "text": text})
        elif kind == "image_url" and images is not None:
            parts.append({"type": "image", "image": images.openai(block, f"{where}.{j}")})
        else:
            raise APIError(400, f"{where}: content of type {kind!r} is not supported "
                                f"({'text and image_url' if images is not None else 'text only'})", param=where)
    if any(p["type"] == "image" for p in parts):
        return parts
    return "".join(p["text"] for p in parts)


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


def openai_messages(messages: list[OAIMessage], images: ImageReader | None = None) -> list[dict]:
    """OpenAI chat messages -> the chat template's messages (tool results carry the tool's name).

    User messages may hold ``image_url`` parts, read through ``images``.
    """
    out: list[dict] = []
    names: dict[str, str] = {}
    for i, m in enumerate(messages):
        where = f"messages.{i}"
        role = {"developer": "system", "function": "tool"}.get(m.role, m.role)
        reader = images if role == "user" else None
        msg: dict[str, Any] = {"role": role, "content": _content_of(m.content, f"{where}.content", reader)}
        if role == "assistant":
            if m.reasoning_content:
                msg["reasoning_content"] = m.reasoning_content
            calls = []
            for j, c in enumerate(m.tool_calls or []):
                if c.id:
                    names[c.id] = c.function.name
                calls.append({"type": "function", "function": {
                    "name": c.function.name,
                    "arguments": _arguments(c.function.arguments, f"{where}.tool_calls.{j}.function.arguments")}})
            if m.function_call is not None:  # the legacy single call
                calls.append({"type": "function", "function": {
                    "name": m.function_call.name,
                    "arguments": _arguments(m.function_call.arguments, f"{where}.function_call.arguments")}})
            if calls:
                msg["tool_calls"] = calls
        elif role == "tool":  # a "function" message names its function itself
            msg["name"] = m.name or names.get(m.tool_call_id or "", "")
        out.append(msg)
    return out


def anthropic_tools(tools: list[AnthTool] | None) -> list[dict] | None:
    if not tools:
        return None
    return [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                              "parameters": t.input_schema or {"type": "object", "properties": {}}}}
            for t in tools]


def anthropic_messages(req: Any, images: ImageReader | None = None) -> list[dict]:
    """Anthropic system + messages -> the chat template's messages; user ``image`` blocks read through ``images``.

    ``role: "system"`` entries inside ``messages`` (Claude Code sends them) join the
    ``system`` prompt, in order, separated by a blank line; the template gets one system message.
    """
    out: list[dict] = []
    system = [_text_of(req.system, "system")] if req.system else []
    for i, m in enumerate(req.messages):
        if m.role == "system":
            system.append(_text_of(m.content, f"messages.{i}.content"))
    system = [s for s in system if s]
    if system:
        out.append({"role": "system", "content": "\n\n".join(system)})
    names: dict[str, str] = {}
    for i, m in enumerate(req.messages):
        where = f"messages.{i}.content"
        if m.role == "system":
            continue
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        text: list[str] = []
        parts: list[dict] = []  # text and images of a user message, in order
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
                parts.append({"type": "text", "text": b["text"]})
            elif kind == "image" and m.role == "user" and images is not None:
                parts.append({"type": "image", "image": images.anthropic(b, f"{where}.{j}")})
            elif kind == "document":
                text.append(_document_text(b, f"{where}.{j}"))
                parts.append({"type": "text", "text": text[-1]})
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
            if any(p["type"] == "image" for p in parts):
                out.append({"role": "user", "content": parts})
            elif text or not results:
                out.append({"role": "user", "content": "".join(text)})
    return out


def _document_text(block: dict, where: str) -> str:
    """The text of an Anthropic ``document`` block: a plain-text source, or a content list of text blocks."""
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "text" and isinstance(source.get("data"), str):
        return source["data"]
    if kind == "content":
        return _text_of(source.get("content"), f"{where}.source.content")
    raise APIError(400, f"{where}: only text documents are supported (source type 'text' or 'content'), "
                        f"got {kind!r}", param=where)


def check_tool_names(tools: list[dict]) -> None:
    """Refuse names the model's tool-call syntax cannot carry (``<function=NAME>``, ``<parameter=KEY>``):
    empty, or holding ``<``, ``>`` or a line break, or a name given twice."""
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        fn = tool.get("function", tool) or {}
        name = fn.get("name")
        where = f"tools[{i}]"
        if not isinstance(name, str) or not name.strip() or _BAD_NAME.search(name) or len(name) > 256:
            raise APIError(400, f"{where}: tool name {name!r} must be 1-256 characters without '<', '>' or line "
                                "breaks", param="tools")
        if name in seen:
            raise APIError(400, f"{where}: two tools are named {name!r}", param="tools")
        seen.add(name)
        params = fn.get("parameters")
        props = params.get("properties") if isinstance(params, dict) else None
        for key in props if isinstance(props, dict) else ():
            if not key.strip() or _BAD_NAME.search(key):
                raise APIError(400, f"{where}: parameter name {key!r} of tool {name!r} must be non-empty, without "
                                    "'<', '>' or line breaks", param="tools")


_BAD_NAME = re.compile(r"[<>\r\n]")


def select_tools(tools: list[dict] | None, choice: Any, anthropic: bool) -> list[dict] | None:
    """Apply ``tool_choice``: none disables tools; a named tool keeps only that one; auto/required/any keep all."""
    if not tools:
        return None
    check_tool_names(tools)
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
