"""Run the tiny preset of both agents on the test games for several seeds, and print the results table.

    python tools/tiny_games.py --seeds 1 2 3 --workers 2     # 18 runs, two at a time, one thread each
    python tools/tiny_games.py --table-only                  # the table from docs/results/tiny/
    python tools/tiny_games.py --figure docs/tiny_games.png  # evaluation return against agent steps, from it
    python tools/tiny_games.py --scripts twm.py --results docs/results/<variant> -- --critic-lr 1e-5

Each run is `python <script> --preset tiny --env-id <game> --seed <seed>` in runs/tiny_<script>_<game>_<seed>;
its summary.json is copied to docs/results/tiny/, with the run's evaluation curve added. A run whose summary
is already there is not started again. Flags after `--` are added to every run (a variant of the preset); its
summaries go to
--results, and its runs to runs/<that folder's name>_<script>-<game>-<seed>.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS, FLAGS = ROOT / "docs" / "results" / "tiny", []  # --results and the flags after `--` replace them
GAMES = {  # id: (random, optimal), as the games' docstrings state them (checked by tests/test_games.py)
    "tests.catch:Catch-v0": (-0.50, 1.0),
    "tests.gather:Gather-v0": (0.97, 3.0),
    "tests.keydoor:KeyDoor-v0": (0.72, 3.0),
}


def result_path(script, game, seed):
    return (
        RESULTS
        / f"{script.removesuffix('.py')}_{game.split(':')[-1].removesuffix('-v0').lower()}_{seed}.json"
    )


def curve(run_dir, agent_steps):
    """[[agent step, evaluation mean], ...] from a run's TensorBoard events. The last is the final evaluation,
    placed at the run's agent steps (IRIS logs it after its training-only epochs, further along its x
    axis)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    points = [[e.step, round(e.value, 4)] for e in events.Scalars("eval/return_mean")]
    return points[:-1] + [[agent_steps, points[-1][1]]]


def run(script, game, seed):
    path = result_path(script, game, seed)
    if path.exists():
        return
    name = f"{RESULTS.name}_{path.stem.replace('_', '-')}"
    shutil.rmtree(ROOT / "runs" / name, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    command = [
        sys.executable,
        script,
        "--preset",
        "tiny",
        "--env-id",
        game,
        "--seed",
        str(seed),
        "--run-name",
        name,
        *FLAGS,
    ]
    subprocess.run(
        command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    summary = json.loads((ROOT / "runs" / name / "summary.json").read_text())
    if FLAGS:
        summary["flags"] = FLAGS
    path.write_text(
        json.dumps(summary | {"curve": curve(ROOT / "runs" / name, summary["total_timesteps"])}, indent=2)
    )
    print(path.name, json.loads(path.read_text())["eval_return_mean"], flush=True)


def table(seeds):
    lines = [
        "| game | random | optimal | bar (random + half the gap) | agent | "
        + " | ".join(f"seed {s}" for s in seeds)
        + " | minutes per run |",
        "|---" * (6 + len(seeds)) + "|",
    ]
    for game, (random_return, optimal) in GAMES.items():
        for script in ("twm.py", "iris.py"):
            found = [
                json.loads(p.read_text()) if (p := result_path(script, game, s)).exists() else None
                for s in seeds
            ]
            scores = [f"{r['eval_return_mean']:+.2f}" if r else "–" for r in found]
            minutes = [r["wall_seconds"] / 60 for r in found if r]
            spread = f"{min(minutes):.1f}–{max(minutes):.1f}" if minutes else "–"
            bar = random_return + (optimal - random_return) / 2
            lines.append(
                f"| {game.split(':')[-1]} | {random_return:+.2f} | {optimal:+.2f} | {bar:+.2f} | "
                f"{script.removesuffix('.py').upper()} | " + " | ".join(scores) + f" | {spread} |"
            )
    return "\n".join(lines)


def figure(seeds, path):
    """One panel per game: each run's evaluation return against agent steps; colour = agent, marker = seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels, axes = plt.subplots(1, len(GAMES), figsize=(4.2 * len(GAMES), 3.3))
    for ax, (game, (random_return, optimal)) in zip(axes, GAMES.items()):
        for script, color in (("twm.py", "tab:blue"), ("iris.py", "tab:orange")):
            for seed, marker in zip(seeds, "os^vD"):
                if (p := result_path(script, game, seed)).exists():
                    steps, returns = zip(*json.loads(p.read_text())["curve"])
                    ax.plot(
                        steps,
                        returns,
                        color=color,
                        marker=marker,
                        alpha=0.8,
                        label=f"{script.removesuffix('.py').upper()} seed {seed}",
                    )
        ax.axhline(random_return, color="grey", linestyle=":", label="random")
        ax.axhline(optimal, color="black", linestyle=":", label="optimal")
        ax.set(title=game.split(":")[-1], xlabel="agent steps", ylabel="evaluation return")
    axes[-1].legend(
        *axes[0].get_legend_handles_labels(), fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5)
    )
    panels.tight_layout()
    panels.savefig(path, dpi=100)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--games", nargs="+", default=list(GAMES))
    parser.add_argument("--scripts", nargs="+", default=["twm.py", "iris.py"])
    parser.add_argument("--workers", type=int, default=2, help="runs at once (each on one thread)")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument(
        "--figure", help="draw the evaluation curves of the stored results to this PNG instead"
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="the folder of the summaries")
    argv = sys.argv[1:]
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    RESULTS, FLAGS = args.results.resolve(), argv[argv.index("--") + 1 :] if "--" in argv else []
    if args.figure:
        figure(args.seeds, args.figure)
    elif not args.table_only:
        jobs = [(script, game, seed) for seed in args.seeds for game in args.games for script in args.scripts]
        with ThreadPoolExecutor(args.workers) as pool:
            list(pool.map(lambda job: run(*job), jobs))
    print(table(args.seeds))
