"""Seeded synthetic CT with lymph-node labels: the embedded default data of dgst-monai.

Two domain families stand in for the real cohorts (RADCURE / SegRap2023 and LNQ2023), so that tests and the
demo run on a CPU without downloads:

* ``hn`` (head and neck, the *source* domain of pre-training): a neck cross-section with skin and fat,
  sternocleidomastoid, paraspinal, scalene, strap and prevertebral muscles, the larynx/trachea, oesophagus,
  cervical spine, carotid arteries and jugular veins, thyroid and submandibular glands; lymph nodes along
  the jugular chain (levels II, III, IV), the posterior triangle (V), submandibular (Ib) and central (VI).
* ``mediastinum`` (the *target* domain of few-shot adaptation): a chest cross-section with chest wall,
  ribs, lungs and pulmonary vessels, trachea and bronchi, aorta, pulmonary arteries, SVC, azygos, the top of
  the heart, oesophagus, thoracic spine and sternum; lymph nodes at the IASLC stations (2R/2L, 4R/4L, 5, 6,
  7 subcarinal, 8, 10R/10L hilar, 3A) in mediastinal and hilar fat.

Tissues are HU-calibrated (see :data:`dgst_monai.data.phantoms.anatomy.TISSUES`); nodes are rotated
ellipsoids of soft-tissue density, some with a fatty hilum, placed next to vessels and airway. Muscles,
glands, oesophagus, myocardium (and, without contrast, the vessels) share the nodes' density, so intensity
alone does not segment them.

Rendering is honest about anisotropic voxels: every slice integrates its slab (the slice thickness) by
averaging ``ceil(thickness / z_step_mm)`` sub-slices, each anti-aliased in-plane, and the label is the
lymph-node occupancy > 0.5 on the same grid. A Gaussian reconstruction kernel then blurs in-plane and
spatially correlated Gaussian noise is added. Arrays are (x, y, z); the affine is nibabel's (RAS world).

Knobs (``synthesize_case(domain, seed, **knobs)`` and ``write_synthetic_dataset(..., **knobs)``); the two
default columns differ on purpose, that is the domain shift:

==================  ==========================  ===============  ===============  ================================
knob                allowed                     ``hn``           ``mediastinum``  effect
==================  ==========================  ===============  ===============  ================================
fov_mm              (x, y, z); x, y 32-512 mm,  (170, 170, 96)   (256, 208, 120)  field of view, centred on the
                    z 4-400 mm                                                    nodal stations: the small-FOV
                                                                                  knob for tests
spacing_mm          (sx, sy, sz); sx, sy        (0.8, 0.8, 2.0)  (0.9, 0.9, 3.0)  voxel spacing
                    0.5-1.0 mm, sz 1-5 mm
slice_thickness_mm  None (= sz) or 1-5 mm       None             None             slab each slice integrates
noise_sigma         0-100 HU                    12               25               std of the CT noise
recon_kernel        'soft', 'standard',         'standard'       'sharp'          in-plane blur sigma 1.0 / 0.6 /
                    'sharp' or sigma 0-3 mm                                       0.3 mm; noise grain follows it
contrast_phase      'none', 'arterial',         'venous'         'arterial'       arteries 230-300 / 150-200 HU,
                    'venous'                                                      veins 150-190 / 160-220 HU,
                                                                                  'none': all blood 35-50 HU
n_nodes             int or (lo, hi), 0-40       (6, 12)          (4, 10)          nodes per case
node_short_axis_mm  (lo, hi) within 4-30 mm     (4, 18)          (5, 25)          short-axis range (log-uniform)
hilum_fraction      0-1                         0.25             0.4              share of nodes >= 8 mm with a
                                                                                  fatty hilum
orientation         'LPS' or 'RAS'              'LPS'            'LPS'            array axis order (the affine
                                                                                  follows, same anatomy in RAS)
patient_shift_mm    0-30 mm                     5                5                in-plane position jitter
anatomy_scale       (lo, hi) within 0.8-1.2     (0.92, 1.08)     (0.92, 1.08)     body-size variation
z_step_mm           0.1-2 mm                    0.5              0.5              sub-slice step of the slab
                                                                                  integration
==================  ==========================  ===============  ===============  ================================

Default volumes: ``hn`` 212 x 212 x 48 voxels, ``mediastinum`` 284 x 231 x 40 voxels (its FOV crops the
lateral chest wall of the larger patients, like a targeted reconstruction). Nodes the stations cannot hold
(many bulky nodes in a small FOV) are dropped with a ``RuntimeWarning``.

Example:
    >>> from dgst_monai.data.phantoms import synthesize_case, write_synthetic_dataset
    >>> case = synthesize_case("mediastinum", seed=3, fov_mm=(110, 110, 48), n_nodes=4)
    >>> str(case.image.dtype), str(case.label.dtype), case.image.shape, len(case.nodes)
    ('int16', 'uint8', (122, 122, 16), 4)
    >>> datalist = write_synthetic_dataset("/tmp/ln_hn", domain="hn", n=20, seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import gzip
import io
import math
import os
import pathlib
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np
from scipy import ndimage

from dgst_monai.data.phantoms.anatomy import (
    DOMAIN_FOCUS,
    MIXED_TISSUE,
    TISSUES,
    Anatomy,
    NodeSpec,
    Paint,
    build_anatomy,
    place_nodes,
)
from dgst_monai.files import atomic_write, atomic_write_json
from dgst_monai.normalization import foreground_sample, intensity_properties_of

__all__ = [
    "DOMAINS",
    "KERNELS",
    "LymphNode",
    "PhantomCase",
    "default_knobs",
    "resolve_knobs",
    "synthesize_case",
    "write_synthetic_dataset",
    "write_nifti",
]

DOMAINS: tuple[str, ...] = ("hn", "mediastinum")

#: Named reconstruction kernels: in-plane Gaussian blur sigma in mm.
KERNELS: dict[str, float] = {"soft": 1.0, "standard": 0.6, "sharp": 0.3}

_CONTRAST_PHASES = ("none", "arterial", "venous")
_ORIENTATIONS = ("LPS", "RAS")
_HU_MIN, _HU_MAX = -1024, 3071
_MAX_VOXELS = 64_000_000  # guard against a FOV/spacing typo eating all the memory

_DEFAULTS: dict[str, dict[str, Any]] = {
    "hn": {
        "fov_mm": (170.0, 170.0, 96.0),
        "spacing_mm": (0.8, 0.8, 2.0),
        "slice_thickness_mm": None,
        "noise_sigma": 12.0,
        "recon_kernel": "standard",
        "contrast_phase": "venous",
        "n_nodes": (6, 12),
        "node_short_axis_mm": (4.0, 18.0),
        "hilum_fraction": 0.25,
        "orientation": "LPS",
        "patient_shift_mm": 5.0,
        "anatomy_scale": (0.92, 1.08),
        "z_step_mm": 0.5,
    },
    "mediastinum": {
        "fov_mm": (256.0, 208.0, 120.0),
        "spacing_mm": (0.9, 0.9, 3.0),
        "slice_thickness_mm": None,
        "noise_sigma": 25.0,
        "recon_kernel": "sharp",
        "contrast_phase": "arterial",
        "n_nodes": (4, 10),
        "node_short_axis_mm": (5.0, 25.0),
        "hilum_fraction": 0.4,
        "orientation": "LPS",
        "patient_shift_mm": 5.0,
        "anatomy_scale": (0.92, 1.08),
        "z_step_mm": 0.5,
    },
}

# World position of the anatomy centre (LPS, mm), per domain: table/isocentre offsets so that origins look
# like scanner coordinates rather than zeros. Uniform ranges (lo, hi) per axis.
_WORLD_OFFSET: dict[str, tuple[tuple[float, float], ...]] = {
    "hn": ((-12.0, 12.0), (-25.0, 25.0), (-180.0, -60.0)),
    "mediastinum": ((-15.0, 15.0), (-30.0, 30.0), (-330.0, -210.0)),
}


# ---------------------------------------------------------------------------------------------------------
# Knobs
# ---------------------------------------------------------------------------------------------------------


def default_knobs(domain: str) -> dict[str, Any]:
    """The default knobs of ``domain`` (a copy), see the module docstring table.

    Raises:
        ValueError: unknown domain.
    """
    _check_domain(domain)
    return dict(_DEFAULTS[domain])


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; allowed: {', '.join(DOMAINS)}")


def _number(name: str, value: Any, lo: float, hi: float, what: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"knob {name}: expected a number{what}, got {value!r}")
    v = float(value)
    if not (lo <= v <= hi) or math.isnan(v):
        raise ValueError(f"knob {name}{what} = {v:g} is out of range; allowed {lo:g} to {hi:g}")
    return v


def _pair(name: str, value: Any, lo: float, hi: float, integer: bool = False) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"knob {name}: expected a (lo, hi) pair within {lo:g} to {hi:g}, got {value!r}")
    a = _number(name, value[0], lo, hi, " (lo)")
    b = _number(name, value[1], lo, hi, " (hi)")
    if a > b:
        raise ValueError(f"knob {name}: lo {a:g} is greater than hi {b:g}")
    if integer:
        if a != int(a) or b != int(b):
            raise ValueError(f"knob {name}: expected integers, got {value!r}")
        return int(a), int(b)
    return a, b


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"knob {name} = {value!r} is not allowed; choose one of {', '.join(allowed)}")
    return value


def resolve_knobs(domain: str, **knobs: Any) -> dict[str, Any]:
    """Merge ``knobs`` over the defaults of ``domain`` and validate every value.

    Args:
        domain: 'hn' or 'mediastinum'.
        **knobs: overrides, names and ranges as in the module docstring table.

    Returns:
        The complete knob dictionary (tuples for sequences).

    Raises:
        ValueError: unknown domain, unknown knob name, or a value outside its allowed range (the message
            names the knob and the range).
    """
    _check_domain(domain)
    unknown = sorted(set(knobs) - set(_DEFAULTS[domain]))
    if unknown:
        raise ValueError(f"unknown knob(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_DEFAULTS[domain]))}")
    k = {**_DEFAULTS[domain], **knobs}
    out: dict[str, Any] = {}

    fov = k["fov_mm"]
    if not isinstance(fov, (list, tuple)) or len(fov) != 3:
        raise ValueError(f"knob fov_mm: expected (x, y, z) in mm, got {fov!r}")
    out["fov_mm"] = (
        _number("fov_mm", fov[0], 32.0, 512.0, "[x]"),
        _number("fov_mm", fov[1], 32.0, 512.0, "[y]"),
        _number("fov_mm", fov[2], 4.0, 400.0, "[z]"),
    )
    sp = k["spacing_mm"]
    if not isinstance(sp, (list, tuple)) or len(sp) != 3:
        raise ValueError(f"knob spacing_mm: expected (sx, sy, sz) in mm, got {sp!r}")
    out["spacing_mm"] = (
        _number("spacing_mm", sp[0], 0.5, 1.0, "[x] (in-plane)"),
        _number("spacing_mm", sp[1], 0.5, 1.0, "[y] (in-plane)"),
        _number("spacing_mm", sp[2], 1.0, 5.0, "[z] (slice spacing)"),
    )
    th = k["slice_thickness_mm"]
    out["slice_thickness_mm"] = None if th is None else _number("slice_thickness_mm", th, 1.0, 5.0)
    out["noise_sigma"] = _number("noise_sigma", k["noise_sigma"], 0.0, 100.0)
    kern = k["recon_kernel"]
    if isinstance(kern, str):
        out["recon_kernel"] = _choice("recon_kernel", kern, tuple(KERNELS))
    else:
        out["recon_kernel"] = _number("recon_kernel", kern, 0.0, 3.0, " (blur sigma, mm)")
    out["contrast_phase"] = _choice("contrast_phase", k["contrast_phase"], _CONTRAST_PHASES)
    nn = k["n_nodes"]
    if isinstance(nn, (list, tuple)):
        out["n_nodes"] = _pair("n_nodes", nn, 0, 40, integer=True)
    else:
        v = _number("n_nodes", nn, 0, 40)
        if v != int(v):
            raise ValueError(f"knob n_nodes: expected an integer, got {nn!r}")
        out["n_nodes"] = int(v)
    out["node_short_axis_mm"] = _pair("node_short_axis_mm", k["node_short_axis_mm"], 4.0, 30.0)
    out["hilum_fraction"] = _number("hilum_fraction", k["hilum_fraction"], 0.0, 1.0)
    ori = k["orientation"]
    out["orientation"] = _choice("orientation", ori.upper() if isinstance(ori, str) else ori, _ORIENTATIONS)
    out["patient_shift_mm"] = _number("patient_shift_mm", k["patient_shift_mm"], 0.0, 30.0)
    out["anatomy_scale"] = _pair("anatomy_scale", k["anatomy_scale"], 0.8, 1.2)
    out["z_step_mm"] = _number("z_step_mm", k["z_step_mm"], 0.1, 2.0)

    shape = [max(1, round(f / s)) for f, s in zip(out["fov_mm"], out["spacing_mm"])]
    if math.prod(shape) > _MAX_VOXELS:
        raise ValueError(
            f"knobs fov_mm / spacing_mm give {shape} = {math.prod(shape)} voxels; at most {_MAX_VOXELS} allowed"
        )
    return out


# ---------------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LymphNode:
    """A lymph node of a synthetic case, for node-level metrics and tests.

    Attributes:
        station: nodal level / station name ('II', '4R', '7', ...).
        center_ras: centre in world RAS coordinates (mm), consistent with the case affine.
        center_voxel: centre in (fractional) voxel indices of the returned arrays.
        semi_axes_mm: the three semi-axes (mm), ascending.
        short_axis_mm: smallest full diameter (mm).
        long_axis_mm: largest full diameter (mm).
        has_hilum: whether it has a fatty hilum.
        hu: HU of its parenchyma.
    """

    station: str
    center_ras: tuple[float, float, float]
    center_voxel: tuple[float, float, float]
    semi_axes_mm: tuple[float, float, float]
    short_axis_mm: float
    long_axis_mm: float
    has_hilum: bool
    hu: float


@dataclass
class PhantomCase:
    """One synthetic CT case.

    Attributes:
        image: int16 HU array, (x, y, z) array order, in the requested orientation.
        label: uint8 array of the same shape, 0 background, 1 lymph node.
        affine: 4x4 float64 voxel-to-world matrix, nibabel convention (RAS world, mm).
        spacing: voxel spacing (sx, sy, sz) in mm.
        domain: 'hn' or 'mediastinum'.
        case_id: identifier, e.g. 'hn_0000'.
        knobs: the complete knobs the case was made with.
        seed: the seed it was made from.
        nodes: the lymph nodes.
        tissue: debug only: uint8 tissue class per voxel (ids of ``TISSUES``; 255 where the voxel mixes
            classes through partial volume).
        clean: debug only: float32 HU before reconstruction blur and noise.
        occupancy: debug only: float32 lymph-node volume fraction per voxel (label = occupancy > 0.5).
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    domain: str
    case_id: str
    knobs: dict[str, Any]
    seed: int = 0
    nodes: tuple[LymphNode, ...] = ()
    tissue: np.ndarray | None = field(default=None, repr=False)
    clean: np.ndarray | None = field(default=None, repr=False)
    occupancy: np.ndarray | None = field(default=None, repr=False)


