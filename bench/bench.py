"""OCM benchmark: ``make bench``, or ``python3 bench/bench.py [--quick] [--no-nginx]``.

Starts a fast fake upstream (bench/upstream.py) and OCM (``python3 ocm.py
config.json``), each in its own process, on loopback; measures the same
workload straight to the upstream ("direct"), through OCM and, if nginx is
installed, through nginx; prints one table with the targets from issue 7.

Timing depends on the machine: this is a measurement, not a test. The smoke
test (tests/test_bench.py) only checks that ``--quick`` completes.

Profiling hooks (see bench/README.md):
  OCM_BENCH_PROFILE=FILE  run OCM under per-thread cProfile (bench/profile_ocm.py),
                          stats written to FILE when OCM stops
  OCM_BENCH_WRAP="CMD"    prefix OCM's command line, e.g. "strace -c -f -o FILE"
  --only PHASES           run only some phases, e.g. --only latency,rps
"""

import argparse
import base64
import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OCM_PY = os.path.join(ROOT, "ocm.py")
sys.path.insert(0, HERE)

from common import (SMALL_BODY, build_request, connect, percentile,  # noqa: E402
                    proc_cpu_seconds, proc_status, raise_fd_limit, read_response, read_stream)

PHASES = ("start", "conns", "latency", "sse", "rps", "streams")


# == Settings ================================================================

class Settings:
    """How much of each workload to run. --quick is for the smoke test."""

    def __init__(self, quick):
        self.quick = quick
        self.latency_rounds = 2 if quick else 10      # rounds alternate direct / OCM / nginx
        self.latency_per_round = 30 if quick else 500
        self.sse_streams = 1 if quick else 4
        self.sse_events = 15 if quick else 250
        self.sse_gap_ms = 2 if quick else 4
        self.rps_conns = 16
        self.rps_procs = 2                            # load client processes
        self.rps_warmup = 0.05 if quick else 1.0
        self.rps_seconds = 0.15 if quick else 5.0
        self.streams = 20 if quick else 1000
        self.stream_events = 3 if quick else 20
        self.stream_gap_ms = 20 if quick else 250
        self.stream_timeout = 30.0 if quick else 120.0
        # Request body sizes for the streams: a tiny one, and one like a Codex
        # turn mid-session (instructions, tools and history are resent each turn).
        self.stream_bodies = (0, 64 * 1024)
        self.start_runs = 2 if quick else 9
        self.settle = 0.1 if quick else 0.5           # seconds after start before reading idle RSS
        self.sequential = 100


# == Processes ===============================================================

def child_setup():
    """preexec_fn: each child gets the raised fd limit and its own process group."""
    raise_fd_limit()
    os.setpgrp()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def wait_listening(port, proc, timeout=10.0):
    """Poll-connect every millisecond until the port accepts a connection."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_listening(port):
            return
        if proc.poll() is not None:
            raise RuntimeError("%s exited with %s before listening" % (proc.args[0], proc.returncode))
        time.sleep(0.001)
    raise RuntimeError("nothing listening on port %d after %g s" % (port, timeout))


def stop(proc, sig=signal.SIGTERM, timeout=5.0):
    """Signal the child's whole process group: under OCM_BENCH_WRAP the child
    is a profiler and OCM its child, and both must go."""
    if proc is None or proc.poll() is not None:
        return

    def send(signum):
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:  # not a group leader after all: the process alone
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)

    send(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait()


def installed_env(bytecode=True):
    """The environment of an installed OCM: this shell's, but with Python's
    bytecode cache on (a sandbox or CI may switch it off; a router does not),
    unless ``bytecode`` is False."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if not bytecode:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def time_to_listen(cmd, port, runs, cwd=None, env=None):
    """Median seconds from spawning ``cmd`` to its port accepting a connection."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, preexec_fn=child_setup, env=env)
        try:
            wait_listening(port, proc)
            times.append(time.perf_counter() - started)
        finally:
            stop(proc, signal.SIGKILL)
    return statistics.median(times)


def idle_rss(cmd, port, cwd=None, env=None, settle=0.5):
    """RSS (MB) of ``cmd`` ``settle`` seconds after it starts listening."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, preexec_fn=child_setup, env=env)
    try:
        wait_listening(port, proc)
        time.sleep(settle)
        return proc_status(proc.pid).get("VmRSS", 0) / 1024.0
    finally:
        stop(proc, signal.SIGKILL)


