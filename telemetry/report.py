"""Read a run's JSON-lines log (or the telemetry store's summary) and turn it into tables and a plot.

The log is the record that survives anything: a supervisor killed with ``kill -9`` leaves a
half-written last line and no ``run_finished``, and a restarted service appends its next run to the
same file, gluing its first line onto the broken one. Reading is therefore forgiving line by line,
and every summary works on a run that never finished.

Text goes through rich tables rendered into a string without colour, so the same output reads well
in a terminal, in ``journalctl`` and in an e-mail. Figures use matplotlib's Agg backend, which
needs no display on a headless server.
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from rich import box as _box
from rich.console import Console
from rich.table import Table
from supervisor.units import format_count, format_duration, format_mib

__all__ = [
    "EventList",
    "FileRow",
    "KillRow",
    "PauseRow",
    "PredictionStats",
    "Report",
    "load_events",
    "plot",
    "render_text",
    "runs",
    "select_run",
    "choose_run",
    "run_infos",
    "summarize",
    "summarize_store",
    "to_dict",
]

OUTCOMES = ("done", "failed", "quarantined", "running", "pending", "killed")
# Engines tag an alignment they do not believe (no speech, all words at the minimum length, words
# squeezed into a sliver of the bullet) with this word; the original bullet is kept.
IMPLAUSIBLE = re.compile(r"(^|: )implausible:")
SORTS = ("peak", "time", "file")

# A header rule of dashes and nothing else: survives journald, mail and terminals without UTF-8.
_PLAIN = _box.Box("    \n    \n -  \n    \n    \n    \n    \n    \n", ascii=True)


class EventList(list):
    """A list of events that remembers how many lines of the log could not be read.

    ``skipped_lines`` counts lines that were not a JSON object (a truncated tail after ``kill -9``,
    binary garbage); ``recovered`` counts events salvaged from the end of such a line, which is
    where a restarted run's first event lands when it is appended to a truncated log.
    """

    skipped_lines: int = 0
    recovered: int = 0


@dataclass
class FileRow:
    """One transcript's fate in the run.

    ``outcome`` is ``done``, ``failed``, ``quarantined``, or, for a log that ended first,
    ``running`` (admitted, no result yet), ``pending`` (requeued, not admitted again) or ``killed``
    (its worker was killed and nothing else was logged). ``peak_mb`` is the reported peak of a
    finished file, otherwise the highest usage observed (kill, requeue, quarantine or samples);
    ``wall_s`` of a running file is the time it had been running when the log ended.
    """

    file: str
    outcome: str
    attempts: int = 0
    audio_seconds: float | None = None
    peak_mb: float | None = None
    predicted_mb: float | None = None
    wall_s: float | None = None
    worker: Any = None
    reason: str | None = None
    kills: int = 0
    vram_peak_mb: float | None = None  # GPU runs only
    vram_predicted_mb: float | None = None

    @property
    def error_mb(self) -> float | None:
        """Observed peak minus prediction: positive means the model under-predicted."""
        if self.peak_mb is None or self.predicted_mb is None:
            return None
        return self.peak_mb - self.predicted_mb


@dataclass
class KillRow:
    """A worker killed by the supervisor, with the figures it decided on."""

    t: float | None
    worker: Any
    pid: int | None
    file: str | None
    reason: str | None
    uss_mb: float | None
    used_mb: float | None
    budget_mb: float | None
    predicted_mb: float | None
    audio_seconds: float | None = None


@dataclass
class PauseRow:
    """A worker stopped with SIGSTOP to let memory settle; ``end_t`` is None if never resumed."""

    t: float | None
    worker: Any
    pid: int | None
    file: str | None
    reason: str | None
    used_mb: float | None
    budget_mb: float | None
    end_t: float | None = None
    paused_s: float | None = None
    resumed: bool = False


@dataclass
class PredictionStats:
    """How the learned memory model did on the files that finished.

    Errors are observed peak minus predicted peak in MiB; under-predictions are the ones that
    cost pauses and kills, over-predictions cost parallelism.
    """

    n: int = 0
    mean_error_mb: float | None = None
    mean_abs_error_mb: float | None = None
    p50_abs_error_mb: float | None = None
    p90_abs_error_mb: float | None = None
    max_abs_error_mb: float | None = None
    under_predicted: int = 0
    worst_under: list[FileRow] = field(default_factory=list)
    killed_attempts: int = 0
    killed_over_prediction: int = 0


@dataclass
class Report:
    """Everything ``render_text`` shows, computed once from one run's events."""

    run: str | None = None
    started_ts: str | None = None
    corpus: str | None = None
    out: str | None = None
    engine: str | None = None
    model: str | None = None
    device: str | None = None
    limit_mb: float | None = None
    budget_mb: float | None = None
    reserve_mb: float | None = None
    limit_source: str | None = None
    planned_files: int | None = None
    finished: bool = False
    exit_code: int | None = None
    wall_s: float = 0.0
    last_t: float = 0.0
    files: list[FileRow] = field(default_factory=list)
    kills: list[KillRow] = field(default_factory=list)
    pauses: list[PauseRow] = field(default_factory=list)
    quarantined: list[FileRow] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=dict)
    audio_seconds_done: float = 0.0
    throughput_audio_h_per_h: float | None = None
    prediction: PredictionStats = field(default_factory=PredictionStats)
    max_used_mb: float | None = None
    max_used_t: float | None = None
    workers_spawned: int = 0
    drain: tuple[float | None, str | None] | None = None
    reloads: list[tuple[float | None, dict]] = field(default_factory=list)
    skipped_lines: int = 0
    recovered_lines: int = 0
    run_finished: dict | None = None
    warnings: int = 0  # per-utterance warnings logged (at most 20 per file)
    implausible: list[tuple[str, str]] = field(default_factory=list)  # (file, warning) flagged implausible
    implausible_utterances: int = 0  # from the files' stats: every flagged utterance, even unlogged ones
    vram_budget_mb: float | None = None  # GPU runs only: the VRAM budget, the device, the highest use
    vram_total_mb: float | None = None
    max_vram_used_mb: float | None = None
    cuda_ooms: int = 0


# --------------------------------------------------------------------------------------------
# reading


def _salvage(line: str) -> dict | None:
    """The last complete JSON object at the end of a garbled line, if there is one.

    After ``kill -9`` the log ends mid-object without a newline; the next run's first event is
    appended right after it. Trying each ``{`` from the left finds that glued event.
    """
    start = line.find("{", 1)
    tries = 0
    while start != -1 and tries < 64:
        tries += 1
        try:
            obj = json.loads(line[start:])
        except ValueError:
            start = line.find("{", start + 1)
            continue
        if isinstance(obj, dict) and "event" in obj:
            return obj
        start = line.find("{", start + 1)
    return None


