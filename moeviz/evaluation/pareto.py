"""Pareto front of runs on two objectives (e.g. compression ratio vs accuracy).

A row *dominates* another if it is at least as good on both objectives and strictly better on at
least one. The front is the set of rows no other row dominates. Exact duplicates do not dominate
each other, so tied points on the front are all kept. Rows with a missing (NaN) objective are
never on the front.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def _front_mask(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Bool mask of non-dominated points, both objectives maximised. O(n log n).

    Sweep x from high to low, one group of equal x at a time: a point (X, y) is dominated iff a
    point with larger x has y' >= y, or a point with the same x has y' > y. So it survives iff
    y > best y over all larger x, and y is the best y within its own x group.
    """
    n = len(xs)
    keep = np.zeros(n, dtype=bool)
    valid = ~(np.isnan(xs) | np.isnan(ys))
    idx = np.flatnonzero(valid)
    if idx.size == 0:
        return keep
    order = idx[np.lexsort((-ys[idx], -xs[idx]))]  # x descending, then y descending
    best_larger_x = -np.inf
    i = 0
    while i < order.size:
        j = i
        x = xs[order[i]]
        while j < order.size and xs[order[j]] == x:
            j += 1
        group = order[i:j]
        group_best = ys[group[0]]  # sorted by y descending within the group
        if group_best > best_larger_x:
            keep[group[ys[group] == group_best]] = True
        best_larger_x = max(best_larger_x, group_best)
        i = j
    return keep


def _objectives(df: pd.DataFrame, x: str, y: str, maximize_x: bool, maximize_y: bool):
    xs = pd.to_numeric(df[x], errors="coerce").to_numpy(dtype=float)
    ys = pd.to_numeric(df[y], errors="coerce").to_numpy(dtype=float)
    return (xs if maximize_x else -xs), (ys if maximize_y else -ys)


def pareto_mask(df: pd.DataFrame, x: str, y: str, maximize_x: bool = True, maximize_y: bool = True) -> np.ndarray:
    """Bool array, True for the rows of `df` on the Pareto front."""
    return _front_mask(*_objectives(df, x, y, maximize_x, maximize_y))


def pareto_front(df: pd.DataFrame, x: str, y: str, maximize_x: bool = True, maximize_y: bool = True) -> pd.DataFrame:
    """The non-dominated rows of `df` (original index kept), sorted by `x` ascending."""
    front = df[pareto_mask(df, x, y, maximize_x, maximize_y)]
    return front.sort_values([x, y], kind="stable")


def mark_pareto(
    df: pd.DataFrame, x: str, y: str, maximize_x: bool = True, maximize_y: bool = True, column: str = "pareto"
) -> pd.DataFrame:
    """A copy of `df` with a bool `column`, True for the rows on the Pareto front."""
    out = df.copy()
    out[column] = pareto_mask(df, x, y, maximize_x, maximize_y)
    return out


__all__ = ["mark_pareto", "pareto_front", "pareto_mask"]
