"""sinks.prometheus.per_rank: every rank serves its own values on port + LOCAL_RANK, each family
labelled ``rank``. Under a real torchrun (two gloo processes) both ranks' scrapes equal their own
diagnostic files (a checkpoint's values included), a real Prometheus scrapes both, and the dashboard's
rank variable and the alert rules work over them; a real Pushgateway keeps each rank's final values
apart."""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.children import popen
from tests.helpers.dashboard import (
    MULTI,
    RULES,
    VARIABLES,
    load_dashboard,
    panel_targets,
    regex_value,
    substitute_variables,
)
from tests.helpers.paths import ROOT
from tests.helpers.servers import free_port, http_get, prometheus_server, pushgateway_server, wait_until
from traintel.config import SinksConfig
from traintel.errors import ConfigError
from traintel.run.assembly import build_sinks
from traintel.sinks import MemorySink, PrometheusSink, Pushgateway
from traintel.sinks.json.lines import iso_utc
from traintel.testing import (
    T0,
    batch_record,
    end_record,
    epoch_record,
    eval_record,
    run_context,
    step_record,
)

CONFIG = ROOT / "configs" / "default.yaml"
WORLD = 2

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""(sample name, sorted labels) -> value."""


def _config(**prometheus: Any) -> SinksConfig:
    return SinksConfig.model_validate({"prometheus": prometheus})


def _samples(exposition: str, prefix: str = "traintel_") -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
        if s.name.startswith(prefix)
    }


# ---------------------------------------------------------------------------------------------
# In one process


def test_every_rank_builds_an_exporter_on_port_plus_local_rank() -> None:
    def port(cfg: SinksConfig, rank: int, local_rank: int) -> tuple[int, bool] | None:
        p = build_sinks(cfg, rank=rank, local_rank=local_rank, json_stream=None).prometheus
        return None if p is None else (p.port, p.per_rank)

    per_rank = _config(port=9400, per_rank=True)
    assert port(per_rank, 0, 0) == (9400, True)
    assert port(per_rank, 1, 1) == (9401, True)
    assert port(per_rank, 5, 1) == (9401, True)  # second node: global rank 5, local rank 1
    assert port(_config(port=0, per_rank=True), 1, 1) == (0, True)  # 0 stays any free port
    # without it rank 0 alone serves, on the configured port
    assert port(_config(port=9400), 0, 0) == (9400, False)
    assert port(_config(port=9400), 1, 1) is None
    assert port(_config(enabled=False, per_rank=True), 1, 1) is None
    with pytest.raises(ConfigError) as caught:
        build_sinks(_config(port=65535, per_rank=True), rank=1, local_rank=1)
    assert caught.value.key == "sinks.prometheus.port"
    assert caught.value.problem == "per_rank serves on port + LOCAL_RANK = 65535 + 1, over 65535"


def test_the_exposition_of_rank_1_is_exact(tmp_path: Path) -> None:
    cfg = SinksConfig.model_validate(
        {"prometheus": {"port": 0, "per_rank": True}, "json": {"enabled": False},
         "diagnostic": {"enabled": False}}
    )  # fmt: skip
    built = build_sinks(cfg, extra=[MemorySink()], rank=1, local_rank=1)
    assert built.prometheus is not None
    built.fanout.open(run_context(tmp_path, rank=1, world_size=2))
    try:
        rank = {"rank": 1, "world_size": 2}
        built.fanout.emit_many(
            [batch_record(**rank), step_record(**rank, grad_norm=2.5), epoch_record(**rank),
             eval_record(**rank), end_record(**rank)]
        )  # fmt: skip
        text = generate_latest(built.prometheus.registry).decode()
    finally:
        built.fanout.close()
    traintel = "".join(line + "\n" for line in text.splitlines() if "traintel_" in line)
    assert traintel == (
        "# HELP traintel_run_info The run this process trains (value is always 1).\n"
        "# TYPE traintel_run_info gauge\n"
        'traintel_run_info{name="demo",rank="1",run_id="r1"} 1.0\n'
        "# HELP traintel_epoch Current epoch (1-based).\n"
        "# TYPE traintel_epoch gauge\n"
        'traintel_epoch{rank="1"} 1.0\n'
        "# HELP traintel_optimizer_step Optimizer steps completed.\n"
        "# TYPE traintel_optimizer_step gauge\n"
        'traintel_optimizer_step{rank="1"} 1.0\n'
        "# HELP traintel_batch_loss Latest emitted micro-batch loss given to backward.\n"
        "# TYPE traintel_batch_loss gauge\n"
        'traintel_batch_loss{rank="1"} 0.25\n'
        "# HELP traintel_batch_raw_loss Latest emitted micro-batch mean loss, unscaled.\n"
        "# TYPE traintel_batch_raw_loss gauge\n"
        'traintel_batch_raw_loss{rank="1"} 0.75\n'
        "# HELP traintel_batch_loss_scale Latest emitted micro-batch scale n_b/N_t.\n"
        "# TYPE traintel_batch_loss_scale gauge\n"
        'traintel_batch_loss_scale{rank="1"} 0.3333333333333333\n'
        "# HELP traintel_step_loss Objective of the latest emitted optimizer step.\n"
        "# TYPE traintel_step_loss gauge\n"
        'traintel_step_loss{rank="1"} 0.6875\n'
        "# HELP traintel_learning_rate Learning rate of the latest emitted step.\n"
        "# TYPE traintel_learning_rate gauge\n"
        'traintel_learning_rate{rank="1"} 0.001\n'
        "# HELP traintel_grad_norm Gradient norm of the latest emitted step.\n"
        "# TYPE traintel_grad_norm gauge\n"
        'traintel_grad_norm{rank="1"} 2.5\n'
        "# HELP traintel_step_timestamp_seconds Unix time of the latest emitted optimizer step.\n"
        "# TYPE traintel_step_timestamp_seconds gauge\n"
        'traintel_step_timestamp_seconds{rank="1"} 1.76400000125e+09\n'
        "# HELP traintel_epoch_loss Item-weighted mean training loss of the last epoch.\n"
        "# TYPE traintel_epoch_loss gauge\n"
        'traintel_epoch_loss{rank="1"} 0.5\n'
        "# HELP traintel_epoch_items_per_second Training throughput of the last epoch.\n"
        "# TYPE traintel_epoch_items_per_second gauge\n"
        'traintel_epoch_items_per_second{rank="1"} 6.0\n'
        "# HELP traintel_eval_loss Item-weighted mean validation loss, by validation loader.\n"
        "# TYPE traintel_eval_loss gauge\n"
        'traintel_eval_loss{rank="1",split="val"} 0.625\n'
        "# HELP traintel_run_success 1 when the run completed (a handler's stop too), 0 when it failed or a "
        "signal stopped it.\n"
        "# TYPE traintel_run_success gauge\n"
        'traintel_run_success{rank="1"} 1.0\n'
        "# HELP traintel_run_end_timestamp_seconds Unix time the run ended.\n"
        "# TYPE traintel_run_end_timestamp_seconds gauge\n"
        'traintel_run_end_timestamp_seconds{rank="1"} 1.76400000325e+09\n'
        "# HELP traintel_items_total Training items processed.\n"
        "# TYPE traintel_items_total counter\n"
        'traintel_items_total{rank="1"} 12.0\n'
        "# HELP traintel_sink_errors_total Records a sink failed to take.\n"
        "# TYPE traintel_sink_errors_total counter\n"
        'traintel_sink_errors_total{rank="1",sink="memory"} 0.0\n'
        'traintel_sink_errors_total{rank="1",sink="prometheus"} 0.0\n'
        "# HELP traintel_sink_dropped_records_total Records a sink dropped because its consumer fell behind.\n"
        "# TYPE traintel_sink_dropped_records_total counter\n"
        "# HELP traintel_exporter_connections_closed_total Connections to the exporter closed before being answered, by reason.\n"
        "# TYPE traintel_exporter_connections_closed_total counter\n"
        'traintel_exporter_connections_closed_total{rank="1",reason="limit"} 0.0\n'
        'traintel_exporter_connections_closed_total{rank="1",reason="timeout"} 0.0\n'
        'traintel_exporter_connections_closed_total{rank="1",reason="bad_request"} 0.0\n'
        'traintel_exporter_connections_closed_total{rank="1",reason="tls"} 0.0\n'
        "# HELP traintel_exporter_open_connections Connections open to the exporter.\n"
        "# TYPE traintel_exporter_open_connections gauge\n"
        'traintel_exporter_open_connections{rank="1"} 0.0\n'
    )
    # the process metrics are this process's: labelled with its rank too
    process = _samples(text, prefix="process_")
    assert {name for name, _ in process} == {
        "process_virtual_memory_bytes", "process_resident_memory_bytes", "process_start_time_seconds",
        "process_cpu_seconds_total", "process_open_fds", "process_max_fds",
    }  # fmt: skip
    assert {labels for _, labels in process} == {(("rank", "1"),)}


@pytest.mark.slow
def test_a_real_pushgateway_keeps_each_ranks_final_values(tmp_path: Path) -> None:
    """The push is grouped by rank too: without it rank 1's push would replace rank 0's group."""
    with pushgateway_server() as gateway_url:
        for rank, step, status in ((0, 7, "failed"), (1, 5, "completed")):
            sink = PrometheusSink(port=0, per_rank=True, pushgateway=Pushgateway(url=gateway_url))
            sink.open(run_context(tmp_path, rank=rank, world_size=2))
            sink.emit(end_record(rank=rank, world_size=2, step=step, status=status))
            sink.close()
        pushed = _samples(http_get(f"{gateway_url}/metrics").decode())

    def labels(rank: int, **more: str) -> tuple[tuple[str, str], ...]:
        group = {"instance": "", "job": "traintel", "rank": str(rank), "run_id": "r1"}
        return tuple(sorted({**group, **more}.items()))

    # the Pushgateway's own push_time_seconds and push_failure_time_seconds left out
    assert pushed == {
        (name, labels(rank, **more)): value
        for rank, step, success in ((0, 7, 0.0), (1, 5, 1.0))
        for name, more, value in (
            ("traintel_run_info", {"name": "demo"}, 1.0),
            ("traintel_epoch", {}, 1.0),
            ("traintel_optimizer_step", {}, step),
            ("traintel_run_success", {}, success),
            ("traintel_run_end_timestamp_seconds", {}, T0 + 3),
            ("traintel_items_total", {}, 12.0),
        )
    }


# ---------------------------------------------------------------------------------------------
# Under a real torchrun, with a real Prometheus


def _free_port_pair() -> int:
    """A port p with p + 1 free too (the two ranks' exporters)."""
    for _ in range(100):
        base = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", base + 1))
            except OSError:
                continue
        return base
    pytest.fail("no two consecutive free ports")


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (torchrun's workers, one per rank)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return sorted(found)


def _records(path: Path) -> list[dict[str, Any]]:
    """The complete lines written so far."""
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.split("\n")[:-1]]


def _api(url: str, path: str, **params: str) -> Any:
    body = json.loads(http_get(f"{url}/api/v1/{path}?{urllib.parse.urlencode(params)}"))
    assert body["status"] == "success", body
    return body["data"]


class Ranks(NamedTuple):
    ports: list[int]
    """Each rank's exporter port: the base port + LOCAL_RANK."""
    records: list[list[dict[str, Any]]]
    """Each rank's diagnostic file."""
    prometheus: str
    """The Prometheus that scrapes both."""


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ranks]:
    """``traintel train`` under torchrun with two ranks and per_rank, ended and lingering, with a
    checkpoint every 10 of its 20 epochs."""
    tmp_path = tmp_path_factory.mktemp("per_rank")
    base = _free_port_pair()
    ports = [base + r for r in range(WORLD)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINTEL__")}
    env["OMP_NUM_THREADS"] = "1"
    run_dir = tmp_path / "run"
    files = [run_dir / "diagnostic.jsonl", run_dir / "diagnostic.rank1.jsonl"]
    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as err, prometheus_server(tmp_path, *ports, rule_files=[RULES]) as prometheus:
        proc = popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
             "-m", "traintel", "train", "--config", str(CONFIG), "--set", f"run.dir={run_dir}",
             "--set", f"sinks.prometheus.port={base}", "--set", "sinks.prometheus.per_rank=true",
             "--set", "sinks.prometheus.linger_seconds=60", "--set", "task.params.metrics=true",
             "--set", "checkpoint.every_epochs=10"],
            env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 40
            while not all(any(r["event"] == "run.end" for r in _records(f)) for f in files):
                assert proc.poll() is None, stderr.read_text()[-3000:]
                assert time.monotonic() < deadline, "the ranks never ended"
                time.sleep(0.2)
            yield Ranks(ports, [_records(f) for f in files], prometheus)
        finally:
            workers = _children(proc.pid)
            for pid in workers:  # SIGTERM during the linger ends it: each rank exits 0
                os.kill(pid, signal.SIGTERM)
            proc.wait(timeout=30)
    assert len(workers) == WORLD
    assert proc.returncode == 0, stderr.read_text()[-3000:]  # torchrun exits 0 when every rank did


