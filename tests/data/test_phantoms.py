"""Tests of the synthetic CT phantoms (dgst_monai.data.phantoms): the acceptance items of the data issue."""

from __future__ import annotations

import json
import pathlib
import time

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from dgst_monai.data.phantoms import (
    DOMAINS,
    default_knobs,
    resolve_knobs,
    synthesize_case,
    write_synthetic_dataset,
)
from dgst_monai.data.phantoms.anatomy import MIXED_TISSUE, TISSUES

# Every node asked for must be placed (the placer warns otherwise); numpy must not hit 0/0 anywhere.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

# Small fields of view centred on the nodal stations keep every test case around 0.1-0.3 s.
SMALL: dict[str, dict] = {
    "hn": {"fov_mm": (96.0, 96.0, 32.0), "n_nodes": (3, 6)},
    "mediastinum": {"fov_mm": (110.0, 110.0, 48.0), "n_nodes": (3, 6)},
}


def _files(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _best_window_dice(image: np.ndarray, label: np.ndarray) -> tuple[float, tuple[int, int]]:
    """Best Dice of any HU window [lo, hi] on the raw and on a denoised image: an intensity-only classifier."""
    gt = label.astype(bool)
    best = (0.0, (0, 0))
    for im in (image, ndimage.gaussian_filter(image.astype(np.float32), 1.0)):
        for lo in range(-40, 80, 5):
            for hi in range(lo + 5, 140, 5):
                pred = (im >= lo) & (im <= hi)
                dice = 2.0 * np.count_nonzero(pred & gt) / (np.count_nonzero(pred) + np.count_nonzero(gt))
                best = max(best, (float(dice), (lo, hi)))
    return best


# --- determinism ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("domain", DOMAINS)
def test_same_seed_same_arrays_different_seed_different(domain: str) -> None:
    a = synthesize_case(domain, 7, **SMALL[domain])
    b = synthesize_case(domain, 7, **SMALL[domain])
    c = synthesize_case(domain, 8, **SMALL[domain])
    assert a.image.tobytes() == b.image.tobytes()
    assert a.label.tobytes() == b.label.tobytes()
    assert np.array_equal(a.affine, b.affine)
    assert a.image.tobytes() != c.image.tobytes()
    assert a.label.tobytes() != c.label.tobytes()


def test_written_dataset_is_byte_identical(tmp_path: pathlib.Path) -> None:
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        write_synthetic_dataset(tmp_path / name, domain="hn", n=2, seed=seed, **SMALL["hn"])
    a, b, c = (_files(tmp_path / n) for n in "abc")
    assert a == b  # gzip headers carry no time stamp or temp name
    assert a.keys() == c.keys()
    assert a["imagesTr/hn_0000.nii.gz"] != c["imagesTr/hn_0000.nii.gz"]


# --- HU calibration, labels, nodes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("domain", "phase"),
    [("hn", "venous"), ("hn", "none"), ("mediastinum", "arterial"), ("mediastinum", "none")],
)
def test_tissue_hu_within_documented_ranges(domain: str, phase: str) -> None:
    case = synthesize_case(domain, 3, debug=True, contrast_phase=phase, **SMALL[domain])
    assert case.tissue is not None and case.clean is not None
    expected = {"air", "fat", "soft_tissue", "bone", "lymph_node"}
    expected |= {"lung"} if domain == "mediastinum" else set()
    expected |= {"vessel_unenhanced"} if phase == "none" else {"vessel_enhanced"}
    present = {name for name, tc in TISSUES.items() if np.any(case.tissue == tc.id)}
    assert expected <= present, f"missing tissue classes {expected - present}"
    if phase == "none":
        assert "vessel_enhanced" not in present
    for name in present:
        tc = TISSUES[name]
        mask = case.tissue == tc.id
        clean = case.clean[mask]
        # Noise- and blur-free HU of every pure voxel of the class is inside the documented range.
        assert clean.min() >= tc.lo - 1e-3 and clean.max() <= tc.hi + 1e-3, (name, clean.min(), clean.max())
        # After blur and noise, the median of the class core (away from edges) stays in range too.
        core = ndimage.binary_erosion(mask, structure=np.ones((5, 5, 1), bool))
        if np.count_nonzero(core) >= 20:
            med = float(np.median(case.image[core]))
            assert tc.lo - 5 <= med <= tc.hi + 5, (name, med)
    assert np.count_nonzero(case.tissue == MIXED_TISSUE) > 0  # partial-volume voxels exist
    assert case.image.dtype == np.int16 and case.image.min() >= -1024 and case.image.max() <= 3071


