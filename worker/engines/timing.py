"""Utterance times for transcripts without bullets: recognise the recording, then match the words.

The recording is streamed in windows cut at pauses (never loaded whole), each window is transcribed
with word times by the engine's own model, and the recognised words are matched to the transcript's
words by a least-edit sequence alignment. An utterance takes its span from its first and last
matched words (stretched by the speaking rate over unmatched words at its edges); utterances with
no matched word share the gap between their neighbours in proportion to their length in characters
(``gaps_by_sound``: its voiced frames, cut at its pauses, :func:`share_by_sound`). Spans come out
in transcript order, non-overlapping and inside the recording, and are then refined by forced
alignment of the transcript's own words (:func:`refine_spans`): an utterance takes its first and
last forced word times with a little room (``share_pauses``: grown into the pauses around it where
the audio has pauses to find); one the forcing cannot place gets the gap between the neighbours it
did place (by sound, as above).
"""

from __future__ import annotations

import difflib
import logging
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from worker.chat import spoken_text
from worker.engines.dtw import DIAGONAL, fill_row, traceback
from worker.engines.plausibility import frame_levels, quiet_frames

log = logging.getLogger(__name__)

WINDOW_S = 30.0
CUT_SEARCH_S = 8.0  # a window is cut at its quietest moment within its last seconds
EDGE_PAD_S = 0.15  # recognised word times are tight; forced alignment wants a little room
MIN_SIMILARITY = 0.7  # a mismatched pair ("stella"/"steller") still anchors above this
MIN_SIMILAR_LEN = 4  # shorter words anchor only when identical ("her" is not "for")
MIN_WORDS_PER_SPEECH_S = 0.7  # fewer recognised words than this per second of sound: retry halves
MIN_SPLIT_S = 6.0  # pieces shorter than this are not split again
MAX_SPLITS = 2
MIN_BAND = 200  # words either side of the diagonal the alignment may stray
BAND_FRACTION = 0.15
MAX_BAND_CELLS = 20_000_000  # bounds the traceback memory (one byte a cell) on huge transcripts
REFINE_PAD_S = 1.0  # audio either side of a chunk's rough spans when forcing its words
REFINE_MAX_WORDS = 120  # words forced together at most (well inside Whisper's 448-token decoder)
SEC_PER_CHAR = (0.03, 0.15)  # bounds on the speaking rate used to stretch over unmatched words
PAUSE_S = 0.1  # a quiet run this long between two utterances' sound is a pause a gap may be cut at

_NOT_WORD = re.compile(r"[^\w]+", re.UNICODE)

Progress = Callable[[float], None]


def normalize(word: str) -> str:
    """Case-, accent- and punctuation-free form for matching recognised and transcribed words."""
    text = unicodedata.normalize("NFKD", word.lower())
    text = "".join(c for c in text if not unicodedata.combining(c))
    return _NOT_WORD.sub("", text.replace("_", ""))


@dataclass
class _RefWord:
    utt: int  # position in the list of spoken utterances
    text: str


def units(word: str) -> list[str]:
    """``word`` in the units recognised and transcribed words are matched by: itself, or, for
    scripts written without spaces (Chinese, Cantonese, Japanese), one unit per character, since
    where a transcriber and a recogniser put word breaks in such text has nothing to do with what
    was said (runs of other characters stay together)."""
    from worker.engines.plausibility import written_without_spaces  # noqa: PLC0415

    if not any(written_without_spaces(c) for c in word):
        return [word]
    out: list[str] = []
    run = ""
    for c in word:
        if written_without_spaces(c):
            if run:
                out.append(run)
                run = ""
            out.append(c)
        else:
            run += c
    return out + ([run] if run else [])


def split_timed(word: str, start: float, end: float) -> list[tuple[str, float, float]]:
    """A recognised word as :func:`units`, its time shared among them by length."""
    parts = units(word)
    if len(parts) == 1:
        return [(word, start, end)]
    total = sum(len(p) for p in parts)
    out, t = [], start
    for p in parts:
        d = (end - start) * len(p) / total
        out.append((p, t, t + d))
        t += d
    return out


