"""The file-level driver every real engine shares: CHAT in, spans of audio through the model, CHAT out.

An engine only has to place the words of a few utterances inside one span of audio
(:class:`SpanAligner`). This module reads the transcript, finds and opens the recording, recovers
utterance times when the transcript has none, groups utterances into spans so the model runs once
per span rather than once per utterance, reads only each span's audio, and writes the result with
new bullets and ``%wor`` tiers. One utterance that cannot be aligned becomes a warning; the file is
still written.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from telemetry.model import FileFeatures
from worker.audio import AudioSource, default_cache_dir, find_media, probe_media
from worker.chat import ChatError, ChatFile, UttAlignment, Utterance, WordTime, read_chat, render_chat, spoken_text
from worker.engines.base import Job, JobError, JobResult, Progress, report_spans
from worker.output import atomic_write_text

log = logging.getLogger(__name__)

# A silence longer than this between two utterances starts a new span: the model would only
# spend time (and memory) on audio nobody aligns.
MAX_GAP_S = 4.0
# Timing recovery streams an untimed recording in windows of at most this many seconds.
RECOVERY_WINDOW_S = 30.0
# Engines whose model cannot take a longer span than this at once (Whisper's input window).
SPAN_CAPS = {"whisper": 30.0}
# Probe spans a worker measures on itself at READY: a short one and one at the span cap.
PROBE_SHORT_S = 5.0
PROBE_WORDS = ("the quick brown fox jumps over the lazy dog and then runs home to see what the little bird "
               "is singing about today").split()


@dataclass
class UttRequest:
    """One utterance to align: absolute times in seconds; ``words`` as the model should hear them."""

    index: int
    start_s: float
    end_s: float
    words: list[str]


@dataclass
class UttResult:
    """Absolute (start, end) seconds per word (``None`` for a word that could not be placed), or
    ``words=None`` and a one-line ``error`` when the utterance failed as a whole."""

    index: int
    words: list[tuple[float, float] | None] | None
    error: str | None = None


class SpanAligner(abc.ABC):
    """Places the words of utterances inside one span of audio (16 kHz float32 mono by default)."""

    sample_rate: int = 16000
    max_span_s: float = 30.0
    name: str = ""
    model: str = ""
    dtype: str = ""

    @abc.abstractmethod
    def align_span(self, audio: np.ndarray, span_start_s: float, utts: list[UttRequest]) -> list[UttResult]:
        """Results for ``utts`` (any order); ``audio`` starts at ``span_start_s``. An utterance longer
        than ``max_span_s`` may arrive alone and must be handled (split), never skipped."""

    language: str | None = None

    def use_language(self, code: str | None) -> None:
        """The transcript's first ``@Languages`` code (ISO 639-3), before each file. Engines whose
        model conditions on the language (Whisper) switch to it; the others ignore it."""

    def warm_up(self) -> None:
        """One small span through the model at load time: weights paged in, lazy buffers and the
        allocator's pools made. The READY baseline is then what a worker really holds, and the first
        file's measured growth is its own rather than the model's start-up."""
        audio = np.zeros(int(self.sample_rate * 2), dtype=np.float32)
        try:
            self.align_span(audio, 0.0, [UttRequest(0, 0.0, 2.0, ["a"])])
        except Exception as exc:  # the worker still serves files, but its READY baseline is low: say so
            log.warning("warm-up span failed (%s: %s); the READY baseline may miss the model's start-up",
                        type(exc).__name__, exc)

    def transcribe_words(self, audio: np.ndarray, offset_s: float) -> list[tuple[str, float, float]]:
        """Words the model hears in ``audio`` with absolute times, for recovering utterance times.

        Engines that can recognise speech override this; an aligner that cannot returns no words
        and recovery then falls back to what it can infer without them.
        """
        return []


# --------------------------------------------------------------------------------------------
# Result cache


class ResultCache:
    """Word times of already-aligned utterances, one small JSON file per key (safe across workers).

    The key covers the utterance's audio samples, its words and the engine/model/dtype, and times
    are stored relative to the utterance start, so an unchanged utterance is free to re-align even
    when its neighbours changed or the file moved.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(audio: np.ndarray, words: Sequence[str], tag: str) -> str:
        h = hashlib.sha256()
        h.update(tag.encode("utf-8"))
        h.update(b"\0")
        h.update(json.dumps(list(words), ensure_ascii=False).encode("utf-8"))
        h.update(b"\0")
        h.update(np.ascontiguousarray(audio, dtype=np.float32).tobytes())
        return h.hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> list[tuple[float, float] | None] | None:
        try:
            data = json.loads(self._path(key).read_text())
        except (OSError, ValueError):
            self.misses += 1
            return None
        self.hits += 1
        return [tuple(w) if w is not None else None for w in data["words"]]

    def put(self, key: str, words: list[tuple[float, float] | None]) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "w") as fh:
                json.dump({"words": words}, fh)
            os.replace(tmp, path)
        except OSError as exc:  # a full or read-only cache must never fail the file
            log.debug("result cache write failed: %s", exc)


