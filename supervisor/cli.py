"""Command line: ``batchalign-supervise CORPUS... -o OUT`` plus ``ratios``, ``report`` and ``status``.

Exit status: 0 every file done; 1 some failed or were quarantined (listed at the end); 2 bad usage
or configuration; 3 halted (workers cannot start).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from supervisor.settings import ENGINES, Settings, SettingsError, load_settings
from supervisor.units import parse_size

EXIT_USAGE = 2
COMMANDS = ("run", "ratios", "report", "status")


def _size_option(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def cli_mapping(opts: dict[str, Any]) -> dict[str, Any]:
    """Only the options the user gave, shaped like config.toml."""
    run_keys = {"engine": "engine", "model": "model", "device": "device", "dtype": "dtype", "workers": "workers",
                "max_attempts": "max_attempts", "media_dir": "media_dir", "state_dir": "state_dir",
                "telemetry": "telemetry", "log_json": "log_json", "progress": "progress",
                "start_method": "start_method"}
    out: dict[str, dict[str, Any]] = {}
    for opt, key in run_keys.items():
        if opts.get(opt) is not None:
            out.setdefault("run", {})[key] = str(opts[opt]) if isinstance(opts[opt], Path) else opts[opt]
    for opt, key in (("memory_budget", "budget"), ("reserve", "reserve"), ("poll_interval", "poll_interval")):
        if opts.get(opt) is not None:
            out.setdefault("memory", {})[key] = opts[opt]
    for opt, key in (("watch", "watch"), ("metrics_port", "metrics_port"), ("metrics_textfile", "metrics_textfile"),
                     ("control_socket", "control_socket")):
        if opts.get(opt) is not None:
            out.setdefault("service", {})[key] = str(opts[opt]) if isinstance(opts[opt], Path) else opts[opt]
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Align CHAT corpora with a memory-safe pool of workers.

    The bare form `batchalign-supervise CORPUS... -o OUT` is the same as `run`.
    """


