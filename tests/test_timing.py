"""Utterance-time recovery with a fake recogniser: matching, interpolation, windowing (no model)."""

from __future__ import annotations

import numpy as np
import pytest

from worker.align import SpanAligner, UttResult
from worker.chat import parse_chat
from worker.engines.timing import (
    EDGE_PAD_S,
    align_sequences,
    match_words,
    normalize,
    recover_utterance_times,
    stream_words,
)

pytestmark = pytest.mark.timeout(60)

HEADER = ("@UTF8\n@Begin\n@Languages:\teng\n@Participants:\tPAR Participant\n"
          "@ID:\teng|t|PAR|||||Participant|||\n@Media:\trec, audio\n")


def chat_of(*utterances: str):
    body = "".join(f"*PAR:\t{u} .\n" for u in utterances)
    return parse_chat(HEADER + body + "@End\n")


class FakeSource:
    """A recording of ``duration`` seconds, noise where the timeline has words and silence
    elsewhere, that records every span read from it."""

    def __init__(self, duration: float, known: bool = True, timeline=()) -> None:
        self._duration = duration
        self.duration_s = duration if known else None
        self.timeline = list(timeline)
        self.reads: list[tuple[float, float]] = []

    def read(self, start_s: float, end_s: float, rate: int = 16000) -> np.ndarray:
        end = min(end_s, self._duration)
        self.reads.append((start_s, end_s))
        n = max(0, int(round((end - start_s) * rate)))
        rng = np.random.default_rng(int(start_s * 1000))
        # without a timeline: quiet noise everywhere (silence would rightly be heard as no words)
        out = np.zeros(n, dtype=np.float32) if self.timeline else rng.normal(0, 0.01, n).astype(np.float32)
        for _, s, e in self.timeline:
            a, b = int(round((s - start_s) * rate)), int(round((e - start_s) * rate))
            a, b = max(a, 0), min(b, n)
            if b > a:
                out[a:b] = rng.normal(0, 0.1, b - a)
        return out


class FakeRecognizer(SpanAligner):
    """Hears a fixed timeline: returns the words whose times overlap the window it is given,
    clipped to the window as a real recogniser clips a word cut by the window edge."""

    name = "fake"
    model = "timeline"

    def __init__(self, timeline: list[tuple[str, float, float]]) -> None:
        self.timeline = timeline
        self.windows: list[tuple[float, float]] = []

    def align_span(self, audio, span_start_s, utts):
        self.forced = getattr(self, "forced", 0) + 1
        return [UttResult(u.index, None, error="a recogniser only") for u in utts]  # rough spans stand

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


def levenshtein(a, b) -> int:
    d = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        prev, d[0] = d[0], i
        for j in range(1, len(b) + 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (a[i - 1] != b[j - 1]))
    return d[len(b)]


def test_sequence_alignment_is_a_least_edit_alignment():
    rng = np.random.default_rng(5)
    for _ in range(40):
        ref = list(rng.choice(list("abcde"), size=rng.integers(1, 30)))
        hyp = list(rng.choice(list("abcde"), size=rng.integers(1, 30)))
        pairs = align_sequences(ref, hyp)
        subs = sum(ref[i] != hyp[j] for i, j in pairs)
        cost = (len(ref) - len(pairs)) + (len(hyp) - len(pairs)) + subs
        assert cost == levenshtein(ref, hyp)
        assert all(b[0] > a[0] and b[1] > a[1] for a, b in zip(pairs, pairs[1:]))


def test_repeated_phrases_stay_with_their_own_utterances():
    # The same sentence twice, the first time misheard: a greedy longest match would pair the
    # first utterance with the second reading and lose everything in between.
    utterances = [(1.0, "the quick brown fox jumps over the lazy dog"), (8.0, "please call stella now"),
                  (14.0, "the quick brown fox jumps over the lazy dog"), (22.0, "good night")]
    timeline = timeline_for(utterances)
    heard = [("jump" if w == "jumps" and s < 5 else w, s, e) for w, s, e in timeline]
    chat = chat_of(*(t for _, t in utterances))
    got = recover_utterance_times(FakeSource(30.0), chat, FakeRecognizer(heard), lambda f: None)
    spans = [got[u.index] for u in chat.utterances]
    for (s, e), (ts, te) in zip(spans, truth_of(timeline, utterances)):
        assert abs(s - ts) <= 0.2 and abs(e - te) <= 0.2


