"""MLflow: the run's losses and metrics as MLflow metrics, its config as params, one MLflow run per
traintel run (a resumed attempt continues it).

Enable it with ``sinks.extra: [{name: mlflow, params: {tracking_uri: ..., experiment: ...}}]``
after ``pip install 'traintel[mlflow]'``. The sink talks to MLflow through its own
``MlflowClient(tracking_uri)``, never through the fluent API's global state, and only on rank 0.

Every call to MLflow runs on a short-lived daemon thread and is given up after ``timeout``
seconds: MLflow's HTTP client retries a refused connection for minutes by default
(``MLFLOW_HTTP_REQUEST_MAX_RETRIES=7`` with exponential backoff), and it reads that setting, and
its request timeout, only from the process environment, which a sink must not change for the rest
of the process. A failure is raised once from ``emit``/``emit_many`` (the fan-out reports it as one
``sink.error``), and the sink then stays away from MLflow for ``retry_seconds``, keeping what it
was given (up to ``max_buffer`` records) to send when it tries again. The tracking URI's
credentials never appear in a message: they are replaced by ``***``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlsplit

from traintel import threads
from traintel.errors import ConfigError, one_line
from traintel.records import (
    EpochRecord,
    EvalRecord,
    MetricRecord,
    Record,
    RunEndRecord,
    RunStartRecord,
    StepRecord,
    thaw,
)
from traintel.redaction import REDACTED, redact_url, redact_url_value
from traintel.sinks.base import RunContext

if TYPE_CHECKING:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

__all__ = ["STATUSES", "MlflowSink", "MlflowSinkError", "flatten_params", "metric_key"]

T = TypeVar("T")

MAX_METRICS_PER_CALL = 1000
MAX_PARAMS_PER_CALL = 100
MAX_TAGS_PER_CALL = 100
"""MLflow's limits on one ``log_batch`` request (``mlflow.utils.validation``)."""
MAX_REQUEST_BYTES = 900_000
"""What one request may carry, below MLflow's 1 MB limit on a ``log_batch`` body."""
MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
"""MLflow's limits on a metric, param or tag key and on a param and a tag value, in characters."""

STATUSES = {"completed": "FINISHED", "terminated": "KILLED", "failed": "FAILED"}
"""The MLflow run status for each ``run.end`` status (any other status: ``FAILED``)."""

RUN_ID_TAG = "traintel.run_id"
ATTEMPT_TAG = "traintel.attempt"
WORLD_SIZE_TAG = "traintel.world_size"
REASON_TAG = "traintel.reason"

_DATABASES = ("sqlite", "postgresql", "mysql", "mssql")
"""URI schemes (``postgresql+psycopg2``...) of the stores that need SQLAlchemy, which ``mlflow`` installs
and the client-only ``mlflow-skinny`` does not."""
_BAD_CHARACTERS = re.compile(r"[^/\w.\- :]")
_TRUNCATED = "…"

_log = logging.getLogger("traintel")


class MlflowSinkError(RuntimeError):
    """A call to MLflow failed or did not answer in time; the message names the (redacted) URI."""


def metric_key(name: str) -> str:
    """``name`` as a valid MLflow key: characters other than letters, digits, ``_ - . / : `` and
    space become ``_``; empty, ``.`` and ``..`` path parts (which MLflow refuses) are dropped or
    become ``__``; a key longer than 250 characters keeps its start and a hash of the whole."""
    cleaned = _BAD_CHARACTERS.sub("_", name)
    parts = ["__" if p == ".." else p for p in cleaned.split("/") if p not in ("", ".")]
    key = "/".join(parts) or "_"
    if len(key) > MAX_KEY_LENGTH:
        digest = hashlib.sha256(name.encode()).hexdigest()[:12]
        key = f"{key[: MAX_KEY_LENGTH - 13]}~{digest}"
    return key


def _clip(text: str, limit: int) -> str:
    """``text``, cut to ``limit`` characters with ``…`` as its last when it is longer."""
    return text if len(text) <= limit else text[: limit - 1] + _TRUNCATED


def _param_value(value: Any) -> str:
    """A string as it is; anything else as JSON (``null``, ``true``, ``0.001``, ``[1, 2]``)."""
    if isinstance(value, str):
        return value
    return json.dumps(thaw(value), default=str, allow_nan=True)


