"""Start-up checks of both scripts: every flag value that can be wrong stops the run with one line naming the
flag."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import iris
import twm

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(60)

SHARED = [  # (flags, what the one line must say), for both scripts
    (["--device", "nonsense"], "--device nonsense is not a device of this machine"),
    (["--run-name", "../../x"], "--run-name ../../x would write outside runs/"),
    (["--run-name", "/tmp/x"], "--run-name /tmp/x would write outside runs/"),
    (["--gamma", "1.5"], "--gamma 1.5 must be in (0, 1]"),
    (["--gamma", "0"], "--gamma 0.0 must be in (0, 1]"),
    (["--save-every", "-1"], "--save-every -1 must be 0 or more"),
    (["--seed", "-1"], "--seed -1 must be 0 or more"),
    (["--total-timesteps", "0"], "--total-timesteps 0 must be positive"),
    (["--eval-episodes", "0"], "--eval-episodes 0 must be positive"),
    (["--eval-every", "-5"], "--eval-every -5 must be positive"),
    (["--log-every", "0"], "--log-every 0 must be positive"),
    (["--wm-batch-size", "0"], "--wm-batch-size 0 must be positive"),
    (["--ac-batch-size", "0"], "--ac-batch-size 0 must be positive"),
    (["--wm-lr", "0"], "--wm-lr 0.0 must be positive"),
] + (
    []
    if torch.cuda.is_available()
    else [(["--device", "cuda"], "--device cuda is not a device of this machine")]
)
TWM = [
    (["--frame-stack", "0"], "--frame-stack 0 must be positive"),
    (["--z-classes", "1"], "--z-classes 1 must be at least 2"),
    (["--z-categoricals", "0"], "--z-categoricals 0 must be positive"),
    (["--lambda_", "1.5"], "--lambda_ 1.5 must be in (0, 1]"),
    (["--dyn-dropout", "1"], "--dyn-dropout 1.0 must be in [0, 1)"),
    (["--prefill", "-1"], "--prefill -1 must be 0 or more"),
    (["--updates-per-step", "0"], "--updates-per-step 0.0 must be positive"),
    (["--dyn-layers", "0"], "--dyn-layers 0 must be positive"),
    (["--total-timesteps", "100", "--prefill", "500"], "--total-timesteps 100 must exceed --prefill 500"),
]
IRIS = [
    (["--tok-vocab-size", "1"], "--tok-vocab-size 1 must be at least 2"),
    (["--lam", "0"], "--lam 0.0 must be in (0, 1]"),
    (["--wm-dropout", "1"], "--wm-dropout 1.0 must be in [0, 1)"),
    (["--collect-epsilon", "2"], "--collect-epsilon 2.0 must be in [0, 1]"),
    (["--tok-ch", "0"], "--tok-ch 0 must be positive"),
    (["--epochs", "0"], "--epochs 0 must be positive"),
    (["--wm-steps-per-epoch", "-1"], "--wm-steps-per-epoch -1 must be 0 or more"),
    (["--tok-stop-after", "3"], "--tok-stop-after 3 must be 0 (never stop) or above --tok-start-after 5"),
    (["--imagine-horizon", "50"], "--imagine-horizon 50 must be at most --wm-sequence-length 20"),
]
CASES = [
    (module, flags, message) for module, own in ((twm, TWM), (iris, IRIS)) for flags, message in SHARED + own
]


@pytest.mark.parametrize(
    "module, flags, message", CASES, ids=[f"{m.__name__}{' '.join(f)}" for m, f, _ in CASES]
)
def test_a_wrong_flag_stops_with_one_line_naming_it(module, flags, message):
    with pytest.raises(SystemExit) as stopped:
        module.parse_args(flags)
    line = str(stopped.value)
    assert f": error: {message}" in line and "\n" not in line  # "<program>: error: <message>", one line
    if (
        "must be" in message
        and "--tok-stop-after" not in message
        and "exceed" not in message
        and "at most" not in message
    ):
        assert "pass for example" in line  # the fix: a value that works, from the preset


@pytest.mark.parametrize("module", [twm, iris])
@pytest.mark.parametrize("preset", ["paper", "tiny"])
def test_every_preset_value_passes_the_checks(module, preset):
    args = module.parse_args(["--preset", preset, "--run-name", "sweep/Pong__1", "--device", "cpu"])
    assert (
        args.preset == preset and args.run_name == "sweep/Pong__1"
    )  # a sweep's folder inside runs/ is allowed


@pytest.mark.parametrize("script", ["twm.py", "iris.py"])
def test_the_command_line_gets_one_line_and_no_traceback(script):
    result = subprocess.run(
        [sys.executable, script, "--gamma", "1.5"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"{script}: error: --gamma 1.5 must be in (0, 1]; pass for example "
        f"--gamma {0.99 if script == 'twm.py' else 0.995} (the paper preset's)"
    ]
