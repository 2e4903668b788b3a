"""Implausible alignments are reported and never written as word times.

Pure checks on word times first (the squeezed paths seen on real recordings), then whole files
through the driver with real Whisper tiny.en weights: a silent recording, a recording cut short
under its header, and a real recording beside them that must stay aligned.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_whisper import HEADER, real_whisper, synth  # noqa: E402

from worker.chat import read_chat  # noqa: E402
from worker.engines import plausibility as P  # noqa: E402
from worker.engines.base import Job, JobError  # noqa: E402
from worker.engines.whisper import WhisperEngine  # noqa: E402

pytestmark = pytest.mark.timeout(300)


def test_the_squeezed_paths_seen_on_real_speech_are_caught():
    # wanna 600_960 give 960_2140 me 2140_2180 a 2180_2200 kiss 2200_2219
    times = [(0.6, 0.96), (0.96, 2.14), (2.14, 2.18), (2.18, 2.2), (2.2, 2.219)]
    words = ["wanna", "give", "me", "a", "kiss"]
    assert P.squeezed_run(times, words) == (2, 5)  # "me a kiss" in 79 ms
    reason = P.check(times, words, 0.6, 2.219)
    assert reason.startswith("words squeezed: 'me a kiss' in 79 ms")
    # the same words said at a real pace
    ok = [(0.6, 0.9), (0.9, 1.2), (1.2, 1.4), (1.4, 1.5), (1.5, 1.9)]
    assert P.squeezed_run(ok, words) is None and P.check(ok, words, 0.6, 2.219) is None
    # a lone short function word is not a squeeze
    assert P.squeezed_run([(0.0, 0.3), (0.3, 0.32), (0.32, 0.7)], ["look", "a", "dog"]) is None


def test_syllabic_scripts_weigh_more_per_character():
    assert P.weight("kiss") == 4 and P.weight("淋濕") == 6 and P.weight("gam2") == 4
    assert P.written_without_spaces("係") and P.written_without_spaces("の") and not P.written_without_spaces("a")
    # two Cantonese words in 60 ms cannot be real; in 400 ms they can
    assert P.squeezed_run([(1.0, 1.03), (1.03, 1.06)], ["出去", "冇"]) is not None
    assert P.squeezed_run([(1.0, 1.2), (1.2, 1.4)], ["出去", "冇"]) is None


def test_minimum_length_words_and_silence_are_implausible():
    words = ["one", "two", "three"]
    tiny = [(1.0, 1.02), (1.02, 1.04), (2.5, 2.52)]
    assert P.check(tiny, words, 1.0, 3.0).startswith("every one of 3 words at the minimum length")
    spoken = [(1.0, 1.4), (1.4, 1.9), (1.9, 2.6)]
    silence = np.zeros(32000, dtype=np.float32)
    assert P.check(spoken, words, 1.0, 3.0, silence).startswith("no speech energy in 1.000-3.000 s")
    assert P.check(spoken, words, 1.0, 3.0, np.zeros(0, dtype=np.float32)).startswith("no speech energy")
    audio, *_ = synth("c1")
    assert P.check(spoken, words, 1.0, 3.0, audio[:32000]) is None
    assert P.check([None, None, None], words, 1.0, 3.0, silence) is None  # nothing placed: nothing to doubt


@pytest.fixture(scope="module")
def engine() -> WhisperEngine:
    return WhisperEngine({"model": str(real_whisper("tiny.en")), "threads": 2})


def _case(folder: Path, audio: np.ndarray, lines: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    sf.write(folder / "rec.wav", audio, 16000, subtype="PCM_16")
    cha = folder / "t.cha"
    cha.write_text(HEADER + "@Media:\trec, audio\n" + "".join(lines) + "@End\n")
    return cha


def _wor(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("%wor:")]


def test_whisper_on_a_silent_recording_aligns_no_word(engine, tmp_path):
    _, words, *_ = synth("c2")
    sentence = " ".join(words)
    lines = [f"*PAR:\t{sentence} .\n"] * 6
    cha = _case(tmp_path / "untimed", np.zeros(16000 * 20, dtype=np.float32), lines)
    out = tmp_path / "untimed.out.cha"
    result = engine.run(Job("s", cha, out, None, "t.cha"), lambda f: None)
    text = out.read_text()
    assert "\x15" not in text  # no word times and no made-up bullets
    assert result.stats["aligned_words"] == 0 and result.stats["implausible_utterances"] == 6
    tagged = [w for w in result.warnings if w.startswith("implausible:")]
    assert len(tagged) == 6 and all("t.cha:" in w and "no speech energy" in w for w in tagged)

    # timed: each utterance keeps its own bullet
    timed = [f"*PAR:\t{sentence} . \x15{1000 + 3000 * k}_{3500 + 3000 * k}\x15\n" for k in range(3)]
    cha = _case(tmp_path / "timed", np.zeros(16000 * 12, dtype=np.float32), timed)
    out = tmp_path / "timed.out.cha"
    result = engine.run(Job("s", cha, out, None, "t.cha"), lambda f: None)
    chat = read_chat(out)
    assert [u.bullet for u in chat.utterances] == [(1000 + 3000 * k, 3500 + 3000 * k) for k in range(3)]
    assert all("\x15" not in line for line in _wor(out.read_text()))
    assert sum(w.startswith("implausible: t.cha:") for w in result.warnings) == 3


def test_a_span_past_the_real_end_of_a_truncated_recording_is_reported(engine, tmp_path):
    audio, words, s, e = synth("c1")
    speech = np.concatenate([audio, np.zeros(16000 * 3, dtype=np.float32)])
    late = (len(audio) / 16000 + 0.5, len(audio) / 16000 + 2.5)
    lines = [f"*PAR:\t{' '.join(words)} . \x15{int(s * 1000)}_{int(e * 1000)}\x15\n",
             f"*PAR:\t{' '.join(words)} . \x15{int(late[0] * 1000)}_{int(late[1] * 1000)}\x15\n"]
    cha = _case(tmp_path / "cut", speech, lines)
    wav = tmp_path / "cut" / "rec.wav"
    data = wav.read_bytes()
    wav.write_bytes(data[: 44 + 2 * len(audio)])  # the header still promises the silence after it
    out = tmp_path / "cut.out.cha"
    # the media check refuses the whole file in one line before any word is placed
    with pytest.raises(JobError, match="truncated") as err:
        engine.run(Job("c", cha, out, None, "t.cha"), lambda f: None)
    assert "rec.wav" in str(err.value) and not out.exists()


def test_a_span_whose_samples_are_missing_is_implausible():
    # what the driver sees for a span past the end of a file whose header overstates its length
    assert P.check([(1.0, 1.5), (1.5, 2.0)], ["two", "words"], 1.0, 2.0,
                   np.zeros(0, dtype=np.float32)).startswith("no speech energy in 1.000-2.000 s")


def test_a_word_longer_than_it_can_be_said_is_stretched():
    from worker.engines import plausibility as P

    words = ["wanna", "give", "me", "a", "kiss"]
    times = [(0.6, 0.96), (0.96, 2.14), (2.14, 2.18), (2.18, 2.2), (2.2, 5.9)]
    assert P.stretched(times, words) == [4]  # 'kiss' over 3.7 s
    assert P.longest_word_s("a") < P.longest_word_s("kiss") < 2.0
    assert P.stretched([None, (0.0, 0.5)], ["mm", "a"]) == []


def test_a_piece_of_audio_reads_its_pauses_against_the_audio_it_was_cut_from():
    """An utterance's bullet is a few seconds of nearly all speech: read alone its 5th-percentile
    floor is speech and its one short pause is not quiet enough to count. Against the span it was
    cut from (speech with long pauses), the same pause is quiet."""
    rng = np.random.default_rng(0)
    speech = lambda n: rng.normal(0, 0.3, n)  # noqa: E731
    pause = lambda n: rng.normal(0, 0.003, n)  # noqa: E731  (40 dB under the speech)
    sr = 16000
    piece = np.concatenate([speech(sr), pause(sr // 25), speech(sr)])  # a 40 ms pause inside 2 s of speech
    span = np.concatenate([pause(sr), piece, pause(sr), speech(sr), pause(sr)])
    levels = P.frame_levels(piece, sr)
    alone = P.quiet_frames(levels)
    against_span = P.quiet_frames(levels, reference=P.frame_levels(span, sr))
    assert not alone.any()
    assert against_span[50:52].all() and against_span.sum() <= 3
    # a reference too short to read a floor from leaves the piece's own reading
    assert (P.quiet_frames(levels, reference=levels[:1]) == alone).all()
