"""Secrets are redacted everywhere the config is shown or written, and in error messages.

``traintel.redaction`` decides which key names hold a secret and removes URL credentials;
``Config.to_dict(redact=True)`` (``run.start``, the saved ``config.yaml``, ``config show``) and the
config's error messages use it, and a resumed run never takes a redacted URL for a real one.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers.children import child_env, run_cli
from tests.helpers.servers import free_port
from traintel import redaction
from traintel.config import Config, load_config, load_resume_config, validate
from traintel.errors import ConfigError
from traintel.redaction import REDACTED, has_redacted_url, is_secret_key, redact, redact_url, redact_url_value
from traintel.sinks import PrometheusSink, Pushgateway
from traintel.testing import end_record, run_context

SECRET_NAMES = [
    "password",
    "PASSWORD",
    "Password",
    "passwd",
    "pwd",
    "db_password",
    "dbPassword",
    "db-password",
    "dbpassword",
    "password2",
    "db_password_2",
    "passphrase",
    "ssh_passphrase",
    "secret",
    "secrets",
    "client_secret",
    "clientSecret",
    "CLIENT_SECRET",
    "token",
    "access_token",
    "accessToken",
    "refresh-token",
    "github_token",
    "githubtoken",
    "HF_TOKEN",
    "id_token",
    "auth_token",
    "AWS_SESSION_TOKEN",
    "api_key",
    "apikey",
    "apiKey",
    "APIKey",
    "API_KEY",
    "api-keys",
    "x-api-key",
    "X-Api-Key",
    "api.key",
    "API Key",
    "api_key_2",
    "access_key",
    "accessKey",
    "secret_key",
    "secretKey",
    "secret_access_key",
    "aws_secret_access_key",
    "private_key",
    "privateKey",
    "private-key",
    "signing_key",
    "encryption_key",
    "master_key",
    "hmac_key",
    "auth_key",
    "account_key",
    "Ocp-Apim-Subscription-Key",
    "credential",
    "credentials",
    "gcp_credentials",
    "Credentials",
    "authorization",
    "Authorization",
    "Proxy-Authorization",
    "cookie",
    "Cookie",
    "Set-Cookie",
    "cookies",
    "session_id",
    "sessionId",
    "session-id",
    "sessionid",
    "JSESSIONID",
    "PHPSESSID",
    "session_key",
    "auth",
    "basic_auth",
    "http.auth",
    "oauth",
]
"""Key names whose values are replaced by ``***``: each is, or ends with, one of ``SECRET_NAMES``
once normalised."""

VISIBLE_NAMES = [
    "key",
    "keys",
    "Key",
    "keyfile",
    "certfile",
    "client_cafile",
    "max_bytes",
    "monkey",
    "keyboard",
    "hotkey",
    "tokenizer",
    "tokenizer_name",
    "max_tokens",
    "tokens",
    "pad_token",
    "eos_token",
    "eos_token_id",
    "bos_token",
    "unk_token",
    "sep_token",
    "cls_token",
    "mask_token",
    "pad_token_id",
    "decoder_start_token_id",
    "special_tokens",
    "sort_key",
    "label_key",
    "cache_key",
    "primary_key",
    "image_key",
    "password_file",
    "token_path",
    "private_key_path",
    "private_key_file",
    "secret_dir",
    "credentials_file",
    "auth_url",
    "auth_type",
    "token_type",
    "token_url",
    "api_key_id",
    "password_hash",
    "secretKeyRef",
    "cookie_name",
    "oauth_scope",
    "session",
    "session_length",
    "username",
    "user",
    "host",
    "url",
    "name",
    "job",
    "hidden",
    "lr",
    "",
]
"""Key names whose values stay visible: a secret name followed by more (``token_type``,
``password_file``), a word that only contains one (``tokenizer``), a tokenizer's token."""


@pytest.mark.parametrize("name", SECRET_NAMES)
def test_secret_names_are_redacted(name: str) -> None:
    assert is_secret_key(name)
    assert redact({name: "s3cret"}) == {name: REDACTED}


@pytest.mark.parametrize("name", VISIBLE_NAMES)
def test_other_names_stay_visible(name: str) -> None:
    assert not is_secret_key(name)
    assert redact({name: "value"}) == {name: "value"}


