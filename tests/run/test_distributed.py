"""``run.end``'s reason for a failed rank: the rank the failure came from, read from the other ranks'
announcements in the store of the process group that traintel joined (a real gloo group of one
process, joined through ``start`` as under torchrun, standing in for a larger job's); and the reason
in torchelastic's error file, where torchrun's failure summary reads it."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from traintel.config import DistributedConfig
from traintel.run.distributed import (
    KeyValueStore,
    announce_failure,
    failure_reason,
    record_failure,
    start,
    stop,
)

LOST = "RuntimeError: [pair.cc:537] Read error [127.0.0.1]:4242: Connection reset by peer"
"""A rank's own error when the connection to another rank closed under it (gloo's text)."""


def join(monkeypatch: pytest.MonkeyPatch) -> KeyValueStore:
    """Rank 0 of 1 joins through ``start`` (``env://``, its store on a port the system picks)."""
    for name, value in (
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "0"),
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
    ):
        monkeypatch.setenv(name, value)
    return start(DistributedConfig(backend="gloo"), torch.device("cpu"))[1]


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> Iterator[KeyValueStore]:
    try:
        yield join(monkeypatch)
    finally:
        stop()


def test_a_rank_that_failed_on_its_own_is_named_before_the_ranks_that_lost_it(store: KeyValueStore) -> None:
    announce_failure(store, 1, "RuntimeError: Connection closed by peer [127.0.0.1]:1")
    announce_failure(store, 2, "ValueError: bad batch")
    assert failure_reason(store, 0, 3, LOST, wait=0.1) == f"rank 2: ValueError: bad batch (here: {LOST})"


def test_a_lost_connection_names_the_rank_that_said_nothing(store: KeyValueStore) -> None:
    announce_failure(store, 2, "RuntimeError: Connection closed by peer [127.0.0.1]:1")
    assert failure_reason(store, 0, 3, LOST, wait=0.1) == (
        f"rank 1 was lost: it ended without reporting an error (here: {LOST})"
    )


def test_a_lost_connection_names_every_rank_that_said_nothing(store: KeyValueStore) -> None:
    assert failure_reason(store, 0, 3, LOST, wait=0.1) == (
        f"ranks 1, 2 were lost: they ended without reporting an error (here: {LOST})"
    )


def test_a_lost_connection_when_every_rank_lost_one_says_another_rank_was_lost(store: KeyValueStore) -> None:
    announce_failure(store, 1, "RuntimeError: Broken pipe")
    assert failure_reason(store, 0, 2, LOST, wait=0.1) == f"another rank was lost (here: {LOST})"


def test_a_rank_that_failed_on_its_own_first_keeps_its_reason(store: KeyValueStore) -> None:
    announce_failure(store, 1, "RuntimeError: Connection closed by peer [127.0.0.1]:1")
    assert failure_reason(store, 0, 2, "ValueError: bad batch", wait=0.1) == "ValueError: bad batch"


def test_without_a_process_group_a_lost_connection_names_no_rank() -> None:
    assert failure_reason(None, 0, 2, LOST, wait=0.1) == f"another rank was lost (here: {LOST})"
    assert failure_reason(None, 0, 2, "ValueError: bad batch", wait=0.1) == "ValueError: bad batch"


def test_the_reason_goes_into_torchelastics_error_file_as_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    before = int(time.time())
    record_failure(f"rank 2: ValueError: bad batch (here: {LOST})")
    data = json.loads(error_file.read_text())
    stamp = data["message"]["extraInfo"].pop("timestamp")
    assert before <= int(stamp) <= time.time()
    assert data == {
        "message": {
            "message": f"RunFailed: rank 2: ValueError: bad batch (here: {LOST})",
            "extraInfo": {
                "py_callstack": f"traintel.run.distributed.RunFailed: rank 2: ValueError: bad batch (here: {LOST})\n"
            },
        }
    }


def test_without_torchelastics_error_file_nothing_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    monkeypatch.chdir(tmp_path)
    record_failure("ValueError: bad batch")
    assert os.listdir(tmp_path) == []
