"""TWM: "Transformer-based World Models Are Happy With 100k Interactions" in one file.

Robine, Höftmann, Uelwer, Harmeling, ICLR 2023 (arXiv 2303.07109). Official code: github.com/jrobine/twm.
An observation model turns each 4-frame stack into z (32 categoricals x 32 classes); a Transformer-XL over
(z, a, r) tokens predicts the next z, the reward r̂ and the discount γ̂; an actor-critic on z alone learns
in imagination. Every default is the official code's; `# official:` comments mark where we differ.

    python twm.py --env-id PongNoFrameskip-v4                  # the paper's Atari 100k run (~10 h on an A100)
    python twm.py --preset tiny --env-id tests.catch:Catch-v0  # learns the Catch test game on a laptop CPU
    python twm.py --help                                       # every hyperparameter, with the paper's value
"""

import ctypes
import json
import math
import os
import random
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import ale_py
import cloudpickle
import cv2
import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.distributions import Categorical, OneHotCategoricalStraightThrough
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

gym.register_envs(ale_py)
SCRIPT = "twm"  # names its checkpoints, run folders and error lines
FRAME_SIZE = 64  # every frame is resized to 64x64 (the encoder and decoder shapes assume it)

@dataclass
class Args:
    """TWM (Robine et al., ICLR 2023). Defaults are the official code's; `--preset tiny` suits a CPU."""
    # --- experiment ---
    env_id: str = "PongNoFrameskip-v4"
    """any gymnasium id; ALE games get the Atari protocol, `module:Env-v0` imports `module` first"""
    seed: int = 1
    """seed of python, numpy, torch and the env"""
    total_timesteps: int = 100_000
    """agent steps in the real env (each is 4 frames on Atari), random prefill included"""
    preset: Literal["paper", "tiny"] = "paper"
    """`paper`: the official configuration; `tiny`: same algorithm, small widths and budgets (see TINY)"""
    device: str = "auto"
    """`auto` picks cuda when available, else cpu; or any torch device string"""
    run_name: Optional[str] = None
    """folder under runs/; default `<env>__twm__<seed>__<time>`"""
    torch_deterministic: bool = True
    """cudnn.deterministic and no cudnn autotuning"""
    eval_every: int = 5000
    """evaluate every this many agent steps"""
    interim_eval_episodes: int = 10
    """episodes per intermediate evaluation"""
    eval_episodes: int = 100
    """episodes of the final evaluation (the Atari 100k protocol's count)"""
    log_every: int = 100
    """write losses to TensorBoard every this many updates (each write syncs the device)"""
    save_every: int = 10_000
    """overwrite runs/<run>/checkpoint.pt every this many agent steps (0: at the end and on Ctrl-C/SIGTERM)"""
    resume: Optional[str] = None
    """a checkpoint.pt to continue, in its folder, with the flags stored in it: every other flag is ignored"""
    capture_video: bool = False
    """save the first game of the final evaluation as runs/<run>/videos/eval.mp4"""
    track: bool = False
    """also log to Weights & Biases (CleanRL's flag): the TensorBoard scalars synced, the flags as config"""
    wandb_project_name: str = "world-models"
    """the W&B project of --track"""
    wandb_entity: Optional[str] = None
    """the W&B team or user of --track (default: your own)"""
    compile: bool = False
    """torch.compile the networks (CUDA speed-up; off by default)"""
    amp: bool = False
    """bf16 autocast for the world-model and actor-critic forwards (CUDA only; off by default)"""
    # --- env protocol ---
    frame_stack: int = 4
    """frames per observation; the replay stores each frame once and stacks at sampling time"""
    noop_max: int = 30
    """up to this many no-ops after each real reset, training env only"""
    life_loss_terminal: bool = True
    """losing a life ends a training episode; the game goes on after one NOOP step (soft reset)"""
    fire_after_life_loss: bool = True
    """press FIRE at reset and after each life loss in games that have FIRE"""
    max_episode_steps: int = 27_000
    """a game is truncated after this many agent steps (108k frames)"""
    # --- observation model ---
    obs_channels: int = 48
    """base width h of the CNN encoder (h, 2h, 4h, 8h) and the transposed-CNN decoder"""
    obs_mlp_dim: int = 512
    """width of the encoder's two hidden Linear layers"""
    z_categoricals: int = 32
    """number of categorical latents in z"""
    z_classes: int = 32
    """classes per categorical latent"""
    obs_entropy_coef: float = 5.0
    """coefficient of the entropy hinge of the encoder"""
    obs_entropy_threshold: float = 0.1
    """the hinge acts when the mean entropy falls below this fraction of its maximum"""
    obs_consistency_coef: float = 0.01
    """coefficient of the cross-entropy from the detached dynamics prediction to the encoder"""
    # --- dynamics model (Transformer-XL) ---
    dyn_layers: int = 10
    """Transformer-XL layers"""
    dyn_heads: int = 4
    """attention heads"""
    dyn_head_dim: int = 64
    """width of each head"""
    dyn_embed_dim: int = 256
    """model width d"""
    dyn_ff_dim: int = 1024
    """feed-forward width"""
    dyn_dropout: float = 0.1
    """dropout on attention, outputs, feed-forward, position encodings and head hidden layers"""
    dyn_head_layers: int = 4
    """hidden layers of each prediction head"""
    dyn_z_head_dim: int = 512
    """hidden width of the next-z head"""
    dyn_head_dim_rg: int = 256
    """hidden width of the reward and discount heads"""
    dyn_reward_coef: float = 10.0
    """coefficient of the reward loss"""
    dyn_discount_coef: float = 50.0
    """coefficient of the discount loss"""
    wm_sequence_length: int = 16
    """steps per world-model training sequence (plus one context step)"""
    wm_memory_length: int = 16
    """Transformer-XL memory in steps (3 tokens each, plus 2)"""
    # --- actor-critic ---
    ac_hidden_dim: int = 512
    """width of the actor and critic MLPs"""
    ac_layers: int = 4
    """hidden layers of the actor and critic MLPs"""
    ac_horizon: int = 15
    """imagination horizon H"""
    ac_batch_size: int = 400
    """imagined trajectories per update, started from the world-model batch"""
    gamma: float = 0.99
    """discount γ (folded into the discount target 0.99(1 - terminated))"""
    lambda_: float = 0.95
    """λ of the λ-returns"""
    actor_entropy_coef: float = 0.01
    """η of the thresholded entropy penalty"""
    actor_entropy_threshold: float = 0.1
    """Γ: penalty when the mean normalised policy entropy drops below it"""
    discount_threshold: float = 0.1
    """an imagined trajectory restarts when its cumulative γ̂ drops below this"""
    # --- optimisation ---
    wm_batch_size: int = 100
    """world-model sequences per update"""
    wm_lr: float = 1e-4
    """learning rate of the observation and dynamics models"""
    actor_lr: float = 1e-4
    """learning rate of the actor"""
    critic_lr: float = 1e-5
    """learning rate of the critic"""
    adam_eps: float = 1e-5
    """Adam epsilon"""
    weight_decay: float = 1e-6
    """L2 weight decay added to the gradient (torch Adam, not AdamW)"""
    wm_grad_clip: float = 100.0
    """global gradient-norm clip of each world-model optimiser"""
    ac_grad_clip: float = 1.0
    """global gradient-norm clip of the actor and of the critic"""
    # --- replay and schedule ---
    buffer_temperature: float = 20.0
    """τ of balanced sampling: p(start) ∝ exp(-visits / τ)"""
    prefill: int = 5000
    """uniformly random agent steps before training (counted in total_timesteps)"""
    updates_per_step: float = 125_000 / 95_000
    """updates (1 world-model + 1 actor-critic step) per agent step after the prefill"""
    pretrain_obs_updates: int = 24_000
    """observation-model updates on the prefill data (batches of single stacks)"""
    pretrain_obs_batch: int = 1600
    """frame stacks per observation-model pretraining batch"""
    pretrain_dyn_updates: int = 12_000
    """dynamics updates on the prefill data with the encoder frozen"""
    pretrain_ac_updates: int = 7000
    """actor-critic updates on real latent sequences of the prefill data"""

