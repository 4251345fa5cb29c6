"""``traintel report RUN_DIR``: plot a run's diagnostic file and print a short summary.

Input: the diagnostic file ``RUN_DIR/<filename>`` and its rotated parts ``<filename>.1``,
``<filename>.2``, ... (a higher number is older), read oldest first. ``<filename>`` is
``sinks.diagnostic.filename`` of ``RUN_DIR/config.yaml`` (the resolved config the run
wrote), or ``diagnostic.jsonl`` when there is no config.yaml or it has no such key (a
null section counts as absent). Only names ending in a canonical decimal number count as
parts (``<filename>.01`` and ``<filename>.bak`` are ignored); a gap in the numbering is
tolerated. That is rank 0's stream; under torchrun each rank r > 0 writes its own,
``traintel.records.rank_filename(<filename>, r)`` (``diagnostic.rank1.jsonl``, with parts
``diagnostic.rank1.jsonl.1``, ...), and every rank stream in RUN_DIR is read too, by
increasing rank, each oldest part first (only a canonical decimal r > 0 counts:
``diagnostic.rank01.jsonl`` is ignored). Rank 0's stream must exist; a missing rank r > 0 is
no error (the summary names the ranks read and those missing). The last line of each
stream's newest part may be incomplete (a run killed with ``kill -9`` can leave half a
line): when it does not parse it is skipped and counted as truncated. Any other line that
is not a JSON object with an ``event`` string, or a record whose plotted fields have the
wrong type, is bad input. A non-finite value is ``null`` in the file, named in the line's
``nonfinite`` object; it is read back as nan/inf/-inf.

Metrics: the ``metrics`` object of ``eval.epoch`` (the task's evaluation metrics), of
``train.step`` (its training metrics) and of ``metric`` records (values logged with
``Run.log``), name -> number or null; an absent ``metrics`` is ``{}`` (older lines). A null
value is read back as the nan/inf/-inf that ``nonfinite`` names under the dotted key
(``{"metrics.accuracy": "inf"}``), as nan when it names none. ``metrics`` that is not an
object, a name that is not ``[A-Za-z_][A-Za-z0-9_]{0,63}`` or a value that is neither a number
nor null (a boolean is no number) is bad input, as is a ``split`` that is not a split name
(``[A-Za-z0-9_.-]{1,64}``, as the writer allows; an absent one is ``val``).

What is read from where: ``train.batch`` records (the losses, the scale checks),
``sink.error`` records and ``dropped`` counts come from every rank (each process has its
own micro-batches and its own sinks); ``train.step``, ``train.epoch``, ``eval.epoch``,
``metric``, ``run.start`` and ``run.end`` hold the job's global values and are read from rank 0's
stream only (a rank r > 0 stream's other records are counted in ``R`` but not otherwise read, nor
their fields checked). ``metric`` records are read from rank 0 only although every rank may
write its own: rank 0's stand for the job, as its other records do, and a value that each rank
logs alike is plotted once, not ``W`` times. The run id is that of rank 0's first record.

Output: a PNG of exactly ``FIGURE_SIZE_PX`` pixels (1000 x 800), ``RUN_DIR/report.png``
unless ``--output`` says otherwise, written atomically with
``traintel.sinks.io.atomic.write_atomic`` (a temporary file in the same directory, fsynced, then
renamed; an existing report is replaced). The output is only ever a regular file: a new
name, or an existing regular file that is not one of the files the report reads (its
diagnostic parts, ``config.yaml``). A directory, a symbolic link (even to a regular file: it
is neither followed nor replaced), a character or block device (``/dev/null``), a FIFO or a
socket is refused before anything is drawn or written, and looked for again right before the
rename (``write_atomic(..., overwrite="regular")``). Two panels, three when the run has a
metric value, share the optimizer-step x axis:

1. losses: ``train.batch`` ``loss`` (the value given to backward) and ``raw_loss`` at
   ``step + 1`` (the step the micro-batch's gradient goes into), ``train.step`` ``loss``
   at ``step``, ``train.epoch`` and ``eval.epoch`` ``loss`` at their ``step`` (one line per
   ``split``: ``eval loss`` for ``val``, ``eval loss (<split>)`` for another); a
   ``train.batch`` whose ``scale_ok`` is false is marked with a large red x. The batch
   points of every rank are plotted alike (a rank's micro-batches go into the same
   optimizer step as rank 0's). The y axis is logarithmic when every plotted loss is
   positive, linear otherwise.
2. learning rate: ``train.step`` ``lr`` at ``step``.
3. metrics, only when there is a metric value (otherwise the figure is the two panels above):
   one line per series, ``eval.<name>`` (``eval.<split>.<name>`` for a split other than
   ``val``) at the ``eval.epoch``'s ``step``, ``train.<name>`` at the ``train.step``'s ``step``,
   ``user.<name>`` at the ``metric`` record's ``step``. Metrics of very different scales share
   the panel (accuracy and perplexity): its y axis is logarithmic when every finite value is
   positive and the largest is at least ``METRICS_LOG_RATIO`` times the smallest, linear
   otherwise, so a panel of metrics of one scale keeps its linear detail. The summary's
   ``metrics:`` line gives each series' last value exactly.

Gray vertical lines mark the ends of epochs. The figure is drawn with matplotlib's Agg
canvas directly (no pyplot, no global backend switch); matplotlib is imported only when
drawing, and this module never imports torch.

Summary on stdout, after the PNG is written, one ``name: value`` line each, always in
this order::

    run: <run_id of the first record, or n/a>
    status: <run.end status> (<run.end reason>)   or   status: unfinished (no run.end record)
    epochs: <E>  steps: <S>  items: <N>
    final: step loss <L>  epoch loss <L>  eval loss <L>
    metrics: <series>=<V>  <series>=<V> ...   (only when the run has a metric value)
    scale check: <F> failed  <U> unchecked  <B> batch records
    records: <R>  files: <P>
    ranks: <n> of <W> (<ranks read>[; missing <ranks missing>])
    sink errors: <K>
    dropped records: <D>
    truncated lines: <T>
    report: <path of the PNG>

``E``, ``S``, ``N`` are the ``epoch``, ``step`` and ``items_total`` of ``run.end``; without one,
the largest seen (``epoch`` of any record, ``step`` of train.step/train.epoch/eval.epoch,
``items_total`` of train.step/train.epoch). Each final loss is the ``loss`` of the last record
of that event, formatted with ``format(value, ".6g")`` (``nan``/``inf`` for non-finite values).
The ``metrics:`` line holds the last value ``V`` of every metric series (named as in the metrics
panel, sorted by name), formatted alike. ``F`` counts ``train.batch`` records whose ``scale_ok``
is false, ``U`` those where it is null or absent, ``B`` all of them (every rank's). ``R`` is the
number of records read from ``P`` files (every rank's), ``n`` the number of ranks whose stream
was read, ``W`` the job's size (the largest ``world_size`` of any record; 1 when no record
carries one, as in files of schema 1.0.0), the ranks read and those below ``W`` not found as
comma-separated lists, three or more consecutive ranks as first-last (``ranks: 2 of 3 (0, 2;
missing 1)``, ``ranks: 62 of 64 (0-5, 7-62; missing 6, 63)``), ``K`` the number of
``sink.error`` records, ``D`` the sum of the ``dropped`` counts carried by the lines (a sink
that drops ``train.batch`` records under back-pressure puts the number dropped since its
previous line on the next line it writes) and ``T`` the truncated lines skipped (at most one per
rank). A value not known is ``n/a``.

Errors (exit status 2 through ``ConfigError``, the key being the path at fault, nothing
written): ``RUN_DIR: no such directory``, ``RUN_DIR: not a directory``,
``RUN_DIR/config.yaml: cannot read: <reason>``, ``RUN_DIR/config.yaml: is not valid YAML
at line <n> (read for sinks.diagnostic.filename)`` (or ``is not UTF-8 text (...)``),
``RUN_DIR/config.yaml: [<section> ]is a <type>, not a mapping (read for
sinks.diagnostic.filename)``, ``RUN_DIR/config.yaml: sinks.diagnostic.filename must be a
file name (a non-empty string without / or \\), got <value>``, ``RUN_DIR/<filename>: no
such file`` (rank 0's), ``<part>: cannot read: <reason>``, ``<rank 0's newest part>: no
records``, ``<part>: line <n> is not valid JSON``, ``<part>: line <n> is not a record (a
JSON object with an "event" string)``, ``<part>: line <n>: <event> field "<name>" is not a
number`` (or ``... is not an integer``, ``... is not an object``; ``"metrics.<metric>"`` for a
metric's value), ``<part>: line <n>: <event> field "metrics" has a name that is not a metric
name ([A-Za-z_][A-Za-z0-9_]{0,63}): <name as JSON>``, ``<part>: line <n>: eval.epoch field
"split" is not a split name ([A-Za-z0-9_.-]{1,64}): <split as JSON>``, ``<output>: is a
directory``, ``<output>: is a symbolic link (not
followed); the report is written only as a new file or over a regular file`` (likewise ``is a
character device``, ``is a block device``, ``is a FIFO``, ``is a socket``), ``<output>: is a
file the report reads; choose another --output``, ``<output>: its directory does not exist``,
``<output>: cannot write: <reason>``.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import stat
import sys
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from traintel.errors import EXIT_OK, ConfigError
from traintel.run.layout import (
    CONFIG_FILENAME,
    DIAGNOSTIC_FILENAME,
    REPORT_FILENAME,
    rank_filename,
    rotated_parts,
    stream_ranks,
)
from traintel.sinks.io.atomic import NotRegularFile, file_kind, write_atomic

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FILENAME_KEY = ("sinks", "diagnostic", "filename")
"""Where ``CONFIG_FILENAME`` names the diagnostic file."""
FIGURE_SIZE_INCHES = (10.0, 8.0)
FIGURE_DPI = 100
FIGURE_SIZE_PX = (1000, 800)
"""(width, height) of the PNG: ``FIGURE_SIZE_INCHES`` at ``FIGURE_DPI``."""

LABEL_BATCH_LOSS = "batch loss (given to backward)"
LABEL_RAW_LOSS = "batch raw loss"
LABEL_STEP_LOSS = "step loss"
LABEL_EPOCH_LOSS = "epoch loss"
LABEL_EVAL_LOSS = "eval loss"
LABEL_SCALE_FAILED = "scale check failed"
LABEL_LR = "learning rate"
METRICS_LOG_RATIO = 1000.0
"""The metrics panel's y axis is logarithmic when every finite value is positive and the largest is
at least this many times the smallest (three decades: accuracy beside perplexity)."""

_METRIC_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
"""A metric's name, as the writer allows it."""
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
"""A split's name, as the writer allows it (no ``$``: a label is never read as mathtext)."""

