"""The same synthetic corpus through the local pool and through Dask and Slurm, side by side.

Runs, each on a fresh telemetry store and the same total memory (two workers of ``--worker-mb``):

- ``local pool``: ``batchalign-supervise CORPUS --workers 2 --memory-budget 2xW``;
- ``--cluster local``: a Dask LocalCluster of two worker processes started by the supervisor;
- ``dask (CLI)``: ``dask scheduler`` + two ``batchalign-supervise worker`` processes, ``--cluster tcp://``;
- ``slurm``: ``--cluster slurm`` on a single-node Slurm started here (root with slurm-wlm only);
- ``dask, fixed guess``: what a user does without a prediction: one Dask worker of 2xW with two
  threads, every file submitted with the same ``resources={"MEM": guess}``, Dask's own retries
  (``allowed-failures`` 3): a guess too small packs big files together (kills, retries, lost files),
  one too large runs them one at a time (idle memory).

Figures: makespan (whole command) and work span (first submission to last result), scheduling
overhead per file (dispatch gap on its worker + result delay beyond the file's own wall time),
kills, files lost, and sum of requests / sum of measured peaks over the files that finished.
Targets: requests within 1.3x of use, no more kills than the local pool, overhead < 50 ms per file.

    python -m bench.cluster [--files 40] [--worker-mb 700] [--no-slurm]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from bench.synth_corpus import make_corpus  # noqa: E402

PROFILE = """
[run]
engine = "synthetic"
[engine.synthetic]
mb_per_audio_second = 4.0
cpu_seconds_per_audio_second = 0.03
"""


def durations(n: int, seed: int = 7) -> list[float]:
    """Skewed: most files short, a few long enough to need most of a worker."""
    rng = random.Random(seed)
    return [rng.uniform(100, 130) if rng.random() < 0.25 else rng.uniform(4, 30) for _ in range(n)]


def env_for(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHALIGN_SUPERVISE_")}
    env.update(PYTHONPATH=str(ROOT), XDG_STATE_HOME=str(tmp / "state"), HF_HUB_OFFLINE="1",
               BATCHALIGN_SUPERVISE_MEMORY_LEDGER=str(tmp / "ledger.json"))
    return env


def events(log: Path) -> list[dict]:
    out = []
    for line in log.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def summarize(evs: list[dict], wall: float) -> dict:
    run = [e for e in evs if e["event"] == "run_started"][-1]["run"]
    evs = [e for e in evs if e.get("run") == run]
    admitted: dict[str, list[dict]] = {}
    for e in evs:
        if e["event"] == "file_admitted":
            admitted.setdefault(e["file"], []).append(e)
    started = {}
    overheads = []
    last_done_on: dict[str, float] = {}
    done = []
    for e in evs:
        if e["event"] == "file_started":
            started[e["file"]] = e
        elif e["event"] == "file_done":
            s = started.get(e["file"])
            a = admitted[e["file"]][-1]
            if s is not None:
                ready = max(a["t"], last_done_on.get(e["worker"], a["t"]))
                overheads.append(max(0.0, s["t"] - ready) + max(0.0, e["t"] - s["t"] - (e["wall_s"] or 0.0)))
            last_done_on[e["worker"]] = e["t"]
            done.append((e, a))
    requests = sum(a.get("request_mb") or a.get("predicted_mb") or 0 for _e, a in done)
    peaks = sum(e["peak_mb"] for e, _a in done)
    kills = sum(1 for e in evs if e["event"] == "worker_killed")
    first = min((a[0]["t"] for a in admitted.values()), default=0.0)
    last = max((e["t"] for e, _a in done), default=0.0)
    finished = {d["file"] for d, _ in done}
    lost = {e["file"] for e in evs if e["event"] in ("file_quarantined", "file_failed") and e["file"] not in finished}
    return {"makespan_s": round(wall, 2), "work_s": round(last - first, 2), "done": len(done), "lost": len(lost),
            "kills": kills, "overhead_ms": round(1000 * sum(overheads) / max(1, len(overheads)), 1),
            "requests_over_peaks": round(requests / peaks, 3) if peaks else None}


def run_supervisor(tmp: Path, name: str, corpus: Path, extra: list[str], env: dict | None = None) -> dict:
    out, log = tmp / f"out-{name}", tmp / f"{name}.jsonl"
    cfg = tmp / "config.toml"
    e = env_for(tmp / name)
    e.update(env or {})
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "supervisor.cli", str(corpus), "-o", str(out), "--config", str(cfg),
                        "--progress", "off", "--log-json", str(log), *extra], cwd=tmp, env=e,
                       capture_output=True, text=True, timeout=900)
    wall = time.monotonic() - t0
    if r.returncode not in (0, 1):
        raise RuntimeError(f"{name}: exit {r.returncode}: {r.stderr[-2000:]}")
    return summarize(events(log), wall)


def start_dask(tmp: Path, worker_mb: int, nworkers: int = 2) -> tuple[str, list[subprocess.Popen]]:
    from cluster_helpers import free_port

    port = free_port()
    addr = f"tcp://127.0.0.1:{port}"
    env = env_for(tmp / "dask")
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", str(port), "--no-dashboard"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)]
    time.sleep(1.5)
    logs = []
    for i in range(nworkers):
        log = tmp / f"worker{i}.log"
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, "-m", "supervisor.cli", "worker", addr, "--memory-limit",
                                       f"{worker_mb}MiB", "--engine", "synthetic"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=open(log, "wb"), start_new_session=True))
    deadline = time.monotonic() + 60
    while not all(p.exists() and "batchalign-supervise worker:" in p.read_text() for p in logs):
        if time.monotonic() > deadline:
            raise RuntimeError("workers did not start")
        time.sleep(0.1)
    return addr, procs


def stop(procs: list[subprocess.Popen]) -> None:
    import signal

    for p in reversed(procs):
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in reversed(procs):
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


async def fixed_guess(corpus: Path, out: Path, files: list[Path], guess_mb: int, worker_mb: int) -> dict:
    """Plain Dask: one worker of 2xW running up to four files at once (threads), every file asking
    for the same guess; the scheduler packs by the guess and retries what its nanny kills."""
    import dask
    from distributed import Client, LocalCluster

    from supervisor.cluster.engine import EnginePlugin, align_file
    from supervisor.cluster.worker import dask_memory_config, offered_mb

    dask.config.set(dask_memory_config())
    limit = 2 * worker_mb * 2**20
    kills = []
    t0 = time.monotonic()
    async with LocalCluster(n_workers=1, threads_per_worker=4, processes=True, memory_limit=limit,
                            resources={"MEM": offered_mb(limit)}, host="127.0.0.1", dashboard_address=None,
                            asynchronous=True) as cluster, Client(cluster, asynchronous=True) as client:
        client.subscribe_topic("worker-restart-memory", lambda ev: kills.append(ev))
        opts = {"mb_per_audio_second": 4.0, "cpu_seconds_per_audio_second": 0.03, "baseline_mb": 40.0,
                "calibrate": False}
        await client.register_plugin(EnginePlugin("synthetic", opts), name=EnginePlugin.name)
        t1 = time.monotonic()
        futs = [client.submit(align_file, {"key": f"f{i}", "file": p.name, "cha": str(p), "media": str(p.with_suffix(".wav")),
                                           "out": str(out / p.name), "engine": "synthetic", "options": opts},
                              resources={"MEM": guess_mb}, pure=False) for i, p in enumerate(files)]
        results = await asyncio.gather(*futs, return_exceptions=True)
        t2 = time.monotonic()
    ok = [r for r in results if isinstance(r, dict) and "error" not in r]
    peaks = sum(r["peak_rss_mb"] for r in ok)
    return {"makespan_s": round(t2 - t0, 2), "work_s": round(t2 - t1, 2), "done": len(ok),
            "lost": len(results) - len(ok), "kills": len(kills), "overhead_ms": None,
            "requests_over_peaks": round(guess_mb * len(ok) / peaks, 3) if peaks else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=40)
    ap.add_argument("--worker-mb", type=int, default=700)
    ap.add_argument("--no-slurm", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    corpus = tmp / "corpus"
    files = make_corpus(corpus, durations(args.files))
    (tmp / "config.toml").write_text(PROFILE)
    w = args.worker_mb
    rows: list[tuple[str, dict]] = []
    try:
        rows.append(("local pool", run_supervisor(tmp, "local-pool", corpus,
                                                  ["--workers", "2", "--memory-budget", f"{2 * w}MiB"])))
        rows.append(("--cluster local", run_supervisor(
            tmp, "cluster-local", corpus, ["--cluster", "local", "--workers", "2"],
            {"BATCHALIGN_SUPERVISE_CLUSTER_LOCAL_MEMORY": f"{w}MiB"})))
        addr, procs = start_dask(tmp, w)
        try:
            rows.append(("dask (CLI workers)", run_supervisor(tmp, "dask-cli", corpus, ["--cluster", addr])))
        finally:
            stop(procs)
        from slurm_helpers import LocalSlurm, slurm_missing

        why = "--no-slurm" if args.no_slurm else slurm_missing()
        if why is None:
            slurm = LocalSlurm(tmp / "slurm")
            slurm.start()
            try:
                with open(tmp / "config.toml", "a") as fh:
                    fh.write(f'\n[cluster.slurm]\ncores = 1\nmemory = "{w + 128}MiB"\nmax_jobs = 2\n'
                             f'python = "{sys.executable}"\nscheduler_host = "127.0.0.1"\n'
                             f'log_directory = "{tmp / "slurm-logs"}"\n')
                rows.append(("slurm (2 jobs)", run_supervisor(tmp, "slurm", corpus, ["--cluster", "slurm"],
                                                              {"SLURM_CONF": str(slurm.conf)})))
            finally:
                slurm.stop()
        else:
            print(f"(slurm skipped: {why})", file=sys.stderr)
        peaks = sorted(104 + 4 * d for d in durations(args.files))
        # median file; more than half the worker: one file at a time
        small, large = int(peaks[len(peaks) // 2]), int(2 * w * 0.95 / 2) + 1
        for label, guess in ((f"dask, fixed guess {small} MiB (median)", small),
                             (f"dask, fixed guess {large} MiB (half the worker)", large)):
            out = tmp / f"out-guess-{guess}"
            out.mkdir()
            rows.append((label, asyncio.run(fixed_guess(corpus, out, files, guess, w))))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cols = ("makespan_s", "work_s", "done", "lost", "kills", "overhead_ms", "requests_over_peaks")
    print(f"{args.files} files, {sum(durations(args.files)):.0f} audio s, 2 workers x {w} MiB")
    print(f"| run | {' | '.join(cols)} |")
    print("|---" * (len(cols) + 1) + "|")
    for label, r in rows:
        print(f"| {label} | " + " | ".join("-" if r.get(c) is None else str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
