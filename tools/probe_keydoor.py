"""What stops TWM's actor-critic on KeyDoor: the game's state, or how the observation model encodes it?

    python tools/probe_keydoor.py readout [--random-steps N] [flags]  # what a z holds after pretraining
    python tools/probe_keydoor.py true-state [flags]          # the actor-critic on the true state
    python tools/probe_keydoor.py real-game [--mode-z] [--checkpoint C] [flags]  # the actor-critic on z
    python tools/probe_keydoor.py iris-tokenizer [flags]      # how IRIS's tokenizer draws the key
    python tools/probe_keydoor.py imagination runs/<run>/checkpoint.pt  # does TWM's dream keep the key?
    python tools/probe_keydoor.py iris-imagination runs/<run>/checkpoint.pt  # the same for an IRIS run

The first three use `twm.py --preset tiny` on `tests.keydoor:KeyDoor-v0` plus any flags (`--actor-lr 1e-3`,
say), one thread. `readout` trains the observation model alone on 3,000 random steps (or N), as pretraining
does (the preset's observation updates). It reports the decoder loss on frames of its own replay and on fresh
frames, the reconstruction error in the cells of the agent, the key and the door, and how well an MLP (the
actor's shape) reads the agent's, the key's (or "held") and the door's cell from z (the mode and a sample):
trained on 5,000 frames of fresh random play, tested on 1,000 more. `true-state` trains the actor-critic with
TWM's losses on real rollouts (the preset's batch and horizon) whose input is the true state: one-hot cells of
the agent, the key and the door. `real-game` does the same on z of the frames through the observation model of
`readout` (a sample, as imagination gives; --mode-z: the mode, as the policy sees in play), or with
--checkpoint through that of a TWM run's checkpoint. Every 250 updates both print the return of 32 real games.
`iris-tokenizer` trains `iris.py --preset tiny`'s tokenizer (plus flags) on 3,000 random steps for its
tokenizer steps, then twice and four times as many, and each time reports its reconstruction loss on frames of
its replay and on fresh frames, the error in the key's and the door's cells, and the colour it gives one key
pixel. `imagination` loads a TWM KeyDoor run's checkpoint, plays 32 real games with its actor, and imagines 20
batches from its replay as the training loop does. It reads the objects of each decoded imagined frame (the
agent's white centre, the key's orange and the door's purple in a cell's corner) and reports how often a key
lying on the floor vanishes though the agent did not step onto it, how often a key appears while one is held,
whether stepping onto the key picks it up, and the reward r̂ predicted where the agent steps onto the door
holding the key (tanh 1 = 0.76) and elsewhere. `iris-imagination` does the same for an IRIS run (its policy
sees the decoded frames; r̂ in {-1, 0, 1}; steps after the first predicted end are left out), and first the
colours its tokenizer gives the key's and the door's cells.
"""

import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch.distributions import Categorical

sys.path.insert(0, str(Path(__file__).resolve().parent))
import probe_gather as probe  # noqa: E402  (it puts the repository on the path)

import iris  # noqa: E402
import twm  # noqa: E402
from tests.keydoor import DOOR, KEY, MOVES  # noqa: E402

GAME = "tests.keydoor:KeyDoor-v0"


def cells(game):
    """The true state: the agent's cell, the key's (16 while it is held) and the door's, each 0-15."""
    key = 16 if game.key is None else game.key[0] * 4 + game.key[1]
    return game.agent[0] * 4 + game.agent[1], key, game.door[0] * 4 + game.door[1]


def one_hot_state(game):
    agent, key, door = cells(game)
    state = np.zeros(48, np.float32)
    state[[agent, 16 + key, 32 + door] if key < 16 else [agent, 32 + door]] = 1
    return state


