"""Several accounts: balancer and fallback pools, quota state, stickiness,
429 failover, the status endpoint, per-account files and usage.

Three fake accounts share the fake upstream; it tells them apart by the
ChatGPT-Account-Id header OCM sends, and each can be scripted: its rate-limit
headers, a 429, its usage-endpoint answer."""

import json
import os
import threading
import time

import pytest

import ocm
from test_ocm import (CODEX, USERS, completed_event, error_of, message_event, new_access_token, read_json, sse,
                      wait_for, write_auth)
from test_websocket import WSClient, close_body

TAGS = ("a", "b", "c")


class FakeAccounts:
    """The upstream side of three accounts."""

    def __init__(self, fake):
        self.fake = fake
        self.lock = threading.Lock()
        self.used = {tag: (10.0, 5.0) for tag in TAGS}      # primary, secondary used percent
        self.resets = {tag: (int(time.time()) + 3600, int(time.time()) + 5 * 86400) for tag in TAGS}
        self.limited = {}         # tag -> resets_at while that account answers 429
        self.poll_answers = {}    # tag -> (status, body) for the usage endpoint
        self.served = []          # (tag, session, body) of every 200
        self.refused = []         # (tag, body) of every 429
        self.polls = []           # tags, in poll order
        fake.on("POST", "/backend-api/codex/responses", self.responses)
        fake.on("GET", "/backend-api/wham/usage", self.usage)

    @staticmethod
    def tag_of(ex):
        return ex.request.header("ChatGPT-Account-Id", "acct-?")[5:]

    def headers_for(self, tag):
        primary, secondary = self.used[tag]
        reset_p, reset_s = self.resets[tag]
        return {"x-codex-primary-used-percent": str(primary), "x-codex-primary-window-minutes": "300",
                "x-codex-primary-reset-at": str(reset_p), "x-codex-secondary-used-percent": str(secondary),
                "x-codex-secondary-window-minutes": "10080", "x-codex-secondary-reset-at": str(reset_s)}

    def responses(self, ex):
        tag = self.tag_of(ex)
        with self.lock:
            limited = self.limited.get(tag)
        if limited:
            with self.lock:
                self.refused.append((tag, ex.request.body))
            return ex.json(429, {"error": {"type": "usage_limit_reached", "message": "limit",
                                           "plan_type": "plus", "resets_at": limited}},
                           dict(self.headers_for(tag), **{"x-codex-primary-used-percent": "100",
                                                          "x-codex-primary-reset-at": str(limited)}))
        with self.lock:
            self.served.append((tag, ex.request.header("session-id"), ex.request.body))
        ex.stream(sse(message_event("from " + tag), completed_event("r-" + tag, "gpt-5.4", 1000, 0, 10)),
                  self.headers_for(tag))

    def usage(self, ex):
        tag = self.tag_of(ex)
        with self.lock:
            self.polls.append(tag)
            answer = self.poll_answers.get(tag)
        if answer is not None:
            return ex.json(*answer)
        primary, secondary = self.used[tag]
        ex.json(200, {"plan_type": "plus", "rate_limit": {
            "allowed": tag not in self.limited, "limit_reached": tag in self.limited,
            "primary_window": {"used_percent": primary, "limit_window_seconds": 18000,
                               "reset_at": self.resets[tag][0]},
            "secondary_window": {"used_percent": secondary, "limit_window_seconds": 604800,
                                 "reset_at": self.resets[tag][1]}}})

    def served_tags(self):
        with self.lock:
            return [tag for tag, _, _ in self.served]


@pytest.fixture
def accounts(fake):
    return FakeAccounts(fake)


@pytest.fixture
def auth_files(tmp_path):
    paths = {}
    for tag in TAGS:
        directory = tmp_path / ("codex-" + tag)
        directory.mkdir()
        paths[tag] = directory / "auth.json"
        write_auth(paths[tag], account_id="acct-" + tag, refresh="rt_" + tag)
    return paths