# The tiny preset keeps every mechanism and shrinks widths, batches and budgets for a 2-core CPU: world-model
# lr x10, one frame per observation, no dropout. A 2,000-step random prefill and long pretraining (its
# dynamics part is cheap: the encoder is frozen) make the world model good before the actor-critic trains in
# it, else the actor exploits its errors; γ = 0.95 suits games of 7-60 steps (docs/tiny_games.md).
TINY = dict(total_timesteps=5000, eval_every=1000, interim_eval_episodes=20, eval_episodes=50, log_every=20,
            frame_stack=1, obs_channels=8, obs_mlp_dim=256, z_categoricals=16, z_classes=16,
            dyn_layers=2, dyn_heads=2, dyn_head_dim=32, dyn_embed_dim=64, dyn_ff_dim=256, dyn_dropout=0.0,
            dyn_head_layers=2, dyn_z_head_dim=256, dyn_head_dim_rg=64, wm_sequence_length=8,
            wm_memory_length=8, ac_hidden_dim=128, ac_layers=2, ac_horizon=10, ac_batch_size=64,
            gamma=0.95, wm_batch_size=8, wm_lr=1e-3, critic_lr=1e-3, prefill=2000, updates_per_step=1.0,
            pretrain_obs_updates=1000, pretrain_obs_batch=64, pretrain_dyn_updates=8000,
            pretrain_ac_updates=100)
PRESETS = {"paper": Args(), "tiny": Args(preset="tiny", **TINY)}
# Start-up checks: every number a flag sets must be positive, except these (flag -> what it must be).
RANGES = dict.fromkeys("seed save_every noop_max prefill wm_memory_length pretrain_obs_updates "
                       "pretrain_dyn_updates pretrain_ac_updates weight_decay obs_entropy_coef "
                       "obs_consistency_coef dyn_reward_coef dyn_discount_coef actor_entropy_coef".split(),
                       "0 or more")
RANGES |= dict.fromkeys("gamma lambda_ obs_entropy_threshold actor_entropy_threshold discount_threshold"
                        .split(), "in (0, 1]") | dict(z_classes="at least 2", dyn_dropout="in [0, 1)")
CHECKS = {"positive": lambda x: x > 0, "0 or more": lambda x: x >= 0, "at least 2": lambda x: x >= 2,
          "in (0, 1]": lambda x: 0 < x <= 1, "in [0, 1)": lambda x: 0 <= x < 1}

def fail(message):
    """Stop with one line that names the problem and the fix, never a traceback."""
    for bar in list(getattr(tqdm, "_instances", [])):  # on a line of its own, after an open progress bar
        bar.close()
    raise SystemExit(f"{SCRIPT}.py: error: {message}")

def parse_args(argv=None):
    """tyro CLI on top of a preset: `--preset tiny` picks the defaults, any other flag overrides them."""
    argv = sys.argv[1:] if argv is None else list(argv)
    presets = [arg.split("=", 1)[1] for arg in argv if arg.startswith("--preset=")]
    preset = (presets + [value for flag, value in zip(argv, argv[1:]) if flag == "--preset"] + ["paper"])[0]
    args = tyro.cli(Args, args=argv, default=PRESETS.get(preset, PRESETS["paper"]))
    for name, value in asdict(args).items():  # one line for the first wrong flag, with a value that works
        allowed = RANGES.get(name, "positive")
        if type(value) in (int, float) and not CHECKS[allowed](value):
            flag, default = "--" + re.sub(r"_(?=.)", "-", name), getattr(PRESETS[args.preset], name)
            fail(f"{flag} {value} must be {allowed}; pass for example {flag} {default} "
                 f"(the {args.preset} preset's)")
    try:  # a name torch does not know, or a device this machine lacks
        torch.empty(0, device=None if args.device == "auto" else args.device)
    except Exception:
        fail(f"--device {args.device} is not a device of this machine; pass --device auto or cpu")
    if args.run_name and (os.path.isabs(args.run_name) or ".." in re.split(r"[\\/]", args.run_name)):
        fail(f"--run-name {args.run_name} would write outside runs/; pass a name such as pong_1 or sweep/a_1")
    if args.total_timesteps <= args.prefill:
        fail(f"--total-timesteps {args.total_timesteps} must exceed --prefill {args.prefill}")
    if args.ac_batch_size > (most := args.wm_batch_size * args.wm_sequence_length):
        fail(f"--ac-batch-size {args.ac_batch_size} must be at most {most} "
             "(--wm-batch-size x --wm-sequence-length)")
    return args

def keep_freed_memory():
    """Keep freed memory mapped, else every update page-faults its activations back in (11% of CPU time)."""
    for option, value in ((-4, 0), (-1, 2**31 - 1)) if sys.platform == "linux" else ():  # glibc's mallopt
        ctypes.CDLL(None).mallopt(option, value)

# ---- Environment: the Atari 100k protocol, built from gymnasium's wrappers plus the two it lacks. --------
class FireAfterLifeLoss(gym.Wrapper):
    """Press FIRE (then action 2) at reset and FIRE after every life loss: a serve never waits (official)."""
    def reset(self, **kwargs):
        self.env.reset(**kwargs)
        self.env.step(1)
        obs, _, _, _, info = self.env.step(2)
        self.lives = self.env.unwrapped.ale.lives()
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        lives = self.env.unwrapped.ale.lives()
        if 0 < lives < self.lives and not (terminated or truncated):
            obs, fire_reward, terminated, truncated, info = self.env.step(1)
            reward += fire_reward
        self.lives = lives
        return obs, reward, terminated, truncated, info

class LifeLossSoftReset(gym.Wrapper):
    """A life loss ends the training episode, but the game goes on: the next reset() is one NOOP step."""
    game_over = True  # the first reset() is a real one
    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        lives, self.game_over = self.env.unwrapped.ale.lives(), terminated or truncated
        life_lost, self.lives = 0 < lives < self.lives, lives
        return obs, reward, terminated or life_lost, truncated, info

    def reset(self, **kwargs):
        if self.game_over:
            obs, info = self.env.reset(**kwargs)
        else:  # the NOOP's reward is dropped (official); its frame starts the new episode
            obs, _, terminated, truncated, info = self.env.step(0)
            if terminated or truncated:
                obs, info = self.env.reset(**kwargs)
        self.game_over, self.lives = False, self.env.unwrapped.ale.lives()
        return obs, info

def is_atari(env_id):
    return str(getattr(gym.registry.get(env_id), "entry_point", "")).startswith("ale_py")

