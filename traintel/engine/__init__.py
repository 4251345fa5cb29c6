"""The training engine: windows, the accumulating update step, the trainer and evaluator."""

from traintel.engine.evaluator import create_evaluator
from traintel.engine.events import TraintelEvents
from traintel.engine.optim import build_optimizer, build_scheduler
from traintel.engine.step import AccumulatingStep, MicroBatchOutput, StepOutput
from traintel.engine.trainer import create_trainer
from traintel.engine.windows import Window, WindowedLoader

__all__ = [
    "AccumulatingStep",
    "MicroBatchOutput",
    "StepOutput",
    "TraintelEvents",
    "Window",
    "WindowedLoader",
    "build_optimizer",
    "build_scheduler",
    "create_evaluator",
    "create_trainer",
]
