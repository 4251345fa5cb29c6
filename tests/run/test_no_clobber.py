"""Inputs and outputs that never betray the user: nothing of theirs is replaced, bad input changes nothing.

- ``traintel report --output`` writes only a regular file (a new one, or over a regular file that
  is not one the report reads): a symbolic link, a FIFO, a socket, a character or block device
  (``/dev/null``) is refused with exit 2 and left as it was, also when it appears while the
  figure is drawn (``write_atomic(..., overwrite="regular")`` looks again before the rename).
- ``sinks.diagnostic.filename`` cannot take one of traintel's own names in the run directory.
- A first attempt refuses a run directory that holds another run's files (an empty one, or one
  with other files, is fine), a ``config.yaml`` there that is not a file, and a directory that
  does not take files (read-only, full): exit 2 before any sink opens, nothing changed.
  A resumed attempt still appends to its run's files.

Snapshots compare every entry's type, inode, mtime, device number and content (or link target).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.helpers.children import child_env, run_child, run_cli
from tests.helpers.tasks import make_batches, make_model
from traintel.cli.main import main
from traintel.errors import ConfigError
from traintel.run import layout, resume
from traintel.run.api import build
from traintel.run.layout import RESERVED_NAMES
from traintel.sinks.io import atomic
from traintel.sinks.io.atomic import NotRegularFile, probe_write, write_atomic
from traintel.task import Task

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
ONLY_REGULAR = "the report is written only as a new file or over a regular file"

Snapshot = dict[str, tuple[Any, ...]]


def snapshot(root: Path) -> Snapshot:
    """Every entry under ``root`` (links not followed): type, inode, mtime, rdev, content or target."""
    out: Snapshot = {}
    for where, dirs, files in os.walk(root):
        for name in sorted([*dirs, *files]):
            path = Path(where) / name
            st = path.lstat()
            if stat.S_ISREG(st.st_mode):
                content: Any = path.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            else:
                content = None
            out[str(path.relative_to(root))] = (
                stat.S_IFMT(st.st_mode),
                st.st_ino,
                st.st_mtime_ns,
                st.st_rdev,
                content,
            )
    return out


def cli(*argv: str) -> int:
    try:
        return main(list(argv))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else -1


# --------------------------------------------------------------------------- report --output


RECORDS = [
    {"timestamp": "t", "level": "info", "event": "run.start", "run_id": "r"},
    {"timestamp": "t", "level": "info", "event": "train.step", "run_id": "r", "epoch": 1, "step": 1,
     "items_total": 4, "loss": 0.5, "lr": 0.1},
]  # fmt: skip


@pytest.fixture
def reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``tmp_path`` as the working directory, with ``run/diagnostic.jsonl`` to report."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "diagnostic.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _symlink_to_file(where: Path) -> None:
    (where / "target.png").write_bytes(b"the user's picture")
    (where / "out.png").symlink_to("target.png")


def _symlink_to_dir(where: Path) -> None:
    (where / "pictures").mkdir()
    (where / "out.png").symlink_to("pictures")


def _mknod(kind: int, device: tuple[int, int]) -> Callable[[Path], None]:
    def make(where: Path) -> None:
        if not IS_ROOT:
            pytest.skip("making a device node needs root")
        os.mknod(where / "out.png", kind | 0o600, os.makedev(*device))

    return make


def _socket(where: Path) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind("out.png")  # relative: the working directory is ``where``
    sock.close()  # the socket file stays


OBSTACLES = [
    pytest.param(_symlink_to_file, "is a symbolic link (not followed)", id="symlink-to-a-regular-file"),
    pytest.param(lambda w: (w / "out.png").symlink_to("nowhere.png"), "is a symbolic link (not followed)",
                 id="dangling-symlink"),
    pytest.param(_symlink_to_dir, "is a symbolic link (not followed)", id="symlink-to-a-directory"),
    pytest.param(lambda w: os.mkfifo(w / "out.png"), "is a FIFO", id="fifo"),
    pytest.param(_socket, "is a socket", id="socket"),
    pytest.param(_mknod(stat.S_IFCHR, (1, 3)), "is a character device", id="character-device"),
    pytest.param(_mknod(stat.S_IFBLK, (7, 0)), "is a block device", id="block-device"),
]  # fmt: skip


@pytest.mark.parametrize(("make", "what"), OBSTACLES)
def test_output_that_is_not_a_regular_file_is_refused_and_left_alone(
    reported: Path, capsys: pytest.CaptureFixture[str], make: Callable[[Path], None], what: str
) -> None:
    make(reported)
    before = snapshot(reported)

    code = cli("report", "run", "--output", "out.png")

    assert (code, *capsys.readouterr()) == (2, "", f"traintel: error: out.png: {what}; {ONLY_REGULAR}\n")
    assert snapshot(reported) == before  # no temporary file, the entry and a link's target untouched


def test_dev_null_is_refused_before_anything_is_written(
    reported: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    null = os.lstat(os.devnull)
    assert stat.S_ISCHR(null.st_mode)

    def must_not_write(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the report went on to write")

    # Were the check missing, nothing reaches /dev/null: neither the PNG nor a temporary file in /dev.
    monkeypatch.setattr("traintel.cli.report.write_atomic", must_not_write)
    monkeypatch.setattr("traintel.sinks.io.atomic.tempfile.mkstemp", must_not_write)
    code = cli("report", "run", "--output", os.devnull)

    assert (code, *capsys.readouterr()) == (
        2,
        "",
        f"traintel: error: {os.devnull}: is a character device; {ONLY_REGULAR}\n",
    )
    after = os.lstat(os.devnull)
    assert (stat.S_ISCHR(after.st_mode), after.st_ino, after.st_rdev) == (True, null.st_ino, null.st_rdev)
    assert sorted(p.name for p in reported.iterdir()) == ["run"]


@pytest.mark.parametrize("name", ["run/diagnostic.jsonl", "run/config.yaml", "hardlink.jsonl"])
def test_output_that_is_a_file_the_report_reads_is_refused(
    reported: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    (reported / "run" / "config.yaml").write_text("sinks:\n  diagnostic:\n    enabled: true\n")
    os.link(reported / "run" / "diagnostic.jsonl", reported / "hardlink.jsonl")
    before = snapshot(reported)

    code = cli("report", "run", "--output", name)

    assert (code, *capsys.readouterr()) == (
        2,
        "",
        f"traintel: error: {name}: is a file the report reads; choose another --output\n",
    )
    assert snapshot(reported) == before


@pytest.mark.parametrize(
    ("make", "what"),
    [
        pytest.param(os.mkfifo, "is a FIFO", id="fifo"),
        pytest.param(lambda p: p.symlink_to("target.png"), "is a symbolic link (not followed)", id="symlink"),
        pytest.param(lambda p: p.mkdir(), "is a directory", id="directory"),
    ],
)
def test_an_obstacle_appearing_while_the_figure_is_drawn_is_not_replaced(
    reported: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    make: Callable[[Path], None],
    what: str,
) -> None:
    from traintel.cli import report

    (reported / "target.png").write_bytes(b"the user's picture")
    real = report.build_figure

    def build_figure(data: Any) -> Any:
        make(reported / "out.png")  # after check_output, before write_atomic
        return real(data)

    monkeypatch.setattr(report, "build_figure", build_figure)
    code = cli("report", "run", "--output", "out.png")
    monkeypatch.undo()

    rest = "" if what == "is a directory" else f"; {ONLY_REGULAR}"
    assert (code, *capsys.readouterr()) == (2, "", f"traintel: error: out.png: {what}{rest}\n")
    assert sorted(p.name for p in reported.iterdir()) == ["out.png", "run", "target.png"]
    assert (reported / "target.png").read_bytes() == b"the user's picture"
    assert not stat.S_ISREG((reported / "out.png").lstat().st_mode)


def test_a_new_output_and_a_regular_one_are_written(
    reported: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (reported / "old.png").write_bytes(b"old")
    assert cli("report", "run", "--output", "new.png") == 0
    assert cli("report", "run", "--output", "old.png") == 0
    capsys.readouterr()
    for name in ("new.png", "old.png"):
        assert (reported / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (reported / name).stat().st_nlink == 1  # the temporary name is gone
    assert sorted(p.name for p in reported.iterdir()) == ["new.png", "old.png", "run"]


# --------------------------------------------------------------------------- write_atomic, probe_write


def test_overwrite_regular_refuses_before_making_a_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    os.mkfifo(tmp_path / "out")

    def must_not_make(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a temporary file was made")

    monkeypatch.setattr("traintel.sinks.io.atomic.tempfile.mkstemp", must_not_make)
    with pytest.raises(NotRegularFile) as raised:
        write_atomic(tmp_path / "out", b"png", overwrite="regular")
    assert (raised.value.kind, str(raised.value)) == (
        "a FIFO",
        f"{tmp_path / 'out'} is a FIFO, not a regular file",
    )
    assert stat.S_ISFIFO((tmp_path / "out").lstat().st_mode)


def test_overwrite_none_refuses_an_existing_file(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("theirs")
    with pytest.raises(FileExistsError):
        write_atomic(tmp_path / "config.yaml", "ours", overwrite="none")
    assert (tmp_path / "config.yaml").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


@pytest.mark.parametrize(
    ("overwrite", "intruder", "error"),
    [
        ("regular", "fifo", NotRegularFile),
        ("regular", "symlink", NotRegularFile),
        ("none", "file", FileExistsError),
        ("none", "fifo", FileExistsError),
    ],
)
def test_an_entry_that_appears_before_the_rename_is_not_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overwrite: Any, intruder: str, error: type[Exception]
) -> None:
    path = tmp_path / "out"
    real_lstat = Path.lstat
    looks = 0

    def lstat(self: Path) -> os.stat_result:
        nonlocal looks
        if self == path:
            looks += 1
            if looks == 2:  # the look right before the new name is made: something got there first
                {"fifo": lambda: os.mkfifo(path), "symlink": lambda: path.symlink_to("elsewhere"),
                 "file": lambda: path.write_text("theirs")}[intruder]()  # fmt: skip
        return real_lstat(self)

    monkeypatch.setattr(Path, "lstat", lstat)
    with pytest.raises(error):
        write_atomic(path, b"ours", overwrite=overwrite)
    monkeypatch.undo()
    assert looks >= 2
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary file
    st = path.lstat()
    kinds = {"fifo": stat.S_ISFIFO, "symlink": stat.S_ISLNK, "file": stat.S_ISREG}
    assert kinds[intruder](st.st_mode)
    if intruder == "file":
        assert path.read_text() == "theirs"


def test_an_entry_that_appears_at_the_link_is_not_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, real_link = tmp_path / "out", os.link

    def link(src: str, dst: Path) -> None:
        os.mkfifo(dst)  # between the last look and the link itself
        real_link(src, dst)

    monkeypatch.setattr("traintel.sinks.io.atomic.os.link", link)
    with pytest.raises(NotRegularFile):
        write_atomic(path, b"ours", overwrite="regular")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert stat.S_ISFIFO(path.lstat().st_mode)


@pytest.mark.parametrize("overwrite", ["regular", "none"])
def test_without_hard_links_the_file_is_renamed_into_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overwrite: Any
) -> None:
    def link(*_args: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr("traintel.sinks.io.atomic.os.link", link)
    write_atomic(tmp_path / "out", b"ours", overwrite=overwrite)
    monkeypatch.undo()
    assert (tmp_path / "out").read_bytes() == b"ours"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_probe_write_leaves_nothing_and_raises_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probe_write(tmp_path, "run: {}\n" * 100)
    assert list(tmp_path.iterdir()) == []

    def full(*_args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("traintel.sinks.io.atomic.os.write", full)
    with pytest.raises(OSError, match="No space left on device"):
        probe_write(tmp_path, "run: {}\n")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- the run directory (in process)


def config(run_dir: Path, **sections: Any) -> dict[str, Any]:
    """One quick epoch in ``run_dir`` with the diagnostic file on (stdout and metrics off)."""
    cfg: dict[str, Any] = {
        "run": {"dir": str(run_dir), "id": "second-run"},
        "trainer": {"device": "cpu", "max_epochs": 1, "optimizer": {"name": "sgd", "lr": 0.1}},
        "sinks": {"json": {"enabled": False}, "prometheus": {"enabled": False}, "diagnostic": {}},
    }
    for key, value in sections.items():
        section, _, name = key.partition("__")
        cfg.setdefault(section, {})
        if section == "sinks":
            cfg["sinks"]["diagnostic"][name] = value
        else:
            cfg[section][name] = value
    return cfg


def task() -> Task:
    return Task(model=make_model(), loss_fn=torch.nn.functional.mse_loss, train_loader=make_batches([4] * 4))


def refused(cfg: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as raised:
        build(cfg, task())
    assert raised.value.exit_code == 2
    return str(raised.value)


@pytest.mark.parametrize("name", [*RESERVED_NAMES, "Config.YAML", "REPORT.PNG"])
def test_a_reserved_diagnostic_filename_is_refused_before_anything_is_written(
    tmp_path: Path, name: str
) -> None:
    assert refused(config(tmp_path / "run", sinks__filename=name)) == (
        f"sinks.diagnostic.filename: {name!r} is reserved for traintel's own files in the run directory "
        "(config.yaml, checkpoints, report.png, run.json); choose another name, such as diagnostic.jsonl"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", [".", "..", "a\x00b"])
def test_a_diagnostic_filename_that_is_no_file_name_is_refused(tmp_path: Path, name: str) -> None:
    assert refused(config(tmp_path / "run", sinks__filename=name)) == (
        "sinks.diagnostic.filename: must be a file name inside the run directory (not . or .., no / or \\), "
        f"got {name!r}"
    )
    assert list(tmp_path.iterdir()) == []


def test_the_reserved_names_are_the_ones_the_run_uses() -> None:
    assert set(RESERVED_NAMES) == {layout.CONFIG_FILENAME, layout.CHECKPOINT_DIRECTORY, layout.REPORT_FILENAME,
                                   layout.RUN_FILE}  # fmt: skip


def _fill(run_dir: Path, names: list[str]) -> Snapshot:
    for name in names:
        path = run_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("/"):
            path.mkdir(exist_ok=True)
        else:
            path.write_text(f"{name} of the earlier run\n")
    return snapshot(run_dir)


@pytest.mark.parametrize(
    ("names", "sections", "listed", "advice"),
    [
        pytest.param(["config.yaml"], {}, "config.yaml", "a new or empty one", id="config-yaml"),
        pytest.param(["report.png"], {}, "report.png", "a new or empty one", id="report"),
        pytest.param(["diagnostic.jsonl.2"], {}, "diagnostic.jsonl.2", "a new or empty one", id="rotated-part"),
        pytest.param(["diagnostic.rank3.jsonl"], {}, "diagnostic.rank3.jsonl", "a new or empty one",
                     id="another-rank-s-file"),
        pytest.param(["config.yaml", "diagnostic.jsonl"], {"sinks__filename": "second.jsonl"},
                     "config.yaml, diagnostic.jsonl", "a new or empty one", id="another-diagnostic-name"),
        pytest.param(["diagnostic.jsonl"], {"sinks__enabled": False, "checkpoint__every_steps": 1},
                     "diagnostic.jsonl", "a new or empty one", id="checkpoints-only-run"),
        pytest.param(["diag.jsonl.1", "diag.rank1.jsonl", "diag.rank1.jsonl.1"], {"sinks__filename": "diag.jsonl"},
                     "diag.jsonl.1, diag.rank1.jsonl, diag.rank1.jsonl.1", "a new or empty one",
                     id="configured-name-parts"),
        pytest.param(["checkpoints/", "config.yaml"], {"checkpoint__every_steps": 1}, "checkpoints, config.yaml",
                     "continue", id="checkpoints-without-a-complete-one"),
        pytest.param(["config.yaml", "report.png", *(f"diagnostic.jsonl.{i}" for i in range(1, 6))], {},
                     "config.yaml, diagnostic.jsonl.1, diagnostic.jsonl.2, diagnostic.jsonl.3, "
                     "diagnostic.jsonl.4 and 2 more", "a new or empty one", id="many"),
    ],
)  # fmt: skip
def test_a_first_attempt_refuses_a_directory_with_another_run_s_files(
    tmp_path: Path, names: list[str], sections: dict[str, Any], listed: str, advice: str
) -> None:
    run_dir = tmp_path / "run"
    before = _fill(run_dir, [*names, "notes.txt"])

    message = refused(config(run_dir, **sections))

    advice = {
        "a new or empty one": "choose another run.dir (a new or empty one)",
        "continue": "choose another run.dir, or continue that run with 'traintel train --resume' or run.resume=auto",
    }[advice]
    assert message == f"run.dir: {str(run_dir)!r} already holds another run's files ({listed}); {advice}"
    assert snapshot(run_dir) == before


def test_the_first_attempt_s_own_diagnostic_file_keeps_its_message(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    before = _fill(run_dir, ["config.yaml", "diagnostic.jsonl"])
    assert refused(config(run_dir)) == (
        f"run.dir: {str(run_dir / 'diagnostic.jsonl')!r} already exists and is never overwritten; "
        "choose another run.dir"
    )
    assert snapshot(run_dir) == before


@pytest.mark.parametrize(
    "names", [[], ["notes.txt", "tensorboard/", "data.jsonl"]], ids=["empty", "other-files"]
)
def test_an_empty_directory_or_one_with_other_files_is_fine(tmp_path: Path, names: list[str]) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    before = _fill(run_dir, names)

    end = build(config(run_dir), task()).run()

    assert end.status == "completed"
    after = snapshot(run_dir)
    assert {k: after[k] for k in before} == before
    assert sorted(set(after) - set(before)) == ["config.yaml", "diagnostic.jsonl"]


def test_a_config_yaml_directory_is_refused_on_a_resumed_attempt_too(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    resume.write_run_file(run_dir / layout.CHECKPOINT_DIRECTORY, "second-run", 0)  # an attempt started here
    before = _fill(run_dir, ["config.yaml/", "diagnostic.jsonl"])
    cfg = config(run_dir, run__resume="auto", checkpoint__every_steps=1)

    assert refused(cfg) == (
        f"run.dir: {str(run_dir / 'config.yaml')!r} is a directory, not a regular file; the run writes its "
        "config there: remove it or choose another run.dir"
    )
    assert snapshot(run_dir) == before


def test_a_resumed_attempt_still_appends_to_its_run_s_files(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = build(config(run_dir, run__resume="auto", checkpoint__every_steps=100), task()).run()
    assert (first.status, first.attempt) == ("completed", 0)
    lines = (run_dir / "diagnostic.jsonl").read_text().splitlines()

    more = config(run_dir, run__resume="auto", checkpoint__every_steps=100, trainer__max_epochs=2)
    again = build(more, task()).run()

    assert (again.status, again.attempt) == ("completed", 1)  # no checkpoint: from the start, appended
    assert (run_dir / "diagnostic.jsonl").read_text().splitlines()[: len(lines)] == lines


def test_config_yaml_made_after_the_start_is_not_replaced(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run = build(config(run_dir), task())
    (run_dir / "config.yaml").write_text("another process's config\n")

    with pytest.raises(ConfigError) as raised:
        run.run()

    assert str(raised.value) == (
        f"run.dir: {str(run_dir / 'config.yaml')!r} already exists and is never overwritten; choose another run.dir"
    )
    assert (run_dir / "config.yaml").read_text() == "another process's config\n"


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """An existing directory this process cannot create files in (root too: the immutable flag),
    and the reason the system gives."""
    where = tmp_path / "ro"
    where.mkdir()
    if not IS_ROOT:
        where.chmod(0o555)
        yield where, "Permission denied"
        where.chmod(0o755)
        return
    chattr = shutil.which("chattr")
    if (
        chattr is None
        or subprocess.run([chattr, "+i", str(where)], capture_output=True, check=False).returncode
    ):
        pytest.skip("cannot make a directory read-only for root here (no chattr +i)")
    try:
        yield where, "Operation not permitted"
    finally:
        subprocess.run([chattr, "-i", str(where)], check=True)


def test_a_read_only_run_directory_is_refused_before_start(read_only: tuple[Path, str]) -> None:
    run_dir, reason = read_only
    for sections in ({}, {"sinks__enabled": False, "checkpoint__every_steps": 1}):
        assert refused(config(run_dir, **sections)) == f"run.dir: cannot write in {str(run_dir)!r}: {reason}"
        assert list(run_dir.iterdir()) == []


def test_a_full_disk_is_refused_before_start_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*_args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "_write_all", full)
    assert refused(config(tmp_path / "new" / "run")) == (
        f"run.dir: cannot write in {str(tmp_path / 'new' / 'run')!r}: No space left on device"
    )
    assert list(tmp_path.iterdir()) == []  # the directories it made are gone again


# --------------------------------------------------------------------------- the command line (subprocesses)


TRAIN = ["train", "--set", "trainer.max_epochs=1", "--set", "sinks.prometheus.enabled=false"]


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch run of the built-in task: ``run/config.yaml`` and ``run/diagnostic.jsonl``."""
    where = tmp_path_factory.mktemp("earlier")
    done = run_cli(where, *TRAIN, "--set", f"run.dir={where / 'run'}")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (where / "run").iterdir()) == ["config.yaml", "diagnostic.jsonl"]
    return where / "run"


