"""wav2vec2 loading and alignment with tiny random models saved like real checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest_models import build_tiny_wav2vec, install_in_hub_cache  # noqa: E402

from worker.align import UttRequest  # noqa: E402
from worker.engines.base import BootError  # noqa: E402
from worker.engines.loading import _file_mappings, load_pretrained  # noqa: E402
from worker.engines.wav2vec import CharVocab, Wav2VecAligner, Wav2VecEngine  # noqa: E402

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
SYNTH = ROOT.parent / "shared" / "synth"
WORDS = "the quick brown fox jumps over the lazy dog".split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_wav2vec(tmp_path_factory.mktemp("tiny") / "w2v")


@pytest.fixture(scope="module")
def aligner(tiny) -> Wav2VecAligner:
    return Wav2VecAligner.load(str(tiny), threads=1)


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    if (SYNTH / "c1.wav").exists():
        x, sr = sf.read(SYNTH / "c1.wav", dtype="float32")
        assert sr == 16000
        return x
    g = np.random.default_rng(0)
    return (0.1 * g.standard_normal(16000 * 3)).astype(np.float32)


def test_local_folder_loads_ready_for_inference(tiny):
    from transformers import Wav2Vec2ForCTC

    model = load_pretrained(Wav2Vec2ForCTC, str(tiny))
    ranges = _file_mappings([tiny / "model.safetensors"])
    assert all(any(lo <= p.data_ptr() < hi for lo, hi in ranges) for p in model.parameters())
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert model._shared_weights is True
    assert model._private_bytes == 0


def test_other_dtypes_and_int8_load_privately(tiny):
    from transformers import Wav2Vec2ForCTC

    bf16 = load_pretrained(Wav2Vec2ForCTC, str(tiny), dtype="bf16")
    assert next(bf16.parameters()).dtype == torch.bfloat16
    assert bf16._shared_weights is False
    private = load_pretrained(Wav2Vec2ForCTC, str(tiny), share_weights=False)
    assert private._shared_weights is False and private._private_bytes > 0
    ranges = _file_mappings([tiny / "model.safetensors"])
    assert not any(lo <= p.data_ptr() < hi for p in private.parameters() for lo, hi in ranges)
    q = load_pretrained(Wav2Vec2ForCTC, str(tiny), quantize_int8=True)
    assert q._shared_weights is False
    assert any("quantized" in type(m).__module__ for m in q.modules())


def test_unknown_hub_id_offline_is_a_boot_error_naming_it(monkeypatch):
    from transformers import Wav2Vec2ForCTC

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BootError) as err:
        load_pretrained(Wav2Vec2ForCTC, "no-such-org/no-such-model")
    msg = str(err.value)
    assert "'no-such-org/no-such-model'" in msg and "\n" not in msg
    assert "cache" in msg and "--model" in msg


def test_missing_folder_wrong_type_bad_config_and_headless_checkpoint(tiny, tmp_path):
    from transformers import Wav2Vec2ForCTC, Wav2Vec2Model, WhisperForConditionalGeneration

    with pytest.raises(BootError, match="no such folder"):
        load_pretrained(Wav2Vec2ForCTC, str(tmp_path / "absent"))
    with pytest.raises(BootError, match="'wav2vec2' model"):
        load_pretrained(WhisperForConditionalGeneration, str(tiny))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{ not json")
    with pytest.raises(BootError, match="cannot load model"):
        load_pretrained(Wav2Vec2ForCTC, str(bad))
    # A pretraining checkpoint without the CTC head would align with a random head: refuse it.
    headless = tmp_path / "headless"
    Wav2Vec2Model.from_pretrained(str(tiny)).save_pretrained(headless)
    with pytest.raises(BootError, match="lm_head"):
        load_pretrained(Wav2Vec2ForCTC, str(headless))


_HOLDER = textwrap.dedent(
    """
    import json, sys
    from transformers import Wav2Vec2ForCTC
    from worker.engines.loading import load_pretrained
    model = load_pretrained(Wav2Vec2ForCTC, sys.argv[1])
    total = sum(float(p.double().sum()) for p in model.parameters())  # touch every page
    print("ready", flush=True)
    sys.stdin.readline()
    region = None
    fields = {}
    for line in open("/proc/self/smaps"):
        head = line.split()
        if not head[0].endswith(":"):  # a mapping's header line: address range, perms, ..., [path]
            region = head[5] if len(head) >= 6 and head[5].endswith(".safetensors") else None
        elif region and head[0].endswith(":") and head[-1] == "kB":
            fields[head[0][:-1]] = fields.get(head[0][:-1], 0) + int(head[1])
    print(json.dumps({"shared": model._shared_weights, "smaps": fields}), flush=True)
    """
)


def test_hub_id_loads_from_cache_and_weights_are_shared_file_pages(tiny, tmp_path):
    """Two worker-like processes load the model by hub id (offline, from the cache): both map the
    same safetensors pages, and reading every weight leaves them shared, not private copies."""
    hub = tmp_path / "hub"
    install_in_hub_cache(tiny, hub, "tiny-org/tiny-w2v")
    env = dict(os.environ, HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _HOLDER, "tiny-org/tiny-w2v"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT,
        )
        for _ in range(2)
    ]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        reports = [json.loads(p.stdout.readline()) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    weights_kb = (tiny / "model.safetensors").stat().st_size // 1024
    for r in reports:
        assert r["shared"] is True
        sm = r["smaps"]
        assert sm["Rss"] >= weights_kb * 0.9  # the weights are resident through the file mapping
        assert sm.get("Anonymous", 0) == 0  # no copy-on-write copies: every page is the file's
        # The other process maps the same pages (dirty too when the file was written just now).
        assert sm.get("Shared_Clean", 0) + sm.get("Shared_Dirty", 0) >= weights_kb * 0.9, sm
        assert sm["Pss"] < sm["Rss"]


def test_char_vocab_case_accents_and_unknowns():
    vocab = {"<pad>": 0, "<unk>": 1, "|": 2, "'": 3, "A": 4, "B": 5, "E": 6, "C": 7, "F": 8}
    v = CharVocab(vocab, blank=0, separator=2, specials={"<pad>", "<unk>"})
    assert v.case == "upper"
    assert v.encode_word("café") == [7, 4, 8, 6]
    assert v.encode_word("b'a") == [5, 3, 4]
    assert v.encode_word("?!") == []
    assert v.encode_word("<unk>") == []


def test_frame_stride_matches_model(aligner, speech):
    assert aligner.stride == 320 and aligner.frame_s == pytest.approx(0.02)
    em = aligner.emissions(speech)
    # Receptive field of the tiny model's convolutions: 10 + (8 - 1) * 5 + (8 - 1) * 40 = 325 samples.
    assert em.shape[0] == aligner.n_frames(len(speech)) == (len(speech) - 325) // 320 + 1
    assert torch.allclose(em.exp().sum(-1), torch.ones(em.shape[0]), atol=1e-4)


def test_align_span_gives_ordered_absolute_times_inside_the_utterance(aligner, speech):
    offset = 10.0  # the span starts 10 s into the recording
    res = aligner.align_span(speech, offset, [UttRequest(3, offset + 0.312, offset + 3.15, WORDS)])
    assert len(res) == 1 and res[0].index == 3 and res[0].error is None
    times = res[0].words
    assert len(times) == len(WORDS) and all(t is not None for t in times)
    flat = [x for t in times for x in t]
    assert flat == sorted(flat)
    assert offset + 0.29 <= flat[0] and flat[-1] <= offset + 3.17


def test_long_span_is_split_not_skipped(tiny, speech, monkeypatch):
    short = Wav2VecAligner.load(str(tiny), max_span_s=1.0)
    calls = []
    real = short._forward
    monkeypatch.setattr(short, "_forward", lambda a: calls.append(len(a)) or real(a))
    em = short.emissions(speech)
    assert len(calls) >= 3 and max(calls) <= 16000 * 3  # 1 s chunks with 1 s context each side
    assert em.shape[0] == short.n_frames(len(speech))
    res = short.align_span(speech, 0.0, [UttRequest(0, 0.312, 3.15, WORDS)])
    assert res[0].error is None and all(t is not None for t in res[0].words)


def test_one_unalignable_utterance_does_not_sink_the_others(aligner, speech):
    utts = [
        UttRequest(0, 0.312, 1.6, WORDS[:4]),
        UttRequest(1, 1.6, 1.64, WORDS),  # 2 frames for ~40 characters
        UttRequest(2, 1.6, 3.15, ["!!", "日本"]),  # nothing the model can spell
        UttRequest(3, 1.6, 3.15, ["over", "日本", "lazy", "dog"]),
    ]
    res = {r.index: r for r in aligner.align_span(speech, 0.0, utts)}
    assert res[0].error is None and all(res[0].words)
    assert res[1].words is None and "frames" in res[1].error
    assert res[2].words is None and res[2].error
    assert res[3].error is None and res[3].words[1] is None and all(res[3].words[i] for i in (0, 2, 3))


def test_utterance_past_the_audio_end_is_an_error(aligner, speech):
    res = aligner.align_span(speech, 0.0, [UttRequest(0, 50.0, 52.0, ["dog"])])
    assert res[0].words is None and "no audio" in res[0].error


def test_transcribe_words_returns_timed_words(aligner, speech):
    words = aligner.transcribe_words(speech, 5.0)
    for w, s, e in words:
        assert w and w == w.lower() and 5.0 <= s <= e <= 5.0 + len(speech) / 16000 + 0.05


def test_engine_options_and_release(tiny, tmp_path):
    eng = Wav2VecEngine({"model": str(tiny), "threads": 1, "span_seconds": 12, "cache_dir": str(tmp_path)})
    assert eng.name == "wav2vec" and eng.model == str(tiny) and eng.device == "cpu"
    assert eng.aligner.max_span_s == 12
    eng.release()
    with pytest.raises(BootError):
        Wav2VecEngine({"model": str(tiny), "dtype": "fp8"})
