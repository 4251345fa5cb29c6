"""The Grafana dashboard's queries, read from its JSON, and its template variables."""

from __future__ import annotations

import json
import re
from typing import Any

from tests.helpers.paths import ROOT

GRAFANA = ROOT / "docker" / "grafana"


DASHBOARD = GRAFANA / "dashboards" / "traintel.json"


RULES = ROOT / "docker" / "prometheus" / "rules.yml"


VARIABLES = {
    "job": "label_values(traintel_run_info, job)",
    "instance": 'label_values(traintel_run_info{job="$job"}, instance)',
    "run": 'label_values(traintel_run_info{job="$job", instance=~"$instance"}, run_id)',
    "rank": 'label_values(traintel_run_info{job="$job", instance=~"$instance", run_id="$run"}, rank)',
    "metric": 'label_values({__name__=~"traintel_(eval|train|user)_metric", job="$job", instance=~"$instance", '
    'rank=~"$rank"}, name)',
}


MULTI = {"instance": ".+", "rank": ".*", "metric": ".+"}
"""The variables that take several values or All, and what All puts in: every live instance (the
Pushgateway's series have none), every rank or none (a run without sinks.prometheus.per_rank),
every metric name."""


METRIC_FAMILIES = ("traintel_eval_metric", "traintel_train_metric", "traintel_user_metric")
"""The families labelled ``name`` by metric, which the ``metric`` variable picks from."""


METRIC = re.compile(r"\b((?:traintel|process)_[a-z_]+)\b(\{[^}]*\})?")


VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)\}")


def load_dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def panel_targets(dashboard: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every query of every panel."""
    return [
        (panel["title"], target["refId"], target["expr"])
        for panel in dashboard_panels(dashboard)
        for target in panel["targets"]
    ]


def substitute_variables(expr: str, values: dict[str, str]) -> str:
    """Grafana's variable interpolation for `$name` and `${name}`; an unknown name is an error."""
    return VARIABLE.sub(lambda m: values[m.group(1) or m.group(2)], expr)


def regex_value(value: str) -> str:
    """What Grafana puts in for one chosen value of a multi-value variable in a Prometheus query:
    regex metacharacters escaped by a backslash, itself doubled inside the PromQL string."""
    return re.sub(r"[$^*{}\[\]'+?.()|]", lambda m: "\\\\" + m.group(), value)


def dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside (collapsed) rows included; rows themselves are left out."""
    out = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            out.extend(panel.get("panels", []))
        else:
            out.append(panel)
    return out
