"""What a slow plug-in sink costs training: steps/s with no plug-in, and with one whose every
delivery takes ``--delay-ms`` (20 ms by default), delivered on the training thread and on a thread
of its own (``threaded``).

What: one process trains an MLP (``--hidden`` units, two hidden layers, micro-batches of 32, k=4)
through ``traintel.build`` with the built-in sinks off and every step emitted
(``telemetry.every=1``): records are delivered every ``telemetry.max_delay_seconds`` (50 ms), a
few times per second to a dozen. The plug-in sleeps ``--delay-ms`` per ``emit_many`` (a database
insert, a tracking server's HTTP request).

Why: a plug-in's ``emit`` runs on the training thread unless it asks for a thread of its own; a
back-end 20 ms away then takes that much of every delivery from training. Threaded, it must cost
under 5% of the step rate (ratio >= 0.95).

How it measures: steps/s is the run's optimizer steps over the time from its first
``EPOCH_STARTED`` to its last ``EPOCH_COMPLETED``. One warm-up run, then ``--rounds`` rounds, each
running the three cases in an order rotated by one per round; reported are medians over rounds,
and the ratio is the median of per-round ratios to the run without a plug-in of the same round.

Usage::

    python benchmarks/slow_sink.py [--rounds 5] [--steps 300] [--delay-ms 20] [--json slow_sink.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events

from traintel.records import Record
from traintel.run.api import build
from traintel.sinks.base import RunContext
from traintel.task import Task

K = 4
BATCH = 32
CASES = ("none", "slow", "slow_threaded")
LABELS = {
    "none": "no plug-in",
    "slow": "slow plug-in on the training thread",
    "slow_threaded": "slow plug-in, threaded",
}
TARGET = 0.95


class SlowSink:
    """A plug-in whose every delivery takes ``delay`` seconds."""

    name = "slow"

    def __init__(self, delay: float, *, threaded: bool) -> None:
        self.delay, self.threaded, self.deliveries = delay, threaded, 0

    def open(self, context: RunContext) -> None:
        pass

    def emit_many(self, records: Sequence[Record]) -> None:
        self.deliveries += 1
        time.sleep(self.delay)

    def emit(self, record: Record) -> None:
        self.emit_many((record,))

    def close(self) -> None:
        pass


def _task(hidden: int, steps: int) -> Task:
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(BATCH, 64, generator=g), torch.randn(BATCH, 1, generator=g)) for _ in range(steps * K)
    ]
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, 1),
    )  # fmt: skip
    return Task(model=model, loss_fn=torch.nn.functional.mse_loss, train_loader=batches)


def run_case(case: str, args: argparse.Namespace, root: Path, n: int) -> dict[str, Any]:
    """One run of ``case``: its steps/s over its epoch, and the plug-in's deliveries."""
    off = {"enabled": False}
    config = {
        "run": {"dir": str(root / f"{case}-{n}"), "id": f"slow-sink-{case}-{n}"},
        "trainer": {"max_epochs": 1, "accumulation_steps": K, "optimizer": {"name": "sgd", "lr": 0.01},
                    "device": "cpu"},
        "telemetry": {"every": 1},
        "sinks": {"json": off, "diagnostic": off, "prometheus": off},
    }  # fmt: skip
    sink = None if case == "none" else SlowSink(args.delay_ms / 1000, threaded=case == "slow_threaded")
    run = build(config, _task(args.hidden, args.steps), sinks=[] if sink is None else [sink])
    times: dict[str, float] = {}
    run.trainer.add_event_handler(
        Events.EPOCH_STARTED, lambda _: times.setdefault("start", time.perf_counter())
    )
    run.trainer.add_event_handler(
        Events.EPOCH_COMPLETED, lambda _: times.__setitem__("end", time.perf_counter())
    )
    end = run.run()
    if end.status != "completed" or end.step != args.steps:
        msg = f"{case}: the run ended {end.status} at step {end.step}"
        raise RuntimeError(msg)
    seconds = times["end"] - times["start"]
    return {"steps_per_second": args.steps / seconds, "deliveries": 0 if sink is None else sink.deliveries}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for case in CASES:  # warm-up
            run_case(case, args, root, 0)
        rounds: list[dict[str, dict[str, Any]]] = []
        for r in range(args.rounds):
            order = CASES[r % len(CASES) :] + CASES[: r % len(CASES)]
            rounds.append({case: run_case(case, args, root, r + 1) for case in order})
    rows = []
    for case in CASES:
        rates = [timed[case]["steps_per_second"] for timed in rounds]
        ratios = [timed[case]["steps_per_second"] / timed["none"]["steps_per_second"] for timed in rounds]
        rows.append({
            "case": case, "label": LABELS[case], "steps_per_second": statistics.median(rates),
            "ratio": statistics.median(ratios),
            "deliveries": statistics.median(t[case]["deliveries"] for t in rounds),
        })  # fmt: skip
    return {
        "steps": args.steps,
        "delay_ms": args.delay_ms,
        "hidden": args.hidden,
        "rounds": rounds,
        "cases": rows,
    }


def render(data: dict[str, Any]) -> str:
    lines = [
        f"{data['steps']} optimizer steps of k={K} per run, a plug-in delivery of {data['delay_ms']:g} ms, "
        f"medians of {len(data['rounds'])} rounds",
        "",
        "| case | steps/s | ratio to no plug-in | deliveries per run |",
        "|---|---:|---:|---:|",
    ]
    for row in data["cases"]:
        lines.append(
            f"| {row['label']} | {row['steps_per_second']:.1f} | {row['ratio']:.3f} | {row['deliveries']:g} |"
        )
    threaded = next(row for row in data["cases"] if row["case"] == "slow_threaded")["ratio"]
    verdict = "within" if threaded >= TARGET else "BELOW"
    lines += ["", f"threaded: ratio {threaded:.3f} >= {TARGET}: {verdict}"]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the three cases (default 5)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default 300)")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="the plug-in's time per delivery (20)")
    parser.add_argument("--hidden", type=int, default=512, help="hidden units of the MLP (default 512)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.delay_ms < 0 or args.hidden < 1 or args.threads < 1:
        parser.error("--rounds, --steps, --hidden and --threads must be >= 1, --delay-ms >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    data = measure(args)
    print(render(data))
    if args.json is not None:
        args.json.write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
