"""Per-user policy and operations: limits and their refusals, budgets that
hold under concurrency, hashed tokens, shares of the subscription window,
/healthz and /metrics, SIGHUP reload, the access log."""

import contextlib
import datetime
import hashlib
import io
import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

import ocm
from test_ocm import (OCM_PY, USERS, completed_event, error_of, message_event, read_json, sse, start_process,
                      wait_for, write_auth)
from test_websocket import WSClient, WSUpstream, close_body


def user(name="alice", token="tok-alice", **extra):
    entry = {"name": name, "token": token}
    entry.update(extra)
    return entry


def priced_stream(input_tokens=40000, model="gpt-5.4", headers=None):
    """A response costing input_tokens x $2.50 / 1M (gpt-5.4): 40,000 -> $0.10."""
    return lambda ex: ex.stream(sse(message_event(), completed_event("r", model, input_tokens, 0, 0)), headers)


# == Limits ====================================================================

class TestLimits:
    def test_max_concurrent_counts_requests_in_flight(self, make_proxy, fake):
        gate = threading.Event()

        def slow(ex):
            gate.wait(5)
            ex.stream(sse(completed_event()))

        fake.on("POST", "/backend-api/codex/responses", slow)
        proxy = make_proxy(users=[user(max_concurrent=2), user("bob", "tok-bob")])
        results = []
        threads = [threading.Thread(target=lambda: results.append(proxy.request("POST", "/v1/responses", {})[0]))
                   for _ in range(2)]
        for t in threads:
            t.start()
        assert wait_for(lambda: len(fake.api_requests()) == 2)
        status, headers, body = proxy.request("POST", "/v1/responses", {})
        assert status == 429 and headers["retry-after"] == "1"
        assert error_of(body) == ("rate_limit_error", "you may run 2 requests at a time, and 2 are running; "
                                                      "try again when one ends")
        assert proxy.request("POST", "/v1/models", token="tok-bob")[0] == 200  # others are not held up
        gate.set()
        for t in threads:
            t.join(5)
        assert results == [200, 200]
        # a place is given back as the handler leaves, just after the client has its last byte
        assert wait_for(lambda: not proxy.server.concurrency.snapshot().get("alice"))
        assert proxy.request("POST", "/v1/responses", {})[0] == 200  # places are given back

    def test_a_websocket_holds_a_place_for_its_life(self, make_proxy, fake):
        WSUpstream(fake)
        proxy = make_proxy(users=[user(max_concurrent=1)])
        client = WSClient(proxy.port)
        assert client.status == 101
        status, _, body = proxy.request("POST", "/v1/responses", {})
        assert status == 429 and "1 request at a time" in error_of(body)[1]
        client.send(0x8, close_body(1000))
        client.frame()
        client.close()
        assert wait_for(lambda: proxy.request("POST", "/v1/responses", {})[0] == 200)

    @pytest.mark.parametrize("model, allowed", [("gpt-5.3-codex", True), ("gpt-5.4-mini", True),
                                                ("gpt-5.4", False), ("o3", False)])
    def test_models_allow_list(self, make_proxy, fake, model, allowed):
        proxy = make_proxy(users=[user(models=["gpt-5.3-*", "*-mini"])])
        status, _, body = proxy.request("POST", "/v1/responses", {"model": model})
        if allowed:
            assert status == 200
        else:
            assert status == 403 and fake.api_requests() == []
            assert error_of(body) == ("permission_error", "model %r is not allowed for you "
                                                          "(allowed: gpt-5.3-*, *-mini)" % model)

    def test_allow_list_reads_the_real_top_level_model(self, make_proxy, fake):
        proxy = make_proxy(users=[user(models=["gpt-5-mini"])])
        body = b'{"input": [{"model": "gpt-5-mini"}], "model": "gpt-5.4-pro"}'
        status, _, _ = proxy.request("POST", "/v1/responses", body, headers={"Content-Type": "application/json"})
        assert status == 403 and fake.api_requests() == []

    def test_websocket_turns_obey_the_allow_list(self, make_proxy, fake):
        ws = WSUpstream(fake)
        proxy = make_proxy(users=[user(models=["gpt-5-mini"])])
        client = WSClient(proxy.port)
        client.send_json({"type": "response.create", "model": "gpt-5.4-pro"})
        fin, opcode, payload, _ = client.frame()
        event = json.loads(payload)
        assert event["type"] == "error" and event["status"] == 403
        assert event["error"]["type"] == "permission_error"
        client.send_json({"type": "response.create", "model": "gpt-5-mini"})
        assert client.events_until_completed()[-1]["type"] == "response.completed"
        creates = [json.loads(p)["model"] for _, op, p, _ in ws.frames if op == 0x1]
        assert creates == ["gpt-5-mini"]  # the refused turn never went upstream

    def test_expired_access_is_403(self, make_proxy, fake):
        proxy = make_proxy(users=[user(expires_at="2020-01-01T00:00:00Z"),
                                  user("bob", "tok-bob", expires_at="2099-01-01T00:00:00Z")])
        status, _, body = proxy.request("POST", "/v1/responses", {})
        assert status == 403 and error_of(body) == (
            "permission_error", "your access expired at 2020-01-01 00:00:00 UTC; ask the owner to renew it")
        assert proxy.request("POST", "/v1/responses", {}, token="tok-bob")[0] == 200
        assert len(fake.api_requests()) == 1

    @pytest.mark.parametrize("bad, needle", [
        ({"max_concurrent": -1}, "max_concurrent"), ({"models": "gpt-5"}, "expected a list"),
        ({"expires_at": "tomorrow"}, "not an RFC 3339 time"), ({"budgets": [{"period": "year", "usd": 1}]}, "year"),
        ({"budgets": [{"period": "day"}]}, "give usd or tokens"),
        ({"budgets": [{"period": "day", "usd": 1, "tokens": 2}]}, "give usd or tokens"),
        ({"budgets": [{"period": "day", "usd": -1}]}, "positive"), ({"share_5h": 0}, "percent"),
        ({"share_weekly": 120}, "percent"), ({"token": "sha256:abc"}, "64 hex digits"),
    ])
    def test_bad_limits_name_the_key(self, bad, needle):
        with pytest.raises(ocm.ConfigError) as info:
            ocm.config_from_dict({"users": [dict(user(), **bad)]})
        assert needle in str(info.value) and "users[0]" in str(info.value)


