"""IRIS: "Transformers are Sample-Efficient World Models" in one file.

Micheli, Alonso, Fleuret, ICLR 2023 (arXiv 2209.00588). Official code: github.com/eloialonso/iris.
A VQ autoencoder turns each 64x64 RGB frame into 16 tokens of a 512-word vocabulary; a GPT over
(16 frame tokens + 1 action token) per step predicts the next frame's tokens, the reward sign and the
episode end; a CNN-LSTM actor-critic learns only in imagination, on decoded frames. Every default is
the official code's; `# official:` comments mark where we differ.

    python iris.py --env-id PongNoFrameskip-v4                  # the paper's Atari 100k run (~3.5 A100-days)
    python iris.py --preset tiny --env-id tests.catch:Catch-v0  # a small run on the Catch test game, on a CPU
    python iris.py --help                                       # every hyperparameter, with the paper's value
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
from torch.distributions import Categorical
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

gym.register_envs(ale_py)
SCRIPT = "iris"  # names its checkpoints, run folders and error lines
FRAME_SIZE = 64  # every frame is resized to 64x64 (the tokenizer shapes assume it)
TOKENS_PER_FRAME = 16  # K: a 64x64 frame downsampled 4 times -> 4x4 latent grid, row-major

@dataclass
class Args:
    """IRIS (Micheli et al., ICLR 2023). Defaults are the official code's; `--preset tiny` suits a CPU."""
    # --- experiment ---
    env_id: str = "PongNoFrameskip-v4"
    """any gymnasium id; ALE games get the Atari protocol, `module:Env-v0` imports `module` first"""
    seed: int = 1
    """seed of python, numpy, torch and the env"""
    total_timesteps: int = 100_000
    """agent steps in the real env (each is 4 frames on Atari); training epochs go on after collection ends"""
    preset: Literal["paper", "tiny"] = "paper"
    """`paper`: the official configuration; `tiny`: same algorithm, small widths and budgets (see TINY)"""
    device: str = "auto"
    """`auto` picks cuda when available, else cpu; or any torch device string"""
    run_name: Optional[str] = None
    """folder under runs/; default `<env>__iris__<seed>__<time>`"""
    torch_deterministic: bool = True
    """cudnn.deterministic and no cudnn autotuning"""
    eval_every: int = 1000
    """evaluate after the epoch whose agent steps cross a multiple of this (official: every 5 epochs)"""
    interim_eval_episodes: int = 16
    """episodes per intermediate evaluation"""
    eval_episodes: int = 100
    """episodes of the final evaluation (the Atari 100k protocol's count)"""
    log_every: int = 100
    """write losses to TensorBoard every this many gradient steps of a component (each syncs the device)"""
    save_every: int = 10_000
    """overwrite runs/<run>/checkpoint.pt after an epoch crossing a multiple of this many steps (0: at end)"""
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
    """bf16 autocast for the forwards (CUDA only; off by default)"""
    # --- env protocol ---
    noop_max: int = 30
    """up to this many no-ops after each real reset in training"""
    eval_noop_max: int = 1
    """no-ops after each reset in evaluation (official: exactly 1)"""
    life_loss_terminal: bool = True
    """losing a life ends a training episode; the game goes on after one NOOP step (soft reset)"""
    max_episode_frames: int = 20_000
    """a training game is truncated after this many frames (5,000 agent steps)"""
    eval_max_episode_frames: int = 108_000
    """an evaluation game is truncated after this many frames (27,000 agent steps)"""
    # --- discrete autoencoder ("tokenizer") ---
    tok_ch: int = 64
    """base channel width of the VQ encoder/decoder"""
    tok_ch_mult: tuple[int, ...] = (1, 1, 1, 1, 1)
    """channel multiplier per resolution level; 5 levels = 4 downsamplings: 64x64 -> 4x4 = 16 tokens"""
    tok_num_res_blocks: int = 2
    """residual blocks per encoder level (the decoder uses one more)"""
    tok_attn_resolutions: tuple[int, ...] = (8, 16)
    """feature-map resolutions that get a self-attention block after each residual block"""
    tok_z_channels: int = 512
    """channels of the encoder output / decoder input"""
    tok_vocab_size: int = 512
    """codebook size N (number of distinct tokens)"""
    tok_embed_dim: int = 512
    """codebook vector dimension"""
    tok_beta: float = 1.0
    """commitment loss weight (official hard-codes 1.0, not VQ-VAE's 0.25)"""
    tok_lr: float = 1e-4
    """tokenizer Adam learning rate"""
    tok_batch_size: int = 256
    """tokenizer batch (single frames)"""
    grad_clip: float = 10.0
    """gradient-norm clip of each update of the tokenizer, world model and actor-critic (official: 10 each)"""
    # --- Transformer world model ---
    wm_num_layers: int = 10
    """GPT blocks"""
    wm_num_heads: int = 4
    """attention heads"""
    wm_embed_dim: int = 256
    """GPT width"""
    wm_dropout: float = 0.1
    """embedding, attention and residual dropout"""
    wm_sequence_length: int = 20
    """timesteps per world-model segment L; context = 17 L tokens (16 frame tokens + 1 action)"""
    wm_lr: float = 1e-4
    """world-model AdamW learning rate"""
    wm_weight_decay: float = 0.01
    """AdamW weight decay, applied to Linear weights only"""
    wm_batch_size: int = 64
    """world-model batch (segments of wm_sequence_length steps)"""
    # --- actor-critic (trained in imagination) ---
    ac_lstm_dim: int = 512
    """LSTMCell hidden size"""
    ac_cnn_channels: tuple[int, ...] = (32, 32, 64, 64)
    """channels of the 4 conv-maxpool-ReLU stages of the actor-critic (64 -> 32 -> 16 -> 8 -> 4)"""
    burn_in: int = 20
    """real (reconstructed) frames that warm up the LSTM before imagination starts"""
    imagine_horizon: int = 20
    """imagined steps H per trajectory (must be <= wm_sequence_length so it fits in context)"""
    gamma: float = 0.995
    """discount"""
    lam: float = 0.95
    """lambda of the lambda-returns"""
    entropy_coef: float = 0.001
    """entropy bonus weight"""
    ac_mask_after_end: bool = False
    """train the actor-critic only on steps before the first imagined end (Delta-IRIS; official: all steps)"""
    ac_lr: float = 1e-4
    """actor-critic Adam learning rate"""
    ac_batch_size: int = 64
    """imagined trajectories per update"""
    # --- schedule ---
    epochs: int = 600
    """training epochs"""
    collect_steps_per_epoch: int = 200
    """real env steps collected per epoch (until total_timesteps is reached)"""
    tok_start_after: int = 5
    """tokenizer trains only in epochs > this"""
    tok_stop_after: int = 0
    """tokenizer trains only in epochs <= this, so the world model learns fixed tokens (0: never; official)"""
    wm_start_after: int = 25
    """world model trains only in epochs > this"""
    ac_start_after: int = 50
    """actor-critic trains only in epochs > this"""
    tok_steps_per_epoch: int = 200
    """tokenizer gradient steps per epoch"""
    wm_steps_per_epoch: int = 200
    """world-model gradient steps per epoch"""
    ac_steps_per_epoch: int = 200
    """actor-critic gradient steps per epoch"""
    collect_epsilon: float = 0.01
    """probability of a uniformly random action while collecting"""
    collect_temperature: float = 1.0
    """policy softmax temperature while collecting"""
    eval_temperature: float = 0.5
    """policy softmax temperature at evaluation (still sampled, not argmax)"""

