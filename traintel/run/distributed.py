"""torch.distributed from the launcher's environment: the process group, the device, the run id.

``torchrun`` (or a Kubernetes operator running it) sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` for each process; without ``RANK`` and
``WORLD_SIZE`` a run is one process and nothing here is used.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from traintel.config import DistributedConfig
from traintel.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Launch:
    """Where this process sits in a torchrun job."""

    rank: int
    world_size: int
    local_rank: int
    restart_count: int
    """``TORCHELASTIC_RESTART_COUNT``: how often torchrun has restarted the workers."""
    run_id: str | None
    """``TORCHELASTIC_RUN_ID`` when set and not ``none``."""


def _int_env(environ: Mapping[str, str], name: str, low: int, default: int | None = None) -> int:
    raw = environ.get(name)
    if raw is None:
        if default is None:
            raise ConfigError(
                f"environment {name}", "is not set; torchrun sets RANK, WORLD_SIZE and LOCAL_RANK"
            )
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"environment {name}", f"must be an integer >= {low}, got {raw!r}") from None
    if value < low:
        raise ConfigError(f"environment {name}", f"must be an integer >= {low}, got {raw!r}")
    return value


def launch_from_env(environ: Mapping[str, str] | None = None) -> Launch | None:
    """The launch this process is part of, or None without ``RANK``/``WORLD_SIZE`` (one process)."""
    env = os.environ if environ is None else environ
    if "RANK" not in env and "WORLD_SIZE" not in env:
        return None
    world_size = _int_env(env, "WORLD_SIZE", 1)
    rank = _int_env(env, "RANK", 0)
    if rank >= world_size:
        raise ConfigError("environment RANK", f"must be below WORLD_SIZE={world_size}, got {rank}")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not env.get(name):
            raise ConfigError(
                f"environment {name}", "is not set; torchrun sets it (or give --master-addr/--master-port)"
            )
    run_id = env.get("TORCHELASTIC_RUN_ID")
    return Launch(
        rank=rank,
        world_size=world_size,
        local_rank=_int_env(env, "LOCAL_RANK", 0, default=0),
        restart_count=_int_env(env, "TORCHELASTIC_RESTART_COUNT", 0, default=0),
        run_id=run_id if run_id and run_id != "none" else None,
    )


def device_for(launch: Launch, device: torch.device) -> torch.device:
    """``cuda:LOCAL_RANK`` on GPUs (made current), else ``device``."""
    if device.type != "cuda":
        return device
    if launch.local_rank >= torch.cuda.device_count():
        raise ConfigError(
            "environment LOCAL_RANK",
            f"is {launch.local_rank} but only {torch.cuda.device_count()} CUDA devices are visible",
        )
    cuda = torch.device("cuda", launch.local_rank)
    torch.cuda.set_device(cuda)
    return cuda


def backend_for(cfg: DistributedConfig, device: torch.device) -> str:
    """``trainer.distributed.backend``; ``auto`` is nccl on CUDA, gloo on CPU."""
    if cfg.backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if cfg.backend == "nccl" and device.type != "cuda":
        raise ConfigError("trainer.distributed.backend", "nccl needs CUDA devices; use gloo or auto on CPU")
    return cfg.backend


class KeyValueStore(Protocol):
    """What traintel uses of a ``torch.distributed.Store``: the one the process group was joined
    with (``start``), where the ranks announce their failures (``announce_failure``)."""

    def set(self, key: str, value: str) -> None: ...
    def check(self, keys: list[str]) -> bool: ...
    def get(self, key: str) -> bytes: ...


def start(cfg: DistributedConfig, device: torch.device, restart_count: int = 0) -> tuple[str, KeyValueStore]:
    """Join the default process group (``env://``); returns the backend and the group's store.

    torchrun keeps one key-value store across the restarts of its workers (``--max-restarts``),
    so the keys of the previous attempt's process group are still there: a rank that reaches the
    group before its peers have replaced them reads a dead peer's address and fails to connect.
    Each restart therefore gets its own key prefix, ``traintel/restart<n>/``.
    """
    import torch.distributed as dist
    from torch.distributed import PrefixStore  # type: ignore[attr-defined]  # public, re-exported untyped
    from torch.distributed.rendezvous import rendezvous

    backend = backend_for(cfg, device)
    timeout = datetime.timedelta(seconds=cfg.timeout_seconds)
    shared, rank, world_size = next(rendezvous("env://", timeout=timeout))
    store = PrefixStore(f"traintel/restart{restart_count}/", shared)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    return backend, store


def stop() -> None:
    """Leave the default process group, when this process is in one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shared_run_id(launch: Launch, fallback: str) -> str:
    """The run id every rank uses: ``TORCHELASTIC_RUN_ID``, else rank 0's ``fallback``, broadcast."""
    if launch.run_id is not None:
        return launch.run_id
    import torch.distributed as dist

    box: list[object] = [fallback if launch.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return str(box[0])


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest ``value`` of any rank (one ``all_reduce``)."""
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


_FAILURE_KEY = "traintel/failed/rank{}"


def announce_failure(store: KeyValueStore | None, rank: int, reason: str) -> None:
    """Leave this rank's failure in the group's ``store``, where the other ranks look for it (best
    effort; nothing without a store)."""
    if store is not None:
        with contextlib.suppress(Exception):
            store.set(_FAILURE_KEY.format(rank), reason)


_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
"""What gloo's error says when the connection to another rank closed under it: that rank's process
ended (killed, out of memory) or its machine is gone."""


def lost_peer(reason: str) -> bool:
    """Whether a failure's one-line reason is a connection to another rank that closed under it."""
    return any(marker in reason for marker in _PEER_LOST)


def failure_reason(
    store: KeyValueStore | None, rank: int, world_size: int, reason: str, wait: float = 1.0
) -> str:
    """``reason`` (this rank's failure, announced with ``announce_failure``) as ``run.end`` gives it,
    naming the rank the failure came from, after waiting up to ``wait`` seconds for the other ranks'
    announcements:

    - another rank failed on its own (its announced reason is not a lost connection):
      ``rank <r>: <its reason> (here: <reason>)``;
    - ``reason`` is a lost connection (``lost_peer``): the ranks that announced nothing were lost,
      ``rank <r> was lost: it ended without reporting an error (here: <reason>)``, or ``another rank
      was lost (here: <reason>)`` when the store cannot tell which;
    - else ``reason``: this rank failed first.
    """
    here_lost = lost_peer(reason)
    others = [r for r in range(world_size) if r != rank]
    announced: dict[int, str] = {}
    reached = False
    deadline = time.monotonic() + wait
    while store is not None:
        for r in others:
            key = _FAILURE_KEY.format(r)
            with contextlib.suppress(Exception):
                if r not in announced and store.check([key]):
                    announced[r] = store.get(key).decode()
                reached = True
        first = next((r for r in sorted(announced) if not lost_peer(announced[r])), None)
        if first is not None:
            return f"rank {first}: {announced[first]} (here: {reason})"
        if len(announced) == len(others) or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if not here_lost:
        return reason
    silent = [r for r in others if r not in announced]
    if not reached or not silent:
        return f"another rank was lost (here: {reason})"
    if len(silent) == 1:
        return f"rank {silent[0]} was lost: it ended without reporting an error (here: {reason})"
    named = ", ".join(str(r) for r in silent)
    return f"ranks {named} were lost: they ended without reporting an error (here: {reason})"


class RunFailed(Exception):
    """A rank's failure as ``run.end`` gives it (``failure_reason``), for torchrun's summary."""


def record_failure(reason: str) -> None:
    """Write this rank's failure, ``reason`` (``run.end``'s), into torchelastic's error file through
    its public handler, so that torchrun's failure summary shows it for this rank, not ``<N/A>``.

    Only under torchrun, which names a file for each worker in ``TORCHELASTIC_ERROR_FILE`` (without
    it the handler writes nothing either). The summary prints the traceback the handler records,
    here the one line ``traintel.run.distributed.RunFailed: <reason>``: no stack (the log record
    ``training failed`` has it) and no more than the one-line reason, URL credentials redacted.
    Best effort: a file that cannot be written changes nothing else.
    """
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    try:
        raise RunFailed(reason) from None
    except RunFailed as exc:  # the handler records the exception being handled, with its traceback
        exc.__traceback__ = None  # which is the exception's own (Python 3.11+): no stack, one line
        with contextlib.suppress(OSError):
            get_error_handler().record_exception(exc)
