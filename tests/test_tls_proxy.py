"""TLS for clients, detour proxies for upstream, upstream TLS checks, and
listening on IPv4, IPv6 and host names.

Certificates come from tests/certs (a test CA, valid for 100 years). The
proxies are small in-process HTTP CONNECT and SOCKS5 servers that record
what they were asked."""

import base64
import http.client
import ipaddress
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest

import ocm
from test_ocm import (CODEX, CODEX_BODY, OCM_PY, USERS, FakeUpstream, Proxy, completed_event, error_of, free_port,
                      message_event, needs_codex, read_json, run_codex, sse, write_auth)
from test_websocket import WSClient, WSUpstream

CERTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "certs")
CA = os.path.join(CERTS, "ca.pem")


def cert(name):
    return os.path.join(CERTS, name)


def server_context(name="server"):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert(name + ".pem"), cert(name + ".key"))
    return context


def client_context(minimum=None, maximum=None, alpn=None):
    context = ssl.create_default_context(cafile=CA)
    if minimum:
        context.minimum_version = minimum
    if maximum:
        context.maximum_version = maximum
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


# == In-process proxies ========================================================

def pipe(a, b):
    """Copy both ways until either side closes."""
    def one_way(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    t = threading.Thread(target=one_way, args=(b, a), daemon=True)
    t.start()
    one_way(a, b)
    t.join(5)
    a.close()
    b.close()


class ProxyServer:
    """Base: a listening socket and a thread per client."""

    def __init__(self, username=None, password=None, refuse=False):
        self.username, self.password, self.refuse = username, password, refuse
        self.requests = []   # what each client asked for
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self.accept_loop, daemon=True).start()

    def accept_loop(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.handle_safely, args=(client,), daemon=True).start()

    def handle_safely(self, client):
        try:
            self.handle(client)
        except (OSError, ValueError, IndexError):
            client.close()

    def close(self):
        try:  # close() alone does not wake a thread blocked in accept(); shutdown does
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()


class ConnectProxy(ProxyServer):
    scheme = "http"

    def handle(self, client):
        head = b""
        while b"\r\n\r\n" not in head:
            data = client.recv(4096)
            if not data:
                return client.close()
            head += data
        lines = head.split(b"\r\n")
        method, target, _ = lines[0].decode().split(" ")
        auth = [l.split(b":", 1)[1].strip().decode() for l in lines[1:] if l.lower().startswith(b"proxy-authorization:")]
        self.requests.append({"target": target, "auth": auth[0] if auth else None})
        if self.username is not None:
            expected = "Basic " + base64.b64encode(("%s:%s" % (self.username, self.password)).encode()).decode()
            if not auth or auth[0] != expected:
                client.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
                return client.close()
        if self.refuse or method != "CONNECT":
            client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            return client.close()
        host, _, port = target.rpartition(":")
        upstream = socket.create_connection((host.strip("[]"), int(port)))
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        pipe(client, upstream)


