"""Training loop: learning, determinism, checkpoint resume, divergence handling, evaluation."""

from __future__ import annotations

import math

import pytest
import torch

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
def digits():
    data = load_digits_dataset()
    return data.train[:192], data.test[:64], LogitPreprocessing(data.levels)


def _flow(seed: int = 0):
    torch.manual_seed(seed)
    return build_flow(make_level_factory("glow", "tiny", hidden=8, steps=1)(0, SHAPE), SHAPE)


def _config(epochs: int, **kwargs) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=64, progress=False, **kwargs)


def test_training_learns_and_is_deterministic(digits):
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


def test_resume_from_checkpoint_equals_uninterrupted(digits, tmp_path):
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


def test_divergence_is_marked_not_raised(digits):
    train, test, pre = digits
    flow = _flow()
    with torch.no_grad():
        next(p for n, p in flow.named_parameters() if n.endswith("weight_v")).fill_(float("nan"))
    result = train_flow(flow, train, pre, _config(3), test_data=test)
    assert result.diverged and result.epochs_done == 0
    assert "epoch 1, step 1" in result.diverged_reason
    assert math.isnan(evaluate_bpd(flow, test, pre))


def test_evaluate_bpd_of_identity_flow_matches_formula(digits):
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


def test_l2_scale_penalty_shrinks_scales(digits):
    train, _, pre = digits
    from lcma_ext.models import scale_parameters

    norms = []
    for l2 in (0.0, 1.0):
        flow = _flow()
        train_flow(flow, train, pre, _config(2, l2_scale=l2))
        norms.append(sum(float(p.detach().square().sum()) for p in scale_parameters(flow)))
    assert norms[1] < norms[0]


def test_train_config_validation():
    with pytest.raises(ValueError, match="expected a valid batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="expected a valid lr"):
        TrainConfig(lr=-1.0)
