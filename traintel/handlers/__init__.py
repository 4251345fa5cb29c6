"""Ignite handlers that turn the trainer's step outputs into records."""

from traintel.handlers.evaluation import EvaluateEachEpoch
from traintel.handlers.lifecycle import RunLifecycle
from traintel.handlers.telemetry import TrainTelemetry, scale_check

__all__ = ["EvaluateEachEpoch", "RunLifecycle", "TrainTelemetry", "scale_check"]