@functools.lru_cache(maxsize=1)
def _aligner_version() -> str:
    """This release's version: a new release may place words differently, so it never reuses
    the word times an older one cached."""
    try:
        from importlib.metadata import version

        return version("batchalign-supervise")
    except Exception:  # noqa: BLE001 - a source tree never installed
        return "0+unknown"


def _cache_tag(aligner: SpanAligner) -> str:
    # The steps around the model change word times too: a result made with other steps is not reused.
    # With several @Languages the language a window is forced in is chosen among all of them, so the
    # whole candidate list is part of what made a result, not only the first language.
    steps = getattr(aligner, "steps", None)
    candidates = ",".join(getattr(aligner, "candidates", None) or [])
    return (f"{aligner.name}|{aligner.model}|{aligner.dtype}|{aligner.sample_rate}|{aligner.language or ''}"
            + (f"|{candidates}" if candidates else "")
            + f"|{_aligner_version()}" + (f"|{steps!r}" if steps is not None else ""))


def _resolve_cache(cache: Any, job: Job) -> tuple[Path, ResultCache | None]:
    """``cache`` is a folder, a :class:`ResultCache`, or ``None`` (job option or the default folder)."""
    if isinstance(cache, ResultCache):
        return cache.root.parent, cache
    root = cache if cache is not None else job.options.get("cache_dir")
    if root is None:
        return default_cache_dir(), None
    root = Path(root)
    return root, ResultCache(root / "results")


# --------------------------------------------------------------------------------------------
# Driver


def _read_transcript(job: Job) -> ChatFile:
    try:
        return read_chat(job.input)
    except ChatError as exc:
        raise JobError(str(exc), kind="input") from None
    except FileNotFoundError:
        raise JobError(f"{job.input}: transcript not found", kind="input") from None
    except OSError as exc:
        raise JobError(f"{job.input}: cannot read transcript: {exc.strerror or exc}", kind="input") from None


def _locate_media(job: Job, chat: ChatFile) -> Path:
    if job.media is not None:
        return job.media
    if chat.media is None or not chat.media.name:
        raise JobError(f"{job.input}: no @Media header and no media file given", kind="media")
    media_dir = job.options.get("media_dir")
    root = job.options.get("corpus_root")
    found = find_media(
        job.input,
        chat.media.name,
        Path(media_dir) if media_dir else None,
        Path(root) if root else None,
    )
    if found is None:
        where = f" or under {media_dir}" if media_dir else ""
        raise JobError(
            f"{job.input}: media {chat.media.name!r} not found beside the transcript{where}", kind="media"
        )
    return found


def group_spans(
    requests: Sequence[UttRequest], max_span_s: float, max_gap_s: float = MAX_GAP_S
) -> list[list[UttRequest]]:
    """Consecutive utterances (by start time) whose audio fits in one span of ``max_span_s``."""
    spans: list[list[UttRequest]] = []
    cur: list[UttRequest] = []
    cur_start = cur_end = 0.0
    for req in sorted(requests, key=lambda r: (r.start_s, r.end_s)):
        if cur and max(cur_end, req.end_s) - cur_start <= max_span_s and req.start_s - cur_end <= max_gap_s:
            cur.append(req)
            cur_end = max(cur_end, req.end_s)
            continue
        if cur:
            spans.append(cur)
        cur = [req]
        cur_start, cur_end = req.start_s, req.end_s
    if cur:
        spans.append(cur)
    return spans


# --------------------------------------------------------------------------------------------
# The plan: what a file's memory depends on, before it runs


