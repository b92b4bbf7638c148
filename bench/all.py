"""Run every benchmark one after the other (never concurrently: they would skew each other).

    python -m bench.all --quick     # smoke run of the whole suite (~7 min on a loaded 2-core machine)
    python -m bench.all             # the full settings of each script (much longer on a CPU)

Each script saves its JSON under bench/results/ (with a `_quick` suffix for quick runs).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from bench.harness import ROOT

SCRIPTS = ("bench.dpo", "bench.rerank", "bench.grpo", "bench.reward", "bench.features")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    a = parser.parse_args()
    times = {}
    for script in SCRIPTS:
        start = time.perf_counter()
        cmd = [sys.executable, "-m", script] + (["--quick"] if a.quick else [])
        print(f"$ {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        times[script] = time.perf_counter() - start
        table = proc.stdout[proc.stdout.rfind("\n\n| ") :].strip() if "\n\n| " in proc.stdout else proc.stdout[-2000:]
        print(table if proc.returncode == 0 else f"FAILED ({proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
        print(f"({times[script]:.0f} s)\n", flush=True)
    print(f"total {sum(times.values()):.0f} s")


if __name__ == "__main__":
    main()
