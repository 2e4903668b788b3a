"""Log analysis: complete runs, runs cut off by kill -9, multi-run logs, tables and the plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from telemetry.report import (
    load_events,
    plot,
    render_text,
    runs,
    select_run,
    summarize,
    summarize_store,
)

pytestmark = pytest.mark.timeout(60)

LOGS = Path(__file__).parent / "data" / "logs"
COMPLETE = LOGS / "complete.jsonl"
KILLED = LOGS / "killed_midline.jsonl"
TWO_RUNS = LOGS / "two_runs.jsonl"


def _finished_record(path: Path) -> dict:
    for line in path.read_text().splitlines():
        ev = json.loads(line)
        if ev["event"] == "run_finished":
            return ev
    raise AssertionError("no run_finished")


def test_complete_log_reads_cleanly():
    events = load_events(COMPLETE)
    assert events.skipped_lines == 0
    assert runs(events) == ["20250314T093000-a1b2"]
    assert events[0]["event"] == "run_started"


def test_summarize_complete_log_matches_run_finished():
    rep = summarize(select_run(load_events(COMPLETE)))
    fin = _finished_record(COMPLETE)
    assert rep.finished and rep.exit_code == fin["exit_code"]
    assert rep.run == "20250314T093000-a1b2"
    assert rep.totals["done"] == fin["done"]
    assert rep.totals["failed"] == fin["failed"]
    assert rep.totals["quarantined"] == fin["quarantined"]
    assert rep.totals["skipped"] == fin["skipped"]
    assert len(rep.kills) == fin["kills"]
    assert len(rep.pauses) == fin["pauses"]
    assert rep.wall_s == pytest.approx(fin["wall_s"])
    assert rep.audio_seconds_done == pytest.approx(fin["audio_seconds"])
    assert rep.throughput_audio_h_per_h == pytest.approx(fin["audio_seconds"] / fin["wall_s"])
    assert (rep.limit_mb, rep.budget_mb) == (12288.0, 10240.0)
    assert all(r.outcome in ("done", "failed", "quarantined") for r in rep.files)

    by_file = {r.file: r for r in rep.files}
    retried = by_file["eng/Providence/Alex/alex04.cha"]
    assert retried.outcome == "done" and retried.attempts == 2 and retried.kills == 1
    (q,) = rep.quarantined
    assert q.file == "eng/HSLLD/HV1/tp/admtp1.cha" and "budget" in q.reason
    assert q.peak_mb == pytest.approx(rep.kills[-1].uss_mb)
    assert by_file["eng/Gleason/Father/john.cha"].reason.startswith("media")

    # kills and pauses keep their figures and are paired with resumes
    assert all(k.reason and k.uss_mb and k.predicted_mb and k.budget_mb == 10240.0 for k in rep.kills)
    assert all(p.resumed and p.paused_s > 0 for p in rep.pauses)

    # learned vs observed: recomputed independently from the file_done events
    done = [json.loads(l) for l in COMPLETE.read_text().splitlines() if '"file_done"' in l]
    errors = [d["peak_mb"] - d["predicted_mb"] for d in done]
    st = rep.prediction
    assert st.n == len(done)
    assert st.under_predicted == sum(e > 0 for e in errors)
    assert st.mean_error_mb == pytest.approx(sum(errors) / len(errors))
    assert st.max_abs_error_mb == pytest.approx(max(abs(e) for e in errors))
    assert st.p50_abs_error_mb <= st.p90_abs_error_mb <= st.max_abs_error_mb
    assert st.killed_attempts == 2


def test_log_truncated_mid_line_by_kill_9():
    raw = KILLED.read_bytes()
    assert not raw.endswith(b"\n")  # the fixture really ends mid-object
    events = load_events(KILLED)
    assert events.skipped_lines == 1
    rep = summarize(select_run(events))
    assert not rep.finished and rep.run_finished is None
    assert rep.wall_s == pytest.approx(rep.last_t) and rep.wall_s > 0
    assert rep.totals["done"] >= 1
    running = [r for r in rep.files if r.outcome == "running"]
    assert running and all(r.wall_s is not None for r in running)
    text = render_text(rep)
    assert "NOT FINISHED" in text
    assert "1 unreadable line" in text
    assert "running when the log ended" in text


@pytest.mark.parametrize("fraction", [0.1, 0.33, 0.5, 0.77, 0.999])
def test_any_cut_point_is_readable(tmp_path, fraction):
    raw = COMPLETE.read_bytes()
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(raw[: int(len(raw) * fraction)] + b"\n\n\x00\xff garbage {\"event\": \n")
    events = load_events(cut)
    assert events.skipped_lines >= 1
    rep = summarize(select_run(events))
    assert not rep.finished
    assert render_text(rep)
    plot(events, tmp_path / "cut.png")


def test_two_runs_in_one_file():
    events = load_events(TWO_RUNS)
    first, second = runs(events)
    # the restart's first line was glued onto the truncated one; it is salvaged
    assert events.skipped_lines == 1 and events.recovered == 1
    last = summarize(select_run(events))
    assert last.run == second and last.finished and last.engine == "wav2vec"
    crashed = summarize(select_run(events, first))
    assert crashed.run == first and not crashed.finished
    with pytest.raises(ValueError, match="not in this log"):
        select_run(events, "no-such-run")


def _order(text: str, names: list[str]) -> list[str]:
    return sorted(names, key=lambda n: text.index(n + " "))


def test_file_table_sorting_and_limit():
    rep = summarize(select_run(load_events(COMPLETE)))
    names = [r.file for r in rep.files]

    by_peak = _order(render_text(rep, sort="peak"), names)
    peaks = {r.file: r.peak_mb for r in rep.files}
    assert [peaks[n] for n in by_peak] == sorted(peaks.values(), reverse=True)

    text_time = render_text(rep, sort="time")
    timed = [r for r in rep.files if r.wall_s is not None]
    order = _order(text_time, [r.file for r in timed])
    walls = {r.file: r.wall_s for r in timed}
    assert [walls[n] for n in order] == sorted(walls.values(), reverse=True)
    untimed = [r.file for r in rep.files if r.wall_s is None]
    assert min(text_time.index(n + " ") for n in untimed) > max(text_time.index(n + " ") for n in order)

    assert _order(render_text(rep, sort="file"), names) == sorted(names)

    limited = render_text(rep, sort="peak", limit=3)
    assert sum(1 for n in names if n + " " in limited.split("Kills")[0]) == 3
    assert "first 3 of" in limited
    with pytest.raises(ValueError):
        render_text(rep, sort="size")


def test_text_is_plain_and_fits_a_journal():
    text = render_text(summarize(select_run(load_events(COMPLETE))))
    assert "\x1b" not in text
    assert all(len(line) <= 120 for line in text.splitlines())
    assert text.isascii()
    for heading in ("Files", "Kills", "Pauses", "Quarantined", "Learned vs observed"):
        assert heading in text


def test_empty_and_minimal_logs(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    rep = summarize(select_run(load_events(empty)))
    assert rep.files == [] and not rep.finished
    assert "Files: none admitted" in render_text(rep)
    plot(load_events(empty), tmp_path / "empty.png")
    assert (tmp_path / "empty.png").stat().st_size > 0


def _png_checks(path: Path) -> None:
    import matplotlib.image as mpimg
    import numpy as np

    img = mpimg.imread(path)
    h, w = img.shape[:2]
    assert w >= 800 and h >= 500
    rgb = img[..., :3]
    assert float(rgb.std()) > 0.05  # not blank
    colours = np.unique((rgb.reshape(-1, 3) * 255).astype(np.uint8), axis=0)
    assert len(colours) > 20


def test_plot_complete_and_truncated(tmp_path):
    for src in (COMPLETE, KILLED):
        out = tmp_path / f"{src.stem}.png"
        assert plot(select_run(load_events(src)), out) == out
        _png_checks(out)


def test_summarize_store_tolerates_missing_keys():
    full = {
        "files_done": 10,
        "files_failed": 1,
        "files_quarantined": 1,
        "kills": 2,
        "attempts": 14,
        "audio_seconds": 7200.0,
        "wall_s": 1800.0,
        "throughput_audio_h_per_h": 4.0,
        "worst_by_peak": [{"file": "a/big.cha", "peak_mb": 6400.0, "audio_seconds": 1500, "wall_s": 300}],
        "worst_by_wall": [{"file": "a/slow.cha", "peak_mb": None, "audio_seconds": 900, "wall_s": 620}],
        "quarantined": [{"file": "a/huge.cha", "reason": "needs 9 GiB", "peak_mb": 7000}],
    }
    text = summarize_store(full)
    assert "10 done" in text and "4.00 audio h per wall h" in text
    assert "a/big.cha" in text and "6,400" in text and "a/huge.cha" in text and "needs 9 GiB" in text
    assert "\x1b" not in text
    sparse = summarize_store({"files_done": 3})
    assert "3 done" in sparse and "throughput -" in sparse
    assert summarize_store({})


def test_summarize_store_renders_the_real_store_summary(tmp_path):
    from telemetry.store import Attempt, TelemetryStore

    store = TelemetryStore(tmp_path / "t.sqlite")
    try:
        store.start_run("r1", corpus="/c", engine="wav2vec", model="m", device="cpu", settings={})
        t0 = 1_700_000_000.0

        def attempt(file: str, outcome: str, peak: float, wall: float, i: int, reason: str | None = None):
            return Attempt(
                run_id="r1", file=file, path=f"/c/{file}", input_hash=file, engine="wav2vec", model="m",
                device="cpu", audio_seconds=600.0, media_bytes=1000, transcript_bytes=100, worker_baseline_mb=1400.0,
                peak_mb=peak, growth_mb=peak - 1400.0, predicted_mb=peak - 100, wall_s=wall, cpu_s=wall * 3,
                outcome=outcome, reason=reason, worker_pid=100 + i, started_at=t0 + i, finished_at=t0 + i + wall)

        store.record_attempt(attempt("big.cha", "killed", 6100.0, 90.0, 0, "over budget"))
        store.record_attempt(attempt("big.cha", "quarantined", 6400.0, 95.0, 1, "needs 9 GiB"))
        store.record_attempt(attempt("ok.cha", "done", 2500.0, 120.0, 2))
        store.record_attempt(attempt("bad.cha", "failed", 1500.0, 5.0, 3, "media: cannot decode"))
        store.finish_run("r1", {})
        text = summarize_store(store.summary("r1"))
    finally:
        store.close()
    assert "run r1" in text and "1 done" in text and "1 failed" in text and "1 quarantined" in text
    assert "6,400" in text and "needs 9 GiB" in text and "media: cannot decode" in text
    assert "audio h per wall h" in text
