"""CTC forced alignment: the best frame-level path of a known label sequence through emissions.

Plain torch, so the CPU stack works without torchaudio (whose wheels need CUDA libraries here);
``forced_align_best`` uses torchaudio's C++ kernel when it does import. The Viterbi is vectorised
over the label dimension: one small tensor step per frame, so T=3000, L=700 takes a fraction of a
second.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch

NEG_INF = float("-inf")


class AlignmentError(ValueError):
    """The labels cannot be aligned to the frames (too many labels for too few frames, none at all)."""


@dataclass(frozen=True)
class TokenSpan:
    token: int
    start: int  # first frame
    end: int  # one past the last frame
    score: float  # mean log probability over the span's frames


def min_frames(targets: Sequence[int]) -> int:
    """Frames a CTC path needs for ``targets``: one per label plus a blank between equal neighbours."""
    repeats = sum(1 for a, b in zip(targets, targets[1:]) if a == b)
    return len(targets) + repeats


def forced_align(
    log_probs: torch.Tensor, targets: Sequence[int], blank: int = 0
) -> tuple[list[int], list[float]]:
    """Viterbi over the standard CTC topology.

    Returns the token of every frame (``blank`` or a target label) and that frame's log probability,
    the same convention as ``torchaudio.functional.forced_align``.
    """
    if log_probs.dim() != 2:
        raise ValueError("log_probs must be [frames, classes]")
    targets = [int(t) for t in targets]
    T = int(log_probs.shape[0])
    L = len(targets)
    if L == 0:
        raise AlignmentError("nothing to align: no labels")
    if any(t == blank for t in targets):
        raise ValueError("targets must not contain the blank label")
    need = min_frames(targets)
    if need > T:
        raise AlignmentError(f"{need} frames needed for {L} labels but only {T} frames")

    lp = log_probs.detach().to(torch.float32).cpu()
    S = 2 * L + 1
    ext = torch.full((S,), blank, dtype=torch.long)
    ext[1::2] = torch.tensor(targets, dtype=torch.long)
    # A label may be reached from two states back when it differs from that state's label.
    skip_ok = torch.zeros(S, dtype=torch.bool)
    skip_ok[3::2] = ext[3::2] != ext[1:-2:2]
    emit = lp[:, ext]  # [T, S]

    alpha = torch.full((S,), NEG_INF)
    alpha[0] = emit[0, 0]
    alpha[1] = emit[0, 1]
    back = torch.zeros((T, S), dtype=torch.int8)
    # Elementwise maxima over preallocated buffers: a reduction over a [3, S] stack costs several
    # times more per frame than these few vector ops.
    prev1 = torch.full((S,), NEG_INF)
    prev2 = torch.full((S,), NEG_INF)
    best = torch.empty(S)
    took1 = torch.empty(S, dtype=torch.bool)
    took2 = torch.empty(S, dtype=torch.bool)
    step = torch.empty(S, dtype=torch.int8)
    no_skip = ~skip_ok
    for t in range(1, T):
        prev1[1:] = alpha[:-1]
        prev2[2:] = alpha[:-2]
        prev2.masked_fill_(no_skip, NEG_INF)
        torch.gt(prev1, alpha, out=took1)
        torch.maximum(alpha, prev1, out=best)
        torch.gt(prev2, best, out=took2)
        torch.maximum(best, prev2, out=best)
        step.copy_(took1)
        step.masked_fill_(took2, 2)
        back[t] = step
        torch.add(best, emit[t], out=alpha)

    # The path ends on the last label or the blank after it.
    if S > 1 and alpha[S - 2] > alpha[S - 1]:
        s = S - 2
    else:
        s = S - 1
    if alpha[s] == NEG_INF:
        raise AlignmentError("no valid alignment")
    states = [0] * T
    back_np = back.numpy()
    for t in range(T - 1, -1, -1):
        states[t] = s
        s -= int(back_np[t, s])
    ext_list = ext.tolist()
    path = [ext_list[st] for st in states]
    frame_scores = lp[torch.arange(T), torch.tensor(path)].tolist()
    return path, frame_scores


@functools.lru_cache(maxsize=1)
def _torchaudio_forced_align():
    try:
        import torchaudio.functional as taf  # noqa: PLC0415 - optional; fails without CUDA libs here

        return taf.forced_align
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None


def torchaudio_available() -> bool:
    return _torchaudio_forced_align() is not None


def forced_align_best(
    log_probs: torch.Tensor, targets: Sequence[int], blank: int = 0
) -> tuple[list[int], list[float]]:
    """torchaudio's kernel when it imports (faster), else :func:`forced_align`; same results."""
    fa = _torchaudio_forced_align()
    if fa is not None and log_probs.device.type == "cpu":
        targets = [int(t) for t in targets]
        if not targets:
            raise AlignmentError("nothing to align: no labels")
        if min_frames(targets) > log_probs.shape[0]:
            raise AlignmentError(
                f"{min_frames(targets)} frames needed for {len(targets)} labels but only {log_probs.shape[0]} frames"
            )
        try:
            ali, scores = fa(
                log_probs.detach().to(torch.float32)[None],
                torch.tensor([targets], dtype=torch.int32),
                blank=blank,
            )
            return ali[0].tolist(), scores[0].tolist()
        except RuntimeError:
            pass  # fall through to the torch implementation
    return forced_align(log_probs, targets, blank=blank)


def merge_tokens(path: Sequence[int], scores: Sequence[float], blank: int = 0) -> list[TokenSpan]:
    """Runs of the same non-blank token become spans; a blank separates two equal labels."""
    spans: list[TokenSpan] = []
    i = 0
    n = len(path)
    while i < n:
        tok = path[i]
        j = i + 1
        while j < n and path[j] == tok:
            j += 1
        if tok != blank:
            spans.append(TokenSpan(int(tok), i, j, float(sum(scores[i:j]) / (j - i))))
        i = j
    return spans


def word_frames(
    spans: Sequence[TokenSpan], targets: Sequence[int], separator: int | None
) -> list[tuple[int, int]]:
    """Frame range (start, end exclusive) of each word: runs of targets between ``separator`` labels.

    ``spans`` are the merged spans of an alignment of ``targets`` (one per target label, in order).
    """
    if len(spans) != len(targets):
        raise ValueError(f"{len(spans)} spans for {len(targets)} labels")
    words: list[tuple[int, int]] = []
    start = end = None
    for span, tok in zip(spans, targets):
        if separator is not None and tok == separator:
            if start is not None:
                words.append((start, end))
            start = end = None
            continue
        if start is None:
            start = span.start
        end = span.end
    if start is not None:
        words.append((start, end))
    return words


def greedy_decode(log_probs: torch.Tensor, blank: int = 0) -> list[TokenSpan]:
    """Best label per frame, merged into spans: the model's own transcript, for timing recovery."""
    best = log_probs.argmax(dim=-1)
    scores = log_probs.gather(-1, best[:, None])[:, 0]
    return merge_tokens(best.tolist(), scores.tolist(), blank=blank)
