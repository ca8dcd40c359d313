"""Worker of tests/test_distributed.py: train a tiny multi-scale Glow under torchrun, save it.

Run as ``torchrun --standalone --nproc_per_node N tests/workers/ddp_train.py OUT [--hflip]``.
Trains in float64 (so all-reduce rounding stays near 1e-16) with a global batch of 32 on 128
digits, every part of the training recipe active (warm-up, cosine schedule, clipping, EMA), and
rank 0 saves the final (EMA) parameters and the training curve to ``OUT``.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from lcma_ext.data import LogitPreprocessing, load_digits_dataset
from lcma_ext.distributed import init_from_env, world
from lcma_ext.models import build_flow, make_level_factory
from lcma_ext.pipeline import build_multiscale_transform
from lcma_ext.training import TrainConfig, train_flow

SHAPE = (1, 8, 8)


def main(out: str, hflip: bool) -> None:
    init_from_env("cpu")
    torch.manual_seed(0)
    factory = make_level_factory("glow", "tiny", hidden=8, steps=1)
    transform = build_multiscale_transform(factory, SHAPE, 2, "checkerboard")
    flow = build_flow(transform, SHAPE).double()
    data = load_digits_dataset()
    config = TrainConfig(
        epochs=2, batch_size=32, progress=False, hflip=hflip, seed=3,
        warmup_steps=2, lr_schedule="cosine", grad_clip=0.7, ema_decay=0.8,
    )  # fmt: skip
    result = train_flow(flow, data.train[:128], LogitPreprocessing(17), config)
    if world().is_main:
        state = {k: v.detach().clone() for k, v in flow.named_parameters()}
        torch.save({"model": state, "result": result.to_dict()}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], "--hflip" in sys.argv[2:])