@dataclass(frozen=True)
class PlannedSpan:
    """One piece of audio the model will hold at once, and its transcript's length."""

    start_s: float
    end_s: float
    chars: int

    @property
    def seconds(self) -> float:
        return max(0.0, self.end_s - self.start_s)


def span_cap(engine: str, options: dict[str, Any]) -> float:
    """The longest span ``engine`` runs at once with ``options`` (``span_seconds``, capped by the model)."""
    try:
        cap = float(options.get("span_seconds") or 30.0)
    except (TypeError, ValueError):
        cap = 30.0
    cap = cap if cap > 0 else 30.0
    return min(cap, SPAN_CAPS.get(engine, cap))


def timed_requests(chat: ChatFile, duration_s: float | None) -> list[UttRequest]:
    """The utterances a timed transcript sends to the model, from their bullets (as ``align_file``)."""
    linked = not (chat.media is not None and "unlinked" in chat.media.flags)
    out = []
    if not linked:
        return out
    for u in chat.utterances:
        if not u.words or u.bullet is None:
            continue
        s, e = u.bullet[0] / 1000.0, u.bullet[1] / 1000.0
        if e <= s or (duration_s is not None and s >= duration_s):
            continue
        out.append(UttRequest(u.index, s, e, [spoken_text(w) for w in u.words]))
    return out


def _chars(words: Sequence[str]) -> int:
    return len(" ".join(words))


def planned_spans(requests: Sequence[UttRequest], cap: float) -> list[PlannedSpan]:
    """The spans ``group_spans`` makes of these utterances, with their transcript lengths."""
    return [PlannedSpan(min(r.start_s for r in span), max(r.end_s for r in span), sum(_chars(r.words) for r in span))
            for span in group_spans(requests, cap)]


def features_of(spans: Sequence[PlannedSpan], *, audio_s: float | None, media_mb: float | None,
                windows: int = 0, window_s: float = 0.0, sample_rate: int | None = None,
                channels: int | None = None) -> FileFeatures:
    """Features of the spans a file runs; recovery windows count as spans of their own length."""
    longest = max(spans, key=lambda p: (p.seconds, p.chars), default=None)
    span_s = longest.seconds if longest is not None else 0.0
    chars = longest.chars if longest is not None else 0
    if windows and window_s > span_s:
        span_s = window_s
    return FileFeatures(audio_s=audio_s, media_mb=media_mb, longest_span_s=round(span_s, 3), longest_span_chars=chars,
                        n_spans=len(spans), windows=windows, sample_rate=sample_rate, channels=channels)


def _media_header(path: Path) -> tuple[float | None, float | None, int | None, int | None]:
    """(seconds, MiB, sample rate, channels) from the header alone; unknowns are None."""
    try:
        h = probe_media(path, with_fingerprint=False)
    except OSError:
        raise JobError(f"{path}: media file not found", kind="media") from None
    return h.seconds, h.size_mb, h.sample_rate, h.channels


