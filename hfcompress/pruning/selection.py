"""Turn importance scores and a budget into what to remove (lowest scores first).

Scores come as a Tensor [num_layers, units] or as one 1-D tensor per layer (after uneven pruning). The results
plug straight into `prune_heads`, `prune_ffn` and `prune_layers`. Budgets are either a `sparsity` (fraction of
all heads/neurons to remove) or a `count`; `scope="global"` ranks all layers together, `scope="uniform"` takes the
same share from every layer (which keeps shapes uniform, so the config can usually still express them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import HfCompressError

SCOPES = ("global", "uniform")
GROUP_STRATEGIES = ("whole_groups", "heads_per_group")


@dataclass(frozen=True)
class _Unit:
    """The smallest thing selection removes at once: one head or neuron, or a set that must go together."""

    layer: int
    members: tuple[int, ...]
    score: float


def select_heads(
    scores, sparsity: float | None = None, count: int | None = None, scope: str = "global",
    min_heads_per_layer: int = 1, group_size: int | Sequence[int] = 1, group_strategy: str = "whole_groups",
    multiple: int = 1,
) -> dict[int, list[int]]:
    """Query heads to remove, `{layer: [head, ...]}`.

    Grouped-query attention (`group_size` = query heads per key/value head; one number, or one per layer after
    uneven pruning) needs every group of a layer to keep the same number of query heads: "whole_groups" removes
    entire groups (scored by the sum of their heads), "heads_per_group" removes the same number of heads from
    every group (each group's least important first). The budget counts query heads and is rounded down to what
    whole units allow. `multiple` > 1: every layer then keeps a multiple of that many heads (see `_select`).
    """
    if min_heads_per_layer < 1:
        raise HfCompressError("min_heads_per_layer must be at least 1: to remove every head of a layer, drop the layer")
    if group_strategy not in GROUP_STRATEGIES:
        raise HfCompressError(f"unknown group_strategy {group_strategy!r} (use one of {', '.join(GROUP_STRATEGIES)})")
    rows = _rows(scores)
    group_sizes = [group_size] * len(rows) if isinstance(group_size, int) else list(group_size)
    if len(group_sizes) != len(rows):
        raise HfCompressError(f"group_size gives {len(group_sizes)} layers, the scores {len(rows)}")
    units = [
        _head_units(layer, row, size, group_strategy)
        for layer, (row, size) in enumerate(zip(rows, group_sizes, strict=True))
    ]
    return _select(units, [len(row) for row in rows], sparsity, count, scope, min_heads_per_layer, multiple)


def select_ffn(
    scores, sparsity: float | None = None, count: int | None = None, scope: str = "global",
    min_neurons_per_layer: int = 1, multiple: int = 1,
) -> dict[int, list[int]]:
    """Feed-forward neurons to remove, `{layer: [neuron, ...]}`; with `multiple` > 1 every layer keeps a multiple
    of that many neurons."""
    if min_neurons_per_layer < 1:
        raise HfCompressError("min_neurons_per_layer must be at least 1: to remove a whole block, drop the layer")
    rows = _rows(scores)
    units = [
        [_Unit(layer, (neuron,), float(score)) for neuron, score in enumerate(row)] for layer, row in enumerate(rows)
    ]
    return _select(units, [len(row) for row in rows], sparsity, count, scope, min_neurons_per_layer, multiple)


def select_layers(scores, drop: int) -> list[int]:
    """The `drop` blocks with the lowest scores, ascending by index."""
    scores = torch.as_tensor(scores, dtype=torch.float32)
    if not 0 <= drop < len(scores):
        raise HfCompressError(f"cannot drop {drop} of {len(scores)} layers (keep at least one)")
    return sorted(torch.argsort(scores, stable=True)[:drop].tolist())


def _head_units(layer: int, row: torch.Tensor, group_size: int, strategy: str) -> list[_Unit]:
    num_heads = len(row)
    if group_size < 1 or num_heads % group_size:
        raise HfCompressError(f"layer {layer}: group_size {group_size} does not divide its {num_heads} heads")
    groups = [list(range(start, start + group_size)) for start in range(0, num_heads, group_size)]
    if strategy == "whole_groups":
        return [_Unit(layer, tuple(group), float(row[group].sum())) for group in groups]
    # heads_per_group: unit j is the j-th least important head of every group; unit scores never decrease with j,
    # so lowest-first selection always takes a prefix and every group loses the same number of heads.
    ranked = [sorted(group, key=lambda head: (float(row[head]), head)) for group in groups]
    return [
        _Unit(layer, tuple(sorted(group[rank] for group in ranked)), sum(float(row[group[rank]]) for group in ranked))
        for rank in range(group_size)
    ]


def _select(units_per_layer, sizes, sparsity, count, scope, min_keep, multiple=1) -> dict[int, list[int]]:
    """Lowest scores first within the budget; with `multiple` > 1, each layer's kept count is then moved to the
    nearest multiple (kernels such as ONNX Runtime's MatMulNBits need input widths in whole blocks), taking or
    giving back that layer's units in score order, so a global budget is met only approximately."""
    if multiple < 1:
        raise HfCompressError(f"the multiple widths are rounded to must be at least 1, got {multiple}")
    if scope not in SCOPES:
        raise HfCompressError(f"unknown scope {scope!r} (use one of {', '.join(SCOPES)})")
    _check_budget(sparsity, count, sum(sizes))
    selection = _Selection(sizes, min_keep)
    if scope == "global":
        budget = count if count is not None else math.floor(sparsity * sum(sizes))
        for unit in sorted((unit for units in units_per_layer for unit in units), key=lambda unit: unit.score):
            if sum(selection.removed) + len(unit.members) <= budget:
                selection.take_if_allowed(unit)
    else:
        for layer, units in enumerate(units_per_layer):
            quota = count // len(sizes) if count is not None else math.floor(sparsity * sizes[layer])
            for unit in sorted(units, key=lambda unit: unit.score):
                if selection.removed[layer] + len(unit.members) <= quota:
                    selection.take_if_allowed(unit)
    if multiple > 1:
        return _rounded(units_per_layer, sizes, selection.removed, min_keep, multiple)
    return selection.chosen()


def _rounded(units_per_layer, sizes, removed, min_keep, multiple) -> dict[int, list[int]]:
    """Per layer: remove the lowest-scored units such that the kept count is a multiple of `multiple`, as close as
    possible to what the budget removed (ties keep more)."""
    chosen = {}
    for layer, units in enumerate(units_per_layer):
        unit_size = len(units[0].members) if units else 1  # a layer's units are all the same size
        counts = [count for count in range(len(units) + 1)
                  if (sizes[layer] - count * unit_size) % multiple == 0 and sizes[layer] - count * unit_size >= min_keep]
        if not counts:
            raise HfCompressError(f"layer {layer}: none of the widths its {sizes[layer]} units can be cut to in steps "
                                  f"of {unit_size} is a multiple of {multiple}")
        count = min(counts, key=lambda count: (abs(count * unit_size - removed[layer]), count))
        taken = sorted(units, key=lambda unit: unit.score)[:count]
        if taken:
            chosen[layer] = sorted(member for unit in taken for member in unit.members)
    return chosen


class _Selection:
    """What has been picked so far, never leaving a layer with fewer than `min_keep` units."""

    def __init__(self, sizes: Sequence[int], min_keep: int):
        self.sizes = sizes
        self.min_keep = min_keep
        self.removed = [0] * len(sizes)
        self._members: dict[int, list[int]] = {}

    def take_if_allowed(self, unit: _Unit) -> None:
        if self.sizes[unit.layer] - self.removed[unit.layer] - len(unit.members) >= self.min_keep:
            self.removed[unit.layer] += len(unit.members)
            self._members.setdefault(unit.layer, []).extend(unit.members)

    def chosen(self) -> dict[int, list[int]]:
        return {layer: sorted(members) for layer, members in sorted(self._members.items())}


def _rows(scores) -> list[torch.Tensor]:
    rows = [torch.as_tensor(row, dtype=torch.float32).flatten() for row in scores]
    if any(not torch.isfinite(row).all() for row in rows):
        raise HfCompressError("importance scores contain NaN or infinite values")
    return rows


def _check_budget(sparsity: float | None, count: int | None, total: int) -> None:
    if (sparsity is None) == (count is None):
        raise HfCompressError("give exactly one of sparsity or count")
    if sparsity is not None and not 0 <= sparsity < 1:
        raise HfCompressError(f"sparsity must be in [0, 1), got {sparsity}")
    if count is not None and not 0 <= count <= total:
        raise HfCompressError(f"count must be between 0 and {total}, got {count}")
