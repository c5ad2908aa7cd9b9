"""LoRA and Houlsby adapters on a network's convolution layers: the ``lora`` and ``adapter`` fine-tuning methods.

The paper's LoRA and Adapter baselines "target only the 3D convolution layers". Both are injected in place
into the network (it stays a ``DynUNet``) and both start equal to the foundation model (their output-side
projection is zero). They differ in what happens after training:

* **LoRA** (Hu et al.; released trainer: rank 32, alpha 16, dropout 0.1 via peft) is a re-parameterisation:
  it folds back exactly into the plain network with :func:`merge`, so inference and export never see it. A
  ``Conv3d`` with a kernel peft can merge gets peft's own LoRA layer; a ``ConvTranspose3d`` (peft refuses it)
  or a conv whose kernel starts ``1x1`` (peft's merge mis-shapes it) gets :class:`LoRAConv`, ours. Both compute
  ``base(x) + B(A(dropout(x))) * alpha / r`` with ``A`` carrying the kernel and ``B`` a zero-initialised 1x1x1.
* **Adapter** (Houlsby et al.) is a bottleneck with a nonlinearity, :class:`Adapter`:
  ``z + up(act(down(z)))``, ``down`` a 1x1x1 conv to ``channels // 4`` (with a bias), ``act`` the block's own
  activation (LeakyReLU 0.01 in DynUNet and SwinUNETR), ``up`` a zero-initialised 1x1x1 conv back (no bias:
  the instance norm that follows would cancel it). It sits where Houlsby puts it in a transformer layer, after
  the block's last projection and before its normalisation and residual addition: appended to the
  ``conv2`` ``Convolution`` of every ``UnetBasicBlock`` / ``UnetResBlock`` (DynUNet's encoder, bottleneck and
  decoder, SwinUNETR's convolutional encoder and decoder blocks), as ``<block>.conv2.adapter``. Being
  nonlinear, it cannot be folded into any convolution: it stays in the network for evaluation, inference and
  TorchScript export.

Checkpoints: the adapter network keeps every key of the foundation network and adds
``<block>.conv2.adapter.{down.weight, down.bias, up.weight}``; those keys say where each adapter sits and its
width, and :func:`rebuild_adapters` (or :func:`dgst_monai.networks.for_checkpoint` in a bundle config) adds
them to a freshly built plain network before a strict load. An injected network also loads a *plain* state
dict (the foundation checkpoint) strictly: LoRA maps the plain keys onto its base layers, and both reset their
output projections to zero, so after loading the network computes exactly the loaded plain network. Its own
full state dict loads as usual, for resuming. (MONAI's ``CheckpointLoader(strict_shape=False)`` first drops
every key the target does not list: keep the default ``strict_shape=True``.) For evaluation and export, save
:func:`merge` (LoRA folded in, adapters kept), e.g. :class:`MergedView` in the bundles' ``FinalModelSaver``.

Heads (``UnetOutBlock``: the final logit conv and the deep-supervision heads) are never injected.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import Any, Literal

import torch
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetResBlock
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.parallel import DistributedDataParallel

from dgst_monai.methods import FineTuningMethod, clone_network, register_method
from dgst_monai.roles import ParameterInfo, describe_parameters

__all__ = [
    "ADAPTER_BLOCKS",
    "Adapter",
    "LoRAConv",
    "MergedView",
    "adapter_targets",
    "clone_network",
    "fill_absent_on_load",
    "inject_adapters",
    "inject_lora",
    "injected_kind",
    "injected_kinds",
    "injected_layers",
    "merge",
    "merged_parameter_names",
    "rebuild_adapters",
]

InjectedKind = Literal["lora", "adapter"]

#: Attribute names of the injected sub-modules, by method; peft's LoRA layers use the same ``lora_A`` / ``lora_B``.
PARTS: dict[str, InjectedKind] = {"lora_A": "lora", "lora_B": "lora", "adapter": "adapter"}
#: Conv blocks whose last convolution (``conv2``) an adapter follows.
ADAPTER_BLOCKS: tuple[type[nn.Module], ...] = (UnetBasicBlock, UnetResBlock)
#: The adapter width is ``channels // ADAPTER_REDUCTION`` (at least 1).
ADAPTER_REDUCTION = 4

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def injected_kind(name: str) -> InjectedKind | None:
    """``"lora"`` / ``"adapter"`` if the parameter or module ``name`` belongs to an injected module, else None.

    Example::

        >>> injected_kind("downsamples.0.conv1.conv.lora_A.default.weight")
        'lora'
        >>> injected_kind("downsamples.0.conv2.adapter.down.weight")
        'adapter'
        >>> injected_kind("downsamples.0.conv1.conv.base_layer.weight") is None
        True
    """
    for part in name.split("."):
        if part in PARTS:
            return PARTS[part]
    return None


# ------------------------------------------------------------------------------------------ injected layers


class _Injected(nn.Module):
    """A convolution (``base_layer``) with an injected low-rank path; knows how to fold it back."""

    kind: InjectedKind

    def __init__(self, base_layer: _ConvNd) -> None:
        super().__init__()
        if base_layer.groups != 1:
            raise ValueError(
                f"{type(self).__name__} supports convolutions with groups=1, got groups={base_layer.groups}"
            )
        self.base_layer = base_layer
        self.register_load_state_dict_pre_hook(_accept_plain_state)

    @property
    def dims(self) -> int:
        return self.base_layer.weight.dim() - 2

    def merged(self) -> _ConvNd:
        """A copy of the base convolution with the injected path folded in (float64 arithmetic)."""
        raise NotImplementedError

    def merged_names(self) -> tuple[str, ...]:
        """Names (relative to the base layer) of the parameters :meth:`merged` rewrites."""
        return ("weight",)


class LoRAConv(_Injected):
    """LoRA on any convolution or transposed convolution (groups 1): ``base(x) + B(A(dropout(x))) * alpha / r``.

    ``A`` has the base layer's kernel, stride, padding (and output padding) and maps in-channels to ``r``;
    ``B`` is a 1x1x1 convolution from ``r`` to out-channels, initialised to zero, so the layer starts equal to
    its base. Merged weight: ``W + scaling * B @ A`` contracted over the rank (per kernel offset).

    Args:
        base_layer: the convolution to adapt; its parameters are left as they are.
        r: rank.
        alpha: LoRA alpha; the update is scaled by ``alpha / r``.
        dropout: dropout on the input of the low-rank path (training only).

    Example::

        layer = LoRAConv(nn.ConvTranspose3d(32, 16, 2, stride=2, bias=False), r=32, alpha=16, dropout=0.1)
        y = layer(torch.randn(1, 32, 8, 8, 8))           # (1, 16, 16, 16, 16)
        plain = layer.merged()                          # nn.ConvTranspose3d with the update folded in
    """

    kind: InjectedKind = "lora"

    def __init__(self, base_layer: _ConvNd, r: int = 32, alpha: float = 16.0, dropout: float = 0.1) -> None:
        super().__init__(base_layer)
        _check_lora(r, alpha, dropout)
        b, d = base_layer, self.dims
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if b.transposed:
            self.lora_A = _CONV_T[d](
                b.in_channels, r, b.kernel_size, b.stride, b.padding, b.output_padding, bias=False, dilation=b.dilation
            )
        else:
            self.lora_A = _CONV[d](
                b.in_channels, r, b.kernel_size, b.stride, b.padding, b.dilation,
                bias=False, padding_mode=b.padding_mode,
            )
        self.lora_B = _CONV[d](r, b.out_channels, 1, bias=False)
        # A keeps torch's default (Kaiming-uniform) init, as peft does; B = 0 makes the update start at zero
        nn.init.zeros_(self.lora_B.weight)
        self.to(device=b.weight.device, dtype=b.weight.dtype).train(b.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The update of the base weight, ``scaling * B A``, in float64, shaped like the base weight."""
        a = self.lora_A.weight.detach().double()
        b = self.lora_B.weight.detach().double().flatten(1)  # (out, r)
        if self.base_layer.transposed:  # A: (in, r, *k), base weight (in, out, *k)
            delta = torch.einsum("ir...,or->io...", a, b)
        else:  # A: (r, in, *k), base weight (out, in, *k)
            delta = torch.einsum("or,ri...->oi...", b, a)
        return delta * self.scaling

    def merged(self) -> _ConvNd:
        plain = copy.deepcopy(self.base_layer)
        with torch.no_grad():
            plain.weight.copy_((plain.weight.double() + self.delta_weight()).to(plain.weight.dtype))
        return plain


