"""Tests of twm.py: the maths against hand-computed values, the Transformer-XL cache, the wrappers,
learning."""

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import evaluate_checkpoint as tool
import numpy as np
import pytest
import torch
import torch.nn as nn

import twm
from tests.tiny_runs import run_games_together

ROOT = Path(__file__).resolve().parents[1]


def tiny_args(**overrides):
    return twm.parse_args(
        [
            "--preset",
            "tiny",
            "--env-id",
            "tests.catch:Catch-v0",
            *[f"--{k.replace('_', '-')}={v}" for k, v in overrides.items()],
        ]
    )


@pytest.mark.timeout(30)
def test_lambda_advantages_with_predicted_discounts_and_restarts():
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 1.0, -1.0, 3.0]])
    discounts = torch.tensor(
        [[0.9, 0.0, 0.8]]
    )  # the middle step ended an imagined episode: γ' = γ̂(1 - d) = 0
    lam = 0.5
    # by hand, backwards from A_3 = 0:
    a2 = 2.0 + 0.8 * 3.0 - (-1.0)  # 5.4
    a1 = 0.0 + 0.0 * -1.0 - 1.0 + lam * 0.0 * a2  # -1.0: nothing flows across the restart
    a0 = 1.0 + 0.9 * 1.0 - 0.5 + lam * 0.9 * a1  # 0.95
    got = twm.lambda_advantages(rewards, values, discounts, lam)
    torch.testing.assert_close(got, torch.tensor([[a0, a1, a2]]))
    # R^λ = A + V equals the recursive λ-return r + γ'[(1-λ)V' + λR'], R_H = V_H
    r2 = 2.0 + 0.8 * 3.0
    r1 = 0.0
    r0 = 1.0 + 0.9 * ((1 - lam) * 1.0 + lam * r1)
    torch.testing.assert_close(got + values[:, :-1], torch.tensor([[r0, r1, r2]]))


def fixed_policy(logits):
    """An actor that outputs the same logits for every z."""
    actor = nn.Linear(4, len(logits))
    nn.init.zeros_(actor.weight)
    actor.bias.data = torch.tensor(logits)
    return actor