def test_long_transcripts_align_in_bounded_memory():
    rng = np.random.default_rng(2)
    words = [f"w{k}" for k in rng.integers(0, 300, size=12000)]
    hyp = [w for w in words if rng.random() > 0.1]  # a tenth of the words never recognised
    hyp[::50] = ["uh"] * len(hyp[::50])
    pairs = match_words(words, hyp)
    assert len(pairs) >= 0.85 * len(hyp)
    assert sum(words[i] == hyp[j] for i, j in pairs) >= 0.95 * len(pairs)


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


def test_windows_are_bounded_cut_in_pauses_and_keep_each_word_once():
    utterances = [(t, "one two three four five six") for t in (0.5, 9.0, 25.3, 44.5, 55.7, 80.0)]
    timeline = timeline_for(utterances)
    source = FakeSource(90.0, timeline=timeline)
    rec = FakeRecognizer(timeline)
    progress: list[float] = []
    words, read_end = stream_words(source, rec, progress.append, window_s=30.0)
    assert read_end == pytest.approx(90.0)
    assert all(e - s <= 30.0 + 1e-9 for s, e in source.reads)  # never the whole recording
    assert len(rec.windows) >= 3
    for (s0, e0), (s1, _) in zip(rec.windows, rec.windows[1:]):
        assert s1 == pytest.approx(e0)  # contiguous: each window starts at the previous cut
        assert 30.0 - 8.0 - 0.05 <= e0 - s0 <= 30.0
        assert not any(s < e0 < e for _, s, e in timeline), f"cut at {e0:.2f} s splits a word"
    # every word exactly once, with its full time
    assert words == timeline
    assert progress == sorted(progress) and progress[-1] == pytest.approx(1.0)


def test_continuous_speech_is_still_cut_and_every_word_kept_once():
    timeline = timeline_for([(0.0, " ".join(f"w{i}" for i in range(140)))], word_s=0.45, gap_s=0.0)
    source = FakeSource(70.0, timeline=timeline)
    rec = FakeRecognizer(timeline)
    words, _ = stream_words(source, rec, lambda f: None, window_s=30.0)
    assert all(e - s <= 30.0 + 1e-9 for s, e in source.reads)
    names = [w for w, _, _ in words]
    # a word the cut splits is heard in both windows (as two pieces); none is lost
    assert set(names) == {w for w, _, _ in timeline}
    assert len(names) <= len(timeline) + len(rec.windows) - 1


class SkippingRecognizer(FakeRecognizer):
    """Hears only the last three words of any window longer than 12 s (as Whisper can do when
    a window holds sparse speech)."""

    def transcribe_words(self, audio, offset_s):
        words = super().transcribe_words(audio, offset_s)
        return words[-3:] if len(audio) / self.sample_rate > 12.0 else words


def test_a_window_that_heard_too_little_is_retried_in_halves():
    utterances = [(t, "alpha beta gamma") for t in (1.0, 6.0, 11.0, 16.0, 21.0, 26.0)]
    timeline = timeline_for(utterances)
    source = FakeSource(29.0, timeline=timeline)
    rec = SkippingRecognizer(timeline)
    words, _ = stream_words(source, rec, lambda f: None, window_s=30.0)
    assert words == timeline
    assert max(e - s for s, e in rec.windows) > 12.0 and min(e - s for s, e in rec.windows) <= 12.0


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


