"""Real Whisper tiny.en weights on synthetic speech with exact word times (slow, still run in CI).

Alignment input is the utterance bullets only (``%wor`` stripped). The figures are printed beside
the spread-by-characters baseline; the assertions are sane bounds, never a race against it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_whisper import real_whisper  # noqa: E402

from bench.alignment_accuracy import (  # noqa: E402
    FILES, boundary_errors, build_recording, print_table, read_wor, score_files,
)
from worker.audio import AudioSource  # noqa: E402
from worker.chat import read_chat  # noqa: E402
from worker.engines.base import Job  # noqa: E402
from worker.engines.timing import recover_utterance_times  # noqa: E402
from worker.engines.whisper import WhisperEngine  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def tiny_en() -> Path:
    return real_whisper("tiny.en")


@pytest.fixture(scope="module")
def engine(tiny_en) -> WhisperEngine:
    return WhisperEngine({"model": str(tiny_en), "threads": 2})


def test_word_boundaries_on_synthetic_speech(tiny_en, tmp_path):
    scores = score_files(str(tiny_en), FILES, tmp_path, threads=2)
    print_table("whisper tiny.en (bullets only)", scores)
    for s in scores:
        assert s.aligned == s.words, f"{s.name}: {s.aligned} of {s.words} words aligned"
        assert s.model_ms < 300, f"{s.name}: {s.model_ms:.0f} ms"
    mean = float(np.mean([s.model_ms for s in scores]))
    assert mean < 200


def test_utterance_times_recovered_from_an_untimed_recording(engine, tmp_path):
    cha, spans, words_true = build_recording(["c1", "s1", "c2", "c3", "s3", "c4", "c5"], tmp_path / "in",
                                             gap_s=1.5, bullets=False)
    chat = read_chat(cha)
    assert not chat.has_timings
    progress: list[float] = []
    with AudioSource.open(cha.with_suffix(".wav")) as source:
        got = recover_utterance_times(source, chat, engine.aligner, progress.append)
    utts = [u for u in chat.utterances if u.words]
    found = [got[u.index] for u in utts]
    print("\nrecovered vs true utterance spans (s):")
    for (s, e), (ts, te) in zip(found, spans):
        print(f"  {s:7.2f} {e:7.2f}   {ts:7.2f} {te:7.2f}")
    for (s, e), (ts, te) in zip(found, spans):
        assert abs(s - ts) < 0.5 and abs(e - te) < 0.5
    for (_, e0), (s1, _) in zip(found, found[1:]):
        assert e0 <= s1
    assert progress and progress[-1] == 1.0

    # The whole untimed file through the engine: every word placed, near its true time.
    out = tmp_path / "out.cha"
    result = engine.run(Job("u", cha, out, None, "rec.cha"), lambda f: None)
    assert result.stats["aligned_words"] == result.stats["words"]
    errors = []
    for pred, truth in zip(read_wor(out.read_text()), words_true):
        errors += boundary_errors(pred, truth)
    print(f"untimed file, word boundaries: {1000 * np.mean(errors):.1f} ms mean")
    assert np.mean(errors) < 0.3


def test_real_base_weights_hear_the_language_of_real_speech_among_those_named(tmp_path):
    """Language identification restricted to a transcript's @Languages, on real recordings:
    Whisper base must tell Spanish and French from English (CC BY-NC-SA data, read in place)."""
    import soundfile as sf
    import soxr
    import torch

    from worker.engines.whisper import WhisperAligner

    base = WhisperAligner.load(str(real_whisper("base")), threads=2)
    chat_dir = Path(__file__).resolve().parents[2] / "shared" / "chat"
    for clip, codes, want in (("spa_marrero_clip.mp3", ["eng", "spa"], "es"),
                              ("fra_geneva_clip.mp3", ["eng", "fra"], "fr")):
        audio, rate = sf.read(chat_dir / clip, dtype="float32")
        audio = audio.mean(axis=1) if audio.ndim > 1 else audio
        audio = soxr.resample(audio[: 20 * rate], rate, 16000).astype(np.float32)
        base.use_languages(codes)
        assert base.candidates == ["en", want]
        with torch.inference_mode():
            enc, _ = base._encode(audio)
            assert base.detect_language(enc) == want, clip