@pytest.mark.timeout(30)
@pytest.mark.parametrize("logits", [[0.0, 0.0, 0.0], [8.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
def test_thresholded_entropy_penalty(logits):
    args = tiny_args()
    actor, critic = fixed_policy(logits), fixed_policy([0.0])  # zero values, zero rewards: no policy gradient
    n, h = 5, 3
    rollout = (
        torch.zeros(n, h + 1, 4),
        torch.zeros(n, h, dtype=torch.long),
        torch.zeros(n, h),
        torch.ones(n, h),
        torch.zeros(n, h, dtype=torch.bool),
        torch.ones(n, h),
    )
    losses = twm.actor_critic_losses(actor, critic, rollout, args)
    p = torch.tensor(logits).softmax(0)
    normalised_entropy = float(-(p * p.log()).sum() / math.log(3))
    expected = 0.01 * max(0.0, 0.1 - normalised_entropy)  # η max(0, Γ - H/ln A)
    assert losses["policy_entropy"].item() == pytest.approx(normalised_entropy, abs=1e-6)
    assert losses["actor"].item() == pytest.approx(expected, abs=1e-7)
    assert (expected > 0) == (normalised_entropy < 0.1)


@pytest.mark.timeout(30)
def test_balanced_sampling_probabilities_and_visit_counts():
    replay = twm.Replay(capacity=10, frame_shape=(1, 64, 64), stack=4, temperature=20.0, seed=0)
    for i in range(10):
        replay.add_frame(np.zeros((1, 64, 64), np.uint8), first=i == 0)
        replay.add_step(0, 0.0, False, False)
    replay.visits[1:6] = [0, 20, 40, 0, 10]  # valid starts for length 4 are 1 .. 6
    starts, p = replay.start_probabilities(4)
    assert starts.tolist() == [1, 2, 3, 4, 5, 6]
    weights = np.exp(-np.array([0, 20, 40, 0, 10, 0]) / 20)
    np.testing.assert_allclose(p, weights / weights.sum())
    chosen = replay.sample_starts(3, 4)
    assert len(set(chosen.tolist())) == 3  # without replacement
    expected_visits = np.array([0, 0, 20, 40, 0, 10, 0, 0, 0, 0], float)
    expected_visits[chosen] += 1
    np.testing.assert_array_equal(replay.visits, expected_visits)


@pytest.mark.timeout(30)
def test_frame_stacks_repeat_the_first_frame_of_an_episode():
    replay = twm.Replay(capacity=6, frame_shape=(1, 64, 64), stack=4, temperature=20.0, seed=0)
    for i in range(6):
        replay.add_frame(np.full((1, 64, 64), i, np.uint8), first=i in (0, 3))
        replay.add_step(0, 0.0, i == 2, False)
    stacks = replay.stacks(np.array([1, 4, 5]))  # (3, 4, 64, 64)
    assert stacks[:, :, 0, 0].tolist() == [[0, 0, 0, 1], [3, 3, 3, 4], [3, 3, 4, 5]]
    assert replay.rewards.dtype == np.float32 and replay.frames.dtype == np.uint8


@pytest.mark.timeout(60)
def test_loss_scales_are_sums_over_pixels_and_categoricals():
    args = tiny_args()
    torch.manual_seed(0)
    obs_model, dyn = twm.ObservationModel(args, 4), twm.DynamicsModel(args, 3)
    obs = torch.randint(0, 256, (2, 4, 4, 64, 64), dtype=torch.uint8)
    # decoder: ½ Σ_pixels (ô - o)², averaged over stacks; with ô = 0 it is ½ mean Σ o²
    obs_model.decode = lambda z: torch.zeros(*z.shape[:-1], 4, 64, 64)
    log_q = obs_model.encode(obs)
    decoder, _ = twm.observation_losses(obs_model, log_q, twm.sample_z(log_q), obs, args)
    expected = 0.5 * (obs.float() / 255).square().sum((-3, -2, -1)).mean()
    torch.testing.assert_close(decoder, expected)
    # entropy hinge: zero at maximal entropy, 5 * 0.1 at zero entropy
    uniform = torch.full((3, 16, 16), -math.log(16))
    peaked = torch.full((3, 16, 16), -1e4).scatter(-1, torch.zeros(3, 16, 1, dtype=torch.long), 0.0)
    assert (
        twm.observation_losses(obs_model, uniform, uniform.exp().flatten(-2), obs[0, :3], args)[1].item() == 0
    )
    assert twm.observation_losses(obs_model, peaked, peaked.exp().flatten(-2), obs[0, :3], args)[
        1
    ].item() == pytest.approx(0.5)
    # next-z cross-entropy: a uniform prediction costs Σ over the 16 categoricals of ln 16, whatever the
    # target
    nn.init.zeros_(dyn.z_head[-1].weight)
    nn.init.zeros_(dyn.z_head[-1].bias)
    dyn.eval()
    batch = (
        obs,
        torch.zeros(2, 3, dtype=torch.long),
        torch.zeros(2, 3),
        torch.zeros(2, 3, dtype=torch.bool),
        torch.zeros(2, 3, dtype=torch.bool),
    )
    losses, _, _ = twm.world_model_losses(obs_model, dyn, batch, args)
    assert losses["next_z"].item() == pytest.approx(16 * math.log(16), rel=1e-5)
    assert losses["consistency"].item() > 0


@pytest.mark.timeout(30)
def test_straight_through_gradient_is_the_gradient_of_the_probabilities():
    torch.manual_seed(0)
    logits = torch.randn(5, 16, 16, requires_grad=True)
    weights = torch.randn(5, 256)
    z = twm.sample_z(logits.log_softmax(-1))
    assert set(z.unique().tolist()) == {0.0, 1.0} and z.view(5, 16, 16).sum(-1).eq(1).all()
    (z * weights).sum().backward()
    grad_st = logits.grad.clone()
    logits.grad = None
    (logits.softmax(-1).flatten(-2) * weights).sum().backward()
    torch.testing.assert_close(grad_st, logits.grad)


def random_sequence(args, batch=3, steps=6, dones_at=()):
    z_dim = args.z_categoricals * args.z_classes
    z = (
        torch.nn.functional.one_hot(
            torch.randint(0, args.z_classes, (batch, steps, args.z_categoricals)), args.z_classes
        )
        .float()
        .flatten(-2)
    )
    actions, rewards = torch.randint(0, 3, (batch, steps)), torch.randn(batch, steps - 1)
    dones = torch.zeros(batch, steps - 1, dtype=torch.bool)
    for k in dones_at:
        dones[:, k] = True
    assert z.shape[-1] == z_dim
    return z, actions, rewards, dones


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dones_at", [(), (2,)])
def test_imagining_step_by_step_with_memory_equals_one_full_forward(dones_at):
    args = tiny_args(wm_memory_length=8)
    torch.manual_seed(0)
    dyn = twm.DynamicsModel(args, 3).eval()
    z, actions, rewards, dones = random_sequence(args, steps=6, dones_at=dones_at)
    with torch.no_grad():
        full = dyn(z, actions, rewards, dones)  # (B, 6, d)
        memory = dyn.start(z[:, 0], actions[:, 0])
        eid = torch.zeros(3, dtype=torch.long)
        for k in range(1, 6):
            next_eid = eid + dones[:, k - 1].long()
            h, memory = dyn.step(rewards[:, k - 1], z[:, k], actions[:, k], eid, next_eid, memory)
            torch.testing.assert_close(h, full[:, k], atol=1e-5, rtol=1e-5)
            eid = next_eid


@pytest.mark.timeout(60)
def test_no_attention_across_an_episode_boundary():
    args = tiny_args()
    torch.manual_seed(0)
    dyn = twm.DynamicsModel(args, 3).eval()
    z, actions, rewards, dones = random_sequence(args, steps=6, dones_at=(2,))  # step 2 ends an episode
    changed_z, changed_actions, changed_rewards = z.clone(), actions.clone(), rewards.clone()
    changed_z[:, :3] = changed_z[:, :3].roll(1, -1)
    changed_actions[:, :3] = (actions[:, :3] + 1) % 3
    changed_rewards[:, :3] += 1.0
    with torch.no_grad():
        before, after = (
            dyn(z, actions, rewards, dones),
            dyn(changed_z, changed_actions, changed_rewards, dones),
        )
    torch.testing.assert_close(before[:, 3:], after[:, 3:])  # the new episode cannot see the old one
    assert not torch.allclose(before[:, :3], after[:, :3])
    no_boundary = torch.zeros_like(dones)
    with torch.no_grad():
        leaked = dyn(changed_z, changed_actions, changed_rewards, no_boundary)
    assert not torch.allclose(dyn(z, actions, rewards, no_boundary)[:, 3:], leaked[:, 3:])


@pytest.mark.timeout(60)
def test_imagination_restarts_and_weights():
    args = tiny_args(ac_batch_size=8, ac_horizon=4)
    torch.manual_seed(0)
    dyn = twm.DynamicsModel(args, 3).eval()
    nn.init.constant_(dyn.discount_head[-1].bias, -20.0)  # γ̂ ≈ 0: every step ends the imagined episode
    nn.init.zeros_(dyn.discount_head[-1].weight)
    actor = twm.mlp(256, 32, 3, 1)
    z, actions, rewards, dones = random_sequence(args, batch=2, steps=5)
    z_out, a, r, g, ends, w = twm.imagine(dyn, actor, z, actions, rewards, F_pad(dones), args)
    assert z_out.shape == (8, 5, 256) and a.shape == r.shape == g.shape == ends.shape == w.shape == (8, 4)
    assert ends.all() and torch.equal(w, torch.ones(8, 4))  # weights restart at 1 after every restart
    nn.init.constant_(dyn.discount_head[-1].bias, 3.0)  # γ̂ = σ(3) ≈ 0.95: no restart within 4 steps
    z_out, a, r, g, ends, w = twm.imagine(dyn, actor, z, actions, rewards, F_pad(dones), args)
    assert not ends.any()
    torch.testing.assert_close(w, torch.cumprod(torch.cat([torch.ones(8, 1), g[:, :-1]], 1), 1))


def F_pad(dones):
    """dones of the batch's steps (B, T) from the (B, T-1) transitions of random_sequence."""
    return torch.nn.functional.pad(dones, (0, 1))


def make_atari(env_id, train, fire_after_life_loss=True):
    flag = "--fire-after-life-loss" if fire_after_life_loss else "--no-fire-after-life-loss"
    return twm.make_env(twm.parse_args(["--env-id", env_id, flag]), train=train)


@pytest.mark.timeout(120)
def test_atari_wrappers_shapes_and_soft_reset_after_life_loss():
    env = make_atari("BreakoutNoFrameskip-v4", train=True)
    obs, info = env.reset(seed=0)
    assert obs.shape == (1, 64, 64) and obs.dtype == np.uint8 and env.action_space.n == 4
    ale = env.unwrapped.ale
    lives = ale.lives()
    for _ in range(5000):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        if terminated:
            break
    assert terminated and 0 < ale.lives() < lives  # a life loss ends the training episode...
    frame = ale.getEpisodeFrameNumber()
    env.reset()
    assert ale.getEpisodeFrameNumber() > frame  # ...but reset() only steps on: the game goes on
    assert ale.lives() == lives - 1


@pytest.mark.timeout(60)
def test_other_image_envs_keep_their_channels():
    args = tiny_args(frame_stack=4)
    env = twm.make_env(args, train=True)  # Catch: RGB frames, as the env renders them
    obs, _ = env.reset(seed=0)
    assert obs.shape == env.observation_space.shape == (3, 64, 64) and obs.dtype == np.uint8
    paddle = obs[:, -1].reshape(3, -1).max(1)  # the bottom row holds the orange paddle
    assert paddle.tolist() == [255, 160, 0]
    replay = filled_replay(args, steps=10)
    assert replay.stacks(np.array([5])).shape == (1, 4 * 3, 64, 64)  # frame_stack x channels into the encoder


@pytest.mark.timeout(180)
@pytest.mark.parametrize("fire", [True, False])
def test_fire_after_life_loss_in_breakout(fire):
    # Only NOOPs from the agent: the ball relaunches after a lost life only if the wrapper presses FIRE.
    env = make_atari("BreakoutNoFrameskip-v4", train=False, fire_after_life_loss=fire)
    env.reset(seed=0)
    for _ in range(3000):
        _, _, terminated, truncated, _ = env.step(0)
        if terminated or truncated:
            break
    lives = env.unwrapped.ale.lives()
    assert (lives == 0) if fire else (lives == 5)  # without FIRE the ball never launches


@pytest.mark.timeout(120)
def test_noops_in_training_only():
    def start_frames(train):
        env = make_atari("PongNoFrameskip-v4", train=train)
        return {env.reset(seed=seed)[1]["episode_frame_number"] for seed in range(8)}

    assert len(start_frames(train=True)) > 1  # up to 30 random no-ops
    assert len(start_frames(train=False)) == 1  # evaluation starts the same way every time


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "env_id, message",
    [
        ("NoSuchGame-v0", "unknown env id"),
        ("Pendulum-v1", "needs Discrete actions"),
        ("CartPole-v1", "needs uint8 images"),
    ],
)
def test_bad_env_stops_with_one_line(env_id, message):
    result = subprocess.run(
        [sys.executable, "twm.py", "--env-id", env_id], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def run_script(tmp_path, *flags, timeout, suffix=""):
    run = f"test_{tmp_path.name}{suffix}"
    shutil.rmtree(ROOT / "runs" / run, ignore_errors=True)  # a folder that holds a run is refused
    subprocess.run(
        [sys.executable, "twm.py", "--run-name", run, *flags],
        cwd=ROOT,
        check=True,
        timeout=timeout,
        stdout=subprocess.DEVNULL,
    )
    return json.loads((ROOT / "runs" / run / "summary.json").read_text())


GAMES = ["tests.catch:Catch-v0", "tests.gather:Gather-v0"]


@pytest.mark.timeout(1000)
def test_tiny_preset_learns_catch_and_gather(tmp_path):
    # the preset's whole budget, seed 1, both games at once: about 8.5 minutes on 2 cores. Each must end above
    # its bar, the random return plus half the gap to the optimum (Catch -0.50 -> 1, Gather 0.97 -> 3)
    catch, gather = run_games_together("twm.py", tmp_path, GAMES, 980)
    assert catch["eval_return_mean"] >= 0.25 and gather["eval_return_mean"] >= 1.99, (catch, gather)


@pytest.mark.timeout(300)
def test_end_to_end_on_real_pong_writes_summary(tmp_path):
    summary = run_script(
        tmp_path,
        "--preset",
        "tiny",
        "--env-id",
        "PongNoFrameskip-v4",
        "--total-timesteps",
        "300",
        "--prefill",
        "200",
        "--pretrain-obs-updates",
        "5",
        "--pretrain-dyn-updates",
        "5",
        "--pretrain-ac-updates",
        "5",
        "--eval-episodes",
        "1",
        timeout=290,
    )
    assert set(summary) >= {
        "env_id",
        "seed",
        "total_timesteps",
        "eval_episodes",
        "eval_return_mean",
        "eval_return_std",
        "wall_seconds",
        "human_normalized_score",
    }
    assert summary["env_id"] == "PongNoFrameskip-v4" and -21 <= summary["eval_return_mean"] <= 21


def logged_losses(run):
    """{tag: [values]} of the losses/ scalars that a run wrote to TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(ROOT / "runs" / run))
    events.Reload()
    return {
        tag: [e.value for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
        if tag.startswith("losses/")
    }


@pytest.mark.timeout(300)
def test_same_seed_same_losses(tmp_path):
    flags = [
        "--preset",
        "tiny",
        "--env-id",
        "tests.catch:Catch-v0",
        "--total-timesteps",
        "560",
        "--prefill",
        "500",
        "--pretrain-obs-updates",
        "5",
        "--pretrain-dyn-updates",
        "5",
        "--pretrain-ac-updates",
        "5",
        "--log-every",
        "10",
        "--eval-episodes",
        "2",
    ]
    for suffix in ("_a", "_b"):
        run_script(tmp_path, *flags, timeout=140, suffix=suffix)
    first, second = logged_losses(f"test_{tmp_path.name}_a"), logged_losses(f"test_{tmp_path.name}_b")
    assert len(first) >= 6 and all(len(values) >= 2 for values in first.values())
    assert first == second


# ------------------------------------------------------------------------------------------------
# Checkpoints, resume, interruption, non-finite losses; tools/evaluate_checkpoint.py: games, video, dream.
# ------------------------------------------------------------------------------------------------

SHORT = [
    "--preset",
    "tiny",
    "--env-id",
    "tests.catch:Catch-v0",
    "--prefill",
    "500",
    "--pretrain-obs-updates",
    "5",
    "--pretrain-dyn-updates",
    "5",
    "--pretrain-ac-updates",
    "5",
    "--log-every",
    "5",
    "--eval-episodes",
    "2",
]


def twm_cli(*flags, timeout=120):
    """twm.py in a subprocess; its CompletedProcess, output as text."""
    return subprocess.run(
        [sys.executable, "twm.py", *flags], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def losses_after(run_dir, step):
    """{tag: [(step, value)]} of the losses/ scalars a run wrote after agent step `step`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag) if e.step > step]
        for tag in events.Tags()["scalars"]
        if tag.startswith("losses/")
    }


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory):
    """The end checkpoint of a 520-step tiny Catch run (20 updates)."""
    tmp_path = tmp_path_factory.mktemp("twm_checkpoint")
    run_script(tmp_path, *SHORT, "--total-timesteps", "520", timeout=120)
    return ROOT / "runs" / f"test_{tmp_path.name}" / "checkpoint.pt"


