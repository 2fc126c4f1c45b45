"""Analytic male pelvis: random anatomy parameters and their rendering on a voxel grid.

Coordinates: the anatomy is described in an *anatomical* frame = LPS axes (x to the patient's
left, y posterior, z superior), mm, with the origin at the centre of the prostate. The frame is
placed in the scanner's LPS space by adding ``anchor`` (the LPS position of the prostate centre).

Rendering paints tissues in order (air, subcutaneous fat, muscle, pelvic fat, bones, rectum,
bladder, seminal vesicles, prostate) with a partial-volume ramp over about one voxel of the signed
distance, each shape only inside its bounding box. The result has no noise and no rectal gas:
those are added per scan (see `jrs.synth.generator`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from scipy.interpolate import PchipInterpolator

from jrs.core.geometry import Geometry
from jrs.synth import shapes
from jrs.synth.shapes import Array

F64 = npt.NDArray[np.float64]


@dataclass
class AnatomyParams:
    """Random parameters of one synthetic patient (mm and HU).

    Attributes are plain floats/lists so that `as_dict` is JSON-serialisable.
    """

    body_lr: float  # LR semi-axis of the outline
    body_ap: float  # AP semi-axis
    body_power: float  # super-ellipse exponent
    body_y: float  # AP centre of the outline
    fat_thickness: float
    prostate_radii: list[float]
    prostate_base_widening: float
    bladder_centre: list[float]
    bladder_radii: list[float]
    bladder_base_point: list[float]
    bladder_shape: list[float]  # low-order radial perturbation coefficients
    bladder_wall: float
    sv_points: list[list[list[float]]]  # per side: three Bezier control points
    sv_radius: float
    rectum_z: list[float]
    rectum_x: list[float]
    rectum_y: list[float]
    rectum_r: list[float]
    rectum_wall: float
    rectum_extent_z: list[float]  # inferior/superior end of the Rectum structure
    femoral_head_centre: list[float]  # left head (x > 0); right is mirrored
    femoral_head_radius: float
    pubis_y: float
    pubis_z: float
    coccyx_tip_z: float
    sacrum_gap: float
    pelvic_fat_radii: list[float]
    hu: dict[str, float]
    noise_std: float

    def as_dict(self) -> dict[str, Any]:
        """The parameters as a JSON-friendly dict."""
        return asdict(self)


#: Ranges of the "broad" variety (training data that generalises): prostate volume (cc),
#: bladder volume (mL), body semi-axes (mm), fat thickness (mm), CT noise (HU).
BROAD_RANGES: dict[str, tuple[float, float]] = {
    "prostate_cc": (20.0, 100.0),
    "bladder_ml": (80.0, 600.0),
    "body_lr": (145.0, 240.0),
    "body_ap": (95.0, 165.0),
    "fat": (8.0, 50.0),
    "noise": (8.0, 45.0),
}
VARIETIES = ("standard", "broad")


def _ellipsoid_cc(radii: list[float]) -> float:
    return float(4.0 / 3.0 * np.pi * radii[0] * radii[1] * radii[2] / 1000.0)


def sample_anatomy(rng: np.random.Generator, variety: str = "standard") -> AnatomyParams:
    """Draw one patient's anatomy.

    Args:
        rng: random generator (the patient's).
        variety: ``"standard"`` (the phantoms of the tests and the demo) or ``"broad"``: wider
            anatomy for training data (`BROAD_RANGES`: prostate 20-100 cc, bladder 80-600 mL,
            slimmer to heavier body habitus, CT noise 8-45 HU), drawn after the standard
            parameters so that the rest of the anatomy stays consistent.

    Returns:
        The parameters (organ sizes and positions vary between patients).
    """
    if variety not in VARIETIES:
        raise ValueError(f"unknown phantom variety {variety!r}; expected one of {VARIETIES}")

    def u(a: float, b: float) -> float:
        return float(rng.uniform(a, b))

    pr = [u(20, 26), u(15, 19), u(18, 23)]  # prostate semi-axes LR, AP, SI: ~20-45 cc
    br = [u(35, 50), u(25, 35), u(24, 34)]
    broad: dict[str, float] = {}
    if variety == "broad":
        vrng = np.random.default_rng(rng.integers(2**63))  # separate stream: standard draws kept

        def logu(lo_hi: tuple[float, float]) -> float:
            lo, hi = lo_hi
            return float(np.exp(vrng.uniform(np.log(lo), np.log(hi))))

        sp = (logu(BROAD_RANGES["prostate_cc"]) / _ellipsoid_cc(pr)) ** (1.0 / 3.0)
        sb = (logu(BROAD_RANGES["bladder_ml"]) / _ellipsoid_cc(br)) ** (1.0 / 3.0)
        pr = [r * sp for r in pr]
        br = [r * sb for r in br]
        broad = {k: float(vrng.uniform(*BROAD_RANGES[k])) for k in ("body_lr", "body_ap", "fat")}
        broad["noise"] = float(vrng.uniform(*BROAD_RANGES["noise"]))
    z_bottom = pr[2] * u(0.78, 0.9)
    bc = [u(-4, 4), u(-12, -4), z_bottom + br[2]]
    base = [bc[0], bc[1] + 0.25 * br[1], bc[2] - 0.55 * br[2]]
    sv_r = u(4.0, 6.0)
    sv_points = []
    tip_x, tip_y, tip_z = u(28, 40), pr[1] + u(11, 16), pr[2] + u(20, 30)
    for s in (1.0, -1.0):
        jitter = u(-3, 3)
        sv_points.append(
            [
                [s * u(5, 8), pr[1] * 0.35, pr[2] * 0.72],
                [s * u(15, 21), pr[1] + u(6, 9), pr[2] + u(8, 13)],
                [s * (tip_x + jitter), tip_y + u(-2, 2), tip_z + jitter],
            ]
        )
    r_scale = u(0.85, 1.15)
    zs = [-90.0, -60.0, -35.0, -15.0, 5.0, 25.0, 45.0, 70.0, 100.0, 130.0, 170.0]
    rr = [7.0, 7.5, 9.0, 12.0, 15.0, 17.0, 17.0, 15.0, 13.0, 12.0, 12.0]
    rr = [r * r_scale if z > -40 else r for r, z in zip(rr, zs, strict=True)]
    post_prostate = pr[1] * 0.8
    y15 = post_prostate * 0.8 + 2.5 + rr[3]
    y5 = post_prostate + 2.5 + rr[4]
    y25 = max(pr[1] + 9 + sv_r + 2.5 + rr[5], y5 + 6)
    y45 = max(tip_y + sv_r + 3 + rr[6], y25 + 6)
    ry = [42.0, 34.0, max(22.0, y15 - 6), y15, y5, y25, y45, y45 + 8, y45 + 6, y45 - 4, y45 - 18]
    side = 1.0 if rng.uniform() < 0.8 else -1.0
    rx = [side * v for v in (0, 0, 0, 0, 0, 0, 1.0, 3.0, 8.0, 18.0, 30.0)]
    rx = [v + u(-3, 3) * (1 if z > 0 else 0) for v, z in zip(rx, zs, strict=True)]
    body_lr, body_ap = u(160, 210), u(100, 140)
    if broad:
        body_lr, body_ap = broad["body_lr"], broad["body_ap"]
    pubis_y = -pr[1] - u(22, 30)
    pubis_z = u(-8, 0)
    body_y = pubis_y - u(35, 55) + body_ap
    head_r = u(21, 26)
    head = [0.5 * body_lr + u(-4, 4), u(-15, -2), pubis_z + u(10, 18)]
    hu = {
        "fat": u(-110, -85),
        "muscle": u(40, 60),
        "pelvic_fat": u(-95, -70),
        "cortical": u(1000, 1400),
        "trabecular": u(200, 400),
        "urine": u(5, 15),
        "bladder_wall": u(32, 42),
        "prostate": u(35, 45),
        "seminal_vesicles": u(28, 38),
        "rectal_wall": u(35, 45),
    }
    return AnatomyParams(
        body_lr=body_lr,
        body_ap=body_ap,
        body_power=u(2.4, 3.2),
        body_y=body_y,
        fat_thickness=broad["fat"] if broad else u(12, 35),
        prostate_radii=pr,
        prostate_base_widening=u(0.05, 0.2),
        bladder_centre=bc,
        bladder_radii=br,
        bladder_base_point=base,
        bladder_shape=[u(-0.06, 0.06) for _ in range(6)],
        bladder_wall=u(2.5, 4.0),
        sv_points=sv_points,
        sv_radius=sv_r,
        rectum_z=zs,
        rectum_x=rx,
        rectum_y=ry,
        rectum_r=rr,
        rectum_wall=u(2.5, 3.5),
        rectum_extent_z=[-pr[2] - u(10, 16), bc[2] + br[2] + u(-5, 5)],
        femoral_head_centre=head,
        femoral_head_radius=head_r,
        pubis_y=pubis_y,
        pubis_z=pubis_z,
        coccyx_tip_z=u(-28, -12),
        sacrum_gap=u(6, 14),
        pelvic_fat_radii=[u(40, 48), u(45, 60), u(80, 100)],
        hu=hu,
        noise_std=broad["noise"] if broad else u(15, 30),
    )


# --------------------------------------------------------------------------- bladder geometry
def bladder_radius(p: AnatomyParams, d: F64 | Array) -> Array:
    """Distance from the bladder base point to the bladder surface along unit directions.

    The bladder is star-shaped around its base point ``c``: an ellipsoid seen from ``c`` with a
    smooth low-order perturbation of the radius.

    Args:
        p: anatomy parameters.
        d: (..., 3) unit directions.

    Returns:
        (...) radii in mm.
    """
    c = np.asarray(p.bladder_base_point)
    m = np.asarray(p.bladder_centre)
    r = np.asarray(p.bladder_radii)
    w = (c - m) / r
    dn = d / r
    a = np.sum(dn * dn, axis=-1)
    b = 2.0 * np.sum(dn * w, axis=-1)
    cc = float(w @ w) - 1.0
    t = (-b + np.sqrt(b * b - 4 * a * cc)) / (2 * a)
    e = p.bladder_shape
    dx, dy, dz = d[..., 0], d[..., 1], d[..., 2]
    eps = e[0] * dx + e[1] * dy + e[2] * dz + e[3] * dx * dz + e[4] * dy * dz + e[5] * dx * dy
    return (t * (1.0 + eps)).astype(np.float32)


def bladder_sdf(p: AnatomyParams, x: Array, y: Array, z: Array) -> Array:
    """Radial signed distance of the bladder (outer wall surface), mm."""
    c = p.bladder_base_point
    v = np.stack(np.broadcast_arrays(x - c[0], y - c[1], z - c[2]), axis=-1)
    rho = np.sqrt(np.sum(v * v, axis=-1))
    d = v / np.maximum(rho, 1e-6)[..., None]
    return (rho - bladder_radius(p, d)).astype(np.float32)


# --------------------------------------------------------------------------- rectum centreline
class Centreline:
    """The rectum's centreline ``(x(z), y(z))`` and outer radius ``r(z)`` (smooth PCHIP curves)."""

    def __init__(self, p: AnatomyParams) -> None:
        z = np.asarray(p.rectum_z)
        self.x = PchipInterpolator(z, p.rectum_x)
        self.y = PchipInterpolator(z, p.rectum_y)
        self.r = PchipInterpolator(z, p.rectum_r)
        self.dx = self.x.derivative()
        self.dy = self.y.derivative()

    def point(self, z: float) -> F64:
        """Centreline point at height z, (3,) mm."""
        return np.array([float(self.x(z)), float(self.y(z)), z])

    def tangent(self, z: float) -> F64:
        """Unit tangent at height z, (3,)."""
        t = np.array([float(self.dx(z)), float(self.dy(z)), 1.0])
        return t / np.linalg.norm(t)


def rectum_sdf(line: Centreline, x: Array, y: Array, z: Array, offset: float = 0.0) -> Array:
    """Signed distance to a tube around the centreline, shrunk by `offset` mm (slice-wise).

    Each axial slice cuts the locally straight, tilted tube in an ellipse elongated along the
    tilt by ``sqrt(1 + slope^2)``; the distance is measured perpendicular to the axis.
    """
    zz = z[:, 0, 0].astype(np.float64)
    cx = line.x(zz)[:, None, None]
    cy = line.y(zz)[:, None, None]
    r = line.r(zz)[:, None, None] - offset
    sx = line.dx(zz)[:, None, None]
    sy = line.dy(zz)[:, None, None]
    m = np.sqrt(sx * sx + sy * sy)
    ex = np.where(m > 1e-6, sx / np.maximum(m, 1e-6), 1.0)
    ey = np.where(m > 1e-6, sy / np.maximum(m, 1e-6), 0.0)
    dx, dy = x - cx, y - cy
    along = (dx * ex + dy * ey) / np.sqrt(1.0 + m * m)
    perp = -dx * ey + dy * ex
    return (np.sqrt(along * along + perp * perp) - r).astype(np.float32)


# --------------------------------------------------------------------------- rendering
@dataclass
class Rendered:
    """The noiseless, gas-free anatomy on one grid.

    Attributes:
        base: (nz, ny, nx) float32 HU without noise and rectal gas.
        structures: ROI name -> (nz, ny, nx) bool.
        lumen: (nz, ny, nx) bool, rectal lumen (inside the rectal wall).
        tissues: "fat", "muscle", "bone" -> (nz, ny, nx) bool (cores, for tests and QA).
    """

    base: Array
    structures: dict[str, npt.NDArray[np.bool_]]
    lumen: npt.NDArray[np.bool_]
    tissues: dict[str, npt.NDArray[np.bool_]]


class _Canvas:
    """Axis-aligned grid (identity direction) with anatomical coordinates and box extraction."""

    def __init__(self, geometry: Geometry, anchor: F64) -> None:
        if not np.allclose(geometry.direction, np.eye(3)):
            raise ValueError("the phantom renders on identity-direction grids only")
        self.g = geometry
        nz, ny, nx = geometry.shape
        o = geometry.origin - anchor
        s = geometry.spacing
        self.axes = [o[a] + s[a] * np.arange(n) for a, n in enumerate((nx, ny, nz))]
        self.width = float(np.mean(s))

    def box(
        self, lo: F64 | list[float], hi: F64 | list[float]
    ) -> tuple[tuple[slice, slice, slice], Array, Array, Array] | None:
        """Voxels whose centres lie in the anatomical box [lo, hi] (mm), with coordinates."""
        idx = []
        for a in range(3):
            ax = self.axes[a]
            i0 = int(np.searchsorted(ax, lo[a], side="left"))
            i1 = int(np.searchsorted(ax, hi[a], side="right"))
            if i1 <= i0:
                return None
            idx.append((i0, i1))
        sl = (slice(*idx[2]), slice(*idx[1]), slice(*idx[0]))
        x = self.axes[0][idx[0][0] : idx[0][1]].astype(np.float32)[None, None, :]
        y = self.axes[1][idx[1][0] : idx[1][1]].astype(np.float32)[None, :, None]
        z = self.axes[2][idx[2][0] : idx[2][1]].astype(np.float32)[:, None, None]
        return sl, x, y, z


def _paint(img: Array, sl: tuple[slice, ...], sdf: Array, hu: float | Array, width: float) -> None:
    alpha = shapes.coverage(sdf, width)
    region = img[sl]
    region += alpha * (hu - region)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: float) -> Array:
    """Unit-variance smooth Gaussian noise (a texture), (shape) float32."""
    white = rng.standard_normal(shape, dtype=np.float32)
    img = sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(white), float(sigma_vox))
    arr = sitk.GetArrayFromImage(img)
    return ((arr - arr.mean()) / max(float(arr.std()), 1e-6)).astype(np.float32)


