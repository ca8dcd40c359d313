"""Split objects: shapes, exactness, crafted LCMA decisions, ties, state_dict, errors.

``SPLITS`` is the one registry of split constructors; test_multiscale.py imports it too.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from lcma_ext import splits as S
from lcma_ext.diagnostics import split_diagnostics

Builder = Callable[[tuple[int, ...], str, torch.Generator], S.Split]


def _map(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float64)


SPLITS: dict[str, Builder] = {
    "channel": lambda shape, placement, g: S.ChannelSplit(placement=placement).bind(shape),
    "checkerboard": lambda shape, placement, g: S.CheckerboardSplit(shape, placement),
    "random": lambda shape, placement, g: S.RandomSplit(3, shape, placement),
    "lcma": lambda shape, placement, g: S.LCMASplit(_map(shape, g), "low", placement),
    "high": lambda shape, placement, g: S.LCMASplit(_map(shape, g), "high", placement),
}
SHAPES = {"post_squeeze": [(8, 2, 2), (4, 4, 4), (6,), (7,)], "squeeze": [(1, 4, 4), (3, 2, 6)]}
CASES = [(placement, shape) for placement, shapes in SHAPES.items() for shape in shapes]


def test_registry_covers_every_split_name() -> None:
    assert set(SPLITS) == set(S.SPLIT_NAMES)


def _index_split(split: S.Split, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    numel = torch.Size(shape).numel()
    return split.carry(torch.arange(numel).view(1, *shape))


@pytest.mark.parametrize("name", SPLITS)
@pytest.mark.parametrize(("placement", "shape"), CASES)
def test_shapes_match_channel_split_and_inverse_is_exact(
    name: str, placement: str, shape: tuple[int, ...]
) -> None:
    generator = torch.Generator().manual_seed(0)
    split = SPLITS[name](shape, placement, generator)
    expected = S.ChannelSplit(placement=placement).output_shapes(shape)
    assert split.output_shapes(shape) == expected
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(5, *shape, generator=generator).to(dtype)
        factored, kept = split(x)
        assert (tuple(factored.shape[1:]), tuple(kept.shape[1:])) == expected
        assert factored.dtype == dtype
        assert torch.equal(split.inverse(factored, kept), x)
        # a pure rearrangement: every input value appears exactly once in the outputs
        joined = torch.cat([factored.reshape(5, -1), kept.reshape(5, -1)], 1)
        assert torch.equal(joined.sort(1).values, x.reshape(5, -1).sort(1).values)
    # carry applies the same selection to a long index tensor
    index_f, index_k = _index_split(split, shape)
    values = torch.arange(torch.Size(shape).numel(), dtype=torch.float64).view(1, *shape)
    value_f, value_k = split(values)
    assert torch.equal(index_f.double(), value_f) and torch.equal(index_k.double(), value_k)


@pytest.mark.parametrize("name", SPLITS)
def test_gradient_through_split_is_the_permutation(name: str) -> None:
    generator = torch.Generator().manual_seed(1)
    split = SPLITS[name]((8, 2, 2), "post_squeeze", generator)
    x = torch.randn(2, 8, 2, 2, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 32, dtype=torch.float64, generator=generator)
    factored, kept = split(x)
    out = torch.cat([factored.reshape(2, -1), kept.reshape(2, -1)], 1)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    # d out_q / d x_p = 1 iff out_q holds x_p: grad at p equals the weight of p's output slot
    index = torch.cat([t.reshape(1, -1) for t in _index_split(split, (8, 2, 2))], 1)[0]
    expected = torch.zeros(2, 32, dtype=torch.float64).index_copy(1, index, weights)
    torch.testing.assert_close(grad.reshape(2, -1), expected, rtol=0, atol=0)


# --- crafted contribution maps ------------------------------------------------------------


def test_lcma_post_squeeze_keeps_the_two_highest_per_block() -> None:
    # one channel group (4 channels), sites (0, 0) and (0, 1); block positions k = 0..3
    values = torch.tensor([[5.0, 0.0], [1.0, 9.0], [7.0, 8.0], [3.0, 1.0]]).view(4, 1, 2)
    split = S.LCMASplit(values)
    factored, kept = _index_split(split, (4, 1, 2))
    # flat index of (k, 0, j) is 2k + j; site 0 keeps k = 0, 2; site 1 keeps k = 1, 2
    assert kept[0].tolist() == [[[0, 3]], [[4, 5]]]
    assert factored[0].tolist() == [[[2, 1]], [[6, 7]]]


def test_lcma_squeeze_placement_fig1_literally() -> None:
    # one channel, 2 x 4 pixels: blocks (0, 0) and (0, 1)
    values = torch.tensor([[5.0, 1.0, 0.0, 9.0], [7.0, 3.0, 8.0, 1.0]]).view(1, 2, 4)
    split = S.LCMASplit(values, placement="squeeze")
    factored, kept = _index_split(split, (1, 2, 4))
    # pixel (y, x) has flat index 4y + x; block 0 keeps TL (0) and BL (4); block 1 TR (3), BL (6)
    assert kept[0].tolist() == [[[0, 3]], [[4, 6]]]
    assert factored[0].tolist() == [[[1, 2]], [[5, 7]]]


def test_lcma_vector_keeps_the_top_half() -> None:
    split = S.LCMASplit(torch.tensor([3.0, 9.0, 1.0, 7.0, 5.0, 0.0]))
    factored, kept = _index_split(split, (6,))
    assert kept[0].tolist() == [1, 3, 4]
    assert factored[0].tolist() == [0, 2, 5]
    odd = S.LCMASplit(torch.tensor([3.0, 9.0, 1.0, 7.0, 5.0]))  # factored gets ceil(D / 2)
    factored, kept = _index_split(odd, (5,))
    assert kept[0].tolist() == [1, 3] and factored[0].tolist() == [0, 2, 4]
    high_f, high_k = _index_split(
        S.LCMASplit(torch.tensor([3.0, 9.0, 1.0, 7.0, 5.0]), "high"), (5,)
    )
    assert high_k[0].tolist() == [0, 2] and high_f[0].tolist() == [1, 3, 4]


@pytest.mark.parametrize(
    ("placement", "shape"), [("post_squeeze", (8, 2, 2)), ("squeeze", (2, 4, 4)), (None, (8,))]
)
@pytest.mark.parametrize("ties", [False, True])
def test_reverse_keeps_exactly_the_complement(
    placement: str | None, shape: tuple[int, ...], ties: bool
) -> None:
    generator = torch.Generator().manual_seed(2)
    values = _map(shape, generator)
    if ties:  # many exact ties: the complement must still hold
        values = (values > 0).double()
    placement = placement or "post_squeeze"
    low_f, low_k = _index_split(S.LCMASplit(values, "low", placement), shape)
    high_f, high_k = _index_split(S.LCMASplit(values, "high", placement), shape)
    assert torch.equal(high_k, low_f) and torch.equal(high_f, low_k)


@pytest.mark.parametrize(
    ("placement", "shape"), [("post_squeeze", (8, 2, 2)), ("squeeze", (2, 4, 4)), (None, (8,))]
)
def test_constant_map_gives_the_checkerboard(placement: str | None, shape: tuple[int, ...]) -> None:
    placement = placement or "post_squeeze"
    lcma = S.LCMASplit(torch.full(shape, 0.5), placement=placement)
    checkerboard = S.CheckerboardSplit(shape, placement)
    assert torch.equal(lcma.index, checkerboard.index)
    diagnostics = split_diagnostics(lcma.contributions, placement)
    assert diagnostics["ties"] == diagnostics["blocks"]
    assert diagnostics["differs_from_checkerboard"] == 0.0


def test_tie_break_order_is_tl_br_tr_bl() -> None:
    # block values for k = TL, TR, BL, BR
    cases = {
        (1.0, 1.0, 1.0, 0.0): [0, 1],  # TL, TR, BL tie: TL then TR (BR is lower)
        (0.0, 1.0, 1.0, 1.0): [1, 3],  # TR, BL, BR tie: BR then TR
        (0.0, 1.0, 1.0, 0.0): [1, 2],  # no tie at the boundary
        (2.0, 1.0, 1.0, 0.0): [0, 1],  # tie for second place: TR before BL
    }
    for block, expected_kept in cases.items():
        values = torch.tensor(block).view(4, 1, 1)
        _, kept = _index_split(S.LCMASplit(values), (4, 1, 1))
        assert kept.reshape(-1).tolist() == expected_kept, block


def test_diagnostics_count_ties_and_near_ties() -> None:
    blocks = [
        (1.0, 1.0, 1.0, 0.0),  # exact tie at the boundary
        (2.0, 1.0 + 1e-9, 1.0, 0.0),  # near-tie (relative difference 1e-9)
        (2.0, 1.0 + 1e-3, 1.0, 0.0),  # decisive
        (0.0, 3.0, 2.0, 1.0),  # decisive
    ]
    values = torch.tensor(blocks, dtype=torch.float64).t().reshape(4, 1, 4)
    diagnostics = split_diagnostics(values)
    assert diagnostics["blocks"] == 4
    assert diagnostics["ties"] == 1
    assert diagnostics["near_ties"] == 2
    # kept patterns: TL+TR, TL+TR, TL+TR, TR+BL; checkerboard keeps TL+BR
    assert diagnostics["patterns"] == {"TL+TR": 3, "TR+BL": 1}
    assert diagnostics["differs_from_checkerboard"] == 1.0
    assert diagnostics["differs_from_modal"] == 0.25
    # one channel group: ChannelSplit keeps channels 2 and 3, i.e. BL+BR of every block
    assert diagnostics["differs_from_channel"] == 1.0
    assert diagnostics["kept_overlap_with_channel"] == 1 / 8  # only the BL of block 4


# --- state_dict ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["checkerboard", "random", "lcma", "high"])
def test_state_dict_round_trip(name: str) -> None:
    generator = torch.Generator().manual_seed(4)
    shape = (8, 2, 2)
    split = SPLITS[name](shape, "post_squeeze", generator)
    state = split.state_dict()
    assert "index" in state and "inverse_index" not in state  # the inverse is derived
    if name in ("lcma", "high"):
        other = S.LCMASplit(_map(shape, generator), split.factor_out)
    else:
        other = S.RandomSplit(99, shape) if name == "random" else S.CheckerboardSplit(shape)
    other.load_state_dict(state)
    x = torch.randn(3, *shape, generator=generator)
    for a, b in zip(split(x), other(x)):
        assert torch.equal(a, b)


def test_load_state_refuses_another_split() -> None:
    shape = (8, 2, 2)
    checkerboard = S.CheckerboardSplit(shape)
    random = S.RandomSplit(3, shape)
    with pytest.raises(ValueError, match="expected the state of a RandomSplit; got the state of"):
        random.load_state_dict(checkerboard.state_dict())
    with pytest.raises(ValueError, match="expected the state of a CheckerboardSplit"):
        checkerboard.load_state_dict(random.state_dict())
    assert torch.equal(random.index, S.RandomSplit(3, shape).index)  # unchanged
    # another placement changes the output shapes: refused
    with pytest.raises(ValueError, match="with settings like"):
        S.CheckerboardSplit((8, 4, 4), "post_squeeze").load_state_dict(
            S.CheckerboardSplit((8, 4, 4), "squeeze").state_dict()
        )


def test_load_state_refuses_an_index_that_is_no_permutation_or_not_its_own() -> None:
    shape = (8, 2, 2)
    state = S.RandomSplit(3, shape).state_dict()
    broken = dict(state, index=torch.zeros(32, dtype=torch.long))
    with pytest.raises(ValueError, match="is a permutation"):
        S.RandomSplit(3, shape).load_state_dict(broken)
    swapped = state["index"].clone()
    swapped[[0, -1]] = swapped[[-1, 0]]  # a permutation, but not seed 3's
    with pytest.raises(ValueError, match="another permutation"):
        S.RandomSplit(3, shape).load_state_dict(dict(state, index=swapped))
    lcma = S.LCMASplit(torch.rand(shape, dtype=torch.float64))
    tampered = dict(lcma.state_dict(), index=S.CheckerboardSplit(shape).index)
    target = S.LCMASplit(torch.zeros(shape, dtype=torch.float64))
    before = target.index.clone()
    with pytest.raises(ValueError, match="another permutation"):
        target.load_state_dict(tampered)
    assert target.factor_out == "low" and target.granularity == "site"
    assert torch.equal(target.index, before)  # a refused state leaves the split as it was


def test_load_state_takes_the_saved_settings() -> None:
    shape = (8, 4, 4)
    values = torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    saved = S.LCMASplit(values, "high", granularity="region", region_size=2)
    target = S.LCMASplit(torch.zeros(shape, dtype=torch.float64))
    target.load_state_dict(saved.state_dict())
    assert (target.factor_out, target.granularity, target.region_size) == ("high", "region", 2)
    assert torch.equal(target.index, saved.index)
    assert torch.equal(target.inverse_index, saved.inverse_index)
    x = torch.randn(2, *shape)
    assert torch.equal(target.inverse(*target(x)), x)


def test_unbound_split_binds_once() -> None:
    split = S.RandomSplit(seed=1)
    with pytest.raises(RuntimeError, match="expected a bound split"):
        split(torch.zeros(1, 8, 2, 2))
    split.bind((8, 2, 2))
    with pytest.raises(ValueError, match="expected input event shape"):
        split.bind((4, 2, 2))
    assert torch.equal(S.RandomSplit(1, (8, 2, 2)).index, split.index)
    assert not torch.equal(S.RandomSplit(2, (8, 2, 2)).index, split.index)


# --- errors -------------------------------------------------------------------------------


def test_errors_are_clear() -> None:
    good = torch.randn(8, 2, 2)
    with pytest.raises(ValueError, match="finite"):
        S.LCMASplit(torch.tensor([1.0, float("nan"), 0.0, 2.0]).view(4, 1, 1))
    with pytest.raises(ValueError, match="finite"):
        S.LCMASplit(torch.tensor([1.0, float("inf"), 0.0, 2.0]).view(4, 1, 1))
    with pytest.raises(ValueError, match=r"expected a contribution map of shape \(D,\)"):
        S.LCMASplit(torch.randn(4, 4))
    with pytest.raises(ValueError, match="expected even H and W"):
        S.LCMASplit(torch.randn(1, 3, 4), placement="squeeze")
    with pytest.raises(ValueError, match="expected even H and W"):
        S.CheckerboardSplit((1, 4, 5), "squeeze")
    with pytest.raises(ValueError, match="divisible by 4"):
        S.LCMASplit(torch.randn(6, 2, 2))
    with pytest.raises(ValueError, match="divisible by 4"):
        S.CheckerboardSplit((2, 2, 2))
    with pytest.raises(ValueError, match="at least 2 channels"):
        S.ChannelSplit().output_shapes((1, 4, 4))
    with pytest.raises(ValueError, match=r"contribution map of shape \(8, 2, 2\)"):
        S.make_split("lcma", (8, 2, 2), torch.randn(4, 2, 2))
    with pytest.raises(ValueError, match="expected a contribution map; got None"):
        S.make_split("high", (8, 2, 2))
    with pytest.raises(ValueError, match="expected a split name"):
        S.make_split("max", (8, 2, 2), good)
    with pytest.raises(ValueError, match="expected factor_out"):
        S.LCMASplit(good, factor_out="middle")
    with pytest.raises(ValueError, match="expected placement"):
        S.LCMASplit(good, placement="pre_squeeze")
    split = S.LCMASplit(good)
    with pytest.raises(ValueError, match=r"expected inputs of event shape \(8, 2, 2\)"):
        split(torch.randn(2, 4, 2, 2))
    with pytest.raises(ValueError, match="expected input event shape"):
        split.bind((4, 4, 4))
