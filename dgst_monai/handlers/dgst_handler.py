"""Ignite handler that fine-tunes a MONAI ``SupervisedTrainer``'s network with one of the registry's methods."""

from __future__ import annotations

import logging

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dgst_monai.methods import FineTuningMethod, SelectionOptions, get_method, make_selector
from dgst_monai.sparsity import UPDATE_MODES, Grouping, Selector, SparseUpdate, UpdateMode


class DGSTHandler:
    """Dynamic Gradient Sparsification Training (and the paper's other fine-tuning methods) for a trainer.

    When the run starts, the method's frozen parameters get ``requires_grad=False``. At every iteration, after
    ``backward()`` (``IterationEvents.BACKWARD_COMPLETED``): unscale the gradients under AMP, clip their global
    norm, select the entries to update and mask the gradients (and, in strict mode, snapshot the kernels);
    after ``optimizer.step()`` (``IterationEvents.MODEL_COMPLETED``) restore the unselected entries. The order
    is the released trainer's: backward, unscale, clip, mask, step.

    Under DistributedDataParallel the gradients are already all-reduced at ``BACKWARD_COMPLETED``, so every
    rank selects the same entries (DRST draws from the same seeded generator on every rank). Freeze before
    wrapping: ``dgst_monai.apply_method(network, method)`` before ``DistributedDataParallel(network)``.

    Args:
        method: a name from ``dgst_monai.METHODS`` (``dgst``, ``full``, ``bias``, ...).
        gamma: entries kept per group for ``dgst`` / ``drst`` / ``sgst``.
        update: ``"strict"`` (Eq. 5 exactly: unselected entries bit-identical after the step) or
            ``"gradient"`` (gradient masking only, the released trainer's intent).
        grouping: ``"filter"`` (per output filter, released trainer) or ``"kernel"`` (per k^3 kernel).
        clip_grad_norm: max global gradient norm before masking (nnU-Net: 12); None disables clipping.
        seed: DRST random seed.
        warmup_steps: SGST steps over which gradients are accumulated before the selection is frozen.
        network: the network to act on; by default the engine's ``network``.

    Example::

        trainer = SupervisedTrainer(device, max_epochs=50, train_data_loader=loader, network=net,
                                    optimizer=opt, loss_function=loss)
        DGSTHandler(method="dgst", gamma=1, update="strict").attach(trainer)
        trainer.run()
    """

    def __init__(
        self,
        method: str = "dgst",
        gamma: int = 1,
        update: UpdateMode = "strict",
        grouping: Grouping = "filter",
        clip_grad_norm: float | None = 12.0,
        seed: int = 0,
        warmup_steps: int = 10,
        network: nn.Module | None = None,
    ) -> None:
        self.method: FineTuningMethod = get_method(method)
        self.options = SelectionOptions(gamma=gamma, grouping=grouping, seed=seed, warmup_steps=warmup_steps)
        if update not in UPDATE_MODES:
            raise ValueError(f"update must be one of {UPDATE_MODES}, got {update!r}")
        if clip_grad_norm is not None and clip_grad_norm <= 0:
            raise ValueError(f"clip_grad_norm must be positive or None, got {clip_grad_norm}")
        self.update: UpdateMode = update
        self.clip_grad_norm = clip_grad_norm
        self.network = network
        self.logger = logging.getLogger(__name__)
        self._selector: Selector | None = None
        self._sparse_update: SparseUpdate | None = None
        self._kept: torch.Tensor | None = None  # entries updated at the last step, on the device
        self._trainable: list[nn.Parameter] = []
        self._total = 0

    def attach(self, engine: Engine) -> None:
        """Register the callbacks on ``engine``; the method is applied when the run starts."""
        if getattr(engine, "accumulation_steps", 1) > 1:
            raise ValueError("DGSTHandler selects per optimizer step; gradient accumulation is not supported")
        # a MONAI Workflow attaches handlers before it stores its network, so resolve it at start
        engine.add_event_handler(Events.STARTED, self._setup)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)
        engine.add_event_handler(IterationEvents.MODEL_COMPLETED, self._after_step)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._log_fraction)

    def _setup(self, engine: Engine) -> None:
        network = self.network if self.network is not None else getattr(engine, "network", None)
        if network is None:
            raise ValueError("DGSTHandler needs a network: pass network=... or attach to a MONAI SupervisedTrainer")
        self._freeze(network)
        params = dict(network.named_parameters())
        self._trainable = [p for p in params.values() if p.requires_grad]
        self._total = sum(p.numel() for p in params.values())
        self._selector = make_selector(self.method, network, self.options)
        if self._selector is not None:
            self._sparse_update = SparseUpdate(params, self._selector.sparse, self.update)

    def _freeze(self, network: nn.Module) -> None:
        wanted = self.method.trainable(network)
        params = dict(network.named_parameters())
        if isinstance(network, DistributedDataParallel):
            # DDP registered its trainable set at construction; changing requires_grad now would hang the reducer
            if any(params[n].requires_grad != w for n, w in wanted.items()):
                raise ValueError(
                    f"the network is wrapped in DistributedDataParallel with a trainable set that differs from "
                    f"method {self.method.name!r}: call dgst_monai.apply_method(network, {self.method.name!r}) "
                    "before wrapping it"
                )
            return
        for name, flag in wanted.items():
            params[name].requires_grad_(flag)

    def __call__(self, engine: Engine) -> None:
        """After backward: unscale (AMP), clip, select and mask."""
        scaler = getattr(engine, "scaler", None)
        if getattr(engine, "amp", False) and scaler is not None:
            scaler.unscale_(engine.optimizer)  # the scaler remembers it and will not unscale again in step()
        if self.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self._trainable, self.clip_grad_norm)
        if self._selector is None or self._sparse_update is None:
            return
        masks = self._selector()
        self._sparse_update.before_step(masks)
        # a device scalar, so no host sync here and no masks kept alive between steps
        self._kept = torch.stack([m.sum() for m in masks.values()]).sum()

    def _after_step(self, engine: Engine) -> None:
        if self._sparse_update is not None:
            self._sparse_update.after_step()

    def updated_fraction(self) -> float:
        """Fraction of all parameter entries updated at the last step (one host sync: call it rarely)."""
        if self._kept is None:
            return sum(p.numel() for p in self._trainable) / max(self._total, 1)
        return float(self._kept) / max(self._total, 1)

    def _log_fraction(self, engine: Engine) -> None:
        fraction = self.updated_fraction()
        engine.state.metrics["updated_fraction"] = fraction
        self.logger.info(f"{self.method.label}: {fraction:.6%} of parameter entries updated per step")
