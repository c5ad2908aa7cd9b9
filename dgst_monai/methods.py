"""The fine-tuning methods of Luo et al. (Tables 1 and 2), one registry entry each.

A method says which parameters train at all (``trains``; the others get ``requires_grad=False``, so no
optimizer touches them) and, for the sparsification methods, which entries of the trainable kernels are
updated at each step (``selector``). Pure PyTorch, like :mod:`dgst_monai.sparsity`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from dgst_monai.roles import ParameterInfo, describe_parameters
from dgst_monai.sparsity import (
    AccumulatedGradientSelector,
    GradientSelector,
    Grouping,
    RandomSelector,
    Selector,
    check_gamma,
)


@dataclass(frozen=True)
class SelectionOptions:
    """Options of the sparsification methods: entries kept per group, grouping, DRST seed, SGST warm-up."""

    gamma: int = 1
    grouping: Grouping = "filter"
    seed: int = 0
    warmup_steps: int = 10


@dataclass(frozen=True)
class FineTuningMethod:
    """One fine-tuning method.

    Attributes:
        name: registry key, as used on the command line (``--method``).
        label: the name in the paper's tables.
        trains: True for the parameters this method may change.
        selector: for sparsification methods, builds the per-step entry selection.
        from_pretrained: False only for training from scratch (the bundle then skips the foundation weights).
        needs_layout: the method needs the network's encoder/decoder split.
    """

    name: str
    label: str
    trains: Callable[[ParameterInfo], bool]
    selector: Callable[[nn.Module, SelectionOptions], Selector] | None = None
    from_pretrained: bool = True
    needs_layout: bool = False

    def trainable(self, model: nn.Module) -> dict[str, bool]:
        """Whether this method trains each parameter of ``model``, by name.

        Raises:
            ValueError: the method would train nothing on this model, or needs an encoder/decoder layout the
                network has not registered.
        """
        infos = describe_parameters(model)
        if self.needs_layout and all(i.part is None for i in infos.values()):
            raise ValueError(
                f"method {self.name!r} needs the encoder/decoder split of {type(model).__name__}; declare it with "
                "dgst_monai.roles.register_network(...)"
            )
        trainable = {name: bool(self.trains(info)) for name, info in infos.items()}
        if not any(trainable.values()):
            raise ValueError(f"method {self.name!r} selects no parameter of {type(model).__name__} to train")
        return trainable

    def apply(self, model: nn.Module) -> nn.Module:
        """Set ``requires_grad`` of every parameter of ``model`` for this method and return ``model``.

        Call it before wrapping the model in DistributedDataParallel (DDP registers the trainable set once).
        """
        trainable = self.trainable(model)
        for name, param in model.named_parameters():
            param.requires_grad_(trainable[name])
        return model


def _everything(info: ParameterInfo) -> bool:
    return True


def _register(*methods: FineTuningMethod) -> dict[str, FineTuningMethod]:
    return {m.name: m for m in methods}


METHODS: dict[str, FineTuningMethod] = _register(
    FineTuningMethod("scratch", "From Scratch", _everything, from_pretrained=False),
    FineTuningMethod("full", "Full", _everything),
    FineTuningMethod("linear_probe", "LinearProb", lambda i: i.head),
    FineTuningMethod("bias", "Bias", lambda i: i.kind == "bias"),
    FineTuningMethod("norm", "Affine-IN", lambda i: i.kind == "norm"),
    FineTuningMethod("bias_norm", "Bias+Norm", lambda i: i.kind in ("bias", "norm")),
    FineTuningMethod("encoder", "Encoder Only", lambda i: i.part == "encoder", needs_layout=True),
    FineTuningMethod("decoder", "Decoder Only", lambda i: i.part == "decoder", needs_layout=True),
    FineTuningMethod(
        "drst", "DRST", _everything, lambda m, o: RandomSelector(m, o.gamma, o.grouping, seed=o.seed)
    ),
    FineTuningMethod(
        "sgst",
        "SGST",
        _everything,
        lambda m, o: AccumulatedGradientSelector(m, o.gamma, o.grouping, warmup_steps=o.warmup_steps),
    ),
    FineTuningMethod("dgst", "DGST", _everything, lambda m, o: GradientSelector(m, o.gamma, o.grouping)),
)


def get_method(name: str) -> FineTuningMethod:
    """The registered method called ``name``, with a clear error listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown fine-tuning method {name!r}; known methods: {', '.join(METHODS)}") from None


def apply_method(model: nn.Module, method: str) -> nn.Module:
    """Freeze what ``method`` does not train (``requires_grad=False``) and return ``model``.

    In a bundle config: ``"network": "$dgst_monai.apply_method(@network_def.to(@device), @method)"``.
    """
    return get_method(method).apply(model)


def make_selector(method: FineTuningMethod, model: nn.Module, options: SelectionOptions) -> Selector | None:
    """The per-step selector of ``method`` on ``model`` (None for methods that update whole tensors)."""
    check_gamma(options.gamma)
    return None if method.selector is None else method.selector(model, options)
