"""Acceptance tests of the DGST core (dgst_monai.sparsity): top-gamma selection and the strict sparse update."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from helpers import nnunet_sgd
from torch import nn

import dgst_monai
from dgst_monai.sparsity import (
    AccumulatedGradientSelector,
    GradientSelector,
    RandomSelector,
    SparseUpdate,
    group_rows,
    top_gamma_mask,
)


class ToyNet(nn.Module):
    """Every layer kind DGST has to handle, with row lengths chosen around gamma 1/2/3."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 4, 3)  # (4, 2, 3, 3, 3): 4 filter rows of 54, 8 kernel rows of 27
        self.up = nn.ConvTranspose3d(4, 3, 2, stride=2)  # (4, 3, 2, 2, 2): 4 *input-channel* rows of 24
        self.pointwise = nn.Conv3d(3, 5, 1)  # (5, 3, 1, 1, 1): filter rows of 3, kernel rows of 1
        self.norm = nn.InstanceNorm3d(5, affine=True)
        self.fc = nn.Linear(5, 6)  # (6, 5): filter rows of 5, kernel rows of 1
        self.head = nn.Conv3d(6, 2, 1)  # declared a head through select_dgst(heads=[...])
        self.frozen = nn.Conv3d(2, 2, 3)
        self.frozen.requires_grad_(False)


SPARSE_TOY = ("conv.weight", "up.weight", "pointwise.weight", "fc.weight")
WHOLE_TOY = (
    "conv.bias", "up.bias", "pointwise.bias", "norm.weight", "norm.bias", "fc.bias", "head.weight", "head.bias"
)
FROZEN_TOY = ("frozen.weight", "frozen.bias")


def _toy_with_random_grads(seed: int = 1) -> ToyNet:
    model = ToyNet()
    gen = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.grad = torch.randn(param.shape, generator=gen)  # frozen ones too: they must still be ignored
    return model


@pytest.mark.parametrize("grouping", ["filter", "kernel"])
@pytest.mark.parametrize("gamma", [1, 2, 3, 100])
def test_select_dgst_matches_reference_on_every_layer_kind(gamma, grouping, reference_mask):
    """select_dgst equals a per-row stable-argsort reference on Conv3d, ConvTranspose3d, 1x1x1 conv and Linear."""
    model = _toy_with_random_grads()
    masks = dgst_monai.select_dgst(model, gamma=gamma, grouping=grouping, heads=[model.head])

    assert set(masks) == {n for n, _ in model.named_parameters()}
    params = dict(model.named_parameters())
    for name in SPARSE_TOY:
        expected = reference_mask(params[name].grad, gamma, grouping)
        assert masks[name].dtype == torch.bool and masks[name].shape == params[name].shape
        assert torch.equal(masks[name], expected), f"{name} gamma={gamma} grouping={grouping}"
    for name in WHOLE_TOY:
        assert masks[name].dtype == torch.bool and masks[name].all(), f"{name} must be kept whole"
    for name in FROZEN_TOY:
        assert masks[name].dtype == torch.bool and not masks[name].any(), f"frozen {name} must never be updated"


def test_select_dgst_row_layout_per_grouping():
    """Filter rows are dim 0 (input channels of a ConvTranspose3d); kernel rows are k^3 kernels; rows > gamma."""
    model = _toy_with_random_grads()
    filt = dgst_monai.select_dgst(model, gamma=2, grouping="filter", heads=[model.head])
    kern = dgst_monai.select_dgst(model, gamma=2, grouping="kernel", heads=[model.head])

    # ConvTranspose3d weight (in=4, out=3, 2, 2, 2): 2 entries per input channel under "filter"
    assert filt["up.weight"].sum(dim=(1, 2, 3, 4)).tolist() == [2, 2, 2, 2]
    # and 2 per (in, out) kernel under "kernel"
    assert torch.equal(kern["up.weight"].sum(dim=(2, 3, 4)), torch.full((4, 3), 2))
    assert torch.equal(filt["conv.weight"].sum(dim=(1, 2, 3, 4)), torch.full((4,), 2))
    assert torch.equal(kern["conv.weight"].sum(dim=(2, 3, 4)), torch.full((4, 2), 2))
    # a 1x1x1 conv and a Linear have one entry per kernel: "kernel" keeps them whole, "filter" keeps 2 per row
    assert kern["pointwise.weight"].all() and kern["fc.weight"].all()
    assert torch.equal(filt["pointwise.weight"].sum(dim=(1, 2, 3, 4)), torch.full((5,), 2))
    assert torch.equal(filt["fc.weight"].sum(dim=1), torch.full((6,), 2))


