"""Tests of tools/sweep.py and tools/report.py: real sweeps of both agents on Catch with short budgets on the
local executor, the report computed from them, a second sweep that starts nothing, and a job interrupted
mid-run."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
TWM_SHORT = [
    "--preset",
    "tiny",
    "--total-timesteps",
    "520",
    "--prefill",
    "500",
    "--pretrain-obs-updates",
    "5",
    "--pretrain-dyn-updates",
    "5",
    "--pretrain-ac-updates",
    "5",
    "--eval-episodes",
    "4",
]
IRIS_SHORT = [
    "--preset",
    "tiny",
    "--total-timesteps",
    "200",
    "--epochs",
    "3",
    "--tok-start-after",
    "0",
    "--wm-start-after",
    "1",
    "--ac-start-after",
    "2",
    "--tok-steps-per-epoch",
    "2",
    "--wm-steps-per-epoch",
    "2",
    "--ac-steps-per-epoch",
    "2",
    "--eval-episodes",
    "4",
]


def sweep(name, script, *flags, seeds=("1", "2"), timeout=300):
    return subprocess.run(
        [
            sys.executable,
            "tools/sweep.py",
            "--name",
            name,
            "--script",
            script,
            "--env-ids",
            "tests.catch:Catch-v0",
            "--seeds",
            *seeds,
            "--workers",
            "2",
            "--",
            *flags,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def sweeps():
    """Two finished sweeps, TWM and IRIS, 2 seeds each on Catch."""
    names = {"twm.py": "test_sweep_twm", "iris.py": "test_sweep_iris"}
    for script, name in names.items():
        shutil.rmtree(ROOT / "runs" / name, ignore_errors=True)
        result = sweep(name, script, *(TWM_SHORT if script == "twm.py" else IRIS_SHORT))
        assert result.returncode == 0, result.stderr[-3000:]
    return names


@pytest.mark.timeout(700)
def test_sweep_writes_one_run_per_seed_and_a_second_call_starts_nothing(sweeps):
    for script, name in sweeps.items():
        for seed in (1, 2):
            summary = json.loads((ROOT / "runs" / name / f"Catch__{seed}" / "summary.json").read_text())
            assert summary["seed"] == seed and summary["env_id"] == "tests.catch:Catch-v0"
        jobs_before = sorted((ROOT / "runs" / name / "submitit").iterdir())
        again = sweep(name, script, *(TWM_SHORT if script == "twm.py" else IRIS_SHORT), timeout=60)
        assert again.returncode == 0 and "2 runs, 2 finished, 0 to start or resume" in again.stdout, (
            again.stderr[-2000:]
        )
        assert sorted((ROOT / "runs" / name / "submitit").iterdir()) == jobs_before


@pytest.mark.timeout(700)
def test_report_means_iqm_and_figures_from_the_summaries(sweeps, tmp_path):
    folders = [str(ROOT / "runs" / name) for name in sweeps.values()]
    result = subprocess.run(
        [sys.executable, "tools/report.py", *folders, "--out", str(tmp_path), "--reps", "200"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    for name in sweeps.values():
        returns = [
            json.loads((ROOT / "runs" / name / f"Catch__{s}" / "summary.json").read_text())[
                "eval_return_mean"
            ]
            for s in (1, 2)
        ]
        (row,) = report["games"][name]
        assert row["game"] == "Catch" and row["mean"] == pytest.approx(np.mean(returns))
        assert report["scores"][name] == [[r] for r in returns]  # no human score for Catch: the raw return
        assert report["aggregates"][name]["IQM"] == pytest.approx(stats.trim_mean(returns, 0.25))
        low, high = report["intervals"][name]["IQM"]
        assert low <= report["aggregates"][name]["IQM"] <= high
        assert f"| Catch | {name} | 2 |" in (tmp_path / "report.md").read_text()
    for figure in ("aggregates.png", "curves.png", "profile.png"):
        assert (tmp_path / figure).stat().st_size > 5000, figure


@pytest.mark.timeout(600)
def test_an_interrupted_job_resumes_and_ends_as_an_uninterrupted_one():
    flags = [*TWM_SHORT, "--total-timesteps", "700", "--log-every", "5"]  # 200 updates
    for name in ("test_sweep_whole", "test_sweep_cut"):
        shutil.rmtree(ROOT / "runs" / name, ignore_errors=True)
    whole = sweep("test_sweep_whole", "twm.py", *flags, seeds=("3",))
    assert whole.returncode == 0, whole.stderr[-3000:]
    cut = subprocess.Popen(
        [
            sys.executable,
            "tools/sweep.py",
            "--name",
            "test_sweep_cut",
            "--script",
            "twm.py",
            "--env-ids",
            "tests.catch:Catch-v0",
            "--seeds",
            "3",
            "--",
            *flags,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run = ROOT / "runs" / "test_sweep_cut" / "Catch__3"
    deadline = time.time() + 120
    while not list(run.glob("events.out.tfevents.*")) and time.time() < deadline:  # the script is training
        time.sleep(0.5)
    time.sleep(3)
    child = subprocess.run(
        ["pgrep", "-f", "run-name test_sweep_cut/Catch__3"], capture_output=True, text=True
    ).stdout.split()
    assert child, "the sweep's twm.py process was not found"
    subprocess.run(["kill", "-TERM", *child], check=True)  # what a preempting scheduler sends
    stdout, stderr = cut.communicate(timeout=120)
    assert cut.returncode != 0 and "run the same command again to resume" in stderr, stderr[-3000:]
    assert (run / "checkpoint.pt").exists() and not (run / "summary.json").exists()
    again = sweep("test_sweep_cut", "twm.py", *flags, seeds=("3",))
    assert again.returncode == 0 and "1 to start or resume" in again.stdout, again.stderr[-3000:]
    expected = json.loads((ROOT / "runs" / "test_sweep_whole" / "Catch__3" / "summary.json").read_text())
    got = json.loads((run / "summary.json").read_text())
    assert {k: v for k, v in got.items() if k != "wall_seconds"} == {
        k: v for k, v in expected.items() if k != "wall_seconds"
    }
