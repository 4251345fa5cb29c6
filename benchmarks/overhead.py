"""Per-step overhead of traintel against a plain PyTorch loop and a bare Ignite Engine.

What: one process trains the same tiny MLP on the same pre-built batches in five ways:

1. a plain PyTorch loop with gradient accumulation (k=3: forward, ``loss / k``
   backward, ``optimizer.step()`` and ``zero_grad()`` every k micro-batches), no logging;
2. a bare Ignite ``Engine`` doing the same update, one Ignite iteration per
   micro-batch, no handlers;
3. traintel with all three sinks on (JSON lines to ``os.devnull``, the diagnostic file
   in a temporary run directory, Prometheus on a free port) at the default cadence
   (``telemetry.every=10``);
4. the same with ``telemetry.every=1``;
5. a model with about 100x the compute per step, trained by the plain loop and by
   traintel as in 3; its ratio is to its own plain loop.

Each case is reported as wall time per optimizer step (k=3 micro-batches) and as a
ratio to the plain loop on the same model.

Why: traintel adds a roughly fixed cost to every optimizer step (Ignite event
dispatch, item-weighted loss scaling and bookkeeping tensors, and every N steps one
host transfer and records fanned out to three sinks). On a model this small that cost
is as large as it will ever be relative to the compute, so cases 2-4 are the worst
case; case 5 shows how the same cost dilutes on a model that does some real work.

How it measures: every run of a model size starts from the same initial weights,
copied into one working model, and batches are a Python list of tensors, so data
loading is out of it. Building (optimizer, sinks, Prometheus server) is outside the
timed region. Loop time runs from the first epoch's start to the last epoch's end;
for the Ignite-based cases it is taken by ``EPOCH_STARTED``/``EPOCH_COMPLETED``
handlers added after traintel's, so the epoch record is included but
``run.start``/``run.end`` and closing the sinks are not. Those per-run costs are
reported separately (the whole ``engine.run()``/``run.run()`` call).

Objects alive after setup (mostly torch's) are moved out of the garbage collector's
reach with ``gc.freeze()``, and each run starts after a ``gc.collect()``, so a full
collection of torch's heap never lands inside a timed loop. Every case gets one
warm-up run, which also checks that all cases end with the same weights as the plain
loop; then the cases run interleaved, in an order rotated by one each round,
``--repeats`` times. Reported: medians over rounds; ratios and overheads are medians
of per-round comparisons with the plain loop timed in the same round.

Usage::

    python benchmarks/overhead.py [--repeats 11] [--epochs 3] [--json overhead.json]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO, Literal

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events

from traintel.api import build
from traintel.task import Task

K = 3
"""Micro-batches per optimizer step (gradient accumulation)."""
LR = 0.01
IN_FEATURES = 32
TINY_HIDDEN = 64

Batch = tuple[torch.Tensor, torch.Tensor]
Kind = Literal["plain", "ignite", "traintel"]


@dataclass(frozen=True)
class Sample:
    """One timed run."""

    loop_s: float
    """First epoch start to last epoch end."""
    total_s: float
    """The whole training call (``run.run()`` for traintel: run.start, run.end, sink close)."""


@dataclass(frozen=True)
class Case:
    """One way of training one model on one data set."""

    key: str
    label: str
    kind: Kind
    model: torch.nn.Module
    """Initial weights, never trained: each run copies them into a working model."""
    data: list[Batch]
    epochs: int
    reference: str
    """Key of the plain-loop case this one is compared with."""
    every: int = 10

    @property
    def steps(self) -> int:
        return self.epochs * len(self.data) // K


class EpochTimer:
    """First ``EPOCH_STARTED`` to last ``EPOCH_COMPLETED`` of an Ignite engine."""

    def __init__(self) -> None:
        self.start = float("nan")
        self.end = float("nan")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED(once=1), self._started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._completed)

    def _started(self, _engine: Engine) -> None:
        self.start = time.perf_counter()

    def _completed(self, _engine: Engine) -> None:
        self.end = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return self.end - self.start


class Bench:
    """Runs cases: one working model per model size, a temporary directory and ``os.devnull``."""

    def __init__(self, root: Path, devnull: BinaryIO) -> None:
        self.root = root
        self.devnull = devnull
        self.count = 0
        self._working: dict[int, torch.nn.Module] = {}

    def model_for(self, case: Case) -> torch.nn.Module:
        """The working model for ``case.model``, reset in place to the initial weights.

        Copying into the same tensors, rather than a fresh deep copy per run, keeps every
        run on the same parameter memory (first touches of new memory are slow on some VMs).
        """
        model = self._working.get(id(case.model))
        if model is None:
            model = self._working[id(case.model)] = copy.deepcopy(case.model)
        with torch.no_grad():
            for p, initial in zip(model.parameters(), case.model.parameters(), strict=True):
                p.copy_(initial)
                p.grad = None
        return model

    def working(self, case: Case) -> torch.nn.Module:
        """The working model of ``case`` as its last run left it."""
        return self._working[id(case.model)]

    def run(self, case: Case) -> Sample:
        """Reset the working model and train it once as ``case`` says, timed."""
        model = self.model_for(case)
        if case.kind == "plain":
            return run_plain(model, case.data, case.epochs)
        if case.kind == "ignite":
            return run_ignite(model, case.data, case.epochs)
        return self._run_traintel(case, model)

    def _run_traintel(self, case: Case, model: torch.nn.Module) -> Sample:
        self.count += 1
        run_id = f"bench-{case.key}-{self.count}"
        config: dict[str, Any] = {
            "run": {"dir": str(self.root / run_id), "id": run_id},
            "trainer": {
                "max_epochs": case.epochs,
                "accumulation_steps": K,
                "optimizer": {"name": "sgd", "lr": LR},
                "device": "cpu",
            },
            "telemetry": {"every": case.every},
            "sinks": {"prometheus": {"port": 0}},
        }
        task = Task(model=model, loss_fn=F.mse_loss, train_loader=case.data)
        run = build(config, task=task, json_stream=self.devnull)
        timer = EpochTimer()
        timer.attach(run.trainer)
        gc.collect()
        t0 = time.perf_counter()
        end = run.run()
        total = time.perf_counter() - t0
        if end.status != "completed" or end.step != case.steps:
            msg = (
                f"{case.key}: run ended {end.status} ({end.reason}) at step {end.step}, expected {case.steps}"
            )
            raise RuntimeError(msg)
        return Sample(timer.elapsed, total)


def run_plain(model: torch.nn.Module, data: Sequence[Batch], epochs: int) -> Sample:
    """Case 1: the plain PyTorch loop."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model.train()
    gc.collect()
    t0 = time.perf_counter()
    for _ in range(epochs):
        for i, (x, y) in enumerate(data, start=1):
            loss = F.mse_loss(model(x), y) / K
            loss.backward()
            if i % K == 0:
                optimizer.step()
                optimizer.zero_grad()
    elapsed = time.perf_counter() - t0
    return Sample(elapsed, elapsed)


