"""What a file's plan says about its memory, and what the worker reports about the work it did."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_align import FakeAligner, job_for, write_case  # noqa: E402

from bench.synth_corpus import make_corpus  # noqa: E402
from telemetry.model import FileFeatures  # noqa: E402
from worker import protocol  # noqa: E402
from worker.align import align_file, plan_features, span_cap  # noqa: E402
from worker.engines.base import JobError  # noqa: E402

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[1]


def utterances(n: int, every_s: float = 4.0, length_s: float = 3.0) -> str:
    return "".join(f"*PAR:\tword number {k} here . \x15{int(k * every_s * 1000)}_{int((k * every_s + length_s) * 1000)}"
                   f"\x15\n" for k in range(n))


def test_plan_of_a_timed_file_mirrors_the_spans_the_driver_runs(tmp_path):
    cha = write_case(tmp_path, utterances(30), seconds=125.0)
    f = plan_features(cha, tmp_path / "rec.wav", "wav2vec", {"span_seconds": 30})
    assert f.audio_s == pytest.approx(125.0) and f.sample_rate == 16000 and f.channels == 1
    assert f.windows == 0 and f.n_spans == 5 and f.longest_span_s == pytest.approx(27.0)
    assert f.longest_span_chars == 7 * len("word number 10 here")
    assert f.media_mb == pytest.approx((tmp_path / "rec.wav").stat().st_size / 2**20)
    aligner = FakeAligner(max_span_s=30.0)
    res = align_file(job_for(cha, tmp_path / "o.cha"), aligner, lambda x: None, cache=tmp_path / "cache")
    assert len(aligner.calls) == f.n_spans
    ran = FileFeatures.from_dict(res.features_run)
    assert ran.n_spans == f.n_spans and ran.longest_span_s == pytest.approx(f.longest_span_s, abs=1e-3)
    assert ran.longest_span_chars == f.longest_span_chars and ran.audio_s == pytest.approx(125.0)
    # Whisper cannot hold more than its 30 s window; a shorter span setting is respected.
    assert span_cap("whisper", {"span_seconds": 60}) == 30.0
    assert plan_features(cha, tmp_path / "rec.wav", "wav2vec", {"span_seconds": 10}).longest_span_s <= 10.0


def test_only_real_work_is_reported(tmp_path):
    cha = write_case(tmp_path, utterances(12), seconds=50.0)
    aligner = FakeAligner()
    cache = tmp_path / "cache"
    first = align_file(job_for(cha, tmp_path / "a.cha"), aligner, lambda x: None, cache=cache)
    assert first.features_run is not None
    again = align_file(job_for(cha, tmp_path / "b.cha"), aligner, lambda x: None, cache=cache)
    assert again.stats["cached_utterances"] == 12 and again.features_run is None
    # One utterance changed: only its span ran, and that is what the features say.
    cha.write_text(cha.read_text().replace("word number 11 here", "word number eleven here"))
    part = FileFeatures.from_dict(align_file(job_for(cha, tmp_path / "c.cha"), aligner, lambda x: None,
                                             cache=cache).features_run)
    assert part.n_spans == 1 and part.longest_span_s == pytest.approx(3.0)
    assert part.audio_s < 0.5 * first.features_run["audio_s"]


def test_plan_of_an_untimed_file_counts_recovery_windows(tmp_path):
    cha = write_case(tmp_path, "".join(f"*PAR:\tsome words {k} .\n" for k in range(40)), seconds=200.0)
    f = plan_features(cha, tmp_path / "rec.wav", "whisper", {})
    assert f.windows == 7 and f.longest_span_s == 30.0 and f.n_spans == 7
    assert 0 < f.longest_span_chars < sum(len(f"some words {k}") + 1 for k in range(40))


def test_synthetic_profiles_state_their_shapes(tmp_path):
    cha = write_case(tmp_path, utterances(30), seconds=125.0)
    total = plan_features(cha, tmp_path / "rec.wav", "synthetic", {"profile": "total"})
    assert total.longest_span_s == pytest.approx(125.0) and total.n_spans == 1
    stream = plan_features(cha, tmp_path / "rec.wav", "synthetic", {"profile": "streaming", "span_seconds": 30})
    assert stream.longest_span_s == pytest.approx(27.0) and stream.n_spans == 5


def test_bad_input_is_one_line_naming_the_file(tmp_path):
    cha = write_case(tmp_path, "*PAR:\thello . \x151000_2000\x15\n")
    cha.write_text(cha.read_text().replace("@Begin\n", ""))
    with pytest.raises(JobError) as err:
        plan_features(cha, tmp_path / "rec.wav", "wav2vec", {})
    assert str(cha) in str(err.value) and "\n" not in str(err.value)
    good = write_case(tmp_path / "g", "*PAR:\thello . \x151000_2000\x15\n")
    with pytest.raises(JobError) as err:
        plan_features(good, tmp_path / "g" / "missing.wav", "wav2vec", {})
    assert "missing.wav" in str(err.value)


def _worker(options: dict) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "worker", "--engine", "synthetic", "--options", json.dumps(options)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)


def _messages_until_result(proc: subprocess.Popen) -> list[dict]:
    out = []
    while True:
        msg = protocol.read_frame(proc.stdout)
        assert msg is not None
        out.append(msg)
        if msg["type"] in (protocol.RESULT, protocol.ERROR):
            return out


@pytest.mark.parametrize("profile", ["streaming", "total"])
def test_worker_calibrates_at_ready_and_reports_progress_and_features(tmp_path, profile):
    """A real worker: probe spans at READY, progress per span, and growth of the shape it states."""
    mb_per_s = 3.0
    (cha,) = make_corpus(tmp_path / "c", [120.0])
    proc = _worker({"profile": profile, "baseline_mb": 20, "mb_per_audio_second": mb_per_s,
                    "cpu_seconds_per_audio_second": 0.005, "span_seconds": 30})
    try:
        loaded = protocol.read_frame(proc.stdout)  # the model is in memory, the probes follow
        assert loaded["type"] == protocol.LOADED and loaded["uss_mb"] >= loaded["dirty_mb"] > 0
        ready = protocol.read_frame(proc.stdout)
        assert ready["type"] == protocol.READY
        probes = ready["calibration"]
        assert [p["features"]["longest_span_s"] for p in probes] == [5.0, 30.0]
        for p in probes:  # the profile, measured on this machine
            assert p["growth_mb"] == pytest.approx(mb_per_s * p["features"]["longest_span_s"], rel=0.25, abs=4)
        job = {"type": protocol.JOB, "job": "j1", "input": str(cha), "output": str(tmp_path / "o.cha"),
               "media": str(cha.with_suffix(".wav")), "rel": "f.cha", "options": {}}
        proc.stdin.write(protocol.encode(job))
        proc.stdin.flush()
        msgs = _messages_until_result(proc)
        result = msgs[-1]
        assert result["type"] == protocol.RESULT, result
        ran = FileFeatures.from_dict(result["features_run"])
        growth = result["peak_rss_mb"] - ready["rss_mb"]
        progress = [m for m in msgs if m["type"] == protocol.PROGRESS]
        if profile == "streaming":
            assert ran.n_spans == 5 and ran.longest_span_s <= 30.0
            assert growth == pytest.approx(mb_per_s * ran.longest_span_s, rel=0.25, abs=6)  # the span, not 120 s
            done = [m["spans_done"] for m in progress]
            assert done == sorted(done) and done[-1] == 5 and all(m["spans_total"] == 5 for m in progress)
            assert all(0 <= m["growth_mb"] <= growth + 8 for m in progress)
        else:
            assert ran.n_spans == 1 and ran.longest_span_s == pytest.approx(120.0, abs=1)
            assert growth == pytest.approx(mb_per_s * 120.0, rel=0.15)
    finally:
        proc.stdin.close()
        proc.wait(timeout=20)


def test_calibration_can_be_turned_off(tmp_path):
    proc = _worker({"calibrate": False, "baseline_mb": 10})
    try:
        assert protocol.read_frame(proc.stdout)["type"] == protocol.LOADED
        ready = protocol.read_frame(proc.stdout)
        assert ready["type"] == protocol.READY and ready["calibration"] == []
    finally:
        proc.stdin.close()
        proc.wait(timeout=20)


def test_bullets_past_the_end_of_the_media_are_not_planned(tmp_path):
    cha = write_case(tmp_path, utterances(3), seconds=10.0)
    sf.write(tmp_path / "rec.wav", np.zeros(int(2.0 * 16000), dtype=np.float32), 16000)
    f = plan_features(cha, tmp_path / "rec.wav", "wav2vec", {})
    # Utterances starting after the end of a (short) recording are skipped by the driver too.
    assert f.n_spans == 1 and f.longest_span_s == pytest.approx(3.0)


def test_warm_calibration_runs_only_the_unmeasured_first_pass():
    from worker.align import measure_probes, probe_plans  # noqa: PLC0415

    full, warm = FakeAligner(), FakeAligner()
    plans = probe_plans(30.0)
    measured = measure_probes(full, plans)
    assert [p["features"]["longest_span_s"] for p in measured] == [5.0, 30.0]
    assert measure_probes(warm, plans, measure=False) == []
    # The warm pass is the largest plan alone (its spans), the measured run that pass and every plan.
    largest = max(plans, key=sum)
    assert 0 < len(warm.calls) < len(full.calls)
    assert sum(n for _, n, _ in warm.calls) == pytest.approx(16000 * sum(largest), rel=0.05)


def test_a_warm_worker_sends_no_probes_but_warms_up(tmp_path):
    proc = _worker({"calibrate": "warm", "baseline_mb": 10, "probe_seconds": 1.0})
    try:
        loaded = protocol.read_frame(proc.stdout)
        assert loaded["type"] == protocol.LOADED
        t0 = time.monotonic()
        ready = protocol.read_frame(proc.stdout)
        assert ready["type"] == protocol.READY and ready["calibration"] == []
        assert 0.9 <= time.monotonic() - t0 < 1.9  # the larger probe ran (1 s), the smaller did not
    finally:
        proc.stdin.close()
        proc.wait(timeout=20)
