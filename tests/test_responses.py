"""``POST /v1/responses``: the official openai client (create, stream, tool round trip, previous_response_id)
and a Codex-CLI-shaped raw body, against a live loopback server with the demo model."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

try:  # the openai client brings httpx2 (or httpx, in older releases)
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from step35_mlx.prefix_cache import PrefixCache  # noqa: E402
from step35_mlx.server import create_app  # noqa: E402
from serverkit import demo_server, live_server, openai_client  # noqa: E402
import scripted  # noqa: E402
from step35_mlx.server.errors import APIError  # noqa: E402
from step35_mlx.server.responses import ResponseStore, input_messages  # noqa: E402

generate_mod = importlib.import_module("step35_mlx.generate")

KEY = "test-key"
TOOL = {"type": "function", "name": "get_weather", "description": "Weather for a city", "strict": False,
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                       "required": ["city"]}}
CHAT_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                                "parameters": TOOL["parameters"]}}]
CALL = ("Use the tool.\n</think>\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>")
ANSWER = "Add them.\n</think>\nFour."
CODEX = json.loads((Path(__file__).parent / "data" / "codex_responses.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def server():
    with demo_server(KEY, max_queue=8) as s:
        yield s


@pytest.fixture
def oa(server):
    return openai_client(server["url"], KEY)


@pytest.fixture
def script(monkeypatch, server):
    """``script(text)``: the model 'generates' ``text`` then eos (run through the cache, so it stays exact)."""
    def use(text: str, fail: bool = False) -> list[int]:
        ids = scripted.reply_ids(server["tok"], text)
        scripted.use(monkeypatch, scripted.scripted(ids, fail_after=3 if fail else None))
        return ids

    return use


def _prompt_len(server, messages, tools=None) -> int:
    return len(server["tok"].apply_chat_template(messages, tools=tools, add_generation_prompt=True))


def _strip_ids(items: list) -> list:
    return [{k: v for k, v in it.model_dump().items() if k not in ("id", "call_id")} for it in items]


def _sse(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


# ---------------------------------------------------------------- the demo model, real generation


def test_create_text_equals_chat_completions(server, oa):
    r = oa.responses.create(model="m", instructions="Be brief.", input="What is 2+2?", max_output_tokens=8,
                            temperature=0)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    chat = oa.chat.completions.create(model="m", messages=msgs, max_tokens=8, temperature=0)
    # the demo model is still reasoning after 8 tokens: one reasoning item, the response is incomplete
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert [it.type for it in r.output] == ["reasoning"]
    assert r.output[0].summary[0].text == chat.choices[0].message.model_extra["reasoning_content"]
    assert r.output_text == ""
    assert r.usage.input_tokens == _prompt_len(server, msgs) == chat.usage.prompt_tokens
    assert r.usage.output_tokens == 8 and r.usage.output_tokens_details.reasoning_tokens == 8
    assert r.usage.total_tokens == r.usage.input_tokens + 8
    # the same conversation again: its whole prompt but the last token comes from the cache
    again = oa.responses.create(model="m", instructions="Be brief.", input="What is 2+2?", max_output_tokens=8,
                                temperature=0)
    assert again.usage.input_tokens_details.cached_tokens == again.usage.input_tokens - 1
    assert again.output[0].summary[0].text == r.output[0].summary[0].text


def test_stream_event_sequence_equals_create(server, oa):
    kw = dict(model="m", input="What is 2+2?", max_output_tokens=8, temperature=0)
    ref = oa.responses.create(**kw)
    with oa.responses.stream(**kw) as s:
        events = list(s)
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.reasoning_summary_part.added"]
    assert types[-4:] == ["response.reasoning_summary_text.done", "response.reasoning_summary_part.done",
                          "response.output_item.done", "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.reasoning_summary_text.delta")
    assert deltas == ref.output[0].summary[0].text
    final = events[-1].response
    assert _strip_ids(final.output) == _strip_ids(ref.output)
    assert final.usage.output_tokens == 8 and final.usage.input_tokens == ref.usage.input_tokens


def test_previous_response_id_continues_the_stored_conversation(server, oa):
    r1 = oa.responses.create(model="m", input="Name a color.", max_output_tokens=6, temperature=0)
    r2 = oa.responses.create(model="m", previous_response_id=r1.id, input="And another?", max_output_tokens=6,
                             temperature=0)
    turns = [{"role": "user", "content": "Name a color."},
             {"role": "assistant", "content": "", "reasoning_content": r1.output[0].summary[0].text},
             {"role": "user", "content": "And another?"}]
    assert r2.usage.input_tokens == _prompt_len(server, turns)
    assert r2.usage.input_tokens_details.cached_tokens > 0
    assert r2.previous_response_id == r1.id
    cold = "".join(c.reasoning for c in generate_mod.stream_generate(
        server["model"], server["tok"], turns, max_tokens=6, temperature=0))
    assert r2.output[0].summary[0].text == cold
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        oa.responses.create(model="m", previous_response_id="resp_unknown", input="hi", max_output_tokens=2)
    unstored = oa.responses.create(model="m", input="hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.BadRequestError, match="no stored response"):
        oa.responses.create(model="m", previous_response_id=unstored.id, input="hi", max_output_tokens=2)


# ---------------------------------------------------------------- recorded model output


def test_text_answer_create_and_stream(server, oa, script):
    ids = script(ANSWER)
    r = oa.responses.create(model="m", input="What is 2+2?")
    assert r.status == "completed" and r.incomplete_details is None
    assert [it.type for it in r.output] == ["reasoning", "message"]
    assert r.output[0].summary[0].text == "Add them."
    assert r.output_text == "Four."
    think = len(server["tok"].encode("Add them.\n</think>", add_special_tokens=False))
    assert r.usage.output_tokens == len(ids) and r.usage.output_tokens_details.reasoning_tokens == think
    with oa.responses.stream(model="m", input="What is 2+2?") as s:
        types = [e.type for e in s]
        final = s.get_final_response()
    assert final.output_text == "Four." and final.status == "completed"
    msg = types.index("response.content_part.added")
    assert types[msg - 1] == "response.output_item.added"
    assert types[msg + 1] == "response.output_text.delta"
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]


def test_tool_round_trip(server, oa, script):
    ids = script(CALL)
    r = oa.responses.create(model="m", input="Weather in Paris?", tools=[TOOL])
    assert [it.type for it in r.output] == ["reasoning", "function_call"]
    call = r.output[1]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris", "days": 2}
    assert call.call_id.startswith("call_") and call.status == "completed"
    assert r.usage.output_tokens == len(ids)
    # stream: the call arrives as argument events and in the final response
    with oa.responses.stream(model="m", input="Weather in Paris?", tools=[TOOL]) as s:
        events = list(s)
        final = s.get_final_response()
    types = [e.type for e in events]
    assert "response.function_call_arguments.delta" in types and "response.function_call_arguments.done" in types
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert json.loads(done.arguments) == {"city": "Paris", "days": 2}
    assert final.output[1].name == "get_weather"
    # send the result back with the output items: the prompt renders the call and the result
    want = _prompt_len(server, [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "Use the tool.", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}]},
        {"role": "tool", "name": "get_weather", "content": "sunny, 21 C"}], CHAT_TOOLS)
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}
    items = [{"role": "user", "content": "Weather in Paris?"}] + [it.model_dump(exclude_none=True)
                                                                   for it in r.output] + [result]
    r2 = oa.responses.create(model="m", input=items, tools=[TOOL])
    assert r2.usage.input_tokens == want
    # the same through previous_response_id: only the result is sent
    r3 = oa.responses.create(model="m", previous_response_id=r.id, tools=[TOOL],
                             input=[{**result, "call_id": r.output[1].call_id}])
    assert r3.usage.input_tokens == want
    # tool_choice none: no tools, so the markup stays plain text
    r4 = oa.responses.create(model="m", input="Weather in Paris?", tools=[TOOL], tool_choice="none")
    assert [it.type for it in r4.output] == ["reasoning", "message"] and "<tool_call>" in r4.output_text


def test_codex_shaped_request(server, script):
    """The body Codex CLI posts (wire_api = "responses"), raw: developer messages, instructions, store false."""
    script(CALL)
    body = {
        "model": "step-demo", "instructions": "You are Codex, a coding agent.",
        "input": [
            {"type": "message", "role": "developer",
             "content": [{"type": "input_text", "text": "<permissions>sandboxed</permissions>"}]},
            {"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": "<environment_context>/repo</environment_context>"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]}],
        "tools": [TOOL, {"type": "web_search"},
                  {"type": "namespace", "name": "multi_agent_v1", "description": "Agents.",
                   "tools": [{**TOOL, "name": "spawn_agent"}]}],
        "tool_choice": "auto", "parallel_tool_calls": False,
        "reasoning": {"effort": "medium", "summary": "auto"}, "store": False, "stream": True,
        "include": ["reasoning.encrypted_content"], "prompt_cache_key": "0199-session",
        "text": {"verbosity": "medium"}}
    r = httpx.post(server["url"] + "/v1/responses", json=body, timeout=60,
                   headers={"authorization": f"Bearer {KEY}", "accept": "text/event-stream"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _sse(r.text)
    assert all(name == data["type"] for name, data in events)
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    assert events[0][0] == "response.created" and events[-1][0] == "response.completed"
    final = events[-1][1]["response"]
    assert [it["type"] for it in final["output"]] == ["reasoning", "function_call"]
    assert json.loads(final["output"][1]["arguments"]) == {"city": "Paris", "days": 2}
    msgs = [{"role": "system", "content": body["instructions"]},
            {"role": "system", "content": body["input"][0]["content"][0]["text"]},
            {"role": "user", "content": body["input"][1]["content"][0]["text"]},
            {"role": "user", "content": "Weather in Paris?"}]
    spawn = [{"type": "function", "function": {**CHAT_TOOLS[0]["function"], "name": "spawn_agent"}}]
    assert final["usage"]["input_tokens"] == _prompt_len(server, msgs, CHAT_TOOLS + spawn)
    # a function of a namespace tool comes back with its namespace
    script(CALL.replace("get_weather", "spawn_agent"))
    r = httpx.post(server["url"] + "/v1/responses", json={**body, "stream": False}, timeout=60,
                   headers={"authorization": f"Bearer {KEY}"}).json()
    assert (r["output"][1]["name"], r["output"][1]["namespace"]) == ("spawn_agent", "multi_agent_v1")
    # store: false keeps nothing
    again = httpx.post(server["url"] + "/v1/responses", timeout=60, headers={"authorization": f"Bearer {KEY}"},
                       json={"previous_response_id": final["id"], "input": "and?"})
    assert again.status_code == 400 and again.json()["error"]["param"] == "previous_response_id"


def test_a_generation_that_breaks_off_ends_the_stream_with_response_failed(server, oa, script):
    script(ANSWER, fail=True)
    with oa.responses.stream(model="m", input="What is 2+2?") as s:
        events = list(s)
    assert events[-1].type == "response.failed"
    assert events[-1].response.status == "failed" and events[-1].response.error.code == "server_error"
    assert events[-1].response.usage.output_tokens == 3
    assert events[-2].type == "response.output_item.done" and events[-2].item.status == "incomplete"


def test_cached_tokens_come_from_the_prefix_cache(server):
    """Two conversations alternate on a server with a prefix cache: each continuation reuses its own first turn."""
    model, tok = server["model"], server["tok"]
    app = create_app(model, tok, model_name="m", prefix_cache=PrefixCache(model, ram_bytes=10**7, block_size=16))
    with live_server(app) as url:
        client = openai_client(url, "none")
        kw = dict(model="m", instructions="Answer in one word.", max_output_tokens=4, temperature=0)
        first = [client.responses.create(input=f"Question {k}: name a fruit.", **kw) for k in range(2)]
        # the session now holds conversation 1; conversation 0's first turn comes from the prefix cache
        r = client.responses.create(input="And a vegetable?", previous_response_id=first[0].id, **kw)
        ids = [tok.apply_chat_template([{"role": "system", "content": kw["instructions"]},
                                        {"role": "user", "content": f"Question {k}: name a fruit."}],
                                       add_generation_prompt=True) for k in range(2)]
        shared = next(i for i, (a, b) in enumerate(zip(*ids)) if a != b)  # all the session alone could reuse
        cached = r.usage.input_tokens_details.cached_tokens
        assert cached > shared and cached >= first[0].usage.input_tokens - 16
        assert app.state.engine.prefix_cache.usage().hits >= 1


def _chat_tools(body: dict) -> list[dict]:
    return [{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                              "parameters": t["parameters"]}} for t in body["tools"]]


def _texts(item: dict) -> str:
    return "".join(p["text"] for p in item["content"])


def test_captured_codex_cli_turns_replay(server, script):
    """Two request bodies captured from the real Codex CLI (a tool call, then its result), posted as they are."""
    h = {"authorization": f"Bearer {KEY}"}
    turn1, turn2 = CODEX["turns"]
    script("Run it.\n</think>\n<tool_call>\n<function=exec_command>\n<parameter=cmd>\necho hi-from-codex\n"
           "</parameter>\n</function>\n</tool_call>")
    events = _sse(httpx.post(server["url"] + "/v1/responses", json=turn1, headers=h, timeout=60).text)
    assert [name for name, _ in events][:2] == ["response.created", "response.in_progress"]
    final = events[-1][1]["response"]
    assert events[-1][0] == "response.completed" and final["status"] == "completed"
    assert [(it["type"], it.get("name")) for it in final["output"]] == [("reasoning", None),
                                                                         ("function_call", "exec_command")]
    assert json.loads(final["output"][1]["arguments"]) == {"cmd": "echo hi-from-codex"}
    msgs = [{"role": {"developer": "system"}.get(it["role"], it["role"]), "content": _texts(it)}
            for it in turn1["input"]]
    assert final["usage"]["input_tokens"] == _prompt_len(server, msgs, _chat_tools(turn1))
    # turn 2: Codex sends everything again (store: false) with the reasoning item, the call and its output
    script("It printed the greeting.\n</think>\nThe command printed hi-from-codex.")
    events = _sse(httpx.post(server["url"] + "/v1/responses", json=turn2, headers=h, timeout=60).text)
    final = events[-1][1]["response"]
    assert [it["type"] for it in final["output"]] == ["reasoning", "message"]
    assert final["output"][1]["content"][0]["text"] == "The command printed hi-from-codex."
    result = turn2["input"][-1]["output"]
    msgs += [{"role": "assistant", "content": "", "reasoning_content": "Run it.", "tool_calls": [
        {"type": "function", "function": {"name": "exec_command", "arguments": {"cmd": "echo hi-from-codex"}}}]},
             {"role": "tool", "name": "exec_command", "content": result}]
    assert final["usage"]["input_tokens"] == _prompt_len(server, msgs, _chat_tools(turn2))
    assert final["usage"]["input_tokens_details"]["cached_tokens"] > final["usage"]["input_tokens"] // 2


# ---------------------------------------------------------------- input mapping, store, errors


def test_input_items_map_onto_chat_messages():
    items = [{"role": "user", "content": "hi"},
             {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Two calls."}]},
             {"type": "function_call", "call_id": "c1", "name": "a", "arguments": "{\"x\": 1}"},
             {"type": "function_call", "call_id": "c2", "name": "b", "arguments": "{}"},
             {"type": "function_call_output", "call_id": "c1", "output": "one"},
             {"type": "function_call_output", "call_id": "c2", "output": "two"}]
    out = input_messages(items)
    assert [m["role"] for m in out] == ["user", "assistant", "tool", "tool"]
    assert out[1]["reasoning_content"] == "Two calls."
    assert [c["function"]["name"] for c in out[1]["tool_calls"]] == ["a", "b"]
    assert out[3] == {"role": "tool", "tool_call_id": "c2", "content": "two"}
    with pytest.raises(APIError, match="item_reference"):
        input_messages([{"type": "item_reference", "id": "x"}])


def test_store_is_a_bounded_lru():
    store = ResponseStore(2)
    store.put("a", [{"role": "user", "content": "1"}])
    store.put("b", [])
    store.get("a")  # a is now the most recent
    store.put("c", [])
    assert list(store.items) == ["a", "c"]
    with pytest.raises(APIError, match="no stored response 'b'"):
        store.get("b")


@pytest.mark.parametrize("body, param", [
    ({}, "input"),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": [{"type": "message", "role": "tool", "content": "x"}]}, "input.0.role"),
    ({"input": [{"role": "user", "content": [1]}]}, "input"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0.type"),
    ({"input": "hi", "tool_choice": {"type": "function", "name": "nope"}, "tools": [TOOL]}, "tool_choice"),
])
def test_bad_requests_are_400_in_openai_shape(server, body, param):
    r = httpx.post(server["url"] + "/v1/responses", json=body, headers={"authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error" and r.json()["error"]["param"] == param
    assert httpx.post(server["url"] + "/v1/responses", json={"input": "hi"}, timeout=60).status_code == 401
