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
import signal
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
        assert all([v for k, v in r.headers if k.lower() == "user-agent"] == [UA] for r in fake.requests)
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


# == TestAuthFile ===========================================================

class TestAuthFile:
    def test_written_file_has_exactly_the_login_fields(self, session, issuer, new_auth):
        assert session.login() == 0
        data = read_json(new_auth)
        assert data == {"auth_mode": "chatgpt", "OPENAI_API_KEY": None,
                        "tokens": {"id_token": issuer.id_token, "access_token": issuer.access_token,
                                   "refresh_token": issuer.refresh_token, "account_id": "acct-new"},
                        "last_refresh": data["last_refresh"]}
        assert list(data) == ["auth_mode", "OPENAI_API_KEY", "tokens", "last_refresh"]
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$", data["last_refresh"])
        assert abs(ocm.parse_rfc3339(data["last_refresh"]) - session.clock.now()) < 60
        assert new_auth.read_text().startswith('{\n  "auth_mode"')  # 2-space JSON, like Codex

    def test_file_is_0600_in_a_new_0700_directory(self, session, issuer, new_auth):
        assert not new_auth.parent.exists()
        assert session.login() == 0
        assert stat.S_IMODE(os.stat(str(new_auth)).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(str(new_auth.parent)).st_mode) == 0o700
        assert (new_auth.parent / "auth.lock").exists()
        assert sorted(os.listdir(str(new_auth.parent))) == ["auth.json", "auth.lock"]  # no temp left

    def test_account_id_is_null_without_the_claim(self, tmp_path, fake, new_auth):
        issuer = FakeIssuer(fake, account_id=None)
        session = Session(tmp_path, fake, new_auth)
        assert session.login() == 0
        assert read_json(new_auth)["tokens"]["account_id"] is None

    def test_unknown_fields_are_kept_on_relogin(self, session, issuer, auth_path, tmp_path, fake):
        write_auth(auth_path, extra={"agent_identity": {"id": "agent-7"}, "future": [1, 2]},
                   tokens_extra={"stale_extra": "old"})
        session = Session(tmp_path, fake, auth_path)
        assert session.login("--force") == 0
        data = read_json(auth_path)
        assert data["agent_identity"] == {"id": "agent-7"} and data["future"] == [1, 2]
        assert set(data["tokens"]) == {"id_token", "access_token", "refresh_token", "account_id"}
        assert data["tokens"]["account_id"] == "acct-new"
        assert stat.S_IMODE(os.stat(str(auth_path)).st_mode) == 0o600

    def test_api_key_login_is_replaced_by_the_chatgpt_login(self, tmp_path, fake, issuer, auth_path):
        auth_path.write_text(json.dumps({"auth_mode": "apikey", "OPENAI_API_KEY": "sk-old"}))
        session = Session(tmp_path, fake, auth_path)
        assert session.login("--force") == 0
        data = read_json(auth_path)
        assert data["auth_mode"] == "chatgpt" and data["OPENAI_API_KEY"] is None
        assert not issuer.revoked

    def test_broken_file_is_replaced_without_asking(self, tmp_path, fake, issuer, auth_path):
        auth_path.write_text("{not json")
        session = Session(tmp_path, fake, auth_path)
        assert session.login(stdin=Keyboard(tty=False)) == 0
        assert read_json(auth_path)["tokens"]["refresh_token"] == issuer.refresh_token

    def test_write_waits_for_auth_lock(self, session, issuer, new_auth):
        import fcntl
        new_auth.parent.mkdir(parents=True)
        fd = os.open(str(new_auth.parent / "auth.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # a Codex CLI refreshing right now
            thread, result = session.in_thread()
            session.screen.wait_for("Waiting for the code")
            time.sleep(0.1)
            assert not new_auth.exists() and thread.is_alive()
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        thread.join(10)
        assert result["rc"] == 0 and new_auth.exists()


# == TestReplacing ==========================================================

class TestReplacing:
    @pytest.fixture
    def relogin(self, tmp_path, fake, auth_path):
        return Session(tmp_path, fake, auth_path)

    def test_existing_login_is_kept_when_the_answer_is_no(self, relogin, issuer, fake, auth_path):
        before = auth_path.read_bytes()
        assert relogin.login(stdin=Keyboard("n")) == 1
        out = relogin.screen.getvalue()
        assert "already holds a login (owner@example.com)" in out and "[y/N]" in out
        assert "Kept the current login" in out
        assert auth_path.read_bytes() == before and not fake.requests

    def test_empty_answer_means_no(self, relogin, fake, issuer, auth_path):
        assert relogin.login(stdin=Keyboard("")) == 1 and not fake.requests

    @pytest.mark.parametrize("answer", ["y", "yes", " Y "])
    def test_yes_replaces_and_revokes_the_old_refresh_token(self, relogin, issuer, auth_path, answer, capsys):
        assert relogin.login(stdin=Keyboard(answer)) == 0
        assert read_json(auth_path)["tokens"]["refresh_token"] == issuer.refresh_token
        assert [r.json() for r in issuer.revoked] == [
            {"token": "rt_initial", "token_type_hint": "refresh_token", "client_id": ocm.OAUTH_CLIENT_ID}]
        assert issuer.revoked[0].header("User-Agent") == UA
        out = relogin.screen.getvalue()
        assert "previous login's refresh token is revoked" in out
        assert_no_secrets(out + capsys.readouterr().err, issuer)

    def test_force_skips_the_question(self, relogin, issuer, auth_path):
        keyboard = Keyboard(tty=False)
        assert relogin.login("--force", stdin=keyboard) == 0
        assert keyboard.reads == 0 and "[y/N]" not in relogin.screen.getvalue()
        assert len(issuer.revoked) == 1

    def test_without_a_terminal_and_without_force_it_refuses(self, relogin, fake, auth_path, capsys):
        before = auth_path.read_bytes()
        keyboard = Keyboard("y", tty=False)
        assert relogin.login(stdin=keyboard) == 1
        err = capsys.readouterr().err
        assert "already holds a login" in err and "--force" in err
        assert keyboard.reads == 0 and not fake.requests and auth_path.read_bytes() == before

    def test_the_token_revoked_is_the_one_on_disk_at_write_time(self, relogin, issuer, auth_path):
        # A running OCM rotates the refresh token while the user is still signing in.
        issuer.pending = [403]

        def rotate_then_pending(ex):
            if not issuer.polls:
                write_auth(auth_path, refresh="rt_rotated_meanwhile")
            FakeIssuer.device_token(issuer, ex)
        issuer.fake.on("POST", "/api/accounts/deviceauth/token", rotate_then_pending)
        assert relogin.login("--force") == 0
        assert [r.json()["token"] for r in issuer.revoked] == ["rt_rotated_meanwhile"]

    def test_failed_revocation_does_not_fail_the_login(self, relogin, issuer, auth_path):
        issuer.revoke_status = 503
        assert relogin.login("--force") == 0
        out = relogin.screen.getvalue()
        assert "Could not revoke the previous login's refresh token" in out and "503" in out
        assert read_json(auth_path)["tokens"]["refresh_token"] == issuer.refresh_token

    def test_first_login_revokes_nothing(self, session, issuer):
        assert session.login() == 0 and not issuer.revoked

    def test_failed_sign_in_leaves_the_old_login_alone(self, relogin, issuer, auth_path):
        before = auth_path.read_bytes()
        issuer.poll_answer = (500, {"error": "server_error"})
        assert relogin.login("--force") == 1
        assert auth_path.read_bytes() == before and not issuer.revoked


# == TestRunningProxy =======================================================

class TestRunningProxy:
    def test_running_ocm_switches_to_the_new_login_without_restart(self, make_proxy, fake, auth_path,
                                                                    tmp_path, issuer):
        proxy = make_proxy(upstream={"chatgpt_url": fake.chatgpt_url, "token_url": fake.token_url,
                                     "issuer_url": fake.url})
        status, _, _ = proxy.request("POST", "/v1/responses", body={"model": "m"})
        first = [r for r in fake.api_requests() if r.path.endswith("/responses")][-1]
        assert status == 200 and first.header("ChatGPT-Account-Id") == "acct-123"
        session = Session(tmp_path, fake, auth_path)
        assert session.login("--force") == 0
        status, _, _ = proxy.request("POST", "/v1/responses", body={"model": "m"})
        second = [r for r in fake.api_requests() if r.path.endswith("/responses")][-1]
        assert status == 200
        assert second.header("Authorization") == "Bearer " + issuer.access_token
        assert second.header("ChatGPT-Account-Id") == "acct-new"
        assert proxy.server.credential.refreshes == 0

    def test_running_ocm_answers_503_after_logout(self, make_proxy, fake, auth_path, tmp_path, issuer):
        proxy = make_proxy()
        assert proxy.request("POST", "/v1/responses", body={})[0] == 200
        config = write_config(tmp_path, fake, auth_path)
        assert ocm.run_logout([str(config)], out=Screen()) == 0
        status, _, body = proxy.request("POST", "/v1/responses", body={})
        assert status == 503 and b"no tokens" in body


# == TestLogout =============================================================

class TestLogout:
    def test_logout_revokes_and_removes_the_tokens_keeping_other_fields(self, tmp_path, fake, issuer,
                                                                         auth_path, capsys):
        write_auth(auth_path, extra={"agent_identity": {"id": "agent-7"}})
        config = write_config(tmp_path, fake, auth_path)
        screen = Screen()
        assert ocm.run_logout([str(config)], out=screen) == 0
        assert read_json(auth_path) == {"auth_mode": "chatgpt", "OPENAI_API_KEY": None,
                                        "agent_identity": {"id": "agent-7"}}
        assert stat.S_IMODE(os.stat(str(auth_path)).st_mode) == 0o600
        assert [r.json() for r in issuer.revoked] == [
            {"token": "rt_initial", "token_type_hint": "refresh_token", "client_id": ocm.OAUTH_CLIENT_ID}]
        assert issuer.revoked[0].header("User-Agent") == UA
        assert "Removed" in screen.getvalue() and "revoked" in screen.getvalue()
        assert_no_secrets(screen.getvalue() + capsys.readouterr().err, issuer)

    def test_logout_twice_is_a_no_op(self, tmp_path, fake, issuer, auth_path):
        config = write_config(tmp_path, fake, auth_path)
        assert ocm.run_logout([str(config)], out=Screen()) == 0
        before = auth_path.read_bytes()
        screen = Screen()
        assert ocm.run_logout([str(config)], out=screen) == 0
        assert "nothing to do" in screen.getvalue() and auth_path.read_bytes() == before
        assert len(issuer.revoked) == 1

    def test_logout_without_a_file_is_a_no_op(self, tmp_path, fake, issuer, new_auth, capsys):
        config = write_config(tmp_path, fake, new_auth)
        screen = Screen()
        assert ocm.run_logout([str(config)], out=screen) == 0
        assert "nothing to do" in screen.getvalue() and not new_auth.parent.exists()
        assert capsys.readouterr().err == "" and not issuer.revoked

    def test_failed_revocation_still_removes_but_says_so(self, tmp_path, fake, issuer, auth_path, capsys):
        issuer.revoke_status = 500
        config = write_config(tmp_path, fake, auth_path)
        assert ocm.run_logout([str(config)], out=Screen()) == 1
        assert "tokens" not in read_json(auth_path)
        assert "could not revoke" in capsys.readouterr().err

    def test_broken_file_is_left_alone(self, tmp_path, fake, issuer, auth_path, capsys):
        auth_path.write_text("{broken")
        config = write_config(tmp_path, fake, auth_path)
        assert ocm.run_logout([str(config)], out=Screen()) == 1
        assert auth_path.read_text() == "{broken" and "not valid JSON" in capsys.readouterr().err


# == TestStatus =============================================================

class TestStatus:
    def status(self, tmp_path, fake, path, now=None):
        config = write_config(tmp_path, fake, path)
        screen = Screen()
        rc = ocm.run_status([str(config)], out=screen, now=now or time.time)
        return rc, screen.getvalue()

    def test_status_of_a_fresh_login(self, tmp_path, fake, auth_path):
        write_auth(auth_path, id_token=new_id_token(plan="pro"), expires_in=3600,
                   last_refresh="2026-11-24T08:33:47.488245999Z")
        before, mtime = auth_path.read_bytes(), os.stat(str(auth_path)).st_mtime_ns
        access = read_json(auth_path)["tokens"]["access_token"]
        exp = ocm.decode_jwt_claims(access)["exp"]
        rc, out = self.status(tmp_path, fake, auth_path, now=lambda: exp - 59 * 60 - 30)
        assert rc == 0
        assert "credential:    %s" % auth_path in out
        assert "usable:        yes" in out and "mode:          ChatGPT OAuth" in out
        assert "owner@example.com, id acct-123" in out and "plan:          pro" in out
        assert "(59m left)" in out and "refresh token: present" in out
        assert "last refresh:  2026-11-24 08:33:47 UTC" in out
        assert auth_path.read_bytes() == before and os.stat(str(auth_path)).st_mtime_ns == mtime
        assert sorted(os.listdir(str(auth_path.parent))) == ["auth.json"]  # not even a lock file
        for token in read_json(auth_path)["tokens"].values():
            assert token not in out or token == "acct-123"

    def test_expired_access_token_with_refresh_token_is_usable(self, tmp_path, fake, auth_path):
        write_auth(auth_path, expires_in=-7200)
        rc, out = self.status(tmp_path, fake, auth_path)
        assert rc == 0 and "expired 2h 0m ago; OCM refreshes it" in out

    def test_expired_without_refresh_token_is_not_usable(self, tmp_path, fake, auth_path):
        write_auth(auth_path, expires_in=-60, refresh="")
        rc, out = self.status(tmp_path, fake, auth_path)
        assert rc == 2 and "usable:        no: the access token has expired" in out

    def test_missing_file(self, tmp_path, fake, new_auth):
        rc, out = self.status(tmp_path, fake, new_auth)
        assert rc == 2 and "not found" in out and "ocm.py login" in out

    def test_signed_out_file(self, tmp_path, fake, auth_path):
        auth_path.write_text(json.dumps({"auth_mode": "chatgpt", "OPENAI_API_KEY": None}))
        rc, out = self.status(tmp_path, fake, auth_path)
        assert rc == 2 and "no tokens" in out

    def test_api_key_mode(self, tmp_path, fake, auth_path):
        auth_path.write_text(json.dumps({"OPENAI_API_KEY": "sk-secret-key"}))
        rc, out = self.status(tmp_path, fake, auth_path)
        assert rc == 0 and "mode:          API key" in out and "sk-secret" not in out

    def test_status_after_login_shows_the_new_account(self, session, issuer, new_auth, tmp_path, fake):
        assert session.login() == 0
        rc, out = self.status(tmp_path, fake, new_auth)
        assert rc == 0 and "new@example.com, id acct-new" in out and "plan:          plus" in out

    @pytest.mark.parametrize("seconds, text", [(5, "5s"), (59 * 60 + 59, "59m"), (3 * 3600 + 12 * 60, "3h 12m"),
                                               (2 * 86400 + 4 * 3600 + 5, "2d 4h")])
    def test_ages_are_short(self, seconds, text):
        assert ocm.format_age(seconds) == text


# == TestCommandLine ========================================================

def run_ocm(*args, env=None, stdin=subprocess.DEVNULL, timeout=20):
    return subprocess.run([sys.executable, OCM_PY] + list(args), capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=stdin)


class TestCommandLine:
    def test_status_runs_as_a_command(self, tmp_path, fake, auth_path):
        config = write_config(tmp_path, fake, auth_path)
        out = run_ocm("status", str(config))
        assert out.returncode == 0 and "usable:        yes" in out.stdout and "acct-123" in out.stdout

    def test_status_without_config_uses_codex_home(self, tmp_path, auth_path):
        out = run_ocm("status", env=dict(os.environ, CODEX_HOME=str(auth_path.parent)))
        assert out.returncode == 0 and str(auth_path) in out.stdout

    def test_login_without_a_terminal_refuses_instead_of_hanging(self, tmp_path, fake, auth_path, issuer):
        config = write_config(tmp_path, fake, auth_path)
        out = run_ocm("login", str(config))
        assert out.returncode == 1 and "--force" in out.stderr and not fake.requests

    def test_device_login_as_a_command(self, tmp_path, fake, new_auth, issuer):
        issuer.pending = []  # entered before the first poll: no 5 s wait
        config = write_config(tmp_path, fake, new_auth)
        out = run_ocm("login", str(config))
        assert out.returncode == 0, out.stderr
        assert "ABCD-EFGH" in out.stdout and "new@example.com" in out.stdout
        assert_no_secrets(out.stdout + out.stderr, issuer)
        out = run_ocm("logout", str(config))
        assert out.returncode == 0 and len(issuer.revoked) == 1

    def test_ctrl_c_while_waiting_cancels_without_a_traceback(self, tmp_path, fake, new_auth, issuer):
        issuer.pending = None
        config = write_config(tmp_path, fake, new_auth)
        # as at a terminal: a suite started with `&` from a script inherits SIGINT ignored, and
        # Python (rightly) leaves an ignored SIGINT ignored
        proc = subprocess.Popen([sys.executable, OCM_PY, "login", str(config)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 10
            while not issuer.polls and time.monotonic() < deadline:
                time.sleep(0.01)
            assert issuer.polls  # it is now sleeping until the next poll
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 130 and "cancelled" in err and "Traceback" not in err
        assert not new_auth.exists()

    def test_help_lists_the_commands(self):
        out = run_ocm("--help")
        assert "login" in out.stdout and "logout" in out.stdout and "status" in out.stdout
        for command in ("login", "logout", "status"):
            out = run_ocm(command, "--help")
            assert out.returncode == 0 and "ocm.py " + command in out.stdout
        assert "--paste" in run_ocm("login", "--help").stdout
