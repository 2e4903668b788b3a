"""A real worker whose work is a memory and CPU profile, for tests and benchmarks.

After READY it holds ``baseline_mb``; per file it grows to ``mb_per_audio_second x audio seconds``
over ``cpu_seconds_per_audio_second x audio seconds`` of CPU work, touching every page so the
memory is really resident, then writes the transcript with evenly spread word bullets and ``%wor``
through the same CHAT writer and atomic output path as the real engines. It imports no torch, so
a worker starts in well under a second.
"""

from __future__ import annotations

import gc
import mmap
import time
from pathlib import Path
from typing import Any

from worker.engines.base import Engine, Job, JobError, JobResult, Progress

PAGE = mmap.PAGESIZE
STEPS = 50


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
        self.model = "synthetic"
        self.device = "cpu"
        self.mb_per_audio_second = float(options.get("mb_per_audio_second", 4.0))
        self.cpu_per_audio_second = float(options.get("cpu_seconds_per_audio_second", 0.02))
        self._baseline = _touch(int(float(options.get("baseline_mb", 40.0)) * 2**20))
        time.sleep(float(options.get("boot_seconds", 0.0)))  # a slow model load (a dead network mount)

    def run(self, job: Job, progress: Progress) -> JobResult:
        import soundfile

        from worker.chat import ChatError, read_chat
        from worker.output import atomic_write_text

        try:
            chat = read_chat(job.input)
        except ChatError as exc:
            raise JobError(str(exc), kind="input") from None
        if job.media is None:
            raise JobError(f"{job.input}: no media to align against", kind="media")
        try:
            seconds = float(soundfile.info(str(job.media)).duration)
        except Exception as exc:
            raise JobError(f"{job.media}: cannot read media header: {exc}".replace("\n", " "), kind="media") from None

        total = int(self.mb_per_audio_second * seconds * 2**20)
        cpu = self.cpu_per_audio_second * seconds
        held: list[bytearray] = []
        step_bytes = total // STEPS
        for i in range(STEPS):
            held.append(_touch(step_bytes))
            _spin(cpu / STEPS)
            progress((i + 1) / STEPS)
        text = render_spread(chat, seconds)
        atomic_write_text(Path(job.output), text)
        del held
        return JobResult(output=Path(job.output), audio_seconds=seconds,
                         stats={"utterances": len(chat.utterances),
                                "words": sum(len(u.words) for u in chat.utterances)})

    def release(self) -> None:
        gc.collect()


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
