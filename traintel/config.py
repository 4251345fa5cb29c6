"""Typed, validated run configuration and the file < environment < ``--set`` override chain.

This module imports neither torch nor ignite, so ``traintel --help`` and
``traintel config show`` stay fast.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from traintel.errors import ConfigError
from traintel.redaction import REDACTED, has_redacted_url, is_secret_key, redact_url, redact_url_value
from traintel.redaction import redact as _redact

ENV_PREFIX = "TRAINTEL__"
"""Environment variables ``TRAINTEL__SECTION__KEY=value`` override the config file."""

Int = Annotated[int, Strict()]
"""An integer: not a boolean, a float or a string (``"3"``); ``--set`` and environment values are
parsed as YAML first, so ``--set trainer.max_epochs=3`` is one."""
Float = Annotated[float, Strict()]
"""A number: an integer or a float, not a boolean or a string."""
Bool = Annotated[bool, Strict()]
"""``true`` or ``false``: not 0, 1 or a string."""


def _check_factory(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", value):
        msg = f"must have the form 'module:function', got {value!r}"
        raise ValueError(msg)
    return value


class _Section(BaseModel):
    # Overrides are parsed as YAML, so `--set run.name=2024` arrives as an int: accept it for str fields.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


class RunConfig(_Section):
    """Identity and output location of one run."""

    name: str = Field(default="traintel", min_length=1, max_length=200)
    """Human-readable run name; part of the generated run id."""
    id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    """Run id; generated as ``<name>-<UTC time>-<random>`` when null."""
    seed: Int = Field(default=0, ge=0, le=2**32 - 1)
    """Seed for torch's global generators, set before the task factory runs."""
    dir: str | None = Field(default=None, min_length=1)
    """Run directory (diagnostic file, resolved config, checkpoints); default ``runs/<run_id>``."""
    resume: Literal["auto", "never"] = "never"
    """``auto``: when ``dir`` holds a complete checkpoint, continue that run from it (a container
    restarted in place), else start fresh; ``never``: an existing run directory is never reused."""


class TaskConfig(_Section):
    """Where the model, loss and data come from."""

    factory: str = Field(default="traintel.tasks.forecast:make_task")
    """``module:function`` returning a task (see ``traintel.task.Task``)."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments passed to the factory."""

    @field_validator("factory")
    @classmethod
    def _factory_form(cls, value: str) -> str:
        return _check_factory(value)


class OptimizerConfig(BaseModel):
    """Optimizer name and learning rate; further keys are passed to the optimizer."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    name: Literal["sgd", "adamw", "adam"] = "adamw"
    """Optimizer: ``sgd``, ``adamw`` or ``adam``."""
    lr: Float = Field(default=1e-3, gt=0, allow_inf_nan=False)
    """Initial learning rate."""


class SchedulerConfig(BaseModel):
    """A learning-rate scheduler stepped once per optimizer step; further keys are its arguments."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    name: Literal["cosine", "step", "exponential", "linear_warmup"]
    """``cosine`` (T_max defaults to the run's optimizer steps), ``step``, ``exponential``,
    ``linear_warmup`` (linear ramp over ``warmup_steps``)."""

    @model_validator(mode="after")
    def _arguments(self) -> SchedulerConfig:
        takes = _SCHEDULER_ARGS[self.name]
        given = self.model_extra or {}
        for key, value in given.items():
            if key not in takes:
                problem = f"unknown key for the {self.name} scheduler (it takes {', '.join(takes)})"
                raise _SubkeyError(key, problem)
            try:
                takes[key][1].validate_python(value)
            except ValidationError as exc:
                raise _SubkeyError(key, _problem(exc.errors()[0], f"trainer.scheduler.{key}")) from None
        for key, (required, _) in takes.items():
            if required and key not in given:
                raise _SubkeyError(key, f"is required by the {self.name} scheduler")
        return self


