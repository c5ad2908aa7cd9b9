"""``--patch_size`` of ``python -m monai.bundle run``: a patch the network cannot take is refused in initialize,
naming the total stride; a patch it can take reaches the crops, the sliding window and the network alike."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from bundle_support import BUNDLE_NAMES, BUNDLES, make_workflow


@pytest.mark.parametrize("configs", [["train"], ["train", "multi_gpu_train"]], ids=["train", "multi_gpu"])
@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_a_patch_that_does_not_fit_the_strides_is_refused_before_any_work(bundle, configs, tiny_ct, tmp_path):
    """Refused in initialize, before any folder is made (under torchrun: before the process group starts)."""
    workflow = make_workflow(bundle, configs, "train", preset="tiny", datalist=tiny_ct.hn,
                             ckpt_dir=str(tmp_path / "ckpt"), patch_size=[60, 64, 32])
    with pytest.raises(Exception) as raised:
        workflow.initialize()
    chain, err = [], raised.value
    while err is not None:
        chain.append(str(err))
        err = err.__cause__ or err.__context__
    message = " ".join(chain)
    assert "patch_size [60, 64, 32] does not fit the network" in message and "total stride" in message
    assert not (tmp_path / "ckpt").exists() and not torch.distributed.is_initialized()


def test_a_fitting_patch_changes_crops_window_and_network_input_together(tiny_ct, tmp_path):
    patch = [48, 40, 24]  # the tiny plan's total strides are 8, 8, 4
    workflow = make_workflow("ln_ct_dynunet", ["train"], "train", preset="tiny", datalist=tiny_ct.hn,
                             ckpt_dir=str(tmp_path / "ckpt"), patch_size=patch)
    workflow.initialize()
    parser = workflow.parser
    assert list(parser.get_parsed_content("inferer#inferer#inferer").roi_size) == patch  # validation's window
    assert list(parser.get_parsed_content("train#augmentation#0").padder.spatial_size) == patch
    assert list(parser.get_parsed_content("train#augmentation#1").cropper.spatial_size) == patch
    network = parser.get_parsed_content("network_def")
    out = network.eval()(torch.zeros(1, 1, *patch))
    assert list(out.shape[-3:]) == patch


def test_monai_bundle_run_refuses_an_unfit_patch_in_one_command(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file",
         str(BUNDLES / "ln_ct_dynunet" / "configs" / "inference.json"), "--bundle_root",
         str(BUNDLES / "ln_ct_dynunet"), "--preset", "tiny", "--patch_size", "[30, 32, 16]",
         "--datalist", f"['{tmp_path}']", "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert "patch_size [30, 32, 16] does not fit the network" in result.stderr and "[8, 8, 4]" in result.stderr
