"""The file-level driver: spans, per-utterance failures, cache, untimed files, end to end."""

from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest_models import build_tiny_wav2vec  # noqa: E402

from worker.align import ResultCache, SpanAligner, UttRequest, UttResult, align_file, group_spans  # noqa: E402
from worker.chat import parse_chat, read_chat  # noqa: E402
from worker.engines.base import Job, JobError  # noqa: E402

pytestmark = pytest.mark.timeout(120)

SHARED = Path(__file__).resolve().parents[2] / "shared"
SYNTH = SHARED / "synth"
CHAT = SHARED / "chat"

HEADER = "@UTF8\n@Begin\n@Languages:\teng\n@Participants:\tPAR Participant\n@ID:\teng|t|PAR|||||Participant|||\n"


def write_case(folder: Path, body: str, *, seconds: float = 12.0, media: str = "rec") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    # A steady tone: sound in every span (silence would rightly make every alignment implausible).
    tone = 0.1 * np.sin(2 * np.pi * 220 * np.arange(int(seconds * 16000)) / 16000)
    sf.write(folder / f"{media}.wav", tone.astype(np.float32), 16000)
    cha = folder / "t.cha"
    cha.write_text(HEADER + f"@Media:\t{media}, audio\n" + body + "@End\n")
    return cha


class FakeAligner(SpanAligner):
    """Spreads each utterance's words evenly; fails utterances whose first word is 'fail'."""

    name = "fake"
    model = "even"

    def __init__(self, max_span_s: float = 30.0) -> None:
        self.max_span_s = max_span_s
        self.calls: list[tuple[float, int, list[int]]] = []

    def align_span(self, audio, span_start_s, utts):
        self.calls.append((span_start_s, len(audio), [u.index for u in utts]))
        out = []
        for u in utts:
            if u.words and u.words[0] == "fail":
                out.append(UttResult(u.index, None, error="cannot place these words"))
                continue
            step = (u.end_s - u.start_s) / len(u.words)
            out.append(UttResult(u.index, [(u.start_s + i * step, u.start_s + (i + 1) * step) for i in range(len(u.words))]))
        return out


def job_for(cha: Path, out: Path, **options) -> Job:
    return Job("j1", cha, out, None, cha.name, options)


def check_wor(path: Path) -> None:
    """Every utterance with words has a %wor whose times are ordered and inside its bullet."""
    chat = read_chat(path)
    text = path.read_text()
    assert text.count("%wor:") == sum(1 for u in chat.utterances if u.words)
    lines = text.splitlines()
    for u in chat.utterances:
        if not u.words:
            continue
        assert u.bullet is not None
        wor = next(lines[a - 1] for name, a, _ in u.dependent if name == "%wor")
        times = [tuple(map(int, b.split("_"))) for b in wor.split("\x15")[1::2]]
        assert len(times) == len(u.words)
        flat = [x for t in times for x in t]
        assert flat == sorted(flat)
        assert u.bullet[0] <= flat[0] and flat[-1] <= u.bullet[1]


def test_group_spans_respects_length_and_gaps():
    reqs = [UttRequest(i, s, e, ["w"]) for i, (s, e) in enumerate([(0, 4), (4, 9), (9, 12), (30, 31), (31, 80)])]
    spans = group_spans(reqs, max_span_s=10.0, max_gap_s=4.0)
    assert [[r.index for r in s] for s in spans] == [[0, 1], [2], [3], [4]]


