"""The run configuration as typed, validated pydantic models: every setting, its default and range.

No torch, no ignite: ``traintel --help`` and ``traintel config show`` stay fast.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Strict,
    Tag,
    field_serializer,
    field_validator,
    model_validator,
)

from traintel import redaction
from traintel.redaction import redact_url_value

Int = Annotated[int, Strict()]
"""An integer: not a boolean, a float or a string (``"3"``); ``--set`` and environment values are
parsed as YAML first, so ``--set trainer.max_epochs=3`` is one."""
Float = Annotated[float, Strict()]
"""A number: an integer or a float, not a boolean or a string."""
Bool = Annotated[bool, Strict()]
"""``true`` or ``false``: not 0, 1 or a string."""


def _number_as_text(value: Any) -> Any:
    """An override's ``1234`` (parsed as YAML) as the text ``"1234"``, as ``str`` settings take it."""
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


_FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
"""``module:function``."""


def _check_factory(value: str) -> str:
    if not _FACTORY.fullmatch(value):
        msg = f"must have the form 'module:function', got {value!r}"
        raise ValueError(msg)
    return value


class _Section(BaseModel):
    # Overrides are parsed as YAML, so `--set run.name=2024` arrives as an int: accept it for str fields.
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, coerce_numbers_to_str=True, use_attribute_docstrings=True
    )


_ALIASED = ConfigDict(
    extra="forbid",
    populate_by_name=True,
    validate_assignment=True,
    coerce_numbers_to_str=True,
    use_attribute_docstrings=True,
)
"""A section with a key spelled apart from its field (``json``, ``async``): either name is taken."""


def _null_or_mapping(value: Any, section: type[BaseModel], example: str) -> Any:
    """``value`` for an optional section given as a mapping (or null); anything else is refused
    naming ``example``, before pydantic's own message about the section's model."""
    if value is None or isinstance(value, dict | section):
        return value
    msg = f"must be null or a mapping such as {example}, got {value!r}"
    raise ValueError(msg)


class RunConfig(_Section):
    """Identity and output location of one run."""

    name: str = Field(default="traintel", min_length=1, max_length=200)
    """Human-readable run name; part of the generated run id."""
    id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    """Run id; generated as ``<name>-<UTC time>-<random>`` when null."""
    seed: Int = Field(default=0, ge=0, le=2**32 - 1)
    """Seed for torch's global generators, set before the task factory runs."""
    dir: str | None = Field(default=None, min_length=1)
    """Run directory (diagnostic file, resolved config, checkpoints); default ``runs/<run_id>``."""
    resume: Literal["auto", "never"] = "never"
    """``auto``: when ``dir`` holds a complete checkpoint, continue that run from it (a container
    restarted in place), else start fresh; ``never``: an existing run directory is never reused."""


class TaskConfig(_Section):
    """Where the model, loss and data come from."""

    factory: str | None = Field(default="traintel.tasks.forecast:make_task")
    """``module:function`` returning a task (see ``traintel.task.Task``); null: the task is given in
    code (``traintel.build(config, task)``), as the run records it in ``config.yaml`` and ``run.start``."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments passed to the factory."""

    @field_validator("factory")
    @classmethod
    def _factory_form(cls, value: str | None) -> str | None:
        return None if value is None else _check_factory(value)


OPTIMIZERS = (
    "adadelta",
    "adafactor",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "asgd",
    "muon",
    "nadam",
    "radam",
    "rmsprop",
    "rprop",
    "sgd",
)
"""``torch.optim``'s optimizers by name, lower-cased: all but ``LBFGS`` (its step needs a closure) and
``SparseAdam`` (sparse gradients only). Muon and Adafactor need a torch that has them."""


def _check_optimizer_name(value: str) -> str:
    if value.lower() in OPTIMIZERS:
        return value.lower()
    if _FACTORY.fullmatch(value):
        return value
    names = ", ".join(repr(n) for n in OPTIMIZERS)
    msg = f"must be a torch.optim optimizer ({names}) or a 'module:function' factory, got {value!r}"
    raise ValueError(msg)


