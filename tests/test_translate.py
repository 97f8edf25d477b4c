"""Translation between the ChatGPT backend's Responses stream and other
clients' APIs (ocm.py section 14b): plain Responses, Chat Completions and
Anthropic Messages. Pure functions, so no sockets: upstream SSE bytes go
through SSEScanner into the writers, split at every offset, and the output
must not change."""

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ocm

FUZZ_EXAMPLES = int(os.environ.get("OCM_FUZZ_EXAMPLES", "25"))  # `make fuzz` runs 2000
fuzz_settings = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
                         suppress_health_check=list(HealthCheck))

MODEL = "gpt-5.3-codex"


# == Upstream streams =========================================================

def sse(*events) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)


def usage(input_tokens=12, cached=4, output=5, reasoning=2):
    return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": output, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": input_tokens + output}


def created(rid="resp_1"):
    return {"type": "response.created", "response": {
        "id": rid, "object": "response", "model": MODEL, "status": "in_progress", "output": []}}


def completed(rid="resp_1", kind="response.completed", **extra):
    response = {"id": rid, "object": "response", "model": MODEL, "status": "completed",
                "service_tier": "default", "output": [], "usage": usage()}
    response.update(extra)
    return {"type": kind, "response": response}


def incomplete(reason="max_output_tokens"):
    return completed(kind="response.incomplete", status="incomplete",
                     incomplete_details={"reason": reason})


