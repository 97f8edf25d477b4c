#!/usr/bin/env python3
"""OCM, the OpenAI Codex Multiplexer.

One always-on box (a router, a NAS, a small server) holds the owner's Codex
login from ``~/.codex/auth.json`` (or an OpenAI API key), keeps it refreshed,
and lets remote Codex clients in with per-user bearer tokens. It relays their
requests (HTTP, SSE streams) to OpenAI unchanged.

Run it:    python3 ocm.py config.json        (no config: 127.0.0.1:8080)
Check it:  python3 ocm.py --check config.json
Sign in:   python3 ocm.py login [config.json]  (also: logout, status)
Standard library only; Python 3.8 to 3.13. See README.md.

Sections, in order (``grep -n '^# ==' ocm.py``):
  1. Constants     default URLs, OAuth client id, intervals, limits
  2. Errors        OCMError, ConfigError, HTTPError
  3. Config        dataclasses and load_config()
  4. Files         atomic writes, the cross-process file lock
  5. Credentials   auth.json, token refresh, the Credential object
  6. Sign-in       device codes, PKCE with paste-back, writing a new login
  7. Pricing       the price table, the usage book
  8. Users         bearer tokens, constant-time lookup
  9. Upstream      connections, the keep-alive pool, urllib for token calls
 10. HTTP parsing  strict request heads and bodies from clients
 11. Streams       SSE scanning, usage taps on relayed bytes
 12. Handler       route, authenticate, relay
 13. Server        the ThreadingHTTPServer that owns all state
 14. CLI           main(), login, logout, status, usage
"""

import base64
import calendar
import contextlib
import hashlib
import hmac
import http.client
import json
import logging
import math
import os
import queue
import re
import select
import selectors
import signal
import socket
import socketserver
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional, Tuple

try:  # POSIX only; without it the cross-process lock is skipped (Windows).
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None
try:
    import pwd
except ImportError:  # pragma: no cover
    pwd = None

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
DEFAULT_BODY_TIMEOUT = 60.0             # between two reads of a request body
DEFAULT_MAX_REQUEST_LINE = 16 * 1024
DEFAULT_MAX_HEADER_SIZE = 64 * 1024
DEFAULT_MAX_HEADER_COUNT = 100

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

PERMANENT_REFRESH_CODES = frozenset((
    "refresh_token_expired", "refresh_token_reused", "refresh_token_invalidated",
))

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

    def __init__(self, status: int, error_type: str, message: str, close: bool = False):
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.close = close


class ClientGone(OCMError):
    """The client hung up. Normal; logged at debug level only."""


# == 3. Config ===============================================================

@dataclass
class User:
    name: str
    token: str


@dataclass
class UpstreamConfig:
    chatgpt_url: str = DEFAULT_CHATGPT_URL
    api_url: str = DEFAULT_API_URL
    token_url: str = DEFAULT_TOKEN_URL
    issuer_url: str = DEFAULT_ISSUER_URL


@dataclass
class Limits:
    max_body_size: int = DEFAULT_MAX_BODY_SIZE
    upstream_read_timeout: float = DEFAULT_UPSTREAM_READ_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    max_request_line: int = DEFAULT_MAX_REQUEST_LINE
    max_header_size: int = DEFAULT_MAX_HEADER_SIZE
    max_header_count: int = DEFAULT_MAX_HEADER_COUNT


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


@dataclass
class Config:
    listen: str = DEFAULT_LISTEN
    listen_port: int = DEFAULT_PORT
    credential_path: str = field(default_factory=default_credential_path)
    usages_path: str = ""
    users: List[User] = field(default_factory=list)
    headers: Dict[str, List[str]] = field(default_factory=dict)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    limits: Limits = field(default_factory=Limits)
    source: str = ""  # the file it came from, for messages


# Keys of a sing-box service or listen block that OCM accepts but has no use for.
SING_BOX_IGNORED_KEYS = frozenset((
    "type", "tag", "tcp_fast_open", "tcp_multi_path", "udp_fragment", "udp_timeout",
    "proxy_protocol", "proxy_protocol_accept_no_header", "sniff",
    "sniff_override_destination", "sniff_timeout", "domain_strategy",
    "udp_disable_domain_unmapping", "bind_interface", "routing_mark", "reuse_addr",
    "netns", "disable_tcp_keep_alive", "tcp_keep_alive", "tcp_keep_alive_interval",
))
# Keys that belong to features not built yet: refused, never silently ignored.
NOT_SUPPORTED_YET = ("detour", "tls", "credentials")

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


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
            raise ConfigError("%s: expected an object, got %s" % (where or "config", _json_type(obj)))
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
            raise ConfigError("%s: expected a string, got %s" % (self.path(key), _json_type(value)))
        if not allow_empty and not value:
            raise ConfigError("%s: must not be empty" % self.path(key))
        return value

    def int(self, key: str, default: int, low: int, high: int) -> int:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError("%s: expected a whole number, got %s" % (self.path(key), _json_type(value)))
        if not low <= value <= high:
            raise ConfigError("%s: %d is out of range (%d to %d)" % (self.path(key), value, low, high))
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

    def finish(self, ignored: frozenset = frozenset()) -> None:
        """Refuse keys nobody asked for: a typo must not pass silently."""
        for key in self.obj:
            if key in self.seen:
                continue
            if key in ignored:
                log.warning("config: %s is a sing-box option OCM does not use; ignored", self.path(key))
                continue
            raise ConfigError("%s: unknown key" % self.path(key))


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


def _parse_users(raw: list, where: str) -> List[User]:
    users, names, tokens = [], set(), set()
    for i, entry in enumerate(raw):
        f = _Fields(entry, "%s[%d]" % (where, i))
        name = f.str("name", allow_empty=False)
        token = f.str("token", allow_empty=False)
        if not f.has("name"):
            raise ConfigError("%s: missing name" % f.where)
        if not f.has("token"):
            raise ConfigError("%s: missing token" % f.where)
        if token != token.strip() or any(c.isspace() for c in token):
            raise ConfigError("%s: must not contain spaces" % f.path("token"))
        if name in names:
            raise ConfigError("%s: duplicate user name %r" % (f.path("name"), name))
        if token in tokens:
            raise ConfigError("%s: the same token is given to two users" % f.path("token"))
        f.finish()
        names.add(name)
        tokens.add(token)
        users.append(User(name=name, token=token))
    return users


def _parse_headers(raw: Any, where: str) -> Dict[str, List[str]]:
    """sing-box's HTTPHeader: {"Name": "value"} or {"Name": ["v1", "v2"]}."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("%s: expected an object of header names, got %s" % (where, _json_type(raw)))
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
        max_request_line=f.int("max_request_line", DEFAULT_MAX_REQUEST_LINE, 256, 1 << 20),
        max_header_size=f.int("max_header_size", DEFAULT_MAX_HEADER_SIZE, 1024, 16 << 20),
        max_header_count=f.int("max_header_count", DEFAULT_MAX_HEADER_COUNT, 8, 10000),
    )
    f.finish()
    return limits


def config_from_dict(data: Any, source: str = "") -> Config:
    """Build a Config from parsed JSON: an OCM object or a whole sing-box file."""
    where = ""
    if isinstance(data, dict) and "services" in data:
        services = data["services"]
        if not isinstance(services, list):
            raise ConfigError("services: expected a list")
        found = [(i, s) for i, s in enumerate(services) if isinstance(s, dict) and s.get("type") == "ocm"]
        if not found:
            raise ConfigError("services: no service of type \"ocm\" in this sing-box config")
        if len(found) > 1:
            raise ConfigError("services: %d services of type \"ocm\"; OCM runs one, keep one"
                              % len(found))
        where = "services[%d]" % found[0][0]
        data = found[0][1]
    f = _Fields(data, where)
    for key in NOT_SUPPORTED_YET:
        if f.has(key):
            raise ConfigError("%s: not supported yet by OCM %s; remove it"
                              % (f.path(key), __version__))
    listen = f.str("listen", DEFAULT_LISTEN, allow_empty=False)
    config = Config(
        listen=listen,
        listen_port=f.int("listen_port", DEFAULT_PORT, 0, 65535),
        credential_path=os.path.expanduser(f.str("credential_path")) or default_credential_path(),
        usages_path=os.path.expanduser(f.str("usages_path")),
        users=_parse_users(f.list("users"), f.path("users")),
        headers=_parse_headers(f.raw("headers"), f.path("headers")),
        upstream=_parse_upstream(f.raw("upstream"), f.path("upstream")),
        limits=_parse_limits(f.raw("limits"), f.path("limits")),
        source=source,
    )
    f.finish(SING_BOX_IGNORED_KEYS)
    return config


def load_config(path: str) -> Config:
    """Read and check a config file. Raises ConfigError naming what is wrong."""
    try:
        with open(path, "rb") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError("cannot read config %s: %s" % (path, exc.strerror or exc))
    try:
        data = json.loads(text.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise ConfigError("%s: not UTF-8 text" % path)
    except ValueError as exc:
        raise ConfigError("%s: not valid JSON: %s" % (path, exc))
    return config_from_dict(data, source=path)


# == 4. Files ================================================================

def write_file_atomic(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so a crash at any instant leaves old or new.

    Temp file in the same directory, fsync, rename, fsync the directory. On any
    error (disk full, read-only) the temp file is removed and the old file stays.
    """
    directory = os.path.dirname(os.path.abspath(path))
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
                    raise TimeoutError("%s is held by another process for over %d s" % (path, timeout))
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
        claims = json.loads(base64.urlsafe_b64decode(payload.encode("ascii")))
    except (IndexError, ValueError, UnicodeError, TypeError):
        return {}
    return claims if isinstance(claims, dict) else {}


