"""The learning tests' runner, shared by tests/test_twm.py and tests/test_iris.py."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_games_together(script, tmp_path, games, timeout):
    """`script`'s tiny preset on each game at once, one thread each (as the README's results were measured);
    their summaries. Run i is runs/test_<tmp_path's name>_i."""
    runs = [f"test_{tmp_path.name}_{i}" for i in range(len(games))]
    for run in runs:
        shutil.rmtree(ROOT / "runs" / run, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    jobs = [
        subprocess.Popen(
            [sys.executable, script, "--preset", "tiny", "--env-id", game, "--run-name", run],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        for game, run in zip(games, runs)
    ]
    assert all(job.wait(timeout) == 0 for job in jobs)
    return [json.loads((ROOT / "runs" / run / "summary.json").read_text()) for run in runs]