def message_item(text, ident="msg_1"):
    return {"id": ident, "type": "message", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def text_events(pieces, index=0, ident="msg_1"):
    """A message item streamed as the backend does: added, deltas, done."""
    head = dict(message_item("", ident), content=[], status="in_progress")
    events = [{"type": "response.output_item.added", "output_index": index, "item": head}]
    events += [{"type": "response.output_text.delta", "output_index": index, "item_id": ident,
                "content_index": 0, "delta": piece} for piece in pieces]
    events.append({"type": "response.output_item.done", "output_index": index,
                   "item": message_item("".join(pieces), ident)})
    return events


def call_item(arguments, call_id="call_1", name="get_weather", ident="fc_1"):
    return {"id": ident, "type": "function_call", "status": "completed", "call_id": call_id,
            "name": name, "arguments": arguments}


def call_events(pieces, index=0, call_id="call_1", name="get_weather", ident="fc_1"):
    head = dict(call_item("", call_id, name, ident), status="in_progress")
    events = [{"type": "response.output_item.added", "output_index": index, "item": head}]
    events += [{"type": "response.function_call_arguments.delta", "output_index": index,
                "item_id": ident, "delta": piece} for piece in pieces]
    events.append({"type": "response.output_item.done", "output_index": index,
                   "item": call_item("".join(pieces), call_id, name, ident)})
    return events


def reasoning_events(parts, index=0, secret="gAAAA-secret", ident="rs_1"):
    """A reasoning item with summary parts, each streamed in two deltas."""
    events = [{"type": "response.output_item.added", "output_index": index,
               "item": {"id": ident, "type": "reasoning", "summary": []}}]
    for number, part in enumerate(parts):
        half = len(part) // 2
        events += [{"type": "response.reasoning_summary_text.delta", "output_index": index,
                    "item_id": ident, "summary_index": number, "delta": piece}
                   for piece in (part[:half], part[half:]) if piece]
    item = {"id": ident, "type": "reasoning",
            "summary": [{"type": "summary_text", "text": part} for part in parts]}
    if secret:
        item["encrypted_content"] = secret
    events.append({"type": "response.output_item.done", "output_index": index, "item": item})
    return events


def failed(code="server_error", message="The server had an error"):
    return {"type": "response.failed", "response": {
        "id": "resp_1", "status": "failed", "error": {"code": code, "message": message}}}


TEXT_AND_TOOL = sse(created(), *text_events(["Hel", "lo"]),
                    *call_events(['{"city":', '"Paris"}'], index=1), completed())


# == Running writers ==========================================================

def run(writer, pieces):
    """Upstream bytes, in these pieces, through SSEScanner into a writer."""
    out = []
    scanner = ocm.SSEScanner(lambda event: out.append(writer.feed(event)), every_event=True)
    for piece in pieces:
        scanner.feed(piece)
    scanner.finish()
    out.append(writer.finish())
    return b"".join(out)


def chat_writer(request=None):
    return ocm.ChatStreamWriter(request or {}, "chatcmpl-1", 1700000000, "fallback")


def claude_writer(request=None, input_tokens=0):
    return ocm.AnthropicStreamWriter(request or {}, "msg_1", "fallback", input_tokens)


def events_of(data: bytes):
    """[(event name or None, parsed data or "[DONE]")] of an SSE answer."""
    assert data.endswith(b"\n\n"), data[-40:]
    out = []
    for block in data.decode("ascii").split("\n\n")[:-1]:
        name, payload = None, None
        for line in block.split("\n"):
            field, _, value = line.partition(": ")
            if field == "event":
                name = value
            elif field == "data":
                payload = value if value == "[DONE]" else json.loads(value)
        out.append((name, payload))
    return out


def assemble(events):
    assembler = ocm.ResponseAssembler()
    for event in events:
        assembler.feed(event)
    return assembler.finish()


def upstream_events(data: bytes):
    out = []
    scanner = ocm.SSEScanner(out.append, every_event=True)
    scanner.feed(data)
    scanner.finish()
    return out


def chat_accumulate(data: bytes):
    """What an OpenAI SDK makes of a chunk stream: the message, finish_reason,
    usage, and the error if one came."""
    content, calls, finish, usage_seen, error, done = None, {}, None, None, None, False
    for name, chunk in events_of(data):
        assert name is None and not done
        if chunk == "[DONE]":
            done = True
            continue
        if "error" in chunk:
            error = chunk["error"]
            continue
        assert chunk["object"] == "chat.completion.chunk" and chunk["id"] == "chatcmpl-1"
        usage_seen = chunk.get("usage") or usage_seen
        for choice in chunk["choices"]:
            delta = choice["delta"]
            if "content" in delta:
                content = (content or "") + delta["content"]
            for call in delta.get("tool_calls", ()):
                slot = calls.setdefault(call["index"], {"id": None, "name": "", "arguments": ""})
                slot["id"] = call.get("id", slot["id"])
                slot["name"] += call.get("function", {}).get("name", "")
                slot["arguments"] += call.get("function", {}).get("arguments", "")
            finish = choice["finish_reason"] or finish
    return {"content": content, "tool_calls": [calls[i] for i in sorted(calls)],
            "finish_reason": finish, "usage": usage_seen, "error": error, "done": done}


def claude_accumulate(data: bytes):
    """What Anthropic's SDK makes of an event stream: the final message (or
    the error event), checking the event order on the way."""
    message, error, open_blocks, stopped = None, None, set(), False
    partial = {}
    for name, event in events_of(data):
        assert name == event["type"]
        if name == "error":
            error = event["error"]
            continue
        assert not stopped
        if name == "message_start":
            assert message is None
            message = event["message"]
        elif name == "content_block_start":
            assert event["index"] == len(message["content"]) and event["index"] not in open_blocks
            message["content"].append(dict(event["content_block"]))
            open_blocks.add(event["index"])
        elif name == "content_block_delta":
            assert event["index"] in open_blocks
            block, delta = message["content"][event["index"]], event["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "input_json_delta":
                partial[event["index"]] = partial.get(event["index"], "") + delta["partial_json"]
            elif delta["type"] == "thinking_delta":
                block["thinking"] += delta["thinking"]
            elif delta["type"] == "signature_delta":
                block["signature"] = delta["signature"]
            else:
                raise AssertionError(delta)
        elif name == "content_block_stop":
            open_blocks.remove(event["index"])
            block = message["content"][event["index"]]
            if block["type"] == "tool_use":
                block["input"] = json.loads(partial.get(event["index"]) or "{}")
        elif name == "message_delta":
            message.update(event["delta"])
            message["usage"] = dict(message["usage"], **event["usage"])
        elif name == "message_stop":
            assert not open_blocks
            stopped = True
    return message, error


# == Model names ==============================================================

class TestModels:
    def test_first_matching_glob_wins_case_insensitively(self):
        model_map = [("claude-*haiku*", "gpt-5.1-codex-mini"), ("CLAUDE-*", "gpt-5.4")]
        assert ocm.resolve_model("claude-haiku-4-5", model_map) == "gpt-5.1-codex-mini"
        assert ocm.resolve_model("Claude-Opus-5-5", model_map) == "gpt-5.4"
        assert ocm.resolve_model("gpt-5.4-mini", [("gpt-5.4*", "gpt-5.4")]) == "gpt-5.4"

    def test_anthropic_names_get_the_default_and_gpt_names_pass_through(self):
        assert ocm.resolve_model("claude-opus-5-5") == ocm.ANTHROPIC_DEFAULT_MODEL == MODEL
        assert ocm.resolve_model("sonnet") == MODEL
        assert ocm.resolve_model("claude-sonnet-5", [("gpt-*", "x")], "gpt-5.4") == "gpt-5.4"
        assert ocm.resolve_model(" gpt-5.4 ") == "gpt-5.4"
        assert ocm.resolve_model("o3") == "o3"
        assert ocm.resolve_model("") == MODEL
        assert ocm.resolve_model(None, default="gpt-5.4") == "gpt-5.4"


# == Plain Responses ==========================================================

class TestBackendResponsesRequest:
    def test_forces_stream_and_store_and_drops_what_the_backend_refuses(self):
        body = {"model": "gpt-5.4", "input": [], "stream": False, "store": True,
                "max_output_tokens": 100, "temperature": 0.2, "top_p": 1, "metadata": {"a": 1},
                "user": "u", "truncation": "auto", "reasoning": {"effort": "high"}}
        out, dropped = ocm.backend_responses_request(body)
        assert out == {"model": "gpt-5.4", "input": [], "stream": True, "store": False,
                       "reasoning": {"effort": "high"}}
        assert dropped == ["max_output_tokens", "metadata", "user", "temperature", "top_p",
                           "truncation"]
        assert body["stream"] is False and "temperature" in body  # a copy

    def test_every_refused_parameter_is_named_with_a_reason(self):
        names = [name for name, reason in ocm.BACKEND_REFUSED_PARAMETERS if reason]
        assert len(names) == len(set(names)) == len(ocm.BACKEND_REFUSED_PARAMETERS)
        assert {"max_output_tokens", "max_tokens", "max_completion_tokens", "metadata", "user",
                "temperature", "top_p"} <= set(names)
        out, dropped = ocm.backend_responses_request(dict.fromkeys(names, None))
        assert dropped == names and out == {"stream": True, "store": False}

    def test_a_codex_request_loses_nothing(self):
        body = {"model": MODEL, "input": [{"type": "message", "role": "user", "content": []}],
                "tools": [], "stream": True, "store": False, "prompt_cache_key": "t",
                "include": ["reasoning.encrypted_content"], "service_tier": "priority"}
        assert ocm.backend_responses_request(body) == (body, [])

    def test_string_input_and_system_messages_take_the_backend_shape(self):
        out, _ = ocm.backend_responses_request({"input": "hi"})
        assert out["input"] == [{"type": "message", "role": "user",
                                 "content": [{"type": "input_text", "text": "hi"}]}]
        system = {"type": "message", "role": "system", "content": "be brief"}
        out, _ = ocm.backend_responses_request({"input": [system, "odd"]})
        assert out["input"] == [dict(system, role="developer"), "odd"]
        assert system["role"] == "system"

    @pytest.mark.parametrize("tier, sent", [("fast", "priority"), ("priority", "priority"),
                                            ("flex", "flex"), ("auto", None), ("default", None)])
    def test_service_tier_is_kept_only_when_the_backend_knows_it(self, tier, sent):
        out, dropped = ocm.backend_responses_request({"service_tier": tier})
        assert out.get("service_tier") == sent
        assert dropped == ([] if sent else ["service_tier"])

    def test_a_body_that_is_not_an_object_is_a_400(self):
        with pytest.raises(ocm.HTTPError) as info:
            ocm.backend_responses_request([1])
        assert (info.value.status, info.value.error_type) == (400, "invalid_request_error")
        assert "JSON object" in info.value.message


class TestResponseAssembler:
    def test_output_comes_from_item_done_events_in_output_index_order(self):
        call = call_events(['{"a":1}'], index=1)
        text = text_events(["Hi"], index=0)
        # the call finishes first: the answer still lists the message first
        status, body = assemble([created()] + call + text + [completed()])
        assert status == 200
        assert body == dict(completed()["response"], output=[message_item("Hi"),
                                                            call_item('{"a":1}')])

    def test_usage_model_and_tier_survive_for_accounting(self):
        status, body = assemble([created(), *text_events(["x"]), completed()])
        record = ocm.usage_record_from(body)
        assert (record.model, record.service_tier, record.input_tokens, record.output_tokens,
                record.cached_tokens) == (MODEL, "default", 12, 5, 4)

    def test_incomplete_is_an_answer_not_an_error(self):
        status, body = assemble([*text_events(["cut"]), incomplete()])
        assert status == 200 and body["status"] == "incomplete"
        assert body["incomplete_details"] == {"reason": "max_output_tokens"}
        assert body["output"] == [message_item("cut")]

    def test_a_terminal_event_with_output_keeps_it(self):
        status, body = assemble([*text_events(["ignored"]),
                                 completed(output=[message_item("kept")])])
        assert body["output"] == [message_item("kept")]

    @pytest.mark.parametrize("event, status, error_type, message", [
        (failed(), 502, "api_error", "The server had an error"),
        (failed("rate_limit_exceeded", "Slow down"), 429, "rate_limit_error", "Slow down"),
        (failed("context_length_exceeded", "Too long"), 400, "invalid_request_error",
         "Too long"),
        ({"type": "error", "code": "server_is_overloaded", "message": "Busy"}, 503, "api_error",
         "Busy"),
        ({"type": "error", "status": 429, "error": {"type": "usage_limit_reached",
                                                    "message": "Limit"}},
         429, "rate_limit_error", "Limit"),
        (failed("", ""), 502, "api_error", "the upstream response failed"),
    ])
    def test_failures_become_openai_errors(self, event, status, error_type, message):
        got_status, body = assemble([created(), *text_events(["partial"]), event, completed()])
        assert got_status == status
        assert (body["error"]["type"], body["error"]["message"]) == (error_type, message)

    def test_a_stream_without_terminal_event_is_a_502(self):
        assert assemble([created(), *text_events(["partial"])]) == (502, {"error": {
            "message": ocm.STREAM_CUT_MESSAGE, "type": "api_error", "param": None,
            "code": "stream_incomplete"}})
        assert assemble([])[0] == 502

    def test_events_after_the_end_change_nothing(self):
        first = assemble([*text_events(["a"]), completed()])
        assert assemble([*text_events(["a"]), completed(), *text_events(["b"], 1), failed()]) \
            == first


# == Stop sequences ===========================================================

def cut_at_stop(text, stops):
    at = [(text.find(s), n) for n, s in enumerate(stops) if s and s in text]
    if not at:
        return text, None
    position, number = min(at)
    return text[:position], stops[number]


class TestStopScanner:
    def test_a_sequence_split_across_pieces_is_found_at_every_split(self):
        text = "one two STOP three"
        for cut in range(len(text) + 1):
            scanner = ocm.StopScanner(["STOP"])
            out = scanner.feed(text[:cut]) + scanner.feed(text[cut:]) + scanner.flush()
            assert (out, scanner.matched) == ("one two ", "STOP"), cut

    def test_text_that_only_looks_like_a_start_comes_out_at_flush(self):
        scanner = ocm.StopScanner(["STOP"])
        assert scanner.feed("a ST") == "a "
        assert scanner.feed("O") == ""
        assert scanner.flush() == "STO" and scanner.matched is None

    def test_the_earliest_match_wins(self):
        scanner = ocm.StopScanner(["cd", "abc"])
        assert scanner.feed("xabcd") == "x" and scanner.matched == "abc"
        assert scanner.feed("more") == "" and scanner.flush() == ""

    @fuzz_settings
    @given(st.text(alphabet="ab\u00e9\U0001F600", max_size=40),
           st.lists(st.text(alphabet="ab\u00e9\U0001F600", min_size=1, max_size=4), max_size=3),
           st.lists(st.integers(0, 40), max_size=6))
    def test_any_split_gives_the_text_before_the_first_stop(self, text, stops, cuts):
        scanner = ocm.StopScanner(stops)
        out, last = "", 0
        for cut in sorted(min(c, len(text)) for c in cuts) + [len(text)]:
            out += scanner.feed(text[last:cut])
            last = cut
        out += scanner.flush()
        assert (out, scanner.matched) == cut_at_stop(text, stops)


# == Chat Completions: requests ===============================================

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


class TestChatRequest:
    def test_a_tool_round_trip_becomes_the_items_the_backend_expects(self):
        body = {"model": "gpt-5.4", "stream": True, "max_tokens": 200, "temperature": 0.3,
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Weather in Paris?"},
                    {"role": "assistant", "content": None, "tool_calls": [
                        {"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
                    {"role": "user", "content": [{"type": "text", "text": "And "},
                                                 {"type": "text", "text": "tomorrow?"}]}],
                "tools": [WEATHER_TOOL], "tool_choice": "auto", "parallel_tool_calls": False,
                "reasoning_effort": "low", "user": "u1", "seed": 4}
        assert ocm.chat_to_responses(body, "gpt-5.4") == {
            "model": "gpt-5.4", "instructions": "Be brief.",
            "input": [
                {"type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
                {"type": "function_call", "call_id": "call_1", "name": "get_weather",
                 "arguments": '{"city":"Paris"}'},
                {"type": "function_call_output", "call_id": "call_1", "output": "18C, sunny"},
                {"type": "message", "role": "user", "content": [
                    {"type": "input_text", "text": "And "},
                    {"type": "input_text", "text": "tomorrow?"}]}],
            "tools": [{"type": "function", "name": "get_weather", "description": "Weather now",
                       "parameters": WEATHER_TOOL["function"]["parameters"], "strict": False}],
            "tool_choice": "auto", "parallel_tool_calls": False,
            "reasoning": {"effort": "low"}, "stream": True, "store": False}

    def test_later_system_messages_stay_in_place_as_developer_messages(self):
        out = ocm.chat_to_responses({"messages": [
            {"role": "developer", "content": [{"type": "text", "text": "A"}]},
            {"role": "system", "content": "B"},
            {"role": "user", "content": "hi"},
            {"role": "system", "content": "C"},
            {"role": "assistant", "content": "hello"}]}, MODEL)
        assert out["instructions"] == "A\n\nB"
        assert out["input"] == [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
            {"type": "message", "role": "developer",
             "content": [{"type": "input_text", "text": "C"}]},
            {"type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": "hello"}]}]

    def test_json_object_output_keeps_system_text_in_the_input(self):
        # the Responses API wants the word JSON in the input messages for json_object
        out = ocm.chat_to_responses({"messages": [{"role": "system", "content": "Answer in JSON"},
                                                  {"role": "user", "content": "hi"}],
                                     "response_format": {"type": "json_object"}}, MODEL)
        assert "instructions" not in out
        assert out["input"][0]["role"] == "developer"
        assert out["text"] == {"format": {"type": "json_object"}}

    def test_json_schema_becomes_text_format(self):
        schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
        out = ocm.chat_to_responses({"messages": [{"role": "user", "content": "n?"}],
                                     "response_format": {"type": "json_schema", "json_schema": {
                                         "name": "count", "schema": schema, "strict": True}},
                                     "verbosity": "low"}, MODEL)
        assert out["text"] == {"format": {"type": "json_schema", "name": "count",
                                          "schema": schema, "strict": True}, "verbosity": "low"}

    def test_images_and_files_become_input_parts(self):
        out = ocm.chat_to_responses({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://x/cat.png", "detail": "high"}},
            {"type": "image_url", "image_url": "data:image/png;base64,AAAA"},
            {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBE",
                                      "filename": "a.pdf"}}]}]}, MODEL)
        assert out["input"][0]["content"] == [
            {"type": "input_image", "image_url": "https://x/cat.png", "detail": "high"},
            {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "auto"},
            {"type": "input_file", "file_data": "data:application/pdf;base64,JVBE",
             "filename": "a.pdf"}]

    @pytest.mark.parametrize("choice, sent", [
        ("required", "required"), ("none", "none"),
        ({"type": "function", "function": {"name": "get_weather"}},
         {"type": "function", "name": "get_weather"})])
    def test_tool_choice(self, choice, sent):
        out = ocm.chat_to_responses({"messages": [{"role": "user", "content": "x"}],
                                     "tools": [WEATHER_TOOL], "tool_choice": choice}, MODEL)
        assert out["tool_choice"] == sent

    def test_a_long_tool_name_is_shortened_the_same_way_everywhere(self):
        long_name = "mcp__a_server_with_a_long_name__a_tool_with_an_even_longer_name_indeed"
        tool = {"type": "function", "function": {"name": long_name, "parameters": None}}
        call = {"id": "call_9", "type": "function",
                "function": {"name": long_name, "arguments": {"q": "\u00e9"}}}
        body = {"messages": [{"role": "assistant", "tool_calls": [call]}], "tools": [tool],
                "tool_choice": {"type": "function", "function": {"name": long_name}}}
        out = ocm.chat_to_responses(body, MODEL)
        short = out["tools"][0]["name"]
        assert len(short) == 64 and short.startswith("mcp__a_server") and short != long_name
        assert out["input"][0]["name"] == out["tool_choice"]["name"] == short
        assert out["input"][0]["arguments"] == '{"q":"\u00e9"}'
        assert out["tools"][0]["parameters"] == {"type": "object", "properties": {}}
        assert ocm.request_tool_names(body) == {short: long_name}
        assert ocm.backend_tool_name("odd.name") != "odd.name"

    @pytest.mark.parametrize("tier, sent", [("fast", "priority"), ("flex", "flex"),
                                            ("auto", None)])
    def test_service_tier(self, tier, sent):
        out = ocm.chat_to_responses({"messages": [{"role": "user", "content": "x"}],
                                     "service_tier": tier}, MODEL)
        assert out.get("service_tier") == sent

    @pytest.mark.parametrize("body, where", [
        ([], "body"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"messages": ["hi"]}, "messages.0"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.tool_call_id"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
         "messages.0.content.0.type"),
        ({"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "f"}}]}]},
         "messages.0.content.0.file"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}]},
         "messages.0.tool_calls.0.id"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "web_search"}]},
         "tools.0"),
        ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "sometimes"},
         "tool_choice"),
        ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "yaml"}},
         "response_format"),
        ({"messages": [{"role": "user", "content": "x"}], "stop": [1]}, "stop"),
        ({"messages": [{"role": "user", "content": "x"}], "functions": []}, "functions"),
    ])
    def test_bad_requests_get_a_400_that_names_the_field(self, body, where):
        with pytest.raises(ocm.HTTPError) as info:
            ocm.chat_to_responses(body, MODEL)
        assert (info.value.status, info.value.error_type) == (400, "invalid_request_error")
        assert info.value.message.startswith(where + ": "), info.value.message


