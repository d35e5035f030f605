"""Look at a trained agent: whole games from a run's checkpoint, the first as a video, and its world model's
dream.

    python tools/evaluate_checkpoint.py runs/<run>/checkpoint.pt               # 100 games and a dream image
    python tools/evaluate_checkpoint.py runs/<run>/checkpoint.pt --episodes 10 --capture-video
    python tools/evaluate_checkpoint.py runs/<run>/checkpoint.pt --episodes 0  # the dream image only

Works with the checkpoints of twm.py and iris.py, also while their run goes on (a checkpoint is replaced
in one step). The games are the scripts' final evaluation: the same protocol, policy and seeds, so the
checkpoint of a finished run gives its summary.json again. Everything goes to runs/<run>/eval_<agent step>/
(or --out): summary.json, dream.png and, with --capture-video, videos/eval.mp4.

The dream image: for random windows of real play, each in one episode, the real frames, their reconstructions,
the world model's open-loop dream driven by the real actions (green: the real context fed in; red: imagined
from its own samples), and |real - dream|. Under each frame: the real action, reward and end, or the dream's
predicted reward (and TWM's discount).
"""

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import iris  # noqa: E402
import twm  # noqa: E402

SCRIPTS = {"twm": twm, "iris": iris}


def fail(message):
    raise SystemExit(f"evaluate_checkpoint.py: error: {message}")


