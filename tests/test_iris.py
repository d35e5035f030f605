"""Unit tests for the IRIS model half of iris.py (CPU, tiny sizes, seconds)."""

import json
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

import iris
from tests.tiny_runs import run_games_together

pytestmark = pytest.mark.timeout(120)

NUM_ACTIONS = 3


@pytest.fixture
def args():
    torch.manual_seed(0)
    return iris.Args(**iris.TINY)


def random_frames(*shape):
    return torch.randint(0, 256, (*shape, 3, 64, 64), dtype=torch.uint8)


def valid_sequence(a, B, steps):
    """Interleaved ids: frame tokens in [0, vocab), action ids in [0, NUM_ACTIONS)."""
    obs = torch.randint(0, a.tok_vocab_size, (B, steps, 16))
    act = torch.randint(0, NUM_ACTIONS, (B, steps, 1))
    return torch.cat([obs, act], dim=2).flatten(1)


def final_hidden(wm, seq):
    """Hidden states after the final LayerNorm, (B, T, d), via a forward hook."""
    out = {}
    handle = wm.ln_f.register_forward_hook(lambda m, i, o: out.setdefault("h", o))
    wm(seq)
    handle.remove()
    return out["h"]


def test_quantize_picks_nearest_code(args):
    tok = iris.Tokenizer(args)
    z = torch.randn(3, args.tok_embed_dim, 4, 4) * 0.01
    tokens, z_q = tok.quantize(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, args.tok_embed_dim)
    nearest = torch.cdist(flat, tok.codebook.weight).argmin(1).view(3, 16)  # brute-force Euclidean
    assert torch.equal(tokens, nearest)
    assert torch.allclose(
        z_q.permute(0, 2, 3, 1).reshape(-1, args.tok_embed_dim), tok.codebook.weight[nearest.flatten()]
    )


def test_straight_through_copies_gradient(args):
    tok = iris.Tokenizer(args)
    _, z, z_q = tok.encode(random_frames(2))
    z.retain_grad()
    z_st = iris.straight_through(z, z_q)
    z_st.retain_grad()
    assert torch.allclose(z_st, z_q, atol=1e-6)  # forward value is the quantised one
    tok.decode_latent(z_st).square().sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert torch.allclose(z.grad, z_st.grad)  # backward is the identity
    assert tok.codebook.weight.grad is None  # the reconstruction path does not train the codebook


def test_autoencoder_shapes_and_loss(args):
    tok = iris.Tokenizer(args)
    frames = random_frames(4)
    tokens, _, _ = tok.encode(frames)
    assert tokens.shape == (4, 16) and tokens.dtype == torch.long
    assert tokens.min() >= 0 and tokens.max() < args.tok_vocab_size
    for recon in (tok.decode(tokens), tok.encode_decode(frames)):
        assert recon.shape == (4, 3, 64, 64) and recon.min() >= 0 and recon.max() <= 1
    assert tok.encode(random_frames(2, 5))[0].shape == (2, 5, 16)  # leading dims are kept
    loss, parts = iris.tokenizer_loss(tok, frames, args.tok_beta)
    loss.backward()
    assert torch.isfinite(loss) and set(parts) == {"codebook", "commitment", "reconstruction"}
    assert tok.codebook.weight.grad.abs().sum() > 0 and tok.encoder[0].weight.grad.abs().sum() > 0


def test_labels_alignment():
    tokens = torch.arange(32).view(1, 2, 16)  # frame 1 = 0..15, frame 2 = 16..31
    rewards, ends = torch.tensor([[-2.0, 0.5]]), torch.tensor([[False, True]])
    obs, reward, end = iris.world_model_labels(tokens, rewards, ends, torch.ones(1, 2, dtype=torch.bool))
    assert obs.tolist() == [list(range(1, 32))]  # flatten(tokens)[1:]
    assert obs[0, 14] == 15 and obs[0, 15] == 16  # token 14 -> token 15; action 1 -> next frame's token 0
    assert reward.tolist() == [[0, 2]] and end.tolist() == [[0, 1]]
    obs, reward, end = iris.world_model_labels(tokens, rewards, ends, torch.tensor([[True, False]]))
    assert obs.tolist() == [list(range(1, 16)) + [-100] * 16]  # padded second step is ignored
    assert reward.tolist() == [[0, -100]] and end.tolist() == [[0, -100]]


