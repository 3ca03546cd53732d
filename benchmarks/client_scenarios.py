"""The four scenarios (chat, stream, structured, tool) written against each third-party client's own API.

Each scenario takes the server's root URL and returns a short detail string, or raises: ``ModelWeakness``
when the toy demo model (not the server) is the reason, anything else is a failure. Every client is
imported inside its functions, so a missing one only skips its rows.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, Field

# litellm fetches its price list from GitHub at import unless told to use its bundled copy: loopback only here
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

KEY = "matrix-key"
MODEL = "step-demo"
PROMPT = "Say hello in one sentence."
ASK_PET = "Describe a pet as JSON: its kind and its age."
ASK_WEATHER = "What is the weather in Paris? Use the tool."
MAX_TOKENS = 80
TEMPERATURE = 0.0  # greedy: the demo model's answers are the same on every run


def client_settings() -> dict:
    """The sampling options every client sends (read at call time: ``--temperature`` changes them)."""
    return {"max_tokens": MAX_TOKENS, "temperature": TEMPERATURE}


class ModelWeakness(Exception):
    """The demo model's answer, not the server, made the scenario fail (it is a 9M-parameter toy)."""


class Pet(BaseModel):
    kind: Literal["cat", "dog"]
    age: int = Field(ge=0, le=30)


class ToolLog:
    """A ``get_weather`` tool that records its calls, so a round trip can be checked end to end."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def get_weather(self, city: Annotated[str, Field(max_length=24)]) -> str:
        """Current weather in a city."""
        self.calls.append(city)
        return f"Sunny in {city}, 21 C"


WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}}, "required": ["city"]}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.",
                                                 "parameters": WEATHER_SCHEMA}}


def need_text(text: object, what: str = "answer") -> str:
    if text is None or text == []:  # litellm's / LangChain's content of an Anthropic reply with no content blocks
        raise ModelWeakness(f"empty {what} ({text!r})")
    if not isinstance(text, str):
        raise AssertionError(f"{what} is {type(text).__name__}, not text: {text!r:.80}")
    if not text.strip():
        raise ModelWeakness(f"empty {what}")
    return f"{len(text)} chars"


def cut(truncated: bool) -> None:
    """A reply the token limit cut (the demo model still reasoning) is the model's, not a failure."""
    if truncated:
        raise ModelWeakness(f"reply cut at max_tokens ({MAX_TOKENS})")


def need_calls(log: ToolLog) -> None:
    if not log.calls:
        raise AssertionError("the tool was never called")
    if not all(isinstance(c, str) for c in log.calls):
        raise AssertionError(f"tool arguments {log.calls!r}")


@dataclass(frozen=True)
class Case:
    client: str     # the row label: client and API style
    package: str    # the distribution whose version is reported
    module: str     # imported to decide whether the row runs
    endpoint: str
    scenarios: dict[str, Callable[[str], str]]


# ---------------------------------------------------------------- litellm

def _litellm_kwargs(base: str, provider: str) -> dict:
    url = base + "/v1" if provider == "openai" else base
    return dict(model=f"{provider}/{MODEL}", api_base=url, api_key=KEY, max_tokens=MAX_TOKENS,
                temperature=TEMPERATURE)


