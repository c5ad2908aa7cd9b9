"""Lymph-node-level metrics on hand-built cases: matching by overlap, sizes in mm, volume error, pooling."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dgst_monai.metrics import connected_nodes, node_metrics, short_axis_mm, summarize_nodes

SHAPE = (60, 40, 12)
ISO = (1.0, 1.0, 1.0)


def boxes(*ranges: tuple[slice, slice, slice], shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """A mask with a box per ``(sx, sy, sz)`` slice triple."""
    mask = np.zeros(shape, dtype=bool)
    for r in ranges:
        mask[r] = True
    return mask


A = (slice(5, 17), slice(5, 17), slice(2, 8))  # 12 x 12 voxels in-plane
B = (slice(30, 42), slice(5, 17), slice(2, 8))
FAR = (slice(50, 55), slice(30, 35), slice(8, 10))


def test_two_nodes_one_missed():
    m = node_metrics(boxes(A), boxes(A, B), ISO)
    assert (m["gt_nodes"], m["detected"], m["pred_nodes"], m["pred_true"]) == (2, 1, 1, 1)
    assert m["node_recall"] == 0.5 and m["node_precision"] == 1.0
    assert m["node_f1"] == pytest.approx(2 / 3)
    assert m["fp_per_volume"] == 0.0


def test_a_false_positive_counts_per_volume_and_lowers_precision():
    m = node_metrics(boxes(A, B, FAR), boxes(A, B), ISO)
    assert (m["detected"], m["pred_nodes"], m["pred_true"]) == (2, 3, 2)
    assert m["node_recall"] == 1.0 and m["node_precision"] == pytest.approx(2 / 3)
    assert m["fp_per_volume"] == 1.0


def test_two_nodes_merged_in_the_prediction_are_both_detected_by_one_component():
    left, right = (slice(5, 15), slice(5, 15), slice(2, 8)), (slice(16, 26), slice(5, 15), slice(2, 8))
    label = boxes(left, right)  # one empty voxel column between them: two reference nodes
    pred = boxes((slice(5, 26), slice(5, 15), slice(2, 8)))  # the gap filled: one component
    assert connected_nodes(label)[1] == 2 and connected_nodes(pred)[1] == 1
    m = node_metrics(pred, label, ISO)
    assert (m["gt_nodes"], m["detected"], m["pred_nodes"], m["pred_true"]) == (2, 2, 1, 1)
    assert m["merged"] == 1 and m["split"] == 0
    assert m["node_recall"] == m["node_precision"] == m["node_f1"] == 1.0


def test_a_node_split_in_two_is_detected_once_and_both_pieces_are_true():
    label = boxes((slice(5, 25), slice(5, 15), slice(2, 8)))
    pred = boxes((slice(5, 13), slice(5, 15), slice(2, 8)), (slice(16, 25), slice(5, 15), slice(2, 8)))
    m = node_metrics(pred, label, ISO)
    assert (m["gt_nodes"], m["detected"], m["pred_nodes"], m["pred_true"]) == (1, 1, 2, 2)
    assert m["split"] == 1 and m["merged"] == 0
    assert m["node_recall"] == 1.0 and m["node_precision"] == 1.0 and m["fp_per_volume"] == 0.0


def test_node_sizes_on_both_sides_of_10_mm_with_anisotropic_spacing():
    spacing = (0.5, 1.0, 3.0)
    small = (slice(5, 23), slice(5, 20), slice(2, 8))  # 18 x 15 voxels = 9 x 15 mm: short axis 9 mm
    large = (slice(30, 52), slice(5, 17), slice(2, 8))  # 22 x 12 voxels = 11 x 12 mm: short axis 11 mm
    label = boxes(small, large)
    assert short_axis_mm(boxes(small), spacing) == pytest.approx(9.0)
    assert short_axis_mm(boxes(large), spacing) == pytest.approx(11.0)
    # the 18 mm extent across slices is not the short axis
    assert short_axis_mm(boxes(small), spacing) < 6 * 3.0

    m = node_metrics(boxes(small), label, spacing)  # the large node is missed
    assert (m["gt_nodes_lt10"], m["gt_nodes_ge10"]) == (1, 1)
    assert (m["node_recall_lt10"], m["node_recall_ge10"]) == (1.0, 0.0)
    assert m["node_recall"] == 0.5
    assert m["pred_nodes_lt10"] == 1 and m["pred_nodes_ge10"] == 0
    assert math.isnan(m["node_precision_ge10"])  # no large predicted component: undefined, not 0 or 1

    # in voxels both would be >= 10; with isotropic 1 mm voxels both are large nodes
    iso = node_metrics(boxes(small), label, ISO)
    assert (iso["gt_nodes_lt10"], iso["gt_nodes_ge10"]) == (0, 2)


def test_the_axial_axis_is_the_one_given():
    label = boxes((slice(5, 23), slice(5, 20), slice(2, 8)))  # 18 x 15 x 6 voxels
    moved = np.moveaxis(label, 2, 0)  # slices along array axis 0
    spacing = (3.0, 0.5, 1.0)
    assert short_axis_mm(moved, spacing, axial_axis=0) == pytest.approx(9.0)
    # taken across array axis 1 instead, the cross-sections are 6 x 3 mm by 15 x 1 mm: 15 mm wide
    assert short_axis_mm(moved, spacing, axial_axis=1) == pytest.approx(15.0)


def test_short_axis_of_a_rotated_ellipse_is_its_minor_diameter():
    y, x = np.mgrid[0:120, 0:120] - 59.5
    u, v = x * np.cos(0.6) + y * np.sin(0.6), -x * np.sin(0.6) + y * np.cos(0.6)
    ellipse = (u / 40.0) ** 2 + (v / 12.0) ** 2 <= 1.0  # minor diameter 24 voxels
    node = np.repeat(ellipse[:, :, None], 3, axis=2)
    assert short_axis_mm(node, (0.5, 0.5, 2.0)) == pytest.approx(12.0, abs=0.75)  # + one voxel of footprint


def test_volume_errors():
    label = boxes(A)  # 12 * 12 * 6 = 864 voxels
    pred = boxes((slice(5, 17), slice(5, 17), slice(2, 5)))  # half of it
    m = node_metrics(pred, label, (0.5, 0.5, 2.0))  # 0.5 mm^3 per voxel
    assert m["volume_gt_ml"] == pytest.approx(864 * 0.5 / 1000)
    assert m["abs_volume_error_ml"] == pytest.approx(432 * 0.5 / 1000)
    assert m["rel_volume_error"] == pytest.approx(0.5)
    empty = node_metrics(pred, np.zeros(SHAPE, bool), ISO)
    assert math.isnan(empty["rel_volume_error"]) and empty["abs_volume_error_ml"] == pytest.approx(0.432)


def test_empty_cases_follow_the_metrics_convention():
    nothing = np.zeros(SHAPE, bool)
    both = node_metrics(nothing, nothing, ISO)
    assert both["node_f1"] == 1.0 and math.isnan(both["node_recall"]) and math.isnan(both["node_precision"])
    missed = node_metrics(nothing, boxes(A), ISO)
    assert missed["node_recall"] == 0.0 and missed["node_f1"] == 0.0
    spurious = node_metrics(boxes(A), nothing, ISO)
    assert spurious["node_precision"] == 0.0 and spurious["node_f1"] == 0.0 and spurious["fp_per_volume"] == 1.0


def test_summary_pools_nodes_over_cases():
    one = node_metrics(boxes(A), boxes(A, B), ISO)  # 1 of 2 detected
    two = node_metrics(boxes(A, B, FAR), boxes(A, B), ISO)  # 2 of 2, one false positive
    three = node_metrics(boxes(A), boxes(A), ISO)  # 1 of 1
    pooled = summarize_nodes([one, two, three])
    assert pooled["gt_nodes"] == 5 and pooled["detected"] == 4
    assert pooled["node_recall"] == pytest.approx(4 / 5)  # not the mean of 0.5, 1, 1
    assert pooled["node_precision"] == pytest.approx(4 / 5)
    assert pooled["fp_per_volume"] == pytest.approx(1 / 3)
    assert pooled["n_cases"] == 3


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: node_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), ISO), "same shape"),
        (lambda: node_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1.0, 0.0, 1.0)), "spacing"),
        (lambda: node_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), ISO, axial_axis=3), "axial_axis"),
        (lambda: node_metrics(np.full((4, 4, 4), 2), np.zeros((4, 4, 4)), ISO), "only 0 and 1"),
        (lambda: connected_nodes(np.zeros((4, 4, 4)), connectivity=8), "connectivity"),
        (lambda: summarize_nodes([]), "no cases"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(call, message):
    with pytest.raises(ValueError, match=message):
        call()
