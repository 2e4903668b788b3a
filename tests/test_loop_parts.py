"""The loop's small parts on their own: the inbox, the watch-mode settling decision, worker log
relaying, and intake reading each recording once."""

from __future__ import annotations

import asyncio
import builtins
import random
import time
from pathlib import Path

import pytest

from bench.synth_corpus import chat_text, write_wav
from supervisor.inbox import Inbox
from supervisor.watch import InboxWatcher
from telemetry.logging import worker_record

pytestmark = pytest.mark.timeout(60)


def test_inbox_returns_none_when_its_deadline_passes_and_wakes_on_a_put():
    async def main():
        box = Inbox()
        t = time.monotonic()
        assert await box.get(0.05) is None and time.monotonic() - t >= 0.04
        asyncio.get_running_loop().call_later(0.02, box.put_nowait, "ev")
        t = time.monotonic()
        assert await box.get(5.0) == "ev" and time.monotonic() - t < 1.0
        box.put_nowait(1), box.put_nowait(2)
        assert await box.get(0) == 1 and not box.empty() and box.get_nowait() == 2 and box.empty()
        # Without a deadline (the cluster loop wraps it in wait_for), a cancelled wait leaves no waiter.
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(box.get(), 0.02)
        box.put_nowait("later")
        assert await box.get(0.5) == "later"

    asyncio.run(main())


def test_watch_settling_is_decided_from_signatures_alone(tmp_path):
    w = InboxWatcher(tmp_path / "inbox", out_root=None, in_place=True, settle_s=10.0)
    a, b = Path("/x/a.cha"), Path("/x/b.cha")
    assert w.settled({a: (1,), b: (1,)}, 0.0) == []
    assert w.settled({a: (1,), b: (2,)}, 5.0) == []  # b changed: its wait starts again
    assert w.settled({a: (1,), b: (2,)}, 10.0) == [a]
    assert w.settled({a: (1,), b: (2,)}, 15.0) == [b]  # a is handed over once only
    assert w.settled({b: (2,)}, 20.0) == [] and a not in w._seen  # a gone: forgotten
    assert w.settled({a: (1,)}, 21.0) == [] and w.settled({a: (1,)}, 31.0) == [a]  # back: new again
    assert w.settled({a: None}, 40.0) == [] and a in w._seen  # unreadable now: kept, not handed


def test_worker_records_keep_their_own_event_and_level():
    ev, level, f = worker_record('{"event": "oom_guard", "level": "warning", "t": 3, "ts": "x", "mb": 5}')
    assert (ev, level, f) == ("worker_log", "warning", {"worker_event": "oom_guard", "worker_level": "warning",
                                                       "mb": 5})
    assert worker_record('{"event": "span", "level": "info"}')[1] == "debug"
    assert worker_record("Traceback (most recent call last):") == (
        "worker_output", "debug", {"line": "Traceback (most recent call last):"})
    assert worker_record("[1, 2]")[0] == "worker_output"


def test_intake_opens_each_recording_once_and_plans_from_that_reading(tmp_path, monkeypatch):
    import soundfile as sf

    from supervisor.corpus import describe
    from supervisor.settings import Settings
    from supervisor.supervisor import file_planner

    corpus = tmp_path / "c"
    corpus.mkdir()
    for ext, fmt in (("wav", "WAV"), ("flac", "FLAC")):
        write_wav(tmp_path / "src.wav", 3.0)
        data, rate = sf.read(tmp_path / "src.wav")
        sf.write(corpus / f"{ext}.{ext}", data, rate, format=fmt)
        (corpus / f"{ext}.cha").write_text(chat_text(ext, 3.0, random.Random(1)), encoding="utf-8")
    s = Settings()
    s.run.engine = "synthetic"
    plan = file_planner(s)

    opened: list[str] = []
    real_open, real_sf, real_info = builtins.open, sf.SoundFile, sf.info

    def counting_open(file, *a, **k):
        if str(file).endswith((".wav", ".flac")):
            opened.append(str(file))
        return real_open(file, *a, **k)

    def by_path(real):
        def f(file, *a, **k):
            if isinstance(file, (str, Path)):
                opened.append(str(file))
            return real(file, *a, **k)
        return f

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(sf, "SoundFile", by_path(real_sf))
    monkeypatch.setattr(sf, "info", by_path(real_info))
    for ext in ("wav", "flac"):
        opened.clear()
        info = describe(corpus, corpus / f"{ext}.cha", out_root=tmp_path / "out", in_place=False)
        features = plan(info)
        assert opened == [str(corpus / f"{ext}.{ext}")], opened
        assert info.media_error is None and info.audio_seconds == pytest.approx(3.0)
        assert features.audio_s == pytest.approx(3.0) and features.sample_rate == 8000 and features.channels == 1


def test_a_truncated_recording_is_refused_from_the_same_reading(tmp_path):
    from supervisor.corpus import describe

    write_wav(tmp_path / "t.wav", 4.0)
    raw = (tmp_path / "t.wav").read_bytes()
    (tmp_path / "t.wav").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "t.cha").write_text(chat_text("t", 4.0, random.Random(1)), encoding="utf-8")
    info = describe(tmp_path, tmp_path / "t.cha", out_root=tmp_path / "out", in_place=False)
    assert info.media_error is not None and "truncated" in info.media_error and str(tmp_path / "t.wav") in info.media_error
