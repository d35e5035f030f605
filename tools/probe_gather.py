"""How fast each part of an agent learns a test game (Gather unless --env-id says), each part alone.

    python tools/probe_gather.py world-model twm.py [flags]    # a fresh TWM world model on 3,000 random steps
    python tools/probe_gather.py world-model twm.py --frozen-encoder [flags]  # observation model first, alone
    python tools/probe_gather.py world-model iris.py [flags]   # a fresh IRIS tokenizer, then its GPT, on them
    python tools/probe_gather.py world-model twm.py --replay runs/<run>/checkpoint.pt [flags]  # a run's data
    python tools/probe_gather.py world-model twm.py --actor-critic 1000 [flags]  # then the actor-critic alone
    python tools/probe_gather.py world-model iris.py --actor-critic 250 --real-game  # on the real game
    python tools/probe_gather.py world-model iris.py --actor-critic 250 --real-game --raw-frames  # its frames
    python tools/probe_gather.py actor-critic runs/<iris run>/checkpoint.pt     # more IRIS actor-critic steps

`world-model` trains only the world model of `--preset tiny` (plus any flags) for --steps updates on one
thread and every 500 prints the wall time of the updates and, on Gather, the reward recall and the one-step
accuracy of tools/diagnose_gather.py (TWM also the oracle dream). TWM's world-model updates are joint (the
encoder learns with the dynamics, as in a run after pretraining); with --frozen-encoder the observation model
first trains alone for the preset's pretraining updates and the --steps updates train the dynamics on its
frozen code (as pretraining does). IRIS first trains its tokenizer for the preset's tokenizer epochs, then
keeps its tokens.

With `--actor-critic N` a fresh actor-critic then trains alone for N updates inside the frozen world model,
or with --real-game on rollouts of the real game (the same batch and horizon; frames through the frozen
encoder or tokenizer), so that the world model's part in what it learns shows. It prints the real return
(32 games) every 250 updates (IRIS: 50), TWM also the policy's entropy and the imagined reward per step, and
in a TWM world model on Gather at the end where the imagined reward comes from: steps onto the goal (read
off the dreamt frames), other readable steps, unreadable frames. `actor-critic` goes on training the
actor-critic of an IRIS checkpoint inside its frozen tokenizer and world model, and every 200 steps plays 32
real games at the evaluation temperature.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.distributions import Categorical

sys.path.insert(0, str(Path(__file__).resolve().parent))
import diagnose_gather as diagnose  # noqa: E402  (it puts the repository on the path)

import iris  # noqa: E402
import twm  # noqa: E402


def on_gather(args):
    return "gather" in args.env_id.lower()


def twm_replay(args, checkpoint, steps=3000):
    """`steps` steps of uniformly random play (seed 99), or the replay stored in a run's checkpoint."""
    env = twm.make_env(args, train=True)
    stored = checkpoint and torch.load(checkpoint, map_location="cpu", weights_only=False)["replay"]
    steps = len(stored["actions"]) if checkpoint else steps  # a checkpoint's replay holds its filled part
    replay = twm.Replay(steps, env.observation_space.shape, args.frame_stack, args.buffer_temperature, 1)
    if checkpoint:
        vars(replay).update(
            {
                k: stored[k]
                for k in ("frames", "episode_start", "actions", "rewards", "terminated", "truncated", "size")
            }
        )
        return replay
    frames, actions, rewards, first = diagnose.random_play(twm, args, steps)
    for i, action in enumerate(actions):
        replay.add_frame(frames[i], first[i])
        replay.add_step(action, rewards[i], first[i + 1], False)
    replay.add_frame(frames[-1], first[-1])
    return replay


def twm_observation_step(obs_model, optimizer, replay, args):
    """One update of the observation model alone, as in pretraining."""
    index = replay.rng.choice(replay.size + 1, args.pretrain_obs_batch, replace=False)
    stacks = torch.as_tensor(replay.stacks(index))
    log_q = obs_model.encode(stacks)
    twm.optimize(
        sum(twm.observation_losses(obs_model, log_q, twm.sample_z(log_q), stacks, args)),
        [optimizer],
        args.wm_grad_clip,
    )


