"""Acceptance tests of the fine-tuning method registry: each method changes exactly the parameters it names."""

from __future__ import annotations

from copy import deepcopy

import pytest
import torch
from helpers import changed_by_plain_steps, changed_names, decay_sgd
from ignite.engine import Events
from monai.engines.utils import IterationEvents
from torch import nn

import dgst_monai
from dgst_monai import METHODS, DGSTHandler, apply_method, describe_parameters, get_method
from dgst_monai.sparsity import group_rows

ALL_METHODS = (
    "scratch", "full", "linear_probe", "bias", "norm", "bias_norm", "bias_norm_head", "encoder", "decoder", "drst",
    "sgst", "dgst",
)
SPARSE_METHODS = ("drst", "sgst", "dgst")
STATIC_METHODS = tuple(m for m in ALL_METHODS if m not in SPARSE_METHODS)


def expected_trained(method: str, names, roles) -> set[str]:
    """What each method trains on the tiny DynUNet, from parameter names alone."""
    names = set(names)
    if method in ("scratch", "full") + SPARSE_METHODS:
        return names
    if method == "linear_probe":
        return {n for n in names if n.startswith(roles.heads)}
    if method == "bias":
        return {n for n in names if roles.is_bias(n)}
    if method == "norm":
        return {n for n in names if roles.is_norm(n)}
    if method == "bias_norm":
        return {n for n in names if roles.is_bias(n) or roles.is_norm(n)}
    if method == "bias_norm_head":
        return {n for n in names if roles.is_bias(n) or roles.is_norm(n) or n.startswith(roles.heads)}
    if method == "encoder":
        return {n for n in names if n.startswith(roles.encoder)}
    if method == "decoder":
        return {n for n in names if n.startswith(roles.decoder)}
    raise AssertionError(method)


def run_handler(net, trainer_factory, take_snapshot, iterations=2, **handler_kwargs):
    """Train ``net`` for ``iterations`` steps in a SupervisedTrainer with a DGSTHandler.

    Returns the handler, the weights before and after every iteration, and the raw (unclipped, unmasked)
    gradients of every iteration, recorded by a BACKWARD_COMPLETED handler registered before the DGSTHandler.
    """
    trainer = trainer_factory(net, decay_sgd(net), iterations=iterations)
    weights = [take_snapshot(net)]
    raw_grads = []

    def record_grads(engine):
        raw_grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})

    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, record_grads)
    handler = DGSTHandler(**handler_kwargs)
    handler.attach(trainer)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: weights.append(take_snapshot(net)))
    trainer.run()
    assert trainer.state.iteration == iterations
    return handler, weights, raw_grads


def test_registry_lists_the_papers_methods():
    """METHODS holds the paper's methods (LoRA / Adapter may be added); only scratch skips the foundation weights."""
    assert set(ALL_METHODS) <= set(METHODS)
    assert [m for m in METHODS if not METHODS[m].from_pretrained] == ["scratch"]
    for name in METHODS:
        assert get_method(name) is METHODS[name] and get_method(name).name == name
    assert {m for m in METHODS if METHODS[m].selector is not None} == set(SPARSE_METHODS)


def test_describe_parameters_on_dynunet(tiny_dynunet, dynunet_roles):
    """Every DynUNet parameter gets the right kind, head flag and encoder/decoder part."""
    net = tiny_dynunet(trans_bias=True)
    infos = describe_parameters(net)
    params = dict(net.named_parameters())
    assert list(infos) == list(params)
    for name, info in infos.items():
        if dynunet_roles.is_norm(name):
            assert info.kind == "norm", name
        elif dynunet_roles.is_bias(name):
            assert info.kind == "bias", name
        else:
            assert info.kind == "kernel", name
        assert info.head == name.startswith(dynunet_roles.heads), name
        assert info.part == ("encoder" if name.startswith(dynunet_roles.encoder) else "decoder"), name


@pytest.mark.parametrize("method", STATIC_METHODS)
def test_apply_method_plain_loop_changes_exactly_the_named_parameters(
    method, tiny_dynunet, batch_factory, dynunet_roles
):
    """apply_method + a plain SGD(momentum, weight decay) loop: requires_grad and changed tensors match the method."""
    net = tiny_dynunet(trans_bias=True)
    assert apply_method(net, method) is net
    expected = expected_trained(method, dict(net.named_parameters()), dynunet_roles)
    assert expected, method
    assert {n for n, p in net.named_parameters() if p.requires_grad} == expected

    # the optimizer holds *all* parameters: frozen ones must stay put anyway
    assert changed_by_plain_steps(net, [batch_factory(1) for _ in range(2)]) == expected


