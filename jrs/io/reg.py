"""DICOM Deformable Spatial Registration (REG, SOP class 1.2.840.10008.5.1.4.1.1.66.3).

Writes the product's deformation vector field (DVF) as a standard REG object any treatment planning
system can import, and reads one back.

Direction convention (PS3.3 A.39.2.1, C.20.3.1.1, C.20.3.1.3)
-------------------------------------------------------------
The standard says the deformations "describe to an application how to sample data from one or
more Source RCS into the Registered RCS", where the Registered RCS is the Frame of Reference of the
REG instance itself (FrameOfReferenceUID, Frame of Reference module) and each Source RCS is the
SourceFrameOfReferenceUID of a DeformableRegistrationSequence item. C.20.3.1.1 spells out the
order: start from a *Registered RCS* coordinate, apply the Pre Deformation matrix, add the
deformation offset of the grid (the grid is placed in the Registered RCS by its
ImagePositionPatient / ImageOrientationPatient), apply the Post Deformation matrix; "the
resulting coordinate addresses the sample point within the Source RCS"::

    source = M_post @ (M_pre @ [p, 1] + [D(p), 0])       (p: a grid point, Registered RCS)

So a REG grid is a *pull* field from the registered frame to the source frame. This is exactly
the product's DVF (DESIGN.md): defined on the daily grid, a daily point ``p`` corresponds to the
planning point ``p + u(p)``. Hence:

* Registered RCS = the daily CT's frame (FrameOfReferenceUID of the REG object),
* Source RCS = the planning CT's frame (SourceFrameOfReferenceUID of the grid item),
* VectorGridData = ``u`` unchanged (no inversion, no sign change), and with identity Pre/Post
  matrices (the default: the affine pre-alignment is already folded into the field) a TPS maps
  daily point ``p`` to planning point ``p + u(p)``, e.g. to bring planning dose or contours onto
  the daily CT.

Note that the matrices inside a *deformable* registration therefore map Registered -> Source,
the opposite of the matrix of the rigid Spatial Registration IOD (C.20.2.1.1, Source ->
Registered); `write_deformable_registration` takes them in the deformable sense.

Grid encoding (C.20.3.1.3): VectorGridData is float32 (OF), one (x, y, z) LPS vector in mm per grid
point, vectors ordered left to right along a row (x, index i, fastest), rows top to bottom (j),
then plane after plane (k). That is the C order of our ``(nz, ny, nx, 3)`` arrays, so the bytes are
``array.astype("<f4").tobytes()``. GridDimensions = (nx, ny, nz), GridResolution = the spacing
along (i, j, k), ImageOrientationPatient = direction columns 0 and 1; the third grid axis is
*defined* as the cross product row x column, so a field stored with a left-handed direction
(slices running against row x column) is re-stored (its k axis reversed, no interpolation)
before writing.

Object layout: the DeformableRegistrationSequence holds two items, as TPS vendors write them:
item 1 references the daily images in their own frame (identity RIGID Pre Deformation matrix, no
grid), item 2 references the planning images with the grid and identity (or given) Pre/Post
matrices. Patient and study come from the daily CT (the REG joins the daily study); the Common
Instance Reference module lists the daily and the planning series with their instances.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    ExplicitVRBigEndian,
)

import jrs
from jrs.core.errors import GeometryMismatch, InvalidInput
from jrs.core.fields import sample_dvf
from jrs.core.geometry import Geometry, Volume, reorient
from jrs.io.ct_writer import ds_list
from jrs.io.dataset import parse_object, text
from jrs.io.derived import start_derived_dataset
from jrs.io.series import DEFORMABLE_REGISTRATION_STORAGE, CTSeries

logger = logging.getLogger(__name__)

#: Manufacturer written into General / Enhanced General Equipment.
#: ManufacturerModelName of the Enhanced General Equipment module.
MANUFACTURER_MODEL_NAME = "jrs deformable registration"
#: DeviceSerialNumber of the Enhanced General Equipment module (software: no hardware serial).
DEVICE_SERIAL_NUMBER = "JRS-SOFTWARE"
#: SOPClassUID of the rigid Spatial Registration Storage (named in error messages).
SPATIAL_REGISTRATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.1"
#: Registration Type Code Sequence item (CID 7100 "RCS Registration Method Type").
REGISTRATION_TYPE_CODE = ("125024", "DCM", "Image Content-based Alignment")

_CS = re.compile(r"^[A-Z0-9_ ]{1,16}$")
_ORTHO_TOL = 1e-4


# ------------------------------------------------------------------------------ data model
@dataclass(eq=False)
class DeformableRegistration:
    """The content of a Deformable Spatial Registration object that maps daily -> planning.

    A registered (daily) point ``p`` maps to the source (planning) point
    ``post @ (pre @ [p, 1] + [u(p), 0])`` (PS3.3 C.20.3.1.1); see `map_points`.

    Attributes:
        registered_frame_of_reference_uid: FrameOfReferenceUID of the REG object (daily CT).
        source_frame_of_reference_uid: SourceFrameOfReferenceUID of the grid item (planning CT).
        dvf: displacement ``u``, float32, shape (nz, ny, nx, 3), mm, LPS (x, y, z) components, on
            the deformation grid (its geometry carries the registered frame of reference UID).
            (NaN, NaN, NaN) marks points where the standard says the deformation is undefined.
        pre_deformation: (4, 4) Pre Deformation matrix (identity when absent).
        post_deformation: (4, 4) Post Deformation matrix (identity when absent).
        referenced_image_uids: SOP Instance UIDs of the source (planning) images referenced.
        study_instance_uid: StudyInstanceUID of the REG object.
        series_instance_uid: SeriesInstanceUID of the REG object.
        sop_instance_uid: SOPInstanceUID of the REG object.
        content_label: ContentLabel.
        path: the file read (None when built in memory).
    """

    registered_frame_of_reference_uid: str
    source_frame_of_reference_uid: str
    dvf: Volume
    pre_deformation: npt.NDArray[np.float64] = field(default_factory=lambda: np.eye(4))
    post_deformation: npt.NDArray[np.float64] = field(default_factory=lambda: np.eye(4))
    referenced_image_uids: list[str] = field(default_factory=list)
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    sop_instance_uid: str = ""
    content_label: str = ""
    path: Path | None = None

    def map_points(self, points: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Map registered (daily) LPS points to source (planning) LPS points.

        The displacement is interpolated trilinearly at ``p`` on the grid (clamped at the border,
        implementation-dependent per the standard), then ``post @ (pre @ [p, 1] + [u(p), 0])``.

        Args:
            points: (N, 3) LPS points in mm, Registered RCS.

        Returns:
            (N, 3) LPS points in mm, Source RCS.
        """
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        u = sample_dvf(self.dvf, pts)
        moved = pts @ self.pre_deformation[:3, :3].T + self.pre_deformation[:3, 3] + u
        return moved @ self.post_deformation[:3, :3].T + self.post_deformation[:3, 3]