def test_the_module_docstring_lists_the_names() -> None:
    doc = redaction.__doc__ or ""
    listed = doc.split("one of ``SECRET_NAMES``::\n\n", 1)[1].split("\n\n", 1)[0]
    tokens = re.search(r"a tokenizer's tokens:\s+``([a-z ]+)``", doc)
    assert tokens is not None
    assert tuple(listed.split()) == redaction.SECRET_NAMES
    assert frozenset(tokens[1].split()) == redaction.NOT_SECRET_NAMES


def test_each_name_that_is_not_a_secret_ends_with_a_secret_name() -> None:
    """``NOT_SECRET_NAMES`` only holds the exceptions the rule needs."""
    unneeded = [n for n in sorted(redaction.NOT_SECRET_NAMES) if not n.endswith(redaction.SECRET_NAMES)]
    assert unneeded == []
    assert [n for n in sorted(redaction.NOT_SECRET_NAMES) if is_secret_key(n)] == []


def test_a_key_that_is_not_a_string_is_not_a_secret() -> None:
    assert not is_secret_key(3)
    assert redact({3: "x", None: "y"}) == {3: "x", None: "y"}


def test_redact_reaches_every_level_and_leaves_the_input_alone() -> None:
    data: dict[str, Any] = {
        "params": {
            "headers": {"Authorization": "Bearer abc", "Accept": "application/json"},
            "client": {"nested": [{"api_key": "k1"}, {"sort_key": "date"}]},
            "password": None,
            "credentials": {"user": "u", "pass": "p"},
            "token": 12345,
            "hidden": 8,
        }
    }
    before = repr(data)

    out = redact(data)

    assert out == {
        "params": {
            "headers": {"Authorization": REDACTED, "Accept": "application/json"},
            "client": {"nested": [{"api_key": REDACTED}, {"sort_key": "date"}]},
            "password": None,  # nothing to hide: a null stays null
            "credentials": REDACTED,  # the whole value, whatever it holds
            "token": REDACTED,
            "hidden": 8,
        }
    }
    assert repr(data) == before


def test_redact_hides_name_value_entries_and_header_pairs() -> None:
    data = {
        "env": [{"name": "API_TOKEN", "value": "abc"}, {"name": "LOG_LEVEL", "value": "info"}],
        "headers": [["Authorization", "Bearer abc"], ["Accept", "text/plain"]],
        "pairs": (("X-Api-Key", "k"), ("Host", "h")),
    }
    assert redact(data) == {
        "env": [{"name": "API_TOKEN", "value": REDACTED}, {"name": "LOG_LEVEL", "value": "info"}],
        "headers": [["Authorization", REDACTED], ["Accept", "text/plain"]],
        "pairs": (("X-Api-Key", REDACTED), ("Host", "h")),
    }


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("http://u:s3cret@host:9091", "http://***@host:9091"),
        ("postgresql://u:p@h/db", "postgresql://***@h/db"),
        ("postgresql+psycopg://app:pw@db.internal:5432/x?sslmode=require", "postgresql+psycopg://***@db.internal:5432/x?sslmode=require"),
        ("https://ghp_token123@github.com/org/repo.git", "https://***@github.com/org/repo.git"),
        ("redis://:pw@cache:6379/0", "redis://***@cache:6379/0"),
        ("http://u:p@ss@host/x", "http://***@host/x"),
        ("push to http://u:p@h:1/metrics failed: 'https://a:b@c/' refused", "push to http://***@h:1/metrics failed: 'https://***@c/' refused"),
        ("https://h/cb?access_token=abc&page=2#frag", "https://h/cb?access_token=***&page=2#frag"),
        ("https://h/cb#id_token=abc&state=1", "https://h/cb#id_token=***&state=1"),
        ("https://h/x?api%5Fkey=abc", "https://h/x?api%5Fkey=***"),
        ("https://h/x?q=a@b.com&page=2", "https://h/x?q=a@b.com&page=2"),
        ("http://host:9091/path/user@example", "http://host:9091/path/user@example"),
        ("http://***@host", "http://***@host"),
        ("mailto:someone@example.com", "mailto:someone@example.com"),
        ("user:pass@host", "user:pass@host"),
        ("no url here: a@b", "no url here: a@b"),
        ("", ""),
    ],
)  # fmt: skip
def test_redact_url(text: str, shown: str) -> None:
    assert redact_url(text) == shown
    assert redact({"url": text}) == {"url": shown}
    assert redact([text]) == [shown]


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("http://***@gw:9091", True),
        ("postgresql://***@db/x", True),
        ("https://h/?token=***", True),
        ("https://h/?page=***", False),
        ("http://u:p@gw:9091", False),
        ("http://gw:9091", False),
        ("***", False),
    ],
)
def test_has_redacted_url(text: str, redacted: bool) -> None:
    assert has_redacted_url(text) is redacted


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("http://u:s3cret@host:9091", "http://***@host:9091"),
        ("u:s3cret@127.0.0.1:1", "***@127.0.0.1:1"),
        ("u:s3c@ret@host", "***@host"),
        ("u:s3:cret@host/x", "***@host/x"),
        ("http://u:s3c/ret@host", "http://***@host"),
        ("http://u:s3c#ret@host", "http://***@host"),
        ("http://u:s3c?ret@host", "http://***@host"),
        ("http://u:s3c ret@host", "http://***@host"),
        ("http://u:s3c'ret@host:9091", "http://***@host:9091"),
        ('http://u:s3c"ret@host', "http://***@host"),
        ("http://u:s3c<ret>@host", "http://***@host"),
        ("http:/u:s3cret@host", "http:/***@host"),
        ("https://h/cb?access_token=abc&page=2", "https://h/cb?access_token=***&page=2"),
        ("gw:9091?token=abc", "gw:9091?token=***"),
        ("http://gw:9091", "http://gw:9091"),
        ("", ""),
    ],
)
def test_redact_url_value_hides_the_credentials_of_any_shape(value: str, shown: str) -> None:
    assert redact_url_value(value) == shown