def litellm_case(provider: str) -> Case:
    def chat(base: str) -> str:
        import litellm
        litellm.suppress_debug_info = True  # its "Provider List" banner on stdout for a model it has no price for
        r = litellm.completion(messages=[{"role": "user", "content": PROMPT}], **_litellm_kwargs(base, provider))
        if not r.usage or not r.usage.completion_tokens:
            raise AssertionError(f"usage {r.usage!r}")
        return need_text(r.choices[0].message.content)

    def stream(base: str) -> str:
        import litellm
        chunks = list(litellm.completion(messages=[{"role": "user", "content": PROMPT}], stream=True,
                                         stream_options={"include_usage": True}, **_litellm_kwargs(base, provider)))
        usage = [c.usage for c in chunks if getattr(c, "usage", None)]
        if not usage or not usage[-1].completion_tokens:
            raise AssertionError(f"no streamed usage ({len(chunks)} chunks)")
        return need_text("".join(c.choices[0].delta.content or "" for c in chunks if c.choices), "streamed answer")

    def structured(base: str) -> str:
        import litellm
        r = litellm.completion(messages=[{"role": "user", "content": ASK_PET}], response_format=Pet,
                               **_litellm_kwargs(base, provider))
        return repr(Pet.model_validate_json(r.choices[0].message.content))

    def tool(base: str) -> str:
        import json

        import litellm
        log = ToolLog()
        kw = _litellm_kwargs(base, provider)
        msgs = [{"role": "user", "content": ASK_WEATHER}]
        r = litellm.completion(messages=msgs, tools=[WEATHER_TOOL], **kw,
                               tool_choice={"type": "function", "function": {"name": "get_weather"}})
        msg = r.choices[0].message
        if not msg.tool_calls:
            cut(r.choices[0].finish_reason == "length")
            raise AssertionError(f"no tool call (finish_reason {r.choices[0].finish_reason})")
        msgs.append(msg.model_dump(exclude_none=True))
        for call in msg.tool_calls:
            result = log.get_weather(**json.loads(call.function.arguments))
            msgs.append({"role": "tool", "tool_call_id": call.id, "content": result})
        need_calls(log)
        final = litellm.completion(messages=msgs, tools=[WEATHER_TOOL], tool_choice="none", **kw)
        return need_text(final.choices[0].message.content, "final answer")

    endpoint = "/v1/chat/completions" if provider == "openai" else "/v1/messages"
    return Case(f"litellm {provider}/", "litellm", "litellm", endpoint,
                dict(chat=chat, stream=stream, structured=structured, tool=tool))


# ---------------------------------------------------------------- LangChain

def _langchain_model(base: str, style: str):
    if style == "anthropic":
        from langchain_anthropic import ChatAnthropic
        return ChatAnthropic(model=MODEL, base_url=base, api_key=KEY, max_tokens=MAX_TOKENS, max_retries=0,
                             temperature=TEMPERATURE)
    from langchain_openai import ChatOpenAI
    return ChatOpenAI(model=MODEL, base_url=base + "/v1", api_key=KEY, max_tokens=MAX_TOKENS, max_retries=0,
                      temperature=TEMPERATURE, use_responses_api=style == "responses", stream_usage=True)


def langchain_case(style: str) -> Case:
    def chat(base: str) -> str:
        m = _langchain_model(base, style).invoke(PROMPT)
        if not m.usage_metadata or not m.usage_metadata.get("output_tokens"):
            raise AssertionError(f"usage_metadata {m.usage_metadata!r}")
        return need_text(m.text if style == "responses" else m.content)

    def stream(base: str) -> str:
        chunks = list(_langchain_model(base, style).stream(PROMPT))
        whole = sum(chunks[1:], chunks[0])
        if not whole.usage_metadata or not whole.usage_metadata.get("output_tokens"):
            raise AssertionError(f"streamed usage_metadata {whole.usage_metadata!r}")
        return need_text(whole.text, "streamed answer") + f", {len(chunks)} chunks"

    def structured(base: str) -> str:
        pet = _langchain_model(base, style).with_structured_output(Pet).invoke(ASK_PET)
        if not isinstance(pet, Pet):
            raise AssertionError(f"got {pet!r:.80}")
        return repr(pet)

    def tool(base: str) -> str:
        from langchain_core.messages import HumanMessage
        from langchain_core.tools import tool as make_tool
        log = ToolLog()
        weather = make_tool(log.get_weather)
        model = _langchain_model(base, style)
        msgs = [HumanMessage(ASK_WEATHER)]
        ai = model.bind_tools([weather], tool_choice="get_weather").invoke(msgs)
        if not ai.tool_calls:
            meta = ai.response_metadata
            cut(meta.get("finish_reason") == "length" or meta.get("stop_reason") == "max_tokens"
                or meta.get("status") == "incomplete")
            raise AssertionError(f"no tool call: {ai.content!r:.80}")
        msgs.append(ai)
        msgs += [weather.invoke(call) for call in ai.tool_calls]
        need_calls(log)
        final = model.bind_tools([weather]).invoke(msgs)
        return need_text(final.text, "final answer")

    label, endpoint, module, package = {
        "chat": ("LangChain ChatOpenAI", "/v1/chat/completions", "langchain_openai", "langchain-openai"),
        "responses": ("LangChain ChatOpenAI responses", "/v1/responses", "langchain_openai", "langchain-openai"),
        "anthropic": ("LangChain ChatAnthropic", "/v1/messages", "langchain_anthropic", "langchain-anthropic"),
    }[style]
    return Case(label, package, module, endpoint, dict(chat=chat, stream=stream, structured=structured, tool=tool))


