"""The fine-tuning methods of Luo et al. (Tables 1 and 2), one registry entry each.

A method says which parameters train at all (``trains``; the others get ``requires_grad=False``, so no
optimizer touches them) and, for the sparsification methods, which entries of the trainable kernels are
updated at each step (``selector``). LoRA and Adapter first add modules to the network (``prepare``); those
live in :mod:`dgst_monai.networks.adapters`, imported only when used, so this module stays pure PyTorch like
:mod:`dgst_monai.sparsity`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from dgst_monai.roles import ParameterInfo, describe_parameters
from dgst_monai.sparsity import (
    GROUPINGS,
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

    def __post_init__(self) -> None:
        # checked for every method, so a typo fails before training even where it would be unused
        check_gamma(self.gamma)
        if self.grouping not in GROUPINGS:
            raise ValueError(f"grouping must be one of {GROUPINGS}, got {self.grouping!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 1:
            raise ValueError(f"warmup_steps must be an integer >= 1, got {self.warmup_steps!r}")


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
        prepare: for methods that add modules (LoRA, adapters), injects them into the network in place; called
            by :meth:`apply` before freezing, so before the optimizer is built.
    """

    name: str
    label: str
    trains: Callable[[ParameterInfo], bool]
    selector: Callable[[nn.Module, SelectionOptions], Selector] | None = None
    from_pretrained: bool = True
    needs_layout: bool = False
    prepare: Callable[[nn.Module], nn.Module] | None = None

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
        if self.prepare is not None and all(infos[n].head for n, t in trainable.items() if t):
            # without its modules, lora / adapter would silently degrade to a linear probe
            raise ValueError(
                f"method {self.name!r} adds modules to the network and {type(model).__name__} has none: build it with "
                f"dgst_monai.apply_method(network, {self.name!r}) before the optimizer (and before DDP)"
            )
        return trainable

    def apply(self, model: nn.Module) -> nn.Module:
        """Inject the method's modules if it has any (:attr:`prepare`), set ``requires_grad`` of every parameter
        of ``model`` for this method and return ``model`` (the same object, modified in place).

        Call it before building the optimizer and before wrapping the model in DistributedDataParallel (DDP
        registers the trainable set once).
        """
        if self.prepare is not None:
            model = self.prepare(model)
        trainable = self.trainable(model)
        for name, param in model.named_parameters():
            param.requires_grad_(trainable[name])
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        """A plain copy of ``model`` for inference and export: LoRA / adapters folded in, same keys as the
        foundation network (a plain copy for methods that add nothing)."""
        from dgst_monai.networks.adapters import merge

        return merge(model)


def _everything(info: ParameterInfo) -> bool:
    return True


def _injected_or_head(kind: str) -> Callable[[ParameterInfo], bool]:
    # like the released trainer, which always trains its seg_layers, the heads train whole beside LoRA / adapters
    def trains(info: ParameterInfo) -> bool:
        from dgst_monai.networks.adapters import injected_kind

        return info.head or injected_kind(info.name) == kind

    return trains


def _inject_lora(model: nn.Module) -> nn.Module:
    from dgst_monai.networks.adapters import inject_lora

    return inject_lora(model, r=32, alpha=16.0, dropout=0.1)  # the released trainer's peft settings


def _inject_adapters(model: nn.Module) -> nn.Module:
    from dgst_monai.networks.adapters import inject_adapters

    return inject_adapters(model, reduction=4)


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
    FineTuningMethod("lora", "LoRA", _injected_or_head("lora"), prepare=_inject_lora),
    FineTuningMethod("adapter", "Adapter", _injected_or_head("adapter"), prepare=_inject_adapters),
)


def get_method(name: str) -> FineTuningMethod:
    """The registered method called ``name``, with a clear error listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown fine-tuning method {name!r}; known methods: {', '.join(METHODS)}") from None


def apply_method(model: nn.Module, method: str) -> nn.Module:
    """Inject the modules ``method`` adds (``lora``, ``adapter``), freeze what it does not train
    (``requires_grad=False``) and return ``model`` (modified in place).

    In a bundle config: ``"network": "$dgst_monai.apply_method(@network_def.to(@device), @method)"``. The
    plain foundation checkpoint still loads strictly into the result (see :mod:`dgst_monai.networks.adapters`).
    """
    return get_method(method).apply(model)


def make_selector(method: FineTuningMethod, model: nn.Module, options: SelectionOptions) -> Selector | None:
    """The per-step selector of ``method`` on ``model`` (None for methods that update whole tensors)."""
    return None if method.selector is None else method.selector(model, options)