@cli.command("run")
@click.argument("corpus", nargs=-1, type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Folder for the aligned transcripts (mirrors the corpus tree).")
@click.option("--in-place", is_flag=True, help="Rewrite the input transcripts atomically instead of writing to OUT.")
@click.option("--engine", type=click.Choice(ENGINES), help="Alignment engine (default wav2vec).")
@click.option("--model", help="Hugging Face model id or local folder (default per engine).")
@click.option("--device", help="cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), help="Model weights dtype.")
@click.option("--workers", help="Most workers at once: N or auto (one per core; memory decides below that).")
@click.option("--memory-budget", help="Memory the pool may use, e.g. 6GiB or 5000MB (default: limit - reserve).")
@click.option("--reserve", help="Memory kept free for everyone else (default max(10%, 2 GiB)).")
@click.option("--poll-interval", help="How often worker memory is read, e.g. 250ms.")
@click.option("--telemetry", type=click.Path(path_type=Path), help="SQLite telemetry store.")
@click.option("--log-json", type=click.Path(path_type=Path), help="JSON-lines event log (default OUT/batchalign-supervise.log.jsonl).")
@click.option("--config", "config", type=click.Path(path_type=Path), help="config.toml to read.")
@click.option("--max-attempts", type=int, help="Attempts before a file is quarantined (default 3).")
@click.option("--media-dir", type=click.Path(path_type=Path), help="Where media live when not beside the transcripts.")
@click.option("--state-dir", type=click.Path(path_type=Path), help="State folder (default $XDG_STATE_HOME/batchalign-supervise).")
@click.option("--force", is_flag=True, help="Redo files that are already done.")
@click.option("--dry-run", is_flag=True, help="Print each file with its predicted peak memory in run order, and exit.")
@click.option("--watch", type=click.Path(path_type=Path), help="Keep running and align transcripts that land in this folder.")
@click.option("--metrics-port", type=int, help="Serve Prometheus metrics on 127.0.0.1:PORT.")
@click.option("--metrics-textfile", type=click.Path(path_type=Path), help="Write Prometheus metrics to this .prom file.")
@click.option("--control-socket", help="Status socket path, or 'off'.")
@click.option("--progress", type=click.Choice(["auto", "on", "off"]), help="Progress display on a terminal.")
@click.option("--start-method", type=click.Choice(["auto", "spawn", "zygote"]),
              help="Fork workers from a zygote that imported the runtime, or spawn fresh interpreters.")
def run_cmd(corpus: tuple[Path, ...], out: Path | None, in_place: bool, config: Path | None, force: bool,
            dry_run: bool, **opts: Any) -> None:
    """Align every .cha under CORPUS (folders or files)."""
    for key in ("memory_budget", "reserve"):
        if opts.get(key) is not None:
            opts[key] = _size_option(opts[key])
    try:
        settings = load_settings(config=config, cli=cli_mapping(opts))
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None
    watch = settings.service.watch
    if not corpus and not watch:
        raise click.UsageError("give at least one CORPUS folder or file (or --watch INBOX)")
    if in_place and out is not None:
        raise click.UsageError("--in-place and -o/--out exclude each other")
    if not in_place and out is None:
        raise click.UsageError("give -o/--out OUT (or --in-place to rewrite the transcripts)")
    settings.corpus = [Path(watch)] if watch else list(corpus)
    settings.out, settings.in_place, settings.force, settings.dry_run = out, in_place, force, dry_run
    from supervisor.app import run_app

    sys.exit(run_app(settings, reload_cli=cli_mapping(opts)))


@cli.command("ratios")
@click.option("--telemetry", type=click.Path(path_type=Path), help="SQLite telemetry store.")
@click.option("--config", "config", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--reset", is_flag=True, help="Forget what was learned for TARGET (ENGINE or ENGINE/MODEL; all if omitted).")
@click.argument("target", required=False)
def ratios_cmd(telemetry: Path | None, config: Path | None, as_json: bool, reset: bool, target: str | None) -> None:
    """The learned memory model per engine/model/device, with sample counts and its terms in words."""
    settings = _settings_or_exit(config, {"run": {"telemetry": str(telemetry)}} if telemetry else {})
    from telemetry.model import describe
    from telemetry.store import TelemetryStore

    path = settings.telemetry_path
    if not path.exists():
        click.echo(f"no telemetry store at {path} yet: nothing learned", err=True)
        sys.exit(0)
    if target is not None and not reset:
        raise click.UsageError("TARGET is only used with --reset")
    if reset:
        engine, _, model = (target or "").partition("/")
        with TelemetryStore(path) as store:
            n = store.reset_model(engine or None, model or None)
        click.echo(f"forgot {n} learned model{'s' if n != 1 else ''} for {target or 'every engine'} in {path}")
        return
    with TelemetryStore(path) as store:
        rows = store.ratios()
        for r in rows:
            r["explain"] = describe(store.load_model(r["engine"], r["model"], r["device"]))
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Learned memory model ({path})")
    for col in ("engine", "model", "device", "samples", "intercept MiB", "MiB / span s", "MiB / further audio s",
                "baseline MiB", "updated"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r.get("engine")), str(r.get("model")), str(r.get("device")), str(r.get("samples")),
                      _num(r.get("intercept_mb")), _num(r.get("mb_per_span_second"), 2),
                      _num(r.get("mb_per_audio_second"), 3), _num(r.get("baseline_mb")), str(r.get("updated_at") or ""))
    console = Console()
    console.print(table)
    for r in rows:
        console.print(f"{r['engine']} / {r['model']} / {r['device']}:\n  " + "\n  ".join(r["explain"]), highlight=False)


def _num(v: Any, digits: int = 0) -> str:
    return "-" if v is None else f"{float(v):.{digits}f}"


@cli.command("report")
@click.argument("log", required=False, type=click.Path(path_type=Path))
@click.option("--telemetry", type=click.Path(path_type=Path), help="Summarise the telemetry store instead of a log.")
@click.option("--run", "run_id", help="Which run in the log (default: the last).")
@click.option("--sort", type=click.Choice(["peak", "time", "file"]), default="peak", show_default=True)
@click.option("--limit", type=int, help="Rows in the per-file table.")
@click.option("--plot", type=click.Path(path_type=Path), help="Also draw memory over time and peak vs length to this PNG.")
def report_cmd(log: Path | None, telemetry: Path | None, run_id: str | None, sort: str, limit: int | None,
               plot: Path | None) -> None:
    """Summarise a JSON log (or the telemetry store): files, kills, pauses, throughput, worst files."""
    from telemetry import report

    if log is None:
        settings = _settings_or_exit(None, {"run": {"telemetry": str(telemetry)}} if telemetry else {})
        from telemetry.store import TelemetryStore

        if not settings.telemetry_path.exists():
            raise click.UsageError(f"no telemetry store at {settings.telemetry_path}")
        with TelemetryStore(settings.telemetry_path) as store:
            click.echo(report.summarize_store(store.summary(run_id)))
        return
    if not log.exists():
        raise click.UsageError(f"{log}: no such log file")
    events = report.select_run(report.load_events(log), run_id)
    click.echo(report.render_text(report.summarize(events), sort=sort, limit=limit))
    if plot is not None:
        report.plot(events, plot)
        click.echo(f"plot written to {plot}")


@cli.command("status")
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), help="Control socket (default in the state dir).")
@click.option("--state-dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def status_cmd(socket_path: Path | None, state_dir: Path | None, as_json: bool) -> None:
    """Ask a running supervisor what it is doing."""
    from supervisor.control import default_socket_path, format_status, query_status

    if socket_path is None:
        settings = _settings_or_exit(None, {"run": {"state_dir": str(state_dir)}} if state_dir else {})
        socket_path = Path(settings.service.control_socket) if settings.service.control_socket not in ("", "off") \
            else default_socket_path(settings.state_dir)
    try:
        status = query_status(socket_path)
    except (OSError, ConnectionError, TimeoutError) as exc:
        click.echo(f"batchalign-supervise status: {exc}", err=True)
        sys.exit(1)
    click.echo(json.dumps(status, indent=2) if as_json else format_status(status))


def _settings_or_exit(config: Path | None, cli_map: dict) -> Settings:
    try:
        return load_settings(config=config, cli=cli_map)
    except SettingsError as exc:
        click.echo(f"batchalign-supervise: {exc}", err=True)
        sys.exit(EXIT_USAGE)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] not in COMMANDS and args[0] not in ("-h", "--help"):
        args = ["run", *args]
    cli.main(args=args, prog_name="batchalign-supervise")


if __name__ == "__main__":
    main()
