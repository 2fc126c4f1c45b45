"""Daily anatomy changes as an analytic pull map (daily point -> planning point).

The map is a composition of invertible pieces, applied in this order to a daily point ``p``
(all in the anatomical frame, mm):

1. setup error: ``q = R p + t`` (rotation about the prostate centre, up to 3 deg per axis;
   translation up to 10 mm per axis);
2. smooth elastic field: a few long-wavelength sinusoids (a few mm);
3. rectal filling: radial dilation/contraction of a rectum segment around its axis, with a
   Gaussian window along the axis (monotone radial profile, hence invertible);
4. prostate motion: a Gaussian-windowed translation, tuned so that the prostate centre moves by
   the drawn shift relative to the setup (up to 5 mm);
5. bladder filling: a star-shaped radial map around the bladder base point that scales the bladder
   by ``factor ** (1/3)`` (volume x factor) and fades outside it, so the bladder grows mostly
   superiorly/anteriorly and pushes its neighbours (monotone radial profile, hence invertible).

Every piece has a positive Jacobian determinant by construction; the generator also checks det J
on the sampled field and scales the non-rigid parts down if needed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from jrs.synth.anatomy import AnatomyParams, Centreline, bladder_radius, bladder_sdf

F64 = npt.NDArray[np.float64]


@dataclass
class FractionParams:
    """What changes in one fraction (mm, degrees).

    Attributes:
        setup_translation_mm: t of the setup error (pull: daily p -> R p + t, anatomical frame;
            the anatomy appears shifted by about -t in the daily scan), (3,) LPS.
        setup_rotation_deg: rotations about x, y, z (LPS) of the setup error, degrees.
        bladder_factor: daily / planning bladder volume (0.5..2).
        rectum_factor: radius factor of the dilated/emptied rectal segment (0.8..1.35).
        rectum_segment_z: height (anatomical z, mm) of that segment's centre.
        rectum_segment_sigma: Gaussian half-length of that segment along the rectum, mm.
        prostate_shift_mm: intended prostate displacement in the daily scan relative to the
            setup-corrected anatomy, (3,) LPS mm (norm <= 5).
        elastic_amplitude_mm: amplitude of the random elastic field, mm.
        elastic_modes: per mode [ax, ay, az, kx, ky, kz, phase] (amplitude mm, wave vector 1/mm).
        nonrigid_scale: factor applied to every non-rigid part (1 unless det J needed it lower).
        prostate_window_mm: translation of the prostate window actually used (after tuning).
        bladder_factor_applied: volume factor given to the bladder map so that the realised
            bladder volume ratio, after all the other pieces, equals the drawn one.
    """

    setup_translation_mm: list[float]
    setup_rotation_deg: list[float]
    bladder_factor: float
    rectum_factor: float
    rectum_segment_z: float
    rectum_segment_sigma: float
    prostate_shift_mm: list[float]
    elastic_amplitude_mm: float
    elastic_modes: list[list[float]]
    nonrigid_scale: float = 1.0
    prostate_window_mm: list[float] | None = None
    bladder_factor_applied: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The parameters as a JSON-friendly dict."""
        return asdict(self)


def sample_fraction(rng: np.random.Generator) -> FractionParams:
    """Draw one fraction's changes."""
    t = rng.uniform(-10, 10, 3)
    rot = rng.uniform(-3, 3, 3)
    bladder = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    rect = float(rng.uniform(0.8, 1.35))
    shift = np.array([rng.uniform(-1.5, 1.5), rng.uniform(-4, 4), rng.uniform(-4, 4)])
    n = float(np.linalg.norm(shift))
    if n > 5.0:
        shift *= 5.0 / n
    amp = float(rng.uniform(1.0, 3.0))
    modes = []
    for _ in range(6):
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        a = rng.normal(size=3)
        a /= np.linalg.norm(a)
        wavelength = rng.uniform(80, 180)
        k = d * 2 * np.pi / wavelength
        modes.append(
            [*(a * amp / np.sqrt(6)).tolist(), *k.tolist(), float(rng.uniform(0, 2 * np.pi))]
        )
    return FractionParams(
        setup_translation_mm=t.tolist(),
        setup_rotation_deg=rot.tolist(),
        bladder_factor=bladder,
        rectum_factor=rect,
        rectum_segment_z=float(rng.uniform(-5, 45)),
        rectum_segment_sigma=float(rng.uniform(15, 25)),
        prostate_shift_mm=shift.tolist(),
        elastic_amplitude_mm=amp,
        elastic_modes=modes,
    )


