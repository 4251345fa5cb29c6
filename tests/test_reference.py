"""The documentation site: its reference pages are generated from the code (``traintel.reference``),
each matches its source, and ``mkdocs build --strict`` passes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pytest
from pydantic import BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo

import traintel
from tests.helpers.paths import ROOT
from traintel import errors, reference
from traintel.config.model import Config, RunConfig
from traintel.schema import load_schema

NAV_REFERENCE = [
    "reference/config.md",
    "reference/records.md",
    "reference/metrics.md",
    "reference/cli.md",
    "reference/exit-statuses.md",
    "reference/api.md",
]


def _cells(line: str) -> list[str]:
    """A Markdown table row's cells: split at the pipes outside code spans that are not escaped."""
    cells: list[str] = []
    cell, code, i = "", False, 0
    body = line.strip()[1:-1]
    while i < len(body):
        char = body[i]
        if char == "\\" and not code:
            cell += body[i : i + 2]
            i += 2
            continue
        if char == "`":
            code = not code
        if char == "|" and not code:
            cells.append(cell.strip())
            cell = ""
        else:
            cell += char
        i += 1
    return [*cells, cell.strip()]


def _tables(page: str) -> dict[str, list[list[str]]]:
    """Each heading's table rows (the header row left out), by heading text."""
    tables: dict[str, list[list[str]]] = {}
    heading = ""
    lines = page.splitlines()
    for number, line in enumerate(lines):
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
            tables[heading] = []
        elif line.startswith("| ") and not "".join(lines[number + 1 : number + 2]).startswith("|---"):
            tables[heading].append(_cells(line))
    return tables


def _rows(page: str) -> list[list[str]]:
    return [row for rows in _tables(page).values() for row in rows]


# --- configuration ------------------------------------------------------------------------------


def _flatten(tp: Any) -> Iterator[Any]:
    if get_origin(tp) in (Annotated, Union, types.UnionType):
        for arg in get_args(tp):
            yield from _flatten(arg)
    else:
        yield tp


