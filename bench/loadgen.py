"""Load client for the bench, run as its own process so it has its own GIL.

  python3 loadgen.py rps PORT TARGET HOST TOKEN CONNS START_AT STOP_AT
      CONNS keep-alive connections, each sending the next small POST as soon
      as the last answer is in; counts answers that complete between the
      time.monotonic() instants START_AT and STOP_AT (before: warm-up).

  python3 loadgen.py streams PORT TARGET HOST TOKEN COUNT TIMEOUT [BODY_BYTES]
      COUNT SSE streams opened at once and read to their end; BODY_BYTES pads
      each request body (Codex resends the whole conversation every turn).

Prints one JSON object on stdout. One thread, one epoll loop, hand-parsed
HTTP: the client must cost much less than the relay it measures.
"""

import json
import os
import selectors
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (SMALL_BODY, BadResponse, ChunkedDecoder, EventClock,  # noqa: E402
                    build_request, parse_head, percentile, raise_fd_limit)


class Conn:
    __slots__ = ("sock", "buf", "need", "decoder", "clock", "open")

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()
        self.need = None     # total bytes of the response being read, once its head is in
        self.decoder = None  # streams: the chunked decoder once the head is in
        self.clock = None
        self.open = False


def connect(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


# == Requests per second =====================================================

def run_rps(port, target, host, token, conns, start_at, stop_at):
    request = build_request(target, host, token)
    sel = selectors.DefaultSelector()
    for _ in range(conns):
        conn = Conn(connect(port))
        sel.register(conn.sock, selectors.EVENT_READ, conn)
        conn.sock.sendall(request)
    responses = errors = 0
    cpu_start = None
    while True:
        now = time.monotonic()
        if now >= stop_at or not sel.get_map():
            break
        if cpu_start is None and now >= start_at:
            cpu_start = time.process_time()
        for key, _ in sel.select(timeout=stop_at - now):
            conn = key.data
            try:
                data = conn.sock.recv(65536)
                if not data:
                    raise BadResponse("connection closed")
                conn.buf += data
                if conn.need is None:
                    end = conn.buf.find(b"\r\n\r\n")
                    if end < 0:
                        continue
                    status, length, _ = parse_head(conn.buf, end)
                    if status != 200 or length is None:
                        raise BadResponse("status %d" % status)
                    conn.need = end + 4 + length
                if len(conn.buf) < conn.need:
                    continue
            except (OSError, BadResponse):
                errors += 1
                sel.unregister(conn.sock)
                conn.sock.close()
                continue
            if time.monotonic() >= start_at:
                responses += 1
            del conn.buf[:conn.need]
            conn.need = None
            conn.sock.sendall(request)
    cpu = time.process_time() - (cpu_start if cpu_start is not None else time.process_time())
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    return {"responses": responses, "errors": errors, "seconds": stop_at - start_at, "cpu": cpu}


# == Many open streams =======================================================

def padded_body(size):
    """The small body, padded to ``size`` bytes inside a JSON string."""
    pad = max(0, size - len(SMALL_BODY) - 12)
    return SMALL_BODY[:-1] + b',"padding":"' + b"x" * pad + b'"}'


def run_streams(port, target, host, token, count, timeout, body_size=0):
    """All connects start at once (non-blocking) and every stream is read as
    soon as its bytes arrive, so a slow accept on one connection never holds
    up reading the others (that would show up as relay delay)."""
    request = build_request(target, host, token, padded_body(body_size) if body_size else SMALL_BODY)
    sel = selectors.DefaultSelector()
    started = time.monotonic()
    deadline = started + timeout
    errors, samples = 0, []
    ok = open_now = peak_open = events = connecting = 0
    last_connected = started
    delays = []

    def fail(conn, why):
        nonlocal errors, open_now, connecting
        errors += 1
        if len(samples) < 5:
            samples.append(why)
        if conn.open:
            open_now -= 1
        if conn.need == "connect":
            connecting -= 1
        sel.unregister(conn.sock)
        conn.sock.close()

    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        conn = Conn(sock)
        conn.need = "connect"
        connecting += 1
        sel.register(sock, selectors.EVENT_WRITE, conn)
        sock.connect_ex(("127.0.0.1", port))
    while sel.get_map():
        now = time.monotonic()
        if now >= deadline:
            for key in list(sel.get_map().values()):
                fail(key.data, "timed out")
            break
        for key, _ in sel.select(timeout=deadline - now):
            conn = key.data
            try:
                if conn.need == "connect":  # writable: the handshake is over
                    err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, os.strerror(err))
                    conn.need = None
                    connecting -= 1
                    last_connected = time.monotonic()
                    conn.sock.setblocking(True)   # the request is small: one send
                    conn.sock.sendall(request)
                    conn.sock.setblocking(False)
                    sel.modify(conn.sock, selectors.EVENT_READ, conn)
                    continue
                data = conn.sock.recv(65536)
                arrived = time.monotonic_ns()
                if not data:
                    raise BadResponse("closed before the last chunk")
                if conn.decoder is None:
                    conn.buf += data
                    end = conn.buf.find(b"\r\n\r\n")
                    if end < 0:
                        continue
                    status, _, chunked = parse_head(conn.buf, end)
                    if status != 200 or not chunked:
                        raise BadResponse("status %d" % status)
                    conn.decoder, conn.clock = ChunkedDecoder(), EventClock()
                    conn.open = True
                    open_now += 1
                    peak_open = max(peak_open, open_now)
                    data = bytes(conn.buf[end + 4:])
                conn.clock.feed(conn.decoder.feed(data), arrived)
            except (OSError, BadResponse, ValueError) as exc:
                fail(conn, str(exc) or exc.__class__.__name__)
                continue
            if conn.decoder.done:
                ok += 1
                open_now -= 1
                conn.open = False
                events += len(conn.clock.delays)
                delays.extend(conn.clock.delays)
                sel.unregister(conn.sock)
                conn.sock.close()
    ms = [d / 1e6 for d in delays]
    return {"ok": ok, "errors": errors, "error_samples": samples, "peak_open": peak_open,
            "events": events, "connect_seconds": last_connected - started,
            "seconds": time.monotonic() - started,
            "delay_p50_ms": percentile(ms, 50), "delay_p99_ms": percentile(ms, 99),
            "cpu": time.process_time()}


def main(argv):
    raise_fd_limit()
    mode, port, target, host, token = argv[0], int(argv[1]), argv[2], argv[3], argv[4]
    if mode == "rps":
        result = run_rps(port, target, host, token, int(argv[5]), float(argv[6]), float(argv[7]))
    elif mode == "streams":
        result = run_streams(port, target, host, token, int(argv[5]), float(argv[6]),
                             int(argv[7]) if len(argv) > 7 else 0)
    else:
        raise SystemExit("usage: loadgen.py rps|streams ...")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