# == Budgets ===================================================================

class TestPeriodClock:
    @pytest.mark.parametrize("zone, now, period, key, resets", [
        ("UTC", "2026-11-24T23:30:00Z", "day", "2026-11-24", "2026-11-25T00:00:00Z"),
        ("+05:30", "2026-11-24T19:00:00Z", "day", "2026-11-25", "2026-11-25T18:30:00Z"),
        ("UTC", "2026-11-26T10:00:00Z", "week", "week of 2026-11-23", "2026-11-30T00:00:00Z"),
        ("UTC", "2026-12-31T10:00:00Z", "month", "2026-12", "2027-01-01T00:00:00Z"),
        ("-03:00", "2026-12-01T01:00:00Z", "month", "2026-11", "2026-12-01T03:00:00Z"),
    ])
    def test_periods_in_a_time_zone(self, zone, now, period, key, resets):
        clock = ocm.PeriodClock(zone)
        got_key, got_resets = clock.period(period, ocm.parse_rfc3339(now))
        assert (got_key, got_resets) == (key, ocm.parse_rfc3339(resets))

    @pytest.mark.skipif(sys.version_info < (3, 9), reason="IANA time zones need zoneinfo (3.9+)")
    def test_iana_zone_with_summer_time(self):
        clock = ocm.PeriodClock("Europe/Berlin")
        key, resets = clock.period("day", ocm.parse_rfc3339("2026-07-01T21:59:00Z"))  # 23:59 in Berlin
        assert key == "2026-07-01" and resets == ocm.parse_rfc3339("2026-07-01T22:00:00Z")

    def test_local_time_is_the_boxs(self):
        clock = ocm.PeriodClock("local")
        now = time.time()
        key, resets = clock.period("day", now)
        assert key == time.strftime("%Y-%m-%d", time.localtime(now))
        assert time.localtime(resets)[3:6] == (0, 0, 0) and 0 < resets - now <= 25 * 3600

    def test_unknown_zone_is_a_config_error(self):
        with pytest.raises(ocm.ConfigError, match="timezone"):
            ocm.config_from_dict({"timezone": "Mars/Olympus" if sys.version_info >= (3, 9) else "Europe/Berlin"})


@pytest.fixture
def budget_proxy(make_proxy, fake, tmp_path):
    def make(budgets, **extra):
        return make_proxy(users=[user(budgets=budgets), user("bob", "tok-bob")],
                          budgets_path=str(tmp_path / "budgets.json"), timezone="UTC", **extra)
    return make


