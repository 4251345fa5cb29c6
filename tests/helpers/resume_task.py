"""A task for the resume tests: shuffled, augmented with random noise, dropout, and a kill switch.

Everything it draws from a generator is something an exact resume must put back: the
loader's shuffle order and workers' seeds, the noise each sample gets (torch's global
generator in the main process, the worker's seed in a worker), dropout masks. The
``RESUME_TEST_AT`` environment variable makes the process stop or pause at an exact point:

- ``train:N`` / ``eval:N``: the N-th training (evaluation) forward call kills the process with SIGKILL;
- ``sleep:N:S``: the N-th training forward call pauses S seconds;
- ``fetch:N:S``: the N-th training sample read (in the main process) pauses S seconds;
- ``evalsleep:N:S``: the N-th evaluation forward call pauses S seconds;
- ``evaluated:N:S``: ``EvaluatedPause``, a plug-in sink, pauses S seconds on epoch N's
  ``eval.epoch`` record: the evaluation is done, the epoch's checkpoint not yet taken;
- ``dcp:N`` (under torchrun): the N-th checkpoint's write of the model and optimizer
  (``traintel.run.sharded``) kills the process with SIGKILL once its first item is in a DCP file,
  leaving that file torn (in the background thread with ``checkpoint.async``);
- ``manifest:N``: the N-th checkpoint's state file and manifest (``traintel.run.checkpoint.write``)
  kill the process with SIGKILL before they are written: under torchrun its DCP files are on disk.

A pause first writes ``sleeping at N`` (``fetching at N``, ``evaluating at N``, ``evaluated at N``) on stderr, so a
test can wait for it and send a signal. The variable is not part of the config, so a resumed
run's settings are the same. Under torchrun it acts only on the rank named by
``RESUME_TEST_RANK`` (every rank when unset) and only before torchrun's first restart.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from traintel.records import EvalRecord, Record
from traintel.task import Task


def _switch() -> tuple[str, int, float]:
    """(kind, N, seconds) from ``RESUME_TEST_AT``; kind is empty where it does not apply."""
    kind, _, rest = os.environ.get("RESUME_TEST_AT", "").partition(":")
    at, _, pause = rest.partition(":")
    rank = os.environ.get("RESUME_TEST_RANK")
    restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"
    if restarted or (rank is not None and rank != os.environ.get("RANK", "0")):
        kind = ""
    return kind, int(at or 0), float(pause or 0)


def _pause(what: str, at: int, seconds: float) -> None:
    sys.stderr.write(f"{what} at {at}\n")  # the test waits for this line
    sys.stderr.flush()
    time.sleep(seconds)


class NoisySet(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Fixed samples, each returned with fresh noise from torch's global generator; ``delay``
    seconds per sample make a slow loader, and the training set counts its reads for ``fetch:N:S``."""

    def __init__(self, n: int, seed: int, *, delay: float = 0.0, switched: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)
        self.delay = delay
        kind, self.at, self.pause = _switch()
        self.fetch = switched and kind == "fetch"
        self.reads = 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.delay:
            time.sleep(self.delay)
        if self.fetch:
            self.reads += 1
            if self.reads == self.at:
                _pause("fetching", self.at, self.pause)
        return self.x[i] + 0.05 * torch.randn(8), self.y[i]


class Switched(torch.nn.Module):
    """The model, counting its forward calls to kill or pause the process at a chosen one."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1)
        )
        self.kind, self.at, self.pause = _switch()
        self.calls = {"train": 0, "eval": 0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = "train" if self.training else "eval"
        self.calls[mode] += 1
        target = {"sleep": "train", "evalsleep": "eval"}.get(self.kind, self.kind)
        if mode == target and self.calls[mode] == self.at:
            if self.kind == "sleep":
                _pause("sleeping", self.at, self.pause)
            elif self.kind == "evalsleep":
                _pause("evaluating", self.at, self.pause)
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        out: torch.Tensor = self.net(x)
        return out


class Plain:
    """A plain iterable over a loader: no length, no sampler, no generator to be seen."""

    def __init__(self, loader: DataLoader[Any]) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[Any]:
        yield from self.loader


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm_checkpoint_kills() -> None:
    """``dcp:N`` and ``manifest:N``: patch the checkpoint writers of this process (once)."""
    kind, at, _ = _switch()
    if kind not in ("dcp", "manifest") or getattr(_arm_checkpoint_kills, "armed", False):
        return
    _arm_checkpoint_kills.armed = True  # type: ignore[attr-defined]
    from torch.distributed.checkpoint import filesystem

    from traintel.run import checkpoint, sharded

    calls = {"save": 0, "manifest": 0}
    save, write, write_item = sharded.ShardedState.save, checkpoint.write, filesystem._write_item

    def counted_save(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls["save"] += 1
        return save(self, *args, **kwargs)

    def torn_item(transforms: Any, stream: Any, *args: Any, **kwargs: Any) -> Any:
        result = write_item(transforms, stream, *args, **kwargs)
        if kind == "dcp" and calls["save"] == at:
            stream.flush()
            _kill()
        return result

    def killed_manifest(*args: Any, **kwargs: Any) -> Any:
        calls["manifest"] += 1
        if kind == "manifest" and calls["manifest"] == at:
            _kill()
        return write(*args, **kwargs)

    sharded.ShardedState.save = counted_save  # type: ignore[method-assign]
    filesystem._write_item = torn_item
    checkpoint.write = killed_manifest


def make_task(
    *,
    samples: int = 240,
    batch_size: int = 16,
    num_workers: int = 0,
    seed: int = 0,
    delay: float = 0.0,
    plain: bool = False,
) -> Task:
    """The task; ``delay`` seconds per training sample, ``plain`` hides the training loader behind a
    plain iterable (then it shuffles from torch's global generator, which a pass draws from)."""
    _arm_checkpoint_kills()
    loader = DataLoader(
        NoisySet(samples, seed, delay=delay, switched=True),
        batch_size=batch_size,
        shuffle=True,
        num_workers=num_workers,
        generator=None if plain else torch.Generator().manual_seed(seed),
    )
    val = DataLoader(NoisySet(48, seed + 1), batch_size=batch_size)
    train = Plain(loader) if plain else loader
    return Task(model=Switched(), loss_fn=torch.nn.functional.mse_loss, train_loader=train, val_loader=val)


class EvaluatedPause:
    """A plug-in sink (``sinks.extra``) for ``evaluated:N:S``."""

    name = "evaluated-pause"

    def open(self, context: object) -> None:
        pass

    def emit(self, record: Record) -> None:
        kind, at, seconds = _switch()
        if kind == "evaluated" and isinstance(record, EvalRecord) and record.epoch == at:
            _pause("evaluated", at, seconds)

    def close(self) -> None:
        pass