@pytest.mark.timeout(240)
def test_resume_gives_the_losses_of_the_uninterrupted_run(tmp_path):
    # The end checkpoint of a 550-step run is the state after step 550 of the same run made 600 steps long
    # (--total-timesteps changes nothing before its end, and the end checkpoint is written before the final
    # evaluation). Resumed with total_timesteps 600, it must log exactly the losses of the 600-step run.
    full = run_script(tmp_path, *SHORT, "--total-timesteps", "600", timeout=120, suffix="_full")
    run_script(tmp_path, *SHORT, "--total-timesteps", "550", timeout=120, suffix="_first")
    checkpoint = torch.load(
        ROOT / "runs" / f"test_{tmp_path.name}_first" / "checkpoint.pt", weights_only=False
    )
    assert checkpoint["counters"][:2] == (550, 50)  # agent steps, updates
    checkpoint["args"]["total_timesteps"] = 600
    resumed = ROOT / "runs" / f"test_{tmp_path.name}_resumed"
    shutil.rmtree(resumed, ignore_errors=True)
    resumed.mkdir()
    torch.save(checkpoint, resumed / "checkpoint.pt", pickle_module=twm.cloudpickle)
    result = twm_cli("--resume", str(resumed / "checkpoint.pt"))
    assert result.returncode == 0, result.stderr[-2000:]
    expected, got = (
        losses_after(ROOT / "runs" / f"test_{tmp_path.name}_full", 550),
        losses_after(resumed, 550),
    )
    assert len(expected) >= 10 and all(
        len(values) == 10 for values in expected.values()
    )  # updates 55, 60 .. 100
    assert got == expected
    assert json.loads((resumed / "summary.json").read_text())["eval_return_mean"] == full["eval_return_mean"]