def make_env(args, train):
    """One env of uint8 frames (c, 64, 64): Atari greyscale (official), other envs with their own channels."""
    ale = dict(frameskip=1, repeat_action_probability=0.0, full_action_space=False,  # not the id's defaults
               max_num_frames_per_episode=4 * args.max_episode_steps)
    try:
        env = gym.make(args.env_id, **(ale if is_atari(args.env_id) else {}))
    except (gym.error.Error, ModuleNotFoundError, ImportError) as error:
        fail(f"unknown env id '{args.env_id}' ({type(error).__name__}: {error}); use a registered gymnasium "
             f"id such as PongNoFrameskip-v4, or `module:Env-v0` for an env registered by `module`")
    if not isinstance(env.action_space, gym.spaces.Discrete):
        fail(f"env {args.env_id} has {type(env.action_space).__name__} actions; TWM needs Discrete actions")
    space = env.observation_space
    if not (isinstance(space, gym.spaces.Box) and space.dtype == np.uint8 and
            (len(space.shape) == 2 or (len(space.shape) == 3 and space.shape[-1] == 3))):
        fail(f"env '{args.env_id}' observations are {type(space).__name__} {getattr(space, 'shape', '')} "
             f"{getattr(space, 'dtype', '')}; TWM needs uint8 images (HxW or HxWx3)")
    size = (FRAME_SIZE, FRAME_SIZE)
    if is_atari(args.env_id):
        # 1. frame skip 4 with max-pool over the last 2 frames, resize (INTER_AREA), no-ops in training only
        env = gym.wrappers.AtariPreprocessing(env, noop_max=args.noop_max if train else 0, frame_skip=4,
                                              screen_size=size, grayscale_obs=True, grayscale_newaxis=True)
        env = gym.wrappers.RecordEpisodeStatistics(env)  # 2. whole games, raw rewards
        if args.fire_after_life_loss and "FIRE" in env.unwrapped.get_action_meanings():
            env = FireAfterLifeLoss(env)  # 3.
        if train and args.life_loss_terminal:
            env = LifeLossSoftReset(env)  # 4. evaluation plays whole games
    else:  # other image envs keep their channels: RGB stays RGB (colour may carry meaning), HxW one channel
        env = gym.wrappers.ResizeObservation(gym.wrappers.RecordEpisodeStatistics(env), size)
    # 5. channels first: (H, W[, C]) -> (C, H, W)
    new_space = gym.spaces.Box(0, 255, (*(env.observation_space.shape[2:] or (1,)), *size), np.uint8)
    return gym.wrappers.TransformObservation(env, lambda o: np.moveaxis(o.reshape(*size, -1), -1, 0),
                                             new_space)

# Random and human scores of the 26 Atari 100k games (SPR's table, as in both official repos).
ATARI_100K_SCORES = {
    "Alien": (227.8, 7127.7), "Amidar": (5.8, 1719.5), "Assault": (222.4, 742.0), "Asterix": (210.0, 8503.3),
    "BankHeist": (14.2, 753.1), "BattleZone": (2360.0, 37187.5), "Boxing": (0.1, 12.1),
    "Breakout": (1.7, 30.5), "ChopperCommand": (811.0, 7387.8), "CrazyClimber": (10780.5, 35829.4),
    "DemonAttack": (152.1, 1971.0), "Freeway": (0.0, 29.6), "Frostbite": (65.2, 4334.7),
    "Gopher": (257.6, 2412.5), "Hero": (1027.0, 30826.4), "Jamesbond": (29.0, 302.8),
    "Kangaroo": (52.0, 3035.0), "Krull": (1598.0, 2665.5), "KungFuMaster": (258.5, 22736.3),
    "MsPacman": (307.3, 6951.6), "Pong": (-20.7, 14.6), "PrivateEye": (24.9, 69571.3),
    "Qbert": (163.9, 13455.0), "RoadRunner": (11.5, 7845.0), "Seaquest": (68.4, 42054.7),
    "UpNDown": (533.4, 11693.2)}

def human_normalized_score(env_id, score):
    """(score - random) / (human - random) for the 26 games, else None."""
    game = re.sub(r"(NoFrameskip|Deterministic)?-v\d+$", "", env_id.split("/")[-1])
    random_score, human_score = ATARI_100K_SCORES.get(game, (None, None))
    return None if random_score is None else (score - random_score) / (human_score - random_score)

# ---- Replay: every frame stored once as uint8; 4-frame stacks are built at sampling time. ----------------
class Replay:
    """obs[i] is the frame before action[i]; reward/terminated/truncated[i] are what action[i] led to."""
    def __init__(self, capacity, frame_shape, stack, temperature, seed):
        self.frames = np.zeros((capacity + 1, *frame_shape), np.uint8)
        self.episode_start = np.zeros(capacity + 1, np.int64)  # the first frame of each frame's episode
        self.actions = np.zeros(capacity, np.int64)
        self.rewards = np.zeros(capacity, np.float32)  # tanh(r), the official reward transform
        self.terminated, self.truncated = np.zeros(capacity, bool), np.zeros(capacity, bool)
        self.visits = np.zeros(capacity, np.float64)  # how often each index was a sequence start
        self.stack, self.temperature, self.size, self.rng = stack, temperature, 0, np.random.default_rng(seed)

    def add_frame(self, frame, first):
        self.frames[self.size] = frame
        self.episode_start[self.size] = self.size if first else self.episode_start[self.size - 1]

    def add_step(self, action, reward, terminated, truncated):
        self.actions[self.size], self.rewards[self.size] = action, math.tanh(reward)
        self.terminated[self.size], self.truncated[self.size] = terminated, truncated
        self.size += 1

    def stacks(self, index):
        """Frame stacks (..., stack, H, W) at an array of indices; an episode's first frame fills the gap."""
        frame_index = index[..., None] + np.arange(1 - self.stack, 1)  # (..., stack)
        frame_index = np.maximum(frame_index, self.episode_start[index][..., None])
        return self.frames[frame_index].reshape(*index.shape, -1, *self.frames.shape[2:])

    def sample_starts(self, batch, length, balanced=True):
        """Starts without replacement, balanced (p ∝ exp(-visits / τ): new data comes first) or uniform."""
        starts, p = self.start_probabilities(length)
        chosen = self.rng.choice(starts, size=batch, replace=False, p=p if balanced else None)
        self.visits[chosen] += balanced  # + 1, or + 0 in pretraining
        return chosen

    def start_probabilities(self, length):
        """Valid starts s (reading frames s-1 .. s+length) and p(s) = softmax(-visits / τ)."""
        starts = np.arange(1, self.size - length + 1)
        logits = -self.visits[starts] / self.temperature
        p = np.exp(logits - logits.max())
        return starts, p / p.sum()

    def sequences(self, starts, length, device):
        """Stacks at s-1 .. s+length (1 context + length + 1 next) and the s-1 .. s+length-1 transitions."""
        frame_index = starts[:, None] + np.arange(-1, length + 1)
        step_index = starts[:, None] + np.arange(-1, length)
        arrays = (self.stacks(frame_index), self.actions[step_index], self.rewards[step_index],
                  self.terminated[step_index], self.truncated[step_index])
        return tuple(torch.as_tensor(array, device=device) for array in arrays)

# ---- Observation model: a CNN encoder to z (32 categoricals x 32 classes), a transposed CNN back to pixels.
def kaiming_init(module, last_gain_one):
    """Official init: Kaiming-uniform, gain √2 (SiLU counted as ReLU), zero biases; gain 1 on a last linear
    layer. Only Linear and Conv2d are matched: ConvTranspose2d keeps PyTorch's default (an official quirk)."""
    layers = [m for m in module.modules() if type(m) in (nn.Linear, nn.Conv2d)]
    for layer in layers:
        nn.init.kaiming_uniform_(layer.weight, nonlinearity="relu")
        nn.init.zeros_(layer.bias)
    if last_gain_one:
        nn.init.kaiming_uniform_(layers[-1].weight, nonlinearity="linear")

