"""Checkpoint files on disk: written crash-safely, found only when complete, pruned only when replaced.

A checkpoint of optimizer step N by rank r is two files in ``<run dir>/checkpoints/``:

- ``step-<N, 9 digits>.pt`` (``.rank<r>.pt`` for r > 0): the state, ``torch.save``d;
- ``step-<N>.json`` (``.rank<r>.json``): its manifest (format, step, rank, world size, size,
  SHA-256), written only after the state file is durable. The manifest is the completion marker.

Under torchrun the model and optimizer are not in the state file but in ``step-<N>.dcp/``, written
by every rank together through ``torch.distributed.checkpoint`` (``traintel.run.sharded``); each
rank's manifest also names the files it wrote there, with their sizes and SHA-256, so it is written
only once they are on disk, and the checkpoint counts only when every rank's manifest does.

Each file is written by ``write_atomic`` (a temporary file in the same directory, fsync,
``os.replace``, fsync of the directory), so a crash at any moment leaves either no file or
a whole one, and the manifest never exists before its state file is on disk. A checkpoint
counts only when its manifest parses and the state file has the size and hash it names:
a torn, half-written or tampered file is never picked. Older checkpoints are removed only
after a newer one is complete (manifest first, so a half-removed checkpoint is never
picked), and temporary files left by a crash are removed when a run starts. States load
with ``torch.load(weights_only=True)``: tensors and plain Python values only; a rank's files in
the DCP directory are checked against its manifest's hashes when its checkpoint is loaded.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from traintel.errors import one_line
from traintel.run import sharded
from traintel.run.layout import (
    BEST_DIRECTORY,
    best_manifest_name,
    best_shards_name,
    best_state_name,
    manifest_name,
    shards_name,
    state_name,
)
from traintel.sinks.io.atomic import write_atomic

FORMAT = 2
"""Version of the state layout written: 2 keeps a torchrun run's model and optimizer apart, in the
DCP directory its manifest names."""
FORMATS = (1, 2)
"""The layouts read (1: every rank's state file holds the model and optimizer); others are refused."""

_FILE = re.compile(r"^step-(\d{9})(?:\.rank([1-9]\d*))?\.(pt|json)$")
_TEMP = re.compile(r"^\.step-\d{9}(?:\.rank([1-9]\d*))?\.(?:pt|json)\..+\.tmp$")
_SHARDS = re.compile(r"^step-(\d{9})\.dcp$")
_BEST_SHARDS = re.compile(r"^best-(\d{9,})\.dcp$")
_BEST_FILE = re.compile(r"^best-(\d{9,})(?:\.rank([1-9]\d*))?\.(pt|json)$")
_BEST_TEMP = re.compile(r"^\.best-\d{9,}(?:\.rank([1-9]\d*))?\.(?:pt|json)\..+\.tmp$")
_log = logging.getLogger("traintel")


@dataclass(frozen=True)
class ShardFile:
    """One of a rank's files in a checkpoint's DCP directory, as its manifest names it."""

    path: Path
    size: int
    sha256: str


@dataclass(frozen=True)
class Complete:
    """A checkpoint whose manifest and state file agree."""

    step: int
    path: Path
    sha256: str
    size: int
    shards: tuple[ShardFile, ...] = field(default=(), kw_only=True)
    """This rank's files of the model and optimizer (``traintel.run.sharded``), in the DCP directory
    ``shard_directory``; none for a checkpoint of one process (they are in the state file)."""
    shard_directory: Path | None = field(default=None, kw_only=True)
    world_size: int | None = field(default=None, kw_only=True)
    """The ranks that took it, as its manifest says (None: one written before manifests said)."""


def _rank_of(match: re.Match[str]) -> int:
    return int(match.group(1 if match.re in (_TEMP, _BEST_TEMP) else 2) or 0)


def write(
    directory: Path,
    step: int,
    rank: int,
    state: Mapping[str, Any],
    *,
    world_size: int = 1,
    shards: sharded.Written | None = None,
) -> Path:
    """Write rank ``rank``'s checkpoint of ``step`` durably, then its manifest (naming ``shards``,
    what this rank wrote of the model and optimizer's DCP directory, when given); returns the state
    file. An ``OSError`` (a full disk) leaves every earlier checkpoint as it was.
    """
    path = directory / state_name(step, rank)
    fields = {"step": step, "rank": rank, "world_size": world_size}
    _write_pair(path, directory / manifest_name(step, rank), state, fields, shards)
    return path


def _write_pair(
    path: Path,
    manifest_path: Path,
    state: Mapping[str, Any],
    fields: Mapping[str, Any],
    shards: sharded.Written | None = None,
) -> tuple[int, str]:
    """``state`` into ``path``, durably, then its manifest (``fields``, the file's name, size and
    SHA-256, and ``shards``'s files) into ``manifest_path``, each with ``write_atomic``; returns the
    state's size and hash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    data = buffer.getbuffer()
    digest = hashlib.sha256(data).hexdigest()
    write_atomic(path, data)  # the buffer itself: a state as large as the model is not copied again
    manifest = {"format": FORMAT, **fields, "file": path.name, "size": len(data), "sha256": digest}
    if shards is not None:
        manifest["shards"] = {
            "directory": shards.directory.name,
            "files": [{"file": name, "size": size, "sha256": sha} for name, size, sha in shards.files],
        }
    write_atomic(manifest_path, json.dumps(manifest, indent=1) + "\n")
    return len(data), digest


def _shard_files(manifest: Mapping[str, Any], where: Path, expected: str) -> tuple[ShardFile, ...] | None:
    """The shard files a manifest names, when each is on disk with its size; () when it names none
    (a checkpoint of one process, or of format 1); None when they do not check out. ``expected``: the
    DCP directory's name for this checkpoint."""
    shards = manifest.get("shards")
    if shards is None:
        return ()
    if not isinstance(shards, Mapping) or shards.get("directory") != expected:
        return None
    files = shards.get("files")
    if not isinstance(files, list) or not files:
        return None
    found = []
    for entry in files:
        name, size, sha = entry["file"], entry["size"], entry["sha256"]
        if not (
            isinstance(name, str)
            and sharded.is_shard_name(name)
            and type(size) is int
            and isinstance(sha, str)
        ):
            return None
        path = where / expected / name
        if path.stat().st_size != size:
            return None
        found.append(ShardFile(path, size, sha))
    return tuple(found)


def _check_shards(found: Complete) -> None:
    """``ValueError`` unless each of a checkpoint's shard files has its manifest's size and SHA-256."""
    for shard in found.shards:
        if sharded.digest(shard.path) != (shard.size, shard.sha256):
            msg = f"{shard.path.parent.name}/{shard.path.name} does not match its manifest (size or SHA-256)"
            raise ValueError(msg)


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
        shards: tuple[ShardFile, ...] | None = None
        try:
            manifest = json.loads((directory / name).read_text(encoding="utf-8"))
            size, digest = manifest["size"], manifest["sha256"]
            ok = (
                manifest["format"] in FORMATS
                and manifest["step"] == step
                and manifest["file"] == state_name(step, rank)
                and (directory / manifest["file"]).stat().st_size == size
            )
            shards = _shard_files(manifest, directory, shards_name(step)) if ok else None
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if ok and shards is not None:
            found.append(Complete(
                step, directory / state_name(step, rank), str(digest), int(size), shards=shards,
                shard_directory=directory / shards_name(step) if shards else None,
                world_size=manifest["world_size"] if type(manifest.get("world_size")) is int else None,
            ))  # fmt: skip
    found.sort(key=lambda c: c.step, reverse=True)
    return found


def load(found: Complete) -> dict[str, Any]:
    """The state of a complete checkpoint, on the CPU; ``ValueError`` when its bytes do not match."""
    data = found.path.read_bytes()
    if len(data) != found.size or hashlib.sha256(data).hexdigest() != found.sha256:
        msg = f"{found.path.name} does not match its manifest (size or SHA-256)"
        raise ValueError(msg)
    _check_shards(found)
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") not in FORMATS:
        formats = " or ".join(str(f) for f in FORMATS)
        msg = f"{found.path.name} is not a traintel checkpoint of format {formats}"
        raise ValueError(msg)
    if found.shard_directory is not None:
        state["shards"] = found.shard_directory  # where restore finds the model and optimizer
    return state


def model_and_optimizer(state: Mapping[str, Any]) -> dict[str, Any]:
    """A loaded checkpoint's (``load``, ``newest``) model and optimizer state, whole, on the CPU:
    from its state file in one process, else gathered from its DCP directory (every rank's part,
    read here without a process group). The model's keys are its parameter names either way; a DCP
    checkpoint's optimizer state is keyed by them too (``get_state_dict``'s layout)."""
    if "model" in state:
        return {"model": state["model"], "optimizer": state["optimizer"]}
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        whole = Path(tmp) / "whole.pt"
        dcp_to_torch_save(state["shards"], whole)
        loaded = torch.load(whole, map_location="cpu", weights_only=True)
    return {"model": loaded["model"], "optimizer": loaded["optimizer"]}


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
        shards = _SHARDS.match(path.name)
        if shards and int(shards.group(1)) not in steps:  # this rank's part of an older or torn one
            sharded.remove_own(path, rank)


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
    sequence: int | None = None,
    world_size: int = 1,
    shards: sharded.Written | None = None,
) -> Best:
    """Write rank ``rank``'s new best checkpoint into ``directory/best`` (``directory``: the run's
    checkpoint directory) durably, then its manifest (naming ``shards``, this rank's files of the
    model and optimizer's DCP directory, ``best_shards_name(sequence)``, under torchrun); then remove
    the best it replaces (manifest first) and what a crashed write of one left. ``sequence``: the
    best's number, the same on every rank (default: ``next_best`` of this rank). An ``OSError`` while
    writing leaves the earlier best as it was; one while removing leaves an older best behind, which
    ``best`` never picks."""
    where = directory / BEST_DIRECTORY
    sequence = next_best(directory, rank) if sequence is None else sequence
    path = where / best_state_name(sequence, rank)
    fields = {"sequence": sequence, "rank": rank, "world_size": world_size, "metric": metric, "split": split,
              "mode": mode, "value": float(value), "step": step, "epoch": epoch}  # fmt: skip
    size, digest = _write_pair(path, where / best_manifest_name(sequence, rank), state, fields, shards)
    older = [name for seq, name in _best_entries(where, rank) if seq != sequence]
    older.sort(key=lambda name: not name.endswith(".json"))  # manifests first: never half a best complete
    for name in older:
        with contextlib.suppress(OSError):
            (where / name).unlink()
    with contextlib.suppress(OSError):
        _remove_matching(where, rank, _BEST_TEMP)
        for path_ in where.iterdir():
            match = _BEST_SHARDS.match(path_.name)
            if match is not None and int(match.group(1)) != sequence:
                sharded.remove_own(path_, rank)
    files = tuple(ShardFile(shards.directory / n, sz, sha) for n, sz, sha in shards.files) if shards else ()
    return Best(
        step, path, digest, size, metric, split, mode, float(value), epoch, sequence, shards=files,
        shard_directory=shards.directory if shards else None,
    )  # fmt: skip


def next_best(directory: Path, rank: int) -> int:
    """The number the next best checkpoint of rank ``rank`` takes: one above any of its best files."""
    return 1 + max((seq for seq, _ in _best_entries(directory / BEST_DIRECTORY, rank)), default=0)


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
            _check_shards(found)
        except (OSError, ValueError) as exc:
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
        shards = _shard_files(m, where, best_shards_name(sequence))
        ok = (
            shards is not None
            and m["format"] in FORMATS
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
    if not ok or shards is None:
        return None
    return Best(
        m["step"], where / name, m["sha256"], size, m["metric"], m["split"], m["mode"], float(value),
        m["epoch"], sequence, shards=shards,
        shard_directory=where / best_shards_name(sequence) if shards else None,
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
