"""Time one training update of each agent at the shapes of ../shared/reference/perf_anchor.md.

    python tests/benchmark.py            # paper architectures, 2 warm-ups, median of 5, all cores
    python tests/benchmark.py --tiny     # tiny preset shapes (what the test suite runs)

Prints one JSON object per line: {"name", "seconds" (median), "min", "max", "shape"}. It imports the
scripts' own classes and functions, so what it times is what training runs.
"""

import contextlib
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import iris  # noqa: E402
import twm  # noqa: E402

TINY = "--tiny" in sys.argv
WARMUP, REPEATS = (1, 1) if TINY else (2, 5)


def timed(name, shape, step):
    for _ in range(WARMUP):
        step()
    seconds = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    print(json.dumps(dict(name=name, seconds=round(statistics.median(seconds), 4), min=round(min(seconds), 4),
                          max=round(max(seconds), 4), shape=shape)), flush=True)


def synthetic_twm_replay(args, size, rng):
    """Random frames and actions, rewards ±1 with probability 5% (stored as tanh), terminations with 1%."""
    replay = twm.Replay(size, (1, 64, 64), args.frame_stack, args.buffer_temperature, seed=0)
    replay.frames[:] = rng.integers(0, 256, replay.frames.shape, dtype=np.uint8)
    replay.actions[:] = rng.integers(0, 6, size)
    replay.rewards[:] = np.tanh(rng.choice([-1.0, 0.0, 1.0], size, p=[0.025, 0.95, 0.025]))
    replay.terminated[:] = rng.random(size) < 0.01
    replay.episode_start[:] = np.maximum.accumulate(np.where(np.r_[True, replay.terminated], np.arange(size + 1), 0))
    replay.size = size
    return replay


def bench_twm(wm_batch, ac_batch, rng):
    argv = ["--preset", "tiny"] if TINY else []
    args = twm.parse_args([*argv, "--wm-batch-size", str(wm_batch), "--ac-batch-size", str(ac_batch)])
    replay = synthetic_twm_replay(args, 2_000 if TINY else 99_999, rng)
    z_dim = args.z_categoricals * args.z_classes
    models = (twm.ObservationModel(args, args.frame_stack), twm.DynamicsModel(args, 6),
              twm.mlp(z_dim, args.ac_hidden_dim, 6, args.ac_layers), twm.mlp(z_dim, args.ac_hidden_dim, 1, args.ac_layers))
    optimizers = [torch.optim.Adam(m.parameters(), 1e-4, eps=args.adam_eps, weight_decay=args.weight_decay)
                  for m in models]
    step = lambda: twm.train_step(models, optimizers, replay, args, "cpu", contextlib.nullcontext())  # noqa: E731
    shape = f"world model {wm_batch} x {args.wm_sequence_length} steps, imagination {ac_batch} x {args.ac_horizon}"
    timed(f"twm_update_b{wm_batch}", shape, step)


def synthetic_iris_replay(size, rng):
    """Random RGB frames and actions, rewards ±1 with probability 5%, and one long episode, so that (almost) no
    sampled segment is padded: every frame is real work, as in the official timing (mask_padding all True)."""
    replay = iris.Replay(size, (3, 64, 64), seed=0)
    replay.frames[:] = rng.integers(0, 256, replay.frames.shape, dtype=np.uint8)
    replay.actions[:] = rng.integers(0, 6, size)
    replay.rewards[:] = rng.choice([-1.0, 0.0, 1.0], size, p=[0.025, 0.95, 0.025])
    replay.size = size  # ends all False, episode_start all 0
    return replay


def bench_iris(rng):
    argv = ["--preset", "tiny"] if TINY else []
    args = iris.parse_args([*argv, "--tok-batch-size", "32", "--wm-batch-size", "8", "--ac-batch-size", "8"])
    replay = synthetic_iris_replay(2_000 if TINY else 20_000, rng)
    tokenizer, world_model = iris.Tokenizer(args).eval(), iris.WorldModel(args, 6).eval()
    actor_critic = iris.ActorCritic(6, args.ac_lstm_dim, args.ac_cnn_channels).eval()
    tok_opt = torch.optim.Adam(tokenizer.parameters(), args.tok_lr)
    wm_opt = torch.optim.AdamW(iris.adamw_param_groups(world_model, args.wm_weight_decay), args.wm_lr)
    ac_opt = torch.optim.Adam(actor_critic.parameters(), args.ac_lr)

    def in_train_mode(module, step):  # the official trainer's modes: only the trained component in train mode
        module.train()
        step()
        module.eval()

    timed("iris_tokenizer_b32", "32 frames 3x64x64", lambda: in_train_mode(
        tokenizer, lambda: iris.train_tokenizer(tokenizer, tok_opt, replay, args, "cpu")))
    timed("iris_world_model_b8", f"8 x {args.wm_sequence_length} steps ({17 * args.wm_sequence_length} tokens)",
          lambda: in_train_mode(world_model, lambda: iris.train_world_model(world_model, tokenizer, wm_opt, replay,
                                                                              args, "cpu")))
    timed("iris_actor_critic_b8", f"8 x burn-in {args.burn_in} + horizon {args.imagine_horizon}",
          lambda: in_train_mode(actor_critic, lambda: iris.train_actor_critic(actor_critic, tokenizer, world_model,
                                                                                ac_opt, replay, args, "cpu")))


if __name__ == "__main__":
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    twm.keep_freed_memory()  # as training does (the same function is in iris.py)
    rng = np.random.default_rng(0)
    bench_twm(16, 64, rng)
    bench_twm(100, 400, rng)
    bench_iris(rng)
