"""LoRA and bottleneck adapters on the convolution layers of a segmentation network, and merging them back.

The paper's LoRA and Adapter baselines "target only the 3D convolution layers". Both are injected in place
into the network (it stays a ``DynUNet``), both start equal to the foundation model (the output-side
projection is zero), and both fold back exactly into the plain network with :func:`merge`, so inference
and export never see them.

* **LoRA** (Hu et al.; released trainer: rank 32, alpha 16, dropout 0.1 via peft): a ``Conv3d`` with a kernel
  peft can merge gets peft's own LoRA layer; a ``ConvTranspose3d`` (peft refuses it) or a conv whose kernel
  starts ``1x1`` (peft's merge mis-shapes it) gets :class:`LoRAConv`, ours. Both compute
  ``base(x) + B(A(dropout(x))) * alpha / r`` with ``A`` carrying the kernel and ``B`` a zero-initialised 1x1x1.
* **Adapter** (Houlsby et al.): a bottleneck ``z + up(down(z))`` after the last convolution of every conv block
  (``UnetBasicBlock`` / ``UnetResBlock``), before its normalisation, with a zero-initialised ``up``. It is
  *linear* (no activation, no bias) so that it folds into that convolution exactly; a bias would be cancelled
  by the instance norm that follows anyway, and leaving it out keeps the merged state-dict keys unchanged.

Checkpoints: an injected network keeps the foundation network's names under ``<conv>.base_layer.*`` and loads
a *plain* state dict (the foundation checkpoint, or a merged fine-tuned one) strictly: each injected layer
maps the plain keys onto its base layer and resets its own output projection to zero, so after loading the
network computes exactly the loaded plain network. Its own full state dict (with the LoRA / adapter weights)
loads as usual, for resuming. (MONAI's ``CheckpointLoader(strict_shape=False)`` first drops every key the
injected network does not list, i.e. all foundation weights: keep the default ``strict_shape=True``.) For
evaluation and export, save the merged network: :func:`merge`, or :class:`MergedView` in a ``CheckpointSaver``.

Heads (``UnetOutBlock``: the final logit conv and the deep-supervision heads) are never injected.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import torch
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetResBlock
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.parallel import DistributedDataParallel

from dgst_monai.roles import describe_parameters

InjectedKind = Literal["lora", "adapter"]

#: Attribute names of the injected sub-modules, by method; peft's LoRA layers use the same ``lora_A`` / ``lora_B``.
PARTS: dict[str, InjectedKind] = {
    "lora_A": "lora",
    "lora_B": "lora",
    "adapter_down": "adapter",
    "adapter_up": "adapter",
}
#: The output-side projections: zero at injection, reset to zero when a plain state dict is loaded.
_ZERO_PARTS = ("lora_B", "adapter_up")
#: Conv blocks after whose last convolution an adapter goes.
ADAPTER_BLOCKS: tuple[type[nn.Module], ...] = (UnetBasicBlock, UnetResBlock)

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def injected_kind(name: str) -> InjectedKind | None:
    """``"lora"`` / ``"adapter"`` if the parameter or module ``name`` belongs to an injected module, else None.

    Example::

        >>> injected_kind("downsamples.0.conv1.conv.lora_A.default.weight")
        'lora'
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