def rotation_matrix(deg: list[float] | F64) -> F64:
    """Rotation matrix ``Rz @ Ry @ Rx`` for angles (degrees) about x, y, z."""
    ax, ay, az = np.deg2rad(np.asarray(deg, float))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def uniform_in_ball(rng: np.random.Generator, radius: float) -> F64:
    """A point uniform in the ball of `radius` (mm) about the origin, (3,) mm.

    Draws a normal direction (3 normals) then the radius fraction (one uniform, cube-rooted).
    """
    direction = rng.normal(size=3)
    direction /= max(float(np.linalg.norm(direction)), 1e-12)
    return np.asarray(direction * radius * float(rng.uniform()) ** (1.0 / 3.0), float)


def rigid_transform(rot: F64, centre: F64, t: F64) -> sitk.AffineTransform:
    """The rigid map ``x -> centre + rot (x - centre) + t`` as a SimpleITK transform.

    Args:
        rot: (3, 3) rotation matrix.
        centre: (3,) LPS centre of rotation, mm.
        t: (3,) LPS translation, mm.

    Returns:
        The affine transform (e.g. a setup error, daily -> planning points).
    """
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(tuple(float(v) for v in rot.reshape(-1)))
    tx.SetCenter(tuple(float(v) for v in centre))
    tx.SetTranslation(tuple(float(v) for v in t))
    return tx


def rigid_inverse(points: F64, rot: F64, centre: F64, t: F64) -> F64:
    """The inverse of `rigid_transform` on (N, 3) LPS points (mm): ``c + R^T (x - c - t)``."""
    return np.asarray((points - centre - t) @ rot + centre, float)


def _radial_profile(rho: F64, k: float, length: float) -> F64:
    """Pull scale ``c * g(rho)`` helper: g = 1 inside rho <= k, Gaussian fade outside."""
    return np.exp(-((np.maximum(rho - k, 0.0) / length) ** 2))


class PullMap:
    """The daily -> planning map of one fraction (anatomical frame, mm)."""

    def __init__(self, anatomy: AnatomyParams, fraction: FractionParams) -> None:
        self.a = anatomy
        self.f = fraction
        self.rot = rotation_matrix(fraction.setup_rotation_deg)
        self.t = np.asarray(fraction.setup_translation_mm, float)
        self.line = Centreline(anatomy)
        s = fraction.nonrigid_scale
        self.s = s
        self.modes = np.asarray(fraction.elastic_modes, float)
        zr = fraction.rectum_segment_z
        self.rc = self.line.point(zr)
        self.rt = self.line.tangent(zr)
        self.rr = float(self.line.r(zr))
        self.rk = 1.0 + s * (fraction.rectum_factor - 1.0)
        factor = (
            fraction.bladder_factor_applied
            if fraction.bladder_factor_applied is not None
            else 1.0 + s * (fraction.bladder_factor - 1.0)
        )
        self.bk = factor ** (1.0 / 3.0)
        self.window = np.asarray(
            fraction.prostate_window_mm
            if fraction.prostate_window_mm is not None
            else fraction.prostate_shift_mm,
            float,
        )
        self.sigma_p = 28.0

    # ------------------------------------------------------------------ pieces (pull maps)
    def setup(self, p: F64) -> F64:
        """Rigid part: q = R p + t."""
        return p @ self.rot.T + self.t

    def nonrigid(self, q: F64) -> F64:
        """Everything after the setup, (N, 3) -> (N, 3)."""
        q = self.elastic(q)
        q = self.rectum(q)
        q = self.prostate(q)
        return self.bladder(q)

    def elastic(self, q: F64) -> F64:
        """Smooth random field: sum of sinusoids."""
        m = self.modes
        phase = q @ m[:, 3:6].T + m[:, 6]  # (N, modes)
        return q + self.s * (np.sin(phase) @ m[:, 0:3])

    def rectum(self, q: F64) -> F64:
        """Radial dilation/contraction of a rectal segment around its local axis."""
        v = q - self.rc
        along = v @ self.rt
        perp = v - along[:, None] * self.rt
        rho = np.linalg.norm(perp, axis=1) / self.rr
        c = (1.0 - 1.0 / self.rk) * np.exp(-0.5 * (along / self.f.rectum_segment_sigma) ** 2)
        g = _radial_profile(rho, self.rk, 1.0)
        return q - (c * g)[:, None] * perp

    def prostate(self, q: F64) -> F64:
        """Gaussian-windowed translation around the prostate."""
        shift = self.s * self.window
        w = np.exp(-0.5 * np.sum((q - shift) ** 2, axis=1) / self.sigma_p**2)
        return q - w[:, None] * shift

    def bladder(self, q: F64) -> F64:
        """Star-shaped radial scaling of the bladder around its base point."""
        c = np.asarray(self.a.bladder_base_point)
        v = q - c
        r = np.linalg.norm(v, axis=1)
        d = v / np.maximum(r, 1e-9)[:, None]
        rho = r / bladder_radius(self.a, d).astype(np.float64)
        cc = 1.0 - 1.0 / self.bk
        g = _radial_profile(rho, self.bk, 0.7)
        return q - (cc * g)[:, None] * v

    def __call__(self, p: F64) -> F64:
        """Planning points for daily points, (N, 3) -> (N, 3) anatomical mm."""
        return self.nonrigid(self.setup(p))

    # ------------------------------------------------------------------ prostate tuning
    def realised_prostate_shift(self) -> F64:
        """Where the planning prostate centre lands after the non-rigid part (minus start), mm."""
        x = np.zeros((1, 3))
        for _ in range(60):  # fixed point of x - (D(x) - 0); D is close to the identity
            step = self.nonrigid(x)
            x = x - step
            if float(np.abs(step).max()) < 1e-4:
                break
        return x[0]

    def tune_prostate(self, iterations: int = 4) -> None:
        """Adjust the prostate window so the realised shift equals the drawn one."""
        target = self.s * np.asarray(self.f.prostate_shift_mm, float)
        for _ in range(iterations):
            got = self.realised_prostate_shift()
            self.window = self.window + (target - got) / max(self.s, 1e-6)
        self.f.prostate_window_mm = self.window.tolist()


