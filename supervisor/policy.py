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

VRAM, when the run has a GPU (``Snapshot.vram_budget_mb`` set; None on a CPU run, which then decides
exactly as without it): a worker's GPU memory and a file's predicted VRAM growth are counted the same
way, and a file is admitted (a worker spawned) only when it fits both budgets and the device's free
memory. There is no VRAM guard: a file that outgrows the device fails with a CUDA out-of-memory in its
own process, which the run treats as a memory failure of that file.
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


# The figure an ADMIT or SPAWN decision carries: MiB it adds to this supervisor's promise.
PROMISE = "promise_mb"


def promise_added_mb(decisions: list["Decision"]) -> float:
    """MiB these decisions add to the pool's unrealised promise (files admitted, workers started)."""
    return sum(float(d.figures.get(PROMISE) or 0.0) for d in decisions if d.act in (Act.ADMIT, Act.SPAWN))


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
    loaded_private_mb: float | None = None  # a starting worker that has loaded its model: its private
    #                                         dirty memory then (none of it shareable with the next)
    file: str | None = None
    growth_mb: float = 0.0  # predicted growth of the running file
    remaining_mb: float | None = None  # what it may still grow by, corrected from its progress
    uncertain: bool = False  # its estimate came from a model not yet trusted
    file_started_at: float | None = None
    paused_at: float | None = None
    idle_since: float | None = None
    vram_mb: float = 0.0  # GPU memory the worker holds now
    vram_remaining_mb: float = 0.0  # what its file may still add on the GPU


@dataclass(frozen=True)
class PendingView:
    file: str
    peak_mb: float  # predicted peak: baseline + growth (with quantile lift and margin)
    growth_mb: float
    central_peak_mb: float  # the central estimate (no margin), or the killed lower bound if higher
    uncertain: bool = False
    vram_growth_mb: float = 0.0
    vram_central_peak_mb: float = 0.0  # as central_peak_mb, on the GPU (0: cold, judged by no one)


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
    # What a starting worker may grow by in its READY probes; None while the model cannot tell (a
    # cold start: then the next worker waits for the last one's READY, as the probes measure it).
    probe_growth_mb: float | None = None
    vram_budget_mb: float | None = None  # None: no GPU accounting (CPU runs)
    vram_free_mb: float | None = None  # the device's free memory less its reserve, when read
    predicted_vram_baseline_mb: float = 0.0


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


def vram_used_mb(s: Snapshot) -> float:
    return sum(w.vram_mb for w in s.workers if w.state != "exited")


def vram_committed_mb(s: Snapshot) -> float:
    """GPU memory held now plus what running files may still add plus starting workers' contexts."""
    live = [w for w in s.workers if w.state in LIVE]
    return (vram_used_mb(s) + sum(max(0.0, w.vram_remaining_mb) for w in live if w.state in RUNNING)
            + sum(s.predicted_vram_baseline_mb for w in live if w.state == "starting"))


def starting_charge(w: WorkerView, s: Snapshot) -> float:
    """What a starting worker may still add to its reading: up to its predicted baseline plus its
    probes' growth where the model can tell it (what it holds now is in ``used_mb`` already). Cold,
    the probes' growth is unknown: its whole predicted baseline again stands for them."""
    if s.probe_growth_mb is None:
        return s.predicted_baseline_mb
    return max(0.0, s.predicted_baseline_mb + s.probe_growth_mb - w.pss_mb)


def committed_mb(s: Snapshot) -> float:
    """Used now plus what running files may still grow by plus what starting workers may still
    take (their baselines, and their probes' growth where the model can tell it)."""
    live = [w for w in s.workers if w.state in LIVE]
    return (used_mb(s) + sum(remaining_growth(w) for w in live)
            + sum(starting_charge(w, s) for w in live if w.state == "starting"))


