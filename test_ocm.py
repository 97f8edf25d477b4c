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
import secrets
import shutil
import signal
import socket
import socketserver
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


def free_port():
    """A loopback port nothing listens on (until someone takes it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=5.0):
    """Poll until predicate() holds (True) or timeout seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# What Codex sends, in short: a streamed, unstored Responses request (PROTOCOL.md
# section 4). Anything else a plain Responses client sends is rewritten for the
# ChatGPT backend and answered as JSON (issue 18); Codex's pass byte for byte.
CODEX = {"model": "gpt-5.3-codex", "stream": True, "store": False}
CODEX_BODY = json.dumps(CODEX).encode()


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

    def __init__(self, tls_context=None, host="127.0.0.1"):
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
            disable_nagle_algorithm = True  # or every small write waits 40 ms for an ACK

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

            def server_bind(self):
                # HTTPServer's own calls getfqdn(): a DNS lookup for every test.
                socketserver.TCPServer.server_bind(self)
                self.server_name, self.server_port = self.server_address[:2]

            def process_request(self, request, client_address):
                with fake.lock:
                    fake.connections += 1
                super().process_request(request, client_address)

            def handle_error(self, request, client_address):
                # OCM closing a connection with bytes still unread (a stale pooled
                # one, a stream whose client left) resets it: the handler, back in
                # readline() for the next request, gets ECONNRESET. Expected here;
                # socketserver would print a traceback to stderr for it.
                if isinstance(sys.exc_info()[1], ConnectionError):
                    return
                super().handle_error(request, client_address)

        self.server = Server(("127.0.0.1", 0), Handler)
        if tls_context is not None:  # an HTTPS upstream (handshakes in the accept loop: fine here)
            self.server.socket = tls_context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.url = "%s://%s:%d" % ("https" if tls_context else "http", host, self.port)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.002},
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
        self.thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.002},
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
        if self.thread is None:
            return
        self.server.shutdown()
        self.thread.join(5)
        self.thread = None
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
        # file_check_interval=0: tests change auth.json and expect the next request to see it
        proxy = Proxy(ocm.OCMServer(ocm.config_from_dict(config), file_check_interval=0))
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