def test_gamma_at_least_row_length_keeps_whole_row():
    """A row no longer than gamma is kept entirely (gamma 3 on 3-entry rows, gamma 100 on everything)."""
    model = _toy_with_random_grads()
    masks3 = dgst_monai.select_dgst(model, gamma=3, heads=[model.head])
    assert masks3["pointwise.weight"].all()  # rows of exactly 3
    assert not masks3["conv.weight"].all()  # rows of 54
    masks100 = dgst_monai.select_dgst(model, gamma=100, heads=[model.head])
    for name in SPARSE_TOY + WHOLE_TOY:
        assert masks100[name].all(), name


def test_head_is_sparsified_unless_registered(reference_mask):
    """Without heads=[...] the head conv is an ordinary kernel; with it, the head is always updated whole."""
    model = _toy_with_random_grads()
    plain = dgst_monai.select_dgst(model, gamma=1)
    assert torch.equal(plain["head.weight"], reference_mask(model.head.weight.grad, 1, "filter"))
    assert int(plain["head.weight"].sum()) == 2  # one entry per output filter
    assert plain["head.bias"].all()
    with_head = dgst_monai.select_dgst(model, gamma=1, heads=[model.head])
    assert with_head["head.weight"].all()


def test_kernel_without_gradient_is_not_updated():
    """A sparsifiable kernel whose .grad is None (not reached by backward) gets an all-False mask."""
    model = _toy_with_random_grads()
    model.fc.weight.grad = None
    masks = dgst_monai.select_dgst(model, gamma=1, heads=[model.head])
    assert not masks["fc.weight"].any()
    assert masks["fc.bias"].all()


def test_group_rows_views_without_copy():
    """group_rows gives (dim0, rest) for filter and (dim0*dim1, k^3) for kernel, sharing storage."""
    weight = torch.randn(4, 3, 2, 2, 2)
    filt = group_rows(weight, "filter")
    kern = group_rows(weight, "kernel")
    assert filt.shape == (4, 24) and kern.shape == (12, 8)
    assert filt.data_ptr() == weight.data_ptr() and kern.data_ptr() == weight.data_ptr()
    assert torch.equal(kern[5], weight[1, 2].flatten())
    with pytest.raises(ValueError, match="grouping"):
        group_rows(weight, "channel")


def test_top_gamma_mask_ties_and_counts():
    """Exactly gamma entries per row; for gamma 1 a tie resolves to the lowest index, like the reference."""
    zeros = torch.zeros(3, 7)
    mask1 = top_gamma_mask(zeros, 1)
    assert mask1[:, 0].all() and int(mask1.sum()) == 3
    assert torch.equal(top_gamma_mask(zeros, 2).sum(dim=1), torch.full((3,), 2))
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.9], [3.0, 2.0, 1.0, 0.0]])
    assert top_gamma_mask(scores, 1).tolist() == [[False, True, False, False], [True, False, False, False]]
    assert top_gamma_mask(scores, 3).tolist() == [[False, True, True, True], [True, True, True, False]]
    assert top_gamma_mask(scores, 4).all() and top_gamma_mask(scores, 9).all()


def test_random_selector_is_seeded_and_dynamic():
    """DRST: same seed -> same sequence of masks; masks change between steps; gamma per row; heads whole."""
    a = RandomSelector(ToyNet(), gamma=2, seed=7, heads=None)
    b = RandomSelector(ToyNet(), gamma=2, seed=7)
    other_seed = RandomSelector(ToyNet(), gamma=2, seed=8)
    first_a, second_a = a(), a()
    first_b, second_b = b(), b()
    for name in SPARSE_TOY:
        assert torch.equal(first_a[name], first_b[name]) and torch.equal(second_a[name], second_b[name])
        assert torch.equal(group_rows(first_a[name], "filter").sum(1), torch.full((first_a[name].shape[0],), 2))
    assert any(not torch.equal(first_a[n], second_a[n]) for n in SPARSE_TOY)
    assert any(not torch.equal(first_a[n], other_seed()[n]) for n in SPARSE_TOY)
    assert first_a["norm.weight"].all() and first_a["conv.bias"].all()
    assert not first_a["frozen.weight"].any()


