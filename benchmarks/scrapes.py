"""What tight-loop scrapers of ``/metrics`` cost training: steps/s with 0, 1 and 8 scrapers.

What: one process trains the built-in forecasting task (``traintel.tasks.forecast``, an MLP on
synthetic series, micro-batches of 32, k=3, ``telemetry.every=10``) through ``traintel.build``
with all three sinks on (JSON lines to ``os.devnull``, the diagnostic file in a temporary run
directory, the exporter on a free port), while 0, 1 or 8 scraper processes each fetch
``/metrics`` in a loop as fast as they can: a fresh TCP connection per scrape, a full HTTP GET,
the whole body read. Reported: the training's optimizer steps/s, its ratio to 0 scrapers, and the
scrapes/s the exporter served (and the scrapes that failed: refused, reset, timed out, not 200).

Why: a scrape must cost training little however it is scraped: a Prometheus scrapes every few
seconds, but a misconfigured one, several of them, or a curl loop in a shell scrape much faster,
and the exporter runs in the training process, on its CPU and under its GIL.
Target: 8 scrapers cost under 15% of the steps/s (ratio >= 0.85).

How it measures: steps/s is the run's optimizer steps over the time from its first
``EPOCH_STARTED`` to its last ``EPOCH_COMPLETED`` (so start-up, ``run.end`` and closing the sinks
are out of it); the scrapes counted are those that ended inside that time. The scrapers are
started before the run (they scrape its exporter from ``build`` on) and each has served a scrape
before training begins. They run in separate processes (``multiprocessing``, spawned: they import
nothing but the standard library), at ``--nice`` 19 by default: in production the scraper's CPU is
another machine's, and on a machine with few cores it would otherwise take the training's core
and be counted as the exporter's cost. Torch runs with ``--threads`` 1 (a second intra-op thread
fighting the scrapers for a core makes steps erratic). One warm-up run without scrapers (not recorded), then
``--rounds`` rounds, each running the three cases in an order rotated by one per round. Reported:
medians over rounds; the ratio is the median of per-round ratios to the 0-scraper run of the
same round.

Usage::

    python benchmarks/scrapes.py [--rounds 5] [--steps 1200] [--scrapers 0,1,8] [--json scrapes.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.sharedctypes import SynchronizedArray
from pathlib import Path
from typing import Any

STEPS_PER_EPOCH = 100
"""9,600 training samples in micro-batches of 32, k=3."""
TARGET_RATIO = 0.85
"""8 scrapers cost under 15%."""


# -- scrapers (spawned processes: standard library only) -----------------------------------------


def scrape_once(host: str, port: int, request: bytes) -> bool:
    """One full GET over a fresh connection; True when the answer was a whole 200 response."""
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                return False
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length = next(
            (int(h.split(b":", 1)[1]) for h in lines[1:] if h.lower().startswith(b"content-length:")), None
        )
        while length is None or len(body) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
        status = lines[0].split(b" ", 2)
        return len(status) > 1 and status[1] == b"200" and (length is None or len(body) == length)


def scrape_loop(
    host: str, port: int, *, slot: int, counts: SynchronizedArray[int], stop: Any, nice: int
) -> None:
    """Scrape until ``stop`` is set; ``counts[2*slot]`` counts served scrapes, ``[2*slot+1]`` failed."""
    if nice:
        os.nice(nice)
    request = (
        f"GET /metrics HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: traintel-bench\r\n"
        "Accept: */*\r\nAccept-Encoding: identity\r\nConnection: close\r\n\r\n"
    ).encode()
    while not stop.is_set():
        try:
            ok = scrape_once(host, port, request)
        except OSError:
            ok = False
        if ok:
            counts[2 * slot] += 1
        else:
            counts[2 * slot + 1] += 1
            time.sleep(0.001)  # a refused connection returns at once


@contextlib.contextmanager
def scrapers(n: int, host: str, port: int, nice: int) -> Iterator[SynchronizedArray[int]]:
    """``n`` scraper processes on ``host:port``, each past its first served scrape; yields the counts."""
    ctx = multiprocessing.get_context("spawn")
    counts = ctx.Array("q", max(1, 2 * n), lock=False)
    stop = ctx.Event()
    procs = [
        ctx.Process(
            target=scrape_loop,
            args=(host, port),
            kwargs={"slot": i, "counts": counts, "stop": stop, "nice": nice},
            daemon=True,
        )
        for i in range(n)
    ]
    for p in procs:
        p.start()
    try:
        deadline = time.monotonic() + 30
        while not all(counts[2 * i] for i in range(n)):
            if time.monotonic() > deadline:
                msg = f"the scrapers did not get a scrape through in 30 s (served, failed): {served(counts)}"
                raise RuntimeError(msg)
            time.sleep(0.01)
        yield counts
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


def served(counts: SynchronizedArray[int]) -> tuple[int, int]:
    values = [counts[i] for i in range(len(counts))]
    return sum(values[0::2]), sum(values[1::2])


# -- the training run --------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One timed run."""

    scrapers: int
    steps: int
    loop_s: float
    """First epoch start to last epoch end."""
    served: int
    """Scrapes answered 200 in full inside ``loop_s``."""
    failed: int

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.loop_s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_case(n: int, args: argparse.Namespace, root: Path, tag: str) -> Sample:
    """Build a traintel run, start ``n`` scrapers on its exporter, train it once, timed."""
    import gc

    from ignite.engine import Events

    from traintel.run.api import build

    port = free_port()
    epochs = args.steps // STEPS_PER_EPOCH
    config: dict[str, Any] = {
        "run": {"dir": str(root / tag), "id": tag},
        "task": {
            "factory": "traintel.tasks.forecast:make_task",
            "params": {"train_samples": 96 * STEPS_PER_EPOCH, "val_samples": 0},
        },
        "trainer": {"max_epochs": epochs, "device": "cpu"},
        "telemetry": {"every": args.every},
        "sinks": {"prometheus": {"host": "127.0.0.1", "port": port}},
    }
    with open(os.devnull, "wb") as devnull:
        run = build(config, json_stream=devnull)
        marks: dict[str, tuple[float, int, int]] = {}
        with scrapers(n, "127.0.0.1", port, args.nice) as counts:

            def mark(name: str) -> None:
                marks[name] = (time.perf_counter(), *served(counts))

            run.trainer.add_event_handler(Events.EPOCH_STARTED(once=1), lambda _: mark("start"))
            run.trainer.add_event_handler(Events.EPOCH_COMPLETED(once=epochs), lambda _: mark("end"))
            gc.collect()
            end = run.run()
    if end.status != "completed" or end.step != epochs * STEPS_PER_EPOCH:
        msg = f"{tag}: the run ended {end.status} ({end.reason}) at step {end.step}"
        raise RuntimeError(msg)
    (t0, ok0, bad0), (t1, ok1, bad1) = marks["start"], marks["end"]
    return Sample(n, end.step, t1 - t0, ok1 - ok0, bad1 - bad0)