# ------------------------------------------------------------------------------ helpers
def _check_matrix(matrix: npt.ArrayLike | None, name: str) -> npt.NDArray[np.float64]:
    """A (4, 4) homogeneous matrix (identity for None), validated."""
    if matrix is None:
        return np.eye(4)
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise InvalidInput(f"{name} must be a finite (4, 4) matrix, got shape {m.shape}")
    if not np.allclose(m[3], [0, 0, 0, 1], atol=1e-9):
        raise InvalidInput(
            f"{name} must be homogeneous with last row [0, 0, 0, 1], got {m[3].tolist()}"
        )
    return m


def matrix_type(matrix: npt.ArrayLike) -> str:
    """FrameOfReferenceTransformationMatrixType of a (4, 4) matrix (PS3.3 C.20.2.1.2).

    Args:
        matrix: (4, 4) homogeneous matrix.

    Returns:
        ``RIGID`` (proper rotation + translation), ``RIGID_SCALE`` (rotation times an isotropic
        scale) or ``AFFINE`` (anything else).
    """
    r = np.asarray(matrix, dtype=np.float64)[:3, :3]
    gram = r.T @ r
    if np.linalg.det(r) > 0:
        if np.allclose(gram, np.eye(3), atol=1e-6):
            return "RIGID"
        scale = float(np.mean(np.diag(gram)))
        if np.allclose(gram, scale * np.eye(3), atol=1e-6 * max(scale, 1.0)):
            return "RIGID_SCALE"
    return "AFFINE"


