"""The Grafana dashboard and its provisioning are well formed, and every panel query returns data
from a real Prometheus that scraped a real run (which also evaluates docker/prometheus/rules.yml).
A run of one process has no ``rank`` label: the rank variable has no options and its All value
matches series without it (tests/sinks/prometheus/test_per_rank.py runs the queries over two ranks).
The run has the task's metrics on and logs a value with ``Run.log`` (tests/helpers/metrics_run.py),
so that the Metrics row has data too, and takes a checkpoint every 50 epochs, for the Checkpoints
row."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest
import yaml

from tests.helpers import metrics_run
from tests.helpers.children import popen
from tests.helpers.dashboard import (
    GRAFANA,
    METRIC,
    METRIC_FAMILIES,
    MULTI,
    RULES,
    VARIABLES,
    dashboard_panels,
    load_dashboard,
    panel_targets,
    regex_value,
    substitute_variables,
)
from tests.helpers.paths import ROOT
from tests.helpers.servers import free_port, http_get, prometheus_server, wait_until

CONFIG = ROOT / "configs" / "default.yaml"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yaml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "traintel.yaml"
PROMETHEUS_CONFIG = ROOT / "docker" / "prometheus" / "prometheus.yml"

DATASOURCE_UID = "prometheus"


def test_the_dashboard_model() -> None:
    dashboard = load_dashboard()
    assert (dashboard["uid"], dashboard["title"]) == ("traintel", "traintel")
    assert dashboard["schemaVersion"] >= 39
    assert dashboard.get("id") is None  # provisioning assigns it
    panels = dashboard_panels(dashboard)
    assert len(panels) >= 10
    rows = [panel for panel in dashboard["panels"] if panel["type"] == "row"]
    ids = [panel["id"] for panel in panels + rows]
    assert len(set(ids)) == len(ids), "panel ids must be unique"
    cells: dict[tuple[int, int], str] = {}  # every grid cell, rows included, holds one panel at most
    for panel in panels + rows:
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[x, y]}"
                cells[x, y] = panel["title"]
    for row in rows:
        assert row["gridPos"]["w"] == 24 and row["gridPos"]["h"] == 1, row["title"]
    for panel in panels:
        title = panel["title"]
        assert panel["type"] in {"timeseries", "stat", "table"}, title
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, title
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, title
        targets = panel["targets"]
        assert targets, f"{title}: no query"
        ref_ids = [target["refId"] for target in targets]
        assert len(set(ref_ids)) == len(ref_ids), title
        for target in targets:
            assert target["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, title
            assert target["expr"].strip(), title
    # each selector filters on the chosen targets and ranks: no series of another job, instance or
    # rank leaks in
    for title, ref_id, expr in panel_targets(dashboard):
        selectors = METRIC.findall(expr)
        assert selectors, (title, ref_id, expr)
        for name, matchers in selectors:
            assert 'job="$job"' in matchers and 'instance=~"$instance"' in matchers, (title, ref_id, name)
            assert 'rank=~"$rank"' in matchers, (title, ref_id, name)
            # the metric variable picks the names of the families labelled by metric, and only those
            assert ('name=~"$metric"' in matchers) == (name in METRIC_FAMILIES), (title, ref_id, name)


def test_the_panels_cover_the_exported_metrics() -> None:
    exprs = "\n".join(expr for _, _, expr in panel_targets(load_dashboard()))
    for metric in (
        "traintel_batch_loss",
        "traintel_batch_raw_loss",
        "traintel_step_loss",
        "traintel_epoch_loss",
        "traintel_eval_loss",
        "traintel_learning_rate",
        "rate(traintel_items_total",
        "process_resident_memory_bytes",
        "time() - traintel_step_timestamp_seconds",
        "traintel_sink_errors_total",
        "traintel_sink_dropped_records_total",
        "traintel_optimizer_step",
        "traintel_epoch{",
        "traintel_checkpoint_write_seconds",
        "traintel_checkpoint_stall_seconds",
        "traintel_checkpoint_size_bytes",
        "time() - max without(reason) (traintel_checkpoint_timestamp_seconds",
        *METRIC_FAMILIES,
    ):
        assert metric in exprs, metric
    kinds = {panel["title"]: panel["type"] for panel in dashboard_panels(load_dashboard())}
    assert kinds["Since the last optimizer step"] == kinds["Step and epoch"] == "stat"
    assert kinds["Task metrics"] == kinds["Logged metrics"] == "timeseries"
    assert kinds["Checkpoint write and stall time"] == kinds["Checkpoint size"] == "timeseries"
    assert kinds["Since the last checkpoint"] == "stat"
    units = {
        panel["title"]: panel["fieldConfig"]["defaults"].get("unit")
        for panel in dashboard_panels(load_dashboard())
    }
    assert units["Checkpoint write and stall time"] == units["Since the last checkpoint"] == "s"
    assert units["Checkpoint size"] == "bytes"
    # the Metrics row holds them, below every other panel
    panels = load_dashboard()["panels"]
    (row,) = [i for i, panel in enumerate(panels) if panel["type"] == "row" and panel["title"] == "Metrics"]
    assert not panels[row]["collapsed"]
    assert [panel["title"] for panel in panels[row + 1 :]] == ["Task metrics", "Logged metrics"]
    above = max(panel["gridPos"]["y"] + panel["gridPos"]["h"] for panel in panels[:row])
    assert panels[row]["gridPos"]["y"] == above
    # the Checkpoints row holds its three panels, right above the Metrics row
    (checkpoints,) = [
        i for i, panel in enumerate(panels) if panel["type"] == "row" and panel["title"] == "Checkpoints"
    ]
    assert not panels[checkpoints]["collapsed"] and checkpoints == row - 4
    assert [panel["title"] for panel in panels[checkpoints + 1 : row]] == [
        "Checkpoint write and stall time",
        "Checkpoint size",
        "Since the last checkpoint",
    ]
    above = max(panel["gridPos"]["y"] + panel["gridPos"]["h"] for panel in panels[:checkpoints])
    assert panels[checkpoints]["gridPos"]["y"] == above
    # best checkpoints, which no run resumes from, leave the time since the last checkpoint alone
    (since,) = [e for t, _, e in panel_targets(load_dashboard()) if t == "Since the last checkpoint"]
    assert 'reason!="best"' in since


def test_the_template_variables_chain_job_instance_run_rank_metric() -> None:
    variables = load_dashboard()["templating"]["list"]
    assert [v["name"] for v in variables] == list(VARIABLES)
    for variable in variables:
        name = variable["name"]
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        assert variable["type"] == "query", name
        assert text == variable["definition"] == VARIABLES[name]
        assert variable["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}
        assert variable["refresh"] in {1, 2}, "options must be loaded from Prometheus"
        choice = (variable["multi"], variable["includeAll"], variable.get("allValue"))
        if name in MULTI:  # All (the default) is the custom value, also when there are no options
            assert choice == (True, True, MULTI[name]), name
            assert variable["current"]["value"] == ["$__all"], name
        else:
            assert choice == (False, False, None), f"{name}: the queries expect one value"


def test_the_provisioning_files() -> None:
    datasources = yaml.safe_load(DATASOURCES.read_text())
    assert datasources["apiVersion"] == 1
    (source,) = datasources["datasources"]
    assert source["uid"] == DATASOURCE_UID
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert source["access"] == "proxy"
    assert source["isDefault"] is True
    # $__rate_interval relies on it: at least 4 scrape intervals, so rate() sees 2 samples or more
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "traintel"]
    scrape_interval = job.get("scrape_interval", config.get("global", {}).get("scrape_interval", "1m"))
    assert source["jsonData"]["timeInterval"] == scrape_interval

    providers = yaml.safe_load(PROVIDERS.read_text())
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


# ---------------------------------------------------------------------------------------------
# Against a real Prometheus and a real run


def _api(url: str, path: str, **params: str) -> Any:
    body = json.loads(http_get(f"{url}/api/v1/{path}?{urllib.parse.urlencode(params)}"))
    assert body["status"] == "success", body
    return body["data"]


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """A Prometheus on loopback scraping a target port every second and evaluating rules.yml;
    yields (its URL, the target port)."""
    target = free_port()
    with prometheus_server(tmp_path_factory.mktemp("prometheus"), target, rule_files=[RULES]) as url:
        yield url, target


class Scraped(NamedTuple):
    url: str
    """The Prometheus that scraped the run."""
    values: dict[str, str]
    """What Grafana puts in for each dashboard variable."""
    records: list[dict[str, Any]]
    """The run's records, from run.start to run.end."""
    instance: str
    """The exporter's address, the ``instance`` label of its series."""

    @property
    def end(self) -> dict[str, Any]:
        """The run.end record."""
        return self.records[-1]

    def last(self, event: str) -> dict[str, Any]:
        """The newest record of ``event``."""
        return [record for record in self.records if record["event"] == event][-1]


