"""A PNG montage of one case (axial and coronal slice, LN label contoured) with no plotting library.

``write_png`` is a minimal PNG encoder (zlib + struct: signature, IHDR, one IDAT, IEND; 8-bit grey or RGB);
contours are ``label XOR eroded label`` per slice. Slices are shown the radiological way: the patient's right on
the image's left, anterior (axial) / superior (coronal) at the top, with the coronal slice stretched to the true
slice spacing.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

__all__ = ["case_montage", "write_png"]

#: Soft-tissue window (HU) used for display: level 40, width 400.
WINDOW: tuple[float, float] = (-160.0, 240.0)
_CONTOUR_RGB = np.array([255, 40, 40], dtype=np.uint8)


def write_png(path: str | os.PathLike[str], pixels: np.ndarray) -> Path:
    """Write an 8-bit greyscale (H, W) or RGB (H, W, 3) array as a PNG file.

    Raises:
        ValueError: not uint8, or a shape other than (H, W) / (H, W, 3).
    """
    if pixels.dtype != np.uint8:
        raise ValueError(f"write_png needs uint8 pixels, got {pixels.dtype}")
    if pixels.ndim == 2:
        colour_type, channels = 0, 1
    elif pixels.ndim == 3 and pixels.shape[2] == 3:
        colour_type, channels = 2, 3
    else:
        raise ValueError(f"write_png needs an (H, W) or (H, W, 3) array, got shape {pixels.shape}")
    height, width = pixels.shape[:2]
    rows = np.ascontiguousarray(pixels).reshape(height, width * channels)
    raw = np.hstack([np.zeros((height, 1), dtype=np.uint8), rows]).tobytes()  # filter byte 0 (None) per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png)
    return out


def _grey(hu: np.ndarray) -> np.ndarray:
    lo, hi = WINDOW
    return (np.clip((hu - lo) / (hi - lo), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _panel(hu: np.ndarray, label: np.ndarray, row_scale: float) -> np.ndarray:
    """RGB panel of a 2-D slice with the label's outline in red, stretched to ``row_scale`` times its rows."""
    mask = label > 0
    outline = mask ^ ndimage.binary_erosion(mask) if mask.any() else mask
    rgb = np.repeat(_grey(hu)[..., None], 3, axis=2)
    rgb[outline] = _CONTOUR_RGB
    rows = max(1, int(round(rgb.shape[0] * row_scale)))
    pick = np.minimum((np.arange(rows) / row_scale).astype(int), rgb.shape[0] - 1)  # nearest-neighbour rows
    return rgb[pick]


def case_montage(
    image_path: str | os.PathLike[str], label_path: str | os.PathLike[str], out_png: str | os.PathLike[str]
) -> Path:
    """Axial and coronal slices through the largest labelled slice of a case, side by side, label contoured.

    Args:
        image_path: CT image (any format :func:`dgst_monai.data.readers.read_image` reads).
        label_path: its label on the same grid.
        out_png: PNG to write.

    Returns:
        The PNG path.
    """
    from dgst_monai.data.readers import read_image

    # LPS array order after DICOMOrient: x runs to the patient's left, y to posterior, z to superior, which
    # puts the patient's right on the image's left and anterior at the top of an axial (y, x) slice.
    image = sitk.DICOMOrient(read_image(image_path), "LPS")
    label = sitk.DICOMOrient(read_image(label_path), "LPS")
    hu = sitk.GetArrayFromImage(image).astype(np.float32)  # (z, y, x)
    lab = sitk.GetArrayFromImage(label)
    if hu.shape != lab.shape:
        raise ValueError(f"{label_path} has shape {lab.shape[::-1]} but {image_path} has {hu.shape[::-1]}")
    sx, sy, sz = image.GetSpacing()
    fg = lab > 0
    z = int(np.argmax(fg.sum(axis=(1, 2)))) if fg.any() else hu.shape[0] // 2
    y = int(np.argmax(fg.sum(axis=(0, 2)))) if fg.any() else hu.shape[1] // 2
    axial = _panel(hu[z], lab[z], sy / sx)
    coronal = _panel(hu[::-1, y, :], lab[::-1, y, :], sz / sx)  # superior at the top
    height = max(axial.shape[0], coronal.shape[0])
    gap = np.zeros((height, 4, 3), dtype=np.uint8)

    def pad(panel: np.ndarray) -> np.ndarray:
        return np.pad(panel, ((0, height - panel.shape[0]), (0, 0), (0, 0)))

    return write_png(out_png, np.hstack([pad(axial), gap, pad(coronal)]))