_RFC3339 = re.compile(r"^(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(\.\d+)?([Zz]|[+-]\d\d:\d\d)$")


def parse_rfc3339(text: Any) -> Optional[float]:
    """Unix seconds from an RFC 3339 time (any fraction length), or None."""
    if not isinstance(text, str):
        return None
    m = _RFC3339.match(text.strip())
    if not m:
        return None
    try:
        seconds = calendar.timegm((int(m.group(1)), int(m.group(2)), int(m.group(3)),
                                   int(m.group(4)), int(m.group(5)), int(m.group(6)), 0, 0, 0))
    except (ValueError, OverflowError):
        return None
    if m.group(7):
        seconds += float("0" + m.group(7))
    zone = m.group(8)
    if zone not in ("Z", "z"):
        sign = 1 if zone[0] == "+" else -1
        seconds -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    return seconds


def format_rfc3339(seconds: float) -> str:
    """RFC 3339 UTC with microseconds and a Z, as Codex writes last_refresh."""
    whole = int(seconds)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + ".%06dZ" % int((seconds - whole) * 1e6)


@dataclass(frozen=True)
class Login:
    """What one auth.json holds, already interpreted."""
    mode: str                   # "chatgpt" (OAuth) or "apikey"
    access_token: str = ""
    refresh_token: str = ""
    id_token: str = ""
    api_key: str = ""
    account_id: str = ""
    plan: str = ""
    email: str = ""
    expires_at: Optional[float] = None
    last_refresh: Optional[float] = None

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
    email = id_claims.get("email") or (access_claims.get("https://api.openai.com/profile") or {}).get("email")
    return Login(
        mode="chatgpt",
        access_token=access,
        refresh_token=refresh,
        id_token=id_token,
        account_id=token("account_id") or auth_claim("chatgpt_account_id"),
        plan=auth_claim("chatgpt_plan_type"),
        email=email if isinstance(email, str) else "",
        expires_at=float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None,
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


class RefreshFailed(OCMError):
    def __init__(self, message: str, permanent: bool):
        super().__init__(message)
        self.permanent = permanent


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
                 now: Callable[[], float] = time.time):
        self.path = path
        self.lock_path = os.path.join(os.path.dirname(os.path.abspath(path)), "auth.lock")
        self.token_url = token_url
        self.tag = tag
        self._open_url = open_url
        self._now = now
        self._lock = threading.Lock()           # guards the fields below
        self._refresh_lock = threading.Lock()   # one refresh at a time
        self._login = None                      # type: Optional[Login]
        self._file_id = None                    # what _login was read from
        self._problem = "not loaded"            # why there is no login
        self._dead = ""                         # permanent refresh failure, until the file changes
        self._retry_at = 0.0                    # no refresh before this after a transient failure
        self._last_refresh_error = ""
        self._unsaved = None                    # type: Optional[bytes]
        self.refreshes = 0
        self.refresh_failures = 0
        self.reload_if_changed()

    # -- reading the file ---------------------------------------------------
    def reload_if_changed(self) -> None:
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
                self._set_problem_locked("%s not found; sign in with `codex login` "
                                         "or `python3 ocm.py login`" % self.path, None)
            return
        except OSError as exc:
            self._set_problem_locked("cannot read %s: %s" % (self.path, exc.strerror or exc), None)
            return
        try:
            login = parse_auth(json.loads(raw.decode("utf-8")))
        except (ValueError, UnicodeDecodeError) as exc:
            problem = "%s is not valid JSON (%s)" % (self.path, exc.__class__.__name__)
            if self._login is not None and self._problem == "":
                # A half-written file from a careless writer: keep serving the
                # last good login, and look again when the file changes.
                log.warning("credential %s: %s; keeping the previous login", self.tag, problem)
                self._file_id = file_id
                return
            self._set_problem_locked(problem, file_id)
            return
        except CredentialProblem as exc:
            self._set_problem_locked(str(exc), file_id)
            return
        if self._login is not None and self._file_id is not None:
            log.info("credential %s: %s changed on disk; using the new login", self.tag, self.path)
        self._login = login
        self._file_id = file_id
        self._problem = ""
        self._dead = ""
        self._retry_at = 0.0
        self._unsaved = None

    def _set_problem_locked(self, problem: str, file_id) -> None:
        if problem != self._problem:
            log.warning("credential %s unavailable: %s", self.tag, problem)
        self._login = None
        self._problem = problem
        self._file_id = file_id
        self._dead = ""
        self._unsaved = None

    # -- state --------------------------------------------------------------
    def peek(self) -> Tuple[Optional[Login], str]:
        """(login or None, problem) without refreshing: for status lines."""
        self.reload_if_changed()
        with self._lock:
            return self._login, (self._dead or self._problem)

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
            login, problem, dead = self._login, self._problem, self._dead
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
            self.reload_if_changed()
            login = self._check_usable()
            now = self._now()
            if login.access_token != stale_access_token and not needs_refresh(login, now):
                return login  # another thread refreshed while we waited
            if now < self._retry_at:
                return self._after_failure(login, now)
            try:
                with file_lock(self.lock_path):
                    login = self._refresh_under_file_lock(stale_access_token)
            except RefreshFailed as exc:
                self.refresh_failures += 1
                self._last_refresh_error = str(exc)
                if exc.permanent:
                    message = ("the owner's ChatGPT login has expired or was revoked (%s); "
                               "the owner must sign in again (`codex login` or "
                               "`python3 ocm.py login`)" % exc)
                    log.error("credential %s: refresh failed permanently: %s", self.tag, exc)
                    with self._lock:
                        self._dead = message
                    raise HTTPError(401, "authentication_error", message)
                log.warning("credential %s: token refresh failed: %s; retrying in %d s",
                            self.tag, exc, REFRESH_RETRY)
                self._retry_at = now + REFRESH_RETRY
                return self._after_failure(self._check_usable(), now)
            except TimeoutError as exc:
                self._retry_at = now + REFRESH_RETRY
                self._last_refresh_error = str(exc)
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
            data = json.loads(raw.decode("utf-8"))
            on_disk = parse_auth(data)
        except (OSError, ValueError, UnicodeDecodeError, CredentialProblem) as exc:
            if self._unsaved is None:
                raise RefreshFailed("cannot re-read %s: %s" % (self.path, exc), permanent=False)
            data, on_disk, file_id = json.loads(self._unsaved.decode("utf-8")), self._login, None
        with self._lock:
            current = self._login
            unsaved = self._unsaved is not None and file_id == self._file_id
        if unsaved:
            on_disk = current  # the file still holds tokens we already rotated past
            data = json.loads(self._unsaved.decode("utf-8"))
        elif current is None or (on_disk.access_token, on_disk.refresh_token) != (
                current.access_token, current.refresh_token):
            with self._lock:  # someone else wrote new tokens: adopt them
                self._login, self._file_id, self._problem, self._dead = on_disk, file_id, "", ""
                self._unsaved = None
            log.info("credential %s: %s was refreshed by another process; using it", self.tag, self.path)
            if on_disk.access_token != stale_access_token and not needs_refresh(on_disk, self._now()):
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
            self._login, self._problem, self._dead = new_login, "", ""
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
                with file_lock(self.lock_path, timeout=1.0):
                    self._save(encoded)
            except TimeoutError:
                pass
            finally:
                self._refresh_lock.release()

    def _call_token_endpoint(self, refresh_token: str) -> Dict[str, Any]:
        body = json.dumps({"client_id": OAUTH_CLIENT_ID, "grant_type": "refresh_token",
                           "refresh_token": refresh_token}).encode("utf-8")
        request = urllib.request.Request(self.token_url, data=body, method="POST", headers={
            "Content-Type": "application/json", "Accept": "application/json",
            "User-Agent": "ocm/" + __version__})
        try:
            with self._open_url(request, TOKEN_CALL_TIMEOUT) as response:
                status, raw = response.status, response.read(1 << 20)
        except urllib.error.HTTPError as exc:
            status = exc.code
            try:
                raw = exc.read(1 << 20)
            except OSError:
                raw = b""
            finally:
                exc.close()
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise RefreshFailed("token endpoint unreachable: %s" % reason, permanent=False)
        try:
            answer = json.loads(raw.decode("utf-8")) if raw else {}
        except (ValueError, UnicodeDecodeError):
            answer = None
        if 200 <= status < 300:
            if not isinstance(answer, dict) or not any(
                    isinstance(answer.get(k), str) and answer[k]
                    for k in ("access_token", "refresh_token", "id_token")):
                raise RefreshFailed("token endpoint answered %d without tokens" % status, permanent=False)
            return answer
        code = refresh_error_code(answer)
        text = "token endpoint answered %d%s%s" % (
            status, " " + code if code else "",
            ": " + refresh_error_message(answer) if refresh_error_message(answer) else "")
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