# == Chat Completions: answers ================================================

def chunk(delta, finish=None, **extra):
    out = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000,
           "model": MODEL}
    out.update(extra)
    out["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    return out


def data_lines(*payloads):
    return b"".join(b"data: " + json.dumps(p, separators=(",", ":")).encode() + b"\n\n"
                    for p in payloads)


class TestChatStream:
    def test_text_and_a_tool_call_as_openai_chunks(self):
        out = run(chat_writer(), [TEXT_AND_TOOL])
        assert out == data_lines(
            chunk({"role": "assistant", "content": ""}),
            chunk({"content": "Hel"}), chunk({"content": "lo"}),
            chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                   "function": {"name": "get_weather", "arguments": ""}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
            chunk({}, "tool_calls", service_tier="default")) + b"data: [DONE]\n\n"

    def test_the_usage_chunk_comes_when_asked(self):
        request = {"stream_options": {"include_usage": True}}
        events = events_of(run(chat_writer(request), [sse(created(), *text_events(["x"]),
                                                          completed())]))
        assert all(payload["usage"] is None for _, payload in events[:-2])
        assert events[-2][1] == {
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000,
            "model": MODEL, "service_tier": "default", "choices": [],
            "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17,
                      "prompt_tokens_details": {"cached_tokens": 4},
                      "completion_tokens_details": {"reasoning_tokens": 2}}}
        assert events[-1] == (None, "[DONE]")
        # accounting can read the translated chunk too, not only the upstream event
        record = ocm.usage_record_from_event(events[-2][1])
        assert (record.model, record.input_tokens, record.output_tokens,
                record.cached_tokens) == (MODEL, 12, 5, 4)

    def test_split_at_every_offset_and_byte_by_byte_gives_the_same_bytes(self):
        whole = run(chat_writer(), [TEXT_AND_TOOL])
        for cut in range(1, len(TEXT_AND_TOOL)):
            assert run(chat_writer(), [TEXT_AND_TOOL[:cut], TEXT_AND_TOOL[cut:]]) == whole, cut
        assert run(chat_writer(), [TEXT_AND_TOOL[i:i + 1]
                                   for i in range(len(TEXT_AND_TOOL))]) == whole

    def test_unicode_split_inside_characters_arrives_whole(self):
        text = "caf\u00e9 \U0001F600 \u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627 \u4f60\u597d"
        stream = sse(created(), *text_events([text[:5], text[5:11], text[11:]]), completed())
        raw = stream.replace(json.dumps(text[:5]).encode(),
                             json.dumps(text[:5], ensure_ascii=False).encode())
        assert raw != stream  # raw UTF-8 on the wire, not only \\u escapes
        whole = run(chat_writer(), [raw])
        for cut in range(1, len(raw)):
            assert run(chat_writer(), [raw[:cut], raw[cut:]]) == whole
        assert chat_accumulate(whole)["content"] == text

    def test_parallel_tool_calls_get_their_own_index(self):
        stream = sse(created(), *call_events(['{"city":"Paris"}'], 0, "call_a", ident="fc_a"),
                     *call_events(['{"city":', '"Rome"}'], 1, "call_b", "get_time", "fc_b"),
                     completed())
        result = chat_accumulate(run(chat_writer(), [stream]))
        assert result["tool_calls"] == [
            {"id": "call_a", "name": "get_weather", "arguments": '{"city":"Paris"}'},
            {"id": "call_b", "name": "get_time", "arguments": '{"city":"Rome"}'}]
        assert result["finish_reason"] == "tool_calls" and result["content"] == ""

    def test_long_arguments_in_many_deltas(self):
        arguments = json.dumps({"content": "\u00e9x\U0001F600" * 15000}, ensure_ascii=False)
        assert len(arguments.encode()) > 100000
        pieces = [arguments[i:i + 37] for i in range(0, len(arguments), 37)]
        stream = sse(created(), *call_events(pieces), completed())
        whole = run(chat_writer(), [stream])
        assert chat_accumulate(whole)["tool_calls"][0]["arguments"] == arguments
        for cut in range(1, len(stream), len(stream) // 10):
            assert run(chat_writer(), [stream[:cut], stream[cut:]]) == whole

    def test_items_that_arrive_only_whole(self):
        stream = sse(created(), {"type": "response.output_item.done",
                                 "item": message_item("Whole text")},
                     {"type": "response.output_item.done", "item": call_item('{"a":1}')},
                     completed())
        result = chat_accumulate(run(chat_writer(), [stream]))
        assert result["content"] == "Whole text"
        assert result["tool_calls"] == [{"id": "call_1", "name": "get_weather",
                                         "arguments": '{"a":1}'}]

    def test_what_the_deltas_missed_comes_from_the_done_item(self):
        events = text_events(["Hel"])
        events[-1] = {"type": "response.output_item.done", "output_index": 0,
                      "item": message_item("Hello")}
        calls = call_events(['{"a"'], index=1)
        calls[-1]["item"] = call_item('{"a":2}')
        result = chat_accumulate(run(chat_writer(), [sse(*events, *calls, completed())]))
        assert result["content"] == "Hello"
        assert result["tool_calls"][0]["arguments"] == '{"a":2}'

    def test_the_minimal_stream_codex_accepts(self):
        stream = sse({"type": "response.output_item.done", "item": {
            "type": "message", "role": "assistant",
            "content": [{"type": "output_text", "text": "Hi"}]}},
            {"type": "response.completed", "response": {"id": "r1", "usage": usage()}})
        result = chat_accumulate(run(chat_writer(), [stream]))
        assert (result["content"], result["finish_reason"], result["done"]) == ("Hi", "stop",
                                                                               True)

    def test_a_failure_midway_is_an_openai_error_event_without_done(self):
        stream = sse(created(), *text_events(["par"])[:2],
                     failed("rate_limit_exceeded", "Rate limit reached"), completed())
        writer = chat_writer()
        out = run(writer, [stream])
        assert out.endswith(data_lines({"error": {
            "message": "Rate limit reached", "type": "rate_limit_error", "param": None,
            "code": "rate_limit_exceeded"}}))
        result = chat_accumulate(out)
        assert result["content"] == "par" and not result["done"]
        assert writer.failure.status == 429 and writer.done

    def test_a_stream_without_a_terminal_event_ends_in_an_error(self):
        writer = chat_writer()
        result = chat_accumulate(run(writer, [sse(created(), *text_events(["partial"]))]))
        assert result["error"]["message"] == ocm.STREAM_CUT_MESSAGE
        assert result["error"]["type"] == "api_error" and not result["done"]
        assert writer.failure is ocm.STREAM_CUT

    def test_an_empty_answer(self):
        result = chat_accumulate(run(chat_writer(), [sse(created(), completed())]))
        assert (result["content"], result["tool_calls"], result["finish_reason"]) == (
            "", [], "stop")

    @pytest.mark.parametrize("reason, finish", [("max_output_tokens", "length"),
                                                ("content_filter", "content_filter")])
    def test_incomplete_answers(self, reason, finish):
        result = chat_accumulate(run(chat_writer(), [sse(*text_events(["a"]),
                                                         incomplete(reason))]))
        assert result["finish_reason"] == finish

    def test_a_stop_sequence_cuts_the_text_and_drops_what_follows(self):
        stream = sse(created(), *text_events(["Hello E", "ND world"]),
                     *call_events(["{}"], index=1), completed())
        for cut in range(1, len(stream), 7):
            result = chat_accumulate(run(chat_writer({"stop": "END"}),
                                         [stream[:cut], stream[cut:]]))
            assert (result["content"], result["tool_calls"], result["finish_reason"]) == (
                "Hello ", [], "stop")

    def test_shortened_tool_names_go_back_to_the_client_name(self):
        long_name = "x" * 80
        request = {"tools": [{"type": "function", "function": {"name": long_name}}]}
        short = ocm.backend_tool_name(long_name)
        stream = sse(*call_events(["{}"], name=short), completed())
        assert chat_accumulate(run(chat_writer(request), [stream]))["tool_calls"][0][
            "name"] == long_name

    def test_upstream_accounting_still_reads_the_original_events(self):
        events = upstream_events(TEXT_AND_TOOL)
        writer = chat_writer()
        for event in events:
            writer.feed(event)
        records = [r for r in map(ocm.usage_record_from_event, events) if r]
        assert [(r.model, r.service_tier, r.input_tokens, r.output_tokens, r.cached_tokens)
                for r in records] == [(MODEL, "default", 12, 5, 4)]
        assert (writer.model, writer.service_tier, writer.usage) == (MODEL, "default", usage())

    def test_upstream_text_cannot_inject_events(self):
        hostile = 'x\n\ndata: [DONE]\n\nevent: error\r\n"\\ \ud800 \u2028'
        stream = sse(*text_events([hostile[:7], hostile[7:]]),
                     *call_events([json.dumps(hostile)], 1), completed())
        for writer in (chat_writer(), claude_writer()):
            out = run(writer, [stream])
            out.decode("ascii")  # escaped: even the lone surrogate
            assert out.count(b"\n\n") == len(events_of(out))
        result = chat_accumulate(run(chat_writer(), [stream]))
        assert result["content"] == hostile
        assert json.loads(result["tool_calls"][0]["arguments"]) == hostile

    def test_a_failure_before_anything_else_is_only_the_error(self):
        out = run(chat_writer(), [sse(failed("invalid_prompt", "Bad prompt"))])
        assert out == data_lines({"error": {"message": "Bad prompt",
                                            "type": "invalid_request_error", "param": None,
                                            "code": "invalid_prompt"}})
        out = run(claude_writer(), [sse(failed("invalid_prompt", "Bad prompt"))])
        assert out == claude_events({"type": "error", "error": {
            "type": "invalid_request_error", "message": "Bad prompt"}})

    def test_keepalive_is_a_comment(self):
        assert chat_writer().keepalive() == b": keep-alive\n\n"


class TestChatCompletion:
    def test_text_and_tool_calls(self):
        status, response = assemble(upstream_events(TEXT_AND_TOOL))
        assert ocm.chat_completion_from_response({}, response, "chatcmpl-1", 1700000000) == {
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000,
            "model": MODEL, "service_tier": "default",
            "choices": [{"index": 0, "logprobs": None, "finish_reason": "tool_calls",
                         "message": {"role": "assistant", "content": "Hello", "refusal": None,
                                     "tool_calls": [{"id": "call_1", "type": "function",
                                                     "function": {"name": "get_weather",
                                                                  "arguments":
                                                                      '{"city":"Paris"}'}}]}}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17,
                      "prompt_tokens_details": {"cached_tokens": 4},
                      "completion_tokens_details": {"reasoning_tokens": 2}}}

    def test_only_tool_calls_has_null_content_and_empty_answer_has_empty_text(self):
        _, response = assemble([*call_events(["{}"]), completed()])
        message = ocm.chat_completion_from_response({}, response, "c", 1)["choices"][0]["message"]
        assert message["content"] is None and len(message["tool_calls"]) == 1
        _, response = assemble([completed()])
        completion = ocm.chat_completion_from_response({"model": "m"}, response, "c", 1)
        assert completion["choices"][0]["message"] == {"role": "assistant", "content": "",
                                                       "refusal": None}
        assert completion["choices"][0]["finish_reason"] == "stop"

    def test_stop_and_length(self):
        _, response = assemble([*text_events(["a STOP b"]), *call_events(["{}"], 1), completed()])
        choice = ocm.chat_completion_from_response({"stop": ["STOP"]}, response, "c", 1)[
            "choices"][0]
        assert choice["message"]["content"] == "a " and "tool_calls" not in choice["message"]
        assert choice["finish_reason"] == "stop"
        _, response = assemble([*text_events(["a"]), incomplete()])
        assert ocm.chat_completion_from_response({}, response, "c", 1)["choices"][0][
            "finish_reason"] == "length"


# == Anthropic Messages: requests =============================================

CLAUDE_SCHEMA = {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
                 "properties": {"command": {"type": "string"}}, "required": ["command"],
                 "additionalProperties": False}


def claude_code_body(**extra):
    """What Claude Code sends (PROTOCOL.md section 11), shortened."""
    body = {
        "model": "claude-opus-5-5", "max_tokens": 128000, "stream": True,
        "metadata": {"user_id": "user_abc_account_def_session_123"},
        "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.332;"},
                   {"type": "text", "text": "You are Claude Code.",
                    "cache_control": {"type": "ephemeral"}},
                   {"type": "text", "text": "Be careful."}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "List files",
                                          "cache_control": {"type": "ephemeral"}}]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Listing."},
                {"type": "tool_use", "id": "call_x1", "name": "Bash",
                 "input": {"command": "ls"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "call_x1", "content": "a.txt\nb.txt"},
                {"type": "text", "text": "Thanks"}]}],
        "tools": [{"name": "Bash", "description": "Run a command", "input_schema": CLAUDE_SCHEMA,
                   "cache_control": {"type": "ephemeral"}}],
        "thinking": {"type": "adaptive"}, "output_config": {"effort": "medium"},
        "context_management": {"edits": []}, "temperature": 1,
    }
    body.update(extra)
    return body


