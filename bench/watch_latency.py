"""Watch-mode latency: how long from dropping a small transcript into the inbox to its aligned output.

Starts a real `batchalign-supervise --watch` (synthetic engine), waits until it is idle, then drops
files one at a time and measures drop -> output for each. The figure is dominated by the settle time
(a file must stop changing before it is taken) plus one scan interval; both are printed.

    python -m bench.watch_latency [--files 5] [--settle 2s] [--scan 0.5s]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.synth_corpus import make_corpus  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=5)
    ap.add_argument("--settle", default="2s")
    ap.add_argument("--scan", default="0.5s")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-watch-"))
    inbox, out, staging = work / "inbox", work / "out", work / "staging"
    inbox.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BATCHALIGN_SUPERVISE_SERVICE_SETTLE": args.settle,
           "BATCHALIGN_SUPERVISE_SERVICE_SCAN_INTERVAL": args.scan, "BATCHALIGN_SUPERVISE_MEMORY_LEDGER": "off",
           "XDG_STATE_HOME": str(work / "state")}
    proc = subprocess.Popen([sys.executable, "-m", "supervisor.cli", "--watch", str(inbox), "-o", str(out),
                             "--engine", "synthetic", "--progress", "off", "--memory-budget", "1GiB",
                             "--log-json", str(work / "log.jsonl")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        time.sleep(2.0)
        latencies = []
        for i in range(args.files):
            src = make_corpus(staging / f"drop{i}", [5.0], seed=i)[0]
            # Media first, transcript last, each by rename: what a careful copy does.
            target = inbox / f"drop{i}"
            target.mkdir()
            os.replace(src.with_suffix(".wav"), target / src.with_suffix(".wav").name)
            t0 = time.monotonic()
            os.replace(src, target / src.name)
            result = out / f"drop{i}" / src.name
            while not result.exists():
                if time.monotonic() - t0 > 120:
                    raise SystemExit(f"no output for drop{i} after 120 s")
                time.sleep(0.02)
            latencies.append(time.monotonic() - t0)
            print(f"drop{i}: {latencies[-1]:.2f} s from drop to aligned output")
        print(f"\nmedian {statistics.median(latencies):.2f} s, max {max(latencies):.2f} s over {len(latencies)} "
              f"files (settle {args.settle}, scan every {args.scan}; 5 s of audio each, workers already warm "
              f"after the first file)")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
