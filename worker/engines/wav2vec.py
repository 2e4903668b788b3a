"""wav2vec2 CTC alignment: one model pass per span, then a forced alignment per utterance.

Running the acoustic model once over a span of several utterances (instead of once per
utterance) gives every utterance its neighbours' acoustic context and amortises the model's
fixed cost; each utterance then force-aligns its characters on its own slice of the span's
emissions, so one utterance that does not fit never disturbs the others.
"""

from __future__ import annotations

import logging
import math
import unicodedata
from typing import Any

import numpy as np
import torch

from worker.align import SpanAligner, UttRequest, UttResult
from worker.engines.base import AlignerEngine, BootError
from worker.engines.ctc import AlignmentError, forced_align_best, greedy_decode, merge_tokens, min_frames, word_frames
from worker.engines.loading import configure_threads, load_pretrained, load_processor, trim_heap
from worker.selfmem import pin_mmap_threshold

log = logging.getLogger(__name__)

DEFAULT_MODEL = "facebook/wav2vec2-base-960h"
# Context each side of a chunk when a span is too long for one pass, so chunk edges see audio.
CHUNK_CONTEXT_S = 1.0


class CharVocab:
    """Maps transcript words onto a CTC vocabulary: case folded to the vocabulary's, accents
    stripped when only the bare letter exists, anything else unknown dropped."""

    def __init__(self, vocab: dict[str, int], blank: int, separator: int | None, specials: set[str]) -> None:
        self.vocab = vocab
        self.blank = blank
        self.separator = separator
        self.id_to_token = {i: t for t, i in vocab.items()}
        self.tokens = {t: i for t, i in vocab.items() if t not in specials and i != blank and i != separator}
        letters = [t for t in self.tokens if len(t) == 1 and t.isalpha()]
        upper = sum(t.isupper() for t in letters)
        lower = sum(t.islower() for t in letters)
        self.case = "upper" if upper > lower else "lower" if lower > upper else None
        self.max_len = max((len(t) for t in self.tokens), default=1)
        self.token_ids = set(self.tokens.values())

    def _fold(self, text: str) -> str:
        if self.case == "upper":
            return text.upper()
        if self.case == "lower":
            return text.lower()
        return text

    def encode_word(self, word: str) -> list[int]:
        """Token ids of one word (longest match first); characters outside the vocabulary dropped."""
        text = self._fold(word)
        out: list[int] = []
        i = 0
        while i < len(text):
            for n in range(min(self.max_len, len(text) - i), 0, -1):
                tok = self.tokens.get(text[i : i + n])
                if tok is not None:
                    out.append(tok)
                    i += n
                    break
            else:
                base = unicodedata.normalize("NFKD", text[i])[:1]
                tok = self.tokens.get(base) if base and base != text[i] else None
                if tok is not None:
                    out.append(tok)
                i += 1
        return out


