"""Ignite handlers that turn the trainer's step outputs into records."""

from traintel.handlers.evaluation import Evaluation
from traintel.handlers.lifecycle import RunLifecycle
from traintel.handlers.telemetry import TrainTelemetry, scale_check

__all__ = ["Evaluation", "RunLifecycle", "TrainTelemetry", "scale_check"]