class SmallNet(nn.Sequential):
    """A runnable net for SGST calibration: two convs (sparsified), batch norm (buffers), a head conv."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv3d(1, 4, 3, padding=1),
            nn.BatchNorm3d(4),
            nn.ReLU(),
            nn.Conv3d(4, 4, 3, padding=1),
            nn.Conv3d(4, 2, 1),
        )


def _small_batches(n: int, seed: int = 5) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 1, 6, 6, 6, generator=gen) for _ in range(n)]


def _small_loss(net: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: net(x).square().mean()


def _reference_abs_sums(net: nn.Module, batches: list[torch.Tensor], names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """sum_b |dL_b/dtheta| at the current weights, by autograd.grad on a copy (no .grad, no optimizer)."""
    copy = SmallNet()
    copy.load_state_dict(net.state_dict())
    params = dict(copy.named_parameters())
    total: dict[str, torch.Tensor] = {}
    for x in batches:
        grads = torch.autograd.grad(copy(x).square().mean(), [params[n] for n in names])
        for n, g in zip(names, grads):
            total[n] = total[n] + g.abs() if n in total else g.abs()
    return total


SMALL_SPARSE = ("0.weight", "3.weight")


def test_sgst_calibration_sums_abs_gradients_at_fixed_weights_then_freezes(reference_mask, take_snapshot):
    """SGST: the mask is top-gamma of sum_b |g_b| over warmup_steps batches; nothing changes meanwhile."""
    net = SmallNet()
    net(torch.randn(2, 1, 6, 6, 6))  # non-trivial batch-norm running statistics to preserve
    weights, buffers = take_snapshot(net), {n: b.clone() for n, b in net.named_buffers()}
    selector = AccumulatedGradientSelector(net, gamma=2, warmup_steps=3, heads=[net[4]])
    with pytest.raises(RuntimeError, match="calibrat"):
        selector()  # no selection before calibration
    batches = _small_batches(4)
    assert selector.calibrate(_small_loss(net), batches) == 0
    assert selector.calibrated and selector.steps == 3

    expected = _reference_abs_sums(net, batches[:3], SMALL_SPARSE)  # the 4th batch is not drawn
    assert set(selector.sums) == set(SMALL_SPARSE)
    for n in SMALL_SPARSE:
        assert torch.equal(selector.sums[n], expected[n]), n
    one_batch = _reference_abs_sums(net, batches[:1], SMALL_SPARSE)  # so the sum is not the first batch's choice
    assert any(
        not torch.equal(reference_mask(one_batch[n], 2, "filter"), reference_mask(expected[n], 2, "filter"))
        for n in SMALL_SPARSE
    )
    # weights and buffers untouched, gradients cleared
    assert all(torch.equal(p, weights[n]) for n, p in net.named_parameters())
    assert all(torch.equal(b, buffers[n]) for n, b in net.named_buffers())
    assert all(p.grad is None for p in net.parameters())

    frozen = {n: m.clone() for n, m in selector().items()}
    for n in SMALL_SPARSE:
        assert torch.equal(frozen[n], reference_mask(selector.sums[n], 2, "filter")), n
    assert frozen["1.weight"].all() and frozen["4.weight"].all()  # norm and head whole
    for p in net.parameters():  # new gradients do not move a static mask
        p.grad = torch.randn_like(p)
    assert all(torch.equal(m, frozen[n]) for n, m in selector().items())
    with pytest.raises(RuntimeError, match="frozen"):
        selector.accumulate()


def test_sgst_skips_non_finite_batches_and_undoes_the_loss_scale():
    """A batch with non-finite gradients is neither added nor counted; under a loss scale the sums are of |g|."""
    net = SmallNet()
    batches = _small_batches(3)
    poisoned = [batches[0], torch.full_like(batches[1], float("inf")), batches[1], batches[2]]

    plain = AccumulatedGradientSelector(net, warmup_steps=3, heads=[net[4]])
    plain.calibrate(_small_loss(net), batches)
    skipping = AccumulatedGradientSelector(net, warmup_steps=3, heads=[net[4]])
    assert skipping.calibrate(_small_loss(net), poisoned) == 1
    scaled = AccumulatedGradientSelector(net, warmup_steps=3, heads=[net[4]])
    assert scaled.calibrate(_small_loss(net), poisoned, loss_scale=2.0**10) == 1  # AMP-like: scale halves

    assert skipping.steps == scaled.steps == plain.steps == 3
    for n in SMALL_SPARSE:
        assert torch.isfinite(skipping.sums[n]).all()
        assert torch.equal(skipping.sums[n], plain.sums[n]), n  # the same three batches, in the same order
        assert torch.equal(scaled.sums[n], plain.sums[n]), n  # power-of-two scales divide out exactly
    assert all(torch.equal(skipping()[n], plain()[n]) for n in plain())


def test_sgst_calibration_errors_are_bounded_and_clear(take_snapshot):
    """Too many non-finite batches -> RuntimeError; too few batches -> ValueError; weights intact either way."""
    net = SmallNet()
    before = take_snapshot(net)
    infinite = [torch.full((1, 1, 6, 6, 6), float("inf"))] * 10
    selector = AccumulatedGradientSelector(net, warmup_steps=2, max_nonfinite=3, heads=[net[4]])
    with pytest.raises(RuntimeError, match="4 batches had non-finite gradients"):
        selector.calibrate(_small_loss(net), infinite)
    with pytest.raises(ValueError, match="needs 2 batches with finite gradients; the data gave 1"):
        AccumulatedGradientSelector(net, warmup_steps=2, heads=[net[4]]).calibrate(_small_loss(net), _small_batches(1))
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in net.named_parameters())


def _through_file(state, tmp_path):
    """``state`` after torch.save / torch.load(weights_only=True), as a training-state file carries it."""
    torch.save({"selector": state}, tmp_path / "state.pt")
    return torch.load(tmp_path / "state.pt", weights_only=True)["selector"]


def test_sgst_state_round_trip_keeps_the_mask_and_resumes_a_partial_calibration(tmp_path):
    """SGST's frozen mask, sums and count survive a weights_only file; a partial state finishes calibrating."""
    net = SmallNet()
    batches = _small_batches(3)
    full = AccumulatedGradientSelector(net, warmup_steps=3, heads=[net[4]])
    full.calibrate(_small_loss(net), batches)

    restored = AccumulatedGradientSelector(net, warmup_steps=3, heads=[net[4]])
    restored.load_state_dict(_through_file(full.state_dict(), tmp_path))
    assert restored.calibrated and restored.steps == 3
    assert all(torch.equal(restored()[n], full()[n]) for n in full())
    assert all(torch.equal(restored.sums[n], full.sums[n]) for n in SMALL_SPARSE)

    partial = AccumulatedGradientSelector(net, warmup_steps=3, heads=[net[4]])
    _small_loss(net)(batches[0]).backward()
    assert partial.accumulate()
    resumed = AccumulatedGradientSelector(net, warmup_steps=3, heads=[net[4]])
    resumed.load_state_dict(_through_file(partial.state_dict(), tmp_path))
    assert resumed.steps == 1 and not resumed.calibrated
    resumed.calibrate(_small_loss(net), batches[1:])
    assert all(torch.equal(resumed.sums[n], full.sums[n]) for n in SMALL_SPARSE)
    assert all(torch.equal(resumed()[n], full()[n]) for n in full())


