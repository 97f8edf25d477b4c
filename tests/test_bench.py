"""Smoke test for the benchmark (bench/): it runs and prints every row.

The bench is a measurement, not a test: timing depends on the machine, so
nothing here looks at the figures or at PASS/MISS, only that a tiny run
(``--quick``: few requests, 20 streams, no nginx) completes.
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench", "bench.py")

ROWS = (
    # one keep-alive connection
    "round trip p50 (ms)", "round trip p99 (ms)",
    "added latency p50 (ms)", "added latency p99 (ms)",
    # SSE
    "event delay p50 (ms)", "event delay p99 (ms)", "added delay p99 over direct (ms)",
    # throughput
    "requests/s", "relay CPU (% of one core)", "relay CPU per request (us)",
    "fake upstream CPU (% of one core)", "load clients CPU (% of one core, sum)",
    # many streams (twice: tiny and 64 KB request bodies)
    "completed", "errors", "most open at once", "seconds until all were connected",
    "relay peak RSS (MB)", "relay peak threads",
    # footprint
    "idle RSS after start (MB)", "idle threads", "start to listening, median of 2 (ms)",
    "without a bytecode cache (ms)", "without a bytecode cache: idle RSS (MB)",
    "upstream connections per 100 requests",
)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="the bench reads /proc (Linux)")
class TestBench:
    def test_quick_run_completes_and_prints_every_row(self):
        """One tiny run, with usage accounting on so that switch is kept working too."""
        env = dict(os.environ)
        env.pop("OCM_BENCH_PROFILE", None)
        env.pop("OCM_BENCH_WRAP", None)
        result = subprocess.run([sys.executable, BENCH, "--quick", "--usages"], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        out = result.stdout.decode()
        assert result.returncode == 0, result.stderr.decode()[-3000:]
        assert "%d CPUs" % (os.cpu_count() or 0) in out
        assert "Python %d.%d" % sys.version_info[:2] in out
        assert sys.executable not in out  # the table is pasted into docs: no paths of this machine
        labels = [line.strip() for line in out.splitlines() if line.startswith("  ")]
        for row in ROWS:
            assert any(label.startswith(row + " ") for label in labels), "no row %r in:\n%s" % (row, out)
        assert out.count("concurrent SSE streams") == 2, out  # tiny and 64 KB request bodies
        assert "MISS" in out or "PASS" in out
        recorded = re.search(r"usage accounting on \(--usages\), ([\d,]+) requests recorded", out)
        assert recorded and int(recorded.group(1).replace(",", "")) > 0, out  # the book was kept and saved
