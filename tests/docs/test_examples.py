"""Every ```python block of README.md and docs/**/*.md runs as written and prints what it says.

Each block runs alone in a fresh interpreter, in an empty directory, without ``TRAINTEL__``
variables. The one ```py block is the CSV sink's listing, which must equal the example module;
the README's task factory is also run as its command line says.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers.children import run_child
from tests.helpers.paths import ROOT
from traintel.schema import parse_line

pytestmark = pytest.mark.slow

README = ROOT / "README.md"
SINK_GUIDE = ROOT / "docs" / "guides" / "writing-a-sink.md"


def _pages() -> list[Path]:
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


def _blocks(language: str) -> dict[str, str]:
    """``{"<page>#<n>": code}`` for the n-th block fenced as ``language`` of each page."""
    found = {}
    for page in _pages():
        text = page.read_text(encoding="utf-8")
        for n, code in enumerate(re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.DOTALL | re.M)):
            found[f"{page.relative_to(ROOT)}#{n}"] = code
    return found


@dataclass(frozen=True)
class Expected:
    """What a block prints and leaves behind."""

    tail: list[str]
    """The last lines of stdout, exactly."""
    events: list[str] = field(default_factory=list)
    """The ``event`` of each JSON line before ``tail``, in order (stdout holds nothing else)."""
    files: list[str] = field(default_factory=list)
    """Every file left in the block's directory, sorted."""


_EPOCH = ["train.epoch", "eval.epoch"]

EXPECTED = {
    "README.md#0": Expected(
        tail=["completed 9 480"],
        events=["run.start", *_EPOCH * 3, "run.end"],
        files=["runs/demo/config.yaml", "runs/demo/diagnostic.jsonl"],
    ),
    "README.md#1": Expected(tail=[]),
    "docs/concepts/accumulation.md#0": Expected(
        tail=["1 4 0.5", "1 4 0.5", "2 2 0.25", "2 6 0.75", "3 1 1.0"]
    ),
    "docs/concepts/records.md#0": Expected(
        tail=["24 24 True True"], files=["runs/same/config.yaml", "runs/same/diagnostic.jsonl"]
    ),
    "docs/guides/fsdp.md#0": Expected(
        tail=["11 ['0.bias', '0.weight', '2.bias', '2.weight', '4.bias', '4.weight']"],
        files=[
            "runs/demo/checkpoints/run.json",
            "runs/demo/checkpoints/step-000000011.json",
            "runs/demo/checkpoints/step-000000011.pt",
            "runs/demo/config.yaml",
            "runs/demo/diagnostic.jsonl",
        ],
    ),
    "docs/guides/own-model.md#0": Expected(
        tail=["completed 4"],
        events=["run.start", "train.epoch", "train.epoch", "run.end"],
        files=["checkpoints/model_4.pt", "runs/linear/config.yaml", "runs/linear/diagnostic.jsonl"],
    ),
    "docs/guides/own-model.md#1": Expected(tail=["[(1, 104), (2, 96)]"]),
    "docs/guides/own-model.md#2": Expected(tail=["[(1, 21), (2, 29)]"]),
    "docs/guides/own-model.md#3": Expected(tail=["completed stopped by EarlyStopping (patience 2)"]),
    "docs/guides/own-model.md#4": Expected(
        tail=["[(1, 0.3958), (2, 0.6042), (3, 0.8125), (4, 0.875)]", "[(2, 0.6777), (4, 0.8542)]"]
    ),
    "docs/guides/own-model.md#5": Expected(tail=["[0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01, 0.01, 0.01]"]),
    "docs/guides/writing-a-sink.md#0": Expected(tail=["[6, 6, 6]"]),
}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINTEL__")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a module imported from the directory leaves no __pycache__
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` is this one
    return env


def _event(line: str) -> str:
    """The ``event`` of one JSON line, parsed strictly (no NaN literals, no duplicate keys)."""
    value = parse_line(line)
    assert isinstance(value, dict), line
    return str(value["event"])


def _files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def test_every_python_block_has_its_expectation() -> None:
    assert sorted(_blocks("python")) == sorted(EXPECTED)


@pytest.mark.parametrize("block", sorted(EXPECTED))
def test_python_block_runs(tmp_path: Path, block: str) -> None:
    expected = EXPECTED[block]
    proc = run_child(
        [sys.executable, "-c", _blocks("python")[block]],
        cwd=tmp_path,
        env=_env(),
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    json_lines = lines[: len(lines) - len(expected.tail)]
    assert lines[len(json_lines) :] == expected.tail
    assert [_event(line) for line in json_lines] == expected.events
    assert _files(tmp_path) == expected.files


def test_the_task_factory_example_trains(tmp_path: Path) -> None:
    """The README's ``mytask.py``, trained by its command line; port 0 keeps 9400 free for others."""
    text = README.read_text(encoding="utf-8")
    (module,) = [code for code in _blocks("python").values() if code.startswith("# mytask.py\n")]
    (tmp_path / "mytask.py").write_text(module, encoding="utf-8")
    (command,) = [
        c for c in re.findall(r"^```sh\n(.*?)^```$", text, flags=re.DOTALL | re.M) if "mytask:" in c
    ]
    proc = subprocess.run(
        ["bash", "-c", command],
        cwd=tmp_path,
        env={**_env(), "TRAINTEL__SINKS__PROMETHEUS__PORT": "0"},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [parse_line(line) for line in proc.stdout.splitlines()]
    assert [line["event"] for line in lines] == ["run.start", *_EPOCH * 3, "run.end"]
    assert lines[0]["config"]["task"] == {"factory": "mytask:make_task", "params": {"hidden": 64}}
    end = {k: v for k, v in lines[-1].items() if k not in ("timestamp", "run_id", "duration_seconds")}
    assert end == {
        "level": "info",
        "event": "run.end",
        "schema_version": "1.5.0",
        "rank": 0,
        "world_size": 1,
        "attempt": 0,
        "status": "completed",
        "reason": "max_epochs",
        "epoch": 3,
        "step": 9,
        "items_total": 480,
    }
    assert _files(tmp_path) == ["mytask.py", "runs/mytask/config.yaml", "runs/mytask/diagnostic.jsonl"]


def test_the_only_py_block_is_the_sink_listing() -> None:
    """```py marks code that is shown, not run: only the listing, which the example module runs."""
    assert sorted(_blocks("py")) == ["docs/guides/writing-a-sink.md#0"]


def test_the_sink_listing_is_the_example_module() -> None:
    text = SINK_GUIDE.read_text(encoding="utf-8")
    listing = text.split("Its whole module:\n\n```py\n", 1)[1].split("```", 1)[0]
    example = (ROOT / "examples" / "csv-sink" / "traintel_csv_sink.py").read_text(encoding="utf-8")
    assert listing == example
    assert len(example.splitlines()) == 35
