"""Publishing: what the run tells the outside world, and the host ledger it shares with others.

Owns the throttles of the memory-sample log, the watchdog ping, the systemd status line and the
status hooks (metrics textfile), and this supervisor's view of the host ledger: what it last
published and what the others' believed promises take from its room. Ledger reads and writes run
off the loop; a ledger that cannot be read is said once and answered conservatively (the largest
charge seen this run, and at least the reserve once more), never as "nobody else is here".
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

from supervisor.ledger import HostLedger, charged
from supervisor.sd_notify import Notifier
from supervisor.sidejobs import SideJobs

MiB = 2**20
LANE = "ledger"


class Publisher:
    def __init__(self, *, notifier: Notifier, jobs: SideJobs, emit: Callable[..., None], display: Any = None) -> None:
        self.notifier = notifier
        self.jobs = jobs
        self.emit = emit
        self.display = display
        self.hooks: list[Callable[[dict], None]] = []
        self.ledger: HostLedger | None = None
        self.owner = ""
        self.others_mb = 0.0  # what other supervisors' promises take from this one's room
        self._others_max_mb = 0.0
        self._ledger_error: str | None = None
        self._published_mb = 0.0  # the promise the ledger holds for this supervisor (last written)
        self._claimed_mb = 0.0  # a promise claimed and not yet acted on (0: none)
        self._claiming = False
        self._last_sample = self._last_status = self._last_watchdog = -1e9

    # -- the ledger -------------------------------------------------------------------------------
    def open_ledger(self, spec: str, owner: str) -> None:
        if spec == "off":
            return
        self.owner = owner
        try:
            self.ledger = HostLedger(Path(spec) if spec else None)
            self.ledger.register(owner)
        except OSError as exc:
            self.emit("ledger_unavailable", level="warning", path=spec or None, error=str(exc),
                      effect="admitting as if other supervisors held the reserve once more")
            self._ledger_error = str(exc)
            self.ledger = None

    def ledger_blind(self) -> bool:
        return self._ledger_error is not None

    def others_now(self, reserve_mb: float) -> float:
        """What other supervisors take from this one's room: their believed promises, or while the
        ledger cannot be read, the most seen this run and at least one more reserve."""
        if self.ledger_blind():
            return max(self._others_max_mb, reserve_mb)
        return self.others_mb

    def exchange(self, promised_mb: float, host: Any) -> None:
        """Publish this supervisor's promise and read the others' (off the loop, one at a time)."""
        if self.ledger is None or self.jobs.busy(LANE):
            return
        ledger, owner = self.ledger, self.owner
        charge = _charge(host)
        # Until it lands the ledger holds the old promise or this one: count on the smaller. It also
        # replaces any claim, whose decision was acted on before this (decide comes first).
        self._published_mb = min(max(self._published_mb, self._claimed_mb), promised_mb)
        self._claimed_mb = 0.0

        def work() -> tuple[float, float]:
            ledger.update(owner, int(max(0.0, promised_mb) * MiB))
            return promised_mb, charge(ledger.reservations(owner, _avail(host)))

        self.jobs.submit(LANE, work, what="exchange", on_done=self._exchanged, on_error=self._unreadable)

    def covers(self, promise_mb: float) -> bool:
        """Whether this supervisor may act on a promise this large now: the ledger already holds
        one at least as large (published, or claimed for this decision), or there is no ledger to
        share (none opened, or unreadable: then the others are charged conservatively instead)."""
        if self.ledger is None or self.ledger_blind():
            return True
        return promise_mb <= max(self._published_mb, self._claimed_mb) + 1.0

    def claim(self, promise_mb: float, assumed_others_mb: float, host: Any) -> None:
        """Ask the ledger for a larger promise, granted only while the others take no more of this
        supervisor's room than the decision assumed (``HostLedger.claim``: read and write under
        one lock). Off the loop; the loop decides again when it lands, acting on a granted claim
        or deciding anew on the others' fresh promises."""
        if self.ledger is None or self._claiming:
            return
        ledger, owner = self.ledger, self.owner
        charge, avail = _charge(host), _avail(host)

        def work() -> tuple[bool, float]:
            ok, rs = ledger.claim(owner, int(max(0.0, promise_mb) * MiB), avail,
                                  lambda rs: charge(rs) <= assumed_others_mb + 1.0)
            return ok, charge(rs)

        def done(result: tuple[bool, float]) -> None:
            self._claiming = False
            ok, others_mb = result
            self._read(others_mb)
            if ok:
                self._claimed_mb = promise_mb
                self._published_mb = promise_mb
            else:
                self.emit("ledger_claim_refused", level="debug", promise_mb=round(promise_mb, 1),
                          assumed_others_mb=round(assumed_others_mb, 1), others_mb=round(others_mb, 1))

        def failed(exc: BaseException) -> None:
            self._claiming = False
            self._unreadable(exc)

        self._claiming = True
        self.jobs.submit(LANE, work, what="claim", on_done=done, on_error=failed)

    def _exchanged(self, result: tuple[float, float]) -> None:
        published_mb, others_mb = result
        self._published_mb = published_mb
        self._read(others_mb)

    def _read(self, others_mb: float) -> None:
        if self._ledger_error is not None:
            self.emit("ledger_recovered", path=str(self.ledger.path) if self.ledger else None)
        self._ledger_error = None
        self.others_mb = others_mb
        self._others_max_mb = max(self._others_max_mb, others_mb)

    def _unreadable(self, exc: BaseException) -> None:
        if self._ledger_error is None:
            self.emit("ledger_unreadable", level="warning", path=str(self.ledger.path) if self.ledger else None,
                      error=f"{type(exc).__name__}: {exc}",
                      effect="admitting as if other supervisors held the most seen this run, at least the reserve")
        self._ledger_error = str(exc)

    def close_ledger(self) -> None:
        if self.ledger is not None:
            try:
                self.ledger.unregister(self.owner)
            except OSError as exc:
                self.emit("ledger_unavailable", level="warning", path=str(self.ledger.path), error=str(exc))

    # -- log, watchdog, status ---------------------------------------------------------------------
    def tick(self, now: float, *, status: Callable[[], dict], sample: Callable[[], dict], interval: float,
             busy: bool, counts: dict) -> None:
        if now - self._last_sample >= interval:
            self._last_sample = now
            self.emit("memory_sample", level="info" if busy else "debug", **sample())
        self.watchdog(now)
        if now - self._last_status >= 2.0:
            self._last_status = now
            c = counts
            mem = sample()
            self.notifier.status(f"{c['done']}/{c['total'] - c['skipped']} done, {c['running']} running, "
                                 f"{c['failed'] + c['quarantined']} failed; memory {mem['used_mb']:.0f}/"
                                 f"{mem['budget_mb']:.0f} MiB")
            if self.hooks and not self.jobs.busy("status"):
                snap = status()
                for hook in self.hooks:
                    self.jobs.submit("status", hook, snap, what="status hook")
        if self.display is not None:
            self.display.update(status())

    def watchdog(self, now: float) -> None:
        interval = self.notifier.watchdog_interval
        if interval and now - self._last_watchdog >= interval:
            self._last_watchdog = now
            self.notifier.watchdog()