@dataclass(frozen=True)
class DeviceCode:
    device_auth_id: str
    user_code: str
    interval: float             # seconds between polls, already floored
    verification_url: str


# Callback errors in plain words; anything else is shown as the issuer sent it.
CALLBACK_ERRORS = {
    "missing_codex_entitlement": "Codex is not enabled for this workspace. Ask its admin to "
                                 "enable Codex, or sign in to another workspace or account.",
    "access_denied": "the sign-in was cancelled, or access was denied, in the browser.",
}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def call_issuer(open_url: Callable, url: str, body: bytes,
                content_type: str = "application/json") -> Tuple[int, Any, bytes]:
    """POST to the issuer: (status, parsed JSON or None, raw body), whatever the status.

    Raises IssuerUnreachable when no answer came at all.
    """
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
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise IssuerUnreachable("%s unreachable: %s" % (urllib.parse.urlsplit(url).hostname, reason))
    try:
        answer = json.loads(raw.decode("utf-8")) if raw else None
    except (ValueError, UnicodeDecodeError):
        answer = None
    return status, answer, raw


def issuer_error_text(answer: Any, raw: bytes) -> str:
    """error_description, else error.message, else error (a string or error.code), else the body."""
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
        raise DeviceCodeUnavailable("device-code sign-in is not enabled for this account or server")
    if not 200 <= status < 300:
        raise LoginFailed("asking for a device code failed: %d %s" % (status, issuer_error_text(answer, raw)))
    answer = answer if isinstance(answer, dict) else {}
    device_auth_id = answer.get("device_auth_id")
    user_code = answer.get("user_code") or answer.get("usercode")
    if not (isinstance(device_auth_id, str) and device_auth_id and isinstance(user_code, str) and user_code):
        raise LoginFailed("the issuer's device-code answer has no device_auth_id or user_code")
    return DeviceCode(device_auth_id, user_code, parse_poll_interval(answer.get("interval"), interval_floor),
                      issuer + "/codex/device")


def wait_for_device_code(issuer: str, open_url: Callable, device: DeviceCode, timeout: float,
                         sleep: Callable[[float], None], now: Callable[[], float]) -> Tuple[str, str]:
    """Poll until the user has entered the code: (authorization_code, code_verifier).

    First poll at once, then every ``device.interval``; 403 and 404 mean "not
    yet", and so does a network blip. Any other status is fatal.
    """
    url = issuer + "/api/accounts/deviceauth/token"
    body = json.dumps({"device_auth_id": device.device_auth_id, "user_code": device.user_code}).encode("utf-8")
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
                raise LoginFailed("the issuer confirmed the code without authorization_code or code_verifier")
            return code, verifier
        if status not in (0, 403, 404):
            raise LoginFailed("device-code sign-in failed: %d %s" % (status, issuer_error_text(answer, raw)))
        if now() + device.interval > deadline:
            raise LoginFailed("the code was not entered within %g minutes; run login again" % (timeout / 60))
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
        raise LoginFailed("the token exchange failed: %d %s" % (status, issuer_error_text(answer, raw)))
    answer = answer if isinstance(answer, dict) else {}
    tokens = {name: answer.get(name) for name in ("id_token", "access_token", "refresh_token")}
    if not all(isinstance(value, str) and value for value in tokens.values()):
        raise LoginFailed("the token exchange answered without id_token, access_token and refresh_token")
    return tokens


def sign_in_with_device_code(issuer: str, open_url: Callable, out,
                             interval_floor: float = DEVICE_POLL_FLOOR, timeout: float = LOGIN_TIMEOUT,
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
        raise WrongCallback("its state does not match this sign-in (is it from an earlier attempt?)")
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
                status, text = deliver(dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True)))
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
    threading.Thread(target=_feed_lines, args=(stdin, results), name="ocm-login-paste", daemon=True).start()
    try:
        code = _wait_for_code(results, state, server is not None, timeout, now, out)
    finally:
        if server:
            server.shutdown()
            server.server_close()
    return exchange_code(issuer, open_url, code, redirect_uri, verifier)


def _wait_for_code(results: "queue.Queue", state: str, listening: bool, timeout: float,
                   now: Callable[[], float], out) -> str:
    deadline, last_problem = now() + timeout, ""
    while True:
        left = deadline - now()
        if left <= 0:
            raise LoginFailed("no sign-in arrived within %g minutes; run login again" % (timeout / 60))
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


def _lock_path(path: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(path)), "auth.lock")


def read_auth_object(path: str) -> Optional[Dict[str, Any]]:
    """auth.json as a dict; None when missing. Raises LoginFailed when unreadable."""
    try:
        with open(path, "rb") as fh:
            data = json.loads(fh.read().decode("utf-8"))
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