def flatten_params(config: Mapping[str, Any]) -> dict[str, str]:
    """The config as MLflow params: one per leaf, keyed by its dotted path (``trainer.optimizer.lr``),
    valid as in ``metric_key``; a list or an empty mapping is one JSON value; values are cut to
    6000 characters (the last one then ``…``)."""
    out: dict[str, str] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for k, v in node.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, Mapping) and v:
                walk(v, path)
            else:
                out[metric_key(path)] = _clip(_param_value(v), MAX_PARAM_VALUE_LENGTH)

    walk(config, "")
    return out


def _metrics(record: Record) -> list[tuple[str, float]]:
    """The (key, value) pairs one record gives, in order; none for records the sink skips."""
    if isinstance(record, StepRecord):
        pairs = [("train/loss", record.loss), ("train/lr", record.lr)]
        if record.grad_norm is not None:
            pairs.append(("train/grad_norm", record.grad_norm))
        if record.grad_scale is not None:
            pairs.append(("train/grad_scale", record.grad_scale))
        pairs.extend((f"train/{name}", value) for name, value in record.metrics.items())
    elif isinstance(record, EpochRecord):
        pairs = [("train/epoch_loss", record.loss)]
    elif isinstance(record, EvalRecord):
        prefix = "eval" if record.split == "val" else f"eval/{record.split}"
        pairs = [(f"{prefix}/loss", record.loss)]
        pairs.extend((f"{prefix}/{name}", value) for name, value in record.metrics.items())
    elif isinstance(record, MetricRecord):
        pairs = [(f"user/{name}", value) for name, value in record.metrics.items()]
    else:
        return []
    return [(metric_key(key), float(value)) for key, value in pairs]


def _request_size(key: str, value: str) -> int:
    """A bound on the JSON bytes of one key and value in a request."""
    return len(json.dumps(key)) + len(json.dumps(value)) + 32


