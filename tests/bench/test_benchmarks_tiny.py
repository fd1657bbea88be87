"""Every benchmark runs end to end at a tiny size and records what it promises.

These prove the benchmarks haven't rotted (real broker, executors, Aer and
WAN proxy every time); they check the JSON's structure, never a time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import bench.__main__ as entry
from bench import _report

ROOT = Path(__file__).resolve().parents[2]

MACHINE_KEYS = {"cpu", "cores", "memory_bytes", "python", "versions", "git_commit"}
VERSION_KEYS = {"qrelay", "qiskit", "qiskit-aer", "grpcio"}


def run_tiny(name: str, out: Path) -> dict[str, Any]:
    assert entry.main([name, "--tiny", "--results-dir", str(out)]) == 0
    data: dict[str, Any] = json.loads((out / f"{name}.json").read_text())
    assert (out / f"{name}.png").stat().st_size > 0
    assert data["name"] == name
    assert data["machine"].keys() >= MACHINE_KEYS
    assert data["machine"]["versions"].keys() >= VERSION_KEYS
    assert data["rows"], "a benchmark must record at least one row"
    return data


def test_echo_records_direct_and_proxied_round_trips(tmp_path: Path) -> None:
    data = run_tiny("echo", tmp_path)
    assert [r["path"] for r in data["rows"]] == ["direct", "proxy 0 ms RTT", "proxy 10 ms RTT"]
    for row in data["rows"]:
        assert {"n", "p50", "p95", "p99", "rtt_ms", "extra_p50_ms"} <= row.keys()
    assert {"direct_rtt_p50_ms", "proxy_rtt_worst_relative_error"} <= data["figures"].keys()


def test_dispatch_records_job_and_echo_percentiles_and_ratios(tmp_path: Path) -> None:
    data = run_tiny("dispatch", tmp_path)
    whats = [r["what"] for r in data["rows"]]
    assert whats == [
        "grpc echo",
        "executor pipeline alone",
        "floor: 2 echo + pipeline (p50)",
        "tiny job run->result",
    ]
    echo, pipeline, floor, job = data["rows"]
    assert job["n"] == data["parameters"]["jobs"]
    assert {"p50", "p95", "p99", "broker_running_to_finished_p50_ms"} <= job.keys()
    # The floor is its parts, exactly: two echo round trips and the pipeline's median.
    assert floor["p50"] == pytest.approx(2 * echo["p50"] + pipeline["p50"])
    assert {
        "floor_p50_over_echo_p50",
        "dispatch_p50_over_floor",
        "dispatch_p50_over_echo_p50",
        "dispatch_p99_over_echo_p50",
        "target_p50_le_3x_echo_met",
        "target_p99_le_10x_echo_met",
    } <= data["figures"].keys()


def test_transpile_cache_counts_transpilations_per_pass(tmp_path: Path) -> None:
    data = run_tiny("transpile_cache", tmp_path)
    points = data["parameters"]["points"]
    by_mode = {r["mode"]: r for r in data["rows"]}
    # Counts, not times: exact by construction of the three passes.
    assert by_mode["no cache"]["transpilations"] == points
    assert by_mode["cold"]["transpilations"] == 1
    assert by_mode["cold"]["cache_hits"] == points - 1
    assert by_mode["warm"]["transpilations"] == 0
    assert {"p50", "p95", "first_ms", "total_s"} <= by_mode["warm"].keys()
    assert "aer.speedup_warm_vs_no_cache" in data["figures"]


def test_throughput_records_load_and_queue_phases(tmp_path: Path) -> None:
    data = run_tiny("throughput", tmp_path)
    phases = {r["phase"] for r in data["rows"]}
    assert phases == {
        "closed loop",
        "closed loop, run_stream",
        "closed loop, run",
        "open loop",
        "queue depth",
    }
    assert data["parameters"]["client"] == "stream"
    closed = [r for r in data["rows"] if r["phase"] == "closed loop"]
    assert {r["executors"] for r in closed} == {1, 2}
    assert all(r["jobs_per_s"] > 0 for r in closed)
    assert [r["offered"] for r in data["rows"] if r["phase"] == "open loop"] == [
        "25% of max",
        "50% of max",
        "75% of max",
    ]
    queue = [r for r in data["rows"] if r["phase"] == "queue depth"]
    assert [r["target_queued"] for r in queue] == data["parameters"]["queue_levels"]
    assert all(r["status"] == "ok" for r in queue)
    assert all(r["broker_rss_mb"] > 0 for r in queue)
    assert {
        "max_jobs_per_s_1_executor",
        "max_jobs_per_s_2_executor",
        "p99_ms_at_half_max_rate",
        "broker_rss_mb_idle",
        "run_stream_over_run_jobs_per_s",
    } <= data["figures"].keys()


def test_hybrid_loop_runs_every_mode_or_says_why_not(tmp_path: Path) -> None:
    data = run_tiny("hybrid_loop", tmp_path)
    rtts = data["parameters"]["rtts_ms"]
    assert {(r["rtt_ms"], r["mode"]) for r in data["rows"]} == {
        (rtt, mode) for rtt in rtts for mode in ("direct", "client-loop", "session", "program")
    }
    for row in data["rows"]:
        if row["status"] == "ok":
            assert {"wall_s", "iter_p50_ms", "vs_direct", "vs_client_loop"} <= row.keys()
        else:
            assert row["status"] == "not available in this build"
    ok_modes = {r["mode"] for r in data["rows"] if r["status"] == "ok"}
    assert {"direct", "client-loop"} <= ok_modes
    # The link the client saw through the proxy is at least the configured RTT.
    for row in data["rows"]:
        assert row["link_rtt_ms"] >= row["rtt_ms"]


def test_entry_point_lists_benchmarks_and_rejects_unknown_names() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0
    for name in ("echo", "dispatch", "throughput", "transpile_cache", "hybrid_loop"):
        assert name in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "bench", "nope"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert "unknown benchmark 'nope'" in bad.stderr


def test_percentiles_interpolate_linearly_and_handle_empty_input() -> None:
    assert _report.percentiles(range(1, 11), (0, 50, 100)) == {"p0": 1.0, "p50": 5.5, "p100": 10.0}
    assert _report.median([3.0, 1.0, 2.0]) == 2.0
    empty = _report.percentiles([], (50,))
    assert empty["p50"] != empty["p50"]  # NaN
    assert _report.ratio(1.0, 0.0) != _report.ratio(1.0, 0.0)


def test_report_json_is_strict_with_nan_as_null(tmp_path: Path) -> None:
    report = _report.Report("unit", out_dir=tmp_path)
    report.add_row(mode="x", value=float("nan"), n=3)
    report.figures["missing"] = float("inf")
    path = report.write()
    data = json.loads(path.read_text())
    assert data["rows"] == [{"mode": "x", "value": None, "n": 3}]
    assert data["figures"] == {"missing": None}


@pytest.mark.parametrize("flag", ["--tiny", "--quick"])
def test_tiny_and_quick_are_the_same_flag(flag: str) -> None:
    args = _report.arg_parser("x", None).parse_args([flag])
    assert args.tiny is True


def test_long_jobs_records_list_latency_idle_and_busy_per_placement(tmp_path: Path) -> None:
    data = run_tiny("long_jobs", tmp_path)
    rows = [(r["placement"], r["phase"]) for r in data["rows"]]
    assert rows == [
        ("deployed", "idle"),
        ("deployed", "2 jobs simulating"),
        ("dev", "idle"),
        ("dev", "2 jobs simulating"),
    ]
    for placement in ("deployed", "dev"):
        # Every long job finished, each on its first attempt.
        assert data["figures"][f"{placement}_jobs_done"] == 2
        assert data["figures"][f"{placement}_max_attempts"] == 1
        assert data["figures"][f"{placement}_list_p99_busy_over_idle"] > 0


def test_estimator_ideal_compares_qrelay_with_aer_estimator_in_one_run(tmp_path: Path) -> None:
    data = run_tiny("estimator_ideal", tmp_path)
    paths = ["aer EstimatorV2", "qrelay pipeline", "qrelay pipeline + client codec"]
    assert [(r["precision"], r["path"]) for r in data["rows"]] == [
        (p, name) for p in (0.0, 0.015625) for name in paths
    ]
    for row in data["rows"]:
        assert row["calls"] == data["parameters"]["calls"]
        assert {"p50", "p95", "mean", "ratio_p50_vs_aer"} <= row.keys()
    assert {
        "exact.pipeline_over_aer_p50",
        "precision_0.015625.pipeline_over_aer_p50",
        "pipeline_within_target",
    } <= data["figures"].keys()


def test_fairness_counts_a_backlogs_jobs_ahead_of_another_tenants_first(tmp_path: Path) -> None:
    data = run_tiny("fairness", tmp_path)
    assert {r["store"] for r in data["rows"]} >= {"sqlite"}
    for row in data["rows"]:
        assert row["a_backlog"] == 20
        assert row["a_jobs_seen_by_a"] == 20, "A sees exactly its own jobs"
        assert row["a_ahead_of_b"] <= row["bound"] == 2
    assert data["figures"]["all_within_one_job_per_slot"] is True
