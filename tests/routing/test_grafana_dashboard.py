"""The Grafana board under docs/ queries only series /metrics really exports, by their labels."""

import json
import re
from pathlib import Path

from routing import metrics

BOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "cascadeflow-dashboard.json"
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def exported() -> dict[str, set[str]]:
    """Every series name /metrics can carry, with its label names."""
    series: dict[str, set[str]] = {}
    for value in vars(metrics).values():
        if not hasattr(value, "_labelnames") or not hasattr(value, "_name"):
            continue
        name, labels = value._name, set(value._labelnames)
        if value._type == "counter":
            series[name + "_total"] = labels
        elif value._type == "histogram":
            for suffix in HISTOGRAM_SUFFIXES:
                series[name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
        else:
            series[name] = labels
    for family in metrics.QueueDepth().collect():
        series[family.name] = {"queue"}
    return series


def test_every_query_names_an_exported_series_and_its_labels():
    board = json.loads(BOARD.read_text())
    series = exported()
    queries = [t["expr"] for panel in board["panels"] for t in panel["targets"]]
    assert len(queries) >= 15
    used = set()
    for query in queries:
        for name, matchers in re.findall(r"(cascadeflow_[a-z_]+)(\{[^}]*\})?", query):
            assert name in series, (name, query)
            used.add(name.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum"))
            for label in re.findall(r"([a-z_]+)\s*!?=~?", matchers):
                assert label in series[name], (label, name)
        for grouping in re.findall(r"by \(([^)]*)\)", query):
            labels = {label.strip() for label in grouping.split(",")}
            names = re.findall(r"cascadeflow_[a-z_]+", query)
            assert any(labels <= series[n] for n in names), (labels, query)
    # The board covers every family the gateway exports.
    families = {
        n.removesuffix("_total").removesuffix("_bucket").removesuffix("_count").removesuffix("_sum")
        for n in series
    }
    uncovered = {f for f in families if not any(u.removesuffix("_total") == f for u in used)}
    assert not uncovered, uncovered