def test_drst_state_round_trip_continues_the_random_stream(tmp_path):
    """DRST: after loading a saved generator state, the next masks are the uninterrupted selector's."""
    run = RandomSelector(ToyNet(), gamma=1, seed=3)
    for _ in range(2):
        run()
    state = _through_file(run.state_dict(), tmp_path)
    assert isinstance(state["generators"]["cpu"], torch.Tensor) and state["generators"]["cpu"].dtype == torch.uint8
    resumed, restarted = RandomSelector(ToyNet(), gamma=1, seed=3), RandomSelector(ToyNet(), gamma=1, seed=3)
    resumed.load_state_dict(state)
    assert resumed.state_dict()["generators"]["cpu"].equal(state["generators"]["cpu"])  # pending still reported
    for _ in range(2):
        expected, got, fresh = run(), resumed(), restarted()
        assert all(torch.equal(got[n], expected[n]) for n in SPARSE_TOY)
    assert any(not torch.equal(fresh[n], expected[n]) for n in SPARSE_TOY)  # a restarted stream differs


def _drst(model: nn.Module) -> RandomSelector:
    return RandomSelector(model, seed=1)


def _sgst(model: nn.Module) -> AccumulatedGradientSelector:
    return AccumulatedGradientSelector(model, warmup_steps=2)


