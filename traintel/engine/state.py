"""The trainer's Ignite ``State``: ``output`` may be computed when first read."""

from __future__ import annotations

from typing import Any

from ignite.engine.events import State


class Deferred:
    """A value computed on first use; ``resolve()`` computes (once) and returns it."""

    __slots__ = ()

    def resolve(self) -> Any:
        raise NotImplementedError


class TraintelState(State):
    """Ignite's ``State`` whose ``output`` may be set to a ``Deferred`` value.

    The update step hands Ignite its step loss as a ``WindowLoss``: reading ``output`` (a
    handler, a metric, a progress bar) sums it then, once, into the float64 tensor, so a
    step whose output nobody reads costs no summation. Everything else is Ignite's State.
    """

    _output: Any = None

    @property
    def output(self) -> Any:
        value = self._output
        if isinstance(value, Deferred):
            value = self._output = value.resolve()
        return value

    @output.setter
    def output(self, value: Any) -> None:
        self._output = value
