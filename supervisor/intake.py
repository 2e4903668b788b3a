"""Intake: the one part that adds files to the queue and the one owner of the manifests.

Planning a corpus reads every transcript and its media header and checks the manifest (which
hashes finished outputs): blocking work, done off the loop in batches while the first files
already run, with progress events. Watch mode's inbox scans run off the loop too. What a file's
outcome means for the manifest (done, failed for good) is written here, off the loop, in order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from supervisor import corpus as corpus_mod
from supervisor.corpus import Candidate, FileInfo, Manifest, describe
from supervisor.estimates import Estimator
from supervisor.queue import FileJob, FileState, WorkQueue
from supervisor.sidejobs import SideJobs
from worker.audio import DirListing
from worker.engines.base import JobError
from worker.output import remove_stale_temps

LANE = "manifest"
BATCH = 256  # files described per side job, after a first small one so that the first file starts early
FIRST_BATCH = 16
PROGRESS_S = 1.0


@dataclass(frozen=True)
class Planned:
    """A described file and what the manifest says about it (found off the loop)."""

    info: FileInfo
    done: bool
    failed_before: dict | None
    features: Any = None  # what the engine will hold for it (telemetry.model.FileFeatures)
    stale: str | None = None  # why a finished output must be made again (other settings)
    refused: str | None = None  # the reader's one line when the transcript cannot be read as CHAT


class Intake:
    def __init__(self, *, queue: WorkQueue, estimator: Estimator, jobs: SideJobs, emit: Callable[..., None],
                 forget: Callable[[str], None], force: bool, media_dir: Path | None, out_root: Path | None,
                 in_place: bool, watcher: Any = None, clock: Callable[[], float] = time.monotonic,
                 listing: DirListing | None = None, identity: dict | None = None,
                 plan: Callable[[FileInfo], Any] | None = None) -> None:
        self.queue = queue
        self.estimator = estimator
        self.jobs = jobs
        self.emit = emit
        self.forget = forget  # the policy's memory of a file whose estimate changed
        self.force = force
        self.media_dir = media_dir
        self.out_root = out_root.resolve() if out_root is not None else None
        self.in_place = in_place
        self.watcher = watcher
        self.clock = clock
        self.manifests: dict[Path, Manifest] = {}
        self.identity = identity  # what makes outputs now: a finished file made otherwise is redone
        self.plan = plan  # a file's planned features (blocking: called off the loop)
        self.realigned: list[tuple[str, str]] = []  # (file, what changed) of finished outputs made again
        self.total = 0
        self.planned = 0
        self.planning = False
        self._t0 = 0.0
        self._progress_at = -1e9
        self._listing = listing if listing is not None else DirListing()  # each folder listed once
        self._scanning = False
        self._started_wall = time.time()
        self._swept: set[Path] = set()  # output folders cleared of a killed writer's temporary files
        self._stale: list[Path] = []  # what was cleared, for the loop to report
        self.dry = False  # --dry-run: plan only, write nothing (no manifest, no clean-up)

    # -- off the loop ------------------------------------------------------------------------
    def manifest_for(self, info: FileInfo) -> Manifest:
        depth = len(Path(info.rel).parts)
        root = info.out.parents[depth - 1] if depth else info.out.parent
        m = self.manifests.get(root)
        if m is None:
            m = self.manifests[root] = Manifest(root / corpus_mod.MANIFEST_DIR / "done.jsonl", self.identity)
        return m

    def describe_batch(self, batch: list[Candidate]) -> list[Planned | tuple[Candidate, str]]:
        """Blocking: read, hash and look up each transcript; a file that cannot be read at all is
        returned as (candidate, error) so the run names it, counts it failed and goes on."""
        out: list[Planned | tuple[Candidate, str]] = []
        for c in batch:
            try:
                info = describe(c.root, c.cha, out_root=self.out_root, in_place=self.in_place,
                                media_dir=self.media_dir, rel_base=c.rel_base, listing=self._listing)
            except OSError as exc:
                name = exc.filename if exc.filename not in (None, str(c.cha)) else None
                what = f" {name}" if name else ""
                out.append((c, f"{c.cha}: cannot read{what}: {exc.strerror or exc}"))
                continue
            except Exception as exc:  # noqa: BLE001 - one odd file must not take its whole batch down
                out.append((c, _cannot_plan(c, exc)))
                continue
            if not self.dry:
                self._sweep(info.out.parent)
            try:
                out.append(self._check(info))
            except Exception as exc:  # noqa: BLE001
                out.append((c, _cannot_plan(c, exc)))
        return out

    def _sweep(self, folder: Path) -> None:
        """Blocking: once per output folder, remove temporary files left by writers killed mid-write
        in an earlier run, so an interrupted run re-run leaves nothing of its own behind."""
        if folder not in self._swept:
            self._swept.add(folder)
            self._stale.extend(remove_stale_temps(folder, self._started_wall))

    def _check(self, info: FileInfo) -> Planned:
        m = self.manifest_for(info)
        done, stale = (False, None) if self.force else m.check(info)
        if done:
            return Planned(info, True, None)
        failed_before = None if self.force else m.failed(info)
        try:
            features = self.plan(info) if self.plan is not None and not info.media_error else None
        except JobError as exc:  # the planner read the transcript as the worker would, and it is bad
            return Planned(info, False, failed_before, None, stale, refused=str(exc))
        return Planned(info, False, failed_before, features, stale)

    def plan_now(self, candidates: list[Candidate]) -> None:
        """Plan everything at once (``--dry-run``: nothing else runs)."""
        self.total = len(candidates)
        self.dry = True  # a dry run changes nothing on disk
        for p in self.describe_batch(candidates):
            self._take(p)

    # -- on the loop ---------------------------------------------------------------------------
    def start_planning(self, candidates: list[Candidate]) -> None:
        """Describe the corpus off the loop, batch after batch; files join the queue as they come."""
        self.total, self.planned, self.planning = len(candidates), 0, True
        self._t0 = self.clock()
        head, rest = candidates[:FIRST_BATCH], candidates[FIRST_BATCH:]
        batches = [head] + [rest[i:i + BATCH] for i in range(0, len(rest), BATCH)]
        for n, batch in enumerate(batches):
            last = n == len(batches) - 1
            self.jobs.submit(LANE, self.describe_batch, batch, what="plan",
                             on_done=lambda got, last=last: self._planned(got, last),
                             on_error=lambda exc, last=last: self._plan_failed(exc, last))

    def _planned(self, got: list, last: bool) -> None:
        stale, self._stale = self._stale, []
        for path in stale:
            self.emit("stale_temp_removed", path=str(path), reason="left by a writer killed mid-write")
        try:
            for p in got:
                self._take(p)
        finally:
            if last:
                self.planning = False  # even if a file could not be taken: the run must be able to end
        self.planned += len(got)
        now = self.clock()
        if last:
            c = self.queue.counts()
            took = now - self._t0
            self.emit("intake_finished", files=self.total, pending=c["pending"] + c["running"] + c["done"],
                      skipped=c["skipped"], failed=c["failed"], seconds=round(took, 3),
                      files_per_s=round(self.total / took, 1) if took > 0 else None)
        elif now - self._progress_at >= PROGRESS_S:
            self._progress_at = now
            self.emit("intake_progress", planned=self.planned, files=self.total,
                      seconds=round(now - self._t0, 3))

    def _plan_failed(self, exc: BaseException, last: bool) -> None:
        self.emit("intake_failed", level="error", error=f"{type(exc).__name__}: {exc}")
        if last:
            self.planning = False

    def _take(self, p: Planned | tuple[Candidate, str]) -> None:
        if isinstance(p, tuple):
            self._unreadable(*p)
            return
        info = p.info
        if p.done:
            self.queue.add(info, FileState.SKIPPED)
            self.emit("file_skipped", file=info.rel, reason="already done")
            return
        if p.stale:
            self.realigned.append((info.rel, p.stale))
            self.emit("file_realigned", file=info.rel, reason=f"made with other settings: {p.stale}")
        self._add(info, p.features, p.refused)

    def _unreadable(self, c: Candidate, reason: str) -> None:
        """A transcript that could not be read: a failed file of the run, counted and listed."""
        rel = c.cha.relative_to(c.rel_base if c.rel_base is not None else c.root).as_posix()
        out = c.cha if self.in_place or self.out_root is None else self.out_root / rel
        info = FileInfo(rel=rel, path=c.cha, out=out, media=None, media_error=reason, transcript_bytes=0,
                        media_bytes=None, audio_seconds=None, input_hash="")
        self._fail_now(self.queue.add(info), reason, "bad_input", record=False)  # no content to recognise it by

    def _add(self, info: FileInfo, features: Any = None, refused: str | None = None) -> FileJob:
        """A described file joins the queue; one whose media or transcript cannot be used fails at
        once, as a worker would fail it, and is recorded so watch mode does not retry it unchanged."""
        job = self.queue.add(info)
        job.features = features
        if info.media_error:
            self._fail_now(job, info.media_error, "media")
        elif refused:
            self._fail_now(job, refused, "bad_input")
        else:
            self.estimator.estimate(job)
        return job

    def _fail_now(self, job: FileJob, reason: str, kind: str, record: bool = True) -> None:
        """Fail a file at intake, as a worker would (no retry); ``record``: in the manifest, so watch
        mode does not retry it unchanged."""
        self.queue.fail(job, reason, retry=False)
        self.emit("file_failed", level="warning", file=job.rel, reason=reason, kind=kind, attempt=0)
        if record:
            self.failed_for_good(job)

    # -- watch mode ----------------------------------------------------------------------------
    def scan(self, now: float) -> None:
        """Poll the inbox off the loop (one scan at a time)."""
        if self.watcher is None or self._scanning:
            return
        self._scanning = True

        def scanned(infos: list[FileInfo]) -> None:
            self._scanning = False
            for info in infos:
                self.jobs.submit(LANE, self._check, info, what="watch", on_done=self._watched)

        def failed(exc: BaseException) -> None:
            self._scanning = False
            self.emit("watch_scan_failed", level="warning", inbox=str(self.watcher.inbox),
                      error=f"{type(exc).__name__}: {exc}")

        self.jobs.submit("watch", self.watcher.poll, now, what="scan", on_done=scanned, on_error=failed)

    def _watched(self, p: Planned) -> None:
        info = p.info
        existing = self.queue.get(info.rel)
        if existing is not None and existing.state in (FileState.PENDING, FileState.RUNNING):
            return
        if existing is not None and existing.info.input_hash == info.input_hash:
            return  # unchanged since we last handled it (done, failed or quarantined)
        if p.done:
            return
        if p.failed_before is not None:
            if existing is None:
                earlier = p.failed_before
                self.queue.add(info, FileState.SKIPPED)
                self.emit("file_skipped", file=info.rel,
                          reason=f"{earlier['state']} earlier, unchanged since: {earlier.get('reason', '')}")
            return
        self.forget(info.rel)
        self.emit("file_discovered", file=info.rel, audio_seconds=info.audio_seconds)
        self._add(info, p.features, p.refused)

    # -- what outcomes mean for the manifest -----------------------------------------------------
    def done(self, job: FileJob, announce: Callable[[bool], None] | None = None) -> None:
        """Record a finished output; ``announce(recorded)`` runs once the entry is on disk (or could
        not be written), so a file reported done is one a re-run after a SIGKILL will not redo."""
        info = job.info

        def failed(exc: BaseException) -> None:
            self._manifest_failed(info, exc)
            if announce is not None:
                announce(False)

        self.jobs.submit(LANE, self.manifest_for(info).mark_done, info, what="mark_done",
                         on_done=None if announce is None else (lambda _: announce(True)), on_error=failed)

    def failed_for_good(self, job: FileJob) -> None:
        """Record a file that failed for good, so watch mode does not retry it after a restart."""
        if self.dry:
            return
        info, state, reason = job.info, job.state.value, job.reason or ""
        self.jobs.submit(LANE, self.manifest_for(info).mark_failed, info, state, reason, what="mark_failed",
                         on_error=lambda exc: self._manifest_failed(info, exc))

    def _manifest_failed(self, info: FileInfo, exc: BaseException) -> None:
        self.emit("manifest_write_failed", level="warning", file=info.rel, error=str(exc))


def _cannot_plan(c: Candidate, exc: BaseException) -> str:
    return f"{c.cha}: cannot be planned: {type(exc).__name__}: {exc}".replace("\n", " ")
