"""Each rank's share of the training and validation data, when the task did not shard it itself."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import (
    DataLoader,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    SubsetRandomSampler,
)
from torch.utils.data.distributed import DistributedSampler

_WHAT_TO_DO = "give it a DistributedSampler, or shard the data in the task, for a run of several ranks"


class ShardSampler(Sampler[int]):
    """Rank r of W takes the samples at positions r, r+W, r+2W, ... of ``size`` (the data set's
    samples 0 .. size-1, or the given indices of a subset), or of one seeded permutation of them
    per epoch (the same on every rank, from ``seed`` and the epoch, never from torch's global
    generator) when shuffling.

    Every sample is used exactly once per epoch across the ranks: no padding duplicates, no
    dropped tail, so shards may differ in length by one sample.
    """

    def __init__(
        self, size: int | Sequence[int], rank: int, world_size: int, *, shuffle: bool, seed: int
    ) -> None:
        self.indices: Sequence[int] = range(size) if isinstance(size, int) else size
        self.size = len(self.indices)
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
            return (int(self.indices[i]) for i in range(self.rank, self.size, self.world_size))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order: list[int] = torch.randperm(self.size, generator=generator).tolist()
        return (int(self.indices[i]) for i in order[self.rank :: self.world_size])

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))


def _shard_sampler(loader: DataLoader[Any], rank: int, world_size: int, seed: int) -> ShardSampler:
    """The ``ShardSampler`` that takes this rank's share of what ``loader``'s sampler draws in an epoch;
    a ValueError naming the sampler when that cannot be split without changing what is drawn."""
    sampler = loader.sampler
    size = len(loader.dataset)  # type: ignore[arg-type]
    kind = type(sampler)  # exactly these classes: a subclass may draw otherwise
    if kind is SequentialSampler:
        return ShardSampler(size, rank, world_size, shuffle=False, seed=seed)
    if kind is SubsetRandomSampler and isinstance(sampler, SubsetRandomSampler):
        return ShardSampler(sampler.indices, rank, world_size, shuffle=True, seed=seed)
    if kind is RandomSampler and isinstance(sampler, RandomSampler):
        if sampler.replacement:
            found = "a RandomSampler with replacement=True"
        elif sampler.num_samples != size:
            found = f"a RandomSampler with num_samples={sampler.num_samples} (the data set holds {size})"
        else:
            return ShardSampler(size, rank, world_size, shuffle=True, seed=seed)
    else:
        found = f"a {kind.__name__}"
    msg = (
        f"has {found} as its sampler, which traintel cannot shard over the ranks (it shards a "
        f"SequentialSampler, a RandomSampler without replacement or num_samples, a SubsetRandomSampler); "
        f"{_WHAT_TO_DO}"
    )
    raise ValueError(msg)


def shard(loader: Iterable[Any], rank: int, world_size: int, seed: int) -> Iterable[Any]:
    """This rank's share of ``loader``.

    A ``DataLoader`` over a map-style data set without a ``DistributedSampler`` is rebuilt with a
    ``ShardSampler`` that splits what its sampler draws, keeping its batch size, workers, collate
    function and the rest: a ``SequentialSampler`` in order, a ``RandomSampler`` (without
    replacement, over the whole data set) as one seeded permutation per epoch, a
    ``SubsetRandomSampler`` as one seeded permutation of its indices per epoch. Any other sampler
    (``WeightedRandomSampler``, a class of the task's own) or a ``batch_sampler`` is a ValueError
    naming it: replacing it would change what is trained. A list or tuple of ready batches gives
    rank r the batches r, r+W, ... A ``DistributedSampler`` the task set, an iterable data set, or
    any other iterable is left as it is: the task shards it.
    """
    if isinstance(loader, Sequence):
        return loader[rank::world_size]
    if not isinstance(loader, DataLoader):
        return loader
    if isinstance(loader.sampler, DistributedSampler) or isinstance(loader.dataset, IterableDataset):
        return loader
    if loader.batch_size is None and loader.batch_sampler is not None:
        msg = f"has a batch_sampler of its own ({type(loader.batch_sampler).__name__}); {_WHAT_TO_DO}"
        raise ValueError(msg)
    sampler = _shard_sampler(loader, rank, world_size, seed)
    extra: dict[str, Any] = {}
    if loader.num_workers:
        extra = {"prefetch_factor": loader.prefetch_factor, "persistent_workers": loader.persistent_workers}
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
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