def test_the_redaction_module_imports_neither_torch_nor_pydantic(tmp_path: Path) -> None:
    code = "import sys, traintel.redaction; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'pydantic', 'yaml'}))"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, check=True
    )
    assert proc.stdout == "[]\n"


# --------------------------------------------------------------------------- the config


def _secret_config() -> Config:
    return validate(
        {
            "task": {
                "params": {
                    "dsn": "postgresql://app:pw1@db/x",
                    "api_key": "k2",
                    "headers": {"Authorization": "Bearer t3"},
                    "tokenizer": "gpt2",
                    "pad_token": "[PAD]",
                }
            },
            "sinks": {
                "prometheus": {
                    "pushgateway": {"url": "http://ci:pw4@gw:9091", "username": "ci", "password": "pw5"}
                },
                "extra": [
                    {"factory": "mod:make", "params": {"endpoint": "https://h/x?token=t6", "secret": "s7"}}
                ],
            },
        }
    )


def test_to_dict_redacts_key_names_and_url_credentials() -> None:
    data = _secret_config().to_dict(redact=True)

    assert data["task"]["params"] == {
        "dsn": "postgresql://***@db/x",
        "api_key": REDACTED,
        "headers": {"Authorization": REDACTED},
        "tokenizer": "gpt2",
        "pad_token": "[PAD]",
    }
    assert data["sinks"]["prometheus"]["pushgateway"] == {
        "url": "http://***@gw:9091",
        "job": "traintel",
        "username": "ci",
        "password": REDACTED,
        "timeout_seconds": 5.0,
    }
    assert data["sinks"]["extra"][0]["params"] == {"endpoint": "https://h/x?token=***", "secret": REDACTED}
    shown = yaml.safe_dump(data)
    assert not any(word in shown for word in ("pw1", "k2", "t3", "pw4", "pw5", "t6", "s7"))


def test_to_dict_without_redact_keeps_every_value() -> None:
    data = _secret_config().to_dict()
    assert data["task"]["params"]["dsn"] == "postgresql://app:pw1@db/x"
    assert data["sinks"]["prometheus"]["pushgateway"]["password"] == "pw5"


def test_config_redacted_is_the_redaction_modules() -> None:
    assert (
        _secret_config().to_dict(redact=True)["sinks"]["prometheus"]["pushgateway"]["password"]
        == REDACTED
        == "***"
    )


