"""``traintel report RUN_DIR``: a PNG of fixed size and a stable summary from the diagnostic file.

Real short runs are reported through the CLI (one with a renamed, rotated diagnostic file
found through its config.yaml); hand-written diagnostic files cover rotated parts (oldest
first), the file name read from config.yaml, a truncated last line, scale-check failures,
non-finite values, the per-rank files of a torchrun job (``diagnostic.rank<r>.jsonl``: batch
records, scale checks, sink errors and drops from every rank, global values from rank 0's,
a gap in the ranks reported), metrics (eval metrics of two splits, train metrics and
``metric`` records, rank 0's only, in a third panel and a ``metrics:`` summary line) and the
bad-input table (exit 2, one exact stderr line, nothing written). The hand-written single-rank files are schema 1.0.0 lines (no rank, no world_size):
files of older runs stay readable.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
import sys
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers.children import probe_cli, run_child, run_cli
from tests.helpers.paths import ROOT
from traintel.cli.main import main
from traintel.cli.report import (
    FIGURE_SIZE_PX,
    LABEL_BATCH_LOSS,
    LABEL_EPOCH_LOSS,
    LABEL_EVAL_LOSS,
    LABEL_LR,
    LABEL_RAW_LOSS,
    LABEL_SCALE_FAILED,
    LABEL_STEP_LOSS,
    build_figure,
    eval_loss_label,
    load_run,
)
from traintel.config import load_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUN_ID = "hand-20251124T160000Z-abcdef"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the PNG signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", head[8:16])
    assert (length, kind) == (13, b"IHDR")
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def cli(*argv: str) -> int:
    """``traintel ARGV`` in process; argparse's own errors exit through SystemExit."""
    try:
        return main(list(argv))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else -1


def lines_by_label(fig: Any) -> dict[str, Any]:
    return {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}


def curves(ax: Any) -> dict[str, tuple[list[float], list[float]]]:
    """The (x, y) data of ``ax``'s labelled lines by label (not the epoch marks, ``_nolegend_``)."""
    return {
        line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
        for line in ax.get_lines()
        if not line.get_label().startswith("_")
    }


# --------------------------------------------------------------------------- hand-written runs


def rec(event: str, **fields: Any) -> dict[str, Any]:
    base = {"timestamp": "2025-11-24T16:00:00.250000Z", "level": "info", "event": event}
    return {**base, "run_id": RUN_ID, "schema_version": "1.0.0", **fields}


def synthetic_run(
    *, steps: int = 6, k: int = 2, per_epoch: int = 3, end: bool = True
) -> list[dict[str, Any]]:
    """run.start; per step k train.batch then train.step; train.epoch and eval.epoch every
    ``per_epoch`` steps; run.end. Items: 4 per micro-batch."""
    out = [rec("run.start", name="hand", run_dir="run", device="cpu", config={}, metrics_url=None)]
    for s in range(1, steps + 1):
        epoch = (s - 1) // per_epoch + 1
        for b in range(k):
            raw = 1.0 / s + b / 100
            out.append(
                rec(
                    "train.batch",
                    epoch=epoch,
                    batch=(s - 1) % per_epoch * k + b + 1,
                    batches=per_epoch * k,
                    step=s - 1,
                    items=4,
                    raw_loss=raw,
                    loss=raw / k,
                    loss_scale=1 / k,
                    window_size=k,
                    expected_loss_scale=1 / k,
                    observed_loss_scale=1 / k,
                    scale_ok=True,
                )
            )
        out.append(
            rec(
                "train.step",
                epoch=epoch,
                step=s,
                items=4 * k,
                items_total=4 * k * s,
                window_size=k,
                loss=1.0 / s + 0.005,
                lr=0.1 * (steps + 1 - s),
                grad_norm=None,
                skipped=False,
            )
        )
        if s % per_epoch == 0:
            common = {"epoch": epoch, "step": s, "batches": per_epoch * k, "duration_seconds": 1.0}
            out.append(
                rec(
                    "train.epoch",
                    **common,
                    loss=0.5 / epoch,
                    items=4 * k * per_epoch,
                    items_per_second=24.0,
                    items_total=4 * k * s,
                    steps=per_epoch,
                )
            )
            out.append(rec("eval.epoch", **common, loss=0.25 / epoch, items=8, items_per_second=8.0))
    if end:
        out.append(
            rec(
                "run.end",
                status="completed",
                reason="max_epochs",
                epoch=(steps - 1) // per_epoch + 1,
                step=steps,
                items_total=4 * k * steps,
                duration_seconds=2.0,
            )
        )
    return out