class Route:
    """One way to reach the upstream: direct, through OCM, through nginx."""

    def __init__(self, name, port, target, token, proc=None):
        self.name = name
        self.port = port
        self.target = target      # path of the responses endpoint on this port
        self.token = token
        self.proc = proc          # the relay's process (None for direct)
        self.host = "127.0.0.1:%d" % port

    def request(self, query=""):
        return build_request(self.target + query, self.host, self.token)


def start_upstream():
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "upstream.py")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, preexec_fn=child_setup)
    line = proc.stdout.readline().decode()
    if not line.startswith("port "):
        raise RuntimeError("fake upstream did not start")
    return proc, int(line.split()[1])


def upstream_stats(port):
    sock = connect(port)
    try:
        sock.sendall(b"GET /stats HTTP/1.1\r\nHost: bench\r\n\r\n")
        return json.loads(read_response(sock, bytearray())[1])
    finally:
        sock.close()


# -- OCM --------------------------------------------------------------------

USER_TOKEN = "bench-user-token-0123456789abcdefghijklmnopqrstuvwxyz"


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def fake_jwt(claims):
    """An unsigned JWT: OCM only reads the claims (exp, account id)."""
    header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return "%s.%s.%s" % (header, b64url(json.dumps(claims).encode()), b64url(b"sig"))


def write_ocm_config(workdir, upstream_port, port, usages=False):
    auth = {"account_id": "acct-bench", "plan": "pro"}
    claims = {"https://api.openai.com/auth": {"chatgpt_account_id": auth["account_id"],
                                              "chatgpt_plan_type": auth["plan"]}}
    tokens = {
        "id_token": fake_jwt(dict(claims, email="bench@example.com")),
        "access_token": fake_jwt(dict(claims, exp=int(time.time()) + 30 * 86400)),
        "refresh_token": "rt_bench", "account_id": auth["account_id"],
    }
    auth_path = os.path.join(workdir, "auth.json")
    with open(auth_path, "w") as fh:
        json.dump({"auth_mode": "chatgpt", "OPENAI_API_KEY": None, "tokens": tokens,
                   "last_refresh": "2026-01-01T00:00:00Z"}, fh)
    os.chmod(auth_path, 0o600)
    upstream = "http://127.0.0.1:%d" % upstream_port
    config = {
        "listen": "127.0.0.1", "listen_port": port, "credential_path": auth_path,
        "users": [{"name": "bench", "token": USER_TOKEN}],
        "upstream": {"chatgpt_url": upstream + "/backend-api/codex", "api_url": upstream,
                     "token_url": upstream + "/oauth/token"},
        # every load-generator connection comes from 127.0.0.1, all at once:
        # here one address may hold every connection, unauthenticated or not
        "limits": {"max_connections_per_address": 1024, "max_unauthenticated_connections": 1024},
    }
    if usages:  # usage accounting on: every answer is scanned and recorded
        config["usages_path"] = os.path.join(workdir, "usages.json")
    path = os.path.join(workdir, "config.json")
    with open(path, "w") as fh:
        json.dump(config, fh, indent=2)
    return path


def ocm_command(config_path):
    """``python3 ocm.py config.json`` for the copy installed in the work
    directory, under the profiling hooks if asked."""
    profile = os.environ.get("OCM_BENCH_PROFILE")
    if profile:
        cmd = [sys.executable, os.path.join(HERE, "profile_ocm.py"), profile, config_path]
    else:
        cmd = [sys.executable, os.path.join(os.path.dirname(config_path), "ocm.py"), config_path]
    return shlex.split(os.environ.get("OCM_BENCH_WRAP", "")) + cmd


def install_ocm(workdir):
    """Copy ocm.py into the work directory, as a user would copy it to a box."""
    shutil.copy(OCM_PY, os.path.join(workdir, "ocm.py"))