class ObservationModel(nn.Module):
    def __init__(self, args, in_channels):
        super().__init__()
        h, c, z_dim = args.obs_channels, in_channels, args.z_categoricals * args.z_classes
        self.z_shape, self.frame_shape = (args.z_categoricals, args.z_classes), (c, FRAME_SIZE, FRAME_SIZE)
        m = args.obs_mlp_dim
        self.encoder = nn.Sequential(  # 64 -> 31 -> 14 -> 6 -> 2, then (N, 8h*2*2) -> z logits
            nn.Conv2d(c, h, 4, 2), nn.SiLU(), nn.Conv2d(h, 2 * h, 4, 2), nn.SiLU(),
            nn.Conv2d(2 * h, 4 * h, 4, 2), nn.SiLU(), nn.Conv2d(4 * h, 8 * h, 4, 2), nn.SiLU(), nn.Flatten(),
            nn.Linear(32 * h, m), nn.SiLU(), nn.Linear(m, m), nn.SiLU(), nn.Linear(m, z_dim))
        self.decoder = nn.Sequential(  # z -> (N, 16h, 1, 1) -> 5 -> 13 -> 30 -> 64
            nn.Linear(z_dim, 16 * h), nn.SiLU(), nn.Unflatten(1, (16 * h, 1, 1)),
            nn.ConvTranspose2d(16 * h, 4 * h, 5, 2), nn.SiLU(), nn.ConvTranspose2d(4 * h, 2 * h, 5, 2),
            nn.SiLU(), nn.ConvTranspose2d(2 * h, h, 6, 2), nn.SiLU(), nn.ConvTranspose2d(h, c, 6, 2))
        kaiming_init(self.encoder, last_gain_one=True)
        kaiming_init(self.decoder, last_gain_one=False)
        self.to(memory_format=torch.channels_last)  # NHWC convolutions: measured 25% faster encoder on CPU

    def encode(self, obs):
        """uint8 stacks (..., c, H, W) -> log q(z|o) (..., 32, 32), normalised per categorical."""
        pixels = (obs.flatten(0, -4).float() / 255).contiguous(memory_format=torch.channels_last)
        return self.encoder(pixels).view(*obs.shape[:-3], *self.z_shape).log_softmax(-1)

    def decode(self, z):
        """z (..., 1024) -> the mean of a unit-variance Gaussian over pixels (..., c, H, W), in [0, 1]."""
        return self.decoder(z.flatten(0, -2)).view(*z.shape[:-1], *self.frame_shape)

def sample_z(log_q):
    """One-hot sample, straight-through gradients (sample + probs - sg(probs)), flattened to (..., 1024)."""
    return OneHotCategoricalStraightThrough(logits=log_q).rsample().flatten(-2)

def mode_z(log_q):
    """The most likely class of each categorical, one-hot and flattened: how the policy sees a real frame."""
    return F.one_hot(log_q.argmax(-1), log_q.shape[-1]).float().flatten(-2)

# ---- Dynamics model: a Transformer-XL over (z, a, r) tokens, read out at the action token. ---------------
def sinusoid_table(length, dim):
    """R[p, 2i] = sin(p / 10000^(2i/d)), R[p, 2i+1] = cos(...), for relative distances p = 0 .. length-1."""
    angle = torch.arange(length, dtype=torch.float32)[:, None] * 10000 ** (-torch.arange(0, dim, 2.0) / dim)
    return torch.stack([angle.sin(), angle.cos()], -1).flatten(1)  # (length, dim): sin, cos, sin, cos, ...

class RelativeSelfAttention(nn.Module):
    """Transformer-XL attention: score(i, j) = [(q_i + u)·k_j + (q_i + v)·W_r R_{i-j}] / √d (official)."""
    def __init__(self, args):
        super().__init__()
        self.heads, self.head_dim, self.dropout = args.dyn_heads, args.dyn_head_dim, args.dyn_dropout
        inner = self.heads * self.head_dim
        self.qkv = nn.Linear(args.dyn_embed_dim, 3 * inner, bias=False)
        self.pos = nn.Linear(args.dyn_embed_dim, inner, bias=False)  # W_r, one per layer
        self.out = nn.Linear(inner, args.dyn_embed_dim, bias=False)
        self.scale = args.dyn_embed_dim ** -0.5

    def forward(self, x, memory, rel_enc, u, v, allowed):
        """x (B, T, d) new tokens; memory = keys and values of the cached tokens, each (B, nh, M, hs).
        Returns (B, T, d) and the keys and values of all S = M + T tokens."""
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, 3 * self.heads, self.head_dim).transpose(1, 2)  # (B, 3 nh, T, hs)
        q, k, val = qkv.chunk(3, 1)  # each (B, nh, T, hs)
        k, val = torch.cat([memory[0], k], 2), torch.cat([memory[1], val], 2)  # (B, nh, S, hs)
        S = k.shape[2]
        r = self.pos(rel_enc[:S]).view(S, self.heads, self.head_dim).transpose(0, 1)  # (nh, S, hs): row p
        by_distance = (q + v) @ r.transpose(1, 2)  # (B, nh, T, S): column p scores distance p
        query_pos = torch.arange(S - T, S, device=x.device)[:, None]
        distance = (query_pos - torch.arange(S, device=x.device)).clamp(min=0)  # (T, S), i - j
        bias = by_distance.gather(-1, distance.expand(B, self.heads, T, S)) * self.scale
        bias = bias.masked_fill(~allowed[:, None], float("-inf")).to(q.dtype)  # the position term as a bias
        y = F.scaled_dot_product_attention(q + u, k, val, attn_mask=bias, scale=self.scale,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        return self.out(y.transpose(1, 2).reshape(B, T, -1)), (k, val)

class XLLayer(nn.Module):
    """Post-LN (official): x = LN(x + Drop(Attn(x))), then x = LN(x + Drop(FFN(x))); no final LN."""
    def __init__(self, args):
        super().__init__()
        d, p = args.dyn_embed_dim, args.dyn_dropout
        self.attn = RelativeSelfAttention(args)
        ff = args.dyn_ff_dim
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.SiLU(), nn.Dropout(p), nn.Linear(ff, d))
        self.norm1, self.norm2, self.drop = nn.LayerNorm(d), nn.LayerNorm(d), nn.Dropout(p)

    def forward(self, x, memory, rel_enc, u, v, allowed):
        attended, keys_values = self.attn(x, memory, rel_enc, u, v, allowed)
        x = self.norm1(x + self.drop(attended))
        return self.norm2(x + self.drop(self.ff(x))), keys_values

class TransformerXL(nn.Module):
    """Layers with a memory of their last `mem_len` tokens; u, v shared by all layers (official). The memory
    keeps each layer's keys and values (official: its inputs, projected again), so a step adds 3 tokens."""
    def __init__(self, args):
        super().__init__()
        d, heads, head_dim = args.dyn_embed_dim, args.dyn_heads, args.dyn_head_dim
        self.layers = nn.ModuleList(XLLayer(args) for _ in range(args.dyn_layers))
        self.u = nn.Parameter(nn.init.xavier_uniform_(torch.empty(heads, head_dim)).view(heads, 1, head_dim))
        self.v = nn.Parameter(nn.init.xavier_uniform_(torch.empty(heads, head_dim)).view(heads, 1, head_dim))
        self.mem_len = 3 * args.wm_memory_length + 2  # 50 tokens: 1 context step + 15 imagined steps fit
        max_len = max(self.mem_len + 3, 3 * (args.wm_sequence_length + 1) - 1)
        self.register_buffer("rel_enc", sinusoid_table(max_len, d), persistent=False)
        self.pos_drop, self.heads, self.head_dim = nn.Dropout(args.dyn_dropout), heads, head_dim

    def forward(self, x, eid, memory=None):
        """x (B, T, d) new tokens, episode ids eid (B, T); memory = (per-layer (keys, values), eids (B, M)).
        A token sees earlier tokens of its own episode only. Returns (B, T, d) and the updated memory."""
        if memory is None:
            empty = x.new_zeros(x.shape[0], self.heads, 0, self.head_dim)
            memory = ([(empty, empty)] * len(self.layers), eid[:, :0])
        layer_memory, memory_eid = memory
        all_eid = torch.cat([memory_eid, eid], 1)  # (B, S)
        T, S = x.shape[1], all_eid.shape[1]
        causal = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
        allowed = causal & (eid[:, :, None] == all_eid[:, None, :])  # (B, T, S): never across an episode end
        rel_enc, new_memory = self.pos_drop(self.rel_enc), []
        for layer, cached in zip(self.layers, layer_memory):
            x, (keys, values) = layer(x, cached, rel_enc, self.u, self.v, allowed)
            new_memory.append((keys[:, :, -self.mem_len:].detach(), values[:, :, -self.mem_len:].detach()))
        return x, (new_memory, all_eid[:, -self.mem_len:])

