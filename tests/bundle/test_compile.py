"""``--compile yes``: in ``inference.json`` the evaluator runs a ``torch.compile``d network and writes the eager
mask, with the input's geometry; in ``train.json`` (pre-training and the fine-tuning overlay) the trainer and its
validator do, and DGST still updates exactly the entries it selects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from bundle_support import BUNDLES, TINY_NETWORK, TINY_RUN, run_like_model_zoo, save_tiny_checkpoint
from helpers import error_chain, requires_cxx
from torch._dynamo.utils import counters

from dgst_monai.predict import predict

BUNDLE = BUNDLES / "ln_ct_dynunet"


@pytest.fixture(scope="module")
def scan_and_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """A 0.7 x 0.8 x 3 mm scan (not a whole number of windows: the last window batch is smaller) and a tiny
    randomly initialised checkpoint."""
    folder = tmp_path_factory.mktemp("compiled")
    checkpoint = save_tiny_checkpoint(folder, {"a_min": -100.0, "a_max": 200.0, "b_min": -2.0, "b_max": 4.0})
    rng = np.random.default_rng(3)
    image = sitk.GetImageFromArray(rng.normal(40.0, 60.0, size=(9, 38, 41)).astype(np.int16))
    image.SetSpacing((0.7, 0.8, 3.0))
    image.SetOrigin((-12.0, 4.5, 30.0))
    sitk.WriteImage(image, str(folder / "ct.nii.gz"))
    return folder / "ct.nii.gz", checkpoint


def _mask(scan: Path, checkpoint: Path, out: Path, **overrides) -> np.ndarray:
    (path,) = predict(BUNDLE, scan, out, checkpoint=checkpoint, **TINY_NETWORK["ln_ct_dynunet"], **overrides)
    mask = sitk.ReadImage(path)
    source = sitk.ReadImage(str(scan))
    assert mask.GetSize() == source.GetSize()
    np.testing.assert_allclose(mask.GetSpacing(), source.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(mask.GetOrigin(), source.GetOrigin(), atol=1e-4)
    return sitk.GetArrayFromImage(mask)


def test_compile_is_off_by_default_and_a_typo_is_refused(scan_and_checkpoint, tmp_path: Path) -> None:
    scan, checkpoint = scan_and_checkpoint
    counters.clear()
    _mask(scan, checkpoint, tmp_path / "eager")
    assert counters["stats"]["unique_graphs"] == 0  # nothing was traced
    with pytest.raises(Exception) as raised:
        _mask(scan, checkpoint, tmp_path / "typo", compile="maybe")
    assert any("compile must be true or false" in str(e) for e in error_chain(raised.value))


def test_compiled_network_writes_the_eager_mask(scan_and_checkpoint, tmp_path: Path) -> None:
    """aot_eager traces the network with dynamo and AOTAutograd but runs the eager kernels (seconds, no C++
    compiler), so the mask must be identical; the real inductor compile is the slow test below."""
    scan, checkpoint = scan_and_checkpoint
    eager = _mask(scan, checkpoint, tmp_path / "eager")
    counters.clear()
    compiled = _mask(scan, checkpoint, tmp_path / "compiled", compile="yes", compile_kwargs={"backend": "aot_eager"})
    assert counters["stats"]["unique_graphs"] >= 1  # the network went through torch.compile
    assert counters["graph_break"] == {}
    assert eager.any() and not eager.all()  # a mask with both classes, so equality says something
    np.testing.assert_array_equal(compiled, eager)


@pytest.mark.slow
@pytest.mark.timeout(900)
@requires_cxx
def test_inductor_with_frozen_weights_writes_the_eager_mask(scan_and_checkpoint, tmp_path: Path) -> None:
    """Slow (a cold inductor compile of the tiny network, about a minute on one core): the bundle's own
    ``compile_kwargs`` (inductor, weights frozen as constants) agree with eager up to float rounding."""
    scan, checkpoint = scan_and_checkpoint
    eager = _mask(scan, checkpoint, tmp_path / "eager")
    torch._dynamo.reset()
    counters.clear()
    compiled = _mask(scan, checkpoint, tmp_path / "compiled", compile=True)
    assert counters["stats"]["unique_graphs"] >= 1
    differ = int((compiled != eager).sum())
    assert differ <= 1e-3 * eager.size, f"{differ} of {eager.size} voxels differ"


def _finetune_dgst(tiny_ct, foundation: Path, ckpt_dir: Path, **overrides) -> dict[str, torch.Tensor]:
    """Two DGST iterations (one per epoch, validation after each) from ``foundation``; the final weights."""
    run_like_model_zoo(
        "ln_ct_dynunet", ["train", "finetune"], "train", datalist=tiny_ct.mediastinum,
        foundation_checkpoint=str(foundation), ckpt_dir=str(ckpt_dir), method="dgst", shots=2,
        **TINY_NETWORK["ln_ct_dynunet"], **{**TINY_RUN, "max_epochs": 2}, **overrides,
    )  # fmt: skip
    return torch.load(ckpt_dir / "model.pt", map_location="cpu", weights_only=True)


def test_compiled_training_and_dgst_update_the_same_entries_as_eager(tiny_ct, tmp_path: Path) -> None:
    """Pre-training and DGST fine-tuning with ``--compile yes`` (aot_eager: traced, eager kernels): the trainer
    and validator ran compiled graphs, and DGST changed the same entries of every tensor as in the eager run, by
    the same amounts up to float rounding, while most kernel entries stayed exactly the foundation's."""
    counters.clear()
    run_like_model_zoo(
        "ln_ct_dynunet", ["train"], "train", datalist=tiny_ct.hn, ckpt_dir=str(tmp_path / "foundation"),
        compile=True, compile_kwargs={"backend": "aot_eager"}, **TINY_NETWORK["ln_ct_dynunet"], **TINY_RUN,
    )  # fmt: skip
    assert counters["stats"]["unique_graphs"] >= 2  # a training graph and an inference (validation) graph
    foundation = tmp_path / "foundation" / "model.pt"
    base = torch.load(foundation, map_location="cpu", weights_only=True)
    assert not any(k.startswith("_orig_mod.") for k in base)  # the checkpoint holds the module's own keys

    eager = _finetune_dgst(tiny_ct, foundation, tmp_path / "eager")
    torch._dynamo.reset()  # dynamo would reuse the pre-training's graphs for the fine-tuned network's class
    counters.clear()
    compiled = _finetune_dgst(tiny_ct, foundation, tmp_path / "compiled", compile="yes",
                              compile_kwargs={"backend": "aot_eager"})
    assert counters["stats"]["unique_graphs"] >= 1
    assert compiled.keys() == eager.keys() == base.keys()
    kernels = [k for k in base if k.endswith("conv.weight")]
    kept = sum(int((eager[k] == base[k]).sum()) for k in kernels)
    assert kept > 0.5 * sum(base[k].numel() for k in kernels)  # DGST left most kernel entries alone
    for key in base:
        changed_eager, changed_compiled = eager[key] != base[key], compiled[key] != base[key]
        assert torch.equal(changed_eager, changed_compiled), key
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-6, msg=key)
