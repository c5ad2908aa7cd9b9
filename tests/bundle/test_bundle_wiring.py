"""The bundles' wiring: the network written out as a ``plan`` component that ``--preset`` swaps, each yes/no
setting read once, and one fine-tuning handler that gets the method the network was frozen for."""

from __future__ import annotations

import pytest
import torch
from bundle_support import BUNDLE_NAMES, BUNDLES
from helpers import error_chain
from monai.bundle import ConfigParser

from dgst_monai.handlers import DGSTHandler, FineTuningHandler
from dgst_monai.networks import plan_preset, swinunetr_plan
from dgst_monai.networks.planner import PRESETS
from dgst_monai.networks.swinunetr import SWINUNETR_PRESETS

#: Each bundle's planner entry point and presets: what its written plan and ``--preset`` must build.
PLANNERS = {"ln_ct_dynunet": (plan_preset, PRESETS), "ln_ct_swinunetr": (swinunetr_plan, SWINUNETR_PRESETS)}


def _parser(bundle: str, names: list[str], **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / bundle / "configs" / f"{name}.json") for name in names])
    for key, value in overrides.items():
        parser[key] = value
    return parser


def _layout(network: torch.nn.Module) -> tuple[list[tuple[str, tuple[int, ...]]], int]:
    """State-dict entries with their shapes, and the parameter count."""
    return [(k, tuple(v.shape)) for k, v in network.state_dict().items()], sum(p.numel() for p in network.parameters())


@pytest.mark.parametrize(
    ("bundle", "preset"), [(b, p) for b in BUNDLE_NAMES for p in [None, *PLANNERS[b][1]]], ids=lambda v: str(v)
)
@pytest.mark.parametrize("config", ["train", "inference"])
def test_every_preset_builds_the_planners_network(bundle, preset, config):
    """No --preset: the written plan, which is the planner's paper preset; --preset X: the planner's X, with the
    same state-dict entries, shapes and parameter count as built from the planner itself (weightless)."""
    planner, _ = PLANNERS[bundle]
    overrides = {} if preset is None else {"preset": preset}
    parser = _parser(bundle, [config], **overrides)
    plan = parser.get_parsed_content("plan")
    expected = planner(preset or "paper")
    assert plan == expected
    assert tuple(parser.get_parsed_content("patch_size")) == expected.patch_size
    assert tuple(parser.get_parsed_content("spacing")) == expected.spacing
    deep = config == "train"
    # weightless where the network allows it (SwinUNETR's initialisation reads values)
    with torch.device("meta" if bundle == "ln_ct_dynunet" else "cpu"):
        built = parser.get_parsed_content("network_def")
        reference = expected.network(in_channels=1, out_channels=2, deep_supervision=deep)
    assert _layout(built) == _layout(reference)


def test_the_written_plan_is_the_network_and_a_preset_replaces_it():
    """An edit of the written plan changes the network; --preset builds the preset's plan whatever is written."""
    edited = _parser("ln_ct_dynunet", ["train"], **{"plan#filters": [16, 32, 64, 128, 160, 160]})
    with torch.device("meta"):
        network = edited.get_parsed_content("network_def")
    assert [network.input_block.conv1.conv.out_channels, network.bottleneck.conv1.conv.out_channels] == [16, 160]
    swapped = _parser("ln_ct_dynunet", ["train"], preset="tiny", **{"plan#filters": [16, 32, 64, 128, 160, 160]})
    assert swapped.get_parsed_content("plan") == plan_preset("tiny")


def test_a_swinunetr_preset_keeps_the_written_version():
    """--preset sets the SwinUNETR's size, --swin_version its version."""
    parser = _parser("ln_ct_swinunetr", ["train"], preset="tiny", swin_version="v2")
    assert parser.get_parsed_content("plan") == swinunetr_plan("tiny", version="v2")
    assert parser.get_parsed_content("network_def").swinViT.use_v2 is True


def test_each_yes_no_setting_is_read_once_for_every_consumer():
    """``--amp no --compile 0 --mirror yes``: the trainer, the validator and the window inferer get the booleans
    of one ``settings`` entry each; a word that is no yes/no stops the parse naming the key."""
    parser = _parser("ln_ct_dynunet", ["train"], preset="tiny", amp="no", compile="0", mirror="yes", datalist="x")
    assert parser.get_parsed_content("settings#amp") is False
    mirroring = parser.get_parsed_content("inferer").inferer
    assert mirroring.enabled is True and mirroring is parser.get_parsed_content("validate#inferer").inferer
    wrong = _parser("ln_ct_dynunet", ["train"], amp="maybe")
    with pytest.raises(Exception) as raised:
        wrong.get_parsed_content("settings#amp")
    assert any("amp must be true or false" in str(e) for e in error_chain(raised.value))


@pytest.mark.parametrize("method", ["bias", "full"])
def test_one_method_definition_freezes_the_network_and_drives_the_handler(method, tiny_ct):
    """finetune.json resolves the method once: the network is frozen for it before the optimizer is built, and
    the handler is a FineTuningHandler of that same registry entry, with the config's gradient clipping."""
    parser = _parser(
        "ln_ct_dynunet", ["train", "finetune"], preset="tiny", method=method, clip_grad_norm=3.0,
        datalist=tiny_ct.mediastinum,
    )  # fmt: skip
    method_def = parser.get_parsed_content("method_def")
    network = parser.get_parsed_content("network")
    trainable = {n for n, p in network.named_parameters() if p.requires_grad}
    assert trainable == {n for n, t in method_def.trainable(network).items() if t}
    if method == "bias":
        assert trainable and all(n.endswith("bias") for n in trainable)
    optimized = {id(p) for group in parser.get_parsed_content("optimizer").param_groups for p in group["params"]}
    assert optimized == {id(p) for p in network.parameters()}
    handler = parser.get_parsed_content("dgst_handler")
    assert type(handler) is FineTuningHandler and handler.method is method_def and handler.clip_grad_norm == 3.0
    assert DGSTHandler is FineTuningHandler


def test_a_disabled_size_prior_reads_no_case(tiny_ct):
    """--size_prior false: the handler attaches nothing and reads nothing, even where the prior could not run
    (every training case a shot, no unlabeled volume); --size_prior true refuses that set-up when attached."""
    common = dict(
        preset="tiny", method="spatial_adapter", shots=2, normalization="shots", datalist=tiny_ct.mediastinum,
        num_workers=0,
    )
    off = _parser("ln_ct_dynunet", ["train", "finetune"], size_prior="false", **common)
    trainer = off.get_parsed_content("train#trainer")
    prior = off.get_parsed_content("size_prior_handler")
    assert prior.enabled is False and prior.unlabeled is None and prior.target_fraction is None
    assert trainer is not None
    on = _parser("ln_ct_dynunet", ["train", "finetune"], size_prior="yes", **common)
    with pytest.raises(Exception) as raised:
        on.get_parsed_content("train#trainer")
    assert any("all 2 training cases are shots" in str(e) for e in error_chain(raised.value))
