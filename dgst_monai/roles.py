"""What each parameter of a segmentation network is: kernel, bias, normalization, head; encoder or decoder.

Pure PyTorch. Roles come from module types (a normalization layer is a normalization layer whatever it is
called) and from network layouts. The layouts of the MONAI networks we ship (DynUNet and its subclasses,
SwinUNETR) and MONAI's head block are known here by their classes' qualified names, so nothing has to be
imported or registered for them (and this module never imports MONAI); another network is supported by one
:func:`register_network` call.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from torch import nn

Kind = Literal["kernel", "bias", "norm", "other"]
Part = Literal["encoder", "decoder"]

#: Modules whose affine parameters are "normalization" parameters (InstanceNorm and BatchNorm share _NormBase).
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)
#: Modules whose ``weight`` is a kernel that DGST sparsifies.
KERNEL_TYPES: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass(frozen=True)
class NetworkLayout:
    """Names of a network's direct children that form its encoder, its decoder and its segmentation head(s).

    Heads are part of the decoder (as in nnU-Net, whose ``seg_layers`` live in the decoder).
    """

    encoder: tuple[str, ...]
    decoder: tuple[str, ...]
    heads: tuple[str, ...]


_LAYOUTS: dict[type[nn.Module], NetworkLayout] = {}
_HEAD_TYPES: set[type[nn.Module]] = set()

#: Layouts of MONAI's networks, by the qualified name of their class (``module.QualName``). Matched against the
#: classes of a model's MRO when it is described, so subclasses (``NNUNetDynUNet``, ``InferenceDynUNet``, ...)
#: inherit them, and MONAI is neither imported nor asked anything here.
KNOWN_LAYOUTS: dict[str, NetworkLayout] = {
    "monai.networks.nets.dynunet.DynUNet": NetworkLayout(
        encoder=("input_block", "downsamples", "bottleneck"),
        decoder=("upsamples", "output_block", "deep_supervision_heads"),
        heads=("output_block", "deep_supervision_heads"),
    ),
    "monai.networks.nets.swin_unetr.SwinUNETR": NetworkLayout(
        encoder=("swinViT", "encoder1", "encoder2", "encoder3", "encoder4", "encoder10"),
        decoder=("decoder5", "decoder4", "decoder3", "decoder2", "decoder1", "out"),
        heads=("out",),
    ),
}
#: Segmentation-head module types known by qualified name (MONAI's final logit conv and deep-supervision heads).
KNOWN_HEAD_TYPES: frozenset[str] = frozenset({"monai.networks.blocks.dynunet_block.UnetOutBlock"})


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_network(
    network_type: type[nn.Module],
    *,
    encoder: Iterable[str],
    decoder: Iterable[str],
    heads: Iterable[str] = (),
) -> None:
    """Declare the encoder / decoder / head children of a network class (subclasses inherit it).

    MONAI's DynUNet and SwinUNETR need no call (:data:`KNOWN_LAYOUTS`); a registration takes precedence over
    a known layout for the same class. The first head is the network's main output.

    Example::

        register_network(MyUNet, encoder=["down"], decoder=["up", "out"], heads=["out"])
    """
    layout = NetworkLayout(tuple(encoder), tuple(decoder), tuple(heads))
    if set(layout.encoder) & set(layout.decoder):
        raise ValueError(f"{network_type.__name__}: a child cannot be both encoder and decoder: {layout}")
    _LAYOUTS[network_type] = layout


def register_head_type(module_type: type[nn.Module]) -> None:
    """Declare a module type as a segmentation head (e.g. MONAI's ``UnetOutBlock``), wherever it appears."""
    _HEAD_TYPES.add(module_type)


@dataclass(frozen=True)
class ParameterInfo:
    """Role of one parameter.

    Attributes:
        name: its name in ``model.named_parameters()``.
        kind: ``kernel`` (conv / transposed-conv / linear weight), ``bias``, ``norm`` (normalization affine)
            or ``other`` (e.g. a relative-position bias table).
        head: inside a segmentation head (final logit conv or a deep-supervision head).
        part: ``encoder`` / ``decoder`` when the network's layout is registered, else None.
    """

    name: str
    kind: Kind
    head: bool
    part: Part | None


def layout_of(module: nn.Module) -> NetworkLayout | None:
    """The layout of ``module``'s class or of its nearest base class that has one (registered or known).

    Example::

        layout_of(DynUNet(...)).heads  # ('output_block', 'deep_supervision_heads')
    """
    for cls in type(module).__mro__:
        if cls in _LAYOUTS:
            return _LAYOUTS[cls]
        known = KNOWN_LAYOUTS.get(_qualified_name(cls))
        if known is not None:
            return known
    return None


def is_head_type(module: nn.Module) -> bool:
    """Whether ``module`` is a segmentation head by its type (registered, or known like MONAI's ``UnetOutBlock``)."""
    return any(cls in _HEAD_TYPES or _qualified_name(cls) in KNOWN_HEAD_TYPES for cls in type(module).__mro__)


def describe_parameters(model: nn.Module, heads: Iterable[nn.Module] | None = None) -> dict[str, ParameterInfo]:
    """Role of every parameter of ``model``, keyed like ``model.named_parameters()``.

    Args:
        model: any network, possibly wrapped (DistributedDataParallel, peft).
        heads: modules to treat as segmentation heads, in addition to registered head types and layouts.

    Returns:
        One :class:`ParameterInfo` per parameter, in ``named_parameters()`` order.
    """
    head_ids = {id(m) for m in heads or ()}
    # named_modules() and named_parameters() both skip aliases (e.g. DynUNet.skip_layers), keeping first names.
    modules = dict(model.named_modules())
    roots = {prefix: layout for prefix, m in modules.items() if (layout := layout_of(m)) is not None}
    for prefix, layout in roots.items():
        head_ids.update(id(modules[_join(prefix, h)]) for h in layout.heads if _join(prefix, h) in modules)

    infos: dict[str, ParameterInfo] = {}
    for prefix, module in modules.items():
        in_head = _inside_head(prefix, modules, head_ids)
        part = _part(prefix, roots)
        for attr, _ in module.named_parameters(recurse=False):
            name = _join(prefix, attr)
            if isinstance(module, NORM_TYPES):
                kind: Kind = "norm"
            elif attr == "bias":
                kind = "bias"
            elif attr == "weight" and isinstance(module, KERNEL_TYPES):
                kind = "kernel"
            else:
                kind = "other"
            infos[name] = ParameterInfo(name, kind, in_head, part)
    order = [n for n, _ in model.named_parameters()]
    missing = set(order) - set(infos)
    if missing:  # a parameter registered twice under different modules would be reported here
        raise RuntimeError(f"could not attribute parameters to modules: {sorted(missing)[:5]}")
    return {n: infos[n] for n in order}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _inside_head(prefix: str, modules: dict[str, nn.Module], head_ids: set[int]) -> bool:
    parts = prefix.split(".") if prefix else []
    for i in range(len(parts) + 1):
        m = modules.get(".".join(parts[:i]))
        if m is not None and (id(m) in head_ids or is_head_type(m)):
            return True
    return False


def _part(prefix: str, roots: dict[str, NetworkLayout]) -> Part | None:
    # the innermost registered network containing this module decides
    best: tuple[int, Part | None] = (-1, None)
    for root, layout in roots.items():
        if root and not (prefix == root or prefix.startswith(root + ".")):
            continue
        rest = prefix[len(root) :].lstrip(".")
        child = rest.split(".")[0] if rest else ""
        part: Part | None = "encoder" if child in layout.encoder else "decoder" if child in layout.decoder else None
        if len(root) > best[0]:
            best = (len(root), part)
    return best[1]