@pytest.mark.parametrize(("domain", "orientation"), [("hn", "LPS"), ("mediastinum", "LPS"), ("hn", "RAS")])
def test_label_is_binary_nonempty_and_occupancy_threshold(domain: str, orientation: str) -> None:
    case = synthesize_case(domain, 11, debug=True, orientation=orientation, **SMALL[domain])
    assert case.label.dtype == np.uint8 and case.label.shape == case.image.shape
    assert set(np.unique(case.label)) == {0, 1}
    assert np.array_equal(case.label, (case.occupancy > 0.5).astype(np.uint8))
    assert 3 <= len(case.nodes) <= 6
    # Partial volume: the occupancy has fractional edges, not a hard mask.
    assert np.count_nonzero((case.occupancy > 0.05) & (case.occupancy < 0.95)) > 0
    for node in case.nodes:  # node centres are labelled (hilum included) and consistent with the affine
        i, j, k = (int(round(v)) for v in node.center_voxel)
        assert case.label[i, j, k] == 1
        ras = case.affine @ np.array([*node.center_voxel, 1.0])
        assert np.allclose(ras[:3], node.center_ras, atol=1e-6)


def test_some_nodes_have_a_fatty_hilum_still_labelled() -> None:
    knobs = dict(SMALL["mediastinum"], hilum_fraction=1.0, node_short_axis_mm=(9.0, 14.0), n_nodes=3)
    case = synthesize_case("mediastinum", 5, debug=True, **knobs)
    assert all(n.has_hilum for n in case.nodes)
    hilum = case.tissue == TISSUES["node_hilum"].id
    assert np.count_nonzero(hilum) > 0
    assert np.all(case.label[hilum] == 1)


def test_node_short_axes_within_range_and_measured_on_label() -> None:
    lo, hi = 6.0, 12.0
    spacing = (0.5, 0.5, 1.0)
    case = synthesize_case("hn", 21, spacing_mm=spacing, node_short_axis_mm=(lo, hi), n_nodes=5,
                           fov_mm=(96.0, 96.0, 40.0))
    assert case.nodes
    assert all(lo - 1e-9 <= n.short_axis_mm <= hi + 1e-9 for n in case.nodes)
    assert all(n.long_axis_mm >= n.short_axis_mm for n in case.nodes)
    # Measure the short axis on the rendered label: for a solid ellipsoid the covariance eigenvalues are a^2/5.
    comps, _ = ndimage.label(case.label)
    measured = 0
    for node in case.nodes:
        idx = comps[tuple(int(round(v)) for v in node.center_voxel)]
        others = [m for m in case.nodes if m is not node and comps[tuple(int(round(v)) for v in m.center_voxel)] == idx]
        if idx == 0 or others:
            continue
        pts = np.argwhere(comps == idx) * np.array(spacing)
        eig = np.linalg.eigvalsh(np.cov(pts.T))
        short = 2.0 * np.sqrt(5.0 * eig[0])
        assert short == pytest.approx(node.short_axis_mm, rel=0.2), (short, node.short_axis_mm)
        measured += 1
    assert measured >= 2


# --- geometry ---------------------------------------------------------------------------------------------


def test_anisotropic_spacing_in_affine_and_header(tmp_path: pathlib.Path) -> None:
    spacing = (0.6, 0.7, 4.0)
    case = synthesize_case("hn", 2, spacing_mm=spacing, slice_thickness_mm=5.0, **SMALL["hn"])
    assert case.spacing == spacing
    assert np.allclose(np.linalg.norm(case.affine[:3, :3], axis=0), spacing)
    assert case.image.shape == (160, 137, 8)
    path = write_synthetic_dataset(tmp_path, "hn", n=1, spacing_mm=spacing, **SMALL["hn"])
    item = json.loads(path.read_text(encoding="utf-8"))["training"][0]
    img = nib.load(tmp_path / item["image"])
    assert np.allclose(img.header.get_zooms(), spacing)
    assert img.get_data_dtype() == np.int16
    assert nib.load(tmp_path / item["label"]).get_data_dtype() == np.uint8
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")


