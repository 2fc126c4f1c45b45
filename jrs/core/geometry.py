"""Image geometry in DICOM patient coordinates (LPS, mm).

Conventions (they never drift):

* Arrays are indexed ``(z, y, x)`` = ``(k, j, i)`` as SimpleITK's ``GetArrayFromImage`` gives them.
  A vector image (e.g. a DVF) has its components on a last axis: ``(z, y, x, 3)``.
* Continuous indices and points are written in ``(i, j, k)`` / ``(x, y, z)`` order, as SimpleITK
  does: ``point = origin + direction @ (spacing * index)``.
* ``direction`` is a 3x3 matrix whose column ``c`` is the unit vector (in LPS) of index axis ``c``.
* ``origin`` is the LPS position (mm) of the centre of voxel ``(0, 0, 0)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from jrs.core.errors import GeometryMismatch, InvalidInput

Interpolator = Literal["linear", "bspline", "nearest", "label"]

_SITK_INTERPOLATORS: dict[str, int] = {
    "linear": sitk.sitkLinear,
    "bspline": sitk.sitkBSpline,
    "nearest": sitk.sitkNearestNeighbor,
}


def _as_vec3(value: Sequence[float] | npt.ArrayLike, name: str) -> npt.NDArray[np.float64]:
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.shape != (3,) or not np.all(np.isfinite(arr)):
        raise InvalidInput(f"{name} must be 3 finite numbers, got {value!r}")
    return arr


@dataclass(frozen=True, eq=False)
class Geometry:
    """A regular 3-D voxel grid placed in LPS patient space.

    Attributes:
        shape: array shape ``(nz, ny, nx)``.
        origin: LPS position of the centre of voxel (0, 0, 0), mm, shape (3,).
        spacing: voxel size along index axes (i, j, k) = (x, y, z), mm, shape (3,).
        direction: (3, 3) matrix; column c is the LPS unit vector of index axis c.
        frame_of_reference_uid: DICOM FrameOfReferenceUID the grid lives in, if known.
    """

    shape: tuple[int, int, int]
    origin: npt.NDArray[np.float64]
    spacing: npt.NDArray[np.float64]
    direction: npt.NDArray[np.float64] = field(default_factory=lambda: np.eye(3))
    frame_of_reference_uid: str | None = None

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != 3 or min(shape) < 1:
            raise InvalidInput(f"grid shape must be 3 positive integers (nz, ny, nx), got {shape}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "origin", _as_vec3(self.origin, "origin"))
        spacing = _as_vec3(self.spacing, "spacing")
        if np.any(spacing <= 0):
            raise InvalidInput(f"spacing must be positive (mm), got {spacing.tolist()}")
        object.__setattr__(self, "spacing", spacing)
        direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
            raise InvalidInput(
                f"direction must be orthonormal (columns = index axes in LPS), got "
                f"{direction.round(5).tolist()}"
            )
        object.__setattr__(self, "direction", direction)

    # ------------------------------------------------------------------ derived quantities
    @property
    def size_xyz(self) -> tuple[int, int, int]:
        """Grid size in (i, j, k) = (x, y, z) order, as SimpleITK's ``GetSize``."""
        nz, ny, nx = self.shape
        return (nx, ny, nz)

    @property
    def affine(self) -> npt.NDArray[np.float64]:
        """4x4 matrix mapping homogeneous (i, j, k, 1) indices to LPS mm."""
        a = np.eye(4)
        a[:3, :3] = self.direction * self.spacing[None, :]
        a[:3, 3] = self.origin
        return a

    @property
    def extent_mm(self) -> npt.NDArray[np.float64]:
        """Physical size covered by voxel centres along (i, j, k), mm."""
        return (np.asarray(self.size_xyz) - 1) * self.spacing

    def index_to_physical(self, index: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Map continuous indices to LPS points.

        Args:
            index: (..., 3) continuous indices in (i, j, k) order.

        Returns:
            (..., 3) LPS points in mm.
        """
        idx = np.asarray(index, dtype=np.float64)
        return idx @ (self.direction * self.spacing[None, :]).T + self.origin

    def physical_to_index(self, points: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Map LPS points (mm) to continuous indices.

        Args:
            points: (..., 3) LPS points in mm.

        Returns:
            (..., 3) continuous indices in (i, j, k) order.
        """
        pts = np.asarray(points, dtype=np.float64)
        return ((pts - self.origin) @ self.direction) / self.spacing

    def voxel_centres(self) -> npt.NDArray[np.float64]:
        """LPS centres of every voxel, shape (nz, ny, nx, 3), mm (memory: 24 bytes a voxel)."""
        k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in self.shape), indexing="ij")
        return self.index_to_physical(np.stack([i, j, k], axis=-1))

    def corners(self) -> npt.NDArray[np.float64]:
        """LPS positions of the 8 corner voxel centres, shape (8, 3), mm."""
        nx, ny, nz = self.size_xyz
        idx = np.array(
            [[i, j, k] for i in (0, nx - 1) for j in (0, ny - 1) for k in (0, nz - 1)], float
        )
        return self.index_to_physical(idx)

    # ------------------------------------------------------------------ comparisons
    def same_grid(self, other: Geometry, tol_mm: float = 1e-3) -> bool:
        """Whether two grids have the same shape and place every voxel at the same point.

        Args:
            other: the grid to compare with.
            tol_mm: tolerance on corner positions, mm.
        """
        if self.shape != other.shape:
            return False
        return bool(np.max(np.abs(self.corners() - other.corners())) <= tol_mm)

    def require_same_grid(self, other: Geometry, what: str = "volumes") -> None:
        """Raise `GeometryMismatch` unless `other` is the same grid.

        Args:
            other: the grid to compare with.
            what: words naming the two things compared, used in the message.
        """
        if not self.same_grid(other):
            raise GeometryMismatch(
                f"{what} are not on the same grid: shape {self.shape} vs {other.shape}, origin "
                f"{self.origin.round(3).tolist()} vs {other.origin.round(3).tolist()}, spacing "
                f"{self.spacing.round(4).tolist()} vs {other.spacing.round(4).tolist()}"
            )

    def with_frame(self, frame_of_reference_uid: str | None) -> Geometry:
        """A copy carrying another frame of reference UID."""
        return replace(self, frame_of_reference_uid=frame_of_reference_uid)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_sitk(cls, image: sitk.Image, frame_of_reference_uid: str | None = None) -> Geometry:
        """The grid of a SimpleITK image (3-D, scalar or vector)."""
        if image.GetDimension() != 3:
            raise InvalidInput(f"expected a 3-D image, got {image.GetDimension()}-D")
        nx, ny, nz = image.GetSize()
        return cls(
            shape=(nz, ny, nx),
            origin=np.array(image.GetOrigin()),
            spacing=np.array(image.GetSpacing()),
            direction=np.array(image.GetDirection()).reshape(3, 3),
            frame_of_reference_uid=frame_of_reference_uid,
        )

    def apply_to_sitk(self, image: sitk.Image) -> sitk.Image:
        """Set origin, spacing and direction of `image` to this grid (in place) and return it."""
        if image.GetSize() != self.size_xyz:
            raise GeometryMismatch(
                f"image size {image.GetSize()} (x, y, z) does not match grid {self.size_xyz}"
            )
        image.SetOrigin(tuple(float(v) for v in self.origin))
        image.SetSpacing(tuple(float(v) for v in self.spacing))
        image.SetDirection(tuple(float(v) for v in self.direction.reshape(-1)))
        return image

    def reference_image(self) -> sitk.Image:
        """An empty 8-bit SimpleITK image on this grid (a resampling reference)."""
        return self.apply_to_sitk(sitk.Image(list(self.size_xyz), sitk.sitkUInt8))

    def resampled_grid(
        self, spacing: float | Sequence[float], direction: npt.ArrayLike | None = None
    ) -> Geometry:
        """A grid covering the same physical box with another spacing (and optionally direction).

        With a new `direction`, the grid is the bounding box, in that orientation, of this grid's
        corner voxel centres.

        Args:
            spacing: new voxel size, mm (one number for isotropic, or (sx, sy, sz)).
            direction: new (3, 3) direction; defaults to this grid's.

        Returns:
            The new grid (same frame of reference).
        """
        sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)).copy()
        d = self.direction if direction is None else np.asarray(direction, float).reshape(3, 3)
        local = self.corners() @ d  # coordinates along new axes
        lo, hi = local.min(axis=0), local.max(axis=0)
        n = np.floor((hi - lo) / sp + 1e-6).astype(int) + 1
        return Geometry(
            shape=(int(n[2]), int(n[1]), int(n[0])),
            origin=d @ lo,
            spacing=sp,
            direction=d,
            frame_of_reference_uid=self.frame_of_reference_uid,
        )


