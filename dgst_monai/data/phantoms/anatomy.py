"""Anatomy of the synthetic CT phantoms: tissue classes, the two domain templates, lymph-node placement.

The templates are written in a patient frame in mm (x towards the patient's left, y posterior, z superior,
origin at the centre of the anatomy) and turned into an ordered list of :class:`Paint` operations. The
renderer paints them in order, each one over what is already there, so the list order is the layering
(body, then fat, then organs on top, lymph nodes last).

Tissue classes and their HU ranges (every painted structure draws its HU inside its class range):

==================  ===============  =========================================================================
class               HU range         structures
==================  ===============  =========================================================================
air                 -1010 .. -990    outside the body, airway lumen
lung                -900 .. -700     lung parenchyma (denser posteriorly, the dependent gradient)
fat                 -120 .. -80      subcutaneous, deep cervical, mediastinal, hilar and epicardial fat
soft_tissue         30 .. 70         muscles, glands, oesophagus, myocardium, skin, discs, spinal canal,
                                     airway walls (the lymph-node look-alikes)
vessel_enhanced     150 .. 300       contrast-filled arteries, veins and heart chambers
vessel_unenhanced   30 .. 55         the same vessels without contrast (lymph-node look-alikes)
bone                400 .. 1500      cortical bone 900-1400, cancellous bone and ribs 400-800
lymph_node          20 .. 60         lymph-node parenchyma (label 1)
node_hilum          -120 .. -80      fatty hilum inside a node (still label 1)
==================  ===============  =========================================================================
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np

from dgst_monai.data.phantoms.shapes import Capsule, Ellipsoid, Shape, Tube, polyline, rotation_matrix

__all__ = [
    "TissueClass",
    "TISSUES",
    "MIXED_TISSUE",
    "Paint",
    "Station",
    "NodeSpec",
    "Anatomy",
    "build_anatomy",
    "place_nodes",
    "DOMAIN_FOCUS",
]

HUField = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class TissueClass:
    """A tissue class of the phantoms: id in the debug tissue map and documented HU range."""

    id: int
    lo: float
    hi: float
    description: str


TISSUES: dict[str, TissueClass] = {
    "air": TissueClass(0, -1010.0, -990.0, "outside the body, airway lumen"),
    "lung": TissueClass(1, -900.0, -700.0, "lung parenchyma"),
    "fat": TissueClass(2, -120.0, -80.0, "subcutaneous, deep, mediastinal, hilar, epicardial fat"),
    "soft_tissue": TissueClass(3, 30.0, 70.0, "muscle, glands, oesophagus, myocardium, skin, discs, canal"),
    "vessel_enhanced": TissueClass(4, 150.0, 300.0, "contrast-filled blood"),
    "vessel_unenhanced": TissueClass(5, 30.0, 55.0, "blood without contrast"),
    "bone": TissueClass(6, 400.0, 1500.0, "cortical and cancellous bone"),
    "lymph_node": TissueClass(7, 20.0, 60.0, "lymph-node parenchyma (label 1)"),
    "node_hilum": TissueClass(8, -120.0, -80.0, "fatty hilum of a lymph node (label 1)"),
}
#: Tissue-map value of voxels that mix several classes (partial volume); only pure voxels carry a class.
MIXED_TISSUE = 255

#: Patient-frame point (mm) the field of view is centred on, per domain: the middle of the nodal stations.
DOMAIN_FOCUS: dict[str, tuple[float, float, float]] = {"hn": (0.0, -4.0, 0.0), "mediastinum": (0.0, 0.0, 0.0)}


@dataclass(eq=False)
class Paint:
    """One painting step: fill ``shape`` with ``hu`` (a constant or a field of x, y, z) of class ``tissue``.

    ``label`` True marks a lymph node: the label occupancy is painted with it. Other paints leave the label
    alone, which is only correct because nodes come last (their hilum, painted after them, stays label 1).
    """

    shape: Shape
    tissue: str
    hu: float | HUField
    label: bool = False


@dataclass(frozen=True)
class Station:
    """A nodal station: a box (patient frame, mm) where node centres are drawn, and its relative weight."""

    name: str
    lo: tuple[float, float, float]
    hi: tuple[float, float, float]
    weight: float


@dataclass(eq=False)
class NodeSpec:
    """A placed lymph node in the patient frame (mm)."""

    station: str
    ellipsoid: Ellipsoid
    hu: float
    hilum: Ellipsoid | None = None
    hilum_hu: float | None = None

    @property
    def short_axis_mm(self) -> float:
        """Smallest full diameter (2 x the smallest semi-axis)."""
        return float(2.0 * self.ellipsoid.axes.min())

    @property
    def long_axis_mm(self) -> float:
        """Largest full diameter (2 x the largest semi-axis)."""
        return float(2.0 * self.ellipsoid.axes.max())


@dataclass(eq=False)
class Anatomy:
    """A drawn patient: ordered paints, where nodes may go, what they must avoid, and the stations.

    Attributes:
        paints: painting steps, back to front (nodes are appended after placement).
        hosts: fat regions that hold lymph nodes.
        forbidden: hard obstacles no node may touch (vessels, airway, bone, oesophagus, heart).
        soft: muscles and glands: only bulky nodes may push into them.
        envelope: region a bulky node's surface must stay in (inside the skin, or the thoracic cavity).
        stations: nodal stations.
        tilt_max: largest angle (rad) between a node's long axis and the cranio-caudal axis.
    """

    paints: list[Paint] = field(default_factory=list)
    hosts: list[Shape] = field(default_factory=list)
    forbidden: list[Shape] = field(default_factory=list)
    soft: list[Shape] = field(default_factory=list)
    envelope: Shape | None = None
    stations: list[Station] = field(default_factory=list)
    tilt_max: float = 0.5


class _Builder:
    """Helper holding the random state, the per-case anatomical scale and the contrast phase."""

    def __init__(self, rng: np.random.Generator, scale_xy: float, scale_z: float, phase: str) -> None:
        self.rng = rng
        self.sxy = scale_xy
        self.sz = scale_z
        self.phase = phase
        self.anat = Anatomy()

    # --- random draws -------------------------------------------------------------------------------------
    def u(self, lo: float, hi: float) -> float:
        """Uniform draw in [lo, hi]."""
        return float(self.rng.uniform(lo, hi))

    def j(self, amount: float) -> float:
        """Symmetric jitter in [-amount, amount]."""
        return float(self.rng.uniform(-amount, amount))

    def vessel(self, kind: str) -> tuple[str, float]:
        """Tissue class and HU of blood in a vessel of ``kind`` ('artery', 'vein', 'pulmonary') this phase."""
        if self.phase == "none":
            return "vessel_unenhanced", self.u(35.0, 50.0)
        table = {
            "arterial": {"artery": (230.0, 300.0), "pulmonary": (200.0, 280.0), "vein": (150.0, 190.0)},
            "venous": {"artery": (150.0, 200.0), "pulmonary": (150.0, 200.0), "vein": (160.0, 220.0)},
        }[self.phase]
        return "vessel_enhanced", self.u(*table[kind])

    # --- scaled solids ------------------------------------------------------------------------------------
    def tube(self, keys: list[tuple[float, ...]], power: float = 2.0) -> Tube:
        """A Tube from template keys (z, cx, cy, a, b, theta), scaled to this patient."""
        k = np.asarray(keys, dtype=np.float64)
        k[:, 0] *= self.sz
        k[:, 1:5] *= self.sxy
        return Tube(k, power)

    def circle(self, z0: float, z1: float, c0: tuple[float, float], c1: tuple[float, float], r: float) -> Tube:
        """A straight-ish round tube from centre c0 at z0 to centre c1 at z1 (template mm)."""
        return self.tube([(z0, c0[0], c0[1], r, r, 0.0), (z1, c1[0], c1[1], r, r, 0.0)])

    def point(self, p: tuple[float, float, float]) -> np.ndarray:
        """A template point scaled to this patient."""
        return np.array([p[0] * self.sxy, p[1] * self.sxy, p[2] * self.sz])

    def ellipsoid(self, c: tuple[float, float, float], axes: tuple[float, float, float], yaw: float = 0.0) -> Ellipsoid:
        """An ellipsoid from template centre and semi-axes, turned by ``yaw`` about z."""
        ax = np.array(axes, dtype=np.float64) * np.array([self.sxy, self.sxy, self.sz])
        return Ellipsoid(self.point(c), ax, rotation_matrix(yaw, 0.0, 0.0))

    def poly(self, pts: list[tuple[float, float, float]], r: float) -> list[Capsule]:
        """Capsules along a template polyline with radius r (template mm)."""
        return polyline([self.point(p) for p in pts], r * self.sxy)

    # --- painting -----------------------------------------------------------------------------------------
    def paint(
        self, shape: Shape | list[Capsule], tissue: str, hu: float | HUField, forbid: bool | str = True
    ) -> None:
        """Append paint step(s).

        ``forbid`` keeps lymph nodes out of the solid: True for hard obstacles (vessels, airway, bone,
        oesophagus, heart), 'soft' for muscles and glands (which bulky nodes may push into), False for none.
        """
        for s in shape if isinstance(shape, list) else [shape]:
            self.anat.paints.append(Paint(s, tissue, hu))
            if forbid == "soft":
                self.anat.soft.append(s)
            elif forbid:
                self.anat.forbidden.append(s)

    def paint_vessel(self, shape: Shape | list[Capsule], kind: str) -> None:
        """Paint blood of ``kind`` (artery, vein, pulmonary) with this phase's HU."""
        tissue, hu = self.vessel(kind)
        self.paint(shape, tissue, hu)

    def station(self, name: str, lo: tuple[float, float, float], hi: tuple[float, float, float], w: float) -> None:
        """Add a nodal station box (template mm)."""
        a, b = self.point(lo), self.point(hi)
        self.anat.stations.append(Station(name, tuple(np.minimum(a, b)), tuple(np.maximum(a, b)), w))