def pretrained_observation_model(args, steps=3000):
    replay = probe.twm_replay(args, None, steps)
    obs_model = twm.ObservationModel(args, args.frame_stack * replay.frames.shape[1])
    optimizer = torch.optim.Adam(obs_model.parameters(), args.wm_lr, eps=args.adam_eps)
    for _ in range(args.pretrain_obs_updates):
        probe.twm_observation_step(obs_model, optimizer, replay, args)
    return obs_model.eval(), replay


def random_frames(count, seed=5):
    env, rng = gym.make(GAME), np.random.default_rng(seed)
    frame, _ = env.reset(seed=seed)
    frames, labels = [], []
    for _ in range(count):
        frames.append(frame.transpose(2, 0, 1))
        labels.append(cells(env.unwrapped))
        frame, _, terminated, truncated, _ = env.step(int(rng.integers(4)))
        if terminated or truncated:
            frame, _ = env.reset()
    return torch.as_tensor(np.stack(frames)), torch.tensor(labels)


@torch.no_grad()
def reconstruction_errors(obs_model, frames, labels):
    """Mean absolute error of the reconstruction (from the mode of z) in each object's cell; the agent's is
    its 8x8 square, and a key or door under the agent is skipped."""
    decoded = obs_model.decode(twm.mode_z(obs_model.encode(frames))).clamp(0, 1)
    errors = (decoded - frames.float() / 255).abs().mean(1)  # (N, 64, 64)
    out = {}
    for name, column, margin in (("agent", 0, 4), ("key", 1, 0), ("door", 2, 0)):
        values = []
        for error, label in zip(errors, labels.tolist()):
            cell = label[column]
            if cell == 16 or (column and cell == label[0]):
                continue
            y, x = divmod(cell, 4)
            top, left = y * 16 + margin, x * 16 + margin
            values.append(error[top : top + 16 - 2 * margin, left : left + 16 - 2 * margin])
        out[name] = float(torch.stack([v.mean() for v in values]).mean())
    return out


@torch.no_grad()
def cell_errors(decoded, frames, labels, column):
    """Mean absolute error of `decoded` in the cell of object `column` (1 key, 2 door), where the object is
    on the floor and not under the agent."""
    errors = (decoded - frames.float() / 255).abs().mean(1)  # (N, 64, 64)
    values = []
    for error, label in zip(errors, labels.tolist()):
        if label[column] == 16 or label[column] == label[0]:
            continue
        y, x = divmod(label[column], 4)
        values.append(error[y * 16 : y * 16 + 16, x * 16 : x * 16 + 16].mean())
    return float(torch.stack(values).mean())


def iris_tokenizer(base):
    args = iris.parse_args(["--preset", "tiny", "--env-id", GAME, *base])
    frames, actions, rewards, first = probe.diagnose.random_play(iris, args, 3000)
    replay = iris.Replay(3000, frames.shape[1:], 1)
    for i, action in enumerate(actions):
        replay.add_frame(frames[i], first[i])
        replay.add_step(action, rewards[i], first[i + 1], False)
    replay.add_frame(frames[-1], first[-1])
    tokenizer = iris.Tokenizer(args)
    optimizer = torch.optim.Adam(tokenizer.parameters(), args.tok_lr)
    fresh, labels = random_frames(1000)
    own, held = torch.as_tensor(frames[:1000]), labels[:, 1] == 16
    steps, start = (
        args.tok_steps_per_epoch * (args.tok_stop_after - args.tok_start_after),
        time.perf_counter(),
    )
    for step in range(1, 4 * steps + 1):
        iris.train_tokenizer(tokenizer, optimizer, replay, args, "cpu")
        if step not in (steps, 2 * steps, 4 * steps):
            continue
        with torch.no_grad():
            loss_own = 0.5 * (tokenizer.encode_decode(own) - own.float() / 255).square().sum((1, 2, 3))
            decoded = tokenizer.encode_decode(fresh)
            loss_fresh = 0.5 * (decoded - fresh.float() / 255).square().sum((1, 2, 3))
        i = int(torch.nonzero(~held)[0])
        y, x = divmod(int(labels[i, 1]), 4)
        pixel = (decoded[i, :, y * 16 + 8, x * 16 + 8] * 255).round().int().tolist()
        print(
            f"{step} tokenizer steps ({time.perf_counter() - start:.0f} s): reconstruction loss per frame, "
            f"its replay {loss_own.mean():.1f}, fresh {loss_fresh.mean():.1f} (key on the floor "
            f"{loss_fresh[~held].mean():.1f}); cell error key {cell_errors(decoded, fresh, labels, 1):.3f}, "
            f"door {cell_errors(decoded, fresh, labels, 2):.3f}; a key pixel drawn {pixel} "
            "(key (200, 60, 20), door (120, 66, 202))",
            flush=True,
        )


