"""How fast each part of an agent learns Gather, measured apart from the rest of the run.

    python tools/probe_gather.py world-model twm.py [flags]    # a fresh TWM world model on 3,000 random steps
    python tools/probe_gather.py world-model iris.py [flags]   # a fresh IRIS tokenizer, then its GPT, on them
    python tools/probe_gather.py world-model twm.py --replay runs/<run>/checkpoint.pt [flags]  # a run's data
    python tools/probe_gather.py world-model twm.py --actor-critic 1250 [flags]  # then the actor-critic alone
    python tools/probe_gather.py actor-critic runs/<iris run>/checkpoint.pt     # more IRIS actor-critic steps

`world-model` trains only the world model of `--preset tiny` (plus any flags) for --steps updates on one
thread and every 500 prints the wall time of the updates, the reward recall and the one-step accuracy of
tools/diagnose_gather.py (TWM also the oracle dream). IRIS first trains its tokenizer for the preset's
tokenizer epochs, then keeps its tokens. With `--actor-critic N`, TWM's actor-critic then trains alone for N
updates inside the frozen world model; every 250 it prints the real return (32 games), the policy's entropy
and the imagined reward per step, and at the end where the imagined reward comes from: steps onto the goal
(read off the dreamt frames), other readable steps, unreadable frames. `actor-critic` goes on training the
actor-critic of an IRIS checkpoint inside its frozen tokenizer and world model, and every 200 steps plays 32
real games at the evaluation temperature.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import diagnose_gather as diagnose  # noqa: E402  (it puts the repository on the path)

import iris  # noqa: E402
import twm  # noqa: E402


def twm_replay(args, checkpoint):
    """3,000 steps of uniformly random play (seed 99), or the replay stored in a run's checkpoint."""
    env = twm.make_env(args, train=True)
    replay = twm.Replay(3000, env.observation_space.shape, args.frame_stack, args.buffer_temperature, 1)
    if checkpoint:
        stored = torch.load(checkpoint, map_location="cpu", weights_only=False)["replay"]
        vars(replay).update(
            {
                k: stored[k]
                for k in ("frames", "episode_start", "actions", "rewards", "terminated", "truncated", "size")
            }
        )
        return replay
    frames, actions, rewards, first = diagnose.random_play(twm, args, 3000)
    for i, action in enumerate(actions):
        replay.add_frame(frames[i], first[i])
        replay.add_step(action, rewards[i], first[i + 1], False)
    replay.add_frame(frames[-1], first[-1])
    return replay


def probe_twm(args, steps, checkpoint, ac_steps):
    replay = twm_replay(args, checkpoint)
    channels = args.frame_stack * replay.frames.shape[1]
    obs_model, dyn = twm.ObservationModel(args, channels), twm.DynamicsModel(args, 4)
    actor = twm.mlp(args.z_categoricals * args.z_classes, args.ac_hidden_dim, 4, args.ac_layers)  # untouched
    optimizers = [
        torch.optim.Adam(m.parameters(), args.wm_lr, eps=args.adam_eps, weight_decay=args.weight_decay)
        for m in (obs_model, dyn)
    ]
    seconds = 0.0
    for step in range(1, steps + 1):
        start = time.perf_counter()
        starts = replay.sample_starts(args.wm_batch_size, args.wm_sequence_length)
        losses, _, _ = twm.world_model_losses(
            obs_model, dyn, replay.sequences(starts, args.wm_sequence_length, "cpu"), args
        )
        twm.optimize(sum(losses.values()), optimizers, args.wm_grad_clip)
        seconds += time.perf_counter() - start
        if step % 500 == 0:
            checkpoint = dict(
                args=vars(args), models=[obs_model.state_dict(), dyn.state_dict(), actor.state_dict()]
            )
            recall, one_step, oracle = diagnose.diagnose_twm(checkpoint)[2:5]
            print(
                f"updates {step}: {seconds:.0f} s, reward recall {recall:.2f}, one-step {one_step:.2f}, "
                f"oracle dream {oracle:.3f}",
                flush=True,
            )
    if ac_steps:
        twm_actor_critic(args, replay, obs_model.eval(), dyn.eval(), ac_steps)