def _scraped_alone(url: str, rank: int) -> Samples:
    """The exposition at ``url`` if it was rendered with no other scraper connected (the Prometheus
    scrapes it every second): ``traintel_exporter_open_connections`` 1, this scrape; else nothing."""
    served = _samples(http_get(url).decode())
    alone = served.get(("traintel_exporter_open_connections", (("rank", str(rank)),))) == 1.0
    return served if alone else {}


def _expected(records: list[dict[str, Any]], rank: int, sinks: dict[str, list[str]]) -> Samples:
    """What a rank's exporter serves: the float of each value of its newest records."""

    def last(event: str) -> dict[str, Any]:
        return [r for r in records if r["event"] == event][-1]

    start, batch, step = last("run.start"), last("train.batch"), last("train.step")
    epoch, evaluation, end = last("train.epoch"), last("eval.epoch"), last("run.end")
    checkpoint = last("checkpoint")
    r = ("rank", str(rank))
    c = (r, ("reason", checkpoint["reason"]))
    values: Samples = {
        ("traintel_run_info", tuple(sorted({"name": start["name"], "rank": str(rank), "run_id": start["run_id"]}.items()))): 1.0,
        ("traintel_epoch", (r,)): end["epoch"],
        ("traintel_optimizer_step", (r,)): end["step"],
        ("traintel_items_total", (r,)): end["items_total"],
        ("traintel_batch_loss", (r,)): batch["loss"],
        ("traintel_batch_raw_loss", (r,)): batch["raw_loss"],
        ("traintel_batch_loss_scale", (r,)): batch["loss_scale"],
        ("traintel_step_loss", (r,)): step["loss"],
        ("traintel_learning_rate", (r,)): step["lr"],
        ("traintel_grad_norm", (r,)): step["grad_norm"],  # configs/default.yaml clips gradients
        ("traintel_epoch_loss", (r,)): epoch["loss"],
        ("traintel_epoch_items_per_second", (r,)): epoch["items_per_second"],
        ("traintel_eval_loss", (r, ("split", "val"))): evaluation["loss"],
        ("traintel_eval_metric", (("name", "mae"), r, ("split", "val"))): evaluation["metrics"]["mae"],
        ("traintel_train_metric", (("name", "mae"), r)): step["metrics"]["mae"],
        ("traintel_run_success", (r,)): 1.0,
        ("traintel_checkpoint_step", c): checkpoint["step"],
        ("traintel_checkpoint_size_bytes", c): checkpoint["size_bytes"],
        ("traintel_checkpoint_write_seconds", c): checkpoint["write_seconds"],
        ("traintel_checkpoint_stall_seconds", c): checkpoint["stall_seconds"],
    }  # fmt: skip
    for family, names in sinks.items():
        for name in names:
            values[(family, (r, ("sink", name)))] = 0.0
    for reason in ("bad_request", "limit", "timeout", "tls"):
        values[("traintel_exporter_connections_closed_total", (r, ("reason", reason)))] = 0.0
    values[("traintel_exporter_open_connections", (r,))] = 1.0  # the scrape itself
    return values


