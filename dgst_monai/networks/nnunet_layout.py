"""nnU-Net's U-Net layout as a MONAI DynUNet: a bias in every convolution and nnU-Net's decoder kernels.

This is the foundation network of the bundles (``DynUNetPlan.network``) and the class nnU-Net v2 weights are
imported into (:mod:`dgst_monai.networks.nnunet_import`): nnU-Net's ``PlainConvUNet``, which the paper
fine-tunes, has a bias in every convolution and transposed convolution, so Bias, Bias+Norm and DGST's
always-updated set are the paper's only on this layout (MONAI's stock DynUNet builds its convolutions without).
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetResBlock, UnetUpBlock
from monai.networks.nets import DynUNet
from torch import nn

from dgst_monai.networks.inference import drop_deep_supervision_heads_on_load

__all__ = ["NNUNetDynUNet"]


class NNUNetDynUNet(DynUNet):
    """MONAI DynUNet with nnU-Net's layout: biased convs and nnU-Net's decoder kernel sizes.

    Still a :class:`monai.networks.nets.DynUNet` (same child names, so the fine-tuning registry knows its
    encoder, decoder and heads); two differences:

    * ``conv_bias=True`` gives every block convolution a bias (MONAI builds them without), as nnU-Net's
      ``conv_bias``. Transposed convolutions follow ``trans_bias`` (default True here, as nnU-Net).
    * The decoder stage at resolution level ``l`` uses ``kernel_size[l]`` (nnU-Net), not ``kernel_size[l + 1]``
      (stock DynUNet).

    Built without deep supervision (inference, TorchScript export), it loads the deep-supervised training
    checkpoint strictly, dropping only the extra heads
    (:func:`dgst_monai.networks.inference.drop_deep_supervision_heads_on_load`).

    Args:
        conv_bias: biases in the block convolutions.
        trans_bias: biases in the transposed convolutions.
        **kwargs: :class:`monai.networks.nets.DynUNet` arguments.

    Example::

        net = NNUNetDynUNet(
            spatial_dims=3, in_channels=1, out_channels=2,
            kernel_size=[[1, 3, 3], [3, 3, 3], [3, 3, 3]], strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2]],
            upsample_kernel_size=[[1, 2, 2], [2, 2, 2]], filters=[32, 64, 128],
        )
    """

    def __init__(self, *args: Any, conv_bias: bool = True, trans_bias: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, trans_bias=trans_bias, **kwargs)
        if not self.deep_supervision:
            # inference / export network: load the deep-supervised training checkpoint without its extra heads
            drop_deep_supervision_heads_on_load(self)
        self.conv_bias = conv_bias
        if conv_bias:
            for module in self.modules():
                if isinstance(module, (UnetBasicBlock, UnetResBlock)):
                    for name in ("conv1", "conv2", "conv3"):
                        if hasattr(module, name):
                            _give_bias(getattr(module, name))

    def get_upsamples(self) -> nn.ModuleList:
        # nnU-Net: the decoder stage that ends at level l convolves with the encoder's kernel of level l
        return self.get_module_list(
            self.filters[1:][::-1],
            self.filters[:-1][::-1],
            self.kernel_size[:-1][::-1],
            self.strides[1:][::-1],
            UnetUpBlock,  # type: ignore[arg-type]
            self.upsample_kernel_size[::-1],
            trans_bias=self.trans_bias,
        )


def _give_bias(convolution: nn.Module) -> None:
    """Replace the ``conv`` of a MONAI ``Convolution`` by the same conv with a (zero) bias."""
    old = convolution.conv
    if old.bias is not None:
        return
    new = type(old)(
        old.in_channels,
        old.out_channels,
        old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        groups=old.groups,
        bias=True,
        padding_mode=old.padding_mode,
    ).to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(old.weight)
        new.bias.zero_()
    convolution.conv = new
