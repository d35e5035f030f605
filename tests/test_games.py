"""The test games: each docstring states a random and an optimal return; these tests play both policies and
check them."""

import re

import gymnasium as gym
import numpy as np
import pytest

import tests.catch
import tests.gather
import tests.keydoor

pytestmark = pytest.mark.timeout(120)
GAMES = {
    "tests.catch:Catch-v0": tests.catch,
    "tests.gather:Gather-v0": tests.gather,
    "tests.keydoor:KeyDoor-v0": tests.keydoor,
}


def stated_returns(module):
    """(random, optimal) as the game's docstring states them."""
    text = " ".join(module.__doc__.split())
    random_return = float(re.search(r"random policy scores (about )?(-?\d+(\.\d+)?)", text).group(2))
    optimal_return = float(re.search(r"optimum,? (is )?\+?(-?\d+(\.\d+)?)", text).group(2))
    return random_return, optimal_return


def optimal_action(game):
    """Straight to the target: the ball's column (Catch), the goal (Gather), the key and then the door
    (KeyDoor)."""
    if isinstance(game, tests.catch.Catch):
        return 0 if game.paddle == game.ball[1] else 1 if game.paddle > game.ball[1] else 2
    target = (
        game.goal
        if isinstance(game, tests.gather.Gather)
        else game.key
        if game.key is not None
        else game.door
    )
    (y, x), (target_y, target_x) = game.agent, target
    return 0 if target_y < y else 1 if target_y > y else 2 if target_x < x else 3


def play(env_id, policy, episodes, seed=0):
    env, rng, returns = gym.make(env_id), np.random.default_rng(seed), []
    for episode in range(episodes):
        env.reset(seed=seed + episode)
        done, total = False, 0.0
        while not done:
            action = rng.integers(env.action_space.n) if policy == "random" else optimal_action(env.unwrapped)
            _, reward, terminated, truncated, _ = env.step(action)
            total, done = total + reward, terminated or truncated
        returns.append(total)
    return np.array(returns)


@pytest.mark.parametrize("env_id", GAMES)
def test_random_and_optimal_returns_are_the_stated_ones(env_id):
    random_return, optimal_return = stated_returns(GAMES[env_id])
    random_play = play(env_id, "random", 5000)
    stderr = random_play.std() / np.sqrt(len(random_play))
    assert abs(random_play.mean() - random_return) < 4 * stderr + 0.01, (random_play.mean(), random_return)
    optimal_play = play(env_id, "optimal", 500)
    assert (
        optimal_play.min() == optimal_play.max() == optimal_return
    )  # the scripted policy is optimal every time


@pytest.mark.parametrize("env_id", [id for id in GAMES if id != "tests.catch:Catch-v0"])
def test_new_games_differ_from_catch(env_id):
    env = gym.make(env_id)
    assert env.action_space.n >= 4 and env.spec.max_episode_steps >= 30
    rewards = play(env_id, "optimal", 20)
    assert (rewards >= 3).all()  # several rewards per episode


def test_key_and_door_differ_only_in_colour():
    key, door = np.array(tests.keydoor.KEY), np.array(tests.keydoor.DOOR)
    for weights in ([0.299, 0.587, 0.114], [0.2125, 0.7154, 0.0721]):  # OpenCV's and gymnasium's greyscale
        assert abs(key @ weights - door @ weights) < 1.0
    assert np.abs(key - door).max() > 60


@pytest.mark.parametrize("script", ["twm.py", "iris.py"])
@pytest.mark.parametrize("env_id", list(GAMES))
def test_random_reference_tool_agrees_with_the_stated_random_return(script, env_id):
    import random_reference  # tools/random_reference.py: each script's own evaluate() with random actions

    returns = random_reference.random_returns(random_reference.SCRIPTS[script], env_id, 400)
    random_return, _ = stated_returns(GAMES[env_id])
    assert len(returns) == 400
    assert abs(returns.mean() - random_return) < 4 * returns.std() / np.sqrt(400) + 0.01, returns.mean()