@torch.no_grad()
def decoder_loss(obs_model, frames):
    """The decoder loss of each frame (½ squared error summed over pixels), from the mode of z."""
    decoded = obs_model.decode(twm.mode_z(obs_model.encode(frames)))
    return 0.5 * (decoded - frames.float() / 255).square().sum((-3, -2, -1))


def readout(args, steps):
    start = time.perf_counter()
    obs_model, replay = pretrained_observation_model(args, steps)
    print(
        f"observation model: {args.pretrain_obs_updates} updates on {steps} random steps, "
        f"{time.perf_counter() - start:.0f} s"
    )
    frames, labels = random_frames(6000)
    held, fresh = labels[5000:, 1] == 16, decoder_loss(obs_model, frames[5000:])
    own = decoder_loss(obs_model, torch.as_tensor(replay.frames[:1000]))
    print(
        f"decoder loss per frame: its own replay {own.mean():.1f}, fresh frames {fresh.mean():.1f} "
        f"(key on the floor {fresh[~held].mean():.1f}, held {fresh[held].mean():.1f}; a missing key costs 86)"
    )
    errors = reconstruction_errors(obs_model, frames[5000:], labels[5000:])
    print("reconstruction error per object cell: " + ", ".join(f"{k} {v:.3f}" for k, v in errors.items()))
    with torch.no_grad():
        log_q = obs_model.encode(frames)
    for name, z in (("mode", twm.mode_z(log_q)), ("sample", twm.sample_z(log_q))):
        net = twm.mlp(z.shape[1], args.ac_hidden_dim, 16 + 17 + 16, args.ac_layers)
        optimizer = torch.optim.Adam(net.parameters(), 1e-3)
        heads = (slice(0, 16), slice(16, 33), slice(33, 49))
        for _ in range(3000):
            index = torch.randint(0, 5000, (128,))
            out = net(z[index])
            loss = sum(F.cross_entropy(out[:, h], labels[index, k]) for k, h in enumerate(heads))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            guess = torch.stack([net(z[5000:])[:, h].argmax(1) for h in heads], 1)
        right, held = guess == labels[5000:], labels[5000:, 1] == 16
        print(
            f"z ({name}) read by an MLP, held-out accuracy: agent {right[:, 0].float().mean():.2f}, "
            f"door {right[:, 2].float().mean():.2f}, key on the floor {right[~held, 1].float().mean():.2f} "
            f"(read as held: {(guess[~held, 1] == 16).float().mean():.2f}), "
            f"key held {right[held, 1].float().mean():.2f}",
            flush=True,
        )


