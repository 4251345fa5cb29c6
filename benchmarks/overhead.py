"""Per-step overhead of traintel against a plain PyTorch loop and a bare Ignite Engine.

What: one process trains MLPs on pre-built batches in ten cases (``--cases`` picks some):

1. a plain PyTorch loop with gradient accumulation (k=3: forward, ``loss / k``
   backward, ``optimizer.step()`` and ``zero_grad()`` every k micro-batches), no logging;
2. a bare Ignite ``Engine`` doing the same update, one Ignite iteration per
   micro-batch, no handlers;
3. traintel with all three sinks on (JSON lines to ``os.devnull``, the diagnostic file
   in a temporary run directory, Prometheus on a free port) at the default cadence
   (``telemetry.every=10``);
4. the same with ``telemetry.every=1``;
5. a model with about 100x the compute per step, trained by the plain loop and by
   traintel as in 3;
6. a realistic case: an MLP whose optimizer step of k=4 micro-batches takes a few
   milliseconds (about 7-10 ms on a 2-core virtual machine; ``--realistic-hidden``,
   ``--realistic-layers``), over enough steps (``--realistic-batches``, 300 steps by default)
   that what happens outside the loop is under 1% of it: the plain loop (6a) and traintel at
   ``every=10`` (6b) and ``every=1`` (6c), and at ``every=10`` with two training metrics (6d:
   ``Task.train_metrics``, one from the outputs, one from the losses).

Each case is reported as wall time per optimizer step (k micro-batches: k=3, and k=4 in
case 6, a property of the case) and as a ratio to the plain loop. Budgets, the most a
traintel case's ratio should be: tiny model 1.15 at ``every=10`` and 1.30 at ``every=1``;
realistic model 1.01 and 1.02 (1.01 with two training metrics); the report says whether each
case is within its budget.

Why: traintel adds a roughly fixed cost to every optimizer step (Ignite event
dispatch, item-weighted loss scaling and bookkeeping tensors, and every N steps one
host transfer and records fanned out to three sinks). On a model this small that cost
is as large as it will ever be relative to the compute, so cases 2-4 are the worst
case; cases 5 and 6 show how the same cost dilutes on a model that does some real work.

How it measures: paired windows. A shared virtual machine's speed changes from one
tenth of a second to the next (the plain loop alone swings between 1x and 2x), so two
runs timed a second apart do not see the same machine. Here every case carries a
*shadow*: the plain loop on its own copy of the model, fed through the case's data
iterator. Just before the case receives the first micro-batch of each window of
``--window`` optimizer steps, the shadow trains on that same window, timed. The case's
own time for the window is the time until the next window starts (or the last epoch
ends) minus the shadow's. Each window of the case is thus next to a plain-loop window on
the same batches, a few milliseconds apart.

Reported per case, over the windows of a run but its first (where the shadow, which
goes first, pays the run's cold start):

- ratio to plain: the run's own time over its shadow's, everything included (records
  delivered, epoch ends); the median over rounds, and its quartiles. This is the cost a
  user pays.
- typical window: the median over all windows of all rounds of case / shadow. It leaves
  out what happens in only a few windows (deliveries, epoch ends), so it shows the cost
  of the step itself.
- cases 1, 5a and 6a, the plain loop with its own shadow, measure the method: their ratios
  should be 1.

A window of traintel at ``every=10`` holds one emitted step; the last window of each
epoch holds the epoch's end (the epoch record, Ignite's epoch events). What traintel's
background threads (the writers, the exporter) do while the shadow runs is charged to the
shadow. The per-run table shows what happens outside the loop (run.start, run.end, closing
the sinks) and the CPU time of the other threads per step: the Python threads (traintel's)
apart from the native ones (torch's workers), so that the first can be checked to be small.

Every run of a model size starts from the same initial weights, copied into one
working model (and one shadow model), and batches are a Python list of tensors, so
data loading is out of it. Building (optimizer, sinks, Prometheus server) is outside
the timed region. Objects alive after setup (mostly torch's) are moved out of the
garbage collector's reach with ``gc.freeze()``, and each run starts after a
``gc.collect()``, so a full collection of torch's heap never lands inside a timed
loop. Every case gets one warm-up run, which also checks that each case ends with
exactly its shadow's weights (the comparison is like for like); then ``--repeats``
rounds run every case once, in an order rotated by one each round.

Under glibc, freed memory stays in the process's heap (``keep_heap``). With glibc's default
thresholds each ``zero_grad`` let the heap shrink and the next backward grow it again: a page
fault per 4 KiB of gradients (about 3 us each on the 2-core VM, up to 400 a realistic step,
over 10% of it). How many a step took depended on where earlier allocations had landed, so
the case and its shadow differed by tens of faults a step, and the realistic method check
read 0.99 to 1.02 from one process to the next. ``--default-heap`` leaves glibc's thresholds
as they are.

Usage::

    python benchmarks/overhead.py [--repeats 11] [--epochs 3] [--threads 1] [--json overhead.json]
    python benchmarks/overhead.py --cases traintel,traintel_realistic --repeats 5

On a machine shared with other work, ``--threads 1`` keeps torch's worker threads from
waiting on each other behind it (with two threads on two busy cores the realistic case's
windows swung by up to 10x).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO, Literal

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events

from traintel.config import TelemetryConfig
from traintel.engine.outputs import StepOutput
from traintel.run.api import build
from traintel.task import Task

K = 3
"""Micro-batches per optimizer step (gradient accumulation) of the tiny and large cases."""
REALISTIC_K = 4
"""Micro-batches per optimizer step of the realistic cases."""
DEFAULT_WINDOW = 10
"""Optimizer steps per timed window: the default cadence, so each window of traintel at
``every=10`` holds one emitted step's work."""
DEFAULT_MAX_DELAY = TelemetryConfig.model_fields["max_delay_seconds"].default
"""``telemetry.max_delay_seconds`` as a user gets it."""
LR = 0.01
IN_FEATURES = 32
TINY_HIDDEN = 64

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameters (malloc.h)."""
HEAP_MMAP_THRESHOLD = 32 * 1024 * 1024
"""Blocks up to this size come from the heap, not from a fresh ``mmap`` each (glibc's largest
allowed value on 64-bit; the large model's biggest gradient is 4 MiB)."""
HEAP_TRIM_THRESHOLD = 1 << 30
"""Free memory at the heap's top kept before glibc gives it back to the kernel."""

Batch = tuple[torch.Tensor, torch.Tensor]
Kind = Literal["plain", "ignite", "traintel"]


@dataclass(frozen=True)
class Sample:
    """One timed run of a case, with its shadow."""

    loop_s: float
    """First epoch start to last epoch end, shadow windows included."""
    total_s: float
    """The whole training call (``run.run()`` for traintel: run.start, run.end, sink close)."""
    own_s: tuple[float, ...]
    """The case's time for each window, the shadow's taken out."""
    shadow_s: tuple[float, ...]
    """The shadow's time for the same windows."""
    steps: tuple[int, ...]
    """Optimizer steps in each window."""
    python_threads_cpu_s: float | None
    """CPU time over the loop of the process's other Python threads (``threading``'s: traintel's
    writers and exporter); None where ``/proc`` has no per-thread ``schedstat``."""
    native_threads_cpu_s: float | None
    """CPU time over the loop of its threads that Python did not start (torch's workers)."""


ThreadTimes = dict[int, tuple[bool, int]]
"""Per thread id other than the caller's: (whether ``threading`` started it, CPU nanoseconds so far)."""


def threads_cpu() -> ThreadTimes | None:
    """The CPU time used so far by each of this process's threads but the calling one; None without
    ``/proc``."""
    me = threading.get_native_id()
    python = {t.native_id for t in threading.enumerate()}
    times: ThreadTimes = {}
    try:
        for task in os.scandir("/proc/self/task"):
            tid = int(task.name)
            if tid != me:
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread that just ended
                    times[tid] = (tid in python, int(Path(task.path, "schedstat").read_text().split()[0]))
    except OSError:
        return None
    return times


def cpu_between(start: ThreadTimes | None, end: ThreadTimes | None) -> tuple[float | None, float | None]:
    """CPU seconds used between two ``threads_cpu`` readings: (Python threads, native threads).

    A thread counts from its first reading, or from its start when it started in between; one that
    ended in between is left out (its last CPU time is unknown)."""
    if start is None or end is None:
        return None, None
    used = {True: 0, False: 0}
    for tid, (python, ns) in end.items():
        before = start.get(tid)
        used[python] += ns - (before[1] if before is not None else 0)
    return used[True] / 1e9, used[False] / 1e9


def keep_heap() -> bool:
    """Have glibc keep freed memory in the heap for reuse (``HEAP_MMAP_THRESHOLD``,
    ``HEAP_TRIM_THRESHOLD``); whether it took them. False where the C library is not glibc.

    Every step frees its gradients (``zero_grad``) and the next backward allocates them again
    (1 MiB per 512x512 weight). With glibc's default, dynamic thresholds the heap's top is
    given back to the kernel and taken again around them, and every 4 KiB taken again costs a
    page fault: a cost set by the heap's layout, not by the loop, which differed between two
    identical loops in one process (see the module's docstring). With the heap kept, neither the
    plain loop nor traintel takes a page fault per step.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mmap_set = mallopt(M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD) == 1
    trim_set = mallopt(M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD) == 1
    return mmap_set and trim_set


@dataclass(frozen=True)
class Case:
    """One way of training one model on one data set."""

    key: str
    label: str
    kind: Kind
    model_name: str
    """"tiny", "large" or "realistic"."""
    model: torch.nn.Module
    """Initial weights, never trained: each run copies them into a working model."""
    data: list[Batch]
    epochs: int
    every: int = 10
    k: int = K
    """Micro-batches per optimizer step."""
    train_metrics: bool = False
    """Whether the task gives two training metrics (``TRAIN_METRICS``)."""

    @property
    def steps(self) -> int:
        return self.epochs * len(self.data) // self.k


def plain_steps(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[Batch], k: int
) -> None:
    """The plain loop's body over whole steps of ``k`` micro-batches: the plain cases and every shadow."""
    for i, (x, y) in enumerate(batches, start=1):
        loss = F.mse_loss(model(x), y) / k
        loss.backward()
        if i % k == 0:
            optimizer.step()
            optimizer.zero_grad()


class Interleaved:
    """A case's data, a list of micro-batches, with the shadow run before each window.

    When the case asks for the first micro-batch of a window, the shadow trains on that
    window first; the time from there to the next window's start (or ``finish``) is the
    case's window plus the shadow's.
    """

    def __init__(self, data: list[Batch], shadow: torch.nn.Module, window: int, k: int) -> None:
        self.data = data
        self.k = k
        self.size = window * k
        self.shadow = shadow
        self.optimizer = torch.optim.SGD(shadow.parameters(), lr=LR)
        self.starts: list[float] = []
        self.resumes: list[float] = []
        self.steps: list[int] = []
        self.cpu_start: ThreadTimes | None = None
        self.end = float("nan")
        self.cpu_end: ThreadTimes | None = None

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator[Batch]:
        size = self.size
        for first in range(0, len(self.data), size):
            window = self.data[first : first + size]
            if not self.starts:
                self.cpu_start = threads_cpu()  # read before the clock starts
            self.starts.append(time.perf_counter())
            plain_steps(self.shadow, self.optimizer, window, self.k)
            self.resumes.append(time.perf_counter())
            self.steps.append(len(window) // self.k)
            yield from window

    def finish(self) -> None:
        """The loop has ended: its end time and the other threads' CPU times, read after it."""
        self.end = time.perf_counter()
        self.cpu_end = threads_cpu()  # read after the clock stops

    def sample(self, total_s: float) -> Sample:
        """The run's sample, once ``finish`` was called at the last epoch's end."""
        end = self.end
        ends = [*self.starts[1:], end]
        python_cpu, native_cpu = cpu_between(self.cpu_start, self.cpu_end)
        return Sample(
            loop_s=end - self.starts[0],
            total_s=total_s,
            own_s=tuple(e - r for e, r in zip(ends, self.resumes, strict=True)),
            shadow_s=tuple(r - s for r, s in zip(self.resumes, self.starts, strict=True)),
            steps=tuple(self.steps),
            python_threads_cpu_s=python_cpu,
            native_threads_cpu_s=native_cpu,
        )


def finish_at_epoch_end(engine: Engine, data: Interleaved) -> None:
    """End ``data``'s loop at ``engine``'s last ``EPOCH_COMPLETED``; added after traintel's handlers,
    so the epoch record is inside the loop's time. Only the last epoch's end: ``finish`` reads
    ``/proc``, which must not land inside a later window."""

    def last_epoch(engine: Engine, epoch: int) -> bool:
        return epoch == engine.state.max_epochs

    engine.add_event_handler(Events.EPOCH_COMPLETED(event_filter=last_epoch), lambda _engine: data.finish())


class Bench:
    """Runs cases: a working and a shadow model per model size, a temporary directory, ``os.devnull``."""

    def __init__(self, root: Path, devnull: BinaryIO, window: int) -> None:
        self.root = root
        self.devnull = devnull
        self.window = window
        self.count = 0
        self._models: dict[tuple[int, str], torch.nn.Module] = {}
        self.max_delay: dict[str, float] = {}
        """Per traintel case: ``telemetry.max_delay_seconds`` for its timed runs (see ``warm_up``)."""

    def model_for(self, case: Case, role: str) -> torch.nn.Module:
        """The ``role`` ("working" or "shadow") model for ``case.model``, reset in place to the
        initial weights.

        Copying into the same tensors, rather than a fresh deep copy per run, keeps every
        run on the same parameter memory (first touches of new memory are slow on some VMs).
        """
        model = self._models.get((id(case.model), role))
        if model is None:
            model = self._models[id(case.model), role] = copy.deepcopy(case.model)
        with torch.no_grad():
            for p, initial in zip(model.parameters(), case.model.parameters(), strict=True):
                p.copy_(initial)
                p.grad = None
        model.train()
        return model

    def trained(self, case: Case, role: str) -> list[torch.Tensor]:
        """The ``role`` model's weights as ``case``'s last run left them."""
        return [p.detach().clone() for p in self._models[id(case.model), role].parameters()]

    def run(self, case: Case) -> Sample:
        """Reset the working and shadow models and train them once as ``case`` says, timed."""
        model = self.model_for(case, "working")
        data = Interleaved(case.data, self.model_for(case, "shadow"), self.window, case.k)
        if case.kind == "plain":
            return run_plain(model, data, case.epochs)
        if case.kind == "ignite":
            return run_ignite(model, data, case.epochs)
        return self._run_traintel(case, model, data)

    def _run_traintel(self, case: Case, model: torch.nn.Module, data: Interleaved) -> Sample:
        self.count += 1
        run_id = f"bench-{case.key}-{self.count}"
        config: dict[str, Any] = {
            "run": {"dir": str(self.root / run_id), "id": run_id},
            "trainer": {
                "max_epochs": case.epochs,
                "accumulation_steps": case.k,
                "optimizer": {"name": "sgd", "lr": LR},
                "device": "cpu",
            },
            "telemetry": {
                "every": case.every,
                "max_delay_seconds": self.max_delay.get(case.key, DEFAULT_MAX_DELAY),
            },
            "sinks": {"prometheus": {"port": 0}},
        }
        task = Task(model=model, loss_fn=F.mse_loss, train_loader=data)
        if case.train_metrics:
            task.train_metrics = TRAIN_METRICS
        run = build(config, task=task, json_stream=self.devnull)
        finish_at_epoch_end(run.trainer, data)
        gc.collect()
        t0 = time.perf_counter()
        end = run.run()
        total = time.perf_counter() - t0
        if end.status != "completed" or end.step != case.steps:
            msg = (
                f"{case.key}: run ended {end.status} ({end.reason}) at step {end.step}, expected {case.steps}"
            )
            raise RuntimeError(msg)
        return data.sample(total)


def run_plain(model: torch.nn.Module, data: Interleaved, epochs: int) -> Sample:
    """Case 1: the plain PyTorch loop."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    gc.collect()
    t0 = time.perf_counter()
    for _ in range(epochs):
        plain_steps(model, optimizer, data, data.k)
    data.finish()
    return data.sample(data.end - t0)


def run_ignite(model: torch.nn.Module, data: Interleaved, epochs: int) -> Sample:
    """Case 2: a bare Ignite Engine, one iteration per micro-batch, no handlers but the timer."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    k = data.k

    def update(engine: Engine, batch: Batch) -> None:
        x, y = batch
        loss = F.mse_loss(model(x), y) / k
        loss.backward()
        if engine.state.iteration % k == 0:  # the iteration count runs across epochs; B % k == 0
            optimizer.step()
            optimizer.zero_grad()

    engine = Engine(update)
    finish_at_epoch_end(engine, data)
    gc.collect()
    t0 = time.perf_counter()
    engine.run(data, max_epochs=epochs)
    return data.sample(time.perf_counter() - t0)


def make_data(n_batches: int, batch_size: int, seed: int) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch_size, IN_FEATURES, generator=gen), torch.randn(batch_size, 1, generator=gen))
        for _ in range(n_batches)
    ]


