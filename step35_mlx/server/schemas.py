"""Request bodies of the OpenAI and Anthropic endpoints (pydantic; unknown fields are allowed)."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


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
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Union[str, list[dict], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[OAIToolCall]] = None
    function_call: Optional[OAIFunction] = None  # legacy: one call of an assistant message
    tool_call_id: Optional[str] = None
    reasoning_content: Optional[str] = None


class _OAIRequest(_Loose):
    """Fields the OpenAI chat and completions requests share."""

    model: Optional[str] = None
    stream: Optional[bool] = False  # null is false
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
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[dict] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    reasoning_effort: Optional[str] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)


class OAICompletionRequest(_OAIRequest):
    prompt: Union[str, list]  # a string, token ids, or a list of either (checked by server.logprobs.prompt_list)
    max_tokens: Optional[int] = Field(16, ge=0)  # 0: score the prompt only (with echo)
    echo: Optional[bool] = None
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    response_format: Optional[dict] = None


class AnthMessage(_Loose):
    role: Literal["user", "assistant", "system"]  # system entries are merged into the system prompt
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
    stream: Optional[bool] = False
    thinking: Optional[dict] = None
    stop_sequences: Optional[list[str]] = None
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
