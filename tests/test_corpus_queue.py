"""Corpus discovery, media lookup, the done-manifest and the file queue."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.synth_corpus import make_corpus
from helpers import fill_disk
from supervisor.corpus import Manifest, discover, find_media
from supervisor.queue import FileState, WorkQueue
from telemetry.model import Estimate

pytestmark = pytest.mark.timeout(30)


def test_discover_mirrors_tree_and_finds_media(tmp_path):
    files = make_corpus(tmp_path / "c", [3, 4, 5], subdirs=2)
    infos = discover([tmp_path / "c"], out_root=tmp_path / "o", in_place=False)
    assert [i.rel for i in infos] == ["part0/f000.cha", "part0/f002.cha", "part1/f001.cha"]
    for info in infos:
        assert info.out == (tmp_path / "o" / info.rel).resolve()
        assert info.media is not None and info.media.suffix == ".wav"
        assert info.audio_seconds == pytest.approx({"f000": 3, "f001": 4, "f002": 5}[info.path.stem], abs=0.01)
    assert len(files) == 3


def test_media_lookup_is_case_insensitive_and_uses_media_dir(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "rec.WAV").write_bytes(b"x")
    assert find_media(tmp_path / "a" / "t.cha", "rec") == tmp_path / "a" / "rec.WAV"
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    media = tmp_path / "media" / "sub"
    media.mkdir(parents=True)
    (media / "other.flac").write_bytes(b"x")
    cha = tmp_path / "corpus" / "sub" / "t.cha"
    assert find_media(cha, "other", tmp_path / "media", tmp_path / "corpus") == media / "other.flac"
    assert find_media(cha, "missing", tmp_path / "media", tmp_path / "corpus") is None


def test_missing_media_is_reported_with_the_file(tmp_path):
    files = make_corpus(tmp_path / "c", [3])
    (tmp_path / "c" / "f000.wav").unlink()
    info = discover([tmp_path / "c"], out_root=tmp_path / "o", in_place=False)[0]
    assert info.media is None and "f000.cha" in info.media_error and "not found" in info.media_error
    assert files


def test_outputs_inside_the_corpus_are_not_inputs(tmp_path):
    make_corpus(tmp_path / "c", [3])
    (tmp_path / "c" / "out").mkdir()
    (tmp_path / "c" / "out" / "f000.cha").write_text("@UTF8\n")
    infos = discover([tmp_path / "c"], out_root=tmp_path / "c" / "out", in_place=False)
    assert [i.rel for i in infos] == ["f000.cha"]


def test_manifest_tracks_content_hash_and_output(tmp_path):
    make_corpus(tmp_path / "c", [3])
    info = discover([tmp_path / "c"], out_root=tmp_path / "o", in_place=False)[0]
    m = Manifest(tmp_path / "o" / ".batchalign-supervise" / "done.jsonl")
    assert not m.is_done(info)
    info.out.parent.mkdir(parents=True)
    info.out.write_text("aligned")
    m.mark_done(info)
    assert Manifest(m.path).is_done(info)
    info.out.write_text("tampered")
    assert not Manifest(m.path).is_done(info)
    # A torn last line (kill -9 mid-append) is ignored.
    info.out.write_text("aligned")
    with open(m.path, "ab") as fh:
        fh.write(b'{"rel": "f000.cha", "input_')
    assert Manifest(m.path).is_done(info)


def test_in_place_manifest_recognises_its_own_output(tmp_path):
    make_corpus(tmp_path / "c", [3])
    info = discover([tmp_path / "c"], out_root=None, in_place=True)[0]
    m = Manifest(tmp_path / "c" / ".batchalign-supervise" / "done.jsonl")
    info.out.write_text(info.path.read_text() + "\n")
    m.mark_done(info)
    again = discover([tmp_path / "c"], out_root=None, in_place=True)[0]
    assert Manifest(m.path).is_done(again)


def _est(peak, source="learned"):
    return Estimate(peak_mb=peak, growth_mb=peak - 10, baseline_mb=10, source=source, lower_bound_mb=None,
                    central_mb=peak, uncertain=source == "cold")


def test_queue_orders_largest_first_and_counts_attempts(tmp_path):
    make_corpus(tmp_path / "c", [3, 9, 5])
    q = WorkQueue(max_attempts=2)
    for info in discover([tmp_path / "c"], out_root=tmp_path / "o", in_place=False):
        q.add(info).estimate = _est(info.audio_seconds * 10)
    assert [j.rel for j in q.pending()] == ["f001.cha", "f002.cha", "f000.cha"]
    job = q.get("f001.cha")
    q.start(job, worker=1)
    assert q.fail(job, "crash", retry=True) is FileState.PENDING
    q.start(job, worker=2)
    assert q.fail(job, "crash again", retry=True, lower_bound_mb=300) is FileState.QUARANTINED
    assert job.attempts == 2 and job.lower_bound_mb == 300 and job.reason == "crash again"
    other = q.get("f000.cha")
    q.start(other, worker=1)
    assert q.fail(other, "bad CHAT", retry=False) is FileState.FAILED
    last = q.get("f002.cha")
    q.start(last, worker=1)
    q.requeue(last, "stopping")
    assert last.state is FileState.PENDING and last.attempts == 0
    with pytest.raises(ValueError):
        q.start(job, worker=1)
    assert q.counts()["quarantined"] == 1 and q.counts()["failed"] == 1


def test_files_run_largest_first_whether_trusted_or_uncertain(tmp_path):
    make_corpus(tmp_path / "c", [3, 9, 5, 7, 2])
    q = WorkQueue(max_attempts=2)
    for info in discover([tmp_path / "c"], out_root=tmp_path / "o", in_place=False):
        q.add(info).estimate = _est(info.audio_seconds * 10, source="learned" if info.audio_seconds > 6 else "cold")
    # largest first; the policy, not the order, keeps a cold run to one uncertain large bet at a time
    assert [j.rel for j in q.pending()] == ["f001.cha", "f003.cha", "f002.cha", "f000.cha", "f004.cha"]


def test_file_states_change_only_along_the_table(tmp_path):
    from supervisor.queue import IllegalFileTransition

    make_corpus(tmp_path / "c", [3])
    q = WorkQueue(max_attempts=2)
    (info,) = discover([tmp_path / "c"], out_root=tmp_path / "o", in_place=False)
    job = q.add(info)
    with pytest.raises(IllegalFileTransition):
        q.finish(job, 10.0)  # a pending file cannot be done without running
    q.start(job, worker="w1")
    q.finish(job, 10.0)
    with pytest.raises(IllegalFileTransition):
        q.fail(job, "late error", retry=True)  # a done file stays done
    with pytest.raises(ValueError):
        q.start(job, worker="w2")
    again = q.add(info)  # a changed file replaces its finished record, keeping its place
    assert again is not job and again.state is FileState.PENDING and again.seq == job.seq


def test_intake_lists_each_folder_once_however_many_transcripts_it_holds(tmp_path, monkeypatch):
    import os as os_mod

    make_corpus(tmp_path / "c", [1] * 60)
    real = os_mod.scandir
    calls: list[str] = []

    def counting(path="."):
        calls.append(str(path))
        return real(path)

    monkeypatch.setattr(os_mod, "scandir", counting)
    infos = discover([tmp_path / "c"], out_root=tmp_path / "o", in_place=False)
    assert len(infos) == 60 and all(i.media is not None for i in infos)
    assert calls.count(str(tmp_path / "c")) <= 1  # not once per transcript (quadratic in a big folder)


def test_planning_reports_progress_and_files_join_the_queue_as_they_are_described(tmp_path):
    import asyncio

    from supervisor.corpus import find_transcripts
    from supervisor.estimates import Estimator
    from supervisor.intake import Intake
    from supervisor.sidejobs import SideJobs
    from telemetry.model import Defaults, MemoryModel, Predictor

    make_corpus(tmp_path / "c", [1] * 600)
    seen: list[tuple[str, dict]] = []
    q = WorkQueue(max_attempts=2)
    clock = iter(range(10_000)).__next__  # every reading a second later: progress is due each batch

    async def main():
        jobs = SideJobs(lambda ev, level="info", **f: seen.append((ev, f)))
        est = Estimator(Predictor(MemoryModel(Defaults(100, 10, 1, 1)), 100), q)
        intake = Intake(queue=q, estimator=est, jobs=jobs, emit=lambda ev, level="info", **f: seen.append((ev, f)),
                        forget=lambda rel: None, force=False, media_dir=None, out_root=tmp_path / "o", in_place=False,
                        clock=lambda: float(clock()))
        intake.start_planning(find_transcripts([tmp_path / "c"], out_root=tmp_path / "o", in_place=False))
        assert intake.planning
        await jobs.drain(60)
        assert not intake.planning

    asyncio.run(main())
    names = [ev for ev, _ in seen]
    assert names.count("intake_progress") >= 1 and names[-1] == "intake_finished"
    progress = [f["planned"] for ev, f in seen if ev == "intake_progress"]
    assert progress == sorted(progress) and progress[0] < 600
    assert dict(seen)["intake_finished"]["files"] == 600 and len(q.pending()) == 600


def test_done_or_stale_is_judged_from_the_entry_and_the_output_seen_now():
    from supervisor.corpus import judge

    entry = {"input_hash": "in", "output_hash": "out", "output_input_hash": "out+media",
             "identity": {"engine": "whisper", "model": "tiny.en"}}
    same = {"engine": "whisper", "model": "tiny.en"}
    assert judge(entry, "out", "in", in_place=False, identity=same) == (True, None)
    assert judge(entry, None, "in", in_place=False, identity=same) == (False, None)  # output gone
    assert judge(entry, "edited", "in", in_place=False, identity=same) == (False, None)
    assert judge(entry, "out", "changed", in_place=False, identity=same) == (False, None)
    assert judge(entry, "out", "out+media", in_place=True, identity=same) == (True, None)
    done, stale = judge(entry, "out", "in", in_place=False, identity={"engine": "wav2vec", "model": "x"})
    assert not done and stale


def test_an_entry_appended_after_a_torn_line_is_kept(tmp_path):
    make_corpus(tmp_path / "c", [3, 4])
    a, b = discover([tmp_path / "c"], out_root=tmp_path / "o", in_place=False)
    m = Manifest(tmp_path / "o" / ".batchalign-supervise" / "done.jsonl")
    for info in (a, b):
        info.out.parent.mkdir(parents=True, exist_ok=True)
        info.out.write_text(f"aligned {info.rel}")
    m.mark_done(a)
    with open(m.path, "ab") as fh:
        fh.write(b'{"rel": "f001.cha", "input_')  # cut off mid-append
    m.mark_done(b)
    again = Manifest(m.path)
    assert again.is_done(a) and again.is_done(b)


def test_a_manifest_on_a_full_disk_raises_and_leaves_no_torn_line(tmp_path):
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        make_corpus(tmp_path / "c", [3, 4])
        a, b = discover([tmp_path / "c"], out_root=mnt / "o", in_place=False)
        for info in (a, b):
            info.out.parent.mkdir(parents=True, exist_ok=True)
            info.out.write_text(f"aligned {info.rel}")
        m = Manifest(mnt / "o" / ".batchalign-supervise" / "done.jsonl")
        m.mark_done(a)
        size = m.path.stat().st_size
        with open(m.path, "ab") as fh:  # fill the manifest's page but for a few bytes
            fh.write(b" " * (4096 - size - 20) + b"\n")
        fill_disk(mnt)  # then every byte left on the disk
        with pytest.raises(OSError):
            m.mark_done(b)  # a few bytes fit in the page, the rest does not
        assert m.path.read_bytes().endswith(b"\n")
        (mnt / "filler").unlink()
        m.mark_done(b)
        again = Manifest(m.path)
        assert again.is_done(a) and again.is_done(b)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_file_whose_plan_raises_is_named_and_the_rest_of_its_batch_is_planned(tmp_path):
    from supervisor.corpus import find_transcripts
    from supervisor.intake import Intake, Planned

    make_corpus(tmp_path / "c", [3, 4, 5])

    def plan(info):
        if info.rel == "f001.cha":
            raise RuntimeError("a bug in planning")
        return None

    intake = Intake(queue=WorkQueue(3), estimator=None, jobs=None, emit=lambda *a, **k: None, forget=lambda rel: None,
                    force=False, media_dir=None, out_root=tmp_path / "o", in_place=False, plan=plan)
    got = intake.describe_batch(find_transcripts([tmp_path / "c"], out_root=tmp_path / "o", in_place=False))
    assert [p.info.rel for p in got if isinstance(p, Planned)] == ["f000.cha", "f002.cha"]
    (bad,) = [p for p in got if not isinstance(p, Planned)]
    assert bad[0].cha.name == "f001.cha" and "RuntimeError: a bug in planning" in bad[1]


def test_estimates_are_redone_only_when_the_model_moved_and_views_only_when_the_queue_did(tmp_path):
    from supervisor.estimates import Estimator
    from supervisor.corpus import FileInfo
    from telemetry.model import Defaults, FileFeatures, MemoryModel, Predictor

    class Counting(Predictor):
        calls = 0

        def estimate(self, features, lower_bound_mb=None):
            Counting.calls += 1
            return super().estimate(features, lower_bound_mb)

    model = MemoryModel(Defaults(100, 10, 1, 1), min_samples=3)
    q = WorkQueue(max_attempts=2)
    est = Estimator(Counting(model, 100), q, clock=lambda: 0.0)
    jobs = []
    for i in range(10):
        info = FileInfo(rel=f"f{i}.cha", path=tmp_path / f"f{i}.cha", out=tmp_path / "o" / f"f{i}.cha", media=None,
                        media_error=None, transcript_bytes=100, media_bytes=None, audio_seconds=10.0 + i,
                        input_hash=f"h{i}")
        job = q.add(info)
        job.features = FileFeatures(audio_s=10.0 + i, longest_span_s=10.0 + i, n_spans=1, windows=0)
        est.estimate(job)
        jobs.append(job)
    feats = FileFeatures(audio_s=10.0, longest_span_s=10.0, n_spans=1, windows=0)
    for k in range(60):  # a model of many files refits every few percent of them, not per file
        est.learn(jobs[0], 20.0 + k % 3, feats.to_dict())
        est.refresh(100.0 + k)
    views = est.pending_views(256)
    assert est.pending_views(256) is views  # nothing changed: the same views
    Counting.calls = 0
    est.learn(jobs[0], 20.8, feats.to_dict())  # under the fitted line: absorbed later
    est.refresh(200.0)
    assert Counting.calls == 0 and est.pending_views(256) is views
    est.learn(jobs[0], 500.0, feats.to_dict())  # far above it: refitted at once, every estimate redone
    est.refresh(300.0)
    assert Counting.calls == 10
    after = est.pending_views(256)
    assert after is not views and est.pending_views(256) is after