def _cortical_bone(b: _Builder, outer: Tube, cortex_mm: float) -> None:
    """A bone cross-section: dense cortex shell with cancellous interior."""
    b.paint(outer, "bone", b.u(900.0, 1300.0))
    b.paint(outer.offset(cortex_mm), "bone", b.u(400.0, 600.0), forbid=False)


def _vertebral_bodies(
    b: _Builder, column: Tube, cortex_mm: float, z_range: tuple[float, float], disc_period_mm: float, disc_mm: float
) -> None:
    """The vertebral bodies of a spine segment: one cortical-bone ``column`` over template ``z_range`` cut by
    intervertebral discs ``disc_mm`` thick every ``disc_period_mm`` (template mm, scaled like z), at a random
    phase."""
    _cortical_bone(b, column, cortex_mm)
    disc_hu = b.u(45.0, 70.0)
    period = disc_period_mm * b.sz
    z0, z1 = z_range
    for zc in np.arange(z0 * b.sz + b.u(0.0, period), z1 * b.sz, period):
        b.paint(column.z_cut(zc - disc_mm / 2, zc + disc_mm / 2), "soft_tissue", disc_hu, forbid=False)


#: Cranio-caudal extent of the neck template (mm; the larynx lies near z 0).
_HN_Z = (-70.0, 70.0)
#: Cranio-caudal extent of the chest template (mm; the carina lies at z 0).
_CHEST_Z = (-100.0, 100.0)