def start_ocm(workdir, upstream_port, usages=False):
    port = free_port()
    config_path = write_ocm_config(workdir, upstream_port, port, usages)
    with open(os.path.join(workdir, "ocm.log"), "wb") as log:  # a line per request, as deployed
        proc = subprocess.Popen(ocm_command(config_path), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log, preexec_fn=child_setup, env=installed_env())
    wait_listening(port, proc)
    return Route("OCM", port, "/v1/responses", USER_TOKEN, proc)


# -- nginx ------------------------------------------------------------------

NGINX_CONF = """\
# One process in the foreground: its RSS and CPU are then one PID's, like OCM's.
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 16384;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log {prefix}/access.log;      # OCM logs every request too
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream fake {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;                     # reuse upstream connections, like OCM's pool
    }}
    server {{
        listen 127.0.0.1:{port};          # default backlog (511), as OCM keeps its own
        keepalive_requests 1000000;
        location /v1/ {{
            proxy_pass http://fake/backend-api/codex/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;          # stream SSE as it comes, like OCM
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


def nginx_binary():
    for path in (shutil.which("nginx"), "/usr/sbin/nginx", "/usr/local/sbin/nginx"):
        if path and os.access(path, os.X_OK):
            return path
    return None


def nginx_version(binary):
    out = subprocess.run([binary, "-v"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return out.stdout.decode(errors="replace").strip().rpartition("/")[2]


def nginx_command(binary, workdir, upstream_port, port):
    prefix = os.path.join(workdir, "nginx")
    os.makedirs(prefix, exist_ok=True)
    conf = os.path.join(prefix, "nginx.conf")
    with open(conf, "w") as fh:
        fh.write(NGINX_CONF.format(prefix=prefix, upstream_port=upstream_port, port=port))
    return [binary, "-p", prefix, "-c", conf]


def start_nginx(binary, workdir, upstream_port):
    port = free_port()
    proc = subprocess.Popen(nginx_command(binary, workdir, upstream_port, port),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, preexec_fn=child_setup)
    wait_listening(port, proc)
    return Route("nginx", port, "/v1/responses", USER_TOKEN, proc)


# == Measurements ============================================================

def upstream_connections(route, upstream_port, count):
    """Upstream connections opened for ``count`` sequential requests on one
    client connection (the fake upstream counts them)."""
    before = upstream_stats(upstream_port)["connections"]
    sock, buf, request = connect(route.port), bytearray(), route.request()
    try:
        for _ in range(count):
            sock.sendall(request)
            status, _ = read_response(sock, buf)
            if status != 200:
                raise RuntimeError("%s answered %d" % (route.name, status))
    finally:
        sock.close()
    return upstream_stats(upstream_port)["connections"] - before


def latencies(routes, settings):
    """Round-trip times (ms) of small POSTs, one keep-alive connection per route.
    Rounds alternate between routes so that drift in the machine hits all alike."""
    socks = {r.name: (connect(r.port), bytearray(), r.request()) for r in routes}
    samples = {r.name: [] for r in routes}
    try:
        for _ in range(settings.latency_rounds):
            for route in routes:
                sock, buf, request = socks[route.name]
                out = samples[route.name]
                for _ in range(settings.latency_per_round):
                    started = time.perf_counter_ns()
                    sock.sendall(request)
                    status, _ = read_response(sock, buf)
                    out.append((time.perf_counter_ns() - started) / 1e6)
                    if status != 200:
                        raise RuntimeError("%s answered %d" % (route.name, status))
    finally:
        for sock, _, _ in socks.values():
            sock.close()
    return samples


def sse_delays(routes, settings):
    """Per-event delays (ms) from the upstream's stamp to the client's read."""
    query = "?sse=%d&gap_ms=%g" % (settings.sse_events, settings.sse_gap_ms)
    delays = {r.name: [] for r in routes}
    for _ in range(settings.sse_streams):
        for route in routes:
            sock = connect(route.port)
            try:
                delays[route.name].extend(d / 1e6 for d in read_stream(sock, route.request(query)))
            finally:
                sock.close()
    return delays


def run_loadgen(args):
    return subprocess.Popen([sys.executable, os.path.join(HERE, "loadgen.py")] + [str(a) for a in args],
                            stdout=subprocess.PIPE, preexec_fn=child_setup)


def sleep_until(instant):
    while True:
        left = instant - time.monotonic()
        if left <= 0:
            return
        time.sleep(left)


def throughput(route, upstream, settings):
    """Requests/s at ``rps_conns`` keep-alive connections, split over
    ``rps_procs`` client processes; and the CPU each party used meanwhile."""
    start_at = time.monotonic() + 0.5 + settings.rps_warmup   # 0.5 s to spawn the clients
    stop_at = start_at + settings.rps_seconds
    per_proc = settings.rps_conns // settings.rps_procs
    clients = [run_loadgen(["rps", route.port, route.target, route.host, route.token, per_proc,
                            start_at, stop_at]) for _ in range(settings.rps_procs)]
    pids = {"upstream": upstream.pid, "relay": route.proc.pid if route.proc else None}
    sleep_until(start_at)
    cpu0 = {k: proc_cpu_seconds(p) for k, p in pids.items() if p}
    sleep_until(stop_at)
    cpu1 = {k: proc_cpu_seconds(p) for k, p in pids.items() if p}
    results = [json.loads(c.communicate()[0]) for c in clients]
    seconds = settings.rps_seconds
    out = {"rps": sum(r["responses"] for r in results) / seconds,
           "errors": sum(r["errors"] for r in results),
           "client_cpu": 100.0 * sum(r["cpu"] for r in results) / seconds}
    for key in cpu1:
        out[key + "_cpu"] = 100.0 * (cpu1[key] - cpu0[key]) / seconds
    return out


def many_streams(route, settings, body_size=0):
    """``streams`` SSE streams at once; the relay's RSS and threads sampled meanwhile."""
    query = "?sse=%d&gap_ms=%g" % (settings.stream_events, settings.stream_gap_ms)
    client = run_loadgen(["streams", route.port, route.target + query, route.host, route.token,
                          settings.streams, settings.stream_timeout, body_size])
    peak = {"rss": 0, "threads": 0}
    pid = route.proc.pid if route.proc else None
    if pid:  # reset VmHWM (Linux 4.0+), so the peak is this run's, not an earlier one's
        with contextlib.suppress(OSError):
            with open("/proc/%d/clear_refs" % pid, "w") as fh:
                fh.write("5")
    while client.poll() is None:
        if pid:
            status = proc_status(pid)
            peak["rss"] = max(peak["rss"], status.get("VmRSS", 0))
            peak["threads"] = max(peak["threads"], status.get("Threads", 0))
        time.sleep(0.02)
    result = json.loads(client.communicate()[0])
    if pid:
        result["peak_rss_mb"] = max(peak["rss"], proc_status(pid).get("VmHWM", 0)) / 1024.0
        result["peak_threads"] = peak["threads"]
    return result


