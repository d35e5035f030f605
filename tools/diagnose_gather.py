"""What a trained agent's world model gets right on Gather, measured from its checkpoint.

    python tools/diagnose_gather.py runs/<run>/checkpoint.pt    # a twm.py or an iris.py run on Gather-v0

On fresh uniformly random play (seed 99), it prints:
  - policy: the final policy's mean return over 32 real games and how often it picks each action;
  - reconstruction: how often the agent's and the goal's cells read off the autoencoder's reconstructions
    are right;
  - reward recall: the share of real rewarded steps whose reward the world model predicts (teacher-forced);
  - one-step: how often the agent's cell in the predicted next frame is where the action really put it;
  - oracle dream: reward per step when a scripted optimal policy, reading the dreamt frames, plays 7 steps
    inside the world model, next to the same policy's rate in the real game (0.37).
The agent and goal cells are read off (decoded) frames by colour, as tests/gather.py draws them.
"""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import iris  # noqa: E402
import twm  # noqa: E402

MOVES = torch.tensor([(-1, 0), (1, 0), (0, -1), (0, 1)])


def cells(frames):
    """frames (B, 3, 64, 64) in [0, 1] -> one-hot agent cells (B, 16) (white centre), goal cells (B, 16)
    (yellow)."""
    grid = frames.reshape(-1, 3, 4, 16, 4, 16)
    centre, corner = grid[:, :, :, 6:10, :, 6:10].mean((3, 5)), grid[:, :, :, 0:3, :, 0:3].mean((3, 5))
    return (centre.min(1).values > 0.7).flatten(1), ((corner[:, 0] > 0.7) & (corner[:, 2] < 0.4)).flatten(1)


def toward_goal(frames):
    """The optimal action read off frames (straight to the goal); a random one where a frame cannot be
    read."""
    agent, goal = cells(frames)
    a, g = agent.float().argmax(1), goal.float().argmax(1)
    action = torch.where(
        g // 4 < a // 4, 0, torch.where(g // 4 > a // 4, 1, torch.where(g % 4 < a % 4, 2, 3))
    )
    readable = (agent.sum(1) == 1) & (goal.sum(1) == 1)
    return torch.where(readable, action, torch.randint(0, 4, action.shape))


def reconstructed(frames, reconstructions):
    """Shares of frames whose reconstruction shows the agent, and the goal, in the right cell (and nowhere
    else)."""
    (agent, goal), (agent_out, goal_out) = cells(frames), cells(reconstructions)
    return (agent == agent_out).all(1).float().mean().item(), (goal == goal_out).all(1).float().mean().item()