def probe_twm(args, steps, checkpoint, frozen_encoder, ac_steps, real_game):
    replay = twm_replay(args, checkpoint)
    actions = int(twm.make_env(args, train=False).action_space.n)
    obs_model = twm.ObservationModel(args, args.frame_stack * replay.frames.shape[1])
    dyn = twm.DynamicsModel(args, actions)
    actor = twm.mlp(
        args.z_categoricals * args.z_classes, args.ac_hidden_dim, actions, args.ac_layers
    )  # untouched
    optimizers = [
        torch.optim.Adam(m.parameters(), args.wm_lr, eps=args.adam_eps, weight_decay=args.weight_decay)
        for m in (obs_model, dyn)
    ]
    start = time.perf_counter()
    for _ in range(args.pretrain_obs_updates if frozen_encoder else 0):
        twm_observation_step(obs_model, optimizers[0], replay, args)
    if frozen_encoder:
        print(
            f"observation model alone: {args.pretrain_obs_updates} updates, "
            f"{time.perf_counter() - start:.0f} s"
        )
    seconds = 0.0
    for step in range(1, steps + 1):
        start = time.perf_counter()
        starts = replay.sample_starts(
            args.wm_batch_size, args.wm_sequence_length, balanced=not frozen_encoder
        )
        batch = replay.sequences(starts, args.wm_sequence_length, "cpu")
        losses, _, _ = twm.world_model_losses(obs_model, dyn, batch, args, train_encoder=not frozen_encoder)
        twm.optimize(sum(losses.values()), optimizers[frozen_encoder:], args.wm_grad_clip)
        seconds += time.perf_counter() - start
        if step % 500 == 0 and on_gather(args):
            checkpoint = dict(
                args=vars(args), models=[obs_model.state_dict(), dyn.state_dict(), actor.state_dict()]
            )
            recall, one_step, oracle = diagnose.diagnose_twm(checkpoint)[2:5]
            print(
                f"updates {step}: {seconds:.0f} s, reward recall {recall:.2f}, one-step {one_step:.2f}, "
                f"oracle dream {oracle:.3f}",
                flush=True,
            )
        elif step % 500 == 0:
            print(f"updates {step}: {seconds:.0f} s, next-z loss {float(losses['next_z']):.2f}", flush=True)
    if ac_steps:
        twm_actor_critic(args, replay, obs_model.eval(), dyn.eval(), ac_steps, real_game)


@torch.no_grad()
def imagined_batch(args, replay, obs_model, dyn, actor):
    """One imagination of the training loop, from a fresh world-model batch."""
    batch = replay.sequences(
        replay.sample_starts(args.wm_batch_size, args.wm_sequence_length), args.wm_sequence_length, "cpu"
    )
    _, z_seq, dones = twm.world_model_losses(obs_model, dyn, batch, args, train_encoder=False)
    return twm.imagine(dyn, actor, z_seq, batch[1], batch[2], dones, args)


