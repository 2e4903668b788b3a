"""Whisper forced alignment: cross-attention of the alignment heads, then DTW from tokens to frames.

The encoder runs once per span (padded to Whisper's 30 s window). The span's utterances are then
teacher-forced through the decoder as one text in time order, because Whisper's decoder expects the
transcript of everything it hears from the start of its window. Only the alignment heads'
cross-attention is kept: the full ``model(..., output_attentions=True)`` call would also return
every encoder self-attention map, which roughly doubles the peak. Each utterance's rows are cut to
the frames of its own bullet, renormalised over them, z-scored, median-filtered and averaged over
heads; a DTW path through the negated matrix gives each token its frames. The row that predicts a
token attends most to the token's beginning, so the path changes rows about half a token early; each
token's start is read instead where its row's attention rises to its peak inside those frames (the
leading half-maximum edge), where the attention has peaks to read. Words start at their first
token's onset and end where the next word (or the end of text) starts, and word boundaries next to
a pause move onto it, since DTW otherwise hands the pause to one of the neighbouring words (an
utterance's last word that ends in sound runs on to the pause after it: the end-of-text row rises
while a soft ending still sounds). A path
that squeezes words into a sliver of the bullet is re-run on a better-conditioned matrix; a word
longer than it can be said is cut to where its own attention lies.
Every step around the plain cross-attention + DTW is a :class:`Steps` flag, measured on and off by
``bench/alignment_accuracy.py --ablation``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import re
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch

from worker.align import SpanAligner, UttRequest, UttResult
from worker.engines.base import AlignerEngine, BootError
from worker.engines.dtw import dtw_path
from worker.engines.loading import DTYPES, configure_threads, load_pretrained, load_processor
from worker.engines.plausibility import (frame_levels, longest_word_s, quiet_frames, squeezed_run, stretched, weight,
                                         written_without_spaces)
from worker.selfmem import pin_mmap_threshold

SAMPLE_RATE = 16000
WINDOW_S = 30.0  # Whisper's fixed input window
FRAME_S = 0.02  # one encoder frame (two 10 ms mel frames)
SAMPLES_PER_FRAME = int(SAMPLE_RATE * FRAME_S)
ENCODE_BATCH = 8  # windows a model server encodes in one pass (see WhisperAligner.prepare_spans)
MEDIAN_WIDTH = 7
MIN_PAUSE_S = 0.1  # a quiet run this long between words is a pause a boundary may snap to
SNAP_S = 0.2  # how far a DTW word boundary may move onto a pause
MAX_NEW_TOKENS = 224  # a 30 s window holds far fewer words; stops runaway repetition early
DEFAULT_MODEL = "openai/whisper-base"
PRIOR_WEIGHT = 1.0  # squeeze repair: how hard the re-run path is pulled towards even speech
PRIOR_WIDTH = 0.25  # ... and how far from it (a share of the utterance) it may stray for free-ish
# Alignment heads whose rows were measured to peak at a token's beginning (40-60 ms into it), so that
# its onset is where the row's attention rises: Whisper base's. tiny.en's heads peak about 190 ms into
# a token (the path's entries already come late there), so the onset reading would move starts later
# still: off for it and for any model not measured.
ONSET_HEADS = {((3, 1), (4, 2), (4, 3), (4, 7), (5, 1), (5, 2), (5, 4), (5, 6))}
PEAKED = 4.0  # onsets are read only where a token's attention peaks at this many times a flat row's
CONTEXT_AFTER_S = 1.0  # audio past a bullet's end the DTW may run into (human bullets often end early)


@dataclass(frozen=True)
class Steps:
    """What runs around plain per-utterance cross-attention + DTW. Each step is measured on and off
    on real and synthetic speech (``bench/alignment_accuracy.py --ablation``); one is on by default
    only where it does not cost accuracy on real speech."""

    # a token starts at its row's attention onset, not where the DTW path enters the row; None: where
    # the model's alignment heads are known to peak at a token's beginning (ONSET_HEADS)
    onsets: bool | None = None
    joint: bool = False  # force a span's utterances together from its window start, not each alone
    snap_pauses: bool = True  # a word boundary near a pause moves onto the pause
    trim_quiet: bool = False  # quiet frames at a word's edges are cut off it (off: a stop's closure is quiet but part of its word)
    repair_squeezed: bool = True  # a path that piles words into a sliver is re-run with a prior
    repair_stretched: bool = True  # a word longer than it can be said is cut to where its attention lies
    retry_sparse: bool = True  # timing recovery retries halves of a window that heard too few words
    refine_recovered: bool = True  # recovered utterance times refined by forcing the transcript's words
    share_pauses: bool = False  # refined recovered spans reach to mid-pause where the audio has pauses to find
    place_in_gaps: bool = True  # recovered utterances the refining did not place get the gap between placed ones
    gaps_by_sound: bool = True  # that gap (and interpolation's) shared by where its sound is, cut at pauses, not by characters
    run_on: bool = True  # an utterance's last word that ends in sound runs on to the pause after it
    median_width: int = MEDIAN_WIDTH  # median filter over time on the attention (1: none)
    renormalize: bool = True  # each token's attention rescaled over the utterance's own frames
    context_after: bool = False  # the DTW runs on past the bullet's end; words it puts there are untimed
    span_floor: bool = True  # an utterance aligned alone reads its pauses against its span's floor, not its own

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "Steps":
        """The engine options that name a step (``joint``, ``snap_pauses``, ...) override its default."""
        given = {f.name: options[f.name] for f in fields(cls) if options.get(f.name) is not None}
        try:
            return replace(cls(), **{k: int(v) if k == "median_width" else
                                     None if k == "onsets" and str(v).strip().lower() == "auto" else _flag(v)
                                     for k, v in given.items()})
        except ValueError as exc:
            raise BootError(f"whisper option: {exc}") from None


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {value!r}")
    return bool(value)

# ISO 639-3 codes used in CHAT headers -> Whisper language codes.
_ISO3 = {
    "eng": "en", "fra": "fr", "spa": "es", "deu": "de", "ita": "it", "por": "pt", "nld": "nl",
    "jpn": "ja", "zho": "zh", "cmn": "zh", "yue": "zh", "kor": "ko", "rus": "ru", "pol": "pl",
    "tur": "tr", "ara": "ar", "heb": "he", "hun": "hu", "fin": "fi", "swe": "sv", "dan": "da",
    "nor": "no", "ell": "el", "cat": "ca", "ces": "cs", "ron": "ro", "ind": "id", "tha": "th",
    "hrv": "hr", "srp": "sr", "bos": "bs", "slv": "sl", "slk": "sk", "ukr": "uk", "bul": "bg",
    "eus": "eu", "glg": "gl", "cym": "cy", "isl": "is", "lit": "lt", "lav": "lv", "est": "et",
    "vie": "vi", "msa": "ms", "hin": "hi", "fas": "fa", "afr": "af", "swa": "sw", "tgl": "tl",
    # languages Whisper has no token for: the closest one it knows (Venetian and Friulian are
    # written and sound much like Italian)
    "vec": "it", "fur": "it", "nan": "zh", "hak": "zh", "wuu": "zh",
}


def median_filter(x: torch.Tensor, width: int = MEDIAN_WIDTH) -> torch.Tensor:
    """Median over the last axis with reflected edges; too-short inputs are returned unchanged."""
    pad = width // 2
    if width <= 1 or x.shape[-1] <= pad:
        return x
    shape = x.shape
    flat = x.reshape(-1, 1, shape[-1])
    flat = torch.nn.functional.pad(flat, (pad, pad), mode="reflect")
    return flat.unfold(-1, width, 1).median(dim=-1).values.reshape(shape)


def first_frames(matrix: np.ndarray) -> np.ndarray:
    """For each row of a token x frame score matrix, the frame where the DTW path enters it."""
    rows, cols = dtw_path(-matrix)
    starts = np.zeros(matrix.shape[0], dtype=np.int64)
    seen = np.zeros(matrix.shape[0], dtype=bool)
    for r, c in zip(rows, cols):
        if not seen[r]:
            starts[r] = c
            seen[r] = True
    return starts


def attention_matrix(weights: torch.Tensor, width: int = MEDIAN_WIDTH, renormalize: bool = True) -> np.ndarray:
    """heads x tokens x frames cross-attention -> tokens x frames score.

    With ``renormalize`` each token's attention is first rescaled to sum to one over the frames
    kept (the softmax restricted to the utterance's audio, as Whisper's own word timing computes
    it), so a token that mostly attends to the padding after the audio does not fade out. Each
    head is then standardised over the tokens at every frame (so a frame that every token attends
    to stops standing out), median-filtered along time, and the heads are averaged.
    """
    w = weights.float()
    if renormalize:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-12)
    std, mean = torch.std_mean(w, dim=-2, keepdim=True, unbiased=False)
    w = (w - mean) / (std + 1e-8)
    w = median_filter(w, width)
    return w.mean(dim=0).cpu().numpy()


def attention_level(weights: torch.Tensor, width: int = MEDIAN_WIDTH, renormalize: bool = True) -> np.ndarray:
    """heads x tokens x frames cross-attention -> tokens x frames attention itself (not standardised
    over the tokens as :func:`attention_matrix` is): each token's share of attention per frame,
    averaged over heads and median-filtered along time. :func:`onset_frames` reads peaks from it."""
    w = weights.float()
    if renormalize:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-12)
    return median_filter(w.mean(dim=0), width).cpu().numpy()


def peaked(level: np.ndarray) -> bool:
    """Whether an utterance's attention has peaks to read onsets from: its rows' peaks, in the
    median, stand ``PEAKED`` times above the level of attention spread evenly over its frames.
    Clean speech gives about 10-12 times; noisy, far-field or overlapped speech may give 2-3 times
    (attention nearly flat), where a peak's edge says little about where the token starts."""
    n, m = level.shape
    return n > 0 and float(np.median(level.max(axis=1))) * m >= PEAKED