def jsonl(records: Sequence[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def expected_summary(
    report: Path,
    *,
    records: int = 24,
    files: int = 1,
    truncated: int = 0,
    scale: str = "0 failed  0 unchecked  12 batch records",
    status: str = "completed (max_epochs)",
    step_loss: str = "0.171667",
    ranks: str = "1 of 1 (0)",
    sink_errors: int = 0,
    dropped: int = 0,
    metrics: str | None = None,
) -> str:
    """The summary of ``synthetic_run()``: 6 steps, 2 epochs, 12 batches, 48 items; ``metrics``: the
    ``metrics:`` line's values, when it has one."""
    text = textwrap.dedent(
        f"""\
        run: {RUN_ID}
        status: {status}
        epochs: 2  steps: 6  items: 48
        final: step loss {step_loss}  epoch loss 0.25  eval loss 0.125
        scale check: {scale}
        records: {records}  files: {files}
        ranks: {ranks}
        sink errors: {sink_errors}
        dropped records: {dropped}
        truncated lines: {truncated}
        report: {report}
        """
    )
    if metrics is None:
        return text
    at = text.index("scale check:")
    return f"{text[:at]}metrics: {metrics}\n{text[at:]}"


def test_synthetic_run_summary_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "diagnostic.jsonl").write_text(jsonl(synthetic_run()), encoding="utf-8")

    assert cli("report", str(run)) == 0

    out, err = capsys.readouterr()
    assert err == ""
    assert out == expected_summary(run / "report.png")
    assert png_size(run / "report.png") == FIGURE_SIZE_PX == (1000, 800)
    assert sorted(p.name for p in run.iterdir()) == ["diagnostic.jsonl", "report.png"]


def test_rotated_parts_are_read_oldest_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    records = synthetic_run()
    # 11 parts: diagnostic.jsonl.10 (oldest) ... diagnostic.jsonl.1, diagnostic.jsonl (newest).
    # A lexicographic sort would read .10 between .1 and .2.
    chunks = [records[i * 2 : (i + 1) * 2] for i in range(10)] + [records[20:]]
    names = [f"diagnostic.jsonl.{n}" for n in range(10, 0, -1)] + ["diagnostic.jsonl"]
    for name, chunk in zip(names, chunks, strict=True):
        (run / name).write_text(jsonl(chunk), encoding="utf-8")
    # Not parts: ignored even though they hold garbage.
    (run / "diagnostic.jsonl.bak").write_text("garbage\ngarbage\n", encoding="utf-8")
    (run / "diagnostic.jsonl.01").write_text("garbage\ngarbage\n", encoding="utf-8")
    (run / "diagnostic.jsonl.tmp").write_text("garbage\ngarbage\n", encoding="utf-8")

    data = load_run(run)

    assert [p.name for p in data.parts] == names
    assert list(data.step_loss.x) == [1, 2, 3, 4, 5, 6]
    assert list(data.lr.y) == pytest.approx([0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    assert list(data.batch_loss.x) == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]
    assert list(data.epoch_loss.x) == [3, 6]
    assert data.run_id == RUN_ID

    output = tmp_path / "elsewhere.png"
    assert cli("report", str(run), "--output", str(output)) == 0
    assert capsys.readouterr().out == expected_summary(output, files=11)
    assert png_size(output) == FIGURE_SIZE_PX
    assert not (run / "report.png").exists()


def test_newest_part_may_be_missing_after_rotation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    records = synthetic_run()
    (run / "diagnostic.jsonl.2").write_text(jsonl(records[:10]), encoding="utf-8")
    (run / "diagnostic.jsonl.1").write_text(jsonl(records[10:]), encoding="utf-8")

    assert cli("report", str(run)) == 0
    assert capsys.readouterr().out == expected_summary(run / "report.png", files=2)


def test_truncated_last_line_is_skipped_and_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run killed with kill -9: no run.end and half a line at the end of the newest part."""
    run = tmp_path / "run"
    run.mkdir()
    records = synthetic_run(end=False)
    (run / "diagnostic.jsonl.1").write_text(jsonl(records[:15]), encoding="utf-8")
    half = json.dumps(rec("train.batch", epoch=3, batch=1, step=6, raw_loss=0.5))[:37]
    (run / "diagnostic.jsonl").write_text(jsonl(records[15:]) + half, encoding="utf-8")

    assert cli("report", str(run)) == 0

    out, err = capsys.readouterr()
    assert err == ""
    expected = expected_summary(
        run / "report.png",
        records=23,
        files=2,
        truncated=1,
        status="unfinished (no run.end record)",
    )
    assert out == expected
    assert png_size(run / "report.png") == FIGURE_SIZE_PX


def test_complete_last_line_without_newline_is_not_truncated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "diagnostic.jsonl").write_text(jsonl(synthetic_run()).rstrip("\n"), encoding="utf-8")

    assert cli("report", str(run)) == 0
    assert capsys.readouterr().out == expected_summary(run / "report.png")


def test_scale_check_failure_is_counted_and_marked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    records = synthetic_run()
    batches = [r for r in records if r["event"] == "train.batch"]
    failed = batches[4]  # step 2 -> its gradient goes into step 3
    failed.update(loss=failed["raw_loss"], observed_loss_scale=1.0, scale_ok=False)
    unchecked = batches[7]
    unchecked.update(raw_loss=None, observed_loss_scale=None, scale_ok=None, nonfinite={"raw_loss": "nan"})
    (run / "diagnostic.jsonl").write_text(jsonl(records), encoding="utf-8")

    assert cli("report", str(run)) == 0
    assert capsys.readouterr().out == expected_summary(
        run / "report.png", scale="1 failed  1 unchecked  12 batch records"
    )

    data = load_run(run)
    lines = lines_by_label(build_figure(data))
    marks = lines[f"{LABEL_SCALE_FAILED} (1)"]
    assert list(marks.get_xdata()) == [3]
    assert list(marks.get_ydata()) == [failed["raw_loss"]]
    assert (marks.get_marker(), marks.get_color()) == ("x", "red")
    raw = list(lines[LABEL_RAW_LOSS].get_ydata())
    assert math.isnan(raw[7])
    assert raw[:7] == [b["raw_loss"] for b in batches[:7]]


def test_nonfinite_values_are_read_back_and_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    records = synthetic_run()
    last_step = [r for r in records if r["event"] == "train.step"][-1]
    last_step.update(loss=None, nonfinite={"loss": "inf"})
    (run / "diagnostic.jsonl").write_text(jsonl(records), encoding="utf-8")

    assert cli("report", str(run)) == 0
    assert capsys.readouterr().out == expected_summary(run / "report.png", step_loss="inf")
    assert load_run(run).step_loss.y[-1] == math.inf


def test_dropped_counts_are_summed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each line's ``dropped`` counts the train.batch records dropped since the previous such line."""
    run = tmp_path / "run"
    run.mkdir()
    records = synthetic_run()
    steps = [r for r in records if r["event"] == "train.step"]
    steps[1]["dropped"], steps[4]["dropped"] = 3, 2
    (run / "diagnostic.jsonl").write_text(jsonl(records), encoding="utf-8")

    assert cli("report", str(run)) == 0
    assert capsys.readouterr().out == expected_summary(run / "report.png").replace(
        "dropped records: 0", "dropped records: 5"
    )


def test_existing_report_is_replaced_and_no_temporary_file_is_left(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "diagnostic.jsonl").write_text(jsonl(synthetic_run()), encoding="utf-8")
    (run / "report.png").write_bytes(b"old")

    assert cli("report", str(run)) == 0
    capsys.readouterr()

    assert png_size(run / "report.png") == FIGURE_SIZE_PX
    assert sorted(p.name for p in run.iterdir()) == ["diagnostic.jsonl", "report.png"]


def resolved_config(*overrides: str) -> str:
    """``config.yaml`` as a run writes it: the resolved config, redacted, as YAML."""
    config = load_config(None, overrides, environ={})
    return yaml.safe_dump(config.to_dict(redact=True), sort_keys=False)


def test_config_yaml_names_the_diagnostic_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(resolved_config("sinks.diagnostic.filename=diag.jsonl"))
    records = synthetic_run()
    names = ["diag.jsonl.2", "diag.jsonl.1", "diag.jsonl"]
    for name, chunk in zip(names, [records[:8], records[8:16], records[16:]], strict=True):
        (run / name).write_text(jsonl(chunk), encoding="utf-8")
    # The default name and its parts are not this run's files: never read.
    for decoy in ("diagnostic.jsonl", "diagnostic.jsonl.1", "diag.jsonl.bak"):
        (run / decoy).write_text("garbage\n", encoding="utf-8")

    assert [p.name for p in load_run(run).parts] == names
    assert cli("report", str(run)) == 0

    out, err = capsys.readouterr()
    assert (out, err) == (expected_summary(run / "report.png", files=3), "")
    assert png_size(run / "report.png") == FIGURE_SIZE_PX


@pytest.mark.parametrize(
    "config_yaml",
    [
        "",
        "run:\n  name: other\n",
        "sinks: null\n",
        "sinks:\n  diagnostic: null\n",
        "sinks:\n  diagnostic:\n    enabled: true\n",
        "__resolved__",
    ],
    ids=["empty", "no-sinks", "null-sinks", "null-diagnostic", "no-filename-key", "resolved-default"],
)
def test_without_the_key_the_default_name_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config_yaml: str
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    text = resolved_config() if config_yaml == "__resolved__" else config_yaml
    (run / "config.yaml").write_text(text, encoding="utf-8")
    (run / "diagnostic.jsonl.1").write_text(jsonl(synthetic_run()[:5]), encoding="utf-8")
    (run / "diagnostic.jsonl").write_text(jsonl(synthetic_run()[5:]), encoding="utf-8")

    assert cli("report", str(run)) == 0
    assert capsys.readouterr() == (expected_summary(run / "report.png", files=2), "")


def test_a_failed_write_is_a_one_line_error_and_keeps_the_old_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "diagnostic.jsonl").write_text(jsonl(synthetic_run()), encoding="utf-8")
    (run / "report.png").write_bytes(b"old")

    def replace(*_args: object) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr("traintel.sinks.io.atomic.os.replace", replace)
    code = cli("report", str(run))
    monkeypatch.undo()

    out, err = capsys.readouterr()
    assert (code, out, err) == (
        2,
        "",
        f"traintel: error: {run / 'report.png'}: cannot write: Invalid cross-device link\n",
    )
    assert (run / "report.png").read_bytes() == b"old"
    assert sorted(p.name for p in run.iterdir()) == ["diagnostic.jsonl", "report.png"]


def test_the_report_has_the_mode_of_the_run_s_other_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "diagnostic.jsonl").write_text(jsonl(synthetic_run()), encoding="utf-8")
    old = os.umask(0o027)
    try:
        assert cli("report", str(run)) == 0
    finally:
        os.umask(old)
    capsys.readouterr()
    assert stat.S_IMODE((run / "report.png").stat().st_mode) == 0o640  # not mkstemp's 0o600