def load(path, device):
    """The checkpoint's script, flags, networks (in eval mode, on `device`) and the replay's filled part; the
    random number generators are set as the checkpoint found them."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        script = SCRIPTS[checkpoint["script"]]
    except Exception as error:  # missing, truncated or foreign: unpickling can fail anywhere
        fail(
            f"cannot read checkpoint {path} ({type(error).__name__}); pass the checkpoint.pt of a twm.py or "
            "iris.py run, runs/<run-name>/checkpoint.pt"
        )
    fields = script.Args.__dataclass_fields__  # older checkpoints may hold flags the script has dropped
    args = script.Args(**{name: value for name, value in checkpoint["args"].items() if name in fields})
    env = script.make_env(args, train=False)
    num_actions, frame_shape = int(env.action_space.n), env.observation_space.shape
    env.close()
    if script is twm:
        z_dim, channels = args.z_categoricals * args.z_classes, args.frame_stack * frame_shape[0]
        models = (
            twm.ObservationModel(args, channels),
            twm.DynamicsModel(args, num_actions),
            twm.mlp(z_dim, args.ac_hidden_dim, num_actions, args.ac_layers),
        )
    else:
        models = (
            iris.Tokenizer(args),
            iris.WorldModel(args, num_actions),
            iris.ActorCritic(num_actions, args.ac_lstm_dim, args.ac_cnn_channels),
        )
    for model, state in zip(models, checkpoint["models"]):
        model.load_state_dict(state)
        model.to(device).eval()
    replay = object.__new__(script.Replay)  # its arrays hold the filled part only, enough to read
    vars(replay).update(checkpoint["replay"])
    for (_, set_state), state in zip(script.RNGS, checkpoint["rng"]):  # as the final evaluation found them
        set_state(state)
    return script, args, models, replay


def policy_of(script, args, models, device):
    """The scripts' evaluation policy: TWM acts on z = mode of q(z|o); IRIS on reconstructions, at its eval
    temperature, with its LSTM state carried along."""
    if script is twm:
        obs_model, _, actor = models
        return lambda stacks: twm.act(obs_model, actor, stacks, device)
    tokenizer, _, actor_critic = models
    temperature = args.eval_temperature
    return lambda frames, state: iris.act(tokenizer, actor_critic, frames, state, temperature, 0.0, device)


def windows(replay, args, step, sequences):
    """Starts s of `sequences` random windows of real play (frames s .. s+n-1, each in one episode), n (at
    most 16, the world-model sequence length and the longest episode) and the dream's real `context`."""
    n = min(16, args.wm_sequence_length, np.bincount(replay.episode_start[: replay.size]).max())
    in_one_episode = replay.episode_start[n - 1 : replay.size] <= np.arange(replay.size - n + 1)
    starts = np.random.default_rng(step).choice(np.flatnonzero(in_one_episode), sequences)
    return starts, n, max(2, min(16, args.wm_sequence_length) // 4)


def rows_and_captions(real, recon, imagined, real_text, dream_text):
    """The dream image's rows (S, 4, n, c, H, W) in [0, 1] and a caption under each frame."""
    rows = torch.stack([real, recon, imagined, (real - imagined).abs()], 1)
    blank = [""] * rows.shape[2]
    return rows, [[real_text[s], blank, dream_text[s], blank] for s in range(len(rows))]


@torch.no_grad()
def twm_dream(obs_model, dyn, replay, args, step, sequences=4):
    """Dream rows (S, 4, n, c, H, W) and captions of TWM: real z for `context` frames, then its own ẑ, r̂."""
    starts, n, context = windows(replay, args, step, sequences)
    device = dyn.z_head[-1].weight.device
    stacks, actions, rewards, terminated, truncated = replay.sequences(starts + 1, n - 1, device)
    real_text = [
        [f"a={a} r={r + 0:+.2f}" + " end" * e for a, r, e in zip(*row)]  # what followed (+0: no -0)
        for row in zip(actions.tolist(), rewards.tolist(), (terminated | truncated).tolist())
    ]
    z, dream_text = twm.mode_z(obs_model.encode(stacks[:, :-1])), [["context"] * context for _ in starts]
    with torch.random.fork_rng():  # seeded by `step`
        torch.manual_seed(step)
        dreamt, memory, eid = [z[:, 0]], dyn.start(z[:, 0], actions[:, 0]), actions[:, 0] * 0  # one episode
        z_t, r_in = z[:, 1], rewards[:, 0]
        for t in range(1, n):
            h, memory = dyn.step(r_in, z_t, actions[:, t], eid, eid, memory)
            log_p, reward, discount_logit = dyn.predict(h)  # for the step from frame t: ẑ_{t+1}, r̂_t, γ̂_t
            dreamt.append(z_t)
            if t + 1 < min(context, n):  # real z and r fed in for `context` frames, then the dream's own
                z_t, r_in = z[:, t + 1], rewards[:, t]
            else:
                z_t, r_in = twm.sample_z(log_p), reward
            if t >= context:  # what the dream predicts, under its frames
                for s, (r, g) in enumerate(zip(reward.tolist(), torch.sigmoid(discount_logit).tolist())):
                    dream_text[s].append(f"dream\nr={r:+.2f} " + ("end" if g < 0.5 else f"g={g:.2f}"))
    c = replay.frames.shape[1]  # channels of one frame: the newest frame of a stack is its last c channels
    recon, imagined = (obs_model.decode(x)[:, :, -c:].clamp(0, 1) for x in (z, torch.stack(dreamt, 1)))
    real = stacks[:, :-1, -c:].float() / 255
    rows, captions = rows_and_captions(real, recon, imagined, real_text, dream_text)
    title = [
        f"TWM dream after agent step {step}: {sequences} random windows of real play, one episode each.",
        "Rows: real (a = action, r = tanh reward, end), reconstruction, dream, |real - dream|.",
        "Dream: green = context (real z fed in), red = imagined from its own samples and real actions;",
        "r, g = predicted tanh reward and discount (end: g < 0.5).",
    ]
    return rows, captions, context, title


@torch.no_grad()
def iris_dream(tokenizer, world_model, replay, args, step, sequences=4):
    """Dream rows (S, 4, n, 3, H, W) and captions of IRIS: real tokens for `context` frames, then its own."""
    starts, n, context = windows(replay, args, step, sequences)
    index = starts[:, None] + np.arange(n)  # frames s .. s+n-1
    device = tokenizer.codebook.weight.device
    frames = torch.as_tensor(replay.frames[index], device=device)
    actions = torch.as_tensor(replay.actions[index], device=device)
    real_text = [
        [f"a={a} r={r + 0:+g}" + " end" * int(e) for a, r, e in zip(*row)]  # what followed
        for row in zip(replay.actions[index], replay.rewards[index], replay.ends[index])
    ]
    tokens = tokenizer.encode(frames)[0]  # (S, n, 16)
    recon, dream_text = tokenizer.decode(tokens), [["context"] * context for _ in range(sequences)]
    with torch.random.fork_rng():  # seeded by `step`
        torch.manual_seed(step)
        cache, dreamt = world_model.new_cache(sequences), [recon[:, :context]]  # context: real tokens
        world_model(torch.cat([tokens[:, :context], actions[:, :context, None]], 2).flatten(1)[:, :-1], cache)
        for t in range(context - 1, n):  # feed a_t; sample r_t, d_t of the step from frame t and frame t+1
            reward, end, frame = iris.world_model_step(
                world_model, tokenizer, cache, actions[:, t], decode=t < n - 1
            )
            if t < n - 1:
                dreamt.append(frame[:, None])
            if t >= context:  # what the dream predicts, under its frames
                for s, (r, e) in enumerate(zip(reward.tolist(), end.tolist())):
                    dream_text[s].append(f"dream\nr={r:+.0f}" + " end" * int(e))
    real, imagined = frames.float() / 255, torch.cat(dreamt, 1)
    rows, captions = rows_and_captions(real, recon, imagined, real_text, dream_text)
    title = [
        f"IRIS dream at step {step}: {sequences} random windows of real play, one episode each.",
        "Rows: real (a = action taken, r = reward, end), reconstruction, dream, |real - dream|.",
        "Dream: green = context (real tokens fed in), red = imagined from its own sampled tokens and",
        "the real actions; r = predicted reward sign of the step, end = predicted end.",
    ]
    return rows, captions, context, title


def dream_image(rows, captions, context, title, scale=2):
    """Lay out dream rows (S, 4, n, c, H, W) in [0, 1] as one labelled RGB picture (H, W, 3)."""
    S, R, n, size = *rows.shape[:3], rows.shape[-1] * scale
    cells = (rows * 255).round().byte().expand(-1, -1, -1, 3, -1, -1).permute(0, 1, 2, 4, 5, 3).cpu().numpy()
    cell_w, cell_h, left, top = size + 8, size + 34, 120, 18 * len(title) + 8
    image = np.full((top + S * (R * cell_h + 12), left + n * cell_w, 3), 48, np.uint8)  # grey between frames

    def text(line, x, y, color=(255, 255, 255)):
        cv2.putText(image, line, (x, y), cv2.FONT_HERSHEY_SIMPLEX, 0.4, color, 1, cv2.LINE_AA)

    for i, line in enumerate(title):
        text(line, 4, 16 + 18 * i)
    for s, r, t in np.ndindex(S, R, n):
        x, y = left + t * cell_w + 4, top + s * (R * cell_h + 12) + r * cell_h + 4
        image[y : y + size, x : x + size] = cells[s, r, t].repeat(scale, 0).repeat(scale, 1)
        color = ((80, 220, 80) if t < context else (255, 80, 80)) if r == 2 else (255, 255, 255)
        if r == 2:
            cv2.rectangle(image, (x - 3, y - 3), (x + size + 2, y + size + 2), color, 2)
        for i, line in enumerate(captions[s][r][t].split("\n")):
            text(line, x, y + size + 14 + 13 * i, color)
        if t == 0:
            text(f"{s + 1}: " + ("real", "reconstruction", "dream", "|real - dream|")[r], 4, y + size // 2)
    return image


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="runs/<run>/checkpoint.pt of a twm.py or iris.py run")
    parser.add_argument("--episodes", type=int, default=100, help="whole games (the Atari 100k count)")
    parser.add_argument("--capture-video", action="store_true", help="save the first game as videos/eval.mp4")
    parser.add_argument("--out", help="the output folder (default runs/<run>/eval_<agent step>/)")
    parser.add_argument("--device", default="cpu", help="torch device of the networks")
    flags = parser.parse_args(argv)
    script, args, models, replay = load(flags.checkpoint, torch.device(flags.device))
    step = replay.size  # agent steps so far
    out = Path(flags.out or Path(flags.checkpoint).resolve().parent / f"eval_{step}")
    out.mkdir(parents=True, exist_ok=True)
    dream = (twm_dream if script is twm else iris_dream)(*models[:2], replay, args, step)
    cv2.imwrite(str(out / "dream.png"), cv2.cvtColor(dream_image(*dream), cv2.COLOR_RGB2BGR))
    if flags.episodes > 0:
        video = [] if flags.capture_video else None
        policy = policy_of(script, args, models, torch.device(flags.device))
        returns = script.evaluate(args, policy, flags.episodes, seed=args.seed + 1_000_000, video=video)
        if video:
            script.write_video(str(out / "videos" / "eval.mp4"), video)
        mean = float(returns.mean())
        summary = dict(
            env_id=args.env_id,
            seed=args.seed,
            total_timesteps=step,
            eval_episodes=flags.episodes,
            eval_return_mean=mean,
            eval_return_std=float(returns.std()),
            human_normalized_score=script.human_normalized_score(args.env_id, mean),
        )
        summary = {key: value for key, value in summary.items() if value is not None}  # HNS: 26 games only
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
