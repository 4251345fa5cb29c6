"""The ``traintel`` command line, run as a real subprocess.

Every bad input must end with exit status 2, exactly one ``traintel: error: <key>: <problem>``
line on stderr, nothing on stdout, no traceback and nothing written to disk.
"""

from __future__ import annotations

import re
import signal
import socket
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import pytest
import yaml

from tests.helpers.children import (
    HELP_COLUMNS,
    Cli,
    CliResult,
    child_env,
    cli_in_process,
    probe_cli,
    run_child,
    run_cli,
)
from tests.helpers.lines import strict_object
from traintel.cli.main import make_parser


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 that something is already listening on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


# --------------------------------------------------------------------------- bad input


@dataclass(frozen=True)
class BadInput:
    """One row of the bad-input table: what to run and the one stderr line it must produce."""

    argv: Sequence[str]
    error: str
    """The exact stderr line after ``traintel: error: ``; ``{port}`` becomes a port already in use."""
    env: Mapping[str, str] = field(default_factory=dict)
    files: Mapping[str, str] = field(default_factory=dict)
    """Files written to the working directory first (name -> content)."""
    status: int = 2


_FAILING_FACTORY = textwrap.dedent(
    """\
    def make_task(**params):
        raise RuntimeError("dataset shard 3 is missing")
    """
)
_EMPTY_FACTORY_MODULE = "VERSION = 1\n"
_EXITING_FACTORY = "import sys\n\ndef make_task(**params):\n    sys.exit(5)\n"
_EMPTY_LOADER_FACTORY = textwrap.dedent(
    """\
    from traintel.tasks.forecast import make_task as base

    def make_task(**params):
        task = base(**params)
        task.train_loader = []
        return task
    """
)