_BAD_RECORD = 'is not a record (a JSON object with an "event" string)'
_READ_FOR = f"(read for {'.'.join(FILENAME_KEY)})"


@dataclass
class Series:
    """Points of one plotted curve: x is the optimizer step, y the value (nan when not finite)."""

    x: array[int] = field(default_factory=lambda: array("q"))
    y: array[float] = field(default_factory=lambda: array("d"))

    def add(self, x: int, y: float) -> None:
        self.x.append(x)
        self.y.append(y)

    def __len__(self) -> int:
        return len(self.x)


@dataclass
class RunData:
    """What the report needs from a diagnostic file, gathered in one pass (no record kept whole)."""

    parts: list[Path] = field(default_factory=list)
    """The files read: rank 0's oldest first, then each other rank's by increasing rank."""
    ranks: list[int] = field(default_factory=list)
    """The ranks whose stream was read, increasing (rank 0 first)."""
    world_size: int = 1
    """The largest ``world_size`` of any record read (1 when none carries one)."""
    records: int = 0
    truncated: int = 0
    run_id: str | None = None
    status: str | None = None
    reason: str | None = None
    end_epoch: int | None = None
    end_step: int | None = None
    end_items: int | None = None
    max_epoch: int | None = None
    max_step: int | None = None
    max_items: int | None = None
    batch_loss: Series = field(default_factory=Series)
    batch_raw_loss: Series = field(default_factory=Series)
    scale_failed: Series = field(default_factory=Series)
    """``train.batch`` records whose ``scale_ok`` is false, at (step + 1, loss)."""
    scale_unchecked: int = 0
    step_loss: Series = field(default_factory=Series)
    lr: Series = field(default_factory=Series)
    epoch_loss: Series = field(default_factory=Series)
    eval_loss: Series = field(default_factory=Series)
    """Every ``eval.epoch``'s loss in file order, whatever its split (the summary's final eval loss)."""
    split_loss: dict[str, Series] = field(default_factory=dict)
    """``eval.epoch`` losses by split, as plotted."""
    metrics: dict[str, Series] = field(default_factory=dict)
    """Metric values by series name (``eval.<name>``, ``eval.<split>.<name>``, ``train.<name>``,
    ``user.<name>``); a series exists only once it has a value."""
    sink_errors: int = 0
    dropped: int = 0

    @property
    def batch_records(self) -> int:
        return len(self.batch_loss)

    @property
    def missing_ranks(self) -> list[tuple[int, int]]:
        """Ranks below ``world_size`` whose stream was not found, as (first, last) spans."""
        spans: list[tuple[int, int]] = []
        after = 0
        for rank in (*sorted(self.ranks), self.world_size):
            if rank > after:
                spans.append((after, min(rank, self.world_size) - 1))
            after = max(after, rank + 1)
            if after >= self.world_size:
                break
        return spans

    @property
    def epoch(self) -> int | None:
        return self.end_epoch if self.status is not None else self.max_epoch

    @property
    def step(self) -> int | None:
        return self.end_step if self.status is not None else self.max_step

    @property
    def items(self) -> int | None:
        return self.end_items if self.status is not None else self.max_items