def make_tiny(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(IN_FEATURES, TINY_HIDDEN), torch.nn.ReLU(), torch.nn.Linear(TINY_HIDDEN, 1)
    )


def make_large(hidden: int, layers: int, seed: int) -> torch.nn.Module:
    """``layers`` hidden ``hidden x hidden`` layers; compute per item grows with layers * hidden**2.

    Deeper rather than only wider: at 32 items per micro-batch one very wide layer is bound by
    memory traffic on its weights, and its timing was much noisier on shared virtual machines.
    """
    torch.manual_seed(seed)
    modules: list[torch.nn.Module] = [torch.nn.Linear(IN_FEATURES, hidden), torch.nn.ReLU()]
    for _ in range(layers):
        modules += [torch.nn.Linear(hidden, hidden), torch.nn.ReLU()]
    modules.append(torch.nn.Linear(hidden, 1))
    return torch.nn.Sequential(*modules)


def _mae(out: StepOutput) -> torch.Tensor:
    """A training metric from the step's outputs: their mean absolute error, on the device."""
    errors = [(output - target).abs().sum() for output, target in out.outputs]
    return torch.stack(errors).sum() / sum(target.numel() for _, target in out.outputs)


def _largest_share(out: StepOutput) -> torch.Tensor:
    """A training metric from the step's losses: the largest s_b of its window."""
    return torch.stack(list(out.losses)).max()


