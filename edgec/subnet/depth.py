"""Depth: which layers a subnet of each depth keeps.

AmoebaLLM's dynamic program over calibration scores of the full model with layers
removed. The last layer always stays (it feeds the head). With N = L - 1 candidates,
d[n][m] is the best (lowest-loss) set of m removed layers among the first n:

    d[n][m] = better(d[n-1][m-1] + {layer n-1}, d[n-1][m])

about N x M scored evaluations instead of the 2^N of exhaustive search, which
`exhaustive_removals` does for checking it on small models.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import combinations

# removed layers (sorted) -> calibration loss of the full model without them (lower is better)
ScoreFn = Callable[[tuple[int, ...]], float]


def dp_removals(num_layers: int, max_removed: int, score: ScoreFn) -> dict[int, tuple[int, ...]]:
    """The removed layers for m = 0..max_removed, by the dynamic program."""
    candidates = num_layers - 1
    if not 0 <= max_removed <= candidates:
        raise ValueError(f"max_removed {max_removed} outside 0..{candidates}")
    empty: tuple[int, ...] = ()
    best: dict[int, tuple[tuple[int, ...], float]] = {0: (empty, score(empty))}
    for n in range(1, candidates + 1):
        row = {0: best[0]}
        for m in range(1, min(n, max_removed) + 1):
            removed = (*best[m - 1][0], n - 1)
            option = (removed, score(removed))
            kept = best.get(m)  # d[n-1][m]: layer n-1 stays
            row[m] = kept if kept is not None and kept[1] <= option[1] else option
        best = row
    return {m: removed for m, (removed, _) in sorted(best.items())}


def exhaustive_removals(num_layers: int, max_removed: int, score: ScoreFn) -> dict[int, tuple[int, ...]]:
    """The best removed layers for each m by trying every subset (small models only)."""
    return {
        m: min(combinations(range(num_layers - 1), m), key=lambda removed: (score(removed), removed))
        for m in range(max_removed + 1)
    }


def kept_layers(num_layers: int, removed: tuple[int, ...]) -> list[int]:
    return [layer for layer in range(num_layers) if layer not in removed]
