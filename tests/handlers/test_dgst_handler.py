"""Acceptance tests of DGSTHandler inside a real monai.engines.SupervisedTrainer."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import nnunet_sgd, snapshot
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

from dgst_monai import DGSTHandler
from dgst_monai.sparsity import group_rows


def _record(trainer, net, take_snapshot):
    """Record raw gradients (registered before DGSTHandler.attach) and weights after every iteration."""
    rec = {"raw": [], "weights": [take_snapshot(net)]}
    trainer.add_event_handler(
        IterationEvents.BACKWARD_COMPLETED,
        lambda e: rec["raw"].append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}),
    )
    return rec


def _expected_fraction(net, gamma, grouping, roles, trainable=lambda name: True) -> float:
    """Fraction of entries updated per step, counted from the layer shapes (top-gamma per row of each kernel)."""
    kept = total = 0
    for name, param in net.named_parameters():
        total += param.numel()
        if not trainable(name):
            continue
        if roles.is_kernel(name, param):
            rows = group_rows(param.detach(), grouping)
            kept += rows.shape[0] * min(gamma, rows.shape[1])
        else:
            kept += param.numel()
    return kept / total


def test_strict_handler_holds_eq5_across_iterations(
    tiny_dynunet, trainer_factory, take_snapshot, reference_mask, dynunet_roles
):
    """Over 2 epochs x 2 iterations with nnU-Net's SGD, only the top-gamma |grad| kernel entries ever move per step."""
    net = tiny_dynunet()
    trainer = trainer_factory(net, nnunet_sgd(net, lr=0.01), iterations=2, max_epochs=2)
    rec = _record(trainer, net, take_snapshot)
    DGSTHandler(method="dgst", gamma=2, update="strict", clip_grad_norm=None).attach(trainer)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: rec["weights"].append(take_snapshot(net)))
    trainer.run()

    assert len(rec["raw"]) == 4 and len(rec["weights"]) == 5
    for it in range(4):
        before, after = rec["weights"][it], rec["weights"][it + 1]
        for name, param in net.named_parameters():
            if not dynunet_roles.is_kernel(name, param):
                assert not torch.equal(before[name], after[name]), (it, name)
                continue
            mask = reference_mask(rec["raw"][it][name], 2, "filter")
            assert torch.equal(after[name][~mask], before[name][~mask]), f"iteration {it}: Eq. 5 broken in {name}"
            assert torch.equal(after[name] != before[name], mask), (it, name)


def test_gradient_mode_handler_masks_gradients_but_weight_decay_moves_entries(
    tiny_dynunet, trainer_factory, take_snapshot, reference_mask, dynunet_roles
):
    """update='gradient': unselected gradients are zero at the step, yet SGD weight decay moves those entries."""
    net = tiny_dynunet()
    trainer = trainer_factory(net, nnunet_sgd(net, lr=0.01), iterations=1)
    rec = _record(trainer, net, take_snapshot)
    DGSTHandler(method="dgst", gamma=1, update="gradient", clip_grad_norm=None).attach(trainer)
    masked = []
    trainer.add_event_handler(  # registered after the DGSTHandler: sees the gradients the optimizer will use
        IterationEvents.BACKWARD_COMPLETED,
        lambda e: masked.append({n: p.grad.clone() for n, p in net.named_parameters()}),
    )
    trainer.run()
    after = take_snapshot(net)
    moved = unselected = 0
    for name, param in net.named_parameters():
        if dynunet_roles.is_kernel(name, param):
            mask = reference_mask(rec["raw"][0][name], 1, "filter")
            assert not masked[0][name][~mask].any(), name
            assert torch.equal(masked[0][name][mask], rec["raw"][0][name][mask]), name
            moved += int((after[name] != rec["weights"][0][name])[~mask].sum())
            unselected += int((~mask).sum())
    assert moved / unselected > 0.99


