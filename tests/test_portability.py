"""Portability: ocm.py needs nothing but the standard library."""

import ast
import importlib.util
import os
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OCM_PY = os.path.join(ROOT, "ocm.py")


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
