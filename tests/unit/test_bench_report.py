"""bench.report on synthetic records: ratios, targets and the files `make bench` writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import report


def _records() -> list[dict[str, object]]:
    return [
        report.record("a", "ours", requests_per_s=300.0, rows_per_s=None, p50_ms=2.0, p99_ms=10.0),
        report.record("a", "mlserver", requests_per_s=200.0, rows_per_s=None, p50_ms=3.0, p99_ms=20.0),
        report.record("b", "ours", requests_per_s=10.0, rows_per_s=10_000.0, p50_ms=50.0, p99_ms=80.0),
        report.record("b", "in-process", requests_per_s=100.0, rows_per_s=100_000.0, p50_ms=5.0, p99_ms=6.0),
        report.record("c", "peer-only", requests_per_s=1.0, rows_per_s=None, p50_ms=1.0, p99_ms=1.0),
    ]


def test_ratios_are_ours_over_each_peer_on_rows_when_both_have_rows() -> None:
    got = {(r["workload"], r["peer"]): r for r in report.ratios(_records())}
    assert set(got) == {("a", "mlserver"), ("b", "in-process")}
    assert got[("a", "mlserver")]["ratio"] == pytest.approx(1.5)
    assert got[("a", "mlserver")]["p99_ratio"] == pytest.approx(0.5)
    assert got[("b", "in-process")]["metric"] == "rows_per_s"
    assert got[("b", "in-process")]["ratio"] == pytest.approx(0.1)


def test_merge_rounds_takes_medians_and_sums_errors() -> None:
    rounds = [
        report.record("a", "ours", requests_per_s=v, rows_per_s=None, p50_ms=v, p99_ms=v, errors=1)
        for v in (1.0, 5.0, 3.0)
    ]
    merged = report.merge_rounds(rounds)
    assert merged["requests_per_s"] == 3.0
    assert merged["errors"] == 3
    assert merged["rounds"] == 3


def test_a_missed_target_says_by_how_much() -> None:
    low = report.target("x", 0.8, 1.0, higher_is_better=True, why="slow")
    high = report.target("y", 1.32, 1.2, higher_is_better=False, why="big")
    assert (low["met"], round(low["miss"], 2), low["why"]) == (False, 0.25, "slow")
    assert (high["met"], round(high["miss"], 2)) == (False, 0.1)
    assert report.target("z", None, 1.0, higher_is_better=True)["met"] is None


def test_results_are_written_as_json_markdown_and_plots(tmp_path: Path) -> None:
    records = _records()
    result = {
        "records": records,
        "ratios": report.ratios(records),
        "targets": [report.target("t", 1.5, 1.0, higher_is_better=True)],
        "swap_timeline": {"moves": [1.0], "samples": [(0.5, 0.01, 200, "1"), (1.5, 0.02, 200, "2")]},
    }
    result["plots"] = report.plot(result, tmp_path)
    report.write_json(tmp_path / "latest.json", result)
    md = report.markdown(result)
    assert json.loads((tmp_path / "latest.json").read_text())["ratios"][0]["ratio"] == pytest.approx(1.5)
    assert "| a | mlserver | requests_per_s | 1.50 | 0.50 |" in md
    assert sorted(Path(p).name for p in result["plots"]) == ["swap_latency.png", "throughput_latency.png"]
    assert all(Path(p).stat().st_size > 1000 for p in result["plots"])


def test_equal_cpu_pairs_n_of_ours_with_n_of_each_peer() -> None:
    """ours-x1 against each peer's plain name, ours-x2 against its -x2 name; anchors marked."""
    rec = report.record
    records = [
        rec("a", "ours-x1", requests_per_s=100.0, rows_per_s=None, p50_ms=1.0, p99_ms=10.0),
        rec("a", "ours-x2", requests_per_s=180.0, rows_per_s=None, p50_ms=1.0, p99_ms=12.0),
        rec("a", "kserve", requests_per_s=50.0, rows_per_s=None, p50_ms=1.0, p99_ms=20.0),
        rec("a", "kserve-x2", requests_per_s=200.0, rows_per_s=None, p50_ms=1.0, p99_ms=6.0),
        rec("a", "litserve", requests_per_s=25.0, rows_per_s=None, p50_ms=1.0, p99_ms=5.0),
        rec("b", "kserve", requests_per_s=9.0, rows_per_s=None, p50_ms=1.0, p99_ms=5.0),
    ]
    rows = {(r["n"], r["peer"]): r for r in report.equal_cpu(records, ["kserve", "litserve", "bentoml"])}
    assert set(rows) == {(1, "kserve"), (2, "kserve"), (1, "litserve")}
    assert rows[(1, "kserve")]["ratio"] == pytest.approx(2.0)
    assert rows[(2, "kserve")]["ratio"] == pytest.approx(0.9)
    assert rows[(2, "kserve")]["p99_ratio"] == pytest.approx(2.0)
    assert (rows[(1, "kserve")]["anchor"], rows[(1, "litserve")]["anchor"]) == (True, False)
    text = report.markdown({"equal_cpu": list(rows.values())})
    assert "| a | 2 | **kserve** | 180 | 200 | 0.90 |" in text