def run_ignite(model: torch.nn.Module, data: list[Batch], epochs: int) -> Sample:
    """Case 2: a bare Ignite Engine, one iteration per micro-batch, no handlers but the timer."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model.train()

    def update(engine: Engine, batch: Batch) -> None:
        x, y = batch
        loss = F.mse_loss(model(x), y) / K
        loss.backward()
        if engine.state.iteration % K == 0:  # the iteration count runs across epochs; B % k == 0
            optimizer.step()
            optimizer.zero_grad()

    engine = Engine(update)
    timer = EpochTimer()
    timer.attach(engine)
    gc.collect()
    t0 = time.perf_counter()
    engine.run(data, max_epochs=epochs)
    total = time.perf_counter() - t0
    return Sample(timer.elapsed, total)


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


def make_cases(args: argparse.Namespace) -> list[Case]:
    tiny, large = make_tiny(args.seed), make_large(args.large_hidden, args.large_layers, args.seed)
    data = make_data(args.batches, args.batch_size, args.seed)
    large_data = data[: args.large_batches]
    if len(large_data) < args.large_batches:
        large_data = make_data(args.large_batches, args.batch_size, args.seed)
    return [
        Case("plain", "1. plain PyTorch loop (k=3)", "plain", tiny, data, args.epochs, "plain"),
        Case("ignite", "2. bare Ignite Engine, no handlers", "ignite", tiny, data, args.epochs, "plain"),
        Case("traintel", "3. traintel, 3 sinks, every=10", "traintel", tiny, data, args.epochs, "plain", 10),
        Case(
            "traintel_every1",
            "4. traintel, 3 sinks, every=1",
            "traintel",
            tiny,
            data,
            args.epochs,
            "plain",
            1,
        ),
        Case(
            "plain_large", "5a. plain PyTorch loop, large model", "plain", large, large_data, 1, "plain_large"
        ),
        Case(
            "traintel_large",
            "5b. traintel, 3 sinks, every=10, large model",
            "traintel",
            large,
            large_data,
            1,
            "plain_large",
            10,
        ),
    ]


def max_param_diff(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a, b, strict=True))


def warm_up(bench: Bench, cases: Sequence[Case]) -> dict[str, float]:
    """Run each case once (not recorded); return each case's max |weight diff| to its plain loop."""
    trained: dict[str, list[torch.Tensor]] = {}
    for case in cases:
        bench.run(case)
        trained[case.key] = [p.detach().clone() for p in bench.working(case).parameters()]
    return {c.key: max_param_diff(trained[c.key], trained[c.reference]) for c in cases}