@dataclass(eq=False)
class Volume:
    """An array with its LPS geometry.

    Attributes:
        array: (nz, ny, nx) scalar or (nz, ny, nx, C) vector data.
        geometry: where the voxels sit in patient space.
    """

    array: np.ndarray
    geometry: Geometry

    def __post_init__(self) -> None:
        if tuple(self.array.shape[:3]) != self.geometry.shape or self.array.ndim not in (3, 4):
            raise GeometryMismatch(
                f"array shape {self.array.shape} does not fit grid shape {self.geometry.shape}"
                " (expected (nz, ny, nx) or (nz, ny, nx, C))"
            )

    @property
    def is_vector(self) -> bool:
        """Whether the volume has a component axis."""
        return self.array.ndim == 4

    @classmethod
    def from_sitk(cls, image: sitk.Image, frame_of_reference_uid: str | None = None) -> Volume:
        """Wrap a SimpleITK image (array copied, (z, y, x[, C]) order)."""
        return cls(
            array=sitk.GetArrayFromImage(image),
            geometry=Geometry.from_sitk(image, frame_of_reference_uid),
        )

    def to_sitk(self) -> sitk.Image:
        """A SimpleITK image with this data and geometry (vector volumes become vector images)."""
        image = sitk.GetImageFromArray(self.array, isVector=self.is_vector)
        return self.geometry.apply_to_sitk(image)

    @classmethod
    def read(cls, path: str, frame_of_reference_uid: str | None = None) -> Volume:
        """Read a volume file SimpleITK understands (.mha, .nii.gz, .nrrd), in LPS.

        SimpleITK converts NIfTI's RAS storage to LPS on reading, so a NIfTI with an RAS-flipped
        direction comes back with the correct LPS geometry.
        """
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            raise InvalidInput(f"{path}: not a readable image file ({exc})") from exc
        return cls.from_sitk(image, frame_of_reference_uid)

    def write(self, path: str, compress: bool = True) -> None:
        """Write to a file SimpleITK understands (.mha, .nii.gz, ...)."""
        sitk.WriteImage(self.to_sitk(), str(path), useCompression=compress)

    def with_array(self, array: np.ndarray) -> Volume:
        """A volume on the same grid holding another array."""
        return Volume(array=array, geometry=self.geometry)

    def resample(
        self,
        reference: Geometry,
        interpolator: Interpolator = "linear",
        default_value: float = 0.0,
        transform: sitk.Transform | None = None,
    ) -> Volume:
        """Resample onto another grid.

        The output voxel at point p takes this volume's value at ``transform(p)`` (identity by
        default): SimpleITK's pull convention.

        Args:
            reference: the output grid.
            interpolator: ``linear``, ``bspline`` (images), ``nearest`` or ``label`` (integer label
                maps: each label is resampled linearly as a one-hot channel and the arg-max wins,
                which is smoother than nearest neighbour).
            default_value: value outside this volume (e.g. -1000 HU for CT, 0 for labels).
            transform: optional SimpleITK transform from output points to input points.

        Returns:
            The resampled volume (dtype preserved for ``nearest``/``label``, float32 otherwise).
        """
        tx = transform if transform is not None else sitk.Transform(3, sitk.sitkIdentity)
        ref = reference.reference_image()
        if interpolator == "label":
            return self._resample_labels(reference, ref, tx, int(default_value))
        if interpolator not in _SITK_INTERPOLATORS:
            raise InvalidInput(
                f"interpolator {interpolator!r} unknown; use linear, bspline, nearest or label"
            )
        src = self.to_sitk()
        if interpolator != "nearest" and src.GetPixelID() not in (
            sitk.sitkFloat32,
            sitk.sitkVectorFloat32,
        ):
            src = sitk.Cast(src, sitk.sitkVectorFloat32 if self.is_vector else sitk.sitkFloat32)
        out = sitk.Resample(src, ref, tx, _SITK_INTERPOLATORS[interpolator], float(default_value))
        return Volume(
            sitk.GetArrayFromImage(out),
            reference.with_frame(self.geometry.frame_of_reference_uid),
        )

    def _resample_labels(
        self, reference: Geometry, ref: sitk.Image, tx: sitk.Transform, default: int
    ) -> Volume:
        if self.is_vector or not np.issubdtype(self.array.dtype, np.integer):
            raise InvalidInput(
                f"'label' interpolation needs an integer scalar label map, got dtype "
                f"{self.array.dtype} with shape {self.array.shape}"
            )
        labels = [int(v) for v in np.unique(self.array)]
        best = np.full(reference.shape, -1.0, dtype=np.float32)
        out = np.full(reference.shape, default, dtype=self.array.dtype)
        for lab in labels:
            onehot = sitk.GetImageFromArray((self.array == lab).astype(np.float32))
            self.geometry.apply_to_sitk(onehot)
            prob = sitk.GetArrayFromImage(
                sitk.Resample(onehot, ref, tx, sitk.sitkLinear, 1.0 if lab == default else 0.0)
            )
            win = prob > best
            out[win] = lab
            best[win] = prob[win]
        return Volume(out, reference.with_frame(self.geometry.frame_of_reference_uid))