@pytest.fixture
def make_pool(make_proxy, auth_files, tmp_path):
    """make_pool(kind, strategy=..., **credential options) -> Proxy over accounts a, b, c."""
    def make(kind="balancer", strategy="least_used", poll_interval="1h", members=TAGS, usages=False,
             extra=(), users=None, **account_options):
        credentials = []
        for tag in TAGS:
            entry = {"tag": tag, "credential_path": str(auth_files[tag])}
            if usages:
                entry["usages_path"] = str(tmp_path / ("usage-%s.json" % tag))
            entry.update(account_options.get(tag, {}))
            credentials.append(entry)
        pool = {"tag": "pool", "type": kind, "credentials": list(members), "poll_interval": poll_interval}
        if kind == "balancer":
            pool["strategy"] = strategy
        credentials.append(pool)
        credentials.extend(extra)
        users = users or [{"name": "alice", "token": "tok-alice", "credential": "pool"},
                          {"name": "bob", "token": "tok-bob", "credential": "pool"}]
        proxy = make_proxy(credentials=credentials, users=users, credential_path=None)
        if poll_interval == "1h":
            # Not a test of polling: each account's first poll would still come at the
            # first housekeeping tick, half a second in, and FakeAccounts answers it from
            # its own tables (plan "plus", quota back), undoing a plan or a cooldown the
            # test set. A test that ran past that moment would see the poll's state.
            for account in proxy.server.accounts.values():
                account.next_poll_at = time.time() + 3600
        return proxy
    return make


def ask(proxy, session=None, token="tok-alice", body=None):
    headers = {"session-id": session} if session else {}
    return proxy.request("POST", "/v1/responses", body or dict(CODEX, model="gpt-5.4"), headers=headers, token=token)


# == Config ====================================================================

class TestPoolConfig:
    def base(self, **extra):
        data = {"credentials": [{"tag": "a", "credential_path": "/tmp/a.json"},
                                {"tag": "b", "credential_path": "/tmp/b.json"},
                                {"tag": "p", "type": "balancer", "credentials": ["a", "b"]}],
                "users": [{"name": "u", "token": "t", "credential": "p"}]}
        data.update(extra)
        return data

    def test_sing_box_114_shape_loads(self):
        config = ocm.config_from_dict(self.base())
        assert [c.tag for c in config.credentials] == ["a", "b", "p"]
        pool = config.credentials[2]
        assert pool.type == "balancer" and pool.strategy == "least_used" and pool.members == ["a", "b"]
        assert pool.poll_interval == 60.0

    def test_listable_members_and_durations(self):
        config = ocm.config_from_dict({"credentials": [
            {"tag": "a", "credential_path": "/tmp/a.json", "reserve_5h": 20, "reserve_weekly": 10},
            {"tag": "f", "type": "fallback", "credentials": "a", "poll_interval": "30s"}],
            "users": [{"name": "u", "token": "t", "credential": "f"}]})
        assert config.credentials[1].members == ["a"] and config.credentials[1].poll_interval == 30
        assert (config.credentials[0].reserve_5h, config.credentials[0].reserve_weekly) == (20, 10)

    @pytest.mark.parametrize("change, needle", [
        (lambda d: d["credentials"][2].update(credentials=["a", "zz"]), "unknown tag 'zz'"),
        (lambda d: d["credentials"].append({"tag": "q", "type": "balancer", "credentials": ["p"]}),
         "a balancer draws from accounts only"),
        (lambda d: d["credentials"].extend([{"tag": "f", "type": "fallback", "credentials": ["g"]},
                                            {"tag": "g", "type": "fallback", "credentials": ["f"]}]),
         "cycle"),
        (lambda d: d["credentials"][0].update(reserve_5h=0), "outside 1 to 99"),
        (lambda d: d["credentials"][0].update(reserve_weekly=100), "outside 1 to 99"),
        (lambda d: d["credentials"][2].update(strategy="fastest"), "is not a strategy"),
        (lambda d: d["credentials"][0].update(type="external"), "not supported"),
        (lambda d: d["credentials"][1].update(credential_path="/tmp/a.json"), "each account needs its own"),
        (lambda d: d["credentials"][1].update(tag="a"), "duplicate tag"),
        (lambda d: d["users"][0].pop("credential"), "users[0].credential: required"),
        (lambda d: d["users"][0].update(credential="nope"), "unknown tag 'nope'"),
        (lambda d: d.update(credential_path="/tmp/x.json"), "credential_path: with a credentials list"),
        (lambda d: d.update(usages_path="/tmp/x.json"), "usages_path: with a credentials list"),
        (lambda d: d.update(detour="socks5://127.0.0.1:1"), "detour: with a credentials list"),
        (lambda d: d["credentials"][2].update(credentials=[]), "needs credentials"),
    ])
    def test_misconfigurations_exit_2_with_a_clear_message(self, change, needle):
        data = self.base()
        change(data)
        with pytest.raises(ocm.ConfigError) as info:
            ocm.config_from_dict(data)
        assert needle in str(info.value)

    def test_credential_on_a_user_needs_a_credentials_list(self):
        with pytest.raises(ocm.ConfigError, match="no credentials list"):
            ocm.config_from_dict({"users": [{"name": "u", "token": "t", "credential": "a"}]})


