"""Tests for signing in on the box: `ocm.py login`, `logout` and `status`.

A fake authorization server (routes on test_ocm's FakeUpstream) plays the
issuer on loopback. Time is a parameter: polls sleep on a fake clock, so no
test waits for the real 5 s interval or 15 minutes.
"""

import base64
import hashlib
import io
import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

import ocm
from test_ocm import (OCM_PY, USERS, make_jwt, new_access_token, new_id_token, read_json,
                      write_auth)

UA = "ocm/" + ocm.__version__
AUTHORIZE_URL = r"http://127\.0\.0\.1:\d+/oauth/authorize\?\S+"


# == Helpers: a fake issuer, a fake clock, a scripted keyboard ===============

def s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class FakeIssuer:
    """auth.openai.com's sign-in routes, scripted on test_ocm's FakeUpstream.

    Device codes: ``pending`` lists the statuses of the polls before the code
    counts as entered (None: never). Browser: ``approve(url)`` does what the
    real issuer does when the user signs in and returns the callback address.
    The token endpoint checks the code, the PKCE verifier and redirect_uri.
    """

    def __init__(self, fake, account_id="acct-new", email="new@example.com", plan="plus"):
        self.fake = fake
        self.url = fake.url
        self.usercode_status = 200
        self.usercode_answer = {"device_auth_id": "dev-auth-1", "user_code": "ABCD-EFGH", "interval": "5"}
        self.pending = [403, 404]
        self.poll_answer = None          # (status, body) to answer every poll with instead
        self.device_verifier = "device-verifier-xyz"
        self.codes = {"dev-code-1": (s256(self.device_verifier), self.url + "/deviceauth/callback")}
        self.token_answer = None         # (status, body) instead of the real thing
        self.revoke_status = 200
        self.revoked = []
        self.exchanges = []
        self.polls = []
        self.id_token = make_jwt({"email": email, "https://api.openai.com/auth": {
            "chatgpt_account_id": account_id, "chatgpt_plan_type": plan}}) if account_id else \
            make_jwt({"email": email})
        self.access_token = new_access_token(account_id=account_id or "", plan=plan)
        self.refresh_token = "rt_login_1"
        fake.valid_refresh.add(self.refresh_token)
        fake.on("POST", "/api/accounts/deviceauth/usercode", self.usercode)
        fake.on("POST", "/api/accounts/deviceauth/token", self.device_token)
        fake.on("POST", "/oauth/token", self.token)
        fake.on("POST", "/oauth/revoke", self.revoke)

    @property
    def secrets(self):
        return [self.id_token, self.access_token, self.refresh_token, self.device_verifier, "rt_initial"]

    def usercode(self, ex):
        if self.usercode_status != 200:
            return ex.json(self.usercode_status, {"error": "not_found"})
        ex.json(200, self.usercode_answer)

    def device_token(self, ex):
        self.polls.append(ex.request)
        if self.poll_answer is not None:
            return ex.json(*self.poll_answer)
        if self.pending is None or self.pending:
            status = self.pending.pop(0) if self.pending else 403
            return ex.json(status, {"error": {"message": "authorization pending"}})
        ex.json(200, {"authorization_code": "dev-code-1", "code_challenge": s256(self.device_verifier),
                      "code_verifier": self.device_verifier})

    def token(self, ex):
        if "x-www-form-urlencoded" not in (ex.request.header("Content-Type") or ""):
            return self.fake.token_endpoint(ex)  # a running OCM's refresh
        form = dict(urllib.parse.parse_qsl(ex.request.body.decode()))
        self.exchanges.append((ex.request, form))
        if self.token_answer is not None:
            return ex.json(*self.token_answer)
        challenge, redirect_uri = self.codes.get(form.get("code"), (None, None))
        if (form.get("grant_type") != "authorization_code" or form.get("client_id") != ocm.OAUTH_CLIENT_ID
                or challenge is None or s256(form.get("code_verifier", "")) != challenge
                or form.get("redirect_uri") != redirect_uri):
            return ex.json(400, {"error": "invalid_grant", "error_description": "bad code exchange"})
        del self.codes[form["code"]]
        ex.json(200, {"id_token": self.id_token, "access_token": self.access_token,
                      "refresh_token": self.refresh_token})

    def revoke(self, ex):
        self.revoked.append(ex.request)
        ex.json(self.revoke_status, {} if self.revoke_status == 200 else {"error": "server_error"})

    def params_of(self, url):
        assert url.startswith(self.url + "/oauth/authorize?"), url
        return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))

    def approve(self, url):
        """The user signs in at ``url``: the address the browser is sent to."""
        p = self.params_of(url)
        assert p["response_type"] == "code" and p["client_id"] == ocm.OAUTH_CLIENT_ID
        assert p["code_challenge_method"] == "S256"
        code = "browser-code-%d" % (len(self.codes) + 1)
        self.codes[code] = (p["code_challenge"], p["redirect_uri"])
        return "%s?%s" % (p["redirect_uri"], urllib.parse.urlencode({"code": code, "state": p["state"]}))

    def refuse(self, url, error, description=""):
        p = self.params_of(url)
        query = {"error": error, "state": p["state"]}
        if description:
            query["error_description"] = description
        return "%s?%s" % (p["redirect_uri"], urllib.parse.urlencode(query))


