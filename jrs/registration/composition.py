"""Field composition: the network's box field, the pre-alignment and the far field as one mapping.

The output DVF (pull, mm, LPS) on its grid, the dense field of a transform, the taper of the box
field towards the box's faces.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from jrs.core.geometry import Geometry, Volume
from jrs.registration.boxes import index_box
from jrs.registration.far_field import FarField

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


TAPER_MM = 10.0


def dvf_grid(daily: Geometry, spacing_mm: float | None) -> Geometry:
    """The grid the DVF is written on: over the daily CT with ``spacing_mm``, or the CT's own.

    The grid has the daily CT's orientation and covers its voxel centres (it overhangs by less
    than one spacing, evenly on both sides); an axis whose CT spacing is already at least
    ``spacing_mm`` keeps the CT's spacing and samples.

    Args:
        daily: the daily CT grid.
        spacing_mm: target spacing, mm; ``None`` or 0 for the daily grid itself.

    Returns:
        The DVF grid (frame of reference of the daily CT).
    """
    if spacing_mm is None or spacing_mm <= 0:
        return daily
    native = np.asarray(daily.spacing, float)
    spacing = np.maximum(native, float(spacing_mm))
    n = np.asarray(daily.size_xyz, int)
    extent = (n - 1) * native
    coarse = spacing > native
    m = np.where(coarse, np.ceil(extent / spacing - 1e-6).astype(int) + 1, n)
    overhang = np.where(coarse, ((m - 1) * spacing - extent) / 2.0, 0.0)
    origin = daily.origin - daily.direction @ overhang
    return Geometry(
        (int(m[2]), int(m[1]), int(m[0])),
        origin,
        spacing,
        daily.direction,
        daily.frame_of_reference_uid,
    )


def box_field(prealign: sitk.AffineTransform, u: npt.NDArray[np.float32], grid: Geometry) -> Volume:
    """``A(p + u(p)) - p`` on a grid, computed directly (equals `dense_field` of the composite).

    Args:
        prealign: the affine ``A`` (daily point -> planning point).
        u: (nz, ny, nx, 3) displacement on ``grid``, mm, LPS components.
        grid: the grid of ``u``.

    Returns:
        (nz, ny, nx, 3) float32 field, mm.
    """
    m = np.asarray(prealign.GetMatrix(), float).reshape(3, 3)
    c = np.asarray(prealign.GetCenter(), float)
    t = np.asarray(prealign.GetTranslation(), float)
    # A(p + u) - p = (M - I) p + M u + (c + t - M c); p = origin + D S idx
    a = grid.direction * grid.spacing[None, :]
    lin = (m - np.eye(3)) @ a  # per index step
    const = (m - np.eye(3)) @ grid.origin + c + t - m @ c
    nz, ny, nx = grid.shape
    out = np.einsum("zyxc,dc->zyxd", u, m.astype(np.float32), optimize=True).astype(np.float32)
    out += (np.arange(nx, dtype=np.float32)[:, None] * lin[:, 0].astype(np.float32))[None, None]
    out += (np.arange(ny, dtype=np.float32)[:, None] * lin[:, 1].astype(np.float32))[None, :, None]
    out += (np.arange(nz, dtype=np.float32)[:, None] * lin[:, 2].astype(np.float32))[:, None, None]
    out += const.astype(np.float32)
    return Volume(out, grid)


def taper(grid: Geometry, width_mm: float = TAPER_MM) -> npt.NDArray[np.float32]:
    """(nz, ny, nx) weights: 1 inside, smoothly 0 at the grid's faces (cosine ramp)."""
    weights = np.ones(grid.shape, np.float32)
    for axis in range(3):
        n = grid.shape[axis]
        spacing = float(grid.spacing[2 - axis])
        d = np.minimum(np.arange(n), np.arange(n)[::-1]) * spacing
        ramp = np.clip(d / width_mm, 0.0, 1.0)
        ramp = (0.5 - 0.5 * np.cos(np.pi * ramp)).astype(np.float32)
        shape = [1, 1, 1]
        shape[axis] = n
        weights *= ramp.reshape(shape)
    return weights