class TestBudgets:
    def test_usd_budget_refusal_says_which_and_when(self, budget_proxy, fake):
        fake.on("POST", "/backend-api/codex/responses", priced_stream(40000))  # $0.10 each
        proxy = budget_proxy([{"period": "day", "usd": 0.25}])
        assert [proxy.request("POST", "/v1/responses", {})[0] for _ in range(2)] == [200, 200]
        status, headers, body = proxy.request("POST", "/v1/responses", {})
        kind, message = error_of(body)
        tomorrow = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1)).strftime("%Y-%m-%d")
        assert status == 429 and kind == "rate_limit_error"
        assert message == ("your daily budget of $0.25 has $0.05 left ($0.20 spent), less than your requests "
                           "usually cost ($0.10); it resets at %s 00:00 UTC" % tomorrow)
        assert 0 < int(headers["retry-after"]) <= 86400
        assert len(fake.api_requests()) == 2
        assert proxy.request("POST", "/v1/responses", {}, token="tok-bob")[0] == 200  # bob has no budget

    @pytest.mark.parametrize("budget", [{"period": "day", "usd": 0.005}, {"period": "day", "tokens": 1500}])
    def test_a_budget_below_the_first_estimate_still_admits_until_spent(self, budget_proxy, fake, budget):
        """The estimate set aside ($0.01 or 2,000 tokens at first) never exceeds the budget itself."""
        fake.on("POST", "/backend-api/codex/responses", priced_stream(1000))  # $0.0025 each
        proxy = budget_proxy([budget])
        assert [proxy.request("POST", "/v1/responses", {})[0] for _ in range(2)] == [200, 429]

    def test_token_budget(self, budget_proxy, fake):
        fake.on("POST", "/backend-api/codex/responses", priced_stream(3000))
        proxy = budget_proxy([{"period": "month", "tokens": 7000}])
        assert [proxy.request("POST", "/v1/responses", {})[0] for _ in range(3)] == [200, 200, 429]
        message = error_of(proxy.request("POST", "/v1/responses", {})[2])[1]
        assert message.startswith("your monthly budget of 7,000 tokens has 1,000 tokens left (6,000 used), "
                                  "less than your requests usually use (3,000 tokens)")

    def test_twenty_parallel_requests_at_the_edge_overshoot_by_at_most_one(self, budget_proxy, fake, tmp_path):
        """Every peer checks before and charges after, so parallel streams run
        past a budget. Reservations bound that to one request's cost."""
        gate = threading.Event()
        cost = 0.10

        def route(ex):
            if ex.request.json().get("parallel"):
                gate.wait(5)  # all twenty are in flight together
            priced_stream(40000)(ex)

        fake.on("POST", "/backend-api/codex/responses", route)
        proxy = budget_proxy([{"period": "day", "usd": 1.00}])
        for _ in range(9):  # $0.90 spent: the user's running average is $0.10
            assert proxy.request("POST", "/v1/responses", {})[0] == 200
        results = []
        threads = [threading.Thread(target=lambda: results.append(
            proxy.request("POST", "/v1/responses", {"parallel": True})[0])) for _ in range(20)]
        for t in threads:
            t.start()
        assert wait_for(lambda: len(results) >= 19 or len(fake.api_requests()) >= 10, 5)
        time.sleep(0.1)
        gate.set()
        for t in threads:
            t.join(10)
        spent, _ = proxy.server.ledger.spent("alice", "day")
        assert results.count(200) >= 1 and results.count(429) >= 18
        assert spent <= 1.00 + cost + 1e-9  # the bound: at most one request's cost over
        assert len(fake.api_requests()) == 9 + results.count(200)

    def test_a_failed_request_gives_its_reservation_back(self, budget_proxy, fake):
        fake.on("POST", "/backend-api/codex/responses", lambda ex: ex.json(500, {"error": "down"}))
        proxy = budget_proxy([{"period": "day", "usd": 0.05}])
        for _ in range(5):  # each reserves the $0.01 floor and releases it: never refused
            assert proxy.request("POST", "/v1/responses", {})[0] == 500
        assert proxy.server.ledger.spent("alice", "day") == (0.0, 0.0)

    def test_budgets_survive_a_restart(self, tmp_path, fake, auth_path):
        fake.on("POST", "/backend-api/codex/responses", priced_stream(40000))
        config = tmp_path / "config.json"
        config.write_text(json.dumps({
            "listen_port": 0, "credential_path": str(auth_path), "timezone": "UTC",
            "users": [user(budgets=[{"period": "week", "usd": 0.15}])],
            "upstream": {"chatgpt_url": fake.chatgpt_url, "token_url": fake.token_url}}))
        statuses = []
        for run in range(2):
            proc, port, _ = start_process(config)
            try:
                import http.client
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("POST", "/v1/responses", body=b"{}", headers={"Authorization": "Bearer tok-alice"})
                statuses.append(conn.getresponse().status)
            finally:
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(10) == 0
        assert statuses == [200, 429]  # $0.10 spent, and remembered: another $0.10 would pass $0.15
        saved = read_json(tmp_path / "ocm-budgets.json")  # beside the config, by default
        week = list(saved["users"]["alice"]["week"].values())[0]
        assert week["usd"] == pytest.approx(0.1) and saved["timezone"] == "UTC"

    def test_websocket_turns_are_budgeted(self, budget_proxy, fake):
        ws = WSUpstream(fake)
        proxy = budget_proxy([{"period": "day", "tokens": 5000}])  # two turns fit (the estimate's floor is 2,000)
        client = WSClient(proxy.port)
        for turn in range(2):  # the fake's turns use 1000 x turn input tokens
            client.send_json({"type": "response.create", "model": "gpt-5.4"})
            client.events_until_completed()
        client.send_json({"type": "response.create", "model": "gpt-5.4"})
        event = json.loads(client.frame()[2])
        assert event["status"] == 429 and "daily budget of 5,000 tokens" in event["error"]["message"]
        client.close()