class _SubkeyError(ValueError):
    """A validator's error about ``key`` inside the model it checks (reported as ``<model>.<key>``)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem)
        self.key = key
        self.problem = problem


_PositiveInt = TypeAdapter(Annotated[Int, Field(ge=1)])
_PositiveFloat = TypeAdapter(Annotated[Float, Field(gt=0, allow_inf_nan=False)])
_NonNegativeFloat = TypeAdapter(Annotated[Float, Field(ge=0, allow_inf_nan=False)])
_SCHEDULER_ARGS: dict[str, dict[str, tuple[bool, TypeAdapter[Any]]]] = {
    "cosine": {"T_max": (False, _PositiveInt), "eta_min": (False, _NonNegativeFloat)},
    "step": {"step_size": (True, _PositiveInt), "gamma": (False, _PositiveFloat)},
    "exponential": {"gamma": (True, _PositiveFloat)},
    "linear_warmup": {"warmup_steps": (True, _PositiveInt)},
}
"""Each scheduler's arguments: whether it is required, and its type and range."""


class DistributedConfig(_Section):
    """torch.distributed settings, used when the run is started by torchrun (``RANK``, ``WORLD_SIZE``)."""

    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """``auto``: nccl on CUDA, gloo on CPU."""
    timeout_seconds: Float = Field(default=300.0, gt=0, le=86_400, allow_inf_nan=False)
    """How long a collective waits for the other ranks before the run fails."""


class TrainerConfig(_Section):
    """The optimisation loop."""

    max_epochs: Int = Field(default=3, ge=1, le=1_000_000)
    """Number of passes over the training loader."""
    accumulation_steps: Int = Field(default=3, ge=1, le=1_000_000)
    """Micro-batches per optimizer step (k); an epoch has ceil(B/k) optimizer steps."""
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    """Optimizer settings."""
    scheduler: SchedulerConfig | None = None
    """Learning-rate scheduler, or null for a constant rate."""
    grad_clip_norm: Float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """Clip the global gradient norm to this value (the norm is then reported)."""
    report_grad_norm: Bool = False
    """Report the gradient norm on ``train.step`` even without clipping."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """``bf16`` runs forward and loss under autocast (CPU or CUDA); gradients stay fp32."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto`` picks CUDA when available (``cuda:LOCAL_RANK`` under torchrun)."""
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    """Process group settings under torchrun; ignored in a single process."""
    on_nonfinite: Literal["warn", "stop", "skip_step"] = "warn"
    """A NaN or infinite loss: ``warn`` reports it (records carry ``nonfinite``) and trains on;
    ``stop`` ends the run as failed, naming the step, when that step's records are delivered;
    ``skip_step`` does not take that window's optimizer step (one host sync per step)."""


class TelemetryConfig(_Section):
    """How often records are produced."""

    every: Int = Field(default=10, ge=1, le=1_000_000)
    """Emit ``train.batch`` and ``train.step`` records for every Nth optimizer step;
    epoch, eval and run records are always emitted."""
    ranks: Literal["zero", "all"] = "zero"
    """Under torchrun: ``zero`` writes JSON lines on stdout from rank 0 only (every rank's warnings
    and errors still go to stderr), ``all`` from every rank."""
    max_delay_seconds: Float = Field(default=0.05, ge=0, le=60, allow_inf_nan=False)
    """Emitted steps are delivered to the sinks in batches, at most this long after the previous
    delivery (or when the next step ends, if steps are slower), and always before the epoch
    record and run.end; 0 delivers every emitted step at once."""


class JsonSinkConfig(_Section):
    """structlog JSON lines on stdout."""

    enabled: Bool = True
    format: Literal["auto", "json", "console"] = "auto"
    """``auto``: JSON lines, or, when stdout is a terminal, a console view (epoch, eval and run
    lines, warnings) with a progress bar showing the running step loss."""
    profile: Literal["default", "ecs"] = "default"
    """``ecs``: ``@timestamp``, ``log.level``, ``message``, ``ecs.version`` (Elastic Common Schema)."""
    queue_capacity: Int = Field(default=10_000, ge=1, le=10_000_000)
    """Lines waiting for a slow stdout reader before ``train.batch`` records are dropped (and counted)."""
    queue_bytes: Int = Field(default=16 * 1024 * 1024, ge=64 * 1024, le=1024 * 1024 * 1024)
    """Bytes of lines waiting for stdout: past half of it ``train.batch`` lines are dropped, past all
    of it ``train.step`` lines too (counted); epoch, eval, run and log lines are always kept."""
    close_timeout_seconds: Float = Field(default=5.0, ge=0, le=3600, allow_inf_nan=False)
    """How long the end of the run waits for stdout to take the queued lines."""