# The builders below paint in the order they are called, and every paint step draws its random numbers when
# it runs: splitting a template into region builders keeps both orders only if they are called in sequence.


def _build_hn(b: _Builder) -> None:
    """Neck cross-section at cervical levels II-IV (template z -70..70 mm, larynx near z 0)."""
    _neck_body(b)
    _neck_muscles(b)
    _neck_glands_and_airway(b)
    _cervical_spine(b)
    _neck_vessels(b)
    _neck_levels(b)
    b.anat.tilt_max = math.radians(30.0)


def _neck_body(b: _Builder) -> None:
    """Skin over subcutaneous and deep cervical fat, the fat being the nodes' host and envelope."""
    z0, z1 = _HN_Z
    ax, ay = 62.0 + b.j(4.0), 56.0 + b.j(3.0)
    body = b.tube([(z0, 0, 3, ax + 6, ay + 3, 0), (0, 0, 3, ax, ay, 0), (z1, 0, 1, ax - 2, ay - 1, 0)], power=2.3)
    b.paint(body, "soft_tissue", b.u(40.0, 60.0), forbid=False)  # skin
    inner = body.offset(b.u(1.5, 2.2))
    b.paint(inner, "fat", b.u(-115.0, -88.0), forbid=False)  # subcutaneous and deep cervical fat
    b.anat.hosts.append(inner)
    b.anat.envelope = inner


def _neck_muscles(b: _Builder) -> None:
    """Trapezius, paraspinal, levator scapulae, scalene, sternocleidomastoid, strap and longus muscles."""
    z0, z1 = _HN_Z
    muscle = b.u(42.0, 60.0)
    for side in (-1.0, 1.0):
        m = muscle + b.j(3.0)
        b.paint(b.tube([(z0, side * 30, 47, 24, 6, -side * 0.35), (z1, side * 27, 47, 20, 5, -side * 0.3)]),
                "soft_tissue", m, "soft")  # trapezius
        b.paint(b.tube([(z0, side * 18, 34, 14, 11, 0), (z1, side * 17, 33, 13, 11, 0)]),
                "soft_tissue", m, "soft")  # paraspinal
        b.paint(b.tube([(z0, side * 36, 26, 8, 7, 0), (z1, side * 34, 24, 8, 7, 0)]),
                "soft_tissue", m, "soft")  # levator scapulae
        b.paint(b.tube([(z0, side * 28, 10, 6, 5, side * 0.6), (z1, side * 26, 9, 5.5, 5, side * 0.6)]),
                "soft_tissue", m, "soft")  # scalenes
        b.paint(b.tube([(z0, side * 30, -36, 13, 5, side * 0.75), (0, side * 42, -22, 14, 5.5, side * 1.15),
                        (z1, side * 48, -4, 14, 6, side * 1.45)]), "soft_tissue", m, "soft")  # sternocleidomastoid
        b.paint(b.tube([(z0, side * 10, -37, 8, 2.6, -side * 0.25), (25, side * 11, -37, 7, 2.4, -side * 0.2)]),
                "soft_tissue", m, "soft")  # strap muscles
        b.paint(b.tube([(z0, side * 8, 1, 5.5, 3, 0), (z1, side * 8, 1, 5, 3, 0)]), "soft_tissue", m)  # longus


def _neck_glands_and_airway(b: _Builder) -> None:
    """Thyroid and submandibular glands, oesophagus, and the larynx / trachea with its wall."""
    z0, z1 = _HN_Z
    gland = b.u(35.0, 60.0)
    for side in (-1.0, 1.0):
        b.paint(b.ellipsoid((side * 17 + b.j(1), -22, -36 + b.j(3)), (7, 9, 18), side * 0.2), "soft_tissue", gland,
                "soft")  # thyroid lobe
        b.paint(b.ellipsoid((side * 30 + b.j(2), -32, 54 + b.j(3)), (13, 10, 12)), "soft_tissue", gland,
                "soft")  # submandibular gland
    b.paint(b.ellipsoid((0, -33, -42), (11, 3.5, 6)), "soft_tissue", gland, "soft")  # thyroid isthmus

    b.paint(b.tube([(z0, 4, -8, 7, 4.5, 0), (6, 3, -8, 7, 4.5, 0)]), "soft_tissue", b.u(35.0, 55.0))  # oesophagus
    airway = [(z0, 0, -26, 8, 7, 0), (-10, 0, -25, 9.5, 8, 0), (15, 0, -18, 13, 9.5, 0), (z1, 0, -12, 15, 9, 0)]
    lumen = b.tube(airway)
    b.paint(lumen.offset(-2.5), "soft_tissue", b.u(40.0, 60.0))  # laryngeal / tracheal wall
    b.paint(lumen, "air", b.u(-1005.0, -995.0), forbid=False)


def _cervical_spine(b: _Builder) -> None:
    """Arch and canal, body with discs every ~17 mm, transverse processes with foramina."""
    z0, z1 = _HN_Z
    arch = b.tube([(z0, 0, 27, 12, 10, 0), (z1, 0, 27, 12, 10, 0)])
    b.paint(arch, "bone", b.u(800.0, 1200.0))
    b.paint(arch.offset(4.5), "soft_tissue", b.u(30.0, 40.0), forbid=False)  # canal (cord and CSF)
    b.paint(b.tube([(z0, 0, 43, 3, 7, 0), (z1, 0, 43, 3, 7, 0)]), "bone", b.u(700.0, 1100.0))  # spinous process
    _vertebral_bodies(b, b.tube([(z0, 0, 12, 9, 8, 0), (z1, 0, 12, 9.5, 8, 0)]), 1.5, (z0, z1), 17.0, 4.0)
    for side in (-1.0, 1.0):
        b.paint(b.tube([(z0, side * 15, 15, 7, 3.5, 0), (z1, side * 15, 15, 7, 3.5, 0)]), "bone", b.u(500.0, 800.0))