# == Hashed tokens =============================================================

class TestHashedTokens:
    def test_a_hashed_token_authenticates_the_real_token(self, make_proxy, fake):
        digest = "sha256:" + hashlib.sha256(b"tok-secret-carol").hexdigest()
        proxy = make_proxy(users=[user("carol", digest)])
        assert proxy.request("POST", "/v1/responses", {}, token="tok-secret-carol")[0] == 200
        assert proxy.request("POST", "/v1/responses", {}, token=digest)[0] == 401  # the config holds no secret
        assert proxy.request("POST", "/v1/responses", {}, token=digest[7:])[0] == 401

    def test_hash_token_command(self):
        out = subprocess.run([sys.executable, OCM_PY, "hash-token"], input="tok-secret-carol\n",
                             capture_output=True, text=True, timeout=20)
        assert out.returncode == 0
        assert out.stdout.strip() == "sha256:" + hashlib.sha256(b"tok-secret-carol").hexdigest()
        empty = subprocess.run([sys.executable, OCM_PY, "hash-token"], input="\n", capture_output=True,
                               text=True, timeout=20)
        assert empty.returncode == 2

    def test_a_token_and_its_hash_are_the_same_token(self):
        digest = "sha256:" + hashlib.sha256(b"same").hexdigest()
        with pytest.raises(ocm.ConfigError, match="same token"):
            ocm.config_from_dict({"users": [user("a", "same"), user("b", digest)]})


# == Shares ====================================================================

class ScriptedAccount:
    """An upstream whose used-percent headers rise by a set amount per request."""

    def __init__(self, fake, rise_per_request):
        self.used = 0.0
        self.rise = rise_per_request
        self.resets_at = int(time.time()) + 3600
        self.lock = threading.Lock()
        fake.on("POST", "/backend-api/codex/responses", self.route)

    def route(self, ex):
        # The headers report use before this request; this request's use shows in the next one.
        with self.lock:
            used = self.used
            self.used += self.rise.get(ex.request.header("Authorization"), 0)
        body = ex.request.json()
        headers = {"x-codex-primary-used-percent": "%g" % used, "x-codex-primary-reset-at": str(self.resets_at),
                   "x-codex-primary-window-minutes": "300"}
        ex.stream(sse(completed_event("r", "gpt-5.4", body.get("tokens", 40000), 0, 0)), headers)


