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


def test_a_failed_warm_up_is_said_as_a_warning(caplog):
    import logging

    from worker.align import SpanAligner

    class Broken(SpanAligner):
        sample_rate = 16000

        def align_span(self, audio, offset_s, utterances):
            raise RuntimeError("CUDA error: no kernel image")

    with caplog.at_level(logging.DEBUG, logger="worker.align"):
        Broken.warm_up(Broken.__new__(Broken))
    (rec,) = [r for r in caplog.records if "warm-up" in r.getMessage()]
    assert rec.levelno == logging.WARNING and "no kernel image" in rec.getMessage()


class _SyncJobs:
    """Side jobs run at once, so a test sees their callbacks in order."""

    def busy(self, lane):
        return 0

    def submit(self, lane, fn, *args, what="", on_done=None, on_error=None):
        try:
            got = fn(*args)
        except Exception as exc:
            if on_error is not None:
                on_error(exc)
            return
        if on_done is not None:
            on_done(got)


def test_an_unreadable_ledger_is_said_once_and_answered_conservatively(tmp_path):
    from supervisor.publish import Publisher
    from supervisor.sd_notify import Notifier

    events = []
    pub = Publisher(notifier=Notifier({}), jobs=_SyncJobs(), emit=lambda e, level="info", **f: events.append((e, level)))
    pub.open_ledger(str(tmp_path / "ledger.json"), "me")
    state = {"others": 500 * 2**20, "broken": False}

    class Ledger:
        path = tmp_path / "ledger.json"

        def update(self, owner, b):
            if state["broken"]:
                raise PermissionError(13, "Permission denied")

        def reservations(self, owner, avail):
            from supervisor.ledger import Reservation
            return [Reservation(owner="other", pid=1, uid=0, cgroup=None, claimed_bytes=state["others"],
                                reserved_bytes=state["others"])]

    pub.ledger = Ledger()
    pub.exchange(100.0, None)
    assert pub.others_now(200.0) == 500.0  # read: what the others promise
    state["broken"] = True
    pub.exchange(100.0, None)
    pub.exchange(100.0, None)
    assert [e for e in events if e[0] == "ledger_unreadable"] == [("ledger_unreadable", "warning")]
    assert pub.others_now(200.0) == 500.0  # blind: the most seen this run, at least the reserve
    assert pub.others_now(800.0) == 800.0
    state["broken"], state["others"] = False, 0
    pub.exchange(100.0, None)
    assert pub.others_now(200.0) == 0.0 and ("ledger_recovered", "info") in events


def test_a_larger_promise_is_acted_on_only_once_the_ledger_granted_it(tmp_path):
    """The publisher says whether a promise is covered, claims it through the real ledger, and a
    claim is refused when another supervisor promised more since this one last read the ledger."""
    from types import SimpleNamespace

    from supervisor.ledger import HostLedger
    from supervisor.publish import Publisher
    from supervisor.sd_notify import Notifier

    MiB = 2**20
    events = []
    pub = Publisher(notifier=Notifier({}), jobs=_SyncJobs(), emit=lambda e, level="info", **f: events.append((e, f)))
    path = tmp_path / "ledger.json"
    pub.open_ledger(str(path), "me")
    other = HostLedger(path)
    host = SimpleNamespace(mem_available=8 << 30, cgroup_headroom=None, cgroup_path=None)
    pub.exchange(100.0, host)
    assert pub.covers(100.0) and not pub.covers(300.0)
    # Another supervisor promises 500 MiB after this one's last read: a claim that assumed nobody fails...
    other.update("other", 500 * MiB)
    pub.claim(300.0, 0.0, host)
    assert not pub.covers(300.0) and pub.others_now(0.0) == 500.0
    assert [f["others_mb"] for e, f in events if e == "ledger_claim_refused"] == [500.0]
    assert HostLedger(path).others("other") == 100 * MiB  # nothing was written for the refused claim
    # ... and one that assumes what it now knows is granted and in the ledger before any file starts.
    pub.claim(300.0, 500.0, host)
    assert pub.covers(300.0) and HostLedger(path).others("other") == 300 * MiB
    # The next exchange publishes what the promise became and replaces the claim.
    pub.exchange(250.0, host)
    assert pub.covers(250.0) and not pub.covers(300.0)