def test_heads_read_the_right_positions(args):
    wm = iris.WorldModel(args, NUM_ACTIONS).eval()
    seq = valid_sequence(args, 2, 2)  # 34 tokens
    obs_logits, reward_logits, end_logits = wm(seq)
    h = final_hidden(wm, seq)
    obs_positions = list(range(15)) + [16] + list(range(17, 32)) + [33]  # never in-block position 15
    act_positions = [16, 33]
    assert obs_logits.shape == (2, 32, args.tok_vocab_size)
    assert torch.allclose(obs_logits, wm.head_obs(h[:, obs_positions]))
    assert torch.allclose(reward_logits, wm.head_reward(h[:, act_positions])) and reward_logits.shape[-1] == 3
    assert torch.allclose(end_logits, wm.head_end(h[:, act_positions])) and end_logits.shape[-1] == 2


def test_world_model_loss_pairs_predictions_with_labels(args):
    tok, wm = iris.Tokenizer(args), iris.WorldModel(args, NUM_ACTIONS).eval()
    B, L = 2, 3
    frames, actions = random_frames(B, L), torch.randint(0, NUM_ACTIONS, (B, L))
    rewards, ends = torch.tensor([[0.0, 1.0, -1.0], [0.0, 0.0, 0.0]]), torch.zeros(B, L, dtype=torch.bool)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    loss, parts = iris.world_model_loss(wm, tok.encode_real(frames, mask), actions, rewards, ends, mask)
    tokens = tok.encode(frames)[0]  # plain reference path: every frame encoded, the padded one too (official)
    obs_logits = wm(torch.cat([tokens, actions[..., None]], 2).flatten(1))[0]
    # hand pairing for the first, fully real row: prediction i is scored against flatten(tokens)[i + 1]
    ce = torch.nn.functional.cross_entropy(obs_logits[0, :-1], tokens[0].flatten()[1:])
    ce_masked = torch.nn.functional.cross_entropy(
        obs_logits[1, :31], tokens[1].flatten()[1:32]
    )  # 2 real steps
    n0, n1 = 47, 31
    assert torch.allclose(parts["obs"], (ce * n0 + ce_masked * n1) / (n0 + n1), atol=1e-5)
    assert torch.allclose(loss, parts["obs"] + parts["reward"] + parts["end"])


def test_kv_cache_matches_full_forward(args):
    wm = iris.WorldModel(args, NUM_ACTIONS).eval()
    seq = valid_sequence(args, 3, 3)  # 51 tokens
    with torch.no_grad():
        full = wm(seq)
        cache = wm.new_cache(3)
        # a 16-token reset, single tokens, and one 8-token chunk on top of a non-empty cache
        bounds = [0, 16, 17, 25] + list(range(26, seq.shape[1] + 1))
        parts = [wm(seq[:, s:e], cache) for s, e in zip(bounds[:-1], bounds[1:])]
    assert cache.length == seq.shape[1]
    for i in range(3):  # obs, reward, end logits
        assert torch.allclose(full[i], torch.cat([p[i] for p in parts], dim=1), atol=1e-5)


def test_attention_is_causal(args):
    wm = iris.WorldModel(args, NUM_ACTIONS).eval()
    seq = valid_sequence(args, 1, 2)
    changed = seq.clone()
    changed[0, 20] = (seq[0, 20] + 1) % args.tok_vocab_size  # a frame token of step 2
    with torch.no_grad():
        h, h_changed = final_hidden(wm, seq), final_hidden(wm, changed)
    assert torch.allclose(h[:, :20], h_changed[:, :20], atol=1e-6)
    assert not torch.allclose(h[:, 20:], h_changed[:, 20:], atol=1e-6)


def test_weight_decay_only_on_linear_weights(args):
    wm = iris.WorldModel(args, NUM_ACTIONS)
    decay, rest = iris.adamw_param_groups(wm, 0.01)
    assert len(decay["params"]) + len(rest["params"]) == len(list(wm.parameters()))
    assert any(p is wm.head_obs[0].weight for p in decay["params"])
    assert all(p is not wm.obs_emb.weight and p is not wm.pos_emb.weight for p in decay["params"])
    assert all(p.dim() == 2 for p in decay["params"])


