"""SGST's calibration and the DRST / SGST selection state inside a real monai.engines.SupervisedTrainer.

Everything but the selector is deterministic here: fixed in-memory patches, no shuffling, no augmentation, CPU,
one thread. So an interrupted and resumed run can be compared bit for bit with an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import fixed_data_trainer, patches, snapshot
from monai.engines import SupervisedTrainer
from monai.handlers import LrScheduleHandler

from dgst_monai import DGSTHandler
from dgst_monai.handlers.training_state import TrainingStateCheckpoint, latest_training_state

EPOCHS, INTERRUPT = 3, 1  # the uninterrupted run's length and the epoch after which the other one stops


class Run:
    """One fine-tuning run built from scratch: network from the foundation weights, nnU-Net's SGD, a poly lr
    schedule, TrainingStateCheckpoint, LrScheduleHandler and a DGSTHandler, in a SupervisedTrainer."""

    def __init__(
        self,
        build_net,
        loss_factory,
        foundation: dict[str, torch.Tensor],
        data: list[dict[str, torch.Tensor]],
        ckpt_dir: Path,
        *,
        method: str,
        max_epochs: int,
        resume: bool = False,
        save_handler: bool = True,
        handler_first: bool = False,
    ) -> None:
        self.net = build_net()
        self.net.load_state_dict(foundation)
        self.trainer = fixed_data_trainer(self.net, loss_factory(), data, max_epochs)
        optimizer = self.trainer.optimizer
        scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=EPOCHS, power=0.9)
        self.handler = DGSTHandler(method=method, gamma=1, warmup_steps=3, seed=4)
        save_dict = {"model": self.net, "optimizer": optimizer, "lr_scheduler": scheduler}
        if save_handler:
            save_dict["dgst"] = self.handler
        handlers = [
            TrainingStateCheckpoint(ckpt_dir, save_dict, resume=resume),
            LrScheduleHandler(scheduler, print_lr=False),
            self.handler,
        ]
        if handler_first:  # the handler's setup then runs before the state is loaded
            handlers = handlers[-1:] + handlers[:-1]
        for handler in handlers:
            handler.attach(self.trainer)
        self.backward_passes = 0
        first = next(p for p in self.net.parameters())
        first.register_hook(self._count)

    def _count(self, grad: torch.Tensor) -> torch.Tensor:
        self.backward_passes += 1
        return grad

    def run(self) -> Run:
        self.trainer.run()
        return self

    def weights(self) -> dict[str, torch.Tensor]:
        return snapshot(self.net)


@pytest.fixture
def foundation(tiny_dynunet) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tiny_dynunet().state_dict().items()}


@pytest.mark.parametrize("handler_first", [False, True], ids=["state-first", "handler-first"])
@pytest.mark.parametrize("method", ["drst", "sgst"])
def test_interrupted_and_resumed_run_ends_bit_identical(
    method, handler_first, tiny_dynunet, loss_factory, foundation, tmp_path
):
    """A run stopped after 1 epoch and resumed with new objects through TrainingStateCheckpoint(resume=True)
    ends with the uninterrupted run's weights, bit for bit; SGST does not calibrate again on resuming."""
    data = patches(2)
    common = dict(method=method, handler_first=handler_first)
    whole = Run(tiny_dynunet, loss_factory, foundation, data, tmp_path / "whole", max_epochs=EPOCHS, **common).run()
    first = Run(tiny_dynunet, loss_factory, foundation, data, tmp_path / "cut", max_epochs=INTERRUPT, **common).run()
    after_cut = first.weights()
    resumed = Run(
        tiny_dynunet, loss_factory, foundation, data, tmp_path / "cut", max_epochs=EPOCHS, resume=True, **common
    ).run()

    calibration = 3 if method == "sgst" else 0
    assert whole.backward_passes == calibration + EPOCHS * len(data)
    assert first.backward_passes == calibration + INTERRUPT * len(data)
    assert resumed.backward_passes == (EPOCHS - INTERRUPT) * len(data)  # training only: no new calibration
    final, expected = resumed.weights(), whole.weights()
    assert any(not torch.equal(final[n], after_cut[n]) for n in final)  # the resumed epochs did train
    for name in expected:
        assert torch.equal(final[name], expected[name]), name

    state = torch.load(latest_training_state(tmp_path / "cut"), weights_only=True)["dgst"]
    assert state["steps"] == EPOCHS * len(data) and state["settings"]["method"] == method
    if method == "sgst":
        assert state["selector"]["steps"] == 3 and state["selector"]["masks"]
        assert all(m.dtype == torch.bool for m in state["selector"]["masks"].values())
    else:
        assert state["selector"]["generators"]["cpu"].dtype == torch.uint8


