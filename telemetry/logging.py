"""One structlog configuration per process: a JSON lines file for machines, a console for people.

Every event becomes one JSON object per line with ``event``, ``ts`` (ISO 8601 UTC), ``level``,
``t`` (seconds since the run started), ``run`` and ``process``, then the event's own fields. Each
line goes to the file in a single ``write`` on an ``O_APPEND`` descriptor, so a ``kill -9`` can lose
at most the line being written and never interleaves lines from several writers.

The pipeline is structlog's own: a filtering bound logger for the level, ``add_log_level``,
``TimeStamper`` (``ts``), one processor that stamps ``t``/``run``/``process``, ``format_exc_info``
and ``JSONRenderer`` for the file; the logger at the end of the chain writes each rendered line to
the current sinks, so loggers obtained before a reconfiguration follow it and a second
``configure_logging`` replaces the outputs instead of adding to them. Records from the standard
``logging`` module (libraries' warnings) are forwarded into the same pipeline.
"""

from __future__ import annotations

import json
import logging as _stdlib_logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Literal

import structlog

Console = Literal["plain", "json", "none"]

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
_METHOD_LEVEL = {
    "debug": "debug",
    "info": "info",
    "msg": "info",
    "warning": "warning",
    "warn": "warning",
    "error": "error",
    "exception": "error",
    "critical": "critical",
    "fatal": "critical",
}
_FIRST_KEYS = ("event", "ts", "level", "t", "run", "process")
_CONSOLE_SKIP = {"event", "ts", "level", "process"}