# --------------------------------------------------------------------------- reading


def diagnostic_filename(run_dir: Path) -> str:
    """``sinks.diagnostic.filename`` from ``run_dir/config.yaml``; ``DIAGNOSTIC_FILENAME`` when the
    file or the key is absent. ConfigError when the file cannot be read, is not valid YAML, or
    holds something other than a file name there."""
    path = run_dir / CONFIG_FILENAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return DIAGNOSTIC_FILENAME
    except UnicodeDecodeError:
        raise ConfigError(str(path), f"is not UTF-8 text {_READ_FOR}") from None
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror or exc}") from None

    import yaml  # only when there is a config to read

    try:
        node: object = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(str(path), f"is not valid YAML{where} {_READ_FOR}") from None
    key: list[str] = []
    for name in FILENAME_KEY:
        if node is None:
            return DIAGNOSTIC_FILENAME
        if not isinstance(node, dict):
            what = f"{'.'.join(key)} is" if key else "is"
            raise ConfigError(str(path), f"{what} a {_type_name(node)}, not a mapping {_READ_FOR}")
        if name not in node:
            return DIAGNOSTIC_FILENAME
        node = node[name]
        key.append(name)
    if not isinstance(node, str) or not node or "/" in node or "\\" in node:
        raise ConfigError(
            str(path),
            f"{'.'.join(FILENAME_KEY)} must be a file name (a non-empty string without / or \\), "
            f"got {json.dumps(node, default=str)}",  # as JSON: null, 3, "a/b"
        )
    return node


