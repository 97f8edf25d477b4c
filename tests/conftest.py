"""Shared fixtures for the suites split out of test_ocm.py, which stays the
entry point and keeps the fake upstream and the core fixtures."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from test_ocm import auth_path, fake, make_proxy, proxy  # noqa: E402,F401  (pytest fixtures)
