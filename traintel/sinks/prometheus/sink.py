"""Prometheus ``/metrics`` exporter: a collector that reads the latest records at scrape time."""

from __future__ import annotations

import errno
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

from prometheus_client import CollectorRegistry, ProcessCollector, push_to_gateway
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import basic_auth_handler, default_handler
from prometheus_client.registry import Collector

from traintel import threads
from traintel.errors import ConfigError, one_line
from traintel.records import (
    BatchRecord,
    CheckpointRecord,
    EpochRecord,
    EvalRecord,
    MetricRecord,
    Record,
    RunEndRecord,
    RunStartRecord,
    StepRecord,
)
from traintel.redaction import redact_url, redact_url_value
from traintel.sinks.base import RunContext
from traintel.sinks.prometheus.server import MetricsServer, server_context


class _Latest(NamedTuple):
    """The newest record of each kind; replaced whole, so a scrape reads one consistent set."""

    start: RunStartRecord | None = None
    batch: BatchRecord | None = None
    step: StepRecord | None = None
    epoch: EpochRecord | None = None
    evals: Mapping[str, EvalRecord] = MappingProxyType({})
    """The newest ``eval.epoch`` of each split (validation loader), in the order first seen."""
    user: Mapping[str, float] = MappingProxyType({})
    """The newest value of each name logged with ``Run.log`` (``metric`` records), in the order first seen."""
    checkpoints: Mapping[str, CheckpointRecord] = MappingProxyType({})
    """The newest ``checkpoint`` record of each reason (``every_steps``, ..., ``best``), in the order
    first seen."""
    end: RunEndRecord | None = None
    progress: Record | None = None
    """The newest record that carries ``epoch``/``step`` counts."""
    items_total: int | None = None


_SLOT = {
    RunStartRecord: "start",
    BatchRecord: "batch",
    StepRecord: "step",
    EpochRecord: "epoch",
    RunEndRecord: "end",
}


def _gauge(name: str, doc: str, value: float | None) -> Iterator[Metric]:
    if value is not None:
        yield GaugeMetricFamily(name, doc, value=value)


def _by_name(name: str, doc: str, values: Mapping[str, float], label: str = "name") -> Iterator[Metric]:
    """A gauge with one sample per entry of ``values``, labelled ``label``; none when it is empty."""
    if values:
        family = GaugeMetricFamily(name, doc, labels=[label])
        for key, value in values.items():
            family.add_metric([key], value)
        yield family


_CHECKPOINT_GAUGES: tuple[tuple[str, str, Callable[[CheckpointRecord], float]], ...] = (
    (
        "traintel_checkpoint_step",
        "Optimizer step the newest checkpoint holds, by reason.",
        lambda r: float(r.step),
    ),
    (
        "traintel_checkpoint_size_bytes",
        "Bytes of the newest checkpoint, all ranks' parts together, by reason.",
        lambda r: float(r.size_bytes),
    ),
    (
        "traintel_checkpoint_write_seconds",
        "Seconds from the start of the newest checkpoint until this rank's part was on disk, by reason.",
        lambda r: r.write_seconds,
    ),
    (
        "traintel_checkpoint_stall_seconds",
        "Seconds training waited on this rank for the newest checkpoint, by reason.",
        lambda r: r.stall_seconds,
    ),
    (
        "traintel_checkpoint_timestamp_seconds",
        "Unix time the newest checkpoint was complete on every rank, by reason.",
        lambda r: r.time,
    ),
)
"""Each ``traintel_checkpoint_*`` gauge: its name, its help, its value from a ``checkpoint`` record."""


def _checkpoints(records: Mapping[str, CheckpointRecord]) -> Iterator[Metric]:
    """One gauge per field of the newest checkpoint of each reason, labelled ``reason``; none before
    the first checkpoint."""
    for name, doc, value in _CHECKPOINT_GAUGES:
        yield from _by_name(name, doc, {reason: value(r) for reason, r in records.items()}, label="reason")


class _Labelled:
    """``collector``'s families with ``labels`` added to every sample (read at collect time)."""

    def __init__(self, collector: Collector, labels: Mapping[str, str]) -> None:
        self.collector = collector
        self.labels = labels

    def collect(self) -> Iterable[Metric]:
        labels = dict(self.labels)
        for family in self.collector.collect():
            family.samples = [s._replace(labels={**s.labels, **labels}) for s in family.samples]
            yield family


