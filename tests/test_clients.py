"""Every client on the subscription (issue 18): plain Responses, Chat
Completions and Anthropic Messages clients, against a fake ChatGPT backend that
enforces the backend's rules (contrib/demo_backend.py: streamed, unstored
requests only; max_output_tokens, metadata, user, temperature, top_p refused).
The same tokens, limits and accounting as Codex. The OpenAI and Anthropic SDKs
and Claude Code run where they are installed (OCM_SDK_PYTHON, OCM_CLAUDE_BIN)."""

import json
import os
import subprocess
import sys
import time

import pytest

import ocm
from test_ocm import USERS, Proxy, error_of, read_json, wait_for

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "contrib"))
import demo_backend  # noqa: E402

SDK_PYTHON = os.environ.get("OCM_SDK_PYTHON", "")
CLAUDE_BIN = os.environ.get("OCM_CLAUDE_BIN", "")
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                                 "parameters": {"type": "object", "properties": {
                                                     "city": {"type": "string"}}, "required": ["city"]}}}


def tool_model(body):
    """Asks for get_weather (or Claude Code's Bash) until a result comes back, then answers with it."""
    items = body.get("input") if isinstance(body.get("input"), list) else []
    results = [i for i in items if isinstance(i, dict) and i.get("type") == "function_call_output"]
    names = [t.get("name") for t in body.get("tools") or () if isinstance(t, dict)]
    if results:
        output = results[-1].get("output")
        return [demo_backend.message_item("The tool said: %s" % (
            output if isinstance(output, str) else json.dumps(output)))]
    if "get_weather" in names:
        return [demo_backend.function_call_item("get_weather", {"city": "Paris"}, "call_w1")]
    if "Bash" in names:
        return [demo_backend.function_call_item("Bash", {"command": "echo claude-tool-says-$((40+2))",
                                                         "description": "print a number"}, "call_b1")]
    return [demo_backend.message_item("Hello there, from the backend.")]


@pytest.fixture
def backend():
    fake = demo_backend.DemoBackend(model=tool_model)
    yield fake
    fake.close()


@pytest.fixture
def client_proxy(backend, tmp_path):
    """OCM in front of the rule-enforcing fake, with a usage file and budgets."""
    auth = str(tmp_path / "codex" / "auth.json")
    demo_backend.write_fake_auth(auth)
    started = []

    def make(**extra):
        config = {"listen": "127.0.0.1", "listen_port": 0, "credential_path": auth, "timezone": "UTC",
                  "users": [dict(USERS[0], budgets=[{"period": "day", "usd": 50}]), USERS[1]],
                  "usages_path": str(tmp_path / "usage.json"), "budgets_path": str(tmp_path / "budgets.json"),
                  "upstream": {"chatgpt_url": backend.chatgpt_url, "token_url": backend.token_url}}
        config.update(extra)
        proxy = Proxy(ocm.OCMServer(ocm.config_from_dict(config), file_check_interval=0))
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.close()


def sse_events(body):
    """The data: JSON of each event of an SSE body (and [DONE] as the string)."""
    events = []
    for block in body.decode().split("\n\n"):
        data = [line[6:] for line in block.split("\n") if line.startswith("data: ")]
        if data:
            text = "\n".join(data)
            events.append(text if text == "[DONE]" else json.loads(text))
    return events


def responses_sent(backend):
    return [body for method, path, _, body in backend.requests if path.endswith("/codex/responses")]


def requests_counted(proxy, user="alice"):
    book = proxy.server.usage.to_json()
    return sum(c["by_user"].get(user, {}).get("request_count", 0) for c in book["combinations"])


# == Plain Responses clients ======================================================

