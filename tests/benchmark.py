"""Time one training update of each agent at the shapes the official code was timed at, and two reference
workloads.

    python tests/benchmark.py            # paper architectures, 2 warm-ups, median of 5, all cores
    python tests/benchmark.py --tiny     # tiny preset shapes (what the test suite runs)

Prints one JSON object per line: {"name", "seconds" (median), "min", "max", "shape"}. It imports the scripts'
own classes and functions, so what it times is what training runs. The first two rows are reference workloads,
a convolution and a matrix product; every update row is also given in units of the convolution
("conv_references"), which makes runs on different days and machines comparable. At the paper's shapes the
update rows also give the official code's time in the same units and the ratio of the two ("vs_official").
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
# The official code's update times in units of reference_conv, both measured in one run on a quiet 2-core CPU
# (2 threads, fp32): official seconds 3.681, 26.913, 5.427, 5.392, 19.997 against a 12.59 ms reference.
OFFICIAL_CONV_REFERENCES = {
    "twm_update_b16": 292,
    "twm_update_b100": 2138,
    "iris_tokenizer_b32": 431,
    "iris_world_model_b8": 428,
    "iris_actor_critic_b8": 1588,
}
reference_seconds = None  # set by bench_references, before the updates are timed


def timed(name, shape, step, warmup=WARMUP, repeats=REPEATS):
    for _ in range(warmup):
        step()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    row = dict(
        name=name,
        seconds=round(median, 4),
        min=round(min(seconds), 4),
        max=round(max(seconds), 4),
        shape=shape,
    )
    if name in OFFICIAL_CONV_REFERENCES:
        row["conv_references"] = round(median / reference_seconds, 1)
        if not TINY:
            row["official_conv_references"] = OFFICIAL_CONV_REFERENCES[name]
            row["vs_official"] = round(OFFICIAL_CONV_REFERENCES[name] / row["conv_references"], 2)
    print(json.dumps(row), flush=True)
    return median


def bench_references():
    """A 64-channel 3x3 convolution on 8 x 64 x 64 frames (channels_last, no grad) and a 2048 x 2048 fp32
    matrix product: compute-bound work whose speed is the machine's, not the code's (median of 20)."""
    global reference_seconds
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(memory_format=torch.channels_last)
    frames = torch.randn(8, 64, 64, 64).contiguous(memory_format=torch.channels_last)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    with torch.no_grad():
        reference_seconds = timed(
            "reference_conv",
            "64 -> 64 channels, 3x3, 8 x 64 x 64, channels_last, no grad",
            lambda: conv(frames),
            warmup=3,
            repeats=20,
        )
        timed("reference_gemm", "2048 x 2048 @ 2048 x 2048, fp32", lambda: a @ b, warmup=3, repeats=20)


def synthetic_twm_replay(args, size, rng):
    """Random frames and actions, rewards ±1 with probability 5% (stored as tanh), terminations with 1%."""
    replay = twm.Replay(size, (1, 64, 64), args.frame_stack, args.buffer_temperature, seed=0)
    replay.frames[:] = rng.integers(0, 256, replay.frames.shape, dtype=np.uint8)
    replay.actions[:] = rng.integers(0, 6, size)
    replay.rewards[:] = np.tanh(rng.choice([-1.0, 0.0, 1.0], size, p=[0.025, 0.95, 0.025]))
    replay.terminated[:] = rng.random(size) < 0.01
    replay.episode_start[:] = np.maximum.accumulate(
        np.where(np.r_[True, replay.terminated], np.arange(size + 1), 0)
    )
    replay.size = size
    return replay


def bench_twm(wm_batch, ac_batch, rng):
    argv = ["--preset", "tiny"] if TINY else []
    args = twm.parse_args([*argv, "--wm-batch-size", str(wm_batch), "--ac-batch-size", str(ac_batch)])
    replay = synthetic_twm_replay(args, 2_000 if TINY else 99_999, rng)
    z_dim = args.z_categoricals * args.z_classes
    models = (
        twm.ObservationModel(args, args.frame_stack),
        twm.DynamicsModel(args, 6),
        twm.mlp(z_dim, args.ac_hidden_dim, 6, args.ac_layers),
        twm.mlp(z_dim, args.ac_hidden_dim, 1, args.ac_layers),
    )
    optimizers = [
        torch.optim.Adam(m.parameters(), 1e-4, eps=args.adam_eps, weight_decay=args.weight_decay)
        for m in models
    ]

    def step():
        twm.train_step(models, optimizers, replay, args, "cpu", contextlib.nullcontext())

    shape = f"world model {wm_batch} x {args.wm_sequence_length} steps, imagination {ac_batch} x "
    timed(f"twm_update_b{wm_batch}", shape + f"{args.ac_horizon}", step)


def synthetic_iris_replay(size, rng):
    """Random RGB frames and actions, rewards ±1 with probability 5%, and one long episode, so that (almost)
    no sampled segment is padded: every frame is real work, as in the official timing (mask_padding all
    True)."""
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

    timed(
        "iris_tokenizer_b32",
        "32 frames 3x64x64",
        lambda: in_train_mode(
            tokenizer, lambda: iris.train_tokenizer(tokenizer, tok_opt, replay, args, "cpu")
        ),
    )
    timed(
        "iris_world_model_b8",
        f"8 x {args.wm_sequence_length} steps ({17 * args.wm_sequence_length} tokens)",
        lambda: in_train_mode(
            world_model, lambda: iris.train_world_model(world_model, tokenizer, wm_opt, replay, args, "cpu")
        ),
    )
    timed(
        "iris_actor_critic_b8",
        f"8 x burn-in {args.burn_in} + horizon {args.imagine_horizon}",
        lambda: in_train_mode(
            actor_critic,
            lambda: iris.train_actor_critic(
                actor_critic, tokenizer, world_model, ac_opt, replay, args, "cpu"
            ),
        ),
    )


if __name__ == "__main__":
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    twm.keep_freed_memory()  # as training does (the same function is in iris.py)
    rng = np.random.default_rng(0)
    bench_references()
    bench_twm(16, 64, rng)
    bench_twm(100, 400, rng)
    bench_iris(rng)