@pytest.mark.parametrize("gamma,grouping", [(1, "filter"), (2, "kernel")])
def test_updated_fraction_metric_matches_masks(
    gamma, grouping, tiny_dynunet, trainer_factory, take_snapshot, dynunet_roles
):
    """state.metrics['updated_fraction'] appears at epoch end and equals the fraction of entries the masks update."""
    net = tiny_dynunet()
    trainer = trainer_factory(net, nnunet_sgd(net, lr=0.01), iterations=2)
    seen_during_epoch = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: seen_during_epoch.append("updated_fraction" in e.state.metrics)
    )
    weights = []
    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, lambda e: weights.append(take_snapshot(net)))
    handler = DGSTHandler(method="dgst", gamma=gamma, grouping=grouping, update="strict")
    handler.attach(trainer)
    trainer.run()

    assert seen_during_epoch == [False, False]
    fraction = trainer.state.metrics["updated_fraction"]
    expected = _expected_fraction(net, gamma, grouping, dynunet_roles)
    assert fraction == pytest.approx(expected, rel=1e-12)
    assert 0 < fraction < 1
    # the same number, counted from the entries that actually moved at the last step (strict + weight decay)
    after = take_snapshot(net)
    moved = sum(int((after[n] != weights[-1][n]).sum()) for n in after)
    total = sum(p.numel() for p in net.parameters())
    assert moved / total == pytest.approx(fraction, rel=1e-12)
    assert handler.updated_fraction() == fraction


def test_updated_fraction_of_a_static_method(tiny_dynunet, trainer_factory, dynunet_roles):
    """For bias_norm the metric is the trainable share of all entries."""
    net = tiny_dynunet(trans_bias=True)
    trainer = trainer_factory(net, nnunet_sgd(net, lr=0.01), iterations=1)
    DGSTHandler(method="bias_norm").attach(trainer)
    trainer.run()
    trainable = sum(
        p.numel() for n, p in net.named_parameters() if dynunet_roles.is_bias(n) or dynunet_roles.is_norm(n)
    )
    assert trainer.state.metrics["updated_fraction"] == pytest.approx(
        trainable / sum(p.numel() for p in net.parameters()), rel=1e-12
    )


def test_gradient_is_clipped_before_masking(
    tiny_dynunet, trainer_factory, take_snapshot, reference_mask, dynunet_roles
):
    """With a tiny max-norm, each update is -lr * mask * g * (clip / ||g||): the norm is of the *unmasked* gradient."""
    net = tiny_dynunet().double()
    clip, lr = 1e-3, 1.0
    trainer = trainer_factory(net, torch.optim.SGD(net.parameters(), lr=lr), iterations=1, dtype=torch.float64)
    rec = _record(trainer, net, take_snapshot)
    DGSTHandler(method="dgst", gamma=1, update="strict", clip_grad_norm=clip).attach(trainer)
    trainer.run()
    after = take_snapshot(net)

    raw = rec["raw"][0]
    raw_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in raw.values()]))
    assert raw_norm > 100 * clip  # the clip is active
    masks = {
        n: (
            reference_mask(raw[n], 1, "filter")
            if dynunet_roles.is_kernel(n, p)
            else torch.ones_like(p, dtype=torch.bool)
        )
        for n, p in net.named_parameters()
    }
    masked_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(raw[n] * masks[n]) for n in raw]))
    assert masked_norm < 0.9 * raw_norm  # so clipping before / after masking are distinguishable

    scale = clip / (raw_norm + 1e-6)  # torch.nn.utils.clip_grad_norm_'s coefficient
    update_sq = 0.0
    for name, before in rec["weights"][0].items():
        delta = after[name] - before
        expected = -lr * scale * raw[name] * masks[name]
        torch.testing.assert_close(delta, expected, rtol=1e-7, atol=1e-15, msg=name)
        update_sq += float((delta**2).sum())
    assert math.sqrt(update_sq) == pytest.approx(clip * float(masked_norm / raw_norm), rel=1e-6)
    assert math.sqrt(update_sq) < 0.9 * clip  # clipping after masking would have given exactly `clip`


