"""Is an utterance's alignment believable? Checks any engine's word times against the audio.

An aligner always returns *some* path: on a silent recording, a truncated span or a transcript that
does not match the audio, word times still come out, ordered and inside the bullet, and look real.
Three signs give such an alignment away, and an utterance showing one keeps its original bullet and
gets no ``%wor`` times (the driver reports it with a warning whose message starts with
``implausible:``):

- no speech energy in the utterance's span (digital silence, a span past a truncated file's end);
- every word at the minimum length the aligner can give (one frame each);
- words squeezed into a sliver of the bullet: a run of words shorter than any speaker could say them
  (``MIN_S_PER_CHAR`` a character, a Chinese character or kana counting as a syllable), which is how
  a DTW path that piles words into the last frames of a span shows.

The checks are pure functions of word times and samples, so the driver applies them to every engine.
"""

from __future__ import annotations

import unicodedata
from typing import Sequence

import numpy as np

IMPLAUSIBLE = "implausible:"  # the tag that starts every warning about such an utterance
SILENCE_DBFS = -55.0  # loudest frames of a span below this: nothing was said there
MIN_WORD_S = 0.021  # one 20 ms frame: the shortest word Whisper's and wav2vec2's frames give
MIN_S_PER_CHAR = 0.015  # a run of words faster than this is not speech (fast speech: ~0.06 s/char)
MIN_RUN_WEIGHT = 4  # runs lighter than this (a lone "a", "the") may really be that short
MAX_WORD_S = 0.5  # a word may last this long plus MAX_S_PER_CHAR a letter, however drawn out
MAX_S_PER_CHAR = 0.3  # (slow, careful speech: ~0.1 s a letter; a held vowel adds a few hundred ms)
SYLLABLE_WEIGHT = 3  # a CJK character, kana or hangul block is a syllable: about three letters

Times = Sequence[tuple[float, float]]


def written_without_spaces(ch: str) -> bool:
    """CJK ideographs, kana and hangul: scripts whose words are not separated by spaces."""
    if not ch:
        return False
    name = unicodedata.name(ch[0], "")
    return name.startswith(("CJK ", "HIRAGANA", "KATAKANA", "HANGUL", "IDEOGRAPHIC"))


def weight(word: str) -> int:
    """Roughly how long ``word`` takes to say, in letters (a syllabic character counts as three)."""
    return sum(SYLLABLE_WEIGHT if written_without_spaces(c) else 1 for c in word if c.isalnum()) or 1


MIN_RANGE_DB = 30.0  # loud-to-floor range below which no frame counts as a pause
QUIET_FRACTION = 0.2
QUIET_BELOW_LOUD_DB = 40.0


def frame_levels(audio: np.ndarray, rate: int) -> np.ndarray:
    """Energy in dB of each 20 ms frame of ``audio`` (Whisper's encoder frame grid at 16 kHz)."""
    frame = max(1, int(rate * 0.02))
    n = len(audio) // frame
    if n == 0:
        return np.zeros(0)
    x = np.asarray(audio[: n * frame], dtype=np.float64).reshape(n, frame)
    return 10.0 * np.log10(np.mean(x * x, axis=1) + 1e-10)


def quiet_frames(levels: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """Frames clearly below the audio's speech level, or none when it has no clear pauses.

    The threshold sits a fifth of the way from the noise floor to the loud frames, or
    ``QUIET_BELOW_LOUD_DB`` under the loud frames when that is higher (a digitally silent floor
    would otherwise leave low hiss counted as sound); nothing is called quiet when floor and loud
    frames are less than ``MIN_RANGE_DB`` apart (noisy, distant or pause-free audio). Whisper's
    pause snapping and timing recovery's speech and pause figures share this rule.

    ``reference``: the levels the floor and the loud frames are read from, when ``levels`` is a
    piece of longer audio (an utterance's bullet inside its span): a few seconds of nearly all
    speech has a floor of speech, so read alone it would show no pause at all.
    """
    if len(levels) < 2:
        return np.zeros(len(levels), dtype=bool)
    ref = levels if reference is None or len(reference) < 2 else reference
    floor, loud = np.percentile(ref, [5, 99])
    if loud - floor < MIN_RANGE_DB:
        return np.zeros(len(levels), dtype=bool)
    return levels < max(floor + QUIET_FRACTION * (loud - floor), loud - QUIET_BELOW_LOUD_DB)


def speech_level_dbfs(audio: np.ndarray, rate: int) -> float:
    """Level of the loudest 20 ms frames (95th percentile) of ``audio``, dB full scale."""
    levels = frame_levels(audio, rate)
    return float(np.percentile(levels, 95)) if len(levels) else -120.0


def squeezed(times: Times, words: Sequence[str] | None = None) -> bool:
    """Whether some run of consecutive words is too short for its letters (see the module doc);
    without ``words`` every word counts as three letters."""
    return squeezed_run(times, words) is not None


def squeezed_run(times: Times, words: Sequence[str] | None = None) -> tuple[int, int] | None:
    """The first run [i, j) of words said implausibly fast, or None."""
    n = len(times)
    w = [weight(x) for x in words] if words is not None else [3] * n
    if len(w) != n:
        raise ValueError(f"{n} times for {len(w)} words")
    cum = np.concatenate(([0], np.cumsum(w)))
    for i in range(n):
        for j in range(i + 1, n + 1):
            wt = cum[j] - cum[i]
            if wt < MIN_RUN_WEIGHT:
                continue
            if times[j - 1][1] - times[i][0] < MIN_S_PER_CHAR * wt:
                return i, j
    return None


def check(times: Sequence[tuple[float, float] | None], words: Sequence[str], start_s: float, end_s: float,
          audio: np.ndarray | None = None, rate: int = 16000) -> str | None:
    """Why the alignment of one utterance is not believable (one line), or None when it is.

    ``audio`` holds the samples of ``[start_s, end_s]`` when the caller has them."""
    placed = [t for t in times if t is not None]
    if not placed:
        return None
    if audio is not None:
        level = speech_level_dbfs(audio, rate)
        if len(audio) == 0 or level < SILENCE_DBFS:
            return (f"no speech energy in {start_s:.3f}-{end_s:.3f} s (loudest frames {level:.0f} dBFS); "
                    f"original bullet kept, words left untimed")
    if len(placed) >= 2 and all(e - s <= MIN_WORD_S for s, e in placed):
        return (f"every one of {len(placed)} words at the minimum length in {start_s:.3f}-{end_s:.3f} s; "
                f"original bullet kept, words left untimed")
    kept = [(t, w) for t, w in zip(times, words) if t is not None]
    run = squeezed_run([t for t, _ in kept], [w for _, w in kept])
    if run is not None:
        i, j = run
        (s, _), (_, e) = kept[i][0], kept[j - 1][0]
        said = " ".join(w for _, w in kept[i:j])
        return (f"words squeezed: '{said}' in {1000 * (e - s):.0f} ms of the {end_s - start_s:.3f} s bullet; "
                f"original bullet kept, words left untimed")
    return None


def longest_word_s(word: str) -> float:
    """The longest a word can physically last: a drawn-out word of its letters, with room to spare."""
    return MAX_WORD_S + MAX_S_PER_CHAR * weight(word)


def stretched(times: Sequence[tuple[float, float] | None], words: Sequence[str]) -> list[int]:
    """Indices of words whose time is longer than they can be said (:func:`longest_word_s`): a
    path that handed a pause of several seconds to one word."""
    return [k for k, (t, w) in enumerate(zip(times, words))
            if t is not None and t[1] - t[0] > longest_word_s(w)]
