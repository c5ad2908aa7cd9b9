"""Each bundle works from a copy of its own folder alone, as the model zoo (one zip per bundle) and MONAI Label
(one bundle copied into its app) use it: no sibling bundle, no repository around it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import SimpleITK as sitk
from bundle_support import BUNDLE_NAMES, BUNDLES, TINY_NETWORK, TINY_RUN
from helpers import bundle_workflow, checked, error_chain

from dgst_monai.bundle.export import verify_network


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_bundle_copied_alone_initialises_trains_infers_and_verifies(bundle, tiny_ct, tmp_path):
    root = tmp_path / "alone" / bundle
    shutil.copytree(BUNDLES / bundle, root, symlinks=True)  # a link would stay a link, and break here
    assert [p for p in root.rglob("*") if p.is_symlink()] == []
    assert sorted(p.name for p in root.parent.iterdir()) == [bundle]
    net = TINY_NETWORK[bundle]

    # the model zoo and MONAI Label parse the inference config before any input or weights exist
    infer = checked(bundle_workflow(root, ["inference"], "infer"))
    with pytest.raises(Exception) as failure:
        infer.run()
    assert "no input scan given" in str(error_chain(failure.value)[-1])

    checked(bundle_workflow(root, ["train"], "train", datalist=tiny_ct.hn, **net, **TINY_RUN)).run()
    assert (root / "models" / "model.pt").is_file() and (root / "models" / "normalization.json").is_file()

    image = Path(tiny_ct.mediastinum).parent / "imagesTs" / "mediastinum_0002.nii.gz"
    masks = tmp_path / "masks"
    checked(bundle_workflow(root, ["inference"], "infer", datalist=[str(image)], output_dir=str(masks), **net)).run()
    mask, source = sitk.ReadImage(str(masks / "mediastinum_0002_lymph_nodes.nii.gz")), sitk.ReadImage(str(image))
    assert (mask.GetSize(), mask.GetSpacing(), mask.GetOrigin()) == (
        source.GetSize(),
        source.GetSpacing(),
        source.GetOrigin(),
    )
    assert mask.GetPixelID() == sitk.sitkUInt8

    verify_network(root, **net)
