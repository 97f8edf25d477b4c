"""Codex and the backend as they are in December 2026 (issue 17, PROTOCOL.md
section 10): rate-limit windows known by their length, reasoning that only
one account can read, compaction, WebSocket details, the models list with its
ETag, compressed request bodies. Each against a fake scripted to behave as
the backend does."""

import gzip
import json
import threading
import time

import pytest

import ocm
from test_ocm import (completed_event, function_call_event, message_event, needs_codex, read_json, run_codex, sse,
                      wait_for, write_auth)
from test_policy import priced_stream, user
from test_websocket import WSClient, WSUpstream, close_body, response_creates, ws, ws_frame  # noqa: F401

HOUR = 3600


def window_headers(*windows, active="codex"):
    """x-codex-(primary|secondary)-* headers, one window per position given:
    (used percent, minutes, resets in seconds)."""
    headers = []
    for position, (used, minutes, resets_in) in zip(("primary", "secondary"), windows):
        prefix = "x-%s-%s-" % (active, position)
        headers += [(prefix + "used-percent", "%g" % used), (prefix + "reset-at", str(int(time.time() + resets_in)))]
        if minutes is not None:
            headers.append((prefix + "window-minutes", str(minutes)))
    return ocm.Headers(headers)


@pytest.fixture
def bare_account(auth_path):
    """bare_account(reserve_5h=, reserve_weekly=): an account with a usable login, no upstream."""
    return lambda **reserves: make_account(str(auth_path), **reserves)


def make_account(path, **reserves):
    account = ocm.Account("x", path, None, None, ocm.Config())
    account.reserve_5h = reserves.get("reserve_5h", 0)
    account.reserve_weekly = reserves.get("reserve_weekly", 0)
    return account


# == 1. Windows by their length ====================================================

