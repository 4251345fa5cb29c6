"""Import rules a linter cannot check: what a plug-in sink loads, and no private Ignite name read.

ruff, mypy and the import-linter contracts run in ``make lint``, outside the tests."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers.paths import ROOT

pytestmark = pytest.mark.slow


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


def test_traintel_reads_no_private_ignite_name() -> None:
    """No attribute of Ignite's Engine or State whose name starts with an underscore (``_fire_event``,
    ``_event_handlers``, ``_process_function``...) is read or set anywhere in the package."""
    import ast

    from ignite.engine import Engine, State

    engine = Engine(lambda _engine, _batch: None)
    names = {*dir(Engine), *vars(engine), *dir(State), *vars(State())}
    private = {n for n in names if n.startswith("_") and not n.startswith("__")}
    found = []
    for path in sorted((ROOT / "traintel").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in private:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
    assert found == []
