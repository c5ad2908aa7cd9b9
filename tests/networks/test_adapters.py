"""LoRA and the Houlsby Adapter: what they inject, what they train, LoRA merging back exactly, the Adapter
staying in the network (not mergeable) and being rebuilt from its checkpoint, and loading the foundation."""

from __future__ import annotations

import pytest
import torch
from helpers import build_tiny_inference_dynunet, changed_by_plain_steps, decay_sgd, run_saving_merged
from monai.handlers import CheckpointLoader
from monai.networks.nets import DynUNet
from torch import nn

from dgst_monai import DGSTHandler, apply_method, get_method
from dgst_monai.networks import NNUNetDynUNet, for_checkpoint
from dgst_monai.networks.adapters import (
    Adapter,
    LoRAConv,
    inject_adapters,
    inject_lora,
    injected_layers,
    merge,
    rebuild_adapters,
)

INJECTED = ("lora", "adapter")
LORA_PARTS = (".lora_A.", ".lora_B.")
ADAPTER_PARTS = (".adapter.",)
HEADS = ("output_block.", "deep_supervision_heads.")
#: the conv2 Convolution of every conv block of the tiny DynUNet: where the adapters go
ADAPTER_SITES = {
    "input_block.conv2",
    "downsamples.0.conv2",
    "downsamples.1.conv2",
    "bottleneck.conv2",
    "upsamples.0.conv_block.conv2",
    "upsamples.1.conv_block.conv2",
    "upsamples.2.conv_block.conv2",
}


def _perturb_injected(net: nn.Module, scale: float = 0.2) -> None:
    """Give every trainable parameter a random value, as training would (B / up are zero at injection)."""
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)


def _plain_names(net: nn.Module) -> set[str]:
    return {n for n, _ in net.named_parameters()}


def _expected_trainable(net: nn.Module, method: str) -> set[str]:
    parts = LORA_PARTS if method == "lora" else ADAPTER_PARTS
    return {n for n, _ in net.named_parameters() if n.startswith(HEADS) or any(p in n for p in parts)}


# ---------------------------------------------------------------- what gets injected


def test_lora_uses_peft_for_conv3d_and_ours_for_transposed_and_pointwise_convs(tiny_dynunet):
    """lora: peft on 3x3x3 Conv3d, LoRAConv on ConvTranspose3d and 1x1x1 Conv3d, heads untouched, starts equal."""
    net = tiny_dynunet(res_block=True).eval()  # UnetResBlock adds 1x1x1 residual convs (conv3)
    x = torch.randn(1, 1, 16, 16, 16)
    before = net(x)
    plain_convs = {n: type(m) for n, m in net.named_modules() if isinstance(m, nn.modules.conv._ConvNd)}

    apply_method(net, "lora")
    layers = injected_layers(net)
    assert set(layers) == {n for n in plain_convs if not n.startswith(HEADS)}
    for name, layer in layers.items():
        base = layer.base_layer
        if base.kernel_size == (3, 3, 3) and not base.transposed:
            assert type(layer).__module__.startswith("peft."), name
            assert layer.r["default"] == 32 and layer.lora_alpha["default"] == 16 and layer.scaling["default"] == 0.5
            assert layer.lora_dropout["default"].p == 0.1
        else:  # ConvTranspose3d (peft refuses it) or 1x1x1 (peft's merge mis-shapes it)
            assert isinstance(layer, LoRAConv), name
            assert (layer.r, layer.alpha, layer.scaling, layer.lora_dropout.p) == (32, 16, 0.5, 0.1)
    assert any(isinstance(m, LoRAConv) and m.base_layer.transposed for m in layers.values())
    assert any(isinstance(m, LoRAConv) and m.base_layer.kernel_size == (1, 1, 1) for m in layers.values())
    assert isinstance(net, DynUNet)
    assert torch.equal(net(x), before)  # B = 0: the adapted network is the foundation network