def _lattice(lo: F64, hi: F64, step: float) -> F64:
    axes = [np.arange(a, b + step / 2, step) for a, b in zip(lo, hi, strict=True)]
    grids = np.meshgrid(*axes, indexing="ij")
    return np.stack([g.reshape(-1) for g in grids], axis=1)


def build_pull_map(
    anatomy: AnatomyParams, fraction: FractionParams, step_mm: float = 2.5
) -> PullMap:
    """A tuned pull map: prostate shift and bladder volume ratio as drawn.

    The bladder factor given to the bladder piece is corrected twice so that the volume of the
    daily bladder (points whose planning image is in the bladder, counted on a `step_mm` lattice)
    over the planning bladder volume equals ``1 + scale * (bladder_factor - 1)``.

    Args:
        anatomy: the patient.
        fraction: the fraction's changes (updated in place with the tuned values).
        step_mm: lattice step of the volume count, mm.

    Returns:
        The tuned map.
    """
    bc, br = np.asarray(anatomy.bladder_centre), np.asarray(anatomy.bladder_radii)
    half = br * 1.2 + 3
    planning = _lattice(bc - half, bc + half, step_mm)
    v_plan = np.count_nonzero(
        bladder_sdf(anatomy, planning[:, 0], planning[:, 1], planning[:, 2]) < 0
    )
    target = 1.0 + fraction.nonrigid_scale * (fraction.bladder_factor - 1.0)
    fraction.bladder_factor_applied = target
    pm = PullMap(anatomy, fraction)
    pm.tune_prostate()
    rot = rotation_matrix(fraction.setup_rotation_deg)
    centre = (bc - np.asarray(fraction.setup_translation_mm)) @ rot  # R^T (bc - t)
    half_d = br * 1.4 + 18
    daily = _lattice(centre - half_d, centre + half_d, step_mm)
    for _ in range(3):
        q = pm(daily)
        v_day = np.count_nonzero(bladder_sdf(anatomy, q[:, 0], q[:, 1], q[:, 2]) < 0)
        ratio = float(v_day) / max(int(v_plan), 1)
        applied = float(
            np.clip(fraction.bladder_factor_applied * target / max(ratio, 1e-3), 0.3, 3.0)
        )
        fraction.bladder_factor_applied = applied
        pm = PullMap(anatomy, fraction)
        pm.tune_prostate()
    return pm