def raw_exchange(port, data: bytes, timeout=5.0, read=True) -> bytes:
    """Send raw bytes; return everything until the server closes, resets or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if not read:
            return b""
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except (socket.timeout, ConnectionResetError):
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
        ({"users": [{"name": "a", "token": "replace-with-a-long-random-token-for-alice"}]},
         "users[0].token: still the example's placeholder"),
    ])
    def test_bad_config_names_the_key(self, data, needle):
        with pytest.raises(ocm.ConfigError) as info:
            ocm.config_from_dict(data)
        assert needle in str(info.value)

    def test_the_example_config_is_refused_until_its_tokens_are_replaced(self):
        with open(os.path.join(HERE, "config.example.json")) as f:
            example = json.load(f)
        with pytest.raises(ocm.ConfigError, match=r"users\[0\].token: still the example's placeholder"):
            ocm.config_from_dict(example)
        for user in example["users"]:
            user["token"] = secrets.token_urlsafe(32)
        config = ocm.config_from_dict(example)
        assert [u.name for u in config.users] == ["alice", "bob"] and config.users[1].budgets

    def test_a_short_token_loads_with_a_warning_that_never_shows_it(self, caplog):
        with caplog.at_level(logging.WARNING, logger="ocm"):
            config = ocm.config_from_dict({"users": [{"name": "a", "token": "abc123"},
                                                     {"name": "b", "token": secrets.token_urlsafe(32)}]})
        assert len(config.users) == 2
        assert "users[0].token is only 6 characters" in caplog.text
        assert "users[1]" not in caplog.text and "abc123" not in caplog.text

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

    def test_day_arithmetic_matches_calendar_timegm(self):
        import calendar
        import random
        rng = random.Random(7)
        for _ in range(5000):
            y, m, d = rng.randint(1, 9999), rng.randint(1, 12), rng.randint(1, 28)
            assert ocm.days_since_epoch(y, m, d) * 86400 == calendar.timegm((y, m, d, 0, 0, 0, 0, 0, 0))

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
        status, _, body = proxy.request("POST", "/v1/responses", dict(CODEX, model="m"))
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
        assert message.startswith("credential unavailable: ") and "file is missing" in message
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

class TestFileWatch:
    def test_auth_json_is_looked_at_once_a_second_at_most(self, fake, auth_path, monkeypatch):
        calls = []
        real = ocm._file_id
        monkeypatch.setattr(ocm, "_file_id", lambda path: calls.append(path) or real(path))
        credential = ocm.Credential(str(auth_path), fake.token_url, None)
        for _ in range(50):
            credential.current()
        assert len(calls) == 1
        credential._checked_at -= 1.5
        credential.current()
        assert len(calls) == 2

    def test_a_changed_file_is_seen_within_the_interval(self, fake, auth_path):
        credential = ocm.Credential(str(auth_path), fake.token_url, None, check_interval=0.05)
        first = credential.current().access_token
        fresh = new_access_token()
        write_auth(auth_path, access=fresh)
        time.sleep(0.06)
        assert credential.current().access_token == fresh != first


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

    @pytest.mark.parametrize("path", ["/", "/v2/responses", "/backend-api/codex/responses", "/v1"])
    def test_paths_outside_v1_get_404_and_never_reach_upstream(self, proxy, fake, path):
        status, _, body = proxy.request("POST", path, {})
        assert status == 404 and error_of(body)[0] == "invalid_request_error"
        assert fake.requests == []

    @pytest.mark.parametrize("path", ["/v1/../me", "/v1/%2e%2e/me", "/v1/a%2fb"])
    def test_paths_that_could_escape_the_base_are_refused(self, proxy, fake, path):
        status, _, _ = proxy.request("GET", path)  # /v1/../me is /me: not under /v1/
        assert status in (400, 404) and fake.requests == []

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
        status, headers, got = proxy.request("POST", "/v1/responses", CODEX)
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
        arrived_while_upstream_waited = []

        def route(ex):
            ex.start_chunked()
            for i in range(3):
                ex.chunk(sse({"type": "response.output_text.delta", "delta": str(i)}))
                # The next event is sent only once the client has this one.
                arrived_while_upstream_waited.append(received[i].wait(5))
            ex.chunk(sse(completed_event()))
            ex.end_chunked()

        fake.on("POST", "/backend-api/codex/responses", route)
        conn = proxy.conn()
        conn.request("POST", "/v1/responses", body=CODEX_BODY, headers={"Authorization": "Bearer tok-alice"})
        resp = conn.getresponse()
        assert resp.getheader("Transfer-Encoding") == "chunked"
        assert resp.getheader("Content-Type") == "text/event-stream"
        seen = b""
        for i in range(3):
            while ('"delta": "%d"' % i).encode() not in seen:
                seen += resp.read1(65536)
            assert ('"delta": "%d"' % (i + 1)).encode() not in seen
            received[i].set()
        rest = resp.read()
        assert b"response.completed" in rest
        assert arrived_while_upstream_waited == [True, True, True]

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
        port = free_port()
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
        conn.request("POST", "/v1/responses", body=CODEX_BODY, headers={"Authorization": "Bearer tok-alice"})
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
        conn.request("POST", "/v1/responses", body=CODEX_BODY, headers={"Authorization": "Bearer tok-alice"})
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
        conn.request("POST", "/v1/responses", body=CODEX_BODY, headers={"Authorization": "Bearer tok-alice"})
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
                                       b"Content-Length: %d\r\n\r\n%s" % (len(CODEX_BODY), CODEX_BODY))
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
        for command in ocm.SUBCOMMANDS:  # every command is named in the help
            assert "ocm.py %s" % command in out.stdout.replace("\n", " ").replace("  ", " ")

    def test_output_into_a_closed_pipe_ends_quietly(self, tmp_path):
        """`ocm.py usage FILE | head -1`: no traceback once the reader is gone."""
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            proc = subprocess.run([sys.executable, OCM_PY, "init", "--out", str(tmp_path / "c.json")],
                                  stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=20,
                                  env=dict(os.environ, CODEX_HOME=str(tmp_path)))
        finally:
            os.close(write_end)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr and "Broken pipe" not in proc.stderr

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
    @staticmethod
    def start_copy(tmp_path, fake, auth_path, name, bytecode_cache):
        """Run a copy of ocm.py named ``name`` in tmp_path, with or without a bytecode cache."""
        config = tmp_path / "config.json"
        config.write_text(json.dumps({"listen_port": 0, "credential_path": str(auth_path),
                                      "upstream": {"chatgpt_url": fake.chatgpt_url}}))
        copy = tmp_path / name  # in a writable directory: the bytecode cache can be made
        copy.write_bytes(open(OCM_PY, "rb").read())
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        if bytecode_cache:
            del env["PYTHONDONTWRITEBYTECODE"]
        proc = subprocess.Popen([sys.executable, str(copy), str(config)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
        return proc, copy, config

    @staticmethod
    def stop(proc):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0

    @pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
    def test_server_run_replaces_itself_to_free_the_script_syntax_tree(self, tmp_path, fake, auth_path):
        """`python3 ocm.py config.json` re-executes as a module load (same PID),
        so CPython frees the syntax tree it keeps for scripts (11 MB)."""
        proc, copy, config = self.start_copy(tmp_path, fake, auth_path, "ocm.py", bytecode_cache=True)
        try:
            assert "listening on" in proc.stdout.readline()
            cmdline = open("/proc/%d/cmdline" % proc.pid, "rb").read().split(b"\0")
            assert cmdline[1:3] == [b"-S", b"-c"] and b"SourceFileLoader" in cmdline[3]
            assert str(copy).encode() in cmdline[3] and cmdline[4] == str(config).encode()
            assert b"OCM_REEXECUTED=1" in open("/proc/%d/environ" % proc.pid, "rb").read()
        finally:
            self.stop(proc)

    def test_without_a_bytecode_cache_it_stays_a_script(self, tmp_path, fake, auth_path):
        proc, _, _ = self.start_copy(tmp_path, fake, auth_path, "ocm.py", bytecode_cache=False)
        try:
            assert "listening on" in proc.stdout.readline()
            if sys.platform.startswith("linux"):
                assert b"OCM_REEXECUTED" not in open("/proc/%d/environ" % proc.pid, "rb").read()
        finally:
            self.stop(proc)

    def test_a_renamed_copy_still_runs(self, tmp_path, fake, auth_path):
        proc, _, _ = self.start_copy(tmp_path, fake, auth_path, "ocm-server", bytecode_cache=True)
        try:
            assert "listening on" in proc.stdout.readline()
            if sys.platform.startswith("linux"):
                assert b"OCM_REEXECUTED=1" in open("/proc/%d/environ" % proc.pid, "rb").read()
        finally:
            self.stop(proc)

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
            conn.request("POST", "/v1/responses", body=CODEX_BODY, headers={"Authorization": "Bearer tok-bob"})
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
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        'model = "gpt-5.3-codex"\nmodel_provider = "ocm"\n\n[model_providers.ocm]\nname = "OCM"\n'
        'base_url = "http://127.0.0.1:%d/v1"\nwire_api = "responses"\nenv_key = "OCM_TOKEN"\n%s'
        % (port, provider_extra))
    work = tmp_path / "work"
    work.mkdir(parents=True, exist_ok=True)
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
        out = run_codex(proxy.port, tmp_path, "say hi", token="tok-wrong",
                        provider_extra="request_max_retries = 0\nstream_max_retries = 0\n")
        assert out.returncode != 0
        assert fake.api_requests() == []


# == TestPricing ============================================================

from decimal import ROUND_HALF_UP, Decimal  # noqa: E402

# One sample model per row of shared/pricing.md, with that row's prices as the
# document gives them (input, output, cached). Transcribed independently of
# ocm.PRICE_TABLE so a wrong row in ocm.py shows up here.
PRICING_SAMPLES = [
    ("default", "gpt-5.4-pro", (30.0, 180.0, 30.0)),
    ("default", "gpt-5.4-pro-2026-03-05", (30.0, 180.0, 30.0)),
    ("default", "gpt-5.4", (2.5, 15.0, 0.25)),
    ("default", "gpt-5.4-mini", (2.5, 15.0, 0.25)),
    ("default", "gpt-5.3-codex", (1.75, 14.0, 0.175)),
    ("default", "gpt-5.2-codex", (1.75, 14.0, 0.175)),
    ("default", "gpt-5.1-codex-max", (1.25, 10.0, 0.125)),
    ("default", "gpt-5.1-codex-mini", (0.25, 2.0, 0.025)),
    ("default", "gpt-5.1-codex", (1.25, 10.0, 0.125)),
    ("default", "gpt-5-codex-mini", (0.25, 2.0, 0.025)),
    ("default", "gpt-5-codex", (1.25, 10.0, 0.125)),
    ("default", "gpt-5.2-chat-latest", (1.75, 14.0, 0.175)),
    ("default", "gpt-5.1-chat-latest", (1.25, 10.0, 0.125)),
    ("default", "gpt-5-chat-latest", (1.25, 10.0, 0.125)),
    ("default", "gpt-5.2-pro", (21.0, 168.0, 21.0)),
    ("default", "gpt-5-pro", (15.0, 120.0, 15.0)),
    ("default", "gpt-5-mini", (0.25, 2.0, 0.025)),
    ("default", "gpt-5-nano", (0.05, 0.4, 0.005)),
    ("default", "gpt-5.2", (1.75, 14.0, 0.175)),
    ("default", "gpt-5.1", (1.25, 10.0, 0.125)),
    ("default", "gpt-5", (1.25, 10.0, 0.125)),
    ("default", "o4-mini-deep-research", (2.0, 8.0, 0.5)),
    ("default", "o4-mini", (1.1, 4.4, 0.275)),
    ("default", "o3-pro", (20.0, 80.0, 20.0)),
    ("default", "o3-deep-research", (10.0, 40.0, 2.5)),
    ("default", "o3-mini", (1.1, 4.4, 0.55)),
    ("default", "o3", (2.0, 8.0, 0.5)),
    ("default", "o1-pro", (150.0, 600.0, 150.0)),
    ("default", "o1-mini", (1.1, 4.4, 0.55)),
    ("default", "o1", (15.0, 60.0, 7.5)),
    ("default", "gpt-4o-mini-audio-preview", (0.15, 0.6, 0.15)),
    ("default", "gpt-audio-mini", (0.6, 2.4, 0.6)),
    ("default", "gpt-4o-audio-preview", (2.5, 10.0, 2.5)),
    ("default", "gpt-audio", (2.5, 10.0, 2.5)),
    ("default", "gpt-4.1-nano", (0.1, 0.4, 0.025)),
    ("default", "gpt-4.1-mini", (0.4, 1.6, 0.1)),
    ("default", "gpt-4.1", (2.0, 8.0, 0.5)),
    ("default", "gpt-4o-mini", (0.15, 0.6, 0.075)),
    ("default", "gpt-4o", (2.5, 10.0, 1.25)),
    ("default", "chatgpt-4o-latest", (2.5, 10.0, 1.25)),
    ("flex", "gpt-5.4-pro", (15.0, 90.0, 15.0)),
    ("flex", "gpt-5.4", (1.25, 7.5, 0.125)),
    ("flex", "gpt-5-mini", (0.125, 1.0, 0.0125)),
    ("flex", "gpt-5-nano", (0.025, 0.2, 0.0025)),
    ("flex", "gpt-5.2", (0.875, 7.0, 0.0875)),
    ("flex", "gpt-5.1", (0.625, 5.0, 0.0625)),
    ("flex", "gpt-5", (0.625, 5.0, 0.0625)),
    ("flex", "o4-mini", (0.55, 2.2, 0.138)),
    ("flex", "o3", (1.0, 4.0, 0.25)),
    ("priority", "gpt-5.4", (5.0, 30.0, 0.5)),
    ("priority", "gpt-5.3-codex", (3.5, 28.0, 0.35)),
    ("priority", "gpt-5.2-codex", (3.5, 28.0, 0.35)),
    ("priority", "gpt-5.1-codex-max", (2.5, 20.0, 0.25)),
    ("priority", "gpt-5.1-codex", (2.5, 20.0, 0.25)),
    ("priority", "gpt-5-codex-mini", (0.45, 3.6, 0.045)),
    ("priority", "gpt-5-codex", (2.5, 20.0, 0.25)),
    ("priority", "gpt-5-mini", (0.45, 3.6, 0.045)),
    ("priority", "gpt-5.2", (3.5, 28.0, 0.35)),
    ("priority", "gpt-5.1", (2.5, 20.0, 0.25)),
    ("priority", "gpt-5", (2.5, 20.0, 0.25)),
    ("priority", "o4-mini", (2.0, 8.0, 0.5)),
    ("priority", "o3", (3.5, 14.0, 0.875)),
    ("priority", "gpt-4.1-nano", (0.2, 0.8, 0.05)),
    ("priority", "gpt-4.1-mini", (0.7, 2.8, 0.175)),
    ("priority", "gpt-4.1", (3.5, 14.0, 0.875)),
    ("priority", "gpt-4o-mini", (0.25, 1.0, 0.125)),
    ("priority", "gpt-4o", (4.25, 17.0, 2.125)),
]

TOKEN_MIXES = [(272000, 100000, 200000), (123457, 9876, 100000), (50000, 777, 0)]  # default window


def expected_cost(prices, input_tokens, output_tokens, cached_tokens):
    """Independent: exact decimal arithmetic, halves rounded up, to cents."""
    p_in, p_out, p_cached = (Decimal(str(p)) for p in prices)
    regular = max(0, input_tokens - cached_tokens)
    cost = (regular * p_in + output_tokens * p_out + cached_tokens * p_cached) / Decimal(1000000)
    return float(cost.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


class TestPricing:
    @pytest.mark.parametrize("tier, model, prices", PRICING_SAMPLES)
    @pytest.mark.parametrize("mix", TOKEN_MIXES)
    def test_cost_of_every_row_and_tier(self, tier, model, prices, mix):
        input_tokens, output_tokens, cached = mix
        window = ocm.context_window_for(model, tier, input_tokens)
        got = ocm.round_cents(ocm.raw_cost(input_tokens, output_tokens, cached, model, tier, window))
        assert got == expected_cost(prices, input_tokens, output_tokens, cached)

    @pytest.mark.parametrize("tier, model, premium", [
        ("default", "gpt-5.4", (5.0, 22.5, 0.5)),
        ("default", "gpt-5.4-pro", (60.0, 270.0, 60.0)),
        ("flex", "gpt-5.4", (2.5, 11.25, 0.25)),
        ("flex", "gpt-5.4-pro", (30.0, 135.0, 30.0)),
        ("priority", "gpt-5.4", (10.0, 45.0, 1.0)),
        ("default", "gpt-5.9", (5.0, 22.5, 0.5)),  # normalised to gpt-5.4
    ])
    def test_premium_context_above_272k_input_tokens(self, tier, model, premium):
        assert ocm.context_window_for(model, tier, 272000) == 272000
        assert ocm.context_window_for(model, tier, 272001) == 1050000
        cost = ocm.round_cents(ocm.raw_cost(400000, 20000, 100000, model, tier, 1050000))
        assert cost == expected_cost(premium, 400000, 20000, 100000)

    @pytest.mark.parametrize("tier, model", [("default", "gpt-5.3-codex"), ("default", "o3"),
                                             ("priority", "gpt-5.3-codex"), ("flex", "gpt-5-mini")])
    def test_families_without_premium_keep_the_default_window(self, tier, model):
        assert ocm.context_window_for(model, tier, 900000) == 272000

    @pytest.mark.parametrize("model, priced_as", [
        ("gpt-5.9-codex-mini", (0.25, 2.0, 0.025)),
        ("gpt-5.9-codex-max", (1.25, 10.0, 0.125)),
        ("gpt-5.9-codex", (1.75, 14.0, 0.175)),
        ("gpt-5.9-chat-latest", (1.75, 14.0, 0.175)),
        ("gpt-5.9-pro", (30.0, 180.0, 30.0)),
        ("gpt-5.9-mini", (0.25, 2.0, 0.025)),
        ("gpt-5.9-nano", (0.05, 0.4, 0.005)),
        ("gpt-5.9", (2.5, 15.0, 0.25)),
        ("gpt-5.9-2027-01-01", (2.5, 15.0, 0.25)),
    ])
    def test_unknown_gpt5_names_are_normalised(self, model, priced_as):
        got = ocm.round_cents(ocm.raw_cost(1000000, 100000, 200000, model, "default", 272000))
        assert got == expected_cost(priced_as, 1000000, 100000, 200000)

    @pytest.mark.parametrize("model, tier", [("claude-3", "default"), ("", "default"),
                                             ("llama", "priority"), ("gpt-6", "flex")])
    def test_unknown_families_fall_back_to_gpt4o(self, model, tier):
        got = ocm.round_cents(ocm.raw_cost(1000000, 100000, 200000, model, tier, 272000))
        assert got == expected_cost((2.5, 10.0, 1.25), 1000000, 100000, 200000)

    def test_non_default_tier_falls_back_to_the_default_table(self):
        # flex has no codex row: the default table prices it.
        got = ocm.round_cents(ocm.raw_cost(1000000, 0, 0, "gpt-5.3-codex", "flex", 272000))
        assert got == 1.75

    @pytest.mark.parametrize("tier, expected", [("", "default"), ("auto", "default"), ("default", "default"),
                                                ("scale", "default"), ("turbo", "default"), (None, "default"),
                                                ("flex", "flex"), (" Priority ", "priority")])
    def test_service_tier_normalisation(self, tier, expected):
        assert ocm.normalize_service_tier(tier) == expected

    @pytest.mark.parametrize("value, cents", [(0.125, 0.13), (0.005, 0.01), (0.0049, 0.0), (1.0, 1.0),
                                              (2.675, 2.68), (0.015, 0.02), (123.455, 123.46)])
    def test_rounding_matches_go_math_round(self, value, cents):
        # Go: math.Round(v*100)/100, halves away from zero on the float product.
        scaled = value * 100
        go = (int(scaled) + (1 if scaled - int(scaled) >= 0.5 else 0)) / 100
        assert ocm.round_cents(value) == cents == go


# == TestSSE ================================================================

def scan_all(pieces):
    events = []
    scanner = ocm.SSEScanner(events.append)
    for piece in pieces:
        scanner.feed(piece)
    scanner.finish()
    return events


SAMPLE_STREAM = (
    b"event: response.created\r\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"r1\"}}\r\n\r\n"
    b": keep-alive comment\n\n"
    b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"usage\"}\n\n"
    + sse(message_event("a \"usage\" word"))
    + b"event: response.completed\n"
    + b"data: " + json.dumps(completed_event("r1", "gpt-5.4", 3000, 1000, 50)).encode() + b"\n\n"
)


class TestSSE:
    def test_usage_event_found_once(self):
        events = scan_all([SAMPLE_STREAM])
        # The delta whose text is "usage" passes the cheap gate; only the
        # completed event yields a usage record.
        assert [e["type"] for e in events] == ["response.output_text.delta", "response.completed"]
        records = [r for r in map(ocm.usage_record_from_event, events) if r]
        assert [(r.model, r.input_tokens, r.cached_tokens, r.output_tokens) for r in records] == [
            ("gpt-5.4", 3000, 1000, 50)]

    def test_split_at_every_offset_is_counted_exactly_once(self):
        whole = scan_all([SAMPLE_STREAM])
        for cut in range(1, len(SAMPLE_STREAM)):
            assert scan_all([SAMPLE_STREAM[:cut], SAMPLE_STREAM[cut:]]) == whole, cut

    def test_split_into_three_at_many_offsets(self):
        whole = scan_all([SAMPLE_STREAM])
        n = len(SAMPLE_STREAM)
        for a in range(1, n, 7):
            for b in range(a + 1, n, 11):
                assert scan_all([SAMPLE_STREAM[:a], SAMPLE_STREAM[a:b], SAMPLE_STREAM[b:]]) == whole

    def test_byte_by_byte(self):
        assert scan_all([SAMPLE_STREAM[i:i + 1] for i in range(len(SAMPLE_STREAM))]) == scan_all([SAMPLE_STREAM])

    @pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
    def test_every_line_ending(self, newline):
        stream = SAMPLE_STREAM.replace(b"\r\n", b"\n").replace(b"\n", newline)
        for cut in range(1, len(stream)):
            events = scan_all([stream[:cut], stream[cut:]])
            assert [e["type"] for e in events] == ["response.output_text.delta", "response.completed"]

    def test_multi_line_data_is_joined(self):
        events = scan_all([b'data: {"type": "response.completed",\ndata: "usage": {"input_tokens": 1}}\n\n'])
        assert events == [{"type": "response.completed", "usage": {"input_tokens": 1}}]

    def test_event_without_final_blank_line_still_counts_at_end(self):
        assert len(scan_all([b'data: {"usage": {"prompt_tokens": 3}}\n'])) == 1
        assert len(scan_all([b'data: {"usage": {"prompt_tokens": 3}}'])) == 1

    def test_events_without_usage_are_not_parsed(self, monkeypatch):
        calls = []
        real = json.loads
        monkeypatch.setattr(ocm.json, "loads", lambda s, *a, **k: calls.append(s) or real(s, *a, **k))
        scan_all([sse({"type": "response.output_text.delta", "delta": "x"}) * 50, sse(completed_event())])
        assert len(calls) == 1

    def test_oversized_event_stops_scanning_without_error(self):
        events = []
        scanner = ocm.SSEScanner(events.append, max_event=1000)
        scanner.feed(b"data: " + b"x" * 5000)
        scanner.feed(b"\n\n" + sse(completed_event()))
        assert scanner.broken and events == []

    def test_chat_completion_chunks_with_usage(self):
        stream = (sse({"object": "chat.completion.chunk", "model": "gpt-4o", "choices": [{"delta": {"content": "hi"}}]})
                  + sse({"object": "chat.completion.chunk", "model": "gpt-4o", "choices": [],
                         "usage": {"prompt_tokens": 10, "completion_tokens": 2,
                                   "prompt_tokens_details": {"cached_tokens": 4}}})
                  + b"data: [DONE]\n\n")
        events = scan_all([stream])
        record = ocm.usage_record_from_event(events[0])
        assert (record.model, record.input_tokens, record.output_tokens, record.cached_tokens) == ("gpt-4o", 10, 2, 4)


# == TestUsage ==============================================================

def record(model="gpt-5.3-codex", tier="", input_tokens=100, output_tokens=20, cached=40):
    return ocm.UsageRecord(model, tier, input_tokens, output_tokens, cached)


class TestUsage:
    def test_book_json_matches_the_sing_box_format(self, tmp_path):
        book = ocm.UsageBook(str(tmp_path / "u.json"))
        week = 1795000000
        book.record("alice", record(), week)
        book.record("alice", record(), week)
        book.record("bob", record("gpt-5.4", "priority", 1000000, 100000, 0), week)
        book.record("", record("o3"), None)
        data = book.to_json()
        assert set(data) == {"last_updated", "costs", "combinations"}
        assert ocm.parse_rfc3339(data["last_updated"]) is not None
        combos = {(c["model"], c["service_tier"]): c for c in data["combinations"]}
        codex = combos[("gpt-5.3-codex", "default")]
        assert codex["context_window"] == 272000 and codex["week_start_unix"] == week
        assert codex["total"] == {"request_count": 2, "input_tokens": 200, "output_tokens": 40,
                                  "cached_tokens": 80, "cost_usd": 0.0}
        assert set(codex["by_user"]) == {"alice"}
        o3 = combos[("o3", "default")]
        assert "week_start_unix" not in o3 and o3["by_user"] == {}
        premium = ocm.round_cents(ocm.raw_cost(1000000, 100000, 0, "gpt-5.4", "priority", 1050000))
        assert combos[("gpt-5.4", "priority")]["context_window"] == 1050000
        label = "2026-11-18 11:06:40 UTC+0"  # date -u -d @1795000000
        assert ocm.week_label(week) == label
        assert data["costs"] == {"total_usd": premium, "by_user": {"alice": 0.0, "bob": premium},
                                 "by_week": {label: premium},
                                 "by_user_and_week": {"alice": {label: 0.0}, "bob": {label: premium}}}

    def test_costs_are_rounded_per_combination_then_summed_and_rounded(self, tmp_path):
        book = ocm.UsageBook(str(tmp_path / "u.json"))
        # 0.004 USD each: each combination rounds to 0.0, so the sum is 0.0 (as in sing-box).
        for model in ("gpt-5-nano", "gpt-5-nano-x", "gpt-5-nano-y"):
            book.record("alice", record(model, "", 80000, 0, 0))
        data = book.to_json()
        assert all(c["total"]["cost_usd"] == 0.0 for c in data["combinations"])
        assert data["costs"]["total_usd"] == 0.0

    def test_hundred_threads_recording_give_exact_totals(self, tmp_path):
        book = ocm.UsageBook(str(tmp_path / "u.json"))
        users = ["u%d" % i for i in range(10)]

        def work(i):
            for j in range(200):
                book.record(users[i % 10], record(["gpt-5.4", "o3"][j % 2], "", 7, 3, 2), 1795000000)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(100)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        data = book.to_json()
        total = sum(c["total"]["request_count"] for c in data["combinations"])
        assert total == 100 * 200
        assert sum(c["total"]["input_tokens"] for c in data["combinations"]) == 100 * 200 * 7
        for user in users:
            assert sum(c["by_user"][user]["request_count"] for c in data["combinations"]) == 2000
            assert sum(c["by_user"][user]["cached_tokens"] for c in data["combinations"]) == 4000

    def test_save_and_load_round_trip(self, tmp_path):
        path = str(tmp_path / "u.json")
        book = ocm.UsageBook(path)
        book.record("alice", record("gpt-5.4", "flex", 500000, 1000, 100), 1795000000)
        book.record("bob", record("gpt-5.3-codex", "priority"), None)
        assert book.save()
        again = ocm.UsageBook(path)
        again.load()
        assert again.to_json() == book.to_json()
        again.record("alice", record("gpt-5.4", "flex", 500000, 1000, 100), 1795000000)
        combo = [c for c in again.to_json()["combinations"] if c["model"] == "gpt-5.4"][0]
        assert combo["total"]["request_count"] == 2 and combo["context_window"] == 1050000

    def test_a_sing_box_written_file_carries_on(self, tmp_path):
        path = tmp_path / "usage.json"
        path.write_text(json.dumps({
            "last_updated": "2026-11-20T10:00:00.123456789+08:00",
            "costs": {"total_usd": 9.99, "by_user": {"alice": 9.99}},
            "combinations": [
                {"model": "gpt-5.2-codex", "total": {"request_count": 2, "prompt_tokens": 1000000,
                                                     "completion_tokens": 100000, "cached_tokens": 0},
                 "by_user": {"alice": {"request_count": 2, "prompt_tokens": 1000000,
                                       "completion_tokens": 100000, "cached_tokens": 0}}},
                {"model": "gpt-5.4", "service_tier": "priority", "context_window": 272000,
                 "week_start_unix": 1795000000,
                 "total": {"request_count": 1, "input_tokens": 10, "output_tokens": 1, "cached_tokens": 0,
                           "cost_usd": 0.0}, "by_user": {}},
            ]}))
        book = ocm.UsageBook(str(path))
        book.load()
        book.record("alice", record("gpt-5.2-codex", "", 1000000, 100000, 0), None)
        data = book.to_json()
        codex = [c for c in data["combinations"] if c["model"] == "gpt-5.2-codex"][0]
        assert codex["service_tier"] == "default" and codex["context_window"] == 272000
        assert codex["total"]["request_count"] == 3 and codex["total"]["input_tokens"] == 2000000
        assert codex["by_user"]["alice"]["output_tokens"] == 200000
        assert codex["total"]["cost_usd"] == expected_cost((1.75, 14.0, 0.175), 2000000, 200000, 0)
        assert data["costs"]["by_user"]["alice"] == codex["total"]["cost_usd"]

    def test_corrupt_file_is_moved_aside_and_book_starts_empty(self, tmp_path, caplog):
        path = tmp_path / "usage.json"
        path.write_text('{"combinations": [ truncated')
        book = ocm.UsageBook(str(path))
        with caplog.at_level(logging.ERROR, logger="ocm"):
            book.load()
        aside = [n for n in os.listdir(str(tmp_path)) if n.startswith("usage.json.corrupt-")]
        assert len(aside) == 1
        assert (tmp_path / aside[0]).read_text() == '{"combinations": [ truncated'
        assert not path.exists() and book.to_json()["combinations"] == []
        assert "moved it to" in caplog.text

    def test_saver_thread_saves_when_something_changed(self, tmp_path):
        path = tmp_path / "u.json"
        book = ocm.UsageBook(str(path), save_interval=0.05)
        book.start_saver()
        try:
            time.sleep(0.12)
            assert not path.exists()  # nothing recorded, nothing written
            book.record("alice", record(), None)
            deadline = time.monotonic() + 3
            while not path.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert read_json(path)["combinations"][0]["by_user"]["alice"]["request_count"] == 1
        finally:
            book.close()

    def test_kill_during_save_leaves_old_or_new_file(self, tmp_path):
        path = tmp_path / "usage.json"
        script = (
            "import sys, ocm\n"
            "book = ocm.UsageBook(sys.argv[1])\n"
            "for i in range(3000):\n"
            "    book.record('u%d' % (i % 50), ocm.UsageRecord('model-%d' % i, '', 10, 1, 0), None)\n"
            "book.save()\n"
            "print('ready', flush=True)\n"
            "while True:\n"
            "    book.record('u', ocm.UsageRecord('model-x', '', 10, 1, 0), None)\n"
            "    book.save()\n")
        for attempt in range(5):
            proc = subprocess.Popen([sys.executable, "-c", script, str(path)], cwd=HERE,
                                    stdout=subprocess.PIPE, text=True)
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(0.01 + attempt * 0.021)
            proc.kill()
            proc.wait()
            data = read_json(path)  # never half-written
            assert len(data["combinations"]) >= 3000
        leftovers = [n for n in os.listdir(str(tmp_path)) if n != "usage.json"]
        assert all(n.endswith(".tmp") for n in leftovers)  # at worst an orphaned temp file

    def test_unwritable_location_is_a_clear_error_at_start(self, tmp_path, fake, auth_path):
        config = ocm.config_from_dict({"listen_port": 0, "credential_path": str(auth_path),
                                       "usages_path": str(tmp_path / "missing-dir" / "u.json")})
        with pytest.raises(ocm.ConfigError, match="usages_path: directory .* does not exist"):
            ocm.OCMServer(config)
        not_a_dir = tmp_path / "file"
        not_a_dir.write_text("x")
        config.usages_path = str(not_a_dir / "u.json")
        with pytest.raises(ocm.ConfigError, match="usages_path"):
            ocm.OCMServer(config)

    def test_week_start_from_rate_limit_headers(self):
        headers = ocm.Headers([("x-codex-secondary-reset-at", "1795604800"),
                               ("x-codex-secondary-window-minutes", "10080")])
        assert ocm.week_start_from_headers(headers) == 1795604800 - 10080 * 60
        other = ocm.Headers([("X-Codex-Active-Limit", "codex_other"), ("x-codex-other-secondary-reset-at", "700000"),
                             ("x-codex-other-secondary-window-minutes", "10080"), ("x-codex-secondary-reset-at", "9")])
        assert ocm.week_start_from_headers(other) == 700000 - 604800
        # The week is the window that lasts a week, in whichever position (July 2026: only a weekly primary).
        weekly_primary = ocm.Headers([("x-codex-primary-reset-at", "1795604800"),
                                      ("x-codex-primary-window-minutes", "10080")])
        assert ocm.week_start_from_headers(weekly_primary) == 1795604800 - 10080 * 60
        monthly = ocm.Headers([("x-codex-primary-reset-at", "1795604800"), ("x-codex-primary-window-minutes", "43200")])
        assert ocm.week_start_from_headers(monthly) is None
        assert ocm.week_start_from_headers(ocm.Headers()) is None


# == TestAccounting: usage recorded through the relay =======================

RATE_HEADERS = {"x-codex-secondary-reset-at": "1795604800", "x-codex-secondary-window-minutes": "10080",
                "x-codex-primary-used-percent": "12"}
WEEK = 1795604800 - 10080 * 60


@pytest.fixture
def tracked(make_proxy, tmp_path):
    """A proxy with a usage file; returns (proxy, usage path)."""
    path = tmp_path / "usage.json"
    return make_proxy(usages_path=str(path)), path


def combos_of(book, expect=1):
    """The book's combinations, once ``expect`` responses were recorded: usage
    is recorded just after the client got its bytes, so wait briefly for it."""
    deadline = time.monotonic() + 5
    while True:
        combos = book.to_json()["combinations"]
        if sum(c["total"]["request_count"] for c in combos) >= expect or time.monotonic() > deadline:
            return {(c["model"], c["service_tier"], c.get("week_start_unix")): c for c in combos}
        time.sleep(0.01)


class TestAccounting:
    def test_sse_completed_event_is_counted_for_the_user(self, tracked, fake):
        proxy, path = tracked
        stream = sse(message_event(), completed_event("r1", "gpt-5.4", 3000, 1000, 50, service_tier="priority"))
        fake.on("POST", "/backend-api/codex/responses", lambda ex: ex.stream(stream, RATE_HEADERS))
        status, _, body = proxy.request("POST", "/v1/responses", dict(CODEX, model="gpt-5.4"), token="tok-bob")
        assert status == 200 and body == stream  # relayed byte for byte
        combo = combos_of(proxy.server.usage)[("gpt-5.4", "priority", WEEK)]
        assert combo["by_user"]["bob"] == {"request_count": 1, "input_tokens": 3000, "output_tokens": 50,
                                           "cached_tokens": 1000,
                                           "cost_usd": expected_cost((5.0, 30.0, 0.5), 3000, 50, 1000)}

    def test_event_split_across_upstream_writes_is_counted_once(self, tracked, fake):
        proxy, _ = tracked
        stream = sse(message_event(), completed_event("r1", "gpt-5.4", 3000, 1000, 50))

        def route(ex):
            ex.start_chunked()
            for i in range(0, len(stream), 7):
                ex.chunk(stream[i:i + 7])
            ex.end_chunked()

        fake.on("POST", "/backend-api/codex/responses", route)
        assert proxy.request("POST", "/v1/responses", CODEX)[2] == stream
        combos = combos_of(proxy.server.usage)
        assert combos[("gpt-5.4", "default", None)]["total"]["request_count"] == 1

    def test_model_and_tier_fall_back_to_the_request(self, tracked, fake):
        proxy, _ = tracked
        event = completed_event("r1", "gpt-5.4", 10, 0, 1)
        del event["response"]["model"]
        fake.on("POST", "/backend-api/codex/responses", lambda ex: ex.stream(sse(event)))
        proxy.request("POST", "/v1/responses", {"model": "gpt-5.1-codex-max", "service_tier": "flex"})
        assert ("gpt-5.1-codex-max", "flex", None) in combos_of(proxy.server.usage)

    def test_fallback_reads_the_ends_of_a_released_big_body(self, tracked, fake):
        proxy, _ = tracked
        event = completed_event("r1", "x", 10, 0, 1)
        del event["response"]["model"]
        fake.on("POST", "/backend-api/codex/responses", lambda ex: ex.stream(sse(event)))
        body = {"model": "gpt-5.2-codex", "input": [{"text": "y" * 200000}], "service_tier": "priority"}
        proxy.request("POST", "/v1/responses", body)
        assert ("gpt-5.2-codex", "priority", None) in combos_of(proxy.server.usage)

    def test_non_streaming_json_is_counted(self, tracked, fake):
        proxy, _ = tracked
        fake.on("POST", "/backend-api/codex/responses", lambda ex: ex.json(200, dict(
            completed_event("r1", "o3", 500, 100, 20)["response"], object="response"), RATE_HEADERS))
        assert proxy.request("POST", "/v1/responses", {"model": "o3", "stream": False})[0] == 200
        assert combos_of(proxy.server.usage)[("o3", "default", WEEK)]["by_user"]["alice"]["input_tokens"] == 500

    def test_chat_completions_in_api_key_mode(self, make_proxy, fake, auth_path, tmp_path):
        auth_path.write_text(json.dumps({"auth_mode": "apikey", "OPENAI_API_KEY": "sk-owner"}))
        proxy = make_proxy(usages_path=str(tmp_path / "u.json"))
        fake.on("POST", "/v1/chat/completions", lambda ex: ex.json(200, {
            "object": "chat.completion", "model": "gpt-4o-2024-08-06", "choices": [],
            "usage": {"prompt_tokens": 30, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 10}}}))
        proxy.request("POST", "/v1/chat/completions", {"model": "gpt-4o"})
        chunks = (sse({"object": "chat.completion.chunk", "model": "gpt-4o-mini", "choices": [{"delta": {}}]})
                  + sse({"object": "chat.completion.chunk", "model": "gpt-4o-mini", "choices": [],
                         "usage": {"prompt_tokens": 7, "completion_tokens": 3}}) + b"data: [DONE]\n\n")
        fake.on("POST", "/v1/chat/completions", lambda ex: ex.stream(chunks))
        proxy.request("POST", "/v1/chat/completions", {"model": "gpt-4o-mini", "stream": True})
        combos = combos_of(proxy.server.usage, expect=2)
        assert combos[("gpt-4o-2024-08-06", "default", None)]["total"]["cached_tokens"] == 10
        assert combos[("gpt-4o-mini", "default", None)]["total"]["output_tokens"] == 3

    def test_errors_and_other_paths_are_not_counted(self, tracked, fake):
        proxy, _ = tracked
        fake.on("POST", "/backend-api/codex/responses", lambda ex: ex.json(429, {"usage": {"input_tokens": 9}}))
        proxy.request("POST", "/v1/responses", {})
        fake.on("GET", "/backend-api/codex/models", lambda ex: ex.json(200, {"usage": {"input_tokens": 9}}))
        proxy.request("GET", "/v1/models")
        proxy.close()  # waits for requests in flight: anything recorded is in now
        assert proxy.server.usage.to_json()["combinations"] == []

    def test_mixed_run_then_sigterm_leaves_an_exact_file(self, tmp_path, fake, auth_path):
        """The issue's 'done when': several users, models, tiers, streaming and
        not; after SIGTERM every number matches an independent calculation."""
        usage_path = tmp_path / "usage.json"
        config = tmp_path / "config.json"
        config.write_text(json.dumps({
            "listen_port": 0, "credential_path": str(auth_path), "users": USERS, "usages_path": str(usage_path),
            "upstream": {"chatgpt_url": fake.chatgpt_url, "token_url": fake.token_url}}))
        plan = [  # user, model, tier, input, cached, output, streaming
            ("alice", "gpt-5.3-codex", "default", 120000, 80000, 3000, True),
            ("alice", "gpt-5.3-codex", "default", 130000, 90000, 2500, True),
            ("bob", "gpt-5.3-codex", "priority", 50000, 0, 1000, True),
            ("bob", "gpt-5.4", "default", 400000, 100000, 20000, False),
            ("alice", "gpt-5.4", "flex", 10000, 5000, 700, False),
            ("bob", "o4-mini", "flex", 9999, 1111, 333, True),
        ]

        def route(ex):
            body = ex.request.json()
            user, model, tier, inp, cached, out, streaming = plan[body["i"]]
            event = completed_event("r%d" % body["i"], model, inp, cached, out, service_tier=tier)
            if streaming:
                ex.stream(sse(message_event(), event), RATE_HEADERS)
            else:
                ex.json(200, event["response"], RATE_HEADERS)

        fake.on("POST", "/backend-api/codex/responses", route)
        proc, port, _ = start_process(config)
        try:
            for i, (user, model, tier, _, _, _, streaming) in enumerate(plan):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("POST", "/v1/responses", body=json.dumps({"i": i, "model": model, "stream": streaming}),
                             headers={"Authorization": "Bearer tok-" + user})
                assert conn.getresponse().read()
                conn.close()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
        data = read_json(usage_path)
        prices = {("gpt-5.3-codex", "default"): (1.75, 14.0, 0.175), ("gpt-5.3-codex", "priority"): (3.5, 28.0, 0.35),
                  ("gpt-5.4", "default"): (5.0, 22.5, 0.5),  # 400k input: premium context
                  ("gpt-5.4", "flex"): (1.25, 7.5, 0.125), ("o4-mini", "flex"): (0.55, 2.2, 0.138)}
        expected_combos = {}
        for user, model, tier, inp, cached, out, _ in plan:
            combo = expected_combos.setdefault((model, tier), {"total": [0, 0, 0, 0], "users": {}})
            for counts in (combo["total"], combo["users"].setdefault(user, [0, 0, 0, 0])):
                counts[0] += 1
                counts[1] += inp
                counts[2] += out
                counts[3] += cached
        label = "2026-11-18 11:06:40 UTC+0"
        total_usd, by_user = Decimal(0), {}
        assert len(data["combinations"]) == len(expected_combos)
        for c in data["combinations"]:
            want = expected_combos[(c["model"], c["service_tier"])]
            price = prices[(c["model"], c["service_tier"])]
            n, inp, out, cached = want["total"]
            assert c["week_start_unix"] == WEEK
            assert c["context_window"] == (1050000 if c["model"] == "gpt-5.4" and inp > 272000 else 272000)
            assert c["total"] == {"request_count": n, "input_tokens": inp, "output_tokens": out,
                                  "cached_tokens": cached, "cost_usd": expected_cost(price, inp, out, cached)}
            total_usd += Decimal(str(c["total"]["cost_usd"]))
            for user, (n, inp, out, cached) in want["users"].items():
                cost = expected_cost(price, inp, out, cached)
                assert c["by_user"][user] == {"request_count": n, "input_tokens": inp, "output_tokens": out,
                                              "cached_tokens": cached, "cost_usd": cost}
                by_user[user] = by_user.get(user, Decimal(0)) + Decimal(str(cost))
        assert data["costs"]["total_usd"] == float(total_usd)
        assert data["costs"]["by_user"] == {u: float(v) for u, v in by_user.items()}
        assert data["costs"]["by_week"] == {label: float(total_usd)}
        assert data["costs"]["by_user_and_week"] == {u: {label: float(v)} for u, v in by_user.items()}
        assert ocm.week_label(WEEK) == label

        report = run_cli("usage", str(config))
        assert report.returncode == 0, report.stderr
        assert "alice" in report.stdout and "gpt-5.4 (default, 1M context)" in report.stdout
        assert "$%.2f" % float(total_usd) in report.stdout
        as_json = json.loads(run_cli("usage", "--json", str(usage_path)).stdout)
        assert as_json["total"]["cost_usd"] == float(total_usd)
        assert as_json["users"]["bob"]["cost_usd"] == float(by_user["bob"])
        assert as_json["weeks"][label]["request_count"] == len(plan)


class TestShutdown:
    def test_stream_in_flight_finishes_and_is_counted(self, tracked, fake):
        proxy, path = tracked
        first_sent = threading.Event()

        def route(ex):
            ex.start_chunked()
            ex.chunk(sse(message_event()))
            first_sent.set()
            time.sleep(0.3)
            ex.chunk(sse(completed_event("r1", "gpt-5.4", 100, 0, 10)))
            ex.end_chunked()

        fake.on("POST", "/backend-api/codex/responses", route)
        result = []
        t = threading.Thread(target=lambda: result.append(proxy.request("POST", "/v1/responses", CODEX)))
        t.start()
        assert first_sent.wait(5)
        proxy.close()
        t.join(5)
        assert result[0][0] == 200 and b"response.completed" in result[0][2]
        assert read_json(path)["combinations"][0]["total"]["request_count"] == 1

    def test_idle_keep_alive_connections_are_closed_at_once(self, proxy, fake):
        conn = proxy.conn()
        conn.request("GET", "/v1/models", headers={"Authorization": "Bearer tok-alice"})
        conn.getresponse().read()
        started = time.monotonic()
        proxy.close()
        assert time.monotonic() - started < 1.0
        conn.sock.settimeout(2)
        assert conn.sock.recv(10) == b""


class TestUsageReport:
    def test_report_needs_an_existing_file(self, tmp_path):
        out = run_cli("usage", str(tmp_path / "nothing.json"))
        assert out.returncode == 2 and "cannot read" in out.stderr

    def test_report_from_a_config_without_usages_path(self, tmp_path):
        config = tmp_path / "c.json"
        config.write_text(json.dumps({"listen_port": 1}))
        out = run_cli("usage", str(config))
        assert out.returncode == 2 and "no usages_path" in out.stderr

    def test_report_does_not_touch_a_damaged_file(self, tmp_path):
        path = tmp_path / "u.json"
        path.write_text('{"combinations": [1, 2')
        out = run_cli("usage", str(path))
        assert out.returncode == 2 and path.read_text() == '{"combinations": [1, 2'
