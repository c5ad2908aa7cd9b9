"""The FSEFT black-box spatial adapter: the foundation never changes, only the adapter trains; checkpoints load
the plain foundation strictly, rebuild around a plain network, and export to TorchScript with ckpt_export."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import build_tiny_inference_dynunet, decay_sgd, run_saving_merged
from monai.bundle import ckpt_export
from monai.handlers import CheckpointLoader
from monai.networks.nets import SwinUNETR
from torch import nn

from dgst_monai import DGSTHandler, apply_method, get_method
from dgst_monai.networks import MergedView, SpatialAdapter, SpatialAdapterNetwork, for_checkpoint

ADAPTER_PARAMS = {"spatial_adapter.conv1.weight", "spatial_adapter.conv2.weight"}


def _foundation_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the wrapped foundation, copied."""
    return {k: v.detach().clone() for k, v in net.foundation.state_dict(keep_vars=True).items()}


def test_wrapper_starts_as_the_foundation_and_keeps_it_in_eval_mode(tiny_dynunet):
    """apply_method wraps (does not modify) the foundation: same output at init, foundation frozen and in eval
    mode through train(), only the two bias-free 3x3x3 adapter convs trainable, the last one zero."""
    foundation = tiny_dynunet()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        expected = foundation.eval()(x)
    foundation.train()
    keys = list(foundation.state_dict())
    net = apply_method(foundation, "spatial_adapter")
    assert isinstance(net, SpatialAdapterNetwork) and net.foundation is foundation
    assert list(foundation.state_dict()) == keys  # nothing was added to it
    assert {n for n, p in net.named_parameters() if p.requires_grad} == ADAPTER_PARAMS
    adapter = net.spatial_adapter
    for conv in (adapter.conv1, adapter.conv2):
        assert conv.kernel_size == (3, 3, 3) and conv.bias is None and conv.in_channels == conv.out_channels == 2
    assert isinstance(adapter.act, nn.ReLU) and not adapter.conv2.weight.any()
    net.train()
    assert net.training and adapter.training and not any(m.training for m in foundation.modules())
    with torch.no_grad():
        assert torch.equal(net(x), expected)  # eval-mode foundation output (B, C, ...) plus a zero residual
    assert apply_method(net, "spatial_adapter") is net


def test_trainer_steps_leave_the_foundation_bit_identical(tiny_dynunet, trainer_factory, tmp_path):
    """SupervisedTrainer + DGSTHandler('spatial_adapter') with SGD (momentum, weight decay) over *all*
    parameters, the deep-supervision loss and a batch-norm foundation (running statistics would move in train
    mode): after the plain foundation checkpoint loads strictly, every foundation parameter and buffer stays
    bit-identical and exactly the adapter's two weights change."""
    foundation = tiny_dynunet(norm_name="batch")
    path = tmp_path / "foundation.pt"
    torch.save(foundation.state_dict(), path)
    net = apply_method(tiny_dynunet(norm_name="batch"), "spatial_adapter")  # only the load equals
    trainer = trainer_factory(net, decay_sgd(net), iterations=3)
    CheckpointLoader(load_path=str(path), load_dict={"model": net}).attach(trainer)
    DGSTHandler(method="spatial_adapter").attach(trainer)
    adapter_before = {n: p.detach().clone() for n, p in net.named_parameters() if n in ADAPTER_PARAMS}
    trainer.run()

    after = _foundation_state(net)
    loaded = foundation.state_dict()
    assert after.keys() == loaded.keys() and any("running_mean" in k for k in after)
    assert [k for k in after if not torch.equal(after[k], loaded[k])] == []
    assert not any(m.training for m in net.foundation.modules())
    assert {n for n, p in net.named_parameters() if n in ADAPTER_PARAMS and not torch.equal(p, adapter_before[n])} == (
        ADAPTER_PARAMS
    )


def test_plain_foundation_checkpoint_loads_strictly_and_resets_the_adapter(tiny_dynunet):
    """A plain state dict moves under foundation. and zeroes the adapter's last conv; the wrapper's own state
    dict round-trips; a foundation state dict with a missing key still fails."""
    net = apply_method(tiny_dynunet(), "spatial_adapter").eval()
    with torch.no_grad():
        net.spatial_adapter.conv2.weight.normal_()
    own = {k: v.clone() for k, v in net.state_dict().items()}
    other = tiny_dynunet().eval()
    net.load_state_dict(other.state_dict(), strict=True)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(net(x), other(x))
    net.load_state_dict(own, strict=True)
    assert torch.equal(net.spatial_adapter.conv2.weight, own["spatial_adapter.conv2.weight"])
    with pytest.raises(RuntimeError, match="Missing key"):
        net.load_state_dict({k: v for k, v in other.state_dict().items() if "bottleneck" not in k}, strict=True)