# == The table ===============================================================

def fmt(value, digits=2):
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, int) or digits == 0:
        return "{:,}".format(int(round(value)))
    return "%.*f" % (digits, value)


def verdict(value, op, limit):
    if value is None:
        return ""
    ok = {"<=": value <= limit, ">=": value >= limit, "=": value == limit}[op]
    return "PASS" if ok else "MISS"


class Table:
    def __init__(self, columns):
        self.columns = columns     # route names, in order
        self.rows = []             # (label, {route: text}, target text, verdict) or a section title

    def section(self, title):
        self.rows.append(title)

    def row(self, label, values, digits=2, target=None):
        """``values``: {route name: number}; ``target``: (op, limit) checked on OCM's value."""
        texts = {k: fmt(v, digits) for k, v in values.items()}
        target_text, mark = "", ""
        if target is not None:
            op, limit = target
            target_text = "%s %s" % (op, "{:,}".format(limit))
            mark = verdict(values.get("OCM"), op, limit)
        self.rows.append((label, texts, target_text, mark))

    def render(self):
        width = max([len(r[0]) for r in self.rows if isinstance(r, tuple)] + [10]) + 2
        head = ("%-*s" % (width, "") + "".join("%10s" % c for c in self.columns)
                + "%11s  %s" % ("target", "OCM"))
        lines = [head, "-" * len(head)]
        for row in self.rows:
            if isinstance(row, str):
                lines.append(row)
                continue
            label, texts, target_text, mark = row
            lines.append("  %-*s" % (width - 2, label) + "".join("%10s" % texts.get(c, "")
                                                              for c in self.columns)
                         + "%11s  %s" % (target_text, mark))
        return "\n".join(lines)


