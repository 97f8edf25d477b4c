"""Portability: ocm.py needs nothing but the standard library, and the service
files in contrib/ are valid and run OCM the way the README says
(`python3 ocm.py config.json`)."""

import ast
import importlib.util
import os
import plistlib
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig

import pytest

from test_ocm import write_auth

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OCM_PY = os.path.join(ROOT, "ocm.py")
CONTRIB = os.path.join(ROOT, "contrib")
SYSTEMD_UNIT = os.path.join(CONTRIB, "ocm.service")
OPENWRT_INIT = os.path.join(CONTRIB, "openwrt", "ocm.init")
LAUNCHD_PLIST = os.path.join(CONTRIB, "macos", "com.ocm.relay.plist")


# == Standard library only ======================================================

# Standard library since a later Python than 3.8, so absent before it; ocm.py
# may import them behind a version check (zoneinfo, for named time zones).
ADDED_AFTER_3_8 = {"graphlib": (3, 9), "zoneinfo": (3, 9), "tomllib": (3, 11)}


def imported_modules(source, filename="<source>"):
    """{top-level module name: first line} of every import in `source`: at the
    top, inside functions, under try, and importlib.import_module("x") or
    __import__("x") with a literal name. A relative import is kept as ".x"."""
    found = {}

    def add(name, node):
        found.setdefault(name, node.lineno)

    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name.split(".")[0], node)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                add("." * node.level + (node.module or ""), node)
            else:
                add(node.module.split(".")[0], node)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (isinstance(node.func, ast.Name) and node.func.id == "__import__"
                   or isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")):
            add(node.args[0].value.split(".")[0], node)
    return found


def is_stdlib_by_name(name):
    """Python 3.10+: the interpreter's own list of its standard library."""
    return name in sys.stdlib_module_names


def _is_under(path, directory):
    return os.path.commonpath([path, directory]) == directory


def is_stdlib_by_location(name):
    """Any Python: where the module would be loaded from. Built in, frozen, or a
    file in the standard library's folders, but not in the site-packages or
    dist-packages inside them (pyenv and venvs keep site-packages there)."""
    if name.startswith(".") or not name:
        return False
    if name in sys.builtin_module_names:
        return True
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return name in ADDED_AFTER_3_8 and sys.version_info < ADDED_AFTER_3_8[name]
    if spec.origin in ("built-in", "frozen"):
        return True
    origin = spec.origin or next(iter(spec.submodule_search_locations or []), None)
    if not origin:
        return False  # a namespace package: nothing in the standard library is one
    origin = os.path.realpath(origin)
    parts = origin.split(os.sep)
    if "site-packages" in parts or "dist-packages" in parts:
        return False
    paths = sysconfig.get_paths()
    return any(_is_under(origin, os.path.realpath(paths[key])) for key in ("stdlib", "platstdlib"))


STDLIB_CHECKS = [pytest.param(is_stdlib_by_location, id="by-location")]
if hasattr(sys, "stdlib_module_names"):
    STDLIB_CHECKS.append(pytest.param(is_stdlib_by_name, id="by-name"))


def outside_stdlib(path, is_stdlib):
    """["requests (line 12)", ...]: the imports in the file at `path` that are
    not standard library, by `is_stdlib`."""
    with open(path, encoding="utf-8") as fh:
        modules = imported_modules(fh.read(), path)
    return ["%s (line %d)" % (name, line) for name, line in sorted(modules.items())
            if not is_stdlib(name)]


class TestStandardLibraryOnly:
    @pytest.mark.parametrize("is_stdlib", STDLIB_CHECKS)
    def test_ocm_py_imports_only_the_standard_library(self, is_stdlib):
        bad = outside_stdlib(OCM_PY, is_stdlib)
        assert not bad, ("ocm.py must run on a bare Python 3.8-3.13, but imports "
                         "modules outside the standard library: " + ", ".join(bad))

    def test_ocm_py_imports_are_really_collected(self):
        """Guards the check itself: an empty list would pass anything."""
        with open(OCM_PY, encoding="utf-8") as fh:
            modules = imported_modules(fh.read())
        assert {"socket", "json", "http", "urllib", "ssl", "fcntl", "ctypes"} <= set(modules)

    @pytest.mark.parametrize("is_stdlib", STDLIB_CHECKS)
    def test_a_third_party_import_in_a_copy_of_ocm_py_is_named(self, tmp_path, is_stdlib):
        copy = tmp_path / "ocm.py"
        with open(OCM_PY, encoding="utf-8") as fh:
            source = fh.read()
        lines = source.count("\n")
        copy.write_text(source + "\n\ndef fetch(url):\n    import requests\n    return requests.get(url)\n",
                        encoding="utf-8")
        assert outside_stdlib(str(copy), is_stdlib) == ["requests (line %d)" % (lines + 4)]

    @pytest.mark.parametrize("is_stdlib", STDLIB_CHECKS)
    def test_every_form_of_import_is_checked(self, tmp_path, is_stdlib):
        source = tmp_path / "mod.py"
        source.write_text(
            "import os, json as j\n"
            "from http.server import HTTPServer\n"
            "try:\n"
            "    import yaml.loader as y\n"
            "except ImportError:\n"
            "    y = None\n"
            "class C:\n"
            "    def f(self):\n"
            "        from attr import s\n"
            "        return __import__('msgpack')\n"
            "def g():\n"
            "    import importlib\n"
            "    return importlib.import_module('ujson.x')\n"
            "from . import sibling\n"
            "from ..pkg import other\n", encoding="utf-8")
        assert outside_stdlib(str(source), is_stdlib) == [
            ". (line 14)", "..pkg (line 15)", "attr (line 9)", "msgpack (line 10)",
            "ujson (line 13)", "yaml (line 4)"]

    def test_a_module_installed_in_site_packages_is_not_standard_library(self, tmp_path, monkeypatch):
        """Real resolution, whatever this machine has installed: a package that
        imports fine but lives in a site-packages folder is still third-party."""
        site = tmp_path / "lib" / "site-packages"
        (site / "ocm_fake_dependency").mkdir(parents=True)
        (site / "ocm_fake_dependency" / "__init__.py").write_text("", encoding="utf-8")
        monkeypatch.syspath_prepend(str(site))
        assert importlib.util.find_spec("ocm_fake_dependency") is not None
        assert not is_stdlib_by_location("ocm_fake_dependency")

    @pytest.mark.parametrize("name", ["os", "json", "socket", "select", "sys", "ssl", "ctypes", "fcntl"])
    def test_standard_modules_are_recognised_by_location(self, name):
        assert is_stdlib_by_location(name)

    def test_pytest_itself_is_not_standard_library(self):
        assert not is_stdlib_by_location("pytest")


# == Service files ==============================================================

def parse_unit(text):
    """{section: [(key, value), ...]} of a systemd unit; keys may repeat."""
    sections, current = {}, None
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
        else:
            key, _, value = line.partition("=")
            current.append((key.strip(), value.strip()))
    return sections


def unit_values(unit, section, key):
    return [v for k, v in unit.get(section, []) if k == key]


def unit_value(unit, section, key):
    values = unit_values(unit, section, key)
    assert len(values) == 1, "%s= in [%s]: expected once, found %r" % (key, section, values)
    return values[0]


def read(path):
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def procd_calls(tmp_path):
    """What the OpenWrt script asks of procd: the script is sourced by sh with
    the procd functions replaced by ones that print their arguments, then
    start_service and reload_service run. [(function, [args]), ...]."""
    if not shutil.which("sh"):
        pytest.skip("no sh")
    stubs = (
        'record() { printf "%s" "$1"; shift; for a in "$@"; do printf "\\t%s" "$a"; done; echo; }\n'
        'procd_open_instance() { record open_instance "$@"; }\n'
        'procd_set_param() { record set_param "$@"; }\n'
        'procd_append_param() { record append_param "$@"; }\n'
        'procd_close_instance() { record close_instance "$@"; }\n'
        'procd_send_signal() { record send_signal "$@"; }\n'
        '. "$1"\n'
        'record globals "USE_PROCD=$USE_PROCD" "START=$START"\n'
        'start_service\n'
        'reload_service\n')
    out = subprocess.run(["sh", "-c", stubs, "sh", OPENWRT_INIT], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, universal_newlines=True, timeout=30, cwd=str(tmp_path))
    assert out.returncode == 0 and not out.stderr, out.stderr
    calls = []
    for line in out.stdout.splitlines():
        fields = line.split("\t")
        calls.append((fields[0], fields[1:]))
    return calls


def service_commands(tmp_path):
    """{file: argv} of the command each service file starts."""
    unit = parse_unit(read(SYSTEMD_UNIT))
    with open(LAUNCHD_PLIST, "rb") as fh:
        plist = plistlib.load(fh)
    procd = [args[1:] for name, args in procd_calls(tmp_path)
             if name == "set_param" and args[0] == "command"]
    return {
        "systemd": shlex.split(unit_value(unit, "Service", "ExecStart")),
        "openwrt": procd[0] if len(procd) == 1 else procd,
        "launchd": plist["ProgramArguments"],
    }


def service_codex_homes(tmp_path):
    """{file: CODEX_HOME} each service file sets, so the login's place is fixed."""
    unit = parse_unit(read(SYSTEMD_UNIT))
    env = dict(v.split("=", 1) for v in unit_values(unit, "Service", "Environment"))
    with open(LAUNCHD_PLIST, "rb") as fh:
        plist = plistlib.load(fh)
    procd_env = dict(arg.split("=", 1) for name, args in procd_calls(tmp_path)
                     if name == "set_param" and args[0] == "env" for arg in args[1:])
    return {"systemd": env.get("CODEX_HOME"), "openwrt": procd_env.get("CODEX_HOME"),
            "launchd": plist.get("EnvironmentVariables", {}).get("CODEX_HOME")}


SERVICES = ["systemd", "openwrt", "launchd"]


class TestServiceFiles:
    @pytest.mark.parametrize("service", SERVICES)
    def test_each_service_runs_python3_ocm_py_with_a_config(self, service, tmp_path):
        argv = service_commands(tmp_path)[service]
        assert len(argv) == 3, argv
        python, program, config = argv
        assert os.path.isabs(python) and os.path.basename(python) == "python3", argv
        assert os.path.isabs(program) and os.path.basename(program) == "ocm.py", argv
        assert os.path.isabs(config) and config.endswith(".json"), argv

    @pytest.mark.parametrize("service", SERVICES)
    def test_each_service_finds_the_login_through_codex_home(self, service, tmp_path):
        """Run as the service would, with its CODEX_HOME (moved under tmp_path)
        and a config without credential_path: OCM uses the login there."""
        codex_home = service_codex_homes(tmp_path)[service]
        assert codex_home and os.path.isabs(codex_home), codex_home
        home = tmp_path / codex_home.lstrip("/")
        home.mkdir(parents=True)
        write_auth(home / "auth.json")
        config = tmp_path / "config.json"
        config.write_text('{"listen_port": 0}', encoding="utf-8")
        env = dict(os.environ, CODEX_HOME=str(home))
        out = subprocess.run([sys.executable, OCM_PY, "--check", str(config)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             universal_newlines=True, timeout=60)
        assert out.returncode == 0, out.stdout
        assert re.search(r"^credential:\s+%s$" % re.escape(str(home / "auth.json")), out.stdout, re.M), \
            out.stdout

    # -- systemd --------------------------------------------------------------
    def test_systemd_unit_restarts_on_failure_and_reloads_with_hup(self):
        unit = parse_unit(read(SYSTEMD_UNIT))
        assert unit_value(unit, "Service", "Restart") == "on-failure"
        reload = shlex.split(unit_value(unit, "Service", "ExecReload"))
        assert os.path.basename(reload[0]) == "kill" and reload[1:] == ["-HUP", "$MAINPID"]
        assert unit_value(unit, "Install", "WantedBy") == "multi-user.target"

    def test_systemd_unit_is_hardened_yet_lets_ocm_write_its_files(self):
        unit = parse_unit(read(SYSTEMD_UNIT))

        def value(key):
            return unit_value(unit, "Service", key)
        assert value("User") not in ("", "root")
        for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices",
                    "ProtectKernelTunables", "ProtectKernelModules", "ProtectControlGroups",
                    "LockPersonality", "MemoryDenyWriteExecute"):
            assert value(key) == "yes", key
        assert value("ProtectSystem") == "strict"
        assert value("CapabilityBoundingSet") == ""
        assert value("SystemCallFilter") == "@system-service"
        assert set(value("RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
        # With / read-only and homes hidden, the login must be in a writable place:
        # the state directory (/var/lib/NAME) or a ReadWritePaths= entry.
        writable = ["/var/lib/" + value("StateDirectory")] + \
            " ".join(unit_values(unit, "Service", "ReadWritePaths")).split()
        env = dict(v.split("=", 1) for v in unit_values(unit, "Service", "Environment"))
        assert any(_is_under(env["CODEX_HOME"], w) for w in writable), (env["CODEX_HOME"], writable)

    def test_systemd_unit_passes_systemd_analyze_verify(self, tmp_path):
        problems = systemd_verify(unit_for_this_machine(read(SYSTEMD_UNIT), tmp_path), tmp_path)
        assert not problems, "systemd-analyze verify:\n" + "\n".join(problems)

    @pytest.mark.parametrize("old, new", [
        ("Restart=on-failure", "Restart=sometimes"),               # a bad value
        ("NoNewPrivileges=yes", "NoNewPrivilegez=yes"),            # an unknown key
        ("[Service]", ""),                                         # a lost section
        ("SystemCallFilter=@system-service", "SystemCallFilter=@system-servce"),
    ])
    def test_systemd_analyze_verify_catches_a_broken_unit(self, tmp_path, old, new):
        """The check above would pass anything if verify's warnings were lost:
        systemd-analyze exits 0 on most of these, and only says so."""
        text = read(SYSTEMD_UNIT)
        assert old in text
        problems = systemd_verify(unit_for_this_machine(text.replace(old, new), tmp_path), tmp_path)
        assert problems

    # -- OpenWrt (procd) -------------------------------------------------------
    def test_openwrt_init_script_is_valid_sh(self):
        # OpenWrt's sh is busybox ash; -n with this machine's POSIX sh catches syntax errors.
        problem = sh_syntax_error(OPENWRT_INIT)
        assert not problem, problem

    def test_sh_syntax_check_catches_a_broken_script(self, tmp_path):
        broken = tmp_path / "ocm.init"
        unclosed_if = "procd_close_instance\n\tif true; then\n"
        broken.write_text(read(OPENWRT_INIT).replace("procd_close_instance\n", unclosed_if), encoding="utf-8")
        assert sh_syntax_error(str(broken))

    def test_openwrt_init_script_starts_ocm_under_procd(self, tmp_path):
        text = read(OPENWRT_INIT)
        assert text.startswith("#!/bin/sh /etc/rc.common\n")
        assert re.search(r"^start_service\(\)", text, re.M)
        calls = procd_calls(tmp_path)
        names = [name for name, _ in calls]
        assert ("globals", ["USE_PROCD=1", "START=99"]) in calls
        assert names.index("open_instance") < names.index("close_instance")
        params = {args[0]: args[1:] for name, args in calls if name == "set_param"}
        assert params["command"][1].endswith("/ocm.py")
        assert "respawn" in params
        assert params["stdout"] == ["1"] and params["stderr"] == ["1"]

    def test_openwrt_reload_sends_hup(self, tmp_path):
        signals = [args for name, args in procd_calls(tmp_path) if name == "send_signal"]
        # procd's default signal is SIGHUP; an explicit one must be HUP too.
        assert signals and all(args[0] == "ocm" and args[2:] in ([], ["HUP"], ["1"]) for args in signals), \
            signals

    # -- macOS (launchd) -------------------------------------------------------
    def test_launchd_plist_keeps_ocm_running(self):
        with open(LAUNCHD_PLIST, "rb") as fh:
            plist = plistlib.load(fh)
        assert plist["Label"] == "com.ocm.relay"
        assert plist["ProgramArguments"][-1].endswith("/config.json")
        assert plist["RunAtLoad"] is True
        # Restarted after a crash, not after a clean stop (OCM exits 0 on SIGTERM).
        assert plist["KeepAlive"] == {"SuccessfulExit": False}
        assert plist["StandardOutPath"] and plist["StandardErrorPath"]

    def test_contrib_readme_covers_every_file(self):
        readme = read(os.path.join(CONTRIB, "README.md"))
        for path in (SYSTEMD_UNIT, OPENWRT_INIT, LAUNCHD_PLIST):
            assert os.path.relpath(path, ROOT) in readme, path


def sh_syntax_error(path):
    """`sh -n`'s complaint about the script at `path`, or "" if it parses."""
    if not shutil.which("sh"):
        pytest.skip("no sh")
    out = subprocess.run(["sh", "-n", path], stderr=subprocess.PIPE, universal_newlines=True, timeout=30)
    return out.stderr.strip() or ("exit status %d" % out.returncode if out.returncode else "")


# == systemd-analyze helpers ====================================================

def unit_for_this_machine(text, tmp_path):
    """The unit, runnable here: ExecStart gets this Python and this ocm.py (verify
    insists the program exists), and User=/Group= go (user ocm need not exist
    on a test machine). Everything else is verified as shipped."""
    args = (sys.executable, OCM_PY, str(tmp_path / "config.json"))
    command = " ".join('"%s"' % arg if " " in arg else arg for arg in args)
    lines = []
    for line in text.splitlines():
        if line.startswith("ExecStart="):
            line = "ExecStart=" + command
        elif line.startswith(("User=", "Group=")):
            continue
        lines.append(line)
    return "\n".join(lines) + "\n"


def _run_verify(text, directory):
    path = os.path.join(str(directory), "ocm.service")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", path], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, universal_newlines=True, timeout=120)
    return path, out.returncode, [line for line in out.stdout.splitlines() if line.strip()]


def systemd_verify(text, tmp_path):
    """systemd-analyze verify's complaints about this unit text ([] if none).
    Skips without the tool, or where it cannot verify even a minimal unit.
    Lines about other units (the host's own) are not this unit's problem."""
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    baseline = tmp_path / "baseline"
    baseline.mkdir()
    _, code, lines = _run_verify("[Service]\nExecStart=%s -c pass\n" % sys.executable, baseline)
    if code != 0 or lines:
        pytest.skip("systemd-analyze verify does not work here: %s" % " | ".join(lines))
    unit = tmp_path / "unit"
    unit.mkdir()
    path, code, lines = _run_verify(text, unit)
    problems = [line for line in lines if path in line or "ocm.service" in line]
    if code != 0 and not problems:
        problems = ["exit status %d: %s" % (code, " | ".join(lines))]
    return problems