@dataclass(frozen=True, slots=True, kw_only=True)
class Pushgateway:
    """Where and how the final values are pushed at run end."""

    url: str
    """Pushgateway address, e.g. ``http://pushgateway:9091``."""
    job: str = "traintel"
    """The ``job`` grouping label; ``run_id`` is the other grouping label."""
    username: str | None = None
    """Basic-auth user name (with ``password``)."""
    password: str | None = field(default=None, repr=False)
    timeout_seconds: float = 5.0
    """Wall-clock limit for the whole push."""


class RecordCollector:
    """A prometheus_client collector over the latest records (no history is kept)."""

    def __init__(self) -> None:
        self.latest = _Latest()
        self.run_id = ""
        self.run_name = ""

    def update_many(self, records: Sequence[Record]) -> None:
        """Keep the newest record of each kind among ``records`` (in order); one swap of ``latest``."""
        changes: dict[str, Any] = {}
        for record in records:
            if isinstance(record, EvalRecord):
                evals = changes.get("evals", self.latest.evals)
                changes["evals"] = MappingProxyType({**evals, record.split: record})
            elif isinstance(record, MetricRecord):
                user = changes.get("user", self.latest.user)
                changes["user"] = MappingProxyType({**user, **record.metrics})
                continue  # its step is the caller's: not the run's progress
            elif isinstance(record, CheckpointRecord):
                checkpoints = changes.get("checkpoints", self.latest.checkpoints)
                changes["checkpoints"] = MappingProxyType({**checkpoints, record.reason: record})
                continue  # its step is the checkpoint's, behind the run's when written in the background
            else:
                slot = _SLOT.get(type(record))
                if slot is None:
                    continue
                changes[slot] = record
            if hasattr(record, "step"):
                changes["progress"] = record
            items_total = getattr(record, "items_total", None)
            if items_total is not None:
                changes["items_total"] = items_total
        if changes:
            self.latest = self.latest._replace(**changes)

    def collect(self) -> Iterator[Metric]:
        s = self.latest  # one read: every family below comes from this snapshot
        if self.run_id:
            info = InfoMetricFamily("traintel_run", "The run this process trains (value is always 1).")
            info.add_metric([], {"run_id": self.run_id, "name": self.run_name})
            yield info
        if s.progress is not None:
            p: Any = s.progress
            yield from _gauge("traintel_epoch", "Current epoch (1-based).", float(p.epoch))
            yield from _gauge("traintel_optimizer_step", "Optimizer steps completed.", float(p.step))
        if s.batch is not None:
            b = s.batch
            yield from _gauge(
                "traintel_batch_loss", "Latest emitted micro-batch loss given to backward.", b.loss
            )
            yield from _gauge(
                "traintel_batch_raw_loss", "Latest emitted micro-batch mean loss, unscaled.", b.raw_loss
            )
            yield from _gauge(
                "traintel_batch_loss_scale", "Latest emitted micro-batch scale n_b/N_t.", b.loss_scale
            )
        if s.step is not None:
            t = s.step
            yield from _gauge("traintel_step_loss", "Objective of the latest emitted optimizer step.", t.loss)
            yield from _gauge("traintel_learning_rate", "Learning rate of the latest emitted step.", t.lr)
            yield from _gauge("traintel_grad_norm", "Gradient norm of the latest emitted step.", t.grad_norm)
            yield from _gauge(
                "traintel_grad_scale",
                "Gradient scaler's factor of the latest emitted step (fp16).",
                t.grad_scale,
            )
            yield from _gauge(
                "traintel_step_timestamp_seconds", "Unix time of the latest emitted optimizer step.", t.time
            )
            yield from _by_name(
                "traintel_train_metric",
                "The task's training metrics (Task.train_metrics) of the latest emitted step, by name.",
                t.metrics,
            )
        if s.epoch is not None:
            e = s.epoch
            yield from _gauge(
                "traintel_epoch_loss", "Item-weighted mean training loss of the last epoch.", e.loss
            )
            yield from _gauge(
                "traintel_epoch_items_per_second",
                "Training throughput of the last epoch.",
                e.items_per_second,
            )
        if s.evals:
            family = GaugeMetricFamily(
                "traintel_eval_loss",
                "Item-weighted mean validation loss, by validation loader.",
                labels=["split"],
            )
            for split, record in s.evals.items():
                family.add_metric([split], record.loss)
            yield family
            metrics = GaugeMetricFamily(
                "traintel_eval_metric",
                "The task's evaluation metrics over the latest pass, by name and validation loader.",
                labels=["name", "split"],
            )
            for split, record in s.evals.items():
                for name, value in record.metrics.items():
                    metrics.add_metric([name, split], value)
            if metrics.samples:
                yield metrics
        yield from _by_name(
            "traintel_user_metric", "The latest value of each name logged with Run.log, by name.", s.user
        )
        yield from _checkpoints(s.checkpoints)
        if s.end is not None:
            yield from _gauge(
                "traintel_run_success",
                "1 when the run completed (a handler's stop too), 0 when it failed or a signal stopped it.",
                1.0 if s.end.status == "completed" else 0.0,
            )  # fmt: skip
            yield from _gauge("traintel_run_end_timestamp_seconds", "Unix time the run ended.", s.end.time)
        if s.items_total is not None:
            yield CounterMetricFamily(
                "traintel_items", "Training items processed.", value=float(s.items_total)
            )