@dataclass
class _Round:
    """One decision round's figures, derived once from the snapshot."""

    s: Snapshot
    live: list[WorkerView]
    busy: list[WorkerView]
    paused: list[WorkerView]
    idle: list[WorkerView]
    starting: bool
    loading: bool  # a starting worker has not yet loaded its model within the predicted baseline
    used: float
    frac: float
    blind: bool  # host memory could not be read: no room for anything new, no kill on it
    host_room: float  # what the host can still give, keeping the reserve for everyone else
    committed: float
    unrealised: float
    room: float  # budget left after every promise
    capacity: float  # what one worker alone may use: the budget less the supervisor's own share
    psi_some: float
    psi_full: float
    figs: dict
    vram_room: float = float("inf")  # VRAM budget left after every promise (inf: no GPU accounting)
    vram_device_room: float = float("inf")  # the device's free memory less the unrealised VRAM promises
    vram_frac: float = 0.0

    @classmethod
    def of(cls, s: Snapshot) -> "_Round":
        live = [w for w in s.workers if w.state in LIVE]
        used = used_mb(s)  # a killed worker holds its memory until reaped: counted, never acted on
        blind = s.available_mb is None
        committed = committed_mb(s)
        vram: dict = {}
        if s.vram_budget_mb is not None:
            vused, vcommitted = vram_used_mb(s), vram_committed_mb(s)
            vram = dict(vram_room=s.vram_budget_mb - vcommitted,
                        vram_device_room=(float("inf") if s.vram_free_mb is None
                                          else s.vram_free_mb - (vcommitted - vused)),
                        vram_frac=vused / s.vram_budget_mb if s.vram_budget_mb > 0 else float("inf"))
        return cls(s=s, **vram, live=live, busy=[w for w in live if w.state == "busy"],
                   paused=[w for w in live if w.state == "paused"],
                   idle=sorted((w for w in live if w.state == "ready"), key=lambda w: _id_order(w.id)),
                   starting=any(w.state == "starting" for w in live),
                   loading=any(w.state == "starting" and (w.loaded_private_mb is None or s.probe_growth_mb is None
                                                          or w.loaded_private_mb > s.predicted_baseline_mb)
                               for w in live), used=used,
                   frac=used / s.budget_mb if s.budget_mb > 0 else float("inf"), blind=blind,
                   host_room=-float("inf") if blind else s.available_mb - s.reserve_mb - s.others_reserved_mb,
                   committed=committed, unrealised=committed - used, room=s.budget_mb - committed,
                   capacity=s.budget_mb - s.overhead_mb, psi_some=s.psi_some10 or 0.0, psi_full=s.psi_full10 or 0.0,
                   figs={"used_mb": round(used, 1), "budget_mb": round(s.budget_mb, 1),
                         "available_mb": None if blind else round(s.available_mb, 1)})

    def take(self, growth_mb: float, vram_mb: float = 0.0) -> None:
        """A file was admitted in this round: its growth (and its VRAM growth) is promised."""
        self.room -= growth_mb
        self.committed += growth_mb
        self.unrealised += growth_mb
        self.vram_room -= vram_mb
        self.vram_device_room -= vram_mb

    def vram_fits(self, vram_mb: float) -> bool:
        """``vram_mb`` more fits the VRAM budget and the device (always, without a GPU)."""
        return vram_mb <= self.vram_room and vram_mb <= self.vram_device_room