class TestShares:
    def test_sequential_requests_are_measured_exactly(self, make_proxy, fake):
        proxy = make_proxy(users=[user(share_5h=25), user("bob", "tok-bob")])
        scripted = ScriptedAccount(fake, {})
        scripted.rise = {"Bearer " + read_json(proxy.server.credential.path)["tokens"]["access_token"]: 10}
        statuses = [proxy.request("POST", "/v1/responses", {})[0] for _ in range(4)]
        account = proxy.server.accounts["default"]
        # alice's three requests rose the window 10 points each: the third answer saw 20,
        # and the provisional estimate (10 per $0.10) covers the third.
        assert statuses == [200, 200, 200, 429]
        assert account.user_share("alice", "short") == pytest.approx(30, abs=0.01)
        message = error_of(proxy.request("POST", "/v1/responses", {})[2])[1]
        assert message.startswith("you have used your share (25%) of the 5-hour window of account default")
        assert proxy.request("POST", "/v1/responses", {}, token="tok-bob")[0] == 200  # bob has no cap

    def test_overlapping_requests_are_split_by_cost(self):
        account = ocm.Account("x", "/nonexistent/auth.json", "", None, ocm.Config())
        headers = lambda used: ocm.Headers([("x-codex-primary-used-percent", str(used)),
                                            ("x-codex-primary-reset-at", str(int(time.time()) + 3600))])
        account.observe_headers(headers(10), True)
        account.note_completion("alice", 0.30)  # two requests finished between two answers
        account.note_completion("bob", 0.10)
        account.observe_headers(headers(18), True)  # a rise of 8 points, split 3:1 by cost
        assert account.user_share("alice", "short") == pytest.approx(6)
        assert account.user_share("bob", "short") == pytest.approx(2)
        account.note_completion("bob", 0.20)  # estimated at 20 points per dollar until measured
        assert account.user_share("bob", "short") == pytest.approx(6)
        account.observe_headers(headers(21), True)  # measured: 3 points
        assert account.user_share("bob", "short") == pytest.approx(5)

    def test_a_new_window_starts_shares_afresh(self):
        account = ocm.Account("x", "/nonexistent/auth.json", "", None, ocm.Config())
        now = int(time.time())
        account.observe_headers(ocm.Headers([("x-codex-primary-used-percent", "10"),
                                             ("x-codex-primary-reset-at", str(now + 60))]), True)
        account.note_completion("alice", 1.0)
        account.observe_headers(ocm.Headers([("x-codex-primary-used-percent", "30"),
                                             ("x-codex-primary-reset-at", str(now + 60))]), True)
        assert account.user_share("alice", "short") == 20
        account.observe_headers(ocm.Headers([("x-codex-primary-used-percent", "1"),
                                             ("x-codex-primary-reset-at", str(now + 18060))]), True)
        assert account.user_share("alice", "short") == 0


# == /healthz and /metrics =====================================================