class Clock:
    """Wall time that moves with real time plus every fake sleep."""

    def __init__(self, start=1795000000.0):
        self.start, self.began, self.slept, self.sleeps = start, time.monotonic(), 0.0, []

    def now(self):
        return self.start + (time.monotonic() - self.began) + self.slept

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.slept += seconds


class Screen(io.StringIO):
    """Captured output that a test (or a scripted user) can wait on."""

    def wait_for(self, pattern, timeout=5.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.getvalue())
            if match:
                return match
            time.sleep(0.01)
        raise AssertionError("never printed %r; printed:\n%s" % (pattern, self.getvalue()))


class Keyboard:
    """stdin: scripted lines (a callable is called when its line is read), then EOF."""

    def __init__(self, *lines, tty=True):
        self.lines, self.tty, self.reads = list(lines), tty, 0

    def readline(self):
        self.reads += 1
        if not self.lines:
            return ""
        line = self.lines.pop(0)
        return (line() if callable(line) else line) + "\n"

    def isatty(self):
        return self.tty


@pytest.fixture
def issuer(fake):
    return FakeIssuer(fake)


@pytest.fixture
def new_auth(tmp_path):
    """Where a first login goes: a directory that does not exist yet."""
    return tmp_path / "home" / ".codex" / "auth.json"


def write_config(tmp_path, fake, credential_path, **extra):
    path = tmp_path / "config.json"
    config = {"credential_path": str(credential_path), "users": USERS,
              "upstream": {"chatgpt_url": fake.chatgpt_url, "token_url": fake.token_url,
                           "issuer_url": fake.url}}
    config.update(extra)
    path.write_text(json.dumps(config))
    return path


class Session:
    """One `ocm.py login` run with a fake clock, a screen and a keyboard."""

    def __init__(self, tmp_path, fake, credential_path):
        self.config = write_config(tmp_path, fake, credential_path)
        self.clock = Clock()
        self.screen = Screen()

    def login(self, *args, stdin=None, ports=(), timeout=ocm.LOGIN_TIMEOUT):
        return ocm.run_login([str(self.config)] + list(args), stdin=Keyboard() if stdin is None else stdin,
                             out=self.screen, sleep=self.clock.sleep, now=self.clock.now, ports=ports,
                             timeout=timeout)

    def paste(self, transform=lambda address: address, issuer=None):
        """A keyboard line that waits for the authorize URL and pastes where the browser ends."""
        return lambda: transform(issuer.approve(self.screen.wait_for(AUTHORIZE_URL).group(0)))

    def in_thread(self, *args, **kwargs):
        result = {}
        thread = threading.Thread(target=lambda: result.setdefault("rc", self.login(*args, **kwargs)),
                                  daemon=True)
        thread.start()
        return thread, result


