"""The bundles' foundation network is nnU-Net's PlainConvUNet layout: Bias, Bias+Norm and DGST's always-updated
set are the paper's (MONAI's stock DynUNet has no conv biases, so ``bias`` would train the heads only)."""

from __future__ import annotations

import pytest
import torch
from bundle_support import BUNDLES
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from monai.bundle import ConfigParser
from torch import nn

from dgst_monai import apply_method, describe_parameters
from dgst_monai.networks import NNUNetDynUNet, plan_preset


def _plain_conv_unet(plan) -> nn.Module:
    """nnU-Net v2's own network for the same plan (nnU-Net orders axes the other way; counts do not care)."""
    return PlainConvUNet(
        input_channels=1,
        n_stages=plan.n_stages,
        features_per_stage=list(plan.filters),
        conv_op=nn.Conv3d,
        kernel_sizes=[list(k) for k in plan.kernel_size],
        strides=[list(s) for s in plan.strides],
        n_conv_per_stage=[2] * plan.n_stages,
        num_classes=2,
        n_conv_per_stage_decoder=[2] * (plan.n_stages - 1),
        conv_bias=True,
        norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
        deep_supervision=True,
    )


@pytest.mark.parametrize("preset", ["tiny", "cpu-small", "paper"])
def test_bias_trains_every_conv_and_transposed_conv_bias_like_plain_conv_unet(preset):
    plan = plan_preset(preset)
    with torch.device("meta"):  # the paper-sized networks, without allocating them
        ours = plan.network(in_channels=1, out_channels=2, deep_supervision=True)
        theirs = _plain_conv_unet(plan)
    assert isinstance(ours, NNUNetDynUNet)

    infos = describe_parameters(ours)
    conv_types = (nn.Conv3d, nn.ConvTranspose3d)
    our_modules = dict(ours.named_modules())
    our_conv_biases = [
        n for n, i in infos.items()
        if i.kind == "bias" and not i.head and isinstance(our_modules[n.rsplit(".", 1)[0]], conv_types)
    ]  # fmt: skip
    # nnU-Net's named_parameters() skips its aliases; its heads are decoder.seg_layers
    their_conv_biases = [
        n for n, m in theirs.named_modules()
        if isinstance(m, conv_types) and m.bias is not None and ".seg_layers." not in f".{n}."
    ]  # fmt: skip
    n_transposed = plan.n_stages - 1
    assert len(our_conv_biases) == len(their_conv_biases) == 2 * plan.n_stages + 2 * (plan.n_stages - 1) + n_transposed
    transposed = [n for n in our_conv_biases if isinstance(our_modules[n.rsplit(".", 1)[0]], nn.ConvTranspose3d)]
    assert len(transposed) == n_transposed

    apply_method(ours, "bias")
    trained = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert set(our_conv_biases) <= trained
    assert trained == {n for n, i in infos.items() if i.kind == "bias"}  # conv biases plus the heads' biases


def test_every_bundle_config_builds_the_nnunet_layout():
    for configs, deep_supervision in (
        (["train.json"], True),
        (["train.json", "finetune.json"], True),
        (["train.json", "evaluate.json"], True),
        (["inference.json"], False),
    ):
        parser = ConfigParser()
        parser.read_config([str(BUNDLES / "ln_ct_dynunet" / "configs" / c) for c in configs])
        parser["preset"] = "tiny"
        net = parser.get_parsed_content("network_def")
        assert type(net) is NNUNetDynUNet and net.deep_supervision is deep_supervision, configs
        assert all(m.bias is not None for m in net.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)))