class Socks5Proxy(ProxyServer):
    scheme = "socks5"

    def recv_exact(self, sock, n):
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise OSError("closed")
            data += chunk
        return data

    def handle(self, client):
        version, count = self.recv_exact(client, 2)
        methods = self.recv_exact(client, count)
        wanted = 0x02 if self.username is not None else 0x00
        if wanted not in methods:
            client.sendall(b"\x05\xff")
            return client.close()
        client.sendall(bytes([5, wanted]))
        record = {"auth": None}
        if wanted == 0x02:
            _, ulen = self.recv_exact(client, 2)
            user = self.recv_exact(client, ulen).decode()
            plen = self.recv_exact(client, 1)[0]
            password = self.recv_exact(client, plen).decode()
            record["auth"] = (user, password)
            if (user, password) != (self.username, self.password):
                client.sendall(b"\x01\x01")
                self.requests.append(record)
                return client.close()
            client.sendall(b"\x01\x00")
        _, command, _, atyp = self.recv_exact(client, 4)
        if atyp == 3:
            name = self.recv_exact(client, self.recv_exact(client, 1)[0]).decode()
            record["kind"], record["host"] = "domain", name
        else:
            raw = self.recv_exact(client, 4 if atyp == 1 else 16)
            record["kind"], record["host"] = "ip", str(ipaddress.ip_address(raw))
        record["port"] = int.from_bytes(self.recv_exact(client, 2), "big")
        self.requests.append(record)
        if self.refuse:
            client.sendall(b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00")
            return client.close()
        upstream = socket.create_connection((record["host"], record["port"]))
        client.sendall(b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00")
        pipe(client, upstream)


@pytest.fixture
def proxies():
    made = []

    def make(kind, **options):
        proxy = {"http": ConnectProxy, "socks5": Socks5Proxy, "socks5h": Socks5Proxy}[kind](**options)
        proxy.url_scheme = kind
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.close()


def detour_url(proxy, user=None, password=None):
    credentials = "%s:%s@" % (user, password) if user is not None else ""
    return "%s://%s127.0.0.1:%d" % (proxy.url_scheme, credentials, proxy.port)


def upstream_config(fake):
    return {"chatgpt_url": fake.chatgpt_url, "api_url": fake.url, "token_url": fake.token_url}


# == TestDetour ================================================================

@pytest.fixture
def named_fake():
    """A fake upstream reached by a host name, so socks5 and socks5h differ."""
    upstream = FakeUpstream(host="localhost")
    yield upstream
    upstream.close()


class TestDetour:
    @pytest.mark.parametrize("kind", ["http", "socks5", "socks5h"])
    def test_relay_goes_through_each_proxy_kind(self, make_proxy, named_fake, proxies, kind):
        proxy = proxies(kind)
        ocm_proxy = make_proxy(detour=detour_url(proxy), upstream=upstream_config(named_fake))
        status, _, body = ocm_proxy.request("POST", "/v1/responses", dict(CODEX, model="m"))
        assert status == 200 and b"response.completed" in body
        asked = proxy.requests[0]
        if kind == "http":
            assert asked["target"] == "localhost:%d" % named_fake.port
        elif kind == "socks5":  # resolved here, the proxy gets an address
            assert asked["kind"] == "ip" and asked["host"] in ("127.0.0.1", "::1")
        else:  # socks5h: the proxy resolves the name
            assert asked == {"auth": None, "kind": "domain", "host": "localhost", "port": named_fake.port}

    @pytest.mark.parametrize("kind", ["http", "socks5"])
    def test_proxy_credentials_are_sent(self, make_proxy, fake, proxies, kind):
        proxy = proxies(kind, username="joe", password="s3cret:@")
        url = detour_url(proxy, "joe", "s3cret%3A%40")
        ocm_proxy = make_proxy(detour=url, upstream=upstream_config(fake))
        assert ocm_proxy.request("POST", "/v1/responses", {})[0] == 200
        auth = proxy.requests[0]["auth"]
        if kind == "http":
            assert base64.b64decode(auth.split(" ")[1]) == b"joe:s3cret:@"
        else:
            assert auth == ("joe", "s3cret:@")

    @pytest.mark.parametrize("kind, options, needle", [
        ("http", {"refuse": True}, "answered 403 Forbidden"),
        ("http", {"username": "joe", "password": "right"}, "answered 407 Proxy Authentication Required"),
        ("socks5", {"refuse": True}, "could not connect: connection not allowed by its rules"),
        ("socks5", {"username": "joe", "password": "right"}, "rejected the username or password"),
        ("socks5h", {"username": "joe", "password": "right"}, "none of our authentication methods"),
    ])
    def test_refusing_proxies_give_502_naming_the_answer(self, make_proxy, fake, proxies, kind, options, needle):
        proxy = proxies(kind, **options)
        wrong = "wrong" if options.get("username") and kind != "socks5h" else None
        url = detour_url(proxy, "joe", wrong) if wrong else detour_url(proxy)
        ocm_proxy = make_proxy(detour=url, upstream=upstream_config(fake))
        started = time.monotonic()
        status, _, body = ocm_proxy.request("POST", "/v1/responses", {})
        kind_, message = error_of(body)
        assert status == 502 and kind_ == "api_error" and needle in message
        assert "wrong" not in message  # the password never shows
        assert time.monotonic() - started < 5
        assert fake.requests == []

    def test_dead_proxy_is_a_502_not_a_hang(self, make_proxy, fake):
        port = free_port()
        ocm_proxy = make_proxy(detour="socks5://127.0.0.1:%d" % port, upstream=upstream_config(fake))
        status, _, body = ocm_proxy.request("POST", "/v1/responses", {})
        assert status == 502 and "cannot reach proxy socks5://127.0.0.1:%d" % port in error_of(body)[1]

    def test_silent_proxy_times_out(self, make_proxy, fake):
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(5)
        try:
            ocm_proxy = make_proxy(detour="http://127.0.0.1:%d" % silent.getsockname()[1],
                                   upstream=upstream_config(fake), limits={"connect_timeout": 0.5})
            status, _, body = ocm_proxy.request("POST", "/v1/responses", {})
            assert status == 502 and "did not answer" in error_of(body)[1]
        finally:
            silent.close()

    @pytest.mark.parametrize("kind", ["http", "socks5h"])
    def test_websocket_goes_through_the_proxy(self, make_proxy, fake, proxies, kind):
        ws = WSUpstream(fake)
        proxy = proxies(kind)
        ocm_proxy = make_proxy(detour=detour_url(proxy), upstream=upstream_config(fake))
        client = WSClient(ocm_proxy.port)
        assert client.status == 101
        client.send_json({"type": "response.create", "model": "m"})
        assert client.events_until_completed()[-1]["type"] == "response.completed"
        client.close()
        assert len(proxy.requests) == 1 and ws.connections == 1

    @pytest.mark.parametrize("kind", ["http", "socks5"])
    def test_token_refresh_goes_through_the_proxy(self, make_proxy, fake, proxies, auth_path, kind):
        write_auth(auth_path, expires_in=-10)
        proxy = proxies(kind)
        ocm_proxy = make_proxy(detour=detour_url(proxy), upstream=upstream_config(fake))
        assert ocm_proxy.request("POST", "/v1/responses", {})[0] == 200
        assert len(fake.token_calls) == 1
        assert len(proxy.requests) == 2  # one tunnel for the token call, one for the relay

    def test_sing_box_outbound_tag_is_refused_with_advice(self):
        with pytest.raises(ocm.ConfigError, match="not a proxy URL"):
            ocm.config_from_dict({"detour": "my-outbound"})
        with pytest.raises(ocm.ConfigError, match="needs a host and a port"):
            ocm.config_from_dict({"detour": "socks5://127.0.0.1"})
        with pytest.raises(ocm.ConfigError, match="not supported"):
            ocm.config_from_dict({"detour": "https://127.0.0.1:8443"})

    def test_proxy_password_never_in_repr_or_str(self):
        config = ocm.config_from_dict({"detour": "socks5://user:topsecret@127.0.0.1:1080"})
        assert "topsecret" not in repr(config) and "topsecret" not in str(config.detour)


class TestEnvironmentProxy:
    def test_http_proxy_environment_applies_to_relay_and_refresh(self, make_proxy, fake, proxies,
                                                                 auth_path, monkeypatch):
        write_auth(auth_path, expires_in=-10)
        proxy = proxies("http")
        monkeypatch.setenv("http_proxy", "http://127.0.0.1:%d" % proxy.port)
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        ocm_proxy = make_proxy(upstream=upstream_config(fake))
        assert ocm_proxy.request("POST", "/v1/responses", {})[0] == 200
        assert len(proxy.requests) == 2 and len(fake.token_calls) == 1

    def test_no_proxy_is_honoured(self, make_proxy, fake, proxies, monkeypatch):
        proxy = proxies("http")
        monkeypatch.setenv("http_proxy", "http://127.0.0.1:%d" % proxy.port)
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        ocm_proxy = make_proxy(upstream=upstream_config(fake))
        assert ocm_proxy.request("POST", "/v1/responses", {})[0] == 200
        assert proxy.requests == []

    def test_socks_in_all_proxy(self, make_proxy, named_fake, proxies, monkeypatch):
        proxy = proxies("socks5h")
        for var in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("all_proxy", "socks5h://127.0.0.1:%d" % proxy.port)
        ocm_proxy = make_proxy(upstream=upstream_config(named_fake))
        assert ocm_proxy.request("POST", "/v1/responses", {})[0] == 200
        assert proxy.requests[0]["kind"] == "domain"

    def test_detour_wins_over_the_environment(self, make_proxy, fake, proxies, monkeypatch):
        env_proxy, detour = proxies("http"), proxies("socks5")
        monkeypatch.setenv("http_proxy", "http://127.0.0.1:%d" % env_proxy.port)
        ocm_proxy = make_proxy(detour=detour_url(detour), upstream=upstream_config(fake))
        assert ocm_proxy.request("POST", "/v1/responses", {})[0] == 200
        assert env_proxy.requests == [] and len(detour.requests) == 1


# == TestUpstreamTLS ===========================================================

@pytest.fixture
def https_fake():
    upstream = FakeUpstream(tls_context=server_context("server"), host="localhost")
    yield upstream
    upstream.close()


class TestUpstreamTLS:
    def test_https_upstream_trusted_through_ssl_cert_file(self, make_proxy, https_fake, monkeypatch):
        monkeypatch.setenv("SSL_CERT_FILE", CA)
        ocm_proxy = make_proxy(upstream=upstream_config(https_fake))
        status, _, body = ocm_proxy.request("POST", "/v1/responses", CODEX)
        assert status == 200 and b"response.completed" in body

    def test_ssl_cert_file_adds_to_the_system_store(self, monkeypatch):
        monkeypatch.setenv("SSL_CERT_FILE", CA)
        context = ocm.Connector(5, 5).ssl_context()
        subjects = [dict(x[0] for x in c["subject"]).get("commonName") for c in context.get_ca_certs()]
        assert "OCM Test CA" in subjects
        system = ssl.create_default_context()
        monkeypatch.delenv("SSL_CERT_FILE")
        if len(ssl.create_default_context().get_ca_certs()) > 1:
            assert len(subjects) > 1  # the system's own CAs are still there

    def test_untrusted_upstream_certificate_is_refused(self, make_proxy, https_fake, monkeypatch):
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        ocm_proxy = make_proxy(upstream=upstream_config(https_fake))
        status, _, body = ocm_proxy.request("POST", "/v1/responses", {})
        assert status == 502 and "TLS certificate not trusted" in error_of(body)[1]
        assert https_fake.requests == []

    def test_wrong_hostname_is_refused(self, make_proxy, monkeypatch):
        monkeypatch.setenv("SSL_CERT_FILE", CA)
        wrong = FakeUpstream(tls_context=server_context("wrong"), host="localhost")
        try:
            ocm_proxy = make_proxy(upstream=upstream_config(wrong))
            status, _, body = ocm_proxy.request("POST", "/v1/responses", {})
            message = error_of(body)[1]
            assert status == 502 and "TLS certificate not trusted" in message and "localhost" in message
            assert wrong.requests == []
        finally:
            wrong.close()

    def test_no_option_turns_verification_off(self):
        with pytest.raises(ocm.ConfigError):
            ocm.config_from_dict({"upstream": {"insecure": True}})
        with pytest.raises(ocm.ConfigError):
            ocm.config_from_dict({"insecure_skip_verify": True})

    @pytest.mark.parametrize("kind", ["http", "socks5", "socks5h"])
    def test_https_upstream_through_each_detour(self, make_proxy, https_fake, proxies, monkeypatch, kind):
        monkeypatch.setenv("SSL_CERT_FILE", CA)
        proxy = proxies(kind)
        ocm_proxy = make_proxy(detour=detour_url(proxy), upstream=upstream_config(https_fake))
        status, _, body = ocm_proxy.request("POST", "/v1/responses", CODEX)
        assert status == 200 and b"response.completed" in body
        assert len(proxy.requests) == 1

    def test_https_websocket(self, make_proxy, https_fake, monkeypatch):
        monkeypatch.setenv("SSL_CERT_FILE", CA)
        WSUpstream(https_fake)
        ocm_proxy = make_proxy(upstream=upstream_config(https_fake))
        client = WSClient(ocm_proxy.port)
        assert client.status == 101
        client.send_json({"type": "response.create", "model": "m"})
        assert client.events_until_completed()[-1]["type"] == "response.completed"
        client.close()


# == TestInboundTLS ============================================================

def tls_config(**extra):
    config = {"enabled": True, "certificate_path": cert("server.pem"), "key_path": cert("server.key")}
    config.update(extra)
    return config


def tls_request(port, context=None, path="/v1/models", host="localhost"):
    conn = http.client.HTTPSConnection(host, port, context=context or client_context(), timeout=10)
    try:
        conn.request("GET", path, headers={"Authorization": "Bearer tok-alice"})
        resp = conn.getresponse()
        return resp.status, resp.read(), conn.sock
    finally:
        conn.close()


def peer_common_name(port):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with client_context().wrap_socket(raw, server_hostname="localhost") as tls:
            return dict(x[0] for x in tls.getpeercert()["subject"])["commonName"]


class TestInboundTLS:
    def test_serves_https(self, make_proxy, fake):
        proxy = make_proxy(tls=tls_config())
        assert proxy.server.url.startswith("https://")
        status, body, _ = tls_request(proxy.port)
        assert status == 200 and fake.requests

    def test_inline_certificate_as_list_of_lines(self, make_proxy, fake):
        lines = open(cert("server.pem")).read().splitlines()
        key = open(cert("server.key")).read()
        proxy = make_proxy(tls={"enabled": True, "certificate": lines, "key": key})
        assert tls_request(proxy.port)[0] == 200

    def test_plain_http_to_a_tls_port_gets_nothing(self, make_proxy, fake):
        proxy = make_proxy(tls=tls_config())
        with pytest.raises((http.client.HTTPException, OSError)):
            proxy.request("GET", "/v1/models")
        assert fake.requests == []

    def test_min_version_refuses_older_clients(self, make_proxy, fake):
        proxy = make_proxy(tls=tls_config(min_version="1.3"))
        with pytest.raises(ssl.SSLError):
            tls_request(proxy.port, client_context(maximum=ssl.TLSVersion.TLSv1_2))
        status, _, sock = tls_request(proxy.port, client_context(minimum=ssl.TLSVersion.TLSv1_3))
        assert status == 200

    def test_max_version(self, make_proxy, fake):
        proxy = make_proxy(tls=tls_config(max_version="1.2"))
        with pytest.raises(ssl.SSLError):
            tls_request(proxy.port, client_context(minimum=ssl.TLSVersion.TLSv1_3))
        assert tls_request(proxy.port, client_context(maximum=ssl.TLSVersion.TLSv1_2))[0] == 200

    def test_alpn_offers_http11_only(self, make_proxy, fake):
        proxy = make_proxy(tls=tls_config(alpn=["h2", "http/1.1"]))
        with socket.create_connection(("127.0.0.1", proxy.port)) as raw:
            context = client_context(alpn=["h2", "http/1.1"])
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                assert tls.selected_alpn_protocol() == "http/1.1"

    def test_stalled_handshake_does_not_block_others_and_is_dropped(self, make_proxy, fake):
        proxy = make_proxy(tls=tls_config(), limits={"header_timeout": 1.5})
        stallers = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(5)]
        started = time.monotonic()
        assert tls_request(proxy.port)[0] == 200
        assert time.monotonic() - started < 1.0  # well before the stallers' timeout
        stallers[0].settimeout(5)
        assert stallers[0].recv(10) == b""  # dropped after the handshake timeout
        for s in stallers:
            s.close()

    def test_certificate_renewal_is_picked_up_without_restart(self, make_proxy, fake, tmp_path):
        for suffix in ("pem", "key"):
            shutil.copy(cert("server." + suffix), str(tmp_path / ("live." + suffix)))
        proxy = make_proxy(tls=tls_config(certificate_path=str(tmp_path / "live.pem"),
                                          key_path=str(tmp_path / "live.key")))
        assert peer_common_name(proxy.port) == "server"
        for suffix in ("pem", "key"):  # as certbot does: new files renamed into place
            shutil.copy(cert("server2." + suffix), str(tmp_path / ("new." + suffix)))
            os.replace(str(tmp_path / ("new." + suffix)), str(tmp_path / ("live." + suffix)))
        assert peer_common_name(proxy.port) == "server2"

    def test_broken_renewal_keeps_the_old_certificate(self, make_proxy, fake, tmp_path):
        for suffix in ("pem", "key"):
            shutil.copy(cert("server." + suffix), str(tmp_path / ("live." + suffix)))
        proxy = make_proxy(tls=tls_config(certificate_path=str(tmp_path / "live.pem"),
                                          key_path=str(tmp_path / "live.key")))
        (tmp_path / "live.pem").write_text("not a certificate")
        assert peer_common_name(proxy.port) == "server"

    @pytest.mark.parametrize("tls, needle", [
        (tls_config(certificate_path="/nonexistent/cert.pem"), "does not exist"),
        (tls_config(certificate_path=os.path.dirname(cert("ca.pem"))), "is a directory; name the PEM file"),
        (tls_config(key_path=cert("server-encrypted.key")), "the private key is encrypted"),
        (tls_config(key_path=cert("other.key")), "key does not belong to the certificate"),
        (tls_config(certificate_path=cert("README.md")), "cannot use the certificate and key"),
        ({"enabled": True, "key_path": cert("server.key")}, "certificate_path or as inline"),
        (tls_config(min_version="1.1"), "older TLS is unsafe"),
        (tls_config(acme={"domain": ["x"]}), "tls.acme: not supported"),
        (tls_config(reality={"enabled": True}), "tls.reality: not supported"),
    ])
    def test_bad_certificates_stop_ocm_at_start(self, fake, auth_path, tls, needle):
        with pytest.raises(ocm.ConfigError) as info:
            ocm.OCMServer(ocm.config_from_dict({"listen_port": 0, "credential_path": str(auth_path), "tls": tls}))
        assert needle in str(info.value)

    def test_bad_certificate_exits_2(self, tmp_path, auth_path):
        config = tmp_path / "c.json"
        config.write_text(json.dumps({"listen_port": 0, "credential_path": str(auth_path),
                                      "tls": tls_config(key_path=cert("other.key"))}))
        out = subprocess.run([sys.executable, OCM_PY, str(config)], capture_output=True, text=True, timeout=20)
        assert out.returncode == 2 and "key does not belong" in out.stderr

    def test_an_encrypted_key_is_refused_without_asking_for_a_pass_phrase(self, tmp_path, auth_path):
        config = tmp_path / "c.json"
        config.write_text(json.dumps({"listen_port": 0, "credential_path": str(auth_path),
                                      "tls": tls_config(key_path=cert("server-encrypted.key"))}))
        for extra in ([], ["--check"]):
            out = subprocess.run([sys.executable, OCM_PY] + extra + [str(config)], capture_output=True, text=True,
                                 timeout=20, stdin=subprocess.DEVNULL)
            assert out.returncode == 2 and "the private key is encrypted" in out.stderr
            assert "pass phrase:" not in out.stdout + out.stderr.replace("its pass phrase", "")

    def test_websocket_over_tls(self, make_proxy, fake):
        WSUpstream(fake)
        proxy = make_proxy(tls=tls_config())
        raw = socket.create_connection(("127.0.0.1", proxy.port))
        tls = client_context().wrap_socket(raw, server_hostname="localhost")
        key = base64.b64encode(os.urandom(16)).decode()
        tls.sendall(("GET /v1/responses HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: %s\r\n"
                     "Authorization: Bearer tok-alice\r\n\r\n" % key).encode())
        assert tls.recv(4096).startswith(b"HTTP/1.1 101")
        tls.close()


# == TestListen ================================================================

def has_ipv6():
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


class TestListen:
    def test_ipv4(self, make_proxy, fake):
        proxy = make_proxy(listen="127.0.0.1")
        assert proxy.request("GET", "/v1/models")[0] == 200

    def test_host_name(self, make_proxy, fake):
        proxy = make_proxy(listen="localhost")
        family = proxy.server.address_family
        host = "127.0.0.1" if family == socket.AF_INET else "::1"
        conn = http.client.HTTPConnection(host, proxy.port, timeout=5)
        conn.request("GET", "/v1/models", headers={"Authorization": "Bearer tok-alice"})
        assert conn.getresponse().status == 200

    @pytest.mark.skipif(not has_ipv6(), reason="this machine has no IPv6")
    def test_ipv6_loopback(self, make_proxy, fake):
        proxy = make_proxy(listen="::1")
        assert proxy.server.url.startswith("http://[::1]:")
        conn = http.client.HTTPConnection("::1", proxy.port, timeout=5)
        conn.request("GET", "/v1/models", headers={"Authorization": "Bearer tok-alice"})
        assert conn.getresponse().status == 200

    @pytest.mark.skipif(not has_ipv6(), reason="this machine has no IPv6")
    def test_ipv6_any_is_dual_stack_where_allowed(self, make_proxy, fake):
        proxy = make_proxy(listen="::")
        for host in ("::1", "127.0.0.1"):
            conn = http.client.HTTPConnection(host, proxy.port, timeout=5)
            try:
                conn.request("GET", "/v1/models", headers={"Authorization": "Bearer tok-alice"})
                assert conn.getresponse().status == 200
            except OSError:
                if host == "127.0.0.1" and proxy.server.socket.getsockopt(
                        socket.IPPROTO_IPV6, socket.IPV6_V6ONLY):
                    pytest.skip("the OS keeps IPv6 sockets v6-only")
                raise

    def test_unresolvable_listen_name_is_a_config_error(self, fake, auth_path):
        with pytest.raises(ocm.ConfigError, match="cannot resolve"):
            ocm.OCMServer(ocm.config_from_dict({"listen": "no-such-host.invalid", "listen_port": 0,
                                                "credential_path": str(auth_path)}))


# == The real Codex CLI over TLS ===============================================

@needs_codex
class TestRealCodexTLS:
    def test_codex_reaches_ocm_over_tls_with_a_private_ca(self, make_proxy, fake, tmp_path, monkeypatch):
        proxy = make_proxy(tls=tls_config())
        fake.on("POST", "/backend-api/codex/responses",
                lambda ex: ex.stream(sse(message_event("hello over TLS"), completed_event())))
        monkeypatch.setenv("SSL_CERT_FILE", CA)
        monkeypatch.setenv("CODEX_CA_CERTIFICATE", CA)
        home = tmp_path / "codex-home"
        home.mkdir()
        (home / "config.toml").write_text(
            'model = "gpt-5.3-codex"\nmodel_provider = "ocm"\n\n[model_providers.ocm]\nname = "OCM"\n'
            'base_url = "https://localhost:%d/v1"\nwire_api = "responses"\nenv_key = "OCM_TOKEN"\n' % proxy.port)
        work = tmp_path / "work"
        work.mkdir()
        import test_ocm
        out = subprocess.run([test_ocm.CODEX_BIN, "exec", "--skip-git-repo-check",
                              "--dangerously-bypass-approvals-and-sandbox", "say hi"],
                             env=dict(os.environ, CODEX_HOME=str(home), OCM_TOKEN="tok-alice"),
                             cwd=str(work), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "hello over TLS" in out.stdout