# --------------------------------------------------------------------------- ranks (torchrun)


def ranked(records: Sequence[Mapping[str, Any]], rank: int, world_size: int) -> list[dict[str, Any]]:
    """``records`` as schema 1.1.0 lines of ``rank`` in a job of ``world_size`` (rank and
    world_size right after schema_version, as traintel writes them)."""
    out = []
    for r in records:
        head = {key: r[key] for key in ("timestamp", "level", "event", "run_id")}
        rest = {key: value for key, value in r.items() if key not in head and key != "schema_version"}
        out.append({**head, "schema_version": "1.1.0", "rank": rank, "world_size": world_size, **rest})
    return out


def worker_run(rank: int, world_size: int) -> list[dict[str, Any]]:
    """Rank ``rank``'s file: its own micro-batches (twice rank 0's losses) and other events whose
    values disagree with rank 0's (a failed run.end, step/epoch/eval losses of 99, a step's lr
    that is not a number): the report must read only the batch records from it."""
    out = ranked(synthetic_run(), rank, world_size)
    for r in out:
        if r["event"] == "train.batch":
            r.update(raw_loss=2 * r["raw_loss"], loss=2 * r["loss"])
        elif r["event"] in ("train.step", "train.epoch", "eval.epoch"):
            r.update(loss=99.0, step=r["step"] + 100, epoch=7)
        elif r["event"] == "run.end":
            r.update(level="error", status="failed", reason="RuntimeError: rank 1", step=1, items_total=3)
    next(r for r in out if r["event"] == "train.step").update(lr="fast")
    return out


def test_every_rank_s_file_is_read_global_values_from_rank_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "diagnostic.jsonl").write_text(jsonl(ranked(synthetic_run(), 0, 2)), encoding="utf-8")
    worker = worker_run(1, 2)
    batches = [r for r in worker if r["event"] == "train.batch"]
    failed = batches[4]  # step 2 -> its gradient goes into step 3
    failed.update(loss=failed["raw_loss"], observed_loss_scale=1.0, scale_ok=False)
    batches[9]["dropped"] = 2
    error = ranked([rec("sink.error", level="warning", sink="flaky", error="OSError: x")], 1, 2)
    (run / "diagnostic.rank1.jsonl.1").write_text(jsonl(worker[:10]), encoding="utf-8")
    (run / "diagnostic.rank1.jsonl").write_text(jsonl(worker[10:] + error), encoding="utf-8")

    assert cli("report", str(run)) == 0

    out, err = capsys.readouterr()
    assert err == ""
    assert out == expected_summary(
        run / "report.png",
        records=49,
        files=3,
        scale="1 failed  0 unchecked  24 batch records",
        ranks="2 of 2 (0, 1)",
        sink_errors=1,
        dropped=2,
    )
    assert png_size(run / "report.png") == FIGURE_SIZE_PX

    data = load_run(run)
    assert [p.name for p in data.parts] == [
        "diagnostic.jsonl",
        "diagnostic.rank1.jsonl.1",
        "diagnostic.rank1.jsonl",
    ]
    assert (data.ranks, data.world_size, data.run_id) == ([0, 1], 2, RUN_ID)
    steps = [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]
    assert list(data.batch_loss.x) == steps + steps
    assert list(data.batch_loss.y[12:]) == [b["loss"] for b in batches]
    assert list(data.step_loss.x) == [1, 2, 3, 4, 5, 6]
    assert (list(data.epoch_loss.y), list(data.eval_loss.y)) == ([0.5, 0.25], [0.25, 0.125])
    lines = lines_by_label(build_figure(data))
    assert len(lines[LABEL_BATCH_LOSS].get_xdata()) == 24
    marks = lines[f"{LABEL_SCALE_FAILED} (1)"]
    assert (list(marks.get_xdata()), list(marks.get_ydata())) == ([3], [failed["raw_loss"]])


def test_a_torn_last_line_is_tolerated_in_every_rank_s_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """kill -9 of a two-rank job: each process may leave half a line at the end of its newest part."""
    run = tmp_path / "run"
    run.mkdir()
    half = json.dumps(ranked([rec("train.batch", epoch=3, batch=1, step=6, raw_loss=0.5)], 0, 2)[0])[:37]
    (run / "diagnostic.jsonl").write_text(
        jsonl(ranked(synthetic_run(end=False), 0, 2)) + half, encoding="utf-8"
    )
    worker = worker_run(1, 2)[:-1]  # no run.end either
    (run / "diagnostic.rank1.jsonl.1").write_text(jsonl(worker[:10]), encoding="utf-8")
    (run / "diagnostic.rank1.jsonl").write_text(
        jsonl(worker[10:]) + half.replace('"rank": 0', '"rank": 1'), encoding="utf-8"
    )

    assert cli("report", str(run)) == 0

    out, err = capsys.readouterr()
    assert err == ""
    assert out == expected_summary(
        run / "report.png",
        records=46,
        files=3,
        truncated=2,
        status="unfinished (no run.end record)",
        scale="0 failed  0 unchecked  24 batch records",
        ranks="2 of 2 (0, 1)",
    )


def test_a_missing_rank_is_reported_not_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Ranks 0 and 2 of 3: what is there is read, the summary names the rank missing. Names that
    are no rank's file (rank 0 spelled out, a non-canonical rank or part number) are ignored."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "diagnostic.jsonl").write_text(jsonl(ranked(synthetic_run(), 0, 3)), encoding="utf-8")
    (run / "diagnostic.rank2.jsonl").write_text(jsonl(worker_run(2, 3)), encoding="utf-8")
    for decoy in (
        "diagnostic.rank0.jsonl",
        "diagnostic.rank01.jsonl",
        "diagnostic.rank1.jsonl.01",
        "diagnostic.rank1.jsonl.bak",
        "diagnostic.rank1.json",
        "diagnostic.rankx.jsonl",
        "diagnostic.jsonl.rank1",
    ):
        (run / decoy).write_text("garbage\n", encoding="utf-8")

    assert cli("report", str(run)) == 0

    out, err = capsys.readouterr()
    assert err == ""
    assert out == expected_summary(
        run / "report.png",
        records=48,
        files=2,
        scale="0 failed  0 unchecked  24 batch records",
        ranks="2 of 3 (0, 2; missing 1)",
    )
    assert [p.name for p in load_run(run).parts] == ["diagnostic.jsonl", "diagnostic.rank2.jsonl"]


