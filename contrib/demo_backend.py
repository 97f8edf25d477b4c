#!/usr/bin/env python3
"""A fake ChatGPT backend: try OCM without a subscription, and test against it.

    python3 contrib/demo_backend.py --demo    the demo (`make demo`): this fake,
                                              OCM in front of it, and the Codex
                                              command to run; Ctrl-C stops all
    python3 contrib/demo_backend.py [--port N]  only the fake backend

It answers with canned text, and behaves like the real backend where a relay
can tell (PROTOCOL.md sections 3, 5, 7 and 9): ``POST /backend-api/codex/responses``
takes streamed, unstored requests only (``"stream": true`` and ``"store": false``,
else 400 ``{"detail": "Stream must be set to true"}`` / ``"Store must be set to
false"``), refuses ``max_output_tokens``, ``metadata``, ``user``, ``temperature``
and ``top_p`` (400 ``Unsupported parameter: ...``), wants a bearer access token
that has not expired (else 401), and streams SSE whose ``response.completed``
carries an empty ``output`` with the usage; the output items come in
``response.output_item.done`` events. It also has the token endpoint
(``POST /oauth/token``, rotating refresh tokens) and the usage endpoint
(``GET /backend-api/wham/usage``), so OCM runs against it as against OpenAI.

The default model (``canned_model``) shows an agent's round trip: when the
request offers tools (as Codex's do), the first turn asks for a call of Codex's
shell tool ``exec_command``, and the next turn answers with what the command
printed. Without tools it answers with one line of text.

Importable (standard library only, Python 3.8+), for tests and scripted fakes:

    DemoBackend(model=None, port=0, refresh_tokens=())  a running fake on 127.0.0.1, in a thread;
                                       .url .chatgpt_url .token_url .requests .close()
    model(body) -> items | (status, obj) what a scripted model returns for one
                                       request: output items, or an error answer
    canned_model(body)                 the default model, described above
    check_request(body) -> str or None the backend's 400 message for a body
    message_item(text), function_call_item(name, arguments, call_id)
    response_events(items, body)       the SSE events the backend streams for items
    sse(events) -> bytes
    rate_limit_headers(started), usage_document(started)  the account's windows
    make_jwt(claims), new_tokens(), write_fake_auth(path, ...)  unsigned logins (OCM reads
                                       claims only); add a refresh token to
                                       ``backend.valid_refresh`` to let OCM refresh it
    demo_config(backend, auth_path, token_digest, directory, port)  an OCM config for it
    run_demo(argv)                     what `make demo` runs
"""

import argparse
import base64
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))
OCM_PY = os.path.join(os.path.dirname(HERE), "ocm.py")

CODEX_PATH = "/backend-api/codex"
RESPONSES_PATH = CODEX_PATH + "/responses"
USAGE_PATH = "/backend-api/wham/usage"
TOKEN_PATH = "/oauth/token"
OAUTH_CLIENT_ID = "app_EMoamEEZ73f0CkXaXp7hrann"
DEMO_MODEL = "gpt-5.3-codex"
DEMO_ACCOUNT = "demo-account"
# What the real backend refuses (PROTOCOL.md section 9): peers drop these.
REFUSED_PARAMETERS = ("max_output_tokens", "max_tokens", "max_completion_tokens", "metadata",
                      "user", "temperature", "top_p")
TOOL_COMMAND = "echo demo-tool-says-$((40+2))"
TOOL_OUTPUT = "demo-tool-says-42"


# == Logins =================================================================

def _b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def make_jwt(claims):
    """An unsigned JWT: OCM reads a token's claims (exp, account, plan) and never verifies it."""
    header = _b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return "%s.%s.%s" % (header, _b64url(json.dumps(claims).encode()), _b64url(b"unsigned"))


def jwt_claims(token):
    try:
        payload = token.split(".")[1]
        return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return {}