def test_config_show_redacts_url_credentials(tmp_path: Path) -> None:
    proc = run_cli(
        tmp_path,
        "config",
        "show",
        "--set",
        "sinks.prometheus.pushgateway.url=http://ci:s3cret@gw:9091",
        "--set",
        "task.params.dsn=postgresql://app:pa55@db/x",
    )
    assert proc.stderr == ""
    assert proc.returncode == 0
    assert "s3cret" not in proc.stdout and "pa55" not in proc.stdout
    data = yaml.safe_load(proc.stdout)
    assert data["sinks"]["prometheus"]["pushgateway"]["url"] == "http://***@gw:9091"
    assert data["task"]["params"] == {"dsn": "postgresql://***@db/x"}


# --------------------------------------------------------------------------- error messages


@pytest.mark.parametrize(
    ("overrides", "environ", "message"),
    [
        pytest.param(
            ["sinks.prometheus.pushgateway.url=http://u:s3cret@host:bad"], {},
            "sinks.prometheus.pushgateway.url: port 'bad' is not a number from 1 to 65535, got 'http://***@host:bad'",
            id="pushgateway-url-bad-port",
        ),
        pytest.param(
            ["sinks.prometheus.pushgateway.url=ftp://u:s3cret@host"], {},
            "sinks.prometheus.pushgateway.url: must be an http:// or https:// URL such as "
            "'http://pushgateway:9091', got 'ftp://***@host'",
            id="pushgateway-url-bad-scheme",
        ),
        pytest.param(
            ["sinks.prometheus.pushgateway.url=http://u:s3cret@[::1"], {},
            "sinks.prometheus.pushgateway.url: is not a valid URL (Invalid IPv6 URL), got 'http://***@[::1'",
            id="pushgateway-url-unparsable",
        ),
        pytest.param(
            ["sinks.prometheus.pushgateway.url=bob:s3cret@127.0.0.1:1"], {},
            "sinks.prometheus.pushgateway.url: must be an http:// or https:// URL such as "
            "'http://pushgateway:9091', got '***@127.0.0.1:1'",
            id="pushgateway-url-without-scheme",
        ),
        pytest.param(
            [], {"TRAINTEL__SINKS__PROMETHEUS__PUSHGATEWAY__URL": "bob:s3cret@x@gw:9091"},
            "sinks.prometheus.pushgateway.url: must be an http:// or https:// URL such as "
            "'http://pushgateway:9091', got '***@gw:9091' (set by TRAINTEL__SINKS__PROMETHEUS__PUSHGATEWAY__URL)",
            id="pushgateway-url-without-scheme-from-environment",
        ),
        pytest.param(
            ["sinks.prometheus.pushgateway.url=http://u:s3cret x@gw:9091"], {},
            "sinks.prometheus.pushgateway.url: must be an http:// or https:// URL such as "
            "'http://pushgateway:9091', got 'http://***@gw:9091'",
            id="pushgateway-url-password-with-a-space",
        ),
        pytest.param(
            ["sinks.prometheus.pushgateway.url=http://u:s3cret'x@gw:bad"], {},
            "sinks.prometheus.pushgateway.url: port 'bad' is not a number from 1 to 65535, got 'http://***@gw:bad'",
            id="pushgateway-url-password-with-a-quote",
        ),
        pytest.param(
            ["sinks.prometheus.pushgateway.url=http://u:s3cret:x@gw:99999"], {},
            "sinks.prometheus.pushgateway.url: port '99999' is not a number from 1 to 65535, got 'http://***@gw:99999'",
            id="pushgateway-url-password-with-a-colon",
        ),
        pytest.param(
            ["sinks.prometheus.pushgateway.url=http://u:s3cret/x@gw:9091"], {},
            "sinks.prometheus.pushgateway.url: has an '@' after its host: percent-encode '/', '?' and '#' "
            "in a user name or password (%2F, %3F, %23), got 'http://***@gw:9091'",
            id="pushgateway-url-password-with-a-slash",
        ),
        pytest.param(
            ["sinks.prometheus.pushgateway.url=http://u:s3cret#x@gw:9091"], {},
            "sinks.prometheus.pushgateway.url: has an '@' after its host: percent-encode '/', '?' and '#' "
            "in a user name or password (%2F, %3F, %23), got 'http://***@gw:9091'",
            id="pushgateway-url-password-with-a-hash",
        ),
        pytest.param(
            ["sinks.prometheus.pushgateway.url=http://u:s3cret\uff03x@gw:9091"], {},
            "sinks.prometheus.pushgateway.url: is not a valid URL (characters that NFKC normalization turns "
            "into '/', '?', '#', '@' or ':'), got 'http://***@gw:9091'",
            id="pushgateway-url-password-with-a-fullwidth-hash",
        ),
        pytest.param(
            ["sinks.prometheus.pushgateway.url=u:s3cret@gw", "sinks.prometheus.pushgateway.url.x=1"], {},
            "sinks.prometheus.pushgateway.url: holds the value '***@gw', not a section; "
            "cannot set sinks.prometheus.pushgateway.url.x",
            id="pushgateway-url-not-a-section",
        ),
        pytest.param(
            ["sinks.prometheus.pushgateway.password=true"], {},
            "sinks.prometheus.pushgateway.password: input should be a valid string, not a boolean (got '***')",
            id="secret-key-wrong-type",
        ),
        pytest.param(
            ["trainer.precision=http://u:s3cret@h"], {},
            "trainer.precision: must be one of 'fp32', 'bf16' or 'fp16' (got 'http://***@h')",
            id="literal-echo",
        ),
        pytest.param(
            [], {"TRAINTEL__TRAINER__PRECISION": "http://u:s3cret@h"},
            "trainer.precision: must be one of 'fp32', 'bf16' or 'fp16' (got 'http://***@h') "
            "(set by TRAINTEL__TRAINER__PRECISION)",
            id="literal-echo-from-environment",
        ),
        pytest.param(
            ["task.factory=http://u:s3cret@h"], {},
            "task.factory: must have the form 'module:function', got 'http://***@h'",
            id="value-error-echo",
        ),
        pytest.param(
            ["task.params.password=s3cret", "task.params.password.x=1"], {},
            "task.params.password: holds the value '***', not a section; cannot set task.params.password.x",
            id="not-a-section",
        ),
        pytest.param(
            ["http://u:s3cret@h"], {},
            "--set: 'http://***@h' must have the form key.path=value",
            id="set-without-equals",
        ),
    ],
)  # fmt: skip
def test_error_messages_do_not_echo_secrets(
    overrides: list[str], environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides, environ=environ)
    assert str(caught.value) == message
    assert "s3cret" not in str(caught.value)