def _femur_sdf(p: AnatomyParams, s: float, x: Array, y: Array, z: Array) -> Array:
    h = np.asarray(p.femoral_head_centre) * [s, 1, 1]
    r = p.femoral_head_radius
    head = shapes.ellipsoid(x, y, z, h, [r, r, r])
    neck_end = h + np.array([s * 32, 6, -22])
    neck = shapes.capsule(x, y, z, h, neck_end, 13.0, 16.0)
    troch_c = h + np.array([s * 44, 9, -26])
    troch = shapes.ellipsoid(x, y, z, troch_c, [15, 18, 22])
    shaft = shapes.capsule(x, y, z, troch_c, h + np.array([s * 40, 16, -170]), 15.0, 13.0)
    out = shapes.smooth_min(head, neck, 6.0)
    out = shapes.smooth_min(out, troch, 6.0)
    return shapes.smooth_min(out, shaft, 6.0)


def _hip_sdf(
    p: AnatomyParams, s: float, sacrum_y_top: float, x: Array, y: Array, z: Array
) -> Array:
    h = np.asarray(p.femoral_head_centre) * [s, 1, 1]
    r = p.femoral_head_radius
    socket = shapes.ellipsoid(x, y, z, h + np.array([-s * 8, 3, 6]), [r + 11, r + 11, r + 14])
    socket = np.maximum(socket, s * (x - h[0]) - 0.35 * r)  # open laterally
    wing_z = h[2] + 70
    post = np.array([s * 45, sacrum_y_top - 4, wing_z])
    ant = np.array([s * (p.body_lr - p.fat_thickness - 28), h[1] - 28, wing_z - 5])
    along = (ant - post) / np.linalg.norm(ant - post)
    up = np.array([0.0, 0.0, 1.0])
    normal = np.cross(along, up)
    normal /= np.linalg.norm(normal)
    axes = np.stack([along, up, normal])
    wing = shapes.rotated_ellipsoid(
        x, y, z, (post + ant) / 2, [float(np.linalg.norm(ant - post)) / 2 + 6, 55, 6.5], axes
    )
    body = shapes.capsule(
        x, y, z, h + np.array([-s * 6, 8, 10]), [s * 72, post[1] - 8, wing_z - 5], 17, 13
    )
    pub_c = np.array([s * 11.5, p.pubis_y, p.pubis_z])
    pubis = shapes.ellipsoid(x, y, z, pub_c, [9.5, 11, 20])
    sup = shapes.capsule(
        x, y, z, h + np.array([-s * 18, -12, -2]), pub_c + np.array([s * 2, 0, 10]), 10, 8
    )
    tub = h + np.array([-s * 30, 36, -48])
    inf = shapes.capsule(x, y, z, pub_c + np.array([s * 2, 5, -14]), tub, 7.5, 8.5)
    isch = shapes.capsule(x, y, z, h + np.array([-s * 10, 18, -8]), tub, 14, 11)
    tubero = shapes.ellipsoid(x, y, z, tub, [13, 15, 13])
    out = shapes.smooth_min(socket, body, 6.0)
    for part in (wing, pubis, sup, inf, isch, tubero):
        out = shapes.smooth_min(out, part, 5.0)
    joint = np.sqrt((x - h[0]) ** 2 + (y - h[1]) ** 2 + (z - h[2]) ** 2) - (r + 2.0)
    return np.maximum(out, -joint).astype(np.float32)