def test_rank_files_of_a_renamed_diagnostic_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``sinks.diagnostic.filename=diag.jsonl``: rank 1 writes diag.rank1.jsonl; the default name's
    rank files are not this run's."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(resolved_config("sinks.diagnostic.filename=diag.jsonl"))
    (run / "diag.jsonl").write_text(jsonl(ranked(synthetic_run(), 0, 2)), encoding="utf-8")
    (run / "diag.rank1.jsonl").write_text(jsonl(worker_run(1, 2)), encoding="utf-8")
    for decoy in ("diagnostic.jsonl", "diagnostic.rank1.jsonl", "diag.jsonl.rank1"):
        (run / decoy).write_text("garbage\n", encoding="utf-8")

    assert cli("report", str(run)) == 0

    assert capsys.readouterr() == (
        expected_summary(
            run / "report.png",
            records=48,
            files=2,
            scale="0 failed  0 unchecked  24 batch records",
            ranks="2 of 2 (0, 1)",
        ),
        "",
    )


def test_many_ranks_are_listed_as_spans(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "diagnostic.jsonl").write_text(jsonl(ranked(synthetic_run(), 0, 12)), encoding="utf-8")
    for rank in (1, 2, 3, 5, 6, 9):
        batch = [r for r in worker_run(rank, 12) if r["event"] == "train.batch"][:1]
        (run / f"diagnostic.rank{rank}.jsonl").write_text(jsonl(batch), encoding="utf-8")

    assert cli("report", str(run)) == 0
    assert capsys.readouterr().out == expected_summary(
        run / "report.png",
        records=30,
        files=7,
        scale="0 failed  0 unchecked  18 batch records",
        ranks="7 of 12 (0-3, 5, 6, 9; missing 4, 7, 8, 10, 11)",
    )


# --------------------------------------------------------------------------- metrics


def metrics_run() -> list[dict[str, Any]]:
    """``synthetic_run()`` with metrics: ``acc`` = step / 8 on every train.step; eval.epoch of split
    ``val`` with ``accuracy`` and ``mae``, each after one of split ``test`` (loss 1.5 times val's,
    ``accuracy``); ``metric`` records after steps 2 (``ppl`` 512, an integer) and 5 (``ppl`` 256.5,
    ``temp`` 1)."""
    val = {1: {"accuracy": 0.75, "mae": 0.5}, 2: {"accuracy": 0.875, "mae": 0.25}}
    test = {1: {"accuracy": 0.625}, 2: {"accuracy": 0.8125}}
    user = {2: {"ppl": 512}, 5: {"ppl": 256.5, "temp": 1}}
    out: list[dict[str, Any]] = []
    for r in synthetic_run():
        if r["event"] == "train.step":
            r["metrics"] = {"acc": r["step"] / 8}
        elif r["event"] == "eval.epoch":
            epoch = r["epoch"]
            out.append({**r, "loss": 1.5 * r["loss"], "split": "test", "metrics": test[epoch]})
            r.update(split="val", metrics=val[epoch])
        out.append(r)
        if r["event"] == "train.step" and r["step"] in user:
            out.append(rec("metric", epoch=r["epoch"], step=r["step"], metrics=user[r["step"]]))
    return out


METRICS_SUMMARY = "eval.accuracy=0.875  eval.mae=0.25  eval.test.accuracy=0.8125  train.acc=0.75  user.ppl=256.5  user.temp=1"


def test_metrics_are_plotted_in_a_third_panel_and_summarised(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "diagnostic.jsonl").write_text(jsonl(metrics_run()), encoding="utf-8")

    assert cli("report", str(run)) == 0

    out, err = capsys.readouterr()
    assert err == ""
    assert out == expected_summary(run / "report.png", records=28, metrics=METRICS_SUMMARY)
    assert out.splitlines()[4] == f"metrics: {METRICS_SUMMARY}"
    assert png_size(run / "report.png") == FIGURE_SIZE_PX

    fig = build_figure(load_run(run))
    loss_ax, lr_ax, metrics_ax = fig.axes
    expected = {
        "eval.accuracy": ([3, 6], [0.75, 0.875]),
        "eval.mae": ([3, 6], [0.5, 0.25]),
        "eval.test.accuracy": ([3, 6], [0.625, 0.8125]),
        "train.acc": ([1, 2, 3, 4, 5, 6], [0.125, 0.25, 0.375, 0.5, 0.625, 0.75]),
        "user.ppl": ([2, 5], [512.0, 256.5]),
        "user.temp": ([5], [1.0]),
    }
    assert curves(metrics_ax) == expected
    legend = metrics_ax.get_legend()
    assert legend is not None
    assert [t.get_text() for t in legend.get_texts()] == list(expected)
    # 0.125 to 512: more than METRICS_LOG_RATIO apart, so a log axis shows both.
    assert metrics_ax.get_yscale() == "log"
    assert (metrics_ax.get_xlabel(), lr_ax.get_xlabel()) == ("optimizer step", "")

    # Every split's eval loss has its own line; the summary's eval loss is the last record's (val).
    losses = curves(loss_ax)
    assert eval_loss_label("test") == f"{LABEL_EVAL_LOSS} (test)"
    assert losses[LABEL_EVAL_LOSS] == ([3, 6], [0.25, 0.125])
    assert losses[eval_loss_label("test")] == ([3, 6], [0.375, 0.1875])