def transcript_words(chat: Any) -> tuple[list[Any], list[_RefWord]]:
    """Spoken utterances and their normalised words (:func:`units`), in transcript order."""
    utts = [u for u in chat.utterances if u.words]
    ref: list[_RefWord] = []
    for k, u in enumerate(utts):
        for w in u.words:
            for piece in spoken_text(w).split():
                for unit in units(piece):
                    norm = normalize(unit)
                    if norm:
                        ref.append(_RefWord(k, norm))
    return utts, ref


def quietest_point(audio: np.ndarray, rate: int, lo_s: float, hi_s: float) -> float:
    """Seconds into ``audio`` of the quietest 200 ms between ``lo_s`` and ``hi_s``."""
    frame = max(1, int(rate * 0.02))
    n = len(audio) // frame
    a, b = max(0, int(lo_s / 0.02)), min(n, int(hi_s / 0.02))
    if b <= a:
        return min(hi_s, len(audio) / rate)
    x = audio[: n * frame].astype(np.float64).reshape(n, frame)
    energy = np.convolve((x * x).mean(axis=1), np.ones(10) / 10, mode="same")
    return (a + int(np.argmin(energy[a:b]))) * 0.02 + 0.01


def has_pauses(audio: np.ndarray, rate: int) -> bool:
    """Whether ``audio`` has pauses clearly below its speech, by the rule the aligner's pause
    snapping uses (``plausibility.quiet_frames``): noisy or distant recordings have none to find."""
    return bool(quiet_frames(frame_levels(audio, rate)).any())


def speech_seconds(audio: np.ndarray, rate: int) -> float:
    """Seconds of ``audio`` louder than its pauses (all of it when it has no clear pauses)."""
    quiet = quiet_frames(frame_levels(audio, rate))
    if not quiet.any():
        return len(audio) / rate
    return float((~quiet).sum()) * 0.02


def transcribe_piece(aligner: Any, audio: np.ndarray, offset_s: float, rate: int,
                     depth: int = 0) -> list[tuple[str, float, float]]:
    """``aligner.transcribe_words``, retried on halves when it heard too few words.

    Whisper can skip most of a window that holds sparse speech between long pauses (it then
    returns a handful of words for twenty seconds of talk). Fewer than ``MIN_WORDS_PER_SPEECH_S``
    words per second of sound triggers a retry on the two halves (cut at the quietest moment of
    the middle third), kept when they hear more words. An aligner whose ``steps.retry_sparse`` is
    false is not retried.
    """
    from worker.engines.plausibility import SILENCE_DBFS, speech_level_dbfs  # noqa: PLC0415

    if speech_level_dbfs(audio, rate) < SILENCE_DBFS:
        return []  # nothing said: a recogniser would only make words up (Whisper does)
    words = list(aligner.transcribe_words(audio, offset_s))
    length = len(audio) / rate
    retry = getattr(getattr(aligner, "steps", None), "retry_sparse", True)
    if not retry or depth >= MAX_SPLITS or length < MIN_SPLIT_S:
        return words
    speech = speech_seconds(audio, rate)
    if speech < 2.0 or len(words) >= MIN_WORDS_PER_SPEECH_S * speech:
        return words
    mid = quietest_point(audio, rate, length / 3, 2 * length / 3)
    cut = int(round(mid * rate))
    halves = (transcribe_piece(aligner, audio[:cut], offset_s, rate, depth + 1)
              + transcribe_piece(aligner, audio[cut:], offset_s + cut / rate, rate, depth + 1))
    return halves if len(halves) > len(words) else words


def stream_words(source: Any, aligner: Any, progress: Progress, *, window_s: float = WINDOW_S,
                 search_s: float = CUT_SEARCH_S) -> tuple[list[tuple[str, float, float]], float]:
    """Recognised (word, start, end) over the whole recording, and the seconds of audio read.

    The recording is read ``window_s`` at a time; each window is cut at its quietest moment within
    its last ``search_s`` and only the part before the cut is transcribed, the next window starting
    at the cut. Cuts fall between words, so no word is heard cut in two, and a recogniser never
    has to guess at a word clipped by the window edge (Whisper merges or invents words there).
    """
    rate = int(getattr(aligner, "sample_rate", 16000))
    window_s = max(float(window_s), 2.0)
    search_s = min(float(search_s), window_s / 2)
    duration = getattr(source, "duration_s", None)
    words: list[tuple[str, float, float]] = []
    t = 0.0
    read_end = 0.0
    while True:
        audio = source.read(t, t + window_s, rate=rate)
        if len(audio) == 0:
            break
        got_end = t + len(audio) / rate
        read_end = max(read_end, got_end)
        short = len(audio) < (window_s - 0.05) * rate  # the recording ended inside this window
        last = short or (duration is not None and got_end >= duration - 1e-3)
        if not last:
            cut = quietest_point(audio, rate, window_s - search_s, window_s - 0.5)
            audio = audio[: int(round(cut * rate))]
        end = t + len(audio) / rate
        for word, s, e in transcribe_piece(aligner, audio, t, rate):
            s, e = max(float(s), t), min(float(e), end)
            words.append((word, s, max(s, e)))
        if duration:
            progress(min(1.0, end / duration))
        if last:
            break
        t = end
    words.sort(key=lambda w: (w[1], w[2]))
    return words, read_end


