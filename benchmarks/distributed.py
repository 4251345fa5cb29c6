"""Per-step overhead of traintel on two ranks (torchrun, gloo on CPU) against a plain DDP loop.

What: each rank trains the tiny MLP of ``overhead.py`` on its shard of the same pre-built
micro-batches (rank r takes micro-batches r, r+W, ...), k=3 micro-batches per optimizer step,
in two ways:

A. a plain ``DistributedDataParallel`` loop: the model in DDP with a summing communication
   hook (traintel's own ``sum_hook``: an ``all_reduce`` SUM of each bucket; DDP's default would
   average), the window's item count N all-reduced once per step before the first backward,
   each micro-batch's mean loss scaled by n_b / N, the micro-batches before the window's last
   inside ``no_sync()``, ``optimizer.step()``, gradients set to None; no logging;
B. traintel through ``traintel.build`` under the same torchrun: all three sinks on (JSON lines to
   ``os.devnull``, the diagnostic file in a temporary run directory shared by the ranks,
   Prometheus on a free port on rank 0) at the default cadence (``telemetry.every=10``).

Both do the same arithmetic, so both end with exactly the same weights on every rank (checked
in the warm-up). B is reported as a ratio to A.

How it measures: before each timed loop the ranks meet at a barrier (for B in an
``EPOCH_STARTED`` handler added after traintel's); each rank times its loop from there to the
last epoch's end (``EPOCH_COMPLETED`` for B, so the epoch records are included) and the ranks
take the largest time (an ``all_reduce`` MAX), so every rank reports the same number and rank 0
prints it. Building (process group, DDP, optimizer, sinks) is outside the timed region: traintel
starts its own process group in ``build`` and ends it at the end of ``run.run()``, so the plain
loop starts and ends one of its own around each run too. Every run starts from the same initial
weights, copied into one working model; full garbage collections are kept out of the timings as
in ``overhead.py`` (``gc.freeze()`` after setup, ``gc.collect()`` before each run). One warm-up
run of each case, then ``--repeats`` rounds in the order A B, B A, A B, ...; reported: medians
over rounds, each case's fastest run, and the ratio as the median (and quartiles) of per-round
B/A. Each step waits twice for the other rank (the item count, the gradient reduction), so on a
machine with as many cores as ranks any other work stretches both cases' steps a lot; the fastest
run is the least disturbed one.

Usage::

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node=2 \\
        benchmarks/distributed.py [--repeats 41] [--epochs 1] [--batches 600] [--json PATH]
"""

import argparse
import datetime
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from ignite.engine import Engine, Events
from overhead import IN_FEATURES, TINY_HIDDEN, environment, make_data, make_tiny, max_param_diff, quartiles
from torch.nn.parallel import DistributedDataParallel

from traintel.engine.ddp import sum_hook
from traintel.run.api import build
from traintel.task import Task

K = 3
"""Micro-batches per optimizer step on each rank (gradient accumulation)."""
LR = 0.01
BACKEND = "gloo"
STORE_TIMEOUT = datetime.timedelta(seconds=300)
CASE_A = "A. plain DDP loop (k=3, no_sync, summing hook)"
CASE_B = "B. traintel, 3 sinks, every=10"


class Rendezvous:
    """Torchrun's key-value store (a client of the agent's), for what the ranks share outside a run,
    and a fresh store for each run's process group.

    traintel's ``build`` starts the default process group from the environment (``env://``) and
    ``run.run()`` ends it, so every run here starts a new one in the same processes. Started again
    on the same store, a new group can find the last group's keys (the addresses of its gloo
    connections) and connect to sockets that are gone; each run therefore gets an empty store,
    served by rank 0 on a free port and given in ``MASTER_PORT``, as a new torchrun job would.
    """

    def __init__(self) -> None:
        self.rank = int(os.environ["RANK"])
        self.world_size = int(os.environ["WORLD_SIZE"])
        self.addr = os.environ["MASTER_ADDR"]
        self.port = os.environ["MASTER_PORT"]
        self.agent = dist.TCPStore(self.addr, int(self.port), is_master=False, timeout=STORE_TIMEOUT)
        self.count = 0

    def _key(self, name: str) -> str:
        self.count += 1
        return f"traintel-bench/{self.count}/{name}"

    def share(self, value: str) -> str:
        """Rank 0's ``value``, on every rank."""
        key = self._key("share")
        if self.rank == 0:
            self.agent.set(key, value)
        return self.agent.get(key).decode()

    def gather(self, value: str) -> list[str]:
        """Every rank's ``value``, in rank order, on every rank."""
        key = self._key("gather")
        self.agent.set(f"{key}/{self.rank}", value)
        return [self.agent.get(f"{key}/{r}").decode() for r in range(self.world_size)]

    def barrier(self) -> None:
        key = self._key("barrier")
        self.agent.add(key, 1)
        while self.agent.add(key, 0) < self.world_size:
            time.sleep(0.001)

    @contextmanager
    def fresh_store(self) -> Iterator[None]:
        """``MASTER_PORT`` is an empty store's for the block (on rank 0, which keeps it until every
        rank has left the block)."""
        server = None
        if self.rank == 0:
            server = dist.TCPStore(
                self.addr, 0, self.world_size, is_master=True, wait_for_workers=False, timeout=STORE_TIMEOUT
            )
        os.environ["MASTER_PORT"] = self.share(str(server.port) if server is not None else "")
        try:
            yield
        finally:
            os.environ["MASTER_PORT"] = self.port
            self.barrier()
            del server

    @contextmanager
    def process_group(self) -> Iterator[None]:
        """The default process group (``env://``) for the block, on a fresh store."""
        with self.fresh_store():
            dist.init_process_group(BACKEND)
            try:
                yield
            finally:
                dist.destroy_process_group()