@pytest.mark.slow
def test_a_second_run_with_another_diagnostic_name_changes_nothing(earlier_run: Path, tmp_path: Path) -> None:
    before = snapshot(earlier_run)
    args = ["--set", f"run.dir={earlier_run}", "--set", "sinks.diagnostic.filename=second.jsonl"]

    proc = run_cli(tmp_path, *TRAIN, *args, "--set", "run.name=second")

    assert (proc.returncode, proc.stdout, proc.stderr) == (
        2,
        "",
        f"traintel: error: run.dir: {str(earlier_run)!r} already holds another run's files "
        "(config.yaml, diagnostic.jsonl); choose another run.dir (a new or empty one)\n",
    )
    assert snapshot(earlier_run) == before


@pytest.mark.slow
def test_a_config_yaml_directory_is_exit_2_before_start(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "config.yaml").mkdir(parents=True)
    before = snapshot(tmp_path)

    proc = run_cli(tmp_path, *TRAIN, "--set", f"run.dir={run_dir}")

    assert (proc.returncode, proc.stdout, proc.stderr) == (
        2,
        "",
        f"traintel: error: run.dir: {str(run_dir / 'config.yaml')!r} is a directory, not a regular file; "
        "the run writes its config there: remove it or choose another run.dir\n",
    )
    assert snapshot(tmp_path) == before