def new_tokens(expires_in=3600, account_id=DEMO_ACCOUNT, plan="plus",
               email="demo@example.invalid"):
    """What the token endpoint hands out: id, access (expiring) and refresh tokens."""
    auth = {"chatgpt_account_id": account_id, "chatgpt_plan_type": plan}
    return {"id_token": make_jwt({"email": email, "https://api.openai.com/auth": auth}),
            "access_token": make_jwt({"exp": int(time.time() + expires_in),
                                      "jti": secrets.token_hex(8),
                                      "https://api.openai.com/auth": auth}),
            "refresh_token": "rt_demo_" + secrets.token_urlsafe(12)}


def write_fake_auth(path, expires_in=3600, account_id=DEMO_ACCOUNT, plan="plus"):
    """A throwaway ChatGPT login in Codex's auth.json format (mode 0600).
    Returns its refresh token, which a DemoBackend must be told to accept."""
    tokens = dict(new_tokens(expires_in, account_id, plan), account_id=account_id)
    data = {"auth_mode": "chatgpt", "OPENAI_API_KEY": None, "tokens": tokens,
            "last_refresh": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
    return tokens["refresh_token"]


# == What the backend streams ================================================

def message_item(text):
    return {"type": "message", "role": "assistant", "id": "msg_" + secrets.token_hex(8),
            "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def function_call_item(name, arguments, call_id=None):
    return {"type": "function_call", "id": "fc_" + secrets.token_hex(8), "status": "completed",
            "call_id": call_id or "call_" + secrets.token_hex(8), "name": name,
            "arguments": json.dumps(arguments)}


def offers_tools(body):
    """Whether a request offers tools: Codex puts them in ``tools``, or (code mode,
    newer models) in an ``additional_tools`` input item."""
    items = body.get("input") if isinstance(body.get("input"), list) else []
    return bool(body.get("tools")) or any(
        isinstance(item, dict) and item.get("type") == "additional_tools" for item in items)


def canned_model(body):
    """The demo's model: a call of Codex's shell tool ``exec_command`` when tools are
    offered, then an answer that quotes the tool's output; text for a client without tools."""
    items = body.get("input") if isinstance(body.get("input"), list) else []
    outputs = [item for item in items
               if isinstance(item, dict) and item.get("type") == "function_call_output"]
    if outputs:
        output = outputs[-1].get("output")
        text = output if isinstance(output, str) else json.dumps(output)
        if TOOL_OUTPUT in text:
            return [message_item("Hello from OCM's demo backend: this answer came through OCM, "
                                 "and the tool printed %s." % TOOL_OUTPUT)]
        return [message_item("Hello from OCM's demo backend: the tool did not print what I "
                             "expected. It said: " + text[:300])]
    if offers_tools(body):
        return [function_call_item("exec_command", {"cmd": TOOL_COMMAND})]
    return [message_item("Hello from OCM's demo backend: this canned answer came through OCM.")]


def check_request(body):
    """The real backend's 400 message for a /responses body it refuses, or None."""
    if not isinstance(body, dict):
        return "Invalid request body"
    if body.get("stream") is not True:
        return "Stream must be set to true"
    if body.get("store") is not False:
        return "Store must be set to false"
    for name in REFUSED_PARAMETERS:
        if name in body:
            return "Unsupported parameter: " + name
    return None


def _estimate_tokens(value):
    return max(1, len(json.dumps(value)) // 4)


def response_events(items, body):
    """The stream for one turn, as the backend sends it: created, each item added,
    text deltas and done, then completed with an empty output and the usage."""
    response_id = "resp_" + secrets.token_hex(12)
    model = body.get("model") or DEMO_MODEL
    head = {"id": response_id, "object": "response", "model": model, "status": "in_progress",
            "output": []}
    events = [{"type": "response.created", "response": head},
              {"type": "response.in_progress", "response": head}]
    for index, item in enumerate(items):
        events.append({"type": "response.output_item.added", "output_index": index,
                       "item": dict(item, status="in_progress")})
        if item.get("type") == "message":
            text = "".join(part.get("text", "") for part in item.get("content", []))
            for word in text.split(" "):
                events.append({"type": "response.output_text.delta", "item_id": item.get("id"),
                               "output_index": index, "content_index": 0,
                               "delta": word if word == text.split(" ")[-1] else word + " "})
        events.append({"type": "response.output_item.done", "output_index": index, "item": item})
    input_tokens, output_tokens = _estimate_tokens(body.get("input")), _estimate_tokens(items)
    usage = {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0},
             "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
             "total_tokens": input_tokens + output_tokens}
    events.append({"type": "response.completed", "response": dict(
        head, status="completed", output=[], usage=usage,
        service_tier=body.get("service_tier") or "default")})
    return events


def sse(events):
    return b"".join(b"event: %s\ndata: %s\n\n" % (e["type"].encode(), json.dumps(e).encode())
                    for e in events)


def rate_limit_headers(started):
    """The headers every answer carries: the account's windows (PROTOCOL.md section 7),
    a 5-hour and a weekly one that began at ``started`` (the usage file's week)."""
    return {"x-codex-primary-used-percent": "3", "x-codex-primary-window-minutes": "300",
            "x-codex-primary-reset-at": str(int(started) + 5 * 3600),
            "x-codex-secondary-used-percent": "1", "x-codex-secondary-window-minutes": "10080",
            "x-codex-secondary-reset-at": str(int(started) + 7 * 86400)}


def usage_document(started, now=None):
    """GET /backend-api/wham/usage: the plan and both windows, as the backend answers."""
    now = time.time() if now is None else now

    def window(percent, seconds):
        reset_at = int(started) + seconds
        return {"used_percent": percent, "limit_window_seconds": seconds,
                "reset_after_seconds": max(0, int(reset_at - now)), "reset_at": reset_at}

    return {"plan_type": "plus", "rate_limit": {
        "allowed": True, "limit_reached": False,
        "primary_window": window(3, 5 * 3600), "secondary_window": window(1, 7 * 86400)},
        "credits": {"has_credits": False, "unlimited": False, "balance": "0"}}


# == The server ==============================================================

class DemoBackend:
    """The fake on 127.0.0.1 (port 0: any free one), served from a daemon thread.

    ``model(body)`` answers each accepted /responses request (``canned_model``
    unless given). Every request is recorded in ``requests`` as (method, path,
    headers dict with lower-case names, parsed JSON body or None). Refresh
    tokens rotate as OpenAI's do: a used one gets 401 ``refresh_token_reused``.
    """

    def __init__(self, model=None, host="127.0.0.1", port=0, refresh_tokens=()):
        self.model = model or canned_model
        self.started = time.time()  # the rate-limit windows begin now
        self.requests = []
        self.lock = threading.Lock()
        self.valid_refresh = set(refresh_tokens)
        self.used_refresh = set()
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args):
                pass

            def do_GET(self):
                backend.handle(self)

            do_POST = do_GET

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def server_bind(self):  # no getfqdn() DNS lookup
                socketserver.TCPServer.server_bind(self)
                self.server_name, self.server_port = self.server_address[:2]

        self.server = Server((host, port), Handler)
        self.port = self.server.server_address[1]
        self.url = "http://%s:%d" % (host, self.port)
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, name="demo-backend",
                                       daemon=True)
        self.thread.start()

    @property
    def chatgpt_url(self):
        return self.url + CODEX_PATH

    @property
    def token_url(self):
        return self.url + TOKEN_PATH

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    # -- answering -----------------------------------------------------------
    def handle(self, h):
        raw = self.read_body(h)
        path = h.path.split("?", 1)[0]
        try:
            body = json.loads(raw.decode("utf-8")) if raw else None
        except ValueError:
            body = None
        with self.lock:
            headers = {k.lower(): v for k, v in h.headers.items()}
            self.requests.append((h.command, path, headers, body))
        if (h.command, path) == ("POST", TOKEN_PATH):
            return self.token(h, body)
        if not self.authorized(h):
            return self.send_json(h, 401, {"detail": "Unauthorized"})
        if (h.command, path) == ("POST", RESPONSES_PATH):
            return self.responses(h, raw, body)
        if (h.command, path) == ("GET", USAGE_PATH):
            return self.send_json(h, 200, usage_document(self.started))
        self.send_json(h, 404, {"detail": "Not Found"})

    @staticmethod
    def read_body(h):
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(h.rfile.readline().split(b";")[0], 16)
                if not size:
                    h.rfile.readline()
                    return b"".join(chunks)
                chunks.append(h.rfile.read(size))
                h.rfile.readline()
        length = int(h.headers.get("Content-Length") or 0)
        return h.rfile.read(length) if length else b""

    @staticmethod
    def authorized(h):
        """A bearer access token that has not expired, as the backend wants."""
        scheme, _, token = (h.headers.get("Authorization") or "").partition(" ")
        exp = jwt_claims(token.strip()).get("exp") if scheme.lower() == "bearer" else None
        return isinstance(exp, (int, float)) and exp > time.time()

    def responses(self, h, raw, body):
        if body is None:
            return self.send_json(h, 400, {"detail": "Invalid JSON" if raw else "Missing body"})
        problem = check_request(body)
        if problem:
            return self.send_json(h, 400, {"detail": problem})
        answer = self.model(body)
        if isinstance(answer, tuple):  # a scripted error: (status, JSON object)
            return self.send_json(h, answer[0], answer[1])
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        for name, value in rate_limit_headers(self.started).items():
            h.send_header(name, value)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        for event in response_events(answer, body):  # one event a chunk, as a stream goes
            data = sse([event])
            h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        h.wfile.write(b"0\r\n\r\n")

    def token(self, h, body):
        """The OAuth refresh grant; refresh tokens are single-use, as OpenAI's."""
        body = body if isinstance(body, dict) else {}
        refresh = body.get("refresh_token")
        if body.get("grant_type") != "refresh_token" or body.get("client_id") != OAUTH_CLIENT_ID:
            return self.send_json(h, 400, {"error": {"message": "unsupported request",
                                                     "type": "invalid_request_error",
                                                     "code": "invalid_request"}})
        with self.lock:
            known, used = refresh in self.valid_refresh, refresh in self.used_refresh
            if known:
                self.valid_refresh.discard(refresh)
                self.used_refresh.add(refresh)
                tokens = new_tokens()
                self.valid_refresh.add(tokens["refresh_token"])
        if used:
            return self.send_json(h, 401, {"error": {
                "message": "Your refresh token has already been used.",
                "type": "invalid_request_error", "code": "refresh_token_reused"}})
        if not known:
            return self.send_json(h, 401, {"error": {"message": "Invalid refresh token.",
                                                     "type": "invalid_request_error",
                                                     "code": "refresh_token_invalidated"}})
        self.send_json(h, 200, tokens)

    @staticmethod
    def send_json(h, status, obj):
        data = json.dumps(obj).encode("utf-8")
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)


