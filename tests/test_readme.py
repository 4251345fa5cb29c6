"""The README's Python example runs as written and prints what its comment says."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

README = Path(__file__).parent.parent / "README.md"


def test_python_example_runs(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)
    assert len(blocks) == 1
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINTEL__")}
    proc = subprocess.run(
        [sys.executable, "-c", blocks[0]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "completed 4"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["model_4.pt"]


def test_the_sink_listing_is_the_example_module() -> None:
    text = README.read_text(encoding="utf-8")
    listing = text.split("Its whole module:\n\n```py\n", 1)[1].split("```", 1)[0]
    example = (README.parent / "examples" / "csv-sink" / "traintel_csv_sink.py").read_text(encoding="utf-8")
    assert listing == example
    assert len(example.splitlines()) == 30