class Adapter(nn.Module):
    """Houlsby et al.'s bottleneck adapter on a feature map: ``x + up(act(down(x)))``.

    ``down`` maps ``channels`` to ``hidden`` (1x1x1 conv with a bias), ``act`` is a nonlinearity, ``up`` maps
    back (1x1x1 conv, no bias) and starts at zero, so the adapter starts as the identity. The map is not affine
    (``act`` is nonlinear), so no convolution reproduces it once ``up`` has trained.

    A state dict without any of the adapter's entries (the plain foundation checkpoint) loads into it strictly
    and resets it to the identity (``up = 0``, ``down`` as it is): see :func:`fill_absent_on_load`.

    Args:
        channels: channels of the feature map.
        hidden: bottleneck width.
        activation: the nonlinearity; default LeakyReLU(0.01), nnU-Net's and DynUNet's.
        spatial_dims: 1, 2 or 3.

    Example::

        adapter = Adapter(32, hidden=8)
        y = adapter(torch.randn(1, 32, 8, 8, 8))   # equals the input until `up` is trained
    """

    def __init__(
        self, channels: int, hidden: int, activation: nn.Module | None = None, spatial_dims: int = 3
    ) -> None:
        super().__init__()
        if hidden < 1 or channels < 1:
            raise ValueError(f"adapter channels and bottleneck width must be >= 1, got {channels} and {hidden}")
        conv = _CONV[spatial_dims]
        self.down = conv(channels, hidden, 1, bias=True)
        self.act = activation if activation is not None else nn.LeakyReLU(negative_slope=0.01)
        self.up = conv(hidden, channels, 1, bias=False)
        nn.init.zeros_(self.up.weight)
        fill_absent_on_load(self, zero=("up",))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


