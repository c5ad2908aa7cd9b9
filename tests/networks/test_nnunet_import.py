"""Importing nnU-Net v2 models: outputs equal the original PlainConvUNet's, and bad folders fail clearly.

Each test writes a tiny fake nnU-Net v2 model folder the way nnU-Net does (``plans.json`` with
``configurations -> 3d_fullres -> architecture``, ``dataset.json``, ``fold_0/checkpoint_final.pth`` holding
``network_weights`` = ``state_dict()`` with all its aliases, ``init_args``, ``trainer_name``); the reference
network is built from the plans as nnU-Net's ``get_network_from_plans`` does (class and ops located by name).
"""

from __future__ import annotations

import copy
import json
import pydoc
from pathlib import Path

import pytest
import torch
from helpers import REPO
from monai.bundle import ConfigParser
from monai.networks.nets import DynUNet
from torch.nn.functional import interpolate

from dgst_monai import apply_method, describe_parameters
from dgst_monai.networks.nnunet_import import (
    NNUNetDynUNet,
    NNUNetImportError,
    bundle_to_nnunet_axes,
    export_nnunet,
    import_nnunet,
)
from dgst_monai.normalization import load_normalization

pytest.importorskip("dynamic_network_architectures")

BUNDLE = REPO / "bundles" / "ln_ct_dynunet"
TOLERANCE = 1e-4