BAD_INPUT = [
    pytest.param(
        BadInput(["train", "--set", "bogus=1"], "bogus: unknown key"),
        id="unknown-top-level-key",
    ),
    pytest.param(
        BadInput(
            ["train", "--config", "cfg.yaml"],
            "bogus: unknown key",
            files={"cfg.yaml": "trainer:\n  max_epochs: 1\nbogus:\n  x: 1\n"},
        ),
        id="unknown-top-level-key-in-file",
    ),
    pytest.param(
        BadInput(["train", "--set", "trainer.foo=1"], "trainer.foo: unknown key"),
        id="unknown-nested-key",
    ),
    pytest.param(
        BadInput(
            ["train", "--set", "trainer.accumulation_steps=abc"],
            "trainer.accumulation_steps: input should be a valid integer, not a string (got 'abc')",
        ),
        id="wrong-type",
    ),
    pytest.param(
        BadInput(
            ["train", "--set", "trainer.accumulation_steps=0"],
            "trainer.accumulation_steps: input should be greater than or equal to 1 (got 0)",
        ),
        id="accumulation-steps-zero",
    ),
    pytest.param(
        BadInput(
            ["train", "--config", "cfg.yaml"],
            "trainer.accumulation_steps: input should be greater than or equal to 1 (got 0)",
            files={"cfg.yaml": "trainer:\n  accumulation_steps: 0\n"},
        ),
        id="accumulation-steps-zero-in-file",
    ),
    pytest.param(
        BadInput(
            ["train", "--set", "telemetry.every=0"],
            "telemetry.every: input should be greater than or equal to 1 (got 0)",
        ),
        id="telemetry-every-zero",
    ),
    pytest.param(
        BadInput(
            ["train", "--set", "trainer.optimizer.lr=-1"],
            "trainer.optimizer.lr: input should be greater than 0 (got -1)",
        ),
        id="negative-lr",
    ),
    pytest.param(
        BadInput(
            ["train", "--set", "sinks.prometheus.port=70000"],
            "sinks.prometheus.port: input should be less than or equal to 65535 (got 70000)",
        ),
        id="port-out-of-range",
    ),
    pytest.param(
        BadInput(
            ["train", "--set", "trainer.optimizer.name=lbfgs"],
            "trainer.optimizer.name: must be a torch.optim optimizer ('adadelta', 'adafactor', 'adagrad', "
            "'adam', 'adamax', 'adamw', 'asgd', 'muon', 'nadam', 'radam', 'rmsprop', 'rprop', 'sgd') or a "
            "'module:function' factory, got 'lbfgs'",
        ),
        id="optimizer-name",
    ),
    pytest.param(
        BadInput(
            ["train", "--set", "trainer.precision=fp8"],
            "trainer.precision: must be one of 'fp32', 'bf16' or 'fp16' (got 'fp8')",
        ),
        id="precision-literal",
    ),
    pytest.param(
        BadInput(["train", "--config", "missing.yaml"], "--config: file 'missing.yaml' does not exist"),
        id="missing-config-file",
    ),
    pytest.param(
        BadInput(
            ["train", "--config", "broken.yaml"],
            "--config: 'broken.yaml' is not valid YAML at line 3",
            files={"broken.yaml": "trainer:\n  max_epochs: [1, 2\n"},
        ),
        id="config-not-yaml",
    ),
    pytest.param(
        BadInput(
            ["train", "--config", "list.yaml"],
            "--config: 'list.yaml' must hold a mapping of sections, got list",
            files={"list.yaml": "- trainer\n- sinks\n"},
        ),
        id="config-is-a-list",
    ),
    pytest.param(
        BadInput(
            ["train", "--set", "trainer.max_epochs"],
            "--set: 'trainer.max_epochs' must have the form key.path=value",
        ),
        id="set-without-equals",
    ),
    pytest.param(
        BadInput(
            ["train", "--set", "=3"],
            "--set: '' is not a dotted key such as 'trainer.accumulation_steps'",
        ),
        id="set-empty-key",
    ),
    pytest.param(
        BadInput(
            ["train", "--set", "task.factory=no_such_module_xyz:make_task"],
            "task.factory: cannot import module 'no_such_module_xyz' "
            "(ModuleNotFoundError: No module named 'no_such_module_xyz')",
        ),
        id="factory-module-unimportable",
    ),
    pytest.param(
        BadInput(
            ["train", "--set", "task.factory=my_tasks:make_task"],
            "task.factory: module 'my_tasks' has no attribute 'make_task'",
            files={"my_tasks.py": _EMPTY_FACTORY_MODULE},
        ),
        id="factory-attribute-missing",
    ),
    pytest.param(
        BadInput(
            ["train", "--set", "task.factory=failing_tasks:make_task"],
            "task.factory: failing_tasks:make_task raised RuntimeError: dataset shard 3 is missing",
            files={"failing_tasks.py": _FAILING_FACTORY},
        ),
        id="factory-raises",
    ),
    pytest.param(
        BadInput(
            ["train", "--set", "task.factory=exiting_tasks:make_task"],
            "task.factory: exiting_tasks:make_task called sys.exit(5)",
            files={"exiting_tasks.py": _EXITING_FACTORY},
        ),
        id="factory-calls-sys-exit",
    ),
    pytest.param(
        BadInput(
            ["train", "--set", "task.factory=empty_tasks:make_task"],
            "task.train_loader: has no batches (its length is 0): there is nothing to train",
            files={"empty_tasks.py": _EMPTY_LOADER_FACTORY},
        ),
        id="empty-training-loader",
    ),
    pytest.param(
        BadInput(
            [
                "train",
                "--set",
                "sinks.prometheus.certfile=garbage.pem",
                "--set",
                "sinks.prometheus.keyfile=garbage.pem",
            ],
            "sinks.prometheus.certfile: cannot use the TLS files garbage.pem, garbage.pem: not a PEM certificate and its key",
            files={"garbage.pem": "not a certificate\n"},
        ),
        id="certfile-not-pem",
    ),
    pytest.param(
        BadInput(
            ["train", "--set", "task.factory=nofactory"],
            "task.factory: must have the form 'module:function', got 'nofactory'",
        ),
        id="factory-malformed",
    ),
    pytest.param(
        BadInput(
            ["train", "--set", "task.params.bogus=1"],
            "task.params: traintel.tasks.forecast:make_task does not accept these parameters: "
            "got an unexpected keyword argument 'bogus'",
        ),
        id="factory-rejects-params",
    ),
    pytest.param(
        BadInput(
            ["train", "--set", "task.params.hidden=0"],
            "task.params.hidden: must be an integer >= 1, got 0",
        ),
        id="factory-rejects-param-value",
    ),
    pytest.param(
        BadInput(
            ["train", "--set", "trainer.optimizer.bogus=1"],
            "trainer.optimizer.bogus: adamw takes no such argument (it takes betas, eps, weight_decay, "
            "amsgrad, maximize, foreach, capturable, differentiable, fused)",
        ),
        id="optimizer-rejects-kwarg",
    ),
    pytest.param(
        BadInput(
            ["train", "--set", "trainer.scheduler.name=bogus"],
            "trainer.scheduler.name: must be one of 'cosine', 'step', 'exponential', 'linear_warmup', "
            "'warmup_cosine', 'onecycle' or a 'module:function' factory (got 'bogus')",
        ),
        id="scheduler-bad-name",
    ),
    pytest.param(
        BadInput(
            ["train", "--set", "trainer.device=cuda"],
            "trainer.device: cuda was asked for but no CUDA device is available; use auto or cpu",
        ),
        id="cuda-unavailable",
    ),
    pytest.param(
        BadInput(
            ["train", "--set", "sinks.prometheus.port={port}"],
            "sinks.prometheus.port: 127.0.0.1:{port} is already in use; choose a free port or 0",
        ),
        id="prometheus-port-in-use",
    ),
    pytest.param(
        BadInput(
            ["train"],
            "environment RANK: must be an integer >= 0, got 'one'",
            env={"RANK": "one", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
        ),
        id="torchrun-env-bad-rank",
    ),
    pytest.param(
        BadInput(
            ["train"],
            "environment RANK: must be below WORLD_SIZE=2, got 2",
            env={"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
        ),
        id="torchrun-env-rank-too-high",
    ),
    pytest.param(
        BadInput(
            ["train"],
            "environment MASTER_ADDR: is not set; torchrun sets it (or give --master-addr/--master-port)",
            env={"RANK": "0", "WORLD_SIZE": "2"},
        ),
        id="torchrun-env-no-master",
    ),
    pytest.param(
        BadInput(
            ["train"],
            "trainer.max_epochs: input should be a valid integer, not a string (got 'zero') "
            "(set by TRAINTEL__TRAINER__MAX_EPOCHS)",
            env={"TRAINTEL__TRAINER__MAX_EPOCHS": "zero"},
        ),
        id="env-override-bad-value",
    ),
    pytest.param(
        BadInput(
            ["config", "show"],
            "trainer.foo: unknown key (set by TRAINTEL__TRAINER__FOO)",
            env={"TRAINTEL__TRAINER__FOO": "1"},
        ),
        id="env-override-unknown-key",
    ),
    pytest.param(
        BadInput(
            ["frobnicate"],
            "argument COMMAND: invalid choice: 'frobnicate' (choose from 'train', 'config', 'sinks', 'report')",
        ),
        id="unknown-subcommand",
    ),
    pytest.param(
        BadInput(
            ["config", "frobnicate"],
            "argument SUBCOMMAND: invalid choice: 'frobnicate' (choose from 'show')",
        ),
        id="unknown-config-subcommand",
    ),
    pytest.param(
        BadInput(["train", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        id="unknown-option",
    ),
    pytest.param(
        BadInput(["train", "--config"], "argument --config/-c: expected one argument"),
        id="option-missing-value",
    ),
    pytest.param(
        BadInput(
            ["train", "--set", "sinks.diagnostic.filename=config.yaml"],
            "sinks.diagnostic.filename: 'config.yaml' is reserved for traintel's own files in the run "
            "directory (config.yaml, checkpoints, report.png, run.json); choose another name, such as "
            "diagnostic.jsonl",
        ),
        id="diagnostic-filename-reserved",
    ),
    pytest.param(
        BadInput(
            ["train", "--set", "sinks.diagnostic.filename=.."],
            "sinks.diagnostic.filename: must be a file name inside the run directory (not . or .., "
            "no / or \\), got '..'",
        ),
        id="diagnostic-filename-dot-dot",
    ),
    pytest.param(
        BadInput(
            ["train", "--set", "run.dir=.", "--set", "sinks.diagnostic.filename=second.jsonl"],
            "run.dir: '.' already holds another run's files (config.yaml, diagnostic.jsonl); "
            "choose another run.dir (a new or empty one)",
            files={"config.yaml": "run:\n  name: first\n", "diagnostic.jsonl": '{"event": "run.start"}\n'},
        ),
        id="run-dir-holds-another-run",
    ),
    pytest.param(
        BadInput(
            ["train", "--set", "run.dir=afile/run"],
            "run.dir: cannot create 'afile/run': Not a directory",
            files={"afile": "x"},
        ),
        id="run-dir-below-a-file",
    ),
    pytest.param(
        BadInput(
            ["train", "--set", "run.dir=afile"],
            "run.dir: cannot create 'afile': File exists",
            files={"afile": "x"},
        ),
        id="run-dir-is-a-file",
    ),
    pytest.param(
        BadInput(
            ["train", "--config", "cfg.yaml"],
            "--config: 'cfg.yaml' line 2: YAML anchors and aliases are not allowed",
            files={"cfg.yaml": "trainer:\n  max_epochs: &n 3\n  accumulation_steps: *n\n"},
        ),
        id="config-yaml-alias",
    ),
    pytest.param(
        BadInput(
            ["train", "--config", "cfg.yaml"],
            "--config: 'cfg.yaml' line 3: duplicate key 'max_epochs'",
            files={"cfg.yaml": "trainer:\n  max_epochs: 1\n  max_epochs: 2\n"},
        ),
        id="config-duplicate-key",
    ),
    pytest.param(
        BadInput(
            ["config", "show", "--config", "cfg.yaml"],
            "--config: 'cfg.yaml' line 5: duplicate key 'trainer'",
            files={
                "cfg.yaml": "trainer:\n  max_epochs: 1\nrun:\n  seed: 1\ntrainer:\n  accumulation_steps: 2\n"
            },
        ),
        id="config-duplicate-section",
    ),
    pytest.param(
        BadInput(
            ["train", "--config", "cfg.yaml"],
            "--config: 'cfg.yaml' has 1258300 bytes; config files are limited to 1 MiB (1048576 bytes)",
            files={"cfg.yaml": "# padding\n" * 125_830},
        ),
        id="config-over-1-mib",
    ),
    pytest.param(
        BadInput(
            ["train", "--config", "cfg.yaml"],
            "--config: 'cfg.yaml' line 3: nesting deeper than 64 levels is not allowed",
            files={"cfg.yaml": "task:\n  params:\n    x: " + "[" * 5000 + "]" * 5000 + "\n"},
        ),
        id="config-too-deep",
    ),
    pytest.param(
        BadInput(
            ["train", "--config", "cfg.yaml"],
            "sinks.prometheus.port: input should be a valid integer, not a boolean (got True)",
            files={"cfg.yaml": "sinks:\n  prometheus:\n    port: true\n"},
        ),
        id="boolean-port-in-file",
    ),
    pytest.param(
        BadInput(
            ["train", "--set", "sinks.diagnostic.max_bytes=yes"],
            "sinks.diagnostic.max_bytes: input should be a valid integer, not a boolean (got True)",
        ),
        id="boolean-max-bytes",
    ),
    pytest.param(
        BadInput(
            ["train", "--set", "trainer.max_epochs='3'"],
            "trainer.max_epochs: input should be a valid integer, not a string (got '3')",
        ),
        id="string-for-an-integer",
    ),
    pytest.param(
        BadInput(
            ["train"],
            "sinks.prometheus.port: input should be a valid integer, not a boolean (got True) "
            "(set by TRAINTEL__SINKS__PROMETHEUS__PORT)",
            env={"TRAINTEL__SINKS__PROMETHEUS__PORT": "true"},
        ),
        id="env-boolean-for-an-integer",
    ),
    pytest.param(
        BadInput(
            ["train", "--set", "trainer.scheduler={name: cosine, T_max: 0}"],
            "trainer.scheduler.T_max: input should be greater than or equal to 1 (got 0)",
        ),
        id="cosine-t-max-zero",
    ),
    pytest.param(
        BadInput(
            ["train", "--set", "trainer.scheduler={name: step, step_size: 0}"],
            "trainer.scheduler.step_size: input should be greater than or equal to 1 (got 0)",
        ),
        id="step-size-zero",
    ),
    pytest.param(
        BadInput(
            ["train", "--set", "trainer.scheduler={name: exponential, gamma: 0}"],
            "trainer.scheduler.gamma: input should be greater than 0 (got 0)",
        ),
        id="gamma-zero",
    ),
    pytest.param(
        BadInput(
            ["train", "--set", "sinks.prometheus.pushgateway.url=http://u:s3cret@host:bad"],
            "sinks.prometheus.pushgateway.url: port 'bad' is not a number from 1 to 65535, "
            "got 'http://***@host:bad'",
        ),
        id="pushgateway-url-credentials-not-echoed",
    ),
    pytest.param(
        BadInput(
            ["train", "--set", "task.params.x=[&a [1, 2], *a]"],
            "task.params.x: YAML anchors and aliases are not allowed",
        ),
        id="set-yaml-alias",
    ),
    pytest.param(
        BadInput(
            ["config", "show"],
            "task.params.x: duplicate key 'a' (set by TRAINTEL__TASK__PARAMS__X)",
            env={"TRAINTEL__TASK__PARAMS__X": "{a: 1, a: 2}"},
        ),
        id="env-duplicate-key",
    ),
]


def _check_bad_input(
    tmp_path: Path,
    request: pytest.FixtureRequest,
    case: BadInput,
    run: Callable[[Path, Sequence[str], Mapping[str, str]], CliResult | CompletedProcess[str]],
) -> None:
    for name, content in case.files.items():
        (tmp_path / name).write_text(content, encoding="utf-8")
    argv, message = list(case.argv), f"traintel: error: {case.error}"
    if any("{port}" in a for a in argv):
        port = request.getfixturevalue("busy_port")
        argv = [a.format(port=port) for a in argv]
        message = message.format(port=port)

    proc = run(tmp_path, argv, case.env)

    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr == message + "\n"
    assert proc.stdout == ""
    assert proc.returncode == case.status
    assert not (tmp_path / "runs").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__") == sorted(case.files)


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_exits_2_with_one_line(
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    case: BadInput,
) -> None:
    """Every row through ``cli.main`` in this process."""

    def run(cwd: Path, argv: Sequence[str], env: Mapping[str, str]) -> CliResult:
        return cli_in_process(cwd, *argv, monkeypatch=monkeypatch, capfd=capfd, env=env)

    _check_bad_input(tmp_path, request, case, run)


SMOKE = ("unknown-top-level-key-in-file", "factory-raises", "prometheus-port-in-use", "unknown-option")
"""The rows also run as ``python -m traintel`` in a child: the process's own exit status and streams."""
FRESH_SMOKE = ("unknown-top-level-key-in-file", "unknown-option")
"""The rows whose child is a fresh interpreter: refused before torch is imported, they cost little;
the others fork from the warm one (``tests.helpers.warm``)."""


@pytest.mark.slow
@pytest.mark.parametrize("case", [row for row in BAD_INPUT if row.id in SMOKE])
def test_bad_input_exits_2_with_one_line_in_a_child(
    tmp_path: Path, request: pytest.FixtureRequest, case: BadInput
) -> None:
    def run(cwd: Path, argv: Sequence[str], env: Mapping[str, str]) -> CompletedProcess[str]:
        return run_cli(cwd, *argv, env=env, fresh=request.node.callspec.id in FRESH_SMOKE)

    _check_bad_input(tmp_path, request, case, run)


def test_no_command_prints_help_to_stderr_and_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", HELP_COLUMNS)
    expected = make_parser().format_help()

    proc = run_cli(tmp_path)

    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == expected
    assert proc.stderr.startswith("usage: traintel [-h] COMMAND ...\n")


def test_config_without_subcommand_prints_config_help(cli: Cli) -> None:
    proc = cli("config")

    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines()[0] == "usage: traintel config [-h] SUBCOMMAND ..."


def test_help_exits_0_on_stdout(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", HELP_COLUMNS)
    expected = make_parser().format_help()

    proc = cli("--help")

    assert proc.returncode == 0
    assert proc.stderr == ""
    assert proc.stdout == expected


# --------------------------------------------------------------------------- overrides


def _config_show(cli: Cli, *args: str, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    proc = cli("config", "show", *args, env=env)
    assert proc.stderr == ""
    assert proc.returncode == 0
    data = yaml.safe_load(proc.stdout)
    assert isinstance(data, dict)
    return data


@pytest.fixture
def steps_file(tmp_path: Path) -> str:
    (tmp_path / "cfg.yaml").write_text("trainer:\n  accumulation_steps: 2\n", encoding="utf-8")
    return "cfg.yaml"


_ENV_STEPS = {"TRAINTEL__TRAINER__ACCUMULATION_STEPS": "4"}


def test_set_beats_environment_beats_file(tmp_path: Path, cli: Cli, steps_file: str) -> None:
    cfg = _config_show(cli, "--config", steps_file, "--set", "trainer.accumulation_steps=5", env=_ENV_STEPS)
    assert cfg["trainer"]["accumulation_steps"] == 5


def test_environment_beats_file(tmp_path: Path, cli: Cli, steps_file: str) -> None:
    cfg = _config_show(cli, "--config", steps_file, env=_ENV_STEPS)
    assert cfg["trainer"]["accumulation_steps"] == 4


def test_file_beats_default(tmp_path: Path, cli: Cli, steps_file: str) -> None:
    cfg = _config_show(cli, "--config", steps_file)
    assert cfg["trainer"]["accumulation_steps"] == 2


def test_defaults_without_file(tmp_path: Path, cli: Cli) -> None:
    cfg = _config_show(cli)
    assert cfg["trainer"]["accumulation_steps"] == 3
    assert cfg["trainer"]["scheduler"] is None
    assert cfg["task"] == {"factory": "traintel.tasks.forecast:make_task", "params": {}}


def test_last_set_wins(tmp_path: Path, cli: Cli) -> None:
    cfg = _config_show(cli, "--set", "trainer.accumulation_steps=5", "-s", "trainer.accumulation_steps=6")
    assert cfg["trainer"]["accumulation_steps"] == 6


def test_set_values_are_yaml_scalars(tmp_path: Path, cli: Cli) -> None:
    (tmp_path / "cfg.yaml").write_text(
        "trainer:\n  scheduler:\n    name: cosine\n  optimizer:\n    lr: 0.5\n", encoding="utf-8"
    )
    cfg = _config_show(
        cli,
        "--config",
        "cfg.yaml",
        "--set",
        "trainer.scheduler=null",
        "--set",
        "trainer.optimizer.lr=0.1",
        "--set",
        "task.params.hidden=8",
        "--set",
        "trainer.report_grad_norm=true",
        "--set",
        "run.name=my run",
    )
    assert cfg["trainer"]["scheduler"] is None
    lr = cfg["trainer"]["optimizer"]["lr"]
    assert isinstance(lr, float)
    assert lr == 0.1
    assert cfg["task"]["params"] == {"hidden": 8}
    assert cfg["trainer"]["report_grad_norm"] is True
    assert cfg["run"]["name"] == "my run"


def test_environment_values_are_yaml_scalars(tmp_path: Path, cli: Cli) -> None:
    cfg = _config_show(
        cli,
        env={"TRAINTEL__TRAINER__OPTIMIZER__LR": "0.25", "TRAINTEL__TASK__PARAMS__HIDDEN": "16"},
    )
    assert cfg["trainer"]["optimizer"]["lr"] == 0.25
    assert cfg["task"]["params"] == {"hidden": 16}


def test_config_file_keeps_its_other_keys(tmp_path: Path, cli: Cli) -> None:
    (tmp_path / "cfg.yaml").write_text(
        "trainer:\n  max_epochs: 7\n  accumulation_steps: 2\n", encoding="utf-8"
    )
    cfg = _config_show(cli, "--config", "cfg.yaml", "--set", "trainer.accumulation_steps=5")
    assert cfg["trainer"]["max_epochs"] == 7
    assert cfg["trainer"]["accumulation_steps"] == 5


def test_set_exponent_float_reaches_task_params_as_float(tmp_path: Path, cli: Cli) -> None:
    cfg = _config_show(cli, "--set", "task.params.noise=1e-3")
    assert cfg["task"]["params"]["noise"] == 0.001


# --------------------------------------------------------------------------- redaction


def test_config_show_redacts_secrets(tmp_path: Path, cli: Cli) -> None:
    cfg = _config_show(
        cli,
        "--set",
        "task.params.api_token=abc",
        "--set",
        "task.params.password=x",
        "--set",
        "task.params.hidden=8",
    )
    assert cfg["task"]["params"] == {"api_token": "***", "password": "***", "hidden": 8}


def test_config_show_redacts_secrets_from_environment(cli: Cli) -> None:
    proc = cli("config", "show", env={"TRAINTEL__TASK__PARAMS__API_KEY": "s3cr3t-value"})
    assert proc.returncode == 0
    assert "s3cr3t-value" not in proc.stdout
    assert yaml.safe_load(proc.stdout)["task"]["params"] == {"api_key": "***"}


def test_config_show_keeps_keys_that_only_contain_a_secret_word(tmp_path: Path, cli: Cli) -> None:
    cfg = _config_show(cli, "--set", "task.params.tokenizer=gpt2", "--set", "task.params.max_tokens=512")
    assert cfg["task"]["params"] == {"tokenizer": "gpt2", "max_tokens": 512}


# --------------------------------------------------------------------------- no torch


@pytest.mark.parametrize(
    ("argv", "stderr_head"),
    [
        pytest.param(["--help"], "", id="help"),
        pytest.param(["train", "--help"], "", id="train-help"),
        pytest.param(["config", "show"], "", id="config-show"),
        pytest.param(
            ["config", "show", "--set", "trainer.accumulation_steps=0"],
            "traintel: error: trainer.accumulation_steps: input should be greater than or equal to 1 "
            "(got 0)\n",
            id="config-show-bad-input",
        ),
        pytest.param(
            ["train", "--set", "bogus=1"],
            "traintel: error: bogus: unknown key\n",
            id="train-bad-config",
        ),
    ],
)
def test_does_not_import_torch(tmp_path: Path, argv: list[str], stderr_head: str) -> None:
    proc = probe_cli(tmp_path, *argv)
    code = 0 if not stderr_head else 2
    assert proc.returncode == 0
    assert proc.stderr == f"{stderr_head}{code} False\n"


# --------------------------------------------------------------------------- a real run


@pytest.mark.slow
def test_train_short_run_then_refuse_to_overwrite(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    argv = [
        "train",
        "--set",
        "trainer.max_epochs=1",
        "--set",
        "sinks.prometheus.port=0",
        "--set",
        f"run.dir={run_dir}",
    ]

    proc = run_cli(tmp_path, *argv, fresh=True)

    assert proc.stderr == ""
    assert proc.returncode == 0
    events = [strict_object(line) for line in proc.stdout.splitlines()]
    assert events, "no JSON lines on stdout"
    first, last = events[0], events[-1]
    assert first["event"] == "run.start"
    assert first["run_dir"] == str(run_dir)
    assert first["config"]["trainer"]["max_epochs"] == 1
    url = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/metrics", first["metrics_url"])
    assert url is not None
    assert int(url.group(1)) != 0
    assert last["event"] == "run.end"
    assert last["status"] == "completed"
    assert last["epoch"] == 1
    assert [e["event"] for e in events].count("run.end") == 1
    assert {e["run_id"] for e in events} == {first["run_id"]}

    diagnostic = run_dir / "diagnostic.jsonl"
    saved_config = run_dir / "config.yaml"
    assert diagnostic.is_file()
    assert saved_config.is_file()
    assert not (tmp_path / "runs").exists()
    diag_events = [strict_object(line) for line in diagnostic.read_text(encoding="utf-8").splitlines()]
    assert diag_events[0]["event"] == "run.start"
    assert diag_events[-1]["event"] == "run.end"
    assert yaml.safe_load(saved_config.read_text(encoding="utf-8"))["run"]["dir"] == str(run_dir)

    diagnostic_before = diagnostic.read_bytes()
    config_before = saved_config.read_bytes()

    again = run_cli(tmp_path, *argv)

    assert "Traceback" not in again.stderr
    assert again.stderr == (
        f"traintel: error: run.dir: {str(diagnostic)!r} already exists and is never overwritten; "
        "choose another run.dir\n"
    )
    assert again.stdout == ""
    assert again.returncode == 2
    assert diagnostic.read_bytes() == diagnostic_before
    assert saved_config.read_bytes() == config_before
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "diagnostic.jsonl"]


_WORKING_DIRECTORY_MODULE = textwrap.dedent(
    """\
    import pathlib

    from traintel.sinks.memory import MemorySink
    from traintel.tasks.forecast import make_task as base


    def make_task():
        return base(train_samples=64, val_samples=0, batch_size=16)


    class NotingSink(MemorySink):
        def close(self):
            end = self.records[-1]
            pathlib.Path("sink-saw.txt").write_text(f"{end.event} {end.status} {end.step}\\n")


    def make_sink():
        return NotingSink()
    """
)


@pytest.mark.slow
def test_console_script_imports_factories_from_the_working_directory(tmp_path: Path) -> None:
    """The ``traintel`` console script (``python .venv/bin/traintel``: what its ``#!`` line runs, the
    script's own directory first on ``sys.path``) imports ``task.factory`` and
    ``sinks.extra[].factory`` from the working directory, as ``python -m traintel`` does."""
    script = Path(sys.executable).parent / "traintel"
    (tmp_path / "mymodule.py").write_text(_WORKING_DIRECTORY_MODULE, encoding="utf-8")
    env = child_env()  # the working directory is not on PYTHONPATH
    assert str(tmp_path) not in env.get("PYTHONPATH", "")

    proc = run_child(
        [
            sys.executable, str(script), "train",
            "--set", "task.factory=mymodule:make_task",
            "--set", "sinks.extra=[{factory: 'mymodule:make_sink'}]",
            "--set", "trainer.max_epochs=1",
            "--set", "trainer.accumulation_steps=2",
            "--set", "sinks.prometheus.enabled=false",
            "--set", f"run.dir={tmp_path / 'run'}",
        ],
        tmp_path, env, fresh=True,
    )  # fmt: skip

    assert (proc.returncode, proc.stderr) == (0, "")
    end = strict_object(proc.stdout.splitlines()[-1])
    assert (end["event"], end["status"], end["reason"], end["epoch"], end["step"], end["items_total"]) == (
        "run.end", "completed", "max_epochs", 1, 2, 64,
    )  # fmt: skip
    assert (tmp_path / "sink-saw.txt").read_text(encoding="utf-8") == "run.end completed 2\n"


def test_train_in_process_leaves_the_process_as_it_found_it(tmp_path: Path, cli: Cli) -> None:
    """``main(..., owns_process=False)``: a whole run, then the caller's signal handlers, ``sys.stdout``
    and threads are as they were, and the JSON lines went to file descriptor 1."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    stdout, threads = sys.stdout, set(threading.enumerate())

    proc = cli(
        "train",
        "--set", "trainer.max_epochs=1",
        "--set", "task.params.train_samples=64",
        "--set", "task.params.val_samples=0",
        "--set", "sinks.prometheus.port=0",
        "--set", f"run.dir={tmp_path / 'run'}",
    )  # fmt: skip

    assert (proc.returncode, proc.stderr) == (0, "")
    events = [strict_object(line)["event"] for line in proc.stdout.splitlines()]
    assert (events[0], events[-1], events.count("train.epoch")) == ("run.start", "run.end", 1)
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    assert sys.stdout is stdout
    assert set(threading.enumerate()) == threads