class ConvAdapter(_Injected):
    """A convolution followed by a linear bottleneck residual adapter: ``z + up(down(z))``, ``z = base(x)``.

    ``down`` (out -> hidden) and ``up`` (hidden -> out) are bias-free 1x1x1 convolutions; ``up`` starts at zero,
    so the layer starts equal to its base. Being linear, it folds into the base convolution exactly:
    ``W' = (I + U D) W`` along the output channels (and ``b' = (I + U D) b`` if the base has a bias).

    Args:
        base_layer: the convolution whose output is adapted.
        hidden: bottleneck width.

    Example::

        layer = ConvAdapter(nn.Conv3d(16, 32, 3, padding=1, bias=False), hidden=8)
        plain = layer.merged()  # nn.Conv3d computing the same function
    """

    kind: InjectedKind = "adapter"

    def __init__(self, base_layer: _ConvNd, hidden: int) -> None:
        super().__init__(base_layer)
        if hidden < 1:
            raise ValueError(f"adapter bottleneck width must be >= 1, got {hidden}")
        channels, d = base_layer.out_channels, self.dims
        self.hidden = hidden
        self.adapter_down = _CONV[d](channels, hidden, 1, bias=False)
        self.adapter_up = _CONV[d](hidden, channels, 1, bias=False)
        nn.init.zeros_(self.adapter_up.weight)
        self.to(device=base_layer.weight.device, dtype=base_layer.weight.dtype).train(base_layer.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.base_layer(x)
        return z + self.adapter_up(self.adapter_down(z))

    def channel_map(self) -> torch.Tensor:
        """``I + U D``: the (out, out) linear map the adapter applies to each voxel's channels, in float64."""
        up = self.adapter_up.weight.detach().double().flatten(1)
        down = self.adapter_down.weight.detach().double().flatten(1)
        return torch.eye(up.shape[0], dtype=torch.float64, device=up.device) + up @ down

    def merged(self) -> _ConvNd:
        plain = copy.deepcopy(self.base_layer)
        m = self.channel_map()
        with torch.no_grad():
            w = plain.weight.double()
            # the output channel is dim 0 of a conv weight and dim 1 of a transposed-conv weight
            w = torch.einsum("op,ip...->io...", m, w) if plain.transposed else torch.einsum("op,pi...->oi...", m, w)
            plain.weight.copy_(w.to(plain.weight.dtype))
            if plain.bias is not None:
                plain.bias.copy_((m @ plain.bias.double()).to(plain.bias.dtype))
        return plain

    def merged_names(self) -> tuple[str, ...]:
        return ("weight",) if self.base_layer.bias is None else ("weight", "bias")


def _check_lora(r: int, alpha: float, dropout: float) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank r must be an integer >= 1, got {r!r}")
    if alpha <= 0:
        raise ValueError(f"LoRA alpha must be positive, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")


def _accept_plain_state(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Load-state-dict pre-hook of an injected layer: accept the plain network's keys for this layer.

    A plain state dict names the conv ``<prefix>weight``; the injected layer holds it as
    ``<prefix>base_layer.weight``. Rename those entries, and supply the injected entries so the layer equals
    the loaded plain conv: output projections zero, input projections as they are.
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
        zero = k.split(".", 1)[0] in _ZERO_PARTS
        state_dict[prefix + k] = torch.zeros_like(value) if zero else value.detach().clone()


# ------------------------------------------------------------------------------------------ walking a network


def _is_peft_lora(module: nn.Module) -> bool:
    # peft is imported lazily (it is slow to import); a peft layer is only present if peft was imported
    import sys

    peft_lora = sys.modules.get("peft.tuners.lora.layer")
    return peft_lora is not None and isinstance(module, peft_lora.LoraLayer)


def _is_injected(module: nn.Module) -> bool:
    return isinstance(module, _Injected) or _is_peft_lora(module)


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
    """The injected layers of ``model`` (ours and peft's), by first module name."""
    return {n: m for n, m in model.named_modules() if _is_injected(m)}


def injected_kinds(model: nn.Module) -> set[InjectedKind]:
    """Which kinds of modules (``"lora"``, ``"adapter"``) ``model`` holds."""
    return {"lora" if _is_peft_lora(m) else m.kind for m in injected_layers(model).values()}


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
    """Names of the convolutions an adapter goes after: the last conv (``conv2``) of every conv block."""
    block_types = tuple(blocks)
    heads = _head_convs(model)
    convs = dict(_convs(model))
    names = []
    for name, module in model.named_modules():
        if isinstance(module, block_types) and not _is_injected(module):
            conv = f"{name}.conv2.conv" if name else "conv2.conv"
            if conv in convs and conv not in heads:
                names.append(conv)
    return names


def inject_adapters(model: nn.Module, reduction: int = 4, targets: Iterable[str] | None = None) -> nn.Module:
    """Add a bottleneck residual adapter after the last convolution of every conv block of ``model``, in place.

    The adapter sits between that convolution and its normalisation, has width ``out_channels // reduction``
    (at least 1) and a zero-initialised up-projection: the adapted network starts equal to ``model``. A network
    that already holds adapters is returned unchanged.

    Args:
        model: the network; modified in place.
        reduction: channels / bottleneck width.
        targets: names of the convolutions to adapt; default :func:`adapter_targets` (``UnetBasicBlock`` and
            ``UnetResBlock`` of MONAI's DynUNet / UNETR family).

    Returns:
        ``model``.

    Raises:
        ValueError: ``reduction`` < 1, an unknown target, or nothing to adapt.

    Example::

        net = inject_adapters(DynUNet(...), reduction=4)
    """
    if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction < 1:
        raise ValueError(f"adapter reduction must be an integer >= 1, got {reduction!r}")
    if "adapter" in injected_kinds(model):
        return model
    names = adapter_targets(model) if targets is None else list(targets)
    convs = dict(_convs(model))
    unknown = [n for n in names if n not in convs]
    if unknown:
        raise ValueError(f"adapter targets are not plain convolutions of {type(model).__name__}: {unknown[:5]}")
    if not names:
        raise ValueError(
            f"{type(model).__name__} has no conv block ({', '.join(t.__name__ for t in ADAPTER_BLOCKS)}) to put an "
            "adapter after; pass targets=[conv names]"
        )
    for name in names:
        conv = convs[name]
        _replace(model, name, ConvAdapter(conv, hidden=max(1, conv.out_channels // reduction)))
    return model


def merge(model: nn.Module) -> nn.Module:
    """A plain copy of ``model`` with every LoRA / adapter folded into its convolution.

    The result has the foundation network's class and exactly its state-dict keys (it loads into a fresh
    plain network with ``strict=True``), all parameters trainable, and computes what ``model`` computes in
    eval mode (up to float rounding). ``model`` itself is not modified. A network without injected layers
    is simply copied.

    Args:
        model: a network from :func:`inject_lora` / :func:`inject_adapters` (or ``apply_method``), possibly
            wrapped in DistributedDataParallel.

    Returns:
        The merged plain network.

    Example::

        plain = merge(network)                       # DynUNet
        torch.save(plain.state_dict(), "model.pt")   # loads into the bundle's plain network_def
    """
    if isinstance(model, DistributedDataParallel):
        model = model.module
    merged = clone_network(model)
    for name, layer in injected_layers(merged).items():
        _replace(merged, name, _merged_layer(layer))
    if hasattr(merged, "peft_config"):  # set by peft's injection; not part of a plain network
        del merged.peft_config
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged


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


def _merged_layer(layer: nn.Module) -> nn.Module:
    if isinstance(layer, _Injected):
        return layer.merged()
    layer.merge(safe_merge=True)  # peft: refuses NaN / inf instead of writing them
    return layer.get_base_layer()


def merged_parameter_names(model: nn.Module) -> list[str]:
    """Names, in the merged plain network, of the parameters that merging rewrites (LoRA / adapter targets).

    Example::

        inject_lora(net)
        merged_parameter_names(net)[:1]   # ['input_block.conv1.conv.weight']
    """
    names = []
    for name, layer in injected_layers(model).items():
        rel = layer.merged_names() if isinstance(layer, _Injected) else ("weight",)
        names.extend(f"{name}.{r}" for r in rel)
    return names


class MergedView:
    """What a checkpoint saver should store for an injected network: its merged, plain state dict.

    ``CheckpointSaver(save_dict={"model": MergedView(network)})`` writes a checkpoint that loads into the plain
    network definition (evaluation, inference, export, :mod:`dgst_monai.delta`); save ``network`` itself to be
    able to resume with the LoRA / adapter weights.

    Args:
        network: the injected network (kept by reference; merged at every ``state_dict()`` call).
    """

    def __init__(self, network: nn.Module) -> None:
        self.network = network

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The merged plain network's state dict."""
        return merge(self.network).state_dict()