class _FileSink:
    """Appends whole lines with one ``os.write`` each; nothing is buffered in the process."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)

    def write(self, line: str) -> None:
        data = line.encode("utf-8", "replace")
        while data:
            n = os.write(self.fd, data)
            data = data[n:]

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.level = _LEVELS["info"]
        self.file: _FileSink | None = None
        self.console: Console = "plain"
        self.run_id: str | None = None
        self.process = "supervisor"
        self.t0 = time.monotonic()


_state = _State()


def _level_no(level: str | int) -> int:
    if isinstance(level, int):
        return level
    try:
        return _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}") from None


def _ordered(event_dict: dict[str, Any]) -> dict[str, Any]:
    out = {k: event_dict[k] for k in _FIRST_KEYS if k in event_dict}
    out.update((k, v) for k, v in event_dict.items() if k not in out)
    return out


def _json_line(event_dict: dict[str, Any]) -> str:
    return json.dumps(_ordered(event_dict), default=str, ensure_ascii=False, separators=(",", ":")) + "\n"


def _plain_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, str):
        return v if v and not any(c.isspace() or c in "\"=" for c in v) else json.dumps(v, ensure_ascii=False)
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, default=str, ensure_ascii=False, separators=(",", ":"))
    return str(v)


def _plain_line(event_dict: dict[str, Any]) -> str:
    ts = str(event_dict.get("ts", ""))
    clock = ts[11:23] if len(ts) >= 23 else ts
    head = f"{clock} {event_dict.get('level', ''):<7} {event_dict.get('event', '')}"
    rest = " ".join(
        f"{k}={_plain_value(v)}" for k, v in event_dict.items() if k not in _CONSOLE_SKIP and k != "exception"
    )
    line = f"{head} {rest}\n" if rest else f"{head}\n"
    exc = event_dict.get("exception")
    return line + str(exc).rstrip("\n") + "\n" if exc else line


def _write_stderr(line: str) -> None:
    stream = sys.stderr
    if stream is None:
        return
    try:
        stream.write(line)
        stream.flush()
    except (OSError, ValueError):
        pass


def _stamp(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """``t`` since the run started, the run id and the process name (set by configure/bind_run)."""
    st = _state
    event_dict["event"] = str(event_dict.get("event", ""))
    event_dict.setdefault("t", round(time.monotonic() - st.t0, 3))
    if st.run_id is not None:
        event_dict.setdefault("run", st.run_id)
    event_dict.setdefault("process", st.process)
    event_dict.pop("stack_info", None)
    return event_dict


_render_json = structlog.processors.JSONRenderer(
    serializer=lambda d, **kw: json.dumps(_ordered(d), default=str, ensure_ascii=False, separators=(",", ":")))


def _both(_logger: Any, method: str, event_dict: dict[str, Any]) -> tuple[tuple, dict]:
    """Hand the sink logger the event and its JSON line (rendered once, for file and console)."""
    return (event_dict, _render_json(_logger, method, dict(event_dict)) + "\n"), {}


class _SinkLogger:
    """The logger at the end of the chain: writes one event to the current sinks."""

    def _write(self, event_dict: dict[str, Any], line: str) -> None:
        st = _state
        level = event_dict.get("level", "info")
        with st.lock:
            if st.file is not None:
                try:
                    st.file.write(line)
                except OSError:
                    pass
            if st.console == "json":
                _write_stderr(line)
            elif st.console == "plain" or _LEVELS.get(level, 20) >= _LEVELS["warning"]:
                _write_stderr(_plain_line(event_dict))

    debug = info = msg = warning = warn = error = exception = critical = fatal = log = _write


_PROCESSORS = [
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
    _stamp,
    structlog.processors.format_exc_info,
    _both,
]


class _ForwardHandler(_stdlib_logging.Handler):
    """Standard-library records (library warnings) as events in the same sinks."""

    def emit(self, record: _stdlib_logging.LogRecord) -> None:
        try:
            method = record.levelname.lower()
            if method not in _METHOD_LEVEL:
                method = "error" if record.levelno >= 40 else "warning" if record.levelno >= 30 else "info"
            fields: dict[str, Any] = {"logger": record.name, "message": record.getMessage()}
            if record.exc_info:
                fields["exc_info"] = record.exc_info
            getattr(structlog.get_logger(), method)("library_log", **fields)
        except Exception:
            self.handleError(record)


_forward = _ForwardHandler(level=_stdlib_logging.WARNING)
_SINK = _SinkLogger()


def configure_logging(
    *,
    json_path: Path | None,
    console: Console,
    level: str | int = "info",
    run_id: str | None = None,
    process: str = "supervisor",
) -> None:
    """Set this process's log outputs; call at each entry point. Calling again replaces them.

    ``console``: ``plain`` key=value lines on stderr; ``json`` the file's format on stderr (the
    worker, whose stderr the supervisor parses); ``none`` when a live display owns the terminal,
    which still lets warnings and errors through on stderr.
    """
    if console not in ("plain", "json", "none"):
        raise ValueError(f"console must be plain, json or none, not {console!r}")
    new_file = _FileSink(Path(json_path)) if json_path is not None else None
    with _state.lock:
        old_file = _state.file
        _state.file = new_file
        _state.console = console
        _state.level = _level_no(level)
        _state.run_id = run_id
        _state.process = process
        _state.t0 = time.monotonic()
    if old_file is not None:
        old_file.close()
    structlog.configure(
        processors=_PROCESSORS,
        wrapper_class=structlog.make_filtering_bound_logger(_state.level),
        logger_factory=lambda *args: _SINK,
        context_class=dict,
        cache_logger_on_first_use=False,
    )
    root = _stdlib_logging.getLogger()
    if _forward not in root.handlers:
        root.addHandler(_forward)


def bind_run(run_id: str | None, *, t0: float | None = None) -> None:
    """Stamp ``run`` on every later event; ``t`` counts from ``t0`` (a ``time.monotonic()``
    reading, default now) so events line up with the run rather than with process start."""
    with _state.lock:
        _state.run_id = run_id
        _state.t0 = time.monotonic() if t0 is None else t0


def get_logger(name: str | None = None) -> Any:
    """A structlog logger; ``name`` is recorded as ``component`` on its events."""
    # Initial values keep the proxy lazy, so a module-level logger follows later configuration.
    return structlog.get_logger(component=name) if name else structlog.get_logger()


def shutdown_logging() -> None:
    """Close the JSON file (events after this reach only the console)."""
    with _state.lock:
        old, _state.file = _state.file, None
    if old is not None:
        old.close()


def worker_record(line: str) -> tuple[str, str, dict[str, Any]]:
    """A worker's stderr line as the supervisor relays it: (event, level, fields).

    A JSON log record keeps its own event and level under ``worker_event``/``worker_level`` and is
    relayed as a warning when it was one (else at debug); anything else is stray output.
    """
    try:
        rec = json.loads(line)
        if not isinstance(rec, dict):
            raise ValueError
    except ValueError:
        return "worker_output", "debug", {"line": line[:2000]}
    level = str(rec.pop("level", "info"))
    event = rec.pop("event", "log")
    fields = {k: v for k, v in rec.items() if k not in ("worker", "pid", "t", "timestamp", "ts")}
    loud = level in ("warning", "error", "critical")
    return "worker_log", "warning" if loud else "debug", {"worker_event": event, "worker_level": level, **fields}
