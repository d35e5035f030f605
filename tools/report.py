"""Aggregate sweeps: per-game scores over seeds, rliable's aggregates with bootstrap intervals, a table,
figures.

    python tools/report.py runs/pong3 [runs/other-sweep ...] --out docs/report

Reads runs/<sweep>/<game>__<seed>/summary.json (the final evaluation) and each run's TensorBoard events
(eval/return_mean). Per game and sweep: the mean over seeds with a 95% t-interval, the random and human scores
of the Atari 100k table, the human-normalised score (HNS) and the papers' published TWM and IRIS scores. Over
games: IQM, mean, median and optimality gap of the HNS (the raw return for a game without a human score) with
stratified-bootstrap 95% intervals (rliable; Agarwal et al., 2021). Writes report.md, report.json,
aggregates.png, curves.png and profile.png to --out.
"""

import argparse
import json
import sys
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from rliable import library as rly  # noqa: E402
from rliable import metrics, plot_utils  # noqa: E402
from scipy import stats  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from twm import ATARI_100K_SCORES, human_normalized_score  # noqa: E402  (the same table is in iris.py)

warnings.filterwarnings(
    "ignore", "random_state is deprecated", FutureWarning
)  # arch, when rliable passes a seed
PUBLISHED = json.loads((Path(__file__).with_name("published_scores.json")).read_text())
AGGREGATES = ("IQM", "mean", "median", "optimality gap")


def aggregates(scores):
    """scores (runs, games) -> IQM, mean, median and optimality gap over all of them."""
    return np.array(
        [
            metrics.aggregate_iqm(scores),
            metrics.aggregate_mean(scores),
            metrics.aggregate_median(scores),
            metrics.aggregate_optimality_gap(scores),
        ]
    )


def load(sweep):
    """{game: {seed: summary}} of the finished runs of one sweep folder."""
    runs = {}
    for path in sorted(Path(sweep).glob("*__*/summary.json")):
        game, seed = path.parent.name.rsplit("__", 1)
        runs.setdefault(game, {})[int(seed)] = json.loads(path.read_text()) | {"folder": str(path.parent)}
    return runs


def normalised(summary):
    """The HNS of a run's final score, or its raw score for a game outside the Atari 100k table."""
    hns = human_normalized_score(summary["env_id"], summary["eval_return_mean"])
    return summary["eval_return_mean"] if hns is None else hns


def per_game(runs):
    """One row per game: seeds, mean, 95% t-interval half-width, random, human, HNS, published scores."""
    rows = []
    for game, by_seed in sorted(runs.items()):
        returns = np.array([by_seed[s]["eval_return_mean"] for s in sorted(by_seed)])
        half = (
            stats.t.ppf(0.975, len(returns) - 1) * returns.std(ddof=1) / np.sqrt(len(returns))
            if len(returns) > 1
            else None
        )
        random_score, human = ATARI_100K_SCORES.get(game, (None, None))
        hns = human_normalized_score(next(iter(by_seed.values()))["env_id"], returns.mean())
        rows.append(
            dict(
                game=game,
                seeds=sorted(by_seed),
                mean=float(returns.mean()),
                ci95=half,
                random=random_score,
                human=human,
                hns=hns,
                twm_paper=PUBLISHED["TWM"].get(game),
                iris_paper=PUBLISHED["IRIS"].get(game),
            )
        )
    return rows


def score_matrix(runs):
    """(seeds, games) of normalised scores over the seeds that every game has (rliable needs a full
    matrix)."""
    seeds = sorted(set.intersection(*(set(by_seed) for by_seed in runs.values())))
    return np.array([[normalised(runs[game][s]) for game in sorted(runs)] for s in seeds]), seeds


