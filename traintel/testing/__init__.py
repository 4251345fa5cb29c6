"""Test helpers for sink authors: record builders, an in-memory sink, and a contract check that
drives a real run.

``batch_record(**overrides)``, ``step_record``, ``epoch_record``, ``eval_record``,
``metric_record``, ``checkpoint_record``, ``end_record`` and ``make_record(event, **overrides)``
build one record with fixed, plausible values (time ``T0``, run id ``r1``, rank 0 of 1, attempt 0) that a test
overrides where it matters (``attempt=1`` for a resumed run's records); ``run_context(run_dir)``
is the matching ``RunContext`` (``run_context(run_dir, attempt=1)`` for a resumed attempt).

``check_sink(factory)`` builds sinks from ``factory`` and runs each through a short,
real training run (two runs, so a sink survives open/close twice). It asserts the
sink contract: ``open`` exactly once before any record, every record delivered once,
in order and unchanged (the very objects the in-memory reference sink received),
``close`` exactly once after the last record and harmless when repeated, and no
exception from the sink (the fan-out would have isolated it), and no delivery longer than
``max_emit_seconds`` on the training thread. With ``read_back``, the values the sink wrote
are compared with the reference records: a field present in both must hold the identical
value. It then resumes a checkpointed attempt in the same run directory with a fresh sink,
whose read_back must hold both attempts' rows (``resume=False`` skips it), and with
``ranks="all"`` opens two sinks side by side as ranks 0 and 1.
"""

from traintel.sinks.memory import MemorySink
from traintel.testing.contract import ContractResult, SinkContractError, check_sink, contract_config
from traintel.testing.records import (
    T0,
    batch_record,
    checkpoint_record,
    end_record,
    epoch_record,
    eval_record,
    make_record,
    metric_record,
    run_context,
    step_record,
)

__all__ = [
    "T0",
    "ContractResult",
    "MemorySink",
    "SinkContractError",
    "batch_record",
    "check_sink",
    "checkpoint_record",
    "contract_config",
    "end_record",
    "epoch_record",
    "eval_record",
    "make_record",
    "metric_record",
    "run_context",
    "step_record",
]