def true_state_actor_critic(args, steps):
    envs = [gym.make(GAME) for _ in range(args.ac_batch_size)]
    for i, env in enumerate(envs):
        env.reset(seed=1000 + i)
    actor, critic = (twm.mlp(48, args.ac_hidden_dim, out, args.ac_layers) for out in (4, 1))
    optimizers = [
        torch.optim.Adam(m.parameters(), lr, eps=args.adam_eps)
        for m, lr in ((actor, args.actor_lr), (critic, args.critic_lr))
    ]

    def state(games):
        return torch.as_tensor(np.stack([one_hot_state(env.unwrapped) for env in games]))

    def play(games):  # 32 real games at once, the policy sampled as in evaluation
        for i, env in enumerate(games):
            env.reset(seed=123 + i)
        returns, live = np.zeros(len(games)), np.ones(len(games), bool)
        while live.any():
            with torch.no_grad():
                actions = Categorical(logits=actor(state(games))).sample()
            for i in np.flatnonzero(live):
                _, reward, terminated, truncated, _ = games[i].step(int(actions[i]))
                returns[i] += reward
                live[i] = not (terminated or truncated)
        return returns.mean()

    games, start = [gym.make(GAME) for _ in range(32)], time.perf_counter()
    for step in range(steps + 1):
        with torch.no_grad():
            inputs, columns = [state(envs)], []
            for _ in range(args.ac_horizon):
                actions = Categorical(logits=actor(inputs[-1])).sample()
                out = np.zeros((3, len(envs)), np.float32)
                for i, env in enumerate(envs):
                    _, reward, terminated, truncated, _ = env.step(int(actions[i]))
                    out[:, i] = reward, terminated, truncated
                    if terminated or truncated:
                        env.reset()
                reward, terminated, truncated = torch.as_tensor(out)
                inputs.append(state(envs))
                columns.append((actions, reward.tanh(), args.gamma * (1 - terminated), truncated.bool()))
        actions, rewards, discounts, ends = (torch.stack(c, 1) for c in zip(*columns))
        rollout = (torch.stack(inputs, 1), actions, rewards, discounts, ends, torch.ones_like(rewards))
        losses = twm.actor_critic_losses(actor, critic, rollout, args)
        if step % 250 == 0:
            print(
                f"actor-critic updates +{step}: {time.perf_counter() - start:.0f} s, "
                f"real return {play(games):.2f}, "
                f"policy entropy {float(losses['policy_entropy']):.2f} of its maximum",
                flush=True,
            )
        if step < steps:
            twm.optimize(losses["actor"] + losses["critic"], optimizers, args.ac_grad_clip)


def objects(frames):
    """Cells (N, 16) where a frame in [0, 1] shows the agent (a white centre), the key and the door (the
    colour nearest to a cell's corner among black, the key's and the door's)."""
    cells = frames.reshape(-1, 3, 4, 16, 4, 16)
    centre, corner = cells[:, :, :, 6:10, :, 6:10].mean((3, 5)), cells[:, :, :, 1:4, :, 1:4].mean((3, 5))
    colours = torch.tensor([(0, 0, 0), KEY, DOOR], dtype=torch.float32) / 255  # (3 colours, 3 channels)
    nearest = (corner[:, None] - colours[None, :, :, None, None]).square().sum(2).argmin(1).flatten(1)
    return (centre.min(1).values > 0.6).flatten(1), nearest == 1, nearest == 2