class TestAnthropicRequest:
    def test_what_claude_code_sends(self):
        out = ocm.messages_to_responses(claude_code_body(), MODEL)
        key = out.pop("prompt_cache_key")
        assert key.startswith("claude-") and len(key) == 39 and "session" not in key
        assert out == {
            "model": MODEL, "instructions": "You are Claude Code.\n\nBe careful.",
            "input": [
                {"type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": "List files"}]},
                {"type": "message", "role": "assistant",
                 "content": [{"type": "output_text", "text": "Listing."}]},
                {"type": "function_call", "call_id": "call_x1", "name": "Bash",
                 "arguments": '{"command":"ls"}'},
                {"type": "function_call_output", "call_id": "call_x1", "output": "a.txt\nb.txt"},
                {"type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": "Thanks"}]}],
            "tools": [{"type": "function", "name": "Bash", "description": "Run a command",
                       "parameters": {"type": "object",
                                      "properties": {"command": {"type": "string"}},
                                      "required": ["command"], "additionalProperties": False},
                       "strict": False}],
            "reasoning": {"effort": "medium", "summary": "auto"},
            "stream": True, "store": False, "include": ["reasoning.encrypted_content"]}
        assert ocm.messages_to_responses(claude_code_body(), MODEL)["prompt_cache_key"] == key

    def test_string_system_and_content(self):
        out = ocm.messages_to_responses({"system": "Sys", "messages": [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, MODEL)
        assert out == {"model": MODEL, "instructions": "Sys", "input": [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
            {"type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": "yo"}]}],
            "stream": True, "store": False}

    def test_system_messages_between_turns_become_developer_messages(self):
        """Claude Code 2.1.197 sends its agent list as a system message after the first user one."""
        out = ocm.messages_to_responses({"messages": [
            {"role": "user", "content": "hi"},
            {"role": "system", "content": [{"type": "text", "text": "Agents: claude, Explore"}]},
            {"role": "system", "content": ""}, {"role": "assistant", "content": "yo"}]}, MODEL)
        assert out["input"] == [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
            {"type": "message", "role": "developer",
             "content": [{"type": "input_text", "text": "Agents: claude, Explore"}]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "yo"}]}]
        with pytest.raises(ocm.HTTPError, match="messages.0.role: must be user, assistant or system"):
            ocm.messages_to_responses({"messages": [{"role": "tool", "content": "x"}]}, MODEL)

    def test_images_and_documents(self):
        out = ocm.messages_to_responses({"messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "iVBO"}},
            {"type": "image", "source": {"type": "url", "url": "https://x/a.jpg"}},
            {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                            "data": "JVBE"}, "title": "spec.pdf"},
            {"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                            "data": "plain"}},
            {"type": "text", "text": "What is this?"}]}]}, MODEL)
        assert out["input"][0]["content"] == [
            {"type": "input_image", "detail": "auto", "image_url": "data:image/png;base64,iVBO"},
            {"type": "input_image", "detail": "auto", "image_url": "https://x/a.jpg"},
            {"type": "input_file", "filename": "spec.pdf",
             "file_data": "data:application/pdf;base64,JVBE"},
            {"type": "input_text", "text": "plain"},
            {"type": "input_text", "text": "What is this?"}]

    def test_tool_results_with_errors_and_images(self):
        out = ocm.messages_to_responses({"messages": [{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t1", "is_error": True,
             "content": [{"type": "text", "text": "command not found"}]},
            {"type": "tool_result", "tool_use_id": "t2", "is_error": True,
             "content": "Error: exit 1"},
            {"type": "tool_result", "tool_use_id": "t3", "content": [
                {"type": "text", "text": "screenshot:"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": "iVBO"}}]},
            {"type": "tool_result", "tool_use_id": "t4"}]}]}, MODEL)
        assert out["input"] == [
            {"type": "function_call_output", "call_id": "t1",
             "output": "Error: command not found"},
            {"type": "function_call_output", "call_id": "t2", "output": "Error: exit 1"},
            {"type": "function_call_output", "call_id": "t3", "output": [
                {"type": "input_text", "text": "screenshot:"},
                {"type": "input_image", "detail": "auto",
                 "image_url": "data:image/png;base64,iVBO"}]},
            {"type": "function_call_output", "call_id": "t4", "output": ""}]

    @pytest.mark.parametrize("choice, sent, parallel", [
        ({"type": "auto"}, "auto", None), ({"type": "none"}, "none", None),
        ({"type": "any", "disable_parallel_tool_use": True}, "required", False),
        ({"type": "tool", "name": "Bash", "disable_parallel_tool_use": False},
         {"type": "function", "name": "Bash"}, True)])
    def test_tool_choice(self, choice, sent, parallel):
        out = ocm.messages_to_responses(claude_code_body(tool_choice=choice), MODEL)
        assert out["tool_choice"] == sent
        assert out.get("parallel_tool_calls") is parallel

    @pytest.mark.parametrize("thinking, config, reasoning", [
        ({"type": "enabled", "budget_tokens": 1024}, None, {"effort": "low", "summary": "auto"}),
        ({"type": "enabled", "budget_tokens": 4000}, None,
         {"effort": "medium", "summary": "auto"}),
        ({"type": "enabled", "budget_tokens": 10000}, None, {"effort": "high", "summary": "auto"}),
        ({"type": "enabled", "budget_tokens": 31999}, None,
         {"effort": "xhigh", "summary": "auto"}),
        ({"type": "adaptive"}, {"effort": "max"}, {"effort": "xhigh", "summary": "auto"}),
        ({"type": "adaptive"}, None, {"summary": "auto"}),
        ({"type": "disabled"}, {"effort": "high"}, None),
        (None, {"effort": "low"}, {"effort": "low"}),
        (None, None, None)])
    def test_thinking_becomes_reasoning(self, thinking, config, reasoning):
        body = {"messages": [{"role": "user", "content": "x"}]}
        if thinking:
            body["thinking"] = thinking
        if config:
            body["output_config"] = config
        out = ocm.messages_to_responses(body, MODEL)
        assert out.get("reasoning") == reasoning
        assert ("include" in out) == bool(reasoning and "summary" in reasoning)

    def test_thinking_blocks_ocm_wrote_carry_reasoning_into_the_next_turn(self):
        signature = ocm.REASONING_SIGNATURE_PREFIX + "gAAAA-secret"
        out = ocm.messages_to_responses({"messages": [{"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Let me look.", "signature": signature},
            {"type": "redacted_thinking", "data": signature},
            {"type": "thinking", "thinking": "Claude's own", "signature": "EqQBCgIYAh"},
            {"type": "redacted_thinking", "data": "EmwKAhgB"},
            {"type": "text", "text": "Done."}]}]}, MODEL)
        assert out["input"] == [
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Let me look."}],
             "encrypted_content": "gAAAA-secret"},
            {"type": "reasoning", "summary": [], "encrypted_content": "gAAAA-secret"},
            {"type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": "Done."}]}]

    def test_web_search_maps_and_other_server_tools_are_refused(self):
        out = ocm.messages_to_responses(claude_code_body(tools=[
            {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]), MODEL)
        assert out["tools"] == [{"type": "web_search"}]
        with pytest.raises(ocm.HTTPError) as info:
            ocm.messages_to_responses(claude_code_body(tools=[
                {"type": "bash_20250124", "name": "bash"}]), MODEL)
        assert info.value.message.startswith("tools.0.type: ")

    def test_long_mcp_tool_names_round_trip(self):
        name = "mcp__plugin_with_a_long_name__tool_with_a_name_that_goes_on_and_on_and_on"
        body = claude_code_body(tools=[{"name": name, "input_schema": {}}], messages=[
            {"role": "assistant", "content": [{"type": "tool_use", "id": "c1", "name": name,
                                               "input": {}}]}])
        out = ocm.messages_to_responses(body, MODEL)
        short = ocm.backend_tool_name(name)
        assert out["tools"][0]["name"] == out["input"][0]["name"] == short != name
        message, _ = claude_accumulate(run(claude_writer(body), [
            sse(*call_events(["{}"], call_id="c2", name=short), completed())]))
        assert message["content"][0]["name"] == name

    @pytest.mark.parametrize("body, where", [
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": [{"type": "tool_use"}]}]},
         "messages.0.content.0.type"),
        ({"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]},
         "messages.0.content.0.tool_use_id"),
        ({"messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "file", "file_id": "f"}}]}]},
         "messages.0.content.0.source"),
        ({"messages": [{"role": "user", "content": "x"}], "stop_sequences": "END"},
         "stop_sequences"),
        ({"messages": [{"role": "user", "content": "x"}], "system": 3}, "system"),
        ({"messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "maybe"}},
         "tool_choice"),
    ])
    def test_bad_requests_get_a_400_that_names_the_field(self, body, where):
        with pytest.raises(ocm.HTTPError) as info:
            ocm.messages_to_responses(body, MODEL)
        assert (info.value.status, info.value.error_type) == (400, "invalid_request_error")
        assert info.value.message.startswith(where + ": "), info.value.message

    def test_count_tokens_is_an_estimate_from_bytes(self):
        body = {"system": "x" * 40, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "\u00e9" * 10},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "A" * 10000}}]}]}
        # 40 + 20 bytes of text over 4, plus one image
        assert ocm.count_message_tokens(body) == {"input_tokens": 15 + ocm.IMAGE_TOKEN_ESTIMATE}
        tools = claude_code_body()
        assert ocm.count_message_tokens(tools)["input_tokens"] > 50
        with pytest.raises(ocm.HTTPError):
            ocm.count_message_tokens({"messages": []})


