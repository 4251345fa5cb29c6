"""Checkpoint size on disk, training stall and time to durable on two ranks (torchrun, gloo on CPU):
today's per-rank copies against ``torch.distributed.checkpoint`` (DCP), under DDP and FSDP2.

What: every rank builds the same MLP of ``--megabytes`` of float32 parameters (default 200 MB:
four ``Linear(3536, 3536)`` layers, about 50M parameters) and takes one AdamW step, so the optimizer
holds its two moments (the state to save is about 3x the parameters). Then, each round, every rank
saves a checkpoint of step 1 in four ways:

A. today's per-rank copies under DDP (the model replicated on every rank): each rank writes its
   whole model and optimizer itself, ``traintel.run.checkpoint.write(directory, step, rank,
   {"format", "step", "model": model.state_dict(), "optimizer": optimizer.state_dict()})``: one full
   copy per rank;
B. DCP under DDP: ``traintel.run.sharded.ShardedState(model, optimizer, rank).save(dcp_dir,
   then=...)`` (DCP's ``save``: each replicated tensor written once, by one rank), then, in ``then``
   as traintel does, ``checkpoint.write`` of the small per-rank state file and its manifest naming the
   rank's DCP files;
C. the same under FSDP2: the model sharded with ``traintel.engine.fsdp.shard(model, ["Linear"])``,
   each rank holding and writing half of the model and optimizer;
D. C with ``background=True`` (DCP's ``async_save``): ``save`` returns once the state is staged
   (copied), the files, their SHA-256 and the manifest are written in the background.

Reported per case: the bytes on disk in all (both ranks' files: state files, manifests and the
DCP directory), also as a multiple of one copy of the model and the optimizer's moments; the
training stall (how long ``save``, or ``write`` for A, blocks the caller: the whole save with its
manifest when synchronous, until ``save(..., background=True)`` returns for D); and the time until
durable (until the manifest is written: for D, until the returned future is done). Both are the
slowest rank's (an ``all_reduce`` MAX).

Like for like: the DDP and FSDP models start from the same weights and take the same AdamW step
(under FSDP each rank's loss is scaled by its share of the step's items, 1/W, and the gradients are
summed over ranks, so the step is the same arithmetic). In the warm-up round rank 0 reads every
case's checkpoint back, whole (A: each rank's state file; B-D: every rank's part of the DCP
directory, with DCP's ``load`` and no process group), and compares its parameters and AdamW state
with its live DDP model's and optimizer's: the largest difference is reported (it should be 0).
There, D also overwrites the sharded parameters with NaN as soon as ``save(..., background=True)``
returns, as training going on would change them, and puts them back once the checkpoint is durable:
its checkpoint must still hold the state of the call.

How it measures: the ranks share one temporary directory (``--dir``, default the system's; rank 0
creates it and broadcasts its path with ``dist.broadcast_object_list``); each case of each round
writes into a fresh sub-directory, which rank 0 measures and removes once every rank is done, so
the disk holds at most one checkpoint at a time. Each case starts after a barrier. One warm-up round
(not recorded, with the read-back check), then ``--repeats`` rounds that run every case once, in an
order rotated by one each round (A B C D, B C D A, ...); reported: medians over rounds, and the
stall as a ratio to A's of the same round (median). Writes go through the page cache and are
fsynced (``write_atomic``; DCP's ``FileSystemWriter`` syncs its files), so the times include the
disk's.

Usage::

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node=2 \\
        benchmarks/checkpoints.py [--megabytes 200] [--repeats 5] [--dir PATH] [--json PATH]
"""

import argparse
import copy
import gc
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from overhead import environment
from torch.distributed.checkpoint.state_dict_loader import load
from torch.distributed.tensor import DTensor

from traintel.engine.fsdp import shard
from traintel.run import checkpoint, layout
from traintel.run.sharded import ShardedState, Written

BACKEND = "gloo"
LAYERS = 4
"""Hidden ``Linear(h, h)`` layers of the model (ReLU between them)."""
STEP = 1
"""The optimizer step every checkpoint is of."""
BATCH = 8
"""Items per rank in the one training step."""
LR = 1e-3
CASES = {
    "A": "A. per-rank copies, DDP (checkpoint.write of the whole state on each rank)",
    "B": "B. DCP, DDP (replicated, sync)",
    "C": "C. DCP, FSDP2 (sharded, sync)",
    "D": "D. DCP, FSDP2 (sharded, background)",
}


@dataclass(frozen=True)
class Sample:
    """One save of one case, as its slowest rank saw it, and what it left on disk (rank 0's count)."""

    stall_s: float
    durable_s: float
    bytes: int
    """Every file under the case's directory, all ranks'."""
    state_bytes: int
    """The per-rank state files and manifests (``checkpoint.write``)."""
    dcp_bytes: int
    """The DCP directory (every rank's ``.distcp`` files and ``.metadata``); 0 for A."""
    files: int