@pytest.fixture(scope="module")
def scraped(prometheus: tuple[str, int], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scraped]:
    """A real training run that has ended and lingers, scraped up to its final step: the built-in
    task with its metrics on, logging a value of its own at each epoch's end."""
    url, port = prometheus
    tmp_path = tmp_path_factory.mktemp("train")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINTEL__")}
    env["PYTHONPATH"] = str(ROOT)
    stderr = tmp_path / "stderr.txt"
    # 150 epochs last a few seconds: several scrapes see traintel_items_total grow, so rate() has data;
    # a checkpoint every 50 epochs: the last at the run's end
    with stderr.open("w") as err:
        run = popen(
            [sys.executable, "-m", metrics_run.__name__, str(CONFIG), f"run.dir={tmp_path / 'run'}",
             "trainer.max_epochs=150", "task.params.metrics=true", "checkpoint.every_epochs=50",
             f"sinks.prometheus.port={port}", "sinks.prometheus.linger_seconds=120"],
            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=err, text=True,
        )  # fmt: skip
    try:
        assert run.stdout is not None
        records: list[dict[str, Any]] = []
        for line in run.stdout:
            records.append(json.loads(line))
            if records[-1]["event"] == "run.end":
                break
        assert records and records[-1]["event"] == "run.end", stderr.read_text()
        start, end = records[0], records[-1]
        assert start["event"] == "run.start", start
        assert end["status"] == "completed", end

        # a scrape taken after the run ended: run.end alone sets traintel_run_success (a scrape with
        # the final step may come before the last epoch's end and evaluation)
        wait_until(
            lambda: [float(r["value"][1]) for r in _api(url, "query", query="traintel_run_success")["result"]]
            == [1.0],
            "prometheus never scraped the run's end (traintel_run_success 1)", 30, interval=0.5,
        )  # fmt: skip
        values = {
            "job": "traintel",
            "instance": regex_value(f"127.0.0.1:{port}"),  # the one instance chosen
            "run": start["run_id"],
            "rank": MULTI["rank"],  # All: this run has no rank label
            "metric": MULTI["metric"],  # All
            "__rate_interval": "1m",
            "__interval": "1s",
        }
        yield Scraped(url, values, records, f"127.0.0.1:{port}")
    finally:
        run.send_signal(signal.SIGTERM)  # ends the linger at once
        assert run.wait(timeout=15) == 0