@pytest.mark.parametrize("res_block", [False, True])
def test_adapter_follows_the_last_conv_of_every_block(res_block, tiny_dynunet):
    """adapter: one Houlsby Adapter after conv2 of every conv block (before its norm), width channels // 4,
    the block's LeakyReLU, zero up-projection; the foundation's keys unchanged and its output reproduced exactly."""
    net = tiny_dynunet(res_block=res_block).eval()
    plain_keys = list(net.state_dict())
    x = torch.randn(1, 1, 16, 16, 16)
    before = net(x)
    apply_method(net, "adapter")
    layers = injected_layers(net)
    assert set(layers) == {f"{site}.adapter" for site in ADAPTER_SITES}
    for name, adapter in layers.items():
        block = net.get_submodule(name.rsplit(".", 2)[0])
        conv = block.conv2.conv
        assert isinstance(adapter, Adapter) and list(block.conv2) == [conv, adapter]  # conv, then adapter, then norm2
        assert adapter.down.out_channels == max(1, conv.out_channels // 4) == adapter.up.in_channels
        assert adapter.up.out_channels == conv.out_channels and adapter.up.bias is None
        assert isinstance(adapter.act, nn.LeakyReLU) and adapter.act.negative_slope == block.lrelu.negative_slope
        assert adapter.act is not block.lrelu
        assert not adapter.up.weight.any()
    state = net.state_dict()
    assert [k for k in state if ".adapter." not in k] == plain_keys  # adapters only add keys
    assert torch.equal(net(x), before)  # up = 0: the adapted network is the foundation network


def test_adapter_is_not_mergeable_into_a_convolution(tiny_dynunet):
    """With a trained (non-zero) up, the adapted conv2 is not an affine map of its input, so no convolution
    (no plain DynUNet) reproduces it; the whole network differs from its plain part, and merge keeps it."""
    net = apply_method(tiny_dynunet(), "adapter").eval()
    _perturb_injected(net)
    conv2 = net.bottleneck.conv2  # Convolution: conv, then adapter
    u, v = torch.randn(2, 1, conv2.conv.in_channels, 2, 2, 2).unbind(0)
    zero = torch.zeros_like(u)
    with torch.no_grad():
        # any convolution c (bias or not) has c(u + v) + c(0) == c(u) + c(v)
        conv_gap = (conv2.conv(u + v) + conv2.conv(zero) - conv2.conv(u) - conv2.conv(v)).abs().max()
        gap = (conv2(u + v) + conv2(zero) - conv2(u) - conv2(v)).abs().max()
        adapter = conv2.adapter
        branch = lambda z: adapter(z) - z  # noqa: E731 - the bottleneck alone
        scaled_gap = (branch(2 * u) - 2 * branch(u)).abs().max()
    assert conv_gap < 1e-5 and gap > 1e-2 and scaled_gap > 1e-2

    x = torch.randn(1, 1, 16, 16, 16)
    plain = tiny_dynunet().eval()
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if ".adapter." not in k})
    merged = merge(net).eval()
    with torch.no_grad():
        y = net(x)
        assert (y - plain(x)).abs().max() > 1e-2
        assert torch.equal(merged(x), y) and set(injected_layers(merged)) == set(injected_layers(net))


# ---------------------------------------------------------------- what trains


@pytest.mark.parametrize("method", INJECTED)
def test_plain_loop_changes_only_injected_modules_and_heads(
    method, tiny_dynunet, batch_factory
):
    """apply_method + SGD(momentum, weight decay) for 2 steps: exactly the LoRA/adapter weights and heads move."""
    net = tiny_dynunet(res_block=True)
    assert apply_method(net, method) is net
    expected = _expected_trainable(net, method)
    assert {n for n, p in net.named_parameters() if p.requires_grad} == expected
    # the optimizer holds all parameters: the frozen foundation weights must stay put anyway
    assert changed_by_plain_steps(net, [batch_factory(1) for _ in range(2)]) == expected


