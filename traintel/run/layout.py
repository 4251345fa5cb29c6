"""The run directory's layout: every file name traintel writes or reads there, in one place.

::

    RUN_DIR/
      config.yaml                   the resolved config (CONFIG_FILENAME)
      diagnostic.jsonl              rank 0's diagnostic file (DIAGNOSTIC_FILENAME by default),
      diagnostic.jsonl.1, ...       its rotated parts (a higher number is older)
      diagnostic.rank1.jsonl        rank 1's (rank_filename), and so on
      report.png                    ``traintel report``'s figure (REPORT_FILENAME)
      checkpoints/                  CHECKPOINT_DIRECTORY
        run.json                    the run id, the attempt, a completed run's end (RUN_FILE)
        step-000000012.pt           a checkpoint's state (state_name), with its manifest
        step-000000012.json         (manifest_name); rank r > 0 adds ``.rank<r>``
        step-000000012.dcp/         under torchrun, the model and optimizer (shards_name): each
          __0_0.distcp, ...         rank's files (torch.distributed.checkpoint), named in its
          .metadata                 manifest; rank 0's include DCP's metadata
        best/                       BEST_DIRECTORY: the best evaluation's checkpoint (``checkpoint.best``)
          best-000000003.pt         its state (best_state_name: the 3rd best written), with its
          best-000000003.json       manifest (best_manifest_name); rank r > 0 adds ``.rank<r>``
          best-000000003.dcp/       under torchrun, its model and optimizer (best_shards_name)
"""

from __future__ import annotations

from pathlib import Path

DIAGNOSTIC_FILENAME = "diagnostic.jsonl"
"""The diagnostic file's name when the run directory has no config.yaml naming another."""
CONFIG_FILENAME = "config.yaml"
"""The resolved config a run writes into its directory."""
REPORT_FILENAME = "report.png"
"""Where ``traintel report`` writes its figure unless told otherwise."""
CHECKPOINT_DIRECTORY = "checkpoints"
"""Where checkpoints go, inside the run directory."""
BEST_DIRECTORY = "best"
"""Where the best evaluation's checkpoint goes, inside ``CHECKPOINT_DIRECTORY`` (never pruned by
``checkpoint.keep``, never resumed from)."""
RUN_FILE = "run.json"
"""The run's identity in ``CHECKPOINT_DIRECTORY``: run id, attempt, and a completed run's end."""
RESERVED_NAMES = (CONFIG_FILENAME, CHECKPOINT_DIRECTORY, REPORT_FILENAME, RUN_FILE)
"""Names no sink may write under in the run directory."""


def state_name(step: int, rank: int) -> str:
    """``step-000000012.pt`` (rank 0), ``step-000000012.rank1.pt``."""
    return rank_filename(f"step-{step:09d}.pt", rank)


def manifest_name(step: int, rank: int) -> str:
    """``step-000000012.json`` (rank 0), ``step-000000012.rank1.json``."""
    return rank_filename(f"step-{step:09d}.json", rank)


def shards_name(step: int) -> str:
    """``step-000000012.dcp``: the directory of a checkpoint's model and optimizer under torchrun,
    every rank's files in one."""
    return f"step-{step:09d}.dcp"


def best_shards_name(sequence: int) -> str:
    """``best-000000003.dcp``: the best checkpoint's model and optimizer under torchrun."""
    return f"best-{sequence:09d}.dcp"


def best_state_name(sequence: int, rank: int) -> str:
    """``best-000000003.pt`` (rank 0's third best), ``best-000000003.rank1.pt``: numbered in the order
    written, so a new best never takes the name of the one it replaces."""
    return rank_filename(f"best-{sequence:09d}.pt", rank)


def best_manifest_name(sequence: int, rank: int) -> str:
    """``best-000000003.json`` (rank 0), ``best-000000003.rank1.json``."""
    return rank_filename(f"best-{sequence:09d}.json", rank)


def rank_filename(filename: str, rank: int) -> str:
    """The name of rank ``rank``'s diagnostic file when rank 0's is ``filename``.

    Rank 0 keeps ``filename``; rank r > 0 inserts ``.rank<r>`` before the last suffix
    (``diagnostic.jsonl`` -> ``diagnostic.rank1.jsonl``, ``a.b.jsonl`` -> ``a.b.rank1.jsonl``),
    and a name without one gets it appended (``diag`` -> ``diag.rank1``). The last suffix is the
    text from the last dot when that dot is neither the first nor the last character, as a leading
    dot (``.diag``) or a trailing one (``diag.``) does not start a suffix. Rotated parts of rank
    r's file are ``rank_filename(filename, r) + ".<n>"``. ValueError when ``rank`` is negative
    or not an int.
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        msg = f"rank must be an int >= 0, got {rank!r}"
        raise ValueError(msg)
    if rank == 0:
        return filename
    head, tail = _split_suffix(filename)
    return f"{head}.rank{rank}{tail}"


def rank_of_filename(name: str, filename: str) -> int | None:
    """The rank r > 0 whose file is ``name`` (``rank_filename(filename, r) == name``), else None.

    Only a canonical decimal r counts (``diagnostic.rank01.jsonl`` and ``diagnostic.rank0.jsonl``
    are no rank's file); rotated parts (``<rank file>.<n>``) are not rank files themselves.
    """
    head, tail = _split_suffix(filename)
    if not (name.startswith(head + ".rank") and name.endswith(tail)):
        return None
    digits = name[len(head) + len(".rank") : len(name) - len(tail)]
    if not (digits.isascii() and digits.isdecimal()) or digits.startswith("0"):
        return None
    rank = int(digits)
    return rank if rank_filename(filename, rank) == name else None


def _split_suffix(filename: str) -> tuple[str, str]:
    """``filename`` cut before its last suffix (a dot neither first nor last, and what follows)."""
    dot = filename.rfind(".")
    if 0 < dot < len(filename) - 1:
        return filename[:dot], filename[dot:]
    return filename, ""


def rotated_parts(run_dir: Path, filename: str, names: frozenset[str]) -> list[Path]:
    """One stream's files among ``names``, oldest first: ``<filename>.<n>`` by decreasing n (a
    canonical decimal n only), then ``<filename>`` itself when present; empty when none."""
    numbered: list[tuple[int, str]] = []
    for name in names:
        suffix = name.removeprefix(filename + ".")
        if suffix != name and suffix.isdecimal() and suffix.isascii() and str(int(suffix)) == suffix:
            numbered.append((int(suffix), name))
    parts = [run_dir / name for _, name in sorted(numbered, reverse=True)]
    if filename in names:
        parts.append(run_dir / filename)
    return parts


def stream_ranks(filename: str, names: frozenset[str]) -> list[int]:
    """The ranks r > 0 with a file among ``names`` (``rank_filename(filename, r)`` or one of its
    rotated parts), increasing."""
    found: set[int] = set()
    for name in names:
        base, dot, suffix = name.rpartition(".")
        candidates = (name, base) if dot and suffix.isdecimal() else (name,)
        for candidate in candidates:
            rank = rank_of_filename(candidate, filename)
            if rank is not None:
                found.add(rank)
    return sorted(found)