# == Selection =================================================================

class TestSelection:
    def test_least_used_spreads_equals(self, make_pool, accounts):
        proxy = make_pool()
        for _ in range(6):
            ask(proxy)
        assert sorted(accounts.served_tags()) == ["a", "a", "b", "b", "c", "c"]

    def test_least_used_takes_the_most_headroom(self, make_pool, accounts):
        accounts.used.update(a=(80.0, 10.0), b=(20.0, 10.0), c=(50.0, 10.0))
        proxy = make_pool()
        for _ in range(3):  # learn each account's use from its own answers
            for tag in TAGS:
                proxy.server.accounts[tag].observe_headers(
                    ocm.Headers(list(accounts.headers_for(tag).items())), success=True)
        for _ in range(4):
            assert ask(proxy)[0] == 200
        assert accounts.served_tags() == ["b"] * 4
        accounts.used["b"] = (90.0, 10.0)
        ask(proxy)  # b's answer reports 90%: now c has the most headroom
        ask(proxy)
        assert accounts.served_tags()[-1] == "c"

    def test_least_used_weighs_pro_accounts_more(self, make_pool, accounts, auth_files):
        proxy = make_pool()
        accounts.used.update(a=(50.0, 10.0), b=(20.0, 10.0), c=(20.0, 10.0))
        for tag in TAGS:
            proxy.server.accounts[tag].observe_headers(ocm.Headers(list(accounts.headers_for(tag).items())),
                                                       success=True)
        proxy.server.accounts["a"].plan = "pro"  # 50% left of a Pro is more than 80% of a Plus
        proxy.server.accounts["b"].plan = proxy.server.accounts["c"].plan = "plus"
        ask(proxy)
        assert accounts.served_tags() == ["a"]

    def test_round_robin_takes_turns(self, make_pool, accounts):
        proxy = make_pool(strategy="round_robin")
        for _ in range(6):
            assert ask(proxy)[0] == 200
        served = accounts.served_tags()
        assert sorted(served) == ["a", "a", "b", "b", "c", "c"]
        assert served[:3] != served[3:] or len(set(served[:3])) == 3

    def test_random_uses_every_account(self, make_pool, accounts):
        proxy = make_pool(strategy="random")
        for _ in range(40):
            ask(proxy)
        assert set(accounts.served_tags()) == set(TAGS)

    def test_fallback_takes_the_first_usable_in_order(self, make_pool, accounts):
        proxy = make_pool(kind="fallback", members=("c", "a", "b"))
        ask(proxy)
        ask(proxy)
        assert accounts.served_tags() == ["c", "c"]
        proxy.server.accounts["c"].mark_rate_limited(time.time() + 600)
        ask(proxy)
        assert accounts.served_tags()[-1] == "a"

    def test_fallback_over_a_balancer(self, make_pool, accounts):
        proxy = make_pool(kind="fallback", members=("inner", "c"),
                          extra=[{"tag": "inner", "type": "balancer", "strategy": "round_robin",
                                  "credentials": ["a", "b"]}])
        for _ in range(4):
            ask(proxy)
        assert sorted(accounts.served_tags()) == ["a", "a", "b", "b"]
        for tag in ("a", "b"):
            proxy.server.accounts[tag].mark_rate_limited(time.time() + 600)
        ask(proxy)
        assert accounts.served_tags()[-1] == "c"

    @pytest.mark.parametrize("used, usable", [((69.0, 10.0), True), ((70.0, 10.0), False),
                                              ((10.0, 89.0), True), ((10.0, 90.0), False)])
    def test_reserves(self, make_pool, accounts, used, usable):
        proxy = make_pool(kind="fallback", members=("a", "b"), a={"reserve_5h": 30, "reserve_weekly": 10})
        accounts.used["a"] = used
        proxy.server.accounts["a"].observe_headers(ocm.Headers(list(accounts.headers_for("a").items())), True)
        assert proxy.server.accounts["a"].is_usable() == usable
        ask(proxy)
        assert accounts.served_tags() == ["a" if usable else "b"]
        assert proxy.server.accounts["a"].state() == ("usable" if usable else "reserve_reached")

    def test_a_finished_window_counts_as_unused(self, make_pool, accounts):
        proxy = make_pool(kind="fallback", members=("a", "b"))
        account = proxy.server.accounts["a"]
        account.windows["short"] = ocm.Window(100.0, 300, time.time() - 1)  # reset a second ago
        assert account.is_usable()