def test_a_nonfinite_metric_reads_back_as_nonfinite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A null named in ``nonfinite`` by its dotted key is that value; one named nowhere is nan."""
    run = tmp_path / "run"
    run.mkdir()
    records = metrics_run()
    last_step = [r for r in records if r["event"] == "train.step"][-1]
    last_step.update(loss=None, metrics={"acc": None}, nonfinite={"loss": "inf", "metrics.acc": "inf"})
    last_val = [r for r in records if r["event"] == "eval.epoch"][-1]
    last_val.update(metrics={"accuracy": None, "mae": 0.25}, nonfinite={"metrics.accuracy": "nan"})
    last_user = [r for r in records if r["event"] == "metric"][-1]
    last_user.update(metrics={"ppl": None, "temp": None}, nonfinite={"metrics.temp": "-inf"})
    (run / "diagnostic.jsonl").write_text(jsonl(records), encoding="utf-8")

    assert cli("report", str(run)) == 0

    metrics = "eval.accuracy=nan  eval.mae=0.25  eval.test.accuracy=0.8125  train.acc=inf  user.ppl=nan"
    assert capsys.readouterr() == (
        expected_summary(
            run / "report.png", records=28, step_loss="inf", metrics=f"{metrics}  user.temp=-inf"
        ),
        "",
    )
    data = load_run(run)
    assert math.isnan(data.metrics["eval.accuracy"].y[-1])
    assert math.isnan(data.metrics["user.ppl"].y[-1])
    assert (data.metrics["train.acc"].y[-1], data.metrics["user.temp"].y[-1]) == (math.inf, -math.inf)
    assert data.step_loss.y[-1] == math.inf
    # The finite values, 0.125 to 512 still, keep the log axis; non-finite ones are left out of it.
    assert build_figure(data).axes[2].get_yscale() == "log"


def test_metrics_of_one_scale_keep_a_linear_axis(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    records = [r for r in metrics_run() if r["event"] != "metric"]
    (run / "diagnostic.jsonl").write_text(jsonl(records), encoding="utf-8")

    metrics_ax = build_figure(load_run(run)).axes[2]
    assert metrics_ax.get_yscale() == "linear"
    assert list(curves(metrics_ax)) == ["eval.accuracy", "eval.mae", "eval.test.accuracy", "train.acc"]


@pytest.mark.parametrize("empty", [False, True], ids=["no-metrics-keys", "empty-metrics"])
def test_a_run_without_metric_values_keeps_the_two_panel_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], empty: bool
) -> None:
    """Lines from before metrics (no ``metrics`` key, no ``split``), and lines whose ``metrics`` are
    all ``{}``, give the same summary (no ``metrics:`` line) and the same two-panel PNG."""
    old = tmp_path / "old"
    old.mkdir()
    (old / "diagnostic.jsonl").write_text(jsonl(synthetic_run()), encoding="utf-8")
    run = tmp_path / "run"
    run.mkdir()
    records = synthetic_run()
    if empty:
        for r in records:
            if r["event"] in ("train.step", "eval.epoch"):
                r["metrics"] = {}
            if r["event"] == "eval.epoch":
                r["split"] = "val"
        records.insert(5, rec("metric", epoch=1, step=1, metrics={}))
    (run / "diagnostic.jsonl").write_text(jsonl(records), encoding="utf-8")

    assert cli("report", str(old)) == 0
    capsys.readouterr()
    assert cli("report", str(run)) == 0

    out, err = capsys.readouterr()
    assert (out, err) == (expected_summary(run / "report.png", records=25 if empty else 24), "")
    assert "metrics:" not in out
    assert (run / "report.png").read_bytes() == (old / "report.png").read_bytes()
    assert png_size(run / "report.png") == FIGURE_SIZE_PX
    data = load_run(run)
    assert data.metrics == {}
    fig = build_figure(data)
    assert len(fig.axes) == 2
    assert fig.axes[1].get_xlabel() == "optimizer step"
    assert {label for ax in fig.axes for label in curves(ax)} == {
        LABEL_BATCH_LOSS,
        LABEL_RAW_LOSS,
        LABEL_STEP_LOSS,
        LABEL_EPOCH_LOSS,
        LABEL_EVAL_LOSS,
        LABEL_LR,
    }


def test_metric_records_are_read_from_rank_0_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Rank 1's ``metric`` records and train.step metrics are counted, neither read nor checked."""
    run = tmp_path / "run"
    run.mkdir()
    rank0 = ranked(synthetic_run(), 0, 2)
    rank0.insert(8, ranked([rec("metric", epoch=1, step=2, metrics={"ppl": 512.0})], 0, 2)[0])
    worker = worker_run(1, 2)
    for r in worker:
        if r["event"] == "train.step":
            r["metrics"] = {"acc": 0.5}
    extra = [
        rec("metric", epoch=1, step=2, metrics={"ppl": 1.0}),
        rec("metric", epoch=2, step=5, metrics={"ppl": 2.0, "other": 3.0}),
        rec("metric", epoch=2, step=6, metrics="not an object"),
    ]
    (run / "diagnostic.jsonl").write_text(jsonl(rank0), encoding="utf-8")
    (run / "diagnostic.rank1.jsonl").write_text(jsonl(worker + ranked(extra, 1, 2)), encoding="utf-8")

    assert cli("report", str(run)) == 0

    assert capsys.readouterr() == (
        expected_summary(
            run / "report.png",
            records=52,
            files=2,
            scale="0 failed  0 unchecked  24 batch records",
            ranks="2 of 2 (0, 1)",
            metrics="user.ppl=512",
        ),
        "",
    )
    data = load_run(run)
    assert list(data.metrics) == ["user.ppl"]
    assert (list(data.metrics["user.ppl"].x), list(data.metrics["user.ppl"].y)) == ([2], [512.0])