def _sgst_state(**changes) -> dict:
    return {"warmup_steps": 2, "steps": 0, "sums": {}, "masks": {}, **changes}


@pytest.mark.parametrize(
    "make,state,match",
    [
        (_drst, {"seed": 2, "generators": {}}, "seed=2"),
        (_drst, {"seed": 1, "generators": {"cuda:0": torch.zeros(16, dtype=torch.uint8)}}, "cuda:0"),
        (_sgst, _sgst_state(warmup_steps=3), "warmup_steps=3"),
        (_sgst, _sgst_state(steps=1, sums={"conv.weight": torch.zeros(3)}), "conv.weight"),
        (_sgst, _sgst_state(masks={"conv.weight": torch.zeros(4, 2, 3, 3, 3, dtype=torch.bool)}), "masks for 1"),
        (GradientSelector, {"steps": 1}, "no state"),
    ],
    ids=["drst-seed", "drst-device", "sgst-warmup", "sgst-shape", "sgst-partial-masks", "dgst-stateless"],
)
def test_selector_state_mismatch_is_rejected(make, state, match):
    """A state from another seed / warm-up / device / network raises a ValueError naming the difference."""
    with pytest.raises(ValueError, match=match):
        make(ToyNet()).load_state_dict(state)


# ---------------------------------------------------------------- the update on a real network with a real loss


def _run_sparse_steps(net, optimizer, gamma, grouping, update, steps, batch_factory, loss_fn, take_snapshot):
    """Real iterations: backward, select, before_step, optimizer.step, after_step. Returns per-step records."""
    selector = GradientSelector(net, gamma=gamma, grouping=grouping)
    sparse_update = SparseUpdate(dict(net.named_parameters()), selector.sparse, update=update)
    records = []
    for _ in range(steps):
        image, label = batch_factory(1)
        optimizer.zero_grad()
        loss_fn(net(image), label).backward()
        raw_grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        masks = {n: m.clone() for n, m in selector().items()}
        sparse_update.before_step(masks)
        masked_grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        before = take_snapshot(net)
        optimizer.step()
        sparse_update.after_step()
        records.append(
            dict(masks=masks, raw=raw_grads, masked=masked_grads, before=before, after=take_snapshot(net))
        )
    return selector, records


OPTIMIZERS = {
    "sgd_nesterov": nnunet_sgd,
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-4),
}


@pytest.mark.parametrize(
    "optim,gamma,grouping",
    [("sgd_nesterov", 1, "filter"), ("adam", 2, "filter"), ("sgd_nesterov", 2, "kernel")],
)
def test_strict_update_holds_eq5_exactly(
    optim, gamma, grouping, tiny_dynunet, batch_factory, loss_factory, take_snapshot, reference_mask, dynunet_roles
):
    """Strict mode: unselected kernel entries bit-identical, exactly gamma entries per row move, the rest all move."""
    net = tiny_dynunet()
    optimizer = OPTIMIZERS[optim](net.parameters())
    selector, records = _run_sparse_steps(
        net, optimizer, gamma, grouping, "strict", 3, batch_factory, loss_factory(), take_snapshot
    )
    sparse_names = {n for n, p in net.named_parameters() if dynunet_roles.is_kernel(n, p)}
    assert set(selector.sparse) == sparse_names

    for step, rec in enumerate(records):
        for name, before in rec["before"].items():
            after, mask = rec["after"][name], rec["masks"][name]
            changed = after != before
            if name in sparse_names:
                assert torch.equal(mask, reference_mask(rec["raw"][name], gamma, grouping)), (step, name)
                assert torch.equal(after[~mask], before[~mask]), f"step {step}: unselected entries of {name} moved"
                rows = group_rows(changed, grouping)
                expected = min(gamma, rows.shape[1])
                assert torch.equal(rows.sum(1), torch.full((rows.shape[0],), expected)), (step, name)
                assert not (changed & ~mask).any()
            else:
                assert mask.all(), name
                assert changed.any(), f"step {step}: {name} (bias / norm / head) must be updated"
    for name, before in records[0]["before"].items():
        if name not in sparse_names:
            assert (records[-1]["after"][name] != before).all(), f"{name} must be updated whole"


