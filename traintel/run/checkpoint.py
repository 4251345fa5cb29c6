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

The best evaluation's checkpoint (``checkpoint.best``) lives apart, in ``checkpoints/best/``:
``best-<n>.pt`` and ``best-<n>.json`` (``.rank<r>`` for r > 0), numbered in the order written, its
manifest naming also the evaluation (metric, split, mode, value, step, epoch). It is written the
same way, and the one it replaces is removed only once it is complete (manifest first), so the
directory always holds a whole best once one was written; ``best`` finds it. Neither ``keep``'s
pruning nor the resume picker looks in that directory.
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

from traintel.errors import one_line
from traintel.run.layout import BEST_DIRECTORY, best_manifest_name, best_state_name, manifest_name, state_name
from traintel.sinks.io.atomic import write_atomic

FORMAT = 1
"""Version of the state layout; a checkpoint of another format is refused."""

_FILE = re.compile(r"^step-(\d{9})(?:\.rank([1-9]\d*))?\.(pt|json)$")
_TEMP = re.compile(r"^\.step-\d{9}(?:\.rank([1-9]\d*))?\.(?:pt|json)\..+\.tmp$")
_BEST_FILE = re.compile(r"^best-(\d{9,})(?:\.rank([1-9]\d*))?\.(pt|json)$")
_BEST_TEMP = re.compile(r"^\.best-\d{9,}(?:\.rank([1-9]\d*))?\.(?:pt|json)\..+\.tmp$")
_log = logging.getLogger("traintel")


@dataclass(frozen=True)
class Complete:
    """A checkpoint whose manifest and state file agree."""

    step: int
    path: Path
    sha256: str
    size: int


def _rank_of(match: re.Match[str]) -> int:
    return int(match.group(1 if match.re in (_TEMP, _BEST_TEMP) else 2) or 0)


def write(directory: Path, step: int, rank: int, state: Mapping[str, Any]) -> Path:
    """Write rank ``rank``'s checkpoint of ``step`` durably, then its manifest; returns the state file.

    An ``OSError`` (a full disk) leaves every earlier checkpoint as it was.
    """
    path = directory / state_name(step, rank)
    _write_pair(path, directory / manifest_name(step, rank), state, {"step": step, "rank": rank})
    return path


def _write_pair(
    path: Path, manifest_path: Path, state: Mapping[str, Any], fields: Mapping[str, Any]
) -> tuple[int, str]:
    """``state`` into ``path``, durably, then its manifest (``fields``, the file's name, size and
    SHA-256) into ``manifest_path``, each with ``write_atomic``; returns the state's size and hash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    data = buffer.getbuffer()
    digest = hashlib.sha256(data).hexdigest()
    write_atomic(path, bytes(data))
    manifest = {"format": FORMAT, **fields, "file": path.name, "size": len(data), "sha256": digest}
    write_atomic(manifest_path, json.dumps(manifest, indent=1) + "\n")
    return len(data), digest


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
    """Remove the temporary files a crash left while rank ``rank`` wrote a checkpoint (a best one in
    ``best/`` included); returns how many."""
    return _remove_matching(directory, rank, _TEMP) + _remove_matching(
        directory / BEST_DIRECTORY, rank, _BEST_TEMP
    )


def _remove_matching(directory: Path, rank: int, pattern: re.Pattern[str]) -> int:
    removed = 0
    try:
        paths = list(directory.iterdir())
    except FileNotFoundError:
        return 0
    for path in paths:
        match = pattern.match(path.name)
        if match is not None and _rank_of(match) == rank:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
    return removed


@dataclass(frozen=True)
class Best(Complete):
    """A complete best checkpoint (``checkpoint.best``) and the evaluation whose model it holds;
    ``load`` reads its state like any checkpoint's."""

    metric: str
    """``eval.loss`` or ``eval.<metric>``."""
    split: str
    """The validation split evaluated."""
    mode: str
    """``min`` (lower is better) or ``max``."""
    value: float
    """The metric's value at that evaluation, as its ``eval.epoch`` record has it."""
    epoch: int
    """The epoch of that evaluation (``step`` is its optimizer step)."""
    sequence: int
    """Its number in the order the bests were written (in its file names)."""


