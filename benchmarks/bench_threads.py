"""`kineflow run` on a busy machine: wall time of the shipped tiny workflows with the CPU idle and with every core
kept busy by other processes, for KineFlow's thread defaults and, as the peer, torch's stock settings.

    python benchmarks/bench_threads.py [--rounds 3] [--load N] [--workflows text_to_video animatediff_tiny]

The load is started by this script: N processes (default: one per usable core) each spinning a Python busy loop
in its own session, started before and stopped after each workflow's loaded runs. Each run is a fresh `kineflow run`
process (start-up and torch's import included, as a user sees it), with OMP_NUM_THREADS, OMP_WAIT_POLICY,
MKL_NUM_THREADS and KINEFLOW_THREADS removed from its environment so the defaults apply. Settings compared:
  kineflow  the command's defaults (--threads auto, OpenMP waiting passively)
  torch     `--threads torch`: torch's and OpenMP's stock settings (one thread per core, OpenMP's default waiting)
Rounds interleave everything (per workflow: idle runs of both settings, then loaded runs of both), so slow phases of
the machine hit all alike. Prints the median wall times, the median per-round ratio loaded / idle per setting (the
acceptance figure: <= 2), the CPU and the load averages before and after. A run that takes longer than --timeout is
stopped and counted at the timeout (shown with '>').
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kineflow.runtime.cpu import cpu_name, usable_cores

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"kineflow": [], "torch": ["--threads", "torch"]}
CLEARED = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "KINEFLOW_THREADS", "MKL_NUM_THREADS")


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


class BusyLoad:
    """N processes spinning Python busy loops while the `with` block runs; each stopped by its own handle."""

    def __init__(self, count: int):
        self.count, self.procs = count, []

    def __enter__(self):
        # Each in its own session: where the kernel shares the CPU between sessions first (Linux's autogroups), a
        # load started from the benchmark's own session would only split the benchmark's share, and other users'
        # work on the machine would decide the ratio. As separate sessions, the CPU is shared as between processes.
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
                      for _ in range(self.count)]
        time.sleep(0.5)  # let them reach their loops
        return self

    def __exit__(self, *exc):
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait()


def run_once(workflow: Path, extra: list[str], out_dir: Path, timeout: float) -> tuple[float, bool]:
    """Wall seconds of one `kineflow run` process, and whether it finished within the timeout."""
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "kineflow", "run", str(workflow), "--output-dir", str(out_dir),
                             *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return timeout, False
    if proc.returncode != 0:
        raise SystemExit(f"kineflow run {workflow.name} {' '.join(extra)} failed ({proc.returncode}):\n{err}")
    return time.perf_counter() - start, True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--load", type=int, default=usable_cores(), help="busy processes (default: usable cores)")
    parser.add_argument("--workflows", nargs="+", default=["text_to_video", "animatediff_tiny"],
                        help="names under workflows/api/ (default: text_to_video animatediff_tiny)")
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds one run may take (default 60)")
    args = parser.parse_args()

    out_dir = Path(tempfile.mkdtemp(prefix="kineflow-bench-threads-"))
    before = load_average()
    # times[workflow][setting][idle|loaded] -> list of (seconds, finished)
    times = {w: {s: {"idle": [], "loaded": []} for s in args.settings} for w in args.workflows}
    started = time.monotonic()
    try:
        for round_ in range(args.rounds):
            for name in args.workflows:
                workflow = ROOT / "workflows" / "api" / f"{name}.json"
                for setting in args.settings:
                    times[name][setting]["idle"].append(run_once(workflow, SETTINGS[setting], out_dir, args.timeout))
                with BusyLoad(args.load):
                    for setting in args.settings:
                        times[name][setting]["loaded"].append(
                            run_once(workflow, SETTINGS[setting], out_dir, args.timeout))
            this_round = ", ".join(f"{name} {setting} {times[name][setting]['idle'][-1][0]:.1f}/"
                                   f"{times[name][setting]['loaded'][-1][0]:.1f} s"
                                   for name in args.workflows for setting in args.settings)
            print(f"round {round_ + 1}/{args.rounds} (idle/loaded): {this_round}; "
                  f"{time.monotonic() - started:.0f} s so far, load average {load_average()}", file=sys.stderr)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)

    print(f"kineflow run on {cpu_name()}, {usable_cores()} usable cores, {args.load} busy-loop processes as the load; "
          f"{args.rounds} interleaved rounds; load average (1/5/15 min) before {before}, after {load_average()}")
    print(f"{'workflow':<18} {'setting':<9} {'idle s':>8} {'loaded s':>9} {'loaded/idle':>12}")
    for name in args.workflows:
        for setting in args.settings:
            idle, loaded = times[name][setting]["idle"], times[name][setting]["loaded"]
            ratio = statistics.median(l[0] / i[0] for i, l in zip(idle, loaded))

            def shown(runs):  # '>' when a run was stopped at the timeout
                return ("" if all(done for _, done in runs) else ">") + f"{statistics.median(t for t, _ in runs):.1f}"

            note = "" if all(done for _, done in idle + loaded) else "  (timeouts: ratio not exact)"
            print(f"{name:<18} {setting:<9} {shown(idle):>8} {shown(loaded):>9} {ratio:>12.2f}{note}")


if __name__ == "__main__":
    main()
