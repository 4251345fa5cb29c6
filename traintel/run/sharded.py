"""The model and optimizer of a run of several ranks, saved and loaded through
``torch.distributed.checkpoint`` (DCP).

``get_state_dict`` gives them keyed by parameter name: under DDP each rank holds the whole of both,
and DCP writes each tensor once, from one rank (one copy in all, not one per rank); under FSDP each
rank holds a shard, and writes its own. A checkpoint's DCP directory holds each rank's files
(``__<rank>_<n>.distcp``) and DCP's ``.metadata`` (rank 0's, written once every rank's data is).
Which files a rank wrote, with their sizes and SHA-256, goes into that rank's manifest
(``traintel.run.checkpoint``), which is written only after them: a checkpoint counts only when every
rank's manifest is complete.

DCP's own collectives run on a process group of their own (gloo), so that a write in the background
(``save(..., background=True)``, DCP's ``async_save``) never interleaves with training's
collectives on the default group.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from traintel.errors import one_line

FILE = re.compile(r"^__(\d+)_\d+\.distcp$")
METADATA = ".metadata"


class ShardError(RuntimeError):
    """A DCP save or load that failed on some rank: the first rank's failure, in one line."""


def _plain(exc: BaseException) -> BaseException:
    """DCP's ``CheckpointException`` (a ``BaseException``, with every rank's failure) as a
    ``ShardError`` naming the first failed rank; any other exception as it is."""
    from torch.distributed.checkpoint.api import CheckpointException

    if not isinstance(exc, CheckpointException):
        return exc
    failures = exc.failures
    if not failures:
        return ShardError(one_line(exc))
    rank = min(failures)
    cause, _stack = failures[rank]
    return ShardError(f"rank {rank}: {one_line(cause)}")


@dataclass(frozen=True)
class Written:
    """What one rank wrote of a sharded checkpoint: its files (name, size, SHA-256), in name order."""

    directory: Path
    files: tuple[tuple[str, int, str], ...]

    @property
    def size(self) -> int:
        return sum(size for _, size, _ in self.files)


def is_shard_name(name: str) -> bool:
    """Whether ``name`` is one of the files DCP writes into a checkpoint's directory."""
    return name == METADATA or FILE.match(name) is not None


def files_of(directory: Path, rank: int) -> list[str]:
    """The names of rank ``rank``'s files in a DCP directory (rank 0's include ``.metadata``)."""
    try:
        names = [p.name for p in directory.iterdir()]
    except (FileNotFoundError, NotADirectoryError):
        return []
    own = [n for n in names if (m := FILE.match(n)) is not None and int(m.group(1)) == rank]
    if rank == 0 and METADATA in names:
        own.append(METADATA)
    return sorted(own)


def digest(path: Path) -> tuple[int, str]:
    """A file's size and SHA-256, read in blocks."""
    sha = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            sha.update(block)
            size += len(block)
    return size, sha.hexdigest()


def remove_own(directory: Path, rank: int) -> None:
    """Remove rank ``rank``'s files from a DCP directory, and the directory once it is empty."""
    for name in files_of(directory, rank):
        with contextlib.suppress(FileNotFoundError):
            (directory / name).unlink()
    with contextlib.suppress(OSError):
        directory.rmdir()  # the last rank to leave removes it


class ShardedState:
    """The model and optimizer of this rank, saved into and loaded from DCP directories."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> None:
        import torch.distributed as dist

        self.model = model
        self.optimizer = optimizer
        self.rank = rank
        self.group = dist.new_group(backend="gloo")
        """DCP's collectives (a collective of every rank: made when the run is built)."""

    def _state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optimizer = get_state_dict(self.model, self.optimizer)
        return {"model": model, "optimizer": optimizer}

    def save(
        self,
        directory: Path,
        *,
        background: bool = False,
        then: Callable[[Written], None] = lambda _: None,
    ) -> concurrent.futures.Future[Written]:
        """Write the model and optimizer into ``directory`` (every rank together), then ``then(what
        this rank wrote)``. What a crashed earlier write of this directory left of this rank's files
        goes first. In the background, training goes on once the state is copied (DCP's
        ``async_save``); the returned future ends once ``then`` has run (with its exception, if
        the write or ``then`` failed)."""
        from torch.distributed.checkpoint.state_dict_saver import async_save, save

        remove_own(directory, self.rank)
        directory.mkdir(parents=True, exist_ok=True)
        state = self._state()

        def finish() -> Written:
            files = []
            for name in files_of(directory, self.rank):
                size, sha = digest(directory / name)
                files.append((name, size, sha))
            written = Written(directory, tuple(files))
            then(written)
            return written

        if not background:
            done: concurrent.futures.Future[Written] = concurrent.futures.Future()
            try:
                save(state, checkpoint_id=directory, process_group=self.group)
                done.set_result(finish())
            except Exception as exc:
                done.set_exception(exc)
            except BaseException as exc:  # DCP's CheckpointException
                done.set_exception(_plain(exc))
            return done
        writing = async_save(state, checkpoint_id=directory, process_group=self.group)
        assert isinstance(writing, concurrent.futures.Future)  # the thread checkpointer's
        finished: concurrent.futures.Future[Written] = concurrent.futures.Future()

        def written(future: concurrent.futures.Future[Any]) -> None:
            try:
                future.result()
                finished.set_result(finish())
            except BaseException as exc:  # DCP's CheckpointException among them
                finished.set_exception(_plain(exc))

        writing.add_done_callback(written)
        return finished

    def load(self, directory: Path) -> None:
        """Put the model and optimizer of the DCP directory into this rank's (every rank together)."""
        from torch.distributed.checkpoint.state_dict import set_state_dict
        from torch.distributed.checkpoint.state_dict_loader import load

        state = self._state()
        try:
            load(state, checkpoint_id=directory, process_group=self.group)
        except Exception:
            raise
        except BaseException as exc:  # DCP's CheckpointException
            raise _plain(exc) from None
        set_state_dict(
            self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
        )
