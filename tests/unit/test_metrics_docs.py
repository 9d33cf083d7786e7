"""The Grafana dashboard (docs/grafana-dashboard.json) and docs/METRICS.md against the metric
families relay and agent really export: every expression names existing metrics, every
tunnel metric has a panel and a line in the docs. (tests/e2e/test_metrics.py has a real
Prometheus evaluate every expression.)"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

from agent.metrics import AgentMetrics
from relay.data.metrics import RelayMetrics
from relay.data.registry import Registry

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"
DOC = ROOT / "docs" / "METRICS.md"
_NAME = re.compile(r"\b((?:tunnel|process)_[a-z0-9_]+)\b")


def exported() -> dict[str, str]:
    """Family name -> type, as relay and agent build them."""
    agent = SimpleNamespace(dialer=SimpleNamespace(host="relay.example", port=443), link=None,
                            config=SimpleNamespace(targets=[]))
    families = [*RelayMetrics().families(Registry("127.0.0.1")), *AgentMetrics([agent]).families()]
    return {f.name: f.kind for f in families}


def series_names() -> set[str]:
    names = set()
    for name, kind in exported().items():
        names.add(name)
        if kind == "histogram":
            names.update(name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_dashboard_is_valid_json_with_panels():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) > 10
    assert all(t["expr"].strip() for p in dashboard["panels"] for t in p.get("targets", []))


def test_every_dashboard_expression_names_exported_metrics():
    known = series_names()
    unknown = {(name, expr) for expr in dashboard_expressions() for name in _NAME.findall(expr) if name not in known}
    assert not unknown, f"the dashboard names metrics nobody exports: {sorted(unknown)}"


def test_every_tunnel_metric_has_a_panel():
    used = {name for expr in dashboard_expressions() for name in _NAME.findall(expr)}
    used |= {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}
    missing = [name for name in exported() if name.startswith("tunnel_") and name not in used]
    assert not missing, f"no panel shows {missing}"


def test_every_metric_is_documented():
    text = DOC.read_text()
    missing = [name for name in exported() if f"`{name}`" not in text]
    assert not missing, f"docs/METRICS.md does not list {missing}"
