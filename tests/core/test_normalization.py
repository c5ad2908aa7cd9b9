"""dgst_monai.normalization: one CT normalisation from datalists, from exactly the given cases, from nnU-Net plans."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from data_helpers import ct_volume, write

from dgst_monai.data.datalists import ct_normalization, few_shot, load_split
from dgst_monai.data.index import intensity_properties
from dgst_monai.data.phantoms import write_synthetic_dataset
from dgst_monai.normalization import (
    foreground_sample,
    intensity_properties_of,
    load_normalization,
    normalization_from_cases,
    normalization_from_nnunet_plans,
    save_normalization,
    scale_intensity_range,
)

SMALL = {"fov_mm": (110.0, 110.0, 48.0), "n_nodes": (3, 6)}


def _write_cases(root: Path, n: int) -> Path:
    """``n`` training cases of different HU (so that each case moves the statistics) and their datalist."""
    training = []
    for i in range(n):
        hu, label = ct_volume(seed=i)
        hu[label > 0] += 40 * i
        write(root / f"imagesTr/c{i}.nii.gz", hu)
        write(root / f"labelsTr/c{i}.nii.gz", label)
        training.append({"case_id": f"c{i}", "image": f"imagesTr/c{i}.nii.gz", "label": f"labelsTr/c{i}.nii.gz"})
    datalist = root / "datalist.json"
    datalist.write_text(json.dumps({"training": training, "test": []}), encoding="utf-8")
    return datalist


def test_one_shot_normalization_reads_only_the_shot(tmp_path: Path) -> None:
    """Fine-tuning on shots {a} gives the same normalization whatever the other cases' labels are; their label
    files are never opened."""
    datalist = _write_cases(tmp_path, n=4)
    cases = load_split(datalist)
    shots = few_shot(cases, shots=1, seed=0)
    (shot,) = shots
    others = [c for c in cases if c["case_id"] != shot["case_id"]]
    before = normalization_from_cases(shots)
    pooled_before = normalization_from_cases(cases)

    # other labels: now every voxel (bone and air included), which moves the statistics of any set holding them
    for case in others:
        _, label = ct_volume(seed=0)
        write(Path(case["label"]), np.ones_like(label))
    assert normalization_from_cases(few_shot(load_split(datalist), shots=1, seed=0)) == before
    assert normalization_from_cases(load_split(datalist)) != pooled_before  # the labels do matter when used

    for case in others:
        Path(case["label"]).unlink()  # a read of any of them would now fail
    assert normalization_from_cases(shots) == before
    # the same maths as the datalist path over the same cases
    props = intensity_properties([shot])
    assert before == scale_intensity_range(props)
    assert before["a_min"] == props["percentile_00_5"] and before["b_max"] == pytest.approx(
        (props["percentile_99_5"] - props["mean"]) / props["std"]
    )


def test_datalist_and_case_paths_agree(tmp_path: Path) -> None:
    """The synthetic datalist's statistics are those normalization_from_cases computes from its training files."""
    datalist = write_synthetic_dataset(tmp_path, "mediastinum", n=3, seed=1, **SMALL)
    training = load_split(datalist, "training")
    assert normalization_from_cases(training) == ct_normalization(datalist)
    # a case contributes the same sample wherever it stands in the pool
    assert normalization_from_cases(training[::-1]) == pytest.approx(normalization_from_cases(training), rel=1e-12)


def test_sample_is_seeded_by_case_and_independent_of_axis_order() -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(40, 20, (30, 20, 10))
    label = (rng.random(image.shape) > 0.2).astype(np.uint8)
    a = foreground_sample(image, label, "case_a", samples_per_case=500)
    assert a.size == 500
    np.testing.assert_array_equal(a, foreground_sample(image.T, label.T, "case_a", samples_per_case=500))
    assert not np.array_equal(a, foreground_sample(image, label, "case_b", samples_per_case=500))
    assert not np.array_equal(a, foreground_sample(image, label, "case_a", samples_per_case=500, seed=1))
    assert foreground_sample(image, label, "case_a", samples_per_case=None).size == int(label.sum())
    with pytest.raises(ValueError, match="case_a: image shape"):
        foreground_sample(image, label[:-1], "case_a")


def test_an_empty_foreground_has_no_statistics_and_a_clear_error(tmp_path: Path) -> None:
    empty = np.zeros((4, 4, 4), np.uint8)
    assert intensity_properties_of([foreground_sample(np.ones((4, 4, 4)), empty, "x")]) is None
    assert intensity_properties_of([]) is None
    with pytest.raises(ValueError, match="no foreground"):
        scale_intensity_range(None, "datalist d.json")

    # phantoms without nodes and an indexed case with an empty label: both store null, both refuse to normalise
    datalist = write_synthetic_dataset(tmp_path / "synth", "hn", n=2, seed=0, fov_mm=(64.0, 64.0, 16.0), n_nodes=0)
    assert json.loads(datalist.read_text(encoding="utf-8"))["intensity_properties"] is None
    with pytest.raises(ValueError, match=r"datalist .*datalist.json: no foreground"):
        ct_normalization(datalist)
    hu, label = ct_volume()
    case = {"case_id": "blank", "image": str(write(tmp_path / "i.nii.gz", hu)),
            "label": str(write(tmp_path / "l.nii.gz", np.zeros_like(label)))}
    with pytest.raises(ValueError, match="cases blank: no foreground"):
        normalization_from_cases([case])
    with pytest.raises(ValueError, match="at least one case"):
        normalization_from_cases([])


def test_nnunet_plans(tmp_path: Path) -> None:
    props = {"max": 3071.0, "mean": 40.0, "median": 38.0, "min": -1024.0, "percentile_00_5": -100.0,
             "percentile_99_5": 300.0, "std": 60.0}
    plans = {"plans_name": "nnUNetPlans", "foreground_intensity_properties_per_channel": {"0": props}}
    expected = {"a_min": -100.0, "a_max": 300.0, "b_min": -140.0 / 60.0, "b_max": 260.0 / 60.0}
    assert normalization_from_nnunet_plans(plans) == pytest.approx(expected)
    path = tmp_path / "plans.json"
    path.write_text(json.dumps(plans), encoding="utf-8")
    assert normalization_from_nnunet_plans(path) == normalization_from_nnunet_plans(plans)
    with pytest.raises(ValueError, match=r"plans.json: no foreground_intensity_properties_per_channel\['0'\]"):
        path.write_text(json.dumps({"plans_name": "x"}), encoding="utf-8")
        normalization_from_nnunet_plans(path)
    with pytest.raises(ValueError, match=r"lack \['std'\]"):
        normalization_from_nnunet_plans({"foreground_intensity_properties_per_channel": {"0": dict(props, std=None)}})
    with pytest.raises(FileNotFoundError):
        normalization_from_nnunet_plans(tmp_path / "none.json")


def test_saved_beside_the_checkpoint(tmp_path: Path) -> None:
    intensity = {"a_min": -100.0, "a_max": 300.0, "b_min": -2.0, "b_max": 4.0}
    save_normalization(tmp_path / "models", intensity)
    assert load_normalization(tmp_path / "models" / "model.pt") == intensity
    with pytest.raises(FileNotFoundError, match="normalization.json not found"):
        load_normalization(tmp_path / "elsewhere" / "model.pt")
    with pytest.raises(ValueError, match="implausible"):
        save_normalization(tmp_path, dict(intensity, a_max=-200.0))