def test_lambda_returns_hand_computed():
    rewards = torch.tensor([[1.0, 2.0, 9.0], [0.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 1.0, 3.0], [0.0, 2.0, 4.0]])
    ends = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    # row 1: L2 = 3; L1 = 2 + 0 (terminated); L0 = 1 + 0.9 (0.5 * 1 + 0.5 * 2) = 2.35
    # row 2: L2 = 4; L1 = 0.9 (0.5 * 4 + 0.5 * 4) = 3.6; L0 = 0.9 (0.5 * 2 + 0.5 * 3.6) = 2.52
    expected = torch.tensor([[2.35, 2.0, 3.0], [2.52, 3.6, 4.0]])
    assert torch.allclose(iris.lambda_returns(rewards, values, ends, 0.9, 0.5), expected, atol=1e-6)


def test_actor_critic_loss_ignores_last_step():
    log_probs = torch.randn(2, 4, requires_grad=True)
    values = torch.randn(2, 4, requires_grad=True)
    imagined = dict(
        log_probs=log_probs,
        entropies=torch.rand(2, 4),
        values=values,
        rewards=torch.randn(2, 4),
        ends=torch.zeros(2, 4),
    )
    loss, _ = iris.actor_critic_loss(imagined, 0.99, 0.95, 0.001)
    loss.backward()
    assert torch.all(log_probs.grad[:, -1] == 0) and torch.all(log_probs.grad[:, :-1] != 0)
    assert torch.all(values.grad[:, -1] == 0)  # V_{H-1} only bootstraps (detached)


def test_actor_critic_loss_masks_steps_after_the_first_imagined_end():
    ends = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])  # row 0 ends at step 1
    for mask_after_end, counted in (
        (True, [[1, 1, 0, 0], [1, 1, 1, 1]]),
        (False, [[1, 1, 1, 1], [1, 1, 1, 1]]),
    ):
        log_probs = torch.randn(2, 5, requires_grad=True)
        imagined = dict(
            log_probs=log_probs,
            entropies=torch.rand(2, 5),
            values=torch.randn(2, 5),
            rewards=torch.randn(2, 5),
            ends=ends,
        )
        loss, _ = iris.actor_critic_loss(imagined, 0.99, 0.95, 0.001, mask_after_end)
        loss.backward()
        assert torch.equal((log_probs.grad[:, :-1] != 0).long(), torch.tensor(counted)), mask_after_end


def test_burn_in_respects_mask():
    torch.manual_seed(0)
    ac = iris.ActorCritic(NUM_ACTIONS, 32)
    frames = torch.rand(2, 4, 3, 64, 64)
    mask = torch.tensor([[True] * 4, [False, False, True, True]])
    with torch.no_grad():
        h, c = ac.burn_in(frames, mask)
        padded, real = frames.clone(), frames.clone()
        padded[1, :2] = torch.rand(2, 3, 64, 64)
        real[1, 2] = torch.rand(3, 64, 64)
        h_padded, _ = ac.burn_in(padded, mask)
        h_real, _ = ac.burn_in(real, mask)
        h_short, _ = ac.burn_in(frames[1:, 2:], torch.ones(1, 2, dtype=torch.bool))
    assert torch.allclose(h[1], h_padded[1])  # padded frames are ignored
    assert not torch.allclose(h[1], h_real[1])  # real frames matter
    assert torch.allclose(h[1:], h_short, atol=1e-6)  # same as starting at the first real frame
    assert torch.allclose(h[0], h_real[0])  # rows are independent


