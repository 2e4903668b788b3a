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
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from worker.audio import AudioSource, default_cache_dir, find_media
from worker.chat import ChatError, ChatFile, UttAlignment, Utterance, WordTime, read_chat, render_chat, spoken_text
from worker.engines.base import Job, JobError, JobResult, Progress
from worker.output import atomic_write_text

log = logging.getLogger(__name__)

# A silence longer than this between two utterances starts a new span: the model would only
# spend time (and memory) on audio nobody aligns.
MAX_GAP_S = 4.0


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
        except Exception as exc:  # a warm-up that fails says nothing about real files
            log.debug("warm-up span failed: %s", exc)

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


def _cache_tag(aligner: SpanAligner) -> str:
    return f"{aligner.name}|{aligner.model}|{aligner.dtype}|{aligner.sample_rate}|{aligner.language or ''}"


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
) -> tuple[dict[int, UttResult], float]:
    """Results for one span (from the cache where possible) and the audio seconds the model saw."""
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
        return results, 0.0
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
        results[req.index] = res
        if cache is not None and res.error is None and res.words is not None and req.index in keys:
            cache.put(keys[req.index], [None if w is None else (w[0] - req.start_s, w[1] - req.start_s) for w in res.words])
    return results, len(audio) / float(aligner.sample_rate)


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
        for n, span in enumerate(spans, 1):
            results, seconds = _run_span(aligner, source, span, result_cache)
            stats["spans"] += 1
            stats["audio_seconds_aligned"] += seconds
            for req in span:
                utt = by_index[req.index]
                res = results[req.index]
                alignments[req.index] = _utterance_alignment(utt, req, res, where, warnings, stats)
            progress(base + (1.0 - base) * n / len(spans))
        if result_cache is not None:
            stats["cached_utterances"] = result_cache.hits - hits_before
        audio_seconds = source.duration_s

    stats["audio_seconds_aligned"] = round(stats["audio_seconds_aligned"], 3)
    text = render_chat(chat, alignments)
    atomic_write_text(job.output, text)
    if not spans:
        progress(1.0)
    return JobResult(output=job.output, audio_seconds=audio_seconds, stats=stats, warnings=warnings)


def _utterance_alignment(
    utt: Utterance, req: UttRequest, res: UttResult, where: str, warnings: list[str], stats: dict[str, Any]
) -> UttAlignment:
    """The writer's view of one result: word times in ms and a bullet spanning the aligned words."""
    original = utt.bullet if utt.bullet is not None else (int(round(req.start_s * 1000)), int(round(req.end_s * 1000)))
    if res.words is None:
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