# == Main ====================================================================

def main(argv=None):
    parser = argparse.ArgumentParser(description="Measure OCM against direct and nginx.")
    parser.add_argument("--quick", action="store_true", help="tiny workloads, no nginx (smoke test)")
    parser.add_argument("--no-nginx", action="store_true", help="skip the nginx row even if installed")
    parser.add_argument("--usages", action="store_true",
                        help="run OCM with usages_path set, to compare accounting on with off")
    parser.add_argument("--only", default=",".join(PHASES),
                        help="comma-separated phases to run: %s" % ",".join(PHASES))
    args = parser.parse_args(argv)
    settings = Settings(args.quick)
    phases = set(p.strip() for p in args.only.split(",") if p.strip())
    unknown = phases - set(PHASES)
    if unknown:
        parser.error("unknown phase(s): %s" % ", ".join(sorted(unknown)))
    fd_limit = raise_fd_limit()
    if "streams" in phases and fd_limit < 3 * settings.streams + 200:
        print("warning: RLIMIT_NOFILE is %d; %d streams need about %d descriptors"
              % (fd_limit, settings.streams, 3 * settings.streams + 200), file=sys.stderr)
    nginx = None if args.quick or args.no_nginx else nginx_binary()
    workdir = tempfile.mkdtemp(prefix="ocm-bench-")
    install_ocm(workdir)
    upstream = ocm = ngx = None
    results = {"usages": args.usages}
    try:
        upstream, upstream_port = start_upstream()
        direct = Route("direct", upstream_port, "/backend-api/codex/responses", "upstream-token")

        def progress(text):
            print("... " + text, file=sys.stderr, flush=True)

        # The interpreter's own share, in the "direct" column: a bare listener.
        port = free_port()
        floor = [sys.executable, "-c", "import socket, time; s = socket.socket(); "
                 "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
                 "s.bind(('127.0.0.1', %d)); s.listen(); time.sleep(60)" % port]
        results["idle_rss"] = {"direct": idle_rss(floor, port, settle=settings.settle)}
        if "start" in phases:
            progress("start-up time (%d runs each)" % settings.start_runs)
            results["start"] = {"direct": time_to_listen(floor, port, settings.start_runs)}
            port = free_port()
            command = ocm_command(write_ocm_config(workdir, upstream_port, port))
            results["start"]["OCM"] = time_to_listen(command, port, settings.start_runs, env=installed_env())
            # A second copy that never gets a bytecode cache (a read-only install).
            no_cache_dir = os.path.join(workdir, "no-bytecode")
            os.makedirs(no_cache_dir)
            install_ocm(no_cache_dir)
            command = ocm_command(write_ocm_config(no_cache_dir, upstream_port, port))
            no_cache = installed_env(bytecode=False)
            results["start_no_cache"] = {"OCM": time_to_listen(command, port, settings.start_runs, env=no_cache)}
            results["idle_rss_no_cache"] = {"OCM": idle_rss(command, port, env=no_cache, settle=settings.settle)}
            if nginx:
                port = free_port()
                results["start"]["nginx"] = time_to_listen(
                    nginx_command(nginx, workdir, upstream_port, port), port, settings.start_runs)

        ocm = start_ocm(workdir, upstream_port, args.usages)
        progress("OCM pid %d, port %d; fake upstream pid %d, port %d"
                 % (ocm.proc.pid, ocm.port, upstream.pid, upstream_port))
        routes = [direct, ocm]
        if nginx:
            ngx = start_nginx(nginx, workdir, upstream_port)
            routes.append(ngx)
        time.sleep(settings.settle)  # let start-up settle before reading the idle footprint
        results["idle_rss"].update((r.name, proc_status(r.proc.pid).get("VmRSS", 0) / 1024.0)
                                   for r in routes if r.proc)
        results["idle_threads"] = {r.name: proc_status(r.proc.pid).get("Threads", 0)
                                   for r in routes if r.proc}

        if "conns" in phases:  # first, while the relays' pools are empty
            progress("upstream connections per %d requests" % settings.sequential)
            results["conns"] = {r.name: upstream_connections(r, upstream_port, settings.sequential)
                                for r in routes}
        if "latency" in phases:
            progress("latency, %d small POSTs per route"
                     % (settings.latency_rounds * settings.latency_per_round))
            results["latency"] = latencies(routes, settings)
        if "sse" in phases:
            progress("SSE event delay, %d stream(s) of %d events"
                     % (settings.sse_streams, settings.sse_events))
            results["sse"] = sse_delays(routes, settings)
        if "rps" in phases:
            results["rps"] = {}
            for route in routes:
                progress("requests/s through %s, %d connections" % (route.name, settings.rps_conns))
                results["rps"][route.name] = throughput(route, upstream, settings)
        if "streams" in phases:
            results["streams"] = {}
            for body in settings.stream_bodies:
                results["streams"][body] = {}
                for route in routes:
                    progress("%d concurrent streams through %s, %d-byte bodies"
                             % (settings.streams, route.name, body or len(SMALL_BODY)))
                    results["streams"][body][route.name] = many_streams(route, settings, body)
    finally:
        for route_proc in (ocm.proc if ocm else None, ngx.proc if ngx else None):
            stop(route_proc)
        if upstream is not None:
            upstream.stdin.close()
            stop(upstream)
        if args.usages:  # saved at OCM's exit: proof the accounting ran
            results["recorded"] = recorded_requests(os.path.join(workdir, "usages.json"))
        shutil.rmtree(workdir, ignore_errors=True)

    print(render(results, settings, nginx))
    return 0


