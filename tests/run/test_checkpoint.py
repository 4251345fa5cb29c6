"""Checkpoint files on real disks: names, manifests, the order of durable operations, torn and
incomplete checkpoints never picked, kill -9 in the middle of writes, a full disk during a run,
pruning, and the settings a resumed run must share.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from ignite.engine import Events

from tests.helpers.fork_writer import ForkWriter
from tests.helpers.paths import ROOT
from tests.helpers.runs import quiet_config
from tests.helpers.tasks import make_batches, make_model
from traintel.engine.trainer import TraintelEngine
from traintel.records import RunEndRecord
from traintel.run import checkpoint
from traintel.run.api import build
from traintel.run.checkpoint import FORMAT, Complete, changed_setting, complete, load, newest, prune, write
from traintel.sinks.io import atomic
from traintel.sinks.memory import MemorySink
from traintel.task import Task

REPO = ROOT


def state_of(step: int, size: int = 16) -> dict[str, Any]:
    """A small checkpoint state: tensors and plain values, as ``Checkpointing.state`` makes."""
    return {
        "format": FORMAT,
        "step": step,
        "weights": torch.arange(size, dtype=torch.float64) + step,
        "nested": {"bias": torch.full((2, 3), float(step)), "names": ["a", "b"], "lr": 0.1},
    }


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def manifest_of(directory: Path, name: str) -> dict[str, Any]:
    value = json.loads((directory / name).read_text(encoding="utf-8"))
    assert isinstance(value, dict)
    return value


def pair(step: int) -> list[str]:
    """A rank-0 checkpoint's two file names, sorted."""
    return [f"step-{step:09d}.json", f"step-{step:09d}.pt"]


def newest_step(directory: Path, rank: int = 0) -> int | None:
    found = newest(directory, rank)
    return None if found is None else found[0].step


# 1. names, manifest, load