def test_pushgateway_url_with_credentials_and_a_port_is_valid() -> None:
    cfg = load_config(
        None, ["sinks.prometheus.pushgateway.url=https://u:s3cret@gw.example:9443/base"], environ={}
    )
    assert cfg.sinks.prometheus.pushgateway.url == "https://u:s3cret@gw.example:9443/base"


def test_a_pushgateway_url_with_odd_characters_in_its_password_is_never_shown() -> None:
    url = "http://ci:s3cret'x\"<y>@gw:9091"
    cfg = load_config(None, [f"sinks.prometheus.pushgateway.url={url}"], environ={})

    assert cfg.sinks.prometheus.pushgateway.url == url
    assert cfg.to_dict(redact=True)["sinks"]["prometheus"]["pushgateway"]["url"] == "http://***@gw:9091"


def test_a_failed_push_does_not_show_an_odd_password(tmp_path: Path) -> None:
    refused = free_port()
    sink = PrometheusSink(port=0, pushgateway=Pushgateway(url=f"http://ci:s3cret'x@127.0.0.1:{refused}"))
    sink.open(run_context(tmp_path))
    sink.emit(end_record())
    message = f"push to http://***@127.0.0.1:{refused} failed: URLError: <urlopen error [Errno 111] Connection refused>"
    with pytest.raises(OSError, match=f"^{re.escape(message)}$"):
        sink.push()
    sink.close()


# --------------------------------------------------------------------------- resume