def _settings(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """Every setting's dotted key: a section's keys under it, a list's entries under ``key[]``, each
    model of a union (the scheduler) under the key itself."""
    for name, info in model.model_fields.items():
        key = f"{prefix}.{info.alias or name}" if prefix else (info.alias or name)
        models = [t for t in _flatten(info.annotation) if isinstance(t, type) and issubclass(t, BaseModel)]
        if get_origin(info.annotation) is list:
            yield key, info
            entry = get_args(info.annotation)[0]
            if isinstance(entry, type) and issubclass(entry, BaseModel):
                yield from _settings(entry, f"{key}[]")
        elif len(models) == 1:
            yield from _settings(models[0], key)
        else:
            yield key, info
            for member in models:
                yield from _settings(member, key)


def _shown_default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value = info.default_factory() if info.default_factory is not None else info.default  # type: ignore[call-arg]
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f"`{value}`"
    if isinstance(value, dict | list):
        assert not value, value
        return "`{}`" if isinstance(value, dict) else "`[]`"
    return f"`{value!r}`"


def test_the_config_page_lists_every_key_with_its_default() -> None:
    rows = _rows(reference.config_page())
    shown = sorted((row[0], row[2]) for row in rows)
    expected = sorted((f"`{key}`", _shown_default(info)) for key, info in _settings(Config))
    assert shown == expected
    assert len(rows) == 105
    by_key = {row[0]: row for row in rows}
    assert by_key["`run.seed`"] == [
        "`run.seed`", "integer", "`0`", ">= 0, <= 4294967295",
        "Seed for torch's global generators, set before the task factory runs.",
    ]  # fmt: skip
    assert by_key["`trainer.scheduler`"] == [
        "`trainer.scheduler`", "mapping or null", "`null`",
        "`name` one of `cosine`, `step`, `exponential`, `linear_warmup`, `warmup_cosine`, `onecycle`, "
        "`module:function` (below)",
        "Learning-rate scheduler, or null for a constant rate.",
    ]  # fmt: skip
    assert by_key["`sinks.json.queue_bytes`"][:4] == [
        "`sinks.json.queue_bytes`",
        "integer",
        "`16777216`",
        ">= 65536, <= 1073741824",
    ]
    assert by_key["`trainer.optimizer.name`"][4].startswith("A `torch.optim` optimizer (`adamw`, `sgd`")
    assert by_key["`sinks.prometheus.pushgateway.password`"][1] == "string (secret) or null"
    assert by_key["`sinks.extra[].name`"][3] == "matches `^[A-Za-z0-9_.-]+$`"


def test_the_config_page_documents_each_scheduler_under_its_name() -> None:
    tables = _tables(reference.config_page())
    assert [row[:3] for row in tables["`trainer.scheduler` with `name: step`"]] == [
        ["`trainer.scheduler.name`", "string", "required"],
        ["`trainer.scheduler.step_size`", "integer", "required"],
        ["`trainer.scheduler.gamma`", "number", "`0.1`"],
    ]
    assert [row[0] for row in tables["`trainer.scheduler` with `name: linear_warmup`"]] == [
        "`trainer.scheduler.name`",
        "`trainer.scheduler.warmup_steps`",
    ]


def test_a_field_s_docstring_is_its_description_on_the_page(monkeypatch: pytest.MonkeyPatch) -> None:
    info = RunConfig.model_fields["seed"]
    assert info.description == "Seed for torch's global generators, set before the task factory runs."
    monkeypatch.setattr(info, "description", "Seeds   every\n generator <once>.")
    row = {row[0]: row for row in _rows(reference.config_page())}["`run.seed`"]
    assert row[4] == "Seeds every generator &lt;once&gt;."


class _Retry(BaseModel):
    """How often to try."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    times: int = Field(default=3, ge=1, lt=10)
    """Tries in all, the first one included."""
    mode: Literal["fast", "slow"] = "fast"


class _Small(BaseModel):
    """A small settings model."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    retry: _Retry = Field(default_factory=_Retry)
    label: str | None = Field(default=None, min_length=2)
    """A name shown in ``reports``."""


def test_the_config_page_of_a_small_model() -> None:
    assert reference.config_page(_Small) == (
        "# Configuration\n\nA small settings model.\n\n"
        "Generated from the settings' models (`traintel.config.model`). Each key is set in the YAML file "
        "(`--config`), in the environment (`TRAINTEL__SECTION__KEY`) or with `--set section.key=value`, "
        "in that order of precedence; unknown keys are errors.\n\n"
        "## `retry`\n\nHow often to try.\n\n"
        "| key | type | default | allowed | meaning |\n|---|---|---|---|---|\n"
        "| `retry.times` | integer | `3` | >= 1, < 10 | Tries in all, the first one included. |\n"
        "| `retry.mode` | string | `fast` | one of `fast`, `slow` |  |\n\n"
        "| key | type | default | allowed | meaning |\n|---|---|---|---|---|\n"
        "| `label` | string or null | `null` | length >= 2 | A name shown in `reports`. |\n"
    )


# --- records, metrics, command line, exit statuses, API -----------------------------------------


def test_the_records_page_lists_every_field_of_every_record_in_the_schema() -> None:
    schema = load_schema()
    tables = _tables(reference.records_page())
    events = ["train.batch", "train.step", "train.epoch", "eval.epoch", "run.start", "run.end", "metric",
              "checkpoint", "sink.error"]  # fmt: skip
    assert [h for h in tables if h.startswith("`")] == [f"`{event}`" for event in events]
    for event in events:
        fields = [row[0] for row in tables[f"`{event}`"]]
        assert fields == [f"`{name}`" for name in schema["$defs"][event]["properties"]], event
    log = [row[0] for row in tables["Log lines (any other `event`)"]]
    assert log == [f"`{name}`" for name in schema["$defs"]["log"]["properties"]]
    start = {row[0]: row for row in tables["`run.start`"]}
    assert start["`attempt`"][2] == "yes, except on `1.0.0` and `1.1.0` lines"
    assert start["`backend`"][2] == "yes, except on `1.0.0` lines"
    assert start["`items_total`"][1:3] == ["integer, >= 0", "yes, except on `1.0.0` and `1.1.0` lines"]
    step = {row[0]: row for row in tables["`train.step`"]}
    assert step["`grad_scale`"][1:3] == [
        "number or null",
        "yes, except on `1.0.0`, `1.1.0` and `1.2.0` lines",
    ]
    evaluation = {row[0]: row for row in tables["`eval.epoch`"]}
    assert evaluation["`split`"][1:3] == [
        "string, length >= 1",
        "yes, except on `1.0.0`, `1.1.0` and `1.2.0` lines",
    ]
    batch = {row[0]: row for row in tables["`train.batch`"]}
    assert batch["`scale_ok`"][1:3] == ["boolean or null", "diagnostic file only"]
    assert batch["`level`"][1:3] == ["always `info`", "yes"]
    assert batch["`nonfinite`"][1] == (
        "object: keys `raw_loss`, `loss`, `loss_scale`, `expected_loss_scale`, `observed_loss_scale`, "
        "values `nan`, `inf`, `-inf`"
    )


def test_the_metrics_page_lists_the_exporter_s_families() -> None:
    tables = _tables(reference.metrics_page())
    own = tables["traintel's families"]
    assert [row[0] for row in own] == [
        "`traintel_run_info`", "`traintel_epoch`", "`traintel_optimizer_step`", "`traintel_batch_loss`",
        "`traintel_batch_raw_loss`", "`traintel_batch_loss_scale`", "`traintel_step_loss`",
        "`traintel_learning_rate`", "`traintel_grad_norm`", "`traintel_grad_scale`",
        "`traintel_step_timestamp_seconds`", "`traintel_train_metric`",
        "`traintel_epoch_loss`", "`traintel_epoch_items_per_second`", "`traintel_eval_loss`",
        "`traintel_eval_metric`", "`traintel_user_metric`", "`traintel_checkpoint_step`",
        "`traintel_checkpoint_size_bytes`", "`traintel_checkpoint_write_seconds`",
        "`traintel_checkpoint_stall_seconds`", "`traintel_checkpoint_timestamp_seconds`",
        "`traintel_run_success`", "`traintel_run_end_timestamp_seconds`", "`traintel_items_total`",
        "`traintel_sink_errors_total`", "`traintel_sink_dropped_records_total`",
        "`traintel_exporter_connections_closed_total`", "`traintel_exporter_open_connections`",
    ]  # fmt: skip
    rows = {row[0]: row for row in own}
    assert rows["`traintel_eval_metric`"][:3] == ["`traintel_eval_metric`", "gauge", "`name`, `split`"]
    assert rows["`traintel_train_metric`"][:3] == ["`traintel_train_metric`", "gauge", "`name`"]
    assert rows["`traintel_user_metric`"][:3] == ["`traintel_user_metric`", "gauge", "`name`"]
    assert rows["`traintel_run_info`"] == [
        "`traintel_run_info`", "info", "`run_id`, `name`", "yes", "The run this process trains (value is always 1).",
    ]  # fmt: skip
    assert rows["`traintel_exporter_connections_closed_total`"][1:4] == ["counter", "`reason`", "no"]
    assert rows["`traintel_sink_errors_total`"][1:4] == ["counter", "`sink`", "yes"]
    assert "`process_cpu_seconds_total`" in [row[0] for row in tables["Process metrics"]]
    page = reference.metrics_page()
    assert "every family also carries `rank`, and the push is grouped by it too." in page
    assert rows["`traintel_checkpoint_size_bytes`"][1:4] == ["gauge", "`reason`", "yes"]
    assert (
        "`traintel_exporter_connections_closed_total`'s `reason` is one of `limit`, `timeout`, `bad_request`, "
        "`tls`; a checkpoint family's is the `checkpoint` record's `reason` (`every_steps`, `every_epochs`, "
        "`signal`, `max_steps`, `best`)."
    ) in page


def test_the_cli_page_has_every_subcommand_s_help() -> None:
    page = reference.cli_page()
    headings = [line[3:] for line in page.splitlines() if line.startswith("## ")]
    assert headings == [
        "`traintel`", "`traintel train`", "`traintel config`", "`traintel config show`", "`traintel sinks`",
        "`traintel sinks list`", "`traintel report`", "`traintel-torchrun`",
    ]  # fmt: skip
    assert "usage: traintel train [-h] [--config PATH] [--set KEY=VALUE] [--resume RUN_DIR]\n" in page
    assert "usage: traintel report [-h] [--output PATH] RUN_DIR\n" in page


def test_the_exit_status_page_rows_are_the_exit_status_table() -> None:
    rows = _rows(reference.exit_statuses_page())
    expected = {
        code: " ".join(text.split()).replace("``", "`") for code, text in errors.EXIT_STATUSES.items()
    }
    assert {int(code): text for code, text in rows} == expected
    assert [int(code) for code, _ in rows] == [0, 1, 2, 129, 130, 143]
    constants = {v for name, v in vars(errors).items() if name.startswith("EXIT_") and isinstance(v, int)}
    assert constants == set(errors.EXIT_STATUSES)


def test_the_api_page_documents_every_exported_name_where_it_is_defined() -> None:
    page = reference.api_page()
    entries = [line[4:] for line in page.splitlines() if line.startswith("::: ")]
    names = [name for name in traintel.__all__ if name != "__version__"]
    assert sorted(entries[: len(names)]) == sorted(f"{traintel._EXPORTS[name]}.{name}" for name in names)
    assert entries[len(names) :] == ["traintel.testing", "traintel.schema"]
    assert "        - check_sink\n" in page
    assert "        - MemorySink\n" not in page  # documented once, under traintel.sinks.memory


# --- the site -----------------------------------------------------------------------------------


def _mkdocs(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
        cwd=config.parent, capture_output=True, text=True, timeout=240, check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip


@pytest.mark.slow
def test_mkdocs_build_strict_passes(tmp_path: Path) -> None:
    site = tmp_path / "site"
    done = _mkdocs(ROOT / "mkdocs.yml", site)
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stderr
    for page in NAV_REFERENCE:
        assert (site / page.removesuffix(".md") / "index.html").is_file(), page
    assert "traintel_items_total" in (site / "reference/metrics/index.html").read_text(encoding="utf-8")
    assert ":func:" not in (site / "reference/api/index.html").read_text(encoding="utf-8")
    assert not (site / "hooks.py").exists()
    for page in NAV_REFERENCE:
        assert not (ROOT / "docs" / page).exists(), f"docs/{page} is generated, never written by hand"


@pytest.mark.slow
def test_a_hand_written_reference_page_fails_the_build(tmp_path: Path) -> None:
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    (tmp_path / "docs" / "reference").mkdir(parents=True)
    shutil.copy(ROOT / "docs" / "hooks.py", tmp_path / "docs" / "hooks.py")
    (tmp_path / "docs" / "reference" / "config.md").write_text("# Configuration\n", encoding="utf-8")
    done = _mkdocs(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert done.returncode == 1
    assert (
        "docs/reference/config.md is generated from the code (traintel.reference): remove that file"
        in done.stderr
    )