@torch.no_grad()
def imagined_batch(args, replay, obs_model, dyn, actor):
    """One imagination of the training loop, from a fresh world-model batch."""
    batch = replay.sequences(
        replay.sample_starts(args.wm_batch_size, args.wm_sequence_length), args.wm_sequence_length, "cpu"
    )
    _, z_seq, dones = twm.world_model_losses(obs_model, dyn, batch, args, train_encoder=False)
    return twm.imagine(dyn, actor, z_seq, batch[1], batch[2], dones, args)


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


def twm_actor_critic(args, replay, obs_model, dyn, steps):
    """The training loop's actor-critic updates alone, inside the frozen world model."""
    z_dim = args.z_categoricals * args.z_classes
    actor, critic = (twm.mlp(z_dim, args.ac_hidden_dim, out, args.ac_layers) for out in (4, 1))
    optimizers = [
        torch.optim.Adam(m.parameters(), lr, eps=args.adam_eps, weight_decay=args.weight_decay)
        for m, lr in ((actor, args.actor_lr), (critic, args.critic_lr))
    ]

    def policy(stacks):
        return twm.act(obs_model, actor, stacks, "cpu")

    start = time.perf_counter()
    for step in range(steps + 1):
        rollout = imagined_batch(args, replay, obs_model, dyn, actor)
        losses = twm.actor_critic_losses(actor, critic, rollout, args)
        if step % 250 == 0:
            returns = twm.evaluate(args, policy, 32, seed=123)
            print(
                f"actor-critic updates +{step}: {time.perf_counter() - start:.0f} s, "
                f"real return {returns.mean():.2f}, "
                f"policy entropy {float(losses['policy_entropy']):.2f} of its maximum, "
                "imagined reward per step "
                f"{rollout[2].mean():.3f}",
                flush=True,
            )
        if step < steps:
            twm.optimize(losses["actor"] + losses["critic"], optimizers, args.ac_grad_clip)
    imagined_rewards(args, replay, obs_model, dyn, actor, critic)


def probe_iris(args, steps):
    frames, actions, rewards, first = diagnose.random_play(iris, args, 3000)
    replay = iris.Replay(3000, frames.shape[1:], 1)
    for i, action in enumerate(actions):
        replay.add_frame(frames[i], first[i])
        replay.add_step(action, rewards[i], first[i + 1], False)
    replay.add_frame(frames[-1], first[-1])
    tokenizer, world_model = iris.Tokenizer(args), iris.WorldModel(args, 4)
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
        if step % 500 == 0:
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


def probe_actor_critic(path, steps):
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    args = iris.Args(**{k: v for k, v in checkpoint["args"].items() if k in iris.Args.__dataclass_fields__})
    tokenizer, world_model = iris.Tokenizer(args).eval(), iris.WorldModel(args, 4).eval()
    actor_critic = iris.ActorCritic(4, args.ac_lstm_dim, args.ac_cnn_channels).eval()
    for module, state in zip((tokenizer, world_model, actor_critic), checkpoint["models"]):
        module.load_state_dict(state)
    optimizer = torch.optim.Adam(actor_critic.parameters(), args.ac_lr)
    replay = iris.Replay(len(checkpoint["replay"]["actions"]), (3, 64, 64), 0)
    vars(replay).update({k: v for k, v in checkpoint["replay"].items() if k != "rng"})
    replay.tokens[:] = -1  # encoded again by this tokenizer

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
        "--actor-critic",
        type=int,
        default=0,
        help="TWM: then this many actor-critic updates, world model frozen",
    )
    known, flags = parser.parse_known_args()
    torch.set_num_threads(1)
    torch.manual_seed(1)
    if known.probe == "actor-critic":
        probe_actor_critic(known.target, known.steps or 600)
    elif known.target == "twm.py":
        probe_twm(
            twm.parse_args(["--preset", "tiny", "--env-id", "tests.gather:Gather-v0", *flags]),
            known.steps or 4000,
            known.replay,
            known.actor_critic,
        )
    else:
        probe_iris(
            iris.parse_args(["--preset", "tiny", "--env-id", "tests.gather:Gather-v0", *flags]),
            known.steps or 4000,
        )
