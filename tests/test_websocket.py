"""The Responses WebSocket relay (RFC 6455): the frame codec at byte level,
then the relay end to end against a WebSocket fake upstream.

The test side has its own small codec (per-byte XOR, plain parsing), written
independently of ocm.py's, so a shared bug cannot hide."""

import base64
import hashlib
import json
import os
import socket
import threading
import time

import pytest

import ocm
from test_ocm import (CODEX_BIN, USERS, completed_event, error_of, free_port, make_jwt, message_event, needs_codex,
                      read_json, run_codex, wait_for, write_auth)

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


# == An independent little codec ==============================================

def ws_frame(opcode, payload=b"", fin=True, mask=None, rsv=0):
    """Build one frame by hand. ``mask``: 4 bytes, or None for unmasked."""
    b0 = (0x80 if fin else 0) | rsv | opcode
    n = len(payload)
    mask_bit = 0x80 if mask else 0
    if n < 126:
        head = bytes([b0, mask_bit | n])
    elif n < 65536:
        head = bytes([b0, mask_bit | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([b0, mask_bit | 127]) + n.to_bytes(8, "big")
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return head + mask + payload
    return head + payload


def frame_with_length_field(opcode, payload, field, mask=None):
    """A frame whose length uses the given field form (126 or 127) whatever the size."""
    b0 = 0x80 | opcode
    mask_bit = 0x80 if mask else 0
    if field == 126:
        head = bytes([b0, mask_bit | 126]) + len(payload).to_bytes(2, "big")
    else:
        head = bytes([b0, mask_bit | 127]) + len(payload).to_bytes(8, "big")
    if mask:
        return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + payload


class FrameReader:
    """Reads frames from a socket-like ``recv`` function, plain and slow."""

    def __init__(self, recv):
        self.recv = recv
        self.buf = b""

    def _need(self, n):
        while len(self.buf) < n:
            data = self.recv(65536)
            if not data:
                raise EOFError("closed")
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def frame(self):
        """(fin, opcode, payload, was_masked)"""
        b0, b1 = self._need(2)
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(self._need(2), "big")
        elif n == 127:
            n = int.from_bytes(self._need(8), "big")
        mask = self._need(4) if b1 & 0x80 else None
        payload = self._need(n)
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return bool(b0 & 0x80), b0 & 0x0F, payload, mask is not None


def close_body(code, reason=""):
    return code.to_bytes(2, "big") + reason.encode()


# == WebSocket fake upstream and client =======================================

class WSUpstream:
    """Makes the fake upstream speak WebSocket on a route. By default it plays a
    Responses server: each response.create gets created/done/completed events.
    Every frame it receives is recorded; ``script`` may replace the behaviour."""

    def __init__(self, fake, path="/backend-api/codex/responses"):
        self.fake = fake
        self.frames = []          # (fin, opcode, payload, masked) as received
        self.handshakes = []      # request headers of each upgrade
        self.connections = 0
        self.status = 101
        self.refusal_body = b""
        self.refusal_headers = {}
        self.extra_101_headers = {"x-codex-turn-state": "ts-9", "x-models-etag": "etag-1",
                                  "OpenAI-Model": "gpt-5.3-codex", "X-Reasoning-Included": "true",
                                  "Set-Cookie": "cf=1", "X-Other": "no"}
        self.handshake_delay = 0.0
        self.completed_without_model = False
        self.on_connect = None    # fn(sock, reader) replacing the default loop
        self.closed = threading.Event()
        self.lock = threading.Lock()
        fake.on("GET", path, self.route)

    def route(self, ex):
        h = ex.handler
        with self.lock:
            self.connections += 1
            self.handshakes.append(ex.request)
        if self.handshake_delay:
            time.sleep(self.handshake_delay)
        if self.status != 101:
            return ex.send(self.status, self.refusal_body, self.refusal_headers)
        key = ex.request.header("Sec-WebSocket-Key")
        accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
        head = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade",
                "Sec-WebSocket-Accept: " + accept] + ["%s: %s" % kv for kv in self.extra_101_headers.items()]
        h.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode())
        h.wfile.flush()
        h.close_connection = True
        reader = FrameReader(h.rfile.read1)
        sock = h.connection
        try:
            if self.on_connect:
                self.on_connect(sock, reader)
            else:
                self.serve(sock, reader)
        except (EOFError, OSError):
            pass
        finally:
            self.closed.set()

    def send(self, sock, opcode, payload, fin=True):
        sock.sendall(ws_frame(opcode, payload, fin))

    def record(self, frame):
        with self.lock:
            self.frames.append(frame)

    def serve(self, sock, reader):
        on_binary = lambda payload: self.send(sock, 0x2, payload[::-1])  # noqa: E731
        for turn, event in enumerate(response_creates(sock, reader, self.record, on_binary), 1):
            completed = completed_event("resp-%d" % turn, event.get("model", "gpt-5.3-codex"),
                                        1000 * turn, 100, 10 * turn)
            if self.completed_without_model:
                del completed["response"]["model"]
            for out in ({"type": "response.created", "response": {"id": "resp-%d" % turn}},
                        message_event("turn %d" % turn), completed):
                self.send(sock, 0x1, json.dumps(out).encode())


