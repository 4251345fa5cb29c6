"""Directories a run creates, and removing them again when nothing was written into them."""

from __future__ import annotations

from pathlib import Path


def missing_dirs(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first."""
    return [p for p in (path, *path.parents) if not p.exists()]


def remove_empty(dirs: list[Path]) -> None:
    """Remove ``dirs`` (deepest first) while they are empty; stop at the first that is not."""
    for directory in dirs:
        try:
            directory.rmdir()
        except OSError:
            return  # not empty (or not ours to remove): keep it and its parents
