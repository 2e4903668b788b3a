"""Monotonic least-cost paths through a grid, one row at a time: the dynamic programme behind both
Whisper's token-to-frame alignment and the word-sequence matching of timing recovery.

A cell (i, j) is entered diagonally from (i-1, j-1), from above (i-1, j) or from the left
(i, j-1). Each row is filled with numpy in one pass instead of a Python loop over its cells: a run of
moves to the left is a cumulative minimum, row[j] = H[j] + min_{k<=j}(above[k] - H[k]), where
``above`` is the best entry from the row above (cell cost included) and H the prefix sum of the
cost of moving left along the row. Rows may cover only a band of columns (``lo`` onwards).
"""

from __future__ import annotations

import numpy as np

DIAGONAL, UP, LEFT = 0, 1, 2


def fill_row(diag: np.ndarray, up: np.ndarray, horizontal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One row of the programme: its cumulative costs and the move that entered each cell.

    ``diag[j]`` and ``up[j]`` are the costs of entering cell j diagonally and from above (the
    cell's own cost included); ``horizontal[j]`` is the cost of entering it from cell j-1 of the
    same row (``horizontal[0]`` is unused). Ties prefer the diagonal, then above.
    """
    above = np.minimum(diag, up)
    move = np.where(diag <= up, DIAGONAL, UP).astype(np.int8)
    steps = np.concatenate(([0.0], np.cumsum(np.asarray(horizontal[1:], dtype=np.float64))))
    g = above - steps
    best = np.minimum.accumulate(g)
    left = np.zeros(len(g), dtype=bool)
    left[1:] = best[:-1] < g[1:]
    move[left] = LEFT
    return steps + best, move


def traceback(moves: list[tuple[int, np.ndarray]], n: int, m: int) -> list[tuple[int, int, int]]:
    """The path from cell (n, m) back to row or column 0, in forward order.

    ``moves[i-1] = (lo, row)`` holds the move that entered cell (i, j) at ``row[j - lo]``; a cell
    outside a row's band counts as entered from above. Cells are 1-based as in the programme, so
    (i, j, move) stands for row i-1 and column j-1 of the cost matrix.
    """
    path = []
    i, j = n, m
    while i > 0 and j > 0:
        lo, row = moves[i - 1]
        step = int(row[j - lo]) if 0 <= j - lo < len(row) else UP
        path.append((i, j, step))
        if step == DIAGONAL:
            i, j = i - 1, j - 1
        elif step == UP:
            i -= 1
        else:
            j -= 1
    path.reverse()
    return path


def dtw_path(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Monotonic least-cost path from cell (0, 0) to (N-1, M-1) of an N x M cost matrix, moves
    diagonal, down and right as in Whisper's word timing: (rows, cols) of every cell on it."""
    n, m = cost.shape
    prev = np.full(m + 1, np.inf)
    prev[0] = 0.0
    moves = []
    for i in range(1, n + 1):
        c = cost[i - 1].astype(np.float64)
        row, move = fill_row(prev[:-1] + c, prev[1:] + c, c)
        prev = np.concatenate(([np.inf], row))
        moves.append((1, move))
    path = traceback(moves, n, m)
    return np.array([i - 1 for i, _, _ in path]), np.array([j - 1 for _, j, _ in path])