class TestPlainResponses:
    def test_a_non_streaming_request_is_streamed_upstream_and_answered_as_json(self, client_proxy, backend):
        proxy = client_proxy()
        status, headers, body = proxy.request("POST", "/v1/responses", {
            "model": "gpt-5.4", "input": "hi", "max_output_tokens": 100, "temperature": 0.2, "metadata": {"a": 1}})
        answer = json.loads(body)
        assert status == 200 and headers["content-type"] == "application/json"
        assert answer["output"][0]["content"][0]["text"] == "Hello there, from the backend."
        assert answer["usage"]["input_tokens"] > 0 and answer["model"] == "gpt-5.4"
        sent = responses_sent(backend)[0]
        assert sent["stream"] is True and sent["store"] is False
        assert not {"max_output_tokens", "temperature", "metadata"} & set(sent)
        assert sent["input"] == [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}]
        assert requests_counted(proxy) == 1

    def test_a_streaming_request_with_store_unset_is_made_acceptable_and_relayed(self, client_proxy, backend):
        proxy = client_proxy()
        status, _, body = proxy.request("POST", "/v1/responses", {"model": "gpt-5.4", "input": "hi", "stream": True})
        events = sse_events(body)
        assert status == 200 and events[-1]["type"] == "response.completed"
        assert responses_sent(backend)[0]["store"] is False
        assert requests_counted(proxy) == 1

    def test_codex_requests_go_byte_for_byte(self, client_proxy, backend):
        proxy = client_proxy()
        raw = b'{"model":"gpt-5.4","input":[],"stream":true,"store":false,"prompt_cache_key":"t1"}'
        proxy.request("POST", "/v1/responses", raw, headers={"Content-Type": "application/json"})
        assert responses_sent(backend)[0] == json.loads(raw)

    def test_a_failed_stream_is_an_error_answer(self, client_proxy, backend):
        backend.model = lambda body: (429, {"error": {"type": "usage_limit_reached", "message": "limit",
                                                      "resets_at": int(time.time()) + 60}})
        proxy = client_proxy()
        status, _, body = proxy.request("POST", "/v1/responses", {"model": "gpt-5.4", "input": "hi"})
        assert status == 429 and json.loads(body)["error"]["type"] == "usage_limit_reached"


# == Chat Completions ============================================================