class RealGame:
    """`ac_batch_size` real games played on by the actor: rollouts of `ac_horizon` steps shaped like those of
    imagination. TWM: z sampled from the frozen encoder, γ' = γ (1 - terminated), an end where a game was
    truncated (the next z starts a new game); IRIS: reconstructed frames, sign(r), ends."""

    def __init__(self, module, args):
        self.envs = [module.make_env(args, train=True) for _ in range(args.ac_batch_size)]
        self.frames = np.stack([env.reset(seed=1000 + i)[0] for i, env in enumerate(self.envs)])
        self.args = args

    def step(self, actions):
        """Step every game; (rewards, terminated, truncated) as arrays. A game that ends starts again."""
        out = np.zeros((3, len(self.envs)), np.float32)
        for i, env in enumerate(self.envs):
            self.frames[i], reward, terminated, truncated, _ = env.step(int(actions[i]))
            out[:, i] = reward, terminated, truncated
            if terminated or truncated:
                self.frames[i] = env.reset()[0]
        return torch.as_tensor(out)

    @torch.no_grad()
    def twm_rollout(self, obs_model, actor):
        def encode():
            return twm.sample_z(obs_model.encode(torch.as_tensor(self.frames)))

        z, columns = [encode()], []
        for _ in range(self.args.ac_horizon):
            action = Categorical(logits=actor(z[-1])).sample()
            reward, terminated, truncated = self.step(action)
            z.append(encode())
            columns.append((action, reward.tanh(), self.args.gamma * (1 - terminated), truncated.bool()))
        actions, rewards, discounts, ends = (torch.stack(c, 1) for c in zip(*columns))
        return torch.stack(z, 1), actions, rewards, discounts, ends, torch.ones_like(rewards)

    def iris_rollout(self, tokenizer, actor_critic):
        """The fields of iris.imagine() (B, H); the LSTM starts from zeros (no burn-in)."""
        with torch.no_grad():
            frame = tokenizer.encode_decode(torch.as_tensor(self.frames))
        state = actor_critic.initial_state(len(self.envs), "cpu")
        out = {k: [] for k in ("log_probs", "entropies", "values", "rewards", "ends")}
        for _ in range(self.args.imagine_horizon):
            logits, value, state = actor_critic(frame, state)
            policy = Categorical(logits=logits)
            action = policy.sample()
            reward, terminated, truncated = self.step(action)
            with torch.no_grad():
                frame = tokenizer.encode_decode(torch.as_tensor(self.frames))
            for k, v in zip(
                out,
                (
                    policy.log_prob(action),
                    policy.entropy(),
                    value,
                    reward.sign(),
                    (terminated.bool() | truncated.bool()).float(),
                ),
            ):
                out[k].append(v)
        return {k: torch.stack(v, dim=1) for k, v in out.items()}