# == Stickiness ================================================================

class TestStickiness:
    def test_a_session_stays_on_its_account_while_usable(self, make_pool, accounts):
        proxy = make_pool(strategy="round_robin")
        for turn in range(3):
            for session in ("s1", "s2", "s3"):
                ask(proxy, session=session)
        by_session = {}
        for tag, session, _ in accounts.served:
            by_session.setdefault(session, set()).add(tag)
        assert all(len(tags) == 1 for tags in by_session.values())
        assert {next(iter(t)) for t in by_session.values()} == set(TAGS)  # spread over accounts

    def test_the_session_moves_only_when_its_account_stops_being_usable(self, make_pool, accounts):
        proxy = make_pool(strategy="round_robin")
        ask(proxy, session="s1")
        first = accounts.served_tags()[-1]
        proxy.server.accounts[first].mark_rate_limited(time.time() + 600)
        ask(proxy, session="s1")
        second = accounts.served_tags()[-1]
        assert second != first
        proxy.server.accounts[first].cooldown_until = 0  # first is usable again: the session stays put
        ask(proxy, session="s1")
        assert accounts.served_tags()[-1] == second

    def test_older_session_id_header_and_prompt_cache_key(self, make_pool, accounts):
        proxy = make_pool(strategy="round_robin")
        for _ in range(3):
            proxy.request("POST", "/v1/responses", {"model": "m"}, headers={"session_id": "old-style"})
        for _ in range(3):
            ask(proxy, body={"model": "m", "input": [{"text": "x" * 20000}], "prompt_cache_key": "thread-9"})
        served = accounts.served_tags()
        assert len(set(served[:3])) == 1 and len(set(served[3:])) == 1

    def test_a_websocket_is_pinned_for_its_life(self, make_pool, accounts, fake):
        from test_websocket import WSUpstream
        ws = WSUpstream(fake)
        proxy = make_pool(strategy="round_robin")
        client = WSClient(proxy.port)
        for _ in range(4):
            client.send_json({"type": "response.create", "model": "m"})
            client.events_until_completed()
        client.send(0x8, close_body(1000))
        client.frame()
        assert ws.connections == 1 and len(ws.handshakes) == 1
        pinned = ws.handshakes[0].header("ChatGPT-Account-Id")
        assert pinned in ("acct-a", "acct-b", "acct-c")
        client2 = WSClient(proxy.port, headers={"session-id": "ws-session"})
        client2.close()
        WSClient(proxy.port, headers={"session-id": "ws-session"}).close()
        assert ws.handshakes[1].header("ChatGPT-Account-Id") == ws.handshakes[2].header("ChatGPT-Account-Id")


    def test_a_user_past_their_share_on_every_account_hears_about_the_share(self, make_pool, accounts, fake):
        """Over HTTP and over a WebSocket alike, not "every account is exhausted"."""
        from test_websocket import WSUpstream
        ws = WSUpstream(fake)
        proxy = make_pool(users=[{"name": "alice", "token": "tok-alice", "credential": "pool", "share_5h": 20},
                                 {"name": "bob", "token": "tok-bob", "credential": "pool"}])
        for account in proxy.server.accounts.values():
            account.shares["short"]["alice"] = 25.0
        status, _, body = ask(proxy)
        assert status == 429 and error_of(body)[1].startswith("you have used your share (20%) of the 5-hour window")
        client = WSClient(proxy.port)
        assert client.status == 429 and b"you have used your share (20%)" in client.sock.recv(4096)
        client.close()
        assert ws.connections == 0 and ask(proxy, token="tok-bob")[0] == 200