@pytest.fixture
def session(tmp_path, fake, new_auth):
    return Session(tmp_path, fake, new_auth)


def assert_no_secrets(text, issuer):
    for secret in issuer.secrets:
        assert secret not in text
        assert secret[:12] not in text


def http_get(url, timeout=5):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


# == TestIssuerConfig =======================================================

class TestIssuerConfig:
    def test_issuer_defaults_to_openai(self):
        config = ocm.config_from_dict({})
        assert config.upstream.issuer_url == "https://auth.openai.com"

    def test_issuer_is_configurable_without_trailing_slash(self):
        config = ocm.config_from_dict({"upstream": {"issuer_url": "http://127.0.0.1:9/auth/"}})
        assert config.upstream.issuer_url == "http://127.0.0.1:9/auth"

    @pytest.mark.parametrize("value", ["ftp://auth.example", "auth.openai.com", "https://a.example/?x=1", 5])
    def test_bad_issuer_is_refused_naming_the_key(self, value):
        with pytest.raises(ocm.ConfigError, match=r"upstream\.issuer_url"):
            ocm.config_from_dict({"upstream": {"issuer_url": value}})

    def test_issuer_in_a_config_file(self, tmp_path):
        path = tmp_path / "c.json"
        path.write_text(json.dumps({"upstream": {"issuer_url": "https://login.example"}}))
        assert ocm.load_config(str(path)).upstream.issuer_url == "https://login.example"


# == TestDeviceCode =========================================================

