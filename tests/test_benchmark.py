"""The benchmark script runs at tiny shapes and reports its two reference workloads and five updates; the
scripts keep freed memory instead of page-faulting it in again."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_benchmark_runs_at_tiny_shapes_and_prints_the_references_and_five_updates():
    result = subprocess.run(
        [sys.executable, "tests/benchmark.py", "--tiny"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=290,
        check=True,
    )
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["name"] for row in rows] == [
        "reference_conv",
        "reference_gemm",
        "twm_update_b16",
        "twm_update_b100",
        "iris_tokenizer_b32",
        "iris_world_model_b8",
        "iris_actor_critic_b8",
    ]
    assert all(row["seconds"] > 0 and row["shape"] for row in rows)
    for row in rows[2:]:  # in units of the convolution; no official figure at tiny shapes
        assert row["conv_references"] == pytest.approx(row["seconds"] / rows[0]["seconds"], rel=0.01, abs=0.1)
        assert "vs_official" not in row


PAGE_FAULTS = """
import resource, sys, torch
sys.path.insert(0, ".")
import {script}
if {keep}:
    {script}.keep_freed_memory()
faults = []
for _ in range(12):  # a 64 MB tensor freed and allocated again; the heap settles within the first 5 rounds
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(64, 1024, 256)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del x
print(min(faults[8:]) if {keep} is False else max(faults[8:]))  # without: faults each round; with: none
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("script", ["twm", "iris"])
def test_keep_freed_memory_stops_page_faults_on_reallocation(script):
    """By default glibc unmaps a freed 64 MB tensor, and its 16,384 pages fault in again when it is allocated
    again."""
    faults = {
        keep: int(
            subprocess.run(
                [sys.executable, "-c", PAGE_FAULTS.format(script=script, keep=keep)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=100,
                check=True,
            ).stdout
        )
        for keep in (False, True)
    }
    assert faults[False] > 10_000 and faults[True] < 500, faults
