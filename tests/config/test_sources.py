"""Config input that cannot be abused, strict types and range checks.

Config files, ``--set`` values and ``TRAINTEL__...`` environment values are all read by
``traintel.config`` with the safe loader (libyaml's when present): no anchors or aliases (a
"billion laughs" file fails at once), no duplicate keys, at most 64 levels of nesting, config files
of at most 1 MiB and UTF-8. A boolean is not a number, a string is not a number, and values that
would fail only once training runs (a cosine scheduler's ``T_max: 0``) are refused up front. Every
such error is one ``<key>: <problem>`` line (the CLI's exit 2, checked in ``tests/cli/test_main.py``).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers.children import child_env, run_cli
from traintel.config import (
    MAX_CONFIG_BYTES,
    MAX_DEPTH,
    load_config,
    load_resume_config,
    parse_scalar,
    read_yaml,
    reading,
)
from traintel.errors import ConfigError


def _error(
    path: Path | None = None, overrides: list[str] | None = None, environ: Mapping[str, str] | None = None
) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path, overrides or [], environ=environ or {})
    return str(caught.value)


def _file(tmp_path: Path, content: str | bytes, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def _nested(levels: int) -> str:
    """``task.params.x`` holding lists nested so that the document has ``levels`` levels in all."""
    inner = levels - 3  # the document's mapping, task's and params'
    return "task:\n  params:\n    x: " + "[" * inner + "]" * inner + "\n"


def test_the_loader_is_libyamls_when_present() -> None:
    expected = yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader
    assert reading._BaseLoader is expected
    assert issubclass(reading._Loader, expected)
    assert (MAX_CONFIG_BYTES, MAX_DEPTH) == (1024 * 1024, 64)


# --------------------------------------------------------------------------- config files


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(
            "trainer:\n  max_epochs: &n 3\n  accumulation_steps: *n\n",
            "line 2: YAML anchors and aliases are not allowed",
            id="anchor-and-alias",
        ),
        pytest.param(
            "run:\n  name: x\ntrainer:\n  max_epochs: *undefined\n",
            "line 4: YAML anchors and aliases are not allowed",
            id="alias-alone",
        ),
        pytest.param(
            "base: &base {max_epochs: 3}\ntrainer:\n  <<: *base\n",
            "line 3: trainer.<<: YAML merge keys are not supported; write the keys out",
            id="merge-key-of-an-anchor",
        ),
        pytest.param(
            "trainer:\n  <<: {max_epochs: 2}\n  max_epochs: 5\n",
            "line 2: trainer.<<: YAML merge keys are not supported; write the keys out",
            id="merge-key-beside-the-same-key",
        ),
        pytest.param(
            "trainer:\n  <<: [{max_epochs: 2}, {max_epochs: 3}]\n",
            "line 2: trainer.<<: YAML merge keys are not supported; write the keys out",
            id="two-merges",
        ),
        pytest.param(
            "run:\n  seed: 1\n<<: {run: {seed: 2}}\n",
            "line 3: <<: YAML merge keys are not supported; write the keys out",
            id="merge-key-at-the-top",
        ),
        pytest.param(
            "sinks:\n  extra:\n    - factory: a:b\n      params: {x: 1, <<: {x: 3}}\n",
            "line 4: sinks.extra[0].params.<<: YAML merge keys are not supported; write the keys out",
            id="merge-key-in-a-list-item",
        ),
        pytest.param(
            "trainer:\n  !!merge <<: {max_epochs: 2}\n",
            "line 2: trainer.<<: YAML merge keys are not supported; write the keys out",
            id="tagged-merge-key",
        ),
        pytest.param(
            "trainer:\n  max_epochs: 1\n  accumulation_steps: 2\n  max_epochs: 2\n",
            "line 4: duplicate key 'max_epochs'",
            id="duplicate-key",
        ),
        pytest.param(
            "trainer:\n  max_epochs: 1\nrun:\n  seed: 1\ntrainer:\n  accumulation_steps: 2\n",
            "line 5: duplicate key 'trainer'",
            id="duplicate-section",
        ),
        pytest.param(
            "sinks:\n  extra:\n    - factory: a:b\n      params: {x: 1, y: 2, x: 3}\n",
            "line 4: duplicate key 'x'",
            id="duplicate-key-in-a-list-item",
        ),
        pytest.param(
            "task:\n  params:\n    flag:\n      yes: 1\n      true: 2\n",
            "line 5: duplicate key True",
            id="duplicate-key-after-resolution",
        ),
        pytest.param(_nested(65), "line 3: nesting deeper than 64 levels is not allowed", id="too-deep"),
        pytest.param(
            "task:\n  params:\n    x: " + "[" * 5000 + "]" * 5000 + "\n",
            "line 3: nesting deeper than 64 levels is not allowed",
            id="far-too-deep-flow",
        ),
        pytest.param(
            "a:\n" + "".join("  " * i + "b:\n" for i in range(1, 200)),
            "line 65: nesting deeper than 64 levels is not allowed",
            id="far-too-deep-block",
        ),
    ],
)
def test_refused_yaml_names_the_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    path = _file(tmp_path, content)
    assert _error(path) == f"--config: {str(path)!r} {message}"


def test_billion_laughs_fails_at_once_with_bounded_memory(tmp_path: Path) -> None:
    """9 levels of 9 aliases: 9**9 (387 million) strings once expanded, from about 540 bytes."""
    lines = ["task:", "  params:", "    l0: &l0 [" + ", ".join(["lol"] * 9) + "]"]
    lines += [f"    l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    (tmp_path / "lol.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def limit_memory() -> None:  # a regression fails this test instead of exhausting the machine
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "traintel", "config", "show", "--config", "lol.yaml"],
        cwd=tmp_path,
        env=child_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        preexec_fn=limit_memory if sys.platform != "win32" else None,
    )
    elapsed = time.monotonic() - started

    assert (
        proc.stderr
        == "traintel: error: --config: 'lol.yaml' line 3: YAML anchors and aliases are not allowed\n"
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert elapsed < 10


def test_nesting_up_to_the_limit_is_fine(tmp_path: Path) -> None:
    cfg = load_config(_file(tmp_path, _nested(64)), environ={})
    value: Any = cfg.task.params["x"]
    depth = 3
    while isinstance(value, list):
        value, depth = value[0] if value else None, depth + 1
    assert depth == 64


def test_a_config_file_over_1_mib_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    path = _file(tmp_path, "# padding\n" * 125_830)  # 1258300 bytes: 1.2 MB

    assert _error(path) == (
        f"--config: {str(path)!r} has 1258300 bytes; config files are limited to 1 MiB (1048576 bytes)"
    )


def test_a_config_file_of_exactly_1_mib_is_read(tmp_path: Path) -> None:
    head = "trainer:\n  max_epochs: 2\n"
    path = _file(tmp_path, head + "#" * (MAX_CONFIG_BYTES - len(head) - 1) + "\n")
    assert path.stat().st_size == MAX_CONFIG_BYTES
    assert load_config(path, environ={}).trainer.max_epochs == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(
            b"trainer:\n  max_epochs: 1\n\xff\xfe: x\n", "is not UTF-8 text (byte 0xff at line 3)", id="bytes"
        ),
        pytest.param(
            "run:\n  name: café\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9 at line 2)", id="latin-1"
        ),
        pytest.param(
            "run:\n  name: x\n".encode("utf-16"), "is not UTF-8 text (byte 0xff at line 1)", id="utf-16"
        ),
        pytest.param(b"run:\n  name: a\x01b\n", "is not valid YAML at line 2", id="control-character"),
    ],
)
def test_a_config_file_that_is_not_utf8_text(tmp_path: Path, content: bytes, message: str) -> None:
    path = _file(tmp_path, content)
    assert _error(path) == f"--config: {str(path)!r} {message}"


def test_the_cli_reports_a_file_that_is_not_utf8_in_one_line(tmp_path: Path) -> None:
    _file(tmp_path, "run:\n  name: café\n".encode("latin-1"))

    proc = run_cli(tmp_path, "train", "--config", "cfg.yaml")

    assert proc.stderr == "traintel: error: --config: 'cfg.yaml' is not UTF-8 text (byte 0xe9 at line 2)\n"
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml"]


def test_a_utf8_byte_order_mark_is_fine(tmp_path: Path) -> None:
    path = _file(tmp_path, "\ufeffrun:\n  name: café\n".encode())
    assert load_config(path, environ={}).run.name == "café"


def test_exponent_floats_are_floats_in_files(tmp_path: Path) -> None:
    path = _file(
        tmp_path, "trainer:\n  optimizer:\n    lr: 1e-3\ntask:\n  params:\n    a: 6.02e23\n    b: '1e-3'\n"
    )
    cfg = load_config(path, environ={})
    assert cfg.trainer.optimizer.lr == 0.001
    assert cfg.task.params == {"a": 6.02e23, "b": "1e-3"}


def test_a_resumed_runs_config_is_read_the_same_way(tmp_path: Path) -> None:
    path = _file(tmp_path, "run:\n  name: x\nrun:\n  name: y\n", name="config.yaml")

    with pytest.raises(ConfigError) as caught:
        load_resume_config(tmp_path, environ={})

    assert str(caught.value) == f"--resume: {str(path)!r} line 3: duplicate key 'run'"


def test_a_resumed_runs_config_refuses_merge_keys(tmp_path: Path) -> None:
    path = _file(tmp_path, "run:\n  name: x\ntrainer:\n  <<: {max_epochs: 2}\n", name="config.yaml")

    with pytest.raises(ConfigError) as caught:
        load_resume_config(tmp_path, environ={})

    assert str(caught.value) == (
        f"--resume: {str(path)!r} line 4: trainer.<<: YAML merge keys are not supported; write the keys out"
    )


def test_a_quoted_merge_key_is_an_ordinary_key(tmp_path: Path) -> None:
    path = _file(tmp_path, "task:\n  params:\n    '<<': 1\n    x: {'<<': 2}\n")
    assert load_config(path, environ={}).task.params == {"<<": 1, "x": {"<<": 2}}


@pytest.mark.slow
def test_the_cli_refuses_merge_keys_in_one_line_and_writes_nothing(tmp_path: Path) -> None:
    _file(tmp_path, "trainer:\n  <<: {max_epochs: 2}\n  max_epochs: 5\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _file(
        run_dir, "trainer:\n  max_epochs: 5\n  <<: [{max_epochs: 2}, {max_epochs: 3}]\n", name="config.yaml"
    )
    problem = "YAML merge keys are not supported; write the keys out"
    cases = [
        (["train", "--config", "cfg.yaml"], {}, f"--config: 'cfg.yaml' line 2: trainer.<<: {problem}"),
        (["train", "--resume", "run"], {}, f"--resume: 'run/config.yaml' line 3: trainer.<<: {problem}"),
        (["train", "--set", "trainer={<<: {max_epochs: 2}, max_epochs: 5}"], {}, f"trainer.<<: {problem}"),
        (
            ["config", "show"],
            {"TRAINTEL__TRAINER": "{<<: {max_epochs: 2}}"},
            f"trainer.<<: {problem} (set by TRAINTEL__TRAINER)",
        ),
    ]
    for args, env, message in cases:
        proc = run_cli(tmp_path, *args, env=env)
        assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", f"traintel: error: {message}\n"), args
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "cfg.yaml",
        "run",
        "run/config.yaml",
    ]


def test_read_yaml_names_its_origin(tmp_path: Path) -> None:
    path = _file(tmp_path, "a: 1\na: 2\n")
    with pytest.raises(ConfigError) as caught:
        read_yaml(path, origin="somewhere")
    assert str(caught.value) == f"somewhere: {str(path)!r} line 2: duplicate key 'a'"


# --------------------------------------------------------------------------- --set and the environment


@pytest.mark.parametrize(
    ("overrides", "environ", "message"),
    [
        pytest.param(["task.params.x=[&a [1, 2], *a]"], {}, "task.params.x: YAML anchors and aliases are not allowed", id="set-alias"),
        pytest.param(
            [], {"TRAINTEL__TASK__PARAMS__X": "&a [1, 2]"},
            "task.params.x: YAML anchors and aliases are not allowed (set by TRAINTEL__TASK__PARAMS__X)",
            id="environment-anchor",
        ),
        pytest.param(["task.params.x={a: 1, a: 2}"], {}, "task.params.x: duplicate key 'a'", id="set-duplicate-key"),
        pytest.param(
            ["task.params.x=" + "[" * 65 + "]" * 65], {},
            "task.params.x: nesting deeper than 64 levels is not allowed",
            id="set-too-deep",
        ),
        pytest.param(
            [], {"TRAINTEL__TASK__PARAMS__X": "[" * 5000 + "]" * 5000},
            "task.params.x: nesting deeper than 64 levels is not allowed (set by TRAINTEL__TASK__PARAMS__X)",
            id="environment-far-too-deep",
        ),
        pytest.param(
            ["trainer={<<: {max_epochs: 2}, max_epochs: 5}"], {},
            "trainer.<<: YAML merge keys are not supported; write the keys out",
            id="set-merge-key",
        ),
        pytest.param(
            ["task.params.x=[{a: 1, <<: [{a: 2}, {a: 3}]}]"], {},
            "task.params.x[0].<<: YAML merge keys are not supported; write the keys out",
            id="set-merge-key-in-a-list",
        ),
        pytest.param(
            [], {"TRAINTEL__TRAINER": "{max_epochs: 5, <<: {max_epochs: 2}}"},
            "trainer.<<: YAML merge keys are not supported; write the keys out (set by TRAINTEL__TRAINER)",
            id="environment-merge-key",
        ),
    ],
)  # fmt: skip
def test_refused_override_values(overrides: list[str], environ: dict[str, str], message: str) -> None:
    assert _error(overrides=overrides, environ=environ) == message


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("3", 3),
        ("1e-3", 0.001),
        ("5E+2", 500.0),
        ("null", None),
        ("true", True),
        ("0.0.0.0", "0.0.0.0"),
        ("*.csv", "*.csv"),  # not valid YAML (an undefined alias): the text itself, as before
        ("[oops", "[oops"),
        ("{a: 1}", {"a": 1}),
        ("", ""),
        ("x\udcffy", "x\udcffy"),  # a byte that is not UTF-8 in os.environ: the text, for pydantic to refuse
    ],
)
def test_parse_scalar(text: str, value: Any) -> None:
    assert parse_scalar(text) == value
    assert type(parse_scalar(text)) is type(value)


def test_parse_scalar_refuses_aliases() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_scalar("[&a 1, *a]")
    assert str(caught.value) == "--set: YAML anchors and aliases are not allowed"


def test_parse_scalar_refuses_merge_keys() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_scalar("{a: 1, <<: {a: 2}}")
    assert str(caught.value) == "--set: <<: YAML merge keys are not supported; write the keys out"


# --------------------------------------------------------------------------- strict types


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("sinks.prometheus.port=true", "sinks.prometheus.port: input should be a valid integer, not a boolean (got True)"),
        ("sinks.diagnostic.max_bytes=yes", "sinks.diagnostic.max_bytes: input should be a valid integer, not a boolean (got True)"),
        ("trainer.max_epochs='3'", "trainer.max_epochs: input should be a valid integer, not a string (got '3')"),
        ("trainer.max_epochs=3.0", "trainer.max_epochs: input should be a valid integer, not a float (got 3.0)"),
        ("trainer.max_epochs=null", "trainer.max_epochs: input should be a valid integer, not null (got None)"),
        ("run.seed=1.5", "run.seed: input should be a valid integer, not a float (got 1.5)"),
        ("checkpoint.every_steps=false", "checkpoint.every_steps: input should be a valid integer, not a boolean (got False)"),
        ("trainer.optimizer.lr=true", "trainer.optimizer.lr: input should be a valid number, not a boolean (got True)"),
        ("trainer.optimizer.lr='0.1'", "trainer.optimizer.lr: input should be a valid number, not a string (got '0.1')"),
        ("trainer.grad_clip_norm=on", "trainer.grad_clip_norm: input should be a valid number, not a boolean (got True)"),
        ("telemetry.max_delay_seconds='0'", "telemetry.max_delay_seconds: input should be a valid number, not a string (got '0')"),
        ("sinks.json.enabled=1", "sinks.json.enabled: input should be a valid boolean, not an integer (got 1)"),
        ("sinks.prometheus.per_rank='true'", "sinks.prometheus.per_rank: input should be a valid boolean, not a string (got 'true')"),
        ("run.name=true", "run.name: input should be a valid string, not a boolean (got True)"),
    ],
)  # fmt: skip
def test_strict_types(setting: str, message: str) -> None:
    assert _error(overrides=[setting]) == message


def test_strict_types_in_a_file(tmp_path: Path) -> None:
    path = _file(tmp_path, "sinks:\n  prometheus:\n    port: '9400'\n")
    assert _error(path) == "sinks.prometheus.port: input should be a valid integer, not a string (got '9400')"


def test_what_strict_types_still_accept(tmp_path: Path) -> None:
    path = _file(tmp_path, "trainer:\n  optimizer:\n    lr: 1\n    momentum: '0.9'\n    foreach: yes\n")
    cfg = load_config(
        path,
        [
            "trainer.max_epochs=3",
            "run.name=2024",
            "run.id=20240101",
            "task.params.flag=yes",
            "task.params.n='3'",
        ],
        environ={"TRAINTEL__TRAINER__ACCUMULATION_STEPS": "4", "TRAINTEL__TELEMETRY__MAX_DELAY_SECONDS": "0"},
    )
    assert cfg.trainer.max_epochs == 3
    assert cfg.trainer.accumulation_steps == 4
    assert cfg.telemetry.max_delay_seconds == 0.0
    assert isinstance(cfg.trainer.optimizer.lr, float) and cfg.trainer.optimizer.lr == 1.0
    assert cfg.trainer.optimizer.model_extra == {"momentum": "0.9", "foreach": True}  # free-form: for torch
    assert (cfg.run.name, cfg.run.id) == ("2024", "20240101")
    assert cfg.task.params == {"flag": True, "n": "3"}  # free-form: for the factory


def test_sink_params_stay_free_form() -> None:
    cfg = load_config(None, ["sinks.extra=[{factory: 'a:b', params: {port: 'x', flag: yes}}]"], environ={})
    assert cfg.sinks.extra[0].params == {"port": "x", "flag": True}


# --------------------------------------------------------------------------- ranges


@pytest.mark.parametrize(
    ("scheduler", "message"),
    [
        ("{name: cosine, T_max: 0}", "trainer.scheduler.T_max: input should be greater than or equal to 1 (got 0)"),
        ("{name: cosine, T_max: -5}", "trainer.scheduler.T_max: input should be greater than or equal to 1 (got -5)"),
        ("{name: cosine, T_max: 1.5}", "trainer.scheduler.T_max: input should be a valid integer, not a float (got 1.5)"),
        ("{name: cosine, T_max: true}", "trainer.scheduler.T_max: input should be a valid integer, not a boolean (got True)"),
        ("{name: cosine, eta_min: -1e-3}", "trainer.scheduler.eta_min: input should be greater than or equal to 0 (got -0.001)"),
        ("{name: step}", "trainer.scheduler.step_size: is required by the step scheduler"),
        ("{name: step, step_size: 0}", "trainer.scheduler.step_size: input should be greater than or equal to 1 (got 0)"),
        ("{name: step, step_size: '10'}", "trainer.scheduler.step_size: input should be a valid integer, not a string (got '10')"),
        ("{name: step, step_size: 10, gamma: 0}", "trainer.scheduler.gamma: input should be greater than 0 (got 0)"),
        ("{name: step, step_size: 10, gamma: -0.5}", "trainer.scheduler.gamma: input should be greater than 0 (got -0.5)"),
        ("{name: step, step_size: 10, gamma: .inf}", "trainer.scheduler.gamma: input should be a finite number (got inf)"),
        ("{name: exponential}", "trainer.scheduler.gamma: is required by the exponential scheduler"),
        ("{name: exponential, gamma: 0}", "trainer.scheduler.gamma: input should be greater than 0 (got 0)"),
        ("{name: linear_warmup}", "trainer.scheduler.warmup_steps: is required by the linear_warmup scheduler"),
        ("{name: linear_warmup, warmup_steps: 0}", "trainer.scheduler.warmup_steps: input should be greater than or equal to 1 (got 0)"),
        ("{name: cosine, last_epoch: 3}", "trainer.scheduler.last_epoch: unknown key for the cosine scheduler (it takes T_max, eta_min)"),
        ("{name: step, step_size: 2, T_max: 3}", "trainer.scheduler.T_max: unknown key for the step scheduler (it takes step_size, gamma)"),
        ("{T_max: 3}", "trainer.scheduler.name: must be one of 'cosine', 'step', 'exponential', 'linear_warmup', 'warmup_cosine', 'onecycle' or a 'module:function' factory (got none)"),
        ("{name: one_cycle}", "trainer.scheduler.name: must be one of 'cosine', 'step', 'exponential', 'linear_warmup', 'warmup_cosine', 'onecycle' or a 'module:function' factory (got 'one_cycle')"),
        ("{name: warmup_cosine}", "trainer.scheduler.warmup_steps: is required by the warmup_cosine scheduler"),
        ("{name: warmup_cosine, warmup_steps: -1}", "trainer.scheduler.warmup_steps: input should be greater than or equal to 0 (got -1)"),
        ("{name: warmup_cosine, warmup_steps: 2, min_lr: -1}", "trainer.scheduler.min_lr: input should be greater than or equal to 0 (got -1)"),
        ("{name: warmup_cosine, warmup_steps: 2, total_steps: 0}", "trainer.scheduler.total_steps: input should be greater than or equal to 1 (got 0)"),
        ("{name: onecycle, pct_start: 1}", "trainer.scheduler.pct_start: input should be less than 1 (got 1)"),
        ("{name: onecycle, anneal_strategy: cosine}", "trainer.scheduler.anneal_strategy: must be one of 'cos' or 'linear' (got 'cosine')"),
        ("{name: onecycle, epochs: 3}", "trainer.scheduler.epochs: unknown key for the onecycle scheduler (it takes max_lr, total_steps, pct_start, anneal_strategy, div_factor, final_div_factor, three_phase, cycle_momentum, base_momentum, max_momentum)"),
        ("{name: 'mod:'}", "trainer.scheduler.name: must have the form 'module:function', got 'mod:'"),
        ("cosine", "trainer.scheduler: must be null or a mapping such as {name: cosine} (got 'cosine')"),
        ("[cosine]", "trainer.scheduler: must be null or a mapping such as {name: cosine} (got ['cosine'])"),
    ],
)  # fmt: skip
def test_scheduler_arguments(scheduler: str, message: str) -> None:
    assert _error(overrides=[f"trainer.scheduler={scheduler}"]) == message


@pytest.mark.parametrize(
    ("scheduler", "expected"),
    [
        ("{name: cosine}", {"name": "cosine", "T_max": None, "eta_min": 0.0}),
        ("{name: cosine, T_max: 100, eta_min: 0}", {"name": "cosine", "T_max": 100, "eta_min": 0}),
        ("{name: step, step_size: 10, gamma: 0.5}", {"name": "step", "step_size": 10, "gamma": 0.5}),
        ("{name: step, step_size: 10}", {"name": "step", "step_size": 10, "gamma": 0.1}),
        ("{name: exponential, gamma: 1}", {"name": "exponential", "gamma": 1}),
        ("{name: linear_warmup, warmup_steps: 5}", {"name": "linear_warmup", "warmup_steps": 5}),
        (
            "{name: warmup_cosine, warmup_steps: 0}",
            {"name": "warmup_cosine", "warmup_steps": 0, "min_lr": 0.0, "total_steps": None},
        ),
        ("{name: 'mylib.sched:make', gamma: 0.5}", {"name": "mylib.sched:make", "gamma": 0.5}),
    ],
)
def test_scheduler_arguments_that_are_fine(scheduler: str, expected: dict[str, Any]) -> None:
    cfg = load_config(None, [f"trainer.scheduler={scheduler}"], environ={})
    assert cfg.to_dict()["trainer"]["scheduler"] == expected


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("trainer.optimizer.lr=-0.1", "trainer.optimizer.lr: input should be greater than 0 (got -0.1)"),
        ("trainer.optimizer.lr=0", "trainer.optimizer.lr: input should be greater than 0 (got 0)"),
        ("run.dir=''", "run.dir: string should have at least 1 character (got '')"),
        ("sinks.prometheus.pushgateway.url=http://gw:0", "sinks.prometheus.pushgateway.url: port '0' is not a number from 1 to 65535, got 'http://gw:0'"),
        ("sinks.prometheus.pushgateway.url=http://gw:99999", "sinks.prometheus.pushgateway.url: port '99999' is not a number from 1 to 65535, got 'http://gw:99999'"),
        ("sinks.prometheus.pushgateway.url=http:///metrics", "sinks.prometheus.pushgateway.url: must be an http:// or https:// URL such as 'http://pushgateway:9091', got 'http:///metrics'"),
        ("sinks.prometheus.pushgateway.url=pushgateway:9091", "sinks.prometheus.pushgateway.url: must be an http:// or https:// URL such as 'http://pushgateway:9091', got 'pushgateway:9091'"),
    ],
)  # fmt: skip
def test_other_ranges(setting: str, message: str) -> None:
    assert _error(overrides=[setting]) == message


def test_scheduler_arguments_with_capitals_can_be_set_from_the_environment() -> None:
    """Variable names are upper case; the cosine scheduler's ``T_max`` is found all the same."""
    environ = {
        "TRAINTEL__TRAINER__SCHEDULER__NAME": "cosine",
        "TRAINTEL__TRAINER__SCHEDULER__T_MAX": "7",
        "TRAINTEL__TRAINER__SCHEDULER__ETA_MIN": "0.001",
        "TRAINTEL__TASK__PARAMS__T_MAX": "3",  # a task's own parameter keeps the lower-case name
    }
    cfg = load_config(environ=environ)
    assert cfg.trainer.scheduler is not None
    assert cfg.to_dict()["trainer"]["scheduler"] == {"name": "cosine", "T_max": 7, "eta_min": 0.001}
    assert cfg.task.params == {"t_max": 3}


