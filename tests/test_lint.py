"""The code base stays ruff-clean, formatted and mypy-strict clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "argv",
    [
        ["ruff", "check", "traintel", "tests", "benchmarks", "examples", "docker/kubernetes"],
        ["ruff", "format", "--check", "traintel", "tests", "benchmarks", "examples", "docker/kubernetes"],
        ["mypy"],
        ["lint-imports"],
    ],
    ids=["ruff-check", "ruff-format", "mypy", "import-contracts"],
)
def test_tool_is_clean(argv: list[str]) -> None:
    result = subprocess.run(
        [str(BIN / argv[0]), *argv[1:]], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("module", ["traintel.sinks.base", "traintel.sinks", "traintel.sinks.memory"])
def test_what_a_plugin_sink_imports_loads_no_heavy_library(module: str) -> None:
    """A plug-in sink's imports load neither structlog, prometheus_client, matplotlib, torch nor
    Ignite (checked in a fresh interpreter, where nothing else has loaded them)."""
    code = (
        f"import sys, {module}\n"
        "from traintel.sinks import RunContext, Sink\n"
        "heavy = ('structlog', 'prometheus_client', 'matplotlib', 'torch', 'ignite')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout == "[]\n"