@pytest.mark.parametrize("method", INJECTED)
def test_bundle_wiring_loads_the_foundation_then_trains(method, tiny_dynunet, trainer_factory, take_snapshot, tmp_path):
    """finetune.json's wiring: apply_method at config time, CheckpointLoader + DGSTHandler at STARTED.

    The plain foundation checkpoint loads strictly into the injected network, its weights stay frozen, the
    injected modules and heads train, and the merged result loads into a fresh plain DynUNet.
    """
    foundation = tiny_dynunet()
    path = tmp_path / "model.pt"
    torch.save(foundation.state_dict(), path)  # raw state dict, as CheckpointSaver writes a single object

    net = apply_method(tiny_dynunet(), method)  # a different random init: only the checkpoint makes it equal
    trainer = trainer_factory(net, decay_sgd(net), iterations=2)
    CheckpointLoader(load_path=str(path), load_dict={"model": net}).attach(trainer)
    DGSTHandler(method=method).attach(trainer)
    trainer.run()

    plain = foundation.state_dict()
    after = take_snapshot(net)
    for name, value in after.items():
        if ".base_layer." in name:
            assert torch.equal(value, plain[name.replace(".base_layer.", ".")]), name  # loaded, then frozen
        elif name.startswith(HEADS):
            assert not torch.equal(value, plain[name]), name  # loaded, then trained
    expected = _expected_trainable(net, method)
    assert {n for n, p in net.named_parameters() if p.requires_grad} == expected

    # the saved checkpoint loads into a fresh plain network (rebuilt for the adapter), computing the same
    state = merge(net).state_dict()
    fresh = for_checkpoint(tiny_dynunet(), state)
    fresh.load_state_dict(state, strict=True)
    x = torch.randn(1, 1, 16, 16, 16)
    net.eval(), fresh.eval()
    with torch.no_grad():
        assert (net(x) - fresh(x)).abs().max() < 1e-4


def test_injected_method_on_a_plain_network_is_refused(tiny_dynunet, trainer_factory):
    """A DGSTHandler('lora') on a network built without apply_method fails instead of training the heads only."""
    net = tiny_dynunet()
    with pytest.raises(ValueError, match="apply_method"):
        get_method("lora").trainable(net)
    trainer = trainer_factory(net, decay_sgd(net), iterations=1)
    DGSTHandler(method="adapter").attach(trainer)
    with pytest.raises(ValueError, match="apply_method"):
        trainer.run()


# ---------------------------------------------------------------- merging


@pytest.mark.parametrize("res_block", [False, True])
def test_merge_equals_the_lora_network(res_block, tiny_dynunet):
    """merge of LoRA: a plain DynUNet with the foundation's keys, strict-loadable, computing the same (<= 1e-4)."""
    net = tiny_dynunet(res_block=res_block).eval()
    keys = list(net.state_dict())
    apply_method(net, "lora")
    _perturb_injected(net)
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        y = net(x)
    merged = merge(net)
    assert type(merged) is DynUNet and not injected_layers(merged) and not hasattr(merged, "peft_config")
    assert list(merged.state_dict()) == keys
    assert all(p.requires_grad for p in merged.parameters())
    fresh = tiny_dynunet(res_block=res_block).eval()
    fresh.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        error = (fresh(x) - y).abs().max().item()
    assert error < 1e-4, error
    assert (y - tiny_dynunet(res_block=res_block).eval()(x)).abs().max() > 1e-2  # the update is not trivial
    assert injected_layers(net)  # merge copies: the training network keeps its modules


