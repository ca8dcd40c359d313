"""Residual Flow blocks: lcma-ext against normflows' ``Residual``, side by side.

Same net (pre-activation LipSwish conv net 3-1-3, or MLP), same widths, batch, depth, optimizer,
one Gaussian probe and one power iteration per step in both arms (ours: automatic in
``train()``; normflows: ``update_lipschitz(model, 1)`` after each step, its documented way).

Same estimator: normflows' geometric roulette (like the reference code) draws ``N >= 1`` and
computes ``n_exact_terms + N`` terms, so its ``n_exact_terms=2`` always computes at least 3
terms; it is, term for term, our estimator with ``n_exact_terms=3`` (ours draws ``N >= 0``;
``tests/test_residual.py::test_roulette_is_the_normflows_estimator``). For the time and memory
arms our blocks also draw ``N`` from numpy's global generator, as normflows does, so with the
same seed both arms compute the same number of terms in every block of every step (the
shipped class draws from torch; only the source of the random number differs). The variance
arms use the shipped class.

Two gradient modes are compared:

* ``backprop``: backpropagation through the series (ours ``neumann_grad=False``, normflows
  ``reduce_memory=False``);
* ``mem-eff``: Neumann gradient + memory-efficient backward (ours defaults, normflows
  ``reduce_memory=True``); ours also without the memory-efficient backward (``neumann``).

Measured:

* train-step time (forward + backward + Adam step), median over steps, arms interleaved in
  this one process;
* peak memory of a train step above what was allocated before it, averaged over steps: on
  CUDA ``torch.cuda.max_memory_allocated``; on CPU the peak of PyTorch's CPU allocator's
  ``Total Allocated`` counter as recorded by ``torch.profiler`` (``profile_memory=True``),
  exact to the byte (``tracemalloc`` cannot see PyTorch's allocator, and the resident set
  size also counts the C allocator's caching);
* the variance of the log-det estimate on the same function (weights copied from our net into
  normflows' and both spectral norms converged), in train and eval mode, and for ours
  also in :func:`lcma_ext.transforms.low_variance_estimation`.

Run: ``python benchmarks/bench_residual.py`` (``--quick`` for a smoke run, ``--device cuda``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence

import normflows as nf
import numpy as np
import torch

from lcma_ext import normflows as lnf
from lcma_ext.nets import spectral_layers, update_lipschitz
from lcma_ext.transforms import ResidualFlowBlock, low_variance_estimation

#: normflows' ``n_exact_terms=2`` is our ``n_exact_terms=3`` (see the module docstring); in
#: eval mode normflows computes ``20 + N`` terms, ``N >= 1``: our ``eval_n_exact_terms=21``.
THEIR_EXACT_TERMS, OUR_EXACT_TERMS, OUR_EVAL_EXACT_TERMS = 2, 3, 21


class _NumpyDrawBlock(ResidualFlowBlock):
    """Our block, drawing the roulette's ``N`` from numpy's global generator like normflows."""

    def _draw_extra_terms(self) -> int:
        if self.dist != "geometric":
            raise ValueError(f"expected dist='geometric'; got {self.dist!r}")
        return int(np.random.geometric(self.geom_p)) - 1  # noqa: NPY002 (normflows' generator)


class _NumpyDrawWrapper(lnf.ResidualFlowBlock):
    _block_class = _NumpyDrawBlock


def build(
    arm: str, shape: tuple[int, ...], hidden: int, depth: int, device: str, matched: bool = True
) -> tuple[nf.NormalizingFlow, Callable[[], object]]:
    """``(model, after_step)`` for an arm; ``after_step`` is normflows' explicit update.

    ``matched``: our blocks draw ``N`` from numpy like normflows (time and memory arms).
    """
    torch.manual_seed(0)
    image = len(shape) == 3
    base = nf.distributions.DiagGaussian(shape, trainable=False)
    if arm.startswith("normflows"):
        reduce_memory = arm.endswith("mem-eff")
        flows = []
        for _ in range(depth):
            if image:
                c = shape[0]
                net = nf.nets.LipschitzCNN(
                    [c, hidden, hidden, c], [3, 1, 3], lipschitz_const=0.97, init_zeros=False
                )
            else:
                net = nf.nets.LipschitzMLP(
                    [shape[0], hidden, hidden, shape[0]], lipschitz_const=0.97, init_zeros=False
                )
            flows.append(
                nf.flows.Residual(
                    net,
                    reduce_memory=reduce_memory,
                    geom_p=0.5,
                    n_exact_terms=THEIR_EXACT_TERMS,
                    n_samples=1,
                )
            )
        model = nf.NormalizingFlow(base, flows).to(device)
        return model, lambda: nf.utils.update_lipschitz(model, 1)
    kwargs = {
        "coeff": 0.97,
        "n_power_iterations": 1,
        "probe": "gaussian",
        "n_exact_terms": OUR_EXACT_TERMS,
        "eval_n_exact_terms": OUR_EVAL_EXACT_TERMS,
        "geom_p": 0.5,
        "neumann_grad": arm != "ours-backprop",
        "memory_efficient": arm == "ours-mem-eff",
    }
    if not image:
        kwargs["num_layers"] = 3
    arg = shape if image else shape[0]
    wrapper = _NumpyDrawWrapper if matched else lnf.ResidualFlowBlock
    flows = [wrapper(arg, hidden, **kwargs) for _ in range(depth)]
    return nf.NormalizingFlow(base, flows).to(device), lambda: None


def train_step(
    model: nf.NormalizingFlow,
    optimizer: torch.optim.Optimizer,
    after_step: Callable[[], object],
    x: torch.Tensor,
) -> None:
    loss = -model.log_prob(x).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    after_step()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_arms(arms: Sequence[str], args: argparse.Namespace, x: torch.Tensor) -> dict[str, float]:
    models = {arm: build(arm, args.shape, args.hidden, args.depth, args.device) for arm in arms}
    optimizers = {arm: torch.optim.Adam(m.parameters(), lr=1e-4) for arm, (m, _) in models.items()}
    times = {arm: [] for arm in arms}
    for step in range(args.steps + 2):
        for arm in arms if step % 2 == 0 else reversed(arms):
            model, after = models[arm]
            torch.manual_seed(step)
            np.random.seed(step)  # noqa: NPY002 (normflows draws from numpy's global RNG)
            _sync(args.device)
            start = time.perf_counter()
            train_step(model, optimizers[arm], after, x)
            _sync(args.device)
            if step >= 2:  # two warm-up steps
                times[arm].append(time.perf_counter() - start)
    return {arm: statistics.median(t) for arm, t in times.items()}


def _cpu_peak_allocated(step: Callable[[], object]) -> float:
    """Bytes: peak of PyTorch's CPU allocator during ``step()`` above its start."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as profiler:
        step()
    handle, path = tempfile.mkstemp(suffix=".json")
    os.close(handle)
    try:
        profiler.export_chrome_trace(path)
        with open(path) as file:
            events = json.load(file)["traceEvents"]
    finally:
        os.unlink(path)
    totals = [
        e["args"]["Total Allocated"]
        for e in events
        if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0
    ]
    return float(max(totals, default=0))


