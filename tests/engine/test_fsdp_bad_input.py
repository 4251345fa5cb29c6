"""Bad FSDP settings: one line on stderr and exit 2 before anything is trained or written (the
config's own checks), and what FSDP cannot take refused before any module is sharded (under
torchrun every rank then exits 2 with that line, as for any bad input there)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.fsdp import FSDPModule

from tests.helpers.children import run_cli
from tests.helpers.paths import DEFAULT_CONFIG
from traintel.config import TrainerConfig
from traintel.errors import ConfigError
from traintel.run.plan import _fully_shard

pytestmark = pytest.mark.slow

CONFIG_ERRORS = [
    ("trainer.distributed.strategy=deepspeed",
     "trainer.distributed.strategy: must be one of 'ddp' or 'fsdp' (got 'deepspeed')"),
    ("trainer.distributed.fsdp.mixed_precision=bf16",
     "trainer.distributed.fsdp.mixed_precision: must be null or a mapping such as "
     "{param_dtype: bf16, reduce_dtype: fp32}, got 'bf16'"),
    ("trainer.distributed.fsdp.mixed_precision={param_dtype: fp16}",
     "trainer.distributed.fsdp.mixed_precision.param_dtype: must be one of 'bf16' or 'fp32' (got 'fp16')"),
    ("trainer.distributed.fsdp.shard_modules=Linear",
     "trainer.distributed.fsdp.shard_modules: input should be a valid list (got 'Linear')"),
    ("checkpoint.async=sometimes", "checkpoint.async: input should be a valid boolean, not a string (got 'sometimes')"),
]  # fmt: skip
"""(``--set`` override, the exact line after ``traintel: error: ``)."""


@pytest.mark.parametrize(
    ("override", "error"), CONFIG_ERRORS, ids=[o.split("=")[0] for o, _ in CONFIG_ERRORS]
)
def test_a_bad_fsdp_setting_is_one_line_and_exit_2(tmp_path: Path, override: str, error: str) -> None:
    args = ["train", "--config", str(DEFAULT_CONFIG), "--set", f"run.dir={tmp_path / 'run'}",
            "--set", "sinks.prometheus.port=0", "--set", override]  # fmt: skip
    proc = run_cli(tmp_path, *args)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", f"traintel: error: {error}\n")
    assert not (tmp_path / "run").exists()


REFUSED = [
    ({"precision": "fp16"},
     "trainer.precision: fp16 is not available with trainer.distributed.strategy fsdp (its loss scale would "
     "need the ranks' overflow checks agreed); use bf16, or fsdp.mixed_precision"),
    ({"compile": True},
     "trainer.compile: is not available with trainer.distributed.strategy fsdp; set it to false"),
    ({"distributed": {"strategy": "fsdp", "fsdp": {"shard_modules": ["Linear", "Block"]}}},
     "trainer.distributed.fsdp.shard_modules[1]: 'Block' names no module of the model (its classes: Linear, "
     "ReLU, Sequential)"),
]  # fmt: skip
"""(``trainer`` settings, the ConfigError's line): refused before any module is sharded."""


@pytest.mark.parametrize(("settings", "error"), REFUSED, ids=["fp16", "compile", "unknown-module"])
def test_what_fsdp_cannot_take_is_refused_before_sharding(settings: dict[str, Any], error: str) -> None:
    tc = TrainerConfig.model_validate({"distributed": {"strategy": "fsdp"}, **settings})
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    with pytest.raises(ConfigError) as caught:
        _fully_shard(model, tc)
    assert str(caught.value) == error
    assert not isinstance(model, FSDPModule)  # nothing sharded