def prediction_head(d, hidden, out, layers, dropout):
    """Pre-activation MLP (official): SiLU on h first, then [Linear, SiLU, Dropout] x layers, then Linear."""
    modules, width = [nn.SiLU()], d
    for _ in range(layers):
        modules += [nn.Linear(width, hidden), nn.SiLU(), nn.Dropout(dropout)]
        width = hidden
    head = nn.Sequential(*modules, nn.Linear(width, out))
    kaiming_init(head, last_gain_one=True)
    return head

class DynamicsModel(nn.Module):
    def __init__(self, args, num_actions):
        super().__init__()
        d, z_dim = args.dyn_embed_dim, args.z_categoricals * args.z_classes
        self.z_shape = (args.z_categoricals, args.z_classes)
        self.embed_z = nn.Sequential(nn.Linear(z_dim, d), nn.SiLU())
        self.embed_a = nn.Embedding(num_actions, d)  # N(0, 1) init, as official
        self.embed_r = nn.Sequential(nn.Linear(1, d), nn.SiLU())
        kaiming_init(self.embed_z, last_gain_one=False)
        kaiming_init(self.embed_r, last_gain_one=False)
        self.transformer = TransformerXL(args)
        layers, dropout = args.dyn_head_layers, args.dyn_dropout
        self.z_head = prediction_head(d, args.dyn_z_head_dim, z_dim, layers, dropout)
        self.reward_head = prediction_head(d, args.dyn_head_dim_rg, 1, layers, dropout)
        self.discount_head = prediction_head(d, args.dyn_head_dim_rg, 1, layers, dropout)
        nn.init.constant_(self.discount_head[-1].bias, 0.99)  # official: 0.99 as a logit, so σ(0.99) ≈ 0.73

    def forward(self, z, actions, rewards, dones):
        """Training. z (B, T, 1024), actions (B, T), rewards, dones (B, T-1) -> h_k at a_k tokens (B, T, d).
        Tokens: [z0, a0, r0, z1, a1, r1, ..., z_{T-1}, a_{T-1}], so h_k has seen z_≤k, a_≤k and r_<k."""
        rewards = F.pad(rewards, (0, 1))[..., None]  # (B, T, 1): the last step has no reward token
        tokens = torch.stack([self.embed_z(z), self.embed_a(actions), self.embed_r(rewards)], 2)  # (B,T,3,d)
        step_eid = F.pad(dones.long().cumsum(1), (1, 0))  # (B, T): episode ends before each step
        h, _ = self.transformer(tokens.flatten(1, 2)[:, :-1], step_eid.repeat_interleave(3, 1)[:, :-1])
        return h[:, 1::3]

    def start(self, z, action):
        """Imagination context: the two tokens [z_{k-1}, a_{k-1}] of one real step fill the memory."""
        tokens = torch.stack([self.embed_z(z), self.embed_a(action)], 1)
        return self.transformer(tokens, torch.zeros_like(tokens[..., 0], dtype=torch.long))[1]

    def step(self, reward, z, action, reward_eid, eid, memory):
        """Imagination: feed [r_{t-1}, z_t, a_t] against the memory (3 new tokens); return h_t (B, d)."""
        tokens = torch.stack([self.embed_r(reward[:, None]), self.embed_z(z), self.embed_a(action)], 1)
        h, memory = self.transformer(tokens, torch.stack([reward_eid, eid, eid], 1), memory)
        return h[:, -1], memory

    def predict(self, h):
        """From h_t: log p(ẑ_{t+1}) (..., 32, 32), the mean reward r̂_t (...,), the logit of γ̂_t (...,)."""
        log_p = self.z_head(h).view(*h.shape[:-1], *self.z_shape).log_softmax(-1)
        return log_p, self.reward_head(h).squeeze(-1), self.discount_head(h).squeeze(-1)

# ---- Actor and critic: MLPs on z alone, so acting in the real game needs only the encoder and the actor.
def mlp(in_dim, hidden, out, layers):
    """[Linear, SiLU] x layers, then Linear; orthogonal init, gain √2 on hidden layers, 1 on the output."""
    modules, width = [], in_dim
    for _ in range(layers):
        modules += [nn.Linear(width, hidden), nn.SiLU()]
        width = hidden
    net = nn.Sequential(*modules, nn.Linear(width, out))
    for layer in net:
        if isinstance(layer, nn.Linear):
            nn.init.orthogonal_(layer.weight, math.sqrt(2) if layer is not net[-1] else 1.0)
            nn.init.zeros_(layer.bias)
    return net

# ---- Losses and returns. ---------------------------------------------------------------------------------
def observation_losses(obs_model, log_q, z, obs, args):
    """-log N(o; ô, 1) summed over all pixels (official; a per-pixel mean would shrink it 16384x) and
    averaged over stacks, plus the entropy hinge on the batch-mean entropy of q (constants dropped)."""
    decoder = 0.5 * (obs_model.decode(z) - obs.float() / 255).square().sum((-3, -2, -1)).mean()
    entropy = -(log_q.exp() * log_q).sum((-2, -1)).mean()  # H(q) summed over the categoricals
    max_entropy = args.z_categoricals * math.log(args.z_classes)
    return decoder, args.obs_entropy_coef * F.relu(args.obs_entropy_threshold - entropy / max_entropy)

def world_model_losses(obs_model, dyn, batch, args, train_encoder=True):
    """The balanced cross-entropy world-model loss on sequences of 1 context + L steps + 1 next frame.
    Dynamics terms never reach the encoder (targets and inputs detached); the consistency term never
    reaches the dynamics (its target is detached), so one backward serves both optimisers."""
    obs, actions, rewards, terminated, truncated = batch  # obs (B, L+2, c, H, W); the others (B, L+1)
    dones = terminated | truncated
    with torch.no_grad():
        z_context = sample_z(obs_model.encode(obs[:, :1]))  # (B, 1, 1024): o_{s-1}, sampled
        log_q_next = obs_model.encode(obs[:, -1:])  # target of the last prediction
    with torch.set_grad_enabled(train_encoder and torch.is_grad_enabled()):
        log_q = obs_model.encode(obs[:, 1:-1])  # (B, L, 32, 32): log q(z|o) at s .. s+L-1
        z = sample_z(log_q)
    z_in = torch.cat([z_context, z.detach()], 1)  # (B, L+1, 1024)
    log_p, reward, discount_logit = dyn.predict(dyn(z_in, actions, rewards[:, :-1], dones[:, :-1]))
    # h_k predicts z_{k+1}: from h_s .. h_{s+L-1} against q at o_{s+1} .. o_{s+L}; none across an end
    target_q = torch.cat([log_q[:, 1:], log_q_next], 1).detach().exp()
    next_z_ce = -(target_q * log_p[:, 1:]).sum((-2, -1))  # (B, L), summed over the categoricals
    valid = (~dones[:, 1:]).float()
    discount_target = args.gamma * (~terminated[:, 1:]).float()  # soft: 0.99 (1 - terminated)
    losses = dict(next_z=(next_z_ce * valid).sum() / valid.sum().clamp(min=1),
                  reward=args.dyn_reward_coef * 0.5 * (reward[:, 1:] - rewards[:, 1:]).square().mean(),
                  discount=args.dyn_discount_coef * F.binary_cross_entropy_with_logits(
                      discount_logit[:, 1:], discount_target))
    if train_encoder:
        decoder, entropy_hinge = observation_losses(obs_model, log_q, z, obs[:, 1:-1], args)
        losses.update(decoder=decoder, entropy_hinge=entropy_hinge)
        # consistency: q at o_s .. o_{s+L-1} is pulled toward the detached prediction of h_{s-1} .. h_{s+L-2}
        consistency_ce = -(log_p[:, :-1].detach().exp() * log_q).sum((-2, -1)).mean()
        losses["consistency"] = args.obs_consistency_coef * consistency_ce
    return losses, z_in.detach(), dones

