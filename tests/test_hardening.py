"""Hardening: OCM keeps serving under hostile input, faults and load, and
loses nothing. Every test here fails if its protection is removed."""

import contextlib
import errno
import io
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ocm
from test_ocm import (CODEX, CODEX_BODY, OCM_PY, USERS, completed_event, error_of, make_jwt, message_event, raw_exchange, read_json, sse,
                      wait_for, write_auth)
from test_websocket import WSClient, WSUpstream, close_body, response_creates, ws_frame

FUZZ_EXAMPLES = int(os.environ.get("OCM_FUZZ_EXAMPLES", "25"))  # `make fuzz` runs 2000
fuzz_settings = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
                         suppress_health_check=list(HealthCheck))


def status_of(answer):
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None


def body_of(answer):
    return answer.partition(b"\r\n\r\n")[2]


AUTH = b"Authorization: Bearer tok-alice\r\n"


def works(proxy):
    """A normal request still gets a normal answer."""
    return proxy.request("GET", "/v1/models")[0] == 200


# == TestLimits ================================================================

class TestLimits:
    def test_slowloris_is_dropped_without_holding_others(self, make_proxy, fake):
        proxy = make_proxy(limits={"header_timeout": 0.5})
        sock = socket.create_connection(("127.0.0.1", proxy.port))
        started = time.monotonic()
        sock.sendall(b"GET /v1/models HTTP/1.1\r\n")
        answer = b""
        sock.settimeout(0.1)
        while time.monotonic() - started < 3:
            try:
                sock.sendall(b"X-Drip: 1\r\n")  # a header line every 0.1 s, never the end
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
            except socket.timeout:
                assert works(proxy)  # others are served meanwhile
            except OSError:
                break
        elapsed = time.monotonic() - started
        assert 0.4 < elapsed < 2.0
        assert status_of(answer) in (408, None)
        sock.close()

    def test_default_header_timeout_is_about_ten_seconds(self):
        assert ocm.Limits().header_timeout == 10.0

    def test_idle_keep_alive_connection_is_closed(self, make_proxy, fake):
        proxy = make_proxy(limits={"idle_timeout": 0.3})
        conn = proxy.conn()
        conn.request("GET", "/v1/models", headers={"Authorization": "Bearer tok-alice"})
        conn.getresponse().read()
        conn.sock.settimeout(3)
        started = time.monotonic()
        assert conn.sock.recv(10) == b""
        assert time.monotonic() - started < 1.5

    def test_a_keep_alive_wait_longer_than_send_timeout_is_not_cut(self, make_proxy, fake):
        """Reads wait in send_timeout slices (the socket keeps that timeout, no
        settimeout per request): a slice passing is not the idle deadline."""
        proxy = make_proxy(limits={"send_timeout": 0.2, "idle_timeout": 5})
        conn = proxy.conn()
        for pause in (0.0, 0.7):
            time.sleep(pause)
            conn.request("GET", "/v1/models", headers={"Authorization": "Bearer tok-alice"})
            answer = conn.getresponse()
            assert answer.status == 200 and answer.read()

    def test_a_deadline_a_microsecond_away_still_times_out_in_the_kernel(self, monkeypatch):
        """A zero struct timeval means no timeout at all: a read with less than
        a microsecond left must wait a moment, not for ever."""
        ours, peer = socket.socketpair()
        with ours, peer:
            reader = ocm.SocketReader(ours, 60.0)
            assert reader.use_kernel_timeouts(60.0) and ours.gettimeout() is None
            now = time.monotonic()
            clock = iter([now, now + 1.0])
            monkeypatch.setattr(ocm.time, "monotonic", lambda: next(clock, now + 1.0))
            unblock = threading.Timer(2.0, peer.shutdown, (socket.SHUT_WR,))
            unblock.start()
            started = time.time()
            try:
                with pytest.raises(socket.timeout):
                    reader._recv(now + 5e-7)
            finally:
                unblock.cancel()
            assert time.time() - started < 1.5

    def test_a_client_that_stops_reading_a_stream_is_cut_within_the_send_timeout(
            self, make_proxy, fake):
        """Writes to a client time out (in the kernel, on a plain socket): one
        that never reads would otherwise hold a thread and a billed stream."""
        cut = threading.Event()
        event = sse(message_event("x" * 65536))

        def route(ex):
            ex.start_chunked()
            try:
                for _ in range(4000):  # 256 MB at most: far more than any socket buffers
                    ex.chunk(event)
            except OSError:
                cut.set()

        fake.on("POST", "/backend-api/codex/responses", route)
        proxy = make_proxy(limits={"send_timeout": 0.3})
        with socket.create_connection(("127.0.0.1", proxy.port)) as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.sendall(b"POST /v1/responses HTTP/1.1\r\nHost: x\r\n" + AUTH +
                           b"Content-Length: %d\r\n\r\n%s" % (len(CODEX_BODY), CODEX_BODY))
            assert cut.wait(20)  # and it never reads a byte

    def test_a_client_that_takes_a_little_within_each_send_timeout_is_still_cut(
            self, make_proxy, fake):
        """send_timeout bounds a whole write, as Python's own timeout does: the
        kernel's bounds each send() alone, and a client taking 16 KB every
        0.4 s would have held a billed stream for ever (review)."""
        cut = threading.Event()
        event = sse(message_event("x" * 65536))

        def route(ex):
            ex.start_chunked()
            try:
                for _ in range(4000):
                    ex.chunk(event)
            except OSError:
                cut.set()

        fake.on("POST", "/backend-api/codex/responses", route)
        proxy = make_proxy(limits={"send_timeout": 0.5})
        with socket.socket() as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.connect(("127.0.0.1", proxy.port))
            client.sendall(b"POST /v1/responses HTTP/1.1\r\nHost: x\r\n" + AUTH +
                           b"Content-Length: %d\r\n\r\n%s" % (len(CODEX_BODY), CODEX_BODY))
            started = time.monotonic()
            with contextlib.suppress(OSError):
                while not cut.is_set() and time.monotonic() - started < 10:
                    time.sleep(0.4)
                    client.recv(16384)
            assert cut.wait(2) and time.monotonic() - started < 8

    def test_a_websocket_quiet_for_longer_than_send_timeout_stays_open(self, make_proxy, fake):
        WSUpstream(fake)
        proxy = make_proxy(limits={"send_timeout": 0.2})
        client = WSClient(proxy.port)
        try:
            for pause in (0.0, 0.7):
                time.sleep(pause)
                client.send_json({"type": "response.create", "model": "gpt-5.4"})
                assert client.events_until_completed()[-1]["type"] == "response.completed"
        finally:
            client.close()

    @pytest.mark.parametrize("request_bytes, status", [
        (b"GET /v1/" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET /v1/models HTTP/1.1\r\n" + b"X-Big: " + b"b" * 70000 + b"\r\n\r\n", 431),
        (b"GET /v1/models HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n", 431),
    ])
    def test_oversized_heads_are_refused(self, proxy, fake, request_bytes, status):
        answer = raw_exchange(proxy.port, request_bytes)
        assert status_of(answer) == status
        assert error_of(body_of(answer))[0] == "invalid_request_error"
        assert fake.requests == [] and works(proxy)

    def test_stalled_body_is_dropped(self, make_proxy, fake):
        proxy = make_proxy(limits={"body_timeout": 0.3})
        answer = raw_exchange(proxy.port, b"POST /v1/responses HTTP/1.1\r\n" + AUTH + b"Content-Length: 100\r\n\r\n{",
                     timeout=3)
        assert status_of(answer) == 408 and fake.requests == []

    def test_connection_cap_answers_a_fast_503(self, make_proxy, fake):
        # one address may hold them all here: this is about the cap itself
        proxy = make_proxy(limits={"max_connections": 10, "max_connections_per_address": 10,
                                   "max_unauthenticated_connections": 10})
        held = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(10)]
        assert wait_for(lambda: proxy.server._connections == 10)
        started = time.monotonic()
        answer = raw_exchange(proxy.port, b"GET /v1/models HTTP/1.1\r\n" + AUTH + b"\r\n")
        assert time.monotonic() - started < 1.0
        assert status_of(answer) == 503 and b"Retry-After: 1" in answer
        assert "limit of 10 connections" in error_of(body_of(answer))[1]
        for s in held[:3]:
            s.close()
        assert wait_for(lambda: proxy.server._connections <= 7)
        assert works(proxy)
        for s in held[3:]:
            s.close()

    def test_1100_connections_against_the_default_cap(self, make_proxy, fake):
        # silent connections from one address: its share and the unauthenticated one made whole
        proxy = make_proxy(limits={"max_connections_per_address": 1024,
                                   "max_unauthenticated_connections": 1024})
        assert proxy.server.config.limits.max_connections == 1024
        threads_before = threading.active_count()
        held = []
        try:
            for _ in range(1024):
                held.append(socket.create_connection(("127.0.0.1", proxy.port)))
            assert wait_for(lambda: proxy.server._connections == 1024, 20)
            refused = [raw_exchange(proxy.port, b"GET /v1/models HTTP/1.1\r\n" + AUTH + b"\r\n", timeout=5)
                       for _ in range(76)]
            assert [status_of(a) for a in refused] == [503] * 76
            assert threading.active_count() <= threads_before + 1024 + 2  # no thread per refusal
        finally:
            for s in held:
                s.close()
        assert wait_for(lambda: proxy.server._connections == 0, 20)
        assert works(proxy)

    def test_thread_stack_size_is_configurable_and_checked(self):
        assert ocm.Limits().thread_stack_size == 512 * 1024
        assert ocm.config_from_dict({"limits": {"thread_stack_size": 0}}).limits.thread_stack_size == 0
        with pytest.raises(ocm.ConfigError, match="thread_stack_size"):
            ocm.config_from_dict({"limits": {"thread_stack_size": 4096}})

    def test_small_stacks_survive_deeply_nested_json(self, tmp_path, fake, auth_path):
        """With the default 512 KiB stacks, a hostile body nested 100,000 deep
        (parsed for the usage fallback) must not crash the process."""
        fake.on("POST", "/backend-api/codex/responses", lambda ex: ex.stream(sse(
            {"type": "response.completed", "response": {"usage": {"input_tokens": 5}}})))
        config = tmp_path / "c.json"
        config.write_text(json.dumps({"listen_port": 0, "credential_path": str(auth_path), "users": USERS,
                                      "usages_path": str(tmp_path / "u.json"),
                                      "upstream": {"chatgpt_url": fake.chatgpt_url, "token_url": fake.token_url}}))
        proc = subprocess.Popen([sys.executable, OCM_PY, str(config)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            port = int(proc.stdout.readline().split("127.0.0.1:")[1].split("/")[0])
            nested = b"[" * 100000 + b"]" * 100000
            answer = raw_exchange(port, b"POST /v1/responses HTTP/1.1\r\n" + AUTH + b"Content-Length: %d\r\n\r\n"
                         % len(nested) + nested + b"GET /v1/models HTTP/1.1\r\n" + AUTH +
                         b"Connection: close\r\n\r\n", timeout=10)
            assert status_of(answer) == 200 and answer.count(b"HTTP/1.1 200") == 2
            assert proc.poll() is None
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0


# == TestSmuggling =============================================================

SMUGGLING = [
    ("both CL and TE", b"POST /v1/responses HTTP/1.1\r\n" + AUTH +
     b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("two Content-Lengths", b"POST /v1/responses HTTP/1.1\r\n" + AUTH +
     b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
    ("a Content-Length list", b"POST /v1/responses HTTP/1.1\r\n" + AUTH + b"Content-Length: 5, 6\r\n\r\nhello!"),
    ("a signed Content-Length", b"POST /v1/responses HTTP/1.1\r\n" + AUTH + b"Content-Length: +5\r\n\r\nhello"),
    ("a hex chunk size with 0x", b"POST /v1/responses HTTP/1.1\r\n" + AUTH +
     b"Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n"),
    ("a negative chunk size", b"POST /v1/responses HTTP/1.1\r\n" + AUTH +
     b"Transfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n"),
    ("a chunk size with spaces", b"POST /v1/responses HTTP/1.1\r\n" + AUTH +
     b"Transfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n"),
    ("an enormous chunk size", b"POST /v1/responses HTTP/1.1\r\n" + AUTH +
     b"Transfer-Encoding: chunked\r\n\r\n" + b"f" * 17 + b"\r\nhello\r\n0\r\n\r\n"),
    ("chunk data longer than its size", b"POST /v1/responses HTTP/1.1\r\n" + AUTH +
     b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello world\r\n0\r\n\r\n"),
    ("gzip before chunked", b"POST /v1/responses HTTP/1.1\r\n" + AUTH +
     b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
    ("chunked before gzip", b"POST /v1/responses HTTP/1.1\r\n" + AUTH +
     b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n"),
    ("identity", b"POST /v1/responses HTTP/1.1\r\n" + AUTH + b"Transfer-Encoding: identity\r\n\r\n"),
    ("chunked twice", b"POST /v1/responses HTTP/1.1\r\n" + AUTH +
     b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("a space before the colon", b"POST /v1/responses HTTP/1.1\r\n" + AUTH + b"Content-Length : 5\r\n\r\nhello"),
    ("a space in a header name", b"GET /v1/models HTTP/1.1\r\n" + AUTH + b"X Forwarded: a\r\n\r\n"),
    ("a control character in a name", b"GET /v1/models HTTP/1.1\r\n" + AUTH + b"X-\x01Bad: a\r\n\r\n"),
    ("a NUL in a value", b"GET /v1/models HTTP/1.1\r\n" + AUTH + b"X-Bad: a\x00b\r\n\r\n"),
    ("a folded header line", b"GET /v1/models HTTP/1.1\r\n" + AUTH + b"X-A: a\r\n b\r\n\r\n"),
    ("chunked in HTTP/1.0", b"POST /v1/responses HTTP/1.0\r\n" + AUTH +
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("a byte that is not ASCII in the target", b"GET /v1/x\x9b2J HTTP/1.1\r\n" + AUTH + b"\r\n"),
    ("an absolute-form target", b"GET http://evil.example/v1/models HTTP/1.1\r\n" + AUTH + b"\r\n"),
    ("a request line with extra spaces", b"GET  /v1/models HTTP/1.1\r\n" + AUTH + b"\r\n"),
    ("an unknown HTTP version", b"GET /v1/models HTTP/1.2\r\n" + AUTH + b"\r\n"),
    ("a lowercase HTTP version", b"GET /v1/models http/1.1\r\n" + AUTH + b"\r\n"),
]


class TestSmuggling:
    @pytest.mark.parametrize("name, request_bytes", SMUGGLING, ids=[n for n, _ in SMUGGLING])
    def test_ambiguous_requests_get_400_and_a_closed_connection(self, proxy, fake, name, request_bytes):
        # A second, normal request rides behind: it must never be served on this connection.
        answer = raw_exchange(proxy.port, request_bytes + b"GET /v1/models HTTP/1.1\r\n" + AUTH + b"\r\n")
        assert status_of(answer) in (400, 505), answer[:200]
        assert b"Connection: close" in answer.partition(b"\r\n\r\n")[0]
        assert answer.count(b"HTTP/1.1 ") == 1  # nothing after the refusal
        assert error_of(body_of(answer))[0] == "invalid_request_error"
        assert fake.requests == []
        assert works(proxy)

    def test_identical_repeated_content_length_is_fine(self, proxy, fake):
        answer = raw_exchange(proxy.port, b"POST /v1/files HTTP/1.1\r\n" + AUTH +
                     b"Content-Length: 2\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        assert status_of(answer) == 200 and fake.requests[0].body == b"{}"

    def test_chunk_extensions_and_trailers_are_accepted(self, proxy, fake):
        answer = raw_exchange(proxy.port, b"POST /v1/files HTTP/1.1\r\n" + AUTH +
                     b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                     b"2;name=value\r\n{}\r\n0\r\nX-Trailer: t\r\n\r\n")
        assert status_of(answer) == 200 and fake.requests[0].body == b"{}"


# == TestUpstreamFaults ========================================================

def reset(handler):
    """Close the fake upstream's connection with RST instead of FIN."""
    sock = handler.connection
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    handler.close_connection = True
    # makefile() references keep the descriptor open past close(): drop them first
    for stream in (handler.rfile, handler.wfile):
        try:
            stream.close()
        except (OSError, ValueError):
            pass
    handler.rfile, handler.wfile = io.BytesIO(), io.BytesIO()
    sock.close()


class TestUpstreamFaults:
    def check_recovers(self, proxy, fake, connections_before):
        """The next request works, on a connection that is not the broken one."""
        fake.routes.pop(("POST", "/backend-api/codex/responses"), None)
        assert proxy.request("POST", "/v1/responses", {})[0] == 200
        assert fake.connections == connections_before + 1
        assert wait_for(lambda: not [h for h in proxy.server._handlers if h.busy])

    def test_reset_before_the_response_is_502(self, proxy, fake):
        # Warm up first: the hang-up watcher and one pooled connection (with its
        # fake-side thread) are meant to stay; anything beyond them is a leak.
        assert proxy.request("POST", "/v1/responses", {})[0] == 200
        threads = threading.active_count()
        fake.on("POST", "/backend-api/codex/responses", lambda ex: reset(ex.handler))
        for _ in range(5):
            status, _, body = proxy.request("POST", "/v1/responses", {})
            assert status == 502 and error_of(body)[0] == "api_error"
        self.check_recovers(proxy, fake, 6)
        assert wait_for(lambda: threading.active_count() <= threads)

    def test_reset_during_the_response_truncates_it(self, proxy, fake):
        def route(ex):
            ex.start_chunked()
            ex.chunk(sse(message_event()))
            reset(ex.handler)

        fake.on("POST", "/backend-api/codex/responses", route)
        conn = proxy.conn()
        conn.request("POST", "/v1/responses", body=CODEX_BODY, headers={"Authorization": "Bearer tok-alice"})
        resp = conn.getresponse()
        assert resp.status == 200
        with pytest.raises(Exception):
            resp.read()
        conn.close()
        self.check_recovers(proxy, fake, 1)

    def test_known_length_cut_short_is_truncated(self, proxy, fake):
        def route(ex):
            ex.handler.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 70000)
            ex.close()

        fake.on("POST", "/backend-api/codex/responses", route)
        conn = proxy.conn()
        conn.request("POST", "/v1/responses", body=CODEX_BODY, headers={"Authorization": "Bearer tok-alice"})
        resp = conn.getresponse()
        with pytest.raises(Exception):
            resp.read()
        conn.close()
        self.check_recovers(proxy, fake, 1)

    @pytest.mark.parametrize("garbage", [b"HELLO\r\n\r\n", b"HTTP/1.1 abc OK\r\n\r\n", b"\x16\x03\x01\x00\x05hello",
                                         b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
                                         b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello!",
                                         b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"])
    def test_invalid_http_answer_is_502(self, proxy, fake, garbage):
        fake.on("POST", "/backend-api/codex/responses", lambda ex: (ex.raw(garbage), ex.close()))
        status, _, body = proxy.request("POST", "/v1/responses", {})
        assert status == 502 and "failed" in error_of(body)[1]
        self.check_recovers(proxy, fake, 1)

    def test_5xx_is_relayed_and_the_connection_reused(self, proxy, fake):
        fake.on("POST", "/backend-api/codex/responses", lambda ex: ex.json(503, {"error": {"message": "busy"}}))
        assert proxy.request("POST", "/v1/responses", {})[0] == 503
        fake.routes.pop(("POST", "/backend-api/codex/responses"))
        assert proxy.request("POST", "/v1/responses", {})[0] == 200
        assert fake.connections == 1  # a complete 5xx answer leaves a healthy connection

    def test_stall_releases_the_worker_and_the_socket(self, make_proxy, fake):
        release = threading.Event()
        fake.on("POST", "/backend-api/codex/responses", lambda ex: release.wait(5))
        proxy = make_proxy(limits={"upstream_read_timeout": 0.3})
        assert proxy.request("POST", "/v1/responses", {})[0] == 504
        release.set()
        assert wait_for(lambda: not [h for h in proxy.server._handlers if h.busy])
        self.check_recovers(proxy, fake, 1)

    def test_a_partly_read_response_never_goes_back_to_the_pool(self, proxy, fake):
        """A client that leaves mid-stream must not hand the next request a
        connection with the rest of the old stream still in it: OCM closes it."""
        closed = []

        def route(ex):
            ex.start_chunked()
            ex.chunk(sse(message_event()))
            closed.append(ex.wait_closed_by_peer(5))

        fake.on("POST", "/backend-api/codex/responses", route)
        conn = proxy.conn()
        conn.request("POST", "/v1/responses", body=CODEX_BODY, headers={"Authorization": "Bearer tok-alice"})
        conn.getresponse().read1(100)
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        assert wait_for(lambda: closed) and closed == [True]
        self.check_recovers(proxy, fake, 1)


# == TestFiles =================================================================

class DiskFull:
    """os.write in ocm fails with ENOSPC (or another errno) while active."""

    def __init__(self, monkeypatch, code=errno.ENOSPC):
        self.active = True
        real = os.write

        def write(fd, data):
            if self.active:
                raise OSError(code, os.strerror(code))
            return real(fd, data)

        monkeypatch.setattr(ocm.os, "write", write)


class ReadOnlyDir:
    """Creating files in a directory fails, as on a read-only mount (root
    ignores permission bits, so this is simulated)."""

    def __init__(self, monkeypatch):
        self.active = True
        real = ocm.tempfile.mkstemp

        def mkstemp(*args, **kwargs):
            if self.active:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))
            return real(*args, **kwargs)

        monkeypatch.setattr(ocm.tempfile, "mkstemp", mkstemp)


def no_temp_files(directory):
    return [n for n in os.listdir(str(directory)) if n.endswith(".tmp")] == []


class TestFiles:
    @pytest.mark.parametrize("fault", [DiskFull, ReadOnlyDir])
    def test_usage_save_failure_keeps_the_old_file_logs_once_and_retries(self, tmp_path, monkeypatch, caplog,
                                                                          fault):
        path = tmp_path / "usage.json"
        book = ocm.UsageBook(str(path), save_interval=0.05)
        book.record("alice", ocm.UsageRecord("gpt-5.4", "", 10, 1, 0), None)
        assert book.save()
        old = path.read_bytes()
        broken = fault(monkeypatch)
        book.record("alice", ocm.UsageRecord("gpt-5.4", "", 10, 1, 0), None)
        book.start_saver()
        try:
            with caplog.at_level(logging.ERROR, logger="ocm"):
                # the first failed save (the saver may be slow to get there), then several more
                assert wait_for(lambda: any("cannot save usage" in r.getMessage() for r in caplog.records))
                time.sleep(0.3)
            assert path.read_bytes() == old and no_temp_files(tmp_path)
            assert len([r for r in caplog.records if "cannot save usage" in r.getMessage()]) == 1
            broken.active = False
            assert wait_for(lambda: read_json(path)["combinations"][0]["total"]["request_count"] == 2)
        finally:
            book.close()

    def test_usage_is_saved_at_exit_after_a_failure_spell(self, tmp_path, monkeypatch):
        path = tmp_path / "usage.json"
        book = ocm.UsageBook(str(path))
        broken = DiskFull(monkeypatch)
        book.record("bob", ocm.UsageRecord("o3", "", 1, 1, 0), None)
        assert not book.save()
        broken.active = False
        book.close()
        assert read_json(path)["combinations"][0]["by_user"]["bob"]["request_count"] == 1

    @pytest.mark.parametrize("fault", [DiskFull, ReadOnlyDir])
    def test_refreshed_tokens_are_kept_in_memory_until_auth_json_can_be_written(
            self, make_proxy, fake, auth_path, monkeypatch, caplog, fault):
        write_auth(auth_path, expires_in=100)  # refresh due, old token still valid
        old = auth_path.read_bytes()
        proxy = make_proxy()
        broken = fault(monkeypatch)
        with caplog.at_level(logging.ERROR, logger="ocm"):
            for _ in range(3):
                assert proxy.request("POST", "/v1/responses", {})[0] == 200
        assert auth_path.read_bytes() == old and no_temp_files(auth_path.parent)
        assert len(fake.token_calls) == 1  # refreshed once, not on every request
        new_access = fake.api_requests()[-1].header("Authorization")[7:]
        assert new_access != read_json(auth_path)["tokens"]["access_token"]
        assert len([r for r in caplog.records if "cannot save refreshed tokens" in r.getMessage()]) == 1
        broken.active = False
        assert proxy.request("POST", "/v1/responses", {})[0] == 200
        saved = read_json(auth_path)
        assert saved["tokens"]["access_token"] == new_access and saved["tokens"]["refresh_token"] == "rt_2"

    def test_unsaved_tokens_are_not_replaced_by_the_stale_file(self, make_proxy, fake, auth_path, monkeypatch):
        """While the rotated refresh token lives only in memory, the file's old
        (now dead) one must never be sent again."""
        write_auth(auth_path, expires_in=100)
        proxy = make_proxy()
        broken = DiskFull(monkeypatch)
        assert proxy.request("POST", "/v1/responses", {})[0] == 200
        proxy.server.credential._login = proxy.server.credential._login._replace(expires_at=time.time() + 10)
        assert proxy.request("POST", "/v1/responses", {})[0] == 200
        assert [c["refresh_token"] for c in fake.token_calls] == ["rt_initial", "rt_2"]
        broken.active = False

    def test_lock_file_that_cannot_be_created_does_not_stop_a_refresh(self, make_proxy, fake, auth_path,
                                                                      monkeypatch, caplog):
        write_auth(auth_path, expires_in=-10)
        real_open = os.open

        def open_(path, *args, **kwargs):
            if str(path).endswith("auth.lock"):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(ocm.os, "open", open_)
        with caplog.at_level(logging.WARNING, logger="ocm"):
            assert make_proxy().request("POST", "/v1/responses", {})[0] == 200
        assert "refreshing without it" in caplog.text

    def test_kill_at_any_instant_leaves_auth_json_old_or_new(self, tmp_path):
        path = tmp_path / "auth.json"
        versions = [json.dumps({"auth_mode": "chatgpt", "tokens": {"access_token": "a" * 50000 + str(i)}},
                               indent=2) for i in range(2)]
        path.write_text(versions[0])
        script = ("import sys, ocm\n"
                  "versions = [open(sys.argv[2]).read().encode(), open(sys.argv[3]).read().encode()]\n"
                  "print('ready', flush=True)\n"
                  "i = 0\n"
                  "while True:\n"
                  "    i += 1\n"
                  "    ocm.write_file_atomic(sys.argv[1], versions[i % 2], 0o600)\n")
        for n, v in enumerate(versions):
            (tmp_path / ("v%d" % n)).write_text(v)
        for attempt in range(6):
            proc = subprocess.Popen([sys.executable, "-c", script, str(path), str(tmp_path / "v0"),
                                     str(tmp_path / "v1")], cwd=os.path.dirname(OCM_PY), stdout=subprocess.PIPE,
                                    text=True)
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(0.005 + attempt * 0.011)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert path.read_text() in versions
            assert oct(os.stat(str(path)).st_mode & 0o777) in ("0o600", "0o644")


    @pytest.mark.parametrize("key", ["usages_path", "budgets_path"])
    def test_a_data_file_that_is_a_directory_stops_the_start_naming_it(self, tmp_path, auth_path, key):
        (tmp_path / "data").mkdir()
        config = {"listen": "127.0.0.1", "listen_port": 0, "credential_path": str(auth_path),
                  key: str(tmp_path / "data")}
        (tmp_path / "config.json").write_text(json.dumps(config))
        out = subprocess.run([sys.executable, OCM_PY, str(tmp_path / "config.json")], capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 2
        assert "%s: %s is a directory; name a file in it" % (key, tmp_path / "data") in out.stderr
        assert "cannot listen" not in out.stderr
        check = subprocess.run([sys.executable, OCM_PY, "--check", str(tmp_path / "config.json")],
                               capture_output=True, text=True, timeout=30)
        assert check.returncode == 2 and "is a directory" in check.stderr

    def test_a_reload_naming_a_bad_file_keeps_the_running_config(self, tmp_path, fake, auth_path):
        """The new config parses, but a file it names cannot be used: still serving."""
        config = {"listen": "127.0.0.1", "listen_port": 0, "credential_path": str(auth_path),
                  "users": USERS, "upstream": {"chatgpt_url": fake.chatgpt_url, "token_url": fake.token_url}}
        path = tmp_path / "config.json"
        path.write_text(json.dumps(config))
        fake.on("POST", "/backend-api/codex/responses", lambda ex: ex.stream(sse(completed_event())))
        proc = subprocess.Popen([sys.executable, OCM_PY, str(path)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        errors = []
        reader = threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True)
        try:
            port = int(proc.stdout.readline().split("/v1")[0].rsplit(":", 1)[1])
            reader.start()
            (tmp_path / "a-directory").mkdir()
            for refused, bad in enumerate(({"usages_path": str(tmp_path / "a-directory")},
                                           {"budgets_path": str(tmp_path / "a-directory")}), 1):
                path.write_text(json.dumps(dict(config, **bad)))
                proc.send_signal(signal.SIGHUP)
                assert wait_for(lambda: "".join(errors).count("still running the previous config") == refused)
                assert proc.poll() is None
                answer = raw_exchange(port, b"POST /v1/responses HTTP/1.1\r\nHost: x\r\n" + AUTH +
                                      b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")
                assert status_of(answer) == 200
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
            reader.join(5)
        err = "".join(errors)
        assert proc.returncode == 0
        assert err.count("still running the previous config") == 2 and "Traceback" not in err

    @pytest.mark.parametrize("content", [
        {"users": {"alice": {"day": {"2026-11-24": {"usd": "x"}}}}},
        {"users": {"alice": {"day": {"2026-11-24": {"usd": -5}}}}},
        {"users": {"alice": {"average_per_request": ["not", "an", "object"]}}},
        {"users": ["alice"]},
    ])
    def test_a_budget_file_with_wrong_values_is_moved_aside_not_fatal(self, tmp_path, caplog, content):
        path = tmp_path / "budgets.json"
        path.write_text(json.dumps(content))
        ledger = ocm.BudgetLedger(str(path), ocm.PeriodClock("UTC"))
        with caplog.at_level(logging.ERROR, logger="ocm"):
            ledger.load()
        aside = [n for n in os.listdir(str(tmp_path)) if n.startswith("budgets.json.corrupt-")]
        assert not path.exists() and len(aside) == 1
        assert json.loads((tmp_path / aside[0]).read_text()) == content  # nothing lost
        assert "budget file %s is damaged" % path in caplog.text
        assert ledger.spent("alice", "day") == (0.0, 0.0)

    def test_without_the_ssl_module_https_is_refused_at_start_and_answered_502(self, make_proxy, fake,
                                                                               monkeypatch):
        """Some router builds of Python leave ssl out."""
        https = {"chatgpt_url": fake.chatgpt_url.replace("http:", "https:"), "token_url": fake.token_url}
        monkeypatch.setattr(ocm, "ssl", None)
        with pytest.raises(ocm.ConfigError, match=r"upstream.chatgpt_url is https://.*no ssl module"):
            ocm.OCMServer(ocm.config_from_dict({"listen_port": 0, "upstream": https}), bind_and_activate=False)
        monkeypatch.undo()
        proxy = make_proxy(upstream=https)
        monkeypatch.setattr(ocm, "ssl", None)  # gone after the start: every connection says why
        status, _, body = proxy.request("POST", "/v1/responses", {})
        assert status == 502 and "no ssl module" in error_of(body)[1] and fake.api_requests() == []


# == TestSecrets ===============================================================

class TestSecrets:
    def test_no_record_shows_a_secret_in_its_repr(self):
        """A repr can end up in a log line or a traceback."""
        secrets_ = ["tok-alice-secret", "at-secret", "rt-secret", "id-secret", "sk-secret", "proxy-pass", "KEYPEM"]
        shown = " ".join(repr(x) + str(x) for x in (
            ocm.User("alice", "tok-alice-secret"),
            ocm.Login("chatgpt", access_token="at-secret", refresh_token="rt-secret", id_token="id-secret",
                      api_key="sk-secret", account_id="acct-1"),
            ocm.parse_proxy_url("socks5://me:proxy-pass@10.0.0.2:1080", "detour"),
            ocm.TLSConfig(enabled=True, key="KEYPEM")))
        assert "alice" in shown and "acct-1" in shown and "me@10.0.0.2" in shown
        assert not [s for s in secrets_ if s in shown], shown

    def test_a_whole_debug_session_logs_no_secret(self, tmp_path, fake, auth_path):
        """Every secret of a busy session (user tokens, access, refresh and id
        tokens, the API key) is absent from everything OCM printed."""
        WSUpstream(fake)
        write_auth(auth_path, expires_in=-10)  # forces a refresh: new tokens issued mid-session
        issued = []
        token_endpoint = fake.token_endpoint

        def recording_token_endpoint(ex):
            token_endpoint(ex)

        fake.on("POST", "/oauth/token", recording_token_endpoint)
        first = read_json(auth_path)["tokens"]
        config = tmp_path / "c.json"
        config.write_text(json.dumps({"listen_port": 0, "credential_path": str(auth_path), "users": USERS,
                                      "usages_path": str(tmp_path / "u.json"),
                                      "detour": "",
                                      "upstream": {"chatgpt_url": fake.chatgpt_url, "token_url": fake.token_url}}))
        proc = subprocess.Popen([sys.executable, OCM_PY, str(config), "--log-level", "debug"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            port = int(proc.stdout.readline().split("127.0.0.1:")[1].split("/")[0])
            for token in ("tok-alice", "tok-bob", "tok-wrong-secret-1234"):
                raw_exchange(port, b"POST /v1/responses HTTP/1.1\r\nAuthorization: Bearer %s\r\nContent-Length: 2\r\n"
                          b"Connection: close\r\n\r\n{}" % token.encode())
            raw_exchange(port, b"GET /v1/models HTTP/1.1\r\nAuthorization: Basic dG9rLWFsaWNlOng=\r\n"
                      b"X-Api-Key: client-key-secret\r\nConnection: close\r\n\r\n")
            client = WSClient(port)
            client.send_json({"type": "response.create", "model": "gpt-5.4"})
            client.events_until_completed()
            client.send(0x8, close_body(1000))
            client.frame()
            client.close()
            # the refreshed token rejected once: a reactive refresh too
            current = read_json(auth_path)["tokens"]["access_token"]
            fake.on("POST", "/backend-api/codex/responses", lambda ex: ex.json(401, {}) if ex.request.header(
                "Authorization") == "Bearer " + current else ex.stream(sse(completed_event())))
            raw_exchange(port, b"POST /v1/responses HTTP/1.1\r\n" + AUTH + b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")
        finally:
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=10)
        final = read_json(auth_path)["tokens"]
        secrets = ["tok-alice", "tok-bob", "tok-wrong-secret-1234", "client-key-secret", "dG9rLWFsaWNlOng",
                   first["access_token"], first["refresh_token"], first["id_token"],
                   final["access_token"], final["refresh_token"], final["id_token"]]
        secrets += [r.header("Authorization")[7:] for r in fake.requests if r.header("Authorization")]
        assert len(fake.token_calls) == 2
        assert "DEBUG" in err and "alice" in err  # it did log, at debug level
        for secret in set(secrets):
            for fragment in (secret, secret[:12], secret[-12:]):
                assert fragment not in out and fragment not in err, "a secret leaked into the log"

    def test_api_key_never_logged(self, tmp_path, fake, auth_path):
        auth_path.write_text(json.dumps({"auth_mode": "apikey", "OPENAI_API_KEY": "sk-proj-TOPSECRETKEY123"}))
        config = tmp_path / "c.json"
        config.write_text(json.dumps({"listen_port": 0, "credential_path": str(auth_path), "users": USERS,
                                      "upstream": {"api_url": fake.url, "token_url": fake.token_url}}))
        proc = subprocess.Popen([sys.executable, OCM_PY, str(config), "--log-level", "debug"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            port = int(proc.stdout.readline().split("127.0.0.1:")[1].split("/")[0])
            raw_exchange(port, b"POST /v1/chat/completions HTTP/1.1\r\n" + AUTH + b"Content-Length: 2\r\nConnection: close"
                      b"\r\n\r\n{}")
        finally:
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=10)
        assert fake.api_requests()[0].header("Authorization") == "Bearer sk-proj-TOPSECRETKEY123"
        assert "TOPSECRET" not in out + err and "sk-proj" not in out + err

    def test_host_header_and_absolute_urls_never_steer_upstream(self, proxy, fake):
        raw_exchange(proxy.port, b"GET /v1/models HTTP/1.1\r\nHost: attacker.example:9999\r\n" + AUTH +
            b"X-Forwarded-Host: attacker.example\r\nConnection: close\r\n\r\n")
        assert fake.requests[0].header("Host") == "127.0.0.1:%d" % fake.port


# == TestStrangers =============================================================

def connect_from(port, source, timeout=5.0):
    """A connection from another loopback address (Linux accepts all of 127/8)."""
    return socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                    source_address=(source, 0))


def answer_on(sock):
    """Everything until the server closes (or goes quiet for the socket's timeout)."""
    out = b""
    with contextlib.suppress(socket.timeout, ConnectionResetError):
        while True:
            data = sock.recv(65536)
            if not data:
                break
            out += data
    return out


def signed_in(port, source):
    """A keep-alive connection that has authenticated (one answered request)."""
    sock = connect_from(port, source)
    sock.sendall(b"GET /ocm/v1/status HTTP/1.1\r\n" + AUTH + b"\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(65536)
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    body = head.partition(b"\r\n\r\n")[2]
    while len(body) < length:
        body += sock.recv(65536)
    assert status_of(head) == 200
    return sock


class TestStrangers:
    """Without a token, one address, or many, cannot hold the server: refusals
    go out at once, unauthenticated connections have header_timeout and hold
    only their share, and a person with a token from elsewhere is served."""

    def test_one_address_holding_every_slot_it_can_leaves_room_for_a_token_from_another(
            self, make_proxy, fake):
        proxy = make_proxy(limits={"max_connections": 16, "header_timeout": 30,
                                   "body_timeout": 30})
        held = []
        try:
            for _ in range(2):  # dripping bodies: refused at once, never read
                sock = connect_from(proxy.port, "127.0.0.1", timeout=1.0)
                sock.sendall(b"POST /v1/responses HTTP/1.1\r\nContent-Length: 100000\r\n\r\n{")
                held.append(sock)
            for _ in range(20):  # and silent sockets, as many as it may
                held.append(connect_from(proxy.port, "127.0.0.1"))
            assert wait_for(lambda: proxy.server.gate.counts()[0].get("127.0.0.1") == 4 or
                            proxy.server._connections == 16)
            # served within a second
            with connect_from(proxy.port, "127.0.0.2", timeout=1.0) as sock:
                sock.sendall(b"GET /v1/models HTTP/1.1\r\n" + AUTH + b"Connection: close\r\n\r\n")
                assert status_of(answer_on(sock)) == 200
            assert status_of(answer_on(held[0])) == 401
            refused = [answer_on(sock) for sock in held[-10:]]
            assert all(b"connections from one address" in answer for answer in refused)
        finally:
            for sock in held:
                sock.close()

    def test_many_addresses_without_a_token_hold_only_the_unauthenticated_share(self, make_proxy,
                                                                                fake):
        # 10 connections may be unauthenticated
        proxy = make_proxy(limits={"max_connections": 20, "header_timeout": 30})
        held = [signed_in(proxy.port, "127.0.0.%d" % (10 + i // 4)) for i in range(8)]  # people
        try:
            strangers = ["127.0.0.%d" % (20 + i // 2) for i in range(10)]
            held += [connect_from(proxy.port, address) for address in strangers]
            assert wait_for(lambda: proxy.server.gate.counts()[1] == 10)
            with connect_from(proxy.port, "127.0.0.30", timeout=1.0) as late:
                assert b"10 connections that have not authenticated" in answer_on(late)
            held[0].sendall(b"GET /v1/models HTTP/1.1\r\n" + AUTH + b"Connection: close\r\n\r\n")
            assert status_of(answer_on(held[0])) == 200  # those who signed in are served
        finally:
            for sock in held:
                sock.close()

    @pytest.mark.parametrize("path", [b"/healthz", b"/v1/models"])
    def test_a_connection_without_a_token_gets_one_answer_then_closes(self, proxy, fake, path):
        with connect_from(proxy.port, "127.0.0.1", timeout=1.0) as sock:
            sock.sendall(b"GET %s HTTP/1.1\r\n\r\n" % path * 2)  # a second request rides behind
            answer = answer_on(sock)
        assert answer.count(b"HTTP/1.1 ") == 1 and b"Connection: close" in answer
        assert status_of(answer) == (200 if path == b"/healthz" else 401)

    def test_a_silent_connection_gets_header_timeout_not_idle_timeout(self, make_proxy, fake):
        proxy = make_proxy(limits={"header_timeout": 0.3, "idle_timeout": 30})
        with connect_from(proxy.port, "127.0.0.1", timeout=3) as silent:
            assert silent.recv(100) == b""  # closed, without a word, well before idle_timeout
        # once authenticated: idle_timeout
        with connect_from(proxy.port, "127.0.0.1", timeout=3) as person:
            person.sendall(b"GET /v1/models HTTP/1.1\r\n" + AUTH + b"\r\n")
            assert status_of(person.recv(65536)) == 200
            time.sleep(0.5)
            person.sendall(b"GET /v1/models HTTP/1.1\r\n" + AUTH + b"Connection: close\r\n\r\n")
            assert status_of(answer_on(person)) == 200

    @pytest.mark.parametrize("request_head, status", [
        (b"POST /v1/responses HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{", 401),
        (b"POST /v1/responses HTTP/1.1\r\nAuthorization: Bearer nope\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n3\r\n{", 401),
        (b"POST /v1/responses HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1000\r\n\r\n",
         401),
        (b"POST /v1/responses HTTP/1.1\r\n" + AUTH +
         b"Expect: 100-continue\r\nContent-Length: 5000\r\n\r\n", 413),
        (b"GET /healthz HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{", 200),
    ])
    def test_a_refusal_goes_out_at_once_and_never_waits_for_the_body(self, make_proxy, fake,
                                                                     request_head, status):
        proxy = make_proxy(limits={"body_timeout": 30, "max_body_size": 4096})
        with connect_from(proxy.port, "127.0.0.1", timeout=1.0) as sock:
            sock.sendall(request_head)
            answer = answer_on(sock)  # and the connection closes: nothing of the body was read
        assert status_of(answer) == status and b"100 Continue" not in answer
        assert b"Connection: close" in answer.partition(b"\r\n\r\n")[0]
        assert fake.requests == []

    def test_a_body_must_arrive_whole_within_body_timeout_however_it_drips(self, make_proxy, fake):
        proxy = make_proxy(limits={"body_timeout": 0.3})
        with connect_from(proxy.port, "127.0.0.1", timeout=3) as sock:
            sock.sendall(b"POST /v1/responses HTTP/1.1\r\n" + AUTH + b"Content-Length: 60\r\n\r\n")
            sock.settimeout(0.05)
            answer, dripped = b"", 0
            while dripped < 60 and not answer:
                with contextlib.suppress(OSError):
                    sock.sendall(b" ")  # a byte every 0.05 s: each used to restart the timeout
                    dripped += 1
                with contextlib.suppress(socket.timeout):
                    answer = sock.recv(65536)
        assert status_of(answer) == 408 and dripped < 40 and fake.requests == []

    def test_shares_and_addresses(self):
        limits = ocm.Limits()
        shares = (limits.max_connections, limits.per_address, limits.unauthenticated)
        assert shares == (1024, 256, 512)
        assert ocm.Limits(max_connections=10, max_connections_per_address=7).per_address == 7
        group = ocm.address_group
        assert group("2001:db8::1") == group("2001:db8::ffff:1") == "2001:db8::/64"
        assert group("2001:db8:0:1::1") != group("2001:db8::1")
        assert group("::ffff:127.0.0.2") == "127.0.0.2" == group("127.0.0.2")
        with pytest.raises(ocm.ConfigError, match="max_connections_per_address"):
            ocm.config_from_dict({"limits": {"max_connections_per_address": -1}})


# == TestPooledConnections =====================================================

def answer_for_whom(ex, status=200):
    """The fake's answer names the person whose request it answers."""
    ex.json(status, {"for": ex.request.json()["who"]})


class TestPooledConnections:
    """An upstream connection goes back to the pool only when nothing more is
    waiting on it: the next request on it may be anyone's."""

    def test_a_102_before_the_answer_never_reaches_another_user(self, proxy, fake):
        def route(ex):
            if ex.request.json()["who"] == "alice":
                ex.raw(b"HTTP/1.1 102 Processing\r\n\r\n")
                ex.raw(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
                time.sleep(0.15)  # thinking: the real answer comes later
            answer_for_whom(ex)

        fake.on("POST", "/backend-api/codex/responses", route)
        alice = proxy.request("POST", "/v1/responses", {"who": "alice"})
        bob = proxy.request("POST", "/v1/responses", {"who": "bob"}, token="tok-bob")
        assert b"alice" not in bob[2]
        assert (bob[0], json.loads(bob[2])) == (200, {"for": "bob"})
        assert (alice[0], json.loads(alice[2])) == (200, {"for": "alice"})
        assert fake.connections == 1  # the same pooled connection served both

    def test_more_bytes_than_the_answer_held_close_the_connection_at_once(self, proxy, fake):
        closed = []

        def route(ex):
            ex.raw(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}" + b"HTTP/1.1 200 OK\r\n"
                   b"Content-Length: 70000\r\n\r\n" + b"x" * 70000)
            closed.append(ex.wait_closed_by_peer(3))

        fake.on("POST", "/backend-api/codex/responses", route)
        assert proxy.request("POST", "/v1/responses", {"who": "alice"})[0] == 200
        assert wait_for(lambda: closed) and closed == [True]  # not parked in the pool

    def test_bytes_arriving_on_an_idle_connection_keep_it_from_the_next_request(self, proxy, fake):
        sent = threading.Event()

        def route(ex):
            who = ex.request.json()["who"]
            answer_for_whom(ex)
            if who == "alice":  # after the answer, while the connection idles in the pool
                time.sleep(0.05)
                ex.raw(b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{\"for\": \"alice\"}")
                sent.set()

        fake.on("POST", "/backend-api/codex/responses", route)
        assert proxy.request("POST", "/v1/responses", {"who": "alice"})[0] == 200
        assert sent.wait(3)
        status, _, body = proxy.request("POST", "/v1/responses", {"who": "bob"}, token="tok-bob")
        assert (status, json.loads(body)) == (200, {"for": "bob"})
        assert fake.connections == 2


# == TestPrivateHeaders ========================================================

PRIVATE_CLIENT_HEADERS = {"Cookie": "session=user", "Forwarded": "for=203.0.113.9",
                          "X-Forwarded-For": "203.0.113.9", "X-Forwarded-Host": "evil.example",
                          "X-Real-IP": "203.0.113.9",
                          "OpenAI-Organization": "org-user", "OpenAI-Project": "proj-user"}


def private_headers_sent(recorded):
    return {name: value for name, value in recorded.headers if name.lower() in
            {n.lower() for n in PRIVATE_CLIENT_HEADERS}}


class TestPrivateHeaders:
    """Cookies, forwarding headers and the organisation or project to bill are
    the owner's: a user's never reach OpenAI, OpenAI's cookies never reach users."""

    def test_a_users_cookies_forwarding_and_billing_headers_never_reach_upstream(self, make_proxy,
                                                                                  fake):
        proxy = make_proxy()
        assert proxy.request("POST", "/v1/responses", {}, headers=PRIVATE_CLIENT_HEADERS)[0] == 200
        sent = fake.api_requests()[-1]
        assert private_headers_sent(sent) == {}
        owner = make_proxy(headers={"OpenAI-Organization": "org-owner", "Cookie": "owner=1"})
        assert owner.request("POST", "/v1/responses", {}, headers=PRIVATE_CLIENT_HEADERS)[0] == 200
        sent = private_headers_sent(fake.api_requests()[-1])
        assert sent == {"OpenAI-Organization": "org-owner", "Cookie": "owner=1"}

    def test_upstream_cookies_never_reach_users(self, proxy, fake):
        fake.on("POST", "/backend-api/codex/responses", lambda ex: ex.send(
            200, b"{}", {"Set-Cookie": "__cf_bm=owner", "X-Kept": "yes"}))
        status, headers, _ = proxy.request("POST", "/v1/responses", {})
        assert status == 200 and headers["x-kept"] == "yes" and "set-cookie" not in headers

    def test_over_websocket_neither_way_either(self, proxy, fake):
        ws = WSUpstream(fake)
        client = WSClient(proxy.port, headers=PRIVATE_CLIENT_HEADERS)
        try:
            assert client.status == 101 and "set-cookie" not in client.headers
        finally:
            client.close()
        assert private_headers_sent(ws.handshakes[0]) == {}
        ws.status, ws.refusal_body = 403, b'{"error": {}}'
        ws.refusal_headers = {"Set-Cookie": "cf=owner"}
        refused = WSClient(proxy.port)
        try:
            assert refused.status == 403 and "set-cookie" not in refused.headers
        finally:
            refused.close()


# == TestLogInjection ==========================================================

def evil_model(length):
    return ("gpt-5.4\nbob POST /v1/responses 200 model=free in=0\r\x1b[2J\x1b[31m\u202e"
            + "x" * length)


UNSAFE = ("\n", "\r", "\x1b", "\x9b", "\u202e")


def is_tame(text, limit=1000):
    """Fit for a log or an exposition: no control characters, bounded."""
    return not any(c in text for c in UNSAFE) and len(text) < limit


class TestLogInjection:
    """A model name or a path is the client's own text (when upstream leaves the
    model out of its usage, OCM names the one the client asked for): escaped and
    capped wherever OCM writes it, so it cannot forge a line or flood a file."""

    def check_everywhere(self, proxy, caplog, log_format, lines):
        def access_lines():
            return [r.getMessage() for r in caplog.records if r.name == "ocm.access"]

        assert wait_for(lambda: len(access_lines()) >= lines)
        access = access_lines()
        assert all(is_tame(line) for line in access), access
        if log_format == "json":  # lines land in the order their handlers finish
            models = [json.loads(line)["model"][:9] for line in access if "gpt" in line]
            assert models == ["gpt-5.4\\n"]
        else:
            # quoted, for its spaces could pass for other fields
            assert len([line for line in access if 'model="gpt-5.4\\nbob POST' in line]) == 1
        status, _, metrics = proxy.request("GET", "/metrics")
        assert status == 200 and b"gpt-5.4" in metrics
        assert all(is_tame(line) for line in metrics.decode().splitlines())
        assert not [line for line in metrics.decode().splitlines() if line.startswith("bob ")]
        assert proxy.server.usage.save()
        saved = read_json(proxy.server.usage.path)["combinations"]
        assert [c["model"][:7] for c in saved] == ["gpt-5.4"]
        assert all(is_tame(c["model"]) for c in saved)
        assert all(is_tame(r.getMessage()) for r in caplog.records)

    @pytest.mark.parametrize("log_format", ["text", "json"])
    def test_a_model_name_from_a_request_body_cannot_forge_a_log_line(self, make_proxy, fake,
                                                                     caplog, tmp_path, log_format):
        usage = {"input_tokens": 5, "output_tokens": 1}  # and no model
        fake.on("POST", "/backend-api/codex/responses", lambda ex: ex.stream(sse(
            {"type": "response.completed", "response": {"usage": usage}})))
        proxy = make_proxy(log_format=log_format, usages_path=str(tmp_path / "usage.json"))
        with caplog.at_level(logging.DEBUG, logger="ocm"):
            # 7 KB: past 8 KB a body is no longer kept whole for this (release_body): "unknown"
            assert proxy.request("POST", "/v1/responses", {"model": evil_model(7000)})[0] == 200
            raw_exchange(proxy.port, b"GET /v1/x" + b"y" * 10000 + b" HTTP/1.1\r\n" + AUTH +
                         b"Connection: close\r\n\r\n")
            self.check_everywhere(proxy, caplog, log_format, 2)

    def test_a_model_name_from_a_websocket_turn_cannot_either(self, make_proxy, fake, caplog,
                                                              tmp_path):
        WSUpstream(fake).completed_without_model = True
        proxy = make_proxy(usages_path=str(tmp_path / "usage.json"))
        with caplog.at_level(logging.DEBUG, logger="ocm"):
            client = WSClient(proxy.port)
            try:
                client.send_json({"type": "response.create", "model": evil_model(10240)})
                client.events_until_completed()
                client.send(0x8, close_body(1000))
                client.frame()
            finally:
                client.close()
            self.check_everywhere(proxy, caplog, "text", 1)

    def test_log_safe_escapes_caps_and_leaves_plain_text_alone(self):
        assert ocm.log_safe("gpt-5.3-codex") == "gpt-5.3-codex"
        assert ocm.log_safe("a\nb\x1b[0m\x9b\u2028") == "a\\nb\\x1b[0m\\x9b\\u2028"
        capped = ocm.log_safe("\n" * 5000)
        assert len(capped) == ocm.LOG_VALUE_LIMIT and capped.endswith("...")
        assert ocm.log_safe(capped) == capped


# == TestOwnersPaths ===========================================================

class TestOwnersPaths:
    """Users learn why the owner's login cannot be used, in plain words; the
    path of the owner's file stays in the owner's log."""

    @pytest.mark.parametrize("damage, words", [
        ("missing", "the owner's login file is missing; the owner must sign in"),
        ("garbled", "the owner's login file is damaged")])
    def test_a_broken_login_file_is_explained_without_its_path(self, make_proxy, auth_path, caplog,
                                                               damage, words):
        if damage == "missing":
            os.unlink(str(auth_path))
        else:
            auth_path.write_text("{not json")
        with caplog.at_level(logging.WARNING, logger="ocm"):
            proxy = make_proxy()
            status, _, body = proxy.request("POST", "/v1/responses", {})
            assert status == 503 and words in error_of(body)[1]
            status, _, page = proxy.request("GET", "/ocm/v1/status")
            assert status == 200 and words in json.loads(page)["accounts"][0]["problem"]
        for answer in (body, page):
            assert str(auth_path.parent).encode() not in answer and b"auth.json" not in answer
        assert str(auth_path) in caplog.text  # the owner still learns which file

    def test_a_refresh_that_cannot_reread_the_file_is_explained_without_its_path(
            self, make_proxy, auth_path, monkeypatch):
        write_auth(auth_path, expires_in=-10)  # expired: a refresh is needed, and it cannot happen
        proxy = make_proxy()
        real = ocm._read_file_with_id

        def unreadable_while_refreshing(path):
            if proxy.server.credential._refresh_lock.locked():
                raise PermissionError(13, "Permission denied", path)
            return real(path)

        monkeypatch.setattr(ocm, "_read_file_with_id", unreadable_while_refreshing)
        status, _, body = proxy.request("POST", "/v1/responses", {})
        assert status == 503 and "cannot re-read the owner's login file" in error_of(body)[1]
        assert str(auth_path.parent).encode() not in body


# == TestCredentialsAtTheEdges =================================================

class TestCredentialsAtTheEdges:
    @pytest.mark.parametrize("header", [b"Authorization: Bearer tok-al\x01ice",
                                        b"Authorization: Bearer tok-alice\x0b",
                                        b"Authorization: Bearer tok-alice\x7f",
                                        b"Authorization: Bearer tok-alice\r\nX-Api-Key: k\x00"])
    def test_a_token_with_control_characters_is_a_wrong_token_401(self, proxy, fake, header):
        answer = raw_exchange(proxy.port, b"GET /v1/models HTTP/1.1\r\n" + header +
                              b"\r\nConnection: close\r\n\r\n")
        assert status_of(answer) == 401
        assert error_of(body_of(answer)) == ("authentication_error", "invalid api key")
        assert fake.requests == []

    def test_other_headers_with_control_characters_are_still_malformed_400(self, proxy, fake):
        answer = raw_exchange(proxy.port, b"GET /v1/models HTTP/1.1\r\n" + AUTH +
                              b"X-Other: a\x01b\r\n\r\n")
        assert status_of(answer) == 400 and b"X-Other has control characters" in answer

    def test_a_linked_auth_json_stays_a_link_and_its_target_gets_the_new_tokens(
            self, make_proxy, fake, auth_path, tmp_path):
        shared = tmp_path / "codex-cli"  # the Codex CLI's own folder, which OCM's file links to
        shared.mkdir()
        os.replace(str(auth_path), str(shared / "auth.json"))
        write_auth(shared / "auth.json", expires_in=-10)  # expired: the first request refreshes it
        os.symlink(str(shared / "auth.json"), str(auth_path))
        proxy = make_proxy()
        assert proxy.request("POST", "/v1/responses", {})[0] == 200
        assert os.path.islink(str(auth_path))
        assert os.readlink(str(auth_path)) == str(shared / "auth.json")
        assert read_json(shared / "auth.json")["tokens"]["refresh_token"] == "rt_2"
        assert (shared / "auth.lock").exists() and not (auth_path.parent / "auth.lock").exists()
        assert no_temp_files(shared) and no_temp_files(auth_path.parent)
        credential = proxy.server.credential
        credential._login = credential._login._replace(expires_at=time.time() + 10)
        # the next refresh reads the rotated token
        assert proxy.request("POST", "/v1/responses", {})[0] == 200
        assert [c["refresh_token"] for c in fake.token_calls] == ["rt_initial", "rt_2"]


# == TestHangupWatcher =========================================================

class TestHangupWatcher:
    """A client that leaves mid-stream has its upstream cut at once (generation
    is billed), whatever came before: an upstream answer with Connection: close,
    bytes from the client, trouble with another stream."""

    def abandoned_stream(self, proxy, fake, headers=None, client_sends=b"", patience=3.0):
        """A stream the client leaves; seconds until upstream saw its connection
        cut, or None if that took longer than ``patience``."""
        cut = []

        def route(ex):
            ex.start_chunked(headers=headers)
            ex.chunk(sse({"type": "response.created"}))
            started = time.monotonic()
            if ex.wait_closed_by_peer(timeout=patience):
                cut.append(time.monotonic() - started)
            else:
                ex.close()  # ends the stream OCM still relays
            cut.append(None)

        fake.on("POST", "/backend-api/codex/responses", route)
        conn = proxy.conn()
        conn.request("POST", "/v1/responses", body=b"{}",
                     headers={"Authorization": "Bearer tok-alice"})
        assert b"response.created" in conn.getresponse().read1(65536)
        if client_sends:
            conn.sock.sendall(client_sends)
            time.sleep(0.05)  # the watcher sees those bytes first
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        assert wait_for(lambda: cut and cut[-1] is None, patience + 2)
        return cut[0]

    def test_a_stream_with_connection_close_is_cut_and_the_watch_goes_on(self, proxy, fake):
        first = self.abandoned_stream(proxy, fake, headers={"Connection": "close"})
        second = self.abandoned_stream(proxy, fake)
        assert first is not None and first < 2.0
        assert second is not None and second < 2.0

    def test_a_client_that_sent_bytes_mid_stream_is_still_watched(self, proxy, fake):
        if not ocm.HANGUP_EVENTS:
            pytest.skip("needs POLLRDHUP (Linux)")
        seconds = self.abandoned_stream(proxy, fake, client_sends=b"GET /v1/models HTTP/1.1\r\n")
        assert seconds is not None and seconds < 2.0

    def test_trouble_with_one_stream_does_not_end_the_watch(self, proxy, fake, monkeypatch,
                                                            caplog):
        real, calls = ocm.StreamContext.hang_up, []

        def broken_once(context):
            calls.append(context)
            if len(calls) == 1:
                raise RuntimeError("trouble")
            real(context)

        monkeypatch.setattr(ocm.StreamContext, "hang_up", broken_once)
        with caplog.at_level(logging.ERROR, logger="ocm"):
            # the watcher must meet this stream's hang-up (and fail) before upstream gives up
            self.abandoned_stream(proxy, fake, patience=1.0)
        second = self.abandoned_stream(proxy, fake)
        assert len(calls) == 2 and second is not None and second < 2.0
        assert "hang-up watcher: unexpected error" in caplog.text


# == TestWebSocketFloods =======================================================

def frames_sent_upstream(sock, reader):
    """(opcode, payload) of each frame OCM sends upstream, parsed in place:
    the test codec copies its buffer per read, too slow for a flood."""
    buf, pos = bytearray(reader.buf), 0
    while True:
        while len(buf) - pos >= 2:
            n = buf[pos + 1] & 0x7F
            head = 2 + (2 if n == 126 else 8 if n == 127 else 0)
            if len(buf) - pos < head:
                break
            if n >= 126:
                n = int.from_bytes(buf[pos + 2:pos + head], "big")
            end = pos + head + 4 + n  # OCM masks every frame it sends upstream
            if len(buf) < end:
                break
            mask = buf[pos + head:pos + head + 4]
            masked = buf[pos + head + 4:end]
            yield buf[pos] & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(masked))
            pos = end
        data = sock.recv(65536)
        if not data:
            return
        del buf[:pos]
        buf, pos = buf + data, 0


def ocm_memory():
    """Bytes ocm.py itself holds now (allocations made by its own lines)."""
    snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, ocm.__file__)])
    return sum(stat.size for stat in snapshot.statistics("filename"))


class TestWebSocketFloods:
    def test_empty_fragments_cannot_grow_memory_without_bound(self, proxy, fake):
        """Zero-length continuation frames cost nothing against the size limit:
        without a bound on frames per message, each one was kept for ever."""
        fragments = 20000
        forwarded = []
        everything = threading.Event()

        def swallow(sock, reader):
            for opcode, payload in frames_sent_upstream(sock, reader):
                if opcode == 0x8:
                    sock.sendall(ws_frame(0x8, payload))
                    return
                forwarded.append(None)
                if len(forwarded) == 1 + fragments:
                    everything.set()

        WSUpstream(fake).on_connect = swallow
        client = WSClient(proxy.port)
        tracemalloc.start()
        try:
            assert wait_for(lambda: proxy.server._websockets)
            before = ocm_memory()
            empty = ws_frame(0x0, b"", fin=False, mask=b"efgh")
            flood = ws_frame(0x1, b"{", fin=False, mask=b"abcd") + empty * fragments
            with contextlib.suppress(OSError):
                client.sock.sendall(flood)
            assert wait_for(lambda: everything.is_set() or not proxy.server._websockets, 20)
            grown = ocm_memory() - before
        finally:
            tracemalloc.stop()
        assert grown < 64 * 1024, "OCM kept %d bytes for a message of empty frames" % grown
        frame = client.frame()
        while frame[1] != 0x8:
            frame = client.frame()
        assert int.from_bytes(frame[2][:2], "big") == 1008
        client.close()

    def test_a_client_that_stops_reading_is_cut_within_the_send_timeout(self, make_proxy, fake):
        upstream_done = threading.Event()

        def stream_for_ever(sock, reader):
            sock.settimeout(10)
            for _ in response_creates(sock, reader, lambda frame: None):
                with contextlib.suppress(OSError):
                    while True:
                        sock.sendall(ws_frame(0x2, b"x" * 65536))
                upstream_done.set()
                return

        WSUpstream(fake).on_connect = stream_for_ever
        proxy = make_proxy(limits={"send_timeout": 0.3})
        client = WSClient(proxy.port)
        try:
            # and never reads again
            client.send_json({"type": "response.create", "model": "gpt-5.4"})
            assert wait_for(lambda: upstream_done.is_set() and not proxy.server._websockets, 8)
        finally:
            client.close()

    def test_a_websocket_end_says_how_long_its_peer_was_idle(self, proxy, fake):
        WSUpstream(fake)
        client = WSClient(proxy.port)
        try:
            assert wait_for(lambda: proxy.server._websockets)
            session = next(iter(proxy.server._websockets))
            started = session.client.last_active
            assert 0 <= session.client.idle_for(time.monotonic()) < ocm.WS_IDLE_LIMIT
            client.send_json({"type": "response.create", "model": "gpt-5.4"})
            client.events_until_completed()
            assert session.client.last_active > started
        finally:
            client.close()


# == Fuzzing ===================================================================

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 100000) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20)
config_keys = st.sampled_from(["listen", "listen_port", "credential_path", "usages_path", "users", "headers",
                               "detour", "tls", "upstream", "limits", "services", "type", "tag", "sniff"])
configs = st.dictionaries(config_keys, json_values, max_size=6)


class TestFuzz:
    @fuzz_settings
    @given(configs)
    def test_config_loader_raises_only_config_errors(self, data):
        try:
            ocm.config_from_dict(data)
        except ocm.ConfigError:
            pass

    @fuzz_settings
    @given(st.lists(st.binary(max_size=80) | st.sampled_from([
        b"data: ", b"\n", b"\r\n", b"\r", b"\n\n", b'{"usage": {"input_tokens": 3}}', b"event: x\n", b": c\n"]),
        max_size=30), st.data())
    def test_sse_scanner_never_fails_and_splits_do_not_matter(self, pieces, data):
        stream = b"".join(pieces)
        whole = []
        scanner = ocm.SSEScanner(whole.append)
        scanner.feed(stream)
        scanner.finish()
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=5)))
        split = []
        scanner = ocm.SSEScanner(split.append)
        last = 0
        for cut in cuts + [len(stream)]:
            scanner.feed(stream[last:cut])
            last = cut
        scanner.finish()
        assert split == whole

    @fuzz_settings
    @given(st.binary(max_size=300), st.booleans(), st.data())
    def test_frame_parser_raises_only_websocket_errors(self, data, from_client, draw):
        def run(pieces):
            parser = ocm.FrameParser(from_client, 1000)
            frames = []
            try:
                for piece in pieces:
                    frames += parser.feed(piece)
            except ocm.WebSocketError as exc:
                return frames, exc.code
            return frames, None

        whole = run([data])
        cut = draw.draw(st.integers(0, len(data)))
        assert run([data[:cut], data[cut:]]) == whole

    @fuzz_settings
    @given(st.binary(max_size=200))
    def test_chunked_reader_raises_only_http_errors(self, body):
        a, b = socket.socketpair()
        try:
            a.sendall(body)
            a.shutdown(socket.SHUT_WR)
            reader = ocm.SocketReader(b)
            try:
                ocm.read_chunked_body(reader, 1000, 1.0)
            except (ocm.HTTPError, ocm.ClientGone):
                pass
        finally:
            a.close()
            b.close()

    @fuzz_settings
    @given(st.one_of(
        st.binary(max_size=300),
        st.builds(lambda method, target, version, headers, body: b"%s %s %s\r\n%s\r\n%s" % (
            method, target, version, b"".join(b"%s: %s\r\n" % h for h in headers), body),
            st.sampled_from([b"GET", b"POST", b"PUT", b"G ET", b"", b"\x00"]),
            st.sampled_from([b"/v1/models", b"/v1/responses", b"/", b"*", b"/v1/../x", b"/v1/%00"]),
            st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 x", b""]),
            st.lists(st.tuples(st.sampled_from([b"Content-Length", b"Transfer-Encoding", b"Authorization",
                                                b"Connection", b"Upgrade", b"Expect", b"X"]),
                               st.binary(max_size=20)), max_size=5),
            st.binary(max_size=50))))
    def test_raw_request_bytes_never_break_the_server(self, fuzz_proxy, data):
        proxy, baseline = fuzz_proxy
        raw_exchange(proxy.port, data, timeout=0.15)
        assert works(proxy)
        assert wait_for(lambda: threading.active_count() <= baseline, 3)


@pytest.fixture(scope="class")
def fuzz_proxy():
    """One proxy for the whole raw-bytes fuzz run (hypothesis calls the test many times)."""
    import tempfile
    from test_ocm import FakeUpstream, Proxy
    fake = FakeUpstream()
    directory = tempfile.mkdtemp()
    path = os.path.join(directory, "auth.json")
    write_auth(path)
    proxy = Proxy(ocm.OCMServer(ocm.config_from_dict({
        "listen_port": 0, "credential_path": path, "users": USERS,
        "limits": {"header_timeout": 0.1, "body_timeout": 0.1, "idle_timeout": 0.1},
        "upstream": {"chatgpt_url": fake.chatgpt_url, "api_url": fake.url, "token_url": fake.token_url}})))
    assert works(proxy)
    time.sleep(0.4)
    baseline = threading.active_count()
    yield proxy, baseline + 1
    proxy.close()
    fake.close()