def measure(bench: Bench, cases: Sequence[Case], repeats: int) -> list[dict[str, Sample]]:
    """``repeats`` rounds; each runs every case once, in an order rotated by one per round."""
    rounds: list[dict[str, Sample]] = []
    for r in range(repeats):
        order = [*cases[r % len(cases) :], *cases[: r % len(cases)]]
        samples: dict[str, Sample] = {}
        for case in order:
            samples[case.key] = bench.run(case)
        rounds.append(samples)
        print(f"  round {r + 1}/{repeats} done", file=sys.stderr)
    return rounds


def summarize(cases: Sequence[Case], rounds: Sequence[dict[str, Sample]]) -> list[dict[str, Any]]:
    by_key = {c.key: c for c in cases}
    rows = []
    for case in cases:
        ref = by_key[case.reference]
        per_step = [s[case.key].loop_s / case.steps * 1e6 for s in rounds]
        ref_step = [s[ref.key].loop_s / ref.steps * 1e6 for s in rounds]
        ratios = [c / p for c, p in zip(per_step, ref_step, strict=True)]
        rows.append(
            {
                "key": case.key,
                "case": case.label,
                "reference": ref.key,
                "steps_per_run": case.steps,
                "us_per_step": statistics.median(per_step),
                "ratio_to_plain": statistics.median(ratios),
                "ratio_quartiles": quartiles(ratios),
                "overhead_us_per_step": statistics.median(
                    c - p for c, p in zip(per_step, ref_step, strict=True)
                ),
                "loop_ms": statistics.median(s[case.key].loop_s * 1e3 for s in rounds),
                "run_call_ms": statistics.median(s[case.key].total_s * 1e3 for s in rounds),
                "samples_us_per_step": per_step,
                "samples_run_call_ms": [s[case.key].total_s * 1e3 for s in rounds],
            }
        )
    return rows


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """First and third quartile (the spread of the per-round ratios)."""
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def environment() -> dict[str, Any]:
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
    }


