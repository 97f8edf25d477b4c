"""Shared by the bench scripts: raw HTTP/1.1 requests and responses, and
reading another process's memory, threads and CPU time from /proc.

The clients speak HTTP by hand on plain sockets, not with http.client: the
load client must cost far less than what it measures, and the same code must
measure the direct path, OCM and nginx alike. Standard library only, 3.8+.
"""

import math
import os
import re
import resource
import socket
import time

# == Requests ================================================================

# The headers a Codex CLI sends with each call (values made up): a proxy
# parses and filters every one of them, so a bare request would flatter it.
CLIENT_HEADERS = (
    ("Content-Type", "application/json"),
    ("Accept", "text/event-stream"),
    ("User-Agent", "codex_cli_rs/0.169.0 (Debian 12; x86_64) bench"),
    ("Originator", "codex_cli_rs"),
    ("Version", "0.169.0"),
    ("Session_id", "0199a213-81c0-7800-8aa1-bbab2a035a53"),
    ("OpenAI-Beta", "responses=experimental"),
)

# A small Responses API body, about the size of a short call, shaped as Codex
# sends it (streamed, unstored), so OCM relays it byte for byte as it does
# Codex's; the fake upstream answers it with JSON, or SSE when the query asks.
SMALL_BODY = (b'{"model":"gpt-5.3-codex","instructions":"You are a benchmark.",'
              b'"input":[{"type":"message","role":"user","content":[{"type":"input_text",'
              b'"text":"Say hello in one short sentence, please."}]}],"stream":true,'
              b'"store":false}')


def build_request(target, host, token=None, body=SMALL_BODY):
    """A POST, ready to send in one write."""
    lines = ["POST %s HTTP/1.1" % target, "Host: %s" % host]
    lines.extend("%s: %s" % item for item in CLIENT_HEADERS)
    if token:
        lines.append("Authorization: Bearer %s" % token)
    lines.append("Content-Length: %d" % len(body))
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def connect(port, timeout=10.0):
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


# == Responses ===============================================================

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.I)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[ \t]*chunked", re.I)


class BadResponse(Exception):
    pass


def parse_head(buf, end):
    """(status, content_length or None, is_chunked) of the head buf[:end]."""
    head = bytes(buf[:end])
    try:
        status = int(head[9:12])
    except ValueError:
        raise BadResponse("bad status line %r" % head[:40])
    match = _CONTENT_LENGTH.search(head)
    return status, (int(match.group(1)) if match else None), bool(_CHUNKED.search(head))


class ChunkedDecoder:
    """Incremental Transfer-Encoding: chunked decoder; input may split anywhere."""
    __slots__ = ("buf", "data_left", "crlf_left", "last", "done")

    def __init__(self):
        self.buf = bytearray()
        self.data_left = 0   # bytes of the current chunk still to come
        self.crlf_left = 0   # bytes of the CRLF after it; both 0: a size line is next
        self.last = False    # in the zero-size chunk's closing CRLF (no trailers here)
        self.done = False

    def feed(self, data):
        """Decoded bytes from ``data``; sets ``done`` at the last chunk."""
        self.buf += data
        out = bytearray()
        while not self.done:
            if not self.data_left and not self.crlf_left:
                end = self.buf.find(b"\r\n")
                if end < 0:
                    break
                size = int(bytes(self.buf[:end]).split(b";")[0], 16)
                del self.buf[:end + 2]
                self.data_left, self.crlf_left, self.last = size, 2, size == 0
            if self.data_left:
                take = min(self.data_left, len(self.buf))
                out += self.buf[:take]
                del self.buf[:take]
                self.data_left -= take
                if self.data_left:
                    break
            take = min(self.crlf_left, len(self.buf))
            del self.buf[:take]
            self.crlf_left -= take
            if self.crlf_left:
                break
            self.done = self.last
        return bytes(out)


def read_head(sock, buf):
    """Receive into ``buf`` until it holds a whole response head; its end offset."""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            break
        data = sock.recv(65536)
        if not data:
            raise BadResponse("connection closed before the response head")
        buf += data
    return end


def read_response(sock, buf):
    """Read one whole response from a blocking socket. (status, body).
    ``buf`` (a bytearray) carries bytes that arrived beyond this response."""
    end = read_head(sock, buf)
    status, length, chunked = parse_head(buf, end)
    del buf[:end + 4]
    if chunked:
        decoder, body = ChunkedDecoder(), bytearray()
        body += decoder.feed(bytes(buf))
        del buf[:]
        while not decoder.done:
            data = sock.recv(65536)
            if not data:
                raise BadResponse("connection closed in a chunked body")
            body += decoder.feed(data)
        buf += decoder.buf
        return status, bytes(body)
    length = length or 0
    while len(buf) < length:
        data = sock.recv(65536)
        if not data:
            raise BadResponse("connection closed in the body")
        buf += data
    body = bytes(buf[:length])
    del buf[:length]
    return status, body


# == SSE stamps ==============================================================

_STAMP = re.compile(rb'"t":(\d+)')


class EventClock:
    """Splits decoded SSE into events and, for each, the delay from the
    upstream's monotonic_ns stamp to ``now`` (the read that completed it)."""
    __slots__ = ("tail", "delays")

    def __init__(self):
        self.tail = b""
        self.delays = []   # nanoseconds

    def feed(self, data, now):
        data = self.tail + data if self.tail else data
        end = data.rfind(b"\n\n")
        if end < 0:
            self.tail = data
            return
        self.tail = data[end + 2:]
        for match in _STAMP.finditer(data, 0, end):
            self.delays.append(now - int(match.group(1)))


def read_stream(sock, request):
    """Send ``request`` and read its chunked SSE answer on a blocking socket.
    Returns the per-event delays in ns; raises BadResponse if it breaks."""
    sock.sendall(request)
    buf = bytearray()
    end = read_head(sock, buf)
    status, _, chunked = parse_head(buf, end)
    if status != 200 or not chunked:
        raise BadResponse("expected a 200 chunked stream, got %d" % status)
    decoder, clock = ChunkedDecoder(), EventClock()
    clock.feed(decoder.feed(bytes(buf[end + 4:])), time.monotonic_ns())
    while not decoder.done:
        data = sock.recv(65536)
        now = time.monotonic_ns()
        if not data:
            raise BadResponse("stream closed before its last chunk")
        clock.feed(decoder.feed(data), now)
    return clock.delays


# == Processes ===============================================================

def proc_status(pid):
    """{"VmRSS": kB, "VmHWM": kB, "Threads": n} from /proc/PID/status ({} if gone)."""
    out = {}
    try:
        with open("/proc/%d/status" % pid) as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "Threads"):
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_cpu_seconds(pid):
    """User + system CPU seconds a process has used so far (all its threads)."""
    try:
        with open("/proc/%d/stat" % pid) as fh:
            fields = fh.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / float(_TICKS)


def raise_fd_limit(want=16384):
    """Lift the soft RLIMIT_NOFILE toward ``want`` (1000 streams need ~3000 fds
    across processes). Used in the bench and, via preexec_fn, in each child."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def percentile(values, q):
    """The q-th percentile (0..100) by nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = int(math.ceil(q / 100.0 * len(ordered))) - 1
    return ordered[max(0, min(len(ordered) - 1, rank))]