class TestWindowsByLength:
    @pytest.mark.parametrize("minutes, position, kind", [
        (300, "primary", "short"), (360, "secondary", "short"), (10080, "primary", "long"),
        (300, "secondary", "short"), (43200, "primary", "long"), (8640, "primary", "long"),
        (1440, "primary", "1440m"), (None, "primary", "short"), (None, "secondary", "long"), (0, "secondary", "long"),
    ])
    def test_a_window_is_classified_by_its_length(self, minutes, position, kind):
        assert ocm.window_kind(minutes, position) == kind

    def test_the_usual_pair_swapped_and_a_lone_weekly_primary(self):
        usual = ocm.windows_from_headers(window_headers((20, 300, HOUR), (5, 10080, 86400)), time.time())
        swapped = ocm.windows_from_headers(window_headers((5, 10080, 86400), (20, 300, HOUR)), time.time())
        lone = ocm.windows_from_headers(window_headers((70, 10080, 86400)), time.time())
        assert {k: w.used_percent for k, w in usual.items()} == {"short": 20, "long": 5}
        assert {k: w.used_percent for k, w in swapped.items()} == {"short": 20, "long": 5}
        assert {k: w.used_percent for k, w in lone.items()} == {"long": 70}

    def test_the_usage_endpoint_is_read_by_length_too(self):
        windows = ocm.windows_from_poll({"primary_window": {"used_percent": 30, "limit_window_seconds": 604800,
                                                            "reset_after_seconds": 3600}}, time.time())
        assert list(windows) == ["long"] and windows["long"].window_minutes == 10080

    def test_a_weekly_primary_is_held_to_the_weekly_reserve_not_the_5_hour_one(self, bare_account):
        account = bare_account(reserve_5h=10, reserve_weekly=30)
        account.observe_headers(window_headers((75, 10080, 86400)), True)
        assert account.state() == "reserve_reached"  # 75 >= 100 - 30
        assert account.headroom() == 0
        account = bare_account(reserve_5h=30)
        account.observe_headers(window_headers((75, 10080, 86400)), True)
        assert account.state() == "usable"  # the 5-hour reserve has no window to keep
        assert account.headroom() == pytest.approx(25 * account.weight)

    def test_a_full_weekly_primary_exhausts_the_account_until_its_reset(self, bare_account):
        account = bare_account()
        account.observe_headers(window_headers((100, 10080, 86400)), True)
        assert account.state() == "exhausted"
        assert account.next_reset() == pytest.approx(time.time() + 86400, abs=2)

    def test_a_daily_window_is_kept_shown_by_its_length_and_respected(self, bare_account):
        account = bare_account()
        account.observe_headers(window_headers((100, 1440, 3 * HOUR), (10, 10080, 86400)), True)
        assert account.state() == "exhausted"
        shown = account.to_json()
        assert shown["other_windows"]["1440m"]["used_percent"] == 100 and shown["weekly"]["used_percent"] == 10
        assert shown["five_hour"]["used_percent"] == 0

    def test_shares_follow_the_window_of_their_length(self, bare_account):
        account = bare_account()
        account.observe_headers(window_headers((10, 10080, 86400)), True)
        account.note_completion("alice", 0.10)
        account.observe_headers(window_headers((16, 10080, 86400)), True)  # only a weekly primary
        assert account.user_share("alice", "long") == pytest.approx(6)
        assert account.user_share("alice", "short") == 0
        weekly_cap = ocm.User("alice", "t")
        weekly_cap.share_weekly = 5
        with pytest.raises(ocm.HTTPError, match="share \\(5%\\) of the weekly window"):
            account.check_share(weekly_cap)
        five_hour_cap = ocm.User("alice", "t")
        five_hour_cap.share_5h = 5
        account.check_share(five_hour_cap)  # no 5-hour window, no 5-hour share to pass

    def test_a_pool_reports_its_windows_by_length_in_the_headers_codex_reads(self, bare_account):
        a, b = bare_account(), bare_account()
        a.observe_headers(window_headers((40, 10080, 86400)), True)
        b.observe_headers(window_headers((20, 10080, 2 * 86400)), True)
        pool = ocm.Pool("p", "balancer", [a, b], "least_used")
        upstream = [("x-codex-primary-used-percent", "40"), ("x-codex-primary-window-minutes", "10080"),
                    ("x-codex-secondary-used-percent", "9"), ("x-codex-secondary-window-minutes", "300")]
        rewritten = dict(pool.rewrite_rate_limit_headers(upstream))
        assert rewritten["x-codex-primary-used-percent"] == "30"
        assert rewritten["x-codex-primary-window-minutes"] == "10080"
        assert "x-codex-secondary-used-percent" not in rewritten  # the pool knows no short window
        assert pool.to_json()["weekly"]["used_percent"] == 30 and pool.to_json()["five_hour"]["used_percent"] is None

    def test_least_used_reads_the_weekly_primary(self, make_proxy, fake, tmp_path):
        paths = {}
        for tag in ("a", "b"):
            (tmp_path / tag).mkdir()
            paths[tag] = tmp_path / tag / "auth.json"
            write_auth(paths[tag], account_id="acct-" + tag, refresh="rt_" + tag)
        used = {"acct-a": 90, "acct-b": 10}

        def route(ex):
            tag = ex.request.header("ChatGPT-Account-Id")
            ex.stream(sse(completed_event()), {"x-codex-primary-used-percent": str(used[tag]),
                                               "x-codex-primary-window-minutes": "10080",
                                               "x-codex-primary-reset-at": str(int(time.time()) + 86400)})

        fake.on("POST", "/backend-api/codex/responses", route)
        proxy = make_proxy(credential_path=None, users=[user(credential="pool")], credentials=[
            {"tag": "a", "credential_path": str(paths["a"])}, {"tag": "b", "credential_path": str(paths["b"])},
            {"tag": "pool", "type": "balancer", "strategy": "least_used", "credentials": ["a", "b"],
             "poll_interval": "1h"}])
        for _ in range(2):  # learn both accounts' windows
            proxy.request("POST", "/v1/responses", {"model": "gpt-5.4"})
        accounts = proxy.server.accounts
        if accounts["a"].long.used_percent is None or accounts["b"].long.used_percent is None:
            proxy.request("POST", "/v1/responses", {"model": "gpt-5.4"})
        fake.requests.clear()
        for _ in range(4):
            proxy.request("POST", "/v1/responses", {"model": "gpt-5.4"})
        # (the pool's usage polls, half a second in, are no model requests)
        assert {r.header("ChatGPT-Account-Id") for r in fake.api_requests()
                if r.path.endswith("/responses")} == {"acct-b"}
        metrics = ocm.render_metrics(proxy.server)
        assert 'ocm_account_used_percent{account="a",window="weekly"} 90.0' in metrics

    def test_the_usage_file_keeps_weeks_from_a_weekly_primary(self, make_proxy, fake, tmp_path):
        reset = int(time.time()) + 86400
        fake.on("POST", "/backend-api/codex/responses", lambda ex: ex.stream(sse(completed_event()), {
            "x-codex-primary-used-percent": "3", "x-codex-primary-window-minutes": "10080",
            "x-codex-primary-reset-at": str(reset)}))
        proxy = make_proxy(usages_path=str(tmp_path / "usage.json"))
        proxy.request("POST", "/v1/responses", {"model": "gpt-5.4"})
        combo = proxy.server.usage.to_json()["combinations"][0]
        assert combo["week_start_unix"] == reset - 604800


