"""Run one agent script over games x seeds, on this machine or on Slurm (submitit), resumable and
preemption-safe.

    python tools/sweep.py --name pong3 --script twm.py --env-ids Pong Breakout --seeds 1 2 3 \\
        --executor local --workers 2
    python tools/sweep.py --name full --script iris.py --games atari100k --seeds 1 2 3 4 5 --executor slurm \\
        --slurm-partition gpu --timeout-min 240 --gpus-per-job 1
    python tools/sweep.py --name quick --script twm.py --env-ids tests.catch:Catch-v0 --seeds 1 2 \\
        -- --preset tiny

Each (game, seed) is one job running the script as a real process in runs/<name>/<game>__<seed>. Flags after
`--` go to the script. Running the same sweep again starts nothing for a run that has its summary.json, and
resumes an unfinished one from its checkpoint (`--resume`). On Slurm a job that is preempted or reaches its
time limit forwards the signal to the script, which saves its checkpoint, and is requeued; the next start
resumes.
"""

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import submitit

ROOT = Path(__file__).resolve().parents[1]
ATARI_100K = [
    "Alien",
    "Amidar",
    "Assault",
    "Asterix",
    "BankHeist",
    "BattleZone",
    "Boxing",
    "Breakout",
    "ChopperCommand",
    "CrazyClimber",
    "DemonAttack",
    "Freeway",
    "Frostbite",
    "Gopher",
    "Hero",
    "Jamesbond",
    "Kangaroo",
    "Krull",
    "KungFuMaster",
    "MsPacman",
    "Pong",
    "PrivateEye",
    "Qbert",
    "RoadRunner",
    "Seaquest",
    "UpNDown",
]


def env_id(game):
    """`Pong` -> `PongNoFrameskip-v4`; a full gymnasium id (`ALE/Pong-v5`, `tests.catch:Catch-v0`) stays as it
    is."""
    return game if "-v" in game else f"{game}NoFrameskip-v4"


def run_folder(name, game, seed):
    """runs/<sweep>/<game>__<seed>, the game without its module and version: `Pong`, `Catch`."""
    short = game.split(":")[-1].split("/")[-1].replace("NoFrameskip", "").split("-v")[0]
    return Path("runs") / name / f"{short}__{seed}"


class Run(submitit.helpers.Checkpointable):
    """One job: the script in a child process, started fresh or resumed from the run's checkpoint. submitit
    calls `checkpoint` on preemption or time-out: the script is sent SIGTERM, saves within one update, and the
    job is requeued with the same arguments, so its next start resumes."""

    def __call__(self, script, game, seed, folder, flags):
        if (ROOT / folder / "summary.json").exists():
            return "finished before"
        if (ROOT / folder / "checkpoint.pt").exists():
            command = [sys.executable, script, "--resume", str(folder / "checkpoint.pt")]
        else:
            command = [
                sys.executable,
                script,
                "--env-id",
                env_id(game),
                "--seed",
                str(seed),
                "--run-name",
                str(folder.relative_to("runs")),
                *flags,
            ]
        # the child ignores SIGUSR2, submitit's time-out warning: it is stopped with SIGTERM instead
        self.child = subprocess.Popen(
            command, cwd=ROOT, preexec_fn=lambda: signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        )
        while self.child.poll() is None:  # not wait(), which holds a lock that checkpoint()'s wait() needs
            time.sleep(1)
        code = self.child.returncode
        if code != 0:
            raise RuntimeError(f"{' '.join(command)} exited with {code}")
        return "finished"

    def checkpoint(self, *args, **kwargs):
        child = getattr(self, "child", None)
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)
            child.wait()
        return submitit.helpers.DelayedSubmission(Run(), *args, **kwargs)


def executor(args):
    folder = ROOT / "runs" / args.name / "submitit"
    if args.executor == "local":
        # the jobs share the cores: without this each takes all of them, and torch's threads oversubscribed
        # (4 on 2 cores) make a run up to 5x slower, by chance
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, os.cpu_count() // args.workers)))
        pool = submitit.LocalExecutor(folder)
        pool.update_parameters(timeout_min=args.timeout_min, tasks_per_node=1, nodes=1)
        return pool
    pool = submitit.AutoExecutor(folder, cluster="slurm")
    pool.update_parameters(
        timeout_min=args.timeout_min,
        slurm_partition=args.slurm_partition,
        gpus_per_node=args.gpus_per_job,
        cpus_per_task=args.cpus_per_job,
        slurm_array_parallelism=args.workers,
        slurm_signal_delay_s=120,
    )
    return pool


def main(argv):
    flags = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="the sweep's folder under runs/")
    parser.add_argument("--script", required=True, choices=["twm.py", "iris.py"])
    games = parser.add_mutually_exclusive_group(required=True)
    games.add_argument(
        "--env-ids", nargs="+", help="games: `Pong` (= PongNoFrameskip-v4) or full gymnasium ids"
    )
    games.add_argument("--games", choices=["atari100k"], help="atari100k: all 26 games of the benchmark")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--executor", choices=["local", "slurm"], default="local")
    parser.add_argument(
        "--workers", type=int, default=1, help="jobs at once (local) or the Slurm array parallelism"
    )
    parser.add_argument(
        "--timeout-min", type=int, default=24 * 60, help="time limit of one job (Slurm requeues after it)"
    )
    parser.add_argument("--slurm-partition", default=None)
    parser.add_argument("--gpus-per-job", type=int, default=1)
    parser.add_argument("--cpus-per-job", type=int, default=8)
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    game_list = ATARI_100K if args.games else args.env_ids
    runs = [(game, seed, run_folder(args.name, game, seed)) for game in game_list for seed in args.seeds]
    todo = [
        (game, seed, folder) for game, seed, folder in runs if not (ROOT / folder / "summary.json").exists()
    ]
    print(
        f"{args.name}: {len(runs)} runs, {len(runs) - len(todo)} finished, {len(todo)} to start or resume",
        flush=True,
    )
    if not todo:
        return []
    pool = executor(args)
    if (
        args.executor == "slurm"
    ):  # submitted; run the same command again once they have ended, to see what is left
        with pool.batch():
            jobs = [pool.submit(Run(), args.script, game, seed, folder, flags) for game, seed, folder in todo]
        print(
            f"submitted Slurm jobs {' '.join(job.job_id for job in jobs)}; logs in runs/{args.name}/submitit/"
        )
        return jobs
    failed = []
    for first in range(
        0, len(todo), args.workers
    ):  # LocalExecutor starts every job at once: `workers` at a time
        batch = todo[first : first + args.workers]
        jobs = [pool.submit(Run(), args.script, game, seed, folder, flags) for game, seed, folder in batch]
        for (game, seed, folder), job in zip(batch, jobs):
            try:
                job.result()
            except submitit.core.utils.FailedJobError:
                failed.append(f"{folder} (log: {job.paths.stderr})")
    if failed:
        raise SystemExit(
            f"sweep.py: {len(failed)} runs did not finish: {', '.join(failed)}; run the same command "
            f"again to resume them"
        )
    return jobs


if __name__ == "__main__":
    main(sys.argv[1:])