@dataclass
class _Grid:
    xs: np.ndarray  # voxel-centre coordinates, patient frame, mm (float64)
    ys: np.ndarray
    zs: np.ndarray
    spacing: tuple[float, float, float]
    thickness: float

    @property
    def lo(self) -> np.ndarray:
        sx, sy, sz = self.spacing
        return np.array([self.xs[0] - sx / 2, self.ys[0] - sy / 2, self.zs[0] - sz / 2])

    @property
    def hi(self) -> np.ndarray:
        sx, sy, sz = self.spacing
        return np.array([self.xs[-1] + sx / 2, self.ys[-1] + sy / 2, self.zs[-1] + sz / 2])


def _make_grid(domain: str, knobs: dict[str, Any], rng: np.random.Generator) -> _Grid:
    sx, sy, sz = knobs["spacing_mm"]
    fx, fy, fz = knobs["fov_mm"]
    nx, ny, nz = max(1, round(fx / sx)), max(1, round(fy / sy)), max(1, round(fz / sz))
    shift = rng.uniform(-1.0, 1.0, size=2) * knobs["patient_shift_mm"]
    cx, cy, cz = DOMAIN_FOCUS[domain]
    cx, cy = cx - shift[0], cy - shift[1]  # moving the FOV is moving the patient the other way
    xs = cx + (np.arange(nx) - (nx - 1) / 2.0) * sx
    ys = cy + (np.arange(ny) - (ny - 1) / 2.0) * sy
    zs = cz + (np.arange(nz) - (nz - 1) / 2.0) * sz
    thickness = knobs["slice_thickness_mm"] or sz
    return _Grid(xs, ys, zs, (sx, sy, sz), thickness)


