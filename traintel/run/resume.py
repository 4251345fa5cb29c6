"""Whether a run continues an earlier attempt in its run directory, and from which checkpoint.

``<run dir>/checkpoints/run.json`` names the run id and the newest attempt that started there
(written by rank 0 when an attempt starts). A new attempt in the same directory keeps that run
id and takes the next attempt number; it continues from the newest checkpoint that every rank
holds complete, or trains from the start when there is none (a container restarted before its
first checkpoint). The settings that change the maths must be those the checkpoint was taken
with.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from traintel.config import Config, SchedulerConfig
from traintel.engine.coordination import Coordinator
from traintel.errors import ConfigError
from traintel.run import checkpoint, layout
from traintel.run.checkpointing import epochs_done
from traintel.sinks.io.atomic import write_atomic

FIXED_TRAINER_KEYS = (
    "accumulation_steps",
    "optimizer",
    "scheduler",
    "grad_clip_norm",
    "precision",
    "on_nonfinite",
)
"""``trainer.*`` settings a resumed attempt must share with its checkpoint (with ``task.*``,
``FIXED_RUN_KEYS``, the world size and the loader's batch size): they change what an optimizer step
computes."""
FIXED_RUN_KEYS = ("seed",)
"""``run.*`` settings a resumed attempt must share with its checkpoint: the seed makes the task's
data and model (the factory runs after it) and the shards' order. Checkpoints written before it was
recorded have no ``run`` entry, which is no change (``checkpoint.changed_setting``)."""


@dataclass(frozen=True)
class Resumption:
    """How this attempt relates to the run directory's earlier ones."""

    run_id: str
    attempt: int
    state: dict[str, Any] | None
    """The checkpoint to continue from (loaded on the CPU), or None to train from the start."""

    @property
    def step(self) -> int | None:
        return None if self.state is None else int(self.state["step"])


def fixed_settings(config: Config, world_size: int, batch_size: int | None) -> dict[str, Any]:
    """What must not change between a checkpoint and the attempt that continues from it."""
    data = config.to_dict(redact=True)
    trainer = {key: data["trainer"][key] for key in FIXED_TRAINER_KEYS}
    trainer["scheduler"] = _given_schedule(trainer["scheduler"])
    return {
        "run": {key: data["run"][key] for key in FIXED_RUN_KEYS},
        "task": data["task"],
        "trainer": trainer,
        "world_size": world_size,
        "batch_size": batch_size,
    }


def read_run_file(directory: Path) -> dict[str, Any] | None:
    """``run.json``'s run id and attempt, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads((directory / layout.RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("run_id"), str)
        or type(data.get("attempt")) is not int
    ):
        return None
    return data


def write_run_file(
    directory: Path, run_id: str, attempt: int, *, completed: Mapping[str, int] | None = None
) -> None:
    """``run.json``: the run id and the attempt that started; ``completed`` (``step``, ``epochs``)
    once that attempt has trained all of its epochs."""
    directory.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"run_id": run_id, "attempt": attempt}
    if completed is not None:
        data["completed"] = dict(completed)
    write_atomic(directory / layout.RUN_FILE, json.dumps(data) + "\n")


def find(run_dir: Path, coordinator: Coordinator, *, required: bool) -> Resumption | None:
    """The earlier attempt this one continues, or None when the directory holds none.

    Every rank removes its leftover temporary files, then the ranks agree on the newest step
    for which each holds a complete checkpoint that loads: each loads its newest among the
    steps all hold complete (a damaged one is skipped with a warning); when the ranks' steps
    differ, every step above the smallest is dropped and the ranks try again. ``required``
    (``--resume``): a directory without such a checkpoint is a ConfigError.
    """
    directory = run_dir / layout.CHECKPOINT_DIRECTORY
    rank = coordinator.rank
    checkpoint.remove_temporary(directory, rank)
    found = checkpoint.complete(directory, rank)
    steps = {c.step for c in found}
    newest_size = found[0].world_size if found else None
    previous = read_run_file(directory)
    views = coordinator.gather((sorted(steps), previous, newest_size))
    sizes = {size for *_, size in views if size is not None}
    if sizes and coordinator.world_size not in sizes:  # its windows were the other ranks'
        raise ConfigError(
            "world_size",
            f"cannot change when resuming the run in {str(run_dir)!r}: its checkpoint has "
            f"{max(sizes)}, this attempt {coordinator.world_size}",
        )
    candidates = set.intersection(*(set(s) for s, _, _ in views))
    earlier = [p for _, p, _ in views if p is not None]
    loaded: tuple[checkpoint.Complete, dict[str, Any]] | None = None
    while True:
        if loaded is None or loaded[0].step not in candidates:
            loaded = checkpoint.newest(directory, rank, steps=candidates) if candidates else None
        loaded_steps = coordinator.gather(None if loaded is None else loaded[0].step)
        if len(set(loaded_steps)) == 1:
            break
        # some rank could not load a newer step: none of the ranks may continue from above its own
        lowest = None if None in loaded_steps else min(loaded_steps)
        candidates = {s for s in candidates if lowest is not None and s <= lowest}
    if loaded is None:
        if required:
            raise ConfigError("--resume", f"{str(directory)!r} holds no complete checkpoint to resume from")
        if not earlier:
            return None
        # an attempt started here but took no checkpoint: train from the start, as the next attempt
        return Resumption(earlier[0]["run_id"], 1 + max(p["attempt"] for p in earlier), None)
    state = loaded[1]
    attempts = [state["attempt"], *(p["attempt"] for p in earlier)]
    return Resumption(str(state["run_id"]), 1 + max(attempts), state)


_SCHEDULE = TypeAdapter(SchedulerConfig)


def _given_schedule(value: Any) -> Any:
    """A scheduler's settings without the arguments at their defaults: ``{name: step, step_size: 2}``
    and ``{name: step, step_size: 2, gamma: 0.1}`` are one setting, whichever a checkpoint holds."""
    try:
        return _SCHEDULE.validate_python(value).model_dump(mode="json", exclude_defaults=True)
    except ValidationError:  # null, or what an older checkpoint holds as it is
        return value


def check_settings(saved: Mapping[str, Any], current: Mapping[str, Any], where: Path) -> None:
    """A ConfigError naming the first setting that differs from the checkpoint's."""
    trainer = saved.get("trainer")
    if isinstance(trainer, Mapping) and "scheduler" in trainer:
        saved = {**saved, "trainer": {**trainer, "scheduler": _given_schedule(trainer["scheduler"])}}
    changed = checkpoint.changed_setting(saved, current)
    if changed is None:
        return
    key, before, after = changed
    raise ConfigError(
        key,
        f"cannot change when resuming the run in {str(where)!r}: its checkpoint has {before!r}, "
        f"this attempt {after!r}",
    )


def completed(run_dir: Path, coordinator: Coordinator) -> tuple[int, int] | None:
    """``(step, epochs)`` when the run's newest attempt trained all its epochs (rank 0's ``run.json``
    says so, on every rank), else None: its last checkpoint may be older than its end."""
    note = read_run_file(run_dir / layout.CHECKPOINT_DIRECTORY) if coordinator.rank == 0 else None
    done = note.get("completed") if note is not None else None
    if not (isinstance(done, dict) and type(done.get("step")) is int and type(done.get("epochs")) is int):
        done = None
    shared = coordinator.gather(None if done is None else (done["step"], done["epochs"]))[0]
    return None if shared is None else (int(shared[0]), int(shared[1]))


def decide(
    config: Config,
    run_dir: Path,
    run_id: str,
    settings: Mapping[str, Any],
    coordinator: Coordinator,
    *,
    must_resume: bool,
) -> Resumption:
    """The attempt this process is: the first of a new run (``run_id``, attempt 0), or with
    ``run.resume: auto`` the next attempt of the run in ``run_dir`` (its run id, from its newest
    checkpoint when there is one), after checking that the settings that change the maths are the
    checkpoint's, that a configured ``run.id`` is that run's and that epochs are left to train.
    ``must_resume`` (``--resume``) makes a missing checkpoint a ConfigError."""
    fresh = Resumption(run_id, 0, None)
    if config.run.resume != "auto":
        directory = run_dir / layout.CHECKPOINT_DIRECTORY
        if config.checkpoint.enabled and checkpoint.complete(directory, coordinator.rank):
            raise ConfigError(
                "run.dir",
                f"{str(run_dir)!r} holds an earlier run's checkpoints; continue it with "
                "'traintel train --resume' or run.resume=auto, or choose another run.dir",
            )
        return fresh
    if config.run.dir is None:
        raise ConfigError("run.resume", "auto needs a fixed run.dir, where the checkpoints are kept")
    if not must_resume and not config.checkpoint.enabled:
        raise ConfigError(
            "run.resume", "auto needs checkpoints: set checkpoint.every_steps or checkpoint.every_epochs"
        )
    found = find(run_dir, coordinator, required=must_resume)
    if found is None:
        return fresh
    if config.run.id is not None and config.run.id != found.run_id:  # keeps its id: refuse, not ignore
        raise ConfigError(
            "run.id",
            f"cannot change when resuming the run in {str(run_dir)!r}: its id is {found.run_id!r}, "
            f"this attempt {config.run.id!r}; leave run.id null or set it to {found.run_id!r}",
        )
    max_epochs = config.trainer.max_epochs
    if found.state is not None:
        check_settings(found.state["settings"], settings, run_dir)
    if found.state is not None and (done := epochs_done(found.state)) >= max_epochs:
        raise ConfigError(
            "trainer.max_epochs",
            f"the checkpoint at step {found.state['step']} has {done} epochs done, which reaches "
            f"max_epochs {max_epochs}; raise trainer.max_epochs to train on",
        )
    max_steps = config.trainer.max_steps
    if found.state is not None and max_steps is not None and (step := int(found.state["step"])) >= max_steps:
        raise ConfigError(
            "trainer.max_steps",
            f"the checkpoint at step {step} reaches max_steps {max_steps}; raise trainer.max_steps to "
            "train on",
        )
    ended = completed(run_dir, coordinator)  # run.json knows of an end, which the checkpoint may predate
    if ended is not None and max_steps is not None and ended[0] >= max_steps:
        raise ConfigError(
            "trainer.max_steps",
            f"the run completed at step {ended[0]}, which reaches max_steps {max_steps}; raise "
            "trainer.max_steps to train on",
        )
    if ended is not None and ended[1] >= max_epochs:
        raise ConfigError(
            "trainer.max_epochs",
            f"the run completed its {ended[1]} epochs at step {ended[0]}, which reaches "
            f"max_epochs {max_epochs}; raise trainer.max_epochs to train on",
        )
    return found