# == 429 failover ==============================================================

class TestFailover:
    def test_429_is_replayed_on_the_next_account_with_the_same_body(self, make_pool, accounts):
        proxy = make_pool(kind="fallback", members=TAGS)
        accounts.limited["a"] = int(time.time()) + 900
        body = dict(CODEX, model="gpt-5.4", input=[{"role": "user", "content": "hello " * 1000}])
        status, headers, answer = ask(proxy, body=body)
        assert status == 200 and b"from b" in answer
        assert json.loads(accounts.refused[0][1]) == body == json.loads(accounts.served[0][2])
        account = proxy.server.accounts["a"]
        assert account.state() == "cooling_down" and account.cooldown_until == accounts.limited["a"]
        ask(proxy)  # a rests: straight to b
        assert len(accounts.refused) == 1

    def test_every_account_resting_gives_a_truthful_429(self, make_pool, accounts):
        proxy = make_pool(strategy="round_robin")
        now = int(time.time())
        accounts.limited.update(a=now + 3000, b=now + 1200, c=now + 7200)
        status, headers, body = ask(proxy)
        assert status == 429
        error = json.loads(body)["error"]
        assert error["type"] == "usage_limit_reached" and error["resets_at"] == now + 1200
        assert 1100 < int(headers["retry-after"]) <= 1200
        assert len(accounts.refused) == 3  # each tried once
        status, _, body = ask(proxy)  # now answered without asking upstream at all
        assert status == 429 and len(accounts.refused) == 3
        assert json.loads(body)["error"]["resets_at"] == now + 1200

    def test_codex_sees_its_usage_limit_message_with_the_earliest_reset(self, make_pool, accounts):
        proxy = make_pool(kind="fallback", members=TAGS)
        for tag in TAGS:
            proxy.server.accounts[tag].mark_rate_limited(time.time() + {"a": 500, "b": 100, "c": 300}[tag])
        status, _, body = ask(proxy)
        assert status == 429 and abs(json.loads(body)["error"]["resets_at"] - (time.time() + 100)) < 3

    def test_websocket_handshake_429_fails_over(self, make_pool, accounts, fake):
        from test_websocket import WSUpstream
        ws = WSUpstream(fake)
        route = ws.route

        def refuse_a(ex):
            if ex.request.header("ChatGPT-Account-Id") == "acct-a":
                return ex.json(429, {"error": {"type": "usage_limit_reached", "resets_at": int(time.time()) + 60}})
            route(ex)

        fake.on("GET", "/backend-api/codex/responses", refuse_a)
        proxy = make_pool(kind="fallback", members=TAGS)
        client = WSClient(proxy.port)
        assert client.status == 101
        client.close()
        assert proxy.server.accounts["a"].state() == "cooling_down"

    def test_websocket_with_every_account_resting_gets_the_error_frame(self, make_pool, accounts, fake):
        proxy = make_pool(kind="fallback", members=TAGS)
        for tag in TAGS:
            proxy.server.accounts[tag].mark_rate_limited(time.time() + 300)
        client = WSClient(proxy.port)
        assert client.status == 101
        client.send_json({"type": "response.create", "model": "gpt-5.4", "input": []})
        event = json.loads(client.frame()[2])
        assert event["type"] == "error" and event["status"] == 429
        assert event["error"]["type"] == "usage_limit_reached" and event["error"]["resets_at"]

    def test_a_single_account_passes_429_through_unchanged(self, proxy, fake):
        fake.on("POST", "/backend-api/codex/responses", lambda ex: ex.json(429, {"error": {"x": 1}}))
        status, _, body = proxy.request("POST", "/v1/responses", {})
        status2, _, _ = proxy.request("POST", "/v1/responses", {})
        assert (status, status2) == (429, 429) and json.loads(body) == {"error": {"x": 1}}
        assert len(fake.api_requests()) == 2  # never refused without asking