def test_write_names_the_files_by_step_and_rank_and_the_manifest_describes_the_bytes(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"  # made by write
    state0, state1 = state_of(12), {**state_of(12), "rank": 1}

    path0 = write(directory, 12, 0, state0)
    path1 = write(directory, 12, 1, state1)

    assert path0 == directory / "step-000000012.pt"
    assert path1 == directory / "step-000000012.rank1.pt"
    assert names(directory) == [
        "step-000000012.json",
        "step-000000012.pt",
        "step-000000012.rank1.json",
        "step-000000012.rank1.pt",
    ]
    for rank, path, manifest_name in (
        (0, path0, "step-000000012.json"),
        (1, path1, "step-000000012.rank1.json"),
    ):
        data = path.read_bytes()
        assert manifest_of(directory, manifest_name) == {
            "format": 2,
            "step": 12,
            "rank": rank,
            "world_size": 1,
            "file": path.name,
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        assert path.stat().st_size == len(data) > 0
        assert complete(directory, rank) == [
            Complete(12, path, hashlib.sha256(data).hexdigest(), len(data), world_size=1)
        ]

    found = newest(directory, 0)
    assert found is not None
    assert found[0] == complete(directory, 0)[0]
    loaded = found[1]
    assert sorted(loaded) == ["format", "nested", "step", "weights"]
    assert (loaded["format"], loaded["step"]) == (2, 12)
    assert torch.equal(loaded["weights"], state0["weights"])
    assert torch.equal(loaded["nested"]["bias"], state0["nested"]["bias"])
    assert (loaded["nested"]["names"], loaded["nested"]["lr"]) == (["a", "b"], 0.1)
    # the file itself loads with weights_only=True (tensors and plain values only)
    direct = torch.load(path0, weights_only=True)
    assert torch.equal(direct["weights"], state0["weights"])
    found1 = newest(directory, 1)
    assert found1 is not None and found1[0].path == path1 and found1[1]["rank"] == 1
    assert load(complete(directory, 1)[0])["rank"] == 1


def test_load_reads_with_weights_only(tmp_path: Path) -> None:
    """A state holding an arbitrary Python object (not a tensor or plain value) is refused by load."""
    from fractions import Fraction

    directory = tmp_path / "checkpoints"
    write(directory, 3, 0, {"format": FORMAT, "step": 3, "odd": Fraction(1, 3)})
    found = complete(directory, 0)
    assert [c.step for c in found] == [3]
    with pytest.raises(Exception, match=r"[Ww]eights only load failed"):
        load(found[0])
    assert torch.load(found[0].path, weights_only=False)["odd"] == Fraction(1, 3)


# 2. the order of the durable operations


def test_one_write_fsyncs_renames_then_fsyncs_the_directory_for_the_state_then_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    events: list[tuple[Any, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        events.append(("fsync", "dir" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino))
        real_fsync(fd)

    def replace(src: Any, dst: Any, **kwargs: Any) -> None:
        events.append(("replace", Path(src).name, Path(dst).name, os.stat(src).st_ino))
        real_replace(src, dst, **kwargs)

    monkeypatch.setattr(
        "traintel.sinks.io.atomic.os.fsync", fsync
    )  # the os module traintel.sinks.io.atomic uses
    monkeypatch.setattr("traintel.sinks.io.atomic.os.replace", replace)

    write(directory, 12, 0, state_of(12))

    monkeypatch.undo()
    state_ino = (directory / "step-000000012.pt").stat().st_ino
    manifest_ino = (directory / "step-000000012.json").stat().st_ino
    dir_ino = directory.stat().st_ino
    assert len(events) == 6, events
    tmp_state, tmp_manifest = events[1][1], events[4][1]
    assert re.fullmatch(r"\.step-000000012\.pt\..+\.tmp", tmp_state), tmp_state
    assert re.fullmatch(r"\.step-000000012\.json\..+\.tmp", tmp_manifest), tmp_manifest
    assert events == [
        ("fsync", "file", state_ino),  # the temporary file, which becomes the state file
        ("replace", tmp_state, "step-000000012.pt", state_ino),
        ("fsync", "dir", dir_ino),
        ("fsync", "file", manifest_ino),
        ("replace", tmp_manifest, "step-000000012.json", manifest_ino),
        ("fsync", "dir", dir_ino),
    ]
    assert names(directory) == ["step-000000012.json", "step-000000012.pt"]


# 3. torn, incomplete or foreign checkpoints are never picked


def _no_manifest(directory: Path) -> None:
    (directory / "step-000000006.json").unlink()


def _edit_manifest(**changes: Any) -> Callable[[Path], None]:
    def damage(directory: Path) -> None:
        path = directory / "step-000000006.json"
        manifest = json.loads(path.read_text(encoding="utf-8"))
        manifest.update(changes)
        path.write_text(json.dumps(manifest), encoding="utf-8")

    return damage


def _wrong_size(directory: Path) -> None:
    manifest = manifest_of(directory, "step-000000006.json")
    _edit_manifest(size=manifest["size"] - 1)(directory)


def _truncated(directory: Path) -> None:
    path = directory / "step-000000006.pt"
    data = path.read_bytes()
    path.write_bytes(data[:-1])


def _manifest_text(text: str) -> Callable[[Path], None]:
    def damage(directory: Path) -> None:
        (directory / "step-000000006.json").write_text(text, encoding="utf-8")

    return damage


def _no_state_file(directory: Path) -> None:
    (directory / "step-000000006.pt").unlink()


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(_no_manifest, id="state-file-without-manifest"),
        pytest.param(_wrong_size, id="manifest-with-wrong-size"),
        pytest.param(_truncated, id="state-file-truncated-by-one-byte"),
        pytest.param(_manifest_text('{"format": 1, "step": 6, "ra'), id="manifest-cut-short"),
        pytest.param(_manifest_text(""), id="manifest-empty"),
        pytest.param(_manifest_text("[1, 2]"), id="manifest-a-list"),
        pytest.param(_edit_manifest(file="step-000000005.pt"), id="manifest-naming-another-file"),
        pytest.param(_edit_manifest(step=5), id="manifest-of-another-step"),
        pytest.param(_edit_manifest(format=FORMAT + 1), id="manifest-of-another-format"),
        pytest.param(_edit_manifest(size=None), id="manifest-size-null"),
        pytest.param(_no_state_file, id="manifest-without-state-file"),
    ],
)
def test_an_incomplete_checkpoint_is_not_complete_and_newest_is_the_previous_one(
    tmp_path: Path, damage: Callable[[Path], None], caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "checkpoints"
    for step in (4, 5, 6):
        write(directory, step, 0, state_of(step))
    assert [c.step for c in complete(directory, 0)] == [6, 5, 4]

    damage(directory)

    assert [c.step for c in complete(directory, 0)] == [5, 4]
    with caplog.at_level(logging.WARNING, logger="traintel"):
        found = newest(directory, 0)
    assert found is not None
    assert found[0].step == 5 and found[0].path == directory / "step-000000005.pt"
    assert found[1]["step"] == 5 and torch.equal(found[1]["weights"], state_of(5)["weights"])
    assert caplog.records == []  # not even looked at


def _same_size_other_byte(directory: Path) -> None:
    path = directory / "step-000000006.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _manifest_of_these_bytes(state: dict[str, Any]) -> Callable[[Path], None]:
    """Replace the state file by another whose manifest matches it (size and hash)."""

    def damage(directory: Path) -> None:
        write(directory / "other", 6, 0, state)
        for name in ("step-000000006.pt", "step-000000006.json"):
            os.replace(directory / "other" / name, directory / name)
        (directory / "other").rmdir()

    return damage


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        pytest.param(
            _same_size_other_byte,
            "skipping checkpoint step-000000006.pt: step-000000006.pt does not match its manifest "
            "(size or SHA-256)",
            id="a-byte-changed-after-the-manifest",
        ),
        pytest.param(
            _manifest_of_these_bytes({"format": FORMAT + 1, "step": 6}),
            "skipping checkpoint step-000000006.pt: step-000000006.pt is not a traintel checkpoint of "
            "format 1 or 2",
            id="state-of-another-format",
        ),
        pytest.param(
            _manifest_of_these_bytes({"step": 6}),
            "skipping checkpoint step-000000006.pt: step-000000006.pt is not a traintel checkpoint of "
            "format 1 or 2",
            id="state-without-format",
        ),
    ],
)
def test_a_listed_checkpoint_that_does_not_load_is_skipped_with_a_warning(
    tmp_path: Path, damage: Callable[[Path], None], message: str, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "checkpoints"
    for step in (4, 5, 6):
        write(directory, step, 0, state_of(step))

    damage(directory)

    assert [c.step for c in complete(directory, 0)] == [6, 5, 4]  # size matches: listed
    with caplog.at_level(logging.WARNING, logger="traintel"):
        found = newest(directory, 0)
    assert found is not None and found[0].step == 5 and found[1]["step"] == 5
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        ("traintel", "WARNING", message)
    ]
    assert newest(directory, 0, steps={6}) is None
    assert newest_step(directory) == 5


def test_newest_among_steps_and_per_rank(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        write(directory, step, 0, state_of(step))
    write(directory, 4, 1, state_of(4))
    assert newest_step(directory, 1) == 4
    assert newest_step(directory, 2) is None
    found = newest(directory, 0, steps={2, 4})
    assert found is not None and found[0].step == 4
    assert newest(directory, 0, steps={3}) is None
    assert newest(tmp_path / "missing", 0) is None and complete(tmp_path / "missing", 0) == []


# 4. kill -9 in the middle of writes

KILL_ROUNDS = 20
KILL_SIZE = 1 << 20
"""float32 elements: a 4 MiB state, so that a write (with its fsyncs) takes a while."""


def _kill_round_files(directory: Path, newest_found: int) -> list[int]:
    """Check the directory after a kill and ``remove_temporary``; returns the steps of the state
    files left without a manifest."""
    listing = names(directory)
    pairs = [re.fullmatch(r"step-(\d{9})\.(pt|json)", n) for n in listing]
    assert all(pairs), listing  # nothing else: no temporary file is left
    states = {int(m.group(1)) for m in pairs if m and m.group(2) == "pt"}
    manifests = {int(m.group(1)) for m in pairs if m and m.group(2) == "json"}
    assert manifests <= states, listing  # a manifest never exists without its state file
    steps = sorted(manifests, reverse=True)
    # the two kept (keep=2); older ones only where a kill came between a write and its prune, or
    # during a prune (which removes the older checkpoints newest first)
    assert steps[:2] == [newest_found, newest_found - 1], listing
    assert [c.step for c in complete(directory, 0)] == steps  # every manifest names a whole file
    orphans = sorted(states - manifests)
    # a write cut between its state file and its manifest, or a prune cut between the two removals
    assert all(s == newest_found + 1 or s < newest_found - 1 for s in orphans), listing
    return orphans


CHECKPOINT_WRITE = """
checkpoint.write(directory, step, 0, state)
checkpoint.prune(directory, 0, 2)
"""
"""Each writer's step: a checkpoint, then the prune that keeps two."""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork and SIGKILL are POSIX")
def test_kill_9_at_random_moments_never_leaves_a_checkpoint_that_is_picked_but_broken(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    base = torch.arange(KILL_SIZE, dtype=torch.float32)
    for step in (1, 2):  # two complete checkpoints before the first writer starts
        write(directory, step, 0, {"format": FORMAT, "step": step, "weights": base + step})
    rnd = random.Random(20240607)
    started = time.monotonic()
    temporaries, orphan_rounds, completed = 0, 0, 0
    server = ForkWriter(tmp_path, directory, KILL_SIZE, CHECKPOINT_WRITE)
    try:
        next_step = 3
        for _ in range(KILL_ROUNDS):
            reported = server.kill_writer(next_step, rnd.uniform(0.0, 0.3))
            assert reported == list(range(next_step, next_step + len(reported)))
            # the newest checkpoint before this writer started was next_step - 1
            last_done = reported[-1] if reported else next_step - 1
            completed += len(reported)

            found = newest(directory, 0)
            assert found is not None
            # the last step reported done, or the next one when its write finished before the kill
            assert found[0].step in (last_done, last_done + 1), (found[0].step, last_done)
            assert found[1]["step"] == found[0].step
            assert torch.equal(found[1]["weights"], base + found[0].step)

            temporaries += checkpoint.remove_temporary(directory, 0)
            orphan_rounds += bool(_kill_round_files(directory, found[0].step))
            next_step = found[0].step + 1
    finally:
        code = server.close()
    assert code == 0, server.stderr_path.read_text(errors="replace")
    assert checkpoint.remove_temporary(directory, 0) == 0

    # the next checkpoint's prune removes the state files left without a manifest
    final = newest_step(directory)
    assert final is not None
    prune(directory, 0, 2)
    assert names(directory) == [*pair(final - 1), *pair(final)]
    print(
        f"\n{KILL_ROUNDS} kills in {time.monotonic() - started:.1f} s: {completed} checkpoints reported, "
        f"{temporaries} temporary files removed, {orphan_rounds} rounds left a state file without manifest"
    )


# 5. a full disk during a run


@pytest.mark.parametrize("failing", ["pt", "json"], ids=["state-file-fails", "manifest-fails"])
def test_a_write_error_keeps_the_previous_checkpoint_and_training_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, failing: str
) -> None:
    real_write_atomic = atomic.write_atomic
    attempts: list[str] = []

    def full_disk_at_step_4(path: Path, data: bytes | str, *, mode: int | None = None) -> None:
        attempts.append(path.name)
        if path.name == f"step-000000004.{failing}":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write_atomic(path, data, mode=mode)

    monkeypatch.setattr("traintel.run.checkpoint.write_atomic", full_disk_at_step_4)
    cfg = quiet_config(tmp_path, accumulation_steps=1)  # one batch, one optimizer step
    cfg["checkpoint"] = {"every_steps": 2, "keep": 1}
    sink = MemorySink()
    task = Task(model=make_model(), loss_fn=torch.nn.functional.mse_loss, train_loader=make_batches([2] * 8))
    run = build(cfg, task, sinks=[sink])
    directory = tmp_path / "run" / "checkpoints"
    seen: dict[int, tuple[list[str], int | None]] = {}

    def look(engine: TraintelEngine) -> None:  # after the checkpointing handler, which came first
        steps = engine.state.progress.run_steps
        if steps % 2 == 0:
            seen[steps] = (names(directory), newest_step(directory))

    run.trainer.add_event_handler(Events.ITERATION_COMPLETED, look)
    with caplog.at_level(logging.WARNING, logger="traintel"):
        ended = run.run()

    assert (ended.status, ended.reason, ended.step) == ("completed", "max_epochs", 8)
    assert [(type(r), r) for r in sink.of("run.end")] == [(RunEndRecord, ended)]
    assert seen == {
        2: (["run.json", *pair(2)], 2),
        # the failed step is not the newest; the one before it was not pruned (keep=1)
        4: (["run.json", *pair(2)] if failing == "pt" else ["run.json", *pair(2), "step-000000004.pt"], 2),
        6: (["run.json", *pair(6)], 6),
        8: (["run.json", *pair(6)], 6),  # the epoch's last step: its checkpoint comes after the epoch's end
    }
    assert names(directory) == ["run.json", *pair(8)]
    assert not (directory / "step-000000004.pt").exists() and not (directory / "step-000000004.json").exists()
    found = newest(directory, 0)
    assert found is not None and found[0].step == 8 and found[1]["step"] == 8
    assert run.checkpointing is not None and run.checkpointing.saved_step == 8
    expected_attempts = [*pair(2)[::-1], "step-000000004.pt"]
    expected_attempts += [] if failing == "pt" else ["step-000000004.json"]
    assert attempts == [*expected_attempts, *pair(6)[::-1], *pair(8)[::-1]]
    errors = [(r.name, r.getMessage()) for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [
        (
            "traintel",
            "checkpoint at step 4 (every_steps) not written: OSError: [Errno 28] No space left on device",
        )
    ]
    assert "not written" in errors[0][1]


# 6. prune


def test_prune_keeps_the_newest_removes_manifests_first_and_state_files_without_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4, 5):
        write(directory, step, 0, state_of(step))
    write(directory, 6, 0, state_of(6))
    (directory / "step-000000006.json").unlink()  # a write that never finished
    for step in (1, 2):  # another rank's files stay
        write(directory, step, 1, state_of(step))
    write(directory, 3, 1, state_of(3))
    (directory / "step-000000003.rank1.json").unlink()
    (directory / "notes.txt").write_text("mine", encoding="utf-8")
    removed: list[str] = []
    real_unlink = Path.unlink

    def unlink(self: Path, missing_ok: bool = False) -> None:
        removed.append(self.name)
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)

    prune(directory, 0, 2)

    monkeypatch.undo()
    assert removed == [
        "step-000000003.json",
        "step-000000003.pt",
        "step-000000002.json",
        "step-000000002.pt",
        "step-000000001.json",
        "step-000000001.pt",
        "step-000000006.pt",
    ]
    assert names(directory) == [
        "notes.txt",
        "step-000000001.rank1.json",
        "step-000000001.rank1.pt",
        "step-000000002.rank1.json",
        "step-000000002.rank1.pt",
        "step-000000003.rank1.pt",
        "step-000000004.json",
        "step-000000004.pt",
        "step-000000005.json",
        "step-000000005.pt",
    ]
    assert [c.step for c in complete(directory, 0)] == [5, 4]

    prune(directory, 1, 1)
    assert names(directory) == [
        "notes.txt",
        "step-000000002.rank1.json",
        "step-000000002.rank1.pt",
        *[f"step-00000000{s}.{e}" for s in (4, 5) for e in ("json", "pt")],
    ]
    prune(directory, 0, 5)  # fewer than keep: nothing goes
    assert [c.step for c in complete(directory, 0)] == [5, 4]


def test_remove_temporary_removes_only_this_rank_s_leftover_temporary_files(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    write(directory, 7, 0, state_of(7))
    leftovers = [".step-000000008.pt.abc123.tmp", ".step-000000008.json.x_y.tmp"]
    others = [".step-000000008.rank1.pt.abc.tmp", ".config.yaml.abc.tmp", "step-000000009.pt.tmp"]
    for name in leftovers + others:
        (directory / name).write_bytes(b"partial")

    assert checkpoint.remove_temporary(directory, 0) == 2

    assert names(directory) == sorted([*others, "step-000000007.json", "step-000000007.pt"])
    assert checkpoint.remove_temporary(directory, 1) == 1
    assert checkpoint.remove_temporary(tmp_path / "missing", 0) == 0


# 7. settings a resumed run must share


def test_changed_setting_names_the_dotted_key_and_both_values() -> None:
    saved = {
        "task": {"params": {"hidden": 4, "layers": [8, 8]}, "factory": "m:f"},
        "trainer": {"optimizer": {"name": "sgd", "lr": 0.1}, "precision": "fp32"},
        "world_size": 1,
    }
    same = json.loads(json.dumps(saved))
    assert changed_setting(saved, same) is None

    current = json.loads(json.dumps(saved))
    current["trainer"]["optimizer"]["lr"] = 0.2
    assert changed_setting(saved, current) == ("trainer.optimizer.lr", 0.1, 0.2)

    current["task"]["params"]["layers"] = [8, 16]  # sorted keys: task.* comes first
    assert changed_setting(saved, current) == ("task.params.layers", [8, 8], [8, 16])

    added = json.loads(json.dumps(saved))
    added["trainer"]["optimizer"]["momentum"] = 0.9
    assert changed_setting(saved, added) == ("trainer.optimizer.momentum", None, 0.9)
    assert changed_setting(added, saved) == ("trainer.optimizer.momentum", 0.9, None)

    assert changed_setting({"world_size": 1}, {"world_size": 2}) == ("world_size", 1, 2)


def test_each_checkpoint_gives_a_checkpoint_record_after_the_steps_it_covers(tmp_path: Path) -> None:
    """One process, 7 batches, k=2: steps 1-4 (the 4th a window of one); a checkpoint every 2 steps
    and at the epoch's end. Each committed checkpoint gives one ``checkpoint`` record, right after
    the records of the steps it covers, its bytes those of its state file."""
    cfg = quiet_config(tmp_path, accumulation_steps=2)
    cfg["checkpoint"] = {"every_steps": 2, "every_epochs": 1, "keep": 10}
    sink = MemorySink()
    task = Task(model=make_model(), loss_fn=torch.nn.functional.mse_loss, train_loader=make_batches([4] * 7))
    build(cfg, task, sinks=[sink]).run()

    events = [(r.event, getattr(r, "step", None)) for r in sink.records if r.event != "train.batch"]
    assert events == [
        ("run.start", None), ("train.step", 1), ("train.step", 2), ("checkpoint", 2), ("train.step", 3),
        ("train.step", 4), ("train.epoch", 4), ("checkpoint", 4), ("run.end", 4),
    ]  # fmt: skip
    saved = [r for r in sink.records if r.event == "checkpoint"]
    directory = tmp_path / "run" / "checkpoints"
    assert [(r.reason, r.epoch, r.background, r.rank, r.world_size) for r in saved] == [
        ("every_steps", 1, False, 0, 1),
        ("every_epochs", 1, False, 0, 1),
    ]
    assert [r.size_bytes for r in saved] == [
        (directory / f"step-00000000{s}.pt").stat().st_size for s in (2, 4)
    ]
    for r in saved:  # written in the foreground: training waited for all of it
        assert 0 < r.write_seconds <= r.stall_seconds < 60
