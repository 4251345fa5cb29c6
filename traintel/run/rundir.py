"""The run directory's rules: when a run may write into it, and the config it keeps there.

A run that keeps files (the diagnostic file, checkpoints) writes ``config.yaml`` into its run
directory. It never takes over a directory holding another run's files, and it learns that a
directory cannot take its files (read-only, full) before any sink opens, not halfway through.
While it runs, its rank 0 holds the directory's lock (``lock``), so a second process (a second
``--resume`` of the same directory) is refused instead of writing the same files.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import yaml

from traintel.config import Config
from traintel.errors import ConfigError
from traintel.run import layout
from traintel.run.layout import (
    CONFIG_FILENAME,
    DIAGNOSTIC_FILENAME,
    REPORT_FILENAME,
    rank_filename,
    rotated_parts,
    stream_ranks,
)
from traintel.sinks.io.atomic import file_kind, probe_write, write_atomic


def config_text(config: Config) -> str:
    """The YAML a run keeps as ``config.yaml``: the resolved config, secrets redacted."""
    return yaml.safe_dump(config.to_dict(redact=True), sort_keys=False)


def problem(
    run_dir: Path,
    rank: int,
    *,
    diagnostic: str,
    writes_diagnostic: bool,
    continuing: bool,
    config_text: str,
) -> ConfigError | None:
    """Why this rank's run must not write into ``run_dir`` (which exists), or None; nothing is changed.

    ``diagnostic`` is the diagnostic file's configured name, ``writes_diagnostic`` whether the run
    writes it; ``continuing`` says the run continues an earlier attempt in this directory. The
    problems:

    - ``config.yaml`` there that is not a regular file (or a link, which is replaced);
    - a first attempt in a directory holding another run's files: config.yaml, checkpoints,
      report.png, the diagnostic file (the configured name and ``diagnostic.jsonl``), its rotated
      parts or another rank's. Other files, or none, are fine;
    - a directory that does not take a file of config.yaml's size (read-only, full): one is
      written, fsynced and removed.
    """
    where = repr(str(run_dir))
    try:
        names = frozenset(os.listdir(run_dir))
        config_file = run_dir / CONFIG_FILENAME
        kind = file_kind(config_file.lstat().st_mode) if CONFIG_FILENAME in names else None
        if kind not in (None, "a regular file", "a symbolic link"):
            return ConfigError(
                "run.dir",
                f"{str(config_file)!r} is {kind}, not a regular file; the run writes its config "
                "there: remove it or choose another run.dir",
            )
        if not continuing:
            taken = _taken(run_dir, names, rank, diagnostic, writes_diagnostic=writes_diagnostic)
            if taken is not None:
                return taken
        try:
            probe_write(run_dir, config_text)
        except OSError as exc:
            return ConfigError("run.dir", f"cannot write in {where}: {exc.strerror or exc}")
    except OSError as exc:
        return ConfigError("run.dir", f"cannot read {where}: {exc.strerror or exc}")
    return None


def _taken(
    run_dir: Path, names: frozenset[str], rank: int, diagnostic: str, *, writes_diagnostic: bool
) -> ConfigError | None:
    """A first attempt's problem with another run's files in ``run_dir`` (listed as ``names``)."""
    if writes_diagnostic and (own := rank_filename(diagnostic, rank)) in names:
        return _exists(run_dir / own)  # said as the diagnostic file's own check says it
    held = {CONFIG_FILENAME, layout.CHECKPOINT_DIRECTORY, REPORT_FILENAME} & names
    for diag in {diagnostic, DIAGNOSTIC_FILENAME}:
        for r in (0, *stream_ranks(diag, names)):
            held.update(p.name for p in rotated_parts(run_dir, rank_filename(diag, r), names))
    if not held:
        return None
    shown = sorted(held)
    listed = ", ".join(shown[:5]) + (f" and {len(shown) - 5} more" if len(shown) > 5 else "")
    advice = "choose another run.dir (a new or empty one)"
    if layout.CHECKPOINT_DIRECTORY in held:
        advice = (
            "choose another run.dir, or continue that run with 'traintel train --resume' or run.resume=auto"
        )
    return ConfigError("run.dir", f"{str(run_dir)!r} already holds another run's files ({listed}); {advice}")


def save_config(run_dir: Path, text: str, *, first_attempt: bool) -> None:
    """``<run dir>/config.yaml``, written atomically; a first attempt only creates it (``problem``
    found none), a later one replaces it."""
    path = run_dir / CONFIG_FILENAME
    try:
        write_atomic(path, text, overwrite="none" if first_attempt else "any")
    except FileExistsError:  # made by another process since the start
        raise _exists(path) from None


def _exists(path: Path) -> ConfigError:
    return ConfigError(
        "run.dir", f"{str(path)!r} already exists and is never overwritten; choose another run.dir"
    )


class RunDirLock:
    """An exclusive ``flock`` on a run directory itself (its open descriptor): no file is made, and
    the kernel releases it when the process dies, however it dies, so a directory left by a
    killed run is free at once."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def release(self) -> None:
        """Release the lock (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def lock(run_dir: Path) -> RunDirLock | ConfigError | None:
    """Take ``run_dir``'s lock (the directory exists) without waiting: the lock, a ConfigError when
    another process holds it, or None where the file system offers no such lock (then the run goes
    on without one, as before locks were taken)."""
    try:
        fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        return ConfigError("run.dir", f"cannot read {str(run_dir)!r}: {exc.strerror or exc}")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return ConfigError(
            "run.dir",
            f"{str(run_dir)!r} is in use by another traintel process; one run directory takes one "
            "run at a time: wait for it to end, or choose another run.dir",
        )
    except OSError:
        os.close(fd)
        return None
    return RunDirLock(fd)