def measure(args: argparse.Namespace, root: Path) -> list[dict[int, Sample]]:
    cases: list[int] = args.scrapers
    rounds: list[dict[int, Sample]] = []
    for r in range(args.rounds):
        order = [*cases[r % len(cases) :], *cases[: r % len(cases)]]
        rounds.append({n: run_case(n, args, root, f"r{r}-s{n}") for n in order})
        print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr)
    return rounds


# -- report ------------------------------------------------------------------------------------


def summarize(args: argparse.Namespace, rounds: Sequence[dict[int, Sample]]) -> list[dict[str, Any]]:
    from overhead import quartiles  # here, not at the top: the spawned scrapers import this module

    base = min(args.scrapers)
    rows = []
    for n in args.scrapers:
        ratios = [s[n].steps_per_s / s[base].steps_per_s for s in rounds]
        rows.append(
            {
                "scrapers": n,
                "steps_per_s": statistics.median(s[n].steps_per_s for s in rounds),
                "ratio": statistics.median(ratios),
                "ratio_quartiles": quartiles(ratios),
                "scrapes_per_s": statistics.median(s[n].served / s[n].loop_s for s in rounds),
                "failed_per_s": statistics.median(s[n].failed / s[n].loop_s for s in rounds),
                "samples": [asdict(s[n]) for s in rounds],
            }
        )
    return rows