# == Cooldown and polling ======================================================

class TestPolling:
    def test_cooldown_clears_early_when_a_poll_shows_quota_back(self, make_pool, accounts):
        proxy = make_pool(kind="fallback", members=TAGS, poll_interval="0.1s")
        account = proxy.server.accounts["a"]
        account.mark_rate_limited(time.time() + 3600)
        assert account.state() == "cooling_down"
        assert wait_for(lambda: account.state() == "usable", 3)
        assert "a" in accounts.polls

    def test_a_successful_answer_clears_the_cooldown(self, make_pool, accounts):
        proxy = make_pool(kind="fallback", members=("a", "b"))
        account = proxy.server.accounts["b"]
        account.mark_rate_limited(time.time() + 3600)
        account.observe_headers(ocm.Headers(list(accounts.headers_for("b").items())), success=True)
        assert account.state() == "usable"

    def test_poll_updates_quota_and_plan(self, make_pool, accounts):
        accounts.used["c"] = (42.0, 17.0)
        proxy = make_pool(poll_interval="0.1s")
        account = proxy.server.accounts["c"]
        assert wait_for(lambda: account.short.used_percent == 42.0, 3)
        assert account.long.used_percent == 17.0 and account.plan == "plus"
        assert account.short.window_minutes == 300

    def test_poll_backs_off_exponentially_and_429_means_later(self, make_pool, accounts):
        accounts.poll_answers["a"] = (500, {"error": "down"})
        accounts.poll_answers["b"] = (429, {"error": "slow down"})
        proxy = make_pool(poll_interval="0.05s")
        a, b = proxy.server.accounts["a"], proxy.server.accounts["b"]
        assert wait_for(lambda: a.poll_failures >= 3, 5)
        polled = [t for t in accounts.polls if t == "a"]
        # the poller counts a failure a moment before it sets the next poll's time
        assert wait_for(lambda: a.next_poll_at - time.time() > 0.05 * 2 ** (a.poll_failures - 1), 2)
        assert len(polled) < 10  # not every tick
        assert wait_for(lambda: b.poll_failures >= 1, 3)
        assert b.state() == "usable"  # a usage-endpoint 429 is not "exhausted"
        accounts.poll_answers.pop("a")
        assert wait_for(lambda: a.poll_failures == 0, 10)

    def test_only_pooled_accounts_are_polled(self, proxy, accounts):
        time.sleep(0.2)
        assert accounts.polls == [] and all(not a.poll_interval for a in proxy.server.accounts.values())


# == Status and headers ========================================================