def test_metric_names_splits_and_values_at_their_bounds_are_read(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    names = {"_": 1, "x" * 64: 2.5, "Top_1": -3, "huge": 10**400, "tiny": -(10**400)}
    records = [
        *synthetic_run()[:3],
        rec("metric", epoch=1, step=1, metrics=names),
        rec("eval.epoch", epoch=1, step=1, loss=0.5, split="a" * 64, metrics={"m": 0.5}),
        rec("eval.epoch", epoch=1, step=1, loss=0.5, split="hold-out.v_2", metrics={"m": 0.25}),
    ]
    (run / "diagnostic.jsonl").write_text(jsonl(records), encoding="utf-8")

    data = load_run(run)
    assert {name: list(series.y) for name, series in data.metrics.items()} == {
        "user._": [1.0],
        f"user.{'x' * 64}": [2.5],
        "user.Top_1": [-3.0],
        "user.huge": [math.inf],  # an integer past float's range reads as 1e400 does
        "user.tiny": [-math.inf],
        f"eval.{'a' * 64}.m": [0.5],
        "eval.hold-out.v_2.m": [0.25],
    }
    assert list(data.split_loss) == ["a" * 64, "hold-out.v_2"]


# --------------------------------------------------------------------------- bad input

GOOD = jsonl(synthetic_run()[:3])
GOOD_RANK1 = jsonl(ranked(synthetic_run()[:3], 1, 2))
_STEP = rec("train.step", epoch=1, step=1, items=8, items_total=8, window_size=2, loss=0.5, lr=0.1)


@dataclass(frozen=True)
class BadInput:
    argv: Sequence[str]
    error: str
    """The exact stderr line after ``traintel: error: ``."""
    files: Mapping[str, str | bytes] = field(default_factory=dict)


_EVAL = rec("eval.epoch", epoch=1, step=1, loss=0.5, split="val", metrics={"accuracy": 0.5})
_METRIC = rec("metric", epoch=1, step=1, metrics={"ppl": 2.5})
_NAME = "[A-Za-z_][A-Za-z0-9_]{0,63}"


def _bad_metrics(event: str, error: str, record: Mapping[str, Any], case_id: str) -> Any:
    """A good file but for its 4th line, ``record``: ``<event> <error>`` at that line."""
    files = {"run/diagnostic.jsonl": GOOD + jsonl([record])}
    return pytest.param(
        BadInput(["report", "run"], f"run/diagnostic.jsonl: line 4: {event} {error}", files), id=case_id
    )


BAD_METRICS = [
    _bad_metrics("train.step", 'field "metrics" is not an object', {**_STEP, "metrics": [0.5]}, "step-list"),
    _bad_metrics("metric", 'field "metrics" is not an object', {**_METRIC, "metrics": None}, "metric-null"),
    _bad_metrics("eval.epoch", 'field "metrics" is not an object', {**_EVAL, "metrics": 0.5}, "eval-number"),
    _bad_metrics(
        "eval.epoch",
        'field "metrics.accuracy" is not a number',
        {**_EVAL, "metrics": {"accuracy": "0.9"}},
        "value-a-string",
    ),
    _bad_metrics(
        "train.step",
        'field "metrics.acc" is not a number',
        {**_STEP, "metrics": {"acc": True}},
        "value-a-bool",
    ),
    _bad_metrics(
        "metric", 'field "metrics.ppl" is not a number', {**_METRIC, "metrics": {"ppl": [1]}}, "value-a-list"
    ),
    _bad_metrics(
        "metric",
        'field "metrics.ppl" is not a number',
        {**_METRIC, "metrics": {"ppl": {"mean": 1.0}}},
        "value-an-object",
    ),
    *(
        _bad_metrics(
            "metric",
            f'field "metrics" has a name that is not a metric name ({_NAME}): {json.dumps(name)}',
            {**_METRIC, "metrics": {"ok": 1.0, name: 1.0}},
            f"name-{case_id}",
        )
        for name, case_id in (
            ("1st", "leading-digit"),
            ("a.b", "dotted"),
            ("", "empty"),
            ("x" * 65, "too-long"),
            ("acc\n", "newline"),
            ("naïve", "not-ascii"),
        )
    ),
    _bad_metrics(
        "eval.epoch",
        f'field "metrics" has a name that is not a metric name ({_NAME}): "top-1"',
        {**_EVAL, "metrics": {"top-1": 0.5}},
        "name-eval",
    ),
    _bad_metrics("metric", 'field "step" is not an integer', {**_METRIC, "step": "2"}, "metric-step"),
    _bad_metrics(
        "eval.epoch",
        'field "split" is not a split name ([A-Za-z0-9_.-]{1,64}): 3',
        {**_EVAL, "split": 3},
        "split-a-number",
    ),
    _bad_metrics(
        "eval.epoch",
        'field "split" is not a split name ([A-Za-z0-9_.-]{1,64}): "$x$"',
        {**_EVAL, "split": "$x$"},
        "split-mathtext",
    ),
]
"""Metrics that are not an object of metric names to numbers or null, and splits that are not split
names: bad input in rank 0's stream (a rank r > 0's are not read)."""


BAD_INPUT = [
    pytest.param(BadInput(["report", "missing"], "missing: no such directory"), id="run-dir-missing"),
    pytest.param(
        BadInput(["report", "afile"], "afile: not a directory", {"afile": "x"}), id="run-dir-is-a-file"
    ),
    pytest.param(
        BadInput(["report", "run"], "run/diagnostic.jsonl: no such file", {"run/other.txt": ""}),
        id="no-diagnostic-file",
    ),
    pytest.param(
        BadInput(["report", "run"], "run/diagnostic.jsonl: no records", {"run/diagnostic.jsonl": ""}),
        id="empty-file",
    ),
    pytest.param(
        BadInput(
            ["report", "run"],
            "run/diagnostic.jsonl: no records",
            {"run/diagnostic.jsonl": '{"event": "run.st'},
        ),
        id="only-a-truncated-line",
    ),
    pytest.param(
        BadInput(
            ["report", "run"],
            "run/diagnostic.jsonl: line 4 is not valid JSON",
            {"run/diagnostic.jsonl": GOOD + "not json\n" + GOOD},
        ),
        id="bad-json-in-the-middle",
    ),
    pytest.param(
        BadInput(
            ["report", "run"],
            "run/diagnostic.jsonl: line 4 is not valid JSON",
            {"run/diagnostic.jsonl": GOOD.encode() + b"\xff\xfe\n" + GOOD.encode()},
        ),
        id="invalid-utf8-in-the-middle",
    ),
    pytest.param(
        BadInput(
            ["report", "run"],
            "run/diagnostic.jsonl.1: line 4 is not valid JSON",
            {"run/diagnostic.jsonl.1": GOOD + '{"event": "train.ba', "run/diagnostic.jsonl": GOOD},
        ),
        id="half-line-at-the-end-of-an-older-part",
    ),
    pytest.param(
        BadInput(
            ["report", "run"],
            'run/diagnostic.jsonl: line 1 is not a record (a JSON object with an "event" string)',
            {"run/diagnostic.jsonl": "[1, 2]\n" + GOOD},
        ),
        id="not-an-object",
    ),
    pytest.param(
        BadInput(
            ["report", "run"],
            'run/diagnostic.jsonl: line 4 is not a record (a JSON object with an "event" string)',
            {"run/diagnostic.jsonl": GOOD + '{"run_id": "x"}\n'},
        ),
        id="no-event",
    ),
    pytest.param(
        BadInput(
            ["report", "run"],
            'run/diagnostic.jsonl: line 2: train.step field "lr" is not a number',
            {"run/diagnostic.jsonl": GOOD[: GOOD.index("\n") + 1] + jsonl([{**_STEP, "lr": "fast"}])},
        ),
        id="field-not-a-number",
    ),
    pytest.param(
        BadInput(
            ["report", "run"],
            'run/diagnostic.jsonl: line 1: train.step field "step" is not an integer',
            {"run/diagnostic.jsonl": jsonl([{**_STEP, "step": 1.5}])},
        ),
        id="field-not-an-integer",
    ),
    pytest.param(
        BadInput(
            ["report", "run"],
            "run/diagnostic.jsonl: cannot read: Is a directory",
            {"run/diagnostic.jsonl/x": ""},
        ),
        id="diagnostic-file-is-a-directory",
    ),
    pytest.param(
        BadInput(
            ["report", "run", "--output", "nowhere/r.png"],
            "nowhere/r.png: its directory does not exist",
            {"run/diagnostic.jsonl": GOOD},
        ),
        id="output-directory-missing",
    ),
    pytest.param(
        BadInput(
            ["report", "run", "--output", "out"],
            "out: is a directory",
            {"run/diagnostic.jsonl": GOOD, "out/keep": ""},
        ),
        id="output-is-a-directory",
    ),
    pytest.param(
        BadInput(
            ["report", "run"],
            "run/config.yaml: is not valid YAML at line 3 (read for sinks.diagnostic.filename)",
            {
                "run/config.yaml": "sinks:\n  diagnostic: {filename: diag.jsonl\nrun: x\n",
                "run/diagnostic.jsonl": GOOD,
            },
        ),
        id="config-yaml-not-yaml",
    ),
    pytest.param(
        BadInput(
            ["report", "run"],
            "run/config.yaml: is not UTF-8 text (read for sinks.diagnostic.filename)",
            {"run/config.yaml": b"sinks: \xff\n", "run/diagnostic.jsonl": GOOD},
        ),
        id="config-yaml-not-utf8",
    ),
    pytest.param(
        BadInput(
            ["report", "run"],
            "run/config.yaml: is a list, not a mapping (read for sinks.diagnostic.filename)",
            {"run/config.yaml": "- sinks\n", "run/diagnostic.jsonl": GOOD},
        ),
        id="config-yaml-a-list",
    ),
    pytest.param(
        BadInput(
            ["report", "run"],
            "run/config.yaml: sinks.diagnostic is a string, not a mapping (read for sinks.diagnostic.filename)",
            {"run/config.yaml": "sinks:\n  diagnostic: diag.jsonl\n", "run/diagnostic.jsonl": GOOD},
        ),
        id="config-yaml-section-not-a-mapping",
    ),
    pytest.param(
        BadInput(
            ["report", "run"],
            "run/config.yaml: sinks.diagnostic.filename must be a file name"
            " (a non-empty string without / or \\), got 3",
            {"run/config.yaml": "sinks:\n  diagnostic:\n    filename: 3\n", "run/diagnostic.jsonl": GOOD},
        ),
        id="filename-a-number",
    ),
    pytest.param(
        BadInput(
            ["report", "run"],
            "run/config.yaml: sinks.diagnostic.filename must be a file name"
            " (a non-empty string without / or \\), got null",
            {"run/config.yaml": "sinks:\n  diagnostic:\n    filename: null\n", "run/diagnostic.jsonl": GOOD},
        ),
        id="filename-null",
    ),
    pytest.param(
        BadInput(
            ["report", "run"],
            "run/config.yaml: sinks.diagnostic.filename must be a file name"
            ' (a non-empty string without / or \\), got "../diag.jsonl"',
            {"run/config.yaml": "sinks:\n  diagnostic:\n    filename: ../diag.jsonl\n", "diag.jsonl": GOOD},
        ),
        id="filename-a-path",
    ),
    pytest.param(
        BadInput(
            ["report", "run"],
            "run/config.yaml: cannot read: Is a directory",
            {"run/config.yaml/x": "", "run/diagnostic.jsonl": GOOD},
        ),
        id="config-yaml-a-directory",
    ),
    pytest.param(
        BadInput(
            ["report", "run"],
            "run/diag.jsonl: no such file",
            {
                "run/config.yaml": resolved_config("sinks.diagnostic.filename=diag.jsonl"),
                "run/diagnostic.jsonl": GOOD,
            },
        ),
        id="named-file-missing",
    ),
    pytest.param(
        BadInput(
            ["report", "run"],
            "run/diagnostic.jsonl: no such file",
            {"run/diagnostic.rank1.jsonl": GOOD_RANK1},
        ),
        id="rank-0-file-missing",
    ),
    pytest.param(
        BadInput(
            ["report", "run"],
            "run/diagnostic.jsonl: no records",
            {"run/diagnostic.jsonl": "", "run/diagnostic.rank1.jsonl": GOOD_RANK1},
        ),
        id="rank-0-file-empty",
    ),
    pytest.param(
        BadInput(
            ["report", "run"],
            "run/diagnostic.rank1.jsonl: line 4 is not valid JSON",
            {
                "run/diagnostic.jsonl": GOOD,
                "run/diagnostic.rank1.jsonl": GOOD_RANK1 + "not json\n" + GOOD_RANK1,
            },
        ),
        id="bad-json-in-a-rank-file",
    ),
    pytest.param(
        BadInput(
            ["report", "run"],
            "run/diagnostic.rank1.jsonl.1: line 4 is not valid JSON",
            {
                "run/diagnostic.jsonl": GOOD,
                "run/diagnostic.rank1.jsonl.1": GOOD_RANK1 + '{"event": "train.ba',
                "run/diagnostic.rank1.jsonl": GOOD_RANK1,
            },
        ),
        id="half-line-at-the-end-of-an-older-rank-part",
    ),
    pytest.param(
        BadInput(
            ["report", "run"],
            'run/diagnostic.rank1.jsonl: line 2: train.batch field "loss" is not a number',
            {
                "run/diagnostic.jsonl": GOOD,
                "run/diagnostic.rank1.jsonl": GOOD_RANK1.replace('"loss": 0.5', '"loss": "0.5"'),
            },
        ),
        id="rank-file-batch-field-not-a-number",
    ),
    *BAD_METRICS,
    pytest.param(BadInput(["report"], "the following arguments are required: RUN_DIR"), id="no-run-dir"),
    pytest.param(
        BadInput(["report", "run", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        id="unknown-option",
    ),
]


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))
    }


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], case: BadInput
) -> None:
    for name, content in case.files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    before = _snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)

    code = cli(*case.argv)

    out, err = capsys.readouterr()
    assert (code, out, err) == (2, "", f"traintel: error: {case.error}\n")
    assert _snapshot(tmp_path) == before


