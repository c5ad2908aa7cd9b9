"""Analytic solids for the synthetic CT phantoms.

Every solid lives in the *patient frame*: millimetres, x towards the patient's left, y towards posterior,
z towards superior (the DICOM LPS axes, centred on the anatomy). A solid exposes an axis-aligned bounding
box (``lo``, ``hi``) and an approximate signed distance ``sdf(x, y, z)`` (negative inside, in mm) that
broadcasts over its arguments, so the renderer can pass a separable grid
(``x[:, None, None]``, ``y[None, :, None]``, ``z[None, None, :]``) and the node placer flat point lists.

The signed distances are first-order (value divided by gradient norm): exact on the surface and good to a
fraction of a millimetre within a few millimetres of it, which is all the partial-volume ramp and the
placement margins need. Deep inside they only guarantee the sign and a magnitude of a few mm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Shape", "Tube", "Ellipsoid", "Capsule", "rotation_matrix"]

_F32 = np.float32
_EPS = np.float32(1e-12)


def rotation_matrix(yaw: float, tilt: float, spin: float) -> np.ndarray:
    """Rotation whose columns are the local axes of a solid in the patient frame.

    The local third axis (the long axis of a node) is tilted by ``tilt`` away from +z towards the azimuth
    ``yaw``; ``spin`` turns the solid about its own long axis. Angles in radians.

    Args:
        yaw: azimuth of the tilt, about the patient z axis.
        tilt: angle between the local third axis and the patient z axis.
        spin: rotation about the local third axis.

    Returns:
        A 3x3 float64 orthonormal matrix.
    """

    def rz(a: float) -> np.ndarray:
        c, s = math.cos(a), math.sin(a)
        return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])

    c, s = math.cos(tilt), math.sin(tilt)
    ry = np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
    return rz(yaw) @ ry @ rz(spin)


@dataclass(eq=False)
class Shape:
    """Base class: a solid with a bounding box and a signed distance (see the module docstring)."""

    lo: np.ndarray = field(init=False, repr=False)
    hi: np.ndarray = field(init=False, repr=False)
    #: Largest rate (mm per mm of z) at which the in-plane outline moves; inf unless the solid is a Tube.
    z_rate: float = field(init=False, repr=False, default=math.inf)

    def sdf(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        """Approximate signed distance in mm (negative inside), broadcast over x, y, z."""
        raise NotImplementedError

    def overlaps(self, lo: np.ndarray, hi: np.ndarray) -> bool:
        """Whether this solid's bounding box intersects the box [lo, hi]."""
        return bool(np.all(self.lo <= hi) and np.all(lo <= self.hi))


