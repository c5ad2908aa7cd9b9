"""The benchmark's synthetic targets: ranges fixed in the data manifest, drawn per case, written as datalists."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from dgst_monai.data.phantoms import resolve_knobs
from dgst_monai.data.phantoms.benchmark_sets import benchmark_datalist, case_knobs, target_spec
from dgst_monai.data.splits import train_test_split


def test_the_manifest_fixes_the_multisite_ranges():
    spec = target_spec("multisite")
    assert spec["domain"] == "mediastinum"
    assert spec["draws"]["noise_sigma"] == {"uniform": [10.0, 40.0]}
    assert spec["draws"]["recon_kernel"] == {"choice": ["soft", "sharp"]}
    assert spec["draws"]["contrast_phase"] == {"choice": ["none", "arterial", "venous"]}
    assert spec["draws"]["slice_thickness_mm"] == {"uniform": [1.0, 5.0]}
    # the 8:2 split of the default leaves at least 20 test cases
    n_test = len(train_test_split([f"c{i}" for i in range(spec["n_cases"])], spec["split"]["test_fraction"], 0)[1])
    assert n_test >= 20
    assert target_spec("mediastinum")["draws"] == {}  # one scanner: the phantom defaults


def test_each_case_draws_its_scanner_and_patient_within_the_ranges():
    spec = target_spec("multisite")
    draws = [case_knobs(spec, i) for i in range(200)]
    for knobs in draws:
        resolve_knobs("mediastinum", **knobs)  # every draw is a valid phantom
        sx, sy, sz = knobs["spacing_mm"]
        assert 0.6 <= sx == sy <= 1.0 and 1.0 <= sz <= 5.0 and knobs["slice_thickness_mm"] is None
        assert 10.0 <= knobs["noise_sigma"] <= 40.0 and 2 <= knobs["n_nodes"] <= 12
        lo, hi = knobs["anatomy_scale"]
        assert lo == hi and 0.85 <= lo <= 1.15
    assert {d["recon_kernel"] for d in draws} == {"soft", "sharp"}
    assert {d["contrast_phase"] for d in draws} == {"none", "arterial", "venous"}
    assert {d["orientation"] for d in draws} == {"LPS", "RAS"}
    assert len({d["noise_sigma"] for d in draws}) == 200  # independent per case
    assert case_knobs(spec, 7) == draws[7]  # and reproducible
    assert case_knobs(spec, 7, seed=2) != draws[7]


def test_a_written_multisite_set_has_each_cases_own_geometry(tmp_path):
    path = benchmark_datalist(tmp_path / "ms", "multisite", n=3, fov_mm=(64.0, 64.0, 32.0))
    content = json.loads(open(path, encoding="utf-8").read())
    assert content["numTraining"] == 3 and content["test"] == []
    spacings = []
    for case in content["training"]:
        image = nib.load(tmp_path / "ms" / case["image"])
        knobs = content["case_knobs"][case["case_id"]]
        np.testing.assert_allclose(image.header.get_zooms(), knobs["spacing_mm"], rtol=1e-5)
        spacings.append(tuple(image.header.get_zooms()))
    assert len(set(spacings)) == 3
    stamp = (tmp_path / "ms" / "datalist.json").stat().st_mtime_ns
    assert benchmark_datalist(tmp_path / "ms", "multisite", n=3, fov_mm=(64.0, 64.0, 32.0)) == path
    assert (tmp_path / "ms" / "datalist.json").stat().st_mtime_ns == stamp  # the same request reuses the files


def test_unknown_sets_are_refused():
    with pytest.raises(ValueError, match="unknown benchmark set"):
        target_spec("multi-site")


def test_site_shift_draws_shots_from_one_scanner_and_tests_on_many(tmp_path):
    path = benchmark_datalist(tmp_path / "shift", "site_shift", n=6, fov_mm=(64.0, 64.0, 32.0))
    content = json.loads(open(path, encoding="utf-8").read())
    training, test = content["training"], content["test"]
    assert len(training) == 3 and len(test) == 3 and "intensity_properties" in content
    card = target_spec("site_shift")["lists"]
    scanner = card["training"]["knobs"]
    for case in training:  # one scanner: the card's fixed knobs, voxel size read from the written file
        knobs = content["case_knobs"][case["case_id"]]
        assert {k: knobs[k] for k in ("noise_sigma", "recon_kernel", "contrast_phase")} == {
            k: scanner[k] for k in ("noise_sigma", "recon_kernel", "contrast_phase")}
        np.testing.assert_allclose(nib.load(tmp_path / "shift" / case["image"]).header.get_zooms(),
                                   scanner["spacing_mm"], rtol=1e-5)
    test_knobs = [content["case_knobs"][c["case_id"]] for c in test]
    assert len({k["noise_sigma"] for k in test_knobs}) == 3  # each test case its own scanner
    first = card["test"]["first_index"]
    assert [c["case_id"] for c in test] == [f"site_shift_{first + i:04d}" for i in range(3)]
    # the test cases are the multisite target's draws for those case indices (other patients than the shots')
    multisite = target_spec("multisite")
    assert test_knobs[0]["noise_sigma"] == pytest.approx(case_knobs(multisite, first)["noise_sigma"])
    assert not {c["case_id"] for c in training} & {c["case_id"] for c in test}


def test_the_source_test_set_holds_unseen_source_patients_as_test_cases(tmp_path):
    source = json.loads(open(benchmark_datalist(tmp_path / "src", "source", n=2, fov_mm=(64.0, 64.0, 32.0))).read())
    held = json.loads(open(benchmark_datalist(tmp_path / "held", "source_test", n=2, fov_mm=(64.0, 64.0, 32.0))).read())
    assert held["training"] == [] and len(held["test"]) == 2 and held["domain"] == source["domain"] == "hn"
    assert "intensity_properties" not in held  # a test-only set shapes no normalisation
    assert not set(held["case_seeds"].values()) & set(source["case_seeds"].values())  # other patients
    first_src = nib.load(tmp_path / "src" / source["training"][0]["image"]).get_fdata()
    first_held = nib.load(tmp_path / "held" / held["test"][0]["image"]).get_fdata()
    assert first_src.shape == first_held.shape and not np.array_equal(first_src, first_held)
