"""Dynamic Gradient Sparsification Training (DGST) core: top-gamma selection and the strict sparse update.

Pure PyTorch; knows nothing of Ignite or MONAI. Eq. 5 of Luo et al. (MICCAI 2025):
``theta_i <- theta_i - eta * g_i`` if entry i is among the top-gamma entries of its group by |g|, else
``theta_i`` unchanged. Kernels (conv, transposed-conv, linear weights outside the segmentation heads) are
sparsified; biases, normalization affines, other parameters and the heads are always updated whole.

Two readings of "group":
    * ``"filter"`` (default, the authors' released trainer): one row per leading index of the weight,
      ``grad.view(shape[0], -1)`` - one output filter of a Conv3d, one *input* channel of a ConvTranspose3d.
    * ``"kernel"`` (the paper's wording): one row per k^3 kernel, i.e. per (dim0, dim1) pair. A linear or
      1x1x1 weight has one entry per kernel, so this keeps all of it.

Two update modes:
    * ``"strict"``: Eq. 5 exactly. Unselected entries are snapshotted before ``optimizer.step()`` and restored
      after it, so they are bit-identical whatever the optimizer does (momentum, weight decay, Adam moments).
      Optimizer state keeps running for them; only the parameter is held.
    * ``"gradient"``: only the gradient is masked, as the released trainer intends. With momentum or weight
      decay unselected entries still move.

Three selectors: :class:`GradientSelector` (DGST, the current |g|), :class:`RandomSelector` (DRST, a seeded
random draw per step) and :class:`AccumulatedGradientSelector` (SGST: one static mask from |g| summed over
calibration batches at the foundation weights, before the first update). The state DRST and SGST need to
resume (generator state; sums, count and mask) round-trips through ``state_dict()`` / ``load_state_dict()``.

Everything in the per-iteration path stays on the parameters' device: no ``.item()``, ``.cpu()`` or
``.tolist()``, no Python loop over rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from dgst_monai.roles import ParameterInfo, describe_parameters

Grouping = Literal["filter", "kernel"]
UpdateMode = Literal["strict", "gradient"]
GROUPINGS: tuple[str, ...] = ("filter", "kernel")
UPDATE_MODES: tuple[str, ...] = ("strict", "gradient")


def group_rows(tensor: torch.Tensor, grouping: Grouping) -> torch.Tensor:
    """View ``tensor`` as ``(groups, entries_per_group)`` for the given grouping (no copy)."""
    if grouping == "filter" or tensor.dim() < 2:
        return tensor.reshape(tensor.shape[0], -1)
    if grouping == "kernel":
        return tensor.reshape(-1, math.prod(tensor.shape[2:]))
    raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")


def top_gamma_mask(scores: torch.Tensor, gamma: int) -> torch.Tensor:
    """Boolean mask of ``scores``' shape, True at the ``gamma`` largest entries of each row.

    Ties resolve to the lower index for gamma 1 (``max``); a row shorter than gamma is kept whole.
    """
    if scores.shape[1] <= gamma:
        return torch.ones_like(scores, dtype=torch.bool)
    # max(1) is the fastest selector for gamma 1: 0.023 s vs 0.031 s for topk(1) on the gradients of an nnU-Net-sized
    # network on a 2-core CPU (benchmarks/RESULTS.md has the measured selection costs)
    index = scores.max(dim=1, keepdim=True).indices if gamma == 1 else scores.topk(gamma, dim=1, sorted=False).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, index, True)


def check_gamma(gamma: int) -> int:
    if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
        raise ValueError(f"gamma must be an integer >= 1 (entries kept per group), got {gamma!r}")
    return gamma


def check_count(name: str, value: int, minimum: int = 1) -> int:
    """``value`` if it is an integer >= ``minimum`` (not a bool), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class Selector:
    """Chooses, at each optimizer step, which entries of each parameter are updated.

    Subclasses give a score per kernel entry (:meth:`scores`); the top-gamma entries of each group are kept.
    Parameters that are not kernels, or are inside a head, are always kept whole; frozen parameters
    (``requires_grad=False``) never.

    A selector whose choice depends on its history (DRST's random stream, SGST's calibration) says so with
    :attr:`stateful` and round-trips that history through :meth:`state_dict` / :meth:`load_state_dict`, so that
    a resumed run selects what an uninterrupted one does. The state holds only tensors, ints, strings, lists
    and dicts: it loads with ``torch.load(..., weights_only=True)``.

    Args:
        model: the network (may be wrapped in DistributedDataParallel).
        gamma: entries kept per group.
        grouping: ``"filter"`` or ``"kernel"``, see the module docstring.
        heads: extra modules to treat as segmentation heads.
    """

    #: whether :meth:`state_dict` holds anything a resume needs
    stateful: bool = False

    def __init__(
        self,
        model: nn.Module,
        gamma: int = 1,
        grouping: Grouping = "filter",
        heads: Iterable[nn.Module] | None = None,
    ) -> None:
        self.gamma = check_gamma(gamma)
        if grouping not in GROUPINGS:
            raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")
        self.grouping: Grouping = grouping
        self.infos: dict[str, ParameterInfo] = describe_parameters(model, heads)
        self.params: dict[str, nn.Parameter] = dict(model.named_parameters())
        self.sparse: dict[str, nn.Parameter] = {
            n: p for n, p in self.params.items() if p.requires_grad and self.is_sparse(self.infos[n])
        }
        if not self.sparse:
            kinds = sorted({i.kind for i in self.infos.values()})
            raise ValueError(
                f"{type(model).__name__} has no trainable conv / transposed-conv / linear weight outside its heads "
                f"to sparsify (parameter kinds found: {kinds})"
            )
        # masks of the parameters that are never sparsified do not change: build them once
        self._fixed: dict[str, torch.Tensor] = {
            n: torch.full_like(p, p.requires_grad, dtype=torch.bool)
            for n, p in self.params.items()
            if n not in self.sparse
        }

    @staticmethod
    def is_sparse(info: ParameterInfo) -> bool:
        return info.kind == "kernel" and not info.head

    def scores(self, name: str, param: nn.Parameter) -> torch.Tensor | None:
        """Score of each entry, same shape as ``param``; None if it cannot be scored (no gradient)."""
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self) -> dict[str, torch.Tensor]:
        """Masks for every parameter, True where the entry is updated at this step (read-only tensors)."""
        masks = dict(self._fixed)
        for name, param in self.sparse.items():
            scores = self.scores(name, param)
            if scores is None:
                masks[name] = torch.zeros_like(param, dtype=torch.bool)
                continue
            masks[name] = top_gamma_mask(group_rows(scores, self.grouping), self.gamma).view_as(param)
        return {name: masks[name] for name in self.params}

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs to continue this selection (empty for a stateless selector)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict` of a selector built with the same settings).

        Raises:
            ValueError: ``state`` does not fit this selector.
        """
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got one with keys {sorted(state)}")

    def _check_setting(self, state: Mapping[str, Any], key: str, value: Any) -> None:
        # a resume continues the same run: a changed setting would silently make it another run
        if key not in state:
            raise ValueError(f"{type(self).__name__} state has no {key!r} (keys: {sorted(state)})")
        if state[key] != value:
            raise ValueError(
                f"{type(self).__name__} state was saved with {key}={state[key]!r}, this selector has {key}={value!r}"
            )


class GradientSelector(Selector):
    """DGST: top-gamma entries by |current gradient| (Luo et al., Eq. 4)."""

    def scores(self, name: str, param: nn.Parameter) -> torch.Tensor | None:
        return None if param.grad is None else param.grad.abs()


class RandomSelector(Selector):
    """DRST: gamma entries per group drawn uniformly at random at every step, from a seeded generator.

    The same seed on every DDP rank draws the same entries. One generator per device of the parameters; its
    state is in :meth:`state_dict` (``{"seed": int, "generators": {device: ByteTensor}}``), so a resumed run
    draws the continuation of the uninterrupted run's stream.

    Example::

        selector = RandomSelector(net, gamma=1, seed=0)
        masks = selector()                     # one draw per step
        state = selector.state_dict()          # e.g. into the training-state checkpoint
        resumed = RandomSelector(net, gamma=1, seed=0)
        resumed.load_state_dict(state)         # resumed() == selector() from here on
    """

    stateful = True

    def __init__(self, model: nn.Module, gamma: int = 1, grouping: Grouping = "filter", seed: int = 0, **kw) -> None:
        super().__init__(model, gamma, grouping, **kw)
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}
        self._loaded: dict[str, torch.Tensor] = {}  # generator states loaded before that generator exists

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = self._generators[key] = torch.Generator(device).manual_seed(self.seed)
            if key in self._loaded:
                gen.set_state(self._loaded.pop(key))
        return gen

    def scores(self, name: str, param: nn.Parameter) -> torch.Tensor:
        return torch.rand(param.shape, generator=self._generator(param.device), device=param.device)

    def state_dict(self) -> dict[str, Any]:
        """``{"seed": int, "generators": {device string: generator state (CPU ByteTensor)}}``."""
        generators = dict(self._loaded)  # loaded and not drawn from yet: still the current state
        generators.update({key: gen.get_state() for key, gen in self._generators.items()})
        return {"seed": self.seed, "generators": generators}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the random stream saved in ``state``.

        Raises:
            ValueError: another seed, or generators of devices the parameters are not on.
        """
        self._check_setting(state, "seed", self.seed)
        generators = state.get("generators")
        if not isinstance(generators, Mapping):
            raise ValueError(f"RandomSelector state needs a 'generators' dict, got {type(generators).__name__}")
        devices = sorted({str(p.device) for p in self.sparse.values()})
        unknown = sorted(set(generators) - set(devices))
        if unknown:
            raise ValueError(f"DRST generator states saved for devices {unknown}; the parameters are on {devices}")
        self._generators.clear()
        # Generator.set_state takes a CPU ByteTensor whatever the device (map_location may have moved it)
        self._loaded = {key: value.detach().to("cpu", torch.uint8) for key, value in generators.items()}


class AccumulatedGradientSelector(Selector):
    """SGST: one static selection, the top-gamma entries by |gradient| accumulated at the foundation weights.

    :meth:`calibrate` runs ``warmup_steps`` calibration batches through the network *before the first update*
    and adds up, per entry, the absolute gradient of each: ``score_i = sum_b |g_i(b)|`` (a sum of magnitudes,
    so an entry whose gradient changes sign between batches still counts as sensitive; signed sums would
    cancel). Nothing is updated meanwhile: no optimizer step, and the network's buffers (e.g. batch-norm
    running statistics) are restored afterwards, so every batch sees the foundation weights. The top-gamma
    entries of each group of the sums are then frozen as the mask of every step, from the first to the last.

    The gradients are summed as the loss produces them, *not* clipped: global-norm clipping multiplies every
    entry of one batch by the same factor ``min(1, max_norm / ||g||)``, which keeps the ranking within a batch
    but down-weights large-gradient batches in the sum; with no update to protect there is nothing to clip.

    A batch whose gradients are not all finite (an AMP overflow that the scaler would skip) is neither added
    nor counted; under AMP (``loss_scale > 1``) the loss scale is then halved, as ``GradScaler`` backs off. More
    than ``max_nonfinite`` such batches is an error.

    The sums, the number of counted batches and the frozen mask are in :meth:`state_dict`, so a resumed run
    keeps the mask chosen at the foundation weights instead of calibrating again at the resumed ones.

    Args:
        model: the network.
        gamma: entries kept per group.
        grouping: ``"filter"`` or ``"kernel"``.
        warmup_steps: finite calibration batches accumulated before the mask is frozen.
        max_nonfinite: non-finite calibration batches tolerated (16 lets ``GradScaler``'s default initial scale
            2^16 back off to 1).
        heads: extra modules to treat as segmentation heads.

    Example::

        selector = AccumulatedGradientSelector(net, gamma=1, warmup_steps=10)
        selector.calibrate(lambda batch: loss_fn(net(batch["image"]), batch["label"]), loader)
        for batch in loader:                   # training: the same mask at every step
            optimizer.zero_grad(); loss_fn(net(batch["image"]), batch["label"]).backward()
            masks = selector()
            ...
    """

    stateful = True

    def __init__(
        self,
        model: nn.Module,
        gamma: int = 1,
        grouping: Grouping = "filter",
        warmup_steps: int = 10,
        max_nonfinite: int = 16,
        **kw,
    ) -> None:
        super().__init__(model, gamma, grouping, **kw)
        self.warmup_steps = check_count("warmup_steps", warmup_steps)
        self.max_nonfinite = check_count("max_nonfinite", max_nonfinite, minimum=0)
        self.steps = 0  # finite calibration batches accumulated so far
        self._buffers: dict[str, torch.Tensor] = dict(model.named_buffers())
        self._sums: dict[str, torch.Tensor] = {}
        self._masks: dict[str, torch.Tensor] | None = None

    @property
    def calibrated(self) -> bool:
        """Whether the mask is frozen (``warmup_steps`` finite batches accumulated)."""
        return self._masks is not None

    @property
    def sums(self) -> dict[str, torch.Tensor]:
        """``sum_b |g(b)|`` of each sparsified parameter that has had a gradient, by name."""
        return dict(self._sums)

    def scores(self, name: str, param: nn.Parameter) -> torch.Tensor | None:
        return self._sums.get(name)

    @torch.no_grad()
    def accumulate(self, loss_scale: float = 1.0) -> bool:
        """Add ``|grad| / loss_scale`` of the current gradients if they are all finite; freeze the mask at the
        ``warmup_steps``-th.

        Args:
            loss_scale: the factor the loss was multiplied by before ``backward()`` (AMP); 1 otherwise.

        Returns:
            Whether the batch was counted.

        Raises:
            RuntimeError: the mask is already frozen, or no parameter has a gradient.
        """
        if self.calibrated:
            raise RuntimeError("SGST's mask is already frozen: accumulate() is for calibration only")
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        if not grads:
            raise RuntimeError("no parameter has a gradient to accumulate: call backward() first")
        # one host sync per calibration batch; calibration is outside the training loop
        if not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            return False
        for name, param in self.sparse.items():
            if param.grad is None:
                continue
            magnitude = param.grad.detach().abs()
            if loss_scale != 1.0:
                magnitude.div_(loss_scale)  # exact: GradScaler's scales are powers of two
            if name in self._sums:
                self._sums[name].add_(magnitude)
            else:
                self._sums[name] = magnitude
        self.steps += 1
        if self.steps >= self.warmup_steps:
            self._masks = Selector.__call__(self)
        return True

    def calibrate(
        self, loss_of: Callable[[Any], torch.Tensor], batches: Iterable[Any], loss_scale: float = 1.0
    ) -> int:
        """Accumulate calibration batches until the mask is frozen; nothing is updated.

        For each batch: clear the gradients, ``(loss_of(batch) * scale).backward()``, :meth:`accumulate`. A
        resumed, partly calibrated selector only adds the missing batches. Afterwards the gradients are cleared
        (``grad = None``) and the buffers restored to their values before calibration.

        Args:
            loss_of: the training loss of one batch at the current weights (forward included).
            batches: calibration batches (e.g. the training loader, repeated if shorter than ``warmup_steps``).
            loss_scale: initial loss scale under AMP (e.g. ``GradScaler.get_scale()``); 1 without AMP.

        Returns:
            The number of non-finite batches skipped.

        Raises:
            ValueError: ``batches`` ran out before ``warmup_steps`` finite ones.
            RuntimeError: more than ``max_nonfinite`` batches had non-finite gradients.
        """
        saved = {name: buffer.detach().clone() for name, buffer in self._buffers.items()}
        scale, skipped = float(loss_scale), 0
        stream = iter(batches)
        try:
            while not self.calibrated:
                try:
                    batch = next(stream)
                except StopIteration:
                    raise ValueError(
                        f"SGST calibration needs {self.warmup_steps} batches with finite gradients; the data gave "
                        f"{self.steps} (and {skipped} non-finite)"
                    ) from None
                self._clear_grads()
                loss = loss_of(batch)
                (loss * scale if scale != 1.0 else loss).backward()
                if self.accumulate(scale):
                    continue
                skipped += 1
                if skipped > self.max_nonfinite:
                    raise RuntimeError(
                        f"SGST calibration: {skipped} batches had non-finite gradients (more than max_nonfinite="
                        f"{self.max_nonfinite}) with {self.steps} of {self.warmup_steps} finite; check the loss and "
                        "the foundation weights"
                    )
                if scale > 1.0:
                    scale /= 2.0
        finally:
            self._clear_grads()
            with torch.no_grad():
                for name, buffer in self._buffers.items():
                    buffer.copy_(saved[name])
        return skipped

    def _clear_grads(self) -> None:
        for param in self.params.values():
            param.grad = None

    def __call__(self) -> dict[str, torch.Tensor]:
        """The frozen masks (the same tensors at every step).

        Raises:
            RuntimeError: before calibration.
        """
        if self._masks is None:
            raise RuntimeError(
                f"SGST's mask is chosen before the first update, and only {self.steps} of {self.warmup_steps} "
                "calibration batches were accumulated: call calibrate() first (DGSTHandler does it when the run starts)"
            )
        return self._masks

    def state_dict(self) -> dict[str, Any]:
        """``{"warmup_steps", "steps", "sums": {name: tensor}, "masks": {name: BoolTensor}}`` (masks of the
        sparsified parameters, empty before the mask is frozen)."""
        masks = {} if self._masks is None else {n: self._masks[n] for n in self.sparse}
        return {"warmup_steps": self.warmup_steps, "steps": self.steps, "sums": dict(self._sums), "masks": masks}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``: the frozen mask if it has one, else the partial sums.

        Raises:
            ValueError: another ``warmup_steps``, or tensors that do not match the sparsified parameters.
        """
        self._check_setting(state, "warmup_steps", self.warmup_steps)
        steps, sums, masks = state.get("steps"), state.get("sums"), state.get("masks")
        if not isinstance(steps, int) or not isinstance(sums, Mapping) or not isinstance(masks, Mapping):
            raise ValueError(f"SGST state needs 'steps' (int), 'sums' and 'masks' (dicts); got keys {sorted(state)}")
        for kind, tensors in (("sums", sums), ("masks", masks)):
            for name, value in tensors.items():
                param = self.sparse.get(name)
                if param is None or tuple(value.shape) != tuple(param.shape):
                    raise ValueError(
                        f"SGST state {kind}[{name!r}] of shape {tuple(value.shape)} matches no sparsified parameter "
                        "of this network"
                    )
        if masks and set(masks) != set(self.sparse):
            raise ValueError(
                f"SGST state has masks for {len(masks)} parameters, the network sparsifies {len(self.sparse)}"
            )
        self.steps = steps
        self._sums = {n: v.detach().to(self.sparse[n].device, self.sparse[n].dtype).clone() for n, v in sums.items()}
        if masks:
            frozen = {n: v.detach().to(self.sparse[n].device, torch.bool) for n, v in masks.items()}
            self._masks = {n: frozen[n] if n in frozen else self._fixed[n] for n in self.params}
        else:
            self._masks = None


class SparseUpdate:
    """Applies masks around ``optimizer.step()``: call :meth:`before_step` after backward, :meth:`after_step`
    after the step.

    Args:
        params: the parameters by name (``dict(model.named_parameters())``).
        sparse: names of the parameters whose masks may be partial; only these are snapshotted.
        update: ``"strict"`` or ``"gradient"``.
    """

    def __init__(self, params: Mapping[str, nn.Parameter], sparse: Iterable[str], update: UpdateMode = "strict"):
        if update not in UPDATE_MODES:
            raise ValueError(f"update must be one of {UPDATE_MODES}, got {update!r}")
        self.update = update
        self.params = dict(params)
        self.sparse = [n for n in sparse if n in self.params]
        self._snapshots: dict[str, torch.Tensor] = {}
        self._masks: Mapping[str, torch.Tensor] | None = None

    @torch.no_grad()
    def before_step(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Zero the gradient of unselected entries; in strict mode remember the parameters' values."""
        for name in self.sparse:
            param, mask = self.params[name], masks[name]
            if param.grad is not None:
                param.grad.mul_(mask)
            if self.update == "strict":
                # taken after backward and dropped after the step, so it never adds to the activation peak
                self._snapshots[name] = param.detach().clone()
        self._masks = masks if self.update == "strict" else None

    @torch.no_grad()
    def after_step(self) -> None:
        """In strict mode, put every unselected entry back to its value before the step, bit for bit."""
        if self._masks is not None:
            for name in self.sparse:
                param = self.params[name]
                torch.where(self._masks[name], param, self._snapshots[name], out=param)
        self._snapshots.clear()
        self._masks = None


def select_dgst(
    model: nn.Module,
    gamma: int = 1,
    grouping: Grouping = "filter",
    heads: Iterable[nn.Module] | None = None,
) -> dict[str, torch.Tensor]:
    """DGST masks for the current gradients of ``model``.

    Args:
        model: a network after ``loss.backward()``.
        gamma: entries kept per group (1 in the paper).
        grouping: ``"filter"`` (rows of ``grad.view(shape[0], -1)``) or ``"kernel"`` (one row per k^3 kernel).
        heads: extra modules to treat as segmentation heads (registered head types are found automatically).

    Returns:
        ``{name: BoolTensor}`` for every parameter of ``model.named_parameters()``, True where the entry is
        updated at this iteration.

    Example::

        loss.backward()
        masks = select_dgst(model, gamma=1)
        kept = sum(int(m.sum()) for m in masks.values())
    """
    return GradientSelector(model, gamma, grouping, heads=heads)()
