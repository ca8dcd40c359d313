"""What the run folder's checks cost: fingerprints and checksums against a run's wall time.

A run (``run_comparison``) is timed end to end while every call of the checks is timed too:
the data fingerprints (:func:`lcma_ext.experiments.store.data_fingerprints`) and the content
checksums of every state file written or read (:func:`lcma_ext.storage.content_checksum`, which
runs once per checkpoint save and once per verified load). Times are the process's CPU time
(``time.process_time``, one torch thread), so a loaded machine that pauses the process does not
charge the pause to whichever call it hit. The share printed is the checks' time over the whole
run's. A rerun of the finished folder (every summary verified, nothing trained) is timed
the same way. The last row times the data fingerprint alone on random images of CIFAR-10's
size (60,000 x 3 x 32 x 32), computed once per run.

Usage::

    python benchmarks/bench_run_store.py                 # quick digits run, lcma + channel
    python benchmarks/bench_run_store.py --limit 5000    # all 1437 digits (23 steps per epoch)
    python benchmarks/bench_run_store.py --model glow --arms lcma,channel,lcma-self
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

import lcma_ext.storage as storage
from lcma_ext.data import ImageDataset
from lcma_ext.experiments import ExperimentConfig, run_comparison, runner, store

SPENT: dict[str, float] = {"checksum": 0.0, "fingerprint": 0.0}
CALLS: dict[str, int] = {"checksum": 0, "fingerprint": 0}
LONGEST: dict[str, float] = {"checksum": 0.0, "fingerprint": 0.0}


def _timed(kind: str, function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        begin = time.process_time()
        try:
            return function(*args, **kwargs)
        finally:
            seconds = time.process_time() - begin
            SPENT[kind] += seconds
            CALLS[kind] += 1
            LONGEST[kind] = max(LONGEST[kind], seconds)

    return wrapper


def _instrument() -> None:
    checksum = _timed("checksum", storage.content_checksum)
    storage.content_checksum = checksum  # stamped() and load_stamped() look it up here
    store.content_checksum = checksum  # run summaries
    fingerprints = _timed("fingerprint", store.data_fingerprints)
    store.data_fingerprints = fingerprints  # evaluate / interpolate
    runner.data_fingerprints = fingerprints  # a run's provenance


def _timed_run(config: ExperimentConfig) -> tuple[float, float, dict[str, int]]:
    for kind in SPENT:
        SPENT[kind], CALLS[kind], LONGEST[kind] = 0.0, 0, 0.0
    begin = time.process_time()
    run_comparison(config)
    cpu = time.process_time() - begin
    return cpu, sum(SPENT.values()), dict(CALLS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="realnvp")
    parser.add_argument("--arms", default="lcma,channel")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--limit", type=int, default=None, help="images per split (default: quick's 512)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _instrument()
    with tempfile.TemporaryDirectory() as folder:
        config = ExperimentConfig(
            quick=True,
            model=args.model,
            arms=args.arms,
            limit=args.limit,
            out=folder,
            progress=False,
        )
        for label in ("fresh quick run", "rerun of the finished folder"):
            cpu, checks, calls = _timed_run(config)
            print(
                f"{label}: CPU {cpu:.2f} s, checks {checks * 1e3:.1f} ms "
                f"({100 * checks / cpu:.3f} %), calls {calls}, longest call "
                f"{ {kind: round(1e3 * value, 1) for kind, value in LONGEST.items()} } ms"
            )
    for name, shape in (("CIFAR-10", (60000, 3, 32, 32)),):
        images = torch.randint(0, 256, shape, dtype=torch.uint8)
        data = ImageDataset(name, images[:-10000], images[-10000:], levels=256)
        begin = time.process_time()
        store.data_fingerprints(data)
        seconds = time.process_time() - begin
        size = images.numel() / 2**20
        print(f"data fingerprint of {name} ({size:.0f} MiB): {seconds:.2f} s, once per run")


if __name__ == "__main__":
    main()
