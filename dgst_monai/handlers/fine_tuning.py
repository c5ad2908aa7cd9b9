"""Ignite handler that fine-tunes a MONAI ``SupervisedTrainer``'s network with one of the registry's methods.

:class:`FineTuningHandler` is the one handler of every method: DGST, its sparse baselines (DRST, SGST) and the
dense ones (full, bias, LoRA, ...) differ only in the registry entry it is given. ``DGSTHandler`` is another
name for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dgst_monai.methods import FineTuningMethod, SelectionOptions, get_method, make_selector
from dgst_monai.sparsity import UPDATE_MODES, AccumulatedGradientSelector, Grouping, Selector, SparseUpdate, UpdateMode

#: what SGST's calibration uses of the trainer: the same batches, forward and loss as its training steps
_TRAINER_PARTS = ("data_loader", "prepare_batch", "inferer", "loss_function", "network")


class FineTuningHandler:
    """One fine-tuning method of the registry (DGST, its sparse and dense baselines) on a trainer.

    The network is frozen for the method once, before the optimizer and DistributedDataParallel are built:
    ``dgst_monai.apply_method(network, method)`` (the bundles' ``local_network``). When the run starts, the
    handler checks that the network's trainable set is the method's and, for a network nobody prepared (a plain
    method used from Python), sets it itself. At every iteration, after ``backward()``
    (``IterationEvents.BACKWARD_COMPLETED``): unscale the gradients under AMP, clip their global norm
    (``clip_grad_norm``, for every method: the released nnU-Net trainer clips at 12 whatever it trains), and for
    a sparsification method select the entries to update and mask the gradients (and, in strict mode, snapshot
    the kernels); after ``optimizer.step()`` (``IterationEvents.MODEL_COMPLETED``) restore the unselected
    entries. The order is the released trainer's: backward, unscale, clip, mask, step.

    SGST chooses its one static mask before the first update: at the run's first ``Events.EPOCH_STARTED``
    (after every ``Events.STARTED`` handler, so after any resume or foundation-weight loading, whatever the
    handler order) it accumulates |gradient| over ``warmup_steps`` batches of the trainer's own data loader,
    ``prepare_batch``, inferer and loss (under AMP, in the trainer's autocast), without any optimizer or
    scheduler step; see :class:`~dgst_monai.sparsity.AccumulatedGradientSelector`. A resumed state that holds
    the frozen mask skips this.

    The handler has ``state_dict()`` / ``load_state_dict()``: put it in the training-state checkpoint's
    ``save_dict`` (e.g. ``TrainingStateCheckpoint(dir, {"model": net, ..., "dgst": handler}, resume=True)``)
    and a resumed DRST run continues its random stream, a resumed SGST run keeps its mask. The state loads with
    ``torch.load(..., weights_only=True)``; it may be loaded before the run starts and is applied when the
    handler sets up. A DRST / SGST run that starts at a later iteration than the handler's own state (a resume
    that did not restore it) is an error rather than a silently different selection.

    Under DistributedDataParallel the gradients are already all-reduced at ``BACKWARD_COMPLETED``, so every
    rank selects the same entries (DRST draws from the same seeded generator on every rank; SGST accumulates
    the all-reduced calibration gradients). Freeze before wrapping: ``dgst_monai.apply_method(network, method)``
    before ``DistributedDataParallel(network)``; DDP registers its trainable set once, so the handler then only
    checks it.

    Args:
        method: a name from ``dgst_monai.METHODS`` (``dgst``, ``full``, ``bias``, ...) or the registry entry
            itself (a bundle resolves ``method_def`` once and hands it to the network and the handler).
        gamma: entries kept per group for ``dgst`` / ``drst`` / ``sgst``.
        update: ``"strict"`` (Eq. 5 exactly: unselected entries bit-identical after the step) or
            ``"gradient"`` (gradient masking only, the released trainer's intent).
        grouping: ``"filter"`` (per output filter, released trainer) or ``"kernel"`` (per k^3 kernel).
        clip_grad_norm: max global gradient norm before masking (nnU-Net: 12); None disables clipping. SGST's
            calibration gradients are not clipped (no update is made).
        seed: DRST random seed.
        warmup_steps: SGST calibration batches (with finite gradients) accumulated before training.
        network: the network to act on; by default the engine's ``network``.

    Example::

        net = dgst_monai.apply_method(net, "sgst")  # before the optimizer (and before DDP)
        opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
        trainer = SupervisedTrainer(device, max_epochs=50, train_data_loader=loader, network=net,
                                    optimizer=opt, loss_function=loss)
        handler = FineTuningHandler(method="sgst", gamma=1, update="strict")
        handler.attach(trainer)
        TrainingStateCheckpoint("runs/models", {"model": net, "optimizer": opt, "dgst": handler},
                                resume=False).attach(trainer)
        trainer.run()
    """

    def __init__(
        self,
        method: str | FineTuningMethod = "dgst",
        gamma: int = 1,
        update: UpdateMode = "strict",
        grouping: Grouping = "filter",
        clip_grad_norm: float | None = 12.0,
        seed: int = 0,
        warmup_steps: int = 10,
        network: nn.Module | None = None,
    ) -> None:
        self.method: FineTuningMethod = method if isinstance(method, FineTuningMethod) else get_method(method)
        self.options = SelectionOptions(gamma=gamma, grouping=grouping, seed=seed, warmup_steps=warmup_steps)
        if update not in UPDATE_MODES:
            raise ValueError(f"update must be one of {UPDATE_MODES}, got {update!r}")
        if clip_grad_norm is not None and clip_grad_norm <= 0:
            raise ValueError(f"clip_grad_norm must be positive or None, got {clip_grad_norm}")
        self.update: UpdateMode = update
        self.clip_grad_norm = clip_grad_norm
        self.network = network
        self.logger = logging.getLogger(__name__)
        self._network: nn.Module | None = None  # the network the selector was built for
        self._selector: Selector | None = None
        self._sparse_update: SparseUpdate | None = None
        self._kept: torch.Tensor | None = None  # entries updated at the last step, on the device
        self._trainable: list[nn.Parameter] = []
        self._total = 0
        self._steps = 0  # selections made (one per optimizer step), saved with the state
        self._pending: dict[str, Any] | None = None  # a state loaded before setup
        self._checked_start = False

    def attach(self, engine: Engine) -> None:
        """Register the callbacks on ``engine``; the method is applied when the run starts."""
        if getattr(engine, "accumulation_steps", 1) > 1:
            raise ValueError("FineTuningHandler selects per optimizer step; gradient accumulation is not supported")
        # a MONAI Workflow attaches handlers before it stores its network, so resolve it at start
        engine.add_event_handler(Events.STARTED, self._setup)
        # EPOCH_STARTED comes after every STARTED handler (resume / foundation loading) and before any step
        engine.add_event_handler(Events.EPOCH_STARTED, self._before_first_update)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)
        engine.add_event_handler(IterationEvents.MODEL_COMPLETED, self._after_step)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._log_fraction)

    def _setup(self, engine: Engine) -> None:
        self._checked_start = False
        network = self.network if self.network is not None else getattr(engine, "network", None)
        if network is None:
            raise ValueError(
                "FineTuningHandler needs a network: pass network=... or attach to a MONAI SupervisedTrainer"
            )
        # a trainer built with compile=True (the bundles' --compile) holds torch.compile's wrapper: select on the
        # module it wraps (the same parameters, under their own names)
        network = getattr(network, "_orig_mod", network)
        self._check_trainable(network)
        if self._network is not network:  # a second run() of the same trainer keeps the selection state
            params = dict(network.named_parameters())
            self._trainable = [p for p in params.values() if p.requires_grad]
            self._total = sum(p.numel() for p in params.values())
            self._selector = make_selector(self.method, network, self.options)
            self._sparse_update = None
            if self._selector is not None:
                self._sparse_update = SparseUpdate(params, self._selector.sparse, self.update)
            self._network = network
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._apply_state(pending)

    def _check_trainable(self, network: nn.Module) -> None:
        wanted = self.method.trainable(network)
        params = dict(network.named_parameters())
        differing = [n for n, w in wanted.items() if params[n].requires_grad != w]
        if not differing:  # prepared by apply_method, as the bundles do
            return
        if isinstance(network, DistributedDataParallel):
            # DDP registered its trainable set at construction; changing requires_grad now would hang the reducer
            raise ValueError(
                f"the network is wrapped in DistributedDataParallel with a trainable set that differs from "
                f"method {self.method.name!r}: call dgst_monai.apply_method(network, {self.method.name!r}) "
                "before wrapping it"
            )
        for name in differing:
            params[name].requires_grad_(wanted[name])

    def _before_first_update(self, engine: Engine) -> None:
        if self._checked_start:
            return
        self._checked_start = True
        selector = self._selector
        if selector is None:
            return
        if selector.stateful and engine.state.iteration != self._steps:
            raise RuntimeError(
                f"{self.method.label} continues its selection from step {self._steps} but the trainer starts at "
                f"iteration {engine.state.iteration}: a resumed run needs the handler's state, so put the "
                "FineTuningHandler in the training-state checkpoint's save_dict (e.g. save_dict={..., 'dgst': handler})"
            )
        if isinstance(selector, AccumulatedGradientSelector) and not selector.calibrated:
            self._calibrate(engine, selector)

    def _calibrate(self, engine: Engine, selector: AccumulatedGradientSelector) -> None:
        missing = [part for part in _TRAINER_PARTS if getattr(engine, part, None) is None]
        if missing:
            raise ValueError(
                f"SGST calibrates on the trainer's own batches, forward and loss: {type(engine).__name__} has no "
                f"{', '.join(missing)} (attach the handler to a monai.engines.SupervisedTrainer)"
            )
        # the same condition, autocast and loss scale as SupervisedTrainer's training step
        amp = bool(getattr(engine, "amp", False)) and getattr(engine, "scaler", None) is not None
        loss_scale = float(engine.scaler.get_scale()) if amp else 1.0

        def loss_of(batchdata: Any) -> torch.Tensor:
            batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
            inputs, targets, args, kwargs = batch if len(batch) == 4 else (*batch, (), {})
            autocast = torch.autocast("cuda", **engine.amp_kwargs) if amp else contextlib.nullcontext()
            with autocast:
                prediction = engine.inferer(inputs, engine.network, *args, **kwargs)
                return engine.loss_function(prediction, targets).mean()

        engine.network.train()
        skipped = selector.calibrate(loss_of, _repeat(engine.data_loader), loss_scale=loss_scale)
        self.logger.info(
            f"SGST: mask frozen from |gradient| summed over {selector.steps} calibration batches at the starting "
            f"weights ({skipped} non-finite batches skipped)"
        )

    def __call__(self, engine: Engine) -> None:
        """After backward: unscale (AMP), clip, select and mask."""
        scaler = getattr(engine, "scaler", None)
        if getattr(engine, "amp", False) and scaler is not None:
            scaler.unscale_(engine.optimizer)  # the scaler remembers it and will not unscale again in step()
        if self.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self._trainable, self.clip_grad_norm)
        self._steps += 1
        if self._selector is None or self._sparse_update is None:
            return
        masks = self._selector()
        self._sparse_update.before_step(masks)
        # a device scalar, so no host sync here and no masks kept alive between steps
        self._kept = torch.stack([m.sum() for m in masks.values()]).sum()

    def _after_step(self, engine: Engine) -> None:
        if self._sparse_update is not None:
            self._sparse_update.after_step()

    # ------------------------------------------------------------------ state for resuming

    def _settings(self) -> dict[str, Any]:
        """What must be equal for a saved state to continue this handler's selection."""
        settings: dict[str, Any] = {"method": self.method.name}
        if self.method.selector is not None:
            settings.update(dataclasses.asdict(self.options), update=self.update)
        return settings

    def state_dict(self) -> dict[str, Any]:
        """``{"settings": {...}, "steps": int, "selector": {...}}``: the selection state a resume needs (DRST's
        generator, SGST's sums, count and frozen mask); only tensors, ints, strings and dicts."""
        if self._pending is not None:  # loaded and not applied yet: that is still the state
            return dict(self._pending)
        selector = {} if self._selector is None else self._selector.state_dict()
        return {"settings": self._settings(), "steps": self._steps, "selector": selector}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict`); before the run starts it is kept and applied when
        the handler sets up.

        Raises:
            ValueError: the state was saved with another method or other selection settings.
        """
        missing = {"settings", "steps", "selector"} - set(state)
        if missing:
            raise ValueError(f"FineTuningHandler state lacks {sorted(missing)} (keys: {sorted(state)})")
        if dict(state["settings"]) != self._settings():
            raise ValueError(
                f"the training state was saved by FineTuningHandler with {dict(state['settings'])}, this handler has "
                f"{self._settings()}: resume with the settings of the interrupted run"
            )
        if self._network is None:
            self._pending = dict(state)
        else:
            self._apply_state(state)

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        selector = self._selector
        # a state saved before any step may have no selector part; a later one must have it (load raises)
        if selector is not None and (state["selector"] or (selector.stateful and state["steps"])):
            selector.load_state_dict(state["selector"])
        self._steps = int(state["steps"])

    # ------------------------------------------------------------------ reporting

    def updated_fraction(self) -> float:
        """Fraction of all parameter entries updated at the last step (one host sync: call it rarely)."""
        if self._kept is None:
            return sum(p.numel() for p in self._trainable) / max(self._total, 1)
        return float(self._kept) / max(self._total, 1)

    def _log_fraction(self, engine: Engine) -> None:
        fraction = self.updated_fraction()
        engine.state.metrics["updated_fraction"] = fraction
        self.logger.info(f"{self.method.label}: {fraction:.6%} of parameter entries updated per step")


#: The same handler under the paper's name: ``dgst_monai.handlers.DGSTHandler`` in a config or in code is a
#: :class:`FineTuningHandler`.
DGSTHandler = FineTuningHandler


def _repeat(loader: Iterable[Any]) -> Iterator[Any]:
    """The loader's batches, pass after pass (SGST may need more batches than one epoch has); ends if it is empty."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            return
