#!/usr/bin/env python3
"""OCM, the OpenAI Codex Multiplexer.

One always-on box (a router, a NAS, a small server) holds the owner's Codex
login from ``~/.codex/auth.json`` (or an OpenAI API key), keeps it refreshed,
and lets remote Codex clients in with per-user bearer tokens. It relays their
requests (HTTP, SSE streams, WebSockets) to OpenAI unchanged, and translates
other clients' (Chat Completions, Anthropic Messages) for the ChatGPT backend.
Every request passes one pipeline: the same limits and accounting for all.

Run it:    python3 ocm.py config.json        (no config: 127.0.0.1:8080)
Check it:  python3 ocm.py --check config.json
Sign in:   python3 ocm.py login [config.json]  (also: logout, status)
Standard library only; Python 3.8 to 3.13. See README.md.

Sections, in order (``grep -n '^# ==' ocm.py``):
   1. Constants          default URLs, OAuth client id, intervals, limits
   2. Errors             OCMError, ConfigError, HTTPError
   3. Config             the config's classes and load_config()
   4. Files              atomic writes, the cross-process file lock
   5. Credentials        auth.json, token refresh, the Credential object
   6. Sign-in            device codes, PKCE with paste-back, writing a new login
   7. Pricing and usage  the price table, costs, the usage books and their saver
   8. Users              bearer tokens (or their digests), constant-time lookup
   9. HTTP parsing       strict request heads and bodies, response heads
  10. Upstream           the Connector (proxies, TLS), keep-alive pool, exchanges
  11. Accounts           windows by length, shares, sending, pools, failover state
  12. Policy             budgets (the one-request bound), concurrency, models, expiry
  13. Operations         metrics, the live usage document, the access log
  13b. Dashboard         the page at /ocm/, its JSON, sign-in, the history it draws
  14. Streams            the SSE usage scanner, WebSocket framing
  14b. Translation       Chat Completions and Anthropic Messages <-> Responses
  15. Pipeline           canonical paths, bodies parsed once, admission, failover,
                         the State a reload swaps whole
  16. Handler            read, dispatch, write: HTTP answers, WebSocket sessions
  17. Server             TLS for clients, the server owning state, settling requests
  18. CLI                main(), login, logout, status, usage, hash-token
"""

from __future__ import annotations  # annotations stay text: typing is never imported

import os
import sys

# Run as a script (`python3 ocm.py config.json`), CPython keeps the whole
# file's syntax tree in memory until the script ends: 11 MB for the life of a
# server. Before the heavy imports, a server run therefore replaces itself
# (same PID, same signals) with a load of this same file, by absolute path,
# through importlib, which frees the tree. Only when that is cheap: with a
# bytecode cache to load it from (else it would compile twice), and with -S
# (OCM imports nothing from site-packages). Quick commands don't bother.
_QUICK_COMMANDS = ("-h", "--help", "--version", "--check", "usage", "login", "logout", "status",
                   "init", "hash-token")


def _bytecode_cache_usable(path: str) -> bool:
    import importlib.util
    try:
        cached = importlib.util.cache_from_source(path)
        if os.stat(cached).st_mtime >= os.stat(path).st_mtime:
            return True
    except (OSError, NotImplementedError, ValueError):
        pass
    return not sys.dont_write_bytecode and os.access(os.path.dirname(path) or ".", os.W_OK)


if (__name__ == "__main__" and not os.environ.get("OCM_REEXECUTED") and sys.executable
        and not any(arg in _QUICK_COMMANDS for arg in sys.argv[1:])
        and _bytecode_cache_usable(os.path.abspath(__file__))):
    _boot = ("import importlib.machinery as im, importlib.util as iu, sys; p = sys.argv[0] = %r; "
             "l = im.SourceFileLoader('ocm', p); m = sys.modules['ocm'] = iu.module_from_spec("
             "iu.spec_from_loader('ocm', l)); l.exec_module(m); sys.exit(m.main())")
    try:
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, "-S", "-c", _boot % os.path.abspath(__file__)]
                  + sys.argv[1:], dict(os.environ, OCM_REEXECUTED="1"))
    except OSError:
        pass  # carry on as a script: correct, only heavier

import base64
import bisect
import codecs
import collections
import contextlib
import fnmatch
import functools
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import math
import random
import re
import select
import shutil
import signal
import socket
import socketserver
import struct
import tempfile
import threading
import time
import urllib.parse
from collections import namedtuple
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Start-up time is a feature on a router: importing dataclasses and typing, and
# applying dataclass decorators, cost 22 ms of a 150 ms start (Python 3.11).
# Records are plain classes or namedtuples, and annotations are never evaluated.
TYPE_CHECKING = False
if TYPE_CHECKING:  # for type checkers only
    from typing import Any, Callable, Dict, List, Optional, Tuple

try:  # POSIX only; without it the cross-process lock is skipped (Windows).
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None
try:
    import pwd
except ImportError:  # pragma: no cover
    pwd = None
try:  # some router builds of Python leave it out; then only plain http works
    import ssl
except ImportError:  # pragma: no cover
    ssl = None

__version__ = "0.1.0"

log = logging.getLogger("ocm")


# == 1. Constants ============================================================

DEFAULT_LISTEN = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_CHATGPT_URL = "https://chatgpt.com/backend-api/codex"
DEFAULT_API_URL = "https://api.openai.com"
DEFAULT_TOKEN_URL = "https://auth.openai.com/oauth/token"
DEFAULT_ISSUER_URL = "https://auth.openai.com"     # sign-in: device codes, authorize, revoke
OAUTH_CLIENT_ID = "app_EMoamEEZ73f0CkXaXp7hrann"

REFRESH_MARGIN = 5 * 60             # refresh when the access token expires sooner
REFRESH_MAX_AGE = 8 * 24 * 3600     # ...or, without a readable exp, after this long
REFRESH_RETRY = 30.0                # after a transient refresh failure, wait this long
TOKEN_CALL_TIMEOUT = 30.0
AUTH_LOCK_TIMEOUT = 30.0            # waiting for the Codex CLI to finish its own refresh

LOGIN_CALLBACK_PORTS = (1455, 1457)  # the only ports the issuer accepts in redirect_uri
LOGIN_TIMEOUT = 15 * 60.0            # device codes expire after this; so does our patience
DEVICE_POLL_FLOOR = 5.0              # never poll for a device code faster than this
LOGIN_SCOPE = "openid profile email offline_access api.connectors.read api.connectors.invoke"

DEFAULT_MAX_BODY_SIZE = 64 << 20
DEFAULT_UPSTREAM_READ_TIMEOUT = 600.0   # Codex gives up after 300 s idle; be longer
DEFAULT_CONNECT_TIMEOUT = 30.0
DEFAULT_HEADER_TIMEOUT = 10.0           # whole request head, so slowloris cannot stall us
DEFAULT_IDLE_TIMEOUT = 120.0            # between requests on a keep-alive connection
DEFAULT_BODY_TIMEOUT = 60.0             # for a whole request body (plus BODY_MIN_RATE's allowance)
BODY_MIN_RATE = 16 * 1024               # bytes/s: a body's deadline grows by its size at this rate
DEFAULT_SEND_TIMEOUT = 60.0             # a client (or WebSocket peer) that takes no bytes is cut
DEFAULT_MAX_REQUEST_LINE = 16 * 1024
DEFAULT_MAX_HEADER_SIZE = 64 * 1024
DEFAULT_MAX_HEADER_COUNT = 100
DEFAULT_MAX_CONNECTIONS = 1024
# Shares of max_connections (when the limits leave them at 0): one client
# address may hold a quarter, connections that have not authenticated half.
PER_ADDRESS_SHARE = 4
UNAUTHENTICATED_SHARE = 2
IPV6_ADDRESS_PREFIX = 64                # an IPv6 client holds a whole /64: one address
LINGER_SECONDS = 2.0                    # after a refusal: how long to drop what still comes
DEFAULT_THREAD_STACK_SIZE = 512 * 1024  # hundreds of streams fit a 32-bit address space

POOL_IDLE_SECONDS = 50.0            # servers drop idle keep-alive connections; don't race them
POOL_MAX_IDLE_PER_ORIGIN = 32
RELAY_CHUNK = 64 * 1024
SMALL_BODY = 64 * 1024              # responses up to this size go out in one write
DISCARD_BODY_LIMIT = 1 << 20        # refused requests: read and drop at most this much

# Connection-level headers that never cross a proxy (RFC 9110 7.6.1), plus Host.
HOP_BY_HOP = frozenset((
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
    "proxy-connection", "te", "trailer", "trailers", "transfer-encoding",
    "upgrade", "host",
))
# A client's own credentials, never forwarded: OCM sends the owner's.
CLIENT_CREDENTIAL_HEADERS = frozenset(("authorization", "x-api-key", "api-key"))
# Headers OCM sets itself on every upstream request.
OCM_SET_HEADERS = frozenset(("accept-encoding", "content-length", "chatgpt-account-id"))
# Client headers that are the owner's to choose, never a user's: cookies (the
# owner's session with OpenAI), where a request comes from (upstream would
# believe any address a user wrote), and which organisation or project the
# owner's API key bills. Dropped unless the owner sets them in config `headers`.
CLIENT_PRIVATE_HEADERS = frozenset((
    "cookie", "forwarded", "via", "x-real-ip", "true-client-ip", "cf-connecting-ip", "x-client-ip",
    "x-cluster-client-ip", "openai-organization", "openai-project",
))
CLIENT_PRIVATE_PREFIX = "x-forwarded-"  # X-Forwarded-For, -Host, -Proto, ...
# Upstream headers that never reach users: cookies belong to the owner's session.
UPSTREAM_PRIVATE_HEADERS = frozenset(("set-cookie", "set-cookie2"))

PERMANENT_REFRESH_CODES = frozenset((
    "refresh_token_expired", "refresh_token_reused", "refresh_token_invalidated",
))
# An OpenAI error code that leaves people guessing, in plain words; it can come
# from the sign-in server (a callback, the device-code poll, the code exchange)
# and from the token endpoint at a refresh.
NO_CODEX_ENTITLEMENT = "missing_codex_entitlement"
NO_CODEX_ENTITLEMENT_TEXT = ("Codex is not enabled for this workspace. Ask its admin to enable "
                             "Codex, or sign in to another workspace or account.")

REASONS = {
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 413: "Content Too Large",
    414: "URI Too Long", 426: "Upgrade Required", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Gateway Timeout", 505: "HTTP Version Not Supported",
}


# == 2. Errors ===============================================================

class OCMError(Exception):
    """Root of every error OCM raises on purpose."""


class ConfigError(OCMError):
    """The config file or the command line is wrong; the message says what to fix."""


class HTTPError(OCMError):
    """An answer for the client: ``{"error": {"type", "message"}}`` with ``status``.

    ``close`` asks the handler to close the connection after answering, for
    errors that leave the request stream in an unknown state.
    """

    def __init__(self, status: int, error_type: str, message: str, close: bool = False,
                 headers: Optional[List[Tuple[str, str]]] = None, body: Optional[bytes] = None):
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.close = close
        self.headers = headers or []
        self.body = body  # a ready answer (429 usage_limit_reached), instead of {"error": ...}


class ClientGone(OCMError):
    """The client hung up. Normal; logged at debug level only."""


class ProxyError(OCMError):
    """The detour proxy could not be used; the message says what it answered."""


class ListenError(OCMError):
    """The listening socket could not be opened (port in use, address not here)."""


MAX_JSON_DEPTH = 400  # real API payloads nest a few dozen levels
# Python 3.13 lets the json decoder recurse 10,000 levels in C before it checks,
# which overflows small thread stacks (a crash, not an exception). Older
# versions stop at the recursion limit with a RecursionError.
JSON_NEEDS_DEPTH_CHECK = sys.version_info >= (3, 13)
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_JSON_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")


def json_too_deep(data: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """True if a JSON text nests deeper than ``limit``. Counting brackets (C
    speed) settles nearly every document; only those with more brackets than
    the limit get the exact walk, with strings taken out first."""
    if isinstance(data, str):
        opens = data.count("[") + data.count("{")
    else:
        opens = data.count(b"[") + data.count(b"{")
    if opens <= limit:
        return False
    raw = (bytes(data) if isinstance(data, (bytes, bytearray))
           else data.encode("utf-8", "surrogatepass"))
    depth = 0
    for byte in _JSON_NOT_BRACKET.sub(b"", _JSON_STRING.sub(b"", raw)):
        depth += 1 if byte in (0x5B, 0x7B) else -1
        if depth > limit:
            return True
    return False


def parse_json(data: Any) -> Any:
    """json.loads for text from anywhere: hostile nesting is a ValueError like
    any other bad JSON. The json module would recurse in C for each level, and
    with small thread stacks (Python 3.13 checks too late) that is a crash of
    the whole process, not an exception."""
    if JSON_NEEDS_DEPTH_CHECK and json_too_deep(data):
        raise ValueError("JSON nested more than %d levels deep" % MAX_JSON_DEPTH)
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deeply")


LOG_VALUE_LIMIT = 200  # characters of a client's or upstream's string that logs and metrics keep
_UNSAFE_TEXT = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(match) -> str:
    char = match.group()
    code = ord(char)
    return _ESCAPES.get(char) or ("\\x%02x" % code if code < 0x100 else "\\u%04x" % code)


def log_safe(value: str, limit: int = LOG_VALUE_LIMIT) -> str:
    """A string from a client or from upstream, fit to be written: to a log
    line, a metric label, a usage key. Control characters are escaped (a
    newline cannot forge a log line, an ANSI sequence cannot repaint the
    owner's terminal, nor a bidi override reorder it), and it is at most
    ``limit`` characters. Free for ordinary text; log_safe(log_safe(x)) is
    log_safe(x)."""
    if len(value) <= limit and _UNSAFE_TEXT.search(value) is None:
        return value
    text = _UNSAFE_TEXT.sub(_escape_char, value[:limit + 1])
    return text if len(text) <= limit else text[:limit - 3] + "..."


def describe_connect_error(exc: BaseException) -> str:
    if isinstance(exc, ProxyError):
        return str(exc)
    if ssl is not None and isinstance(exc, ssl.SSLCertVerificationError):
        return "TLS certificate not trusted: %s" % (exc.verify_message or exc.reason)
    if ssl is not None and isinstance(exc, ssl.SSLError):
        return "TLS failed: %s" % (exc.reason or exc)
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return "cannot resolve host name (%s)" % (exc.strerror or exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or exc.__class__.__name__


# == 3. Config ===============================================================

class Budget(namedtuple("Budget", "period usd tokens", defaults=(None, None))):
    """A spending cap per ``period`` (day | week | month, in the configured
    time zone): ``usd`` at API prices, or ``tokens``."""
    __slots__ = ()


class User:
    """One person. Its repr shows the name only: the token never gets into a log."""

    def __init__(self, name: str, token: str, credential: str = ""):
        self.name = name
        self.token = token              # the token, or "sha256:<hex>" of it
        self.credential = credential    # the tag of the account or pool this user draws from
        self.max_concurrent = 0         # requests and WebSockets at once; 0: no limit
        self.models = []  # type: List[str]  # allowed model globs; empty: all
        self.expires_at = None  # type: Optional[float]
        self.budgets = []  # type: List[Budget]
        self.share_5h = None  # type: Optional[float]  # percent of an account's 5-hour window
        self.share_weekly = None  # type: Optional[float]

    def __repr__(self) -> str:
        return "User(%r)" % self.name

    @property
    def token_digest(self) -> bytes:
        if self.token.startswith("sha256:"):
            return bytes.fromhex(self.token[7:])
        return hashlib.sha256(self.token.encode("utf-8")).digest()


class UpstreamConfig:
    def __init__(self, chatgpt_url: str = DEFAULT_CHATGPT_URL, api_url: str = DEFAULT_API_URL,
                 token_url: str = DEFAULT_TOKEN_URL, issuer_url: str = DEFAULT_ISSUER_URL):
        self.chatgpt_url = chatgpt_url
        self.api_url = api_url
        self.token_url = token_url
        self.issuer_url = issuer_url


class Limits:
    """The ``limits`` block; keyword arguments override the defaults."""
    max_body_size = DEFAULT_MAX_BODY_SIZE
    upstream_read_timeout = DEFAULT_UPSTREAM_READ_TIMEOUT
    connect_timeout = DEFAULT_CONNECT_TIMEOUT
    header_timeout = DEFAULT_HEADER_TIMEOUT
    idle_timeout = DEFAULT_IDLE_TIMEOUT
    body_timeout = DEFAULT_BODY_TIMEOUT
    send_timeout = DEFAULT_SEND_TIMEOUT
    max_request_line = DEFAULT_MAX_REQUEST_LINE
    max_header_size = DEFAULT_MAX_HEADER_SIZE
    max_header_count = DEFAULT_MAX_HEADER_COUNT
    max_websocket_message = DEFAULT_MAX_BODY_SIZE
    max_connections = DEFAULT_MAX_CONNECTIONS
    max_connections_per_address = 0        # 0: max_connections / PER_ADDRESS_SHARE
    max_unauthenticated_connections = 0    # 0: max_connections / UNAUTHENTICATED_SHARE
    thread_stack_size = DEFAULT_THREAD_STACK_SIZE

    def __init__(self, **values: Any):
        for name, value in values.items():
            if not hasattr(Limits, name):
                raise TypeError("no limit %r" % name)
            setattr(self, name, value)

    @property
    def per_address(self) -> int:
        share = max(1, self.max_connections // PER_ADDRESS_SHARE)
        return self.max_connections_per_address or share

    @property
    def unauthenticated(self) -> int:
        share = max(1, self.max_connections // UNAUTHENTICATED_SHARE)
        return self.max_unauthenticated_connections or share


class ProxyURL(namedtuple("ProxyURL", "scheme host port username password", defaults=("", ""))):
    """A detour proxy: http (CONNECT), socks5 (local DNS) or socks5h (proxy
    DNS). The password is never in its str or repr, so never in a log line."""
    __slots__ = ()

    def __repr__(self) -> str:
        return "ProxyURL(%r)" % str(self)

    def __str__(self) -> str:
        host = "[%s]" % self.host if ":" in self.host else self.host
        return "%s://%s%s:%d" % (self.scheme, self.username + "@" if self.username else "",
                                 host, self.port)


PROXY_SCHEMES = ("http", "socks5", "socks5h")


def parse_detour(value: str, where: str, sing_box: bool) -> Optional[ProxyURL]:
    """A detour proxy URL. In a whole sing-box file a detour names an outbound,
    which OCM cannot use: it says so and connects directly instead of
    refusing a file that must run unchanged."""
    if not value:
        return None
    if sing_box and "://" not in value:
        log.warning("%s: %r is a sing-box outbound tag, which OCM cannot use; connecting directly "
                    "(give a proxy URL such as socks5://127.0.0.1:1080 to use a proxy)",
                    where, value)
        return None
    return parse_proxy_url(value, where)


def parse_proxy_url(value: str, where: str) -> ProxyURL:
    if "://" not in value:
        raise ConfigError("%s: %r is not a proxy URL; use http://host:port, socks5://host:port or "
                          "socks5h://host:port (a sing-box outbound tag means nothing to OCM)"
                          % (where, value))
    parts = urllib.parse.urlsplit(value)
    scheme = parts.scheme.lower()
    if scheme not in PROXY_SCHEMES:
        raise ConfigError("%s: proxy scheme %r is not supported; use http, socks5 or socks5h"
                          % (where, scheme))
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or not port:
        raise ConfigError("%s: a proxy URL needs a host and a port, like socks5://127.0.0.1:1080"
                          % where)
    if parts.path not in ("", "/") or parts.query:
        raise ConfigError("%s: a proxy URL has no path or query" % where)
    return ProxyURL(scheme, parts.hostname, port, urllib.parse.unquote(parts.username or ""),
                    urllib.parse.unquote(parts.password or ""))


def default_credential_path(env: Optional[Dict[str, str]] = None) -> str:
    """$CODEX_HOME/auth.json, else the real user's ~/.codex/auth.json (sudo-aware)."""
    env = os.environ if env is None else env
    codex_home = env.get("CODEX_HOME")
    if codex_home:
        return os.path.join(os.path.expanduser(codex_home), "auth.json")
    home = ""
    sudo_user = env.get("SUDO_USER")
    if sudo_user and pwd is not None and hasattr(os, "geteuid") and os.geteuid() == 0:
        try:
            home = pwd.getpwnam(sudo_user).pw_dir
        except KeyError:
            home = ""
    if not home:
        home = os.path.expanduser("~")
    return os.path.join(home, ".codex", "auth.json")


DEFAULT_POLL_INTERVAL = 60.0
BALANCER_STRATEGIES = ("least_used", "round_robin", "random")


class CredentialConfig:
    """One entry of ``credentials`` (sing-box 1.14): an account, or a pool."""

    def __init__(self, tag: str, type: str = "default"):
        self.tag = tag
        self.type = type                    # default | balancer | fallback
        self.credential_path = ""
        self.usages_path = ""
        self.detour = None  # type: Optional[ProxyURL]
        self.reserve_5h = 0                 # keep this much of the 5-hour window unused
        self.reserve_weekly = 0
        self.strategy = "least_used"        # balancer only
        self.members = []  # type: List[str]  # balancer and fallback: tags, in order
        self.poll_interval = DEFAULT_POLL_INTERVAL

    @property
    def is_pool(self) -> bool:
        return self.type != "default"


class TLSConfig:
    """Inbound TLS, with sing-box's field names. Equal when every field is (a
    reload compares them); the repr leaves the inline key out."""

    def __init__(self, enabled: bool = False, certificate_path: str = "", key_path: str = "",
                 certificate: str = "", key: str = "", min_version: str = "",
                 max_version: str = "", alpn: Optional[List[str]] = None):
        self.enabled = enabled
        self.certificate_path = certificate_path
        self.key_path = key_path
        # inline PEM (a string, or sing-box's list of lines, joined)
        self.certificate = certificate
        self.key = key
        self.min_version = min_version
        self.max_version = max_version
        self.alpn = list(alpn or [])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TLSConfig) and vars(self) == vars(other)

    __hash__ = None  # type: ignore  # mutable

    def __repr__(self) -> str:
        return "TLSConfig(enabled=%r, certificate_path=%r)" % (self.enabled, self.certificate_path)


class Config:
    """The whole config; keyword arguments override the defaults."""

    def __init__(self, **values: Any):
        self.listen = DEFAULT_LISTEN
        self.listen_port = DEFAULT_PORT
        self.credential_path = ""
        self.usages_path = ""
        self.users = []  # type: List[User]
        self.credentials = []  # type: List[CredentialConfig]
        self.timezone = "local"         # budgets' days, weeks and months
        self.budgets_path = ""          # where budget spending is kept across restarts
        # /metrics for this bearer token (or "sha256:<hex>"); loopback always
        self.metrics_token = ""
        self.admin_token = ""           # the dashboard's owner view (or "sha256:<hex>")
        # (glob, model) for other clients' model names
        self.model_map = []  # type: List[Tuple[str, str]]
        self.log_format = "text"        # access log lines: text | json
        self.headers = {}  # type: Dict[str, List[str]]
        self.detour = None  # type: Optional[ProxyURL]
        self.tls = TLSConfig()
        self.upstream = UpstreamConfig()
        self.limits = Limits()
        self.source = ""                # the file it came from, for messages
        for name, value in values.items():
            if not hasattr(self, name):
                raise TypeError("no config key %r" % name)
            setattr(self, name, value)
        if not self.credential_path:
            self.credential_path = default_credential_path()


# Keys of a sing-box service or listen block that OCM accepts but has no use for.
SING_BOX_IGNORED_KEYS = frozenset((
    "type", "tag", "tcp_fast_open", "tcp_multi_path", "udp_fragment", "udp_timeout",
    "proxy_protocol", "proxy_protocol_accept_no_header", "sniff",
    "sniff_override_destination", "sniff_timeout", "domain_strategy",
    "udp_disable_domain_unmapping", "bind_interface", "routing_mark", "reuse_addr",
    "netns", "disable_tcp_keep_alive", "tcp_keep_alive", "tcp_keep_alive_interval",
))
# The top level of a sing-box config besides services: a file of only these has no ocm service.
SING_BOX_SECTIONS = frozenset(("log", "dns", "ntp", "certificate", "endpoints", "inbounds",
                               "outbounds", "route", "experimental"))
# sing-box TLS options OCM cannot honour; refused, as ignoring them would
# quietly weaken what the owner configured.
TLS_UNSUPPORTED = ("acme", "ech", "reality", "client_authentication", "client_certificate",
                   "client_certificate_path", "client_certificate_public_key_sha256",
                   "cipher_suites", "curve_preferences", "certificate_provider", "kernel_tx",
                   "kernel_rx")
TLS_VERSIONS = ("1.2", "1.3")

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
                   "h": 3600.0}


# Times as Codex writes them in auth.json, and as the config gives expires_at.
_RFC3339 = re.compile(r"^(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)"
                      r"(\.\d+)?([Zz]|[+-]\d\d:\d\d)$")


def days_since_epoch(year: int, month: int, day: int) -> int:
    """Days from 1970-01-01 in the proleptic Gregorian calendar (what
    calendar.timegm computes; that module costs 3 ms of start-up)."""
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146097 + day_of_era - 719468


def parse_rfc3339(text: Any) -> Optional[float]:
    """Unix seconds from an RFC 3339 time (any fraction length), or None."""
    if not isinstance(text, str):
        return None
    m = _RFC3339.match(text.strip())
    if not m:
        return None
    year, month, day = int(m.group(1)), int(m.group(2)), int(m.group(3))
    if not (1 <= month <= 12 and 1 <= day <= 31):
        return None
    seconds = (days_since_epoch(year, month, day) * 86400
               + int(m.group(4)) * 3600 + int(m.group(5)) * 60 + int(m.group(6)))
    if m.group(7):
        seconds += float("0" + m.group(7))
    zone = m.group(8)
    if zone not in ("Z", "z"):
        sign = 1 if zone[0] == "+" else -1
        seconds -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    return seconds


def format_rfc3339(seconds: float) -> str:
    """RFC 3339 UTC with microseconds and a Z, as Codex writes last_refresh."""
    whole, micros = divmod(int(round(seconds * 1000000)), 1000000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + ".%06dZ" % micros


def parse_duration(value: Any, where: str) -> float:
    """Seconds from a number or a Go-style duration string ("90s", "1m30s", "500ms")."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError("%s: expected seconds or a duration like \"30s\", got %s"
                          % (where, _json_type(value)))
    if isinstance(value, str):
        text = value.strip()
        pos, total = 0, 0.0
        for match in _DURATION_PART.finditer(text):
            if match.start() != pos:
                break
            total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
            pos = match.end()
        if not text or pos != len(text):
            raise ConfigError("%s: %r is not a duration (examples: \"30s\", \"5m\", \"1h30m\")"
                              % (where, value))
        value = total
    if value < 0:
        raise ConfigError("%s: must not be negative" % where)
    return float(value)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


class _Fields:
    """Reads one JSON object key by key; every error names the key's full path."""

    def __init__(self, obj: Any, where: str):
        if not isinstance(obj, dict):
            raise ConfigError("%s: expected an object, got %s"
                              % (where or "config", _json_type(obj)))
        self.obj = obj
        self.where = where
        self.seen = set()

    def path(self, key: str) -> str:
        return "%s.%s" % (self.where, key) if self.where else key

    def has(self, key: str) -> bool:
        return self.obj.get(key) is not None

    def raw(self, key: str) -> Any:
        self.seen.add(key)
        return self.obj.get(key)

    def str(self, key: str, default: str = "", allow_empty: bool = True) -> str:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise ConfigError("%s: expected a string, got %s"
                              % (self.path(key), _json_type(value)))
        if not allow_empty and not value:
            raise ConfigError("%s: must not be empty" % self.path(key))
        return value

    def int(self, key: str, default: int, low: int, high: int) -> int:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError("%s: expected a whole number, got %s"
                              % (self.path(key), _json_type(value)))
        if not low <= value <= high:
            raise ConfigError("%s: %d is out of range (%d to %d)"
                              % (self.path(key), value, low, high))
        return value

    def bool(self, key: str, default: bool = False) -> bool:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError("%s: expected true or false, got %s"
                              % (self.path(key), _json_type(value)))
        return value

    def pem(self, key: str) -> str:
        """Inline PEM: a string, or a list of lines as sing-box allows."""
        value = self.raw(key)
        if value is None:
            return ""
        if isinstance(value, list) and all(isinstance(line, str) for line in value):
            return "\n".join(value) + "\n"
        if not isinstance(value, str):
            raise ConfigError("%s: expected a PEM string or a list of lines" % self.path(key))
        return value

    def seconds(self, key: str, default: float) -> float:
        value = self.raw(key)
        if value is None:
            return default
        seconds = parse_duration(value, self.path(key))
        if seconds <= 0:
            raise ConfigError("%s: must be more than zero" % self.path(key))
        return seconds

    def list(self, key: str) -> list:
        value = self.raw(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise ConfigError("%s: expected a list, got %s" % (self.path(key), _json_type(value)))
        return value

    def missing(self, key: str) -> ConfigError:
        """"missing token"; or, when a key nobody asked for looks like a typo of it, that key."""
        for other in self.obj:
            if other not in self.seen and did_you_mean(other, [key]):
                return ConfigError("%s: unknown key; did you mean %s?" % (self.path(other), key))
        return ConfigError("%s: missing %s" % (self.where, key))

    def finish(self, ignored: frozenset = frozenset()) -> None:
        """Refuse keys nobody asked for: a typo must not pass silently."""
        for key in self.obj:
            if key in self.seen:
                continue
            if key in ignored:
                log.warning("config: %s is a sing-box option OCM does not use; ignored",
                            self.path(key))
                continue
            raise ConfigError("%s: unknown key%s" % (self.path(key), did_you_mean(key, self.seen)))


def did_you_mean(word: Any, choices: Any) -> str:
    """"; did you mean listen_port?" for a typo of one of ``choices``, else ""."""
    import difflib  # only ever needed on the way to an error
    close = difflib.get_close_matches(str(word), sorted(choices), n=1, cutoff=0.6)
    return "; did you mean %s?" % close[0] if close else ""


def _check_url(value: str, where: str, schemes: Tuple[str, ...] = ("http", "https")) -> str:
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in schemes or not parts.hostname:
        raise ConfigError("%s: %r is not an %s URL" % (where, value, " or ".join(schemes)))
    if parts.query or parts.fragment:
        raise ConfigError("%s: %r must not have a query or fragment" % (where, value))
    try:
        parts.port
    except ValueError:
        raise ConfigError("%s: %r has a bad port" % (where, value))
    return value.rstrip("/")


_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_HEADER_VALUE = re.compile(r"^[^\x00-\x08\x0a-\x1f\x7f]*$")


# config.example.json's tokens start with this; a copy left unedited must not
# open the subscription to everyone who has read the example.
EXAMPLE_TOKEN_PREFIX = "replace-with-"
MIN_TOKEN_LENGTH = 16


def _parse_users(raw: list, where: str) -> List[User]:
    users, names, tokens = [], set(), set()
    for i, entry in enumerate(raw):
        f = _Fields(entry, "%s[%d]" % (where, i))
        name = f.str("name", allow_empty=False)
        token = f.str("token", allow_empty=False)
        if token.startswith("sha256:") and not re.match(r"^sha256:[0-9a-fA-F]{64}$", token):
            raise ConfigError("%s: sha256: must be followed by 64 hex digits "
                              "(from `python3 ocm.py hash-token`)" % f.path("token"))
        credential = f.str("credential")
        for key in ("external_credential", "allow_external_usage"):
            if f.has(key):
                raise ConfigError("%s: external credentials are not supported by OCM"
                                  % f.path(key))
        if not f.has("name"):
            raise f.missing("name")
        if not f.has("token"):
            raise f.missing("token")
        if token != token.strip() or any(c.isspace() for c in token):
            raise ConfigError("%s: must not contain spaces" % f.path("token"))
        if token.startswith(EXAMPLE_TOKEN_PREFIX):
            raise ConfigError("%s: still the example's placeholder, which anyone can read; "
                              "put a long random token here, or write the config with "
                              "`python3 ocm.py init`" % f.path("token"))
        if not token.startswith("sha256:") and len(token) < MIN_TOKEN_LENGTH:
            # sing-box accepted any token, so a short one still loads (drop-in), with a nudge.
            log.warning("config: %s is only %d characters, easy to guess; `python3 ocm.py init` "
                        "or `python3 -c \"import secrets; print(secrets.token_urlsafe(32))\"` "
                        "makes a strong one", f.path("token"), len(token))
        if name in names:
            raise ConfigError("%s: duplicate user name %r" % (f.path("name"), name))
        digest = User(name, token).token_digest
        if digest in tokens:
            raise ConfigError("%s: the same token is given to two users" % f.path("token"))
        names.add(name)
        tokens.add(digest)
        user = User(name=name, token=token, credential=credential)
        user.max_concurrent = f.int("max_concurrent", 0, 0, 100000)
        user.models = [str(m) for m in f.list("models")]
        if not all(isinstance(m, str) and m for m in f.raw("models") or []):
            raise ConfigError("%s: expected a list of model patterns" % f.path("models"))
        expires = f.str("expires_at")
        if expires:
            user.expires_at = parse_rfc3339(expires)
            if user.expires_at is None:
                raise ConfigError("%s: %r is not an RFC 3339 time (2027-01-31T00:00:00Z)"
                                  % (f.path("expires_at"), expires))
        user.budgets = _parse_budgets(f.list("budgets"), f.path("budgets"))
        for key in ("share_5h", "share_weekly"):
            value = f.raw(key)
            if value is not None:
                if (isinstance(value, bool) or not isinstance(value, (int, float))
                        or not 0 < value <= 100):
                    raise ConfigError("%s: a percent above 0 and at most 100" % f.path(key))
                setattr(user, key, float(value))
        f.finish()
        users.append(user)
    return users


def _parse_budgets(raw: list, where: str) -> List[Budget]:
    budgets = []
    for i, entry in enumerate(raw):
        f = _Fields(entry, "%s[%d]" % (where, i))
        period = f.str("period", allow_empty=False)
        if period not in ("day", "week", "month"):
            raise ConfigError("%s: %r is not day, week or month" % (f.path("period"), period))
        usd, tokens = f.raw("usd"), f.raw("tokens")
        if (usd is None) == (tokens is None):
            raise ConfigError("%s: give usd or tokens (one of them)" % f.where)
        if usd is not None and (isinstance(usd, bool) or not isinstance(usd, (int, float))
                                or usd <= 0):
            raise ConfigError("%s: a positive number of dollars" % f.path("usd"))
        budget = Budget(period, usd=float(usd) if usd is not None else None,
                        tokens=f.int("tokens", 0, 1, 1 << 50) if tokens is not None else None)
        f.finish()
        budgets.append(budget)
    return budgets


def _listable(value: Any, where: str) -> List[str]:
    """sing-box's Listable: one string or a list of them."""
    values = value if isinstance(value, list) else [value] if value is not None else []
    if not all(isinstance(v, str) and v for v in values):
        raise ConfigError("%s: expected a tag or a list of tags" % where)
    return values


def _parse_credentials(raw: list, where: str, sing_box: bool = False) -> List[CredentialConfig]:
    entries = {}  # type: Dict[str, CredentialConfig]
    paths = {}  # type: Dict[str, str]
    books = {}  # type: Dict[str, str]  # usage files (absolute) -> tag
    for i, entry in enumerate(raw):
        f = _Fields(entry, "%s[%d]" % (where, i))
        tag = f.str("tag", allow_empty=False)
        if not tag:
            raise f.missing("tag")
        if tag in entries:
            raise ConfigError("%s: duplicate tag %r" % (f.path("tag"), tag))
        kind = f.str("type") or "default"
        if kind == "external":
            raise ConfigError("%s: external credentials are not supported by OCM" % f.path("type"))
        if kind not in ("default", "balancer", "fallback"):
            raise ConfigError("%s: %r is not a credential type (default, balancer, fallback)"
                              % (f.path("type"), kind))
        item = CredentialConfig(tag=tag, type=kind)
        if kind == "default":
            item.credential_path = os.path.expanduser(f.str("credential_path", allow_empty=False))
            if not item.credential_path:
                raise f.missing("credential_path")
            if item.credential_path in paths:
                raise ConfigError("%s: %s is also the file of %r; each account needs its own"
                                  % (f.path("credential_path"), item.credential_path,
                                     paths[item.credential_path]))
            paths[item.credential_path] = tag
            item.usages_path = os.path.expanduser(f.str("usages_path"))
            usages_key = os.path.abspath(item.usages_path) if item.usages_path else ""
            if usages_key in books:  # two books writing one file lose each other's requests
                raise ConfigError("%s: %s is also the usage file of %r; give each account its own"
                                  % (f.path("usages_path"), item.usages_path, books[usages_key]))
            if usages_key:
                books[usages_key] = tag
            item.detour = parse_detour(f.str("detour"), f.path("detour"), sing_box)
            for key in ("reserve_5h", "reserve_weekly"):
                if f.has(key):
                    value = f.int(key, 0, -1 << 31, 1 << 31)
                    if not 1 <= value <= 99:
                        raise ConfigError("%s: %d is outside 1 to 99 (leave it out for no reserve)"
                                          % (f.path(key), value))
                    setattr(item, key, value)
        else:
            item.members = _listable(f.raw("credentials"), f.path("credentials"))
            if not item.members:
                raise ConfigError("%s: a %s needs credentials" % (f.path("credentials"), kind))
            item.poll_interval = f.seconds("poll_interval", DEFAULT_POLL_INTERVAL)
            if kind == "balancer":
                item.strategy = f.str("strategy") or "least_used"
                if item.strategy not in BALANCER_STRATEGIES:
                    raise ConfigError("%s: %r is not a strategy (%s)"
                                      % (f.path("strategy"), item.strategy,
                                         ", ".join(BALANCER_STRATEGIES)))
        f.finish()
        entries[tag] = item
    for i, item in enumerate(entries.values()):
        for member in item.members:
            path = "%s[%d].credentials" % (where, i)
            if member not in entries:
                raise ConfigError("%s: unknown tag %r" % (path, member))
            if member == item.tag:
                raise ConfigError("%s: %r contains itself" % (path, item.tag))
            if item.type == "balancer" and entries[member].is_pool:
                raise ConfigError("%s: a balancer draws from accounts only, and %r is a %s"
                                  % (path, member, entries[member].type))
        _check_no_cycle(item.tag, entries, [], where)
    return list(entries.values())


def _check_no_cycle(tag: str, entries: Dict[str, CredentialConfig], trail: List[str],
                    where: str) -> None:
    if tag in trail:
        raise ConfigError("%s: pools form a cycle: %s" % (where, " -> ".join(trail + [tag])))
    for member in entries[tag].members:
        _check_no_cycle(member, entries, trail + [tag], where)


def accounts_of(config: Config, tag: str) -> List[str]:
    """The account tags behind a credential tag, in order, each once."""
    entries = {c.tag: c for c in config.credentials}
    if not entries[tag].is_pool:
        return [tag]
    out = []  # type: List[str]
    for member in entries[tag].members:
        for account in accounts_of(config, member):
            if account not in out:
                out.append(account)
    return out


def _parse_headers(raw: Any, where: str) -> Dict[str, List[str]]:
    """sing-box's HTTPHeader: {"Name": "value"} or {"Name": ["v1", "v2"]}."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("%s: expected an object of header names, got %s"
                          % (where, _json_type(raw)))
    headers = {}
    for name, value in raw.items():
        path = "%s.%s" % (where, name)
        if not _HEADER_NAME.match(name):
            raise ConfigError("%s: not a valid header name" % path)
        values = value if isinstance(value, list) else [value]
        for v in values:
            if not isinstance(v, str):
                raise ConfigError("%s: expected a string or a list of strings" % path)
            if not _HEADER_VALUE.match(v):
                raise ConfigError("%s: value has control characters" % path)
        headers[name] = list(values)
    return headers


def _parse_model_map(raw: Any, where: str) -> List[Tuple[str, str]]:
    """{"claude-*haiku*": "gpt-5.1-codex-mini", "claude-*": "gpt-5.3-codex"}:
    requested model names (globs, first match wins) to the model used."""
    if raw is None:
        return []
    if not isinstance(raw, dict):
        raise ConfigError("%s: expected an object of model name patterns, got %s"
                          % (where, _json_type(raw)))
    pairs = []
    for pattern, model in raw.items():
        if not pattern or not isinstance(model, str) or not model.strip():
            raise ConfigError("%s.%s: expected a model name, like \"gpt-5.3-codex\""
                              % (where, pattern))
        pairs.append((pattern, model.strip()))
    return pairs


def _parse_tls(raw: Any, where: str) -> TLSConfig:
    if raw is None:
        return TLSConfig()
    f = _Fields(raw, where)
    for key in TLS_UNSUPPORTED:
        if f.has(key):
            raise ConfigError("%s: not supported by OCM; remove it (OCM serves a certificate and "
                              "key from files or inline PEM)" % f.path(key))
    tls = TLSConfig(enabled=f.bool("enabled"),
                    certificate_path=os.path.expanduser(f.str("certificate_path")),
                    key_path=os.path.expanduser(f.str("key_path")),
                    certificate=f.pem("certificate"), key=f.pem("key"),
                    min_version=f.str("min_version"), max_version=f.str("max_version"),
                    alpn=[str(a) for a in f.list("alpn")])
    for key in ("min_version", "max_version"):
        value = getattr(tls, key)
        if value and value not in TLS_VERSIONS:
            raise ConfigError("%s: %r is not supported; use \"1.2\" or \"1.3\" "
                              "(older TLS is unsafe)" % (f.path(key), value))
    if tls.min_version and tls.max_version and tls.min_version > tls.max_version:
        raise ConfigError("%s: min_version is above max_version" % where)
    if any(not isinstance(a, str) for a in f.raw("alpn") or []):
        raise ConfigError("%s: expected a list of strings" % f.path("alpn"))
    others = [a for a in tls.alpn if a != "http/1.1"]
    if others:
        log.warning("%s: OCM serves HTTP/1.1 only; not offering %s", f.path("alpn"),
                    ", ".join(others))
    if tls.enabled:
        if bool(tls.certificate_path) == bool(tls.certificate):
            raise ConfigError("%s: give the certificate as certificate_path or as inline "
                              "certificate (exactly one)" % where)
        if bool(tls.key_path) == bool(tls.key):
            raise ConfigError("%s: give the key as key_path or as inline key (exactly one)"
                              % where)
    # server_name and insecure are client-side options in sing-box: no effect here.
    f.finish(frozenset(("server_name", "insecure")))
    return tls


def _parse_upstream(raw: Any, where: str) -> UpstreamConfig:
    if raw is None:
        return UpstreamConfig()
    f = _Fields(raw, where)
    upstream = UpstreamConfig(
        chatgpt_url=_check_url(f.str("chatgpt_url", DEFAULT_CHATGPT_URL), f.path("chatgpt_url")),
        api_url=_check_url(f.str("api_url", DEFAULT_API_URL), f.path("api_url")),
        token_url=_check_url(f.str("token_url", DEFAULT_TOKEN_URL), f.path("token_url")),
        issuer_url=_check_url(f.str("issuer_url", DEFAULT_ISSUER_URL), f.path("issuer_url")),
    )
    f.finish()
    return upstream


def _parse_limits(raw: Any, where: str) -> Limits:
    if raw is None:
        return Limits()
    f = _Fields(raw, where)
    limits = Limits(
        max_body_size=f.int("max_body_size", DEFAULT_MAX_BODY_SIZE, 1024, 1 << 40),
        upstream_read_timeout=f.seconds("upstream_read_timeout", DEFAULT_UPSTREAM_READ_TIMEOUT),
        connect_timeout=f.seconds("connect_timeout", DEFAULT_CONNECT_TIMEOUT),
        header_timeout=f.seconds("header_timeout", DEFAULT_HEADER_TIMEOUT),
        idle_timeout=f.seconds("idle_timeout", DEFAULT_IDLE_TIMEOUT),
        body_timeout=f.seconds("body_timeout", DEFAULT_BODY_TIMEOUT),
        send_timeout=f.seconds("send_timeout", DEFAULT_SEND_TIMEOUT),
        max_request_line=f.int("max_request_line", DEFAULT_MAX_REQUEST_LINE, 256, 1 << 20),
        max_header_size=f.int("max_header_size", DEFAULT_MAX_HEADER_SIZE, 1024, 16 << 20),
        max_header_count=f.int("max_header_count", DEFAULT_MAX_HEADER_COUNT, 8, 10000),
        max_websocket_message=f.int("max_websocket_message", DEFAULT_MAX_BODY_SIZE, 1024, 1 << 40),
        max_connections=f.int("max_connections", DEFAULT_MAX_CONNECTIONS, 1, 1 << 20),
        max_connections_per_address=f.int("max_connections_per_address", 0, 0, 1 << 20),
        max_unauthenticated_connections=f.int("max_unauthenticated_connections", 0, 0, 1 << 20),
        thread_stack_size=f.int("thread_stack_size", DEFAULT_THREAD_STACK_SIZE, 0, 1 << 30),
    )
    # see MAX_JSON_DEPTH
    if limits.thread_stack_size and not 128 * 1024 <= limits.thread_stack_size <= 64 << 20:
        raise ConfigError("%s: 0 (the system default) or 131072 to 67108864 bytes"
                          % f.path("thread_stack_size"))
    f.finish()
    return limits


def config_from_dict(data: Any, source: str = "") -> Config:
    """Build a Config from parsed JSON: an OCM object or a whole sing-box file."""
    where = ""
    if isinstance(data, dict) and data and set(data) <= SING_BOX_SECTIONS:
        raise ConfigError("services: no service of type \"ocm\" in this sing-box config "
                          "(it has no services list)")
    if isinstance(data, dict) and "services" in data:
        services = data["services"]
        if not isinstance(services, list):
            raise ConfigError("services: expected a list")
        found = [(i, s) for i, s in enumerate(services)
                 if isinstance(s, dict) and s.get("type") == "ocm"]
        if not found:
            raise ConfigError("services: no service of type \"ocm\" in this sing-box config")
        if len(found) > 1:
            raise ConfigError("services: %d services of type \"ocm\"; OCM runs one, keep one"
                              % len(found))
        where = "services[%d]" % found[0][0]
        data = found[0][1]
    f = _Fields(data, where)
    listen = f.str("listen", DEFAULT_LISTEN, allow_empty=False)
    config = Config(
        listen=listen,
        listen_port=f.int("listen_port", DEFAULT_PORT, 0, 65535),
        credential_path=os.path.expanduser(f.str("credential_path")) or default_credential_path(),
        usages_path=os.path.expanduser(f.str("usages_path")),
        users=_parse_users(f.list("users"), f.path("users")),
        credentials=_parse_credentials(f.list("credentials"), f.path("credentials"),
                                       sing_box=bool(where)),
        timezone=_check_timezone(f.str("timezone", "local"), f.path("timezone")),
        budgets_path=os.path.expanduser(f.str("budgets_path")),
        metrics_token=f.str("metrics_token"),
        admin_token=f.str("admin_token"),
        model_map=_parse_model_map(f.raw("model_map"), f.path("model_map")),
        log_format=f.str("log_format", "text"),
        headers=_parse_headers(f.raw("headers"), f.path("headers")),
        detour=parse_detour(f.str("detour"), f.path("detour"), sing_box=bool(where)),
        tls=_parse_tls(f.raw("tls"), f.path("tls")),
        upstream=_parse_upstream(f.raw("upstream"), f.path("upstream")),
        limits=_parse_limits(f.raw("limits"), f.path("limits")),
        source=source,
    )
    if f.obj.get("type") == "ocm":  # a sing-box service's own type and name: nothing to warn about
        f.raw("type")
        f.raw("tag")
    f.finish(SING_BOX_IGNORED_KEYS)
    _check_credentials(config, f)
    if config.log_format not in ("text", "json"):
        raise ConfigError("%s: text or json" % f.path("log_format"))
    if (config.metrics_token.startswith("sha256:")
            and not re.match(r"^sha256:[0-9a-fA-F]{64}$", config.metrics_token)):
        raise ConfigError("%s: sha256: must be followed by 64 hex digits"
                          % f.path("metrics_token"))
    _check_admin_token(config, f.path("admin_token"))
    if not config.budgets_path and any(u.budgets for u in config.users):
        config.budgets_path = default_budgets_path(config)
    return config


def _check_admin_token(config: Config, where: str) -> None:
    """The owner's token for the dashboard: a digest or a long secret, and
    nobody else's token (a person holding it would see everyone)."""
    token = config.admin_token
    if not token:
        return
    if token.startswith("sha256:") and not re.match(r"^sha256:[0-9a-fA-F]{64}$", token):
        raise ConfigError("%s: sha256: must be followed by 64 hex digits (from `python3 ocm.py "
                          "hash-token`)" % where)
    if token != token.strip() or any(c.isspace() for c in token):
        raise ConfigError("%s: must not contain spaces" % where)
    if token.startswith(EXAMPLE_TOKEN_PREFIX):
        raise ConfigError("%s: still a placeholder, which anyone can read; put a long random "
                          "token here" % where)
    if not token.startswith("sha256:") and len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError("%s: only %d characters, easy to guess; `python3 -c \"import "
                          "secrets; print(secrets.token_urlsafe(32))\"` makes a strong one"
                          % (where, len(token)))
    digest = User("owner", token).token_digest
    if any(hmac.compare_digest(digest, user.token_digest) for user in config.users):
        raise ConfigError("%s: the same token is given to a user; the owner's token must be "
                          "its own" % where)


def default_budgets_path(config: Config) -> str:
    """ocm-budgets.json beside the usage file, where OCM already writes (the
    config's own directory is often read-only, e.g. /etc); else beside the config."""
    usages = config.usages_path or next((c.usages_path for c in config.credentials
                                         if c.usages_path), "")
    if usages:
        directory = os.path.dirname(os.path.abspath(usages))
    else:
        directory = os.path.dirname(os.path.abspath(config.source)) if config.source else "."
    return os.path.join(directory, "ocm-budgets.json")


_UTC_OFFSET = re.compile(r"^[+-](\d\d):(\d\d)$")


def _check_timezone(name: str, where: str) -> str:
    """"local", "UTC", a fixed offset ("+05:30"), or an IANA name (Python 3.9+)."""
    if name in ("local", "UTC") or _UTC_OFFSET.match(name):
        return name
    try:
        import zoneinfo
    except ImportError:
        raise ConfigError("%s: time zone names need Python 3.9+; use \"local\", \"UTC\" or an "
                          "offset like \"+02:00\"" % where)
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError("%s: unknown time zone %r" % (where, name))
    return name


def _check_credentials(config: Config, f: _Fields) -> None:
    """With ``credentials``, every user names one; without, nobody may."""
    if not config.credentials:
        for i, user in enumerate(config.users):
            if user.credential:
                raise ConfigError("%s[%d].credential: there is no credentials list to draw from"
                                  % (f.path("users"), i))
        return
    for key in ("credential_path", "usages_path", "detour"):
        if f.has(key):
            raise ConfigError("%s: with a credentials list, set it on each credential instead"
                              % f.path(key))
    tags = {c.tag for c in config.credentials}
    for i, user in enumerate(config.users):
        if not user.credential:
            raise ConfigError("%s[%d].credential: required with a credentials list (one of %s)"
                              % (f.path("users"), i, ", ".join(sorted(tags))))
        if user.credential not in tags:
            raise ConfigError("%s[%d].credential: unknown tag %r"
                              % (f.path("users"), i, user.credential))


def load_config(path: str) -> Config:
    """Read and check a config file. Raises ConfigError naming what is wrong."""
    try:
        with open(path, "rb") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError("cannot read config %s: %s" % (path, exc.strerror or exc))
    try:
        text = text.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError("%s: not UTF-8 text" % path)
    try:
        data = parse_json(text)
    except ValueError as exc:
        raise ConfigError("%s: %s" % (path, describe_json_error(text, exc)))
    return config_from_dict(data, source=path)


def describe_json_error(text: str, exc: ValueError) -> str:
    """Where the JSON breaks, and why when it is one of the two things people
    carry over from other config formats: comments and trailing commas."""
    if not isinstance(exc, json.JSONDecodeError):
        return "not valid JSON: %s" % exc
    message = "not valid JSON at line %d, column %d: %s" % (exc.lineno, exc.colno, exc.msg)
    rest = text[exc.pos:]
    if rest.startswith(("//", "/*", "#")):
        return message + " (JSON allows no comments; remove it)"
    closing = ("}", "]")
    if ((text[:exc.pos].rstrip().endswith(",") and rest.lstrip()[:1] in closing)
            or (rest.startswith(",") and rest[1:].lstrip()[:1] in closing)):  # 3.13: at the comma
        return message + " (JSON allows no comma after the last item; remove it)"
    return message


# == 4. Files ================================================================

def write_file_atomic(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so a crash at any instant leaves old or new.

    Temp file in the same directory, fsync, rename, fsync the directory. On any
    error (disk full, read-only) the temp file is removed and the old file stays.
    A symbolic link stays one: its target gets the new content (auth.json
    linked to the Codex CLI's own must keep sharing it, or the rotated refresh
    token lands in a copy and the CLI's file holds a dead one).
    """
    path = os.path.realpath(path)
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=directory)
    try:
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_json_atomic(path: str, data: Any, mode: int = 0o600) -> None:
    """``data`` as 2-space JSON and a newline (as Codex writes auth.json), atomically."""
    write_file_atomic(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"), mode)


def move_aside(path: str, now: float) -> str:
    """Rename a damaged file to ``path.corrupt-<UTC time>`` so that it is kept,
    never overwritten; returns the new name."""
    aside = "%s.corrupt-%s" % (path, time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)))
    with contextlib.suppress(OSError):
        os.replace(path, aside)
    return aside


def auth_lock_path(auth_path: str) -> str:
    """The auth.lock the Codex CLI takes: beside the real auth.json, wherever
    a link to it lives."""
    return os.path.join(os.path.dirname(os.path.realpath(auth_path)), "auth.lock")


@contextlib.contextmanager
def file_lock(path: str, timeout: float = AUTH_LOCK_TIMEOUT):
    """Hold an exclusive flock on ``path``, as the Codex CLI does on auth.lock.

    Yields True when locked. If the lock file cannot be created (read-only
    directory) or flock does not exist here, yields False and the caller
    carries on unlocked: a refresh is better than no service.
    """
    if fcntl is None:
        yield False
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        log.warning("cannot create lock file %s (%s); refreshing without it", path, exc.strerror)
        yield False
        return
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError("%s is held by another process for over %d s"
                                       % (path, timeout))
                time.sleep(0.05)
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# == 5. Credentials ==========================================================

def decode_jwt_claims(token: str) -> Dict[str, Any]:
    """The payload of a JWT, unverified (OCM only reads exp and account claims)."""
    try:
        payload = token.split(".")[1]
        payload += "=" * (-len(payload) % 4)
        claims = parse_json(base64.urlsafe_b64decode(payload.encode("ascii")))
    except (IndexError, ValueError, UnicodeError, TypeError):
        return {}
    return claims if isinstance(claims, dict) else {}


class Login(namedtuple("Login", "mode access_token refresh_token id_token api_key account_id "
                                "plan email expires_at last_refresh",
                       defaults=("",) * 7 + (None, None))):
    """What one auth.json holds, already interpreted. ``mode`` is "chatgpt"
    (OAuth) or "apikey". Its repr holds no token or key."""
    __slots__ = ()

    def __repr__(self) -> str:
        return "Login(%r, account_id=%r, plan=%r)" % (self.mode, self.account_id, self.plan)

    @property
    def bearer(self) -> str:
        return self.api_key if self.mode == "apikey" else self.access_token

    @property
    def mode_name(self) -> str:
        return "API key" if self.mode == "apikey" else "ChatGPT OAuth"


class CredentialProblem(OCMError):
    """auth.json is missing, unreadable or incomplete; the message says which."""


def parse_auth(data: Any) -> Login:
    """Interpret auth.json (PROTOCOL.md section 2): mode, tokens, account id, plan."""
    if not isinstance(data, dict):
        raise CredentialProblem("auth.json is not a JSON object")
    auth_mode = data.get("auth_mode")
    api_key = data.get("OPENAI_API_KEY")
    api_key = api_key if isinstance(api_key, str) else ""
    if isinstance(auth_mode, str) and auth_mode:
        mode = "apikey" if auth_mode.lower() == "apikey" else "chatgpt"
    else:
        mode = "apikey" if api_key else "chatgpt"
    if mode == "apikey":
        if not api_key:
            raise CredentialProblem("auth.json is in API-key mode but has no OPENAI_API_KEY")
        return Login(mode="apikey", api_key=api_key)
    tokens = data.get("tokens")
    if not isinstance(tokens, dict):
        raise CredentialProblem("auth.json has no tokens (signed out?); sign in again")

    def token(name: str) -> str:
        value = tokens.get(name)
        return value if isinstance(value, str) else ""

    access, refresh, id_token = token("access_token"), token("refresh_token"), token("id_token")
    if not access:
        raise CredentialProblem("auth.json has no tokens.access_token; sign in again")
    access_claims = decode_jwt_claims(access)
    id_claims = decode_jwt_claims(id_token) if id_token else {}

    def auth_claim(name: str) -> str:
        for claims in (id_claims, access_claims):
            value = (claims.get("https://api.openai.com/auth") or {}).get(name)
            if isinstance(value, str) and value:
                return value
        return ""

    exp = access_claims.get("exp")
    email = (id_claims.get("email")
             or (access_claims.get("https://api.openai.com/profile") or {}).get("email"))
    return Login(
        mode="chatgpt",
        access_token=access,
        refresh_token=refresh,
        id_token=id_token,
        account_id=token("account_id") or auth_claim("chatgpt_account_id"),
        plan=auth_claim("chatgpt_plan_type"),
        email=email if isinstance(email, str) else "",
        expires_at=(float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool)
                    else None),
        last_refresh=parse_rfc3339(data.get("last_refresh")),
    )


def needs_refresh(login: Login, now: float) -> bool:
    """Proactive rule: exp under 5 minutes away; without exp, last refresh 8+ days ago."""
    if login.mode != "chatgpt" or not login.refresh_token:
        return False
    if login.expires_at is not None:
        return login.expires_at - now < REFRESH_MARGIN
    if login.last_refresh is not None:
        return now - login.last_refresh >= REFRESH_MAX_AGE
    return True


def is_expired(login: Login, now: float) -> bool:
    return login.expires_at is not None and login.expires_at <= now


class EndpointUnreachable(OCMError):
    """No HTTP answer at all (DNS, network, proxy, timeout)."""


def post_for_json(open_url: Callable, url: str, body: bytes,
                  content_type: str = "application/json") -> Tuple[int, Any, bytes]:
    """POST to an OpenAI auth endpoint: (status, parsed JSON or None, raw body),
    whatever the status. Raises EndpointUnreachable when no answer came."""
    import urllib.error  # token calls are rare: urllib loads only when one is made
    import urllib.request
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": content_type, "Accept": "application/json",
        "User-Agent": "ocm/" + __version__})
    try:
        with open_url(request, TOKEN_CALL_TIMEOUT) as response:
            status, raw = response.status, response.read(1 << 20)
    except urllib.error.HTTPError as exc:
        status = exc.code
        try:
            raw = exc.read(1 << 20)
        except OSError:
            raw = b""
        finally:
            exc.close()
    except (urllib.error.URLError, OSError, http.client.HTTPException, OCMError) as exc:
        reason = getattr(exc, "reason", None) or exc
        if isinstance(reason, BaseException):
            reason = describe_connect_error(reason)
        raise EndpointUnreachable("%s unreachable: %s"
                                  % (urllib.parse.urlsplit(url).hostname, reason))
    try:
        answer = parse_json(raw.decode("utf-8")) if raw else None
    except (ValueError, UnicodeDecodeError):
        answer = None
    return status, answer, raw


class RefreshFailed(OCMError):
    """``str()`` is for the owner's log; ``public`` for users, without the
    owner's file paths."""

    def __init__(self, message: str, permanent: bool, public: str = ""):
        super().__init__(message)
        self.permanent = permanent
        self.public = public or message


def refresh_error_code(body: Any) -> str:
    """The error code of a token-endpoint answer: error.code, error (a string) or code."""
    if not isinstance(body, dict):
        return ""
    error = body.get("error")
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        return error["code"]
    if isinstance(error, str):
        return error
    code = body.get("code")
    return code if isinstance(code, str) else ""


def refresh_error_message(body: Any) -> str:
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        for key in ("error_description", "message"):
            if isinstance(body.get(key), str):
                return body[key]
    return ""


def _read_file_with_id(path: str) -> Tuple[bytes, Tuple[int, int, int]]:
    with open(path, "rb") as fh:
        st = os.fstat(fh.fileno())
        return fh.read(), (st.st_mtime_ns, st.st_size, st.st_ino)


def _file_id(path: str) -> Optional[Tuple[int, int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class Credential:
    """One account's login: its auth.json, its refresh, its state.

    The file is the truth: it is re-read whenever its mtime, size or inode
    changes, so a fixed or replaced auth.json is picked up without a restart.
    Refreshes are single-flight (one token call for any number of waiting
    requests) and safe beside the owner's own Codex CLI: under the exclusive
    flock on auth.lock the file is re-read, and tokens someone else already
    refreshed are adopted instead of sending a refresh token that has rotated.
    """

    def __init__(self, path: str, token_url: str, open_url: Callable, tag: str = "default",
                 now: Callable[[], float] = time.time, check_interval: float = 1.0):
        self.path = path
        self.token_url = token_url
        self.tag = tag
        self._open_url = open_url
        self._now = now
        self._lock = threading.Lock()           # guards the fields below
        self._refresh_lock = threading.Lock()   # one refresh at a time
        self._login = None                      # type: Optional[Login]
        self._file_id = None                    # what _login was read from
        self._problem = "not loaded"            # why there is no login, for the owner's log
        self._public_problem = "not loaded"     # ...and for users: no file paths
        self._dead = ""                         # permanent refresh failure, until the file changes
        self._retry_at = 0.0                    # no refresh before this after a transient failure
        self._last_refresh_error = ""           # for users too: no file paths
        self._unsaved = None                    # type: Optional[bytes]
        self._checked_at = -1e9                 # monotonic time of the last stat
        self.check_interval = check_interval    # stat the file at most this often
        self.refreshes = 0
        self.refresh_failures = 0
        self.reload_if_changed()

    # -- reading the file ---------------------------------------------------
    def reload_if_changed(self, max_age: Optional[float] = None) -> None:
        """Re-read the file if it changed. While the login works, look at most
        once per ``check_interval`` (a stat per request is a syscall per request)."""
        now = time.monotonic()
        max_age = self.check_interval if max_age is None else max_age
        if now - self._checked_at < max_age and self._login is not None and not self._dead:
            return
        self._checked_at = now
        file_id = _file_id(self.path)
        if file_id is not None and file_id == self._file_id:
            return
        with self._lock:
            if file_id is not None and file_id == self._file_id:
                return
            self._load_locked()

    def _load_locked(self) -> None:
        try:
            raw, file_id = _read_file_with_id(self.path)
        except FileNotFoundError:
            if self._file_id is not None or self._login is None:
                self._set_problem_locked(
                    "%s not found; sign in with `codex login` or `python3 ocm.py login`"
                    % self.path,
                    None, "the owner's login file is missing; the owner must sign in")
            return
        except OSError as exc:
            self._set_problem_locked("cannot read %s: %s" % (self.path, exc.strerror or exc), None,
                                     "the owner's login file cannot be read; the owner must fix "
                                     "its permissions")
            return
        try:
            login = parse_auth(parse_json(raw.decode("utf-8")))
        except (ValueError, UnicodeDecodeError) as exc:
            problem = "%s is not valid JSON (%s)" % (self.path, exc.__class__.__name__)
            if self._login is not None and self._problem == "":
                # A half-written file from a careless writer: keep serving the
                # last good login, and look again when the file changes.
                log.warning("credential %s: %s; keeping the previous login", self.tag, problem)
                self._file_id = file_id
                return
            self._set_problem_locked(problem, file_id, "the owner's login file is damaged "
                                     "(not valid JSON); the owner must sign in again")
            return
        except CredentialProblem as exc:  # names no path
            self._set_problem_locked(str(exc), file_id, str(exc))
            return
        if self._login is not None and self._file_id is not None:
            log.info("credential %s: %s changed on disk; using the new login", self.tag, self.path)
        self._login = login
        self._file_id = file_id
        self._problem = self._public_problem = ""
        self._dead = ""
        self._retry_at = 0.0
        self._unsaved = None

    def _set_problem_locked(self, problem: str, file_id, public: str) -> None:
        if problem != self._problem:
            log.warning("credential %s unavailable: %s", self.tag, problem)
        self._login = None
        self._problem = problem
        self._public_problem = public
        self._file_id = file_id
        self._dead = ""
        self._unsaved = None

    # -- state --------------------------------------------------------------
    def peek(self) -> Tuple[Optional[Login], str]:
        """(login or None, problem) without refreshing: for the owner's status
        lines (the problem may name the file)."""
        self.reload_if_changed()
        with self._lock:
            return self._login, (self._dead or self._problem)

    def public_problem(self) -> str:
        """Why this login cannot be used, in words for users: the owner's
        file paths stay in the owner's log. "" when it can be used."""
        self.reload_if_changed()
        with self._lock:
            return self._dead or self._public_problem

    def current(self) -> Login:
        """The login to use now, refreshed first if it is about to expire.

        Raises HTTPError 503 when there is no usable file and 401 after a
        permanent refresh failure (the owner must sign in again).
        """
        self.reload_if_changed()
        login = self._check_usable()
        if self._unsaved is not None:
            self._retry_save()
        if needs_refresh(login, self._now()):
            login = self.refresh(login.access_token)
        return login

    def _check_usable(self) -> Login:
        with self._lock:
            login, problem, dead = self._login, self._public_problem, self._dead
        if dead:
            raise HTTPError(401, "authentication_error", dead)
        if login is None:
            raise HTTPError(503, "api_error", "credential unavailable: " + problem)
        return login

    # -- refreshing ---------------------------------------------------------
    def refresh(self, stale_access_token: str) -> Login:
        """Refresh if ``stale_access_token`` is still the current one.

        Called proactively (token about to expire) and reactively (upstream
        answered 401 to that token). Returns the login to use, which is the
        new one, or one another thread or process refreshed meanwhile.
        """
        with self._refresh_lock:
            self.reload_if_changed(max_age=0)
            login = self._check_usable()
            now = self._now()
            if login.access_token != stale_access_token and not needs_refresh(login, now):
                return login  # another thread refreshed while we waited
            if now < self._retry_at:
                return self._after_failure(login, now)
            try:
                with file_lock(auth_lock_path(self.path)):
                    login = self._refresh_under_file_lock(stale_access_token)
            except RefreshFailed as exc:
                self.refresh_failures += 1
                self._last_refresh_error = exc.public
                if exc.permanent:
                    message = ("the owner's ChatGPT login has expired or was revoked (%s); "
                               "the owner must sign in again (`codex login` or "
                               "`python3 ocm.py login`)" % exc.public)
                    log.error("credential %s: refresh failed permanently: %s", self.tag, exc)
                    with self._lock:
                        self._dead = message
                    raise HTTPError(401, "authentication_error", message)
                log.warning("credential %s: token refresh failed: %s; retrying in %d s",
                            self.tag, exc, REFRESH_RETRY)
                self._retry_at = now + REFRESH_RETRY
                return self._after_failure(self._check_usable(), now)
            except TimeoutError as exc:  # names the lock file
                self._retry_at = now + REFRESH_RETRY
                self._last_refresh_error = "the owner's login file is locked by another program"
                log.warning("credential %s: %s", self.tag, exc)
                return self._after_failure(self._check_usable(), now)
            return login

    def _after_failure(self, login: Login, now: float) -> Login:
        """After a transient failure: keep using a token that still works."""
        if not is_expired(login, now):
            return login
        raise HTTPError(503, "api_error", "credential unavailable: token refresh failed (%s); "
                        "retrying in %d s" % (self._last_refresh_error or "unknown error",
                                              max(1, int(self._retry_at - now))))

    def _refresh_under_file_lock(self, stale_access_token: str) -> Login:
        # Re-read the file under the lock: the Codex CLI may have refreshed it.
        try:
            raw, file_id = _read_file_with_id(self.path)
            data = parse_json(raw.decode("utf-8"))
            on_disk = parse_auth(data)
        except (OSError, ValueError, UnicodeDecodeError, CredentialProblem) as exc:
            if self._unsaved is None:
                raise RefreshFailed("cannot re-read %s: %s" % (self.path, exc), permanent=False,
                                    public="cannot re-read the owner's login file")
            data, on_disk, file_id = parse_json(self._unsaved.decode("utf-8")), self._login, None
        with self._lock:
            current = self._login
            unsaved = self._unsaved is not None and file_id == self._file_id
        if unsaved:
            on_disk = current  # the file still holds tokens we already rotated past
            data = parse_json(self._unsaved.decode("utf-8"))
        elif current is None or (on_disk.access_token, on_disk.refresh_token) != (
                current.access_token, current.refresh_token):
            with self._lock:  # someone else wrote new tokens: adopt them
                self._login, self._file_id, self._problem, self._dead = on_disk, file_id, "", ""
                self._public_problem = ""
                self._unsaved = None
            log.info("credential %s: %s was refreshed by another process; using it",
                     self.tag, self.path)
            if (on_disk.access_token != stale_access_token
                    and not needs_refresh(on_disk, self._now())):
                return on_disk
        if not on_disk.refresh_token:
            raise RefreshFailed("auth.json has no refresh_token", permanent=True)
        tokens = self._call_token_endpoint(on_disk.refresh_token)
        now = self._now()
        stored = data.get("tokens") if isinstance(data.get("tokens"), dict) else {}
        data["tokens"] = stored
        for name in ("id_token", "access_token", "refresh_token"):
            if isinstance(tokens.get(name), str) and tokens[name]:
                stored[name] = tokens[name]
        data["last_refresh"] = format_rfc3339(now)
        new_login = parse_auth(data)
        encoded = (json.dumps(data, indent=2) + "\n").encode("utf-8")
        self.refreshes += 1
        self._retry_at = 0.0
        with self._lock:
            self._login, self._problem, self._public_problem, self._dead = new_login, "", "", ""
        log.info("credential %s: access token refreshed", self.tag)
        self._save(encoded)
        return new_login

    def _save(self, encoded: bytes) -> None:
        try:
            write_file_atomic(self.path, encoded, 0o600)
        except OSError as exc:
            # The old refresh token on disk is dead now; keep the new one in
            # memory and keep trying, or the next restart logs the owner out.
            with self._lock:
                first = self._unsaved is None
                self._unsaved = encoded
            if first:
                log.error("credential %s: cannot save refreshed tokens to %s (%s); "
                          "keeping them in memory and retrying", self.tag, self.path,
                          exc.strerror or exc)
            return
        file_id = _file_id(self.path)
        with self._lock:
            self._file_id = file_id
            if self._unsaved is not None:
                log.info("credential %s: refreshed tokens saved to %s", self.tag, self.path)
            self._unsaved = None

    def _retry_save(self) -> None:
        with self._lock:
            encoded = self._unsaved
        if encoded is not None and self._refresh_lock.acquire(blocking=False):
            try:
                with file_lock(auth_lock_path(self.path), timeout=1.0):
                    self._save(encoded)
            except TimeoutError:
                pass
            finally:
                self._refresh_lock.release()

    def _call_token_endpoint(self, refresh_token: str) -> Dict[str, Any]:
        body = json.dumps({"client_id": OAUTH_CLIENT_ID, "grant_type": "refresh_token",
                           "refresh_token": refresh_token}).encode("utf-8")
        try:
            status, answer, _ = post_for_json(self._open_url, self.token_url, body)
        except EndpointUnreachable as exc:
            raise RefreshFailed("token endpoint %s" % str(exc).split(" ", 1)[1], permanent=False)
        if 200 <= status < 300:
            if not isinstance(answer, dict) or not any(
                    isinstance(answer.get(k), str) and answer[k]
                    for k in ("access_token", "refresh_token", "id_token")):
                raise RefreshFailed("token endpoint answered %d without tokens" % status,
                                    permanent=False)
            return answer
        code = log_safe(refresh_error_code(answer))
        if code == NO_CODEX_ENTITLEMENT:  # not a dead login: it works once the admin enables Codex
            raise RefreshFailed("token endpoint answered %d: %s"
                                % (status, NO_CODEX_ENTITLEMENT_TEXT), permanent=False)
        message = log_safe(refresh_error_message(answer))
        text = "token endpoint answered %d%s%s" % (status, " " + code if code else "",
                                                   ": " + message if message else "")
        raise RefreshFailed(text, permanent=status == 401 or code in PERMANENT_REFRESH_CODES)


# == 6. Sign-in ==============================================================
# `ocm.py login`: the box gets its own ChatGPT login, so it never shares a
# refresh-token chain with a laptop (shared/LOGIN.md has the protocol).

class LoginFailed(OCMError):
    """Signing in (or out) did not work; the message says why in plain words."""


class DeviceCodeUnavailable(LoginFailed):
    """The issuer answered 404 to the user-code request: no device codes here."""


class IssuerUnreachable(LoginFailed):
    """No HTTP answer at all from the issuer (DNS, network, timeout)."""


class WrongCallback(OCMError):
    """A callback that is not for this sign-in; ignored, and the wait goes on."""


class DeviceCode(namedtuple("DeviceCode", "device_auth_id user_code interval verification_url")):
    """A device-code sign-in in progress; ``interval``: seconds between polls, already floored."""
    __slots__ = ()


# Callback errors in plain words; anything else is shown as the issuer sent it.
CALLBACK_ERRORS = {
    NO_CODEX_ENTITLEMENT: NO_CODEX_ENTITLEMENT_TEXT,
    "access_denied": "the sign-in was cancelled, or access was denied, in the browser.",
}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def call_issuer(open_url: Callable, url: str, body: bytes,
                content_type: str = "application/json") -> Tuple[int, Any, bytes]:
    """post_for_json, with "no answer at all" as a sign-in failure."""
    try:
        return post_for_json(open_url, url, body, content_type)
    except EndpointUnreachable as exc:
        raise IssuerUnreachable(str(exc))


def issuer_error_text(answer: Any, raw: bytes) -> str:
    """error_description, else error.message, else error (a string or
    error.code), else the body."""
    if refresh_error_code(answer) == NO_CODEX_ENTITLEMENT:
        return NO_CODEX_ENTITLEMENT_TEXT
    if isinstance(answer, dict):
        error = answer.get("error")
        candidates = [answer.get("error_description")]
        if isinstance(error, dict):
            candidates += [error.get("message"), error.get("code")]
        candidates.append(error)
        for text in candidates:
            if isinstance(text, str) and text:
                return text
    text = " ".join(raw.decode("utf-8", "replace").split())
    return text[:300] or "an empty answer"


def parse_poll_interval(value: Any, floor: float) -> float:
    """Seconds between polls from a string ("5") or a number; never under ``floor``."""
    if isinstance(value, bool):
        value = None
    try:
        seconds = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        seconds = 0.0
    return max(seconds if math.isfinite(seconds) else 0.0, floor)


def request_device_code(issuer: str, open_url: Callable,
                        interval_floor: float = DEVICE_POLL_FLOOR) -> DeviceCode:
    """Step 1 of the device-code flow. Raises DeviceCodeUnavailable on 404."""
    body = json.dumps({"client_id": OAUTH_CLIENT_ID}).encode("utf-8")
    status, answer, raw = call_issuer(open_url, issuer + "/api/accounts/deviceauth/usercode", body)
    if status == 404:
        raise DeviceCodeUnavailable("device-code sign-in is not enabled for this account "
                                    "or server")
    if not 200 <= status < 300:
        raise LoginFailed("asking for a device code failed: %d %s"
                          % (status, issuer_error_text(answer, raw)))
    answer = answer if isinstance(answer, dict) else {}
    device_auth_id = answer.get("device_auth_id")
    user_code = answer.get("user_code") or answer.get("usercode")
    if not (isinstance(device_auth_id, str) and device_auth_id
            and isinstance(user_code, str) and user_code):
        raise LoginFailed("the issuer's device-code answer has no device_auth_id or user_code")
    return DeviceCode(device_auth_id, user_code,
                      parse_poll_interval(answer.get("interval"), interval_floor),
                      issuer + "/codex/device")


def wait_for_device_code(issuer: str, open_url: Callable, device: DeviceCode, timeout: float,
                         sleep: Callable[[float], None],
                         now: Callable[[], float]) -> Tuple[str, str]:
    """Poll until the user has entered the code: (authorization_code, code_verifier).

    First poll at once, then every ``device.interval``; 403 and 404 mean "not
    yet", and so does a network blip. Any other status is fatal.
    """
    url = issuer + "/api/accounts/deviceauth/token"
    body = json.dumps({"device_auth_id": device.device_auth_id,
                       "user_code": device.user_code}).encode("utf-8")
    deadline = now() + timeout
    while True:
        try:
            status, answer, raw = call_issuer(open_url, url, body)
        except IssuerUnreachable:
            status, answer, raw = 0, None, b""
        if 200 <= status < 300:
            answer = answer if isinstance(answer, dict) else {}
            code, verifier = answer.get("authorization_code"), answer.get("code_verifier")
            if not (isinstance(code, str) and code and isinstance(verifier, str) and verifier):
                raise LoginFailed("the issuer confirmed the code without authorization_code or "
                                  "code_verifier")
            return code, verifier
        if status not in (0, 403, 404) or refresh_error_code(answer) == NO_CODEX_ENTITLEMENT:
            raise LoginFailed("device-code sign-in failed: %d %s"
                              % (status, issuer_error_text(answer, raw)))
        if now() + device.interval > deadline:
            raise LoginFailed("the code was not entered within %g minutes; run login again"
                              % (timeout / 60))
        sleep(device.interval)


def exchange_code(issuer: str, open_url: Callable, code: str, redirect_uri: str,
                  verifier: str) -> Dict[str, str]:
    """Authorization code to {id_token, access_token, refresh_token}, all required."""
    form = urllib.parse.urlencode([
        ("grant_type", "authorization_code"), ("client_id", OAUTH_CLIENT_ID), ("code", code),
        ("redirect_uri", redirect_uri), ("code_verifier", verifier)]).encode("ascii")
    status, answer, raw = call_issuer(open_url, issuer + "/oauth/token", form,
                                      "application/x-www-form-urlencoded")
    if not 200 <= status < 300:
        raise LoginFailed("the token exchange failed: %d %s"
                          % (status, issuer_error_text(answer, raw)))
    answer = answer if isinstance(answer, dict) else {}
    tokens = {name: answer.get(name) for name in ("id_token", "access_token", "refresh_token")}
    if not all(isinstance(value, str) and value for value in tokens.values()):
        raise LoginFailed("the token exchange answered without id_token, access_token and "
                          "refresh_token")
    return tokens


def sign_in_with_device_code(issuer: str, open_url: Callable, out,
                             interval_floor: float = DEVICE_POLL_FLOOR,
                             timeout: float = LOGIN_TIMEOUT,
                             sleep: Callable[[float], None] = time.sleep,
                             now: Callable[[], float] = time.time) -> Dict[str, str]:
    device = request_device_code(issuer, open_url, interval_floor)
    print("\nTo sign in with ChatGPT:\n"
          "  1. Open this page on any device and sign in:\n"
          "       %s\n"
          "  2. Enter this one-time code (it expires in 15 minutes):\n"
          "       %s\n\n"
          "Device codes are a favourite of phishers: enter this one only if you started\n"
          "this login yourself, and never give it to anyone.\n\n"
          "Waiting for the code to be entered..." % (device.verification_url, device.user_code),
          file=out, flush=True)
    code, verifier = wait_for_device_code(issuer, open_url, device, timeout, sleep, now)
    return exchange_code(issuer, open_url, code, issuer + "/deviceauth/callback", verifier)


def new_pkce() -> Tuple[str, str]:
    """(verifier, S256 challenge): 64 random bytes, base64url without padding."""
    verifier = _b64url(os.urandom(64))
    return verifier, _b64url(hashlib.sha256(verifier.encode("ascii")).digest())


def authorize_url(issuer: str, redirect_uri: str, challenge: str, state: str) -> str:
    return issuer + "/oauth/authorize?" + urllib.parse.urlencode([
        ("response_type", "code"), ("client_id", OAUTH_CLIENT_ID), ("redirect_uri", redirect_uri),
        ("scope", LOGIN_SCOPE), ("code_challenge", challenge), ("code_challenge_method", "S256"),
        ("id_token_add_organizations", "true"), ("codex_cli_simplified_flow", "true"),
        ("state", state), ("originator", "codex_cli_rs")], quote_via=urllib.parse.quote)


def parse_callback(text: str) -> Dict[str, str]:
    """The parameters of a pasted callback: a whole URL, a path with a query, or a bare query."""
    text = text.strip()
    if "://" in text:
        query = urllib.parse.urlsplit(text).query
    else:
        query = text.split("?", 1)[1] if "?" in text else text
    return dict(urllib.parse.parse_qsl(query.split("#", 1)[0], keep_blank_values=True))


def code_from_callback(params: Dict[str, str], state: str) -> str:
    """The authorization code of a callback for this sign-in.

    Raises WrongCallback for one that is not ours (no or another state, no
    code) and LoginFailed when the issuer reports an error.
    """
    got = params.get("state", "")
    if not got:
        raise WrongCallback("it has no state; paste the whole address")
    if not hmac.compare_digest(got.encode("utf-8"), state.encode("utf-8")):
        raise WrongCallback("its state does not match this sign-in (is it from an earlier "
                            "attempt?)")
    error = params.get("error")
    if error:
        description = params.get("error_description", "")
        plain = CALLBACK_ERRORS.get(error)
        if plain:
            raise LoginFailed(plain + (" (%s)" % description if description else ""))
        raise LoginFailed("the issuer refused the sign-in: %s%s"
                          % (error, ": " + description if description else ""))
    code = params.get("code")
    if not code:
        raise WrongCallback("it has no code")
    return code


class _CallbackServer(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:  # no getfqdn() DNS lookup, as in OCMServer
        socketserver.TCPServer.server_bind(self)


def start_callback_listener(ports, deliver: Callable[[Dict[str, str]], Tuple[int, str]]):
    """Listen on 127.0.0.1 at the first free one of ``ports`` (0: any) for the
    browser's GET /auth/callback; ``deliver(params)`` gives (status, page text).
    Returns the running server, or None when no port was free."""

    class Handler(BaseHTTPRequestHandler):
        timeout = 10

        def do_GET(self):
            parts = urllib.parse.urlsplit(self.path)
            if parts.path != "/auth/callback":
                status, text = 404, "Not an OCM sign-in address."
            else:
                status, text = deliver(dict(urllib.parse.parse_qsl(parts.query,
                                                                    keep_blank_values=True)))
            body = (text + "\n").encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True

        def log_message(self, *args) -> None:  # the query holds the code: never log it
            pass

    for port in ports:
        try:
            server = _CallbackServer(("127.0.0.1", port), Handler)
        except OSError:
            continue
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                         name="ocm-login-callback", daemon=True).start()
        return server
    return None


def _feed_lines(stdin, results: "queue.Queue") -> None:
    """Thread: every pasted line into ``results``, then ("eof", "")."""
    try:
        if stdin is not None:
            for line in iter(stdin.readline, ""):
                results.put(("paste", line))
    except (OSError, ValueError):
        pass
    results.put(("eof", ""))


def sign_in_with_browser(issuer: str, open_url: Callable, stdin, out,
                         ports=LOGIN_CALLBACK_PORTS, timeout: float = LOGIN_TIMEOUT,
                         now: Callable[[], float] = time.time) -> Dict[str, str]:
    """PKCE sign-in, completed by a pasted callback URL or by the browser
    reaching 127.0.0.1 itself (locally or through an SSH tunnel): first wins."""
    import queue  # sign-in only; not worth its start-up time for the server
    verifier, challenge = new_pkce()
    state = _b64url(os.urandom(32))
    results = queue.Queue()  # type: queue.Queue

    def deliver(params: Dict[str, str]) -> Tuple[int, str]:
        try:
            results.put(("code", code_from_callback(params, state)))
        except WrongCallback as exc:
            return 400, "OCM ignored this callback: %s." % exc
        except LoginFailed as exc:
            results.put(("failed", str(exc)))
            return 200, "Sign-in failed: %s" % exc
        return 200, "OCM got the sign-in. You can close this tab and go back to the terminal."

    server = start_callback_listener(ports, deliver)
    port = server.server_address[1] if server else LOGIN_CALLBACK_PORTS[0]
    redirect_uri = "http://127.0.0.1:%d/auth/callback" % port
    print("\nOpen this address in a browser on any device and sign in with ChatGPT:\n\n"
          "  %s\n\n"
          "The browser then lands on %s?code=... and the page does\n"
          "not load. That is expected: copy the whole address from the address bar.\n"
          % (authorize_url(issuer, redirect_uri, challenge, state), redirect_uri), file=out)
    if server:
        print("(A browser on this box, or one tunnelled with `ssh -L %d:127.0.0.1:%d BOX`,\n"
              "completes the sign-in by itself.)\n" % (port, port), file=out)
    else:
        print("(OCM cannot listen for the browser here, so pasting is the only way.)\n", file=out)
    print("Paste the address (or just the part after ?) and press Enter:", file=out, flush=True)
    threading.Thread(target=_feed_lines, args=(stdin, results), name="ocm-login-paste",
                     daemon=True).start()
    try:
        code = _wait_for_code(results, state, server is not None, timeout, now, out)
    finally:
        if server:
            server.shutdown()
            server.server_close()
    return exchange_code(issuer, open_url, code, redirect_uri, verifier)


def _wait_for_code(results: "queue.Queue", state: str, listening: bool, timeout: float,
                   now: Callable[[], float], out) -> str:
    import queue
    deadline, last_problem = now() + timeout, ""
    while True:
        left = deadline - now()
        if left <= 0:
            raise LoginFailed("no sign-in arrived within %g minutes; run login again"
                              % (timeout / 60))
        try:
            kind, value = results.get(timeout=min(left, 1.0))
        except queue.Empty:
            continue
        if kind == "code":
            return value
        if kind == "failed":
            raise LoginFailed(value)
        if kind == "eof":
            if not listening:
                raise LoginFailed("no usable callback address was pasted" +
                                  (" (the last one: %s)" % last_problem if last_problem else ""))
            print("(Input closed; still waiting for the browser.)", file=out, flush=True)
            continue
        if not value.strip():
            continue
        try:
            return code_from_callback(parse_callback(value), state)
        except WrongCallback as exc:
            last_problem = str(exc)
            print("That address was not accepted: %s. Paste the address from this sign-in:"
                  % exc, file=out, flush=True)


def read_auth_object(path: str) -> Optional[Dict[str, Any]]:
    """auth.json as a dict; None when missing. Raises LoginFailed when unreadable."""
    try:
        with open(path, "rb") as fh:
            data = parse_json(fh.read().decode("utf-8"))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LoginFailed("cannot read %s: %s" % (path, exc.strerror or exc))
    except (ValueError, UnicodeDecodeError):
        raise LoginFailed("%s is not valid JSON" % path)
    if not isinstance(data, dict):
        raise LoginFailed("%s is not a JSON object" % path)
    return data


def has_login(data: Optional[Dict[str, Any]]) -> bool:
    """True if an auth.json holds any token or an API key: replacing it loses something."""
    if not data:
        return False
    tokens = data.get("tokens")
    if isinstance(tokens, dict) and any(isinstance(tokens.get(name), str) and tokens[name]
                                        for name in ("id_token", "access_token", "refresh_token")):
        return True
    return isinstance(data.get("OPENAI_API_KEY"), str) and bool(data["OPENAI_API_KEY"])


def _refresh_token_of(data: Optional[Dict[str, Any]]) -> str:
    tokens = data.get("tokens") if data else None
    value = tokens.get("refresh_token") if isinstance(tokens, dict) else None
    return value if isinstance(value, str) else ""


def auth_json_for(tokens: Dict[str, str], now: float,
                  keep: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """auth.json for a fresh login, as the Codex CLI writes it, plus the
    fields of ``keep`` that OCM does not know."""
    claims = decode_jwt_claims(tokens["id_token"]).get("https://api.openai.com/auth")
    account_id = claims.get("chatgpt_account_id") if isinstance(claims, dict) else None
    data = {
        "auth_mode": "chatgpt",
        "OPENAI_API_KEY": None,
        "tokens": {"id_token": tokens["id_token"], "access_token": tokens["access_token"],
                   "refresh_token": tokens["refresh_token"],
                   "account_id": (account_id if isinstance(account_id, str) and account_id
                                  else None)},
        "last_refresh": format_rfc3339(now),
    }  # type: Dict[str, Any]
    for key, value in (keep or {}).items():
        data.setdefault(key, value)
    return data


def save_login(path: str, tokens: Dict[str, str], now: float) -> Tuple[Login, str]:
    """Write a new login to ``path`` under auth.lock: (the login, the refresh
    token it replaced or "").

    The old refresh token is read under the same lock as the write, so it is
    the one really replaced even if a running OCM rotated it meanwhile.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    with file_lock(auth_lock_path(path)):
        try:
            old = read_auth_object(path)
        except LoginFailed:
            old = None  # a broken file is exactly what a new login fixes
        data = auth_json_for(tokens, now, keep=old)
        write_json_atomic(path, data, 0o600)
    old_refresh = _refresh_token_of(old)
    return parse_auth(data), "" if old_refresh == tokens["refresh_token"] else old_refresh


def remove_login(path: str) -> Optional[str]:
    """Drop the tokens (and last_refresh) from auth.json under auth.lock, keeping
    every other field. Returns the refresh token removed ("" if none), or None
    when there were no tokens to remove."""
    if not os.path.exists(path):
        return None  # and no auth.lock to create in a directory that may not exist
    with file_lock(auth_lock_path(path)):
        data = read_auth_object(path)
        if data is None or "tokens" not in data:
            return None
        refresh = _refresh_token_of(data)
        del data["tokens"]
        data.pop("last_refresh", None)
        write_json_atomic(path, data, 0o600)
    return refresh


def revoke_refresh_token(issuer: str, open_url: Callable, token: str) -> None:
    """Tell the issuer this refresh token is done with. Raises LoginFailed."""
    body = json.dumps({"token": token, "token_type_hint": "refresh_token",
                       "client_id": OAUTH_CLIENT_ID}).encode("utf-8")
    status, answer, raw = call_issuer(open_url, issuer + "/oauth/revoke", body)
    if not 200 <= status < 300:
        raise LoginFailed("the issuer answered %d: %s" % (status, issuer_error_text(answer, raw)))


# == 7. Pricing and usage ====================================================

# USD per 1M tokens: (pattern, input, output, cached input, premium triple or
# None). The premium triple applies when the context window is the premium one
# (input over 272,000 tokens). sing-box's table (service/ocm/service_usage.go),
# row for row, so a usage file written by either program prices the same.
# Walked top to bottom per tier; the first pattern that matches wins.
PRICE_TABLE = {
    "default": (
        (r"^gpt-5\.4-pro(?:$|-)",                    30.0,  180.0,  30.0,   (60.0, 270.0, 60.0)),
        (r"^gpt-5\.4(?:$|-)",                         2.5,   15.0,   0.25,  (5.0, 22.5, 0.5)),
        (r"^gpt-5\.3-codex(?:$|-)",                   1.75,  14.0,   0.175, None),
        (r"^gpt-5\.2-codex(?:$|-)",                   1.75,  14.0,   0.175, None),
        (r"^gpt-5\.1-codex-max(?:$|-)",               1.25,  10.0,   0.125, None),
        (r"^gpt-5\.1-codex-mini(?:$|-)",              0.25,   2.0,   0.025, None),
        (r"^gpt-5\.1-codex(?:$|-)",                   1.25,  10.0,   0.125, None),
        (r"^gpt-5-codex-mini(?:$|-)",                 0.25,   2.0,   0.025, None),
        (r"^gpt-5-codex(?:$|-)",                      1.25,  10.0,   0.125, None),
        (r"^gpt-5\.2-chat-latest$",                   1.75,  14.0,   0.175, None),
        (r"^gpt-5\.1-chat-latest$",                   1.25,  10.0,   0.125, None),
        (r"^gpt-5-chat-latest$",                      1.25,  10.0,   0.125, None),
        (r"^gpt-5\.2-pro(?:$|-)",                    21.0,  168.0,  21.0,   None),
        (r"^gpt-5-pro(?:$|-)",                       15.0,  120.0,  15.0,   None),
        (r"^gpt-5-mini(?:$|-)",                       0.25,   2.0,   0.025, None),
        (r"^gpt-5-nano(?:$|-)",                       0.05,   0.4,   0.005, None),
        (r"^gpt-5\.2(?:$|-)",                         1.75,  14.0,   0.175, None),
        (r"^gpt-5\.1(?:$|-)",                         1.25,  10.0,   0.125, None),
        (r"^gpt-5(?:$|-)",                            1.25,  10.0,   0.125, None),
        (r"^o4-mini-deep-research(?:$|-)",            2.0,    8.0,   0.5,   None),
        (r"^o4-mini(?:$|-)",                          1.1,    4.4,   0.275, None),
        (r"^o3-pro(?:$|-)",                          20.0,   80.0,  20.0,   None),
        (r"^o3-deep-research(?:$|-)",                10.0,   40.0,   2.5,   None),
        (r"^o3-mini(?:$|-)",                          1.1,    4.4,   0.55,  None),
        (r"^o3(?:$|-)",                               2.0,    8.0,   0.5,   None),
        (r"^o1-pro(?:$|-)",                         150.0,  600.0, 150.0,   None),
        (r"^o1-mini(?:$|-)",                          1.1,    4.4,   0.55,  None),
        (r"^o1(?:$|-)",                              15.0,   60.0,   7.5,   None),
        (r"^gpt-4o-mini-audio(?:$|-)",                0.15,   0.6,   0.15,  None),
        (r"^gpt-audio-mini(?:$|-)",                   0.6,    2.4,   0.6,   None),
        (r"^(?:gpt-4o-audio|gpt-audio)(?:$|-)",       2.5,   10.0,   2.5,   None),
        (r"^gpt-4\.1-nano(?:$|-)",                    0.1,    0.4,   0.025, None),
        (r"^gpt-4\.1-mini(?:$|-)",                    0.4,    1.6,   0.1,   None),
        (r"^gpt-4\.1(?:$|-)",                         2.0,    8.0,   0.5,   None),
        (r"^gpt-4o-mini(?:$|-)",                      0.15,   0.6,   0.075, None),
        (r"^gpt-4o(?:$|-)",                           2.5,   10.0,   1.25,  None),
        (r"^chatgpt-4o(?:$|-)",                       2.5,   10.0,   1.25,  None),
    ),
    "flex": (
        (r"^gpt-5\.4-pro(?:$|-)",                    15.0,   90.0,  15.0,   (30.0, 135.0, 30.0)),
        (r"^gpt-5\.4(?:$|-)",                         1.25,   7.5,   0.125, (2.5, 11.25, 0.25)),
        (r"^gpt-5-mini(?:$|-)",                       0.125,  1.0,   0.0125, None),
        (r"^gpt-5-nano(?:$|-)",                       0.025,  0.2,   0.0025, None),
        (r"^gpt-5\.2(?:$|-)",                         0.875,  7.0,   0.0875, None),
        (r"^gpt-5\.1(?:$|-)",                         0.625,  5.0,   0.0625, None),
        (r"^gpt-5(?:$|-)",                            0.625,  5.0,   0.0625, None),
        (r"^o4-mini(?:$|-)",                          0.55,   2.2,   0.138, None),
        (r"^o3(?:$|-)",                               1.0,    4.0,   0.25,  None),
    ),
    "priority": (
        (r"^gpt-5\.4(?:$|-)",                         5.0,   30.0,   0.5,   (10.0, 45.0, 1.0)),
        (r"^gpt-5\.3-codex(?:$|-)",                   3.5,   28.0,   0.35,  None),
        (r"^gpt-5\.2-codex(?:$|-)",                   3.5,   28.0,   0.35,  None),
        (r"^gpt-5\.1-codex-max(?:$|-)",               2.5,   20.0,   0.25,  None),
        (r"^gpt-5\.1-codex(?:$|-)",                   2.5,   20.0,   0.25,  None),
        (r"^gpt-5-codex-mini(?:$|-)",                 0.45,   3.6,   0.045, None),
        (r"^gpt-5-codex(?:$|-)",                      2.5,   20.0,   0.25,  None),
        (r"^gpt-5-mini(?:$|-)",                       0.45,   3.6,   0.045, None),
        (r"^gpt-5\.2(?:$|-)",                         3.5,   28.0,   0.35,  None),
        (r"^gpt-5\.1(?:$|-)",                         2.5,   20.0,   0.25,  None),
        (r"^gpt-5(?:$|-)",                            2.5,   20.0,   0.25,  None),
        (r"^o4-mini(?:$|-)",                          2.0,    8.0,   0.5,   None),
        (r"^o3(?:$|-)",                               3.5,   14.0,   0.875, None),
        (r"^gpt-4\.1-nano(?:$|-)",                    0.2,    0.8,   0.05,  None),
        (r"^gpt-4\.1-mini(?:$|-)",                    0.7,    2.8,   0.175, None),
        (r"^gpt-4\.1(?:$|-)",                         3.5,   14.0,   0.875, None),
        (r"^gpt-4o-mini(?:$|-)",                      0.25,   1.0,   0.125, None),
        (r"^gpt-4o(?:$|-)",                           4.25,  17.0,   2.125, None),
    ),
}
FALLBACK_PRICES = (2.5, 10.0, 1.25)   # gpt-4o, for models no row knows
DEFAULT_CONTEXT_WINDOW = 272000
PREMIUM_CONTEXT_WINDOW = 1050000


@functools.lru_cache(maxsize=None)
def price_rows(tier: str) -> tuple:
    """A tier's rows with compiled patterns, compiled on first use (not at start)."""
    return tuple((re.compile(row[0]),) + row[1:] for row in PRICE_TABLE[tier])


# Unknown "gpt-5.x..." names are priced as the family their suffix names.
_MODEL_NORMALISATION = (
    ("-codex-mini", "gpt-5.1-codex-mini"), ("-codex-max", "gpt-5.1-codex-max"),
    ("-codex", "gpt-5.3-codex"), ("-chat-latest", "gpt-5.2-chat-latest"), ("-pro", "gpt-5.4-pro"),
    ("-mini", "gpt-5-mini"), ("-nano", "gpt-5-nano"),
)


def normalize_service_tier(tier: Any) -> str:
    """"", auto, default, scale and anything unknown are priced as default;
    "fast" is what clients call priority (and what OCM sends as priority)."""
    tier = tier.strip().lower() if isinstance(tier, str) else ""
    if tier == "fast":
        return "priority"
    return tier if tier in ("flex", "priority") else "default"


def normalize_model(model: str) -> str:
    if not model.startswith("gpt-5."):
        return model
    for suffix, family in _MODEL_NORMALISATION:
        if suffix in model:
            return family
    return "gpt-5.4"


def find_price_row(model: str, tier: str):
    """The table row pricing (model, tier), following pricing.md's lookup; None
    when no row matches (then gpt-4o prices apply)."""
    tier = normalize_service_tier(tier)
    normalized = normalize_model(model)
    tiers = (tier,) if tier == "default" else (tier, "default")
    for table in tiers:
        for name in (model, normalized) if normalized != model else (model,):
            for row in price_rows(table):
                if row[0].search(name):
                    return row
    return None


def context_window_for(model: str, tier: str, input_tokens: int) -> int:
    """Premium only above 272,000 input tokens, and only for families with premium prices."""
    if input_tokens > DEFAULT_CONTEXT_WINDOW:
        row = find_price_row(model, tier)
        if row is not None and row[4] is not None:
            return PREMIUM_CONTEXT_WINDOW
    return DEFAULT_CONTEXT_WINDOW


def prices_for(model: str, tier: str, context_window: int) -> Tuple[float, float, float]:
    row = find_price_row(model, tier)
    if row is None:
        return FALLBACK_PRICES
    if context_window == PREMIUM_CONTEXT_WINDOW and row[4] is not None:
        return row[4]
    return row[1], row[2], row[3]


def round_cents(value: float) -> float:
    """Cents, rounding halves away from zero exactly like Go's math.Round(v*100)/100."""
    scaled = value * 100
    whole = math.trunc(scaled)
    if abs(scaled - whole) >= 0.5:
        whole += math.copysign(1, scaled)
    return whole / 100


def raw_cost(input_tokens: int, output_tokens: int, cached_tokens: int,
             model: str, tier: str, context_window: int) -> float:
    """USD before rounding: ((input - cached) x in + output x out + cached x cached-in) / 1e6."""
    price_in, price_out, price_cached = prices_for(model, tier, context_window)
    regular = max(0, input_tokens - cached_tokens)
    return (regular * price_in + output_tokens * price_out
            + cached_tokens * price_cached) / 1000000


class Counts:
    """Requests and tokens of one (combination, user)."""
    __slots__ = ("request_count", "input_tokens", "output_tokens", "cached_tokens")

    def __init__(self, request_count: int = 0, input_tokens: int = 0, output_tokens: int = 0,
                 cached_tokens: int = 0):
        self.request_count = request_count
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self.cached_tokens = cached_tokens

    def add(self, requests: int, input_tokens: int, output_tokens: int,
            cached_tokens: int) -> None:
        self.request_count += requests
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        self.cached_tokens += cached_tokens

    def cost(self, combo: "Combination") -> float:
        return round_cents(raw_cost(self.input_tokens, self.output_tokens, self.cached_tokens,
                                    combo.model, combo.service_tier, combo.context_window))

    def to_json(self, cost: float) -> Dict[str, Any]:
        return {"request_count": self.request_count, "input_tokens": self.input_tokens,
                "output_tokens": self.output_tokens, "cached_tokens": self.cached_tokens,
                "cost_usd": cost}

    @classmethod
    def from_json(cls, data: Any, where: str) -> "Counts":
        """Accepts sing-box's older prompt_tokens/completion_tokens names."""
        if not isinstance(data, dict):
            raise ValueError("%s: expected an object" % where)

        def number(*names: str) -> int:
            for name in names:
                value = data.get(name)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and value:
                    return int(value)
            return 0

        return cls(number("request_count"), number("input_tokens", "prompt_tokens"),
                   number("output_tokens", "completion_tokens"), number("cached_tokens"))


class Combination:
    """Usage for one (model, service tier, context window, week)."""
    __slots__ = ("model", "service_tier", "context_window", "week_start", "total", "by_user")

    def __init__(self, model: str, service_tier: str, context_window: int,
                 week_start: Optional[int]):
        self.model = model
        self.service_tier = service_tier
        self.context_window = context_window
        self.week_start = week_start
        self.total = Counts()
        self.by_user = {}  # type: Dict[str, Counts]

    @property
    def key(self) -> Tuple[str, str, int, Optional[int]]:
        return (self.model, self.service_tier, self.context_window, self.week_start)


def week_label(week_start: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(week_start)) + " UTC+0"


def week_start_from_headers(headers) -> Optional[int]:
    """Start of the subscription week: the weekly window's reset-at minus its
    length (PROTOCOL.md section 7), in whichever position it comes. Without a
    weekly window (a free plan's month) there is no week. ``headers`` has a
    case-insensitive get()."""
    active = (headers.get("x-codex-active-limit") or "codex").strip().lower().replace("_", "-")
    for name in ("primary", "secondary"):
        reset_at = headers.get("x-%s-%s-reset-at" % (active, name))
        minutes = headers.get("x-%s-%s-window-minutes" % (active, name))
        try:
            if int(float(minutes)) == 7 * 24 * 60:
                return int(float(reset_at)) - int(float(minutes)) * 60
        except (TypeError, ValueError, OverflowError):
            continue
    return None


class UsageRecord(namedtuple("UsageRecord",
                             "model service_tier input_tokens output_tokens cached_tokens "
                             "response_id", defaults=("",))):
    """One response's usage, as every relay path reports it to the book; and
    the id of a Responses answer, which a later request may continue from."""
    __slots__ = ()


def _int_field(obj: Any, *path: str) -> int:
    for name in path:
        if not isinstance(obj, dict):
            return 0
        obj = obj.get(name)
    return (int(obj) if isinstance(obj, (int, float)) and not isinstance(obj, bool) and obj > 0
            else 0)


def usage_record_from(obj: Any, fallback_model: str = "",
                      fallback_tier: str = "") -> Optional[UsageRecord]:
    """Usage from a Responses object or a chat completion (or chunk); None without usage."""
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return None
    if "input_tokens" in usage or "output_tokens" in usage:
        tokens = (_int_field(usage, "input_tokens"), _int_field(usage, "output_tokens"),
                  _int_field(usage, "input_tokens_details", "cached_tokens"))
    else:  # chat completions
        tokens = (_int_field(usage, "prompt_tokens"), _int_field(usage, "completion_tokens"),
                  _int_field(usage, "prompt_tokens_details", "cached_tokens"))
    model = obj.get("model")
    tier = obj.get("service_tier")
    # Either may be the client's own words (upstream left them out): made safe
    # here, once, for every book, metric and log line the record reaches.
    model = model if isinstance(model, str) and model else fallback_model or "unknown"
    tier = tier if isinstance(tier, str) and tier else fallback_tier
    response_id = obj.get("id") if "input_tokens" in usage else None
    response_id = response_id if isinstance(response_id, str) and len(response_id) <= 200 else ""
    return UsageRecord(log_safe(model), log_safe(tier), *tokens, response_id=response_id)


# Terminal Responses events whose response carries billable usage.
USAGE_EVENT_TYPES = frozenset(("response.completed", "response.incomplete"))


def usage_record_from_event(event: Any, fallback_model: str = "",
                            fallback_tier: str = "") -> Optional[UsageRecord]:
    """Usage from one streamed event: a Responses terminal event (SSE or
    WebSocket) or a chat-completion chunk that carries usage."""
    if not isinstance(event, dict):
        return None
    if event.get("type") in USAGE_EVENT_TYPES:
        return usage_record_from(event.get("response"), fallback_model, fallback_tier)
    if "choices" in event or event.get("object") == "chat.completion.chunk":
        return usage_record_from(event, fallback_model, fallback_tier)
    return None


class UsageBook:
    """Usage and cost per user, model, tier, context window and week, in
    sing-box's usage-file format (PROTOCOL.md section 8).

    ``record()`` is the one accounting entry point for HTTP, SSE and WebSocket.
    A daemon thread saves the file every ``save_interval`` seconds when
    something changed; ``close()`` saves a last time.
    """

    def __init__(self, path: str, save_interval: float = 60.0,
                 now: Callable[[], float] = time.time):
        self.path = path
        self.save_interval = save_interval
        self._now = now
        self._lock = threading.Lock()       # the combinations
        self._save_lock = threading.Lock()  # one writer at a time
        self._combos = {}  # type: Dict[Tuple[str, str, int, Optional[int]], Combination]
        self._last_updated = None  # type: Optional[float]
        self._dirty = False
        self._save_failing = False
        self._stop = threading.Event()
        self._thread = None  # type: Optional[threading.Thread]

    # -- loading --------------------------------------------------------------
    def load(self, repair: bool = True) -> None:
        """Continue from the file. A damaged file is moved aside, never lost
        (with ``repair=False`` it raises ValueError instead: for reports)."""
        try:
            with open(self.path, "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            if not repair:
                raise
            return
        except OSError as exc:
            if not repair:
                raise
            raise ConfigError("usages_path: cannot read %s (%s)"
                              % (self.path, exc.strerror or exc))
        try:
            self._merge_json(parse_json(raw.decode("utf-8")))
        except (ValueError, UnicodeDecodeError) as exc:
            if not repair:
                raise ValueError(str(exc))
            aside = move_aside(self.path, self._now())
            with self._lock:
                self._combos.clear()
            log.error("usage file %s is damaged (%s); moved it to %s and started an empty book",
                      self.path, exc, aside)

    def _merge_json(self, data: Any) -> None:
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        combos = data.get("combinations") or []
        if not isinstance(combos, list):
            raise ValueError("combinations is not a list")
        for i, entry in enumerate(combos):
            where = "combinations[%d]" % i
            if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
                raise ValueError("%s has no model" % where)
            tier = normalize_service_tier(entry.get("service_tier"))
            window = entry.get("context_window")
            window = (window if window in (DEFAULT_CONTEXT_WINDOW, PREMIUM_CONTEXT_WINDOW)
                      else DEFAULT_CONTEXT_WINDOW)
            week = entry.get("week_start_unix")
            week = (int(week)
                    if isinstance(week, (int, float)) and not isinstance(week, bool) and week > 0
                    else None)
            total = Counts.from_json(entry.get("total", {}), where + ".total")
            by_user = entry.get("by_user") or {}
            if not isinstance(by_user, dict):
                raise ValueError("%s.by_user is not an object" % where)
            with self._lock:
                combo = self._combination(entry["model"], tier, window, week)
                combo.total.add(total.request_count, total.input_tokens, total.output_tokens,
                                total.cached_tokens)
                for user, stats in by_user.items():
                    counts = Counts.from_json(stats, "%s.by_user.%s" % (where, user))
                    combo.by_user.setdefault(user, Counts()).add(
                        counts.request_count, counts.input_tokens, counts.output_tokens,
                        counts.cached_tokens)
        self._last_updated = parse_rfc3339(data.get("last_updated"))

    def _combination(self, model: str, tier: str, window: int, week: Optional[int]) -> Combination:
        key = (model, tier, window, week)
        combo = self._combos.get(key)
        if combo is None:
            combo = self._combos[key] = Combination(model, tier, window, week)
        return combo

    # -- recording ------------------------------------------------------------
    def record(self, user: str, usage: UsageRecord, week_start: Optional[int] = None) -> float:
        """Count one response for ``user`` ("" when access is open). Returns its
        cost in USD (unrounded), for budgets and metrics."""
        tier = normalize_service_tier(usage.service_tier)
        model, user = log_safe(usage.model), log_safe(user)
        window = context_window_for(model, tier, usage.input_tokens)
        with self._lock:
            combo = self._combination(model, tier, window, week_start)
            combo.total.add(1, usage.input_tokens, usage.output_tokens, usage.cached_tokens)
            if user:
                counts = combo.by_user.get(user)
                if counts is None:
                    counts = combo.by_user[user] = Counts()
                counts.add(1, usage.input_tokens, usage.output_tokens, usage.cached_tokens)
            self._last_updated = self._now()
            self._dirty = True
        return raw_cost(usage.input_tokens, usage.output_tokens, usage.cached_tokens,
                        model, tier, window)

    # -- the file -------------------------------------------------------------
    def to_json(self) -> Dict[str, Any]:
        with self._lock:
            combos = list(self._combos.values())
            snapshot = [(c, Counts(c.total.request_count, c.total.input_tokens,
                                   c.total.output_tokens, c.total.cached_tokens),
                         {u: Counts(s.request_count, s.input_tokens, s.output_tokens,
                                    s.cached_tokens)
                          for u, s in c.by_user.items()}) for c in combos]
            last_updated = self._last_updated
        total_usd = 0.0
        by_user = {}  # type: Dict[str, float]
        by_week = {}  # type: Dict[str, float]
        by_user_and_week = {}  # type: Dict[str, Dict[str, float]]
        out = []
        for combo, total, users in snapshot:
            cost = total.cost(combo)
            total_usd += cost
            label = week_label(combo.week_start) if combo.week_start is not None else None
            if label:
                by_week[label] = by_week.get(label, 0.0) + cost
            entry = {"model": combo.model, "service_tier": combo.service_tier,
                     "context_window": combo.context_window}
            if combo.week_start is not None:
                entry["week_start_unix"] = combo.week_start
            entry["total"] = total.to_json(cost)
            entry["by_user"] = {}
            for user in sorted(users):
                user_cost = users[user].cost(combo)
                entry["by_user"][user] = users[user].to_json(user_cost)
                by_user[user] = by_user.get(user, 0.0) + user_cost
                if label:
                    weeks = by_user_and_week.setdefault(user, {})
                    weeks[label] = weeks.get(label, 0.0) + user_cost
            out.append(entry)
        return {
            "last_updated": format_rfc3339(last_updated if last_updated is not None
                                           else self._now()),
            "costs": {
                "total_usd": round_cents(total_usd),
                "by_user": {u: round_cents(v) for u, v in sorted(by_user.items())},
                "by_week": {w: round_cents(v) for w, v in sorted(by_week.items())},
                "by_user_and_week": {u: {w: round_cents(v) for w, v in sorted(weeks.items())}
                                     for u, weeks in sorted(by_user_and_week.items())},
            },
            "combinations": out,
        }

    def save(self) -> bool:
        """Write the file now. False (logged once per failure spell) if it cannot."""
        with self._save_lock:
            with self._lock:
                self._dirty = False
            data = self.to_json()
            try:
                write_json_atomic(self.path, data, _existing_mode(self.path, 0o644))
            except OSError as exc:
                with self._lock:
                    self._dirty = True
                if not self._save_failing:
                    log.error("cannot save usage to %s (%s); keeping it in memory and retrying "
                              "every %g s", self.path, exc.strerror or exc, self.save_interval)
                self._save_failing = True
                return False
            if self._save_failing:
                log.info("usage saved to %s again", self.path)
            self._save_failing = False
            return True

    def save_if_dirty(self) -> bool:
        with self._lock:
            dirty = self._dirty
        return self.save() if dirty else True

    def start_saver(self) -> None:
        self._thread = threading.Thread(target=self._run_saver, name="ocm-usage-saver",
                                        daemon=True)
        self._thread.start()

    def _run_saver(self) -> None:
        while not self._stop.wait(self.save_interval):
            self.save_if_dirty()

    def close(self) -> None:
        """Stop the saver and save what is pending."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.save_if_dirty()


def _existing_mode(path: str, default: int) -> int:
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        return default


def check_writable_location(path: str, key: str = "usages_path") -> None:
    """Fail at start, not an hour later, when a file cannot be written where configured."""
    if os.path.isdir(path):
        raise ConfigError("%s: %s is a directory; name a file in it, such as %s"
                          % (key, path,
                             os.path.join(path, os.path.basename(key.replace("_path", ".json")))))
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ConfigError("%s: directory %s does not exist" % (key, directory))
    try:
        fd, probe = tempfile.mkstemp(prefix=".ocm-write-test.", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError("%s: cannot write in %s (%s)" % (key, directory, exc.strerror or exc))
    if os.path.exists(path) and not os.access(path, os.R_OK):
        raise ConfigError("%s: cannot read %s" % (key, path))


class UsageBooks:
    """The open usage books, one per file. A file has exactly one writer,
    however many accounts record into it: across a reload, the old and the
    new account of a tag share one book, and it closes (saving) when the last
    account using it closes."""

    def __init__(self, save_interval: float = 60.0):
        self.save_interval = save_interval
        self._lock = threading.Lock()
        self._open = {}  # type: Dict[str, List[Any]]  # absolute path -> [book, accounts using it]

    def open(self, path: str) -> UsageBook:
        """The book of ``path``, loaded and saving every save_interval; raises
        ConfigError when the file cannot be used."""
        key = os.path.abspath(path)
        with self._lock:
            entry = self._open.get(key)
            if entry is not None:
                entry[1] += 1
                return entry[0]
            check_writable_location(path)
            book = UsageBook(path, save_interval=self.save_interval)
            book.load()
            book.start_saver()
            self._open[key] = [book, 1]
            return book

    def release(self, book: UsageBook) -> None:
        key = os.path.abspath(book.path)
        with self._lock:
            entry = self._open.get(key)
            if entry is None or entry[0] is not book:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del self._open[key]
        book.close()

    def books(self) -> List[UsageBook]:
        with self._lock:
            return [entry[0] for entry in self._open.values()]


# == 8. Users ================================================================

def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


_CONTROL_CHARS = re.compile("[\x00-\x08\x0a-\x1f\x7f]")


class UserTable:
    """Bearer tokens to users. Lookup is by SHA-256 digest, then compare_digest,
    so timing says nothing about how close a guess was. A config may hold
    only the digest ("sha256:<hex>"), so it holds no usable secret."""

    def __init__(self, users: List[User]):
        self.users = list(users)
        self._by_digest = {u.token_digest: u for u in users}

    @property
    def is_open(self) -> bool:
        return not self.users

    def current(self, user: User) -> Optional[User]:
        """This table's entry for ``user`` (same name, same token), or None when
        the person was removed, renamed or given a new token: a long-lived
        WebSocket asks at every turn, so it follows a reload."""
        entry = self._by_digest.get(user.token_digest)
        return entry if entry is not None and entry.name == user.name else None

    def find(self, token: str) -> Optional[User]:
        """The user whose token this is, or None (the dashboard's sign-in)."""
        digest = token_digest(token)
        user = self._by_digest.get(digest)
        if user is None or not hmac.compare_digest(user.token_digest, digest):
            return None
        return user

    def authenticate(self, headers: "Headers") -> Optional[User]:
        """The user for these request headers; None when access is open.
        Raises HTTPError 401 with sing-box's messages."""
        if self.is_open:
            return None
        if any(_CONTROL_CHARS.search(value) for name in CLIENT_CREDENTIAL_HEADERS
               for value in headers.get_all(name)):
            raise HTTPError(401, "authentication_error", "invalid api key")
        value = headers.get("authorization")
        if not value and headers.get("x-api-key"):  # Anthropic clients send their key here
            value = "Bearer " + headers.get("x-api-key", "")
        if not value:
            raise HTTPError(401, "authentication_error", "missing api key")
        scheme, _, token = value.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise HTTPError(401, "authentication_error", "invalid api key format")
        digest = token_digest(token)
        user = self._by_digest.get(digest)
        if user is None or not hmac.compare_digest(user.token_digest, digest):
            raise HTTPError(401, "authentication_error", "invalid api key")
        return user


# == 9. HTTP parsing =========================================================

class Headers:
    """Header fields in arrival order, looked up case-insensitively."""
    __slots__ = ("_items", "_index")

    def __init__(self, items: Optional[List[Tuple[str, str]]] = None):
        self._items = list(items) if items else []  # type: List[Tuple[str, str]]
        index = self._index = {}  # type: Dict[str, List[str]]
        for name, value in self._items:  # inline, not add(): two dozen fields per request
            key = name.lower()
            if key in index:
                index[key].append(value)
            else:
                index[key] = [value]

    def add(self, name: str, value: str) -> None:
        self._items.append((name, value))
        self._index.setdefault(name.lower(), []).append(value)

    def get(self, name: str, default: Optional[str] = None) -> Optional[str]:
        values = self._index.get(name.lower())
        return values[0] if values else default

    def get_all(self, name: str) -> List[str]:
        return self._index.get(name.lower(), [])

    def items(self) -> List[Tuple[str, str]]:
        return self._items

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._index

    def has_token(self, name: str, token: str) -> bool:
        """True if a comma-separated header (Connection, Upgrade) lists ``token``."""
        token = token.lower()
        return any(part.strip().lower() == token for value in self.get_all(name)
                   for part in value.split(","))


_TOKEN_BYTES = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_BAD_VALUE_BYTES = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_BAD_TARGET_BYTES = re.compile(rb"[\x00-\x20\x7f-\xff]")  # URIs are ASCII (RFC 3986), the rest %XX
_HEX_SIZE = re.compile(rb"^[0-9A-Fa-f]{1,16}$")


def bad_request(message: str, status: int = 400) -> HTTPError:
    return HTTPError(status, "invalid_request_error", message, close=True)


class ClientRequest:
    """One request from a client, as it is read and relayed. What is said of
    it afterwards (status, user, model, tokens) lives on its ``record``."""
    __slots__ = ("method", "target", "version", "headers", "path", "query", "body", "body_kind",
                 "body_length", "body_read", "keep_alive", "record")

    def __init__(self, method: str, target: str, version: str, headers: Headers):
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.path = ""
        self.query = ""
        self.body = b""
        self.body_kind = "none"         # none | length | chunked
        self.body_length = 0
        self.body_read = False
        self.keep_alive = True
        self.record = RequestRecord(method, "", 0.0)

    # The record's fields the handler sets as it goes.
    @property
    def status(self) -> int:
        return self.record.status

    @status.setter
    def status(self, value: int) -> None:
        self.record.status = value

    @property
    def started(self) -> float:
        return self.record.started

    @started.setter
    def started(self, value: float) -> None:
        self.record.started = value


def parse_request_head(head: bytes, limits: Limits) -> ClientRequest:
    """A request head (through the blank line) into a ClientRequest, refusing
    anything ambiguous: such requests are how proxies get smuggled past."""
    lines = head[:-4].split(b"\r\n")
    request_line = lines[0]
    if len(request_line) > limits.max_request_line:
        raise bad_request("request line longer than %d bytes" % limits.max_request_line, 414)
    parts = request_line.split(b" ")
    if len(parts) != 3 or not parts[1]:
        raise bad_request("malformed request line")
    method, target, version = parts
    if not _TOKEN_BYTES.match(method):
        raise bad_request("malformed request method")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        if re.match(rb"^HTTP/\d\.\d$", version):
            raise bad_request("HTTP version %s is not supported; use HTTP/1.1"
                              % version.decode("ascii"), 505)
        raise bad_request("malformed HTTP version")
    if _BAD_TARGET_BYTES.search(target):
        raise bad_request("request target has spaces, control characters or bytes beyond ASCII")
    if len(lines) - 1 > limits.max_header_count:
        raise bad_request("more than %d header fields" % limits.max_header_count, 431)
    pairs = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise bad_request("obsolete header line folding is not accepted")
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN_BYTES.match(name):
            raise bad_request("invalid header name %r" % name[:40].decode("latin-1"))
        value = value.strip(b" \t")
        if _BAD_VALUE_BYTES.search(value) and \
                name.lower().decode("ascii") not in CLIENT_CREDENTIAL_HEADERS:
            # A credential with control characters is a wrong credential (401,
            # which SDKs report as such); it is never forwarded nor logged.
            raise bad_request("header %s has control characters" % name.decode("ascii"))
        pairs.append((name.decode("ascii"), value.decode("latin-1")))
    headers = Headers(pairs)
    text_version = version.decode("ascii")
    request = ClientRequest(method=method.decode("ascii"), target=target.decode("latin-1"),
                            version=text_version, headers=headers)
    _set_body_framing(request)
    if text_version == "HTTP/1.0":
        request.keep_alive = False
    elif headers.has_token("connection", "close"):
        request.keep_alive = False
    if request.target.startswith("/"):
        path, _, query = request.target.partition("?")
        request.path = request.record.path = path
        request.query = query
    return request


def parse_response_head(head: bytes) -> Tuple[int, str, Headers]:
    """An upstream response head (through the blank line): (status, reason, headers)."""
    lines = head[:-4].split(b"\r\n")
    match = re.match(rb"^HTTP/1\.[01] (\d{3})(?: (.*))?$", lines[0])
    if not match:
        raise ValueError("not an HTTP/1.x status line")
    headers = Headers()
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN_BYTES.match(name):
            raise ValueError("malformed header line")
        headers.add(name.decode("ascii"), value.strip(b" \t").decode("latin-1"))
    return int(match.group(1)), (match.group(2) or b"").decode("latin-1"), headers


def _set_body_framing(request: ClientRequest) -> None:
    headers = request.headers
    te = headers.get_all("transfer-encoding")
    cl = headers.get_all("content-length")
    if te and cl:
        raise bad_request("both Content-Length and Transfer-Encoding; send one")
    if te:
        if request.version == "HTTP/1.0":
            raise bad_request("Transfer-Encoding is not allowed in HTTP/1.0")
        codings = [c.strip().lower() for value in te for c in value.split(",")]
        if codings != ["chunked"]:
            raise bad_request("unsupported transfer coding %r; only chunked"
                              % ", ".join(codings), 400)
        request.body_kind = "chunked"
        return
    if cl:
        values = {v.strip() for value in cl for v in value.split(",")}
        if len(values) != 1:
            raise bad_request("conflicting Content-Length values")
        value = values.pop()
        if not value.isdigit() or not value.isascii() or len(value) > 18:
            raise bad_request("invalid Content-Length")
        request.body_kind = "length"
        request.body_length = int(value)


def set_socket_timeout(sock: socket.socket, timeout: Optional[float]) -> None:
    """settimeout only when it changes: each call is a system call (ioctl) that
    releases the GIL, and under load every release is a thread switch."""
    if sock.gettimeout() != timeout:
        sock.settimeout(timeout)


_TIMEVAL = struct.Struct("@ll")  # struct timeval; read back to be sure long holds time_t here


def set_kernel_timeout(sock: socket.socket, option: int, seconds: float) -> bool:
    """SO_RCVTIMEO or SO_SNDTIMEO set to ``seconds`` (0: none); True if the
    kernel reads it back as asked (a platform whose timeval differs fails)."""
    whole = int(seconds)
    try:
        sock.setsockopt(socket.SOL_SOCKET, option,
                        _TIMEVAL.pack(whole, int((seconds - whole) * 1000000)))
        back = _TIMEVAL.unpack(sock.getsockopt(socket.SOL_SOCKET, option, _TIMEVAL.size))
    except (OSError, struct.error):
        return False
    return abs(back[0] + back[1] / 1e6 - seconds) < 0.05


class SocketReader:
    """Buffered reads from a client socket with deadlines a slow client cannot stretch.

    With a ``rest_timeout`` (a client connection's send_timeout), a read waits
    in slices of at most that long, so the socket's timeouts need no change
    per request. A plain client socket goes further (use_kernel_timeouts):
    the kernel times its reads and writes out, and Python, seeing a blocking
    socket, no longer polls before each call: two system calls, each a GIL
    release and under load a thread switch, fewer per request."""
    __slots__ = ("sock", "buf", "rest_timeout", "kernel_read_timeout", "kernel_send_timeout")

    def __init__(self, sock: socket.socket, rest_timeout: Optional[float] = None):
        self.sock = sock
        self.buf = bytearray()
        self.rest_timeout = rest_timeout
        self.kernel_read_timeout = None  # type: Optional[float]  # None: Python's timeouts
        self.kernel_send_timeout = 0.0

    def use_kernel_timeouts(self, send_timeout: float) -> bool:
        """Kernel timeouts (SO_RCVTIMEO, SO_SNDTIMEO) on a blocking socket, if
        the platform takes them. Never under TLS: the ssl module retries a
        blocking read that timed out in the kernel, for ever."""
        sock, rest = self.sock, self.rest_timeout
        if rest is None or (ssl is not None and isinstance(sock, ssl.SSLSocket)) \
                or not hasattr(socket, "SO_RCVTIMEO") or not hasattr(socket, "SO_SNDTIMEO"):
            return False
        if not (set_kernel_timeout(sock, socket.SO_SNDTIMEO, send_timeout)
                and set_kernel_timeout(sock, socket.SO_RCVTIMEO, rest)):
            self.drop_kernel_timeouts()
            return False
        try:
            sock.settimeout(None)
        except OSError:
            return False
        self.kernel_read_timeout, self.kernel_send_timeout = rest, send_timeout
        return True

    def drop_kernel_timeouts(self) -> None:
        """No kernel timeouts (a WebSocket session times its peers itself)."""
        for option in ("SO_RCVTIMEO", "SO_SNDTIMEO"):
            if hasattr(socket, option):
                set_kernel_timeout(self.sock, getattr(socket, option), 0.0)
        self.kernel_read_timeout = None

    def keep_send_timeout(self, seconds: float) -> None:
        """Writes to the client time out after ``seconds``: a client that takes
        nothing is cut. Called before each answer (a read may have shortened
        Python's timeout for its deadline; a reload may have changed it)."""
        self.rest_timeout = seconds
        if self.kernel_read_timeout is None:
            set_socket_timeout(self.sock, seconds)
        elif self.kernel_send_timeout != seconds:
            if set_kernel_timeout(self.sock, socket.SO_SNDTIMEO, seconds):
                self.kernel_send_timeout = seconds

    def send_all(self, data: bytes) -> None:
        """sendall, with send_timeout for the whole write as Python's own
        timeout gives it. The kernel's bounds each send() alone, and a client
        taking a little within each would never be cut: past a partial send,
        the rest gets only what is left of the time."""
        sock = self.sock
        if self.kernel_read_timeout is None:
            sock.sendall(data)
            return
        started = time.monotonic()
        sent = sock.send(data)  # one system call when it fits, as almost every write does
        if sent == len(data):
            return
        view, limit = memoryview(data), self.kernel_send_timeout
        try:
            while sent < len(view):
                remaining = started + limit - time.monotonic()
                if remaining <= 0:
                    raise socket.timeout("the client took nothing for %g s" % limit)
                set_kernel_timeout(sock, socket.SO_SNDTIMEO, max(remaining, 0.001))
                sent += sock.send(view[sent:])
        finally:
            set_kernel_timeout(sock, socket.SO_SNDTIMEO, limit)

    def _recv(self, deadline: float) -> bytes:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("deadline passed")
            rest = self.rest_timeout
            short = rest is None or remaining < rest
            if self.kernel_read_timeout is not None:
                # (at least a millisecond: a zero timeval would mean no timeout)
                wait = max(remaining, 0.001) if short else rest
                if self.kernel_read_timeout != wait:  # each differs for a deadline this near
                    set_kernel_timeout(self.sock, socket.SO_RCVTIMEO, wait)
                    self.kernel_read_timeout = wait
            elif short:
                self.sock.settimeout(remaining)
            else:
                set_socket_timeout(self.sock, rest)
            try:
                return self.sock.recv(RELAY_CHUNK)
            except (socket.timeout, BlockingIOError):  # the kernel's: EAGAIN
                if short:
                    raise socket.timeout("deadline passed")
                # one slice passed, not the deadline: wait again
            except (ConnectionError, OSError) as exc:
                raise ClientGone(str(exc))

    def read_head(self, idle_timeout: float, head_timeout: float, max_line: int,
                  max_size: int, silence_is_idle: bool = True,
                  deadline: Optional[float] = None) -> Optional[bytes]:
        """One message head through its blank line; None if the peer closed, or
        stayed silent for ``idle_timeout`` before its first byte (a keep-alive
        client; for an upstream answer, ``silence_is_idle=False`` makes that a
        socket.timeout). The whole head must arrive within ``head_timeout`` of
        the first byte, however slowly it drips; with a ``deadline`` (monotonic),
        silence and head together must end by then instead (a connection that
        has not authenticated)."""
        if not self.buf:
            try:
                wait_until = time.monotonic() + idle_timeout if deadline is None else deadline
                data = self._recv(wait_until)
            except socket.timeout:
                if not silence_is_idle:
                    raise
                return None
            if not data:
                return None
            self.buf += data
        if deadline is None:
            deadline = time.monotonic() + head_timeout
        start = 0
        while True:
            end = self.buf.find(b"\r\n\r\n", start)
            first_line_end = self.buf.find(b"\r\n")
            if first_line_end < 0 or first_line_end > max_line:
                if len(self.buf) > max_line or first_line_end > max_line:
                    raise bad_request("request line longer than %d bytes" % max_line, 414)
            elif (end if end >= 0 else len(self.buf)) - first_line_end > max_size:
                raise bad_request("header fields larger than %d bytes" % max_size, 431)
            if end >= 0:
                head = bytes(self.buf[:end + 4])
                del self.buf[:end + 4]
                return head
            start = max(0, len(self.buf) - 3)
            try:
                data = self._recv(deadline)
            except socket.timeout:
                raise bad_request("request head not received within %g s" % head_timeout, 408)
            if not data:
                raise ClientGone("closed in the middle of a message head")
            self.buf += data

    def read_exact(self, size: int, deadline: float) -> bytes:
        """``size`` bytes, all by ``deadline`` (monotonic): dripping bytes
        one at a time cannot stretch it."""
        while len(self.buf) < size:
            try:
                data = self._recv(deadline)
            except socket.timeout:
                raise bad_request("request body not received in time (limits.body_timeout)", 408)
            if not data:
                raise ClientGone("closed in the middle of a request body")
            self.buf += data
        out = bytes(self.buf[:size])
        del self.buf[:size]
        return out

    def wait_for_websocket_message(self, max_payload: int, timeout: float) -> None:
        """Consume client frames until a whole data message or a close has come,
        the connection ends or ``timeout`` passes, whichever is first."""
        parser = FrameParser(from_client=True, max_payload=max_payload)
        deadline = time.monotonic() + timeout
        data = bytes(self.buf)
        self.buf.clear()
        with contextlib.suppress(OSError, ClientGone, WebSocketError):
            while True:
                for frame in parser.feed(data):
                    if frame.opcode == WS_CLOSE or (frame.fin and frame.opcode in WS_DATA_OPCODES):
                        return
                data = self._recv(deadline)
                if not data:
                    return

    def discard_until_close(self, limit: int, deadline: float) -> None:
        """Read and drop what arrives until the peer closes, ``limit`` bytes
        or ``deadline`` (monotonic)."""
        self.buf.clear()
        with contextlib.suppress(OSError, ClientGone):
            while limit > 0:
                data = self._recv(deadline)
                if not data:
                    return
                limit -= len(data)

    def read_until_close(self, limit: int, timeout: float) -> bytes:
        """Whatever arrives until the peer closes, ``limit`` bytes or ``timeout``."""
        deadline = time.monotonic() + timeout
        with contextlib.suppress(OSError, ClientGone):
            while len(self.buf) < limit:
                data = self._recv(deadline)
                if not data:
                    break
                self.buf += data
        out = bytes(self.buf[:limit])
        self.buf.clear()
        return out

    def read_line(self, max_length: int, deadline: float) -> bytes:
        start = 0
        while True:
            end = self.buf.find(b"\r\n", start)
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[:end + 2]
                return line
            if len(self.buf) > max_length:
                raise bad_request("chunk framing line too long")
            start = max(0, len(self.buf) - 1)
            try:
                data = self._recv(deadline)
            except socket.timeout:
                raise bad_request("request body not received in time (limits.body_timeout)", 408)
            if not data:
                raise ClientGone("closed in the middle of a request body")
            self.buf += data


def read_chunked_body(reader: SocketReader, max_size: int, timeout: float,
                      min_rate: float = 0.0) -> bytes:
    """A chunked request body, strictly framed (RFC 9112 section 7.1), all of
    it within ``timeout`` seconds plus, with a ``min_rate``, the time each
    announced chunk takes at that many bytes a second."""
    body = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        line = reader.read_line(4096, deadline)
        size_text = line.split(b";", 1)[0]
        if not _HEX_SIZE.match(size_text):
            raise bad_request("invalid chunk size line")
        size = int(size_text, 16)
        if size == 0:
            break
        if len(body) + size > max_size:
            raise HTTPError(413, "invalid_request_error",
                            "request body larger than %d bytes" % max_size, close=True)
        if min_rate:
            deadline += size / min_rate
        body += reader.read_exact(size, deadline)
        if reader.read_exact(2, deadline) != b"\r\n":
            raise bad_request("chunk data not followed by CRLF")
    for _ in range(64):  # trailer fields: read and drop
        if not reader.read_line(8192, deadline):
            return bytes(body)
    raise bad_request("too many trailer fields")


WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def websocket_accept(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + WS_GUID).encode("ascii")).digest()).decode("ascii")


# == 10. Upstream ============================================================

class Origin(namedtuple("Origin", "scheme host port")):
    __slots__ = ()

    @property
    def is_tls(self) -> bool:
        return self.scheme in ("https", "wss")


class BaseURL(namedtuple("BaseURL", "origin path")):
    """A parsed upstream base URL: where to connect and the path prefix."""
    __slots__ = ()

    @classmethod
    def parse(cls, url: str) -> "BaseURL":
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(Origin(parts.scheme, parts.hostname or "", port), parts.path.rstrip("/"))


SOCKS5_REPLIES = {
    1: "general failure", 2: "connection not allowed by its rules", 3: "network unreachable",
    4: "host unreachable", 5: "connection refused", 6: "TTL expired", 7: "command not supported",
    8: "address type not supported",
}


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ProxyError("the proxy closed the connection")
        data += chunk
    return data


def _host_port(host: str, port: int) -> str:
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def tunnel_http_connect(sock: socket.socket, proxy: ProxyURL, origin: Origin,
                        timeout: float) -> None:
    """Ask an HTTP proxy for a tunnel (CONNECT, RFC 9110 9.3.6)."""
    target = _host_port(origin.host, origin.port)
    lines = ["CONNECT %s HTTP/1.1" % target, "Host: %s" % target]
    if proxy.username or proxy.password:
        credentials = ("%s:%s" % (proxy.username, proxy.password)).encode("utf-8")
        lines.append("Proxy-Authorization: Basic " + base64.b64encode(credentials).decode("ascii"))
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    reader = SocketReader(sock)
    try:
        head = reader.read_head(timeout, timeout, 8192, 65536, silence_is_idle=False)
        if head is None:
            raise ProxyError("the proxy closed the connection")
        status, reason, _ = parse_response_head(head)
    except (ClientGone, HTTPError, ValueError):
        raise ProxyError("the proxy did not answer CONNECT with HTTP")
    if not 200 <= status < 300:
        raise ProxyError("the proxy answered %d %s" % (status, reason))
    if reader.buf:
        raise ProxyError("the proxy sent data before the tunnel was used")


def tunnel_socks5(sock: socket.socket, proxy: ProxyURL, origin: Origin) -> None:
    """SOCKS5 CONNECT (RFC 1928), with username/password auth (RFC 1929).
    socks5 resolves the name here; socks5h lets the proxy resolve it."""
    methods = b"\x00\x02" if proxy.username or proxy.password else b"\x00"
    sock.sendall(b"\x05" + bytes((len(methods),)) + methods)
    version, method = _recv_exact(sock, 2)
    if version != 5:
        raise ProxyError("the proxy does not speak SOCKS5")
    if method == 0xFF:
        raise ProxyError("the SOCKS5 proxy accepts none of our authentication methods"
                         + ("" if proxy.username else " (it may want a username and password)"))
    if method == 0x02:
        user, password = proxy.username.encode("utf-8")[:255], proxy.password.encode("utf-8")[:255]
        sock.sendall(b"\x01" + bytes((len(user),)) + user + bytes((len(password),)) + password)
        if _recv_exact(sock, 2)[1] != 0:
            raise ProxyError("the SOCKS5 proxy rejected the username or password")
    elif method != 0x00:
        raise ProxyError("the SOCKS5 proxy chose an authentication method we did not offer")
    address = _socks5_address(origin.host, origin.port, remote_dns=proxy.scheme == "socks5h")
    sock.sendall(b"\x05\x01\x00" + address + origin.port.to_bytes(2, "big"))
    version, reply, _, atyp = _recv_exact(sock, 4)
    if reply != 0:
        raise ProxyError("the SOCKS5 proxy could not connect: %s"
                         % SOCKS5_REPLIES.get(reply, "error %d" % reply))
    length = {1: 4, 4: 16}.get(atyp)
    if length is None:
        length = _recv_exact(sock, 1)[0]
    _recv_exact(sock, length + 2)  # the proxy's bound address and port


def _socks5_address(host: str, port: int, remote_dns: bool) -> bytes:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if remote_dns:
            name = host.encode("idna")
            return b"\x03" + bytes((len(name),)) + name
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ProxyError("cannot resolve %s here (%s); socks5h:// lets the proxy resolve it"
                             % (host, exc.strerror))
        ip = ipaddress.ip_address(infos[0][4][0])
    return (b"\x01" if ip.version == 4 else b"\x04") + ip.packed


def environment_proxies() -> Dict[str, str]:
    """*_proxy variables as urllib reads them (urllib loads only if there are any)."""
    if not any(name.lower().endswith("_proxy") for name in os.environ):
        return {}
    import urllib.request
    return urllib.request.getproxies_environment()


def env_proxy_for(origin: Origin, proxies: Dict[str, str]) -> Optional[ProxyURL]:
    """https_proxy / http_proxy / all_proxy and no_proxy, as curl and urllib read them."""
    url = proxies.get("https" if origin.is_tls else "http") or proxies.get("all")
    if not url:
        return None
    import urllib.request
    if urllib.request.proxy_bypass_environment(origin.host, proxies):
        return None
    if "://" not in url:
        url = "http://" + url
    try:
        return parse_proxy_url(url, "proxy environment variable")
    except ConfigError as exc:
        log.warning("%s; connecting directly", exc)
        return None


NO_SSL_MESSAGE = ("this Python has no ssl module, which https needs "
                  "(OpenWrt: opkg install python3-openssl)")


def require_ssl_for(config: "Config") -> None:
    """Refuse to start on a Python without ssl when an upstream is https: every
    request would fail."""
    if ssl is None:
        for key in ("chatgpt_url", "api_url", "token_url"):
            url = getattr(config.upstream, key)
            if url.lower().startswith("https:"):
                raise ConfigError("upstream.%s is %s, but %s" % (key, url, NO_SSL_MESSAGE))


class Connector:
    """Opens every upstream socket: relay, WebSocket and token calls alike.
    Direct, through the configured detour, or else through https_proxy /
    no_proxy from the environment; TLS always verified, never optional."""

    def __init__(self, connect_timeout: float, read_timeout: float,
                 detour: Optional[ProxyURL] = None):
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.detour = detour
        self._env_proxies = {} if detour else environment_proxies()
        self._ssl = None
        self._ssl_lock = threading.Lock()

    def proxy_for(self, origin: Origin) -> Optional[ProxyURL]:
        return self.detour or env_proxy_for(origin, self._env_proxies)

    def ssl_context(self):
        """The system's trust store plus SSL_CERT_FILE / SSL_CERT_DIR, which add
        to it (OpenSSL alone would let them replace it)."""
        with self._ssl_lock:
            if self._ssl is None:
                if ssl is None:  # an OSError, so callers answer 502 with this text
                    raise OSError(NO_SSL_MESSAGE)
                context = ssl.create_default_context()
                paths = ssl.get_default_verify_paths()
                with contextlib.suppress(OSError, ssl.SSLError):
                    if paths.openssl_cafile and os.path.isfile(paths.openssl_cafile):
                        context.load_verify_locations(cafile=paths.openssl_cafile)
                    if paths.openssl_capath and os.path.isdir(paths.openssl_capath):
                        context.load_verify_locations(capath=paths.openssl_capath)
                context.set_alpn_protocols(["http/1.1"])
                self._ssl = context
            return self._ssl

    def open(self, origin: Origin, read_timeout: Optional[float] = None) -> socket.socket:
        """A connected socket to ``origin`` with TCP_NODELAY and the read timeout set.
        Raises OSError (ssl.SSLError for TLS) or ProxyError."""
        proxy = self.proxy_for(origin)
        if proxy is None:
            sock = socket.create_connection((origin.host, origin.port),
                                            timeout=self.connect_timeout)
        else:
            try:
                sock = socket.create_connection((proxy.host, proxy.port),
                                                timeout=self.connect_timeout)
            except OSError as exc:
                raise ProxyError("cannot reach proxy %s: %s"
                                 % (proxy, describe_connect_error(exc)))
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if proxy is not None:
                try:
                    if proxy.scheme == "http":
                        tunnel_http_connect(sock, proxy, origin, self.connect_timeout)
                    else:
                        tunnel_socks5(sock, proxy, origin)
                except socket.timeout:
                    raise ProxyError("proxy %s did not answer within %g s"
                                     % (proxy, self.connect_timeout))
                except ProxyError as exc:
                    raise ProxyError("proxy %s: %s" % (proxy, exc))
                except OSError as exc:
                    raise ProxyError("proxy %s failed: %s" % (proxy, describe_connect_error(exc)))
            if origin.is_tls:
                sock = self.ssl_context().wrap_socket(sock, server_hostname=origin.host)
            sock.settimeout(self.read_timeout if read_timeout is None else read_timeout)
        except BaseException:
            sock.close()
            raise
        return sock


MAX_UPSTREAM_HEADERS = 256
MAX_INTERIM_RESPONSES = 16  # 1xx answers skipped before a final one; past this, a broken upstream


def is_interim_status(status: int) -> bool:
    """1xx answers that precede the final one (RFC 9110 15.2); 101 ends the exchange."""
    return 100 <= status < 200 and status != http.client.SWITCHING_PROTOCOLS


def read_response_headers(fp) -> Headers:
    """Header lines of an upstream response into Headers (obs-fold joined)."""
    pairs = []  # type: List[Tuple[str, str]]
    name = value = None
    for _ in range(MAX_UPSTREAM_HEADERS + 1):
        line = fp.readline(65537)
        if len(line) > 65536:
            raise http.client.LineTooLong("header line")
        if line in (b"\r\n", b"\n", b""):
            if name is not None:
                pairs.append((name, value))
            return Headers(pairs)
        if line[:1] in (b" ", b"\t") and name is not None:  # obsolete folding
            value += " " + line.strip(b" \t\r\n").decode("latin-1")
            continue
        if name is not None:
            pairs.append((name, value))
        raw_name, sep, raw_value = line.partition(b":")
        if not sep:
            raise http.client.HTTPException("malformed header line from upstream")
        name = raw_name.strip(b" \t").decode("latin-1")
        value = raw_value.strip(b" \t\r\n").decode("latin-1")
    raise http.client.HTTPException("more than %d header lines from upstream"
                                    % MAX_UPSTREAM_HEADERS)


class FastResponse(http.client.HTTPResponse):
    """http.client's response with the header block read into OCM's Headers
    instead of through the email package, which cost a third of the relay's
    CPU. Everything else (status line, chunked bodies, read1) is http.client's;
    begin() is its own logic, unchanged from 3.8 to 3.13."""

    def __init__(self, sock, *args, **kwargs):
        super().__init__(sock, *args, **kwargs)
        # The socket itself: with Connection: close, http.client hands it to
        # the response and forgets it on the connection (conn.sock is None),
        # yet the hang-up watcher must still be able to cut it.
        self.raw_sock = sock

    def begin(self) -> None:
        if self.headers is not None:
            return
        # Interim answers (100 Continue, 102 Processing, 103 Early Hints) come
        # before the real one; taken as final, the real answer would stay
        # unread on a pooled connection for the next request, anyone's, to read.
        for _ in range(MAX_INTERIM_RESPONSES + 1):
            version, status, reason = self._read_status()
            if not is_interim_status(status):
                break
            read_response_headers(self.fp)  # the interim answer's own headers
        else:
            raise http.client.HTTPException("more than %d interim answers" % MAX_INTERIM_RESPONSES)
        self.code = self.status = status
        self.reason = reason.strip()
        if version in ("HTTP/1.0", "HTTP/0.9"):
            self.version = 10
        elif version.startswith("HTTP/1."):
            self.version = 11
        else:
            raise http.client.UnknownProtocol(version)
        self.headers = self.msg = read_response_headers(self.fp)
        tr_enc = self.headers.get("transfer-encoding")
        self.chunked = bool(tr_enc) and tr_enc.lower() == "chunked"
        self.chunk_left = None
        self.will_close = self._check_close()
        self.length = None
        length = self.headers.get("content-length")
        if length and not self.chunked:
            try:
                self.length = int(length)
            except ValueError:
                self.length = None
            else:
                if self.length < 0:
                    self.length = None
        if status in (204, 304) or 100 <= status < 200 or self._method == "HEAD":
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True
        if status == http.client.SWITCHING_PROTOCOLS:
            self.will_close = True  # a 101 we never asked for: the connection is another protocol


class UpstreamConnection(http.client.HTTPConnection):
    """http.client connection opened by a Connector (proxy, TLS, timeouts)."""

    response_class = FastResponse

    def __init__(self, origin: Origin, connector: Connector, read_timeout: Optional[float] = None):
        super().__init__(origin.host, origin.port, timeout=connector.connect_timeout)
        self.origin = origin
        self.connector = connector
        self.read_timeout = read_timeout
        self.idle_since = 0.0

    def connect(self) -> None:
        self.sock = self.connector.open(self.origin, self.read_timeout)

    def send_request(self, method: str, path: str, headers: List[Tuple[str, str]],
                     body: Optional[bytes]) -> None:
        """putrequest, then the header lines as one block: every name and value
        was checked when the request was parsed (or the config loaded), so the
        per-header checks of putheader would only cost time."""
        self.putrequest(method, path, skip_accept_encoding=True)
        self._output("\r\n".join("%s: %s" % item for item in headers).encode("latin-1"))
        self.endheaders(body)

    def _send_output(self, message_body=None, encode_chunked=False):
        # Send head and a bytes body in one write: one packet for small POSTs.
        if isinstance(message_body, (bytes, bytearray)) and not encode_chunked:
            self._buffer.extend((b"", b""))
            msg = b"\r\n".join(self._buffer)
            del self._buffer[:]
            self.send(msg + message_body if len(message_body) <= SMALL_BODY else msg)
            if len(message_body) > SMALL_BODY:
                self.send(message_body)
            return
        super()._send_output(message_body, encode_chunked=encode_chunked)


def is_socket_stale(sock) -> bool:
    """True if an idle pooled socket has data or EOF waiting: the server gave up
    on it, or sent more than its last answer held. Under TLS, bytes already
    decrypted wait inside the TLS object, where poll cannot see them."""
    try:
        if getattr(sock, "pending", None) is not None and sock.pending():
            return True
        if hasattr(select, "poll"):  # select() fails above 1024 descriptors
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN)
            return bool(poller.poll(0))
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable)
    except (OSError, ValueError):
        return True


class UpstreamPool:
    """Idle keep-alive connections per origin, so repeat requests skip TCP and TLS setup.

    A connection goes back only after its response was read completely and the
    server did not ask to close it; anything else is closed.
    """

    def __init__(self, connector: Connector, idle_seconds: float = POOL_IDLE_SECONDS,
                 max_idle: int = POOL_MAX_IDLE_PER_ORIGIN):
        self.connector = connector
        self.idle_seconds = idle_seconds
        self.max_idle = max_idle
        self._idle = {}  # type: Dict[Origin, List[UpstreamConnection]]
        self._lock = threading.Lock()
        self.opened = 0

    def acquire(self, origin: Origin) -> Tuple[UpstreamConnection, bool]:
        """(connection, reused). Opens a new one when no healthy idle one is left."""
        now = time.monotonic()
        while True:
            with self._lock:
                idle = self._idle.get(origin)
                conn = idle.pop() if idle else None
            if conn is None:
                break
            # Checked however briefly it idled (one poll, about a microsecond):
            # bytes waiting on it belong to an earlier answer, never to this request.
            if now - conn.idle_since < self.idle_seconds and conn.sock is not None \
                    and not is_socket_stale(conn.sock):
                return conn, True
            conn.close()
        conn = UpstreamConnection(origin, self.connector)
        with self._lock:
            self.opened += 1
        conn.connect()
        return conn, False

    def release(self, conn: UpstreamConnection) -> None:
        """Keep ``conn`` for reuse, unless bytes are already waiting on it (more
        than the answer said it had, or EOF): the next request would read them."""
        if conn.sock is None or is_socket_stale(conn.sock):
            conn.close()
            return
        conn.idle_since = time.monotonic()
        with self._lock:
            idle = self._idle.setdefault(conn.origin, [])
            idle.append(conn)
            extra = idle[:-self.max_idle] if len(idle) > self.max_idle else []
            del idle[:len(extra)]
        for old in extra:
            old.close()

    def close(self) -> None:
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()


def build_url_opener(connector: Connector) -> Callable:
    """``open_url(request, timeout)`` for token calls: urllib on OCM's own
    connections (proxy, TLS). urllib itself is loaded on the first call."""
    opener = []

    def open_url(request, timeout: float):
        if not opener:
            opener.append(_make_opener(connector))
        return opener[0].open(request, timeout=timeout)

    return open_url


def _make_opener(connector: Connector):
    import urllib.request

    def make_for(scheme: str) -> Callable:
        def make(host: str, timeout: Optional[float] = None, **_ignored) -> UpstreamConnection:
            # urllib hands over "host[:port]"; the scheme is the handler's.
            parts = urllib.parse.urlsplit("//" + host)
            origin = Origin(scheme, parts.hostname or host,
                            parts.port or (443 if scheme == "https" else 80))
            conn = UpstreamConnection(origin, connector,
                                      timeout if timeout is not None else TOKEN_CALL_TIMEOUT)
            conn.response_class = http.client.HTTPResponse  # urllib expects an email message
            return conn
        return make

    class OriginHTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(make_for("http"), req)

    class OriginHTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(make_for("https"), req)

    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.UnknownHandler(), urllib.request.HTTPDefaultErrorHandler(),
                    urllib.request.HTTPErrorProcessor(), OriginHTTPHandler(),
                    OriginHTTPSHandler()):
        opener.add_handler(handler)
    return opener


class UpstreamExchange:
    """One upstream request in flight. ``finish()`` hands its connection back
    to the account's pool (or closes it) exactly once."""
    __slots__ = ("account", "conn", "response", "latency", "finished", "translation")

    def __init__(self, account: "Account", conn: UpstreamConnection, response,
                 latency: float = 0.0):
        # how the request was rewritten for the ChatGPT backend
        self.translation = None  # type: Any
        self.account = account
        self.conn = conn
        self.response = response
        self.latency = latency    # from sending the request to its answer's head
        self.finished = False

    @property
    def status(self) -> int:
        return self.response.status

    @property
    def headers(self) -> Headers:
        return self.response.msg

    def finish(self, complete: bool) -> None:
        if not self.finished:
            self.finished = True
            self.account.finish_upstream(self.conn, self.response, complete)

    def discard(self) -> bytes:
        """Read (up to 1 MiB of) an answer we will not relay, and finish it."""
        body, complete = read_small_body(self.response)
        self.finish(complete)
        return body


class WebSocketHandshake:
    """What upstream answered to our upgrade request, minus its cookies: they
    are the owner's, and a refusal's headers are relayed to the client."""

    def __init__(self, sock: Any, status: int, reason: str, headers: Headers,
                 leftover: bytes = b"", body: bytes = b""):
        self.sock = sock
        self.status = status
        self.reason = reason
        self.headers = Headers([(name, value) for name, value in headers.items()
                                if name.lower() not in UPSTREAM_PRIVATE_HEADERS])
        self.leftover = leftover    # frame bytes that came with the 101
        self.body = body            # the body of a refusal

    def discard(self) -> bytes:
        """An answer we will not use: close its socket, if it has one."""
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None
        return self.body


def response_framing_problem(response) -> str:
    """Why an upstream response's body framing is ambiguous, or "" if it is not.
    http.client would quietly read such bodies to the end of the connection."""
    codings = [c.strip().lower() for v in response.msg.get_all("transfer-encoding") or []
               for c in v.split(",")]
    if codings and codings != ["chunked"]:
        return "unsupported transfer coding %r" % ", ".join(codings)
    lengths = {v.strip() for raw in response.msg.get_all("content-length") or []
               for v in raw.split(",")}
    if lengths and not codings and (len(lengths) != 1 or not lengths.pop().isdigit()):
        return "an invalid Content-Length"
    return ""


def read_refusal_body(reader: SocketReader, headers: Headers, timeout: float,
                      limit: int = 1 << 20) -> bytes:
    """The body of a non-101 answer to a WebSocket handshake (bounded)."""
    if headers.has_token("transfer-encoding", "chunked"):
        return read_chunked_body(reader, limit, timeout)
    length = headers.get("content-length")
    if length is not None and length.strip().isdigit():
        return reader.read_exact(min(int(length), limit), time.monotonic() + timeout)
    return reader.read_until_close(limit, min(timeout, 10.0))


def read_small_body(response, limit: int = 1 << 20) -> Tuple[bytes, bool]:
    """Read a whole (small) upstream body. (body, complete)."""
    try:
        body = response.read(limit) if response.length is None else response.read()
    except http.client.IncompleteRead as exc:
        return exc.partial, False
    except (http.client.HTTPException, OSError, ValueError):
        return b"", False
    return body, response.isclosed()


# == 11. Accounts ============================================================

# How much of a pool's capacity an account brings, by plan (OpenAI gives Pro
# several times Plus's Codex limits). Other plans count 1.
PLAN_WEIGHTS = {"pro": 6.0, "free": 0.25}
DEFAULT_COOLDOWN = 300.0          # a 429 without any reset time
MAX_POLL_BACKOFF = 30 * 60.0
POLL_TIMEOUT = 15.0
SESSION_TTL = 12 * 3600.0         # a sticky session forgotten after this long unused
MAX_SESSIONS = 20000


class Window(namedtuple("Window", "used_percent window_minutes resets_at",
                        defaults=(None, None, None))):
    """One rate-limit window of an account (see window_kind)."""
    __slots__ = ()

    def used(self, now: float) -> float:
        """Use now, in percent: 0 if unknown, and 0 once the window has reset."""
        if self.used_percent is None or (self.resets_at is not None and self.resets_at <= now):
            return 0.0
        return self.used_percent

    def to_json(self, now: float) -> Dict[str, Any]:
        return {"used_percent": round(self.used(now), 1), "window_minutes": self.window_minutes,
                "resets_at": (int(self.resets_at) if self.resets_at and self.resets_at > now
                              else None)}


def _number(value: Any) -> Optional[float]:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


# Windows are known by their length, never by their position: from 2026-07-12
# for six weeks Plus, Pro and Business had only a weekly "primary", and free
# plans have monthly windows (PROTOCOL.md section 10).
SHORT_WINDOW_MAX_MINUTES = 6 * 60        # up to this: the short ("5-hour") window
LONG_WINDOW_MIN_MINUTES = 6 * 24 * 60    # from this: the long ("weekly") window
WEEK_MINUTES = 7 * 24 * 60
WINDOW_LABELS = {"short": "5h", "long": "weekly"}  # in metrics; other lengths show as "<minutes>m"


def window_kind(minutes: Optional[float], position: str) -> str:
    """"short", "long", or "<minutes>m" for a window between them. Only a
    window that gives no length is taken by its position (primary: short)."""
    if minutes is None or minutes <= 0:
        return "short" if position == "primary" else "long"
    if minutes <= SHORT_WINDOW_MAX_MINUTES:
        return "short"
    if minutes >= LONG_WINDOW_MIN_MINUTES:
        return "long"
    return "%dm" % round(minutes)


def _keep_fuller(windows: Dict[str, Window], kind: str, window: Window) -> None:
    old = windows.get(kind)
    if old is None or (window.used_percent or 0) >= (old.used_percent or 0):
        windows[kind] = window


def window_positions(headers, now: float) -> List[Tuple[str, Window]]:
    """[(position, window)] from x-{limit}-(primary|secondary)-* response headers."""
    active = (headers.get("x-codex-active-limit") or "codex").strip().lower().replace("_", "-")
    out = []  # type: List[Tuple[str, Window]]
    for name in ("primary", "secondary"):
        prefix = "x-%s-%s-" % (active, name)
        used = _number(headers.get(prefix + "used-percent"))
        if used is None:
            continue
        resets_at = _number(headers.get(prefix + "reset-at"))
        if resets_at is None and _number(headers.get(prefix + "reset-after-seconds")) is not None:
            resets_at = now + _number(headers.get(prefix + "reset-after-seconds"))
        out.append((name, Window(used, _number(headers.get(prefix + "window-minutes")),
                                 resets_at)))
    return out


def windows_from_headers(headers, now: float) -> Dict[str, Window]:
    """The windows a response's headers report, by kind (window_kind)."""
    windows = {}  # type: Dict[str, Window]
    for position, window in window_positions(headers, now):
        _keep_fuller(windows, window_kind(window.window_minutes, position), window)
    return windows


def windows_from_poll(limits: Any, now: float) -> Dict[str, Window]:
    """The windows of the usage endpoint's rate_limit object, by kind."""
    windows = {}  # type: Dict[str, Window]
    if not isinstance(limits, dict):
        return windows
    for position in ("primary", "secondary"):
        data = limits.get(position + "_window")
        if not isinstance(data, dict) or _number(data.get("used_percent")) is None:
            continue
        seconds = _number(data.get("limit_window_seconds"))
        resets_at = _number(data.get("reset_at"))
        if resets_at is None and _number(data.get("reset_after_seconds")) is not None:
            resets_at = now + _number(data.get("reset_after_seconds"))
        window = Window(_number(data.get("used_percent")), seconds / 60 if seconds else None,
                        resets_at)
        _keep_fuller(windows, window_kind(window.window_minutes, position), window)
    return windows


def usage_url_for(chatgpt_url: str) -> str:
    """The usage endpoint: the ChatGPT backend with /codex replaced by /wham/usage."""
    base = chatgpt_url.rstrip("/")
    return (base[:-len("/codex")] if base.endswith("/codex") else base) + "/wham/usage"


def rate_limit_reset(body: bytes, headers, now: float) -> float:
    """When a 429'd account may be tried again: the body's resets_at, else the
    headers' reset of a full window, else Retry-After, else a default pause."""
    try:
        answer = parse_json(body)
    except ValueError:
        answer = None
    error = answer.get("error") if isinstance(answer, dict) else None
    if isinstance(error, dict):
        resets_at = _number(error.get("resets_at"))
        if resets_at and resets_at > now:
            return resets_at
        resets_in = _number(error.get("resets_in_seconds"))
        if resets_in and resets_in > 0:
            return now + resets_in
    full = [w.resets_at for _, w in window_positions(headers, now)
            if w.used_percent is not None and w.used_percent >= 100 and w.resets_at]
    if full:
        return max(full)
    retry_after = _number(headers.get("retry-after"))
    return now + (retry_after if retry_after and retry_after > 0 else DEFAULT_COOLDOWN)


class Account:
    """One subscription: its login, its connections, its usage book, and what
    we know of its rate limits (from every response, from polls, from 429s)."""

    def __init__(self, tag: str, credential_path: str, usage: Optional[UsageBook],
                 detour: Optional[ProxyURL], config: Config, reserve_5h: int = 0,
                 reserve_weekly: int = 0, check_interval: float = 1.0,
                 now: Callable[[], float] = time.time, books: Optional[UsageBooks] = None):
        limits = config.limits
        self.tag = tag
        self.identity = (credential_path, os.path.abspath(usage.path) if usage else "", detour,
                         limits.connect_timeout, limits.upstream_read_timeout,
                         config.upstream.token_url)
        self.reserve_5h = reserve_5h
        self.reserve_weekly = reserve_weekly
        self.connector = Connector(limits.connect_timeout, limits.upstream_read_timeout, detour)
        self.pool = UpstreamPool(self.connector)
        self.open_url = build_url_opener(self.connector)
        self.credential = Credential(credential_path, config.upstream.token_url, self.open_url,
                                     tag=tag, check_interval=check_interval)
        self.usage = usage or None  # type: Optional[UsageBook]
        self._books = books
        self._active = 0        # requests and sessions using it now
        self._retired = False   # dropped by a reload: closes when the last of them ends
        self._closed = False
        self._now = now
        self._lock = threading.Lock()
        self.windows = {}  # type: Dict[str, Window]  # by window_kind: "short", "long", "1440m"...
        self.plan = ""
        self.cooldown_until = 0.0
        self.polled_at = 0.0
        self.observed_at = 0.0          # when an answer's headers last told its windows
        self.poll_interval = 0.0        # 0: not polled (not in a pool)
        self.poll_failures = 0
        self.next_poll_at = 0.0
        self.last_poll_error = ""
        # Each user's share of this account's windows, in percent points, by
        # window kind (share_5h is of "short", share_weekly of "long").
        self.shares = {"short": {}, "long": {}}  # type: Dict[str, Dict[str, float]]
        # finished since the last headers
        self._pending = []  # type: List[Tuple[str, float, Dict[str, float]]]
        self._percent_per_dollar = {}  # type: Dict[str, float]

    @property
    def short(self) -> Window:
        """The short ("5-hour") window, or an unknown one."""
        return self.windows.get("short") or Window()

    @property
    def long(self) -> Window:
        """The long ("weekly") window, or an unknown one."""
        return self.windows.get("long") or Window()

    def reserve_of(self, kind: str) -> int:
        return self.reserve_5h if kind == "short" else self.reserve_weekly if kind == "long" else 0

    # -- what we learn -------------------------------------------------------
    def observe_headers(self, headers, success: bool) -> None:
        now = self._now()
        windows = windows_from_headers(headers, now)
        with self._lock:
            self._attribute_use(windows)
            self.windows.update(windows)
            if windows:
                self.observed_at = now
            if success and self.cooldown_until:  # the account answered: its quota is back
                log.info("account %s: quota is back; cooldown cleared", self.tag)
                self.cooldown_until = 0.0

    def observe_poll(self, answer: Any) -> None:
        now = self._now()
        limits = answer.get("rate_limit") if isinstance(answer, dict) else None
        with self._lock:
            self.polled_at = now
            if isinstance(answer, dict) and isinstance(answer.get("plan_type"), str):
                self.plan = answer["plan_type"]
            if not isinstance(limits, dict):
                return
            self.windows.update(windows_from_poll(limits, now))
            quota_back = limits.get("allowed") is not False and not limits.get("limit_reached")
            if self.cooldown_until and quota_back:
                log.info("account %s: a poll shows quota back; cooldown cleared", self.tag)
                self.cooldown_until = 0.0

    def _attribute_use(self, windows: Dict[str, Window]) -> None:
        """Share each window's rise since the last answer among the requests
        that finished in between: all of it to one request when they came one
        at a time, split by cost when they overlapped. A new window (its reset
        moved on) starts everyone's share afresh."""
        pending, self._pending = self._pending, []
        total_cost = sum(cost for _, cost, _ in pending)
        for name, new in windows.items():
            if new.used_percent is None:
                continue
            shares = self.shares.setdefault(name, {})
            old = self.windows.get(name) or Window()
            for user, _, provisional in pending:  # the estimates give way to the measurement
                shares[user] = max(0.0, shares.get(user, 0.0) - provisional.get(name, 0.0))
            if (old.resets_at is not None and new.resets_at is not None
                    and abs(new.resets_at - old.resets_at) > 60):
                shares.clear()
                continue
            rise = (max(0.0, new.used_percent - (old.used_percent or 0.0))
                    if old.used_percent is not None else 0.0)
            if not pending or rise <= 0:
                continue
            for user, cost, _ in pending:
                part = cost / total_cost if total_cost > 0 else 1.0 / len(pending)
                shares[user] = shares.get(user, 0.0) + rise * part
            if total_cost > 0:
                measured = rise / total_cost
                known = self._percent_per_dollar.get(name)
                self._percent_per_dollar[name] = (measured if known is None
                                                  else known + (measured - known) * 0.3)

    def note_completion(self, user: str, cost: float) -> None:
        """A request of ``user`` finished: its share counts at once, estimated
        from its cost, until the next answer's headers measure it."""
        with self._lock:
            provisional = {}
            for name, rate in self._percent_per_dollar.items():
                provisional[name] = cost * rate
                shares = self.shares.setdefault(name, {})
                shares[user] = shares.get(user, 0.0) + provisional[name]
            self._pending.append((user, cost, provisional))

    def user_share(self, user: str, kind: str) -> float:
        """Percent points of the current window of ``kind`` that ``user`` used."""
        now = self._now()
        with self._lock:
            window = self.windows.get(kind) or Window()
            if window.resets_at is not None and window.resets_at <= now:
                return 0.0  # that window is over
            return self.shares.get(kind, {}).get(user, 0.0)

    def check_share(self, user: Optional[User]) -> None:
        """429 when ``user`` has had their share of one of this account's windows."""
        if user is None:
            return
        for kind, cap, label in (("short", user.share_5h, "5-hour"),
                                 ("long", user.share_weekly, "weekly")):
            if cap is not None and self.user_share(user.name, kind) >= cap:
                resets_at = (self.windows.get(kind) or Window()).resets_at
                raise HTTPError(429, "rate_limit_error", "you have used your share (%g%%) of "
                                "the %s window of account %s%s"
                                % (cap, label, self.tag, "; it resets at %s UTC"
                                   % format_rfc3339(resets_at)[:16].replace("T", " ")
                                   if resets_at else ""),
                                headers=([("Retry-After",
                                           str(max(1, int(resets_at - self._now()))))]
                                         if resets_at else None))

    def mark_rate_limited(self, resets_at: float) -> None:
        with self._lock:
            self.cooldown_until = max(resets_at, self._now() + 1.0)
        log.warning("account %s: rate limited until %s", self.tag, format_rfc3339(resets_at))

    # -- what we conclude ------------------------------------------------------
    def state(self) -> str:
        """usable | cooling_down | reserve_reached | unavailable"""
        login, problem = self.credential.peek()
        if login is None or problem:
            return "unavailable"
        now = self._now()
        with self._lock:
            if self.cooldown_until > now:
                return "cooling_down"
            full = [kind for kind, window in self.windows.items()
                    if window.used(now) >= 100 - self.reserve_of(kind)]
            if full:
                return ("reserve_reached"
                        if any(window.used(now) < 100 for kind, window in self.windows.items()
                               if kind in full)
                        else "exhausted")
        return "usable"

    def is_usable(self) -> bool:
        return self.state() == "usable"

    @property
    def weight(self) -> float:
        return PLAN_WEIGHTS.get(self.plan or self._login_plan(), 1.0)

    def _login_plan(self) -> str:
        login, _ = self.credential.peek()
        return login.plan if login is not None else ""

    def headroom(self) -> float:
        """Weighted percent left before a reserve: least_used takes the most."""
        now = self._now()
        with self._lock:
            left = min([100.0] + [100 - self.reserve_of(kind) - window.used(now)
                                  for kind, window in self.windows.items()])
        return max(0.0, left) * self.weight

    def next_reset(self) -> Optional[float]:
        """When this account is next expected to be usable again."""
        now = self._now()
        with self._lock:
            candidates = [self.cooldown_until] if self.cooldown_until > now else []
            for kind, window in self.windows.items():
                if window.used(now) >= 100 - self.reserve_of(kind) and window.resets_at:
                    candidates.append(window.resets_at)
        return max(candidates) if candidates else None

    def to_json(self) -> Dict[str, Any]:
        """The account as the status endpoint shows it: never a token or an id."""
        now = self._now()
        state = self.state()
        problem = self.credential.public_problem()
        with self._lock:
            out = {"tag": self.tag, "plan": self.plan or self._login_plan() or None,
                   "state": state, "five_hour": self.short.to_json(now),
                   "weekly": self.long.to_json(now),
                   "cooldown_until": (int(self.cooldown_until) if self.cooldown_until > now
                                      else None),
                   "reserve_5h": self.reserve_5h, "reserve_weekly": self.reserve_weekly}
            others = {kind: w.to_json(now) for kind, w in self.windows.items()
                      if kind not in ("short", "long")}
            if others:
                out["other_windows"] = others
        if state == "unavailable":
            out["problem"] = problem
        reset = self.next_reset()
        if reset:
            out["usable_again_at"] = int(reset)
        return out

    # -- polling ---------------------------------------------------------------
    def poll(self, usage_url: str) -> None:
        """Ask the usage endpoint; back off exponentially when it fails. A 429
        from it means "ask later", never "this account is exhausted"."""
        try:
            login = self.credential.current()
        except HTTPError as exc:
            self._poll_failed("credential: " + exc.message)
            return
        if login.mode != "chatgpt":
            self.next_poll_at = self._now() + MAX_POLL_BACKOFF  # API keys have no usage endpoint
            return
        import urllib.error
        import urllib.request
        headers = {"Authorization": "Bearer " + login.access_token, "Accept": "application/json",
                   "User-Agent": "ocm/" + __version__}
        if login.account_id:
            headers["ChatGPT-Account-Id"] = login.account_id
        try:
            with self.open_url(urllib.request.Request(usage_url, headers=headers),
                               POLL_TIMEOUT) as response:
                answer = parse_json(response.read(1 << 20))
        except urllib.error.HTTPError as exc:
            exc.close()
            self._poll_failed("usage endpoint answered %d%s"
                              % (exc.code, " (poll later)" if exc.code == 429 else ""))
            return
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError,
                OCMError) as exc:
            self._poll_failed("usage endpoint: %s" % (getattr(exc, "reason", None) or exc))
            return
        self.observe_poll(answer)
        self.poll_failures = 0
        self.last_poll_error = ""
        self.next_poll_at = self._now() + self.poll_interval

    def _poll_failed(self, why: str) -> None:
        self.poll_failures += 1
        delay = min(self.poll_interval * (2 ** self.poll_failures), MAX_POLL_BACKOFF)
        if why != self.last_poll_error:
            log.warning("account %s: %s; next poll in %d s", self.tag, why, delay)
        self.last_poll_error = why
        self.next_poll_at = self._now() + delay

    # -- sending -----------------------------------------------------------------
    def send(self, origin: Origin, method: str, path: str, headers: List[Tuple[str, str]],
             body: Optional[bytes]) -> "UpstreamExchange":
        """Send one request on a pooled connection. A reused connection the
        server had already dropped is retried once on a new one. Raises
        HTTPError 502/504 for an unreachable or silent upstream."""
        for attempt in (1, 2):
            try:
                conn, reused = self.pool.acquire(origin)
            except (OSError, http.client.HTTPException, ProxyError) as exc:
                raise HTTPError(502, "api_error", "upstream %s unreachable: %s"
                                % (origin.host, describe_connect_error(exc)))
            try:
                sent_at = time.monotonic()
                conn.send_request(method, path, headers, body)
                response = conn.getresponse()
                latency = time.monotonic() - sent_at
                problem = response_framing_problem(response)
                if problem:
                    conn.close()
                    raise HTTPError(502, "api_error", "upstream %s failed: %s"
                                    % (origin.host, problem))
                return UpstreamExchange(self, conn, response, latency)
            except socket.timeout:
                conn.close()
                raise HTTPError(504, "api_error", "upstream %s did not answer within %g s"
                                % (origin.host, self.connector.read_timeout))
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                if reused and attempt == 1 and isinstance(exc, (
                        ConnectionError, http.client.RemoteDisconnected,
                        http.client.BadStatusLine)):
                    continue  # the idle connection had gone stale
                raise HTTPError(502, "api_error", "upstream %s failed: %s"
                                % (origin.host, describe_connect_error(exc)))
        raise AssertionError("unreachable")

    def finish_upstream(self, conn: UpstreamConnection, response, complete: bool) -> None:
        """Back to the pool only if the response was read to its end."""
        if complete and response.isclosed() and not response.will_close and conn.sock is not None:
            self.pool.release(conn)
        else:
            conn.close()

    def open_websocket(self, origin: Origin, path: str,
                       headers: List[Tuple[str, str]]) -> "WebSocketHandshake":
        """Our own upgrade request upstream, on a dedicated connection. Raises
        HTTPError 502/504 when upstream cannot be reached or answers nonsense."""
        timeout = self.connector.read_timeout
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        try:
            sock = self.connector.open(origin)
        except (OSError, ProxyError) as exc:
            raise HTTPError(502, "api_error", "upstream %s unreachable: %s"
                            % (origin.host, describe_connect_error(exc)))
        default_port = 443 if origin.is_tls else 80
        host = "[%s]" % origin.host if ":" in origin.host else origin.host
        lines = ["GET %s HTTP/1.1" % path,
                 "Host: %s" % (host if origin.port == default_port
                               else "%s:%d" % (host, origin.port)),
                 "Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Key: " + key,
                 "Sec-WebSocket-Version: 13"] + ["%s: %s" % item for item in headers]
        reader = SocketReader(sock)
        try:
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            head = reader.read_head(timeout, timeout, 65536, 262144, silence_is_idle=False)
            if head is None:
                raise ValueError("closed before answering")
            status, reason, resp_headers = parse_response_head(head)
            if status == 101:
                if not (resp_headers.has_token("upgrade", "websocket")
                        and resp_headers.has_token("connection", "upgrade")
                        and resp_headers.get("sec-websocket-accept", "") == websocket_accept(key)):
                    raise ValueError("a 101 without a valid WebSocket accept")
                if resp_headers.get("sec-websocket-extensions"):
                    raise ValueError("an extension we did not offer")
                return WebSocketHandshake(sock, 101, reason, resp_headers,
                                          leftover=bytes(reader.buf))
            body = read_refusal_body(reader, resp_headers, timeout)
        except socket.timeout:
            sock.close()
            raise HTTPError(504, "api_error", "upstream %s did not answer the WebSocket handshake "
                            "within %g s" % (origin.host, timeout))
        except (OSError, ValueError, ClientGone, HTTPError) as exc:
            sock.close()
            raise HTTPError(502, "api_error", "upstream %s WebSocket handshake failed: %s"
                            % (origin.host, exc))
        sock.close()
        return WebSocketHandshake(None, status, reason, resp_headers, body=body)

    # -- its life ------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        """Requests and sessions using it now."""
        with self._lock:
            return self._active

    def begin(self) -> None:
        """A request or session starts using this account."""
        with self._lock:
            self._active += 1

    def end(self) -> None:
        with self._lock:
            self._active -= 1
            close = self._retired and self._active <= 0
            closed = self._closed
        if closed:
            # A request of the State before a reload began on it after the reload
            # retired and closed it: its book's saver is gone, so save what it booked.
            if self.usage is not None:
                self.usage.save_if_dirty()
        elif close:
            self.close()

    def retire(self) -> None:
        """A reload dropped or replaced it: close once nothing uses it."""
        with self._lock:
            self._retired = True
            close = self._active <= 0
        if close:
            self.close()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.pool.close()
        if self.usage is not None:
            if self._books is not None:
                self._books.release(self.usage)
            else:
                self.usage.close()


class NoAccount(OCMError):
    """No account of a pool can take a request now."""

    def __init__(self, resets_at: Optional[float], unavailable: bool):
        super().__init__("no usable account")
        self.resets_at = resets_at
        self.unavailable = unavailable


class Pool:
    """Where a user's requests go: one account alone ("single"), or a balancer
    (least_used, round_robin, random) or fallback (first usable, in order)
    over several. A session sticks to its account while that stays usable."""

    def __init__(self, tag: str, kind: str, members: list, strategy: str = "",
                 now: Callable[[], float] = time.time):
        self.tag = tag
        self.kind = kind                 # single | balancer | fallback
        self.members = members           # Accounts; a fallback may also hold Pools
        self.strategy = strategy
        self._now = now
        self._lock = threading.Lock()
        self._turn = 0
        self._sessions = collections.OrderedDict()  # type: collections.OrderedDict

    @property
    def is_pool(self) -> bool:
        return self.kind != "single"

    def accounts(self) -> List[Account]:
        out = []  # type: List[Account]
        for member in self.members:
            for account in (member.accounts() if isinstance(member, Pool) else [member]):
                if account not in out:
                    out.append(account)
        return out

    def choose(self, session: str = "", exclude: frozenset = frozenset()) -> Account:
        """The account for a request. Raises NoAccount when none can take it."""
        if not self.is_pool:
            return self.members[0]  # one account: OpenAI decides, OCM never refuses for it
        now = self._now()
        if session:
            with self._lock:
                sticky = self._sessions.get(session)
            if sticky is not None and sticky[0] not in exclude and sticky[0].is_usable():
                self._remember(session, sticky[0], now)
                return sticky[0]
        account = self._pick(exclude)
        if account is None:
            accounts = self.accounts()
            resets = [r for r in (a.next_reset() for a in accounts) if r]
            unavailable = all(a.state() == "unavailable" for a in accounts)
            raise NoAccount(min(resets) if resets else None, unavailable)
        if session:
            self._remember(session, account, now)
        return account

    def _pick(self, exclude: frozenset) -> Optional[Account]:
        if self.kind == "fallback":
            for member in self.members:
                if isinstance(member, Pool):
                    try:
                        return member.choose("", exclude)
                    except NoAccount:
                        continue
                if member not in exclude and member.is_usable():
                    return member
            return None
        usable = [a for a in self.members if a not in exclude and a.is_usable()]
        if not usable:
            return None
        if self.strategy == "random":
            return random.choice(usable)
        if self.strategy == "least_used":  # the most headroom; equals take turns
            headrooms = [(a.headroom(), a) for a in usable]
            best = max(h for h, _ in headrooms)
            usable = [a for h, a in headrooms if h >= best - 0.5]
        with self._lock:
            self._turn += 1
            return usable[self._turn % len(usable)]

    def sticky_account(self, session: str) -> Optional[Account]:
        """The account ``session`` last ran on, if the pool remembers it."""
        with self._lock:
            entry = self._sessions.get(session) if session else None
        return entry[0] if entry is not None else None

    def adopt_sessions(self, old: "Pool") -> None:
        """After a reload: keep the old pool's sticky sessions on accounts still here."""
        mine = set(self.accounts())
        with old._lock:
            kept = [(k, v) for k, v in old._sessions.items() if v[0] in mine]
        with self._lock:
            self._sessions.update(kept)

    def _remember(self, session: str, account: Account, now: float) -> None:
        with self._lock:
            self._sessions[session] = (account, now)
            self._sessions.move_to_end(session)
            while self._sessions and (
                    len(self._sessions) > MAX_SESSIONS
                    or next(iter(self._sessions.values()))[1] < now - SESSION_TTL):
                self._sessions.popitem(last=False)

    def aggregate(self) -> Dict[str, Dict[str, Any]]:
        """The pool as one account, by window kind: use weighted by plan, the
        earliest resets."""
        now = self._now()
        accounts = self.accounts()
        kinds = ["short", "long"] + sorted({k for a in accounts for k in a.windows
                                            if k not in ("short", "long")})
        out = {}  # type: Dict[str, Dict[str, Any]]
        for kind in kinds:
            known = [(a.weight, a.windows[kind]) for a in accounts
                     if kind in a.windows and a.windows[kind].used_percent is not None]
            total = sum(weight for weight, _ in known)
            resets = [w.resets_at for _, w in known if w.resets_at and w.resets_at > now]
            minutes = [w.window_minutes for _, w in known if w.window_minutes]
            out[kind] = {
                "used_percent": (round(sum(weight * w.used(now) for weight, w in known) / total, 1)
                                 if total else None),
                "resets_at": int(min(resets)) if resets else None,
                "window_minutes": minutes[0] if minutes else None,
            }
        return out

    def rewrite_rate_limit_headers(self, headers: List[Tuple[str, str]]) -> List[Tuple[str, str]]:
        """Rate-limit headers as the pool's, so Codex's own display shows the
        pool: its windows in upstream's two positions, shortest first, each
        with its length (Codex reads a window's kind from its length)."""
        aggregate = self.aggregate()
        out = [(n, v) for n, v in headers if not re.match(
            r"(?i)^x-codex-(primary|secondary)-"
            r"(used-percent|reset-at|reset-after-seconds|window-minutes)$", n)]
        now = self._now()
        known = [w for w in aggregate.values() if w["used_percent"] is not None]
        known.sort(key=lambda w: w["window_minutes"] or 0)
        for name, window in zip(("primary", "secondary"), known):
            out.append(("x-codex-%s-used-percent" % name, "%g" % window["used_percent"]))
            if window["window_minutes"]:
                out.append(("x-codex-%s-window-minutes" % name, "%g" % window["window_minutes"]))
            if window["resets_at"]:
                out.append(("x-codex-%s-reset-at" % name, str(window["resets_at"])))
                out.append(("x-codex-%s-reset-after-seconds" % name,
                            str(max(0, int(window["resets_at"] - now)))))
        return out

    def to_json(self) -> Dict[str, Any]:
        accounts = self.accounts()
        states = [a.to_json() for a in accounts]
        resets = [s["usable_again_at"] for s in states if s.get("usable_again_at")]
        aggregate = self.aggregate()
        out = {"pool": self.tag, "type": self.kind, "strategy": self.strategy or None,
               "five_hour": aggregate.pop("short"), "weekly": aggregate.pop("long"),
               "usable_accounts": sum(s["state"] == "usable" for s in states),
               "next_reset": min(resets) if resets else None, "accounts": states}
        if aggregate:
            out["other_windows"] = aggregate
        return out


def build_accounts(config: Config, books: UsageBooks, check_interval: float = 1.0,
                   reuse: Optional[Dict[str, Account]] = None
                   ) -> Tuple[Dict[str, Account], Dict[str, Pool]]:
    """The accounts and pools a config describes. Without ``credentials``:
    one account, "default", from credential_path, usages_path and detour.
    On a reload, an account whose file, usage file, detour and timeouts did
    not change is ``reuse``d as it is (its quota state and connections); a
    replaced one hands its usage book on. If anything fails, the accounts
    made here are closed and those reused are left exactly as they were."""
    limits = config.limits
    made = []  # type: List[Account]

    def make(tag: str, path: str, usages: str, detour: Optional[ProxyURL], r5: int = 0,
             rw: int = 0) -> Account:
        old = (reuse or {}).get(tag)
        identity = (path, os.path.abspath(usages) if usages else "", detour,
                    limits.connect_timeout, limits.upstream_read_timeout,
                    config.upstream.token_url)
        if old is not None and old.identity == identity:
            return old
        book = books.open(usages) if usages else None
        try:
            account = Account(tag, path, book, detour, config, r5, rw, check_interval, books=books)
        except BaseException:
            if book is not None:
                books.release(book)
            raise
        made.append(account)
        return account

    try:
        if not config.credentials:
            account = make("default", config.credential_path, config.usages_path, config.detour)
            accounts = {"default": account}
            pools = {"default": Pool("default", "single", [account])}
        else:
            accounts = {}
            for c in config.credentials:
                if not c.is_pool:
                    accounts[c.tag] = make(c.tag, c.credential_path, c.usages_path, c.detour,
                                           c.reserve_5h, c.reserve_weekly)
            pools = build_pools(config, accounts)
    except BaseException:
        for account in made:
            account.close()
        raise
    return accounts, pools


def build_pools(config: Config, accounts: Dict[str, Account]) -> Dict[str, Pool]:
    entries = {c.tag: c for c in config.credentials}
    pools = {}  # type: Dict[str, Pool]

    def pool(tag: str) -> Pool:
        if tag not in pools:
            c = entries[tag]
            if not c.is_pool:
                pools[tag] = Pool(tag, "single", [accounts[tag]])
            else:
                members = [pool(m) if entries[m].is_pool else accounts[m] for m in c.members]
                pools[tag] = Pool(tag, c.type, members, c.strategy if c.type == "balancer" else "")
        return pools[tag]

    for c in config.credentials:
        pool(c.tag)
    return pools


def account_settings(config: Config) -> Dict[str, Tuple[int, int, float]]:
    """Per account tag: (reserve_5h, reserve_weekly, poll interval or 0), the
    settings a reload may change on an account it keeps."""
    if not config.credentials:
        return {"default": (0, 0, 0.0)}
    settings = {c.tag: (c.reserve_5h, c.reserve_weekly, 0.0) for c in config.credentials
                if not c.is_pool}
    for c in config.credentials:  # polled as often as its busiest pool asks
        if c.is_pool:
            for tag in accounts_of(config, c.tag):
                r5, rw, interval = settings[tag]
                settings[tag] = (r5, rw, min(interval or c.poll_interval, c.poll_interval))
    return settings


def usage_limit_body(resets_at: Optional[float], now: float) -> bytes:
    """A 429 body Codex turns into "You've hit your usage limit ... try again at ..."."""
    error = {"type": "usage_limit_reached",
             "message": "Every account of this pool has reached its usage limit."}
    if resets_at:
        error["resets_at"] = int(resets_at)
        error["resets_in_seconds"] = max(0, int(resets_at - now))
    return json.dumps({"error": error}).encode("utf-8")


# == 12. Policy ==============================================================

MIN_COST_ESTIMATE = 0.01     # USD a request is assumed to cost before the user has history
MIN_TOKEN_ESTIMATE = 2000
ESTIMATE_WEIGHT = 0.2        # how much each new request moves a user's running average


class PeriodClock:
    """Days, weeks (from Monday) and months in the owner's time zone: "local"
    (the box's), "UTC", a fixed offset like "+05:30", or an IANA name."""

    def __init__(self, name: str = "local"):
        import datetime
        self._datetime = datetime
        self.name = name
        self._tz = None
        if name == "UTC":
            self._tz = datetime.timezone.utc
        elif _UTC_OFFSET.match(name):
            sign = 1 if name[0] == "+" else -1
            self._tz = datetime.timezone(sign * datetime.timedelta(hours=int(name[1:3]),
                                                                   minutes=int(name[4:6])))
        elif name != "local":
            import zoneinfo
            self._tz = zoneinfo.ZoneInfo(name)

    def _epoch(self, moment) -> float:
        return moment.timestamp() if self._tz is not None else time.mktime(moment.timetuple())

    def period(self, period: str, now: float) -> Tuple[str, float]:
        """(key, resets_at) of the day, week or month containing ``now``."""
        dt = self._datetime
        moment = (dt.datetime.fromtimestamp(now, self._tz) if self._tz
                  else dt.datetime.fromtimestamp(now))
        start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        if period == "day":
            return start.strftime("%Y-%m-%d"), self._epoch(start + dt.timedelta(days=1))
        if period == "week":
            monday = start - dt.timedelta(days=start.weekday())
            return monday.strftime("week of %Y-%m-%d"), self._epoch(monday + dt.timedelta(days=7))
        first = start.replace(day=1)
        following = (first + dt.timedelta(days=32)).replace(day=1)
        return first.strftime("%Y-%m"), self._epoch(following)

    def describe(self, seconds: float) -> str:
        """A moment with its time zone: "2026-12-05 00:00 UTC", "... Europe/Berlin",
        or for the box's own zone its offset, "... UTC+01:00"."""
        dt = self._datetime
        if self._tz is not None:
            return dt.datetime.fromtimestamp(seconds, self._tz).strftime("%Y-%m-%d %H:%M ") + (
                self.name if not _UTC_OFFSET.match(self.name) else "UTC" + self.name)
        moment = dt.datetime.fromtimestamp(seconds).astimezone()
        offset = moment.strftime("%z")
        return moment.strftime("%Y-%m-%d %H:%M ") + "UTC%s:%s" % (offset[:3], offset[3:])


PERIOD_WORDS = {"day": "daily", "week": "weekly", "month": "monthly"}


# The most output one Responses call can produce (GPT-5 models cap max_output_tokens here).
OUTPUT_TOKEN_CEILING = 128000
BUDGET_WAIT = 30.0  # near a budget's end, how long a request waits for the running one to end


# Models whose context window is longer than their price table says (API-key mode).
LONG_CONTEXT_MODELS = re.compile(r"^gpt-4\.1(?:$|-)")


def worst_case_cost(model: str, tier: str) -> Tuple[float, int]:
    """(USD, tokens) one request of ``model`` can cost at most, as OCM will
    charge it: a full context window of uncached input, and the most output a
    call can give. A request whose model OCM could not read may be the
    dearest model there is; one it does not know is charged at the fallback
    prices (as sing-box does), over the longest context window."""
    if not model:
        return dearest_worst_case()
    row = find_price_row(model, tier)
    window = (PREMIUM_CONTEXT_WINDOW
              if row is None or row[4] is not None or LONG_CONTEXT_MODELS.match(model)
              else DEFAULT_CONTEXT_WINDOW)
    price_in, price_out, _ = prices_for(model, tier, window)
    return ((window * price_in + OUTPUT_TOKEN_CEILING * price_out) / 1e6,
            window + OUTPUT_TOKEN_CEILING)


@functools.lru_cache(maxsize=None)
def dearest_worst_case() -> Tuple[float, int]:
    """The worst case of the dearest row of the price table, in any tier."""
    usd = 0.0
    for tier in PRICE_TABLE:
        for _, price_in, price_out, _, premium in price_rows(tier):
            window = PREMIUM_CONTEXT_WINDOW if premium else DEFAULT_CONTEXT_WINDOW
            price_in, price_out = (premium[0], premium[1]) if premium else (price_in, price_out)
            usd = max(usd, (window * price_in + OUTPUT_TOKEN_CEILING * price_out) / 1e6)
    return usd, PREMIUM_CONTEXT_WINDOW + OUTPUT_TOKEN_CEILING


class Reservation:
    """What one request set aside from its user's budgets until it settles:
    its estimate (what the user's requests usually cost) and its worst case."""
    __slots__ = ("ledger", "user", "periods", "estimate", "worst", "settled")

    def __init__(self, ledger: "BudgetLedger", user: str, periods: List[Tuple[str, str]],
                 estimate: Tuple[float, float], worst: Tuple[float, float]):
        self.ledger = ledger
        self.user = user
        self.periods = periods    # [(period, key)] it was admitted against, each once
        self.estimate = estimate  # (usd, tokens)
        self.worst = worst
        self.settled = False


def open_budget_ledger(config: "Config") -> "Optional[BudgetLedger]":
    """The config's budget ledger, loaded; None without budgets_path."""
    if not config.budgets_path:
        return None
    check_writable_location(config.budgets_path, "budgets_path")
    ledger = BudgetLedger(config.budgets_path, PeriodClock(config.timezone))
    ledger.load()
    return ledger


class _Spending:
    """One user's spending in one period: charged (usd, tokens, requests) and
    what the requests running now set aside."""
    __slots__ = ("usd", "tokens", "requests", "running", "held_usd", "held_tokens",
                 "worst_usd", "worst_tokens")

    def __init__(self, usd: float = 0.0, tokens: float = 0.0, requests: int = 0):
        self.usd, self.tokens, self.requests = usd, tokens, requests
        self.running = 0
        self.held_usd = self.held_tokens = self.worst_usd = self.worst_tokens = 0.0


class BudgetLedger:
    """Spending per user and period, and what requests in flight set aside.

    The bound it keeps: spending passes a budget by at most one request's
    cost. A request that runs alone is admitted when the user's usual cost
    (the running average, never below a floor) still fits. A request that
    would run beside others is admitted only while the budget could pay every
    one of them at its worst case (``worst_case_cost``); otherwise it waits
    for the running ones to end (up to ``wait`` seconds), so near a budget's
    end requests run one at a time. Each budget is charged once per request,
    whatever else the user has. Saved atomically, so budgets survive restarts."""

    def __init__(self, path: str, clock: PeriodClock, now: Callable[[], float] = time.time,
                 wait: float = BUDGET_WAIT):
        self.path = path
        self.clock = clock
        self.wait = wait
        self._now = now
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a request settled: waiters look again
        self._periods = {}   # type: Dict[Tuple[str, str, str], _Spending]  # (user, period, key)
        self._average = {}   # type: Dict[str, List[float]]  # user -> usd, tokens per request
        self._dirty = False
        self._save_failing = False
        self._stopping = False

    # -- admission ---------------------------------------------------------------
    def estimate(self, user: str) -> Tuple[float, float]:
        with self._lock:
            usd, tokens = self._average.get(user, (0.0, 0.0))
        return max(usd, MIN_COST_ESTIMATE), max(tokens, MIN_TOKEN_ESTIMATE)

    def admit(self, user: User, model: str = "", tier: str = "") -> Optional[Reservation]:
        """Set this request's estimate aside, or raise HTTPError 429 saying
        which budget, what is spent and running, and when it resets."""
        if not user.budgets:
            return None
        estimate = self.estimate(user.name)
        worst_usd, worst_tokens = worst_case_cost(model, tier)
        worst = (max(worst_usd, estimate[0]), max(float(worst_tokens), estimate[1]))
        deadline = time.monotonic() + self.wait
        with self._changed:
            while True:
                now = self._now()
                periods, refusal, must_wait = self._check_locked(user, estimate, worst, now)
                if refusal is None:
                    return self._reserve_locked(user.name, periods, estimate, worst)
                left = deadline - time.monotonic()
                if not must_wait or left <= 0 or self._stopping:
                    raise refusal
                self._changed.wait(min(left, 1.0))

    def check(self, user: User) -> None:
        """Refuse at once a request no body could make admissible: a budget
        used up, or with less left than the person's requests usually cost.
        (Whether it runs beside others depends on its model: admit decides.)"""
        if not user.budgets:
            return
        estimate = self.estimate(user.name)
        with self._lock:
            _, refusal, must_wait = self._check_locked(user, estimate, (0.0, 0.0), self._now())
        if refusal is not None and not must_wait:
            raise refusal

    def _check_locked(self, user: User, estimate: Tuple[float, float], worst: Tuple[float, float],
                      now: float) -> Tuple[List[Tuple[str, str]], Optional[HTTPError], bool]:
        """(periods, refusal or None, whether waiting could help)."""
        periods = []  # type: List[Tuple[str, str]]
        waiting = None
        for budget in user.budgets:
            key, resets_at = self.clock.period(budget.period, now)
            spending = self._periods.get((user.name, budget.period, key)) or _Spending()
            unit = 0 if budget.usd is not None else 1
            limit = budget.usd if budget.usd is not None else float(budget.tokens)
            spent = (spending.usd, spending.tokens)[unit]
            if spent >= limit:
                return periods, self._refusal(budget, spending, resets_at, "is used up"), False
            if spending.running == 0:
                if spent + min(estimate[unit], limit) > limit:
                    return periods, self._refusal(budget, spending, resets_at, "has %s left"
                                                  % self._amount(budget, limit - spent),
                                                  ", less than your requests usually %s (%s)"
                                                  % ("cost" if unit == 0 else "use",
                                                     self._amount(budget, estimate[unit]))), False
            elif spent + (spending.worst_usd, spending.worst_tokens)[unit] + worst[unit] > limit:
                held = (spending.held_usd, spending.held_tokens)[unit]
                waiting = self._refusal(budget, spending, resets_at, "has %s left" % self._amount(
                    budget, max(0.0, limit - spent - held)),
                    "; near its end requests run one at a time, "
                    "and the running one did not end within %g s" % self.wait, retry_after=1)
            if (budget.period, key) not in periods:
                periods.append((budget.period, key))
        return periods, waiting, waiting is not None

    def _reserve_locked(self, user: str, periods: List[Tuple[str, str]],
                        estimate: Tuple[float, float], worst: Tuple[float, float]) -> Reservation:
        for period, key in periods:
            spending = self._periods.setdefault((user, period, key), _Spending())
            spending.running += 1
            spending.held_usd += estimate[0]
            spending.held_tokens += estimate[1]
            spending.worst_usd += worst[0]
            spending.worst_tokens += worst[1]
        return Reservation(self, user, periods, estimate, worst)

    @staticmethod
    def _amount(budget: Budget, value: float) -> str:
        return "$%.2f" % value if budget.usd is not None else "{:,.0f} tokens".format(value)

    def _refusal(self, budget: Budget, spending: _Spending, resets_at: float, state: str,
                 detail: str = "", retry_after: Optional[int] = None) -> HTTPError:
        """429 naming the budget, what is spent and running, and the reset in
        the owner's time zone: never "reached" beside a smaller figure."""
        if budget.usd is not None:
            limit, spent, held = ("$%.2f" % budget.usd, "$%.2f spent" % spending.usd,
                                  spending.held_usd)
            running = (", $%.2f set aside for %d running" % (held, spending.running)
                       if spending.running else "")
        else:
            limit, spent = ("{:,} tokens".format(budget.tokens),
                            "{:,.0f} used".format(spending.tokens))
            running = (", {:,.0f} set aside for {} running".format(spending.held_tokens,
                                                                    spending.running)
                       if spending.running else "")
        wait = retry_after or max(1, int(resets_at - self._now()))
        return HTTPError(429, "rate_limit_error",
                         "your %s budget of %s %s (%s%s)%s; it resets at %s"
                         % (PERIOD_WORDS[budget.period], limit, state, spent, running, detail,
                            self.clock.describe(resets_at)),
                         headers=[("Retry-After", str(wait))])

    def settle(self, reservation: Reservation, usd: float, tokens: int) -> None:
        """Charge what a request really cost, once to each budget period it
        was admitted against (a request running across midnight counts in the
        day that admitted it, which counted it while it ran); its estimate is free."""
        with self._changed:
            if reservation.settled:
                return
            self._release_locked(reservation)
            for period, key in reservation.periods:
                spending = self._periods.setdefault((reservation.user, period, key), _Spending())
                spending.usd += usd
                spending.tokens += tokens
                spending.requests += 1
            average = self._average.get(reservation.user)
            if average is None:
                self._average[reservation.user] = [usd, float(tokens)]
            else:
                average[0] += (usd - average[0]) * ESTIMATE_WEIGHT
                average[1] += (tokens - average[1]) * ESTIMATE_WEIGHT
            self._dirty = True
            self._changed.notify_all()

    def release(self, reservation: Optional[Reservation]) -> None:
        """A request that ends without usage (an error, a hang-up) frees its estimate."""
        if reservation is not None:
            with self._changed:
                if not reservation.settled:
                    self._release_locked(reservation)
                    self._changed.notify_all()

    def _release_locked(self, reservation: Reservation) -> None:
        reservation.settled = True
        for period, key in reservation.periods:
            spending = self._periods.get((reservation.user, period, key))
            if spending is not None:
                spending.running = max(0, spending.running - 1)
                spending.held_usd = max(0.0, spending.held_usd - reservation.estimate[0])
                spending.held_tokens = max(0.0, spending.held_tokens - reservation.estimate[1])
                spending.worst_usd = max(0.0, spending.worst_usd - reservation.worst[0])
                spending.worst_tokens = max(0.0, spending.worst_tokens - reservation.worst[1])

    def stop(self) -> None:
        """Shutting down: requests waiting for room are refused now."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()

    def spent(self, user: str, period: str) -> Tuple[float, float]:
        key, _ = self.clock.period(period, self._now())
        with self._lock:
            spending = self._periods.get((user, period, key)) or _Spending()
            return spending.usd, spending.tokens

    def requests(self, user: str, period: str) -> int:
        """Requests charged to ``user`` in the current ``period``."""
        key, _ = self.clock.period(period, self._now())
        with self._lock:
            spending = self._periods.get((user, period, key))
            return spending.requests if spending else 0

    # -- the file ----------------------------------------------------------------
    def load(self) -> None:
        """Continue from the file. A damaged one is moved aside, never lost; one
        that cannot be read at all stops the start (ConfigError)."""
        try:
            with open(self.path, "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ConfigError("budgets_path: cannot read %s (%s)"
                              % (self.path, exc.strerror or exc))
        try:
            spent, average = self._parse(parse_json(raw.decode("utf-8")))
        except (ValueError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            aside = move_aside(self.path, self._now())
            log.error("budget file %s is damaged (%s); moved it to %s and started afresh",
                      self.path,
                      (exc.__class__.__name__ if isinstance(exc, (TypeError, AttributeError))
                       else exc),
                      aside)
            return
        with self._lock:
            self._periods.update(spent)
            self._average.update(average)

    @staticmethod
    def _parse(data: Any) -> Tuple[Dict[Tuple[str, str, str], _Spending], Dict[str, List[float]]]:
        """The file's spending and averages; ValueError or TypeError if it is not ours."""
        if not isinstance(data, dict) or not isinstance(data.get("users", {}), dict):
            raise ValueError("not a budget file")

        def amounts(values: Dict[str, Any]) -> List[float]:
            numbers = [float(values.get("usd") or 0), float(values.get("tokens") or 0),
                       float(values.get("requests") or 0)]
            if not all(math.isfinite(x) and x >= 0 for x in numbers):
                raise ValueError("a negative or infinite amount")
            return numbers

        spent, average = (
            {}, {})  # type: Dict[Tuple[str, str, str], _Spending], Dict[str, List[float]]
        for user, entry in data.get("users", {}).items():
            for period in ("day", "week", "month"):
                for key, values in (entry.get(period) or {}).items():
                    usd, tokens, requests = amounts(values)
                    spent[(user, period, key)] = _Spending(usd, tokens, int(requests))
            mean = entry.get("average_per_request")
            if mean is not None:
                average[user] = amounts(mean)[:2]
        return spent, average

    def to_json(self) -> Dict[str, Any]:
        now = self._now()
        current = {p: self.clock.period(p, now)[0] for p in ("day", "week", "month")}
        users = {}  # type: Dict[str, Any]
        with self._lock:
            for (user, period, key), spending in self._periods.items():
                if key == current[period] and (spending.requests or spending.usd
                                               or spending.tokens):
                    users.setdefault(user, {}).setdefault(period, {})[key] = {
                        "usd": round(spending.usd, 6), "tokens": int(spending.tokens),
                        "requests": spending.requests}
            for user, (usd, tokens) in self._average.items():
                users.setdefault(user, {})["average_per_request"] = {"usd": round(usd, 6),
                                                                      "tokens": int(tokens)}
        return {"timezone": self.clock.name, "saved_at": format_rfc3339(now), "users": users}

    def save_if_dirty(self) -> None:
        with self._lock:
            if not self._dirty:
                return
            self._dirty = False
        try:
            write_json_atomic(self.path, self.to_json(), 0o600)
            self._save_failing = False
        except OSError as exc:
            with self._lock:
                self._dirty = True
            if not self._save_failing:
                log.error("cannot save budgets to %s (%s); retrying", self.path,
                          exc.strerror or exc)
            self._save_failing = True


class ConcurrencyLimit:
    """Requests and WebSockets in flight, per user (max_concurrent)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._in_flight = {}  # type: Dict[str, int]

    def acquire(self, user: User) -> None:
        with self._lock:
            count = self._in_flight.get(user.name, 0)
            if user.max_concurrent and count >= user.max_concurrent:
                raise HTTPError(429, "rate_limit_error", "you may run %d request%s at a time, "
                                "and %d %s running; try again when one ends"
                                % (user.max_concurrent, "" if user.max_concurrent == 1 else "s",
                                   count, "is" if count == 1 else "are"),
                                headers=[("Retry-After", "1")])
            self._in_flight[user.name] = count + 1

    def release(self, user: User) -> None:
        with self._lock:
            self._in_flight[user.name] = max(0, self._in_flight.get(user.name, 1) - 1)

    def snapshot(self) -> Dict[str, int]:
        with self._lock:
            return dict(self._in_flight)


def model_allowed(user: User, model: str) -> bool:
    return not user.models or any(fnmatch.fnmatchcase(model, pattern) for pattern in user.models)


def check_access(user: Optional[User], now: float) -> None:
    """403 for a user whose access has expired."""
    if user is not None and user.expires_at is not None and now >= user.expires_at:
        raise HTTPError(403, "permission_error", "your access expired at %s UTC; ask the owner "
                        "to renew it"
                        % format_rfc3339(user.expires_at)[:19].replace("T", " "))


def check_model(user: Optional[User], model: str) -> None:
    if user is not None and not model_allowed(user, model):
        raise HTTPError(403, "permission_error", "model %r is not allowed for you (allowed: %s)"
                        % (model or "(none)", ", ".join(user.models)))


# == 13. Operations ==========================================================

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def prometheus_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Counters and a latency histogram for /metrics (Prometheus text format)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counters = {}  # type: Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]
        self._buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self._latency_sum = 0.0

    # Labels come from the config and from upstream; should they ever grow
    # without bound, the new series are counted in one, series="over-limit".
    MAX_SERIES = 10000

    def add(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted((label, log_safe(text)) for label, text in labels.items())))
        with self._lock:
            if key not in self._counters and len(self._counters) >= self.MAX_SERIES:
                key = (name, (("series", "over-limit"),))
            self._counters[key] = self._counters.get(key, 0.0) + value

    def observe_latency(self, seconds: float) -> None:
        index = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        with self._lock:
            self._buckets[index] += 1
            self._latency_sum += seconds

    def counters(self) -> Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]:
        with self._lock:
            return dict(self._counters)

    def latency(self) -> Tuple[List[int], float]:
        with self._lock:
            return list(self._buckets), self._latency_sum


COUNTER_HELP = (
    ("ocm_requests_total", "Requests answered, by user, status and model."),
    ("ocm_responses_total",
     "Model responses that carried usage (what the usage file counts), by user and model."),
    ("ocm_tokens_total", "Tokens used, by user, model and kind (input, cached, output)."),
    ("ocm_cost_usd_total", "Cost at API prices in USD, by user and model."),
    ("ocm_token_refreshes_total", "Access-token refreshes, by account."),
    ("ocm_token_refresh_failures_total", "Failed access-token refreshes, by account."),
)


def render_metrics(server: "OCMServer") -> str:
    """The exposition: counters, gauges read from live state, the histogram."""
    lines = []  # type: List[str]

    def sample(name: str, labels: Dict[str, str], value: float) -> None:
        text = ",".join('%s="%s"' % (k, prometheus_escape(log_safe(str(v))))
                        for k, v in sorted(labels.items()))
        lines.append("%s%s %s" % (name, "{%s}" % text if text else "", repr(float(value))))

    counters = server.metrics.counters()
    for account in server.accounts.values():
        counters[("ocm_token_refreshes_total",
                  (("account", account.tag),))] = account.credential.refreshes
        counters[("ocm_token_refresh_failures_total",
                  (("account", account.tag),))] = account.credential.refresh_failures
    for name, help_text in COUNTER_HELP:
        lines += ["# HELP %s %s" % (name, help_text), "# TYPE %s counter" % name]
        for (counter, labels), value in sorted(counters.items()):
            if counter == name:
                sample(name, dict(labels), value)
    lines += ["# HELP ocm_in_flight Requests and WebSocket sessions running now, by user.",
              "# TYPE ocm_in_flight gauge"]
    for user, count in sorted(server.concurrency.snapshot().items()):
        sample("ocm_in_flight", {"user": user}, count)
    lines += ["# HELP ocm_account_used_percent Use of each account's rate-limit window.",
              "# TYPE ocm_account_used_percent gauge",
              "# HELP ocm_account_usable 1 if the account can take requests now.",
              "# TYPE ocm_account_usable gauge"]
    now = time.time()
    for account in server.accounts.values():
        for kind, window in sorted(account.windows.items()):
            if window.used_percent is not None:
                sample("ocm_account_used_percent", {"account": account.tag,
                                                    "window": WINDOW_LABELS.get(kind, kind)},
                       window.used(now))
        sample("ocm_account_usable", {"account": account.tag}, 1 if account.is_usable() else 0)
    lines += ["# HELP ocm_budget_spent Spending in the current period against each budget "
              "(usd or tokens).",
              "# TYPE ocm_budget_spent gauge",
              "# HELP ocm_budget_limit Each budget's limit (usd or tokens).",
              "# TYPE ocm_budget_limit gauge"]
    for user in server.users.users:
        for budget in user.budgets:
            unit = "usd" if budget.usd is not None else "tokens"
            spent = server.ledger.spent(user.name, budget.period) if server.ledger else (0.0, 0.0)
            labels = {"user": user.name, "period": budget.period, "unit": unit}
            sample("ocm_budget_spent", labels, spent[0] if unit == "usd" else spent[1])
            sample("ocm_budget_limit", labels, budget.usd if unit == "usd" else budget.tokens)
    lines += ["# HELP ocm_user_share_percent Each user's estimated share of an account's window, "
              "in points.",
              "# TYPE ocm_user_share_percent gauge"]
    for account in server.accounts.values():
        for kind in ("short", "long"):
            for user_name in sorted(account.shares.get(kind, ())):
                sample("ocm_user_share_percent", {"user": user_name, "account": account.tag,
                                                  "window": WINDOW_LABELS[kind]},
                       account.user_share(user_name, kind))
    buckets, total = server.metrics.latency()
    lines += ["# HELP ocm_upstream_latency_seconds Time from sending a request upstream to its "
              "answer's head.",
              "# TYPE ocm_upstream_latency_seconds histogram"]
    count = 0
    for bound, n in zip(list(LATENCY_BUCKETS) + ["+Inf"], buckets):
        count += n
        lines.append('ocm_upstream_latency_seconds_bucket{le="%s"} %d' % (bound, count))
    lines += ["ocm_upstream_latency_seconds_sum %r" % total,
              "ocm_upstream_latency_seconds_count %d" % count]
    return "\n".join(lines) + "\n"


def budget_rows(users: List[User], ledger: Optional[BudgetLedger]) -> List[Dict[str, Any]]:
    """Each user's budgets against this period's spending (`ocm.py usage`)."""
    rows = []
    for user in users:
        for budget in user.budgets:
            usd, tokens = ledger.spent(user.name, budget.period) if ledger else (0.0, 0.0)
            if budget.usd is not None:
                rows.append({"user": user.name, "period": budget.period, "spent": "$%.2f" % usd,
                             "limit": "$%.2f" % budget.usd, "spent_usd": round(usd, 6),
                             "limit_usd": budget.usd})
            else:
                rows.append({"user": user.name, "period": budget.period,
                             "spent": "{:,.0f} tokens".format(tokens),
                             "limit": "{:,} tokens".format(budget.tokens),
                             "spent_tokens": int(tokens), "limit_tokens": budget.tokens})
    return rows


def is_loopback(address: str) -> bool:
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(address)
        mapped = ip.ipv4_mapped if ip.version == 6 else None  # ::ffff:127.0.0.1
        return ip.is_loopback or bool(mapped and mapped.is_loopback)
    return False


def usage_document(server: "OCMServer", request: "ClientRequest", client_ip: str,
                   now: float) -> Dict[str, Any]:
    """GET /ocm/v1/usage: what `ocm.py usage` shows, live. The usage files are
    saved once a minute; this is the books as they are in memory, and the
    budgets' spending. The box itself only, like /metrics without its token:
    it names every user and file, and only the box itself asks."""
    if not is_loopback_request(request, client_ip):
        raise HTTPError(403, "permission_error", "usage is served to the box itself only "
                        "(a loopback client asking for a loopback name, not through a proxy)")
    books = [(a.tag, a.usage) for a in server.accounts.values() if a.usage is not None]
    return {"time": format_rfc3339(now),
            "accounts": [{"account": tag, "usages_path": os.path.abspath(book.path),
                          "usage": book.to_json()} for tag, book in books],
            "budgets": budget_rows(server.users.users, server.ledger)}


HEALTH_PATH = "/healthz"
USAGE_PATH = "/ocm/v1/usage"
STATUS_PATH = "/ocm/v1/status"
METRICS_PATH = "/metrics"
OPERATIONS_PATHS = frozenset((STATUS_PATH, HEALTH_PATH, METRICS_PATH, USAGE_PATH))

access_log = logging.getLogger("ocm.access")
ACCESS_LOG_DELAY = 0.5  # seconds an access line may wait to be written with others


class BatchedStreamHandler(logging.StreamHandler):
    """Writes its lines in batches. A write per access line is a syscall per
    request, and each syscall hands the GIL to another thread and waits to get
    it back: with 16 busy connections that cost a tenth of the relay's
    throughput. A line waits at most ``max_delay`` seconds (the housekeeping
    thread flushes quiet periods), or until ``max_bytes`` have gathered, and
    always goes out before any other log line, and at exit."""

    def __init__(self, stream, max_delay: float = ACCESS_LOG_DELAY, max_bytes: int = 1 << 16):
        super().__init__(stream)
        self.max_delay = max_delay
        self.max_bytes = max_bytes
        self._pending = []  # type: List[str]
        self._size = 0
        self._since = 0.0

    def emit(self, record: logging.LogRecord) -> None:  # called with self.lock held
        try:
            line = self.format(record) + self.terminator
        except Exception:  # as StreamHandler does: report, never raise into a request
            self.handleError(record)
            return
        now = time.monotonic()
        if not self._pending:
            self._since = now
        self._pending.append(line)
        self._size += len(line)
        if self._size >= self.max_bytes or now - self._since >= self.max_delay:
            self._write_pending()

    def flush(self) -> None:
        self.acquire()
        try:
            self._write_pending()
            super().flush()
        finally:
            self.release()

    def flush_if_due(self) -> None:
        if self._pending and time.monotonic() - self._since >= self.max_delay:
            self.flush()

    def _write_pending(self) -> None:
        if self._pending:
            text, self._pending, self._size = "".join(self._pending), [], 0
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):
                pass  # stderr is gone (closed pipe): nothing left to tell


def access_log_handler() -> Optional[BatchedStreamHandler]:
    return next((h for h in access_log.handlers if isinstance(h, BatchedStreamHandler)), None)


def flush_access_log(only_if_due: bool = False) -> None:
    handler = access_log_handler()
    if handler is not None:
        handler.flush_if_due() if only_if_due else handler.flush()


def write_access_line(request: "RequestRecord", log_format: str) -> None:
    """One line per request or WebSocket turn: time, user, method, path,
    status, model, tokens, cost, duration. Never a token or a header value.
    Health probes go at debug level: a monitor polling them is not news."""
    level = logging.DEBUG if request.quiet else logging.INFO
    if not access_log.isEnabledFor(level):
        return
    duration = time.monotonic() - request.started
    user, path, model = (log_safe(request.user_name), log_safe(request.path),
                         log_safe(request.model))
    account = log_safe(request.account.tag) if request.account is not None else ""
    asked = log_safe(request.asked_model)
    if log_format != "json":  # a space or "=" in a value could pass for another field
        user, model, asked = ('"%s"' % v.replace('"', '\\"')
                              if (" " in v or "=" in v or '"' in v) else v
                              for v in (user, model, asked))
    if log_format == "json":
        access_log.log(level, json.dumps({
            "time": format_rfc3339(time.time()), "user": user or None, "method": request.method,
            "path": path, "status": request.status, "model": model or None,
            "requested_model": asked or None,
            "account": account or None, "input_tokens": request.input_tokens,
            "cached_tokens": request.cached_tokens, "output_tokens": request.output_tokens,
            "cost_usd": round(request.cost, 6), "duration_s": round(duration, 3)}))
        return
    access_log.log(level, "%s %s %s %d model=%s in=%d cached=%d out=%d cost=$%.4f %.3fs%s%s",
                   user or "-", request.method, path, request.status, model or "-",
                   request.input_tokens, request.cached_tokens, request.output_tokens,
                   request.cost, duration, " account=" + account if account else "",
                   " asked=" + asked if asked else "")


# == 13b. Dashboard ==========================================================
# GET /ocm/: one page for the owner (every account, every person, charts, the
# last requests, the server) and for each person (their own figures only).
# The page is a constant holding no data: its script fetches
# /ocm/v1/dashboard every few seconds and builds everything with DOM calls
# (textContent, never markup), so no name, model or message from config,
# clients or upstream can turn into markup or script. Settle records each
# request into bounded buckets (a few microseconds); the rest is worked out
# when the page asks. docs/dashboard.md describes the views and the JSON.

DASHBOARD_PATH = "/ocm"                 # what /ocm/ becomes (canonical_path drops the slash)
DASHBOARD_JSON_PATH = "/ocm/v1/dashboard"
SIGN_IN_PATH = "/ocm/sign-in"
SIGN_OUT_PATH = "/ocm/sign-out"
DASHBOARD_PATHS = frozenset((DASHBOARD_PATH, DASHBOARD_JSON_PATH, SIGN_IN_PATH, SIGN_OUT_PATH))

HISTORY_FILE = "ocm-history.json"
HISTORY_HOURS = 48          # requests and cost per hour and person
HISTORY_DAYS = 7            # cost per day, person and model
RECENT_REQUESTS = 50
REFUSALS_KEPT = 5           # per person, with their messages
HISTORY_MAX_NAMES = 200     # per table; more fold into OTHERS (names come from the config)
HISTORY_MAX_MODELS = 40     # per day and person; more fold into OTHERS
HISTORY_MAX_TEXT = 300      # characters kept of a message (of a model name or a path: 100)
OTHERS = "(others)"
# An hour's row per person: model responses (what the usage file counts),
# cost, input, cached and output tokens, and refusals (OCM's own 4xx answers).
HOUR_RESPONSES, HOUR_COST, HOUR_INPUT, HOUR_CACHED, HOUR_OUTPUT, HOUR_REFUSED = range(6)

SESSION_COOKIE = "ocm_session"
SESSION_LIFETIME = 12 * 3600.0
MAX_DASHBOARD_SESSIONS = 1000           # past it, the oldest session ends
SESSIONS_PER_PERSON = 20                # past it, that person's (or the owner's) oldest ends
SIGN_IN_WINDOW = 600.0                  # wrong tokens are counted over this long...
SIGN_IN_FAILURES_PER_ADDRESS = 10       # ...per client address (an IPv6 /64),
SIGN_IN_FAILURES_IN_ALL = 300           # ...and from everywhere (many addresses at once)
MAX_SIGN_IN_FORM = 4096
FORWARDING_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")
PERIOD_NAMES = {"day": "today", "week": "this week", "month": "this month"}


def _entry(table: Dict[str, Any], name: str, limit: int, make: Callable[[], Any]) -> Any:
    """``table[name]``, made with ``make()`` if new; past ``limit`` names, OTHERS's."""
    row = table.get(name)
    if row is None:
        if len(table) >= limit:
            name = OTHERS
            row = table.get(name)
        if row is None:
            row = table[name] = make()
    return row


class History:
    """What the dashboard draws, kept for a while: per hour and person (48
    hours), per day, person and model (7 days), each person's spending this
    day, week and month, the last requests, and each person's last refusals.

    ``record`` runs in settle for every /v1/ request and WebSocket turn and
    does only dictionary work under one lock (a few microseconds); charts
    are built when the page asks. Every table is bounded (hours, days,
    names, models, lengths of texts), so the file is too. Saved atomically to
    ``path`` by the housekeeping thread and at close ("" keeps it in memory)."""

    def __init__(self, path: str, clock: PeriodClock):
        self.path = path
        self.clock = clock
        self._lock = threading.Lock()
        # hour number (unix time // 3600) -> person -> HOUR_* row
        self._hours = {}  # type: Dict[int, Dict[str, List[float]]]
        # day key -> person -> model -> [responses, cost]
        self._days = {}  # type: Dict[str, Dict[str, Dict[str, List[float]]]]
        # person -> day|week|month -> [period key, responses, cost, tokens]
        self._periods = {}  # type: Dict[str, Dict[str, List[Any]]]
        self._keys = {}  # type: Dict[str, Tuple[str, float, float]]  # period: key, from, until
        self._recent = collections.deque(maxlen=RECENT_REQUESTS)  # type: collections.deque
        self._refusals = {}  # type: Dict[str, collections.deque]  # of (time, status, message)
        self._last_seen = {}  # type: Dict[str, float]
        self._dirty = False
        self._save_failing = False

    # -- recording (in settle: keep it cheap) ---------------------------------
    def record(self, record: "RequestRecord", now: float, duration: float) -> None:
        name, cost = record.user_name, record.cost
        billed = record.input_tokens or record.output_tokens
        refused = 1 if record.error and 400 <= record.status < 500 else 0
        model = record.model[:100]
        account = record.account.tag if record.account is not None else ""
        # A stranger's wrong token counts in its hour, and no more: a flood of
        # them must not push the people's requests out of the last ones kept.
        stranger = record.status == 401 and not name
        with self._lock:
            self._dirty = True
            if not stranger:
                self._recent.append((now, name, model, record.status, record.method,
                                     record.path[:100], record.input_tokens, record.cached_tokens,
                                     record.output_tokens, cost, duration, account,
                                     record.error[:HISTORY_MAX_TEXT]))
                self._last_seen[name] = now
            if refused and not stranger:
                kept = self._refusals.get(name)
                if kept is None:
                    kept = self._refusals[name] = collections.deque(maxlen=REFUSALS_KEPT)
                kept.append((now, record.status, record.error[:HISTORY_MAX_TEXT]))
            if not refused and not billed:
                return
            hour = int(now // 3600)
            people = self._hours.get(hour)
            if people is None:
                people = self._hours[hour] = {}
                # from now: hours of a clock that was once set ahead go too (an
                # hour ahead is a thread that settled a moment later, and stays)
                for old in [h for h in self._hours if not hour - HISTORY_HOURS < h <= hour + 1]:
                    del self._hours[old]
            row = _entry(people, name, HISTORY_MAX_NAMES, lambda: [0, 0.0, 0, 0, 0, 0])
            row[HOUR_REFUSED] += refused
            if not billed:
                return
            row[HOUR_RESPONSES] += 1
            row[HOUR_COST] += cost
            row[HOUR_INPUT] += record.input_tokens
            row[HOUR_CACHED] += record.cached_tokens
            row[HOUR_OUTPUT] += record.output_tokens
            day = self._key_locked("day", now)
            models = self._days.get(day)
            if models is None:
                models = self._days[day] = {}
                ahead = self.clock.period("day", now + 3600)[0]  # keys sort as dates do
                kept = sorted(key for key in self._days if key <= ahead)
                for old in set(self._days) - set(kept[-HISTORY_DAYS:]):
                    del self._days[old]
            per_model = _entry(_entry(models, name, HISTORY_MAX_NAMES, dict), model,
                               HISTORY_MAX_MODELS, lambda: [0, 0.0])
            per_model[0] += 1
            per_model[1] += cost
            periods = _entry(self._periods, name, HISTORY_MAX_NAMES, dict)
            tokens = record.input_tokens + record.output_tokens  # as budgets count them
            for period in ("day", "week", "month"):
                key = day if period == "day" else self._key_locked(period, now)
                tally = periods.get(period)
                if tally is None or tally[0] != key:
                    tally = periods[period] = [key, 0, 0.0, 0]
                tally[1] += 1
                tally[2] += cost
                tally[3] += tokens

    def _key_locked(self, period: str, now: float) -> str:
        """The period's key, worked out once per period (PeriodClock takes 10 µs)."""
        known = self._keys.get(period)
        if known is not None and known[1] <= now < known[2]:
            return known[0]
        key, until = self.clock.period(period, now)
        if known is not None and known[0] == key:  # a thread that took its time a moment earlier
            now = min(now, known[1])
        self._keys[period] = (key, now, until)
        return key

    def set_clock(self, clock: PeriodClock) -> None:
        """A reload may change the time zone: periods are worked out afresh."""
        with self._lock:
            self.clock = clock
            self._keys.clear()

    # -- reading (when the page asks) -------------------------------------------
    def hourly(self, now: float, only: Optional[str] = None) -> Tuple[int, Dict[str, List[list]]]:
        """(the first hour's start, {person: [responses per hour, cost per
        hour]}) over the last HISTORY_HOURS hours, this one last."""
        first = int(now // 3600) - HISTORY_HOURS + 1
        out = {}  # type: Dict[str, List[list]]
        with self._lock:
            for hour, people in self._hours.items():
                if not first <= hour < first + HISTORY_HOURS:
                    continue
                for name, row in people.items():
                    if row[HOUR_RESPONSES] and (only is None or name == only):
                        series = out.setdefault(name, [[0] * HISTORY_HOURS, [0.0] * HISTORY_HOURS])
                        series[0][hour - first] = row[HOUR_RESPONSES]
                        series[1][hour - first] = round(row[HOUR_COST], 6)
        return first * 3600, out

    def refusals_since(self, name: str, since: float) -> int:
        """Refusals of ``name`` in the hours from the one holding ``since``."""
        first = int(since // 3600)
        with self._lock:
            return sum(people[name][HOUR_REFUSED] for hour, people in self._hours.items()
                       if hour >= first and name in people)

    def daily(self, now: float, only: Optional[str] = None) -> Tuple[List[str], Dict[str, list]]:
        """(the last HISTORY_DAYS day keys, oldest first; {model: cost per day})."""
        keys = []  # type: List[str]
        moment = now
        while len(keys) < HISTORY_DAYS:  # by half days: a 23-hour day is never skipped
            key = self.clock.period("day", moment)[0]
            if key not in keys:
                keys.append(key)
            moment -= 12 * 3600
        keys.reverse()
        out = {}  # type: Dict[str, List[float]]
        with self._lock:
            for i, key in enumerate(keys):
                for name, models in self._days.get(key, {}).items():
                    if only is None or name == only:
                        for model, (_, cost) in models.items():
                            out.setdefault(model, [0.0] * len(keys))[i] += cost
        return keys, {model: [round(c, 6) for c in costs] for model, costs in out.items()}

    def period(self, name: str, period: str, now: float) -> Tuple[int, float, int]:
        """(responses, cost, tokens) of ``name`` in the current day, week or month."""
        key = self.clock.period(period, now)[0]
        with self._lock:
            tally = self._periods.get(name, {}).get(period)
            if tally is None or tally[0] != key:
                return 0, 0.0, 0
            return tally[1], tally[2], tally[3]

    def last_seen(self, name: str) -> Optional[float]:
        with self._lock:
            return self._last_seen.get(name)

    def refusals(self, name: str) -> List[Tuple[float, int, str]]:
        with self._lock:
            return list(self._refusals.get(name, ()))

    def recent(self, only: Optional[str] = None) -> List[Tuple[Any, ...]]:
        """The last requests, newest first (only ``only``'s when given)."""
        with self._lock:
            entries = list(self._recent)
        return [e for e in reversed(entries) if only is None or e[1] == only]

    # -- the file ---------------------------------------------------------------------
    def to_json(self, now: float) -> Dict[str, Any]:
        with self._lock:
            return {
                "version": 1, "saved_at": format_rfc3339(now),
                "hours": {str(hour): {name: list(row) for name, row in people.items()}
                          for hour, people in self._hours.items()},
                "days": {day: {name: {model: list(entry) for model, entry in models.items()}
                               for name, models in people.items()}
                         for day, people in self._days.items()},
                "periods": {name: {period: list(tally) for period, tally in periods.items()}
                            for name, periods in self._periods.items()},
                "last_seen": dict(self._last_seen),
                "refusals": {name: [list(refusal) for refusal in kept]
                             for name, kept in self._refusals.items()},
                "recent": [list(entry) for entry in self._recent]}

    def load(self, now: float) -> None:
        """Continue from the file; a damaged one is moved aside and history
        starts afresh (it only feeds charts: never a reason not to start)."""
        if not self.path:
            return
        try:
            with open(self.path, "rb") as fh:
                self._adopt(parse_json(fh.read().decode("utf-8")), now)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("cannot read the dashboard's history %s (%s); starting afresh", self.path,
                      exc.strerror or exc)
        except (ValueError, TypeError, KeyError, AttributeError, IndexError,
                UnicodeDecodeError) as exc:
            aside = move_aside(self.path, now)
            log.error("dashboard history %s is damaged (%s); moved it to %s and started afresh",
                      self.path, exc.__class__.__name__, aside)

    def _adopt(self, data: Any, now: float) -> None:
        """The file's tables, checked (ValueError and the like when it is not
        ours) and cut to the bounds, as the running history's."""
        if not isinstance(data, dict) or data.get("version") != 1:
            raise ValueError("not a history file")

        def num(value: Any) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError("not a number")
            if not math.isfinite(value):
                raise ValueError("not a finite number")
            return value

        def text(value: Any, limit: int = HISTORY_MAX_TEXT) -> str:
            if not isinstance(value, str):
                raise ValueError("not a string")
            return value[:limit]

        def first(table: Dict[str, Any], limit: int = HISTORY_MAX_NAMES) -> List[Tuple[str, Any]]:
            return list(table.items())[:limit]

        oldest = int(now // 3600) - HISTORY_HOURS + 1
        hours = {}  # type: Dict[int, Dict[str, List[float]]]
        for hour, people in data["hours"].items():
            if int(hour) >= oldest:
                hours[int(hour)] = {text(n): [num(x) for x in row] for n, row in first(people)}
        if any(len(row) != 6 for people in hours.values() for row in people.values()):
            raise ValueError("an hour's row of the wrong length")
        days = {}  # type: Dict[str, Dict[str, Dict[str, List[float]]]]
        for day in sorted(data["days"])[-HISTORY_DAYS:]:
            days[text(day, 20)] = {text(n): {text(m, 100): [int(num(e[0])), num(e[1])]
                                             for m, e in first(models, HISTORY_MAX_MODELS)}
                                   for n, models in first(data["days"][day])}
        periods = {text(n): {p: [text(t[0], 40), int(num(t[1])), num(t[2]), int(num(t[3]))]
                             for p, t in tallies.items() if p in PERIOD_NAMES}
                   for n, tallies in first(data["periods"])}
        last_seen = {text(n): num(t) for n, t in first(data["last_seen"])}
        refusals = {text(n): collections.deque([(num(r[0]), int(num(r[1])), text(r[2]))
                                                for r in kept], maxlen=REFUSALS_KEPT)
                    for n, kept in first(data["refusals"])}
        recent = [(num(e[0]), text(e[1]), text(e[2], 100), int(num(e[3])), text(e[4], 10),
                   text(e[5], 100), int(num(e[6])), int(num(e[7])), int(num(e[8])), num(e[9]),
                   num(e[10]), text(e[11], 100), text(e[12])) for e in data["recent"]]
        with self._lock:
            self._hours, self._days, self._periods = hours, days, periods
            self._last_seen, self._refusals = last_seen, refusals
            self._recent.extend(recent)

    def save_if_dirty(self, now: float) -> None:
        with self._lock:
            if not self._dirty or not self.path:
                return
            self._dirty = False
            for name in sorted(self._last_seen, key=self._last_seen.get)[:-HISTORY_MAX_NAMES]:
                for table in (self._last_seen, self._refusals, self._periods):
                    table.pop(name, None)  # people long gone: the tables stay bounded
        try:
            write_json_atomic(self.path, self.to_json(now), 0o600)
            self._save_failing = False
        except OSError as exc:
            with self._lock:
                self._dirty = True
            if not self._save_failing:
                log.error("cannot save the dashboard's history to %s (%s); retrying", self.path,
                          exc.strerror or exc)
            self._save_failing = True


def history_path(config: Config) -> str:
    """ocm-history.json beside the budgets file or the usage file, where OCM
    already writes; else beside the config; "" without any (kept in memory)."""
    usages = config.usages_path or next(
        (c.usages_path for c in config.credentials if c.usages_path), "")
    beside = config.budgets_path or usages or config.source
    return os.path.join(os.path.dirname(os.path.abspath(beside)), HISTORY_FILE) if beside else ""


class DashboardSessions:
    """Signed-in browsers. A session id is 32 random bytes in an HttpOnly,
    SameSite=Strict cookie, kept here in memory by its digest (a restart
    signs everyone out) until it expires. A session holds the person (or
    the digest of the admin_token) it was opened with and is checked against
    the running config at every request: a reload that removes a person, or
    gives them or the owner a new token, ends it.

    Each person (and the owner) holds at most SESSIONS_PER_PERSON: signing
    in once more ends their own oldest, never someone else's.

    Against guessing: wrong tokens are counted per client address (an IPv6
    /64) and in all over SIGN_IN_WINDOW. Past its own limit an address's
    every attempt, right or wrong, gets 429 until the window ends, so
    guessing on cannot tell a hit; past the limit in all, so does every
    address that has sent a wrong token in the window (many addresses
    guessing at once), while one that has not (the owner, at home) may
    still sign in."""

    def __init__(self, lifetime: float = SESSION_LIFETIME):
        self.lifetime = lifetime
        self._lock = threading.Lock()
        # digest of the id -> (User, or None for the owner; admin digest; expiry)
        self._sessions = collections.OrderedDict()  # type: collections.OrderedDict
        # client address -> [wrong tokens, since]
        self._failures = collections.OrderedDict()  # type: collections.OrderedDict
        self._all_failures = [0, 0.0]  # type: List[float]

    def open(self, user: Optional[User], admin: bytes, now: float) -> str:
        """A new session for ``user`` (None: the owner); returns its id."""
        session_id = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode("ascii")
        who = user.name if user is not None else None
        with self._lock:
            own = [key for key, entry in self._sessions.items()
                   if (entry[0].name if entry[0] is not None else None) == who]
            for key in own[:max(0, len(own) - SESSIONS_PER_PERSON + 1)]:
                del self._sessions[key]
            self._sessions[token_digest(session_id)] = (user, admin, now + self.lifetime)
            while len(self._sessions) > MAX_DASHBOARD_SESSIONS:
                self._sessions.popitem(last=False)
        return session_id

    def find(self, session_id: str, now: float) -> Optional[Tuple[Optional[User], bytes]]:
        """(the user, or None for the owner; the admin digest) of a live session."""
        key = token_digest(session_id)
        with self._lock:
            entry = self._sessions.get(key)
            if entry is not None and entry[2] <= now:
                del self._sessions[key]
                entry = None
        return (entry[0], entry[1]) if entry is not None else None

    def close(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(token_digest(session_id), None)

    def keep_only(self, is_current: Callable[[Optional[User], bytes], bool], now: float) -> int:
        """After a reload: end the sessions whose person or token has gone; how many."""
        with self._lock:
            gone = [key for key, (user, admin, until) in self._sessions.items()
                    if until <= now or not is_current(user, admin)]
            for key in gone:
                del self._sessions[key]
        return len(gone)

    def count(self) -> int:
        with self._lock:
            return len(self._sessions)

    # -- guessing -----------------------------------------------------------------------
    def blocked_for(self, address: str, now: float) -> float:
        """Seconds until ``address`` may try a token again; 0 when it may now."""
        wait = 0.0
        with self._lock:
            own = self._failures.get(address_group(address))
            if own is None or not own[0] or now >= own[1] + SIGN_IN_WINDOW:
                return 0.0  # no wrong token from here lately
            for entry, limit in ((self._all_failures, SIGN_IN_FAILURES_IN_ALL),
                                 (own, SIGN_IN_FAILURES_PER_ADDRESS)):
                if entry[0] >= limit and now < entry[1] + SIGN_IN_WINDOW:
                    wait = max(wait, entry[1] + SIGN_IN_WINDOW - now)
        return wait

    def failed(self, address: str, now: float) -> bool:
        """Count a wrong token from ``address``; True when this one blocks it."""
        address = address_group(address)
        with self._lock:
            entry = self._failures.get(address)
            if entry is None:
                entry = self._failures[address] = [0, now]
                while len(self._failures) > 4096:  # one entry per address: bounded
                    self._failures.popitem(last=False)
            for counted in (entry, self._all_failures):
                if now >= counted[1] + SIGN_IN_WINDOW or not counted[0]:
                    counted[0], counted[1] = 0, now  # a new window from this attempt
                counted[0] += 1
            return (entry[0] == SIGN_IN_FAILURES_PER_ADDRESS
                    or self._all_failures[0] == SIGN_IN_FAILURES_IN_ALL)


class Viewer(namedtuple("Viewer", "user via")):
    """Who looks at the dashboard: ``user`` None is the owner; ``via`` says
    how they are known: loopback, session or token."""
    __slots__ = ()

    @property
    def is_owner(self) -> bool:
        return self.user is None


def admin_digest(config: Config) -> bytes:
    return User("owner", config.admin_token).token_digest if config.admin_token else b""


def match_token(state: "State", token: str) -> Optional[Viewer]:
    """The owner (admin_token) or the person whose token this is; None if nobody's."""
    if not token:
        return None
    admin = admin_digest(state.config)
    if admin and hmac.compare_digest(admin, token_digest(token)):
        return Viewer(None, "token")
    user = state.users.find(token)
    return Viewer(user, "token") if user is not None else None


def is_loopback_request(request: "ClientRequest", client_ip: str) -> bool:
    """From the box itself, to a loopback name, not through a proxy. The Host
    check keeps a web page from reaching the owner's view by DNS rebinding
    (a name of its own resolving to 127.0.0.1); the forwarding headers keep
    a reverse proxy on the box from passing everyone in as loopback."""
    if not is_loopback(client_ip) or any(request.headers.get(h) for h in FORWARDING_HEADERS):
        return False
    return names_loopback(request)


def names_loopback(request: "ClientRequest") -> bool:
    """The request's Host is a loopback name (or absent, as from HTTP/1.0)."""
    host = request.headers.get("host", "").strip().lower()
    name = host[1:host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
    return not host or name == "localhost" or is_loopback(name)


def check_open_access(request: "ClientRequest", client_ip: str) -> None:
    """Open access (no users) serves programs, not web pages: a page the
    owner visits could otherwise spend the subscription, by posting to
    127.0.0.1 (its browser sends Origin or Sec-Fetch-Site) or through a name
    of its own that resolves to the box (DNS rebinding: a Host that is not a
    loopback name, from a loopback client)."""
    site = request.headers.get("sec-fetch-site", "").strip().lower()
    from_page = request.headers.get("origin") is not None or site not in ("", "none")
    if from_page or (is_loopback(client_ip) and not names_loopback(request)):
        raise HTTPError(403, "permission_error", "OCM without users serves programs on this "
                        "box, and this request came from a web page (or named another host); "
                        "add users to the config to use OCM from a browser or another name")


def session_cookie(request: "ClientRequest") -> str:
    for header in request.headers.get_all("cookie"):
        for part in header.split(";"):
            name, _, value = part.strip().partition("=")
            if name == SESSION_COOKIE and value:
                return value.strip()
    return ""


def too_many_tokens(wait: float) -> HTTPError:
    seconds = int(math.ceil(wait))
    return HTTPError(429, "rate_limit_error", "too many wrong tokens; try again in %d s" % seconds,
                     headers=[("Retry-After", str(seconds))])


def wrong_token(sessions: DashboardSessions, client_ip: str, now: float) -> None:
    if sessions.failed(client_ip, now):
        log.warning("dashboard: too many wrong tokens from %s; refusing it for %d s", client_ip,
                    SIGN_IN_WINDOW)


def dashboard_viewer(server: "OCMServer", state: "State", request: "ClientRequest",
                     client_ip: str, now: float) -> Optional[Viewer]:
    """Who asks: a bearer token (scripts), a session cookie (browsers), or the
    box itself. None when nobody is signed in; HTTPError 401 for a wrong
    bearer token, 429 while this address may not try tokens."""
    sessions = server.dashboard_sessions
    authorization = request.headers.get("authorization", "")
    if authorization:
        wait = sessions.blocked_for(client_ip, now)
        if wait:
            raise too_many_tokens(wait)
        scheme, _, token = authorization.strip().partition(" ")
        viewer = match_token(state, token.strip()) if scheme.lower() == "bearer" else None
        if viewer is None:
            wrong_token(sessions, client_ip, now)
            raise HTTPError(401, "authentication_error", "the dashboard takes the owner's "
                            "admin_token or your own token",
                            headers=[("WWW-Authenticate", 'Bearer realm="ocm"')])
        check_access(viewer.user, now)  # an expired person sees why, and nothing else
        return viewer
    session_id = session_cookie(request)
    found = sessions.find(session_id, now) if session_id else None
    if found is not None:
        user, admin = found
        current = state.users.current(user) if user is not None else None
        if current is not None:
            check_access(current, now)
            return Viewer(current, "session")
        if user is None and admin == admin_digest(state.config):
            return Viewer(None, "session")
        sessions.close(session_id)  # the person or the token has gone since
    if is_loopback_request(request, client_ip):
        return Viewer(None, "loopback")
    return None


# -- the JSON document ------------------------------------------------------------------

ACCOUNT_STATE_WORDS = {"usable": "usable", "cooling_down": "cooling down",
                       "reserve_reached": "held in reserve", "exhausted": "exhausted",
                       "unavailable": "signed out"}


def window_name(kind: str, minutes: Optional[float]) -> str:
    """"5-hour", "weekly", "30-day": a window by its length."""
    if not minutes:
        return {"short": "5-hour", "long": "weekly"}.get(kind, kind)
    whole = int(round(minutes))
    if whole == WEEK_MINUTES:
        return "weekly"
    for size, unit in ((1440, "day"), (60, "hour")):
        if whole % size == 0:
            return "%d-%s" % (whole // size, unit)
    return "%d-minute" % whole


def account_reason(account: Account, status: Dict[str, Any], windows: Dict[str, Window],
                   now: float, owner: bool) -> str:
    """Why an account is in its state, in plain words."""
    state = status["state"]
    if state == "unavailable":
        if owner:  # the owner may see the file's path; people get the plain words
            return log_safe(account.credential.peek()[1] or status.get("problem") or "", 300)
        return "its login does not work now; the owner has to sign it in again"
    if state == "cooling_down":
        return "OpenAI answered that its usage limit is reached; OCM rests it until then"
    full = [(kind, window) for kind, window in windows.items()
            if window.used(now) >= 100 - account.reserve_of(kind)]
    if state == "exhausted":
        return " and ".join("the %s window is used up" % window_name(kind, window.window_minutes)
                            for kind, window in full if window.used(now) >= 100)
    if state == "reserve_reached":
        return " and ".join("the %s window is at %g%%, into the %d%% kept in reserve" % (
            window_name(kind, window.window_minutes), round(window.used(now), 1),
            account.reserve_of(kind)) for kind, window in full)
    return ""


def account_view(account: Account, pools: List[str], owner: bool, now: float) -> Dict[str, Any]:
    status = account.to_json()
    windows = dict(account.windows)
    known = [kind for kind, window in windows.items() if window.used_percent is not None]
    order = sorted(known, key=lambda kind: windows[kind].window_minutes or (
        SHORT_WINDOW_MAX_MINUTES if kind == "short" else WEEK_MINUTES))
    out = {"account": account.tag, "plan": status["plan"], "state": status["state"],
           "state_words": ACCOUNT_STATE_WORDS.get(status["state"], status["state"]),
           "reason": account_reason(account, status, windows, now, owner),
           "usable_again_at": status.get("usable_again_at"),
           "windows": [], "limits_seen_at": max(account.observed_at, account.polled_at) or None}
    for kind in order:
        window = windows[kind]
        out["windows"].append({
            "window": WINDOW_LABELS.get(kind, kind),
            "name": window_name(kind, window.window_minutes),
            "used_percent": round(window.used(now), 1), "window_minutes": window.window_minutes,
            "resets_at": window.resets_at if (window.resets_at or 0) > now else None,
            "reserve_percent": account.reserve_of(kind)})
    if owner:
        login, _ = account.credential.peek()
        out.update(pools=pools, in_flight=account.in_flight,
                   login_refreshed_at=login.last_refresh if login is not None else None,
                   last_poll_error=account.last_poll_error or None)
    return out


def book_totals(accounts: List[Account]) -> Dict[str, Dict[str, Any]]:
    """Each person's all-time figures in the usage files, added up as `ocm.py usage` does."""
    totals = {}  # type: Dict[str, Dict[str, Any]]
    for account in accounts:
        if account.usage is None:
            continue
        for combo in account.usage.to_json()["combinations"]:
            for name, stats in combo["by_user"].items():
                row = totals.setdefault(name, dict.fromkeys(
                    ("requests", "input_tokens", "cached_tokens", "output_tokens"), 0))
                row["requests"] += stats["request_count"]
                for key in ("input_tokens", "cached_tokens", "output_tokens"):
                    row[key] += stats[key]
                row["cost_usd"] = row.get("cost_usd", 0.0) + stats["cost_usd"]
    for row in totals.values():
        row["cost_usd"] = round_cents(row["cost_usd"])
    return totals


def period_view(history: History, ledger: Optional[BudgetLedger], user: User, period: str,
                now: float) -> Dict[str, Any]:
    """A person's day, week or month. With a budget for it, the budget's own
    figures (what /metrics and `ocm.py usage` show); else the history's."""
    requests, usd, tokens = history.period(user.name, period, now)
    budgets = [b for b in user.budgets if b.period == period]
    out = {"period": period, "name": PERIOD_NAMES[period], "budgets": [],
           "resets_at": history.clock.period(period, now)[1]}
    if budgets and ledger is not None:
        usd, tokens = ledger.spent(user.name, period)
        requests = ledger.requests(user.name, period)
        for budget in budgets:
            limit = budget.usd if budget.usd is not None else float(budget.tokens)
            spent = usd if budget.usd is not None else tokens
            out["budgets"].append({"unit": "usd" if budget.usd is not None else "tokens",
                                   "limit": limit, "spent": round(spent, 6),
                                   "percent": round(100.0 * spent / limit, 1)})
    out.update(requests=requests, cost_usd=round(usd, 6), tokens=int(tokens))
    return out


def person_view(server: "OCMServer", state: "State", user: User, in_flight: Dict[str, int],
                totals: Dict[str, Dict[str, Any]], now: float) -> Dict[str, Any]:
    history = server.history
    shares = []
    for account in state.pool_for(user).accounts():
        for kind, cap in (("short", user.share_5h), ("long", user.share_weekly)):
            if cap is not None:
                window = account.windows.get(kind) or Window()
                shares.append({
                    "account": account.tag, "window": WINDOW_LABELS[kind], "cap": cap,
                    "name": window_name(kind, window.window_minutes),
                    "used": round(account.user_share(user.name, kind), 1),
                    "resets_at": window.resets_at if (window.resets_at or 0) > now else None})
    refusals = [{"time": when, "status": status, "message": message}
                for when, status, message in reversed(history.refusals(user.name))]
    return {"name": user.name, "credential": user.credential or None,
            "in_flight": in_flight.get(user.name, 0),
            "max_concurrent": user.max_concurrent or None,
            "last_seen": history.last_seen(user.name), "expires_at": user.expires_at,
            "expired": user.expires_at is not None and now >= user.expires_at,
            "models": list(user.models), "shares": shares, "all_time": totals.get(user.name),
            "periods": [period_view(history, state.ledger, user, period, now)
                        for period in ("day", "week", "month")],
            "refusals": {"last_24h": history.refusals_since(user.name, now - 86400),
                         "recent": refusals}}


RECENT_FIELDS = ("time", "user", "model", "status", "method", "path", "input_tokens",
                 "cached_tokens", "output_tokens", "cost_usd", "duration_s", "account", "error")


def recent_view(entry: Tuple[Any, ...]) -> Dict[str, Any]:
    out = dict(zip(RECENT_FIELDS, entry))
    for key in ("user", "model", "account", "error"):
        out[key] = out[key] or None
    out["cost_usd"], out["duration_s"] = round(out["cost_usd"], 6), round(out["duration_s"], 3)
    return out


def server_view(server: "OCMServer", now: float) -> Dict[str, Any]:
    config = server.state.config
    return {"version": __version__, "started_at": server.started_at,
            "uptime_s": round(now - server.started_at), "listen": [server.url],
            "config": os.path.abspath(config.source) if config.source else None,
            "tls": server.tls is not None, "timezone": config.timezone,
            "last_reload": server.last_reload, "history_path": server.history.path or None,
            "dashboard_sessions": server.dashboard_sessions.count(),
            "admin_token": bool(config.admin_token)}


def dashboard_document(server: "OCMServer", viewer: Viewer, now: float) -> Dict[str, Any]:
    """GET /ocm/v1/dashboard: everything for the owner; for a person, only
    their own figures and the accounts they draw from (docs/dashboard.md)."""
    state, history = server.state, server.history
    owner = viewer.is_owner
    only = None if owner else viewer.user.name
    accounts = list(state.accounts.values()) if owner else state.pool_for(viewer.user).accounts()
    users = list(state.users.users) if owner else [viewer.user]
    if owner and not users:  # open access: one row for everyone
        users = [User("", "")]
    pools = [p for p in state.pools.values() if p.is_pool]
    first_hour, hourly = history.hourly(now, only)
    days, daily = history.daily(now, only)
    totals = book_totals(list(state.accounts.values()))  # a person's own row only, wherever it is
    in_flight = server.concurrency.snapshot()
    document = {
        "time": round(now, 3), "version": __version__,
        "viewer": {"role": "owner" if owner else "person", "user": only, "via": viewer.via},
        "accounts": [account_view(a, [p.tag for p in pools if a in p.accounts()], owner, now)
                     for a in accounts],
        "people": [person_view(server, state, u, in_flight, totals, now) for u in users],
        "charts": {"hours": {"start": first_hour, "step": 3600,
                             "people": [{"name": name, "requests": s[0], "cost_usd": s[1]}
                                        for name, s in sorted(hourly.items())]},
                   "days": {"days": days, "models": [{"model": model, "cost_usd": costs}
                                                      for model, costs in sorted(daily.items())]}},
        "recent": [recent_view(entry) for entry in history.recent(only)],
    }
    if owner:
        document.update(
            open_access=not state.users.users, server=server_view(server, now),
            pools=[{"pool": p.tag, "type": p.kind, "strategy": p.strategy or None,
                    "accounts": [a.tag for a in p.accounts()]} for p in pools],
            without_valid_token={"refusals_last_24h": history.refusals_since("", now - 86400)
                                 if state.users.users else 0})
    return document


# -- the page and its routes ----------------------------------------------------------
# The page, its style and its script are constants with no data in them. The
# Content-Security-Policy allows exactly this script and this style (by their
# SHA-256), fetches to the same origin, and forms that post back to it.

DASHBOARD_STYLE = r"""
:root{color-scheme:light dark;--bg:#f5f6f8;--card:#fff;--text:#17191c;--muted:#5d6775;
--line:#e2e6eb;
--track:#e8ecf1;--accent:#2f6fde;--ok:#17803d;--warn:#a85b06;--bad:#c0262d;--okbg:#ddf6e4;
--warnbg:#fcefd3;--badbg:#fde2e2}
@media (prefers-color-scheme:dark){:root{--bg:#0d1014;--card:#161a20;--text:#e7ebf0;
--muted:#909bab;
--line:#272e38;--track:#262d37;--accent:#5c9dff;--ok:#48c267;--warn:#e0a43a;--bad:#ff6b6b;
--okbg:#163222;--warnbg:#3a2c10;--badbg:#411a1c}}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;background:var(--bg);color:var(--text);
font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",sans-serif}
[hidden]{display:none!important}
header{position:sticky;top:0;z-index:2;display:flex;align-items:center;gap:10px;flex-wrap:wrap;
padding:10px max(16px,calc(50% - 574px));background:var(--card);
border-bottom:1px solid var(--line)}
.brand{font-weight:750;letter-spacing:.03em}
.who{color:var(--muted)}
.spacer{flex:1}
.updated{color:var(--muted);font-size:13px;font-variant-numeric:tabular-nums}
.updated.stale{color:var(--bad)}
main{max-width:1180px;margin:0 auto;padding:8px 16px 40px}
h2{font-size:12px;font-weight:650;text-transform:uppercase;letter-spacing:.07em;color:var(--muted);
margin:22px 0 10px}
.grid{display:grid;gap:12px;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));
align-items:start}
.charts{display:grid;gap:12px;grid-template-columns:repeat(auto-fit,minmax(340px,1fr))}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:14px 16px;
min-width:0}
.tiles{display:grid;gap:12px;grid-template-columns:repeat(auto-fit,minmax(140px,1fr));
margin-top:14px}
.tile{padding:12px 16px}
.tile .value{font-size:24px;font-weight:650;font-variant-numeric:tabular-nums;line-height:1.2}
.tile .label{color:var(--muted);font-size:13px}
.head{display:flex;align-items:center;gap:8px;flex-wrap:wrap}
.title{font-weight:650;font-size:16px;overflow-wrap:anywhere}
.head .right{margin-left:auto;color:var(--muted);font-size:13px}
.pill{display:inline-block;padding:1px 8px;border-radius:999px;font-size:12px;font-weight:600;
background:var(--track);color:var(--muted);white-space:nowrap}
.pill.ok{background:var(--okbg);color:var(--ok)}
.pill.warn{background:var(--warnbg);color:var(--warn)}
.pill.bad{background:var(--badbg);color:var(--bad)}
.reason{color:var(--muted);font-size:13px;margin-top:4px;overflow-wrap:anywhere}
.meters{display:grid;grid-template-columns:minmax(76px,max-content) minmax(60px,1fr) max-content;
align-items:center;gap:2px 10px;margin-top:10px}
.meters .name{font-size:13px;white-space:nowrap}
.num{font-variant-numeric:tabular-nums;text-align:right;white-space:nowrap}
.meters .num{font-size:13px}
.bar{height:8px;background:var(--track);border-radius:4px;overflow:hidden}
.bar>span{display:block;height:100%;background:var(--accent);border-radius:4px;min-width:2px}
.bar>span.warn{background:var(--warn)}
.bar>span.bad{background:var(--bad)}
.bar.none{background:transparent}
.sub{grid-column:2/4;display:flex;justify-content:space-between;flex-wrap:wrap;gap:0 10px;
color:var(--muted);font-size:12px;margin-bottom:6px;font-variant-numeric:tabular-nums}
.foot{color:var(--muted);font-size:12px;margin-top:12px;padding-top:8px;
border-top:1px solid var(--line)}
.refusals{margin-top:10px;font-size:13px;color:var(--warn);overflow-wrap:anywhere}
.charts>div{min-width:0}
.chart{width:100%;min-height:10px;overflow:hidden}
.chart svg{display:block;max-width:100%;height:auto}
.chart text{fill:var(--muted);font-size:11px;font-variant-numeric:tabular-nums}
.chart line{stroke:var(--line);stroke-width:1}
.card h3{font-size:14px;font-weight:650;margin:0 0 8px;display:flex;gap:8px;align-items:baseline}
.card h3 .total{margin-left:auto;font-weight:500;color:var(--muted);font-size:13px;
font-variant-numeric:tabular-nums}
.legend{display:flex;flex-wrap:wrap;gap:4px 14px;font-size:12px;color:var(--muted);margin-top:8px}
.legend span{display:inline-flex;align-items:center;gap:5px;overflow-wrap:anywhere}
.legend i{width:10px;height:10px;border-radius:2px;flex:none}
.empty{color:var(--muted);font-size:13px;padding:24px 0;text-align:center}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch}
table{width:100%;border-collapse:collapse;font-size:13px}
th{color:var(--muted);font-weight:600;text-align:left;font-size:12px}
th,td{padding:7px 8px;border-bottom:1px solid var(--line);white-space:nowrap}
tr:last-child td{border-bottom:0}
th.num,td.num{text-align:right}
td.model{max-width:220px;overflow:hidden;text-overflow:ellipsis}
.narrow{display:none}
td.who>span{color:var(--muted);font-size:12px}
.nowrap{white-space:nowrap}
.status-ok{color:var(--ok)}
.status-bad{color:var(--bad)}
.status-warn{color:var(--warn)}
dl{display:grid;grid-template-columns:max-content 1fr;gap:6px 18px;margin:0;font-size:14px}
dt{color:var(--muted)}
dd{margin:0;overflow-wrap:anywhere}
.signin{max-width:400px;margin:10vh auto 0;padding:24px}
.signin h1{font-size:20px;margin:0 0 6px}
.signin p{color:var(--muted);font-size:14px;margin:0 0 16px}
label{display:block;font-size:13px;font-weight:600;margin-bottom:6px}
input{width:100%;font:inherit;padding:10px 12px;border:1px solid var(--line);border-radius:8px;
background:var(--bg);color:var(--text)}
input:focus{outline:2px solid var(--accent);outline-offset:1px}
button{font:inherit;font-size:14px;padding:6px 14px;border-radius:8px;border:1px solid var(--line);
background:var(--card);color:var(--text);cursor:pointer}
button.primary{display:block;width:100%;margin-top:14px;padding:10px;background:var(--accent);
border-color:var(--accent);color:#fff;font-weight:600}
.problem{color:var(--bad);font-size:14px;margin:12px 0 0}
.banner{margin-top:14px;padding:10px 14px;border-radius:8px;background:var(--warnbg);
color:var(--warn);font-size:14px}
.more{margin-top:10px}
header form{margin:0}
@media (max-width:640px){body{font-size:14px}main{padding:4px 12px 32px}
.grid,.charts{grid-template-columns:1fr}.tiles{grid-template-columns:1fr 1fr}
.tile .value{font-size:20px}.card{padding:12px 14px}th,td{padding:7px 5px}
.wide{display:none}.narrow{display:block}
td.who{white-space:normal;overflow-wrap:anywhere}}
"""

DASHBOARD_SCRIPT = r"""
"use strict";
(function () {
  var REFRESH_MS = 5000;
  var PEOPLE_COLOURS = ["#2f6fde", "#e0663a", "#1f9e89", "#b34fc8", "#d4a21b", "#5b7c99",
                        "#d0487a", "#6aa84f", "#8c6d4f", "#3fa7d6"];
  var MODEL_COLOURS = ["#6a5acd", "#20a39e", "#ef8354", "#c1447e", "#4f772d", "#b08b2e",
                       "#3d5a80", "#9c6644", "#7b2cbf", "#2a9d8f"];
  var SVG = "http://www.w3.org/2000/svg";
  var TOO_MANY = "Too many wrong tokens; wait a few minutes.";
  var data = null, skew = 0, lastOk = 0, timer = null, failing = false, pending = "";
  var showAll = false;

  function $(id) { return document.getElementById(id); }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    return e;
  }
  function add(parent) {
    for (var i = 1; i < arguments.length; i++) {
      if (arguments[i]) { parent.appendChild(arguments[i]); }
    }
    return parent;
  }
  function svg(tag, attrs) {
    var e = document.createElementNS(SVG, tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, String(attrs[k])); });
    return e;
  }
  function clear(e) { while (e.firstChild) { e.removeChild(e.firstChild); } return e; }
  function now() { return Date.now() / 1000 + skew; }

  // -- words and numbers ---------------------------------------------------------
  function usd(x, digits) {
    if (x === null || x === undefined) { return "–"; }
    if (digits === undefined) { digits = 2; }
    var least = Math.pow(10, -digits);
    if (x > 0 && x < least) { return "<$" + least.toFixed(digits); }
    return "$" + x.toLocaleString("en-US", {minimumFractionDigits: digits,
                                            maximumFractionDigits: digits});
  }
  function count(x) { return (x || 0).toLocaleString("en-US"); }
  function compact(x) {
    x = x || 0;
    if (x >= 1e9) { return (x / 1e9).toFixed(x >= 1e10 ? 0 : 1) + "B"; }
    if (x >= 1e6) { return (x / 1e6).toFixed(x >= 1e7 ? 0 : 1) + "M"; }
    if (x >= 1e4) { return Math.round(x / 1e3) + "k"; }
    if (x >= 1e3) { return (x / 1e3).toFixed(1) + "k"; }
    return String(Math.round(x));
  }
  function span(seconds) {
    seconds = Math.max(0, Math.round(seconds));
    var d = Math.floor(seconds / 86400), h = Math.floor(seconds % 86400 / 3600);
    var m = Math.floor(seconds % 3600 / 60);
    if (d) { return d + "d " + h + "h"; }
    if (h) { return h + "h " + (m < 10 ? "0" : "") + m + "m"; }
    if (m) { return m + "m"; }
    return seconds + "s";
  }
  function ago(t) { return t ? span(now() - t) + " ago" : "never"; }
  function clock(t) {
    var d = new Date(t * 1000), today = new Date(now() * 1000);
    var time = d.toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"});
    if (d.toDateString() === today.toDateString()) { return time; }
    return d.toLocaleDateString([], {month: "short", day: "numeric"}) + " " + time;
  }
  function personName(name) {
    if (name) { return name; }
    return data && data.open_access ? "everyone" : "no valid token";
  }
  function colourOf(list, names, name) {
    var i = names.indexOf(name);
    return list[(i < 0 ? 0 : i) % list.length];
  }
  function countdown(node, t, before, after) {
    node.dataset.until = String(t);
    node.dataset.before = before || "";
    node.dataset.after = after || "";
    tick(node);
    return node;
  }
  function tick(node) {
    var left = Number(node.dataset.until) - now();
    node.textContent = left > 0 ? node.dataset.before + "in " + span(left) : node.dataset.after;
  }

  // -- pieces --------------------------------------------------------------------
  function pill(text, kind) { return el("span", "pill" + (kind ? " " + kind : ""), text); }
  function bar(percent, warnAt) {
    var b = el("div", "bar"), fill = el("span");
    percent = Math.max(0, Math.min(100, percent || 0));
    fill.style.width = percent.toFixed(1) + "%";
    if (percent >= 100) { fill.className = "bad"; }
    else if (percent >= (warnAt || 80)) { fill.className = "warn"; }
    return add(b, fill);
  }
  function meter(grid, name, percent, figure, sub, warnAt) {
    add(grid, el("div", "name", name),
        percent === null ? el("div", "bar none") : bar(percent, warnAt),
        el("div", "num", figure), sub);
  }
  var STATE_KINDS = {usable: "ok", cooling_down: "warn", reserve_reached: "warn",
                     exhausted: "bad", unavailable: "bad"};

  // -- accounts ------------------------------------------------------------------
  function accountCard(a, owner) {
    var card = el("div", "card");
    var head = add(el("div", "head"), el("span", "title", a.account));
    if (a.plan) { add(head, pill(a.plan)); }
    add(head, pill(a.state_words, STATE_KINDS[a.state]));
    if (owner && a.in_flight) { add(head, el("span", "right", a.in_flight + " in flight")); }
    add(card, head);
    if (a.reason || (a.state !== "usable" && a.usable_again_at)) {
      var reason = add(el("div", "reason"), document.createTextNode(a.reason));
      if (a.state !== "usable" && a.usable_again_at) {
        add(reason, document.createTextNode(a.reason ? "; " : ""),
            countdown(el("span"), a.usable_again_at, "usable again ", "usable again soon"));
      }
      add(card, reason);
    }
    var grid = el("div", "meters");
    a.windows.forEach(function (w) {
      var sub = el("div", "sub");
      if (w.resets_at) { add(sub, countdown(el("span"), w.resets_at, "resets ", "reset")); }
      if (w.reserve_percent) { add(sub, el("span", "", w.reserve_percent + "% kept in reserve")); }
      meter(grid, w.name, w.used_percent, w.used_percent.toFixed(0) + "%",
            sub.firstChild ? sub : null, 100 - (w.reserve_percent || 20));
    });
    if (!a.windows.length) { add(grid, el("div", "sub", "no window reported yet")); }
    add(card, grid);
    var foot = [];
    if (a.limits_seen_at) { foot.push("limits from " + ago(a.limits_seen_at)); }
    if (owner) {
      if (a.login_refreshed_at) { foot.push("login refreshed " + ago(a.login_refreshed_at)); }
      if (a.pools && a.pools.length) { foot.push("pool " + a.pools.join(", ")); }
      if (a.last_poll_error) { foot.push("last poll: " + a.last_poll_error); }
    }
    if (foot.length) { add(card, el("div", "foot", foot.join(" · "))); }
    return card;
  }

  // -- people --------------------------------------------------------------------
  function periodRows(grid, period) {
    var label = period.name.charAt(0).toUpperCase() + period.name.slice(1);
    var detail = count(period.requests) + " requests · " + compact(period.tokens) + " tokens";
    if (!period.budgets.length) {
      var sub = add(el("div", "sub"), el("span", "", detail));
      meter(grid, label, null, usd(period.cost_usd), sub);
      return;
    }
    period.budgets.forEach(function (b, i) {
      var last = i === period.budgets.length - 1;
      var figure = b.unit === "usd" ? usd(b.spent) + " of " + usd(b.limit)
                                    : compact(b.spent) + " of " + compact(b.limit) + " tokens";
      var sub = el("div", "sub");
      if (last) {
        add(sub, el("span", "", detail),
            countdown(el("span"), period.resets_at, "resets ", "resets now"));
      }
      meter(grid, i ? "" : label, b.percent, figure, sub);
    });
  }
  function personCard(p, owner) {
    var card = el("div", "card");
    var head = add(el("div", "head"), el("span", "title", personName(p.name)));
    if (p.expired) { add(head, pill("access expired", "bad")); }
    if (p.in_flight) {
      add(head, pill(p.in_flight + (p.max_concurrent ? " of " + p.max_concurrent : "") +
                     " running", "ok"));
    }
    add(head, el("span", "right", p.last_seen ? "seen " + ago(p.last_seen) : "not seen yet"));
    add(card, head);
    var grid = el("div", "meters");
    p.periods.forEach(function (period) { periodRows(grid, period); });
    p.shares.forEach(function (s) {
      var sub = add(el("div", "sub"), el("span", "", "share of " + s.account + "'s " + s.name +
                                              " window"));
      if (s.resets_at) { add(sub, countdown(el("span"), s.resets_at, "resets ", "reset")); }
      meter(grid, s.window + " share", 100 * s.used / s.cap,
            s.used.toFixed(1) + " of " + s.cap + " pts", sub);
    });
    add(card, grid);
    if (p.refusals.last_24h || p.refusals.recent.length) {
      var r = el("div", "refusals", p.refusals.last_24h + " refused in 24 h");
      var last = p.refusals.recent[0];
      if (last) { r.textContent += " · last, " + ago(last.time) + ": " + last.message; }
      add(card, r);
    }
    var foot = [];
    if (p.all_time) {
      foot.push("all time: " + count(p.all_time.requests) + " requests, " +
                usd(p.all_time.cost_usd));
    }
    if (owner && p.credential) { foot.push("draws from " + p.credential); }
    if (p.models.length) { foot.push("models: " + p.models.join(", ")); }
    if (p.expires_at && !p.expired) { foot.push("access until " + clock(p.expires_at)); }
    if (foot.length) { add(card, el("div", "foot", foot.join(" · "))); }
    return card;
  }

  // -- charts --------------------------------------------------------------------
  function niceMax(x) {
    if (x <= 0) { return 1; }
    var p = Math.pow(10, Math.floor(Math.log10(x))), steps = [1, 2, 2.5, 5, 10];
    for (var i = 0; i < steps.length; i++) { if (steps[i] * p >= x) { return steps[i] * p; } }
    return 10 * p;
  }
  // series: [{name, colour, values}]; labels: under each column ("" for none);
  // titles: each column's name in tooltips; format(value, isAxis)
  function stackedBars(host, series, labels, titles, format) {
    clear(host);
    var width = Math.max(260, host.clientWidth || 600), height = 170;
    var left = 46, bottom = 20, top = 8, n = labels.length;
    var totals = labels.map(function (_, i) {
      return series.reduce(function (s, one) { return s + (one.values[i] || 0); }, 0);
    });
    var max = niceMax(Math.max.apply(null, totals.concat([0])));
    var plotW = width - left - 4, plotH = height - top - bottom, step = plotW / n;
    var gap = Math.min(4, step * 0.25);
    var root = svg("svg", {width: width, height: height, viewBox: "0 0 " + width + " " + height,
                           role: "img"});
    for (var g = 0; g <= 2; g++) {
      var y = top + plotH - plotH * g / 2;
      add(root, svg("line", {x1: left, x2: width - 4, y1: y, y2: y}));
      var t = svg("text", {x: left - 6, y: y + 4, "text-anchor": "end"});
      t.textContent = format(max * g / 2, true);
      add(root, t);
    }
    labels.forEach(function (label, i) {
      var base = top + plotH;
      series.forEach(function (one) {
        var v = one.values[i] || 0;
        if (!v) { return; }
        var h = plotH * v / max, w = Math.max(1, Math.min(step - gap, 56));
        var rect = svg("rect", {x: left + i * step + (step - w) / 2, y: base - h, rx: 1.5,
                                width: w, height: Math.max(1, h), fill: one.colour});
        var title = svg("title");
        title.textContent = one.name + " · " + titles[i] + " · " + format(v, false);
        add(root, add(rect, title));
        base -= h;
      });
      if (label) {
        var x = Math.max(left + 16, Math.min(width - 20, left + i * step + step / 2));
        var text = svg("text", {x: x, y: height - 5, "text-anchor": "middle"});
        text.textContent = label;
        add(root, text);
      }
    });
    add(host, root);
  }
  function legend(host, entries) {
    clear(host);
    entries.forEach(function (e) {
      var swatch = el("i");
      swatch.style.background = e.colour;
      add(host, add(el("span"), swatch, document.createTextNode(e.name)));
    });
  }
  function hourCharts(hours) {
    var names = hours.people.map(function (p) { return p.name; });
    var shown = hours.people.length > 0;
    $("hours-charts").hidden = !shown;
    $("hours-empty").hidden = shown;
    legend($("hours-legend"), hours.people.map(function (p) {
      return {name: personName(p.name), colour: colourOf(PEOPLE_COLOURS, names, p.name)};
    }));
    if (!shown) { return; }
    var labels = [], titles = [], every = $("hours-requests").clientWidth < 420 ? 12 : 6;
    for (var i = 0; i < hours.people[0].requests.length; i++) {
      var d = new Date((hours.start + i * hours.step) * 1000), hour = d.getHours();
      titles.push(d.toLocaleString([], {weekday: "short", hour: "numeric", minute: "2-digit"}));
      labels.push(hour % every ? "" : hour ? d.toLocaleTimeString([], {hour: "numeric"})
                                           : d.toLocaleDateString([], {weekday: "short"}));
    }
    function total(field) {
      return hours.people.reduce(function (sum, p) {
        return sum + p[field].reduce(function (a, b) { return a + b; }, 0);
      }, 0);
    }
    $("hours-requests-total").textContent = count(total("requests")) + " in 48 h";
    $("hours-cost-total").textContent = usd(total("cost_usd")) + " in 48 h";
    function series(field) {
      return hours.people.map(function (p) {
        return {name: personName(p.name), colour: colourOf(PEOPLE_COLOURS, names, p.name),
                values: p[field]};
      });
    }
    stackedBars($("hours-requests"), series("requests"), labels, titles, function (v, axis) {
      return axis ? compact(v) : count(v) + " requests";
    });
    stackedBars($("hours-cost"), series("cost_usd"), labels, titles, function (v) {
      return usd(v);
    });
  }
  function dayChart(days) {
    var names = days.models.map(function (m) { return m.model; });
    var shown = days.models.length > 0;
    $("days-cost").hidden = !shown;
    $("days-empty").hidden = shown;
    var all = 0;
    legend($("days-legend"), days.models.map(function (m) {
      var total = m.cost_usd.reduce(function (a, b) { return a + b; }, 0);
      all += total;
      return {name: m.model + " " + usd(total), colour: colourOf(MODEL_COLOURS, names, m.model)};
    }));
    $("days-total").textContent = usd(all) + " in 7 days";
    if (!shown) { return; }
    var labels = days.days.map(function (key) {
      var d = new Date(key + "T12:00:00");
      if (isNaN(d.getTime())) { return key; }
      return d.toLocaleDateString([], {weekday: "short", day: "numeric"});
    });
    stackedBars($("days-cost"), days.models.map(function (m) {
      return {name: m.model, colour: colourOf(MODEL_COLOURS, names, m.model), values: m.cost_usd};
    }), labels, days.days, function (v) { return usd(v); });
  }
  function drawCharts() {
    if (data) {
      hourCharts(data.charts.hours);
      dayChart(data.charts.days);
    }
  }

  // -- the last requests and the server --------------------------------------------
  function statusClass(status) {
    return status < 300 ? "status-ok" : status === 499 ? "status-warn" : "status-bad";
  }
  // On a phone the table folds the time (and the model) under the person (or
  // the model) and leaves out the tokens: "wide" cells hide, "narrow" ones show.
  function recentTable(rows, owner) {
    var table = el("table"), head = el("tr"), body = el("tbody");
    var modelClass = owner ? "model wide" : "model who";
    var columns = [["Time", "wide"], ["Person", "who"], ["Model", modelClass], ["Status", "num"],
                   ["Input", "num wide"], ["Cached", "num wide"], ["Output", "num wide"],
                   ["Cost", "num"], ["Took", "num wide"]];
    if (!owner) { columns.splice(1, 1); }
    columns.forEach(function (c) { add(head, el("th", c[1], c[0])); });
    add(table, add(el("thead"), head));
    rows.forEach(function (r) {
      var when = clock(r.time), tr = add(el("tr"), el("td", "wide", when));
      var below = add(el("span", "narrow", when + (owner ? " · " : "")));
      if (owner) {
        add(below, el("span", "nowrap", r.model || "–"));
        add(tr, add(el("td", "who", personName(r.user)), below));
      }
      var model = el("td", modelClass, r.model || "–");
      if (!owner) { add(model, below); }
      model.title = r.model || "";
      var status = el("td", "num " + statusClass(r.status), r.status);
      if (r.error) { status.title = r.error; }
      var took = r.duration_s < 10 ? r.duration_s.toFixed(2) + "s" : span(r.duration_s);
      var used = r.input_tokens || r.output_tokens;
      add(tr, model, status, el("td", "num wide", used ? compact(r.input_tokens) : "–"),
          el("td", "num wide", used ? compact(r.cached_tokens) : "–"),
          el("td", "num wide", used ? compact(r.output_tokens) : "–"),
          el("td", "num", used ? usd(r.cost_usd, r.cost_usd < 1 ? 3 : 2) : "–"),
          el("td", "num wide", took));
      add(body, tr);
    });
    return add(table, body);
  }
  function serverList(s) {
    var dl = el("dl");
    function item(name, value) { add(dl, el("dt", "", name), el("dd", "", value)); }
    item("Version", "OCM " + s.version);
    item("Up", span(s.uptime_s) + ", since " + clock(s.started_at));
    item("Listening on", s.listen.join(", ") + (s.tls ? " (TLS)" : ""));
    item("Config", s.config || "none (defaults)");
    item("Last reload", !s.last_reload ? "none since start" : clock(s.last_reload.at) + ", " +
         (s.last_reload.ok ? "applied: " : "refused: ") + s.last_reload.message);
    item("History", s.history_path || "kept in memory only");
    item("Time zone", s.timezone);
    item("Signed in", count(s.dashboard_sessions) + " browser" +
         (s.dashboard_sessions === 1 ? "" : "s") + (s.admin_token ? "" : " (no admin_token set)"));
    return dl;
  }

  // -- the whole page ----------------------------------------------------------------
  function tiles(d) {
    var box = clear($("tiles"));
    function tile(value, label) {
      add(box, add(el("div", "card tile"), el("div", "value", value), el("div", "label", label)));
    }
    function sum(period, field) {
      return d.people.reduce(function (s, p) {
        return s + p.periods.filter(function (x) { return x.period === period; })[0][field];
      }, 0);
    }
    if (d.viewer.role === "owner") {
      var usable = d.accounts.filter(function (a) { return a.state === "usable"; }).length;
      var running = d.people.reduce(function (s, p) { return s + p.in_flight; }, 0);
      tile(usd(sum("day", "cost_usd")), "spent today");
      tile(count(sum("day", "requests")), "requests today");
      tile(usable + " of " + d.accounts.length, "accounts usable");
      tile(count(running), "running now");
    } else {
      tile(usd(sum("day", "cost_usd")), "today");
      tile(usd(sum("week", "cost_usd")), "this week");
      tile(usd(sum("month", "cost_usd")), "this month");
      tile(count(sum("day", "requests")), "requests today");
    }
  }
  function render(d) {
    var owner = d.viewer.role === "owner";
    document.body.dataset.view = d.viewer.role;
    $("signin").hidden = true;
    $("app").hidden = false;
    $("who").textContent = owner ? "owner" + (d.viewer.via === "loopback" ? ", on the box" : "")
                                 : d.viewer.user;
    $("signout").hidden = d.viewer.via !== "session";
    $("signin-button").hidden = d.viewer.via !== "loopback";  // on the box: to see a person's view
    tiles(d);
    var unknown = owner && d.without_valid_token ? d.without_valid_token.refusals_last_24h : 0;
    $("unknown").hidden = !unknown;
    $("unknown").textContent = unknown + " request" + (unknown === 1 ? "" : "s") +
      " without a valid token refused in the last 24 hours.";
    $("accounts-title").textContent = owner ? "Accounts" :
      d.accounts.length > 1 ? "Your accounts" : "Your account";
    var accounts = clear($("accounts"));
    d.accounts.forEach(function (a) { add(accounts, accountCard(a, owner)); });
    var people = clear($("people"));
    d.people.forEach(function (p) { add(people, personCard(p, owner)); });
    $("people-title").textContent = owner ? "People" : "Your use";
    var first = owner ? $("accounts-section") : $("people-section");  // a person's own use first
    first.parentNode.insertBefore(first, $("unknown").nextSibling);
    drawCharts();
    var recent = clear($("recent"));
    if (!d.recent.length) { add(recent, el("div", "empty", "No requests yet.")); }
    else { add(recent, recentTable(showAll ? d.recent : d.recent.slice(0, 10), owner)); }
    if (d.recent.length > 10) {
      var more = el("button", "more", showAll ? "Show 10" : "Show all " + d.recent.length);
      more.type = "button";
      more.addEventListener("click", function () { showAll = !showAll; render(data); });
      add(recent, more);
    }
    $("server-section").hidden = !owner;
    if (owner) { add(clear($("server")), serverList(d.server)); }
  }
  function showSignIn(problem) {
    data = null;
    document.body.dataset.view = "signin";
    $("app").hidden = true;
    $("signout").hidden = true;
    $("signin-button").hidden = true;
    $("who").textContent = "";
    $("signin").hidden = false;
    $("signin-problem").textContent = problem || "";
    $("signin-problem").hidden = !problem;
  }
  function refreshAge() {
    var node = $("updated");
    node.className = failing ? "updated stale" : "updated";
    if (!lastOk || $("app").hidden) { node.textContent = ""; return; }
    node.textContent = (failing ? "offline · " : "") + "updated " +
                       span(Date.now() / 1000 - lastOk) + " ago";
  }
  function load() {
    fetch("/ocm/v1/dashboard", {credentials: "same-origin", cache: "no-store",
                                headers: {"Accept": "application/json"}})
      .then(function (response) {
        if (response.status === 401 || response.status === 429) {
          if ($("signin").hidden || pending) {  // else keep what the form says
            showSignIn(pending || (response.status === 429 ? TOO_MANY : ""));
          }
          pending = "";
          return null;
        }
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.json();
      })
      .then(function (d) {
        if (!d || !$("signin").hidden) { return; }  // the form stays while someone types in it
        data = d;
        skew = d.time - Date.now() / 1000;
        lastOk = Date.now() / 1000;
        failing = false;
        render(d);
        refreshAge();
      })
      .catch(function () { failing = true; refreshAge(); })
      .then(function () {
        clearTimeout(timer);
        timer = setTimeout(load, REFRESH_MS);
      });
  }
  $("signin-button").addEventListener("click", function () {
    showSignIn("");
    $("token").focus();
  });
  document.addEventListener("visibilitychange", function () {
    if (!document.hidden && !$("app").hidden) { load(); }
  });
  setInterval(function () {
    Array.prototype.forEach.call(document.querySelectorAll("[data-until]"), tick);
    refreshAge();
  }, 1000);
  var resized = null;
  window.addEventListener("resize", function () {
    clearTimeout(resized);
    resized = setTimeout(drawCharts, 150);
  });
  pending = {failed: "That token is not valid.", busy: TOO_MANY}[document.body.dataset.signin];
  pending = pending || "";
  load();
}());
"""

DASHBOARD_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<meta name="referrer" content="same-origin">
<title>OCM</title>
<link rel="icon" href="data:,">
<style>@STYLE@</style>
</head>
<body data-signin="@SIGNIN@">
<header>
<span class="brand">OCM</span><span class="who" id="who"></span>
<span class="spacer"></span>
<span class="updated" id="updated"></span>
<form method="post" action="/ocm/sign-out" id="signout" hidden>
<button type="submit">Sign out</button>
</form>
<button type="button" id="signin-button" hidden>Sign in</button>
</header>
<main>
<section class="card signin" id="signin" hidden>
<h1>OCM dashboard</h1>
<p>Sign in with your own OCM token, the one your Codex uses, to see your use.
The owner signs in with the admin token.</p>
<form method="post" action="/ocm/sign-in">
<input name="user" autocomplete="username" value="ocm" hidden>
<label for="token">Token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required>
<button class="primary" type="submit">Sign in</button>
</form>
<p class="problem" id="signin-problem" hidden></p>
</section>
<div id="app" hidden>
<div class="tiles" id="tiles"></div>
<div class="banner" id="unknown" hidden></div>
<section id="accounts-section">
<h2 id="accounts-title">Accounts</h2>
<div class="grid" id="accounts"></div>
</section>
<section id="people-section">
<h2 id="people-title">People</h2>
<div class="grid" id="people"></div>
</section>
<h2>Last 48 hours</h2>
<div class="card">
<div class="charts" id="hours-charts">
<div><h3>Requests per hour <span class="total" id="hours-requests-total"></span></h3>
<div class="chart" id="hours-requests"></div></div>
<div><h3>Cost per hour <span class="total" id="hours-cost-total"></span></h3>
<div class="chart" id="hours-cost"></div></div>
</div>
<div class="empty" id="hours-empty" hidden>No requests in the last 48 hours.</div>
<div class="legend" id="hours-legend"></div>
</div>
<h2>Last 7 days</h2>
<div class="card">
<h3>Cost per model <span class="total" id="days-total"></span></h3>
<div class="chart" id="days-cost"></div>
<div class="empty" id="days-empty" hidden>No requests in the last 7 days.</div>
<div class="legend" id="days-legend"></div>
</div>
<h2>Last requests</h2>
<div class="card scroll" id="recent"></div>
<section id="server-section" hidden>
<h2>Server</h2>
<div class="card" id="server"></div>
</section>
</div>
<noscript><p class="card signin">This page needs JavaScript. Scripts can read the same
figures as JSON from /ocm/v1/dashboard with a bearer token.</p></noscript>
</main>
<script>@SCRIPT@</script>
</body>
</html>
"""


def _csp_hash(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "'sha256-%s'" % base64.b64encode(digest).decode("ascii")


DASHBOARD_CSP = ("default-src 'none'; script-src %s; style-src %s; connect-src 'self'; "
                 "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; "
                 "base-uri 'none'" % (_csp_hash(DASHBOARD_SCRIPT), _csp_hash(DASHBOARD_STYLE)))
# The page as served: as it is, after a wrong token, and while tokens may not be tried.
DASHBOARD_PAGES = {
    flag: DASHBOARD_HTML.replace("@STYLE@", DASHBOARD_STYLE).replace("@SCRIPT@", DASHBOARD_SCRIPT)
    .replace("@SIGNIN@", flag).encode("utf-8") for flag in ("", "failed", "busy")}
DASHBOARD_REASONS = {200: "OK", 303: "See Other", 401: "Unauthorized", 429: "Too Many Requests"}
HTML_TYPE = "text/html; charset=utf-8"


def dashboard_headers(content_type: str) -> List[Tuple[str, str]]:
    return [("Content-Type", content_type), ("Content-Security-Policy", DASHBOARD_CSP),
            ("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "same-origin"),
            ("Cache-Control", "no-store"), ("X-Frame-Options", "DENY"),
            ("Cross-Origin-Resource-Policy", "same-origin")]


def check_same_origin(request: "ClientRequest") -> None:
    """A form must be posted from a page of this OCM, so that another site
    cannot sign a visitor in or out. Browsers say where a post comes from:
    Sec-Fetch-Site (sent to https and loopback origins), else Origin, which
    the page's same-origin referrer policy keeps whole for its own forms
    ("null" is a page that hides where it is: refused). A program sends
    neither, and may sign in."""
    site = request.headers.get("sec-fetch-site", "").strip().lower()
    origin = request.headers.get("origin")
    host = request.headers.get("host", "").strip().lower()
    if site:
        allowed = site in ("same-origin", "none")
    else:
        allowed = origin is None or urllib.parse.urlsplit(origin.strip()).netloc.lower() == host
    if not allowed:
        raise HTTPError(403, "permission_error", "sign in from OCM's own page, /ocm/")


def dashboard_answer(server: "OCMServer", request: "ClientRequest", body: bytes, client_ip: str,
                     now: float) -> Tuple[int, List[Tuple[str, str]], bytes]:
    """(status, headers, body) for GET /ocm/ (the page), GET /ocm/v1/dashboard
    (its JSON) and POST /ocm/sign-in and /ocm/sign-out. Raises HTTPError for
    answers in the API's JSON error shape."""
    path, method = request.path, request.method
    if path in (SIGN_IN_PATH, SIGN_OUT_PATH):
        if method != "POST":
            raise HTTPError(405, "invalid_request_error", "use POST for %s" % path,
                            headers=[("Allow", "POST")])
        check_same_origin(request)
        if path == SIGN_IN_PATH:
            return sign_in(server, request, body, client_ip, now)
        session_id = session_cookie(request)
        if session_id:
            server.dashboard_sessions.close(session_id)
        return see_other(server, request, "", 0)
    if method not in ("GET", "HEAD"):
        raise HTTPError(405, "invalid_request_error", "use GET for %s" % path,
                        headers=[("Allow", "GET, HEAD")])
    if path == DASHBOARD_PATH:
        return 200, dashboard_headers(HTML_TYPE), DASHBOARD_PAGES[""]
    viewer = dashboard_viewer(server, server.state, request, client_ip, now)
    if viewer is None:
        raise HTTPError(401, "authentication_error", "sign in at /ocm/, or send the owner's "
                        "admin_token or your own token as a bearer token",
                        headers=[("WWW-Authenticate", 'Bearer realm="ocm"')])
    document = dashboard_document(server, viewer, now)
    return 200, dashboard_headers("application/json"), json.dumps(document).encode("utf-8")


def sign_in(server: "OCMServer", request: "ClientRequest", body: bytes, client_ip: str,
            now: float) -> Tuple[int, List[Tuple[str, str]], bytes]:
    """The sign-in form: the owner's admin_token or a person's token opens a
    session; a wrong one gets the page again with 401, saying only that."""
    sessions, state = server.dashboard_sessions, server.state
    wait = sessions.blocked_for(client_ip, now)
    if wait:
        retry = [("Retry-After", str(int(math.ceil(wait))))]
        return 429, dashboard_headers(HTML_TYPE) + retry, DASHBOARD_PAGES["busy"]
    try:
        fields = urllib.parse.parse_qs(body.decode("utf-8", "replace"), max_num_fields=4)
    except ValueError:
        fields = {}
    token = (fields.get("token") or [""])[0].strip()
    viewer = match_token(state, token)
    expired = viewer is not None and viewer.user is not None and \
        viewer.user.expires_at is not None and now >= viewer.user.expires_at
    if viewer is None or expired:
        if token and not expired:
            wrong_token(sessions, client_ip, now)
        log.info("dashboard: a sign-in from %s with %s was refused", client_ip,
                 "an expired person's token" if expired else "a wrong token")
        return 401, dashboard_headers(HTML_TYPE), DASHBOARD_PAGES["failed"]
    session_id = sessions.open(viewer.user, admin_digest(state.config) if viewer.is_owner else b"",
                               now)
    log.info("dashboard: %s signed in from %s",
             "the owner" if viewer.is_owner else viewer.user.name, client_ip)
    return see_other(server, request, session_id, int(sessions.lifetime))


def see_other(server: "OCMServer", request: "ClientRequest", session_id: str,
              max_age: int) -> Tuple[int, List[Tuple[str, str]], bytes]:
    """303 to the page, setting the session cookie (clearing it: max_age 0):
    Secure when OCM serves TLS, or a proxy in front says it does (a client
    claiming it only keeps its own cookie off plain http)."""
    secure = server.tls is not None or \
        request.headers.get("x-forwarded-proto", "").strip().lower() == "https"
    cookie = "%s=%s; Path=/ocm; HttpOnly; SameSite=Strict; Max-Age=%d%s" % (
        SESSION_COOKIE, session_id, max_age, "; Secure" if secure else "")
    return 303, [("Location", "/ocm/"), ("Set-Cookie", cookie), ("Cache-Control", "no-store"),
                 ("Referrer-Policy", "same-origin")], b""


# == 14. Streams =============================================================

class SSEScanner:
    """Finds whole server-sent events in a copy of relayed bytes, incrementally:
    an event split across reads (at any byte) is seen once, complete.

    Only the ``data:`` lines matter (Codex reads nothing else), and only events
    that mention "usage" are parsed as JSON: parsing every text delta would
    cost the relay CPU for nothing. ``every_event=True`` parses them all, for
    a stream that is translated for its client (section 14b).
    """
    __slots__ = ("_on_event", "_tail", "_data", "_size", "_skip_lf", "_max", "_every", "broken")

    def __init__(self, on_event: Callable[[Any], None], max_event: int = 32 << 20,
                 every_event: bool = False):
        self._on_event = on_event
        self._every = every_event
        self._tail = b""        # an unfinished line
        self._data = []         # type: List[bytes]  # data lines of the event being read
        self._size = 0
        self._skip_lf = False   # the last read ended in CR; an LF starting the next is its pair
        self._max = max_event
        self.broken = False

    def feed(self, chunk: bytes) -> None:
        if self.broken or not chunk:
            return
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        data = self._tail + chunk if self._tail else chunk
        if b"\r" in data:  # SSE allows CRLF, LF and CR line ends
            self._skip_lf = data.endswith(b"\r")
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        end = data.rfind(b"\n")
        if end < 0:
            self._tail = data
            if len(data) > self._max:
                self._give_up()
            return
        self._tail = data[end + 1:]
        for line in data[:end].split(b"\n"):
            if not line:
                self._dispatch()
            elif line.startswith(b"data:"):
                value = line[5:]
                if value[:1] == b" ":
                    value = value[1:]
                self._data.append(value)
                self._size += len(value)
                if self._size > self._max:
                    self._give_up()
                    return

    def finish(self) -> None:
        """End of stream: an event missing only its blank line still counts."""
        if self._tail.startswith(b"data:"):
            self.feed(b"\n")
        self._dispatch()

    def _give_up(self) -> None:
        log.warning("an event larger than %d bytes: usage scanning stops for this stream",
                    self._max)
        self.broken = True
        self._data, self._tail = [], b""

    def _dispatch(self) -> None:
        if not self._data:
            return
        payload = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
        self._data = []
        self._size = 0
        if not self._every and b'"usage"' not in payload:
            return
        try:
            event = parse_json(payload)
        except ValueError:
            return
        self._on_event(event)


# -- WebSocket framing (RFC 6455) -------------------------------------------

WS_CONTINUATION, WS_TEXT, WS_BINARY = 0x0, 0x1, 0x2
WS_CLOSE, WS_PING, WS_PONG = 0x8, 0x9, 0xA
WS_DATA_OPCODES = frozenset((WS_CONTINUATION, WS_TEXT, WS_BINARY))
WS_CONTROL_OPCODES = frozenset((WS_CLOSE, WS_PING, WS_PONG))
# A message may come in fragments, and each costs a few dozen bytes to follow
# even when empty: without these, zero-length continuation frames grew memory
# by about 1 MB a second per client, for ever.
WS_MAX_FRAMES_PER_MESSAGE = 4096   # past it: close 1008 (policy violation)
WS_FRAME_OVERHEAD = 64             # bytes each frame counts toward max_websocket_message (1009)


class WebSocketError(OCMError):
    """A peer broke RFC 6455; ``code`` is the close code to answer with
    (1002 protocol error, 1007 bad UTF-8, 1009 too big)."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def apply_mask(data: bytes, mask: bytes) -> bytes:
    """XOR with the repeating 4-byte key, as one big-integer operation (C speed)."""
    n = len(data)
    if not n:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def encode_frame(opcode: int, payload: bytes = b"", fin: bool = True,
                 masked: bool = False) -> bytes:
    """One frame. Frames to a server are masked with a fresh random key."""
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head = bytes((first, mask_bit | n))
    elif n < 65536:
        head = bytes((first, mask_bit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, mask_bit | 127)) + n.to_bytes(8, "big")
    if masked:
        mask = os.urandom(4)
        return head + mask + apply_mask(payload, mask)
    return head + payload


def close_payload(code: Optional[int], reason: str = "") -> bytes:
    if code is None:
        return b""
    return code.to_bytes(2, "big") + reason.encode("utf-8")[:123]


def parse_close_payload(payload: bytes) -> Tuple[Optional[int], str]:
    """(code or None, reason) of a close frame, validated (RFC 6455 5.5.1, 7.4)."""
    if not payload:
        return None, ""
    if len(payload) == 1:
        raise WebSocketError(1002, "close frame with a 1-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if not (code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014)
            or 3000 <= code <= 4999):
        raise WebSocketError(1002, "invalid close code %d" % code)
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise WebSocketError(1007, "close reason is not UTF-8")
    return code, reason


class Frame:
    __slots__ = ("fin", "opcode", "payload")

    def __init__(self, fin: bool, opcode: int, payload: bytes):
        self.fin = fin
        self.opcode = opcode
        self.payload = payload

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Frame) and (self.fin, self.opcode, self.payload) == (
            other.fin, other.opcode, other.payload)

    def __repr__(self) -> str:
        return "Frame(fin=%r, opcode=%#x, %d bytes)" % (self.fin, self.opcode, len(self.payload))


class FrameParser:
    """Incremental RFC 6455 frame parser: feed bytes as they arrive, get whole
    frames, unmasked. Frames from a client must be masked, frames from a server
    must not be; anything else in the RFC's MUSTs raises WebSocketError."""
    __slots__ = ("_buf", "_from_client", "_max_payload")

    def __init__(self, from_client: bool, max_payload: int):
        self._buf = bytearray()
        self._from_client = from_client
        self._max_payload = max_payload

    def feed(self, data: bytes) -> List[Frame]:
        buf = self._buf
        buf += data
        frames = []
        while len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            fin, opcode = bool(b0 & 0x80), b0 & 0x0F
            if b0 & 0x70:
                raise WebSocketError(1002, "reserved bits set (no extension was agreed)")
            if opcode not in WS_DATA_OPCODES and opcode not in WS_CONTROL_OPCODES:
                raise WebSocketError(1002, "unknown opcode %#x" % opcode)
            masked = bool(b1 & 0x80)
            if masked != self._from_client:
                raise WebSocketError(1002, "client frames must be masked" if self._from_client
                                     else "server frames must not be masked")
            length, pos = b1 & 0x7F, 2
            if opcode in WS_CONTROL_OPCODES:
                if not fin:
                    raise WebSocketError(1002, "fragmented control frame")
                if length > 125:
                    raise WebSocketError(1002, "control frame payload over 125 bytes")
            if length == 126:
                if len(buf) < 4:
                    break
                length, pos = int.from_bytes(buf[2:4], "big"), 4
                if length < 126:
                    raise WebSocketError(1002, "payload length not minimally encoded")
            elif length == 127:
                if len(buf) < 10:
                    break
                length, pos = int.from_bytes(buf[2:10], "big"), 10
                if length >> 63:
                    raise WebSocketError(1002, "payload length has its top bit set")
                if length < 65536:
                    raise WebSocketError(1002, "payload length not minimally encoded")
            if length > self._max_payload:
                raise WebSocketError(1009, "frame of %d bytes is over the limit of %d"
                                     % (length, self._max_payload))
            end = pos + (4 if masked else 0) + length
            if len(buf) < end:
                break
            if masked:
                payload = apply_mask(bytes(buf[pos + 4:end]), bytes(buf[pos:pos + 4]))
            else:
                payload = bytes(buf[pos:end])
            del buf[:end]
            frames.append(Frame(fin, opcode, payload))
        return frames


class MessageTracker:
    """Follows the message structure of one direction: fragments in order,
    control frames allowed between them, size and fragment limits (each frame
    counts WS_FRAME_OVERHEAD bytes on top of its payload), UTF-8 of text.
    Keeps a copy of a text message only while it may matter to accounting,
    and the time of the last data frame (how long this peer has been idle)."""
    __slots__ = ("_opcode", "_size", "_frames", "_max", "_utf8", "_parts", "_keep", "last_data_at")

    def __init__(self, max_message: int):
        self._opcode = None  # type: Optional[int]  # the data message in progress
        self._size = 0
        self._frames = 0
        self._max = max_message
        self._utf8 = None
        self._parts = []  # type: List[bytes]
        self._keep = False
        self.last_data_at = time.monotonic()

    def add(self, frame: Frame) -> Optional[bytes]:
        """Check one frame; returns a completed text message, else None."""
        opcode = frame.opcode
        if opcode in WS_CONTROL_OPCODES:
            return None
        if opcode == WS_CONTINUATION:
            if self._opcode is None:
                raise WebSocketError(1002, "continuation frame without a message to continue")
        else:
            if self._opcode is not None:
                raise WebSocketError(1002, "new data frame in the middle of a fragmented message")
            self._opcode, self._size, self._frames, self._parts = opcode, 0, 0, []
            self._keep = opcode == WS_TEXT
            self._utf8 = codecs.getincrementaldecoder("utf-8")() if opcode == WS_TEXT else None
        self.last_data_at = time.monotonic()
        self._frames += 1
        if self._frames > WS_MAX_FRAMES_PER_MESSAGE:
            raise WebSocketError(1008, "a message in over %d frames" % WS_MAX_FRAMES_PER_MESSAGE)
        self._size += len(frame.payload) + WS_FRAME_OVERHEAD
        if self._size > self._max:
            raise WebSocketError(1009, "message over the limit of %d bytes" % self._max)
        if self._utf8 is not None:
            try:
                self._utf8.decode(frame.payload, final=frame.fin)
            except UnicodeDecodeError:
                raise WebSocketError(1007, "text message is not valid UTF-8")
        if self._keep:
            self._parts.append(frame.payload)
        if not frame.fin:
            return None
        text = b"".join(self._parts) if self._keep else None
        self._opcode, self._parts, self._utf8 = None, [], None
        return text


class UsageTap:
    """Reads the usage of one relayed answer from a copy of its body: SSE
    events as they pass, or a JSON body once it is complete. Never touches the
    relayed bytes. The first usage found goes on the request's record, which
    books it when it settles; the request's model and tier fill in what the
    answer leaves out."""
    __slots__ = ("_record", "_scanner", "_parts", "_size", "_finished")

    JSON_LIMIT = 32 << 20

    def __init__(self, record: "RequestRecord", stream: bool):
        self._record = record
        self._parts = None     # type: Optional[List[bytes]]
        self._size = 0
        self._finished = False
        self._scanner = (SSEScanner(self._on_event)
                         if stream else None)  # type: Optional[SSEScanner]
        if not stream:
            self._parts = []

    @property
    def stream(self) -> bool:
        return self._scanner is not None

    def _on_event(self, event: Any) -> None:
        record = self._record
        if record.usage is None:
            record.usage = usage_record_from_event(event, record.model, record.tier)

    def feed(self, data: bytes) -> None:
        if self._scanner is not None:
            self._scanner.feed(data)
        elif self._parts is not None:
            self._size += len(data)
            if self._size > self.JSON_LIMIT:
                self._parts = None
            else:
                self._parts.append(data)

    def finish(self, complete: bool) -> None:
        if self._finished:
            return
        self._finished = True
        if self._scanner is not None:
            self._scanner.finish()
        elif self._parts is not None and complete and self._record.usage is None:
            try:
                body = parse_json(b"".join(self._parts))
            except ValueError:
                return
            self._record.usage = usage_record_from(body, self._record.model, self._record.tier)


# == 14b. Translation ========================================================
#
# Clients other than Codex on the ChatGPT backend (PROTOCOL.md sections 5, 9,
# 11). The backend takes only streamed, unstored Responses requests, so OCM
# rewrites a plain Responses, Chat Completions or Anthropic Messages request
# into that shape, and turns the streamed answer into what the client expects.
# Pure code: bodies and parsed events in, bodies and bytes out; ids and times
# are parameters. Accounting keeps reading the ORIGINAL upstream events with
# usage_record_from_event; the answers built here carry model, service_tier
# and usage too, but nothing depends on that.

# What the backend refuses, dropped before sending, each with the reason the
# docs give. ChatMock, codex-lb, LiteLLM's chatgpt provider and CLIProxyAPI
# each drop a subset of these.
BACKEND_REFUSED_PARAMETERS = (
    ("max_output_tokens", "the backend sets its own output limit: 'Unsupported parameter'"),
    ("max_tokens", "an output limit (the Chat Completions name)"),
    ("max_completion_tokens", "an output limit (the newer Chat Completions name)"),
    ("metadata", "refused: an unstored response has nothing to attach it to"),
    ("user", "refused by the backend"),
    ("safety_identifier", "refused by the backend"),
    ("temperature", "a sampling parameter, refused by reasoning models"),
    ("top_p", "a sampling parameter, refused by reasoning models"),
    ("truncation", "refused by the backend"),
    ("prompt_cache_retention", "refused by the backend"),
    ("context_management", "refused by the backend: 'Unsupported parameter'"),
)
# Chat Completions parameters with no Responses counterpart on the backend,
# dropped by chat_to_responses() (besides the refused ones above).
CHAT_DROPPED_PARAMETERS = (
    ("store", "the backend stores nothing"),
    ("frequency_penalty", "no Responses counterpart"),
    ("presence_penalty", "no Responses counterpart"),
    ("logit_bias", "no Responses counterpart"),
    ("logprobs", "not returned by the backend"),
    ("top_logprobs", "not returned by the backend"),
    ("seed", "no Responses counterpart"),
    ("modalities", "text only: audio output is not translated"),
    ("audio", "text only: audio output is not translated"),
    ("prediction", "no Responses counterpart"),
    ("web_search_options", "not translated"),
)
# Anthropic Messages parameters dropped by messages_to_responses().
ANTHROPIC_DROPPED_PARAMETERS = (
    ("max_tokens", "refused by the backend (an output limit)"),
    ("metadata", "refused by the backend; user_id only seeds prompt_cache_key"),
    ("context_management", "refused by the backend"),
    ("temperature", "a sampling parameter, refused by reasoning models"),
    ("top_p", "a sampling parameter, refused by reasoning models"),
    ("top_k", "no Responses counterpart"),
    ("service_tier", "Anthropic's tiers do not map to the backend's"),
    ("container", "Anthropic's code execution is not available"),
    ("mcp_servers", "Anthropic's MCP connector is not available"),
    ("cache_control", "the backend caches prompt prefixes by itself"),
)
BACKEND_SERVICE_TIERS = frozenset(("priority", "flex"))
TOOL_NAME_LIMIT = 64                # the backend's limit on function names
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
ANTHROPIC_DEFAULT_MODEL = "gpt-5.3-codex"  # for claude-* names when no model_map says
# Claude Code puts a line that changes every request in its system prompt; as
# instructions it would defeat the backend's prompt cache.
CLAUDE_BILLING_PREFIX = "x-anthropic-billing-header:"
# Reasoning goes back to Claude clients as a thinking block's signature (or a
# redacted_thinking block's data): this prefix, then the encrypted reasoning.
# Clients send it back unchanged next turn; Anthropic's own signatures lack it.
REASONING_SIGNATURE_PREFIX = "ocm-reasoning:"
IMAGE_TOKEN_ESTIMATE = 1600         # Anthropic's cost of a 1.15-megapixel image
STREAM_CUT_MESSAGE = "the upstream stream ended before the response was complete"


def _refuse(path: str, problem: str) -> None:
    raise HTTPError(400, "invalid_request_error", "%s: %s" % (path, problem))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def backend_service_tier(value: Any) -> str:
    """The backend's name for a requested service tier, or "" to send none:
    "fast" is Codex's word for priority; auto and default are the default."""
    if not isinstance(value, str):
        return ""
    value = value.strip().lower()
    if value == "fast":
        return "priority"
    return value if value in BACKEND_SERVICE_TIERS else ""


def backend_tool_name(name: str) -> str:
    """A function name the backend takes (``[A-Za-z0-9_-]{1,64}``). Longer or
    odd names (MCP tools such as ``mcp__server__a_very_long_tool``) keep their
    start and get a digest of the whole name: the same name always maps to the
    same short one, so history and answers agree without any stored state."""
    if _TOOL_NAME.match(name):
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)[:TOOL_NAME_LIMIT - 11] + "_" + digest


def request_tool_names(request: Any) -> Dict[str, str]:
    """{backend name: client name} for the client's tools whose names had to
    change (Chat's nested tools or Anthropic's flat ones)."""
    names = {}
    tools = request.get("tools") if isinstance(request, dict) else None
    for tool in tools if isinstance(tools, list) else ():
        if not isinstance(tool, dict):
            continue
        function = tool.get("function")
        name = function.get("name") if isinstance(function, dict) else tool.get("name")
        if isinstance(name, str) and name and backend_tool_name(name) != name:
            names[backend_tool_name(name)] = name
    return names


def request_stop_sequences(request: Any) -> List[str]:
    """Anthropic's ``stop_sequences`` or Chat's ``stop`` (a string or a list)."""
    if not isinstance(request, dict):
        return []
    stop = request.get("stop_sequences", request.get("stop"))
    if isinstance(stop, str):
        stop = [stop]
    return [s for s in stop if isinstance(s, str) and s] if isinstance(stop, list) else []


def resolve_model(requested: Any, model_map: Any = (),
                  default: str = ANTHROPIC_DEFAULT_MODEL) -> str:
    """The backend model for a requested name. ``model_map`` is an ordered list
    of (glob, target) pairs, e.g. ``[("claude-*haiku*", "gpt-5.1-codex-mini"),
    ("claude-*", "gpt-5.3-codex")]``; the first glob that matches (fnmatch,
    case-insensitive) wins. Otherwise an Anthropic name (claude-*, or one
    naming opus, sonnet or haiku) and an empty name become ``default``, and
    every other name (gpt-5.4, o3, ...) passes through unchanged."""
    name = requested.strip() if isinstance(requested, str) else ""
    lowered = name.lower()
    for pattern, target in model_map or ():
        if fnmatch.fnmatchcase(lowered, pattern.lower()):
            return target
    if not name or lowered.startswith(("claude", "anthropic")) or any(
            family in lowered for family in ("opus", "sonnet", "haiku")):
        return default
    return name


# -- Plain Responses clients --------------------------------------------------

def backend_responses_request(body: Any) -> Tuple[Dict[str, Any], List[str]]:
    """A copy of a Responses request that the ChatGPT backend takes, and the
    names of the parameters dropped from it (BACKEND_REFUSED_PARAMETERS, and
    ``service_tier`` unless priority or flex). ``stream`` and ``store`` are
    forced to true and false: the client's own ``stream`` still decides how
    OCM answers. A string ``input`` becomes one user message and ``system``
    input messages become ``developer`` ones, as peers found the backend needs.
    Raises HTTPError 400 unless the body is a JSON object."""
    if not isinstance(body, dict):
        _refuse("body", "must be a JSON object")
    out = dict(body)
    dropped = [name for name, _ in BACKEND_REFUSED_PARAMETERS if name in out]
    for name in dropped:
        del out[name]
    if "service_tier" in out:
        tier = backend_service_tier(out["service_tier"])
        if tier:
            out["service_tier"] = tier
        else:
            del out["service_tier"]
            dropped.append("service_tier")
    items = out.get("input")
    if isinstance(items, str):
        out["input"] = [_message_item("user", [{"type": "input_text", "text": items}])]
    elif isinstance(items, list) and any(
            isinstance(item, dict) and item.get("role") == "system" for item in items):
        out["input"] = [dict(item, role="developer") if isinstance(item, dict)
                        and item.get("role") == "system" else item for item in items]
    out["stream"] = True
    out["store"] = False
    return out, dropped


def _message_item(role: str, content: List[Dict[str, Any]]) -> Dict[str, Any]:
    return {"type": "message", "role": role, "content": content}


class StreamFailure(namedtuple("StreamFailure", "status error_type message code")):
    """Why a streamed answer failed: the HTTP status and OpenAI error type to
    show a client, the message, and the upstream's code (or "")."""
    __slots__ = ()


STREAM_CUT = StreamFailure(502, "api_error", STREAM_CUT_MESSAGE, "stream_incomplete")


def _failure_kind(code: str) -> Tuple[int, str]:
    lowered = code.lower()
    if any(word in lowered for word in ("rate_limit", "usage_limit", "quota")):
        return 429, "rate_limit_error"
    if any(word in lowered for word in ("overloaded", "slow_down", "unavailable")):
        return 503, "api_error"
    if "auth" in lowered or ("token" in lowered and "expired" in lowered):
        return 401, "authentication_error"
    if lowered.startswith("invalid") or "context_length" in lowered or "not_found" in lowered:
        return 400, "invalid_request_error"
    return 502, "api_error"


def stream_failure(event: Any) -> Optional[StreamFailure]:
    """The failure a ``response.failed`` or ``error`` event reports (SSE's flat
    error event, or the WebSocket one with ``status`` and ``error``); None
    for any other event."""
    if not isinstance(event, dict):
        return None
    kind = event.get("type")
    if kind == "response.failed":
        response = event.get("response")
        error = response.get("error") if isinstance(response, dict) else None
    elif kind == "error":
        error = event.get("error") if isinstance(event.get("error"), dict) else event
    else:
        return None
    error = error if isinstance(error, dict) else {}
    code = error.get("code")
    if not isinstance(code, str) or not code:
        code = error.get("type") if error is not event else ""
        code = code if isinstance(code, str) else ""
    message = error.get("message")
    if not isinstance(message, str) or not message:
        message = "the upstream response failed" + (" (%s)" % code if code else "")
    status, error_type = _failure_kind(code)
    if _is_int(event.get("status")) and 400 <= event["status"] < 600:
        status = event["status"]
        error_type = {401: "authentication_error", 429: "rate_limit_error"}.get(
            status, "invalid_request_error" if status < 500 else "api_error")
    return StreamFailure(status, error_type, message, code)


def openai_error_body(error_type: str, message: str, code: Optional[str] = None) -> Dict[str, Any]:
    """OpenAI's error object, as Chat and Responses clients read it."""
    return {"error": {"message": message, "type": error_type, "param": None, "code": code or None}}


def _terminal_response(event: Dict[str, Any]) -> Dict[str, Any]:
    response = event.get("response")
    return response if isinstance(response, dict) else {}


class ResponseAssembler:
    """Builds the JSON object a non-streaming Responses client expects from the
    events of the streamed upstream answer, fed one parsed event at a time.

    The backend's ``response.completed`` carries an EMPTY ``output``, so the
    items come from ``response.output_item.done`` events, in ``output_index``
    order; id, model, status, service_tier and usage come from the terminal
    event (``response.completed`` or ``response.incomplete``). A terminal event
    that does carry output (the OpenAI API) keeps it.
    """
    __slots__ = ("_items", "_terminal", "failure")

    def __init__(self):
        self._items = []  # type: List[Tuple[int, int, Dict[str, Any]]]
        self._terminal = None  # type: Optional[Dict[str, Any]]
        self.failure = None  # type: Optional[StreamFailure]

    @property
    def done(self) -> bool:
        return self._terminal is not None or self.failure is not None

    def feed(self, event: Any) -> None:
        if self.done or not isinstance(event, dict):
            return
        kind = event.get("type")
        if kind == "response.output_item.done" and isinstance(event.get("item"), dict):
            index = event.get("output_index")
            self._items.append((index if _is_int(index) else 1 << 62, len(self._items),
                                event["item"]))
        elif kind in USAGE_EVENT_TYPES:
            self._terminal = _terminal_response(event)
        else:
            self.failure = stream_failure(event)

    def finish(self) -> Tuple[int, Dict[str, Any]]:
        """End of the upstream stream: (200, the response object), or an error
        status with ``{"error": {...}}`` after a failure or a stream that ended
        without a terminal event."""
        failure = self.failure or (None if self._terminal is not None else STREAM_CUT)
        if failure is not None:
            return failure.status, openai_error_body(failure.error_type, failure.message,
                                                     failure.code)
        response = dict(self._terminal)
        if not response.get("output"):
            response["output"] = [item for _, _, item in sorted(self._items, key=lambda t: t[:2])]
        return 200, response


def message_text(item: Dict[str, Any]) -> str:
    """All the text of a ``message`` output item (its refusals count as text)."""
    parts = item.get("content")
    texts = []
    for part in parts if isinstance(parts, list) else ():
        if isinstance(part, dict):
            text = part.get("text") if part.get("type") == "output_text" else part.get("refusal")
            if isinstance(text, str):
                texts.append(text)
    return "".join(texts)


def reasoning_text(item: Dict[str, Any]) -> str:
    """The summary of a ``reasoning`` output item, its parts a blank line apart."""
    parts = item.get("summary")
    return "\n\n".join(part["text"] for part in (parts if isinstance(parts, list) else ())
                       if isinstance(part, dict) and isinstance(part.get("text"), str))


class StopScanner:
    """Cuts streamed text at the first of some stop sequences. The backend has
    no ``stop`` parameter, so OCM stops the text itself: the model still writes
    (and the account pays for) the rest of its answer, which is dropped.

    ``feed()`` returns the text that is safe to send now: a tail that could be
    the start of a stop sequence is held back until the next piece settles it,
    and ``flush()`` returns it at the end of a text. After a match, ``matched``
    is the sequence and nothing more comes out.
    """
    __slots__ = ("_sequences", "_held", "_longest", "matched")

    def __init__(self, sequences: List[str]):
        self._sequences = [s for s in sequences if s]
        self._longest = max((len(s) for s in self._sequences), default=0)
        self._held = ""
        self.matched = None  # type: Optional[str]

    def feed(self, text: str) -> str:
        if self.matched is not None:
            return ""
        text = self._held + text
        cut, matched = -1, None
        for sequence in self._sequences:
            at = text.find(sequence)
            if at >= 0 and (cut < 0 or at < cut):
                cut, matched = at, sequence
        if matched is not None:
            self._held, self.matched = "", matched
            return text[:cut]
        hold = 0
        for size in range(min(len(text), self._longest - 1), 0, -1):
            tail = text[-size:]
            if any(s.startswith(tail) for s in self._sequences):
                hold = size
                break
        self._held = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.matched is not None else held


def end_reason(status: str, response: Dict[str, Any], stopped: bool, has_tool_calls: bool) -> str:
    """Why an answer ended, in Chat's words: stop, tool_calls, length or
    content_filter; "stop_sequence" when OCM cut it at a stop sequence."""
    if stopped:
        return "stop_sequence"
    if status == "incomplete":
        details = response.get("incomplete_details")
        reason = details.get("reason") if isinstance(details, dict) else None
        return "content_filter" if reason == "content_filter" else "length"
    return "tool_calls" if has_tool_calls else "stop"


def _usage_numbers(usage: Any) -> Tuple[int, int, int, int, int]:
    """(input, output, total, cached, reasoning) tokens of a Responses usage."""
    numbers = (_int_field(usage, "input_tokens"), _int_field(usage, "output_tokens"),
               _int_field(usage, "total_tokens"),
               _int_field(usage, "input_tokens_details", "cached_tokens"),
               _int_field(usage, "output_tokens_details", "reasoning_tokens"))
    return numbers[:2] + (numbers[2] or numbers[0] + numbers[1],) + numbers[3:]


def chat_usage(usage: Any) -> Dict[str, Any]:
    """A Responses usage object in Chat Completions' words."""
    input_tokens, output_tokens, total, cached, reasoning = _usage_numbers(usage)
    return {"prompt_tokens": input_tokens, "completion_tokens": output_tokens,
            "total_tokens": total, "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning}}


def anthropic_usage(usage: Any) -> Dict[str, int]:
    """A Responses usage object in Anthropic's words: Anthropic's input_tokens
    leave out the tokens read from the cache, which it counts apart."""
    input_tokens, output_tokens, _, cached, _ = _usage_numbers(usage)
    return {"input_tokens": max(input_tokens - cached, 0), "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached, "output_tokens": output_tokens}


def sse_data(payload: Any) -> bytes:
    """One ``data:`` event. json.dumps escapes everything from upstream
    (ASCII only, so even a lone surrogate cannot break the encoding)."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode("ascii") + b"\n\n"


def sse_event(name: str, payload: Any) -> bytes:
    """One named event (``event:`` and ``data:``), as Anthropic streams them."""
    return ("event: %s\n" % name).encode("ascii") + sse_data(payload)


def _missing(full: Any, received: List[str]) -> str:
    """What a whole item has beyond what its deltas carried ("" if they
    disagree: what was sent cannot be taken back)."""
    so_far = "".join(received)
    if isinstance(full, str) and full.startswith(so_far):
        return full[len(so_far):]
    return ""


class _Item:
    """One output item of the upstream answer, as a stream writer follows it."""
    __slots__ = ("kind", "received", "pending", "call_id", "name", "index", "part",
                 "started", "closed", "muted")

    def __init__(self, kind: str, muted: bool):
        self.kind = kind            # "text", "tool" or "thinking"
        # Text or arguments from upstream so far, in pieces: += on an attribute
        # copies the whole string each time, and 100 KB of tool arguments come
        # in thousands of deltas.
        self.received = []          # type: List[str]
        self.pending = []           # type: List[str]  # arguments before the call's name
        self.call_id = ""
        self.name = ""
        self.index = -1             # the client-side block or tool call index
        self.part = None            # type: Any  # summary_index of the last summary delta
        self.started = False        # a tool call's head was written
        self.closed = False
        self.muted = muted          # begun after a stop sequence: never written


class ResponseStreamWriter:
    """Follows a Responses event stream for a client that speaks another API;
    ChatStreamWriter and AnthropicStreamWriter say how to write each part.

    Feed parsed events (dicts from SSEScanner(every_event=True)); each feed()
    returns the bytes to send, maybe b"". Text, tool calls (name first, then
    argument deltas) and reasoning summaries are written as they stream; an
    item that arrives only whole (``response.output_item.done`` without
    deltas) is written from that, and so is whatever its deltas missed. After
    the terminal event, a failure, or finish() on a stream that ended without
    one (an error for the client), ``done`` is true and events are ignored.
    """

    _HANDLERS = {
        "response.output_item.added": "_item_added",
        "response.output_item.done": "_item_done",
        "response.output_text.delta": "_text_delta",
        "response.refusal.delta": "_text_delta",
        "response.function_call_arguments.delta": "_arguments_delta",
        "response.reasoning_summary_text.delta": "_summary_delta",
        "response.completed": "_end",
        "response.incomplete": "_end",
    }

    def __init__(self, request: Any, model: str):
        self.model = model            # until the upstream names its own
        self.service_tier = ""
        self.usage = None             # type: Optional[Dict[str, Any]]  # the terminal event's
        self.failure = None           # type: Optional[StreamFailure]
        self.done = False
        self.has_tool_calls = False
        self.stop_sequence = None     # type: Optional[str]  # the one that cut the text
        stops = request_stop_sequences(request)
        self._stop = StopScanner(stops) if stops else None
        self._names = request_tool_names(request)
        self._items = {}              # type: Dict[Tuple[str, Any], _Item]
        self._order = []              # type: List[_Item]
        self._started = False
        self._out = []                # type: List[bytes]

    def feed(self, event: Any) -> bytes:
        if self.done or not isinstance(event, dict):
            return b""
        failure = stream_failure(event)
        if failure is not None:
            self._fail(failure)
        else:
            self._note_response(event.get("response"))
            if not self._started:
                self._started = True
                self._on_start()
            handler = self._HANDLERS.get(event.get("type"))
            if handler is not None:
                getattr(self, handler)(event)
        return self._take()

    def finish(self) -> bytes:
        """End of the upstream stream; an error for the client unless the
        answer was complete."""
        if not self.done:
            self._fail(STREAM_CUT)
        return self._take()

    def _take(self) -> bytes:
        out, self._out = b"".join(self._out), []
        return out

    def _fail(self, failure: StreamFailure) -> None:
        self.failure, self.done = failure, True
        self._on_fail(failure)

    def _note_response(self, response: Any) -> None:
        if isinstance(response, dict):
            if isinstance(response.get("model"), str) and response["model"]:
                self.model = response["model"]
            if isinstance(response.get("service_tier"), str) and response["service_tier"]:
                self.service_tier = response["service_tier"]

    def _item(self, event: Dict[str, Any], item: Any, kind: str) -> _Item:
        """The item an event is about: by output_index, else by item id, else
        (a backend that names nothing) the one open item of that kind."""
        keys = []  # type: List[Tuple[str, Any]]
        if _is_int(event.get("output_index")):
            keys.append(("index", event["output_index"]))
        ident = item.get("id") if isinstance(item, dict) else None
        ident = ident if isinstance(ident, str) and ident else event.get("item_id")
        if isinstance(ident, str) and ident:
            keys.append(("id", ident))
        keys = keys or [("current", kind)]
        for key in keys:
            state = self._items.get(key)
            if state is not None and state.kind == kind:
                for other in keys:
                    self._items.setdefault(other, state)
                return state
        state = _Item(kind, self.stop_sequence is not None)
        for key in keys:
            self._items[key] = state
        self._order.append(state)
        return state

    def _item_added(self, event: Dict[str, Any]) -> None:
        item = event.get("item")
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "function_call":
            self._start_tool(self._item(event, item, "tool"), item)
        elif kind == "message":
            self._item(event, item, "text")
        elif kind == "reasoning":
            self._item(event, item, "thinking")

    def _text_delta(self, event: Dict[str, Any]) -> None:
        delta = event.get("delta")
        if isinstance(delta, str) and delta:
            state = self._item(event, None, "text")
            if not state.closed:
                state.received.append(delta)
                self._write_text(state, delta)

    def _arguments_delta(self, event: Dict[str, Any]) -> None:
        delta = event.get("delta")
        if isinstance(delta, str) and delta:
            state = self._item(event, None, "tool")
            if state.closed:
                return
            state.received.append(delta)
            if state.started:
                self._write_arguments(state, delta)
            else:
                state.pending.append(delta)

    def _summary_delta(self, event: Dict[str, Any]) -> None:
        delta = event.get("delta")
        if isinstance(delta, str) and delta:
            state = self._item(event, None, "thinking")
            if state.closed:
                return
            part = event.get("summary_index")
            if state.received and part != state.part:
                delta = "\n\n" + delta
            state.part = part
            state.received.append(delta)
            if not state.muted and self.stop_sequence is None:
                self._on_thinking(state, delta)

    def _item_done(self, event: Dict[str, Any]) -> None:
        item = event.get("item")
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "message":
            state = self._item(event, item, "text")
            if not state.closed:
                rest = _missing(message_text(item), state.received)
                self._write_text(state, rest)
                self._close(state)
        elif kind == "function_call":
            state = self._item(event, item, "tool")
            if not state.closed:
                if not state.started:
                    self._start_tool(state, item)
                rest = _missing(item.get("arguments"), state.received)
                self._write_arguments(state, rest)
                self._close(state)
        elif kind == "reasoning":
            state = self._item(event, item, "thinking")
            if not state.closed:
                rest = _missing(reasoning_text(item), state.received)
                state.muted = state.muted or self.stop_sequence is not None
                if rest and not state.muted:
                    self._on_thinking(state, rest)
                secret = item.get("encrypted_content")
                if isinstance(secret, str) and secret and not state.muted:
                    self._on_signature(state, REASONING_SIGNATURE_PREFIX + secret)
                self._close(state)

    def _start_tool(self, state: _Item, item: Dict[str, Any]) -> None:
        if state.started:
            return
        call_id = item.get("call_id") or item.get("id")
        name = item.get("name")
        state.call_id = call_id if isinstance(call_id, str) and call_id else (
            "call_%d" % len(self._order))
        name = name if isinstance(name, str) else ""
        state.name = self._names.get(name, name)
        state.started = True
        state.muted = state.muted or self.stop_sequence is not None
        if not state.muted:
            self.has_tool_calls = True
            self._on_tool_start(state)
        if state.pending:
            self._write_arguments(state, "".join(state.pending))
            state.pending = []

    def _write_text(self, state: _Item, text: str) -> None:
        if not text or state.muted or self.stop_sequence is not None:
            return
        if self._stop is not None:
            text = self._stop.feed(text)
            self.stop_sequence = self._stop.matched
        if text:
            self._on_text(state, text)

    def _write_arguments(self, state: _Item, text: str) -> None:
        if text and not state.muted:
            self._on_arguments(state, text)

    def _close(self, state: _Item) -> None:
        if state.closed:
            return
        if state.kind == "text" and self._stop is not None and self.stop_sequence is None:
            rest = self._stop.flush()
            if rest and not state.muted:
                self._on_text(state, rest)
        state.closed = True
        if self._items.get(("current", state.kind)) is state:
            del self._items[("current", state.kind)]
        self._on_close(state)

    def _end(self, event: Dict[str, Any]) -> None:
        for state in self._order:
            self._close(state)
        response = _terminal_response(event)
        self.usage = response.get("usage") if isinstance(response.get("usage"), dict) else None
        self.done = True
        status = "incomplete" if event.get("type") == "response.incomplete" else "completed"
        self._on_end(end_reason(status, response, self.stop_sequence is not None,
                                self.has_tool_calls))

    # What the subclasses write.
    def _on_start(self) -> None:
        pass

    def _on_text(self, state: _Item, text: str) -> None:
        pass

    def _on_tool_start(self, state: _Item) -> None:
        pass

    def _on_arguments(self, state: _Item, text: str) -> None:
        pass

    def _on_thinking(self, state: _Item, text: str) -> None:
        pass

    def _on_signature(self, state: _Item, signature: str) -> None:
        pass

    def _on_close(self, state: _Item) -> None:
        pass

    def _on_end(self, reason: str) -> None:
        pass

    def _on_fail(self, failure: StreamFailure) -> None:
        pass


# -- Chat Completions ---------------------------------------------------------

def _chat_text(content: Any, path: str, kinds: Tuple[str, ...] = ("text",)) -> str:
    """The text of a message whose content is a string or a list of text parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        _refuse(path, "must be a string or a list of content parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        text = part.get(kind) if kind in kinds else None
        if not isinstance(text, str):
            _refuse("%s.%d" % (path, j), "must be a part of type %s" % " or ".join(kinds))
        texts.append(text)
    return "".join(texts)


def _chat_user_parts(content: Any, path: str) -> List[Dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "input_text", "text": content}]
    if not isinstance(content, list):
        _refuse(path, "must be a string or a list of content parts")
    parts = []
    for j, part in enumerate(content):
        where = "%s.%d" % (path, j)
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "input_text", "text": part["text"]})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                _refuse(where + ".image_url", "needs a url (https: or data:)")
            detail = image.get("detail") if isinstance(image, dict) else None
            parts.append({"type": "input_image", "image_url": url,
                          "detail": detail if detail in ("low", "high", "auto") else "auto"})
        elif kind == "file":
            file = part.get("file") if isinstance(part.get("file"), dict) else {}
            if not isinstance(file.get("file_data"), str) or not file["file_data"]:
                _refuse(where + ".file", "needs file_data: file_id needs the Files API, "
                        "which the ChatGPT backend does not offer")
            item = {"type": "input_file", "file_data": file["file_data"]}
            if isinstance(file.get("filename"), str):
                item["filename"] = file["filename"]
            parts.append(item)
        else:
            _refuse(where + ".type", "must be text, image_url or file (%s is not translated)"
                    % json.dumps(kind))
    return parts


def _function_arguments(arguments: Any) -> str:
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments if arguments is not None else {}, ensure_ascii=False,
                      separators=(",", ":"))


def _chat_tool_calls(calls: Any, path: str) -> List[Dict[str, Any]]:
    if not isinstance(calls, list):
        _refuse(path, "must be a list")
    items = []
    for j, call in enumerate(calls):
        where = "%s.%d" % (path, j)
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            _refuse(where, "needs function.name")
        if not isinstance(call.get("id"), str) or not call["id"]:
            _refuse(where + ".id", "must be the call's id (a string)")
        items.append({"type": "function_call", "call_id": call["id"],
                      "name": backend_tool_name(function["name"]),
                      "arguments": _function_arguments(function.get("arguments"))})
    return items


def _chat_tools(tools: Any) -> List[Dict[str, Any]]:
    if not isinstance(tools, list):
        _refuse("tools", "must be a list")
    out = []
    for j, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type", "function") != "function":
            _refuse("tools.%d" % j, 'must be {"type": "function", "function": {...}}')
        if not isinstance(function.get("name"), str) or not function["name"]:
            _refuse("tools.%d.function.name" % j, "must be a non-empty string")
        out.append(_function_tool(function["name"], function.get("description"),
                                  function.get("parameters"), function.get("strict") is True))
    return out


def _function_tool(name: str, description: Any, parameters: Any, strict: bool) -> Dict[str, Any]:
    """A Responses function tool. ``strict`` is always sent: the Responses API
    defaults it to true, which refuses most hand-written schemas."""
    tool = {"type": "function", "name": backend_tool_name(name)}  # type: Dict[str, Any]
    if isinstance(description, str) and description:
        tool["description"] = description
    tool["parameters"] = backend_schema(parameters)
    tool["strict"] = strict
    return tool


def backend_schema(schema: Any) -> Dict[str, Any]:
    """A tool's JSON schema as the backend takes it: a top-level ``$schema``
    (which Claude Code sends) dropped, an object with ``properties``."""
    if not isinstance(schema, dict):
        return {"type": "object", "properties": {}}
    schema = {key: value for key, value in schema.items() if key not in ("$schema", "$id")}
    schema.setdefault("type", "object")
    if schema["type"] == "object":
        schema.setdefault("properties", {})
    return schema


def _chat_tool_choice(choice: Any) -> Any:
    if choice in ("none", "auto", "required"):
        return choice
    function = choice.get("function") if isinstance(choice, dict) else None
    if isinstance(function, dict) and isinstance(function.get("name"), str):
        return {"type": "function", "name": backend_tool_name(function["name"])}
    _refuse("tool_choice", 'must be "none", "auto", "required" or '
            '{"type": "function", "function": {"name": ...}}')


def _chat_text_format(response_format: Any) -> Optional[Dict[str, Any]]:
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema" and isinstance(response_format.get("json_schema"), dict):
        spec = response_format["json_schema"]
        out = {"type": "json_schema",
               "name": spec.get("name") if isinstance(spec.get("name"), str) else "response",
               "schema": spec.get("schema") if isinstance(spec.get("schema"), dict) else {}}
        if isinstance(spec.get("description"), str):
            out["description"] = spec["description"]
        if isinstance(spec.get("strict"), bool):
            out["strict"] = spec["strict"]
        return out
    _refuse("response_format", 'must be {"type": "text"}, {"type": "json_object"} or '
            '{"type": "json_schema", "json_schema": {"name", "schema"}}')


def _check_stop(stop: Any, name: str) -> None:
    if stop is None or isinstance(stop, str):
        return
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        _refuse(name, "must be a string or a list of strings")


def chat_to_responses(body: Any, model: str) -> Dict[str, Any]:
    """A Chat Completions request as a backend Responses request for ``model``
    (streamed, unstored). Leading system and developer messages become
    ``instructions``; later ones (or all of them with json_object output,
    which needs the word JSON in the input) become developer messages. User
    text, images and files, assistant text and tool_calls, tool results,
    tools, tool_choice, parallel_tool_calls, response_format (text.format),
    verbosity, reasoning_effort, service_tier and prompt_cache_key carry
    over; ``stop`` is applied by the stream writer; the parameters in
    BACKEND_REFUSED_PARAMETERS and CHAT_DROPPED_PARAMETERS are dropped.
    Raises HTTPError 400 naming the field to fix for anything else."""
    if not isinstance(body, dict):
        _refuse("body", "must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        _refuse("messages", "must be a non-empty list")
    if body.get("n") not in (None, 1):
        _refuse("n", "must be 1: the backend gives one answer per request")
    if "functions" in body or "function_call" in body:
        _refuse("functions", "the legacy functions API is not translated; use tools")
    _check_stop(body.get("stop"), "stop")
    if "stream_options" in body and not isinstance(body["stream_options"], (dict, type(None))):
        _refuse("stream_options", "must be an object")
    text_format = _chat_text_format(body["response_format"]) if body.get(
        "response_format") is not None else None
    keep_system = text_format is not None and text_format["type"] == "json_object"
    instructions, items = [], []  # type: List[str], List[Dict[str, Any]]
    for i, message in enumerate(messages):
        path = "messages.%d" % i
        if not isinstance(message, dict):
            _refuse(path, "must be an object")
        role, content = message.get("role"), message.get("content")
        if role in ("system", "developer"):
            text = _chat_text(content, path + ".content")
            if not items and not keep_system:
                instructions.append(text)
            else:
                items.append(_message_item("developer", [{"type": "input_text", "text": text}]))
        elif role == "user":
            items.append(_message_item("user", _chat_user_parts(content, path + ".content")))
        elif role == "assistant":
            text = _chat_text(content, path + ".content", ("text", "refusal"))
            if text:
                items.append(_message_item("assistant", [{"type": "output_text", "text": text}]))
            if message.get("tool_calls") is not None:
                items.extend(_chat_tool_calls(message["tool_calls"], path + ".tool_calls"))
        elif role == "tool":
            if not isinstance(message.get("tool_call_id"), str) or not message["tool_call_id"]:
                _refuse(path + ".tool_call_id", "must be the id of the call it answers")
            items.append({"type": "function_call_output", "call_id": message["tool_call_id"],
                          "output": _chat_text(content, path + ".content")})
        else:
            _refuse(path + ".role", "must be system, developer, user, assistant or tool")
    out = {"model": model}  # type: Dict[str, Any]
    if instructions:
        out["instructions"] = "\n\n".join(instructions)
    out["input"] = items
    if body.get("tools") is not None:
        out["tools"] = _chat_tools(body["tools"])
    if body.get("tool_choice") is not None:
        out["tool_choice"] = _chat_tool_choice(body["tool_choice"])
    if isinstance(body.get("parallel_tool_calls"), bool):
        out["parallel_tool_calls"] = body["parallel_tool_calls"]
    effort = body.get("reasoning_effort")
    if isinstance(body.get("reasoning"), dict):
        out["reasoning"] = body["reasoning"]
    elif isinstance(effort, str) and effort:
        out["reasoning"] = {"effort": effort}
    text = {}  # type: Dict[str, Any]
    if text_format is not None:
        text["format"] = text_format
    if isinstance(body.get("verbosity"), str):
        text["verbosity"] = body["verbosity"]
    if text:
        out["text"] = text
    tier = backend_service_tier(body.get("service_tier"))
    if tier:
        out["service_tier"] = tier
    if isinstance(body.get("prompt_cache_key"), str) and body["prompt_cache_key"]:
        out["prompt_cache_key"] = body["prompt_cache_key"]
    out["stream"] = True
    out["store"] = False
    return out


def _chat_wants_usage(request: Any) -> bool:
    options = request.get("stream_options") if isinstance(request, dict) else None
    return isinstance(options, dict) and options.get("include_usage") is True


class ChatStreamWriter(ResponseStreamWriter):
    """Writes a Responses stream as ``chat.completion.chunk`` events: the role
    chunk, content deltas, tool calls (``index``, ``id`` and ``function.name``
    first, then argument deltas), a chunk with ``finish_reason``, the usage
    chunk when the request asked ``stream_options.include_usage``, and
    ``data: [DONE]``. A failure is one ``data: {"error": {...}}`` event in
    OpenAI's shape (which the OpenAI SDKs raise), without [DONE]."""

    def __init__(self, request: Any, completion_id: str, created: int, model: str):
        super().__init__(request, model)
        self.completion_id = completion_id
        self.created = created
        self._include_usage = _chat_wants_usage(request)
        self._tools = 0

    def keepalive(self) -> bytes:
        """A comment line, which clients skip, for long silences."""
        return b": keep-alive\n\n"

    def _chunk(self, delta: Optional[Dict[str, Any]],
               finish_reason: Optional[str] = None) -> Dict[str, Any]:
        chunk = {"id": self.completion_id, "object": "chat.completion.chunk",
                 "created": self.created, "model": self.model}  # type: Dict[str, Any]
        if self.service_tier:
            chunk["service_tier"] = self.service_tier
        chunk["choices"] = [] if delta is None else [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        if self._include_usage:
            chunk["usage"] = None
        return chunk

    def _on_start(self) -> None:
        self._out.append(sse_data(self._chunk({"role": "assistant", "content": ""})))

    def _on_text(self, state: _Item, text: str) -> None:
        self._out.append(sse_data(self._chunk({"content": text})))

    def _on_tool_start(self, state: _Item) -> None:
        state.index, self._tools = self._tools, self._tools + 1
        self._out.append(sse_data(self._chunk({"tool_calls": [
            {"index": state.index, "id": state.call_id, "type": "function",
             "function": {"name": state.name, "arguments": ""}}]})))

    def _on_arguments(self, state: _Item, text: str) -> None:
        self._out.append(sse_data(self._chunk({"tool_calls": [
            {"index": state.index, "function": {"arguments": text}}]})))

    def _on_end(self, reason: str) -> None:
        finish = "stop" if reason == "stop_sequence" else reason
        self._out.append(sse_data(self._chunk({}, finish)))
        if self._include_usage:
            chunk = self._chunk(None)
            chunk["usage"] = chat_usage(self.usage)
            self._out.append(sse_data(chunk))
        self._out.append(b"data: [DONE]\n\n")

    def _on_fail(self, failure: StreamFailure) -> None:
        self._out.append(sse_data(openai_error_body(failure.error_type, failure.message,
                                                    failure.code)))


def chat_completion_from_response(request: Any, response: Dict[str, Any],
                                  completion_id: str, created: int) -> Dict[str, Any]:
    """The ``chat.completion`` object for a non-streaming Chat client, from
    the response ResponseAssembler built (stop sequences applied)."""
    text, calls, stopped = _answer_parts(request, response)
    tool_calls = [{"id": call_id, "type": "function",
                   "function": {"name": name, "arguments": arguments}}
                  for call_id, name, arguments in calls]
    message = {"role": "assistant", "content": text if text or not tool_calls else None,
               "refusal": None}  # type: Dict[str, Any]
    if tool_calls:
        message["tool_calls"] = tool_calls
    reason = end_reason(str(response.get("status") or "completed"), response, stopped,
                        bool(tool_calls))
    model = response.get("model")
    completion = {"id": completion_id, "object": "chat.completion", "created": created,
                  "model": model if isinstance(model, str) and model else str(
                      request.get("model") or "")}  # type: Dict[str, Any]
    if isinstance(response.get("service_tier"), str) and response["service_tier"]:
        completion["service_tier"] = response["service_tier"]
    completion["choices"] = [{"index": 0, "message": message, "logprobs": None,
                              "finish_reason": "stop" if reason == "stop_sequence" else reason}]
    completion["usage"] = chat_usage(response.get("usage"))
    return completion


def _answer_parts(request: Any, response: Dict[str, Any]
                  ) -> Tuple[str, List[Tuple[str, str, str]], bool]:
    """(text, [(call_id, client tool name, arguments)], cut at a stop sequence)
    of a whole response; after a stop sequence nothing more counts."""
    stops = request_stop_sequences(request)
    scanner = StopScanner(stops) if stops else None
    names = request_tool_names(request)
    texts, calls = [], []  # type: List[str], List[Tuple[str, str, str]]
    for item in response.get("output") or ():
        if scanner is not None and scanner.matched is not None:
            break
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "message":
            text = message_text(item)
            texts.append(scanner.feed(text) + scanner.flush() if scanner is not None else text)
        elif kind == "function_call":
            name = item.get("name") if isinstance(item.get("name"), str) else ""
            call_id = item.get("call_id") or item.get("id") or "call_%d" % len(calls)
            calls.append((str(call_id), names.get(name, name), _function_arguments(
                item.get("arguments"))))
    return "".join(texts), calls, scanner is not None and scanner.matched is not None


# -- Anthropic Messages -------------------------------------------------------

# Anthropic's error types by HTTP status (docs.anthropic.com/en/api/errors).
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
    500: "api_error", 503: "overloaded_error", 529: "overloaded_error",
}
_ANTHROPIC_FOR_OPENAI_TYPE = {
    "invalid_request_error": "invalid_request_error", "authentication_error":
    "authentication_error", "permission_error": "permission_error", "not_found_error":
    "not_found_error", "rate_limit_error": "rate_limit_error", "usage_limit_reached":
    "rate_limit_error", "insufficient_quota": "rate_limit_error", "server_error": "api_error",
    "api_error": "api_error", "overloaded_error": "overloaded_error",
}
# Anthropic's stop_reason for each end_reason().
ANTHROPIC_STOP_REASONS = {"stop": "end_turn", "tool_calls": "tool_use", "length": "max_tokens",
                          "content_filter": "refusal", "stop_sequence": "stop_sequence"}
# Effort of an old-style thinking budget: (largest budget, effort), in order.
THINKING_BUDGET_EFFORTS = ((1024, "low"), (8192, "medium"), (24576, "high"))
ANTHROPIC_EFFORTS = {"minimal": "minimal", "low": "low", "medium": "medium", "high": "high",
                     "xhigh": "xhigh", "max": "xhigh"}


def anthropic_error_type(status: int, error_type: str = "") -> str:
    """Anthropic's error type for an HTTP status (first) or an OpenAI error
    type (for errors inside a 200 stream)."""
    if status in ANTHROPIC_ERROR_TYPES:
        return ANTHROPIC_ERROR_TYPES[status]
    if error_type in _ANTHROPIC_FOR_OPENAI_TYPE:
        return _ANTHROPIC_FOR_OPENAI_TYPE[error_type]
    return "invalid_request_error" if 400 <= status < 500 else "api_error"


def anthropic_error_body(status: int, error_type: str, message: str) -> Dict[str, Any]:
    """An error answer in Anthropic's shape, from an HTTP status and an OpenAI
    error type (an HTTPError's, an upstream's, or a StreamFailure's)."""
    return {"type": "error", "error": {"type": anthropic_error_type(status, error_type),
                                       "message": message}}


def upstream_error_fields(body: bytes) -> Tuple[str, str]:
    """(error type, message) of an upstream error answer: OpenAI's
    ``{"error": {...}}``, the backend's ``{"detail": "..."}``, or plain text
    (cut to 1,000 characters). Either may be "" when the body has none."""
    try:
        data = parse_json(body) if body else None
    except ValueError:
        return "", body[:1000].decode("utf-8", "replace").strip()
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        kind = error.get("type") or error.get("code")
        message = error.get("message")
        return (kind if isinstance(kind, str) else "",
                message if isinstance(message, str) else "")
    detail = error if isinstance(error, str) else (
        data.get("detail") if isinstance(data, dict) else None)
    if isinstance(detail, str):
        return "", detail
    return "", json.dumps(detail)[:1000] if detail is not None else ""


def _anthropic_system(system: Any) -> str:
    if system is None or isinstance(system, str):
        texts = [system or ""]
    elif isinstance(system, list):
        texts = [block.get("text") for block in system
                 if isinstance(block, dict) and block.get("type") == "text"]
        if not all(isinstance(text, str) for text in texts):
            _refuse("system", "text blocks need a text string")
    else:
        _refuse("system", "must be a string or a list of text blocks")
    return "\n\n".join(text for text in texts
                       if text and not text.lstrip().startswith(CLAUDE_BILLING_PREFIX))


def _anthropic_source(block: Dict[str, Any], path: str) -> Tuple[str, str]:
    """("url", url) or ("data", data: URL) of an image or document source."""
    source = block.get("source") if isinstance(block.get("source"), dict) else {}
    kind = source.get("type")
    if kind == "base64" and isinstance(source.get("data"), str):
        media = source.get("media_type") if isinstance(source.get("media_type"), str) else (
            "application/octet-stream")
        return "data", "data:%s;base64,%s" % (media, source["data"])
    if kind == "url" and isinstance(source.get("url"), str) and source["url"]:
        return "url", source["url"]
    _refuse(path + ".source", "must be a base64 or url source (%s is not translated)"
            % json.dumps(kind))
    return "", ""


def _anthropic_document(block: Dict[str, Any], path: str) -> Dict[str, Any]:
    source = block.get("source") if isinstance(block.get("source"), dict) else {}
    if source.get("type") == "text" and isinstance(source.get("data"), str):
        return {"type": "input_text", "text": source["data"]}
    if source.get("type") == "content":
        return {"type": "input_text", "text": _tool_result_text(source.get("content"))}
    kind, value = _anthropic_source(block, path)
    if kind == "url":
        return {"type": "input_file", "file_url": value}
    title = block.get("title")
    return {"type": "input_file", "filename": title if isinstance(title, str) and title
            else "document.pdf", "file_data": value}


def _tool_result_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(block["text"] for block in content if isinstance(block, dict)
                     and isinstance(block.get("text"), str)) if isinstance(content, list) else ""


def _tool_result_output(block: Dict[str, Any], path: str) -> Any:
    """A function_call_output's output: text, or input parts when images come
    back. ``is_error`` has no Responses counterpart: it becomes "Error: " in
    front of the text, unless the text already says so."""
    content = block.get("content")
    parts = []  # type: List[Dict[str, Any]]
    if isinstance(content, list):
        for j, inner in enumerate(content):
            kind = inner.get("type") if isinstance(inner, dict) else None
            if kind == "image":
                parts.append({"type": "input_image", "detail": "auto", "image_url":
                              _anthropic_source(inner, "%s.content.%d" % (path, j))[1]})
            elif isinstance(inner, dict) and isinstance(inner.get("text"), str):
                parts.append({"type": "input_text", "text": inner["text"]})
    elif content is not None and not isinstance(content, str):
        _refuse(path + ".content", "must be a string or a list of blocks")
    text = "\n".join(p["text"] for p in parts if p["type"] == "input_text") if isinstance(
        content, list) else (content or "")
    if block.get("is_error") is True and not text.lstrip().lower().startswith("error"):
        text = "Error: " + text
        if parts:
            parts.insert(0, {"type": "input_text", "text": "Error:"})
    if any(p["type"] == "input_image" for p in parts):
        return parts
    return text


def _reasoning_item(block: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """A reasoning item for a thinking block OCM wrote earlier (None for
    Anthropic's own, which the backend could not read)."""
    secret = block.get("signature") if block.get("type") == "thinking" else block.get("data")
    if not isinstance(secret, str) or not secret.startswith(REASONING_SIGNATURE_PREFIX):
        return None
    thinking = block.get("thinking")
    summary = [{"type": "summary_text", "text": thinking}] if isinstance(
        thinking, str) and thinking else []
    return {"type": "reasoning", "summary": summary,
            "encrypted_content": secret[len(REASONING_SIGNATURE_PREFIX):]}


def _anthropic_message_items(message: Any, path: str) -> List[Dict[str, Any]]:
    if not isinstance(message, dict):
        _refuse(path, "must be an object")
    role, content = message.get("role"), message.get("content")
    if role == "system":  # Claude Code 2.1 puts reminders between turns as system messages
        text = _anthropic_system(content)
        return [_message_item("developer", [{"type": "input_text", "text": text}])] if text else []
    if role not in ("user", "assistant"):
        _refuse(path + ".role", "must be user, assistant or system")
    text_type = "input_text" if role == "user" else "output_text"
    if isinstance(content, str):
        return [_message_item(role, [{"type": text_type, "text": content}])]
    if not isinstance(content, list):
        _refuse(path + ".content", "must be a string or a list of blocks")
    items, parts = [], []  # type: List[Dict[str, Any]], List[Dict[str, Any]]
    for j, block in enumerate(content):
        where = "%s.content.%d" % (path, j)
        kind = block.get("type") if isinstance(block, dict) else None
        item = None  # an item of its own, after the parts so far
        if kind == "text":
            if not isinstance(block.get("text"), str):
                _refuse(where + ".text", "must be a string")
            if block["text"]:
                parts.append({"type": text_type, "text": block["text"]})
        elif kind == "image" and role == "user":
            parts.append({"type": "input_image", "detail": "auto",
                          "image_url": _anthropic_source(block, where)[1]})
        elif kind == "document" and role == "user":
            parts.append(_anthropic_document(block, where))
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                _refuse(where, "tool_use needs an id and a name")
            item = {"type": "function_call", "call_id": block["id"],
                    "name": backend_tool_name(block["name"]),
                    "arguments": _function_arguments(block.get("input"))}
        elif kind == "tool_result" and role == "user":
            if not isinstance(block.get("tool_use_id"), str) or not block["tool_use_id"]:
                _refuse(where + ".tool_use_id", "must be the id of the tool_use it answers")
            item = {"type": "function_call_output", "call_id": block["tool_use_id"],
                    "output": _tool_result_output(block, where)}
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            item = _reasoning_item(block)
        elif kind in ("server_tool_use", "web_search_tool_result", "web_fetch_tool_result"):
            pass  # the backend ran its own search; only the text that used it carries over
        else:
            _refuse(where + ".type", "%s is not translated in a %s message"
                    % (json.dumps(kind), role))
        if item is not None:
            if parts:
                items.append(_message_item(role, parts))
                parts = []
            items.append(item)
    if parts:
        items.append(_message_item(role, parts))
    return items


def _anthropic_tools(tools: Any) -> List[Dict[str, Any]]:
    if not isinstance(tools, list):
        _refuse("tools", "must be a list")
    out = []
    for j, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if isinstance(kind, str) and kind.startswith("web_search"):
            out.append({"type": "web_search"})
        elif kind in (None, "custom") and isinstance(tool, dict):
            if not isinstance(tool.get("name"), str) or not tool["name"]:
                _refuse("tools.%d.name" % j, "must be a non-empty string")
            out.append(_function_tool(tool["name"], tool.get("description"),
                                      tool.get("input_schema"), tool.get("strict") is True))
        else:
            _refuse("tools.%d.type" % j, "%s is a tool Anthropic's servers run; OCM cannot"
                    % json.dumps(kind))
    return out


def _anthropic_tool_choice(choice: Any) -> Tuple[Any, Optional[bool]]:
    """(Responses tool_choice, parallel_tool_calls or None)."""
    kind = choice.get("type") if isinstance(choice, dict) else None
    parallel = None if not isinstance(choice, dict) or not isinstance(
        choice.get("disable_parallel_tool_use"), bool) else not choice["disable_parallel_tool_use"]
    if kind in ("auto", "none"):
        return kind, parallel
    if kind == "any":
        return "required", parallel
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "name": backend_tool_name(choice["name"])}, parallel
    _refuse("tool_choice", 'must be {"type": "auto"}, {"type": "any"}, {"type": "none"} '
            'or {"type": "tool", "name": ...}')
    return None, None


def _anthropic_reasoning(body: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """``reasoning`` for Anthropic's thinking settings, or None for the
    model's default. A budget maps to an effort (THINKING_BUDGET_EFFORTS);
    adaptive thinking takes ``output_config.effort`` ("max" is xhigh). With
    thinking on, summaries are asked for, to stream as thinking blocks."""
    thinking = body.get("thinking") if isinstance(body.get("thinking"), dict) else {}
    kind = thinking.get("type")
    if kind == "disabled":
        return None
    config = body.get("output_config") if isinstance(body.get("output_config"), dict) else {}
    effort = ANTHROPIC_EFFORTS.get(config.get("effort")) if isinstance(
        config.get("effort"), str) else None
    budget = thinking.get("budget_tokens")
    if effort is None and kind == "enabled" and _is_int(budget):
        effort = next((e for limit, e in THINKING_BUDGET_EFFORTS if budget <= limit), "xhigh")
    reasoning = {}  # type: Dict[str, Any]
    if effort:
        reasoning["effort"] = effort
    if kind in ("enabled", "adaptive"):
        reasoning["summary"] = "auto"
    return reasoning or None


def messages_to_responses(body: Any, model: str) -> Dict[str, Any]:
    """An Anthropic Messages request as a backend Responses request for
    ``model`` (streamed, unstored). ``system`` becomes ``instructions`` (minus
    Claude Code's per-request billing line); text, image (base64 or url) and
    PDF blocks become input parts; ``tool_use`` → ``function_call`` (ids kept,
    so answers match), ``tool_result`` → ``function_call_output``; thinking
    blocks OCM wrote come back as reasoning items. Tools (``input_schema``
    cleaned by backend_schema), tool_choice, thinking → reasoning effort;
    ``metadata.user_id`` seeds ``prompt_cache_key`` (hashed), which keeps a
    session on one account and its prompt cache warm.

    Not honoured: ``stop_sequences`` are applied by OCM to the streamed text
    only (not inside tool input or thinking, and the model still writes and
    bills the rest); ``max_tokens``, ``temperature``, ``top_p``, ``top_k``
    and the rest of ANTHROPIC_DROPPED_PARAMETERS are dropped; Anthropic's
    server tools other than web search are refused; Anthropic's own thinking
    signatures are dropped (the backend cannot read them).
    Raises HTTPError 400 naming the field to fix."""
    if not isinstance(body, dict):
        _refuse("body", "must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        _refuse("messages", "must be a non-empty list")
    _check_stop(body.get("stop_sequences"), "stop_sequences")
    if isinstance(body.get("stop_sequences"), str):
        _refuse("stop_sequences", "must be a list of strings")
    items = []  # type: List[Dict[str, Any]]
    for i, message in enumerate(messages):
        items.extend(_anthropic_message_items(message, "messages.%d" % i))
    out = {"model": model}  # type: Dict[str, Any]
    instructions = _anthropic_system(body.get("system"))
    if instructions:
        out["instructions"] = instructions
    out["input"] = items
    if body.get("tools") is not None:
        out["tools"] = _anthropic_tools(body["tools"])
    if body.get("tool_choice") is not None:
        out["tool_choice"], parallel = _anthropic_tool_choice(body["tool_choice"])
        if parallel is not None:
            out["parallel_tool_calls"] = parallel
    reasoning = _anthropic_reasoning(body)
    if reasoning is not None:
        out["reasoning"] = reasoning
    metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
    if isinstance(metadata.get("user_id"), str) and metadata["user_id"]:
        out["prompt_cache_key"] = "claude-" + hashlib.sha256(
            metadata["user_id"].encode("utf-8", "surrogatepass")).hexdigest()[:32]
    out["stream"] = True
    out["store"] = False
    if reasoning is not None and "summary" in reasoning:
        out["include"] = ["reasoning.encrypted_content"]
    return out


class AnthropicStreamWriter(ResponseStreamWriter):
    """Writes a Responses stream as Anthropic's events: ``message_start``
    (usage.input_tokens is the ``input_tokens`` estimate given, the real count
    comes at the end), per content block ``content_block_start``, deltas
    (``text_delta``, ``input_json_delta``, ``thinking_delta`` and
    ``signature_delta``) and ``content_block_stop``, then ``message_delta``
    with ``stop_reason`` (end_turn, tool_use, max_tokens, stop_sequence,
    refusal) and the usage, and ``message_stop``. A failure is an ``error``
    event in Anthropic's shape. Reasoning with encrypted content and no
    summary becomes a ``redacted_thinking`` block."""

    def __init__(self, request: Any, message_id: str, model: str, input_tokens: int = 0):
        super().__init__(request, model)
        self.message_id = message_id
        self._input_tokens = input_tokens
        self._blocks = 0

    def keepalive(self) -> bytes:
        """Anthropic's ping event, for long silences."""
        return sse_event("ping", {"type": "ping"})

    def _emit(self, name: str, payload: Dict[str, Any]) -> None:
        self._out.append(sse_event(name, payload))

    def _open(self, state: _Item, block: Dict[str, Any]) -> None:
        state.index, self._blocks = self._blocks, self._blocks + 1
        self._emit("content_block_start", {"type": "content_block_start", "index": state.index,
                                           "content_block": block})

    def _delta(self, state: _Item, delta: Dict[str, Any]) -> None:
        self._emit("content_block_delta", {"type": "content_block_delta", "index": state.index,
                                           "delta": delta})

    def _on_start(self) -> None:
        usage = {"input_tokens": self._input_tokens, "cache_creation_input_tokens": 0,
                 "cache_read_input_tokens": 0, "output_tokens": 0}
        self._emit("message_start", {"type": "message_start", "message": {
            "id": self.message_id, "type": "message", "role": "assistant", "model": self.model,
            "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage}})

    def _on_text(self, state: _Item, text: str) -> None:
        if state.index < 0:
            self._open(state, {"type": "text", "text": ""})
        self._delta(state, {"type": "text_delta", "text": text})

    def _on_tool_start(self, state: _Item) -> None:
        self._open(state, {"type": "tool_use", "id": state.call_id, "name": state.name,
                           "input": {}})

    def _on_arguments(self, state: _Item, text: str) -> None:
        self._delta(state, {"type": "input_json_delta", "partial_json": text})

    def _on_thinking(self, state: _Item, text: str) -> None:
        if state.index < 0:
            self._open(state, {"type": "thinking", "thinking": "", "signature": ""})
        self._delta(state, {"type": "thinking_delta", "thinking": text})

    def _on_signature(self, state: _Item, signature: str) -> None:
        if state.index < 0:
            self._open(state, {"type": "redacted_thinking", "data": signature})
        else:
            self._delta(state, {"type": "signature_delta", "signature": signature})

    def _on_close(self, state: _Item) -> None:
        if state.index >= 0:
            self._emit("content_block_stop", {"type": "content_block_stop",
                                              "index": state.index})

    def _on_end(self, reason: str) -> None:
        self._emit("message_delta", {"type": "message_delta", "delta": {
            "stop_reason": ANTHROPIC_STOP_REASONS[reason], "stop_sequence": self.stop_sequence},
            "usage": anthropic_usage(self.usage)})
        self._emit("message_stop", {"type": "message_stop"})

    def _on_fail(self, failure: StreamFailure) -> None:
        self._emit("error", anthropic_error_body(failure.status, failure.error_type,
                                                 failure.message))


def anthropic_message_from_response(request: Any, response: Dict[str, Any],
                                    message_id: str) -> Dict[str, Any]:
    """The ``message`` object for a non-streaming Anthropic client, from the
    response ResponseAssembler built (stop sequences applied, tool names and
    ids as the client knows them, reasoning as thinking blocks)."""
    stops = request_stop_sequences(request)
    scanner = StopScanner(stops) if stops else None
    names = request_tool_names(request)
    content = []  # type: List[Dict[str, Any]]
    has_tool_calls = False
    for item in response.get("output") or ():
        if scanner is not None and scanner.matched is not None:
            break
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "message":
            text = message_text(item)
            text = scanner.feed(text) + scanner.flush() if scanner is not None else text
            if text:
                content.append({"type": "text", "text": text})
        elif kind == "function_call":
            name = item.get("name") if isinstance(item.get("name"), str) else ""
            try:
                arguments = parse_json(item.get("arguments") or "{}")
            except (TypeError, ValueError):
                arguments = {}
            content.append({"type": "tool_use", "id": str(item.get("call_id") or item.get("id")),
                            "name": names.get(name, name),
                            "input": arguments if isinstance(arguments, dict) else {}})
            has_tool_calls = True
        elif kind == "reasoning":
            block = _thinking_block(item)
            if block is not None:
                content.append(block)
    stopped = scanner is not None and scanner.matched is not None
    reason = end_reason(str(response.get("status") or "completed"), response, stopped,
                        has_tool_calls)
    model = response.get("model")
    return {"id": message_id, "type": "message", "role": "assistant",
            "model": model if isinstance(model, str) and model else str(
                request.get("model") or ""),
            "content": content, "stop_reason": ANTHROPIC_STOP_REASONS[reason],
            "stop_sequence": scanner.matched if scanner is not None else None,
            "usage": anthropic_usage(response.get("usage"))}


def _thinking_block(item: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    text = reasoning_text(item)
    secret = item.get("encrypted_content")
    signature = REASONING_SIGNATURE_PREFIX + secret if isinstance(secret, str) and secret else ""
    if text:
        return {"type": "thinking", "thinking": text, "signature": signature}
    if signature:
        return {"type": "redacted_thinking", "data": signature}
    return None


def estimate_input_tokens(body: Dict[str, Any]) -> int:
    """A rough count of the input tokens of a Responses request: UTF-8 bytes
    of its text (instructions, message text, tool calls and results, tool
    names, descriptions and schemas as JSON) over 4, plus IMAGE_TOKEN_ESTIMATE
    per image or file. About right for English and code; low for scripts
    with several bytes per token-sized character. Encrypted reasoning is not
    counted."""
    size, files = 0, 0
    texts = [body.get("instructions")]
    for item in body.get("input") or ():
        if not isinstance(item, dict):
            continue
        texts.extend((item.get("name"), item.get("arguments")))
        output = item.get("output")
        parts = item.get("content") if item.get("type") == "message" else output
        texts.append(output if isinstance(output, str) else None)
        texts.extend(p.get("text") for p in item.get("summary") or () if isinstance(p, dict))
        for part in parts if isinstance(parts, list) else ():
            if isinstance(part, dict):
                texts.append(part.get("text"))
                files += part.get("type") in ("input_image", "input_file")
    if body.get("tools"):
        texts.append(json.dumps(body["tools"], ensure_ascii=False))
    for text in texts:
        if isinstance(text, str):
            size += len(text.encode("utf-8", "surrogatepass"))
    return (size + 3) // 4 + files * IMAGE_TOKEN_ESTIMATE


def count_message_tokens(body: Any) -> Dict[str, int]:
    """The answer to Anthropic's ``/v1/messages/count_tokens``:
    ``{"input_tokens": N}``, an estimate (estimate_input_tokens of the
    translated request: no tokenizer ships with the standard library).
    Raises HTTPError 400 as messages_to_responses does."""
    return {"input_tokens": estimate_input_tokens(messages_to_responses(body, ""))}


# == 15. Pipeline ============================================================
# Every model request, an HTTP request or one response.create turn of a
# WebSocket, walks the same steps, each written once:
#   canonical target -> authenticate -> person still current -> body parsed once
#   -> admit (models, concurrency, budgets, shares) -> choose the account
#   -> send (one failover loop, one 401 retry) -> relay -> settle
# Transports differ only in how bytes are read and written (section 16).

# Methods the API's endpoints use. Anything else (TRACE would echo the owner's
# token back from some servers) is answered 405 and never relayed.
RELAYED_METHODS = ("GET", "HEAD", "POST", "DELETE")

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PERCENT_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


def canonical_path(raw: str) -> str:
    """The one spelling of a request path: escapes of unreserved characters
    decoded (``%72`` is ``r``), other escapes in upper case, repeated slashes
    and dot segments resolved, no trailing slash. This string decides routing,
    policy and accounting, and it is what goes upstream. Raises HTTPError 400
    for what has no safe meaning: encoded slashes, backslashes, NUL, a bad
    escape, and dot segments that climb out of the path's first segment
    (``/v1/../metrics`` must not become an operations page)."""
    if "%" in raw:
        if _BAD_PERCENT.search(raw):
            raise HTTPError(400, "invalid_request_error", "the path has a malformed %-escape")

        def decode(match) -> str:
            char = chr(int(match.group(1), 16))
            return char if char in _UNRESERVED else "%" + match.group(1).upper()

        raw = _PERCENT_ESCAPE.sub(decode, raw)
        if "%2F" in raw or "%5C" in raw or "%00" in raw:
            raise HTTPError(400, "invalid_request_error",
                            "the path has an encoded slash, backslash or NUL")
    if "\\" in raw:
        raise HTTPError(400, "invalid_request_error", "the path has a backslash")
    segments = []  # type: List[str]
    for segment in raw.split("/"):
        if segment == "..":
            if len(segments) <= 1:
                raise HTTPError(400, "invalid_request_error",
                                "the path climbs out of %s with dot segments"
                                % ("/" + segments[0] if segments else "/"))
            segments.pop()
        elif segment not in ("", "."):
            segments.append(segment)
    return "/" + "/".join(segments)


# What OCM knows each endpoint as; other /v1/ paths are relayed as they are.
ENDPOINTS = {
    "/v1/responses": "responses",
    "/v1/responses/compact": "compact",
    "/v1/chat/completions": "chat",
    "/v1/messages": "messages",
    "/v1/messages/count_tokens": "count_tokens",
    "/v1/models": "models",
}
CODEX_CLIENT_VERSION = "0.171.0"  # what OCM says it is when it asks the backend for its models
# Where OCM can read what a model answer cost: the only POSTs a person with a
# budget may make (images, audio, batches and the like report no usage).
COUNTED_PATHS = frozenset(("/v1/responses", "/v1/responses/compact", "/v1/chat/completions",
                           "/v1/completions", "/v1/embeddings", "/v1/messages",
                           "/v1/messages/count_tokens"))


# Streams that carry their usage only with stream_options.include_usage (OCM asks).
USAGE_WHEN_ASKED = frozenset(("/v1/chat/completions", "/v1/completions"))


class RequestBody:
    """A request body (or a WebSocket message), parsed once. ``model`` and
    ``tier`` are its strings ("" when absent); ``problem`` says why the model
    cannot be known from it ("" when it can): then a person with a model
    allow-list is refused, and anyone else's request goes on byte for byte.
    ``data`` (the top-level object) is kept only while something needs it."""
    __slots__ = ("data", "model", "tier", "stream", "session", "problem", "size", "readable")

    def __init__(self, data: Optional[Dict[str, Any]], problem: str = "", size: int = 0):
        self.data = data
        self.problem = problem
        self.size = size  # bytes, inflated when OCM could inflate them
        # one JSON object, each key once: what it asks for is known for certain
        self.readable = data is not None and not problem
        data = data or {}
        model, tier, session = (data.get("model"), data.get("service_tier"),
                                data.get("prompt_cache_key"))
        self.model = model if isinstance(model, str) else ""
        self.tier = tier if isinstance(tier, str) else ""
        self.stream = data.get("stream") is True
        self.session = session if isinstance(session, str) else ""
        if not problem and data is not None and not isinstance(model, str):
            self.problem = "it names no model" if model is None else "its model is not a string"


_JSON_SPACE = re.compile(r"[ \t\n\r]*")
_JSON_SCAN = json.scanner.make_scanner(json.JSONDecoder())  # the json module's C scanner


_LAST_PAIRS = threading.local()  # the pairs of the object a thread's decoder completed last


def _remember_pairs(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    _LAST_PAIRS.pairs = pairs
    return dict(pairs)


_PAIRS_DECODER = json.JSONDecoder(object_pairs_hook=_remember_pairs)
SMALL_JSON = 64 * 1024  # below this, one decode with a hook per object is the quicker way


def json_object_members(text: str) -> List[Tuple[str, Any]]:
    """The top-level members of a JSON object, in order, with duplicates: a
    body naming ``model`` twice means one model to OCM and perhaps another to
    upstream. Raises ValueError for anything but one JSON object. A small
    text is decoded whole, remembering the pairs of its last (outermost)
    object; a large one has only its top level walked here, its values parsed
    by the json module's C scanner (no Python call per nested object)."""
    if JSON_NEEDS_DEPTH_CHECK and json_too_deep(text):
        raise ValueError("JSON nested more than %d levels deep" % MAX_JSON_DEPTH)
    if len(text) <= SMALL_JSON:
        try:
            value = _PAIRS_DECODER.decode(text)
        except RecursionError:
            raise ValueError("JSON nested too deeply")
        if not isinstance(value, dict):
            raise ValueError("not a JSON object")
        return _LAST_PAIRS.pairs
    space = _JSON_SPACE.match
    pos = space(text, 0).end()
    if text[pos:pos + 1] != "{":
        raise ValueError("not a JSON object")
    pos = space(text, pos + 1).end()
    members = []  # type: List[Tuple[str, Any]]
    try:
        if text[pos:pos + 1] == "}":
            pos += 1
        else:
            while True:
                if text[pos:pos + 1] != '"':
                    raise ValueError("expected a member name at %d" % pos)
                name, pos = json.decoder.scanstring(text, pos + 1)
                pos = space(text, pos).end()
                if text[pos:pos + 1] != ":":
                    raise ValueError("expected ':' at %d" % pos)
                value, pos = _JSON_SCAN(text, space(text, pos + 1).end())
                members.append((name, value))
                pos = space(text, pos).end()
                separator = text[pos:pos + 1]
                if separator == "}":
                    pos += 1
                    break
                if separator != ",":
                    raise ValueError("expected ',' or '}' at %d" % pos)
                pos = space(text, pos + 1).end()
    except StopIteration as exc:
        raise ValueError("invalid JSON value at %s" % exc.value)
    except RecursionError:
        raise ValueError("JSON nested too deeply")
    if space(text, pos).end() != len(text):
        raise ValueError("extra data after the JSON object")
    return members


READABLE_ENCODINGS = ("gzip", "x-gzip", "deflate")


def decode_content(raw: bytes, encoding: str, limit: int) -> bytes:
    """A gzip or deflate request body, inflated to at most ``limit`` bytes (so a
    small bomb cannot become a big one). ValueError when that is not possible."""
    import zlib
    wbits = 16 + zlib.MAX_WBITS if encoding in ("gzip", "x-gzip") else zlib.MAX_WBITS
    try:
        inflater = zlib.decompressobj(wbits)
        out = inflater.decompress(raw, limit)
    except zlib.error:
        if encoding != "deflate":
            raise ValueError("not valid %s" % encoding)
        try:  # raw deflate without the zlib header, as some clients send it
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            out = inflater.decompress(raw, limit)
        except zlib.error:
            raise ValueError("not valid deflate")
    if inflater.unconsumed_tail or not inflater.eof:
        raise ValueError("larger than %d bytes inflated, or truncated" % limit)
    if inflater.unused_data:  # a second gzip member, read by some servers and not by others
        raise ValueError("more than one compressed member")
    return out


# Parsed JSON takes up to ~24 times the memory of its text (``{},`` is three
# bytes and a dict): a body with more values than this is not parsed at all.
MAX_JSON_VALUES = 500000


def parse_request_body(raw: bytes, encoding: str = "",
                       limit: int = DEFAULT_MAX_BODY_SIZE) -> RequestBody:
    """Parse a body once, for every decision made from it. Never raises: what
    cannot be read is a ``problem``, and the body still goes on byte for byte."""
    encoding = encoding.strip().lower()
    if encoding and encoding != "identity":
        if encoding not in READABLE_ENCODINGS:
            return RequestBody(None, "it is compressed with %s, which OCM cannot read"
                               % encoding[:40], len(raw))
        try:
            raw = decode_content(raw, encoding, limit)
        except ValueError as exc:
            return RequestBody(None, "its %s encoding is broken (%s)" % (encoding, exc), len(raw))
    if not raw:
        return RequestBody(None, "it has no body")
    # counted at C speed, strings and all
    values = raw.count(b",") + raw.count(b"{") + raw.count(b"[")
    if values > MAX_JSON_VALUES:
        return RequestBody(None, "it holds over %d values, more than OCM reads" % MAX_JSON_VALUES,
                           len(raw))
    try:
        members = json_object_members(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return RequestBody(None, "it is not UTF-8 JSON", len(raw))
    except ValueError as exc:
        return RequestBody(None, "it is not one JSON object (%s)" % exc, len(raw))
    data = dict(members)
    if len(data) != len(members):
        names = sorted({name for name, _ in members
                        if sum(1 for n, _ in members if n == name) > 1})
        return RequestBody(data, "it names %s more than once"
                           % ", ".join(repr(n)[:60] for n in names[:3]), len(raw))
    return RequestBody(data, "", len(raw))


def session_key(headers: Headers, body: Optional[RequestBody]) -> str:
    """What keeps a conversation on one account: the session-id (or older
    session_id) header, else the body's prompt_cache_key (Codex's thread id)."""
    key = headers.get("session-id") or headers.get("session_id")
    if key:
        return key
    return "prompt:" + body.session if body is not None and body.session else ""


def error_event(status: int, error: Dict[str, Any],
                headers: Optional[Dict[str, str]] = None) -> bytes:
    """A WebSocket error event as the backend sends them (PROTOCOL.md section 6):
    the one builder for every error OCM tells a WebSocket client."""
    event = {"type": "error", "status": status, "error": error}
    if headers is not None:
        event["headers"] = headers
    return json.dumps(event).encode("utf-8")


def error_event_for(exc: HTTPError) -> bytes:
    """An HTTPError as a WebSocket error event; a ready usage-limit answer keeps
    its own error object (Codex reads plan_type and resets_at from it)."""
    error = {"type": exc.error_type, "message": exc.message}
    if exc.body is not None:
        with contextlib.suppress(ValueError):
            answer = parse_json(exc.body)
            if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
                error = answer["error"]
    return error_event(exc.status, error, {} if exc.body is not None else None)


class Translation:
    """A request rewritten for the ChatGPT backend (section 14b), and how its
    answer goes back. ``kind`` is the client's API: "responses" (a plain
    Responses client), "chat", "anthropic", or "models" (the models list)."""
    __slots__ = ("kind", "request", "body", "stream", "model", "answer_id", "created")

    def __init__(self, kind: str, request: Dict[str, Any], body: Optional[Dict[str, Any]],
                 stream: bool, model: str):
        self.kind = kind
        self.request = request      # what the client sent
        self.body = body            # what goes upstream
        self.stream = stream        # the client wants a stream
        self.model = model          # the model used
        prefix = {"chat": "chatcmpl-", "anthropic": "msg_"}.get(kind, "resp_")
        self.answer_id = prefix + base64.b32encode(os.urandom(15)).decode("ascii").lower()
        self.created = int(time.time())

    def writer(self) -> Optional["ResponseStreamWriter"]:
        """What turns the upstream events into the client's stream; None for a
        Responses client, whose stream is upstream's own."""
        if self.kind == "chat":
            return ChatStreamWriter(self.request, self.answer_id, self.created, self.model)
        if self.kind == "anthropic":
            return AnthropicStreamWriter(self.request, self.answer_id, self.model,
                                         estimate_input_tokens(self.body or {}))
        return None

    def answer(self, response: Dict[str, Any]) -> Dict[str, Any]:
        """The client's whole answer from the assembled Responses object."""
        if self.kind == "chat":
            return chat_completion_from_response(self.request, response, self.answer_id,
                                                 self.created)
        if self.kind == "anthropic":
            return anthropic_message_from_response(self.request, response, self.answer_id)
        return response

    def error_body(self, status: int, error_type: str, message: str,
                   code: Optional[str] = None) -> bytes:
        if self.kind == "anthropic":
            body = anthropic_error_body(status, error_type, message)
        else:
            body = openai_error_body(error_type, message, code)
        return json.dumps(body).encode("utf-8")


def translate_for_backend(endpoint: str, query: str, body: Optional[RequestBody],
                          model_map: List[Tuple[str, str]]) -> Optional[Translation]:
    """How a request must change to be served by the ChatGPT backend; None
    when it goes as it is (Codex's own requests, byte for byte). Raises
    HTTPError 400 for a request that cannot be translated, saying why."""
    if endpoint == "models":
        if "client_version=" in query:
            return None  # Codex: the backend's own list, ETag and all
        return Translation("models", {}, None, False, "")
    if endpoint not in ("responses", "chat", "messages") or body is None:
        return None
    data = body.data
    if data is None or body.problem:
        if endpoint == "responses":
            # unreadable or ambiguous here (zstd from Codex): byte for byte, upstream decides
            return None
        raise HTTPError(400, "invalid_request_error", "OCM cannot read this request: %s"
                        % body.problem)
    model = resolve_model(data.get("model"), model_map)
    stream = data.get("stream") is True
    if endpoint == "chat":
        return Translation("chat", data, chat_to_responses(data, model), stream, model)
    if endpoint == "messages":
        return Translation("anthropic", data, messages_to_responses(data, model), stream, model)
    upstream, _ = backend_responses_request(data)
    upstream["model"] = model
    if upstream == data and data.get("stream") is True and data.get("store") is False:
        return None  # already what the backend takes: byte for byte (1 == True, so check identity)
    return Translation("responses", data, upstream, stream, model)


# Client headers that describe the client's own request, not the one OCM
# writes in its place for the backend.
TRANSLATED_DROPPED_HEADERS = frozenset(("content-encoding", "content-type", "accept"))


def translated_headers(client: Headers) -> Headers:
    """The client's headers for a request OCM rewrote: minus what described
    the original (its encoding, type, Anthropic's own headers), plus JSON in
    and a stream out."""
    kept = [(n, v) for n, v in client.items() if n.lower() not in TRANSLATED_DROPPED_HEADERS
            and not n.lower().startswith("anthropic-")]
    return Headers(kept + [("Content-Type", "application/json"), ("Accept", "text/event-stream")])


def models_list(answer: Any, model_map: List[Tuple[str, str]]) -> Dict[str, Any]:
    """The backend's models in OpenAI's list format, plus the names model_map
    gives other clients (its patterns without wildcards)."""
    models = answer.get("models") if isinstance(answer, dict) else None
    names = [m.get("slug") for m in models or ()
             if isinstance(m, dict) and isinstance(m.get("slug"), str)]
    names += [pattern for pattern, _ in model_map if not any(c in pattern for c in "*?[")]
    return {"object": "list",
            "data": [{"id": name, "object": "model", "created": 0, "owned_by": "openai"}
                     for name in dict.fromkeys(names)]}


class RequestRecord:
    """What the access log, the metrics, the usage book and the budgets say of
    one HTTP request or one WebSocket turn. ``OCMServer.settle`` reads it
    exactly once, when the request or turn is over."""
    __slots__ = ("method", "path", "user", "user_name", "status", "model", "asked_model", "tier",
                 "account", "holds_account", "usage", "week_start", "reservation", "input_tokens",
                 "cached_tokens", "output_tokens", "cost", "started", "settled", "quiet",
                 "client_left", "input_estimate", "relayed", "error")

    def __init__(self, method: str, path: str, started: float):
        self.method = method
        self.path = path
        self.started = started
        self.user = None  # type: Optional[User]
        self.user_name = ""
        self.status = 0
        self.model = ""                 # asked for; the usage's model replaces it
        self.asked_model = ""           # a name the model_map translated, for the access log
        self.tier = ""
        self.account = None  # type: Optional[Account]
        self.holds_account = False      # settling ends its use of the account
        self.usage = None  # type: Optional[UsageRecord]
        self.week_start = None  # type: Optional[int]
        self.reservation = None  # type: Optional[Reservation]
        self.input_tokens = self.cached_tokens = self.output_tokens = 0
        self.cost = 0.0
        self.settled = False
        self.quiet = False              # health probes: access line at debug level
        self.error = ""                 # the message of OCM's own error answer, for the dashboard
        # For an answer the client left before its usage came: what to charge instead.
        self.client_left = False
        self.input_estimate = 0         # tokens, from the size of what was sent
        self.relayed = 0                # bytes of the answer that went out


# An SSE event of model output carries about a token per this many bytes:
# what an answer the client left before its end is taken to have produced.
RELAYED_BYTES_PER_TOKEN = 100


def answered_without_usage(record: RequestRecord) -> bool:
    """A request that went upstream and was answered, with no usage to show:
    its client left before the usage came (the backend reports none for a
    cut stream; a WebSocket turn cut short ends as 499), or, for a person
    with a budget, upstream's answer to a model request carried none."""
    if record.client_left:
        return 200 <= record.status < 300 or record.status == 499
    return (record.reservation is not None and record.method == "POST"
            and 200 <= record.status < 300)


def estimated_usage(record: RequestRecord) -> UsageRecord:
    """What an answer without usage is charged: its input, from the size of
    the request (and the conversation it continues), and its output, from
    the bytes relayed. Leaving early must not make a request free; the log
    says when this is used."""
    usage = UsageRecord(record.model or "unknown", record.tier, max(1, record.input_estimate),
                        record.relayed // RELAYED_BYTES_PER_TOKEN, 0)
    log.info("%s %s %s: no usage came with the answer%s; charging an estimate: in=%d out=%d",
             log_safe(record.user_name or "a client"), record.method, log_safe(record.path),
             " (the client left first)" if record.client_left else "",
             usage.input_tokens, usage.output_tokens)
    return usage


class Conversations:
    """How long each person's recent Responses conversations are (input plus
    output tokens of each answer, by its id), so that a request continuing
    one with ``previous_response_id`` and left before its usage is charged
    the context it made upstream read, not just its own few words. Bounded:
    the oldest are forgotten first."""

    LIMIT = 20000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens = collections.OrderedDict()  # type: Dict[Tuple[str, str], int]

    def remember(self, user: str, usage: UsageRecord) -> None:
        if not usage.response_id:
            return
        with self._lock:
            self._tokens[(user, usage.response_id)] = usage.input_tokens + usage.output_tokens
            while len(self._tokens) > self.LIMIT:
                self._tokens.popitem(last=False)

    def context_estimate(self, user: str, body: RequestBody, known: int = 0) -> int:
        """The tokens of the conversation ``body`` continues: those OCM saw
        answered, else ``known`` (the session's own), else a whole context
        window of its model (one OCM never saw may be that long)."""
        data = body.data or {}
        previous = data.get("previous_response_id")
        if not isinstance(previous, str):
            return 0
        with self._lock:
            tokens = self._tokens.get((user, previous))
        if tokens is not None:
            return tokens
        return known or worst_case_cost(body.model, body.tier)[1] - OUTPUT_TOKEN_CEILING


class ModelRequest:
    """One model request on its way through the pipeline, for either
    transport: the checks before it goes upstream, and the one failover loop
    that sends it."""

    def __init__(self, server: "OCMServer", state: "State", user: Optional[User],
                 record: RequestRecord, body: Optional[RequestBody]):
        self.server = server
        self.state = state
        self.user = user
        self.record = record
        self.body = body
        self.moved = False  # the conversation left the account it ran on before
        record.user = user
        record.user_name = user.name if user else ""
        if body is not None:
            record.model, record.tier = body.model, body.tier

    def admit(self) -> None:
        """The model allow-list and the budgets, before anything goes upstream;
        and what OCM could not count, refused for everyone (its cost would
        escape the usage file) or for people with budgets (and theirs)."""
        user, body = self.user, self.body
        if body is not None and body.data is not None and body.data.get("background") is True:
            raise HTTPError(400, "invalid_request_error", "OCM cannot count what a background "
                            "response costs (its usage comes later, elsewhere); send the request "
                            "without background")
        if user is None or body is None:
            return
        if user.budgets and self.record.method == "POST":
            if self.record.path not in COUNTED_PATHS:
                raise HTTPError(403, "permission_error", "you have a budget, and OCM cannot "
                                "count what %s costs; ask the owner" % log_safe(self.record.path))
            if not body.readable:  # what it runs, streams or costs would be a guess
                raise HTTPError(400, "invalid_request_error", "you have a budget, and OCM "
                                "cannot read this request (%s), so it cannot count what it "
                                "costs; send a plain JSON object (with Codex, use a custom "
                                "provider, which sends no zstd)" % body.problem)
        if user.models:
            if body.problem:
                raise HTTPError(400, "invalid_request_error", "OCM cannot tell which model this "
                                "request asks for (%s), and you may use only some models (%s); "
                                "send a plain JSON object that names one model"
                                % (body.problem, ", ".join(user.models)))
            check_model(user, body.model)
        if self.state.ledger is not None and user.budgets:
            self.record.reservation = self.state.ledger.admit(user, body.model, body.tier)

    def send(self, pool: "Pool", session: str, attempt: Callable[[Account, Login], Any],
             strip_reasoning: Optional[Callable[[], bool]] = None) -> Tuple[Account, Any]:
        """Choose an account of ``pool`` and send with ``attempt(account, login)``,
        which returns an answer with ``status``, ``headers`` and ``discard()``.
        In a pool, an account whose login is unusable or refused, or that
        answers 429 (before any byte reached the client), is set aside and the
        same request goes to the next usable one. The account chosen stays in
        use until the record is settled. When the conversation has moved to
        another account and that one cannot read the reasoning it carries,
        ``strip_reasoning()`` takes it out and the request is sent once more."""
        tried = set()  # type: set
        share_refusal = None
        previous = pool.sticky_account(session) if pool.is_pool else None
        while True:
            try:
                account = choose_account(pool, session, tried)
            except HTTPError:
                if share_refusal is not None:
                    raise share_refusal  # the accounts left would exceed the user's share
                raise
            try:
                account.check_share(self.user)
            except HTTPError as exc:
                if not pool.is_pool:
                    raise
                share_refusal = exc
                tried.add(account)
                continue
            account.begin()
            try:
                answer = self._send_to(account, attempt)
            except HTTPError as exc:
                account.end()
                if not pool.is_pool or exc.status not in (401, 503):
                    raise
                log.warning("account %s unusable: %s; trying another", account.tag, exc.message)
                tried.add(account)
                continue
            except BaseException:
                account.end()
                raise
            if pool.is_pool and answer.status in (401, 429):
                body = answer.discard()
                if answer.status == 429:
                    account.observe_headers(answer.headers, success=False)
                    account.mark_rate_limited(rate_limit_reset(body, answer.headers, time.time()))
                else:
                    log.warning("account %s: upstream refused its login after a refresh; "
                                "trying another", account.tag)
                account.end()
                tried.add(account)
                continue
            account.observe_headers(answer.headers,
                                    success=200 <= answer.status < 300 or answer.status == 101)
            self.record.account, self.record.holds_account = account, True
            self.moved = bool(tried) or (previous is not None and previous is not account)
            if answer.status == 400 and self.moved and strip_reasoning is not None:
                answer = self._retry_without_reasoning(account, answer, attempt, strip_reasoning)
            return account, answer

    def _retry_without_reasoning(self, account: Account, answer: Any,
                                 attempt: Callable[[Account, Login], Any],
                                 strip_reasoning: Callable[[], bool]) -> Any:
        """A 400 on the account a conversation moved to: if it cannot read the
        reasoning another account encrypted, send once more without it."""
        body = answer.discard()
        try:
            error = parse_json(body)
        except ValueError:
            error = None
        if is_foreign_reasoning_error(error) and strip_reasoning():
            log.info("account %s cannot read this conversation's reasoning from another account; "
                     "sending once more without it", account.tag)
            return self._send_to(account, attempt)
        # upstream's answer, as it was
        raise HTTPError(400, "invalid_request_error", "", body=body)

    @staticmethod
    def _send_to(account: Account, attempt: Callable[[Account, Login], Any]) -> Any:
        """One account's answer; a 401 refreshes its token and tries once more."""
        login = account.credential.current()
        answer = attempt(account, login)
        if answer.status == 401 and login.mode == "chatgpt":
            new_login = account.credential.refresh(login.access_token)
            if new_login.access_token != login.access_token:
                log.info("account %s: upstream refused the access token; refreshed, "
                         "retrying once", account.tag)
                answer.discard()
                answer = attempt(account, new_login)
        return answer


_UNKNOWN_ITEM = re.compile(r"(?i)\b(item|previous response) with id '?(rs|resp)_[^ ]* not found")


def is_foreign_reasoning_error(answer: Any) -> bool:
    """An error (an HTTP body or a WebSocket error event) saying the account
    cannot read reasoning or a response another account produced
    (PROTOCOL.md section 10)."""
    error = answer.get("error") if isinstance(answer, dict) else None
    if error is None and isinstance(answer, dict) and isinstance(answer.get("response"), dict):
        error = answer["response"].get("error")  # a response.failed event
    if not isinstance(error, dict):
        return False
    message = error.get("message")
    return error.get("code") == "invalid_encrypted_content" or (
        isinstance(message, str) and _UNKNOWN_ITEM.search(message) is not None)


def without_reasoning(data: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """A Responses request without what only the account that produced it can
    read: reasoning items, references to them, previous_response_id. None when
    there was nothing to take out."""
    out = dict(data)
    changed = out.pop("previous_response_id", None) is not None
    items = out.get("input")
    if isinstance(items, list):
        kept = [item for item in items if not (isinstance(item, dict) and (
            item.get("type") == "reasoning" or (item.get("type") == "item_reference"
                                                 and str(item.get("id", "")).startswith("rs_"))))]
        if len(kept) != len(items):
            out["input"] = kept
            changed = True
    return out if changed else None


def choose_account(pool: "Pool", session: str, tried: set) -> Account:
    """An account of ``pool`` not tried yet. Raises HTTPError: 429 with a
    truthful usage_limit_reached when every account is resting, 503 when none
    has a usable login."""
    try:
        return pool.choose(session, frozenset(tried))
    except NoAccount as exc:
        if exc.unavailable and not tried:
            raise HTTPError(503, "api_error", "credential unavailable: no account of %r has a "
                            "usable login (see /ocm/v1/status)" % pool.tag)
        now = time.time()
        return_at = ("; try again at %s" % format_rfc3339(exc.resets_at)) if exc.resets_at else ""
        raise HTTPError(429, "usage_limit_reached", "every account of %r is resting%s"
                        % (pool.tag, return_at),
                        body=usage_limit_body(exc.resets_at, now),
                        headers=([("Retry-After", str(max(1, int(exc.resets_at - now))))]
                                 if exc.resets_at else None))


class State:
    """What one config makes: its users, accounts, pools and budget ledger.
    A reload builds a whole new State and swaps it in with one assignment;
    every request keeps the State it started with."""

    def __init__(self, config: Config, accounts: Dict[str, Account], pools: Dict[str, Pool],
                 ledger: Optional[BudgetLedger]):
        self.config = config
        self.users = UserTable(config.users)
        self.accounts = accounts
        self.pools = pools
        self.ledger = ledger
        self.chatgpt_base = BaseURL.parse(config.upstream.chatgpt_url)
        self.api_base = BaseURL.parse(config.upstream.api_url)
        self.usage_url = usage_url_for(config.upstream.chatgpt_url)

    def pool_for(self, user: Optional[User]) -> Pool:
        if user is not None and user.credential:
            return self.pools[user.credential]
        if not self.config.credentials:  # open access: the first pool, else the first account
            return self.pools["default"]
        tags = ([c.tag for c in self.config.credentials if c.is_pool]
                or [self.config.credentials[0].tag])
        return self.pools[tags[0]]

    def upstream_target(self, mode: str, path: str, query: str) -> Tuple[BaseURL, str]:
        """Where a client's /v1/... goes (PROTOCOL.md section 1)."""
        if mode == "chatgpt":
            if path == "/v1/chat/completions" or path.startswith("/v1/chat/completions/"):
                raise HTTPError(400, "invalid_request_error",
                                "chat completions endpoint is only available in API key mode")
            base, rest = self.chatgpt_base, path[len("/v1"):]
        else:
            base, rest = self.api_base, path
        return base, base.path + rest + ("?" + query if query else "")


def build_state(config: Config, books: UsageBooks, previous: Optional[State] = None,
                check_interval: float = 1.0) -> State:
    """A complete State for ``config``, reusing what ``previous`` has that did
    not change (accounts, the ledger). Raises ConfigError or OSError, leaving
    ``previous`` exactly as it was: a refused reload changes nothing that runs."""
    require_ssl_for(config)
    ledger = previous.ledger if previous is not None else None
    if config.budgets_path and (ledger is None or ledger.path != config.budgets_path):
        if ledger is not None:
            ledger.save_if_dirty()  # the new ledger may read the same file
        ledger = open_budget_ledger(config)
    elif not config.budgets_path:
        ledger = None
    accounts, pools = build_accounts(config, books, check_interval,
                                     reuse=previous.accounts if previous is not None else None)
    return State(config, accounts, pools, ledger)


# == 16. Handler =============================================================

def has_unread_body(request: ClientRequest) -> bool:
    return not request.body_read and (request.body_kind == "chunked" or request.body_length > 0)


def body_too_large(length: int, max_size: int) -> HTTPError:
    return HTTPError(413, "invalid_request_error", "request body of %d bytes is larger than the "
                     "limit of %d" % (length, max_size), close=True)


def json_error_body(error_type: str, message: str) -> bytes:
    return json.dumps({"error": {"type": error_type, "message": message}}).encode("utf-8")


def connection_listed(headers) -> set:
    """Header names a Connection header marks hop-by-hop."""
    names = set()
    for value in headers:
        names.update(part.strip().lower() for part in value.split(",") if part.strip())
    return names


REQUEST_DROPPED_HEADERS = (HOP_BY_HOP | CLIENT_CREDENTIAL_HEADERS | CLIENT_PRIVATE_HEADERS
                           | OCM_SET_HEADERS)


def build_upstream_headers(client: Headers, config_headers: Dict[str, List[str]],
                           login: Login, body_length: Optional[int]) -> List[Tuple[str, str]]:
    """Client headers minus hop-by-hop, credentials and the owner's own (cookies,
    forwarding, organisation), config headers on top, then the owner's
    Authorization and account id (PROTOCOL.md section 1)."""
    dropped = REQUEST_DROPPED_HEADERS
    listed = client.get_all("connection")
    if listed or config_headers:
        dropped = dropped | connection_listed(listed) | {name.lower() for name in config_headers}
    out = []
    for name, value in client.items():
        key = name.lower()
        if key not in dropped and not key.startswith(CLIENT_PRIVATE_PREFIX):
            out.append((name, value))
    for name, values in config_headers.items():
        if name.lower() not in HOP_BY_HOP | OCM_SET_HEADERS | {"authorization"}:
            out.extend((name, value) for value in values)
    out.append(("Accept-Encoding", "identity"))
    if body_length is not None:
        out.append(("Content-Length", str(body_length)))
    out.append(("Authorization", "Bearer " + login.bearer))
    if login.mode == "chatgpt" and login.account_id:
        out.append(("ChatGPT-Account-Id", login.account_id))
    return out


def build_websocket_headers(client: Headers, config_headers: Dict[str, List[str]],
                            login: Login) -> List[Tuple[str, str]]:
    """As for HTTP, minus Sec-WebSocket-* (no permessage-deflate), plus the
    OpenAI-Beta opt-in when the client did not send one."""
    headers = [(n, v) for n, v in build_upstream_headers(client, config_headers, login, None)
               if not n.lower().startswith("sec-websocket-") and n.lower() != "accept-encoding"]
    if not any(n.lower() == "openai-beta" for n, _ in headers):
        headers.append(("OpenAI-Beta", "responses_websockets=2026-02-06"))
    return headers


def is_websocket_key(key: str) -> bool:
    try:
        return len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except (ValueError, UnicodeEncodeError):
        return False


RESPONSE_DROPPED_HEADERS = HOP_BY_HOP | UPSTREAM_PRIVATE_HEADERS | {"content-length"}


def response_headers_to_forward(message) -> List[Tuple[str, str]]:
    """Upstream answer headers for the client: minus hop-by-hop, the length
    (OCM frames the body itself) and the owner's cookies."""
    dropped = RESPONSE_DROPPED_HEADERS
    listed = message.get_all("connection")
    if listed:
        dropped = dropped | connection_listed(listed)
    return [(name, value) for name, value in message.items() if name.lower() not in dropped]


def encode_head(status: int, reason: str, headers: List[Tuple[str, str]]) -> bytes:
    lines = ["HTTP/1.1 %d %s\r\n" % (status, reason or REASONS.get(status, ""))]
    lines.extend("%s: %s\r\n" % item for item in headers)
    lines.append("\r\n")
    return "".join(lines).encode("latin-1", "replace")


# -- WebSocket relay ----------------------------------------------------------

WS_CLOSE_WAIT = 5.0  # after one side's close, how long the other gets to answer it
WS_FIRST_MESSAGE_WAIT = 10.0  # a refused session's error frame waits this long for the request
WS_SHUTDOWN_WAIT = 2.0  # at shutdown, how long live sessions get to finish their close
CUT_SETTLE_WAIT = 1.0  # at shutdown, how long requests cut after the drain get to settle
WS_POLICY_CLOSE = 1008  # RFC 6455: the endpoint's policy ends the session
WEBSOCKET_PATH = "/v1/responses"  # Codex's; the only one whose messages OCM understands
# Terminal events of a turn: each ends the turn running (one at a time: an
# error event names no turn, so a second one could never be told apart).
TURN_END_EVENTS = frozenset(("response.completed", "response.incomplete", "response.failed",
                             "error"))
WS_IDLE_LIMIT = 30 * 60.0  # a session whose client sent no message this long may be closed
                           # (the backend ends every session after 60 minutes; Codex reconnects)


def is_websocket_upgrade(request: ClientRequest) -> bool:
    return request.method == "GET" and request.headers.has_token("upgrade", "websocket")


def is_forwarded_handshake_header(name: str) -> bool:
    """Upstream handshake headers Codex wants on its 101 (PROTOCOL.md section 6)."""
    name = name.lower()
    return (name.startswith("x-codex-") or name.startswith("x-reasoning")
            or name in ("x-models-etag", "openai-model"))


def is_rate_limit_header(name: str) -> bool:
    name = name.lower()
    return name.startswith("x-codex-") or name.startswith("x-ratelimit-") or name == "retry-after"


def usage_limit_frame(handshake: WebSocketHandshake) -> bytes:
    """The error event Codex turns into its usage-limit message (PROTOCOL.md section 6)."""
    try:
        answer = parse_json(handshake.body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        answer = None
    error = answer.get("error") if isinstance(answer, dict) else None
    if not isinstance(error, dict):
        error = {"type": "usage_limit_reached",
                 "message": handshake.body.decode("utf-8", "replace")[:500] or "rate limited"}
    return error_event(429, error, {name.lower(): value
                                    for name, value in handshake.headers.items()
                                    if is_rate_limit_header(name)})


class WebSocketEnd:
    """One side of a relayed WebSocket: its socket, parser and close state.

    Sends have their own time limit, ``limits.send_timeout``: a peer that
    takes no bytes for that long is stalled (is_stalled), and the server cuts
    the session. The socket itself keeps no timeout, for the reads of the
    other direction wait for as long as the user thinks (a socket timeout
    would apply to both)."""
    __slots__ = ("name", "sock", "parser", "messages", "write_lock", "close_sent", "is_upstream",
                 "done", "send_timeout", "sending_since")

    def __init__(self, name: str, sock, is_upstream: bool, limits: Limits):
        self.name = name
        self.sock = sock
        self.is_upstream = is_upstream
        self.parser = FrameParser(from_client=not is_upstream,
                                  max_payload=limits.max_websocket_message)
        self.messages = MessageTracker(limits.max_websocket_message)
        self.write_lock = threading.Lock()
        self.close_sent = False
        self.done = threading.Event()
        self.send_timeout = limits.send_timeout
        self.sending_since = 0.0  # monotonic start of the send in progress, 0 when none

    def send(self, opcode: int, payload: bytes, fin: bool = True) -> None:
        data = encode_frame(opcode, payload, fin, masked=self.is_upstream)
        with self.write_lock:
            if not self.close_sent:  # nothing may follow a close frame
                self.close_sent = opcode == WS_CLOSE
                self.sending_since = time.monotonic()
                try:
                    self.sock.sendall(data)
                finally:
                    self.sending_since = 0.0

    def is_stalled(self, now: float) -> bool:
        """A send has waited longer than send_timeout for the peer to take it."""
        since = self.sending_since
        return since != 0.0 and now - since > self.send_timeout

    @property
    def last_active(self) -> float:
        """Monotonic time of this peer's last data frame (or of the session's start)."""
        return self.messages.last_data_at

    def idle_for(self, now: float) -> float:
        """Seconds since this peer's last data frame: compare with WS_IDLE_LIMIT."""
        return now - self.messages.last_data_at

    def send_close(self, code: Optional[int], reason: str = "") -> None:
        with contextlib.suppress(OSError):
            self.send(WS_CLOSE, close_payload(code, reason))

    def cut(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


def parse_event(text: bytes) -> Optional[Dict[str, Any]]:
    """One WebSocket message as a JSON object, or None."""
    try:
        event = parse_json(text)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


class WebSocketSession:
    """A client WebSocket pinned to one upstream WebSocket for its whole life
    (server state lives on the connection: previous_response_id chains).

    One thread per direction. Frames pass with their meaning: fragments,
    pings and pongs between them, close codes and reasons; frames to upstream
    are masked afresh. Each response.create is a model request of its own: it
    is parsed, admitted by the pipeline exactly as an HTTP request is (the
    person still configured and not expired, models, budgets, share), and held
    back with an error event if refused. Each turn is settled at its terminal
    event, or when the session ends before one came.
    """

    def __init__(self, server: "OCMServer", client_sock, client_leftover: bytes,
                 handshake: WebSocketHandshake, user: Optional[User], account: Account, path: str,
                 moved: bool = False):
        limits = server.config.limits
        self.server = server
        self.client = WebSocketEnd("client", client_sock, False, limits)
        self.upstream = WebSocketEnd("upstream", handshake.sock, True, limits)
        self._leftover = {self.client: client_leftover, self.upstream: handshake.leftover}
        self.user = user
        self.account = account
        self.path = path
        self.week_start = week_start_from_headers(handshake.headers)
        # a client text message's frames, until it is admitted
        self._held = []  # type: List[Frame]
        # Turns running, oldest first: [record, its create while it may be sent again].
        self._turns = collections.deque()  # type: collections.deque
        # The conversation came from another account: a turn that account cannot
        # read the reasoning of is sent once more without it.
        self.moved = moved
        self.ended_by = ""        # "client" or "upstream": who ended the session first
        self.context_tokens = 0   # the conversation so far (last turn's in + out), for estimates
        self._turns_lock = threading.Lock()

    def run(self) -> None:
        """Relay until both sides closed (or one failed); in the handler's thread."""
        other = threading.Thread(target=self.pump, args=(self.upstream, self.client),
                                 name="ocm-ws-upstream", daemon=True)
        other.start()
        try:
            self.pump(self.client, self.upstream)
        finally:
            other.join(WS_CLOSE_WAIT + 1)
            self.upstream.cut()
            with contextlib.suppress(OSError):
                self.upstream.sock.close()
            self.end_turns(499)

    def is_idle(self, now: float) -> bool:
        """No turn running, and neither side sent a message for WS_IDLE_LIMIT:
        the session only holds a thread, two sockets and a concurrency place."""
        with self._turns_lock:
            if self._turns:
                return False
        return min(self.client.idle_for(now), self.upstream.idle_for(now)) > WS_IDLE_LIMIT

    def close(self, code: int, reason: str) -> None:
        """Close both sides (server shutdown: 1001)."""
        # OCM ends it for the client: a turn cut here is charged as one the
        # client left, whichever peer answers the close first.
        self.note_end(self.client)
        # The frames go from a thread of their own: one may wait behind a send to
        # a peer that takes nothing, and the closer (housekeeping; drain, holding
        # the server's lock) must not wait with it. Such a send is cut as stalled.
        try:
            threading.Thread(target=self._send_closes, args=(code, reason),
                             name="ocm-ws-close", daemon=True).start()
        except RuntimeError:  # the OS would not give us another thread
            self._send_closes(code, reason)

    def _send_closes(self, code: int, reason: str) -> None:
        self.client.send_close(code, reason)
        self.upstream.send_close(code, reason)

    def end_for_person(self, message: str) -> None:
        """The person may no longer use OCM: say why, and close both sides."""
        with contextlib.suppress(OSError):
            self.client.send(WS_TEXT, error_event(403, {"type": "permission_error",
                                                        "message": message}))
        self.close(WS_POLICY_CLOSE, "access ended")

    def cut(self) -> None:
        """Stop at once: for peers that do not answer a close."""
        self.client.cut()
        self.upstream.cut()

    def pump(self, source: WebSocketEnd, dest: WebSocketEnd) -> None:
        try:
            data = self._leftover.pop(source)
            while True:
                if data:
                    for frame in source.parser.feed(data):
                        if not self.relay(source, dest, frame):
                            return
                data = source.sock.recv(RELAY_CHUNK)
                if not data:
                    log.debug("websocket: %s closed the connection without a close frame",
                              source.name)
                    self.note_end(source)
                    dest.send_close(1001 if source is self.client else 1011,
                                    "%s went away" % source.name)
                    return
        except WebSocketError as exc:
            log.info("websocket: %s broke the protocol (%s); closing with %d", source.name,
                     exc.reason, exc.code)
            self.note_end(source)
            source.send_close(exc.code, exc.reason)
            dest.send_close(1001 if source is self.client else 1011,
                            "%s protocol error" % source.name)
        except OSError as exc:
            if not source.close_sent:
                log.debug("websocket: %s connection lost: %s", source.name, exc)
            self.note_end(source)
            dest.send_close(1001 if source is self.client else 1011,
                            "%s connection lost" % source.name)
        finally:
            self.note_end(source)
            source.done.set()
            other = self.upstream if source is self.client else self.client
            if not other.done.wait(WS_CLOSE_WAIT):
                self.client.cut()   # the other side never answered: stop waiting for it
                self.upstream.cut()

    def note_end(self, source: WebSocketEnd) -> None:
        """Whoever ended first ended the session: noted before the other side
        hears of it, since its answer (a close) would otherwise race this."""
        with self._turns_lock:
            if not self.ended_by:
                self.ended_by = source.name

    def relay(self, source: WebSocketEnd, dest: WebSocketEnd, frame: Frame) -> bool:
        """Pass one frame on; False once this direction has ended (a close)."""
        text = source.messages.add(frame)
        if frame.opcode == WS_CLOSE:
            parse_close_payload(frame.payload)  # validates code and reason
            self.note_end(source)
            with contextlib.suppress(OSError):
                dest.send(WS_CLOSE, frame.payload)
            return False
        frames = [frame]
        event = ended = None
        if text is not None and source is self.upstream:
            event = parse_event(text)
            if self.moved and self.retry_without_reasoning(event):
                # the refusal is answered by sending the turn again; the client never sees it
                return True
            # before the client sees the end of a turn, and may start the next one
            ended = self.end_turn(event)
        if source is self.client and frame.opcode not in WS_CONTROL_OPCODES:
            # A client's data message goes on only whole and admitted.
            self._held.append(frame)
            if not frame.fin:
                return True
            frames, self._held = self._held, []
            refusal = self.start_turn(text) if text is not None else error_event(
                400, {"type": "invalid_request_error",
                      "message": "send JSON text messages, not binary ones"})
            if refusal is not None:
                # this message goes no further; the session stays
                self.client.send(WS_TEXT, refusal)
                return True
        try:
            for one in frames:
                dest.send(one.opcode, one.payload, one.fin)
        except OSError:
            self.note_end(dest)  # the side that could not take it ended the session
            if ended is not None:  # off the running list already: end_turns will not see it
                self.settle_turn(ended, event)
            source.send_close(1001 if dest is self.client else 1011,
                              "%s connection lost" % dest.name)
            return False
        if ended is not None:
            self.settle_turn(ended, event)  # after the send: accounting never delays the client
        elif source is self.upstream and frame.opcode not in WS_CONTROL_OPCODES:
            with self._turns_lock:
                if self._turns:
                    self._turns[0][0].relayed += len(frame.payload)
        return True

    def retry_without_reasoning(self, event: Optional[Dict[str, Any]]) -> bool:
        """True if ``event`` is upstream refusing reasoning from another account
        for the oldest turn, which then went upstream once more without it."""
        if event is None or event.get("type") not in ("error", "response.failed"):
            return False
        with self._turns_lock:
            entry = self._turns[0] if self._turns else None
            create = entry[1] if entry is not None else None
            if create is None or not is_foreign_reasoning_error(event):
                return False
            entry[1] = None
        stripped = without_reasoning(parse_json(create))
        if stripped is None:
            return False
        log.info("account %s cannot read this conversation's reasoning from another account; "
                 "sending the turn once more without it", self.account.tag)
        self.upstream.send(WS_TEXT, json.dumps(stripped).encode("utf-8"))
        return True

    def start_turn(self, text: bytes) -> Optional[bytes]:
        """One client message: a response.create passes the pipeline's
        admission as an HTTP request would. Returns the error event to send
        back instead of forwarding it, or None to let it through."""
        body = parse_request_body(text)
        if not body.readable:
            return error_event(400, {"type": "invalid_request_error", "message": (
                "each message must be one JSON object (%s)" % body.problem)})
        if body.data.get("type") != "response.create":
            # Codex sends only response.create. Anything else could run a model
            # OCM did not admit, or draw an error that would end a real turn.
            return error_event(400, {"type": "invalid_request_error", "message": (
                "OCM relays response.create messages only, not %s"
                % json.dumps(body.data.get("type"))[:80])})
        with self._turns_lock:
            running = bool(self._turns)
        if running:
            return error_event(400, {"type": "invalid_request_error", "message": (
                "a response is already in progress on this connection; send the next "
                "response.create after its response.completed")})
        server = self.server
        state = server.state
        record = RequestRecord("WS", self.path, time.monotonic())
        user = state.users.current(self.user) if self.user is not None else None
        if self.user is not None and user is None:
            log.info("websocket: %s is no longer in the config; closing their session",
                     self.user.name)
            self.end_for_person("your access to OCM was removed by its owner")
            return error_event(403, {"type": "permission_error",
                                     "message": "your access was removed"})
        call = ModelRequest(server, state, user, record, body)
        record.account, record.week_start = self.account, self.week_start
        record.input_estimate = len(text) // 4 + server.conversations.context_estimate(
            user.name if user is not None else "", body, self.context_tokens)
        try:
            check_access(user, time.time())
        except HTTPError as exc:
            record.status, record.error = exc.status, exc.message
            server.settle(record)
            self.end_for_person(exc.message)
            return error_event_for(exc)
        try:
            call.admit()
            self.account.check_share(user)
        except HTTPError as exc:
            record.status, record.error = exc.status, exc.message
            server.settle(record)
            return error_event_for(exc)
        body.data = None  # nothing else needs it
        with self._turns_lock:
            # A create crossing a close (OCM's own: shutdown, idle) would never go
            # upstream (nothing may follow a close), yet end as a turn cut short.
            ending = bool(self.ended_by)
            if not ending:
                self._turns.append([record, text if self.moved else None])
        if ending:
            record.status = 503
            server.settle(record)
            return error_event(503, {"type": "api_error", "message": "this connection is closing"})
        return None

    def end_turn(self, event: Optional[Dict[str, Any]]) -> Optional[RequestRecord]:
        """The running turn, if upstream's ``event`` ends it; no longer running."""
        if event is None or event.get("type") not in TURN_END_EVENTS:
            return None
        with self._turns_lock:
            record = self._turns.popleft()[0] if self._turns else None
        if record is not None and event["type"] != "error":
            # Known before the client sees the end: its next create, continuing
            # this turn, may be admitted (and estimated) before this one settles.
            record.usage = usage_record_from_event(event, record.model, record.tier)
            if record.usage is not None:
                self.context_tokens = record.usage.input_tokens + record.usage.output_tokens
        return record

    def settle_turn(self, record: RequestRecord, event: Dict[str, Any]) -> None:
        """A turn ``event`` ended (its usage read by end_turn): settled."""
        if event["type"] == "error":
            status = event.get("status")
            record.status = status if isinstance(status, int) and 400 <= status < 600 else 500
        else:
            record.status = 200
        self.server.settle(record)

    def end_turns(self, status: int) -> None:
        """The session ended: turns that got no terminal event are settled now
        (at an estimate when the client left while upstream was answering)."""
        with self._turns_lock:
            records, self._turns = [entry[0] for entry in self._turns], collections.deque()
        for record in records:
            record.status = status
            record.client_left = self.ended_by == "client"
            self.server.settle(record)


def serve_websocket(handler: "OCMHandler", request: ClientRequest, state: State,
                    user: Optional[User]) -> None:
    """Upgrade to a WebSocket pinned to one upstream WebSocket (PROTOCOL.md
    section 6). The client gets its 101 only once upstream gave us ours;
    its turns are admitted one by one by the session."""
    key = request.headers.get("sec-websocket-key", "").strip()
    if [v.strip() for v in request.headers.get_all("sec-websocket-version")] != ["13"]:
        raise HTTPError(426, "invalid_request_error", "WebSocket version 13 is required",
                        headers=[("Sec-WebSocket-Version", "13")])
    if not is_websocket_key(key):
        raise HTTPError(400, "invalid_request_error", "missing or invalid Sec-WebSocket-Key")
    call = ModelRequest(handler.server, state, user, request.record, None)
    pool = state.pool_for(user)

    def attempt(account: Account, login: Login) -> WebSocketHandshake:
        base, upstream_path = state.upstream_target(login.mode, request.path, request.query)
        return account.open_websocket(base.origin, upstream_path,
                                      build_websocket_headers(request.headers,
                                                              state.config.headers, login))

    try:
        account, handshake = call.send(pool,
                                       session_key(request.headers, None) if pool.is_pool else "",
                                       attempt)
    except HTTPError as exc:
        if exc.error_type != "usage_limit_reached":
            raise
        request.status = 429  # every account of the pool is resting: say so as Codex shows it
        request.record.error = exc.message
        refuse_websocket_with_usage_limit(handler, key, error_event_for(exc))
        return
    request.status = handshake.status
    if handshake.status == 101:
        accept_websocket(handler, key, handshake.headers, pool)
        handler.reader.drop_kernel_timeouts()
        for sock in (handler.connection, handshake.sock):
            # Sessions idle between turns for as long as the user thinks: no
            # read timeout, but TCP keep-alive finds peers that vanished.
            sock.settimeout(None)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        session = WebSocketSession(handler.server, handler.connection, bytes(handler.reader.buf),
                                   handshake, user, account, request.path, moved=call.moved)
        handler.reader.buf.clear()
        handler.server.run_websocket(session)
        return
    if handshake.status == 429:
        refuse_websocket_with_usage_limit(handler, key, usage_limit_frame(handshake),
                                          handshake.headers)
        return
    if handshake.status in (404, 426):
        raise HTTPError(426, "invalid_request_error",
                        "upstream does not offer WebSockets here (%d); use HTTP"
                        % handshake.status)
    headers = [(n, v) for n, v in handshake.headers.items()
               if n.lower() not in HOP_BY_HOP and n.lower() != "content-length"]
    headers += [("Content-Length", str(len(handshake.body))), ("Connection", "close")]
    handler.write(encode_head(handshake.status, handshake.reason, headers) + handshake.body)
    handler.head_sent = True

def refuse_websocket_with_usage_limit(handler: "OCMHandler", key: str, frame: bytes,
                                      upstream_headers: Optional[Headers] = None) -> None:
    """Accept, then say why in the frame Codex shows as its usage-limit message."""
    accept_websocket(handler, key, upstream_headers or Headers())
    # Codex matches an error frame to the request it waits on: one sent before its
    # response.create arrived is dropped, and it reconnects (5 times, then HTTP).
    handler.reader.wait_for_websocket_message(handler.server.config.limits.max_websocket_message,
                                           WS_FIRST_MESSAGE_WAIT)
    handler.write(encode_frame(WS_TEXT, frame)
                  + encode_frame(WS_CLOSE, close_payload(1008, "usage limit reached")))
    # Read what the client already sent (and its close) before closing:
    # closing on unread data resets the connection and can lose the frame.
    with contextlib.suppress(OSError):
        handler.connection.shutdown(socket.SHUT_WR)
    handler.reader.read_until_close(1 << 20, 2.0)

def accept_websocket(handler: "OCMHandler", key: str, upstream_headers: Headers,
                     pool: Optional[Pool] = None) -> None:
    headers = [("Upgrade", "websocket"), ("Connection", "Upgrade"),
               ("Sec-WebSocket-Accept", websocket_accept(key))]
    forwarded = [(n, v) for n, v in upstream_headers.items() if is_forwarded_handshake_header(n)]
    headers += (pool.rewrite_rate_limit_headers(forwarded) if pool is not None and pool.is_pool
                else forwarded)
    handler.write(encode_head(101, "Switching Protocols", headers))
    handler.head_sent = True


class StreamContext:
    """One relayed response, shared with the hang-up watcher."""
    __slots__ = ("lock", "active", "client_gone", "upstream_sock")

    def __init__(self, upstream_sock):
        self.lock = threading.Lock()
        self.active = True
        self.client_gone = False
        self.upstream_sock = upstream_sock

    def hang_up(self) -> None:
        """The client left: cut the upstream socket so the relay wakes at once."""
        with self.lock:
            if not self.active:
                return
            self.client_gone = True
            if self.upstream_sock is not None:
                with contextlib.suppress(OSError):
                    self.upstream_sock.shutdown(socket.SHUT_RDWR)


class AnswerRelay:
    """Writes upstream's answers to one client connection: as they came
    (relay_response, stream_body), or in the client's own API when OCM
    rewrote the request (relay_translated). Each answer is settled just
    before its last bytes go out."""

    def __init__(self, handler: "OCMHandler"):
        self.handler = handler

    def relay_response(self, request: ClientRequest, exchange: "UpstreamExchange",
                       tap: Optional[UsageTap] = None, pool: Optional[Pool] = None) -> None:
        """Status, headers and body unchanged (minus hop-by-hop). Known lengths pass
        as they are; unknown lengths (SSE) go out chunked, each read flushed.
        The upstream connection goes back to the pool as soon as its response
        is read, before the client gets the last byte and can ask again."""
        response = exchange.response
        headers = response_headers_to_forward(response.msg)
        if pool is not None and pool.is_pool:
            headers = pool.rewrite_rate_limit_headers(headers)
        status = response.status
        no_body = request.method == "HEAD" or status in (204, 304) or 100 <= status < 200
        # A whole JSON answer is read before any of it goes out: its usage is
        # at its end, and a client that left meanwhile is charged it all the same.
        whole = (SMALL_BODY if tap is None or tap.stream or no_body or
                 (response.length or 0) > UsageTap.JSON_LIMIT else UsageTap.JSON_LIMIT)
        complete = False
        prefix = b""
        try:
            if no_body or response.length is None and whole > SMALL_BODY or \
                    response.length is not None and response.length <= whole:
                body, complete = read_small_body(response, whole)
                if not complete and not no_body and response.length is None and \
                        len(body) >= whole:  # larger than OCM reads whole: the rest streams
                    prefix = body
                else:
                    self.relay_whole_body(request, exchange, tap, status, response.reason,
                                          headers, body if not no_body else None, complete)
                    return
            if response.length is not None:
                headers.append(("Content-Length", str(response.length)))
                chunked = False
            elif request.version == "HTTP/1.1":
                headers.append(("Transfer-Encoding", "chunked"))
                chunked = True
            else:  # an HTTP/1.0 client: the end of the body is the end of the connection
                request.keep_alive = False
                chunked = False
            self.finish_head(request, status, response.reason, headers)
            if prefix:
                if tap is not None:
                    tap.feed(prefix)
                request.record.relayed += len(prefix)
                self.handler.write(b"%x\r\n%s\r\n" % (len(prefix), prefix) if chunked else prefix)
            complete = self.stream_body(request, exchange, chunked, tap)
            if not complete:
                request.keep_alive = False
        finally:
            exchange.finish(complete)
            if tap is not None:
                tap.finish(complete)

    def relay_whole_body(self, request: ClientRequest, exchange: "UpstreamExchange",
                         tap: Optional[UsageTap], status: int, reason: str,
                         headers: List[Tuple[str, str]], body: Optional[bytes],
                         complete: bool) -> None:
        """An answer read whole (``body`` None: one without a body), settled
        before it goes out in one write."""
        exchange.finish(complete)
        if body is None:
            length = exchange.response.msg.get("content-length")
            if request.method == "HEAD" and length is not None:
                headers.append(("Content-Length", length))
            body = b""
        elif not complete:
            raise HTTPError(502, "api_error", "upstream closed the connection mid-response")
        else:
            headers.append(("Content-Length", str(len(body))))
        if tap is not None and body:
            tap.feed(body)  # a copy, parsed when the answer is over
        request.record.relayed += len(body)
        self.settle_before_the_end(request, tap)
        self.finish_head(request, status, reason, headers, body)

    def settle_before_the_end(self, request: ClientRequest, tap: Optional[UsageTap]) -> None:
        """Book a whole answer before its last bytes go out: a client that asks
        again at once (Codex does) finds its last request already counted."""
        if tap is not None:
            tap.finish(True)
        self.handler.server.settle(request.record)

    def finish_head(self, request: ClientRequest, status: int, reason: str,
                    headers: List[Tuple[str, str]], body: bytes = b"") -> None:
        if not request.keep_alive:
            headers.append(("Connection", "close"))
        # Writes keep the read timeout the socket already has (idle, header or
        # body): a bound for a client that stopped reading, without a syscall.
        self.handler.write(encode_head(status, reason, headers) + body)
        self.handler.head_sent = True

    def stream_body(self, request: ClientRequest, exchange: "UpstreamExchange", chunked: bool,
                    tap: Optional[UsageTap]) -> bool:
        """Copy the body as it arrives. True if it ended cleanly; False if upstream
        broke off (the client then sees a truncated body: no final chunk)."""
        for data, last in self.read_upstream(request, exchange):
            if last:
                if tap is not None and data:
                    tap.feed(data)
                self.settle_before_the_end(request, tap)
            if data:
                request.record.relayed += len(data)
                try:
                    self.handler.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                finally:  # after the write, so accounting never delays the client; and
                    # even if the client just hung up: it was billed
                    if tap is not None and not last:
                        tap.feed(data)
            if last:
                if chunked:
                    self.handler.write(b"0\r\n\r\n")
                return True
        return False

    def read_upstream(self, request: ClientRequest, exchange: "UpstreamExchange"):
        """The upstream body as it arrives, as (data, last) pairs. Before the
        last one, the hang-up watcher is detached and the connection is back in
        the pool: the client may close or ask again at once. Stops without a
        last piece if upstream broke off; raises ClientGone if the client left."""
        response = exchange.response
        # The response's own socket: with Connection: close, conn.sock is None.
        context = StreamContext(getattr(response, "raw_sock", None) or exchange.conn.sock)
        watcher = self.handler.server.watcher
        watcher.watch(self.handler.connection, context)
        try:
            while True:
                try:
                    data = response.read1(RELAY_CHUNK) if response.length != 0 else b""
                    if response.length == 0:
                        response.read()  # marks it closed (read1 does not before 3.13)
                except (http.client.HTTPException, OSError, ValueError) as exc:
                    if context.client_gone:
                        raise ClientGone("hung up while waiting for upstream")
                    log.warning("%s %s: upstream stream broke off: %s", request.method,
                                log_safe(request.path), log_safe(describe_connect_error(exc)))
                    return
                last = not data or response.length == 0
                if last:
                    if context.client_gone:
                        raise ClientGone("hung up while waiting for upstream")
                    if not data and response.length:  # Content-Length promised more
                        log.warning("%s %s: upstream closed with %d bytes missing",
                                    request.method, log_safe(request.path), response.length)
                        return
                    watcher.unwatch(self.handler.connection, context)
                    exchange.finish(True)
                yield data, last
                if last:
                    return
        finally:
            watcher.unwatch(self.handler.connection, context)

    # -- translated answers (section 14b) -------------------------------------------
    def relay_translated(self, request: ClientRequest, exchange: "UpstreamExchange",
                         translation: Translation, state: State) -> None:
        """The answer to a request OCM rewrote for the ChatGPT backend, in the
        client's own API: its stream as it comes, or the whole answer built
        from the stream. Usage is read from upstream's own events."""
        record = request.record
        if not 200 <= exchange.status < 300 or translation.kind == "models":
            body, complete = read_small_body(exchange.response)
            exchange.finish(complete)
            if translation.kind == "models" and exchange.status == 200:
                try:
                    answer = parse_json(body)
                except ValueError:
                    answer = None
                body = json.dumps(models_list(answer, state.config.model_map)).encode("utf-8")
            elif translation.kind in ("chat", "anthropic"):
                body = translation.error_body(exchange.status, *upstream_error_fields(body))
            extra = [(n, v) for n, v in exchange.headers.items() if n.lower() == "retry-after"]
            self.handler.send_json(exchange.status, body, close=not request.keep_alive,
                                   extra=extra)
            return
        content_type = (exchange.headers.get("content-type") or "").lower()
        if "json" in content_type and translation.kind in ("responses", "chat", "anthropic"):
            # an upstream that would not stream
            self.relay_whole_answer(request, exchange, translation)
            return
        events = []  # type: List[Any]
        scanner = SSEScanner(events.append, every_event=True)
        writer = translation.writer() if translation.stream else None
        assembler = None if writer is not None else ResponseAssembler()

        def take() -> bytes:
            out = []
            for event in events:
                if record.usage is None:
                    record.usage = usage_record_from_event(event, record.model, record.tier)
                if writer is not None:
                    out.append(writer.feed(event))
                else:
                    assembler.feed(event)
            del events[:]
            return b"".join(out)

        chunked = request.version == "HTTP/1.1"
        if writer is not None:
            request.keep_alive = request.keep_alive and chunked
            self.finish_head(request, 200, "OK",
                             [("Content-Type", "text/event-stream; charset=utf-8"),
                              ("Cache-Control", "no-cache")]
                             + ([("Transfer-Encoding", "chunked")] if chunked else []))
        ended = False
        for data, last in self.read_upstream(request, exchange):
            scanner.feed(data)
            if last:
                scanner.finish()
                ended = True
            out = take()
            request.record.relayed += len(data)
            if writer is not None and out and not last:
                self.handler.write(b"%x\r\n%s\r\n" % (len(out), out) if chunked else out)
        exchange.finish(ended)
        if writer is not None:
            out += writer.finish()
            self.settle_before_the_end(request, None)
            self.handler.write((b"%x\r\n%s\r\n0\r\n\r\n" % (len(out), out) if out
                                else b"0\r\n\r\n") if chunked else out)
            if not ended:
                request.keep_alive = False
            return
        status, answer = assembler.finish()
        self.send_answer(request, translation, status, answer)

    def relay_whole_answer(self, request: ClientRequest, exchange: "UpstreamExchange",
                           translation: Translation) -> None:
        body, complete = read_small_body(exchange.response, UsageTap.JSON_LIMIT)
        exchange.finish(complete)
        try:
            answer = parse_json(body) if complete else None
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            failure = STREAM_CUT
            self.send_answer(request, translation, failure.status,
                             openai_error_body(failure.error_type, failure.message, failure.code))
            return
        request.record.usage = usage_record_from(answer, request.record.model, request.record.tier)
        if translation.stream:  # the client asked for a stream: one of a whole answer
            writer = translation.writer()
            events = [{"type": "response.output_item.done", "output_index": i, "item": item}
                      for i, item in enumerate(answer.get("output") or ())]
            out = b"".join(writer.feed(event) for event in events + [
                {"type": "response.completed", "response": answer}]) + writer.finish()
            self.settle_before_the_end(request, None)
            self.finish_head(request, 200, "OK",
                             [("Content-Type", "text/event-stream; charset=utf-8"),
                              ("Content-Length", str(len(out)))], out)
            return
        self.send_answer(request, translation, 200, answer)

    def send_answer(self, request: ClientRequest, translation: Translation, status: int,
                    answer: Dict[str, Any]) -> None:
        """A whole answer in the client's API: the response, or its error."""
        request.record.status = status
        if status != 200 and translation.kind == "anthropic":
            error = answer.get("error") or {}
            answer = anthropic_error_body(status, str(error.get("type") or ""),
                                          str(error.get("message") or ""))
        elif status == 200:
            answer = translation.answer(answer)
        self.settle_before_the_end(request, None)
        self.handler.send_json(status, json.dumps(answer).encode("utf-8"),
                               close=not request.keep_alive)


class OCMHandler(BaseHTTPRequestHandler):
    """One client connection: read requests, authenticate, relay. Keep-alive aware."""

    server = None  # type: OCMServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        self.connection = self.request
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        send_timeout = self.server.config.limits.send_timeout
        self.reader = SocketReader(self.connection, send_timeout)
        if self.server.tls is None:
            self.reader.use_kernel_timeouts(send_timeout)
        self.answers = AnswerRelay(self)
        self.head_sent = False
        self.error_shape = ""  # "anthropic" for Anthropic's endpoints: errors in their shape
        self.busy = False  # serving a request (as opposed to waiting for one)
        self.authenticated = False  # until a valid token (or open access): see note_authenticated
        # TLS handshake and first request head, together, within header_timeout
        self.first_deadline = time.monotonic() + self.server.config.limits.header_timeout
        self.server.track(self)

    def finish(self) -> None:
        self.server.untrack(self)  # the server closes the plain socket itself
        if self.connection is not self.request:  # a TLS socket took over its descriptor
            with contextlib.suppress(OSError):
                self.connection.close()

    def interrupt(self) -> None:
        """Wake this connection's thread: shutting down, or it idles too long."""
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def handle(self) -> None:
        if self.server.tls is not None:
            try:
                remaining = max(0.001, self.first_deadline - time.monotonic())
                self.connection = self.server.tls.wrap(self.connection, remaining)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                log.debug("TLS handshake with %s failed: %s", self.client_address[0], exc)
                return
            self.reader = SocketReader(self.connection, self.server.config.limits.send_timeout)
        try:
            while self.serve_one():
                pass
        except ClientGone as exc:
            log.debug("client %s hung up: %s", self.client_address[0], exc)
        except Exception:
            log.exception("unexpected error serving %s", self.client_address[0])

    # -- writing --------------------------------------------------------------
    def write(self, data: bytes) -> None:
        try:
            self.reader.send_all(data)
        except OSError as exc:
            raise ClientGone(str(exc))

    def send_json(self, status: int, body: bytes, close: bool = False,
                  extra: Optional[List[Tuple[str, str]]] = None) -> None:
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        headers.extend(extra or ())
        if close:
            headers.append(("Connection", "close"))
        self.write(encode_head(status, REASONS.get(status, ""), headers) + body)
        self.head_sent = True

    def send_error_json(self, error: HTTPError, close: bool) -> None:
        body = (error.body if error.body is not None
                else json_error_body(error.error_type, error.message))
        if self.error_shape == "anthropic":  # Anthropic's clients read only their own shape
            error_type, message = upstream_error_fields(body)
            body = json.dumps(anthropic_error_body(error.status, error_type, message)
                              ).encode("utf-8")
        self.send_json(error.status, body, close=close, extra=error.headers)

    # -- one request ----------------------------------------------------------
    def serve_one(self) -> bool:
        """Serve one request; True to keep the connection for another.

        Until the connection has authenticated, each request head (with the
        silence before it) must come within header_timeout; a refusal goes out
        at once and closes the connection, without waiting for any body."""
        server = self.server
        limits = server.config.limits
        self.head_sent = False
        self.error_shape = ""
        request = None
        if server.closing:
            return False
        keep = linger = False
        try:
            head = self.reader.read_head(limits.idle_timeout, limits.header_timeout,
                                         limits.max_request_line, limits.max_header_size,
                                         deadline=self.head_deadline(limits))
            if head is None:
                return False
            server.set_busy(self, True)
            try:  # the answer's: a client that takes nothing is cut
                self.reader.keep_send_timeout(limits.send_timeout)
            except OSError:
                pass
            request = parse_request_head(head, limits)
            request.started = time.monotonic()
            if request.body_kind == "length" and request.body_length > limits.max_body_size:
                # refused from its head, before any 100 Continue
                raise body_too_large(request.body_length, limits.max_body_size)
            self.dispatch(request)
            keep = (request.keep_alive and self.authenticated and not has_unread_body(request)
                    and not server.closing)
            # (after a WebSocket, what is left are frames: the close handshake is done)
            linger = not keep and request.status != 101 and (
                has_unread_body(request) or self.has_input())
        except ClientGone:
            if request is not None:
                request.record.client_left = True
            raise
        except HTTPError as exc:
            if self.head_sent:
                return False
            close = (exc.close or request is None or not request.keep_alive
                     or not self.authenticated or has_unread_body(request))
            if request is not None:
                request.status, request.record.error = exc.status, exc.message
            self.send_error_json(exc, close)
            keep = not close and not server.closing
            linger = close and (request is None or has_unread_body(request) or self.has_input())
        finally:
            try:
                if request is not None:
                    server.request_done(request)  # settled exactly once, however it ended
            finally:
                # after the settle: a shutdown that sees no request busy saves the files next
                server.set_busy(self, False)
        if linger:
            self.linger()
        return keep

    def head_deadline(self, limits: Limits) -> Optional[float]:
        """When the next request head must be in, or None for an authenticated
        connection (idle_timeout, then header_timeout from its first byte)."""
        if self.authenticated:
            return None
        deadline, self.first_deadline = self.first_deadline, 0.0
        return deadline or time.monotonic() + limits.header_timeout

    def has_input(self) -> bool:
        """Bytes (or EOF) from the client that no request has read yet."""
        return bool(self.reader.buf) or is_socket_stale(self.connection)

    def linger(self) -> None:
        """Closing while the client may still be sending (a refused body): send
        our FIN, then drop what arrives for a moment. Closing on unread bytes
        resets the connection, and the client could lose the answer."""
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_WR)
        self.reader.discard_until_close(DISCARD_BODY_LIMIT, time.monotonic() + LINGER_SECONDS)

    def read_body(self, request: ClientRequest, max_size: int) -> bytes:
        """The whole body, within body_timeout plus a second per BODY_MIN_RATE
        bytes it announced: a client dripping bytes cannot stretch that."""
        limits = self.server.config.limits
        if request.body_kind == "length":
            if request.body_length > max_size:
                raise body_too_large(request.body_length, max_size)
            deadline = time.monotonic() + limits.body_timeout + request.body_length / BODY_MIN_RATE
            request.body = self.reader.read_exact(request.body_length, deadline)
        elif request.body_kind == "chunked":
            request.body = read_chunked_body(self.reader, max_size, limits.body_timeout,
                                             BODY_MIN_RATE)
        request.body_read = True
        if request.body_kind != "none":
            try:  # a read near its deadline leaves a shorter timeout on the socket
                self.reader.keep_send_timeout(limits.send_timeout)
            except OSError:
                pass
        return request.body

    def dispatch(self, request: ClientRequest) -> None:
        """Route one request: operations pages, or the pipeline (section 15)."""
        server = self.server
        if not request.path.startswith("/"):
            raise bad_request("only origin-form request targets are accepted (\"/v1/...\")")
        request.path = request.record.path = canonical_path(request.path)
        self.error_shape = "anthropic" if request.path.startswith("/v1/messages") else ""
        if request.path in OPERATIONS_PATHS:
            self.serve_operations(request)
            return
        if request.path in DASHBOARD_PATHS:
            self.serve_dashboard(request)
            return
        if not request.path.startswith("/v1/"):
            raise HTTPError(404, "invalid_request_error",
                            "no such path %s: OCM serves the OpenAI API under /v1/"
                            % request.path[:200])
        if request.method not in RELAYED_METHODS:
            raise HTTPError(405, "invalid_request_error",
                            "method %s is not used by the API; use %s"
                            % (request.method, ", ".join(RELAYED_METHODS)),
                            headers=[("Allow", ", ".join(RELAYED_METHODS))])
        state = server.state  # this request's view of the config, whatever a reload does meanwhile
        user = state.users.authenticate(request.headers)
        # out of the unauthenticated share, before any body is read
        server.note_authenticated(self)
        request.record.user, request.record.user_name = user, user.name if user else ""
        if state.users.is_open:
            check_open_access(request, self.client_address[0])
        check_access(user, time.time())
        if is_websocket_upgrade(request):
            if request.path != WEBSOCKET_PATH:  # where turns can be admitted and counted
                raise HTTPError(404, "invalid_request_error", "OCM relays WebSockets on %s only"
                                % WEBSOCKET_PATH)
            self.read_body(request, DISCARD_BODY_LIMIT)
            request.keep_alive = False  # after a WebSocket, the connection is done
            with server.in_flight(user):
                serve_websocket(self, request, state, user)
            return
        with server.in_flight(user):
            if state.ledger is not None and user is not None and user.budgets:
                state.ledger.check(user)  # a budget used up is refused before the body comes
            if request.headers.has_token("expect", "100-continue") and request.body_kind != "none":
                self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.read_body(request, server.config.limits.max_body_size)
            # (parsed there, so that no frame here holds it while the answer streams)
            self.serve_model_request(request, state, user)

    def parse_model_request(self, request: ClientRequest,
                            user: Optional[User]) -> Optional[RequestBody]:
        """The body, parsed once: what the request may run is decided from it."""
        if request.method != "POST" and not request.body:
            return None
        server = self.server
        body = parse_request_body(request.body, request.headers.get("content-encoding", ""),
                                  server.config.limits.max_body_size)
        # what leaving before the usage costs: the text upstream reads
        request.record.input_estimate = body.size // 4 + server.conversations.context_estimate(
            user.name if user is not None else "", body)
        return body

    def serve_model_request(self, request: ClientRequest, state: State,
                            user: Optional[User]) -> None:
        """One HTTP request through the pipeline: admit, send, relay. The
        record is settled once the answer is out (or failed)."""
        body = self.parse_model_request(request, user)
        endpoint = ENDPOINTS.get(request.path, "")
        if endpoint == "count_tokens" and request.method == "POST":
            self.answer_count_tokens(request, body)
            return
        call = ModelRequest(self.server, state, user, request.record, body)
        translation = refusal = None
        if request.method in ("GET", "POST"):
            try:
                translation = translate_for_backend(endpoint, request.query, body,
                                                    state.config.model_map)
            except HTTPError as exc:  # it matters only where the backend needs the translation
                refusal = exc
        if translation is not None and body is not None and translation.model:
            if translation.model != body.model:
                request.record.asked_model = body.model
            # the model allow-list checks what is used
            body.model = request.record.model = translation.model
        call.admit()
        pool = state.pool_for(user)

        def attempt(account: Account, login: Login) -> UpstreamExchange:
            if refusal is not None and login.mode == "chatgpt":
                raise refusal
            rewrite = translation if translation is not None and login.mode == "chatgpt" else None
            if rewrite is None and request.record.asked_model:  # sent as asked: check what is sent
                check_model(user, request.record.asked_model)
            path, query, payload, client_headers = (request.path, request.query, request.body,
                                                    request.headers)
            if request.body_kind == "none" and request.method not in ("POST", "PUT", "PATCH"):
                payload = None
            if rewrite is not None:
                client_headers = translated_headers(request.headers)
                if rewrite.kind == "models":
                    path, query, payload = ("/v1/models", "client_version=" + CODEX_CLIENT_VERSION,
                                            None)
                else:  # a Responses client keeps its query; others' queries mean nothing
                    # to the backend
                    path, payload = "/v1/responses", json.dumps(rewrite.body).encode("utf-8")
                    query = query if rewrite.kind == "responses" else ""
            options = (body.data.get("stream_options")
                       if body is not None and body.data is not None else None)
            options = options if isinstance(options, dict) else {}
            if rewrite is None and request.path in USAGE_WHEN_ASKED and body is not None and \
                    body.stream and not body.problem and options.get("include_usage") is not True:
                # These streams report their usage only when asked: ask, or it is never counted.
                payload = json.dumps(dict(body.data,
                                          stream_options=dict(options, include_usage=True))
                                     ).encode("utf-8")
                client_headers = translated_headers(request.headers)
            base, upstream_path = state.upstream_target(login.mode, path, query)
            headers = build_upstream_headers(client_headers, state.config.headers, login,
                                             len(payload) if payload is not None else None)
            exchange = account.send(base.origin,
                                    "GET" if rewrite is not None and rewrite.kind == "models"
                                    else request.method, upstream_path, headers, payload)
            exchange.translation = rewrite
            self.server.metrics.observe_latency(exchange.latency)
            return exchange

        def strip_reasoning() -> bool:
            if translation is not None and translation.body is not None:
                stripped = without_reasoning(translation.body)
                if stripped is not None:
                    translation.body = stripped
                return stripped is not None
            stripped = (without_reasoning(body.data) if body is not None and body.data is not None
                        else None)
            if (stripped is None
                    or request.headers.get("content-encoding", "identity").lower() != "identity"):
                return False
            request.body = json.dumps(stripped).encode("utf-8")
            return True

        account, exchange = call.send(pool,
                                      session_key(request.headers, body) if pool.is_pool else "",
                                      attempt, strip_reasoning)
        # no retry from here on: a thousand streams need not hold a thousand bodies
        request.body = b""
        request.record.status = exchange.status
        if 200 <= exchange.status < 300:
            request.record.week_start = week_start_from_headers(exchange.headers)
        rewrite = exchange.translation
        if rewrite is not None and (rewrite.kind != "responses" or not rewrite.stream):
            self.answers.relay_translated(request, exchange, rewrite, state)
            return
        tap = None
        if body is not None and 200 <= exchange.status < 300:
            content_type = (exchange.headers.get("content-type") or "").lower()
            tap = UsageTap(request.record,
                           body.stream or content_type.startswith("text/event-stream"))
        body = call.body = None
        self.answers.relay_response(request, exchange, tap, pool)

    def answer_count_tokens(self, request: ClientRequest, body: Optional[RequestBody]) -> None:
        """Anthropic's count_tokens, answered here: an estimate, never sent upstream."""
        if body is None or body.data is None:
            raise HTTPError(400, "invalid_request_error",
                            "send the Messages request as a JSON object (%s)"
                            % (body.problem if body is not None else "it has no body"))
        self.send_json(200, json.dumps(count_message_tokens(body.data)).encode("utf-8"),
                       close=not request.keep_alive)
        request.status = 200

    def serve_dashboard(self, request: ClientRequest) -> None:
        """The dashboard (section 13b): its page, its JSON, signing in and out."""
        request.record.quiet = True  # a page that polls every few seconds is no news in the log
        # Only signing in and out reads a (small) form; any other body is left
        # unread and ends the connection, so strangers cannot park bodies here.
        body = self.read_body(request, MAX_SIGN_IN_FORM) if request.method == "POST" else b""
        status, headers, payload = dashboard_answer(self.server, request, body,
                                                    self.client_address[0], time.time())
        headers.append(("Content-Length", str(len(payload))))
        if has_unread_body(request):
            request.keep_alive = False
        if not request.keep_alive:
            headers.append(("Connection", "close"))
        self.write(encode_head(status, DASHBOARD_REASONS.get(status, ""), headers)
                   + (payload if request.method != "HEAD" else b""))
        self.head_sent = True
        request.status = status

    def serve_operations(self, request: ClientRequest) -> None:
        """/healthz (open), /metrics (metrics token or loopback), the pool status (a user's token).
        They take no body: one is left unread, and the connection closes after the answer, as
        it does for a client that has not authenticated."""
        server = self.server
        state = server.state
        if request.method not in ("GET", "HEAD"):
            raise HTTPError(405, "invalid_request_error", "use GET for %s" % request.path,
                            headers=[("Allow", "GET, HEAD")])
        content_type = "application/json"
        if request.path == HEALTH_PATH:
            request.record.quiet = True
            usable = any(a.credential.peek()[0] is not None for a in state.accounts.values())
            body = json.dumps({"status": "ok", "credential_usable": usable}).encode("utf-8")
        elif request.path == METRICS_PATH:
            server.check_metrics_access(request, self.client_address[0])
            body, content_type = (render_metrics(server).encode("utf-8"),
                                  "text/plain; version=0.0.4")
        elif request.path == USAGE_PATH:
            body = json.dumps(usage_document(server, request, self.client_address[0],
                                             time.time())).encode()
        else:
            user = state.users.authenticate(request.headers)
            server.note_authenticated(self)
            request.record.user_name = user.name if user else ""
            body = json.dumps(dict(state.pool_for(user).to_json(),
                                   user=request.record.user_name or None),
                              indent=2).encode("utf-8")
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        if has_unread_body(request) or not self.authenticated:
            request.keep_alive = False
        if not request.keep_alive:
            headers.append(("Connection", "close"))
        self.write(encode_head(200, "OK", headers) + (body if request.method == "GET" else b""))
        self.head_sent = True
        request.status = 200




# What the watcher waits for: on Linux the client's FIN itself (POLLRDHUP),
# whatever bytes it sent before; elsewhere anything readable.
HANGUP_EVENTS = getattr(select, "POLLRDHUP", 0)
WATCH_EVENTS = HANGUP_EVENTS or getattr(select, "POLLIN", 1)


class HangupWatcher:
    """One thread that notices clients hanging up while their stream waits on
    upstream, and cuts that upstream connection at once (it is billed while it
    generates).

    On Linux it waits for the client's FIN, so a client that sends bytes during
    its stream (a pipelined request) is still watched. Elsewhere it waits for
    readable bytes, and a client that sends some is watched no longer: its
    hang-up is then noticed at the next write. The thread serves every stream,
    so nothing that happens to one of them may end it."""

    def __init__(self):
        self._poll = select.poll() if hasattr(select, "poll") else None  # else select() (Windows)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_fd = self._wake_r.fileno()
        if self._poll is not None:
            self._poll.register(self._wake_fd, select.POLLIN)
        self._watched = {}  # type: Dict[int, Tuple[socket.socket, StreamContext]]
        self._lock = threading.Lock()
        self._thread = None
        self._closed = False

    def watch(self, sock: socket.socket, context: StreamContext) -> None:
        with self._lock:
            fd = sock.fileno()
            if self._closed or fd < 0:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ocm-hangup", daemon=True)
                self._thread.start()
            self._watched[fd] = (sock, context)
            if self._poll is not None:
                self._poll.register(fd, WATCH_EVENTS)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")  # a poll in progress sees only the descriptors it started with

    def unwatch(self, sock: socket.socket, context: StreamContext) -> None:
        with context.lock:
            context.active = False
        self._forget(sock.fileno(), context)

    def _forget(self, fd: int, context: StreamContext) -> None:
        with self._lock:
            entry = self._watched.get(fd)
            if entry is not None and entry[1] is context:
                del self._watched[fd]
                if self._poll is not None:
                    with contextlib.suppress(KeyError, ValueError, OSError):
                        self._poll.unregister(fd)

    def _wait(self, timeout: float) -> List[Tuple[int, int]]:
        if self._poll is not None:
            return self._poll.poll(timeout * 1000)
        with self._lock:
            fds = [self._wake_fd] + list(self._watched)
        readable, _, _ = select.select(fds, [], [], timeout)
        return [(fd, WATCH_EVENTS) for fd in readable]

    def _run(self) -> None:
        while not self._closed:
            try:
                for fd, _ in self._wait(1.0):
                    if fd == self._wake_fd:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                    else:
                        self._check(fd)
            except Exception:  # one stream's trouble must not end the watch over all the others
                log.exception("hang-up watcher: unexpected error; still watching")
                time.sleep(0.05)

    def _check(self, fd: int) -> None:
        with self._lock:
            entry = self._watched.get(fd)
        if entry is None:
            return
        sock, context = entry
        with context.lock:  # while active, the handler has not let go of this socket
            gone = client_has_left(sock) if context.active else False  # else: only forget it
        if gone is None:
            return
        self._forget(fd, context)
        if gone:
            context.hang_up()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(timeout=2)
        self._wake_r.close()
        self._wake_w.close()


def client_has_left(sock: socket.socket) -> Optional[bool]:
    """True: the client closed or reset. False: it sent bytes, and this
    platform cannot see a FIN behind them. None: nothing after all."""
    if HANGUP_EVENTS:
        try:
            poller = select.poll()
            poller.register(sock.fileno(), HANGUP_EVENTS)
            return True if poller.poll(0) else None
        except (OSError, ValueError):
            return True
    return peek_is_closed(sock)


def peek_is_closed(sock: socket.socket) -> Optional[bool]:
    """Look at the raw TCP stream without consuming it (works under TLS too).
    True: the peer closed. False: it sent data. None: nothing there after all."""
    try:
        raw = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.fileno())
    except OSError:
        return True
    try:
        data = raw.recv(1, socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0))
        return not data
    except BlockingIOError:
        return None
    except OSError:
        return True
    finally:
        raw.detach()


# == 17. Server ==============================================================

class ServerTLS:
    """TLS for clients: a context from the configured certificate and key,
    rebuilt when their files change on disk, so a renewed certificate is used
    by new connections without a restart."""

    def __init__(self, config: TLSConfig):
        if ssl is None:
            raise ConfigError("tls: this Python has no ssl module "
                              "(OpenWrt: opkg install python3-openssl)")
        self.config = config
        self._lock = threading.Lock()
        self._files = [p for p in (config.certificate_path, config.key_path) if p]
        self._files_id = self._stat_files()
        self._context = self._build()

    def _stat_files(self) -> List[Optional[Tuple[int, int, int]]]:
        return [_file_id(path) for path in self._files]

    def _build(self):
        config = self.config
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        versions = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
        context.minimum_version = versions.get(config.min_version, ssl.TLSVersion.TLSv1_2)
        if config.max_version:
            context.maximum_version = versions[config.max_version]
        context.set_alpn_protocols(["http/1.1"])  # the only protocol OCM serves
        inline_dir = (tempfile.mkdtemp(prefix="ocm-tls-") if config.certificate or config.key
                      else None)
        try:
            cert = config.certificate_path or self._write_inline(inline_dir, "cert.pem",
                                                                 config.certificate)
            key = config.key_path or self._write_inline(inline_dir, "key.pem", config.key)
            for where, path in (("certificate_path", cert), ("key_path", key)):
                if os.path.isdir(path):
                    raise ConfigError("tls.%s: %s is a directory; name the PEM file in it"
                                      % (where, path))
                if not os.path.isfile(path):
                    raise ConfigError("tls.%s: %s does not exist" % (where, path))

            # else OpenSSL asks on the terminal, or fails obscurely
            def refuse_passphrase() -> str:
                raise ConfigError("tls: the private key is encrypted, and OCM cannot ask for its "
                                  "pass phrase; decrypt it once: "
                                  "openssl pkey -in KEY -out KEY.plain")

            try:
                context.load_cert_chain(cert, key, password=refuse_passphrase)
            except ssl.SSLError as exc:
                reason = exc.reason or str(exc)
                if "MISMATCH" in reason.upper():
                    reason = "the key does not belong to the certificate"
                raise ConfigError("tls: cannot use the certificate and key: %s" % reason)
            except OSError as exc:
                raise ConfigError("tls: cannot read the certificate or key: %s"
                                  % (exc.strerror or exc))
        finally:
            if inline_dir:
                shutil.rmtree(inline_dir, ignore_errors=True)
        return context

    @staticmethod
    def _write_inline(directory: Optional[str], name: str, pem: str) -> str:
        path = os.path.join(directory or "", name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(pem)
        return path

    def context(self):
        files_id = self._stat_files()
        with self._lock:
            if files_id != self._files_id:
                self._files_id = files_id
                try:
                    self._context = self._build()
                    log.info("tls: certificate files changed; new connections use them")
                except ConfigError as exc:
                    log.warning("%s; still serving the previous certificate", exc)
            return self._context

    def wrap(self, sock: socket.socket, timeout: float):
        """The TLS handshake, in the connection's own thread and bounded, so a
        client that stalls mid-handshake holds up nobody else."""
        sock.settimeout(timeout)
        tls_sock = self.context().wrap_socket(sock, server_side=True,
                                              do_handshake_on_connect=False)
        tls_sock.do_handshake()
        return tls_sock


def listen_address(host: str, port: int) -> Tuple[int, str]:
    """(address family, address) for ``listen``: an IPv4 or IPv6 literal, or a host name."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
        return (socket.AF_INET6 if ip.version == 6 else socket.AF_INET), str(ip)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError("listen: cannot resolve %r: %s" % (host, exc.strerror))
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr[0]


def address_group(host: str) -> str:
    """What counts as one client address for the connection shares: an IPv4
    address, or an IPv6 /64 (one host commonly holds a whole one)."""
    if ":" not in host:
        return host
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.ip_network((ip, IPV6_ADDRESS_PREFIX), strict=False))


class ConnectionGate:
    """Who holds the connection slots: how many each client address, and how
    many have not authenticated yet. The accept loop asks before it starts a
    thread, so a stranger's silent or dripping connections hold at most their
    address's share, and together at most the unauthenticated share: a person
    with a token, from another address, still gets in."""

    def __init__(self):
        self._lock = threading.Lock()
        self._per_address = {}  # type: Dict[str, int]
        self._unauthenticated = set()  # type: set  # accepted sockets, until they authenticate

    def admit(self, sock: socket.socket, host: str, limits: Limits) -> str:
        """"" when ``sock`` may have a thread; else what is full."""
        group = address_group(host)
        with self._lock:
            held = self._per_address.get(group, 0)
            if held >= limits.per_address:
                return "%d connections from one address" % limits.per_address
            if len(self._unauthenticated) >= limits.unauthenticated:
                return "%d connections that have not authenticated" % limits.unauthenticated
            self._per_address[group] = held + 1
            self._unauthenticated.add(sock)
        return ""

    def authenticated(self, sock: socket.socket) -> None:
        with self._lock:
            self._unauthenticated.discard(sock)

    def leave(self, sock: socket.socket, host: str) -> None:
        group = address_group(host)
        with self._lock:
            self._unauthenticated.discard(sock)
            held = self._per_address.get(group, 0) - 1
            if held > 0:
                self._per_address[group] = held
            else:
                self._per_address.pop(group, None)

    def counts(self) -> Tuple[Dict[str, int], int]:
        """(connections per address, connections not authenticated yet)."""
        with self._lock:
            return dict(self._per_address), len(self._unauthenticated)


class OCMServer(ThreadingHTTPServer):
    """The listening server. It owns the running State (config, users,
    accounts, pools, budgets), what outlives a reload (usage books, metrics,
    in-flight counts, live connections and sessions) and the threads; it
    settles every request; ``close()`` releases everything."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024
    _gate = None  # type: Optional[ConnectionGate]

    def __init__(self, config: Config, bind_and_activate: bool = True,
                 usage_save_interval: float = 60.0, file_check_interval: float = 1.0):
        self.tls = ServerTLS(config.tls) if config.tls.enabled else None
        self.books = UsageBooks(usage_save_interval)
        self.state = build_state(config, self.books, None, file_check_interval)
        apply_account_settings(self.state)
        self.concurrency = ConcurrencyLimit()
        self.metrics = Metrics()
        self.started_at = time.time()
        self.history = History(history_path(config), PeriodClock(config.timezone))
        self.history.load(self.started_at)
        self.dashboard_sessions = DashboardSessions()
        self.conversations = Conversations()
        self.last_reload = None  # type: Optional[Dict[str, Any]]  # when, and what came of it
        self.save_interval = usage_save_interval
        self.file_check_interval = file_check_interval
        # replaced by a reload; in-flight requests settle there
        self._old_ledgers = []  # type: List[BudgetLedger]
        self._settle_lock = threading.Lock()
        self._housekeeper = None  # type: Optional[threading.Thread]
        self._stop_housekeeping = threading.Event()
        self.watcher = HangupWatcher()
        self.closing = False
        self._handlers = set()  # live client connections
        self._connections = 0   # accepted and not yet finished (the cap counts these)
        self._connections_lock = threading.Lock()
        self._websockets = set()  # type: set  # live WebSocket sessions
        self._handlers_changed = threading.Condition()
        try:
            self.address_family, address = listen_address(config.listen, config.listen_port)
            try:
                super().__init__((address, config.listen_port), OCMHandler, bind_and_activate)
            except OSError as exc:
                raise ListenError("cannot listen on %s:%d: %s"
                                  % (config.listen, config.listen_port, exc.strerror or exc))
        except BaseException:
            self.watcher.close()
            for account in self.state.accounts.values():
                account.close()
            raise
        self._housekeeper = threading.Thread(target=self._housekeeping, name="ocm-housekeeping",
                                             daemon=True)
        self._housekeeper.start()

    # -- the running state ------------------------------------------------------
    # Read-only views of the current State, for operations pages and tests.
    config = property(lambda self: self.state.config)
    users = property(lambda self: self.state.users)
    accounts = property(lambda self: self.state.accounts)
    pools = property(lambda self: self.state.pools)
    ledger = property(lambda self: self.state.ledger)

    @property
    def credential(self) -> Optional[Credential]:
        """The single account's login, without a credentials list."""
        return None if self.config.credentials else self.accounts["default"].credential

    @property
    def usage(self) -> Optional[UsageBook]:
        return None if self.config.credentials else self.accounts["default"].usage

    def reload(self, config: Config) -> None:
        """SIGHUP: build the new config's State completely, then swap it in
        with one assignment. If building fails, nothing that runs changed.
        Requests and streams in flight carry on with the State they started
        with; accounts the new config dropped close when their last request
        ends; WebSocket sessions of people no longer configured are closed."""
        for key in ("listen", "listen_port", "tls"):
            if getattr(config, key) != getattr(self.config, key):
                log.warning("reload: %s changed; restart OCM to apply that", key)
        old = self.state
        new = build_state(config, self.books, old, self.file_check_interval)
        # From here on nothing can fail: the new state takes over.
        apply_account_settings(new)
        for tag, pool in new.pools.items():  # conversations stay where they were
            if tag in old.pools:
                pool.adopt_sessions(old.pools[tag])
        if new.ledger is not None and new.ledger is old.ledger:
            new.ledger.clock = PeriodClock(config.timezone)
        elif old.ledger is not None:
            self._old_ledgers.append(old.ledger)
        self.state = new
        self.history.path = history_path(config)
        self.history.set_clock(PeriodClock(config.timezone))
        admin = admin_digest(config)

        def still_signed_in(user: Optional[User], digest: bytes) -> bool:
            return new.users.current(user) is not None if user is not None else digest == admin

        ended = self.dashboard_sessions.keep_only(still_signed_in, time.time())
        if ended:
            log.info("reload: ended %d dashboard session%s of people or tokens no longer there",
                     ended, "" if ended == 1 else "s")
        kept = set(new.accounts.values())
        for account in old.accounts.values():
            if account not in kept:
                account.retire()
        with self._handlers_changed:
            sessions = list(self._websockets)
        for session in sessions:
            if session.user is not None and new.users.current(session.user) is None:
                log.info("reload: %s is no longer in the config; closing their WebSocket",
                         session.user.name)
                session.end_for_person("your access to OCM was removed by its owner")
        log.info("config reloaded: %d user%s, %d account%s", len(config.users),
                 "" if len(config.users) == 1 else "s",
                 len(new.accounts), "" if len(new.accounts) == 1 else "s")

    def _housekeeping(self) -> None:
        """Polls the usage endpoint for pooled accounts, each on its own schedule
        (poll_interval, with backoff after failures); saves the budgets; writes
        access lines that waited through a quiet moment."""
        saved_at = time.monotonic()
        while True:
            state = self.state
            intervals = [a.poll_interval for a in state.accounts.values() if a.poll_interval]
            if self._stop_housekeeping.wait(max(0.05, min(min(intervals) / 4 if intervals else 1.0,
                                                          ACCESS_LOG_DELAY))):
                return
            flush_access_log(only_if_due=True)
            self.cut_stalled_websockets(time.monotonic())
            now = time.time()
            for account in list(state.accounts.values()):
                if (account.poll_interval and account.next_poll_at <= now
                        and not self._stop_housekeeping.is_set()):
                    account.poll(state.usage_url)
            if time.monotonic() - saved_at >= self.save_interval:
                saved_at = time.monotonic()
                self.save_ledgers()
                self.history.save_if_dirty(time.time())

    def save_ledgers(self) -> None:
        for ledger in [self.state.ledger] + self._old_ledgers:
            if ledger is not None:
                ledger.save_if_dirty()

    # -- admission and settling ---------------------------------------------------
    @contextlib.contextmanager
    def in_flight(self, user: Optional[User]):
        """Hold one of the user's max_concurrent places for a request or WebSocket."""
        if user is not None:
            self.concurrency.acquire(user)
        try:
            yield
        finally:
            if user is not None:
                self.concurrency.release(user)

    def request_done(self, request: ClientRequest) -> None:
        self.settle(request.record)

    def settle(self, record: RequestRecord) -> None:
        """The one accounting entry point, exactly once per HTTP request or
        WebSocket turn, also when the client hung up after the final event:
        the account's usage book and share, the budgets, the metrics and the
        access line learn what it cost here."""
        with self._settle_lock:
            if record.settled:
                return
            record.settled = True
        if not record.status:
            record.status = 499  # the client went away before any answer (nginx's code)
        usage, account = record.usage, record.account
        if usage is None and account is not None and answered_without_usage(record):
            usage = record.usage = estimated_usage(record)
        try:
            if usage is not None and (usage.input_tokens or usage.output_tokens):
                self._book(record, usage, account)
            elif record.reservation is not None:
                record.reservation.ledger.release(record.reservation)
        finally:
            if account is not None and record.holds_account:
                account.end()
        # the model a client named is its own words until upstream answered it
        self.metrics.add("ocm_requests_total", user=record.user_name or "-",
                         status=str(record.status),
                         model=usage.model if usage is not None else "-")
        write_access_line(record, self.config.log_format)
        if record.path.startswith("/v1/"):  # model requests and WebSocket turns, not the pages
            self.history.record(record, time.time(), time.monotonic() - record.started)

    def _book(self, record: RequestRecord, usage: UsageRecord, account: Optional[Account]) -> None:
        # A warm-up (generate: false) has no tokens and is not booked; sing-box skips these too.
        tier = normalize_service_tier(usage.service_tier)
        cost = raw_cost(usage.input_tokens, usage.output_tokens, usage.cached_tokens, usage.model,
                        tier, context_window_for(usage.model, tier, usage.input_tokens))
        name = record.user_name
        self.conversations.remember(name, usage)
        if account is not None:
            if account.usage is not None:
                account.usage.record(name, usage, record.week_start)
            account.note_completion(name or "-", cost)
        record.model = usage.model
        record.input_tokens, record.cached_tokens = usage.input_tokens, usage.cached_tokens
        record.output_tokens, record.cost = usage.output_tokens, cost
        if record.reservation is not None:
            record.reservation.ledger.settle(record.reservation, cost,
                                             usage.input_tokens + usage.output_tokens)
        labels = {"user": name or "-", "model": usage.model}
        self.metrics.add("ocm_responses_total", **labels)
        self.metrics.add("ocm_cost_usd_total", cost, **labels)
        for kind, count in (("input", usage.input_tokens), ("cached", usage.cached_tokens),
                            ("output", usage.output_tokens)):
            self.metrics.add("ocm_tokens_total", count, kind=kind, **labels)
        log.debug("usage %s: %s %s in=%d cached=%d out=%d", name or "-", usage.model, tier,
                  usage.input_tokens, usage.cached_tokens, usage.output_tokens)

    def check_metrics_access(self, request: ClientRequest, client_ip: str) -> None:
        """The box itself (see is_loopback_request), or the bearer of metrics_token."""
        if is_loopback_request(request, client_ip):
            return
        token = self.config.metrics_token
        presented = (request.headers.get("authorization") or "").partition(" ")[2].strip()
        if token and presented:
            expected = User("metrics", token).token_digest
            if hmac.compare_digest(expected, token_digest(presented)):
                return
        raise HTTPError(403, "permission_error", "metrics are served to the box itself (a "
                        "loopback client asking for a loopback name, not through a proxy) and "
                        "to the metrics_token of the config")

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls getfqdn(), a DNS lookup that can stall
        # start-up for seconds on a box without DNS. Skip it.
        if self.address_family == socket.AF_INET6 and self.server_address[0] == "::":
            with contextlib.suppress(OSError, AttributeError):  # dual-stack where the OS allows
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[0], self.server_address[1]

    @property
    def url(self) -> str:
        host = self.server_address[0]
        if ":" in host:
            host = "[%s]" % host
        return "%s://%s:%d" % ("https" if self.tls else "http", host, self.server_address[1])

    def run_websocket(self, session: WebSocketSession) -> None:
        with self._handlers_changed:
            if self.closing:
                session.close(1001, "server shutting down")
            self._websockets.add(session)
        # A reload that swapped the state before the session was listed could
        # not see it: look at the current state once it is listed.
        if session.user is not None and self.state.users.current(session.user) is None:
            session.end_for_person("your access to OCM was removed by its owner")
        try:
            session.run()
        finally:
            with self._handlers_changed:
                self._websockets.discard(session)

    def cut_stalled_websockets(self, now: float) -> None:
        """Cut every session with a peer that took no bytes for send_timeout: a
        client that stops reading would otherwise hold the upstream pump (and
        its billed generation) for ever. The housekeeping thread calls this."""
        with self._handlers_changed:
            sessions = list(self._websockets)
        for session in sessions:
            for end in (session.client, session.upstream):
                if end.is_stalled(now):
                    log.info("websocket: %s took nothing for %g s; closing the session",
                             end.name, end.send_timeout)
                    # The stalled side ended it, whichever pump wakes first.
                    session.note_end(end)
                    session.cut()
                    break
            else:
                if session.is_idle(now):
                    log.info("websocket: idle for %d minutes; closing the session",
                             WS_IDLE_LIMIT // 60)
                    session.close(1001, "idle")

    # -- the connection cap -----------------------------------------------------
    @property
    def gate(self) -> ConnectionGate:
        if self._gate is None:  # first used by the accept loop, before any handler thread
            self._gate = ConnectionGate()
        return self._gate

    def process_request(self, request, client_address) -> None:
        """A thread per connection, up to limits.max_connections, and up to the
        shares of one address and of connections not authenticated yet; past
        that a fast 503 from the accept loop itself, without a thread."""
        limits = self.config.limits
        with self._connections_lock:
            full = self._connections >= limits.max_connections
            if not full:
                self._connections += 1
        refusal = "%d connections" % limits.max_connections if full else \
            self.gate.admit(request, client_address[0], limits)
        if not refusal:
            try:
                super().process_request(request, client_address)
                return
            except RuntimeError:  # the OS would not give us another thread
                self.gate.leave(request, client_address[0])
                refusal = "%d connections" % limits.max_connections
        if not full:
            with self._connections_lock:
                self._connections -= 1
        self.refuse_busy(request, refusal)
        self.shutdown_request(request)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.gate.leave(request, client_address[0])
            with self._connections_lock:
                self._connections -= 1

    def note_authenticated(self, handler: OCMHandler) -> None:
        """``handler``'s client showed a valid token (or access is open): its
        connection leaves the unauthenticated share and may idle between
        requests for idle_timeout. Called right after authentication."""
        if not handler.authenticated:
            handler.authenticated = True
            self.gate.authenticated(handler.request)

    def refuse_busy(self, sock: socket.socket, what: str = "") -> None:
        if self.tls is not None:
            return  # a plain answer means nothing to a TLS client; closing says enough
        body = json_error_body("api_error", "OCM is serving its limit of %s; try again shortly"
                               % (what or "%d connections" % self.config.limits.max_connections))
        head = encode_head(503, REASONS[503], [("Content-Type", "application/json"),
                                                ("Content-Length", str(len(body))),
                                                ("Retry-After", "1"), ("Connection", "close")])
        with contextlib.suppress(OSError):
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                # what already arrived; unread data would turn our close into a reset
                sock.recv(65536)
            sock.send(head + body)

    # -- live connections (for a clean shutdown) -------------------------------
    def track(self, handler: OCMHandler) -> None:
        with self._handlers_changed:
            self._handlers.add(handler)

    def untrack(self, handler: OCMHandler) -> None:
        with self._handlers_changed:
            self._handlers.discard(handler)
            self._handlers_changed.notify_all()

    def set_busy(self, handler: OCMHandler, busy: bool) -> None:
        with self._handlers_changed:
            handler.busy = busy
            if not busy:
                self._handlers_changed.notify_all()

    def drain(self, timeout: float) -> None:
        """Close idle connections now; give requests in flight ``timeout``
        seconds to finish (their usage gets recorded); then cut the rest."""
        deadline = time.monotonic() + timeout
        sessions_deadline = time.monotonic() + min(timeout, WS_SHUTDOWN_WAIT)
        with self._handlers_changed:
            self.closing = True
            for session in self._websockets:
                session.close(1001, "server shutting down")
            while True:
                for handler in [h for h in self._handlers if not h.busy]:
                    handler.interrupt()
                if time.monotonic() >= sessions_deadline:
                    for session in self._websockets:
                        session.cut()
                busy = [h for h in self._handlers if h.busy]
                remaining = deadline - time.monotonic()
                if not busy or remaining <= 0:
                    break
                self._handlers_changed.wait(min(remaining, 0.1))
        for handler in busy:
            log.warning("shutting down: cutting a request still in flight from %s",
                        handler.client_address[0])
            handler.interrupt()
        # A cut request settles (an estimate) as its thread wakes: a moment for
        # that, or it would come after close() saved the budget and usage files.
        settle_deadline = time.monotonic() + CUT_SETTLE_WAIT
        with self._handlers_changed:
            while any(h.busy for h in self._handlers):
                remaining = settle_deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._handlers_changed.wait(min(remaining, 0.1))

    def close(self, drain_timeout: float = 5.0) -> None:
        """Stop everything this server owns. Call after shutdown()."""
        if self.state.ledger is not None:
            self.state.ledger.stop()
        self.drain(drain_timeout)
        self._stop_housekeeping.set()
        if self._housekeeper is not None:
            self._housekeeper.join(timeout=POLL_TIMEOUT + 1)
        self.watcher.close()
        self.server_close()
        for account in self.state.accounts.values():
            account.retire()
        for book in self.books.books():  # retired accounts' books still open after a cut request
            book.close()
        self.save_ledgers()
        self.history.save_if_dirty(time.time())


def apply_account_settings(state: State) -> None:
    """Reserves and poll intervals, which a reload may change on accounts it keeps."""
    for tag, (reserve_5h, reserve_weekly, interval) in account_settings(state.config).items():
        account = state.accounts[tag]
        account.reserve_5h, account.reserve_weekly, account.poll_interval = (
            reserve_5h, reserve_weekly, interval)


# == 18. CLI =================================================================

def describe_credential(credential: Credential, now: float) -> str:
    login, problem = credential.peek()
    if login is None or problem:
        return "unusable: " + problem
    parts = [login.mode_name]
    if login.mode == "chatgpt":
        if login.email:
            parts.append(login.email)
        if login.plan:
            parts.append("plan " + login.plan)
        if login.account_id:
            parts.append("account " + login.account_id)
        if login.expires_at is not None:
            left = login.expires_at - now
            parts.append("access token expires in %dm" % (left // 60) if left > 0
                         else "access token expired")
    return ", ".join(parts)


def run_check(config: Config) -> int:
    print("config:      %s" % (config.source or "(defaults)"))
    print("listen:      %s:%d" % (config.listen, config.listen_port))
    print("users:       %s" % (", ".join("%s (%s)" % (u.name, u.credential) if u.credential
                                         else u.name for u in config.users)
                               or "none (open access)"))
    print("upstream:    %s" % config.upstream.chatgpt_url)
    problems = 0
    usages = {c.tag: c.usages_path for c in config.credentials} if config.credentials else {
        "default": config.usages_path}
    for tag, path, _ in account_files(config):
        with logging_disabled():  # said once, below, not also as a log line
            credential = Credential(path, config.upstream.token_url, open_url=None, tag=tag)
            login, problem = credential.peek()
        label = "credential:" if not config.credentials else "account %s:" % tag
        print("%-12s %s" % (label, path))
        if login is None:
            print("ocm: %scredential unavailable: %s" % ("account %s: " % tag if config.credentials
                                                        else "", problem), file=sys.stderr)
            problems += 1
        else:
            print("             %s" % describe_credential(credential, time.time()))
        if usages.get(tag):
            print("usage file:  %s" % usages[tag])
            try:
                check_writable_location(usages[tag])
            except ConfigError as exc:
                print("ocm: %s" % exc, file=sys.stderr)
                problems += 1
    for c in config.credentials:
        if c.is_pool:
            print("pool %s:     %s of %s (%s), polled every %gs" % (
                c.tag, c.type, ", ".join(c.members),
                c.strategy if c.type == "balancer" else "in order", c.poll_interval))
    # What OCMServer would refuse at start, short of opening the port (OCM may be running on it).
    checks = [("python:", lambda: require_ssl_for(config), "ssl available")]
    if config.budgets_path:
        checks.append(("budgets:",
                       lambda: check_writable_location(config.budgets_path, "budgets_path"),
                       config.budgets_path))
    if config.tls.enabled:
        checks.append(("tls:", lambda: ServerTLS(config.tls), "certificate and key usable"))
    for label, check, summary in checks:
        try:
            check()
            print("%-12s %s" % (label, summary))
        except ConfigError as exc:
            print("ocm: %s" % exc, file=sys.stderr)
            problems += 1
    return 2 if problems else 0


@contextlib.contextmanager
def logging_disabled():
    """For commands that report a problem themselves: no second copy as a log line."""
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def return_freed_memory() -> None:
    """Give the C heap's free pages back to the system (glibc only, best effort).
    Compiling ocm.py leaves ~9 MB of freed memory that RSS would count forever;
    a box with 64 MB of RAM notices."""
    import gc
    gc.collect()  # start-up garbage first, or its pages are still in use
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (ImportError, OSError, AttributeError):
        pass  # musl, no ctypes, not Linux: nothing to give back this way


def reload_config(server: OCMServer) -> None:
    """Re-read the config file; keep the running one if the new one is wrong."""
    path = server.config.source
    if not path:
        log.warning("SIGHUP: OCM runs without a config file; nothing to reload")
        return
    try:
        config = load_config(path)
        server.reload(config)
    except ConfigError as exc:
        log.error("SIGHUP: %s is not valid (%s); still running the previous config", path, exc)
        server.last_reload = {"at": time.time(), "ok": False, "message": "not valid: %s" % exc}
        return
    except OSError as exc:  # a file the new config names cannot be used
        log.error("SIGHUP: cannot apply %s (%s); still running the previous config", path,
                  exc.strerror or exc)
        server.last_reload = {"at": time.time(), "ok": False, "message": "cannot apply it: %s"
                              % (exc.strerror or exc)}
        return
    users, accounts = len(config.users), len(server.accounts)
    server.last_reload = {"at": time.time(), "ok": True, "message": "%d user%s, %d account%s" % (
        users, "" if users == 1 else "s", accounts, "" if accounts == 1 else "s")}
    configure_access_log(config.log_format)


def configure_access_log(log_format: str) -> None:
    """Access lines on stderr: after a timestamp, or as pure JSON lines."""
    handler = access_log_handler()
    if handler is None:
        handler = BatchedStreamHandler(sys.stderr)
        access_log.addHandler(handler)
        access_log.propagate = False
        # the log's own lines keep their order with them
        for other in logging.getLogger().handlers:
            other.addFilter(_write_access_lines_first)
    handler.setFormatter(logging.Formatter("%(message)s" if log_format == "json"
                                           else "%(asctime)s %(message)s"))


def _write_access_lines_first(record: logging.LogRecord) -> bool:
    flush_access_log()
    return True


def configure_logging(level: str) -> None:
    # The logging HOWTO's optimisations: our format uses no caller, thread or
    # process fields, and gathering them costs every request a few microseconds.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.basicConfig(level=getattr(logging, level.upper()),
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)


def root_warning(euid: Optional[int]) -> str:
    """What to say when started as root, once at start (not at each reload)."""
    if euid != 0:
        return ""
    return ("running as root, which OCM does not need: a flaw in it would reach the whole box. "
            "Run it as a user of its own, as contrib/ocm.service does (User=ocm; see "
            "docs/services.md)")


def serve(config: Config) -> int:
    """Run until SIGTERM or SIGINT; 0 on a clean stop."""
    if config.limits.thread_stack_size:
        threading.stack_size(config.limits.thread_stack_size)
    try:
        server = OCMServer(config)
    except ConfigError as exc:
        print("ocm: config error: %s" % exc, file=sys.stderr)
        return 2
    except ListenError as exc:
        print("ocm: %s" % exc, file=sys.stderr)
        return 2
    except OSError as exc:
        print("ocm: cannot start: %s" % (exc.strerror or exc), file=sys.stderr)
        return 2
    stop = threading.Event()

    reload_wanted = threading.Event()

    def on_signal(signum, _frame):
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    def on_hangup(_signum, _frame):
        reload_wanted.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    if hasattr(signal, "SIGHUP"):
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hangup)
    configure_access_log(config.log_format)
    if server.credential is not None:
        login, problem = server.credential.peek()
        mode = login.mode_name if login else "no usable credential yet (%s)" % problem
    else:
        usable = sum(a.credential.peek()[0] is not None for a in server.accounts.values())
        pools = sum(p.is_pool for p in server.pools.values())
        mode = "%d accounts, %d usable, %d pool%s" % (len(server.accounts), usable, pools,
                                                      "" if pools == 1 else "s")
    users = len(config.users)
    print("OCM %s listening on %s/v1 (%s, %s)" % (
        __version__, server.url, mode,
        "%d user%s" % (users, "" if users == 1 else "s") if users else "no users: open access"),
        flush=True)
    if not users and config.listen not in ("127.0.0.1", "::1", "localhost"):
        log.warning("no users configured and listening on %s: anyone who can reach this port "
                    "uses the owner's subscription", config.listen)
    warning = root_warning(os.geteuid() if hasattr(os, "geteuid") else None)
    if warning:
        log.warning("%s", warning)
    # the accept loop sees a shutdown only when its select times out: 0.1 s keeps a
    # stop (SIGTERM, a service restart) prompt for the price of ten cheap wake-ups a second
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              name="ocm-accept", daemon=True)
    thread.start()
    return_freed_memory()
    try:
        while not stop.wait(0.2):
            if reload_wanted.is_set():
                reload_wanted.clear()
                reload_config(server)
    finally:
        server.shutdown()
        thread.join()
        server.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("stopped")
    return 0


def _usage_sources(path: str) -> Tuple[List[Tuple[str, str]], Optional[Config]]:
    """[(account, usage file)]: a usage file as given, or the usages_path of a
    config file (of each account, with a credentials list); and the config."""
    try:
        with open(path, "rb") as fh:
            text = fh.read().decode("utf-8-sig")
        data = parse_json(text)
    except OSError as exc:
        raise ConfigError("cannot read %s: %s" % (path, exc.strerror or exc))
    except UnicodeDecodeError:
        raise ConfigError("%s: not UTF-8 text" % path)
    except ValueError as exc:
        raise ConfigError("%s: %s" % (path, describe_json_error(text, exc)))
    if isinstance(data, dict) and ("combinations" in data or "costs" in data):
        return [("", path)], None
    config = config_from_dict(data, source=path)
    if config.credentials:
        sources = [(c.tag, c.usages_path) for c in config.credentials
                   if not c.is_pool and c.usages_path]
    else:
        sources = [("", config.usages_path)] if config.usages_path else []
    if not sources:
        raise ConfigError("%s has no usages_path; give the usage file itself" % path)
    return sources, config


def fetch_live_usage(config: Config, timeout: float = 2.0) -> Optional[Dict[str, Any]]:
    """The running OCM's own figures (GET /ocm/v1/usage on loopback), or None when
    none answers there: not running, listening on another address, or older."""
    if not config.listen_port:
        return None
    host = "::1" if ":" in config.listen else "127.0.0.1"
    if not config.tls.enabled:
        conn = http.client.HTTPConnection(host, config.listen_port, timeout=timeout)
    elif ssl is None:
        return None
    else:  # the certificate names the box, not 127.0.0.1; nothing secret goes either way
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        conn = http.client.HTTPSConnection(host, config.listen_port, timeout=timeout,
                                           context=context)
    try:
        conn.request("GET", USAGE_PATH)
        response = conn.getresponse()
        document = parse_json(response.read().decode("utf-8")) if response.status == 200 else None
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        conn.close()
    if not isinstance(document, dict) or not isinstance(document.get("accounts"), list):
        return None
    return document


def live_books(document: Optional[Dict[str, Any]], paths: List[str]) -> Optional[List[Any]]:
    """The running OCM's book for each of ``paths``, or None if it keeps other files
    (another OCM on that port, or one whose config has changed since)."""
    if document is None:
        return None
    accounts = [a for a in document["accounts"] if isinstance(a, dict)]
    books = {a.get("usages_path"): a.get("usage") for a in accounts}
    found = [books.get(os.path.abspath(path)) for path in paths]
    if all(isinstance(book, dict) and isinstance(book.get("combinations"), list)
           for book in found):
        return found
    return None


def describe_as_of(when: Optional[float], now: float) -> str:
    """"as of 12:03:04, 41s ago", in local time; with the date when not today."""
    if when is None:
        return "time of the figures unknown"
    day = time.localtime(when)[:3] == time.localtime(now)[:3]
    return "as of %s, %s ago" % (time.strftime("%H:%M:%S" if day else "%Y-%m-%d %H:%M:%S",
                                               time.localtime(when)), format_age(now - when))


def summarize_usage(data: Dict[str, Any]) -> Dict[str, Any]:
    """Per user, per model (and tier), per week and total, from a usage file's JSON."""
    def bucket(table: Dict[str, Dict[str, Any]], key: str, stats: Dict[str, Any]) -> None:
        row = table.setdefault(key, {"request_count": 0, "input_tokens": 0, "cached_tokens": 0,
                                     "output_tokens": 0, "cost_usd": 0.0})
        for name in ("request_count", "input_tokens", "cached_tokens", "output_tokens"):
            row[name] += stats[name]
        row["cost_usd"] += stats["cost_usd"]

    users, models, weeks, total = {}, {}, {}, {}  # type: ignore
    for combo in data["combinations"]:
        model = "%s (%s%s)" % (combo["model"], combo["service_tier"],
                               ", 1M context" if combo["context_window"] == PREMIUM_CONTEXT_WINDOW
                               else "")
        bucket(models, model, combo["total"])
        bucket(total, "all", combo["total"])
        if "week_start_unix" in combo:
            bucket(weeks, week_label(combo["week_start_unix"]), combo["total"])
        for user, stats in combo["by_user"].items():
            bucket(users, user, stats)
    for table in (users, models, weeks, total):
        for row in table.values():
            row["cost_usd"] = round_cents(row["cost_usd"])
    return {"last_updated": data["last_updated"], "users": users, "models": models,
            "weeks": weeks, "total": total.get("all", {"request_count": 0, "input_tokens": 0,
                                                       "cached_tokens": 0, "output_tokens": 0,
                                                       "cost_usd": 0.0})}


def format_usage_report(path: str, summary: Dict[str, Any], when: str) -> str:
    columns = ("request_count", "input_tokens", "cached_tokens", "output_tokens")
    lines = ["OCM usage from %s (%s)" % (path, when), ""]

    def table(title: str, rows: Dict[str, Dict[str, Any]], order: List[str]) -> None:
        width = max([len(title)] + [len(k) for k in order])
        lines.append("%-*s %10s %14s %14s %14s %12s" % (width, title, "requests", "input tokens",
                                                        "cached", "output tokens", "cost"))
        for key in order:
            row = rows[key]
            lines.append("%-*s %10s %14s %14s %14s %12s" % (
                width, key, *("{:,}".format(row[c]) for c in columns), "$%.2f" % row["cost_usd"]))
        lines.append("")

    by_cost = lambda rows: sorted(rows, key=lambda k: (-rows[k]["cost_usd"], k))  # noqa: E731
    if summary["users"]:
        table("Per user", summary["users"], by_cost(summary["users"]))
    if summary["models"]:
        table("Per model (tier)", summary["models"], by_cost(summary["models"]))
    if summary["weeks"]:
        table("Per week (start)", summary["weeks"], sorted(summary["weeks"]))
    table("Total", {"all": summary["total"]}, ["all"])
    return "\n".join(lines).rstrip() + "\n"


def run_usage(argv: List[str], now: Callable[[], float] = time.time) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="ocm.py usage",
                                     description="Print who used what: cost and tokens per user, "
                                                 "model and week, and the total.")
    parser.add_argument("source", metavar="USAGES_PATH|CONFIG",
                        help="the usage file, or an OCM config naming it in usages_path (then "
                             "the figures of a running OCM are live; the file's lag up to 60 s)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    try:
        sources, config = _usage_sources(args.source)
    except ConfigError as exc:
        print("ocm: %s" % exc, file=sys.stderr)
        return 2
    # A running OCM saves its files once a minute: ask it for the figures of now.
    live = fetch_live_usage(config) if config is not None else None
    books = live_books(live, [path for _, path in sources])
    reports = []
    for i, (account, path) in enumerate(sources):
        if books is not None:
            data = books[i]
            when = "live, from the running OCM at %s" % time.strftime("%H:%M:%S",
                                                                      time.localtime(now()))
        else:
            try:
                book = UsageBook(path)
                book.load(repair=False)
            except FileNotFoundError:
                print("ocm: no usage recorded yet: %s does not exist" % path, file=sys.stderr)
                return 2
            except (OSError, ValueError, UnicodeDecodeError) as exc:
                print("ocm: cannot read usage file %s: %s" % (path, exc), file=sys.stderr)
                return 2
            data = book.to_json()
            when = describe_as_of(parse_rfc3339(data.get("last_updated")), now())
        reports.append((account, path, summarize_usage(data), when))
    budgets = live.get("budgets") if books is not None and live else budget_report(args.source)
    if args.json:
        if len(reports) == 1 and not reports[0][0]:
            out = dict(reports[0][2], source=reports[0][1])
        else:
            out = {"accounts": {a: dict(s, source=p) for a, p, s, _ in reports}}
        out["live"] = books is not None
        if budgets:
            out["budgets"] = budgets
        print(json.dumps(out, indent=2))
    else:
        sys.stdout.write("\n".join(("Account %s: " % a if a else "") + format_usage_report(p, s, w)
                                    for a, p, s, w in reports))
        if budgets:
            sys.stdout.write("\nBudgets (this period)\n" + "".join(
                "%-12s %-6s %14s of %s\n" % (b["user"], b["period"], b["spent"], b["limit"])
                for b in budgets))
    return 0


def budget_report(source: str) -> List[Dict[str, Any]]:
    """Each user's budgets against this period's spending, when ``source`` is a config."""
    try:
        config = load_config(source)
    except ConfigError:
        return []  # a usage file, not a config
    if not config.budgets_path or not any(u.budgets for u in config.users):
        return []
    ledger = BudgetLedger(config.budgets_path, PeriodClock(config.timezone))
    ledger.load()
    return budget_rows(config.users, ledger)


def issuer_opener(config: Config, detour: Optional[ProxyURL]) -> Callable:
    """urllib for sign-in calls, on the same connections (detour, TLS) as serving."""
    limits = config.limits
    return build_url_opener(Connector(limits.connect_timeout, limits.upstream_read_timeout,
                                      detour))


def _config_or_defaults(path: Optional[str]) -> Config:
    return load_config(path) if path else Config()


def account_files(config: Config) -> List[Tuple[str, str, Optional[ProxyURL]]]:
    """(tag, credential file, detour) of every account a config names."""
    if not config.credentials:
        return [("default", config.credential_path, config.detour)]
    return [(c.tag, c.credential_path, c.detour) for c in config.credentials if not c.is_pool]


def pick_account(config: Config, tag: Optional[str]) -> Tuple[str, str, Optional[ProxyURL]]:
    """The account a login command is about: --account, or the only one."""
    accounts = account_files(config)
    if tag:
        for account in accounts:
            if account[0] == tag:
                return account
        raise ConfigError("--account: no account %r here (%s)"
                          % (tag, ", ".join(a[0] for a in accounts)))
    if len(accounts) > 1:
        raise ConfigError("this config has %d accounts; say which with --account (%s)"
                          % (len(accounts), ", ".join(a[0] for a in accounts)))
    return accounts[0]


def format_age(seconds: float) -> str:
    """A duration, short and rounded down: 45s, 59m, 3h 12m, 2d 4h."""
    seconds = int(abs(seconds))
    days, hours, minutes = seconds // 86400, seconds % 86400 // 3600, seconds % 3600 // 60
    if days:
        return "%dd %dh" % (days, hours)
    if hours:
        return "%dh %dm" % (hours, minutes)
    return "%dm" % minutes if minutes else "%ds" % seconds


def format_time(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def describe_status(path: str, now: float) -> Tuple[List[str], bool]:
    """The lines `ocm.py status` prints, and whether the login is usable. Reads the file only."""
    lines = ["credential:    %s" % path]
    try:
        data = read_auth_object(path)
        if data is None:
            raise LoginFailed("%s not found; sign in with `python3 ocm.py login`" % path)
        login = parse_auth(data)
    except (LoginFailed, CredentialProblem) as exc:
        return lines + ["usable:        no: %s" % exc], False
    expired = is_expired(login, now)
    usable = login.mode == "apikey" or not expired or bool(login.refresh_token)
    lines.append("usable:        " + ("yes" if usable else "no: the access token has expired "
                                      "and there is no refresh token; sign in again"))
    lines.append("mode:          " + login.mode_name)
    if login.mode != "chatgpt":
        return lines, usable
    account = [login.email] if login.email else []
    account += ["id " + login.account_id] if login.account_id else []
    lines.append("account:       " + (", ".join(account) or "unknown"))
    lines.append("plan:          " + (login.plan or "unknown"))
    if login.expires_at is None:
        lines.append("access token:  expiry unknown")
    elif not expired:
        lines.append("access token:  valid until %s (%s left)"
                     % (format_time(login.expires_at), format_age(login.expires_at - now)))
    else:
        lines.append("access token:  expired %s ago%s" % (format_age(now - login.expires_at),
                     "; OCM refreshes it on the next request" if login.refresh_token else ""))
    lines.append("refresh token: " + ("present" if login.refresh_token else "missing"))
    lines.append("last refresh:  " + ("%s (%s ago)" % (format_time(login.last_refresh),
                                                       format_age(now - login.last_refresh))
                                      if login.last_refresh is not None else "not recorded"))
    return lines, usable


def run_status(argv: List[str], out=None, now: Callable[[], float] = time.time) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="ocm.py status",
                                     description="Say whether the login in the credential file "
                                                 "is usable: mode, account, plan, access-token "
                                                 "expiry, last refresh. Reads the file only; "
                                                 "changes nothing.")
    parser.add_argument("config", nargs="?",
                        help="config file naming credential_path (default: as serving)")
    parser.add_argument("--account", metavar="TAG",
                        help="one account of a credentials list (default: all)")
    args = parser.parse_args(argv)
    try:
        config = _config_or_defaults(args.config)
        accounts = [pick_account(config, args.account)] if args.account else account_files(config)
    except ConfigError as exc:
        print("ocm: config error: %s" % exc, file=sys.stderr)
        return 2
    all_usable = True
    for i, (tag, path, _) in enumerate(accounts):
        lines, usable = describe_status(path, now())
        if len(accounts) > 1:
            lines.insert(0, "%saccount %s" % ("\n" if i else "", tag))
        print("\n".join(lines), file=out or sys.stdout)
        all_usable = all_usable and usable
    return 0 if all_usable else 2


def ask_to_replace(path: str, stdin, out,
                   force_command: str = "python3 ocm.py login --force") -> bool:
    """True when ``path`` holds no login, or the user agrees to replace it.

    Without a terminal to ask on, refuse: a script must say --force (the
    ``force_command`` printed names the same config, so it signs in to the same file).
    """
    try:
        data = read_auth_object(path)
    except LoginFailed:
        return True  # a broken file holds nothing worth keeping
    if not has_login(data):
        return True
    try:
        login = parse_auth(data)
        who = login.email or login.account_id or login.mode_name
    except CredentialProblem:
        who = "tokens"
    if stdin is None or not getattr(stdin, "isatty", lambda: False)():
        print("ocm: %s already holds a login (%s); run `%s` to replace it"
              % (path, who, force_command), file=sys.stderr)
        return False
    out.write("%s already holds a login (%s).\n"
              "Replacing it revokes that login's refresh token: a computer that copied this\n"
              "file will have to sign in again. Replace it? [y/N] " % (path, who))
    out.flush()
    if stdin.readline().strip().lower() in ("y", "yes"):
        return True
    print("Kept the current login.", file=out)
    return False


def run_login(argv: List[str], stdin=None, out=None, sleep: Callable[[float], None] = time.sleep,
              now: Callable[[], float] = time.time, ports=LOGIN_CALLBACK_PORTS,
              interval_floor: float = DEVICE_POLL_FLOOR, timeout: float = LOGIN_TIMEOUT) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="ocm.py login",
                                     description="Give this box its own ChatGPT login (device "
                                                 "code, or a browser with paste-back) and write "
                                                 "the credential file.")
    parser.add_argument("config", nargs="?",
                        help="config file naming credential_path and upstream.issuer_url "
                             "(default: as serving)")
    parser.add_argument("--paste", action="store_true",
                        help="sign in in a browser and paste back the address it ends on "
                             "(for accounts without device codes)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing login without asking")
    parser.add_argument("--account", metavar="TAG",
                        help="which account of a credentials list to sign in")
    args = parser.parse_args(argv)
    stdin = sys.stdin if stdin is None else stdin
    out = out or sys.stdout
    try:
        config = _config_or_defaults(args.config)
        _, path, detour = pick_account(config, args.account)
    except ConfigError as exc:
        print("ocm: config error: %s" % exc, file=sys.stderr)
        return 2
    issuer = config.upstream.issuer_url
    import shlex
    same_file = (["--account", args.account] if args.account else []) + (
        [args.config] if args.config else [])
    force_command = " ".join(["python3 ocm.py login --force"]
                             + [shlex.quote(arg) for arg in same_file])
    if not args.force and not ask_to_replace(path, stdin, out, force_command):
        return 1
    open_url = issuer_opener(config, detour)
    try:
        if args.paste:
            tokens = sign_in_with_browser(issuer, open_url, stdin, out, ports, timeout, now)
        else:
            try:
                tokens = sign_in_with_device_code(issuer, open_url, out, interval_floor, timeout,
                                                  sleep, now)
            except DeviceCodeUnavailable as exc:
                print("\nThe issuer says %s; signing in through a browser instead." % exc,
                      file=out)
                tokens = sign_in_with_browser(issuer, open_url, stdin, out, ports, timeout, now)
        login, old_refresh = save_login(path, tokens, now())
    except LoginFailed as exc:
        print("ocm: sign-in failed: %s" % exc, file=sys.stderr)
        return 1
    except OSError as exc:  # includes TimeoutError: auth.lock held too long
        print("ocm: cannot write %s: %s" % (path, exc.strerror or exc), file=sys.stderr)
        return 1
    details = ["plan " + login.plan] if login.plan else []
    details += ["account " + login.account_id] if login.account_id else []
    print("\nSigned in as %s%s. Saved to %s." % (login.email or "an unknown user",
                                                 " (%s)" % ", ".join(details) if details else "",
                                                 path), file=out)
    if old_refresh:
        try:
            revoke_refresh_token(issuer, open_url, old_refresh)
            print("The previous login's refresh token is revoked.", file=out)
        except LoginFailed as exc:
            print("Could not revoke the previous login's refresh token (%s); it stays valid "
                  "until it expires." % exc, file=out)
    print("Next: start OCM with `python3 ocm.py%s`.\n"
          "(An OCM that is already running uses the new login at once; no restart needed.)"
          % (" " + args.config if args.config else ""), file=out)
    return 0


def run_logout(argv: List[str], out=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="ocm.py logout",
                                     description="Revoke the ChatGPT login's refresh token and "
                                                 "remove the tokens from the credential file, "
                                                 "keeping its other fields.")
    parser.add_argument("config", nargs="?",
                        help="config file naming credential_path and upstream.issuer_url "
                             "(default: as serving)")
    parser.add_argument("--account", metavar="TAG",
                        help="which account of a credentials list to sign out")
    args = parser.parse_args(argv)
    out = out or sys.stdout
    try:
        config = _config_or_defaults(args.config)
        _, path, detour = pick_account(config, args.account)
    except ConfigError as exc:
        print("ocm: config error: %s" % exc, file=sys.stderr)
        return 2
    try:
        refresh = remove_login(path)
    except LoginFailed as exc:
        print("ocm: %s; nothing removed" % exc, file=sys.stderr)
        return 1
    except OSError as exc:
        print("ocm: cannot write %s: %s" % (path, exc.strerror or exc), file=sys.stderr)
        return 1
    if refresh is None:
        print("No ChatGPT login in %s; nothing to do." % path, file=out)
        return 0
    print("Removed the ChatGPT tokens from %s." % path, file=out)
    if refresh:
        try:
            revoke_refresh_token(config.upstream.issuer_url, issuer_opener(config, detour),
                                 refresh)
        except LoginFailed as exc:
            print("ocm: could not revoke the refresh token (%s); it stays valid until it expires"
                  % exc, file=sys.stderr)
            return 1
        print("The refresh token is revoked.", file=out)
    return 0


def guess_host() -> str:
    """This box's LAN address for clients' base_url (no packet is sent)."""
    with contextlib.suppress(OSError):
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.connect(("10.254.254.254", 9))  # UDP connect only picks a route
            address = probe.getsockname()[0]
        finally:
            probe.close()
        if not address.startswith("127."):
            return address
    return socket.gethostname() or "127.0.0.1"


def client_setup(base_url: str, user: str, token: str, websocket: bool = False) -> str:
    """What a person adds to ~/.codex/config.toml, and the variable to set."""
    return ('# %s: add to ~/.codex/config.toml\n'
            '[model_providers.ocm]\nname = "OCM"\nbase_url = "%s"\nwire_api = "responses"\n'
            'env_key = "OCM_TOKEN"\n%s'
            '# then, in the shell: export OCM_TOKEN=%s\n'
            '# and run: codex -c model_provider=ocm   (or set model_provider = "ocm" at the top)\n'
            % (user, base_url, "supports_websockets = true\n" if websocket else "", token))


def run_init(argv: List[str], out=None) -> int:
    """Write a starter config with a strong random token per person."""
    import argparse
    import secrets
    parser = argparse.ArgumentParser(prog="ocm.py init",
                                     description="Write a config with a strong random token for "
                                                 "each person (kept as sha256 digests), check the "
                                                 "login, and print each person's Codex setup.")
    parser.add_argument("--users", default="", help="comma-separated names (default: you)")
    parser.add_argument("--out", default="config.json",
                        help="config file to write (default: config.json)")
    parser.add_argument("--listen", default="0.0.0.0",
                        help="address to listen on (default: 0.0.0.0, the LAN)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: 8080)")
    parser.add_argument("--host",
                        help="name or address clients use to reach this box (default: guessed)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing config file")
    args = parser.parse_args(argv)
    out = out or sys.stdout
    names = [n.strip() for n in args.users.split(",") if n.strip()] or [_login_name()]
    if len(set(names)) != len(names) or not all(re.match(r"^[A-Za-z0-9._@-]+$", n) for n in names):
        print("ocm: --users: distinct names of letters, digits, . _ @ - only", file=sys.stderr)
        return 2
    if os.path.exists(args.out) and not args.force:
        print("ocm: %s already exists; not overwriting it (use --force)" % args.out,
              file=sys.stderr)
        return 1
    if not 1 <= args.port <= 65535:
        print("ocm: --port: 1 to 65535", file=sys.stderr)
        return 2
    tokens = {name: "ocm-" + secrets.token_urlsafe(32) for name in names}
    directory = os.path.dirname(os.path.abspath(args.out))
    # No credential_path: the login is found at run time ($CODEX_HOME, else
    # ~/.codex), so the same file works by hand and under a service's CODEX_HOME.
    config = {"listen": args.listen, "listen_port": args.port,
              "usages_path": os.path.join(directory, "usage.json"),
              "users": [{"name": name,
                         "token": "sha256:" + hashlib.sha256(tokens[name].encode()).hexdigest()}
                        for name in names]}
    try:
        write_file_atomic(args.out, (json.dumps(config, indent=2) + "\n").encode("utf-8"), 0o600)
    except OSError as exc:
        print("ocm: cannot write %s: %s" % (args.out, exc.strerror or exc), file=sys.stderr)
        return 1
    print("Wrote %s for %s (tokens are stored as sha256 digests)." % (args.out, ", ".join(names)),
          file=out)
    with logging_disabled():  # said once, below, not also as a log line
        credential = Credential(default_credential_path(), DEFAULT_TOKEN_URL, open_url=None)
        login, problem = credential.peek()
    if login:
        print("Login: %s: %s" % (credential.path, describe_credential(credential, time.time())),
              file=out)
    elif not os.path.exists(credential.path):
        print("ocm: no login yet in %s; sign in first: python3 ocm.py login %s"
              % (credential.path, args.out), file=sys.stderr)
    else:
        print("ocm: the login is not usable: %s" % problem, file=sys.stderr)
    base_url = "http://%s:%d/v1" % (args.host or guess_host(), args.port)
    print("\nStart OCM:  python3 ocm.py %s\n" % args.out, file=out)
    print("Give each person their block below. The tokens are shown this once; "
          "OCM keeps only digests.\n", file=out)
    for name in names:
        print(client_setup(base_url, name, tokens[name]), file=out)
    return 0


def _login_name() -> str:
    with contextlib.suppress(Exception):
        import getpass
        name = re.sub(r"[^A-Za-z0-9._@-]", "", getpass.getuser())
        if name:
            return name
    return "me"


def run_hash_token(argv: List[str], stdin=None, out=None) -> int:
    """Print the sha256:<hex> form of a token read from stdin, for the config."""
    import argparse
    argparse.ArgumentParser(prog="ocm.py hash-token",
                            description="Read a user token from stdin and print its sha256: "
                                        "form, to put in the config instead of the token "
                                        "itself.").parse_args(argv)
    stdin = sys.stdin if stdin is None else stdin
    if stdin.isatty():
        import getpass
        token = getpass.getpass("token (not shown): ")
    else:
        token = stdin.readline()
    token = token.strip()
    if not token or any(c.isspace() for c in token):
        print("ocm: give one token, without spaces, on stdin", file=sys.stderr)
        return 2
    print("sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest(), file=out or sys.stdout)
    return 0


SUBCOMMANDS = {"init": run_init, "login": run_login, "logout": run_logout, "status": run_status,
               "usage": run_usage, "hash-token": run_hash_token}


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        try:
            return SUBCOMMANDS[argv[0]](argv[1:])
        except KeyboardInterrupt:  # Ctrl-C at a prompt or while waiting to sign in
            print("\nocm: cancelled", file=sys.stderr)
            return 130
        except BrokenPipeError:  # `ocm.py usage ... | head`: the reader has seen enough
            # no second error at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
    if argv and re.match(r"^[a-z][a-z-]*$", argv[0]) and not os.path.exists(argv[0]):
        # `ocm.py lgoin`: a typo of a command, not a config file to look for
        hint = did_you_mean(argv[0], SUBCOMMANDS) or " (commands: %s)" % ", ".join(SUBCOMMANDS)
        print("ocm: %s: no such command or config file%s" % (argv[0], hint), file=sys.stderr)
        return 2
    import argparse
    parser = argparse.ArgumentParser(
        prog="ocm.py",
        description="OCM relays remote Codex clients to OpenAI through the owner's "
                    "ChatGPT login or API key, with a token per user.",
        epilog="Without CONFIG: listen on 127.0.0.1:8080 with $CODEX_HOME/auth.json "
               "or ~/.codex/auth.json. Other commands (each has --help): `ocm.py init` writes a "
               "config with a token per person, `ocm.py login [CONFIG]` signs the box in, "
               "`ocm.py logout [CONFIG]`, `ocm.py status [CONFIG]`, `ocm.py usage FILE` reports "
               "usage, `ocm.py hash-token` hashes a token for the config. "
               "See README.md, and docs/config.md for the config keys.")
    parser.add_argument("config", nargs="?",
                        help="config file (OCM JSON, or a sing-box config with an ocm service)")
    parser.add_argument("--check", action="store_true",
                        help="validate the config and the credential, print a summary, "
                             "exit 0 (or 2)")
    parser.add_argument("--log-level", default="info",
                        choices=("debug", "info", "warning", "error"), help="default: info")
    parser.add_argument("--version", action="version", version="ocm " + __version__)
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        config = load_config(args.config) if args.config else Config()
    except ConfigError as exc:
        print("ocm: config error: %s" % exc, file=sys.stderr)
        return 2
    if args.check:
        return run_check(config)
    return serve(config)


if __name__ == "__main__":
    sys.exit(main())