def composed_field(
    prealign: sitk.AffineTransform,
    u_box: Volume,
    reference: Geometry,
    slab: int = 16,
    far: FarField | None = None,
) -> Volume:
    """``A(p + u(p) + h(p)) - p`` on any grid, ``u`` interpolated trilinearly (0 outside its grid).

    The same field as ``dense_field(full_transform(prealign, u_box), reference)``, computed
    with numpy: the affine part is linear in the grid index, and ``u`` is interpolated only at
    the points that fall inside its own (network box) grid.

    Args:
        prealign: the affine ``A`` (daily point -> planning point).
        u_box: (nz, ny, nx, 3) displacement (mm, LPS) on its grid; zero at its faces (tapered).
        reference: the output grid.
        slab: output slices computed at a time (bounds the memory).
        far: the far-field correction ``h`` (`jrs.registration.far_field.FarField`, zero on the
            network
            box); None: ``h = 0``.

    Returns:
        (nz, ny, nx, 3) float32 field on ``reference``, mm.
    """
    from scipy import ndimage

    m = np.asarray(prealign.GetMatrix(), float).reshape(3, 3)
    c = np.asarray(prealign.GetCenter(), float)
    t = np.asarray(prealign.GetTranslation(), float)
    step = reference.direction * reference.spacing[None, :]  # LPS step per (i, j, k) index
    lin = (m - np.eye(3)) @ step
    const = (m - np.eye(3)) @ reference.origin + c + t - m @ c
    nz, ny, nx = reference.shape
    out = np.empty((nz, ny, nx, 3), np.float32)
    plane = (
        np.arange(nx, dtype=np.float64)[None, :, None] * lin[:, 0]
        + np.arange(ny, dtype=np.float64)[:, None, None] * lin[:, 1]
        + const
    )  # (ny, nx, 3)
    for k in range(nz):
        out[k] = plane + k * lin[:, 2]
    if far is not None and not far.is_identity():
        col, row = np.meshgrid(np.arange(nx, dtype=np.float64), np.arange(ny, dtype=np.float64))
        for k in range(nz):
            pts = reference.index_to_physical(np.stack([col, row, np.full_like(col, k)], axis=-1))
            out[k] += (far.correction(pts) @ m.T).astype(np.float32)
    inner = index_box(reference, u_box.geometry.corners(), 0.0)
    if inner is None:
        return Volume(out, reference)
    box_grid = u_box.geometry
    size = np.asarray(box_grid.size_xyz, float)
    channels = [np.asarray(u_box.array[..., a], np.float32) for a in range(3)]
    for k0 in range(inner[0].start, inner[0].stop, slab):
        k1 = min(k0 + slab, inner[0].stop)
        kk, jj, ii = np.meshgrid(
            np.arange(k0, k1, dtype=np.float64),
            np.arange(inner[1].start, inner[1].stop, dtype=np.float64),
            np.arange(inner[2].start, inner[2].stop, dtype=np.float64),
            indexing="ij",
        )
        pts = reference.index_to_physical(np.stack([ii, jj, kk], axis=-1))
        idx = box_grid.physical_to_index(pts)  # (i, j, k) in the box grid
        keep = np.all((idx >= 0.0) & (idx <= size - 1.0), axis=-1)
        if not keep.any():
            continue
        coords = idx[keep][:, ::-1].T  # (k, j, i) rows
        v = np.stack(
            [ndimage.map_coordinates(ch, coords, order=1, mode="nearest") for ch in channels],
            axis=-1,
        )
        region = out[k0:k1, inner[1], inner[2]]
        region[keep] += (v @ m.T).astype(np.float32)
        out[k0:k1, inner[1], inner[2]] = region
    return Volume(out, reference)


def full_transform(
    prealign: sitk.Transform, dvf_grid: Volume | None, far: sitk.Transform | None = None
) -> sitk.Transform:
    """Daily point -> planning point: ``A(q + h(q))``, ``q = p + u(p)`` (``u`` = 0 off its grid).

    ``h`` (the far-field correction, zero on the network box) is applied after ``u``; since
    ``u`` is zero outside the box and ``h`` zero on it, this is ``A(p + u(p) + h(p))`` up to
    ``h`` within ``|u|`` of the box's faces, where both are tapered to near zero.
    """
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(prealign)
    if far is not None:
        composite.AddTransform(far)
    if dvf_grid is not None:
        image = sitk.GetImageFromArray(dvf_grid.array.astype(np.float64), isVector=True)
        dvf_grid.geometry.apply_to_sitk(image)
        composite.AddTransform(sitk.DisplacementFieldTransform(image))
    return composite


def dense_field(transform: sitk.Transform, reference: Geometry, slab: int = 16) -> Volume:
    """``T(p) - p`` on a grid, float32, computed a slab of slices at a time to bound memory.

    Args:
        transform: daily point -> planning point.
        reference: the output grid.
        slab: slices per chunk.

    Returns:
        (nz, ny, nx, 3) float32 DVF, mm.
    """
    out = np.empty((*reference.shape, 3), np.float32)
    for k0 in range(0, reference.shape[0], slab):
        k1 = min(k0 + slab, reference.shape[0])
        origin = reference.index_to_physical([0.0, 0.0, float(k0)])
        sub = Geometry(
            (k1 - k0, reference.shape[1], reference.shape[2]),
            origin,
            reference.spacing,
            reference.direction,
        )
        field_img = sitk.TransformToDisplacementField(
            transform,
            sitk.sitkVectorFloat64,
            list(sub.size_xyz),
            tuple(float(v) for v in sub.origin),
            tuple(float(v) for v in sub.spacing),
            tuple(float(v) for v in sub.direction.reshape(-1)),
        )
        out[k0:k1] = sitk.GetArrayViewFromImage(field_img)
    return Volume(out, reference.with_frame(reference.frame_of_reference_uid))
