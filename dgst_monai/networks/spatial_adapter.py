"""FSEFT's black-box spatial adapter: the frozen foundation model and a small residual adapter on its logits.

Silva-Rodriguez et al. ("Towards Foundation Models and Few-Shot Parameter-Efficient Fine-Tuning for
Volumetric Organ Segmentation") compare PEFT methods with *black-box* adaptation, where the foundation model is
only run, never changed: its output goes through a spatial adapter, Conv3d - ReLU - Conv3d (kernel 3, no bias,
the last conv zero-initialised) added back to its input, and only the adapter trains. This module provides
that as the registry method ``spatial_adapter``:

* :class:`SpatialAdapterNetwork` holds the foundation (``foundation.*``) and the adapter
  (``spatial_adapter.*``). The foundation stays in eval mode whatever ``train()`` is called with (MONAI's
  trainer calls it every iteration), so its normalisation statistics and dropout never change; its parameters
  have ``requires_grad=False`` and it runs under ``torch.no_grad()``, so no optimizer can move them (weight
  decay and momentum included) and no graph is kept through it.
* The adapter works on the foundation's output logits (``C`` channels, 2 for the lymph-node model). A
  deep-supervised DynUNet in eval mode returns its main output only, ``(B, C, *spatial)``, which
  ``StackedDeepSupervisionLoss`` takes as is; a foundation that returns stacked heads ``(B, 1 + h, C, ...)``
  gets the same adapter on every head.
* Checkpoints: the plain foundation checkpoint loads strictly into the wrapper (its keys are moved under
  ``foundation.`` and the adapter starts as the identity); the fine-tuned wrapper's state dict is the
  foundation's plus ``spatial_adapter.conv{1,2}.weight``, which :func:`dgst_monai.networks.for_checkpoint`
  recognises to rebuild the wrapper around a plain network. The wrapper scripts with TorchScript when its
  foundation does (DynUNet without deep supervision) and traces otherwise (SwinUNETR).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from dgst_monai.methods import FineTuningMethod, register_method
from dgst_monai.networks.adapters import fill_absent_on_load
from dgst_monai.roles import ParameterInfo, layout_of

__all__ = ["SpatialAdapter", "SpatialAdapterNetwork", "spatial_adapter_for_state", "wrap_spatial_adapter"]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
#: child names of the wrapper; the adapter's key prefix marks a spatial-adapter checkpoint
FOUNDATION, ADAPTER = "foundation", "spatial_adapter"


class SpatialAdapter(nn.Module):
    """``x + conv2(relu(conv1(x)))``: two bias-free ``kernel_size`` convolutions, ``conv2`` zero-initialised.

    The adapter starts as the identity. A state dict without its entries (the plain foundation checkpoint)
    loads strictly and resets it to the identity (:func:`~dgst_monai.networks.adapters.fill_absent_on_load`).

    Args:
        channels: channels of the adapted map (the foundation's output classes).
        hidden: channels between the two convolutions; default ``channels`` (FSEFT).
        kernel_size: odd kernel size (3 in FSEFT); padding keeps the spatial size.
        spatial_dims: 1, 2 or 3.

    Example::

        adapter = SpatialAdapter(2)
        logits = adapter(torch.randn(1, 2, 16, 16, 16))   # unchanged until conv2 trains
    """

    def __init__(self, channels: int, hidden: int | None = None, kernel_size: int = 3, spatial_dims: int = 3) -> None:
        super().__init__()
        hidden = channels if hidden is None else hidden
        if channels < 1 or hidden < 1:
            raise ValueError(f"spatial adapter channels must be >= 1, got {channels} and {hidden}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"spatial adapter kernel_size must be odd (the output keeps its size), got {kernel_size}")
        conv = _CONV[spatial_dims]
        self.conv1 = conv(channels, hidden, kernel_size, padding=kernel_size // 2, bias=False)
        self.act = nn.ReLU()
        self.conv2 = conv(hidden, channels, kernel_size, padding=kernel_size // 2, bias=False)
        nn.init.zeros_(self.conv2.weight)
        fill_absent_on_load(self, zero=("conv2",))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act(self.conv1(x)))


class SpatialAdapterNetwork(nn.Module):
    """A frozen foundation network in eval mode followed by a :class:`SpatialAdapter` on its output logits.

    Args:
        foundation: the foundation network, kept by reference and never modified (its parameters are frozen).
        channels: its output channels; default read from the network (``out_channels``, or the last convolution
            of its main head for a network whose layout :mod:`dgst_monai.roles` knows, e.g. SwinUNETR).
        hidden: adapter width; default ``channels``.
        kernel_size: adapter kernel size (3).

    Raises:
        ValueError: the output channels cannot be told and were not given.

    Example::

        net = SpatialAdapterNetwork(foundation)          # or dgst_monai.apply_method(foundation, "spatial_adapter")
        net.load_state_dict(torch.load("foundation.pt", weights_only=True))   # plain keys, strict
        net.train()                                       # the foundation stays in eval mode
    """

    def __init__(
        self, foundation: nn.Module, channels: int | None = None, hidden: int | None = None, kernel_size: int = 3
    ) -> None:
        super().__init__()
        reference = _first_conv(foundation)
        if channels is None:
            channels = _output_channels(foundation)
        self.foundation = foundation
        self.spatial_adapter = SpatialAdapter(channels, hidden, kernel_size, spatial_dims=reference.weight.dim() - 2)
        self.spatial_adapter.to(device=reference.weight.device, dtype=reference.weight.dtype)
        for param in foundation.parameters():
            param.requires_grad_(False)
        self.train(foundation.training)
        self.register_load_state_dict_pre_hook(_accept_foundation_state)

    def train(self, mode: bool = True) -> SpatialAdapterNetwork:
        """Set the adapter's mode; the foundation always stays in eval mode (black box)."""
        super().train(mode)
        self.foundation.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the foundation's output is data for the adapter: no graph through it
            logits = self.foundation(x)
        if logits.dim() == x.dim() + 1:  # stacked deep-supervision heads (B, 1 + h, C, ...): one adapter for all
            batch, heads = logits.shape[0], logits.shape[1]
            adapted = self.spatial_adapter(logits.flatten(0, 1))
            return adapted.reshape([batch, heads] + list(adapted.shape[1:]))
        return self.spatial_adapter(logits)


def _first_conv(network: nn.Module) -> _ConvNd:
    conv = next((m for m in network.modules() if isinstance(m, _ConvNd)), None)
    if conv is None:
        raise ValueError(
            f"{type(network).__name__} has no convolution: the spatial adapter needs a segmentation network"
        )
    return conv


def _output_channels(network: nn.Module) -> int:
    channels = getattr(network, "out_channels", None)
    if isinstance(channels, int) and not isinstance(channels, bool):
        return channels
    layout = layout_of(network)
    if layout is not None and layout.heads and hasattr(network, layout.heads[0]):
        convs = [m for m in getattr(network, layout.heads[0]).modules() if isinstance(m, _ConvNd)]
        if convs:
            return convs[-1].out_channels
    raise ValueError(
        f"cannot tell the output channels of {type(network).__name__}: pass channels=... to SpatialAdapterNetwork"
    )


def _accept_foundation_state(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """Load-state-dict pre-hook: a plain foundation state dict moves under ``foundation.`` (the adapter then
    fills itself in as the identity); the wrapper's own state dict loads as is."""
    keys = [k for k in state_dict if k.startswith(prefix)]
    if not keys or any(k.startswith((f"{prefix}{FOUNDATION}.", f"{prefix}{ADAPTER}.")) for k in keys):
        return
    for key in keys:
        state_dict[f"{prefix}{FOUNDATION}.{key[len(prefix):]}"] = state_dict.pop(key)


def wrap_spatial_adapter(network: nn.Module) -> SpatialAdapterNetwork:
    """``network`` inside a :class:`SpatialAdapterNetwork` (returned as is if it already is one).

    Example::

        net = wrap_spatial_adapter(foundation)
    """
    return network if isinstance(network, SpatialAdapterNetwork) else SpatialAdapterNetwork(network)


def spatial_adapter_for_state(network: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """``network`` wrapped with the spatial adapter that ``state_dict`` holds (its shapes give the sizes), or
    ``network`` unchanged if the state dict has none.

    Example::

        net = spatial_adapter_for_state(plain_net, state)
        net.load_state_dict(state)   # strict
    """
    first = state_dict.get(f"{ADAPTER}.conv1.weight")
    if first is None or isinstance(network, SpatialAdapterNetwork):
        return network
    hidden, channels, kernel = int(first.shape[0]), int(first.shape[1]), int(first.shape[-1])
    return SpatialAdapterNetwork(network, channels=channels, hidden=hidden, kernel_size=kernel)


def _adapter_only(info: ParameterInfo) -> bool:
    return ADAPTER in info.name.split(".")


register_method(FineTuningMethod("spatial_adapter", "Spatial Adapter", _adapter_only, prepare=wrap_spatial_adapter))
