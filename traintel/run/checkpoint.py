"""Checkpoint files on disk: written crash-safely, found only when complete, pruned only when replaced.

A checkpoint of optimizer step N by rank r is two files in ``<run dir>/checkpoints/``:

- ``step-<N, 9 digits>.pt`` (``.rank<r>.pt`` for r > 0): the state, ``torch.save``d;
- ``step-<N>.json`` (``.rank<r>.json``): its manifest (format, step, rank, size, SHA-256),
  written only after the state file is durable. The manifest is the completion marker.

Each file is written by ``write_atomic`` (a temporary file in the same directory, fsync,
``os.replace``, fsync of the directory), so a crash at any moment leaves either no file or
a whole one, and the manifest never exists before its state file is on disk. A checkpoint
counts only when its manifest parses and the state file has the size and hash it names:
a torn, half-written or tampered file is never picked. Older checkpoints are removed only
after a newer one is complete (manifest first, so a half-removed checkpoint is never
picked), and temporary files left by a crash are removed when a run starts. States load
with ``torch.load(weights_only=True)``: tensors and plain Python values only.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from traintel.run.layout import manifest_name, state_name
from traintel.sinks.io.atomic import write_atomic

FORMAT = 1
"""Version of the state layout; a checkpoint of another format is refused."""

_FILE = re.compile(r"^step-(\d{9})(?:\.rank([1-9]\d*))?\.(pt|json)$")
_TEMP = re.compile(r"^\.step-\d{9}(?:\.rank([1-9]\d*))?\.(?:pt|json)\..+\.tmp$")
_log = logging.getLogger("traintel")


@dataclass(frozen=True)
class Complete:
    """A checkpoint whose manifest and state file agree."""

    step: int
    path: Path
    sha256: str
    size: int


def _rank_of(match: re.Match[str]) -> int:
    return int(match.group(1 if match.re is _TEMP else 2) or 0)


def write(directory: Path, step: int, rank: int, state: Mapping[str, Any]) -> Path:
    """Write rank ``rank``'s checkpoint of ``step`` durably, then its manifest; returns the state file.

    An ``OSError`` (a full disk) leaves every earlier checkpoint as it was.
    """
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    data = buffer.getbuffer()
    path = directory / state_name(step, rank)
    write_atomic(path, bytes(data))
    manifest = {
        "format": FORMAT,
        "step": step,
        "rank": rank,
        "file": path.name,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    write_atomic(directory / manifest_name(step, rank), json.dumps(manifest, indent=1) + "\n")
    return path


def complete(directory: Path, rank: int) -> list[Complete]:
    """Rank ``rank``'s checkpoints whose manifest is whole and whose state file has its size, newest first.

    The hash is checked when one is loaded (``load``), not here.
    """
    found: list[Complete] = []
    try:
        names = [p.name for p in directory.iterdir()]
    except FileNotFoundError:
        return found
    for name in names:
        match = _FILE.match(name)
        if match is None or match.group(3) != "json" or _rank_of(match) != rank:
            continue
        step = int(match.group(1))
        try:
            manifest = json.loads((directory / name).read_text(encoding="utf-8"))
            size, digest = manifest["size"], manifest["sha256"]
            ok = (
                manifest["format"] == FORMAT
                and manifest["step"] == step
                and manifest["file"] == state_name(step, rank)
                and (directory / manifest["file"]).stat().st_size == size
            )
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if ok:
            found.append(Complete(step, directory / state_name(step, rank), str(digest), int(size)))
    found.sort(key=lambda c: c.step, reverse=True)
    return found


def load(found: Complete) -> dict[str, Any]:
    """The state of a complete checkpoint, on the CPU; ``ValueError`` when its bytes do not match."""
    data = found.path.read_bytes()
    if len(data) != found.size or hashlib.sha256(data).hexdigest() != found.sha256:
        msg = f"{found.path.name} does not match its manifest (size or SHA-256)"
        raise ValueError(msg)
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        msg = f"{found.path.name} is not a traintel checkpoint of format {FORMAT}"
        raise ValueError(msg)
    return state


def newest(
    directory: Path, rank: int, steps: set[int] | None = None
) -> tuple[Complete, dict[str, Any]] | None:
    """The newest checkpoint of ``rank`` that loads (among ``steps`` when given); damaged ones are
    skipped with a warning."""
    for found in complete(directory, rank):
        if steps is not None and found.step not in steps:
            continue
        try:
            return found, load(found)
        except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as exc:
            _log.warning("skipping checkpoint %s: %s", found.path.name, exc)
    return None


def prune(directory: Path, rank: int, keep: int) -> None:
    """Remove rank ``rank``'s complete checkpoints beyond the newest ``keep`` (manifest first), and
    its state files that never got a manifest (a write that did not finish)."""
    kept = complete(directory, rank)
    for old in kept[keep:]:
        with contextlib.suppress(FileNotFoundError):
            (directory / manifest_name(old.step, rank)).unlink()
        with contextlib.suppress(FileNotFoundError):
            old.path.unlink()
    steps = {c.step for c in kept[:keep]}
    for path in directory.iterdir():
        match = _FILE.match(path.name)
        if match and match.group(3) == "pt" and _rank_of(match) == rank and int(match.group(1)) not in steps:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def remove_temporary(directory: Path, rank: int) -> int:
    """Remove the temporary files a crash left while rank ``rank`` wrote a checkpoint; returns how many."""
    removed = 0
    try:
        paths = list(directory.iterdir())
    except FileNotFoundError:
        return 0
    for path in paths:
        match = _TEMP.match(path.name)
        if match is not None and _rank_of(match) == rank:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
    return removed


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    if not isinstance(value, Mapping) or not value:
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


def changed_setting(saved: Mapping[str, Any], current: Mapping[str, Any]) -> tuple[str, Any, Any] | None:
    """The first dotted key whose value differs between two settings mappings, with both values.

    An entry of ``current`` that ``saved`` lacks at the top (``run``, which an older checkpoint did
    not record) is not compared: its value then is not known, so it is not a change."""
    before = flatten(saved)
    after = flatten({key: value for key, value in current.items() if key in saved})
    for key in sorted(before.keys() | after.keys()):
        if before.get(key) != after.get(key):
            return key, before.get(key), after.get(key)
    return None
