"""The one request pipeline (issue 14): every model request, an HTTP request
or a WebSocket turn, is decided from parsed, canonical data in one place, and
settled exactly once. Each test here is a way around a limit or out of the
accounting that a reviewer with a valid token found, or the variant an
attacker would try next; each fails if its protection is removed."""

import contextlib
import gzip
import json
import logging
import os
import re
import socket
import threading
import time
import zlib

import pytest

import ocm
from test_ocm import CODEX, CODEX_BODY, completed_event, error_of, message_event, read_json, sse, wait_for, write_auth
from test_policy import priced_stream, user
from test_websocket import WSClient, WSUpstream, close_body


def held_stream(gate):
    """A route that streams one event, waits for ``gate`` (10 s at most), then completes."""
    def route(ex):
        ex.start_chunked()
        ex.chunk(sse(message_event()))
        gate.wait(10)
        ex.chunk(sse(completed_event()))
        ex.end_chunked()
    return route


def allowed_only(models=("gpt-5-mini",), **extra):
    return [user(models=list(models), **extra), user("bob", "tok-bob")]


def raw_post(port, path, body, headers=b"", token=b"tok-alice"):
    """One POST with exactly these bytes; the answer's status and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Length: %d\r\n%s"
                  b"Connection: close\r\n\r\n%s" % (path, token, len(body), headers, body))
        answer = b""
        while True:
            data = s.recv(65536)
            if not data:
                break
            answer += data
    head, _, rest = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), rest


# == Canonical paths ===========================================================

class TestCanonicalPath:
    @pytest.mark.parametrize("raw, canonical", [
        ("/v1/responses", "/v1/responses"),
        ("/v1/%72esponses", "/v1/responses"),
        ("/v1/%72%65sponses", "/v1/responses"),
        ("/%76%31/responses", "/v1/responses"),
        ("/v1//responses", "/v1/responses"),
        ("//v1///responses//", "/v1/responses"),
        ("/v1/responses/", "/v1/responses"),
        ("/v1/./responses", "/v1/responses"),
        ("/v1/x/../responses", "/v1/responses"),
        ("/v1/%2e/responses", "/v1/responses"),
        ("/v1/x/%2E%2E/responses", "/v1/responses"),
        ("/v1/responses/%7e", "/v1/responses/~"),
        ("/v1/a%20b", "/v1/a%20b"),
        ("/v1/a%c3%a9", "/v1/a%C3%A9"),
    ])
    def test_one_spelling_per_path(self, raw, canonical):
        assert ocm.canonical_path(raw) == canonical

    @pytest.mark.parametrize("raw", ["/v1/a%2fb", "/v1/a%2Fb", "/v1/a%5cb", "/v1/a\\b", "/v1/%00", "/v1/%zz",
                                     "/v1/%4", "/v1/../metrics", "/v1/%2e%2e/metrics", "/v1/x/../../ocm/v1/usage",
                                     "/../../v1/responses", "/v1/../../etc", "/.."])
    def test_what_has_no_safe_meaning_is_refused(self, raw):
        with pytest.raises(ocm.HTTPError) as info:
            ocm.canonical_path(raw)
        assert info.value.status == 400

    @pytest.mark.parametrize("path", [b"/v1/%72esponses", b"/v1//responses", b"/v1/responses/", b"/v1/./responses",
                                      b"/v1/x/../responses", b"/v1/%2e/responses", b"//v1/responses"])
    def test_every_spelling_is_metered_budgeted_and_sent_canonical(self, make_proxy, fake, tmp_path, path):
        fake.on("POST", "/backend-api/codex/responses", priced_stream(40000))  # $0.10
        proxy = make_proxy(users=[user(budgets=[{"period": "day", "usd": 0.15}])], timezone="UTC",
                           usages_path=str(tmp_path / "usage.json"), budgets_path=str(tmp_path / "b.json"))
        assert raw_post(proxy.port, path, b'{"model": "gpt-5.4"}')[0] == 200
        status, body = raw_post(proxy.port, path, b'{"model": "gpt-5.4"}')
        assert status == 429 and b"daily budget" in body
        assert [r.path for r in fake.api_requests()] == ["/backend-api/codex/responses"]
        combos = proxy.server.usage.to_json()["combinations"]
        assert combos[0]["by_user"]["alice"]["request_count"] == 1

    def test_a_path_that_leaves_v1_never_reaches_upstream(self, proxy, fake):
        assert raw_post(proxy.port, b"/v1/../backend-api/codex/responses", b"{}")[0] == 400
        assert fake.api_requests() == []

    @pytest.mark.parametrize("raw", [b"/v1/../metrics", b"/v1/%2e%2e/metrics", b"/v1/%2E%2E/ocm/v1/usage",
                                     b"/v1/x/../../ocm/v1/usage", b"/v1/x/../../healthz"])
    def test_a_v1_path_is_never_served_as_an_operations_page(self, proxy, raw):
        """A front proxy passing only /v1/ must not let /metrics out: its clients look local."""
        from test_ocm import raw_exchange
        answer = raw_exchange(proxy.port, b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % raw)
        assert answer.startswith(b"HTTP/1.1 400 ") and b"climbs out" in answer


# == The body, parsed once =======================================================

class TestBodyParsing:
    def test_members_in_order_with_duplicates(self):
        text = '{"model": "a", "x": {"model": "nested"}, "model" : "b"}'
        assert ocm.json_object_members(text) == [("model", "a"), ("x", {"model": "nested"}), ("model", "b")]

    @pytest.mark.parametrize("text", ['{}', ' { } ', '{"a":1}', '\n{"a" :\t[1, {"b": null}] , "c": "\\u00e9"}\r\n'])
    def test_valid_objects_match_json_loads(self, text):
        assert dict(ocm.json_object_members(text)) == json.loads(text)

    @pytest.mark.parametrize("text", ['', '[]', '"x"', '{', '{"a"}', '{"a":}', '{"a":1,}', '{"a":1} x',
                                      '{a:1}', '{"a":1 "b":2}', '{"a":tru}', '{"a":"\\x"}'])
    def test_anything_else_is_a_value_error(self, text):
        with pytest.raises(ValueError):
            ocm.json_object_members(text)

    def test_every_prefix_of_a_document_is_refused_and_only_the_whole_accepted(self):
        text = json.dumps({"model": "gpt-5.4", "input": [{"type": "message", "content": "h\u00e9\u20ac"}],
                           "n": 1.5e3, "ok": True, "none": None})
        for end in range(len(text)):
            with pytest.raises(ValueError):
                ocm.json_object_members(text[:end])
        assert dict(ocm.json_object_members(text)) == json.loads(text)

    @pytest.mark.parametrize("raw, model, problem", [
        (b'{"model": "gpt-5.4"}', "gpt-5.4", ""),
        (b'{"\\u006dodel": "gpt\\u002d5.4"}', "gpt-5.4", ""),
        (b'{"model": "a", "model": "b"}', "b", "'model' more than once"),
        (b'{"input": "x"}', "", "names no model"),
        (b'{"model": 5}', "", "not a string"),
        (b'[{"model": "x"}]', "", "not one JSON object"),
        (b'{"model": "x"', "", "not one JSON object"),
        (b"\xff\xfe", "", "not UTF-8"),
        (b"", "", "no body"),
        (b"[" * 100000 + b"]" * 100000, "", "not one JSON object"),
        (b'{"a":' * 50000 + b'1' + b'}' * 50000, "", "not one JSON object"),
    ])
    def test_what_a_body_says(self, raw, model, problem):
        body = ocm.parse_request_body(raw)
        assert body.model == model and (problem in body.problem if problem else body.problem == "")

    def test_a_streaming_answer_holds_neither_the_body_nor_its_parse(self, proxy, fake):
        """A thousand open streams must not hold a thousand request bodies: once
        the request is sent, nothing refers to its bytes or to what was parsed."""
        import gc
        finish = threading.Event()
        fake.on("POST", "/backend-api/codex/responses", held_stream(finish))
        body = json.dumps({"model": "gpt-5.4", "stream": True, "input": "hello " * 4000}).encode()
        conn = proxy.conn()
        try:
            conn.request("POST", "/v1/responses", body=body, headers={"Authorization": "Bearer tok-alice"})
            response = conn.getresponse()
            # the first event reached the client: the answer streams (once upstream
            # has sent it, OCM may still be taking in the answer's head)
            seen = b""
            while b"output_item.done" not in seen:
                data = response.read1(65536)
                assert data, seen
                seen += data
            gc.collect()
            alive = [o for o in gc.get_objects() if isinstance(o, ocm.RequestBody)]
            assert alive == []
            finish.set()
            assert response.status == 200 and b"response.completed" in response.read()
        finally:
            finish.set()
            conn.close()

    def test_gzip_and_deflate_are_read_and_bombs_are_not(self):
        data = b'{"model": "gpt-5.4", "stream": true}'
        assert ocm.parse_request_body(gzip.compress(data), "gzip").model == "gpt-5.4"
        assert ocm.parse_request_body(zlib.compress(data), "deflate").stream is True
        assert ocm.parse_request_body(zlib.compress(data)[2:-4], "deflate").model == "gpt-5.4"  # raw deflate
        bomb = gzip.compress(b'{"model": "' + b"a" * (4 << 20) + b'"}')
        assert "larger than" in ocm.parse_request_body(bomb, "gzip", limit=1 << 20).problem
        assert "cannot read" in ocm.parse_request_body(b"\x28\xb5\x2f\xfd", "zstd").problem
        assert "broken" in ocm.parse_request_body(b"not gzip", "gzip").problem


class TestModelAllowList:
    @pytest.mark.parametrize("body, headers", [
        (gzip.compress(b'{"model": "gpt-5.4", "stream": true, "store": false}'), b"Content-Encoding: gzip\r\n"),
        (b'\x28\xb5\x2f\xfd' + b"zstd frame", b"Content-Encoding: zstd\r\n"),
        (b'{"model": "gpt-5-mini", "model": "gpt-5.4"}', b""),
        (b'{"model": "gpt-5.4", "model": "gpt-5-mini"}', b""),
        (b'{"x":' * 20000 + b'{"model": "gpt-5.4"}' + b'}' * 20000, b""),
        (b'{"model": "gpt-5.4", "input": [' + b'[' * 5000 + b']' * 5000 + b']}', b""),
        (b'{"\\u006dodel": "gpt-5.4", "stream": true, "store": false}', b""),
        (b'{"model": "gpt\\u002d5.4", "stream": true, "store": false}', b""),
        (b'{"input": "no model"}', b""),
        (b'not json, "model": "gpt-5-mini"', b""),
    ])
    def test_a_request_whose_model_is_hidden_or_not_allowed_never_reaches_upstream(self, make_proxy, fake,
                                                                                  body, headers):
        proxy = make_proxy(users=allowed_only())
        status, answer = raw_post(proxy.port, b"/v1/responses", body, headers)
        assert status in (400, 403), answer
        assert fake.api_requests() == []
        assert raw_post(proxy.port, b"/v1/responses", body, headers, token=b"tok-bob")[0] == 200  # no limit
        assert fake.api_requests()[0].body == body  # relayed byte for byte

    def test_an_allowed_model_passes_plain_or_gzipped(self, make_proxy, fake):
        proxy = make_proxy(users=allowed_only())
        assert raw_post(proxy.port, b"/v1/responses", b'{"model": "gpt-5-mini"}')[0] == 200
        compressed = gzip.compress(b'{"model": "gpt-5-mini", "stream": true, "store": false}')
        assert raw_post(proxy.port, b"/v1/responses", compressed, b"Content-Encoding: gzip\r\n")[0] == 200
        sent = fake.api_requests()[1]
        assert sent.body == compressed and sent.header("Content-Encoding") == "gzip"

    def test_the_refusal_says_what_to_fix(self, make_proxy, fake):
        proxy = make_proxy(users=allowed_only())
        status, answer = raw_post(proxy.port, b"/v1/responses", b'{"model": "a", "model": "b"}')
        kind, message = error_of(answer)
        assert status == 400 and kind == "invalid_request_error"
        assert "cannot tell which model" in message and "'model' more than once" in message
        assert "gpt-5-mini" in message

    @pytest.mark.parametrize("text", [
        '{"type":"response\\u002ecreate","model":"gpt-5.4"}',
        '{"type":"\\u0072esponse.create","model":"gpt-5.4"}',
        '{"\\u0074ype":"response.create","model":"gpt-5.4"}',
        '{"type":"response.create","\\u006dodel":"gpt-5.4"}',
        '{"type":"response.create","model":"gpt\\u002d5.4"}',
        '{"type":"response.create","model":"gpt-5-mini","model":"gpt-5.4"}',
        '{"type":"response.create","type":"response.create","model":"gpt-5.4"}',
        ' {"type" : "response.create" , "model" : "gpt-5.4"} ',
        '{"type":"response.create"}',
    ])
    def test_websocket_turns_are_decided_from_parsed_json(self, make_proxy, fake, text):
        ws = WSUpstream(fake)
        proxy = make_proxy(users=allowed_only())
        client = WSClient(proxy.port)
        client.send(0x1, text.encode())
        event = json.loads(client.frame()[2])
        assert event["type"] == "error" and event["status"] in (400, 403)
        client.send_json({"type": "response.create", "model": "gpt-5-mini"})
        assert client.events_until_completed()[-1]["type"] == "response.completed"
        sent = [json.loads(p) for fin, op, p, _ in ws.frames if op == 0x1]
        assert sent == [{"type": "response.create", "model": "gpt-5-mini"}]
        client.close()

    @pytest.mark.parametrize("payload", [b"[1, 2]", b'"response.create"', b"not json", b'{"a": 1'])
    def test_a_websocket_message_that_is_not_a_json_object_gets_an_error_event(self, make_proxy, fake, payload):
        ws = WSUpstream(fake)
        client = WSClient(make_proxy().port)
        client.send(0x1, payload)
        event = json.loads(client.frame()[2])
        assert event["type"] == "error" and event["error"]["type"] == "invalid_request_error"
        assert [f for f in ws.frames if f[1] in (0x0, 0x1)] == []
        client.close()

    def test_a_fragmented_create_is_checked_whole(self, make_proxy, fake):
        ws = WSUpstream(fake)
        client = WSClient(make_proxy(users=allowed_only()).port)
        text = b'{"type":"response.create","model":"gpt-5.4"}'
        client.send(0x1, text[:20], fin=False)
        client.send(0x0, text[20:], fin=True)
        assert json.loads(client.frame()[2])["status"] == 403
        assert [f for f in ws.frames if f[1] in (0x0, 0x1)] == []
        client.close()


# == Budgets =====================================================================

def after(gate, route):
    """``route`` once ``gate`` is set (5 s at most): requests held in flight together."""
    def held(ex):
        gate.wait(5)
        route(ex)
    return held


def budget_proxy(make_proxy, tmp_path, budgets, **extra):
    return make_proxy(users=[user(budgets=budgets), user("bob", "tok-bob")], timezone="UTC",
                      budgets_path=str(tmp_path / "budgets.json"), usages_path=str(tmp_path / "usage.json"),
                      **extra)


class TestBudgets:
    def test_a_dollar_and_a_token_budget_of_one_period_are_each_charged_once(self, make_proxy, fake, tmp_path):
        fake.on("POST", "/backend-api/codex/responses", priced_stream(40000))  # $0.10, 40,000 tokens
        proxy = budget_proxy(make_proxy, tmp_path, [{"period": "day", "usd": 1}, {"period": "day", "tokens": 10 ** 6},
                                                     {"period": "month", "usd": 5}])
        for _ in range(3):
            assert proxy.request("POST", "/v1/responses", {"model": "gpt-5.4"})[0] == 200
        ledger = proxy.server.ledger
        assert ledger.spent("alice", "day") == (pytest.approx(0.30), 120000)
        assert ledger.spent("alice", "month") == (pytest.approx(0.30), 120000)
        assert ledger.requests("alice", "day") == 3

    @pytest.mark.parametrize("budgets", [
        [{"period": "day", "usd": 1.0}],
        [{"period": "week", "usd": 1.0}, {"period": "month", "tokens": 10 ** 7}],
        [{"period": "month", "tokens": 400000}],
    ])
    def test_fifty_parallel_requests_far_above_the_average_pass_by_at_most_one(self, make_proxy, fake, tmp_path,
                                                                             budgets):
        """History says $0.01 a request; then fifty arrive at once, each costing
        $0.30 (120,000 tokens). The bound: spending passes each budget by at
        most one request's cost."""
        cheap = priced_stream(4000)  # $0.01
        dear = priced_stream(120000)  # $0.30

        def route(ex):
            (dear if ex.request.json().get("dear") else cheap)(ex)

        fake.on("POST", "/backend-api/codex/responses", route)
        proxy = budget_proxy(make_proxy, tmp_path, budgets)
        for _ in range(3):
            assert proxy.request("POST", "/v1/responses", {"model": "gpt-5.4"})[0] == 200
        results = []
        threads = [threading.Thread(target=lambda: results.append(
            proxy.request("POST", "/v1/responses", {"model": "gpt-5.4", "dear": True})[0])) for _ in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        ledger = proxy.server.ledger
        for budget in budgets:
            usd, tokens = ledger.spent("alice", budget["period"])
            if "usd" in budget:
                assert usd <= budget["usd"] + 0.30 + 1e-9
            else:
                assert tokens <= budget["tokens"] + 120000
        assert results.count(200) >= 1 and results.count(200) + results.count(429) == 50
        assert len(fake.api_requests()) == 3 + results.count(200)

    def test_a_large_budget_still_runs_requests_side_by_side(self, make_proxy, fake, tmp_path):
        gate = threading.Event()
        fake.on("POST", "/backend-api/codex/responses", after(gate, priced_stream(4000)))
        proxy = budget_proxy(make_proxy, tmp_path, [{"period": "month", "usd": 100}])
        threads = [threading.Thread(target=proxy.request, args=("POST", "/v1/responses", {"model": "gpt-5.3-codex"}))
                   for _ in range(5)]
        for t in threads:
            t.start()
        try:
            assert wait_for(lambda: len(fake.api_requests()) == 5)  # $2.27 worst case each: all fit
        finally:
            gate.set()
            for t in threads:
                t.join(10)

    def test_near_the_end_requests_run_one_at_a_time_and_the_refusal_shows_what_runs(self, make_proxy, fake,
                                                                                     tmp_path):
        gate = threading.Event()
        fake.on("POST", "/backend-api/codex/responses", after(gate, priced_stream(4000)))
        proxy = budget_proxy(make_proxy, tmp_path, [{"period": "day", "usd": 3}])
        proxy.server.ledger.wait = 0.3
        first = threading.Thread(target=proxy.request, args=("POST", "/v1/responses", {"model": "gpt-5.4"}))
        first.start()
        try:
            assert wait_for(lambda: len(fake.api_requests()) == 1)
            status, headers, body = proxy.request("POST", "/v1/responses", {"model": "gpt-5.4"})
        finally:
            gate.set()
            first.join(10)
        kind, message = error_of(body)
        assert status == 429 and headers["retry-after"] == "1"
        assert message.startswith("your daily budget of $3.00 has $2.99 left ($0.00 spent, $0.01 set aside "
                                  "for 1 running); near its end requests run one at a time")
        assert re.search(r"it resets at \d{4}-\d\d-\d\d 00:00 UTC$", message)
        assert len(fake.api_requests()) == 1
        # A waiting request goes as soon as the running one ends.
        gate.clear()
        proxy.server.ledger.wait = 5
        first = threading.Thread(target=proxy.request, args=("POST", "/v1/responses", {"model": "gpt-5.4"}))
        first.start()
        assert wait_for(lambda: len(fake.api_requests()) == 2)
        threading.Timer(0.2, gate.set).start()
        assert proxy.request("POST", "/v1/responses", {"model": "gpt-5.4"})[0] == 200
        first.join(10)

    def test_a_used_up_budget_says_so_with_the_figure(self, make_proxy, fake, tmp_path):
        fake.on("POST", "/backend-api/codex/responses", priced_stream(40000))
        proxy = budget_proxy(make_proxy, tmp_path, [{"period": "day", "usd": 0.05}])
        assert proxy.request("POST", "/v1/responses", {})[0] == 200  # the first estimate ($0.01) fitted
        message = error_of(proxy.request("POST", "/v1/responses", {})[2])[1]
        assert message.startswith("your daily budget of $0.05 is used up ($0.10 spent); it resets at ")

    def test_the_reset_time_carries_the_box_zone_when_the_config_says_local(self, make_proxy, fake, tmp_path):
        fake.on("POST", "/backend-api/codex/responses", priced_stream(40000))
        proxy = make_proxy(users=[user(budgets=[{"period": "day", "usd": 0.05}])],
                           budgets_path=str(tmp_path / "b.json"))
        proxy.request("POST", "/v1/responses", {})
        message = error_of(proxy.request("POST", "/v1/responses", {})[2])[1]
        assert re.search(r"it resets at \d{4}-\d\d-\d\d 00:00 UTC[+-]\d\d:\d\d$", message), message

    def test_budgets_path_defaults_to_beside_the_usage_file(self, tmp_path):
        (tmp_path / "var").mkdir()
        config = ocm.config_from_dict({"usages_path": str(tmp_path / "var" / "usage.json"),
                                       "users": [user(budgets=[{"period": "day", "usd": 1}])]},
                                      source=str(tmp_path / "etc" / "config.json"))
        assert config.budgets_path == str(tmp_path / "var" / "ocm-budgets.json")
        config = ocm.config_from_dict({"credentials": [
            {"tag": "a", "credential_path": "/x/a.json", "usages_path": str(tmp_path / "var" / "a.json")}],
            "users": [user(budgets=[{"period": "day", "usd": 1}], credential="a")]},
            source=str(tmp_path / "etc" / "config.json"))
        assert config.budgets_path == str(tmp_path / "var" / "ocm-budgets.json")

    def test_websocket_turns_wait_their_turn_and_are_charged_once(self, make_proxy, fake, tmp_path):
        WSUpstream(fake)
        proxy = budget_proxy(make_proxy, tmp_path, [{"period": "day", "tokens": 10 ** 6},
                                                     {"period": "day", "usd": 50}])
        client = WSClient(proxy.port)
        for _ in range(3):
            client.send_json({"type": "response.create", "model": "gpt-5.4"})
            client.events_until_completed()
        assert wait_for(lambda: proxy.server.ledger.requests("alice", "day") == 3)
        assert proxy.server.ledger.spent("alice", "day")[1] == (1000 + 10) + (2000 + 20) + (3000 + 30)
        client.close()


# == Who may still use OCM ========================================================

class TestPersonStillCurrent:
    def reload(self, proxy, fake, auth_path, users):
        proxy.server.reload(ocm.config_from_dict({
            "listen_port": 0, "credential_path": str(auth_path), "users": users,
            "upstream": {"chatgpt_url": fake.chatgpt_url, "token_url": fake.token_url}}))

    def test_a_removed_person_loses_their_open_websocket_at_the_reload(self, make_proxy, fake, auth_path):
        ws = WSUpstream(fake)
        proxy = make_proxy()
        alice, bob = WSClient(proxy.port), WSClient(proxy.port, token="tok-bob")
        alice.send_json({"type": "response.create", "model": "gpt-5.4"})
        alice.events_until_completed()
        self.reload(proxy, fake, auth_path, [user("bob", "tok-bob")])
        event = json.loads(alice.frame()[2])
        assert event["type"] == "error" and event["status"] == 403 and "removed" in event["error"]["message"]
        fin, opcode, payload, _ = alice.frame()
        assert opcode == 0x8 and int.from_bytes(payload[:2], "big") == 1008
        bob.send_json({"type": "response.create", "model": "gpt-5.4"})  # bob keeps his session
        assert bob.events_until_completed()[-1]["type"] == "response.completed"
        creates = [p for f, op, p, _ in ws.frames if op == 0x1]
        assert len(creates) == 2
        alice.close()
        bob.close()

    def test_a_new_token_is_a_new_person(self, make_proxy, fake, auth_path):
        WSUpstream(fake)
        proxy = make_proxy()
        client = WSClient(proxy.port)
        self.reload(proxy, fake, auth_path, [user("alice", "tok-alice-renewed"), user("bob", "tok-bob")])
        assert json.loads(client.frame()[2])["status"] == 403
        client.close()

    def test_an_expired_person_is_stopped_at_the_next_turn(self, make_proxy, fake, auth_path):
        ws = WSUpstream(fake)
        # time enough for a slow box to start the proxy and run the first turn
        expires = time.time() + 1.5
        proxy = make_proxy(users=[user(expires_at=ocm.format_rfc3339(expires))])
        client = WSClient(proxy.port)
        client.send_json({"type": "response.create", "model": "gpt-5.4"})
        client.events_until_completed()
        time.sleep(max(0.0, expires - time.time()) + 0.1)
        client.send_json({"type": "response.create", "model": "gpt-5.4"})
        event = json.loads(client.frame()[2])
        assert event["status"] == 403 and "expired" in event["error"]["message"]
        assert client.frame()[1] == 0x8
        assert len([f for f in ws.frames if f[1] == 0x1]) == 1
        client.close()

    def test_turns_follow_the_reloaded_limits(self, make_proxy, fake, auth_path):
        ws = WSUpstream(fake)
        proxy = make_proxy()
        client = WSClient(proxy.port)
        self.reload(proxy, fake, auth_path, [user(models=["gpt-5-mini"]), user("bob", "tok-bob")])
        client.send_json({"type": "response.create", "model": "gpt-5.4"})
        assert json.loads(client.frame()[2])["status"] == 403
        client.send_json({"type": "response.create", "model": "gpt-5-mini"})
        assert client.events_until_completed()[-1]["type"] == "response.completed"
        assert len([f for f in ws.frames if f[1] == 0x1]) == 1
        client.close()

    def test_shares_are_checked_at_every_turn(self, make_proxy, fake):
        reset = str(int(time.time()) + 3600)
        used = [0.0]

        def upstream(sock, reader):
            from test_websocket import response_creates, ws_frame
            for turn, event in enumerate(response_creates(sock, reader, lambda f: None), 1):
                used[0] += 30
                completed = completed_event("r%d" % turn, "gpt-5.4", 40000, 0, 0)
                sock.sendall(ws_frame(0x1, json.dumps(completed).encode()))

        ws = WSUpstream(fake)
        ws.on_connect = upstream
        ws.extra_101_headers = {"x-codex-primary-used-percent": "0", "x-codex-primary-reset-at": reset,
                                "x-codex-primary-window-minutes": "300"}
        proxy = make_proxy(users=[user(share_5h=50), user("bob", "tok-bob")])
        account = proxy.server.accounts["default"]
        client = WSClient(proxy.port)
        client.send_json({"type": "response.create", "model": "gpt-5.4"})
        client.events_until_completed()
        account.shares["short"]["alice"] = 60.0  # what the windows measured since
        client.send_json({"type": "response.create", "model": "gpt-5.4"})
        event = json.loads(client.frame()[2])
        assert event["status"] == 429 and "share (50%) of the 5-hour window" in event["error"]["message"]
        client.close()


# == Accounts and their usage books across reloads ============================

class TestOneWriterPerFile:
    def test_two_accounts_may_not_share_a_usage_file(self, tmp_path):
        with pytest.raises(ocm.ConfigError, match=r"credentials\[1\].usages_path: .* is also the usage file of 'a'"):
            ocm.config_from_dict({"credentials": [
                {"tag": "a", "credential_path": "/x/a.json", "usages_path": str(tmp_path / "u.json")},
                {"tag": "b", "credential_path": "/x/b.json", "usages_path": str(tmp_path / "." / "u.json")}]})

    def config(self, fake, auth_path, tmp_path, **extra):
        data = {"listen_port": 0, "credential_path": str(auth_path), "users": [user()],
                "usages_path": str(tmp_path / "usage.json"),
                "upstream": {"chatgpt_url": fake.chatgpt_url, "token_url": fake.token_url}}
        data.update(extra)
        return ocm.config_from_dict(data)

    def test_a_replaced_account_hands_its_book_over_and_closes(self, fake, auth_path, tmp_path):
        from test_ocm import Proxy
        proxy = Proxy(ocm.OCMServer(self.config(fake, auth_path, tmp_path), file_check_interval=0))
        try:
            old = proxy.server.accounts["default"]
            book = old.usage
            assert proxy.request("POST", "/v1/responses", {"model": "gpt-5.4"})[0] == 200
            threads = threading.active_count()
            for i in range(5):  # each changes the account (its timeout), so each replaces it
                proxy.server.reload(self.config(fake, auth_path, tmp_path,
                                                limits={"connect_timeout": 10 + i}))
                assert proxy.request("POST", "/v1/responses", {"model": "gpt-5.4"})[0] == 200
            new = proxy.server.accounts["default"]
            assert new is not old and new.usage is book and proxy.server.books.books() == [book]
            assert old.pool._idle == {} and old._closed  # its connections went with it
            assert wait_for(lambda: threading.active_count() <= threads)  # no saver or pool thread per reload
        finally:
            proxy.close()
        assert sum(c["total"]["request_count"] for c in read_json(tmp_path / "usage.json")["combinations"]) == 6

    def test_a_retired_account_finishes_its_stream_then_closes(self, fake, auth_path, tmp_path):
        from test_ocm import Proxy
        gate = threading.Event()
        fake.on("POST", "/backend-api/codex/responses", held_stream(gate))
        proxy = Proxy(ocm.OCMServer(self.config(fake, auth_path, tmp_path), file_check_interval=0))
        try:
            old = proxy.server.accounts["default"]
            conn = proxy.conn()
            conn.request("POST", "/v1/responses", body=CODEX_BODY, headers={"Authorization": "Bearer tok-alice"})
            response = conn.getresponse()
            proxy.server.reload(self.config(fake, auth_path, tmp_path, detour="socks5://127.0.0.1:1"))
            assert not old._closed  # its request is still running
            gate.set()
            assert b"response.completed" in response.read()
            conn.close()
            assert wait_for(lambda: old._closed)
        finally:
            proxy.close()
        assert read_json(tmp_path / "usage.json")["combinations"][0]["total"]["request_count"] == 1

    def test_a_request_that_picks_an_account_the_reload_retired_is_still_written_down(
            self, fake, auth_path, tmp_path, monkeypatch):
        """Held (review): a request keeps the State it started with. If the
        reload retired its account (here: a new usages_path) before the request
        chose it, the account was closed with nothing running, its book saved
        and closed; the request then ran on it and booked into the closed
        book, and its usage never reached any file."""
        from test_ocm import Proxy
        admitting, reloaded = threading.Event(), threading.Event()
        admit = ocm.ModelRequest.admit

        def admit_after_the_reload(call):
            admitting.set()
            reloaded.wait(5)  # (reading a large body, or waiting for a budget)
            admit(call)

        monkeypatch.setattr(ocm.ModelRequest, "admit", admit_after_the_reload)
        proxy = Proxy(ocm.OCMServer(self.config(fake, auth_path, tmp_path), file_check_interval=0))
        try:
            old = proxy.server.accounts["default"]
            answer = []
            request = threading.Thread(target=lambda: answer.append(
                proxy.request("POST", "/v1/responses", {"model": "gpt-5.4"})[0]))
            request.start()
            assert admitting.wait(5)
            proxy.server.reload(self.config(fake, auth_path, tmp_path, usages_path=str(tmp_path / "new.json")))
            assert old._closed  # nothing used it yet
            reloaded.set()
            request.join(10)
            assert answer == [200]
        finally:
            proxy.close()
        assert read_json(tmp_path / "usage.json")["combinations"][0]["total"]["request_count"] == 1

    def test_a_refused_reload_changes_nothing_that_runs(self, fake, auth_path, tmp_path):
        from test_ocm import Proxy
        server = ocm.OCMServer(self.config(fake, auth_path, tmp_path, credentials=None), usage_save_interval=0.05,
                               file_check_interval=0)
        proxy = Proxy(server)
        try:
            state = server.state
            (tmp_path / "dir").mkdir()
            bad = self.config(fake, auth_path, tmp_path, users=[user("zed", "tok-zed")],
                              budgets_path=str(tmp_path / "dir"))
            with pytest.raises(ocm.ConfigError):
                server.reload(bad)
            assert server.state is state
            assert proxy.request("POST", "/v1/responses", {"model": "gpt-5.4"})[0] == 200
            assert wait_for(lambda: os.path.exists(str(tmp_path / "usage.json")))  # the saver still runs
            assert proxy.request("POST", "/v1/responses", {}, token="tok-zed")[0] == 401
        finally:
            proxy.close()


# == Failover, for both transports ==============================================

class TestFailover:
    def test_a_dead_login_first_in_a_fallback_pool_is_passed_over_by_http_and_websocket(self, make_proxy, fake,
                                                                                        tmp_path):
        ws = WSUpstream(fake)
        paths = {}
        for tag, refresh in (("a", "rt_dead"), ("b", "rt_b")):
            (tmp_path / tag).mkdir()
            paths[tag] = tmp_path / tag / "auth.json"
            write_auth(paths[tag], account_id="acct-" + tag, refresh=refresh, expires_in=-10 if tag == "a" else 3600)
        proxy = make_proxy(credential_path=None, users=[user(credential="pool")], credentials=[
            {"tag": "a", "credential_path": str(paths["a"])}, {"tag": "b", "credential_path": str(paths["b"])},
            {"tag": "pool", "type": "fallback", "credentials": ["a", "b"], "poll_interval": "1h"}])
        client = WSClient(proxy.port)  # the WebSocket first: it is the one that learns a's login is dead
        assert client.status == 101
        client.send_json({"type": "response.create", "model": "gpt-5.4"})
        assert client.events_until_completed()[-1]["type"] == "response.completed"
        assert ws.handshakes[-1].header("ChatGPT-Account-Id") == "acct-b"
        assert len(fake.token_calls) == 1
        client.close()
        assert proxy.request("POST", "/v1/responses", {"model": "gpt-5.4"})[0] == 200

    def test_an_upgrade_refused_401_after_a_refresh_moves_on_in_a_pool(self, make_proxy, fake, tmp_path):
        ws = WSUpstream(fake)
        original = ws.route

        def route(ex):
            if ex.request.header("ChatGPT-Account-Id") == "acct-a":
                return ex.json(401, {"error": {"message": "token revoked"}})
            original(ex)

        fake.on("GET", "/backend-api/codex/responses", route)
        paths = {}
        for tag in ("a", "b"):
            (tmp_path / tag).mkdir()
            paths[tag] = tmp_path / tag / "auth.json"
            write_auth(paths[tag], account_id="acct-" + tag, refresh="rt_initial" if tag == "a" else "rt_b")
        proxy = make_proxy(credential_path=None, users=[user(credential="pool")], credentials=[
            {"tag": "a", "credential_path": str(paths["a"])}, {"tag": "b", "credential_path": str(paths["b"])},
            {"tag": "pool", "type": "fallback", "credentials": ["a", "b"], "poll_interval": "1h"}])
        client = WSClient(proxy.port)
        assert client.status == 101 and len(fake.token_calls) == 1  # a refreshed once, then b
        client.close()


# == Settled once, whatever the client does =====================================

class TestSettledOnce:
    def test_a_client_that_hangs_up_after_the_final_event_is_still_logged_and_counted(self, make_proxy, fake,
                                                                                      tmp_path, caplog):
        hung_up = threading.Event()

        def route(ex):
            ex.start_chunked()
            ex.chunk(sse(message_event(), completed_event("r", "gpt-5.4", 1000, 0, 10)))
            hung_up.wait(5)
            time.sleep(0.05)
            ex.end_chunked()  # the stream's last chunk comes after Codex left

        fake.on("POST", "/backend-api/codex/responses", route)
        proxy = make_proxy(usages_path=str(tmp_path / "usage.json"))
        with caplog.at_level(logging.INFO, logger="ocm.access"):
            s = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            body = b'{"model": "gpt-5.4", "stream": true}'
            s.sendall(b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok-alice\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            seen = b""
            while b"response.completed" not in seen:
                seen += s.recv(65536)
            s.close()
            hung_up.set()
            assert wait_for(lambda: any("alice POST /v1/responses 200" in r.getMessage() for r in caplog.records))
        line = next(r.getMessage() for r in caplog.records if "alice POST" in r.getMessage())
        assert "in=1000" in line and "out=10" in line
        metrics = ocm.render_metrics(proxy.server)
        assert 'ocm_requests_total{model="gpt-5.4",status="200",user="alice"} 1.0' in metrics
        assert 'ocm_responses_total{model="gpt-5.4",user="alice"} 1.0' in metrics
        assert proxy.server.usage.to_json()["combinations"][0]["total"]["request_count"] == 1

    def test_a_usage_event_twice_in_one_answer_is_booked_once(self, make_proxy, fake, tmp_path):
        fake.on("POST", "/backend-api/codex/responses",
                lambda ex: ex.stream(sse(completed_event(), completed_event())))
        proxy = make_proxy(usages_path=str(tmp_path / "usage.json"))
        assert proxy.request("POST", "/v1/responses", {"model": "gpt-5.4"})[0] == 200
        assert proxy.server.usage.to_json()["combinations"][0]["total"]["request_count"] == 1

    def test_every_count_agrees_in_a_mixed_run_with_reloads(self, fake, auth_path, tmp_path, caplog):
        """The access log, /metrics, the usage file and the budget file agree on
        the number of requests, over HTTP and WebSocket, across reloads."""
        from test_ocm import Proxy
        WSUpstream(fake)
        fake.on("POST", "/backend-api/codex/responses", priced_stream(1000))
        budgets = [{"period": "day", "usd": 100}, {"period": "day", "tokens": 10 ** 7}]

        def config(extra_user):
            users = [user(budgets=budgets), user("bob", "tok-bob", budgets=budgets)] + extra_user
            return ocm.config_from_dict({"listen_port": 0, "credential_path": str(auth_path), "timezone": "UTC",
                                         "users": users, "usages_path": str(tmp_path / "usage.json"),
                                         "budgets_path": str(tmp_path / "budgets.json"),
                                         "upstream": {"chatgpt_url": fake.chatgpt_url,
                                                      "token_url": fake.token_url}})

        server = ocm.OCMServer(config([]), file_check_interval=0)
        proxy = Proxy(server)
        expected = {"alice": 0, "bob": 0}
        with caplog.at_level(logging.INFO, logger="ocm.access"):
            clients = {name: WSClient(proxy.port, token="tok-" + name) for name in expected}
            for round_ in range(4):
                for name in expected:
                    threads = [threading.Thread(target=proxy.request, args=(
                        "POST", "/v1/responses", {"model": "gpt-5.4"}), kwargs={"token": "tok-" + name})
                        for _ in range(3)]
                    for t in threads:
                        t.start()
                    clients[name].send_json({"type": "response.create", "model": "gpt-5.4"})
                    clients[name].events_until_completed()
                    for t in threads:
                        t.join(10)
                    expected[name] += 4
                server.reload(config([user("carol%d" % round_, "tok-carol%d" % round_)]))
            for client in clients.values():
                client.send(0x8, close_body(1000))
                client.frame()
                client.close()
            proxy.close()
        lines = [r.getMessage() for r in caplog.records if r.name == "ocm.access"]
        usage = read_json(tmp_path / "usage.json")
        budget_file = read_json(tmp_path / "budgets.json")
        metrics = server.metrics.counters()
        for name, count in expected.items():
            logged = [line for line in lines if line.startswith(name + " ") and " in=0 " not in line]
            in_file = sum(c["by_user"].get(name, {}).get("request_count", 0) for c in usage["combinations"])
            budgeted = list(budget_file["users"][name]["day"].values())[0]["requests"]
            counted = metrics[("ocm_responses_total", (("model", "gpt-5.4"), ("user", name)))]
            assert (len(logged), in_file, budgeted, counted) == (count, count, count, count)

    def test_a_stream_cut_at_shutdown_is_in_the_files_ocm_leaves(self, make_proxy, fake, tmp_path, monkeypatch):
        """Held (review): at shutdown, a stream still running when the drain's
        wait ran out was cut, and it settled (at an estimate) once its thread
        woke; close() went on meanwhile and saved the budget and usage files.
        A settle that came later (here: slowed) reached neither file, and the
        next start forgot what that stream cost."""
        gate = threading.Event()

        def route(ex):
            ex.start_chunked()
            ex.chunk(sse(message_event("the answer")))
            gate.wait(10)
            with contextlib.suppress(OSError):
                ex.chunk(sse(completed_event("r", "gpt-5.4", 1000, 0, 10)))
                ex.end_chunked()

        fake.on("POST", "/backend-api/codex/responses", route)
        request_done = ocm.OCMServer.request_done

        def slow_settle(server, request):
            time.sleep(0.15)  # (a slow disk, a busy box)
            request_done(server, request)

        monkeypatch.setattr(ocm.OCMServer, "request_done", slow_settle)
        proxy = budget_proxy(make_proxy, tmp_path, [{"period": "day", "usd": 100}])
        s = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        try:
            body = json.dumps(dict(CODEX, model="gpt-5.4", input="x" * 40000)).encode()
            s.sendall(b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok-alice\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            seen = b""
            while b"the answer" not in seen:
                seen += s.recv(65536)
            proxy.server.shutdown()
            proxy.thread.join(5)
            proxy.thread = None
            proxy.server.close(drain_timeout=0.2)
        finally:
            gate.set()
            s.close()
        budget_file = read_json(tmp_path / "budgets.json")
        assert list(budget_file["users"]["alice"]["day"].values())[0]["requests"] == 1
        usage = read_json(tmp_path / "usage.json")
        assert usage["combinations"][0]["by_user"]["alice"]["input_tokens"] >= 10000


# == Methods ======================================================================

class TestMethods:
    @pytest.mark.parametrize("method", [b"TRACE", b"TRACK", b"OPTIONS", b"PUT", b"PATCH", b"CONNECT", b"PROPFIND",
                                        b"FOO"])
    def test_methods_the_api_does_not_use_get_405_and_never_reach_upstream(self, proxy, fake, method):
        from test_ocm import raw_exchange
        answer = raw_exchange(proxy.port, b"%s /v1/responses HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok-alice"
                                          b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}" % method)
        assert answer.startswith(b"HTTP/1.1 405 ") and b"\r\nAllow: GET, HEAD, POST, DELETE\r\n" in answer
        assert fake.api_requests() == []

    @pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "DELETE"])
    def test_the_api_methods_are_relayed(self, proxy, fake, method):
        status, _, _ = proxy.request(method, "/v1/files/file-1", body=b"{}" if method == "POST" else None)
        assert status == 200 and fake.api_requests()[0].method == method


# == Refusals that need no body come before 100 Continue ===========================

class TestRefusedBeforeTheBody:
    def test_a_used_up_budget_is_refused_without_100_continue_and_unread_body(self, make_proxy, fake, tmp_path):
        from test_ocm import raw_exchange
        fake.on("POST", "/backend-api/codex/responses", priced_stream(40000))
        proxy = make_proxy(users=[user(budgets=[{"period": "day", "usd": 0.05}])], timezone="UTC",
                           budgets_path=str(tmp_path / "b.json"))
        assert proxy.request("POST", "/v1/responses", CODEX)[0] == 200  # $0.10: the budget is used up
        answer = raw_exchange(proxy.port, b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                                          b"tok-alice\r\nExpect: 100-continue\r\nContent-Length: 1000000\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 429 ") and b"100 Continue" not in answer
        assert b"is used up" in answer and len(fake.api_requests()) == 1

    def test_max_concurrent_is_refused_without_100_continue(self, make_proxy, fake):
        import threading
        from test_ocm import raw_exchange
        gate = threading.Event()

        def slow(ex):
            gate.wait(5)
            priced_stream(1000)(ex)

        fake.on("POST", "/backend-api/codex/responses", slow)
        proxy = make_proxy(users=[user(max_concurrent=1)])
        first = threading.Thread(target=proxy.request, args=("POST", "/v1/responses", CODEX))
        first.start()
        try:
            assert wait_for(lambda: len(fake.api_requests()) == 1)
            answer = raw_exchange(proxy.port, b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                                              b"tok-alice\r\nExpect: 100-continue\r\nContent-Length: 50\r\n\r\n")
        finally:
            gate.set()
            first.join(10)
        assert answer.startswith(b"HTTP/1.1 429 ") and b"100 Continue" not in answer
