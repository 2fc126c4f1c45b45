"""Dense displacement vector fields (DVFs): conversion, warping, composition, Jacobians.

Convention (DESIGN.md, never drifts): a DVF is a `Volume` of shape ``(nz, ny, nx, 3)``, float32,
holding displacements in mm with components ``(x, y, z)`` in LPS, defined on the *fixed* (daily)
grid, "pull": the fixed point ``p`` corresponds to the moving point ``p + u(p)``. Warping a moving
image with a DVF therefore gives ``warped(p) = moving(p + u(p))``, which is exactly what
SimpleITK's ``Resample`` does with the `sitk.DisplacementFieldTransform` built by `dvf_to_sitk`.

Every function that warps (images, label maps, masks) goes through `warp`, so that the phantom's
ground truth, the pipeline and the metrics all use one definition of "warped by the DVF".
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from scipy import ndimage

from jrs.core.errors import GeometryMismatch, InvalidInput
from jrs.core.geometry import Geometry, Volume, reorient

WarpInterpolator = Literal["linear", "bspline", "nearest", "label"]


def _check_dvf(dvf: Volume) -> None:
    if dvf.array.ndim != 4 or dvf.array.shape[-1] != 3:
        raise InvalidInput(
            f"a DVF must have shape (nz, ny, nx, 3) (mm, LPS x/y/z components), got "
            f"{dvf.array.shape}"
        )


def dvf_to_sitk(dvf: Volume) -> sitk.DisplacementFieldTransform:
    """A SimpleITK transform mapping fixed points ``p`` to ``p + u(p)`` (linear interpolation).

    ``sitk.Resample(moving, reference, dvf_to_sitk(dvf), ...)`` samples ``moving(p + u(p))``; the
    displacement is zero outside the DVF's grid.

    Args:
        dvf: (nz, ny, nx, 3) displacement field in mm (LPS components).

    Returns:
        A new transform (it owns a float64 copy of the field).
    """
    _check_dvf(dvf)
    image = sitk.GetImageFromArray(np.asarray(dvf.array, dtype=np.float64), isVector=True)
    dvf.geometry.apply_to_sitk(image)
    return sitk.DisplacementFieldTransform(image)


def warp(
    moving: Volume,
    dvf: Volume,
    interpolator: WarpInterpolator = "linear",
    default_value: float = 0.0,
    *,
    transform: sitk.Transform | None = None,
) -> Volume:
    """Warp a volume with a pull DVF: ``out(p) = moving(p + u(p))`` on the DVF's grid.

    Args:
        moving: the volume to warp (scalar or vector), on any grid.
        dvf: (nz, ny, nx, 3) pull displacement field in mm, on the output (fixed) grid.
        interpolator: ``linear``, ``bspline``, ``nearest`` or ``label`` (integer label maps: each
            label is interpolated linearly as a one-hot channel and the arg-max wins).
        default_value: value where ``p + u(p)`` falls outside `moving` (e.g. -1000 HU, label 0).
        transform: ``dvf_to_sitk(dvf)`` when the caller already has it (saves a conversion when
            warping several volumes with one large DVF).

    Returns:
        The warped volume on ``dvf.geometry`` (frame of reference of the DVF's grid); dtype kept
        for ``nearest``/``label``, float32 otherwise.
    """
    _check_dvf(dvf)
    tx = transform if transform is not None else dvf_to_sitk(dvf)
    out = moving.resample(dvf.geometry, interpolator, default_value=default_value, transform=tx)
    return Volume(out.array, dvf.geometry)


def warp_mask(
    mask: Volume,
    dvf: Volume,
    threshold: float = 0.5,
    *,
    transform: sitk.Transform | None = None,
) -> Volume:
    """Warp a binary mask: linear interpolation of the 0/1 mask, then ``>= threshold``.

    Args:
        mask: (nz, ny, nx) mask (non-zero inside), on any grid.
        dvf: (nz, ny, nx, 3) pull displacement field in mm, on the output grid.
        threshold: fraction of "inside" at which a warped voxel counts as inside.
        transform: ``dvf_to_sitk(dvf)`` when the caller already has it.

    Returns:
        A boolean (nz, ny, nx) volume on ``dvf.geometry``.
    """
    as_float = mask.with_array((np.asarray(mask.array) != 0).astype(np.float32))
    warped = warp(as_float, dvf, "linear", 0.0, transform=transform)
    return warped.with_array(warped.array >= threshold)


def affine_to_dvf(transform: sitk.Transform, reference: Geometry) -> Volume:
    """A SimpleITK transform (Euler, affine, ...) as a dense pull DVF ``u(p) = T(p) - p``.

    Args:
        transform: maps points of the reference (fixed) grid to moving points, mm.
        reference: the grid the DVF lives on.

    Returns:
        (nz, ny, nx, 3) float32 DVF in mm on `reference`.
    """
    field = sitk.TransformToDisplacementField(
        transform,
        sitk.sitkVectorFloat64,
        list(reference.size_xyz),
        tuple(float(v) for v in reference.origin),
        tuple(float(v) for v in reference.spacing),
        tuple(float(v) for v in reference.direction.reshape(-1)),
    )
    return Volume(sitk.GetArrayFromImage(field).astype(np.float32), reference)


def compose(first: Volume, second: Volume) -> Volume:
    """Compose two pull DVFs: follow `first`, then `second`.

    The result maps ``p -> p + u1(p) + u2(p + u1(p))`` (``u2`` interpolated linearly, zero outside
    its grid); e.g. ``first`` from the daily to an intermediate scan and ``second`` from that scan
    to the planning scan give the daily -> planning field.

    Args:
        first: (nz, ny, nx, 3) DVF in mm on the output grid.
        second: (mz, my, mx, 3) DVF in mm on the intermediate grid.

    Returns:
        (nz, ny, nx, 3) float32 DVF on ``first.geometry``.
    """
    _check_dvf(second)
    moved = warp(Volume(second.array.astype(np.float32), second.geometry), first, "linear", 0.0)
    return Volume((first.array + moved.array).astype(np.float32), first.geometry)


def _axis_aligned(direction: npt.NDArray[np.float64]) -> bool:
    return bool(np.allclose(np.abs(direction).sum(axis=0), 1.0, atol=1e-6))


def jacobian_determinant(dvf: Volume) -> npt.NDArray[np.float32]:
    """Determinant of the Jacobian of ``x -> x + u(x)`` (physical mm derivatives).

    Uses SimpleITK's ``DisplacementFieldJacobianDeterminant`` (central differences, image
    spacing) on the field re-stored with the identity direction, so that derivatives are taken
    along the LPS axes whatever the storage orientation (HFS, FFP, ...); an oblique grid falls back
    to numpy central differences.

    Args:
        dvf: (nz, ny, nx, 3) displacement field in mm (LPS components).

    Returns:
        (nz, ny, nx) float32 determinants on ``dvf.geometry`` (> 0 everywhere for an invertible,
        non-folding field; 1 for a translation).
    """
    _check_dvf(dvf)
    g = dvf.geometry
    if _axis_aligned(g.direction):
        lps = reorient(dvf, np.eye(3))
        image = sitk.GetImageFromArray(np.asarray(lps.array, dtype=np.float32), isVector=True)
        lps.geometry.apply_to_sitk(image)
        det = sitk.DisplacementFieldJacobianDeterminant(image, True)
        out = Volume(sitk.GetArrayFromImage(det).astype(np.float32), lps.geometry)
        return reorient(out, g.direction).array
    # oblique grid: derivative along index axes, then chain rule to LPS axes
    u = np.asarray(dvf.array, dtype=np.float64)
    grads = np.empty((*u.shape[:3], 3, 3))
    for c in range(3):  # component
        for a in range(3):  # index axis (i, j, k) lives on array dim 2 - a
            grads[..., c, a] = np.gradient(u[..., c], g.spacing[a], axis=2 - a)
    jac = grads @ g.direction.T + np.eye(3)
    return np.linalg.det(jac).astype(np.float32)


def sample_dvf(dvf: Volume, points: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Displacements at arbitrary LPS points, by trilinear interpolation (border clamped).

    Args:
        dvf: (nz, ny, nx, 3) displacement field in mm.
        points: (N, 3) LPS points in mm.

    Returns:
        (N, 3) displacements in mm (x, y, z components).
    """
    _check_dvf(dvf)
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    ijk = dvf.geometry.physical_to_index(pts)
    coords = ijk[:, ::-1].T  # (k, j, i) rows for (z, y, x) arrays
    out = np.empty((pts.shape[0], 3))
    for c in range(3):
        out[:, c] = ndimage.map_coordinates(
            np.asarray(dvf.array[..., c], dtype=np.float64), coords, order=1, mode="nearest"
        )
    return out


def require_dvf_on(dvf: Volume, reference: Geometry, what: str = "DVF") -> None:
    """Raise `GeometryMismatch` unless `dvf` is a 3-component field on `reference`.

    Args:
        dvf: the field to check.
        reference: the grid it must live on (e.g. the daily CT's).
        what: name used in the message.
    """
    _check_dvf(dvf)
    if not dvf.geometry.same_grid(reference):
        raise GeometryMismatch(
            f"{what} is not on the expected grid: shape {dvf.geometry.shape} vs "
            f"{reference.shape}, origin {dvf.geometry.origin.round(3).tolist()} vs "
            f"{reference.origin.round(3).tolist()}"
        )
