"""Whisper forced alignment on a tiny random model that loads exactly like a real checkpoint.

The model's weights are random (d_model 64, 2 layers), but its tokenizer, processor and generation
config come from the real tiny.en folder, fetched once by ``../shared/models/get_whisper.sh`` into
``$BATCHALIGN_TEST_CACHE`` (default ``~/.cache/batchalign-supervise-tests``). The plumbing is the
same as with real weights: loading, encoding, teacher forcing, alignment heads, DTW, word mapping.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest_models import build_tiny_wav2vec, install_in_hub_cache  # noqa: E402

from worker.align import UttRequest  # noqa: E402
from worker.engines import plausibility as P  # noqa: E402
from worker.engines import whisper as W  # noqa: E402
from worker.engines.base import BootError, Job  # noqa: E402
from worker.engines.whisper import WhisperAligner, WhisperEngine, dtw_path, median_filter, word_frames  # noqa: E402

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SYNTH = SHARED / "synth"
GET_WHISPER = SHARED / "models" / "get_whisper.sh"
HEADER = "@UTF8\n@Begin\n@Languages:\teng\n@Participants:\tPAR Participant\n@ID:\teng|t|PAR|||||Participant|||\n"


def test_cache() -> Path:
    return Path(os.environ.get("BATCHALIGN_TEST_CACHE", "~/.cache/batchalign-supervise-tests")).expanduser()


test_cache.__test__ = False  # a helper, not a test


def real_whisper(size: str = "tiny.en") -> Path:
    """The real Whisper folder for ``size``, converted once into the test cache (skips if impossible)."""
    out = test_cache() / f"whisper-{size}"
    if (out / "config.json").is_file():
        return out
    if not GET_WHISPER.is_file():
        pytest.skip(f"no {GET_WHISPER} to fetch Whisper {size}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".whisper.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test processes fetch once
        if not (out / "config.json").is_file():
            proc = subprocess.run(
                ["bash", str(GET_WHISPER), sys.executable, str(out), size],
                capture_output=True, text=True, timeout=900,
            )
            if proc.returncode != 0 or not (out / "config.json").is_file():
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                pytest.skip(f"cannot fetch Whisper {size}: {tail[0]}")
    return out


def build_tiny_whisper(directory: Path, source: Path, *, seed: int = 0,
                       alignment_heads: list[list[int]] | None = ((1, 0), (1, 1))) -> Path:
    """A random 2-layer Whisper with ``source``'s tokenizer, processor and generation config."""
    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration, WhisperProcessor

    real = WhisperConfig.from_pretrained(source)
    cfg = WhisperConfig(
        vocab_size=real.vocab_size, num_mel_bins=real.num_mel_bins, d_model=64,
        encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=128, decoder_ffn_dim=128, max_source_positions=1500, max_target_positions=448,
        bos_token_id=real.bos_token_id, eos_token_id=real.eos_token_id, pad_token_id=real.pad_token_id,
        decoder_start_token_id=real.decoder_start_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(cfg)
    gen = GenerationConfig.from_pretrained(source)
    gen.alignment_heads = [list(h) for h in alignment_heads] if alignment_heads else None
    model.generation_config = gen
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    WhisperProcessor.from_pretrained(source).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_whisper(tmp_path_factory.mktemp("whisper") / "tiny", real_whisper("tiny.en"))


@pytest.fixture(scope="module")
def aligner(tiny) -> WhisperAligner:
    return WhisperAligner.load(str(tiny), threads=1)


def synth(name: str) -> tuple[np.ndarray, list[str], float, float]:
    audio, rate = sf.read(SYNTH / f"{name}.wav", dtype="float32")
    assert rate == 16000
    words = [w["word"] for w in json.loads((SYNTH / f"{name}.json").read_text())["words"]]
    words = " ".join(words).split()
    text = (SYNTH / f"{name}.cha").read_text()
    bullet = text.split("*PAR:")[1].split("\x15")[1]
    start, end = (int(x) / 1000 for x in bullet.split("_"))
    return audio, words, start, end


def joined_synth(names: list[str]) -> tuple[np.ndarray, list[str]]:
    """The synth recordings one after the other, as one long utterance's audio and words."""
    pieces, words = [], []
    for name in names:
        a, w, _, _ = synth(name)
        pieces.append(a)
        words += w
    return np.concatenate(pieces), words


@pytest.fixture(scope="module")
def two_utterances() -> tuple[np.ndarray, list[UttRequest]]:
    """c1 then one second of silence then c5, as one span starting at 10 s."""
    a1, w1, s1, e1 = synth("c1")
    a5, w5, s5, e5 = synth("c5")
    gap = np.zeros(16000, dtype=np.float32)
    audio = np.concatenate([a1, gap, a5])
    off = (len(a1) + len(gap)) / 16000
    return audio, [UttRequest(0, 10 + s1, 10 + e1, w1), UttRequest(1, 10 + off + s5, 10 + off + e5, w5)]


def check_words(times, utt: UttRequest) -> None:
    assert times is not None and len(times) == len(utt.words)
    prev = utt.start_s
    for t in times:
        assert t is not None
        s, e = t
        assert utt.start_s - 1e-6 <= s <= e <= utt.end_s + 1e-6
        assert s >= prev - 1e-6
        prev = e


# -- pieces ------------------------------------------------------------------------------------


def test_dtw_path_follows_the_cheapest_monotonic_route():
    cost = np.ones((3, 6))
    for i, cols in enumerate(([0, 1], [2, 3, 4], [5])):
        cost[i, cols] = -1.0
    rows, cols = dtw_path(cost)
    assert rows[0] == 0 and cols[0] == 0 and rows[-1] == 2 and cols[-1] == 5
    assert list(rows) == [0, 0, 1, 1, 1, 2] and list(cols) == [0, 1, 2, 3, 4, 5]
    # more tokens than frames: tokens share frames, the path still ends in the corner
    rows, cols = dtw_path(np.random.default_rng(0).normal(size=(7, 3)))
    assert rows[-1] == 6 and cols[-1] == 2
    assert all(np.diff(rows) >= 0) and all(np.diff(cols) >= 0)


def test_median_filter_smooths_spikes_and_keeps_short_rows():
    import torch

    x = torch.zeros(2, 20)
    x[0, 5] = 10.0
    y = median_filter(x, 7)
    assert y.shape == x.shape and float(y.abs().max()) == 0.0
    short = torch.arange(3.0)[None]
    assert torch.equal(median_filter(short, 7), short)


def test_chat_language_codes_map_to_whisper_codes():
    assert W.whisper_language("eng") == "en"
    assert W.whisper_language("spa") == "es"
    assert W.whisper_language("fr") == "fr"
    assert W.whisper_language(None) is None


def test_word_boundaries_snap_onto_nearby_pauses_and_skip_quiet_edges():
    quiet = np.zeros(100, dtype=bool)
    quiet[40:55] = True  # a 300 ms pause
    quiet[:5] = True
    quiet[95:] = True
    frames = word_frames([0, 35, 70, 100], quiet)
    assert frames == [(5, 40), (55, 70), (70, 95)]
    # no pause near the boundary: it stays where DTW put it
    assert word_frames([10, 20, 30], np.zeros(40, dtype=bool)) == [(10, 20), (20, 30)]


# -- the aligner -------------------------------------------------------------------------------


def test_words_get_monotonic_times_inside_their_utterances(aligner, two_utterances):
    audio, utts = two_utterances
    results = aligner.align_span(audio, 10.0, utts)
    assert [r.index for r in results] == [0, 1]
    for res, utt in zip(results, utts):
        assert res.error is None
        check_words(res.words, utt)


def test_only_alignment_heads_over_the_utterance_frames_are_used(aligner, two_utterances, monkeypatch):
    audio, utts = two_utterances
    shapes = []
    real = W.attention_matrix

    def spy(weights, *args):
        shapes.append(tuple(weights.shape))
        return real(weights, *args)

    monkeypatch.setattr(W, "attention_matrix", spy)
    aligner.align_span(audio, 10.0, utts[:1])
    utt = utts[0]
    frames = round((utt.end_s - 10.0) / W.FRAME_S) - round((utt.start_s - 10.0) / W.FRAME_S)
    n_tokens = sum(len(t) for t in aligner._word_tokens(utt.words))
    assert shapes == [(2, n_tokens + 1, frames)]  # 2 heads, tokens + end of text, the bullet's frames
    assert aligner.hf.config._attn_implementation != "eager"  # the encoder keeps its fast kernel
    layers = aligner.hf.model.decoder.layers
    assert layers[1].encoder_attn.config._attn_implementation == "eager"
    assert layers[0].encoder_attn.config._attn_implementation != "eager"
    assert aligner._captured is None


def test_a_failing_utterance_leaves_the_others_aligned(aligner, two_utterances):
    audio, utts = two_utterances
    beyond = UttRequest(7, 40.0, 42.0, ["nobody", "here"])  # after the span's audio
    too_long = UttRequest(8, utts[0].start_s, utts[0].end_s, ["word"] * 500)  # over 448 tokens
    empty = UttRequest(9, utts[0].start_s, utts[0].end_s, [])
    results = {r.index: r for r in aligner.align_span(audio, 10.0, [utts[0], beyond, too_long, empty, utts[1]])}
    check_words(results[0].words, utts[0])
    check_words(results[1].words, utts[1])
    assert results[7].words is None and "no audio" in results[7].error
    assert results[8].words is None and "tokens" in results[8].error
    assert results[9].words == [] and results[9].error is None
    assert all("\n" not in (r.error or "") for r in results.values())


def test_utterances_past_the_token_budget_start_a_new_window(aligner, monkeypatch):
    monkeypatch.setattr(aligner, "steps", W.Steps(joint=True))  # a span's utterances forced together
    audio = np.random.default_rng(1).normal(0, 0.05, 16000 * 24).astype(np.float32)
    utts = [UttRequest(k, 2.0 + 2.5 * k, 4.4 + 2.5 * k, ["hello"] * 60) for k in range(8)]  # 480 tokens
    encoded = []
    real = aligner._encode

    def count(a):
        encoded.append(len(a))
        return real(a)

    monkeypatch.setattr(aligner, "_encode", count)
    results = aligner.align_span(audio, 0.0, list(reversed(utts)))
    assert [r.index for r in results] == list(reversed(range(8)))  # the caller's order
    for res, utt in zip(results, reversed(utts)):
        assert res.error is None
        check_words(res.words, utt)
    assert len(encoded) == 2 and encoded[1] < encoded[0]  # the rest: a window from its first utterance


def test_an_utterance_longer_than_the_window_is_aligned_in_pieces(aligner):
    audio, words = joined_synth(["c1", "s1", "c2", "s2", "c3", "s3", "c4", "c5"])
    assert len(audio) / 16000 > 35
    utt = UttRequest(3, 0.2, len(audio) / 16000 - 0.1, words)
    (res,) = aligner.align_span(audio, 0.0, [utt])
    assert res.error is None
    check_words(res.words, utt)


def test_fallback_heads_are_the_last_half_of_the_decoder(tmp_path):
    folder = build_tiny_whisper(tmp_path / "noheads", real_whisper("tiny.en"), alignment_heads=None)
    al = WhisperAligner.load(str(folder), threads=1)
    assert al.heads == [(1, 0), (1, 1)]
    audio, words, s, e = synth("c3")
    utt = UttRequest(0, s, e, words)
    check_words(al.align_span(audio, 0.0, [utt])[0].words, utt)


def test_bf16_weights_align_too(tiny):
    al = WhisperAligner.load(str(tiny), dtype="bf16", threads=1)
    audio, words, s, e = synth("c4")
    utt = UttRequest(0, s, e, words)
    check_words(al.align_span(audio, 0.0, [utt])[0].words, utt)


def test_int8_weights_align_too(tiny):
    al = WhisperAligner.load(str(tiny), int8=True, threads=1)
    audio, words, s, e = synth("c5")
    utt = UttRequest(0, s, e, words)
    check_words(al.align_span(audio, 0.0, [utt])[0].words, utt)


def test_transcribe_words_returns_timed_words_inside_the_window(aligner):
    audio, *_ = synth("c2")
    words = aligner.transcribe_words(audio, 5.0)
    assert isinstance(words, list)
    end = 5.0 + len(audio) / 16000
    for w, s, e in words:
        assert isinstance(w, str) and w
        assert 5.0 - 1e-6 <= s <= e <= end + 0.02


# -- loading and the engine --------------------------------------------------------------------


def test_missing_or_wrong_models_are_boot_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BootError) as err:
        WhisperAligner.load(str(tmp_path / "absent"))
    assert str(tmp_path / "absent") in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(BootError, match="no-such-org/no-such-whisper"):
        WhisperEngine({"model": "no-such-org/no-such-whisper"})
    w2v = build_tiny_wav2vec(tmp_path / "w2v")
    with pytest.raises(BootError):
        WhisperAligner.load(str(w2v))
    with pytest.raises(BootError, match="span_seconds"):
        WhisperEngine({"model": str(w2v), "span_seconds": 45})
    with pytest.raises(BootError, match="dtype"):
        WhisperAligner.load(str(w2v), dtype="int4")


