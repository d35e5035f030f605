"""Tests of twm.py: the maths against hand-computed values, the Transformer-XL cache, the wrappers, learning."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import twm

ROOT = Path(__file__).resolve().parents[1]


def tiny_args(**overrides):
    return twm.parse_args(["--preset", "tiny", "--env-id", "tests.catch:Catch-v0",
                           *[f"--{k.replace('_', '-')}={v}" for k, v in overrides.items()]])


@pytest.mark.timeout(30)
def test_lambda_advantages_with_predicted_discounts_and_restarts():
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 1.0, -1.0, 3.0]])
    discounts = torch.tensor([[0.9, 0.0, 0.8]])  # the middle step ended an imagined episode: γ' = γ̂(1 - d) = 0
    lam = 0.5
    # by hand, backwards from A_3 = 0:
    a2 = 2.0 + 0.8 * 3.0 - (-1.0)                  # 5.4
    a1 = 0.0 + 0.0 * -1.0 - 1.0 + lam * 0.0 * a2    # -1.0: nothing flows across the restart
    a0 = 1.0 + 0.9 * 1.0 - 0.5 + lam * 0.9 * a1     # 0.95
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
    rollout = (torch.zeros(n, h + 1, 4), torch.zeros(n, h, dtype=torch.long), torch.zeros(n, h), torch.ones(n, h),
               torch.zeros(n, h, dtype=torch.bool), torch.ones(n, h))
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
    assert twm.observation_losses(obs_model, uniform, uniform.exp().flatten(-2), obs[0, :3], args)[1].item() == 0
    assert twm.observation_losses(obs_model, peaked, peaked.exp().flatten(-2), obs[0, :3], args)[1].item() == \
        pytest.approx(0.5)
    # next-z cross-entropy: a uniform prediction costs Σ over the 16 categoricals of ln 16, whatever the target
    nn.init.zeros_(dyn.z_head[-1].weight)
    nn.init.zeros_(dyn.z_head[-1].bias)
    dyn.eval()
    batch = (obs, torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool),
             torch.zeros(2, 3, dtype=torch.bool))
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
    z = torch.nn.functional.one_hot(torch.randint(0, args.z_classes, (batch, steps, args.z_categoricals)),
                                    args.z_classes).float().flatten(-2)
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
        before, after = dyn(z, actions, rewards, dones), dyn(changed_z, changed_actions, changed_rewards, dones)
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
@pytest.mark.parametrize("env_id, message", [
    ("NoSuchGame-v0", "unknown env id"),
    ("Pendulum-v1", "needs Discrete actions"),
    ("CartPole-v1", "needs uint8 images"),
])
def test_bad_env_stops_with_one_line(env_id, message):
    result = subprocess.run([sys.executable, "twm.py", "--env-id", env_id], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def run_script(tmp_path, *flags, timeout, suffix=""):
    run = f"test_{tmp_path.name}{suffix}"
    subprocess.run([sys.executable, "twm.py", "--run-name", run, *flags], cwd=ROOT, check=True, timeout=timeout,
                   stdout=subprocess.DEVNULL)
    return json.loads((ROOT / "runs" / run / "summary.json").read_text())


@pytest.mark.timeout(480)
def test_tiny_preset_learns_catch(tmp_path):
    summary = run_script(tmp_path, "--preset", "tiny", "--env-id", "tests.catch:Catch-v0", timeout=470)
    # optimum +1, uniformly random policy about -0.5
    assert summary["eval_return_mean"] >= 0.7, summary


@pytest.mark.timeout(300)
def test_end_to_end_on_real_pong_writes_summary(tmp_path):
    summary = run_script(tmp_path, "--preset", "tiny", "--env-id", "PongNoFrameskip-v4", "--total-timesteps", "300",
                         "--prefill", "200", "--pretrain-obs-updates", "5", "--pretrain-dyn-updates", "5",
                         "--pretrain-ac-updates", "5", "--final-eval-episodes", "1", timeout=290)
    assert set(summary) >= {"env_id", "seed", "total_timesteps", "eval_episodes", "eval_return_mean",
                            "eval_return_std", "wall_seconds", "human_normalized_score"}
    assert summary["env_id"] == "PongNoFrameskip-v4" and -21 <= summary["eval_return_mean"] <= 21


def logged_losses(run):
    """{tag: [values]} of the losses/ scalars that a run wrote to TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(ROOT / "runs" / run))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"] if tag.startswith("losses/")}


@pytest.mark.timeout(300)
def test_same_seed_same_losses(tmp_path):
    flags = ["--preset", "tiny", "--env-id", "tests.catch:Catch-v0", "--total-timesteps", "560", "--prefill", "500", "--pretrain-obs-updates", "5",
                 "--pretrain-dyn-updates", "5", "--pretrain-ac-updates", "5", "--log-every", "10",
                 "--final-eval-episodes", "2"]
    for suffix in ("_a", "_b"):
        run_script(tmp_path, *flags, timeout=140, suffix=suffix)
    first, second = logged_losses(f"test_{tmp_path.name}_a"), logged_losses(f"test_{tmp_path.name}_b")
    assert len(first) >= 6 and all(len(values) >= 2 for values in first.values())
    assert first == second
