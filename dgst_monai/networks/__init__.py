"""Networks of the lymph-node foundation model, and their layouts for the fine-tuning methods."""

from __future__ import annotations

from monai.networks.blocks import UnetOutBlock
from monai.networks.nets import DynUNet, SwinUNETR

from dgst_monai.roles import register_head_type, register_network

# final logit convs and deep-supervision heads, wherever they sit
register_head_type(UnetOutBlock)
register_network(
    DynUNet,
    encoder=("input_block", "downsamples", "bottleneck"),
    decoder=("upsamples", "output_block", "deep_supervision_heads"),
    heads=("output_block", "deep_supervision_heads"),
)
register_network(
    SwinUNETR,
    encoder=("swinViT", "encoder1", "encoder2", "encoder3", "encoder4", "encoder10"),
    decoder=("decoder5", "decoder4", "decoder3", "decoder2", "decoder1", "out"),
    heads=("out",),
)

# The model zoo by name, the nnU-Net-style planner and the nnU-Net import. Their DynUNet subclasses
# (ResidualEncoderDynUNet, NNUNetDynUNet) inherit DynUNet's layout above; no registration needed.
from dgst_monai.networks.factory import NETWORKS, build_network  # noqa: E402
from dgst_monai.networks.inference import InferenceDynUNet  # noqa: E402
from dgst_monai.networks.nnunet_import import NNUNetDynUNet, export_nnunet, import_nnunet  # noqa: E402
from dgst_monai.networks.planner import DynUNetPlan, ResidualEncoderDynUNet, plan_dynunet, plan_preset  # noqa: E402
from dgst_monai.networks.swinunetr import build_swinunetr  # noqa: E402