def render(
    env: dict[str, Any], sizes: dict[str, int], args: argparse.Namespace, rows: Sequence[dict[str, Any]]
) -> str:
    by_key = {r["key"]: r for r in rows}
    large_vs_tiny = by_key["plain_large"]["us_per_step"] / by_key["plain"]["us_per_step"]
    h = args.large_hidden
    lines = [
        f"torch {env['torch']}, pytorch-ignite {env['pytorch-ignite']}, traintel {env['traintel']}, "
        f"Python {env['python']}; torch threads {env['torch_threads']} (interop "
        f"{env['torch_interop_threads']}), usable CPUs {env['cpus_usable']}; {env['platform']}",
        "",
        f"- step = one optimizer step = {K} micro-batches of {args.batch_size} items; medians of "
        f"{args.repeats} interleaved repeats.",
        "- ratio and overhead: medians of per-repeat comparisons with the plain loop on the same model "
        "in the same repeat (row 1 for rows 1-4, row 5a for 5b).",
        f"- tiny model: Linear({IN_FEATURES},{TINY_HIDDEN})-ReLU-Linear({TINY_HIDDEN},1) "
        f"({sizes['plain']:,} parameters), {args.epochs} epochs x {args.batches} micro-batches per run.",
        f"- large model: Linear({IN_FEATURES},{h})-ReLU-{args.large_layers}x[Linear({h},{h})-ReLU]-"
        f"Linear({h},1) ({sizes['plain_large']:,} parameters), 1 epoch x {args.large_batches} micro-batches "
        f"per run; its plain step takes {large_vs_tiny:.0f}x the tiny one's.",
        "",
        "| case | us/step | ratio to plain | quartiles of the ratio | overhead us/step |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio, extra = r["ratio_to_plain"], r["overhead_us_per_step"]
        low, high = r["ratio_quartiles"]
        lines.append(
            f"| {r['case']} | {r['us_per_step']:.1f} | {ratio:.3f} | {low:.3f}-{high:.3f} | {extra:+.1f} |"
        )
    lines += [
        "",
        "Per-run cost outside the loop: the whole `engine.run()` / `run.run()` call minus the loop",
        "(for traintel: run.start, run.end, closing the sinks, stopping the Prometheus server).",
        "",
        "| case | loop ms | whole call ms | outside loop ms |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        loop, call = r["loop_ms"], r["run_call_ms"]
        lines.append(f"| {r['case']} | {loop:.1f} | {call:.1f} | {call - loop:.1f} |")
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
    add("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    add("--seed", type=int, default=0, help="seed for weights and data (default 0)")
    add("--json", type=Path, default=None, metavar="PATH", help="also write the numbers to PATH")
    args = parser.parse_args(argv)
    positive = ("repeats", "epochs", "batches", "batch_size", "large_hidden", "large_layers", "large_batches")
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("batches", "large_batches"):
        if getattr(args, name) % K:
            parser.error(f"--{name.replace('_', '-')} must be a multiple of k={K}: every step gets k batches")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cases = make_cases(args)
    # torch's import leaves ~250k long-lived objects: a full collection then takes ~0.1 s, as
    # long as a whole tiny-model run. Freezing them keeps full collections out of the timings.
    gc.collect()
    gc.freeze()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="traintel-bench-") as tmp, open(os.devnull, "wb") as devnull:
        bench = Bench(Path(tmp), devnull)
        print("warming up (one run of each case) ...", file=sys.stderr)
        diffs = warm_up(bench, cases)
        rounds = measure(bench, cases, args.repeats)
    rows = summarize(cases, rounds)
    env = environment()
    sizes = {c.key: sum(p.numel() for p in c.model.parameters()) for c in cases}
    print(render(env, sizes, args, rows))
    worst = max(diffs.values())
    print(f"\nwarm-up check: max |weight difference| to the plain loop, any case: {worst:.2e}")
    print(f"benchmark wall time: {time.perf_counter() - started:.1f} s")
    if args.json is not None:
        payload = {
            "env": env,
            "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "k": K,
            "unit": f"microseconds per optimizer step ({K} micro-batches)",
            "model_parameters": sizes,
            "warmup_max_weight_diff": diffs,
            "cases": rows,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