class DiagnosticSinkConfig(_Section):
    """``<run dir>/diagnostic.jsonl`` with self-checks."""

    enabled: Bool = True
    filename: str = Field(default="diagnostic.jsonl", pattern=r"^[^/\\]+$")
    """File name inside the run directory."""
    max_bytes: Int = Field(default=256 * 1024 * 1024, ge=0)
    """Rotate past this size to ``<filename>.1`` ... (0: never rotate)."""
    backups: Int = Field(default=3, ge=0, le=1000)
    """Rotated files kept; the oldest beyond this is deleted."""


class PushgatewayConfig(_Section):
    """Where and how the run's final values are pushed."""

    url: str | None = None
    """Pushgateway address, e.g. ``http://pushgateway:9091``; null disables the push."""
    job: str = Field(default="traintel", min_length=1)
    """The ``job`` grouping label; ``run_id`` is the other grouping label."""
    username: str | None = None
    """Basic-auth user name (with ``password``)."""
    password: str | None = None
    """Basic-auth password; redacted in ``config show`` and in ``run.start``."""
    timeout_seconds: Float = Field(default=5.0, gt=0, le=300, allow_inf_nan=False)
    """Wall-clock limit for the whole push (connect, send, answer); past it the push is abandoned
    and reported, so a slow gateway never holds the shutdown."""

    @field_validator("url")
    @classmethod
    def _url_form(cls, value: str | None) -> str | None:
        return None if value is None else _check_url(value)


def _check_url(value: str) -> str:
    """An ``http(s)://[user:password@]host[:port][/path]`` URL; a message shows it with its credentials
    hidden whatever its shape (``redact_url_value``), and quotes no part of them."""
    shown = redact_url_value(value)
    try:
        parts = urlsplit(value)
        hostname = parts.hostname
    except ValueError as exc:
        why = str(exc)
        if "netloc" in why:  # urllib's NFKC check quotes the whole netloc, credentials and all
            why = "characters that NFKC normalization turns into '/', '?', '#', '@' or ':'"
        raise ValueError(f"is not a valid URL ({why}), got {shown!r}") from None
    if parts.scheme not in ("http", "https") or not hostname or re.search(r"\s", value):
        msg = f"must be an http:// or https:// URL such as 'http://pushgateway:9091', got {shown!r}"
        raise ValueError(msg)
    if "@" in parts.path + parts.query + parts.fragment:  # credentials cut short: the host is in them
        msg = (
            "has an '@' after its host: percent-encode '/', '?' and '#' in a user name or password "
            f"(%2F, %3F, %23), got {shown!r}"
        )
        raise ValueError(msg)
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        port_text = parts.netloc.rpartition("@")[2].rpartition(":")[2]
        raise ValueError(f"port {port_text!r} is not a number from 1 to 65535, got {shown!r}")
    return value


URL_KEYS = ("sinks.prometheus.pushgateway.url",)
"""The settings that hold one URL: shown with ``redact_url_value`` (config, errors), which hides
credentials of any shape, where other strings go through ``redact_url``."""


