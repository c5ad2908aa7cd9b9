"""Every fine-tuning method of the paper runs through the ln_ct_dynunet finetune overlay with one override,
and its final checkpoint is a plain network that the evaluate workflow loads."""

from __future__ import annotations

import pytest
import torch
from bundle_support import TINY_NETWORK, TINY_RUN, run_like_model_zoo

from dgst_monai import METHODS

BUNDLE = "ln_ct_dynunet"


@pytest.fixture(scope="module")
def foundation(tiny_ct, tmp_path_factory):
    """A tiny foundation model pre-trained for one iteration on the head-and-neck phantoms."""
    folder = tmp_path_factory.mktemp("foundation")
    run_like_model_zoo(
        BUNDLE, ["train"], "train", datalist=tiny_ct.hn, ckpt_dir=str(folder), **TINY_NETWORK[BUNDLE], **TINY_RUN
    )
    return folder / "model.pt"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_runs_through_the_finetune_overlay_and_evaluates(method, foundation, tiny_ct, tmp_path):
    """`--method X` fine-tunes; model.pt has the foundation's keys (LoRA/Adapter merged) and evaluates."""
    tuned = tmp_path / method
    overrides = {**TINY_NETWORK[BUNDLE], **TINY_RUN, "val_interval": 0, "num_validation": 0}
    run_like_model_zoo(
        BUNDLE,
        ["train", "finetune"],
        "train",
        datalist=tiny_ct.mediastinum,
        method=method,
        shots=2,
        foundation_checkpoint=str(foundation),
        ckpt_dir=str(tuned),
        **overrides,
    )
    base = torch.load(foundation, map_location="cpu")
    final = torch.load(tuned / "model.pt", map_location="cpu")
    assert set(final) == set(base), f"{method}: the saved checkpoint is not a plain network"
    changed = [k for k in base if not torch.equal(base[k], final[k])]
    assert changed, f"{method}: nothing changed"
    if METHODS[method].selector is None and method not in ("full", "scratch", "lora", "adapter"):
        frozen_changed = [k for k in changed if k.endswith("conv.weight") and "output_block" not in k
                          and "deep_supervision" not in k and "skip_layers" not in k]
        assert not frozen_changed or method in ("encoder", "decoder"), f"{method} changed {frozen_changed[:3]}"

    run_like_model_zoo(
        BUNDLE,
        ["train", "finetune", "evaluate"],
        "eval",
        datalist=tiny_ct.mediastinum,
        method=method,
        ckpt_dir=str(tuned),
        **overrides,
    )
    assert (tuned / "eval" / "summary.json").is_file()
