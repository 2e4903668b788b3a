"""Wire one run together: logging, telemetry, discovery, services around the loop, the summary."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

from supervisor.corpus import CorpusError, find_transcripts
from supervisor.sampler import detect_limits
from supervisor.settings import Settings
from supervisor.supervisor import EXIT_OK, EXIT_USAGE, RunSummary, Supervisor
from supervisor.units import format_size, gib
from worker.audio import DirListing

MiB = 2**20


def _err(msg: str) -> None:
    print(f"batchalign-supervise: {msg}", file=sys.stderr)


def _progress_mode(s: Settings) -> bool:
    if s.run.progress == "on":
        return True
    if s.run.progress == "off":
        return False
    return sys.stderr.isatty()


def run_app(settings: Settings, reload_cli: dict | None = None) -> int:
    s = settings
    try:
        limits = detect_limits(budget=s.memory.budget, reserve=s.memory.reserve)
    except (OSError, ValueError) as exc:
        _err(f"cannot determine the memory limit: {exc}")
        return EXIT_USAGE
    try:
        found, watcher, listing = _discover(s)
    except (CorpusError, OSError) as exc:
        _err(str(exc))
        return EXIT_USAGE
    store, store_error = _open_store(s)
    try:
        log, display, log_path = _outputs(s)
    except OSError as exc:  # a log that cannot be written is the user's option, not a crash
        _err(f"log {exc.filename or s.log_path}: cannot write: {exc.strerror or exc} (see --log-json)")
        if store is not None:
            store.close()
        return EXIT_USAGE
    sup_cls = Supervisor
    if s.cluster.address:
        from supervisor.cluster.run import ClusterSupervisor as sup_cls  # needs the 'cluster' extra
    sup = sup_cls(s, log=log, store=store, limits=limits, display=display, reload_cli=reload_cli,
                  watcher=watcher, listing=listing)
    from telemetry.logging import bind_run

    bind_run(sup.run_id)
    if store_error is not None:
        sup.emit("telemetry_unavailable", level="warning", store=str(s.telemetry_path), error=store_error,
                 effect="starting from the cold defaults; learning stays in memory for this run")
    try:
        if s.dry_run:
            sup.plan(found)
            print_plan(sup)
            return EXIT_OK
        summary = _run_with_cache(sup, found, display)
    finally:
        if store is not None:
            store.close()
    print_summary(summary, sup, log_path)
    return summary.exit_code


def _discover(s: Settings) -> tuple[list, Any, DirListing]:
    """The corpus's transcripts (a walk only), or the inbox watcher in watch mode."""
    listing = DirListing()  # the walk's listings, reused to find media: each folder listed once
    if s.service.watch:
        from supervisor.watch import InboxWatcher

        media_dir = Path(s.run.media_dir) if s.run.media_dir else None
        watcher = InboxWatcher(Path(s.service.watch), out_root=s.out, in_place=s.in_place, media_dir=media_dir,
                               settle_s=s.service.settle, scan_interval=s.service.scan_interval)
        return [], watcher, listing
    found = find_transcripts(s.corpus, out_root=s.out, in_place=s.in_place, listing=listing)
    if not found:
        raise CorpusError(f"no .cha transcripts found under {', '.join(map(str, s.corpus))}")
    return found, None, listing


def _open_store(s: Settings) -> tuple[Any, str | None]:
    from telemetry.store import TelemetryStore

    try:
        return TelemetryStore(s.telemetry_path), None
    except Exception as exc:  # sqlite3 errors, permissions, a full disk: the run does not need the store
        return None, f"{type(exc).__name__}: {exc}"


def _outputs(s: Settings) -> tuple[Any, Any, Path | None]:
    """The one logging configuration of this process, and the progress display if one is wanted."""
    from telemetry.logging import configure_logging, get_logger

    progress = _progress_mode(s) and not s.dry_run
    log_path = None if s.dry_run else s.log_path
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    configure_logging(json_path=log_path, console="none" if progress else "plain", process="supervisor")
    display = None
    if progress:
        from supervisor.progress import ProgressDisplay

        display = ProgressDisplay()
    return get_logger("supervisor"), display, log_path