def peak_memory_mib(arm: str, args: argparse.Namespace, x: torch.Tensor) -> float:
    """Mean over ``args.memory_steps`` train steps (after one warm-up) of the step's peak."""
    model, after = build(arm, args.shape, args.hidden, args.depth, args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    peaks = []
    for step in range(args.memory_steps + 1):
        torch.manual_seed(step)
        np.random.seed(step)  # noqa: NPY002 (normflows draws from numpy's global RNG)
        if step == 0:  # warm-up: Adam's state and the spectral-norm buffers exist afterwards
            train_step(model, optimizer, after, x)
            continue
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            train_step(model, optimizer, after, x)
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - base)
        else:
            peaks.append(_cpu_peak_allocated(lambda: train_step(model, optimizer, after, x)))
    return statistics.fmean(peaks) / 2**20


@torch.no_grad()
def _copy_weights(ours: nf.NormalizingFlow, theirs: nf.NormalizingFlow) -> None:
    """Copy our raw weights, biases and LipSwish betas into normflows' nets; converge norms."""
    for block, flow in zip(ours.flows, theirs.flows):
        our_params = [p for p in block.block.net.parameters()]
        their_params = [p for p in flow.iresblock.nnet.parameters()]
        for a, b in zip(our_params, their_params):
            b.copy_(a.reshape(b.shape))
    update_lipschitz(ours)
    theirs(torch.zeros(1, *ours.q0.shape, device=next(theirs.parameters()).device))
    nf.utils.update_lipschitz(theirs, 500)