# == Anthropic Messages: answers ==============================================

def claude_events(*events):
    return b"".join(b"event: " + e["type"].encode() + b"\n" + data_lines(e) for e in events)


START = {"type": "message_start", "message": {
    "id": "msg_1", "type": "message", "role": "assistant", "model": MODEL, "content": [],
    "stop_reason": None, "stop_sequence": None,
    "usage": {"input_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
              "output_tokens": 0}}}
FINAL_USAGE = {"input_tokens": 8, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 4,
               "output_tokens": 5}


class TestAnthropicStream:
    def test_text_and_a_tool_call_as_anthropic_events(self):
        out = run(claude_writer(), [TEXT_AND_TOOL])
        assert out == claude_events(
            START,
            {"type": "content_block_start", "index": 0,
             "content_block": {"type": "text", "text": ""}},
            {"type": "content_block_delta", "index": 0,
             "delta": {"type": "text_delta", "text": "Hel"}},
            {"type": "content_block_delta", "index": 0,
             "delta": {"type": "text_delta", "text": "lo"}},
            {"type": "content_block_stop", "index": 0},
            {"type": "content_block_start", "index": 1, "content_block": {
                "type": "tool_use", "id": "call_1", "name": "get_weather", "input": {}}},
            {"type": "content_block_delta", "index": 1,
             "delta": {"type": "input_json_delta", "partial_json": '{"city":'}},
            {"type": "content_block_delta", "index": 1,
             "delta": {"type": "input_json_delta", "partial_json": '"Paris"}'}},
            {"type": "content_block_stop", "index": 1},
            {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
             "usage": FINAL_USAGE},
            {"type": "message_stop"})

    def test_split_at_every_offset_and_byte_by_byte_gives_the_same_bytes(self):
        stream = sse(created(), *reasoning_events(["Think \u00e9", "more"]),
                     *text_events(["Hi \U0001F600"], 1, "msg_2"),
                     *call_events(['{"x":', '1}'], 2), completed())
        whole = run(claude_writer(), [stream])
        for cut in range(1, len(stream)):
            assert run(claude_writer(), [stream[:cut], stream[cut:]]) == whole, cut
        assert run(claude_writer(), [stream[i:i + 1] for i in range(len(stream))]) == whole

    def test_reasoning_becomes_a_thinking_block_with_the_signature(self):
        stream = sse(created(), *reasoning_events(["First part.", "Second."]),
                     *text_events(["Answer"], 1), completed())
        message, error = claude_accumulate(run(claude_writer(), [stream]))
        assert error is None
        assert message["content"] == [
            {"type": "thinking", "thinking": "First part.\n\nSecond.",
             "signature": ocm.REASONING_SIGNATURE_PREFIX + "gAAAA-secret"},
            {"type": "text", "text": "Answer"}]
        # and the next turn gives the backend its reasoning back
        turn = ocm.messages_to_responses({"messages": [
            {"role": "assistant", "content": message["content"]}]}, MODEL)
        assert turn["input"][0] == {"type": "reasoning", "summary": [
            {"type": "summary_text", "text": "First part.\n\nSecond."}],
            "encrypted_content": "gAAAA-secret"}

    def test_reasoning_without_summary_is_redacted_thinking_and_without_secret_is_nothing(self):
        stream = sse(*reasoning_events([]), *reasoning_events([], 1, secret="", ident="rs_2"),
                     *text_events(["A"], 2), completed())
        message, _ = claude_accumulate(run(claude_writer(), [stream]))
        assert message["content"] == [
            {"type": "redacted_thinking", "data": ocm.REASONING_SIGNATURE_PREFIX + "gAAAA-secret"},
            {"type": "text", "text": "A"}]

    def test_message_start_carries_the_input_estimate_and_the_end_the_real_usage(self):
        message, _ = claude_accumulate(run(claude_writer(input_tokens=42),
                                           [sse(*text_events(["x"]), completed())]))
        assert message["usage"] == FINAL_USAGE
        first = events_of(run(claude_writer(input_tokens=42), [sse(completed())]))[0][1]
        assert first["message"]["usage"]["input_tokens"] == 42

    @pytest.mark.parametrize("event, error_type", [
        (failed(), "api_error"),
        (failed("rate_limit_exceeded", "Slow down"), "rate_limit_error"),
        (failed("server_is_overloaded", "Busy"), "overloaded_error"),
        (failed("context_length_exceeded", "Too long"), "invalid_request_error"),
    ])
    def test_a_failure_midway_is_an_anthropic_error_event(self, event, error_type):
        out = run(claude_writer(), [sse(created(), *text_events(["par"])[:2], event)])
        assert out.endswith(claude_events({"type": "error", "error": {
            "type": error_type, "message": event["response"]["error"]["message"]}}))
        message, error = claude_accumulate(out)
        assert message["content"] == [{"type": "text", "text": "par"}]
        assert message["stop_reason"] is None

    def test_a_stream_without_a_terminal_event_ends_in_an_error(self):
        message, error = claude_accumulate(run(claude_writer(),
                                               [sse(created(), *text_events(["x"]))]))
        assert error == {"type": "api_error", "message": ocm.STREAM_CUT_MESSAGE}
        _, error = claude_accumulate(run(claude_writer(), [b""]))
        assert error["message"] == ocm.STREAM_CUT_MESSAGE

    def test_an_empty_answer(self):
        message, _ = claude_accumulate(run(claude_writer(), [sse(created(), completed())]))
        assert (message["content"], message["stop_reason"]) == ([], "end_turn")

    @pytest.mark.parametrize("reason, stop_reason", [("max_output_tokens", "max_tokens"),
                                                     ("content_filter", "refusal")])
    def test_incomplete_answers(self, reason, stop_reason):
        message, _ = claude_accumulate(run(claude_writer(), [sse(*text_events(["a"]),
                                                                 incomplete(reason))]))
        assert message["stop_reason"] == stop_reason

    def test_stop_sequences(self):
        stream = sse(*text_events(["Say A", "BC then"]), *call_events(["{}"], 1), completed())
        message, _ = claude_accumulate(run(claude_writer({"stop_sequences": ["XYZ", "ABC"]}),
                                           [stream]))
        assert message["content"] == [{"type": "text", "text": "Say "}]
        assert (message["stop_reason"], message["stop_sequence"]) == ("stop_sequence", "ABC")

    def test_unicode_long_arguments_and_parallel_calls(self):
        text = "\u05e9\u05dc\u05d5\u05dd \U0001F600 \u4f60\u597d"
        arguments = json.dumps({"data": "\u00e9\U0001F600x" * 15000}, ensure_ascii=False)
        stream = sse(*text_events([text[:3], text[3:]]),
                     *call_events([arguments[i:i + 101] for i in range(0, len(arguments), 101)],
                                  1, "call_a", "write", "fc_a"),
                     *call_events(['{"b":2}'], 2, "call_b", "read", "fc_b"), completed())
        assert len(arguments.encode()) > 100000
        whole = run(claude_writer(), [stream])
        message, _ = claude_accumulate(whole)
        assert message["content"] == [
            {"type": "text", "text": text},
            {"type": "tool_use", "id": "call_a", "name": "write", "input": json.loads(arguments)},
            {"type": "tool_use", "id": "call_b", "name": "read", "input": {"b": 2}}]
        for cut in range(1, len(stream), len(stream) // 10):
            assert run(claude_writer(), [stream[:cut], stream[cut:]]) == whole

    def test_keepalive_is_a_ping(self):
        assert claude_writer().keepalive() == b'event: ping\ndata: {"type":"ping"}\n\n'


class TestAnthropicMessage:
    def test_the_non_streaming_message(self):
        stream = sse(created(), *reasoning_events(["Hmm."]), *text_events(["Hello"], 1),
                     *call_events(['{"city":"Paris"}'], 2), completed())
        status, response = assemble(upstream_events(stream))
        assert ocm.anthropic_message_from_response({}, response, "msg_1") == {
            "id": "msg_1", "type": "message", "role": "assistant", "model": MODEL,
            "content": [
                {"type": "thinking", "thinking": "Hmm.",
                 "signature": ocm.REASONING_SIGNATURE_PREFIX + "gAAAA-secret"},
                {"type": "text", "text": "Hello"},
                {"type": "tool_use", "id": "call_1", "name": "get_weather",
                 "input": {"city": "Paris"}}],
            "stop_reason": "tool_use", "stop_sequence": None, "usage": FINAL_USAGE}

    def test_stop_sequence_and_max_tokens(self):
        _, response = assemble([*text_events(["one. two."]), completed()])
        message = ocm.anthropic_message_from_response({"stop_sequences": ["."]}, response, "m")
        assert message["content"] == [{"type": "text", "text": "one"}]
        assert (message["stop_reason"], message["stop_sequence"]) == ("stop_sequence", ".")
        _, response = assemble([*text_events(["x"]), incomplete()])
        assert ocm.anthropic_message_from_response({}, response, "m")["stop_reason"] == \
            "max_tokens"


class TestAnthropicErrors:
    @pytest.mark.parametrize("status, error_type, expected", [
        (400, "invalid_request_error", "invalid_request_error"),
        (401, "authentication_error", "authentication_error"),
        (403, "", "permission_error"), (404, "", "not_found_error"),
        (413, "", "request_too_large"), (429, "usage_limit_reached", "rate_limit_error"),
        (500, "", "api_error"), (502, "api_error", "api_error"), (503, "", "overloaded_error"),
        (409, "", "invalid_request_error"), (504, "", "api_error"),
        (200, "rate_limit_error", "rate_limit_error"), (200, "insufficient_quota",
                                                        "rate_limit_error"),
        (200, "server_error", "api_error")])
    def test_error_types(self, status, error_type, expected):
        assert ocm.anthropic_error_type(status, error_type) == expected
        assert ocm.anthropic_error_body(status, error_type, "m") == {
            "type": "error", "error": {"type": expected, "message": "m"}}

    @pytest.mark.parametrize("body, fields", [
        (b'{"error":{"type":"usage_limit_reached","message":"Limit","resets_at":1}}',
         ("usage_limit_reached", "Limit")),
        (b'{"error":{"code":"invalid_value","message":"Bad"}}', ("invalid_value", "Bad")),
        (b'{"detail":"Unsupported parameter: max_output_tokens"}',
         ("", "Unsupported parameter: max_output_tokens")),
        (b'{"error":"nope"}', ("", "nope")),
        (b'{"detail":[{"loc":["body"]}]}', ("", '[{"loc": ["body"]}]')),
        (b"<html>Bad gateway</html>\n", ("", "<html>Bad gateway</html>")),
        (b"", ("", "")), (b"{}", ("", ""))])
    def test_upstream_error_bodies(self, body, fields):
        assert ocm.upstream_error_fields(body) == fields


# == Streams and non-streaming answers agree ==================================

PIECES = st.text(alphabet="ab \u00e9\U0001F600\"\\\n", min_size=1, max_size=6)
ITEMS = st.lists(st.one_of(
    st.tuples(st.just("text"), st.lists(PIECES, min_size=1, max_size=4), st.booleans()),
    st.tuples(st.just("call"), st.lists(PIECES, max_size=4), st.booleans()),
    st.tuples(st.just("reasoning"), st.lists(PIECES, max_size=2), st.booleans())),
    max_size=4)


def random_stream(items, ending):
    events, index = [created()], 0
    for kind, pieces, streamed in items:
        if kind == "text":
            new = text_events(pieces, index, "msg_%d" % index)
        elif kind == "call":
            arguments = json.dumps({"v": "".join(pieces)})
            new = call_events([arguments[:3], arguments[3:]], index, "call_%d" % index,
                              "tool_%d" % index, "fc_%d" % index)
        else:
            new = reasoning_events(pieces, index, "s%d" % index, "rs_%d" % index)
        events += new if streamed else new[-1:]
        index += 1
    return events + [ending]


class TestAgreement:
    @fuzz_settings
    @given(ITEMS, st.sampled_from([completed(), incomplete()]), st.data())
    def test_chat_stream_matches_the_chat_completion(self, items, ending, data):
        events = random_stream(items, ending)
        stream = sse(*events)
        cuts = sorted(data.draw(st.lists(st.integers(1, len(stream)), max_size=4)))
        pieces = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
        streamed = chat_accumulate(run(chat_writer(), pieces))
        _, response = assemble(events)
        choice = ocm.chat_completion_from_response({}, response, "chatcmpl-1", 1)["choices"][0]
        calls = [{"id": c["id"], "name": c["function"]["name"],
                  "arguments": c["function"]["arguments"]}
                 for c in choice["message"].get("tool_calls", [])]
        assert streamed["tool_calls"] == calls
        assert streamed["content"] == (choice["message"]["content"] or "")
        assert streamed["finish_reason"] == choice["finish_reason"] and streamed["done"]

    @fuzz_settings
    @given(ITEMS, st.sampled_from([completed(), incomplete()]), st.data())
    def test_anthropic_stream_matches_the_message(self, items, ending, data):
        events = random_stream(items, ending)
        stream = sse(*events)
        cuts = sorted(data.draw(st.lists(st.integers(1, len(stream)), max_size=4)))
        pieces = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
        message, error = claude_accumulate(run(claude_writer(), pieces))
        _, response = assemble(events)
        expected = ocm.anthropic_message_from_response({}, response, "msg_1")
        assert error is None
        # one text block per message item in both; the stream skips empty ones too
        assert message["content"] == expected["content"]
        assert (message["stop_reason"], message["usage"]) == (expected["stop_reason"],
                                                             expected["usage"])


class TestSSEScannerEveryEvent:
    def test_every_event_parses_text_deltas_and_the_default_still_skips_them(self):
        stream = sse({"type": "response.output_text.delta", "delta": "x"}, completed())
        assert [e["type"] for e in upstream_events(stream)] == [
            "response.output_text.delta", "response.completed"]
        default = []
        scanner = ocm.SSEScanner(default.append)
        scanner.feed(stream)
        scanner.finish()
        assert [e["type"] for e in default] == ["response.completed"]
        assert upstream_events(b"data: [DONE]\n\n") == []