# Tiny keeps every mechanism (K = 16), shrinks sizes; γ 0.95; 2,160 GPT steps before the actor-critic (else
# it exploits their errors); tokenizer lr 1e-2: 3e-3 draws KeyDoor's key purple (docs/tiny_games.md).
TINY = dict(total_timesteps=3000, eval_every=1000, interim_eval_episodes=20, eval_episodes=50, log_every=20,
            tok_ch=8, tok_num_res_blocks=1, tok_attn_resolutions=(), tok_z_channels=32, tok_vocab_size=64,
            tok_embed_dim=32, tok_lr=1e-2, tok_batch_size=32, wm_num_layers=2, wm_num_heads=4,
            wm_embed_dim=64, wm_dropout=0.0, wm_sequence_length=8, wm_lr=1e-3, wm_batch_size=16,
            ac_lstm_dim=128, ac_cnn_channels=(16, 16, 32, 32), burn_in=2, imagine_horizon=8, gamma=0.95,
            entropy_coef=0.01, ac_mask_after_end=True, ac_lr=1e-3, ac_batch_size=32, epochs=38,
            collect_steps_per_epoch=100, tok_start_after=1, tok_stop_after=8, wm_start_after=2,
            ac_start_after=20, tok_steps_per_epoch=40, wm_steps_per_epoch=120, ac_steps_per_epoch=20)
PRESETS = {"paper": Args(), "tiny": Args(preset="tiny", **TINY)}
# Start-up checks: every number a flag sets must be positive, except these (flag -> what it must be).
RANGES = dict.fromkeys("seed save_every noop_max eval_noop_max tok_start_after tok_stop_after wm_start_after "
                       "ac_start_after tok_steps_per_epoch wm_steps_per_epoch ac_steps_per_epoch burn_in "
                       "tok_beta wm_weight_decay entropy_coef".split(), "0 or more")
RANGES |= dict(gamma="in (0, 1]", lam="in (0, 1]", collect_epsilon="in [0, 1]", tok_vocab_size="at least 2",
               wm_dropout="in [0, 1)")
CHECKS = {"positive": lambda x: x > 0, "0 or more": lambda x: x >= 0, "at least 2": lambda x: x >= 2,
          "in (0, 1]": lambda x: 0 < x <= 1, "in [0, 1)": lambda x: 0 <= x < 1,
          "in [0, 1]": lambda x: 0 <= x <= 1}

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
    if 0 < args.tok_stop_after <= args.tok_start_after:
        fail(f"--tok-stop-after {args.tok_stop_after} must be 0 (never stop) or above --tok-start-after "
             f"{args.tok_start_after}")
    if args.imagine_horizon > args.wm_sequence_length:
        fail(f"--imagine-horizon {args.imagine_horizon} must be at most --wm-sequence-length "
             f"{args.wm_sequence_length} (context)")
    return args

def keep_freed_memory():
    """Keep freed memory mapped, else every update page-faults its activations back in (11% of CPU time)."""
    for option, value in ((-4, 0), (-1, 2**31 - 1)) if sys.platform == "linux" else ():  # glibc's mallopt
        ctypes.CDLL(None).mallopt(option, value)

# ---- Environment: IRIS's Atari 100k protocol, built from gymnasium's wrappers plus the one it lacks. -------
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
    """One env of uint8 RGB frames (3, 64, 64); episode statistics count whole games, raw score."""
    ale = dict(frameskip=1, repeat_action_probability=0.0, full_action_space=False,  # not the id's defaults
               max_num_frames_per_episode=args.max_episode_frames if train else args.eval_max_episode_frames)
    try:
        env = gym.make(args.env_id, **(ale if is_atari(args.env_id) else {}))
    except (gym.error.Error, ModuleNotFoundError, ImportError) as error:
        fail(f"unknown env id '{args.env_id}' ({type(error).__name__}: {error}); use a registered gymnasium "
             f"id such as PongNoFrameskip-v4, or `module:Env-v0` for an env registered by `module`")
    if not isinstance(env.action_space, gym.spaces.Discrete):
        fail(f"env {args.env_id} has {type(env.action_space).__name__} actions; IRIS needs Discrete actions")
    space = env.observation_space
    if not (isinstance(space, gym.spaces.Box) and space.dtype == np.uint8 and
            (len(space.shape) == 2 or (len(space.shape) == 3 and space.shape[-1] == 3))):
        fail(f"env '{args.env_id}' observations are {type(space).__name__} {getattr(space, 'shape', '')} "
             f"{getattr(space, 'dtype', '')}; IRIS needs uint8 images (HxW or HxWx3)")
    size = (FRAME_SIZE, FRAME_SIZE)
    if is_atari(args.env_id):
        # 1. frame skip 4 with max-pool over the last 2 frames, resize (official: resize each frame with PIL
        # bilinear, then max-pool; here max-pool, then cv2 INTER_AREA), RGB, no-ops: up to 30 / exactly 1
        env = gym.wrappers.AtariPreprocessing(env, noop_max=args.noop_max if train else args.eval_noop_max,
                                              frame_skip=4, screen_size=size, grayscale_obs=False)
        env = gym.wrappers.RecordEpisodeStatistics(env)  # 2. whole games, raw rewards; no FIRE (official)
        if train and args.life_loss_terminal:
            env = LifeLossSoftReset(env)  # 3. evaluation plays whole games
    else:
        env = gym.wrappers.ResizeObservation(gym.wrappers.RecordEpisodeStatistics(env), size)
        if len(space.shape) == 2:
            env = gym.wrappers.TransformObservation(env, lambda o: np.repeat(o[..., None], 3, -1),
                                                    gym.spaces.Box(0, 255, (*size, 3), np.uint8))
    # 4. channels first: (H, W, 3) -> (3, H, W)
    return gym.wrappers.TransformObservation(env, lambda o: np.moveaxis(o, -1, 0),
                                             gym.spaces.Box(0, 255, (3, *size), np.uint8))

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