def slowest(seconds: float) -> float:
    """The largest ``seconds`` of any rank (one ``all_reduce`` MAX)."""
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def live_ddp_modules() -> int:
    """DDP wrappers still alive: each run's must be gone before the next wraps the same model."""
    gc.collect()
    return sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())


class RankTimer:
    """For an Ignite engine on every rank: a barrier, then the first ``EPOCH_STARTED`` to the last
    ``EPOCH_COMPLETED``, the slowest rank's time agreed at ``COMPLETED`` (while the group is up)."""

    def __init__(self) -> None:
        self.start = float("nan")
        self.end = float("nan")
        self.elapsed = float("nan")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED(once=1), self._started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._completed)
        engine.add_event_handler(Events.COMPLETED, self._agree)

    def _started(self, _engine: Engine) -> None:
        dist.barrier()
        self.start = time.perf_counter()

    def _completed(self, _engine: Engine) -> None:
        self.end = time.perf_counter()

    def _agree(self, _engine: Engine) -> None:
        self.elapsed = slowest(self.end - self.start)


class Bench:
    """The two cases on one rank: a working model reset to the initial weights before each run."""

    def __init__(
        self, args: argparse.Namespace, rendezvous: Rendezvous, root: Path, devnull: BinaryIO
    ) -> None:
        self.epochs = args.epochs
        self.rendezvous = rendezvous
        self.rank = rendezvous.rank
        self.world_size = rendezvous.world_size
        self.initial = make_tiny(args.seed)
        self.model = make_tiny(args.seed)
        self.data = make_data(args.batches, args.batch_size, args.seed)
        """Every rank's micro-batches: traintel shards the list; the plain loop takes the same shard."""
        self.shard = self.data[self.rank :: self.world_size]
        self.steps = self.epochs * len(self.shard) // K
        self.root = root
        self.devnull = devnull
        self.count = 0

    def reset(self) -> torch.nn.Module:
        with torch.no_grad():
            for p, initial in zip(self.model.parameters(), self.initial.parameters(), strict=True):
                p.copy_(initial)
                p.grad = None
        return self.model

    def run(self, case: str) -> float:
        """Reset the model and train it once as ``case`` says; the slowest rank's loop time."""
        model = self.reset()
        return self.plain(model) if case == "A" else self.traintel(model)

    def plain(self, model: torch.nn.Module) -> float:
        """Case A."""
        shard, epochs = self.shard, self.epochs
        with self.rendezvous.process_group():
            ddp = DistributedDataParallel(model)
            ddp.register_comm_hook(None, sum_hook)
            optimizer = torch.optim.SGD(ddp.parameters(), lr=LR)
            params = list(ddp.parameters())
            ddp.train()
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
                        with nullcontext() if position == last else ddp.no_sync():
                            loss = F.mse_loss(ddp(x), y) * (counts[position] / items)
                            loss.backward()
                    optimizer.step()
                    for p in params:
                        p.grad = None
            elapsed = slowest(time.perf_counter() - t0)
            del ddp, optimizer
        return elapsed

    def traintel(self, model: torch.nn.Module) -> float:
        """Case B."""
        self.count += 1
        run_id = f"bench-ddp-{self.count}"
        config: dict[str, Any] = {
            "run": {"dir": str(self.root / run_id), "id": run_id},
            "trainer": {
                "max_epochs": self.epochs,
                "accumulation_steps": K,
                "optimizer": {"name": "sgd", "lr": LR},
                "device": "cpu",
            },
            "telemetry": {"every": 10},
            "sinks": {"prometheus": {"port": 0}},
        }
        task = Task(model=model, loss_fn=F.mse_loss, train_loader=self.data)
        with self.rendezvous.fresh_store():
            run = build(config, task=task, json_stream=self.devnull)  # starts the process group
            timer = RankTimer()
            timer.attach(run.trainer)
            gc.collect()
            end = run.run()  # ends the process group
        if end.status != "completed" or end.step != self.steps:
            msg = f"traintel run ended {end.status} ({end.reason}) at step {end.step}, expected {self.steps}"
            raise RuntimeError(msg)
        return timer.elapsed


def warm_up(bench: Bench) -> float:
    """One run of each case (not recorded); the largest |weight difference| between them, any rank."""
    trained: dict[str, list[torch.Tensor]] = {}
    for case in ("A", "B"):
        bench.run(case)
        trained[case] = [p.detach().clone() for p in bench.model.parameters()]
        if live_ddp_modules():
            msg = f"case {case} left a DistributedDataParallel wrapper alive"
            raise RuntimeError(msg)
    diff = max_param_diff(trained["A"], trained["B"])
    return max(float(d) for d in bench.rendezvous.gather(repr(diff)))