class PrometheusSink:
    """Serve ``/metrics`` over HTTP(S) from a private ``CollectorRegistry``.

    The port is bound in ``open`` (so a port in use fails before training starts). The server
    (``MetricsServer``) is bounded against slow and hostile clients: ``max_connections`` at once,
    ``request_timeout`` seconds per connection, TLS handshakes off the accept loop, the
    exposition rendered at most once per delivery of records and served as cached bytes, and
    its thread held to a small share of a CPU. ``register(collector)`` adds another collector
    (the fan-out's sink health) to what is served and pushed.

    With ``pushgateway``, ``push()`` sends the values once the run has ended; the run calls it
    after ``run.end`` is written out everywhere else, and ``close`` pushes if nobody did. The
    push is bounded by the gateway's ``timeout_seconds`` of wall clock and abandoned at once by
    ``hurry()``. ``close`` then keeps serving for ``linger_seconds`` (``hurry()`` cuts it short)
    so a scraper can read the final values, and stops the server.

    With ``per_rank``, every family served and pushed (the traintel families, the registered
    collectors', the process metrics) carries a ``rank`` label, the run context's rank (that of
    the records this process emits), and the push is grouped by ``rank`` too: one exporter per
    process of a torchrun job, each on its own port. Without it no ``rank`` label is added.
    """

    name = "prometheus"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 9400,
        linger_seconds: float = 0.0,
        *,
        certfile: str | None = None,
        keyfile: str | None = None,
        client_cafile: str | None = None,
        pushgateway: Pushgateway | None = None,
        per_rank: bool = False,
        max_connections: int = 32,
        request_timeout: float = 5.0,
    ) -> None:
        self.host = host
        self.port = port
        self.linger_seconds = linger_seconds
        self.certfile = certfile
        self.keyfile = keyfile
        self.client_cafile = client_cafile
        self.pushgateway = pushgateway
        self.per_rank = per_rank
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.labels: dict[str, str] = {}
        """Added to every sample: ``{"rank": "<rank>"}`` from ``open`` on with ``per_rank``, else none."""
        self.collector = RecordCollector()
        self.registry = CollectorRegistry(auto_describe=False)
        self._pushed: list[Collector] = []
        self.register(self.collector)
        # process_resident_memory_bytes, process_cpu_seconds_total, ...: read from /proc at scrape time
        self._serve(ProcessCollector(registry=None))
        self.server: MetricsServer | None = None
        self._push_done = False
        self._hurry = threading.Event()

    def register(self, collector: Collector) -> None:
        """Serve ``collector``'s metrics too, and push them with the traintel metrics."""
        self._pushed.append(self._serve(collector))

    @property
    def pushed(self) -> tuple[Collector, ...]:
        """The collectors pushed to the Pushgateway at the end: every one served but the process's."""
        return tuple(self._pushed)

    def _serve(self, collector: Collector) -> Collector:
        served = _Labelled(collector, self.labels) if self.per_rank else collector
        self.registry.register(served)
        return served

    @property
    def url(self) -> str | None:
        """``http://host:port/metrics`` once open."""
        if self.server is None:
            return None
        host = self.host if ":" not in self.host else f"[{self.host}]"
        scheme = "https" if self.certfile else "http"
        return f"{scheme}://{host}:{self.port}/metrics"

    def open(self, context: RunContext) -> None:
        self.collector.run_id = context.run_id
        self.collector.run_name = context.name
        if self.per_rank:
            self.labels["rank"] = str(context.rank)
        tls = self._tls_context()
        try:
            server = MetricsServer(
                self.registry,
                self.host,
                self.port,
                tls=tls,
                max_connections=self.max_connections,
                timeout=self.request_timeout,
            )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                per_rank = " (sinks.prometheus.port + LOCAL_RANK under per_rank)" if self.per_rank else ""
                raise ConfigError(
                    "sinks.prometheus.port",
                    f"{self.host}:{self.port}{per_rank} is already in use; choose a free port or 0",
                ) from None
            raise ConfigError(
                "sinks.prometheus.host", f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from None
        self.server = server
        self.port = server.port
        self._serve(server)  # its connection counts are served, not pushed

    def _tls_context(self) -> ssl.SSLContext | None:
        for key in ("certfile", "keyfile", "client_cafile"):
            path = getattr(self, key)
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"sinks.prometheus.{key}", f"no such file: {path}")
        if self.certfile is None:
            return None
        try:
            return server_context(self.certfile, self.keyfile, self.client_cafile)
        except ssl.SSLError as exc:  # its text names OpenSSL's source line: not for users
            files = ", ".join(p for p in (self.certfile, self.keyfile, self.client_cafile) if p is not None)
            what = (
                f"not a PEM certificate and its key ({exc.reason})"
                if exc.reason
                else "not a PEM certificate and its key"
            )
            raise ConfigError(
                "sinks.prometheus.certfile", f"cannot use the TLS files {files}: {what}"
            ) from None
        except OSError as exc:
            raise ConfigError(
                "sinks.prometheus.certfile", f"cannot use the TLS files: {exc.strerror or one_line(exc)}"
            ) from None

    def emit(self, record: Record) -> None:
        self.emit_many((record,))

    def emit_many(self, records: Sequence[Record]) -> None:
        self.collector.update_many(records)
        if self.server is not None:
            self.server.changed()

    def push(self) -> None:
        """Push the traintel metrics and the registered collectors' (grouped by job and run_id, and
        rank with ``per_rank``) to the configured Pushgateway, once.

        The request runs on a helper thread and is given ``timeout_seconds`` of wall clock in all
        (a gateway that answers a byte at a time cannot hold the caller longer); ``hurry()``
        abandons it at once. A failure, a timeout or an abandoned push raises OSError.
        """
        pg = self.pushgateway
        if pg is None or self._push_done:
            return
        self._push_done = True
        registry = CollectorRegistry(auto_describe=False)
        for collector in self._pushed:
            registry.register(collector)
        handler: Callable[..., Callable[[], None]] = default_handler
        url, username, password = _credentials(pg)
        if username is not None:
            user = username

            def handler(url: str, method: str, timeout: float | None, headers: Any, data: bytes) -> Any:
                return basic_auth_handler(url, method, timeout, headers, data, user, password)

        failure: list[BaseException] = []
        done = threading.Event()

        def send() -> None:
            try:
                push_to_gateway(
                    url,
                    job=pg.job,
                    registry=registry,
                    grouping_key={"run_id": self.collector.run_id, **self.labels},
                    timeout=pg.timeout_seconds,
                    handler=handler,
                )
            except BaseException as exc:
                failure.append(exc)
            finally:
                done.set()

        threads.start(threading.Thread(target=send, name="traintel-push", daemon=True))
        deadline = time.monotonic() + pg.timeout_seconds
        while not done.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
            if self._hurry.is_set():
                msg = f"push to {redact_url_value(pg.url)} abandoned: the process was asked to stop"
                raise OSError(msg)
            if time.monotonic() >= deadline:
                msg = f"push to {redact_url_value(pg.url)} failed: no answer within {pg.timeout_seconds:g} s"
                raise OSError(msg)
        if failure:
            msg = f"push to {redact_url_value(pg.url)} failed: {redact_url(one_line(failure[0]))}"
            raise OSError(msg)

    @property
    def close_timeout(self) -> float:
        """The longest ``close`` takes: a push still to make, the linger, stopping the server."""
        pg = self.pushgateway
        push = pg.timeout_seconds if pg is not None and not self._push_done else 0.0
        return push + self.linger_seconds + 5.0

    def hurry(self) -> None:
        """End a running (or future) push and linger at once, e.g. on a signal."""
        self._hurry.set()

    def close(self) -> None:
        """Push if the run ended and nobody pushed yet, linger, then stop serving."""
        server, self.server = self.server, None
        if server is None:
            return
        try:
            if self.collector.latest.end is not None:  # the run ended: its values are due
                self.push()
        finally:
            if self.linger_seconds > 0:
                self._hurry.wait(self.linger_seconds)
            server.stop()


def _credentials(pg: Pushgateway) -> tuple[str, str | None, str]:
    """The gateway's URL without userinfo, and the basic-auth user and password: ``username`` and
    ``password`` when set, else those written into the URL (``http://user:pass@host``, as curl
    takes them)."""
    parts = urlsplit(pg.url)
    if parts.username is None:
        return pg.url, pg.username, pg.password or ""
    host = parts.netloc.rpartition("@")[2]
    bare = parts._replace(netloc=host).geturl()
    if pg.username is not None:
        return bare, pg.username, pg.password or ""
    return bare, unquote(parts.username), unquote(parts.password or "")
