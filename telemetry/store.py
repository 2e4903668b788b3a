"""SQLite telemetry store: runs, attempts, per-file lower bounds, worker baselines, learned models.

One file per user (``default_store_path()``), shared by every supervisor on the host, so several
processes may write at once. WAL lets readers proceed during a write; each write is one short
``BEGIN IMMEDIATE`` transaction (the write lock is taken up front, so two writers never deadlock
upgrading read locks), SQLite's busy handler waits up to 30 s, and a write that still meets
"database is locked" is retried with backoff instead of losing a record.
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from telemetry.model import quantile

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 30_000
BASELINE_WINDOW = 50
BASELINE_QUANTILE = 0.9
_WRITE_RETRY_S = 120.0
_MIB = 1024.0 * 1024.0

OUTCOMES = ("done", "failed", "killed", "crashed", "timeout", "quarantined")

T = TypeVar("T")


def default_store_path() -> Path:
    """``$XDG_STATE_HOME/batchalign-supervise/telemetry.sqlite`` (state, not cache: it is learned)."""
    base = os.environ.get("XDG_STATE_HOME") or ""
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".local" / "state"
    return root / "batchalign-supervise" / "telemetry.sqlite"


@dataclass
class Attempt:
    """One try at one file by one worker, whatever its outcome."""

    run_id: str
    file: str  # path relative to the corpus
    path: str  # absolute path
    input_hash: str
    engine: str
    model: str
    device: str
    audio_seconds: float | None
    media_bytes: int | None
    transcript_bytes: int
    worker_baseline_mb: float | None
    peak_mb: float | None
    growth_mb: float | None
    predicted_mb: float | None
    wall_s: float | None
    cpu_s: float | None
    outcome: str  # "done" | "failed" | "killed" | "crashed" | "timeout" | "quarantined"
    reason: str | None
    worker_pid: int | None
    started_at: float
    finished_at: float


@dataclass(frozen=True)
class Sample:
    """A completed file's size and growth: the only kind of record the memory model learns from."""

    audio_seconds: float | None
    media_mb: float | None
    growth_mb: float


_ATTEMPT_FIELDS = tuple(Attempt.__dataclass_fields__)

_MIGRATIONS: dict[int, Sequence[str]] = {
    1: (
        """CREATE TABLE runs (
            run_id TEXT PRIMARY KEY,
            started_at REAL NOT NULL,
            finished_at REAL,
            corpus TEXT NOT NULL,
            engine TEXT NOT NULL,
            model TEXT NOT NULL,
            device TEXT NOT NULL,
            settings TEXT NOT NULL,
            summary TEXT,
            host TEXT,
            pid INTEGER
        )""",
        """CREATE TABLE attempts (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id TEXT NOT NULL,
            file TEXT NOT NULL,
            path TEXT NOT NULL,
            input_hash TEXT NOT NULL,
            engine TEXT NOT NULL,
            model TEXT NOT NULL,
            device TEXT NOT NULL,
            audio_seconds REAL,
            media_bytes INTEGER,
            transcript_bytes INTEGER NOT NULL,
            worker_baseline_mb REAL,
            peak_mb REAL,
            growth_mb REAL,
            predicted_mb REAL,
            wall_s REAL,
            cpu_s REAL,
            outcome TEXT NOT NULL,
            reason TEXT,
            worker_pid INTEGER,
            started_at REAL NOT NULL,
            finished_at REAL NOT NULL
        )""",
        "CREATE INDEX attempts_key ON attempts (engine, model, device, outcome, finished_at)",
        "CREATE INDEX attempts_run ON attempts (run_id, finished_at)",
        """CREATE TABLE lower_bounds (
            input_hash TEXT NOT NULL,
            engine TEXT NOT NULL,
            model TEXT NOT NULL,
            device TEXT NOT NULL,
            mb REAL NOT NULL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (input_hash, engine, model, device)
        )""",
        """CREATE TABLE baselines (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            engine TEXT NOT NULL,
            model TEXT NOT NULL,
            device TEXT NOT NULL,
            uss_mb REAL NOT NULL,
            rss_mb REAL,
            pss_mb REAL,
            recorded_at REAL NOT NULL
        )""",
        "CREATE INDEX baselines_key ON baselines (engine, model, device, id)",
        """CREATE TABLE models (
            engine TEXT NOT NULL,
            model TEXT NOT NULL,
            device TEXT NOT NULL,
            params TEXT NOT NULL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (engine, model, device)
        )""",
    ),
}


