"""Metrics: one module, base units, bounded labels, documented names."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import REGISTRY

from serving import metrics

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_metric_is_documented_in_the_readme_under_its_scraped_name() -> None:
    text = README.read_text()
    missing = [m.name for m in metrics.ALL if f"ray_{m.name.removesuffix('_total')}" not in text]
    assert missing == []


def test_names_follow_prometheus_conventions() -> None:
    for m in metrics.ALL:
        assert m.name.startswith("serving_")
        assert (m.kind == "counter") == m.name.endswith("_total"), m.name
        if m.kind == "histogram":
            assert m.name.endswith("_seconds"), m.name
        assert not {"request_id", "id", "path"} & set(m.labels), m.name


def test_the_in_process_backend_records_with_labels() -> None:
    before = REGISTRY.get_sample_value("serving_swaps_total", {"model": "unit-m"}) or 0.0
    metrics.SWAPS.inc(model="unit-m")
    metrics.REQUEST_SECONDS.observe(0.02, model="unit-m", version="3", role="canary")
    assert REGISTRY.get_sample_value("serving_swaps_total", {"model": "unit-m"}) == before + 1
    count = REGISTRY.get_sample_value(
        "serving_request_duration_seconds_count", {"model": "unit-m", "version": "3", "role": "canary"}
    )
    assert count == 1


def test_exported_names_include_histogram_series_with_the_ray_prefix() -> None:
    names = metrics.exported_names()
    assert "ray_serving_request_duration_seconds_bucket" in names
    assert "ray_serving_requests_total" in names
    assert "serving_requests_total" in metrics.exported_names(prefix="")