def fill_absent_on_load(module: nn.Module, zero: Collection[str]) -> nn.Module:
    """Let ``module`` (an added module) load a state dict that has none of its entries, strictly.

    Registers a load-state-dict pre-hook: when the state dict being loaded holds no entry of ``module``, the
    module's current entries are supplied, with the children named in ``zero`` (its output projections) set to
    zero, so that it starts again as the identity. A state dict with any of its entries loads as usual (a
    partial one still fails a strict load).

    Args:
        module: the added module (an :class:`Adapter`, a spatial adapter).
        zero: names of its direct children whose entries are zeroed.

    Returns:
        ``module``.

    Example::

        fill_absent_on_load(my_adapter, zero=("up",))
    """

    def hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
        own = module.state_dict()
        if any(prefix + key in state_dict for key in own):
            return
        for key, value in own.items():
            zeroed = key.split(".", 1)[0] in zero
            state_dict[prefix + key] = torch.zeros_like(value) if zeroed else value.detach().clone()

    module.register_load_state_dict_pre_hook(hook)
    return module


def _check_lora(r: int, alpha: float, dropout: float) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank r must be an integer >= 1, got {r!r}")
    if alpha <= 0:
        raise ValueError(f"LoRA alpha must be positive, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")


def _accept_plain_state(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """Load-state-dict pre-hook of a LoRA layer: accept the plain network's keys for this layer.

    A plain state dict names the conv ``<prefix>weight``; the LoRA layer holds it as
    ``<prefix>base_layer.weight``. Rename those entries, and supply the LoRA entries so the layer equals
    the loaded plain conv: ``B`` zero, ``A`` as it is.
    """
    base = module.get_submodule("base_layer")
    base_keys = list(base.state_dict().keys())
    if any(k.startswith(prefix + "base_layer.") for k in state_dict):
        return  # the injected network's own state dict: load as is
    if not any(prefix + k in state_dict for k in base_keys):
        return  # nothing for this layer: let load_state_dict report the missing keys
    for k in base_keys:
        if prefix + k in state_dict:
            state_dict[prefix + "base_layer." + k] = state_dict.pop(prefix + k)
    for k, value in module.state_dict().items():
        if k.startswith("base_layer."):
            continue
        zero = k.split(".", 1)[0] == "lora_B"
        state_dict[prefix + k] = torch.zeros_like(value) if zero else value.detach().clone()


# ------------------------------------------------------------------------------------------ walking a network


def _is_peft_lora(module: nn.Module) -> bool:
    # peft is imported lazily (it is slow to import); a peft layer is only present if peft was imported
    import sys

    peft_lora = sys.modules.get("peft.tuners.lora.layer")
    return peft_lora is not None and isinstance(module, peft_lora.LoraLayer)


def _is_lora(module: nn.Module) -> bool:
    return isinstance(module, _Injected) or _is_peft_lora(module)


def _is_injected(module: nn.Module) -> bool:
    return _is_lora(module) or isinstance(module, Adapter)


def _convs(model: nn.Module) -> Iterator[tuple[str, _ConvNd]]:
    """Plain convolutions of ``model`` by first name, not descending into injected layers."""
    seen: set[int] = set()

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, _ConvNd]]:
        for name, child in module.named_children():
            if id(child) in seen:
                continue  # an alias (e.g. DynUNet.skip_layers): already visited under its first name
            seen.add(id(child))
            full = f"{prefix}.{name}" if prefix else name
            if _is_injected(child):
                continue
            if isinstance(child, _ConvNd):
                yield full, child
            else:
                yield from walk(child, full)

    yield from walk(model, "")