def test_imagine_shapes_and_gradients(args):
    tok, wm = iris.Tokenizer(args), iris.WorldModel(args, NUM_ACTIONS)
    ac = iris.ActorCritic(NUM_ACTIONS, args.ac_lstm_dim)
    B, H = 3, args.imagine_horizon  # H == wm_sequence_length fills the context exactly
    mask = torch.ones(B, args.burn_in + 1, dtype=torch.bool)
    mask[0, :2] = False
    out = iris.imagine(tok, wm, ac, tok.encode_real(random_frames(B, args.burn_in + 1), mask), mask, H)
    assert set(out) == {"log_probs", "entropies", "values", "rewards", "ends"}
    assert all(v.shape == (B, H) for v in out.values())
    assert set(out["rewards"].unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert set(out["ends"].unique().tolist()) <= {0.0, 1.0}
    assert not wm.training and not tok.training  # dropout off while imagining
    loss, _ = iris.actor_critic_loss(out, args.gamma, args.lam, args.entropy_coef)
    loss.backward()
    assert ac.actor.weight.grad is not None and ac.cnn[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in list(wm.parameters()) + list(tok.parameters()))


# ------------------------------------------------------------------------------------------------
# Replay, wrappers on real ALE games, the command line, learning and an end-to-end run.
# ------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def test_replay_segments_pad_outside_the_episode():
    replay = iris.Replay(capacity=10, frame_shape=(3, 64, 64), seed=0)
    for i in range(10):  # two episodes: steps 0..3 and 4..9 (the second still going on)
        replay.add_frame(np.full((3, 64, 64), i, np.uint8), first=i in (0, 4))
        replay.add_step(0, float(i), i == 3, False)
    for _ in range(20):
        frames, _, rewards, ends, mask = replay.segments(4, 6, from_start=True, device="cpu")
        starts = rewards[:, 0].long()
        episode_end = torch.where(starts < 4, 4, 10)
        assert torch.equal(mask, (starts[:, None] + torch.arange(6)) < episode_end[:, None])  # right-padded
        frames, _, rewards, _, mask = replay.segments(4, 3, from_start=False, device="cpu")
        assert mask[:, -1].all()  # the last frame of an actor-critic segment is always real
        last = rewards[:, -1].long()
        episode_start = torch.where(last < 4, 0, 4)
        assert torch.equal(
            mask, (last[:, None] - 2 + torch.arange(3)) >= episode_start[:, None]
        )  # left-padded


def test_kept_tokens_equal_fresh_ones_and_each_frame_is_encoded_once(args):
    tok = iris.Tokenizer(args).eval()
    replay = iris.Replay(capacity=30, frame_shape=(3, 64, 64), seed=0)
    for i in range(30):  # episodes of 7 steps
        replay.add_frame(random_frames(1)[0].numpy(), first=i % 7 == 0)
        replay.add_step(0, 0.0, i % 7 == 6, False)
    encoded = []  # frames through the encoder
    tok.encoder.register_forward_hook(lambda module, inputs, output: encoded.append(len(inputs[0])))
    for from_start in (True, False):  # world-model and actor-critic segments
        replay.rng = np.random.default_rng(1)
        fresh, *_, mask = replay.segments(8, 5, from_start, "cpu", tok)  # the current tokenizer, every call
        replay.rng = np.random.default_rng(1)
        kept_before, encoded[:] = (replay.tokens[:, 0] >= 0).sum(), []
        kept, *_, kept_mask = replay.segments(8, 5, from_start, "cpu", tok, keep_tokens=True)
        assert (
            sum(encoded) == (replay.tokens[:, 0] >= 0).sum() - kept_before > 0
        )  # only frames not kept before
        assert torch.equal(mask, kept_mask) and not mask.all()  # the same segments, with some padding
        assert torch.equal(kept[mask], fresh[mask])
    replay.segments(256, 5, True, "cpu", tok, keep_tokens=True)
    assert (replay.tokens[:30] >= 0).all()  # every frame used and kept
    encoded.clear()
    replay.segments(256, 5, False, "cpu", tok, keep_tokens=True)
    assert encoded == []  # nothing encoded twice
    iris.train_tokenizer(tok, torch.optim.Adam(tok.parameters()), replay, args, "cpu")
    assert (replay.tokens == -1).all()  # a tokenizer update drops every kept token


def make_atari(env_id, train):
    return iris.make_env(iris.parse_args(["--env-id", env_id]), train=train)


@pytest.mark.timeout(120)
def test_atari_wrappers_rgb_frames_and_soft_reset_after_life_loss():
    env = make_atari("BreakoutNoFrameskip-v4", train=True)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (3, 64, 64) and obs.dtype == np.uint8 and env.action_space.n == 4
    ale, lives = env.unwrapped.ale, env.unwrapped.ale.lives()
    for _ in range(5000):
        _, _, terminated, truncated, _ = env.step(
            1 if np.random.rand() < 0.5 else 0
        )  # FIRE often: no FIRE wrapper
        if terminated:
            break
    assert terminated and 0 < ale.lives() < lives
    frame = ale.getEpisodeFrameNumber()
    env.reset()
    assert ale.getEpisodeFrameNumber() > frame and ale.lives() == lives - 1


@pytest.mark.timeout(120)
def test_noops_per_mode():
    def start_frames(train):
        env = make_atari("PongNoFrameskip-v4", train=train)
        return {env.reset(seed=seed)[1]["episode_frame_number"] for seed in range(8)}

    assert len(start_frames(train=True)) > 1  # up to 30 random no-ops
    assert start_frames(train=False) == {1}  # exactly one no-op frame (official: no-ops are raw frames)


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
        [sys.executable, "iris.py", "--env-id", env_id], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def run_script(tmp_path, *flags, timeout, suffix=""):
    run = f"test_{tmp_path.name}{suffix}"
    shutil.rmtree(ROOT / "runs" / run, ignore_errors=True)  # a folder that holds a run is refused
    subprocess.run(
        [sys.executable, "iris.py", "--run-name", run, *flags],
        cwd=ROOT,
        check=True,
        timeout=timeout,
        stdout=subprocess.DEVNULL,
    )
    return json.loads((ROOT / "runs" / run / "summary.json").read_text())


def scalars(run_dir):
    """{tag: [values]} of a run's TensorBoard scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [event.value for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


GAMES = ["tests.catch:Catch-v0", "tests.gather:Gather-v0"]


@pytest.mark.timeout(1000)
def test_tiny_preset_learns_catch_and_gather(tmp_path):
    # the preset's whole budget, seed 1, both games at once: about 9.5 minutes on 2 cores. Each must end above
    # its bar, the random return plus half the gap to the optimum (Catch -0.50 -> 1, Gather 0.97 -> 3), and
    # the losses of every component must have fallen
    catch, gather = run_games_together("iris.py", tmp_path, GAMES, 980)
    logged = scalars(ROOT / "runs" / f"test_{tmp_path.name}_0")
    first, last = (lambda tag: np.mean(logged[tag][:3]), lambda tag: np.mean(logged[tag][-3:]))
    assert last("losses/reconstruction") < 0.2 * first("losses/reconstruction"), logged[
        "losses/reconstruction"
    ]
    assert last("losses/next_tokens") < 0.2 * first("losses/next_tokens"), logged["losses/next_tokens"]
    assert last("losses/end") < 0.5 * first("losses/end"), logged["losses/end"]
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
        "200",
        "--epochs",
        "3",
        "--tok-steps-per-epoch",
        "2",
        "--wm-steps-per-epoch",
        "2",
        "--ac-steps-per-epoch",
        "2",
        "--ac-start-after",
        "2",
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
        "300",
        "--epochs",
        "3",
        "--tok-steps-per-epoch",
        "4",
        "--wm-steps-per-epoch",
        "4",
        "--ac-steps-per-epoch",
        "4",
        "--ac-start-after",
        "2",
        "--log-every",
        "2",
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
    "--tok-start-after",
    "0",
    "--wm-start-after",
    "1",
    "--ac-start-after",
    "2",
    "--tok-steps-per-epoch",
    "3",
    "--wm-steps-per-epoch",
    "3",
    "--ac-steps-per-epoch",
    "3",
    "--log-every",
    "1",
    "--eval-episodes",
    "2",
]


def iris_cli(*flags, timeout=120):
    """iris.py in a subprocess; its CompletedProcess, output as text."""
    return subprocess.run(
        [sys.executable, "iris.py", *flags], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def losses(run_dir):
    """{tag: [(step, value)]} of the losses/ scalars a run wrote, in the order written."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
        if tag.startswith("losses/")
    }