@pytest.mark.slow
def test_the_template_variables_resolve_in_prometheus(scraped: Scraped) -> None:
    """As Grafana asks for them: /api/v1/label/<name>/values?match[]=<selector>."""
    expected_options = {name: [scraped.values[name]] for name in VARIABLES}
    expected_options["instance"] = [scraped.instance]
    expected_options["rank"] = []  # no options: Grafana selects All, MULTI["rank"]
    expected_options["metric"] = ["mae", metrics_run.LOGGED]  # the task's (eval and train) and Run.log's
    for values in (scraped.values, {**scraped.values, "instance": MULTI["instance"]}):  # one or All
        for name, query in VARIABLES.items():
            match = re.fullmatch(r"label_values\((.+), (\w+)\)", query)
            assert match is not None, query
            selector, label = substitute_variables(match.group(1), values), match.group(2)
            found = _api(scraped.url, f"label/{label}/values", **{"match[]": selector})
            assert found == expected_options[name], name


@pytest.mark.slow
def test_every_panel_query_returns_data_for_a_real_run(scraped: Scraped) -> None:
    dashboard = load_dashboard()
    for values in (scraped.values, {**scraped.values, "instance": MULTI["instance"]}):  # one or All
        for title, ref_id, expr in panel_targets(dashboard):
            promql = substitute_variables(expr, values)
            result = _api(scraped.url, "query", query=promql)["result"]
            assert result, f"{title} {ref_id}: no data for {promql}"
            for sample in result:
                assert math.isfinite(float(sample["value"][1])), (title, ref_id, sample)
                assert sample["metric"].get("instance") == scraped.instance, (title, ref_id, sample)
                assert "rank" not in sample["metric"], (title, ref_id, sample)

    def only(title: str, ref_id: str) -> float:
        (expr,) = [e for t, r, e in panel_targets(dashboard) if (t, r) == (title, ref_id)]
        (sample,) = _api(scraped.url, "query", query=substitute_variables(expr, scraped.values))["result"]
        return float(sample["value"][1])

    assert only("Step and epoch", "A") == scraped.end["step"]
    assert only("Step and epoch", "B") == scraped.end["epoch"]
    assert only("Throughput", "A") > 0  # the 1m window holds the run
    assert 0 <= only("Since the last optimizer step", "A") < 120
    # the newest evaluation's, step's and Run.log's values
    evaluation, step, logged = (scraped.last(e) for e in ("eval.epoch", "train.step", "metric"))
    assert only("Task metrics", "A") == evaluation["metrics"]["mae"]
    assert only("Task metrics", "B") == step["metrics"]["mae"]
    assert only("Logged metrics", "A") == logged["metrics"][metrics_run.LOGGED]
    # the newest checkpoint's values (its reason's series: every_epochs alone)
    checkpoint = scraped.last("checkpoint")
    assert (checkpoint["reason"], checkpoint["step"]) == ("every_epochs", scraped.end["step"])
    assert only("Checkpoint write and stall time", "A") == checkpoint["write_seconds"]
    assert only("Checkpoint write and stall time", "B") == checkpoint["stall_seconds"]
    assert only("Checkpoint size", "A") == checkpoint["size_bytes"]
    assert 0 <= only("Since the last checkpoint", "A") < 120