def _type_name(value: object) -> str:
    names = {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}
    return names.get(type(value), type(value).__name__)


def list_names(run_dir: Path) -> frozenset[str]:
    """The names of the entries of ``run_dir``, read once; ConfigError when it is not a directory."""
    if not run_dir.exists():
        raise ConfigError(str(run_dir), "no such directory")
    if not run_dir.is_dir():
        raise ConfigError(str(run_dir), "not a directory")
    try:
        return frozenset(entry.name for entry in run_dir.iterdir())
    except OSError as exc:
        raise ConfigError(str(run_dir), f"cannot read: {exc.strerror}") from None


def diagnostic_streams(run_dir: Path) -> dict[int, list[Path]]:
    """Each rank's diagnostic file and rotated parts, oldest first, by increasing rank (rank 0 is
    the file ``sinks.diagnostic.filename`` names); ConfigError when rank 0's has none."""
    names = list_names(run_dir)
    filename = diagnostic_filename(run_dir)
    streams = {0: rotated_parts(run_dir, filename, names)}
    if not streams[0]:
        raise ConfigError(str(run_dir / filename), "no such file")
    for rank in stream_ranks(filename, names):
        parts = rotated_parts(run_dir, rank_filename(filename, rank), names)
        if parts:  # a non-canonical part name alone (diag.rank1.jsonl.01) is no stream
            streams[rank] = parts
    return streams


