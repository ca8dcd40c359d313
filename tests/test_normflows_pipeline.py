"""Algorithm 1 for normflows: equivalence with the nflows path, brute-force exactness, errors."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import normflows as nf
import pytest
import scipy.linalg
import torch
from nflows.distributions import StandardNormal
from nflows.flows import Flow
from torch import nn

from lcma_ext import build_multiscale_transform, build_nms_transform
from lcma_ext import contributions as core
from lcma_ext import normflows as lnf
from lcma_ext import transforms as T
from lcma_ext.multiscale import build_levels
from lcma_ext.splits import PLACEMENTS, LCMASplit, RandomSplit

from brute_force import jacobian, slogdet

SHAPE = (1, 8, 8)
LEVELS = 3
TOL = 1e-10


pytestmark = pytest.mark.usefixtures("float64")


def _data(n: int = 24, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    ramp = torch.linspace(-1, 1, shape[-1]).view(1, 1, 1, -1)
    return torch.randn(n, *shape, generator=generator) * (0.3 + ramp.abs()) + ramp


# --- the same function in nflows and in normflows ------------------------------------------------


class _Conditioner(nn.Module):
    """One coupling network shared by both sides; output channels in normflows' layout."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, out_channels, 3, 1, 1)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x)


class _ExpCoupling(T.AffineCouplingTransform):
    """nflows coupling computing normflows' ``scale_map="exp"`` data-to-noise map.

    normflows: ``z2 -> (z2 - t) * exp(-s)`` with ``t = params[:, 0::2]``, ``s = params[:, 1::2]``;
    nflows computes ``z2 * scale + shift``, so ``scale = exp(-s)`` and ``shift = -t * exp(-s)``.
    """

    def _scale_and_shift(self, transform_params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = torch.exp(-transform_params[:, 1::2])
        return scale, -transform_params[:, 0::2] * scale


def _nflows_level(
    attribution: str, identity_permutation: bool
) -> Callable[[int, tuple[int, ...]], T.CompositeTransform]:
    def level(index: int, shape: tuple[int, ...]) -> T.CompositeTransform:
        c = 4 * shape[0]
        steps: list[nn.Module] = [T.SqueezeTransform()]
        for _ in range(2):
            actnorm = T.ActNorm(c)
            conv = T.OneByOneConvolution(c, identity_init=False, attribution=attribution)
            with torch.no_grad():
                actnorm.log_scale.normal_(0, 0.3)
                actnorm.shift.normal_(0, 0.3)
                actnorm.initialized.fill_(True)
                if identity_permutation:
                    conv.permutation._permutation.copy_(torch.arange(c))
            mask = torch.tensor([0] * (c // 2) + [1] * (c // 2))  # 1: transformed
            steps += [actnorm, conv, _ExpCoupling(mask, _Conditioner)]
        return T.CompositeTransform(steps)

    return level


def _to_normflows(level: T.CompositeTransform, permute: bool) -> list[nf.flows.Flow]:
    """The same level in normflows (noise-to-data order), with the same weights.

    nflows' 1x1 convolution permutes the channels and then multiplies by ``W = L U``. With
    ``permute`` that is normflows' ``Permute`` (its ``inverse`` gathers the same channels)
    followed by ``Invertible1x1Conv`` with ``W``; otherwise (for an identity permutation) the
    convolution alone, with the data-to-noise matrix read off the nflows transform.
    """
    flows: list[nf.flows.Flow] = []  # data to noise, reversed at the end
    for transform in level._transforms:
        if isinstance(transform, T.SqueezeTransform):
            flows.append(lnf.Squeeze())
        elif isinstance(transform, T.ActNorm):  # exp(l) x + b == (x - t) exp(-s)
            c = transform.log_scale.numel()
            actnorm = lnf.ActNorm((c, 1, 1))
            with torch.no_grad():
                actnorm.s.copy_(-transform.log_scale.view(1, c, 1, 1))
                actnorm.t.copy_(
                    -(transform.shift * torch.exp(-transform.log_scale)).view(1, c, 1, 1)
                )
                actnorm.data_dep_init_done.fill_(1.0)
            flows.append(actnorm)
        elif isinstance(transform, T.OneByOneConvolution):
            c = transform.features
            conv = lnf.Invertible1x1Conv(c, attribution=transform.attribution)
            if permute:
                shuffle = lnf.Permute(c)
                permutation = transform.permutation._permutation
                shuffle.inv_perm.copy_(permutation)
                shuffle.perm.copy_(torch.argsort(permutation))
                flows.append(shuffle)
                weight = transform.weight()
            else:
                weight = transform(torch.eye(c).view(c, c, 1, 1))[0][:, :, 0, 0].T
            with torch.no_grad():
                conv.W.copy_(weight)
            flows.append(conv)
        else:
            flows.append(
                lnf.AffineCouplingBlock(
                    transform.transform_net, scale=True, scale_map="exp", split_mode="channel"
                )
            )
    return flows[::-1]


def _standard_normal(shape: tuple[int, ...]) -> nf.distributions.DiagGaussian:
    return nf.distributions.DiagGaussian(shape, trainable=False)


@pytest.mark.parametrize("attribution", ["svd-energy", "svd-index"])
@pytest.mark.parametrize("conv", ["permute-then-conv", "identity-permutation"])
def test_same_maps_splits_and_likelihood_as_the_nflows_path(conv: str, attribution: str) -> None:
    torch.manual_seed(0)
    permute = conv == "permute-then-conv"
    factory = _nflows_level(attribution, identity_permutation=not permute)
    nms_nflows = build_nms_transform(factory, SHAPE, LEVELS)
    levels_nflows = build_levels(factory, SHAPE, LEVELS)
    nms_lists = [_to_normflows(level, permute) for level in nms_nflows._transforms]
    level_lists = [_to_normflows(level, permute) for level in levels_nflows]
    x = _data()

    nms = lnf.build_nms_model(lambda index, shape: nms_lists[index], SHAPE, LEVELS)
    with torch.no_grad():  # sanity: the two NMS flows are the same function
        z_nflows, log_det_nflows = nms_nflows(x)
        z_normflows = nms.inverse(x)
        log_det_normflows = nms.log_prob(x) - nms.q0.log_prob(z_normflows)
    torch.testing.assert_close(z_normflows, z_nflows, rtol=0, atol=TOL)
    torch.testing.assert_close(log_det_normflows, log_det_nflows, rtol=0, atol=TOL)

    maps_nflows = core.estimate_contributions(nms_nflows, x, levels_nflows, SHAPE, progress=False)
    maps = lnf.estimate_model_contributions(
        nms, x, lambda index, shape: level_lists[index], SHAPE, progress=False
    )
    for got, expected in zip(maps.data_maps, maps_nflows.data_maps, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=TOL)
    for got, expected in zip(maps.level_positions, maps_nflows.level_positions, strict=True):
        assert torch.equal(got, expected)
    for got, expected in zip(maps.maps, maps_nflows.maps, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=TOL)
    splits = maps.splits()
    for got, expected in zip(splits, maps_nflows.splits(), strict=True):
        assert torch.equal(got.index, expected.index)
    assert maps.diagnostics[0]["differs_from_channel"] > 0  # LCMA is not the static split here

    flow_nflows = build_multiscale_transform(None, SHAPE, LEVELS, "lcma", maps_nflows)
    model_nflows = Flow(flow_nflows, StandardNormal([math.prod(SHAPE)]))
    model = lnf.build_multiscale_model(None, SHAPE, LEVELS, "lcma", maps, base=_standard_normal)
    with torch.no_grad():
        torch.testing.assert_close(model.log_prob(x), model_nflows.log_prob(x), rtol=0, atol=TOL)
        # the per-dimension log-dets of the whole model: the core's, in normflows' latent order
        outputs, log_det, diag = flow_nflows.forward_with_diag(x)
        z, log_det_normflows, diags = model.inverse_and_log_det_with_diag(x)
    flat = lambda tensors: torch.cat([t.flatten(1) for t in reversed(tensors)], 1)  # noqa: E731
    torch.testing.assert_close(flat(z), outputs, rtol=0, atol=TOL)
    torch.testing.assert_close(log_det_normflows, log_det, rtol=0, atol=TOL)
    torch.testing.assert_close(flat(diags), diag, rtol=0, atol=TOL)


# --- exactness of the normflows LCMA model --------------------------------------------------------


def _glow_level(index: int, shape: tuple[int, ...]) -> list[nf.flows.Flow]:
    """normflows' Glow example: Glow steps, then the squeeze (noise-to-data order)."""
    c = 4 * shape[0]
    return [nf.flows.GlowBlock(c, 8, split_mode="channel", init_zeros=False) for _ in range(2)] + [
        nf.flows.Squeeze()
    ]


def _squeeze_placement_level(index: int, shape: tuple[int, ...]) -> list[nf.flows.Flow]:
    """``placement="squeeze"``: the split squeezes, so the level does not."""
    c = shape[0]
    steps = [nf.flows.GlowBlock(c, 8, init_zeros=False)] if c >= 2 else []
    return [*steps, lnf.ActNorm((c, 1, 1))]


def _hand_set_gaussian(shape: tuple[int, ...]) -> nf.distributions.DiagGaussian:
    generator = torch.Generator().manual_seed(math.prod(shape))
    gaussian = nf.distributions.DiagGaussian(shape, trainable=False)
    gaussian.loc.copy_(0.3 * torch.randn(1, *shape, generator=generator))
    gaussian.log_scale.copy_(0.2 * torch.randn(1, *shape, generator=generator))
    return gaussian


def _gaussian_log_density(
    z: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor
) -> torch.Tensor:
    """log N(z; loc, exp(log_scale)^2), summed per example, written out."""
    standardized = (z - loc) * torch.exp(-log_scale)
    return (-0.5 * math.log(2 * math.pi) - log_scale - 0.5 * standardized**2).flatten(1).sum(1)


def _brute_force_log_likelihood(model: nf.MultiscaleFlow, x: torch.Tensor) -> torch.Tensor:
    """Change of variables: every latent, Jacobian of the whole data-to-noise map, slogdet."""

    def latents(batch: torch.Tensor) -> torch.Tensor:
        return torch.cat([z.flatten(1) for z in model.inverse_and_log_det(batch)[0]], 1)

    out = []
    for row in x:
        sign, logabsdet = slogdet(jacobian(latents, row))
        assert sign != 0
        with torch.no_grad():
            z, _ = model.inverse_and_log_det(row.unsqueeze(0))
        base = sum(_gaussian_log_density(zi, q0.loc, q0.log_scale) for zi, q0 in zip(z, model.q0))
        out.append(base[0] + logabsdet)
    return torch.stack(out)


def _check_exact(model: lnf.MultiscaleFlow, x: torch.Tensor, round_trip_tol: float) -> None:
    with torch.no_grad():
        log_prob = model.log_prob(x)
    torch.testing.assert_close(log_prob, _brute_force_log_likelihood(model, x), rtol=0, atol=TOL)
    with torch.no_grad():
        z, log_det = model.inverse_and_log_det(x)
        x_back, log_det_back = model.forward_and_log_det(z)
        samples, sample_log_prob = model.sample(4)
        resampled = model.log_prob(samples)
    tol = {"rtol": 0, "atol": round_trip_tol}
    torch.testing.assert_close(x_back, x, **tol)
    torch.testing.assert_close(log_det_back, -log_det, **tol)
    assert samples.shape == (4, *x.shape[1:])
    torch.testing.assert_close(resampled, sample_log_prob, **tol)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_lcma_model_log_likelihood_equals_brute_force(placement: str) -> None:
    torch.manual_seed(0)
    level = _glow_level if placement == "post_squeeze" else _squeeze_placement_level
    x = _data()
    nms = lnf.build_nms_model(level, SHAPE, LEVELS, placement=placement)
    optimizer = torch.optim.Adam(nms.parameters(), lr=1e-3)
    for _ in range(2):  # it trains as any normflows model
        loss = nms.forward_kld(x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    maps = lnf.estimate_model_contributions(nms, x, level, progress=False)  # the NMS placement
    assert maps.input_shape == SHAPE and maps.num_levels == LEVELS
    model = lnf.build_multiscale_model(
        level, SHAPE, LEVELS, "lcma", maps, placement=placement, base=_hand_set_gaussian
    )
    assert isinstance(model, nf.MultiscaleFlow) and not model.class_cond
    assert all(isinstance(merge.split, LCMASplit) for merge in model.merges)
    model.log_prob(x)  # ActNorm's data-dependent initialization of the new model
    _check_exact(model, x[:3], round_trip_tol=1e-9)


def test_whole_model_log_dets_sum_to_the_brute_force_log_det() -> None:
    torch.manual_seed(1)
    model = lnf.build_multiscale_model(_glow_level, SHAPE, LEVELS, "checkerboard")
    x = _data(3)
    model.log_prob(x)
    with torch.no_grad():
        z, log_det, diags = model.inverse_and_log_det_with_diag(x)
        expected_z, expected_log_det = model.inverse_and_log_det(x)
    for got, expected, diag in zip(z, expected_z, diags, strict=True):
        assert torch.equal(got, expected) and diag.shape == got.shape
    assert torch.equal(log_det, expected_log_det)
    total = sum(diag.flatten(1).sum(1) for diag in diags)

    def latents(batch: torch.Tensor) -> torch.Tensor:
        return torch.cat([zi.flatten(1) for zi in model.inverse_and_log_det(batch)[0]], 1)

    for b in range(len(x)):
        _, reference = slogdet(jacobian(latents, x[b]))
        assert abs(float(total[b]) - reference) < TOL
        assert abs(float(log_det[b]) - reference) < TOL


@pytest.mark.parametrize("merge", ["normflows-channel", "normflows-checkerboard", "lcma"])
def test_whole_model_diag_follows_each_dimension_through_the_merges(merge: str) -> None:
    """Levels of ActNorm, Permute and Squeeze: J is a permutation times a diagonal, so each
    latent's contribution is log|J| at the one non-zero entry of its row."""
    torch.manual_seed(2)
    shape = (1, 4, 4)
    # a per-element ActNorm: the map varies over space, so halves cannot be confused
    data_side = [nf.flows.Permute(4), nf.flows.ActNorm((4, 2, 2)), nf.flows.Squeeze()]
    if merge == "normflows-checkerboard":  # halves of shape (4, 2, 1)
        merges, deep = [nf.flows.Merge("checkerboard")], [nf.flows.ActNorm((4, 1, 1))]
        q0 = [nf.distributions.DiagGaussian((4, 2, 1))] * 2
    else:  # halves of shape (2, 2, 2); the deep level squeezes to (8, 1, 1)
        split = nf.flows.Merge("channel") if merge == "normflows-channel" else None
        merges = [split or lnf.LCMAMerge(torch.randn(4, 2, 2))]
        deep = [nf.flows.Permute(8), nf.flows.ActNorm((8, 1, 1)), nf.flows.Squeeze()]
        q0 = [nf.distributions.DiagGaussian((8, 1, 1)), nf.distributions.DiagGaussian((2, 2, 2))]
    model = nf.MultiscaleFlow(q0, [deep, data_side], merges, class_cond=False)
    x = _data(2, shape)
    model.inverse_and_log_det(x)  # ActNorm initialization
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nf.flows.ActNorm):
                module.s.normal_()
        _, log_det, diags = lnf.inverse_and_log_det_with_diag(model, x)

    def latents(batch: torch.Tensor) -> torch.Tensor:
        return torch.cat([zi.flatten(1) for zi in model.inverse_and_log_det(batch)[0]], 1)

    flat_diag = torch.cat([d.flatten(1) for d in diags], 1)
    for b in range(len(x)):
        jac = jacobian(latents, x[b])
        assert ((jac != 0).sum(1) == 1).all()  # one source dimension per latent
        torch.testing.assert_close(flat_diag[b], torch.log(jac.abs().amax(1)), rtol=0, atol=TOL)
    torch.testing.assert_close(flat_diag.sum(1), log_det, rtol=0, atol=TOL)


def test_residual_blocks_through_the_pipeline() -> None:
    """normflows residual wrappers (exact mode) in every level: NMS, contributions, LCMA model."""
    shape = (1, 4, 4)

    def level(index: int, level_shape: tuple[int, ...]) -> list[nf.flows.Flow]:
        c, h, w = 4 * level_shape[0], level_shape[1] // 2, level_shape[2] // 2
        block = lnf.ResidualFlowBlock if index == 0 else lnf.InvertibleResNetBlock
        return [  # data to noise: squeeze, residual block, ActNorm
            lnf.ActNorm((c, 1, 1)),
            block((c, h, w), 8, exact=True, atol=1e-12, rtol=1e-12),
            nf.flows.Squeeze(),
        ]

    torch.manual_seed(3)
    x = _data(16, shape)
    nms = lnf.build_nms_model(level, shape, 2)
    loss = nms.forward_kld(x)
    loss.backward()  # trains through the exact log-det
    maps = lnf.estimate_model_contributions(nms, x, level, shape, progress=False)
    # brute force: after level 0 (squeeze, block, ActNorm) dimension d's contribution is the
    # diagonal of log(J_block) at its squeezed position, plus ActNorm's -s; averaged over x
    nms.eval()  # in training mode every call would update the spectral-norm estimates
    squeeze, block, actnorm = nms.level_flows()[0][::-1]
    with torch.no_grad():
        squeezed = squeeze.inverse(x)[0]
    diagonals = []
    for row in squeezed:
        jac = jacobian(lambda batch: block.inverse(batch)[0], row)
        diagonals.append(torch.from_numpy(scipy.linalg.logm(jac.numpy()).real.diagonal().copy()))
    per_position = torch.stack(diagonals).mean(0).view(4, 2, 2) - actnorm.s.detach()[0]
    position = squeeze.inverse(torch.arange(16).view(1, *shape))[0][0]  # data index per position
    expected = torch.zeros(16).index_copy_(0, position.reshape(-1), per_position.reshape(-1))
    torch.testing.assert_close(maps.data_maps[0], expected.view(shape), rtol=0, atol=TOL)
    model = lnf.build_multiscale_model(level, shape, 2, "lcma", maps, base=_hand_set_gaussian)
    model.log_prob(x)
    model.eval()  # no spectral-norm updates between the calls compared
    _check_exact(model, x[:2], round_trip_tol=1e-9)


def test_plain_normalizing_flow_gets_its_levels_from_the_factory(tmp_path: Path) -> None:
    torch.manual_seed(4)
    nms = lnf.build_nms_model(_glow_level, SHAPE, LEVELS)
    x = _data()
    nms.log_prob(x)
    maps = lnf.estimate_model_contributions(nms, x, _glow_level, progress=False)
    plain = nf.NormalizingFlow(nms.q0, list(nms.flows))
    plain_maps = lnf.estimate_model_contributions(plain, x, _glow_level, SHAPE, progress=False)
    for got, expected in zip(plain_maps.data_maps, maps.data_maps, strict=True):
        assert torch.equal(got, expected)
    assert nms.training and all(module.training for module in nms.modules())  # mode restored
    nms.eval()
    lnf.estimate_model_contributions(nms, x, _glow_level, progress=False)
    assert not any(module.training for module in nms.modules())
    maps.save(tmp_path / "maps.pt")  # loaded maps have no levels: new ones from the factory
    loaded = core.ContributionMaps.load(tmp_path / "maps.pt")
    model = lnf.build_multiscale_model(_glow_level, SHAPE, LEVELS, "lcma", loaded)
    for merge, split in zip(reversed(model.merges), maps.splits(), strict=True):
        assert torch.equal(merge.split.index, split.index)


def test_split_per_point_levels_reuse_and_remap() -> None:
    torch.manual_seed(5)

    def level(
        index: int, shape: tuple[int, ...]
    ) -> list[nf.flows.Flow]:  # a random channel shuffle: new levels rearrange differently
        return [*_glow_level(index, shape)[:1], nf.flows.Permute(4 * shape[0]), nf.flows.Squeeze()]

    x = _data()
    nms = lnf.build_nms_model(level, SHAPE, LEVELS)
    maps = lnf.estimate_model_contributions(nms, x, level, progress=False)
    # no factory: copies of the maps' in-memory levels (a factory would build new ones)
    model = lnf.build_multiscale_model(None, SHAPE, LEVELS, ["lcma", "random"], maps)
    assert isinstance(model.merges[1].split, LCMASplit)  # split point 0 is the data-side one
    assert isinstance(model.merges[0].split, RandomSplit)
    for got, stored in zip(reversed(model.flows), maps.levels, strict=True):  # deep copies
        assert all(a is not b for a, b in zip(got, stored.flows))
        for a, b in zip(got, stored.flows):
            assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(),
                                                          b.state_dict().values()))  # fmt: skip
    fresh = [level(i, s) for i, s in enumerate([(1, 8, 8), (2, 4, 4), (4, 2, 2)])]
    with pytest.raises(RuntimeError, match="rearrange dimensions"):
        lnf.build_multiscale_model(None, SHAPE, LEVELS, "lcma", maps, levels=fresh)
    remapped = lnf.build_multiscale_model(
        None, SHAPE, LEVELS, "lcma", maps, levels=fresh, remap=True
    )
    assert all(a is b for a, b in zip(remapped.flows[-1], fresh[0]))  # used as they are
    tracked = maps.track([lnf.NormflowsLevel(f) for f in fresh], check=False)
    for merge, split in zip(reversed(remapped.merges), tracked.splits, strict=True):
        assert torch.equal(merge.split.index, split.index)


# --- clear errors ---------------------------------------------------------------------------------


def test_errors_name_the_class_and_what_to_do() -> None:
    torch.manual_seed(6)
    x = _data(8)
    nms = lnf.build_nms_model(_glow_level, SHAPE, LEVELS)
    nms.log_prob(x)
    maps = lnf.estimate_model_contributions(nms, x, _glow_level, progress=False)
    model = lnf.build_multiscale_model(_glow_level, SHAPE, LEVELS, "lcma", maps)

    # not multi-scale / not an NMS model
    with pytest.raises(TypeError, match=r"expected a normflows MultiscaleFlow; got .*NMSFlow"):
        lnf.inverse_and_log_det_with_diag(nms, x)
    with pytest.raises(TypeError, match="got a MultiscaleFlow"):
        lnf.estimate_model_contributions(model, x, _glow_level, SHAPE, progress=False)
    with pytest.raises(TypeError, match=r"NormalizingFlow .*got torch\.nn.*Linear"):
        lnf.estimate_model_contributions(nn.Linear(2, 2), x, _glow_level, SHAPE, progress=False)

    # shapes that do not match the maps
    with pytest.raises(ValueError, match=r"expected input_shape \(1, 8, 8\) \(from the maps\)"):
        lnf.build_multiscale_model(_glow_level, (1, 16, 16), LEVELS, "lcma", maps)
    with pytest.raises(ValueError, match="expected num_levels 3"):
        lnf.build_multiscale_model(_glow_level, SHAPE, 2, "lcma", maps)
    no_squeeze = [_glow_level(0, (1, 8, 8)), _glow_level(1, (2, 4, 4))[:-1], []]
    no_squeeze[2] = _glow_level(2, (8, 2, 2))
    with pytest.raises(RuntimeError, match="expected level 1 to rearrange"):
        lnf.build_multiscale_model(None, SHAPE, LEVELS, "lcma", maps, levels=no_squeeze)
    with pytest.raises(ValueError, match=r"expected a contribution map of shape \(4, 4, 4\)"):
        lnf.build_multiscale_model(_glow_level, SHAPE, LEVELS, "lcma", [torch.zeros(2, 4, 4)] * 2)
    with pytest.raises(ValueError, match=r"expected input_shape \(1, 8, 8\) \(the NMS model's\)"):
        lnf.estimate_model_contributions(nms, x, _glow_level, (1, 4, 4), progress=False)
    with pytest.raises(ValueError, match=r"expected placement 'post_squeeze' \(the NMS model's\)"):
        lnf.estimate_model_contributions(nms, x, _glow_level, placement="squeeze", progress=False)

    # a normflows flow without a per-dimension adapter
    def unsupported(index: int, shape: tuple[int, ...]) -> list[nf.flows.Flow]:
        return [nf.flows.AffineConstFlow((4 * shape[0], 1, 1)), nf.flows.Squeeze()]

    message = r"normflows\.flows\.affine\.coupling\.AffineConstFlow.*subclass it and add"
    with pytest.raises(TypeError, match=message):
        lnf.build_nms_model(unsupported, SHAPE, LEVELS)
    with pytest.raises(TypeError, match=message):
        lnf.build_multiscale_model(unsupported, SHAPE, LEVELS)
    with pytest.raises(TypeError, match="to return a list of normflows flows; got str"):
        lnf.build_nms_model(lambda index, shape: "glow", SHAPE, LEVELS)
    plain = nf.MultiscaleFlow(
        list(model.q0), [list(f) for f in model.flows], list(model.merges), class_cond=False
    )
    plain.transform = nf.transforms.Logit()
    with pytest.raises(TypeError, match=r"MultiscaleFlow\.transform; got .*Logit"):
        lnf.inverse_and_log_det_with_diag(plain, x)
    plain.transform = None
    plain.merges[0] = nf.flows.Squeeze()
    with pytest.raises(TypeError, match=r"expected a normflows Merge .*merges\[0\]; got .*Squeeze"):
        lnf.inverse_and_log_det_with_diag(plain, x)

    # NMS level boundaries
    with pytest.raises(ValueError, match="expected positive level sizes summing to 9"):
        lnf.NMSFlow(nms.q0, list(nms.flows), level_sizes=[3, 3])
    plain_nms = nf.NormalizingFlow(nms.q0, list(nms.flows))
    with pytest.raises(ValueError, match="expected an NMS model from build_nms_model"):
        lnf.estimate_model_contributions(plain_nms, x, level_lists_of(maps), SHAPE, progress=False)
    with pytest.raises(ValueError, match="to be the factory's levels"):
        lnf.estimate_model_contributions(
            plain_nms, x, lambda i, s: [nf.flows.Squeeze()], SHAPE, progress=False
        )
    with pytest.raises(RuntimeError, match="expected level_sizes"):
        lnf.NMSFlow(nms.q0, list(nms.flows)).level_flows()


def level_lists_of(maps: core.ContributionMaps) -> list[list[nf.flows.Flow]]:
    return [list(level.flows) for level in maps.levels]