@pytest.mark.timeout(120)
def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
    run = f"test_{tmp_path.name}"
    shutil.rmtree(ROOT / "runs" / run, ignore_errors=True)
    process = subprocess.Popen(
        [sys.executable, "twm.py", *SHORT, "--total-timesteps", "3000", "--run-name", run],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().startswith("protocol:")  # then the networks, the replay and the handlers
    time.sleep(5)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    path = ROOT / "runs" / run / "checkpoint.pt"
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert (
        f"interrupted: checkpoint saved to {Path('runs') / run / 'checkpoint.pt'}; resume with --resume"
        in stdout
    )
    checkpoint = torch.load(path, weights_only=False)
    assert (
        checkpoint["script"] == "twm" and 0 < checkpoint["counters"][0] < 3000 and "Traceback" not in stderr
    )


@pytest.mark.timeout(300)
def test_sigterm_in_pretraining_saves_at_once_and_resumes_to_the_same_losses(tmp_path):
    # Interrupted in the first part of pretraining, saved within seconds, resumed: the losses of the run left
    # alone.
    flags = [
        "--preset",
        "tiny",
        "--env-id",
        "tests.catch:Catch-v0",
        "--prefill",
        "500",
        "--pretrain-obs-updates",
        "400",
        "--pretrain-dyn-updates",
        "20",
        "--pretrain-ac-updates",
        "20",
        "--log-every",
        "5",
        "--eval-episodes",
        "2",
        "--total-timesteps",
        "530",
    ]
    full = run_script(tmp_path, *flags, timeout=140, suffix="_full")
    run = f"test_{tmp_path.name}"
    shutil.rmtree(ROOT / "runs" / run, ignore_errors=True)
    process = subprocess.Popen(
        [sys.executable, "twm.py", *flags, "--run-name", run],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = ""
    while "pretrain observation model" not in seen:  # the progress bar of the first part
        seen += process.stderr.read(1) or pytest.fail(f"twm.py ended before pretraining: {seen[-2000:]}")
    process.send_signal(signal.SIGTERM)
    sent = time.time()
    stdout, stderr = process.communicate(timeout=60)
    assert time.time() - sent < 5 and process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    path = ROOT / "runs" / run / "checkpoint.pt"
    global_step, updates, _, pretrained, _ = torch.load(path, weights_only=False)["counters"]
    assert (global_step, updates) == (500, 0) and 0 < pretrained < 400
    result = twm_cli("--resume", str(path), timeout=140)
    assert result.returncode == 0, result.stderr[-2000:]
    expected, got = losses_after(ROOT / "runs" / f"{run}_full", 0), losses_after(ROOT / "runs" / run, 0)
    assert len(expected) >= 10 and all(
        len(values) == 6 for values in expected.values()
    )  # updates 5, 10 .. 30
    assert got == expected
    assert (
        json.loads((ROOT / "runs" / run / "summary.json").read_text())["eval_return_mean"]
        == full["eval_return_mean"]
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--critic-lr", "1e30"],
            "error: loss actor is nan at update 1; stopped without writing a checkpoint (last good "
            "one: none)",
        ),  # caught where the losses are logged
        (
            ["--wm-lr", "1e30", "--save-every", "250"],
            "error: a network output NaN in pretraining; stopped without writing "
            "a checkpoint (last good one: runs/",
        ),  # caught in torch.distributions
    ],
    ids=["logged loss", "network output"],
)
def test_non_finite_training_stops_without_a_checkpoint(tmp_path, flags, message):
    run = f"test_{tmp_path.name}"
    shutil.rmtree(ROOT / "runs" / run, ignore_errors=True)
    result = twm_cli(*SHORT, "--total-timesteps", "520", "--log-every", "1", "--run-name", run, *flags)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert message in result.stderr.strip().splitlines()[-1], result.stderr[-2000:]
    path = ROOT / "runs" / run / "checkpoint.pt"
    assert (
        not path.exists() if "none" in message else torch.load(path, weights_only=False)["counters"][0] == 250
    )


