"""The nnU-Net-style DynUNet planner, the SwinUNETR builders and the by-name network factory.

Expected topologies are derived by hand from nnU-Net v2's rules (``get_pool_and_conv_props``): an axis pools
while it has >= 2 * 4 voxels and its spacing is < 2x the finest spacing among the axes that may pool (a lone
axis needs >= 3 * 4 voxels); its kernel is 3 once its spacing is < 2x the finest, else 1; the bottleneck
kernel is 3; filters 32 doubling up to 320.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import REPO
from monai.bundle import ConfigParser
from monai.networks.nets import DynUNet, SwinUNETR

from dgst_monai import describe_parameters
from dgst_monai.networks import NETWORKS, build_network
from dgst_monai.networks.nnunet_layout import NNUNetDynUNet
from dgst_monai.networks.planner import (
    PRESETS,
    DynUNetPlan,
    ResidualEncoderDynUNet,
    estimate_feature_map_elements,
    plan_dynunet,
    plan_preset,
)
from dgst_monai.networks.swinunetr import build_swinunetr

BUNDLE = REPO / "bundles" / "ln_ct_dynunet"
NETWORK_KEYS = ("spacing", "patch_size", "filters", "kernel_size", "strides", "deep_supr_num")


def as_lists(plan: DynUNetPlan) -> dict:
    return {k: v for k, v in plan.to_config().items() if k in NETWORK_KEYS}


# ---------------------------------------------------------------------------------------------- topology


def test_isotropic_spacing_pools_every_axis_down_to_four_voxels():
    # 1 mm isotropic, 128^3: 128 -> 64 -> 32 -> 16 -> 8 -> 4 on all axes (5 poolings, 6 stages); 4 < 2 * 4 stops.
    plan = plan_dynunet((1.0, 1.0, 1.0), (128, 128, 128), memory_gb=None)
    assert plan.strides == ((1, 1, 1),) + ((2, 2, 2),) * 5
    assert plan.kernel_size == ((3, 3, 3),) * 6
    assert plan.upsample_kernel_size == ((2, 2, 2),) * 5
    assert plan.filters == (32, 64, 128, 256, 320, 320)
    assert plan.bottleneck_size == (4, 4, 4)
    assert plan.patch_size == (128, 128, 128)
    assert plan.deep_supr_num == 3  # n_stages - 3: nnU-Net trains n_stages - 2 outputs


def test_lone_axis_stops_early_and_patch_is_padded_to_the_total_stride():
    # (96, 160, 112): after 4 joint poolings (6, 10, 7); only axis 1 still has >= 8 voxels, but a lone axis
    # needs >= 12, so planning stops with 5 stages.
    plan = plan_dynunet((1.0, 1.0, 1.0), (96, 160, 112), memory_gb=None)
    assert plan.strides == ((1, 1, 1),) + ((2, 2, 2),) * 4
    assert plan.bottleneck_size == (6, 10, 7)
    # 100^3: 100 -> 50 -> 25 -> 13 -> 7 (ceil), 4 poolings, so the patch is padded up to a multiple of 16: 112
    padded = plan_dynunet((1.0, 1.0, 1.0), (100, 100, 100), memory_gb=None)
    assert padded.strides == ((1, 1, 1),) + ((2, 2, 2),) * 4
    assert padded.patch_size == (112, 112, 112)


def test_anisotropic_spacing_pools_in_plane_first_with_in_plane_kernels():
    # 0.7 x 0.7 x 3 mm, patch (192, 192, 48), axes (x, y, z):
    #   stage 1: z/x spacing 3/0.7 = 4.3 >= 2 -> pool (2, 2, 1), kernel (3, 3, 1); spacing becomes 1.4, 1.4, 3
    #   stage 2: 3/1.4 = 2.14 >= 2 -> again (2, 2, 1), kernel (3, 3, 1); spacing 2.8, 2.8, 3, size 48^3
    #   stages 3-5: ratio 1.07 -> (2, 2, 2), kernel 3; 48 -> 24 -> 12 -> 6; 6 < 8 stops.
    plan = plan_dynunet((0.7, 0.7, 3.0), (192, 192, 48), memory_gb=None)
    assert plan.strides == ((1, 1, 1), (2, 2, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2))
    assert plan.kernel_size == ((3, 3, 1), (3, 3, 1), (3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3))
    assert plan.bottleneck_size == (6, 6, 6)
    assert plan.spacing == (0.7, 0.7, 3.0)


def test_paper_preset_is_nnunet_3d_fullres_at_patch_80x112x224():
    # (x, y, z) = (224, 112, 80) at 0.8 x 0.8 x 2.5 mm:
    #   stage 1: z ratio 3.1 -> (2, 2, 1), kernel (3, 3, 1); spacing 1.6, 1.6, 2.5 (ratio 1.56 < 2 from now on)
    #   stages 2-4: (2, 2, 2) -> sizes (14, 7, 10)
    #   stage 5: y = 7 < 8 stops pooling, x = 14 and z = 10 pool -> (2, 1, 2), bottleneck (7, 7, 5)
    plan = plan_preset("paper")
    assert plan.patch_size == (224, 112, 80)
    assert plan.strides == ((1, 1, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 1, 2))
    assert plan.kernel_size == ((3, 3, 1),) + ((3, 3, 3),) * 5
    assert plan.filters == (32, 64, 128, 256, 320, 320)
    assert plan.deep_supr_num == 3
    assert plan.bottleneck_size == (7, 7, 5)
    assert plan.batch_size == 2
    # nnU-Net's memory proxy: 539e6 feature-map elements, just under its 560e6 reference for 8 GB at batch 2
    assert 5.3e8 < plan.estimate_feature_map_elements() < 5.6e8


def test_cpu_small_preset_is_what_the_bundle_overlay_names():
    assert json.loads((BUNDLE / "configs" / "cpu_small.json").read_text(encoding="utf-8"))["preset"] == "cpu-small"
    assert as_lists(plan_preset("cpu-small")) == {
        "spacing": [1.5, 1.5, 3.0],
        "patch_size": [64, 64, 32],
        "filters": [16, 32, 64, 128],
        "kernel_size": [[3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
        "strides": [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]],
        "deep_supr_num": 1,
    }


# ------------------------------------------------------------------------------------------------ memory


def test_memory_budget_shrinks_the_axis_with_the_largest_extent():
    # at 7.5 GB the paper patch (539e6 > 525e6) loses one z step: z spans 80 x 2.5 = 200 mm, more than
    # x (224 x 0.8 = 179 mm); with z = 64 the z axis pools 4 times, so the step is 16 voxels.
    plan = plan_preset("paper", memory_gb=7.5)
    assert plan.patch_size == (224, 112, 64)
    assert plan.estimate_feature_map_elements() <= 560e6 * 7.5 / 8
    small = plan_preset("paper", memory_gb=2.0)
    assert small.estimate_feature_map_elements() <= 560e6 * 2 / 8
    assert all(s <= p for s, p in zip(small.patch_size, (224, 112, 80)))
    for size, stride_product in zip(small.patch_size, zip(*small.strides)):
        assert size % math.prod(stride_product) == 0
    # a larger batch needs proportionally less per sample
    assert plan_preset("paper", batch_size=4).estimate_feature_map_elements() <= 560e6 / 2


def test_median_shape_decides_the_shrunk_axis_when_given():
    # relative to a median image of (512, 512, 80) the z patch (80/80) is the largest, so z shrinks first
    by_shape = plan_preset("paper", memory_gb=7.5, median_shape=(512, 512, 80))
    assert by_shape.patch_size[:2] == (224, 112) and by_shape.patch_size[2] < 80
    # relative to (224, 400, 400) x is the largest
    by_x = plan_preset("paper", memory_gb=7.5, median_shape=(224, 400, 400))
    assert by_x.patch_size[0] < 224 and by_x.patch_size[1:] == (112, 80)


@pytest.mark.parametrize("deep_supervision", [True, False])
def test_estimate_equals_nnunet_count_for_the_same_plain_unet(deep_supervision):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    plan = plan_dynunet((0.7, 0.7, 3.0), (96, 64, 24), memory_gb=None, base_filters=8)
    with torch.device("meta"):
        reference = PlainConvUNet(
            1, plan.n_stages, list(plan.filters), torch.nn.Conv3d, [list(k) for k in plan.kernel_size],
            [list(s) for s in plan.strides], 2, 3, 2, True, torch.nn.InstanceNorm3d, {"affine": True},
            nonlin=torch.nn.LeakyReLU, deep_supervision=deep_supervision,
        )
    expected = int(reference.compute_conv_feature_map_size(plan.patch_size))
    assert plan.estimate_feature_map_elements(3, deep_supervision) == expected
    assert estimate_feature_map_elements(plan.patch_size, plan.strides, plan.filters, 3, deep_supervision) == expected


# ---------------------------------------------------------------------------------------------- networks


def test_plan_builds_a_dynunet_with_deep_supervision():
    plan = plan_preset("cpu-small", base_filters=4)
    net = plan.network(in_channels=1, out_channels=3)
    assert type(net) is NNUNetDynUNet  # nnU-Net's layout: a bias in every conv and transposed conv
    assert list(net.filters) == [4, 8, 16, 32]
    assert net.deep_supervision and len(net.deep_supervision_heads) == plan.deep_supr_num
    net.train()
    out = net(torch.randn(1, 1, *plan.patch_size))
    assert out.shape == (1, 1 + plan.deep_supr_num, 3, *plan.patch_size)
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(1, 1, *plan.patch_size)).shape == (1, 3, *plan.patch_size)


def test_to_config_rebuilds_the_plan_in_the_bundle():
    plan = plan_preset("cpu-small", base_filters=4)
    config = plan.to_config()
    assert json.loads(json.dumps(config)) == config  # writable as an override file
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / "train.json")])
    parser["plan"] = config
    assert parser.get_parsed_content("plan") == plan
    parser["device"] = "$torch.device('cpu')"
    from_bundle = parser.get_parsed_content("network_def")
    direct = plan.network()
    assert [(n, p.shape) for n, p in from_bundle.named_parameters()] == [
        (n, p.shape) for n, p in direct.named_parameters()
    ]


def test_residual_encoder_option():
    plan = plan_preset("cpu-small", base_filters=4, residual=True)
    assert plan.residual and plan.blocks_per_stage == (1, 3, 4, 6)  # nnU-Net ResEnc's blocks per stage
    net = plan.network()
    assert isinstance(net, ResidualEncoderDynUNet) and isinstance(net, DynUNet)
    assert len(net.downsamples[0]) == 3 and len(net.downsamples[1]) == 4 and len(net.bottleneck) == 6
    # still DynUNet's layout for the fine-tuning registry
    parts = {info.part for info in describe_parameters(net).values()}
    assert parts == {"encoder", "decoder"}
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(1, 1, *plan.patch_size)).shape == (1, 2, *plan.patch_size)
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / "train.json")])
    parser["plan"] = plan.to_config()
    parser["device"] = "$torch.device('cpu')"
    assert isinstance(parser.get_parsed_content("network_def"), ResidualEncoderDynUNet)
    # a plain residual DynUNet (one block per stage) is MONAI's own
    one_block = plan_preset("cpu-small", residual=True, blocks_per_stage=[1, 1, 1, 1]).network()
    assert isinstance(one_block, ResidualEncoderDynUNet)
    assert type(plan_preset("cpu-small").network(residual=True)) is DynUNet
    # ResEncM-like at 8 GB stays within its own (residual) reference
    resenc_m = plan_preset("paper-resenc-m")
    assert resenc_m.estimate_feature_map_elements() <= 680e6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(spacing=(1.0, 1.0, 1.0, 1.0), patch_size=(64, 64, 64, 64)), "2 or 3 entries"),
        (dict(spacing=(1.0, -1.0, 1.0), patch_size=(64, 64, 64)), "finite and > 0"),
        (dict(spacing=(1.0, 1.0, 1.0), patch_size=(64, 64)), "one entry per axis"),
        (dict(spacing=(1.0, 1.0, 1.0), patch_size=(64, 64.5, 64)), "positive integers"),
        (dict(spacing=(1.0, 1.0, 1.0), patch_size=(12, 12, 12)), "allows only 1 pooling"),
        (dict(spacing=(1.0, 1.0, 1.0), patch_size=(64, 64, 64), memory_gb=0.0), "memory_gb must be > 0"),
        (dict(spacing=(1.0, 1.0, 1.0), patch_size=(64, 64, 64), memory_gb=1e-4), "no patch fits"),
        (dict(spacing=(1.0, 1.0, 1.0), patch_size=(64, 64, 64), batch_size=0), "batch_size must be"),
        (dict(spacing=(1.0, 1.0, 1.0), patch_size=(64, 64, 64), blocks_per_stage=[1, 2]), "needs residual=True"),
        (
            dict(spacing=(1.0, 1.0, 1.0), patch_size=(64, 64, 64), residual=True, blocks_per_stage=[1, 2]),
            "blocks_per_stage has 2 entries",
        ),
        (dict(spacing=(1.0, 1.0, 1.0), patch_size=(64, 64, 64), base_filters=32, max_filters=16), "max_filters"),
    ],
)
def test_invalid_inputs_are_refused_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_dynunet(**kwargs)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="known presets: " + ", ".join(PRESETS)):
        plan_preset("huge")


# ------------------------------------------------------------------------------- SwinUNETR and factory


def test_swinunetr_v1_and_v2():
    v1 = build_swinunetr("v1", feature_size=12)
    v2 = build_swinunetr("v2", feature_size=12)
    assert isinstance(v1, SwinUNETR) and isinstance(v2, SwinUNETR)
    assert not hasattr(v1.swinViT, "layers1c") and hasattr(v2.swinViT, "layers1c")  # v2's residual conv stages
    # gradient checkpointing: on for v2 by default, off for v1
    assert v2.swinViT.layers1[0].blocks[0].use_checkpoint and not v1.swinViT.layers1[0].blocks[0].use_checkpoint
    v2.eval()
    with torch.no_grad():
        assert v2(torch.randn(1, 1, 32, 64, 32)).shape == (1, 2, 32, 64, 32)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(version="v3"), "known versions: v1, v2"),
        (dict(feature_size=16), "multiple of 12"),
        (dict(img_size=(96, 96, 96)), "img_size"),
    ],
)
def test_swinunetr_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_swinunetr(**kwargs)


def test_build_network_by_name():
    assert type(build_network("dynunet", base_filters=4)) is NNUNetDynUNet
    assert isinstance(build_network("dynunet_resenc", base_filters=4), ResidualEncoderDynUNet)
    assert build_network("dynunet", plan=plan_preset("cpu-small", base_filters=4)).filters == [4, 8, 16, 32]
    swin = build_network("swinunetr_v2", feature_size=12, out_channels=3)
    assert isinstance(swin, SwinUNETR) and swin.out.conv.conv.out_channels == 3
    assert isinstance(build_network("swinunetr", feature_size=12), SwinUNETR)
    with pytest.raises(ValueError, match="known networks: " + ", ".join(NETWORKS)):
        build_network("unet3d")
    with pytest.raises(ValueError, match="either a plan or planner arguments"):
        build_network("dynunet", plan=plan_preset("cpu-small"), base_filters=4)
