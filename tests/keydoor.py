"""KeyDoor: a small pixel game for learning tests (fetch the key, then open the door; three times).

`gym.make("tests.keydoor:KeyDoor-v0")` imports this module, which registers the env. The 64x64 RGB screen
is a 4x4 grid of 16x16 cells (one cell per patch of IRIS's 4x4 token grid). The agent is a white 8x8
square in the middle of its cell; the key and the door each fill a cell, the key in orange and the door
in purple. The two colours have the same luminance (under both OpenCV's and gymnasium's greyscale
weights), so only the colour tells them apart: in greyscale they look the same. Actions: 0 up, 1 down,
2 left, 3 right; a move into the wall stays put. Stepping onto the key picks it up (it disappears);
stepping onto the door while holding it gives +1, and a new key and door appear in random cells. Without
the key the door does nothing. The episode ends at the third door, or is truncated after 60 steps.

Unlike Catch: 4 actions, episodes of up to 60 steps, three rewards per episode, colour that carries
meaning, and a state the agent must pass through (holding the key) before the reward.
Returns: a uniformly random policy scores 0.72 (standard error 0.005 over 20,000 episodes); going
straight to the key and then to the door scores the optimum, 3.0 (each trip is at most 12 steps).
"""

import gymnasium as gym
import numpy as np

SIZE, CELL, DOORS = 4, 16, 3
MOVES = ((-1, 0), (1, 0), (0, -1), (0, 1))  # up, down, left, right as (row, column) steps
AGENT, KEY, DOOR = (255, 255, 255), (200, 60, 20), (120, 66, 202)  # KEY and DOOR: equal luminance


class KeyDoor(gym.Env):
    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, render_mode=None):
        self.observation_space = gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)
        self.action_space = gym.spaces.Discrete(4)
        self.render_mode = render_mode

    def _screen(self):
        screen = np.zeros(self.observation_space.shape, np.uint8)

        def cell(y, x, margin):  # the pixels of grid cell (y, x), `margin` pixels in from its edges
            return slice(y * CELL + margin, (y + 1) * CELL - margin), slice(
                x * CELL + margin, (x + 1) * CELL - margin
            )

        screen[cell(*self.door, 0)] = DOOR
        if self.key is not None:
            screen[cell(*self.key, 0)] = KEY
        screen[cell(*self.agent, 4)] = AGENT
        return screen

    def _new_key_and_door(self):
        cells = [(y, x) for y in range(SIZE) for x in range(SIZE) if (y, x) != self.agent]
        key, door = self.np_random.choice(len(cells), size=2, replace=False)
        self.key, self.door = cells[key], cells[door]

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.agent, self.opened = tuple(int(v) for v in self.np_random.integers(SIZE, size=2)), 0
        self._new_key_and_door()
        return self._screen(), {}

    def step(self, action):
        dy, dx = MOVES[int(action)]
        self.agent = (min(max(self.agent[0] + dy, 0), SIZE - 1), min(max(self.agent[1] + dx, 0), SIZE - 1))
        reward = 0.0
        if self.agent == self.key:
            self.key = None
        elif self.agent == self.door and self.key is None:
            reward, self.opened = 1.0, self.opened + 1
            self._new_key_and_door()
        return self._screen(), reward, self.opened == DOORS, False, {}

    def render(self):
        return self._screen()


gym.register("KeyDoor-v0", entry_point=KeyDoor, max_episode_steps=60)