class FakeForcer(FakeRecognizer):
    """Recognises nothing useful, but force-aligns: every word lands where the timeline has it."""

    def align_span(self, audio, span_start_s, utts):
        out = []
        for u in utts:
            times = [(s, e) for _, s, e in self.timeline]
            assert len(times) == len(u.words) and span_start_s <= times[0][0]
            out.append(UttResult(u.index, times))
        return out


def test_rough_spans_are_refined_by_forcing_the_transcripts_words():
    from worker.engines.timing import refine_spans, transcript_words

    utterances = [(1.0, "the quick brown fox"), (4.0, "please call stella now"), (9.0, "good night")]
    timeline = timeline_for(utterances)
    chat = chat_of(*(t for _, t in utterances))
    utts, _ = transcript_words(chat)
    rough = [(0.2, 2.0), (3.0, 6.5), (7.5, 9.4)]  # a second off, as interpolation leaves them
    got = refine_spans(FakeSource(12.0, timeline=timeline), utts, rough, FakeForcer(timeline), 12.0)
    for (s, e), (ts, te) in zip(got, truth_of(timeline, utterances)):
        assert abs(s - ts) <= 0.16 and abs(e - te) <= 0.16  # the tidy padding only
    # with share_pauses the forced spans reach into the pauses around them, up to the middle of each
    from worker.engines.timing import share_pauses

    forcer = FakeForcer(timeline)
    forcer.steps = type("S", (), {"share_pauses": True})()
    got = refine_spans(FakeSource(12.0, timeline=timeline), utts, rough, forcer, 12.0)
    assert got == share_pauses(truth_of(timeline, utterances), 12.0)
    # squeezed words are not believed: the rough span stays
    squeezed = [(w, 4.0 + 0.005 * k, 4.0 + 0.005 * (k + 1)) if 4 <= k < 8 else (w, s, e)
                for k, (w, s, e) in enumerate(timeline)]
    got = refine_spans(FakeSource(12.0, timeline=timeline), utts, rough, FakeForcer(squeezed), 12.0)
    assert abs(got[1][0] - 3.0) <= 0.16 and abs(got[1][1] - 6.5) <= 0.16


def test_words_of_scripts_without_spaces_are_matched_character_by_character():
    from worker.engines.timing import split_timed, units

    assert units("出去") == ["出", "去"]
    assert units("gam2") == ["gam2"]
    assert units("ok了吗") == ["ok", "了", "吗"]
    parts = split_timed("出去了", 1.0, 1.3)
    assert [p for p, _, _ in parts] == ["出", "去", "了"]
    assert parts[0][1] == 1.0 and abs(parts[-1][2] - 1.3) < 1e-9
    assert all(abs((e - s) - 0.1) < 1e-9 for _, s, e in parts)
    # a transcriber's word breaks and a recogniser's differ; per character they still match
    ref = [u for w in ["我哋", "出去", "玩"] for u in units(w)]
    hyp = [u for w in ["我", "哋出去玩"] for u in units(w)]
    assert match_words(ref, hyp) == [(i, i) for i in range(5)]


def test_recovered_spans_reach_into_the_pauses_up_to_the_middle():
    from worker.engines.timing import REFINE_PAD_S, share_pauses

    spans = [(1.0, 2.0), (2.4, 3.0), (8.0, 9.0)]
    got = share_pauses(spans, 9.5)
    assert got[0] == (0.0, 2.2)  # the recording's start stands in for a neighbour
    assert got[1] == (2.2, 3.0 + REFINE_PAD_S)  # at most REFINE_PAD_S into a long pause
    assert got[2] == (8.0 - REFINE_PAD_S, 9.5)
    check_ordered(got, 9.5)