def load_run(run_dir: str | os.PathLike[str]) -> RunData:
    """Read every rank's diagnostic stream, rank 0 first, each oldest part first; ConfigError on
    bad input or when rank 0's stream holds no record."""
    data = RunData()
    for rank, parts in diagnostic_streams(Path(run_dir)).items():
        data.ranks.append(rank)
        data.parts.extend(parts)
        for i, part in enumerate(parts):
            _read_part(part, data, newest=i == len(parts) - 1, primary=rank == 0)
        if rank == 0 and data.records == 0:
            raise ConfigError(str(parts[-1]), "no records")
    return data


def _read_part(path: Path, data: RunData, *, newest: bool, primary: bool) -> None:
    try:
        with path.open("rb") as f:
            pending: ConfigError | None = None
            for lineno, line in enumerate(f, 1):
                if pending is not None:
                    raise pending
                try:
                    obj = json.loads(line)
                except ValueError:  # includes UnicodeDecodeError
                    pending = ConfigError(str(path), f"line {lineno} is not valid JSON")
                    continue
                if not isinstance(obj, dict) or not isinstance(obj.get("event"), str):
                    raise ConfigError(str(path), f"line {lineno} {_BAD_RECORD}")
                try:
                    _add(data, obj, primary=primary)
                except _FieldError as exc:
                    raise ConfigError(str(path), f"line {lineno}: {exc}") from None
            if pending is not None:
                if not newest:
                    raise pending
                data.truncated += 1
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror or exc}") from None


class _FieldError(Exception):
    pass


def _nonfinite(obj: Mapping[str, Any], key: str) -> float | None:
    """The nan/inf/-inf that the line's ``nonfinite`` names for ``key`` (a dotted key inside an
    object: ``metrics.accuracy``); None when it names none."""
    nonfinite = obj.get("nonfinite")
    name = nonfinite.get(key) if isinstance(nonfinite, dict) else None
    return float(name) if name in ("nan", "inf", "-inf") else None


def _float(value: object) -> float | None:
    """A JSON number as a float (an integer too large for one is +-inf, as ``1e400`` reads); None
    for anything else, a boolean included."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _not_a_number(obj: Mapping[str, Any], key: str) -> _FieldError:
    return _FieldError(f'{obj["event"]} field "{key}" is not a number')


def _number(obj: Mapping[str, Any], key: str) -> float:
    value = obj.get(key)
    number = _nonfinite(obj, key) if value is None else _float(value)
    if number is None:
        raise _not_a_number(obj, key)
    return number


def _integer(obj: Mapping[str, Any], key: str) -> int:
    value = obj.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    msg = f'{obj["event"]} field "{key}" is not an integer'
    raise _FieldError(msg)


def _split(obj: Mapping[str, Any]) -> str:
    """``eval.epoch``'s ``split``; ``val`` when absent (lines older than schema 1.3.0)."""
    split = obj.get("split", "val")
    if isinstance(split, str) and _SPLIT_NAME.fullmatch(split):
        return split
    msg = f'{obj["event"]} field "split" is not a split name ({_SPLIT_NAME.pattern}): {json.dumps(split)}'
    raise _FieldError(msg)


def _add_metrics(data: RunData, obj: Mapping[str, Any], prefix: str, step: int) -> None:
    """The line's ``metrics`` (``{}`` when absent: older lines) at ``step``, each as series
    ``<prefix><name>``; a null is the value ``nonfinite`` names, nan when it names none."""
    metrics = obj.get("metrics", {})
    if not isinstance(metrics, dict):
        msg = f'{obj["event"]} field "metrics" is not an object'
        raise _FieldError(msg)
    for name, value in metrics.items():
        if not _METRIC_NAME.fullmatch(name):
            msg = (
                f'{obj["event"]} field "metrics" has a name that is not a metric name'
                f" ({_METRIC_NAME.pattern}): {json.dumps(name)}"
            )
            raise _FieldError(msg)
        key = f"metrics.{name}"
        if value is None:
            number = _nonfinite(obj, key)
            number = math.nan if number is None else number
        else:
            number = _float(value)
            if number is None:
                raise _not_a_number(obj, key)
        _series(data.metrics, prefix + name).add(step, number)


def _series(by_name: dict[str, Series], name: str) -> Series:
    series = by_name.get(name)
    if series is None:
        series = by_name[name] = Series()
    return series


def _max(current: int | None, value: int) -> int:
    return value if current is None or value > current else current


