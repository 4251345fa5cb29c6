"""The run configuration: typed settings (``model``), where they come from (``sources``: file <
environment < ``--set``), safe YAML (``reading``) and one-line errors (``messages``).

No torch, no ignite: ``traintel --help`` and ``traintel config show`` stay fast.
"""

from traintel.config.model import (
    URL_KEYS,
    CheckpointConfig,
    Config,
    CosineSchedule,
    DiagnosticSinkConfig,
    DistributedConfig,
    ExponentialSchedule,
    ExtraSinkConfig,
    JsonSinkConfig,
    LinearWarmupSchedule,
    OptimizerConfig,
    PrometheusSinkConfig,
    PushgatewayConfig,
    RunConfig,
    SchedulerConfig,
    SinksConfig,
    StepSchedule,
    TaskConfig,
    TelemetryConfig,
    TrainerConfig,
)
from traintel.config.reading import MAX_CONFIG_BYTES, MAX_DEPTH, parse_scalar, read_yaml
from traintel.config.sources import (
    ENV_PREFIX,
    RESUMABLE_KEYS,
    apply_overrides,
    coerce_config,
    env_overrides,
    load_config,
    load_resume_config,
    validate,
)

__all__ = [
    "ENV_PREFIX",
    "MAX_CONFIG_BYTES",
    "MAX_DEPTH",
    "RESUMABLE_KEYS",
    "URL_KEYS",
    "CheckpointConfig",
    "Config",
    "CosineSchedule",
    "DiagnosticSinkConfig",
    "DistributedConfig",
    "ExponentialSchedule",
    "ExtraSinkConfig",
    "JsonSinkConfig",
    "LinearWarmupSchedule",
    "OptimizerConfig",
    "PrometheusSinkConfig",
    "PushgatewayConfig",
    "RunConfig",
    "SchedulerConfig",
    "SinksConfig",
    "StepSchedule",
    "TaskConfig",
    "TelemetryConfig",
    "TrainerConfig",
    "apply_overrides",
    "coerce_config",
    "env_overrides",
    "load_config",
    "load_resume_config",
    "parse_scalar",
    "read_yaml",
    "validate",
]
