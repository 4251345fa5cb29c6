"""Per-step overhead of traintel's FSDP2 strategy on two ranks (torchrun, gloo on CPU) against a
plain FSDP2 loop.

What: each rank trains the tiny MLP of ``overhead.py`` on its shard of the same pre-built
micro-batches (rank r takes micro-batches r, r+W, ...), k=3 micro-batches per optimizer step,
with the model sharded by FSDP2 (``fully_shard``), in two ways:

A. a plain FSDP2 loop: ``fully_shard`` on each ``Linear``, then on the root, every unit with
   gradient divide factor 1 and sum-only reductions (``set_gradient_divide_factor(1.0)``,
   ``set_force_sum_reduction_for_comms(True)``: the reduce-scatter is a plain SUM, FSDP's default
   would average), the window's item count N all-reduced once per step before the first backward,
   each micro-batch's mean loss scaled by n_b / N, gradient sync off
   (``set_requires_gradient_sync(False)``) for every micro-batch but the window's last,
   ``optimizer.step()``, gradients set to None; no logging;
B. traintel through ``traintel.build`` under the same torchrun with
   ``trainer.distributed.strategy: fsdp`` (``fsdp.shard_modules: [Linear]``): all three sinks on
   (JSON lines to ``os.devnull``, the diagnostic file in a temporary run directory shared by the
   ranks, Prometheus on a free port on rank 0) at the default cadence (``telemetry.every=10``).

Both do the same arithmetic, so both end with exactly the same weights (checked in the warm-up:
each run's parameters gathered whole with ``full_tensor()`` while its process group is up; for B
in a ``COMPLETED`` handler, since ``run.run()`` ends the group). B is reported as a ratio to A;
its target is at most 1.05.

How it measures: as ``distributed.py`` (whose ``Rendezvous`` and ``RankTimer`` it uses). Before
each timed loop the ranks meet at a barrier; each rank times its loop from there to the last
epoch's end (``EPOCH_COMPLETED`` for B, so the epoch records are included) and the ranks take the
largest time (an ``all_reduce`` MAX). Building (process group, sharding, optimizer, sinks) is
outside the timed region: traintel starts its own process group in ``build`` and ends it at the end
of ``run.run()``, so the plain loop starts and ends one of its own around each run too.
``fully_shard`` turns a model into its sharded form in place, so every run shards a fresh copy of
the same initial weights. Full garbage collections are kept out of the timings as in
``overhead.py`` (``gc.freeze()`` after setup, ``gc.collect()`` before each run). One warm-up run
of each case, then ``--repeats`` rounds in the order A B, B A, A B, ...; reported: medians over
rounds, each case's fastest run, and the ratio as the median (and quartiles) of per-round B/A.
Each micro-batch gathers every unit's parameters twice (forward, and backward, since
``reshard_after_forward`` is on) and each step reduce-scatters every unit's gradients once, so a
step waits for the other rank many times: any other work on a machine with as many cores as ranks
stretches both cases' steps a lot; the fastest run is the least disturbed one.

Usage::

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node=2 \\
        benchmarks/fsdp.py [--repeats 21] [--epochs 1] [--batches 600] [--json PATH]
"""

import argparse
import copy
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed import BACKEND, RankTimer, Rendezvous, measure, slowest, summarize
from ignite.engine import Events
from overhead import IN_FEATURES, TINY_HIDDEN, environment, make_data, make_tiny, max_param_diff
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from traintel.run.api import build
from traintel.task import Task

K = 3
"""Micro-batches per optimizer step on each rank (gradient accumulation)."""
LR = 0.01
SHARD_MODULES = ["Linear"]
CASE_A = "A. plain FSDP2 loop (k=3, sync on the last pass, summed reduce-scatter)"
CASE_B = "B. traintel, strategy fsdp, 3 sinks, every=10"
TARGET = 1.05
"""The most B's ratio to A should be."""


