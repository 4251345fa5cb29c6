"""Typed, validated run configuration and the file < environment < ``--set`` override chain.

This module imports neither torch nor ignite, so ``traintel --help`` and
``traintel config show`` stay fast.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from traintel.errors import ConfigError

ENV_PREFIX = "TRAINTEL__"
"""Environment variables ``TRAINTEL__SECTION__KEY=value`` override the config file."""

_SECRET_KEY = re.compile(
    r"(?:^|[_.-])(password|passwd|secret|token|api_?key|credentials?)(?:$|[_.-])", re.IGNORECASE
)
REDACTED = "***"


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
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    """Seed for torch's global generators, set before the task factory runs."""
    dir: str | None = None
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
    lr: float = Field(default=1e-3, gt=0, allow_inf_nan=False)
    """Initial learning rate."""


class SchedulerConfig(BaseModel):
    """A learning-rate scheduler stepped once per optimizer step; further keys are its arguments."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    name: Literal["cosine", "step", "exponential", "linear_warmup"]
    """``cosine`` (T_max defaults to the run's optimizer steps), ``step``, ``exponential``,
    ``linear_warmup`` (linear ramp over ``warmup_steps``)."""


class DistributedConfig(_Section):
    """torch.distributed settings, used when the run is started by torchrun (``RANK``, ``WORLD_SIZE``)."""

    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """``auto``: nccl on CUDA, gloo on CPU."""
    timeout_seconds: float = Field(default=300.0, gt=0, le=86_400, allow_inf_nan=False)
    """How long a collective waits for the other ranks before the run fails."""


class TrainerConfig(_Section):
    """The optimisation loop."""

    max_epochs: int = Field(default=3, ge=1, le=1_000_000)
    """Number of passes over the training loader."""
    accumulation_steps: int = Field(default=3, ge=1, le=1_000_000)
    """Micro-batches per optimizer step (k); an epoch has ceil(B/k) optimizer steps."""
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    """Optimizer settings."""
    scheduler: SchedulerConfig | None = None
    """Learning-rate scheduler, or null for a constant rate."""
    grad_clip_norm: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """Clip the global gradient norm to this value (the norm is then reported)."""
    report_grad_norm: bool = False
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

    every: int = Field(default=10, ge=1, le=1_000_000)
    """Emit ``train.batch`` and ``train.step`` records for every Nth optimizer step;
    epoch, eval and run records are always emitted."""
    ranks: Literal["zero", "all"] = "zero"
    """Under torchrun: ``zero`` writes JSON lines on stdout from rank 0 only (every rank's warnings
    and errors still go to stderr), ``all`` from every rank."""
    max_delay_seconds: float = Field(default=0.05, ge=0, le=60, allow_inf_nan=False)
    """Emitted steps are delivered to the sinks in batches, at most this long after the previous
    delivery (or when the next step ends, if steps are slower), and always before the epoch
    record and run.end; 0 delivers every emitted step at once."""


class JsonSinkConfig(_Section):
    """structlog JSON lines on stdout."""

    enabled: bool = True
    format: Literal["auto", "json", "console"] = "auto"
    """``auto``: JSON lines, or, when stdout is a terminal, a console view (epoch, eval and run
    lines, warnings) with a progress bar showing the running step loss."""
    profile: Literal["default", "ecs"] = "default"
    """``ecs``: ``@timestamp``, ``log.level``, ``message``, ``ecs.version`` (Elastic Common Schema)."""
    queue_capacity: int = Field(default=10_000, ge=1, le=10_000_000)
    """Lines waiting for a slow stdout reader before ``train.batch`` records are dropped (and counted)."""
    close_timeout_seconds: float = Field(default=5.0, ge=0, le=3600, allow_inf_nan=False)
    """How long the end of the run waits for stdout to take the queued lines."""


class DiagnosticSinkConfig(_Section):
    """``<run dir>/diagnostic.jsonl`` with self-checks."""

    enabled: bool = True
    filename: str = Field(default="diagnostic.jsonl", pattern=r"^[^/\\]+$")
    """File name inside the run directory."""
    max_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    """Rotate past this size to ``<filename>.1`` ... (0: never rotate)."""
    backups: int = Field(default=3, ge=0, le=1000)
    """Rotated files kept; the oldest beyond this is deleted."""


class PushgatewayConfig(_Section):
    """Where and how the run's final values are pushed."""

    url: str | None = Field(default=None, pattern=r"^https?://[^\s]+$")
    """Pushgateway address, e.g. ``http://pushgateway:9091``; null disables the push."""
    job: str = Field(default="traintel", min_length=1)
    """The ``job`` grouping label; ``run_id`` is the other grouping label."""
    username: str | None = None
    """Basic-auth user name (with ``password``)."""
    password: str | None = None
    """Basic-auth password; redacted in ``config show`` and in ``run.start``."""
    timeout_seconds: float = Field(default=5.0, gt=0, le=300, allow_inf_nan=False)
    """Wall-clock limit for the whole push (connect, send, answer); past it the push is abandoned
    and reported, so a slow gateway never holds the shutdown."""


class PrometheusSinkConfig(_Section):
    """HTTP ``/metrics`` exporter on its own registry."""

    enabled: bool = True
    host: str = Field(default="127.0.0.1", min_length=1)
    """Bind address; ``0.0.0.0`` exposes it beyond the host (containers)."""
    port: int = Field(default=9400, ge=0, le=65535)
    """TCP port; 0 picks a free one (reported in ``run.start``)."""
    linger_seconds: float = Field(default=0.0, ge=0, le=86_400, allow_inf_nan=False)
    """Keep serving the final values this long after the run ends."""
    certfile: str | None = None
    """Serve ``/metrics`` over TLS with this certificate (PEM) and ``keyfile``."""
    keyfile: str | None = None
    client_cafile: str | None = None
    """Require client certificates signed by this CA (mutual TLS)."""
    max_connections: int = Field(default=32, ge=1, le=1024)
    """Connections served at once; one more closes the connection that has waited longest
    without sending a request (counted in ``traintel_exporter_connections_closed_total``)."""
    request_timeout_seconds: float = Field(default=5.0, gt=0, le=300, allow_inf_nan=False)
    """A connection's time to finish the TLS handshake, send its request and take the answer."""
    pushgateway: PushgatewayConfig = Field(default_factory=PushgatewayConfig)
    """Push the final values to a Pushgateway at run end (batch jobs)."""
    per_rank: bool = False
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
    enabled: bool = True

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

    every_steps: int | None = Field(default=None, ge=1, le=1_000_000_000)
    """Take one every N optimizer steps (null: not by steps)."""
    every_epochs: int | None = Field(default=None, ge=1, le=1_000_000)
    """Take one at the end of every N-th epoch (null: not by epochs)."""
    keep: int = Field(default=2, ge=1, le=1000)
    """Complete checkpoints kept (the newest); an older one goes only once a newer one is durable."""
    on_signal: bool = True
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
        """Plain, YAML-ready data; ``redact`` masks values whose key names a secret."""
        data = self.model_dump(mode="json", by_alias=True)
        return _redact(data) if redact else data


def _redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: (REDACTED if _SECRET_KEY.search(str(k)) and v is not None else _redact(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_redact(v) for v in value]
    return value


def parse_scalar(text: str) -> Any:
    """Parse an override value as a YAML scalar: ``3`` -> int, ``null`` -> None, ``1e-3`` -> float."""
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-3 as a string; YAML 1.2 and users mean a float
    return value


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)")


def _set_path(data: dict[str, Any], path: Sequence[str], value: Any) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = {}
            node[part] = child
        elif not isinstance(child, dict):
            where = ".".join(path[: i + 1])
            raise ConfigError(where, f"holds the value {child!r}, not a section; cannot set {'.'.join(path)}")
        node = child
    node[path[-1]] = value


def _check_path(raw: str, origin: str) -> list[str]:
    parts = raw.split(".")
    if not raw or any(not p for p in parts):
        raise ConfigError(origin, f"{raw!r} is not a dotted key such as 'trainer.accumulation_steps'")
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
            raise ConfigError(origin, f"{item!r} must have the form key.path=value")
        path = _check_path(key.strip(), origin)
        _set_path(data, path, parse_scalar(value))
        if sources is not None:
            sources[".".join(path)] = origin


def env_overrides(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """``TRAINTEL__TRAINER__ACCUMULATION_STEPS=3`` -> (``trainer.accumulation_steps=3``, variable name)."""
    items = []
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX):
            path = name[len(ENV_PREFIX) :].lower().replace("__", ".")
            items.append((f"{path}={environ[name]}", name))
    return items


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping; missing files and bad YAML become one-line ConfigErrors."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("--config", f"file {str(p)!r} does not exist") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError("--config", f"cannot read {str(p)!r}: {exc.__class__.__name__}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError("--config", f"{str(p)!r} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            "--config", f"{str(p)!r} must hold a mapping of sections, got {type(data).__name__}"
        )
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


def _format_validation_error(exc: ValidationError, sources: Mapping[str, str]) -> ConfigError:
    err = exc.errors()[0]
    key = format_key(err["loc"])
    source = sources.get(key)
    origin = f" (set by {source})" if source else ""
    kind = err["type"]
    if kind == "extra_forbidden":
        return ConfigError(key, f"unknown key{origin}")
    if kind == "value_error":
        return ConfigError(key, f"{err['ctx']['error']}{origin}")
    got = err.get("input")
    shown = f" (got {got!r})" if not isinstance(got, dict | list) else ""
    msg = err["msg"]
    if kind == "literal_error":
        msg = msg.replace("Input should be", "must be one of")
    return ConfigError(key, f"{msg[0].lower()}{msg[1:]}{shown}{origin}")


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


def _unredact(value: Any) -> Any:
    """A saved config with its redacted secrets (``***``) as null, to be set again from the environment."""
    if isinstance(value, dict):
        return {k: None if v == REDACTED else _unredact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unredact(v) for v in value]
    return value


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
        if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS):
            raise ConfigError(
                key,
                "cannot be changed when resuming; --set may change only trainer.max_epochs, "
                "telemetry.*, sinks.* and checkpoint.*",
            )
    try:
        data = _unredact(read_yaml(path))
    except ConfigError as exc:
        raise ConfigError("--resume", str(exc)) from None
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