def test_gradient_mode_weight_decay_moves_unselected_entries(
    tiny_dynunet, batch_factory, loss_factory, take_snapshot, dynunet_roles
):
    """Gradient mode: unselected gradients are exactly zero, yet SGD weight decay still moves those entries."""
    net = tiny_dynunet()
    optimizer = nnunet_sgd(net, lr=0.01)
    _, records = _run_sparse_steps(
        net, optimizer, 1, "filter", "gradient", 1, batch_factory, loss_factory(), take_snapshot
    )
    rec = records[0]
    moved = total = 0
    for name, before in rec["before"].items():
        if not dynunet_roles.is_kernel(name, before):
            continue
        mask = rec["masks"][name]
        assert torch.equal(rec["masked"][name][~mask], torch.zeros(int((~mask).sum())))
        assert torch.equal(rec["masked"][name][mask], rec["raw"][name][mask])
        moved += int((rec["after"][name] != before)[~mask].sum())
        total += int((~mask).sum())
    assert moved / total > 0.99, f"only {moved}/{total} unselected entries moved under weight decay"


@pytest.mark.parametrize("update", ["gradient", "strict"])
def test_momentum_moves_previously_selected_entries_only_in_gradient_mode(
    update, tiny_dynunet, batch_factory, loss_factory, take_snapshot, dynunet_roles
):
    """With momentum (no weight decay), entries selected earlier keep moving in gradient mode, never in strict."""
    net = tiny_dynunet()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.99, nesterov=True, weight_decay=0.0)
    _, records = _run_sparse_steps(net, optimizer, 1, "filter", update, 2, batch_factory, loss_factory(), take_snapshot)
    first, second = records
    stale = never = 0
    for name, before in second["before"].items():
        if not dynunet_roles.is_kernel(name, before):
            continue
        changed = second["after"][name] != before
        earlier_only = first["masks"][name] & ~second["masks"][name]
        never_selected = ~first["masks"][name] & ~second["masks"][name]
        assert not changed[never_selected].any(), f"{name}: never-selected entries must not move ({update})"
        stale += int(changed[earlier_only].sum())
        never += int(earlier_only.sum())
    assert never > 0
    if update == "gradient":
        assert stale == never, f"momentum should move all {never} entries selected only at step 1, moved {stale}"
    else:
        assert stale == 0


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("gamma", [0, -1, 1.5, "2", None])
def test_select_dgst_rejects_bad_gamma(gamma):
    """gamma < 1 or not an integer raises a ValueError naming gamma."""
    model = _toy_with_random_grads()
    with pytest.raises(ValueError, match="gamma"):
        dgst_monai.select_dgst(model, gamma=gamma)


def test_select_dgst_rejects_unknown_grouping():
    """An unknown grouping raises a ValueError listing the valid ones."""
    with pytest.raises(ValueError, match="filter.*kernel"):
        dgst_monai.select_dgst(_toy_with_random_grads(), grouping="channel")


def test_sparse_update_rejects_unknown_mode():
    """An unknown update mode raises a ValueError listing strict and gradient."""
    model = ToyNet()
    with pytest.raises(ValueError, match="strict.*gradient"):
        SparseUpdate(dict(model.named_parameters()), ["conv.weight"], update="soft")


@pytest.mark.parametrize(
    "build",
    [
        lambda: nn.Sequential(nn.InstanceNorm3d(4, affine=True)),
        lambda: nn.Sequential(nn.Conv3d(1, 2, 3).requires_grad_(False), nn.InstanceNorm3d(2, affine=True)),
    ],
    ids=["norm_only", "frozen_conv"],
)
def test_select_dgst_rejects_model_without_trainable_kernels(build):
    """A model with no trainable conv / linear weight raises a ValueError saying there is nothing to sparsify."""
    with pytest.raises(ValueError, match="conv"):
        dgst_monai.select_dgst(build())


def test_sgst_rejects_non_positive_warmup():
    """AccumulatedGradientSelector(warmup_steps=0) raises a ValueError."""
    with pytest.raises(ValueError, match="warmup_steps"):
        AccumulatedGradientSelector(ToyNet(), warmup_steps=0)
