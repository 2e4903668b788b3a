"""Tiny random models that load through exactly the code path of a real checkpoint.

No weights can be downloaded here, and none are needed to test the plumbing: a random
``Wav2Vec2ForCTC`` with the real frame stride (320 samples) and a character vocabulary like
``facebook/wav2vec2-base-960h`` exercises loading, emissions, alignment and writing.
"""

from __future__ import annotations

import json
import shutil
import string
from pathlib import Path

VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "|", "'"] + list(string.ascii_uppercase)


def build_tiny_wav2vec(directory: Path | str, *, seed: int = 0, hidden_size: int = 32) -> Path:
    """Save a tiny ``Wav2Vec2ForCTC`` + tokenizer + feature extractor (safetensors) in ``directory``."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    (out / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = Wav2Vec2CTCTokenizer(
        str(out / "vocab.json"), unk_token="<unk>", pad_token="<pad>", word_delimiter_token="|",
        bos_token="<s>", eos_token="</s>", do_lower_case=False,
    )
    tokenizer.save_pretrained(out)
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=False
    ).save_pretrained(out)
    config = Wav2Vec2Config(
        vocab_size=len(VOCAB),
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        conv_dim=(16, 16, 16),
        conv_kernel=(10, 8, 8),
        conv_stride=(5, 8, 8),  # 320 samples per frame, as in wav2vec2-base
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        pad_token_id=0,
        ctc_loss_reduction="mean",
    )
    torch.manual_seed(seed)
    model = Wav2Vec2ForCTC(config)
    model.save_pretrained(out, safe_serialization=True)
    return out


def install_in_hub_cache(model_dir: Path | str, hub_cache: Path | str, repo_id: str) -> Path:
    """Lay ``model_dir`` out as the Hugging Face hub cache does, so ``repo_id`` loads offline from it."""
    org_name = repo_id.replace("/", "--")
    repo = Path(hub_cache) / f"models--{org_name}"
    revision = "0" * 40
    snap = repo / "snapshots" / revision
    snap.mkdir(parents=True, exist_ok=True)
    for f in Path(model_dir).iterdir():
        if f.is_file():
            shutil.copy2(f, snap / f.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snap
