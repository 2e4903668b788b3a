"""Terminal progress: one ETA, 100% when all is done, every line within 80 columns."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from supervisor.progress import ProgressDisplay, eta_seconds, fraction_done, render_lines

pytestmark = pytest.mark.timeout(30)


def status(done=0, running=0, pending=4, failed=0, skipped=0, audio_done=0.0, audio_total=400.0, workers=None):
    total = done + running + pending + failed + skipped
    return {"files": {"total": total, "done": done, "running": running, "pending": pending, "failed": failed,
                      "quarantined": 0, "skipped": skipped},
            "audio_done_s": audio_done, "audio_total_s": audio_total,
            "workers": workers if workers is not None else
            [{"state": "busy"}] * running + [{"state": "paused"}, {"state": "ready"}],
            "memory": {"used_mb": 5123.0, "budget_mb": 21694.0}, "kills": 12, "pauses": 345}


def test_eta_comes_from_audio_done_and_is_zero_when_finished():
    s = status(done=1, running=2, pending=1, audio_done=100.0)
    assert fraction_done(s) == (0.25, False)
    assert eta_seconds(s, 30.0) == pytest.approx(90.0)
    assert eta_seconds(status(done=0, running=2, pending=2), 10.0) is None
    end = status(done=3, running=0, pending=0, failed=1, audio_done=350.0)
    assert fraction_done(end) == (1.0, True)  # failed files are finished too: 100%, not 88%


@pytest.mark.parametrize("width", [40, 60, 80, 120])
def test_every_line_fits_and_has_one_eta(width):
    for s in (status(), status(done=2, running=2, pending=0, audio_done=250.0),
              status(done=999, running=16, pending=12345, failed=77, audio_done=1e6, audio_total=4e6,
                     workers=[{"state": "busy"}] * 16)):
        lines = render_lines(s, 1234.0, width)
        assert len(lines) == 2 and all(len(ln) <= width for ln in lines), lines
        assert " ".join(lines).count("ETA") <= 1


def test_the_last_frame_on_an_80_column_terminal_says_100_percent():
    buf = io.StringIO()
    console = Console(file=buf, width=80, force_terminal=True, color_system=None)
    clock = iter(float(i) for i in range(1000))
    d = ProgressDisplay(console=console, clock=lambda: next(clock))
    d.start()
    d.update(status(done=1, running=2, pending=1, audio_done=100.0))
    d.update(status(done=3, running=1, pending=0, audio_done=380.0))  # throttled: not drawn
    d.stop(status(done=4, running=0, pending=0, audio_done=400.0))
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue())
    frames = [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    assert all(len(ln) <= 80 for ln in frames), frames
    assert "100%" in frames[-2] and "4/4 files" in frames[-2] and "done in" in frames[-2]
    assert "ETA" not in frames[-2]


def test_a_real_run_with_progress_ends_at_100_percent_within_80_columns(tmp_path):
    from bench.synth_corpus import make_corpus
    from helpers import cli_args, run_cli

    corpus = tmp_path / "corpus"
    make_corpus(corpus, [3, 4, 5])
    args = [a for a in cli_args(corpus, tmp_path / "out") if a not in ("--progress", "off")] + ["--progress", "on"]
    r = run_cli(args, tmp_path, COLUMNS="80", TERM="xterm")
    assert r.returncode == 0, r.stderr
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", r.stderr)
    lines = [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    frames = [ln for ln in lines if re.match(r"^ *\d+% |^workers ", ln)]
    assert frames and all(len(ln) <= 80 for ln in frames), [ln for ln in frames if len(ln) > 80]
    bars = [ln for ln in frames if "files" in ln]
    assert bars and "100%" in bars[-1] and "3/3 files" in bars[-1]
