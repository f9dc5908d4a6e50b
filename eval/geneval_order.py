"""The order in which the official GenEval scorer visits detections (``evaluate_images.py``):
``np.argsort(scores)[::-1]`` under numpy 1.23, its environment. That argsort is an unstable
introsort whose tie order newer numpys do not reproduce, so it is ported here."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def official_order(scores: Sequence[float]) -> list[int]:
    """Indices of ``scores`` as the official scorer visits them: ``np.argsort(scores)[::-1]`` on
    float32 scores with numpy 1.23 (its environment), whose default argsort is an introsort
    (median-of-3 quicksort, insertion sort on runs of at most 16, heapsort past depth
    2*log2(n); NaN sorts last). It is not stable, and the reversal puts the *last* of equal
    scores first; recent numpys may sort ties differently, so the algorithm is ported here
    (``numpy/core/src/npysort/quicksort.cpp``, ``aquicksort_``)."""
    v = [float(x) for x in np.asarray(scores, dtype=np.float32).ravel()]
    t = list(range(len(v)))
    stack: list[tuple[int, int, int]] = []
    pl, pr = 0, len(v) - 1
    depth = 2 * (max(len(v), 1).bit_length() - 1)
    while True:
        if depth < 0:
            t[pl:pr + 1] = _heap_argsort(v, t[pl:pr + 1])
        else:
            while pr - pl > 15:
                pm = pl + ((pr - pl) >> 1)
                if _lt(v[t[pm]], v[t[pl]]):
                    t[pm], t[pl] = t[pl], t[pm]
                if _lt(v[t[pr]], v[t[pm]]):
                    t[pr], t[pm] = t[pm], t[pr]
                if _lt(v[t[pm]], v[t[pl]]):
                    t[pm], t[pl] = t[pl], t[pm]
                vp = v[t[pm]]
                pi, pj = pl, pr - 1
                t[pm], t[pj] = t[pj], t[pm]
                while True:
                    pi += 1
                    while _lt(v[t[pi]], vp):
                        pi += 1
                    pj -= 1
                    while _lt(vp, v[t[pj]]):
                        pj -= 1
                    if pi >= pj:
                        break
                    t[pi], t[pj] = t[pj], t[pi]
                t[pi], t[pr - 1] = t[pr - 1], t[pi]
                depth -= 1
                if pi - pl < pr - pi:  # the larger side waits on the stack
                    stack.append((pi + 1, pr, depth))
                    pr = pi - 1
                else:
                    stack.append((pl, pi - 1, depth))
                    pl = pi + 1
            for i in range(pl + 1, pr + 1):  # insertion sort
                vi, j = t[i], i
                while j > pl and _lt(v[vi], v[t[j - 1]]):
                    t[j] = t[j - 1]
                    j -= 1
                t[j] = vi
        if not stack:
            return t[::-1]
        pl, pr, depth = stack.pop()


def _lt(a: float, b: float) -> bool:
    return a < b or (b != b and a == a)  # numpy's float order: NaN after everything


def _heap_argsort(v: list[float], t: list[int]) -> list[int]:
    """numpy's ``aheapsort_`` (1-based heap over the indices ``t``)."""
    a, n = [0, *t], len(t)

    def sift(i, n, tmp):
        j = 2 * i
        while j <= n:
            if j < n and _lt(v[a[j]], v[a[j + 1]]):
                j += 1
            if not _lt(v[tmp], v[a[j]]):
                break
            a[i], i, j = a[j], j, 2 * j
        a[i] = tmp

    for l in range(n >> 1, 0, -1):
        sift(l, n, a[l])
    while n > 1:
        tmp, a[n] = a[n], a[1]
        n -= 1
        sift(1, n, tmp)
    return a[1:]
