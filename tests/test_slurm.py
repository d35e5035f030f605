"""tools/sweep.py on a real Slurm: a one-node cluster here (tests/start_slurm.sh installs and starts
it when absent; that needs root, as in CI). A 2-job array of twm.py on Catch is submitted; one job is sent
SIGUSR2 mid-run, the signal Slurm sends before a time limit or preemption; submitit has the script save its
checkpoint and requeues the job, which resumes. Both runs finish, the interrupted one with the losses of a
run left alone, and a second sweep submits nothing."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
NAME = "test_slurm"
FLAGS = (
    "--preset tiny --total-timesteps 1000 --prefill 500 --pretrain-obs-updates 5 --pretrain-dyn-updates 5 "
    "--pretrain-ac-updates 5 --eval-episodes 4 --log-every 5".split()
)
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # sbatch passes it on: one thread per job, as in the direct run


@pytest.fixture(scope="module")
def slurm():
    if shutil.which("sbatch") is None and os.geteuid() != 0:
        pytest.skip("Slurm is not installed, and installing it needs root")
    started = subprocess.run(["bash", "tests/start_slurm.sh"], cwd=ROOT, capture_output=True, text=True)
    assert started.returncode == 0, started.stderr[-3000:]


def sweep():
    command = [
        *(sys.executable, "tools/sweep.py", "--name", NAME, "--script", "twm.py"),
        *("--env-ids", "tests.catch:Catch-v0", "--seeds", "1", "2", "--executor", "slurm", "--workers", "2"),
        *("--gpus-per-job", "0", "--cpus-per-job", "1", "--timeout-min", "20", "--", *FLAGS),
    ]
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def wait_for(condition, seconds, what):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"waited {seconds} s for {what}"
        time.sleep(2)


def losses(run_dir):
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = [tag for tag in events.Tags()["scalars"] if tag.startswith("losses/")]
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags}


@pytest.mark.timeout(900)
def test_a_slurm_array_sweep_survives_a_requeue_and_is_not_submitted_twice(slurm):
    shutil.rmtree(ROOT / "runs" / NAME, ignore_errors=True)
    out = sweep()
    job = out.split("submitted Slurm jobs ")[1].split(";")[0].split()[1]  # the array's second job: seed 2
    run = ROOT / "runs" / NAME / "Catch__2"
    wait_for(lambda: list(run.glob("events.out.tfevents.*")), 300, "the job of seed 2 to start")
    time.sleep(8)  # into its training
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    log = ROOT / "runs" / NAME / "submitit" / f"{job}_0_log.out"
    wait_for(lambda: "Requeued job" in log.read_text(), 120, "submitit to requeue the job")
    assert (run / "checkpoint.pt").exists() and not (run / "summary.json").exists()
    # while Slurm holds the requeued job back (about 2 minutes), the same run without interruption
    direct = ROOT / "runs" / f"{NAME}_direct"
    shutil.rmtree(direct, ignore_errors=True)
    command = [sys.executable, "twm.py", "--env-id", "tests.catch:Catch-v0", "--seed", "2", *FLAGS]
    subprocess.run([*command, "--run-name", direct.name], cwd=ROOT, env=ENV, check=True, timeout=300)
    for seed in (1, 2):
        summary = ROOT / "runs" / NAME / f"Catch__{seed}" / "summary.json"
        wait_for(summary.exists, 420, f"the run of seed {seed} to finish")
        assert json.loads(summary.read_text())["total_timesteps"] == 1000
    assert losses(run) == losses(direct) and len(losses(run)["losses/actor"]) == 100
    submitted = sorted((ROOT / "runs" / NAME / "submitit").glob("*_submitted.pkl"))
    assert "2 runs, 2 finished, 0 to start or resume" in sweep()
    assert sorted((ROOT / "runs" / NAME / "submitit").glob("*_submitted.pkl")) == submitted