def resume_copy(checkpoint, name):
    """A fresh run folder holding `checkpoint`; returns the path of its checkpoint.pt."""
    folder = ROOT / "runs" / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    torch.save(checkpoint, folder / "checkpoint.pt", pickle_module=iris.cloudpickle)
    return folder / "checkpoint.pt"


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory):
    """The end checkpoint of a 2-epoch tiny Catch run (tokenizer and world model trained)."""
    tmp_path = tmp_path_factory.mktemp("iris_checkpoint")
    run_script(tmp_path, *SHORT, "--epochs", "2", "--total-timesteps", "200", timeout=120)
    return ROOT / "runs" / f"test_{tmp_path.name}" / "checkpoint.pt"


@pytest.mark.timeout(240)
def test_resume_gives_the_losses_of_the_uninterrupted_run(tmp_path):
    # The end checkpoint of a 3-epoch run is the state after epoch 3 of the same run made 4 epochs long
    # (--epochs and
    # --total-timesteps change nothing before its end, and the end checkpoint is written before the final
    # evaluation). Resumed with 4 epochs, it must log exactly the losses of the 4-epoch run.
    full = run_script(
        tmp_path, *SHORT, "--epochs", "4", "--total-timesteps", "400", timeout=120, suffix="_full"
    )
    run_script(tmp_path, *SHORT, "--epochs", "3", "--total-timesteps", "300", timeout=120, suffix="_first")
    checkpoint = torch.load(
        ROOT / "runs" / f"test_{tmp_path.name}_first" / "checkpoint.pt", weights_only=False
    )
    assert checkpoint["counters"][:3] == (4, 300, [9, 6, 3])  # epoch to enter, agent steps, gradient steps
    checkpoint["args"].update(epochs=4, total_timesteps=400)
    path = resume_copy(checkpoint, f"test_{tmp_path.name}_resumed")
    result = iris_cli("--resume", str(path))
    assert result.returncode == 0, result.stderr[-2000:]
    expected = {
        tag: [(step, value) for step, value in values if step > 300]
        for tag, values in losses(ROOT / "runs" / f"test_{tmp_path.name}_full").items()
    }
    assert len(expected) >= 9 and all(
        len(values) == 3 for values in expected.values()
    )  # 3 steps of each component
    assert losses(path.parent) == expected
    assert (
        json.loads((path.parent / "summary.json").read_text())["eval_return_mean"] == full["eval_return_mean"]
    )