def test_hub_id_loads_from_the_cache_offline(tiny, tmp_path):
    hub = tmp_path / "hub"
    install_in_hub_cache(tiny, hub, "tiny-org/tiny-whisper")
    code = (
        "import json; from worker.engines.whisper import WhisperEngine; from worker.align import UttRequest;"
        "import numpy as np;"
        "e = WhisperEngine({'model': 'tiny-org/tiny-whisper', 'threads': 1});"
        "r = e.aligner.align_span(np.zeros(32000, np.float32), 0.0, [UttRequest(0, 0.1, 1.9, ['hello', 'world'])]);"
        "print(json.dumps([e.model, r[0].words, e.aligner.hf._shared_weights]))"
    )
    env = dict(os.environ, HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    model, words, shared = json.loads(proc.stdout.strip().splitlines()[-1])
    assert model == "tiny-org/tiny-whisper" and len(words) == 2 and shared is True


def write_case(folder: Path, bullets: bool) -> tuple[Path, list[list[str]]]:
    a1, w1, s1, e1 = synth("c1")
    a2, w2, s2, e2 = synth("c2")
    gap = np.zeros(8000, dtype=np.float32)
    audio = np.concatenate([a1, gap, a2])
    off = (len(a1) + len(gap)) / 16000
    folder.mkdir(parents=True, exist_ok=True)
    sf.write(folder / "rec.wav", audio, 16000)
    lines = []
    for words, (s, e) in ((w1, (s1, e1)), (w2, (off + s2, off + e2))):
        bullet = f" \x15{int(s * 1000)}_{int(e * 1000)}\x15" if bullets else ""
        lines.append(f"*PAR:\t{' '.join(words)} .{bullet}\n")
    cha = folder / "t.cha"
    cha.write_text(HEADER + "@Media:\trec, audio\n" + "".join(lines) + "@End\n")
    return cha, [w1, w2]


@pytest.mark.parametrize("bullets", [True, False], ids=["timed", "untimed"])
def test_engine_writes_word_tiers(tmp_path, bullets):
    # Real weights: a random model's word times are rightly reported as implausible.
    model = real_whisper("tiny.en")
    engine = WhisperEngine({"model": str(model), "threads": 1, "cache_dir": str(tmp_path / "cache")})
    assert engine.name == "whisper" and engine.model == str(model) and engine.device == "cpu"
    cha, words = write_case(tmp_path / "in", bullets)
    progress: list[float] = []
    job = Job("j1", cha, tmp_path / "out.cha", None, "t.cha")
    result = engine.run(job, progress.append)
    engine.release()
    out = (tmp_path / "out.cha").read_text()
    wor = [line for line in out.splitlines() if line.startswith("%wor:")]
    assert len(wor) == 2
    for line, ws in zip(wor, words):
        assert line.count("\x15") == 2 * len(ws)
    assert result.stats["aligned_words"] == sum(len(w) for w in words)
    assert progress and progress[-1] == 1.0
    mains = [line for line in out.splitlines() if line.startswith("*PAR:")]
    bullets_ms = [tuple(int(x) for x in m.split("\x15")[1].split("_")) for m in mains]
    assert bullets_ms[0][1] <= bullets_ms[1][0]


def test_the_transcripts_language_conditions_a_multilingual_decoder(tiny):
    fresh = WhisperAligner.load(str(tiny))
    gen = fresh.hf.generation_config
    gen.is_multilingual = True
    gen.lang_to_id = {"<|en|>": 50259, "<|es|>": 50262}
    gen.task_to_id = {"transcribe": 50360}
    fresh.use_language("spa")  # CHAT's ISO 639-3 code
    assert fresh.language == "es" and fresh.prefix[1] == 50262
    fresh.use_language("qqq")  # unknown to the model: keep the previous language, fail nothing
    assert fresh.language == "es" and fresh.prefix[1] == 50262
    fixed = WhisperAligner.load(str(tiny), language="en")
    fixed.hf.generation_config.is_multilingual = True
    fixed.use_language("spa")
    assert fixed.language == "en"


def test_out_of_memory_inside_an_utterance_fails_the_span_not_just_the_utterance(aligner, two_utterances, monkeypatch):
    """A torch out-of-memory error is the file's memory failure: it must reach the driver, which
    reports it as kind "memory" (retried with a larger estimate), not as an unaligned utterance."""
    import torch

    from worker.align import is_out_of_memory

    audio, utts = two_utterances

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(aligner, "_cross_attention", oom)
    with pytest.raises(torch.OutOfMemoryError) as err:
        aligner.align_span(audio, 10.0, list(utts))
    assert is_out_of_memory(err.value) and is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


# -- squeezed paths, long utterances, languages, steps --------------------------------------------


def test_a_path_that_piles_words_into_the_last_frames_is_repaired_with_the_prior():
    # The first token's attention dominates every frame, the others are flat: plain DTW stays on
    # the first row and drops through the rest at the very end.
    n, m = 5, 100
    matrix = np.full((n, m), -0.5)
    matrix[0] = 2.0
    plain = W.first_frames(matrix)
    assert plain[0] == 0 and all(plain[1:] >= m - n)
    repaired = W.first_frames_prior(matrix, [1] * n)
    assert list(repaired) == sorted(repaired) and repaired[1] < m // 2 and repaired[-1] < m - 5


def test_onsets_are_read_where_each_rows_attention_rises_not_where_the_path_crosses_over():
    """Each row attends most to the beginning of its token, already looks a little at the end of
    the token before and fades over the rest of its own; the DTW path changes rows where the next
    row takes over, early. The onset is the leading half-maximum edge of the row's peak inside its
    own frames."""
    onsets = [0, 12, 30, 41, 60]
    m = 80
    level = np.full((len(onsets), m), 0.001)
    for r, o in enumerate(onsets):
        level[r, max(o - 6, 0):o] = 0.3  # looking ahead from the end of the previous token
        level[r, o:o + 3] = 1.0  # the token's beginning
        end = onsets[r + 1] if r + 1 < len(onsets) else m
        level[r, o + 3:end] = np.linspace(0.6, 0.2, end - o - 3)  # the rest of it
    crossing = W.first_frames(level)
    assert all(c < o for c, o in zip(crossing[1:], onsets[1:]))  # the path's entries come early
    assert list(W.onset_frames(level, crossing)) == onsets


def test_a_row_without_a_peak_of_its_own_keeps_the_paths_entry():
    """A short predictable word's row may look at its neighbour: inside its frames it has only the
    flank of a peak elsewhere, so there is no onset to read and the path's entry stands."""
    level = np.full((3, 40), 0.001)
    level[0, 0:12] = 1.0
    level[1, 8:11] = 0.5  # peaks inside row 0's frames, only a falling flank inside its own
    level[1, 11:16] = np.linspace(0.4, 0.05, 5)
    level[2, 20:40] = 1.0
    starts = np.array([0, 12, 20])
    out = W.onset_frames(level, starts)
    assert out[1] == 12 and out[2] == 20
    assert list(out) == sorted(out)


def test_a_word_stretched_over_a_pause_is_cut_to_its_attention_or_left_untimed(aligner, two_utterances, monkeypatch):
    """A path that hands seconds of the bullet to one word (a pause in noisy audio) is repaired:
    the word keeps only the frames around its own attention peak, or goes untimed; the other words
    keep their times. Without the step the word stays stretched."""
    audio, utts = two_utterances
    utt = utts[1]  # c5: 12 words over about 3.6 s

    def one_long(matrix):  # the second word's row holds all but the last few frames
        n, m = matrix.shape
        out = np.arange(n) + m - n
        out[0], out[1] = 0, 2
        return out.astype(np.int64)

    monkeypatch.setattr(W, "first_frames", one_long)
    monkeypatch.setattr(aligner, "steps", W.Steps(repair_stretched=False, repair_squeezed=False, onsets=False))
    (raw,) = aligner.align_span(audio, 10.0, [utt])
    assert P.stretched(raw.words, utt.words) == [1]
    monkeypatch.setattr(aligner, "steps", W.Steps(repair_squeezed=False, onsets=False))
    (cut,) = aligner.align_span(audio, 10.0, [utt])
    assert P.stretched(cut.words, utt.words) == []
    assert cut.words[1] is None or (raw.words[1][0] <= cut.words[1][0] < cut.words[1][1] <= raw.words[1][1])
    assert cut.words[:1] + cut.words[2:] == raw.words[:1] + raw.words[2:]


@pytest.fixture(scope="module")
def base_aligner() -> WhisperAligner:
    return WhisperAligner.load(str(real_whisper("base")), threads=2)


def test_onsets_remove_most_of_the_early_bias_on_real_weights(base_aligner, monkeypatch):
    """Real Whisper base weights on espeak speech: with the DTW path's entries word starts come
    out early on average; read at the attention onsets they come out nearer the truth."""
    real_aligner = base_aligner
    bias = {}
    for onsets in (False, True):
        monkeypatch.setattr(real_aligner, "steps", W.Steps(onsets=onsets))
        errors = []
        for name in ("c1", "c4", "c5"):
            audio, words, s, e = synth(name)
            (res,) = real_aligner.align_span(audio, 0.0, [UttRequest(0, s, e, words)])
            truth = [(w["start_ms"] / 1000, w["end_ms"] / 1000)
                     for w in json.loads((SYNTH / f"{name}.json").read_text())["words"]]
            check_words(res.words, UttRequest(0, s, e, words))
            if len(truth) == len(res.words):
                errors += [p[0] - t[0] for p, t in zip(res.words[1:], truth[1:])]
        bias[onsets] = float(np.mean(errors))
    assert bias[False] < -0.04  # the path's entries: well over two frames early
    assert abs(bias[True]) < abs(bias[False]) / 2


@pytest.fixture(scope="module")
def real_aligner() -> WhisperAligner:
    return WhisperAligner.load(str(real_whisper("tiny.en")), threads=2)


def test_the_aligner_detects_a_squeeze_and_reruns_with_the_prior(real_aligner, monkeypatch):
    aligner = real_aligner
    audio, words, s, e = synth("c3")
    utt = UttRequest(0, s, e, words)
    calls = []

    def piled(matrix):  # what a diffuse attention map gives: everything but the first word at the end
        calls.append("plain")
        out = np.full(matrix.shape[0], matrix.shape[1] - 1)
        out[0] = 0
        return out

    real_first, real_prior = W.first_frames, W.first_frames_prior

    def prior(matrix, weights, *args, **kwargs):
        calls.append("prior")
        monkeypatch.setattr(W, "first_frames", real_first)  # the prior's own DTW is the real one
        try:
            return real_prior(matrix, weights, *args, **kwargs)
        finally:
            monkeypatch.setattr(W, "first_frames", piled)

    monkeypatch.setattr(W, "first_frames", piled)
    monkeypatch.setattr(W, "first_frames_prior", prior)
    (res,) = aligner.align_span(audio, 0.0, [utt])
    assert calls == ["plain", "prior"]
    assert not P.squeezed(res.words, words)
    check_words(res.words, utt)

    monkeypatch.setattr(aligner, "steps", W.Steps(repair_squeezed=False))
    calls.clear()
    (res,) = aligner.align_span(audio, 0.0, [utt])
    assert calls == ["plain"] and P.squeezed(res.words, words)  # left for the driver to report


def test_a_piece_of_a_long_utterance_that_cannot_be_aligned_leaves_only_its_words_untimed(aligner, monkeypatch):
    audio, words = joined_synth(["c1", "s1", "c2", "s2", "c3", "s3", "c4", "c5"])
    utt = UttRequest(3, 0.2, len(audio) / 16000 - 0.1, words)
    real = W._Window.align_many
    seen = []

    def first_fails(self, utts):
        seen.append(self.start_s)
        if len(seen) == 1:
            raise RuntimeError("decoder exploded")
        return real(self, utts)

    monkeypatch.setattr(W._Window, "align_many", first_fails)
    (res,) = aligner.align_span(audio, 0.0, [utt])
    assert len(seen) >= 2 and seen[1] > seen[0]  # the piece after the failed one is aligned too
    assert res.words is not None and len(res.words) == len(words)
    missing = [k for k, t in enumerate(res.words) if t is None]
    assert missing == list(range(len(missing))) and 0 < len(missing) < len(words)
    assert res.words[-1] is not None
    assert "decoder exploded" in res.error and "\n" not in res.error


def test_a_long_utterance_through_the_driver_warns_about_its_missing_words(tmp_path, monkeypatch):
    model = real_whisper("tiny.en")
    engine = WhisperEngine({"model": str(model), "threads": 1})
    audio, words = joined_synth(["c1", "c2", "c3", "c4", "c5", "c1", "c2", "c3", "c4", "c5"])
    folder = tmp_path / "long"
    folder.mkdir()
    sf.write(folder / "rec.wav", audio, 16000)
    end = int(len(audio) / 16)
    cha = folder / "t.cha"
    cha.write_text(HEADER + "@Media:\trec, audio\n" + f"*PAR:\t{' '.join(words)} . \x15100_{end - 50}\x15\n@End\n")
    assert len(audio) / 16000 > 32  # more than one window
    real = W._Window.align_many
    seen = []

    def second_fails(self, utts):
        seen.append(1)
        if len(seen) == 2:
            raise RuntimeError("decoder exploded")
        return real(self, utts)

    monkeypatch.setattr(W._Window, "align_many", second_fails)
    result = engine.run(Job("l", cha, tmp_path / "out.cha", None, "t.cha"), lambda f: None)
    assert 0 < result.stats["aligned_words"] < len(words)
    assert len(result.warnings) == 1 and result.warnings[0].startswith("t.cha:7: ")
    assert "words could not be placed" in result.warnings[0]


def test_cantonese_words_are_glued_as_written_and_each_gets_a_time(aligner):
    words = ["gam2", "係", "出去", "冇", "耐", "就", "淋濕", "咗", "雨"]
    toks = aligner._word_tokens(words)
    assert all(toks)
    text = aligner.tokenizer.decode([t for w in toks for t in w])
    assert text == " gam2 係出去冇耐就淋濕咗雨"  # no spaces between Chinese characters
    assert [aligner.tokenizer.decode(t) for t in toks] == [" gam2", " 係"] + words[2:]
    audio, *_ = synth("c2")
    utt = UttRequest(0, 0.1, len(audio) / 16000 - 0.1, words)
    (res,) = aligner.align_span(audio, 0.0, [utt])
    check_words(res.words, utt)
    assert W.whisper_language("yue") == "zh" and W.whisper_language("vec") == "it"
    assert W.whisper_language("hrv") == "hr"


def test_steps_come_from_engine_options():
    assert W.Steps.from_options({}) == W.Steps()
    steps = W.Steps.from_options({"joint": "true", "snap_pauses": 1, "median_width": "1", "model": "x"})
    assert steps.joint and steps.snap_pauses and steps.median_width == 1
    assert not W.Steps.from_options({"repair_squeezed": "off"}).repair_squeezed
    with pytest.raises(BootError, match="whisper option"):
        W.Steps.from_options({"trim_quiet": "maybe"})


def test_onsets_default_to_the_alignment_heads_measured_to_peak_at_a_tokens_beginning(aligner, monkeypatch):
    """Where a row's attention peaks is a property of the alignment heads: the onset reading is on by
    default only for heads known to peak at a token's beginning (Whisper base's); an option forces it."""
    assert W.Steps().onsets is None and W.Steps.from_options({"onsets": "auto"}).onsets is None
    assert W.Steps.from_options({"onsets": "off"}).onsets is False
    assert aligner.heads == [(1, 0), (1, 1)] and not aligner.use_onsets()  # the tiny random model
    monkeypatch.setattr(aligner, "steps", W.Steps(onsets=True))
    assert aligner.use_onsets()
    monkeypatch.setattr(aligner, "steps", W.Steps())
    monkeypatch.setattr(aligner, "onset_heads", tuple(aligner.heads) in {((1, 0), (1, 1))})
    assert aligner.use_onsets()
    base = ((3, 1), (4, 2), (4, 3), (4, 7), (5, 1), (5, 2), (5, 4), (5, 6))
    tiny_en = ((1, 0), (2, 0), (2, 5), (3, 0), (3, 1), (3, 2), (3, 3), (3, 4))
    assert base in W.ONSET_HEADS and tiny_en not in W.ONSET_HEADS


def test_no_attention_map_but_the_alignment_layers_cross_attention_is_ever_made(aligner, two_utterances):
    """Forced alignment must never materialise the encoder's self-attention maps (1500 x 1500 per
    head and layer): every attention module of the model is watched during a span, and only the
    alignment layers' cross-attention may return weights."""
    audio, utts = two_utterances
    made: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name, module in aligner.hf.named_modules():
        if name.endswith(("self_attn", "encoder_attn")):
            def hook(_m, _args, output, name=name):
                if isinstance(output, tuple) and len(output) > 1 and output[1] is not None:
                    made[name] = tuple(output[1].shape)
            hooks.append(module.register_forward_hook(hook))
    try:
        aligner.align_span(audio, 10.0, utts)
    finally:
        for h in hooks:
            h.remove()
    assert len(hooks) == 2 + 2 + 2  # encoder self, decoder self and cross attention of both layers
    layers = {layer for layer, _ in aligner.heads}
    assert set(made) == {f"model.decoder.layers.{k}.encoder_attn" for k in layers}
    assert all(shape[-1] == 1500 and shape[-2] < 448 for shape in made.values())  # tokens x frames only


def test_header_languages_are_read_up_to_the_first_utterance(tmp_path):
    cha = tmp_path / "x.cha"
    cha.write_text("@UTF8\n@Begin\n@Languages:\tvec , hrv\n*S01:\thello . \x150_10\x15\n@Languages:\teng\n@End\n")
    assert W.header_languages(cha) == ["vec", "hrv"]
    cha.write_text("@UTF8\n@Begin\n@Languages:\tspa,eng\n@End\n")
    assert W.header_languages(cha) == ["spa", "eng"]
    assert W.header_languages(tmp_path / "missing.cha") == []


def test_a_code_switched_transcript_forces_each_window_in_the_language_the_model_hears(tiny, two_utterances, monkeypatch):
    """Several @Languages: each window is forced with the language token that Whisper's own
    language identification ranks first among the transcript's languages (never one it did not
    name); one language, or a model without languages, keeps the single prompt."""
    import torch

    fresh = WhisperAligner.load(str(tiny))
    gen = fresh.hf.generation_config
    gen.is_multilingual = True
    gen.lang_to_id = {"<|en|>": 50259, "<|es|>": 50262, "<|it|>": 50274, "<|hr|>": 50291}
    gen.task_to_id = {"transcribe": 50360}
    fresh.use_language("vec")
    assert fresh.language == "it"
    fresh.use_languages(["vec", "hrv", "qqq"])  # unknown codes are dropped
    assert fresh.candidates == ["it", "hr"]

    audio, utts = two_utterances
    enc, _ = fresh._encode(audio)
    with torch.inference_mode():
        out = fresh.hf.model.decoder(input_ids=torch.tensor([fresh.prefix[:1]]), encoder_hidden_states=enc)
        logits = fresh.hf.proj_out(out.last_hidden_state[0, -1])
        expected = max(["it", "hr"], key=lambda c: float(logits[gen.lang_to_id[f"<|{c}|>"]]))
        assert fresh.detect_language(enc) == expected
    prompts = []
    real = fresh._cross_attention

    def spy(enc, tokens, prefix=None):
        prompts.append(prefix)
        return real(enc, tokens, prefix)

    monkeypatch.setattr(fresh, "_cross_attention", spy)
    results = fresh.align_span(audio, 10.0, utts)
    assert all(r.words for r in results)
    assert prompts and all(p[1] == gen.lang_to_id[f"<|{expected}|>"] for p in prompts)
    assert fresh.last_languages == {0: expected, 1: expected}

    fresh.use_languages(["eng"])  # one language: no identification, the file's prompt
    assert fresh.candidates == []
    prompts.clear()
    fresh.align_span(audio, 10.0, utts[:1])
    assert prompts == [fresh.prefix] or prompts == [None]
    english_only = WhisperAligner.load(str(tiny))
    english_only.use_languages(["spa", "eng"])
    assert english_only.candidates == []


def test_context_after_the_bullet_lets_words_said_past_its_end_go_untimed(aligner, two_utterances, monkeypatch):
    """With ``context_after`` the DTW sees a second of audio past the bullet's end, so it need not
    cram the words still being said into the bullet's last frames; a word it starts there gets no
    time (the driver names it) while the others keep theirs, inside the bullet."""
    audio, utts = two_utterances
    full = utts[0]
    cut = UttRequest(0, full.start_s, full.start_s + 0.6 * (full.end_s - full.start_s), full.words)
    widths = []

    def even(matrix):  # rows spread evenly over every column the DTW was given
        widths.append(matrix.shape[1])
        return np.linspace(0, matrix.shape[1] - 1, matrix.shape[0]).astype(np.int64)

    monkeypatch.setattr(W, "first_frames", even)
    monkeypatch.setattr(aligner, "steps", W.Steps(context_after=True, repair_squeezed=False))
    (res,) = aligner.align_span(audio, 10.0, [cut])
    inside = round((cut.end_s - 10.0) / W.FRAME_S) - round((cut.start_s - 10.0) / W.FRAME_S)
    assert widths == [inside + round(W.CONTEXT_AFTER_S / W.FRAME_S)]
    assert res.words[-1] is None and res.words[0] is not None
    timed = [t for t in res.words if t is not None]
    assert 0 < len(timed) < len(cut.words)
    assert all(cut.start_s - 1e-6 <= s <= e <= cut.end_s + 1e-6 for s, e in timed)

    widths.clear()
    monkeypatch.setattr(aligner, "steps", W.Steps(context_after=False, repair_squeezed=False))
    (res,) = aligner.align_span(audio, 10.0, [cut])
    assert widths == [inside] and all(t is not None for t in res.words)


def test_an_utterance_aligned_alone_reads_its_pauses_against_its_span(aligner, two_utterances, monkeypatch):
    """``span_floor``: each utterance's window takes its quiet frames from the span's floor and loud
    frames (the span holds the pause between the two), not from its own bullet's audio alone."""
    audio, utts = two_utterances
    seen = []
    real = W.quiet_frames

    def record(levels, reference=None):
        seen.append(None if reference is None else len(reference))
        return real(levels, reference)

    monkeypatch.setattr(W, "quiet_frames", record)
    monkeypatch.setattr(aligner, "steps", W.Steps(span_floor=True))
    aligner.align_span(audio, 10.0, utts)
    assert seen and all(n == len(audio) // W.SAMPLES_PER_FRAME for n in seen)
    seen.clear()
    monkeypatch.setattr(aligner, "steps", W.Steps(span_floor=False))
    aligner.align_span(audio, 10.0, utts)
    assert seen and all(n is None for n in seen)


def test_the_utterances_outer_edges_move_off_the_pauses_around_it():
    """No neighbouring word to snap to at an utterance's edges: a pause under the first word's start
    or the last word's end (DTW hands it to them) is taken off them, interior edges left alone."""
    quiet = np.zeros(100, dtype=bool)
    quiet[0:30] = True  # leading pause inside the window
    quiet[50:53] = True  # a closure-length quiet run inside the second word: no pause, no outer edge
    quiet[80:100] = True  # trailing pause
    frames = word_frames([0, 40, 60, 100], quiet, 0, 100, snap=True, trim=False)
    assert frames[0][0] == 30 and frames[-1][1] == 80
    assert frames[1] == (40, 60)
    frames = word_frames([0, 40, 60, 100], quiet, 0, 100, snap=False, trim=False)
    assert frames[0][0] == 0 and frames[-1][1] == 100


def test_a_last_word_that_ends_in_sound_runs_on_to_the_pause_after_it():
    """The end-of-text row rises while a soft utterance end still sounds: a last word whose DTW end
    lies in sound is carried on to where the pause after it starts; one already ending in a pause,
    or with no pause after it, keeps its end."""
    quiet = np.zeros(100, dtype=bool)
    quiet[75:100] = True  # the pause after the utterance
    bounds = [10, 40, 62]  # DTW ends the last word at frame 62, 13 frames before speech stops
    assert word_frames(bounds, quiet, 0, 100, snap=True, trim=False, run_on=True)[-1] == (40, 75)
    assert word_frames(bounds, quiet, 0, 100, snap=True, trim=False, run_on=False)[-1] == (40, 62)
    # the window ends before the pause (or has none): nothing to run on to
    assert word_frames(bounds, np.zeros(100, dtype=bool), 0, 100, snap=True, trim=False, run_on=True)[-1] == (40, 62)
    # a last word ending inside the pause still moves back to where it starts
    assert word_frames([10, 40, 90], quiet, 0, 100, snap=True, trim=False, run_on=True)[-1] == (40, 75)
    # interior boundaries are left alone, and the window's end still bounds the word
    frames = word_frames(bounds, quiet, 0, 70, snap=True, trim=False, run_on=True)
    assert frames[0] == (10, 40) and frames[-1] == (40, 70)
    assert W.Steps().run_on and not W.Steps.from_options({"run_on": "off"}).run_on
    assert W.Steps().gaps_by_sound and not W.Steps.from_options({"gaps_by_sound": "off"}).gaps_by_sound
