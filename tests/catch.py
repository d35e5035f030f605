"""Catch: a tiny pixel game for learning tests (a ball falls, the paddle at the bottom must be under it).

`gym.make("tests.catch:Catch-v0")` imports this module, which registers the env. The 64x64 RGB screen
is an 8x8 grid of 8-pixel cells: the ball starts in a random column of the top row and falls one row
per step; the paddle starts in a random column of the bottom row and moves left, stays or moves right.
After 7 steps the ball reaches the bottom row: +1 if the paddle is under it, -1 otherwise, and the
episode ends. The optimum is +1 per episode; a uniformly random policy scores about -0.6.
"""

import gymnasium as gym
import numpy as np

GRID, CELL = 8, 8


class Catch(gym.Env):
    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, render_mode=None):
        self.observation_space = gym.spaces.Box(0, 255, (GRID * CELL, GRID * CELL, 3), np.uint8)
        self.action_space = gym.spaces.Discrete(3)  # 0: stay, 1: left, 2: right
        self.render_mode = render_mode

    def _screen(self):
        screen = np.zeros(self.observation_space.shape, np.uint8)
        ball_y, ball_x = self.ball
        screen[ball_y * CELL:(ball_y + 1) * CELL, ball_x * CELL:(ball_x + 1) * CELL] = (255, 255, 255)
        paddle_y = (GRID - 1) * CELL
        screen[paddle_y:, self.paddle * CELL:(self.paddle + 1) * CELL] = (255, 160, 0)
        return screen

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.ball = (0, int(self.np_random.integers(GRID)))
        self.paddle = int(self.np_random.integers(GRID))
        return self._screen(), {}

    def step(self, action):
        move = (0, -1, 1)[int(action)]
        self.paddle = min(max(self.paddle + move, 0), GRID - 1)
        self.ball = (self.ball[0] + 1, self.ball[1])
        terminated = self.ball[0] == GRID - 1
        reward = float(terminated) * (1.0 if self.paddle == self.ball[1] else -1.0)
        return self._screen(), reward, terminated, False, {}

    def render(self):
        return self._screen()


gym.register("Catch-v0", entry_point=Catch, max_episode_steps=100)
