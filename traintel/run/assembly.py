"""Build a run's sinks from the ``sinks`` config section: the built-in ones, then plugins, then extras.

This is where config meets the sinks (which never see config types): it converts each
section to plain parameters and registers the fan-out's sink health on the exporter's registry.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

from traintel.config import PushgatewayConfig, SinksConfig
from traintel.errors import ConfigError
from traintel.run.layout import RESERVED_NAMES, rank_filename
from traintel.run.plugins import make_sink
from traintel.sinks.base import Sink
from traintel.sinks.diagnostic import DiagnosticSink
from traintel.sinks.fanout import FanOut
from traintel.sinks.json.sink import JsonSink
from traintel.sinks.prometheus.sink import PrometheusSink, Pushgateway
from traintel.sinks.threaded import ThreadedSink


def check_diagnostic_filename(filename: str) -> None:
    """ConfigError unless ``filename`` can name the diagnostic file inside the run directory: one
    path component (no separator, not ``.`` or ``..``, no NUL) and none of ``RESERVED_NAMES``
    (compared without case, as some file systems do)."""
    key = "sinks.diagnostic.filename"
    seps = [sep for sep in ("/", "\\", os.sep, os.altsep) if sep]
    if filename in ("", ".", "..") or "\0" in filename or any(sep in filename for sep in seps):
        raise ConfigError(
            key, f"must be a file name inside the run directory (not . or .., no / or \\), got {filename!r}"
        )
    if filename.casefold() in {name.casefold() for name in RESERVED_NAMES}:
        reserved = ", ".join(RESERVED_NAMES)
        raise ConfigError(
            key,
            f"{filename!r} is reserved for traintel's own files in the run directory ({reserved}); "
            "choose another name, such as diagnostic.jsonl",
        )


@dataclass(frozen=True, slots=True)
class SinkSet:
    """The fan-out over every enabled sink, and the built-in sinks the run talks to directly."""

    fanout: FanOut
    json: JsonSink | None
    """The stdout sink (stdlib logging is routed into it), when enabled."""
    prometheus: PrometheusSink | None
    """The exporter (its URL goes into ``run.start``; a signal after the end cuts its linger)."""
    logs: JsonSink | None = None
    """Where stdlib logging and warnings go as JSON lines: the stdout sink, or on a rank that
    writes no records to stdout, a sink on stderr that no record is delivered to (open and close
    it apart from the fan-out)."""


def stdout_is_tty() -> bool:
    try:
        return os.isatty(sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):
        return False


def _pushgateway(cfg: PushgatewayConfig) -> Pushgateway | None:
    if cfg.url is None:
        return None
    return Pushgateway(
        url=cfg.url,
        job=cfg.job,
        username=cfg.username,
        password=None if cfg.password is None else cfg.password.get_secret_value(),
        timeout_seconds=cfg.timeout_seconds,
    )


def _wants_thread(sink: Sink) -> bool:
    """Whether ``sink`` asks to be delivered to on a thread of its own (a true ``threaded``)."""
    return getattr(sink, "threaded", False) is True


def build_sinks(
    cfg: SinksConfig,
    *,
    extra: Sequence[Sink] = (),
    json_stream: BinaryIO | None = None,
    rank: int = 0,
    stdout_ranks: str = "zero",
    local_rank: int = 0,
) -> SinkSet:
    """The configured sinks in delivery order (prometheus, json, diagnostic, ``sinks.extra``, ``extra``).

    Under torch.distributed, rank 0 serves the metrics (with ``sinks.prometheus.per_rank``, every
    rank serves its own, labelled ``rank``, on ``port + local_rank``); stdout's JSON lines come
    from rank 0 (``stdout_ranks="zero"``) or from every rank (``"all"``; with ``"zero"`` rank r > 0
    writes its log lines, and text printed there, on stderr); rank r > 0 writes its diagnostic file
    as ``rank_filename(filename, r)``. A plug-in (or an ``extra`` sink) that asks for a thread of its
    own (``threaded``) is wrapped in a ``ThreadedSink``.
    """
    check_diagnostic_filename(cfg.diagnostic.filename)  # before any sink is made
    sinks: list[Sink] = []
    prometheus: PrometheusSink | None = None
    if cfg.prometheus.enabled and (rank == 0 or cfg.prometheus.per_rank):
        p = cfg.prometheus
        port = p.port + local_rank if p.per_rank and p.port else p.port  # 0 stays 0: any free port
        if port > 65535:
            raise ConfigError(
                "sinks.prometheus.port",
                f"per_rank serves on port + LOCAL_RANK = {p.port} + {local_rank}, over 65535",
            )
        prometheus = PrometheusSink(
            p.host,
            port,
            p.linger_seconds,
            certfile=p.certfile,
            keyfile=p.keyfile,
            client_cafile=p.client_cafile,
            pushgateway=_pushgateway(p.pushgateway),
            per_rank=p.per_rank,
            max_connections=p.max_connections,
            request_timeout=p.request_timeout_seconds,
        )
        sinks.append(prometheus)
    json_sink: JsonSink | None = None
    logs: JsonSink | None = None
    if cfg.json_.enabled and rank > 0 and stdout_ranks == "zero":
        logs = JsonSink(fd=sys.stderr.fileno(), profile=cfg.json_.profile, capture_stdout=True)
    elif cfg.json_.enabled:
        j = cfg.json_
        console = j.format == "console" or (j.format == "auto" and json_stream is None and stdout_is_tty())
        json_sink = JsonSink(
            json_stream,
            capacity=j.queue_capacity,
            queue_bytes=j.queue_bytes,
            close_timeout=j.close_timeout_seconds,
            profile=j.profile,
            console=console,
        )
        sinks.append(json_sink)
        logs = json_sink
    if cfg.diagnostic.enabled:
        d = cfg.diagnostic
        name = rank_filename(d.filename, rank)
        sinks.append(DiagnosticSink(name, max_bytes=d.max_bytes, backups=d.backups))
    for index, spec in enumerate(cfg.extra):
        if spec.enabled and (rank == 0 or spec.ranks == "all"):
            sink = make_sink(spec, index)
            threaded = spec.threaded if spec.threaded is not None else _wants_thread(sink)
            sinks.append(ThreadedSink(sink) if threaded else sink)
    sinks.extend(ThreadedSink(sink) if _wants_thread(sink) else sink for sink in extra)
    names = [s.name for s in sinks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError("sinks.extra", f"sink names must be unique; {dupes} appear more than once")
    fanout = FanOut(sinks)
    if prometheus is not None:
        prometheus.register(fanout.health_collector())
    return SinkSet(fanout, json_sink, prometheus, logs)