def _index_range(centers: np.ndarray, lo: float, hi: float) -> tuple[int, int]:
    return int(np.searchsorted(centers, lo, "left")), int(np.searchsorted(centers, hi, "right"))


def _slab_mean(fine: np.ndarray, nsub: int) -> np.ndarray:
    """Mean of each run of ``nsub`` sub-slices (strided sums: much faster than a mean over a tiny axis)."""
    acc = fine[:, :, 0::nsub].copy()
    for m in range(1, nsub):
        acc += fine[:, :, m::nsub]
    acc *= np.float32(1.0 / nsub)
    return acc


class _Job(NamedTuple):
    """A paint clipped to the voxels it can touch: x range [ia, ib), y range [ja, jb), and slice ranges."""

    paint: Paint
    ia: int
    ib: int
    ja: int
    jb: int
    ranges: list[tuple[int, int, int]]  # (k0, k1, d): slices k0..k1 sampled on d sub-slices each


@dataclass(frozen=True)
class _Sampling:
    """The grid as painting uses it: float32 voxel centres shaped to broadcast, and the sub-slice sampling."""

    xg: np.ndarray  # (nx, 1, 1) voxel-centre x, float32
    yg: np.ndarray  # (1, ny, 1) voxel-centre y, float32
    zs: np.ndarray  # (nz,) slice centres, float64
    thickness: float
    nsub: int  # sub-slices per slice
    inv_h: np.float32  # 1 / in-plane pixel size: signed distance to occupancy ramp