class NoDecayConfig(BaseModel):
    """Parameters trained with ``weight_decay: 0`` (the optimizer's other parameters keep its
    ``weight_decay``): a second parameter group."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    names: list[str] = Field(default_factory=list)
    """Patterns (``fnmatch``) of full parameter names, e.g. ``"*bias"``; each must match a parameter."""
    modules: list[str] = Field(default_factory=list)
    """Class names of modules whose own parameters are matched (the class or one it derives from),
    e.g. ``LayerNorm``, ``Embedding``; each must match a parameter."""


class OptimizerConfig(BaseModel):
    """Optimizer name and learning rate; further keys are passed to the optimizer."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, use_attribute_docstrings=True)

    name: str = "adamw"
    """A ``torch.optim`` optimizer (``adamw``, ``sgd``, ``rmsprop``, ...: any but ``lbfgs`` and
    ``sparseadam``), or a ``module:function`` called like one: ``function(params, lr=lr, **others)``."""
    lr: Float = Field(default=1e-3, gt=0, allow_inf_nan=False)
    """Initial learning rate."""
    no_decay: NoDecayConfig | None = None
    """Parameters without weight decay (biases, norms, embeddings), by name pattern or module class."""

    @field_validator("name")
    @classmethod
    def _name_form(cls, value: str) -> str:
        return _check_optimizer_name(value)