@pytest.mark.timeout(240)
def test_evaluate_checkpoint_repeats_the_final_evaluation_and_writes_a_dream_and_a_video(
    tmp_path, checkpoint_path
):
    run_summary = json.loads((checkpoint_path.parent / "summary.json").read_text())
    result = subprocess.run(
        [
            sys.executable,
            "tools/evaluate_checkpoint.py",
            str(checkpoint_path),
            "--episodes",
            str(run_summary["eval_episodes"]),
            "--capture-video",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == {
        k: v for k, v in run_summary.items() if k != "wall_seconds"
    }  # the same games and actions
    import cv2

    assert cv2.imread(str(tmp_path / "dream.png")) is not None
    video = cv2.VideoCapture(str(tmp_path / "videos" / "eval.mp4"))
    ok, frame = video.read()
    assert ok and frame.shape == (256, 256, 3) and video.get(cv2.CAP_PROP_FRAME_COUNT) == 8  # a 7-step game
    bad = subprocess.run(
        [sys.executable, "tools/evaluate_checkpoint.py", str(tmp_path / "missing.pt")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        f"evaluate_checkpoint.py: error: cannot read checkpoint {tmp_path / 'missing.pt'} "
        "(FileNotFoundError); "
        "pass the checkpoint.pt of a twm.py or iris.py run, runs/<run-name>/checkpoint.pt"
    ]


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "problem, message",
    [
        ("missing", "(FileNotFoundError); pass the intact checkpoint.pt of a run"),
        ("truncated", "cannot read checkpoint"),
        ("other script", "is not a checkpoint of twm.py but of iris.py; pass it to iris.py"),
        ("run exists", "already holds a run; pass another --run-name, or continue it with --resume"),
    ],
)
def test_checkpoint_problems_stop_with_one_line(tmp_path, checkpoint_path, problem, message):
    flags = ["--resume", str(tmp_path / "checkpoint.pt")]
    if problem == "truncated":
        data = checkpoint_path.read_bytes()
        (tmp_path / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    elif problem == "other script":
        torch.save({"script": "iris", "args": {}}, tmp_path / "checkpoint.pt")
    elif problem == "run exists":
        flags = ["--env-id", "tests.catch:Catch-v0", "--run-name", checkpoint_path.parent.name]
    result = twm_cli(*flags, timeout=60)
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def filled_replay(args, steps=60):
    """A replay of `steps` random steps of Catch (7-step episodes)."""
    env = twm.make_env(args, train=True)
    replay = twm.Replay(steps, env.observation_space.shape, args.frame_stack, args.buffer_temperature, 0)
    obs, _ = env.reset(seed=0)
    replay.add_frame(obs, first=True)
    for _ in range(steps):
        action = env.action_space.sample()
        obs, reward, terminated, truncated, _ = env.step(action)
        replay.add_step(action, reward, terminated, truncated)
        if terminated or truncated:
            obs, _ = env.reset()
        replay.add_frame(obs, first=terminated or truncated)
    return replay


@pytest.mark.timeout(60)
def test_dream_rows_follow_the_real_actions_after_the_context():
    args = tiny_args()
    torch.manual_seed(0)
    obs_model, dyn = (
        twm.ObservationModel(args, args.frame_stack * 3).eval(),
        twm.DynamicsModel(args, 3).eval(),
    )
    nn.init.constant_(obs_model.decoder[-1].bias, 0.5)  # decoded frames around grey, not clamped to black
    replay = filled_replay(args)
    rows, captions, context, title = tool.twm_dream(obs_model, dyn, replay, args, step=7)
    assert (
        rows.shape == (4, 4, 7, 3, 64, 64) and context == 2
    )  # 8-frame windows do not fit in a 7-step episode
    torch.testing.assert_close(rows[:, 2, :context], rows[:, 1, :context])  # context: the reconstructions
    assert captions[0][2][:2] == ["context"] * 2 and captions[0][2][2].startswith("dream\nr=")
    again, _, _, _ = tool.twm_dream(obs_model, dyn, replay, args, step=7)
    torch.testing.assert_close(again, rows)  # seeded by the step
    replay.actions[: replay.size] = (replay.actions[: replay.size] + 1) % 3
    changed, _, _, _ = tool.twm_dream(obs_model, dyn, replay, args, step=7)
    torch.testing.assert_close(changed[:, :2], rows[:, :2])  # the same windows...
    assert not torch.allclose(changed[:, 2, context:], rows[:, 2, context:])  # ...dreamt under other actions

    image = tool.dream_image(rows, captions, context, title)
    cell_w, cell_h = 2 * 64 + 8, 2 * 64 + 34  # frames scaled 2x, a 2-line caption under each
    assert image.shape == (18 * 4 + 8 + 4 * (4 * cell_h + 12), 120 + 7 * cell_w, 3)  # a 4-line title