def run_models(path):
    """The flags and the observation model, dynamics model, actor and critic of a TWM run's checkpoint."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    args = twm.Args(**{k: v for k, v in checkpoint["args"].items() if k in twm.Args.__dataclass_fields__})
    z_dim = args.z_categoricals * args.z_classes
    obs_model, dyn = twm.ObservationModel(args, 3 * args.frame_stack), twm.DynamicsModel(args, 4)
    actor, critic = (twm.mlp(z_dim, args.ac_hidden_dim, out, args.ac_layers) for out in (4, 1))
    for module, state in zip((obs_model, dyn, actor, critic), checkpoint["models"]):
        module.load_state_dict(state)
        module.eval()
    return args, obs_model, dyn, actor, critic


def dream_steps(frames, actions, rewards, ends):
    """Per imagined step (N*H rows): whether a key on the floor vanished or a key appeared (agent not onto
    it), whether stepping onto the key picked it up, stepping onto the door holding the key, and r̂. Frames
    (N, H+1, 3, 64, 64) in [0, 1]; actions, rewards, ends (N, H); a step counts where both its frames are
    readable (one agent, one door, at most one key) and no end or restart lies between them."""
    agent, key, door = (x.view(*frames.shape[:2], 16) for x in objects(frames))
    clear = (agent.sum(-1) == 1) & (door.sum(-1) == 1) & (key.sum(-1) <= 1)  # (N, H+1)
    on_floor, held = key.sum(-1) == 1, key.sum(-1) == 0
    cell = agent.float().argmax(-1)[:, :-1]
    moves = torch.tensor(MOVES)[actions]  # (N, H, 2)
    target = (cell // 4 + moves[..., 0]).clamp(0, 3) * 4 + (cell % 4 + moves[..., 1]).clamp(0, 3)
    both = clear[:, :-1] & clear[:, 1:] & ~ends
    onto_key = both & on_floor[:, :-1] & (target == key.float().argmax(-1)[:, :-1])
    onto_door = both & held[:, :-1] & (target == door.float().argmax(-1)[:, :-1])
    columns = (
        both & on_floor[:, :-1] & ~onto_key,
        both & on_floor[:, :-1] & ~onto_key & held[:, 1:],
        both & held[:, :-1] & ~onto_door,
        both & held[:, :-1] & ~onto_door & on_floor[:, 1:],
        onto_key,
        onto_key & held[:, 1:],
        onto_door,
        both & ~onto_door,
    )
    return torch.stack([*(c.float() for c in columns), rewards], -1).flatten(0, 1)


def report(rows, door_reward):
    floor, vanish, held, appear, onto_key, picked, onto_door, other, reward = rows.T
    readable = floor + held
    print(
        f"imagined steps between two readable frames: {readable.sum() / len(reward):.2f} of all; a key "
        f"on the floor vanishes (agent not onto it) in {vanish.sum() / floor.sum():.3f}, a key appears "
        f"while one is held in {appear.sum() / held.sum():.3f}; stepping onto the key picks it up in "
        f"{picked.sum() / onto_key.sum():.2f}; r̂ where the agent steps onto the door holding the key "
        f"{reward[onto_door == 1].mean():.3f} ({onto_door.sum() / readable.sum():.3f} of readable steps; "
        f"the real reward {door_reward}), elsewhere {reward[other == 1].mean():.4f}",
        flush=True,
    )


@torch.no_grad()
def imagination(path):
    args, obs_model, dyn, actor, _ = run_models(path)
    returns = twm.evaluate(args, lambda stacks: twm.act(obs_model, actor, stacks, "cpu"), 32, seed=123)
    print(f"the run's actor on 32 real games: {returns.mean():.2f}")
    replay, rows = probe.twm_replay(args, path), []
    for _ in range(20):
        z, actions, rewards, _, ends, _ = probe.imagined_batch(args, replay, obs_model, dyn, actor)
        rows.append(dream_steps(obs_model.decode(z).clamp(0, 1), actions, rewards, ends))
    report(torch.cat(rows), "tanh 1 = 0.762")


@torch.no_grad()
def iris_imagination(path):
    """IRIS's imagination from the end of a run, read as `imagination` reads TWM's (rewards in {-1, 0, 1})."""
    args, tokenizer, world_model, actor_critic, replay = probe.iris_run(path)

    def policy(frames, state):
        return iris.act(tokenizer, actor_critic, frames, state, args.eval_temperature, 0.0, "cpu")

    print(f"the run's policy on 32 real games: {iris.evaluate(args, policy, 32, seed=123).mean():.2f}")
    frames, labels = random_frames(500)
    decoded, on_floor = tokenizer.encode_decode(frames), labels[labels[:, 1] < 16]
    decoded = decoded[labels[:, 1] < 16]  # frames whose key lies on the floor

    def colour(column):  # the mean drawn colour of object `column`'s cell, 2 pixels in from its edges
        cells = [divmod(int(cell), 4) for cell in on_floor[:, column]]
        patches = [
            d[:, 16 * y + 2 : 16 * y + 14, 16 * x + 2 : 16 * x + 14] for d, (y, x) in zip(decoded, cells)
        ]
        return (torch.stack([p.mean((1, 2)) for p in patches]).mean(0) * 255).round().int().tolist()

    print(f"its tokenizer draws the key {colour(1)} (real {KEY}), the door {colour(2)} (real {DOOR})")
    rows = []
    for _ in range(20):
        tokens, _, _, _, mask = replay.segments(
            args.ac_batch_size, args.burn_in + 1, False, "cpu", tokenizer, True
        )
        recon = torch.zeros(*mask.shape, 3, 64, 64)
        recon[mask] = tokenizer.decode(tokens[mask])
        state = actor_critic.burn_in(recon[:, :-1], mask[:, :-1])
        cache = world_model.new_cache(len(tokens))
        world_model(tokens[:, -1], cache)
        frames, actions, rewards, ends = [recon[:, -1]], [], [], []
        for _ in range(args.imagine_horizon - 1):  # the last step of imagine() draws no frame
            logits, _, state = actor_critic(frames[-1], state)
            actions.append(Categorical(logits=logits).sample())
            reward, end, frame = iris.world_model_step(world_model, tokenizer, cache, actions[-1])
            frames, rewards, ends = frames + [frame], rewards + [reward], ends + [end.bool()]
        frames = torch.stack(frames, 1)  # (N, H+1, 3, 64, 64)
        actions, rewards, ends = (torch.stack(x, 1) for x in (actions, rewards, ends))
        ends = ends.cumsum(1).bool()  # after a predicted end the imagination goes on in a dream of a new game
        rows.append(dream_steps(frames, actions, rewards, ends))
    report(torch.cat(rows), "1")


CHECKPOINT_MODES = ("imagination", "iris-imagination")

if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    known = ("readout", "true-state", "real-game", "iris-tokenizer", *CHECKPOINT_MODES)
    if mode not in known or (mode in CHECKPOINT_MODES and len(sys.argv) < 3):
        sys.exit(
            "usage: python tools/probe_keydoor.py {readout,true-state,real-game,iris-tokenizer} [flags] "
            "| {imagination,iris-imagination} CHECKPOINT"
        )
    flags, steps, checkpoint = [f for f in sys.argv[2:] if f != "--mode-z"], 3000, None
    if "--random-steps" in flags:  # readout: the size of the random replay
        at = flags.index("--random-steps")
        steps, flags = int(flags[at + 1]), flags[:at] + flags[at + 2 :]
    if "--checkpoint" in flags:  # real-game: the observation model of a run instead of a pretrained one
        at = flags.index("--checkpoint")
        checkpoint, flags = flags[at + 1], flags[:at] + flags[at + 2 :]
    torch.set_num_threads(1)
    torch.manual_seed(1)
    if mode == "iris-tokenizer":
        sys.exit(iris_tokenizer(flags))
    if mode in CHECKPOINT_MODES:
        sys.exit((imagination if mode == "imagination" else iris_imagination)(flags[0]))
    args = twm.parse_args(["--preset", "tiny", "--env-id", GAME, *flags])
    if mode == "readout":
        readout(args, steps)
    elif mode == "true-state":
        true_state_actor_critic(args, 1500)
    else:
        if checkpoint:
            args, obs_model = run_models(checkpoint)[:2]
            replay = probe.twm_replay(args, checkpoint)
        else:
            obs_model, replay = pretrained_observation_model(args)
        if "--mode-z" in sys.argv:
            twm.sample_z = twm.mode_z  # the actor-critic's rollouts see the mode of q(z|o)
        probe.twm_actor_critic(args, replay, obs_model, twm.DynamicsModel(args, 4), 1000, True)
