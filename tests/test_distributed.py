"""torchrun + DistributedDataParallel (gloo on the CPU) against one process, and every random
state in the checkpoint (resume equals an uninterrupted run for every model family).

The torchrun tests start real process groups: ``python -m torch.distributed.run --standalone``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lcma_ext.data import LogitPreprocessing, load_digits_dataset
from lcma_ext.distributed import World, init_from_env, launched_by_torchrun, world
from lcma_ext.models import build_flow, make_level_factory
from lcma_ext.pipeline import build_multiscale_transform
from lcma_ext.training import TrainConfig, evaluate_bpd, load_checkpoint, train_flow

WORKER = Path(__file__).parent / "workers" / "ddp_train.py"
SHAPE = (1, 8, 8)


def _torchrun(nproc: int, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", str(nproc), *args]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_one_process_is_not_distributed() -> None:
    assert not launched_by_torchrun()
    assert world() == World(rank=0, size=1, local_rank=0, distributed=False)
    assert world().is_main
    assert init_from_env("cpu") == torch.device("cpu")


def test_two_ranks_take_the_steps_of_one_rank_float64(tmp_path: Path) -> None:
    """Same global batch (32) and data order: 2 ranks x 16 equal 1 rank x 32 to 1e-9.

    Float64 keeps the all-reduce rounding near 1e-16, so a wrong row of noise, flips or data
    (a shift by one row moves parameters by about 1e-3), or an ActNorm initialised on one
    rank's half batch, fails this by many orders of magnitude.
    """
    outputs = {}
    for nproc in (1, 2):
        out = tmp_path / f"w{nproc}.pt"
        _torchrun(nproc, str(WORKER), str(out), "--hflip", cwd=tmp_path)
        outputs[nproc] = torch.load(out)
    one, two = outputs[1], outputs[2]
    assert (one["result"]["world_size"], two["result"]["world_size"]) == (1, 2)
    assert (one["result"]["rank_batch_size"], two["result"]["rank_batch_size"]) == (32, 16)
    assert one["model"].keys() == two["model"].keys()
    for name, value in one["model"].items():
        torch.testing.assert_close(two["model"][name], value, rtol=0, atol=1e-9, msg=name)
    assert two["result"]["train_bpd"] == pytest.approx(one["result"]["train_bpd"], abs=1e-9)
    assert two["result"]["clipped_steps"] == one["result"]["clipped_steps"]
    assert 0 < one["result"]["clipped_steps"] < 8  # the clip splits the steps (measured: 7)
    assert two["result"]["steps"] == one["result"]["steps"] == 8


def test_torchrun_cli_run_matches_one_process(tmp_path: Path) -> None:
    """``torchrun -m lcma_ext run`` with 2 ranks against 1 rank, float32, figures within 1e-3.

    Measured: the bits/dim of every arm and of the NMS agree to about 1e-4 (Adam turns float32
    all-reduce rounding into parameter differences of up to ~lr on near-zero gradients).
    """
    arguments = "--model glow --arms channel,checkerboard --seeds 1 --epochs 2 --nms-epochs 1"
    results = {}
    for nproc in (1, 2):
        out = tmp_path / f"run{nproc}"
        args = ["-m", "lcma_ext", "run", *arguments.split(), "--limit", "256", "--no-progress"]
        done = _torchrun(nproc, *args, "--out", str(out), cwd=tmp_path)
        assert done.stdout.count("Test bits/dim (lower is better)") == 1  # rank 0 alone prints
        results[nproc] = json.loads((out / "results.json").read_text())
    one, two = results[1], results[2]
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert (one["rank_batch_size"], two["rank_batch_size"]) == (64, 32)
    assert two["nms"]["test_bpd"] == pytest.approx(one["nms"]["test_bpd"], abs=1e-3)
    for arm in ("channel", "checkerboard"):
        a, b = one["arms"][arm]["bpd_per_seed"], two["arms"][arm]["bpd_per_seed"]
        assert b == pytest.approx(a, abs=1e-3)
    assert sorted(p.name for p in (tmp_path / "run2" / "runs").iterdir()) == [
        "channel_seed0.json",
        "checkerboard_seed0.json",
        "contributions.json",
        "nms.json",
    ]


# ----------------------------------------------------------------------------------------------
# resume = uninterrupted, for the families that draw from torch's global generator


def _residual_flow(model: str) -> torch.nn.Module:
    torch.manual_seed(0)
    factory = make_level_factory(model, "tiny", hidden=8, steps=1)
    return build_flow(build_multiscale_transform(factory, SHAPE, 2, "channel"), SHAPE)


@pytest.mark.parametrize("model", ["resflow", "iresnet", "glow"])
def test_resume_after_a_kill_equals_the_uninterrupted_run(model: str, tmp_path: Path) -> None:
    """Kill after epoch 1 (a fresh build and another global random state), resume to 2 epochs.

    Residual Flows and i-ResNets draw Hutchinson probes and roulette terms from torch's global
    generator; the checkpoint holds it (and the schedule and the EMA), so the resumed run ends
    bit for bit where the uninterrupted one does; the flows hold the EMA weights.
    """
    data = load_digits_dataset()
    train, test, pre = data.train[:96], data.test[:48], LogitPreprocessing(17)
    recipe = {"warmup_steps": 2, "lr_schedule": "cosine", "grad_clip": 1.0, "ema_decay": 0.8}
    config = TrainConfig(epochs=2, batch_size=32, progress=False, **recipe)
    straight = _residual_flow(model)
    reference = train_flow(straight, train, pre, config, test_data=test)
    path = tmp_path / "arm.pt"
    first = _residual_flow(model)
    # killed after epoch 1 of the same 2-epoch budget (so the same schedule)
    partial = TrainConfig(epochs=1, batch_size=32, progress=False, schedule_epochs=2, **recipe)
    train_flow(first, train, pre, partial, test_data=test, checkpoint_path=path)
    assert len(load_checkpoint(path)["random_state"]["ranks"]) == 1
    torch.manual_seed(12345)  # the new process's global state differs
    resumed_flow = _residual_flow(model)
    torch.randn(1000)
    resumed = train_flow(resumed_flow, train, pre, config, test_data=test, checkpoint_path=path)
    assert resumed.train_bpd == reference.train_bpd
    assert resumed.test_bpd == reference.test_bpd
    assert (resumed.steps, resumed.clipped_steps) == (reference.steps, reference.clipped_steps)
    for (name, p), q in zip(straight.named_parameters(), resumed_flow.parameters()):
        assert torch.equal(p, q), name
    scores = []
    for flow in (straight, resumed_flow):  # residual estimators draw from the global generator
        torch.manual_seed(0)
        scores.append(evaluate_bpd(flow, test, pre))
    assert scores[0] == scores[1]
