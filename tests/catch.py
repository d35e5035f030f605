"""Catch: a tiny pixel game for learning tests (a ball falls, the paddle at the bottom must be under it).

`gym.make("tests.catch:Catch-v0")` imports this module, which registers the env. The 64x64 RGB screen has 8
rows of 8 pixels and 4 columns of 16 pixels (one column per 16x16 patch of IRIS's 4x4 token grid): the ball
starts in a random column of the top row and falls one row per step; the paddle starts in a random column of
the bottom row and moves left, stays or moves right. After 7 steps the ball reaches the bottom row: +1 if the
paddle is under it, -1 otherwise, and the episode ends. The optimum is +1 per episode (every column is
reachable in time); a uniformly random policy scores -0.50 (standard error 0.006 over 20,000 episodes).
"""

import gymnasium as gym
import numpy as np

ROWS, COLUMNS, CELL_H, CELL_W = 8, 4, 8, 16


class Catch(gym.Env):
    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, render_mode=None):
        self.observation_space = gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)
        self.action_space = gym.spaces.Discrete(3)  # 0: stay, 1: left, 2: right
        self.render_mode = render_mode

    def _screen(self):
        screen = np.zeros(self.observation_space.shape, np.uint8)
        ball_y, ball_x = self.ball
        screen[ball_y * CELL_H : (ball_y + 1) * CELL_H, ball_x * CELL_W : (ball_x + 1) * CELL_W] = (
            255,
            255,
            255,
        )
        screen[(ROWS - 1) * CELL_H :, self.paddle * CELL_W : (self.paddle + 1) * CELL_W] = (255, 160, 0)
        return screen

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.ball = (0, int(self.np_random.integers(COLUMNS)))
        self.paddle = int(self.np_random.integers(COLUMNS))
        return self._screen(), {}

    def step(self, action):
        move = (0, -1, 1)[int(action)]
        self.paddle = min(max(self.paddle + move, 0), COLUMNS - 1)
        self.ball = (self.ball[0] + 1, self.ball[1])
        terminated = self.ball[0] == ROWS - 1
        reward = float(terminated) * (1.0 if self.paddle == self.ball[1] else -1.0)
        return self._screen(), reward, terminated, False, {}

    def render(self):
        return self._screen()


gym.register("Catch-v0", entry_point=Catch, max_episode_steps=100)