@pytest.mark.parametrize("method", ALL_METHODS)
def test_handler_in_supervised_trainer_changes_exactly_the_named_parameters(
    method, tiny_dynunet, trainer_factory, take_snapshot, dynunet_roles
):
    """DGSTHandler in a SupervisedTrainer: the set of changed tensors is exactly what the method names."""
    net = tiny_dynunet(trans_bias=True)
    _, weights, _ = run_handler(net, trainer_factory, take_snapshot, method=method)
    expected = expected_trained(method, dict(net.named_parameters()), dynunet_roles)
    assert {n for n, p in net.named_parameters() if p.requires_grad} == expected
    assert changed_names(weights[0], weights[-1]) == expected


@pytest.mark.parametrize("method", SPARSE_METHODS)
@pytest.mark.parametrize("gamma", [1, 2])
def test_sparse_methods_change_gamma_entries_per_row_per_iteration(
    method, gamma, tiny_dynunet, trainer_factory, take_snapshot, dynunet_roles
):
    """dgst / drst / sgst (strict): each iteration moves exactly gamma entries per kernel row; the rest all train."""
    net = tiny_dynunet()
    _, weights, _ = run_handler(net, trainer_factory, take_snapshot, iterations=3, method=method, gamma=gamma)
    for it in range(1, len(weights)):
        for name, param in net.named_parameters():
            changed = weights[it][name] != weights[it - 1][name]
            if dynunet_roles.is_kernel(name, param):
                rows = group_rows(changed, "filter")
                assert torch.equal(rows.sum(1), torch.full((rows.shape[0],), min(gamma, rows.shape[1]))), (it, name)
            else:
                assert changed.any(), (it, name)  # biases, norms and heads move at every step...
    for name, param in net.named_parameters():
        if not dynunet_roles.is_kernel(name, param):
            assert (weights[-1][name] != weights[0][name]).all(), name  # ...entirely over the run


def test_dgst_changes_exactly_the_top_gradient_entries(
    tiny_dynunet, trainer_factory, take_snapshot, reference_mask, dynunet_roles
):
    """dgst: the entries that move at each iteration are the reference top-1 |gradient| entries of each filter."""
    net = tiny_dynunet()
    _, weights, raw = run_handler(net, trainer_factory, take_snapshot, iterations=3, method="dgst", clip_grad_norm=None)
    assert len(raw) == 3
    for it in range(3):
        for name, param in net.named_parameters():
            if dynunet_roles.is_kernel(name, param):
                changed = weights[it + 1][name] != weights[it][name]
                assert torch.equal(changed, reference_mask(raw[it][name], 1, "filter")), (it, name)


def _changed_kernel_masks(net, weights, roles):
    return [
        {n: weights[it][n] != weights[it - 1][n] for n, p in net.named_parameters() if roles.is_kernel(n, p)}
        for it in range(1, len(weights))
    ]


def test_drst_masks_depend_on_seed_only_and_change_every_iteration(
    tiny_dynunet, trainer_factory, take_snapshot, dynunet_roles
):
    """drst: two fresh runs with the same seed select identical entries; the selection changes across iterations."""
    net_a = tiny_dynunet()
    _, weights_a, _ = run_handler(net_a, trainer_factory, take_snapshot, iterations=3, method="drst", seed=5)
    torch.manual_seed(123)  # a different network and different data: the masks must not depend on them
    net_b = tiny_dynunet()
    _, weights_b, _ = run_handler(net_b, trainer_factory, take_snapshot, iterations=3, method="drst", seed=5)
    net_c = tiny_dynunet()
    _, weights_c, _ = run_handler(net_c, trainer_factory, take_snapshot, iterations=3, method="drst", seed=6)

    masks_a = _changed_kernel_masks(net_a, weights_a, dynunet_roles)
    masks_b = _changed_kernel_masks(net_b, weights_b, dynunet_roles)
    masks_c = _changed_kernel_masks(net_c, weights_c, dynunet_roles)
    for it in range(3):
        for name in masks_a[it]:
            assert torch.equal(masks_a[it][name], masks_b[it][name]), (it, name)
    for it in (1, 2):
        assert any(not torch.equal(masks_a[it][n], masks_a[it - 1][n]) for n in masks_a[it]), it
    assert any(not torch.equal(masks_a[0][n], masks_c[0][n]) for n in masks_a[0])