FULL_DISK = textwrap.dedent(
    """\
    import errno, sys
    import traintel.sinks.io.atomic

    def full(fd, payload):
        raise OSError(errno.ENOSPC, "No space left on device")

    traintel.sinks.io.atomic._write_all = full  # every file the run writes whole, and the start-up probe
    from traintel.cli.main import main
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("existing", [False, True], ids=["new-directory", "existing-directory"])
def test_a_full_disk_at_start_is_exit_2_with_one_line(tmp_path: Path, existing: bool) -> None:
    run_dir = tmp_path / "run"
    if existing:
        run_dir.mkdir()

    proc = run_child([sys.executable, "-c", FULL_DISK, *TRAIN, "--set", f"run.dir={run_dir}"], tmp_path,
                     child_env(tmp_path))  # fmt: skip

    assert (proc.returncode, proc.stdout, proc.stderr) == (
        2,
        "",
        f"traintel: error: run.dir: cannot write in {str(run_dir)!r}: No space left on device\n",
    )
    assert run_dir.exists() is existing
    assert not existing or list(run_dir.iterdir()) == []  # no 0-byte diagnostic file


def test_saved_config_is_yaml_of_the_run(tmp_path: Path) -> None:
    """The start-up probe writes what config.yaml will hold; the real one is written as before."""
    run_dir = tmp_path / "run"
    build(config(run_dir), task()).run()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["run"]["dir"] == str(run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "diagnostic.jsonl"]
