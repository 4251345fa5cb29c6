"""``shard``: each rank's share of a loader, drawn from what the task's sampler draws, or a refusal."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    Sampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)
from torch.utils.data.distributed import DistributedSampler

from traintel.engine.shards import ShardSampler, set_epoch, shard

WORLD = 2
SEED = 7


def drawn(loader: Any, epoch: int = 1) -> list[int]:
    """The sample indices one epoch of ``loader`` yields, batched or not (its data set is ``range(n)``)."""
    set_epoch(loader, epoch)
    return [int(i) for batch in loader for i in torch.as_tensor(batch).reshape(-1)]


def shares(loader: DataLoader[int], epoch: int = 1) -> list[list[int]]:
    """Each rank's indices for ``epoch``; torch's global generator is seeded differently on each rank,
    as it is under torchrun, so a share that drew from it would differ."""
    out = []
    for rank in range(WORLD):
        torch.manual_seed(1000 + rank)
        out.append(drawn(shard(loader, rank, WORLD, SEED), epoch))
    return out


def test_a_sequential_sampler_gives_rank_r_every_wth_sample_in_order() -> None:
    assert shares(DataLoader(range(7), batch_size=2)) == [[0, 2, 4, 6], [1, 3, 5]]


def test_a_random_sampler_gives_disjoint_shares_of_one_seeded_permutation_per_epoch() -> None:
    loader = DataLoader(range(10), batch_size=3, shuffle=True)
    first, second = shares(loader, 1), shares(loader, 2)
    for epoch in (first, second):
        assert [len(s) for s in epoch] == [5, 5]
        assert sorted(epoch[0] + epoch[1]) == list(range(10))
    assert first != second
    assert shares(loader, 1) == first  # the same order again: from the seed and epoch alone


def test_a_subset_random_sampler_shards_its_indices_each_used_once_per_epoch() -> None:
    subset = [17, 3, 99, 42, 5, 60, 8]
    loader = DataLoader(range(100), batch_size=2, sampler=SubsetRandomSampler(subset))
    first, second = shares(loader, 1), shares(loader, 2)
    for epoch in (first, second):
        assert [len(s) for s in epoch] == [4, 3]
        assert sorted(epoch[0] + epoch[1]) == sorted(subset)
    assert first != second
    assert shares(loader, 1) == first


def test_the_subset_of_a_train_validation_split_is_all_that_is_trained() -> None:
    """A common split: 100 samples, the first 50 train. Every epoch trains exactly those 50."""
    loader = DataLoader(range(100), batch_size=10, sampler=SubsetRandomSampler(range(50)))
    for epoch in (1, 2, 3):
        ranks = shares(loader, epoch)
        assert [len(s) for s in ranks] == [25, 25]
        assert sorted(ranks[0] + ranks[1]) == list(range(50))


def test_a_loader_without_batching_is_sharded_sample_by_sample() -> None:
    assert shares(DataLoader(range(5), batch_size=None)) == [[0, 2, 4], [1, 3]]  # type: ignore[arg-type]


def test_the_rebuilt_loader_keeps_the_batch_size_and_drop_last() -> None:
    loader = DataLoader(range(9), batch_size=2, drop_last=True)
    got = shard(loader, 0, WORLD, SEED)
    assert isinstance(got, DataLoader)
    assert isinstance(got.sampler, ShardSampler)
    assert (got.batch_size, got.drop_last, [b.tolist() for b in got]) == (2, True, [[0, 2], [4, 6]])


def test_a_list_of_batches_gives_rank_r_every_wth_batch() -> None:
    assert [shard([10, 11, 12, 13, 14], r, WORLD, SEED) for r in range(WORLD)] == [[10, 12, 14], [11, 13]]


def test_a_distributed_sampler_is_left_to_the_task() -> None:
    loader = DataLoader(range(8), sampler=DistributedSampler(range(8), num_replicas=2, rank=1))
    assert shard(loader, 1, WORLD, SEED) is loader


class StridedSampler(Sampler[int]):
    def __iter__(self) -> Iterator[int]:
        return iter(range(0, 10, 2))

    def __len__(self) -> int:
        return 5


class ReversedSampler(SequentialSampler):
    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self.data_source) - 1, -1, -1))


ALLOWED = (
    "(it shards a SequentialSampler, a RandomSampler without replacement or num_samples, a "
    "SubsetRandomSampler); give it a DistributedSampler, or shard the data in the task, for a run of "
    "several ranks"
)


@pytest.mark.parametrize(
    ("sampler", "found"),
    [
        (WeightedRandomSampler([1.0] * 10, 10), "a WeightedRandomSampler"),
        (RandomSampler(range(10), replacement=True), "a RandomSampler with replacement=True"),
        (
            RandomSampler(range(10), num_samples=4),
            "a RandomSampler with num_samples=4 (the data set holds 10)",
        ),
        (StridedSampler(), "a StridedSampler"),
        (ReversedSampler(range(10)), "a ReversedSampler"),
    ],
    ids=["weighted", "replacement", "num_samples", "own-class", "subclass"],
)
def test_a_sampler_that_cannot_be_split_is_refused_naming_it(sampler: Sampler[int], found: str) -> None:
    loader = DataLoader(range(10), batch_size=2, sampler=sampler)
    line = f"has {found} as its sampler, which traintel cannot shard over the ranks {ALLOWED}"
    with pytest.raises(ValueError, match=f"^{re.escape(line)}$"):
        shard(loader, 0, WORLD, SEED)


def test_a_batch_sampler_is_refused_naming_it() -> None:
    loader = DataLoader(range(10), batch_sampler=BatchSampler(SequentialSampler(range(10)), 2, False))
    line = (
        "has a batch_sampler of its own (BatchSampler); give it a DistributedSampler, or shard the data "
        "in the task, for a run of several ranks"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(line)}$"):
        shard(loader, 0, WORLD, SEED)