TRAIN_METRICS = {"mae": _mae, "largest_share": _largest_share}
"""Case 6d's training metrics: one from the model's outputs, one from the losses."""


CASE_KEYS = (
    "plain",
    "ignite",
    "traintel",
    "traintel_every1",
    "plain_large",
    "traintel_large",
    "plain_realistic",
    "traintel_realistic",
    "traintel_realistic_every1",
    "traintel_realistic_metrics",
)
"""Every case, in the tables' order; ``--cases`` picks some of them."""
BUDGETS = {
    "traintel": 1.15,
    "traintel_every1": 1.30,
    "traintel_realistic": 1.01,
    "traintel_realistic_every1": 1.02,
    "traintel_realistic_metrics": 1.01,
}
"""The most a traintel case's ratio to plain (median over rounds) should be."""


def make_cases(args: argparse.Namespace) -> list[Case]:
    """The cases ``--cases`` names, in ``CASE_KEYS`` order; a model is built only for a case that uses it."""
    wanted = set(args.cases)
    cases: list[Case] = []
    if wanted & {"plain", "ignite", "traintel", "traintel_every1"}:
        tiny, data = make_tiny(args.seed), make_data(args.batches, args.batch_size, args.seed)
        n = args.epochs
        cases += [
            Case("plain", "1. plain PyTorch loop (k=3)", "plain", "tiny", tiny, data, n),
            Case("ignite", "2. bare Ignite Engine, no handlers", "ignite", "tiny", tiny, data, n),
            Case("traintel", "3. traintel, 3 sinks, every=10", "traintel", "tiny", tiny, data, n, 10),
            Case("traintel_every1", "4. traintel, 3 sinks, every=1", "traintel", "tiny", tiny, data, n, 1),
        ]
    if wanted & {"plain_large", "traintel_large"}:
        large = make_large(args.large_hidden, args.large_layers, args.seed)
        data = make_data(args.large_batches, args.batch_size, args.seed)
        cases += [
            Case("plain_large", "5a. plain PyTorch loop, large model", "plain", "large", large, data, 1),
            Case(
                "traintel_large", "5b. traintel, 3 sinks, every=10, large model", "traintel", "large", large,
                data, 1, 10,
            ),
        ]  # fmt: skip
    if wanted & {
        "plain_realistic",
        "traintel_realistic",
        "traintel_realistic_every1",
        "traintel_realistic_metrics",
    }:
        real = make_large(args.realistic_hidden, args.realistic_layers, args.seed)
        data = make_data(args.realistic_batches, args.batch_size, args.seed)
        k = REALISTIC_K
        cases += [
            Case(
                "plain_realistic", f"6a. plain PyTorch loop, realistic model (k={k})", "plain", "realistic",
                real, data, 1, k=k,
            ),
            Case(
                "traintel_realistic", "6b. traintel, 3 sinks, every=10, realistic model", "traintel",
                "realistic", real, data, 1, 10, k,
            ),
            Case(
                "traintel_realistic_every1", "6c. traintel, 3 sinks, every=1, realistic model", "traintel",
                "realistic", real, data, 1, 1, k,
            ),
            Case(
                "traintel_realistic_metrics",
                "6d. traintel, 3 sinks, every=10, 2 training metrics, realistic model", "traintel",
                "realistic", real, data, 1, 10, k, train_metrics=True,
            ),
        ]  # fmt: skip
    return [case for case in cases if case.key in wanted]