class PrometheusSinkConfig(_Section):
    """HTTP ``/metrics`` exporter on its own registry."""

    enabled: Bool = True
    host: str = Field(default="127.0.0.1", min_length=1)
    """Bind address; ``0.0.0.0`` exposes it beyond the host (containers)."""
    port: Int = Field(default=9400, ge=0, le=65535)
    """TCP port; 0 picks a free one (reported in ``run.start``)."""
    linger_seconds: Float = Field(default=0.0, ge=0, le=86_400, allow_inf_nan=False)
    """Keep serving the final values this long after the run ends."""
    certfile: str | None = None
    """Serve ``/metrics`` over TLS with this certificate (PEM) and ``keyfile``."""
    keyfile: str | None = None
    client_cafile: str | None = None
    """Require client certificates signed by this CA (mutual TLS)."""
    max_connections: Int = Field(default=32, ge=1, le=1024)
    """Connections served at once; one more closes the connection that has waited longest
    without sending a request (counted in ``traintel_exporter_connections_closed_total``)."""
    request_timeout_seconds: Float = Field(default=5.0, gt=0, le=300, allow_inf_nan=False)
    """A connection's time to finish the TLS handshake, send its request and take the answer."""
    pushgateway: PushgatewayConfig = Field(default_factory=PushgatewayConfig)
    """Push the final values to a Pushgateway at run end (batch jobs)."""
    per_rank: Bool = False
    """Under torchrun, every rank serves its own values on ``port + LOCAL_RANK`` (0: any free
    port), each family labelled ``rank``, and pushes them grouped by ``rank`` too; off, rank 0
    alone serves (no ``rank`` label) the values its records hold, global ones for steps and epochs."""

    @model_validator(mode="after")
    def _tls_pair(self) -> PrometheusSinkConfig:
        if (self.certfile is None) != (self.keyfile is None):
            msg = "certfile and keyfile go together: give both or neither"
            raise ValueError(msg)
        if self.client_cafile is not None and self.certfile is None:
            msg = "client_cafile needs certfile and keyfile (client certificates need TLS)"
            raise ValueError(msg)
        return self


class ExtraSinkConfig(_Section):
    """A plugin sink: an installed ``traintel.sinks`` entry point, or a ``module:function``."""

    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]+$")
    """Entry-point name in the ``traintel.sinks`` group (``traintel sinks list`` shows them)."""
    factory: str | None = None
    """``module:function`` (or class) that returns the sink."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the factory."""
    enabled: Bool = True

    @field_validator("factory")
    @classmethod
    def _factory_form(cls, value: str | None) -> str | None:
        return None if value is None else _check_factory(value)

    @model_validator(mode="after")
    def _one_source(self) -> ExtraSinkConfig:
        if (self.name is None) == (self.factory is None):
            msg = "give exactly one of name (an installed entry point) or factory (module:function)"
            raise ValueError(msg)
        return self


class CheckpointConfig(_Section):
    """Crash-safe checkpoints in ``<run dir>/checkpoints/``, taken after an optimizer step."""

    every_steps: Int | None = Field(default=None, ge=1, le=1_000_000_000)
    """Take one every N optimizer steps (null: not by steps)."""
    every_epochs: Int | None = Field(default=None, ge=1, le=1_000_000)
    """Take one at the end of every N-th epoch (null: not by epochs)."""
    keep: Int = Field(default=2, ge=1, le=1000)
    """Complete checkpoints kept (the newest); an older one goes only once a newer one is durable."""
    on_signal: Bool = True
    """On SIGTERM or SIGINT, take one after the step that finishes (when checkpoints are on)."""

    @property
    def enabled(self) -> bool:
        return self.every_steps is not None or self.every_epochs is not None


class SinksConfig(_Section):
    """Where records go."""

    json_: JsonSinkConfig = Field(default_factory=JsonSinkConfig, alias="json")
    diagnostic: DiagnosticSinkConfig = Field(default_factory=DiagnosticSinkConfig)
    prometheus: PrometheusSinkConfig = Field(default_factory=PrometheusSinkConfig)
    extra: list[ExtraSinkConfig] = Field(default_factory=list)
    """Plugin sinks, after the built-in ones, in this order."""

    model_config = ConfigDict(
        extra="forbid", populate_by_name=True, validate_assignment=True, coerce_numbers_to_str=True
    )