@pytest.mark.slow
def test_each_rank_serves_its_own_records_on_port_plus_local_rank(ranks: Ranks) -> None:
    health = [
        {"traintel_sink_errors_total": ["diagnostic", "json", "prometheus"],
         "traintel_sink_dropped_records_total": ["diagnostic", "json"]},
        # rank 1 writes no records to stdout (telemetry.ranks: zero): no json sink
        {"traintel_sink_errors_total": ["diagnostic", "prometheus"],
         "traintel_sink_dropped_records_total": ["diagnostic"]},
    ]  # fmt: skip
    for rank, (port, records) in enumerate(zip(ranks.ports, ranks.records, strict=True)):
        assert {(r["rank"], r["world_size"]) for r in records} == {(rank, WORLD)}
        start = records[0]
        assert start["event"] == "run.start"
        assert start["metrics_url"] == f"http://127.0.0.1:{port}/metrics"
        served = wait_until(
            functools.partial(_scraped_alone, start["metrics_url"], rank),
            f"rank {rank}'s exporter never answered with no other scraper connected", 30,
        )  # fmt: skip
        times = {name: served.pop((name, (("rank", str(rank)),))) for name in (
            "traintel_step_timestamp_seconds", "traintel_run_end_timestamp_seconds")}  # fmt: skip
        checkpoint_time = served.pop(
            ("traintel_checkpoint_timestamp_seconds", (("rank", str(rank)), ("reason", "every_epochs")))
        )
        assert served == _expected(records, rank, health[rank]), rank
        # the timestamps render as the records' own
        step = [r for r in records if r["event"] == "train.step"][-1]
        assert iso_utc(times["traintel_step_timestamp_seconds"]) == step["timestamp"]
        assert iso_utc(times["traintel_run_end_timestamp_seconds"]) == records[-1]["timestamp"]
        checkpoint = [r for r in records if r["event"] == "checkpoint"][-1]
        assert iso_utc(checkpoint_time) == checkpoint["timestamp"]
        assert (checkpoint["reason"], checkpoint["step"]) == ("every_epochs", records[-1]["step"])
    # the ranks' batches differ (each has its own shard); steps and epochs hold global values
    batches = [[r for r in records if r["event"] == "train.batch"][-1] for records in ranks.records]
    assert batches[0]["raw_loss"] != batches[1]["raw_loss"]
    # a checkpoint's size is what every rank wrote of it: the same on both
    sizes = [[r["size_bytes"] for r in records if r["event"] == "checkpoint"] for records in ranks.records]
    assert sizes[0] == sizes[1] and len(sizes[0]) == 2
    assert ranks.records[0][-1]["items_total"] == ranks.records[1][-1]["items_total"] == 20 * 1000


