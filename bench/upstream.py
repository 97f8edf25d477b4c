"""A fast fake OpenAI upstream for the bench: ``python3 upstream.py``.

Runs in its own process (its own GIL), on one asyncio event loop with raw
protocols: no http.server, no threads, so it stays far quicker than the relay
it feeds. Prints ``port N`` on stdout once listening; exits when stdin closes
(the bench died) or on SIGTERM.

Any POST gets a small JSON response with Content-Length, unless the query
asks for a stream: ``?sse=N&gap_ms=G`` sends N delta events, G ms apart, then
response.completed, as chunked text/event-stream. Each event carries
``"t":<time.monotonic_ns()>`` taken just before the write, so a client on the
same machine can tell how long the event took to reach it.

``GET /stats`` answers {"connections": n, "requests": n}: n counts connections
that carried at least one request other than /stats, so asking does not count.
"""

import asyncio
import json
import os
import signal
import sys
import threading
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import raise_fd_limit  # noqa: E402

# The kind of headers OpenAI answers with: a relay parses and filters each one.
COMMON_HEADERS = (
    b"Date: Mon, 24 Nov 2025 10:27:00 GMT\r\n"
    b"Server: cloudflare\r\n"
    b"openai-version: 2020-10-01\r\n"
    b"openai-processing-ms: 412\r\n"
    b"x-request-id: req_0123456789abcdef0123456789abcdef\r\n"
    b"x-codex-primary-used-percent: 3\r\n"
    b"x-codex-secondary-used-percent: 1\r\n"
    b"x-codex-primary-window-minutes: 300\r\n"
    b"strict-transport-security: max-age=31536000; includeSubDomains; preload\r\n"
    b"x-content-type-options: nosniff\r\n"
    b"cf-cache-status: DYNAMIC\r\n"
    b"cf-ray: 8f1c2d3e4a5b6c7d-FRA\r\n"
    b"alt-svc: h3=\":443\"; ma=86400\r\n"
)

SMALL_JSON = json.dumps({
    "id": "resp_0123456789", "object": "response", "status": "completed", "model": "gpt-5.3-codex",
    "output": [{"type": "message", "role": "assistant",
                "content": [{"type": "output_text", "text": "Hello from the bench."}]}],
    "usage": {"input_tokens": 20, "input_tokens_details": {"cached_tokens": 0},
              "output_tokens": 6, "output_tokens_details": {"reasoning_tokens": 0},
              "total_tokens": 26},
}, separators=(",", ":")).encode()

SMALL_RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + COMMON_HEADERS
                  + b"Content-Length: %d\r\n\r\n" % len(SMALL_JSON) + SMALL_JSON)

SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n" + COMMON_HEADERS
            + b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")

# One text delta, roughly what a token or two of model output looks like.
DELTA = (b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
         b'"item_id":"msg_0123456789","output_index":0,"content_index":0,"delta":" hello",'
         b'"t":%d}\n\n')
COMPLETED = (b'event: response.completed\ndata: {"type":"response.completed","response":{'
             b'"id":"resp_0123456789","model":"gpt-5.3-codex","status":"completed","usage":{'
             b'"input_tokens":20,"input_tokens_details":{"cached_tokens":0},"output_tokens":6,'
             b'"output_tokens_details":{"reasoning_tokens":0},"total_tokens":26}},"t":%d}\n\n')


def chunk(data):
    return b"%x\r\n%s\r\n" % (len(data), data)


class Stats:
    connections = 0
    requests = 0


class Upstream(asyncio.Protocol):
    """One client connection: parse requests as they come, answer in order."""

    def connection_made(self, transport):
        self.transport = transport
        self.loop = asyncio.get_running_loop()
        self.buf = bytearray()
        self.counted = False
        self.streaming = None   # the timer of a stream in progress
        self.closed = False

    def connection_lost(self, exc):
        self.closed = True
        if self.streaming is not None:
            self.streaming.cancel()

    def data_received(self, data):
        self.buf += data
        while self.streaming is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end])
            length = 0
            lowered = head.lower()
            at = lowered.find(b"\r\ncontent-length:")
            if at >= 0:
                line_end = lowered.find(b"\r\n", at + 2)
                length = int(head[at + 17:line_end if line_end >= 0 else len(head)])
            if len(self.buf) < end + 4 + length:
                return
            del self.buf[:end + 4 + length]
            target = head[:head.find(b"\r\n")].split(b" ")[1].decode("latin-1")
            self.answer(target)

    def answer(self, target):
        path, _, query = target.partition("?")
        if path == "/stats":
            body = json.dumps({"connections": Stats.connections, "requests": Stats.requests}).encode()
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            return
        Stats.requests += 1
        if not self.counted:
            self.counted = True
            Stats.connections += 1
        params = urllib.parse.parse_qs(query) if query else {}
        if "sse" not in params:
            self.transport.write(SMALL_RESPONSE)
            return
        events = int(params["sse"][0])
        gap = float(params.get("gap_ms", ["5"])[0]) / 1000.0
        self.transport.write(SSE_HEAD)
        self.stream_next(events, gap)

    def stream_next(self, left, gap):
        """Send one event now and schedule the next: the stamp is taken just
        before the write so only relaying and delivery count."""
        self.streaming = None
        if self.closed:
            return
        if left > 0:
            self.transport.write(chunk(DELTA % time.monotonic_ns()))
            self.streaming = self.loop.call_later(gap, self.stream_next, left - 1, gap)
            return
        self.transport.write(chunk(COMPLETED % time.monotonic_ns()) + b"0\r\n\r\n")
        if self.buf:  # a request that arrived while streaming (pipelined)
            self.data_received(b"")


def watch_stdin(loop, stop):
    """The bench holds our stdin open; EOF means it is gone, so go too."""
    try:  # os.read, not sys.stdin: a buffered read still blocked at exit aborts the interpreter
        while os.read(0, 4096):
            pass
    finally:
        loop.call_soon_threadsafe(stop.set)


async def serve(port):
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    server = await loop.create_server(Upstream, "127.0.0.1", port, backlog=4096, reuse_address=True)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    threading.Thread(target=watch_stdin, args=(loop, stop), daemon=True).start()
    print("port %d" % server.sockets[0].getsockname()[1], flush=True)
    await stop.wait()
    server.close()


def main():
    raise_fd_limit()
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    asyncio.run(serve(port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
