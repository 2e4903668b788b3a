"""The memory policy: a snapshot of the pool goes in, decisions come out. No I/O, no clock.

All figures are MiB. A worker's *cost* is the PSS of its process tree (shared, file-backed model
pages counted once across the pool); a running file's *remaining growth* is what it may still grow
by: given in the snapshot (corrected from the file's progress by the supervisor, in one place),
else its predicted growth minus the private growth already seen. Committed memory is
what the pool uses now plus what its running files are still predicted to grow by, plus the
predicted baseline of a worker that is still starting. A file is admitted only when its predicted
growth fits into both the budget and the host's MemAvailable minus the reserve (other users share
the server), after counting every promise already made. When the host's memory cannot be read
(``available_mb`` is None) nothing new is admitted or spawned: room that cannot be measured is no room.

Cold runs learn cheaply: while a file's estimate is ``uncertain`` (the model for its engine is not
yet trusted), at most one uncertain *large* file (over a quarter of the pool's capacity) runs at a
time, so a wrong cold guess costs one kill, not a storm.

Bands over the budget, with hysteresis (fractions of the budget, from settings):

    used >= kill_above      kill one worker (newest file, or furthest over its prediction), then
                            wait ``kill_settle`` for memory to fall before killing another
    used >= pause_above     pause (SIGSTOP) the worker whose file started last
    used >= admit_below     admit nothing new
    used <  resume_below    resume paused workers, oldest first, when their remaining growth fits
    committed >= kill_above pause the newest file: running files are growing past their
                            predictions and would reach the guard
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from supervisor.units import gib


class Act(enum.Enum):
    SPAWN = "spawn"
    ADMIT = "admit"
    PAUSE = "pause"
    RESUME = "resume"
    KILL = "kill"
    RETIRE = "retire"
    REJECT = "reject"  # a file that cannot fit even alone: fail it at once


@dataclass(frozen=True)
class Decision:
    act: Act
    worker: str | int | None = None
    file: str | None = None
    reason: str = ""
    figures: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class WorkerView:
    id: str | int
    state: str  # a WorkerState value: starting, ready, busy, paused, stopping, killed
    pss_mb: float
    uss_mb: float
    baseline_uss_mb: float | None = None
    file: str | None = None
    growth_mb: float = 0.0  # predicted growth of the running file
    remaining_mb: float | None = None  # what it may still grow by, corrected from its progress
    uncertain: bool = False  # its estimate came from a model not yet trusted
    file_started_at: float | None = None
    paused_at: float | None = None
    idle_since: float | None = None


@dataclass(frozen=True)
class PendingView:
    file: str
    peak_mb: float  # predicted peak: baseline + growth (with quantile lift and margin)
    growth_mb: float
    central_peak_mb: float  # the central estimate (no margin), or the killed lower bound if higher
    uncertain: bool = False


@dataclass(frozen=True)
class Snapshot:
    now: float
    budget_mb: float
    reserve_mb: float
    available_mb: float | None  # host (cgroup-aware) MemAvailable; None when it cannot be read
    workers: tuple[WorkerView, ...]
    pending: tuple[PendingView, ...]  # in queue order
    predicted_baseline_mb: float
    max_workers: int
    psi_some10: float | None = None
    psi_full10: float | None = None
    draining: bool = False
    others_reserved_mb: float = 0.0  # unrealised promises of other supervisors on this host
    overhead_mb: float = 0.0  # the supervisor's own memory, charged to the budget
    idle_retire_s: float | None = None  # retire workers idle this long (watch mode)


@dataclass(frozen=True)
class Bands:
    admit_below: float = 0.90
    pause_above: float = 0.95
    resume_below: float = 0.85
    kill_above: float = 1.0
    psi_admit_below: float = 20.0
    psi_pause_above: float = 60.0
    max_pause_s: float = 300.0
    kill_settle_s: float = 3.0
    pause_cooldown_s: float = 1.0


LIVE = ("starting", "ready", "busy", "paused")
UNCERTAIN_LARGE = 0.25  # of capacity: an uncertain file this large runs alone among uncertain ones
RUNNING = ("busy", "paused")


def remaining_growth(w: WorkerView) -> float:
    if w.state not in RUNNING:
        return 0.0
    if w.remaining_mb is not None:
        return max(0.0, w.remaining_mb)
    if w.baseline_uss_mb is None:
        return 0.0
    seen = max(0.0, w.uss_mb - w.baseline_uss_mb)
    return max(0.0, w.growth_mb - seen)


def _id_order(worker_id: str | int) -> tuple[int, str]:
    """Worker ids in spawn order: "w2" before "w10" (ints for tests that use them)."""
    text = str(worker_id)
    digits = "".join(c for c in text if c.isdigit())
    return (int(digits) if digits else 0, text)


def used_mb(s: Snapshot) -> float:
    """What the pool holds now: every worker not yet reaped, plus the supervisor's own share."""
    return sum(w.pss_mb for w in s.workers if w.state != "exited") + s.overhead_mb