def shard_plain(model: torch.nn.Module) -> torch.nn.Module:
    """The plain loop's sharding: ``fully_shard`` each ``Linear`` (innermost first), then the root;
    every unit's reduce-scatter a plain SUM (divide factor 1, sum-only reductions)."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    for module in reversed(linears):
        fully_shard(module)
    fully_shard(model)
    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)
    return model


def whole(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every parameter of a sharded model, gathered whole (a collective: every rank, group up)."""
    return [(p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for p in model.parameters()]


class Bench:
    """The two cases on one rank: each run shards a fresh copy of the initial weights."""

    def __init__(
        self, args: argparse.Namespace, rendezvous: Rendezvous, root: Path, devnull: BinaryIO
    ) -> None:
        self.epochs = args.epochs
        self.rendezvous = rendezvous
        self.rank = rendezvous.rank
        self.world_size = rendezvous.world_size
        self.initial = make_tiny(args.seed)
        self.data = make_data(args.batches, args.batch_size, args.seed)
        """Every rank's micro-batches: traintel shards the list; the plain loop takes the same shard."""
        self.shard = self.data[self.rank :: self.world_size]
        self.steps = self.epochs * len(self.shard) // K
        self.root = root
        self.devnull = devnull
        self.count = 0
        self.trained: list[torch.Tensor] = []
        """The last run's parameters, whole (when it was asked to gather them)."""

    def run(self, case: str, gather: bool = False) -> float:
        """Train a fresh copy of the initial model once as ``case`` says; the slowest rank's loop
        time. ``gather``: keep the trained parameters, whole, in ``trained``."""
        model = copy.deepcopy(self.initial)
        return self.plain(model, gather) if case == "A" else self.traintel(model, gather)

    def plain(self, model: torch.nn.Module, gather: bool) -> float:
        """Case A."""
        shard, epochs = self.shard, self.epochs
        with self.rendezvous.process_group():
            sharded = shard_plain(model)
            root: FSDPModule = sharded  # type: ignore[assignment]
            optimizer = torch.optim.SGD(sharded.parameters(), lr=LR)
            params = list(sharded.parameters())
            sharded.train()
            gc.collect()
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(epochs):
                for first in range(0, len(shard), K):
                    window = shard[first : first + K]
                    counts = [int(y.shape[0]) for _, y in window]
                    total = torch.tensor([sum(counts)], dtype=torch.int64)
                    dist.all_reduce(total)
                    items = int(total.item())
                    last = len(window) - 1
                    for position, (x, y) in enumerate(window):
                        root.set_requires_gradient_sync(position == last)
                        loss = F.mse_loss(sharded(x), y) * (counts[position] / items)
                        loss.backward()
                    optimizer.step()
                    for p in params:
                        p.grad = None
            elapsed = slowest(time.perf_counter() - t0)
            if gather:
                self.trained = whole(sharded)
            del optimizer, params, root, sharded
        return elapsed

    def traintel(self, model: torch.nn.Module, gather: bool) -> float:
        """Case B."""
        self.count += 1
        run_id = f"bench-fsdp-{self.count}"
        config: dict[str, Any] = {
            "run": {"dir": str(self.root / run_id), "id": run_id},
            "trainer": {
                "max_epochs": self.epochs,
                "accumulation_steps": K,
                "optimizer": {"name": "sgd", "lr": LR},
                "device": "cpu",
                "distributed": {"strategy": "fsdp", "fsdp": {"shard_modules": SHARD_MODULES}},
            },
            "telemetry": {"every": 10},
            "sinks": {"prometheus": {"port": 0}},
        }
        task = Task(model=model, loss_fn=F.mse_loss, train_loader=self.data)
        with self.rendezvous.fresh_store():
            run = build(config, task=task, json_stream=self.devnull)  # starts the group, shards the model
            timer = RankTimer()
            timer.attach(run.trainer)
            if gather:  # fully_shard shards in place: ``model`` is the sharded root

                def gathered(_engine: Any) -> None:
                    self.trained = whole(model)

                run.trainer.add_event_handler(Events.COMPLETED, gathered)
            gc.collect()
            end = run.run()  # ends the process group
        if end.status != "completed" or end.step != self.steps:
            msg = f"traintel run ended {end.status} ({end.reason}) at step {end.step}, expected {self.steps}"
            raise RuntimeError(msg)
        if not any(isinstance(p, DTensor) for p in model.parameters()):
            msg = "traintel did not shard the model (no DTensor parameter)"
            raise RuntimeError(msg)
        return timer.elapsed


def warm_up(bench: Bench) -> float:
    """One run of each case (not recorded); the largest |weight difference| between them, any rank."""
    trained: dict[str, list[torch.Tensor]] = {}
    for case in ("A", "B"):
        bench.trained = []
        bench.run(case, gather=True)
        if not bench.trained:
            msg = f"case {case} gathered no parameters"
            raise RuntimeError(msg)
        trained[case] = bench.trained
    diff = max_param_diff(trained["A"], trained["B"])
    return max(float(d) for d in bench.rendezvous.gather(repr(diff)))


def render(
    env: dict[str, Any], bench: Bench, args: argparse.Namespace, rows: Sequence[dict[str, Any]]
) -> str:
    params = sum(p.numel() for p in bench.initial.parameters())
    lines = [
        f"torch {env['torch']}, pytorch-ignite {env['pytorch-ignite']}, traintel {env['traintel']}, "
        f"Python {env['python']}; torch threads {env['torch_threads']} per rank (interop "
        f"{env['torch_interop_threads']}), usable CPUs {env['cpus_usable']}; {env['platform']}",
        "",
        f"- {bench.world_size} ranks under torchrun, {BACKEND} on CPU, FSDP2 (`fully_shard` on each "
        f"Linear, then the root; reshard after forward); step = one optimizer step = {K} micro-batches "
        f"of {args.batch_size} items on each rank; medians of {args.repeats} interleaved rounds "
        "(A B, B A, ...); a run's time is its slowest rank's.",
        "- ratio and overhead: medians of per-round comparisons with the plain FSDP2 loop of the same "
        "round; fastest run: each case's least disturbed round.",
        f"- tiny model: Linear({IN_FEATURES},{TINY_HIDDEN})-ReLU-Linear({TINY_HIDDEN},1) ({params:,} "
        f"parameters), {args.epochs} epoch{'s' if args.epochs > 1 else ''} x {args.batches} micro-batches "
        f"per run ({len(bench.shard)} per rank, {bench.steps} steps).",
        "",
        "| case | us/step | fastest run us/step | ratio to plain FSDP2 | quartiles of the ratio "
        "| overhead us/step |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        low, high = r["ratio_quartiles"]
        lines.append(
            f"| {r['case']} | {r['us_per_step']:.1f} | {r['fastest_us_per_step']:.1f} "
            f"| {r['ratio_to_plain']:.3f} | {low:.3f}-{high:.3f} | {r['overhead_us_per_step']:+.1f} |"
        )
    ratio = rows[1]["ratio_to_plain"]
    verdict = "within" if ratio <= TARGET else "OVER"
    lines += ["", f"target: {CASE_B}: {ratio:.3f} <= {TARGET:.2f}: {verdict}"]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add = parser.add_argument
    add("--repeats", type=int, default=21, help="interleaved timed rounds (default 21)")
    add("--epochs", type=int, default=1, help="epochs per run (default 1)")
    add("--batches", type=int, default=600, help="micro-batches per epoch, all ranks (default 600)")
    add("--batch-size", type=int, default=32, help="items per micro-batch (default 32)")
    add("--seed", type=int, default=0, help="seed for weights and data (default 0)")
    add("--json", type=Path, default=None, metavar="PATH", help="rank 0 also writes the numbers to PATH")
    args = parser.parse_args(argv)
    for name in ("repeats", "epochs", "batches", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        parser.error(
            "start it with torchrun: OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone "
            "--nproc-per-node=2 benchmarks/fsdp.py"
        )
    world_size = int(os.environ["WORLD_SIZE"])
    if args.batches % (K * world_size):
        parser.error(
            f"--batches must be a multiple of k x ranks = {K * world_size}: every step gets k per rank"
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    rendezvous = Rendezvous()
    rank = rendezvous.rank
    # one temporary directory for all ranks' run directories (rank 0's), as on a shared disk
    root = Path(rendezvous.share(tempfile.mkdtemp(prefix="traintel-bench-fsdp-") if rank == 0 else ""))
    try:
        with open(os.devnull, "wb") as devnull:
            bench = Bench(args, rendezvous, root, devnull)
            gc.collect()
            gc.freeze()  # torch's long-lived objects out of every collection (see overhead.py)
            if rank == 0:
                print("warming up (one run of each case) ...", file=sys.stderr)
            diff = warm_up(bench)
            rounds = measure(bench, args.repeats)
        rendezvous.barrier()  # every rank is done with the run directories
    finally:  # after a failure, no waiting for the others: torchrun ends them
        if rank == 0:
            shutil.rmtree(root, ignore_errors=True)
    if rank != 0:
        return 0
    rows = summarize(bench, rounds, (CASE_A, CASE_B))
    env = environment(heap_kept=False)  # the C library's default heap, as torchrun starts it
    print(render(env, bench, args, rows))
    print(f"\nwarm-up check: max |weight difference| between the cases, any rank: {diff:.2e}")
    print(f"benchmark wall time: {time.perf_counter() - started:.1f} s")
    if args.json is not None:
        payload = {
            "env": env,
            "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "k": K,
            "world_size": bench.world_size,
            "backend": BACKEND,
            "shard_modules": SHARD_MODULES,
            "unit": f"microseconds per optimizer step ({K} micro-batches per rank), slowest rank",
            "warmup_max_weight_diff": diff,
            "target_ratio": TARGET,
            "cases": rows,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