class TestDeviceCode:
    def test_device_code_signs_in_end_to_end(self, session, issuer, fake, new_auth, capsys):
        assert session.login() == 0
        out = session.screen.getvalue()
        assert issuer.url + "/codex/device" in out and "ABCD-EFGH" in out
        assert "phish" in out and "15 minutes" in out
        assert "new@example.com" in out and "plus" in out and "acct-new" in out
        assert "python3 ocm.py " + str(session.config) in out
        assert_no_secrets(out + capsys.readouterr().err, issuer)
        # usercode with the client id; polls without it; pending 403 and 404, then the code.
        calls = [(r.method, r.path) for r in fake.requests]
        assert calls == [("POST", "/api/accounts/deviceauth/usercode")] + \
            [("POST", "/api/accounts/deviceauth/token")] * 3 + [("POST", "/oauth/token")]
        assert fake.requests[0].json() == {"client_id": ocm.OAUTH_CLIENT_ID}
        assert [p.json() for p in issuer.polls] == [{"device_auth_id": "dev-auth-1", "user_code": "ABCD-EFGH"}] * 3
        request, form = issuer.exchanges[0]
        assert form == {"grant_type": "authorization_code", "client_id": ocm.OAUTH_CLIENT_ID,
                        "code": "dev-code-1", "redirect_uri": issuer.url + "/deviceauth/callback",
                        "code_verifier": issuer.device_verifier}
        assert all(r.header("User-Agent") == UA for r in fake.requests)
        assert session.clock.sleeps == [5.0, 5.0]  # first poll at once, then every interval
        assert read_json(new_auth)["tokens"]["refresh_token"] == issuer.refresh_token

    @pytest.mark.parametrize("interval, expected", [("12", 12.0), (12, 12.0), (" 7 ", 7.0), (7.5, 7.5)])
    def test_slow_interval_as_string_or_number_is_followed(self, session, issuer, interval, expected):
        issuer.usercode_answer["interval"] = interval
        assert session.login() == 0
        assert session.clock.sleeps == [expected, expected]

    @pytest.mark.parametrize("interval", ["0", 0, "1", None, "soon", True, "nan"])
    def test_never_polls_faster_than_every_five_seconds(self, session, issuer, interval):
        if interval is None:
            del issuer.usercode_answer["interval"]
        else:
            issuer.usercode_answer["interval"] = interval
        assert session.login() == 0
        assert session.clock.sleeps == [5.0, 5.0]

    def test_usercode_field_spelled_usercode_is_accepted(self, session, issuer, fake):
        issuer.usercode_answer = {"device_auth_id": "dev-auth-1", "usercode": "WXYZ-1234", "interval": "5"}
        assert session.login() == 0
        assert "WXYZ-1234" in session.screen.getvalue()
        assert issuer.polls[0].json()["user_code"] == "WXYZ-1234"

    def test_gives_up_after_fifteen_minutes(self, session, issuer, new_auth, capsys):
        issuer.pending = None  # nobody ever enters the code
        issuer.usercode_answer["interval"] = "60"
        assert session.login() == 1
        assert "not entered within 15 minutes" in capsys.readouterr().err
        assert sum(session.clock.sleeps) <= 15 * 60 and len(issuer.polls) == 15
        assert not new_auth.exists() and not issuer.exchanges

    def test_fatal_poll_status_stops_at_once(self, session, issuer, new_auth, capsys):
        issuer.poll_answer = (400, {"error": {"message": "device code was rejected"}})
        assert session.login() == 1
        err = capsys.readouterr().err
        assert "400" in err and "device code was rejected" in err
        assert len(issuer.polls) == 1 and session.clock.sleeps == [] and not new_auth.exists()

    def test_network_blip_while_polling_keeps_waiting(self, session, issuer, fake, monkeypatch):
        real, failed = ocm.call_issuer, []

        def flaky(open_url, url, body, content_type="application/json"):
            if url.endswith("/deviceauth/token") and not failed:
                failed.append(url)
                raise ocm.IssuerUnreachable("127.0.0.1 unreachable: connection reset")
            return real(open_url, url, body, content_type)
        monkeypatch.setattr(ocm, "call_issuer", flaky)
        assert session.login() == 0 and failed

    @pytest.mark.parametrize("answer, text", [
        ((400, {"error": "invalid_grant", "error_description": "code expired"}), "code expired"),
        ((400, {"error": {"message": "bad verifier", "code": "x"}}), "bad verifier"),
        ((401, {"error": {"code": "token_revoked"}}), "token_revoked"),
        ((403, {"error": "unauthorized_client"}), "unauthorized_client"),
        ((502, "<html>Bad   gateway</html>"), "<html>Bad gateway</html>"),
        ((200, {"access_token": "a", "refresh_token": "r"}), "without id_token"),
    ])
    def test_failed_exchange_says_why(self, session, issuer, new_auth, capsys, answer, text):
        issuer.token_answer = answer
        assert session.login() == 1
        assert text in capsys.readouterr().err and not new_auth.exists()

    def test_unreachable_issuer_is_a_clear_error(self, tmp_path, fake, new_auth, capsys):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # nothing listens here once closed
        config = write_config(tmp_path, fake, new_auth, upstream={"issuer_url": "http://127.0.0.1:%d" % port})
        assert ocm.run_login([str(config)], stdin=Keyboard(), out=Screen(), sleep=Clock().sleep) == 1
        assert "unreachable" in capsys.readouterr().err


# == TestPasteBack ==========================================================

