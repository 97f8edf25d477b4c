"""A newcomer's first hour (issue 16): the demo and its fake backend, the
README's commands as written, messages that say what to fix, live usage
figures, and documentation whose every link resolves."""

import glob
import http.client
import json
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import ocm
from test_ocm import (CODEX_BIN, OCM_PY, USERS, error_of, free_port, needs_codex, new_access_token,
                      wait_for, write_auth)
from test_login import FakeIssuer, Keyboard, Session  # tests/ is on the path, as for conftest

ROOT = os.path.dirname(OCM_PY)
README = os.path.join(ROOT, "README.md")
sys.path.insert(0, os.path.join(ROOT, "contrib"))
import demo_backend  # noqa: E402

TOOL_ANSWER = "the tool printed demo-tool-says-42"


def post_json(url, token, body, path="/responses"):
    """POST body to url + path: (status, text)."""
    parts = url.split("://", 1)[1].split("/", 1)
    host, port = parts[0].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("POST", "/" + parts[1] + path if len(parts) > 1 else path,
                     body=json.dumps(body).encode(),
                     headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def events_of(text):
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


CODEX_LIKE = {"model": "gpt-5.3-codex", "stream": True, "store": False,
              "input": [{"type": "message", "role": "user",
                         "content": [{"type": "input_text", "text": "hi"}]}]}


@pytest.fixture(scope="module")
def backend():
    """One fake backend for the module: it keeps no state a test could trip over."""
    server = demo_backend.DemoBackend()
    yield server
    server.close()


def port_is_closed(port):
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def codex_path_env(tmp_path, **extra):
    """An environment whose PATH finds the real Codex as `codex`, as a user's shell would."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if not (bin_dir / "codex").exists():
        os.symlink(CODEX_BIN, str(bin_dir / "codex"))
    return dict(os.environ, PATH=str(bin_dir) + os.pathsep + os.environ.get("PATH", ""), **extra)


def run_in_shell(script, env, cwd):
    return subprocess.run(["sh", "-c", script], env=env, cwd=str(cwd), capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


# == The fake backend behaves like ChatGPT's =================================

class TestDemoBackend:
    @pytest.mark.parametrize("change, detail", [
        ({"stream": False}, "Stream must be set to true"),
        ({"stream": None}, "Stream must be set to true"),
        ({"store": True}, "Store must be set to false"),
        ({"store": None}, "Store must be set to false"),
        ({"max_output_tokens": 100}, "Unsupported parameter: max_output_tokens"),
        ({"metadata": {"a": "b"}}, "Unsupported parameter: metadata"),
        ({"user": "alice"}, "Unsupported parameter: user"),
        ({"temperature": 0.2}, "Unsupported parameter: temperature"),
        ({"top_p": 0.9}, "Unsupported parameter: top_p"),
    ])
    def test_it_refuses_what_the_real_backend_refuses(self, backend, change, detail):
        body = {k: v for k, v in dict(CODEX_LIKE, **change).items() if v is not None}
        status, text = post_json(backend.chatgpt_url, new_access_token(), body)
        assert (status, json.loads(text)) == (400, {"detail": detail})

    def test_items_come_in_done_events_and_completed_has_an_empty_output(self, backend):
        status, text = post_json(backend.chatgpt_url, new_access_token(), CODEX_LIKE)
        events = events_of(text)
        assert status == 200 and [e["type"] for e in events][:2] == ["response.created",
                                                                      "response.in_progress"]
        done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
        assert done[0]["type"] == "message" and "came through OCM" in done[0]["content"][0]["text"]
        completed = events[-1]["response"]
        assert events[-1]["type"] == "response.completed" and completed["output"] == []
        assert completed["usage"]["input_tokens"] > 0 and completed["usage"]["output_tokens"] > 0

    def test_canned_model_asks_for_a_tool_call_then_answers_with_its_output(self):
        offered = dict(CODEX_LIKE, tools=[{"type": "function", "name": "exec_command"}])
        call = demo_backend.canned_model(offered)[0]
        assert call["type"] == "function_call" and call["name"] == "exec_command"
        assert json.loads(call["arguments"]) == {"cmd": demo_backend.TOOL_COMMAND}
        code_mode = dict(CODEX_LIKE, input=[{"type": "additional_tools", "tools": []}])
        assert demo_backend.canned_model(code_mode)[0]["type"] == "function_call"
        after = dict(offered, input=offered["input"] + [
            call, {"type": "function_call_output", "call_id": call["call_id"],
                   "output": "Process exited with code 0\nOutput:\ndemo-tool-says-42\n"}])
        assert TOOL_ANSWER in demo_backend.canned_model(after)[0]["content"][0]["text"]

    def test_a_scripted_model_can_answer_with_an_error(self):
        backend = demo_backend.DemoBackend(model=lambda body: (429, {"error": {
            "type": "usage_limit_reached", "message": "limit"}}))
        try:
            status, text = post_json(backend.chatgpt_url, new_access_token(), CODEX_LIKE)
            assert status == 429 and json.loads(text)["error"]["type"] == "usage_limit_reached"
        finally:
            backend.close()

    def test_it_wants_an_unexpired_access_token(self, backend):
        for token in ("", "not-a-jwt", new_access_token(expires_in=-60)):
            assert post_json(backend.chatgpt_url, token, CODEX_LIKE)[0] == 401

    def test_refresh_tokens_rotate_and_usage_has_both_windows(self, backend, tmp_path):
        refresh = demo_backend.write_fake_auth(str(tmp_path / "auth.json"))
        backend.valid_refresh.add(refresh)
        grant = {"client_id": ocm.OAUTH_CLIENT_ID, "grant_type": "refresh_token", "refresh_token": refresh}
        status, text = post_json(backend.url, "", grant, path="/oauth/token")
        assert status == 200 and set(json.loads(text)) == {"id_token", "access_token", "refresh_token"}
        status, text = post_json(backend.url, "", grant, path="/oauth/token")
        assert status == 401 and json.loads(text)["error"]["code"] == "refresh_token_reused"
        conn = http.client.HTTPConnection("127.0.0.1", backend.port, timeout=10)
        conn.request("GET", "/backend-api/wham/usage",
                     headers={"Authorization": "Bearer " + new_access_token()})
        usage = json.loads(conn.getresponse().read())
        conn.close()
        assert usage["rate_limit"]["primary_window"]["limit_window_seconds"] == 5 * 3600
        assert usage["rate_limit"]["secondary_window"]["limit_window_seconds"] == 7 * 86400

    def test_ocm_runs_against_it_refreshing_the_fake_login(self, backend, tmp_path):
        """What the demo does, in process: a login about to expire is refreshed at the
        fake token endpoint, and a request the backend would refuse is made acceptable."""
        auth = str(tmp_path / "box" / "auth.json")
        backend.valid_refresh.add(demo_backend.write_fake_auth(auth, expires_in=120))
        before = json.load(open(auth))["tokens"]["refresh_token"]
        config = demo_backend.demo_config(backend, auth, "tok-alice", str(tmp_path))
        config["users"] = USERS
        server = ocm.OCMServer(ocm.config_from_dict(config))
        from test_ocm import Proxy
        proxy = Proxy(server)
        try:
            status, _, body = proxy.request("POST", "/v1/responses", body=CODEX_LIKE)
            assert status == 200 and b"came through OCM" in body
            assert json.load(open(auth))["tokens"]["refresh_token"] != before  # refreshed, saved
            status, _, body = proxy.request("POST", "/v1/responses", body=dict(CODEX_LIKE, store=True))
            assert status == 200 and b"came through OCM" in body  # OCM sent it unstored (issue 18)
        finally:
            proxy.close()


# == make demo ===============================================================

def read_until(proc, marker, timeout=20.0):
    """stdout of proc up to and including the line with marker."""
    out, deadline = b"", time.monotonic() + timeout
    while marker.encode() not in out:
        left = deadline - time.monotonic()
        assert left > 0 and proc.poll() is None, out.decode()
        ready, _, _ = select.select([proc.stdout], [], [], min(left, 0.1))
        if ready:
            chunk = os.read(proc.stdout.fileno(), 65536)
            assert chunk, out.decode()
            out += chunk
    return out.decode()


@pytest.fixture
def demo(tmp_path):
    """`make demo` as a person runs it: its own process group, so Ctrl-C reaches all of it."""
    command = (["make", "-s", "--no-print-directory", "demo", "PYTHON=" + sys.executable]
               if shutil.which("make") else [sys.executable, "contrib/demo_backend.py", "--demo"])
    errors = open(str(tmp_path / "demo.err"), "wb")
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=errors,
                            stdin=subprocess.DEVNULL, start_new_session=True, bufsize=0)
    try:
        text = read_until(proc, "Ctrl-C stops the demo.")
        yield proc, text
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        proc.stdout.close()
        errors.close()


def demo_parts(text):
    return {"base_url": re.search(r'^base_url = "(.+)"$', text, re.M).group(1),
            "token": re.search(r"OCM_TOKEN=(\S+)", text).group(1),
            "codex": next(line.strip() for line in text.splitlines() if " codex exec " in line),
            "config": re.search(r"python3 ocm.py usage (\S+)", text).group(1)}


class TestDemo:
    def test_the_makefile_runs_the_demo_backend(self):
        makefile = open(os.path.join(ROOT, "Makefile")).read()
        assert re.search(r"^demo:\n\t@\$\(PYTHON\) contrib/demo_backend.py --demo$", makefile, re.M)

    def test_make_demo_serves_a_request_counts_it_and_ctrl_c_stops_everything(self, demo):
        proc, text = demo
        parts = demo_parts(text)
        assert parts["codex"].endswith('codex exec --skip-git-repo-check -c model_provider=ocm '
                                       '"say hi" < /dev/null')
        status, body = post_json(parts["base_url"], parts["token"], CODEX_LIKE)
        assert status == 200 and "came through OCM" in body
        report = subprocess.run([sys.executable, OCM_PY, "usage", "--json", parts["config"]],
                                capture_output=True, text=True, timeout=20)
        assert report.returncode == 0, report.stderr
        assert json.loads(report.stdout)["live"] is True  # the file is not saved yet: live figures
        assert json.loads(report.stdout)["users"]["demo"]["request_count"] == 1
        port = int(parts["base_url"].rsplit(":", 1)[1].split("/")[0])
        dashboard = re.search(r"in a browser on this machine: (\S+)$", text, re.M).group(1)
        assert dashboard == "http://127.0.0.1:%d/ocm/" % port
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/ocm/v1/dashboard")  # on the box itself the owner needs no token
        doc = json.loads(conn.getresponse().read())
        conn.close()
        assert doc["people"][0]["name"] == "demo" and doc["people"][0]["periods"][0]["requests"] == 1
        directory = os.path.dirname(parts["config"])
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal
        proc.wait(10)
        assert "Demo stopped; its files are gone." in read_rest(proc)
        assert not os.path.exists(directory) and port_is_closed(port)

    @needs_codex
    def test_the_printed_codex_command_gets_an_answer_through_ocm(self, demo, tmp_path):
        parts = demo_parts(demo[1])
        work = tmp_path / "not-a-git-repository"
        work.mkdir()
        out = run_in_shell(parts["codex"], codex_path_env(tmp_path), work)
        assert out.returncode == 0, out.stderr[-2000:]
        assert TOOL_ANSWER in out.stdout


def read_rest(proc):
    chunks = []
    while True:
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            return b"".join(chunks).decode()
        chunks.append(chunk)


# == The README's commands, as written =======================================

def readme_section(title):
    text = open(README).read()
    start = text.index("\n## %s\n" % title)
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else len(text)]


def shell_commands(section):
    """The command lines of each ```sh block of a README section, comments dropped."""
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    return [[re.sub(r"\s+#\s.*$", "", line).strip() for line in block.splitlines()
             if line.strip() and not line.lstrip().startswith("#")] for block in blocks]


@pytest.fixture
def quick_start(tmp_path, backend):
    """The Quick start on a box: init, (login), run; with OpenAI replaced by the demo backend."""
    box_commands, client_commands = shell_commands(readme_section("Quick start"))
    init, login, run = box_commands
    box = tmp_path / "box"
    box.mkdir()
    shutil.copy(OCM_PY, str(box / "ocm.py"))  # Install: copy ocm.py onto the box
    env = dict(os.environ, CODEX_HOME=str(tmp_path / "box-codex"))
    backend.valid_refresh.add(demo_backend.write_fake_auth(str(tmp_path / "box-codex" / "auth.json")))
    out = subprocess.run([sys.executable] + shlex.split(init)[1:], cwd=str(box), env=env,
                         capture_output=True, text=True, timeout=30)
    assert init.startswith("python3 ocm.py init ") and out.returncode == 0, out.stderr
    config = json.loads((box / "config.json").read_text())
    # needs OpenAI: the fake login above stands in for it
    assert shlex.split(login) == ["python3", "ocm.py", "login", "config.json"]
    port = free_port()
    config.update(listen="127.0.0.1", listen_port=port,  # loopback for the test; the rest as init wrote it
                  upstream={"chatgpt_url": backend.chatgpt_url, "token_url": backend.token_url})
    (box / "config.json").write_text(json.dumps(config))
    proc = subprocess.Popen([sys.executable] + shlex.split(run)[1:], cwd=str(box), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:%d/v1" % port in line, proc.stderr.read()
        user = re.search(r"--users (\w+)", init).group(1)
        block = out.stdout.split("# %s: add to ~/.codex/config.toml\n" % user, 1)[1].split("# then", 1)[0]
        block = re.sub(r'base_url = "http://[^/]+/v1"', 'base_url = "http://127.0.0.1:%d/v1"' % port, block)
        token = re.search(r"^# then, in the shell: export OCM_TOKEN=(\S+)$", out.stdout, re.M).group(1)
        yield {"port": port, "token": token, "block": block, "client": client_commands}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


class TestReadmeCommands:
    def test_the_quick_start_as_written_serves_a_request(self, quick_start):
        status, body = post_json("http://127.0.0.1:%d/v1" % quick_start["port"], quick_start["token"],
                                 CODEX_LIKE)
        assert status == 200 and "came through OCM" in body

    def test_the_client_commands_agree_everywhere_and_work_outside_a_git_repository(self):
        quick = shell_commands(readme_section("Quick start"))[1]
        client = shell_commands(readme_section("Setting up a Codex client"))[0]
        command = 'codex exec --skip-git-repo-check -c model_provider=ocm "say hi" < /dev/null'
        assert quick[-1] == command and client[-1] == command
        assert quick[0] == "export OCM_TOKEN=ocm-..."

    @needs_codex
    def test_the_quick_start_client_command_with_a_real_codex(self, quick_start, tmp_path):
        home = tmp_path / "client-codex-home"
        home.mkdir()
        (home / "config.toml").write_text(quick_start["block"])  # "paste the block init printed"
        export, codex = quick_start["client"]
        work = tmp_path / "somewhere"  # not a git repository, as a home directory is not
        work.mkdir()
        script = export.replace("ocm-...", quick_start["token"]) + "\n" + codex
        out = run_in_shell(script, codex_path_env(tmp_path, CODEX_HOME=str(home)), work)
        assert out.returncode == 0, out.stderr[-2000:]
        assert TOOL_ANSWER in out.stdout


# == Messages that say what to fix ==========================================

def run_cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, OCM_PY] + list(args), capture_output=True, text=True, timeout=30,
                          cwd=cwd, env=env, stdin=subprocess.DEVNULL)


class TestMessages:
    @pytest.mark.parametrize("data, message", [
        ({"listen_prot": 8080}, "listen_prot: unknown key; did you mean listen_port?"),
        ({"limits": {"max_conections": 3}},
         "limits.max_conections: unknown key; did you mean max_connections?"),
        ({"tls": {"enabeld": True}}, "tls.enabeld: unknown key; did you mean enabled?"),
        ({"users": [{"name": "a", "tokn": "a-long-enough-token"}]},
         "users[0].tokn: unknown key; did you mean token?"),
        ({"credentials": [{"tag": "a", "credential_pth": "/x"}]},
         "credentials[0].credential_pth: unknown key; did you mean credential_path?"),
    ])
    def test_an_unknown_key_suggests_the_nearest_known_one(self, data, message):
        with pytest.raises(ocm.ConfigError) as caught:
            ocm.config_from_dict(data)
        assert str(caught.value) == message

    def test_an_unknown_key_like_no_known_one_gets_no_guess(self):
        with pytest.raises(ocm.ConfigError) as caught:
            ocm.config_from_dict({"frobnicate": 1})
        assert str(caught.value) == "frobnicate: unknown key"

    @pytest.mark.parametrize("text, where, cause", [
        # Python 3.13 points at a trailing comma itself, older ones at what follows it
        ('{\n  "listen_port": 8080,\n}\n', ("line 3, column 1", "line 2, column 22"),
         "JSON allows no comma after the last item"),
        ('{"users": [{"name": "a", "token": "t"},]}', ("line 1, column 40", "line 1, column 39"),
         "JSON allows no comma after the last item"),
        ('{\n  // the port\n  "listen_port": 8080\n}', ("line 2, column 3",), "JSON allows no comments"),
        ('{"listen_port": 8080 /* LAN */}', ("line 1, column 22",), "JSON allows no comments"),
        ('# OCM\n{}', ("line 1, column 1",), "JSON allows no comments"),
        ('{"listen_port" 8080}', ("line 1, column 16",), None),
    ])
    def test_invalid_json_gives_line_column_and_the_cause(self, tmp_path, text, where, cause):
        path = tmp_path / "config.json"
        path.write_text(text)
        with pytest.raises(ocm.ConfigError) as caught:
            ocm.load_config(str(path))
        message = str(caught.value)
        assert any(message.startswith("%s: not valid JSON at %s: " % (path, at)) for at in where), message
        assert (cause in message) if cause else ("allows no" not in message)

    def test_invalid_json_on_the_command_line(self, tmp_path):
        (tmp_path / "config.json").write_text('{"listen_port": 8080,}')
        out = run_cli("--check", "config.json", cwd=str(tmp_path))
        assert out.returncode == 2
        assert out.stderr.startswith("ocm: config error: config.json: not valid JSON at line 1, column 2")
        assert "(JSON allows no comma after the last item; remove it)" in out.stderr

    def test_an_unknown_command_suggests_the_nearest(self, tmp_path, monkeypatch, capsys):
        monkeypatch.chdir(tmp_path)
        assert ocm.main(["lgoin"]) == 2
        assert capsys.readouterr().err == "ocm: lgoin: no such command or config file; did you mean login?\n"
        assert ocm.main(["frobnicate"]) == 2
        assert "commands: init, login, logout, status, usage, hash-token" in capsys.readouterr().err

    def test_a_file_named_like_a_command_is_still_a_config(self, tmp_path, auth_path):
        (tmp_path / "lgoin").write_text(json.dumps({"credential_path": str(auth_path)}))
        out = run_cli("--check", "lgoin", cwd=str(tmp_path))
        assert out.returncode == 0, out.stderr
        assert "config:      lgoin" in out.stdout and "did you mean" not in out.stderr

    def test_a_sing_box_file_without_services_says_so(self, tmp_path):
        sing_box = {"log": {"level": "info"}, "inbounds": [{"type": "mixed", "listen_port": 2080}],
                    "outbounds": [{"type": "direct"}], "route": {"final": "direct"}}
        with pytest.raises(ocm.ConfigError) as caught:
            ocm.config_from_dict(sing_box)
        assert str(caught.value) == ('services: no service of type "ocm" in this sing-box config '
                                     "(it has no services list)")
        with pytest.raises(ocm.ConfigError, match="log: unknown key"):  # OCM's own keys beside it: a typo
            ocm.config_from_dict({"log": {}, "listen_port": 8080})

    def test_running_as_root_is_worth_a_warning_that_says_what_to_do(self):
        assert ocm.root_warning(1000) == "" and ocm.root_warning(None) == ""
        warning = ocm.root_warning(0)
        assert warning.startswith("running as root, which OCM does not need")
        assert "contrib/ocm.service" in warning and "User=ocm" in warning

    @pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs to run as root")
    def test_running_as_root_warns_once_not_at_each_reload(self, tmp_path, auth_path):
        config = tmp_path / "config.json"
        config.write_text(json.dumps({"listen_port": 0, "credential_path": str(auth_path)}))
        proc = subprocess.Popen([sys.executable, OCM_PY, str(config)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        seen = []
        try:
            assert "listening on" in proc.stdout.readline()
            proc.send_signal(signal.SIGHUP)
            while not any("config reloaded" in line for line in seen):
                seen.append(proc.stderr.readline())
                assert seen[-1], "".join(seen)
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0
        assert ("".join(seen) + err).count("running as root") == 1

    def test_login_refusing_to_replace_names_the_same_config(self, tmp_path, fake, auth_path, capsys):
        session = Session(tmp_path, fake, auth_path)
        assert session.login(stdin=Keyboard(tty=False)) == 1  # no terminal to ask on
        err = capsys.readouterr().err
        assert "run `python3 ocm.py login --force %s` to replace it" % session.config in err

    def test_login_force_hint_keeps_the_account_and_quotes_the_path(self, tmp_path, fake, capsys):
        (tmp_path / "anna").mkdir()
        write_auth(tmp_path / "anna" / "auth.json")
        config = tmp_path / "my config.json"
        config.write_text(json.dumps({
            "credentials": [{"tag": "anna", "credential_path": str(tmp_path / "anna" / "auth.json")},
                            {"tag": "ben", "credential_path": str(tmp_path / "ben.json")}],
            "users": [{"name": "u", "token": "a-long-enough-token", "credential": "anna"}]}))
        assert ocm.run_login([str(config), "--account", "anna"], stdin=None) == 1
        assert ("run `python3 ocm.py login --force --account anna '%s'` to replace it" % config
                in capsys.readouterr().err)

    def test_no_codex_entitlement_at_the_device_code_is_said_in_plain_words(self, tmp_path, fake, capsys):
        issuer = FakeIssuer(fake)
        issuer.poll_answer = (403, {"error": {"code": "missing_codex_entitlement", "message": "no"}})
        session = Session(tmp_path, fake, tmp_path / "new" / "auth.json")
        assert session.login() == 1
        assert len(issuer.polls) == 1  # not taken for "not entered yet" until the code expires
        assert ("ocm: sign-in failed: device-code sign-in failed: 403 Codex is not enabled for this "
                "workspace. Ask its admin to enable Codex, or sign in to another workspace or account."
                in capsys.readouterr().err)

    def test_no_codex_entitlement_at_the_code_exchange_is_said_in_plain_words(self, tmp_path, fake, capsys):
        issuer = FakeIssuer(fake)
        issuer.pending = []
        issuer.token_answer = (403, {"error": "missing_codex_entitlement"})
        session = Session(tmp_path, fake, tmp_path / "new" / "auth.json")
        assert session.login() == 1
        assert ("ocm: sign-in failed: the token exchange failed: 403 Codex is not enabled for this "
                "workspace." in capsys.readouterr().err)

    def test_no_codex_entitlement_at_a_refresh_is_said_in_plain_words(self, make_proxy, fake, auth_path):
        write_auth(auth_path, expires_in=-60)
        fake.on("POST", "/oauth/token", lambda ex: ex.json(403, {"error": {
            "code": "missing_codex_entitlement", "message": "Workspace has no Codex"}}))
        status, _, body = make_proxy().request("POST", "/v1/responses", body=b"{}")
        kind, message = error_of(body)
        assert status == 503 and kind == "api_error"
        assert message.startswith("credential unavailable: token refresh failed (token endpoint answered "
                                  "403: Codex is not enabled for this workspace. Ask its admin to enable "
                                  "Codex, or sign in to another workspace or account.); retrying in ")
        assert "missing_codex_entitlement" not in message  # the words, not the code

    def test_init_without_a_login_says_so_once(self, tmp_path):
        out = run_cli("init", "--users", "a", "--out", "c.json", "--host", "box", cwd=str(tmp_path),
                      env=dict(os.environ, CODEX_HOME=str(tmp_path / "codex")))
        assert out.returncode == 0
        assert out.stderr == ("ocm: no login yet in %s; sign in first: python3 ocm.py login c.json\n"
                              % (tmp_path / "codex" / "auth.json"))
        assert "auth.json" not in out.stdout and "sign in" not in out.stdout

    def test_check_without_a_login_says_so_once(self, tmp_path):
        (tmp_path / "c.json").write_text(json.dumps({"credential_path": str(tmp_path / "none.json")}))
        out = run_cli("--check", "c.json", cwd=str(tmp_path))
        assert out.returncode == 2
        lines = [line for line in (out.stdout + out.stderr).splitlines() if "not found" in line]
        assert lines == ["ocm: credential unavailable: %s not found; sign in with `codex login` or "
                         "`python3 ocm.py login`" % (tmp_path / "none.json")]
        assert all(line.startswith("ocm: ") for line in out.stderr.splitlines())

    def test_health_probes_are_logged_only_at_debug_level(self, proxy, caplog):
        import logging
        with caplog.at_level(logging.INFO, logger="ocm.access"):
            assert proxy.request("GET", "/healthz", token=None)[0] == 200
            assert proxy.request("GET", "/v1/models")[0] == 200
            assert wait_for(lambda: any("/v1/models" in r.getMessage() for r in caplog.records))
        assert not any("/healthz" in r.getMessage() for r in caplog.records)
        with caplog.at_level(logging.DEBUG, logger="ocm.access"):
            assert proxy.request("GET", "/healthz", token=None)[0] == 200
            assert wait_for(lambda: any("/healthz" in r.getMessage() for r in caplog.records))


# == ocm.py usage tells the truth about time ================================

def book_json(last_updated):
    counts = {"request_count": 2, "input_tokens": 100, "output_tokens": 20, "cached_tokens": 0,
              "cost_usd": 0.01}
    return {"last_updated": last_updated, "costs": {"total_usd": 0.01},
            "combinations": [{"model": "gpt-5.3-codex", "service_tier": "default",
                              "context_window": 272000, "total": counts, "by_user": {"alice": counts}}]}


class TestUsage:
    def test_the_usage_document_has_the_books_and_budgets(self, make_proxy, fake, tmp_path):
        users = [dict(USERS[0], budgets=[{"period": "day", "usd": 2}]), USERS[1]]
        proxy = make_proxy(usages_path=str(tmp_path / "usage.json"), users=users,
                           budgets_path=str(tmp_path / "budgets.json"))
        assert proxy.request("POST", "/v1/responses", body=b"{}")[0] == 200
        status, headers, body = proxy.request("GET", "/ocm/v1/usage", token=None)
        document = json.loads(body)
        assert status == 200 and headers["content-type"] == "application/json"
        assert set(document) == {"time", "accounts", "budgets"}
        [account] = document["accounts"]
        assert account["account"] == "default" and account["usages_path"] == str(tmp_path / "usage.json")
        assert account["usage"]["combinations"][0]["by_user"]["alice"]["request_count"] == 1
        assert document["budgets"][0]["user"] == "alice" and document["budgets"][0]["limit"] == "$2.00"
        assert not (tmp_path / "usage.json").exists()  # live: the saver has not written the file yet

    @pytest.mark.parametrize("path", ["/ocm/v1/usage", "/metrics"])
    def test_the_figures_are_for_the_box_itself_only(self, proxy, path):
        # a web page whose own name resolves to 127.0.0.1 (DNS rebinding), and a
        # reverse proxy on the box passing a visitor on, are not the box
        for headers in ({"Host": "rebind.attacker.example:%d" % proxy.port},
                        {"Host": "127.0.0.1", "X-Forwarded-For": "192.0.2.7"}):
            status, _, body = proxy.request("GET", path, headers=headers, token=None)
            assert status == 403 and "the box itself" in json.loads(body)["error"]["message"]
        for host in ("127.0.0.1:%d" % proxy.port, "localhost", "[::1]:80"):
            assert proxy.request("GET", path, headers={"Host": host}, token=None)[0] == 200
        assert ocm.is_loopback("::ffff:127.0.0.1") and ocm.is_loopback("::1")
        assert not ocm.is_loopback("::ffff:192.0.2.7") and not ocm.is_loopback("nonsense")

    def test_usage_asks_the_running_ocm_for_live_figures(self, tmp_path, backend):
        auth = str(tmp_path / "auth.json")
        backend.valid_refresh.add(demo_backend.write_fake_auth(auth))
        config = demo_backend.demo_config(backend, auth, USERS[0]["token"], str(tmp_path), free_port())
        config["users"] = USERS
        (tmp_path / "config.json").write_text(json.dumps(config))
        proc = subprocess.Popen([sys.executable, OCM_PY, str(tmp_path / "config.json")],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            assert "listening on" in proc.stdout.readline()
            url = "http://127.0.0.1:%d/v1" % config["listen_port"]
            assert post_json(url, "tok-alice", CODEX_LIKE)[0] == 200
            out = run_cli("usage", str(tmp_path / "config.json"))
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0
        assert out.returncode == 0, out.stderr
        assert re.search(r"^OCM usage from %s \(live, from the running OCM at \d\d:\d\d:\d\d\)$"
                         % re.escape(str(tmp_path / "usage.json")), out.stdout, re.M), out.stdout
        assert re.search(r"^alice +1 ", out.stdout, re.M)
        # stopped: the file it saved, and how old its figures are
        out = run_cli("usage", str(tmp_path / "config.json"))
        assert re.search(r"\(as of \d\d:\d\d:\d\d, \d+s ago\)", out.stdout) and "live" not in out.stdout

    def test_a_file_says_how_old_its_figures_are(self, tmp_path, capsys):
        now = time.mktime((2026, 12, 4, 12, 3, 45, 0, 0, -1))
        (tmp_path / "usage.json").write_text(json.dumps(book_json(ocm.format_rfc3339(now - 41))))
        assert ocm.run_usage([str(tmp_path / "usage.json")], now=lambda: now) == 0
        heading = "OCM usage from %s (as of 12:03:04, 41s ago)" % (tmp_path / "usage.json")
        assert heading in capsys.readouterr().out
        (tmp_path / "usage.json").write_text(json.dumps(book_json(ocm.format_rfc3339(now - 86400 - 300))))
        assert ocm.run_usage([str(tmp_path / "usage.json")], now=lambda: now) == 0
        assert "(as of 2026-12-03 11:58:45, 1d 0h ago)" in capsys.readouterr().out

    def test_a_config_whose_ocm_is_not_running_reads_the_file(self, tmp_path, capsys):
        now = time.time()
        (tmp_path / "usage.json").write_text(json.dumps(book_json(ocm.format_rfc3339(now - 5))))
        (tmp_path / "c.json").write_text(json.dumps({"listen_port": free_port(),
                                                      "usages_path": str(tmp_path / "usage.json")}))
        assert ocm.run_usage(["--json", str(tmp_path / "c.json")], now=lambda: now) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["live"] is False and report["users"]["alice"]["request_count"] == 2

    def test_another_ocm_on_that_port_is_not_taken_for_this_one(self, make_proxy, tmp_path, capsys):
        proxy = make_proxy(usages_path=str(tmp_path / "its-own.json"))
        (tmp_path / "usage.json").write_text(json.dumps(book_json(ocm.format_rfc3339(time.time()))))
        (tmp_path / "c.json").write_text(json.dumps({"listen_port": proxy.port,
                                                      "usages_path": str(tmp_path / "usage.json")}))
        assert ocm.run_usage(["--json", str(tmp_path / "c.json")]) == 0
        assert json.loads(capsys.readouterr().out)["live"] is False


# == The documentation =======================================================

DOCS = [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))) + [
    os.path.join(ROOT, "contrib", "README.md"), os.path.join(ROOT, "bench", "README.md")]


def without_code(text):
    """The text outside fenced code blocks and inline code spans."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.M | re.S)
    return re.sub(r"(`+)(?:(?!\1).)+?\1", "", text)