def plan_features(cha_path: Path | str, media_path: Path | str | None, engine: str,
                  options: dict[str, Any] | None = None, *, header: Any = None) -> FileFeatures:
    """What ``engine`` will hold in memory for this file, from its plan: no model weights, only
    the transcript and the media header, so the supervisor can call it for every file at intake.

    Timed transcripts are grouped into spans exactly as ``align_file`` groups them; an untimed one
    is streamed through timing recovery in windows and then cut into spans of at most the cap.
    An engine that holds a whole file (the synthetic ``total`` profile) runs it as one span.
    Bad input raises ``JobError`` with one line naming the file. ``header``: the recording's
    ``worker.audio.MediaHeader`` when the caller already read it (intake does), so it is not opened again.
    """
    options = dict(options or {})
    cha = Path(cha_path)
    try:
        chat = read_chat(cha)
    except ChatError as exc:
        raise JobError(str(exc), kind="input") from None
    except OSError as exc:
        raise JobError(f"{cha}: cannot read transcript: {exc.strerror or exc}", kind="input") from None
    duration = size_mb = None
    rate = channels = None
    if header is not None:
        duration, size_mb, rate, channels = header.seconds, header.size_mb, header.sample_rate, header.channels
    elif media_path is not None:
        duration, size_mb, rate, channels = _media_header(Path(media_path))
    spoken = [u for u in chat.utterances if u.words]
    total_chars = sum(_chars([spoken_text(w) for w in u.words]) for u in spoken)
    cap = span_cap(engine, options)
    if engine == "synthetic" and str(options.get("profile") or "total") == "total":
        seconds = duration or 0.0
        return FileFeatures(audio_s=duration, media_mb=size_mb, longest_span_s=seconds,
                            longest_span_chars=total_chars, n_spans=1 if spoken else 0, windows=0,
                            sample_rate=rate, channels=channels)
    if not spoken or chat.has_timings:
        spans = planned_spans(timed_requests(chat, duration), cap)
        return features_of(spans, audio_s=duration, media_mb=size_mb, sample_rate=rate, channels=channels)
    # Untimed: the recovered utterances are unknown yet; the spans fill the cap at worst.
    window = min(cap, RECOVERY_WINDOW_S)
    if duration is None:
        return FileFeatures(audio_s=None, media_mb=size_mb, longest_span_s=cap, longest_span_chars=total_chars,
                            n_spans=None, windows=None, sample_rate=rate, channels=channels)
    span_s = min(cap, duration)
    share = min(1.0, 1.5 * span_s / duration) if duration > 0 else 1.0
    return FileFeatures(audio_s=duration, media_mb=size_mb, longest_span_s=round(span_s, 3),
                        longest_span_chars=int(round(total_chars * share)),
                        n_spans=max(1, math.ceil(duration / cap)), windows=max(1, math.ceil(duration / window)),
                        sample_rate=rate, channels=channels)


def measure_probes(aligner: "SpanAligner", plans: Sequence[Sequence[float]], release: Any = None,
                   *, measure: bool = True) -> list[dict[str, Any]]:
    """Growth of this worker on probe files of known spans: the READY ``calibration`` list.

    Each plan is a file of faint noise whose timed transcript (at a speaking rate) makes spans of
    the given lengths, aligned by ``align_file`` exactly as a real file is (transcript read, audio
    read, spans through the model, result cache, output written), so the per-file overhead is in
    the figure too. The largest plan runs once unmeasured first: the buffers and allocator pools a
    worker keeps after its first files are then part of its READY baseline, as they are for every
    file after the first, and each measured probe grows as a real file after READY does. Growth is
    measured as a file's is (see ``selfmem.PeakWatch``). ``measure=False`` runs that first pass
    alone.
    """
    import soundfile  # noqa: PLC0415

    from worker import selfmem  # noqa: PLC0415

    rng = np.random.default_rng(0)
    out: list[dict[str, Any]] = []
    plans = [list(map(float, p)) for p in plans if p and all(x > 0 for x in p)]
    if not plans:
        return out
    largest = max(plans, key=sum)
    with tempfile.TemporaryDirectory(prefix="batchalign-probe-") as tmp:
        root = Path(tmp)
        for k, spans in enumerate([largest, *(plans if measure else [])]):
            starts, t = [], 0.0
            for seconds in spans:
                starts.append(t)
                t += seconds + MAX_GAP_S + 1.0  # a gap the driver will not bridge: separate spans
            total = starts[-1] + spans[-1]
            wav, cha = root / f"probe{k}.wav", root / f"probe{k}.cha"
            soundfile.write(str(wav), (rng.standard_normal(int(16000 * total)) * 1e-3).astype(np.float32), 16000)
            cha.write_text(_probe_chat(wav.stem, list(zip(starts, spans))), encoding="utf-8")
            job = Job(job=f"probe{k}", input=cha, output=root / f"out{k}.cha", media=wav, rel=cha.name)
            if release is not None:
                release()
            try:
                with selfmem.PeakWatch() as watch:
                    result = align_file(job, aligner, lambda f: None, cache=ResultCache(root / f"results{k}"))
            except Exception as exc:  # noqa: BLE001 - a probe that fails only leaves the defaults in charge
                log.debug("probe %s failed: %s", spans, exc)
                continue
            if k == 0 or result.features_run is None:
                continue  # the unmeasured first pass
            out.append({"features": result.features_run, "growth_mb": round(watch.growth_mb, 1)})
    if release is not None:
        release()
    return out