# == 2. Reasoning one account cannot read =========================================

INVALID_ENCRYPTED = {"error": {"type": "invalid_request_error", "code": "invalid_encrypted_content",
                               "message": "The encrypted content for item rs_1 could not be verified."}}


def reasoning_item(owner, n=1):
    return {"type": "reasoning", "id": "rs_%s%d" % (owner, n), "summary": [],
            "encrypted_content": "enc-%s-%d" % (owner, n)}


class TwoAccounts:
    """Accounts a and b behind one fake: each reads only its own reasoning, and
    a can be made to answer 429."""

    def __init__(self, make_proxy, fake, tmp_path, kind="fallback"):
        self.fake = fake
        self.limited = set()
        self.seen = []  # (account, body)
        paths = {}
        for tag in ("a", "b"):
            (tmp_path / tag).mkdir()
            paths[tag] = tmp_path / tag / "auth.json"
            write_auth(paths[tag], account_id="acct-" + tag, refresh="rt_" + tag)
        fake.on("POST", "/backend-api/codex/responses", self.route)
        pool = {"tag": "pool", "type": kind, "credentials": ["a", "b"], "poll_interval": "1h"}
        if kind == "balancer":
            pool["strategy"] = "round_robin"
        self.proxy = make_proxy(credential_path=None, users=[user(credential="pool")], credentials=[
            {"tag": "a", "credential_path": str(paths["a"])}, {"tag": "b", "credential_path": str(paths["b"])},
            pool], usages_path=None)

    def route(self, ex):
        tag = ex.request.header("ChatGPT-Account-Id")[5:]
        body = ex.request.json()
        self.seen.append((tag, body))
        if tag in self.limited:
            return ex.json(429, {"error": {"type": "usage_limit_reached", "message": "limit",
                                           "resets_at": int(time.time()) + HOUR}})
        foreign = [i for i in body.get("input", []) if i.get("type") == "reasoning"
                   and not i.get("encrypted_content", "").startswith("enc-%s-" % tag)]
        if foreign or (body.get("previous_response_id") or "").startswith("resp-") and \
                not body["previous_response_id"].startswith("resp-" + tag):
            return ex.json(400, INVALID_ENCRYPTED)
        ex.stream(sse({"type": "response.output_item.done", "item": reasoning_item(tag)},
                      message_event("from " + tag), completed_event("resp-" + tag)))


