"""Audio spans: exact span reads, downmix, resampling, mp3, conversion cache, media lookup."""

from __future__ import annotations

import os
import stat
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from worker.audio import AudioSource, find_media, media_duration
from worker.engines.base import JobError

pytestmark = pytest.mark.timeout(120)

SHARED = Path(__file__).resolve().parents[2] / "shared"
MP3 = SHARED / "chat" / "spa_marrero_clip.mp3"


@pytest.fixture
def stereo_wav(tmp_path):
    """3 s at 44.1 kHz: left a 440 Hz sine, right half of it inverted; mono is a quarter-amplitude sine."""
    sr = 44100
    t = np.arange(3 * sr) / sr
    left = 0.8 * np.sin(2 * np.pi * 440 * t)
    right = -0.4 * np.sin(2 * np.pi * 440 * t)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), sr, subtype="FLOAT")
    return path, left, right, sr


def test_span_read_equals_slice_of_full_read(stereo_wav):
    path, left, right, sr = stereo_wav
    full, _ = sf.read(path, dtype="float32", always_2d=True)
    with AudioSource.open(path) as src:
        assert src.native_rate == sr and src.channels == 2
        assert src.duration_s == pytest.approx(3.0)
        got = src.read(1.25, 2.0, rate=sr)
    want = full[int(1.25 * sr) : int(2.0 * sr)].mean(axis=1)
    np.testing.assert_array_equal(got, want.astype(np.float32))


def test_span_read_touches_only_the_requested_frames(stereo_wav, monkeypatch):
    path, *_ , sr = stereo_wav
    asked = []
    with AudioSource.open(path) as src:
        real = src._sf.read

        def spy(frames, **kw):
            asked.append(frames)
            return real(frames, **kw)

        monkeypatch.setattr(src._sf, "read", spy)
        src.read(0.5, 1.0, rate=sr)
    assert asked == [int(0.5 * sr)]


def test_downmix_to_mono(stereo_wav):
    path, left, right, sr = stereo_wav
    with AudioSource.open(path) as src:
        got = src.read(0.0, 1.0, rate=sr)
    np.testing.assert_allclose(got, ((left + right) / 2)[:sr], atol=1e-6)
    assert got.dtype == np.float32 and got.ndim == 1


def test_resample_to_16k_keeps_the_pitch(stereo_wav):
    path, *_ = stereo_wav
    with AudioSource.open(path) as src:
        got = src.read(0.0, 2.0)  # default rate 16 kHz
    assert got.dtype == np.float32
    assert abs(len(got) - 32000) <= 2
    spectrum = np.abs(np.fft.rfft(got))
    peak_hz = np.argmax(spectrum) * 16000 / len(got)
    assert peak_hz == pytest.approx(440, abs=2)
    assert np.max(np.abs(got)) == pytest.approx(0.2, abs=0.02)


def test_reads_clamp_at_the_end(stereo_wav):
    path, *_ , sr = stereo_wav
    with AudioSource.open(path) as src:
        assert len(src.read(2.5, 10.0, rate=sr)) == int(0.5 * sr)
        assert len(src.read(5.0, 6.0)) == 0
        assert len(src.read(-1.0, 0.5, rate=sr)) == int(0.5 * sr)


@pytest.mark.skipif(not MP3.exists(), reason="shared mp3 fixture not present")
def test_mp3_reads_and_past_end_returns_less():
    with AudioSource.open(MP3) as src:
        assert src.channels == 2 and src.native_rate == 44100
        x = src.read(1.0, 3.0)
        assert x.dtype == np.float32 and abs(len(x) - 32000) <= 2
        assert np.abs(x).max() > 0.001
        dur = src.duration_s
        tail = src.read(dur - 0.5, dur + 100.0)
        assert 0 < len(tail) <= 8000 + 2
        assert len(src.read(1000.0, 1001.0)) == 0
    assert media_duration(MP3) == pytest.approx(dur)


