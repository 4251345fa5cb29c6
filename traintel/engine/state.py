"""The trainer's Ignite ``State``: traintel's attributes declared, ``output`` computed when first read."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ignite.engine import Engine
from ignite.engine.events import State

from traintel.engine.loss import WindowLoss
from traintel.engine.progress import Progress

if TYPE_CHECKING:
    from traintel.engine.outputs import MicroBatchOutput, StepOutput


class TraintelState(State):
    """Ignite's ``State`` with traintel's attributes, whose ``output`` may be a ``WindowLoss``.

    The update step hands Ignite its step loss as a ``WindowLoss``: reading ``output`` (a
    handler, a metric, a progress bar) sums it then, once, into the float64 tensor, so a
    step whose output nobody reads costs no summation. Everything else is Ignite's State.
    """

    _output: Any = None

    def __init__(self, progress: Progress | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.progress: Progress = progress if progress is not None else Progress()
        """The run's position: epoch counts and loss sum, run totals (``state_dict`` round-trips)."""
        self.step_output: StepOutput | None = None
        """The last optimizer step, from ITERATION_COMPLETED on."""
        self.micro_batch: MicroBatchOutput | None = None
        """The micro-batch just run, from its MICRO_BATCH_COMPLETED on (the step's last until the next)."""
        self.stop_reason: str | None = None
        """Why the run is being stopped (a signal's name), when something stops it."""
        self.step_limit: int | None = None
        """``trainer.max_steps``, once the run has taken that many optimizer steps (``limit_steps``)."""
        self.epoch_cut = False
        """Whether the step limit ended the run in the middle of an epoch, before its end."""
        self.evaluated: dict[str, Any] = {}
        """The newest ``eval.epoch`` record of each validation loader, by split (``traintel.score``)."""

    @property
    def output(self) -> Any:
        value = self._output
        if isinstance(value, WindowLoss):
            value = self._output = value.resolve()
        return value

    @output.setter
    def output(self, value: Any) -> None:
        self._output = value


def traintel_state(engine: Engine) -> TraintelState:
    """The engine's ``TraintelState``; a TypeError for an engine not made by ``create_trainer``."""
    state = engine.state
    if not isinstance(state, TraintelState):
        msg = f"traintel's handlers need a trainer made by create_trainer, got a {type(state).__name__}"
        raise TypeError(msg)
    return state