def curves(folder):
    """(steps, returns) of a run's eval/return_mean events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(folder)
    events.Reload()
    points = events.Scalars("eval/return_mean") if "eval/return_mean" in events.Tags()["scalars"] else []
    return [p.step for p in points], [p.value for p in points]


def fmt(value, digits=2):
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(sweeps, tables, estimates, intervals, seeds):
    lines = [
        "| game | sweep | seeds | mean ± 95% CI | random | human | HNS | TWM (paper) | IRIS (paper) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in sweeps:
        for row in tables[name]:
            lines.append(
                f"| {row['game']} | {name} | {len(row['seeds'])} | {fmt(row['mean'])} ± {fmt(row['ci95'])} | "
                f"{fmt(row['random'], 1)} | {fmt(row['human'], 1)} | {fmt(row['hns'], 3)} | "
                f"{fmt(row['twm_paper'], 1)} | {fmt(row['iris_paper'], 1)} |"
            )
    lines += [
        "",
        "| sweep | seeds | " + " | ".join(AGGREGATES) + " |",
        "|---|---" + "|---" * len(AGGREGATES) + "|",
    ]
    for name in sweeps:
        cells = [
            f"{estimates[name][i]:.3f} [{intervals[name][0][i]:.3f}, {intervals[name][1][i]:.3f}]"
            for i in range(len(AGGREGATES))
        ]
        lines.append(f"| {name} | {len(seeds[name])} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Aggregates over the HNS (the raw return for games without a human score), 95% stratified-bootstrap "
        "intervals in brackets; TWM and IRIS (paper): " + PUBLISHED["source"],
    ]
    return "\n".join(lines) + "\n"


def draw_curves(sweeps, all_runs, path):
    games = sorted(set().union(*(all_runs[name] for name in sweeps)))
    figure, axes = plt.subplots(1, len(games), figsize=(4 * len(games), 3.2), squeeze=False)
    for ax, game in zip(axes[0], games):
        for name in sweeps:
            for seed, summary in sorted(all_runs[name].get(game, {}).items()):
                steps, returns = curves(summary["folder"])
                steps, returns = steps + [summary["total_timesteps"]], returns + [summary["eval_return_mean"]]
                ax.plot(steps, returns, marker="o", label=f"{name} seed {seed}")
        if game in ATARI_100K_SCORES:
            ax.axhline(ATARI_100K_SCORES[game][0], color="grey", linestyle="--", label="random")
        ax.set(title=game, xlabel="agent steps", ylabel="evaluation return")
        ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", nargs="+", help="sweep folders, runs/<sweep-name>")
    parser.add_argument("--out", required=True, help="folder for report.md, report.json and the figures")
    parser.add_argument("--reps", type=int, default=2000, help="bootstrap resamples")
    args = parser.parse_args(argv)
    all_runs = {Path(sweep).name: load(sweep) for sweep in args.sweeps}
    empty = [name for name, runs in all_runs.items() if not runs]
    if empty:
        raise SystemExit(
            f"report.py: no finished run (summary.json) in {', '.join(empty)}; pass runs/<sweep-name>"
        )
    sweeps = list(all_runs)
    tables = {name: per_game(all_runs[name]) for name in sweeps}
    matrices = {name: score_matrix(all_runs[name]) for name in sweeps}
    scores, seeds = (
        {name: m for name, (m, _) in matrices.items()},
        {name: s for name, (_, s) in matrices.items()},
    )
    estimates, intervals = rly.get_interval_estimates(
        scores, aggregates, reps=args.reps, random_state=np.random.RandomState(0)
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown(sweeps, tables, estimates, intervals, seeds))
    (out / "report.json").write_text(
        json.dumps(
            dict(
                games={name: tables[name] for name in sweeps},
                seeds=seeds,
                scores={name: scores[name].tolist() for name in sweeps},
                aggregates={name: dict(zip(AGGREGATES, estimates[name].tolist())) for name in sweeps},
                intervals={
                    name: dict(zip(AGGREGATES, np.transpose(intervals[name]).tolist())) for name in sweeps
                },
            ),
            indent=2,
        )
    )
    figure, _ = plot_utils.plot_interval_estimates(
        estimates, intervals, metric_names=AGGREGATES, algorithms=sweeps, xlabel="human-normalised score"
    )
    figure.savefig(out / "aggregates.png", dpi=100, bbox_inches="tight")
    thresholds = np.linspace(0.0, max(1.0, max(float(m.max()) for m in scores.values())), 81)
    profiles, profile_cis = rly.create_performance_profile(scores, thresholds)
    figure, ax = plt.subplots(figsize=(5, 3.5))
    plot_utils.plot_performance_profiles(
        profiles,
        thresholds,
        performance_profile_cis=profile_cis,
        ax=ax,
        xlabel=r"human-normalised score $(\tau)$",
    )
    ax.legend(sweeps)
    figure.savefig(out / "profile.png", dpi=100, bbox_inches="tight")
    draw_curves(sweeps, all_runs, out / "curves.png")
    print((out / "report.md").read_text())


if __name__ == "__main__":
    main(sys.argv[1:])