@dataclass(eq=False)
class Tube(Shape):
    """A prism along z whose (super-)elliptic cross-section varies piecewise linearly between key slices.

    It models everything that runs roughly cranio-caudally: the body outline, muscles, airway, oesophagus,
    vessels, the vertebral column. The solid is cut flat at the first and last key ``z``.

    Args:
        keys: rows ``(z, cx, cy, a, b, theta)``: key slice position, cross-section centre, semi-axes along
            the rotated u/v axes, and rotation (radians, from +x towards +y). At least two rows, z ascending.
        power: super-ellipse exponent; 2 is an ellipse, larger values square the outline (body contours).
    """

    keys: np.ndarray
    power: float = 2.0

    def __post_init__(self) -> None:
        k = np.asarray(self.keys, dtype=np.float64)
        if k.ndim != 2 or k.shape[1] != 6 or k.shape[0] < 2:
            raise ValueError(f"Tube keys must be (K>=2, 6) rows of z, cx, cy, a, b, theta; got {k.shape}")
        if np.any(np.diff(k[:, 0]) <= 0):
            raise ValueError("Tube key z values must be strictly ascending")
        if np.any(k[:, 3:5] <= 0):
            raise ValueError("Tube semi-axes must be positive")
        self.keys = k
        self._rotated = bool(np.any(k[:, 5] != 0.0))
        reach = k[:, 3:5].max(axis=1)
        rx = reach if self._rotated else k[:, 3]
        ry = reach if self._rotated else k[:, 4]
        self.lo = np.array([(k[:, 1] - rx).min(), (k[:, 2] - ry).min(), k[0, 0]])
        self.hi = np.array([(k[:, 1] + rx).max(), (k[:, 2] + ry).max(), k[-1, 0]])
        # How fast the outline moves along z (mm per mm): the renderer samples slow tubes more coarsely.
        dz = np.diff(k[:, 0])
        move = np.abs(np.diff(k[:, 1:5], axis=0)).max(axis=1) + np.abs(np.diff(k[:, 5])) * reach[1:]
        self.z_rate = float((move / dz).max())

    def _param(self, z: np.ndarray, col: int) -> np.ndarray:
        flat = np.interp(np.ravel(z), self.keys[:, 0], self.keys[:, col])
        return flat.astype(_F32).reshape(np.shape(z))

    def sdf(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Approximate signed distance in mm (negative inside), broadcast over x, y, z."""
        cx, cy, a, b = (self._param(z, c) for c in (1, 2, 3, 4))
        dx = x - cx
        dy = y - cy
        if self._rotated:
            th = self._param(z, 5)
            c, s = np.cos(th), np.sin(th)
            u = dx * c + dy * s
            v = dy * c - dx * s
        else:
            # Unrotated tubes stay separable: u and v are small (n, 1, k) / (1, n, k) arrays.
            u, v = dx, dy
        if self.power == 2.0:
            uu = (u / a) ** 2
            vv = (v / b) ** 2
            f = np.sqrt(uu + vv)
            grad = np.sqrt(uu / (a * a) + vv / (b * b)) + _EPS
            sd = f * (f - 1.0) / grad
            # Near the centre the first-order formula degenerates (0/0); there the point is deep inside anyway.
            sd = np.where(f < 0.5, (f - 1.0) * np.minimum(a, b), sd)
        else:
            # Super-ellipse (large outlines only): first order in q = |u/a|^p + |v/b|^p, which keeps the
            # powers on the small separable factors; at the centre it tends to -inf, which is still "inside".
            p = _F32(self.power)
            au = np.abs(u) / a
            bv = np.abs(v) / b
            gu = p * au ** (p - 1.0) / a
            gv = p * bv ** (p - 1.0) / b
            sd = (au**p + bv**p - 1.0) / (np.sqrt(gu * gu + gv * gv) + _EPS)
        z0, z1 = _F32(self.keys[0, 0]), _F32(self.keys[-1, 0])
        return np.maximum(sd, np.maximum(z0 - z, z - z1))

    def offset(self, delta: float) -> Tube:
        """The same tube with both semi-axes shrunk by ``delta`` mm (grown if negative): shells and layers."""
        k = self.keys.copy()
        k[:, 3:5] = np.maximum(k[:, 3:5] - delta, 0.5)
        return Tube(k, self.power)

    def z_cut(self, z0: float, z1: float) -> Tube:
        """The part of this tube between z0 and z1 (e.g. an intervertebral disc of a vertebral column)."""
        zs = np.unique(np.clip(np.concatenate([[z0, z1], self.keys[:, 0]]), z0, z1))
        cols = [zs] + [np.interp(zs, self.keys[:, 0], self.keys[:, c]) for c in range(1, 6)]
        return Tube(np.stack(cols, axis=1), self.power)


@dataclass(eq=False)
class Ellipsoid(Shape):
    """A rotated ellipsoid: lymph nodes, glands, the heart and its chambers, hilar fat.

    Args:
        center: centre (x, y, z) in mm.
        axes: semi-axes (mm) along the local axes.
        rot: 3x3 matrix whose columns are the local axes in the patient frame (identity: axis-aligned).
    """

    center: np.ndarray
    axes: np.ndarray
    rot: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        self.center = np.asarray(self.center, dtype=np.float64)
        self.axes = np.asarray(self.axes, dtype=np.float64)
        self.rot = np.asarray(self.rot, dtype=np.float64)
        if np.any(self.axes <= 0):
            raise ValueError("Ellipsoid semi-axes must be positive")
        # Half-extent of a rotated ellipsoid along patient axis i: sqrt(sum_j (R_ij * s_j)^2).
        half = np.sqrt(((self.rot * self.axes[None, :]) ** 2).sum(axis=1))
        self.lo = self.center - half
        self.hi = self.center + half

    def local(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, ...]:
        """Coordinates of the points along the three local axes (mm from the centre)."""
        dx = x - _F32(self.center[0])
        dy = y - _F32(self.center[1])
        dz = z - _F32(self.center[2])
        r = self.rot.astype(_F32)
        return tuple(dx * r[0, i] + dy * r[1, i] + dz * r[2, i] for i in range(3))

    def sdf(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Approximate signed distance in mm (negative inside), broadcast over x, y, z."""
        u, v, w = self.local(x, y, z)
        a, b, c = (_F32(s) for s in self.axes)
        uu, vv, ww = (u / a) ** 2, (v / b) ** 2, (w / c) ** 2
        f = np.sqrt(uu + vv + ww)
        grad = np.sqrt(uu / (a * a) + vv / (b * b) + ww / (c * c)) + _EPS
        sd = f * (f - 1.0) / grad
        return np.where(f < 0.5, (f - 1.0) * _F32(self.axes.min()), sd)

    def surface_points(self, unit: np.ndarray) -> np.ndarray:
        """Map points given in the unit ball's frame (N, 3) onto this ellipsoid (N, 3), patient frame."""
        return self.center[None, :] + (unit * self.axes[None, :]) @ self.rot.T


@dataclass(eq=False)
class Capsule(Shape):
    """A segment with a radius (exact signed distance): oblique vessels, bronchi, ribs, the aortic arch.

    Args:
        p0: first end point (x, y, z) in mm.
        p1: second end point.
        radius: radius in mm.
    """

    p0: np.ndarray
    p1: np.ndarray
    radius: float

    def __post_init__(self) -> None:
        self.p0 = np.asarray(self.p0, dtype=np.float64)
        self.p1 = np.asarray(self.p1, dtype=np.float64)
        if self.radius <= 0:
            raise ValueError("Capsule radius must be positive")
        self.lo = np.minimum(self.p0, self.p1) - self.radius
        self.hi = np.maximum(self.p0, self.p1) + self.radius

    def sdf(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Exact signed distance in mm (negative inside), broadcast over x, y, z."""
        d = (self.p1 - self.p0).astype(_F32)
        dd = _F32(max(float(d @ d), 1e-12))
        px = x - _F32(self.p0[0])
        py = y - _F32(self.p0[1])
        pz = z - _F32(self.p0[2])
        t = np.clip((px * d[0] + py * d[1] + pz * d[2]) / dd, 0.0, 1.0)
        ex, ey, ez = px - t * d[0], py - t * d[1], pz - t * d[2]
        return np.sqrt(ex * ex + ey * ey + ez * ez) - _F32(self.radius)


def polyline(points: list[tuple[float, float, float]] | np.ndarray, radius: float) -> list[Capsule]:
    """Capsules along a polyline of at least two points (rounded joints make it a smooth tube)."""
    pts = np.asarray(points, dtype=np.float64)
    return [Capsule(pts[i], pts[i + 1], radius) for i in range(len(pts) - 1)]
