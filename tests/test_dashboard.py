"""The dashboard (issue 19): GET /ocm/ for the owner and for each person, its
JSON at /ocm/v1/dashboard, signing in, the history behind its charts, and a
real browser that signs in, looks and takes screenshots (skipped without
Chromium; `apt-get install chromium`)."""

import base64
import contextlib
import fcntl
import hashlib
import http.client
import http.server
import json
import logging
import os
import random
import re
import select
import shutil
import signal
import tempfile
import threading
import time

import pytest

import ocm
from test_ocm import USERS, wait_for
from test_policy import priced_stream, user
from test_websocket import WSClient, WSUpstream

ADMIN = "admin-token-for-tests-0123456789"
WINDOW_HEADERS = {"x-codex-primary-used-percent": "37", "x-codex-primary-window-minutes": "300",
                  "x-codex-secondary-used-percent": "12", "x-codex-secondary-window-minutes": "10080"}


def get(proxy, path="/ocm/v1/dashboard", token=None, host=None, cookie=None, headers=None):
    """(status, headers, body): a dashboard request, with a bearer token or a cookie."""
    hdrs = dict(headers or {})
    if host:
        hdrs["Host"] = host
    if cookie:
        hdrs["Cookie"] = "ocm_session=" + cookie
    return proxy.request("GET", path, headers=hdrs, token=token)


def document(proxy, **kwargs):
    status, _, body = get(proxy, **kwargs)
    assert status == 200, body
    return json.loads(body)