def _neck_vessels(b: _Builder) -> None:
    """Carotid, vertebral and jugular vessels of both sides."""
    z0, z1 = _HN_Z
    for side in (-1.0, 1.0):
        big = b.u(1.0, 1.3) if side < 0 else b.u(0.7, 1.05)  # the right internal jugular is usually larger
        b.paint_vessel(b.circle(z0, 14, (side * 20, -10), (side * 20.5, -9), 4.0 + b.j(0.5)), "artery")  # CCA
        b.paint_vessel(b.circle(12, z1, (side * 22, -5), (side * 24, 0), 3.0 + b.j(0.4)), "artery")  # ICA
        b.paint_vessel(b.circle(12, z1, (side * 19, -15), (side * 22, -20), 2.4 + b.j(0.3)), "artery")  # ECA
        b.paint_vessel(b.tube([(z0, side * 29, -7, 6.5 * big, 5 * big, side * 0.3),
                               (z1, side * 30, -5, 6 * big, 4.5 * big, side * 0.4)]), "vein")  # IJV
        b.paint_vessel(b.circle(z0, z1, (side * 44, -30), (side * 55, -10), 1.8), "vein")  # external jugular
        b.paint_vessel(b.circle(z0, z1, (side * 15, 15), (side * 15, 15), 2.0), "artery")  # vertebral artery
        b.paint_vessel(b.circle(z0, 20, (side * 7, -44), (side * 8, -43), 1.5), "vein")  # anterior jugular


def _neck_levels(b: _Builder) -> None:
    """Nodal levels (per side): II upper jugular, III mid, IV lower, V posterior triangle, Ib submandibular,
    VI central compartment."""
    for side in (-1.0, 1.0):
        b.station("II", (side * 26, -26, 14), (side * 44, 0, 48), 0.30)
        b.station("III", (side * 26, -26, -14), (side * 44, -2, 16), 0.25)
        b.station("IV", (side * 22, -30, -48), (side * 40, -6, -12), 0.15)
        b.station("V", (side * 36, 0, -40), (side * 52, 26, 40), 0.15)
        b.station("Ib", (side * 14, -44, 28), (side * 30, -30, 52), 0.08)
        b.station("VI", (side * 2, -48, -50), (side * 14, -30, -20), 0.07)


class _Chest(NamedTuple):
    """The chest wall's draws that later chest structures build on."""

    ax: float  # template semi-axes (mm) of the body outline
    ay: float
    sub: float  # depth (mm) of the chest-wall muscle layer under the skin
    muscle: float  # muscle HU of this patient
    cavity: Tube  # thoracic cavity: lungs and mediastinum


def _build_mediastinum(b: _Builder) -> None:
    """Chest cross-section from the thoracic inlet to the top of the heart (template z -100..100, carina z 0)."""
    chest = _chest_wall(b)
    _lungs(b, chest)
    fat = _mediastinal_fat(b)
    _paraspinal_muscles_and_ribs(b, chest)
    _heart_top(b, fat)
    _great_vessels(b)
    air = _chest_airway(b)
    _chest_oesophagus(b, air)
    _thoracic_spine_and_sternum(b)
    _iaslc_stations(b)
    b.anat.tilt_max = math.radians(60.0)


def _chest_wall(b: _Builder) -> _Chest:
    """Skin, subcutaneous fat, the chest-wall muscle layer and the pectorals; returns what lies inside."""
    z0, z1 = _CHEST_Z
    ax, ay = 125.0 + b.j(6.0), 95.0 + b.j(5.0)
    body = b.tube([(z0, 0, 0, ax + 5, ay + 4, 0), (z1, 0, -2, ax - 6, ay - 5, 0)], power=2.6)
    b.paint(body, "soft_tissue", b.u(40.0, 60.0), forbid=False)  # skin
    b.paint(body.offset(2.0), "fat", b.u(-115.0, -90.0), forbid=False)  # subcutaneous fat
    sub = b.u(10.0, 18.0)
    muscle = b.u(42.0, 60.0)
    b.paint(body.offset(sub), "soft_tissue", muscle, forbid=False)  # chest-wall muscle layer
    for side in (-1.0, 1.0):
        b.paint(b.tube([(z0, side * 62, -74, 40, 8, side * 0.3), (z1, side * 55, -72, 38, 9, side * 0.25)]),
                "soft_tissue", muscle + b.j(3.0), forbid=False)  # pectoralis
    return _Chest(ax, ay, sub, muscle, body.offset(sub + b.u(9.0, 12.0)))