def _saved_run(tmp_path: Path, config: Config) -> Path:
    """A run directory holding ``config``'s ``config.yaml`` as a run writes it (redacted)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    text = yaml.safe_dump(config.to_dict(redact=True), sort_keys=False)
    (run_dir / "config.yaml").write_text(text, encoding="utf-8")
    return run_dir


def _pushgateway_config(url: str) -> Config:
    return validate(
        {"sinks": {"prometheus": {"pushgateway": {"url": url, "username": "ci", "password": "pw"}}}}
    )


def test_resume_refuses_a_redacted_url_until_it_is_set_again(tmp_path: Path) -> None:
    run_dir = _saved_run(tmp_path, _pushgateway_config("http://ci:s3cret@gw:9091"))
    assert "s3cret" not in (run_dir / "config.yaml").read_text(encoding="utf-8")

    with pytest.raises(ConfigError) as caught:
        load_resume_config(run_dir, environ={})

    assert str(caught.value) == (
        "sinks.prometheus.pushgateway.url: the saved config.yaml has 'http://***@gw:9091', its credentials "
        "redacted; set it again with TRAINTEL__SINKS__PROMETHEUS__PUSHGATEWAY__URL or "
        "--set sinks.prometheus.pushgateway.url=..."
    )


def test_resume_takes_the_url_again_from_the_environment_or_set(tmp_path: Path) -> None:
    original = _pushgateway_config("http://ci:s3cret@gw:9091")
    run_dir = _saved_run(tmp_path, original)
    env = {
        "TRAINTEL__SINKS__PROMETHEUS__PUSHGATEWAY__URL": "http://ci:s3cret@gw:9091",
        "TRAINTEL__SINKS__PROMETHEUS__PUSHGATEWAY__PASSWORD": "pw",
    }

    from_env = load_resume_config(run_dir, environ=env)
    from_set = load_resume_config(
        run_dir, ["sinks.prometheus.pushgateway.url=http://ci:s3cret@gw:9091"], environ={}
    )

    assert from_env.sinks == original.sinks
    assert from_set.sinks.prometheus.pushgateway.url == "http://ci:s3cret@gw:9091"
    assert from_set.sinks.prometheus.pushgateway.password is None  # a redacted key comes back null
    assert from_env.run.dir == str(run_dir)


def test_resume_names_the_environment_variable_for_a_task_parameter(tmp_path: Path) -> None:
    run_dir = _saved_run(tmp_path, validate({"task": {"params": {"dsn": "postgresql://u:pw@db/x"}}}))

    with pytest.raises(ConfigError) as caught:
        load_resume_config(run_dir, environ={})
    resumed = load_resume_config(run_dir, environ={"TRAINTEL__TASK__PARAMS__DSN": "postgresql://u:pw@db/x"})

    assert str(caught.value) == (
        "task.params.dsn: the saved config.yaml has 'postgresql://***@db/x', its credentials redacted; "
        "set it again with TRAINTEL__TASK__PARAMS__DSN"
    )
    assert resumed.task.params == {"dsn": "postgresql://u:pw@db/x"}


def test_resume_cannot_take_back_a_redacted_url_inside_a_list(tmp_path: Path) -> None:
    extra = [{"factory": "mod:make", "params": {"endpoint": "https://h/x?token=abc"}}]
    run_dir = _saved_run(tmp_path, validate({"sinks": {"extra": extra}}))

    with pytest.raises(ConfigError) as caught:
        load_resume_config(run_dir, environ={})

    assert str(caught.value) == (
        "sinks.extra[0].params.endpoint: the saved config.yaml has 'https://h/x?token=***', its credentials "
        "redacted; it is inside a list, so it cannot be set again for --resume"
    )


def test_resume_round_trip_with_secrets_from_the_environment(tmp_path: Path) -> None:
    original = validate(
        {
            "task": {"params": {"hidden": 8, "api_key": "k", "url": "https://h/data"}},
            "sinks": {"prometheus": {"pushgateway": {"url": "http://gw:9091", "password": "pw"}}},
        }
    )
    run_dir = _saved_run(tmp_path, original)

    resumed = load_resume_config(
        run_dir,
        environ={
            "TRAINTEL__TASK__PARAMS__API_KEY": "k",
            "TRAINTEL__SINKS__PROMETHEUS__PUSHGATEWAY__PASSWORD": "pw",
        },
    )

    assert resumed.task == original.task
    assert resumed.sinks == original.sinks
    assert (resumed.run.dir, resumed.run.resume) == (str(run_dir), "auto")