class TestPasteBack:
    def test_404_from_usercode_falls_back_to_paste_back(self, session, issuer, fake, new_auth):
        issuer.usercode_status = 404
        assert session.login(stdin=Keyboard(session.paste(issuer=issuer))) == 0
        out = session.screen.getvalue()
        assert "not enabled" in out and "browser" in out
        assert not issuer.polls
        assert read_json(new_auth)["tokens"]["access_token"] == issuer.access_token
        request, form = issuer.exchanges[0]
        assert form["redirect_uri"] == "http://127.0.0.1:1455/auth/callback"

    def test_authorize_url_carries_pkce_state_and_codex_parameters(self, session, issuer):
        assert session.login("--paste", stdin=Keyboard(session.paste(issuer=issuer))) == 0
        url = session.screen.wait_for(AUTHORIZE_URL).group(0)
        assert "%20" in url and "+" not in url  # the scope's spaces as the Codex CLI sends them
        p = issuer.params_of(url)
        state, challenge = p.pop("state"), p.pop("code_challenge")
        assert p == {"response_type": "code", "client_id": ocm.OAUTH_CLIENT_ID,
                     "redirect_uri": "http://127.0.0.1:1455/auth/callback",
                     "scope": "openid profile email offline_access api.connectors.read api.connectors.invoke",
                     "code_challenge_method": "S256", "id_token_add_organizations": "true",
                     "codex_cli_simplified_flow": "true", "originator": "codex_cli_rs"}
        assert len(base64.urlsafe_b64decode(state + "==")) == 32
        verifier = issuer.exchanges[0][1]["code_verifier"]
        assert len(base64.urlsafe_b64decode(verifier + "==")) == 64 and "=" not in verifier
        assert s256(verifier) == challenge

    def test_pkce_and_state_are_new_each_time(self):
        assert ocm.new_pkce() != ocm.new_pkce()

    @pytest.mark.parametrize("form", ["url", "query", "query with ?", "path", "spaces"])
    def test_paste_of_a_url_or_a_bare_query(self, session, issuer, new_auth, form):
        transform = {
            "url": lambda a: a,
            "query": lambda a: a.split("?", 1)[1],
            "query with ?": lambda a: "?" + a.split("?", 1)[1],
            "path": lambda a: "/auth/callback?" + a.split("?", 1)[1],
            "spaces": lambda a: "   " + a + "  ",
        }[form]
        assert session.login("--paste", stdin=Keyboard(session.paste(transform, issuer))) == 0
        assert read_json(new_auth)["tokens"]["id_token"] == issuer.id_token

    def test_wrong_state_is_rejected_and_never_exchanged(self, session, issuer, new_auth, capsys):
        def wrong_state(address):
            return re.sub(r"state=[^&]+", "state=somebody-elses", address)
        assert session.login("--paste", stdin=Keyboard(session.paste(wrong_state, issuer))) == 1
        assert "state does not match" in session.screen.getvalue()
        assert "state does not match" in capsys.readouterr().err
        assert not issuer.exchanges and not new_auth.exists()

    def test_after_a_rejected_paste_the_right_one_still_works(self, session, issuer, new_auth):
        keyboard = Keyboard(session.paste(lambda a: a.split("&state=")[0], issuer), "",
                            session.paste(issuer=issuer))
        assert session.login("--paste", stdin=keyboard) == 0
        assert "it has no state" in session.screen.getvalue()
        assert len(issuer.exchanges) == 1 and new_auth.exists()

    @pytest.mark.parametrize("error, description, words", [
        ("missing_codex_entitlement", "", "Codex is not enabled for this workspace"),
        ("access_denied", "The user denied access", "cancelled, or access was denied"),
        ("server_error", "try later", "server_error: try later"),
    ])
    def test_error_callback_is_explained_in_plain_words(self, session, issuer, new_auth, capsys,
                                                        error, description, words):
        refuse = lambda: issuer.refuse(session.screen.wait_for(AUTHORIZE_URL).group(0),  # noqa: E731
                                       error, description)
        assert session.login("--paste", stdin=Keyboard(refuse)) == 1
        err = capsys.readouterr().err
        assert words in err and (description in err)
        assert not issuer.exchanges and not new_auth.exists()

    def test_nothing_pasted_ends_without_hanging(self, session, issuer, capsys):
        assert session.login("--paste", stdin=Keyboard()) == 1
        assert "no usable callback address was pasted" in capsys.readouterr().err

    def test_paste_wait_times_out(self, session, issuer, capsys):
        read, write = os.pipe()  # a terminal nobody types on
        with os.fdopen(read, "r") as stdin:
            try:
                assert session.login("--paste", stdin=stdin, timeout=0.05) == 1
            finally:
                os.close(write)  # EOF lets the reader thread end before stdin closes
        assert "no sign-in arrived" in capsys.readouterr().err