def _head_convs(model: nn.Module) -> set[str]:
    return {n.rsplit(".", 1)[0] for n, info in describe_parameters(model).items() if info.head}


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def injected_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The injected modules of ``model``: LoRA layers (ours and peft's) and adapters, by first module name."""
    return {n: m for n, m in model.named_modules() if _is_injected(m)}


def injected_kinds(model: nn.Module) -> set[InjectedKind]:
    """Which kinds of modules (``"lora"``, ``"adapter"``) ``model`` holds."""
    return {"adapter" if isinstance(m, Adapter) else "lora" for m in injected_layers(model).values()}


def _peft_can_merge(conv: _ConvNd) -> bool:
    # peft 0.21: LoRA for Conv3d only (ConvTranspose3d refused); its merge treats any kernel starting 1x1 as a
    # "1x1 conv2d" and mis-shapes it; its A conv ignores dilation and padding_mode, so merge would differ.
    return (
        type(conv) is nn.Conv3d
        and tuple(conv.weight.shape[2:4]) != (1, 1)
        and conv.groups == 1
        and all(d == 1 for d in conv.dilation)
        and conv.padding_mode == "zeros"
    )


# ------------------------------------------------------------------------------------------ public API


def inject_lora(model: nn.Module, r: int = 32, alpha: float = 16.0, dropout: float = 0.1) -> nn.Module:
    """Add LoRA to every convolution and transposed convolution of ``model`` outside its heads, in place.

    A network that already holds LoRA is returned unchanged, so ``inject_lora(net, r=8)`` followed by
    ``apply_method(net, "lora")`` keeps rank 8. Inject before wrapping in DistributedDataParallel and before
    building the optimizer.

    Args:
        model: the network (e.g. a ``DynUNet``); modified in place.
        r: rank (released trainer: 32).
        alpha: scaling numerator, update scaled by ``alpha / r`` (released trainer: 16).
        dropout: dropout on the low-rank path's input (released trainer: 0.1).

    Returns:
        ``model``, with peft LoRA layers on mergeable ``Conv3d`` and :class:`LoRAConv` on the other convs.

    Raises:
        ValueError: bad hyper-parameters, or no convolution to adapt outside the heads.

    Example::

        net = inject_lora(DynUNet(...))                 # same forward as before: B starts at zero
        net.load_state_dict(torch.load("foundation.pt"))  # plain foundation keys load strictly
    """
    _check_lora(r, alpha, dropout)
    if "lora" in injected_kinds(model):
        return model
    heads = _head_convs(model)
    targets = [(n, c) for n, c in _convs(model) if n not in heads]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no convolution outside its heads to add LoRA to")
    peft_names = [n for n, c in targets if _peft_can_merge(c)]
    for name, conv in targets:
        if name not in peft_names:
            _replace(model, name, LoRAConv(conv, r, alpha, dropout))
    if peft_names:
        _inject_peft(model, peft_names, r, alpha, dropout)
    return model


def _inject_peft(model: nn.Module, names: list[str], r: int, alpha: float, dropout: float) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    # an exact full-name pattern: peft's list form would also match any module whose name ends with a target
    pattern = "^(?:" + "|".join(re.escape(n) for n in names) + ")$"
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern, bias="none")
    inject_adapter_in_model(config, model)
    for name in names:
        layer = model.get_submodule(name)
        layer.register_load_state_dict_pre_hook(_accept_plain_state)
        layer.train(layer.base_layer.training)  # new modules default to training mode: keep an eval model in eval
    # peft freezes everything else; which parameters train is the method registry's business, not peft's
    for n, p in model.named_parameters():
        base_name = n.replace(".base_layer.", ".")
        if base_name in flags:
            p.requires_grad_(flags[base_name])


