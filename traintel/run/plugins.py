"""Plugin sinks: discovered through the ``traintel.sinks`` entry-point group or named by import path.

A plugin package declares, in its ``pyproject.toml``::

    [project.entry-points."traintel.sinks"]
    csv = "mypkg.sinks:CsvSink"

and a config enables it with ``sinks.extra: [{name: csv, params: {...}}]``; or a config
names any importable callable with ``sinks.extra: [{factory: "mypkg.sinks:make", params: {...}}]``.
The callable is called with ``params`` as keyword arguments and must return a sink.
Discovery reads package metadata only: nothing is imported until a sink is enabled.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from traintel.config import ExtraSinkConfig
from traintel.errors import ConfigError, one_line

ENTRY_POINT_GROUP = "traintel.sinks"

BUILTIN_SINKS: dict[str, tuple[str, str]] = {
    "json": ("traintel.sinks.json.sink:JsonSink", "structlog JSON lines on stdout (sinks.json)"),
    "diagnostic": (
        "traintel.sinks.diagnostic:DiagnosticSink",
        "<run dir>/diagnostic.jsonl (sinks.diagnostic)",
    ),
    "prometheus": (
        "traintel.sinks.prometheus.sink:PrometheusSink",
        "HTTP /metrics exporter (sinks.prometheus)",
    ),
    "memory": ("traintel.sinks.memory:MemorySink", "keeps records in memory (Python API and tests)"),
}


@dataclass(frozen=True, slots=True)
class SinkEntry:
    """One sink that ``traintel sinks list`` shows."""

    name: str
    target: str
    source: str
    """``built-in``, or the distribution that provides the entry point."""
    note: str


def discover() -> dict[str, EntryPoint]:
    """Installed ``traintel.sinks`` entry points by name (metadata only, nothing imported)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def list_sinks() -> list[SinkEntry]:
    """Built-in sinks, then discovered plugin sinks sorted by name."""
    rows = [SinkEntry(name, target, "built-in", note) for name, (target, note) in BUILTIN_SINKS.items()]
    for name, ep in sorted(discover().items()):
        dist = ep.dist.name if ep.dist is not None else "unknown distribution"
        module = ep.value.partition(":")[0]
        note = f"enable with sinks.extra: [{{name: {name}}}]"
        if not _importable(module):
            note += "; not importable here: install its extra or dependencies"
        rows.append(SinkEntry(name, ep.value, dist, note))
    return rows


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module.partition(".")[0]) is not None
    except (ImportError, ValueError):
        return False


def check_sink(obj: Any, where: str, what: str) -> Any:
    """Raise a ConfigError unless ``obj`` has the sink interface."""
    missing = [m for m in ("open", "emit", "close") if not callable(getattr(obj, m, None))]
    name = getattr(obj, "name", None)
    if missing or not isinstance(name, str) or not name:
        lacks = [f"{m}()" for m in missing] + ([] if isinstance(name, str) and name else ["a name"])
        raise ConfigError(
            where, f"{what} returned {type(obj).__name__}, not a sink: it lacks {', '.join(lacks)}"
        )
    return obj


def _load(spec: ExtraSinkConfig, where: str) -> tuple[Callable[..., Any], str]:
    if spec.factory is not None:
        from traintel.task import import_factory

        return import_factory(spec.factory, f"{where}.factory"), spec.factory
    found = discover()
    ep = found.get(spec.name or "")
    if ep is None:
        known = ", ".join(sorted(found)) or "none installed"
        raise ConfigError(f"{where}.name", f"no sink plugin named {spec.name!r} (installed: {known})")
    try:
        return ep.load(), f"entry point {ep.name!r} ({ep.value})"
    except Exception as exc:
        raise ConfigError(f"{where}.name", f"cannot load {ep.value!r}: {one_line(exc)}") from None


def make_sink(spec: ExtraSinkConfig, index: int) -> Any:
    """Build the plugin sink of ``sinks.extra[index]``; every failure is a one-line ConfigError."""
    where = f"sinks.extra[{index}]"
    factory, what = _load(spec, where)
    try:
        sink = factory(**spec.params)
    except ConfigError:
        raise
    except SystemExit as exc:
        raise ConfigError(where, f"{what} called sys.exit({exc.code!r})") from None
    except Exception as exc:
        raise ConfigError(
            f"{where}.params" if isinstance(exc, TypeError) else where,
            f"{what} raised {one_line(exc)}",
        ) from None
    return check_sink(sink, where, what)