@pytest.mark.parametrize(
    "base",
    [
        nn.ConvTranspose3d(6, 4, kernel_size=2, stride=2, bias=True),
        nn.ConvTranspose3d(6, 4, kernel_size=3, stride=2, padding=1, output_padding=1, bias=False),
        nn.Conv3d(6, 4, kernel_size=1, bias=True),
        nn.Conv3d(6, 4, kernel_size=1, stride=2, bias=False),
        nn.Conv3d(6, 4, kernel_size=(1, 1, 3), padding=(0, 0, 1)),
        nn.Conv3d(6, 4, kernel_size=3, padding=2, dilation=2),
    ],
    ids=["convT-k2s2", "convT-k3s2-outpad", "pointwise", "pointwise-s2", "k113", "dilated"],
)
def test_own_lora_merges_exactly(base):
    """LoRAConv on transposed, 1x1x1, 1x1xk and dilated convs: merged conv equals the LoRA layer (<= 1e-4)."""
    layer = LoRAConv(base, r=8, alpha=16, dropout=0.1).eval()
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(2, 6, 7, 7, 7)
    with torch.no_grad():
        y, z = layer(x), layer.merged()(x)
    assert type(layer.merged()) is type(base) and y.shape == z.shape
    assert (y - z).abs().max() < 1e-4
    assert (y - base(x)).abs().max() > 1e-2


def test_merged_view_saves_a_plain_checkpoint(tiny_dynunet, trainer_factory, tmp_path):
    """CheckpointSaver(save_dict={"model": MergedView(network)}) writes what the plain network_def loads."""
    net = tiny_dynunet()
    keys = list(net.state_dict())
    apply_method(net, "lora")
    trainer = trainer_factory(net, decay_sgd(net), iterations=1)
    state = torch.load(run_saving_merged(trainer, net, tmp_path), weights_only=True)
    assert list(state) == keys
    fresh = tiny_dynunet().eval()
    fresh.load_state_dict(state, strict=True)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert (fresh(x) - net.eval()(x)).abs().max() < 1e-4


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("res_block", [False, True])
def test_adapter_checkpoint_rebuilds_in_a_plain_network(res_block, tiny_dynunet, trainer_factory, tmp_path):
    """A fine-tuned adapter network saved by CheckpointSaver(MergedView) loads, after for_checkpoint, strictly
    into a freshly built plain DynUNet and into the inference network without deep supervision, and TorchScript
    keeps the adapters: all give the fine-tuned network's output exactly."""
    net = apply_method(tiny_dynunet(res_block=res_block), "adapter")
    trainer = trainer_factory(net, decay_sgd(net), iterations=2)
    DGSTHandler(method="adapter").attach(trainer)
    path = run_saving_merged(trainer, net, tmp_path)
    state = torch.load(path, weights_only=True)
    assert any(v.any() for k, v in state.items() if k.endswith(".adapter.up.weight"))  # trained, so non-trivial

    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        expected = net.eval()(x)
    inference = build_tiny_inference_dynunet(res_block=res_block)  # TorchScript scripts only this form
    for plain in (tiny_dynunet(res_block=res_block), inference):
        rebuilt = for_checkpoint(plain, path)
        assert rebuilt is plain and set(injected_layers(rebuilt)) == {f"{s}.adapter" for s in ADAPTER_SITES}
        rebuilt.load_state_dict(torch.load(path, weights_only=True), strict=True)
        with torch.no_grad():
            assert torch.equal(rebuilt.eval()(x), expected)
    scripted = torch.jit.script(inference.eval())
    with torch.no_grad():
        assert torch.equal(scripted(x), expected)

    without = tiny_dynunet(res_block=res_block)
    with pytest.raises(RuntimeError, match="adapter"):
        without.load_state_dict(state, strict=True)  # a plain network cannot hold them: the rebuild is needed


def test_adapters_on_the_nnunet_layout_rebuild_and_script():
    """The bundles' NNUNetDynUNet (biased convs) built without deep supervision: adapters inject, survive a
    save / rebuild / strict load into a fresh network, and script, with identical outputs."""
    kwargs = dict(
        spatial_dims=3, in_channels=1, out_channels=2, kernel_size=[3, 3, 3], strides=[1, 2, 2],
        upsample_kernel_size=[2, 2], filters=[4, 8, 16], norm_name=("INSTANCE", {"affine": True}),
        deep_supervision=False,
    )
    net = apply_method(NNUNetDynUNet(**kwargs), "adapter").eval()
    assert len(injected_layers(net)) == 5 and net.bottleneck.conv2.conv.bias is not None
    _perturb_injected(net)
    state = merge(net).state_dict()
    fresh = for_checkpoint(NNUNetDynUNet(**kwargs), state)
    fresh.load_state_dict(state, strict=True)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        expected = net(x)
        assert torch.equal(fresh.eval()(x), expected)
        assert torch.equal(torch.jit.script(fresh)(x), expected)