def adapter_targets(model: nn.Module, blocks: Iterable[type[nn.Module]] = ADAPTER_BLOCKS) -> list[str]:
    """Names of the places an adapter goes: the last convolution (``conv2``, a MONAI ``Convolution``) of every
    conv block of ``model`` outside its heads.

    Example::

        adapter_targets(DynUNet(...))[:2]   # ['input_block.conv2', 'downsamples.0.conv2']
    """
    block_types = tuple(blocks)
    heads = _head_convs(model)
    names = []
    for name, module in model.named_modules():
        site = f"{name}.conv2" if name else "conv2"
        if isinstance(module, block_types) and isinstance(getattr(module, "conv2", None), nn.Sequential):
            if not any(h == site or h.startswith(site + ".") for h in heads):
                names.append(site)
    return names


def _site_channels(model: nn.Module, site: str) -> int:
    sequence = model.get_submodule(site)
    convs = [m for m in sequence.children() if isinstance(m, _ConvNd)] if isinstance(sequence, nn.Sequential) else []
    if not convs:
        raise ValueError(
            f"adapter site {site!r} of {type(model).__name__} is not a sequence ending in a convolution "
            "(e.g. a MONAI Convolution)"
        )
    return convs[-1].out_channels


def _site_activation(model: nn.Module, site: str) -> nn.Module:
    """The activation of the block the site belongs to (``lrelu`` of MONAI's conv blocks), copied."""
    parent = model.get_submodule(site.rpartition(".")[0]) if "." in site else model
    act = getattr(parent, "lrelu", None)
    return copy.deepcopy(act) if isinstance(act, nn.Module) else nn.LeakyReLU(negative_slope=0.01)


def _add_adapter(model: nn.Module, site: str, channels: int, hidden: int) -> None:
    sequence = model.get_submodule(site)
    reference = next(sequence.parameters())
    adapter = Adapter(channels, hidden, _site_activation(model, site), spatial_dims=reference.dim() - 2)
    adapter.to(device=reference.device, dtype=reference.dtype).train(sequence.training)
    sequence.add_module("adapter", adapter)