def parse_exposition(text):
    """A small Prometheus text-format parser: {name: {labels-tuple: value}}, types."""
    samples, types = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
            continue
        if not line or line.startswith("#"):
            continue
        match = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$', line)
        assert match, "not an exposition line: %r" % line
        name, labels, value = match.groups()
        pairs = tuple(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', labels or ""))
        samples.setdefault(name, {})[pairs] = float(value)
    return samples, types


class TestOperations:
    def test_healthz_is_open_and_says_little(self, make_proxy, fake, auth_path):
        proxy = make_proxy()
        status, headers, body = proxy.request("GET", "/healthz", token=None)
        assert status == 200 and json.loads(body) == {"status": "ok", "credential_usable": True}
        os.unlink(str(auth_path))
        assert json.loads(proxy.request("GET", "/healthz", token=None)[2])["credential_usable"] is False
        assert fake.requests == []

    def test_metrics(self, make_proxy, fake):
        fake.on("POST", "/backend-api/codex/responses", priced_stream(40000, headers={
            "x-codex-primary-used-percent": "12.5", "x-codex-secondary-used-percent": "3"}))
        proxy = make_proxy()
        for token in ("tok-alice", "tok-alice", "tok-bob", "tok-wrong"):
            proxy.request("POST", "/v1/responses", {"model": "gpt-5.4"}, token=token)
        # a refusal is counted just after its 401 went out
        refused = ("ocm_requests_total", (("model", "-"), ("status", "401"), ("user", "-")))
        assert wait_for(lambda: proxy.server.metrics.counters().get(refused) == 1)
        status, headers, body = proxy.request("GET", "/metrics", token=None)
        assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
        samples, types = parse_exposition(body.decode())
        assert types["ocm_requests_total"] == "counter" and types["ocm_upstream_latency_seconds"] == "histogram"
        requests = samples["ocm_requests_total"]
        assert requests[(("model", "gpt-5.4"), ("status", "200"), ("user", "alice"))] == 2
        assert requests[(("model", "-"), ("status", "401"), ("user", "-"))] == 1
        assert samples["ocm_tokens_total"][(("kind", "input"), ("model", "gpt-5.4"), ("user", "bob"))] == 40000
        assert samples["ocm_cost_usd_total"][(("model", "gpt-5.4"), ("user", "alice"))] == pytest.approx(0.2)
        assert samples["ocm_account_used_percent"][(("account", "default"), ("window", "5h"))] == 12.5
        assert samples["ocm_account_usable"][(("account", "default"),)] == 1
        assert samples["ocm_token_refreshes_total"][(("account", "default"),)] == 0
        buckets = samples["ocm_upstream_latency_seconds_bucket"]
        assert buckets[(("le", "+Inf"),)] == samples["ocm_upstream_latency_seconds_count"][()] == 3
        values = [buckets[(("le", str(b)),)] for b in ocm.LATENCY_BUCKETS]
        assert values == sorted(values)  # cumulative

    def test_in_flight_gauge(self, make_proxy, fake):
        gate = threading.Event()
        fake.on("POST", "/backend-api/codex/responses", lambda ex: (gate.wait(5), ex.stream(sse(completed_event()))))
        proxy = make_proxy()
        t = threading.Thread(target=lambda: proxy.request("POST", "/v1/responses", {}))
        t.start()
        assert wait_for(lambda: fake.api_requests())
        samples, _ = parse_exposition(proxy.request("GET", "/metrics")[2].decode())
        assert samples["ocm_in_flight"][(("user", "alice"),)] == 1
        gate.set()
        t.join(5)

    def test_metrics_for_others_need_the_metrics_token(self, make_proxy, fake):
        proxy = make_proxy(metrics_token="sha256:" + hashlib.sha256(b"scrape-me").hexdigest())
        request = ocm.ClientRequest("GET", "/metrics", "HTTP/1.1", ocm.Headers())
        with pytest.raises(ocm.HTTPError) as info:
            proxy.server.check_metrics_access(request, "10.1.2.3")
        assert info.value.status == 403
        request.headers.add("Authorization", "Bearer wrong")
        with pytest.raises(ocm.HTTPError):
            proxy.server.check_metrics_access(request, "10.1.2.3")
        good = ocm.ClientRequest("GET", "/metrics", "HTTP/1.1", ocm.Headers([("Authorization", "Bearer scrape-me")]))
        proxy.server.check_metrics_access(good, "10.1.2.3")
        proxy.server.check_metrics_access(request, "::1")
        proxy.server.check_metrics_access(request, "::ffff:127.0.0.1")

    def test_label_values_are_escaped(self):
        metrics = ocm.Metrics()
        assert ocm.prometheus_escape('a"b\\c\nd') == 'a\\"b\\\\c\\nd'


# == The access log ============================================================

class TestAccessLog:
    @pytest.mark.parametrize("log_format", ["text", "json"])
    def test_one_line_per_request_without_secrets(self, make_proxy, fake, caplog, log_format):
        fake.on("POST", "/backend-api/codex/responses", priced_stream(40000))
        proxy = make_proxy(log_format=log_format)
        with caplog.at_level(logging.INFO, logger="ocm.access"):
            proxy.request("POST", "/v1/responses", {"model": "gpt-5.4"})
            proxy.request("GET", "/v1/models", token="tok-nope")
            # a line is written just after its answer went out
            assert wait_for(lambda: len([r for r in caplog.records if r.name == "ocm.access"]) == 2)
        # each handler thread logs once its answer is out, so the two lines may land in either order
        lines = sorted((r.getMessage() for r in caplog.records if r.name == "ocm.access"),
                       key=lambda line: line.startswith("- ") or '"user": null' in line)
        if log_format == "json":
            first, second = (json.loads(line) for line in lines)
            assert first["user"] == "alice" and first["method"] == "POST" and first["path"] == "/v1/responses"
            assert first["status"] == 200 and first["model"] == "gpt-5.4" and first["input_tokens"] == 40000
            assert first["cost_usd"] == pytest.approx(0.1) and first["duration_s"] >= 0
            assert second["status"] == 401 and second["user"] is None
        else:
            assert re.match(r"^alice POST /v1/responses 200 model=gpt-5\.4 in=40000 cached=0 out=0 "
                            r"cost=\$0\.1000 \d+\.\d{3}s account=default$", lines[0]), lines[0]
            assert lines[1].startswith("- GET /v1/models 401 ")
        assert "tok-alice" not in caplog.text and "tok-nope" not in caplog.text

    def test_lines_are_written_in_batches_in_order_and_never_held_long(self):
        stream = io.StringIO()
        handler = ocm.BatchedStreamHandler(stream, max_delay=0.2, max_bytes=200)
        handler.setFormatter(logging.Formatter("%(message)s"))
        record = lambda text: logging.LogRecord("ocm.access", logging.INFO, "", 0, text, None, None)
        handler.handle(record("one"))
        handler.handle(record("two"))
        assert stream.getvalue() == ""  # a write per line is what this saves
        handler.flush_if_due()
        assert stream.getvalue() == ""
        time.sleep(0.25)
        handler.flush_if_due()  # what the housekeeping thread does in a quiet moment
        assert stream.getvalue() == "one\ntwo\n"
        for i in range(30):  # 200 bytes gathered: written at once
            handler.handle(record("line %02d" % i))
        assert stream.getvalue().count("line") >= 24
        handler.flush()
        assert stream.getvalue().splitlines()[2:] == ["line %02d" % i for i in range(30)]

    def test_a_quiet_ocm_writes_the_access_line_within_a_second_and_before_later_log_lines(
            self, tmp_path, fake, auth_path):
        config = tmp_path / "c.json"
        config.write_text(json.dumps({"listen_port": 0, "credential_path": str(auth_path), "users": USERS,
                                      "upstream": {"chatgpt_url": fake.chatgpt_url, "token_url": fake.token_url}}))
        proc, port, _ = start_process(config)
        lines = queue.Queue()
        reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True)
        reader.start()
        try:
            import http.client
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("POST", "/v1/responses", body=b"{}", headers={"Authorization": "Bearer tok-alice"})
            conn.getresponse().read()
            conn.close()
            deadline = time.monotonic() + 2 * ocm.ACCESS_LOG_DELAY + 1.5
            seen = ""
            while "alice POST /v1/responses 200" not in seen and time.monotonic() < deadline:
                with contextlib.suppress(queue.Empty):
                    seen += lines.get(timeout=0.1)
            assert "alice POST /v1/responses 200" in seen
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/v1/models", headers={"Authorization": "Bearer tok-bob"})
            conn.getresponse().read()
            conn.close()
            # well inside the batching delay, so bob's line is usually still held when SIGTERM is logged
            time.sleep(ocm.ACCESS_LOG_DELAY / 5)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
            reader.join(5)
        rest = "".join(lines.queue)
        assert "bob GET /v1/models 200" in rest and "received SIGTERM" in rest
        # the log keeps its order: a held access line is written before any line logged after it
        stamps = re.findall(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ", seen + rest, re.M)
        assert len(stamps) >= 4 and stamps == sorted(stamps)

    def test_json_lines_are_pure_json_on_stderr(self, tmp_path, fake, auth_path):
        config = tmp_path / "c.json"
        config.write_text(json.dumps({"listen_port": 0, "credential_path": str(auth_path), "users": USERS,
                                      "log_format": "json",
                                      "upstream": {"chatgpt_url": fake.chatgpt_url, "token_url": fake.token_url}}))
        proc, port, _ = start_process(config)
        try:
            import http.client
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("POST", "/v1/responses", body=b"{}", headers={"Authorization": "Bearer tok-alice"})
            conn.getresponse().read()
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=10)
        access = [line for line in err.splitlines() if line.startswith("{")]
        assert len(access) == 1 and json.loads(access[0])["user"] == "alice"


