"""The benchmark script runs at tiny shapes and reports the five measurements of the speed issue."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_benchmark_runs_at_tiny_shapes_and_prints_five_names():
    result = subprocess.run([sys.executable, "tests/benchmark.py", "--tiny"], cwd=ROOT, capture_output=True,
                            text=True, timeout=290, check=True)
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["name"] for row in rows] == ["twm_update_b16", "twm_update_b100", "iris_tokenizer_b32",
                                             "iris_world_model_b8", "iris_actor_critic_b8"]
    assert all(row["seconds"] > 0 and row["shape"] for row in rows)