# == The demo ================================================================

def demo_config(backend, auth_path, token_digest, directory, port=0):
    """OCM's config for the demo: loopback only, one person, usage counted, OpenAI replaced."""
    return {"listen": "127.0.0.1", "listen_port": port, "credential_path": auth_path,
            "usages_path": os.path.join(directory, "usage.json"),
            "users": [{"name": "demo", "token": token_digest}],
            "upstream": {"chatgpt_url": backend.chatgpt_url, "token_url": backend.token_url,
                         "issuer_url": backend.url}}


PROVIDER_BLOCK = ('[model_providers.ocm]\nname = "OCM"\nbase_url = "%s"\nwire_api = "responses"\n'
                  'env_key = "OCM_TOKEN"\n')


def codex_command(codex_home, token):
    """The command the demo prints: the README's client command, with the demo's Codex home."""
    return ("CODEX_HOME=%s OCM_TOKEN=%s codex exec --skip-git-repo-check -c model_provider=ocm "
            '"say hi" < /dev/null' % (codex_home, token))


def curl_command(base_url, token):
    return ("curl -sN %s/responses -H 'Authorization: Bearer %s' "
            "-d '{\"stream\": true, \"store\": false, \"input\": \"hi\"}'" % (base_url, token))


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _interrupt(_signum, _frame):
    raise KeyboardInterrupt