# ---------------------------------------------------------------- openai-agents

def _agents_model(base: str, style: str, client=None):
    from agents import OpenAIChatCompletionsModel, OpenAIResponsesModel, set_tracing_disabled
    from openai import AsyncOpenAI
    set_tracing_disabled(True)
    client = client or AsyncOpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
    cls = OpenAIResponsesModel if style == "responses" else OpenAIChatCompletionsModel
    return cls(model=MODEL, openai_client=client)


def _agents_cut(fn: Callable[[str], str]) -> Callable[[str], str]:
    """openai-agents raises on a reply cut at the token limit (the demo model reasoning on): a model row."""
    def run(base: str) -> str:
        from agents.exceptions import ModelBehaviorError
        try:
            return fn(base)
        except ModelBehaviorError as e:
            if "max_output_tokens" in str(e) or "finish_reason='length'" in str(e):
                raise ModelWeakness("reply cut at max_output_tokens") from e
            raise
    return run


def agents_case(style: str) -> Case:
    def agent(base: str, client=None, **kw):
        from agents import Agent, ModelSettings
        # include_usage: streamed Chat Completions usage needs it off api.openai.com (the client's default there)
        settings = kw.pop("settings", {})
        return Agent(name="matrix", instructions="You are terse.", model=_agents_model(base, style, client),
                     model_settings=ModelSettings(**client_settings(), include_usage=True, **settings), **kw)

    def chat(base: str) -> str:
        from agents import Runner
        r = Runner.run_sync(agent(base), PROMPT)
        if not r.context_wrapper.usage.output_tokens:
            raise AssertionError(f"usage {r.context_wrapper.usage!r}")
        return need_text(r.final_output)

    def stream(base: str) -> str:
        from agents import Runner
        from openai import AsyncOpenAI
        from openai.types.responses import ResponseTextDeltaEvent

        async def run() -> str:
            async with AsyncOpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0) as client:
                r = Runner.run_streamed(agent(base, client), PROMPT)
                deltas = [e.data.delta async for e in r.stream_events()
                          if e.type == "raw_response_event" and isinstance(e.data, ResponseTextDeltaEvent)]
            if not r.context_wrapper.usage.output_tokens:
                raise AssertionError(f"streamed usage {r.context_wrapper.usage!r}")
            if "".join(deltas) != r.final_output:
                raise AssertionError(f"deltas {''.join(deltas)!r:.60} != final {r.final_output!r:.60}")
            return "".join(deltas)
        return need_text(asyncio.run(run()))

    def structured(base: str) -> str:
        from agents import Runner
        pet = Runner.run_sync(agent(base, output_type=Pet), ASK_PET).final_output
        if not isinstance(pet, Pet):
            raise AssertionError(f"got {pet!r:.80}")
        return repr(pet)

    def tool(base: str) -> str:
        from agents import Runner, function_tool
        log = ToolLog()
        r = Runner.run_sync(agent(base, tools=[function_tool(log.get_weather)],
                                  settings=dict(tool_choice="get_weather")), ASK_WEATHER)
        need_calls(log)
        return need_text(r.final_output, "final answer")

    label = "openai-agents " + ("OpenAIResponsesModel" if style == "responses" else "OpenAIChatCompletionsModel")
    endpoint = "/v1/responses" if style == "responses" else "/v1/chat/completions"
    scenarios = dict(chat=chat, stream=stream, structured=structured, tool=tool)
    return Case(label, "openai-agents", "agents", endpoint, {k: _agents_cut(f) for k, f in scenarios.items()})


# ---------------------------------------------------------------- pydantic-ai

def _pydantic_model(base: str, style: str):
    if style == "anthropic":
        from pydantic_ai.models.anthropic import AnthropicModel
        from pydantic_ai.providers.anthropic import AnthropicProvider
        return AnthropicModel(MODEL, provider=AnthropicProvider(base_url=base, api_key=KEY))
    from pydantic_ai.models.openai import OpenAIChatModel, OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider
    cls = OpenAIResponsesModel if style == "responses" else OpenAIChatModel
    return cls(MODEL, provider=OpenAIProvider(base_url=base + "/v1", api_key=KEY))