class TestStatus:
    def test_status_needs_a_token_and_shows_the_pool(self, make_pool, accounts, auth_files):
        accounts.used.update(a=(30.0, 10.0), b=(50.0, 20.0), c=(70.0, 30.0))
        proxy = make_pool(strategy="round_robin")
        for _ in range(3):
            ask(proxy)
        proxy.server.accounts["c"].mark_rate_limited(time.time() + 600)
        assert proxy.request("GET", "/ocm/v1/status", token=None)[0] == 401
        status, headers, body = proxy.request("GET", "/ocm/v1/status")
        assert status == 200 and headers["content-type"] == "application/json"
        view = json.loads(body)
        assert view["pool"] == "pool" and view["type"] == "balancer" and view["user"] == "alice"
        assert view["five_hour"]["used_percent"] == 50.0 and view["weekly"]["used_percent"] == 20.0
        assert view["usable_accounts"] == 2
        states = {a["tag"]: a for a in view["accounts"]}
        assert states["c"]["state"] == "cooling_down" and states["c"]["usable_again_at"]
        assert states["a"]["five_hour"]["used_percent"] == 30.0 and states["a"]["plan"] == "pro"
        assert view["next_reset"] == states["c"]["usable_again_at"]
        text = body.decode()
        for path in auth_files.values():  # no token, refresh token, account id or file of any account
            tokens = read_json(path)["tokens"]
            for secret in (tokens["access_token"], tokens["refresh_token"], tokens["id_token"], "acct-"):
                assert secret not in text

    def test_status_of_a_single_account(self, proxy, fake):
        status, _, body = proxy.request("GET", "/ocm/v1/status")
        view = json.loads(body)
        assert status == 200 and view["type"] == "single" and view["accounts"][0]["tag"] == "default"

    def test_rate_limit_headers_show_the_pool(self, make_pool, accounts):
        accounts.used.update(a=(20.0, 10.0), b=(40.0, 20.0), c=(60.0, 60.0))
        proxy = make_pool(strategy="round_robin")
        for tag in TAGS:
            proxy.server.accounts[tag].observe_headers(ocm.Headers(list(accounts.headers_for(tag).items())), True)
        status, headers, _ = ask(proxy)
        assert headers["x-codex-primary-used-percent"] == "40"
        assert headers["x-codex-secondary-used-percent"] == "30"
        assert int(headers["x-codex-primary-reset-at"]) == min(r[0] for r in accounts.resets.values())

    def test_a_single_account_headers_pass_unchanged(self, proxy, fake):
        fake.on("POST", "/backend-api/codex/responses", lambda ex: ex.stream(
            sse(completed_event()), {"x-codex-primary-used-percent": "12.5"}))
        assert proxy.request("POST", "/v1/responses", CODEX)[1]["x-codex-primary-used-percent"] == "12.5"


# == Files and accounting ======================================================

class TestAccountFiles:
    def test_each_account_file_is_hot_reloaded(self, make_pool, accounts, auth_files):
        proxy = make_pool(kind="fallback", members=("a",))
        ask(proxy)
        fresh = new_access_token(account_id="acct-a")
        write_auth(auth_files["a"], access=fresh, account_id="acct-a")
        ask(proxy)
        assert accounts.fake.api_requests()[-1].header("Authorization") == "Bearer " + fresh

    def test_a_broken_account_file_leaves_the_others_serving(self, make_pool, accounts, auth_files):
        auth_files["a"].write_text("{broken")
        proxy = make_pool(kind="fallback", members=TAGS)
        for _ in range(3):
            assert ask(proxy)[0] == 200
        assert set(accounts.served_tags()) == {"b"}
        assert proxy.server.accounts["a"].state() == "unavailable"
        view = json.loads(proxy.request("GET", "/ocm/v1/status")[2])
        assert "not valid JSON" in [a for a in view["accounts"] if a["tag"] == "a"][0]["problem"]
        write_auth(auth_files["a"], account_id="acct-a")  # fixed: a is back
        ask(proxy)
        assert accounts.served_tags()[-1] == "a"

    def test_no_account_with_a_login_is_503(self, make_pool, accounts, auth_files):
        for path in auth_files.values():
            os.unlink(str(path))
        status, _, body = ask(make_pool())
        assert status == 503 and "no account" in error_of(body)[1]

    def test_each_account_refreshes_its_own_login_under_its_own_lock(self, make_pool, accounts, auth_files, fake):
        write_auth(auth_files["b"], account_id="acct-b", refresh="rt_b", expires_in=-10)
        fake.valid_refresh.add("rt_b")
        proxy = make_pool(kind="fallback", members=("b",))
        assert ask(proxy)[0] == 200
        assert [c["refresh_token"] for c in fake.token_calls] == ["rt_b"]
        assert read_json(auth_files["b"])["tokens"]["refresh_token"] != "rt_b"
        assert read_json(auth_files["a"])["tokens"]["refresh_token"] == "rt_a"  # untouched

    def test_usage_is_recorded_per_account_file_and_per_user(self, make_pool, accounts, tmp_path):
        proxy = make_pool(strategy="round_robin", usages=True)
        for i in range(6):
            ask(proxy, token="tok-alice" if i % 2 else "tok-bob")
        proxy.close()
        total = 0
        for tag in TAGS:
            data = read_json(tmp_path / ("usage-%s.json" % tag))
            combo = data["combinations"][0]
            total += combo["total"]["request_count"]
            assert set(combo["by_user"]) <= {"alice", "bob"}
        assert total == 6