class Wav2VecAligner(SpanAligner):
    """A loaded ``Wav2Vec2ForCTC`` with its vocabulary, as a :class:`SpanAligner`."""

    name = "wav2vec"

    def __init__(
        self,
        model: Any,
        vocab: CharVocab,
        *,
        model_name: str,
        device: str = "cpu",
        dtype: str = "fp32",
        normalize: bool = True,
        max_span_s: float = 30.0,
        sample_rate: int = 16000,
    ) -> None:
        self.hf = model
        self.vocab = vocab
        self.model = model_name
        self.device = device
        self.dtype = dtype
        self.normalize = normalize
        self.max_span_s = float(max_span_s)
        self.sample_rate = int(sample_rate)
        self.stride = int(getattr(model.config, "inputs_to_logits_ratio", 0) or math.prod(model.config.conv_stride))
        self.frame_s = self.stride / self.sample_rate
        self._param_dtype = next(model.parameters()).dtype if any(True for _ in model.parameters()) else torch.float32

    @classmethod
    def load(
        cls,
        model_id: str = DEFAULT_MODEL,
        *,
        device: str = "cpu",
        dtype: str = "fp32",
        int8: bool = False,
        share_weights: bool = True,
        threads: int | None = None,
        max_span_s: float = 30.0,
    ) -> "Wav2VecAligner":
        from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC  # noqa: PLC0415

        tokenizer = load_processor(Wav2Vec2CTCTokenizer, model_id)
        try:
            extractor = load_processor(Wav2Vec2FeatureExtractor, model_id)
            normalize = bool(getattr(extractor, "do_normalize", True))
            rate = int(getattr(extractor, "sampling_rate", 16000) or 16000)
        except BootError:
            log.debug("no feature extractor config for %s: normalising at 16 kHz", model_id)
            normalize, rate = True, 16000
        model = load_pretrained(
            Wav2Vec2ForCTC,
            model_id,
            device=device,
            dtype=dtype,
            quantize_int8=int8,
            share_weights=share_weights,
            threads=threads,
        )
        vocab_map = tokenizer.get_vocab()
        blank = tokenizer.pad_token_id
        if blank is None:
            raise BootError(f"cannot load model {model_id!r}: its tokenizer has no pad (CTC blank) token; use a CTC checkpoint")
        sep_tok = getattr(tokenizer, "word_delimiter_token", None)
        separator = vocab_map.get(sep_tok) if sep_tok else None
        specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
        n_out = model.config.vocab_size
        if max(vocab_map.values(), default=-1) >= n_out:
            raise BootError(
                f"cannot load model {model_id!r}: the tokenizer has {len(vocab_map)} tokens but the model "
                f"outputs {n_out}; the tokenizer does not belong to this model"
            )
        vocab = CharVocab(vocab_map, blank, separator, specials)
        return cls(
            model,
            vocab,
            model_name=model_id,
            device=device,
            dtype=dtype,
            normalize=normalize,
            max_span_s=max_span_s,
            sample_rate=rate,
        )

    # -- emissions ---------------------------------------------------------------------------

    def n_frames(self, n_samples: int) -> int:
        if n_samples <= 0:
            return 0
        return int(self.hf._get_feat_extract_output_lengths(torch.tensor(n_samples)).item())

    def _forward(self, audio: np.ndarray) -> torch.Tensor:
        """Log probabilities [frames, classes] (float32, CPU) for one piece of audio."""
        x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
        if self.normalize:
            x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)
        x = x[None].to(self.device, dtype=self._param_dtype if self._param_dtype.is_floating_point else torch.float32)
        with torch.inference_mode():
            logits = self.hf(x).logits[0]
            out = torch.log_softmax(logits.float(), dim=-1).cpu()
        del x, logits
        return out

    def emissions(self, audio: np.ndarray) -> torch.Tensor:
        """Emissions for a whole span; a span longer than ``max_span_s`` runs in overlapping chunks
        so memory stays bounded by the chunk, with frames placed exactly where one pass puts them."""
        n = len(audio)
        total = self.n_frames(n)
        if total == 0:
            return torch.zeros((0, self.hf.config.vocab_size))
        chunk = max(1, int(self.max_span_s * self.sample_rate) // self.stride) * self.stride
        if n <= chunk:
            return self._forward(audio)
        ctx = max(1, int(CHUNK_CONTEXT_S * self.sample_rate) // self.stride) * self.stride
        pieces = []
        for a in range(0, n, chunk):
            lo = max(0, a - ctx)
            hi = min(n, a + chunk + ctx)
            em = self._forward(audio[lo:hi])
            first = (a - lo) // self.stride
            want = min(chunk // self.stride, total - a // self.stride)
            piece = em[first : first + want]
            if piece.shape[0] < want:  # the last frames of the recording: repeat the final frame
                pad = (em[-1:] if em.shape[0] else torch.zeros((1, em.shape[1]))).expand(want - piece.shape[0], -1)
                piece = torch.cat((piece, pad))
            pieces.append(piece)
            if a // self.stride + want >= total:
                break
        return torch.cat(pieces)[:total]

    # -- SpanAligner -------------------------------------------------------------------------

    def align_span(self, audio: np.ndarray, span_start_s: float, utts: list[UttRequest]) -> list[UttResult]:
        em = self.emissions(audio)
        results = []
        for utt in utts:
            try:
                results.append(self._align_utterance(em, span_start_s, utt))
            except AlignmentError as exc:
                results.append(UttResult(utt.index, None, error=str(exc)))
        del em
        # Spans differ in length, so freed activation blocks fragment glibc's heap; trimming after
        # each span keeps a long recording's peak at a short one's (measured: 1301 -> 1184 MiB on a
        # 60 s file and 1270 -> 1184 MiB on a 10 min one, wav2vec2-base, fp32).
        trim_heap()
        return results

    def _align_utterance(self, em: torch.Tensor, span_start_s: float, utt: UttRequest) -> UttResult:
        if not utt.words:
            return UttResult(utt.index, [])
        total = em.shape[0]
        f0 = max(0, int(math.floor((utt.start_s - span_start_s) / self.frame_s)))
        f1 = min(total, int(math.ceil((utt.end_s - span_start_s) / self.frame_s)))
        if f1 <= f0:
            raise AlignmentError(
                f"no audio for {utt.start_s:.3f}-{utt.end_s:.3f} s (the media ends at {span_start_s + total * self.frame_s:.3f} s)"
            )
        per_word = [self.vocab.encode_word(w) for w in utt.words]
        present = [i for i, toks in enumerate(per_word) if toks]
        if not present:
            raise AlignmentError("no word has characters the model knows; left unaligned")
        sep = self.vocab.separator
        targets: list[int] = []
        for k, i in enumerate(present):
            if k and sep is not None:
                targets.append(sep)
            targets.extend(per_word[i])
        frames = f1 - f0
        if min_frames(targets) > frames and sep is not None:
            # Not enough frames to emit a delimiter between words: align the letters alone.
            targets = [t for i in present for t in per_word[i]]
            sep = None
        if min_frames(targets) > frames:
            raise AlignmentError(
                f"{min_frames(targets)} frames needed for {len(targets)} characters but the utterance "
                f"has {frames} frames ({frames * self.frame_s:.2f} s); check its bullet"
            )
        path, scores = forced_align_best(em[f0:f1], targets, blank=self.vocab.blank)
        spans = merge_tokens(path, scores, blank=self.vocab.blank)
        if sep is not None:
            bounds = word_frames(spans, targets, sep)
        else:
            bounds, pos = [], 0
            for i in present:
                group = spans[pos : pos + len(per_word[i])]
                bounds.append((group[0].start, group[-1].end))
                pos += len(per_word[i])
        words: list[tuple[float, float] | None] = [None] * len(utt.words)
        base = span_start_s + f0 * self.frame_s
        for i, (a, b) in zip(present, bounds):
            words[i] = (round(base + a * self.frame_s, 4), round(base + b * self.frame_s, 4))
        return UttResult(utt.index, words)

    def transcribe_words(self, audio: np.ndarray, offset_s: float) -> list[tuple[str, float, float]]:
        """Greedy CTC transcript as (lower-case word, start, end) in absolute seconds."""
        em = self.emissions(audio)
        words: list[tuple[str, float, float]] = []
        chars: list[str] = []
        start = end = 0
        for span in greedy_decode(em, blank=self.vocab.blank):
            tok = self.vocab.id_to_token.get(span.token, "")
            if span.token == self.vocab.separator or tok in ("", " "):
                if chars:
                    words.append(("".join(chars).lower(), offset_s + start * self.frame_s, offset_s + end * self.frame_s))
                chars = []
                continue
            if span.token not in self.vocab.token_ids:
                continue  # <unk>, <s>, </s>: nothing spoken
            if not chars:
                start = span.start
            chars.append(tok)
            end = span.end
        if chars:
            words.append(("".join(chars).lower(), offset_s + start * self.frame_s, offset_s + end * self.frame_s))
        return [(w, round(s, 4), round(e, 4)) for w, s, e in words]


def feature_map_bytes_per_second(config: Any, dtype: str, sample_rate: int = 16000) -> int:
    """One second of the first conv layer's output, the largest buffer per second of a span: the
    ``auto`` mmap threshold, below which a file's span-sized buffers are mapped whole."""
    channels = int((getattr(config, "conv_dim", None) or (512,))[0])
    stride = int((getattr(config, "conv_stride", None) or (5,))[0])
    width = 4 if dtype == "fp32" else 2
    return max(64 * 1024, channels * (sample_rate // max(1, stride)) * width)


class Wav2VecEngine(AlignerEngine):
    """A worker's wav2vec2 CTC aligner and the file-level driver around it."""

    name = "wav2vec"

    def __init__(self, options: dict[str, Any]) -> None:
        opts = dict(options or {})
        self.model = str(opts.get("model") or DEFAULT_MODEL)
        self.device = str(opts.get("device") or "cpu")
        dtype = str(opts.get("dtype") or "fp32").lower()
        if dtype not in ("fp32", "bf16", "fp16"):
            raise BootError(f"unknown dtype {dtype!r} for wav2vec; use fp32 or bf16")
        span = float(opts.get("span_seconds") or 30.0)
        if span <= 0:
            raise BootError(f"span_seconds must be positive, got {span:g}")
        threads = opts.get("threads")
        configure_threads(int(threads) if threads else None)
        self.cache_dir = opts.get("cache_dir")
        self.aligner = Wav2VecAligner.load(
            self.model,
            device=self.device,
            dtype=dtype,
            int8=bool(opts.get("int8", False)),
            share_weights=bool(opts.get("share_weights", True)),
            threads=int(threads) if threads else None,
            max_span_s=span,
        )
        if opts.get("mmap_threshold") == "auto":
            pin_mmap_threshold(feature_map_bytes_per_second(self.aligner.hf.config, dtype))
        self.aligner.warm_up()
        self.release()