def _pydantic_cut(fn: Callable[[str], str]) -> Callable[[str], str]:
    """pydantic-ai raises ``OutputTokenLimitExceeded`` on a reply cut at ``max_tokens``: a model row."""
    def run(base: str) -> str:
        from pydantic_ai.exceptions import OutputTokenLimitExceeded
        try:
            return fn(base)
        except OutputTokenLimitExceeded as e:
            raise ModelWeakness(f"reply cut at max_tokens ({MAX_TOKENS})") from e
    return run


def pydantic_case(style: str) -> Case:
    def agent(base: str, **kw):
        from pydantic_ai import Agent
        return Agent(_pydantic_model(base, style), model_settings=kw.pop("settings", client_settings()), **kw)

    def chat(base: str) -> str:
        r = agent(base).run_sync(PROMPT)
        if not r.usage.output_tokens:
            raise AssertionError(f"usage {r.usage!r}")
        return need_text(r.output)

    def stream(base: str) -> str:
        async def run() -> str:
            async with agent(base).run_stream(PROMPT) as r:
                text = "".join([d async for d in r.stream_text(delta=True)])
            if not r.usage.output_tokens:
                raise AssertionError(f"streamed usage {r.usage!r}")
            return text
        return need_text(asyncio.run(run()))

    def structured(base: str) -> str:
        pet = agent(base, output_type=Pet).run_sync(ASK_PET).output
        if not isinstance(pet, Pet):
            raise AssertionError(f"got {pet!r:.80}")
        return repr(pet)

    def tool(base: str) -> str:
        log = ToolLog()
        # the first request must call the tool; later ones may answer (a plain list would force every step)
        first = ["get_weather"]
        a = agent(base, settings=lambda ctx: {**client_settings(),
                                              "tool_choice": first if ctx.run_step <= 1 else "auto"})
        a.tool_plain(log.get_weather)
        r = a.run_sync(ASK_WEATHER)
        need_calls(log)
        return need_text(r.output, "final answer")

    label, endpoint = {"responses": ("pydantic-ai OpenAIResponsesModel", "/v1/responses"),
                       "chat": ("pydantic-ai OpenAIChatModel", "/v1/chat/completions"),
                       "anthropic": ("pydantic-ai AnthropicModel", "/v1/messages")}[style]
    scenarios = dict(chat=chat, stream=stream, structured=structured, tool=tool)
    return Case(label, "pydantic-ai-slim", "pydantic_ai", endpoint, {k: _pydantic_cut(f) for k, f in scenarios.items()})


# ---------------------------------------------------------------- llm

def _llm_model(base: str, style: str):
    from llm.default_plugins.openai_models import Chat, Responses
    cls = Responses if style == "responses" else Chat
    return cls(MODEL, key=KEY, api_base=base + "/v1", supports_schema=True, supports_tools=True)


def llm_case(style: str) -> Case:
    def chat(base: str) -> str:
        r = _llm_model(base, style).prompt(PROMPT, stream=False, **client_settings())
        text = r.text()
        if not r.usage().output:
            raise AssertionError(f"usage {r.usage()!r}")
        return need_text(text)

    def stream(base: str) -> str:
        return need_text("".join(_llm_model(base, style).prompt(PROMPT, **client_settings())))

    def structured(base: str) -> str:
        r = _llm_model(base, style).prompt(ASK_PET, schema=Pet, stream=False, **client_settings())
        return repr(Pet.model_validate_json(r.text()))

    def tool(base: str) -> str:
        log = ToolLog()
        r = _llm_model(base, style).chain(ASK_WEATHER, tools=[log.get_weather], stream=False, options=client_settings())
        text = r.text()
        if not log.calls:
            raise ModelWeakness("llm cannot force a tool call and the demo model chose not to call it")
        return need_text(text, "final answer")

    label = "llm " + ("Responses" if style == "responses" else "Chat")
    endpoint = "/v1/responses" if style == "responses" else "/v1/chat/completions"
    return Case(label, "llm", "llm", endpoint, dict(chat=chat, stream=stream, structured=structured, tool=tool))


def all_cases() -> list[Case]:
    return [litellm_case("openai"), litellm_case("anthropic"),
            langchain_case("chat"), langchain_case("responses"), langchain_case("anthropic"),
            agents_case("responses"), agents_case("chat"),
            pydantic_case("responses"), pydantic_case("chat"), pydantic_case("anthropic"),
            llm_case("chat"), llm_case("responses")]