def _probe_chat(stem: str, spans: Sequence[tuple[float, float]]) -> str:
    """A timed transcript whose utterances (at most 10 s, 2.5 words a second) fill each (start, length):
    few utterances, since an engine may align each alone and probes must stay cheap."""
    lines = ["@UTF8", "@Begin", "@Languages:\teng", "@Participants:\tPAR Participant",
             "@ID:\teng|probe|PAR|||||Participant|||", f"@Media:\t{stem}, audio"]
    k = 0
    for start, seconds in spans:
        t, stop = start, start + seconds
        while t < stop - 0.05:
            end = min(stop, t + 10.0)
            n = max(1, int(round((end - t) * 2.5)))
            words = " ".join(PROBE_WORDS[(k + i) % len(PROBE_WORDS)] for i in range(n))
            lines.append(f"*PAR:\t{words} . \x15{int(round(t * 1000))}_{int(round(end * 1000))}\x15")
            t, k = end, k + n
    lines.append("@End")
    return "\n".join(lines) + "\n"


def probe_plans(cap: float) -> list[list[float]]:
    """Probe files for a span aligner: one short span, and a full span followed by a short one (a
    file of several spans, as every long recording is). Two points of the span line."""
    short = min(PROBE_SHORT_S, cap)
    return [[short], [cap, short]]


def probe_lengths(cap: float) -> list[float]:
    """Probe spans for an engine without a span aligner (the synthetic one): short and the cap."""
    return sorted({min(PROBE_SHORT_S, cap), cap})


def _utterance_times(
    chat: ChatFile, source: AudioSource, aligner: SpanAligner, progress: Progress
) -> dict[int, tuple[float, float]]:
    """Seconds per utterance: the bullets, or recovered times where the transcript has none."""
    times: dict[int, tuple[float, float]] = {}
    linked = not (chat.media is not None and "unlinked" in chat.media.flags)
    if linked:
        for u in chat.utterances:
            if u.bullet is not None and u.words:
                times[u.index] = (u.bullet[0] / 1000.0, u.bullet[1] / 1000.0)
    if not chat.has_timings:
        from worker.engines.timing import recover_utterance_times  # noqa: PLC0415 - only for untimed files

        recovered = recover_utterance_times(source, chat, aligner, progress)
        for idx, span in recovered.items():
            times.setdefault(idx, (float(span[0]), float(span[1])))
    return times


def _sanitize(
    words: list[tuple[float, float] | None], lo: float, hi: float
) -> list[tuple[int, int] | None]:
    """Milliseconds, inside [lo, hi], non-overlapping and in order (what ``%wor`` promises)."""
    out: list[tuple[int, int] | None] = []
    lo_ms, hi_ms = int(round(lo * 1000)), int(round(hi * 1000))
    prev_end = lo_ms
    for w in words:
        if w is None or w[0] is None or w[1] is None or not np.isfinite(w[0]) or not np.isfinite(w[1]):
            out.append(None)
            continue
        s = int(round(w[0] * 1000))
        e = int(round(w[1] * 1000))
        s = min(max(s, prev_end), hi_ms)
        e = min(max(e, s), hi_ms)
        out.append((s, e))
        prev_end = e
    return out


def _run_span(
    aligner: SpanAligner,
    source: AudioSource,
    span: list[UttRequest],
    cache: ResultCache | None,
) -> tuple[dict[int, UttResult], float, int]:
    """Results for one span (from the cache where possible), and the audio seconds and transcript
    characters the model saw (0 when the cache answered the whole span)."""
    results: dict[int, UttResult] = {}
    keys: dict[int, str] = {}
    todo = span
    if cache is not None:
        tag = _cache_tag(aligner)
        todo = []
        for req in span:
            # Native-rate samples of the utterance alone: independent of how spans were grouped.
            samples = source.read(req.start_s, req.end_s, rate=source.native_rate)
            key = cache.key(samples, req.words, tag + f"|{source.native_rate}")
            keys[req.index] = key
            hit = cache.get(key)
            if hit is not None and len(hit) == len(req.words):
                results[req.index] = UttResult(
                    req.index, [None if w is None else (w[0] + req.start_s, w[1] + req.start_s) for w in hit]
                )
            else:
                todo.append(req)
    if not todo:
        return results, 0.0, 0
    start = min(r.start_s for r in todo)
    end = max(r.end_s for r in todo)
    audio = source.read(start, end, rate=aligner.sample_rate)
    try:
        got = aligner.align_span(audio, start, list(todo))
    except (RuntimeError, MemoryError) as exc:
        kind = "memory" if is_out_of_memory(exc) else "engine"
        raise JobError(f"{source.path}: the model failed on {start:.2f}-{end:.2f} s: {_one_line(exc)}", kind=kind) from None
    by_index = {r.index: r for r in got}
    for req in todo:
        res = by_index.get(req.index)
        if res is None:
            res = UttResult(req.index, None, error="the aligner returned no result")
        elif res.words is not None and len(res.words) != len(req.words):
            res = UttResult(req.index, None, error=f"the aligner returned {len(res.words)} times for {len(req.words)} words")
        elif res.words is not None:
            res = _plausible(res, req, audio, start, aligner.sample_rate)
        results[req.index] = res
        if cache is not None and res.error is None and res.words is not None and req.index in keys:
            cache.put(keys[req.index], [None if w is None else (w[0] - req.start_s, w[1] - req.start_s) for w in res.words])
    return results, len(audio) / float(aligner.sample_rate), sum(_chars(r.words) for r in todo)