# == SIGHUP ====================================================================

class TestReload:
    def test_sighup_changes_users_and_limits_without_cutting_streams(self, tmp_path, fake, auth_path):
        WSUpstream(fake)
        gate = threading.Event()

        def slow(ex):
            ex.start_chunked()
            ex.chunk(sse(message_event("part one")))
            gate.wait(10)
            ex.chunk(sse(completed_event()))
            ex.end_chunked()

        fake.on("POST", "/backend-api/codex/responses", slow)
        config = tmp_path / "config.json"
        base = {"listen_port": 0, "credential_path": str(auth_path),
                "upstream": {"chatgpt_url": fake.chatgpt_url, "token_url": fake.token_url}}
        config.write_text(json.dumps(dict(base, users=[user()])))
        proc, port, _ = start_process(config)
        try:
            import http.client
            stream = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
            stream.request("POST", "/v1/responses", body=b"{}", headers={"Authorization": "Bearer tok-alice"})
            resp = stream.getresponse()
            assert b"part one" in resp.read1(65536)
            ws = WSClient(port)
            assert ws.status == 101

            def status_of(token, model="gpt-5.4"):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("GET", "/v1/models", body=json.dumps({"model": model}).encode(),
                             headers={"Authorization": "Bearer " + token})
                return conn.getresponse().status

            assert status_of("tok-carol") == 401
            config.write_text(json.dumps(dict(base, users=[user(models=["gpt-5-mini"]), user("carol", "tok-carol")])))
            proc.send_signal(signal.SIGHUP)
            assert wait_for(lambda: status_of("tok-carol") == 200, 5)
            assert status_of("tok-alice") == 403  # the new allow-list applies to new requests

            config.write_text("{ not json")  # a broken config is refused; the running one stays
            proc.send_signal(signal.SIGHUP)
            time.sleep(0.5)
            assert status_of("tok-carol") == 200

            gate.set()  # the stream that began before both reloads ends normally
            assert b"response.completed" in resp.read()
            ws.send_json({"type": "response.create", "model": "gpt-5-mini"})
            assert ws.events_until_completed()[-1]["type"] == "response.completed"
            ws.send(0x8, close_body(1000))
            assert ws.frame()[1] == 0x8
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=10)
        assert "config reloaded" in err and "still running the previous config" in err
        assert proc.returncode == 0

    def test_reload_keeps_unchanged_accounts_and_their_state(self, make_proxy, fake, auth_path):
        proxy = make_proxy()
        account = proxy.server.accounts["default"]
        account.mark_rate_limited(time.time() + 60)
        config = ocm.config_from_dict({"listen_port": 0, "credential_path": str(auth_path),
                                       "users": [user("dora", "tok-dora")],
                                       "upstream": {"chatgpt_url": fake.chatgpt_url, "token_url": fake.token_url}})
        proxy.server.reload(config)
        assert proxy.server.accounts["default"] is account and account.cooldown_until > time.time()
        assert proxy.request("POST", "/v1/responses", {}, token="tok-dora")[0] == 200
        assert proxy.request("POST", "/v1/responses", {}, token="tok-alice")[0] == 401