def github_anchors(path):
    """The #fragments GitHub makes for a Markdown file's headings."""
    anchors, seen = set(), {}
    for line in without_code(open(path, encoding="utf-8").read().replace("`", "")).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
            anchors.add(slug if slug not in seen else "%s-%d" % (slug, seen[slug]))
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def links(path):
    text = without_code(open(path, encoding="utf-8").read())
    return re.findall(r"\]\(([^)\s]+)\)", text)


class TestDocs:
    def test_the_slugs_are_github_s(self):
        docs = os.path.join(ROOT, "docs")
        assert "a-proxy-to-reach-openai-detour" in github_anchors(os.path.join(docs, "proxies.md"))
        assert "hash-token-and-usage" in github_anchors(os.path.join(docs, "troubleshooting.md"))

    @pytest.mark.parametrize("path", DOCS, ids=lambda p: os.path.relpath(p, ROOT))
    def test_every_link_and_anchor_resolves(self, path):
        broken = []
        for target in links(path):
            if re.match(r"^[a-z]+:", target):
                continue  # https:, mailto:
            file_part, _, anchor = target.partition("#")
            resolved = (os.path.normpath(os.path.join(os.path.dirname(path), file_part))
                        if file_part else path)
            if not os.path.exists(resolved):
                broken.append(target)
            elif anchor and (not resolved.endswith(".md") or anchor not in github_anchors(resolved)):
                broken.append(target)
        assert broken == []

    def test_the_readme_is_read_in_ten_minutes_and_leads_to_every_doc(self):
        text = open(README).read()
        assert len(text.splitlines()) < 300
        for doc in glob.glob(os.path.join(ROOT, "docs", "*.md")):
            assert "(docs/%s" % os.path.basename(doc) in text, doc

    def test_the_first_screen_says_how_to_try_it_and_test_it(self):
        first_screen = "\n".join(open(README).read().splitlines()[:30])
        assert "make demo" in first_screen and "make test" in first_screen
        assert ".venv" in first_screen and "pytest" in first_screen and "hypothesis" in first_screen
        assert "python3 ocm.py config.json" in first_screen

    def test_the_codex_end_to_end_tests_say_how_to_run_them(self):
        development = open(os.path.join(ROOT, "docs", "development.md")).read()
        assert "OCM_CODEX_BIN" in open(README).read() and "export OCM_CODEX_BIN=" in development

    def test_the_top_level_holds_only_what_design_allows(self):
        allowed = {"ocm.py", "test_ocm.py", "config.example.json", "Makefile", "README.md", "docs",
                   "tests", "bench", "contrib", ".ci", ".gitignore"}
        tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout
        if not tracked:
            pytest.skip("not a git checkout")
        assert {line.split("/")[0] for line in tracked.splitlines()} <= allowed

    def test_the_performance_figures_carry_no_paths_of_the_machine(self):
        text = open(os.path.join(ROOT, "docs", "performance.md")).read()
        table = text.split("```\n", 2)[1]
        assert "OCM bench:" in table
        assert not re.search(r"(^|[\s(])/(work|home|root|tmp|usr|opt)/", table)