class TestChatCompletions:
    def test_json_with_a_tool_round_trip(self, client_proxy, backend):
        proxy = client_proxy()
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
        status, _, body = proxy.request("POST", "/v1/chat/completions", {
            "model": "gpt-5.4", "messages": messages, "tools": [WEATHER_TOOL], "max_tokens": 50})
        answer = json.loads(body)
        assert status == 200 and answer["object"] == "chat.completion"
        call = answer["choices"][0]["message"]["tool_calls"][0]
        assert answer["choices"][0]["finish_reason"] == "tool_calls"
        assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
        messages += [answer["choices"][0]["message"],
                     {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 21 C"}]
        status, _, body = proxy.request("POST", "/v1/chat/completions", {
            "model": "gpt-5.4", "messages": messages, "tools": [WEATHER_TOOL]})
        answer = json.loads(body)
        assert answer["choices"][0]["message"]["content"] == "The tool said: sunny, 21 C"
        assert answer["usage"]["prompt_tokens"] > 0
        second = responses_sent(backend)[1]
        assert second["instructions"] == "Be brief." or second["input"][0]["role"] in ("developer", "system")
        assert [i["type"] for i in second["input"] if i["type"] != "message"] == ["function_call",
                                                                                  "function_call_output"]
        assert "max_tokens" not in responses_sent(backend)[0]
        assert requests_counted(proxy) == 2

    def test_streaming_with_the_usage_chunk(self, client_proxy, backend):
        proxy = client_proxy()
        status, headers, body = proxy.request("POST", "/v1/chat/completions", {
            "model": "gpt-5.4", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "stream_options": {"include_usage": True}})
        events = sse_events(body)
        assert status == 200 and headers["content-type"].startswith("text/event-stream")
        assert events[-1] == "[DONE]"
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
        assert text == "Hello there, from the backend."
        assert events[-2]["usage"]["total_tokens"] > 0 and events[-2]["choices"] == []
        assert requests_counted(proxy) == 1

    def test_bad_input_is_a_400_in_openai_shape_and_goes_nowhere(self, client_proxy, backend):
        proxy = client_proxy()
        status, _, body = proxy.request("POST", "/v1/chat/completions", {"model": "gpt-5.4", "messages": []})
        assert status == 400 and error_of(body)[0] == "invalid_request_error"
        assert responses_sent(backend) == []

    def test_budgets_and_the_model_list_apply_to_the_model_used(self, client_proxy, backend):
        proxy = client_proxy(users=[dict(USERS[0], models=["gpt-5.3-codex"]), USERS[1]],
                             model_map={"my-fast-model": "gpt-5.3-codex", "blocked-*": "gpt-5.4"})
        ok = proxy.request("POST", "/v1/chat/completions", {"model": "my-fast-model",
                                                            "messages": [{"role": "user", "content": "hi"}]})
        refused = proxy.request("POST", "/v1/chat/completions", {"model": "blocked-x",
                                                                 "messages": [{"role": "user", "content": "hi"}]})
        assert ok[0] == 200 and refused[0] == 403 and "gpt-5.4" in error_of(refused[2])[1]
        assert [r["model"] for r in responses_sent(backend)] == ["gpt-5.3-codex"]


# == Anthropic Messages ============================================================

class TestAnthropicMessages:
    def test_json_with_a_tool_round_trip_and_x_api_key(self, client_proxy, backend):
        proxy = client_proxy()
        tools = [{"name": "get_weather", "description": "The weather",
                  "input_schema": {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
                                   "properties": {"city": {"type": "string"}}}}]
        headers = {"x-api-key": "tok-alice", "anthropic-version": "2023-06-01"}
        request = {"model": "claude-opus-5-5", "max_tokens": 128000, "system": "Be brief.", "tools": tools,
                   "messages": [{"role": "user", "content": "Weather in Paris?"}], "metadata": {"user_id": "u1"}}
        status, _, body = proxy.request("POST", "/v1/messages?beta=true", request, headers=headers, token=None)
        answer = json.loads(body)
        assert status == 200 and answer["type"] == "message" and answer["stop_reason"] == "tool_use"
        use = answer["content"][-1]
        assert use["type"] == "tool_use" and use["name"] == "get_weather" and use["input"] == {"city": "Paris"}
        request["messages"] += [{"role": "assistant", "content": answer["content"]},
                                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use["id"],
                                                              "content": "sunny"}]}]
        status, _, body = proxy.request("POST", "/v1/messages", request, headers=headers, token=None)
        answer = json.loads(body)
        assert answer["content"][0] == {"type": "text", "text": "The tool said: sunny"}
        assert answer["stop_reason"] == "end_turn" and answer["usage"]["input_tokens"] > 0
        first = responses_sent(backend)[0]
        assert first["model"] == "gpt-5.3-codex" and "max_tokens" not in first and "metadata" not in first
        assert "$schema" not in json.dumps(first["tools"])
        assert requests_counted(proxy) == 2

    def test_the_streaming_event_sequence(self, client_proxy, backend):
        proxy = client_proxy()
        status, _, body = proxy.request("POST", "/v1/messages", {
            "model": "claude-sonnet-5", "max_tokens": 1000, "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}, headers={"x-api-key": "tok-alice"}, token=None)
        names = [line[7:] for line in body.decode().split("\n") if line.startswith("event: ")]
        assert status == 200
        assert names[0] == "message_start" and names[-1] == "message_stop" and names[-2] == "message_delta"
        assert "content_block_start" in names and "content_block_delta" in names and "content_block_stop" in names
        deltas = [e for e in sse_events(body) if e.get("type") == "content_block_delta"]
        assert "".join(d["delta"]["text"] for d in deltas) == "Hello there, from the backend."

    def test_errors_are_anthropic_shaped_from_ocm_and_from_upstream(self, client_proxy, backend):
        proxy = client_proxy()
        status, _, body = proxy.request("POST", "/v1/messages", {"model": "claude-x", "messages": []},
                                        headers={"x-api-key": "tok-wrong"}, token=None)
        assert status == 401 and json.loads(body) == {"type": "error", "error": {
            "type": "authentication_error", "message": "invalid api key"}}
        backend.model = lambda body: (429, {"error": {"type": "usage_limit_reached", "message": "limit"}})
        status, _, body = proxy.request("POST", "/v1/messages", {
            "model": "claude-x", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]})
        answer = json.loads(body)
        assert status == 429 and answer["type"] == "error" and answer["error"]["type"] == "rate_limit_error"

    def test_count_tokens_is_an_estimate_answered_here(self, client_proxy, backend):
        proxy = client_proxy()
        status, _, body = proxy.request("POST", "/v1/messages/count_tokens", {
            "model": "claude-x", "messages": [{"role": "user", "content": "hello " * 100}]})
        assert status == 200 and 100 <= json.loads(body)["input_tokens"] <= 300
        assert backend.requests == []

    def test_the_access_log_names_both_models(self, client_proxy, backend, caplog):
        proxy = client_proxy(model_map={"claude-*": "gpt-5.4"})
        with caplog.at_level("INFO", logger="ocm.access"):
            proxy.request("POST", "/v1/messages", {"model": "claude-opus-5-5", "max_tokens": 10,
                                                   "messages": [{"role": "user", "content": "hi"}]})
            assert wait_for(lambda: any("/v1/messages" in r.getMessage() for r in caplog.records))
        line = next(r.getMessage() for r in caplog.records if "/v1/messages" in r.getMessage())
        assert "model=gpt-5.4" in line and "asked=claude-opus-5-5" in line


# == The models list ==============================================================

class TestModels:
    def test_openai_list_format_with_mapped_names(self, client_proxy, backend):
        backend_models = {"models": [{"slug": "gpt-5.4"}, {"slug": "gpt-5.3-codex"}]}
        original = backend.handle

        def handle(h):
            if h.path.startswith("/backend-api/codex/models"):
                assert "client_version=" in h.path
                return demo_backend.DemoBackend.send_json(h, 200, backend_models)
            return original(h)

        backend.handle = handle
        proxy = client_proxy(model_map={"claude-opus-5-5": "gpt-5.4", "claude-*": "gpt-5.3-codex"})
        status, _, body = proxy.request("GET", "/v1/models")
        assert status == 200 and json.loads(body) == {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "openai"}
            for name in ("gpt-5.4", "gpt-5.3-codex", "claude-opus-5-5")]}