def load_events(path: str | Path) -> EventList:
    """All events in a JSON-lines log, in file order.

    Blank lines are ignored; a line that is not a JSON object is counted in ``skipped_lines`` and
    never raises, so logs of crashed runs can always be read.
    """
    events = EventList()
    with open(path, "r", encoding="utf-8", errors="replace") as fh:
        for raw in fh:
            line = raw.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                events.append(obj)
                continue
            events.skipped_lines += 1
            salvaged = _salvage(line)
            if salvaged is not None:
                events.append(salvaged)
                events.recovered += 1
    return events


def runs(events: Iterable[dict]) -> list[str]:
    """Run ids in the order they first appear."""
    seen: dict[str, None] = {}
    for ev in events:
        run = ev.get("run")
        if run is not None and run not in seen:
            seen[str(run)] = None
    return list(seen)


def select_run(events: list[dict], run: str | None = None) -> EventList:
    """The events of one run: the last run in the log unless ``run`` names another.

    Raises ValueError for a run id the log does not contain, listing the ones it does.
    """
    out = EventList()
    out.skipped_lines = getattr(events, "skipped_lines", 0)
    out.recovered = getattr(events, "recovered", 0)
    ids = runs(events)
    if not ids:
        out.extend(events)
        return out
    if run is None:
        run = ids[-1]
    elif run not in ids:
        raise ValueError(f"run {run!r} is not in this log; runs: {', '.join(ids)}")
    out.extend(ev for ev in events if str(ev.get("run")) == run)
    return out


_WORK = ("file_admitted", "file_done", "file_failed", "file_quarantined")


def run_infos(events: Iterable[dict]) -> list[dict[str, Any]]:
    """One line per run in the log, in order: id, start, file counts, exit code, whether it did work."""
    infos: dict[str, dict[str, Any]] = {}
    for ev in events:
        run = ev.get("run")
        if run is None:
            continue
        i = infos.setdefault(str(run), {"run": str(run), "started": None, "files": None, "done": 0, "failed": 0,
                                        "skipped": 0, "exit_code": None, "did_work": False})
        kind = ev.get("event")
        if kind == "run_started":
            i["started"], i["files"] = ev.get("ts"), ev.get("files")
        elif kind == "file_done":
            i["done"] += 1
        elif kind in ("file_failed", "file_quarantined"):
            i["failed"] += 1
        elif kind == "file_skipped":
            i["skipped"] += 1
        elif kind == "run_finished":
            i["exit_code"] = ev.get("exit_code")
        if kind in _WORK:
            i["did_work"] = True
    return list(infos.values())


def choose_run(infos: list[dict[str, Any]], run: str | None = None) -> str | None:
    """``run`` if the log has it ("last": the last run), else the last run that did work (a resume
    that only skipped finished files is not what anyone wants to see), else the last run."""
    ids = [i["run"] for i in infos]
    if not ids:
        return None
    if run == "last":
        return ids[-1]
    if run is not None:
        matches = [r for r in ids if r == run or r.endswith(run)]
        return matches[-1] if matches else None
    worked = [i["run"] for i in infos if i["did_work"]]
    return worked[-1] if worked else ids[-1]