@torch.no_grad()
def imagined_rewards(args, replay, obs_model, dyn, actor, critic, batches=20):
    """Reward, advantage and the next frame's readability of imagined steps onto the goal, other readable
    steps and steps from unreadable frames (the agent or the goal not in exactly one cell of the decoded
    frame)."""
    columns = []
    for _ in range(batches):
        z, actions, rewards, discounts, ends, _ = imagined_batch(args, replay, obs_model, dyn, actor)
        advantages = twm.lambda_advantages(rewards, critic(z).squeeze(-1), discounts * (~ends), args.lambda_)
        agent, goal = diagnose.cells(obs_model.decode(z.flatten(0, 1)).clamp(0, 1))
        readable = ((agent.sum(1) == 1) & (goal.sum(1) == 1)).view(z.shape[:2])
        a, g = (cells.float().argmax(1).view(z.shape[:2])[:, :-1] for cells in (agent, goal))
        y, x = (
            (a // 4 + diagnose.MOVES[actions, 0]).clamp(0, 3),
            (a % 4 + diagnose.MOVES[actions, 1]).clamp(0, 3),
        )
        hit = readable[:, :-1] & (y * 4 + x == g)
        columns.append(
            torch.stack([hit, readable[:, :-1], readable[:, 1:], rewards, advantages], -1).flatten(0, 1)
        )
    hit, readable, next_readable, rewards, advantages = torch.cat(columns).T
    for name, rows in (
        ("onto the goal", hit == 1),
        ("other readable", (hit == 0) & (readable == 1)),
        ("unreadable", readable == 0),
    ):
        print(
            f"  {name}: {rows.float().mean():.1%} of imagined steps, reward {rewards[rows].mean():.3f}, "
            "advantage "
            f"{advantages[rows].mean():+.3f}, next frame readable {next_readable[rows].mean():.2f}",
            flush=True,
        )


def twm_actor_critic(args, replay, obs_model, dyn, steps, real_game):
    """The training loop's actor-critic updates alone, inside the frozen world model or on the real game."""
    z_dim, actions = args.z_categoricals * args.z_classes, dyn.embed_a.num_embeddings
    actor, critic = (twm.mlp(z_dim, args.ac_hidden_dim, out, args.ac_layers) for out in (actions, 1))
    optimizers = [
        torch.optim.Adam(m.parameters(), lr, eps=args.adam_eps, weight_decay=args.weight_decay)
        for m, lr in ((actor, args.actor_lr), (critic, args.critic_lr))
    ]
    game = RealGame(twm, args) if real_game else None

    def policy(stacks):
        return twm.act(obs_model, actor, stacks, "cpu")

    start = time.perf_counter()
    for step in range(steps + 1):
        if game:
            rollout = game.twm_rollout(obs_model, actor)
        else:
            rollout = imagined_batch(args, replay, obs_model, dyn, actor)
        losses = twm.actor_critic_losses(actor, critic, rollout, args)
        if step % 250 == 0:
            returns = twm.evaluate(args, policy, 32, seed=123)
            print(
                f"actor-critic updates +{step}: {time.perf_counter() - start:.0f} s, "
                f"real return {returns.mean():.2f}, "
                f"policy entropy {float(losses['policy_entropy']):.2f} of its maximum, "
                f"{'real' if game else 'imagined'} reward per step {rollout[2].mean():.3f}",
                flush=True,
            )
        if step < steps:
            twm.optimize(losses["actor"] + losses["critic"], optimizers, args.ac_grad_clip)
    if not game and on_gather(args):
        imagined_rewards(args, replay, obs_model, dyn, actor, critic)


def probe_iris(args, steps, ac_steps, real_game):
    frames, actions, rewards, first = diagnose.random_play(iris, args, 3000)
    replay = iris.Replay(3000, frames.shape[1:], 1)
    for i, action in enumerate(actions):
        replay.add_frame(frames[i], first[i])
        replay.add_step(action, rewards[i], first[i + 1], False)
    replay.add_frame(frames[-1], first[-1])
    num_actions = int(iris.make_env(args, train=False).action_space.n)
    tokenizer, world_model = iris.Tokenizer(args), iris.WorldModel(args, num_actions)
    tok_opt = torch.optim.Adam(tokenizer.parameters(), args.tok_lr)
    wm_opt = torch.optim.AdamW(iris.adamw_param_groups(world_model, args.wm_weight_decay), args.wm_lr)
    start = time.perf_counter()
    for _ in range(args.tok_steps_per_epoch * ((args.tok_stop_after or args.epochs) - args.tok_start_after)):
        iris.train_tokenizer(tokenizer, tok_opt, replay, args, "cpu")
    print(f"tokenizer: {time.perf_counter() - start:.0f} s", flush=True)
    tokenizer.eval()
    seconds = 0.0
    for step in range(1, steps + 1):
        start = time.perf_counter()
        iris.train_world_model(world_model, tokenizer, wm_opt, replay, args, "cpu", keep_tokens=True)
        seconds += time.perf_counter() - start
        if step % 500 == 0 and on_gather(args):
            checkpoint = dict(
                args=vars(args),
                models=[
                    tokenizer.state_dict(),
                    world_model.eval().state_dict(),
                    iris.ActorCritic(4, args.ac_lstm_dim, args.ac_cnn_channels).state_dict(),
                ],
            )
            recall, one_step = diagnose.diagnose_iris(checkpoint)[2:4]
            world_model.train()
            print(
                f"GPT steps {step}: {seconds:.0f} s, reward recall {recall:.2f}, one-step {one_step:.2f}",
                flush=True,
            )
    if ac_steps:
        iris_actor_critic(args, tokenizer, world_model.eval(), replay, ac_steps, real_game)


def iris_actor_critic(args, tokenizer, world_model, replay, steps, real_game):
    """A fresh actor-critic's updates alone, inside the frozen world model or on the real game."""
    actor_critic = iris.ActorCritic(
        world_model.act_emb.num_embeddings, args.ac_lstm_dim, args.ac_cnn_channels
    )
    optimizer = torch.optim.Adam(actor_critic.parameters(), args.ac_lr)
    game = RealGame(iris, args) if real_game else None

    def policy(frames, state):
        return iris.act(tokenizer, actor_critic, frames, state, args.eval_temperature, 0.0, "cpu")

    start = time.perf_counter()
    for step in range(steps + 1):
        if step % 50 == 0:
            actor_critic.eval()
            returns = iris.evaluate(args, policy, 32, seed=123)
            print(
                f"actor-critic steps +{step}: {time.perf_counter() - start:.0f} s, real return "
                f"{returns.mean():.2f}",
                flush=True,
            )
        if step == steps:
            break
        actor_critic.train()
        if game:
            imagined = game.iris_rollout(tokenizer, actor_critic)
            loss, _ = iris.actor_critic_loss(
                imagined, args.gamma, args.lam, args.entropy_coef, args.ac_mask_after_end
            )
            iris.update(actor_critic, optimizer, loss, args.grad_clip)
        else:
            iris.train_actor_critic(
                actor_critic, tokenizer, world_model, optimizer, replay, args, "cpu", True
            )


def iris_run(path):
    """The flags, tokenizer, world model, actor-critic (eval mode) and replay of an IRIS run's checkpoint."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    args = iris.Args(**{k: v for k, v in checkpoint["args"].items() if k in iris.Args.__dataclass_fields__})
    tokenizer, world_model = iris.Tokenizer(args).eval(), iris.WorldModel(args, 4).eval()
    actor_critic = iris.ActorCritic(4, args.ac_lstm_dim, args.ac_cnn_channels).eval()
    for module, state in zip((tokenizer, world_model, actor_critic), checkpoint["models"]):
        module.load_state_dict(state)
    replay = iris.Replay(len(checkpoint["replay"]["actions"]), (3, 64, 64), 0)
    vars(replay).update({k: v for k, v in checkpoint["replay"].items() if k != "rng"})
    replay.tokens[:] = -1  # encoded again by this tokenizer
    return args, tokenizer, world_model, actor_critic, replay


def probe_actor_critic(path, steps):
    args, tokenizer, world_model, actor_critic, replay = iris_run(path)
    optimizer = torch.optim.Adam(actor_critic.parameters(), args.ac_lr)

    def policy(frames, state):
        return iris.act(tokenizer, actor_critic, frames, state, args.eval_temperature, 0.0, "cpu")

    start = time.perf_counter()
    for step in range(steps + 1):
        if step % 200 == 0:
            returns = iris.evaluate(args, policy, 32, seed=123)
            print(
                f"actor-critic steps +{step}: {time.perf_counter() - start:.0f} s, "
                f"real return {returns.mean():.2f}",
                flush=True,
            )
        actor_critic.train()
        metrics = iris.train_actor_critic(
            actor_critic, tokenizer, world_model, optimizer, replay, args, "cpu", True
        )
        actor_critic.eval()
        if step % 200 == 0:
            print(f"  policy entropy {float(metrics['policy_entropy']):.2f} of its maximum", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probe", choices=["world-model", "actor-critic"])
    parser.add_argument(
        "target", help="twm.py or iris.py for world-model, an IRIS checkpoint.pt for actor-critic"
    )
    parser.add_argument("--steps", type=int, default=None, help="updates (default 4,000; actor-critic 600)")
    parser.add_argument("--replay", help="TWM: train on this checkpoint's replay instead of random play")
    parser.add_argument(
        "--frozen-encoder",
        action="store_true",
        help="TWM: the observation model alone first, then the dynamics on its frozen code",
    )
    parser.add_argument(
        "--actor-critic", type=int, default=0, help="then this many actor-critic updates, world model frozen"
    )
    parser.add_argument(
        "--real-game", action="store_true", help="the actor-critic learns on the real game instead"
    )
    parser.add_argument(
        "--raw-frames",
        action="store_true",
        help="IRIS: the policy sees the real frames, not the tokenizer's reconstructions (with --real-game)",
    )
    known, flags = parser.parse_known_args()
    torch.set_num_threads(1)
    torch.manual_seed(1)
    if known.raw_frames:  # in the probe's rollouts and in evaluation alike
        iris.Tokenizer.encode_decode = lambda self, frames: frames.float() / 255
    base = ["--preset", "tiny", "--env-id", "tests.gather:Gather-v0", *flags]
    if known.probe == "actor-critic":
        probe_actor_critic(known.target, known.steps or 600)
    elif known.target == "twm.py":
        args = twm.parse_args(base)
        probe_twm(
            args, known.steps or 4000, known.replay, known.frozen_encoder, known.actor_critic, known.real_game
        )
    else:
        probe_iris(iris.parse_args(base), known.steps or 4000, known.actor_critic, known.real_game)