def _sacrum_sdf(p: AnatomyParams, line: Centreline, x: Array, y: Array, z: Array) -> Array:
    zz = z[:, 0, 0].astype(np.float64)
    tip = p.coccyx_tip_z
    t = np.clip((zz - tip) / 140.0, 0.0, 1.0)
    a = np.where(zz < tip + 35, 7 + 8 * (zz - tip) / 35, 22 + 36 * np.clip((t - 0.25) / 0.75, 0, 1))
    b = np.where(zz < tip + 35, 5 + 4 * (zz - tip) / 35, 11 + 7 * t)
    cy = line.y(zz) + line.r(zz) + p.sacrum_gap + b
    a3, b3, cy3 = a[:, None, None], b[:, None, None], cy[:, None, None]
    d2 = shapes.superellipse(x, y, 0.0, cy3, a3, b3, 2.0)
    return np.maximum(d2, (tip - z)).astype(np.float32)


def _prostate_sdf(p: AnatomyParams, x: Array, y: Array, z: Array) -> Array:
    pr = p.prostate_radii
    widen = 1.0 + p.prostate_base_widening * np.clip(z / pr[2], -1.0, 1.0)
    yy = np.where(y > 0, y * 1.25, y)
    return shapes.ellipsoid(x / widen, yy, z, [0, 0, 0], pr)