def test_for_checkpoint_passes_plain_and_missing_checkpoints_and_refuses_unmerged_lora(tiny_dynunet, tmp_path):
    """A plain checkpoint or a path not written yet gives the network back unchanged; unmerged LoRA is refused."""
    net = tiny_dynunet()
    torch.save(net.state_dict(), tmp_path / "plain.pt")
    assert for_checkpoint(net, tmp_path / "plain.pt") is net and not injected_layers(net)
    assert for_checkpoint(net, tmp_path / "not_yet.pt") is net and not injected_layers(net)
    lora = apply_method(tiny_dynunet(), "lora")
    torch.save(lora.state_dict(), tmp_path / "lora.pt")
    with pytest.raises(ValueError, match="MergedView"):
        for_checkpoint(tiny_dynunet(), tmp_path / "lora.pt")
    adapted = apply_method(tiny_dynunet(), "adapter").state_dict()
    with pytest.raises(ValueError, match="does not have"):
        rebuild_adapters(nn.Sequential(nn.Conv3d(1, 2, 3)), adapted)


@pytest.mark.parametrize("method", INJECTED)
def test_plain_and_own_state_dicts_load(method, tiny_dynunet):
    """A plain state dict loads strictly and resets the injection (the net equals the loaded plain net); the
    injected network's own state dict round-trips for resuming."""
    net = apply_method(tiny_dynunet(), method).eval()
    _perturb_injected(net)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        y_trained = net(x)

    resumed = apply_method(tiny_dynunet(), method).eval()
    resumed.load_state_dict(net.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(resumed(x), y_trained)

    other = tiny_dynunet().eval()
    net.load_state_dict(other.state_dict(), strict=True)
    with torch.no_grad():
        assert (net(x) - other(x)).abs().max() < 1e-6

    with pytest.raises(RuntimeError, match="Missing key"):
        net.load_state_dict({k: v for k, v in other.state_dict().items() if "bottleneck" not in k}, strict=True)


@pytest.mark.parametrize("method", INJECTED)
def test_injection_keeps_the_networks_mode(method, tiny_dynunet):
    """Injecting into an eval-mode network gives eval-mode modules (no LoRA dropout at inference)."""
    net = apply_method(tiny_dynunet().eval(), method)
    assert not any(m.training for m in net.modules())
    net = apply_method(tiny_dynunet().train(), method)
    assert all(m.training for m in net.modules())


def test_custom_rank_survives_apply_method(tiny_dynunet):
    """inject_lora(net, r=4) before apply_method keeps rank 4 (injection is idempotent)."""
    net = inject_lora(tiny_dynunet(), r=4, alpha=8, dropout=0.0)
    n_layers = len(injected_layers(net))
    apply_method(net, "lora")
    assert len(injected_layers(net)) == n_layers
    assert all(
        (m.r if isinstance(m, LoRAConv) else m.r["default"]) == 4 for m in injected_layers(net).values()
    )


def test_bad_arguments_are_explained(tiny_dynunet):
    with pytest.raises(ValueError, match="rank"):
        inject_lora(tiny_dynunet(), r=0)
    with pytest.raises(ValueError, match="dropout"):
        inject_lora(tiny_dynunet(), dropout=1.5)
    with pytest.raises(ValueError, match="not modules"):
        inject_adapters(tiny_dynunet(), targets=["nope.conv2"])
    with pytest.raises(ValueError, match="not a sequence ending in a convolution"):
        inject_adapters(tiny_dynunet(), targets=["input_block.conv2.conv"])
    with pytest.raises(ValueError, match="no conv block"):
        inject_adapters(nn.Sequential(nn.Conv3d(1, 2, 3)))