class TestReasoningAcrossAccounts:
    body = {"model": "gpt-5.4", "stream": True, "input": [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        reasoning_item("a"), {"type": "message", "role": "assistant", "content": []},
        {"type": "item_reference", "id": "rs_a1"}]}

    def test_a_conversation_that_moves_is_sent_once_more_without_the_old_reasoning(self, make_proxy, fake, tmp_path,
                                                                                 caplog):
        two = TwoAccounts(make_proxy, fake, tmp_path)
        proxy = two.proxy
        session = {"session-id": "s1"}
        assert proxy.request("POST", "/v1/responses", self.body, headers=session)[0] == 200  # on a
        two.limited.add("a")
        with caplog.at_level("INFO", logger="ocm"):
            status, _, answer = proxy.request("POST", "/v1/responses", dict(self.body, previous_response_id="resp-a"),
                                              headers=session)
        assert status == 200 and b"from b" in answer
        tags = [tag for tag, _ in two.seen]
        assert tags == ["a", "a", "b", "b"]  # 429 on a, then b refuses a's reasoning, then b without it
        retried = two.seen[-1][1]
        assert [i["type"] for i in retried["input"]] == ["message", "message"]
        assert "previous_response_id" not in retried and retried["model"] == "gpt-5.4"
        assert "cannot read this conversation's reasoning" in caplog.text

    def test_a_sticky_conversation_sent_to_another_account_later_is_retried_too(self, make_proxy, fake, tmp_path):
        two = TwoAccounts(make_proxy, fake, tmp_path)
        session = {"session-id": "s2"}
        two.proxy.request("POST", "/v1/responses", self.body, headers=session)
        two.limited.add("a")
        two.proxy.request("POST", "/v1/responses", {"model": "gpt-5.4"}, headers={"session-id": "other"})
        two.seen.clear()  # a is now cooling down: s2's next turn starts on b
        assert two.proxy.request("POST", "/v1/responses", self.body, headers=session)[0] == 200
        assert [tag for tag, _ in two.seen] == ["b", "b"]

    def test_a_conversation_that_never_moved_is_never_rewritten(self, make_proxy, fake, tmp_path):
        fake.on("POST", "/backend-api/codex/responses", lambda ex: ex.json(400, INVALID_ENCRYPTED))
        proxy = make_proxy()
        status, _, answer = proxy.request("POST", "/v1/responses", self.body)
        assert status == 400 and json.loads(answer) == INVALID_ENCRYPTED
        assert len(fake.api_requests()) == 1
        two = TwoAccounts(make_proxy, fake, tmp_path)
        two.route_before = two.route
        fake.on("POST", "/backend-api/codex/responses", lambda ex: (two.seen.append(1), ex.json(400, INVALID_ENCRYPTED)))
        status, _, answer = two.proxy.request("POST", "/v1/responses", self.body, headers={"session-id": "new"})
        assert status == 400 and json.loads(answer) == INVALID_ENCRYPTED and len(two.seen) == 1

    def test_other_400s_after_a_move_reach_the_client_unchanged(self, make_proxy, fake, tmp_path):
        two = TwoAccounts(make_proxy, fake, tmp_path)
        two.proxy.request("POST", "/v1/responses", self.body, headers={"session-id": "s3"})
        two.limited.add("a")
        original = two.route

        def route(ex):
            if ex.request.header("ChatGPT-Account-Id") == "acct-b":
                return ex.json(400, {"error": {"type": "invalid_request_error", "message": "bad tool"}})
            original(ex)

        fake.on("POST", "/backend-api/codex/responses", route)
        status, _, answer = two.proxy.request("POST", "/v1/responses", self.body, headers={"session-id": "s3"})
        assert status == 400 and json.loads(answer)["error"]["message"] == "bad tool"

    def test_a_websocket_that_lands_on_another_account_retries_its_turn(self, make_proxy, fake, tmp_path):
        ws = WSUpstream(fake)
        sent = []

        def upstream(sock, reader):
            for event in response_creates(sock, reader, lambda f: None):
                sent.append(event)
                if any(i.get("type") == "reasoning" for i in event.get("input", [])):
                    out = [{"type": "error", "status": 400, "error": INVALID_ENCRYPTED["error"]}]
                else:
                    out = [message_event("fresh on b"), completed_event("resp-b")]
                for o in out:
                    sock.sendall(ws_frame(0x1, json.dumps(o).encode()))

        ws.on_connect = upstream
        two = TwoAccounts(make_proxy, fake, tmp_path)
        two.proxy.request("POST", "/v1/responses", self.body, headers={"session-id": "s4"})  # the thread ran on a
        two.limited.add("a")
        two.proxy.request("POST", "/v1/responses", self.body, headers={"session-id": "x"})  # a starts resting
        client = WSClient(two.proxy.port, headers={"session-id": "s4"})
        assert ws.handshakes[-1].header("ChatGPT-Account-Id") == "acct-b"
        client.send_json(dict(self.body, type="response.create", previous_response_id="resp-a"))
        events = client.events_until_completed()
        assert [e["type"] for e in events] == ["response.output_item.done", "response.completed"]
        assert len(sent) == 2 and "previous_response_id" not in sent[1]
        assert all(i["type"] != "reasoning" for i in sent[1]["input"])
        client.close()

    @pytest.mark.parametrize("error, retried", [
        ({"error": {"code": "invalid_encrypted_content", "message": "x"}}, True),
        ({"error": {"type": "invalid_request_error", "message": "Item with id 'rs_abc123' not found."}}, True),
        ({"error": {"message": "Previous response with id 'resp_9' not found."}}, True),
        ({"type": "response.failed", "response": {"error": {"code": "invalid_encrypted_content"}}}, True),
        ({"error": {"message": "Item with id 'msg_1' not found."}}, False),
        ({"error": {"code": "context_length_exceeded"}}, False),
        ("not an object", False),
    ])
    def test_which_errors_mean_foreign_reasoning(self, error, retried):
        assert ocm.is_foreign_reasoning_error(error) is retried

    def test_stripping_keeps_everything_else(self):
        stripped = ocm.without_reasoning(dict(self.body, previous_response_id="resp-a", tools=[{"type": "x"}]))
        assert stripped == {"model": "gpt-5.4", "stream": True, "tools": [{"type": "x"}],
                            "input": [self.body["input"][0], self.body["input"][2]]}
        assert ocm.without_reasoning({"model": "m", "input": [{"type": "message"}]}) is None