@pytest.mark.slow
def test_the_metric_variable_picks_the_names_shown(scraped: Scraped) -> None:
    """One name chosen: the Metrics row's queries return its series alone, with their labels."""
    queries = [(t, r, e) for t, r, e in panel_targets(load_dashboard()) if "$metric" in e]
    assert {title for title, _, _ in queries} == {"Task metrics", "Logged metrics"}
    # (title, refId): the (name, split) of each series shown when one name is chosen
    shown: dict[str, dict[tuple[str, str], list[tuple[str, str | None]]]] = {
        "mae": {("Task metrics", "A"): [("mae", "val")], ("Task metrics", "B"): [("mae", None)]},
        metrics_run.LOGGED: {("Logged metrics", "A"): [(metrics_run.LOGGED, None)]},
    }
    for name, want in shown.items():
        values = {**scraped.values, "metric": regex_value(name)}
        for title, ref_id, expr in queries:
            result = _api(scraped.url, "query", query=substitute_variables(expr, values))["result"]
            found = [(s["metric"]["name"], s["metric"].get("split")) for s in result]
            assert found == want.get((title, ref_id), []), (name, title, ref_id)


@pytest.mark.slow
def test_the_alert_rules_use_exported_metrics_and_stay_quiet(scraped: Scraped) -> None:
    """rules.yml loads into the real Prometheus, evaluates without errors and fires nothing for a
    healthy run; every metric it names is one the run exports (promtool's unit tests cannot tell)."""
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    names = {name for rule in rules for name, _ in METRIC.findall(rule["expr"])}
    assert "traintel_run_info" in names
    instance = scraped.instance
    for name in sorted(names):
        query = f'{name}{{job="traintel", instance="{instance}"}}'
        assert _api(scraped.url, "query", query=query)["result"], f"rules.yml uses {name}; not exported"
    deadline = time.monotonic() + 30
    while True:
        (group,) = _api(scraped.url, "rules")["groups"]
        if all(rule["health"] == "ok" for rule in group["rules"]):
            break
        assert time.monotonic() < deadline, group
        time.sleep(0.5)
    assert group["name"] == "traintel"
    assert [rule["name"] for rule in group["rules"]] == [rule["alert"] for rule in rules]
    assert [rule["alerts"] for rule in group["rules"]] == [[]] * len(rules), group
