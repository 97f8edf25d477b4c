"""Getting started: `ocm.py init`, a sing-box config dropped in unchanged, and
the README's quick start followed by a real Codex client."""

import http.client
import json
import os
import re
import signal
import subprocess
import sys

import pytest

import ocm
from test_ocm import CODEX_BIN, OCM_PY, free_port, needs_codex, read_json, write_auth


def run(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, OCM_PY] + list(args), capture_output=True, text=True, timeout=30,
                          env=env, cwd=cwd)


def printed_tokens(stdout):
    """{user: token} from init's output."""
    users = re.findall(r"^# (\S+): add to ~/.codex/config.toml$", stdout, re.M)
    tokens = re.findall(r"^# then, in the shell: export OCM_TOKEN=(\S+)$", stdout, re.M)
    return dict(zip(users, tokens))


def start(config_path, env=None):
    proc = subprocess.Popen([sys.executable, OCM_PY, str(config_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    assert "listening on" in line, (line, proc.poll() is not None and proc.stderr.read())
    return proc, int(re.search(r":(\d+)/v1", line).group(1))


def post(port, token, body=b"{}"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/v1/responses", body=body, headers={"Authorization": "Bearer " + token})
    resp = conn.getresponse()
    return resp.status, resp.read()


class TestInit:
    def test_init_writes_hashed_tokens_that_work(self, tmp_path, fake, auth_path):
        config_path = tmp_path / "config.json"
        env = dict(os.environ, CODEX_HOME=str(auth_path.parent))
        out = run("init", "--users", "alice,bob", "--out", str(config_path), "--host", "box.lan",
                  "--listen", "127.0.0.1", "--port", "8080", env=env)
        assert out.returncode == 0, out.stderr
        tokens = printed_tokens(out.stdout)
        assert set(tokens) == {"alice", "bob"} and tokens["alice"] != tokens["bob"]
        assert all(len(t) >= 40 for t in tokens.values())
        text = config_path.read_text()
        for token in tokens.values():
            assert token not in text  # only digests are kept
        config = json.loads(text)
        assert [u["token"][:7] for u in config["users"]] == ["sha256:", "sha256:"]
        # the login is found at run time (CODEX_HOME here), as under the service files
        assert "credential_path" not in config and config["usages_path"].endswith("usage.json")
        assert str(auth_path) in out.stdout
        assert oct(os.stat(str(config_path)).st_mode & 0o777) == "0o600"
        assert 'base_url = "http://box.lan:8080/v1"' in out.stdout and "ChatGPT OAuth" in out.stdout
        assert "python3 ocm.py %s" % config_path in out.stdout
        # the printed tokens open the door; nothing else does
        config["listen_port"] = 0
        config["upstream"] = {"chatgpt_url": fake.chatgpt_url, "token_url": fake.token_url}
        config_path.write_text(json.dumps(config))
        proc, port = start(config_path, env=env)
        try:
            assert post(port, tokens["alice"])[0] == 200 and post(port, tokens["bob"])[0] == 200
            assert post(port, "ocm-guess")[0] == 401
            assert post(port, config["users"][0]["token"])[0] == 401  # the digest is no token
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0

    def test_init_never_overwrites_without_force(self, tmp_path):
        config_path = tmp_path / "config.json"
        config_path.write_text('{"mine": true}')
        out = run("init", "--out", str(config_path))
        assert out.returncode == 1 and "already exists" in out.stderr
        assert config_path.read_text() == '{"mine": true}'
        out = run("init", "--out", str(config_path), "--force", "--users", "carol")
        assert out.returncode == 0 and json.loads(config_path.read_text())["users"][0]["name"] == "carol"

    def test_init_without_a_login_says_how_to_sign_in(self, tmp_path):
        config_path = tmp_path / "config.json"
        out = run("init", "--out", str(config_path), env=dict(os.environ, CODEX_HOME=str(tmp_path / "none")))
        assert out.returncode == 0
        assert "sign in first: python3 ocm.py login %s" % config_path in out.stderr
        assert ocm.load_config(str(config_path)).users  # a valid config all the same

    @pytest.mark.parametrize("args, needle", [(["--users", "a,a"], "distinct names"),
                                              (["--users", "a b"], "distinct names"),
                                              (["--port", "70000"], "--port")])
    def test_init_refuses_bad_arguments(self, tmp_path, args, needle):
        out = run("init", "--out", str(tmp_path / "c.json"), *args)
        assert out.returncode == 2 and needle in out.stderr and not (tmp_path / "c.json").exists()


SING_BOX_CONFIG = {
    "log": {"level": "info", "timestamp": True},
    "dns": {"servers": [{"tag": "local", "address": "local"}]},
    "inbounds": [{"type": "mixed", "tag": "mixed-in", "listen": "127.0.0.1", "listen_port": 2080}],
    "outbounds": [{"type": "direct", "tag": "direct"}, {"type": "socks", "tag": "proxy-out",
                                                        "server": "10.0.0.2", "server_port": 1080}],
    "route": {"final": "direct"},
    "services": [{
        "type": "ocm",
        "tag": "ocm-service",
        "listen": "127.0.0.1",
        "listen_port": 0,
        "tcp_fast_open": True,
        "tcp_multi_path": False,
        "udp_fragment": False,
        "sniff": False,
        "detour": "proxy-out",
        "users": [{"name": "alice", "token": "sing-box-token-alice"}],
        "headers": {"X-Team": "home"},
    }],
}


class TestSingBoxDropIn:
    def test_a_sing_box_config_runs_unchanged_with_warnings(self, tmp_path, fake, auth_path):
        usage_path = tmp_path / "usage.json"
        usage_path.write_text(json.dumps({  # as sing-box 1.13 wrote it
            "last_updated": "2026-11-20T10:00:00+08:00",
            "costs": {"total_usd": 0.35, "by_user": {"alice": 0.35}},
            "combinations": [{"model": "gpt-5.4", "total": {
                "request_count": 2, "input_tokens": 140000, "output_tokens": 0, "cached_tokens": 0, "cost_usd": 0.35},
                "by_user": {"alice": {"request_count": 2, "input_tokens": 140000, "output_tokens": 0,
                                      "cached_tokens": 0, "cost_usd": 0.35}}}]}))
        config = json.loads(json.dumps(SING_BOX_CONFIG))
        service = config["services"][0]
        service["credential_path"] = str(auth_path)
        service["usages_path"] = str(usage_path)
        service["upstream"] = {"chatgpt_url": fake.chatgpt_url, "token_url": fake.token_url}  # the only addition: a fake
        path = tmp_path / "sing-box.json"
        path.write_text(json.dumps(config))
        from test_ocm import completed_event, sse
        fake.on("POST", "/backend-api/codex/responses",
                lambda ex: ex.stream(sse(completed_event("r", "gpt-5.4", 70000, 0, 0))))
        proc, port = start(path)
        try:
            status, body = post(port, "sing-box-token-alice", json.dumps({"model": "gpt-5.4"}).encode())
            assert status == 200
            assert fake.api_requests()[0].header("X-Team") == "home"
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0
        for key in ("tcp_fast_open", "tcp_multi_path", "udp_fragment", "sniff"):
            assert "services[0].%s is a sing-box option OCM does not use" % key in err
        assert "'proxy-out' is a sing-box outbound tag" in err
        assert "services[0].type" not in err and "services[0].tag" not in err  # a service's own name is normal
        data = read_json(usage_path)  # sing-box's file, carried on in the same combination
        combo = data["combinations"][0]
        assert len(data["combinations"]) == 1 and combo["model"] == "gpt-5.4"
        assert combo["total"]["request_count"] == 3 and combo["by_user"]["alice"]["input_tokens"] == 210000
        assert data["costs"]["by_user"]["alice"] == 0.53  # 210,000 x $2.50 / 1M, rounded to cents

    def test_outbound_tags_stay_an_error_in_a_plain_ocm_config(self):
        with pytest.raises(ocm.ConfigError, match="not a proxy URL"):
            ocm.config_from_dict({"detour": "proxy-out"})

    def test_check_reads_a_sing_box_config(self, tmp_path, auth_path):
        config = json.loads(json.dumps(SING_BOX_CONFIG))
        config["services"][0]["credential_path"] = str(auth_path)
        path = tmp_path / "sing-box.json"
        path.write_text(json.dumps(config))
        out = run("--check", str(path))
        assert out.returncode == 0 and "alice" in out.stdout and "ChatGPT OAuth" in out.stdout


@needs_codex
class TestQuickStart:
    def test_the_readme_quick_start_with_a_real_codex(self, tmp_path, fake, auth_path):
        """init, start, paste the printed block into Codex's config, run Codex."""
        from test_ocm import codex_model
        fake.on("POST", "/backend-api/codex/responses", codex_model)
        port = free_port()
        config_path = tmp_path / "config.json"
        env = dict(os.environ, CODEX_HOME=str(auth_path.parent))
        out = run("init", "--users", "alice", "--out", str(config_path), "--host", "127.0.0.1",
                  "--listen", "127.0.0.1", "--port", str(port), env=env)
        assert out.returncode == 0, out.stderr
        config = json.loads(config_path.read_text())
        config["upstream"] = {"chatgpt_url": fake.chatgpt_url, "token_url": fake.token_url}  # a fake OpenAI
        config_path.write_text(json.dumps(config))
        block = out.stdout.split("# alice: add to ~/.codex/config.toml\n", 1)[1].split("# then", 1)[0]
        token = printed_tokens(out.stdout)["alice"]
        proc, _ = start(config_path, env=env)
        try:
            home = tmp_path / "client-codex-home"
            home.mkdir()
            (home / "config.toml").write_text('model = "gpt-5.3-codex"\nmodel_provider = "ocm"\n\n' + block)
            work = tmp_path / "work"
            work.mkdir()
            result = subprocess.run([CODEX_BIN, "exec", "--skip-git-repo-check",
                                     "--dangerously-bypass-approvals-and-sandbox",
                                     "run the tool and report what it printed"],
                                    env=dict(os.environ, CODEX_HOME=str(home), OCM_TOKEN=token), cwd=str(work),
                                    stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, result.stderr[-2000:]
            assert "the tool printed 42" in result.stdout
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0