# == 3. Compaction ================================================================

class TestCompaction:
    def test_compact_is_relayed_counted_and_budgeted(self, make_proxy, fake, tmp_path):
        fake.on("POST", "/backend-api/codex/responses/compact", lambda ex: ex.json(200, {
            "output": [{"type": "compaction", "encrypted_content": "c"}], "model": "gpt-5.4",
            "usage": {"input_tokens": 40000, "output_tokens": 0}}))
        proxy = make_proxy(users=[user(budgets=[{"period": "day", "usd": 0.15}])], timezone="UTC",
                           usages_path=str(tmp_path / "u.json"), budgets_path=str(tmp_path / "b.json"))
        assert proxy.request("POST", "/v1/responses/compact", {"model": "gpt-5.4", "input": []})[0] == 200
        assert fake.api_requests()[0].path == "/backend-api/codex/responses/compact"
        assert proxy.server.usage.to_json()["combinations"][0]["by_user"]["alice"]["request_count"] == 1
        assert proxy.server.ledger.spent("alice", "day")[0] == pytest.approx(0.10)
        assert proxy.request("POST", "/v1/responses/compact", {"model": "gpt-5.4", "input": []})[0] == 429

    def test_compaction_stays_on_its_conversations_account(self, make_proxy, fake, tmp_path):
        two = TwoAccounts(make_proxy, fake, tmp_path, kind="balancer")
        fake.on("POST", "/backend-api/codex/responses/compact", lambda ex: ex.json(200, {
            "output": [], "usage": {"input_tokens": 10, "output_tokens": 0}, "account": ex.request.header(
                "ChatGPT-Account-Id")}))
        first = two.proxy.request("POST", "/v1/responses", {"model": "gpt-5.4"}, headers={"session-id": "t1"})
        account = b"from a" if b"from a" in first[2] else b"from b"
        for _ in range(3):
            answer = json.loads(two.proxy.request("POST", "/v1/responses/compact", {"model": "gpt-5.4"},
                                                  headers={"session-id": "t1"})[2])
            assert answer["account"] == "acct-" + account.decode()[-1]

    def test_remote_compaction_v2_passes_byte_for_byte(self, proxy, fake):
        body = (b'{"model":"gpt-5.4","stream":true,"store":false,"input":[{"type":"message","role":"user",'
                b'"content":[{"type":"input_text","text":"x"}]},{"type":"compaction_trigger"}]}')
        status, _, _ = proxy.request("POST", "/v1/responses", body,
                                     headers={"x-codex-beta-features": "remote_compaction_v2",
                                              "Content-Type": "application/json"})
        sent = fake.api_requests()[0]
        assert status == 200 and sent.body == body
        assert sent.header("x-codex-beta-features") == "remote_compaction_v2"


