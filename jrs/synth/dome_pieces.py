"""The dome engine's anatomy and push pieces (see `jrs.synth.dome_engine` for the mechanism).

Part of the held-out "dome" deformation family: the setup centre (the bony pelvis), the planning
anatomy carried into the intermediate frame I by the inverse setup (organ fractions and bones on
the box grid, an LPS-aligned `jrs.synth.dome_engine.COARSE_MM` lattice), and the push field's
pieces on that grid before their amplitudes:

* the bladder's unit dome field ``A`` (`bladder_field`), its base point and dome direction;
* the rectal push ``Q`` for ``a = 1 mm`` about a centreline point (`rectum_field`);
* the rigid gland zone ``P`` and its weight ``W_p``, and the bone weight ``W`` (`build_pieces`);
* the glands' rigid push ``(Rx(pitch) - I)(q - c_p) + t_p`` (`gland_push`).

Conventions (DESIGN.md): LPS mm, arrays (z, y, x), vector components (x, y, z).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from scipy import ndimage

from jrs.core.geometry import Geometry, Volume
from jrs.core.labels import BLADDER, PROSTATE, RECTUM, SEMINAL_VESICLES
from jrs.synth.grid_boxes import (
    Box,
    block_average,
    components_above,
    crop_geometry,
    fraction_on_grid,
    full_box,
    index_box,
    index_box_of_lps,
    resample_linear,
    smoothstep,
    weighted_centroid,
)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]

#: HU above which a voxel outside the organs counts as bone.
BONE_HU = 200.0
#: bone parts smaller than this (mm^3) are ignored (fiducials, calcifications, noise).
MIN_BONE_MM3 = 500.0
#: the non-rigid weight rises from 0 on the bones back to 1 over this distance, mm.
BONE_BLEND_MM = 8.0
#: the setup centre is the centroid of the bone within this z distance of the prostate, mm.
BONY_Z_MM = 100.0
#: bladder wall motion decays into the tissue as exp(-dist / this), mm.
BLADDER_DECAY_MM = 18.0
#: the bladder's tissue field fades to zero between these distances from the bladder, mm.
BLADDER_TAPER_MM = (50.0, 80.0)
#: the rigid prostate zone: glands dilated by this (mm), blended over the next width (mm).
PROSTATE_MARGIN_MM = 3.0
PROSTATE_BLEND_MM = 6.0


# ------------------------------------------------------------------------------ setup centre
def organ_centre(lab: npt.NDArray[Any], g: Geometry) -> tuple[F64, str]:
    """Centroid of the prostate, else of the seminal vesicles / all organs / the grid.

    Args:
        lab: (nz, ny, nx) planning label map.
        g: its grid.

    Returns:
        ((3,) LPS centroid in mm, its source: "prostate", "seminal_vesicles", "organs", "grid").
    """
    for name, mask in (
        ("prostate", lab == PROSTATE),
        ("seminal_vesicles", lab == SEMINAL_VESICLES),
        ("organs", lab > 0),
    ):
        if np.any(mask):
            k, j, i = (float(np.mean(a)) for a in np.nonzero(mask))
            return np.asarray(g.index_to_physical([i, j, k]), float), name
    return np.asarray(g.index_to_physical((np.asarray(g.size_xyz) - 1) / 2.0), float), "grid"


def bony_centre(ct: Volume, lab: npt.NDArray[Any], z_ref: float) -> F64 | None:
    """Centroid of the bony pelvis: bone inside the body within `BONY_Z_MM` of `z_ref`.

    Bone is HU > `BONE_HU` outside the organs, block-averaged to about 3 mm, in parts of at least
    `MIN_BONE_MM3` of the body's largest connected component (the couch is left out).

    Args:
        ct: the planning CT, HU (nz, ny, nx).
        lab: (nz, ny, nx) planning label map.
        z_ref: LPS z of the organs' centre, mm.

    Returns:
        (3,) LPS centroid in mm, or None without bone (or body) near `z_ref`.
    """
    g = ct.geometry
    nx, ny, nz = g.size_xyz
    slices = np.arange(nz, dtype=float)
    centres = g.index_to_physical(
        np.stack([np.full(nz, (nx - 1) / 2.0), np.full(nz, (ny - 1) / 2.0), slices], axis=1)
    )
    ks = np.flatnonzero(np.abs(centres[:, 2] - z_ref) <= BONY_Z_MM)
    if ks.size == 0:
        return None
    box: Box = (slice(int(ks[0]), int(ks[-1]) + 1), slice(0, ny), slice(0, nx))
    hu = ct.array[box]
    sub = crop_geometry(g, box)
    bone_img = block_average((hu > BONE_HU) & (lab[box] == 0), sub, full_box(hu.shape), 3.0)
    body_img = block_average(hu > -400.0, sub, full_box(hu.shape), 3.0)
    bone = sitk.GetArrayFromImage(bone_img) >= 0.5
    body = sitk.GetArrayFromImage(body_img) >= 0.5
    comp, n = ndimage.label(body)
    if n == 0:
        return None
    body = comp == int(np.argmax(np.bincount(comp.reshape(-1))[1:])) + 1
    small = Geometry.from_sitk(bone_img)
    bone = components_above(bone & body, float(np.prod(small.spacing)), MIN_BONE_MM3)
    if not bone.any():
        return None
    k, j, i = (float(np.mean(a)) for a in np.nonzero(bone))
    return np.asarray(small.index_to_physical([i, j, k]), float)


# ------------------------------------------------------------------------------ anatomy in I
@dataclass(eq=False)
class Anatomy:
    """The planning anatomy in the intermediate frame I, on the box grid (coarse lattice).

    Attributes:
        grid: the box grid (LPS-aligned, isotropic spacing).
        pts: (bz, by, bx, 3) float32 LPS node positions, mm.
        frac: label id -> (bz, by, bx) float32 fraction map of the organs present.
        bone: (bz, by, bx) bool bone nodes (outside the organs, small parts dropped).
    """

    grid: Geometry
    pts: F32
    frac: dict[int, F32]
    bone: Mask


def build_anatomy(
    ct: Volume, lab: npt.NDArray[Any], grid: Geometry, setup: sitk.AffineTransform
) -> Anatomy:
    """Carry the planning organs and bones onto the box `grid` by the setup ``S`` (I -> P).

    Args:
        ct: the planning CT, HU (nz, ny, nx).
        lab: (nz, ny, nx) planning label map.
        grid: the box grid in frame I.
        setup: the rigid setup ``S`` (intermediate -> planning points).

    Returns:
        The anatomy: organ fractions (block-averaged masks at ``S(q)``) and bone nodes.
    """
    g = ct.geometry
    counts = np.bincount(lab.reshape(-1), minlength=256)
    frac = {
        int(k): fraction_on_grid(lab == k, g, grid, setup, pad=2)
        for k in (BLADDER, RECTUM, SEMINAL_VESICLES, PROSTATE)
        if counts[k] > 0
    }
    # bone candidates on the planning region the box grid maps to
    corners = np.array([setup.TransformPoint(tuple(float(v) for v in c)) for c in grid.corners()])
    region = index_box_of_lps(corners.min(axis=0) - 6.0, corners.max(axis=0) + 6.0, g)
    bone = np.zeros(grid.shape, bool)
    if region is not None:
        cand = (ct.array[region] > BONE_HU) & (lab[region] == 0)
        if cand.any():
            img = block_average(
                cand, crop_geometry(g, region), full_box(cand.shape), grid.spacing[0]
            )
            organs = np.zeros(grid.shape, np.float32)
            for f in frac.values():
                organs += f
            bone = (resample_linear(img, grid, setup) >= 0.3) & (organs < 0.5)
            bone = components_above(bone, float(np.prod(grid.spacing)), MIN_BONE_MM3)
    pts = grid.voxel_centres().astype(np.float32)
    return Anatomy(grid=grid, pts=pts, frac=frac, bone=bone)


def organ_mask(frac: F32 | None) -> Mask | None:
    """Nodes at least half inside an organ (its most covered nodes for a tiny organ).

    Args:
        frac: (bz, by, bx) fraction map, or None for an absent organ.

    Returns:
        (bz, by, bx) bool mask, or None for an absent organ (or one covering 5 % of a node at most).
    """
    if frac is None or float(frac.max()) <= 0.05:
        return None
    mask = frac >= 0.5
    return mask if mask.any() else np.asarray(frac >= 0.5 * float(frac.max()), bool)


# ------------------------------------------------------------------------------ pieces
@dataclass(eq=False)
class Pieces:
    """The push field's pieces on the box grid (frame I), before amplitudes.

    Attributes:
        bladder: (bz, by, bx, 3) unit bladder field ``A`` (s = 1), mm; None without a bladder.
        bladder_frac: (bz, by, bx) bladder fraction map.
        bladder_box: index box of the bladder's nodes (+2), where its volume ratio is measured.
        base_point: (3,) bladder base ``b0``, LPS mm.
        dome_direction: (3,) unit vector from ``b0`` to the bladder centroid.
        rectum: (bz, by, bx, 3) rectal push ``Q`` for a = 1 mm; None without a rectum.
        rectum_centre: (3,) centre ``c_r`` of the rectal push, LPS mm.
        rectum_core_mm: core radius ``r_c`` of the rectal push, mm.
        zone: (bz, by, bx) ``P``: 1 on the glands dilated by 3 mm, 0 beyond 9 mm; None without
            glands.
        zone_weight: (bz, by, bx) ``W_p = max(W, 1 on the glands)``.
        gland_centre: (3,) centroid ``c_p`` of the prostate (else the seminal vesicles), LPS mm.
        weight: (bz, by, bx) ``W``: bone weight of the non-rigid pieces.
    """

    bladder: F32 | None
    bladder_frac: F32 | None
    bladder_box: Box | None
    base_point: F64 | None
    dome_direction: F64 | None
    rectum: F32 | None
    rectum_centre: F64 | None
    rectum_core_mm: float
    zone: F32 | None
    zone_weight: F32 | None
    gland_centre: F64 | None
    weight: F32


def bladder_field(an: Anatomy, fb: F32) -> tuple[F32, F64, F64, Mask] | None:
    """The unit dome field ``A``, base point ``b0``, dome direction and the bladder node mask.

    ``A = (q - b0) g(q)`` inside and on the bladder (``g = 0.35 + 0.65 max(0, cos)^1.5`` of the
    angle to the dome direction), continued outside by the nearest wall node's value times
    ``exp(-dist / BLADDER_DECAY_MM)``, smoothed by a one-node Gaussian and tapered to zero
    between `BLADDER_TAPER_MM`.

    Args:
        an: the anatomy in frame I.
        fb: (bz, by, bx) bladder fraction map.

    Returns:
        ((bz, by, bx, 3) float32 A in mm, (3,) b0 LPS mm, (3,) unit dome direction,
        (bz, by, bx) bool bladder nodes), or None for a bladder too small to have nodes.
    """
    inside = organ_mask(fb)
    if inside is None:
        return None
    step = float(an.grid.spacing[0])
    pts = an.pts
    cand = pts[inside].astype(float)
    prostate = organ_mask(an.frac.get(PROSTATE))
    if prostate is not None:
        dist = ndimage.distance_transform_edt(~prostate, sampling=step)[inside]
        centre = weighted_centroid(an.frac[PROSTATE], grid=an.grid)
        key = dist + 1e-3 * np.linalg.norm(cand - centre, axis=1)
        b0 = cand[int(np.argmin(key))]
    else:  # most inferior-posterior bladder node: largest y - z
        b0 = cand[int(np.argmax(cand[:, 1] - cand[:, 2]))]
    direction = weighted_centroid(fb * inside, grid=an.grid) - b0
    norm = float(np.linalg.norm(direction))
    direction = direction / norm if norm > 1e-6 else np.array([0.0, 0.0, 1.0])
    rel = pts - b0.astype(np.float32)
    length = np.sqrt((rel**2).sum(axis=-1))
    cos = (rel @ direction.astype(np.float32)) / np.maximum(length, 1e-6)
    g = 0.35 + 0.65 * np.maximum(cos, 0.0) ** 1.5
    wall = rel * g[..., None]  # (q - b0) g(q), valid inside and on the bladder
    dist, idx = ndimage.distance_transform_edt(~inside, sampling=step, return_indices=True)
    field = wall[idx[0], idx[1], idx[2]] * np.exp(-dist / BLADDER_DECAY_MM)[..., None]
    del wall, idx
    for c in range(3):
        field[..., c] = ndimage.gaussian_filter(field[..., c], 1.0, mode="nearest")
    t0, t1 = BLADDER_TAPER_MM
    field *= (1.0 - smoothstep((dist - t0) / (t1 - t0)))[..., None]
    return np.asarray(field, np.float32), np.asarray(b0, float), direction, inside


def rectum_field(
    an: Anatomy, position: float, sigma: float, amplitude: float
) -> tuple[F32, F64, float] | None:
    """The unit rectal push ``Q`` (for a = 1 mm), its centre and core radius.

    Args:
        an: the anatomy in frame I.
        position: 0..1 position of the centre within the middle 60 % of the rectum's z extent.
        sigma: Gaussian width of the push, mm (faded to zero between 3 and 4 sigma).
        amplitude: the push's amplitude ``a``, mm (sets the core radius).

    Returns:
        ((bz, by, bx, 3) float32 Q in mm, (3,) centre LPS mm, core radius mm), or None without a
        rectum.
    """
    fr = an.frac.get(RECTUM)
    if fr is None or float(fr.sum()) < 1.0:
        return None
    per = fr.sum(axis=(1, 2))
    ks = np.flatnonzero(per > 0.05 * per.max())
    z = an.pts[:, 0, 0, 2].astype(float)
    cx = (fr * an.pts[..., 0]).sum(axis=(1, 2)) / np.maximum(per, 1e-9)
    cy = (fr * an.pts[..., 1]).sum(axis=(1, 2)) / np.maximum(per, 1e-9)
    z0, z1 = z[ks[0]], z[ks[-1]]
    zc = z0 + (0.2 + 0.6 * position) * (z1 - z0)
    centre = np.array([np.interp(zc, z[ks], cx[ks]), np.interp(zc, z[ks], cy[ks]), zc])
    core = max(6.0, 1.5 * amplitude) if amplitude >= 0 else max(6.0, 3.0 * abs(amplitude))
    rel = an.pts - centre.astype(np.float32)
    r2 = (rel**2).sum(axis=-1)
    r = np.sqrt(r2)
    profile = np.exp(-r2 / (2.0 * sigma**2)) / np.sqrt(r2 + core**2)
    profile *= 1.0 - smoothstep((r - 3.0 * sigma) / sigma)
    return np.asarray(rel * profile[..., None], np.float32), centre, core


def build_pieces(
    an: Anatomy, rectum_position: float, rectum_sigma_mm: float, rectum_amplitude_mm: float
) -> Pieces:
    """Every piece of the push field on the box grid (frame I).

    Args:
        an: the anatomy in frame I.
        rectum_position: 0..1 position of the rectal push (`rectum_field`).
        rectum_sigma_mm: its Gaussian width, mm.
        rectum_amplitude_mm: its amplitude (after `strength`), mm (sets the core radius).

    Returns:
        The pieces (None for those of absent organs).
    """
    step = float(an.grid.spacing[0])
    if an.bone.any():
        dist = ndimage.distance_transform_edt(~an.bone, sampling=step)
        weight = smoothstep(dist / BONE_BLEND_MM)
    else:
        weight = np.ones(an.grid.shape, np.float32)
    bladder = base = direction = fb = bbox = None
    if BLADDER in an.frac:
        made = bladder_field(an, an.frac[BLADDER])
        if made is not None:
            bladder, base, direction, inside = made
            fb = an.frac[BLADDER]
            bbox = index_box(inside | (fb > 0.0), 2)
    rectum = rcentre = None
    core = 0.0
    rmade = rectum_field(an, rectum_position, rectum_sigma_mm, rectum_amplitude_mm)
    if rmade is not None:
        rectum, rcentre, core = rmade
    zone = zweight = gcentre = None
    gland_frac = [an.frac[k] for k in (PROSTATE, SEMINAL_VESICLES) if k in an.frac]
    glands = organ_mask(np.clip(sum(gland_frac), 0.0, 1.0)) if gland_frac else None
    if glands is not None:
        dist = ndimage.distance_transform_edt(~glands, sampling=step)
        zone = 1.0 - smoothstep((dist - PROSTATE_MARGIN_MM) / PROSTATE_BLEND_MM)
        zweight = np.maximum(weight, 1.0 - smoothstep(dist / PROSTATE_MARGIN_MM))
        source = an.frac[PROSTATE] if PROSTATE in an.frac else an.frac[SEMINAL_VESICLES]
        gcentre = weighted_centroid(source, grid=an.grid)
    return Pieces(
        bladder=bladder,
        bladder_frac=fb,
        bladder_box=bbox,
        base_point=base,
        dome_direction=direction,
        rectum=rectum,
        rectum_centre=rcentre,
        rectum_core_mm=core,
        zone=zone,
        zone_weight=zweight,
        gland_centre=gcentre,
        weight=weight,
    )


def _rot_x(deg: float) -> F64:
    a = np.deg2rad(deg)
    return np.array([[1.0, 0.0, 0.0], [0.0, np.cos(a), -np.sin(a)], [0.0, np.sin(a), np.cos(a)]])


def gland_push(pc: Pieces, pts: F32, pitch_deg: float, t: F64) -> F32:
    """The rigid push ``(Rx(pitch) - I)(q - c_p) + t`` of the glands (zeros without glands).

    Args:
        pc: the pieces (for the gland centre ``c_p``).
        pts: (bz, by, bx, 3) float32 LPS node positions, mm.
        pitch_deg: rotation about the LPS x axis (left-right), degrees.
        t: (3,) translation, mm.

    Returns:
        (bz, by, bx, 3) float32 push, mm.
    """
    if pc.gland_centre is None:
        return np.zeros(pts.shape, np.float32)
    m = (_rot_x(pitch_deg) - np.eye(3)).astype(np.float32)
    return np.asarray((pts - pc.gland_centre.astype(np.float32)) @ m.T + t.astype(np.float32))
