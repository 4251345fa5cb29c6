"""A run that also logs a value of its own: ``python -m tests.helpers.metrics_run CONFIG [KEY=VALUE ...]``.

As ``traintel train --config CONFIG --set KEY=VALUE ...`` (JSON lines on stdout), through the Python
API, with an EPOCH_COMPLETED handler that logs the model's weight norm with ``Run.log`` as
``LOGGED``. Exits 0 when the run completed, else 1. Torch and traintel are imported in the child
only: a test imports this module for ``LOGGED`` without paying for them.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from traintel.run.api import Run

LOGGED = "weight_norm"
"""The name the handler logs."""


def log_weight_norm(run: Run) -> None:
    """``Run.log`` the L2 norm of every parameter of ``run.model`` at each epoch's end."""
    import torch
    from ignite.engine import Engine, Events

    def handler(_: Engine) -> None:
        with torch.no_grad():
            norm = torch.sqrt(sum((p.detach().pow(2).sum() for p in run.model.parameters()), torch.zeros(())))
        run.log({LOGGED: norm})

    run.trainer.add_event_handler(Events.EPOCH_COMPLETED, handler)


def main(argv: list[str]) -> int:
    from traintel.config import load_config
    from traintel.run.api import build

    run = build(load_config(argv[0], argv[1:]))
    log_weight_norm(run)
    return 0 if run.run().status == "completed" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
