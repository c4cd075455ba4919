"""Tests of the operator files shipped in ``config/``: the Prometheus example config, its
alert rules and the Grafana dashboard.

They run the real ``promtool`` (Debian's ``prometheus`` package, which ``.ci/run``
installs): the rules and the config must pass ``promtool check``, every PromQL expression
of the dashboard must parse (checked as recording rules), and the alerts' joins must
select what they promise (``promtool test rules`` on made-up series). Every metric name the
dashboard and the rules use must be one the gateway exports (``berry_proxy.metrics``).
Without promtool these tests are skipped, except where ``BERRY_REQUIRE_PROMETHEUS=1``
makes that a failure.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR

from berry_proxy.metrics import EXPORTED_METRICS, HISTOGRAMS
from tests.conftest import required_tool

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "config" / "grafana" / "berry-proxy-dashboard.json"
ALERTS = ROOT / "config" / "prometheus" / "berry-proxy-alerts.yml"
PROMETHEUS_CONFIG = ROOT / "config" / "prometheus" / "prometheus.yml"

METRIC_NAME = re.compile(r"\b(berry_[a-z_]+|process_[a-z_]+|python_[a-z_]+|up)\b")
# Grafana's variables, replaced by what makes the expression plain PromQL again: intervals
# by durations, every template variable (only ever used in =~ matchers) by ".*".
GRAFANA_INTERVALS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
TEMPLATE_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> str:
    return required_tool(
        ("promtool", "/usr/bin/promtool"), "BERRY_REQUIRE_PROMETHEUS", "prometheus"
    )


def run_promtool(
    promtool: str, *args: str | Path, cwd: Path | None = None, context: str = ""
) -> None:
    """Run promtool and fail with its output (and ``context``) unless it exits 0."""
    command = [promtool, *map(str, args)]
    done = subprocess.run(  # noqa: S603  # a fixed program, arguments of our own
        command, cwd=cwd, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, (
        f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}\n{context}"
    )


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return dashboard


def load_alerts() -> dict[str, Any]:
    rules: dict[str, Any] = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return rules


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside (collapsed) rows included."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel."""
    return [
        (panel["title"], target["expr"])
        for panel in iter_panels(load_dashboard()["panels"])
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def alert_rules() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for group in load_alerts()["groups"] for rule in group["rules"]}


def plain_promql(expr: str) -> str:
    """``expr`` with Grafana's variables substituted, as Prometheus itself would read it."""
    for variable, value in GRAFANA_INTERVALS.items():
        expr = expr.replace(variable, value)
    return TEMPLATE_VARIABLE.sub(".*", expr)


def default_metric_names() -> set[str]:
    """What prometheus_client's process, platform and GC collectors export (as samples)."""
    names: set[str] = set()
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        for family in collector.collect():
            names.update(sample.name for sample in family.samples)
    return names


def allowed_metric_names() -> set[str]:
    histogram_series = {
        f"{family.name}{suffix}"
        for family in HISTOGRAMS
        for suffix in ("_bucket", "_sum", "_count")
    }
    return set(EXPORTED_METRICS) | histogram_series | default_metric_names() | {"up"}


# --------------------------------------------------------------------------------------
# promtool
# --------------------------------------------------------------------------------------


def test_alert_rules_pass_promtool(promtool: str) -> None:
    run_promtool(promtool, "check", "rules", ALERTS)


def test_prometheus_config_passes_promtool(promtool: str, tmp_path: Path) -> None:
    # In a directory of its own with the rules next to it, as the config's comment says.
    shutil.copy(PROMETHEUS_CONFIG, tmp_path / "prometheus.yml")
    shutil.copy(ALERTS, tmp_path / ALERTS.name)
    run_promtool(promtool, "check", "config", "prometheus.yml", cwd=tmp_path)


def test_prometheus_config_scrapes_the_gateway() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    assert config["rule_files"] == [ALERTS.name]
    (job,) = (job for job in config["scrape_configs"] if job["job_name"] == "berry-proxy")
    assert job["metrics_path"] == "/prometheus"
    assert job["scrape_interval"] == "15s"
    assert job["static_configs"] == [{"targets": ["127.0.0.1:3000"]}]
    text = PROMETHEUS_CONFIG.read_text(encoding="utf-8")
    assert "public_status: false" in text
    assert "credentials_file:" in text


def test_every_dashboard_expression_parses(promtool: str, tmp_path: Path) -> None:
    expressions = dashboard_expressions()
    assert expressions
    rules, legend = [], []
    for number, (title, expr) in enumerate(expressions):
        plain = plain_promql(expr)
        assert "$" not in plain, f"{title!r}: a Grafana variable is left in {plain!r}"
        rules.append({"record": f"dashboard:expression_{number}", "expr": plain})
        legend.append(f"dashboard:expression_{number} is in panel {title!r}: {plain}")
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_promtool(promtool, "check", "rules", path, context="\n".join(legend))