def test_failures_are_warnings_and_the_file_is_still_written(tmp_path):
    cha = write_case(
        tmp_path,
        "*PAR:\thello there . \x151000_2000\x15\n"
        "*PAR:\tfail me now . \x152000_3000\x15\n"
        "*PAR:\tgood bye . \x153500_4500\x15\n",
    )
    aligner = FakeAligner()
    progress = []
    res = align_file(job_for(cha, tmp_path / "out" / "t.cha"), aligner, progress.append)
    assert res.output == tmp_path / "out" / "t.cha"
    assert res.warnings == ["t.cha:8: cannot place these words"]
    assert res.stats["utterances"] == 3 and res.stats["aligned_utterances"] == 2
    assert res.stats["words"] == 7 and res.stats["aligned_words"] == 4
    assert res.stats["spans"] == 1 and res.stats["audio_seconds_aligned"] == pytest.approx(3.5)
    assert res.audio_seconds == pytest.approx(12.0)
    assert progress and progress[-1] == 1.0
    out = (tmp_path / "out" / "t.cha").read_text()
    assert "%wor:\tfail me now ." in out  # unaligned words, original bullet kept
    assert "fail me now . \x152000_3000\x15" in out
    assert "%wor:\thello \x151000_1500\x15 there \x151500_2000\x15 ." in out
    assert aligner.calls == [(1.0, 56000, [0, 1, 2])]  # one read of exactly the span's audio


def test_long_utterance_goes_alone_and_spans_are_read_separately(tmp_path):
    cha = write_case(
        tmp_path,
        "*PAR:\tone two . \x15500_1500\x15\n"
        "*PAR:\ta very long one . \x152000_9000\x15\n"
        "*PAR:\tthree four . \x159500_10000\x15\n",
    )
    aligner = FakeAligner(max_span_s=3.0)
    progress = []
    res = align_file(job_for(cha, tmp_path / "o.cha"), aligner, progress.append)
    assert [c[2] for c in aligner.calls] == [[0], [1], [2]]
    assert aligner.calls[1][1] == 7 * 16000
    assert progress == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert res.stats["spans"] == 3 and not res.warnings
    check_wor(tmp_path / "o.cha")


def test_result_cache_skips_the_model_for_unchanged_utterances(tmp_path):
    cha = write_case(tmp_path, "*PAR:\thello there . \x151000_2000\x15\n*PAR:\tgood bye . \x152500_3500\x15\n")
    aligner = FakeAligner()
    cache = tmp_path / "cache"
    first = align_file(job_for(cha, tmp_path / "a.cha"), aligner, lambda f: None, cache=cache)
    assert len(aligner.calls) == 1 and first.stats["cached_utterances"] == 0
    second = align_file(job_for(cha, tmp_path / "b.cha"), aligner, lambda f: None, cache=cache)
    assert len(aligner.calls) == 1 and second.stats["cached_utterances"] == 2
    assert (tmp_path / "a.cha").read_text() == (tmp_path / "b.cha").read_text()
    # Change one utterance's words: only that one goes back to the model.
    cha.write_text(cha.read_text().replace("good bye", "good night"))
    align_file(job_for(cha, tmp_path / "c.cha"), aligner, lambda f: None, cache=cache)
    assert [c[2] for c in aligner.calls[1:]] == [[1]]
    assert ResultCache(cache / "results").key(np.zeros(3), ["a"], "x") != ResultCache(cache).key(np.zeros(3), ["a"], "y")


def test_untimed_file_uses_recovered_times(tmp_path, monkeypatch):
    cha = write_case(tmp_path, "*PAR:\thello there .\n*PAR:\tgood bye .\n")
    seen = {}

    def recover(source, chat, aligner, progress):
        seen["args"] = (source.duration_s, len(chat.utterances), aligner)
        progress(1.0)
        return {0: (1.0, 2.0)}  # the second utterance cannot be placed

    fake = types.ModuleType("worker.engines.timing")
    fake.recover_utterance_times = recover
    monkeypatch.setitem(sys.modules, "worker.engines.timing", fake)
    aligner = FakeAligner()
    progress = []
    res = align_file(job_for(cha, tmp_path / "o.cha"), aligner, progress.append)
    assert seen["args"] == (pytest.approx(12.0), 2, aligner)
    assert res.warnings == ["t.cha:8: no time for this utterance; left unaligned"]
    out = (tmp_path / "o.cha").read_text()
    assert "hello there . \x151000_2000\x15" in out and "%wor:\thello \x151000_1500\x15" in out
    assert progress[0] == pytest.approx(0.3) and progress[-1] == 1.0