class MemoryPolicy:
    """Decides what the pool does next. Holds only the hysteresis it needs (last kill, last pause)."""

    def __init__(self, bands: Bands) -> None:
        self.bands = bands
        self._last_kill_at: float | None = None
        self._used_at_kill: float | None = None
        self._last_pause_at: float | None = None
        self._rejected: set[str] = set()

    def decide(self, s: Snapshot) -> list[Decision]:
        """The steps in order; the first that decides something ends the round."""
        c = _Round.of(s)
        for step in (self._guard, self._overdue_pauses, self._pressure, self._resume):
            got = step(c)
            if got is not None:
                return got
        if s.draining:
            return []
        out, pending = self._rejects(c)
        if not pending:
            return out + self._retire_idle(s, c.live)
        return out + self._admit(c, pending)

    # 1. The guard. One kill at a time; then let memory fall before judging again.
    def _guard(self, c: "_Round") -> list[Decision] | None:
        b, s = self.bands, c.s
        settling = (self._last_kill_at is not None and s.now - self._last_kill_at < b.kill_settle_s
                    and (self._used_at_kill is None or c.used >= self._used_at_kill * 0.98))
        over_guard = c.frac >= b.kill_above or (not c.blind and c.host_room < -s.reserve_mb * 0.5)
        if over_guard and not settling:
            victim = self._kill_victim(c.live)
            if victim is not None:
                self._last_kill_at = s.now
                self._used_at_kill = c.used
                why = "over the guard" if c.frac >= b.kill_above else "host memory nearly exhausted"
                return [Decision(Act.KILL, worker=victim.id, file=victim.file, reason=why,
                                 figures={**c.figs, "uss_mb": round(victim.uss_mb, 1)})]
        return [] if settling else None

    # 2. Paused too long: give the memory back and retry the file later.
    def _overdue_pauses(self, c: "_Round") -> list[Decision] | None:
        s = c.s
        out = [Decision(Act.KILL, worker=w.id, file=w.file, reason="paused too long",
                        figures={**c.figs, "paused_s": round(s.now - w.paused_at, 1)})
               for w in c.paused if w.paused_at is not None and s.now - w.paused_at > self.bands.max_pause_s]
        return out or None

    # 3. Pressure: pause the newest file (one at a time, with a cooldown so the effect shows). Files
    # growing past their predictions count too: pause before the guard has to kill.
    def _pressure(self, c: "_Round") -> list[Decision] | None:
        b, s = self.bands, c.s
        overgrowing = c.committed >= b.kill_above * s.budget_mb and any(
            w.remaining_mb is not None and w.remaining_mb > w.growth_mb - max(0.0, w.uss_mb - (w.baseline_uss_mb or w.uss_mb))
            for w in c.busy + c.paused)
        host_short = not c.blind and c.host_room < 0
        frac_over = c.frac >= b.pause_above
        stalled = c.psi_full >= b.psi_pause_above
        pressure = frac_over or stalled or host_short or overgrowing
        cooled = self._last_pause_at is None or s.now - self._last_pause_at >= b.pause_cooldown_s
        if not (pressure and cooled and len(c.busy) > 1 and not s.draining):
            return None
        newest = max(c.busy, key=lambda w: (w.file_started_at or 0.0, _id_order(w.id)))
        self._last_pause_at = s.now
        why = ("memory above the pause band" if frac_over else "memory pressure stall (PSI)" if stalled
               else "host MemAvailable below the reserve" if host_short
               else "running files growing past their predictions")
        return [Decision(Act.PAUSE, worker=newest.id, file=newest.file, reason=why,
                         figures={**c.figs, "committed_mb": round(c.committed, 1)})]

    # 4. Resume oldest-first once memory has recovered and the paused file's growth fits.
    def _resume(self, c: "_Round") -> list[Decision] | None:
        b, s = self.bands, c.s
        if not c.paused or not (c.frac < b.resume_below or s.draining) or c.psi_full >= b.psi_pause_above:
            return None
        oldest = min(c.paused, key=lambda w: (w.paused_at or 0.0, _id_order(w.id)))
        grow = remaining_growth(oldest)
        if s.draining or (c.used + grow <= b.pause_above * s.budget_mb and grow <= c.host_room):
            return [Decision(Act.RESUME, worker=oldest.id, file=oldest.file,
                             reason="memory recovered" if not s.draining else "draining",
                             figures={**c.figs, "paused_s": round(s.now - (oldest.paused_at or s.now), 1)})]
        return None

    # 5. Files that cannot fit even alone fail at once. Alone, a worker has the budget less what the
    # supervisor (and its zygote) hold.
    def _rejects(self, c: "_Round") -> tuple[list[Decision], list[PendingView]]:
        s, out, pending = c.s, [], []
        vram_cap = s.vram_budget_mb if s.vram_budget_mb is not None else float("inf")
        for p in s.pending:
            if p.central_peak_mb <= c.capacity and p.vram_central_peak_mb <= vram_cap:
                pending.append(p)
            elif p.file not in self._rejected and p.central_peak_mb <= c.capacity:
                self._rejected.add(p.file)
                out.append(Decision(Act.REJECT, file=p.file, reason=(
                    f"needs ~{gib(p.vram_central_peak_mb)} GiB of GPU memory, the VRAM budget is "
                    f"{gib(vram_cap)} GiB"), figures={**c.figs, "vram_peak_mb": round(p.vram_central_peak_mb, 1)}))
            elif p.file not in self._rejected:
                self._rejected.add(p.file)
                left = f" ({gib(c.capacity)} GiB beside the supervisor)" if s.overhead_mb >= 1 else ""
                out.append(Decision(Act.REJECT, file=p.file, reason=(
                    f"needs ~{gib(p.central_peak_mb)} GiB, budget is {gib(s.budget_mb)} GiB{left}"),
                    figures={**c.figs, "predicted_mb": round(p.peak_mb, 1)}))
        return out, pending

    # 6. Admit, first fit in queue order; a file predicted over the budget needs the pool alone.
    def _admit(self, c: "_Round", pending: list[PendingView]) -> list[Decision]:
        b, s = self.bands, c.s
        if not (c.frac < b.admit_below and c.psi_some < b.psi_admit_below and not c.paused and not c.blind
                and c.vram_frac < b.admit_below):
            return []
        # Cold runs learn cheaply: one uncertain large file at a time.
        large = UNCERTAIN_LARGE * c.capacity
        if any(w.uncertain and s.predicted_baseline_mb + w.growth_mb > large for w in c.busy + c.paused):
            pending = [p for p in pending if not (p.uncertain and p.peak_mb > large)]
            if not pending:
                return []
        if pending[0].peak_mb > c.capacity:
            return self._alone(c, pending[0])
        out: list[Decision] = []
        assigned: set[str] = set()
        uncertain_large = False
        for w in c.idle:
            for p in pending:
                bet = p.uncertain and p.peak_mb > large
                if p.file in assigned or p.peak_mb > c.capacity or (bet and uncertain_large):
                    continue
                if (p.growth_mb <= c.room and c.unrealised + p.growth_mb <= c.host_room
                        and c.vram_fits(p.vram_growth_mb)):
                    uncertain_large = uncertain_large or bet
                    out.append(Decision(Act.ADMIT, worker=w.id, file=p.file, reason="fits",
                                        figures={**c.figs, "predicted_mb": round(p.peak_mb, 1),
                                                 "committed_mb": round(c.committed + p.growth_mb, 1),
                                                 PROMISE: p.growth_mb}))
                    assigned.add(p.file)
                    c.take(p.growth_mb, p.vram_growth_mb)
                    break
        waiting = [p for p in pending if p.file not in assigned and p.peak_mb <= c.capacity]
        if not waiting:
            return out + self._retire_idle(s, c.live)
        if len(c.idle) > len(out):
            return out + self._idle_but_blocked(c, waiting, [w for w in c.idle
                                                             if not any(d.worker == w.id for d in out)], bool(out))
        return out + self._spawn(c, waiting)

    def _alone(self, c: "_Round", head: PendingView) -> list[Decision]:
        """The head needs the pool alone: wait for running files, retire all idle workers but one."""
        if c.busy or c.paused or c.starting:
            return []
        if len(c.idle) > 1:
            largest = max(c.idle[1:], key=lambda w: w.pss_mb)
            return [Decision(Act.RETIRE, worker=largest.id, reason="a file must run alone", figures=c.figs)]
        if c.idle and c.vram_fits(head.vram_growth_mb):
            return [Decision(Act.ADMIT, worker=c.idle[0].id, file=head.file, reason="runs alone",
                             figures={**c.figs, "predicted_mb": round(head.peak_mb, 1),
                                      "committed_mb": round(c.committed, 1), PROMISE: head.growth_mb})]
        if c.idle:
            return []
        return [Decision(Act.SPAWN, reason="a file must run alone",
                         figures={**c.figs, PROMISE: c.s.predicted_baseline_mb})]

    def _idle_but_blocked(self, c: "_Round", waiting: list[PendingView], free_idle: list[WorkerView],
                          assigned: bool) -> list[Decision]:
        """Idle workers that cannot take the head: if their memory is what blocks it (in the budget
        or on the host), retire the largest one so the file can start later. One idle worker with
        nothing else in the pool frees nothing by waiting: a file whose predicted peak fits the pool
        alone runs now (the worker's measured baseline may differ from the predicted one by a few MiB)."""
        if assigned or c.busy or c.paused:
            return []
        need = waiting[0].growth_mb
        vneed = waiting[0].vram_growth_mb
        if len(free_idle) > 1:
            if need > c.room or c.unrealised + need > c.host_room or not c.vram_fits(vneed):
                largest = max(free_idle, key=lambda w: w.pss_mb)
                return [Decision(Act.RETIRE, worker=largest.id, reason="idle worker blocks a large file",
                                 figures=c.figs)]
            return []
        if not c.starting and len(c.idle) == 1 and c.unrealised + need <= c.host_room and c.vram_fits(vneed):
            head = waiting[0]
            return [Decision(Act.ADMIT, worker=c.idle[0].id, file=head.file, reason="runs alone",
                             figures={**c.figs, "predicted_mb": round(head.peak_mb, 1),
                                      "committed_mb": round(c.committed + head.growth_mb, 1),
                                      PROMISE: head.growth_mb})]
        return []

    # 7. Spawn one worker at a time while a waiting file would fit beside a new worker: the next
    #    one starts loading once the last has loaded its model within the predicted baseline (its
    #    probes then run beside the next load, still counted as a starting worker's baseline).
    def _spawn(self, c: "_Round", waiting: list[PendingView]) -> list[Decision]:
        s = c.s
        if c.loading or len(c.live) >= s.max_workers:
            return []
        # Workers still running their probes take the head of the queue once READY: a new worker
        # must leave those files their room, or the largest file would lose its turn to a small one.
        # A starting worker is charged its probes' growth already, and it holds the probes' memory
        # or a file's, never both: a head file needs only what it grows beyond the probes.
        # The new worker runs its own probes before its file, so it is charged the larger of the two.
        probe = s.probe_growth_mb or 0.0
        k = sum(1 for w in c.live if w.state == "starting")
        held = sum(max(0.0, p.growth_mb - probe) for p in waiting[:k])
        vheld = sum(p.vram_growth_mb for p in waiting[:k])
        for p in waiting[k:]:
            cost = s.predicted_baseline_mb + max(p.growth_mb, probe) + held
            if (cost <= c.room and c.unrealised + cost <= c.host_room
                    and c.vram_fits(s.predicted_vram_baseline_mb + p.vram_growth_mb + vheld)):
                return [Decision(Act.SPAWN, file=p.file, reason="a waiting file fits beside a new worker",
                                 figures={**c.figs, "predicted_mb": round(cost, 1),
                                          "committed_mb": round(c.committed, 1), PROMISE: cost})]
        return []

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
