"""Each bundle works from a copy of its own folder alone, as the model zoo (one zip per bundle) and MONAI Label
(one bundle copied into its app) use it: no sibling bundle, no repository around it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import SimpleITK as sitk
from monai.bundle import ConfigWorkflow, verify_net_in_out

from bundle_support import BUNDLE_NAMES, BUNDLES, TINY_NETWORK, TINY_RUN


def _workflow(root: Path, configs: list[str], workflow_type: str, **overrides) -> ConfigWorkflow:
    return ConfigWorkflow(
        config_file=[str(root / "configs" / f"{c}.json") for c in configs],
        meta_file=str(root / "configs" / "metadata.json"),
        logging_file=str(root / "configs" / "logging.conf"),
        workflow_type=workflow_type,
        bundle_root=str(root),
        **overrides,
    )


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def _checked(workflow: ConfigWorkflow) -> ConfigWorkflow:
    workflow.initialize()
    assert workflow.check_properties() == []
    return workflow


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_bundle_copied_alone_initialises_trains_infers_and_verifies(bundle, tiny_ct, tmp_path):
    root = tmp_path / "alone" / bundle
    shutil.copytree(BUNDLES / bundle, root, symlinks=True)  # a link would stay a link, and break here
    assert [p for p in root.rglob("*") if p.is_symlink()] == []
    assert sorted(p.name for p in root.parent.iterdir()) == [bundle]
    net = TINY_NETWORK[bundle]

    # the model zoo and MONAI Label parse the inference config before any input or weights exist
    infer = _checked(_workflow(root, ["inference"], "infer"))
    with pytest.raises(Exception) as failure:
        infer.run()
    assert "no input scan given" in str(_root_cause(failure.value))

    _checked(_workflow(root, ["train"], "train", datalist=tiny_ct.hn, **net, **TINY_RUN)).run()
    assert (root / "models" / "model.pt").is_file() and (root / "models" / "normalization.json").is_file()

    image = Path(tiny_ct.mediastinum).parent / "imagesTs" / "mediastinum_0002.nii.gz"
    masks = tmp_path / "masks"
    _checked(_workflow(root, ["inference"], "infer", datalist=[str(image)], output_dir=str(masks), **net)).run()
    mask, source = sitk.ReadImage(str(masks / "mediastinum_0002_lymph_nodes.nii.gz")), sitk.ReadImage(str(image))
    assert (mask.GetSize(), mask.GetSpacing(), mask.GetOrigin()) == (
        source.GetSize(),
        source.GetSpacing(),
        source.GetOrigin(),
    )
    assert mask.GetPixelID() == sitk.sitkUInt8

    verify_net_in_out(
        net_id="network_def",
        meta_file=str(root / "configs" / "metadata.json"),
        config_file=str(root / "configs" / "inference.json"),
        device="cpu",
        **net,
    )