def test_slice_profile_integrates_along_z() -> None:
    """A 4 mm slice is the average of the four 1 mm slices it covers, not a point sample of the middle one."""
    knobs = dict(SMALL["mediastinum"], node_short_axis_mm=(5.0, 8.0), noise_sigma=0.0)
    thin = synthesize_case("mediastinum", 4, debug=True, spacing_mm=(0.9, 0.9, 1.0), **knobs)
    thick = synthesize_case("mediastinum", 4, debug=True, spacing_mm=(0.9, 0.9, 4.0), **knobs)
    nx, ny, nz = thick.image.shape
    assert thin.image.shape == (nx, ny, 4 * nz)
    occ = thin.occupancy.reshape(nx, ny, nz, 4).mean(axis=3)
    assert np.allclose(thick.occupancy, occ, atol=1e-5)  # nodes: exact slab integration
    clean = thin.clean.reshape(nx, ny, nz, 4).mean(axis=3)
    assert float(np.abs(thick.clean - clean).mean()) < 2.0  # whole image: tubes sampled coarser where smooth
    middle = thin.label[:, :, 1::4] | thin.label[:, :, 2::4]
    assert np.count_nonzero(thick.label != middle) > 0  # point sampling would differ


def test_lps_and_ras_match_after_orientation(tmp_path: pathlib.Path) -> None:
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd

    paths = {}
    for ori in ("LPS", "RAS"):
        dl = write_synthetic_dataset(tmp_path / ori, "mediastinum", n=1, seed=5, orientation=ori,
                                     **SMALL["mediastinum"])
        item = json.loads(dl.read_text(encoding="utf-8"))["training"][0]
        paths[ori] = {k: str(tmp_path / ori / item[k]) for k in ("image", "label")}
    assert nib.aff2axcodes(nib.load(paths["LPS"]["image"]).affine) == ("L", "P", "S")
    assert nib.aff2axcodes(nib.load(paths["RAS"]["image"]).affine) == ("R", "A", "S")
    load = Compose([
        LoadImaged(keys=["image", "label"]),
        EnsureChannelFirstd(keys=["image", "label"]),
        Orientationd(keys=["image", "label"], axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
    ])
    lps, ras = load(paths["LPS"]), load(paths["RAS"])
    for key in ("image", "label"):
        assert np.array_equal(lps[key].numpy(), ras[key].numpy())
        assert np.allclose(lps[key].affine.numpy(), ras[key].affine.numpy(), atol=1e-4)
    assert float(lps["label"].sum()) > 0


# --- dataset layout ---------------------------------------------------------------------------------------


def test_datalist_resolves_through_monai(tmp_path: pathlib.Path) -> None:
    from monai.data import load_decathlon_datalist

    path = write_synthetic_dataset(tmp_path, "mediastinum", n=3, seed=2, **SMALL["mediastinum"])
    assert path == tmp_path / "datalist.json"
    meta = json.loads(path.read_text(encoding="utf-8"))
    assert meta["labels"] == {"0": "background", "1": "lymph_node"}
    assert meta["modality"] == {"0": "CT"}
    assert meta["domain"] == "mediastinum" and meta["name"] and meta["description"]
    props = meta["intensity_properties"]
    assert set(props) == {"percentile_00_5", "percentile_99_5", "mean", "std"}
    assert props["percentile_00_5"] < props["mean"] < props["percentile_99_5"] and props["std"] > 0
    assert meta["knobs"] == {k: list(v) if isinstance(v, tuple) else v
                             for k, v in resolve_knobs("mediastinum", **SMALL["mediastinum"]).items()}
    assert [i["case_id"] for i in meta["training"]] == ["mediastinum_0000", "mediastinum_0001"]
    assert [i["case_id"] for i in meta["test"]] == ["mediastinum_0002"]
    for item in meta["training"] + meta["test"]:
        assert not pathlib.Path(item["image"]).is_absolute()
    train = load_decathlon_datalist(str(path), True, "training")
    test = load_decathlon_datalist(str(path), True, "test")
    assert len(train) == 2 and len(test) == 1
    for item in train + test:
        assert pathlib.Path(item["image"]).is_file() and pathlib.Path(item["label"]).is_file()
    assert "imagesTs" in test[0]["image"] and "labelsTs" in test[0]["label"]
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temporaries


def test_default_test_split(tmp_path: pathlib.Path) -> None:
    small = dict(SMALL["hn"], n_nodes=1)
    assert json.loads(write_synthetic_dataset(tmp_path / "five", "hn", n=5, **small).read_text(encoding="utf-8"))["numTest"] == 1
    one = json.loads(write_synthetic_dataset(tmp_path / "one", "hn", n=1, **small).read_text(encoding="utf-8"))
    assert one["numTraining"] == 1 and one["numTest"] == 0
    assert not (tmp_path / "one" / "imagesTs").exists()


# --- domain shift and distractors -------------------------------------------------------------------------


@pytest.mark.parametrize("domain", DOMAINS)
def test_intensity_threshold_alone_fails(domain: str, capsys: pytest.CaptureFixture[str]) -> None:
    case = synthesize_case(domain, 0)  # default field of view: the realistic amount of distractors
    dice, window = _best_window_dice(case.image, case.label)
    with capsys.disabled():
        print(f"\n[phantoms] {domain}: best HU-window Dice {dice:.3f} at {window} HU")
    assert dice < 0.5


def test_domain_defaults_differ_and_noise_is_calibrated() -> None:
    hn, med = default_knobs("hn"), default_knobs("mediastinum")
    for knob in ("spacing_mm", "noise_sigma", "recon_kernel", "contrast_phase", "fov_mm", "node_short_axis_mm"):
        assert hn[knob] != med[knob], knob
    quiet = synthesize_case("hn", 9, noise_sigma=0.0, **SMALL["hn"])
    noisy = synthesize_case("hn", 9, noise_sigma=20.0, **SMALL["hn"])
    assert np.array_equal(quiet.label, noisy.label)  # noise knob leaves the anatomy alone
    ok = (quiet.image > -1000) & (noisy.image > -1024)
    diff = noisy.image[ok].astype(np.float64) - quiet.image[ok]
    assert diff.std() == pytest.approx(20.0, rel=0.05)


# --- validation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"domain": "thorax"}, "unknown domain"),
        ({"colour": 3}, "unknown knob"),
        ({"spacing_mm": (0.3, 0.8, 2.0)}, r"spacing_mm\[x\].*0\.5 to 1"),
        ({"spacing_mm": (0.8, 0.8, 7.0)}, r"spacing_mm\[z\].*1 to 5"),
        ({"spacing_mm": (0.8, 0.8)}, "spacing_mm"),
        ({"fov_mm": (10.0, 96.0, 32.0)}, r"fov_mm\[x\]"),
        ({"noise_sigma": -1.0}, "noise_sigma"),
        ({"recon_kernel": "bone"}, "recon_kernel"),
        ({"contrast_phase": "portal"}, "contrast_phase"),
        ({"n_nodes": (5, 2)}, "n_nodes"),
        ({"node_short_axis_mm": (2.0, 10.0)}, r"node_short_axis_mm.*4 to 30"),
        ({"orientation": "LAS"}, "orientation"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs: dict, match: str) -> None:
    args = {"domain": "hn", "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        synthesize_case(args.pop("domain"), args.pop("seed"), **args)


@pytest.mark.parametrize(("kwargs", "match"), [({"n": -3}, "n must"), ({"n": 0}, "n must"),
                                              ({"n": 4, "n_test": 4}, "n_test"), ({"domain": "neck"}, "domain"),
                                              ({"slice_thickness_mm": 9.0}, "slice_thickness_mm")])
def test_dataset_arguments_validated_before_writing(tmp_path: pathlib.Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        write_synthetic_dataset(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


# --- speed ------------------------------------------------------------------------------------------------


def test_generation_time_of_default_20_case_set(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Reports (does not assert) the time to generate and write the default 20-case set."""
    start = time.perf_counter()
    path = write_synthetic_dataset(tmp_path, "hn", n=20, seed=0)
    elapsed = time.perf_counter() - start
    meta = json.loads(path.read_text(encoding="utf-8"))
    assert len(meta["training"]) == 16 and len(meta["test"]) == 4
    shape = nib.load(tmp_path / meta["training"][0]["image"]).shape
    with capsys.disabled():
        print(f"\n[phantoms] 20 default hn cases {shape} generated and written in {elapsed:.1f} s")
