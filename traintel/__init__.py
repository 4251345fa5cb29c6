"""traintel: an Ignite training engine whose loss is computed once and reported identically everywhere.

The public names below are imported lazily, so ``import traintel`` (and the CLI's
``--help``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "traintel.config",
    "load_config": "traintel.config",
    "ConfigError": "traintel.errors",
    "TraintelError": "traintel.errors",
    "SCHEMA_VERSION": "traintel.records",
    "Record": "traintel.records",
    "BatchRecord": "traintel.records",
    "StepRecord": "traintel.records",
    "EpochRecord": "traintel.records",
    "EvalRecord": "traintel.records",
    "MetricRecord": "traintel.records",
    "CheckpointRecord": "traintel.records",
    "RunStartRecord": "traintel.records",
    "RunEndRecord": "traintel.records",
    "SinkErrorRecord": "traintel.records",
    "Task": "traintel.task",
    "Run": "traintel.run.api",
    "build": "traintel.run.api",
    "train": "traintel.run.api",
    "TraintelEvents": "traintel.engine.events",
    "create_trainer": "traintel.engine.trainer",
    "WindowedLoader": "traintel.engine.windows",
    "Sink": "traintel.sinks.base",
    "RunContext": "traintel.sinks.base",
    "FanOut": "traintel.sinks.fanout",
    "MemorySink": "traintel.sinks.memory",
    "score": "traintel.handlers.evaluation",
}

__all__ = [
    "SCHEMA_VERSION",
    "BatchRecord",
    "CheckpointRecord",
    "Config",
    "ConfigError",
    "EpochRecord",
    "EvalRecord",
    "FanOut",
    "MemorySink",
    "MetricRecord",
    "Record",
    "Run",
    "RunContext",
    "RunEndRecord",
    "RunStartRecord",
    "Sink",
    "SinkErrorRecord",
    "StepRecord",
    "Task",
    "TraintelError",
    "TraintelEvents",
    "WindowedLoader",
    "__version__",
    "build",
    "create_trainer",
    "load_config",
    "score",
    "train",
]

if TYPE_CHECKING:
    from traintel.config import Config, load_config
    from traintel.engine.events import TraintelEvents
    from traintel.engine.trainer import create_trainer
    from traintel.engine.windows import WindowedLoader
    from traintel.errors import ConfigError, TraintelError
    from traintel.handlers.evaluation import score
    from traintel.records import (
        SCHEMA_VERSION,
        BatchRecord,
        CheckpointRecord,
        EpochRecord,
        EvalRecord,
        MetricRecord,
        Record,
        RunEndRecord,
        RunStartRecord,
        SinkErrorRecord,
        StepRecord,
    )
    from traintel.run.api import Run, build, train
    from traintel.sinks.base import RunContext, Sink
    from traintel.sinks.fanout import FanOut
    from traintel.sinks.memory import MemorySink
    from traintel.task import Task


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        msg = f"module 'traintel' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