# == 4. WebSocket details ==========================================================

class TestWebSocketDetails:
    def test_the_101_carries_the_headers_codex_reads_only_there(self, proxy, fake, ws):
        ws.extra_101_headers = {"x-codex-turn-state": "ts", "x-models-etag": "e1", "x-reasoning-included": "true",
                                "openai-model": "gpt-5.4", "x-codex-primary-used-percent": "7"}
        client = WSClient(proxy.port)
        assert client.status == 101
        for name, value in ws.extra_101_headers.items():
            assert client.headers[name] == value
        client.close()

    def test_the_60_minute_limit_reaches_the_client_and_the_session_is_counted(self, make_proxy, fake, ws,
                                                                              tmp_path):
        def upstream(sock, reader):
            for turn, _ in enumerate(response_creates(sock, reader, lambda f: None), 1):
                sock.sendall(ws_frame(0x1, json.dumps(completed_event("r%d" % turn)).encode()))
                if turn == 2:
                    limit = {"type": "error", "status": 400, "error": {
                        "type": "invalid_request_error", "code": "websocket_connection_limit_reached",
                        "message": "Responses websocket connection limit reached (60 minutes)."}}
                    sock.sendall(ws_frame(0x1, json.dumps(limit).encode()))
                    sock.sendall(ws_frame(0x8, close_body(1000, "limit")))
                    return

        ws.on_connect = upstream
        proxy = make_proxy(usages_path=str(tmp_path / "u.json"))
        client = WSClient(proxy.port)
        for _ in range(2):
            client.send_json({"type": "response.create", "model": "gpt-5.4"})
            client.events_until_completed()
        error = json.loads(client.frame()[2])
        assert error["error"]["code"] == "websocket_connection_limit_reached"
        fin, opcode, payload, _ = client.frame()
        assert opcode == 0x8 and payload[:2] == (1000).to_bytes(2, "big")
        assert proxy.server.usage.to_json()["combinations"][0]["total"]["request_count"] == 2
        client.close()

    def test_a_turn_closed_with_1009_reaches_the_client_as_1009(self, proxy, fake, ws):
        def upstream(sock, reader):
            for _ in response_creates(sock, reader, lambda f: None):
                sock.sendall(ws_frame(0x8, close_body(1009, "message too big")))
                return

        ws.on_connect = upstream
        client = WSClient(proxy.port)
        client.send_json({"type": "response.create", "model": "gpt-5.4"})
        fin, opcode, payload, _ = client.frame()
        assert opcode == 0x8 and int.from_bytes(payload[:2], "big") == 1009
        client.close()

    @pytest.mark.parametrize("upstream_status", [404, 426])
    def test_no_websocket_upstream_is_426_for_the_client(self, proxy, fake, ws, upstream_status):
        ws.status = upstream_status
        client = WSClient(proxy.port)
        assert client.status == 426
        client.close()


# == 5. The models list ==============================================================