class TestOwnersView:
    def test_budgets_and_shares_show_in_metrics_and_in_the_usage_report(self, tmp_path, fake, auth_path):
        """The issue's "done when": a token, a budget and a share per person,
        visible at /metrics and in `ocm.py usage`."""
        fake.on("POST", "/backend-api/codex/responses", priced_stream(40000, headers={
            "x-codex-primary-used-percent": "5", "x-codex-primary-reset-at": str(int(time.time()) + 3600)}))
        config = tmp_path / "config.json"
        config.write_text(json.dumps({
            "listen_port": 0, "credential_path": str(auth_path), "timezone": "UTC",
            "usages_path": str(tmp_path / "usage.json"),
            "users": [user(budgets=[{"period": "day", "usd": 2}], share_5h=40),
                      user("bob", "tok-bob", budgets=[{"period": "month", "tokens": 100000}])],
            "upstream": {"chatgpt_url": fake.chatgpt_url, "token_url": fake.token_url}}))
        proc, port, _ = start_process(config)
        try:
            import http.client
            for token in ("tok-alice", "tok-alice", "tok-bob"):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("POST", "/v1/responses", body=b"{}", headers={"Authorization": "Bearer " + token})
                conn.getresponse().read()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/metrics")
            samples, _ = parse_exposition(conn.getresponse().read().decode())
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0
        spent = samples["ocm_budget_spent"]
        assert spent[(("period", "day"), ("unit", "usd"), ("user", "alice"))] == pytest.approx(0.2)
        assert samples["ocm_budget_limit"][(("period", "day"), ("unit", "usd"), ("user", "alice"))] == 2
        assert spent[(("period", "month"), ("unit", "tokens"), ("user", "bob"))] == 40000
        assert (("account", "default"), ("user", "alice"), ("window", "5h")) in samples["ocm_user_share_percent"]
        report = subprocess.run([sys.executable, OCM_PY, "usage", str(config)], capture_output=True, text=True,
                                timeout=20)
        assert report.returncode == 0
        assert "alice        day             $0.20 of $2.00" in report.stdout
        assert "bob          month   40,000 tokens of 100,000 tokens" in report.stdout