# == Real clients ================================================================

needs_sdk = pytest.mark.skipif(not (SDK_PYTHON and os.access(SDK_PYTHON, os.X_OK)),
                               reason="set OCM_SDK_PYTHON to a Python with the openai and anthropic packages")

SDK_SCRIPT = r'''
import json, sys
import openai, anthropic
base, token = sys.argv[1], sys.argv[2]
out = {}
oa = openai.OpenAI(base_url=base + "/v1", api_key=token, max_retries=0)
weather = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
messages = [{"role": "user", "content": "Weather in Paris?"}]
first = oa.chat.completions.create(model="gpt-5.4", messages=messages, tools=weather)
call = first.choices[0].message.tool_calls[0]
messages += [first.choices[0].message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
second = oa.chat.completions.create(model="gpt-5.4", messages=messages, tools=weather)
out["chat_tool"] = [call.function.name, json.loads(call.function.arguments), second.choices[0].message.content]
stream = oa.chat.completions.create(model="gpt-5.4", messages=[{"role": "user", "content": "hi"}],
                                    stream=True, stream_options={"include_usage": True})
chunks = list(stream)
out["chat_stream"] = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
                      chunks[-1].usage.total_tokens]
response = oa.responses.create(model="gpt-5.4", input="hi", max_output_tokens=50)
out["responses"] = response.output_text
an = anthropic.Anthropic(base_url=base, api_key=token, max_retries=0)
tools = [{"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
msgs = [{"role": "user", "content": "Weather in Paris?"}]
m1 = an.messages.create(model="claude-opus-5-5", max_tokens=1024, tools=tools, messages=msgs)
use = [b for b in m1.content if b.type == "tool_use"][0]
msgs += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m1.content]},
         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]}]
m2 = an.messages.create(model="claude-opus-5-5", max_tokens=1024, tools=tools, messages=msgs)
out["anthropic_tool"] = [m1.stop_reason, use.name, use.input, m2.content[0].text]
with an.messages.stream(model="claude-opus-5-5", max_tokens=1024,
                        messages=[{"role": "user", "content": "hi"}]) as s:
    text = "".join(s.text_stream)
    final = s.get_final_message()
out["anthropic_stream"] = [text, final.stop_reason, final.usage.output_tokens > 0]
try:
    anthropic.Anthropic(base_url=base, api_key="wrong-token", max_retries=0).messages.create(
        model="claude-x", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
except anthropic.AuthenticationError as exc:
    out["anthropic_401"] = exc.status_code
print(json.dumps(out))
'''


