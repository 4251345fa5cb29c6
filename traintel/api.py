"""The Python API: build a run (an Ignite trainer with traintel attached), then run it."""

from __future__ import annotations

import os
import re
import secrets
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, BinaryIO

import torch
import yaml
from ignite.engine import Engine, Events

from traintel._dirs import missing_dirs, remove_empty
from traintel.config import Config, coerce_config
from traintel.engine.evaluator import create_evaluator
from traintel.engine.optim import build_optimizer, build_scheduler
from traintel.engine.step import default_count_items, default_prepare
from traintel.engine.trainer import create_trainer
from traintel.engine.windows import WindowedLoader
from traintel.errors import ConfigError
from traintel.handlers.evaluation import EvaluateEachEpoch
from traintel.handlers.lifecycle import RunLifecycle
from traintel.handlers.telemetry import TrainTelemetry
from traintel.logs import route_stdlib_logging
from traintel.plugins import make_sink
from traintel.records import RunEndRecord, RunStartRecord, freeze
from traintel.sinks.base import RunContext, Sink
from traintel.sinks.diagnostic import DiagnosticSink
from traintel.sinks.fanout import FanOut
from traintel.sinks.json_stdout import JsonSink
from traintel.sinks.prometheus import PrometheusSink
from traintel.task import Task, check_task, make_task

_SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}


def _stdout_is_tty() -> bool:
    try:
        return os.isatty(sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):
        return False


