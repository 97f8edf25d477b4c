"""Tests for ocm.py: real sockets against an in-process fake upstream.

Layout follows ocm.py: fixtures and the fake upstream first, then one class
per concern (TestConfig, TestCredentials, TestAuth, TestRelay, ...).
"""

import base64
import contextlib
import fcntl
import http.client
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import ocm

HERE = os.path.dirname(os.path.abspath(__file__))
OCM_PY = os.path.join(HERE, "ocm.py")


# == Helpers: tokens and auth.json ==========================================

def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def make_jwt(claims: dict) -> str:
    header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return "%s.%s.%s" % (header, b64url(json.dumps(claims).encode()), b64url(b"sig"))


_serial = [0]


def new_access_token(expires_in: float = 3600, account_id: str = "acct-123", plan: str = "pro") -> str:
    _serial[0] += 1
    return make_jwt({"exp": int(time.time() + expires_in), "n": _serial[0],
                     "https://api.openai.com/auth": {"chatgpt_account_id": account_id,
                                                     "chatgpt_plan_type": plan}})


def new_id_token(account_id: str = "acct-123", plan: str = "pro", email: str = "owner@example.com") -> str:
    return make_jwt({"email": email, "https://api.openai.com/auth": {
        "chatgpt_account_id": account_id, "chatgpt_plan_type": plan}})


def write_auth(path, access=None, refresh="rt_initial", account_id="acct-123", expires_in=3600,
               extra=None, tokens_extra=None, id_token=None, last_refresh="2026-11-24T08:33:47.488245999Z"):
    data = {
        "auth_mode": "chatgpt",
        "OPENAI_API_KEY": None,
        "tokens": {
            "id_token": id_token if id_token is not None else new_id_token(account_id),
            "access_token": access if access is not None else new_access_token(expires_in, account_id),
            "refresh_token": refresh,
            "account_id": account_id,
        },
        "last_refresh": last_refresh,
    }
    if tokens_extra:
        data["tokens"].update(tokens_extra)
    if extra:
        data.update(extra)
    tmp = str(path) + ".writing"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2)
    os.chmod(tmp, 0o600)
    os.replace(tmp, str(path))
    return data


def read_json(path):
    with open(str(path)) as fh:
        return json.load(fh)


def sse(*events) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)


def completed_event(rid="r1", model="gpt-5.3-codex", input_tokens=12, cached=4, output=5, **extra):
    response = {"id": rid, "model": model, "usage": {
        "input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output, "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output}}
    response.update(extra)
    return {"type": "response.completed", "response": response}