def test_stacked_heads_get_the_same_adapter_each():
    """A foundation whose output stacks heads (B, 1 + h, C, ...) gets the adapter on every head."""

    class Stacked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.out_channels = 2
            self.conv = nn.Conv3d(1, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return torch.stack([y, 2 * y, -y], dim=1)

    net = SpatialAdapterNetwork(Stacked())
    with torch.no_grad():
        net.spatial_adapter.conv2.weight.normal_()
        x = torch.randn(2, 1, 8, 8, 8)
        heads = net.foundation(x)
        out = net(x)
    assert out.shape == heads.shape == (2, 3, 2, 8, 8, 8)
    for h in range(3):
        assert torch.allclose(out[:, h], net.spatial_adapter(heads[:, h]), atol=1e-6)


def test_spatial_adapter_checkpoint_rebuilds_and_scripts(tiny_dynunet, trainer_factory, tmp_path):
    """The fine-tuned wrapper saved through MergedView is foundation.* + spatial_adapter.*; for_checkpoint turns
    a freshly built plain DynUNet without deep supervision into the wrapper, which loads strictly, scripts, and
    reproduces the fine-tuned output exactly."""
    net = apply_method(tiny_dynunet(), "spatial_adapter")
    trainer = trainer_factory(net, decay_sgd(net), iterations=2)
    DGSTHandler(method="spatial_adapter").attach(trainer)
    state = torch.load(run_saving_merged(trainer, net, tmp_path), weights_only=True)
    assert {k.split(".")[0] for k in state} == {"foundation", "spatial_adapter"}
    assert state["spatial_adapter.conv2.weight"].any()

    plain = build_tiny_inference_dynunet()
    rebuilt = for_checkpoint(plain, tmp_path / "model.pt")
    assert isinstance(rebuilt, SpatialAdapterNetwork) and rebuilt.foundation is plain
    rebuilt.load_state_dict(state, strict=True)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        expected = net.eval()(x)
        assert torch.equal(rebuilt.eval()(x), expected)
        assert torch.equal(torch.jit.script(rebuilt)(x), expected)


def test_output_channels_from_the_head_and_tracing(tiny_dynunet):
    """SwinUNETR has no out_channels attribute: the adapter's channels come from its head. A foundation that
    does not script (the deep-supervised DynUNet, like SwinUNETR) traces exactly inside the wrapper."""
    swin = SwinUNETR(in_channels=1, out_channels=3, feature_size=12, depths=(1, 1, 1, 1))
    assert SpatialAdapterNetwork(swin).spatial_adapter.conv1.in_channels == 3
    net = SpatialAdapterNetwork(tiny_dynunet()).eval()
    with torch.no_grad():
        net.spatial_adapter.conv2.weight.normal_(std=0.1)
        x = torch.randn(1, 1, 16, 16, 16)
        traced = torch.jit.trace(net, x)
        assert torch.equal(traced(x), net(x))


@pytest.mark.parametrize("method", ["adapter", "spatial_adapter"])
def test_ckpt_export_with_the_rebuilt_network(method, tiny_dynunet, tmp_path):
    """`python -m monai.bundle ckpt_export network ...` on a config whose network is
    for_checkpoint(@network_def, @checkpoint): the TorchScript model gives the fine-tuned network's output."""
    net = apply_method(tiny_dynunet(), method).eval()
    with torch.no_grad():
        for name, param in net.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.2)
    (tmp_path / "models").mkdir()
    torch.save(MergedView(net).state_dict(), tmp_path / "models" / "model.pt")
    config = {
        "imports": ["$import dgst_monai"],
        "bundle_root": str(tmp_path),
        "checkpoint": "$@bundle_root + '/models/model.pt'",
        "network_def": {  # the tiny DynUNet without deep supervision, loading the training checkpoint
            "_target_": "dgst_monai.networks.inference.drop_deep_supervision_heads_on_load",
            "network": {
                "_target_": "DynUNet",
                "spatial_dims": 3,
                "in_channels": 1,
                "out_channels": 2,
                "kernel_size": [3, 3, 3, 3],
                "strides": [1, 2, 2, 2],
                "upsample_kernel_size": [2, 2, 2],
                "filters": [4, 8, 16, 32],
                "norm_name": ["INSTANCE", {"affine": True}],
            },
        },
        "network": "$dgst_monai.networks.for_checkpoint(@network_def, @checkpoint)",
    }
    config_file = tmp_path / "inference.json"
    config_file.write_text(json.dumps(config), encoding="utf-8")
    ckpt_export(
        "network",
        filepath=str(tmp_path / "models" / "model.ts"),
        ckpt_file=str(tmp_path / "models" / "model.pt"),
        config_file=str(config_file),
        bundle_root=str(tmp_path),
    )
    exported = torch.jit.load(str(tmp_path / "models" / "model.ts")).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(exported(x), net(x), atol=1e-6)


def test_bad_input_is_explained():
    with pytest.raises(ValueError, match="odd"):
        SpatialAdapter(2, kernel_size=2)
    with pytest.raises(ValueError, match="channels"):
        SpatialAdapterNetwork(nn.Sequential(nn.Conv3d(1, 2, 3)))
    with pytest.raises(ValueError, match="apply_method"):
        get_method("spatial_adapter").trainable(nn.Sequential(nn.Conv3d(1, 2, 3)))