def max_param_diff(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a, b, strict=True))


def warm_up(bench: Bench, cases: Sequence[Case]) -> dict[str, float]:
    """Run each case once (not recorded); return each case's max |weight diff| to its shadow.

    traintel delivers records by the clock (``telemetry.max_delay_seconds`` after the previous
    delivery), and the shadow stretches a run's wall time: left as it is, a timed run would
    deliver more often per step than the same run without a shadow. So each traintel case's
    timed runs get the delay scaled by its warm-up's wall time over its own time, which keeps
    deliveries per step as in a run without a shadow.
    """
    diffs = {}
    for case in cases:
        sample = bench.run(case)
        diffs[case.key] = max_param_diff(bench.trained(case, "working"), bench.trained(case, "shadow"))
        if case.kind == "traintel":
            bench.max_delay[case.key] = DEFAULT_MAX_DELAY * sample.loop_s / sum(sample.own_s)
    return diffs


def measure(bench: Bench, cases: Sequence[Case], repeats: int) -> list[dict[str, Sample]]:
    """``repeats`` rounds; each runs every case once, in an order rotated by one per round."""
    rounds: list[dict[str, Sample]] = []
    for r in range(repeats):
        order = [*cases[r % len(cases) :], *cases[: r % len(cases)]]
        rounds.append({case.key: bench.run(case) for case in order})
        print(f"  round {r + 1}/{repeats} done", file=sys.stderr)
    return rounds