def onset_frames(level: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Each row's onset: the leading half-maximum edge of its attention peak inside the frames the
    DTW path gave it (``starts``: the frame where the path enters each row).

    The row that predicts a token attends most to the beginning of that token (what the decoder
    needs to tell which token comes next), not evenly over it. A DTW path hands each frame to the
    row that attends to it most, so the boundary between two rows falls about midway between their
    peaks: half the previous token early. Where the attention rises to its peak is where the token
    starts: the first frame, walking back from the peak, still above half way from the row's median
    level to its peak. It never goes back past the previous row's peak, and onsets stay in order.
    A row whose attention does not peak inside its own frames (its most there is only the rising or
    falling flank of a peak elsewhere: a predictable short word whose row looks at its neighbour)
    has no onset of its own to read and keeps the path's entry."""
    n, m = level.shape
    out = np.asarray(starts, dtype=np.int64).copy()
    prev_peak = -1
    for r in range(n):
        a = int(min(max(starts[r], 0), m - 1))
        b = int(starts[r + 1]) if r + 1 < n else m
        b = min(max(b, a + 1), m)
        row = level[r]
        p = a + int(np.argmax(row[a:b]))
        if (p > 0 and row[p - 1] > row[p]) or (p + 1 < m and row[p + 1] > row[p]):
            out[r] = max(a, prev_peak + 1) if r else a
            prev_peak = max(prev_peak, a)
            continue
        floor = float(np.median(row))
        half = floor + 0.5 * (float(row[p]) - floor)
        f = p
        while f - 1 > prev_peak and row[f - 1] > half:
            f -= 1
        out[r] = f
        prev_peak = p
    return np.maximum.accumulate(out)


def first_frames_prior(matrix: np.ndarray, weights: list[int], strength: float = PRIOR_WEIGHT,
                       width: float = PRIOR_WIDTH, inside: int | None = None) -> np.ndarray:
    """:func:`first_frames` on a better-conditioned matrix: each row is pulled towards where even
    speech would put it (rows spread over the frames in proportion to ``weights``, one per row).

    A DTW path through weak or diffuse attention can stay on one row for most of the frames and
    then pile the remaining rows into the last few; the prior makes that path cost what it should
    (a quadratic penalty on the distance from the even position, in shares of the utterance) while
    clear attention still wins over it. Only the first ``inside`` columns (all by default) are the
    utterance's own; the rest is context after it, which the prior counts as beyond its end."""
    n, m = matrix.shape
    w = np.asarray(weights, dtype=np.float64)
    centre = (np.cumsum(w) - w / 2) / max(w.sum(), 1e-9)  # expected middle of each row, 0..1
    cols = (np.arange(m) + 0.5) / (inside or m)
    penalty = strength * ((cols[None, :] - centre[:, None]) / width) ** 2
    return first_frames(matrix - penalty)


def quiet_runs(quiet: np.ndarray, min_frames: int) -> list[tuple[int, int]]:
    """Runs [a, b) of at least ``min_frames`` consecutive quiet frames."""
    runs = []
    padded = np.concatenate(([False], quiet, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    for a, b in zip(edges[::2], edges[1::2]):
        if b - a >= min_frames:
            runs.append((int(a), int(b)))
    return runs


def word_frames(bounds: list[int], quiet: np.ndarray, lo: int = 0, hi: int | None = None, *,
                snap: bool = True, trim: bool = True, run_on: bool = False) -> list[tuple[int, int]]:
    """Frame ranges of consecutive words from DTW word starts (``bounds[-1]`` ends the last word).

    DTW makes words contiguous, so a pause goes to one of the words around it and the boundary
    can land a little inside a neighbour. A boundary with a pause (at least ``MIN_PAUSE_S``) within
    ``SNAP_S`` of it moves onto that pause: the earlier word ends where the pause starts and the
    later one starts where it ends; the first word starts after a pause under its start and the
    last word ends before a pause under its end. Quiet frames left at either edge of a word are
    trimmed (``trim``). The
    result is ordered and disjoint inside [lo, hi), each word one frame or more where there is room.
    ``snap`` and ``trim`` turn the pause snapping and the edge trimming off (see :class:`Steps`).
    """
    n = len(bounds) - 1
    starts = [int(b) for b in bounds[:-1]]
    ends = [max(int(b), starts[i] + 1) for i, b in enumerate(bounds[1:])]
    runs = quiet_runs(quiet, max(1, round(MIN_PAUSE_S / FRAME_S))) if snap else []
    snap = round(SNAP_S / FRAME_S)
    for k in range(1, n):
        b = bounds[k]
        best = None
        for ra, rb in runs:
            if ra <= starts[k - 1] or rb >= ends[k]:
                continue
            dist = max(ra - b, b - rb, 0)
            if dist <= snap and (best is None or (dist, ra - rb) < best[0]):
                best = ((dist, ra - rb), ra, rb)
        if best is not None:
            ends[k - 1], starts[k] = best[1], best[2]
    # The utterance's outer edges border the pauses around it and have no neighbouring word to
    # snap to: DTW hands a leading or trailing pause to the first or last word (seconds of it, in
    # a window opened on a loose bullet). The first word starts where a pause under its start
    # ends, the last word ends where a pause under its end starts.
    if runs and n:
        for ra, rb in runs:
            if ra <= starts[0] < rb and rb < ends[0]:
                starts[0] = rb
            if ra < ends[-1] <= rb and ra > starts[-1]:
                ends[-1] = ra
        # The row that predicts the end of text rises while the last word is still sounding (a
        # soft, decaying utterance end): a last word that ends in sound runs on to the pause after it.
        if run_on:
            after = [ra for ra, _ in runs if ra >= ends[-1]]
            if after and (ends[-1] >= len(quiet) or not quiet[ends[-1]]):
                ends[-1] = max(ends[-1], after[0])
    trimmed = []
    for a, b in zip(starts, ends):
        b = max(b, a + 1)
        while trim and a < b - 1 and a < len(quiet) and quiet[a]:
            a += 1
        while trim and b - 1 > a and b - 1 < len(quiet) and quiet[b - 1]:
            b -= 1
        trimmed.append([a, b])
    # DTW may give several tokens one frame: push words apart forwards, then pull back from hi.
    hi = max(bounds[-1], lo + 1) if hi is None else hi
    prev = lo
    for pair in trimmed:
        pair[0] = max(pair[0], prev)
        pair[1] = max(pair[1], pair[0] + 1)
        prev = pair[1]
    nxt = hi
    for pair in reversed(trimmed):
        pair[1] = min(pair[1], nxt)
        pair[0] = min(pair[0], max(pair[1] - 1, lo))
        nxt = pair[0]
    return [(a, b) for a, b in trimmed]


def whisper_language(code: str | None) -> str | None:
    """A Whisper language code for a CHAT (ISO 639-3) or Whisper code; None means English."""
    if not code:
        return None
    code = code.strip().lower()
    return _ISO3.get(code, code)


class WhisperAligner(SpanAligner):
    """Forced alignment of known words with a Whisper model held for the worker's life."""

    name = "whisper"

    def __init__(self, model, processor, *, model_name: str, dtype: str = "fp32",
                 language: str | None = None, max_span_s: float = WINDOW_S,
                 steps: Steps | None = None) -> None:
        self.hf = model.eval()
        self.steps = steps or Steps()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.model = model_name
        self.dtype = dtype
        self.max_span_s = min(float(max_span_s), WINDOW_S)
        param = next(model.parameters())
        self.device = param.device
        # int8 dynamic quantisation keeps float activations: feed float32 then.
        self._feat_dtype = param.dtype if param.dtype.is_floating_point else torch.float32
        gen = model.generation_config
        cfg = model.config
        self.eot = int(gen.eos_token_id if gen.eos_token_id is not None else cfg.eos_token_id)
        self.language = whisper_language(language)
        self._fixed_language = self.language is not None  # the engine option wins over @Languages
        self.candidates: list[str] = []  # the transcript's languages when it names several
        self.last_languages: dict[int, str] = {}  # utterance index -> language it was forced in
        self.prefix = self._prefix(gen, cfg)
        self.max_tokens = int(cfg.max_target_positions)
        self.heads = self._alignment_heads(gen, cfg)
        self.onset_heads = tuple(self.heads) in ONSET_HEADS
        self._eager_cross_attention({layer for layer, _ in self.heads})
        self._prepared: dict[bytes, tuple[torch.Tensor, int]] = {}  # see prepare_spans

    @classmethod
    def load(cls, model_id: str = DEFAULT_MODEL, *, device: str = "cpu", dtype: str = "fp32",
             int8: bool = False, share_weights: bool = True, threads: int | None = None,
             language: str | None = None, max_span_s: float = WINDOW_S,
             steps: Steps | None = None) -> "WhisperAligner":
        """Load model and processor; anything that stops them loading is a BootError."""
        from transformers import WhisperForConditionalGeneration, WhisperProcessor  # noqa: PLC0415

        dtype = str(dtype or "fp32").lower()
        if dtype not in DTYPES:
            raise BootError(f"unknown dtype {dtype!r} for whisper; use fp32 or bf16")
        model = load_pretrained(
            WhisperForConditionalGeneration, model_id, device=device, dtype=dtype,
            quantize_int8=int8, share_weights=share_weights, threads=threads,
        )
        processor = load_processor(WhisperProcessor, model_id)
        try:
            return cls(model, processor, model_name=model_id, dtype=dtype, language=language,
                       max_span_s=max_span_s, steps=steps)
        except (KeyError, ValueError, AttributeError, TypeError) as exc:
            raise BootError(f"cannot load model {model_id!r}: not a usable Whisper model ({exc})") from None

    def use_onsets(self) -> bool:
        """Whether word starts are read at the attention onsets (``Steps.onsets``; by default where
        the model's alignment heads are known to peak at a token's beginning)."""
        return self.steps.onsets if self.steps.onsets is not None else self.onset_heads

    def use_languages(self, codes: list[str]) -> None:
        """Every ``@Languages`` code of the next transcript. With two or more that the model knows
        (a code-switched conversation), each window is forced in whichever of them Whisper's own
        language identification prefers for its audio (:meth:`detect_language`); with one, that one
        is used throughout."""
        self.last_languages = {}
        self.candidates = []
        if self._fixed_language or not getattr(self.hf.generation_config, "is_multilingual", False):
            return
        known = getattr(self.hf.generation_config, "lang_to_id", None) or {}
        wanted = []
        for code in codes:
            lang = whisper_language(code)
            if lang and f"<|{lang}|>" in known and lang not in wanted:
                wanted.append(lang)
        self.candidates = wanted if len(wanted) > 1 else []

    def detect_language(self, enc: torch.Tensor) -> str:
        """Which of :attr:`candidates` the model hears in an encoded window: the language token
        with the highest logit after the start-of-transcript token, among those only."""
        lang_ids = self.hf.generation_config.lang_to_id
        out = self.hf.model.decoder(input_ids=torch.tensor([self.prefix[:1]], device=self.device),
                                    encoder_hidden_states=enc, use_cache=False)
        logits = self.hf.proj_out(out.last_hidden_state[0, -1]).float()
        return max(self.candidates, key=lambda c: float(logits[int(lang_ids[f"<|{c}|>"])]))

    def prefix_for(self, language: str | None) -> list[int]:
        """The decoder prompt for ``language`` (the file's own one when None)."""
        if language is None or language == (self.language or "en"):
            return self.prefix
        prefix = list(self.prefix)
        prefix[1] = int(self.hf.generation_config.lang_to_id[f"<|{language}|>"])
        return prefix

    def use_language(self, code: str | None) -> None:
        """Condition the decoder on the transcript's language, unless the engine was given one; a
        language the model does not know keeps the previous one rather than failing the file."""
        if self._fixed_language or not getattr(self.hf.generation_config, "is_multilingual", False):
            return
        wanted = whisper_language(code) or "en"
        if wanted == (self.language or "en"):
            return
        previous, self.language = self.language, wanted
        try:
            self.prefix = self._prefix(self.hf.generation_config, self.hf.config)
        except ValueError:
            self.language = previous

    # -- setup -------------------------------------------------------------------------------

    def _prefix(self, gen, cfg) -> list[int]:
        sot = int(gen.decoder_start_token_id if gen.decoder_start_token_id is not None
                  else cfg.decoder_start_token_id)
        no_ts = gen.no_timestamps_token_id
        if no_ts is None:
            no_ts = self.tokenizer.convert_tokens_to_ids("<|notimestamps|>")
        prefix = [sot]
        if getattr(gen, "is_multilingual", False):
            lang = self.language or "en"
            lang_ids = getattr(gen, "lang_to_id", None) or {}
            token = f"<|{lang}|>"
            if token not in lang_ids:
                raise ValueError(f"language {lang!r} unknown to the model")
            prefix += [int(lang_ids[token]), int(gen.task_to_id["transcribe"])]
        prefix.append(int(no_ts))
        return prefix

    @staticmethod
    def _alignment_heads(gen, cfg) -> list[tuple[int, int]]:
        """The model's alignment heads, or every head of the last half of the decoder layers."""
        heads = getattr(gen, "alignment_heads", None)
        if heads:
            return [(int(layer), int(head)) for layer, head in heads]
        n_layers, n_heads = cfg.decoder_layers, cfg.decoder_attention_heads
        return [(layer, head) for layer in range(n_layers // 2, n_layers) for head in range(n_heads)]

    def _eager_cross_attention(self, layers: set[int]) -> None:
        """Make only the alignment layers' cross-attention produce weights, and keep only those.

        SDPA kernels never return attention weights, and switching the whole model to eager
        attention would also materialise the encoder's 1500 x 1500 maps. The attention modules read
        their implementation from their own ``config``, so the alignment layers' cross-attention
        gets a private copy set to eager; a forward hook on each keeps just the alignment heads'
        rows while a capture is open, so nothing else is retained.
        """
        self._captured: dict[int, torch.Tensor] | None = None
        by_layer: dict[int, list[int]] = {}
        for layer, head in self.heads:
            by_layer.setdefault(layer, []).append(head)
        decoder_layers = self.hf.model.decoder.layers
        for idx in sorted(layers):
            if idx >= len(decoder_layers):
                raise ValueError(f"alignment head in layer {idx} of a {len(decoder_layers)}-layer decoder")
            module = decoder_layers[idx].encoder_attn
            cfg = copy.copy(module.config)
            cfg._attn_implementation = "eager"
            module.config = cfg
            module.register_forward_hook(self._keep_heads(idx, by_layer[idx]))

    def _keep_heads(self, layer: int, heads: list[int]):
        index = torch.tensor(heads)

        def hook(_module, _args, output):
            if self._captured is not None:
                weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
                if weights is None:
                    raise RuntimeError(f"decoder layer {layer} returned no cross-attention weights")
                self._captured[layer] = weights[0].index_select(0, index.to(weights.device))

        return hook

    # -- model passes --------------------------------------------------------------------------

    def prepare_spans(self, spans: list[tuple[np.ndarray, float, list[UttRequest]]]) -> int:
        """Encode the windows these spans will start with (``(audio, span_start_s, utts)`` as for
        ``align_span``) in as few encoder passes as the batch allows (a model server's batch: the
        encoder is most of the work, and one pass over a batch keeps a GPU busy where one window
        at a time leaves it idle); ``align_span`` on the same samples then takes its states from
        here. Returns how many windows were encoded together."""
        limit = int(WINDOW_S * SAMPLE_RATE)
        wins: list[np.ndarray] = []
        for audio, span_start_s, utts in spans:
            audio = np.asarray(audio, dtype=np.float32).reshape(-1)
            if self.steps.joint and len(audio) <= limit:
                wins.append(audio)  # the span's first window starts at the span
            elif not self.steps.joint:
                wins += [audio[ab[0]:ab[1]] for u in utts if (ab := self._alone_bounds(len(audio), span_start_s, u))]
        wins = [w for w in wins if 0 < len(w) <= limit]
        if len(wins) < 2:
            return 0
        # At most ENCODE_BATCH windows per pass: the encoder's transient activations grow with the
        # batch (large-v2's feed-forward layer: about 15 MiB per fp16 window), the weights do not.
        for k in range(0, len(wins), ENCODE_BATCH):
            part = wins[k:k + ENCODE_BATCH]
            feats = self.processor.feature_extractor(part, sampling_rate=SAMPLE_RATE,
                                                     return_tensors="pt").input_features
            with torch.inference_mode():
                enc = self.hf.model.encoder(feats.to(self.device, self._feat_dtype)).last_hidden_state
            for i, w in enumerate(part):
                self._prepared[_digest(w)] = (enc[i:i + 1], min(enc.shape[1], -(-len(w) // SAMPLES_PER_FRAME)))
        return len(wins)

    def drop_prepared(self) -> None:
        """Forget windows encoded ahead that no span used (its request failed first)."""
        self._prepared.clear()

    def _encode(self, audio: np.ndarray) -> tuple[torch.Tensor, int]:
        """Encoder states of one <= 30 s window, and how many 20 ms frames hold real audio."""
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        n = min(len(audio), int(WINDOW_S * SAMPLE_RATE))
        if self._prepared and (hit := self._prepared.pop(_digest(audio[:n]), None)) is not None:
            return hit
        feats = self.processor.feature_extractor(
            audio[:n], sampling_rate=SAMPLE_RATE, return_tensors="pt"
        ).input_features
        feats = feats.to(self.device, self._feat_dtype)
        enc = self.hf.model.encoder(feats).last_hidden_state
        n_frames = min(enc.shape[1], -(-n // SAMPLES_PER_FRAME))
        return enc, n_frames

    def _cross_attention(self, enc: torch.Tensor, tokens: list[int],
                         prefix: list[int] | None = None) -> torch.Tensor:
        """Alignment heads' cross-attention of the rows that predict each text token and then the
        end of text: heads x (tokens + 1) x encoder frames, from one teacher-forced decoder pass
        after ``prefix`` (the file's own prompt by default)."""
        prefix = prefix or self.prefix
        ids = prefix + tokens + [self.eot]
        if len(ids) > self.max_tokens:
            raise ValueError(f"{len(tokens)} tokens exceed the decoder's {self.max_tokens}")
        inp = torch.tensor([ids], device=self.device)
        self._captured = {}
        try:
            self.hf.model.decoder(input_ids=inp, encoder_hidden_states=enc, use_cache=False)
            captured = self._captured
        finally:
            self._captured = None
        # Input position p predicts token p+1: the rows that predict the text tokens and the
        # end-of-text start at the last prefix position.
        r0 = len(prefix) - 1
        rows = slice(r0, r0 + len(tokens) + 1)
        slot: dict[int, int] = {}
        picked = []
        for layer, _head in self.heads:
            k = slot.get(layer, 0)
            slot[layer] = k + 1
            picked.append(captured[layer][k, rows])
        return torch.stack(picked)

    def _generation_config(self, language: str | None = None):
        """Greedy, no timestamps, prompt set by language and task alone (no legacy forced ids)."""
        gen = copy.deepcopy(self.hf.generation_config)
        gen.forced_decoder_ids = None
        gen.max_length = None
        gen.max_new_tokens = min(self.max_tokens - len(self.prefix) - 1, MAX_NEW_TOKENS)
        gen.num_beams = 1
        gen.do_sample = False
        gen.return_timestamps = False
        if getattr(gen, "is_multilingual", False):
            gen.language = language or self.language or "en"
            gen.task = "transcribe"
        return gen

    def _word_tokens(self, words: list[str]) -> list[list[int]]:
        """Token ids per word, each word encoded on its own so word boundaries fall on token
        boundaries. Words are space-separated as Whisper writes them, except words of scripts
        written without spaces (Chinese, Cantonese, Japanese): those follow the previous word
        directly, as in Whisper's own transcripts of such speech, and each transcript word is
        timed as the transcript splits it."""
        out = []
        for k, w in enumerate(words):
            w = w.strip()
            glued = k > 0 and written_without_spaces(w[:1]) and written_without_spaces(words[k - 1].strip()[-1:])
            first = k == 0 and written_without_spaces(w[:1])
            out.append(self.tokenizer.encode(w if glued or first else " " + w, add_special_tokens=False))
        return out

    # -- SpanAligner -------------------------------------------------------------------------

    def align_span(self, audio: np.ndarray, span_start_s: float,
                   utts: list[UttRequest]) -> list[UttResult]:
        """Word times (absolute seconds) for each utterance, each kept inside its own bullet.

        By default each utterance is aligned alone, its bullet's audio encoded as a window of its
        own (with word starts read at the attention onsets this placed the real recordings' word
        boundaries and recovered utterances better than forcing a span together). With
        ``Steps.joint`` a span that fits Whisper's window is encoded once and its utterances forced
        together in time order from the window's start, as Whisper's decoder expects the text of
        everything it hears from there; utterances past the decoder's token budget start a new
        window. An utterance longer than the window is aligned piece by piece either way.
        """
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        done: dict[int, UttResult] = {}
        with torch.inference_mode():
            if self.steps.joint and len(audio) <= WINDOW_S * SAMPLE_RATE:
                todo = list(utts)
                start = span_start_s
                while todo:
                    a = max(0, int(round((start - span_start_s) * SAMPLE_RATE)))
                    window = self._window(audio[a:], span_start_s + a / SAMPLE_RATE)
                    results, todo = window.align_many(todo)
                    del window
                    done.update((r.index, r) for r in results)
                    if todo:
                        start = min(u.start_s for u in todo)
            else:
                # each utterance's pauses are read against the span's floor, not its own audio's
                ref = frame_levels(audio, SAMPLE_RATE) if self.steps.span_floor else None
                for utt in utts:
                    done[utt.index] = self._guarded(lambda u: self._align_alone(audio, span_start_s, u, ref), utt)
        return [done[u.index] for u in utts]

    def _align_alone(self, audio: np.ndarray, span_start_s: float, utt: UttRequest,
                     reference: np.ndarray | None = None) -> UttResult:
        """One utterance in a window that starts at its bullet and holds only its audio."""
        if utt.end_s - utt.start_s > WINDOW_S:
            return self._align_long(audio, span_start_s, utt)
        ab = self._alone_bounds(len(audio), span_start_s, utt)
        if ab is None:
            return UttResult(utt.index, None, error=f"utterance {utt.index} has no audio inside the span")
        a, b = ab
        window = self._window(audio[a:b], span_start_s + a / SAMPLE_RATE, reference)
        results, rest = window.align_many([utt])
        if rest:  # cannot happen for one utterance under the budget; kept for safety
            return UttResult(utt.index, None, error="no decoder pass could hold the utterance")
        return results[0]

    def _alone_bounds(self, n_samples: int, span_start_s: float, utt: UttRequest) -> tuple[int, int] | None:
        """The samples of a span that an utterance aligned alone is encoded from; None when it has
        no audio there or is longer than a window (aligned piece by piece)."""
        if utt.end_s - utt.start_s > WINDOW_S:
            return None
        a = max(0, int(round((utt.start_s - span_start_s) * SAMPLE_RATE)))
        b = min(n_samples, int(round((utt.end_s - span_start_s) * SAMPLE_RATE)))
        if b - a < SAMPLES_PER_FRAME:
            return None
        if self.steps.context_after:
            b = min(n_samples, b + int(CONTEXT_AFTER_S * SAMPLE_RATE), a + int(WINDOW_S * SAMPLE_RATE))
        return a, b

    @staticmethod
    def _guarded(fn, utt: UttRequest) -> UttResult:
        try:
            return fn(utt)
        except Exception as exc:  # one bad utterance must not sink the span
            _raise_if_out_of_memory(exc)
            return UttResult(utt.index, None, error=_one_line(exc))

    def _window(self, audio: np.ndarray, start_s: float, reference: np.ndarray | None = None) -> "_Window":
        """``reference``: the levels of the audio this piece was cut from, its pauses' yardstick."""
        enc, n_frames = self._encode(audio)
        language = self.detect_language(enc) if self.candidates else None
        quiet = quiet_frames(frame_levels(audio, SAMPLE_RATE), reference)
        return _Window(self, enc, n_frames, quiet, start_s, language)

    def _align_long(self, audio: np.ndarray, span_start_s: float, utt: UttRequest) -> UttResult:
        """An utterance of any length, one window at a time.

        Each window gets the words that should fit in it by character count, keeps the first two
        thirds of them (the last ones may really lie beyond the window) and the next window starts
        where the last kept word ends. A piece that cannot be aligned leaves its words untimed (the
        driver warns about the utterance) and the next piece starts after it.
        """
        words = list(utt.words)
        times: list[tuple[float, float] | None] = []
        errors: list[str] = []
        t = max(utt.start_s, span_start_s)
        end = min(utt.end_s, span_start_s + len(audio) / SAMPLE_RATE)
        i = 0
        while i < len(words):
            if end - t < FRAME_S:
                times += [None] * (len(words) - i)
                errors.append(f"no audio left for the last {len(words) - i} words")
                break
            win_end = min(end, t + WINDOW_S)
            rest = words[i:]
            if win_end >= end:
                take = keep = len(rest)
            else:
                chars = np.cumsum([len(w) + 1 for w in rest])
                frac = (win_end - t) / (end - t)
                take = max(1, int(np.searchsorted(chars, frac * chars[-1], side="right")))
                keep = max(1, (2 * take) // 3)
            a = int(round((t - span_start_s) * SAMPLE_RATE))
            b = int(round((win_end - span_start_s) * SAMPLE_RATE))
            try:
                window = self._window(audio[a:b], t)
                (res,), _ = window.align_many([UttRequest(utt.index, t, win_end, rest[:take])])
                del window
            except Exception as exc:  # noqa: BLE001 - this piece only
                _raise_if_out_of_memory(exc)
                res = UttResult(utt.index, None, error=_one_line(exc))
            if res.words is None:
                errors.append(f"{t:.2f}-{win_end:.2f} s: {res.error or 'no alignment'}")
                times += [None] * (take if win_end >= end else keep)
                i += take if win_end >= end else keep
                t = win_end if win_end >= end else t + (win_end - t) * keep / take
                continue
            got = res.words
            times += got[:keep]
            i += keep
            t = max(t + FRAME_S, got[keep - 1][1])
        if all(x is None for x in times):
            return UttResult(utt.index, None, error="no piece could be aligned (" + "; ".join(errors) + ")")
        return UttResult(utt.index, times, error="; ".join(errors) or None)

    def transcribe_words(self, audio: np.ndarray, offset_s: float) -> list[tuple[str, float, float]]:
        """Recognise the words of ``audio`` (30 s windows) with their times, absolute seconds."""
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        step = int(WINDOW_S * SAMPLE_RATE)
        words: list[tuple[str, float, float]] = []
        with torch.inference_mode():
            for begin in range(0, max(len(audio), 1), step):
                chunk = audio[begin:begin + step]
                if len(chunk) < SAMPLES_PER_FRAME:
                    continue
                words += self._transcribe_window(chunk, offset_s + begin / SAMPLE_RATE)
        return words

    def _transcribe_window(self, audio: np.ndarray, offset_s: float) -> list[tuple[str, float, float]]:
        """Greedy transcript of one window, then the same DTW on the generated tokens."""
        from transformers.modeling_outputs import BaseModelOutput  # noqa: PLC0415

        window = self._window(audio, offset_s)
        with _quiet_transformers():
            seq = self.hf.generate(
                encoder_outputs=BaseModelOutput(last_hidden_state=window.enc),
                generation_config=self._generation_config(window.language),
            )
        seq = seq.sequences if hasattr(seq, "sequences") else seq
        tokens = [int(t) for t in seq[0].tolist() if int(t) < self.eot]
        if not tokens:
            return []
        groups: list[list[int]] = []
        for t in tokens:
            piece = self.tokenizer.decode([t])
            # a new word at a space, and at each character of a script written without spaces
            if not groups or piece.startswith(" ") or written_without_spaces(piece[:1]):
                groups.append([t])
            else:
                groups[-1].append(t)
        weights = self._cross_attention(window.enc, tokens, window.prefix)[:, :, : window.n_frames]
        steps = self.steps
        starts = first_frames(attention_matrix(weights, steps.median_width, steps.renormalize))
        level = attention_level(weights, steps.median_width, steps.renormalize) if self.use_onsets() else None
        if level is not None and peaked(level):
            starts = onset_frames(level, starts)
        bounds = np.cumsum([0] + [len(g) for g in groups])
        frames = word_frames([int(starts[i]) for i in bounds], window.quiet, 0, window.n_frames,
                             snap=steps.snap_pauses, trim=steps.trim_quiet)
        out = []
        for g, (a, b) in zip(groups, frames):
            text = self.tokenizer.decode(g).strip()
            if text:
                out.append((text, round(offset_s + a * FRAME_S, 3), round(offset_s + b * FRAME_S, 3)))
        return out


class _Window:
    """One encoded window of audio: encoder states, real frame count and quiet frames."""

    def __init__(self, aligner: WhisperAligner, enc: torch.Tensor, n_frames: int,
                 quiet: np.ndarray, start_s: float, language: str | None = None) -> None:
        self.aligner = aligner
        self.language = language  # None: the file's own language
        self.prefix = aligner.prefix_for(language)
        self.enc = enc
        self.n_frames = n_frames
        self.quiet = quiet
        self.start_s = start_s

    def align_many(self, utts: list[UttRequest]) -> tuple[list[UttResult], list[UttRequest]]:
        """Results for the utterances whose words fit one decoder pass, and those left over.

        Utterances are forced in time order as one text; each one's DTW then runs on its own rows
        (from the row predicting its first token to the one predicting the next utterance's) and
        only over its bullet's frames. An utterance that cannot be placed gets an error result; if
        the joint pass fails, each utterance is forced alone so the others still get times.
        """
        aligner = self.aligner
        budget = aligner.max_tokens - len(aligner.prefix) - 1
        results: list[UttResult] = []
        ready: list[tuple[UttRequest, list[list[int]], int, int]] = []
        for utt in utts:
            try:
                prepared = self._prepare(utt)
            except ValueError as exc:
                results.append(UttResult(utt.index, None, error=_one_line(exc)))
                continue
            if prepared is None:
                results.append(UttResult(utt.index, []))
            else:
                ready.append(prepared)
        ready.sort(key=lambda p: (p[0].start_s, p[0].end_s))
        chunk, rest, used = [], [], 0
        for p in ready:
            n = sum(len(t) for t in p[1])
            if n > budget:
                results.append(UttResult(p[0].index, None, error=f"{n} tokens exceed the decoder's {budget}"))
            elif not rest and used + n <= budget:
                chunk.append(p)
                used += n
            else:
                rest.append(p[0])
        if chunk:
            try:
                results += self._force(chunk)
            except Exception as exc:  # noqa: BLE001 - fall back to one pass per utterance
                _raise_if_out_of_memory(exc)
                for p in chunk:
                    results.append(self.aligner._guarded(lambda _u, p=p: self._force([p])[0], p[0]))
        return results, rest

    def _prepare(self, utt: UttRequest):
        """(utt, tokens per word, first frame, end frame), or None for an utterance without words."""
        if not utt.words:
            return None
        f0 = max(0, int(round((utt.start_s - self.start_s) / FRAME_S)))
        f1 = min(self.n_frames, int(round((utt.end_s - self.start_s) / FRAME_S)))
        if f1 - f0 < 1:
            raise ValueError(f"utterance {utt.index} has no audio inside the span")
        word_toks = self.aligner._word_tokens(utt.words)
        if any(not t for t in word_toks):
            raise ValueError(f"utterance {utt.index} has a word with no tokens")
        return utt, word_toks, f0, f1

    def _force(self, chunk) -> list[UttResult]:
        """One teacher-forced pass over the chunk's words, then a DTW per utterance."""
        tokens = [t for _, word_toks, _, _ in chunk for toks in word_toks for t in toks]
        weights = self.aligner._cross_attention(self.enc, tokens, self.prefix)
        for utt, _, _, _ in chunk:
            self.aligner.last_languages[utt.index] = self.language or self.aligner.language or "en"
        results = []
        row = 0
        after = round(CONTEXT_AFTER_S / FRAME_S) if self.aligner.steps.context_after else 0
        for utt, word_toks, f0, f1 in chunk:
            n = sum(len(t) for t in word_toks)
            fx = min(self.n_frames, f1 + after)
            try:
                results.append(self._times(utt, word_toks, f0, f1, weights[:, row:row + n + 1, f0:fx]))
            except Exception as exc:  # noqa: BLE001 - this utterance only
                _raise_if_out_of_memory(exc)
                results.append(UttResult(utt.index, None, error=_one_line(exc)))
            row += n
        return results

    def _times(self, utt: UttRequest, word_toks: list[list[int]], f0: int, f1: int,
               weights: torch.Tensor) -> UttResult:
        """Word times from the DTW path, each token's start read at its attention onset where the
        model and the utterance allow it (:func:`onset_frames`, :func:`peaked`); a path that
        squeezes words into a sliver of the bullet is re-run once on a better-conditioned matrix
        (:func:`first_frames_prior`). If the words are still squeezed, the result goes back as it
        is: the driver's plausibility check reports the utterance and keeps its bullet. A word
        longer than it can be said is cut to its own attention (:meth:`_cut_stretched`).

        ``weights`` may reach past the bullet's end (``Steps.context_after``): the path is then
        not forced to cram words the speaker was still saying into the bullet's last frames, and a
        word it starts after the bullet's end is left untimed (the driver names it)."""
        steps = self.aligner.steps
        matrix = attention_matrix(weights, steps.median_width, steps.renormalize)
        level = attention_level(weights, steps.median_width, steps.renormalize) if self.aligner.use_onsets() else None

        def squeezed(times) -> bool:
            placed = [(t, w) for t, w in zip(times, utt.words) if t is not None]
            return squeezed_run([t for t, _ in placed], [w for _, w in placed]) is not None

        entries = first_frames(matrix)
        times = self._word_times(utt, word_toks, f0, f1, entries, matrix.shape[1])
        if level is not None and peaked(level):
            # Onsets are read only where the attention has peaks to read: onsets that squeeze words
            # the path's own entries did not (diffuse attention, noisy audio) are not used.
            read = self._word_times(utt, word_toks, f0, f1, onset_frames(level, entries), matrix.shape[1])
            if not squeezed(read) or squeezed(times):
                times = read
        if steps.repair_squeezed and squeezed(times):
            rows = [weight(w) / len(t) for w, t in zip(utt.words, word_toks) for _ in t] + [0.5]
            starts = first_frames_prior(matrix, rows, inside=f1 - f0)
            times = self._word_times(utt, word_toks, f0, f1, starts, matrix.shape[1])
        if steps.repair_stretched and stretched(times, utt.words):
            if level is None:
                level = attention_level(weights, steps.median_width, steps.renormalize)
            times = self._cut_stretched(utt, word_toks, f0, level, times)
        return UttResult(utt.index, times)

    def _cut_stretched(self, utt: UttRequest, word_toks: list[list[int]], f0: int, level: np.ndarray,
                       times: list[tuple[float, float] | None]) -> list[tuple[float, float] | None]:
        """Each word longer than it can be said (the path handed it a pause, or noise, of seconds)
        cut to the frames where its own tokens' attention lies: the run of its frames around their
        peak that stay above half way from the rows' median level to that peak. A word still too long after that has no
        time of its own to give: it is left untimed (the driver names it)."""
        bounds = np.cumsum([0] + [len(t) for t in word_toks])
        out = list(times)
        for k in stretched(times, utt.words):
            s, e = times[k]
            a = max(0, int(round((s - self.start_s) / FRAME_S)) - f0)
            b = min(level.shape[1], max(a + 1, int(round((e - self.start_s) / FRAME_S)) - f0))
            rows = level[bounds[k]:bounds[k + 1]]
            own = rows[:, a:b].max(axis=0)
            floor = float(np.median(rows))
            p = int(np.argmax(own))
            half = floor + 0.5 * (float(own[p]) - floor)
            lo, hi = p, p + 1
            while lo > 0 and own[lo - 1] > half:
                lo -= 1
            while hi < len(own) and own[hi] > half:
                hi += 1
            cut = (round(self.start_s + (f0 + a + lo) * FRAME_S, 3), round(self.start_s + (f0 + a + hi) * FRAME_S, 3))
            cut = (max(cut[0], s), min(cut[1], e))
            out[k] = cut if cut[1] - cut[0] <= longest_word_s(utt.words[k]) else None
        return out

    def _word_times(self, utt: UttRequest, word_toks: list[list[int]], f0: int, f1: int,
                    starts: np.ndarray, width: int | None = None) -> list[tuple[float, float] | None]:
        """Seconds per word from DTW start frames (relative to ``f0``) over ``width`` frames; a
        word starting at or past ``f1`` (in the context after the bullet) gets None."""
        steps = self.aligner.steps
        fx = f0 + (width or f1 - f0)
        bounds = np.cumsum([0] + [len(t) for t in word_toks])
        lo = max(utt.start_s, self.start_s)
        hi = min(utt.end_s, self.start_s + f1 * FRAME_S)
        frames = word_frames([f0 + int(starts[i]) for i in bounds], self.quiet, f0, fx,
                             snap=steps.snap_pauses, trim=steps.trim_quiet, run_on=steps.run_on)
        times: list[tuple[float, float] | None] = []
        for a, b in frames:
            if a >= f1 and fx > f1:
                times.append(None)
                continue
            s = min(max(round(self.start_s + a * FRAME_S, 3), lo), hi)
            e = min(max(round(self.start_s + b * FRAME_S, 3), s), hi)
            times.append((s, e))
        return times


def encoder_state_bytes(config: Any, dtype: str) -> int:
    """Half of one window's encoder states (frames x width), the ``auto`` mmap threshold: every
    per-window buffer (the states, the feed-forward and convolution maps, the cross-attention of
    a sentence) is at least this large and so is mapped and unmapped whole, while the decoder's
    per-token buffers stay on the heap."""
    frames = int(getattr(config, "max_source_positions", None) or 1500)
    width = int(getattr(config, "d_model", None) or 384)
    return max(64 * 1024, frames * width * (4 if dtype == "fp32" else 2) // 2)


class WhisperEngine(AlignerEngine):
    """A worker's Whisper aligner and the file-level driver around it."""

    name = "whisper"

    def __init__(self, options: dict[str, Any]) -> None:
        opts = dict(options or {})
        threads = int(opts["threads"]) if opts.get("threads") else None
        configure_threads(threads)
        span = float(opts.get("span_seconds") or WINDOW_S)
        if not 0 < span <= WINDOW_S:
            raise BootError(f"span_seconds must be in (0, {WINDOW_S:g}] for whisper, got {span:g}")
        self.model = str(opts.get("model") or DEFAULT_MODEL)
        self.device = str(opts.get("device") or "cpu")
        self.cache_dir = opts.get("cache_dir")
        self.aligner = WhisperAligner.load(
            self.model, device=self.device, dtype=str(opts.get("dtype") or "fp32"),
            int8=bool(opts.get("int8", False)), share_weights=bool(opts.get("share_weights", True)),
            threads=threads, language=opts.get("language"), max_span_s=span,
            steps=Steps.from_options(opts),
        )
        if opts.get("mmap_threshold") == "auto":
            pin_mmap_threshold(encoder_state_bytes(self.aligner.hf.config, str(opts.get("dtype") or "fp32")))
        self.aligner.warm_up()
        self.release()

    def run(self, job, progress):
        """The shared driver, after telling the aligner every language the transcript names (the
        driver itself passes on only the first)."""
        self.aligner.use_languages(header_languages(job.input))
        return super().run(job, progress)


def _digest(samples: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(samples).tobytes(), digest_size=16).digest() + len(samples).to_bytes(8, "big")


def header_languages(path) -> list[str]:
    """The ``@Languages`` codes of a CHAT file's header (read up to its first utterance); none when
    the file cannot be read (the driver reports that itself)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("*"):
                    break
                if line.startswith("@Languages:"):
                    return [c for c in re.split(r"[\s,]+", line.split(":", 1)[1]) if c]
    except OSError:
        pass
    return []


@contextlib.contextmanager
def _quiet_transformers():
    """Whisper's generate warns about its own legacy settings on every call; keep worker logs clean."""
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().replace("\n", " ")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _raise_if_out_of_memory(exc: BaseException) -> None:
    """Out of memory is the file's memory failure (the supervisor retries it larger), never one
    utterance's warning: let it through the per-utterance guards."""
    from worker.align import is_out_of_memory

    if is_out_of_memory(exc):
        raise exc