def response_creates(sock, reader, record, on_binary=None):
    """The response.create events a client sends, as a fake upstream sees them:
    every frame goes to ``record``, pings are answered, fragments joined, and a
    close is echoed and ends the iteration."""
    message = b""
    while True:
        fin, opcode, payload, masked = reader.frame()
        record((fin, opcode, payload, masked))
        if opcode == 0x8:
            sock.sendall(ws_frame(0x8, payload))
            return
        if opcode == 0x9:
            sock.sendall(ws_frame(0xA, payload))
            continue
        if opcode == 0x2 and on_binary is not None:
            on_binary(payload)
            continue
        if opcode not in (0x0, 0x1):
            continue
        message += payload
        if not fin:
            continue
        event, message = json.loads(message), b""
        if event.get("type") == "response.create":
            yield event


class WSClient:
    """A WebSocket client speaking to OCM over a raw socket."""

    def __init__(self, port, token="tok-alice", path="/v1/responses", headers=None, key=None):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.key = key or base64.b64encode(os.urandom(16)).decode()
        lines = ["GET %s HTTP/1.1" % path, "Host: 127.0.0.1:%d" % port, "Upgrade: websocket",
                 "Connection: Upgrade", "Sec-WebSocket-Version: 13"]
        if self.key != "-":
            lines.append("Sec-WebSocket-Key: " + self.key)
        if token:
            lines.append("Authorization: Bearer " + token)
        lines += ["%s: %s" % kv for kv in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            data = self.sock.recv(1)
            if not data:
                break
            head += data
        status_line, _, rest = head.decode("latin-1").partition("\r\n")
        self.status = int(status_line.split(" ")[1]) if status_line else 0
        self.headers = {}
        for line in rest.split("\r\n"):
            if ":" in line:
                k, _, v = line.partition(":")
                self.headers[k.strip().lower()] = v.strip()
        self.reader = FrameReader(self.sock.recv)

    def body(self):
        length = int(self.headers.get("content-length", "0"))
        return self.reader._need(length) if length else b""

    def send(self, opcode, payload=b"", fin=True, mask=None, rsv=0):
        self.sock.sendall(ws_frame(opcode, payload, fin, mask or os.urandom(4), rsv))

    def send_json(self, obj):
        self.send(0x1, json.dumps(obj).encode())

    def frame(self):
        return self.reader.frame()

    def events_until_completed(self):
        events = []
        while True:
            fin, opcode, payload, masked = self.frame()
            assert opcode == 0x1 and fin and not masked
            events.append(json.loads(payload))
            if events[-1]["type"] == "response.completed":
                return events

    def close(self):
        self.sock.close()


def expected_accept(key):
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


@pytest.fixture
def ws(fake):
    return WSUpstream(fake)


# == TestWebSocketFrames: the codec at byte level ============================

def parse_all(data, from_client=True, pieces=None, max_payload=1 << 20):
    parser = ocm.FrameParser(from_client, max_payload)
    frames = []
    for piece in pieces or [data]:
        frames += parser.feed(piece)
    return frames


class TestWebSocketFrames:
    def test_rfc6455_examples(self):
        # Section 5.7 of RFC 6455, byte for byte.
        hello = bytes([0x81, 0x05, 0x48, 0x65, 0x6C, 0x6C, 0x6F])
        masked = bytes([0x81, 0x85, 0x37, 0xFA, 0x21, 0x3D, 0x7F, 0x9F, 0x4D, 0x51, 0x58])
        fragments = bytes([0x01, 0x03, 0x48, 0x65, 0x6C, 0x80, 0x02, 0x6C, 0x6F])
        ping = bytes([0x89, 0x05, 0x48, 0x65, 0x6C, 0x6C, 0x6F])
        assert parse_all(hello, from_client=False) == [ocm.Frame(True, 0x1, b"Hello")]
        assert parse_all(masked, from_client=True) == [ocm.Frame(True, 0x1, b"Hello")]
        assert parse_all(fragments, from_client=False) == [ocm.Frame(False, 0x1, b"Hel"),
                                                           ocm.Frame(True, 0x0, b"lo")]
        assert parse_all(ping, from_client=False) == [ocm.Frame(True, 0x9, b"Hello")]
        assert ocm.encode_frame(0x1, b"Hello") == hello
        assert ocm.encode_frame(0x9, b"Hello") == ping
        assert ocm.encode_frame(0x2, b"x" * 256)[:4] == bytes([0x82, 0x7E, 0x01, 0x00])
        assert ocm.encode_frame(0x2, b"x" * 65536)[:10] == bytes([0x82, 0x7F, 0, 0, 0, 0, 0, 1, 0, 0])

    def test_accept_key_of_the_rfc(self):
        assert ocm.websocket_accept("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 section 1.3

    @pytest.mark.parametrize("n", [0, 1, 125, 126, 127, 65535, 65536, 70000, 1 << 20])
    def test_payload_lengths_round_trip(self, n):
        payload = os.urandom(n)
        to_server = ocm.encode_frame(0x2, payload, masked=True)
        to_client = ocm.encode_frame(0x2, payload)
        assert parse_all(to_server, from_client=True, max_payload=2 << 20) == [ocm.Frame(True, 0x2, payload)]
        assert parse_all(to_client, from_client=False, max_payload=2 << 20) == [ocm.Frame(True, 0x2, payload)]
        # and against the test's own decoder, fed a few bytes at a time
        assert FrameReader(_chunks(to_server)).frame() == (True, 0x2, payload, True)
        assert FrameReader(_chunks(to_client)).frame() == (True, 0x2, payload, False)

    def test_masking_uses_a_fresh_key_each_frame(self):
        a = ocm.encode_frame(0x1, b"same payload", masked=True)
        b = ocm.encode_frame(0x1, b"same payload", masked=True)
        assert a[2:6] != b[2:6] and a[6:] != b"same payload"

    def test_apply_mask_matches_per_byte_xor(self):
        for n in (0, 1, 3, 4, 5, 1000, 4097):
            data, mask = os.urandom(n), os.urandom(4)
            assert ocm.apply_mask(data, mask) == bytes(b ^ mask[i % 4] for i, b in enumerate(data))

    def test_every_split_offset(self):
        stream = (ws_frame(0x1, b"first", mask=b"abcd") + ws_frame(0x9, b"p", mask=b"efgh")
                  + ws_frame(0x2, os.urandom(300), mask=b"ijkl") + ws_frame(0x1, b"", fin=False, mask=b"mnop")
                  + ws_frame(0x0, b"end", mask=b"qrst") + ws_frame(0x8, close_body(1000, "ok"), mask=b"uvwx")
                  + ws_frame(0x2, os.urandom(70000), mask=b"yzAB"))
        whole = parse_all(stream, max_payload=1 << 20)
        assert [f.opcode for f in whole] == [0x1, 0x9, 0x2, 0x1, 0x0, 0x8, 0x2]
        for cut in range(1, len(stream), 13 if len(stream) > 5000 else 1):
            assert parse_all(stream, pieces=[stream[:cut], stream[cut:]]) == whole, cut
        small = stream[:200]
        for cut in range(1, len(small)):
            for cut2 in range(cut, len(small), 5):
                assert parse_all(small, pieces=[small[:cut], small[cut:cut2], small[cut2:]]) == \
                    parse_all(small)

    def test_byte_by_byte(self):
        stream = ws_frame(0x1, "héllo wörld".encode(), mask=b"1234") + ws_frame(0xA, b"pong", mask=b"5678")
        frames = parse_all(stream, pieces=[stream[i:i + 1] for i in range(len(stream))])
        assert frames == [ocm.Frame(True, 0x1, "héllo wörld".encode()), ocm.Frame(True, 0xA, b"pong")]

    @pytest.mark.parametrize("data, from_client, code", [
        (ws_frame(0x1, b"x"), True, 1002),                              # client frame unmasked
        (ws_frame(0x1, b"x", mask=b"abcd"), False, 1002),               # server frame masked
        (ws_frame(0x1, b"x", mask=b"abcd", rsv=0x40), True, 1002),      # RSV1 without extension
        (ws_frame(0x1, b"x", mask=b"abcd", rsv=0x20), True, 1002),
        (ws_frame(0x1, b"x", mask=b"abcd", rsv=0x10), True, 1002),
        (ws_frame(0x3, b"x", mask=b"abcd"), True, 1002),                # reserved data opcodes
        (ws_frame(0x7, b"x", mask=b"abcd"), True, 1002),
        (ws_frame(0xB, b"x", mask=b"abcd"), True, 1002),                # reserved control opcodes
        (ws_frame(0xF, b"x", mask=b"abcd"), True, 1002),
        (ws_frame(0x9, b"x", fin=False, mask=b"abcd"), True, 1002),     # fragmented control frame
        (frame_with_length_field(0x9, b"x" * 126, 126, b"abcd"), True, 1002),  # control over 125
        (frame_with_length_field(0x1, b"x" * 5, 126, b"abcd"), True, 1002),    # non-minimal length
        (frame_with_length_field(0x1, b"x" * 200, 127, b"abcd"), True, 1002),
        (bytes([0x82, 0xFF]) + (1 << 63).to_bytes(8, "big") + b"abcd", True, 1002),  # 64-bit top bit
        (frame_with_length_field(0x2, b"x" * 2000, 126, b"abcd"), True, 1009),  # over the limit
    ])
    def test_protocol_errors(self, data, from_client, code):
        with pytest.raises(ocm.WebSocketError) as info:
            parse_all(data, from_client=from_client, max_payload=1000)
        assert info.value.code == code

    def test_fragmented_message_with_ping_between(self):
        tracker = ocm.MessageTracker(1 << 20)
        assert tracker.add(ocm.Frame(False, 0x1, b'{"a":')) is None
        assert tracker.add(ocm.Frame(True, 0x9, b"ping")) is None
        assert tracker.add(ocm.Frame(False, 0x0, b' "b"')) is None
        assert tracker.add(ocm.Frame(True, 0x0, b"}")) == b'{"a": "b"}'

    def test_utf8_split_across_fragments_is_fine_but_invalid_utf8_is_1007(self):
        text = "zürich €".encode()
        tracker = ocm.MessageTracker(1 << 20)
        for i in range(len(text)):
            tracker.add(ocm.Frame(False, 0x1 if i == 0 else 0x0, text[i:i + 1]))
        assert tracker.add(ocm.Frame(True, 0x0, b"")) == text
        for bad in (b"\xff", b"\xc3", b"ab\xed\xa0\x80"):  # invalid byte, truncated, surrogate
            with pytest.raises(ocm.WebSocketError) as info:
                ocm.MessageTracker(1 << 20).add(ocm.Frame(True, 0x1, bad))
            assert info.value.code == 1007

    def test_binary_is_not_checked_for_utf8(self):
        assert ocm.MessageTracker(1 << 20).add(ocm.Frame(True, 0x2, b"\xff\xfe")) is None

    @pytest.mark.parametrize("frames, code", [
        ([ocm.Frame(True, 0x0, b"x")], 1002),                                # continuation, nothing to continue
        ([ocm.Frame(False, 0x1, b"a"), ocm.Frame(True, 0x1, b"b")], 1002),   # new text mid-message
        ([ocm.Frame(False, 0x2, b"a"), ocm.Frame(True, 0x2, b"b")], 1002),
        ([ocm.Frame(False, 0x1, b"x" * 600), ocm.Frame(True, 0x0, b"y" * 600)], 1009),  # message limit
    ])
    def test_message_structure_errors(self, frames, code):
        tracker = ocm.MessageTracker(1000)
        with pytest.raises(ocm.WebSocketError) as info:
            for frame in frames:
                tracker.add(frame)
        assert info.value.code == code

    @pytest.mark.parametrize("payload, expected", [
        (b"", (None, "")), (close_body(1000), (1000, "")), (close_body(1001, "bye"), (1001, "bye")),
        (close_body(4999, "app"), (4999, "app")), (close_body(3000), (3000, "")),
    ])
    def test_valid_close_payloads(self, payload, expected):
        assert ocm.parse_close_payload(payload) == expected

    @pytest.mark.parametrize("payload, code", [
        (b"\x03", 1002), (close_body(999), 1002), (close_body(1004), 1002), (close_body(1005), 1002),
        (close_body(1006), 1002), (close_body(1015), 1002), (close_body(2000), 1002),
        (close_body(5000), 1002), (b"\x03\xe8\xff\xfe", 1007),
    ])
    def test_invalid_close_payloads(self, payload, code):
        with pytest.raises(ocm.WebSocketError) as info:
            ocm.parse_close_payload(payload)
        assert info.value.code == code


def _chunks(data, size=None):
    """A recv() that returns ``data`` a few bytes at a time (in ~100 pieces when big)."""
    size = size or max(7, len(data) // 100)
    parts = [data[i:i + size] for i in range(0, len(data), size)] + [b""]
    it = iter(parts)
    return lambda _n: next(it)


# == TestWebSocketRelay: end to end ===========================================

@pytest.fixture
def tracked_proxy(make_proxy, tmp_path):
    return make_proxy(usages_path=str(tmp_path / "usage.json"))


class TestWebSocketRelay:
    def test_unauthenticated_upgrade_gets_401_and_no_upgrade(self, proxy, fake, ws):
        client = WSClient(proxy.port, token="tok-wrong")
        assert client.status == 401 and "upgrade" not in client.headers
        assert error_of(client.body()) == ("authentication_error", "invalid api key")
        assert fake.requests == []

    def test_wrong_version_gets_426_and_missing_key_400(self, proxy, fake, ws):
        client = WSClient(proxy.port, headers={"Sec-WebSocket-Version": "8"})
        assert client.status in (400, 426)
        sock = socket.create_connection(("127.0.0.1", proxy.port))
        sock.sendall(b"GET /v1/responses HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Version: 12\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     b"Authorization: Bearer tok-alice\r\n\r\n")
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 426") and b"Sec-WebSocket-Version: 13" in answer
        client = WSClient(proxy.port, key="-")
        assert client.status == 400
        client = WSClient(proxy.port, key="bm90IDE2IGJ5dGVz")  # "not 16 bytes"
        assert client.status == 400
        assert fake.requests == []

    def test_handshake_accept_and_forwarded_headers(self, proxy, fake, ws):
        client = WSClient(proxy.port, headers={"Sec-WebSocket-Extensions": "permessage-deflate",
                                               "X-Api-Key": "leak", "session-id": "s-1"})
        assert client.status == 101
        assert client.headers["sec-websocket-accept"] == expected_accept(client.key)
        assert client.headers["upgrade"].lower() == "websocket"
        assert client.headers["x-codex-turn-state"] == "ts-9" and client.headers["x-models-etag"] == "etag-1"
        assert client.headers["openai-model"] == "gpt-5.3-codex"
        assert client.headers["x-reasoning-included"] == "true"
        assert "set-cookie" not in client.headers and "x-other" not in client.headers
        assert "sec-websocket-extensions" not in client.headers  # deflate declined
        sent = ws.handshakes[0]
        names = sent.header_names()
        assert sent.header("Authorization") == "Bearer " + read_json_auth(proxy)["tokens"]["access_token"]
        assert sent.header("ChatGPT-Account-Id") == "acct-123"
        assert sent.header("OpenAI-Beta") == "responses_websockets=2026-02-06"
        assert sent.header("session-id") == "s-1"
        assert "sec-websocket-extensions" not in names and "x-api-key" not in names
        assert sent.header("Sec-WebSocket-Key") != client.key
        assert sent.path == "/backend-api/codex/responses"
        client.close()

    def test_client_openai_beta_is_kept(self, proxy, fake, ws):
        WSClient(proxy.port, headers={"OpenAI-Beta": "responses_websockets=2099-01-01"}).close()
        assert [v for k, v in ws.handshakes[0].headers if k.lower() == "openai-beta"] == [
            "responses_websockets=2099-01-01"]

    def test_101_only_after_upstream_accepted(self, proxy, fake, ws):
        ws.handshake_delay = 0.3
        started = time.monotonic()
        client = WSClient(proxy.port)
        assert client.status == 101 and time.monotonic() - started >= 0.3
        client.close()

    def test_several_turns_on_one_connection_are_counted_for_the_user(self, tracked_proxy, fake, ws):
        ws.completed_without_model = True  # the model must come from response.create
        client = WSClient(tracked_proxy.port, token="tok-bob")
        client.send_json({"type": "response.create", "model": "gpt-5.4", "generate": False})
        assert client.events_until_completed()[-1]["response"]["id"] == "resp-1"
        for turn in (2, 3):
            client.send_json({"type": "response.create", "model": "gpt-5.4", "previous_response_id":
                              "resp-%d" % (turn - 1), "input": [{"type": "message", "role": "user",
                                                                 "content": "more"}], "service_tier": "flex"})
            events = client.events_until_completed()
            assert [e["type"] for e in events] == ["response.created", "response.output_item.done",
                                                   "response.completed"]
        client.send(0x8, close_body(1000, "done"))
        assert client.frame()[1:3] == (0x8, close_body(1000, "done"))
        assert ws.connections == 1
        book = tracked_proxy.server.usage
        assert wait_for(lambda: sum(c["total"]["request_count"] for c in book.to_json()["combinations"]) == 3)
        combos = {c["service_tier"]: c for c in book.to_json()["combinations"]}
        assert combos["default"]["model"] == "gpt-5.4" and combos["default"]["by_user"]["bob"]["request_count"] == 1
        assert combos["flex"]["by_user"]["bob"]["request_count"] == 2
        assert combos["flex"]["by_user"]["bob"]["input_tokens"] == 5000

    def test_fragments_pings_and_binary_are_relayed_with_their_meaning(self, proxy, fake, ws):
        client = WSClient(proxy.port)
        text = json.dumps({"type": "response.create", "model": "m"}).encode()
        client.send(0x1, text[:5], fin=False)
        client.send(0x9, b"mid-ping")
        client.send(0x0, text[5:12], fin=False)
        client.send(0x0, text[12:], fin=True)
        frames = [client.frame() for _ in range(4)]  # pong + 3 events, in any order of pong
        assert (True, 0xA, b"mid-ping", False) in frames
        # A client's message goes upstream once whole and admitted, in its own
        # fragments; the ping between them passed at once.
        got = [(fin, op, payload) for fin, op, payload, _ in ws.frames]
        assert got[:4] == [(True, 0x9, b"mid-ping"), (False, 0x1, text[:5]), (False, 0x0, text[5:12]),
                           (True, 0x0, text[12:])]
        assert all(masked for *_, masked in ws.frames)  # re-masked towards upstream
        # Binary messages carry nothing the API reads, and could carry what
        # OCM would not check: refused, and the session goes on.
        client.send(0x2, b"\x00\x01\x02\xff")
        fin, opcode, payload, _ = client.frame()
        assert opcode == 0x1 and json.loads(payload)["error"]["type"] == "invalid_request_error"
        assert len(ws.frames) == 4
        client.send_json({"type": "response.create", "model": "m"})
        assert client.events_until_completed()[-1]["type"] == "response.completed"
        client.close()

    def test_close_codes_and_reasons_pass_both_ways(self, proxy, fake, ws):
        client = WSClient(proxy.port)
        client.send(0x8, close_body(4001, "client reason"))
        assert client.frame() == (True, 0x8, close_body(4001, "client reason"), False)
        assert ws.frames[-1][1:3] == (0x8, close_body(4001, "client reason"))
        assert ws.closed.wait(5)
        client.sock.settimeout(5)
        assert client.sock.recv(10) == b""  # OCM closed the TCP connection too

    def test_upstream_close_reaches_the_client(self, proxy, fake, ws):
        def script(sock, reader):
            sock.sendall(ws_frame(0x8, close_body(4000, "upstream says bye")))
            fin, opcode, payload, masked = reader.frame()
            ws.frames.append((fin, opcode, payload, masked))

        ws.on_connect = script
        client = WSClient(proxy.port)
        assert client.frame() == (True, 0x8, close_body(4000, "upstream says bye"), False)
        client.send(0x8, close_body(4000, "upstream says bye"))
        assert wait_for(lambda: ws.frames and ws.frames[-1][1] == 0x8)

    def test_upstream_vanishing_gives_the_client_1011(self, proxy, fake, ws):
        ws.on_connect = lambda sock, reader: sock.shutdown(socket.SHUT_RDWR)
        client = WSClient(proxy.port)
        fin, opcode, payload, _ = client.frame()
        assert opcode == 0x8 and int.from_bytes(payload[:2], "big") == 1011

    def test_client_disconnect_closes_upstream_with_1001(self, proxy, fake, ws):
        client = WSClient(proxy.port)
        client.send_json({"type": "response.create", "model": "m"})
        client.events_until_completed()
        client.sock.shutdown(socket.SHUT_RDWR)
        client.close()
        assert ws.closed.wait(5)
        assert ws.frames[-1][1] == 0x8 and int.from_bytes(ws.frames[-1][2][:2], "big") == 1001

    @pytest.mark.parametrize("bad, code", [
        (lambda c: c.sock.sendall(ws_frame(0x1, b"unmasked")), 1002),
        (lambda c: c.send(0x1, b"\xff\xfe not utf-8"), 1007),
        (lambda c: c.send(0x1, b"x", rsv=0x40), 1002),
        (lambda c: c.send(0x0, b"nothing to continue"), 1002),
        (lambda c: c.send(0x2, b"x" * 5000), 1009),
    ])
    def test_client_protocol_errors_close_with_the_right_code(self, make_proxy, fake, ws, bad, code):
        proxy = make_proxy(limits={"max_websocket_message": 4096})
        client = WSClient(proxy.port)
        bad(client)
        fin, opcode, payload, _ = client.frame()
        assert opcode == 0x8 and int.from_bytes(payload[:2], "big") == code
        assert ws.closed.wait(5)
        assert ws.frames[-1][1] == 0x8 and int.from_bytes(ws.frames[-1][2][:2], "big") == 1001

    def test_upstream_protocol_error_gives_the_client_1011(self, proxy, fake, ws):
        ws.on_connect = lambda sock, reader: (sock.sendall(ws_frame(0x1, b"masked!", mask=b"abcd")),
                                              reader.frame())
        client = WSClient(proxy.port)
        fin, opcode, payload, _ = client.frame()
        assert opcode == 0x8 and int.from_bytes(payload[:2], "big") == 1011

    def test_upstream_429_becomes_an_error_frame_codex_understands(self, proxy, fake, ws):
        ws.status = 429
        ws.refusal_body = json.dumps({"error": {"type": "usage_limit_reached", "message": "limit",
                                                "plan_type": "pro", "resets_at": 1795512000}}).encode()
        ws.refusal_headers = {"x-codex-primary-used-percent": "100", "x-codex-secondary-used-percent": "40",
                              "Content-Type": "application/json"}
        client = WSClient(proxy.port)
        assert client.status == 101
        # the error answers the request, as upstream's would: Codex drops one that comes before it
        client.sock.settimeout(0.3)
        with pytest.raises(socket.timeout):
            client.sock.recv(1)
        client.sock.settimeout(10)
        client.send_json({"type": "response.create", "model": "gpt-5.4", "input": []})
        fin, opcode, payload, _ = client.frame()
        event = json.loads(payload)
        assert event["type"] == "error" and event["status"] == 429
        assert event["error"] == {"type": "usage_limit_reached", "message": "limit", "plan_type": "pro",
                                  "resets_at": 1795512000}
        assert event["headers"]["x-codex-primary-used-percent"] == "100"
        assert "content-type" not in event["headers"]
        assert client.frame()[1] == 0x8

    def test_a_client_that_sends_nothing_still_gets_the_error_frame(self, proxy, fake, ws, monkeypatch):
        monkeypatch.setattr(ocm, "WS_FIRST_MESSAGE_WAIT", 0.3)
        ws.status = 429
        ws.refusal_body = json.dumps({"error": {"type": "usage_limit_reached", "message": "limit"}}).encode()
        client = WSClient(proxy.port)
        assert client.status == 101
        started = time.monotonic()
        event = json.loads(client.frame()[2])
        assert event["type"] == "error" and event["status"] == 429
        assert time.monotonic() - started < 5  # the wait is bounded: no thread held for ever
        assert client.frame()[1] == 0x8

    @pytest.mark.parametrize("upstream_status", [404, 426])
    def test_upstream_without_websockets_makes_the_client_fall_back(self, proxy, fake, ws, upstream_status):
        ws.status = upstream_status
        client = WSClient(proxy.port)
        assert client.status == 426 and "upgrade" not in client.headers

    def test_other_refusals_are_relayed(self, proxy, fake, ws):
        ws.status = 500
        ws.refusal_body = b'{"error": {"message": "boom"}}'
        client = WSClient(proxy.port)
        assert client.status == 500 and client.body() == b'{"error": {"message": "boom"}}'

    def test_unreachable_upstream_is_502(self, make_proxy, fake):
        port = free_port()
        proxy = make_proxy(upstream={"chatgpt_url": "http://127.0.0.1:%d/backend-api/codex" % port,
                                     "token_url": fake.token_url})
        client = WSClient(proxy.port)
        assert client.status == 502 and error_of(client.body())[0] == "api_error"

    def test_upstream_401_refreshes_and_retries_the_handshake(self, proxy, fake, ws, auth_path):
        old = read_json(auth_path)["tokens"]["access_token"]
        route = ws.route

        def refuse_old_token(ex):
            if ex.request.header("Authorization") == "Bearer " + old:
                return ex.json(401, {"error": {"message": "expired"}})
            route(ex)

        fake.on("GET", "/backend-api/codex/responses", refuse_old_token)
        client = WSClient(proxy.port)
        assert client.status == 101 and len(fake.token_calls) == 1
        client.close()

    def test_server_shutdown_closes_live_sessions_with_1001(self, proxy, fake, ws):
        client = WSClient(proxy.port)
        client.send_json({"type": "response.create", "model": "m"})
        client.events_until_completed()
        started = time.monotonic()
        closer = threading.Thread(target=proxy.close)
        closer.start()
        fin, opcode, payload, _ = client.frame()
        assert opcode == 0x8 and int.from_bytes(payload[:2], "big") == 1001
        client.send(0x8, payload)
        closer.join(10)
        assert time.monotonic() - started < 3
        assert ws.closed.wait(5)

    def test_a_session_idle_past_the_limit_is_closed(self, proxy, fake, ws):
        client = WSClient(proxy.port)
        client.send_json({"type": "response.create", "model": "gpt-5.4"})
        client.events_until_completed()
        assert wait_for(lambda: len(proxy.server._websockets) == 1)
        session = next(iter(proxy.server._websockets))
        # The sender thread clears its send clock just after the client has the
        # bytes; with the clock pushed ahead, a send still marked would look stalled.
        assert wait_for(lambda: not session.client.sending_since
                        and not session.upstream.sending_since)
        proxy.server.cut_stalled_websockets(time.monotonic() + 60)  # an hour's quiet is not a minute's
        proxy.server.cut_stalled_websockets(time.monotonic() + ocm.WS_IDLE_LIMIT + 1)
        fin, opcode, payload, _ = client.frame()
        assert opcode == 0x8 and payload == close_body(1001, "idle")
        client.close()

    def test_no_threads_are_left_behind(self, proxy, fake, ws):
        before = threading.active_count()
        for _ in range(5):
            client = WSClient(proxy.port)
            client.send_json({"type": "response.create", "model": "m"})
            client.events_until_completed()
            client.send(0x8, close_body(1000))
            client.frame()
            client.close()
        assert wait_for(lambda: threading.active_count() <= before + 1)


def read_json_auth(proxy):
    return read_json(proxy.server.credential.path)


# == The real Codex CLI over WebSocket =========================================

def scripted_model(ws):
    """A Codex-facing model over WebSocket: call the shell tool, then answer
    with its output (two model turns on one socket); the HTTP twin is
    test_ocm.codex_model."""

    def play(sock, reader):
        for event in response_creates(sock, reader, ws.record):
            outputs = [i for i in event.get("input", []) if i.get("type") == "function_call_output"]
            model = event.get("model", "gpt-5.3-codex")
            if event.get("generate") is False:
                out = [completed_event("warm", model, 0, 0, 0)]
            elif not outputs:
                out = [{"type": "response.output_item.done", "item": {
                    "type": "function_call", "name": "exec_command", "call_id": "call_1",
                    "arguments": json.dumps({"cmd": "echo tool-says-$((40+2))"})}},
                    completed_event("r-call", model, 5000, 1000, 50)]
            else:
                text = json.dumps(outputs[-1].get("output"))
                answer = "the tool printed 42" if "tool-says-42" in text else "missing: " + text[:100]
                out = [message_event(answer), completed_event("r-answer", model, 6000, 4000, 20)]
            for o in out:
                sock.sendall(ws_frame(0x1, json.dumps(o).encode()))

    return play


@needs_codex
class TestRealCodexWebSocket:
    def test_codex_runs_several_turns_over_one_websocket(self, tracked_proxy, fake, ws, tmp_path):
        ws.on_connect = scripted_model(ws)
        out = run_codex(tracked_proxy.port, tmp_path, "run the tool and report what it printed",
                        token="tok-bob", provider_extra="supports_websockets = true\n")
        assert out.returncode == 0, out.stderr[-3000:]
        assert "the tool printed 42" in out.stdout
        assert ws.connections == 1
        creates = [json.loads(p) for fin, op, p, _ in ws.frames if op == 0x1]
        assert len([c for c in creates if c.get("type") == "response.create"]) >= 2
        book = tracked_proxy.server.usage
        assert wait_for(lambda: sum(c["total"]["request_count"] for c in book.to_json()["combinations"]) >= 2)
        users = {u for c in book.to_json()["combinations"] for u in c["by_user"]}
        assert users == {"bob"}

    def test_codex_shows_the_usage_limit_message_from_the_error_frame(self, proxy, fake, ws, tmp_path):
        ws.status = 429
        ws.refusal_body = json.dumps({"error": {"type": "usage_limit_reached",
                                                "message": "The usage limit has been reached",
                                                "plan_type": "pro", "resets_at": int(time.time()) + 7200}}).encode()
        ws.refusal_headers = {"x-codex-primary-used-percent": "100"}
        out = run_codex(proxy.port, tmp_path, "say hi", provider_extra="supports_websockets = true\n")
        assert "hit your usage limit" in out.stdout + out.stderr
        assert not [r for r in fake.requests if r.method == "POST"]  # no silent HTTP retry

    def test_codex_falls_back_to_http_when_upstream_has_no_websocket(self, proxy, fake, ws, tmp_path):
        ws.status = 404
        fake.on("POST", "/backend-api/codex/responses",
                lambda ex: ex.stream(b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in (
                    message_event("over plain HTTP"), completed_event()))))
        out = run_codex(proxy.port, tmp_path, "say hi", provider_extra="supports_websockets = true\n")
        assert out.returncode == 0, out.stderr[-2000:]
        assert "over plain HTTP" in out.stdout
        assert ws.connections == 1  # one try, then HTTP at once


# == The documented nginx front end, with a real Codex =======================

def readme_nginx_blocks():
    """The `map` line and the `location` blocks of docs/tls-and-exposure.md's nginx example."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "tls-and-exposure.md")) as f:
        example = f.read().split("```nginx\n", 1)[1].split("```", 1)[0]
    mapping = next(line for line in example.splitlines() if line.startswith("map "))
    locations = []
    for rest in example.split("    location ")[1:]:
        locations.append("location " + rest[:rest.index("}") + 1])  # no nested blocks inside
    assert locations[0].startswith("location /v1/ ")
    return mapping, "\n".join(locations)


@pytest.fixture
def nginx_front(proxy, tmp_path):
    """nginx on loopback, configured with the documented example, in front of OCM."""
    import shutil
    import subprocess
    binary = next((p for p in (shutil.which("nginx"), "/usr/sbin/nginx") if p and os.access(p, os.X_OK)), None)
    if binary is None:
        pytest.skip("nginx is not installed")
    mapping, location = readme_nginx_blocks()
    assert "127.0.0.1:8080" in location
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path / "nginx"
    root.mkdir()
    temp = " ".join("%s_temp_path %s;" % (kind, root / kind) for kind in
                    ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (root / "nginx.conf").write_text(
        "daemon off; pid %s; error_log %s warn;\nevents {}\nhttp { access_log off; %s\n%s\n"
        "server { listen 127.0.0.1:%d;\n%s\n}\n}\n"
        % (root / "nginx.pid", root / "error.log", temp, mapping, port,
           location.replace("127.0.0.1:8080", "127.0.0.1:%d" % proxy.port)))
    proc = subprocess.Popen([binary, "-p", str(root), "-c", str(root / "nginx.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_for(lambda: proc.poll() is not None or _accepts(port)), "nginx did not start"
        assert proc.poll() is None, proc.stderr.read().decode()
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stderr.close()


def _accepts(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@needs_codex
class TestBehindNginx:
    def test_codex_over_websocket_and_http_through_the_readme_nginx_example(self, nginx_front, fake, ws,
                                                                             tmp_path):
        from test_ocm import codex_model
        ws.on_connect = scripted_model(ws)
        out = run_codex(nginx_front, tmp_path / "ws", "run the tool and report what it printed",
                        provider_extra="supports_websockets = true\n")
        assert out.returncode == 0, out.stderr[-3000:]
        assert "the tool printed 42" in out.stdout and ws.connections == 1
        fake.on("POST", "/backend-api/codex/responses", codex_model)
        out = run_codex(nginx_front, tmp_path / "http", "run the tool and report what it printed")
        assert out.returncode == 0, out.stderr[-3000:]
        assert "the tool printed 42" in out.stdout


class TestNginxExample:
    def test_only_v1_is_passed_on_so_metrics_stay_private(self, nginx_front):
        import http.client
        for path in ("/metrics", "/ocm/v1/usage"):
            conn = http.client.HTTPConnection("127.0.0.1", nginx_front, timeout=5)
            conn.request("GET", path)
            response = conn.getresponse()
            # nginx's own refusal, or OCM's (the proxy's header says it is not the box)
            assert response.status in (403, 404) and b"ocm_" not in response.read()
            conn.close()

    def test_a_visitor_of_the_dashboard_through_it_is_not_the_box(self, nginx_front, proxy):
        """nginx's own defaults (Host: 127.0.0.1:PORT, no X-Forwarded-For) would make every
        visitor the owner; the example's two headers keep them a stranger."""
        import http.client

        def get(path, headers):
            conn = http.client.HTTPConnection("127.0.0.1", nginx_front, timeout=5)
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            answer = (response.status, response.read())
            conn.close()
            return answer

        assert get("/ocm/", {"Host": "ocm.example.org"})[0] == 200
        for host in ("ocm.example.org", "127.0.0.1", "localhost:%d" % nginx_front):
            status, body = get("/ocm/v1/dashboard", {"Host": host})
            assert status == 401 and b"viewer" not in body, host
        status, body = get("/ocm/v1/dashboard", {"Host": "ocm.example.org",
                                                 "Authorization": "Bearer " + USERS[0]["token"]})
        assert status == 200 and json.loads(body)["viewer"]["role"] == "person"