def _reference_sgst_masks(net, loader, loss_fn, warmup_steps, roles, reference_mask):
    """Top-1 per filter of sum_b |dL_b/dW| over the first ``warmup_steps`` batches of ``loader`` (repeated), at
    the weights ``net`` has now, computed on a copy with autograd.grad (no trainer, no optimizer)."""
    copy = deepcopy(net)
    copy.train()
    kernels = {n: p for n, p in copy.named_parameters() if roles.is_kernel(n, p)}
    batches = list(loader)
    sums: dict[str, torch.Tensor] = {}
    for i in range(warmup_steps):
        batch = batches[i % len(batches)]
        grads = torch.autograd.grad(loss_fn(copy(batch["image"]), batch["label"]).mean(), list(kernels.values()))
        for name, grad in zip(kernels, grads):
            sums[name] = sums[name] + grad.abs() if name in sums else grad.abs()
    return {name: reference_mask(total, 1, "filter") for name, total in sums.items()}


def test_sgst_mask_is_fixed_from_the_first_update_to_the_last(
    tiny_dynunet, trainer_factory, loss_factory, take_snapshot, reference_mask, dynunet_roles
):
    """sgst: one mask, top-1 of |gradient| summed over 3 calibration batches at the foundation weights, is the
    set of kernel entries that move at every one of 4 updates; calibration changed no weight and made no step."""
    net = tiny_dynunet()
    foundation = take_snapshot(net)
    optimizer = decay_sgd(net)
    trainer = trainer_factory(net, optimizer, iterations=2, max_epochs=2)
    expected = _reference_sgst_masks(net, trainer.data_loader, loss_factory(), 3, dynunet_roles, reference_mask)
    before_step, raw = [], []

    def record(engine):  # registered before the DGSTHandler: the weights and gradients the step starts from
        before_step.append((take_snapshot(net), len(optimizer.state)))
        raw.append({n: p.grad.clone() for n, p in net.named_parameters()})

    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, record)
    DGSTHandler(method="sgst", warmup_steps=3, clip_grad_norm=None).attach(trainer)
    weights = [foundation]
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: weights.append(take_snapshot(net)))
    trainer.run()

    first_weights, optimizer_states = before_step[0]
    assert optimizer_states == 0  # no optimizer step before the first update (SGD creates momentum at its first)
    assert all(torch.equal(first_weights[n], foundation[n]) for n in foundation)
    masks = _changed_kernel_masks(net, weights, dynunet_roles)
    assert len(masks) == 4
    for step, changed in enumerate(masks):
        for name, mask in changed.items():
            assert torch.equal(mask, expected[name]), (step, name)
    # static, not dynamic: the selection is not the current gradient's
    for step in range(4):
        assert any(not torch.equal(expected[n], reference_mask(raw[step][n], 1, "filter")) for n in expected), step


# ---------------------------------------------------------------- bad input


def test_unknown_method_lists_known_methods(tiny_dynunet):
    """An unknown method name raises a ValueError whose message lists every registered method."""
    calls = (
        lambda: get_method("lora_xl"),
        lambda: apply_method(tiny_dynunet(), "lora_xl"),
        lambda: DGSTHandler("lora_xl"),
    )
    for call in calls:
        with pytest.raises(ValueError, match="lora_xl") as info:
            call()
        for name in ALL_METHODS:
            assert name in str(info.value)


@pytest.mark.parametrize("method", ["encoder", "decoder"])
def test_encoder_decoder_need_a_registered_layout(method):
    """encoder / decoder on a network without a registered layout raise a ValueError pointing to register_network."""
    net = nn.Sequential(nn.Conv3d(1, 4, 3), nn.InstanceNorm3d(4, affine=True), nn.Conv3d(4, 2, 1))
    with pytest.raises(ValueError, match="register_network"):
        apply_method(net, method)
    assert all(p.requires_grad for p in net.parameters())  # nothing was frozen on the way


def test_method_that_trains_nothing_is_rejected():
    """bias on a network without biases raises a ValueError instead of silently training nothing."""
    net = nn.Sequential(nn.Conv3d(1, 4, 3, bias=False), nn.Conv3d(4, 2, 1, bias=False))
    with pytest.raises(ValueError, match="bias"):
        apply_method(net, "bias")


def test_register_network_enables_encoder_method():
    """A custom network becomes usable with encoder/decoder after one register_network call."""

    class TwoPart(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.down = nn.Conv3d(1, 4, 3)
            self.up = nn.Conv3d(4, 4, 3)
            self.out = nn.Conv3d(4, 2, 1)

    dgst_monai.register_network(TwoPart, encoder=["down"], decoder=["up", "out"], heads=["out"])
    net = apply_method(TwoPart(), "encoder")
    assert {n for n, p in net.named_parameters() if p.requires_grad} == {"down.weight", "down.bias"}
    net = apply_method(TwoPart(), "linear_probe")
    assert {n for n, p in net.named_parameters() if p.requires_grad} == {"out.weight", "out.bias"}
    with pytest.raises(ValueError, match="both"):
        dgst_monai.register_network(TwoPart, encoder=["down"], decoder=["down"])