def environment() -> dict[str, Any]:
    from importlib import metadata

    import torch

    try:
        version = metadata.version("traintel")
    except metadata.PackageNotFoundError:
        version = "?"
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "traintel": version,
        "platform": platform.platform(),
        "cpus_usable": affinity,
        "torch_threads": torch.get_num_threads(),
    }


def render(env: dict[str, Any], args: argparse.Namespace, rows: Sequence[dict[str, Any]]) -> str:
    base = min(args.scrapers)
    lines = [
        f"torch {env['torch']}, traintel {env['traintel']}, Python {env['python']}; torch threads "
        f"{env['torch_threads']}, usable CPUs {env['cpus_usable']}; {env['platform']}",
        "",
        f"- built-in forecasting task, {args.steps} optimizer steps per run (k=3 micro-batches of 32), "
        f"telemetry.every={args.every}, all three sinks; medians of {args.rounds} interleaved rounds.",
        f"- scrapers: separate processes at nice {args.nice}, each a loop of full GETs of /metrics, "
        "one fresh connection per scrape.",
        f"- ratio: median of per-round steps/s ratios to {base} scrapers in the same round; "
        "scrapes/s: answered 200 in full while training.",
        "",
        "| scrapers | steps/s | ratio to 0 scrapers | quartiles of the ratio | cost | scrapes/s served "
        "| failed scrapes/s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        low, high = r["ratio_quartiles"]
        lines.append(
            f"| {r['scrapers']} | {r['steps_per_s']:.0f} | {r['ratio']:.3f} | {low:.3f}-{high:.3f} "
            f"| {1 - r['ratio']:.1%} | {r['scrapes_per_s']:.0f} | {r['failed_per_s']:.1f} |"
        )
    worst = next((r for r in rows if r["scrapers"] == 8), None)
    if worst is not None:
        verdict = "met" if worst["ratio"] >= TARGET_RATIO else "NOT met"
        lines += [
            "",
            f"target: 8 scrapers cost under {1 - TARGET_RATIO:.0%} (ratio >= {TARGET_RATIO}): {verdict} "
            f"(cost {1 - worst['ratio']:.1%})",
        ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add = parser.add_argument
    add("--rounds", type=int, default=5, help="interleaved timed rounds (default 5)")
    add(
        "--steps",
        type=int,
        default=1200,
        help=f"optimizer steps per run, a multiple of {STEPS_PER_EPOCH} (default 1200)",
    )
    add(
        "--scrapers",
        default="0,1,8",
        help="scraper counts to compare; the smallest is the base (default 0,1,8)",
    )
    add("--every", type=int, default=10, help="telemetry.every (default 10)")
    add("--nice", type=int, default=19, help="niceness of the scraper processes (default 19; 0: none)")
    add("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    add("--json", type=Path, default=None, metavar="PATH", help="also write the numbers to PATH")
    args = parser.parse_args(argv)
    try:
        args.scrapers = sorted({int(x) for x in args.scrapers.split(",")})
    except ValueError:
        parser.error("--scrapers must be comma-separated integers")
    if args.rounds < 1 or args.every < 1 or args.threads < 1 or min(args.scrapers) < 0:
        parser.error("--rounds, --every and --threads must be >= 1, --scrapers >= 0")
    if args.steps < STEPS_PER_EPOCH or args.steps % STEPS_PER_EPOCH:
        parser.error(f"--steps must be a positive multiple of {STEPS_PER_EPOCH}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import gc

    import torch

    torch.set_num_threads(args.threads)
    gc.collect()
    gc.freeze()  # torch's long-lived objects stay out of full collections inside the timed loops
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="traintel-scrapes-") as tmp:
        root = Path(tmp)
        print("warming up (one run, not recorded) ...", file=sys.stderr)
        run_case(min(args.scrapers), args, root, "warmup")
        rounds = measure(args, root)
    rows = summarize(args, rounds)
    env = environment()
    print(render(env, args, rows))
    print(f"\nbenchmark wall time: {time.perf_counter() - started:.1f} s")
    if args.json is not None:
        payload = {
            "env": env,
            "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "cases": rows,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