def _matrix_item(matrix: npt.NDArray[np.float64]) -> Dataset:
    item = Dataset()
    item.FrameOfReferenceTransformationMatrixType = matrix_type(matrix)
    item.FrameOfReferenceTransformationMatrix = ds_list(matrix)
    return item


def _image_refs(series: CTSeries) -> list[Dataset]:
    items = []
    for uid in series.sop_instance_uids:
        if not uid:
            continue
        item = Dataset()
        item.ReferencedSOPClassUID = series.sop_class_uid
        item.ReferencedSOPInstanceUID = uid
        items.append(item)
    return items


def _series_ref(series: CTSeries) -> Dataset:
    item = Dataset()
    item.SeriesInstanceUID = series.series_instance_uid
    item.ReferencedInstanceSequence = DicomSequence(_image_refs(series))
    return item


def _right_handed(dvf: Volume) -> Volume:
    """The field re-stored so that its slice axis is row x column (C.20.3.1.1), if needed."""
    d = dvf.geometry.direction
    if np.dot(np.cross(d[:, 0], d[:, 1]), d[:, 2]) > 0:
        return dvf
    target = d.copy()
    target[:, 2] = -target[:, 2]
    return reorient(dvf, target)


# ------------------------------------------------------------------------------ writing
def write_deformable_registration(
    dvf: Volume,
    daily: CTSeries,
    planning: CTSeries,
    path: str | Path,
    *,
    pre_deformation: npt.ArrayLike | None = None,
    post_deformation: npt.ArrayLike | None = None,
    series_description: str = "jrs deformable registration",
    content_label: str = "JRS_DVF",
    series_instance_uid: str | None = None,
) -> Dataset:
    """Write a DVF as a DICOM Deformable Spatial Registration object.

    Every mandatory module of the Deformable Spatial Registration IOD (PS3.3 A.39.2) is written:
    Patient and General Study (copied from the daily CT, same StudyInstanceUID), General Series
    and Spatial Registration Series (Modality REG, new series), Frame of Reference (the daily
    CT's), General and Enhanced General Equipment, Deformable Spatial Registration (with the
    Content Identification macro), Common Instance Reference and SOP Common. The file is Explicit
    VR Little Endian with file meta; every DS value fits in 16 characters. See the module
    docstring for the direction convention: the vectors are written as given (daily -> planning
    pull field = the standard's Registered -> Source offsets).

    Args:
        dvf: displacement field, shape (nz, ny, nx, 3), mm, LPS (x, y, z) components, "pull"
            from daily points to planning points; its grid (usually the daily CT grid, or a
            coarser grid over it) becomes the deformation grid. Its frame of reference UID, when
            set, must be the daily CT's.
        daily: the daily CT (Registered RCS; patient, study and frame of reference come from it).
        planning: the planning CT (Source RCS; its images are referenced).
        path: the file to write (parent folders are created).
        pre_deformation: (4, 4) Pre Deformation matrix, applied to daily coordinates before the
            offsets are added (identity when None).
        post_deformation: (4, 4) Post Deformation matrix, applied after (identity when None).
        series_description: SeriesDescription (at most 64 characters).
        content_label: ContentLabel (CS: 1 to 16 upper-case letters, digits, "_" or space).
        series_instance_uid: SeriesInstanceUID of the REG (new when None).

    Returns:
        The written dataset.

    Raises:
        InvalidInput: the field is not (nz, ny, nx, 3) or holds non-finite values; a CT has no
            FrameOfReferenceUID; a matrix is not a finite homogeneous (4, 4) matrix; a label or
            description is not a valid DICOM value.
        GeometryMismatch: the field's frame of reference is not the daily CT's.
    """
    arr = _checked_field(dvf)
    if not _CS.match(content_label or ""):
        raise InvalidInput(
            f"content_label {content_label!r} is not a valid DICOM CS value: 1 to 16 upper-case "
            "letters, digits, '_' or space"
        )
    if len(series_description) > 64 or "\\" in series_description:
        raise InvalidInput("series_description must be at most 64 characters without backslash")
    daily_frame = daily.frame_of_reference_uid
    planning_frame = planning.frame_of_reference_uid
    if not daily_frame or not planning_frame:
        which = "daily" if not daily_frame else "planning"
        raise InvalidInput(
            f"the {which} CT has no FrameOfReferenceUID; a registration needs both frames"
        )
    field_frame = dvf.geometry.frame_of_reference_uid
    if field_frame and field_frame != daily_frame:
        raise GeometryMismatch(
            f"the DVF lives in frame of reference {field_frame}, the daily CT in {daily_frame}: "
            "the field must be defined on the daily CT's frame (pull daily -> planning)"
        )
    pre = _check_matrix(pre_deformation, "pre_deformation")
    post = _check_matrix(post_deformation, "post_deformation")
    grid_field = _right_handed(Volume(arr, dvf.geometry))
    g = grid_field.geometry

    warnings: list[str] = []
    ds, date, time = start_derived_dataset(
        DEFORMABLE_REGISTRATION_STORAGE,
        daily,
        modality="REG",
        series_description=series_description,
        manufacturer_model_name=MANUFACTURER_MODEL_NAME,
        implementation_version_name="JRS_REG_1",
        frame_of_reference_uid=daily_frame,
        series_instance_uid=series_instance_uid,
        warnings=warnings,
        source="daily CT",
    )
    ds.DeviceSerialNumber = DEVICE_SERIAL_NUMBER
    ds.BodyPartExamined = "PELVIS"  # unpaired: Laterality (Type 2C) is then absent
    study_uid = str(ds.StudyInstanceUID)
    # Deformable Spatial Registration (with Content Identification)
    ds.ContentDate = date
    ds.ContentTime = time
    ds.ContentLabel = content_label
    ds.ContentDescription = (f"DVF daily -> planning (pull, mm, LPS), jrs {jrs.__version__}")[:64]
    ds.ContentCreatorName = "jrs^software"

    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = REGISTRATION_TYPE_CODE

    # item 1: the registered (daily) images in their own frame: identity
    own = Dataset()
    own.SourceFrameOfReferenceUID = daily_frame
    own.ReferencedImageSequence = DicomSequence(_image_refs(daily))
    own.FrameOfReferenceTransformationComment = "daily CT (registered frame): identity"
    own.RegistrationTypeCodeSequence = DicomSequence([])
    own.PreDeformationMatrixRegistrationSequence = DicomSequence([_matrix_item(np.eye(4))])
    if not own.ReferencedImageSequence:
        del own.ReferencedImageSequence

    # item 2: the planning images with the deformation grid
    grid = Dataset()
    grid.ImagePositionPatient = ds_list(g.origin)
    grid.ImageOrientationPatient = ds_list(np.concatenate([g.direction[:, 0], g.direction[:, 1]]))
    grid.GridDimensions = [int(v) for v in g.size_xyz]
    grid.GridResolution = [float(v) for v in g.spacing]
    grid.VectorGridData = np.ascontiguousarray(grid_field.array, dtype="<f4").tobytes()

    item = Dataset()
    item.SourceFrameOfReferenceUID = planning_frame
    refs = _image_refs(planning)
    if refs:
        item.ReferencedImageSequence = DicomSequence(refs)
    item.FrameOfReferenceTransformationComment = (
        "deformation grid: daily point p -> planning point p + D(p)"
    )
    item.RegistrationTypeCodeSequence = DicomSequence([code])
    item.PreDeformationMatrixRegistrationSequence = DicomSequence([_matrix_item(pre)])
    item.PostDeformationMatrixRegistrationSequence = DicomSequence([_matrix_item(post)])
    item.DeformableRegistrationGridSequence = DicomSequence([grid])
    ds.DeformableRegistrationSequence = DicomSequence([own, item])

    _common_instance_reference(ds, (daily, planning), study_uid, warnings)

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    # no path in the log: folder names often carry patient names or IDs
    for w in warnings:
        logger.warning("deformable registration: %s", w)
    logger.info(
        "wrote deformable registration (grid %s x, y, z; %.1f MB)",
        g.size_xyz,
        len(grid.VectorGridData) / 1e6,
    )
    return ds


