"""The benchmark scripts run at their smallest size (`--check`) and report what they must: the exact ranker's float32
ranks identical to the naive loop's, a recall in [0, 1], an index that holds the prepared features."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _run(script: str, tmp_path) -> tuple[str, dict]:
    output = tmp_path / f"{script}.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--check", "--device", "cpu", "--threads", "1", "--json", output],
        capture_output=True, text=True, timeout=120, env=env, cwd=BENCHMARKS.parent,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed.stdout, json.loads(output.read_text())


def test_exact_ranking_benchmark_ranks_agree_with_the_naive_loop(tmp_path):
    stdout, payload = _run("bench_exact_ranking.py", tmp_path)
    (result,) = payload["results"]
    assert result["ranks_identical"] and result["ranks_differing"] == 0
    assert result["full_ranks_identical"]  # the exact ranker without pruning too
    assert 0.0 < result["scored_fraction"] < 1.0
    assert result["entities"] == 700 and result["naive_mentions"] == result["exact_mentions"] == 12
    assert result["exact_mentions_per_s"] > 0 and result["naive_mentions_per_s"] > 0
    assert result["index_bytes"] < result["naive_host_bytes"]
    assert result["fast_index_bytes"] * 2 == result["index_bytes"]
    assert "| 700 |" in stdout and "| yes; yes |" in stdout  # the markdown table


def test_two_stage_benchmark_reports_recall(tmp_path):
    stdout, payload = _run("bench_two_stage.py", tmp_path)
    assert {r["backend"] for r in payload["results"]} == {"flat", "ivf", "hnsw"}
    for result in payload["results"]:
        assert result["k"] == 12 and result["mentions"] == 8 and result["mentions_per_s"] > 0
        assert 0.0 <= result["recall"] <= 1.0
        # The two-stage top-1 can be the exact top-1 only when that was a candidate.
        assert result["top1_agrees"] <= result["recall"] + 1e-9
    flat = next(r for r in payload["results"] if r["backend"] == "flat")
    assert flat["recall"] == flat["top1_agrees"]  # exhaustive stage 1: exactly where the candidates hold the top-1
    assert "| 600 | flat |" in stdout


def test_entity_encoding_benchmark_builds_the_index(tmp_path):
    stdout, payload = _run("bench_entity_encoding.py", tmp_path)
    (result,) = payload["results"]
    assert result["index_matches_naive_features"]
    assert result["naive_entities_per_s"] > 0 and result["index_float32_entities_per_s"] > 0
    assert result["index_bfloat16_bytes"] * 2 == result["index_float32_bytes"]
    assert "| 96 |" in stdout


def test_training_benchmark_runs_both_precisions(tmp_path):
    stdout, payload = _run("bench_training.py", tmp_path)
    assert [r["precision"] for r in payload["results"]] == ["float32", "bfloat16"]
    assert [r["variant"] for r in payload["results"]] == ["float32", "bfloat16+fused"]
    for result in payload["results"]:
        assert result["batch"] == 8 and result["steps"] == 3 and result["mentions_per_s"] > 0
        assert 0 < result["final_loss"] < 100
    assert "| float32 |" in stdout and "| bfloat16+fused |" in stdout


def test_index_memory_benchmark_counts_every_tensor(tmp_path):
    stdout, payload = _run("index_memory.py", tmp_path)
    float32, bfloat16 = payload["results"]
    assert float32["index_bytes"] == 2 * bfloat16["index_bytes"] == 1000 * 4 * sum(float32["values_per_entity"].values())
    assert float32["raw_float32_bytes"] > float32["index_bytes"]
    assert "| 1,000 | bfloat16 |" in stdout


def test_kernel_check_agrees_in_the_triton_interpreter(tmp_path):
    pytest.importorskip("triton")
    output = tmp_path / "check.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1", TRITON_INTERPRET="1")
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / "check_kernel.py"), "--check", "--device", "cpu", "--threads", "1",
         "--json", output],
        capture_output=True, text=True, timeout=300, env=env, cwd=BENCHMARKS.parent,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    results = json.loads(output.read_text())["results"]
    assert [r["dtype"] for r in results] == ["float32", "bfloat16"]
    assert all(r["agrees"] for r in results) and results[0]["ranks_equal"] == 1.0
    assert results[0]["max_abs_diff"] < 1e-4 * results[0]["score_spread"]