def _lungs(b: _Builder, chest: _Chest) -> None:
    """Lung parenchyma filling the cavity (the nodes' envelope), then the pulmonary vessels."""
    base, grad = b.u(-860.0, -800.0), b.u(20.0, 60.0)
    y_ant, y_post = -chest.ay * b.sxy, chest.ay * b.sxy

    def lung_hu(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        # Dependent (posterior) lung is denser in a supine patient.
        return base + grad * np.clip((y - y_ant) / (y_post - y_ant), 0.0, 1.0)

    b.paint(chest.cavity, "lung", lung_hu, forbid=False)
    b.anat.envelope = chest.cavity.offset(3.0)
    _pulmonary_vessels(b, chest.cavity)


def _pulmonary_vessels(b: _Builder, cavity: Tube) -> None:
    """Pulmonary vessels branching out of each hilum, each kept 4 mm inside the cavity."""
    for side in (-1.0, 1.0):
        hilum = b.point((side * 42, 6, -8))
        for _ in range(28):
            d = b.rng.normal(size=3)
            d[0] = side * (abs(d[0]) + 0.3)
            d /= np.linalg.norm(d)
            length = b.u(40.0, 100.0)
            for _shrink in range(3):
                end = hilum + d * length
                if float(cavity.sdf(*(np.float32(v) for v in end))) < -4.0:
                    break
                length *= 0.7
            else:
                continue
            bend = b.rng.normal(scale=4.0, size=3)
            pts = [hilum, hilum + d * length * 0.35 + bend * 0.5, hilum + d * length * 0.7 + bend, end]
            kind = "pulmonary" if b.rng.random() < 0.6 else "vein"
            for i, r in enumerate((3.5, 2.5, 1.5)):
                b.paint(Capsule(pts[i], pts[i + 1], r * b.u(0.8, 1.1)), *b.vessel(kind), forbid=False)


def _mediastinal_fat(b: _Builder) -> float:
    """Mediastinal and hilar fat, the nodes' hosts; returns this patient's fat HU."""
    z0, z1 = _CHEST_Z
    fat = b.u(-110.0, -85.0)
    mediastinum = b.tube([(z0, 18, -18, 78, 72, 0), (-40, 10, -12, 62, 72, 0), (-10, 3, 0, 46, 74, 0),
                          (20, 1, 3, 38, 70, 0), (60, 0, 6, 30, 62, 0), (z1, 0, 8, 26, 55, 0)])
    b.paint(mediastinum, "fat", fat, forbid=False)
    b.anat.hosts.append(mediastinum)
    for side in (-1.0, 1.0):
        hilar = b.ellipsoid((side * 40, 6, -12), (15, 20, 20))
        b.paint(hilar, "fat", fat + b.j(5.0), forbid=False)
        b.anat.hosts.append(hilar)
    return fat


def _paraspinal_muscles_and_ribs(b: _Builder, chest: _Chest) -> None:
    """Paraspinal muscles, and ribs: arcs on the super-elliptic cavity outline, sloping down anteriorly (seen
    as oblique bars in axial). A rib drops ~90 mm from its posterior to its anterior end, so a slice cuts each
    one in a short bar."""
    z0, z1 = _CHEST_Z
    for side in (-1.0, 1.0):
        b.paint(b.tube([(z0, side * 30, 74, 20, 13, side * 0.2), (z1, side * 28, 74, 19, 12, side * 0.2)]),
                "soft_tissue", chest.muscle + b.j(3.0), "soft")  # paraspinal
    rx, ry = (chest.ax - chest.sub - 5.0) * b.sxy, (chest.ay - chest.sub - 5.0) * b.sxy
    p = 2.0 / 2.6
    for side in (-1.0, 1.0):
        for zr in np.arange(-110.0, 190.0, 24.0) + b.j(4.0):
            alpha = np.radians(np.linspace(25.0, 150.0, 11))
            x = side * rx * np.abs(np.sin(alpha)) ** p
            y = ry * np.sign(np.cos(alpha)) * np.abs(np.cos(alpha)) ** p
            z = (zr - 0.7 * (np.degrees(alpha) - 25.0)) * b.sz
            b.paint(polyline(np.stack([x, y, z], axis=1), 3.5), "bone", b.u(450.0, 800.0))


def _heart_top(b: _Builder, fat: float) -> None:
    """Top of the heart: epicardial fat, myocardium, left and right blood pools."""
    yaw = 0.45 + b.j(0.1)
    hc = (18 + b.j(4), -22 + b.j(4), -92.0)
    b.paint(b.ellipsoid(hc, (66, 50, 60), yaw), "fat", fat + b.j(5.0))
    b.paint(b.ellipsoid(hc, (61, 45, 55), yaw), "soft_tissue", b.u(40.0, 60.0))
    b.paint_vessel(b.ellipsoid((hc[0] + 17, hc[1] + 10, -92), (30, 24, 40), yaw), "artery")  # left ventricle
    b.paint_vessel(b.ellipsoid((hc[0] - 20, hc[1] - 16, -88), (30, 16, 38), yaw), "pulmonary")  # right ventricle


def _great_vessels(b: _Builder) -> None:
    """Aorta and its branches, pulmonary arteries, SVC, azygos, brachiocephalic vein, internal mammaries."""
    z0, z1 = _CHEST_Z
    r_ao = 14.5 + b.j(1.5)
    b.paint_vessel(b.circle(-45, 28, (-10, -20), (-8, -16), r_ao), "artery")  # ascending aorta
    b.paint_vessel(b.poly([(-8, -16, 28), (-4, -2, 40), (10, 18, 43), (23, 32, 34)], r_ao - 1.0), "artery")  # arch
    b.paint_vessel(b.circle(z0, 36, (25, 32), (23, 32), r_ao - 2.5), "artery")  # descending aorta
    b.paint_vessel(b.circle(-40, -6, (12, -30), (14, -24), 13.0 + b.j(1.0)), "pulmonary")  # pulmonary trunk
    b.paint_vessel(b.poly([(14, -24, -6), (28, -6, -1), (44, 6, -5)], 10.0), "pulmonary")  # left PA
    b.paint_vessel(b.poly([(8, -20, -12), (-6, 2, -16), (-40, 0, -18)], 9.0), "pulmonary")  # right PA
    b.paint_vessel(b.circle(-30, z1, (-32, -12), (-30, -14), 9.0 + b.j(1.0)), "vein")  # SVC / right BCV
    b.paint_vessel(b.circle(z0, 16, (-16, 36), (-16, 34), 4.0), "vein")  # azygos
    b.paint_vessel(b.poly([(-16, 34, 16), (-26, 14, 22), (-30, -8, 22)], 4.0), "vein")  # azygos arch
    b.paint_vessel(b.circle(38, z1, (-10, -10), (-14, -6), 7.0), "artery")  # brachiocephalic trunk
    b.paint_vessel(b.circle(38, z1, (4, -6), (6, -4), 5.0), "artery")  # left common carotid
    b.paint_vessel(b.circle(38, z1, (16, 4), (20, 6), 6.0), "artery")  # left subclavian
    b.paint_vessel(b.poly([(34, -26, 64), (-24, -16, 54)], 6.0), "vein")  # left brachiocephalic vein
    for side in (-1.0, 1.0):
        b.paint_vessel(b.circle(z0, z1, (side * 30, -70), (side * 28, -68), 1.6), "artery")  # internal mammary


def _chest_airway(b: _Builder) -> float:
    """Trachea down to the carina at z 0, main and lobar bronchi: walls first, then the air; returns the air HU."""
    trachea = b.tube([(0, 0, 8, 9.5, 8.5, 0), (_CHEST_Z[1], 0, 2, 9, 9, 0)])
    bronchi = [
        ([(-3, 9, 2), (-18, 11, -8), (-40, 8, -18)], 7.0),
        ([(3, 9, 2), (20, 13, -12), (42, 10, -26)], 6.5),
        ([(-40, 8, -18), (-60, 5, 5)], 4.0),
        ([(-40, 8, -18), (-62, 20, -50)], 4.5),
        ([(42, 10, -26), (60, 5, -5)], 4.0),
        ([(42, 10, -26), (60, 22, -55)], 4.5),
    ]
    wall = b.u(40.0, 60.0)
    b.paint(trachea.offset(-2.0), "soft_tissue", wall)
    for pts, r in bronchi:
        b.paint(b.poly(pts, r + 2.0), "soft_tissue", wall)
    air = b.u(-1005.0, -995.0)
    b.paint(trachea, "air", air, forbid=False)
    for pts, r in bronchi:
        b.paint(b.poly(pts, r), "air", air, forbid=False)
    return air


def _chest_oesophagus(b: _Builder, air: float) -> None:
    """The oesophagus, in half of the patients with a little swallowed air in its lumen."""
    z0, z1 = _CHEST_Z
    esophagus = b.tube([(z0, 8, 26, 8, 6, 0), (0, 5, 24, 8, 6, 0), (z1, 3, 24, 8, 6, 0)])
    b.paint(esophagus, "soft_tissue", b.u(35.0, 55.0))
    if b.rng.random() < 0.5:
        b.paint(b.tube([(-40, 6, 25, 1.5, 1.0, 0), (40, 4, 24, 1.5, 1.0, 0)]), "air", air, forbid=False)


def _thoracic_spine_and_sternum(b: _Builder) -> None:
    """Thoracic vertebrae (arch, canal, spinous and transverse processes, bodies with discs) and the sternum."""
    z0, z1 = _CHEST_Z
    arch = b.tube([(z0, 0, 70, 13, 11, 0), (z1, 0, 70, 13, 11, 0)])
    b.paint(arch, "bone", b.u(800.0, 1200.0))
    b.paint(arch.offset(5.0), "soft_tissue", b.u(30.0, 40.0), forbid=False)  # canal
    b.paint(b.tube([(z0, 0, 84, 4, 8, 0), (z1, 0, 84, 4, 8, 0)]), "bone", b.u(700.0, 1100.0))  # spinous
    for side in (-1.0, 1.0):
        b.paint(b.tube([(z0, side * 20, 64, 9, 4, side * 0.3), (z1, side * 20, 64, 9, 4, side * 0.3)]),
                "bone", b.u(500.0, 800.0))  # transverse processes
    _vertebral_bodies(b, b.tube([(z0, 0, 46, 16, 14, 0), (z1, 0, 46, 15, 13, 0)]), 2.0, (z0, z1), 26.0, 6.0)
    _cortical_bone(b, b.tube([(-60, 0, -84, 15, 5.5, 0), (z1, 0, -83, 14, 5.5, 0)]), 1.5)  # sternum


def _iaslc_stations(b: _Builder) -> None:
    """IASLC stations (2R/2L upper paratracheal, 4R/4L lower paratracheal, 5 aortopulmonary, 6 para-aortic,
    7 subcarinal, 8 paraoesophageal, 10R/10L hilar, 3A prevascular)."""
    b.station("2R", (-22, -6, 42), (-8, 16, 75), 0.08)
    b.station("2L", (8, -6, 45), (22, 16, 75), 0.06)
    b.station("4R", (-28, -14, 6), (-10, 12, 40), 0.18)
    b.station("4L", (8, -4, 4), (20, 14, 28), 0.10)
    b.station("5", (14, -14, 6), (34, 6, 26), 0.07)
    b.station("6", (-6, -48, 26), (16, -30, 48), 0.04)
    b.station("7", (-10, 6, -32), (14, 28, -4), 0.18)
    b.station("8", (-4, 20, -70), (16, 36, -34), 0.03)
    b.station("10R", (-46, -8, -28), (-28, 20, 2), 0.12)
    b.station("10L", (28, -8, -34), (46, 20, -2), 0.12)
    b.station("3A", (-22, -62, 14), (12, -40, 62), 0.02)


def build_anatomy(domain: str, rng: np.random.Generator, scale_xy: float, scale_z: float, phase: str) -> Anatomy:
    """Draw one patient of ``domain`` ('hn' or 'mediastinum').

    Args:
        domain: domain family.
        rng: random generator for the anatomy (positions, sizes, HU draws).
        scale_xy: in-plane scale of the template (body habitus).
        scale_z: cranio-caudal scale of the template.
        phase: contrast phase, 'none', 'arterial' or 'venous'.

    Returns:
        The anatomy: paint list without nodes, node hosts, forbidden solids and nodal stations.
    """
    b = _Builder(rng, scale_xy, scale_z, phase)
    {"hn": _build_hn, "mediastinum": _build_mediastinum}[domain](b)
    return b.anat


def _fibonacci_sphere(n: int) -> np.ndarray:
    i = np.arange(n) + 0.5
    phi = np.arccos(1.0 - 2.0 * i / n)
    theta = np.pi * (1.0 + 5.0**0.5) * i
    return np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], axis=1)