def test_the_pushgateway_password_is_a_secret_str_that_plain_data_still_carries() -> None:
    cfg = load_config(None, ["sinks.prometheus.pushgateway.password=1234"], environ={})
    password = cfg.sinks.prometheus.pushgateway.password
    assert password is not None
    assert password.get_secret_value() == "1234"  # a number given as an override is the text
    assert "1234" not in repr(cfg)
    assert "1234" not in str(cfg.sinks.prometheus.pushgateway)
    assert cfg.to_dict()["sinks"]["prometheus"]["pushgateway"]["password"] == "1234"
    assert cfg.to_dict(redact=True)["sinks"]["prometheus"]["pushgateway"]["password"] == "***"


@pytest.mark.parametrize(
    ("saved", "current", "message"),
    [
        ({"name": "step", "step_size": 2, "gamma": 0.1}, "{name: step, step_size: 2}", None),
        ({"name": "step", "step_size": 2}, "{name: step, step_size: 2, gamma: 0.1}", None),
        ({"name": "cosine"}, "{name: cosine, eta_min: 0}", None),
        (
            {"name": "step", "step_size": 2},
            "{name: step, step_size: 2, gamma: 0.5}",
            "trainer.scheduler.gamma: cannot change when resuming the run in 'rd': its checkpoint has "
            "None, this attempt 0.5",
        ),
        (
            None,
            "{name: cosine}",
            "trainer.scheduler.name: cannot change when resuming the run in 'rd': its checkpoint has "
            "None, this attempt 'cosine'",
        ),
    ],
)
def test_a_scheduler_argument_left_at_its_default_is_the_same_setting_on_resume(
    saved: dict[str, Any] | None, current: str, message: str | None
) -> None:
    """A checkpoint's scheduler is compared without the arguments at their defaults, whichever way
    the checkpoint or the attempt gave them."""
    from traintel.run.resume import check_settings, fixed_settings

    cfg = load_config(None, [f"trainer.scheduler={current}"], environ={})
    now = fixed_settings(cfg, world_size=1, batch_size=4)
    before = {**now, "trainer": {**now["trainer"], "scheduler": saved}}
    if message is None:
        check_settings(before, now, Path("rd"))
        return
    with pytest.raises(ConfigError) as caught:
        check_settings(before, now, Path("rd"))
    assert str(caught.value) == message