def sv_polylines(p: AnatomyParams) -> list[F64]:
    """The seminal vesicles' centrelines, two (n, 3) polylines (anatomical mm)."""
    return [shapes.bezier(pts[0], pts[1], pts[2], n=12) for pts in p.sv_points]


def _sv_sdf(p: AnatomyParams, x: Array, y: Array, z: Array) -> Array:
    out: Array | None = None
    for line in sv_polylines(p):
        radii = p.sv_radius * np.linspace(1.0, 0.8, len(line))
        d = shapes.tube(x, y, z, line, radii)
        out = d if out is None else np.minimum(out, d)
    assert out is not None
    return out


def organ_bounds(p: AnatomyParams) -> tuple[F64, F64]:
    """Anatomical box (lower, upper corner, mm) around prostate, bladder and seminal vesicles."""
    pr, bc, br = (
        np.asarray(p.prostate_radii),
        np.asarray(p.bladder_centre),
        np.asarray(p.bladder_radii),
    )
    lo = np.minimum(-pr * 1.3, bc - br * 1.15)
    hi = np.maximum(pr * 1.3, bc + br * 1.15)
    sv = np.asarray(p.sv_points).reshape(-1, 3)
    lo = np.minimum(lo, sv.min(axis=0) - 10)
    hi = np.maximum(hi, sv.max(axis=0) + 10)
    return lo, hi