def _checked_field(dvf: Volume) -> npt.NDArray[Any]:
    """The DVF's (nz, ny, nx, 3) array, checked finite.

    Raises:
        InvalidInput: another shape, or NaN / infinite values.
    """
    arr = np.asarray(dvf.array)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise InvalidInput(
            f"a DVF must have shape (nz, ny, nx, 3) (mm, LPS x/y/z components), got {arr.shape}"
        )
    if not np.all(np.isfinite(arr)):
        raise InvalidInput(
            "the DVF holds NaN or infinite values; every displacement must be finite"
        )
    return arr


def _common_instance_reference(
    ds: Dataset, series_list: Sequence[Any], study_uid: str, warnings: list[str]
) -> None:
    """The Common Instance Reference module: the referenced series, by study."""
    same_study: list[Dataset] = []
    other_studies: dict[str, list[Dataset]] = {}
    for series in series_list:
        if not series.series_instance_uid:
            warnings.append(
                "a referenced CT has no SeriesInstanceUID; it is not listed in the Common "
                "Instance Reference module"
            )
            continue
        ref = _series_ref(series)
        if not series.study_instance_uid or series.study_instance_uid == study_uid:
            same_study.append(ref)
        else:
            other_studies.setdefault(series.study_instance_uid, []).append(ref)
    if same_study:
        ds.ReferencedSeriesSequence = DicomSequence(same_study)
    if other_studies:
        studies = []
        for uid, refs in other_studies.items():
            st = Dataset()
            st.StudyInstanceUID = uid
            st.ReferencedSeriesSequence = DicomSequence(refs)
            studies.append(st)
        ds.StudiesContainingOtherReferencedInstancesSequence = DicomSequence(studies)