class Config(_Section):
    """The whole run configuration."""

    run: RunConfig = Field(default_factory=RunConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    sinks: SinksConfig = Field(default_factory=SinksConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

    def to_dict(self, *, redact: bool = False) -> dict[str, Any]:
        """Plain, YAML-ready data; ``redact`` masks the values of keys that name a secret and the
        credentials of URLs in every string (``traintel.redaction``), those of ``URL_KEYS`` whatever
        characters they hold."""
        data = self.model_dump(mode="json", by_alias=True)
        if not redact:
            return data
        shown: dict[str, Any] = _redact(data)
        for key in URL_KEYS:
            *sections, name = key.split(".")
            raw, section = data, shown
            for part in sections:
                raw, section = raw[part], section[part]
            if isinstance(raw[name], str):
                section[name] = redact_url_value(raw[name])
        return shown


# --------------------------------------------------------------------------- YAML input

MAX_CONFIG_BYTES = 1024 * 1024
"""A config file larger than this (1 MiB) is refused before it is parsed."""
MAX_DEPTH = 64
"""Mappings and lists nested deeper than this are refused (a config needs a handful of levels)."""

_BaseLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's safe loader when PyYAML was built with it, else the pure-Python one."""


_MERGE_TAG = "tag:yaml.org,2002:merge"
_MERGE_PROBLEM = "YAML merge keys are not supported; write the keys out"


class _Refused(Exception):
    """YAML that parses but is not accepted: an anchor or alias, a merge key, a duplicate key, too deep.

    ``key`` is a merge key's place in the document (``("trainer", "<<")``), None for the others."""

    def __init__(self, mark: Any, problem: str, key: tuple[str | int, ...] | None = None) -> None:
        super().__init__(problem)
        self.line = None if mark is None else int(mark.line) + 1
        self.problem = problem
        self.key = key

    def place(self, prefix: str) -> str:
        """The merge key's dotted place below ``prefix`` (``trainer.<<``); ``prefix`` for the others."""
        place = prefix
        for part in self.key or ():
            place += f"[{part}]" if isinstance(part, int) else f".{part}" if place else part
        return place

    def at(self, prefix: str) -> str:
        """The problem, after the merge key's place below ``prefix`` (``trainer.<<: ...``)."""
        return self.problem if self.key is None else f"{self.place(prefix)}: {self.problem}"


class _Loader(_BaseLoader):  # type: ignore[valid-type,misc]
    """The safe loader (libyaml's when present) refusing duplicate keys; ``1e-3`` is a float (YAML
    1.2) rather than the string YAML 1.1 makes of it. Merge keys never reach it (``_check_events``)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable: the base class says so, with its place
                break
            if duplicate:
                raise _Refused(key_node.start_mark, f"duplicate key {key!r}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _is_merge_key(event: yaml.NodeEvent) -> bool:
    """A key the safe loader would merge: a plain ``<<`` or one tagged ``!!merge``."""
    if not isinstance(event, yaml.ScalarEvent):
        return False
    return event.tag == _MERGE_TAG or (event.tag is None and event.implicit[0] and event.value == "<<")


def _enter(open_: list[list[Any]], event: yaml.NodeEvent) -> None:
    """Note a node starting inside the open collections (``[is a mapping, next node is a key, key or
    index]`` each); a merge key is refused, named by its place."""
    if open_ and open_[-1][0] and open_[-1][1]:  # a mapping's key
        key = event.value if isinstance(event, yaml.ScalarEvent) else "?"
        if _is_merge_key(event):
            raise _Refused(event.start_mark, _MERGE_PROBLEM, (*(c[2] for c in open_[:-1]), key))
        open_[-1][2] = key


def _leave(open_: list[list[Any]]) -> None:
    """Note that a node ended: its mapping expects a key or a value next, its list the next index."""
    if open_:
        top = open_[-1]
        if top[0]:
            top[1] = not top[1]
        else:
            top[2] += 1


def _check_events(text: str) -> None:
    """Refuse merge keys, anchors, aliases and deep nesting from the event stream, before anything
    is built: a "billion laughs" document is refused at its first anchor, whatever it would expand
    to. A merge key (``<<: {...}``, ``<<: *base``) is named with its place even after the anchor it
    merges, since writing its keys out is the fix for both."""
    too_deep = f"nesting deeper than {MAX_DEPTH} levels is not allowed"
    anchor: _Refused | None = None
    open_: list[list[Any]] = []
    try:
        for event in yaml.parse(text, Loader=_BaseLoader):
            if anchor is None and (
                isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None
            ):
                anchor = _Refused(event.start_mark, "YAML anchors and aliases are not allowed")
            if isinstance(event, yaml.NodeEvent):
                _enter(open_, event)
                if not isinstance(event, yaml.CollectionStartEvent):
                    _leave(open_)
                elif len(open_) == MAX_DEPTH:
                    raise _Refused(event.start_mark, too_deep)
                else:
                    open_.append([isinstance(event, yaml.MappingStartEvent), True, 0])
            elif isinstance(event, yaml.CollectionEndEvent):
                open_.pop()
                _leave(open_)
    except yaml.MarkedYAMLError as exc:
        if anchor is not None:
            raise anchor from None
        # libyaml's scanner reads flow brackets ahead of the events and stops at 1000 levels itself
        if exc.problem and "nesting depth" in exc.problem:
            raise _Refused(exc.problem_mark, too_deep) from None
        raise
    if anchor is not None:
        raise anchor


def _load(text: str) -> Any:
    """Parse one YAML document: raises ``_Refused`` or ``yaml.YAMLError``."""
    _check_events(text)
    loader = _Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _error_line(exc: yaml.YAMLError, text: str) -> int | None:
    mark = getattr(exc, "problem_mark", None)
    if mark is not None:
        return int(mark.line) + 1
    position = getattr(exc, "position", None)  # a ReaderError: a character YAML does not allow
    return None if position is None else text.count("\n", 0, position) + 1


def parse_scalar(text: str) -> Any:
    """Parse an override value as YAML: ``3`` -> int, ``null`` -> None, ``1e-3`` -> float; text that
    is not valid YAML (``*.csv``) is that string. Anchors, aliases, duplicate keys and deep nesting
    are a ConfigError."""
    try:
        return _parse_value(text)
    except _Refused as exc:
        raise ConfigError("--set", exc.at("")) from None


def _parse_value(text: str) -> Any:
    if not text.strip():
        return ""
    try:
        return _load(text)
    except (yaml.YAMLError, UnicodeEncodeError):  # not YAML, or not Unicode (a byte from os.environ)
        return text


def _set_path(data: dict[str, Any], path: Sequence[str], value: Any) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = {}
            node[part] = child
        elif not isinstance(child, dict):
            where = ".".join(path[: i + 1])
            shown = _shown(where, child)
            raise ConfigError(where, f"holds the value {shown}, not a section; cannot set {'.'.join(path)}")
        node = child
    node[path[-1]] = value


def _check_path(raw: str, origin: str) -> list[str]:
    parts = raw.split(".")
    if not raw or any(not p for p in parts):
        raise ConfigError(
            origin, f"{redact_url(repr(raw))} is not a dotted key such as 'trainer.accumulation_steps'"
        )
    return parts


def apply_overrides(
    data: dict[str, Any],
    overrides: Sequence[str],
    origin: str = "--set",
    sources: dict[str, str] | None = None,
) -> None:
    """Apply ``key.path=value`` overrides in place; ``sources`` records where each key was set."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(origin, f"{redact_url(repr(item))} must have the form key.path=value")
        path = _check_path(key.strip(), origin)
        try:
            parsed = _parse_value(value)
        except _Refused as exc:
            where = "" if origin == "--set" else f" (set by {origin})"
            raise ConfigError(exc.place(".".join(path)), f"{exc.problem}{where}") from None
        _set_path(data, path, parsed)
        if sources is not None:
            sources[".".join(path)] = origin


_CASED_SCHEDULER_ARGS = {key.lower(): key for args in _SCHEDULER_ARGS.values() for key in args}
"""A scheduler argument's name from its lower-case form (``t_max`` -> ``T_max``)."""


def env_overrides(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """``TRAINTEL__TRAINER__ACCUMULATION_STEPS=3`` -> (``trainer.accumulation_steps=3``, variable name).

    Names are lower-cased, except a scheduler argument's, which takes its own spelling
    (``TRAINTEL__TRAINER__SCHEDULER__T_MAX`` sets ``trainer.scheduler.T_max``)."""
    items = []
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX):
            keys = name[len(ENV_PREFIX) :].lower().split("__")
            if len(keys) == 3 and keys[:2] == ["trainer", "scheduler"]:
                keys[2] = _CASED_SCHEDULER_ARGS.get(keys[2], keys[2])
            items.append((f"{'.'.join(keys)}={environ[name]}", name))
    return items


def _read_text(p: Path, origin: str) -> str:
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
            if len(raw) > MAX_CONFIG_BYTES:
                size = os.fstat(f.fileno()).st_size
                what = f"has {size} bytes" if size > MAX_CONFIG_BYTES else "has more than 1048576 bytes"
                raise ConfigError(
                    origin, f"{str(p)!r} {what}; config files are limited to 1 MiB (1048576 bytes)"
                )
    except FileNotFoundError:
        raise ConfigError(origin, f"file {str(p)!r} does not exist") from None
    except (IsADirectoryError, PermissionError) as exc:
        raise ConfigError(origin, f"cannot read {str(p)!r}: {exc.__class__.__name__}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        problem = f"{str(p)!r} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at line {line})"
        raise ConfigError(origin, problem) from None


def read_yaml(path: str | os.PathLike[str], origin: str = "--config") -> dict[str, Any]:
    """Read a YAML mapping; a missing, unreadable, oversized or non-UTF-8 file, bad YAML, anchors and
    aliases, duplicate keys and deep nesting become one-line ConfigErrors naming ``origin``."""
    p = Path(path)
    text = _read_text(p, origin)
    try:
        data = _load(text)
    except _Refused as exc:
        raise ConfigError(origin, f"{str(p)!r} line {exc.line}: {exc.at('')}") from None
    except yaml.YAMLError as exc:
        line = _error_line(exc, text)
        where = f" at line {line}" if line is not None else ""
        raise ConfigError(origin, f"{str(p)!r} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(origin, f"{str(p)!r} must hold a mapping of sections, got {type(data).__name__}")
    return data


def format_key(loc: Sequence[int | str]) -> str:
    """``("sinks", "extra", 0, "name")`` -> ``sinks.extra[0].name``."""
    key = ""
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
        else:
            key += f".{part}" if key else str(part)
    return key.replace("json_", "json") or "config"


_TYPE_ERRORS = frozenset({"int_type", "float_type", "bool_type", "string_type"})


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {int: "an integer", float: "a float", str: "a string"}.get(type(value), type(value).__name__)


def _is_secret_path(key: str) -> bool:
    return any(is_secret_key(part) for part in re.split(r"[.\[\]]+", key))


def _shown(key: str, value: Any) -> str:
    """``repr(value)`` for a message about ``key``: ``'***'`` when the key names a secret, and URL
    credentials redacted (whatever their shape for a key of ``URL_KEYS``)."""
    if _is_secret_path(key):
        return repr(REDACTED)
    if key in URL_KEYS and isinstance(value, str):
        return repr(redact_url_value(value))
    return redact_url(repr(value))


def _problem(err: Mapping[str, Any], key: str) -> str:
    """A pydantic error as ``<problem> (got <input>)``, the input redacted."""
    kind = err["type"]
    msg = err["msg"]
    if kind == "literal_error":
        msg = msg.replace("Input should be", "must be one of")
    got = err.get("input")
    if kind in _TYPE_ERRORS and _kind(got) not in msg.lower():
        msg = f"{msg}, not {_kind(got)}"
    shown = f" (got {_shown(key, got)})" if not isinstance(got, dict | list) else ""
    return redact_url(f"{msg[0].lower()}{msg[1:]}{shown}")


def _format_validation_error(exc: ValidationError, sources: Mapping[str, str]) -> ConfigError:
    err = exc.errors()[0]
    key = format_key(err["loc"])
    kind = err["type"]
    problem: str | None = None
    if kind == "value_error":
        error = err["ctx"]["error"]
        if isinstance(error, _SubkeyError):
            key, problem = f"{key}.{error.key}", error.problem
        else:
            problem = str(error)
    source = sources.get(key)
    origin = f" (set by {source})" if source else ""
    if kind == "extra_forbidden":
        return ConfigError(key, f"unknown key{origin}")
    if problem is None:
        problem = _problem(err, key)
    return ConfigError(key, f"{redact_url(problem)}{origin}")


def validate(data: Mapping[str, Any], sources: Mapping[str, str] | None = None) -> Config:
    """Validate plain data into a Config, raising a one-line ConfigError.

    ``sources`` maps dotted keys to where they were set (an environment variable), for the message.
    """
    try:
        return Config.model_validate(dict(data))
    except ValidationError as exc:
        raise _format_validation_error(exc, sources or {}) from None


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Resolve a Config: file < ``TRAINTEL__...`` environment < ``--set`` overrides."""
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    sources: dict[str, str] = {}
    for item, variable in env_overrides(os.environ if environ is None else environ):
        apply_overrides(data, [item], origin=variable, sources=sources)
    for item in overrides:
        apply_overrides(data, [item], sources=sources)
        sources.pop(item.partition("=")[0].strip(), None)  # --set wins: the message names the key alone
    return validate(data, sources)


RESUMABLE_KEYS = ("trainer.max_epochs", "telemetry.", "sinks.", "checkpoint.")
"""What ``--set`` may change when resuming (``traintel train --resume``): nothing that alters the maths."""


def _resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS)


def _unredact(value: Any) -> Any:
    """A saved config with its redacted secrets (``***``) as null, to be set again from the environment."""
    if isinstance(value, dict):
        return {k: None if v == REDACTED else _unredact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unredact(v) for v in value]
    return value


def _redacted_urls(value: Any, path: tuple[str | int, ...] = ()) -> list[tuple[tuple[str | int, ...], str]]:
    """Where a saved config holds a URL whose credentials were redacted (``scheme://***@host``)."""
    if isinstance(value, dict):
        return [found for k, v in value.items() for found in _redacted_urls(v, (*path, k))]
    if isinstance(value, list):
        return [found for i, v in enumerate(value) for found in _redacted_urls(v, (*path, i))]
    return [(path, value)] if isinstance(value, str) and has_redacted_url(value) else []


def _lookup(data: Any, path: Sequence[str | int]) -> Any:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _check_no_redacted_urls(data: Mapping[str, Any], saved: list[tuple[tuple[str | int, ...], str]]) -> None:
    """A URL still as the saved config has it (credentials ``***``) would be used as it is: refuse it."""
    for path, value in saved:
        if _lookup(data, path) != value:
            continue  # set again from the environment or --set
        key = format_key(path)
        if any(isinstance(part, int) for part in path):
            how = "it is inside a list, so it cannot be set again for --resume"
        else:
            how = f"set it again with {ENV_PREFIX}{'__'.join(str(p).upper() for p in path)}"
            if _resumable(key):
                how += f" or --set {key}=..."
        raise ConfigError(key, f"the saved config.yaml has {value!r}, its credentials redacted; {how}")


def load_resume_config(
    run_dir: str | os.PathLike[str], overrides: Sequence[str] = (), environ: Mapping[str, str] | None = None
) -> Config:
    """The config to continue the run in ``run_dir`` with: its ``config.yaml`` (secrets again from the
    environment) < ``TRAINTEL__...`` < ``--set``, where ``--set`` may change only ``RESUMABLE_KEYS``;
    ``run.dir`` is ``run_dir`` and ``run.resume`` is ``auto``."""
    directory = Path(run_dir)
    if not directory.is_dir():
        raise ConfigError("--resume", f"{str(directory)!r} is not a directory")
    path = directory / "config.yaml"
    if not path.is_file():
        raise ConfigError(
            "--resume", f"{str(directory)!r} holds no config.yaml: not a traintel run directory"
        )
    for item in overrides:
        key = item.partition("=")[0].strip()
        if not _resumable(key):
            raise ConfigError(
                key,
                "cannot be changed when resuming; --set may change only trainer.max_epochs, "
                "telemetry.*, sinks.* and checkpoint.*",
            )
    saved = read_yaml(path, origin="--resume")
    redacted_urls = _redacted_urls(saved)
    data = _unredact(saved)
    sources: dict[str, str] = {}
    for item, variable in env_overrides(os.environ if environ is None else environ):
        apply_overrides(data, [item], origin=variable, sources=sources)
    for item in overrides:
        apply_overrides(data, [item], sources=sources)
        sources.pop(item.partition("=")[0].strip(), None)
    run = data.setdefault("run", {})
    if not isinstance(run, dict):
        raise ConfigError("--resume", f"{str(path)!r} has no run section")
    run["dir"], run["resume"] = str(directory), "auto"
    _check_no_redacted_urls(data, redacted_urls)
    return validate(data, sources)


def coerce_config(config: Config | Mapping[str, Any] | str | os.PathLike[str] | None) -> Config:
    """Accept a Config, a plain mapping, a YAML path or None (defaults)."""
    if config is None:
        return Config()
    if isinstance(config, Config):
        return config
    if isinstance(config, Mapping):
        return validate(config)
    return load_config(config, environ={})