def width(megabytes: float) -> int:
    """The ``h`` of ``LAYERS`` layers ``Linear(h, h)`` whose float32 parameters take ``megabytes`` (MB)."""
    return max(1, round(math.sqrt(megabytes * 1e6 / 4 / LAYERS)))


def make_model(hidden: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    modules: list[torch.nn.Module] = []
    for i in range(LAYERS):
        if i:
            modules.append(torch.nn.ReLU())
        modules.append(torch.nn.Linear(hidden, hidden))
    return torch.nn.Sequential(*modules)


def slowest(*seconds: float) -> list[float]:
    """The largest of each of ``seconds`` over the ranks (one ``all_reduce`` MAX)."""
    t = torch.tensor(seconds, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [float(v) for v in t.tolist()]


def train_one_step(model: torch.nn.Module, hidden: int, seed: int, scale: float) -> torch.optim.Optimizer:
    """An AdamW on ``model`` after one step on the same batch on every rank, the loss times ``scale``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(BATCH, hidden, generator=gen), torch.randn(BATCH, hidden, generator=gen)
    (F.mse_loss(model(x), y) * scale).backward()
    optimizer.step()
    for p in model.parameters():
        p.grad = None
    return optimizer


def local(param: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a parameter (a view of its storage), detached."""
    data = param.detach()
    return data.to_local() if isinstance(data, DTensor) else data


def on_disk(directory: Path) -> tuple[int, int, int, int]:
    """(all bytes, state files' and manifests' bytes, DCP directory's bytes, files) under ``directory``."""
    total = dcp = files = 0
    for path in directory.rglob("*"):
        if path.is_file():
            size = path.stat().st_size
            total += size
            files += 1
            if path.parent != directory:
                dcp += size
    return total, total - dcp, dcp, files


class Bench:
    """The four cases on one rank: a replicated (DDP) and a sharded (FSDP2) model with AdamW state."""

    def __init__(self, args: argparse.Namespace, base: Path) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.base = base
        self.hidden = width(args.megabytes)
        replicated = make_model(self.hidden, args.seed)
        sharded = shard(copy.deepcopy(replicated), ["Linear"])  # every unit's gradients summed over ranks
        self.params = sum(p.numel() for p in replicated.parameters())
        self.replicated = replicated
        self.replicated_optimizer = train_one_step(replicated, self.hidden, args.seed, 1.0)
        self.sharded = sharded
        self.sharded_optimizer = train_one_step(sharded, self.hidden, args.seed, 1.0 / self.world_size)
        # each makes its own gloo group (a collective): on every rank, in the same order
        self.replicated_state = ShardedState(replicated, self.replicated_optimizer, self.rank)
        self.sharded_state = ShardedState(sharded, self.sharded_optimizer, self.rank)
        self.count = 0

    def run(self, key: str, check: bool = False) -> tuple[Sample, float | None]:
        """Save one checkpoint as ``key`` says into a fresh directory, measure it and remove it; with
        ``check``, also rank 0's largest difference between what it holds and the live model."""
        self.count += 1
        directory = self.base / f"{self.count:03d}-{key}"
        if self.rank == 0:
            directory.mkdir()
        gc.collect()
        dist.barrier()
        stall, durable = self.save(key, directory, disturb=check)
        stall, durable = slowest(stall, durable)
        dist.barrier()  # every rank's files are written
        diff = None
        if self.rank == 0:
            total, state, dcp, files = on_disk(directory)
            if check:
                diff = self.check(key, directory)
            shutil.rmtree(directory)
            sample = Sample(stall, durable, total, state, dcp, files)
        else:
            sample = Sample(stall, durable, 0, 0, 0, 0)
        dist.barrier()  # removed before the next case starts
        return sample, diff

    def save(self, key: str, directory: Path, disturb: bool = False) -> tuple[float, float]:
        """This rank's (stall, durable) seconds for one save of case ``key``. ``disturb``: in the
        background (D), overwrite the parameters as soon as ``save`` returns, as training would go on,
        and put them back once the checkpoint is durable (``check`` then finds it holds the state of
        the call)."""
        rank, world_size = self.rank, self.world_size
        small = {"format": checkpoint.FORMAT, "step": STEP}
        if key == "A":
            t0 = time.perf_counter()
            whole = {
                **small,
                "model": self.replicated.state_dict(),
                "optimizer": self.replicated_optimizer.state_dict(),
            }
            checkpoint.write(directory, STEP, rank, whole, world_size=world_size)
            elapsed = time.perf_counter() - t0
            return elapsed, elapsed
        state = self.replicated_state if key == "B" else self.sharded_state
        background = key == "D"

        def then(written: Written) -> None:  # as traintel's checkpointing: the manifest after the files
            checkpoint.write(directory, STEP, rank, small, world_size=world_size, shards=written)

        t0 = time.perf_counter()
        future: Future[Written] = state.save(
            directory / layout.shards_name(STEP), background=background, then=then
        )
        stall = time.perf_counter() - t0
        kept = self.overwrite() if background and disturb else None
        future.result()  # done on return when synchronous: its manifest is written
        durable = time.perf_counter() - t0
        if kept is not None:
            self.put_back(kept)
        return stall, (durable if background else stall)

    def overwrite(self) -> list[torch.Tensor]:
        """Fill this rank's shards of the sharded model's parameters with NaN; returns their values."""
        shards = [local(p) for p in self.sharded.parameters()]
        kept = [t.clone() for t in shards]
        for t in shards:
            t.fill_(math.nan)
        return kept

    def put_back(self, kept: list[torch.Tensor]) -> None:
        shards = [local(p) for p in self.sharded.parameters()]
        for t, value in zip(shards, kept, strict=True):
            t.copy_(value)
        if not all(torch.equal(t, value) for t, value in zip(shards, kept, strict=True)):
            msg = "the sharded parameters were not put back"
            raise RuntimeError(msg)

    def check(self, key: str, directory: Path) -> float:
        """The largest |difference| between the checkpoint in ``directory`` (read back whole) and the
        live replicated model and optimizer, over the parameters and AdamW's moments and steps."""
        names = [name for name, _ in self.replicated.named_parameters()]
        if key == "A":
            diffs = []
            for rank in range(self.world_size):
                path = directory / layout.state_name(STEP, rank)
                state = torch.load(path, weights_only=True, mmap=True)
                moments = {names[i]: s for i, s in state["optimizer"]["state"].items()}
                diffs.append(self.difference(state["model"], moments))
                del state
            return max(diffs)
        # every rank's part, read whole into tensors shaped as the live ones (no collective)
        live = self.replicated_optimizer.state
        params = dict(self.replicated.named_parameters())
        whole: dict[str, Any] = {
            "model": {name: torch.empty_like(p) for name, p in params.items()},
            "optimizer": {
                "state": {
                    name: {k: torch.empty_like(v) for k, v in live[p].items()} for name, p in params.items()
                }
            },
        }
        with warnings.catch_warnings():  # that it reads in a single process: as meant
            warnings.simplefilter("ignore", UserWarning)
            load(whole, checkpoint_id=directory / layout.shards_name(STEP), no_dist=True)
        return self.difference(whole["model"], whole["optimizer"]["state"])

    def difference(self, model: dict[str, torch.Tensor], moments: dict[str, dict[str, Any]]) -> float:
        """The largest |difference| between ``model`` and ``moments`` (keyed by parameter name) and the
        live replicated model and optimizer; infinite where a value is missing or not finite."""
        live = self.replicated_optimizer.state
        names = {name for name, _ in self.replicated.named_parameters()}
        if set(model) != names or set(moments) != names:
            return math.inf
        pairs = []
        for name, p in self.replicated.named_parameters():
            pairs.append((model[name], p.detach()))
            if set(moments[name]) != set(live[p]):
                return math.inf
            pairs += [(torch.as_tensor(moments[name][field]), value) for field, value in live[p].items()]
        worst = max(float((read - value).abs().max()) for read, value in pairs)
        return worst if math.isfinite(worst) else math.inf


def measure(bench: Bench, repeats: int, say: Callable[[str], None]) -> list[dict[str, Sample]]:
    """``repeats`` rounds; each runs every case once, in an order rotated by one per round."""
    keys = list(CASES)
    rounds: list[dict[str, Sample]] = []
    for r in range(repeats):
        order = [*keys[r % len(keys) :], *keys[: r % len(keys)]]
        rounds.append({key: bench.run(key)[0] for key in order})
        say(f"  round {r + 1}/{repeats} done")
    return rounds


def summarize(bench: Bench, rounds: Sequence[dict[str, Sample]]) -> list[dict[str, Any]]:
    copy_bytes = bench.params * 4 * 3  # parameters and AdamW's two moments, float32
    rows = []
    for key, label in CASES.items():
        runs = [r[key] for r in rounds]
        stall_ratio = [r[key].stall_s / r["A"].stall_s for r in rounds]
        total = statistics.median(s.bytes for s in runs)
        rows.append(
            {
                "key": key,
                "case": label,
                "bytes": total,
                "state_file_bytes": statistics.median(s.state_bytes for s in runs),
                "dcp_bytes": statistics.median(s.dcp_bytes for s in runs),
                "files": statistics.median(s.files for s in runs),
                "copies": total / copy_bytes,
                "stall_s": statistics.median(s.stall_s for s in runs),
                "durable_s": statistics.median(s.durable_s for s in runs),
                "stall_ratio_to_A": statistics.median(stall_ratio),
                "samples": [asdict(s) for s in runs],
            }
        )
    return rows


def render(
    env: dict[str, Any], bench: Bench, args: argparse.Namespace, rows: Sequence[dict[str, Any]]
) -> str:
    h = bench.hidden
    lines = [
        f"torch {env['torch']}, pytorch-ignite {env['pytorch-ignite']}, traintel {env['traintel']}, "
        f"Python {env['python']}; torch threads {env['torch_threads']} per rank, usable CPUs "
        f"{env['cpus_usable']}; {env['platform']}",
        "",
        f"- {bench.world_size} ranks under torchrun, {BACKEND} on CPU; model: {LAYERS}x Linear({h},{h}) "
        f"({bench.params:,} float32 parameters, {bench.params * 4 / 1e6:.1f} MB) and AdamW after one step "
        f"(one copy of parameters and moments: {bench.params * 12 / 1e6:.1f} MB); medians of "
        f"{args.repeats} rounds, each case once a round in a rotated order.",
        "- on disk: every file of the checkpoint, both ranks' (state files, manifests, DCP directory); "
        "copies: that over one copy of the parameters and AdamW's moments.",
        "- stall: how long the save blocks the training thread (for D: until save(background=True) "
        "returns); durable: until the last manifest is written; both the slowest rank's.",
        "",
        "| case | on disk MB | copies | files | training stall s | stall vs A | durable after s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['bytes'] / 1e6:.1f} | {r['copies']:.2f} | {r['files']:.0f} "
            f"| {r['stall_s']:.3f} | {r['stall_ratio_to_A']:.2f} | {r['durable_s']:.3f} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add = parser.add_argument
    add("--megabytes", type=float, default=200.0, help="float32 parameters of the model, MB (default 200)")
    add("--repeats", type=int, default=5, help="timed rounds (default 5)")
    add("--dir", type=Path, default=None, help="where the checkpoints go (default: the system's temp dir)")
    add("--seed", type=int, default=0, help="seed for the weights and the batch (default 0)")
    add("--json", type=Path, default=None, metavar="PATH", help="rank 0 also writes the numbers to PATH")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.megabytes <= 0:
        parser.error("--megabytes must be > 0")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        parser.error(
            "start it with torchrun: OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone "
            "--nproc-per-node=2 benchmarks/checkpoints.py"
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    dist.init_process_group(BACKEND)
    rank = dist.get_rank()

    def elapsed() -> float:
        return time.perf_counter() - started

    def say(text: str) -> None:
        if rank == 0:
            print(text, file=sys.stderr)

    # one directory for all ranks' files (rank 0's), as on a shared disk
    shared = [tempfile.mkdtemp(prefix="traintel-bench-checkpoints-", dir=args.dir) if rank == 0 else None]
    dist.broadcast_object_list(shared, src=0)
    base = Path(str(shared[0]))
    try:
        say("building the models and taking one AdamW step ...")
        bench = Bench(args, base)
        say(f"warming up (one round of each case, read back and compared) ... [{elapsed():.0f} s]")
        diffs = {key: bench.run(key, check=True)[1] for key in CASES}
        say(f"timed rounds ... [{elapsed():.0f} s]")
        rounds = measure(bench, args.repeats, say)
        dist.barrier()
    finally:  # after a failure, no waiting for the others: torchrun ends them
        if rank == 0:
            shutil.rmtree(base, ignore_errors=True)
    dist.destroy_process_group()
    if rank != 0:
        return 0
    rows = summarize(bench, rounds)
    env = environment(heap_kept=False)
    print(render(env, bench, args, rows))
    worst = max(d for d in diffs.values() if d is not None)
    print(f"\nwarm-up check: max |difference| of any checkpoint read back from the live state: {worst:.2e}")
    print(f"benchmark wall time: {time.perf_counter() - started:.1f} s")
    if args.json is not None:
        payload = {
            "env": env,
            "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "world_size": bench.world_size,
            "backend": BACKEND,
            "hidden": bench.hidden,
            "layers": LAYERS,
            "model_parameters": bench.params,
            "one_copy_bytes": bench.params * 12,
            "unit": "bytes on disk (all ranks' files); seconds, slowest rank",
            "warmup_max_state_diff": diffs,
            "cases": rows,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