def committed_mb(s: Snapshot) -> float:
    """Used now plus what running files may still grow by plus starting workers' baselines."""
    live = [w for w in s.workers if w.state in LIVE]
    return (used_mb(s) + sum(remaining_growth(w) for w in live)
            + sum(s.predicted_baseline_mb for w in live if w.state == "starting"))


class MemoryPolicy:
    """Decides what the pool does next. Holds only the hysteresis it needs (last kill, last pause)."""

    def __init__(self, bands: Bands) -> None:
        self.bands = bands
        self._last_kill_at: float | None = None
        self._used_at_kill: float | None = None
        self._last_pause_at: float | None = None
        self._rejected: set[str] = set()

    def decide(self, s: Snapshot) -> list[Decision]:
        b = self.bands
        live = [w for w in s.workers if w.state in LIVE]
        # A killed worker holds its memory until it is reaped: count it, but never act on it.
        used = used_mb(s)
        frac = used / s.budget_mb if s.budget_mb > 0 else float("inf")
        # Host headroom: what the machine can still give, keeping the reserve for everyone else.
        # Unreadable host memory: no room for anything new, and no kill on a reading we lack.
        blind = s.available_mb is None
        host_room = -float("inf") if blind else s.available_mb - s.reserve_mb - s.others_reserved_mb
        figs = {"used_mb": round(used, 1), "budget_mb": round(s.budget_mb, 1),
                "available_mb": None if blind else round(s.available_mb, 1)}
        out: list[Decision] = []

        # 1. The guard. One kill at a time; then let memory fall before judging again.
        settling = (self._last_kill_at is not None and s.now - self._last_kill_at < b.kill_settle_s
                    and (self._used_at_kill is None or used >= self._used_at_kill * 0.98))
        over_guard = frac >= b.kill_above or (not blind and host_room < -s.reserve_mb * 0.5)
        if over_guard and not settling:
            victim = self._kill_victim(live)
            if victim is not None:
                self._last_kill_at = s.now
                self._used_at_kill = used
                why = "over the guard" if frac >= b.kill_above else "host memory nearly exhausted"
                return [Decision(Act.KILL, worker=victim.id, file=victim.file, reason=why,
                                 figures={**figs, "uss_mb": round(victim.uss_mb, 1)})]
        if settling:
            return []

        # 2. Paused too long: give the memory back and retry the file later.
        for w in live:
            if w.state == "paused" and w.paused_at is not None and s.now - w.paused_at > b.max_pause_s:
                out.append(Decision(Act.KILL, worker=w.id, file=w.file, reason="paused too long",
                                    figures={**figs, "paused_s": round(s.now - w.paused_at, 1)}))
        if out:
            return out

        busy = [w for w in live if w.state == "busy"]
        paused = [w for w in live if w.state == "paused"]
        psi_full = s.psi_full10 or 0.0
        psi_some = s.psi_some10 or 0.0

        committed = committed_mb(s)
        unrealised = committed - used

        # 3. Pressure: pause the newest file (one at a time, with a cooldown so the effect shows).
        # Files growing past their predictions count too: pause before the guard has to kill.
        overgrowing = committed >= b.kill_above * s.budget_mb and any(
            w.remaining_mb is not None and w.remaining_mb > w.growth_mb - max(0.0, w.uss_mb - (w.baseline_uss_mb or w.uss_mb))
            for w in busy + paused)
        pressure = (frac >= b.pause_above or psi_full >= b.psi_pause_above or (not blind and host_room < 0)
                    or overgrowing)
        cooled = self._last_pause_at is None or s.now - self._last_pause_at >= b.pause_cooldown_s
        if pressure and cooled and len(busy) > 1 and not s.draining:
            newest = max(busy, key=lambda w: (w.file_started_at or 0.0, _id_order(w.id)))
            self._last_pause_at = s.now
            why = ("memory above the pause band" if frac >= b.pause_above
                   else "memory pressure stall (PSI)" if psi_full >= b.psi_pause_above
                   else "host MemAvailable below the reserve" if not blind and host_room < 0
                   else "running files growing past their predictions")
            return [Decision(Act.PAUSE, worker=newest.id, file=newest.file, reason=why,
                             figures={**figs, "committed_mb": round(committed, 1)})]

        # 4. Resume oldest-first once memory has recovered and the paused file's growth fits.
        if paused and (frac < b.resume_below or s.draining) and psi_full < b.psi_pause_above:
            oldest = min(paused, key=lambda w: (w.paused_at or 0.0, _id_order(w.id)))
            grow = remaining_growth(oldest)
            if s.draining or (used + grow <= b.pause_above * s.budget_mb and grow <= host_room):
                return [Decision(Act.RESUME, worker=oldest.id, file=oldest.file,
                                 reason="memory recovered" if not s.draining else "draining",
                                 figures={**figs, "paused_s": round(s.now - (oldest.paused_at or s.now), 1)})]
        if s.draining:
            return out

        # 5. Files that cannot fit even alone fail at once. Alone, a worker has the budget less what
        # the supervisor (and its zygote) hold.
        capacity = s.budget_mb - s.overhead_mb
        pending = []
        for p in s.pending:
            if p.central_peak_mb > capacity:
                if p.file not in self._rejected:
                    self._rejected.add(p.file)
                    left = f" ({gib(capacity)} GiB beside the supervisor)" if s.overhead_mb >= 1 else ""
                    out.append(Decision(Act.REJECT, file=p.file, reason=(
                        f"needs ~{gib(p.central_peak_mb)} GiB, budget is {gib(s.budget_mb)} GiB{left}"),
                        figures={**figs, "predicted_mb": round(p.peak_mb, 1)}))
            else:
                pending.append(p)
        if not pending:
            return out + self._retire_idle(s, live)

        admitting = (frac < b.admit_below and psi_some < b.psi_admit_below and not paused and not blind)
        if not admitting:
            return out
        # Cold runs learn cheaply: one uncertain large file at a time.
        large = UNCERTAIN_LARGE * capacity
        if any(w.uncertain and s.predicted_baseline_mb + w.growth_mb > large for w in busy + paused):
            pending = [p for p in pending if not (p.uncertain and p.peak_mb > large)]
            if not pending:
                return out

        # 6. Admit, first fit in queue order; a file predicted over the budget needs the pool alone.
        idle = sorted((w for w in live if w.state == "ready"), key=lambda w: _id_order(w.id))
        starting = any(w.state == "starting" for w in live)
        room = s.budget_mb - committed
        head = pending[0]
        if head.peak_mb > capacity:
            # Runs alone: wait for running files, retire all idle workers but one.
            if busy or paused or starting:
                return out
            if idle:
                if len(idle) > 1:
                    largest = max(idle[1:], key=lambda w: w.pss_mb)
                    return out + [Decision(Act.RETIRE, worker=largest.id, reason="a file must run alone",
                                           figures=figs)]
                return out + [Decision(Act.ADMIT, worker=idle[0].id, file=head.file, reason="runs alone",
                                       figures={**figs, "predicted_mb": round(head.peak_mb, 1),
                                                "committed_mb": round(committed, 1)})]
            return out + [Decision(Act.SPAWN, reason="a file must run alone", figures=figs)]

        assigned: set[str] = set()
        uncertain_large = False
        for w in idle:
            for p in pending:
                if p.file in assigned or p.peak_mb > capacity:
                    continue
                bet = p.uncertain and p.peak_mb > large
                if bet and uncertain_large:
                    continue
                if p.growth_mb <= room and unrealised + p.growth_mb <= host_room:
                    uncertain_large = uncertain_large or bet
                    out.append(Decision(Act.ADMIT, worker=w.id, file=p.file, reason="fits",
                                        figures={**figs, "predicted_mb": round(p.peak_mb, 1),
                                                 "committed_mb": round(committed + p.growth_mb, 1)}))
                    assigned.add(p.file)
                    room -= p.growth_mb
                    committed += p.growth_mb
                    unrealised += p.growth_mb
                    break
        waiting = [p for p in pending if p.file not in assigned and p.peak_mb <= capacity]
        free_idle = [w for w in idle if not any(d.worker == w.id for d in out if d.act is Act.ADMIT)]
        if not waiting:
            return out + self._retire_idle(s, live)
        if free_idle:
            # Idle workers that are there but cannot take the head: if their memory is what blocks
            # it (in the budget or on the host), retire the largest one so the file can start later.
            if not assigned and not busy and not paused and len(free_idle) > 1:
                need = waiting[0].growth_mb
                if need > room or unrealised + need > host_room:
                    largest = max(free_idle, key=lambda w: w.pss_mb)
                    return out + [Decision(Act.RETIRE, worker=largest.id,
                                           reason="idle worker blocks a large file", figures=figs)]
            # One idle worker and nothing else in the pool: no memory will be freed by waiting. A
            # file whose predicted peak fits the pool alone runs now (the worker's own baseline,
            # measured, may differ from the predicted one by a few MiB).
            if not assigned and not busy and not paused and not starting and len(idle) == 1 \
                    and unrealised + waiting[0].growth_mb <= host_room:
                head = waiting[0]
                return out + [Decision(Act.ADMIT, worker=idle[0].id, file=head.file, reason="runs alone",
                                       figures={**figs, "predicted_mb": round(head.peak_mb, 1),
                                                "committed_mb": round(committed + head.growth_mb, 1)})]
            return out

        # 7. Spawn one worker at a time while a waiting file would fit beside a new worker.
        if starting or len(live) >= s.max_workers:
            return out
        for p in waiting:
            cost = s.predicted_baseline_mb + p.growth_mb
            if cost <= room and s.predicted_baseline_mb + unrealised + p.growth_mb <= host_room:
                out.append(Decision(Act.SPAWN, file=p.file, reason="a waiting file fits beside a new worker",
                                    figures={**figs, "predicted_mb": round(cost, 1),
                                             "committed_mb": round(committed, 1)}))
                break
        return out

    def forget(self, file: str) -> None:
        """A file's estimate changed (requeued): judge it again."""
        self._rejected.discard(file)

    def _kill_victim(self, live: list[WorkerView]) -> WorkerView | None:
        running = [w for w in live if w.state in RUNNING]
        if not running:
            return None

        def overshoot(w: WorkerView) -> float:
            seen = max(0.0, w.uss_mb - (w.baseline_uss_mb or w.uss_mb))
            return seen - w.growth_mb

        over = [w for w in running if overshoot(w) > 0]
        if over:
            return max(over, key=overshoot)
        return max(running, key=lambda w: (w.file_started_at or 0.0, _id_order(w.id)))

    def _retire_idle(self, s: Snapshot, live: list[WorkerView]) -> list[Decision]:
        if s.idle_retire_s is None:
            return []
        for w in live:
            if w.state == "ready" and w.idle_since is not None and s.now - w.idle_since >= s.idle_retire_s:
                return [Decision(Act.RETIRE, worker=w.id, reason="idle")]
        return []