def lambda_advantages(rewards, values, discounts, lambda_):
    """A_t = δ_t + λ γ'_t A_{t+1}, δ_t = r_t + γ'_t V_{t+1} - V_t, A_H = 0, so R^λ_t = A_t + V_t.
    rewards, discounts (N, H); values (N, H+1). γ' is the predicted discount: it already holds γ = 0.99."""
    deltas = rewards + discounts * values[:, 1:] - values[:, :-1]
    advantage, advantages = torch.zeros_like(values[:, 0]), []
    for t in reversed(range(rewards.shape[1])):
        advantage = deltas[:, t] + lambda_ * discounts[:, t] * advantage
        advantages.append(advantage)
    return torch.stack(advantages[::-1], 1)

def actor_critic_losses(actor, critic, rollout, args, policy_gradient=True):
    """Critic: weighted ½(V - R^λ)²; actor: REINFORCE on the pre-update advantages plus η max(0, Γ - H̄/ln A),
    a penalty only when the batch-mean normalised entropy drops below Γ. Pretraining maximises entropy."""
    z, actions, rewards, discounts, ends, weights = rollout  # z (N, H+1, 1024); the others (N, H)
    values = critic(z).squeeze(-1)  # (N, H+1)
    advantages = lambda_advantages(rewards, values.detach(), discounts * (~ends), args.lambda_)
    returns = advantages + values[:, :-1].detach()
    policy = Categorical(logits=actor(z[:, :-1]))
    entropy = (weights * policy.entropy()).mean() / math.log(policy.logits.shape[-1])
    if policy_gradient:
        actor_loss = -(weights * policy.log_prob(actions) * advantages).mean()
        actor_loss = actor_loss + args.actor_entropy_coef * F.relu(args.actor_entropy_threshold - entropy)
    else:
        actor_loss = -args.actor_entropy_coef * entropy
    critic_loss = (weights * 0.5 * (values[:, :-1] - returns).square()).mean()
    return dict(actor=actor_loss, critic=critic_loss, policy_entropy=entropy.detach())

def optimize(loss, optimizers, clip):
    """One backward, then per optimiser: clip its global gradient norm and step (official: AdamOptim)."""
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for optimizer in optimizers:
        nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], clip)
        optimizer.step()

# ---- Imagination: H steps from random windows of the world-model batch, the memory as an exact cache. ---
@torch.no_grad()
def imagine(dyn, actor, z_seq, actions, rewards, dones, args):
    """Start from N windows (z_{k-1}, a_{k-1}, r_{k-1}, z_k) of the batch (one real step of context) and roll
    out H steps feeding back r̂. When the cumulative γ̂ since a (re)start drops below the threshold, the
    trajectory ends (d_t = 1) and restarts from a random real latent; loss weights are the cumulative γ̂.
    official: restarts encode a random buffer frame; we draw a latent of the (balanced) batch, encoded."""
    B, T, _ = z_seq.shape
    pick = torch.randperm(B * (T - 1), device=z_seq.device)[:args.ac_batch_size]  # uniform, no replacement
    b, k = pick // (T - 1), pick % (T - 1) + 1
    fresh_z = z_seq.flatten(0, 1)[torch.randint(B * T, (len(pick),), device=z_seq.device)]
    memory = dyn.start(z_seq[b, k - 1], actions[b, k - 1])
    z, reward, N = z_seq[b, k], rewards[b, k - 1], len(pick)
    reward_eid = torch.zeros(N, dtype=torch.long, device=z.device)
    eid = reward_eid + dones[b, k - 1].long()  # z_k starts a new episode if the context step ended one
    cumulative, weight = torch.ones(N, device=z.device), torch.ones(N, device=z.device)
    trajectory = dict(z=[z], actions=[], rewards=[], discounts=[], ends=[], weights=[])
    for _ in range(args.ac_horizon):
        action = Categorical(logits=actor(z)).sample()
        h, memory = dyn.step(reward, z, action, reward_eid, eid, memory)
        log_p, reward, discount_logit = dyn.predict(h)
        discount = torch.sigmoid(discount_logit)
        cumulative = cumulative * discount
        end = cumulative < args.discount_threshold
        z = torch.where(end[:, None], fresh_z, sample_z(log_p))
        for key, value in zip(trajectory, (z, action, reward, discount, end, weight)):
            trajectory[key].append(value)
        weight = cumulative = torch.where(end, 1.0, cumulative)
        reward_eid, eid = eid, eid + end.long()
    return tuple(torch.stack(values, 1) for values in trajectory.values())

# ---- Acting and evaluation. ------------------------------------------------------------------------------
@torch.no_grad()
def act(obs_model, actor, stacks, device):
    """Acting needs only the encoder and the actor: z = mode of q(z|o), a ~ π(a|z), also in evaluation."""
    z = mode_z(obs_model.encode(torch.as_tensor(stacks, device=device)))
    return Categorical(logits=actor(z)).sample().cpu().numpy()

def evaluate(args, policy, episodes, seed, video=None, lockstep=16):
    """Whole games without no-ops, raw score. Up to `lockstep` envs play together and all finish before new
    ones start, so short games are not favoured (official). A list `video` gets the first game's frames."""
    returns = []
    while len(returns) < episodes:
        envs = [make_env(args, train=False) for _ in range(min(lockstep, episodes - len(returns)))]
        frames = np.stack([env.reset(seed=seed + len(returns) + i)[0] for i, env in enumerate(envs)])
        stacks = np.concatenate([frames] * args.frame_stack, 1)  # (n, stack * c, H, W)
        scores, done = np.zeros(len(envs)), np.zeros(len(envs), bool)
        record = video is not None and not returns  # the first game only
        if record:
            video.append(frames[0])
        while not done.all():
            actions = policy(stacks)
            for i in np.flatnonzero(~done):
                frame, reward, terminated, truncated, _ = envs[i].step(actions[i])
                scores[i] += reward
                done[i] = terminated or truncated
                stacks[i] = np.concatenate([stacks[i, len(frame):], frame])
                if record and i == 0:
                    video.append(frame)
        returns += scores.tolist()
        for env in envs:
            env.close()
    return np.array(returns)

