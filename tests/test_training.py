"""Training loop: learning, determinism, checkpoint resume, divergence handling, evaluation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from nflows.flows import Flow

from lcma_ext import transforms as T
from lcma_ext.data import LogitPreprocessing, bits_per_dim, load_digits_dataset
from lcma_ext.models import build_flow, make_level_factory
from lcma_ext.training import (
    EVAL_NOISE_SEED,
    TrainConfig,
    evaluate_bpd,
    load_checkpoint,
    train_flow,
)

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, LogitPreprocessing]:
    data = load_digits_dataset()
    return data.train[:192], data.test[:64], LogitPreprocessing(data.levels)


def _flow(seed: int = 0) -> Flow:
    torch.manual_seed(seed)
    return build_flow(make_level_factory("glow", "tiny", hidden=8, steps=1)(0, SHAPE), SHAPE)


def _config(epochs: int, **kwargs) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=64, progress=False, **kwargs)


def test_training_learns_and_is_deterministic(
    digits: tuple[torch.Tensor, torch.Tensor, LogitPreprocessing],
) -> None:
    train, test, pre = digits
    flow = _flow()
    before = evaluate_bpd(flow, test, pre)
    result = train_flow(flow, train, pre, _config(4), test_data=test)
    after = evaluate_bpd(flow, test, pre)
    assert result.epochs_done == 4 and not result.diverged
    assert len(result.train_bpd) == 4 and [e for e, _ in result.test_bpd] == [1, 2, 3, 4]
    assert after < before - 0.3
    assert result.test_bpd[-1][1] == pytest.approx(after)
    assert result.train_bpd[-1] < result.train_bpd[0]
    again = _flow()
    result_again = train_flow(again, train, pre, _config(4), test_data=test)
    assert result_again.train_bpd == result.train_bpd
    for p, q in zip(flow.parameters(), again.parameters()):
        assert torch.equal(p, q)


def test_resume_from_checkpoint_equals_uninterrupted(
    digits: tuple[torch.Tensor, torch.Tensor, LogitPreprocessing], tmp_path: Path
) -> None:
    train, test, pre = digits
    straight = _flow()
    reference = train_flow(straight, train, pre, _config(3), test_data=test)
    path = tmp_path / "run.pt"
    first = _flow()
    train_flow(first, train, pre, _config(1), test_data=test, checkpoint_path=path)
    assert load_checkpoint(path)["epoch"] == 1
    resumed_flow = _flow(seed=123)  # different init: everything must come from the checkpoint
    resumed = train_flow(resumed_flow, train, pre, _config(3), test_data=test, checkpoint_path=path)
    assert resumed.epochs_done == 3
    assert resumed.train_bpd == pytest.approx(reference.train_bpd, rel=1e-6)
    for p, q in zip(straight.parameters(), resumed_flow.parameters()):
        torch.testing.assert_close(p, q)
    # A finished checkpoint is not trained further.
    done = train_flow(_flow(), train, pre, _config(3), checkpoint_path=path)
    assert done.train_bpd == resumed.train_bpd
    with pytest.raises(ValueError, match="expected a checkpoint file"):
        load_checkpoint(tmp_path / "missing.pt")


def test_divergence_is_marked_not_raised(
    digits: tuple[torch.Tensor, torch.Tensor, LogitPreprocessing],
) -> None:
    train, test, pre = digits
    flow = _flow()
    with torch.no_grad():
        next(p for n, p in flow.named_parameters() if n.endswith("weight_v")).fill_(float("nan"))
    result = train_flow(flow, train, pre, _config(3), test_data=test)
    assert result.diverged and result.epochs_done == 0
    assert "epoch 1, step 1" in result.diverged_reason
    assert math.isnan(evaluate_bpd(flow, test, pre))


def test_evaluate_bpd_of_identity_flow_matches_formula(
    digits: tuple[torch.Tensor, torch.Tensor, LogitPreprocessing],
) -> None:
    _, test, pre = digits
    flow = build_flow(T.CompositeTransform([T.SqueezeTransform()]), SHAPE)  # no parameters
    bpd = evaluate_bpd(flow, test, pre, batch_size=25)
    generator = torch.Generator().manual_seed(EVAL_NOISE_SEED)
    y, logdet = pre(test, generator=generator, dtype=torch.float32)
    y, logdet = y.double(), logdet.double()
    log_prob = torch.distributions.Normal(0.0, 1.0).log_prob(y).flatten(1).sum(1)
    expected = bits_per_dim(log_prob, logdet, 64, pre.levels).mean()
    assert bpd == pytest.approx(float(expected), rel=1e-6)
    assert evaluate_bpd(flow, test, pre) == pytest.approx(bpd, rel=1e-12)  # fixed noise


def test_l2_scale_penalty_shrinks_scales(
    digits: tuple[torch.Tensor, torch.Tensor, LogitPreprocessing],
) -> None:
    train, _, pre = digits
    from lcma_ext.models import scale_parameters

    norms = []
    for l2 in (0.0, 1.0):
        flow = _flow()
        train_flow(flow, train, pre, _config(2, l2_scale=l2))
        norms.append(sum(float(p.detach().square().sum()) for p in scale_parameters(flow)))
    assert norms[1] < norms[0]


def test_train_config_validation() -> None:
    with pytest.raises(ValueError, match="expected a valid batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="expected a valid lr"):
        TrainConfig(lr=-1.0)


# ----------------------------------------------------------------------------------------------
# scale-out: iterable input, mixed precision, torch.compile, flips


def _multiscale(model: str, seed: int = 0) -> Flow:
    from lcma_ext.pipeline import build_multiscale_transform

    torch.manual_seed(seed)
    factory = make_level_factory(model, "tiny", hidden=8, steps=1)
    return build_flow(build_multiscale_transform(factory, SHAPE, 2, "channel"), SHAPE)


def test_dataloader_input_equals_the_same_batches_as_a_list(
    digits: tuple[torch.Tensor, torch.Tensor, LogitPreprocessing],
) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    train, test, pre = digits
    labels = torch.zeros(train.shape[0], dtype=torch.long)
    loader = DataLoader(TensorDataset(train, labels), batch_size=64, shuffle=False)
    batches = [train[i : i + 64] for i in range(0, train.shape[0], 64)]
    flows = [_flow(), _flow()]
    results = [train_flow(f, src, pre, _config(2)) for f, src in zip(flows, (loader, batches))]
    assert results[0].train_bpd == results[1].train_bpd
    for p, q in zip(*(f.parameters() for f in flows)):
        assert torch.equal(p, q)
    test_loader = DataLoader(TensorDataset(test, test[:, 0, 0, 0]), batch_size=25)
    assert evaluate_bpd(flows[0], test_loader, pre) == evaluate_bpd(flows[0], test, pre, 25)
    with pytest.raises(ValueError, match="expected integer image batches"):
        train_flow(_flow(), [train[:8].float()], pre, _config(1))
    with pytest.raises(ValueError, match=r"expected batches of integer images \(B, C, H, W\)"):
        train_flow(_flow(), [[]], pre, _config(1))


def test_flips_mirror_the_rows_the_generator_picks(
    digits: tuple[torch.Tensor, torch.Tensor, LogitPreprocessing],
) -> None:
    from lcma_ext.distributed import World
    from lcma_ext.training import _preprocess

    train, _, pre = digits
    batch = train[:64]
    flipped, _ = _preprocess(
        batch, pre, torch.Generator().manual_seed(5), torch.float64, World(), True
    )
    generator = torch.Generator().manual_seed(5)
    picks = torch.rand(64, generator=generator) < 0.5
    noise = torch.rand(batch.shape, generator=generator, dtype=torch.float64)
    expected = torch.where(picks.view(-1, 1, 1, 1), batch.flip(-1), batch)
    reference, _ = pre(expected, dtype=torch.float64, noise=noise)
    assert 16 < int(picks.sum()) < 48
    assert torch.equal(flipped, reference)


@pytest.mark.parametrize(
    ("model", "bound"),
    # measured (1 epoch of 256 digits, 200 test images): realnvp 6.0e-5 (bf16) and 5.0e-6
    # (fp16); glow 1.5e-2 (bf16) and 1.4e-3 (fp16) nats/dim at most
    [("realnvp", 1e-3), ("glow", 5e-2)],
)
def test_mixed_precision_log_likelihood_stays_near_fp32(
    model: str, bound: float, digits: tuple[torch.Tensor, torch.Tensor, LogitPreprocessing]
) -> None:
    from lcma_ext.training import _LogDensity

    train, test, pre = digits
    flow = _multiscale(model)
    train_flow(flow, train, pre, _config(1))
    flow.eval()
    y, _ = pre(test, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = _LogDensity(flow)(y)
        assert torch.equal(exact, flow.log_prob(y))
        for dtype in (torch.bfloat16, torch.float16):
            mixed = _LogDensity(flow, dtype)(y)
            assert mixed.dtype == torch.float32
            gap = float((mixed - exact).abs().max()) / y[0].numel()
            assert 0 < gap < bound, (dtype, gap)  # autocast is active, and the gap is bounded


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_keeps_float32_parameters(
    precision: str, digits: tuple[torch.Tensor, torch.Tensor, LogitPreprocessing]
) -> None:
    train, test, pre = digits
    flow = _multiscale("glow")
    before = evaluate_bpd(flow, test, pre)
    result = train_flow(flow, train, pre, _config(2, precision=precision), test_data=test)
    assert not result.diverged
    assert all(p.dtype == torch.float32 for p in flow.parameters())  # ActNorm init ran in fp32
    assert result.test_bpd[-1][1] < before - 0.1
    with pytest.raises(ValueError, match="expected a float32 flow for precision 'bf16'"):
        train_flow(_multiscale("glow").double(), train, pre, _config(1, precision="bf16"))
    with pytest.raises(ValueError, match="expected precision in"):
        TrainConfig(precision="fp8")


@pytest.mark.parametrize("model", ["realnvp", "glow", "iresnet"])
def test_training_mode_log_prob_has_no_graph_breaks(
    model: str, digits: tuple[torch.Tensor, torch.Tensor, LogitPreprocessing]
) -> None:
    train, _, pre = digits
    flow = _multiscale(model)
    y, _ = pre(train[:32], generator=torch.Generator().manual_seed(0))
    flow.train()
    flow.log_prob(y)  # ActNorm's data-dependent initialisation, as train_flow runs it first
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(flow.log_prob)(y)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_training_equals_eager(
    digits: tuple[torch.Tensor, torch.Tensor, LogitPreprocessing],
) -> None:
    """``compile=True`` (inductor on the CPU) against eager: about 60 s of compilation here."""
    train, test, pre = digits
    flows = [_multiscale("realnvp"), _multiscale("realnvp")]
    results = [
        train_flow(f, train[:128], pre, _config(1, compile=c), test_data=test)
        for f, c in zip(flows, (False, True))
    ]
    assert results[1].train_bpd == pytest.approx(results[0].train_bpd, abs=1e-5)
    for p, q in zip(*(f.parameters() for f in flows)):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model", ["iresnet", "resflow"])
def test_compiled_residual_training_step_equals_eager(model: str) -> None:
    """One training step through ``torch.compile`` (inductor) against eager, in float64.

    i-ResNet's series is traced through ``torch.func.vjp``; the Residual Flow's roulette and
    Neumann gradient run eagerly inside the compiled model. ``fallback_random`` makes inductor
    draw the probes and the roulette from torch's generator, as eager does. Loss, every
    gradient and the power-iteration vectors must agree.
    """
    import copy

    import torch._inductor.config as inductor_config

    torch.manual_seed(0)
    flows = [_multiscale(model).double().train()]
    x = torch.rand(16, *SHAPE, dtype=torch.float64)
    flows[0].log_prob(x)  # ActNorm's data-dependent initialisation, as train_flow runs it first
    flows.append(copy.deepcopy(flows[0]))
    steps = []
    for flow, log_prob in zip(flows, (flows[0].log_prob, torch.compile(flows[1].log_prob))):
        torch.manual_seed(1)
        with inductor_config.patch(fallback_random=True):
            value = log_prob(x)
        (-value.mean()).backward()
        steps.append((value.detach(), [p.grad for p in flow.parameters()], list(flow.buffers())))
    torch._dynamo.reset()
    (eager, eager_grads, eager_buffers), (compiled, grads, buffers) = steps
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-10)
    assert max(g.abs().max() for g in eager_grads) > 1e-3  # the comparison has something to see
    for p, q in zip(eager_grads, grads):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-10)
    for p, q in zip(eager_buffers, buffers):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(5, 3), (5, 3, 4, 2)])
def test_actnorm_compiled_branch_equals_eager(shape: tuple[int, ...]) -> None:
    """The branch ``ActNorm.forward`` takes under ``torch.compile`` against nflows' forward."""
    torch.manual_seed(0)
    layer = T.ActNorm(3)
    x = torch.randn(*shape, dtype=torch.float64)
    layer.double().train()
    layer(x)  # data-dependent initialisation, eager
    with torch.no_grad():
        layer.log_scale.add_(torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64))
    layer.eval()
    eager = layer(x)
    compiled = torch.compile(layer, backend="eager")(x)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled[0], eager[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(compiled[1], eager[1], rtol=0, atol=1e-12)
    spatial = shape[2] * shape[3] if len(shape) == 4 else 1
    expected = spatial * layer.log_scale.sum() * torch.ones(shape[0], dtype=torch.float64)
    torch.testing.assert_close(compiled[1], expected, rtol=0, atol=1e-12)