def test_missing_media_names_the_file(tmp_path):
    with pytest.raises(JobError) as err:
        AudioSource.open(tmp_path / "gone.wav")
    assert err.value.kind == "media"
    assert "gone.wav" in str(err.value)


def test_m4a_without_ffmpeg_says_what_to_install(tmp_path, monkeypatch):
    f = tmp_path / "talk.m4a"
    f.write_bytes(b"\x00\x00\x00\x18ftypM4A not really")
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(JobError) as err:
        AudioSource.open(f, cache_dir=tmp_path / "cache")
    assert err.value.kind == "media"
    assert str(err.value) == (
        f"{f}: cannot read m4a audio without ffmpeg; install ffmpeg (e.g. apt-get install ffmpeg)"
    )


def _fake_ffmpeg(folder: Path, log: Path) -> None:
    """An ``ffmpeg`` that decodes with soundfile (the input is really a WAV) and logs each call."""
    script = folder / "ffmpeg"
    script.write_text(
        f"#!{sys.executable}\n"
        + textwrap.dedent(
            f"""
            import sys, soundfile as sf
            args = sys.argv[1:]
            src = args[args.index("-i") + 1]
            open({str(log)!r}, "a").write(src + "\\n")
            data, sr = sf.read(src, always_2d=True)
            sf.write(args[-1], data.mean(axis=1), sr, format="FLAC")
            """
        )
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def test_conversion_cache_is_keyed_by_content_and_outside_the_corpus(stereo_wav, tmp_path, monkeypatch):
    path, left, right, sr = stereo_wav
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    m4a = corpus / "talk.m4a"
    m4a.write_bytes(path.read_bytes())
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls.txt"
    _fake_ffmpeg(bindir, calls)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    cache = tmp_path / "cache"
    for _ in range(2):
        with AudioSource.open(m4a, cache_dir=cache) as src:
            assert src.path == m4a and src.readable.parent.parent == cache
            got = src.read(0.0, 1.0, rate=sr)
            np.testing.assert_allclose(got, ((left + right) / 2)[:sr], atol=1e-4)
    assert calls.read_text().splitlines() == [str(m4a)]  # converted once
    assert sorted(p.name for p in corpus.iterdir()) == ["talk.m4a"]
    assert len(list((cache / "audio").glob("*.flac"))) == 1


def test_find_media(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "a" / "b").mkdir(parents=True)
    cha = corpus / "a" / "b" / "s1.cha"
    cha.write_text("")
    (corpus / "a" / "b" / "s1.WAV").write_bytes(b"")
    assert find_media(cha, "s1", None, None) == corpus / "a" / "b" / "s1.WAV"
    (corpus / "a" / "b" / "rec.mp3").write_bytes(b"")
    assert find_media(cha, "rec.mp3", None, None) == corpus / "a" / "b" / "rec.mp3"
    assert find_media(cha, "nothing", None, None) is None

    media = tmp_path / "media"
    (media / "a" / "b").mkdir(parents=True)
    (media / "a" / "b" / "s2.flac").write_bytes(b"")
    (media / "s3.mp4").write_bytes(b"")
    assert find_media(cha, "s2", media, corpus) == media / "a" / "b" / "s2.flac"
    assert find_media(cha, "s3", media, corpus) == media / "s3.mp4"
    # The first known extension in order wins when several exist.
    (corpus / "a" / "b" / "s4.mp3").write_bytes(b"")
    (corpus / "a" / "b" / "s4.wav").write_bytes(b"")
    assert find_media(cha, "s4", None, None) == corpus / "a" / "b" / "s4.wav"


def test_media_duration_of_wav_and_unknown(stereo_wav, tmp_path, monkeypatch):
    path, *_ = stereo_wav
    assert media_duration(path) == pytest.approx(3.0)
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"not audio")
    monkeypatch.setenv("PATH", str(tmp_path))  # no ffprobe either
    assert media_duration(junk) is None