def write_video(path, frames):
    """Frames (c, 64, 64), greyscale or RGB, as an MP4 (mp4v codec), each pixel a 4x4 block."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    mp4 = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 15, (256, 256))
    for frame in frames:
        image = np.moveaxis(frame, 0, -1).repeat(4, 0).repeat(4, 1)
        mp4.write(cv2.cvtColor(image, cv2.COLOR_GRAY2BGR if len(frame) == 1 else cv2.COLOR_RGB2BGR))
    mp4.release()

# ---- Training: pretraining on the random prefill, then updates of 1 world-model + 1 actor-critic step. --
def pretrain(models, optimizers, replay, args, device, done, stop):
    """official: the observation model alone, then the dynamics with the encoder frozen, then the critic on
    real latent sequences while the actor only maximises entropy. Batches are uniform and leave the visit
    counts alone. Goes on after `done` updates; returns the count, short if Ctrl-C or SIGTERM stopped it."""
    obs_model, dyn, actor, critic = models
    L, H, parts = args.wm_sequence_length, args.ac_horizon, ("observation model", "dynamics", "critic")
    ends = np.cumsum([args.pretrain_obs_updates, args.pretrain_dyn_updates, args.pretrain_ac_updates])
    with tqdm(total=int(ends[-1]), initial=done, leave=False, dynamic_ncols=True) as progress:
        while done < ends[-1] and not stop:
            part = int((done >= ends).sum())  # 0, 1, 2
            progress.set_description(f"pretrain {parts[part]}", False)
            if part == 0:
                index = replay.rng.choice(replay.size + 1, args.pretrain_obs_batch, replace=False)
                stacks = torch.as_tensor(replay.stacks(index), device=device)  # (N, stack * c, H, W)
                log_q = obs_model.encode(stacks)
                losses = observation_losses(obs_model, log_q, sample_z(log_q), stacks, args)
                optimize(sum(losses), optimizers[:1], args.wm_grad_clip)
            elif part == 1:
                starts = replay.sample_starts(args.wm_batch_size, L, balanced=False)
                batch = replay.sequences(starts, L, device)
                losses, _, _ = world_model_losses(obs_model, dyn, batch, args, train_encoder=False)
                optimize(sum(losses.values()), optimizers[1:2], args.wm_grad_clip)
            else:
                starts = replay.sample_starts(args.ac_batch_size, H, balanced=False)
                obs, actions, rewards, terminated, truncated = replay.sequences(starts, H, device)
                with torch.no_grad():
                    z = sample_z(obs_model.encode(obs[:, 1:]))  # (N, H+1, 1024) real latents
                rollout = (z, actions[:, 1:], rewards[:, 1:], torch.full_like(rewards[:, 1:], args.gamma),
                           (terminated | truncated)[:, 1:], torch.ones_like(rewards[:, 1:]))
                losses = actor_critic_losses(actor, critic, rollout, args, policy_gradient=False)
                optimize(losses["actor"] + losses["critic"], optimizers[2:], args.ac_grad_clip)
            done += 1
            progress.update()
    return done

def train_step(models, optimizers, replay, args, device, autocast):
    """One world-model step on a balanced batch, then imagination from it and one actor and critic step."""
    obs_model, dyn, actor, critic = models
    L = args.wm_sequence_length
    batch = replay.sequences(replay.sample_starts(args.wm_batch_size, L), L, device)
    with autocast:
        wm_losses, z_seq, dones = world_model_losses(obs_model, dyn, batch, args)
    optimize(sum(wm_losses.values()), optimizers[:2], args.wm_grad_clip)
    dyn.eval()  # imagination without dropout
    with autocast:
        rollout = imagine(dyn, actor, z_seq, batch[1], batch[2], dones, args)
        ac_losses = actor_critic_losses(actor, critic, rollout, args)
    dyn.train()
    optimize(ac_losses["actor"] + ac_losses["critic"], optimizers[2:], args.ac_grad_clip)
    return {**wm_losses, **ac_losses}

def log_metrics(writer, metrics, step):
    """Write the losses of one update, floats from `finite` (the only place they leave the device)."""
    metrics["observation_model"] = metrics["decoder"] + metrics["entropy_hinge"] + metrics["consistency"]
    metrics["dynamics_model"] = metrics["next_z"] + metrics["reward"] + metrics["discount"]
    writer.add_scalar("charts/policy_entropy", metrics.pop("policy_entropy"), step)
    for name, value in metrics.items():
        writer.add_scalar(f"losses/{name}", value, step)

def log_evaluation(writer, args, returns, step):
    """eval/return_mean, eval/return_std and eval/human_normalized_score (26 games only)."""
    scores = dict(eval_return_mean=float(returns.mean()), eval_return_std=float(returns.std()))
    scores["human_normalized_score"] = human_normalized_score(args.env_id, scores["eval_return_mean"])
    scores = {name: value for name, value in scores.items() if value is not None}  # HNS: 26 games only
    for name, value in scores.items():
        writer.add_scalar("eval/" + name.removeprefix("eval_"), value, step)
    return scores

# ---- Checkpoints: one file holds everything a run needs to go on exactly where it stopped. ---------------
RNGS = ((random.getstate, random.setstate), (np.random.get_state, np.random.set_state),  # every RNG of a run
        (torch.get_rng_state, torch.set_rng_state),
        (torch.cuda.get_rng_state_all, torch.cuda.set_rng_state_all))

def save_checkpoint(path, args, models, optimizers, replay, env, losses, counters):
    """Networks, optimisers, the filled part of the replay, every RNG, the last (finite) losses and the env
    (cloudpickle: gymnasium's wrappers hold lambdas), through a temporary file: a crash leaves no half one."""
    game = env.unwrapped
    ale = is_atari(args.env_id) and (game.clone_state(include_rng=True), game.np_random, env.action_space)
    filled = {k: v[:replay.size + 1] if isinstance(v, np.ndarray) else v for k, v in vars(replay).items()}
    checkpoint = dict(script=SCRIPT, args=asdict(args), models=[m.state_dict() for m in models],
                      optimizers=[o.state_dict() for o in optimizers], rng=[get() for get, _ in RNGS],
                      losses=losses, env=env, replay=filled, ale=ale, counters=counters)
    torch.save(checkpoint, path + ".tmp", pickle_module=cloudpickle)
    os.replace(path + ".tmp", path)

def open_run(args):
    """Flags, folder and checkpoint: --resume goes on in the run's folder with the flags stored in it."""
    path = args.resume
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False) if path else None
    except Exception as error:  # missing, or truncated or foreign: unpickling can fail anywhere
        fail(f"cannot read checkpoint {path} ({type(error).__name__}); pass the intact checkpoint.pt of a "
             f"run, runs/<run-name>/checkpoint.pt")
    script = checkpoint.get("script") if isinstance(checkpoint, dict) else None
    if path and script != SCRIPT:
        other = f" but of {script}.py; pass it to {script}.py" if script else ""
        fail(f"{path} is not a checkpoint of {SCRIPT}.py{other}")
    if args.resume:  # flags an older checkpoint holds and the script has since dropped are left out
        stored = {key: value for key, value in checkpoint["args"].items() if key in Args.__dataclass_fields__}
        return Args(**stored), os.path.dirname(os.path.abspath(path)), checkpoint
    env_name = re.sub(r"[^A-Za-z0-9_.-]", "_", args.env_id)
    run_dir = os.path.join("runs", args.run_name or f"{env_name}__{SCRIPT}__{args.seed}__{int(time.time())}")
    if os.path.isdir(run_dir) and os.listdir(run_dir):
        fail(f"{run_dir} already holds a run; pass another --run-name, or continue it with --resume "
             f"{run_dir}/checkpoint.pt")
    return args, run_dir, checkpoint

def finite(metrics, update, run_dir, problem=None):
    """The losses as floats (one device sync); a non-finite one or a `problem` stops the run in one line."""
    values = {name: float(value.detach()) for name, value in metrics.items()}
    bad = [f"loss {k} is {v} at update {update}" for k, v in values.items() if not math.isfinite(v)]
    if problem or bad:
        last = os.path.join(run_dir, "checkpoint.pt")
        fail(f"{problem or bad[0]}; stopped without writing a checkpoint (last good one: "
             f"{last if os.path.exists(last) else 'none'}); try smaller learning rates")
    return values