def _run_with_cache(sup: Supervisor, found: list, display: Any) -> RunSummary:
    """The run, with the result cache kept under its size limit before, during and after it."""
    from supervisor.cache import Pruner

    pruner = Pruner(sup.s.cache_dir, sup.s.run.cache_max)
    pruner.maybe(force=True)
    sup.add_status_hook(pruner.maybe)
    try:
        if display is not None:
            display.start()
        summary = asyncio.run(_serve(sup, found))
    finally:
        if display is not None:
            display.stop(sup.status())
    pruner.join()
    pruner.maybe(force=True)
    pruner.join()
    return summary


async def _serve(sup: Supervisor, found: list) -> RunSummary:
    """The loop plus the services around it (status socket, metrics), stopped together."""
    s = sup.s
    services: list[Any] = []
    if s.service.control_socket != "off":
        from supervisor.control import ControlServer, default_socket_path

        path = Path(s.service.control_socket) if s.service.control_socket else default_socket_path(s.state_dir)
        server = ControlServer(path, sup.status, info={"out": str(s.out) if s.out else None,
                                                       "corpus": [str(c) for c in s.corpus]})
        try:
            await server.start()
            services.append(server)
            sup.emit("control_socket", path=str(path))
        except OSError as exc:
            sup.emit("control_socket_unavailable", level="warning", path=str(path), error=str(exc))
    if s.service.metrics_port:
        from supervisor.metrics import MetricsServer

        metrics = MetricsServer(s.service.metrics_host, s.service.metrics_port, sup.status)
        await metrics.start()
        services.append(metrics)
        sup.emit("metrics_listening", host=s.service.metrics_host, port=metrics.port)
    textfile = Path(s.service.metrics_textfile) if s.service.metrics_textfile else None
    if textfile is not None:
        from supervisor.metrics import write_textfile

        sup.add_status_hook(lambda status: write_textfile(textfile, status))
    try:
        return await sup.run(found)
    finally:
        for svc in services:
            await svc.stop()
        if textfile is not None:
            write_textfile(textfile, sup.status())


def print_plan(sup: Supervisor) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Plan: {sup.s.engine_name} / {sup.s.model_id} on {sup.s.run.device}, "
                        f"budget {format_size(sup.limits.budget)} ({sup.limits.source})")
    for col in ("#", "file", "audio s", "predicted peak MiB", "growth MiB", "estimate", "what drives it", "note"):
        table.add_column(col, overflow="fold")  # wrapped, never cut with an ellipsis
    order = sup.queue.pending()
    for i, job in enumerate(order, 1):
        e = job.estimate
        note = ""
        if e.central_mb > sup.budget_mb:
            note = f"cannot fit: needs ~{gib(e.central_mb)} GiB"
        elif e.peak_mb > sup.budget_mb:
            note = "runs alone"
        table.add_row(str(i), job.rel, "-" if job.info.audio_seconds is None else f"{job.info.audio_seconds:.1f}",
                      f"{e.peak_mb:.0f}", f"{e.growth_mb:.0f}", e.source + (" (uncertain)" if e.uncertain else ""),
                      e.features.words() if e.features is not None else "-", note)
    for job in sup.queue:
        if job.state.value in ("skipped", "failed"):
            table.add_row("-", job.rel, "-", "-", "-", "-", "-", job.state.value + (f": {job.reason}" if job.reason else ""))
    console = Console(width=160)
    console.print(table)
    from telemetry.model import describe

    console.print("Memory model: " + "\n  ".join(describe(sup.estimator.predictor.model.params(), sup.estimator.predictor.model.defaults)),
                  highlight=False)
    if order:
        console.print(f"First file: {order[0].estimate.explain}", highlight=False)


def print_summary(summary: RunSummary, sup: Supervisor, log_path: Path | None) -> None:
    c = summary.counts
    line = (f"{c['done']} done, {c['failed']} failed, {c['quarantined']} quarantined, {c['skipped']} skipped"
            f"{', ' + str(c['pending']) + ' not started' if c['pending'] else ''}; "
            f"{sup.kills} kills, {sup.pauses} pauses")
    print(f"batchalign-supervise: {line}", file=sys.stderr)
    if sup.realigned:
        print(f"  re-aligned {len(sup.realigned)} finished file(s) made with other settings "
              f"({sup.realigned[0][1]}); the same settings skip them", file=sys.stderr)
    if summary.halted:
        _err(f"halted: {summary.halted}")
    for rel, state, reason in summary.failures:
        print(f"  {state}: {rel}: {reason}", file=sys.stderr)
    if log_path is not None:
        print(f"  log: {log_path}", file=sys.stderr)