def new_run_id(name: str) -> str:
    """``<name slug>-<UTC yyyymmddThhmmssZ>-<6 hex>``."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "run"
    return f"{slug}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(3)}"


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "trainer.device", "cuda was asked for but no CUDA device is available; use auto or cpu"
        )
    return torch.device(choice)


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temp file and rename, so a crash never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; match the other files of the run
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Run:
    """One configured run: ``trainer`` is a real Ignite Engine with traintel's handlers attached.

    Attach your own Ignite handlers to ``trainer`` (or ``evaluator``), then call
    ``run()``. The sinks are open from construction; ``run()`` closes them at the
    end, and ``close()`` (or leaving a ``with`` block) closes them if it never ran.
    """

    def __init__(
        self,
        config: Config,
        task: Task,
        *,
        device: torch.device,
        extra_sinks: Sequence[Sink] = (),
        json_stream: BinaryIO | None = None,
    ) -> None:
        self.config = config
        self.task = task
        self.device = device
        self.run_id = config.run.id or new_run_id(config.run.name)
        self.run_dir = Path(config.run.dir or os.path.join("runs", self.run_id))
        self.stop_signal: str | None = None
        tc = config.trainer
        model = task.model.to(device)
        self.optimizer = build_optimizer(tc.optimizer, (p for p in model.parameters() if p.requires_grad))
        self.data = WindowedLoader(task.train_loader, tc.accumulation_steps)
        self.epoch_length = self.data.__len__() if self.data.batches_per_epoch() is not None else None
        total = self.epoch_length * tc.max_epochs if self.epoch_length is not None else None
        self.scheduler = build_scheduler(tc.scheduler, self.optimizer, total)
        prepare = task.prepare or default_prepare
        count_items = task.count_items or default_count_items
        self.trainer: Engine = create_trainer(
            model,
            task.loss_fn,
            self.optimizer,
            self.scheduler,
            device=device,
            prepare=prepare,
            count_items=count_items,
            grad_clip_norm=tc.grad_clip_norm,
            report_grad_norm=tc.report_grad_norm,
            precision=tc.precision,
        )
        self.evaluator: Engine | None = None
        if task.val_loader is not None:
            self.evaluator = create_evaluator(
                model,
                task.loss_fn,
                device=device,
                prepare=prepare,
                count_items=count_items,
                precision=tc.precision,
            )

        self.fanout = self._make_sinks(extra_sinks, json_stream)
        if self.json_sink is not None and self.json_sink.console:
            self._attach_progress_bar()  # first, so the bar closes before an epoch's lines are printed
        emit = self.fanout.emit
        self.telemetry = TrainTelemetry(
            emit,
            self.run_id,
            every=config.telemetry.every,
            diagnostics=config.sinks.diagnostic.enabled,
            max_delay=config.telemetry.max_delay_seconds,
            emit_many=self.fanout.emit_many,
        )
        self.lifecycle = RunLifecycle(
            self.fanout, self._start_record, self.run_id, before_end=self.telemetry.flush
        )
        self.lifecycle.attach(self.trainer)
        self.telemetry.attach(self.trainer)
        if self.evaluator is not None and task.val_loader is not None:
            EvaluateEachEpoch(self.evaluator, task.val_loader, emit, self.run_id).attach(self.trainer)

        context = RunContext(
            run_id=self.run_id,
            name=config.run.name,
            run_dir=self.run_dir,
            config=freeze(config.to_dict(redact=True)),
        )
        # Sinks may write into the run directory from open(); one that stays empty is removed again.
        self._made_dirs = missing_dirs(self.run_dir)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError("run.dir", f"cannot create {str(self.run_dir)!r}: {exc.strerror}") from None
        try:
            self.fanout.open(context)
        except BaseException:
            remove_empty(self._made_dirs)
            raise

        self._unroute: Callable[[], None] | None = None
        if self.json_sink is not None:
            self._unroute = route_stdlib_logging(self.json_sink)
        if config.sinks.diagnostic.enabled:
            self.trainer.add_event_handler(Events.STARTED, self._save_config)

    def _make_sinks(self, extra: Sequence[Sink], json_stream: BinaryIO | None) -> FanOut:
        cfg = self.config.sinks
        sinks: list[Sink] = []
        self.prometheus: PrometheusSink | None = None
        if cfg.prometheus.enabled:
            p = cfg.prometheus
            self.prometheus = PrometheusSink(
                p.host,
                p.port,
                p.linger_seconds,
                certfile=p.certfile,
                keyfile=p.keyfile,
                client_cafile=p.client_cafile,
                pushgateway=p.pushgateway,
            )
            sinks.append(self.prometheus)
        if cfg.diagnostic.enabled:
            d = cfg.diagnostic
            sinks.append(DiagnosticSink(d.filename, max_bytes=d.max_bytes, backups=d.backups))
        self.json_sink: JsonSink | None = None
        if cfg.json_.enabled:
            j = cfg.json_
            console = j.format == "console" or (
                j.format == "auto" and json_stream is None and _stdout_is_tty()
            )
            self.json_sink = JsonSink(
                json_stream,
                capacity=j.queue_capacity,
                close_timeout=j.close_timeout_seconds,
                profile=j.profile,
                console=console,
            )
            sinks.append(self.json_sink)
        for index, spec in enumerate(cfg.extra):
            if spec.enabled:
                sinks.append(make_sink(spec, index))
        sinks.extend(extra)
        names = [s.name for s in sinks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError("sinks.extra", f"sink names must be unique; {dupes} appear more than once")
        fanout = FanOut(sinks)
        if self.prometheus is not None:
            self.prometheus.collector.sink_errors = fanout.errors
            self.prometheus.collector.sink_dropped = fanout.dropped
        return fanout

    def _attach_progress_bar(self) -> None:
        """A tqdm bar (Ignite's ProgressBar, on stderr) with the step loss, refreshed at the telemetry
        cadence, so the terminal view syncs with the device no more often than emission does."""
        from ignite.handlers import ProgressBar

        every = self.config.telemetry.every
        ProgressBar(persist=True).attach(
            self.trainer,
            output_transform=lambda loss: {"loss": float(loss)},
            event_name=Events.ITERATION_COMPLETED(every=every),
        )

    def _save_config(self, _: Engine) -> None:
        """``<run dir>/config.yaml``: the resolved config (secrets redacted), written atomically."""
        text = yaml.safe_dump(self.config.to_dict(redact=True), sort_keys=False)
        _write_atomic(self.run_dir / "config.yaml", text)

    def _start_record(self) -> RunStartRecord:
        return RunStartRecord(
            run_id=self.run_id,
            time=time.time(),
            name=self.config.run.name,
            run_dir=str(self.run_dir),
            device=str(self.device),
            config=freeze(self.config.to_dict(redact=True)),
            metrics_url=self.prometheus.url if self.prometheus is not None else None,
        )

    def stop(self, reason: str) -> None:
        """Finish the current optimizer step, then end the run as ``terminated``."""
        state: Any = self.trainer.state  # Ignite's State takes extra attributes
        state.stop_reason = reason
        self.trainer.terminate()
        if self.evaluator is not None:
            self.evaluator.terminate()

    @contextmanager
    def _signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handle(signum: int, _frame: FrameType | None) -> None:
            if self.lifecycle.ended is None:
                self.stop_signal = _SIGNALS[signal.Signals(signum)]
                self.stop(self.stop_signal)
            elif self.prometheus is not None:
                self.prometheus.cancel_linger()  # the run already ended: stop serving and exit

        previous = {s: signal.signal(s, handle) for s in _SIGNALS}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def run(self, stop_signal: str | None = None) -> RunEndRecord:
        """Train for ``trainer.max_epochs``; returns the ``run.end`` record.

        ``stop_signal`` names a signal that arrived before the run (while starting up): the
        run then starts, writes ``run.start`` and ends at once as ``terminated``.
        """
        if stop_signal is not None:
            self.stop_signal = stop_signal
            self.trainer.add_event_handler(Events.STARTED, lambda _: self.stop(stop_signal))
        try:
            with self._signals():
                self.trainer.run(
                    self.data, max_epochs=self.config.trainer.max_epochs, epoch_length=self.epoch_length
                )
        finally:
            self.close()
        ended = self.lifecycle.ended
        if ended is None:  # pragma: no cover - the lifecycle handler always ends a started run
            msg = "the run ended without a run.end record"
            raise RuntimeError(msg)
        return ended

    def close(self) -> None:
        """Close the sinks (idempotent); a run directory left empty is removed."""
        unroute, self._unroute = self._unroute, None
        if unroute is not None:
            unroute()
        self.fanout.close()
        remove_empty(self._made_dirs)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build(
    config: Config | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    task: Any = None,
    *,
    sinks: Sequence[Sink] = (),
    json_stream: BinaryIO | None = None,
) -> Run:
    """Build a Run from a config (object, mapping, YAML path or None) and optionally a task made in code.

    Without ``task``, ``config.task.factory`` is called with ``config.task.params``.
    ``sinks`` are added after the configured ones.
    """
    cfg = coerce_config(config)
    device = resolve_device(cfg.trainer.device)
    torch.manual_seed(cfg.run.seed)
    checked = check_task(task) if task is not None else make_task(cfg.task.factory, cfg.task.params)
    return Run(cfg, checked, device=device, extra_sinks=sinks, json_stream=json_stream)


def train(
    config: Config | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    task: Any = None,
    *,
    sinks: Sequence[Sink] = (),
    json_stream: BinaryIO | None = None,
) -> RunEndRecord:
    """Build and run in one call; returns the ``run.end`` record."""
    return build(config, task, sinks=sinks, json_stream=json_stream).run()
