"""Utterance-time recovery with a fake recogniser: matching, interpolation, windowing (no model)."""

from __future__ import annotations

import numpy as np
import pytest

from worker.align import SpanAligner
from worker.chat import parse_chat
from worker.engines.timing import (
    EDGE_PAD_S,
    match_words,
    normalize,
    recover_utterance_times,
    stream_words,
)

pytestmark = pytest.mark.timeout(60)

HEADER = "@UTF8\n@Begin\n@Languages:\teng\n@Participants:\tPAR Participant\n@ID:\teng|t|PAR|||||Participant|||\n@Media:\trec, audio\n"


def chat_of(*utterances: str):
    body = "".join(f"*PAR:\t{u} .\n" for u in utterances)
    return parse_chat(HEADER + body + "@End\n")


class FakeSource:
    """A recording of ``duration`` seconds of silence that records every span read from it."""

    def __init__(self, duration: float, known: bool = True) -> None:
        self._duration = duration
        self.duration_s = duration if known else None
        self.reads: list[tuple[float, float]] = []

    def read(self, start_s: float, end_s: float, rate: int = 16000) -> np.ndarray:
        end = min(end_s, self._duration)
        self.reads.append((start_s, end_s))
        n = max(0, int(round((end - start_s) * rate)))
        return np.zeros(n, dtype=np.float32)


class FakeRecognizer(SpanAligner):
    """Hears a fixed timeline: returns the words whose times overlap the window it is given,
    clipped to the window as a real recogniser clips a word cut by the window edge."""

    name = "fake"
    model = "timeline"

    def __init__(self, timeline: list[tuple[str, float, float]]) -> None:
        self.timeline = timeline
        self.windows: list[tuple[float, float]] = []

    def align_span(self, audio, span_start_s, utts):
        raise AssertionError("recovery must not force-align")

    def transcribe_words(self, audio, offset_s):
        end = offset_s + len(audio) / self.sample_rate
        self.windows.append((offset_s, end))
        return [(w, max(s, offset_s), min(e, end)) for w, s, e in self.timeline if e > offset_s and s < end]


def timeline_for(utterances: list[tuple[float, str]], word_s: float = 0.4, gap_s: float = 0.1):
    """Word times for utterances starting at the given seconds, one word every word_s + gap_s."""
    out = []
    for start, text in utterances:
        t = start
        for w in text.split():
            out.append((w, round(t, 3), round(t + word_s, 3)))
            t += word_s + gap_s
    return out


def truth_of(timeline, utterances):
    spans, k = [], 0
    for _, text in utterances:
        n = len(text.split())
        spans.append((timeline[k][1], timeline[k + n - 1][2]))
        k += n
    return spans


def check_ordered(spans: list[tuple[float, float]], duration: float) -> None:
    for s, e in spans:
        assert 0.0 <= s <= e <= duration
    for (_, e0), (s1, _) in zip(spans, spans[1:]):
        assert e0 <= s1 + 1e-9


def test_normalize_ignores_case_accents_and_punctuation():
    assert normalize("Stella,") == "stella"
    assert normalize("Café!") == "cafe"
    assert normalize("don't") == "dont"
    assert normalize("...") == ""


def test_match_words_pairs_exact_and_close_spellings_in_order():
    ref = ["please", "call", "stella", "ask", "her", "to", "bring"]
    hyp = ["uh", "please", "call", "steller", "ask", "for", "to", "bring"]
    pairs = match_words(ref, hyp)
    assert (2, 3) in pairs  # stella ~ steller
    assert (4, 5) not in pairs  # her / for are not alike
    assert [p for p in pairs if p[0] in (0, 1, 3, 5, 6)] == [(0, 1), (1, 2), (3, 4), (5, 6), (6, 7)]
    assert [i for i, _ in pairs] == sorted(i for i, _ in pairs)
    assert [j for _, j in pairs] == sorted(j for _, j in pairs)


def test_spans_follow_the_recognised_words_across_windows():
    utterances = [(1.0, "the quick brown fox"), (20.0, "jumps over the lazy dog"),
                  (28.5, "and then it ran away into the woods"), (61.0, "good night")]
    timeline = timeline_for(utterances)
    source = FakeSource(70.0)
    rec = FakeRecognizer(timeline)
    chat = chat_of(*(t for _, t in utterances))
    got = recover_utterance_times(source, chat, rec, lambda f: None)
    spans = [got[u.index] for u in chat.utterances]
    check_ordered(spans, 70.0)
    for (s, e), (ts, te) in zip(spans, truth_of(timeline, utterances)):
        assert ts - EDGE_PAD_S - 0.01 <= s <= ts + 1e-6
        assert te - 1e-6 <= e <= te + EDGE_PAD_S + 0.01