def test_unplaced_utterances_are_moved_into_the_gap_between_placed_neighbours():
    from worker.engines.timing import place_in_gaps

    spans = [(1.0, 2.0), (0.2, 0.6), (0.6, 1.4), (5.0, 6.0)]  # a rough run lying before its neighbour
    got = place_in_gaps(spans, [True, False, False, True], [10, 4, 12, 10], 8.0)
    assert got[0] == (1.0, 2.0) and got[3] == (5.0, 6.0)
    assert got[1][0] == pytest.approx(2.0) and got[2][1] == pytest.approx(5.0)
    assert (got[1][1] - got[1][0]) / (got[2][1] - got[2][0]) == pytest.approx(4 / 12)
    # a run that fits its gap keeps its spans; nothing placed moves nothing
    fitting = [(1.0, 2.0), (2.5, 3.0), (5.0, 6.0)]
    assert place_in_gaps(fitting, [True, False, True], [1, 1, 1], 8.0) == fitting
    assert place_in_gaps(spans, [False] * 4, [1] * 4, 8.0) == spans


def _middle_unplaced(middle: str):
    """Three utterances whose middle one the forcing cannot place: its words come out squeezed
    and its rough span lies before the first one. (timeline, utts, rough spans, forcer)"""
    from worker.engines.timing import transcript_words

    utterances = [(1.0, "the quick brown fox"), (4.0, middle), (9.0, "good night")]
    timeline = timeline_for(utterances)
    utts, _ = transcript_words(chat_of(*(t for _, t in utterances)))
    n = len(middle.split())
    squeezed = [(w, 4.0 + 0.005 * k, 4.0 + 0.005 * (k + 1)) if 4 <= k < 4 + n else (w, s, e)
                for k, (w, s, e) in enumerate(timeline)]
    return utterances, timeline, utts, [(0.8, 3.0), (0.1, 0.7), (8.8, 9.8)], FakeForcer(squeezed)


def test_an_utterance_the_refining_cannot_place_gets_the_gap_not_an_empty_span():
    from worker.engines.timing import refine_spans

    _, timeline, utts, rough, forcer = _middle_unplaced("please call stella now")
    forcer.steps = type("S", (), {"gaps_by_sound": False})()  # the gap shared by characters
    got = refine_spans(FakeSource(12.0, timeline=timeline), utts, rough, forcer, 12.0)
    check_ordered(got, 12.0)
    first_end, last_start = timeline[3][2], timeline[8][1]
    assert got[1][0] <= first_end + EDGE_PAD_S and got[1][1] >= last_start - EDGE_PAD_S  # the whole gap
    forcer.steps = type("S", (), {"place_in_gaps": False, "share_pauses": False})()
    got = refine_spans(FakeSource(12.0, timeline=timeline), utts, rough, forcer, 12.0)
    assert got[1][1] - got[1][0] < 0.5  # the rough span, squashed against its neighbour


def test_recovered_spans_stay_tight_where_the_audio_has_no_pauses_to_find():
    from worker.engines.timing import has_pauses, refine_spans, transcript_words

    utterances = [(1.0, "the quick brown fox"), (4.0, "please call stella now"), (9.0, "good night")]
    timeline = timeline_for(utterances)
    chat = chat_of(*(t for _, t in utterances))
    utts, _ = transcript_words(chat)
    noisy = FakeSource(12.0)  # steady noise: no pause stands out of it
    assert not has_pauses(noisy.read(0.0, 12.0), 16000)
    assert has_pauses(FakeSource(12.0, timeline=timeline).read(0.0, 12.0), 16000)
    forcer = FakeForcer(timeline)
    forcer.steps = type("S", (), {"share_pauses": True})()
    got = refine_spans(noisy, utts, [(0.2, 2.0), (3.0, 6.5), (7.5, 9.4)], forcer, 12.0)
    for (s, e), (ts, te) in zip(got, truth_of(timeline, utterances)):
        assert s == pytest.approx(ts - EDGE_PAD_S, abs=1e-3) and e == pytest.approx(te + EDGE_PAD_S, abs=1e-3)


def _quiet(duration: float, sound: list[tuple[float, float]]) -> np.ndarray:
    """Quiet frames (20 ms) of a recording that sounds only in ``sound``."""
    quiet = np.ones(int(round(duration / 0.02)), dtype=bool)
    for s, e in sound:
        quiet[int(round(s / 0.02)):int(round(e / 0.02))] = False
    return quiet


