"""A task for the resume tests: shuffled, augmented with random noise, dropout, and a kill switch.

Everything it draws from a generator is something an exact resume must put back: the
loader's shuffle order and workers' seeds, the noise each sample gets (torch's global
generator in the main process, the worker's seed in a worker), dropout masks. The
``RESUME_TEST_AT`` environment variable (``train:N``, ``eval:N``, ``sleep:N:S``) makes the
N-th training (or evaluation) forward call kill the process with SIGKILL, or sleep S
seconds, so a test can stop a run at an exact point; it is not part of the config, so a
resumed run's settings are the same. Under torchrun it acts only on the rank named by
``RESUME_TEST_RANK`` (every rank when unset) and only before torchrun's first restart.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch
from torch.utils.data import DataLoader, Dataset

from traintel.task import Task


class NoisySet(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Fixed samples, each returned with fresh noise from torch's global generator."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i] + 0.05 * torch.randn(8), self.y[i]


class Switched(torch.nn.Module):
    """The model, counting its forward calls to kill or pause the process at a chosen one."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1)
        )
        kind, _, rest = os.environ.get("RESUME_TEST_AT", "").partition(":")
        at, _, pause = rest.partition(":")
        self.kind, self.at, self.pause = kind, int(at or 0), float(pause or 0)
        rank = os.environ.get("RESUME_TEST_RANK")
        restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"
        if restarted or (rank is not None and rank != os.environ.get("RANK", "0")):
            self.kind = ""
        self.calls = {"train": 0, "eval": 0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = "train" if self.training else "eval"
        self.calls[mode] += 1
        target = "train" if self.kind == "sleep" else self.kind
        if mode == target and self.calls[mode] == self.at:
            if self.kind == "sleep":
                sys.stderr.write(f"sleeping at {self.at}\n")  # the test waits for this line
                sys.stderr.flush()
                time.sleep(self.pause)
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        out: torch.Tensor = self.net(x)
        return out


def make_task(*, samples: int = 240, batch_size: int = 16, num_workers: int = 0, seed: int = 0) -> Task:
    loader = DataLoader(
        NoisySet(samples, seed),
        batch_size=batch_size,
        shuffle=True,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )
    val = DataLoader(NoisySet(48, seed + 1), batch_size=batch_size)
    return Task(model=Switched(), loss_fn=torch.nn.functional.mse_loss, train_loader=loader, val_loader=val)
