"""The random policy's score under each script's final-evaluation protocol: whole games with uniformly random
actions, on the same envs, with the same seeds and game-length limits as the final evaluation of seed 1.

    python tools/random_reference.py --games Pong Breakout Boxing --out docs/results/atari_small/random.json
    python tools/random_reference.py --games tests.gather:Gather-v0 --episodes 1000 --scripts twm.py

A game name without `-v` is taken as `<Game>NoFrameskip-v4`. The JSON holds, per game and script, the mean,
its standard error, the episode count and the seconds taken; a game already in --out is not played again.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import iris  # noqa: E402
import twm  # noqa: E402

SCRIPTS = {"twm.py": twm, "iris.py": iris}


def random_returns(script, env_id, episodes, seed=1):
    """Returns of `episodes` whole games played by a uniform policy through the script's own evaluate()."""
    args = script.Args(env_id=env_id, seed=seed)
    env = script.make_env(args, train=False)
    num_actions = int(env.action_space.n)
    env.close()
    rng = np.random.default_rng(seed)

    def policy(frames, state=None):  # the signature of the script's policy: TWM passes stacks only
        actions = rng.integers(num_actions, size=len(frames))
        return actions if script is twm else (actions, None)

    return script.evaluate(args, policy, episodes, seed=seed + 1_000_000)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--games", nargs="+", required=True)
    parser.add_argument("--scripts", nargs="+", choices=list(SCRIPTS), default=list(SCRIPTS))
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--out", type=Path, required=True)
    flags = parser.parse_args()
    results = json.loads(flags.out.read_text()) if flags.out.exists() else {}
    for game in flags.games:
        env_id = game if "-v" in game else f"{game}NoFrameskip-v4"
        for name in flags.scripts:
            if name in results.get(env_id, {}):
                continue
            start = time.time()
            returns = random_returns(SCRIPTS[name], env_id, flags.episodes)
            results.setdefault(env_id, {})[name] = dict(
                mean=float(returns.mean()),
                standard_error=float(returns.std(ddof=1) / np.sqrt(len(returns))),
                episodes=len(returns),
                seconds=round(time.time() - start),
            )
            print(env_id, name, results[env_id][name], flush=True)
            flags.out.parent.mkdir(parents=True, exist_ok=True)
            flags.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