if __name__ == "__main__":
    args, run_dir, checkpoint = open_run(parse_args())
    # TRY NOT TO MODIFY: seeding and device
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.backends.cudnn.benchmark = not args.torch_deterministic
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # CUDA only; CPU is fp32
    keep_freed_memory()  # CPU: activations stay mapped from one update to the next
    auto_device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto_device if args.device == "auto" else args.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)
    env = make_env(args, train=True)
    num_actions, atari = int(env.action_space.n), is_atari(args.env_id)
    protocol = dict(sticky_actions=0.0 if atari else "env default", frame_skip=4 if atari else 1,
                    num_actions=num_actions, action_set="minimal" if atari else "env", noop_max_eval=0,
                    reward="tanh(r) stored", eval_policy="z = mode of q(z|o), actions sampled",
                    observation=f"{args.frame_stack} x {env.observation_space.shape}")  # the rest: flags
    print(f"protocol: {json.dumps(protocol)}")
    if args.track:  # imported only here: wandb is needed only with --track
        import wandb
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=asdict(args), name=os.path.basename(run_dir), dir=os.path.dirname(run_dir))
    writer = SummaryWriter(run_dir, purge_step=checkpoint["counters"][0] + 1 if checkpoint else None)
    table = "\n".join(f"|{key}|{value}|" for key, value in asdict(args).items())
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
    writer.add_text("protocol", json.dumps(protocol))
    # ALGO LOGIC: models and optimisers (official: torch Adam with L2-coupled weight decay)
    z_dim = args.z_categoricals * args.z_classes
    obs_model = ObservationModel(args, args.frame_stack * env.observation_space.shape[0]).to(device)
    dyn = DynamicsModel(args, num_actions).to(device)
    actor = mlp(z_dim, args.ac_hidden_dim, num_actions, args.ac_layers).to(device)
    critic = mlp(z_dim, args.ac_hidden_dim, 1, args.ac_layers).to(device)
    models, lrs = (obs_model, dyn, actor, critic), (args.wm_lr, args.wm_lr, args.actor_lr, args.critic_lr)
    optimizers = tuple(torch.optim.Adam(m.parameters(), lr, eps=args.adam_eps, weight_decay=args.weight_decay)
                       for m, lr in zip(models, lrs))
    if args.compile:
        obs_model.encoder, dyn.transformer = torch.compile(obs_model.encoder), torch.compile(dyn.transformer)
    shape = env.observation_space.shape
    replay = Replay(args.total_timesteps, shape, args.frame_stack, args.buffer_temperature, args.seed)
    if checkpoint:  # the run goes on exactly where the checkpoint left it
        for module, state in zip((*models, *optimizers), checkpoint["models"] + checkpoint["optimizers"]):
            module.load_state_dict(state)
        for key, value in checkpoint["replay"].items():  # the arrays hold their filled part only
            if isinstance(value, np.ndarray):
                getattr(replay, key)[:len(value)] = value
            else:
                setattr(replay, key, value)
        for (_, set_state), state in zip(RNGS, checkpoint["rng"]):
            set_state(state)
        env.close()
        env = checkpoint["env"]
        global_step, updates, update_credit, pretrained, wall_seconds = checkpoint["counters"]
        if checkpoint["ale"]:  # an unpickled ALE env starts afresh: its emulator state and RNGs come back too
            ale_state, env.unwrapped.np_random, env.unwrapped.action_space = checkpoint["ale"]
            env.unwrapped.restore_state(ale_state)
    else:
        replay.add_frame(env.reset(seed=args.seed)[0], first=True)
        env.action_space.seed(args.seed)
        global_step, updates, update_credit, pretrained, wall_seconds = 0, 0, 0.0, 0, 0.0
    start_time, metrics, stop = time.time() - wall_seconds, {}, []
    path = os.path.join(run_dir, "checkpoint.pt")

    def save():  # everything the run has, at this step boundary
        counters = (global_step, updates, update_credit, pretrained, time.time() - start_time)
        save_checkpoint(path, args, models, optimizers, replay, env, finite(metrics, updates, run_dir),
                        counters)

    def on_signal(signum, frame):  # a first Ctrl-C or SIGTERM stops at the next step boundary, a second quits
        if stop:
            sys.exit(128 + signum)
        stop.append(signum)

    def policy(stacks):
        return act(obs_model, actor, stacks, device)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    if checkpoint and global_step == args.prefill:  # stopped in pretraining: the rest of it comes first
        pretrained = pretrain(models, optimizers, replay, args, device, pretrained, stop)
    last_step = global_step if stop else args.total_timesteps  # stopped in pretraining: no more steps
    progress = tqdm(range(global_step + 1, last_step + 1), "twm", last_step, initial=global_step,
                    dynamic_ncols=True)
    for global_step in progress:
        # ALGO LOGIC: act with the encoder and actor only (random during the prefill)
        if global_step <= args.prefill:
            action = env.action_space.sample()
        else:
            action = policy(replay.stacks(np.array([replay.size])))[0]
        obs, reward, terminated, truncated, info = env.step(action)
        replay.add_step(action, reward, terminated, truncated)
        if "episode" in info:  # whole games, raw score
            writer.add_scalar("charts/episodic_return", info["episode"]["r"], global_step)
            writer.add_scalar("charts/episodic_length", info["episode"]["l"], global_step)
        if terminated or truncated:
            obs, _ = env.reset()
        replay.add_frame(obs, first=terminated or truncated)
        # ALGO LOGIC: pretraining once after the prefill, then ~1.316 updates per agent step
        try:
            if global_step == args.prefill:
                pretrained = pretrain(models, optimizers, replay, args, device, pretrained, stop)
            elif global_step > args.prefill:
                update_credit += args.updates_per_step
                while update_credit >= 1:
                    update_credit -= 1
                    metrics = train_step(models, optimizers, replay, args, device, autocast)
                    updates += 1
                    if updates % args.log_every == 0:
                        log_metrics(writer, finite(metrics, updates, run_dir), global_step)
        except ValueError as error:  # NaN outputs fail a torch.distributions check before any loss is seen
            if "found invalid values" not in str(error):
                raise
            phase = "pretraining" if updates == 0 else f"update {updates + 1}"
            finite({}, 0, run_dir, f"a network output NaN in {phase}")
        if global_step % 100 == 0:
            writer.add_scalar("charts/SPS", sps := int(global_step / (time.time() - start_time)), global_step)
            progress.set_postfix(SPS=sps, updates=updates)
        if global_step % args.eval_every == 0 and global_step < args.total_timesteps:
            returns = evaluate(args, policy, args.interim_eval_episodes, args.seed + 10_000 + global_step)
            progress.write(f"global_step={global_step}, eval_return={returns.mean():.2f}")
            log_evaluation(writer, args, returns, global_step)
        if args.save_every and global_step % args.save_every == 0 and global_step < args.total_timesteps:
            save()
        if stop:  # Ctrl-C or SIGTERM: stop at this step boundary
            break
    save()  # the end of the run, or an interruption: a checkpoint to resume or to evaluate
    if stop:
        print(f"\ninterrupted: checkpoint saved to {path}; resume with --resume {path}")  # below the bar
        sys.exit(128 + stop[0])
    stop.append(0)  # from here on a signal quits at once
    video = [] if args.capture_video else None
    returns = evaluate(args, policy, args.eval_episodes, seed=args.seed + 1_000_000, video=video)
    if video:  # the first game
        write_video(os.path.join(run_dir, "videos", "eval.mp4"), video)
    scores = log_evaluation(writer, args, returns, global_step)
    summary = dict(env_id=args.env_id, seed=args.seed, total_timesteps=global_step,
                   eval_episodes=args.eval_episodes, **scores, wall_seconds=round(time.time() - start_time))
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary))
    env.close()
    writer.close()