# ---- Replay: every frame stored once as uint8; episodes are sampled uniformly, then a window inside one. ---
class Replay:
    """obs[i] is the frame before action[i]; reward/end[i] are what action[i] led to. In training an episode
    is one life (official), and the frame after an end is the first frame of the next episode."""
    def __init__(self, capacity, frame_shape, seed):
        self.frames = np.zeros((capacity + 1, *frame_shape), np.uint8)
        self.episode_start = np.zeros(capacity + 1, np.int64)  # the first frame of each frame's episode
        self.actions = np.zeros(capacity, np.int64)
        self.rewards = np.zeros(capacity, np.float32)  # raw rewards (official); their sign is predicted
        self.ends = np.zeros(capacity, bool)  # terminated or truncated (official: not told apart)
        self.tokens = np.full((capacity + 1, TOKENS_PER_FRAME), -1, np.int16)  # -1: not yet encoded
        self.size, self.rng = 0, np.random.default_rng(seed)

    def add_frame(self, frame, first):
        self.frames[self.size] = frame
        self.episode_start[self.size] = self.size if first else self.episode_start[self.size - 1]

    def add_step(self, action, reward, terminated, truncated):
        self.actions[self.size], self.rewards[self.size] = action, reward
        self.ends[self.size] = terminated or truncated
        self.size += 1

    def segments(self, batch, length, from_start, device, tokenizer=None, keep_tokens=False):
        """Uniform episodes (official: not timesteps), then `length` steps in one: from a uniform start,
        right-padded (world model, tokenizer), or to a uniform end, left-padded (actor-critic); padding: mask
        False (official: 0s). A `tokenizer`'s tokens (B, L, 16) replace frames, once each if `keep_tokens`."""
        starts = np.flatnonzero(self.episode_start[:self.size] == np.arange(self.size))
        stops = np.append(starts[1:], self.size)  # episode e has steps starts[e] .. stops[e]-1 (ongoing too)
        episode = self.rng.integers(len(starts), size=batch)
        start, stop = starts[episode, None], stops[episode, None]
        span = stop - start
        first = start + (self.rng.integers(span) if from_start else self.rng.integers(1, span + 1) - length)
        index = first + np.arange(length)  # (batch, length)
        mask, index = (index >= start) & (index < stop), index.clip(0, self.size - 1)  # padding: a real step

        def to(x):
            return torch.as_tensor(x, device=device)
        with torch.no_grad():  # with a tokenizer: tokens (B, L, 16) instead of frames (B, L, 3, 64, 64)
            if keep_tokens and len(new := np.unique(index[self.tokens[index, 0] < 0])):
                self.tokens[new] = tokenizer.encode(to(self.frames[new]))[0].cpu().numpy()  # first use
            if tokenizer is None:
                obs = self.frames[index]
            elif keep_tokens:
                obs = to(self.tokens[index]).long()
            else:
                obs = tokenizer.encode_real(to(self.frames[index]), to(mask))
        return tuple(to(x) for x in (obs, self.actions[index], self.rewards[index], self.ends[index], mask))

    def recent(self, length):
        """The `length` frames before the current one in its episode (collector burn-in), left-padded."""
        index = self.size - length + np.arange(length)
        return self.frames[index.clip(0)], index >= self.episode_start[self.size]

# ---- Discrete autoencoder: VQGAN-style encoder/decoder (taming-transformers, time embedding removed) -------
def Normalize(c):
    return nn.GroupNorm(math.gcd(32, c), c, eps=1e-6)  # official: 32 groups; gcd fits tiny widths

class ResnetBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.net = nn.Sequential(Normalize(cin), nn.SiLU(inplace=True), nn.Conv2d(cin, cout, 3, padding=1),
                                 Normalize(cout), nn.SiLU(inplace=True), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()  # "nin" shortcut

    def forward(self, x):  # in place on fresh outputs (SiLU, residual add): 9-12% faster coding on CPU
        return self.net(x).add_(self.skip(x))

class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions of a feature map: q, k, v are (B, 1, HW, C)."""
    def __init__(self, c):
        super().__init__()
        self.norm, self.qkv = Normalize(c), nn.Conv2d(c, 3 * c, 1)  # qkv: the same as three 1x1 convs
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).unsqueeze(1).chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        return x + self.proj_out(y.squeeze(1).transpose(1, 2).reshape(B, C, H, W))

def Downsample(c):
    return nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(c, c, 3, stride=2))  # right, bottom (taming)

def Upsample(c):
    return nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c, c, 3, padding=1))

def _level(cin, cout, n_blocks, attn):
    return [m for i in range(n_blocks)  # residual blocks, each followed by self-attention if `attn`
            for m in [ResnetBlock(cin if i == 0 else cout, cout)] + ([AttnBlock(cout)] if attn else [])]

class Encoder(nn.Sequential):
    """(B, 3, 64, 64) in [-1, 1] -> (B, z_channels, 4, 4)."""
    def __init__(self, a):
        chs = [a.tok_ch * m for m in (1,) + tuple(a.tok_ch_mult)]
        layers, res = [nn.Conv2d(3, chs[0], 3, padding=1)], 64
        for i in range(len(a.tok_ch_mult)):
            layers += _level(chs[i], chs[i + 1], a.tok_num_res_blocks, res in a.tok_attn_resolutions)
            if i < len(a.tok_ch_mult) - 1:
                layers.append(Downsample(chs[i + 1]))
                res //= 2
        c = chs[-1]
        layers += [ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)]  # mid
        layers += [Normalize(c), nn.SiLU(inplace=True), nn.Conv2d(c, a.tok_z_channels, 3, padding=1)]
        super().__init__(*layers)

class Decoder(nn.Sequential):
    """(B, z_channels, 4, 4) -> (B, 3, 64, 64) in [-1, 1] space (unbounded)."""
    def __init__(self, a):
        chs = [a.tok_ch * m for m in a.tok_ch_mult][::-1]  # coarsest level first
        c, res = chs[0], 64 // 2 ** (len(chs) - 1)
        layers = [nn.Conv2d(a.tok_z_channels, c, 3, padding=1), ResnetBlock(c, c), AttnBlock(c),
                  ResnetBlock(c, c)]
        for i, cout in enumerate(chs):
            layers += _level(c, cout, a.tok_num_res_blocks + 1, res in a.tok_attn_resolutions)
            c = cout
            if i < len(chs) - 1:
                layers.append(Upsample(c))
                res *= 2
        layers += [Normalize(c), nn.SiLU(inplace=True), nn.Conv2d(c, 3, 3, padding=1)]
        super().__init__(*layers)

def straight_through(z, z_q):
    """Forward value z_q, backward identity to z (the decoder's gradient is copied to the encoder)."""
    return z + (z_q - z).detach()

def in_slices(net, x, n):
    """net(x) in slices of n frames on CPU, whose activations stay in cache (the paper's encode and decode
    ~22% faster with 8 frames at 64 channels; the tiny tokenizer update 20% faster with 64 frames at 8)."""
    return torch.cat([net(part) for part in x.split(n)]) if x.is_cpu and len(x) > n else net(x)  # GPU: 1 pass

class Tokenizer(nn.Module):
    """VQ autoencoder: uint8 frame (3, 64, 64) <-> 16 tokens in [0, vocab)."""
    def __init__(self, a):
        super().__init__()
        self.encoder, self.decoder, self.slice = Encoder(a), Decoder(a), 512 // a.tok_ch  # CPU slice size
        self.pre_quant_conv = nn.Conv2d(a.tok_z_channels, a.tok_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(a.tok_embed_dim, a.tok_z_channels, 1)
        self.codebook = nn.Embedding(a.tok_vocab_size, a.tok_embed_dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / a.tok_vocab_size, 1.0 / a.tok_vocab_size)
        self.to(memory_format=torch.channels_last)  # NHWC convolutions: measured 25% faster encoder on CPU

    def quantize(self, z):
        """z (B, E, 4, 4) -> nearest codes: tokens (B, 16), z_q (B, E, 4, 4)."""
        B, E, H, W = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, E)  # (B*16, E), row-major over the 4x4 grid
        e = self.codebook.weight  # (N, E)
        dist = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()  # |z|^2 + |e|^2 - 2 z.e
        tokens = dist.argmin(1).view(B, H * W)
        return tokens, self.codebook(tokens).view(B, H, W, E).permute(0, 3, 1, 2)

    def encode(self, frames):
        """frames uint8 (..., 3, 64, 64) -> tokens (..., 16), z and z_q (prod(...), E, 4, 4)."""
        lead = frames.shape[:-3]
        x = frames.reshape(-1, *frames.shape[-3:]).to(memory_format=torch.channels_last).float() / 255 * 2 - 1
        z = self.pre_quant_conv(in_slices(self.encoder, x, self.slice))
        tokens, z_q = self.quantize(z)
        return tokens.view(*lead, TOKENS_PER_FRAME), z, z_q

    def encode_real(self, frames, mask):
        """frames uint8 (B, T, 3, 64, 64), mask (B, T) -> tokens (B, T, 16); padded steps are not encoded
        (token 0; official: zero frames are encoded, and every use ignores them, so outputs are the same)."""
        tokens = torch.zeros(*mask.shape, TOKENS_PER_FRAME, dtype=torch.long, device=frames.device)
        tokens[mask] = self.encode(frames[mask])[0]
        return tokens

    def decode_latent(self, z_q):
        """(B, E, 4, 4) -> (B, 3, 64, 64) in [-1, 1] space (unclamped, for the loss)."""
        return in_slices(self.decoder, self.post_quant_conv(z_q), self.slice)

    def decode(self, tokens):
        """tokens (..., 16) -> frames float (..., 3, 64, 64) in [0, 1]."""
        z_q = self.codebook(tokens.reshape(-1, 4, 4)).permute(0, 3, 1, 2)  # (B, E, 4, 4)
        return ((self.decode_latent(z_q) + 1) / 2).clamp(0, 1).view(*tokens.shape[:-1], 3, 64, 64)

    def encode_decode(self, frames):
        """uint8 (..., 3, 64, 64) -> reconstructions (..., 3, 64, 64) in [0, 1]: what the policy sees."""
        return self.decode(self.encode(frames)[0])

def tokenizer_loss(tokenizer, frames, beta):
    """VQ loss + reconstruction loss on uint8 frames (B, 3, 64, 64). Returns (total, components)."""
    _, z, z_q = tokenizer.encode(frames)
    codebook = (z.detach() - z_q).pow(2).mean()  # moves the codes towards the encoder outputs
    commitment = (z - z_q.detach()).pow(2).mean()  # keeps the encoder close to its codes
    err = tokenizer.decode_latent(straight_through(z, z_q)) - (frames.float() / 255 * 2 - 1)  # (B, 3, 64, 64)
    # official: L1 + LPIPS (VGG16 weights downloaded at run time). We use Delta-IRIS's LPIPS-free recipe
    # from the same authors: 0.1 L1 + L2 + 0.01 * worst-pixel squared error (keeps small sprites alive).
    recon = 0.1 * err.abs().mean() + err.pow(2).mean() + 0.01 * err.pow(2).flatten(1).max(1).values.mean()
    parts = {"codebook": codebook, "commitment": commitment, "reconstruction": recon}
    return codebook + beta * commitment + recon, parts

# ---- World model: a minGPT over [z_1^1..z_1^16, a_1, z_2^1, ..., a_L] (17 tokens per timestep) -------------
class KVCache:
    """Preallocated keys/values of every layer, (B, nh, max_tokens, hs), for token-by-token decoding."""
    def __init__(self, num_layers, B, nh, max_tokens, hs, device, dtype):
        self.k = torch.zeros(num_layers, B, nh, max_tokens, hs, device=device, dtype=dtype)
        self.v, self.length = torch.zeros_like(self.k), 0  # length: tokens stored = the next token's position

    def append(self, layer, k, v):
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end], self.v[layer, :, :, self.length:end] = k, v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, nh, S, hs), S = past + new

