"""The fine-tuning methods of Luo et al. (Tables 1 and 2), one registry entry each.

A method says which parameters train at all (``trains``; the others get ``requires_grad=False``, so no
optimizer touches them) and, for the sparsification methods, which entries of the trainable kernels are
updated at each step (``selector``). Methods that add modules to the network (``prepare``: LoRA, Adapter,
the spatial adapter) are defined and registered by the modules that build those modules
(:data:`METHOD_PROVIDERS`), which the registry imports the first time such a method is asked for; so this
module stays pure PyTorch like :mod:`dgst_monai.sparsity` and imports none of MONAI, Ignite or peft.

Example::

    >>> from dgst_monai.methods import METHODS, get_method
    >>> get_method("bias").label
    'Bias'
    >>> "lora" in METHODS  # known without importing its module; METHODS["lora"] imports it
    True
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

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
    """Options of the sparsification methods: entries kept per group, grouping, DRST seed, and the number of
    SGST calibration batches (accumulated at the foundation weights before the first update)."""

    gamma: int = 1
    grouping: Grouping = "filter"
    seed: int = 0
    warmup_steps: int = 10

    def __post_init__(self) -> None:
        from dgst_monai.sparsity import check_count  # local: this edit stays inside the dataclass

        # checked for every method, so a typo fails before training even where it would be unused
        check_gamma(self.gamma)
        if self.grouping not in GROUPINGS:
            raise ValueError(f"grouping must be one of {GROUPINGS}, got {self.grouping!r}")
        check_count("warmup_steps", self.warmup_steps)


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
        prepare: for methods that add modules (LoRA, adapters), injects them into the network (in place, or
            returns a wrapper around it, as the spatial adapter does); called by :meth:`apply` before freezing,
            so before the optimizer is built.
        export: builds the network to save for inference and export from the trained one (LoRA folds into its
            convolutions); None for a plain copy.
    """

    name: str
    label: str
    trains: Callable[[ParameterInfo], bool]
    selector: Callable[[nn.Module, SelectionOptions], Selector] | None = None
    from_pretrained: bool = True
    needs_layout: bool = False
    prepare: Callable[[nn.Module], nn.Module] | None = None
    export: Callable[[nn.Module], nn.Module] | None = None

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
        if self.prepare is not None and all(infos[n].head for n, t in trainable.items() if t):
            # without its modules, lora / adapter would silently degrade to a linear probe (or train nothing)
            raise ValueError(
                f"method {self.name!r} adds modules to the network and {type(model).__name__} has none: build it with "
                f"dgst_monai.apply_method(network, {self.name!r}) before the optimizer (and before DDP)"
            )
        if not any(trainable.values()):
            raise ValueError(f"method {self.name!r} selects no parameter of {type(model).__name__} to train")
        return trainable

    def apply(self, model: nn.Module) -> nn.Module:
        """Inject the method's modules if it has any (:attr:`prepare`), set ``requires_grad`` of every parameter
        of ``model`` for this method and return ``model`` (the same object, modified in place; a method that
        wraps the network, like ``spatial_adapter``, returns the wrapper).

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
        """A copy of ``model`` (unwrapped from DDP) for inference and export: what :attr:`export` makes of it
        (LoRA folded in, the foundation's keys), else a plain copy (modules that stay in the network, such as
        adapters, keep their keys; :func:`dgst_monai.networks.for_checkpoint` rebuilds them at loading)."""
        if isinstance(model, DistributedDataParallel):
            model = model.module
        return self.export(model) if self.export is not None else clone_network(model)


def clone_network(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)`` that also works after a forward pass with gradients enabled.

    MONAI's DynUNet keeps its deep-supervision outputs of the last forward in a list attribute; those are not
    graph leaves and refuse deepcopy. The copy shares them, detached: they are overwritten at the next forward.

    Example::

        copy_of_net = clone_network(net)
    """
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, (list, tuple)):
                for item in value:
                    if isinstance(item, torch.Tensor) and item.grad_fn is not None:
                        memo[id(item)] = item.detach()
    return copy.deepcopy(model, memo)


def _everything(info: ParameterInfo) -> bool:
    return True


#: Methods defined outside this module, by name: the module that registers each (with
#: :func:`register_method`) when imported. They add modules to the network and need MONAI (and peft).
METHOD_PROVIDERS: dict[str, str] = {
    "lora": "dgst_monai.networks.adapters",
    "adapter": "dgst_monai.networks.adapters",
    "spatial_adapter": "dgst_monai.networks.spatial_adapter",
}