def run_demo(argv=None):
    """Start the fake and OCM, print how to point Codex at them, wait for Ctrl-C."""
    parser = argparse.ArgumentParser(prog="make demo", description=run_demo.__doc__)
    parser.add_argument("--port", type=int, default=0, help="OCM's port (default: any free one)")
    args = parser.parse_args(argv)
    directory = tempfile.mkdtemp(prefix="ocm-demo-")
    backend = ocm = None
    signal.signal(signal.SIGTERM, _interrupt)  # as Ctrl-C: everything stops, the files go
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    try:
        auth_path = os.path.join(directory, "box", "auth.json")
        # A login that expires within the 5 minutes OCM refreshes ahead: the first
        # request also shows a token refresh against the fake token endpoint.
        backend = DemoBackend(refresh_tokens=[write_fake_auth(auth_path, expires_in=120)])
        token = "ocm-demo-" + secrets.token_urlsafe(16)
        digest = "sha256:" + hashlib.sha256(token.encode()).hexdigest()
        config_path = os.path.join(directory, "config.json")
        # A port in the config, not 0: `ocm.py usage` then finds the running OCM.
        port = args.port or free_port()
        with open(config_path, "w") as fh:
            json.dump(demo_config(backend, auth_path, digest, directory, port), fh, indent=2)
        ocm = subprocess.Popen([sys.executable, OCM_PY, config_path], stdout=subprocess.PIPE,
                               universal_newlines=True)
        line = ocm.stdout.readline()
        if "listening on " not in line:
            print("ocm: the demo's OCM did not start (see above)", file=sys.stderr)
            return 1
        base_url = line.split("listening on ", 1)[1].split()[0]
        client_home = os.path.join(directory, "codex")
        os.makedirs(client_home)
        block = PROVIDER_BLOCK % base_url
        with open(os.path.join(client_home, "config.toml"), "w") as fh:
            fh.write(block)
        print(DEMO_TEXT % {"backend": backend.url, "line": line.strip(), "block": block,
                           "home": client_home, "codex": codex_command(client_home, token),
                           "curl": curl_command(base_url, token), "config": config_path,
                           "dashboard": base_url[:-len("/v1")] + "/ocm/"},
              flush=True)
        ocm.wait()
        return 0 if ocm.returncode == 0 else 1
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if ocm is not None:
            if ocm.poll() is None:
                ocm.send_signal(signal.SIGTERM)
            ocm.wait()
        if backend is not None:
            backend.close()
        shutil.rmtree(directory, ignore_errors=True)
        print("Demo stopped; its files are gone.", flush=True)