PositiveInt = Annotated[Int, Field(ge=1)]
PositiveFloat = Annotated[Float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[Float, Field(ge=0, allow_inf_nan=False)]


class _Schedule(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class CosineSchedule(_Schedule):
    """``torch.optim.lr_scheduler.CosineAnnealingLR``."""

    name: Literal["cosine"]
    """Selects this scheduler."""
    T_max: PositiveInt | None = None
    """Optimizer steps of the half cosine; null: the run's optimizer steps."""
    eta_min: NonNegativeFloat = 0.0
    """The learning rate at the end."""


class StepSchedule(_Schedule):
    """``torch.optim.lr_scheduler.StepLR``."""

    name: Literal["step"]
    """Selects this scheduler."""
    step_size: PositiveInt
    """Optimizer steps between decays."""
    gamma: PositiveFloat = 0.1
    """The factor of each decay."""


class ExponentialSchedule(_Schedule):
    """``torch.optim.lr_scheduler.ExponentialLR``."""

    name: Literal["exponential"]
    """Selects this scheduler."""
    gamma: PositiveFloat
    """The factor applied at every optimizer step."""


class LinearWarmupSchedule(_Schedule):
    """A linear ramp to the optimizer's ``lr`` over ``warmup_steps``, then constant."""

    name: Literal["linear_warmup"]
    """Selects this scheduler."""
    warmup_steps: PositiveInt
    """Optimizer steps of the ramp."""


class WarmupCosineSchedule(_Schedule):
    """A linear ramp to the optimizer's ``lr`` over ``warmup_steps``, then a half cosine down to
    ``min_lr`` at the last step."""

    name: Literal["warmup_cosine"]
    """Selects this scheduler."""
    warmup_steps: Int = Field(ge=0)
    """Optimizer steps of the ramp (0: none)."""
    min_lr: NonNegativeFloat = 0.0
    """The learning rate of the last step."""
    total_steps: PositiveInt | None = None
    """Optimizer steps of ramp and cosine together; null: the run's optimizer steps."""


class OneCycleSchedule(_Schedule):
    """``torch.optim.lr_scheduler.OneCycleLR``: up to ``max_lr`` and down again over the run."""

    name: Literal["onecycle"]
    """Selects this scheduler."""
    max_lr: PositiveFloat | None = None
    """The peak learning rate; null: ``trainer.optimizer.lr``."""
    total_steps: PositiveInt | None = None
    """Optimizer steps of the cycle; null: the run's optimizer steps."""
    pct_start: Float = Field(default=0.3, gt=0, lt=1, allow_inf_nan=False)
    """The share of the cycle spent rising."""
    anneal_strategy: Literal["cos", "linear"] = "cos"
    """The shape of the rise and fall."""
    div_factor: PositiveFloat = 25.0
    """The first learning rate is ``max_lr / div_factor``."""
    final_div_factor: PositiveFloat = 10_000.0
    """The last learning rate is the first divided by this."""
    three_phase: Bool = False
    """A third phase down to the last learning rate (after the fall to the first)."""
    cycle_momentum: Bool = True
    """Cycle momentum (or Adam's beta1) inversely to the learning rate; the optimizer must have one."""
    base_momentum: NonNegativeFloat = 0.85
    """The lowest momentum, at the peak learning rate."""
    max_momentum: NonNegativeFloat = 0.95
    """The highest momentum, at the start and end."""


class FactorySchedule(_Schedule):
    """A scheduler made by ``module:function``, called as ``function(optimizer, **arguments)`` with
    the other keys of this mapping (and ``total_steps``, the run's optimizer steps, when the
    function takes that argument and it is not given)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, use_attribute_docstrings=True)

    name: str
    """``module:function``."""

    @field_validator("name")
    @classmethod
    def _factory_form(cls, value: str) -> str:
        return _check_factory(value)


def _schedule_tag(value: Any) -> str | None:
    """A scheduler's model: its ``name``, or ``factory`` for a ``module:function``."""
    name = value.get("name") if isinstance(value, dict) else getattr(value, "name", None)
    if isinstance(name, str) and ":" in name:
        return "factory"
    return name if isinstance(name, str) else None


SchedulerConfig = Annotated[
    Annotated[CosineSchedule, Tag("cosine")]
    | Annotated[StepSchedule, Tag("step")]
    | Annotated[ExponentialSchedule, Tag("exponential")]
    | Annotated[LinearWarmupSchedule, Tag("linear_warmup")]
    | Annotated[WarmupCosineSchedule, Tag("warmup_cosine")]
    | Annotated[OneCycleSchedule, Tag("onecycle")]
    | Annotated[FactorySchedule, Tag("factory")],
    Discriminator(_schedule_tag),
]
"""A learning-rate scheduler stepped once per optimizer step, chosen by ``name``; each takes only its
own arguments, checked here and nowhere else (a factory's, by the factory)."""
SCHEDULES: dict[str, type[_Schedule]] = {
    "cosine": CosineSchedule,
    "step": StepSchedule,
    "exponential": ExponentialSchedule,
    "linear_warmup": LinearWarmupSchedule,
    "warmup_cosine": WarmupCosineSchedule,
    "onecycle": OneCycleSchedule,
}
"""Each scheduler's model by name (error messages, and the environment's ``T_max`` spelling)."""


class FSDPMixedPrecisionConfig(_Section):
    """FSDP's mixed precision: the dtype parameters are gathered in for forward and backward, and the
    dtype gradients are reduced in; the sharded parameters and the optimizer stay float32."""

    param_dtype: Literal["bf16", "fp32"] = "bf16"
    """The unsharded parameters' dtype in forward and backward."""
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """The gradients' dtype in the reduce-scatter."""


class FSDPConfig(_Section):
    """``strategy: fsdp``: how the model is sharded with ``torch.distributed.fsdp.fully_shard`` (FSDP2)."""

    shard_modules: list[str] = Field(default_factory=list)
    """Class names (the class or one it derives from) of the modules sharded one by one, each its own
    all-gather and reduce-scatter, e.g. a transformer's block; the rest of the model is sharded as one
    group with the root. Each must name a module of the model."""
    reshard_after_forward: Bool = True
    """Free each sharded module's gathered parameters after its forward (gathered again for backward):
    less memory, one more all-gather per module and micro-batch."""
    mixed_precision: FSDPMixedPrecisionConfig | None = None
    """Parameters gathered in bf16 and gradients reduced in fp32 (null, the default: all fp32)."""

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _precision_mapping(cls, value: Any) -> Any:
        return _null_or_mapping(value, FSDPMixedPrecisionConfig, "{param_dtype: bf16, reduce_dtype: fp32}")


class DistributedConfig(_Section):
    """torch.distributed settings, used when the run is started by torchrun (``RANK``, ``WORLD_SIZE``)."""

    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """``auto``: nccl on CUDA, gloo on CPU."""
    timeout_seconds: Float = Field(default=300.0, gt=0, le=86_400, allow_inf_nan=False)
    """How long a collective waits for the other ranks before the run fails."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """``ddp``: every rank holds the whole model, gradients and optimizer state
    (``DistributedDataParallel``); ``fsdp``: each rank holds a shard of them (FSDP2, ``fsdp``)."""
    fsdp: FSDPConfig = Field(default_factory=FSDPConfig)
    """How ``strategy: fsdp`` shards the model."""


class GradScalerConfig(_Section):
    """The loss scale of ``precision: fp16``: it multiplies the loss before backward so that small
    float16 gradients do not underflow, and is divided out before the optimizer step."""

    init_scale: Float = Field(default=65536.0, gt=0, allow_inf_nan=False)
    """The first scale."""
    growth_factor: Float = Field(default=2.0, gt=1, allow_inf_nan=False)
    """The scale's factor after ``growth_interval`` steps without overflow."""
    backoff_factor: Float = Field(default=0.5, gt=0, lt=1, allow_inf_nan=False)
    """The scale's factor after a step skipped for overflow."""
    growth_interval: Int = Field(default=2000, ge=1)
    """Steps without overflow before the scale grows."""


class TrainerConfig(_Section):
    """The optimisation loop."""

    max_epochs: Int = Field(default=3, ge=1, le=1_000_000)
    """Number of passes over the training loader."""
    max_steps: Int | None = Field(default=None, ge=1, le=10**12)
    """End the run after this many optimizer steps, mid-epoch if need be (``run.end`` reason
    ``max_steps``), or at ``max_epochs`` if that comes first; null: no step limit."""
    accumulation_steps: Int = Field(default=3, ge=1, le=1_000_000)
    """Micro-batches per optimizer step (k); an epoch has ceil(B/k) optimizer steps."""
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    """Optimizer settings."""
    scheduler: SchedulerConfig | None = None
    """Learning-rate scheduler, or null for a constant rate."""
    grad_clip_norm: Float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """Clip the global gradient norm to this value (the norm is then reported)."""
    report_grad_norm: Bool = False
    """Report the gradient norm on ``train.step`` even without clipping."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """``bf16`` runs forward and loss under autocast (CPU or CUDA); gradients stay fp32. ``fp16``
    does so in float16 with a gradient scaler (``grad_scaler``); the logged losses never include
    its factor, and a step it skips for overflow is reported ``skipped``."""
    grad_scaler: GradScalerConfig = Field(default_factory=GradScalerConfig)
    """``torch.amp.GradScaler``'s settings, used with ``precision: fp16``."""
    compile: Bool = False
    """Run the model through ``torch.compile`` in training and evaluation; checkpoints hold the
    uncompiled module's keys."""
    compile_backend: str = Field(default="inductor", min_length=1)
    """``torch.compile``'s backend (``inductor`` needs a C++ compiler on CPU; ``aot_eager`` does not)."""
    compile_mode: (
        Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None
    ) = None
    """``torch.compile``'s mode; null: its default."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto`` picks CUDA when available (``cuda:LOCAL_RANK`` under torchrun)."""
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    """Process group settings under torchrun; ignored in a single process."""
    on_nonfinite: Literal["warn", "stop", "skip_step"] = "warn"
    """A NaN or infinite loss: ``warn`` reports it (records carry ``nonfinite``) and trains on;
    ``stop`` ends the run as failed, naming the step, when that step's records are delivered;
    ``skip_step`` does not take that window's optimizer step (one host sync per step)."""


class EvalConfig(_Section):
    """When the task's validation loaders are evaluated (each gives one ``eval.epoch`` record)."""

    every_epochs: Int | None = Field(default=1, ge=1, le=1_000_000)
    """At the end of every N-th epoch (null: not at epochs' ends)."""
    every_steps: Int | None = Field(default=None, ge=1, le=1_000_000_000)
    """After every N-th optimizer step, mid-epoch too (null: not by steps); a step that is also its
    epoch's last evaluates once, after the epoch's record."""


class TelemetryConfig(_Section):
    """How often records are produced."""

    every: Int = Field(default=10, ge=1, le=1_000_000)
    """Emit ``train.batch`` and ``train.step`` records for every Nth optimizer step;
    epoch, eval and run records are always emitted."""
    ranks: Literal["zero", "all"] = "zero"
    """Under torchrun: ``zero`` writes JSON lines on stdout from rank 0 only (every rank's warnings
    and errors still go to stderr), ``all`` from every rank."""
    max_delay_seconds: Float = Field(default=0.05, ge=0, le=60, allow_inf_nan=False)
    """Emitted steps are delivered to the sinks in batches, at most this long after the previous
    delivery (or when the next step ends, if steps are slower), and always before the epoch
    record and run.end; 0 delivers every emitted step at once."""


class JsonSinkConfig(_Section):
    """structlog JSON lines on stdout."""

    enabled: Bool = True
    """Write JSON lines on stdout."""
    format: Literal["auto", "json", "console"] = "auto"
    """``auto``: JSON lines, or, when stdout is a terminal, a console view (epoch, eval and run
    lines, warnings) with a progress bar showing the running step loss."""
    profile: Literal["default", "ecs"] = "default"
    """``ecs``: ``@timestamp``, ``log.level``, ``message``, ``ecs.version`` (Elastic Common Schema)."""
    queue_capacity: Int = Field(default=10_000, ge=1, le=10_000_000)
    """Lines waiting for a slow stdout reader before ``train.batch`` records are dropped (and counted)."""
    queue_bytes: Int = Field(default=16 * 1024 * 1024, ge=64 * 1024, le=1024 * 1024 * 1024)
    """Bytes of lines waiting for stdout: past half of it ``train.batch`` lines are dropped, past all
    of it ``train.step`` lines too (counted); epoch, eval, run and log lines are always kept."""
    close_timeout_seconds: Float = Field(default=5.0, ge=0, le=3600, allow_inf_nan=False)
    """How long the end of the run waits for stdout to take the queued lines."""


class DiagnosticSinkConfig(_Section):
    """``<run dir>/diagnostic.jsonl`` with self-checks."""

    enabled: Bool = True
    """Write the diagnostic file."""
    filename: str = Field(default="diagnostic.jsonl", pattern=r"^[^/\\]+$")
    """File name inside the run directory."""
    max_bytes: Int = Field(default=256 * 1024 * 1024, ge=0)
    """Rotate past this size to ``<filename>.1`` ... (0: never rotate)."""
    backups: Int = Field(default=3, ge=0, le=1000)
    """Rotated files kept; the oldest beyond this is deleted."""


class PushgatewayConfig(_Section):
    """Where and how the run's final values are pushed."""

    url: str | None = None
    """Pushgateway address, e.g. ``http://pushgateway:9091``; null disables the push."""
    job: str = Field(default="traintel", min_length=1)
    """The ``job`` grouping label; ``run_id`` is the other grouping label."""
    username: str | None = None
    """Basic-auth user name (with ``password``)."""
    password: Annotated[SecretStr, BeforeValidator(_number_as_text)] | None = None
    """Basic-auth password: a ``SecretStr`` (its repr hides it); redacted in ``config show`` and
    ``run.start``."""
    timeout_seconds: Float = Field(default=5.0, gt=0, le=300, allow_inf_nan=False)
    """Wall-clock limit for the whole push (connect, send, answer); past it the push is abandoned
    and reported, so a slow gateway never holds the shutdown."""

    @field_validator("url")
    @classmethod
    def _url_form(cls, value: str | None) -> str | None:
        return None if value is None else _check_url(value)

    @field_serializer("password", when_used="json")
    def _password_text(self, value: SecretStr | None) -> str | None:
        """The password itself in plain data (``Config.to_dict``), which ``redact`` masks by its key."""
        return None if value is None else value.get_secret_value()


def _check_url(value: str) -> str:
    """An ``http(s)://[user:password@]host[:port][/path]`` URL; a message shows it with its credentials
    hidden whatever its shape (``redact_url_value``), and quotes no part of them."""
    shown = redact_url_value(value)
    try:
        parts = urlsplit(value)
        hostname = parts.hostname
    except ValueError as exc:
        why = str(exc)
        if "netloc" in why:  # urllib's NFKC check quotes the whole netloc, credentials and all
            why = "characters that NFKC normalization turns into '/', '?', '#', '@' or ':'"
        raise ValueError(f"is not a valid URL ({why}), got {shown!r}") from None
    if parts.scheme not in ("http", "https") or not hostname or re.search(r"\s", value):
        msg = f"must be an http:// or https:// URL such as 'http://pushgateway:9091', got {shown!r}"
        raise ValueError(msg)
    if "@" in parts.path + parts.query + parts.fragment:  # credentials cut short: the host is in them
        msg = (
            "has an '@' after its host: percent-encode '/', '?' and '#' in a user name or password "
            f"(%2F, %3F, %23), got {shown!r}"
        )
        raise ValueError(msg)
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        port_text = parts.netloc.rpartition("@")[2].rpartition(":")[2]
        raise ValueError(f"port {port_text!r} is not a number from 1 to 65535, got {shown!r}")
    return value


URL_KEYS = ("sinks.prometheus.pushgateway.url",)
"""The settings that hold one URL: shown with ``redact_url_value`` (config, errors), which hides
credentials of any shape, where other strings go through ``redact_url``."""


class PrometheusSinkConfig(_Section):
    """HTTP ``/metrics`` exporter on its own registry."""

    enabled: Bool = True
    """Serve ``/metrics``."""
    host: str = Field(default="127.0.0.1", min_length=1)
    """Bind address; ``0.0.0.0`` exposes it beyond the host (containers)."""
    port: Int = Field(default=9400, ge=0, le=65535)
    """TCP port; 0 picks a free one (reported in ``run.start``)."""
    linger_seconds: Float = Field(default=0.0, ge=0, le=86_400, allow_inf_nan=False)
    """Keep serving the final values this long after the run ends."""
    certfile: str | None = None
    """Serve ``/metrics`` over TLS with this certificate (PEM) and ``keyfile``."""
    keyfile: str | None = None
    """The certificate's private key (PEM), with ``certfile``."""
    client_cafile: str | None = None
    """Require client certificates signed by this CA (mutual TLS)."""
    max_connections: Int = Field(default=32, ge=1, le=1024)
    """Connections served at once; one more closes the connection that has waited longest
    without sending a request (counted in ``traintel_exporter_connections_closed_total``)."""
    request_timeout_seconds: Float = Field(default=5.0, gt=0, le=300, allow_inf_nan=False)
    """A connection's time to finish the TLS handshake, send its request and take the answer."""
    pushgateway: PushgatewayConfig = Field(default_factory=PushgatewayConfig)
    """Push the final values to a Pushgateway at run end (batch jobs)."""
    per_rank: Bool = False
    """Under torchrun, every rank serves its own values on ``port + LOCAL_RANK`` (0: any free
    port), each family labelled ``rank``, and pushes them grouped by ``rank`` too; off, rank 0
    alone serves (no ``rank`` label) the values its records hold, global ones for steps and epochs."""

    @model_validator(mode="after")
    def _tls_pair(self) -> PrometheusSinkConfig:
        if (self.certfile is None) != (self.keyfile is None):
            msg = "certfile and keyfile go together: give both or neither"
            raise ValueError(msg)
        if self.client_cafile is not None and self.certfile is None:
            msg = "client_cafile needs certfile and keyfile (client certificates need TLS)"
            raise ValueError(msg)
        return self


class ExtraSinkConfig(_Section):
    """A plugin sink: an installed ``traintel.sinks`` entry point, or a ``module:function``."""

    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]+$")
    """Entry-point name in the ``traintel.sinks`` group (``traintel sinks list`` shows them)."""
    factory: str | None = None
    """``module:function`` (or class) that returns the sink."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the factory."""
    enabled: Bool = True
    """Build and open this sink; false keeps the entry but leaves the sink out."""
    ranks: Literal["zero", "all"] = "zero"
    """Under torchrun, ``zero``: only rank 0 builds it, and it receives the job's global records once;
    ``all``: every rank builds its own, opened with its rank (a file sink then names its file by it)."""
    threaded: Bool | None = None
    """``true``: deliver to this sink on a thread of its own through a bounded queue, so a slow back-end
    never holds training (records it cannot keep up with are dropped and counted); null: as the sink
    says (its ``threaded`` attribute), else on the training thread."""

    @field_validator("factory")
    @classmethod
    def _factory_form(cls, value: str | None) -> str | None:
        return None if value is None else _check_factory(value)

    @model_validator(mode="after")
    def _one_source(self) -> ExtraSinkConfig:
        if (self.name is None) == (self.factory is None):
            msg = "give exactly one of name (an installed entry point) or factory (module:function)"
            raise ValueError(msg)
        return self


_BEST_METRIC = re.compile(r"eval\.[A-Za-z_][A-Za-z0-9_]{0,63}")
"""``eval.loss`` or ``eval.<metric>``: the names ``traintel.score`` takes."""


class BestCheckpointConfig(_Section):
    """Keep the checkpoint of the best evaluation so far in ``checkpoints/best/``: written after each
    evaluation of ``split`` strictly better than every earlier one (a NaN never is), never pruned by
    ``keep``, never resumed from; a resumed run goes on comparing with the best it holds."""

    metric: str
    """``eval.loss`` or ``eval.<name>`` of a metric in the task's ``metrics``."""
    mode: Literal["min", "max"] | None = None
    """``min``: lower is better, ``max``: higher is; null: ``min`` for ``eval.loss``, ``max`` for a metric."""
    split: str = Field(default="val", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    """The validation split whose evaluations count (``val`` is the task's ``val_loader``)."""

    @field_validator("metric")
    @classmethod
    def _metric_name(cls, value: str) -> str:
        if not _BEST_METRIC.fullmatch(value):
            msg = f"must be 'eval.loss' or 'eval.<name>' of a metric in the task's metrics, got {value!r}"
            raise ValueError(msg)
        return value

    @model_validator(mode="before")
    @classmethod
    def _default_mode(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("mode") is None and isinstance(data.get("metric"), str):
            return {**data, "mode": "min" if data["metric"] == "eval.loss" else "max"}
        return data

    @property
    def chosen_mode(self) -> Literal["min", "max"]:
        """``mode``, or its default for ``metric`` where it was set to null afterwards."""
        if self.mode is not None:
            return self.mode
        return "min" if self.metric == "eval.loss" else "max"


class CheckpointConfig(_Section):
    """Crash-safe checkpoints in ``<run dir>/checkpoints/``, taken after an optimizer step."""

    every_steps: Int | None = Field(default=None, ge=1, le=1_000_000_000)
    """Take one every N optimizer steps (null: not by steps)."""
    every_epochs: Int | None = Field(default=None, ge=1, le=1_000_000)
    """Take one at the end of every N-th epoch (null: not by epochs)."""
    keep: Int = Field(default=2, ge=1, le=1000)
    """Complete checkpoints kept (the newest); an older one goes only once a newer one is durable."""
    on_signal: Bool = True
    """On SIGTERM or SIGINT, take one after the step that finishes (when checkpoints are on)."""
    async_: Bool = Field(default=False, alias="async")
    """Under torchrun, write the model and optimizer shards in the background
    (``torch.distributed.checkpoint.async_save``) while training goes on; a checkpoint counts once
    every rank has written its part, and the next one waits for it."""
    best: BestCheckpointConfig | None = None
    """The best evaluation's checkpoint, kept apart from the periodic ones, which need not be on (null,
    the default: none); a run with only this one cannot be resumed."""

    @field_validator("best", mode="before")
    @classmethod
    def _best_mapping(cls, value: Any) -> Any:
        return _null_or_mapping(value, BestCheckpointConfig, "{metric: eval.loss}")

    model_config = _ALIASED

    @property
    def enabled(self) -> bool:
        """Whether periodic checkpoints are on (``every_steps`` or ``every_epochs``): those a run
        resumes from. ``best`` alone does not turn them on: such a run cannot be resumed."""
        return self.every_steps is not None or self.every_epochs is not None


class SinksConfig(_Section):
    """Where records go."""

    json_: JsonSinkConfig = Field(default_factory=JsonSinkConfig, alias="json")
    diagnostic: DiagnosticSinkConfig = Field(default_factory=DiagnosticSinkConfig)
    prometheus: PrometheusSinkConfig = Field(default_factory=PrometheusSinkConfig)
    extra: list[ExtraSinkConfig] = Field(default_factory=list)
    """Plugin sinks, after the built-in ones, in this order."""

    model_config = _ALIASED


class Config(_Section):
    """The whole run configuration."""

    run: RunConfig = Field(default_factory=RunConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    sinks: SinksConfig = Field(default_factory=SinksConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

    def to_dict(self, *, redact: bool = False) -> dict[str, Any]:
        """Plain, YAML-ready data; ``redact`` masks the values of keys that name a secret and the
        credentials of URLs in every string (``traintel.redaction``), those of ``URL_KEYS`` whatever
        characters they hold."""
        data = self.model_dump(mode="json", by_alias=True)
        if not redact:
            return data
        shown: dict[str, Any] = redaction.redact(data)
        for key in URL_KEYS:
            *sections, name = key.split(".")
            raw, section = data, shown
            for part in sections:
                raw, section = raw[part], section[part]
            if isinstance(raw[name], str):
                section[name] = redact_url_value(raw[name])
        return shown