class MethodRegistry(Mapping[str, FineTuningMethod]):
    """The registry: a read-only mapping name -> method that imports a method's provider module on first use.

    Names, membership and ``len`` never import anything; looking a provided method up (``registry[name]``,
    ``values()``, ``items()``) imports its module from :data:`METHOD_PROVIDERS`, which registers it.

    Args:
        methods: the methods defined here.
        providers: name -> module that registers that method.
    """

    def __init__(self, methods: Iterable[FineTuningMethod], providers: Mapping[str, str]) -> None:
        self._methods: dict[str, FineTuningMethod] = {}
        self._providers = dict(providers)
        self._order: list[str] = []
        for method in methods:
            self.register(method)
        self._order.extend(n for n in self._providers if n not in self._methods)

    def register(self, method: FineTuningMethod) -> FineTuningMethod:
        """Add ``method`` (a provider module registers its own methods this way); returns it.

        Raises:
            ValueError: another method already has this name (names provided by a module may be re-registered).
        """
        if method.name in self._methods and method.name not in self._providers:
            raise ValueError(f"a fine-tuning method called {method.name!r} is already registered")
        self._methods[method.name] = method
        if method.name not in self._order:
            self._order.append(method.name)
        return method

    def __getitem__(self, name: str) -> FineTuningMethod:
        if name not in self._methods and name in self._providers:
            module = self._providers[name]
            importlib.import_module(module)
            if name not in self._methods:
                raise RuntimeError(f"{module} was imported but did not register the fine-tuning method {name!r}")
        return self._methods[name]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._order))

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, name: object) -> bool:
        return name in self._methods or name in self._providers


def _register(*methods: FineTuningMethod) -> MethodRegistry:
    return MethodRegistry(methods, METHOD_PROVIDERS)


METHODS: MethodRegistry = _register(
    FineTuningMethod("scratch", "From Scratch", _everything, from_pretrained=False),
    FineTuningMethod("full", "Full", _everything),
    FineTuningMethod("linear_probe", "LinearProb", lambda i: i.head),
    FineTuningMethod("bias", "Bias", lambda i: i.kind == "bias"),
    FineTuningMethod("norm", "Affine-IN", lambda i: i.kind == "norm"),
    FineTuningMethod("bias_norm", "Bias+Norm", lambda i: i.kind in ("bias", "norm")),
    # DGST's always-trained set without any kernel entry: the control that isolates what DGST's kernels add
    FineTuningMethod("bias_norm_head", "Bias+Norm+Head", lambda i: i.kind in ("bias", "norm") or i.head),
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


def register_method(method: FineTuningMethod) -> FineTuningMethod:
    """Add a fine-tuning method to :data:`METHODS` (and so to ``--method`` and ``FineTuningHandler``); returns it.

    Raises:
        ValueError: the name is taken.

    Example::

        register_method(FineTuningMethod("heads_and_norms", "Heads+Norm", lambda i: i.head or i.kind == "norm"))
    """
    return METHODS.register(method)


def get_method(name: str) -> FineTuningMethod:
    """The registered method called ``name`` (importing its provider module if needed), with a clear error
    listing the known ones."""
    if name not in METHODS:
        raise ValueError(f"unknown fine-tuning method {name!r}; known methods: {', '.join(METHODS)}")
    return METHODS[name]


def apply_method(model: nn.Module, method: str) -> nn.Module:
    """Inject the modules ``method`` adds (``lora``, ``adapter``, ``spatial_adapter``), freeze what it does not
    train (``requires_grad=False``) and return the network: ``model`` modified in place, or for
    ``spatial_adapter`` a wrapper holding ``model`` unchanged.

    In a bundle config, with the method resolved once as ``"method_def": {"_target_":
    "dgst_monai.methods.get_method", "name": "@method"}``: ``"local_network":
    "$@method_def.apply(@network_def.to(@device))"``. The plain foundation checkpoint still loads strictly into
    the result (see :mod:`dgst_monai.networks.adapters` and :mod:`dgst_monai.networks.spatial_adapter`).
    """
    return get_method(method).apply(model)


def make_selector(method: FineTuningMethod, model: nn.Module, options: SelectionOptions) -> Selector | None:
    """The per-step selector of ``method`` on ``model`` (None for methods that update whole tensors)."""
    return None if method.selector is None else method.selector(model, options)