def test_windows_are_bounded_overlapping_and_keep_each_word_once():
    utterances = [(t, "one two three four five six") for t in (0.5, 9.0, 27.3, 44.5, 55.7, 80.0)]
    timeline = timeline_for(utterances)
    source = FakeSource(90.0)
    rec = FakeRecognizer(timeline)
    progress: list[float] = []
    words, read_end = stream_words(source, rec, progress.append, window_s=30.0, overlap_s=2.0)
    assert read_end == pytest.approx(90.0)
    assert all(e - s <= 30.0 + 1e-9 for s, e in source.reads)  # never the whole recording
    starts = [s for s, _ in rec.windows]
    assert starts == [0.0, 28.0, 56.0, 84.0]
    # every word exactly once, with its full (unclipped) time from the window that saw it whole
    assert words == timeline
    cut = [w for w in timeline if w[1] < 28.0 < w[2] or w[1] < 56.0 < w[2]]
    assert len(cut) == 2, "the timeline should have words across window starts"
    assert progress == sorted(progress) and progress[-1] == pytest.approx(1.0)


def test_unmatched_utterances_share_the_gap_by_characters():
    utterances = [(2.0, "hello there"), (10.0, "aaaa"), (14.0, "bbbbbbbbbbbb"), (30.0, "good bye now")]
    timeline = timeline_for(utterances)
    heard = [w for w in timeline if w[0] not in ("aaaa", "bbbbbbbbbbbb")]
    source = FakeSource(40.0)
    chat = chat_of(*(t for _, t in utterances))
    got = recover_utterance_times(source, chat, FakeRecognizer(heard), lambda f: None)
    spans = [got[u.index] for u in chat.utterances]
    check_ordered(spans, 40.0)
    gap_lo, gap_hi = spans[0][1], spans[3][0]
    (s1, e1), (s2, e2) = spans[1], spans[2]
    assert s1 == pytest.approx(gap_lo, abs=1e-3) and e2 == pytest.approx(gap_hi, abs=1e-3)
    # 4 characters against 12: a quarter of the gap, then three quarters
    assert (e1 - s1) / (e2 - s2) == pytest.approx(4 / 12, rel=0.05)


def test_nothing_recognised_spreads_everything_over_the_recording():
    chat = chat_of("aa", "bbbb", "cc")
    source = FakeSource(16.0)
    got = recover_utterance_times(source, chat, FakeRecognizer([]), lambda f: None)
    spans = [got[u.index] for u in chat.utterances]
    check_ordered(spans, 16.0)
    assert spans[0][0] == 0.0 and spans[-1][1] == pytest.approx(16.0)
    assert spans[1][1] - spans[1][0] == pytest.approx(8.0, abs=0.01)


def test_unknown_duration_streams_until_the_audio_ends():
    utterances = [(3.0, "first words here"), (40.0, "last words there")]
    timeline = timeline_for(utterances)
    source = FakeSource(45.0, known=False)
    rec = FakeRecognizer(timeline)
    chat = chat_of(*(t for _, t in utterances))
    got = recover_utterance_times(source, chat, rec, lambda f: None)
    spans = [got[u.index] for u in chat.utterances]
    check_ordered(spans, 45.0)
    assert spans[1][0] == pytest.approx(40.0 - EDGE_PAD_S, abs=0.02)
    assert rec.windows[-1][1] == pytest.approx(45.0)


def test_misrecognitions_and_extra_words_do_not_derail_the_matching():
    utterances = [(1.0, "please call Stella"), (6.0, "ask her to bring these things"), (15.0, "from the store")]
    timeline = timeline_for(utterances)
    noisy = []
    for w, s, e in timeline:
        if w == "Stella":
            w = "Steller,"
        if w == "her":
            w = "for"
        noisy.append((w, s, e))
    noisy.insert(0, ("you", 0.0, 0.3))  # a hallucinated word in the lead-in silence
    noisy.append(("thanks", 19.5, 19.8))
    source = FakeSource(20.0)
    chat = chat_of(*(t for _, t in utterances))
    got = recover_utterance_times(source, chat, FakeRecognizer(noisy), lambda f: None)
    spans = [got[u.index] for u in chat.utterances]
    check_ordered(spans, 20.0)
    for (s, e), (ts, te) in zip(spans, truth_of(timeline, utterances)):
        assert abs(s - ts) <= 0.2 and abs(e - te) <= 0.2


def test_overlapping_anchors_are_made_monotonic():
    # The recogniser hears the second utterance's first word before the first one ends
    # (overlapping speech); spans must still come out ordered and disjoint.
    timeline = [("alpha", 1.0, 1.5), ("beta", 1.6, 3.0), ("gamma", 2.0, 2.4), ("delta", 3.1, 3.6)]
    chat = chat_of("alpha beta", "gamma delta")
    got = recover_utterance_times(FakeSource(5.0), chat, FakeRecognizer(timeline), lambda f: None)
    spans = [got[u.index] for u in chat.utterances]
    check_ordered(spans, 5.0)
    assert spans[0][0] <= 1.0 and spans[1][1] >= 3.6


def test_only_spoken_utterances_get_times():
    chat = parse_chat(HEADER + "*PAR:\thello there .\n*PAR:\t&=laughs .\n*PAR:\tbye .\n@End\n")
    timeline = [("hello", 1.0, 1.3), ("there", 1.4, 1.8), ("bye", 5.0, 5.4)]
    got = recover_utterance_times(FakeSource(8.0), chat, FakeRecognizer(timeline), lambda f: None)
    spoken = [u.index for u in chat.utterances if u.words]
    assert sorted(got) == spoken and len(spoken) == 2