def test_alerts_select_what_they_promise(promtool: str, tmp_path: Path) -> None:
    """The alerts' expressions on made-up series: the joins and guards select the right
    models (evaluated as expressions, so the test does not restate the annotations)."""
    alerts = alert_rules()
    shutil.copy(ALERTS, tmp_path / ALERTS.name)
    job = 'job="berry-proxy", instance="a"'
    chat = f'{job}, route="/v1/chat/completions", user="u"'

    def weight(model: str, provider: str, backend_model: str) -> str:
        labels = f'model="{model}", provider="{provider}", backend_model="{backend_model}"'
        return f"berry_backend_effective_weight{{{job}, {labels}}}"

    series = {
        # gpt: both backends unhealthy, one still drawable (failed probe); mini: healthy.
        weight("gpt", "p1", "gpt-4o"): "0x15",
        weight("gpt", "p2", "gpt-4o"): "0.5x15",
        weight("mini", "p2", "gpt-4o"): "0.5x15",
        weight("mini", "p1", "mini-x"): "1x15",
        # dead: its only backend's breaker is open.
        weight("dead", "p3", "x"): "0x15",
        f'berry_backend_healthy{{{job}, provider="p1", model="gpt-4o"}}': "0x15",
        f'berry_backend_healthy{{{job}, provider="p2", model="gpt-4o"}}': "0x15",
        f'berry_backend_healthy{{{job}, provider="p1", model="mini-x"}}': "1x15",
        f'berry_backend_healthy{{{job}, provider="p3", model="x"}}': "0x15",
        # Half of the answers are 5xx: for gpt (30 in 5m), and mini (too few to alert on).
        f'berry_requests_total{{{chat}, model="gpt", status="200"}}': "0+3x15",
        f'berry_requests_total{{{chat}, model="gpt", status="502"}}': "0+3x15",
        f'berry_requests_total{{{chat}, model="mini", status="200"}}': "0+0.1x15",
        f'berry_requests_total{{{chat}, model="mini", status="503"}}': "0+0.1x15",
    }
    expected = {
        "BerryProxyModelNoHealthyBackend": [
            {"labels": f'{{{job}, model="gpt"}}', "value": 0},
            {"labels": f'{{{job}, model="dead"}}', "value": 0},
        ],
        "BerryProxyModelNoDrawableBackend": [{"labels": f'{{{job}, model="dead"}}', "value": 0}],
        "BerryProxyHighErrorRatio": [{"labels": '{job="berry-proxy", model="gpt"}', "value": 0.5}],
    }
    tests = {
        "rule_files": [ALERTS.name],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series.items()],
                "promql_expr_test": [
                    {"expr": alerts[name]["expr"], "eval_time": "10m", "exp_samples": samples}
                    for name, samples in expected.items()
                ],
            }
        ],
    }
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests))
    run_promtool(promtool, "test", "rules", "tests.yml", cwd=tmp_path)


# --------------------------------------------------------------------------------------
# Metric names
# --------------------------------------------------------------------------------------


def test_dashboard_and_alerts_name_only_exported_metrics() -> None:
    allowed = allowed_metric_names()
    uses = [(f"panel {title!r}", expr) for title, expr in dashboard_expressions()]
    uses += [(f"alert {name}", rule["expr"]) for name, rule in alert_rules().items()]
    unknown = {
        (where, name)
        for where, expr in uses
        for name in METRIC_NAME.findall(expr)
        if name not in allowed
    }
    assert not unknown, f"metrics the gateway does not export: {sorted(unknown)}"
    # The check sees the names at all (the pattern did not silently match nothing).
    assert {"berry_requests_total", "berry_circuit_breaker_state", "up"} <= {
        name for _, expr in uses for name in METRIC_NAME.findall(expr)
    }


def test_alert_rules_cover_the_operator_alerts() -> None:
    alerts = alert_rules()
    assert set(alerts) >= {
        "BerryProxyDown",
        "BerryProxyTargetMissing",
        "BerryProxyCircuitBreakerOpen",
        "BerryProxyModelNoDrawableBackend",
        "BerryProxyModelNoHealthyBackend",
        "BerryProxyHighErrorRatio",
        "BerryProxyHighOverhead",
    }
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"], name
        assert rule["annotations"]["description"], name
        assert "for" in rule, name


# --------------------------------------------------------------------------------------
# The dashboard
# --------------------------------------------------------------------------------------


def test_dashboard_panels_have_titles_and_targets() -> None:
    dashboard = load_dashboard()
    assert dashboard["panels"]
    assert dashboard["schemaVersion"] >= 36
    panels = list(iter_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel.get("title"), panel
        assert "gridPos" in panel, panel["title"]
        if panel["type"] == "row":
            continue
        targets = panel.get("targets", [])
        assert targets, f"panel {panel['title']!r} has no target"
        assert all(target.get("expr") for target in targets), panel["title"]


def test_dashboard_variables() -> None:
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("model", "provider"):
        assert variables[name]["type"] == "query"
        assert "label_values(" in variables[name]["definition"]


def datasource_references(node: Any) -> Iterator[Any]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield value
            yield from datasource_references(value)
    elif isinstance(node, list):
        for item in node:
            yield from datasource_references(item)


def test_dashboard_has_no_hard_coded_datasource() -> None:
    references = list(datasource_references(load_dashboard()))
    assert references
    for reference in references:
        uid = reference.get("uid") if isinstance(reference, dict) else reference
        assert uid is None or str(uid).startswith("$"), f"hard-coded datasource: {reference}"