def recorded_requests(path):
    """Requests counted in OCM's usage file (0 if it is missing)."""
    try:
        with open(path) as fh:
            combinations = json.load(fh).get("combinations") or []
    except (OSError, ValueError):
        return 0
    return sum(c.get("total", {}).get("request_count", 0) for c in combinations)


def render(results, settings, nginx):
    columns = ["direct", "OCM"] + (["nginx"] if nginx else [])
    table = Table(columns)
    lat = results.get("latency")
    if lat:
        p50 = {k: percentile(v, 50) for k, v in lat.items()}
        p99 = {k: percentile(v, 99) for k, v in lat.items()}
        table.section("Small POST, one keep-alive connection, %d requests per route"
                      % len(lat["direct"]))
        table.row("round trip p50 (ms)", p50, 3)
        table.row("round trip p99 (ms)", p99, 3)
        table.row("added latency p50 (ms)", {k: v - p50["direct"] for k, v in p50.items() if k != "direct"},
                  3, ("<=", 0.7))
        table.row("added latency p99 (ms)", {k: v - p99["direct"] for k, v in p99.items() if k != "direct"},
                  3, ("<=", 2.0))
    sse = results.get("sse")
    if sse:
        p50 = {k: percentile(v, 50) for k, v in sse.items()}
        p99 = {k: percentile(v, 99) for k, v in sse.items()}
        table.section("SSE, %d stream(s) of %d events %g ms apart, one at a time"
                      % (settings.sse_streams, settings.sse_events, settings.sse_gap_ms))
        table.row("event delay p50 (ms)", p50, 3)
        table.row("event delay p99 (ms)", p99, 3)
        table.row("added delay p99 over direct (ms)",
                  {k: v - p99["direct"] for k, v in p99.items() if k != "direct"}, 3, ("<=", 1.0))
    rps = results.get("rps")
    if rps:
        table.section("Throughput, %d keep-alive connections from %d client processes, %g s"
                      % (settings.rps_conns, settings.rps_procs, settings.rps_seconds))
        table.row("requests/s", {k: v["rps"] for k, v in rps.items()}, 0, (">=", 2000))
        table.row("errors", {k: v["errors"] for k, v in rps.items()}, 0)
        table.row("relay CPU (% of one core)", {k: v.get("relay_cpu") for k, v in rps.items()
                                                 if k != "direct"}, 0)
        table.row("relay CPU per request (us)", {k: v["relay_cpu"] * 1e4 / v["rps"] for k, v in rps.items()
                                                  if k != "direct" and v["rps"]}, 0)
        table.row("fake upstream CPU (% of one core)", {k: v["upstream_cpu"] for k, v in rps.items()}, 0)
        table.row("load clients CPU (% of one core, sum)", {k: v["client_cpu"] for k, v in rps.items()}, 0)
    for body, streams in sorted(results.get("streams", {}).items()):
        table.section("%d concurrent SSE streams, %d events %g ms apart, %s request bodies"
                      % (settings.streams, settings.stream_events, settings.stream_gap_ms,
                         "%d KB" % (body // 1024) if body else "%d-byte" % len(SMALL_BODY)))
        table.row("completed", {k: v["ok"] for k, v in streams.items()}, 0)
        table.row("errors", {k: v["errors"] for k, v in streams.items()}, 0, ("=", 0))
        table.row("most open at once", {k: v["peak_open"] for k, v in streams.items()}, 0)
        table.row("seconds until all were connected",
                  {k: v["connect_seconds"] for k, v in streams.items()}, 2)
        table.row("event delay p99 (ms)", {k: v["delay_p99_ms"] for k, v in streams.items()}, 1)
        table.row("relay peak RSS (MB)", {k: v.get("peak_rss_mb") for k, v in streams.items()
                                          if k != "direct"}, 1, ("<=", 100))
        table.row("relay peak threads", {k: v.get("peak_threads") for k, v in streams.items()
                                         if k != "direct"}, 0)
    table.section("Footprint (direct column: a bare `python3 -c` socket listener, the interpreter's share)")
    table.row("idle RSS after start (MB)", results.get("idle_rss", {}), 1, ("<=", 20))
    table.row("idle threads", results.get("idle_threads", {}), 0)
    if "start" in results:
        table.row("start to listening, median of %d (ms)" % settings.start_runs,
                  {k: v * 1000 for k, v in results["start"].items()}, 0, ("<=", 150))
        table.row("  without a bytecode cache (ms)",
                  {k: v * 1000 for k, v in results["start_no_cache"].items()}, 0, ("<=", 150))
        table.row("  without a bytecode cache: idle RSS (MB)", results["idle_rss_no_cache"], 1, ("<=", 20))
    if "conns" in results:
        table.row("upstream connections per %d requests" % settings.sequential,
                  results["conns"], 0, ("=", 1))
    # no paths of this machine: the table is pasted into docs/performance.md
    title = "OCM bench: %d CPUs, %s %s, %s %s%s" % (
        os.cpu_count() or 0, platform.python_implementation(), platform.python_version(),
        platform.system(),
        platform.release(), ", nginx " + nginx_version(nginx) if nginx else ", nginx: not installed/skipped")
    accounting = ("on (--usages), %s requests recorded" % format(results.get("recorded", 0), ",")
                  if results.get("usages") else "off")
    notes = [
        "direct = the same client straight to the fake upstream; added = relay minus direct.",
        "OCM runs as `%s ocm.py config.json`, logging at info level to a file; usage accounting %s."
        % (os.path.basename(sys.executable), accounting),
    ]
    if nginx:
        notes.append("nginx: one process, proxy_buffering off, upstream keepalive 64, access log on.")
    if os.environ.get("OCM_BENCH_PROFILE") or os.environ.get("OCM_BENCH_WRAP"):
        notes.append("PROFILED RUN: OCM ran under a profiler; its figures are not representative.")
    return "\n".join([title, ""] + [table.render(), ""] + notes)


if __name__ == "__main__":
    sys.exit(main())