def _plausible(res: UttResult, req: UttRequest, audio: np.ndarray, start: float, rate: int) -> UttResult:
    """``res``, or an ``implausible:`` error when its word times cannot be real (see
    ``worker.engines.plausibility``): the utterance then keeps its bullet and gets no word times."""
    from worker.engines.plausibility import IMPLAUSIBLE, check  # noqa: PLC0415

    a = max(0, int(round((req.start_s - start) * rate)))
    b = max(a, int(round((req.end_s - start) * rate)))
    reason = check(res.words, req.words, req.start_s, req.end_s, audio[a:b], rate)
    return res if reason is None else UttResult(req.index, None, error=f"{IMPLAUSIBLE} {reason}")


def is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError or torch's out-of-memory (CPU allocator or CUDA): a memory failure of the file,
    which the supervisor retries with a larger estimate, never a warning."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "defaultcpuallocator" in text


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def align_file(job: Job, aligner: SpanAligner, progress: Progress, *, cache: Any = None) -> JobResult:
    """Align one transcript against its recording and write ``job.output`` atomically."""
    chat = _read_transcript(job)
    aligner.use_language(chat.languages[0] if chat.languages else None)
    media = _locate_media(job, chat)
    cache_dir, result_cache = _resolve_cache(cache, job)
    where = job.rel or str(job.input)
    warnings: list[str] = []
    stats: dict[str, Any] = {
        "utterances": 0,
        "aligned_utterances": 0,
        "words": 0,
        "aligned_words": 0,
        "spans": 0,
        "audio_seconds_aligned": 0.0,
        "cached_utterances": 0,
    }
    spoken = [u for u in chat.utterances if u.words]
    stats["utterances"] = len(spoken)
    stats["words"] = sum(len(u.words) for u in spoken)

    with AudioSource.open(media, cache_dir=cache_dir) as source:
        if spoken and not chat.has_timings:
            inner = lambda f: progress(0.3 * max(0.0, min(1.0, f)))  # noqa: E731
            times = _utterance_times(chat, source, aligner, inner)
            base = 0.3
        else:
            times = _utterance_times(chat, source, aligner, progress)
            base = 0.0
        requests: list[UttRequest] = []
        by_index: dict[int, Utterance] = {u.index: u for u in spoken}
        for u in spoken:
            t = times.get(u.index)
            if t is None:
                warnings.append(f"{where}:{u.line}: no time for this utterance; left unaligned")
                continue
            s, e = t
            if source.duration_s is not None and s >= source.duration_s:
                warnings.append(f"{where}:{u.line}: utterance starts at {s:.3f} s, after the end of the media ({source.duration_s:.3f} s); left unaligned")
                continue
            if e <= s:
                warnings.append(f"{where}:{u.line}: utterance time {s:.3f}-{e:.3f} s is empty; left unaligned")
                continue
            requests.append(UttRequest(u.index, s, e, [spoken_text(w) for w in u.words]))

        spans = group_spans(requests, aligner.max_span_s)
        alignments: dict[int, UttAlignment] = {}
        hits_before = result_cache.hits if result_cache else 0
        ran: list[PlannedSpan] = []  # what really went through the model (not the cache)
        report_spans(progress, 0, len(spans))
        for n, span in enumerate(spans, 1):
            results, seconds, chars = _run_span(aligner, source, span, result_cache)
            stats["spans"] += 1
            stats["audio_seconds_aligned"] += seconds
            if seconds > 0:
                ran.append(PlannedSpan(0.0, seconds, chars))
            for req in span:
                utt = by_index[req.index]
                res = results[req.index]
                alignments[req.index] = _utterance_alignment(utt, req, res, where, warnings, stats)
            progress(base + (1.0 - base) * n / len(spans))
            report_spans(progress, n, len(spans))
        if result_cache is not None:
            stats["cached_utterances"] = result_cache.hits - hits_before
        audio_seconds = source.duration_s
        features_run = _features_run(ran, spans, source, media, recovered=base > 0, cap=aligner.max_span_s)

    stats["audio_seconds_aligned"] = round(stats["audio_seconds_aligned"], 3)
    text = render_chat(chat, alignments)
    atomic_write_text(job.output, text)
    if not spans:
        progress(1.0)
    return JobResult(output=job.output, audio_seconds=audio_seconds, stats=stats, warnings=warnings,
                     features_run=features_run)