def moved_right(before, action, after):
    """Share of rows whose agent cell in `after` is where `action` puts the agent of `before`."""
    a = cells(before)[0].float().argmax(1)
    y, x = (a // 4 + MOVES[action, 0]).clamp(0, 3), (a % 4 + MOVES[action, 1]).clamp(0, 3)
    agent_after = cells(after)[0]
    return ((agent_after.float().argmax(1) == y * 4 + x) & (agent_after.sum(1) == 1)).float().mean().item()


def random_play(module, args, steps=2000):
    """(frames (N+1, 3, 64, 64) uint8, actions, rewards, first-of-episode flags) of uniformly random play."""
    env = module.make_env(args, train=True)
    frames, actions, rewards, first = [env.reset(seed=99)[0]], [], [], [True]
    env.action_space.seed(99)
    for _ in range(steps):
        action = env.action_space.sample()
        obs, reward, terminated, truncated, _ = env.step(action)
        actions.append(action), rewards.append(reward)
        first.append(terminated or truncated)
        frames.append(env.reset()[0] if terminated or truncated else obs)
    return np.stack(frames), np.array(actions), np.array(rewards, np.float32), np.array(first)


@torch.no_grad()
def diagnose_twm(checkpoint):
    args = twm.Args(**{k: v for k, v in checkpoint["args"].items() if k in twm.Args.__dataclass_fields__})
    env = twm.make_env(args, train=False)
    c, z_dim, actions_n = (
        args.frame_stack * env.observation_space.shape[0],
        args.z_categoricals * args.z_classes,
        4,
    )
    obs_model, dyn = twm.ObservationModel(args, c).eval(), twm.DynamicsModel(args, actions_n).eval()
    actor = twm.mlp(z_dim, args.ac_hidden_dim, actions_n, args.ac_layers)
    for module, state in zip((obs_model, dyn, actor), checkpoint["models"]):
        module.load_state_dict(state)
    frames, actions, rewards, first = random_play(twm, args)
    replay = twm.Replay(len(actions), frames.shape[1:], args.frame_stack, args.buffer_temperature, 0)
    for i, action in enumerate(actions):
        replay.add_frame(frames[i], first[i])
        replay.add_step(action, rewards[i], first[i + 1], False)
    replay.add_frame(frames[-1], first[-1])
    index = np.flatnonzero(~first[1:-1] & ~first[2:]) + 1  # steps i with frames i-1, i, i+1 in one episode
    index = index[index > 0]
    z = twm.mode_z(obs_model.encode(torch.as_tensor(replay.stacks(np.stack([index - 1, index], 1)))))
    memory = dyn.start(z[:, 0], torch.as_tensor(actions[index - 1]))
    eid = torch.zeros(len(index), dtype=torch.long)

    def decode(z_):  # the newest frame of a stack
        return obs_model.decode(z_)[:, -3:].clamp(0, 1)

    h, _ = dyn.step(
        torch.as_tensor(np.tanh(rewards[index - 1])),
        z[:, 1],
        torch.as_tensor(actions[index]),
        eid,
        eid,
        memory,
    )
    log_p, reward, _ = dyn.predict(h)
    rewarded = torch.as_tensor(rewards[index] > 0)
    recall = (reward[rewarded] > np.tanh(1) / 2).float().mean().item()
    one_step = moved_right(
        torch.as_tensor(frames[index]).float() / 255,
        torch.as_tensor(actions[index]),
        decode(twm.mode_z(log_p)),
    )
    memory = dyn.start(z[:, 0], torch.as_tensor(actions[index - 1]))  # the oracle dreams from the same starts
    z_t, r_in, dreamt = z[:, 1], torch.as_tensor(np.tanh(rewards[index - 1])), []
    for _ in range(7):
        h, memory = dyn.step(r_in, z_t, toward_goal(decode(z_t)), eid, eid, memory)
        log_p, r_in, _ = dyn.predict(h)
        z_t = twm.sample_z(log_p)
        dreamt.append(r_in / np.tanh(1))  # in reward units

    def policy(stacks):
        return twm.act(obs_model, actor, stacks, "cpu")

    real = torch.as_tensor(frames[index]).float() / 255
    recon = reconstructed(real, decode(z[:, 1]))
    return args, policy, recall, one_step, torch.stack(dreamt).mean().item(), recon


@torch.no_grad()
def diagnose_iris(checkpoint):
    args = iris.Args(**{k: v for k, v in checkpoint["args"].items() if k in iris.Args.__dataclass_fields__})
    tokenizer, world_model = iris.Tokenizer(args).eval(), iris.WorldModel(args, 4).eval()
    actor_critic = iris.ActorCritic(4, args.ac_lstm_dim, args.ac_cnn_channels).eval()
    for module, state in zip((tokenizer, world_model, actor_critic), checkpoint["models"]):
        module.load_state_dict(state)
    frames, actions, rewards, first = random_play(iris, args)
    index = np.flatnonzero(~first[1:])  # steps i whose next frame i+1 is in the same episode
    tokens = tokenizer.encode(torch.as_tensor(frames[index]))[0]
    sequence = torch.cat([tokens, torch.as_tensor(actions[index])[:, None]], 1)
    _, reward_logits, _ = world_model(sequence)  # one block per row: a frame and its action
    rewarded = torch.as_tensor(rewards[index] > 0)
    recall = (reward_logits[:, -1].argmax(-1)[rewarded] == 2).float().mean().item()
    cache = world_model.new_cache(len(index))
    world_model(tokens, cache)
    _, _, predicted = iris.world_model_step(world_model, tokenizer, cache, torch.as_tensor(actions[index]))
    one_step = moved_right(tokenizer.decode(tokens), torch.as_tensor(actions[index]), predicted)
    cache = world_model.new_cache(len(index))
    world_model(tokens, cache)
    frame, dreamt = tokenizer.decode(tokens), []
    for _ in range(7):
        reward, _, frame = iris.world_model_step(world_model, tokenizer, cache, toward_goal(frame))
        dreamt.append(reward)

    def policy(frames_, state):
        return iris.act(tokenizer, actor_critic, frames_, state, args.eval_temperature, 0.0, "cpu")

    recon = reconstructed(torch.as_tensor(frames[index]).float() / 255, tokenizer.decode(tokens))
    return args, policy, recall, one_step, torch.stack(dreamt).mean().item(), recon


if __name__ == "__main__":
    torch.manual_seed(0)
    checkpoint = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
    module = twm if checkpoint["script"] == "twm" else iris
    args, policy, recall, one_step, dream_rate, (agent, goal) = (
        diagnose_twm if module is twm else diagnose_iris
    )(checkpoint)
    counts = np.zeros(4)

    def counting(*inputs):
        out = policy(*inputs)
        np.add.at(counts, out[0] if isinstance(out, tuple) else out, 1)
        return out

    returns = module.evaluate(args, counting, 32, seed=123)
    print(
        f"policy: return {returns.mean():.2f} over 32 games; actions up/down/left/right "
        f"{np.round(counts / counts.sum(), 2).tolist()}"
    )
    print(f"reconstruction: agent cell right in {agent:.2f} of frames, goal cell in {goal:.2f}")
    print(
        f"reward recall: {recall:.2f}   one-step: {one_step:.2f}   oracle dream: {dream_rate:.3f} "
        "reward per step "
        f"(real game: 0.37)"
    )
