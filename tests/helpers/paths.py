"""Where the repository's files are, for tests anywhere in the tree."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
"""The repository root (``tests/helpers/`` is two levels below it)."""

DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"
"""The built-in task's config, as ``make run`` uses it."""