class StoreError(Exception):
    """The store cannot be used (for example it was written by a newer version)."""


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    msg = str(exc).lower()
    return "locked" in msg or "busy" in msg


def _retry(fn: Callable[[], T], deadline_s: float = _WRITE_RETRY_S) -> T:
    """Run ``fn`` again while the database stays locked past the busy timeout."""
    end = time.monotonic() + deadline_s
    delay = 0.01
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc) or time.monotonic() >= end:
                raise
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 1.0)


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to ``SCHEMA_VERSION`` in one write transaction; returns the version.

    The version is re-read under the write lock, so two processes opening a fresh store at once
    apply each migration exactly once.
    """

    def run() -> int:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(f"telemetry store has schema {version}, newer than {SCHEMA_VERSION}")
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for stmt in _MIGRATIONS[target]:
                    conn.execute(stmt)
                conn.execute(f"PRAGMA user_version = {target}")
            conn.execute("COMMIT")
            return max(version, SCHEMA_VERSION)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    return _retry(run)


class TelemetryStore:
    """Telemetry for every run on this host; thread-safe, and safe across processes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            str(self.path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
        )
        self._conn.row_factory = sqlite3.Row
        try:
            self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = _retry(lambda: self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            if str(mode).lower() != "wal":
                raise StoreError(f"cannot put {self.path} in WAL mode (got {mode})")
            self._conn.execute("PRAGMA synchronous = NORMAL")
            migrate(self._conn)
        except BaseException:
            self._conn.close()
            raise

    # -- plumbing -----------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None  # type: ignore[assignment]

    def __enter__(self) -> "TelemetryStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """One short write transaction, retried as a whole if the lock cannot be had."""

        def run() -> T:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                out = fn(conn)
                conn.execute("COMMIT")
                return out
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

        with self._lock:
            return _retry(run)

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return _retry(lambda: self._conn.execute(sql, args).fetchall())

    def pragma(self, name: str) -> Any:
        """Current value of a PRAGMA (for checks and diagnostics)."""
        rows = self._read(f"PRAGMA {name}")
        return rows[0][0] if rows else None

    # -- runs -----------------------------------------------------------------------------------

    def start_run(
        self, run_id: str, *, corpus: str, engine: str, model: str, device: str, settings: dict
    ) -> None:
        now = time.time()
        blob = json.dumps(settings, default=_json_default, sort_keys=True)
        self._write(
            lambda c: c.execute(
                """INSERT INTO runs (run_id, started_at, corpus, engine, model, device, settings, host, pid)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (run_id) DO UPDATE SET corpus = excluded.corpus,
                     engine = excluded.engine, model = excluded.model, device = excluded.device,
                     settings = excluded.settings, host = excluded.host, pid = excluded.pid""",
                (run_id, now, str(corpus), engine, model, device, blob, socket.gethostname(), os.getpid()),
            )
        )

    def finish_run(self, run_id: str, summary: dict) -> None:
        blob = json.dumps(summary, default=_json_default, sort_keys=True)
        self._write(
            lambda c: c.execute(
                "UPDATE runs SET finished_at = ?, summary = ? WHERE run_id = ?", (time.time(), blob, run_id)
            )
        )

    def runs(self, limit: int = 20) -> list[dict[str, Any]]:
        """Most recent runs first, with their attempt counts."""
        rows = self._read(
            """SELECT r.*,
                      (SELECT COUNT(*) FROM attempts a WHERE a.run_id = r.run_id) AS attempts,
                      (SELECT COUNT(*) FROM attempts a WHERE a.run_id = r.run_id
                         AND a.outcome = 'done') AS done
               FROM runs r ORDER BY r.started_at DESC, r.rowid DESC LIMIT ?""",
            (int(limit),),
        )
        out = []
        for row in rows:
            d = dict(row)
            d["settings"] = _loads(d.get("settings")) or {}
            d["summary"] = _loads(d.get("summary"))
            out.append(d)
        return out

    # -- attempts ------------------------------------------------------------------------------

    def record_attempt(self, a: Attempt) -> None:
        if a.outcome not in OUTCOMES:
            raise ValueError(f"unknown attempt outcome {a.outcome!r}")
        values = tuple(asdict(a)[k] for k in _ATTEMPT_FIELDS)
        cols = ", ".join(_ATTEMPT_FIELDS)
        marks = ", ".join("?" for _ in _ATTEMPT_FIELDS)
        self._write(lambda c: c.execute(f"INSERT INTO attempts ({cols}) VALUES ({marks})", values))

    def attempts(self, run_id: str | None = None) -> list[Attempt]:
        """Attempts in the order they finished (all runs when ``run_id`` is None)."""
        cols = ", ".join(_ATTEMPT_FIELDS)
        if run_id is None:
            rows = self._read(f"SELECT {cols} FROM attempts ORDER BY finished_at, id")
        else:
            rows = self._read(f"SELECT {cols} FROM attempts WHERE run_id = ? ORDER BY finished_at, id", (run_id,))
        return [Attempt(**dict(r)) for r in rows]

    def samples(self, engine: str, model: str, device: str, limit: int = 5000) -> list[Sample]:
        """Completed files' growth for one (engine, model, device), most recent first.

        Only ``done`` attempts: a killed attempt's peak says the file needs more, not how much.
        """
        rows = self._read(
            """SELECT audio_seconds, media_bytes, growth_mb FROM attempts
               WHERE engine = ? AND model = ? AND device = ? AND outcome = 'done'
                 AND growth_mb IS NOT NULL
               ORDER BY finished_at DESC, id DESC LIMIT ?""",
            (engine, model, device, int(limit)),
        )
        return [
            Sample(
                audio_seconds=r["audio_seconds"],
                media_mb=None if r["media_bytes"] is None else r["media_bytes"] / _MIB,
                growth_mb=r["growth_mb"],
            )
            for r in rows
        ]

    # -- lower bounds --------------------------------------------------------------------------

    def set_lower_bound(self, input_hash: str, engine: str, model: str, device: str, mb: float) -> None:
        """Remember that this file was killed at ``mb`` (peak, baseline included); keeps the max."""
        self._write(
            lambda c: c.execute(
                """INSERT INTO lower_bounds (input_hash, engine, model, device, mb, updated_at)
                   VALUES (?, ?, ?, ?, ?, ?)
                   ON CONFLICT (input_hash, engine, model, device)
                   DO UPDATE SET mb = max(mb, excluded.mb), updated_at = excluded.updated_at""",
                (input_hash, engine, model, device, float(mb), time.time()),
            )
        )

    def lower_bound(self, input_hash: str, engine: str, model: str, device: str) -> float | None:
        rows = self._read(
            "SELECT mb FROM lower_bounds WHERE input_hash = ? AND engine = ? AND model = ? AND device = ?",
            (input_hash, engine, model, device),
        )
        return rows[0]["mb"] if rows else None

    def lower_bounds(self, engine: str, model: str, device: str) -> dict[str, float]:
        """Every stored lower bound of one key, by input hash: one query for a whole corpus."""
        rows = self._read(
            "SELECT input_hash, mb FROM lower_bounds WHERE engine = ? AND model = ? AND device = ?",
            (engine, model, device),
        )
        return {r["input_hash"]: r["mb"] for r in rows}

    # -- worker baselines ----------------------------------------------------------------------

    def record_baseline(
        self, engine: str, model: str, device: str, uss_mb: float, rss_mb: float | None, pss_mb: float | None
    ) -> None:
        self._write(
            lambda c: c.execute(
                """INSERT INTO baselines (engine, model, device, uss_mb, rss_mb, pss_mb, recorded_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?)""",
                (engine, model, device, float(uss_mb), rss_mb, pss_mb, time.time()),
            )
        )

    def baseline(self, engine: str, model: str, device: str, measure: str = "uss") -> float | None:
        """A high quantile of the last ``BASELINE_WINDOW`` READY figures (``uss``, ``pss`` or ``rss``):
        a worker that starts a little fatter than usual must not push the pool over budget."""
        if measure not in ("uss", "pss", "rss"):
            raise ValueError(f"unknown baseline measure {measure!r}")
        column = f"{measure}_mb"
        rows = self._read(
            f"""SELECT {column} FROM baselines WHERE engine = ? AND model = ? AND device = ?
               AND {column} IS NOT NULL ORDER BY id DESC LIMIT ?""",
            (engine, model, device, BASELINE_WINDOW),
        )
        if not rows:
            return None
        return quantile([r[column] for r in rows], BASELINE_QUANTILE)

    # -- learned models ------------------------------------------------------------------------

    def save_model(self, engine: str, model: str, device: str, params: dict) -> None:
        blob = json.dumps(params, default=_json_default)
        self._write(
            lambda c: c.execute(
                """INSERT INTO models (engine, model, device, params, updated_at) VALUES (?, ?, ?, ?, ?)
                   ON CONFLICT (engine, model, device)
                   DO UPDATE SET params = excluded.params, updated_at = excluded.updated_at""",
                (engine, model, device, blob, time.time()),
            )
        )

    def load_model(self, engine: str, model: str, device: str) -> dict | None:
        rows = self._read(
            "SELECT params FROM models WHERE engine = ? AND model = ? AND device = ?", (engine, model, device)
        )
        return _loads(rows[0]["params"]) if rows else None

    def reset_model(self, engine: str | None = None, model: str | None = None) -> int:
        """Forget what was learned (the model, per-file lower bounds, worker baselines) for one
        engine, one engine/model (with its dtype and profile variants), or everything. The attempts
        stay as history. Returns how many learned models were dropped."""
        where, args = "1 = 1", []
        if engine is not None:
            where, args = "engine = ?", [engine]
            if model is not None:
                where += " AND (model = ? OR model LIKE ? OR model LIKE ?)"
                args += [model, model + "@%", model + "/%"]

        def run(c: sqlite3.Connection) -> int:
            n = c.execute(f"DELETE FROM models WHERE {where}", args).rowcount
            c.execute(f"DELETE FROM lower_bounds WHERE {where}", args)
            c.execute(f"DELETE FROM baselines WHERE {where}", args)
            return n

        return self._write(run)

    # -- reports -------------------------------------------------------------------------------

    def ratios(self) -> list[dict[str, Any]]:
        """What has been learned per (engine, model, device): sample count, fit and baseline."""
        keys: dict[tuple[str, str, str], dict[str, Any]] = {}
        for row in self._read(
            """SELECT engine, model, device, COUNT(*) AS n, MAX(finished_at) AS last FROM attempts
               WHERE outcome = 'done' AND growth_mb IS NOT NULL GROUP BY engine, model, device"""
        ):
            keys[(row["engine"], row["model"], row["device"])] = {"samples": row["n"], "last_sample_at": row["last"]}
        models = {
            (r["engine"], r["model"], r["device"]): r
            for r in self._read("SELECT engine, model, device, params, updated_at FROM models")
        }
        for k in models:
            keys.setdefault(k, {"samples": 0, "last_sample_at": None})
        for r in self._read("SELECT DISTINCT engine, model, device FROM baselines"):
            keys.setdefault((r["engine"], r["model"], r["device"]), {"samples": 0, "last_sample_at": None})

        out = []
        for (engine, model, device), info in sorted(keys.items()):
            m = models.get((engine, model, device))
            params = (_loads(m["params"]) if m else None) or {}
            out.append(
                {
                    "engine": engine,
                    "model": model,
                    "device": device,
                    "samples": info["samples"],
                    "model_samples": params.get("n_samples"),
                    "intercept_mb": params.get("intercept_mb"),
                    "mb_per_span_second": params.get("mb_per_span_second"),
                    "mb_per_audio_second": params.get("mb_per_audio_second"),
                    "mb_per_media_mb": params.get("mb_per_media_mb"),
                    "upper_intercept_mb": params.get("upper_intercept_mb"),
                    "upper_mb_per_audio_second": params.get("upper_mb_per_audio_second"),
                    "upper_mb_per_media_mb": params.get("upper_mb_per_media_mb"),
                    "baseline_mb": self.baseline(engine, model, device),
                    "updated_at": m["updated_at"] if m else info["last_sample_at"],
                }
            )
        return out

    def summary(self, run_id: str | None = None) -> dict[str, Any]:
        """Totals for one run, or for every run in the store when ``run_id`` is None.

        ``throughput`` is audio hours aligned per wall-clock hour (audio seconds of done files over
        the runs' wall time); ``worker_s`` adds up the workers' busy time.

        A file's status is its latest attempt's outcome: done, quarantined, or otherwise failed
        (a file killed and then finished on retry counts as done; the kill still counts as a kill).
        """
        if run_id is None:
            where, args = "", ()
            run_rows = self._read("SELECT run_id, started_at, finished_at FROM runs")
        else:
            where, args = "WHERE run_id = ?", (run_id,)
            run_rows = self._read("SELECT run_id, started_at, finished_at FROM runs WHERE run_id = ?", args)
        rows = [dict(r) for r in self._read(f"SELECT * FROM attempts {where} ORDER BY finished_at, id", args)]

        outcomes: dict[str, int] = {}
        per_file: dict[str, dict[str, Any]] = {}  # by absolute path: the same file in any run
        for r in rows:
            outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
            per_file[r["path"]] = r
        done = [r for r in per_file.values() if r["outcome"] == "done"]
        quarantined = [r for r in per_file.values() if r["outcome"] == "quarantined"]
        failed = [r for r in per_file.values() if r["outcome"] not in ("done", "quarantined")]

        wall = 0.0
        spans: dict[str, list[float]] = {}
        for r in rows:
            span = spans.setdefault(r["run_id"], [math.inf, -math.inf])
            span[0] = min(span[0], r["started_at"])
            span[1] = max(span[1], r["finished_at"])
        for rr in run_rows:
            span = spans.setdefault(rr["run_id"], [math.inf, -math.inf])
            span[0] = min(span[0], rr["started_at"])
            if rr["finished_at"] is not None:
                span[1] = max(span[1], rr["finished_at"])
        for start, end in spans.values():
            if math.isfinite(start) and math.isfinite(end) and end > start:
                wall += end - start
        audio = sum(r["audio_seconds"] or 0.0 for r in done)

        def brief(r: dict[str, Any]) -> dict[str, Any]:
            return {
                "run": r["run_id"],
                "file": r["file"],
                "outcome": r["outcome"],
                "peak_mb": r["peak_mb"],
                "growth_mb": r["growth_mb"],
                "predicted_mb": r["predicted_mb"],
                "audio_seconds": r["audio_seconds"],
                "wall_s": r["wall_s"],
            }

        by_peak = sorted((r for r in rows if r["peak_mb"] is not None), key=lambda r: -r["peak_mb"])[:10]
        by_wall = sorted((r for r in rows if r["wall_s"] is not None), key=lambda r: -r["wall_s"])[:10]
        return {
            "run": run_id,
            "runs": len(spans),
            "files": len(per_file),
            "done": len(done),
            "failed": len(failed),
            "quarantined": len(quarantined),
            "kills": outcomes.get("killed", 0),
            "attempts": len(rows),
            "outcomes": outcomes,
            "audio_seconds": audio,
            "wall_s": wall,
            "worker_s": sum(r["wall_s"] or 0.0 for r in rows),
            "throughput": (audio / wall) if wall > 0 else None,
            "worst_by_peak": [brief(r) for r in by_peak],
            "worst_by_wall": [brief(r) for r in by_wall],
            "failed_files": [{"run": r["run_id"], "file": r["file"], "outcome": r["outcome"], "reason": r["reason"]} for r in failed],
            "quarantined_files": [{"run": r["run_id"], "file": r["file"], "reason": r["reason"]} for r in quarantined],
        }


def _loads(blob: str | None) -> Any:
    if blob is None:
        return None
    try:
        return json.loads(blob)
    except json.JSONDecodeError:
        return None


def _json_default(v: Any) -> Any:
    if isinstance(v, (set, frozenset)):
        return sorted(v, key=str)
    return str(v)