# nnU-Net's (z, y, x) order. Isotropic: 3 stages, 3x3x3 everywhere. Anisotropic (thick slices): the first
# stage convolves in-plane only (1x3x3) and pools 1x2x2, as nnU-Net plans 3 mm slices at 1 mm in-plane.
ISOTROPIC = dict(
    features=[4, 8, 16],
    kernels=[[3, 3, 3], [3, 3, 3], [3, 3, 3]],
    strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]],
    patch=[16, 16, 16],
    spacing=[1.0, 1.0, 1.0],
)
ANISOTROPIC = dict(
    features=[4, 8, 16, 16],
    kernels=[[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
    strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
    patch=[8, 32, 32],
    spacing=[3.0, 1.0, 1.0],
)


def nnunet_plans(case: dict, transpose_forward=(0, 1, 2), class_name: str = "PlainConvUNet") -> dict:
    """A plans.json as nnU-Net v2's ExperimentPlanner writes it (fields it does not need kept short)."""
    n = len(case["features"])
    return {
        "dataset_name": "Dataset999_FakeLN",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": case["spacing"],
        "original_median_shape_after_transp": [64, 128, 128],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": list(transpose_forward),
        "transpose_backward": [list(transpose_forward).index(i) for i in range(3)],
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": case["patch"],
                "median_image_size_in_voxels": [64, 128, 128],
                "spacing": case["spacing"],
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {
                    "is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None
                },
                "architecture": {
                    "network_class_name": f"dynamic_network_architectures.architectures.unet.{class_name}",
                    "arch_kwargs": {
                        "n_stages": n,
                        "features_per_stage": case["features"],
                        "conv_op": "torch.nn.modules.conv.Conv3d",
                        "kernel_sizes": case["kernels"],
                        "strides": case["strides"],
                        "n_conv_per_stage": [2] * n,
                        "n_conv_per_stage_decoder": [2] * (n - 1),
                        "conv_bias": True,
                        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                        "dropout_op": None,
                        "dropout_op_kwargs": None,
                        "nonlin": "torch.nn.LeakyReLU",
                        "nonlin_kwargs": {"inplace": True},
                    },
                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
                },
                "batch_dice": False,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {"max": 3071.0, "mean": 40.0, "median": 38.0, "min": -1024.0, "percentile_00_5": -100.0,
                  "percentile_99_5": 300.0, "std": 60.0}
        },
    }


DATASET = {
    "channel_names": {"0": "CT"},
    "labels": {"background": 0, "lymph_node": 1},
    "numTraining": 4,
    "file_ending": ".nii.gz",
}


def reference_network(plans: dict, configuration: str = "3d_fullres", deep_supervision: bool = False):
    """The network nnU-Net builds from these plans (its get_network_from_plans, reduced to what it does)."""
    arch = plans["configurations"][configuration]["architecture"]
    kwargs = dict(arch["arch_kwargs"])
    for key in arch["_kw_requires_import"]:
        if kwargs[key] is not None:
            kwargs[key] = pydoc.locate(kwargs[key])
    network_class = pydoc.locate(arch["network_class_name"])
    return network_class(input_channels=1, num_classes=2, deep_supervision=deep_supervision, **kwargs)


def write_model_folder(folder: Path, plans: dict, weights: dict, configuration: str = "3d_fullres") -> Path:
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2), encoding="utf-8")
    (folder / "dataset.json").write_text(json.dumps(DATASET, indent=2), encoding="utf-8")
    checkpoint = {
        "network_weights": weights,
        "optimizer_state": {},
        "grad_scaler_state": None,
        "logging": {"epoch_end_timestamps": [1.0]},
        "_best_ema": 0.5,
        "current_epoch": 1000,
        "init_args": {
            "plans": plans,
            "configuration": configuration,
            "fold": 0,
            "dataset_json": DATASET,
            "device": torch.device("cpu"),
        },
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    return folder


def fake_model(tmp_path: Path, case: dict, name: str = "model", **plans_kwargs):
    """A trained-looking PlainConvUNet (random weights, non-zero biases and norm affines) and its folder."""
    plans = nnunet_plans(case, **plans_kwargs)
    reference = reference_network(plans)
    with torch.no_grad():
        for param in reference.parameters():  # nnU-Net initialises biases to 0: make them matter
            param.normal_(0.0, 0.3)
    folder = write_model_folder(tmp_path / name, plans, reference.state_dict())
    return reference.eval(), folder


def nnunet_outputs(reference, x: torch.Tensor, deep_supervision: bool):
    reference.decoder.deep_supervision = deep_supervision
    with torch.no_grad():
        return reference(x)


# ----------------------------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("case", [ISOTROPIC, ANISOTROPIC], ids=["isotropic", "anisotropic"])
@pytest.mark.parametrize("deep_supervision", [False, True], ids=["plain", "deep_supervision"])
def test_outputs_equal_the_nnunet_network(tmp_path, case, deep_supervision):
    reference, folder = fake_model(tmp_path, case)
    x = torch.randn(2, 1, *case["patch"])
    expected = nnunet_outputs(reference, x, deep_supervision)

    net = import_nnunet(folder, fold=0, deep_supervision=deep_supervision)
    assert isinstance(net, NNUNetDynUNet) and isinstance(net, DynUNet)
    with torch.no_grad():
        if not deep_supervision:
            got = net(x)
            assert got.shape == expected.shape
            assert (got - expected).abs().max().item() < TOLERANCE
            return
        net.train()  # DynUNet returns its heads in training mode only; instance norm behaves the same
        stacked = net(x)
    # nnU-Net: one output per decoder stage, full resolution first; DynUNet: full-resolution output_block plus
    # deep_supr_num = n_stages - 2 heads, stacked after nearest upsampling; net.heads holds them unresized
    assert len(expected) == len(case["features"]) - 1 == 1 + net.deep_supr_num
    assert stacked.shape == (2, len(expected), 2, *case["patch"])
    assert (stacked[:, 0] - expected[0]).abs().max().item() < TOLERANCE
    for head, ref in zip(net.heads, expected[1:]):
        assert head.shape == ref.shape
        assert (head - ref).abs().max().item() < TOLERANCE
    for k, ref in enumerate(expected[1:], start=1):
        upsampled = interpolate(ref, size=case["patch"])
        assert (stacked[:, k] - upsampled).abs().max().item() < TOLERANCE


def test_stock_dynunet_cannot_hold_an_anisotropic_nnunet_decoder():
    # why NNUNetDynUNet exists: stock DynUNet's top decoder stage takes kernel_size[1] (3x3x3), nnU-Net's the
    # top encoder kernel (1x3x3); and stock block convs have no bias
    kwargs = dict(
        spatial_dims=3, in_channels=1, out_channels=2, kernel_size=ANISOTROPIC["kernels"],
        strides=ANISOTROPIC["strides"], upsample_kernel_size=ANISOTROPIC["strides"][1:],
        filters=ANISOTROPIC["features"],
    )
    stock, ours = DynUNet(**kwargs), NNUNetDynUNet(**kwargs)
    assert stock.upsamples[-1].conv_block.conv1.conv.weight.shape[2:] == (3, 3, 3)
    assert ours.upsamples[-1].conv_block.conv1.conv.weight.shape[2:] == (1, 3, 3)
    assert stock.input_block.conv1.conv.bias is None and ours.input_block.conv1.conv.bias is not None
    assert ours.upsamples[0].transp_conv.conv.bias is not None


def test_bundle_axes_take_monai_arrays_and_give_the_same_logits(tmp_path):
    # nnU-Net axis a is SimpleITK axis transpose_forward[a], i.e. MONAI (x, y, z) axis 2 - transpose_forward[a]
    assert bundle_to_nnunet_axes([0, 1, 2]) == (2, 1, 0)
    assert bundle_to_nnunet_axes([2, 0, 1]) == (0, 2, 1)
    for transpose_forward in ([0, 1, 2], [2, 0, 1]):
        reference, folder = fake_model(
            tmp_path, ANISOTROPIC, name=f"tf{transpose_forward}", transpose_forward=transpose_forward
        )
        x = torch.randn(1, 1, *ANISOTROPIC["patch"])
        expected = nnunet_outputs(reference, x, False)
        perm = bundle_to_nnunet_axes(transpose_forward)
        spatial = [2 + a for a in perm]
        net = import_nnunet(folder, axes="bundle")
        assert net.kernel_size[0] == [ANISOTROPIC["kernels"][0][a] for a in perm]
        with torch.no_grad():
            got = net(x.permute(0, 1, *spatial))
        assert (got - expected.permute(0, 1, *spatial)).abs().max().item() < TOLERANCE


def test_export_loads_in_the_bundle_and_reproduces_nnunet(tmp_path):
    reference, folder = fake_model(tmp_path, ANISOTROPIC)
    checkpoint = export_nnunet(folder, tmp_path / "models")
    override = tmp_path / "models" / "model_override.json"
    assert checkpoint == tmp_path / "models" / "model.pt" and override.is_file()
    values = json.loads(override.read_text(encoding="utf-8"))
    # the topology (the bundle builds its own network class from the plan), nnU-Net's resampling rule and its
    # voxel order (no reorientation)
    assert set(values) == {"nnunet_source", "plan", "in_channels", "out_channels", "resampling", "orientation"}
    assert values["resampling"] == "nnunet" and values["orientation"] == "file"
    plan = values["plan"]
    # bundle (x, y, z) order: the nnU-Net (z, y, x) plan reversed
    assert plan["spacing"] == [1.0, 1.0, 3.0] and plan["patch_size"] == [32, 32, 8]
    assert plan["kernel_size"][0] == [3, 3, 1] and plan["strides"][1] == [2, 2, 1]
    assert plan["deep_supr_num"] == 1  # max(1, n_stages - 3): the heads nnU-Net's loss trains
    # the plans' foreground intensity properties become the checkpoint's normalisation
    props = nnunet_plans(ANISOTROPIC)["foreground_intensity_properties_per_channel"]["0"]
    intensity = load_normalization(checkpoint)
    assert intensity["a_min"] == props["percentile_00_5"] and intensity["a_max"] == props["percentile_99_5"]

    x = torch.randn(1, 1, *ANISOTROPIC["patch"])
    expected = nnunet_outputs(reference, x, False).permute(0, 1, 4, 3, 2)
    for configs in (["train.json", "finetune.json"], ["inference.json"]):
        parser = ConfigParser()
        parser.read_config([str(BUNDLE / "configs" / c) for c in configs] + [str(override)])
        parser["device"] = "$torch.device('cpu')"
        net = parser.get_parsed_content("network_def")
        assert isinstance(net, NNUNetDynUNet)
        net.load_state_dict(torch.load(checkpoint), strict=True)  # as the bundle's CheckpointLoader
        with torch.no_grad():
            got = net.eval()(x.permute(0, 1, 4, 3, 2))
        assert (got - expected).abs().max().item() < TOLERANCE


def test_imported_network_works_with_the_fine_tuning_methods(tmp_path):
    _, folder = fake_model(tmp_path, ISOTROPIC)
    net = import_nnunet(folder, deep_supervision=True)
    infos = describe_parameters(net)
    conv_biases = [n for n, i in infos.items() if i.kind == "bias" and not i.head]
    assert len(conv_biases) == 2 * 3 + 2 * 2 + 2  # 2 convs per encoder + decoder stage, 2 transposed convs
    apply_method(net, "bias")
    assert {n for n, p in net.named_parameters() if p.requires_grad} == {
        n for n, i in infos.items() if i.kind == "bias"
    }
    assert {i.part for i in infos.values()} == {"encoder", "decoder"}


def test_older_plans_format_and_configuration_inheritance(tmp_path):
    reference, folder = fake_model(tmp_path, ANISOTROPIC)
    x = torch.randn(1, 1, *ANISOTROPIC["patch"])
    expected = nnunet_outputs(reference, x, False)
    weights = reference.state_dict()

    # nnU-Net < 2.4 plans: flat architecture keys
    old = nnunet_plans(ANISOTROPIC)
    config = old["configurations"]["3d_fullres"]
    del config["architecture"]
    config.update(
        UNet_class_name="PlainConvUNet", UNet_base_num_features=4, unet_max_num_features=16,
        n_conv_per_stage_encoder=[2, 2, 2, 2], n_conv_per_stage_decoder=[2, 2, 2],
        num_pool_per_axis=[2, 3, 3], pool_op_kernel_sizes=ANISOTROPIC["strides"],
        conv_kernel_sizes=ANISOTROPIC["kernels"],
    )
    legacy = write_model_folder(tmp_path / "legacy", old, weights)
    # a configuration that inherits the architecture from 3d_fullres (as the LN-Seg-FM README recommends)
    plans = nnunet_plans(ANISOTROPIC)
    plans["configurations"]["ln_fm"] = {"inherits_from": "3d_fullres", "patch_size": [8, 32, 64]}
    inherited = write_model_folder(tmp_path / "inherited", plans, weights, configuration="ln_fm")
    for folder_ in (legacy, inherited):
        with torch.no_grad():
            assert (import_nnunet(folder_)(x) - expected).abs().max().item() < TOLERANCE


def test_all_fold_and_prefixed_weights(tmp_path):
    reference, folder = fake_model(tmp_path, ISOTROPIC)
    (folder / "fold_0").rename(folder / "fold_all")
    ckpt = torch.load(folder / "fold_all" / "checkpoint_final.pth", weights_only=False)
    ckpt["network_weights"] = {f"module.{k}": v for k, v in ckpt["network_weights"].items()}  # a DDP save
    torch.save(ckpt, folder / "fold_all" / "checkpoint_best.pth")
    x = torch.randn(1, 1, *ISOTROPIC["patch"])
    with torch.no_grad():
        got = import_nnunet(folder, fold="all", checkpoint="checkpoint_best.pth")(x)
    assert (got - nnunet_outputs(reference, x, False)).abs().max().item() < TOLERANCE


# ------------------------------------------------------------------------------------------------ errors


def test_missing_files_are_named(tmp_path):
    _, folder = fake_model(tmp_path, ISOTROPIC)
    with pytest.raises(NNUNetImportError, match=r"fold 3 not found .* available: \['fold_0'\]"):
        import_nnunet(folder, fold=3)
    with pytest.raises(NNUNetImportError, match=r"checkpoint_best\.pth: checkpoint not found"):
        import_nnunet(folder, checkpoint="checkpoint_best.pth")
    (folder / "plans.json").unlink()
    with pytest.raises(NNUNetImportError, match=r"plans\.json: missing"):
        import_nnunet(folder)
    with pytest.raises(NNUNetImportError, match="not a directory"):
        import_nnunet(tmp_path / "nowhere")


def test_weights_that_do_not_match_the_plans_are_refused(tmp_path):
    _, folder = fake_model(tmp_path, ISOTROPIC)
    plans = json.loads((folder / "plans.json").read_text(encoding="utf-8"))
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = [4, 8, 32]
    (folder / "plans.json").write_text(json.dumps(plans), encoding="utf-8")
    with pytest.raises(NNUNetImportError, match=r"checkpoint_final\.pth: tensor .* has shape .* implies"):
        import_nnunet(folder)


def test_weights_of_another_network_are_refused(tmp_path):
    _, folder = fake_model(tmp_path, ISOTROPIC)
    path = folder / "fold_0" / "checkpoint_final.pth"
    ckpt = torch.load(path, weights_only=False)
    ckpt["network_weights"] = {"swinViT.patch_embed.proj.weight": torch.zeros(12, 1, 2, 2, 2)}
    ckpt["trainer_name"] = "nnUNetTrainer_SwinUNETR"
    torch.save(ckpt, path)
    with pytest.raises(NNUNetImportError, match=r"do not match the PlainConvUNet .*nnUNetTrainer_SwinUNETR.*swinViT"):
        import_nnunet(folder)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda a: a.update(network_class_name="dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"),
         "ResidualEncoderUNet .*not supported"),
        (lambda a: a.update(network_class_name="my_project.MyUNet"), "'my_project.MyUNet' .*not supported"),
        (lambda a: a["arch_kwargs"].update(n_conv_per_stage=[3, 3, 3]), "n_conv_per_stage=.*exactly 2"),
        (lambda a: a["arch_kwargs"].update(conv_op="torch.nn.modules.conv.Conv2d"), "3D configurations only"),
        (lambda a: a["arch_kwargs"].update(dropout_op="torch.nn.Dropout3d"), "dropout_op"),
        (lambda a: a["arch_kwargs"].update(norm_op="torch.nn.BatchNorm3d"), "InstanceNorm3d only"),
    ],
    ids=["resenc", "unknown_class", "three_convs", "2d", "dropout", "batchnorm"],
)
def test_unsupported_architectures_are_refused(tmp_path, edit, message):
    _, folder = fake_model(tmp_path, ISOTROPIC)
    plans = json.loads((folder / "plans.json").read_text(encoding="utf-8"))
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    edit(arch)
    (folder / "plans.json").write_text(json.dumps(plans), encoding="utf-8")
    with pytest.raises(NNUNetImportError, match=r"plans\.json: configuration '3d_fullres'.*" + message):
        import_nnunet(folder)


def test_unknown_configuration_is_refused(tmp_path):
    _, folder = fake_model(tmp_path, ISOTROPIC)
    with pytest.raises(NNUNetImportError, match=r"configuration '2d' not found; it has \['3d_fullres'\]"):
        import_nnunet(folder, configuration="2d")
    plans = copy.deepcopy(json.loads((folder / "plans.json").read_text(encoding="utf-8")))
    plans["configurations"]["3d_fullres"]["inherits_from"] = "3d_fullres"
    (folder / "plans.json").write_text(json.dumps(plans), encoding="utf-8")
    with pytest.raises(NNUNetImportError, match="circular inherits_from"):
        import_nnunet(folder)
