"""Every fine-tuning method of the paper runs through the ln_ct_dynunet finetune overlay with one override,
and the evaluate workflow loads its final checkpoint (a plain network, or one with the modules it adds)."""

from __future__ import annotations

import pytest
import torch
from bundle_support import TINY_NETWORK, TINY_RUN, run_like_model_zoo

from dgst_monai import METHODS

BUNDLE = "ln_ct_dynunet"
#: Fine-tuning runs: the tiny network and run, no validation.
TUNE_RUN = {**TINY_NETWORK[BUNDLE], **TINY_RUN, "val_interval": 0, "num_validation": 0}


@pytest.fixture(scope="module")
def foundation(tiny_ct, tmp_path_factory):
    """A tiny foundation model pre-trained for one iteration on the head-and-neck phantoms."""
    folder = tmp_path_factory.mktemp("foundation")
    run_like_model_zoo(
        BUNDLE, ["train"], "train", datalist=tiny_ct.hn, ckpt_dir=str(folder), **TINY_NETWORK[BUNDLE], **TINY_RUN
    )
    return folder / "model.pt"


def _finetune(foundation, tiny_ct, ckpt_dir, **overrides):
    """The finetune overlay from ``foundation`` on the mediastinum phantoms, run as the model zoo does."""
    return run_like_model_zoo(
        BUNDLE,
        ["train", "finetune"],
        "train",
        datalist=tiny_ct.mediastinum,
        foundation_checkpoint=str(foundation),
        ckpt_dir=str(ckpt_dir),
        **overrides,
        **TUNE_RUN,
    )


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_runs_through_the_finetune_overlay_and_evaluates(method, foundation, tiny_ct, tmp_path):
    """`--method X` fine-tunes; model.pt has the foundation's keys (LoRA/Adapter merged) and evaluates."""
    tuned = tmp_path / method
    _finetune(foundation, tiny_ct, tuned, method=method, shots=2)
    base = torch.load(foundation, map_location="cpu", weights_only=True)
    final = torch.load(tuned / "model.pt", map_location="cpu", weights_only=True)
    if method == "spatial_adapter":
        # black box: the foundation is carried unchanged, only the adapter on its output is new
        assert {k for k in final if not k.startswith("spatial_adapter.")} == {f"foundation.{k}" for k in base}
        assert all(torch.equal(final[f"foundation.{k}"], v) for k, v in base.items())
        assert any(k.startswith("spatial_adapter.") for k in final)
        base = {k: v for k, v in final.items() if k.startswith("spatial_adapter.")}
        changed = [k for k, v in base.items() if v.abs().sum() > 0]
    else:
        added = set(final) - set(base)
        # LoRA is merged back into a plain network; the Houlsby adapters stay in it
        assert added == ({k for k in final if ".adapter." in k} if method == "adapter" else set()), method
        assert set(base) <= set(final)
        changed = [k for k in base if not torch.equal(base[k], final[k])] + sorted(added)
    assert changed, f"{method}: nothing changed"
    if METHODS[method].selector is None and method not in ("full", "scratch", "lora", "adapter", "spatial_adapter"):
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
        **TUNE_RUN,
    )
    assert (tuned / "eval" / "summary.json").is_file()


def test_spatial_adapter_with_the_size_prior_through_the_overlay(foundation, tiny_ct, tmp_path):
    """`--size_prior true` attaches the transductive prior before DGSTHandler; it reads the non-shot images."""
    workflow = _finetune(
        foundation,
        tiny_ct,
        tmp_path / "tuned",
        method="spatial_adapter",
        shots=1,
        size_prior=True,
        **{"size_prior_handler#warmup_iterations": 0},
    )
    prior = workflow.parser.get_parsed_content("size_prior_handler")
    unlabeled = prior.unlabeled.dataset.data
    shots = {c["case_id"] for c in workflow.parser.get_parsed_content("shot_cases")}
    assert unlabeled and all("label" not in c and c["case_id"] not in shots for c in unlabeled)
    assert prior.last_fraction is not None and 0.0 <= float(prior.last_fraction) <= 1.0
    assert 0.0 < prior.target_fraction < 1.0
