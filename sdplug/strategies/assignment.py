"""Minimum-cost perfect matching (the assignment problem), for immiscible noise.

Hungarian algorithm with potentials (Kuhn 1955, Munkres 1957; the O(n^3) shortest augmenting
path form). Batches are small (n <= a few hundred), so plain Python over a NumPy matrix is
fast enough and keeps SciPy out of the dependencies.
"""

from __future__ import annotations

import numpy as np


def min_cost_assignment(cost: np.ndarray) -> np.ndarray:
    """``col[i]`` for each row i such that ``sum(cost[i, col[i]])`` is minimal over permutations."""
    cost = np.asarray(cost, dtype=np.float64)
    n = cost.shape[0]
    if cost.shape != (n, n):
        raise ValueError(f"need a square cost matrix, got shape {cost.shape}")
    inf = float("inf")
    u = np.zeros(n + 1)
    v = np.zeros(n + 1)
    match = np.zeros(n + 1, dtype=np.int64)  # match[j] = row (1-based) assigned to column j; 0 = free
    way = np.zeros(n + 1, dtype=np.int64)
    for row in range(1, n + 1):
        match[0] = row
        col0 = 0
        min_reduced = np.full(n + 1, inf)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[col0] = True
            r = match[col0]
            reduced = cost[r - 1] - u[r] - v[1:]
            free = ~used[1:]
            better = free & (reduced < min_reduced[1:])
            min_reduced[1:][better] = reduced[better]
            way[1:][better] = col0
            candidates = np.where(free, min_reduced[1:], inf)
            col1 = int(np.argmin(candidates)) + 1
            delta = candidates[col1 - 1]
            u[match[used]] += delta
            v[used] -= delta
            min_reduced[1:][free] -= delta
            col0 = col1
            if match[col0] == 0:
                break
        while col0:
            prev = way[col0]
            match[col0] = match[prev]
            col0 = prev
    assignment = np.empty(n, dtype=np.int64)
    for col in range(1, n + 1):
        assignment[match[col] - 1] = col - 1
    return assignment