# --------------------------------------------------------------------------------------------
# summarizing


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _max(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


class _Fold:
    """Folds one run's events into a Report, one small handler per event kind."""

    def __init__(self, events: list[dict]) -> None:
        self.rep = Report(skipped_lines=getattr(events, "skipped_lines", 0),
                          recovered_lines=getattr(events, "recovered", 0))
        self.rows: dict[str, FileRow] = {}
        self.admitted_t: dict[str, float | None] = {}
        self.sample_peak: dict[str, float] = {}
        self.open_pauses: dict[Any, PauseRow] = {}
        self.last_t = 0.0
        self.handlers = {
            "run_started": self.run_started, "worker_spawned": self.worker_spawned,
            "file_admitted": self.file_admitted, "file_started": self.file_started, "file_done": self.file_done,
            "file_failed": self.file_failed, "worker_killed": self.worker_killed,
            "file_requeued": self.file_requeued, "file_quarantined": self.file_quarantined,
            "file_skipped": self.file_skipped, "file_warning": self.file_warning,
            "worker_paused": self.worker_paused, "worker_resumed": self.worker_resumed,
            "worker_exited": self.worker_exited, "memory_sample": self.memory_sample,
            "config_reloaded": self.config_reloaded, "drain_started": self.drain_started,
            "run_finished": self.run_finished,
        }
        for ev in events:
            self.feed(ev)

    def row(self, name: str) -> FileRow:
        if name not in self.rows:
            self.rows[name] = FileRow(file=name, outcome="pending")
        return self.rows[name]

    def feed(self, ev: dict) -> None:
        t = _num(ev.get("t"))
        if t is not None:
            self.last_t = max(self.last_t, t)
        if self.rep.run is None and ev.get("run") is not None:
            self.rep.run = str(ev["run"])
        handler = self.handlers.get(ev.get("event"))
        if handler is not None:
            handler(ev, t, ev.get("file"))

    # -- run and workers
    def run_started(self, ev: dict, t: float | None, f: str | None) -> None:
        rep = self.rep
        rep.started_ts = ev.get("ts")
        for key in ("corpus", "out", "engine", "model", "device", "limit_source"):
            setattr(rep, key, ev.get(key))
        rep.limit_mb, rep.budget_mb = _num(ev.get("limit_mb")), _num(ev.get("budget_mb"))
        rep.reserve_mb = _num(ev.get("reserve_mb"))
        rep.vram_budget_mb, rep.vram_total_mb = _num(ev.get("vram_budget_mb")), _num(ev.get("vram_total_mb"))
        files = _num(ev.get("files"))
        rep.planned_files = int(files) if files is not None else None

    def worker_spawned(self, ev: dict, t: float | None, f: str | None) -> None:
        self.rep.workers_spawned += 1

    def worker_exited(self, ev: dict, t: float | None, f: str | None) -> None:
        _close_pause(self.open_pauses, ev.get("worker"), t, resumed=False)

    def config_reloaded(self, ev: dict, t: float | None, f: str | None) -> None:
        self.rep.reloads.append((t, ev.get("changed") or {}))

    def drain_started(self, ev: dict, t: float | None, f: str | None) -> None:
        self.rep.drain = (t, ev.get("reason"))

    def run_finished(self, ev: dict, t: float | None, f: str | None) -> None:
        rep = self.rep
        rep.finished = True
        rep.run_finished = dict(ev)
        code = _num(ev.get("exit_code"))
        rep.exit_code = int(code) if code is not None else None
        rep.wall_s = _num(ev.get("wall_s")) or 0.0

    # -- files
    def file_admitted(self, ev: dict, t: float | None, f: str | None) -> None:
        if not f:
            return
        r = self.row(f)
        attempt = _num(ev.get("attempt"))
        r.attempts = max(r.attempts + 1 if attempt is None else int(attempt), r.attempts)
        r.predicted_mb = _num(ev.get("predicted_mb"))
        r.vram_predicted_mb = _num(ev.get("predicted_vram_mb"))
        r.audio_seconds = _num(ev.get("audio_seconds")) or r.audio_seconds
        r.worker, r.outcome, r.reason = ev.get("worker"), "running", None
        self.admitted_t[f] = t
        if self.rep.budget_mb is None:
            self.rep.budget_mb = _num(ev.get("budget_mb"))

    def file_started(self, ev: dict, t: float | None, f: str | None) -> None:
        if not f:
            return
        r = self.row(f)
        if r.outcome != "running":
            r.outcome = "running"
            r.attempts = max(r.attempts, 1)
            self.admitted_t.setdefault(f, t)

    def file_done(self, ev: dict, t: float | None, f: str | None) -> None:
        if not f:
            return
        r = self.row(f)
        r.outcome, r.attempts, r.reason = "done", max(r.attempts, 1), None
        r.peak_mb = _num(ev.get("peak_mb"))
        r.vram_peak_mb = _num(ev.get("vram_peak_mb"))
        r.predicted_mb = _num(ev.get("predicted_mb")) or r.predicted_mb
        r.audio_seconds = _num(ev.get("audio_seconds")) or r.audio_seconds
        r.wall_s = _num(ev.get("wall_s"))
        r.worker = ev.get("worker")
        stats = ev.get("stats") if isinstance(ev.get("stats"), dict) else {}
        self.rep.implausible_utterances += int(_num(stats.get("implausible_utterances")) or 0)

    def file_failed(self, ev: dict, t: float | None, f: str | None) -> None:
        if not f:
            return
        r = self.row(f)
        r.outcome = "failed"
        r.attempts = max(r.attempts, int(_num(ev.get("attempt")) or 1))
        reason, kind = ev.get("reason"), ev.get("kind")
        if ev.get("vram_observed_mb") is not None:  # a CUDA out-of-memory
            self.rep.cuda_ooms += 1
            r.vram_peak_mb = _max(r.vram_peak_mb, _num(ev.get("vram_observed_mb")))
        r.reason = f"{kind}: {reason}" if kind and reason and not str(reason).startswith(str(kind)) else reason

    def file_requeued(self, ev: dict, t: float | None, f: str | None) -> None:
        if not f:
            return
        r = self.row(f)
        r.outcome, r.reason = "pending", ev.get("reason")
        r.peak_mb = _max(r.peak_mb, _num(ev.get("observed_mb")))

    def file_quarantined(self, ev: dict, t: float | None, f: str | None) -> None:
        if not f:
            return
        r = self.row(f)
        r.outcome, r.reason = "quarantined", ev.get("reason")
        attempts = _num(ev.get("attempts"))
        if attempts is not None:
            r.attempts = max(r.attempts, int(attempts))
        r.peak_mb = _max(r.peak_mb, _num(ev.get("observed_mb")))

    def file_skipped(self, ev: dict, t: float | None, f: str | None) -> None:
        if f:
            self.rep.skipped_files.append(f)

    def file_warning(self, ev: dict, t: float | None, f: str | None) -> None:
        self.rep.warnings += 1
        if IMPLAUSIBLE.search(str(ev.get("warning") or "")):
            self.rep.implausible.append((f or "?", str(ev.get("warning"))))

    # -- memory actions
    def worker_killed(self, ev: dict, t: float | None, f: str | None) -> None:
        k = KillRow(t=t, worker=ev.get("worker"), pid=ev.get("pid"), file=f, reason=ev.get("reason"),
                    uss_mb=_num(ev.get("uss_mb")), used_mb=_num(ev.get("used_mb")),
                    budget_mb=_num(ev.get("budget_mb")), predicted_mb=_num(ev.get("predicted_mb")))
        self.rep.kills.append(k)
        if f:
            r = self.row(f)
            r.kills += 1
            r.outcome, r.reason = "killed", k.reason
            r.peak_mb = _max(r.peak_mb, k.uss_mb)
            k.audio_seconds = r.audio_seconds
        _close_pause(self.open_pauses, ev.get("worker"), t, resumed=False)

    def worker_paused(self, ev: dict, t: float | None, f: str | None) -> None:
        p = PauseRow(t=t, worker=ev.get("worker"), pid=ev.get("pid"), file=f, reason=ev.get("reason"),
                     used_mb=_num(ev.get("used_mb")), budget_mb=_num(ev.get("budget_mb")))
        self.rep.pauses.append(p)
        self.open_pauses[p.worker] = p

    def worker_resumed(self, ev: dict, t: float | None, f: str | None) -> None:
        p = _close_pause(self.open_pauses, ev.get("worker"), t, resumed=True)
        if p is not None and _num(ev.get("paused_s")) is not None:
            p.paused_s = _num(ev.get("paused_s"))

    def memory_sample(self, ev: dict, t: float | None, f: str | None) -> None:
        rep = self.rep
        used = _num(ev.get("used_mb"))
        if used is not None and (rep.max_used_mb is None or used > rep.max_used_mb):
            rep.max_used_mb, rep.max_used_t = used, t
        vused = _num(ev.get("vram_used_mb"))
        if vused is not None:
            rep.max_vram_used_mb = max(rep.max_vram_used_mb or 0.0, vused)
        if rep.limit_mb is None:
            rep.limit_mb = _num(ev.get("limit_mb"))
        if rep.budget_mb is None:
            rep.budget_mb = _num(ev.get("budget_mb"))
        for w in ev.get("workers") or ():
            if isinstance(w, dict) and w.get("file"):
                uss = _num(w.get("uss_mb"))
                if uss is not None:
                    self.sample_peak[w["file"]] = max(self.sample_peak.get(w["file"], 0.0), uss)

    # -- the end
    def finish(self) -> Report:
        rep, last_t = self.rep, self.last_t
        rep.last_t = last_t
        if not rep.finished:
            rep.wall_s = last_t
        for name, r in self.rows.items():
            if r.outcome != "done":
                r.peak_mb = _max(r.peak_mb, self.sample_peak.get(name))
            if r.outcome == "running" and self.admitted_t.get(name) is not None:
                r.wall_s = max(0.0, last_t - self.admitted_t[name])
        for p in rep.pauses:
            if p.paused_s is None and p.t is not None:
                p.paused_s = (p.end_t if p.end_t is not None else last_t) - p.t
        rep.files = list(self.rows.values())
        rep.quarantined = [r for r in rep.files if r.outcome == "quarantined"]
        rep.totals = _totals(rep)
        rep.audio_seconds_done = sum(r.audio_seconds or 0.0 for r in rep.files if r.outcome == "done")
        if rep.wall_s > 0:
            rep.throughput_audio_h_per_h = rep.audio_seconds_done / rep.wall_s
        rep.prediction = _prediction_stats(rep)
        return rep


def _totals(rep: Report) -> dict[str, int]:
    counts = {name: 0 for name in OUTCOMES}
    for r in rep.files:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    counts["skipped"] = len(rep.skipped_files)
    counts["kills"] = len(rep.kills)
    counts["pauses"] = len(rep.pauses)
    counts["attempts"] = sum(r.attempts for r in rep.files)
    counts["warnings"] = rep.warnings
    # The engines' own count (all of them) when the log has it; the logged warnings are at most 20 a file.
    counts["implausible"] = max(len(rep.implausible), rep.implausible_utterances)
    return counts


def summarize(events: list[dict]) -> Report:
    """Fold one run's events into a Report (call ``select_run`` first for multi-run logs)."""
    return _Fold(events).finish()


def _close_pause(open_pauses: dict, worker: Any, t: float | None, resumed: bool) -> PauseRow | None:
    p = open_pauses.pop(worker, None)
    if p is not None:
        p.end_t = t
        p.resumed = resumed
        if t is not None and p.t is not None:
            p.paused_s = max(0.0, t - p.t)
    return p


def _prediction_stats(rep: Report) -> PredictionStats:
    done = [r for r in rep.files if r.outcome == "done" and r.error_mb is not None]
    errors = [r.error_mb for r in done]
    abs_errors = [abs(e) for e in errors]
    st = PredictionStats(n=len(done))
    if done:
        st.mean_error_mb = sum(errors) / len(errors)
        st.mean_abs_error_mb = sum(abs_errors) / len(abs_errors)
        st.p50_abs_error_mb = _percentile(abs_errors, 50)
        st.p90_abs_error_mb = _percentile(abs_errors, 90)
        st.max_abs_error_mb = max(abs_errors)
        under = sorted((r for r in done if r.error_mb > 0), key=lambda r: r.error_mb, reverse=True)
        st.under_predicted = len(under)
        st.worst_under = under[:5]
    killed = [k for k in rep.kills if k.uss_mb is not None and k.predicted_mb is not None]
    st.killed_attempts = len(killed)
    st.killed_over_prediction = sum(1 for k in killed if k.uss_mb > k.predicted_mb)
    return st


# --------------------------------------------------------------------------------------------
# text


def _mib(v: float | None) -> str:
    return format_count(v)


def _size(mb: float | None) -> str:
    return format_mib(mb)


def _dur(s: float | None) -> str:
    return format_duration(s, decimals=1)


def _table(title: str, columns: list[tuple[str, str]]) -> Table:
    t = Table(
        box=_PLAIN,
        title=title,
        title_justify="left",
        title_style="bold",
        show_edge=False,
        pad_edge=False,
        header_style="bold",
    )
    for name, justify in columns:
        t.add_column(name, justify=justify, overflow="fold")
    return t


def render_plain(parts: list[Any]) -> str:
    """Rich tables and lines as plain text, 120 columns, no trailing blanks (reports and status)."""
    console = Console(file=io.StringIO(), width=120, color_system=None, force_terminal=False, highlight=False)
    for i, part in enumerate(parts):
        if i:
            console.print()
        console.print(part)
    text = console.file.getvalue()
    return "\n".join(line.rstrip() for line in text.splitlines()).strip("\n") + "\n"


def _sorted_rows(rows: list[FileRow], sort: str) -> list[FileRow]:
    if sort not in SORTS:
        raise ValueError(f"sort must be one of {', '.join(SORTS)}, not {sort!r}")
    if sort == "file":
        return sorted(rows, key=lambda r: r.file)
    attr = "peak_mb" if sort == "peak" else "wall_s"
    # Largest first, unknowns last, ties by name so the order is stable across runs.
    return sorted(rows, key=lambda r: (getattr(r, attr) is None, -(getattr(r, attr) or 0.0), r.file))


def _head_run(rep: Report) -> list[str]:
    head = [f"run {rep.run or '?'}  {rep.engine or '?'} {rep.model or ''} on {rep.device or '?'}".rstrip()]
    if rep.corpus or rep.out:
        head.append(f"corpus {rep.corpus or '?'} -> {rep.out or '?'}")
    if rep.finished:
        state = f"finished, exit code {rep.exit_code if rep.exit_code is not None else '?'}"
    else:
        state = "NOT FINISHED (no run_finished)"
    head.append(f"started {rep.started_ts or '?'}  wall {_dur(rep.wall_s)}  {state}")
    if not rep.finished:
        head.append(f"the log ends {_dur(rep.last_t)} into the run: the supervisor crashed, was killed or is still running")
    return head


def _head_memory(rep: Report) -> str:
    mem = f"memory limit {_size(rep.limit_mb)}"
    if rep.limit_source:
        mem += f" ({rep.limit_source})"
    mem += f"  budget {_size(rep.budget_mb)}"
    if rep.reserve_mb is not None:
        mem += f"  reserve {_size(rep.reserve_mb)}"
    if rep.max_used_mb is not None:
        mem += f"  highest used {_size(rep.max_used_mb)} at {_dur(rep.max_used_t)}"
    if rep.vram_budget_mb is not None:  # a GPU run: VRAM beside RAM
        mem += f"\nGPU memory {_size(rep.vram_total_mb)}  VRAM budget {_size(rep.vram_budget_mb)}"
        if rep.max_vram_used_mb is not None:
            mem += f"  highest used {_size(rep.max_vram_used_mb)}"
        mem += f"  CUDA out-of-memory {rep.cuda_ooms}"
    return mem


def _head_files(rep: Report) -> str:
    c = rep.totals
    files = (f"files {c.get('done', 0)} done, {c.get('failed', 0)} failed, {c.get('quarantined', 0)} quarantined, "
             f"{c.get('skipped', 0)} skipped")
    unfinished = [(n, c.get(n, 0)) for n in ("running", "pending", "killed") if c.get(n, 0)]
    if unfinished:
        files += ", " + ", ".join(f"{v} {n} when the log ended" for n, v in unfinished)
    if rep.planned_files is not None:
        files += f" (of {rep.planned_files})"
    return files + f"; {c.get('attempts', 0)} attempts, {rep.workers_spawned} workers spawned"


def _head_events(rep: Report) -> list[str]:
    tp = rep.throughput_audio_h_per_h
    lines = [f"audio {rep.audio_seconds_done / 3600:.2f} h aligned; throughput "
             + (f"{tp:.2f} audio h per wall h" if tp is not None else "-")]
    paused_total = sum(p.paused_s or 0.0 for p in rep.pauses)
    lines.append(f"kills {len(rep.kills)}  pauses {len(rep.pauses)} (paused {_dur(paused_total)} in all)")
    if rep.warnings or rep.totals.get("implausible"):
        lines.append(f"warnings {rep.warnings}, implausible alignments {rep.totals.get('implausible', 0)} "
                     "(those utterances keep their original bullets)")
    if rep.drain is not None:
        lines.append(f"drain started at {_dur(rep.drain[0])}: {rep.drain[1] or '?'}")
    for t, changed in rep.reloads:
        desc = ", ".join(f"{k} {v[0]}->{v[1]}" if isinstance(v, (list, tuple)) and len(v) == 2 else f"{k}"
                         for k, v in changed.items())
        lines.append(f"config reloaded at {_dur(t)}: {desc or 'no changes'}")
    if rep.skipped_lines:
        lines.append(f"log: {rep.skipped_lines} unreadable line(s) skipped"
                     + (f", {rep.recovered_lines} event(s) salvaged from them" if rep.recovered_lines else ""))
    return lines


def _err_text(r: FileRow) -> str:
    err = r.error_mb
    if err is None or r.outcome in ("failed", "running"):
        return "-"
    if r.outcome == "done":
        return f"{err:+,.0f}"
    return f">={err:+,.0f}" if r.kills else "-"  # killed before the end: the true peak is at least this


def _files_part(rep: Report, sort: str, limit: int | None) -> Any:
    rows = _sorted_rows(rep.files, sort)
    if not rows:
        return "Files: none admitted"
    shown = rows if limit is None else rows[: max(0, limit)]
    title = {"peak": "by peak memory", "time": "by wall time", "file": "by name"}[sort]
    more = f", first {len(shown)} of {len(rows)}" if len(shown) < len(rows) else ""
    ft = _table(f"Files ({title}{more})", [("file", "left"), ("outcome", "left"), ("tries", "right"),
                                           ("audio", "right"), ("peak MiB", "right"), ("pred MiB", "right"),
                                           ("err MiB", "right"), ("wall", "right")])
    gpu = rep.vram_budget_mb is not None
    if gpu:
        ft.add_column("VRAM MiB", justify="right")
        ft.add_column("pred VRAM", justify="right")
    for r in shown:
        cells = [r.file, r.outcome, str(r.attempts), _dur(r.audio_seconds), _mib(r.peak_mb), _mib(r.predicted_mb),
                 _err_text(r), _dur(r.wall_s)]
        ft.add_row(*cells, *((_mib(r.vram_peak_mb), _mib(r.vram_predicted_mb)) if gpu else ()))
    return ft


def _kills_part(rep: Report) -> Any:
    kt = _table("Kills", [("at", "right"), ("worker", "left"), ("file", "left"), ("uss MiB", "right"),
                          ("pred MiB", "right"), ("used/budget MiB", "right"), ("reason", "left")])
    for k in rep.kills:
        kt.add_row(_dur(k.t), str(k.worker), k.file or "-", _mib(k.uss_mb), _mib(k.predicted_mb),
                   f"{_mib(k.used_mb)}/{_mib(k.budget_mb)}", k.reason or "-")
    return kt


def _pauses_part(rep: Report) -> Any:
    pt = _table("Pauses", [("at", "right"), ("worker", "left"), ("file", "left"), ("paused", "right"),
                           ("used/budget MiB", "right"), ("reason", "left")])
    for p in rep.pauses:
        how = _dur(p.paused_s) + ("" if p.resumed else (" (killed)" if p.end_t is not None else " (still)"))
        pt.add_row(_dur(p.t), str(p.worker), p.file or "-", how, f"{_mib(p.used_mb)}/{_mib(p.budget_mb)}",
                   p.reason or "-")
    return pt


def _quarantine_part(rep: Report) -> Any:
    qt = _table("Quarantined", [("file", "left"), ("tries", "right"), ("observed MiB", "right"), ("reason", "left")])
    for r in rep.quarantined:
        qt.add_row(r.file, str(r.attempts), _mib(r.peak_mb), r.reason or "-")
    return qt


def _failed_part(failed: list[FileRow]) -> Any:
    ft = _table("Failed", [("file", "left"), ("tries", "right"), ("reason", "left")])
    for r in failed:
        ft.add_row(r.file, str(r.attempts), r.reason or "-")
    return ft


def _implausible_part(rep: Report, limit: int = 20) -> Any:
    it = _table(f"Implausible alignments ({rep.totals.get('implausible', 0)}; original bullets kept)",
                [("file", "left"), ("warning", "left")])
    for f, w in rep.implausible[:limit]:
        it.add_row(f, w)
    return it


def _prediction_part(rep: Report) -> str:
    st = rep.prediction
    if not st.n:
        return "Learned vs observed memory: no finished file with a prediction"
    lines = [
        f"Learned vs observed memory ({st.n} finished files; error = observed peak - predicted)",
        f"  mean error {st.mean_error_mb:+,.0f} MiB, mean |error| {st.mean_abs_error_mb:,.0f} MiB, "
        f"p50 |error| {st.p50_abs_error_mb:,.0f} MiB, p90 |error| {st.p90_abs_error_mb:,.0f} MiB, "
        f"max |error| {st.max_abs_error_mb:,.0f} MiB",
        f"  under-predicted {st.under_predicted} of {st.n}" + (", worst:" if st.worst_under else ""),
    ]
    lines += [f"    {r.file}  {r.error_mb:+,.0f} MiB" for r in st.worst_under[:3]]
    if st.killed_attempts:
        lines.append(f"  killed attempts above their prediction: {st.killed_over_prediction} of {st.killed_attempts}")
    return "\n".join(lines)


def render_text(report: Report, sort: str = "peak", limit: int | None = None) -> str:
    """A plain-text summary: header lines, then files, kills, pauses, quarantine and predictions."""
    rep = report
    head = [*_head_run(rep), _head_memory(rep), _head_files(rep), *_head_events(rep)]
    parts: list[Any] = ["\n".join(head), _files_part(rep, sort, limit)]
    if rep.kills:
        parts.append(_kills_part(rep))
    if rep.pauses:
        parts.append(_pauses_part(rep))
    if rep.quarantined:
        parts.append(_quarantine_part(rep))
    failed = [r for r in rep.files if r.outcome == "failed"]
    if failed:
        parts.append(_failed_part(failed))
    if rep.implausible:
        parts.append(_implausible_part(rep))
    parts.append(_prediction_part(rep))
    return render_plain(parts)


def to_dict(rep: Report) -> dict[str, Any]:
    """The report as plain JSON-able data (``report --json``)."""
    import dataclasses

    d = dataclasses.asdict(rep)
    d["implausible"] = [{"file": f, "warning": w} for f, w in rep.implausible]
    return d


def summarize_store(summary: dict) -> str:
    """Render the telemetry store's ``summary()`` dict; missing keys show as '-' or are left out.

    Both spellings are read (``files_done``/``done``, ``throughput_audio_h_per_h``/``throughput``,
    a ``quarantined`` list or count with ``quarantined_files``) so the view survives the store's
    schema moving on.
    """
    s = summary or {}

    def first(*keys: str) -> Any:
        for key in keys:
            v = s.get(key)
            if v is not None and not isinstance(v, (list, dict)):
                return v
        return None

    def count(*keys: str) -> str:
        v = first(*keys)
        return "-" if v is None else str(v)

    q_list = s.get("quarantined") if isinstance(s.get("quarantined"), list) else s.get("quarantined_files")
    q_count = first("files_quarantined", "quarantined")
    if q_count is None and isinstance(q_list, list):
        q_count = len(q_list)
    tp = _num(first("throughput_audio_h_per_h", "throughput"))
    audio = _num(first("audio_seconds"))
    scope = f"run {s['run']}" if s.get("run") else (f"{s['runs']} runs" if s.get("runs") is not None else "all runs")
    head = [
        f"{scope}: files {count('files_done', 'done')} done, {count('files_failed', 'failed')} failed, "
        f"{'-' if q_count is None else q_count} quarantined"
        + (f" (of {s['files']})" if isinstance(s.get("files"), int) else "")
        + f"; {count('attempts')} attempts, {count('kills')} kills",
        (f"audio {audio / 3600:.2f} h" if audio is not None else "audio -")
        + f", wall {_dur(_num(s.get('wall_s')))}"
        + (f", worker busy {_dur(_num(s.get('worker_s')))}" if _num(s.get("worker_s")) is not None else "")
        + (f", throughput {tp:.2f} audio h per wall h" if tp is not None else ", throughput -"),
    ]
    parts: list[Any] = ["\n".join(head)]
    for key, title in (("worst_by_peak", "Highest peak memory"), ("worst_by_wall", "Longest wall time")):
        items = [it for it in s.get(key) or [] if isinstance(it, dict)]
        if not items:
            continue
        t = _table(title, [("file", "left"), ("outcome", "left"), ("peak MiB", "right"), ("pred MiB", "right"),
                           ("audio", "right"), ("wall", "right")])
        for it in items:
            t.add_row(str(it.get("file", "?")), str(it.get("outcome") or "-"), _mib(_num(it.get("peak_mb"))),
                      _mib(_num(it.get("predicted_mb"))), _dur(_num(it.get("audio_seconds"))),
                      _dur(_num(it.get("wall_s"))))
        parts.append(t)
    if isinstance(q_list, list) and q_list:
        t = _table("Quarantined", [("file", "left"), ("observed MiB", "right"), ("reason", "left")])
        for it in q_list:
            it = it if isinstance(it, dict) else {"file": it}
            t.add_row(str(it.get("file", "?")), _mib(_num(it.get("peak_mb"))), str(it.get("reason") or "-"))
        parts.append(t)
    failed = [it for it in s.get("failed_files") or [] if isinstance(it, dict)]
    if failed:
        t = _table("Failed", [("file", "left"), ("outcome", "left"), ("reason", "left")])
        for it in failed:
            t.add_row(str(it.get("file", "?")), str(it.get("outcome") or "-"), str(it.get("reason") or "-"))
        parts.append(t)
    return render_plain(parts)


# --------------------------------------------------------------------------------------------
# plot


def _time_scale(span_s: float) -> tuple[float, str]:
    if span_s <= 15 * 60:
        return 1.0, "s"
    if span_s <= 6 * 3600:
        return 60.0, "min"
    return 3600.0, "h"


def plot(events: list[dict], png_path: str | Path) -> Path:
    """Write :func:`figure` of a run to one PNG (1600x1000)."""
    import matplotlib.pyplot as plt

    fig = figure(events)
    out = Path(png_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def figure(events: list[dict]) -> Any:
    """One run drawn on a matplotlib figure: memory over time on top, peak vs audio length below.

    Top: each worker's USS (one colour each, its name at the end of its line), total used, the
    budget, kills as crosses and pauses as shaded spans; the axis fits the data and the budget, and
    a limit far above them is named rather than drawn. Bottom: each finished file's peak and each
    killed attempt's memory against audio length, with the learned prediction line, so a reader
    sees at once whether the model under-predicts long files.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rep = summarize(events)
    samples = [ev for ev in events if ev.get("event") == "memory_sample"]
    span = max([rep.last_t] + [_num(ev.get("t")) or 0.0 for ev in samples] + [1.0])
    scale, unit = _time_scale(span)
    fig = plt.figure(figsize=(16, 10), dpi=100)
    outer = fig.add_gridspec(2, 1, height_ratios=[3, 2], hspace=0.32)
    series = _memory_series(samples, scale)
    budget, limit = _last_or(series.budget, rep.budget_mb), _last_or(series.limit, rep.limit_mb)
    # A budget far above the data would squash the workers' lines into the bottom of the axis:
    # then the axis is broken, a thin band above shows the budget and limit, the main part fits the data.
    band = None
    if budget is not None and series.top() > 0 and budget > 3 * series.top():
        inner = outer[0].subgridspec(2, 1, height_ratios=[1, 6], hspace=0.06)
        band = fig.add_subplot(inner[0])
        ax = fig.add_subplot(inner[1], sharex=band)
    else:
        ax = fig.add_subplot(outer[0])
    ax2 = fig.add_subplot(outer[1])
    _plot_title(fig, rep)
    handles = _plot_memory(ax, plt, rep, series, span, scale, unit)
    handles += _plot_limits(band or ax, plt, series, budget, limit, band is not None)
    if band is not None:
        ax.set_title("", loc="left")
        ax.spines["top"].set_visible(False)
        kw = dict(transform=ax.transAxes, color="0.3", clip_on=False, lw=1.2)
        for x in (0, 1):
            ax.plot([x - 0.006, x + 0.006], [1 - 0.014, 1 + 0.014], **kw)
    handles += _plot_pauses(ax, rep, span, scale)
    handles += _plot_kills(ax, rep, scale)
    if not rep.finished and samples:
        handles.append(ax.axvline(rep.last_t / scale, color="0.35", lw=1.5, ls="-.", label="log ends (no run_finished)"))
    if handles:
        (band or ax).legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=10,
                            frameon=False)
    _plot_peaks(ax2, rep, events)
    fig.subplots_adjust(left=0.05, right=0.80, top=0.87, bottom=0.07)
    return fig


def _plot_title(fig: Any, rep: Report) -> None:
    status = "finished" if rep.finished else "log ended without run_finished"
    fig.suptitle(f"Run {rep.run or '?'}: {rep.engine or '?'} {rep.model or ''} on {rep.device or '?'}",
                 x=0.05, ha="left", fontsize=15, fontweight="bold")
    fig.text(0.05, 0.935,
             f"{rep.totals.get('done', 0)} done, {rep.totals.get('failed', 0)} failed, "
             f"{rep.totals.get('quarantined', 0)} quarantined, {len(rep.kills)} kills, {len(rep.pauses)} pauses; "
             f"wall {_dur(rep.wall_s)}, {rep.audio_seconds_done / 3600:.2f} h of audio aligned; {status}",
             ha="left", fontsize=11, color="0.25")


@dataclass
class _Series:
    """Memory samples as plot coordinates (x in the chosen time unit, y in GiB)."""

    used: tuple[list[float], list[float]] = field(default_factory=lambda: ([], []))
    budget: tuple[list[float], list[float]] = field(default_factory=lambda: ([], []))
    limit: tuple[list[float], list[float]] = field(default_factory=lambda: ([], []))
    workers: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)

    def top(self) -> float:
        ys = [y for y in self.used[1] if y == y]  # the data only: budget and limit are placed apart
        ys += [y for _, wy in self.workers.values() for y in wy if y == y]
        return max(ys, default=0.0)


def _memory_series(samples: list[dict], scale: float) -> _Series:
    s = _Series()
    for ev in samples:
        t = _num(ev.get("t"))
        if t is None:
            continue
        x = t / scale
        for key, (xs, ys) in (("used_mb", s.used), ("budget_mb", s.budget), ("limit_mb", s.limit)):
            v = _num(ev.get(key))
            if v is not None:
                xs.append(x)
                ys.append(v / 1024)
        for w in ev.get("workers") or ():
            if isinstance(w, dict):
                xs, ys = s.workers.setdefault(str(w.get("worker", w.get("pid", "?"))), ([], []))
                uss = _num(w.get("uss_mb"))
                xs.append(x)
                ys.append(float("nan") if uss is None else uss / 1024)
    return s


def _plot_memory(ax: Any, plt: Any, rep: Report, s: _Series, span: float, scale: float, unit: str) -> list[Any]:
    handles: list[Any] = []
    if not s.used[0] and not s.workers:
        ax.text(0.5, 0.5, "no memory_sample events in this log", ha="center", va="center",
                transform=ax.transAxes, fontsize=14, color="0.4")
    # Orange and red mean budget and limit; the workers get the other hues of tab10.
    tab10 = plt.get_cmap("tab10")
    palette = [tab10(i) for i in (0, 2, 4, 5, 6, 7, 8, 9)]
    ends: list[tuple[float, float, str, Any]] = []
    for i, (name, (xs, ys)) in enumerate(s.workers.items()):
        color = palette[i % len(palette)]
        label = name if name[:1].isalpha() else f"w{name}"
        (h,) = ax.plot(xs, ys, color=color, lw=2.0, alpha=0.9, label=f"worker {label} (USS)")
        if i < 12:
            handles.append(h)
        last = next(((x, y) for x, y in zip(reversed(xs), reversed(ys)) if y == y), None)
        if last is not None:
            ends.append((last[1], last[0], label, color))
    _label_line_ends(ax, ends, max(s.top(), 0.1) * 0.04)
    if len(s.workers) > 12:
        handles.append(plt.Line2D([], [], color="none", label=f"... {len(s.workers) - 12} more workers"))
    if s.used[0]:
        (h,) = ax.plot(*s.used, color="black", lw=2.6, label="total used (PSS, all workers)")
        handles.append(h)
    ax.set_ylim(0, max(s.top(), 0.1) * 1.12)
    ax.set_xlim(0, span / scale * 1.04)
    ax.set_title("Memory over time per worker", fontsize=13, loc="left")
    ax.set_xlabel(f"time since run start ({unit})", fontsize=11)
    ax.set_ylabel("memory (GiB)", fontsize=11)
    ax.grid(True, alpha=0.3)
    return handles


def _label_line_ends(ax: Any, ends: list[tuple[float, float, str, Any]], gap: float) -> None:
    """Name each worker's line where it ends, nudging labels apart so none sits on another."""
    placed: list[tuple[float, float]] = []  # (x, y) of labels already drawn
    for y, x, label, color in sorted(ends):
        ty = y
        while any(abs(ty - py) < gap and abs(x - px) < 1e-9 + abs(x) * 0.05 for px, py in placed):
            ty += gap
        placed.append((x, ty))
        ax.annotate(label, (x, y), xytext=(x, ty), textcoords="data", fontsize=9, color=color,
                    va="center", fontweight="bold")


def _last_or(xy: tuple[list[float], list[float]], fallback_mb: float | None) -> float | None:
    return xy[1][-1] if xy[1] else (fallback_mb / 1024 if fallback_mb is not None else None)


def _plot_limits(ax: Any, plt: Any, s: _Series, budget: float | None, limit: float | None,
                 band: bool) -> list[Any]:
    """The budget and limit lines, on the main axis (raising its top to show them) or in the band
    of a broken axis; a limit far above everything is named in the legend rather than drawn."""
    handles: list[Any] = []
    if budget is not None:
        label = f"budget ({budget:.1f} GiB)"
        if s.budget[0]:
            (h,) = ax.step(*s.budget, where="post", color="tab:orange", lw=2.2, ls="--", label=label)
        else:
            h = ax.axhline(budget, color="tab:orange", lw=2.2, ls="--", label=label)
        handles.append(h)
    low = budget if band and budget is not None else 0.0
    top = max(s.top() if not band else 0.0, budget or 0.0, 0.1) * 1.12
    if limit is not None and limit <= max(top, budget or 0.0) * 1.3:
        top = max(top, limit * 1.05)
        handles.append(ax.axhline(limit, color="tab:red", lw=2.0, label=f"limit ({limit:.1f} GiB)"))
    elif limit is not None:
        handles.append(plt.Line2D([], [], color="tab:red", lw=2.0, label=f"limit {limit:.1f} GiB (above the chart)"))
    if band:
        ax.set_ylim(low * 0.9, top)
        ax.set_title("Memory over time per worker (axis broken: the budget is far above the data)", fontsize=13,
                     loc="left")
        ax.tick_params(labelbottom=False, bottom=False)
        ax.spines["bottom"].set_visible(False)
        ax.grid(True, alpha=0.3)
        kw = dict(transform=ax.transAxes, color="0.3", clip_on=False, lw=1.2)
        for x in (0, 1):
            ax.plot([x - 0.006, x + 0.006], [-0.08, 0.08], **kw)
    else:
        ax.set_ylim(0, max(ax.get_ylim()[1], top))
    return handles


def _plot_pauses(ax: Any, rep: Report, span: float, scale: float) -> list[Any]:
    from matplotlib.patches import Patch

    pause_color = "goldenrod"
    last_label_x, stagger = None, 0
    for p in rep.pauses:
        if p.t is None:
            continue
        end = p.end_t if p.end_t is not None else rep.last_t
        # A pause of a second would be invisible at run scale; give it a visible minimum width.
        width = max((end - p.t) / scale, span / scale * 0.004)
        x = p.t / scale
        ax.axvspan(x, x + width, color=pause_color, alpha=0.22, lw=0)
        close = last_label_x is not None and (x - last_label_x) < span / scale * 0.03
        stagger = stagger + 1 if close else 0
        last_label_x = x
        ax.annotate(f"pause {p.worker}", (x, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(3, -6 - 64 * (stagger % 3)), textcoords="offset points", fontsize=9,
                    color="darkgoldenrod", rotation=90, va="top", ha="left")
    return [Patch(color=pause_color, alpha=0.35, label="worker paused")] if rep.pauses else []


def _plot_kills(ax: Any, rep: Report, scale: float) -> list[Any]:
    kill_x: list[float] = []
    kill_y: list[float] = []
    for k in rep.kills:
        y = k.uss_mb if k.uss_mb is not None else k.used_mb
        if k.t is None or y is None:
            continue
        kill_x.append(k.t / scale)
        kill_y.append(y / 1024)
        label = (k.file or "?").rsplit("/", 1)[-1]
        ax.annotate(f"killed {k.worker}: {label}", (k.t / scale, y / 1024), xytext=(6, 6),
                    textcoords="offset points", fontsize=9, color="tab:red")
        if k.used_mb is not None:
            ax.plot([k.t / scale], [k.used_mb / 1024], marker="x", color="tab:red", ms=9, mew=2)
    if not kill_x:
        return []
    (h,) = ax.plot(kill_x, kill_y, ls="none", marker="X", color="tab:red", ms=12, mec="white", mew=1,
                   label="kill (worker USS; x on total)")
    return [h]


def _plot_peaks(ax2: Any, rep: Report, events: list[dict]) -> None:
    done = [r for r in rep.files if r.outcome == "done" and r.audio_seconds and r.peak_mb]
    handles: list[Any] = []
    if done:
        handles.append(ax2.scatter([r.audio_seconds / 60 for r in done], [r.peak_mb / 1024 for r in done], s=46,
                                   color="tab:blue", edgecolor="white", lw=0.6, zorder=3,
                                   label="finished file: observed peak"))
    audio_of = {r.file: r.audio_seconds for r in rep.files}
    killed = [k for k in rep.kills if audio_of.get(k.file) and k.uss_mb is not None]
    if killed:
        handles.append(ax2.scatter([audio_of[k.file] / 60 for k in killed], [k.uss_mb / 1024 for k in killed], s=90,
                                   marker="X", color="tab:red", edgecolor="white", lw=0.6, zorder=4,
                                   label="killed attempt: USS at kill\n(the true peak is higher)"))
    _label_retried(ax2, rep)
    others = [r for r in rep.files if r.outcome in ("running", "pending", "killed", "quarantined")
              and r.audio_seconds and r.peak_mb and r.kills == 0]
    if others:
        handles.append(ax2.scatter([r.audio_seconds / 60 for r in others], [r.peak_mb / 1024 for r in others],
                                   s=46, marker="s", facecolor="none", edgecolor="0.35", zorder=3,
                                   label="unfinished file: highest seen"))
    predicted = _plot_predictions(ax2, events)
    handles += predicted
    peaks = [r.peak_mb / 1024 for r in done + others] + [k.uss_mb / 1024 for k in killed]
    peaks += [y for line in predicted[:1] for y in line.get_ydata()]
    if rep.budget_mb is not None and (not peaks or rep.budget_mb / 1024 <= 3 * max(peaks)):
        handles.append(ax2.axhline(rep.budget_mb / 1024, color="tab:orange", lw=1.5, ls="--", label="budget (whole pool)"))
    elif rep.budget_mb is not None:
        import matplotlib.lines as mlines

        handles.append(mlines.Line2D([], [], color="tab:orange", lw=1.5, ls="--",
                                     label=f"budget {rep.budget_mb / 1024:.1f} GiB (above the chart)"))
    if not (done or killed or predicted or others):
        ax2.text(0.5, 0.5, "no finished or admitted files in this log", ha="center", va="center",
                 transform=ax2.transAxes, fontsize=14, color="0.4")
    ax2.set_title("Peak memory vs audio length per file", fontsize=13, loc="left")
    ax2.set_xlabel("audio length (min)", fontsize=11)
    ax2.set_ylabel("peak worker memory, USS (GiB)", fontsize=11)
    ax2.set_ylim(bottom=0)
    ax2.set_xlim(left=0)
    ax2.grid(True, alpha=0.3)
    if handles:
        ax2.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=10, frameon=False)


def _label_retried(ax2: Any, rep: Report) -> None:
    x_max = max([r.audio_seconds or 0.0 for r in rep.files] + [1.0]) / 60
    for r in rep.files:
        if r.kills and r.audio_seconds and r.peak_mb:
            # Labels near the right edge go to the left of their point so they stay inside the axes.
            right = r.audio_seconds / 60 > 0.75 * x_max
            ax2.annotate(r.file.rsplit("/", 1)[-1] + ("" if r.outcome == "done" else f" ({r.outcome})"),
                         (r.audio_seconds / 60, r.peak_mb / 1024), xytext=(-10 if right else 8, -4),
                         textcoords="offset points", fontsize=9, color="0.2", ha="right" if right else "left",
                         va="top")


def _plot_predictions(ax2: Any, events: list[dict]) -> list[Any]:
    """The learned line: the first prediction made for each file, sorted by audio length, and the
    raised estimates of retries."""
    last_pred: dict[str, tuple[float, float]] = {}
    first_pred: dict[str, tuple[float, float]] = {}
    for ev in events:
        if ev.get("event") == "file_admitted" and ev.get("file"):
            a, p = _num(ev.get("audio_seconds")), _num(ev.get("predicted_mb"))
            if a is not None and p is not None:
                first_pred.setdefault(ev["file"], (a, p))
                last_pred[ev["file"]] = (a, p)
    if not first_pred:
        return []
    pts = sorted(first_pred.values())
    (h,) = ax2.plot([a / 60 for a, _ in pts], [p / 1024 for _, p in pts], color="tab:green", lw=2.0,
                    marker=".", ms=6, label="learned prediction (first admission)")
    handles = [h]
    raised = [(a, p) for f, (a, p) in last_pred.items() if (a, p) != first_pred[f]]
    if raised:
        handles.append(ax2.scatter([a / 60 for a, _ in raised], [p / 1024 for _, p in raised], s=70,
                                   marker="^", color="tab:green", edgecolor="black", lw=0.6, zorder=4,
                                   label="raised estimate on retry"))
    return handles