def _features_run(ran: list[PlannedSpan], spans: list[list[UttRequest]], source: AudioSource, media: Path,
                  *, recovered: bool, cap: float) -> dict[str, Any] | None:
    """Features of the work the model really did, or None when it did none (all cached).

    The recording's length is scaled by the share of the planned span seconds that ran, so a
    half-cached file teaches what half a file costs.
    """
    duration = source.duration_s
    windows = max(1, math.ceil(duration / min(cap, RECOVERY_WINDOW_S))) if recovered and duration else 0
    if not ran and not windows:
        return None
    planned = sum(max(r.end_s for r in sp) - min(r.start_s for r in sp) for sp in spans)
    done = sum(p.seconds for p in ran)
    audio = duration
    if duration is not None and planned > 0 and done < planned:
        audio = duration * done / planned
    try:
        size_mb = media.stat().st_size / 2**20 * (audio / duration if audio is not None and duration else 1.0)
    except OSError:
        size_mb = None
    window_s = min(cap, RECOVERY_WINDOW_S, duration or cap) if windows else 0.0
    return features_of(ran, audio_s=audio, media_mb=size_mb, windows=windows, window_s=window_s,
                       sample_rate=source.native_rate, channels=source.channels).to_dict()


def _utterance_alignment(
    utt: Utterance, req: UttRequest, res: UttResult, where: str, warnings: list[str], stats: dict[str, Any]
) -> UttAlignment:
    """The writer's view of one result: word times in ms and a bullet spanning the aligned words."""
    original = utt.bullet if utt.bullet is not None else (int(round(req.start_s * 1000)), int(round(req.end_s * 1000)))
    if res.words is None:
        if res.error and res.error.startswith("implausible:"):
            # Tagged first so reports can count them; no made-up bullet for an untimed utterance.
            stats["implausible_utterances"] = stats.get("implausible_utterances", 0) + 1
            warnings.append(f"implausible: {where}:{utt.line}: {res.error[len('implausible:'):].strip()}")
            return UttAlignment(bullet=utt.bullet, words=[WordTime(w, None, None) for w in utt.words])
        warnings.append(f"{where}:{utt.line}: {res.error or 'could not be aligned'}")
        return UttAlignment(bullet=original, words=[WordTime(w, None, None) for w in utt.words])
    ms = _sanitize(list(res.words), req.start_s, req.end_s)
    words = [WordTime(w, t[0] if t else None, t[1] if t else None) for w, t in zip(utt.words, ms)]
    placed = [t for t in ms if t is not None]
    stats["aligned_words"] += len(placed)
    if not placed:
        warnings.append(f"{where}:{utt.line}: {res.error or 'no word could be placed'}")
        return UttAlignment(bullet=original, words=words)
    stats["aligned_utterances"] += 1
    if len(placed) < len(ms):
        missing = [w for w, t in zip(utt.words, ms) if t is None]
        warnings.append(
            f"{where}:{utt.line}: {len(missing)} of {len(ms)} words could not be placed ({' '.join(missing[:5])})"
        )
    return UttAlignment(bullet=(placed[0][0], placed[-1][1]), words=words)
