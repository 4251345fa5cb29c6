"""The alerting rules in docker/prometheus/rules.yml are valid and pass their promtool unit tests."""

from __future__ import annotations

import re
import subprocess

import yaml

from tests.helpers.paths import ROOT
from tests.helpers.servers import need_tool

RULES = ROOT / "docker" / "prometheus" / "rules.yml"
RULE_TESTS = ROOT / "docker" / "prometheus" / "rules.test.yml"


def _alerts() -> dict[str, dict[str, object]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    assert [g["name"] for g in groups] == ["traintel"]
    return {rule["alert"]: rule for rule in groups[0]["rules"]}


def test_the_rule_group_holds_the_documented_alerts() -> None:
    alerts = _alerts()
    assert set(alerts) == {
        "TraintelTrainingStalled",
        "TraintelCheckpointStale",
        "TraintelNonFiniteLoss",
        "TraintelSinkErrors",
        "TraintelRecordsDropped",
        "TraintelRankBehind",
        "TraintelEvalMetricRising",
        "TraintelEvalMetricFalling",
    }
    for name, rule in alerts.items():
        labels, annotations = rule["labels"], rule["annotations"]
        assert isinstance(labels, dict) and isinstance(annotations, dict), name
        assert labels["severity"] in {"info", "warning", "critical"}, name
        for key in ("summary", "description"):
            # every message names the target and the run
            assert "{{ $labels.instance }}" in annotations[key], (name, key)
            assert "{{ $labels.run_id }}" in annotations[key], (name, key)
    assert alerts["TraintelTrainingStalled"]["for"] == "1m"
    assert re.search(
        r"time\(\) - traintel_step_timestamp_seconds(\{[^}]*\})? > 600",
        str(alerts["TraintelTrainingStalled"]["expr"]),
    )
    # the newest periodic checkpoint of a live run, best checkpoints (no run resumes from one) left out
    stale = alerts["TraintelCheckpointStale"]
    assert stale["for"] == "1m"
    expr = str(stale["expr"])
    newest = r"max without\(reason\) \(traintel_checkpoint_timestamp_seconds\{[^}]*reason!=\"best\"[^}]*\}\)"
    assert re.search(rf"time\(\) - {newest} > 3600", expr)
    assert re.search(r"unless on\(job, instance\)\s+traintel_run_end_timestamp_seconds\{", expr)
    # a rank is compared with the leading rank of its run 2 minutes back, over per-rank series only
    behind = alerts["TraintelRankBehind"]
    assert behind["for"] == "5m"
    expr = str(behind["expr"])
    assert expr.count("offset 2m") == 2 and "by(run_id)" in expr
    selectors = re.findall(r"\btraintel_[a-z_]+(\{[^}]*\})", expr)
    assert len(selectors) == 8 and all('rank!=""' in matchers for matchers in selectors), selectors
    annotations = behind["annotations"]
    assert isinstance(annotations, dict)
    for key in ("summary", "description"):
        assert "{{ $labels.rank }}" in annotations[key], key


# names of evaluation metrics: where lower is better, where higher is better, neither
LOWER_IS_BETTER = ("mae", "mse", "rmse", "loss", "val_loss", "error", "top1_error", "perplexity")
HIGHER_IS_BETTER = (
    "accuracy",
    "val_accuracy",
    "acc",
    "precision",
    "recall",
    "f1",
    "auc",
    "auroc",
    "bleu",
    "r2",
)
NEITHER = ("weight_norm", "lr", "mae_std", "accuracy_delta")


def test_the_eval_metric_templates_agree_on_names_count_and_window() -> None:
    """Each rule watches one set of names in all its selectors, the built-in task's mae where lower
    is better, and no name in both; each counts 3 evaluations in one window of an hour."""
    alerts = _alerts()
    matched = {}
    for name, direction in (("TraintelEvalMetricRising", "rose"), ("TraintelEvalMetricFalling", "fell")):
        rule = alerts[name]
        expr = str(rule["expr"])
        assert "for" not in rule, name  # the windows already span the evaluations
        metrics = re.findall(r"\b(traintel_[a-z_]+)\{([^}]*)\}", expr)
        assert [m for m, _ in metrics][-1] == "traintel_run_info", name
        assert {m for m, _ in metrics[:-1]} == {"traintel_eval_metric"}, name
        matchers = {m for _, m in metrics[:-1]}
        assert len(matchers) == 1, (name, matchers)
        (matcher,) = matchers
        (pattern,) = re.findall(r'name=~"([^"]*)"', matcher)
        matched[name] = {n for n in LOWER_IS_BETTER + HIGHER_IS_BETTER + NEITHER if re.fullmatch(pattern, n)}
        assert re.findall(r"\[(\w+)\]", expr) == ["1h"] * (len(metrics) - 2), name
        assert len(re.findall(r">= 3\b", expr)) == 1, name
        annotations = rule["annotations"]
        assert isinstance(annotations, dict)
        assert (
            f"{direction} at each of its evaluations in the last hour, 3 or more"
            in annotations["description"]
        )
    assert matched == {
        "TraintelEvalMetricRising": set(LOWER_IS_BETTER),
        "TraintelEvalMetricFalling": set(HIGHER_IS_BETTER),
    }


def test_only_live_exporters_are_watched() -> None:
    """Final values pushed to a Pushgateway have no instance label and outlive their run: a stale
    step timestamp there is no stalled run, and several runs' traintel_run_info there would make
    the joins on (job, instance) many-to-many, an evaluation error for every target."""
    for name, rule in _alerts().items():
        selectors = re.findall(r"\btraintel_[a-z_]+\b(\{[^}]*\})?", str(rule["expr"]))
        assert selectors, name
        assert all('instance!=""' in matchers for matchers in selectors), (name, selectors)


def test_every_alert_is_unit_tested_firing() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())
    assert tests["rule_files"] == [RULES.name]
    fired = {
        case["alertname"] for test in tests["tests"] for case in test["alert_rule_test"] if case["exp_alerts"]
    }
    quiet = {
        case["alertname"]
        for test in tests["tests"]
        for case in test["alert_rule_test"]
        if not case["exp_alerts"]
    }
    assert fired == quiet == set(_alerts())


def test_promtool_check_rules() -> None:
    promtool = need_tool("promtool")
    result = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in result.stdout, result.stdout + result.stderr


def test_promtool_test_rules() -> None:
    promtool = need_tool("promtool")
    result = subprocess.run(
        [promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout and "FAILED" not in result.stdout, result.stdout + result.stderr
