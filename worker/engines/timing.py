"""Utterance times for transcripts without bullets: recognise the recording, then match the words.

The recording is streamed in overlapping windows (never loaded whole), each window is transcribed
with word times by the engine's own model, and the recognised words are matched to the transcript's
words by sequence alignment. An utterance takes its span from its first and last matched words
(stretched by the speaking rate over unmatched words at its edges); utterances with no matched word
share the gap between their neighbours in proportion to their length in characters. Spans come out
in transcript order, non-overlapping and inside the recording, ready to be refined by forced
alignment.
"""

from __future__ import annotations

import difflib
import logging
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from worker.chat import spoken_text

log = logging.getLogger(__name__)

WINDOW_S = 30.0
OVERLAP_S = 2.0  # words cut by a window edge are recognised whole in the neighbouring window
EDGE_PAD_S = 0.15  # recognised word times are tight; forced alignment wants a little room
MIN_SIMILARITY = 0.6  # a mismatched pair ("stella"/"steller") still anchors above this
SEC_PER_CHAR = (0.03, 0.15)  # bounds on the speaking rate used to stretch over unmatched words

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


def transcript_words(chat: Any) -> tuple[list[Any], list[_RefWord]]:
    """Spoken utterances and their normalised words, in transcript order."""
    utts = [u for u in chat.utterances if u.words]
    ref: list[_RefWord] = []
    for k, u in enumerate(utts):
        for w in u.words:
            for piece in spoken_text(w).split():
                norm = normalize(piece)
                if norm:
                    ref.append(_RefWord(k, norm))
    return utts, ref


def stream_words(source: Any, aligner: Any, progress: Progress, *, window_s: float = WINDOW_S,
                 overlap_s: float = OVERLAP_S) -> tuple[list[tuple[str, float, float]], float]:
    """Recognised (word, start, end) over the whole recording, and the seconds of audio read.

    Windows of ``window_s`` overlap by ``overlap_s``; each keeps the words whose midpoint falls in
    its own core (half the overlap away from a shared edge), so a word is kept exactly once.
    """
    window_s = max(float(window_s), 2.0 * overlap_s + 1.0)
    step = window_s - overlap_s
    rate = int(getattr(aligner, "sample_rate", 16000))
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
        lo = t + overlap_s / 2 if t > 0 else float("-inf")
        hi = float("inf") if last else t + step + overlap_s / 2
        for word, s, e in aligner.transcribe_words(audio, t):
            mid = (s + e) / 2
            if lo <= mid < hi:
                words.append((word, float(s), float(e)))
        if duration:
            progress(min(1.0, got_end / duration))
        if last:
            break
        t += step
    words.sort(key=lambda w: (w[1], w[2]))
    return words, read_end


def match_words(ref: Sequence[str], hyp: Sequence[str]) -> list[tuple[int, int]]:
    """Pairs (ref index, hyp index), increasing in both: exact matches of a sequence alignment,
    plus position-wise pairs inside equal-length substitutions whose spelling is close."""
    sm = difflib.SequenceMatcher(None, list(ref), list(hyp), autojunk=False)
    pairs: list[tuple[int, int]] = []
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        if tag == "equal":
            pairs += [(i1 + k, j1 + k) for k in range(i2 - i1)]
        elif tag == "replace" and i2 - i1 == j2 - j1:
            for k in range(i2 - i1):
                if difflib.SequenceMatcher(None, ref[i1 + k], hyp[j1 + k]).ratio() >= MIN_SIMILARITY:
                    pairs.append((i1 + k, j1 + k))
    return pairs


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
    hyp = [(normalize(w), s, e) for w, s, e in hyp_words]
    hyp = [h for h in hyp if h[0]]
    pairs = match_words([r.text for r in ref], [h[0] for h in hyp])
    spans = utterance_spans(utts, ref, hyp, pairs, duration)
    log.debug("recovered times: %d recognised words, %d matched, %d of %d utterances anchored",
              len(hyp), len(pairs), len({ref[i].utt for i, _ in pairs}), len(utts))
    progress(1.0)
    return {u.index: span for u, span in zip(utts, spans)}


def utterance_spans(utts: Sequence[Any], ref: Sequence[_RefWord],
                    hyp: Sequence[tuple[str, float, float]], pairs: Sequence[tuple[int, int]],
                    duration: float) -> list[tuple[float, float]]:
    """One (start, end) per utterance from the matched words; the rest interpolated."""
    n = len(utts)
    chars = [max(1, sum(len(r.text) for r in ref if r.utt == k)) for k in range(n)]
    # chars of each reference word before/after it within its utterance
    first: dict[int, tuple[int, float, float]] = {}
    last: dict[int, tuple[int, float, float]] = {}
    offset: list[int] = []
    seen: dict[int, int] = {}
    for r in ref:
        offset.append(seen.get(r.utt, 0))
        seen[r.utt] = seen.get(r.utt, 0) + len(r.text)
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
    _interpolate(spans, chars, duration)
    return _tidy([s for s in spans if s is not None], duration)


def _speaking_rate(ref: Sequence[_RefWord], hyp: Sequence[tuple[str, float, float]],
                   pairs: Sequence[tuple[int, int]]) -> float:
    """Seconds per character of the matched words, within sane bounds."""
    secs = sum(hyp[j][2] - hyp[j][1] for _, j in pairs)
    chars = sum(len(ref[i].text) for i, _ in pairs)
    rate = secs / chars if chars else 0.08
    return min(max(rate, SEC_PER_CHAR[0]), SEC_PER_CHAR[1])


def _interpolate(spans: list[tuple[float, float] | None], chars: Sequence[int], duration: float) -> None:
    """Fill runs of unanchored utterances by sharing the gap around them by character count."""
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
        total = sum(chars[k:j])
        t = lo
        for m in range(k, j):
            d = (hi - lo) * chars[m] / total if total else 0.0
            spans[m] = (t, t + d)
            t += d
        k = j


def _tidy(spans: list[tuple[float, float]], duration: float) -> list[tuple[float, float]]:
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
        padded.append((round(max(lo, s - EDGE_PAD_S), 3), round(min(hi, e + EDGE_PAD_S), 3)))
    # Padding reads the unpadded neighbours: make sure the padded spans still do not overlap.
    for k in range(1, len(padded)):
        if padded[k][0] < padded[k - 1][1]:
            mid = round((padded[k][0] + padded[k - 1][1]) / 2, 3)
            padded[k - 1] = (padded[k - 1][0], max(padded[k - 1][0], mid))
            padded[k] = (mid, max(mid, padded[k][1]))
    return padded
