"""Deterministic train/validation/test splits, optionally keeping groups (and identical texts) in one split."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def connected_groups(columns: Sequence[Sequence]) -> np.ndarray:
    """Component id per row, where rows sharing a value in any of `columns` end up in the same component."""
    num_rows = len(columns[0]) if columns else 0
    parent = list(range(num_rows))

    def find(row: int) -> int:
        while parent[row] != row:
            parent[row] = parent[parent[row]]
            row = parent[row]
        return row

    for values in columns:
        first_row_with: dict = {}
        for row, value in enumerate(values):
            if value is None:
                continue
            other = first_row_with.setdefault(value, row)
            parent[find(row)] = find(other)
    roots = np.array([find(row) for row in range(num_rows)])
    _, component_ids = np.unique(roots, return_inverse=True)
    return component_ids


def split_indices(
    num_rows: int,
    sizes: dict[str, float],
    seed: int,
    groups: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Split row indices into the named held-out parts (fractions in `sizes`) and "train" (the rest).

    Whole groups are shuffled with `seed` and dealt out in order: first to the held-out parts until each reaches
    its fraction of the rows, then to train. With no groups every row is its own group.
    """
    groups = np.arange(num_rows) if groups is None else np.asarray(groups)
    group_ids = np.unique(groups)
    rng = np.random.default_rng(seed)
    order = rng.permutation(group_ids)
    rows_of = {group: [] for group in group_ids}
    for row, group in enumerate(groups):
        rows_of[group].append(row)

    parts = {name: [] for name in sizes}
    parts["train"] = []
    targets = {name: round(fraction * num_rows) for name, fraction in sizes.items()}
    held_out = list(sizes)
    for group in order:
        name = next((name for name in held_out if len(parts[name]) < targets[name]), "train")
        parts[name].extend(rows_of[group])
    return {name: np.sort(np.array(rows, dtype=np.int64)) for name, rows in parts.items()}