class MlflowSink:
    """Log ``train.step``, ``train.epoch``, ``eval.epoch`` and ``metric`` values as MLflow metrics
    and ``run.start``'s (redacted) config as params, to one MLflow run per traintel run.

    Metrics, each at ``step=record.step`` and ``timestamp=record.time`` in milliseconds:
    ``train/loss``, ``train/lr``, ``train/grad_norm`` (when reported), ``train/grad_scale`` (under
    fp16) and ``train/<name>`` for each training metric of a step; ``train/epoch_loss``;
    ``eval/loss`` and ``eval/<name>`` (``eval/<split>/...`` for a validation loader not named
    ``val``); ``user/<name>`` for each value logged with ``Run.log``. Other records are skipped.
    Params: the config flattened (``flatten_params``). Tags: ``traintel.run_id``,
    ``traintel.attempt`` (the latest), ``traintel.world_size`` and, at the end, ``traintel.reason``.
    ``run.end`` sets the run's status (``STATUSES``) and end time.

    Records are buffered and sent in ``log_batch`` requests within MLflow's limits at the end of
    each ``emit_many`` call (the fan-out makes a few per second at most) and after each record
    other than a step that comes through ``emit``.
    """

    name = "mlflow"
    threaded = True
    """Deliver on a thread of the sink's own: a call to a tracking server takes milliseconds."""

    def __init__(
        self,
        *,
        tracking_uri: str | None = None,
        experiment: str = "traintel",
        run_name: str | None = None,
        timeout: float = 5.0,
        retry_seconds: float = 60.0,
        close_timeout: float = 10.0,
        max_buffer: int = 100_000,
    ) -> None:
        """``tracking_uri`` defaults to ``MLFLOW_TRACKING_URI``, else MLflow's default
        (``sqlite:///mlflow.db`` in the working directory); ``run_name`` to the traintel run's name.
        ``timeout``: seconds one call to MLflow may take; ``retry_seconds``: how long the sink stays
        away from MLflow after a failure; ``close_timeout``: seconds ``close`` may take to send what
        is left; ``max_buffer``: records kept while MLflow cannot take them (the oldest beyond are
        dropped and counted in ``dropped``)."""
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
        shown = redact_url_value(uri) if uri is not None and "@" in uri else uri
        for label, value, positive in (
            ("timeout", timeout, True),
            ("close_timeout", close_timeout, True),
            ("retry_seconds", retry_seconds, False),
        ):
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not number or not (value > 0 if positive else value >= 0) or value == math.inf:
                what = "positive" if positive else "non-negative"
                msg = f"{label} must be a {what} number of seconds, got {value!r}"
                raise ValueError(msg)
        if not isinstance(max_buffer, int) or isinstance(max_buffer, bool) or max_buffer < 1:
            msg = f"max_buffer must be a positive number of records, got {max_buffer!r}"
            raise ValueError(msg)
        if not isinstance(experiment, str) or not experiment.strip():
            msg = f"experiment must be a non-empty name, got {experiment!r}"
            raise ValueError(msg)
        self.tracking_uri = uri
        """The tracking URI given (None: MLflow's default); may hold credentials."""
        self.shown_uri = shown
        """``tracking_uri`` with its credentials replaced by ``***``, for messages."""
        self.experiment = experiment
        self.run_name = run_name
        self.timeout = float(timeout)
        self.retry_seconds = float(retry_seconds)
        self.close_timeout = float(close_timeout)
        """Seconds ``close`` may take (the fan-out waits a second more before abandoning it)."""
        self.max_buffer = max_buffer
        self.dropped = 0
        """Records whose values were not sent: beyond ``max_buffer``, or left at close."""
        self.failures = 0
        """Sends that failed (each raised once from ``emit``/``emit_many``, or logged by ``close``)."""
        self.last_error: str | None = None
        """The last failure's message (credentials hidden)."""
        self.mlflow_run_id: str | None = None
        """The MLflow run's id, once the sink has found or created it."""
        self._secrets = self._secret_parts(uri)
        self._lock = threading.Lock()
        self._context: RunContext | None = None
        self._active = False
        self._open = False
        self._client: MlflowClient | None = None
        self._inflight: threading.Thread | None = None
        self._down_until = 0.0
        self._reset()

    @staticmethod
    def _secret_parts(uri: str | None) -> list[str]:
        """The URI's password, as written and unquoted, to hide wherever a message repeats it."""
        if uri is None or "@" not in uri:
            return []
        try:
            password = urlsplit(uri).password
        except ValueError:
            return []
        return sorted({p for p in (password, unquote(password or "")) if p}, key=len, reverse=True)

    def _is_database(self) -> bool:
        """Whether the tracking URI names a database (MLflow's default, without one, is SQLite)."""
        if self.tracking_uri is None:
            return True
        scheme = self.tracking_uri.partition(":")[0].partition("+")[0].lower()
        return scheme in _DATABASES

    def _reset(self) -> None:
        self._params: dict[str, str] = {}
        self._tags: dict[str, str] = {}
        self._metrics: collections.deque[list[Metric]] = collections.deque()
        self._head = 0
        """Values of the first buffered record already sent."""
        self._buffered = 0
        """Records in ``_metrics``."""
        self._values = 0
        """Values in ``_metrics`` not yet sent."""
        self._status: tuple[str, int] | None = None
        self._logged_params: set[str] = set()
        self._create_tried: int | None = None
        self._experiment_id: str | None = None
        self._warned = False

    # the sink protocol

    def open(self, context: RunContext) -> None:
        """Check that MLflow is installed; nothing is sent before the first record (a tracking server
        that cannot be reached must not stop the run from starting)."""
        try:
            import mlflow.tracking  # noqa: F401
        except ImportError:
            raise ConfigError(
                "sinks.extra", "the mlflow sink needs `pip install 'traintel[mlflow]'`"
            ) from None
        if self._is_database() and importlib.util.find_spec("sqlalchemy") is None:
            where = self.shown_uri or "MLflow's default tracking URI (sqlite:///mlflow.db)"
            raise ConfigError(
                "sinks.extra",
                f"the mlflow sink's tracking URI {where} is a database store, which needs "
                "`pip install mlflow` (traintel[mlflow] installs the client for a tracking server only)",
            )
        with self._lock:
            self._reset()
            self._context = context
            self._client = None
            self.mlflow_run_id = None
            self._down_until = 0.0
            self._active = context.rank == 0
            self._open = True
            if self._active:
                self._tags.update({
                    RUN_ID_TAG: context.run_id,
                    ATTEMPT_TAG: str(context.attempt),
                    WORLD_SIZE_TAG: str(context.world_size),
                })  # fmt: skip

    def emit(self, record: Record) -> None:
        with self._lock:
            self._take(record)
            if not isinstance(record, StepRecord) or self._values >= MAX_METRICS_PER_CALL:
                self._flush(None)

    def emit_many(self, records: Sequence[Record]) -> None:
        """Buffer ``records``, then send what is buffered."""
        with self._lock:
            for record in records:
                self._take(record)
            self._flush(None)

    def close(self) -> None:
        """Send what is left within ``close_timeout`` (not while MLflow is failing); idempotent."""
        if not self._lock.acquire(timeout=self.close_timeout):
            _log.warning("sink %r: close() gave up waiting for a call to MLflow to return", self.name)
            return
        try:
            if not self._open:
                return
            self._open = False
            if self._active and self._pending():
                if time.monotonic() >= self._down_until:
                    with contextlib.suppress(MlflowSinkError):  # reported just below
                        self._flush(time.monotonic() + self.close_timeout)
                if self._pending():
                    _log.warning(
                        "sink %r: what was left (%d records) not sent to MLflow: %s",
                        self.name, self._buffered, self.last_error,
                    )  # fmt: skip
                    self.dropped += self._buffered
                    self._reset()
            self._client = None
        finally:
            self._lock.release()

    # buffering

    def _take(self, record: Record) -> None:
        if not self._open:
            msg = "MlflowSink.emit called before open (or after close)"
            raise RuntimeError(msg)
        if not self._active:
            return
        if isinstance(record, RunStartRecord):
            self._params.update(flatten_params(record.config))
            return
        if isinstance(record, RunEndRecord):
            self._tags[REASON_TAG] = _clip(redact_url(record.reason), MAX_TAG_VALUE_LENGTH)
            self._status = (STATUSES.get(record.status, "FAILED"), int(record.time * 1000))
            return
        pairs = _metrics(record)
        if not pairs:
            return
        from mlflow.entities import Metric

        ms, step = int(record.time * 1000), int(getattr(record, "step", 0))
        self._metrics.append([Metric(key, value, ms, step) for key, value in pairs])
        self._buffered += 1
        self._values += len(pairs)
        while self._buffered > self.max_buffer:
            self._values -= len(self._metrics.popleft()) - self._head
            self._head = 0
            self._buffered -= 1
            self.dropped += 1
            if not self._warned:
                self._warned = True
                _log.warning(
                    "sink %r: MLflow at %s is not taking records; the oldest beyond %d are dropped",
                    self.name, self.shown_uri, self.max_buffer,
                )  # fmt: skip

    def _pending(self) -> bool:
        return bool(self._params or self._tags or self._metrics or self._status)

    # sending

    def _flush(self, deadline: float | None) -> None:
        """Send everything buffered, unless MLflow failed less than ``retry_seconds`` ago; raise
        MlflowSinkError (credentials hidden) on a failure."""
        if not self._active or not self._pending() or time.monotonic() < self._down_until:
            return
        try:
            self._send(deadline)
        except Exception as exc:
            self._down_until = time.monotonic() + self.retry_seconds
            self.failures += 1
            self.last_error = self._describe(exc)
            raise MlflowSinkError(self.last_error) from None

    def _describe(self, exc: BaseException) -> str:
        text = f"MLflow at {self.shown_uri or 'its default tracking URI'}: {one_line(exc)}"
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text

    def _call(self, what: str, fn: Callable[[], T], deadline: float | None) -> T:
        """``fn()`` on a daemon thread, given up after ``timeout`` seconds (or at ``deadline``)."""
        busy = self._inflight
        if busy is not None and busy.is_alive():
            msg = f"{what}: an earlier call to MLflow has not returned"
            raise TimeoutError(msg)
        seconds = self.timeout if deadline is None else min(self.timeout, deadline - time.monotonic())
        if seconds <= 0:
            msg = f"{what}: close_timeout ran out"
            raise TimeoutError(msg)
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                result = fn()
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)

        thread = threading.Thread(target=run, name="traintel-mlflow", daemon=True)
        threads.start(thread)
        self._inflight = thread
        concurrent.futures.wait([future], timeout=seconds)
        if not future.done():
            msg = f"{what}: no answer within {seconds:g} s"
            raise TimeoutError(msg)
        return future.result()

    def _send(self, deadline: float | None) -> None:
        client = self._client
        if client is None:
            from mlflow.tracking import MlflowClient

            uri = self.tracking_uri
            client = self._client = self._call("connect", lambda: MlflowClient(uri), deadline)
        if self.mlflow_run_id is None:
            self.mlflow_run_id = self._call("start the run", lambda: self._start_run(client), deadline)
        run_id = self.mlflow_run_id
        from mlflow.entities import Param, RunTag

        for key in self._logged_params.intersection(self._params):
            del self._params[key]  # logged by an earlier attempt: MLflow keeps a param's first value
        while self._params:
            chunk = self._chunk(self._params, MAX_PARAMS_PER_CALL)
            params = [Param(k, self._params[k]) for k in chunk]
            self._call("log params", functools.partial(client.log_batch, run_id, params=params), deadline)
            for k in chunk:
                del self._params[k]
                self._logged_params.add(k)
        while self._tags:
            chunk = self._chunk(self._tags, MAX_TAGS_PER_CALL)
            tags = [RunTag(k, _clip(self._tags[k], MAX_TAG_VALUE_LENGTH)) for k in chunk]
            self._call("log tags", functools.partial(client.log_batch, run_id, tags=tags), deadline)
            for k in chunk:
                del self._tags[k]
        while self._metrics:
            batch, records, head = self._next_metrics()
            self._call("log metrics", functools.partial(client.log_batch, run_id, metrics=batch), deadline)
            for _ in range(records):
                self._metrics.popleft()
            self._buffered -= records
            self._values -= len(batch)
            self._head = head
        if self._status is not None:
            status, end_ms = self._status
            self._call("end the run", lambda: _terminate(client, run_id, status, end_ms), deadline)
            self._status = None

    @staticmethod
    def _chunk(values: Mapping[str, str], limit: int) -> list[str]:
        """The first keys that fit one request: at most ``limit``, within ``MAX_REQUEST_BYTES``."""
        chunk: list[str] = []
        size = 0
        for key in values:
            cost = _request_size(key, values[key])
            if chunk and (len(chunk) >= limit or size + cost > MAX_REQUEST_BYTES):
                break
            chunk.append(key)
            size += cost
        return chunk

    def _next_metrics(self) -> tuple[list[Metric], int, int]:
        """The next request's values, how many buffered records it finishes, and how many values of
        the record after those it takes (a record may span requests)."""
        batch: list[Metric] = []
        size = 0
        head = self._head
        done = 0
        for values in self._metrics:
            while head < len(values):
                metric = values[head]
                cost = len(metric.key) + 96
                if batch and (len(batch) >= MAX_METRICS_PER_CALL or size + cost > MAX_REQUEST_BYTES):
                    return batch, done, head
                batch.append(metric)
                size += cost
                head += 1
            done += 1
            head = 0
        return batch, done, head

    def _start_run(self, client: MlflowClient) -> str:
        """Find or create the experiment, then the run: a resumed attempt continues the run tagged
        with this traintel run's id (if there is one), otherwise a new run is created."""
        context = self._context
        assert context is not None
        experiment_id = self._experiment_id or self._find_experiment(client)
        self._experiment_id = experiment_id
        found = None
        if context.attempt > 0 or self._create_tried is not None:
            runs = client.search_runs(
                [experiment_id],
                filter_string=f"tags.`{RUN_ID_TAG}` = '{context.run_id}'",
                order_by=["attributes.start_time DESC"],
                max_results=50,
            )
            mine = [r for r in runs if r.data.tags.get(RUN_ID_TAG) == context.run_id]
            if context.attempt == 0:  # a create that timed out may still have happened
                mine = [r for r in mine if r.info.start_time == self._create_tried]
            found = mine[0] if mine else None
        if found is not None:
            run_id: str = found.info.run_id
            self._logged_params = set(found.data.params)
            if found.info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
            return run_id
        start_ms = int(time.time() * 1000)
        self._create_tried = start_ms
        run = client.create_run(
            experiment_id,
            start_time=start_ms,
            tags=dict(self._tags),
            run_name=self.run_name or context.name,
        )
        self._tags.clear()
        self._logged_params = set()
        return str(run.info.run_id)

    def _find_experiment(self, client: MlflowClient) -> str:
        from mlflow.exceptions import MlflowException

        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            try:
                return str(client.create_experiment(self.experiment))
            except MlflowException:  # created by another process in the meantime
                experiment = client.get_experiment_by_name(self.experiment)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage != "active":
            msg = f"the experiment {self.experiment!r} is deleted: restore it, or name another"
            raise MlflowSinkError(msg)
        return str(experiment.experiment_id)


def _terminate(client: MlflowClient, run_id: str, status: str, end_ms: int) -> None:
    """Set the run's status and end time. ``MlflowClient.set_terminated`` would also print the run's
    URL, credentials included, to stdout (which carries the JSON lines), so the store is told
    directly; without one (another MLflow), only the status is set."""
    from mlflow.entities import RunStatus

    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    update = getattr(store, "update_run_info", None)
    if callable(update):
        update(run_id, RunStatus.from_string(status), end_ms, None)
    else:
        client.update_run(run_id, status=status)
