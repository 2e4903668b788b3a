"""Truncated and damaged recordings: one line naming the file and what is wrong, never aligned."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from helpers import cli_args, events, named, run_cli
from worker.audio import AudioSource, validate_media, wav_declared_seconds
from worker.engines.base import JobError

pytestmark = pytest.mark.timeout(120)


def _wav(path: Path, seconds: float = 3.0, sr: int = 16000) -> Path:
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), sr, subtype="PCM_16")
    return path


def _truncate(path: Path, keep: int) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    return path


def test_truncated_wav_says_header_and_held_seconds(tmp_path):
    f = _truncate(_wav(tmp_path / "cut.wav"), 44 + 128)  # 64 samples of 16-bit mono
    assert wav_declared_seconds(f) == pytest.approx((3.0, 0.004))
    with pytest.raises(JobError) as err:
        AudioSource.open(f)
    assert err.value.kind == "media"
    assert str(err.value) == f"{f}: truncated: header says 3.000 s, file holds 0.004 s"
    assert validate_media(f) == str(err.value)


def test_whole_wav_passes(tmp_path):
    f = _wav(tmp_path / "ok.wav")
    assert validate_media(f) is None
    with AudioSource.open(f) as src:
        assert src.duration_s == pytest.approx(3.0)


def test_corrupt_wav_is_not_reported_as_missing_ffmpeg(tmp_path, monkeypatch):
    f = tmp_path / "noise.wav"
    f.write_bytes(b"this is not audio at all" * 40)
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no ffmpeg anywhere
    with pytest.raises(JobError) as err:
        AudioSource.open(f, cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert msg.startswith(f"{f}: not a WAV file") and "ffmpeg" not in msg and "\n" not in msg
    assert validate_media(f) == msg


def test_damaged_riff_and_empty_files(tmp_path):
    riff = tmp_path / "bad.wav"
    riff.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk")
    assert "damaged WAV" in validate_media(riff)
    empty = tmp_path / "empty.flac"
    empty.write_bytes(b"")
    assert validate_media(empty) == f"{empty}: media file is empty (0 bytes)"


def test_truncated_flac_is_refused(tmp_path):
    f = tmp_path / "cut.flac"
    sf.write(f, (np.random.default_rng(0).standard_normal(48000) * 0.1).astype(np.float32), 16000)
    _truncate(f, f.stat().st_size // 10)
    msg = validate_media(f)
    assert msg is not None and msg.startswith(f"{f}: truncated or damaged: header says 3.000 s")


def test_a_run_fails_the_truncated_file_in_one_line_and_aligns_the_rest(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("good", "cut"):
        (corpus / f"{name}.cha").write_text(
            "@UTF8\n@Begin\n@Languages:\teng\n@Participants:\tPAR Participant\n"
            f"@ID:\teng|x|PAR|||||Participant|||\n@Media:\t{name}, audio\n"
            "*PAR:\thello there . \x150_2000\x15\n@End\n", encoding="utf-8")
        _wav(corpus / f"{name}.wav")
    _truncate(corpus / "cut.wav", 44 + 128)
    out, log = tmp_path / "out", tmp_path / "log.jsonl"
    r = run_cli(cli_args(corpus, out, "--log-json", str(log)), tmp_path)
    assert r.returncode == 1, r.stderr
    assert (out / "good.cha").exists() and not (out / "cut.cha").exists()
    failed = named(events(log), "file_failed")
    assert [e["file"] for e in failed] == ["cut.cha"]
    assert failed[0]["reason"].endswith("cut.wav: truncated: header says 3.000 s, file holds 0.004 s")
    assert "truncated: header says 3.000 s, file holds 0.004 s" in r.stderr