def test_missing_media_and_bad_chat_are_job_errors(tmp_path):
    cha = write_case(tmp_path, "*PAR:\thello . \x151000_2000\x15\n", media="rec")
    (tmp_path / "rec.wav").unlink()
    with pytest.raises(JobError) as err:
        align_file(job_for(cha, tmp_path / "o.cha"), FakeAligner(), lambda f: None)
    assert err.value.kind == "media" and "'rec'" in str(err.value) and str(cha) in str(err.value)
    given = Job("j", cha, tmp_path / "o.cha", tmp_path / "elsewhere.wav", "t.cha")
    with pytest.raises(JobError) as err:
        align_file(given, FakeAligner(), lambda f: None)
    assert err.value.kind == "media" and "elsewhere.wav" in str(err.value)
    bad = tmp_path / "bad.cha"
    bad.write_text("this is not chat\n")
    with pytest.raises(JobError) as err:
        align_file(job_for(bad, tmp_path / "o.cha"), FakeAligner(), lambda f: None)
    assert err.value.kind == "input" and "bad.cha" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "o.cha").exists()


def test_media_found_under_media_dir(tmp_path):
    corpus = tmp_path / "corpus" / "sub"
    cha = write_case(corpus, "*PAR:\thello . \x151000_2000\x15\n")
    media = tmp_path / "media" / "sub"
    media.mkdir(parents=True)
    shutil.move(corpus / "rec.wav", media / "rec.wav")
    job = job_for(cha, tmp_path / "o.cha", media_dir=str(tmp_path / "media"), corpus_root=str(tmp_path / "corpus"))
    res = align_file(job, FakeAligner(), lambda f: None)
    assert res.stats["aligned_utterances"] == 1


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    from worker.engines.wav2vec import Wav2VecEngine

    model = build_tiny_wav2vec(tmp_path_factory.mktemp("m") / "w2v")
    return Wav2VecEngine({"model": str(model), "threads": 1})


@pytest.mark.skipif(not (SYNTH / "c1.wav").exists(), reason="shared synthetic speech not present")
def test_end_to_end_with_a_tiny_wav2vec_on_synthetic_speech(tiny_engine, tmp_path):
    shutil.copy(SYNTH / "c1.cha", tmp_path)
    shutil.copy(SYNTH / "c1.wav", tmp_path)
    out = tmp_path / "out" / "c1.cha"
    res = tiny_engine.run(job_for(tmp_path / "c1.cha", out), lambda f: None)
    assert not res.warnings
    assert res.stats["aligned_words"] == res.stats["words"] == 9
    check_wor(out)
    original = (tmp_path / "c1.cha").read_text()
    new = out.read_text()
    # Only the bullet and %wor changed; everything else is byte for byte the same.
    keep = lambda t: [l for l in t.splitlines() if not l.startswith(("*PAR", "%wor"))]  # noqa: E731
    assert keep(original) == keep(new)
    parse_chat(new)
    tiny_engine.release()


@pytest.mark.skipif(not (CHAT / "eng_multi_speaker.mp3").exists(), reason="shared CHAT fixtures not present")
def test_end_to_end_on_a_real_mp3_transcript(tiny_engine, tmp_path):
    shutil.copy(CHAT / "eng_multi_speaker.cha", tmp_path)
    out = tmp_path / "o.cha"
    job = Job("j", tmp_path / "eng_multi_speaker.cha", out, CHAT / "eng_multi_speaker.mp3", "eng_multi_speaker.cha")
    res = tiny_engine.run(job, lambda f: None)
    assert res.stats["utterances"] == 12
    assert res.stats["aligned_utterances"] + len(res.warnings) >= res.stats["utterances"]
    assert res.audio_seconds == pytest.approx(18.0, abs=0.1)
    check_wor(out)