def status_header(run_id: str, wall0: float, uptime_s: float, draining: bool) -> dict[str, Any]:
    return {"run": run_id, "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall0)),
            "uptime_s": round(uptime_s, 1), "draining": draining}


def memory_figures(*, used: float, committed: float, budget_mb: float, limit_mb: float, host: Any,
                   others_mb: float, workers: list) -> dict[str, Any]:
    """The memory part of ``memory_sample`` events and of the status snapshot (MiB)."""
    return {"used_mb": round(used, 1), "committed_mb": round(committed, 1), "budget_mb": round(budget_mb, 1),
            "limit_mb": round(limit_mb, 1), "available_mb": round(host.available / MiB, 1) if host else None,
            "psi_some10": host.psi_some_avg10 if host else None, "others_reserved_mb": round(others_mb, 1),
            "workers": [{"worker": w.id, "pid": w.pid, "state": w.state.value, "uss_mb": round(w.uss_mb, 1),
                         "pss_mb": round(w.pss_mb, 1), "file": w.job.rel if w.job else None} for w in workers]}


def status_of(*, header: dict, now: float, memory: dict | None, budget_mb: float, limit_mb: float, queue: Any,
              intake: Any, audio_done_s: float, kills: int, pauses: int, workers: list) -> dict[str, Any]:
    """The status snapshot, from what each part owns."""
    c = queue.counts()
    keys = ("used_mb", "budget_mb", "limit_mb", "committed_mb", "available_mb")
    mem = ({k: memory[k] for k in keys} if memory is not None else
           {"used_mb": 0.0, "committed_mb": 0.0, "budget_mb": round(budget_mb, 1), "limit_mb": round(limit_mb, 1),
            "available_mb": None})
    return {
        **header,
        "memory": mem,
        "files": {k: c[k] for k in ("pending", "running", "done", "failed", "quarantined", "skipped", "total")},
        "planning": {"planned": intake.planned, "files": intake.total} if intake.planning else None,
        "audio_done_s": round(audio_done_s, 1),
        "audio_total_s": round(sum(j.info.audio_seconds or 0 for j in queue if j.state.value != "skipped"), 1),
        "kills": kills, "pauses": pauses,
        "workers": [{"worker": w.id, "pid": w.pid, "state": w.state.value, "file": w.job.rel if w.job else None,
                     "uss_mb": round(w.uss_mb, 1), "pss_mb": round(w.pss_mb, 1),
                     "predicted_mb": round(w.job.estimate.peak_mb, 1) if w.job is not None and w.job.estimate else None,
                     "progress": w.progress,
                     "since_s": round(now - (w.file_started_at or w.idle_since or w.spawned_at), 1)}
                    for w in workers],
        "queue": [{"file": j.rel, "predicted_mb": round(j.estimate.peak_mb, 1) if j.estimate else None,
                   "attempts": j.attempts} for j in queue.pending()[:20]],
    }


def _avail(host: Any) -> int | None:
    return host.mem_available if host is not None else None


def _charge(host: Any) -> Callable[[list], float]:
    """MiB the others' believed reservations take from this supervisor's room, on ``host``'s readings."""
    avail = _avail(host)
    headroom = host.cgroup_headroom if host is not None else None
    cg = host.cgroup_path if host is not None else None

    def charge(rs: list) -> float:
        if avail is None:
            return sum(r.reserved_bytes for r in rs) / MiB
        return charged(rs, host_available=avail, cgroup_headroom=headroom, own_cgroup=cg) / MiB

    return charge
