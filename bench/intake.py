"""Intake at scale: files planned per second and time to the first file on a large corpus.

Generates a corpus of N transcripts with their (tiny) recordings in F folders, then:

1. plans it in-process the way a run does (directory walk, then each transcript read, its media
   found and its header read, its features planned), and, side by side on the first folder alone,
   media lookup with one listing per folder against one listing per transcript (the old way);
2. runs the real command line (synthetic engine) on the whole corpus and reads from its log when
   the first file started, how long planning took and at what rate, then stops it.

    python -m bench.intake [--files 20000] [--folders 1] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.synth_corpus import chat_text, write_wav  # noqa: E402


def make(root: Path, n: int, folders: int) -> None:
    rng = random.Random(7)
    for i in range(n):
        folder = root / f"part{i % folders}"
        folder.mkdir(parents=True, exist_ok=True)
        name = f"t{i:05d}"
        write_wav(folder / f"{name}.wav", 1.0 + (i % 5), rate=4000)
        (folder / f"{name}.cha").write_text(chat_text(name, 1.0 + (i % 5), rng), encoding="utf-8")


def plan_in_process(corpus: Path, out: Path) -> dict:
    from supervisor.corpus import describe, find_transcripts
    from supervisor.settings import Settings
    from supervisor.supervisor import file_planner
    from worker.audio import DirListing

    s = Settings()
    s.run.engine = "synthetic"
    plan = file_planner(s)
    t0 = time.perf_counter()
    listing = DirListing()
    found = find_transcripts([corpus], out_root=out, in_place=False, listing=listing)
    walked = time.perf_counter() - t0
    for c in found:
        info = describe(c.root, c.cha, out_root=out, in_place=False, rel_base=c.rel_base, listing=listing)
        plan(info)
    took = time.perf_counter() - t0
    return {"files": len(found), "walk_s": walked, "plan_s": took, "files_per_s": len(found) / took}


def lookup_side_by_side(folder: Path, limit: int) -> dict:
    """Media lookup for the transcripts of one folder: one listing per folder vs one per transcript."""
    from supervisor.corpus import media_name
    from worker.audio import DirListing, find_media

    chas = sorted(folder.glob("*.cha"))[:limit]
    names = [media_name(c.read_bytes()) for c in chas]
    t0 = time.perf_counter()
    shared = DirListing()
    for c, n in zip(chas, names):
        assert find_media(c, n, listing=shared) is not None
    once = time.perf_counter() - t0
    t0 = time.perf_counter()
    for c, n in zip(chas, names):
        assert find_media(c, n) is not None  # a fresh listing each time: the folder listed per transcript
    each = time.perf_counter() - t0
    return {"transcripts": len(chas), "entries": len(os.listdir(folder)), "once_s": once, "each_s": each}


def run_cli(corpus: Path, work: Path, timeout: float) -> dict:
    log = work / "run.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BATCHALIGN_SUPERVISE_MEMORY_LEDGER": "off",
           "XDG_STATE_HOME": str(work / "state")}
    cmd = [sys.executable, "-m", "supervisor.cli", str(corpus), "-o", str(work / "out"), "--engine", "synthetic",
           "--progress", "off", "--log-json", str(log), "--workers", "2", "--memory-budget", "2GiB"]
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = finished = None
    progress = 0
    try:
        while time.monotonic() - t0 < timeout:
            evs = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
            names = [e["event"] for e in evs]
            progress = names.count("intake_progress")
            if first is None and "file_started" in names:
                first = time.monotonic() - t0
            done = [e for e in evs if e["event"] == "intake_finished"]
            if done:
                finished = done[0]
            if first is not None and finished is not None:
                break
            time.sleep(0.2)
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
    return {"first_file_s": first, "intake": finished, "progress_events": progress}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--folders", type=int, default=1)
    ap.add_argument("--lookup", type=int, default=2000, help="transcripts in the side-by-side lookup")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--keep", type=Path, help="generate the corpus here and keep it")
    args = ap.parse_args(argv)
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-intake-"))
    corpus = work / "corpus"
    try:
        if not corpus.exists():
            t0 = time.perf_counter()
            make(corpus, args.files, args.folders)
            print(f"corpus: {args.files} transcripts in {args.folders} folder(s), made in "
                  f"{time.perf_counter() - t0:.1f} s")
        side = lookup_side_by_side(corpus / "part0", args.lookup)
        print(f"media lookup, {side['transcripts']} transcripts in a folder of {side['entries']} entries: "
              f"one listing per folder {side['once_s']:.2f} s, one per transcript {side['each_s']:.2f} s "
              f"({side['each_s'] / max(side['once_s'], 1e-9):.0f}x)")
        inproc = plan_in_process(corpus, work / "out")
        print(f"planning in-process: {inproc['files']} files, walk {inproc['walk_s']:.2f} s, all planned in "
              f"{inproc['plan_s']:.1f} s = {inproc['files_per_s']:.0f} files/s")
        cli = run_cli(corpus, work, args.timeout)
        intake = cli["intake"] or {}
        first = cli["first_file_s"]
        print(f"command line: first file started {first:.1f} s after launch" if first is not None
              else "command line: no file started before the timeout")
        if intake:
            print(f"  planning finished after {intake['seconds']:.1f} s of the run "
                  f"({intake['files_per_s']:.0f} files/s), {cli['progress_events']} progress events on the way")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