class SelfAttention(nn.Module):
    def __init__(self, d, nh, dropout):
        super().__init__()
        self.nh, self.dropout, self.resid_drop = nh, dropout, nn.Dropout(dropout)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)  # official: separate q, k, v Linears

    def forward(self, x, cache, layer):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.nh, C // self.nh).permute(2, 0, 3, 1, 4)  # 3x (B, nh, T, hs)
        if cache is not None:  # (B, nh, T, hs) -> keys/values of all S past + new tokens
            k, v = cache.append(layer, k, v)
        S = k.shape[2]  # causal mask, bottom-right aligned: new token i (at S - T + i) sees keys 0..S - T + i
        mask = None if T == 1 else torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))  # (B, T, C)

class Block(nn.Module):
    def __init__(self, d, nh, dropout):
        super().__init__()
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(d), SelfAttention(d, nh, dropout), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(dropout))

    def forward(self, x, cache, layer):
        x = x + self.attn(self.ln1(x), cache, layer)  # pre-LN
        return x + self.mlp(self.ln2(x))

def head(d, out):
    return nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, out))

class WorldModel(nn.Module):
    """GPT predicting next frame tokens, reward sign and end. In a block, position j = 0..15 holds frame token
    j and 16 the action. Heads read: obs at j = 0..14 (predicts token j+1) and 16 (token 0 of the next frame);
    reward (3 classes: sign(r)+1) and end (2 classes) at j = 16 only. j = 15 predicts nothing."""
    def __init__(self, a, num_actions):
        super().__init__()
        d, self.K = a.wm_embed_dim, TOKENS_PER_FRAME
        self.tokens_per_block, self.max_tokens = self.K + 1, (self.K + 1) * a.wm_sequence_length
        self.obs_emb, self.act_emb = nn.Embedding(a.tok_vocab_size, d), nn.Embedding(num_actions, d)
        self.pos_emb, self.drop = nn.Embedding(self.max_tokens, d), nn.Dropout(a.wm_dropout)
        self.blocks = nn.ModuleList(Block(d, a.wm_num_heads, a.wm_dropout) for _ in range(a.wm_num_layers))
        self.ln_f = nn.LayerNorm(d)
        self.head_obs, self.head_reward, self.head_end = head(d, a.tok_vocab_size), head(d, 3), head(d, 2)
        for m in self.modules():  # official init_weights (world model only); LayerNorm keeps 1/0
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def new_cache(self, B):
        blk, p = self.blocks[0].attn, self.pos_emb.weight
        return KVCache(len(self.blocks), B, blk.nh, self.max_tokens, p.shape[1] // blk.nh, p.device, p.dtype)

    def forward(self, tokens, cache=None):
        """tokens (B, T) of interleaved frame/action ids, from position cache.length (or 0). Returns logits
        at the head positions: obs (B, T_obs, N), reward (B, T_act, 3), end (B, T_act, 2)."""
        B, T = tokens.shape
        pos = torch.arange(T, device=tokens.device) + (cache.length if cache is not None else 0)  # absolute
        is_act = pos % self.tokens_per_block == self.K  # which table embeds each position
        x = self.pos_emb.weight.new_empty(B, T, self.pos_emb.embedding_dim)
        x[:, ~is_act] = self.obs_emb(tokens[:, ~is_act])
        x[:, is_act] = self.act_emb(tokens[:, is_act])
        x = self.drop(x + self.pos_emb(pos))
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        if cache is not None:
            cache.length += T
        x = self.ln_f(x)  # (B, T, d)
        has_obs_head = pos % self.tokens_per_block != self.K - 1
        return self.head_obs(x[:, has_obs_head]), self.head_reward(x[:, is_act]), self.head_end(x[:, is_act])

def world_model_labels(obs_tokens, rewards, ends, mask):
    """obs_tokens (B, L, 16), rewards/ends/mask (B, L) (mask False: padded) -> obs labels (B, 16 L - 1) =
    flatten(tokens)[1:], reward labels sign(r)+1 and end labels (B, L); -100 (ignored) on padding."""
    return (obs_tokens.masked_fill(~mask[..., None], -100).flatten(1)[:, 1:],
            (torch.sign(rewards) + 1).long().masked_fill(~mask, -100), ends.long().masked_fill(~mask, -100))

def world_model_loss(world_model, obs_tokens, actions, rewards, ends, mask):
    """obs_tokens (B, L, 16), actions/rewards/ends/mask (B, L) -> (total, parts); right padding: unseen."""
    sequence = torch.cat([obs_tokens, actions[..., None]], dim=2).flatten(1)  # (B, 17 L)
    obs_logits, reward_logits, end_logits = world_model(sequence)
    labels = world_model_labels(obs_tokens, rewards, ends, mask)
    ce = [F.cross_entropy(lg.flatten(0, 1), lb.flatten(), ignore_index=-100)  # obs: the last action: none
          for lg, lb in zip((obs_logits[:, :-1], reward_logits, end_logits), labels)]
    return sum(ce), {"obs": ce[0], "reward": ce[1], "end": ce[2]}

def adamw_param_groups(module, weight_decay):
    """Weight decay on Linear weights only; embeddings, biases and LayerNorms are not decayed."""
    decay = [m.weight for m in module.modules() if isinstance(m, nn.Linear)]
    rest = [p for p in module.parameters() if all(p is not q for q in decay)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]

# ---- Actor-critic: CNN + LSTM on reconstructed frames ------------------------------------------------------
class ActorCritic(nn.Module):
    def __init__(self, num_actions, lstm_dim, channels=(32, 32, 64, 64)):
        super().__init__()
        stages = [(nn.Conv2d(cin, cout, 3, padding=1), nn.MaxPool2d(2), nn.ReLU())
                  for cin, cout in zip((3, *channels), channels)]
        self.cnn = nn.Sequential(*[m for stage in stages for m in stage], nn.Flatten())  # 64 -> 32 -> .. -> 4
        self.lstm = nn.LSTMCell(channels[-1] * 16, lstm_dim)  # (B, 64*4*4) in
        self.actor, self.critic = nn.Linear(lstm_dim, num_actions), nn.Linear(lstm_dim, 1)

    def initial_state(self, B, device):  # (h, c), zeros
        return torch.zeros(2, B, self.lstm.hidden_size, device=device).unbind()

    def forward(self, frames, state):
        """frames float (B, 3, 64, 64) in [0, 1] -> logits (B, A), value (B,), new (h, c)."""
        h, c = self.lstm(self.cnn(frames * 2 - 1), state)
        return self.actor(h), self.critic(h).squeeze(-1), (h, c)

    def burn_in(self, frames, mask, state=None):
        """Warm up (h, c) on frames (B, T, 3, 64, 64) in [0, 1]; rows update only where mask (B, T) is set."""
        B, T = mask.shape
        h, c = state if state is not None else self.initial_state(B, frames.device)
        features = self.cnn(frames.flatten(0, 1) * 2 - 1).view(B, T, -1)  # CNN batched over time
        for t in range(T):
            h_new, c_new = self.lstm(features[:, t], (h, c))
            h, c = torch.where(mask[:, t, None], h_new, h), torch.where(mask[:, t, None], c_new, c)
        return h, c

# ---- Losses and returns ------------------------------------------------------------------------------------
def lambda_returns(rewards, values, ends, gamma, lam):
    """(B, H) -> (B, H): Λ_{H-1} = V_{H-1}, Λ_t = r_t + γ (1 - d_t) [(1 - λ) V_{t+1} + λ Λ_{t+1}]."""
    values, cont = values.detach(), 1 - ends.float()
    returns = [values[:, -1]]
    for t in reversed(range(values.shape[1] - 1)):
        bootstrap = (1 - lam) * values[:, t + 1] + lam * returns[-1]
        returns.append(rewards[:, t] + gamma * cont[:, t] * bootstrap)
    return torch.stack(returns[::-1], dim=1)

def actor_critic_loss(imagined, gamma, lam, entropy_coef, mask_after_end=False):
    """REINFORCE with baseline sg(V), entropy bonus and value MSE, over the first H-1 imagined steps (with
    `mask_after_end`, only those before the first imagined end, as in Delta-IRIS; official: all of them)."""
    returns = lambda_returns(imagined["rewards"], imagined["values"], imagined["ends"], gamma, lam)[:, :-1]
    values, ends = imagined["values"][:, :-1], imagined["ends"][:, :-2] * mask_after_end  # d_0..d_{H-3} or 0s
    weight = torch.cat([torch.ones_like(values[:, :1]), (1 - ends).cumprod(1)], 1)  # (B, H-1): 1 up to an end

    def mean(x):  # over the weighted steps
        return (x * weight).sum() / weight.sum()
    policy = -mean(imagined["log_probs"][:, :-1] * (returns - values.detach()))
    entropy = -entropy_coef * mean(imagined["entropies"][:, :-1])
    value = mean((values - returns).pow(2))
    return policy + entropy + value, {"actor": policy, "entropy": entropy, "critic": value}

def update(module, optimizer, loss, clip):
    """One gradient step, the global gradient norm clipped first (official)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(module.parameters(), clip)
    optimizer.step()

# ---- Imagination: roll the policy out inside the world model (batched, KV-cached) --------------------------
def sample(logits):
    return Categorical(logits=logits).sample()  # temperature 1, never argmax

@torch.no_grad()
def world_model_step(world_model, tokenizer, cache, action, decode=True):
    """Feed a_t (B,), sample r_t in {-1, 0, 1}, d_t in {0, 1} and (if decode) the next frame in [0, 1]."""
    obs_logits, reward_logits, end_logits = world_model(action[:, None], cache)  # 1 action-token pass
    reward, end = sample(reward_logits[:, -1]).float() - 1, sample(end_logits[:, -1]).float()
    if not decode:  # last imagined step: reward and end only
        return reward, end, None
    tokens = [sample(obs_logits[:, -1])]  # the action token predicts frame token 0
    for _ in range(world_model.K - 1):  # 15 single-token passes, each sampling the next token
        tokens.append(sample(world_model(tokens[-1][:, None], cache)[0][:, -1]))
    world_model(tokens[-1][:, None], cache)  # the frame's last token only writes the cache
    return reward, end, tokenizer.decode(torch.stack(tokens, dim=1))  # one batched decode (B, 3, 64, 64)

def imagine(tokenizer, world_model, actor_critic, tokens, mask, horizon):
    """tokens (B, burn_in + 1, 16) of real frames, left-padded (mask False), the last one real; tokenizer and
    world model in eval mode. Returns (B, H): log_probs, entropies, values (with grad), rewards, ends."""
    tokenizer.eval()
    world_model.eval()
    with torch.no_grad():
        recon = torch.zeros(*mask.shape, 3, 64, 64, device=tokens.device)  # the policy sees reconstructions
        recon[mask] = tokenizer.decode(tokens[mask])  # left padding stays black and is skipped by the burn-in
        state = actor_critic.burn_in(recon[:, :-1], mask[:, :-1])
        cache = world_model.new_cache(len(tokens))
        world_model(tokens[:, -1], cache)  # the world model starts from the last real frame only (16 tokens)
    frame, out = recon[:, -1], {k: [] for k in ("log_probs", "entropies", "values", "rewards", "ends")}
    for t in range(horizon):
        logits, value, state = actor_critic(frame, state)
        dist = Categorical(logits=logits)
        action = dist.sample()
        reward, end, frame = world_model_step(world_model, tokenizer, cache, action, decode=t < horizon - 1)
        for k, v in zip(out, (dist.log_prob(action), dist.entropy(), value, reward, end)):
            out[k].append(v)
    return {k: torch.stack(v, dim=1) for k, v in out.items()}

# ---- Acting and evaluation. --------------------------------------------------------------------------------
@torch.no_grad()
def act(tokenizer, actor_critic, frames, state, temperature, epsilon, device):
    """The policy sees reconstructions, in the real env too (official): a ~ softmax(logits / T), replaced by a
    uniform action with probability epsilon. frames uint8 (n, 3, 64, 64); state None: a new LSTM state."""
    recon = tokenizer.encode_decode(torch.as_tensor(frames, device=device))
    state = state if state is not None else actor_critic.initial_state(len(frames), device)
    logits, _, state = actor_critic(recon, state)
    actions = Categorical(logits=logits / temperature).sample()
    explore = torch.rand(actions.shape, device=device) < epsilon
    actions = torch.where(explore, torch.randint_like(actions, logits.shape[-1]), actions)
    return actions.cpu().numpy(), state

def evaluate(args, policy, episodes, seed, video=None, lockstep=16):
    """Whole games after 1 no-op, raw score. Up to `lockstep` envs play together and all finish before new
    ones start, so short games are not favoured (official: 8/25 envs). A list `video` gets game 1's frames."""
    returns = []
    while len(returns) < episodes:
        envs = [make_env(args, train=False) for _ in range(min(lockstep, episodes - len(returns)))]
        frames = np.stack([env.reset(seed=seed + len(returns) + i)[0] for i, env in enumerate(envs)])
        scores, done, state = np.zeros(len(envs)), np.zeros(len(envs), bool), None
        record = video is not None and not returns  # the first game only
        if record:
            video.append(frames[0].copy())
        while not done.all():
            actions, state = policy(frames, state)
            for i in np.flatnonzero(~done):
                frames[i], reward, terminated, truncated, _ = envs[i].step(actions[i])
                scores[i] += reward
                done[i] = terminated or truncated
                if record and i == 0:
                    video.append(frames[0].copy())
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

# ---- Training: each component has its own batches, optimiser and start epoch (official trainer). -----------
def train_tokenizer(tokenizer, optimizer, replay, args, device):
    frames = replay.segments(args.tok_batch_size, 1, True, device)[0][:, 0]  # (B, 3, 64, 64) single frames
    loss, parts = tokenizer_loss(tokenizer, frames, args.tok_beta)
    update(tokenizer, optimizer, loss, args.grad_clip)
    replay.tokens.fill(-1)  # kept tokens are dropped; official: every batch re-encoded (same tokens, slower)
    return dict(observation_model=loss, **parts)

def train_world_model(world_model, tokenizer, optimizer, replay, args, device, keep_tokens=False):
    batch = replay.segments(args.wm_batch_size, args.wm_sequence_length, True, device, tokenizer, keep_tokens)
    loss, parts = world_model_loss(world_model, *batch)
    update(world_model, optimizer, loss, args.grad_clip)
    return dict(dynamics_model=loss, next_tokens=parts["obs"], reward=parts["reward"], end=parts["end"])

def train_actor_critic(actor_critic, tokenizer, world_model, optimizer, replay, args, device,
                       keep_tokens=False):
    tokens, _, _, _, mask = replay.segments(args.ac_batch_size, args.burn_in + 1, False, device, tokenizer,
                                            keep_tokens)
    imagined = imagine(tokenizer, world_model, actor_critic, tokens, mask, args.imagine_horizon)
    loss, parts = actor_critic_loss(imagined, args.gamma, args.lam, args.entropy_coef, args.ac_mask_after_end)
    update(actor_critic, optimizer, loss, args.grad_clip)
    entropy = imagined["entropies"].detach().mean() / math.log(actor_critic.actor.out_features)
    return dict(actor=parts["actor"], critic=parts["critic"], entropy_bonus=parts["entropy"],
                policy_entropy=entropy)

def log_metrics(writer, metrics, step):
    """Write the losses of one gradient step, floats from `finite` (the only place they leave the device)."""
    for name, value in metrics.items():
        writer.add_scalar(f"charts/{name}" if name == "policy_entropy" else f"losses/{name}", value, step)

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
                    num_actions=num_actions, action_set="minimal" if atari else "env",
                    fire_after_life_loss=False, reward="raw r stored, sign(r) predicted",
                    observation=f"{env.observation_space.shape} uint8",
                    eval_policy=f"reconstructions, actions sampled at temperature {args.eval_temperature}")
    print(f"protocol: {json.dumps(protocol)}")  # the rest: the flags
    epoch_to_enter, steps = checkpoint["counters"][:2] if checkpoint else (1, 0)  # resume: drop later events
    purge_step = 1 + max(steps, (epoch_to_enter - 1) * args.collect_steps_per_epoch) if checkpoint else None
    if args.track:  # imported only here: wandb is needed only with --track
        import wandb
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=asdict(args), name=os.path.basename(run_dir), dir=os.path.dirname(run_dir))
    writer = SummaryWriter(run_dir, purge_step=purge_step)
    table = "\n".join(f"|{key}|{value}|" for key, value in asdict(args).items())
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
    writer.add_text("protocol", json.dumps(protocol))
    # ALGO LOGIC: models and optimisers (official: Adam, AdamW with decay on Linear weights only, Adam)
    tokenizer = Tokenizer(args).to(device).eval()
    world_model = WorldModel(args, num_actions).to(device).eval()
    actor_critic = ActorCritic(num_actions, args.ac_lstm_dim, args.ac_cnn_channels).to(device).eval()
    tok_opt = torch.optim.Adam(tokenizer.parameters(), args.tok_lr)
    wm_opt = torch.optim.AdamW(adamw_param_groups(world_model, args.wm_weight_decay), args.wm_lr)
    ac_opt = torch.optim.Adam(actor_critic.parameters(), args.ac_lr)
    models, optimizers = (tokenizer, world_model, actor_critic), (tok_opt, wm_opt, ac_opt)
    if args.compile:
        tokenizer.encoder, tokenizer.decoder = map(torch.compile, (tokenizer.encoder, tokenizer.decoder))
    replay = Replay(args.total_timesteps, env.observation_space.shape, args.seed)
    components = [  # (module, trains in epochs start < epoch <= stop_after, steps per epoch, a gradient step)
        (tokenizer, args.tok_start_after, args.tok_stop_after or args.epochs, args.tok_steps_per_epoch,
         lambda: train_tokenizer(tokenizer, tok_opt, replay, args, device)),
        (world_model, args.wm_start_after, args.epochs, args.wm_steps_per_epoch,
         lambda: train_world_model(world_model, tokenizer, wm_opt, replay, args, device, keep_tokens=True)),
        (actor_critic, args.ac_start_after, args.epochs, args.ac_steps_per_epoch,
         lambda: train_actor_critic(actor_critic, tokenizer, world_model, ac_opt, replay, args, device,
                                    keep_tokens=True))]
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
        epoch, global_step, gradient_steps, wall_seconds, state = checkpoint["counters"]
        if checkpoint["ale"]:  # an unpickled ALE env starts afresh: its emulator state and RNGs come back too
            ale_state, env.unwrapped.np_random, env.unwrapped.action_space = checkpoint["ale"]
            env.unwrapped.restore_state(ale_state)
        obs, state = replay.frames[replay.size], state and tuple(h.to(device) for h in state)  # if collecting
    else:
        obs, _ = env.reset(seed=args.seed)
        env.action_space.seed(args.seed)
        replay.add_frame(obs, first=True)
        epoch, global_step, gradient_steps, wall_seconds, state = 1, 0, [0, 0, 0], 0.0, None
    start_time, metrics, stop = time.time() - wall_seconds, [{}, {}, {}], []
    path = os.path.join(run_dir, "checkpoint.pt")

    def save():  # everything the run has, at this boundary; `epoch` is the epoch to enter on --resume
        losses = [finite(m, n, run_dir) for m, n in zip(metrics, gradient_steps)]
        counters = (epoch, global_step, gradient_steps, time.time() - start_time, state)
        save_checkpoint(path, args, models, optimizers, replay, env, losses, counters)

    def on_signal(signum, frame):  # a first Ctrl-C or SIGTERM stops at the next step boundary, a second quits
        if stop:
            sys.exit(128 + signum)
        stop.append(signum)

    def policy(frames, state):
        return act(tokenizer, actor_critic, frames, state, args.eval_temperature, 0.0, device)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    x_step = (epoch - 1) * args.collect_steps_per_epoch
    progress = tqdm(desc="iris epochs", total=args.epochs, initial=epoch - 1, dynamic_ncols=True)
    while epoch <= args.epochs:
        try:
            # ALGO LOGIC: collect with the current policy, its LSTM warmed up on the episode so far (official)
            collect_from, collect_until = (min(e * args.collect_steps_per_epoch, args.total_timesteps)
                                           for e in (epoch - 1, epoch))
            if global_step == collect_from < collect_until:  # a run resumed mid-collection has its LSTM state
                recent, mask = (torch.as_tensor(x, device=device) for x in replay.recent(args.burn_in))
                with torch.no_grad():
                    state = actor_critic.burn_in(tokenizer.encode_decode(recent)[None], mask[None])
            while global_step < collect_until and not stop:
                action, state = act(tokenizer, actor_critic, obs[None], state, args.collect_temperature,
                                    args.collect_epsilon, device)
                obs, reward, terminated, truncated, info = env.step(action[0])
                replay.add_step(action[0], reward, terminated, truncated)
                global_step += 1
                if "episode" in info:  # whole games, raw score
                    writer.add_scalar("charts/episodic_return", info["episode"]["r"], global_step)
                    writer.add_scalar("charts/episodic_length", info["episode"]["l"], global_step)
                if terminated or truncated:
                    obs, state = env.reset()[0], None
                replay.add_frame(obs, first=terminated or truncated)
            # ALGO LOGIC: tokenizer, world model, actor-critic, each after its start epoch; eval mode between
            x_step = epoch * args.collect_steps_per_epoch  # keeps advancing in the training-only epochs
            for i, (module, start, stop_after, steps, train_step) in enumerate(components):
                module.train()
                while gradient_steps[i] < steps * max(0, min(epoch, stop_after) - start) and not stop:
                    with autocast:
                        metrics[i] = train_step()
                    gradient_steps[i] += 1
                    if gradient_steps[i] % args.log_every == 0:
                        log_metrics(writer, finite(metrics[i], gradient_steps[i], run_dir), x_step)
                module.eval()
        except ValueError as error:  # NaN outputs fail a torch.distributions check before any loss is seen
            if "found invalid values" not in str(error):
                raise
            finite({}, 0, run_dir, f"a network output NaN in epoch {epoch}")
        if stop:  # Ctrl-C or SIGTERM: stop at this boundary; --resume re-enters this epoch
            break
        writer.add_scalar("charts/SPS", sps := int(global_step / (time.time() - start_time)), global_step)
        progress.set_postfix(SPS=sps, steps=global_step)
        progress.update()
        crossed = global_step // args.eval_every > collect_from // args.eval_every  # a multiple of eval_every
        if crossed and global_step < args.total_timesteps:
            returns = evaluate(args, policy, args.interim_eval_episodes, args.seed + 10_000 + global_step)
            progress.write(f"global_step={global_step}, eval_return={returns.mean():.2f}")
            log_evaluation(writer, args, returns, global_step)
        epoch += 1
        if args.save_every and global_step // args.save_every > collect_from // args.save_every:
            save()
    save()  # the end of the run, or an interruption: a checkpoint to resume or to evaluate
    if stop:
        print(f"\ninterrupted: checkpoint saved to {path}; resume with --resume {path}")  # below the bar
        sys.exit(128 + stop[0])
    stop.append(0)  # from here on a signal quits at once
    video = [] if args.capture_video else None
    returns = evaluate(args, policy, args.eval_episodes, seed=args.seed + 1_000_000, video=video)
    if video:  # the first game
        write_video(os.path.join(run_dir, "videos", "eval.mp4"), video)
    scores = log_evaluation(writer, args, returns, x_step)
    summary = dict(env_id=args.env_id, seed=args.seed, total_timesteps=global_step,
                   eval_episodes=args.eval_episodes, **scores, wall_seconds=round(time.time() - start_time))
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary))
    env.close()
    writer.close()
