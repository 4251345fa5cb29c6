"""Each rank's share of the training data, when the task did not shard it itself."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, Sampler
from torch.utils.data.distributed import DistributedSampler


class ShardSampler(Sampler[int]):
    """Rank r of W takes samples r, r+W, r+2W, ... of the data set, or of one seeded permutation
    of it per epoch (the same on every rank, from ``seed`` and the epoch) when shuffling.

    Every sample is used exactly once per epoch across the ranks: no padding duplicates, no
    dropped tail, so shards may differ in length by one sample.
    """

    def __init__(self, size: int, rank: int, world_size: int, *, shuffle: bool, seed: int) -> None:
        self.size = size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        """Draw the permutation of ``epoch`` (1-based) next."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.rank, self.size, self.world_size))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order: list[int] = torch.randperm(self.size, generator=generator).tolist()
        return iter(order[self.rank :: self.world_size])

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))


def shard(loader: Iterable[Any], rank: int, world_size: int, seed: int) -> Iterable[Any]:
    """This rank's share of ``loader``.

    A ``DataLoader`` over a map-style data set without a ``DistributedSampler`` is rebuilt
    with a ``ShardSampler`` (shuffled when its sampler was a ``RandomSampler``), keeping its
    batch size, workers, collate function and the rest. A list or tuple of ready batches gives
    rank r the batches r, r+W, ... A ``DistributedSampler`` the task set, an iterable data set,
    or any other iterable is left as it is: the task shards it.
    """
    if isinstance(loader, Sequence):
        return loader[rank::world_size]
    if not isinstance(loader, DataLoader):
        return loader
    if isinstance(loader.sampler, DistributedSampler) or isinstance(loader.dataset, IterableDataset):
        return loader
    if loader.batch_size is None:
        msg = (
            "the training loader has a batch_sampler of its own; give it a DistributedSampler "
            "(or shard it in the task) for a run of several ranks"
        )
        raise ValueError(msg)
    size = len(loader.dataset)  # type: ignore[arg-type]
    shuffle = isinstance(loader.sampler, RandomSampler)
    extra: dict[str, Any] = {}
    if loader.num_workers:
        extra = {"prefetch_factor": loader.prefetch_factor, "persistent_workers": loader.persistent_workers}
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=ShardSampler(size, rank, world_size, shuffle=shuffle, seed=seed),
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        **extra,
    )


def set_epoch(loader: Iterable[Any], epoch: int) -> None:
    """Tell a loader's sampler which epoch begins (``ShardSampler``, ``DistributedSampler``)."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, ShardSampler | DistributedSampler):
        sampler.set_epoch(epoch)