@pytest.mark.slow
def test_the_dashboard_shows_each_rank_and_the_alert_rules_stay_quiet(ranks: Ranks) -> None:
    url = ranks.prometheus
    run_id = ranks.records[0][0]["run_id"]
    ends = [records[-1] for records in ranks.records]
    instances = [f"127.0.0.1:{p}" for p in ranks.ports]

    def by_rank(promql: str) -> dict[str, float]:
        return {r["metric"]["rank"]: float(r["value"][1]) for r in _api(url, "query", query=promql)["result"]}

    def ready() -> bool:
        """Both ranks scraped after their end (run.end alone sets traintel_run_success; a scrape
        with the final step may come before the last epoch's end), and 2 samples of items_total
        each for rate()."""
        final = by_rank("traintel_run_success") == {"0": 1.0, "1": 1.0}
        final = final and by_rank("traintel_optimizer_step") == {"0": ends[0]["step"], "1": ends[1]["step"]}
        return final and by_rank("count_over_time(traintel_items_total[1m]) >= 2").keys() == {"0", "1"}

    deadline = time.monotonic() + 30
    while not ready():
        assert time.monotonic() < deadline, "prometheus never scraped both ranks' final values"
        time.sleep(0.5)

    # the variables as Grafana asks for them, with All instances
    values = {"job": "traintel", "instance": MULTI["instance"], "run": run_id, "rank": MULTI["rank"],
              "metric": MULTI["metric"], "__rate_interval": "1m", "__interval": "1s"}  # fmt: skip
    # the built-in task's metrics: mae, for training and evaluation (nothing is logged with Run.log)
    options = {"job": ["traintel"], "instance": sorted(instances), "run": [run_id], "rank": ["0", "1"],
               "metric": ["mae"]}  # fmt: skip
    for name, query in VARIABLES.items():
        selector, label = query.removeprefix("label_values(").removesuffix(")").rsplit(", ", 1)
        found = _api(url, f"label/{label}/values", **{"match[]": substitute_variables(selector, values)})
        assert found == options[name], name

    def panel(title: str, ref_id: str, chosen: dict[str, str]) -> dict[str, float]:
        (expr,) = [e for t, r, e in panel_targets(load_dashboard()) if (t, r) == (title, ref_id)]
        return by_rank(substitute_variables(expr, chosen))

    last_batch = [[r for r in records if r["event"] == "train.batch"][-1] for records in ranks.records]
    last_epoch = [[r for r in records if r["event"] == "train.epoch"][-1] for records in ranks.records]
    last_checkpoint = [[r for r in records if r["event"] == "checkpoint"][-1] for records in ranks.records]
    for rank, chosen in (("0", "0"), ("1", "1"), (None, MULTI["rank"])):  # one rank, or All
        for instance in (MULTI["instance"], regex_value(instances[int(rank or 0)])):
            if rank is None and instance != MULTI["instance"]:
                continue
            picked = {**values, "rank": chosen, "instance": instance}
            want = ["0", "1"] if rank is None else [rank]
            for title, ref_id, expr in panel_targets(load_dashboard()):
                result = _api(url, "query", query=substitute_variables(expr, picked))["result"]
                shown = [] if "traintel_user_metric" in expr else want  # nothing logged with Run.log
                assert sorted({s["metric"]["rank"] for s in result}) == shown, (title, ref_id, picked)
                assert all(math.isfinite(float(s["value"][1])) for s in result), (title, ref_id)
            assert panel("Step and epoch", "A", picked) == {r: ends[int(r)]["step"] for r in want}
            assert panel("Step and epoch", "B", picked) == {r: ends[int(r)]["epoch"] for r in want}
            assert panel("Batch loss", "A", picked) == {r: last_batch[int(r)]["loss"] for r in want}
            assert panel("Batch loss", "B", picked) == {r: last_batch[int(r)]["raw_loss"] for r in want}
            throughput = {r: last_epoch[int(r)]["items_per_second"] for r in want}
            assert panel("Throughput", "B", picked) == throughput
            for title, ref_id, key in (
                ("Checkpoint write and stall time", "A", "write_seconds"),
                ("Checkpoint write and stall time", "B", "stall_seconds"),
                ("Checkpoint size", "A", "size_bytes"),
            ):  # each rank's newest checkpoint
                assert panel(title, ref_id, picked) == {r: last_checkpoint[int(r)][key] for r in want}, key

    # rules.yml evaluates over both ranks without errors and fires nothing (TraintelRankBehind included)
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    deadline = time.monotonic() + 30
    while True:
        (group,) = _api(url, "rules")["groups"]
        if all(rule["health"] == "ok" for rule in group["rules"]):
            break
        assert time.monotonic() < deadline, group
        time.sleep(0.5)
    assert [rule["name"] for rule in group["rules"]] == [rule["alert"] for rule in rules]
    assert "TraintelRankBehind" in [rule["name"] for rule in group["rules"]]
    assert [rule["alerts"] for rule in group["rules"]] == [[]] * len(rules), group