@pytest.mark.timeout(240)
def test_sigterm_saves_a_checkpoint_that_resumes_exactly(tmp_path):
    # Wherever SIGTERM lands (collection or a component's gradient steps), the resumed run continues the
    # uninterrupted one: its losses are the tail of the full run's.
    flags = [*SHORT, "--epochs", "4", "--total-timesteps", "400"]
    run_script(tmp_path, *flags, timeout=120, suffix="_full")
    run = f"test_{tmp_path.name}"
    shutil.rmtree(ROOT / "runs" / run, ignore_errors=True)
    process = subprocess.Popen(
        [sys.executable, "iris.py", *flags, "--run-name", run],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().startswith("protocol:")  # then the networks, the replay and the handlers
    time.sleep(5)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert (
        f"interrupted: checkpoint saved to {Path('runs') / run / 'checkpoint.pt'}; resume with --resume"
        in stdout
    )
    checkpoint = torch.load(ROOT / "runs" / run / "checkpoint.pt", weights_only=False)
    assert checkpoint["script"] == "iris" and "Traceback" not in stderr
    path = resume_copy(checkpoint, f"{run}_resumed")
    result = iris_cli("--resume", str(path))
    assert result.returncode == 0, result.stderr[-2000:]
    full, resumed = losses(ROOT / "runs" / f"{run}_full"), losses(path.parent)
    assert resumed and all(full[tag][-len(values) :] == values for tag, values in resumed.items()), (
        checkpoint["counters"]
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--tok-lr", "1e30"],
            "error: loss observation_model is nan at update 2; stopped without writing a checkpoint "
            "(last good one: none)",
        ),  # caught where the losses are logged
        (
            ["--ac-lr", "1e30", "--save-every", "100"],
            "error: a network output NaN in epoch 3; stopped without writing a "
            "checkpoint (last good one: runs/",
        ),  # caught in torch.distributions
    ],
    ids=["logged loss", "network output"],
)
def test_non_finite_training_stops_without_a_checkpoint(tmp_path, flags, message):
    run = f"test_{tmp_path.name}"
    shutil.rmtree(ROOT / "runs" / run, ignore_errors=True)
    result = iris_cli(*SHORT, "--epochs", "4", "--total-timesteps", "400", "--run-name", run, *flags)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert message in result.stderr.strip().splitlines()[-1], result.stderr[-2000:]
    path = ROOT / "runs" / run / "checkpoint.pt"
    assert (
        not path.exists()
        if "none" in message
        else torch.load(path, weights_only=False)["counters"][:2] == (3, 200)
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
        ("other script", "is not a checkpoint of iris.py but of twm.py; pass it to twm.py"),
        ("run exists", "already holds a run; pass another --run-name, or continue it with --resume"),
    ],
)
def test_checkpoint_problems_stop_with_one_line(tmp_path, checkpoint_path, problem, message):
    flags = ["--resume", str(tmp_path / "checkpoint.pt")]
    if problem == "truncated":
        data = checkpoint_path.read_bytes()
        (tmp_path / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    elif problem == "other script":
        torch.save({"script": "twm", "args": {}}, tmp_path / "checkpoint.pt")
    elif problem == "run exists":
        flags = ["--env-id", "tests.catch:Catch-v0", "--run-name", checkpoint_path.parent.name]
    result = iris_cli(*flags, timeout=60)
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


@pytest.mark.timeout(60)
def test_dream_rows_follow_the_real_actions_after_the_context(tmp_path, args):
    env = iris.make_env(iris.parse_args(["--env-id", "tests.catch:Catch-v0"]), train=True)
    replay = iris.Replay(60, env.observation_space.shape, 0)
    replay.add_frame(env.reset(seed=0)[0], first=True)
    for _ in range(60):  # random play: 7-step episodes
        action = env.action_space.sample()
        obs, reward, terminated, truncated, _ = env.step(action)
        replay.add_step(action, reward, terminated, truncated)
        replay.add_frame(env.reset()[0] if terminated or truncated else obs, first=terminated or truncated)
    tokenizer, world_model = iris.Tokenizer(args).eval(), iris.WorldModel(args, NUM_ACTIONS).eval()
    torch.nn.init.normal_(tokenizer.codebook.weight)  # untrained, yet distinct codes and actions that matter
    torch.nn.init.normal_(world_model.act_emb.weight, std=3.0)
    torch.nn.init.normal_(world_model.head_obs[-1].weight)  # peaked next-token distributions
    rows, captions, context, title = tool.iris_dream(tokenizer, world_model, replay, args, step=7)
    assert (
        rows.shape == (4, 4, 7, 3, 64, 64) and context == 2
    )  # 8-frame windows do not fit in a 7-step episode
    torch.testing.assert_close(rows[:, 2, :context], rows[:, 1, :context])  # context: the reconstructions
    assert captions[0][2][:2] == ["context"] * 2 and captions[0][2][2].startswith("dream\nr=")
    again, _, _, _ = tool.iris_dream(tokenizer, world_model, replay, args, step=7)
    torch.testing.assert_close(again, rows)  # seeded by the step
    replay.actions[: replay.size] = (replay.actions[: replay.size] + 1) % NUM_ACTIONS
    changed, _, _, _ = tool.iris_dream(tokenizer, world_model, replay, args, step=7)
    torch.testing.assert_close(changed[:, :2], rows[:, :2])  # the same windows...
    assert not torch.allclose(changed[:, 2, context:], rows[:, 2, context:])  # ...dreamt under other actions

    image = tool.dream_image(rows, captions, context, title)
    cell_w, cell_h = 2 * 64 + 8, 2 * 64 + 34  # frames scaled 2x, a 2-line caption under each
    assert image.shape == (18 * 4 + 8 + 4 * (4 * cell_h + 12), 120 + 7 * cell_w, 3)  # a 4-line title


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--imagine-horizon", "30"], "--imagine-horizon 30 must be at most --wm-sequence-length 8"),
        (["--tok-stop-after", "1"], "--tok-stop-after 1 must be 0 (never stop) or above --tok-start-after 1"),
        (["--total-timesteps", "0"], "must be positive"),
    ],
)
def test_bad_flag_value_stops_with_one_line(flags, message):
    result = iris_cli("--preset", "tiny", "--env-id", "tests.catch:Catch-v0", *flags, timeout=60)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