DEMO_TEXT = """\
OCM demo: a fake ChatGPT backend with canned answers on %(backend)s (no account needed),
and OCM in front of it: %(line)s

The Codex provider block (already in %(home)s/config.toml;
add it to ~/.codex/config.toml to use OCM from your own Codex home):

%(block)s
In another terminal, with the Codex CLI installed (npm install -g @openai/codex), run:

  %(codex)s

The demo's model asks Codex to run a harmless shell command (echo), then answers
with what it printed: an agent's round trip through OCM. Without Codex:

  %(curl)s

Who used what, live: python3 ocm.py usage %(config)s
At a glance, in a browser on this machine: %(dashboard)s

OCM's log follows (one line per request). Ctrl-C stops the demo.
"""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--demo" in argv:
        return run_demo([a for a in argv if a != "--demo"])
    parser = argparse.ArgumentParser(description="A fake ChatGPT backend with canned answers.")
    parser.add_argument("--port", type=int, default=8081, help="port on 127.0.0.1 (default: 8081)")
    parser.add_argument("--auth", metavar="PATH", help="write a fake auth.json for it here")
    args = parser.parse_args(argv)
    refresh = [write_fake_auth(args.auth)] if args.auth else []
    backend = DemoBackend(port=args.port, refresh_tokens=refresh)
    print("fake ChatGPT backend on %s (chatgpt_url %s, token_url %s); Ctrl-C stops it"
          % (backend.url, backend.chatgpt_url, backend.token_url), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