def summarize(cases: Sequence[Case], rounds: Sequence[dict[str, Sample]]) -> list[dict[str, Any]]:
    """Each case's figures over every run's windows but the first (see the module's docstring)."""
    rows = []
    for case in cases:
        runs = [r[case.key] for r in rounds]
        kept = [(run.own_s[1:], run.shadow_s[1:], run.steps[1:]) for run in runs if len(run.own_s) > 1]
        if not kept:  # runs of one window (tiny test sizes): keep it
            kept = [(run.own_s, run.shadow_s, run.steps) for run in runs]
        run_ratios = [sum(own) / sum(shadow) for own, shadow, _ in kept]
        pairs = [p for own, shadow, steps in kept for p in zip(own, shadow, steps, strict=True)]
        steps = [sum(n) for _, _, n in kept]
        rows.append(
            {
                "key": case.key,
                "case": case.label,
                "model": case.model_name,
                "k": case.k,
                "steps_per_run": case.steps,
                "windows": len(pairs),
                "us_per_step": statistics.median(
                    sum(own) / n * 1e6 for (own, _, _), n in zip(kept, steps, strict=True)
                ),
                "plain_us_per_step": statistics.median(
                    sum(shadow) / n * 1e6 for (_, shadow, _), n in zip(kept, steps, strict=True)
                ),
                "ratio_to_plain": statistics.median(run_ratios),
                "ratio_quartiles": quartiles(run_ratios),
                "typical_window_ratio": statistics.median(o / s for o, s, _ in pairs),
                "overhead_us_per_step": statistics.median(
                    (sum(own) - sum(shadow)) / n * 1e6
                    for (own, shadow, _), n in zip(kept, steps, strict=True)
                ),
                "python_threads_cpu_us_per_step": per_step_us(
                    (r.python_threads_cpu_s for r in runs), case.steps
                ),
                "native_threads_cpu_us_per_step": per_step_us(
                    (r.native_threads_cpu_s for r in runs), case.steps
                ),
                "loop_ms": statistics.median(run.loop_s * 1e3 for run in runs),
                "run_call_ms": statistics.median(run.total_s * 1e3 for run in runs),
            }
        )
    return rows