def auth_json_for(tokens: Dict[str, str], now: float, keep: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """auth.json for a fresh login, as the Codex CLI writes it, plus fields of ``keep`` OCM does not know."""
    claims = decode_jwt_claims(tokens["id_token"]).get("https://api.openai.com/auth")
    account_id = claims.get("chatgpt_account_id") if isinstance(claims, dict) else None
    data = {
        "auth_mode": "chatgpt",
        "OPENAI_API_KEY": None,
        "tokens": {"id_token": tokens["id_token"], "access_token": tokens["access_token"],
                   "refresh_token": tokens["refresh_token"],
                   "account_id": account_id if isinstance(account_id, str) and account_id else None},
        "last_refresh": format_rfc3339(now),
    }  # type: Dict[str, Any]
    for key, value in (keep or {}).items():
        data.setdefault(key, value)
    return data


def save_login(path: str, tokens: Dict[str, str], now: float) -> Tuple[Login, str]:
    """Write a new login to ``path`` under auth.lock: (the login, the refresh token it replaced or "").

    The old refresh token is read under the same lock as the write, so it is
    the one really replaced even if a running OCM rotated it meanwhile.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    with file_lock(_lock_path(path)):
        try:
            old = read_auth_object(path)
        except LoginFailed:
            old = None  # a broken file is exactly what a new login fixes
        data = auth_json_for(tokens, now, keep=old)
        write_file_atomic(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"), 0o600)
    old_refresh = _refresh_token_of(old)
    return parse_auth(data), "" if old_refresh == tokens["refresh_token"] else old_refresh


def remove_login(path: str) -> Optional[str]:
    """Drop the tokens (and last_refresh) from auth.json under auth.lock, keeping
    every other field. Returns the refresh token removed ("" if none), or None
    when there were no tokens to remove."""
    if not os.path.exists(path):
        return None  # and no auth.lock to create in a directory that may not exist
    with file_lock(_lock_path(path)):
        data = read_auth_object(path)
        if data is None or "tokens" not in data:
            return None
        refresh = _refresh_token_of(data)
        del data["tokens"]
        data.pop("last_refresh", None)
        write_file_atomic(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"), 0o600)
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
_COMPILED_PRICES = {tier: tuple((re.compile(row[0]),) + row[1:] for row in rows)
                    for tier, rows in PRICE_TABLE.items()}

# Unknown "gpt-5.x..." names are priced as the family their suffix names.
_MODEL_NORMALISATION = (
    ("-codex-mini", "gpt-5.1-codex-mini"), ("-codex-max", "gpt-5.1-codex-max"),
    ("-codex", "gpt-5.3-codex"), ("-chat-latest", "gpt-5.2-chat-latest"), ("-pro", "gpt-5.4-pro"),
    ("-mini", "gpt-5-mini"), ("-nano", "gpt-5-nano"),
)


def normalize_service_tier(tier: Any) -> str:
    """"", auto, default, scale and anything unknown are priced as default."""
    tier = tier.strip().lower() if isinstance(tier, str) else ""
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
            for row in _COMPILED_PRICES[table]:
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
    return (regular * price_in + output_tokens * price_out + cached_tokens * price_cached) / 1000000


class Counts:
    """Requests and tokens of one (combination, user)."""
    __slots__ = ("request_count", "input_tokens", "output_tokens", "cached_tokens")

    def __init__(self, request_count: int = 0, input_tokens: int = 0, output_tokens: int = 0,
                 cached_tokens: int = 0):
        self.request_count = request_count
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self.cached_tokens = cached_tokens

    def add(self, requests: int, input_tokens: int, output_tokens: int, cached_tokens: int) -> None:
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

    def __init__(self, model: str, service_tier: str, context_window: int, week_start: Optional[int]):
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
    """Start of the subscription week: secondary reset-at minus its window
    (PROTOCOL.md section 7). ``headers`` has a case-insensitive get()."""
    active = (headers.get("x-codex-active-limit") or "codex").strip().lower().replace("_", "-")
    reset_at = headers.get("x-%s-secondary-reset-at" % active)
    minutes = headers.get("x-%s-secondary-window-minutes" % active)
    try:
        return int(float(reset_at)) - int(float(minutes)) * 60
    except (TypeError, ValueError, OverflowError):
        return None


@dataclass
class UsageRecord:
    """One response's usage, as every relay path reports it to the book."""
    model: str
    service_tier: str
    input_tokens: int
    output_tokens: int
    cached_tokens: int


def _int_field(obj: Any, *path: str) -> int:
    for name in path:
        if not isinstance(obj, dict):
            return 0
        obj = obj.get(name)
    return int(obj) if isinstance(obj, (int, float)) and not isinstance(obj, bool) and obj > 0 else 0


def usage_record_from(obj: Any, fallback_model: str = "", fallback_tier: str = "") -> Optional[UsageRecord]:
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
    return UsageRecord(model if isinstance(model, str) and model else fallback_model or "unknown",
                       tier if isinstance(tier, str) and tier else fallback_tier, *tokens)


# Terminal Responses events whose response carries billable usage.
USAGE_EVENT_TYPES = frozenset(("response.completed", "response.incomplete"))


def usage_record_from_event(event: Any, fallback_model: str = "", fallback_tier: str = "") -> Optional[UsageRecord]:
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

    def __init__(self, path: str, save_interval: float = 60.0, now: Callable[[], float] = time.time):
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
        try:
            self._merge_json(json.loads(raw.decode("utf-8")))
        except (ValueError, UnicodeDecodeError) as exc:
            if not repair:
                raise ValueError(str(exc))
            aside = "%s.corrupt-%s" % (self.path, time.strftime("%Y%m%dT%H%M%S", time.gmtime(self._now())))
            os.replace(self.path, aside)
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
            window = window if window in (DEFAULT_CONTEXT_WINDOW, PREMIUM_CONTEXT_WINDOW) else DEFAULT_CONTEXT_WINDOW
            week = entry.get("week_start_unix")
            week = int(week) if isinstance(week, (int, float)) and not isinstance(week, bool) and week > 0 else None
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
        window = context_window_for(usage.model, tier, usage.input_tokens)
        with self._lock:
            combo = self._combination(usage.model, tier, window, week_start)
            combo.total.add(1, usage.input_tokens, usage.output_tokens, usage.cached_tokens)
            if user:
                counts = combo.by_user.get(user)
                if counts is None:
                    counts = combo.by_user[user] = Counts()
                counts.add(1, usage.input_tokens, usage.output_tokens, usage.cached_tokens)
            self._last_updated = self._now()
            self._dirty = True
        return raw_cost(usage.input_tokens, usage.output_tokens, usage.cached_tokens,
                        usage.model, tier, window)

    # -- the file -------------------------------------------------------------
    def to_json(self) -> Dict[str, Any]:
        with self._lock:
            combos = list(self._combos.values())
            snapshot = [(c, Counts(c.total.request_count, c.total.input_tokens, c.total.output_tokens,
                                   c.total.cached_tokens),
                         {u: Counts(s.request_count, s.input_tokens, s.output_tokens, s.cached_tokens)
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
            "last_updated": format_rfc3339(last_updated if last_updated is not None else self._now()),
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
            data = (json.dumps(self.to_json(), indent=2) + "\n").encode("utf-8")
            try:
                write_file_atomic(self.path, data, _existing_mode(self.path, 0o644))
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
        self._thread = threading.Thread(target=self._run_saver, name="ocm-usage-saver", daemon=True)
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


def check_writable_location(path: str) -> None:
    """Fail at start, not an hour later, when a file cannot be written where configured."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ConfigError("usages_path: directory %s does not exist" % directory)
    try:
        fd, probe = tempfile.mkstemp(prefix=".ocm-write-test.", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError("usages_path: cannot write in %s (%s)" % (directory, exc.strerror or exc))
    if os.path.exists(path) and not os.access(path, os.R_OK):
        raise ConfigError("usages_path: cannot read %s" % path)


# == 8. Users ================================================================

def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class UserTable:
    """Bearer tokens to users. Lookup is by SHA-256 digest, then compare_digest,
    so timing says nothing about how close a guess was."""

    def __init__(self, users: List[User]):
        self.users = list(users)
        self._by_digest = {token_digest(u.token): u for u in users}

    @property
    def is_open(self) -> bool:
        return not self.users

    def authenticate(self, headers: "Headers") -> Optional[User]:
        """The user for these request headers; None when access is open.
        Raises HTTPError 401 with sing-box's messages."""
        if self.is_open:
            return None
        value = headers.get("authorization")
        if not value:
            raise HTTPError(401, "authentication_error", "missing api key")
        scheme, _, token = value.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise HTTPError(401, "authentication_error", "invalid api key format")
        digest = token_digest(token)
        user = self._by_digest.get(digest)
        if user is None or not hmac.compare_digest(token_digest(user.token), digest):
            raise HTTPError(401, "authentication_error", "invalid api key")
        return user


# == 9. Upstream =============================================================

@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int

    @property
    def is_tls(self) -> bool:
        return self.scheme in ("https", "wss")


@dataclass(frozen=True)
class BaseURL:
    """A parsed upstream base URL: where to connect and the path prefix."""
    origin: Origin
    path: str

    @classmethod
    def parse(cls, url: str) -> "BaseURL":
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(Origin(parts.scheme, parts.hostname or "", port), parts.path.rstrip("/"))


_ssl_context = None
_ssl_context_lock = threading.Lock()


def upstream_ssl_context():
    """One verifying TLS context (system store; SSL_CERT_FILE/DIR honoured), made lazily."""
    global _ssl_context
    with _ssl_context_lock:
        if _ssl_context is None:
            import ssl
            context = ssl.create_default_context()
            context.set_alpn_protocols(["http/1.1"])
            _ssl_context = context
        return _ssl_context


class UpstreamConnection(http.client.HTTPConnection):
    """http.client connection that opens as OCM says (timeouts, TLS)."""

    def __init__(self, origin: Origin, connect_timeout: float, read_timeout: float):
        super().__init__(origin.host, origin.port, timeout=connect_timeout)
        self.origin = origin
        self.read_timeout = read_timeout
        self.idle_since = 0.0

    def connect(self) -> None:
        super().connect()  # TCP, with TCP_NODELAY set by http.client
        if self.origin.is_tls:
            self.sock = upstream_ssl_context().wrap_socket(self.sock, server_hostname=self.origin.host)
        self.sock.settimeout(self.read_timeout)

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
    """True if an idle pooled socket has data or EOF waiting: the server gave up on it."""
    try:
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

    def __init__(self, connect_timeout: float, read_timeout: float,
                 idle_seconds: float = POOL_IDLE_SECONDS, max_idle: int = POOL_MAX_IDLE_PER_ORIGIN):
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
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
            if now - conn.idle_since < self.idle_seconds and conn.sock is not None \
                    and not is_socket_stale(conn.sock):
                return conn, True
            conn.close()
        conn = UpstreamConnection(origin, self.connect_timeout, self.read_timeout)
        with self._lock:
            self.opened += 1
        conn.connect()
        return conn, False

    def release(self, conn: UpstreamConnection) -> None:
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


def describe_connect_error(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return "cannot resolve host name (%s)" % (exc.strerror or exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or exc.__class__.__name__


class _OriginHTTPHandler(urllib.request.HTTPHandler):
    """urllib handler that opens connections the way the relay does."""

    def __init__(self, connection_factory: Callable):
        super().__init__()
        self._factory = connection_factory

    def http_open(self, req):
        return self.do_open(self._factory, req)


class _OriginHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, connection_factory: Callable):
        super().__init__()
        self._factory = connection_factory

    def https_open(self, req):
        return self.do_open(self._factory, req)


def build_url_opener(connect_timeout: float) -> Callable:
    """``open_url(request, timeout)`` for token calls: urllib on OCM's own connections."""

    def make_for(scheme: str) -> Callable:
        def make(host: str, timeout: Optional[float] = None, **_ignored) -> UpstreamConnection:
            # urllib hands over "host[:port]"; the scheme is the handler's.
            parts = urllib.parse.urlsplit("//" + host)
            origin = Origin(scheme, parts.hostname or host,
                            parts.port or (443 if scheme == "https" else 80))
            read_timeout = timeout if timeout is not None else TOKEN_CALL_TIMEOUT
            return UpstreamConnection(origin, min(connect_timeout, read_timeout), read_timeout)
        return make

    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.UnknownHandler(), urllib.request.HTTPDefaultErrorHandler(),
                    urllib.request.HTTPErrorProcessor(),
                    _OriginHTTPHandler(make_for("http")), _OriginHTTPSHandler(make_for("https"))):
        opener.add_handler(handler)

    def open_url(request: urllib.request.Request, timeout: float):
        return opener.open(request, timeout=timeout)

    return open_url


# == 10. HTTP parsing ========================================================

class Headers:
    """Header fields in arrival order, looked up case-insensitively."""
    __slots__ = ("_items", "_index")

    def __init__(self, items: Optional[List[Tuple[str, str]]] = None):
        self._items = []   # type: List[Tuple[str, str]]
        self._index = {}   # type: Dict[str, List[str]]
        for name, value in items or ():
            self.add(name, value)

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
_BAD_TARGET_BYTES = re.compile(rb"[\x00-\x20\x7f]")
_HEX_SIZE = re.compile(rb"^[0-9A-Fa-f]{1,16}$")


def bad_request(message: str, status: int = 400) -> HTTPError:
    return HTTPError(status, "invalid_request_error", message, close=True)


@dataclass
class ClientRequest:
    method: str
    target: str
    version: str
    headers: Headers
    path: str = ""
    query: str = ""
    body: bytes = b""
    body_kind: str = "none"     # none | length | chunked
    body_length: int = 0
    body_read: bool = False
    keep_alive: bool = True
    started: float = 0.0


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
        raise bad_request("request target has spaces or control characters")
    if len(lines) - 1 > limits.max_header_count:
        raise bad_request("more than %d header fields" % limits.max_header_count, 431)
    headers = Headers()
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise bad_request("obsolete header line folding is not accepted")
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN_BYTES.match(name):
            raise bad_request("invalid header name %r" % name[:40].decode("latin-1"))
        value = value.strip(b" \t")
        if _BAD_VALUE_BYTES.search(value):
            raise bad_request("header %s has control characters" % name.decode("ascii"))
        headers.add(name.decode("ascii"), value.decode("latin-1"))
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
        request.path, request.query = path, query
    return request


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
            raise bad_request("unsupported transfer coding %r; only chunked" % ", ".join(codings), 400)
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


class SocketReader:
    """Buffered reads from a client socket with deadlines a slow client cannot stretch."""
    __slots__ = ("sock", "buf")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()

    def _recv(self, deadline: float) -> bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("deadline passed")
        self.sock.settimeout(remaining)
        try:
            return self.sock.recv(RELAY_CHUNK)
        except (ConnectionError, OSError) as exc:
            if isinstance(exc, socket.timeout):
                raise
            raise ClientGone(str(exc))

    def read_head(self, limits: Limits) -> Optional[bytes]:
        """One request head through its blank line; None if the client closed
        or stayed idle between requests."""
        if not self.buf:
            try:
                data = self._recv(time.monotonic() + limits.idle_timeout)
            except socket.timeout:
                return None
            if not data:
                return None
            self.buf += data
        deadline = time.monotonic() + limits.header_timeout
        limit = limits.max_header_size + limits.max_request_line
        start = 0
        while True:
            end = self.buf.find(b"\r\n\r\n", start)
            if end >= 0:
                head = bytes(self.buf[:end + 4])
                del self.buf[:end + 4]
                return head
            first_line_end = self.buf.find(b"\r\n")
            if first_line_end < 0 and len(self.buf) > limits.max_request_line:
                raise bad_request("request line longer than %d bytes" % limits.max_request_line, 414)
            if len(self.buf) > limit:
                raise bad_request("request head larger than %d bytes" % limits.max_header_size, 431)
            start = max(0, len(self.buf) - 3)
            try:
                data = self._recv(deadline)
            except socket.timeout:
                raise bad_request("request head not received within %g s" % limits.header_timeout, 408)
            if not data:
                raise ClientGone("closed in the middle of a request head")
            self.buf += data

    def read_exact(self, size: int, timeout: float) -> bytes:
        while len(self.buf) < size:
            try:
                data = self._recv(time.monotonic() + timeout)
            except socket.timeout:
                raise bad_request("request body stalled for %g s" % timeout, 408)
            if not data:
                raise ClientGone("closed in the middle of a request body")
            self.buf += data
        out = bytes(self.buf[:size])
        del self.buf[:size]
        return out

    def read_line(self, max_length: int, timeout: float) -> bytes:
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
                data = self._recv(time.monotonic() + timeout)
            except socket.timeout:
                raise bad_request("request body stalled for %g s" % timeout, 408)
            if not data:
                raise ClientGone("closed in the middle of a request body")
            self.buf += data


def read_chunked_body(reader: SocketReader, max_size: int, timeout: float) -> bytes:
    """A chunked request body, strictly framed (RFC 9112 section 7.1)."""
    body = bytearray()
    while True:
        line = reader.read_line(4096, timeout)
        size_text = line.split(b";", 1)[0]
        if not _HEX_SIZE.match(size_text):
            raise bad_request("invalid chunk size line")
        size = int(size_text, 16)
        if size == 0:
            break
        if len(body) + size > max_size:
            raise HTTPError(413, "invalid_request_error",
                            "request body larger than %d bytes" % max_size, close=True)
        body += reader.read_exact(size, timeout)
        if reader.read_exact(2, timeout) != b"\r\n":
            raise bad_request("chunk data not followed by CRLF")
    for _ in range(64):  # trailer fields: read and drop
        if not reader.read_line(8192, timeout):
            return bytes(body)
    raise bad_request("too many trailer fields")


# == 11. Streams =============================================================

class SSEScanner:
    """Finds whole server-sent events in a copy of relayed bytes, incrementally:
    an event split across reads (at any byte) is seen once, complete.

    Only the ``data:`` lines matter (Codex reads nothing else), and only events
    that mention "usage" are parsed as JSON: parsing every text delta would
    cost the relay CPU for nothing.
    """
    __slots__ = ("_on_event", "_tail", "_data", "_size", "_skip_lf", "_max", "broken")

    def __init__(self, on_event: Callable[[Any], None], max_event: int = 32 << 20):
        self._on_event = on_event
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
        log.warning("an event larger than %d bytes: usage scanning stops for this stream", self._max)
        self.broken = True
        self._data, self._tail = [], b""

    def _dispatch(self) -> None:
        if not self._data:
            return
        payload = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
        self._data = []
        self._size = 0
        if b'"usage"' not in payload:
            return
        try:
            event = json.loads(payload)
        except ValueError:
            return
        self._on_event(event)


def is_accounted_path(path: str) -> bool:
    return path.startswith("/v1/responses") or path == "/v1/chat/completions"


class UsageTap:
    """Reads usage from a copy of one relayed response body: SSE events as they
    pass, or a JSON body when it is complete. Never touches the relayed bytes."""
    __slots__ = ("_record", "_request", "_scanner", "_parts", "_size", "_fallback")

    JSON_LIMIT = 32 << 20

    def __init__(self, record: Callable[[UsageRecord], None], request: "ClientRequest", content_type: str):
        self._record = record
        self._request = request
        self._fallback = None  # type: Optional[Tuple[str, str]]
        self._parts = None     # type: Optional[List[bytes]]
        self._size = 0
        self._scanner = None   # type: Optional[SSEScanner]
        if content_type.startswith("text/event-stream"):
            self._scanner = SSEScanner(self._on_event)
        elif "json" in content_type:
            self._parts = []

    def request_defaults(self) -> Tuple[str, str]:
        """(model, service_tier) from the request body, parsed only when a
        response lacks them (Codex bodies can be megabytes)."""
        if self._fallback is None:
            self._fallback = request_model_and_tier(self._request.body)
        return self._fallback

    def _on_event(self, event: Any) -> None:
        if not isinstance(event, dict):
            return
        response = event.get("response") if isinstance(event.get("response"), dict) else event
        need_defaults = not response.get("model") or not response.get("service_tier")
        model, tier = self.request_defaults() if need_defaults else ("", "")
        record = usage_record_from_event(event, model, tier)
        if record is not None:
            self._record(record)

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
        if self._scanner is not None:
            self._scanner.finish()
        elif self._parts is not None and complete:
            try:
                body = json.loads(b"".join(self._parts))
            except ValueError:
                return
            model, tier = self.request_defaults() if isinstance(body, dict) and (
                not body.get("model") or not body.get("service_tier")) else ("", "")
            record = usage_record_from(body, model, tier)
            if record is not None:
                self._record(record)


def request_model_and_tier(body: bytes) -> Tuple[str, str]:
    try:
        data = json.loads(body) if body else {}
    except ValueError:
        return "", ""
    if not isinstance(data, dict):
        return "", ""
    model, tier = data.get("model"), data.get("service_tier")
    return (model if isinstance(model, str) else "", tier if isinstance(tier, str) else "")


# == 12. Handler =============================================================

def json_error_body(error_type: str, message: str) -> bytes:
    return json.dumps({"error": {"type": error_type, "message": message}}).encode("utf-8")


def connection_listed(headers) -> set:
    """Header names a Connection header marks hop-by-hop."""
    names = set()
    for value in headers:
        names.update(part.strip().lower() for part in value.split(",") if part.strip())
    return names


def build_upstream_headers(client: Headers, config_headers: Dict[str, List[str]],
                           login: Login, body_length: Optional[int]) -> List[Tuple[str, str]]:
    """Client headers minus hop-by-hop and credentials, config headers on top,
    then the owner's Authorization and account id (PROTOCOL.md section 1)."""
    dropped = HOP_BY_HOP | CLIENT_CREDENTIAL_HEADERS | OCM_SET_HEADERS | connection_listed(
        client.get_all("connection")) | {name.lower() for name in config_headers}
    out = [(name, value) for name, value in client.items() if name.lower() not in dropped]
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


def response_headers_to_forward(message) -> List[Tuple[str, str]]:
    listed = connection_listed(message.get_all("connection") or [])
    return [(name, value) for name, value in message.items()
            if name.lower() not in HOP_BY_HOP and name.lower() not in listed
            and name.lower() != "content-length"]


def encode_head(status: int, reason: str, headers: List[Tuple[str, str]]) -> bytes:
    lines = ["HTTP/1.1 %d %s\r\n" % (status, reason or REASONS.get(status, ""))]
    lines.extend("%s: %s\r\n" % item for item in headers)
    lines.append("\r\n")
    return "".join(lines).encode("latin-1", "replace")


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
            with contextlib.suppress(OSError):
                self.upstream_sock.shutdown(socket.SHUT_RDWR)


class OCMHandler(BaseHTTPRequestHandler):
    """One client connection: read requests, authenticate, relay. Keep-alive aware."""

    server = None  # type: OCMServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        self.connection = self.request
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = SocketReader(self.connection)
        self.head_sent = False

    def finish(self) -> None:
        pass  # the server closes the socket

    def handle(self) -> None:
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
            self.connection.sendall(data)
        except OSError as exc:
            raise ClientGone(str(exc))

    def send_json(self, status: int, body: bytes, close: bool = False,
                  extra: Optional[List[Tuple[str, str]]] = None) -> None:
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        headers.extend(extra or ())
        if close:
            headers.append(("Connection", "close"))
        self.connection.settimeout(self.server.config.limits.body_timeout)
        self.write(encode_head(status, REASONS.get(status, ""), headers) + body)
        self.head_sent = True

    def send_error_json(self, error: HTTPError, close: bool) -> None:
        self.send_json(error.status, json_error_body(error.error_type, error.message), close=close)

    # -- one request ----------------------------------------------------------
    def serve_one(self) -> bool:
        """Serve one request; True to keep the connection for another."""
        limits = self.server.config.limits
        self.head_sent = False
        request = None
        try:
            head = self.reader.read_head(limits)
            if head is None:
                return False
            request = parse_request_head(head, limits)
            request.started = time.monotonic()
            self.dispatch(request)
            return request.keep_alive and request.body_read
        except HTTPError as exc:
            if self.head_sent:
                return False
            close = exc.close or request is None or not request.keep_alive or not self.drain_body(request)
            self.send_error_json(exc, close)
            if request is not None:
                self.log_request_line(request, exc.status)
            return not close

    def drain_body(self, request: ClientRequest) -> bool:
        """Read and drop the unread body of a refused request so the connection
        can carry on; False when it is too big or broken (then we close)."""
        if request.body_read:
            return True
        if request.body_kind == "length" and request.body_length > DISCARD_BODY_LIMIT:
            return False
        try:
            self.read_body(request, DISCARD_BODY_LIMIT)
        except (HTTPError, ClientGone):
            return False
        return True

    def read_body(self, request: ClientRequest, max_size: int) -> bytes:
        timeout = self.server.config.limits.body_timeout
        if request.body_kind == "length":
            if request.body_length > max_size:
                raise HTTPError(413, "invalid_request_error",
                                "request body of %d bytes is larger than the limit of %d"
                                % (request.body_length, max_size), close=True)
            request.body = self.reader.read_exact(request.body_length, timeout)
        elif request.body_kind == "chunked":
            request.body = read_chunked_body(self.reader, max_size, timeout)
        request.body_read = True
        return request.body

    def dispatch(self, request: ClientRequest) -> None:
        server = self.server
        if not request.path.startswith("/"):
            raise bad_request("only origin-form request targets are accepted (\"/v1/...\")")
        if not request.path.startswith("/v1/"):
            raise HTTPError(404, "invalid_request_error",
                            "no such path %s: OCM serves the OpenAI API under /v1/" % request.path[:200])
        if is_unsafe_path(request.path):
            raise HTTPError(400, "invalid_request_error", "path has dot segments or encoded slashes")
        user = server.users.authenticate(request.headers)
        if request.headers.has_token("expect", "100-continue") and request.body_kind != "none":
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.read_body(request, server.config.limits.max_body_size)
        status = self.relay_http(request, user)
        self.log_request_line(request, status, user)

    def log_request_line(self, request: ClientRequest, status: int, user: Optional[User] = None) -> None:
        log.info("%s %s %s %d %.3fs", user.name if user else "-", request.method,
                 request.path[:200], status, time.monotonic() - request.started)

    # -- relaying ---------------------------------------------------------------
    def relay_http(self, request: ClientRequest, user: Optional[User]) -> int:
        """Send the request upstream (refreshing once on 401) and relay the answer."""
        server = self.server
        credential = server.credential
        login = credential.current()
        base, upstream_path = server.upstream_target(login.mode, request.path, request.query)
        has_body = request.body_kind != "none" or request.method in ("POST", "PUT", "PATCH")
        retried = False
        while True:
            headers = build_upstream_headers(request.headers, server.config.headers, login,
                                             len(request.body) if has_body else None)
            conn, response = server.send_upstream(base.origin, request.method, upstream_path,
                                                  headers, request.body if has_body else None)
            if response.status == 401 and login.mode == "chatgpt" and not retried:
                body, complete = read_small_body(response)
                server.finish_upstream(conn, response, complete)
                new_login = credential.refresh(login.access_token)
                if new_login.access_token != login.access_token:
                    log.info("upstream refused the access token; refreshed, retrying once")
                    login, retried = new_login, True
                    continue
                self.send_buffered(request, response, body)
                return response.status
            break
        tap = server.usage_tap(request, user, response)
        self.relay_response(request, conn, response, tap)
        return response.status

    def send_buffered(self, request: ClientRequest, response, body: bytes) -> None:
        headers = response_headers_to_forward(response.msg)
        headers.append(("Content-Length", str(len(body))))
        if not request.keep_alive:
            headers.append(("Connection", "close"))
        self.write(encode_head(response.status, response.reason, headers) + body)
        self.head_sent = True

    def relay_response(self, request: ClientRequest, conn: UpstreamConnection, response,
                       tap: Optional[UsageTap] = None) -> None:
        """Status, headers and body unchanged (minus hop-by-hop). Known lengths pass
        as they are; unknown lengths (SSE) go out chunked, each read flushed."""
        server = self.server
        headers = response_headers_to_forward(response.msg)
        status = response.status
        no_body = request.method == "HEAD" or status in (204, 304) or 100 <= status < 200
        complete = False
        try:
            if no_body:
                length = response.msg.get("content-length")
                if request.method == "HEAD" and length is not None:
                    headers.append(("Content-Length", length))
                body, complete = read_small_body(response)
                self.finish_head(request, status, response.reason, headers)
                return
            if response.length is not None and response.length <= SMALL_BODY:
                body, complete = read_small_body(response)
                if not complete:
                    raise HTTPError(502, "api_error", "upstream closed the connection mid-response")
                headers.append(("Content-Length", str(len(body))))
                self.finish_head(request, status, response.reason, headers, body)
                if tap is not None:
                    tap.feed(body)
                return
            if response.length is not None:
                headers.append(("Content-Length", str(response.length)))
                self.finish_head(request, status, response.reason, headers)
                complete = self.stream_body(request, conn, response, False, tap)
            elif request.version == "HTTP/1.1":
                headers.append(("Transfer-Encoding", "chunked"))
                self.finish_head(request, status, response.reason, headers)
                complete = self.stream_body(request, conn, response, True, tap)
            else:  # an HTTP/1.0 client: the end of the body is the end of the connection
                request.keep_alive = False
                self.finish_head(request, status, response.reason, headers)
                complete = self.stream_body(request, conn, response, False, tap)
            if not complete:
                request.keep_alive = False
        finally:
            server.finish_upstream(conn, response, complete)
            if tap is not None:
                tap.finish(complete)

    def finish_head(self, request: ClientRequest, status: int, reason: str,
                    headers: List[Tuple[str, str]], body: bytes = b"") -> None:
        if not request.keep_alive:
            headers.append(("Connection", "close"))
        self.connection.settimeout(self.server.config.limits.body_timeout)
        self.write(encode_head(status, reason, headers) + body)
        self.head_sent = True

    def stream_body(self, request: ClientRequest, conn: UpstreamConnection, response,
                    chunked: bool, tap: Optional[UsageTap]) -> bool:
        """Copy the body as it arrives. True if it ended cleanly; False if upstream
        broke off (the client then sees a truncated body: no final chunk)."""
        context = StreamContext(conn.sock)
        watcher = self.server.watcher
        watcher.watch(self.connection, context)
        try:
            ended = self.copy_body(request, response, chunked, context, tap)
        finally:
            # Before the last write: a client that closes right after the final
            # chunk must not be taken for a hang-up that cuts a pooled connection.
            watcher.unwatch(self.connection, context)
        if ended and chunked:
            self.write(b"0\r\n\r\n")
        return ended

    def copy_body(self, request: ClientRequest, response, chunked: bool,
                  context: StreamContext, tap: Optional[UsageTap]) -> bool:
        while True:
            if response.length == 0:
                response.read()  # marks it closed (read1 does not before 3.13)
                return True
            try:
                data = response.read1(RELAY_CHUNK)
            except (http.client.HTTPException, OSError, ValueError) as exc:
                if context.client_gone:
                    raise ClientGone("hung up while waiting for upstream")
                log.warning("%s %s: upstream stream broke off: %s", request.method,
                            request.path[:200], describe_connect_error(exc))
                return False
            if not data:
                if context.client_gone:
                    raise ClientGone("hung up while waiting for upstream")
                if response.length:  # Content-Length promised more
                    log.warning("%s %s: upstream closed with %d bytes missing",
                                request.method, request.path[:200], response.length)
                    return False
                return True
            if chunked:
                self.write(b"%x\r\n%s\r\n" % (len(data), data))
            else:
                self.write(data)
            if tap is not None:  # after the write: accounting never delays the client
                tap.feed(data)


def read_small_body(response, limit: int = 1 << 20) -> Tuple[bytes, bool]:
    """Read a whole (small) upstream body. (body, complete)."""
    try:
        body = response.read(limit) if response.length is None else response.read()
    except http.client.IncompleteRead as exc:
        return exc.partial, False
    except (http.client.HTTPException, OSError, ValueError):
        return b"", False
    return body, response.isclosed()


def is_unsafe_path(path: str) -> bool:
    """Dot segments or encoded slashes could walk out of the upstream base path."""
    lowered = path.lower()
    if "%2f" in lowered or "%5c" in lowered or "\\" in path:
        return True
    segments = urllib.parse.unquote(path).split("/")
    return any(segment in (".", "..") for segment in segments)


class HangupWatcher:
    """One thread that notices clients hanging up while their stream waits on
    upstream, and cuts that upstream connection at once."""

    def __init__(self):
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._thread = None
        self._closed = False

    def watch(self, sock: socket.socket, context: StreamContext) -> None:
        with self._lock:
            if self._closed:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ocm-hangup", daemon=True)
                self._thread.start()
            try:
                self._selector.register(sock, selectors.EVENT_READ, context)
            except (KeyError, ValueError, OSError):
                return
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def unwatch(self, sock: socket.socket, context: StreamContext) -> None:
        with context.lock:
            context.active = False
        with self._lock:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(sock)

    def _run(self) -> None:
        while not self._closed:
            try:
                events = self._selector.select(timeout=1.0)
            except (OSError, ValueError):
                time.sleep(0.05)
                continue
            for key, _ in events:
                if key.data is None:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                    continue
                self._check(key.fileobj, key.data)

    def _check(self, sock: socket.socket, context: StreamContext) -> None:
        with context.lock:
            if not context.active:
                return
            gone = peek_is_closed(sock)
        if gone is None:
            return
        with self._lock:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(sock)
        if gone:
            context.hang_up()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(timeout=2)
        with contextlib.suppress(OSError):
            self._selector.close()
        self._wake_r.close()
        self._wake_w.close()


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


# == 13. Server ==============================================================

class OCMServer(ThreadingHTTPServer):
    """The listening server. It owns the config, the credential, the users,
    the upstream pool and the hang-up watcher; ``close()`` releases them."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, config: Config, bind_and_activate: bool = True,
                 usage_save_interval: float = 60.0):
        self.config = config
        self.users = UserTable(config.users)
        limits = config.limits
        self.pool = UpstreamPool(limits.connect_timeout, limits.upstream_read_timeout)
        self.open_url = build_url_opener(limits.connect_timeout)
        self.credential = Credential(config.credential_path, config.upstream.token_url, self.open_url)
        self.usage = None  # type: Optional[UsageBook]
        if config.usages_path:
            check_writable_location(config.usages_path)
            self.usage = UsageBook(config.usages_path, save_interval=usage_save_interval)
            self.usage.load()
        self.chatgpt_base = BaseURL.parse(config.upstream.chatgpt_url)
        self.api_base = BaseURL.parse(config.upstream.api_url)
        self.watcher = HangupWatcher()
        self.address_family = socket.AF_INET6 if ":" in config.listen else socket.AF_INET
        try:
            super().__init__((config.listen, config.listen_port), OCMHandler, bind_and_activate)
        except BaseException:
            self.watcher.close()
            raise
        if self.usage is not None:
            self.usage.start_saver()

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls getfqdn(), a DNS lookup that can stall
        # start-up for seconds on a box without DNS. Skip it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[0], self.server_address[1]

    @property
    def url(self) -> str:
        host = self.server_address[0]
        if ":" in host:
            host = "[%s]" % host
        return "http://%s:%d" % (host, self.server_address[1])

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

    def send_upstream(self, origin: Origin, method: str, path: str,
                      headers: List[Tuple[str, str]], body: Optional[bytes]):
        """Send one request on a pooled connection: (connection, response).
        A reused connection the server had already dropped is retried once on a
        new one. Raises HTTPError 502/504 for an unreachable or silent upstream."""
        for attempt in (1, 2):
            try:
                conn, reused = self.pool.acquire(origin)
            except (OSError, http.client.HTTPException) as exc:
                raise HTTPError(502, "api_error", "upstream %s unreachable: %s"
                                % (origin.host, describe_connect_error(exc)))
            try:
                conn.putrequest(method, path, skip_accept_encoding=True)
                for name, value in headers:
                    conn.putheader(name, value)
                conn.endheaders(body)
                return conn, conn.getresponse()
            except socket.timeout:
                conn.close()
                raise HTTPError(504, "api_error", "upstream %s did not answer within %g s"
                                % (origin.host, self.config.limits.upstream_read_timeout))
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                if reused and attempt == 1 and isinstance(exc, (
                        ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine)):
                    continue  # the idle connection had gone stale
                raise HTTPError(502, "api_error", "upstream %s failed: %s"
                                % (origin.host, describe_connect_error(exc)))
        raise AssertionError("unreachable")

    def usage_tap(self, request: ClientRequest, user: Optional[User], response) -> Optional[UsageTap]:
        """A tap for responses that carry usage, when anything records it."""
        if self.usage is None or not 200 <= response.status < 300 or not is_accounted_path(request.path):
            return None
        week_start = week_start_from_headers(response.msg)
        name = user.name if user else ""
        return UsageTap(lambda record: self.account(name, record, week_start), request,
                        (response.msg.get("content-type") or "").lower())

    def account(self, user_name: str, record: UsageRecord, week_start: Optional[int]) -> None:
        """The one accounting entry point: HTTP JSON, SSE and WebSocket all end here."""
        if self.usage is not None:
            self.usage.record(user_name, record, week_start)
        log.debug("usage %s: %s %s in=%d cached=%d out=%d", user_name or "-", record.model,
                  record.service_tier or "default", record.input_tokens, record.cached_tokens,
                  record.output_tokens)

    def finish_upstream(self, conn: UpstreamConnection, response, complete: bool) -> None:
        """Back to the pool only if the response was read to its end."""
        if complete and response.isclosed() and not response.will_close and conn.sock is not None:
            self.pool.release(conn)
        else:
            conn.close()

    def close(self) -> None:
        """Stop everything this server owns. Call after shutdown()."""
        self.watcher.close()
        self.pool.close()
        self.server_close()
        if self.usage is not None:
            self.usage.close()


# == 14. CLI =================================================================

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
            parts.append("access token expires in %dm" % (left // 60) if left > 0 else "access token expired")
    return ", ".join(parts)


def run_check(config: Config) -> int:
    credential = Credential(config.credential_path, config.upstream.token_url, open_url=None)
    login, problem = credential.peek()
    print("config:      %s" % (config.source or "(defaults)"))
    print("listen:      %s:%d" % (config.listen, config.listen_port))
    print("credential:  %s" % config.credential_path)
    print("             %s" % describe_credential(credential, time.time()))
    print("users:       %s" % (", ".join(u.name for u in config.users) or "none (open access)"))
    print("upstream:    %s" % (config.upstream.chatgpt_url if login is None or login.mode == "chatgpt"
                               else config.upstream.api_url))
    if config.usages_path:
        print("usage file:  %s" % config.usages_path)
        try:
            check_writable_location(config.usages_path)
        except ConfigError as exc:
            print("problem:     %s" % exc, file=sys.stderr)
            return 2
    if login is None:
        print("problem:     credential unavailable: %s" % problem, file=sys.stderr)
        return 2
    return 0


def serve(config: Config) -> int:
    """Run until SIGTERM or SIGINT; 0 on a clean stop."""
    try:
        server = OCMServer(config)
    except ConfigError as exc:
        print("ocm: config error: %s" % exc, file=sys.stderr)
        return 2
    except OSError as exc:
        print("ocm: cannot listen on %s:%d: %s" % (config.listen, config.listen_port,
                                                   exc.strerror or exc), file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    login, problem = server.credential.peek()
    mode = login.mode_name if login else "no usable credential yet (%s)" % problem
    users = len(config.users)
    print("OCM %s listening on %s/v1 (%s, %s)" % (
        __version__, server.url, mode,
        "%d user%s" % (users, "" if users == 1 else "s") if users else "no users: open access"),
        flush=True)
    if not users and config.listen not in ("127.0.0.1", "::1", "localhost"):
        log.warning("no users configured and listening on %s: anyone who can reach this port "
                    "uses the owner's subscription", config.listen)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                              name="ocm-accept", daemon=True)
    thread.start()
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.shutdown()
        thread.join()
        server.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("stopped")
    return 0


def _usage_source(path: str) -> str:
    """A usage file as given, or the usages_path of a config file."""
    try:
        with open(path, "rb") as fh:
            data = json.loads(fh.read().decode("utf-8-sig"))
    except OSError as exc:
        raise ConfigError("cannot read %s: %s" % (path, exc.strerror or exc))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError("%s is not valid JSON: %s" % (path, exc))
    if isinstance(data, dict) and ("combinations" in data or "costs" in data):
        return path
    config = config_from_dict(data, source=path)
    if not config.usages_path:
        raise ConfigError("%s has no usages_path; give the usage file itself" % path)
    return config.usages_path


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
                               ", 1M context" if combo["context_window"] == PREMIUM_CONTEXT_WINDOW else "")
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


def format_usage_report(path: str, summary: Dict[str, Any]) -> str:
    columns = ("request_count", "input_tokens", "cached_tokens", "output_tokens")
    lines = ["OCM usage from %s (last updated %s)" % (path, summary["last_updated"]), ""]

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


def run_usage(argv: List[str]) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="ocm.py usage",
                                     description="Print who used what: cost and tokens per user, "
                                                 "model and week, and the total.")
    parser.add_argument("source", metavar="USAGES_PATH|CONFIG",
                        help="the usage file, or an OCM config naming it in usages_path")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    try:
        path = _usage_source(args.source)
        book = UsageBook(path)
        book.load(repair=False)
    except ConfigError as exc:
        print("ocm: %s" % exc, file=sys.stderr)
        return 2
    except FileNotFoundError:
        print("ocm: no usage recorded yet: %s does not exist" % path, file=sys.stderr)
        return 2
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        print("ocm: cannot read usage file %s: %s" % (path, exc), file=sys.stderr)
        return 2
    summary = summarize_usage(book.to_json())
    if args.json:
        print(json.dumps(dict(summary, source=path), indent=2))
    else:
        sys.stdout.write(format_usage_report(path, summary))
    return 0


def _config_or_defaults(path: Optional[str]) -> Config:
    return load_config(path) if path else Config()


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
    lines.append("usable:        " + ("yes" if usable else "no: the access token has expired and there "
                                      "is no refresh token; sign in again"))
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
        lines.append("access token:  valid until %s (%s left)" % (format_time(login.expires_at),
                                                                  format_age(login.expires_at - now)))
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
                                     description="Say whether the login in the credential file is usable: "
                                                 "mode, account, plan, access-token expiry, last refresh. "
                                                 "Reads the file only; changes nothing.")
    parser.add_argument("config", nargs="?", help="config file naming credential_path (default: as serving)")
    args = parser.parse_args(argv)
    try:
        config = _config_or_defaults(args.config)
    except ConfigError as exc:
        print("ocm: config error: %s" % exc, file=sys.stderr)
        return 2
    lines, usable = describe_status(config.credential_path, now())
    print("\n".join(lines), file=out or sys.stdout)
    return 0 if usable else 2


def ask_to_replace(path: str, stdin, out) -> bool:
    """True when ``path`` holds no login, or the user agrees to replace it.

    Without a terminal to ask on, refuse: a script must say --force.
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
        print("ocm: %s already holds a login (%s); run `ocm.py login --force` to replace it"
              % (path, who), file=sys.stderr)
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
                                     description="Give this box its own ChatGPT login (device code, or a "
                                                 "browser with paste-back) and write the credential file.")
    parser.add_argument("config", nargs="?",
                        help="config file naming credential_path and upstream.issuer_url (default: as serving)")
    parser.add_argument("--paste", action="store_true",
                        help="sign in in a browser and paste back the address it ends on "
                             "(for accounts without device codes)")
    parser.add_argument("--force", action="store_true", help="replace an existing login without asking")
    args = parser.parse_args(argv)
    stdin = sys.stdin if stdin is None else stdin
    out = out or sys.stdout
    try:
        config = _config_or_defaults(args.config)
    except ConfigError as exc:
        print("ocm: config error: %s" % exc, file=sys.stderr)
        return 2
    path, issuer = config.credential_path, config.upstream.issuer_url
    if not args.force and not ask_to_replace(path, stdin, out):
        return 1
    open_url = build_url_opener(config.limits.connect_timeout)
    try:
        if args.paste:
            tokens = sign_in_with_browser(issuer, open_url, stdin, out, ports, timeout, now)
        else:
            try:
                tokens = sign_in_with_device_code(issuer, open_url, out, interval_floor, timeout, sleep, now)
            except DeviceCodeUnavailable as exc:
                print("\nThe issuer says %s; signing in through a browser instead." % exc, file=out)
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
                                                 " (%s)" % ", ".join(details) if details else "", path), file=out)
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
                                     description="Revoke the ChatGPT login's refresh token and remove the "
                                                 "tokens from the credential file, keeping its other fields.")
    parser.add_argument("config", nargs="?",
                        help="config file naming credential_path and upstream.issuer_url (default: as serving)")
    args = parser.parse_args(argv)
    out = out or sys.stdout
    try:
        config = _config_or_defaults(args.config)
    except ConfigError as exc:
        print("ocm: config error: %s" % exc, file=sys.stderr)
        return 2
    path = config.credential_path
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
            revoke_refresh_token(config.upstream.issuer_url,
                                 build_url_opener(config.limits.connect_timeout), refresh)
        except LoginFailed as exc:
            print("ocm: could not revoke the refresh token (%s); it stays valid until it expires"
                  % exc, file=sys.stderr)
            return 1
        print("The refresh token is revoked.", file=out)
    return 0