def _render(
    paints: list[Paint], grid: _Grid, z_step: float, debug: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Paint the solids in order on sub-slices and integrate each slice's slab.

    Each paint composites ``img = img + occ * (hu - img)`` with ``occ`` its anti-aliased volume fraction,
    on ``nsub = ceil(thickness / z_step)`` sub-slices per slice spread over the slice thickness; the slice
    value is the mean of its sub-slices (a box slice profile). Work is limited to each solid's bounding box
    and done in chunks of slices to bound memory. Tubes whose outline moves slowly along z are evaluated on
    fewer sub-slices (a divisor of ``nsub``, the outline moving at most half a pixel between two of them)
    away from their cut ends; compositing always runs on all sub-slices.

    Returns:
        clean HU (float32), lymph-node occupancy (float32), tissue map (uint8, only if ``debug``).
    """
    f32 = np.float32
    xs, ys, zs = grid.xs.astype(f32), grid.ys.astype(f32), grid.zs.astype(np.float64)
    nx, ny, nz = len(xs), len(ys), len(zs)
    nsub = max(1, math.ceil(grid.thickness / z_step - 1e-6))
    h = math.sqrt(grid.spacing[0] * grid.spacing[1])
    sampling = _Sampling(xs[:, None, None], ys[None, :, None], zs, grid.thickness, nsub, f32(1.0 / h))
    jobs = _paint_jobs(paints, grid, nsub, h)

    img = np.empty((nx, ny, nz), f32)
    occ_ln = np.zeros((nx, ny, nz), f32)
    tissue = np.empty((nx, ny, nz), np.uint8) if debug else None
    chunk = max(1, 64 // nsub)
    for c0 in range(0, nz, chunk):
        c1 = min(nz, c0 + chunk)
        fine, fine_ln, debug_maps = _paint_chunk(jobs, sampling, c0, c1, debug)
        img[:, :, c0:c1] = _slab_mean(fine, nsub)
        if fine_ln is not None:
            occ_ln[:, :, c0:c1] = _slab_mean(fine_ln, nsub)
        if debug_maps is not None:
            tissue[:, :, c0:c1] = _pure_tissue(*debug_maps, nsub)
    return img, occ_ln, tissue


def _paint_jobs(paints: list[Paint], grid: _Grid, nsub: int, h: float) -> list[_Job]:
    """Clip every paint to the voxels within ``h`` of its bounding box (dropping paints outside the grid) and
    choose its sub-slice sampling per slice range."""
    zs, t = grid.zs, grid.thickness
    divisors = [d for d in range(1, nsub + 1) if nsub % d == 0]
    jobs = []
    for p in paints:
        lo, hi = p.shape.lo, p.shape.hi
        ia, ib = _index_range(grid.xs, lo[0] - h, hi[0] + h)
        ja, jb = _index_range(grid.ys, lo[1] - h, hi[1] + h)
        # Slices whose slab [z - t/2, z + t/2] touches the solid's z extent.
        ka = int(np.searchsorted(zs + t / 2, lo[2] - h, "left"))
        kb = int(np.searchsorted(zs - t / 2, hi[2] + h, "right"))
        if ia >= ib or ja >= jb or ka >= kb:
            continue
        d = nsub
        if math.isfinite(p.shape.z_rate):
            d = next(v for v in divisors if p.shape.z_rate * t / v <= 0.5 * h)
        ranges = [(ka, kb, nsub)]
        if d < nsub:
            # Slices whose slab stays clear of the cut ends take the coarse sampling.
            i0 = max(ka, int(np.searchsorted(zs - t / 2, lo[2] + h, "left")))
            i1 = min(kb, int(np.searchsorted(zs + t / 2, hi[2] - h, "right")))
            if i0 < i1:
                ranges = [r for r in ((ka, i0, nsub), (i0, i1, d), (i1, kb, nsub)) if r[0] < r[1]]
        jobs.append(_Job(p, ia, ib, ja, jb, ranges))
    return jobs


def _paint_chunk(
    jobs: list[_Job], s: _Sampling, c0: int, c1: int, debug: bool
) -> tuple[np.ndarray, np.ndarray | None, tuple[np.ndarray, np.ndarray] | None]:
    """Composite every job on the sub-slices of slices c0..c1.

    Returns:
        HU, lymph-node occupancy (None where no node reaches these slices) and, with ``debug``, the tissue id
        and the purity of every sub-voxel.
    """
    nx, ny = s.xg.shape[0], s.yg.shape[1]
    fine = np.full((nx, ny, (c1 - c0) * s.nsub), np.float32(-1000.0), np.float32)
    fine_ln = None
    t_fine = np.full(fine.shape, TISSUES["air"].id, np.uint8) if debug else None
    p_fine = np.ones(fine.shape, bool) if debug else None
    for job in jobs:
        for k0, k1, d in job.ranges:
            a, b = max(k0, c0), min(k1, c1)
            if a >= b:
                continue
            occ, hu = _occupancy_and_hu(job, s, a, b, d)
            sl = (slice(job.ia, job.ib), slice(job.ja, job.jb), slice((a - c0) * s.nsub, (b - c0) * s.nsub))
            # splitting an axis: a view, not a copy
            view = fine[sl].reshape(job.ib - job.ia, job.jb - job.ja, b - a, d, s.nsub // d)
            view += occ * (hu - view)
            if job.paint.label:
                if fine_ln is None:
                    fine_ln = np.zeros(fine.shape, np.float32)
                lv = fine_ln[sl].reshape(view.shape)
                lv += occ * (1.0 - lv)
            if debug:
                full = np.broadcast_to(occ, view.shape)
                _mark_tissue(t_fine[sl].reshape(view.shape), p_fine[sl].reshape(view.shape), full, job.paint.tissue)
    return fine, fine_ln, (t_fine, p_fine) if debug else None


def _occupancy_and_hu(job: _Job, s: _Sampling, a: int, b: int, d: int) -> tuple[np.ndarray, np.ndarray | np.float32]:
    """Volume fraction and HU of ``job``'s paint on slices a..b sampled at ``d`` sub-slices each, shaped
    (x, y, slice, d, 1) to broadcast over each sample's share of the slice's sub-slices."""
    f32 = np.float32
    p, nk = job.paint, b - a
    zg = (s.zs[a:b, None] + s.thickness * ((np.arange(d) + 0.5) / d - 0.5)[None, :]).ravel().astype(f32)
    zg = zg[None, None, :]
    xg, yg = s.xg[job.ia : job.ib], s.yg[:, job.ja : job.jb]
    sd = p.shape.sdf(xg, yg, zg)
    occ = f32(0.5) - sd * s.inv_h
    np.clip(occ, 0.0, 1.0, out=occ)
    box = (job.ib - job.ia, job.jb - job.ja, nk * d)
    shape5 = (job.ib - job.ia, job.jb - job.ja, nk, d, 1)
    occ = np.broadcast_to(occ, box).reshape(shape5)
    hu = np.broadcast_to(p.hu(xg, yg, zg), box).reshape(shape5) if callable(p.hu) else f32(p.hu)
    return occ, hu


def _mark_tissue(tv: np.ndarray, pv: np.ndarray, occ: np.ndarray, tissue: str) -> None:
    """Debug maps of one paint: its class where it fills over half a sub-voxel; the sub-voxels it fills
    partly become mixed, those it fills wholly pure."""
    tv[occ > 0.5] = TISSUES[tissue].id
    pv[(occ > 1e-3) & (occ < 1.0 - 1e-3)] = False
    pv[occ >= 1.0 - 1e-3] = True


def _pure_tissue(t_fine: np.ndarray, p_fine: np.ndarray, nsub: int) -> np.ndarray:
    """Tissue id of each slice voxel whose sub-voxels are all pure and of one class; MIXED_TISSUE elsewhere."""
    nx, ny = t_fine.shape[:2]
    tr = t_fine.reshape(nx, ny, -1, nsub)
    pure = p_fine.reshape(nx, ny, -1, nsub).all(axis=3) & (tr == tr[..., :1]).all(axis=3)
    return np.where(pure, tr[..., 0], MIXED_TISSUE)


def _node_paints(nodes: list[NodeSpec]) -> list[Paint]:
    paints = []
    for nd in nodes:
        paints.append(Paint(nd.ellipsoid, "lymph_node", nd.hu, label=True))
        if nd.hilum is not None:
            paints.append(Paint(nd.hilum, "node_hilum", nd.hilum_hu))
    return paints


def _blur_sigma_mm(kernel: str | float) -> float:
    return KERNELS[kernel] if isinstance(kernel, str) else float(kernel)


def _add_noise(img: np.ndarray, sigma: float, corr_px: tuple[float, float], rng: np.random.Generator) -> None:
    """Add in-plane correlated Gaussian noise of standard deviation ``sigma`` HU to ``img`` in place."""
    if sigma <= 0:
        return
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    if max(corr_px) > 0.05:
        # The reconstruction kernel shapes the noise power spectrum: smoother kernels give coarser grain.
        noise = ndimage.gaussian_filter(noise, sigma=(corr_px[0], corr_px[1], 0.0), mode="wrap", truncate=3.0)
    noise *= np.float32(sigma / max(float(noise.std()), 1e-6))
    img += noise


def _affine(grid: _Grid, offset: np.ndarray, orientation: str) -> np.ndarray:
    """Voxel-to-RAS matrix. The array is rendered in LPS order (i -> left, j -> posterior, k -> superior)."""
    sx, sy, sz = grid.spacing
    first = np.array([grid.xs[0], grid.ys[0], grid.zs[0]]) + offset  # world LPS of voxel (0, 0, 0)
    last = np.array([grid.xs[-1], grid.ys[-1], grid.zs[0]]) + offset
    aff = np.eye(4)
    if orientation == "LPS":
        aff[:3, :3] = np.diag([-sx, -sy, sz])
        aff[:3, 3] = [-first[0], -first[1], first[2]]
    else:  # RAS: x and y flipped, so voxel (0, 0, 0) is the right-anterior corner
        aff[:3, :3] = np.diag([sx, sy, sz])
        aff[:3, 3] = [-last[0], -last[1], first[2]]
    return aff


def synthesize_case(
    domain: str, seed: int, *, case_id: str | None = None, debug: bool = False, **knobs: Any
) -> PhantomCase:
    """Generate one synthetic CT case with lymph-node labels, deterministically from ``seed``.

    Args:
        domain: 'hn' (source domain) or 'mediastinum' (target domain).
        seed: non-negative integer; the same seed and knobs give the same arrays bit for bit.
        case_id: identifier stored in the case; default ``f"{domain}_{seed:04d}"``.
        debug: also return the tissue map, the noise-free image and the node occupancy.
        **knobs: protocol and anatomy knobs, see the module docstring table.

    Returns:
        The case.

    Raises:
        ValueError: unknown domain or knob, a knob out of range, or a bad seed.
    """
    knobs = resolve_knobs(domain, **knobs)
    seed = _seed_value(seed)
    # Independent streams: the anatomy does not change when only the grid, kernel or noise knobs change.
    r_geo, r_anat, r_nodes, r_noise = (
        np.random.default_rng(s) for s in np.random.SeedSequence([seed, DOMAINS.index(domain)]).spawn(4)
    )
    scale_xy, scale_z, offset = _patient_draws(domain, knobs["anatomy_scale"], r_geo)
    grid = _make_grid(domain, knobs, r_geo)

    anat: Anatomy = build_anatomy(domain, r_anat, scale_xy, scale_z, knobs["contrast_phase"])
    nn = knobs["n_nodes"]
    n_nodes = int(r_nodes.integers(nn[0], nn[1] + 1)) if isinstance(nn, tuple) else nn
    # Called here, not in a helper: its warning names the caller of synthesize_case (stacklevel 3).
    nodes = place_nodes(r_nodes, anat, grid.lo, grid.hi, n_nodes, knobs["node_short_axis_mm"], knobs["hilum_fraction"])

    clean, occ, tissue = _render(anat.paints + _node_paints(nodes), grid, knobs["z_step_mm"], debug)
    label = (occ > 0.5).astype(np.uint8)
    image = _reconstruct(clean, grid.spacing, knobs, r_noise)

    orientation = knobs["orientation"]
    affine = _affine(grid, offset, orientation)
    if orientation == "RAS":
        image, label = _flip_xy(image, label)
        if debug:
            clean, occ, tissue = _flip_xy(clean, occ, tissue)
    return PhantomCase(
        image=image,
        label=label,
        affine=affine,
        spacing=tuple(float(s) for s in grid.spacing),
        domain=domain,
        case_id=case_id or f"{domain}_{seed:04d}",
        knobs=knobs,
        seed=seed,
        nodes=_lymph_nodes(nodes, offset, affine),
        tissue=tissue if debug else None,
        clean=clean if debug else None,
        occupancy=occ if debug else None,
    )


def _seed_value(seed: Any) -> int:
    """``seed`` as an int.

    Raises:
        ValueError: not a non-negative integer.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _patient_draws(
    domain: str, anatomy_scale: tuple[float, float], rng: np.random.Generator
) -> tuple[float, float, np.ndarray]:
    """This patient's in-plane and cranio-caudal scale and the world (LPS) position of its anatomy centre."""
    s_lo, s_hi = anatomy_scale
    scale_xy = float(rng.uniform(s_lo, s_hi))
    scale_z = float(np.clip(scale_xy * rng.uniform(0.95, 1.05), 0.8, 1.2))
    offset = np.array([rng.uniform(lo, hi) for lo, hi in _WORLD_OFFSET[domain]])
    return scale_xy, scale_z, offset


def _reconstruct(
    clean: np.ndarray, spacing: tuple[float, float, float], knobs: dict[str, Any], rng: np.random.Generator
) -> np.ndarray:
    """The scanner's image of ``clean``: in-plane kernel blur, kernel-shaped noise, int16 HU."""
    sx, sy, _ = spacing
    blur = _blur_sigma_mm(knobs["recon_kernel"])
    # The slice profile already blurred z; the reconstruction kernel acts in-plane.
    if blur > 0:
        img = ndimage.gaussian_filter(clean, sigma=(blur / sx, blur / sy, 0.0), mode="nearest", truncate=3.0)
    else:
        img = clean.copy()
    corr = 0.2 + 0.6 * blur  # noise grain (mm) grows with kernel smoothness
    _add_noise(img, knobs["noise_sigma"], (corr / sx, corr / sy), rng)
    return np.rint(np.clip(img, _HU_MIN, _HU_MAX)).astype(np.int16)


def _flip_xy(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """The arrays with x and y reversed (LPS to RAS array order), contiguous."""
    flip = (slice(None, None, -1), slice(None, None, -1), slice(None))
    return tuple(np.ascontiguousarray(a[flip]) for a in arrays)


def _lymph_nodes(nodes: list[NodeSpec], offset: np.ndarray, affine: np.ndarray) -> tuple[LymphNode, ...]:
    """The placed nodes as the case reports them: world RAS and voxel centres, sorted semi-axes."""
    inv = np.linalg.inv(affine)
    lymph_nodes = []
    for nd in nodes:
        c = nd.ellipsoid.center
        lps = np.array([c[0], c[1], c[2]]) + offset
        ras = np.array([-lps[0], -lps[1], lps[2]])
        vox = inv[:3, :3] @ ras + inv[:3, 3]
        lymph_nodes.append(
            LymphNode(
                station=nd.station,
                center_ras=tuple(float(v) for v in ras),
                center_voxel=tuple(float(v) for v in vox),
                semi_axes_mm=tuple(float(v) for v in np.sort(nd.ellipsoid.axes)),
                short_axis_mm=nd.short_axis_mm,
                long_axis_mm=nd.long_axis_mm,
                has_hilum=nd.hilum is not None,
                hu=nd.hu,
            )
        )
    return tuple(lymph_nodes)


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------


def write_nifti(
    path: str | os.PathLike[str], array: np.ndarray, affine: np.ndarray, compresslevel: int = 1
) -> pathlib.Path:
    """Write a NIfTI-1 file deterministically and atomically (``.nii.gz`` gzip-compressed).

    nibabel stamps the gzip header with the current time and the file name; here the header carries
    mtime 0 and no name, so the same array and affine always give the same bytes.

    Args:
        path: destination, ``.nii`` or ``.nii.gz``.
        array: data, written with its own dtype.
        affine: 4x4 voxel-to-RAS matrix (used for both sform and qform, code 1 'scanner').
        compresslevel: gzip level (1 is fast; noisy CT hardly compresses further).

    Returns:
        The path written.
    """
    path = pathlib.Path(path)
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    raw = img.to_bytes()
    if path.name.endswith(".gz"):
        buf = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=compresslevel, mtime=0) as gz:
            gz.write(raw)
        raw = buf.getvalue()
    atomic_write(path, raw)
    return path


def _jsonable(knobs: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in knobs.items()}


def write_synthetic_dataset(
    out_dir: str | os.PathLike[str],
    domain: str = "hn",
    n: int = 20,
    seed: int = 0,
    n_test: int | None = None,
    **knobs: Any,
) -> pathlib.Path:
    """Generate ``n`` cases and write them as a Decathlon-style dataset with a ``datalist.json``.

    Layout: ``imagesTr/<case_id>.nii.gz`` and ``labelsTr/<case_id>.nii.gz`` for the training cases,
    ``imagesTs/`` and ``labelsTs/`` for the test cases, ``datalist.json`` with paths relative to
    ``out_dir`` (``monai.data.load_decathlon_datalist(path, True, "training")`` resolves them). Case ids are
    ``<domain>_0000``, ``<domain>_0001``, ... with the test cases numbered after the training cases; every
    case has its own seed derived from ``seed`` and its index, so sets made with different seeds share no
    case. Every file is written atomically and the datalist last, so a datalist only exists for a complete set.

    The datalist's ``intensity_properties`` is nnU-Net's CT fingerprint: HU percentiles 0.5 and 99.5, mean
    and std of the voxels inside the lymph-node labels of the training cases, sampled as ``dgst-monai data
    index`` samples them (:func:`dgst_monai.normalization.foreground_sample`), so indexing the written files
    gives the same numbers; ``null`` when no training case has a node.

    Args:
        out_dir: output folder (created if needed; files of the same names are replaced).
        domain: 'hn' or 'mediastinum'.
        n: total number of cases (training + test), >= 1.
        seed: dataset seed, non-negative.
        n_test: number of test cases, 0 <= n_test < n; default 20 % of n rounded, at least 1 (0 when n is 1).
        **knobs: generator knobs (see the module docstring).

    Returns:
        Path of ``datalist.json``.

    Raises:
        ValueError: bad domain, n, n_test, seed or knob (before anything is written).
    """
    resolved = resolve_knobs(domain, **knobs)
    n, n_test, seed = _dataset_sizes(n, n_test, seed)
    out = pathlib.Path(out_dir)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs") if n_test else ("imagesTr", "labelsTr"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    training: list[dict[str, str]] = []
    test: list[dict[str, str]] = []
    case_seeds: dict[str, int] = {}
    fg_values: list[np.ndarray] = []
    for i in range(n):
        is_test = i >= n - n_test
        case_id = f"{domain}_{i:04d}"
        case_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        case = synthesize_case(domain, case_seed, case_id=case_id, **resolved)
        img_dir, lab_dir = ("imagesTs", "labelsTs") if is_test else ("imagesTr", "labelsTr")
        rel_img, rel_lab = f"{img_dir}/{case_id}.nii.gz", f"{lab_dir}/{case_id}.nii.gz"
        write_nifti(out / rel_img, case.image, case.affine)
        write_nifti(out / rel_lab, case.label, case.affine)
        (test if is_test else training).append({"case_id": case_id, "image": rel_img, "label": rel_lab})
        case_seeds[case_id] = case_seed
        if not is_test:
            fg_values.append(foreground_sample(case.image, case.label, case_id))
    datalist = {
        **_synthetic_header(domain, seed),
        "intensity_properties": intensity_properties_of(fg_values),
        "knobs": _jsonable(resolved),
        "seed": seed,
        "case_seeds": case_seeds,
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        "test": test,
    }
    return atomic_write_json(out / "datalist.json", datalist)


def _dataset_sizes(n: Any, n_test: Any, seed: Any) -> tuple[int, int, int]:
    """Checked ``n``, ``n_test`` (its default filled in) and ``seed`` of :func:`write_synthetic_dataset`.

    Raises:
        ValueError: a value out of its range; the message names it.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer (number of cases), got {n!r}")
    seed = _seed_value(seed)
    if n_test is None:
        n_test = max(1, round(0.2 * n)) if n >= 2 else 0
    if isinstance(n_test, bool) or not isinstance(n_test, (int, np.integer)) or not 0 <= n_test < n:
        raise ValueError(f"n_test must be an integer in 0..{n - 1} (at least one training case), got {n_test!r}")
    return int(n), int(n_test), seed


def _synthetic_header(domain: str, seed: int) -> dict[str, Any]:
    """The descriptive head of a synthetic set's datalist: name, domain, description, labels, modality."""
    return {
        "name": f"dgst_synthetic_{domain}",
        "domain": domain,
        "description": (
            f"Synthetic {'head-and-neck' if domain == 'hn' else 'mediastinal'} CT with lymph-node labels "
            f"generated by dgst_monai.data.phantoms (dataset seed {seed}); "
            f"{'source' if domain == 'hn' else 'target'} domain stand-in."
        ),
        "labels": {"0": "background", "1": "lymph_node"},
        "modality": {"0": "CT"},
    }
