"""``traintel`` command line: ``train`` and ``config show``.

Exit status: 0 finished, 1 training failed, 2 bad input (nothing trained or
written), 129 / 130 / 143 stopped by SIGHUP / SIGINT / SIGTERM. torch is imported only by
``train``, so ``--help`` and ``config show`` stay fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from traintel.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    ConfigError,
    one_line,
    signal_exit,
)
from traintel.run.signals import exit_on_signal, remember_early

if TYPE_CHECKING:
    from traintel.config import Config

_EPILOG = """exit status: 0 finished; 1 training failed; 2 bad input (config, task, port);
129 / 130 / 143 stopped by SIGHUP / SIGINT / SIGTERM.
environment: TRAINTEL__SECTION__KEY=value overrides the config file; --set overrides both."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"traintel: error: {message}\n")
        sys.exit(EXIT_BAD_INPUT)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="PATH", help="YAML config file (default: built-in defaults)")
    p.add_argument(
        "--set",
        "-s",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one key, value parsed as YAML (repeatable), e.g. trainer.accumulation_steps=3",
    )


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="traintel",
        description="Train a PyTorch model on Ignite; the loss given to backward() is reported "
        "identically to JSON logs, a diagnostic file and Prometheus.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    train = sub.add_parser("train", help="run a training job", epilog=_EPILOG)
    _add_config_args(train)
    train.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its newest complete checkpoint, with its config.yaml "
        "(--set may change only trainer.max_epochs, trainer.max_steps, telemetry.*, sinks.*, checkpoint.*)",
    )
    config = sub.add_parser("config", help="inspect the resolved configuration")
    config.set_defaults(help_parser=config)
    config_sub = config.add_subparsers(dest="config_command", metavar="SUBCOMMAND", parser_class=_Parser)
    show = config_sub.add_parser("show", help="print the resolved config as YAML, secrets redacted")
    _add_config_args(show)
    sinks = sub.add_parser("sinks", help="list the built-in and installed plugin sinks")
    sinks.set_defaults(help_parser=sinks)
    sinks_sub = sinks.add_subparsers(dest="sinks_command", metavar="SUBCOMMAND", parser_class=_Parser)
    sinks_sub.add_parser(
        "list", help="built-in sinks and those installed through the traintel.sinks entry points"
    )
    report = sub.add_parser("report", help="plot a run's diagnostic file to a PNG and print a summary")
    report.add_argument(
        "run_dir", metavar="RUN_DIR", help="run directory (its diagnostic file is named in its config.yaml)"
    )
    report.add_argument("--output", "-o", metavar="PATH", help="PNG to write (default: RUN_DIR/report.png)")
    return parser


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"traintel: error: {message}\n")
    return code


def _config_show(args: argparse.Namespace) -> int:
    import yaml

    from traintel.config import load_config

    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(yaml.safe_dump(cfg.to_dict(redact=True), sort_keys=False))
    return EXIT_OK


def _sinks_list() -> int:
    from traintel.run.plugins import list_sinks

    rows = [("NAME", "SOURCE", "TARGET", "NOTE")]
    rows += [(e.name, e.source, e.target, e.note) for e in list_sinks()]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        line = "  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)) + "  " + row[3]
        sys.stdout.write(line.rstrip() + "\n")
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from traintel.cli.report import report

    return report(args.run_dir, args.output)


