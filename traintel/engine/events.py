"""traintel's custom Ignite events, fired inside one optimizer step.

One Ignite iteration is one optimizer step over an accumulation window::

    EPOCH_STARTED
    for window in epoch's windows:            # ceil(B/k) windows, the last may be shorter
        ITERATION_STARTED
        for micro_batch in window:            # N_t = items in the window, counted first
            forward, loss = raw * n_b / N_t
            loss.backward()
            MICRO_BATCH_COMPLETED             # state.micro_batch: this micro-batch
        clip gradients (optional)
        OPTIMIZER_STEP_STARTED                # gradients are complete: inspect .grad here
        optimizer.step(); scheduler.step(); optimizer.zero_grad()
        ITERATION_COMPLETED                   # state.output = step loss tensor, state.step_output
    EPOCH_COMPLETED

A window with no items (N_t = 0) runs no forward/backward and no optimizer step; it
still completes its iteration with ``step_output.skipped`` set.
"""

from __future__ import annotations

from ignite.engine import EventEnum


class TraintelEvents(EventEnum):
    """Events registered on every traintel trainer (see the module docstring for order)."""

    MICRO_BATCH_COMPLETED = "micro_batch_completed"
    OPTIMIZER_STEP_STARTED = "optimizer_step_started"