def test_a_gap_is_shared_by_where_its_sound_is_not_by_characters():
    from worker.engines.timing import share_by_sound

    quiet = _quiet(10.0, [(1.0, 3.0), (3.5, 4.0), (6.0, 9.0)])
    # one utterance: the gap trimmed to its first and last voiced frame, with a little room
    ((s, e),) = share_by_sound(quiet, 0.0, 10.0, [10])
    assert s == pytest.approx(1.0 - EDGE_PAD_S) and e == pytest.approx(9.0 + EDGE_PAD_S)
    # three utterances whose characters match the three stretches: one each, in order, cut at the
    # pauses (by characters the cuts would fall at 3.6 and 4.5 s, inside the sound)
    got = share_by_sound(quiet, 0.0, 10.0, [20, 5, 30])
    for (gs, ge), (ts, te) in zip(got, [(1.0, 3.0), (3.5, 4.0), (6.0, 9.0)]):
        assert gs == pytest.approx(ts - EDGE_PAD_S) and ge == pytest.approx(te + EDGE_PAD_S)
    # a long first utterance takes both early stretches: the short pause lies inside it
    got = share_by_sound(quiet, 0.0, 10.0, [25, 30])
    assert got[0][1] == pytest.approx(4.0 + EDGE_PAD_S) and got[1][0] == pytest.approx(6.0 - EDGE_PAD_S)
    # the room never reaches past the middle of the pause between two utterances, nor the gap
    close = _quiet(4.0, [(0.5, 1.5), (1.6, 2.6)])
    got = share_by_sound(close, 0.2, 3.0, [10, 10])
    assert got[0][1] <= got[1][0] and got[0][1] == pytest.approx(1.54, abs=0.021)
    assert got[0][0] >= 0.2 and got[1][1] <= 3.0


def test_a_gap_without_sound_or_pauses_has_nothing_to_go_by():
    from worker.engines.timing import share_by_sound

    assert share_by_sound(np.zeros(500, dtype=bool), 0.0, 10.0, [10, 10]) is None  # no pause stands out
    assert share_by_sound(_quiet(10.0, [(6.0, 7.0)]), 1.0, 5.0, [10]) is None  # all quiet in the gap
    assert share_by_sound(_quiet(10.0, [(1.0, 2.0)]), 5.0, 5.0, [10]) is None  # an empty gap


def test_without_pauses_near_a_cut_the_voiced_time_is_shared_by_characters():
    from worker.engines.timing import share_by_sound

    quiet = _quiet(10.0, [(1.0, 9.0)])  # one stretch of sound: no pause to cut at
    got = share_by_sound(quiet, 0.0, 10.0, [10, 30])
    cut = 1.0 + 8.0 * 10 / 40
    assert got[0][1] == pytest.approx(cut, abs=0.021) and got[1][0] == pytest.approx(cut, abs=0.021)


def test_unplaced_utterances_go_to_the_sound_of_their_gap_when_given_the_quiet_frames():
    from worker.engines.timing import place_in_gaps

    spans = [(0.5, 1.0), (-1.0, -1.0), (-1.0, -1.0), (9.0, 9.5)]
    quiet = _quiet(10.0, [(0.5, 1.0), (2.0, 4.0), (6.5, 7.5), (9.0, 9.5)])
    got = place_in_gaps(spans, [True, False, False, True], [10, 20, 10, 10], 10.0, quiet)
    assert got[1] == pytest.approx((2.0 - EDGE_PAD_S, 4.0 + EDGE_PAD_S))
    assert got[2] == pytest.approx((6.5 - EDGE_PAD_S, 7.5 + EDGE_PAD_S))
    by_chars = place_in_gaps(spans, [True, False, False, True], [10, 20, 10, 10], 10.0)
    assert by_chars[1] == pytest.approx((1.0, 6.333), abs=1e-3)  # the gap cut by characters
    # a recording with no pause to find falls back to characters
    flat = place_in_gaps(spans, [True, False, False, True], [10, 20, 10, 10], 10.0, np.zeros(500, dtype=bool))
    assert flat == by_chars