def per_step_us(seconds: Iterable[float | None], steps: int) -> float | None:
    """The median of the runs' known ``seconds`` in microseconds per step; None when none is known."""
    known = [s / steps * 1e6 for s in seconds if s is not None]
    return statistics.median(known) if known else None


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """First and third quartile (the spread of the per-round ratios)."""
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def environment(heap_kept: bool) -> dict[str, Any]:
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "?"

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pytorch-ignite": version("pytorch-ignite"),
        "traintel": version("traintel"),
        "platform": platform.platform(),
        "cpus_usable": affinity,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "heap_kept": heap_kept,
    }


def render(
    env: dict[str, Any], sizes: dict[str, int], args: argparse.Namespace, rows: Sequence[dict[str, Any]]
) -> str:
    by_key = {r["key"]: r for r in rows}
    models = {r["model"] for r in rows}
    lines = [
        f"torch {env['torch']}, pytorch-ignite {env['pytorch-ignite']}, traintel {env['traintel']}, "
        f"Python {env['python']}; torch threads {env['torch_threads']} (interop "
        f"{env['torch_interop_threads']}), usable CPUs {env['cpus_usable']}; {env['platform']}",
        "- heap: freed memory kept for reuse (glibc mallopt)"
        if env["heap_kept"]
        else "- heap: the C library's default thresholds (freed memory may go back to the kernel)",
        "",
        f"- step = one optimizer step = k micro-batches of {args.batch_size} items (k={K}; "
        f"k={REALISTIC_K} for the realistic model); {args.repeats} rounds.",
        f"- window = {args.window} steps; each is paired with the plain loop (the case's shadow) on the same "
        "batches just before it.",
        "- every run's first window is left out (the shadow, which goes first, pays the cold start).",
        "- us/step, plain us/step, ratio and overhead: the run's own time and its shadow's, everything "
        "included; medians over rounds (quartiles of the ratio over rounds).",
        "- typical window: the median over all windows of case / shadow (without the few windows that "
        "deliver records or end an epoch).",
    ]
    tiny_us = by_key["plain"]["plain_us_per_step"] if "plain" in by_key else None
    if "tiny" in models:
        lines.append(
            f"- tiny model: Linear({IN_FEATURES},{TINY_HIDDEN})-ReLU-Linear({TINY_HIDDEN},1) "
            f"({sizes['tiny']:,} parameters), {args.epochs} epochs x {args.batches} micro-batches per run."
        )
    for group, hidden, layers, batches in (
        ("large", args.large_hidden, args.large_layers, args.large_batches),
        ("realistic", args.realistic_hidden, args.realistic_layers, args.realistic_batches),
    ):
        if group not in models:
            continue
        plain_us = statistics.median(r["plain_us_per_step"] for r in rows if r["model"] == group)
        versus = f"; its plain step takes {plain_us / tiny_us:.0f}x the tiny one's" if tiny_us else ""
        lines.append(
            f"- {group} model: Linear({IN_FEATURES},{hidden})-ReLU-{layers}x[Linear({hidden},{hidden})-ReLU]-"
            f"Linear({hidden},1) ({sizes[group]:,} parameters), 1 epoch x {batches} micro-batches per run; "
            f"plain step {plain_us / 1e3:.2f} ms{versus}."
        )
    lines += [
        "",
        "| case | windows | us/step | plain us/step | ratio to plain | quartiles of the ratio "
        "| typical window | overhead us/step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio, extra = r["ratio_to_plain"], r["overhead_us_per_step"]
        low, high = r["ratio_quartiles"]
        lines.append(
            f"| {r['case']} | {r['windows']} | {r['us_per_step']:.1f} | {r['plain_us_per_step']:.1f} "
            f"| {ratio:.3f} | {low:.3f}-{high:.3f} | {r['typical_window_ratio']:.3f} | {extra:+.1f} |"
        )
    budgeted = [r for r in rows if r["key"] in BUDGETS]
    if budgeted:
        lines += ["", "Budgets (ratio to plain, median over rounds):", ""]
        for r in budgeted:
            budget, ratio = BUDGETS[r["key"]], r["ratio_to_plain"]
            verdict = "within" if ratio <= budget else "OVER"
            lines.append(f"- {r['case']}: {ratio:.3f} <= {budget:.2f}: {verdict}")
    lines += [
        "",
        "Per-run cost outside the loop: the whole `engine.run()` / `run.run()` call minus the loop",
        "(for traintel: run.start, run.end, closing the sinks, stopping the Prometheus server); both",
        "include the shadow's windows. Then the CPU time per step of the process's other threads during",
        "the loop: its Python threads (traintel's writers and exporter) and the threads Python did not",
        "start (torch's workers, which spin while they wait for work, so theirs grows with the loop's",
        "wall time); what part of it ran while the shadow trained is in the shadow's time, not the case's.",
        "",
        "| case | loop ms | whole call ms | outside loop ms | outside, % of loop "
        "| Python threads' CPU us/step | native threads' CPU us/step |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        loop, call = r["loop_ms"], r["run_call_ms"]
        python, native = (
            "n/a" if cpu is None else f"{cpu:.1f}"
            for cpu in (r["python_threads_cpu_us_per_step"], r["native_threads_cpu_us_per_step"])
        )
        share = (call - loop) / loop * 100
        lines.append(
            f"| {r['case']} | {loop:.1f} | {call:.1f} | {call - loop:.1f} | {share:.2f} "
            f"| {python} | {native} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add = parser.add_argument
    add("--repeats", type=int, default=11, help="interleaved timed rounds (default 11)")
    add("--epochs", type=int, default=3, help="epochs per tiny-model run (default 3)")
    add("--batches", type=int, default=300, help="tiny-model micro-batches per epoch (default 300)")
    add("--batch-size", type=int, default=32, help="items per micro-batch (default 32)")
    add("--large-hidden", type=int, default=1024, help="large model width (default 1024)")
    add("--large-layers", type=int, default=8, help="large model hidden-to-hidden layers (default 8)")
    add("--large-batches", type=int, default=150, help="large-model micro-batches, 1 epoch (default 150)")
    add("--realistic-hidden", type=int, default=512, help="realistic model width (default 512)")
    add("--realistic-layers", type=int, default=2, help="realistic model hidden-to-hidden layers (default 2)")
    add(
        "--realistic-batches",
        type=int,
        default=1200,
        help="realistic-model micro-batches, 1 epoch (default 1200: 300 steps)",
    )
    add(
        "--cases",
        type=lambda text: [key.strip() for key in text.split(",") if key.strip()],
        default=list(CASE_KEYS),
        metavar="KEY,...",
        help=f"run only these cases (default all: {','.join(CASE_KEYS)})",
    )
    add(
        "--window",
        type=int,
        default=DEFAULT_WINDOW,
        help=f"steps per timed window (default {DEFAULT_WINDOW})",
    )
    add("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    add(
        "--default-heap",
        action="store_true",
        help="leave glibc's heap thresholds as they are (default: keep freed memory, see keep_heap)",
    )
    add("--seed", type=int, default=0, help="seed for weights and data (default 0)")
    add("--json", type=Path, default=None, metavar="PATH", help="also write the numbers to PATH")
    args = parser.parse_args(argv)
    positive = (
        "repeats",
        "window",
        "epochs",
        "batches",
        "batch_size",
        "large_hidden",
        "large_layers",
        "large_batches",
        "realistic_hidden",
        "realistic_layers",
        "realistic_batches",
    )
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    for name, k in (("batches", K), ("large_batches", K), ("realistic_batches", REALISTIC_K)):
        if getattr(args, name) % k:
            parser.error(f"--{name.replace('_', '-')} must be a multiple of k={k}: every step gets k batches")
    unknown = [key for key in args.cases if key not in CASE_KEYS]
    if unknown or not args.cases:
        parser.error(
            f"--cases: unknown {', '.join(unknown) or 'none given'}; choose from {', '.join(CASE_KEYS)}"
        )
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    heap_kept = not args.default_heap and keep_heap()  # before the models and batches are allocated
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cases = make_cases(args)
    # torch's import leaves ~250k long-lived objects: a full collection then takes ~0.1 s, as
    # long as a whole tiny-model run. Freezing them keeps full collections out of the timings.
    gc.collect()
    gc.freeze()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="traintel-bench-") as tmp, open(os.devnull, "wb") as devnull:
        bench = Bench(Path(tmp), devnull, args.window)
        print("warming up (one run of each case) ...", file=sys.stderr)
        diffs = warm_up(bench, cases)
        rounds = measure(bench, cases, args.repeats)
    rows = summarize(cases, rounds)
    env = environment(heap_kept)
    sizes = {c.model_name: sum(p.numel() for p in c.model.parameters()) for c in cases}
    print(render(env, sizes, args, rows))
    worst = max(diffs.values())
    print(f"\nwarm-up check: max |weight difference| to the plain loop (its shadow), any case: {worst:.2e}")
    delays = ", ".join(f"{key} {delay * 1e3:.0f} ms" for key, delay in bench.max_delay.items())
    print(
        f"traintel's max_delay_seconds in the timed runs, scaled from {DEFAULT_MAX_DELAY * 1e3:.0f} ms "
        f"so that the shadow leaves deliveries per step unchanged: {delays}"
    )
    print(f"benchmark wall time: {time.perf_counter() - started:.1f} s")
    if args.json is not None:
        payload = {
            "env": env,
            "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "k": {case.key: case.k for case in cases},
            "unit": "microseconds per optimizer step (k micro-batches, k per case)",
            "model_parameters": sizes,
            "warmup_max_weight_diff": diffs,
            "max_delay_seconds": bench.max_delay,
            "cases": rows,
            "rounds": [{key: asdict(sample) for key, sample in r.items()} for r in rounds],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
