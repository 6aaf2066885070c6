"""deploy/monitoring/: the alert rules parse and fire as their unit tests say
(``promtool check rules`` and ``promtool test rules`` when promtool is installed; always
YAML plus PromQL sanity: balanced brackets, durations, required fields)
and every series the rules and the Grafana dashboard use is one vmferry exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from controller.metrics import ControllerMetrics
from handler.metrics import HandlerMetrics
from sync_controller.main import sync_registry
from vmferry.informer import Informer

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
RULES = MONITORING / "vmferry-alerts.yaml"
RULE_TESTS = MONITORING / "vmferry-alerts.test.yaml"  # promtool's unit tests of the rules
DASHBOARD = MONITORING / "vmferry-migrations-dashboard.json"
PROMETHEUS_SERIES = {"up"}  # made by Prometheus itself for every scrape target
PROMQL_WORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "vector", "time",
}  # fmt: skip
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "info": ("_info",)}


class _NoSource:
    async def list(self, kind: str, namespace: str | None) -> tuple[list[Any], str]:
        return [], "0"


def exported_series() -> set[str]:
    """Every sample name the three daemons' registries can export."""
    vmims = Informer(_NoSource(), "VirtualMachineInstanceMigration")  # type: ignore[arg-type]
    vmis = Informer(_NoSource(), "VirtualMachineInstance")  # type: ignore[arg-type]
    manager = SimpleNamespace(progress={}, sources={})
    registries: list[CollectorRegistry] = [
        ControllerMetrics(vmims, vmis, instance="c", ready=lambda: True).registry,
        HandlerMetrics(manager, "node1").registry,  # type: ignore[arg-type]
        sync_registry(lambda: True),
    ]
    names: set[str] = set()
    for registry in registries:
        for family in registry.collect():
            names.add(family.name)
            names.update(family.name + s for s in SUFFIXES.get(family.type, ()))
            names.update(sample.name for sample in family.samples)
    return names


def series_of(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (strings, matchers, ranges, grouping
    label lists and function names taken out first)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", r" ", text)
    text = re.sub(r"\b\d+(?:\.\d+)?(?:[smhdwy]|ms)?\b", " ", text)  # numbers, durations
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function (sum, rate, histogram_quantile, ...)
        if word in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def check_brackets(expr: str) -> None:
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for ch in re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr):
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs:
            assert stack and stack.pop() == pairs[ch], f"unbalanced {ch!r} in {expr!r}"
    assert not stack, f"unclosed {stack} in {expr!r}"


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for panel in doc["panels"] for t in panel.get("targets", [])]


def test_series_of_reads_promql() -> None:
    expr = 'sum by (vmi) (max_over_time(a_b{x="y(z"}[1d])) >= 12 unless on (n) c offset 5m'
    assert series_of(expr) == {"a_b", "c"}


def test_the_rules_are_well_formed() -> None:
    if shutil.which("promtool"):
        proc = subprocess.run(
            ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        tests = subprocess.run(
            ["promtool", "test", "rules", RULE_TESTS.name],
            capture_output=True,
            text=True,
            cwd=MONITORING,
        )
        assert tests.returncode == 0, tests.stdout + tests.stderr
    names = [r["alert"] for r in rules()]
    assert len(names) == len(set(names)) >= 6
    assert {"KubeVirtVMIExcessiveMigrations", "VMCannotBeEvicted"} <= set(names)
    for rule in rules():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("info", "warning", "critical")
        assert rule["annotations"]["summary"], rule["alert"]
        check_brackets(rule["expr"])


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_every_series_used_is_exported(source: str) -> None:
    exprs = [r["expr"] for r in rules()] if source == "rules" else dashboard_exprs()
    assert exprs
    exported = exported_series() | PROMETHEUS_SERIES
    for expr in exprs:
        check_brackets(expr)
        used = series_of(expr)
        assert used, expr
        assert used <= exported, f"{sorted(used - exported)} in {expr!r} are not exported"
