"""The CT normalisation belongs to the model: fine-tuning, evaluation and inference use the checkpoint's (evaluation
and inference by the same transform, to the same values), and a re-estimate from the shots reads the shots' labels
only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from bundle_support import BUNDLE_NAMES, BUNDLES, TINY_NETWORK, TINY_RUN, make_workflow
from helpers import run_checked
from monai.bundle import ConfigParser
from monai.transforms import Compose

from dgst_monai.data.datalists import few_shot, load_split
from dgst_monai.normalization import load_normalization, save_normalization
from dgst_monai.transforms import CheckpointNormalized, ResampleAndNormalized

BUNDLE = "ln_ct_dynunet"
NET = TINY_NETWORK[BUNDLE]


def _run(configs: list[str], workflow_type: str, **overrides) -> None:
    run_checked(make_workflow(BUNDLE, configs, workflow_type, **NET, **TINY_RUN, **overrides))


@pytest.fixture(scope="module")
def foundation(tiny_ct, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("foundation")
    _run(["train"], "train", datalist=tiny_ct.hn, ckpt_dir=str(folder))
    return folder / "model.pt"


def _copy_dataset(datalist: str, target: Path) -> Path:
    shutil.copytree(Path(datalist).parent, target)
    return target / Path(datalist).name


def _with_other_labels_changed(datalist: str, target: Path, shots: int, seed: int) -> Path:
    """A copy of the dataset in which every training label outside the shots is replaced (all foreground)."""
    copy = _copy_dataset(datalist, target)
    chosen = {c["case_id"] for c in few_shot(load_split(copy, "training"), shots, seed)}
    others = [c for c in load_split(copy, "training") if c["case_id"] not in chosen]
    assert others, "the test needs training cases outside the shots"
    for case in others:
        label = sitk.ReadImage(case["label"])
        full = sitk.GetImageFromArray(np.ones(sitk.GetArrayFromImage(label).shape, np.uint8))
        full.CopyInformation(label)
        sitk.WriteImage(full, case["label"])
    return copy


@pytest.mark.parametrize("normalization", ["foundation", "shots"])
def test_fine_tuning_normalisation_ignores_the_labels_of_other_cases(foundation, tiny_ct, tmp_path, normalization):
    results = []
    for name, datalist in (
        ("original", tiny_ct.mediastinum),
        ("changed", str(_with_other_labels_changed(tiny_ct.mediastinum, tmp_path / "changed_data", 1, 0))),
    ):
        tuned = tmp_path / name
        _run(
            ["train", "finetune"],
            "train",
            datalist=datalist,
            foundation_checkpoint=str(foundation),
            ckpt_dir=str(tuned),
            method="full",
            shots=1,
            normalization=normalization,
        )
        results.append(json.loads((tuned / "normalization.json").read_text(encoding="utf-8")))
    assert results[0] == results[1]
    if normalization == "foundation":
        assert results[0] == load_normalization(foundation)
    else:  # re-estimated from the one shot: not the source domain's window
        assert results[0] != load_normalization(foundation)


def test_evaluation_uses_the_checkpoints_window_not_the_datalists(foundation, tiny_ct, tmp_path):
    shifted = _copy_dataset(tiny_ct.mediastinum, tmp_path / "shifted")
    content = json.loads(shifted.read_text(encoding="utf-8"))
    props = content["intensity_properties"]
    content["intensity_properties"] = {**props, "mean": props["mean"] + 300.0, "percentile_00_5": -1000.0}
    shifted.write_text(json.dumps(content), encoding="utf-8")

    summaries = []
    for name, datalist in (("original", tiny_ct.mediastinum), ("shifted", str(shifted))):
        workflow = make_workflow(
            BUNDLE,
            ["train", "evaluate"],
            "eval",
            datalist=datalist,
            ckpt_dir=str(foundation.parent),
            output_dir=str(tmp_path / name),
            **NET,
            **TINY_RUN,
        )
        workflow.initialize()
        workflow.run()
        summaries.append(json.loads((tmp_path / name / "summary.json").read_text(encoding="utf-8")))
    assert summaries[0] == summaries[1]


def _preprocessing(bundle: str, configs: list[str], **overrides: str) -> Compose:
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / bundle / "configs" / f"{name}.json") for name in configs])
    parser.update({"bundle_root": str(BUNDLES / bundle), **TINY_NETWORK[bundle], **overrides})
    return parser.get_parsed_content("preprocessing")


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_evaluation_and_inference_normalise_a_scan_identically(bundle, tiny_ct, tmp_path):
    """evaluate.json and inference.json give the network the same voxels: the checkpoint's window applied to the
    resampled scan, whatever the datalist's statistics (here the datalist does not even exist)."""
    intensity = {"a_min": -150.0, "a_max": 250.0, "b_min": -1.5, "b_max": 2.5}
    save_normalization(tmp_path, intensity)
    checkpoint = str(tmp_path / "model.pt")  # no weights needed: preprocessing only
    case = load_split(tiny_ct.mediastinum, "test")[0]
    evaluation = _preprocessing(
        bundle, ["train", "evaluate"], checkpoint=checkpoint, datalist=str(tmp_path / "missing.json")
    )
    inference = _preprocessing(bundle, ["inference"], checkpoint=checkpoint)
    evaluated = evaluation(dict(case))["image"]
    inferred = inference({"image": case["image"]})["image"]
    assert evaluated.shape == inferred.shape
    assert torch.equal(evaluated.as_tensor(), inferred.as_tensor())

    # the values are the checkpoint's window on the resampled HU: rebuild them without the normaliser
    unnormalised = Compose([t for t in evaluation.transforms if not isinstance(t, CheckpointNormalized)])
    hu = unnormalised(dict(case))["image"].as_tensor()
    a_min, a_max, b_min, b_max = (intensity[k] for k in ("a_min", "a_max", "b_min", "b_max"))
    expected = ((hu.clamp(a_min, a_max) - a_min) / (a_max - a_min) * (b_max - b_min) + b_min).float()
    assert torch.allclose(evaluated.as_tensor(), expected, atol=1e-5)
    assert (hu < a_min).any() and (hu > a_min).any()  # the clip and the linear part both matter
    (resample,) = [t for t in inference.transforms if isinstance(t, ResampleAndNormalized)]
    assert resample.normalize.checkpoint == checkpoint
