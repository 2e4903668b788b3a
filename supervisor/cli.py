"""Command line: ``batchalign-supervise CORPUS... -o OUT`` plus ``models``, ``cache``, ``ratios``,
``report`` and ``status``.

Exit status: 0 every file done; 1 some failed or were quarantined (listed at the end); 2 bad usage,
configuration, or an output/corpus that cannot be used; 3 halted (the model cannot be had or
loaded, workers cannot start); 4 interrupted with files left (re-running finishes them).
Every error is one line on stderr. Tables go to a terminal as aligned columns and anywhere else as
tab-separated lines that are never cut; ``--json`` gives every command's answer as JSON.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import click

from supervisor import __version__
from supervisor.settings import ENGINES, Settings, SettingsError, load_settings
from supervisor.units import parse_duration, parse_size

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_HALTED, EXIT_INTERRUPTED = 0, 1, 2, 3, 4
COMMANDS = ("run", "models", "cache", "ratios", "report", "status", "worker")
PROG = "batchalign-supervise"
DEFAULT_LOG = "batchalign-supervise.log.jsonl"  # what a run writes in OUT unless --log-json says otherwise


class Failure(click.ClickException):
    """A one-line error with its own exit status."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = code


# -- option values -----------------------------------------------------------------------------

def _size_value(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a size; give e.g. 6GiB, 5000MB or 512M", ctx, param) from None


def _duration_value(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        parse_duration(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a duration; e.g. 250ms, 30s, 5m", ctx, param) from None
    return value


def _workers_value(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None or value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise click.BadParameter(f"{value!r} is not a positive integer or 'auto'", ctx, param)
    return value


def cli_mapping(opts: dict[str, Any]) -> dict[str, Any]:
    """Only the options the user gave, shaped like config.toml."""
    run_keys = {"engine": "engine", "model": "model", "device": "device", "dtype": "dtype", "workers": "workers",
                "max_attempts": "max_attempts", "media_dir": "media_dir", "state_dir": "state_dir",
                "telemetry": "telemetry", "log_json": "log_json", "progress": "progress",
                "start_method": "start_method", "model_store": "model_store",
                "model_server": "model_server"}
    out: dict[str, dict[str, Any]] = {}
    for opt, key in run_keys.items():
        if opts.get(opt) is not None:
            out.setdefault("run", {})[key] = str(opts[opt]) if isinstance(opts[opt], Path) else opts[opt]
    for opt, key in (("memory_budget", "budget"), ("reserve", "reserve"), ("poll_interval", "poll_interval"),
                     ("vram_budget", "vram_budget")):
        if opts.get(opt) is not None:
            out.setdefault("memory", {})[key] = opts[opt]
    for opt, key in (("watch", "watch"), ("metrics_port", "metrics_port"), ("metrics_textfile", "metrics_textfile"),
                     ("control_socket", "control_socket")):
        if opts.get(opt) is not None:
            out.setdefault("service", {})[key] = str(opts[opt]) if isinstance(opts[opt], Path) else opts[opt]
    if opts.get("cluster") is not None:
        out.setdefault("cluster", {})["address"] = opts["cluster"]
    return out


def _settings(config: Path | None, cli_map: dict) -> Settings:
    try:
        return load_settings(config=config, cli=cli_map)
    except SettingsError as exc:
        raise Failure(str(exc)) from None


# -- output that survives a pipe ---------------------------------------------------------------

def _tty() -> bool:
    return sys.stdout.isatty()


def when(ts: float | str | None, now: float | None = None, human: bool | None = None) -> str:
    """A time as "5 min ago" on a terminal, else ISO 8601 (UTC); epoch seconds or ISO text in."""
    if ts is None or ts == "":
        return "-"
    if isinstance(ts, str):
        try:
            ts = float(ts)
        except ValueError:
            return ts  # already text (ISO)
    human = _tty() if human is None else human
    if not human:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
    ago = (time.time() if now is None else now) - ts
    if ago < 0:
        return "just now" if ago > -60 else time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))
    for limit, unit, div in ((60, "s", 1), (3600, "min", 60), (86400, "h", 3600), (86400 * 14, "days", 86400)):
        if ago < limit:
            return f"{int(ago // div)} {unit} ago"
    return time.strftime("%Y-%m-%d", time.localtime(ts))


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
    """Aligned columns on a terminal (wrapped, never cut), tab-separated lines otherwise."""
    cells = [["-" if v is None else str(v) for v in r] for r in rows]
    if not _tty():
        return "\n".join("\t".join(r) for r in [list(columns), *cells]) + "\n"
    import io

    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in cells:
        t.add_row(*r)
    import shutil

    console = Console(file=io.StringIO(), width=max(40, shutil.get_terminal_size().columns), highlight=False)
    console.print(t)
    return console.file.getvalue()


def _json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


# -- the group ---------------------------------------------------------------------------------

@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name=PROG, message="%(prog)s %(version)s")
def cli() -> None:
    """Align CHAT corpora with a memory-safe pool of workers.

    The bare form `batchalign-supervise CORPUS... -o OUT` is the same as `run`.
    """


# -- run ---------------------------------------------------------------------------------------

def check_corpus(paths: Sequence[Path]) -> None:
    """Every corpus path exists and can be read; otherwise one line naming it."""
    for p in paths:
        if not p.exists():
            raise Failure(f"corpus {p}: no such file or folder")
        if p.is_dir():
            if not os.access(p, os.R_OK | os.X_OK):
                raise Failure(f"corpus {p}: folder is not readable (permission denied)")
        elif not os.access(p, os.R_OK):
            raise Failure(f"corpus {p}: file is not readable (permission denied)")


def check_output(out: Path) -> None:
    """The output folder exists or can be made, and a file can be created in it."""
    if out.exists() and not out.is_dir():
        raise Failure(f"output {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise Failure(f"output {out}: cannot write there ({exc.strerror or exc})") from None


def resolve_model_for(settings: Settings, check_hub: bool = True) -> None:
    """Set ``settings.resolved_model`` or fail in one line (exit 3) before any worker starts."""
    if settings.engine_name == "synthetic":
        return
    from supervisor.models import ModelError, resolve_model

    try:
        settings.resolved_model = resolve_model(settings.model_id, settings.engine_name, settings.model_store,
                                                check_hub=check_hub)
    except ModelError as exc:
        raise Failure(str(exc), EXIT_HALTED) from None


@cli.command("run")
@click.argument("corpus", nargs=-1, type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Folder for the aligned transcripts (mirrors the corpus tree).")
@click.option("--in-place", is_flag=True, help="Rewrite the input transcripts atomically instead of writing to OUT.")
@click.option("--engine", type=click.Choice(ENGINES), help="Alignment engine (default wav2vec).")
@click.option("--model", help="Model store name, Hugging Face model id or local folder (default per engine).")
@click.option("--model-store", type=click.Path(path_type=Path), help="Model store folder (default $XDG_DATA_HOME/batchalign-supervise/models).")
@click.option("--device", help="cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), help="Model weights dtype.")
@click.option("--workers", callback=_workers_value, help="Most workers at once: N or auto (one per core; memory decides below that).")
@click.option("--memory-budget", callback=_size_value, help="Memory the pool may use, e.g. 6GiB or 5000MB (default: limit - reserve).")
@click.option("--reserve", callback=_size_value, help="Memory kept free for everyone else (default max(10%, 2 GiB)).")
@click.option("--vram-budget", callback=_size_value, help="GPU memory the pool may use on a CUDA run (default: device - reserve).")
@click.option("--model-server", type=click.Choice(["auto", "on", "off"]),
              help="One model copy per GPU in a server process that CPU workers send spans to (auto: on for cuda).")
@click.option("--poll-interval", callback=_duration_value, help="How often worker memory is read, e.g. 250ms.")
@click.option("--telemetry", type=click.Path(path_type=Path), help="SQLite telemetry store.")
@click.option("--log-json", type=click.Path(path_type=Path), help="JSON-lines event log (default OUT/batchalign-supervise.log.jsonl).")
@click.option("--config", "config", type=click.Path(path_type=Path), help="config.toml to read.")
@click.option("--max-attempts", type=click.IntRange(min=1), help="Attempts before a file is quarantined (default 3).")
@click.option("--media-dir", type=click.Path(path_type=Path), help="Where media live when not beside the transcripts.")
@click.option("--state-dir", type=click.Path(path_type=Path), help="State folder (default $XDG_STATE_HOME/batchalign-supervise).")
@click.option("--force", is_flag=True, help="Redo files that are already done.")
@click.option("--dry-run", is_flag=True, help="Print each file with its predicted peak memory in run order, and exit.")
@click.option("--watch", type=click.Path(path_type=Path), help="Keep running and align transcripts that land in this folder.")
@click.option("--metrics-port", type=click.IntRange(min=0, max=65535), help="Serve Prometheus metrics on 127.0.0.1:PORT.")
@click.option("--metrics-textfile", type=click.Path(path_type=Path), help="Write Prometheus metrics to this .prom file.")
@click.option("--control-socket", help="Status socket path, or 'off'.")
@click.option("--progress", type=click.Choice(["auto", "on", "off"]), help="Progress display on a terminal.")
@click.option("--start-method", type=click.Choice(["auto", "spawn", "zygote"]),
              help="Fork workers from a zygote that imported the runtime, or spawn fresh interpreters.")
@click.option("--json", "as_json", is_flag=True, help="Print the run's summary as JSON on stdout at the end.")
@click.option("--cluster", help="Run on Dask: tcp://HOST:PORT (a running scheduler), local (a LocalCluster) or "
                               "slurm (dask-jobqueue, [cluster.slurm] in config.toml).")
def run_cmd(corpus: tuple[Path, ...], out: Path | None, in_place: bool, config: Path | None, force: bool,
            dry_run: bool, as_json: bool, **opts: Any) -> None:
    """Align every .cha under CORPUS (folders or files)."""
    settings = _settings(config, cli_mapping(opts))
    watch = settings.service.watch
    if not corpus and not watch:
        raise click.UsageError("give at least one CORPUS folder or file (or --watch INBOX)")
    if in_place and out is not None:
        raise click.UsageError("--in-place and -o/--out exclude each other")
    if not in_place and out is None:
        raise click.UsageError("give -o/--out OUT (or --in-place to rewrite the transcripts)")
    check_corpus([Path(watch)] if watch else list(corpus))
    if settings.run.media_dir and not Path(settings.run.media_dir).is_dir():
        # every file would fail on its own for want of media: say the cause once, before anything runs
        raise click.UsageError(f"media folder {settings.run.media_dir} (--media-dir / run.media_dir): no such folder")
    if out is not None and not dry_run:
        check_output(out)
    settings.corpus = [Path(watch)] if watch else list(corpus)
    settings.out, settings.in_place, settings.force, settings.dry_run = out, in_place, force, dry_run
    resolve_model_for(settings, check_hub=not dry_run)
    if settings.engine_name == "synthetic" and not dry_run:
        click.echo(f"{PROG}: --engine synthetic writes made-up timings (marked in each output) for testing "
                   "the scheduler; they are not an alignment", err=True)
    from supervisor.app import run_app

    code = run_app(settings, reload_cli=cli_mapping(opts))
    if code == EXIT_INTERRUPTED:
        click.echo(f"{PROG}: interrupted with files left; re-run the same command to finish them "
                   "(finished files are skipped)", err=True)
    if as_json and not dry_run:
        _json(_last_summary(settings.log_path) or {"exit_code": code})
    sys.exit(code)


def _last_summary(log: Path) -> dict | None:
    from telemetry.report import load_events

    try:
        evs = [e for e in load_events(log) if e.get("event") == "run_finished"]
    except OSError:
        return None
    return evs[-1] if evs else None


# -- models ------------------------------------------------------------------------------------

def _store_option(f: Callable) -> Callable:
    f = click.option("--model-store", type=click.Path(path_type=Path), help="Model store folder.")(f)
    return click.option("--config", "config", type=click.Path(path_type=Path))(f)


def _store(config: Path | None, model_store: Path | None) -> Path:
    return _settings(config, {"run": {"model_store": str(model_store)}} if model_store else {}).model_store


@cli.group("models")
def models_group() -> None:
    """Models a run can use: the model store and the Hugging Face cache."""


@models_group.command("list")
@_store_option
@click.option("--json", "as_json", is_flag=True)
def models_list(config: Path | None, model_store: Path | None, as_json: bool) -> None:
    """Known models and whether each is on this machine."""
    from supervisor.models import list_models

    store = _store(config, model_store)
    rows = list_models(store)
    if as_json:
        _json(rows)
        return
    click.echo(table(["name", "engine", "state", "size MiB", "source", "path"],
                     [[r["name"], r["engine"], r["state"], r["size_mb"], r["source"], r["path"] or "-"] for r in rows],
                     title=f"Models (store: {store})"), nl=False)


@models_group.command("pull")
@click.argument("name")
@_store_option
@click.option("--json", "as_json", is_flag=True)
def models_pull(name: str, config: Path | None, model_store: Path | None, as_json: bool) -> None:
    """Get NAME onto this machine (once): into the store, or the hub cache for hub models."""
    from supervisor.models import ModelError, pull

    store = _store(config, model_store)
    try:
        path = pull(name, store, say=lambda m: click.echo(f"{PROG}: {m}", err=True))
    except ModelError as exc:
        raise Failure(str(exc), EXIT_FAILED) from None
    if as_json:
        _json({"name": name, "path": str(path)})
    else:
        click.echo(str(path))


@models_group.command("path")
@click.argument("name")
@_store_option
def models_path(name: str, config: Path | None, model_store: Path | None) -> None:
    """Print the folder a model loads from (for scripts)."""
    from supervisor.models import CATALOG, ModelError, resolve_model

    store = _store(config, model_store)
    src = CATALOG.get(name)
    try:
        r = resolve_model(name, src.engine if src else "whisper", store, check_hub=False)
    except ModelError as exc:
        raise Failure(str(exc)) from None
    if r.kind == "hub":
        from supervisor.models import hub_cached

        cached = hub_cached(r.location)
        if cached is None:
            raise Failure(f"{name} is not on this machine; run `{PROG} models pull {name}`")
        click.echo(str(cached))
    else:
        click.echo(r.location)


@models_group.command("verify")
@click.argument("names", nargs=-1)
@_store_option
@click.option("--json", "as_json", is_flag=True)
def models_verify(names: tuple[str, ...], config: Path | None, model_store: Path | None, as_json: bool) -> None:
    """Check pulled models' files against the sha256 recorded when they were pulled (all if none named)."""
    from supervisor.models import list_models, verify

    store = _store(config, model_store)
    names = names or tuple(r["name"] for r in list_models(store) if r["state"] == "pulled")
    results = {n: verify(n, store) for n in names}
    if as_json:
        _json([{"name": n, "ok": not p, "problems": p} for n, p in results.items()])
    else:
        for n, problems in results.items():
            if problems:
                for p in problems:
                    click.echo(f"{PROG}: {p}", err=True)
            else:
                click.echo(f"{n}: ok")
    if any(results.values()):
        sys.exit(EXIT_FAILED)


# -- cache -------------------------------------------------------------------------------------

@cli.group("cache", invoke_without_command=True)
@click.option("--state-dir", type=click.Path(path_type=Path))
@click.option("--config", "config", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def cache_group(ctx: click.Context, state_dir: Path | None, config: Path | None, as_json: bool) -> None:
    """Show the result and audio caches (size, entries, age); `cache clear` empties them."""
    settings = _settings(config, {"run": {"state_dir": str(state_dir)}} if state_dir else {})
    ctx.obj = settings
    if ctx.invoked_subcommand is not None:
        return
    from supervisor.cache import stats

    rows = stats(settings.cache_dir)
    if as_json:
        _json({"path": str(settings.cache_dir), "max_bytes": settings.run.cache_max,
               "parts": [r.to_dict() for r in rows]})
        return
    bound = "unbounded" if settings.run.cache_max is None else f"{settings.run.cache_max / 2**20:.0f} MiB"
    click.echo(table(["part", "entries", "MiB", "oldest", "newest", "path"],
                     [[r.part, r.entries, f"{r.bytes / 2**20:.1f}", when(r.oldest), when(r.newest), r.path]
                      for r in rows], title=f"Cache (at most {bound})"), nl=False)


@cache_group.command("clear")
@click.option("--part", type=click.Choice(["results", "audio", "all"]), default="all", show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def cache_clear(settings: Settings, part: str, as_json: bool) -> None:
    """Delete cached word times and/or converted audio (always safe; they are made again)."""
    from supervisor.cache import PARTS, clear

    freed = clear(settings.cache_dir, PARTS if part == "all" else (part,))
    if as_json:
        _json({"freed_bytes": freed, "path": str(settings.cache_dir)})
    else:
        click.echo(f"freed {freed / 2**20:.1f} MiB in {settings.cache_dir}")


# -- ratios ------------------------------------------------------------------------------------

@cli.command("ratios")
@click.option("--telemetry", type=click.Path(path_type=Path), help="SQLite telemetry store.")
@click.option("--config", "config", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--reset", is_flag=True, help="Forget what was learned for TARGET (ENGINE or ENGINE/MODEL; all if omitted).")
@click.argument("target", required=False)
def ratios_cmd(telemetry: Path | None, config: Path | None, as_json: bool, reset: bool, target: str | None) -> None:
    """The learned memory model per engine/model/device, with sample counts and its terms in words."""
    settings = _settings(config, {"run": {"telemetry": str(telemetry)}} if telemetry else {})
    from telemetry.model import describe

    path = settings.telemetry_path
    if not path.exists():
        if as_json:
            _json([])
        click.echo(f"no telemetry store at {path} yet: nothing learned", err=True)
        sys.exit(0)
    if target is not None and not reset:
        raise click.UsageError("TARGET is only used with --reset")
    if reset:
        engine, _, model = (target or "").partition("/")
        with _telemetry(path) as store:
            n = store.reset_model(engine or None, model or None)
        click.echo(f"forgot {n} learned model{'s' if n != 1 else ''} for {target or 'every engine'} in {path}")
        return
    with _telemetry(path) as store:
        rows = store.ratios()
        for r in rows:
            r["explain"] = describe(store.load_model(r["engine"], r["model"], r["device"]))
    if as_json:
        _json(rows)
        return
    click.echo(table(
        ["engine", "model", "device", "samples", "intercept MiB", "MiB/span s", "MiB/further audio s",
         "baseline MiB", "updated"],
        [[r.get("engine"), r.get("model"), r.get("device"), r.get("samples"), _num(r.get("intercept_mb")),
          _num(r.get("mb_per_span_second"), 2), _num(r.get("mb_per_audio_second"), 3), _num(r.get("baseline_mb")),
          when(r.get("updated_at"))] for r in rows],
        title=f"Learned memory model ({path})"), nl=False)
    for r in rows:
        click.echo(f"{r['engine']} / {r['model']} / {r['device']}:\n  " + "\n  ".join(r["explain"]))


@contextmanager
def _telemetry(path: Path) -> Iterator[Any]:
    """The telemetry store at ``path``; one that cannot be opened or read (not a database, a
    folder, damaged) is a one-line error naming it, not a traceback."""
    import sqlite3

    from telemetry.store import TelemetryStore

    try:
        with TelemetryStore(path) as store:
            yield store
    except sqlite3.Error as exc:
        raise Failure(f"{path}: cannot read the telemetry store: {exc}") from None


def _num(v: Any, digits: int = 0) -> str:
    return "-" if v is None else f"{float(v):.{digits}f}"


# -- report ------------------------------------------------------------------------------------

@cli.command("report")
@click.argument("log", required=False, type=click.Path(path_type=Path))
@click.option("--telemetry", type=click.Path(path_type=Path), help="Summarise the telemetry store instead of a log.")
@click.option("--run", "run_id", help="Which run in the log: its id, or 'last' (default: the last that did work).")
@click.option("--runs", "list_runs", is_flag=True, help="List the runs in the log and exit.")
@click.option("--sort", type=click.Choice(["peak", "time", "file"]), default="peak", show_default=True)
@click.option("--limit", type=click.IntRange(min=0), help="Rows in the per-file table.")
@click.option("--plot", type=click.Path(path_type=Path), help="Also draw memory over time and peak vs length to this PNG.")
@click.option("--json", "as_json", is_flag=True)
def report_cmd(log: Path | None, telemetry: Path | None, run_id: str | None, list_runs: bool, sort: str,
               limit: int | None, plot: Path | None, as_json: bool) -> None:
    """Summarise a JSON log (or the telemetry store): files, kills, pauses, throughput, worst files."""
    from telemetry import report

    if log is None:
        settings = _settings(None, {"run": {"telemetry": str(telemetry)}} if telemetry else {})
        if not settings.telemetry_path.exists():
            raise Failure(f"no telemetry store at {settings.telemetry_path}")
        with _telemetry(settings.telemetry_path) as store:
            summary = store.summary(run_id)
        if as_json:
            _json(summary)
        else:
            click.echo(report.summarize_store(summary))
        return
    if log.is_dir():  # an output folder: the log a run writes there by default
        if not (log / DEFAULT_LOG).is_file():
            raise Failure(f"{log}: a folder with no {DEFAULT_LOG} in it; give the log file")
        log = log / DEFAULT_LOG
    if not log.is_file():
        raise Failure(f"{log}: no such log file")
    try:
        all_events = report.load_events(log)
    except OSError as exc:
        raise Failure(f"{log}: cannot read: {exc.strerror or exc}") from None
    infos = report.run_infos(all_events)
    if list_runs:
        if as_json:
            _json(infos)
        else:
            click.echo(table(["run", "started", "files", "done", "failed", "skipped", "exit"],
                             [[i["run"], i["started"] or "-", i["files"], i["done"], i["failed"], i["skipped"],
                               "-" if i["exit_code"] is None else i["exit_code"]] for i in infos]), nl=False)
        return
    chosen = report.choose_run(infos, run_id)
    if chosen is None:
        known = ", ".join(i["run"] for i in infos) or "none"
        raise Failure(f"{log}: no run {run_id!r} (runs: {known})" if run_id else f"{log}: no runs in this log")
    events = report.select_run(all_events, chosen)
    rep = report.summarize(events)
    if as_json:
        _json(report.to_dict(rep))
    else:
        others = [i["run"] for i in infos if i["run"] != chosen]
        if others:
            click.echo(f"run {chosen} ({len(infos)} runs in this log; `--runs` lists them, `--run ID` picks one)")
        click.echo(report.render_text(rep, sort=sort, limit=limit))
    if plot is not None:
        report.plot(events, plot)
        click.echo(f"plot written to {plot}", err=as_json)


# -- status ------------------------------------------------------------------------------------

@cli.command("status")
@click.argument("target", required=False)
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), help="One supervisor's control socket.")
@click.option("--state-dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def status_cmd(target: str | None, socket_path: Path | None, state_dir: Path | None, as_json: bool) -> None:
    """Ask running supervisors what they are doing: all of them, or TARGET (a pid or output folder)."""
    from supervisor.control import ControlError, format_list, format_status, query_all, query_status, select

    if socket_path is not None:
        try:
            statuses = [query_status(socket_path)]
        except ControlError as exc:
            raise Failure(str(exc), EXIT_FAILED) from None
    else:
        settings = _settings(None, {"run": {"state_dir": str(state_dir)}} if state_dir else {})
        statuses = query_all(settings.state_dir, elsewhere=target is not None)  # one named: look everywhere
        if settings.service.control_socket not in ("", "off"):
            try:
                statuses.append(query_status(Path(settings.service.control_socket)))
            except ControlError:
                pass
        if not statuses:
            raise Failure(f"no supervisor is running (no live socket under {settings.state_dir / 'control'})",
                          EXIT_FAILED)
        if target is not None:
            statuses = select(statuses, target)
            if not statuses:
                raise Failure(f"no running supervisor has pid or output folder {target}", EXIT_FAILED)
    if as_json:
        _json(statuses[0] if target is not None or socket_path is not None or len(statuses) == 1 else statuses)
    elif len(statuses) == 1:
        click.echo(format_status(statuses[0]), nl=False)
    else:
        click.echo(format_list(statuses), nl=False)


@cli.command("worker", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                         "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def worker_cmd(args: tuple[str, ...]) -> None:
    """Dask worker processes for alignment: SCHEDULER [--memory-limit SIZE] [--nworkers N] [--engine E].

    Run `batchalign-supervise worker --help` for every option (needs the 'cluster' extra).
    """
    from supervisor.cluster.worker import main as worker_main

    sys.exit(worker_main(list(args)))


# -- entry -------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] not in COMMANDS and args[0] not in ("-h", "--help", "-V", "--version"):
        args = ["run", *args]
    try:
        rv = cli.main(args=args, prog_name=PROG, standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo(f"{PROG}: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare group: its help is the answer
            click.echo(exc.ctx.get_help() if getattr(exc, "ctx", None) else str(exc))
            sys.exit(EXIT_USAGE)
        message = " ".join(exc.format_message().split())
        click.echo(f"{PROG}: {message}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