def inject_adapters(
    model: nn.Module, reduction: int = ADAPTER_REDUCTION, targets: Iterable[str] | None = None
) -> nn.Module:
    """Append a Houlsby :class:`Adapter` to the last convolution of every conv block of ``model``, in place.

    Each adapter sits between that convolution and its normalisation (``<block>.conv2.adapter``), has width
    ``out_channels // reduction`` (at least 1), the block's activation and a zero-initialised up-projection:
    the adapted network starts equal to ``model``. A network that already holds adapters is returned unchanged.

    Args:
        model: the network; modified in place.
        reduction: channels / bottleneck width.
        targets: names of the ``nn.Sequential`` convolutions to follow with an adapter; default
            :func:`adapter_targets` (``conv2`` of ``UnetBasicBlock`` / ``UnetResBlock``, MONAI's DynUNet and
            SwinUNETR).

    Returns:
        ``model``.

    Raises:
        ValueError: ``reduction`` < 1, a target that is not a sequence ending in a convolution, or nothing to
            adapt.

    Example::

        net = inject_adapters(DynUNet(...), reduction=4)
    """
    if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction < 1:
        raise ValueError(f"adapter reduction must be an integer >= 1, got {reduction!r}")
    if "adapter" in injected_kinds(model):
        return model
    names = adapter_targets(model) if targets is None else list(targets)
    if not names:
        raise ValueError(
            f"{type(model).__name__} has no conv block ({', '.join(t.__name__ for t in ADAPTER_BLOCKS)}) to put an "
            "adapter after; pass targets=[names of nn.Sequential convolutions]"
        )
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise ValueError(f"adapter targets are not modules of {type(model).__name__}: {unknown[:5]}")
    channels = {name: _site_channels(model, name) for name in names}  # checks every target before changing any
    for name in names:
        _add_adapter(model, name, channels[name], max(1, channels[name] // reduction))
    return model


_ADAPTER_KEY = re.compile(r"(?P<site>.+)\.adapter\.down\.weight")


def rebuild_adapters(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Add to a plain ``model``, in place, the adapters a fine-tuned state dict holds, so it loads strictly.

    Every ``<site>.adapter.down.weight`` key names a site (``input_block.conv2``) and gives the adapter's width
    and channels by its shape; the activation is the block's own, as at injection. Sites already holding an
    adapter (and DynUNet's aliases of them under ``skip_layers``) are left as they are.

    Args:
        model: the plain network the state dict was trained from (e.g. the bundle's ``network_def``).
        state_dict: the fine-tuned state dict (or any mapping with its keys and tensor shapes).

    Returns:
        ``model``.

    Raises:
        ValueError: a key names a site ``model`` does not have, or one that is not a convolution sequence.

    Example::

        state = torch.load("models/model.pt", weights_only=True)
        rebuild_adapters(plain_net, state).load_state_dict(state)   # strict
    """
    for key, value in state_dict.items():
        match = _ADAPTER_KEY.fullmatch(key)
        if match is None:
            continue
        site = match["site"]
        try:
            channels = _site_channels(model, site)
        except AttributeError:
            raise ValueError(
                f"the checkpoint has an adapter at {site!r} ({key}), which {type(model).__name__} does not have: "
                "build the network the checkpoint was fine-tuned from"
            ) from None
        if "adapter" in model.get_submodule(site)._modules:
            continue
        hidden, width = int(value.shape[0]), int(value.shape[1])
        if width != channels:
            raise ValueError(f"{key}: an adapter of {width} channels after a convolution with {channels} outputs")
        _add_adapter(model, site, channels, hidden)
    return model


def merge(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for evaluation and export: every LoRA layer folded into its convolution, adapters kept.

    For a LoRA network the result has the foundation network's class and exactly its state-dict keys (it loads
    into a fresh plain network with ``strict=True``). Adapters (and a spatial adapter around the network) are
    not linear and stay, with their keys: :func:`dgst_monai.networks.for_checkpoint` rebuilds them in a plain
    network before loading. The copy has all parameters trainable and computes what ``model`` computes in eval
    mode (up to float rounding). ``model`` itself is not modified; a network without LoRA is simply copied.

    Args:
        model: a network from :func:`inject_lora` / :func:`inject_adapters` (or ``apply_method``), possibly
            wrapped in DistributedDataParallel.

    Returns:
        The merged network.

    Example::

        plain = merge(network)                       # DynUNet
        torch.save(plain.state_dict(), "model.pt")   # loads into the bundle's network_def (for_checkpoint)
    """
    if isinstance(model, DistributedDataParallel):
        model = model.module
    merged = clone_network(model)
    for name, layer in injected_layers(merged).items():
        if _is_lora(layer):
            _replace(merged, name, _merged_layer(layer))
    if hasattr(merged, "peft_config"):  # set by peft's injection; not part of a plain network
        del merged.peft_config
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged


def _merged_layer(layer: nn.Module) -> nn.Module:
    if isinstance(layer, _Injected):
        return layer.merged()
    layer.merge(safe_merge=True)  # peft: refuses NaN / inf instead of writing them
    return layer.get_base_layer()


def merged_parameter_names(model: nn.Module) -> list[str]:
    """Names, in the merged network, of the foundation parameters that merging rewrites (LoRA targets).

    Example::

        inject_lora(net)
        merged_parameter_names(net)[:1]   # ['input_block.conv1.conv.weight']
    """
    names = []
    for name, layer in injected_layers(model).items():
        if not _is_lora(layer):
            continue
        rel = layer.merged_names() if isinstance(layer, _Injected) else ("weight",)
        names.extend(f"{name}.{r}" for r in rel)
    return names


class MergedView:
    """What a checkpoint saver should store for a fine-tuned network: the state dict of :func:`merge`.

    ``FinalModelSaver(ckpt_dir, {"model": MergedView(network)})`` (the bundles' ``train.json``; MONAI's
    ``CheckpointSaver`` alike) writes a checkpoint that the plain network definition loads (LoRA folded in; the
    keys of adapters say what :func:`dgst_monai.networks.for_checkpoint` adds first): evaluation, inference,
    export, :mod:`dgst_monai.delta`. Save ``network`` itself to be able to resume with the LoRA weights.

    Args:
        network: the injected network (kept by reference; merged at every ``state_dict()`` call).
    """

    def __init__(self, network: nn.Module) -> None:
        self.network = network

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The merged plain network's state dict."""
        return merge(self.network).state_dict()


# ------------------------------------------------------------------------------------------ registry methods


def _injected_or_head(kind: InjectedKind) -> Callable[[ParameterInfo], bool]:
    # like the released trainer, which always trains its seg_layers, the heads train whole beside LoRA / adapters
    def trains(info: ParameterInfo) -> bool:
        return info.head or injected_kind(info.name) == kind

    return trains


register_method(
    FineTuningMethod(
        "lora",
        "LoRA",
        _injected_or_head("lora"),
        prepare=lambda model: inject_lora(model, r=32, alpha=16.0, dropout=0.1),  # the released trainer's peft
        export=merge,
    )
)
register_method(
    FineTuningMethod("adapter", "Adapter", _injected_or_head("adapter"), prepare=inject_adapters, export=merge)
)
