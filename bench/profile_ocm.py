"""Run OCM under cProfile in every thread: ``profile_ocm.py OUT.prof config.json``.

``python3 -m cProfile ocm.py`` only sees the main thread, and OCM's work
happens in one thread per connection. This wrapper profiles each thread on
its own and merges them into OUT.prof when OCM stops (SIGTERM). The bench
uses it when OCM_BENCH_PROFILE=OUT.prof is set. Read the result with
``python3 -m pstats OUT.prof`` (sort tottime / cumulative, stats 30).

The clock is each thread's CPU time (time.thread_time), not wall time: with
many threads, wall time charges the wait for the GIL to whatever call released
it (poll, sendall, the logging lock) and hides what actually costs CPU. For
waiting and contention, sample with py-spy instead. cProfile also slows OCM
several times, so read the shares, not the absolute figures. Python 3.12+ allows only one
active profiler per process (sys.monitoring): there this falls back to the
main thread only, use py-spy instead (see bench/README.md).
"""

import cProfile
import os
import pstats
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import ocm  # noqa: E402

profiles = []
profiles_lock = threading.Lock()
_original_run = threading.Thread.run


def new_profile():
    return cProfile.Profile(time.thread_time)


def profiled_run(self):
    profile = new_profile()
    try:
        profile.enable()
    except ValueError:  # 3.12+: another thread's profiler is already active
        return _original_run(self)
    try:
        return _original_run(self)
    finally:
        profile.disable()
        with profiles_lock:
            profiles.append(profile)


def main():
    out, argv = sys.argv[1], sys.argv[2:]
    threading.Thread.run = profiled_run
    main_profile = new_profile()
    main_profile.enable()
    try:
        code = ocm.main(argv)
    finally:
        main_profile.disable()
        with profiles_lock:
            stats = pstats.Stats(main_profile)
            for profile in profiles:
                stats.add(profile)
        stats.dump_stats(out)
        print("profile of %d threads written to %s" % (len(profiles) + 1, out), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
