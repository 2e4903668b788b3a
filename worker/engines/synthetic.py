"""A real worker whose work is a memory and CPU profile, for tests and benchmarks.

After READY it holds ``baseline_mb``; per file it does ``cpu_seconds_per_audio_second x audio
seconds`` of CPU work and grows, touching every page so the memory is really resident, by
``mb_per_audio_second`` times

- the whole recording (``profile = "total"``): an engine that loads whole files, one span per file;
- the span it is working on (``profile = "streaming"``): an engine that streams the recording in
  the same spans a real engine cuts (``span_seconds``), holding one at a time, so its peak follows
  the longest span and not the length of the recording.

It then writes the transcript with evenly spread word bullets and ``%wor`` through the same CHAT
writer and atomic output path as the real engines. It imports no torch, so a worker starts in well
under a second.
"""

from __future__ import annotations

import gc
import mmap
import time
from pathlib import Path
from typing import Any

from worker.engines.base import BootError, Engine, Job, JobError, JobResult, Progress, report_spans

PAGE = mmap.PAGESIZE
STEPS = 50
PROFILES = ("total", "streaming")


def _touch(n_bytes: int) -> bytearray:
    """Allocate and dirty every page: resident, private memory the kernel must account."""
    buf = bytearray(n_bytes)
    for i in range(0, n_bytes, PAGE):
        buf[i] = 1
    return buf


def _spin(cpu_seconds: float) -> None:
    end = time.process_time() + cpu_seconds
    x = 0
    while time.process_time() < end:
        for i in range(2000):
            x ^= i * i
    return None


class SyntheticEngine(Engine):
    name = "synthetic"

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = dict(options)
        self.model = "synthetic"
        self.device = "cpu"
        self.profile = str(options.get("profile") or "total")
        if self.profile not in PROFILES:
            raise BootError(f"unknown synthetic profile {self.profile!r} (known: {', '.join(PROFILES)})")
        if self.profile == "streaming":
            self.model = "synthetic-streaming"  # its own learned model: the two shapes must not mix
        self.mb_per_audio_second = float(options.get("mb_per_audio_second", 4.0))
        self.cpu_per_audio_second = float(options.get("cpu_seconds_per_audio_second", 0.02))
        self._baseline = _touch(int(float(options.get("baseline_mb", 40.0)) * 2**20))
        time.sleep(float(options.get("boot_seconds", 0.0)))  # a slow model load (a dead network mount)
        self.probe_seconds = float(options.get("probe_seconds", 0.0))
        # Its buffers are bytearrays freed whole: a first pass leaves nothing behind, unless the
        # profile gives probes time of their own (a slow device's first pass, as tests model it).
        self.warms_up = self.probe_seconds > 0

    def _grow(self, seconds: float, cpu_per_s: float, on_step=None) -> None:
        """Hold ``mb_per_audio_second x seconds`` built up over STEPS steps of CPU work, then let go."""
        total = int(self.mb_per_audio_second * seconds * 2**20)
        held: list[bytearray] = []
        step_bytes = total // STEPS
        for i in range(STEPS):
            held.append(_touch(step_bytes))
            _spin(cpu_per_s * seconds / STEPS)
            if on_step is not None:
                on_step(i + 1)
        del held

    def run(self, job: Job, progress: Progress) -> JobResult:
        from worker.align import PlannedSpan, plan_features, planned_spans, span_cap, timed_requests
        from worker.chat import ChatError, read_chat
        from worker.output import atomic_write_text

        try:
            chat = read_chat(job.input)
        except ChatError as exc:
            raise JobError(str(exc), kind="input") from None
        if job.media is None:
            raise JobError(f"{job.input}: no media to align against", kind="media")
        features = plan_features(job.input, job.media, "synthetic", self.options)
        seconds = features.audio_s
        if seconds is None:
            raise JobError(f"{job.media}: cannot read media header: duration unknown", kind="media")

        if self.profile == "total":
            def step(i: int) -> None:
                progress(i / STEPS)
            self._grow(seconds, self.cpu_per_audio_second, step)
        else:
            spans = planned_spans(timed_requests(chat, seconds), span_cap("synthetic", self.options)) or \
                [PlannedSpan(0.0, seconds, 0)]
            spent = sum(p.seconds for p in spans) or 1.0
            cpu_per_s = self.cpu_per_audio_second * seconds / spent  # the file's CPU work, over its spans
            report_spans(progress, 0, len(spans))
            for n, span in enumerate(spans, 1):
                self._grow(span.seconds, cpu_per_s)
                progress(n / len(spans))
                report_spans(progress, n, len(spans))
        text = mark_synthetic(render_spread(chat, seconds))
        atomic_write_text(Path(job.output), text)
        return JobResult(output=Path(job.output), audio_seconds=seconds,
                         stats={"utterances": len(chat.utterances),
                                "words": sum(len(u.words) for u in chat.utterances)},
                         features_run=features.to_dict())

    def probe(self, lengths: list[float]) -> list[dict[str, Any]]:
        """The profile on spans of these lengths (no CPU work), measured like a file."""
        from telemetry.model import FileFeatures
        from worker import selfmem

        out = []
        for seconds in lengths:
            gc.collect()
            with selfmem.PeakWatch() as watch:
                self._grow(float(seconds), 0.0)
                time.sleep(self.probe_seconds)
            feats = FileFeatures(audio_s=seconds, longest_span_s=seconds, n_spans=1, windows=0)
            out.append({"features": feats.to_dict(), "growth_mb": round(watch.growth_mb, 1)})
        gc.collect()
        return out

    def release(self) -> None:
        gc.collect()


SYNTHETIC_MARK = "@Comment:\tsynthetic timings (batchalign-supervise --engine synthetic), not an alignment"


def mark_synthetic(text: str) -> str:
    """Say in the transcript itself that its times are made up, so nobody takes them for real."""
    lines = text.split("\n")
    at = next((i + 1 for i, ln in enumerate(lines) if ln.startswith("@Media:")),
              next((i + 1 for i, ln in enumerate(lines) if ln.startswith("@Begin")), 0))
    lines.insert(at, SYNTHETIC_MARK)
    return "\n".join(lines)


def render_spread(chat, seconds: float) -> str:
    """Spread each utterance's words evenly over its bullet (or the utterances over the file)."""
    from worker.chat import UttAlignment, WordTime, render_chat

    utts = [u for u in chat.utterances if u.words]
    alignments = {}
    total_ms = int(seconds * 1000)
    for k, u in enumerate(utts):
        if u.bullet is not None:
            start, end = u.bullet
        else:
            start = total_ms * k // max(1, len(utts))
            end = total_ms * (k + 1) // max(1, len(utts))
        n = len(u.words)
        step = (end - start) / n if n else 0
        words = [WordTime(w, int(start + i * step), int(start + (i + 1) * step)) for i, w in enumerate(u.words)]
        alignments[u.index] = UttAlignment(bullet=(start, end), words=words)
    return render_chat(chat, alignments)