class TestModelsList:
    def test_client_version_etag_and_304_pass_through(self, proxy, fake):
        def models(ex):
            if ex.request.header("If-None-Match") == '"v7"':
                return ex.send(304, b"", {"ETag": '"v7"', "x-models-etag": "v7"}, content_type=None)
            ex.json(200, {"models": [{"slug": "gpt-5.4"}]}, {"ETag": '"v7"', "x-models-etag": "v7"})

        fake.on("GET", "/backend-api/codex/models", models)
        status, headers, body = proxy.request("GET", "/v1/models?client_version=0.171.0")
        assert status == 200 and headers["etag"] == '"v7"' and headers["x-models-etag"] == "v7"
        assert json.loads(body)["models"][0]["slug"] == "gpt-5.4"
        assert fake.api_requests()[0].path == "/backend-api/codex/models?client_version=0.171.0"
        status, headers, body = proxy.request("GET", "/v1/models?client_version=0.171.0",
                                              headers={"If-None-Match": '"v7"'})
        assert status == 304 and body == b"" and headers["x-models-etag"] == "v7"

    def test_model_answers_carry_x_models_etag(self, proxy, fake):
        fake.on("POST", "/backend-api/codex/responses",
                lambda ex: ex.stream(sse(completed_event()), {"x-models-etag": "v8"}))
        status, headers, _ = proxy.request("POST", "/v1/responses", {"model": "gpt-5.4", "stream": True})
        assert status == 200 and headers["x-models-etag"] == "v8"


# == 6. Compressed request bodies ===================================================

class TestCompressedBodies:
    @pytest.mark.parametrize("encoding, body", [
        ("zstd", b"\x28\xb5\x2f\xfd\x04\x00\x41\x00\x00" + b"a zstd frame"),
        ("gzip", gzip.compress(b'{"model":"gpt-5.4","stream":true,"store":false}')),
        ("br", b"\x0b\x02\x80brotli"),
    ])
    def test_relayed_byte_for_byte_with_the_header(self, proxy, fake, encoding, body):
        status, _, _ = proxy.request("POST", "/v1/responses", body,
                                     headers={"Content-Encoding": encoding, "Content-Type": "application/json"})
        sent = fake.api_requests()[0]
        assert status == 200 and sent.body == body and sent.header("Content-Encoding") == encoding


# == The "done when": real Codex, a pool, a limit in the middle =====================

@needs_codex
class TestRealCodexAcrossAccounts:
    def test_a_pool_carries_a_conversation_past_a_limit_without_an_error_reaching_codex(self, make_proxy, fake,
                                                                                        tmp_path):
        two = TwoAccounts(make_proxy, fake, tmp_path)

        def route(ex):
            tag = ex.request.header("ChatGPT-Account-Id")[5:]
            body = ex.request.json()
            two.seen.append((tag, body))
            if tag in two.limited:
                return ex.json(429, {"error": {"type": "usage_limit_reached", "message": "limit",
                                               "plan_type": "plus", "resets_at": int(time.time()) + HOUR}})
            if any(i.get("type") == "reasoning" and not i.get("encrypted_content", "").startswith("enc-%s-" % tag)
                   for i in body.get("input", [])):
                return ex.json(400, INVALID_ENCRYPTED)
            outputs = [i for i in body.get("input", []) if i.get("type") == "function_call_output"]
            if not outputs:
                two.limited.add("a")  # the first turn was a's last
                events = [{"type": "response.output_item.done", "item": reasoning_item(tag)},
                          function_call_event("exec_command", {"cmd": "echo tool-says-$((40+2))"}),
                          completed_event("resp-1", "gpt-5.3-codex")]
            else:
                text = outputs[-1].get("output")
                text = text if isinstance(text, str) else json.dumps(text)
                answer = "the tool printed 42 (from %s)" % tag if "tool-says-42" in text else "missing"
                events = [message_event(answer), completed_event("resp-2", "gpt-5.3-codex")]
            ex.stream(sse(*events))

        fake.on("POST", "/backend-api/codex/responses", route)
        out = run_codex(two.proxy.port, tmp_path, "run the tool and report what it printed")
        assert out.returncode == 0, out.stderr[-3000:]
        assert "the tool printed 42 (from b)" in out.stdout
        tags = [tag for tag, _ in two.seen]
        assert tags[0] == "a" and tags[-1] == "b" and "a" in tags[1:]
        carried = [body for tag, body in two.seen[1:] if any(i.get("type") == "reasoning"
                                                             for i in body.get("input", []))]
        assert carried, "Codex sent no reasoning back: the test would prove nothing"
