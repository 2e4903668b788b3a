"""CTC forced alignment: the torch Viterbi against known paths, exhaustive search and torchaudio."""

from __future__ import annotations

import itertools

import pytest
import torch

from worker.engines import ctc
from worker.engines.ctc import AlignmentError, forced_align, forced_align_best, merge_tokens, min_frames, word_frames

pytestmark = pytest.mark.timeout(120)


def collapse(path, blank=0):
    out = []
    prev = None
    for p in path:
        if p != prev and p != blank:
            out.append(p)
        prev = p
    return out


def brute_force(lp: torch.Tensor, targets, blank=0):
    """Best-scoring frame labelling that collapses to ``targets``, by enumerating every labelling."""
    T, C = lp.shape
    alphabet = sorted({blank, *targets})
    best, best_path = float("-inf"), None
    for path in itertools.product(alphabet, repeat=T):
        if collapse(path, blank) != list(targets):
            continue
        score = float(sum(lp[t, c] for t, c in enumerate(path)))
        if score > best:
            best, best_path = score, list(path)
    return best_path, best


def test_known_path_on_hand_built_emissions():
    # 6 frames, classes: 0 blank, 1 'A', 2 'B'. Emissions spell A A _ B B _.
    probs = torch.full((6, 3), 0.05)
    for t, c in enumerate([1, 1, 0, 2, 2, 0]):
        probs[t, c] = 0.9
    path, scores = forced_align(probs.log(), [1, 2])
    assert path == [1, 1, 0, 2, 2, 0]
    assert scores == pytest.approx([torch.tensor(0.9).log().item()] * 6)


def test_repeated_label_needs_a_blank_between():
    # Targets A A: the middle frame must be blank even though it prefers A.
    probs = torch.tensor([[0.1, 0.9], [0.2, 0.8], [0.1, 0.9]])
    path, _ = forced_align(probs.log(), [1, 1])
    assert path == [1, 0, 1]
    with pytest.raises(AlignmentError):
        forced_align(probs[:2].log(), [1, 1])  # two frames cannot hold A _ A


@pytest.mark.parametrize("seed", range(12))
def test_matches_exhaustive_search_on_random_emissions(seed):
    g = torch.Generator().manual_seed(seed)
    T = 6 + seed % 2
    C = 4
    lp = torch.randn(T, C, generator=g).log_softmax(-1)
    choices = [[1], [1, 2], [2, 2], [1, 2, 1], [3, 3, 1], [1, 1, 1]]
    targets = choices[seed % len(choices)]
    path, scores = forced_align(lp, targets)
    want_path, want_score = brute_force(lp, targets)
    assert collapse(path) == targets
    assert sum(scores) == pytest.approx(want_score, abs=1e-5)
    assert path == want_path


def test_infeasible_and_empty_targets_raise():
    lp = torch.randn(3, 5).log_softmax(-1)
    with pytest.raises(AlignmentError):
        forced_align(lp, [1, 2, 3, 4])
    with pytest.raises(AlignmentError):
        forced_align(lp, [])
    assert min_frames([1, 1, 2, 2]) == 6


def test_large_alignment_is_valid():
    g = torch.Generator().manual_seed(1)
    T, L = 3000, 700
    lp = torch.randn(T, 32, generator=g).log_softmax(-1)
    targets = torch.randint(1, 32, (L,), generator=g).tolist()
    path, scores = forced_align(lp, targets)
    assert len(path) == T and len(scores) == T
    assert collapse(path) == targets
    spans = merge_tokens(path, scores)
    assert [s.token for s in spans] == targets
    assert all(a.end <= b.start for a, b in zip(spans, spans[1:]))


@pytest.mark.skipif(not ctc.torchaudio_available(), reason="torchaudio does not import with this torch build")
@pytest.mark.parametrize("seed", range(10))
def test_agrees_with_torchaudio(seed):
    import torchaudio.functional as taf

    g = torch.Generator().manual_seed(100 + seed)
    T, C = 200, 12
    lp = torch.randn(T, C, generator=g).log_softmax(-1)
    targets = torch.randint(1, C, (60,), generator=g).tolist()
    targets[5] = targets[4]  # a repeat
    ali, sc = taf.forced_align(lp[None], torch.tensor([targets], dtype=torch.int32), blank=0)
    path, scores = forced_align(lp, targets)
    assert path == ali[0].tolist()
    assert scores == pytest.approx(sc[0].tolist(), abs=1e-5)


def test_best_falls_back_to_torch_and_agrees():
    g = torch.Generator().manual_seed(7)
    lp = torch.randn(40, 6, generator=g).log_softmax(-1)
    targets = [1, 2, 2, 3, 5]
    a = forced_align_best(lp, targets)
    b = forced_align(lp, targets)
    assert a[0] == b[0]
    assert a[1] == pytest.approx(b[1], abs=1e-5)


def test_merge_tokens_and_word_frames():
    #        frame: 0 1 2 3 4 5 6 7 8 9
    path = [0, 1, 1, 0, 4, 2, 0, 2, 3, 0]  # A A _ | B _ B C _   (4 = word separator)
    scores = [0.0] * len(path)
    spans = merge_tokens(path, scores)
    assert [(s.token, s.start, s.end) for s in spans] == [(1, 1, 3), (4, 4, 5), (2, 5, 6), (2, 7, 8), (3, 8, 9)]
    targets = [1, 4, 2, 2, 3]
    assert word_frames(spans, targets, separator=4) == [(1, 3), (5, 9)]
    assert word_frames(spans, targets, separator=None) == [(1, 9)]
    with pytest.raises(ValueError):
        word_frames(spans[:-1], targets, separator=4)