def test_the_recordings_quiet_frames_are_read_a_window_at_a_time():
    from worker.engines.plausibility import frame_levels, quiet_frames
    from worker.engines.timing import recording_quiet

    timeline = timeline_for([(1.0, "the quick brown fox"), (7.0, "good night")])
    source = FakeSource(12.0, timeline=timeline)
    got = recording_quiet(source, 16000, 12.0, window_s=5.0)
    whole = quiet_frames(frame_levels(FakeSource(12.0, timeline=timeline).read(0.0, 12.0), 16000))
    assert len(got) == len(whole) == 600
    assert (got == whole).all() and got[:50].all() and not got[55:70].any()
    assert max(e - s for s, e in source.reads) <= 5.0 + 1e-9  # never the whole recording at once


def test_an_unplaced_utterance_is_forced_where_the_sound_of_its_gap_is():
    from worker.engines.timing import refine_spans

    utterances, timeline, utts, rough, forcer = _middle_unplaced("please call")
    forcer.steps = type("S", (), {"place_in_gaps": True, "gaps_by_sound": True})()
    got = refine_spans(FakeSource(12.0, timeline=timeline), utts, rough, forcer, 12.0)
    check_ordered(got, 12.0)
    (ts, te) = truth_of(timeline, utterances)[1]
    assert got[1][0] == pytest.approx(ts - EDGE_PAD_S, abs=0.03) and got[1][1] == pytest.approx(te + EDGE_PAD_S, abs=0.03)
    forcer.steps = type("S", (), {"place_in_gaps": True, "gaps_by_sound": False})()
    got = refine_spans(FakeSource(12.0, timeline=timeline), utts, rough, forcer, 12.0)
    assert got[1][1] - got[1][0] > 4.0  # by characters: the whole gap, pauses and all


def test_unanchored_utterances_are_interpolated_over_the_sound():
    from worker.engines.timing import recover_utterance_times

    utterances = [(1.0, "the quick brown fox"), (5.0, "please call"), (9.0, "good night")]
    timeline = timeline_for(utterances)
    chat = chat_of(*(t for _, t in utterances))
    heard = [w for w in timeline if w[0] not in ("please", "call")]  # the middle one is not recognised
    for by_sound in (True, False):
        rec = FakeRecognizer(heard)
        rec.steps = type("S", (), {"refine_recovered": False, "gaps_by_sound": by_sound})()
        got = recover_utterance_times(FakeSource(12.0, timeline=timeline), chat, rec, lambda f: None)
        s, e = got[chat.utterances[1].index]
        (ts, te) = truth_of(timeline, utterances)[1]
        if by_sound:
            assert abs(s - ts) <= 0.2 and abs(e - te) <= 0.2
        else:
            assert e - s > (te - ts) + 1.0  # the whole gap between the anchored neighbours


def test_a_long_gap_of_many_utterances_is_shared_in_order_and_in_linear_time():
    from worker.engines.timing import share_by_sound

    # two hours, a second of sound then a second of pause, 3000 utterances of varied length
    quiet = np.tile(np.r_[np.zeros(50, dtype=bool), np.ones(50, dtype=bool)], 3600)
    chars = [5 + (k * 7) % 40 for k in range(3000)]
    got = share_by_sound(quiet, 0.0, 7200.0, chars)
    assert len(got) == 3000
    check_ordered(got, 7200.0)
    assert got[0][0] == pytest.approx(0.0) and got[-1][1] == pytest.approx(7199.0 + EDGE_PAD_S)
    # most cuts lie in a pause (the utterance starts where a second of sound does, with its room)
    onsets = sum(round(s + EDGE_PAD_S, 2) % 2 == 0 for s, _ in got[1:])
    assert onsets > 0.5 * len(got)