# == The "done when" ===================================================

class TestManySessions:
    def test_sessions_spread_stick_and_survive_a_429_mid_run(self, make_pool, accounts):
        """Many sessions over three accounts: they spread, never move while
        their account is usable, and one account's 429 mid-run costs no client
        request. The status endpoint tells it as it is."""
        proxy = make_pool(strategy="least_used")
        results = []
        errors = []
        halfway = threading.Barrier(24, timeout=20)

        def session(name):
            for turn in range(4):
                if turn == 2:
                    if halfway.wait() == 0:  # every session has had two turns: now b hits its limit
                        accounts.limited["b"] = int(time.time()) + 1800
                    halfway.wait()
                status = ask(proxy, session=name)[0]
                (results if status == 200 else errors).append((name, turn, status))

        threads = [threading.Thread(target=session, args=("s%d" % i,)) for i in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == [] and len(results) == 24 * 4
        by_session = {}
        for tag, session_id, _ in accounts.served:
            by_session.setdefault(session_id, []).append(tag)
        assert len(set(accounts.served_tags())) == 3  # spread
        assert accounts.refused  # sessions on b met its 429, and none of their requests failed
        for session_id, tags in by_session.items():
            if "b" in tags:  # on b until b's 429, then on one other account for good
                first_elsewhere = next((i for i, t in enumerate(tags) if t != "b"), len(tags))
                assert set(tags[:first_elsewhere]) == {"b"} and len(set(tags[first_elsewhere:])) <= 1, tags
            else:
                assert len(set(tags)) == 1, tags  # its account stayed usable: it never moved
        view = json.loads(proxy.request("GET", "/ocm/v1/status")[2])
        states = {a["tag"]: a["state"] for a in view["accounts"]}
        assert states == {"a": "usable", "b": "cooling_down", "c": "usable"}
        assert view["usable_accounts"] == 2


# == The real Codex CLI through a pool =========================================

from test_ocm import codex_model, needs_codex, run_codex  # noqa: E402


@needs_codex
class TestRealCodexPool:
    def test_codex_sessions_spread_stick_and_survive_a_429(self, make_pool, accounts, fake, tmp_path):
        sessions = []

        def route(ex):
            tag = FakeAccounts.tag_of(ex)
            if tag in accounts.limited:
                return ex.json(429, {"error": {"type": "usage_limit_reached", "message": "limit",
                                               "resets_at": accounts.limited[tag]}})
            with accounts.lock:
                sessions.append((ex.request.header("session-id"), tag))
            codex_model(ex)

        fake.on("POST", "/backend-api/codex/responses", route)
        proxy = make_pool(strategy="round_robin")
        for run in range(6):
            if run == 3:
                accounts.limited["b"] = int(time.time()) + 3600
            out = run_codex(proxy.port, tmp_path / ("run%d" % run), "run the tool and report what it printed")
            assert out.returncode == 0, out.stderr[-2000:]
            assert "the tool printed 42" in out.stdout
        by_session = {}
        for session_id, tag in sessions:
            by_session.setdefault(session_id, []).append(tag)
        assert len(by_session) == 6 and all(len(t) == 2 and len(set(t)) == 1 for t in by_session.values())
        assert {t[0] for t in by_session.values()} == {"a", "b", "c"}
        assert all(t[0] != "b" for t in list(by_session.values())[3:])