def _paint_body(cv: _Canvas, img: npt.NDArray[np.float32], p: AnatomyParams) -> tuple[Any, Any]:
    """Paint the body outline (fat) and its muscle core: slice-wise scaled super-ellipses.

    Returns:
        The body mask and the subcutaneous fat mask, (nz, ny, nx) booleans.
    """
    w = cv.width
    big = 1e4
    full = cv.box([-big, -big, -big], [big, big, big])
    assert full is not None  # an unbounded box always meets the grid
    sl, x, y, z = full
    zs = z[:, 0, 0]
    scale = (1.0 - 0.06 * ((zs - 20.0) / 100.0) ** 2)[:, None, None]
    a, b = p.body_lr * scale, p.body_ap * scale
    body = shapes.superellipse(x, y, 0.0, p.body_y, a, b, p.body_power)
    _paint(img, sl, body, p.hu["fat"], w)
    t = p.fat_thickness
    inner = shapes.superellipse(x, y, 0.0, p.body_y - 0.15 * t, a - t, b - 1.15 * t, p.body_power)
    _paint(img, sl, inner, p.hu["muscle"], w)
    return body < 0, (body < -2 * w) & (inner > 2 * w)


def render(p: AnatomyParams, geometry: Geometry, anchor: F64, rng: np.random.Generator) -> Rendered:
    """Paint the anatomy on an identity-direction grid.

    Args:
        p: anatomy parameters.
        geometry: the grid (identity direction), LPS mm.
        anchor: LPS position of the anatomical origin (prostate centre), (3,) mm.
        rng: generator for textures (rectal content, bone marrow).

    Returns:
        The noiseless, gas-free image with structures, rectal lumen and tissue masks.
    """
    cv = _Canvas(geometry, anchor)
    w = cv.width
    shape = geometry.shape
    img = np.full(shape, -1000.0, dtype=np.float32)
    structures: dict[str, npt.NDArray[np.bool_]] = {}
    tissues = {k: np.zeros(shape, bool) for k in ("fat", "muscle", "bone")}
    lumen = np.zeros(shape, bool)
    hu = p.hu

    structures["Body"], tissues["fat"] = _paint_body(cv, img, p)

    # pelvic fat around the organs
    fr = np.asarray(p.pelvic_fat_radii)
    fc = np.array([0.0, 12.0, 25.0])
    bx = cv.box(fc - fr - 3, fc + fr + 3)
    if bx is not None:
        sl, x, y, z = bx
        _paint(img, sl, shapes.ellipsoid(x, y, z, fc, fr), hu["pelvic_fat"], w)

    line = Centreline(p)
    # bones: cortical shell over trabecular core, per group inside its box
    h = np.asarray(p.femoral_head_centre)
    sac_top = float(line.y(h[2] + 70) + line.r(h[2] + 70) + p.sacrum_gap + 15)
    bone_groups: list[tuple[str, list[float], list[float], Callable[..., Array]]] = []
    for s in (1.0, -1.0):
        bone_groups.append(
            (
                f"femur{int(s)}",
                [s * h[0] - 45 if s > 0 else -h[0] - 75, h[1] - 35, h[2] - 200],
                [h[0] + 75 if s > 0 else -h[0] + 45, h[1] + 50, h[2] + 30],
                partial(_femur_sdf, p, s),
            )
        )
        lat = p.body_lr - p.fat_thickness - 10
        bone_groups.append(
            (
                f"hip{int(s)}",
                [0 if s > 0 else -lat, p.pubis_y - 15, h[2] - 75],
                [lat if s > 0 else 0, sac_top + 30, h[2] + 140],
                partial(_hip_sdf, p, s, sac_top),
            )
        )
    bone_groups.append(
        (
            "sacrum",
            [-70, 0, p.coccyx_tip_z - 2],
            [70, 200, 400],
            partial(_sacrum_sdf, p, line),
        )
    )
    cortex = 2.5
    for name, lo, hi, fn in bone_groups:
        bx = cv.box(lo, hi)
        if bx is None:
            continue
        sl, x, y, z = bx
        d = fn(x, y, z)
        _paint(img, sl, d, hu["cortical"], w)
        marrow = hu["trabecular"] + 60.0 * _smooth_noise(rng, d.shape, 1.2)
        _paint(img, sl, d + cortex, marrow, w)
        tissues["bone"][sl] |= d < -0.5 * w
        if name.startswith("femur"):
            s = 1.0 if name == "femur1" else -1.0
            roi = "FemoralHead_L" if s > 0 else "FemoralHead_R"
            mask = np.zeros(shape, bool)
            mask[sl] = (d < 0) & (z > h[2] - 35)
            structures[roi] = mask
    tissues["muscle"] = (img > 20) & (img < 80) & ~tissues["bone"]

    # rectum: wall + textured content (no gas here)
    zr = np.asarray(p.rectum_z)
    rmax = float(np.max(p.rectum_r)) + 6
    lo = [min(p.rectum_x) - rmax * 2, min(p.rectum_y) - rmax * 2, zr[0]]
    hi = [max(p.rectum_x) + rmax * 2, max(p.rectum_y) + rmax * 2, zr[-1]]
    bx = cv.box(lo, hi)
    rect = np.zeros(shape, bool)
    if bx is not None:
        sl, x, y, z = bx
        d = rectum_sdf(line, x, y, z)
        _paint(img, sl, d, hu["rectal_wall"], w)
        din = d + p.rectum_wall
        tex = _smooth_noise(rng, d.shape, 2.0 / w)
        content = -30.0 + 45.0 * np.tanh(tex).astype(np.float32)  # about -75..15, tails -100..40
        _paint(img, sl, din, np.clip(content, -100, 40), w)
        # the Rectum structure runs from the anorectal junction to the rectosigmoid (flat ends)
        z_lo, z_hi = p.rectum_extent_z
        rect[sl] = (d < 0) & (z >= z_lo) & (z <= z_hi)
        lumen[sl] = din < 0
    structures["Rectum"] = rect

    # bladder: wall + urine
    bc, br = np.asarray(p.bladder_centre), np.asarray(p.bladder_radii)
    bx = cv.box(bc - br * 1.2 - 5, bc + br * 1.2 + 5)
    blad = np.zeros(shape, bool)
    if bx is not None:
        sl, x, y, z = bx
        d = bladder_sdf(p, x, y, z)
        _paint(img, sl, d, hu["bladder_wall"], w)
        _paint(img, sl, d + p.bladder_wall, hu["urine"], w)
        blad[sl] = d < 0
    structures["Bladder"] = blad

    # seminal vesicles
    pts = np.asarray(p.sv_points).reshape(-1, 3)
    bx = cv.box(pts.min(axis=0) - 10, pts.max(axis=0) + 10)
    sv = np.zeros(shape, bool)
    if bx is not None:
        sl, x, y, z = bx
        d = _sv_sdf(p, x, y, z)
        _paint(img, sl, d, hu["seminal_vesicles"], w)
        sv[sl] = d < 0
    structures["SeminalVesicles"] = sv

    # prostate
    pr = np.asarray(p.prostate_radii)
    ext = pr * (1 + p.prostate_base_widening) + 4
    bx = cv.box(-ext, ext)
    pro = np.zeros(shape, bool)
    if bx is not None:
        sl, x, y, z = bx
        d = _prostate_sdf(p, x, y, z)
        _paint(img, sl, d, hu["prostate"] + 4.0 * _smooth_noise(rng, d.shape, 2.0), w)
        pro[sl] = d < 0
    structures["Prostate"] = pro
    structures["PTV"] = _expand(pro | sv, geometry, 7.0)
    for k in ("fat", "bone"):
        tissues[k] &= ~(pro | sv | blad | rect)
    return Rendered(base=img, structures=structures, lumen=lumen, tissues=tissues)


def _expand(
    mask: npt.NDArray[np.bool_], geometry: Geometry, margin_mm: float
) -> npt.NDArray[np.bool_]:
    """Isotropic expansion of a mask by `margin_mm` (Maurer distance map inside its box)."""
    out = np.zeros(mask.shape, bool)
    nz = np.nonzero(mask)
    if len(nz[0]) == 0:
        return out
    pad = [int(np.ceil(margin_mm / s)) + 2 for s in geometry.spacing[::-1]]
    sl = tuple(
        slice(max(int(i.min()) - p_, 0), min(int(i.max()) + p_ + 1, n))
        for i, p_, n in zip(nz, pad, mask.shape, strict=True)
    )
    img = sitk.GetImageFromArray(mask[sl].astype(np.uint8))
    img.SetSpacing(tuple(float(v) for v in geometry.spacing))
    dist = sitk.SignedMaurerDistanceMap(
        img, insideIsPositive=False, squaredDistance=False, useImageSpacing=True
    )
    out[sl] = sitk.GetArrayFromImage(dist) <= margin_mm
    return out