def _train(args: argparse.Namespace, *, owns_process: bool) -> int:
    import logging

    from traintel.config import load_config

    # Ignite logs run failures as free text; the run.end record already carries them on stdout.
    ignite_log = logging.getLogger("ignite")
    if not any(isinstance(h, logging.NullHandler) for h in ignite_log.handlers):
        ignite_log.addHandler(logging.NullHandler())

    if args.resume is not None:
        if args.config is not None:
            raise ConfigError("--resume", "takes the config saved in RUN_DIR; give --set, not --config")
        from traintel.config import load_resume_config

        cfg = load_resume_config(args.resume, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
    if cfg.task.factory is None and cfg.run.resume == "auto" and cfg.run.dir is not None:
        raise ConfigError(
            "--resume" if args.resume is not None else "task.factory",
            f"the run in {cfg.run.dir!r} was given its task in code (task.factory: null), which the "
            "command line cannot make; resume it from Python: traintel.build(config, task) with the "
            f"same task, run.resume: auto and run.dir {cfg.run.dir!r}",
        )
    if cfg.sinks.json_.enabled and not _stdout_open():
        raise ConfigError(
            "sinks.json", "stdout is closed; give the process a stdout or set sinks.json.enabled=false"
        )
    stdout = sys.stdout  # put back when main returns, where it does not own the process
    if cfg.sinks.json_.enabled and cfg.sinks.json_.format != "console" and not _stdout_is_tty():
        # stdout carries JSON lines only: what is printed outside the run (before the sinks open,
        # after they close: a thread still printing) goes to stderr; inside it the JSON sink
        # captures it as log lines
        from traintel.sinks.json.capture import StderrForStdout

        sys.stdout.flush()
        sys.stdout = StderrForStdout(sys.stdout.fileno())
    try:
        return _train_run(args, cfg, owns_process=owns_process)
    finally:
        if not owns_process:
            sys.stdout = stdout


def _train_run(args: argparse.Namespace, cfg: Config, *, owns_process: bool) -> int:
    from traintel.engine.coordination import PEER_STOP_REASON
    from traintel.run.api import build
    from traintel.run.signals import early_signal, note_signal

    run = build(cfg, must_resume=args.resume is not None)
    end = run.run(stop_signal=early_signal())
    if run.late_signal is not None and owns_process:
        note_signal(run.late_signal)  # the process leaves at once with its status (exit_on_signal)
    if run.stop_signal is not None and end.status != "completed":  # one after all was done stopped nothing
        return signal_exit(run.stop_signal)
    if end.status == "terminated" and end.reason == PEER_STOP_REASON:
        return EXIT_SIGTERM  # stopped with a signalled rank: as that rank, so a retry may continue
    return EXIT_FAILED if end.status == "failed" else EXIT_OK


def _stdout_open() -> bool:
    """Whether file descriptor 1 is open (``>&-`` closes it, and Python then has no sys.stdout)."""
    import os

    try:
        os.fstat(1)
    except OSError:
        return False
    return True


def _stdout_is_tty() -> bool:
    import os

    try:
        return os.isatty(sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):
        return False


def main(argv: Sequence[str] | None = None, *, owns_process: bool = True) -> int:
    """Run the command line; returns the exit status (argparse's ``--help`` and usage errors raise
    ``SystemExit`` with 0 and 2).

    For ``train``, the process's stop signals are traintel's from the first step until the process
    exits (``traintel.run.signals``): a signal during start-up ends it with one line, one during the run
    stops the run, and one after the run exits at once with the status returned here. Likewise
    ``sys.stdout`` then writes to stderr, so that stdout carries JSON lines only. The working directory
    goes first on ``sys.path``, as ``python -m`` puts it, so the console script imports factories from
    it too. A program that goes on after calling ``main`` (a test, a notebook) passes
    ``owns_process=False``: its signal handlers and ``sys.path`` stay as they are outside the run, and
    ``sys.stdout`` comes back when ``main`` returns.
    """
    parser = make_parser()
    args = parser.parse_args(argv)
    if owns_process:
        _working_directory_first()
    if args.command != "train" or not owns_process:
        return _command(args, parser, owns_process=owns_process)
    remember_early()
    status = _command(args, parser, owns_process=True)
    exit_on_signal(status)
    return status


def _working_directory_first() -> None:
    """Put the working directory first on ``sys.path``, as ``python -m traintel`` has it: the
    ``traintel`` console script has its own directory there instead, and then a ``task.factory``
    or ``sinks.extra[].factory`` module beside the config would not import."""
    import os

    try:
        cwd = os.getcwd()
    except OSError:  # the directory was removed: nothing to import from it
        return
    if not sys.path or sys.path[0] not in ("", cwd):
        sys.path.insert(0, cwd)


def _command(args: argparse.Namespace, parser: argparse.ArgumentParser, *, owns_process: bool) -> int:
    sub = getattr(args, "config_command", None) or getattr(args, "sinks_command", None)
    commands: dict[tuple[str | None, str | None], Callable[[], int]] = {
        ("train", None): lambda: _train(args, owns_process=owns_process),
        ("config", "show"): lambda: _config_show(args),
        ("sinks", "list"): _sinks_list,
        ("report", None): lambda: _report(args),
    }
    command = commands.get((args.command, sub))
    if command is None:
        getattr(args, "help_parser", parser).print_help(sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return command()
    except ConfigError as exc:
        return _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_SIGINT)
    except Exception as exc:
        # Training failures were already reported as a run.end record with status failed.
        what = "training failed" if args.command == "train" else f"{args.command} failed"
        return _fail(f"{what}: {one_line(exc)}", EXIT_FAILED)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