# Points checked when placing a node: its surface, an inner shell and its centre (unit-ball frame).
_PROBE = np.concatenate([_fibonacci_sphere(64), 0.55 * _fibonacci_sphere(16), np.zeros((1, 3))])
_N_CORE = len(_PROBE) - 64  # _PROBE rows after the 64 surface points: inner shell and centre


def _min_sdf(shape: Shape, pts: np.ndarray) -> float:
    p = pts.astype(np.float32)
    return float(np.min(shape.sdf(p[:, 0], p[:, 1], p[:, 2])))


def place_nodes(
    rng: np.random.Generator,
    anat: Anatomy,
    fov_lo: np.ndarray,
    fov_hi: np.ndarray,
    n: int,
    short_axis_mm: tuple[float, float],
    hilum_fraction: float,
    gap_mm: float = 1.0,
    bulky_mm: float = 12.0,
    max_attempts: int = 400,
) -> list[NodeSpec]:
    """Place ``n`` lymph nodes in the stations of ``anat`` by rejection sampling.

    A candidate node is kept if it lies entirely in the field of view, at least ``gap_mm`` away from every
    hard obstacle (vessels, airway, bone, oesophagus, heart) and from the nodes already placed, and either
    lies entirely in a host region (fat) clear of muscles and glands, or, for a bulky node (short axis >=
    ``bulky_mm``), has its core in a host region and its surface inside the anatomy's envelope: bulky nodes
    push into muscles, glands or lung as real ones do. Half of the candidates are drawn next to a node of
    the same station, so nodes cluster. Short axes are log-uniform in the range (small nodes are the common
    ones); if a station is crowded the upper size bound shrinks progressively. Nodes that cannot be placed
    are dropped with a warning.

    Args:
        rng: random generator for the nodes.
        anat: the drawn anatomy.
        fov_lo: lower corner of the field of view (patient frame, mm).
        fov_hi: upper corner of the field of view.
        n: number of nodes wanted.
        short_axis_mm: (lo, hi) range of the short axis (smallest full diameter) in mm.
        hilum_fraction: probability that a node of short axis >= 8 mm has a fatty hilum.
        gap_mm: minimum clearance to obstacles and other nodes.
        bulky_mm: short axis from which a node may displace muscles, glands and lung.
        max_attempts: candidates tried per node before giving up on it.

    Returns:
        The placed nodes.
    """
    placer = _NodePlacer(anat, fov_lo, fov_hi, hilum_fraction, gap_mm, bulky_mm)
    for _ in range(n):
        if not placer.place(rng, short_axis_mm, max_attempts):
            warnings.warn(
                f"placed {len(placer.nodes)} of {n} lymph nodes: no free room left in the field of view "
                "(enlarge fov_mm or lower n_nodes / node_short_axis_mm)",
                RuntimeWarning,
                stacklevel=3,
            )
            break
    return placer.nodes