# ------------------------------------------------------------------------------ reading
def _floats(ds: Dataset, keyword: str, count: int, where: str) -> npt.NDArray[np.float64]:
    raw = ds.get(keyword)
    try:
        if raw is None:
            values: list[float] = []
        elif isinstance(raw, str | bytes | int | float):
            values = [float(raw)]
        else:
            values = [float(v) for v in raw]
    except (TypeError, ValueError):
        values = []
    arr = np.asarray(values, dtype=np.float64)
    if arr.shape != (count,) or not np.all(np.isfinite(arr)):
        raise InvalidInput(f"{where}: {keyword} must hold {count} finite numbers, got {raw!r}")
    return arr


def _matrix(item: Dataset, keyword: str, where: str) -> npt.NDArray[np.float64]:
    seq = item.get(keyword)
    if not seq:
        return np.eye(4)
    m = _floats(seq[0], "FrameOfReferenceTransformationMatrix", 16, f"{where} {keyword}")
    return m.reshape(4, 4)


def read_deformable_registration(path: str | Path) -> DeformableRegistration:
    """Read a DICOM Deformable Spatial Registration object.

    The first DeformableRegistrationSequence item that carries a deformation grid is read (the
    one whose source frame differs from the registered frame when there are several).

    Args:
        path: the REG file.

    Returns:
        The registration: frames, the grid as a float32 (nz, ny, nx, 3) `Volume` in mm (LPS
        components, geometry from ImagePositionPatient / ImageOrientationPatient / GridResolution,
        frame = the registered frame), Pre/Post matrices (identity when absent).

    Raises:
        InvalidInput: the file is missing or not DICOM; it is not a Deformable Spatial
            Registration (names the SOPClassUID and Modality found); it has no
            DeformableRegistrationSequence or no item with a DeformableRegistrationGridSequence;
            VectorGridData does not hold 3 * prod(GridDimensions) float32 values (names both byte
            counts); ImageOrientationPatient is not orthonormal; a grid attribute is missing or
            invalid.
    """
    return parse_object(Path(path), "DICOM Deformable Spatial Registration", _parse)


