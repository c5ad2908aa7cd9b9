"""LoRA and Adapter: what they inject, what they train, that they merge back exactly and load the foundation."""

from __future__ import annotations

import pytest
import torch
from monai.handlers import CheckpointLoader, CheckpointSaver
from monai.networks.nets import DynUNet
from torch import nn

from dgst_monai import DGSTHandler, apply_method, get_method
from dgst_monai.networks.adapters import (
    ConvAdapter,
    LoRAConv,
    MergedView,
    inject_adapters,
    inject_lora,
    injected_layers,
    merge,
)

INJECTED = ("lora", "adapter")
LORA_PARTS = (".lora_A.", ".lora_B.")
ADAPTER_PARTS = (".adapter_down.", ".adapter_up.")
HEADS = ("output_block.", "deep_supervision_heads.")


def _sgd(net: nn.Module) -> torch.optim.Optimizer:
    # momentum and weight decay would move any parameter the optimizer may touch
    return torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)


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


def test_adapter_goes_after_the_last_conv_of_every_block(tiny_dynunet):
    """adapter: one ConvAdapter per conv block on conv2, width channels // 4, zero up-projection."""
    net = tiny_dynunet().eval()
    x = torch.randn(1, 1, 16, 16, 16)
    before = net(x)
    apply_method(net, "adapter")
    layers = injected_layers(net)
    assert set(layers) == {
        "input_block.conv2.conv",
        "downsamples.0.conv2.conv",
        "downsamples.1.conv2.conv",
        "bottleneck.conv2.conv",
        "upsamples.0.conv_block.conv2.conv",
        "upsamples.1.conv_block.conv2.conv",
        "upsamples.2.conv_block.conv2.conv",
    }
    for layer in layers.values():
        assert isinstance(layer, ConvAdapter)
        assert layer.hidden == max(1, layer.base_layer.out_channels // 4)
        assert not layer.adapter_up.weight.any()
    assert torch.equal(net(x), before)


# ---------------------------------------------------------------- what trains


@pytest.mark.parametrize("method", INJECTED)
def test_plain_loop_changes_only_injected_modules_and_heads(
    method, tiny_dynunet, batch_factory, loss_factory, take_snapshot
):
    """apply_method + SGD(momentum, weight decay) for 2 steps: exactly the LoRA/adapter weights and heads move."""
    net = tiny_dynunet(res_block=True)
    assert apply_method(net, method) is net
    expected = _expected_trainable(net, method)
    assert {n for n, p in net.named_parameters() if p.requires_grad} == expected
    optimizer = _sgd(net)  # over all parameters: the frozen foundation weights must stay put anyway
    loss_fn = loss_factory()
    before = take_snapshot(net)
    for _ in range(2):
        image, label = batch_factory(1)
        optimizer.zero_grad()
        loss_fn(net(image), label).backward()
        optimizer.step()
    after = take_snapshot(net)
    assert {n for n in before if not torch.equal(before[n], after[n])} == expected


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
    trainer = trainer_factory(net, _sgd(net), iterations=2)
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

    merged = merge(net)
    fresh = tiny_dynunet()
    fresh.load_state_dict(merged.state_dict(), strict=True)
    x = torch.randn(1, 1, 16, 16, 16)
    net.eval(), fresh.eval()
    with torch.no_grad():
        assert (net(x) - fresh(x)).abs().max() < 1e-4


def test_injected_method_on_a_plain_network_is_refused(tiny_dynunet, trainer_factory):
    """A DGSTHandler('lora') on a network built without apply_method fails instead of training the heads only."""
    net = tiny_dynunet()
    with pytest.raises(ValueError, match="apply_method"):
        get_method("lora").trainable(net)
    trainer = trainer_factory(net, _sgd(net), iterations=1)
    DGSTHandler(method="adapter").attach(trainer)
    with pytest.raises(ValueError, match="apply_method"):
        trainer.run()


# ---------------------------------------------------------------- merging


@pytest.mark.parametrize("method", INJECTED)
@pytest.mark.parametrize("res_block", [False, True])
def test_merge_equals_the_adapted_network(method, res_block, tiny_dynunet):
    """merge: a plain DynUNet with the foundation's keys, strict-loadable, computing the same (<= 1e-4)."""
    net = tiny_dynunet(res_block=res_block).eval()
    keys = list(net.state_dict())
    apply_method(net, method)
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


def test_adapter_merges_exactly_with_bias():
    """ConvAdapter folds into a conv with a bias and into a transposed conv."""
    for base in (nn.Conv3d(3, 8, 3, padding=1, bias=True), nn.ConvTranspose3d(3, 8, 2, stride=2, bias=True)):
        layer = ConvAdapter(base, hidden=2)
        with torch.no_grad():
            layer.adapter_up.weight.normal_()
        x = torch.randn(1, 3, 6, 6, 6)
        with torch.no_grad():
            assert (layer(x) - layer.merged()(x)).abs().max() < 1e-4


def test_merged_view_saves_a_plain_checkpoint(tiny_dynunet, trainer_factory, tmp_path):
    """CheckpointSaver(save_dict={"model": MergedView(network)}) writes what the plain network_def loads."""
    net = tiny_dynunet()
    keys = list(net.state_dict())
    apply_method(net, "lora")
    trainer = trainer_factory(net, _sgd(net), iterations=1)
    CheckpointSaver(str(tmp_path), {"model": MergedView(net)}, save_final=True, final_filename="model.pt").attach(
        trainer
    )
    trainer.run()
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert list(state) == keys
    fresh = tiny_dynunet().eval()
    fresh.load_state_dict(state, strict=True)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert (fresh(x) - net.eval()(x)).abs().max() < 1e-4


# ---------------------------------------------------------------- checkpoints


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
    with pytest.raises(ValueError, match="not plain convolutions"):
        inject_adapters(tiny_dynunet(), targets=["nope.conv"])
    with pytest.raises(ValueError, match="no conv block"):
        inject_adapters(nn.Sequential(nn.Conv3d(1, 2, 3)))
