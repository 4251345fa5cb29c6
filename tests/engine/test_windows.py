"""Windows are per epoch: ceil(B/k) windows, the last holds B mod k micro-batches."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from traintel.engine.windows import WindowedLoader


@pytest.mark.parametrize(
    ("b", "k", "sizes", "firsts"),
    [
        (10, 3, [3, 3, 3, 1], [1, 4, 7, 10]),
        (9, 3, [3, 3, 3], [1, 4, 7]),
        (2, 3, [2], [1]),
        (5, 1, [1, 1, 1, 1, 1], [1, 2, 3, 4, 5]),
        (0, 3, [], []),
    ],
)
def test_windows_partition_one_epoch(b: int, k: int, sizes: list[int], firsts: list[int]) -> None:
    loader = WindowedLoader(list(range(b)), k)
    windows = list(loader)
    assert [len(w.batches) for w in windows] == sizes
    assert [w.first_batch for w in windows] == firsts
    assert [x for w in windows for x in w.batches] == list(range(b))
    assert len(loader) == len(sizes)
    assert all(w.batches_per_epoch == b for w in windows)


def test_each_iteration_is_a_fresh_epoch() -> None:
    loader = WindowedLoader(list(range(5)), 2)
    first = [w.batches for w in loader]
    second = [w.batches for w in loader]
    assert first == second == [(0, 1), (2, 3), (4,)]


def test_loader_without_length() -> None:
    def gen() -> Iterator[int]:
        yield from range(7)

    class Once:
        def __iter__(self) -> Iterator[int]:
            return gen()

    loader = WindowedLoader(Once(), 3)
    assert loader.batches_per_epoch() is None
    with pytest.raises(TypeError, match="no length"):
        len(loader)
    assert [w.batches for w in loader] == [(0, 1, 2), (3, 4, 5), (6,)]
    assert [w.batches_per_epoch for w in loader] == [None, None, None]


def test_k_must_be_positive() -> None:
    with pytest.raises(ValueError, match="accumulation steps must be >= 1, got 0"):
        WindowedLoader([1], 0)