def align_sequences(ref: Sequence[str], hyp: Sequence[str]) -> list[tuple[int, int]]:
    """Substitution and match pairs (ref index, hyp index) of a least-edit alignment.

    Levenshtein alignment over a band around the proportional diagonal (hyp position ~ ref
    position scaled by the lengths), filled a row at a time with numpy: a within-row run of
    insertions is one cumulative minimum. A global alignment matters here: transcripts repeat
    phrases, and a greedy longest-match (difflib) can pair a phrase with a later repetition and
    lose everything in between. The band keeps time and memory linear in the transcript length.
    """
    n, m = len(ref), len(hyp)
    if n == 0 or m == 0:
        return []
    vocab: dict[str, int] = {}
    r = np.array([vocab.setdefault(w, len(vocab)) for w in ref], dtype=np.int64)
    h = np.array([vocab.setdefault(w, len(vocab)) for w in hyp], dtype=np.int64)
    band = max(MIN_BAND, int(BAND_FRACTION * max(n, m)))
    band = max(8, min(band, MAX_BAND_CELLS // (2 * n + 2)))
    inf = np.int64(1 << 40)
    prev_lo = 0
    prev = np.arange(0, min(m, band) + 1, dtype=np.int64)  # row 0: only insertions
    traces: list[tuple[int, np.ndarray]] = []
    for i in range(1, n + 1):
        c = int(round(i * m / n))
        lo, hi = max(0, c - band), min(m, c + band)
        js = np.arange(lo, hi + 1)
        k = js - prev_lo
        ok = (k >= 0) & (k < len(prev))
        up = np.where(ok, prev[np.clip(k, 0, len(prev) - 1)], inf) + 1
        k1 = k - 1
        ok1 = (k1 >= 0) & (k1 < len(prev)) & (js >= 1)
        sub = (h[np.clip(js - 1, 0, m - 1)] != r[i - 1]).astype(np.int64)
        diag = np.where(ok1, prev[np.clip(k1, 0, len(prev) - 1)], inf) + sub
        row, choice = fill_row(diag, up, np.ones(len(js)))
        traces.append((lo, choice))
        prev, prev_lo = row.astype(np.int64), lo
    return [(i - 1, j - 1) for i, j, step in traceback(traces, n, m) if step == DIAGONAL]


def match_words(ref: Sequence[str], hyp: Sequence[str]) -> list[tuple[int, int]]:
    """Pairs (ref index, hyp index), increasing in both: the exact matches of a least-edit
    alignment, plus its substitutions whose spellings are close ("stella" / "steller")."""
    out = []
    for i, j in align_sequences(ref, hyp):
        a, b = ref[i], hyp[j]
        if a == b or (min(len(a), len(b)) >= MIN_SIMILAR_LEN
                      and difflib.SequenceMatcher(None, a, b).ratio() >= MIN_SIMILARITY):
            out.append((i, j))
    return out


def recover_utterance_times(source: Any, chat: Any, aligner: Any,
                            progress: Progress) -> dict[int, tuple[float, float]]:
    """Seconds (start, end) for every spoken utterance of an untimed transcript, by utterance index."""
    utts, ref = transcript_words(chat)
    if not utts:
        return {}
    window_s = min(float(getattr(aligner, "max_span_s", WINDOW_S) or WINDOW_S), WINDOW_S)
    hyp_words, read_end = stream_words(source, aligner, progress, window_s=window_s)
    duration = getattr(source, "duration_s", None) or read_end
    if read_end > 0:
        duration = min(duration, read_end)
    hyp = [(normalize(u), a, b) for w, s, e in hyp_words for u, a, b in split_timed(w, s, e)]
    hyp = [h for h in hyp if h[0]]
    pairs = match_words([r.text for r in ref], [h[0] for h in hyp])
    steps = getattr(aligner, "steps", None)
    quiet = None
    if getattr(steps, "gaps_by_sound", True) and len({ref[i].utt for i, _ in pairs}) < len(utts):
        quiet = recording_quiet(source, int(getattr(aligner, "sample_rate", 16000)), duration, window_s)
    spans = utterance_spans(utts, ref, hyp, pairs, duration, quiet)
    log.debug("recovered times: %d recognised words, %d matched, %d of %d utterances anchored",
              len(hyp), len(pairs), len({ref[i].utt for i, _ in pairs}), len(utts))
    if getattr(steps, "refine_recovered", True):
        spans = refine_spans(source, utts, spans, aligner, duration, window_s, quiet)
    progress(1.0)
    return {u.index: span for u, span in zip(utts, spans)}


def refine_spans(source: Any, utts: Sequence[Any], spans: list[tuple[float, float]], aligner: Any,
                 duration: float, window_s: float = WINDOW_S,
                 quiet: np.ndarray | None = None) -> list[tuple[float, float]]:
    """The rough spans, each replaced by where forced alignment of the transcript's own words puts it.

    Recognition can miss most words of hard speech (children, overlap, a language the model knows
    little), and then the spans only interpolate. The words are known, though: consecutive
    utterances whose rough spans fit one window (with ``REFINE_PAD_S`` either side) are forced
    together as one text over that audio, and each utterance takes the times of its first and last
    word. An utterance whose words come out squeezed (see ``worker.engines.plausibility``), or a
    chunk the aligner cannot place, keeps its rough span.
    """
    from worker.align import UttRequest  # noqa: PLC0415 - worker.align imports this module lazily
    from worker.engines.plausibility import SILENCE_DBFS, speech_level_dbfs, squeezed  # noqa: PLC0415

    rate = int(getattr(aligner, "sample_rate", 16000))
    words = [[t for t in (spoken_text(w) for w in u.words) if t] for u in utts]
    out = list(spans)
    forced = [False] * len(spans)
    wide = [False] * len(spans)  # forced, in audio with pauses to find: grown to mid-pause
    steps = getattr(aligner, "steps", None)
    share = getattr(steps, "share_pauses", False)
    n, i = len(utts), 0
    while i < n:
        lo = max(0.0, spans[i][0] - REFINE_PAD_S)
        j, count = i, 0
        while (j < n and min(duration, spans[j][1] + REFINE_PAD_S) - lo <= window_s
               and count + len(words[j]) <= REFINE_MAX_WORDS):
            count += len(words[j])
            j += 1
        if j == i:  # one utterance longer than a window: the driver aligns it in pieces
            i += 1
            continue
        hi = min(duration, spans[j - 1][1] + REFINE_PAD_S)
        flat = [w for k in range(i, j) for w in words[k]]
        audio = source.read(lo, hi, rate=rate) if flat and hi > lo else np.zeros(0, dtype=np.float32)
        if len(audio) and speech_level_dbfs(audio, rate) >= SILENCE_DBFS:
            try:
                (res,) = aligner.align_span(audio, lo, [UttRequest(-1, lo, hi, flat)])
            except Exception as exc:  # noqa: BLE001 - refining is a bonus; the rough spans stand
                from worker.align import is_out_of_memory  # noqa: PLC0415 - align imports this module

                if is_out_of_memory(exc):  # out of memory is the file's failure, never a quiet skip
                    raise
                log.debug("refining %.2f-%.2f s failed: %s", lo, hi, exc)
                res = None
            if res is not None and res.words is not None and len(res.words) == len(flat):
                paused = share and has_pauses(audio, rate)
                pos = 0
                for k in range(i, j):
                    got = [(t, w) for t, w in zip(res.words[pos:pos + len(words[k])], words[k]) if t is not None]
                    pos += len(words[k])
                    if got and not squeezed([t for t, _ in got], [w for _, w in got]):
                        out[k] = (got[0][0][0], got[-1][0][1])
                        forced[k] = True
                        wide[k] = paused
        i = j
    if getattr(steps, "place_in_gaps", True):
        if quiet is None and getattr(steps, "gaps_by_sound", True) and not all(forced):
            quiet = recording_quiet(source, rate, duration, window_s)
        out = place_in_gaps(out, forced, [sum(len(w) for w in ws) for ws in words], duration, quiet)
    # rough spans are padded already; forced ones get EDGE_PAD_S, or the pauses around them
    out = [(s - EDGE_PAD_S, e + EDGE_PAD_S) if forced[k] and not wide[k] else (s, e) for k, (s, e) in enumerate(out)]
    out = _tidy(out, duration, pad_s=0.0)
    return share_pauses(out, duration, grow=wide) if any(wide) else out


def recording_quiet(source: Any, rate: int, duration: float, window_s: float = WINDOW_S) -> np.ndarray:
    """Quiet 20 ms frames of the whole recording (``plausibility.quiet_frames`` over its frame
    levels), read a window at a time: the floor and the loud frames are the recording's, so a
    stretch of all speech is not read against a floor of its own."""
    step = max(0.02, round(float(window_s) / 0.02) * 0.02)
    levels, t = [], 0.0
    while t < duration:
        audio = source.read(t, min(duration, t + step), rate=rate)
        if len(audio) == 0:
            break
        levels.append(frame_levels(audio, rate))
        t += step
    return quiet_frames(np.concatenate(levels)) if levels else np.zeros(0, dtype=bool)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[a, b) of every run of True in ``mask``."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(np.int8), [0]))))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def share_by_sound(quiet: np.ndarray, lo: float, hi: float, chars: Sequence[int],
                   frame_s: float = 0.02, pause_s: float = PAUSE_S,
                   pad_s: float = EDGE_PAD_S) -> list[tuple[float, float]] | None:
    """The gap [lo, hi] shared among utterances by where its sound is, or None when it has none to go by.

    ``quiet`` marks the recording's quiet frames (all False: no pause stands out, nothing to go
    by). An utterance is said in sound, so the run is laid over the gap's voiced frames only: the
    gap is trimmed to its first and last voiced frame, the voiced time is shared by characters
    (the speaking rate applies to speech, not to the pauses between it), and each cut between two
    utterances moves onto the pause (a quiet run of ``pause_s`` or more) whose voiced time lies
    nearest the cut's, when nearer than half the shorter neighbour's expected voiced time (a pause
    further away more likely lies inside one of them). Each utterance then spans
    its piece's voiced frames, with ``pad_s`` of room where its piece has it."""
    m = len(chars)
    a, b = max(0, int(np.ceil(lo / frame_s - 1e-6))), min(len(quiet), int(hi / frame_s + 1e-6))
    if m == 0 or b <= a or not quiet.any():
        return None
    voiced = ~quiet[a:b]
    if not voiced.any():
        return None
    idx = np.flatnonzero(voiced)
    first, last = int(idx[0]), int(idx[-1]) + 1  # relative to a
    cum = np.concatenate(([0], np.cumsum(voiced)))  # voiced frames before each frame
    total = int(cum[last])
    weights = [max(1, int(c)) for c in chars]
    expect = [total * w / sum(weights) for w in weights]
    targets = np.cumsum(expect)[:-1]
    min_run = max(1, int(round(pause_s / frame_s)))
    pauses = [(ra, rb) for ra, rb in _runs(~voiced) if rb - ra >= min_run and first < ra and rb < last]
    # Each cut goes to the pause nearest its target in voiced time when nearer than half the
    # shorter neighbour's expected voiced time. The reaches of two cuts cannot overlap (the
    # targets lie a whole utterance apart), so the cuts stay in order.
    at = np.array([float(cum[ra]) for ra, _ in pauses])
    cuts: list[tuple[int, int]] = []  # (frame where the earlier utterance ends, where the later starts)
    for k, target in enumerate(targets):
        reach = min(expect[k], expect[k + 1]) / 2
        i = int(np.searchsorted(at, target))
        near = min((j for j in (i - 1, i) if 0 <= j < len(at)), key=lambda j: abs(at[j] - target), default=-1)
        if near >= 0 and abs(at[near] - target) < reach:
            cuts.append(pauses[near])
        else:
            free = int(np.searchsorted(cum[1:], target, side="left"))
            cuts.append((free, free))
    bounds = [(first, first)] + cuts + [(last, last)]
    out = []
    for k in range(m):
        s, e = bounds[k][1], bounds[k + 1][0]  # the piece between two cuts
        lo_room = (a + (bounds[k][0] + bounds[k][1]) / 2) * frame_s if k else lo
        hi_room = (a + (bounds[k + 1][0] + bounds[k + 1][1]) / 2) * frame_s if k + 1 < m else hi
        inside = np.flatnonzero(voiced[s:e])
        if len(inside):
            s, e = s + int(inside[0]), s + int(inside[-1]) + 1
        start = max(lo_room, (a + s) * frame_s - pad_s)
        out.append((round(start, 3), round(max(start, min(hi_room, (a + max(e, s + 1)) * frame_s + pad_s)), 3)))
    return out


def place_in_gaps(spans: list[tuple[float, float]], placed: Sequence[bool], chars: Sequence[int],
                  duration: float, quiet: np.ndarray | None = None) -> list[tuple[float, float]]:
    """Utterances the forcing did not place, moved into the gap between the neighbours it did.

    An unplaced utterance keeps a rough span that may contradict its placed neighbours (a rough
    span lying before its refined predecessor collapses to nothing when the spans are put in
    order). A run of them whose rough spans do not fit, in order, inside the gap between the placed
    utterances around it is given that gap instead, shared by characters (by its sound, with the
    recording's ``quiet`` frames: :func:`share_by_sound`), and the driver then
    forces each utterance inside its share. Runs that fit keep their spans (they may hold
    recognised anchors); with nothing placed nothing moves."""
    out = list(spans)
    n = len(out)
    if not any(placed):
        return out
    k = 0
    while k < n:
        if placed[k]:
            k += 1
            continue
        j = k
        while j < n and not placed[j]:
            j += 1
        lo = out[k - 1][1] if k > 0 else 0.0
        hi = out[j][0] if j < n else duration
        run = out[k:j]
        fits = all(lo - 1e-6 <= s <= e <= hi + 1e-6 for s, e in run) and all(
            a[1] <= b[0] + 1e-6 for a, b in zip(run, run[1:]))
        by_sound = share_by_sound(quiet, lo, hi, chars[k:j]) if quiet is not None and not fits and hi > lo else None
        if by_sound is not None:
            out[k:j] = by_sound
        elif not fits and hi > lo:
            total = sum(max(1, c) for c in chars[k:j])
            t = lo
            for m in range(k, j):
                d = (hi - lo) * max(1, chars[m]) / total
                out[m] = (t, t + d)
                t += d
        k = j
    return out


def share_pauses(spans: list[tuple[float, float]], duration: float, most_s: float = REFINE_PAD_S,
                 grow: Sequence[bool] | None = None) -> list[tuple[float, float]]:
    """Each span (of those ``grow`` marks; all by default) grown into the pauses around it, up to
    the middle of the pause to its neighbour, at most ``most_s`` (the recording's edges stand in
    for a missing neighbour).

    Forced word times are tight, and the words are aligned once more, each utterance alone inside
    its span: that alignment finds the utterance's edges from the pauses around it (the first word
    starts after a pause under its start, the last ends where the sound stops), so its window
    must hold those pauses, not a fixed sliver of them. Up to the middle, no pause is given to two
    utterances."""
    out = []
    for k, (s, e) in enumerate(spans):
        if grow is not None and not grow[k]:
            out.append((s, e))
            continue
        lo = (spans[k - 1][1] + s) / 2 if k > 0 else 0.0
        hi = (e + spans[k + 1][0]) / 2 if k + 1 < len(spans) else duration
        out.append((round(max(lo, s - most_s, 0.0), 3), round(min(hi, e + most_s, duration), 3)))
    return out


def utterance_spans(utts: Sequence[Any], ref: Sequence[_RefWord],
                    hyp: Sequence[tuple[str, float, float]], pairs: Sequence[tuple[int, int]],
                    duration: float, quiet: np.ndarray | None = None) -> list[tuple[float, float]]:
    """One (start, end) per utterance from the matched words; the rest interpolated (by sound
    where ``quiet`` frames of the recording are given)."""
    n = len(utts)
    # characters per utterance, and those before each reference word within its utterance
    seen = [0] * n
    offset: list[int] = []
    for r in ref:
        offset.append(seen[r.utt])
        seen[r.utt] += len(r.text)
    chars = [max(1, c) for c in seen]
    first: dict[int, tuple[int, float, float]] = {}
    last: dict[int, tuple[int, float, float]] = {}
    for i, j in pairs:
        k = ref[i].utt
        _, s, e = hyp[j]
        if k not in first:
            first[k] = (i, s, e)
        last[k] = (i, s, e)
    rate = _speaking_rate(ref, hyp, pairs)
    anchored: dict[int, tuple[float, float]] = {}
    for k in first:
        i0, s0, _ = first[k]
        i1, _, e1 = last[k]
        before = offset[i0]
        after = chars[k] - offset[i1] - len(ref[i1].text)
        anchored[k] = (s0 - before * rate, max(e1 + after * rate, s0))
    spans: list[tuple[float, float] | None] = [anchored.get(k) for k in range(n)]
    _interpolate(spans, chars, duration, quiet)
    return _tidy([s for s in spans if s is not None], duration)


def _speaking_rate(ref: Sequence[_RefWord], hyp: Sequence[tuple[str, float, float]],
                   pairs: Sequence[tuple[int, int]]) -> float:
    """Seconds per character of the matched words, within sane bounds."""
    secs = sum(hyp[j][2] - hyp[j][1] for _, j in pairs)
    chars = sum(len(ref[i].text) for i, _ in pairs)
    rate = secs / chars if chars else 0.08
    return min(max(rate, SEC_PER_CHAR[0]), SEC_PER_CHAR[1])


def _interpolate(spans: list[tuple[float, float] | None], chars: Sequence[int], duration: float,
                 quiet: np.ndarray | None = None) -> None:
    """Fill runs of unanchored utterances by sharing the gap around them by character count, or by
    where its sound is (:func:`share_by_sound`) when the recording's ``quiet`` frames are given."""
    n = len(spans)
    k = 0
    while k < n:
        if spans[k] is not None:
            k += 1
            continue
        j = k
        while j < n and spans[j] is None:
            j += 1
        lo = spans[k - 1][1] if k > 0 else 0.0
        hi = spans[j][0] if j < n else duration
        if hi < lo:
            hi = lo
        # unpadded: the rough spans are padded when they are tidied
        by_sound = share_by_sound(quiet, lo, hi, chars[k:j], pad_s=0.0) if quiet is not None and hi > lo else None
        if by_sound is not None:
            spans[k:j] = by_sound
            k = j
            continue
        total = sum(chars[k:j])
        t = lo
        for m in range(k, j):
            d = (hi - lo) * chars[m] / total if total else 0.0
            spans[m] = (t, t + d)
            t += d
        k = j


def _tidy(spans: list[tuple[float, float]], duration: float,
          pad_s: float = EDGE_PAD_S) -> list[tuple[float, float]]:
    """In order, non-overlapping, inside [0, duration], with a little room at each edge.

    Where two spans overlap they are cut at the middle of the overlap; padding only grows a span
    into free time, never into a neighbour.
    """
    out = [(max(0.0, min(s, duration)), max(0.0, min(e, duration))) for s, e in spans]
    out = [(s, max(s, e)) for s, e in out]
    # Keep starts monotonic (an anchor placed before its predecessor is pulled forward).
    for k in range(1, len(out)):
        s, e = out[k]
        ps, pe = out[k - 1]
        if s < ps:
            s = ps
            e = max(e, s)
        if s < pe:  # overlap: cut in the middle of it
            cut = (s + min(pe, e)) / 2
            out[k - 1] = (ps, max(ps, cut))
            s = cut
            e = max(e, s)
        out[k] = (s, e)
    padded = []
    for k, (s, e) in enumerate(out):
        lo = out[k - 1][1] if k > 0 else 0.0
        hi = out[k + 1][0] if k + 1 < len(out) else duration
        padded.append((round(max(lo, s - pad_s), 3), round(min(hi, e + pad_s), 3)))
    # Padding reads the unpadded neighbours: make sure the padded spans still do not overlap.
    for k in range(1, len(padded)):
        if padded[k][0] < padded[k - 1][1]:
            mid = round((padded[k][0] + padded[k - 1][1]) / 2, 3)
            padded[k - 1] = (padded[k - 1][0], max(padded[k - 1][0], mid))
            padded[k] = (mid, max(mid, padded[k][1]))
    return padded