def message_event(text="Hi"):
    return {"type": "response.output_item.done", "item": {
        "type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}}


def function_call_event(name, arguments, call_id="call_1"):
    return {"type": "response.output_item.done", "item": {
        "type": "function_call", "name": name, "arguments": json.dumps(arguments), "call_id": call_id}}


def codex_model(ex):
    """A scripted model for the real Codex CLI: first turn calls the shell tool,
    the next turn answers with what the tool printed (a tool-call round trip)."""
    body = ex.request.json()
    outputs = [item for item in body.get("input", []) if item.get("type") == "function_call_output"]
    model = body.get("model", "gpt-5.3-codex")
    if not outputs:
        events = [function_call_event("exec_command", {"cmd": "echo tool-says-$((40+2))"}),
                  completed_event("r-call", model)]
    else:
        output = outputs[-1].get("output")
        text = output if isinstance(output, str) else json.dumps(output)
        answer = "the tool printed 42" if "tool-says-42" in text else "tool output missing: " + text[:200]
        events = [message_event(answer), completed_event("r-answer", model)]
    ex.stream(sse(*events))


# == The fake upstream ======================================================

class Recorded:
    def __init__(self, method, path, headers, body):
        self.method = method
        self.path = path
        self.headers = headers          # list of (name, value)
        self.body = body

    def header(self, name, default=None):
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return default

    def header_names(self):
        return {k.lower() for k, _ in self.headers}

    def json(self):
        return json.loads(self.body.decode())


class Exchange:
    """What a scripted route gets: the request and ways to answer it."""

    def __init__(self, handler, recorded):
        self.handler = handler
        self.request = recorded

    def send(self, status, body=b"", headers=None, content_type="application/json"):
        h = self.handler
        h.send_response(status)
        if content_type:
            h.send_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
        h.wfile.flush()

    def json(self, status, obj, headers=None):
        self.send(status, json.dumps(obj).encode(), headers)

    def start_chunked(self, status=200, headers=None, content_type="text/event-stream"):
        h = self.handler
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        h.wfile.flush()

    def chunk(self, data: bytes):
        self.handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.handler.wfile.flush()

    def end_chunked(self):
        self.handler.wfile.write(b"0\r\n\r\n")
        self.handler.wfile.flush()

    def stream(self, data: bytes, headers=None):
        self.start_chunked(headers=headers)
        self.chunk(data)
        self.end_chunked()

    def raw(self, data: bytes):
        self.handler.wfile.write(data)
        self.handler.wfile.flush()

    def close(self):
        self.handler.close_connection = True
        with contextlib.suppress(OSError):
            self.handler.connection.shutdown(socket.SHUT_RDWR)

    def wait_closed_by_peer(self, timeout=5.0):
        """Block until the proxy closes this connection; True if it did."""
        sock = self.handler.connection
        sock.settimeout(timeout)
        try:
            while True:
                if not sock.recv(4096):
                    return True
        except socket.timeout:
            return False
        except OSError:
            return True


class FakeUpstream:
    """ChatGPT backend, OpenAI API and OAuth token endpoint on 127.0.0.1:0.

    Routes are scriptable per test with ``on(method, path, fn)``; every request
    is recorded. The token endpoint rotates refresh tokens like the real one:
    a refresh token that was already used gets 401 refresh_token_reused.
    """

    def __init__(self):
        self.requests = []
        self.routes = {}
        self.connections = 0
        self.lock = threading.Lock()
        self.valid_refresh = {"rt_initial"}
        self.used_refresh = set()
        self.token_calls = []
        self.token_delay = 0.0
        self.access_expires_in = 3600
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def handle_any(self):
                length = self.headers.get("Content-Length")
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    body = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            break
                        body += self.rfile.read(size)
                        self.rfile.readline()
                else:
                    body = self.rfile.read(int(length)) if length else b""
                rec = Recorded(self.command, self.path, list(self.headers.items()), body)
                with fake.lock:
                    fake.requests.append(rec)
                fn = fake.routes.get((self.command, self.path.split("?")[0]))
                if fn is None:
                    fn = fake.default_route(self.command, self.path.split("?")[0])
                try:
                    fn(Exchange(self, rec))
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = handle_any

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def process_request(self, request, client_address):
                with fake.lock:
                    fake.connections += 1
                super().process_request(request, client_address)

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = "http://127.0.0.1:%d" % self.port
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    # -- scripting ----------------------------------------------------------
    def on(self, method, path, fn):
        self.routes[(method, path)] = fn

    def default_route(self, method, path):
        if path == "/oauth/token":
            return self.token_endpoint
        if path.endswith("/responses"):
            return lambda ex: ex.stream(sse(message_event(), completed_event()))
        return lambda ex: ex.json(200, {"ok": True, "path": ex.request.path})

    def token_endpoint(self, ex):
        body = ex.request.json()
        rt = body.get("refresh_token")
        with self.lock:
            self.token_calls.append(body)
        if self.token_delay:
            time.sleep(self.token_delay)
        with self.lock:
            if rt in self.used_refresh:
                outcome = "reused"
            elif rt not in self.valid_refresh:
                outcome = "invalid"
            else:
                outcome = "ok"
                self.valid_refresh.discard(rt)
                self.used_refresh.add(rt)
                new_rt = "rt_%d" % (len(self.used_refresh) + 1)
                self.valid_refresh.add(new_rt)
        if outcome == "reused":
            return ex.json(401, {"error": {"message": "Your refresh token has already been used",
                                           "type": "invalid_request_error", "code": "refresh_token_reused"}})
        if outcome == "invalid":
            return ex.json(401, {"error": {"message": "invalid refresh token", "code": "refresh_token_invalidated"}})
        ex.json(200, {"access_token": new_access_token(self.access_expires_in),
                      "refresh_token": new_rt, "id_token": new_id_token()})

    # -- looking ------------------------------------------------------------
    def api_requests(self):
        with self.lock:
            return [r for r in self.requests if r.path != "/oauth/token"]

    @property
    def chatgpt_url(self):
        return self.url + "/backend-api/codex"

    @property
    def token_url(self):
        return self.url + "/oauth/token"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# == Fixtures ===============================================================

@pytest.fixture
def fake():
    upstream = FakeUpstream()
    yield upstream
    upstream.close()


@pytest.fixture
def auth_path(tmp_path):
    path = tmp_path / "codex" / "auth.json"
    path.parent.mkdir()
    write_auth(path)
    return path


class Proxy:
    def __init__(self, server):
        self.server = server
        self.port = server.server_address[1]
        self.thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def conn(self, timeout=10):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method, path, body=None, headers=None, token="tok-alice", timeout=10):
        """One request on a new connection: (status, headers dict lower, body bytes)."""
        conn = self.conn(timeout)
        try:
            hdrs = dict(headers or {})
            if token is not None:
                hdrs.setdefault("Authorization", "Bearer " + token)
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
                hdrs.setdefault("Content-Type", "application/json")
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
        finally:
            conn.close()

    def close(self):
        self.server.shutdown()
        self.thread.join(5)
        self.server.close()


USERS = [{"name": "alice", "token": "tok-alice"}, {"name": "bob", "token": "tok-bob"}]


@pytest.fixture
def make_proxy(fake, auth_path):
    """make_proxy(**config) -> running Proxy pointed at the fake upstream."""
    started = []

    def make(**overrides):
        config = {
            "listen": "127.0.0.1",
            "listen_port": 0,
            "credential_path": str(auth_path),
            "users": USERS,
            "upstream": {"chatgpt_url": fake.chatgpt_url, "api_url": fake.url, "token_url": fake.token_url},
        }
        config.update(overrides)
        proxy = Proxy(ocm.OCMServer(ocm.config_from_dict(config)))
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.close()


@pytest.fixture
def proxy(make_proxy):
    return make_proxy()


def error_of(body: bytes):
    err = json.loads(body.decode())["error"]
    return err["type"], err["message"]


def raw_exchange(port, data: bytes, timeout=5.0) -> bytes:
    """Send raw bytes, read until the server closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except socket.timeout:
            pass
        return out


# == TestConfig =============================================================

class TestConfig:
    def base(self, **extra):
        data = {"listen": "0.0.0.0", "listen_port": 9000, "credential_path": "/tmp/a.json",
                "users": [{"name": "a", "token": "t1"}]}
        data.update(extra)
        return data

    def test_minimal_ocm_object_loads_with_defaults(self):
        config = ocm.config_from_dict({})
        assert config.listen == "127.0.0.1" and config.listen_port == 8080
        assert config.users == [] and config.headers == {}
        assert config.upstream.chatgpt_url == "https://chatgpt.com/backend-api/codex"
        assert config.upstream.token_url == "https://auth.openai.com/oauth/token"
        assert config.limits.max_body_size == 64 << 20
        assert config.limits.upstream_read_timeout == 600

    def test_whole_sing_box_file_is_accepted_unchanged(self, tmp_path):
        path = tmp_path / "sing-box.json"
        path.write_text(json.dumps({
            "log": {"level": "info"},
            "inbounds": [{"type": "mixed", "listen_port": 1080}],
            "services": [{"type": "derp", "tag": "x"},
                         {"type": "ocm", "tag": "ocm-svc", "listen": "::", "listen_port": 8080,
                          "credential_path": "/root/.codex/auth.json",
                          "users": [{"name": "alice", "token": "abc"}],
                          "headers": {"X-Test": "1", "X-Multi": ["a", "b"]}}],
            "outbounds": [{"type": "direct"}],
        }))
        config = ocm.load_config(str(path))
        assert config.listen == "::" and config.users[0].name == "alice"
        assert config.headers == {"X-Test": ["1"], "X-Multi": ["a", "b"]}

    def test_sing_box_listen_options_warn_but_load(self, caplog):
        with caplog.at_level(logging.WARNING, logger="ocm"):
            config = ocm.config_from_dict(self.base(tcp_fast_open=True, sniff=True))
        assert config.listen_port == 9000
        assert "tcp_fast_open" in caplog.text and "sniff" in caplog.text

    @pytest.mark.parametrize("data, needle", [
        ({"listen_prot": 1}, "listen_prot: unknown key"),
        ({"users": [{"name": "a", "token": "t", "tokn": "x"}]}, "users[0].tokn: unknown key"),
        ({"upstream": {"chatgpt": "x"}}, "upstream.chatgpt: unknown key"),
        ({"limits": {"max_body": 1}}, "limits.max_body: unknown key"),
        ({"listen_port": "8080"}, "listen_port: expected a whole number"),
        ({"listen_port": 70000}, "listen_port: 70000 is out of range"),
        ({"listen_port": -1}, "listen_port: -1 is out of range"),
        ({"listen_port": True}, "listen_port: expected a whole number"),
        ({"users": {"a": "b"}}, "users: expected a list"),
        ({"users": [{"name": "a", "token": ""}]}, "users[0].token: must not be empty"),
        ({"users": [{"name": "a"}]}, "users[0]: missing token"),
        ({"users": [{"name": "a", "token": "t"}, {"name": "a", "token": "u"}]}, "duplicate user name"),
        ({"users": [{"name": "a", "token": "t"}, {"name": "b", "token": "t"}]},
         "users[1].token: the same token is given to two users"),
        ({"users": [{"name": "a", "token": "t x"}]}, "users[0].token: must not contain spaces"),
        ({"headers": {"X": 1}}, "headers.X: expected a string"),
        ({"headers": {"Bad Name": "1"}}, "not a valid header name"),
        ({"headers": {"X": "a\nb"}}, "control characters"),
        ({"upstream": {"chatgpt_url": "ftp://x"}}, "upstream.chatgpt_url"),
        ({"limits": {"upstream_read_timeout": "soon"}}, "limits.upstream_read_timeout"),
        ({"limits": {"max_body_size": 10}}, "limits.max_body_size: 10 is out of range"),
        ({"credential_path": 5}, "credential_path: expected a string"),
    ])
    def test_bad_config_names_the_key(self, data, needle):
        with pytest.raises(ocm.ConfigError) as info:
            ocm.config_from_dict(data)
        assert needle in str(info.value)

    @pytest.mark.parametrize("key, value", [
        ("detour", "socks5://127.0.0.1:1"), ("tls", {"enabled": True})])
    def test_unbuilt_features_are_refused_not_ignored(self, key, value):
        with pytest.raises(ocm.ConfigError) as info:
            ocm.config_from_dict({key: value})
        assert "not supported yet" in str(info.value) and key in str(info.value)

    def test_sing_box_file_without_ocm_service_is_refused(self):
        with pytest.raises(ocm.ConfigError, match="no service of type"):
            ocm.config_from_dict({"services": [{"type": "derp"}]})

    def test_durations_accept_go_strings_and_numbers(self):
        config = ocm.config_from_dict({"limits": {"upstream_read_timeout": "1m30s", "connect_timeout": 5}})
        assert config.limits.upstream_read_timeout == 90.0
        assert config.limits.connect_timeout == 5.0

    def test_broken_json_file_is_a_clear_error(self, tmp_path):
        path = tmp_path / "c.json"
        path.write_text("{broken")
        with pytest.raises(ocm.ConfigError, match="not valid JSON"):
            ocm.load_config(str(path))

    def test_default_credential_path_prefers_codex_home(self, tmp_path):
        assert ocm.default_credential_path({"CODEX_HOME": str(tmp_path)}) == str(tmp_path / "auth.json")

    def test_default_credential_path_honours_sudo_user(self):
        if os.geteuid() != 0:
            pytest.skip("needs root to act as sudo")
        import pwd
        entry = pwd.getpwuid(os.getuid())
        path = ocm.default_credential_path({"SUDO_USER": entry.pw_name})
        assert path == os.path.join(entry.pw_dir, ".codex", "auth.json")


# == TestCredentials ========================================================

class TestCredentials:
    def test_mode_follows_auth_mode_first(self):
        assert ocm.parse_auth({"auth_mode": "apikey", "OPENAI_API_KEY": "sk-1"}).mode == "apikey"
        # A ChatGPT login also writes a key; auth_mode decides (sing-box gets this wrong).
        login = ocm.parse_auth({"auth_mode": "chatgpt", "OPENAI_API_KEY": "sk-1",
                                "tokens": {"access_token": new_access_token()}})
        assert login.mode == "chatgpt"

    def test_mode_without_auth_mode_depends_on_api_key(self):
        assert ocm.parse_auth({"OPENAI_API_KEY": "sk-1"}).mode == "apikey"
        assert ocm.parse_auth({"OPENAI_API_KEY": "", "tokens": {"access_token": "a.b.c"}}).mode == "chatgpt"

    def test_account_id_from_tokens_then_id_token_claim(self):
        login = ocm.parse_auth({"tokens": {"access_token": new_access_token(), "account_id": "from-file",
                                           "id_token": new_id_token("from-claim")}})
        assert login.account_id == "from-file"
        login = ocm.parse_auth({"tokens": {"access_token": "x.y.z", "id_token": new_id_token("from-claim", "plus")}})
        assert login.account_id == "from-claim" and login.plan == "plus"
        assert login.email == "owner@example.com"

    def test_needs_refresh_rules(self):
        now = time.time()
        fresh = ocm.Login(mode="chatgpt", access_token="a", refresh_token="r", expires_at=now + 3600)
        soon = ocm.Login(mode="chatgpt", access_token="a", refresh_token="r", expires_at=now + 200)
        old = ocm.Login(mode="chatgpt", access_token="a", refresh_token="r", last_refresh=now - 8 * 86400)
        recent = ocm.Login(mode="chatgpt", access_token="a", refresh_token="r", last_refresh=now - 7 * 86400)
        assert not ocm.needs_refresh(fresh, now) and ocm.needs_refresh(soon, now)
        assert ocm.needs_refresh(old, now) and not ocm.needs_refresh(recent, now)
        assert not ocm.needs_refresh(ocm.Login(mode="apikey", api_key="k"), now)

    def test_rfc3339_parsing_handles_nanoseconds_and_offsets(self):
        assert ocm.parse_rfc3339("1970-01-01T00:00:10.5Z") == 10.5
        assert ocm.parse_rfc3339("2026-11-24T08:33:47.488245999Z") == pytest.approx(1795509227.488246)
        assert ocm.parse_rfc3339("1970-01-01T01:00:00+01:00") == 0
        assert ocm.parse_rfc3339("yesterday") is None

    def test_fresh_token_is_used_without_refresh(self, proxy, fake, auth_path):
        status, _, _ = proxy.request("POST", "/v1/responses", {"model": "m"})
        assert status == 200
        assert fake.token_calls == []
        sent = fake.api_requests()[0]
        assert sent.header("Authorization") == "Bearer " + read_json(auth_path)["tokens"]["access_token"]
        assert sent.header("ChatGPT-Account-Id") == "acct-123"

    def test_token_expiring_within_five_minutes_is_refreshed_first(self, make_proxy, fake, auth_path):
        write_auth(auth_path, expires_in=120)
        proxy = make_proxy()
        status, _, _ = proxy.request("POST", "/v1/responses", {"model": "m"})
        assert status == 200
        assert len(fake.token_calls) == 1
        body = fake.token_calls[0]
        assert body == {"client_id": "app_EMoamEEZ73f0CkXaXp7hrann", "grant_type": "refresh_token",
                        "refresh_token": "rt_initial"}
        saved = read_json(auth_path)
        assert saved["tokens"]["refresh_token"] == "rt_2"
        assert fake.api_requests()[0].header("Authorization") == "Bearer " + saved["tokens"]["access_token"]

    def test_without_exp_refreshes_after_eight_days(self, make_proxy, fake, auth_path):
        write_auth(auth_path, access="opaque-token", last_refresh="2020-01-01T00:00:00Z")
        status, _, _ = make_proxy().request("POST", "/v1/responses", {})
        assert status == 200 and len(fake.token_calls) == 1

    def test_without_exp_recent_login_is_not_refreshed(self, make_proxy, fake, auth_path):
        write_auth(auth_path, access="opaque-token", last_refresh=ocm.format_rfc3339(time.time() - 3600))
        status, _, _ = make_proxy().request("POST", "/v1/responses", {})
        assert status == 200 and fake.token_calls == []

    def test_fifty_concurrent_requests_cause_one_refresh(self, make_proxy, fake, auth_path):
        write_auth(auth_path, expires_in=-10)
        fake.token_delay = 0.3  # all fifty arrive while the one refresh is in flight
        proxy = make_proxy()
        results = []

        def one():
            results.append(proxy.request("POST", "/v1/responses", {"model": "m"})[0])

        threads = [threading.Thread(target=one) for _ in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == [200] * 50
        assert len(fake.token_calls) == 1
        tokens = {r.header("Authorization") for r in fake.api_requests()}
        assert len(tokens) == 1

    def test_refresh_writes_atomically_keeping_unknown_fields_and_mode(self, make_proxy, fake, auth_path):
        write_auth(auth_path, expires_in=10, extra={"agent_identity": {"keep": "me"}},
                   tokens_extra={"future_field": 7})
        os.chmod(str(auth_path), 0o644)  # OCM writes 0600 whatever it found
        make_proxy().request("POST", "/v1/responses", {})
        saved = read_json(auth_path)
        assert saved["agent_identity"] == {"keep": "me"}
        assert saved["tokens"]["future_field"] == 7
        assert saved["tokens"]["account_id"] == "acct-123"
        assert saved["tokens"]["refresh_token"] == "rt_2"
        assert ocm.parse_rfc3339(saved["last_refresh"]) == pytest.approx(time.time(), abs=30)
        assert saved["last_refresh"].endswith("Z")
        assert oct(os.stat(str(auth_path)).st_mode & 0o777) == "0o600"
        assert open(str(auth_path)).read().startswith('{\n  "auth_mode"')
        assert [n for n in os.listdir(str(auth_path.parent)) if n.endswith(".tmp")] == []

    def test_tokens_written_by_another_process_under_the_lock_are_adopted(self, make_proxy, fake, auth_path):
        """Codex CLI holds auth.lock and rotates the tokens while OCM waits:
        OCM must use them, not send the refresh token the file no longer holds."""
        write_auth(auth_path, expires_in=-10)
        proxy = make_proxy()
        lock_fd = os.open(str(auth_path.parent / "auth.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        result = []
        t = threading.Thread(target=lambda: result.append(proxy.request("POST", "/v1/responses", {})))
        t.start()
        time.sleep(0.3)  # OCM is now blocked on the lock
        fresh = new_access_token()
        write_auth(auth_path, access=fresh, refresh="rt_by_codex_cli")
        fcntl.flock(lock_fd, fcntl.LOCK_UN)
        os.close(lock_fd)
        t.join(10)
        assert result[0][0] == 200
        assert fake.token_calls == []
        assert fake.api_requests()[0].header("Authorization") == "Bearer " + fresh

    def test_refresh_after_file_changed_uses_the_new_refresh_token(self, make_proxy, fake, auth_path):
        proxy = make_proxy()
        assert proxy.request("POST", "/v1/responses", {})[0] == 200
        fake.valid_refresh.add("rt_rotated_elsewhere")
        time.sleep(0.01)
        write_auth(auth_path, expires_in=-10, refresh="rt_rotated_elsewhere")
        assert proxy.request("POST", "/v1/responses", {})[0] == 200
        assert [c["refresh_token"] for c in fake.token_calls] == ["rt_rotated_elsewhere"]

    def test_upstream_401_refreshes_once_and_retries(self, proxy, fake, auth_path):
        old = read_json(auth_path)["tokens"]["access_token"]

        def route(ex):
            if ex.request.header("Authorization") == "Bearer " + old:
                return ex.json(401, {"error": {"message": "token revoked"}})
            ex.stream(sse(completed_event()))

        fake.on("POST", "/backend-api/codex/responses", route)
        status, _, body = proxy.request("POST", "/v1/responses", {"model": "m"})
        assert status == 200 and b"response.completed" in body
        assert len(fake.token_calls) == 1
        assert len(fake.api_requests()) == 2

    def test_upstream_401_twice_is_relayed_not_looped(self, proxy, fake):
        fake.on("POST", "/backend-api/codex/responses",
                lambda ex: ex.json(401, {"error": {"message": "nope"}}))
        status, _, body = proxy.request("POST", "/v1/responses", {})
        assert status == 401 and json.loads(body)["error"]["message"] == "nope"
        assert len(fake.token_calls) == 1 and len(fake.api_requests()) == 2

    def test_permanent_refresh_failure_answers_401_without_retry_loop(self, make_proxy, fake, auth_path):
        write_auth(auth_path, expires_in=-10, refresh="rt_dead")
        fake.used_refresh.add("rt_dead")
        proxy = make_proxy()
        for _ in range(3):
            status, _, body = proxy.request("POST", "/v1/responses", {})
            assert status == 401
            kind, message = error_of(body)
            assert kind == "authentication_error" and "sign in again" in message
        assert len(fake.token_calls) == 1
        assert fake.api_requests() == []
        # The owner signs in again: the new file is picked up without restart.
        time.sleep(0.01)
        write_auth(auth_path, refresh="rt_initial")
        assert proxy.request("POST", "/v1/responses", {})[0] == 200

    def test_transient_refresh_failure_keeps_using_a_still_valid_token(self, make_proxy, fake, auth_path):
        write_auth(auth_path, expires_in=120)
        fake.on("POST", "/oauth/token", lambda ex: ex.json(503, {"error": "busy"}))
        proxy = make_proxy()
        assert proxy.request("POST", "/v1/responses", {})[0] == 200
        assert proxy.request("POST", "/v1/responses", {})[0] == 200
        assert len([r for r in fake.requests if r.path == "/oauth/token"]) == 1  # backed off

    def test_transient_refresh_failure_with_expired_token_is_503(self, make_proxy, fake, auth_path):
        write_auth(auth_path, expires_in=-10)
        fake.on("POST", "/oauth/token", lambda ex: ex.json(500, {"error": "busy"}))
        status, _, body = make_proxy().request("POST", "/v1/responses", {})
        assert status == 503
        assert "token refresh failed" in error_of(body)[1]

    def test_missing_file_gives_503_until_it_appears(self, make_proxy, fake, auth_path):
        os.unlink(str(auth_path))
        proxy = make_proxy()
        status, _, body = proxy.request("POST", "/v1/responses", {})
        assert status == 503
        kind, message = error_of(body)
        assert message.startswith("credential unavailable: ") and "not found" in message
        assert fake.api_requests() == []
        write_auth(auth_path)
        assert proxy.request("POST", "/v1/responses", {})[0] == 200

    def test_broken_file_gives_503_naming_the_problem(self, make_proxy, auth_path):
        auth_path.write_text("{not json")
        status, _, body = make_proxy().request("POST", "/v1/responses", {})
        assert status == 503 and "not valid JSON" in error_of(body)[1]

    def test_signed_out_file_gives_503(self, make_proxy, auth_path):
        auth_path.write_text(json.dumps({"auth_mode": "chatgpt", "tokens": None}))
        status, _, body = make_proxy().request("POST", "/v1/responses", {})
        assert status == 503 and "sign in again" in error_of(body)[1]

    def test_api_key_mode_uses_key_and_api_paths(self, make_proxy, fake, auth_path):
        auth_path.write_text(json.dumps({"auth_mode": "apikey", "OPENAI_API_KEY": "sk-owner"}))
        proxy = make_proxy()
        status, _, _ = proxy.request("POST", "/v1/responses?x=1", {"model": "m"})
        assert status == 200
        sent = fake.api_requests()[0]
        assert sent.path == "/v1/responses?x=1"
        assert sent.header("Authorization") == "Bearer sk-owner"
        assert "chatgpt-account-id" not in sent.header_names()
        status, _, _ = proxy.request("POST", "/v1/chat/completions", {"model": "gpt-4o"})
        assert status == 200 and fake.api_requests()[1].path == "/v1/chat/completions"


# == TestAuth ===============================================================

class TestAuth:
    @pytest.mark.parametrize("header, message", [
        (None, "missing api key"),
        ("Basic dXNlcjpwYXNz", "invalid api key format"),
        ("Bearer", "invalid api key format"),
        ("Bearer tok-mallory", "invalid api key"),
    ])
    def test_rejected_requests_get_401_and_never_reach_upstream(self, proxy, fake, header, message):
        headers = {"Authorization": header} if header else {}
        status, _, body = proxy.request("POST", "/v1/responses", {"model": "m"}, headers=headers, token=None)
        assert status == 401
        assert error_of(body) == ("authentication_error", message)
        assert fake.requests == []

    def test_every_user_token_works(self, proxy, fake):
        assert proxy.request("POST", "/v1/responses", {}, token="tok-alice")[0] == 200
        assert proxy.request("POST", "/v1/responses", {}, token="tok-bob")[0] == 200

    def test_empty_user_list_means_open_access(self, make_proxy, fake):
        proxy = make_proxy(users=[])
        assert proxy.request("POST", "/v1/responses", {}, token=None)[0] == 200

    def test_client_credentials_are_never_forwarded(self, proxy, fake):
        proxy.request("POST", "/v1/responses", {}, headers={"X-Api-Key": "client-key", "Api-Key": "k2"})
        sent = fake.api_requests()[0]
        assert "x-api-key" not in sent.header_names() and "api-key" not in sent.header_names()
        assert "tok-alice" not in json.dumps(sent.headers)

    def test_user_tokens_never_appear_in_logs(self, proxy, fake, caplog):
        with caplog.at_level(logging.DEBUG, logger="ocm"):
            proxy.request("POST", "/v1/responses", {}, token="tok-alice")
            proxy.request("POST", "/v1/responses", {}, token="tok-wrong-secret")
        assert "alice" in caplog.text
        assert "tok-alice" not in caplog.text and "tok-wrong-secret" not in caplog.text


# == TestRelay ==============================================================

class TestRelay:
    def test_oauth_mode_strips_v1_and_keeps_query(self, proxy, fake):
        proxy.request("POST", "/v1/responses?stream=true&a=b", {})
        proxy.request("GET", "/v1/models?client_version=0.169.0")
        paths = [r.path for r in fake.api_requests()]
        assert paths == ["/backend-api/codex/responses?stream=true&a=b",
                         "/backend-api/codex/models?client_version=0.169.0"]

    def test_chat_completions_refused_in_oauth_mode(self, proxy, fake):
        status, _, body = proxy.request("POST", "/v1/chat/completions", {"model": "gpt-4o"})
        assert status == 400
        assert error_of(body) == ("invalid_request_error",
                                  "chat completions endpoint is only available in API key mode")
        assert fake.requests == []

    @pytest.mark.parametrize("path", ["/", "/v2/responses", "/backend-api/codex/responses", "/v1"])
    def test_paths_outside_v1_get_404_and_never_reach_upstream(self, proxy, fake, path):
        status, _, body = proxy.request("POST", path, {})
        assert status == 404 and error_of(body)[0] == "invalid_request_error"
        assert fake.requests == []

    @pytest.mark.parametrize("path", ["/v1/../me", "/v1/%2e%2e/me", "/v1/a%2fb"])
    def test_paths_that_could_escape_the_base_are_refused(self, proxy, fake, path):
        status, _, _ = proxy.request("GET", path)
        assert status == 400 and fake.requests == []

    def test_host_header_does_not_change_the_upstream(self, proxy, fake):
        proxy.request("GET", "/v1/models", headers={"Host": "evil.example"})
        sent = fake.api_requests()[0]
        assert sent.header("Host") == "127.0.0.1:%d" % fake.port

    def test_upstream_headers_are_built_as_protocol_says(self, make_proxy, fake):
        proxy = make_proxy(headers={"Originator": "ocm-forced", "X-Extra": ["1", "2"]})
        proxy.request("POST", "/v1/responses", {"model": "m"}, headers={
            "Originator": "codex_cli_rs", "Session-Id": "s-1", "Connection": "keep-alive, X-Hop",
            "X-Hop": "drop-me", "Keep-Alive": "timeout=5", "Accept-Encoding": "gzip, br",
            "Proxy-Authorization": "Basic xx", "TE": "trailers", "ChatGPT-Account-Id": "someone-else",
            "x-codex-turn-state": "ts-1"})
        sent = fake.api_requests()[0]
        names = sent.header_names()
        for dropped in ("x-hop", "keep-alive", "proxy-authorization", "te"):
            assert dropped not in names
        assert sent.header("Accept-Encoding") == "identity"
        assert sent.header("Originator") == "ocm-forced"
        assert [v for k, v in sent.headers if k.lower() == "x-extra"] == ["1", "2"]
        assert sent.header("Session-Id") == "s-1" and sent.header("x-codex-turn-state") == "ts-1"
        assert sent.header("ChatGPT-Account-Id") == "acct-123"
        assert [k for k, _ in sent.headers if k.lower() == "authorization"] == ["Authorization"]

    def test_response_status_headers_and_body_pass_unchanged(self, proxy, fake):
        body = json.dumps({"error": {"type": "usage_limit_reached", "message": "You've hit your usage limit",
                                     "plan_type": "pro", "resets_at": 1795512000}}).encode()
        fake.on("POST", "/backend-api/codex/responses", lambda ex: ex.send(
            429, body, {"x-codex-primary-used-percent": "100", "Retry-After": "3600",
                        "Set-Cookie": "a=1", "X-Dup": "one"}))
        status, headers, got = proxy.request("POST", "/v1/responses", {})
        assert status == 429 and got == body
        assert headers["x-codex-primary-used-percent"] == "100" and headers["retry-after"] == "3600"
        assert len(fake.api_requests()) == 1  # 429 is never retried

    @pytest.mark.parametrize("status", [400, 403, 404, 500, 502, 503])
    def test_every_other_status_is_relayed_with_body(self, proxy, fake, status):
        fake.on("POST", "/backend-api/codex/responses", lambda ex: ex.json(status, {"error": {"x": status}}))
        got, _, body = proxy.request("POST", "/v1/responses", {})
        assert got == status and json.loads(body) == {"error": {"x": status}}

    def test_large_known_length_body_is_streamed_whole(self, proxy, fake):
        blob = os.urandom(3 << 20)
        fake.on("GET", "/backend-api/codex/blob", lambda ex: ex.send(200, blob, content_type="application/octet-stream"))
        status, headers, body = proxy.request("GET", "/v1/blob")
        assert status == 200 and body == blob and headers["content-length"] == str(len(blob))

    def test_chunked_request_body_is_forwarded_with_length(self, proxy, fake):
        conn = proxy.conn()
        conn.putrequest("POST", "/v1/responses")
        conn.putheader("Authorization", "Bearer tok-alice")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        conn.send(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        assert conn.getresponse().status == 200
        sent = fake.api_requests()[0]
        assert sent.body == b"hello world" and sent.header("Content-Length") == "11"
        assert "transfer-encoding" not in sent.header_names()

    def test_body_over_the_limit_gets_413(self, make_proxy, fake):
        proxy = make_proxy(limits={"max_body_size": 2048})
        status, _, body = proxy.request("POST", "/v1/responses", b"x" * 4096)
        assert status == 413 and error_of(body)[0] == "invalid_request_error"
        assert fake.requests == []

    def test_sse_events_are_flushed_one_by_one(self, proxy, fake):
        """Each event must reach the client before upstream sends the next."""
        received = [threading.Event() for _ in range(3)]
        order = []

        def route(ex):
            ex.start_chunked()
            for i in range(3):
                order.append("sent %d" % i)  # before the write: the client may log "got" first
                ex.chunk(sse({"type": "response.output_text.delta", "delta": str(i)}))
                assert received[i].wait(5), "event %d was held back by the proxy" % i
            ex.chunk(sse(completed_event()))
            ex.end_chunked()

        fake.on("POST", "/backend-api/codex/responses", route)
        conn = proxy.conn()
        conn.request("POST", "/v1/responses", body=b"{}", headers={"Authorization": "Bearer tok-alice"})
        resp = conn.getresponse()
        assert resp.getheader("Transfer-Encoding") == "chunked"
        assert resp.getheader("Content-Type") == "text/event-stream"
        seen = b""
        for i in range(3):
            while ('"delta": "%d"' % i).encode() not in seen:
                seen += resp.read1(65536)
            order.append("got %d" % i)
            received[i].set()
        rest = resp.read()
        assert b"response.completed" in rest
        assert order == ["sent 0", "got 0", "sent 1", "got 1", "sent 2", "got 2"]

    def test_client_keep_alive_serves_several_requests(self, proxy, fake):
        conn = proxy.conn()
        for _ in range(3):
            conn.request("POST", "/v1/responses", body=b"{}", headers={"Authorization": "Bearer tok-alice"})
            resp = conn.getresponse()
            assert resp.status == 200
            resp.read()
        assert len(fake.api_requests()) == 3

    def test_upstream_connections_are_reused(self, proxy, fake):
        for _ in range(5):
            assert proxy.request("POST", "/v1/responses", {})[0] == 200
            assert proxy.request("GET", "/v1/models")[0] == 200
        assert fake.connections == 1

    def test_stale_pooled_connection_is_replaced_transparently(self, proxy, fake):
        fake.on("GET", "/backend-api/codex/once", lambda ex: (ex.json(200, {}), ex.close()))
        assert proxy.request("GET", "/v1/once")[0] == 200
        time.sleep(0.1)
        assert proxy.request("GET", "/v1/models")[0] == 200
        assert fake.connections == 2

    def test_unreachable_upstream_is_502(self, make_proxy, fake):
        dead = socket.socket()
        dead.bind(("127.0.0.1", 0))
        port = dead.getsockname()[1]
        dead.close()
        proxy = make_proxy(upstream={"chatgpt_url": "http://127.0.0.1:%d/backend-api/codex" % port,
                                     "token_url": fake.token_url})
        status, _, body = proxy.request("POST", "/v1/responses", {})
        assert status == 502
        kind, message = error_of(body)
        assert kind == "api_error" and "unreachable" in message

    def test_silent_upstream_is_504(self, make_proxy, fake):
        fake.on("POST", "/backend-api/codex/responses", lambda ex: time.sleep(1.5))
        proxy = make_proxy(limits={"upstream_read_timeout": 0.5})
        started = time.monotonic()
        status, _, body = proxy.request("POST", "/v1/responses", {})
        assert status == 504 and "did not answer" in error_of(body)[1]
        assert time.monotonic() - started < 1.4

    def test_stream_cut_midway_is_visibly_truncated(self, proxy, fake):
        def route(ex):
            ex.start_chunked()
            ex.chunk(sse(message_event()))
            ex.raw(b"ff\r\npartial")
            ex.close()

        fake.on("POST", "/backend-api/codex/responses", route)
        conn = proxy.conn()
        conn.request("POST", "/v1/responses", body=b"{}", headers={"Authorization": "Bearer tok-alice"})
        resp = conn.getresponse()
        assert resp.status == 200
        with pytest.raises(http.client.IncompleteRead) as info:
            resp.read()
        assert b"output_item.done" in info.value.partial

    def test_stalled_stream_is_truncated_after_read_timeout(self, make_proxy, fake):
        def route(ex):
            ex.start_chunked()
            ex.chunk(sse(message_event()))
            time.sleep(1.5)

        fake.on("POST", "/backend-api/codex/responses", route)
        proxy = make_proxy(limits={"upstream_read_timeout": 0.5})
        conn = proxy.conn()
        conn.request("POST", "/v1/responses", body=b"{}", headers={"Authorization": "Bearer tok-alice"})
        resp = conn.getresponse()
        with pytest.raises(http.client.IncompleteRead):
            resp.read()

    def test_client_hanging_up_closes_the_upstream_connection_at_once(self, proxy, fake):
        closed = []

        def route(ex):
            ex.start_chunked()
            ex.chunk(sse({"type": "response.created"}))
            started = time.monotonic()
            if ex.wait_closed_by_peer(timeout=5):
                closed.append(time.monotonic() - started)

        fake.on("POST", "/backend-api/codex/responses", route)
        conn = proxy.conn()
        conn.request("POST", "/v1/responses", body=b"{}", headers={"Authorization": "Bearer tok-alice"})
        resp = conn.getresponse()
        assert b"response.created" in resp.read1(65536)
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        deadline = time.monotonic() + 4
        while not closed and time.monotonic() < deadline:
            time.sleep(0.02)
        assert closed and closed[0] < 2.0

    def test_head_and_204_have_no_body(self, proxy, fake):
        fake.on("DELETE", "/backend-api/codex/thing", lambda ex: ex.send(204, b"", content_type=None))
        status, _, body = proxy.request("DELETE", "/v1/thing")
        assert status == 204 and body == b""
        status, _, _ = proxy.request("GET", "/v1/models")
        assert status == 200
        assert fake.connections == 1

    def test_http10_client_gets_close_delimited_stream(self, proxy, fake):
        raw = raw_exchange(proxy.port, b"POST /v1/responses HTTP/1.0\r\nAuthorization: Bearer tok-alice\r\n"
                                       b"Content-Length: 2\r\n\r\n{}")
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"chunked" not in head.lower()
        assert b"response.completed" in body


# == TestCLI ================================================================

def run_cli(*args, env=None, timeout=20):
    return subprocess.run([sys.executable, OCM_PY] + list(args), capture_output=True, text=True,
                          timeout=timeout, env=env)


class TestCLI:
    def test_version_and_help(self):
        out = run_cli("--version")
        assert out.returncode == 0 and ocm.__version__ in out.stdout
        out = run_cli("--help")
        assert out.returncode == 0 and "--check" in out.stdout and "--log-level" in out.stdout

    def test_check_prints_summary_and_exits_0(self, tmp_path, auth_path):
        config = tmp_path / "c.json"
        config.write_text(json.dumps({"credential_path": str(auth_path), "users": USERS}))
        out = run_cli("--check", str(config))
        assert out.returncode == 0, out.stderr
        assert "ChatGPT OAuth" in out.stdout and "alice, bob" in out.stdout
        assert "acct-123" in out.stdout

    def test_check_exits_2_without_credential(self, tmp_path):
        config = tmp_path / "c.json"
        config.write_text(json.dumps({"credential_path": str(tmp_path / "none.json")}))
        out = run_cli("--check", str(config))
        assert out.returncode == 2 and "not found" in out.stderr

    def test_config_error_exits_2_naming_the_key(self, tmp_path):
        config = tmp_path / "c.json"
        config.write_text(json.dumps({"listen_port": 99999}))
        out = run_cli(str(config))
        assert out.returncode == 2 and "listen_port" in out.stderr

    def test_default_config_uses_codex_home(self, tmp_path, auth_path):
        env = dict(os.environ, CODEX_HOME=str(auth_path.parent))
        out = run_cli("--check", env=env)
        assert out.returncode == 0 and str(auth_path) in out.stdout
        assert "127.0.0.1:8080" in out.stdout


def start_process(config_path, extra_args=()):
    proc = subprocess.Popen([sys.executable, OCM_PY, str(config_path)] + list(extra_args),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "listening on" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
    port = int(line.split("listening on http://127.0.0.1:")[1].split("/")[0])
    return proc, port, line


class TestProcess:
    @pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
    def test_process_serves_and_stops_cleanly_on_signal(self, tmp_path, fake, auth_path, sig):
        config = tmp_path / "config.json"
        config.write_text(json.dumps({
            "listen_port": 0, "credential_path": str(auth_path), "users": USERS,
            "upstream": {"chatgpt_url": fake.chatgpt_url, "token_url": fake.token_url}}))
        proc, port, line = start_process(config)
        try:
            assert "ChatGPT OAuth" in line and "2 users" in line
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("POST", "/v1/responses", body=b"{}", headers={"Authorization": "Bearer tok-bob"})
            resp = conn.getresponse()
            assert resp.status == 200 and b"response.completed" in resp.read()
            conn.close()
            proc.send_signal(sig)
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        assert "tok-bob" not in proc.stderr.read()


# == TestRealCodex: the real Codex CLI against OCM and the fake upstream ====

CODEX_BIN = os.environ.get("OCM_CODEX_BIN", "")
needs_codex = pytest.mark.skipif(not (CODEX_BIN and os.access(CODEX_BIN, os.X_OK)),
                                 reason="set OCM_CODEX_BIN to a Codex CLI binary (npm @openai/codex)")


def run_codex(port, tmp_path, prompt, token="tok-alice", provider_extra=""):
    home = tmp_path / "codex-home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        'model = "gpt-5.3-codex"\nmodel_provider = "ocm"\n\n[model_providers.ocm]\nname = "OCM"\n'
        'base_url = "http://127.0.0.1:%d/v1"\nwire_api = "responses"\nenv_key = "OCM_TOKEN"\n%s'
        % (port, provider_extra))
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    env = dict(os.environ, CODEX_HOME=str(home), OCM_TOKEN=token)
    return subprocess.run([CODEX_BIN, "exec", "--skip-git-repo-check",
                           "--dangerously-bypass-approvals-and-sandbox", prompt],
                          env=env, cwd=str(work), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=120)


@needs_codex
class TestRealCodex:
    def test_codex_completes_a_tool_call_round_trip_through_ocm(self, proxy, fake, tmp_path):
        fake.on("POST", "/backend-api/codex/responses", codex_model)
        out = run_codex(proxy.port, tmp_path, "run the tool and report what it printed")
        assert out.returncode == 0, out.stderr[-2000:]
        assert "the tool printed 42" in out.stdout
        sent = fake.api_requests()
        assert len(sent) == 2 and all(r.header("Authorization", "").startswith("Bearer ey") for r in sent)

    def test_codex_shows_its_usage_limit_message_for_upstream_429(self, proxy, fake, tmp_path):
        fake.on("POST", "/backend-api/codex/responses", lambda ex: ex.json(429, {"error": {
            "type": "usage_limit_reached", "message": "The usage limit has been reached",
            "plan_type": "pro", "resets_at": int(time.time()) + 7200}}))
        out = run_codex(proxy.port, tmp_path, "say hi")
        assert "hit your usage limit" in out.stdout + out.stderr
        assert len(fake.api_requests()) == 1  # Codex does not retry 429

    def test_codex_with_a_wrong_token_is_refused(self, proxy, fake, tmp_path):
        out = run_codex(proxy.port, tmp_path, "say hi", token="tok-wrong")
        assert out.returncode != 0
        assert fake.api_requests() == []