def _boxes(shapes: list[Shape]) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounding-box corners of ``shapes``, one row each."""
    lo, hi = (np.array([getattr(f, a) for f in shapes]).reshape(-1, 3) for a in ("lo", "hi"))
    return lo, hi


class _NodePlacer:
    """Rejection sampling of lymph nodes in one anatomy, the rules of :func:`place_nodes`.

    Holds the nodes placed so far (and their probe points), the normalised station weights, the field of
    view shrunk by 1 mm in-plane, and the bounding boxes of the obstacles (only obstacles whose box comes
    within ``gap_mm`` of a candidate's box are tested point by point).
    """

    def __init__(
        self, anat: Anatomy, fov_lo: np.ndarray, fov_hi: np.ndarray, hilum_fraction: float, gap_mm: float,
        bulky_mm: float,
    ) -> None:
        self.anat = anat
        self.hilum_fraction = hilum_fraction
        self.gap = gap_mm
        self.bulky = bulky_mm
        self.weights = np.array([s.weight for s in anat.stations], dtype=np.float64)
        self.weights /= self.weights.sum()
        self.lo_ok = np.asarray(fov_lo, dtype=np.float64) + np.array([1.0, 1.0, 0.0])
        self.hi_ok = np.asarray(fov_hi, dtype=np.float64) - np.array([1.0, 1.0, 0.0])
        self.hard_boxes = _boxes(anat.forbidden)
        self.soft_boxes = _boxes(anat.soft)
        self.nodes: list[NodeSpec] = []
        self.probes: list[np.ndarray] = []

    def place(self, rng: np.random.Generator, short_axis_mm: tuple[float, float], max_attempts: int) -> bool:
        """Place one more node; False when ``max_attempts`` candidates in a row did not fit."""
        s_lo, s_hi = short_axis_mm
        top = s_hi
        for attempt in range(max_attempts):
            if attempt and attempt % 80 == 0:
                top = max(s_lo, s_lo + (top - s_lo) * 0.6)  # crowded: try smaller nodes
            short, station, ell = self._candidate(rng, s_lo, s_hi, top)
            pts = self._probes_if_free(ell, short)
            if pts is not None:
                self._add(rng, station, short, ell, pts)
                return True
        return False

    def _candidate(
        self, rng: np.random.Generator, s_lo: float, s_hi: float, top: float
    ) -> tuple[float, Station, Ellipsoid]:
        """Draw a node: short axis (log-uniform up to ``top``), the other axes, orientation, station, centre."""
        short = float(np.exp(rng.uniform(math.log(s_lo), math.log(max(top, s_lo) + 1e-9))))
        short = min(max(short, s_lo), s_hi)
        a1 = short / 2.0
        a2 = a1 * rng.uniform(1.0, 1.35)
        a3 = min(max(a2, a1 * rng.uniform(1.1, 2.2)), 25.0)
        yaw, tilt, spin = rng.uniform(0, 2 * math.pi), rng.uniform(0, self.anat.tilt_max), rng.uniform(0, 2 * math.pi)
        rot = rotation_matrix(yaw, tilt, spin)
        station = self.anat.stations[int(rng.choice(len(self.anat.stations), p=self.weights))]
        center = self._centre(rng, station, a1)
        return short, station, Ellipsoid(center, np.array([a1, a2, a3]), rot)

    def _centre(self, rng: np.random.Generator, station: Station, a1: float) -> np.ndarray:
        """A centre in ``station``; half of the time next to a node already there, so that nodes cluster."""
        mates = [nd for nd in self.nodes if nd.station == station.name]
        if mates and rng.random() < 0.5:
            mate = mates[int(rng.integers(len(mates)))]
            d = rng.normal(size=3)
            d /= np.linalg.norm(d)
            reach = mate.ellipsoid.axes.min() + a1 + self.gap + rng.uniform(0.5, 4.0)
            return mate.ellipsoid.center + d * reach
        return rng.uniform(station.lo, station.hi)

    def _probes_if_free(self, ell: Ellipsoid, short: float) -> np.ndarray | None:
        """The probe points of ``ell`` if it fits the field of view, its host and its neighbours, else None."""
        if np.any(ell.lo < self.lo_ok) or np.any(ell.hi > self.hi_ok):
            return None
        pts = ell.surface_points(_PROBE)
        glo, ghi = ell.lo - self.gap, ell.hi + self.gap
        if short >= self.bulky and self.anat.envelope is not None:
            p32 = pts.astype(np.float32)
            if not self._in_hosts(pts[-_N_CORE:]) or np.any(self.anat.envelope.sdf(p32[:, 0], p32[:, 1], p32[:, 2]) > -0.5):
                return None
        elif not self._in_hosts(pts) or not self._clear(self.anat.soft, self.soft_boxes, glo, ghi, pts):
            return None
        if not self._clear(self.anat.forbidden, self.hard_boxes, glo, ghi, pts):
            return None
        if any(
            nd.ellipsoid.overlaps(glo, ghi) and (_min_sdf(nd.ellipsoid, pts) < self.gap or _min_sdf(ell, pp) < self.gap)
            for nd, pp in zip(self.nodes, self.probes)
        ):
            return None
        return pts

    def _clear(
        self, shapes: list[Shape], boxes: tuple[np.ndarray, np.ndarray], glo: np.ndarray, ghi: np.ndarray,
        pts: np.ndarray,
    ) -> bool:
        """Whether ``pts`` keep ``gap_mm`` from each of ``shapes`` whose box meets the box [glo, ghi]."""
        lo, hi = boxes
        near = np.flatnonzero(np.all(lo <= ghi, axis=1) & np.all(glo <= hi, axis=1))
        return not any(_min_sdf(shapes[i], pts) < self.gap for i in near)

    def _in_hosts(self, pts: np.ndarray) -> bool:
        """Whether every point lies at least 0.5 mm inside the union of the host regions."""
        p32 = pts.astype(np.float32)
        inside = np.full(len(pts), np.inf, dtype=np.float32)
        for host in self.anat.hosts:
            inside = np.minimum(inside, host.sdf(p32[:, 0], p32[:, 1], p32[:, 2]))
        return bool(np.all(inside <= -0.5))

    def _add(self, rng: np.random.Generator, station: Station, short: float, ell: Ellipsoid, pts: np.ndarray) -> None:
        """Keep ``ell``: draw its HU and, for a node of 8 mm or more, maybe a fatty hilum."""
        hu = float(rng.uniform(25.0, 55.0))
        hilum = hilum_hu = None
        if short >= 8.0 and rng.random() < self.hilum_fraction:
            a1 = short / 2.0
            inner = ell.axes * rng.uniform(0.35, 0.5, size=3)
            # Push the hilum towards one side (the hilum is an indentation), keeping >= 1 mm of cortex.
            shift = max(0.0, a1 - inner[0] - max(1.0, 0.15 * a1))
            hilum = Ellipsoid(ell.center + ell.rot[:, 0] * shift, inner, ell.rot)
            hilum_hu = float(rng.uniform(-110.0, -85.0))
        self.nodes.append(NodeSpec(station.name, ell, hu, hilum, hilum_hu))
        self.probes.append(pts)
