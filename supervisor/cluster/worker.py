"""``batchalign-supervise worker SCHEDULER``: Dask worker processes set up for alignment.

Each worker process (one Dask nanny + worker, one thread: one file at a time, so a file that kills
its worker can only ever blame itself) gets a memory limit (``--memory-limit`` per process, else
this node's cgroup-aware limit minus its reserve, split over ``--nworkers``), advertises what a
file may peak at as the Dask resource ``MEM`` (MiB: the limit times the nanny's terminate fraction),
loads the engine once when it starts and keeps it between files, and runs torch with
cores / nworkers threads. It is also what the Slurm job script runs (``python -m
supervisor.cluster.worker``), so it accepts the options dask-jobqueue passes (``--name``,
``--nthreads``, ``--death-timeout``, ``--local-directory``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from typing import Any

from supervisor.cluster import MEM
from supervisor.cluster.engine import THREADS_ENV, EnginePlugin

MiB = 2**20
# Where the nanny restarts a worker: the share of its limit a file's peak may reach.
TERMINATE_FRACTION = 0.95
# Inside a Slurm job the limit covers every process of the job, not only the workers: this process
# (which hosts the nannies), multiprocessing's resource tracker and the job's shell (~80 MiB measured).
JOB_OVERHEAD_MB = 128


def dask_memory_config() -> dict[str, Any]:
    """No spilling or pausing (a file holds no Dask data); the nanny restart is the only guard."""
    return {"distributed.worker.memory.target": False, "distributed.worker.memory.spill": False,
            "distributed.worker.memory.pause": False,
            "distributed.worker.memory.terminate": TERMINATE_FRACTION,
            "distributed.worker.memory.monitor-interval": "50ms",
            "distributed.worker.daemon": False}


def offered_mb(memory_limit: int) -> int:
    """MEM a worker offers: a file predicted to peak above this would be restarted by its nanny."""
    return int(memory_limit * TERMINATE_FRACTION / MiB)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def slurm_job_limit(nworkers: int) -> int | None:
    """Per-worker share of this Slurm job's ``--mem`` after the job's own overhead (None outside Slurm)."""
    mb = os.environ.get("SLURM_MEM_PER_NODE")
    if not mb or not mb.isdigit():
        return None
    return max(64, int(mb) - JOB_OVERHEAD_MB) * MiB // max(1, nworkers)


def default_memory_limit(nworkers: int) -> int:
    from supervisor.sampler import detect_limits

    return detect_limits().budget // max(1, nworkers)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="batchalign-supervise worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scheduler", help="scheduler address, e.g. tcp://10.0.0.5:8786")
    p.add_argument("--memory-limit", help="per worker process, e.g. 4GiB (default: this node's limit / nworkers)")
    p.add_argument("--nworkers", type=int, default=1, help="worker processes on this node (default 1)")
    p.add_argument("--engine", help="load this engine at start (the supervisor's choice wins when it connects)")
    p.add_argument("--model", default="", help="model id or folder for --engine")
    p.add_argument("--options", default="{}", help="engine options as JSON (advanced)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (default cores / nworkers)")
    p.add_argument("--host", default=None, help="address to listen on (default: the scheduler's route)")
    p.add_argument("--name", default=None, help="worker name (dask-jobqueue passes the job name)")
    p.add_argument("--nthreads", type=int, default=1, help=argparse.SUPPRESS)  # always 1: one file at a time
    p.add_argument("--death-timeout", default=None, help="seconds without a scheduler before leaving")
    p.add_argument("--local-directory", default=None)
    p.add_argument("--nanny", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> int:
    import dask
    from distributed import Nanny

    from supervisor.units import parse_size

    dask.config.set(dask_memory_config())
    n = max(1, args.nworkers)
    limit = parse_size(args.memory_limit) if args.memory_limit else default_memory_limit(n)
    job = slurm_job_limit(n)
    if job is not None and job < limit:
        limit = job  # so the nanny restarts a worker before Slurm kills the whole job
    threads = args.threads or max(1, _cores() // n)
    plugins = set()
    if args.engine:
        options = json.loads(args.options)
        options.setdefault("model", args.model or "")
        plugins.add(EnginePlugin(args.engine, options))
    nannies = []
    for i in range(n):
        name = f"{args.name}-{i}" if args.name and n > 1 else args.name
        nannies.append(Nanny(args.scheduler, nthreads=1, memory_limit=limit, resources={MEM: offered_mb(limit)},
                             plugins=plugins, env={THREADS_ENV: str(threads)}, host=args.host, name=name,
                             death_timeout=float(args.death_timeout) if args.death_timeout else None,
                             local_directory=args.local_directory))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await asyncio.gather(*(nanny.start() for nanny in nannies))
    print(f"batchalign-supervise worker: {n} worker(s) of {limit / MiB:.0f} MiB (offering {MEM}="
          f"{offered_mb(limit)}), {threads} torch thread(s) each, scheduler {args.scheduler}", file=sys.stderr,
          flush=True)
    finished = [asyncio.ensure_future(nanny.finished()) for nanny in nannies]
    waiter = asyncio.ensure_future(stop.wait())
    await asyncio.wait([waiter, *finished], return_when=asyncio.FIRST_COMPLETED)
    await asyncio.gather(*(nanny.close(timeout=10) for nanny in nannies), return_exceptions=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    from supervisor.cluster import ClusterUnavailable, require_distributed

    try:
        require_distributed()
    except ClusterUnavailable as exc:
        print(f"batchalign-supervise: {exc}", file=sys.stderr)
        return 2
    args = parse_args(argv)
    try:
        return asyncio.run(serve(args))
    except (OSError, ValueError) as exc:
        print(f"batchalign-supervise worker: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
