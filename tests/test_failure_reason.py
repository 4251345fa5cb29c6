"""``run.end``'s reason for a failed rank: the rank the failure came from, read from the other ranks'
announcements in the process group's store (a real gloo group of one process, with a file store,
standing in for a larger job's)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch.distributed as dist

from traintel.run.distributed import announce_failure, failure_reason

LOST = "RuntimeError: [pair.cc:537] Read error [127.0.0.1]:4242: Connection reset by peer"
"""A rank's own error when the connection to another rank closed under it (gloo's text)."""


@pytest.fixture
def group(tmp_path: Path) -> Iterator[None]:
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.usefixtures("group")
def test_a_rank_that_failed_on_its_own_is_named_before_the_ranks_that_lost_it() -> None:
    announce_failure(1, "RuntimeError: Connection closed by peer [127.0.0.1]:1")
    announce_failure(2, "ValueError: bad batch")
    assert failure_reason(0, 3, LOST, wait=0.1) == f"rank 2: ValueError: bad batch (here: {LOST})"


@pytest.mark.usefixtures("group")
def test_a_lost_connection_names_the_rank_that_said_nothing() -> None:
    announce_failure(2, "RuntimeError: Connection closed by peer [127.0.0.1]:1")
    assert failure_reason(0, 3, LOST, wait=0.1) == (
        f"rank 1 was lost: it ended without reporting an error (here: {LOST})"
    )


@pytest.mark.usefixtures("group")
def test_a_lost_connection_names_every_rank_that_said_nothing() -> None:
    assert failure_reason(0, 3, LOST, wait=0.1) == (
        f"ranks 1, 2 were lost: they ended without reporting an error (here: {LOST})"
    )


@pytest.mark.usefixtures("group")
def test_a_lost_connection_when_every_rank_lost_one_says_another_rank_was_lost() -> None:
    announce_failure(1, "RuntimeError: Broken pipe")
    assert failure_reason(0, 2, LOST, wait=0.1) == f"another rank was lost (here: {LOST})"


@pytest.mark.usefixtures("group")
def test_a_rank_that_failed_on_its_own_first_keeps_its_reason() -> None:
    announce_failure(1, "RuntimeError: Connection closed by peer [127.0.0.1]:1")
    assert failure_reason(0, 2, "ValueError: bad batch", wait=0.1) == "ValueError: bad batch"


def test_without_a_process_group_a_lost_connection_names_no_rank() -> None:
    assert failure_reason(0, 2, LOST, wait=0.1) == f"another rank was lost (here: {LOST})"
    assert failure_reason(0, 2, "ValueError: bad batch", wait=0.1) == "ValueError: bad batch"
