"""`--track` in both scripts: a short run logged to Weights & Biases offline (WANDB_MODE=offline) holds the
same scalars as the run's TensorBoard event file, and the flags as its config."""

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto import wandb_internal_pb2

ROOT = Path(__file__).resolve().parents[1]
SHORT = {  # a few updates of every kind on Catch
    "twm.py": "--preset tiny --total-timesteps 520 --prefill 500 --pretrain-obs-updates 5 "
    "--pretrain-dyn-updates 5 --pretrain-ac-updates 5 --log-every 5 --eval-episodes 2",
    "iris.py": "--preset tiny --total-timesteps 200 --epochs 3 --tok-start-after 0 --wm-start-after 1 "
    "--ac-start-after 2 --tok-steps-per-epoch 4 --wm-steps-per-epoch 4 --ac-steps-per-epoch 4 --log-every 2 "
    "--eval-episodes 2",
}


def records(path, block=32768):
    """The protobuf Records of a .wandb file: a 7-byte W&B header, then LevelDB log framing (32 KiB blocks,
    each record a 7-byte header: checksum, length, type 1 full / 2 first / 3 middle / 4 last)."""
    data, position, record = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        record += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            parsed = wandb_internal_pb2.Record()
            parsed.ParseFromString(record)
            yield parsed
            record = b""


@pytest.mark.timeout(180)
@pytest.mark.parametrize("script", ["twm.py", "iris.py"])
def test_track_logs_the_tensorboard_scalars_and_the_flags_to_an_offline_wandb_run(script):
    run = f"test_track_{script.removesuffix('.py')}"
    run_id = f"{run}_{os.getpid()}"
    shutil.rmtree(ROOT / "runs" / run, ignore_errors=True)
    flags = [*SHORT[script].split(), "--env-id", "tests.catch:Catch-v0", "--run-name", run, "--track"]
    env = dict(os.environ, WANDB_MODE="offline", WANDB_RUN_ID=run_id, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, script, *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=170
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (offline,) = (ROOT / "runs" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    history, config = {}, {}  # history: {tag: {step: value}}
    for record in records(offline):
        scalars = {"/".join(item.nested_key): float(item.value_json) for item in record.history.item}
        for tag, value in scalars.items():
            history.setdefault(tag, {})[scalars.get("global_step")] = value
        for item in record.run.config.update:
            config[item.key] = item.value_json
    events = EventAccumulator(str(ROOT / "runs" / run))
    events.Reload()
    # W&B keeps one value per tag and step: the last (IRIS logs several gradient steps at one agent step)
    tensorboard = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    assert any(tag.startswith("losses/") for tag in tensorboard) and "eval/return_mean" in tensorboard
    for tag, values in tensorboard.items():
        assert history.get(tag) == pytest.approx(values), tag
    assert config["env_id"] == '"tests.catch:Catch-v0"' and config["track"] == "true"
    shutil.rmtree(offline.parent)