def _add(data: RunData, obj: Mapping[str, Any], *, primary: bool) -> None:  # noqa: PLR0912 - one branch per event
    """Count one record; ``primary``: it is from rank 0's stream (the only one global events are
    read from)."""
    event = obj["event"]
    data.records += 1
    dropped = obj.get("dropped")
    if isinstance(dropped, int) and not isinstance(dropped, bool):
        data.dropped += dropped
    world_size = obj.get("world_size")
    if isinstance(world_size, int) and not isinstance(world_size, bool):
        data.world_size = max(data.world_size, world_size)
    if event == "sink.error":
        data.sink_errors += 1
    if not primary:
        if event == "train.batch":
            _integer(obj, "epoch")
            _add_batch(data, obj)
        return
    if data.run_id is None and isinstance(obj.get("run_id"), str):
        data.run_id = obj["run_id"]
    if event in ("train.batch", "train.step", "train.epoch", "eval.epoch", "run.end"):
        data.max_epoch = _max(data.max_epoch, _integer(obj, "epoch"))
    if event == "train.batch":
        _add_batch(data, obj)
    elif event == "train.step":
        step = _integer(obj, "step")
        data.max_step = _max(data.max_step, step)
        data.max_items = _max(data.max_items, _integer(obj, "items_total"))
        data.step_loss.add(step, _number(obj, "loss"))
        data.lr.add(step, _number(obj, "lr"))
        _add_metrics(data, obj, "train.", step)
    elif event in ("train.epoch", "eval.epoch"):
        step = _integer(obj, "step")
        data.max_step = _max(data.max_step, step)
        if event == "train.epoch":
            data.max_items = _max(data.max_items, _integer(obj, "items_total"))
            data.epoch_loss.add(step, _number(obj, "loss"))
        else:
            loss, split = _number(obj, "loss"), _split(obj)
            data.eval_loss.add(step, loss)
            _series(data.split_loss, split).add(step, loss)
            _add_metrics(data, obj, "eval." if split == "val" else f"eval.{split}.", step)
    elif event == "metric":
        _add_metrics(data, obj, "user.", _integer(obj, "step"))
    elif event == "run.end":
        status, reason = obj.get("status"), obj.get("reason")
        if not isinstance(status, str) or not isinstance(reason, str):
            msg = 'run.end fields "status" and "reason" must be strings'
            raise _FieldError(msg)
        data.status, data.reason = status, reason
        data.end_epoch = _integer(obj, "epoch")
        data.end_step = _integer(obj, "step")
        data.end_items = _integer(obj, "items_total")


def _add_batch(data: RunData, obj: Mapping[str, Any]) -> None:
    x = _integer(obj, "step") + 1
    loss = _number(obj, "loss")
    data.batch_loss.add(x, loss)
    data.batch_raw_loss.add(x, _number(obj, "raw_loss"))
    scale_ok = obj.get("scale_ok")
    if scale_ok is False:
        data.scale_failed.add(x, loss)
    elif scale_ok is not True:
        data.scale_unchecked += 1


# --------------------------------------------------------------------------- summary


def _fmt(value: float | int | None) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return format(value, ".6g")


def _last(series: Series) -> float | None:
    return series.y[-1] if len(series) else None


def _spans(ranks: list[int]) -> list[tuple[int, int]]:
    """Increasing ``ranks`` as (first, last) spans of consecutive ranks."""
    spans: list[tuple[int, int]] = []
    for rank in ranks:
        if spans and rank == spans[-1][1] + 1:
            spans[-1] = (spans[-1][0], rank)
        else:
            spans.append((rank, rank))
    return spans


def _span_list(spans: list[tuple[int, int]]) -> str:
    """``0, 1, 4-9``: a span of three or more ranks as first-last."""
    out: list[str] = []
    for first, last in spans:
        out.extend(map(str, range(first, last + 1)) if last - first < 2 else [f"{first}-{last}"])
    return ", ".join(out)


def _ranks(data: RunData) -> str:
    """``<n> of <W> (<read>[; missing <missing>])``."""
    missing = data.missing_ranks
    more = f"; missing {_span_list(missing)}" if missing else ""
    return f"{len(data.ranks)} of {data.world_size} ({_span_list(_spans(data.ranks))}{more})"


