"""Gather: a small pixel game for learning tests (walk a 4x4 grid to three goals in turn).

`gym.make("tests.gather:Gather-v0")` imports this module, which registers the env. The 64x64 RGB screen
is a 4x4 grid of 16x16 cells (one cell per patch of IRIS's 4x4 token grid). The agent is a white 8x8
square in the middle of its cell; the goal fills a cell in yellow. Actions: 0 up, 1 down, 2 left,
3 right; a move into the wall stays put. Stepping onto the goal gives +1 and a new goal appears in a
random other cell. The episode ends after the third goal, or is truncated after 30 steps.

Unlike Catch: 4 actions, episodes of up to 30 steps, three rewards per episode, and the agent must
walk to places it cannot see the way to in one step.
Returns: a uniformly random policy scores 0.97 (standard error 0.007 over 20,000 episodes); walking
straight to each goal scores the optimum, 3.0 (no three goals are more than 18 steps apart).
"""

import gymnasium as gym
import numpy as np

SIZE, CELL, GOALS = 4, 16, 3
MOVES = ((-1, 0), (1, 0), (0, -1), (0, 1))  # up, down, left, right as (row, column) steps
AGENT, GOAL = (255, 255, 255), (255, 200, 0)


class Gather(gym.Env):
    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, render_mode=None):
        self.observation_space = gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)
        self.action_space = gym.spaces.Discrete(4)
        self.render_mode = render_mode

    def _screen(self):
        screen = np.zeros(self.observation_space.shape, np.uint8)
        (goal_y, goal_x), (y, x) = self.goal, self.agent
        screen[goal_y * CELL : (goal_y + 1) * CELL, goal_x * CELL : (goal_x + 1) * CELL] = GOAL
        screen[y * CELL + 4 : (y + 1) * CELL - 4, x * CELL + 4 : (x + 1) * CELL - 4] = AGENT
        return screen

    def _new_goal(self):
        cells = [(y, x) for y in range(SIZE) for x in range(SIZE) if (y, x) != self.agent]
        self.goal = cells[int(self.np_random.integers(len(cells)))]

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.agent, self.reached = tuple(int(v) for v in self.np_random.integers(SIZE, size=2)), 0
        self._new_goal()
        return self._screen(), {}

    def step(self, action):
        dy, dx = MOVES[int(action)]
        self.agent = (min(max(self.agent[0] + dy, 0), SIZE - 1), min(max(self.agent[1] + dx, 0), SIZE - 1))
        reward = float(self.agent == self.goal)
        if reward:
            self.reached += 1
            self._new_goal()
        return self._screen(), reward, self.reached == GOALS, False, {}

    def render(self):
        return self._screen()


gym.register("Gather-v0", entry_point=Gather, max_episode_steps=30)
