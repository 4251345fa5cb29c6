"""The per-step agreement packs items, stop and deliver into one int64; unpacked exactly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from traintel.engine.coordination import Agreement, ProcessGroupCoordinator


@pytest.fixture
def group(tmp_path: Path) -> Iterator[None]:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.usefixtures("group")
@pytest.mark.parametrize(
    ("items", "stop", "deliver", "expected"),
    [
        (0, False, False, Agreement(0, False, False)),
        (96, True, False, Agreement(96, True, False)),
        (7, False, True, Agreement(7, False, True)),
        (2**39 - 1, True, True, Agreement(2**39 - 1, True, True)),
    ],
)
def test_one_rank_agrees_with_itself_exactly(
    items: int, stop: bool, deliver: bool, expected: Agreement
) -> None:
    c = ProcessGroupCoordinator(torch.device("cpu"))
    c.stop_requested, c.deliver_requested = stop, deliver
    assert c.agree(items) == expected == c.last
    assert c.deliver_requested is False  # a delivery is asked for once
    assert c.agree(items).stop is stop  # a stop request stands until the run ends


@pytest.mark.usefixtures("group")
def test_a_window_too_large_to_pack_is_refused() -> None:
    c = ProcessGroupCoordinator(torch.device("cpu"))
    with pytest.raises(ValueError, match=r"^a window of 549755813888 items on one rank is more than"):
        c.agree(2**39)