def summary_lines(data: RunData, output: Path) -> list[str]:
    """The summary printed to stdout (format in the module docstring)."""
    status = f"{data.status} ({data.reason})" if data.status is not None else "unfinished (no run.end record)"
    checked_failed = len(data.scale_failed)
    metrics = "  ".join(f"{name}={_fmt(_last(data.metrics[name]))}" for name in sorted(data.metrics))
    return [
        f"run: {data.run_id or 'n/a'}",
        f"status: {status}",
        f"epochs: {_fmt(data.epoch)}  steps: {_fmt(data.step)}  items: {_fmt(data.items)}",
        f"final: step loss {_fmt(_last(data.step_loss))}  epoch loss {_fmt(_last(data.epoch_loss))}"
        f"  eval loss {_fmt(_last(data.eval_loss))}",
        *([f"metrics: {metrics}"] if metrics else []),
        f"scale check: {checked_failed} failed  {data.scale_unchecked} unchecked"
        f"  {data.batch_records} batch records",
        f"records: {data.records}  files: {len(data.parts)}",
        f"ranks: {_ranks(data)}",
        f"sink errors: {data.sink_errors}",
        f"dropped records: {data.dropped}",
        f"truncated lines: {data.truncated}",
        f"report: {output}",
    ]


# --------------------------------------------------------------------------- drawing


def eval_loss_label(split: str) -> str:
    """The loss panel's label of a split's eval losses: ``LABEL_EVAL_LOSS`` for ``val``."""
    return LABEL_EVAL_LOSS if split == "val" else f"{LABEL_EVAL_LOSS} ({split})"


def build_figure(data: RunData) -> Figure:
    """The figure of two panels (losses, learning rate), three when the run has a metric value, on
    its own Agg canvas (no pyplot, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGURE_SIZE_INCHES, dpi=FIGURE_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ratios = [3, 1, 2] if data.metrics else [3, 1]
    axes = list(fig.subplots(len(ratios), 1, sharex=True, gridspec_kw={"height_ratios": ratios}))
    fig.suptitle(f"{data.run_id or 'traintel run'} ({data.status or 'unfinished'})")
    _draw_losses(axes[0], data)
    _draw_lr(axes[1], data)
    if data.metrics:
        _draw_metrics(axes[2], data)
    axes[-1].set_xlabel("optimizer step")
    for ax in axes:
        for x in data.epoch_loss.x:
            ax.axvline(x, c="0.8", lw=0.8, zorder=0, label="_nolegend_")
        ax.grid(True, alpha=0.3)
    return fig


_DOTS: dict[str, Any] = {"ls": "none", "marker": ".", "ms": 4, "alpha": 0.6}


def _draw_losses(ax: Axes, data: RunData) -> None:
    curves: tuple[tuple[Series, str, dict[str, Any]], ...] = (
        (data.batch_loss, LABEL_BATCH_LOSS, {**_DOTS, "c": "C0"}),
        (data.batch_raw_loss, LABEL_RAW_LOSS, {**_DOTS, "c": "C1"}),
        (data.step_loss, LABEL_STEP_LOSS, {"lw": 1.2, "c": "C2"}),
        (data.epoch_loss, LABEL_EPOCH_LOSS, {"lw": 1.5, "marker": "o", "c": "C3"}),
        *_split_curves(data.split_loss),
    )
    finite: list[float] = []
    for series, label, style in curves:
        if len(series):
            ax.plot(series.x, series.y, label=label, **style)
            finite.extend(v for v in series.y if math.isfinite(v))
    failed = data.scale_failed
    if len(failed):
        label = f"{LABEL_SCALE_FAILED} ({len(failed)})"
        ax.plot(failed.x, failed.y, ls="none", marker="x", ms=12, mew=2.5, c="red", zorder=5, label=label)
        for x, y in zip(failed.x, failed.y, strict=True):
            if not math.isfinite(y):  # no point to put the x on: mark the whole step instead
                ax.axvline(x, c="red", lw=1.5, ls="--", zorder=5, label="_nolegend_")
    if finite and min(finite) > 0:
        ax.set_yscale("log")
    ax.set_ylabel("loss")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no loss records", ha="center", va="center", transform=ax.transAxes)


_SPLIT_COLORS = ("C6", "C7", "C8", "C9")


def _split_curves(split_loss: Mapping[str, Series]) -> list[tuple[Series, str, dict[str, Any]]]:
    """The eval loss curves, ``val`` first in its old style, then the other splits by name."""
    curves: list[tuple[Series, str, dict[str, Any]]] = []
    if "val" in split_loss:
        curves.append((split_loss["val"], LABEL_EVAL_LOSS, {"lw": 1.5, "marker": "s", "c": "C4"}))
    others = sorted(split for split in split_loss if split != "val")
    for i, split in enumerate(others):
        style = {"lw": 1.5, "marker": "D", "ms": 5, "c": _SPLIT_COLORS[i % len(_SPLIT_COLORS)]}
        curves.append((split_loss[split], eval_loss_label(split), style))
    return curves


def _draw_lr(ax: Axes, data: RunData) -> None:
    if len(data.lr):
        ax.plot(data.lr.x, data.lr.y, lw=1.2, c="C5", label=LABEL_LR)
    else:
        ax.text(0.5, 0.5, "no train.step records", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("learning rate")


_METRIC_STYLES: dict[str, dict[str, Any]] = {
    "eval": {"lw": 1.5, "marker": "s", "ms": 4},
    "train": {"lw": 1.0, "marker": ".", "ms": 3, "alpha": 0.8},
    "user": {"lw": 1.2, "marker": "^", "ms": 4, "ls": "--"},
}
"""A series' line style by its source (the first part of its name); colours follow the cycle."""


