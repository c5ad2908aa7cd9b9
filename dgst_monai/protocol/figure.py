"""The qualitative figure, in the manner of the paper's Fig. 2: the same axial slices for every method.

Rows are the run's qualitative test cases (the first two test case ids, chosen before any result); on each the
axial slice with the largest reference area is shown in a mediastinal window (W 400, L 40 HU), in radiological
orientation (patient's right on the left, anterior up). The first column shows the reference contour (green),
the others each method's predicted contour (red) over the reference (thin green), for one shot level (the
middle one of the grid) and the first seed. The predictions are the masks the cells saved at their final
checkpoint (``cells/<cell>/qualitative/<case>.npz``, in the image file's array order).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dgst_monai.protocol.grid import FOUNDATION, Cell, method_label

__all__ = ["write_qualitative"]

_WINDOW = (-160.0, 240.0)  # W 400 / L 40 HU


def _canonical(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``array`` (the file's array order) reoriented to RAS, as nibabel's ``as_closest_canonical`` would."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    return nib.orientations.apply_orientation(array, ornt)


def _display(slice_xy: np.ndarray) -> np.ndarray:
    """A RAS (x, y) slice as an image: rows anterior to posterior, columns patient right to left."""
    return np.ascontiguousarray(slice_xy.T[::-1, ::-1])


def write_qualitative(out: Path, state: Mapping[str, Any], *, table_gamma: int, sparse: set[str]) -> Path | None:
    """Write ``qualitative.png`` from the saved predictions; None if no cell saved any.

    Args:
        out: run folder.
        state: ``benchmark.json``.
        table_gamma: gamma of the sparse methods in the tables.
        sparse: the methods that take a gamma.
    """
    import nibabel as nib

    from dgst_monai.data.datalists import load_split
    from dgst_monai.protocol.plots import pyplot, save_png

    grid, protocol = state["grid"], state["protocol"]
    cases = list(protocol["save_cases"])
    shots = sorted(int(k) for k in grid["shots"])
    k, seed = shots[len(shots) // 2], int(grid["seeds"][0])
    columns = [Cell(FOUNDATION, 0, 0)] + [
        Cell(m, k, seed, table_gamma if m in sparse else None) for m in grid["methods"] if m != FOUNDATION
    ]
    columns = [c for c in columns if all((out / "cells" / c.id / "qualitative" / f"{i}.npz").is_file() for i in cases)]
    if not cases or not columns:
        return None
    try:
        by_id = {c["case_id"]: c for c in load_split(protocol["datalist"], "test")}
    except FileNotFoundError:  # a run folder moved without its data: the figure needs the images
        return None
    plt = pyplot()
    fig, axes = plt.subplots(
        len(cases), len(columns) + 1, figsize=(2.2 * (len(columns) + 1), 2.4 * len(cases)), squeeze=False
    )
    for row, case_id in enumerate(cases):
        image_file, label_file = nib.load(by_id[case_id]["image"]), nib.load(by_id[case_id]["label"])
        affine = label_file.affine
        image = _canonical(np.asarray(image_file.dataobj, dtype=np.float32), image_file.affine)
        label = _canonical(np.asarray(label_file.dataobj) > 0, affine)
        z = int(np.argmax(label.sum(axis=(0, 1))))
        ct = _display(np.clip(image[:, :, z], *_WINDOW))
        reference = _display(label[:, :, z])
        panels: list[tuple[str, np.ndarray | None]] = [("Reference", None)]
        for cell in columns:
            with np.load(out / "cells" / cell.id / "qualitative" / f"{case_id}.npz") as data:
                pred = _canonical(data["pred"] > 0, affine)
            title = "Foundation" if cell.method == FOUNDATION else method_label(cell.method)
            panels.append((title, _display(pred[:, :, z])))
        for col, (title, pred) in enumerate(panels):
            ax = axes[row][col]
            ax.imshow(ct, cmap="gray", vmin=_WINDOW[0], vmax=_WINDOW[1], interpolation="nearest")
            if reference.any():
                ax.contour(reference, levels=[0.5], colors="lime", linewidths=1.2 if pred is None else 0.6)
            if pred is not None and pred.any():
                ax.contour(pred, levels=[0.5], colors="red", linewidths=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=8)
            if col == 0:
                ax.set_ylabel(f"{case_id}\nslice {z}", fontsize=7)
    fig.suptitle(f"{k} shots, seed {seed}: reference (green) and prediction (red)", fontsize=9)
    return save_png(fig, out / "qualitative.png")
