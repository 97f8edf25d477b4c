"""Shared fixtures for the suites split out of test_ocm.py, which stays the
entry point and keeps the fake upstream and the core fixtures."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from test_ocm import auth_path, fake, make_proxy, proxy  # noqa: E402,F401  (pytest fixtures)


# == No leaks: after the whole suite, no extra threads or sockets ==============

import threading  # noqa: E402
import time  # noqa: E402

_baseline = {}


def _open_sockets():
    """Socket descriptors of this process (Linux; None elsewhere)."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return None
    count = 0
    for name in names:
        try:
            count += os.readlink("/proc/self/fd/" + name).startswith("socket:")
        except OSError:
            pass
    return count


def pytest_sessionstart(session):
    _baseline["threads"] = threading.active_count()
    _baseline["sockets"] = _open_sockets()


def pytest_sessionfinish(session, exitstatus):
    """Every server, proxy and stream a test started must be gone: the suite
    itself is a long-running OCM user, and leaks would show here."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        threads, sockets = threading.active_count(), _open_sockets()
        if threads <= _baseline["threads"] and (sockets is None or sockets <= _baseline["sockets"]):
            return
        time.sleep(0.1)
    names = sorted(t.name for t in threading.enumerate())
    message = ("leak after the suite: %d threads (%d at start: %s), %s sockets (%s at start)"
               % (threads, _baseline["threads"], ", ".join(names), sockets, _baseline["sockets"]))
    session.config.pluginmanager.get_plugin("terminalreporter").write_line(message, red=True)
    session.exitstatus = 1
