"""The training engine: windows, the accumulating update step, the trainer and evaluator."""

from traintel.engine.evaluator import create_evaluator
from traintel.engine.events import TraintelEvents
from traintel.engine.optim import build_optimizer, build_scheduler
from traintel.engine.state import TraintelState
from traintel.engine.step import AccumulatingStep, MicroBatchOutput, StepOutput, Totals, WindowLoss
from traintel.engine.trainer import TraintelEngine, create_trainer
from traintel.engine.windows import Window, WindowedLoader

__all__ = [
    "AccumulatingStep",
    "MicroBatchOutput",
    "StepOutput",
    "Totals",
    "TraintelEngine",
    "TraintelEvents",
    "TraintelState",
    "Window",
    "WindowLoss",
    "WindowedLoader",
    "build_optimizer",
    "build_scheduler",
    "create_evaluator",
    "create_trainer",
]
