"""Reduced-precision network calls (``AutocastInferer``, the bundles' ``precision`` setting) on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bundle_copies import copy_bundle, make_workflow
from helpers import build_tiny_dynunet, changed_names, cpu_trainer, error_chain, nnunet_sgd, patches, snapshot
from monai.inferers import SimpleInferer, SlidingWindowInferer

from dgst_monai.inferers import AutocastInferer, MirroringInferer


def _conv_dtypes(net: torch.nn.Module) -> list[torch.dtype]:
    """Records the output dtype of every 3D convolution of ``net`` while it runs."""
    seen: list[torch.dtype] = []
    for module in net.modules():
        if isinstance(module, torch.nn.Conv3d):
            module.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


def _train(precision: str | None) -> tuple[torch.nn.Module, list[torch.dtype], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    net = build_tiny_dynunet()
    before = snapshot(net)
    seen = _conv_dtypes(net)
    inferer = SimpleInferer() if precision is None else AutocastInferer(SimpleInferer(), precision)
    cpu_trainer(net, nnunet_sgd(net), patches(2), max_epochs=1, inferer=inferer).run()
    return net, seen, before


def test_bfloat16_training_runs_the_convolutions_in_bfloat16_and_keeps_float32_weights():
    net, seen, before = _train("bfloat16")
    assert seen and set(seen) == {torch.bfloat16}
    assert {p.dtype for p in net.parameters()} == {torch.float32}
    assert {p.grad.dtype for p in net.parameters() if p.grad is not None} == {torch.float32}
    # every parameter took its SGD steps (the norm affines and biases as well as the kernels)
    assert changed_names(before, snapshot(net)) == set(before)


def test_float32_is_the_wrapped_inferer_unchanged():
    plain, plain_seen, _ = _train(None)
    wrapped, wrapped_seen, _ = _train("float32")
    assert set(plain_seen) == set(wrapped_seen) == {torch.float32}
    for (name, a), b in zip(plain.state_dict().items(), wrapped.state_dict().values()):
        assert torch.equal(a, b), name


def test_bfloat16_sliding_window_inference_is_float32_and_close_to_float32():
    torch.manual_seed(0)
    net = build_tiny_dynunet(deep_supervision=False).eval()
    image = torch.randn(1, 1, 40, 36, 28, generator=torch.Generator().manual_seed(3))
    window = MirroringInferer(SlidingWindowInferer(roi_size=(16, 16, 16), overlap=0.5, mode="gaussian"), (0, 1, 2))
    seen = _conv_dtypes(net)
    with torch.inference_mode():
        reference = AutocastInferer(window, "float32")(image, net)
        n_float = len(seen)
        half = AutocastInferer(window, "bfloat16")(image, net)
    assert set(seen[:n_float]) == {torch.float32} and set(seen[n_float:]) == {torch.bfloat16}
    assert half.dtype == torch.float32 and half.shape == reference.shape == (1, 2, 40, 36, 28)
    # bfloat16 keeps 8 mantissa bits: the averaged probabilities move by a few thousandths, not more
    gap = (torch.softmax(half, 1) - torch.softmax(reference, 1)).abs().max().item()
    assert 0 < gap < 0.02


def test_unknown_precision_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"precision must be one of float32, bfloat16, float16, got 'bf16'"):
        AutocastInferer(SimpleInferer(), "bf16")


def test_bundle_precision_setting_reaches_training_and_validation(tmp_path: Path):
    root = copy_bundle(tmp_path)
    workflow = make_workflow(root, ["train"], precision="bfloat16")
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.inferer.precision == "bfloat16"
    assert workflow.parser.get_parsed_content("validate#evaluator").inferer.precision == "bfloat16"
    seen = _conv_dtypes(trainer.network)
    before = snapshot(trainer.network)
    trainer.run()
    assert seen and set(seen) == {torch.bfloat16}
    assert changed_names(before, snapshot(trainer.network))
    bad = make_workflow(root, ["train"], precision="half")
    bad.initialize()
    with pytest.raises(Exception) as refused:
        bad.parser.get_parsed_content("train#inferer")
    assert "precision must be one of float32, bfloat16, float16, got 'half'" in str(error_chain(refused.value)[-1])
