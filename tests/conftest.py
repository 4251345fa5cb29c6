"""Fixtures every test may use, and the end-of-session line naming what was skipped. Plain helpers
live in ``tests.helpers``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.children import Cli, CliResult, cli_in_process


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> Cli:
    """``traintel ARGS`` run in this process, in ``tmp_path`` (``tests.helpers.children.cli_in_process``)."""

    def run(*args: str, env: Mapping[str, str] | None = None) -> CliResult:
        return cli_in_process(tmp_path, *args, monkeypatch=monkeypatch, capfd=capfd, env=env)

    return run


@pytest.fixture(autouse=True)
def _no_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("TRAINTEL__"):
            monkeypatch.delenv(name)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with more ``slow`` tests first, each file's tests kept together and in order: the test
    workers take whole files (``--dist loadfile``), so the long ones start early, the short ones
    fill in at the end, and the workers finish together."""
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: Any) -> None:
    """End the run with one line naming what was skipped and why (grouped by reason), so a machine
    without prometheus, promtool or a GPU never passes the real-server tests silently."""
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    reasons: dict[str, int] = {}
    for report in skipped:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    listed = "; ".join(f"{reason} ({count})" for reason, count in sorted(reasons.items()))
    terminalreporter.write_line(f"traintel: {len(skipped)} skipped: {listed}")