def _parse(ds: Dataset, path: Path) -> DeformableRegistration:
    sop_class = text(ds, "SOPClassUID")
    modality = text(ds, "Modality")
    if sop_class != DEFORMABLE_REGISTRATION_STORAGE:
        hint = (
            " (a rigid Spatial Registration: it holds a matrix, no deformation grid)"
            if sop_class == SPATIAL_REGISTRATION_STORAGE
            else ""
        )
        raise InvalidInput(
            f"{path}: not a Deformable Spatial Registration: SOPClassUID is "
            f"{sop_class or '(none)'}{hint} and Modality is {modality or '(none)'!r}; expected "
            f"SOPClassUID {DEFORMABLE_REGISTRATION_STORAGE} and Modality 'REG'"
        )
    items = ds.get("DeformableRegistrationSequence")
    if not items:
        raise InvalidInput(
            f"{path}: the registration has no DeformableRegistrationSequence (0064,0002); it "
            "defines no deformation"
        )
    registered = text(ds, "FrameOfReferenceUID")
    with_grid = [it for it in items if it.get("DeformableRegistrationGridSequence")]
    if not with_grid:
        raise InvalidInput(
            f"{path}: no DeformableRegistrationSequence item has a "
            "DeformableRegistrationGridSequence (0064,0005); the object holds no vector grid"
        )
    others = [it for it in with_grid if text(it, "SourceFrameOfReferenceUID") != registered]
    item = (others or with_grid)[0]
    where = f"{path}: DeformableRegistrationGridSequence"
    grid = item.DeformableRegistrationGridSequence[0]

    iop = _floats(grid, "ImageOrientationPatient", 6, where)
    row, col = iop[:3], iop[3:]
    if (
        abs(np.linalg.norm(row) - 1) > _ORTHO_TOL
        or abs(np.linalg.norm(col) - 1) > _ORTHO_TOL
        or abs(float(np.dot(row, col))) > _ORTHO_TOL
    ):
        raise InvalidInput(
            f"{where}: ImageOrientationPatient {iop.round(6).tolist()} is not orthonormal (two "
            "unit vectors at right angles expected)"
        )
    direction = np.stack([row, col, np.cross(row, col)], axis=1)
    ipp = _floats(grid, "ImagePositionPatient", 3, where)
    spacing = _floats(grid, "GridResolution", 3, where)
    if np.any(spacing <= 0):
        raise InvalidInput(f"{where}: GridResolution must be positive (mm), got {spacing.tolist()}")
    dims = _floats(grid, "GridDimensions", 3, where)
    if np.any(dims < 1) or np.any(dims != np.round(dims)):
        raise InvalidInput(
            f"{where}: GridDimensions must be 3 positive integers, got {dims.tolist()}"
        )
    nx, ny, nz = (int(v) for v in dims)
    data = grid.get("VectorGridData")
    if data is None:
        raise InvalidInput(f"{where}: VectorGridData (0064,0009) is missing")
    raw = bytes(data)
    expected = 3 * nx * ny * nz * 4
    if len(raw) != expected:
        raise InvalidInput(
            f"{where}: VectorGridData holds {len(raw)} bytes, but GridDimensions {nx}\\{ny}\\{nz} "
            f"need 3 * {nx * ny * nz} float32 values = {expected} bytes"
        )
    meta = getattr(ds, "file_meta", None)
    big = meta is not None and meta.get("TransferSyntaxUID") == ExplicitVRBigEndian
    vectors = np.frombuffer(raw, dtype=">f4" if big else "<f4").astype(np.float32)
    geometry = Geometry(
        shape=(nz, ny, nx),
        origin=ipp,
        spacing=spacing,
        direction=direction,
        frame_of_reference_uid=registered or None,
    )
    dvf = Volume(vectors.reshape(nz, ny, nx, 3), geometry)
    item_where = f"{path}: DeformableRegistrationSequence item"
    refs = [text(r, "ReferencedSOPInstanceUID") for r in item.get("ReferencedImageSequence") or []]
    return DeformableRegistration(
        registered_frame_of_reference_uid=registered,
        source_frame_of_reference_uid=text(item, "SourceFrameOfReferenceUID"),
        dvf=dvf,
        pre_deformation=_matrix(item, "PreDeformationMatrixRegistrationSequence", item_where),
        post_deformation=_matrix(item, "PostDeformationMatrixRegistrationSequence", item_where),
        referenced_image_uids=[r for r in refs if r],
        study_instance_uid=text(ds, "StudyInstanceUID"),
        series_instance_uid=text(ds, "SeriesInstanceUID"),
        sop_instance_uid=text(ds, "SOPInstanceUID"),
        content_label=text(ds, "ContentLabel"),
        path=path,
    )
