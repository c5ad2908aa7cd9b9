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

Everything in the per-iteration path stays on the parameters' device: no ``.item()``, ``.cpu()`` or
``.tolist()``, no Python loop over rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Literal

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
    # max(1) is the fastest selector for gamma 1 (BRIEF: 0.023 s vs 0.031 s for topk on nnU-Net gradients)
    index = scores.max(dim=1, keepdim=True).indices if gamma == 1 else scores.topk(gamma, dim=1, sorted=False).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, index, True)


def check_gamma(gamma: int) -> int:
    if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
        raise ValueError(f"gamma must be an integer >= 1 (entries kept per group), got {gamma!r}")
    return gamma


class Selector:
    """Chooses, at each optimizer step, which entries of each parameter are updated.

    Subclasses give a score per kernel entry (:meth:`scores`); the top-gamma entries of each group are kept.
    Parameters that are not kernels, or are inside a head, are always kept whole; frozen parameters
    (``requires_grad=False``) never.

    Args:
        model: the network (may be wrapped in DistributedDataParallel).
        gamma: entries kept per group.
        grouping: ``"filter"`` or ``"kernel"``, see the module docstring.
        heads: extra modules to treat as segmentation heads.
    """

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


class GradientSelector(Selector):
    """DGST: top-gamma entries by |current gradient| (Luo et al., Eq. 4)."""

    def scores(self, name: str, param: nn.Parameter) -> torch.Tensor | None:
        return None if param.grad is None else param.grad.abs()


class RandomSelector(Selector):
    """DRST: gamma entries per group drawn uniformly at random at every step, from a seeded generator.

    The same seed on every DDP rank draws the same entries.
    """

    def __init__(self, model: nn.Module, gamma: int = 1, grouping: Grouping = "filter", seed: int = 0, **kw) -> None:
        super().__init__(model, gamma, grouping, **kw)
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def scores(self, name: str, param: nn.Parameter) -> torch.Tensor:
        gen = self._generators.get(param.device)
        if gen is None:
            gen = self._generators[param.device] = torch.Generator(param.device).manual_seed(self.seed)
        return torch.rand(param.shape, generator=gen, device=param.device)


class AccumulatedGradientSelector(Selector):
    """SGST: a static selection by |gradient accumulated over the first ``warmup_steps`` steps|.

    During the warm-up each step selects from the gradients summed so far; from step ``warmup_steps`` on the
    selection is frozen.
    """

    def __init__(
        self, model: nn.Module, gamma: int = 1, grouping: Grouping = "filter", warmup_steps: int = 10, **kw
    ) -> None:
        super().__init__(model, gamma, grouping, **kw)
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps}")
        self.warmup_steps = warmup_steps
        self.steps = 0
        self._sums: dict[str, torch.Tensor] = {}
        self._frozen: dict[str, torch.Tensor] | None = None

    def scores(self, name: str, param: nn.Parameter) -> torch.Tensor | None:
        if param.grad is not None:
            if name in self._sums:
                self._sums[name].add_(param.grad)
            else:
                self._sums[name] = param.grad.detach().clone()
        total = self._sums.get(name)
        return None if total is None else total.abs()

    def __call__(self) -> dict[str, torch.Tensor]:
        if self._frozen is not None:
            return self._frozen
        masks = super().__call__()
        self.steps += 1
        if self.steps >= self.warmup_steps:
            self._frozen, self._sums = masks, {}
        return masks


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