def sign_in(proxy, token, host="box.lan:8080", headers=None):
    """POST the sign-in form as a browser on another machine would (through a
    name, not loopback): (status, headers, body)."""
    conn = proxy.conn()
    try:
        hdrs = {"Host": host, "Content-Type": "application/x-www-form-urlencoded",
                "Origin": "http://" + host}
        hdrs.update(headers or {})
        conn.request("POST", "/ocm/sign-in", body="user=ocm&token=" + token, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def session_of(headers):
    match = re.match(r"ocm_session=([^;]+);", headers["set-cookie"])
    assert match, headers["set-cookie"]
    return match.group(1)


def metrics(proxy):
    """/metrics as {(name, sorted labels): value}."""
    _, _, body = proxy.request("GET", "/metrics", token=None)
    out = {}
    for line in body.decode().splitlines():
        match = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if match and not line.startswith("#"):
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', match.group(2) or "")))
            out[(match.group(1), labels)] = float(match.group(3))
    return out


def record(name="alice", model="gpt-5.3-codex", status=200, input_tokens=1000, cached=200, output=100,
           cost=0.01, error="", path="/v1/responses"):
    r = ocm.RequestRecord("POST", path, time.monotonic())
    r.user_name, r.model, r.status, r.error = name, model, status, error
    r.input_tokens, r.cached_tokens, r.output_tokens, r.cost = input_tokens, cached, output, cost
    return r


NOW = 1796385600.0  # 2026-12-04 12:00 UTC, a Friday


# == Config ======================================================================

class TestConfig:
    def test_admin_token_plain_or_digest(self):
        assert ocm.config_from_dict({"admin_token": ADMIN}).admin_token == ADMIN
        digest = "sha256:" + "ab" * 32
        assert ocm.config_from_dict({"admin_token": digest}).admin_token == digest

    @pytest.mark.parametrize("token, words", [
        ("sha256:abc", "admin_token: sha256: must be followed by 64 hex digits"),
        ("short", "admin_token: only 5 characters, easy to guess"),
        ("has a space in it, sadly", "admin_token: must not contain spaces"),
        ("replace-with-a-long-random-token", "admin_token: still a placeholder"),
        (42, "admin_token: expected a string, got a number"),
    ])
    def test_a_bad_admin_token_is_refused_by_name(self, token, words):
        with pytest.raises(ocm.ConfigError) as info:
            ocm.config_from_dict({"admin_token": token})
        assert str(info.value).startswith(words)

    @pytest.mark.parametrize("form", ["plain", "digest"])
    def test_the_admin_token_is_nobody_elses(self, form):
        token = "tok-alice-0123456789"
        admin = token if form == "plain" else "sha256:" + ocm.token_digest(token).hex()
        with pytest.raises(ocm.ConfigError) as info:
            ocm.config_from_dict({"admin_token": admin, "users": [{"name": "alice", "token": token}]})
        assert "the same token is given to a user" in str(info.value)

    def test_history_lives_beside_the_budgets_or_usage_file(self, tmp_path):
        usage = str(tmp_path / "var" / "usage.json")
        assert ocm.history_path(ocm.config_from_dict({"usages_path": usage})) == \
            str(tmp_path / "var" / "ocm-history.json")
        assert ocm.history_path(ocm.config_from_dict({}, source=str(tmp_path / "etc" / "c.json"))) == \
            str(tmp_path / "etc" / "ocm-history.json")
        assert ocm.history_path(ocm.config_from_dict({})) == ""  # no config file: memory only


# == History ======================================================================

class TestHistory:
    def history(self, path=""):
        return ocm.History(path, ocm.PeriodClock("UTC"))

    def test_strangers_wrong_tokens_count_but_do_not_push_people_out(self):
        h = self.history()
        h.record(record(), NOW, 1.0)
        for _ in range(ocm.RECENT_REQUESTS + 10):
            h.record(record("", status=401, input_tokens=0, output=0, cached=0, cost=0,
                            error="invalid api key"), NOW, 0.0)
        assert [entry[1] for entry in h.recent()] == ["alice"]
        assert h.refusals("") == [] and h.refusals_since("", NOW) == ocm.RECENT_REQUESTS + 10

    def test_a_clock_once_set_ahead_does_not_stop_the_charts(self):
        """Held: a box that booted a month ahead, then was set right by NTP,
        drew nothing hourly for that month (every new hour was pruned as old)."""
        h = self.history()
        h.record(record(), NOW + 30 * 86400, 1.0)
        for i in range(5):
            h.record(record(), NOW + i * 600, 1.0)
        assert sum(h.hourly(NOW + 3000)[1]["alice"][0]) == 5
        assert "2027-01-03" not in h._days and h.daily(NOW)[1]

    def test_a_response_counts_in_its_hour_day_and_periods(self):
        h = self.history()
        h.record(record(cost=0.5), NOW, 2.0)
        h.record(record("bob", "gpt-5.4", cost=0.25), NOW + 60, 1.0)
        start, hourly = h.hourly(NOW + 120)
        assert start == NOW - 47 * 3600
        assert hourly["alice"][0][-1] == 1 and hourly["alice"][1][-1] == 0.5
        assert sum(hourly["bob"][0]) == 1
        days, daily = h.daily(NOW)
        assert days[-1] == "2026-12-04" and len(days) == 7 and days[0] == "2026-11-28"
        assert daily == {"gpt-5.3-codex": [0] * 6 + [0.5], "gpt-5.4": [0] * 6 + [0.25]}
        assert h.daily(NOW, only="bob")[1] == {"gpt-5.4": [0] * 6 + [0.25]}
        assert h.period("alice", "day", NOW) == (1, 0.5, 1100)
        assert h.period("alice", "month", NOW) == (1, 0.5, 1100)
        assert h.period("alice", "day", NOW + 86400) == (0, 0.0, 0)  # the next day starts afresh
        assert [e[1] for e in h.recent()] == ["bob", "alice"] and h.recent("alice")[0][9] == 0.5
        assert h.last_seen("bob") == NOW + 60

    def test_a_refusal_counts_with_its_message_and_nothing_else_does(self):
        h = self.history()
        h.record(record(status=429, input_tokens=0, cached=0, output=0, cost=0,
                        error="your daily budget of $2.00 is used up"), NOW, 0.01)
        h.record(record(status=502, input_tokens=0, cached=0, output=0, cost=0, error="upstream failed"),
                 NOW, 0.01)
        h.record(record(status=200, input_tokens=0, cached=0, output=0, cost=0), NOW, 0.01)  # warm-up
        assert h.refusals("alice") == [(NOW, 429, "your daily budget of $2.00 is used up")]
        assert h.refusals_since("alice", NOW - 86400) == 1
        assert h.hourly(NOW)[1] == {} and h.period("alice", "day", NOW) == (0, 0.0, 0)
        assert [e[3] for e in h.recent()] == [200, 502, 429]

    def test_every_table_is_bounded(self):
        h = self.history()
        for day in reversed(range(10)):  # in time order, as requests settle
            h.record(record(), NOW - day * 86400, 1.0)
        for hour in reversed(range(60)):
            h.record(record(), NOW - hour * 3600, 1.0)
        assert len(h._hours) == ocm.HISTORY_HOURS and len(h._days) == ocm.HISTORY_DAYS
        for i in range(ocm.HISTORY_MAX_NAMES + 5):
            h.record(record("user%d" % i, "model-%d" % i), NOW, 1.0)
        for i in range(ocm.HISTORY_MAX_MODELS + 5):
            h.record(record("alice", "model-%d" % i), NOW, 1.0)
        for i in range(10):
            h.record(record(status=403, error="no " * 200), NOW, 0.1)
        hour = h._hours[int(NOW // 3600)]  # alice and 199 others; the last 6 fold into one
        assert len(hour) == ocm.HISTORY_MAX_NAMES + 1 and hour[ocm.OTHERS][0] == 6
        assert len(h._days["2026-12-04"]["alice"]) == ocm.HISTORY_MAX_MODELS + 1
        assert len(h.recent()) == ocm.RECENT_REQUESTS
        assert len(h.refusals("alice")) == ocm.REFUSALS_KEPT
        assert all(len(m) <= ocm.HISTORY_MAX_TEXT for _, _, m in h.refusals("alice"))
        assert len(json.dumps(h.to_json(NOW))) < 2 << 20  # the file, too

    def test_saved_atomically_and_read_back(self, tmp_path):
        path = str(tmp_path / "ocm-history.json")
        h = self.history(path)
        h.record(record(cost=0.5), NOW - 3600, 2.0)
        h.record(record(status=429, input_tokens=0, output=0, cached=0, cost=0, error="no"), NOW, 0.0)
        h.save_if_dirty(NOW)
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        again = self.history(path)
        again.load(NOW)
        assert again.hourly(NOW) == h.hourly(NOW) and again.daily(NOW) == h.daily(NOW)
        assert again.period("alice", "week", NOW) == (1, 0.5, 1100)
        assert again.recent() == h.recent() and again.refusals("alice") == h.refusals("alice")
        assert again.last_seen("alice") == NOW
        again.load(NOW + 49 * 3600)  # two days later, the old hours are gone
        assert again.hourly(NOW + 49 * 3600)[1] == {}

    def test_a_damaged_file_is_moved_aside(self, tmp_path, caplog):
        path = tmp_path / "ocm-history.json"
        for damaged in (b"{not json", json.dumps({"version": 1, "hours": {"1": {"a": [1, "x"]}}}).encode()):
            path.write_bytes(damaged)
            h = self.history(str(path))
            with caplog.at_level(logging.ERROR, logger="ocm"):
                h.load(NOW)
            assert not path.exists() and h.recent() == []
            assert "dashboard history" in caplog.text and "moved it to" in caplog.text
            for aside in tmp_path.glob("ocm-history.json.corrupt-*"):
                aside.unlink()


# == Access ======================================================================

@pytest.fixture
def dash(make_proxy):
    """A proxy with an admin token; alice and bob as in test_ocm."""
    return make_proxy(admin_token=ADMIN)


class TestAccess:
    def test_the_page_is_a_constant_with_a_strict_policy(self, dash):
        status, headers, body = get(dash, "/ocm/")
        assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
        csp = headers["content-security-policy"]
        for part in ("default-src 'none'", "connect-src 'self'", "form-action 'self'",
                     "frame-ancestors 'none'", "base-uri 'none'"):
            assert part in csp
        script = re.search(rb"<script>(.*)</script>", body, re.S).group(1)
        style = re.search(rb"<style>(.*)</style>", body, re.S).group(1)
        for text, kind in ((script, "script-src"), (style, "style-src")):
            digest = base64.b64encode(hashlib.sha256(text).digest()).decode()
            assert "%s 'sha256-%s'" % (kind, digest) in csp
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "same-origin" and headers["cache-control"] == "no-store"
        assert b"alice" not in body and b"innerHTML" not in body  # data only ever comes as JSON
        assert get(dash, "/ocm")[2] == body
        assert get(dash, "/ocm/", token="tok-alice")[2] == body

    def test_the_box_itself_is_the_owner(self, dash):
        doc = document(dash)
        assert doc["viewer"] == {"role": "owner", "user": None, "via": "loopback"}
        assert [p["name"] for p in doc["people"]] == ["alice", "bob"] and "server" in doc
        assert document(dash, host="localhost:8080")["viewer"]["role"] == "owner"

    @pytest.mark.parametrize("headers", [
        {"Host": "evil.example:8080"},      # a web page whose name resolves to 127.0.0.1
        {"Host": "127.0.0.1", "X-Forwarded-For": "203.0.113.9"},  # a reverse proxy on the box
        {"Host": "127.0.0.1", "Forwarded": "for=203.0.113.9"},
    ])
    def test_loopback_through_a_name_or_a_proxy_is_nobody(self, dash, headers):
        status, answer, body = get(dash, headers=headers)
        assert status == 401 and answer["www-authenticate"] == 'Bearer realm="ocm"'
        assert json.loads(body)["error"]["type"] == "authentication_error"

    def test_bearer_tokens_for_scripts(self, dash):
        assert document(dash, token=ADMIN, host="box.lan")["viewer"] == {
            "role": "owner", "user": None, "via": "token"}
        assert document(dash, token="tok-bob", host="box.lan")["viewer"] == {
            "role": "person", "user": "bob", "via": "token"}

    def test_a_wrong_token_gets_401_with_no_hint_of_who_exists(self, dash):
        answers = set()
        for token in ("tok-alicf", "tok-zed", ADMIN[:-1], "x" * 40):
            status, _, body = get(dash, token=token)  # also from loopback: a wrong token is wrong
            assert status == 401
            answers.add(body)
        assert len(answers) == 1 and b"alice" not in answers.pop()

    def test_sign_in_sets_a_strict_session_cookie_and_the_token_goes_nowhere(self, dash, caplog):
        with caplog.at_level(logging.DEBUG):
            status, headers, body = sign_in(dash, "tok-alice")
            assert status == 303 and headers["location"] == "/ocm/" and body == b""
            cookie = headers["set-cookie"]
            for part in ("HttpOnly", "SameSite=Strict", "Path=/ocm", "Max-Age=43200"):
                assert part in cookie
            assert "Secure" not in cookie  # plain HTTP here; see the TLS test
            session = session_of(headers)
            assert len(session) >= 40 and "tok-alice" not in cookie
            doc = document(dash, cookie=session, host="box.lan:8080")
            assert doc["viewer"] == {"role": "person", "user": "alice", "via": "session"}
            status, headers, body = sign_in(dash, "tok-wrong-guess")
        assert status == 401 and b'data-signin="failed"' in body and "set-cookie" not in headers
        assert "tok-alice" not in caplog.text and "tok-wrong-guess" not in caplog.text
        assert "alice signed in from 127.0.0.1" in caplog.text

    def test_the_owner_signs_in_with_the_admin_token(self, dash):
        _, headers, _ = sign_in(dash, ADMIN)
        doc = document(dash, cookie=session_of(headers), host="box.lan")
        assert doc["viewer"] == {"role": "owner", "user": None, "via": "session"}

    def test_secure_cookie_under_tls(self, make_proxy):
        from test_tls_proxy import client_context, tls_config
        proxy = make_proxy(tls=tls_config())
        conn = http.client.HTTPSConnection("localhost", proxy.port, context=client_context(), timeout=10)
        try:
            conn.request("POST", "/ocm/sign-in", body="token=tok-alice",
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
            resp = conn.getresponse()
            resp.read()
        finally:
            conn.close()
        assert resp.status == 303 and resp.getheader("set-cookie").endswith("; Secure")

    @pytest.mark.parametrize("headers", [{"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                                         {"Origin": "http://evil.example"},
                                         {"Origin": "null"}])  # a page hiding where it is
    def test_a_form_posted_from_another_site_is_refused(self, dash, headers):
        status, answer, _ = sign_in(dash, "tok-alice", headers=headers)
        assert status == 403 and "set-cookie" not in answer

    def test_sign_out_ends_the_session(self, dash):
        session = session_of(sign_in(dash, "tok-alice")[1])
        conn = dash.conn()
        conn.request("POST", "/ocm/sign-out", headers={"Host": "box.lan", "Cookie": "ocm_session=" + session,
                                                      "Sec-Fetch-Site": "same-origin"})
        resp = conn.getresponse()
        resp.read()
        conn.close()
        assert resp.status == 303 and "Max-Age=0" in resp.getheader("set-cookie")
        assert get(dash, cookie=session, host="box.lan")[0] == 401

    def test_methods(self, dash):
        assert dash.request("POST", "/ocm/v1/dashboard", token=None)[0] == 405
        assert dash.request("GET", "/ocm/sign-in", token=None)[0] == 405
        status, headers, body = dash.request("HEAD", "/ocm/", token=None)
        assert status == 200 and body == b"" and int(headers["content-length"]) > 1000

    def test_guessing_is_stopped_and_cannot_tell_a_hit(self, dash, caplog):
        for i in range(ocm.SIGN_IN_FAILURES_PER_ADDRESS - 1):
            assert sign_in(dash, "guess-%d" % i)[0] == 401
        with caplog.at_level(logging.WARNING, logger="ocm"):
            assert get(dash, token="guess-last", host="box.lan")[0] == 401
        assert "too many wrong tokens from 127.0.0.1" in caplog.text
        status, headers, body = sign_in(dash, "tok-alice")  # the right one, too late
        assert status == 429 and int(headers["retry-after"]) > 500 and b'data-signin="busy"' in body
        assert get(dash, token="tok-alice", host="box.lan")[0] == 429
        assert document(dash)["viewer"]["via"] == "loopback"  # the box itself presents no token

    def test_guessing_limits_per_address_and_in_all(self):
        sessions = ocm.DashboardSessions()
        for i in range(ocm.SIGN_IN_FAILURES_PER_ADDRESS):
            assert sessions.blocked_for("10.0.0.1", NOW) == 0
            sessions.failed("10.0.0.1", NOW)
        assert sessions.blocked_for("10.0.0.1", NOW + 1) == ocm.SIGN_IN_WINDOW - 1
        assert sessions.blocked_for("10.0.0.2", NOW + 1) == 0
        assert sessions.blocked_for("10.0.0.1", NOW + ocm.SIGN_IN_WINDOW) == 0  # the window ends
        for i in range(ocm.SIGN_IN_FAILURES_IN_ALL):
            sessions.failed("10.1.%d.%d" % (i // 250, i % 250), NOW + 700)
        # many addresses at once: each that guessed is refused, and one more guess
        # from a new address is its last
        assert sessions.blocked_for("10.1.0.7", NOW + 701) > 0
        sessions.failed("10.9.9.9", NOW + 701)
        assert sessions.blocked_for("10.9.9.9", NOW + 701) > 0
        # an address that sent no wrong token (the owner, at home) may still sign in
        assert sessions.blocked_for("10.0.0.2", NOW + 701) == 0
        # an IPv6 /64 counts as one address
        for i in range(ocm.SIGN_IN_FAILURES_PER_ADDRESS):
            sessions.failed("2001:db8:0:1::%x" % (i + 1), NOW + 2000)
        assert sessions.blocked_for("2001:db8:0:1::ffff", NOW + 2001) > 0
        assert sessions.blocked_for("2001:db8:0:2::1", NOW + 2001) == 0

    @pytest.mark.parametrize("path", ["/ocm/", "/ocm/v1/dashboard"])
    def test_a_body_sent_with_a_page_request_is_never_read(self, dash, path):
        """Held: OCM read up to a mebibyte of it per connection, for anyone."""
        import socket
        with socket.create_connection(("127.0.0.1", dash.port), timeout=5) as s:
            s.sendall(b"GET %s HTTP/1.1\r\nHost: box.lan\r\nContent-Length: 1048576\r\n\r\n"
                      % path.encode() + b"x" * 100)  # the rest never comes
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += s.recv(65536)
        head = answer.split(b"\r\n\r\n")[0].lower()
        assert head.split(b" ")[1] in (b"200", b"401") and b"connection: close" in head

    def test_behind_a_tls_proxy_the_cookie_is_secure(self, dash):
        assert not sign_in(dash, "tok-alice")[1]["set-cookie"].endswith("; Secure")
        cookie = sign_in(dash, "tok-alice", headers={"X-Forwarded-Proto": "https"})[1]["set-cookie"]
        assert cookie.endswith("; Secure")

    def test_a_person_whose_access_expired_sees_nothing(self, make_proxy, fake):
        proxy = make_proxy(admin_token=ADMIN, users=[user("alice", "tok-alice-0123456789",
                                                          expires_at="2020-01-01T00:00:00Z")])
        status, _, body = get(proxy, token="tok-alice-0123456789", host="box.lan")
        assert status == 403 and "your access expired" in json.loads(body)["error"]["message"]
        for _ in range(ocm.SIGN_IN_FAILURES_PER_ADDRESS + 1):  # refused, and not taken for guessing
            status, answer, _ = sign_in(proxy, "tok-alice-0123456789")
            assert status == 401 and "set-cookie" not in answer
        assert sign_in(proxy, ADMIN)[0] == 303

    def test_strangers_guessing_from_many_addresses_cannot_lock_the_owner_out(self, make_proxy, fake):
        proxy = make_proxy(admin_token=ADMIN, users=[user("alice", "tok-alice-0123456789")])
        for i in range(ocm.SIGN_IN_FAILURES_IN_ALL):  # 10 wrong tokens from each of 30 addresses
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5,
                                              source_address=("127.0.0.%d" % (2 + i // 10), 0))
            conn.request("POST", "/ocm/sign-in", body="token=wrong-%d" % i,
                         headers={"Host": "box.lan", "Content-Type": "application/x-www-form-urlencoded"})
            assert conn.getresponse().status == 401
            conn.close()
        assert sign_in(proxy, ADMIN)[0] == 303  # held: 429 for everyone, for ten minutes
        assert get(proxy, token=ADMIN, host="box.lan")[0] == 200
        assert sign_in(proxy, "tok-alice-0123456789")[0] == 303
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5, source_address=("127.0.0.2", 0))
        conn.request("POST", "/ocm/sign-in", body="token=" + ADMIN,
                     headers={"Host": "box.lan", "Content-Type": "application/x-www-form-urlencoded"})
        assert conn.getresponse().status == 429  # a guessing address learns nothing, right or wrong
        conn.close()

    def test_a_person_signing_in_again_and_again_ends_only_their_own_sessions(self, dash):
        owner = session_of(sign_in(dash, ADMIN)[1])
        for _ in range(ocm.MAX_DASHBOARD_SESSIONS):  # held: the owner was signed out
            bob = session_of(sign_in(dash, "tok-bob")[1])
        assert get(dash, cookie=owner, host="box.lan", token=None)[0] == 200
        assert get(dash, cookie=bob, host="box.lan", token=None)[0] == 200

    def test_sessions_expire_and_are_bounded(self):
        sessions = ocm.DashboardSessions(lifetime=60)
        alice = ocm.User("alice", "tok-alice")
        first = sessions.open(alice, b"", NOW)
        assert sessions.find(first, NOW + 59) == (alice, b"") and sessions.find(first, NOW + 60) is None
        owner = sessions.open(None, b"x", NOW)
        ids = [sessions.open(alice, b"", NOW) for _ in range(ocm.MAX_DASHBOARD_SESSIONS + 1)]
        # signing in again and again ends only alice's own oldest sessions
        assert sessions.count() == ocm.SESSIONS_PER_PERSON + 1 and sessions.find(owner, NOW)
        assert sessions.find(ids[0], NOW) is None and sessions.find(ids[-1], NOW)
        people = [ocm.User("p%d" % i, "tok-p%d" % i) for i in range(ocm.MAX_DASHBOARD_SESSIONS + 1)]
        ids = [sessions.open(person, b"", NOW + 1) for person in people]
        assert sessions.count() == ocm.MAX_DASHBOARD_SESSIONS and sessions.find(owner, NOW) is None

    def test_a_reload_ends_the_sessions_of_people_and_tokens_gone(self, dash, caplog):
        alice = session_of(sign_in(dash, "tok-alice")[1])
        bob = session_of(sign_in(dash, "tok-bob")[1])
        owner = session_of(sign_in(dash, ADMIN)[1])
        config = dash.server.config
        new = ocm.config_from_dict({
            "listen": "127.0.0.1", "listen_port": 0, "credential_path": config.credential_path,
            "users": [USERS[0], {"name": "bob", "token": "tok-bob-new-0123456789"}],
            "admin_token": "another-admin-token-0123456789",
            "upstream": {"chatgpt_url": config.upstream.chatgpt_url, "token_url": config.upstream.token_url}})
        with caplog.at_level(logging.INFO, logger="ocm"):
            dash.server.reload(new)
        assert "ended 2 dashboard sessions" in caplog.text
        assert document(dash, cookie=alice, host="b")["viewer"]["user"] == "alice"
        assert get(dash, cookie=bob, host="b")[0] == 401 and get(dash, cookie=owner, host="b")[0] == 401

    def test_a_session_also_ends_when_checked_after_a_change(self, dash):
        session = session_of(sign_in(dash, "tok-bob")[1])
        dash.server.state.users = ocm.UserTable([ocm.User("alice", "tok-alice")])  # as a reload would
        assert get(dash, cookie=session, host="box.lan")[0] == 401
        assert dash.server.dashboard_sessions.count() == 0


# == What each one sees ==============================================================

class TestViews:
    def test_a_person_sees_only_their_own(self, make_proxy, fake, auth_path, tmp_path):
        other = tmp_path / "other" / "auth.json"
        other.parent.mkdir()
        other.write_bytes(auth_path.read_bytes())
        fake.on("POST", "/backend-api/codex/responses", priced_stream(40000, headers=WINDOW_HEADERS))
        proxy = make_proxy(credential_path=None, admin_token=ADMIN, credentials=[
            {"tag": "main", "credential_path": str(auth_path), "usages_path": str(tmp_path / "u1.json")},
            {"tag": "spare", "credential_path": str(other), "usages_path": str(tmp_path / "u2.json")}],
            users=[user(credential="main", budgets=[{"period": "day", "usd": 5}], share_5h=50),
                   user("bob-the-other", "tok-bob", credential="spare")])
        for token in ("tok-alice", "tok-bob", "tok-bob", "tok-nobody"):
            proxy.request("POST", "/v1/responses", {"model": "gpt-5.4", "stream": True}, token=token)
        # a refusal goes into the history just after its 401 went out
        assert wait_for(lambda: document(proxy)["without_valid_token"]["refusals_last_24h"] == 1)
        doc = document(proxy, token="tok-alice", host="box.lan")
        text = json.dumps(doc)
        assert "bob" not in text and "spare" not in text and "u2.json" not in text
        assert set(doc) == {"time", "version", "viewer", "accounts", "people", "charts", "recent"}
        assert [a["account"] for a in doc["accounts"]] == ["main"]
        assert "in_flight" not in doc["accounts"][0]  # the account's traffic is others' figures too
        assert [w["name"] for w in doc["accounts"][0]["windows"]] == ["5-hour", "weekly"]
        (me,) = doc["people"]
        assert me["name"] == "alice" and me["periods"][0]["budgets"][0]["spent"] == 0.1
        assert me["shares"][0]["cap"] == 50 and me["shares"][0]["account"] == "main"
        assert [p["name"] for p in doc["charts"]["hours"]["people"]] == ["alice"]
        assert [r["user"] for r in doc["recent"]] == ["alice"]
        owner = document(proxy)
        assert [p["name"] for p in owner["people"]] == ["alice", "bob-the-other"]
        assert owner["without_valid_token"]["refusals_last_24h"] == 1
        assert [a["account"] for a in owner["accounts"]] == ["main", "spare"]

    def test_accounts_in_plain_words(self, proxy):
        account = proxy.server.accounts["default"]
        now = time.time()
        account.observe_headers({"x-codex-primary-used-percent": "100",
                                 "x-codex-primary-window-minutes": "300",
                                 "x-codex-primary-reset-at": str(int(now + 600))}, True)
        (seen,) = document(proxy)["accounts"]
        assert seen["state"] == "exhausted" and seen["reason"] == "the 5-hour window is used up"
        assert seen["usable_again_at"] == int(now + 600) and seen["windows"][0]["resets_at"] == int(now + 600)
        account.reserve_weekly = 10
        account.observe_headers({"x-codex-primary-used-percent": "20",
                                 "x-codex-primary-window-minutes": "300",
                                 "x-codex-secondary-used-percent": "95",
                                 "x-codex-secondary-window-minutes": "10080"}, True)
        seen = document(proxy)["accounts"][0]
        assert seen["state_words"] == "held in reserve"
        assert seen["reason"] == "the weekly window is at 95%, into the 10% kept in reserve"
        account.mark_rate_limited(now + 300)
        assert document(proxy)["accounts"][0]["state_words"] == "cooling down"
        os.unlink(account.credential.path)
        seen = document(proxy)["accounts"][0]
        assert seen["state_words"] == "signed out" and "not found" in seen["reason"]
        assert "not found" not in json.dumps(document(proxy, token="tok-alice", host="b")["accounts"])

    def test_the_server_and_its_last_reload(self, make_proxy, tmp_path, monkeypatch):
        # reload_config also sets up the access log of a running OCM, which would
        # take its lines away from the other tests' caplog
        monkeypatch.setattr(ocm, "configure_access_log", lambda log_format: None)
        path = tmp_path / "config.json"
        proxy = make_proxy()
        config = {"listen": "127.0.0.1", "listen_port": 0, "users": USERS,
                  "credential_path": proxy.server.config.credential_path}
        proxy.server.state.config.source = str(path)
        path.write_text("{broken")
        ocm.reload_config(proxy.server)
        server = document(proxy)["server"]
        assert server["last_reload"]["ok"] is False and "not valid" in server["last_reload"]["message"]
        path.write_text(json.dumps(config))
        ocm.reload_config(proxy.server)
        server = document(proxy)["server"]
        assert server["last_reload"] == {"at": pytest.approx(time.time(), abs=5), "ok": True,
                                         "message": "2 users, 1 account"}
        assert server["version"] == ocm.__version__ and server["listen"] == [proxy.server.url]
        assert server["config"] == str(path) and server["tls"] is False and server["uptime_s"] >= 0

    def test_a_websocket_turn_and_its_refusal_are_recorded(self, make_proxy, fake):
        WSUpstream(fake)
        proxy = make_proxy(users=[user(models=["gpt-5-mini"])])
        client = WSClient(proxy.port)
        client.send_json({"type": "response.create", "model": "gpt-5.4"})
        assert json.loads(client.frame()[2])["status"] == 403
        client.send_json({"type": "response.create", "model": "gpt-5-mini"})
        client.events_until_completed()
        client.close()
        assert wait_for(lambda: len(document(proxy)["recent"]) >= 2)
        doc = document(proxy)
        turns = [r for r in doc["recent"] if r["method"] == "WS"]
        assert [r["status"] for r in turns] == [200, 403]
        (alice,) = doc["people"]
        assert alice["refusals"]["recent"][0]["message"].startswith("model 'gpt-5.4' is not allowed")

    def test_open_access_has_one_row_for_everyone(self, make_proxy, fake):
        fake.on("POST", "/backend-api/codex/responses", priced_stream(40000))
        proxy = make_proxy(users=[])
        proxy.request("POST", "/v1/responses", {"model": "gpt-5.4", "stream": True}, token=None)
        doc = document(proxy)
        assert doc["open_access"] is True and doc["without_valid_token"]["refusals_last_24h"] == 0
        (everyone,) = doc["people"]
        assert everyone["name"] == "" and everyone["periods"][0]["requests"] == 1
        assert doc["recent"][0]["user"] is None

    def test_the_dashboard_itself_is_not_history(self, dash):
        for _ in range(3):
            document(dash)
        assert document(dash)["recent"] == []


# == The figures agree with /metrics and ocm.py usage =====================================

class TestFiguresAgree:
    def test_dashboard_metrics_and_usage_report_agree(self, make_proxy, fake, tmp_path, capsys):
        costs = iter([40000, 120000, 8000, 64000, 40000])
        fake.on("POST", "/backend-api/codex/responses",
                lambda ex: priced_stream(next(costs), headers=WINDOW_HEADERS)(ex))
        usages = tmp_path / "usage.json"
        proxy = make_proxy(usages_path=str(usages), timezone="UTC", admin_token=ADMIN,
                           users=[user(budgets=[{"period": "day", "usd": 50},
                                                {"period": "month", "tokens": 10 ** 7}]),
                                  user("bob", "tok-bob")])
        for token in ("tok-alice", "tok-bob", "tok-alice", "tok-bob", "tok-alice"):
            status, _, _ = proxy.request("POST", "/v1/responses", {"model": "gpt-5.4", "stream": True},
                                         token=token)
            assert status == 200
        doc = document(proxy)
        seen = metrics(proxy)
        config = tmp_path / "config.json"
        config.write_text(json.dumps({"listen": "127.0.0.1", "listen_port": proxy.port, "users": USERS,
                                      "usages_path": str(usages)}))
        assert ocm.run_usage(["--json", str(config)]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["live"] is True
        for person in doc["people"]:
            name = person["name"]
            today = person["periods"][0]
            labels = (("model", "gpt-5.4"), ("user", name))
            assert today["requests"] == seen[("ocm_responses_total", labels)]
            assert today["cost_usd"] == pytest.approx(seen[("ocm_cost_usd_total", labels)])
            tokens = sum(seen[("ocm_tokens_total", (("kind", k),) + labels)] for k in ("input", "output"))
            assert today["tokens"] == tokens
            assert person["all_time"]["requests"] == report["users"][name]["request_count"]
            assert person["all_time"]["cost_usd"] == report["users"][name]["cost_usd"]
            assert person["all_time"]["input_tokens"] == report["users"][name]["input_tokens"]
            hours = [p for p in doc["charts"]["hours"]["people"] if p["name"] == name][0]
            assert sum(hours["requests"]) == today["requests"]
            assert sum(hours["cost_usd"]) == pytest.approx(today["cost_usd"])
        alice = doc["people"][0]
        for period, unit in (("day", "usd"), ("month", "tokens")):
            budget = [b for p in alice["periods"] if p["period"] == period for b in p["budgets"]][0]
            labels = (("period", period), ("unit", unit), ("user", "alice"))
            assert budget["spent"] == pytest.approx(seen[("ocm_budget_spent", labels)])
            assert budget["limit"] == seen[("ocm_budget_limit", labels)]
        days = doc["charts"]["days"]["models"]
        assert days[0]["model"] == "gpt-5.4"
        assert sum(days[0]["cost_usd"]) == pytest.approx(sum(
            v for (n, labels), v in seen.items() if n == "ocm_cost_usd_total"))
        (account,) = doc["accounts"]
        for window, label in ((account["windows"][0], "5h"), (account["windows"][1], "weekly")):
            key = ("ocm_account_used_percent", (("account", "default"), ("window", label)))
            assert window["used_percent"] == seen[key]

    def test_history_survives_a_restart(self, make_proxy, fake, tmp_path):
        fake.on("POST", "/backend-api/codex/responses", priced_stream(40000))
        settings = dict(usages_path=str(tmp_path / "usage.json"), timezone="UTC")
        first = make_proxy(**settings)
        first.request("POST", "/v1/responses", {"model": "gpt-5.4", "stream": True})
        before = document(first)
        first.close()
        assert (tmp_path / "ocm-history.json").exists()
        after = document(make_proxy(**settings))
        assert after["recent"] == before["recent"] and len(after["recent"]) == 1
        assert after["people"][0]["periods"] == before["people"][0]["periods"]
        assert after["people"][0]["periods"][0]["cost_usd"] == 0.1
        assert after["charts"]["days"] == before["charts"]["days"]
        assert sum(after["charts"]["hours"]["people"][0]["requests"]) == 1


# == A real browser ===================================================================

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)


class Chromium:
    """Headless Chromium driven over --remote-debugging-pipe: the DevTools
    protocol as JSON messages separated by NUL bytes on file descriptors 3
    and 4, so neither a WebSocket nor a port is needed."""

    def __init__(self, binary):
        self.profile = tempfile.mkdtemp(prefix="ocm-chromium-")
        to_browser, self.out = os.pipe()
        self.inp, from_browser = os.pipe()
        # above 4, so that placing them at 3 and 4 in the child cannot overwrite one another
        child = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_browser, from_browser)]
        os.close(to_browser)
        os.close(from_browser)
        args = [binary, "--headless", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
                "--no-proxy-server", "--disable-extensions", "--disable-background-networking",
                "--remote-debugging-pipe", "--user-data-dir=" + self.profile,
                "--host-resolver-rules=MAP *.test 127.0.0.1"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.append("--no-sandbox")  # Chromium's sandbox refuses to run as root
        self.pid = os.posix_spawn(binary, args + ["about:blank"], dict(os.environ), file_actions=[
            (os.POSIX_SPAWN_DUP2, child[0], 3), (os.POSIX_SPAWN_DUP2, child[1], 4),
            (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
            (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)])
        for fd in child:
            os.close(fd)
        self.buffer = b""
        self.last_id = 0
        self.events = []

    def send(self, method, params=None, session=None, timeout=15):
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self.buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.inp], [], [], left)[0]:
                    raise TimeoutError("Chromium did not answer " + method)
                chunk = os.read(self.inp, 1 << 20)
                if not chunk:
                    raise EOFError("Chromium exited")
                self.buffer += chunk
            text, _, self.buffer = self.buffer.partition(b"\0")
            reply = json.loads(text)
            if reply.get("id") == self.last_id:
                if "error" in reply:
                    raise RuntimeError("%s: %s" % (method, reply["error"]))
                return reply.get("result", {})
            self.events.append(reply)

    def close(self):
        with contextlib.suppress(Exception):
            self.send("Browser.close", timeout=3)
        deadline = time.monotonic() + 5
        while not os.waitpid(self.pid, os.WNOHANG)[0]:
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                break
            time.sleep(0.05)
        os.close(self.out)
        os.close(self.inp)
        shutil.rmtree(self.profile, ignore_errors=True)


class Tab:
    """A page in a browser context of its own (its own cookies) at a size."""

    def __init__(self, browser, width, height, mobile=False):
        self.browser = browser
        context = browser.send("Target.createBrowserContext")["browserContextId"]
        target = browser.send("Target.createTarget", {"url": "about:blank", "browserContextId": context})
        self.session = browser.send("Target.attachToTarget", {"targetId": target["targetId"],
                                                              "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(domain + ".enable")
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                         "deviceScaleFactor": 1, "mobile": mobile})

    def send(self, method, params=None):
        return self.browser.send(method, params, self.session)

    def js(self, expression):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def wait(self, expression, timeout=10):
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(RuntimeError):
                value = self.js(expression)
                if value:
                    return value
            if time.monotonic() > deadline:
                raise AssertionError("the page never showed %s; it says: %s" % (
                    expression, self.js("document.body ? document.body.innerText.slice(0, 500) : ''")))
            time.sleep(0.05)

    def open(self, url):
        self.send("Page.navigate", {"url": url})

    def submit(self, token):
        """Type a token into the sign-in form and send it, as a person would."""
        self.wait("document.body && document.body.dataset.view === 'signin'")
        self.js("document.getElementById('token').value = %s;"
                "document.querySelector('#signin form').requestSubmit()" % json.dumps(token))

    def sign_in(self, token):
        self.submit(token)
        return self.wait("document.body.dataset.view !== 'signin' && document.body.dataset.view")

    def screenshot(self, path):
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        with open(path, "wb") as fh:
            fh.write(base64.b64decode(data))

    def console(self):
        return [e["params"]["entry"]["text"] for e in self.browser.events
                if e.get("sessionId") == self.session and e.get("method") == "Log.entryAdded"] + [
            json.dumps(e["params"])[:300] for e in self.browser.events
            if e.get("sessionId") == self.session and e.get("method") == "Runtime.exceptionThrown"]


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install chromium): the browser test is skipped")
    chromium = Chromium(CHROMIUM)
    yield chromium
    chromium.close()


MARKUP_NAME = '<img src=x onerror="window.pwned=1">Mallory<script>window.pwned=2</script>'
MARKUP_MODEL = '<svg onload="window.pwned=3"><b>gpt-evil</b></svg>'


def seed_history(server, people, now, rng):
    """A week of plausible use (people: name -> (models, how busy)), so the
    charts have something to show; budgets get the same spending through
    their file, as if they had been charged all along."""
    for hours_ago in range(7 * 24, 0, -1):
        moment = now - hours_ago * 3600
        busy = 1.0 if 8 <= time.localtime(moment).tm_hour <= 22 else 0.1
        for name, (models, weight) in people.items():
            for _ in range(int(rng.random() * 6 * weight * busy)):
                r = record(name, rng.choice(models), input_tokens=rng.randint(8000, 90000),
                           output=rng.randint(200, 4000))
                r.cached_tokens = int(r.input_tokens * 0.7)
                r.cost = ocm.raw_cost(r.input_tokens, r.output_tokens, r.cached_tokens, r.model, "", 272000)
                server.history.record(r, moment + rng.random() * 3000, rng.uniform(2, 40))
    ledger = server.ledger
    spent = {}
    for name in people:
        for period in ("day", "week", "month"):
            requests, usd, tokens = server.history.period(name, period, now)
            key = ledger.clock.period(period, now)[0]
            spent.setdefault(name, {})[period] = {key: {"usd": usd, "tokens": tokens, "requests": requests}}
    with open(ledger.path, "w") as fh:
        json.dump({"timezone": ledger.clock.name, "users": spent}, fh)
    ledger.load()


def open_page(browser, proxy, width, height, token):
    """A tab of its own (own cookies) that opens the dashboard through a name,
    where the box's loopback grant does not apply, and signs in with ``token``."""
    tab = Tab(browser, width, height, mobile=width < 600)
    tab.open("http://box.test:%d/ocm/" % proxy.port)
    tab.submit(token)
    return tab


def assert_nothing_blocked(tabs):
    for tab in tabs:
        assert [m for m in tab.console() if "Content Security Policy" in m or "Uncaught" in m] == []


class TestBrowser:
    def test_markup_in_names_and_models_stays_text(self, browser, make_proxy, fake, tmp_path):
        fake.on("POST", "/backend-api/codex/responses", priced_stream(40000, headers=WINDOW_HEADERS))
        proxy = make_proxy(admin_token=ADMIN, users=[user(), user(MARKUP_NAME, "tok-mallory-0123456789")],
                           budgets_path=str(tmp_path / "b.json"))
        seed_history(proxy.server, {MARKUP_NAME: ([MARKUP_MODEL], 1.0), "alice": (["gpt-5.4"], 1.0)},
                     time.time(), random.Random(19))
        for token in ("tok-alice", "tok-mallory-0123456789"):
            proxy.request("POST", "/v1/responses", {"model": MARKUP_MODEL, "stream": True}, token=token)

        owner = open_page(browser, proxy, 1280, 900, ADMIN)
        owner.wait("document.querySelectorAll('#people .card').length === 2 && "
                   "document.querySelectorAll('#days-cost rect').length > 0")
        names = owner.js("Array.from(document.querySelectorAll('#people .title')).map(e => e.textContent)")
        assert names == ["alice", MARKUP_NAME]
        text = owner.js("document.body.innerText")
        assert MARKUP_MODEL in text and text.count(MARKUP_NAME) >= 2  # a card, the legend, the table
        assert owner.js("window.pwned === undefined && document.scripts.length === 1")
        assert owner.js("document.querySelectorAll('img, b, [onload], [onerror]').length") == 0
        owner.screenshot(os.path.join(str(tmp_path), "markup.png"))

        person = open_page(browser, proxy, 390, 844, "tok-mallory-0123456789")
        person.wait("document.body.dataset.view === 'person' && "
                    "document.querySelectorAll('#days-cost rect').length > 0")
        text = person.js("document.body.innerText")
        assert MARKUP_NAME in text and MARKUP_MODEL in text and "alice" not in text
        assert person.js("window.pwned === undefined && document.querySelectorAll('img, b').length === 0")

        wrong = open_page(browser, proxy, 390, 844, "tok-wrong-0123456789")
        assert wrong.wait("document.getElementById('signin-problem').textContent") == \
            "That token is not valid."
        assert_nothing_blocked([owner, person, wrong])

    def test_on_the_box_the_owner_needs_no_token_and_can_look_as_a_person(self, browser, dash):
        tab = Tab(browser, 1280, 900)
        tab.open("http://127.0.0.1:%d/ocm/" % dash.port)
        tab.wait("document.body.dataset.view === 'owner'")
        assert tab.js("document.getElementById('who').textContent") == "owner, on the box"
        tab.js("document.getElementById('signin-button').click()")
        tab.sign_in("tok-bob")
        tab.wait("document.body.dataset.view === 'person' && "
                 "document.getElementById('who').textContent === 'bob'")
        tab.js("document.querySelector('#signout button').click()")
        tab.wait("document.body.dataset.view === 'owner'")
        assert_nothing_blocked([tab])

    def test_a_page_on_another_site_cannot_sign_the_visitor_in_or_out(self, browser, make_proxy, fake):
        """A page elsewhere posts the sign-in form with its own token, hiding where it
        is (no-referrer: Origin "null"); over plain http Chromium sends no
        Sec-Fetch-Site. Held: the owner found themselves signed in as alice."""
        proxy = make_proxy(admin_token=ADMIN, users=[user("alice", "tok-alice-0123456789")])
        page = ('<!doctype html><meta name="referrer" content="no-referrer">'
                '<form id="f" method="post" action="http://box.test:%d/ocm/sign-in">'
                '<input name="token" value="tok-alice-0123456789"></form>'
                '<script>document.getElementById("f").submit()</script>' % proxy.port).encode()

        class Elsewhere(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

        elsewhere = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Elsewhere)
        threading.Thread(target=elsewhere.serve_forever, daemon=True).start()
        try:
            tab = Tab(browser, 1000, 800)
            tab.open("http://box.test:%d/ocm/" % proxy.port)  # the owner, signed in on the LAN
            assert tab.sign_in(ADMIN) == "owner"
            tab.open("http://elsewhere.test:%d/" % elsewhere.server_address[1])
            tab.wait("document.location.host === 'box.test:%d'" % proxy.port)  # the form went
            tab.open("http://box.test:%d/ocm/" % proxy.port)
            assert tab.wait("document.body.dataset.view !== 'signin' && document.body.dataset.view") == "owner"
        finally:
            elsewhere.shutdown()
            elsewhere.server_close()

    def test_what_each_sees_at_phone_and_desktop_widths(self, browser, make_proxy, fake, auth_path, tmp_path):
        """The owner and a person sign in through the form; each sees what is
        theirs; screenshots at 1280x900 and 390x844 (to $OCM_SCREENSHOTS when
        set: docs/dashboard.png is the owner's at desktop width)."""
        out = os.environ.get("OCM_SCREENSHOTS") or str(tmp_path)
        os.makedirs(out, exist_ok=True)
        spare = tmp_path / "spare" / "auth.json"
        spare.parent.mkdir()
        spare.write_bytes(auth_path.read_bytes())
        now = time.time()
        used = iter(range(21, 100, 4))  # each answer a little further into the 5-hour window

        def answer(ex):
            priced_stream(40000, headers=dict(
                WINDOW_HEADERS, **{"x-codex-primary-used-percent": str(next(used)),
                                   "x-codex-primary-reset-at": str(int(now + 7920)),
                                   "x-codex-secondary-reset-at": str(int(now + 4 * 86400 + 3600))}))(ex)

        fake.on("POST", "/backend-api/codex/responses", answer)
        family = {"credential": "family"}
        proxy = make_proxy(admin_token=ADMIN, credential_path=None, timezone="UTC", credentials=[
            {"tag": "pro-main", "credential_path": str(auth_path), "reserve_5h": 10},
            {"tag": "plus-spare", "credential_path": str(spare)},
            {"tag": "family", "type": "balancer", "credentials": ["pro-main", "plus-spare"],
             "poll_interval": "1h"}], budgets_path=str(tmp_path / "b.json"), users=[
            user(budgets=[{"period": "day", "usd": 10}, {"period": "month", "usd": 150}], share_5h=40,
                 **family),
            user("bob", "tok-bob", budgets=[{"period": "week", "usd": 40}], max_concurrent=2, **family),
            user("carol", "tok-carol-0123456789", **family),
            user("kid", "tok-kid-0123456789", credential="plus-spare", models=["gpt-5*-mini"],
                 budgets=[{"period": "day", "tokens": 2000000}])])
        accounts = proxy.server.accounts
        accounts["plus-spare"].plan = "plus"
        accounts["plus-spare"].observe_headers({
            "x-codex-primary-used-percent": "100", "x-codex-primary-window-minutes": "300",
            "x-codex-primary-reset-at": str(int(now + 2820)), "x-codex-secondary-used-percent": "72",
            "x-codex-secondary-window-minutes": "10080",
            "x-codex-secondary-reset-at": str(int(now + 2 * 86400))}, True)
        seed_history(proxy.server, {"alice": (["gpt-5.3-codex", "gpt-5.4"], 1.0),
                                    "bob": (["gpt-5.3-codex"], 0.7), "carol": (["gpt-5.4"], 0.4),
                                    "kid": (["gpt-5.1-codex-mini"], 0.5)}, now, random.Random(7))
        for token in ("tok-alice", "tok-alice", "tok-bob", "tok-alice", "tok-carol-0123456789",
                      "tok-kid-0123456789", "tok-nobody"):
            proxy.request("POST", "/v1/responses", {"model": "gpt-5.4", "stream": True}, token=token)
        # a refusal goes into the history just after its 401 went out
        assert wait_for(lambda: document(proxy)["without_valid_token"]["refusals_last_24h"] == 1)

        owner = open_page(browser, proxy, 1280, 900, ADMIN)
        owner.wait("document.querySelectorAll('#people .card').length === 4 && "
                   "document.querySelectorAll('#hours-requests rect').length > 20")
        text = owner.js("document.body.innerText")
        for seen in ("alice", "bob", "carol", "kid", "pro-main", "plus-spare", "exhausted", "5-hour",
                     "weekly", "$10.00", "kept in reserve", "Listening on",
                     "1 request without a valid token"):
            assert seen in text
        assert owner.js("document.querySelectorAll('#recent tbody tr').length") == 10
        owner.screenshot(os.path.join(out, "dashboard-owner-desktop.png"))
        owner.send("Emulation.setDeviceMetricsOverride", {"width": 390, "height": 844, "deviceScaleFactor": 1,
                                                          "mobile": True})
        owner.wait("document.querySelector('#hours-requests svg').getAttribute('width') < 390")
        assert owner.js("document.documentElement.scrollWidth") <= 390  # nothing wider than the phone
        owner.screenshot(os.path.join(out, "dashboard-owner-phone.png"))
        owner.js("document.querySelector('#signout button').click()")
        owner.wait("document.body.dataset.view === 'signin'")

        person = open_page(browser, proxy, 390, 844, "tok-bob")
        person.wait("document.body.dataset.view === 'person' && "
                    "document.querySelectorAll('#accounts .card').length === 2")
        text = person.js("document.body.innerText")
        assert "bob" in text and "$40.00" in text and "pro-main" in text
        for other in ("alice", "carol", "kid", "Listening on", "without a valid token"):
            assert other not in text
        assert person.js("document.documentElement.scrollWidth") <= 390
        person.screenshot(os.path.join(out, "dashboard-person-phone.png"))
        assert_nothing_blocked([owner, person])
        for name in ("dashboard-owner-desktop", "dashboard-owner-phone", "dashboard-person-phone"):
            assert os.path.getsize(os.path.join(out, name + ".png")) > 10000