@needs_sdk
class TestRealSDKs:
    def test_the_openai_and_anthropic_sdks(self, client_proxy, backend):
        proxy = client_proxy()
        run = subprocess.run([SDK_PYTHON, "-c", SDK_SCRIPT, "http://127.0.0.1:%d" % proxy.port, "tok-alice"],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr[-3000:]
        out = json.loads(run.stdout)
        assert out["chat_tool"] == ["get_weather", {"city": "Paris"}, "The tool said: sunny"]
        assert out["chat_stream"][0] == "Hello there, from the backend." and out["chat_stream"][1] > 0
        assert out["responses"] == "Hello there, from the backend."
        assert out["anthropic_tool"] == ["tool_use", "get_weather", {"city": "Paris"}, "The tool said: sunny"]
        assert out["anthropic_stream"] == ["Hello there, from the backend.", "end_turn", True]
        assert out["anthropic_401"] == 401
        assert wait_for(lambda: requests_counted(proxy) == 7)
        assert proxy.server.ledger.requests("alice", "day") == 7


needs_claude = pytest.mark.skipif(not (CLAUDE_BIN and os.access(CLAUDE_BIN, os.X_OK)),
                                  reason="set OCM_CLAUDE_BIN to a Claude Code binary (npm @anthropic-ai/claude-code)")


@needs_claude
class TestRealClaudeCode:
    def test_claude_code_finishes_a_task_that_needs_a_tool(self, client_proxy, backend, tmp_path):
        proxy = client_proxy()
        home = tmp_path / "claude-home"
        home.mkdir()
        work = tmp_path / "work"
        work.mkdir()
        env = dict(os.environ, HOME=str(home), ANTHROPIC_BASE_URL="http://127.0.0.1:%d" % proxy.port,
                   ANTHROPIC_AUTH_TOKEN="tok-alice", DISABLE_AUTOUPDATER="1",
                   CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1")
        env.pop("ANTHROPIC_API_KEY", None)
        run = subprocess.run([CLAUDE_BIN, "-p", "run the tool and tell me what it printed",
                              "--allowedTools", "Bash"], env=env, cwd=str(work), stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
        assert "claude-tool-says-42" in run.stdout
        assert wait_for(lambda: requests_counted(proxy) >= 2)
        paths = {path for _, path, _, _ in backend.requests}
        assert paths <= {"/backend-api/codex/responses", "/oauth/token", "/backend-api/wham/usage"}
