"""The authors' released DGST trainer, as published, trains exactly like ``full``.

The released trainer (``nnUNetTrainer_DGST.py`` in LN-Seg-FM) is re-implemented here, in our own words, from
its description in the project brief: after the AMP-scaled backward it unscales, clips the global gradient
norm to 12 and calls a masking function. That function views each kernel gradient as ``(shape[0], -1)``,
fully argsorts every row of |grad|, and adds up ``gamma`` one-hot rows of ``torch.eye(row_length)`` (sorting
again for every one of them); parameters whose name contains ``norm``, ``bias``, ``head``, ``gamma`` or
``seg_layers`` are left out (always trained). It builds those masks and then returns an empty dict, so the
step masks nothing; and only the CUDA/AMP branch of its training step calls it at all. These tests show that
either branch gives weights bit-identical to our ``full`` on the same seed, data and nnU-Net optimizer, and
that the masks it discards were real top-gamma selections that would have changed the training.

This is a documented fact about the published code, not a method of the registry.
"""

from __future__ import annotations

import pytest
import torch
from helpers import fixed_data_trainer, patches, snapshot
from ignite.engine import Engine
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from torch import nn

from dgst_monai import DGSTHandler

RELEASED_ALWAYS_TRAINED = ("norm", "bias", "head", "gamma", "seg_layers")
RELEASED_CLIP = 12.0
RELEASED_GAMMA = 2  # the released trainer's default


def released_masking(network: nn.Module, gamma: int, discarded: list, store: bool = False) -> dict[str, torch.Tensor]:
    """The released masking function. As published (``store=False``) the masks it builds are dropped and it
    returns an empty dict; they are appended to ``discarded`` (with the gradients they came from) so the test
    can look at them. ``store=True`` returns them, as the function was presumably meant to."""
    masks: dict[str, torch.Tensor] = {}
    for name, param in network.named_parameters():
        if param.grad is None or any(key in name for key in RELEASED_ALWAYS_TRAINED):
            continue
        magnitude = param.grad.abs().view(param.shape[0], -1)
        one_hot = torch.eye(magnitude.shape[1], device=magnitude.device)
        mask = torch.zeros_like(magnitude)
        for rank in range(gamma):
            order = torch.argsort(magnitude, dim=1, descending=True)
            mask += one_hot[order[:, rank]]
        masks[name] = mask.view_as(param)
    discarded.append({name: (network.get_parameter(name).grad.clone(), mask) for name, mask in masks.items()})
    return masks if store else {}


class ReleasedStep:
    """The released trainer's work between backward and ``optimizer.step()``, at ``BACKWARD_COMPLETED``.

    Args:
        network: the trained network.
        masking_branch: True for the CUDA/AMP branch (unscale, clip, mask); False for the other one (clip only).
        store: whether the masking function returns its masks (False: as published).
    """

    def __init__(self, network: nn.Module, masking_branch: bool, store: bool = False) -> None:
        self.network, self.masking_branch, self.store = network, masking_branch, store
        self.discarded: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []

    def __call__(self, engine: Engine) -> None:
        if self.masking_branch and engine.amp and engine.scaler is not None:
            engine.scaler.unscale_(engine.optimizer)  # no scaler on CPU: this branch's AMP part is a no-op here
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), RELEASED_CLIP)
        if not self.masking_branch:
            return
        masks = released_masking(self.network, RELEASED_GAMMA, self.discarded, store=self.store)
        for name, param in self.network.named_parameters():
            if name in masks:
                param.grad.mul_(masks[name])


def _train(tiny_dynunet, loss_factory, foundation, data, attach) -> dict[str, torch.Tensor]:
    """2 epochs x 2 iterations from ``foundation`` with nnU-Net's SGD; ``attach(trainer, net)`` adds the method."""
    net = tiny_dynunet()
    net.load_state_dict(foundation)
    trainer = fixed_data_trainer(net, loss_factory(), data, max_epochs=2)
    attach(trainer, net)
    trainer.run()
    return snapshot(net)


@pytest.fixture
def setup(tiny_dynunet):
    return {k: v.clone() for k, v in tiny_dynunet().state_dict().items()}, patches(2)


def _full(trainer: SupervisedTrainer, net: nn.Module) -> None:
    DGSTHandler(method="full", clip_grad_norm=RELEASED_CLIP).attach(trainer)


@pytest.mark.parametrize("masking_branch", [True, False], ids=["cuda-amp-branch", "other-branch"])
def test_released_trainer_as_published_equals_full_bit_for_bit(
    masking_branch, setup, tiny_dynunet, loss_factory, reference_mask
):
    """Released DGST (masks computed, never returned) and full end with bit-identical weights."""
    foundation, data = setup
    steps: list[ReleasedStep] = []

    def released(trainer: SupervisedTrainer, net: nn.Module) -> None:
        steps.append(ReleasedStep(net, masking_branch))
        trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, steps[0])

    weights = _train(tiny_dynunet, loss_factory, foundation, data, released)
    expected = _train(tiny_dynunet, loss_factory, foundation, data, _full)
    assert any(not torch.equal(expected[n], foundation[n]) for n in expected)
    for name in expected:
        assert torch.equal(weights[name], expected[name]), name

    discarded = steps[0].discarded
    assert len(discarded) == (4 if masking_branch else 0)
    for masks in discarded:  # what was thrown away: gamma entries per row, the top-|grad| ones
        assert masks
        for name, (grad, mask) in masks.items():
            rows = mask.view(mask.shape[0], -1)
            assert torch.equal(rows.sum(1), torch.full((rows.shape[0],), float(RELEASED_GAMMA))), name
            assert torch.equal(mask.bool(), reference_mask(grad, RELEASED_GAMMA, "filter")), name


def test_returning_the_masks_would_have_changed_the_training(setup, tiny_dynunet, loss_factory):
    """The same masking path with the masks returned gives other weights than full: the check above can fail."""
    foundation, data = setup

    steps: list[ReleasedStep] = []

    def storing(trainer: SupervisedTrainer, net: nn.Module) -> None:
        steps.append(ReleasedStep(net, masking_branch=True, store=True))
        trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, steps[0])

    weights = _train(tiny_dynunet, loss_factory, foundation, data, storing)
    expected = _train(tiny_dynunet, loss_factory, foundation, data, _full)
    masked = set(steps[0].discarded[0])
    assert masked and all(not torch.equal(weights[n], expected[n]) for n in masked)