SUBCOMMANDS = {"usage": run_usage, "login": run_login, "logout": run_logout, "status": run_status}


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        try:
            return SUBCOMMANDS[argv[0]](argv[1:])
        except KeyboardInterrupt:  # Ctrl-C at a prompt or while waiting to sign in
            print("\nocm: cancelled", file=sys.stderr)
            return 130
    import argparse
    parser = argparse.ArgumentParser(
        prog="ocm.py",
        description="OCM relays remote Codex clients to OpenAI through the owner's "
                    "ChatGPT login or API key, with a token per user.",
        epilog="Without CONFIG: listen on 127.0.0.1:8080 with $CODEX_HOME/auth.json "
               "or ~/.codex/auth.json. Other commands: `ocm.py login [CONFIG]` signs the box "
               "in (--paste, --force), `ocm.py logout [CONFIG]`, `ocm.py status [CONFIG]`, "
               "`ocm.py usage FILE` reports usage. "
               "See README.md for the config keys.")
    parser.add_argument("config", nargs="?", help="config file (OCM JSON, or a sing-box config with an ocm service)")
    parser.add_argument("--check", action="store_true",
                        help="validate the config and the credential, print a summary, exit 0 (or 2)")
    parser.add_argument("--log-level", default="info",
                        choices=("debug", "info", "warning", "error"), help="default: info")
    parser.add_argument("--version", action="version", version="ocm " + __version__)
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
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