@torch.no_grad()
def logdet_variance(
    args: argparse.Namespace, x: torch.Tensor, train: bool, low_variance: bool = False
) -> tuple[float, ...]:
    ours, _ = build("ours-mem-eff", args.shape, args.hidden, args.depth, args.device, False)
    theirs, _ = build("normflows-mem-eff", args.shape, args.hidden, args.depth, args.device)
    _copy_weights(ours, theirs)
    ours.train(train)
    theirs.train(train)
    for layer in spectral_layers(ours):
        layer.auto_update = False
    draws = {"ours": [], "normflows": []}
    context = low_variance_estimation(ours, 20, 8) if low_variance else contextlib.nullcontext()
    with context:
        for draw in range(args.draws):
            _one_draw(ours, theirs, x, draw, draws)
    ours_d, theirs_d = torch.stack(draws["ours"]), torch.stack(draws["normflows"])
    se = ((ours_d.var(0) + theirs_d.var(0)) / args.draws).sqrt()
    gap = float(((ours_d.mean(0) - theirs_d.mean(0)).abs() / se).max())
    return float(ours_d.var(0).mean()), float(theirs_d.var(0).mean()), gap


def _one_draw(
    ours: nf.NormalizingFlow,
    theirs: nf.NormalizingFlow,
    x: torch.Tensor,
    draw: int,
    draws: dict[str, list[torch.Tensor]],
) -> None:
    """One log-det estimate of the whole flow per model, same seeds for both."""
    torch.manual_seed(1000 + draw)
    np.random.seed(1000 + draw)  # noqa: NPY002
    with torch.enable_grad():  # normflows' estimator needs autograd
        for name, model in (("ours", ours), ("normflows", theirs)):
            z = x.clone()
            log_det = torch.zeros(x.shape[0], device=x.device)
            for flow in reversed(model.flows):
                z, ld = flow.inverse(z)
                log_det = log_det + ld.detach()
                z = z.detach()
            draws[name].append(log_det.cpu())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[4, 8, 8])
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument(
        "--memory-batch", type=int, default=512, help="batch of the memory measurement"
    )
    parser.add_argument("--memory-steps", type=int, default=8, help="steps averaged")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.draws, args.depth, args.memory_steps = 3, 10, 2, 2
    args.shape = tuple(args.shape)
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, *args.shape, generator=torch.Generator().manual_seed(0))
    x = x.to(args.device)

    print(f"# shape {args.shape}, hidden {args.hidden}, {args.depth} blocks, batch {args.batch}, ")
    print(f"# {args.steps} timed steps (median), device {args.device}, torch {torch.__version__}")
    print(
        f"# roulette: geometric p=0.5, normflows n_exact_terms={THEIR_EXACT_TERMS} = ours "
        f"{OUR_EXACT_TERMS}, same N per block and step; memory: mean of {args.memory_steps} steps"
    )
    arms = [
        "ours-backprop",
        "normflows-backprop",
        "ours-neumann",
        "ours-mem-eff",
        "normflows-mem-eff",
    ]
    times = time_arms(arms, args, x)
    x_memory = torch.randn(
        args.memory_batch, *args.shape, generator=torch.Generator().manual_seed(1)
    ).to(args.device)
    memory = {arm: peak_memory_mib(arm, args, x_memory) for arm in arms}
    print(f"\n| arm | step time (ms) | peak memory (MiB, batch {args.memory_batch}) |")
    print("|---|---|---|")
    for arm in arms:
        print(f"| {arm} | {1000 * times[arm]:.1f} | {memory[arm]:.1f} |")
    print("\n| ratio | time | memory |")
    print("|---|---|---|")
    for ours, theirs in (
        ("ours-backprop", "normflows-backprop"),
        ("ours-mem-eff", "normflows-mem-eff"),
        ("ours-mem-eff", "ours-neumann"),
        ("ours-mem-eff", "ours-backprop"),
    ):
        print(
            f"| {ours} / {theirs} | {times[ours] / times[theirs]:.2f}x | "
            f"{memory[ours] / max(memory[theirs], 1e-9):.2f}x |"
        )
    print(
        "\n| log-det estimate, same weights (normflows in the same train/eval mode) | var ours "
        "| var normflows | ratio | max |mean gap| / SE |"
    )
    print("|---|---|---|---|---|")
    modes = (
        ("train (3 exact terms + roulette)", True, False),
        ("eval (21 exact terms + roulette)", False, False),
        ("eval; ours in low_variance_estimation(20 terms, 8 probes)", False, True),
    )
    for mode, train, low in modes:
        ours_var, their_var, gap = logdet_variance(args, x, train, low)
        print(
            f"| {mode} | {ours_var:.3g} | {their_var:.3g} | "
            f"{ours_var / max(their_var, 1e-300):.2f}x | {gap:.3g} |"
        )


if __name__ == "__main__":
    main()