# == TestCallbackListener ===================================================

class TestCallbackListener:
    def test_default_ports_are_the_two_the_issuer_accepts(self):
        assert ocm.LOGIN_CALLBACK_PORTS == (1455, 1457)

    def run_until_url(self, session, issuer, ports):
        thread, result = session.in_thread("--paste", stdin=Keyboard(tty=False), ports=ports, timeout=10)
        url = session.screen.wait_for(AUTHORIZE_URL).group(0)
        return thread, result, url

    def test_browser_reaching_the_loopback_completes_the_login(self, session, issuer, new_auth):
        thread, result, url = self.run_until_url(session, issuer, (0,))
        redirect = issuer.params_of(url)["redirect_uri"]
        assert re.match(r"http://127\.0\.0\.1:\d+/auth/callback$", redirect)
        assert "ssh -L" in session.screen.getvalue()
        status, page = http_get(issuer.approve(url))
        thread.join(10)
        assert not thread.is_alive() and result["rc"] == 0
        assert status == 200 and "close this tab" in page
        assert issuer.exchanges[0][1]["redirect_uri"] == redirect
        assert read_json(new_auth)["tokens"]["refresh_token"] == issuer.refresh_token
        with pytest.raises(OSError):  # the listener is gone
            socket.create_connection(("127.0.0.1", int(redirect.split(":")[2].split("/")[0])), timeout=1)

    def test_busy_first_port_falls_back_to_the_next(self, session, issuer):
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen(1)
            busy_port = busy.getsockname()[1]
            thread, result, url = self.run_until_url(session, issuer, (busy_port, 0))
            redirect = issuer.params_of(url)["redirect_uri"]
            assert ":%d/" % busy_port not in redirect
            http_get(issuer.approve(url))
            thread.join(10)
        assert result["rc"] == 0 and issuer.exchanges[0][1]["redirect_uri"] == redirect

    def test_wrong_state_on_the_loopback_gets_400_and_the_wait_goes_on(self, session, issuer):
        thread, result, url = self.run_until_url(session, issuer, (0,))
        address = issuer.approve(url)
        status, page = http_get(re.sub(r"state=[^&]+", "state=forged", address))
        assert status == 400 and "state does not match" in page and thread.is_alive()
        status, _ = http_get(address.split("?")[0].replace("/auth/callback", "/favicon.ico"))
        assert status == 404
        status, _ = http_get(address)
        thread.join(10)
        assert status == 200 and result["rc"] == 0 and len(issuer.exchanges) == 1

    def test_error_callback_on_the_loopback_fails_the_login(self, session, issuer, capsys):
        thread, result, url = self.run_until_url(session, issuer, (0,))
        status, page = http_get(issuer.refuse(url, "missing_codex_entitlement"))
        thread.join(10)
        assert result["rc"] == 1 and "Codex is not enabled for this workspace" in page
        assert "Codex is not enabled for this workspace" in capsys.readouterr().err

    def test_all_ports_busy_still_allows_pasting(self, session, issuer, new_auth):
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen(1)
            port = busy.getsockname()[1]
            assert session.login("--paste", stdin=Keyboard(session.paste(issuer=issuer)), ports=(port,)) == 0
        assert "pasting is the only way" in session.screen.getvalue()
        assert issuer.exchanges[0][1]["redirect_uri"] == "http://127.0.0.1:1455/auth/callback"