# --------------------------------------------------------------------------- subprocess, imports


def test_import_is_light(tmp_path: Path) -> None:
    code = "import sys, traintel.cli.report; print('torch' in sys.modules, 'matplotlib' in sys.modules)"
    proc = run_child([sys.executable, "-c", code], tmp_path, fresh=True)
    assert (proc.returncode, proc.stdout) == (0, "False False\n"), proc.stderr


def test_report_subprocess_does_not_import_torch(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "diagnostic.jsonl").write_text(jsonl(synthetic_run()), encoding="utf-8")

    ok = probe_cli(tmp_path, "report", "run")
    assert (ok.returncode, ok.stderr) == (0, "0 False\n")
    assert ok.stdout == expected_summary(Path("run/report.png"))

    bad = probe_cli(tmp_path, "report", "missing")
    assert (bad.returncode, bad.stdout) == (0, "")
    assert bad.stderr == "traintel: error: missing: no such directory\n2 False\n"


# --------------------------------------------------------------------------- a real run


@pytest.mark.slow
def test_report_of_a_real_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = str(ROOT / "configs" / "default.yaml")
    train = run_cli(tmp_path, "train", "--config", config, "--set", f"run.dir={run}",
                    "--set", "trainer.max_epochs=2", "--set", "sinks.prometheus.port=0")  # fmt: skip
    assert train.returncode == 0, train.stderr

    proc = run_cli(tmp_path, "report", str(run))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""

    records = [
        json.loads(line) for line in (run / "diagnostic.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    by_event: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_event.setdefault(r["event"], []).append(r)
    (end,) = by_event["run.end"]
    batches, steps = by_event["train.batch"], by_event["train.step"]
    epochs, evals = by_event["train.epoch"], by_event["eval.epoch"]
    # The demo config: 32 micro-batches of 32 (the last 8) per epoch, k=3 -> 11 steps, every=1.
    assert (end["status"], end["reason"], end["epoch"], end["step"], end["items_total"]) == (
        "completed",
        "max_epochs",
        2,
        22,
        2000,
    )
    assert (len(batches), len(steps), len(epochs), len(evals)) == (64, 22, 2, 2)
    failed = sum(b["scale_ok"] is False for b in batches)
    unchecked = sum(b.get("scale_ok") is None for b in batches)
    assert failed == 0

    assert proc.stdout.splitlines() == [
        f"run: {records[0]['run_id']}",
        "status: completed (max_epochs)",
        "epochs: 2  steps: 22  items: 2000",
        f"final: step loss {steps[-1]['loss']:.6g}  epoch loss {epochs[-1]['loss']:.6g}"
        f"  eval loss {evals[-1]['loss']:.6g}",
        f"scale check: {failed} failed  {unchecked} unchecked  {len(batches)} batch records",
        f"records: {len(records)}  files: 1",
        "ranks: 1 of 1 (0)",
        f"sink errors: {len(by_event.get('sink.error', []))}",
        "dropped records: 0",
        "truncated lines: 0",
        f"report: {run / 'report.png'}",
    ]

    png = run / "report.png"
    assert png_size(png) == FIGURE_SIZE_PX == (1000, 800)
    import matplotlib.image

    assert matplotlib.image.imread(str(png)).shape == (800, 1000, 4)

    # The x axis is the optimizer step: a micro-batch at the step its gradient goes into,
    # which is the step of the train.step record that follows it in the file.
    next_step = {}
    pending: list[int] = []
    for i, r in enumerate(records):
        if r["event"] == "train.batch":
            pending.append(i)
        elif r["event"] == "train.step":
            next_step.update(dict.fromkeys(pending, r["step"]))
            pending = []
    batch_x = [r["step"] + 1 for r in batches]
    assert batch_x == [next_step[i] for i, r in enumerate(records) if r["event"] == "train.batch"]

    lines = lines_by_label(build_figure(load_run(run)))
    expected = {
        LABEL_BATCH_LOSS: (batch_x, [r["loss"] for r in batches]),
        LABEL_RAW_LOSS: (batch_x, [r["raw_loss"] for r in batches]),
        LABEL_STEP_LOSS: ([r["step"] for r in steps], [r["loss"] for r in steps]),
        LABEL_LR: ([r["step"] for r in steps], [r["lr"] for r in steps]),
        LABEL_EPOCH_LOSS: ([11, 22], [r["loss"] for r in epochs]),
        LABEL_EVAL_LOSS: ([11, 22], [r["loss"] for r in evals]),
    }
    for label, (xs, ys) in expected.items():
        assert list(lines[label].get_xdata()) == xs, label
        assert list(lines[label].get_ydata()) == ys, label
    assert list(lines[LABEL_STEP_LOSS].get_xdata()) == list(range(1, 23))
    assert not any(label.startswith(LABEL_SCALE_FAILED) for label in lines)


@pytest.mark.slow
def test_report_of_a_real_run_with_a_renamed_rotated_diagnostic_file(tmp_path: Path) -> None:
    """``sinks.diagnostic.filename=diag.jsonl``, rotated past 4000 bytes: report finds it through
    the run's config.yaml, reads every part oldest first and ignores a stray diagnostic.jsonl."""
    run = tmp_path / "run"
    config = str(ROOT / "configs" / "default.yaml")
    train = run_cli(tmp_path, "train", "--config", config, "--set", f"run.dir={run}",
                    "--set", "trainer.max_epochs=1", "--set", "sinks.prometheus.port=0",
                    "--set", "sinks.diagnostic.filename=diag.jsonl",
                    "--set", "sinks.diagnostic.max_bytes=4000", "--set", "sinks.diagnostic.backups=100")  # fmt: skip
    assert train.returncode == 0, train.stderr
    assert (
        yaml.safe_load((run / "config.yaml").read_text())["sinks"]["diagnostic"]["filename"] == "diag.jsonl"
    )
    assert not (run / "diagnostic.jsonl").exists()
    (run / "diagnostic.jsonl").write_text("not this run's file\n", encoding="utf-8")

    proc = run_cli(tmp_path, "report", str(run))
    assert (proc.returncode, proc.stderr) == (0, "")

    parts = sorted(
        (p for p in run.iterdir() if p.name.startswith("diag.jsonl.")), key=lambda p: -int(p.suffix[1:])
    )
    parts.append(run / "diag.jsonl")
    assert len(parts) >= 3  # 1 epoch writes about 21 kB
    records = [json.loads(line) for part in parts for line in part.read_text(encoding="utf-8").splitlines()]
    events = [r["event"] for r in records]
    # The demo config, 1 epoch: 32 micro-batches (the last of 8 items), k=3 -> 11 steps; every=1.
    assert events == ["run.start", *(["train.batch"] * 3 + ["train.step"]) * 10, "train.batch", "train.batch",
                      "train.step", "train.epoch", "eval.epoch", "run.end"]  # fmt: skip
    last_step, epoch, evaluation = records[-4], records[-3], records[-2]
    assert proc.stdout.splitlines() == [
        f"run: {records[0]['run_id']}",
        "status: completed (max_epochs)",
        "epochs: 1  steps: 11  items: 1000",
        f"final: step loss {last_step['loss']:.6g}  epoch loss {epoch['loss']:.6g}"
        f"  eval loss {evaluation['loss']:.6g}",
        "scale check: 0 failed  0 unchecked  32 batch records",
        f"records: 47  files: {len(parts)}",
        "ranks: 1 of 1 (0)",
        "sink errors: 0",
        "dropped records: 0",
        "truncated lines: 0",
        f"report: {run / 'report.png'}",
    ]
    assert png_size(run / "report.png") == FIGURE_SIZE_PX
    data = load_run(run)
    assert (data.parts, list(data.step_loss.x)) == (parts, list(range(1, 12)))


def test_report_of_a_real_run_plots_its_metrics(tmp_path: Path) -> None:
    """A run with training metrics, an evaluation metric and values logged with ``Run.log``: the
    report's ``metrics:`` line and its metrics panel hold the values of the run's records."""
    import torch
    from ignite.engine import Events
    from ignite.metrics import MeanAbsoluteError

    from traintel.run.api import build
    from traintel.sinks.memory import MemorySink
    from traintel.task import Task

    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(n, 3, generator=g), torch.randn(n, 1, generator=g)) for n in (4, 4, 3, 4, 2)]
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    task = Task(
        model=model, loss_fn=torch.nn.functional.mse_loss, train_loader=data, val_loader=data[:2],
        metrics={"mae": MeanAbsoluteError()},
        train_metrics={"largest": lambda out: torch.stack(list(out.losses)).max()},
    )  # fmt: skip
    run_dir = tmp_path / "run"
    off = {"enabled": False}
    config = {
        "run": {"dir": str(run_dir), "id": "with-metrics"},
        "trainer": {"device": "cpu", "max_epochs": 2, "accumulation_steps": 2, "optimizer": {"name": "sgd", "lr": 0.1}},
        "telemetry": {"every": 1},
        "sinks": {"json": off, "prometheus": off, "diagnostic": {"enabled": True}},
    }  # fmt: skip
    memory = MemorySink()
    run = build(config, task, sinks=[memory])
    run.trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: run.log({"bias": model.bias.detach()}))
    run.run()

    proc = run_cli(tmp_path, "report", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    steps, evals, logged = memory.of("train.step"), memory.of("eval.epoch"), memory.of("metric")
    last = {
        "eval.mae": evals[-1].metrics["mae"],  # type: ignore[attr-defined]
        "train.largest": steps[-1].metrics["largest"],  # type: ignore[attr-defined]
        "user.bias": logged[-1].metrics["bias"],  # type: ignore[attr-defined]
    }
    line = "metrics: " + "  ".join(f"{name}={format(value, '.6g')}" for name, value in sorted(last.items()))
    assert line in proc.stdout.splitlines()
    fig = build_figure(load_run(run_dir))
    assert curves(fig.axes[2]) == {
        "eval.mae": ([r.step for r in evals], [r.metrics["mae"] for r in evals]),  # type: ignore[attr-defined]
        "train.largest": ([r.step for r in steps], [r.metrics["largest"] for r in steps]),  # type: ignore[attr-defined]
        "user.bias": ([r.step for r in logged], [r.metrics["bias"] for r in logged]),  # type: ignore[attr-defined]
    }
