"""Where settings come from, in order: the YAML file < ``TRAINTEL__...`` environment variables <
``--set key=value``; and, for ``--resume``, the run's saved ``config.yaml`` first."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from traintel.config.messages import format_key, format_validation_error, shown
from traintel.config.model import SCHEDULES, Config
from traintel.config.reading import Refused, parse_value, read_yaml
from traintel.errors import ConfigError
from traintel.redaction import REDACTED, has_redacted_url, redact_url

ENV_PREFIX = "TRAINTEL__"
"""Environment variables ``TRAINTEL__SECTION__KEY=value`` override the config file."""


def _set_path(data: dict[str, Any], path: Sequence[str], value: Any) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = {}
            node[part] = child
        elif not isinstance(child, dict):
            where = ".".join(path[: i + 1])
            value_text = shown(where, child)
            problem = f"holds the value {value_text}, not a section; cannot set {'.'.join(path)}"
            raise ConfigError(where, problem)
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
            parsed = parse_value(value)
        except Refused as exc:
            where = "" if origin == "--set" else f" (set by {origin})"
            raise ConfigError(exc.place(".".join(path)), f"{exc.problem}{where}") from None
        _set_path(data, path, parsed)
        if sources is not None:
            sources[".".join(path)] = origin


_CASED_SCHEDULER_ARGS = {key.lower(): key for model in SCHEDULES.values() for key in model.model_fields}
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


def validate(data: Mapping[str, Any], sources: Mapping[str, str] | None = None) -> Config:
    """Validate plain data into a Config, raising a one-line ConfigError.

    ``sources`` maps dotted keys to where they were set (an environment variable), for the message.
    """
    try:
        return Config.model_validate(dict(data))
    except ValidationError as exc:
        raise format_validation_error(exc, sources or {}) from None


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Resolve a Config: file < ``TRAINTEL__...`` environment < ``--set`` overrides."""
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    sources = _override(data, overrides, environ)
    return validate(data, sources)


def _override(
    data: dict[str, Any], overrides: Sequence[str], environ: Mapping[str, str] | None
) -> dict[str, str]:
    """Apply the ``TRAINTEL__...`` variables of ``environ`` (default: ``os.environ``), then the
    ``--set`` ``overrides``, to ``data`` in place; returns the keys set by a variable, with its name."""
    sources: dict[str, str] = {}
    for item, variable in env_overrides(os.environ if environ is None else environ):
        apply_overrides(data, [item], origin=variable, sources=sources)
    for item in overrides:
        apply_overrides(data, [item], sources=sources)
        sources.pop(item.partition("=")[0].strip(), None)  # --set wins: the message names the key alone
    return sources


RESUMABLE_KEYS = ("trainer.max_epochs", "trainer.max_steps", "telemetry.", "sinks.", "checkpoint.")
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
                "trainer.max_steps, telemetry.*, sinks.* and checkpoint.*",
            )
    saved = read_yaml(path, origin="--resume")
    redacted_urls = _redacted_urls(saved)
    data = _unredact(saved)
    sources = _override(data, overrides, environ)
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