def write_best(
    directory: Path,
    rank: int,
    state: Mapping[str, Any],
    *,
    metric: str,
    split: str,
    mode: str,
    value: float,
    step: int,
    epoch: int,
) -> Best:
    """Write rank ``rank``'s new best checkpoint into ``directory/best`` (``directory``: the run's
    checkpoint directory) durably, then its manifest; then remove the best it replaces (manifest
    first) and what a crashed write of one left. An ``OSError`` while writing leaves the earlier best
    as it was; one while removing leaves an older best behind, which ``best`` never picks."""
    where = directory / BEST_DIRECTORY
    sequence = 1 + max((seq for seq, _ in _best_entries(where, rank)), default=0)
    path = where / best_state_name(sequence, rank)
    fields = {"sequence": sequence, "rank": rank, "metric": metric, "split": split, "mode": mode,
              "value": float(value), "step": step, "epoch": epoch}  # fmt: skip
    size, digest = _write_pair(path, where / best_manifest_name(sequence, rank), state, fields)
    older = [name for seq, name in _best_entries(where, rank) if seq != sequence]
    older.sort(key=lambda name: not name.endswith(".json"))  # manifests first: never half a best complete
    for name in older:
        with contextlib.suppress(OSError):
            (where / name).unlink()
    with contextlib.suppress(OSError):
        _remove_matching(where, rank, _BEST_TEMP)
    return Best(step, path, digest, size, metric, split, mode, float(value), epoch, sequence)


def best(directory: Path, rank: int = 0) -> Best | None:
    """Rank ``rank``'s best checkpoint in ``directory/best`` (``directory``: a run's checkpoint
    directory, ``<run dir>/checkpoints``), or None when there is none: the newest written whose
    manifest is whole and whose state file has its size and SHA-256. A torn or partly written one
    is never returned; one that does not match its manifest is skipped with a warning."""
    where = directory / BEST_DIRECTORY
    for sequence in sorted({seq for seq, _ in _best_entries(where, rank)}, reverse=True):
        found = _best_manifest(where, rank, sequence)
        if found is None:
            continue
        try:
            data = found.path.read_bytes()
        except OSError as exc:
            _log.warning("skipping best checkpoint %s: %s", found.path.name, one_line(exc))
            continue
        if len(data) != found.size or hashlib.sha256(data).hexdigest() != found.sha256:
            _log.warning("skipping best checkpoint %s: it does not match its manifest", found.path.name)
            continue
        return found
    return None


def _best_entries(where: Path, rank: int) -> list[tuple[int, str]]:
    """Rank ``rank``'s best files in ``where`` (state files and manifests): their number and name."""
    try:
        names = [p.name for p in where.iterdir()]
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for name in names:
        match = _BEST_FILE.match(name)
        if match is not None and _rank_of(match) == rank:
            found.append((int(match.group(1)), name))
    return found


def _best_manifest(where: Path, rank: int, sequence: int) -> Best | None:
    """The best that manifest ``sequence`` describes, when it is whole and its state file has its size."""
    try:
        m = json.loads((where / best_manifest_name(sequence, rank)).read_text(encoding="utf-8"))
        name, size, value = m["file"], m["size"], m["value"]
        ok = (
            m["format"] == FORMAT
            and m["sequence"] == sequence
            and m["rank"] == rank
            and name == best_state_name(sequence, rank)
            and type(size) is int
            and (where / name).stat().st_size == size
            and isinstance(m["sha256"], str)
            and all(isinstance(m[key], str) for key in ("metric", "split"))
            and m["mode"] in ("min", "max")
            and type(value) in (int, float)
            and all(type(m[key]) is int for key in ("step", "epoch"))
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not ok:
        return None
    return Best(
        m["step"], where / name, m["sha256"], size, m["metric"], m["split"], m["mode"], float(value),
        m["epoch"], sequence,
    )  # fmt: skip


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
