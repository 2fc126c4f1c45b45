"""Index boxes, LPS boxes and LPS-aligned grids shared by the deformation engines.

The organ engine (`jrs.synth.engine`) and the dome engine (`jrs.synth.dome_engine`) build
their fields on LPS-aligned coarse grids, carry planning masks onto them as block-averaged
fractions, and warp planning arrays on bounding boxes only. These are the helpers they share:

* **index boxes** (`Box`): ``(z, y, x)`` slice triples of a (nz, ny, nx) array: `index_box`,
  `full_box`, `box_size`, `intersect_boxes`, `crop_geometry`, `crop_volume`;
* **LPS boxes**: axis-aligned ``[lo, hi]`` boxes in patient space (mm): `lps_bounds`,
  `lps_box_corners`, `index_box_of_lps`;
* **coarse grids**: LPS-aligned grids of isotropic spacing on a fixed lattice: `lattice_grid`,
  `cover_grid`;
* **weights and fractions on grids**: `smoothstep`, `weighted_centroid`, `components_above`,
  `block_average`, `resample_linear`, `fraction_on_grid`;
* **resampling on boxes**: `resample_split` (the rigid setup outside the non-rigid box, the
  coarse displacement transform inside it) and `resample_component`.

Conventions (DESIGN.md): LPS mm, arrays (z, y, x), index triples (i, j, k) = (x, y, z). This
module imports nothing from the engines.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from scipy import ndimage

from jrs.core.geometry import Geometry, Volume

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]
#: an index box of a (nz, ny, nx) array: (z slice, y slice, x slice), steps of 1.
Box = tuple[slice, slice, slice]


# ------------------------------------------------------------------------------ index boxes
def index_box(mask: npt.NDArray[Any], pad: int) -> Box | None:
    """Index box of the non-zero voxels of a 3-D array, grown by `pad` voxels.

    Args:
        mask: (nz, ny, nx) array; non-zero voxels count.
        pad: voxels added on each side (clipped to the array).

    Returns:
        The (z, y, x) box, or None when `mask` has no non-zero voxel.
    """
    nz = mask.shape[0]
    zs = np.flatnonzero(np.any(np.reshape(mask, (nz, -1)), axis=1))
    if zs.size == 0:
        return None
    plane = np.any(mask[zs[0] : zs[-1] + 1], axis=0)
    ys = np.flatnonzero(np.any(plane, axis=1))
    xs = np.flatnonzero(np.any(plane, axis=0))
    spans = [
        slice(max(int(i[0]) - pad, 0), min(int(i[-1]) + pad + 1, n))
        for i, n in zip((zs, ys, xs), mask.shape, strict=True)
    ]
    return spans[0], spans[1], spans[2]


def full_box(shape: tuple[int, ...]) -> Box:
    """The index box of a whole (nz, ny, nx) array of `shape` (extra trailing axes ignored)."""
    return slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2])


def box_size(box: Box) -> int:
    """Number of voxels of an index box."""
    return int(np.prod([sl.stop - sl.start for sl in box]))


def intersect_boxes(a: Box, b: Box | None) -> Box | None:
    """The common part of two index boxes (None when `b` is None or they do not overlap)."""
    if b is None:
        return None
    out = [slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(a, b, strict=True)]
    if any(sl.stop <= sl.start for sl in out):
        return None
    return out[0], out[1], out[2]


def crop_geometry(g: Geometry, box: Box) -> Geometry:
    """The grid of the `box` crop of `g` (same spacing, direction and frame of reference).

    Args:
        g: the full grid.
        box: (z, y, x) index box of `g`.

    Returns:
        The sub-grid: shape of the box, origin at the LPS centre (mm) of its first voxel.
    """
    return Geometry(
        shape=(box[0].stop - box[0].start, box[1].stop - box[1].start, box[2].stop - box[2].start),
        origin=g.index_to_physical([box[2].start, box[1].start, box[0].start]),
        spacing=g.spacing,
        direction=g.direction,
        frame_of_reference_uid=g.frame_of_reference_uid,
    )


def crop_volume(volume: Volume, box: Box) -> Volume:
    """The `box` crop of a volume on its sub-grid (the array is a view, not a copy)."""
    return Volume(volume.array[box], crop_geometry(volume.geometry, box))


# ------------------------------------------------------------------------------ LPS boxes
def lps_bounds(g: Geometry, box: Box | None = None) -> tuple[F64, F64]:
    """LPS axis-aligned bounds of the voxel centres of a grid (or of an index box of it).

    Args:
        g: the grid (any direction).
        box: optional (z, y, x) index box of `g`; the whole grid when None.

    Returns:
        (lo (3,), hi (3,)) LPS mm: the min and max of the 8 corner voxel centres.
    """
    corners = (g if box is None else crop_geometry(g, box)).corners()
    return corners.min(axis=0), corners.max(axis=0)


def lps_box_corners(lo: F64, hi: F64) -> F64:
    """The 8 corners of the LPS box [lo, hi], (8, 3) mm, x slowest and z fastest."""
    return np.array(
        [[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
    )


def index_box_of_lps(lo: F64, hi: F64, g: Geometry) -> Box | None:
    """Index box of grid `g` covering the LPS box [lo, hi].

    Args:
        lo: (3,) LPS lower corner, mm.
        hi: (3,) LPS upper corner, mm.
        g: the grid (any direction: the box's 8 corners are mapped to indices).

    Returns:
        The (z, y, x) box of the voxels between the floor and the ceiling of the corners'
        indices, clipped to the grid, or None when the two do not overlap.
    """
    ijk = g.physical_to_index(lps_box_corners(lo, hi))
    first = np.floor(ijk.min(axis=0)).astype(int)
    last = np.ceil(ijk.max(axis=0)).astype(int)
    size = np.asarray(g.size_xyz)
    if np.any(last < 0) or np.any(first > size - 1):
        return None
    first = np.clip(first, 0, size - 1)
    last = np.clip(last, 0, size - 1)
    return (
        slice(int(first[2]), int(last[2]) + 1),
        slice(int(first[1]), int(last[1]) + 1),
        slice(int(first[0]), int(last[0]) + 1),
    )


# ------------------------------------------------------------------------------ coarse grids
def lattice_grid(
    lo: F64, hi: F64, anchor: F64, step: float
) -> tuple[npt.NDArray[np.int64], Geometry]:
    """The LPS-aligned grid of the lattice ``anchor + step * n`` covering [lo, hi].

    Args:
        lo: (3,) LPS lower corner to cover, mm.
        hi: (3,) LPS upper corner to cover, mm.
        anchor: (3,) LPS position of the lattice node n = 0, mm.
        step: lattice spacing, mm (isotropic).

    Returns:
        (lattice index (x, y, z) of the grid's first node (3,) int64, the grid).
    """
    first = np.floor((lo - anchor) / step).astype(np.int64)
    last = np.ceil((hi - anchor) / step).astype(np.int64)
    n = last - first + 1
    grid = Geometry(
        (int(n[2]), int(n[1]), int(n[0])), origin=anchor + step * first, spacing=np.full(3, step)
    )
    return first, grid


def cover_grid(g: Geometry, step: float, margin: int = 2) -> tuple[npt.NDArray[np.int64], Geometry]:
    """An LPS-aligned grid of spacing `step` covering grid `g` with a `margin`-node border.

    Its first node is the lattice anchor: the lower LPS corner of `g`'s voxel centres minus
    ``margin * step`` (so its lattice index is 0).

    Args:
        g: the grid to cover (any direction).
        step: spacing of the cover grid, mm.
        margin: nodes added beyond `g`'s bounds on every side.

    Returns:
        (lattice index (x, y, z) of the first node, zeros (3,) int64, the cover grid).
    """
    corners = g.corners()
    anchor = corners.min(axis=0) - margin * step
    return lattice_grid(anchor, corners.max(axis=0) + margin * step, anchor, step)


# ------------------------------------------------------------------------------ weights
def smoothstep(x: npt.NDArray[Any]) -> F32:
    """The cubic smoothstep ``3 y^2 - 2 y^3`` of ``y = clip(x, 0, 1)``, float32, same shape."""
    y = np.clip(x, 0.0, 1.0)
    return np.asarray(y * y * (3.0 - 2.0 * y), dtype=np.float32)


def weighted_centroid(
    weights: F32, *, grid: Geometry | None = None, points: F32 | None = None
) -> F64:
    """Weighted centroid (LPS mm) of a (z, y, x) weight map; give exactly one of grid / points.

    Args:
        weights: (nz, ny, nx) non-negative weights (fractions).
        grid: the weights' grid: the centroid of the voxel indices is computed per axis (from
            the weights' marginal sums) and mapped to LPS; the weights must not sum to 0.
        points: (nz, ny, nx, 3) LPS node positions, mm: the weighted mean of the points (0 for
            weights summing to 0).

    Returns:
        (3,) LPS centroid, mm.

    Raises:
        ValueError: not exactly one of `grid` and `points` given.
    """
    if (grid is None) == (points is None):
        raise ValueError("weighted_centroid takes exactly one of grid and points")
    if points is not None:
        s = float(weights.sum())
        flat = (points * weights[..., None]).reshape(-1, 3).sum(axis=0)
        return np.asarray(flat / max(s, 1e-9), float)
    assert grid is not None
    total = float(weights.sum())
    idx = [
        float((weights.sum(axis=tuple(b for b in range(3) if b != a)) * np.arange(n)).sum()) / total
        for a, n in enumerate(weights.shape)
    ]
    return np.asarray(grid.index_to_physical([idx[2], idx[1], idx[0]]), float)


def components_above(
    mask: Mask, voxel_mm3: float, min_mm3: float, *, connectivity: int = 26
) -> Mask:
    """The connected parts of `mask` of at least `min_mm3`.

    Args:
        mask: (nz, ny, nx) bool mask.
        voxel_mm3: volume of one voxel, mm^3.
        min_mm3: smallest volume kept, mm^3.
        connectivity: 26 (faces, edges and corners) or 6 (faces only) neighbours.

    Returns:
        (nz, ny, nx) bool mask of the kept parts (`mask` itself when it is empty).
    """
    structure = np.ones((3, 3, 3), bool) if connectivity == 26 else None
    lab, n = ndimage.label(mask, structure=structure)
    if n == 0:
        return mask
    sizes = np.bincount(lab.reshape(-1)) * voxel_mm3
    keep = sizes >= min_mm3
    keep[0] = False
    return np.asarray(keep[lab], bool)


def block_average(
    arr: npt.NDArray[Any], g: Geometry, box: Box, step: float, *, percent: bool = False
) -> sitk.Image:
    """The `box` crop of a 0/1 array block-averaged (``BinShrink``) to about `step` mm.

    Args:
        arr: (nz, ny, nx) 0/1 array (bool or numbers) on grid `g`.
        g: the array's grid.
        box: (z, y, x) index box of the crop.
        step: target block size, mm (the factor per axis is ``round(step / spacing)``, 1 to the
            box's size).
        percent: encode the fractions as uint8 percent (0..100, in 1 % steps) rather than
            float32 0..1.

    Returns:
        The block-averaged crop as a SimpleITK image placed in LPS (the crop itself when no
        axis shrinks).
    """
    if percent:
        img = sitk.GetImageFromArray(np.multiply(arr[box], 100, dtype=np.uint8))
    else:
        img = sitk.GetImageFromArray(np.ascontiguousarray(arr[box], dtype=np.float32))
    crop_geometry(g, box).apply_to_sitk(img)
    factors = [
        int(min(max(1, round(step / s)), n)) for s, n in zip(g.spacing, img.GetSize(), strict=True)
    ]
    return sitk.BinShrink(img, factors) if max(factors) > 1 else img


def resample_linear(img: sitk.Image, grid: Geometry, tx: sitk.Transform) -> F32:
    """Linear samples of `img` at ``tx(q)`` for every node ``q`` of `grid`, (z, y, x) float32.

    Outside the image the value is 0.
    """
    out = sitk.Resample(img, grid.reference_image(), tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return np.asarray(sitk.GetArrayFromImage(out), np.float32)


def fraction_on_grid(
    mask: npt.NDArray[Any],
    g: Geometry,
    grid: Geometry,
    tx: sitk.Transform,
    *,
    pad: int,
    percent: bool = False,
) -> F32:
    """Fraction of a mask around each node ``q`` of `grid`: the block-averaged mask at ``tx(q)``.

    The mask's bounding box (grown by `pad` voxels) is block-averaged to about the grid's
    spacing (`block_average`) and sampled linearly through `tx` (`resample_linear`).

    Args:
        mask: (nz, ny, nx) 0/1 mask on grid `g` (planning grid).
        g: the mask's grid.
        grid: the LPS-aligned target grid (isotropic spacing).
        tx: transform from `grid`'s points to `g`'s points (e.g. the rigid setup).
        pad: voxels added around the mask's bounding box.
        percent: block-average in uint8 percent (`block_average`), then divide by 100.

    Returns:
        (gz, gy, gx) float32 fractions in [0, 1] (zeros for an empty mask).
    """
    box = index_box(mask, pad)
    if box is None:
        return np.zeros(grid.shape, np.float32)
    img = block_average(mask, g, box, grid.spacing[0], percent=percent)
    out = resample_linear(img, grid, tx)
    if percent:
        return np.asarray(out / np.float32(100.0), dtype=np.float32)
    return out


# ------------------------------------------------------------------------------ resampling
def resample_split(
    moving: sitk.Image,
    grid: Geometry,
    box: Box,
    setup: sitk.Transform,
    field_tx: sitk.Transform,
    nonrigid: Box | None,
    default: float,
    pixel: int = sitk.sitkFloat32,
) -> npt.NDArray[Any]:
    """Linear resampling of `moving` on the `box` of `grid` by a pull field, split in two.

    The rigid `setup` is used outside the `nonrigid` index box (where the field is the setup
    alone) and `field_tx` (the coarse displacement transform) inside it: the values of warping
    with the dense field, without a full-size float64 field.

    Args:
        moving: the image to resample (planning frame), placed in LPS.
        grid: the target (daily) grid.
        box: (z, y, x) index box of `grid` to fill.
        setup: the rigid setup transform (daily -> planning points).
        field_tx: the full pull transform (daily -> planning points).
        nonrigid: index box of `grid` outside which the field equals the setup (None: nowhere).
        default: value outside `moving`.
        pixel: SimpleITK pixel type of the output.

    Returns:
        The resampled box, array of the box's shape (z, y, x) and `pixel` type.
    """
    geom = crop_geometry(grid, box)
    out = sitk.GetArrayFromImage(
        sitk.Resample(moving, geom.reference_image(), setup, sitk.sitkLinear, default, pixel)
    )
    inner = intersect_boxes(box, nonrigid)
    if inner is not None:
        rel = tuple(
            slice(a.start - b.start, a.stop - b.start) for a, b in zip(inner, box, strict=True)
        )
        sub = crop_geometry(grid, inner)
        out[rel] = sitk.GetArrayFromImage(
            sitk.Resample(moving, sub.reference_image(), field_tx, sitk.sitkLinear, default, pixel)
        )
    return out


def resample_component(field: Volume, c: int, ref: sitk.Image) -> sitk.Image:
    """Component `c` of a vector field resampled linearly onto the grid of `ref` (float32).

    Args:
        field: (nz, ny, nx, 3) vector volume (e.g. a coarse displacement field, mm).
        c: the component (0, 1, 2 = x, y, z).
        ref: reference image of the target grid (`Geometry.reference_image`).

    Returns:
        The resampled component (0 outside the field's grid); keep it alive while an array view
        of it is in use.
    """
    comp = sitk.GetImageFromArray(np.ascontiguousarray(field.array[..., c]))
    field.geometry.apply_to_sitk(comp)
    return sitk.Resample(comp, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