def test_handler_acts_on_explicit_network(tiny_dynunet, trainer_factory, take_snapshot, dynunet_roles):
    """network=... makes the handler freeze and train that module: linear_probe moves the heads only."""
    net = tiny_dynunet()
    trainer = trainer_factory(net, nnunet_sgd(net, lr=0.01), iterations=1)
    DGSTHandler(method="linear_probe", network=net).attach(trainer)
    before = take_snapshot(net)
    trainer.run()
    heads = {n for n, _ in net.named_parameters() if n.startswith(dynunet_roles.heads)}
    assert {n for n, p in net.named_parameters() if p.requires_grad} == heads
    assert {n for n, p in net.named_parameters() if not torch.equal(p, before[n])} == heads


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(update="soft"), "strict"),
        (dict(clip_grad_norm=0.0), "clip_grad_norm"),
        (dict(clip_grad_norm=-1.0), "clip_grad_norm"),
        (dict(method="nope"), "dgst"),
    ],
    ids=["update", "clip0", "clip-1", "method"],
)
def test_handler_rejects_bad_arguments_at_construction(kwargs, match):
    """Unknown update mode / method, or a non-positive clip norm, raise a ValueError when the handler is built."""
    with pytest.raises(ValueError, match=match):
        DGSTHandler(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(method="dgst", gamma=0), "gamma"),
        (dict(method="dgst", gamma=1.5), "gamma"),
        (dict(method="drst", gamma=-2), "gamma"),
        (dict(method="full", gamma=0), "gamma"),
        (dict(method="dgst", grouping="channel"), "grouping"),
        (dict(method="sgst", grouping="channel"), "grouping"),
        (dict(method="full", grouping="channel"), "grouping"),
        (dict(method="sgst", warmup_steps=0), "warmup_steps"),
    ],
    ids=["dgst-gamma0", "dgst-gamma1.5", "drst-gamma-2", "full-gamma0", "dgst-grouping", "sgst-grouping",
         "full-grouping", "sgst-warmup0"],
)
def test_handler_rejects_bad_selection_options(kwargs, match, tiny_dynunet, trainer_factory):
    """Bad gamma, grouping or warmup_steps raise a ValueError by the start of the run, before any weight moves."""
    net = tiny_dynunet()
    trainer = trainer_factory(net, nnunet_sgd(net, lr=0.01), iterations=1)
    before = snapshot(net)
    with pytest.raises(ValueError, match=match):
        DGSTHandler(**kwargs).attach(trainer)
        trainer.run()
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters())


def test_handler_rejects_gradient_accumulation(tiny_dynunet, trainer_factory):
    """A trainer with accumulation_steps > 1 is refused (the selection is per optimizer step)."""
    net = tiny_dynunet()
    trainer = trainer_factory(net, nnunet_sgd(net, lr=0.01), iterations=2, accumulation_steps=2)
    with pytest.raises(ValueError, match="accumulation"):
        DGSTHandler().attach(trainer)


def test_handler_needs_a_network():
    """On an engine that has no network attribute and no network=..., running raises a ValueError saying so."""
    engine = Engine(lambda e, b: None)
    engine.register_events(*IterationEvents)
    with pytest.raises(ValueError, match="network"):
        DGSTHandler().attach(engine)
        engine.run([0], max_epochs=1)


def test_sgst_needs_the_trainers_batches_to_calibrate(tiny_dynunet):
    """SGST on a plain ignite Engine (no data loader, prepare_batch, inferer or loss) fails before any step."""
    net = tiny_dynunet()
    before = snapshot(net)
    engine = Engine(lambda e, b: None)
    engine.register_events(*IterationEvents)
    DGSTHandler(method="sgst", network=net).attach(engine)
    with pytest.raises(ValueError, match="SGST calibrates on the trainer's own batches.*data_loader, prepare_batch"):
        engine.run([0], max_epochs=1)
    assert engine.state.iteration == 0 and all(torch.equal(p, before[n]) for n, p in net.named_parameters())