class Rounds(Protocol):
    """What ``measure`` and ``summarize`` use of a benchmark (this one's ``Bench``, ``fsdp.py``'s)."""

    rank: int
    steps: int

    def run(self, case: str) -> float: ...


def measure(bench: Rounds, repeats: int) -> list[dict[str, float]]:
    """``repeats`` rounds of both cases, in the order A B, B A, A B, ..."""
    rounds: list[dict[str, float]] = []
    for r in range(repeats):
        order = ("A", "B") if r % 2 == 0 else ("B", "A")
        rounds.append({case: bench.run(case) for case in order})
        if bench.rank == 0:
            print(f"  round {r + 1}/{repeats} done", file=sys.stderr)
    return rounds


def summarize(
    bench: Rounds, rounds: Sequence[dict[str, float]], labels: tuple[str, str] = (CASE_A, CASE_B)
) -> list[dict[str, Any]]:
    """Per case (``labels``: A's and B's), the medians over rounds and the ratio to A."""
    plain = [r["A"] / bench.steps * 1e6 for r in rounds]
    rows = []
    for key, label in zip(("A", "B"), labels, strict=True):
        per_step = [r[key] / bench.steps * 1e6 for r in rounds]
        ratios = [c / p for c, p in zip(per_step, plain, strict=True)]
        rows.append(
            {
                "key": key,
                "case": label,
                "steps_per_run": bench.steps,
                "us_per_step": statistics.median(per_step),
                "fastest_us_per_step": min(per_step),
                "ratio_to_plain": statistics.median(ratios),
                "ratio_quartiles": quartiles(ratios),
                "overhead_us_per_step": statistics.median(
                    c - p for c, p in zip(per_step, plain, strict=True)
                ),
                "samples_us_per_step": per_step,
            }
        )
    return rows


def render(
    env: dict[str, Any], bench: Bench, args: argparse.Namespace, rows: Sequence[dict[str, Any]]
) -> str:
    params = sum(p.numel() for p in bench.initial.parameters())
    lines = [
        f"torch {env['torch']}, pytorch-ignite {env['pytorch-ignite']}, traintel {env['traintel']}, "
        f"Python {env['python']}; torch threads {env['torch_threads']} per rank (interop "
        f"{env['torch_interop_threads']}), usable CPUs {env['cpus_usable']}; {env['platform']}",
        "",
        f"- {bench.world_size} ranks under torchrun, {BACKEND} on CPU; step = one optimizer step = {K} "
        f"micro-batches of {args.batch_size} items on each rank; medians of {args.repeats} interleaved "
        "rounds (A B, B A, ...); a run's time is its slowest rank's.",
        "- ratio and overhead: medians of per-round comparisons with the plain DDP loop of the same round; "
        "fastest run: each case's least disturbed round.",
        f"- tiny model: Linear({IN_FEATURES},{TINY_HIDDEN})-ReLU-Linear({TINY_HIDDEN},1) ({params:,} "
        f"parameters), {args.epochs} epoch{'s' if args.epochs > 1 else ''} x {args.batches} micro-batches "
        f"per run ({len(bench.shard)} per rank, {bench.steps} steps).",
        "",
        "| case | us/step | fastest run us/step | ratio to plain DDP | quartiles of the ratio "
        "| overhead us/step |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        low, high = r["ratio_quartiles"]
        lines.append(
            f"| {r['case']} | {r['us_per_step']:.1f} | {r['fastest_us_per_step']:.1f} "
            f"| {r['ratio_to_plain']:.3f} | {low:.3f}-{high:.3f} | {r['overhead_us_per_step']:+.1f} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add = parser.add_argument
    add("--repeats", type=int, default=41, help="interleaved timed rounds (default 41)")
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
            "--nproc-per-node=2 benchmarks/distributed.py"
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
    root = Path(rendezvous.share(tempfile.mkdtemp(prefix="traintel-bench-ddp-") if rank == 0 else ""))
    try:
        with open(os.devnull, "wb") as devnull:
            bench = Bench(args, rendezvous, root, devnull)
            gc.collect()
            gc.freeze()  # torch's long-lived objects out of every collection (see overhead.py)
            if rank == 0:
                print("warming up (one run of each case) ...", file=sys.stderr)
            diff = warm_up(bench)
            rounds = measure(bench, args.repeats)
            if live_ddp_modules():
                msg = "a DistributedDataParallel wrapper outlived its run"
                raise RuntimeError(msg)
        rendezvous.barrier()  # every rank is done with the run directories
    finally:  # after a failure, no waiting for the others: torchrun ends them
        if rank == 0:
            shutil.rmtree(root, ignore_errors=True)
    if rank != 0:
        return 0
    rows = summarize(bench, rounds)
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
            "unit": f"microseconds per optimizer step ({K} micro-batches per rank), slowest rank",
            "warmup_max_weight_diff": diff,
            "cases": rows,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
