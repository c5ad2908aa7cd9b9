"""Tests of dgst_monai.metrics, the SurfaceDiceHandler and the EvaluationReport handler."""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from data_helpers import ct_volume, write
from monai.data import DataLoader, Dataset, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.handlers import MeanDice, from_engine
from monai.transforms import AsDiscreted, Compose, EnsureChannelFirstd, LoadImaged

from dgst_monai.data.datalists import load_split
from dgst_monai.data.index import index_dataset
from dgst_monai.data.readers import SimpleITKReader
from dgst_monai.data.splits import make_splits
from dgst_monai.handlers import EvaluationReport, SurfaceDiceHandler
from dgst_monai.metrics import dice, summarize, surface_dice

SHAPE = (10, 10, 10)
Box = tuple[tuple[int, int, int], tuple[int, int, int]]  # inclusive voxel index ranges (lo, hi)


def box_mask(box: Box, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    (x0, y0, z0), (x1, y1, z1) = box
    m = np.zeros(shape, dtype=bool)
    m[x0 : x1 + 1, y0 : y1 + 1, z0 : z1 + 1] = True
    return m


# A 3x3x3 cube at voxels 2..4, and the same cube shifted by one voxel along array axis 0.
CUBE: Box = ((2, 2, 2), (4, 4, 4))
CUBE_SHIFTED: Box = ((3, 2, 2), (5, 4, 4))


# --- Independent reference -------------------------------------------------------------------------------
# DeepMind's surface-distance (which MONAI's use_subvoxels=True follows) puts surface elements on the
# voxel-corner lattice (half-integer voxel coordinates), each with the area of the marching-cubes patch in
# its 2x2x2 cell, and measures distances between these lattice points in mm. For an axis-aligned box
# there are only three kinds of cell, whose patches are easy to write down with spacing s = (s0, s1, s2):
#   face   (4 of 8 voxels inside): a flat rectangle, area = product of the two in-plane spacings;
#   edge   (2 inside): a 45-degree strip, area = s_j * hypot(s_a / 2, s_b / 2) for the edge along axis j;
#   corner (1 inside): a triangle through the three half-edge points (s0/2, 0, 0), (0, s1/2, 0), (0, 0, s2/2).
# The reference below enumerates those lattice points and brute-forces the distances: no MONAI, no scipy.


def box_surfels(box: Box, spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Surface points (mm) and areas (mm^2) of a box of voxels."""
    lo, hi = box
    sp = np.asarray(spacing, dtype=float)
    lattice = [np.arange(low - 0.5, high + 1.0, 1.0) for low, high in zip(lo, hi)]
    points, areas = [], []
    for p in itertools.product(*lattice):
        on = [p[i] in (lo[i] - 0.5, hi[i] + 0.5) for i in range(3)]
        if sum(on) == 1:
            i = on.index(True)
            area = float(np.prod([sp[j] for j in range(3) if j != i]))
        elif sum(on) == 2:
            j = on.index(False)
            a, b = (sp[i] for i in range(3) if i != j)
            area = sp[j] * math.hypot(a / 2, b / 2)
        elif sum(on) == 3:
            u = np.array([-sp[0] / 2, sp[1] / 2, 0.0])
            v = np.array([-sp[0] / 2, 0.0, sp[2] / 2])
            area = 0.5 * float(np.linalg.norm(np.cross(u, v)))
        else:
            continue  # inside the box
        points.append(np.asarray(p) * sp)
        areas.append(area)
    return np.array(points), np.array(areas)


def reference_nsd(a: Box, b: Box, spacing: tuple[float, float, float], tol: float) -> tuple[float, float]:
    """NSD of two boxes, and how close any distance comes to ``tol`` (to avoid float ties)."""
    pa, aa = box_surfels(a, spacing)
    pb, ab = box_surfels(b, spacing)
    d = np.linalg.norm(pa[:, None, :] - pb[None, :, :], axis=-1)
    da, db = d.min(axis=1), d.min(axis=0)
    nsd = (aa[da <= tol].sum() + ab[db <= tol].sum()) / (aa.sum() + ab.sum())
    return float(nsd), float(min(np.abs(da - tol).min(), np.abs(db - tol).min()))


# --- dice ------------------------------------------------------------------------------------------------


def test_dice_hand_computed_cases() -> None:
    cube, shifted = box_mask(CUBE), box_mask(CUBE_SHIFTED)
    empty = np.zeros(SHAPE, dtype=bool)
    assert dice(cube, cube) == 1.0
    assert dice(cube, box_mask(((7, 7, 7), (9, 9, 9)))) == 0.0
    # 27 voxels each, overlap 2x3x3 = 18: 2 * 18 / 54
    assert dice(cube, shifted) == pytest.approx(2 / 3)
    assert dice(cube.astype(np.uint8), shifted.astype(np.float32)) == pytest.approx(2 / 3)  # 0/1 arrays
    assert dice(empty, cube) == 0.0
    assert dice(cube, empty) == 0.0
    assert dice(empty, empty) == 1.0


# --- surface_dice ----------------------------------------------------------------------------------------


def test_nsd_identical_disjoint_and_empty() -> None:
    cube = box_mask(CUBE)
    empty = np.zeros(SHAPE, dtype=bool)
    assert surface_dice(cube, cube, (1.0, 1.0, 1.0)) == pytest.approx(1.0)
    assert surface_dice(cube, box_mask(((7, 7, 7), (9, 9, 9))), (1.0, 1.0, 1.0)) == 0.0
    assert surface_dice(empty, cube, (1.0, 1.0, 1.0)) == 0.0
    assert surface_dice(cube, empty, (1.0, 1.0, 1.0)) == 0.0
    assert surface_dice(empty, empty, (1.0, 1.0, 1.0)) == 1.0  # MONAI alone gives NaN here


def test_nsd_one_voxel_shift_isotropic() -> None:
    # Cube A spans [1.5, 4.5]^3 in voxel coordinates, B = A + (1, 0, 0). Surface points: the 56 boundary
    # points of the 4x4x4 corner lattice: 8 corners (area sqrt(3)/8), 24 edge points (sqrt(2)/2), 24 face
    # points (1). Total area T = 8 c + 24 e + 24 = 42.7026.
    # A's points at distance 0 from B: those with x in {2.5, 3.5, 4.5} lying on y/z boundaries (B's side
    # faces). At distance 1: the whole x = 1.5 face (4 c + 8 e + 4) and the 4 inner points of the x = 4.5
    # face (4). B is the mirror image. So NSD(tol < 1) = (T - 4c - 8e - 8) / T and NSD(tol >= 1) = 1.
    c, e = math.sqrt(3) / 8, math.sqrt(2) / 2
    total = 8 * c + 24 * e + 24
    expected = (total - (4 * c + 8 * e + 8)) / total  # 0.659908
    cube, shifted = box_mask(CUBE), box_mask(CUBE_SHIFTED)
    assert surface_dice(cube, shifted, (1.0, 1.0, 1.0), tolerance_mm=0.5) == pytest.approx(expected, abs=1e-6)
    assert surface_dice(cube, shifted, (1.0, 1.0, 1.0), tolerance_mm=1.5) == pytest.approx(1.0, abs=1e-6)
    assert surface_dice(cube, shifted, (1.0, 1.0, 1.0), tolerance_mm=0.0) == pytest.approx(expected, abs=1e-6)


def test_nsd_anisotropic_spacing() -> None:
    cube, shifted = box_mask(CUBE), box_mask(CUBE_SHIFTED)
    # Spacing (1, 2, 1): the shift is along the 1 mm axis, every distance is 0 or 1 mm.
    assert surface_dice(cube, shifted, (1.0, 2.0, 1.0), tolerance_mm=1.0) == pytest.approx(1.0, abs=1e-6)
    # Spacing (2, 1, 1): the shift is 2 mm. Areas: x-faces 1, y/z-faces 2; edges along x 2*hypot(.5,.5),
    # along y or z hypot(1, .5); corners 0.375 (triangle (1,0,0), (0,.5,0), (0,0,.5)). Total
    # T = 8*.375 + 8*2*hypot(.5,.5) + 16*hypot(1,.5) + 2*4*1 + 4*4*2 = 72.2022.
    # At 2 mm: the x = 1.5 face, 4*.375 + 8*hypot(1,.5) + 4 = 14.4443. At 1 mm: the 4 inner points of
    # the x = 4.5 face (area 4), 1 mm from B's y-faces. Mirror for B.
    ey, ex = math.hypot(1.0, 0.5), 2 * math.hypot(0.5, 0.5)
    total = 8 * 0.375 + 8 * ex + 16 * ey + 8 + 32
    far = 4 * 0.375 + 8 * ey + 4
    assert surface_dice(cube, shifted, (2.0, 1.0, 1.0), tolerance_mm=0.5) == pytest.approx(
        (total - far - 4) / total, abs=1e-6
    )  # 0.74455
    assert surface_dice(cube, shifted, (2.0, 1.0, 1.0), tolerance_mm=1.0) == pytest.approx(
        (total - far) / total, abs=1e-6
    )  # 0.79995
    assert surface_dice(cube, shifted, (2.0, 1.0, 1.0), tolerance_mm=2.0) == pytest.approx(1.0, abs=1e-6)


def test_nsd_matches_independent_reference() -> None:
    rng = np.random.default_rng(7)
    checked = 0
    while checked < 8:
        lo = rng.integers(0, 7, size=3)
        hi = lo + rng.integers(0, 4, size=3)
        a: Box = (tuple(int(v) for v in lo), tuple(int(v) for v in hi))  # type: ignore[assignment]
        blo = np.clip(lo + rng.integers(-2, 3, size=3), 0, 9)
        bhi = np.clip(np.maximum(blo, hi + rng.integers(-2, 3, size=3)), 0, 9)
        b: Box = (tuple(int(v) for v in blo), tuple(int(v) for v in bhi))  # type: ignore[assignment]
        spacing = tuple(float(s) for s in rng.choice([0.5, 0.8, 1.0, 1.5, 3.0], size=3))
        tol = float(rng.choice([0.7, 1.0, 1.3, 2.2]))
        expected, margin = reference_nsd(a, b, spacing, tol)  # type: ignore[arg-type]
        if margin < 1e-3:  # a distance equal to the tolerance: float32 vs float64 could disagree
            continue
        got = surface_dice(box_mask(a), box_mask(b), spacing, tolerance_mm=tol)
        assert got == pytest.approx(expected, abs=1e-5), (a, b, spacing, tol)
        checked += 1


def test_bad_input_raises() -> None:
    cube = box_mask(CUBE)
    with pytest.raises(ValueError, match=r"same shape.*\(10, 10, 10\).*\(10, 10, 9\)"):
        surface_dice(cube, cube[:, :, :9], (1, 1, 1))
    with pytest.raises(ValueError, match="3-D"):
        dice(cube[0], cube[0])
    with pytest.raises(ValueError, match="spacing"):
        surface_dice(cube, cube, (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        surface_dice(cube, cube, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="tolerance_mm"):
        surface_dice(cube, cube, (1, 1, 1), tolerance_mm=-0.5)
    with pytest.raises(ValueError, match="0 and 1"):
        dice(cube * 0.7, cube)


def test_summarize() -> None:
    assert summarize([0.8, 0.6]) == pytest.approx({"mean": 0.7, "std": 0.1, "n": 2})  # ddof=0
    with pytest.raises(ValueError, match="non-finite"):
        summarize([0.5, float("nan")])
    with pytest.raises(ValueError, match="empty"):
        summarize([])


# --- handlers --------------------------------------------------------------------------------------------


def _affine(linear: list[list[float]]) -> torch.Tensor:
    a = torch.eye(4, dtype=torch.float64)
    a[:3, :3] = torch.tensor(linear, dtype=torch.float64)
    a[:3, 3] = torch.tensor([-100.0, 20.0, 5.0])
    return a


# Three cases with different geometry. Spacing in array-axis order = column norms of the linear part.
CASES = [
    # file name, pred box, label box, affine linear part, spacing
    ("/data/segrap_0001/image.nii.gz", CUBE_SHIFTED, CUBE, [[1, 0, 0], [0, 1, 0], [0, 0, 1]], (1.0, 1.0, 1.0)),
    ("/data/lnq/lnq_0002.nrrd", CUBE_SHIFTED, CUBE, [[-2, 0, 0], [0, -1, 0], [0, 0, 1]], (2.0, 1.0, 1.0)),
    # axis 0 runs along world z with 3 mm: a diagonal reading would get this wrong
    ("/data/case_003.nii", ((3, 2, 2), (6, 5, 5)), ((2, 2, 2), (5, 5, 5)), [[0, 1, 0], [0, 0, -1], [3, 0, 0]],
     (3.0, 1.0, 1.0)),
]  # fmt: skip
EXPECTED_DICE = [2 / 3, 2 / 3, 2 * 48 / 128]


def _onehot(box: Box, affine: torch.Tensor, filename: str) -> MetaTensor:
    m = torch.from_numpy(box_mask(box))
    return MetaTensor(torch.stack([~m, m]).float(), affine=affine, meta={"filename_or_obj": filename})


@pytest.mark.parametrize("decollate", [True, False])
def test_handlers_in_supervised_evaluator(tmp_path: Path, decollate: bool) -> None:
    data = []
    for filename, pred_box, label_box, linear, _ in CASES:
        affine = _affine(linear)
        # The identity network passes "image" through, so "image" holds the prediction.
        data.append({"image": _onehot(pred_box, affine, filename), "label": _onehot(label_box, affine, filename)})
    loader = DataLoader(data, batch_size=2, shuffle=False, num_workers=0)  # batches of 2 + 1 cases
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=loader,
        network=torch.nn.Identity(),
        decollate=decollate,
        key_val_metric={
            "nsd_1mm": SurfaceDiceHandler(tolerance_mm=1.0, output_transform=from_engine(["pred", "label"]))
        },
        additional_metrics={
            "dice": MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]))
        },
    )
    EvaluationReport(output_dir=tmp_path / "report", metric_names=["dice", "nsd_1mm"]).attach(evaluator)
    evaluator.run()

    expected_nsd = [reference_nsd(pred, label, sp, 1.0)[0] for _, pred, label, _, sp in CASES]
    # With 1 mm voxels every case would score 1.0 (a one-voxel shift): only the affines' spacing lowers 2 and 3.
    assert expected_nsd[0] == pytest.approx(1.0) and max(expected_nsd[1:]) < 0.9
    assert expected_nsd[1] == pytest.approx(0.79995, abs=1e-5)  # hand-computed in test_nsd_anisotropic_spacing
    details = evaluator.state.metric_details["nsd_1mm"]
    assert tuple(details.shape) == (3, 1)
    np.testing.assert_allclose(details[:, 0].numpy(), expected_nsd, atol=1e-5)
    assert evaluator.state.metrics["nsd_1mm"] == pytest.approx(np.mean(expected_nsd), abs=1e-5)

    with open(tmp_path / "report" / "per_case_metrics.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["case_id"] for r in rows] == ["segrap_0001", "lnq_0002", "case_003"]
    assert list(rows[0]) == ["case_id", "dice", "nsd_1mm"]
    np.testing.assert_allclose([float(r["dice"]) for r in rows], EXPECTED_DICE, atol=1e-6)
    np.testing.assert_allclose([float(r["nsd_1mm"]) for r in rows], expected_nsd, atol=1e-5)

    summary = json.loads((tmp_path / "report" / "summary.json").read_text(encoding="utf-8"))
    assert summary["n_cases"] == 3
    assert summary["dice"]["n"] == 3
    assert summary["dice"]["mean"] == pytest.approx(np.mean(EXPECTED_DICE), abs=1e-6)
    assert summary["dice"]["std"] == pytest.approx(np.std(EXPECTED_DICE, ddof=0), abs=1e-6)
    assert summary["nsd_1mm"]["mean"] == pytest.approx(np.mean(expected_nsd), abs=1e-5)
    assert summary["nsd_1mm"]["std"] == pytest.approx(np.std(expected_nsd, ddof=0), abs=1e-5)
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["per_case_metrics.csv", "summary.json"]


def test_surface_dice_handler_empty_cases_and_missing_affine() -> None:
    # Lists of channel-first cases, each with its own affine (update() called directly, without Ignite's
    # unrolling of lists into single cases).
    handler = SurfaceDiceHandler(tolerance_mm=1.0)
    iso = _affine([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    aniso = _affine([[-2, 0, 0], [0, -1, 0], [0, 0, 1]])
    empty: Box = ((0, 0, 0), (-1, -1, -1))  # an empty slice range
    cases = [(empty, empty, iso), (CUBE, empty, iso), (empty, CUBE, iso), (CUBE_SHIFTED, CUBE, aniso)]
    handler.update(([_onehot(p, a, "x") for p, _, a in cases], [_onehot(lab, a, "x") for _, lab, a in cases]))
    np.testing.assert_allclose(handler.metric_fn.get_buffer()[:, 0].numpy(), [1.0, 0.0, 0.0, 0.79995], atol=1e-5)

    plain = torch.stack([torch.zeros(SHAPE), torch.ones(SHAPE)])
    with pytest.raises(ValueError, match=r"affine.*y: list of 1 Tensor"):
        handler.update(([plain], [plain]))


def test_report_rows_use_the_case_id_of_the_datalist(tmp_path: Path) -> None:
    """An LNQ2023 case is ``LNQ2023_0007`` in the datalist, in splits.json and in per_case_metrics.csv (its image
    file is ``LNQ2023_0007-ct.nrrd``), evaluated from files through a real MONAI evaluator."""
    hu, label = ct_volume(shape=(16, 16, 8))
    for i in range(7, 12):
        write(tmp_path / "lnq" / f"LNQ2023_{i:04d}-ct.nrrd", hu)
        write(tmp_path / "lnq" / f"LNQ2023_{i:04d}-seg.nrrd", label)
    datalist, _ = index_dataset(tmp_path / "lnq", "lnq2023", tmp_path / "datalist.json", verbose=False)
    splits = make_splits(datalist, shots=[1], seeds=[0], output=tmp_path / "splits.json")
    test = load_split(tmp_path / "splits.json", "test")
    assert [c["case_id"] for c in test] == [c["case_id"] for c in splits["test"]] and len(test) == 1

    load = Compose([
        LoadImaged(["image", "label"], reader=SimpleITKReader, image_only=True),
        EnsureChannelFirstd(["image", "label"]),
        AsDiscreted("label", to_onehot=2),
    ])
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(Dataset(test, load), batch_size=1),
        network=torch.nn.Identity(),
        # the label scored against itself: this test is about the row names
        key_val_metric={"dice": MeanDice(include_background=False, output_transform=from_engine(["label", "label"]))},
    )
    EvaluationReport(output_dir=tmp_path / "eval", metric_names=["dice"]).attach(evaluator)
    evaluator.run()
    with open(tmp_path / "eval" / "per_case_metrics.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["case_id"] for r in rows] == [c["case_id"] for c in splits["test"]]
    assert rows[0]["case_id"].startswith("LNQ2023_") and not rows[0]["case_id"].endswith("-ct")
    assert float(rows[0]["dice"]) == 1.0


def test_report_refuses_batches_without_case_names(tmp_path: Path) -> None:
    report = EvaluationReport(output_dir=tmp_path, metric_names=["dice"])
    assert report.batch_case_ids({"case_id": ["a", "b"], "image": torch.zeros(2)}) == ["a", "b"]
    assert report.batch_case_ids([{"case_id": "a"}, {"case_id": "b"}]) == ["a", "b"]
    with pytest.raises(ValueError, match="has no 'case_id'.*Give the datalist entries a `case_id`"):
        report.batch_case_ids({"image": torch.zeros(1)})
    with pytest.raises(ValueError, match="type int"):
        report.batch_case_ids(3)


def test_evaluation_report_refuses_nan_and_count_mismatch(tmp_path: Path) -> None:
    report = EvaluationReport(output_dir=tmp_path, metric_names=["dice"])
    report._filenames = ["a", "b"]  # the case ids MetricsSaver collected
    engine = SimpleNamespace(state=SimpleNamespace(metric_details={"dice": torch.tensor([[0.5], [float("nan")]])}))
    with pytest.raises(ValueError, match=r"not finite.*\['b'\]"):
        report(engine)  # type: ignore[arg-type]
    engine.state.metric_details["dice"] = torch.tensor([[0.5]])
    with pytest.raises(ValueError, match="1 per-case values but 2"):
        report(engine)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