def reorient(volume: Volume, direction: npt.ArrayLike) -> Volume:
    """Re-store a volume with another axis-aligned direction, without interpolation.

    Only permutations and flips of the axes are allowed (e.g. HFS -> FFP storage); voxel values
    and their LPS positions are unchanged.

    Args:
        volume: the volume to re-store.
        direction: target (3, 3) direction whose columns are +-1 multiples of the current ones.

    Returns:
        A volume whose ``geometry.direction`` equals `direction` and that covers the same voxels.
    """
    target = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    src = volume.geometry.direction
    # m[a, b] = cos between source axis a and target axis b
    m = src.T @ target
    if not np.allclose(np.abs(m).sum(axis=0), 1.0, atol=1e-6) or not np.allclose(
        np.abs(np.round(m)), np.abs(m), atol=1e-6
    ):
        raise InvalidInput("reorient only permutes/flips axes; use resample for other directions")
    g = volume.geometry
    order = [int(np.argmax(np.abs(m[:, b]))) for b in range(3)]  # source axis of target axis b
    signs = [float(np.sign(m[order[b], b])) for b in range(3)]
    nxyz = g.size_xyz
    # array dims are (z, y, x): index axis a lives on array dim 2 - a
    arr = np.transpose(
        volume.array, [2 - order[2 - d] for d in range(3)] + list(range(3, volume.array.ndim))
    )
    flip_dims = [2 - b for b in range(3) if signs[b] < 0]
    if flip_dims:
        arr = np.flip(arr, axis=tuple(flip_dims))
    first = np.zeros(3)
    for b in range(3):
        if signs[b] < 0:
            first[order[b]] = nxyz[order[b]] - 1
    geometry = Geometry(
        shape=(arr.shape[0], arr.shape[1], arr.shape[2]),
        origin=g.index_to_physical(first),
        spacing=np.array([g.spacing[order[b]] for b in range(3)]),
        direction=target,
        frame_of_reference_uid=g.frame_of_reference_uid,
    )
    return Volume(np.ascontiguousarray(arr), geometry)


#: ImageOrientationPatient direction columns (row axis i, column axis j, slice axis k) per
#: DICOM PatientPosition, for the usual axial acquisition with slices ordered foot -> head.
PATIENT_POSITION_DIRECTIONS: dict[str, npt.NDArray[np.float64]] = {
    "HFS": np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]),
    "HFP": np.array([[-1.0, 0, 0], [0, -1.0, 0], [0, 0, 1.0]]),
    "FFS": np.array([[-1.0, 0, 0], [0, 1.0, 0], [0, 0, -1.0]]),
    "FFP": np.array([[1.0, 0, 0], [0, -1.0, 0], [0, 0, -1.0]]),
}