def _draw_metrics(ax: Axes, data: RunData) -> None:
    """One line per metric series, by name; log y only across ``METRICS_LOG_RATIO`` or more."""
    finite: list[float] = []
    for name in sorted(data.metrics):
        series = data.metrics[name]
        ax.plot(series.x, series.y, label=name, **_METRIC_STYLES[name.partition(".")[0]])
        finite.extend(v for v in series.y if math.isfinite(v))
    if finite and min(finite) > 0 and max(finite) >= METRICS_LOG_RATIO * min(finite):
        ax.set_yscale("log")
    ax.set_ylabel("metrics")
    ax.legend(loc="best", fontsize="small", ncols=min(3, (len(data.metrics) + 4) // 5))


_ONLY_REGULAR = "the report is written only as a new file or over a regular file"


def _not_regular(output: Path, kind: str) -> ConfigError:
    if kind == "a directory":
        return ConfigError(str(output), "is a directory")
    if kind == "a symbolic link":
        kind = "a symbolic link (not followed)"
    return ConfigError(str(output), f"is {kind}; {_ONLY_REGULAR}")


def check_output(output: Path, reads: Sequence[Path] = ()) -> None:
    """ConfigError when ``output`` cannot be where the PNG goes (checked before drawing): it must
    be a new name in an existing directory, or a regular file (never a directory, symbolic link,
    device, FIFO or socket) that is none of ``reads`` (the files the report reads)."""
    try:
        st = output.lstat()
    except (FileNotFoundError, NotADirectoryError):
        st = None
    except OSError as exc:
        raise ConfigError(str(output), f"cannot write: {exc.strerror or exc}") from None
    if st is None:
        if not output.parent.is_dir():
            raise ConfigError(str(output), "its directory does not exist")
        return
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(output, file_kind(st.st_mode))
    for path in reads:
        try:
            other = path.stat()
        except OSError:
            continue
        if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
            raise ConfigError(str(output), "is a file the report reads; choose another --output")


def write_png(fig: Figure, output: Path) -> None:
    """Render ``fig`` to PNG bytes, then write them to ``output`` with ``write_atomic``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    png = io.BytesIO()
    # print_png renders at the figure's own size and dpi, whatever savefig.* rcParams say.
    canvas.print_png(png)
    try:
        write_atomic(output, png.getvalue(), overwrite="regular")
    except NotRegularFile as exc:  # it became one while the figure was drawn
        raise _not_regular(output, exc.kind) from None
    except OSError as exc:
        raise ConfigError(str(output), f"cannot write: {exc.strerror or exc}") from None


def report(
    run_dir: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    stdout: IO[str] | None = None,
) -> int:
    """Read the run, write the PNG, print the summary; ConfigError (exit 2) on bad input."""
    data = load_run(run_dir)
    out = Path(output) if output is not None else Path(run_dir) / REPORT_FILENAME
    check_output(out, [*data.parts, Path(run_dir) / CONFIG_FILENAME])
    write_png(build_figure(data), out)
    stream = stdout if stdout is not None else sys.stdout
    stream.write("".join(line + "\n" for line in summary_lines(data, out)))
    return EXIT_OK
