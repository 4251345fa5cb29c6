"""The training engine: windows, the accumulating update step, the trainer and evaluator, and what
several ranks need (agreement, DDP step, shards)."""

from traintel.engine.coordination import Agreement, Coordinator, ProcessGroupCoordinator
from traintel.engine.ddp import DistributedStep, sum_hook
from traintel.engine.evaluator import create_evaluator
from traintel.engine.events import TraintelEvents
from traintel.engine.loss import WindowLoss, loss_scale
from traintel.engine.outputs import MicroBatchOutput, StepOutput
from traintel.engine.progress import EpochLoss, Progress
from traintel.engine.shards import ShardSampler, shard
from traintel.engine.state import TraintelState
from traintel.engine.step import AccumulatingStep
from traintel.engine.trainer import TraintelEngine, create_trainer
from traintel.engine.windows import Window, WindowedLoader

__all__ = [
    "AccumulatingStep",
    "Agreement",
    "Coordinator",
    "DistributedStep",
    "EpochLoss",
    "MicroBatchOutput",
    "ProcessGroupCoordinator",
    "Progress",
    "ShardSampler",
    "StepOutput",
    "TraintelEngine",
    "TraintelEvents",
    "TraintelState",
    "Window",
    "WindowLoss",
    "WindowedLoader",
    "create_evaluator",
    "create_trainer",
    "loss_scale",
    "shard",
    "sum_hook",
]