@pytest.mark.parametrize("method", ["drst", "sgst"])
def test_resume_without_the_handler_state_is_refused(method, tiny_dynunet, loss_factory, foundation, tmp_path):
    """Resuming a DRST / SGST run whose training state lacks the handler raises instead of selecting anew."""
    data = patches(2)
    common = dict(method=method, save_handler=False)
    saved = Run(tiny_dynunet, loss_factory, foundation, data, tmp_path, max_epochs=1, **common).run().weights()
    resumed = Run(tiny_dynunet, loss_factory, foundation, data, tmp_path, max_epochs=2, resume=True, **common)
    with pytest.raises(RuntimeError, match="save_dict"):
        resumed.run()
    # stopped right after loading: no calibration, no update
    assert resumed.backward_passes == 0
    assert all(torch.equal(p, saved[n]) for n, p in resumed.net.named_parameters())


def test_state_from_other_settings_is_refused():
    """A handler state saved with another seed (or method) does not load: the resumed run would be another run."""
    saved = DGSTHandler(method="drst", seed=1).state_dict()
    assert DGSTHandler(method="drst", seed=1).load_state_dict(saved) is None
    for other in (DGSTHandler(method="drst", seed=2), DGSTHandler(method="sgst", seed=1)):
        with pytest.raises(ValueError, match="settings of the interrupted run"):
            other.load_state_dict(saved)


# ---------------------------------------------------------------- non-finite calibration batches


def _sgst_run(net, loss_factory, data, **handler_kwargs) -> tuple[SupervisedTrainer, DGSTHandler]:
    trainer = fixed_data_trainer(net, loss_factory(), data, max_epochs=1)
    handler = DGSTHandler(method="sgst", **handler_kwargs)
    handler.attach(trainer)
    return trainer, handler


def _poison(param: torch.Tensor, calls: set[int]) -> None:
    """Make the gradient of ``param`` infinite at the given backward passes (1-based), as an AMP overflow does."""
    count = [0]

    def hook(grad: torch.Tensor) -> torch.Tensor:
        count[0] += 1
        return torch.full_like(grad, float("inf")) if count[0] in calls else grad

    param.register_hook(hook)


def test_a_non_finite_calibration_batch_is_not_counted(tiny_dynunet, loss_factory, foundation):
    """SGST with an inf gradient injected at the 2nd calibration batch of (a, b, c) ends with the count, sums and
    mask of a run on (a, c): the batch is neither accumulated nor counted."""
    a, b, c = patches(3)
    states = {}
    runs = (("poisoned", [a, b, c], {2}), ("without_b", [a, c], set()), ("with_b", [a, b, c], set()))
    for key, data, poisoned in runs:
        net = tiny_dynunet()
        net.load_state_dict(foundation)
        if poisoned:
            _poison(net.downsamples[0].conv1.conv.weight, poisoned)
        trainer, handler = _sgst_run(net, loss_factory, data, warmup_steps=2)
        trainer.run()
        states[key] = handler.state_dict()["selector"]
        assert all(torch.isfinite(p).all() for p in net.parameters()), key

    poisoned, without_b, with_b = states["poisoned"], states["without_b"], states["with_b"]
    assert poisoned["steps"] == without_b["steps"] == 2
    assert poisoned["sums"].keys() == without_b["sums"].keys()
    for name, total in poisoned["sums"].items():
        assert torch.equal(total, without_b["sums"][name]), name
        assert torch.equal(poisoned["masks"][name], without_b["masks"][name]), name
    assert any(not torch.equal(with_b["sums"][n], poisoned["sums"][n]) for n in with_b["sums"])  # b would count


def test_calibration_that_never_gets_finite_gradients_stops_with_a_clear_error(tiny_dynunet, loss_factory):
    """Every calibration gradient infinite: the run stops before any update with an error saying so."""
    net = tiny_dynunet()
    before = snapshot(net)
    _poison(net.downsamples[0].conv1.conv.weight, set(range(1, 100)))
    trainer, _ = _sgst_run(net, loss_factory, patches(2), warmup_steps=2)
    with pytest.raises(RuntimeError, match="17 batches had non-finite gradients"):
        trainer.run()
    assert trainer.state.iteration == 0
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in net.named_parameters())
