"""Plausibility checks of a case before the network runs: is this a male pelvis it can handle?

The network re-contours the prostate, seminal vesicles, bladder and rectum of a male pelvis. A
structure set of another site (a thorax whose ``CTVp`` is a lung tumour), organs that cannot be
what their names say (a 469 cc "prostate", a bladder below the prostate), or a daily scan that
misses the organs would give contours that look like answers and are not. Checks:

- names: at least one ROI maps to an organ of the label table (`jrs.core.labels`); ambiguous
  abbreviations (when no prostate maps) and automatic contours used for lack of a manual one are
  reported;
- volumes: each organ within its clinical range (warning outside; refusal outside a wider hard
  range);
- positions (LPS centroids): bladder superior of the prostate (and not far posterior of it),
  rectum posterior of the prostate at the prostate's levels, seminal vesicles superior of the
  prostate; with femoral heads: the prostate between them left-right and at their level or below;
- anatomy: no lung-like air in the body around the organs (a pelvis holds only bowel gas);
- coverage: the pre-aligned planning organs inside the daily CT.

Each failed check is a `Finding` that names the ROI and the value. `enforce` refuses a case with
any finding of severity ``refuse`` (`jrs.core.errors.InvalidInput`: HTTP 422, exit code 2) for the
network method; the iterative method propagates any ROI of any site, so there every finding is a
warning. All limits are in `PlausibilityLimits`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from jrs.core.errors import InvalidInput
from jrs.core.geometry import Geometry, Volume
from jrs.core.labels import LABEL_IDS, RoiMapping, no_organ_message

log = logging.getLogger(__name__)

Severity = Literal["refuse", "warn"]
Check = Literal["names", "volume", "position", "anatomy", "coverage"]

#: what the network re-contours (said in every refusal).
SCOPE = (
    "jrs's network re-contours the prostate, seminal vesicles, bladder and rectum of a male "
    "pelvis (ROI names as TG-263 or clinical names; `jrs rois --rtstruct FILE` shows the mapping)"
)
ITERATIVE_HINT = (
    "if the contours are right or the case is another site, its ROIs can still be propagated "
    "with --method iterative"
)


@dataclass(frozen=True)
class Finding:
    """One failed plausibility check.

    Attributes:
        check: ``names``, ``volume``, ``position``, ``anatomy`` or ``coverage``.
        severity: ``refuse`` (the network method does not run) or ``warn``.
        message: one line naming the ROI and the value.
        roi: the ROI concerned, if one.
        value: the measured value (cc, mm or a fraction), if one.
    """

    check: Check
    severity: Severity
    message: str
    roi: str | None = None
    value: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for qa.json."""
        return asdict(self)


@dataclass(frozen=True)
class PlausibilityLimits:
    """Every limit of the plausibility checks (mm are LPS distances between centroids).

    Attributes:
        volume_cc: organ key -> clinical volume range, cc (a warning outside).
        hard_volume_cc: organ key -> range outside which the organ cannot be what its name says
            (a refusal).
        bladder_above_prostate_mm: the bladder's centroid at least this far superior of the
            prostate's (refusal).
        bladder_posterior_of_prostate_mm: the bladder's centroid at most this far posterior of
            the prostate's (warning).
        rectum_posterior_of_prostate_mm: the rectum (at the prostate's levels) at least this far
            posterior of the prostate's centroid (refusal).
        sv_above_prostate_mm: the seminal vesicles' centroid at least this far superior of the
            prostate's (warning).
        femoral_head_top_mm: a femoral head's centre is the centroid of its top this many mm
            (the same for a head-only contour and a whole femur).
        prostate_above_heads_warn_mm: the prostate's centroid more than this superior of the
            femoral heads' centres is a warning...
        prostate_above_heads_refuse_mm: ...and more than this a refusal.
        prostate_below_heads_warn_mm: more than this inferior of them is a warning.
        air_hu: HU below which a voxel inside the body is air.
        air_margin_mm: margin around the organs' box of the air check, mm.
        max_air_fraction: largest fraction of air in the body around the organs (bowel gas
            inside the organs' contours not counted); lungs give far more (refusal).
        coverage_tolerance_mm: how far a pre-aligned planning organ may reach beyond the daily
            CT (refusal for the prostate and seminal vesicles, warning for the others).
    """

    volume_cc: dict[str, tuple[float, float]] = field(
        default_factory=lambda: {
            "prostate": (10.0, 200.0),
            "bladder": (30.0, 1000.0),
            "rectum": (20.0, 400.0),
            "seminal_vesicles": (2.0, 40.0),
        }
    )
    hard_volume_cc: dict[str, tuple[float, float]] = field(
        default_factory=lambda: {
            "prostate": (3.0, 400.0),
            "bladder": (5.0, 2000.0),
            "rectum": (5.0, 800.0),
            "seminal_vesicles": (0.3, 100.0),
        }
    )
    bladder_above_prostate_mm: float = 0.0
    bladder_posterior_of_prostate_mm: float = 20.0
    rectum_posterior_of_prostate_mm: float = 0.0
    sv_above_prostate_mm: float = 0.0
    femoral_head_top_mm: float = 45.0
    prostate_above_heads_warn_mm: float = 20.0
    prostate_above_heads_refuse_mm: float = 60.0
    prostate_below_heads_warn_mm: float = 80.0
    air_hu: float = -400.0
    air_margin_mm: float = 20.0
    max_air_fraction: float = 0.15
    coverage_tolerance_mm: float = 5.0


def _index_points(mask: Volume | npt.ArrayLike) -> npt.NDArray[np.intp]:
    """(N, 3) (k, j, i) indices of a mask's voxels, searched within its bounding box only."""
    m = np.asarray(mask.array if isinstance(mask, Volume) else mask)
    k = np.flatnonzero(m.any(axis=(1, 2)))
    if k.size == 0:
        return np.zeros((0, 3), np.intp)
    sub = m[k[0] : k[-1] + 1]
    j = np.flatnonzero(sub.any(axis=(0, 2)))
    i = np.flatnonzero(sub.any(axis=(0, 1)))
    sub = sub[:, j[0] : j[-1] + 1, i[0] : i[-1] + 1]
    return np.argwhere(sub > 0) + np.array([k[0], j[0], i[0]])


def _physical(kji: npt.NDArray[np.intp], g: Geometry) -> npt.NDArray[np.float64]:
    return g.index_to_physical(kji[:, ::-1].astype(np.float64))


@dataclass
class _Organ:
    name: str
    kji: npt.NDArray[np.intp]  # voxel indices (k, j, i)
    points: npt.NDArray[np.float64]  # LPS, mm

    @property
    def centroid(self) -> npt.NDArray[np.float64]:
        return self.points.mean(axis=0)


def _organs(
    masks: Mapping[str, Volume | npt.ArrayLike], names: Mapping[str, str], g: Geometry
) -> dict[str, _Organ]:
    """Key -> the non-empty ROI's voxels, for the keys (organs or landmarks) given."""
    out = {}
    for key, name in names.items():
        kji = _index_points(masks[name])
        if len(kji):
            out[key] = _Organ(name, kji, _physical(kji, g))
    return out


def _used_organs(mapping: RoiMapping) -> dict[str, str]:
    return {d.used_as: d.roi for d in mapping.decisions if d.used_as in LABEL_IDS}


def check_names(mapping: RoiMapping) -> list[Finding]:
    """Findings of the ROI-name mapping: no organ at all, ambiguous names, automatic picks."""
    out: list[Finding] = []
    if not mapping.used:
        out.append(
            Finding(
                "names", "refuse", no_organ_message(mapping, [d.roi for d in mapping.decisions])
            )
        )
    has_prostate = "prostate" in _used_organs(mapping)
    for d in mapping.decisions:
        # a PTV or CTV beside a prostate contour is ordinary; without one it may be the prostate
        if d.rule == "ambiguous" and mapping.used and not has_prostate:
            out.append(
                Finding(
                    "names",
                    "warn",
                    f"no prostate contour found; ROI {d.roi!r} is an ambiguous abbreviation, not "
                    "taken for the prostate (propagated as an ordinary ROI); map it in a "
                    "--synonyms file if it is the prostate",
                    roi=d.roi,
                )
            )
        if d.automatic and d.used_as is not None:
            out.append(
                Finding(
                    "names",
                    "warn",
                    f"the {d.used_as.replace('_', ' ')} is the automatic contour {d.roi!r}: "
                    "check it",
                    roi=d.roi,
                )
            )
    return out


def _volumes(organs: Mapping[str, _Organ], g: Geometry, lim: PlausibilityLimits) -> list[Finding]:
    out: list[Finding] = []
    voxel_cc = float(np.prod(g.spacing)) / 1000.0
    for organ, o in organs.items():
        cc = len(o.kji) * voxel_cc
        lo, hi = lim.volume_cc.get(organ, (0.0, np.inf))
        hard_lo, hard_hi = lim.hard_volume_cc.get(organ, (0.0, np.inf))
        what = organ.replace("_", " ")
        if not hard_lo <= cc <= hard_hi:
            out.append(
                Finding(
                    "volume",
                    "refuse",
                    f"ROI {o.name!r} taken for the {what} has {cc:.1f} cc: no {what} has that "
                    f"volume (clinical range {lo:g}-{hi:g} cc)",
                    roi=o.name,
                    value=round(cc, 2),
                )
            )
        elif not lo <= cc <= hi:
            out.append(
                Finding(
                    "volume",
                    "warn",
                    f"ROI {o.name!r} ({what}) has {cc:.1f} cc, outside the clinical range "
                    f"{lo:g}-{hi:g} cc: check the contour",
                    roi=o.name,
                    value=round(cc, 2),
                )
            )
    return out


def check_volumes(
    masks: Mapping[str, Volume | npt.ArrayLike],
    mapping: RoiMapping,
    geometry: Geometry,
    limits: PlausibilityLimits | None = None,
) -> list[Finding]:
    """Each organ's volume against its clinical (warning) and hard (refusal) range.

    Args:
        masks: ROI name -> mask (`Volume` or (nz, ny, nx) array) on `geometry`.
        mapping: the ROI-name decisions (`jrs.core.labels.SynonymTable.resolve`).
        geometry: the grid of the masks.
        limits: the limits.

    Returns:
        One finding per organ out of range.
    """
    lim = limits or PlausibilityLimits()
    return _volumes(_organs(masks, _used_organs(mapping), geometry), geometry, lim)


def _positions(
    organs: Mapping[str, _Organ], heads: Mapping[str, _Organ], lim: PlausibilityLimits
) -> list[Finding]:
    out: list[Finding] = []
    if "prostate" not in organs:
        return out
    prostate = organs["prostate"]
    p_name, p = prostate.name, prostate.centroid

    if "bladder" in organs:
        b_name, b = organs["bladder"].name, organs["bladder"].centroid
        above = float(b[2] - p[2])
        if above < lim.bladder_above_prostate_mm:
            out.append(
                Finding(
                    "position",
                    "refuse",
                    f"bladder {b_name!r} lies {-above:.0f} mm inferior of prostate {p_name!r} "
                    "(centroids): a bladder is superior of the prostate",
                    roi=b_name,
                    value=round(above, 1),
                )
            )
        posterior = float(b[1] - p[1])
        if posterior > lim.bladder_posterior_of_prostate_mm:
            out.append(
                Finding(
                    "position",
                    "warn",
                    f"bladder {b_name!r} lies {posterior:.0f} mm posterior of prostate "
                    f"{p_name!r} (centroids; expected anterior or level, at most "
                    f"{lim.bladder_posterior_of_prostate_mm:g} mm posterior)",
                    roi=b_name,
                    value=round(posterior, 1),
                )
            )

    if "rectum" in organs:
        r_name, pts = organs["rectum"].name, organs["rectum"].points
        pz = prostate.points[:, 2]
        level = pts[(pts[:, 2] >= pz.min()) & (pts[:, 2] <= pz.max())]
        r = (level if len(level) else pts).mean(axis=0)
        posterior = float(r[1] - p[1])
        if posterior < lim.rectum_posterior_of_prostate_mm:
            out.append(
                Finding(
                    "position",
                    "refuse",
                    f"rectum {r_name!r} lies {-posterior:.0f} mm anterior of prostate "
                    f"{p_name!r} at the prostate's levels: a rectum is posterior of the prostate",
                    roi=r_name,
                    value=round(posterior, 1),
                )
            )

    if "seminal_vesicles" in organs:
        s_name = organs["seminal_vesicles"].name
        above = float(organs["seminal_vesicles"].centroid[2] - p[2])
        if above < lim.sv_above_prostate_mm:
            out.append(
                Finding(
                    "position",
                    "warn",
                    f"seminal vesicles {s_name!r} lie {-above:.0f} mm inferior of prostate "
                    f"{p_name!r} (centroids): they are superior of it",
                    roi=s_name,
                    value=round(above, 1),
                )
            )

    if "femoral_head_left" in heads and "femoral_head_right" in heads:
        out += _femoral_heads(p_name, p, heads, lim)
    return out


def _head_centre(o: _Organ, top_mm: float) -> npt.NDArray[np.float64]:
    top = o.points[:, 2].max()
    return o.points[o.points[:, 2] >= top - top_mm].mean(axis=0)


def _femoral_heads(
    p_name: str, p: npt.NDArray[np.float64], heads: Mapping[str, _Organ], lim: PlausibilityLimits
) -> list[Finding]:
    out: list[Finding] = []
    l_name, r_name = heads["femoral_head_left"].name, heads["femoral_head_right"].name
    left = _head_centre(heads["femoral_head_left"], lim.femoral_head_top_mm)
    right = _head_centre(heads["femoral_head_right"], lim.femoral_head_top_mm)
    if not min(left[0], right[0]) < p[0] < max(left[0], right[0]):
        out.append(
            Finding(
                "position",
                "refuse",
                f"prostate {p_name!r} (x = {p[0]:.0f} mm) is not between the femoral heads "
                f"{r_name!r} and {l_name!r} (x = {right[0]:.0f} and {left[0]:.0f} mm)",
                roi=p_name,
                value=round(float(p[0]), 1),
            )
        )
    if left[0] < right[0]:
        out.append(
            Finding(
                "position",
                "warn",
                f"femoral head {l_name!r} is right of {r_name!r}: are the names swapped?",
                roi=l_name,
            )
        )
    above = float(p[2] - (left[2] + right[2]) / 2)
    if above > lim.prostate_above_heads_warn_mm:
        severity: Severity = "refuse" if above > lim.prostate_above_heads_refuse_mm else "warn"
        out.append(
            Finding(
                "position",
                severity,
                f"prostate {p_name!r} lies {above:.0f} mm superior of the femoral heads' "
                f"centres (expected at their level or below; {lim.prostate_above_heads_warn_mm:g}"
                " mm tolerated)",
                roi=p_name,
                value=round(above, 1),
            )
        )
    elif -above > lim.prostate_below_heads_warn_mm:
        out.append(
            Finding(
                "position",
                "warn",
                f"prostate {p_name!r} lies {-above:.0f} mm inferior of the femoral heads' "
                f"centres (expected within {lim.prostate_below_heads_warn_mm:g} mm)",
                roi=p_name,
                value=round(above, 1),
            )
        )
    return out


def check_positions(
    masks: Mapping[str, Volume | npt.ArrayLike],
    mapping: RoiMapping,
    geometry: Geometry,
    limits: PlausibilityLimits | None = None,
) -> list[Finding]:
    """Organs where a male pelvis has them, relative to each other and to the femoral heads.

    LPS: +x is the patient's left, +y posterior, +z superior (whatever the patient position).

    Args:
        masks: ROI name -> mask on `geometry`.
        mapping: the ROI-name decisions (organs and femoral heads).
        geometry: the grid of the masks.
        limits: the limits.

    Returns:
        The findings (none without a prostate).
    """
    lim = limits or PlausibilityLimits()
    organs = _organs(masks, _used_organs(mapping), geometry)
    heads = _organs(masks, mapping.landmarks, geometry)
    return _positions(organs, heads, lim)


def _fill_slices(tissue: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Fill the holes of each axial slice (2D: the lungs are holes of a thorax slice)."""
    image = sitk.GetImageFromArray(tissue.astype(np.uint8))
    out = np.empty_like(tissue)
    for k in range(tissue.shape[0]):
        out[k] = sitk.GetArrayFromImage(sitk.BinaryFillhole(image[:, :, k], fullyConnected=False))
    return out.astype(bool)


def _air_fraction(ct: Volume, kji: npt.NDArray[np.intp], margin_mm: float, air_hu: float) -> float:
    if len(kji) == 0:
        return 0.0
    g = ct.geometry
    margin = np.ceil(margin_mm / np.asarray(g.spacing, float)[::-1]).astype(int)
    lo = np.maximum(kji.min(axis=0) - margin, 0)
    hi = np.minimum(kji.max(axis=0) + margin + 1, g.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    inside = np.zeros(tuple(int(b - a) for a, b in zip(lo, hi, strict=True)), bool)
    rel = kji - lo
    inside[rel[:, 0], rel[:, 1], rel[:, 2]] = True
    # the body is filled on whole slices: in a crop, a lung would touch the border (no hole);
    # counted on every s-th row and column (pixels of about 2 mm: 4x less work, same fraction)
    s = max(1, int(2.0 // float(min(g.spacing[0], g.spacing[1]))))
    (j0, j1), (i0, i1) = ((-(-b.start // s), -(-b.stop // s)) for b in box[1:])
    tissue = np.asarray(ct.array[box[0], ::s, ::s]) > air_hu
    body = _fill_slices(tissue)[:, j0:j1, i0:i1]
    body &= ~inside[:, s * j0 - int(lo[1]) :: s, s * i0 - int(lo[2]) :: s]
    tissue = tissue[:, j0:j1, i0:i1]
    n = int(body.sum())
    return float((body & ~tissue).sum()) / n if n else 0.0


def air_fraction(
    ct: Volume,
    organs: npt.ArrayLike,
    margin_mm: float = 20.0,
    air_hu: float = -400.0,
) -> float:
    """Fraction of air in the body around the organs (the organs' own voxels not counted).

    Args:
        ct: CT in HU.
        organs: (nz, ny, nx) union of the organs, on the CT grid.
        margin_mm: margin around the organs' bounding box, mm.
        air_hu: HU below which a body voxel is air.

    Returns:
        Air voxels / body voxels in the box (0 for an empty box).
    """
    return _air_fraction(ct, _index_points(organs), margin_mm, air_hu)


def _anatomy(ct: Volume, organs: Mapping[str, _Organ], lim: PlausibilityLimits) -> list[Finding]:
    if not organs:
        return []
    kji = np.concatenate([o.kji for o in organs.values()])
    frac = _air_fraction(ct, kji, lim.air_margin_mm, lim.air_hu)
    if frac <= lim.max_air_fraction:
        return []
    names = ", ".join(repr(o.name) for o in organs.values())
    return [
        Finding(
            "anatomy",
            "refuse",
            f"{100 * frac:.0f} % of the body within {lim.air_margin_mm:g} mm of {names} is air "
            f"(below {lim.air_hu:g} HU; a pelvis holds at most {100 * lim.max_air_fraction:.0f} "
            "% of bowel gas there): lungs, not a pelvis?",
            value=round(frac, 4),
        )
    ]


def check_anatomy(
    ct: Volume,
    masks: Mapping[str, Volume | npt.ArrayLike],
    mapping: RoiMapping,
    limits: PlausibilityLimits | None = None,
) -> list[Finding]:
    """Lung-like air around the organs: a thorax (or an abdomen) is not a pelvis.

    Args:
        ct: the planning CT, HU.
        masks: ROI name -> mask on the CT grid.
        mapping: the ROI-name decisions.
        limits: the limits.

    Returns:
        A refusal when the body around the organs holds more air than a pelvis does.
    """
    lim = limits or PlausibilityLimits()
    return _anatomy(ct, _organs(masks, _used_organs(mapping), ct.geometry), lim)


def check_planning(
    masks: Mapping[str, Volume | npt.ArrayLike],
    mapping: RoiMapping,
    geometry: Geometry,
    ct: Volume | None = None,
    limits: PlausibilityLimits | None = None,
) -> list[Finding]:
    """Every check of the planning structure set (names, volumes, positions, anatomy).

    Args:
        masks: ROI name -> mask (`Volume` or (nz, ny, nx) array) on the planning CT grid.
        mapping: the ROI-name decisions (`jrs.core.labels.SynonymTable.resolve`).
        geometry: the planning CT grid.
        ct: the planning CT (HU) for the anatomy check; skipped when None.
        limits: the limits.

    Returns:
        The findings, refusals first.
    """
    lim = limits or PlausibilityLimits()
    out = check_names(mapping)
    organs = _organs(masks, _used_organs(mapping), geometry)
    if organs:
        out += _volumes(organs, geometry, lim)
        out += _positions(organs, _organs(masks, mapping.landmarks, geometry), lim)
        if ct is not None:
            out += _anatomy(ct, organs, lim)
    return sorted(out, key=lambda f: f.severity != "refuse")


def check_coverage(
    masks: Mapping[str, Volume | npt.ArrayLike],
    mapping: RoiMapping,
    planning: Geometry,
    transform: sitk.Transform,
    daily: Geometry,
    limits: PlausibilityLimits | None = None,
) -> list[Finding]:
    """Does the daily CT cover the planning organs once pre-aligned?

    Args:
        masks: ROI name -> mask on the planning grid.
        mapping: the ROI-name decisions.
        planning: the planning CT grid.
        transform: the pre-alignment, daily point -> planning point.
        daily: the daily CT grid.
        limits: the limits.

    Returns:
        One finding per organ reaching beyond the daily CT by more than the tolerance.
    """
    lim = limits or PlausibilityLimits()
    inverse = transform.GetInverse()
    ct_corners = daily.corners()
    ct_lo, ct_hi = ct_corners.min(axis=0), ct_corners.max(axis=0)
    sides = [("right", "left"), ("anterior", "posterior"), ("inferior", "superior")]
    out: list[Finding] = []
    for organ, o in _organs(masks, _used_organs(mapping), planning).items():
        lo, hi = o.kji.min(axis=0)[::-1], o.kji.max(axis=0)[::-1]
        corners = np.array(
            [[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])],
            float,
        )
        pts = np.array(
            [
                inverse.TransformPoint(tuple(map(float, q)))
                for q in planning.index_to_physical(corners)
            ]
        )
        beyond_each = np.concatenate([ct_lo - pts.min(axis=0), pts.max(axis=0) - ct_hi])
        worst = int(np.argmax(beyond_each))
        beyond = float(beyond_each[worst])
        if beyond <= lim.coverage_tolerance_mm:
            continue
        side = sides[worst % 3][worst // 3]
        severity: Severity = "refuse" if organ in ("prostate", "seminal_vesicles") else "warn"
        out.append(
            Finding(
                "coverage",
                severity,
                f"the daily CT does not cover the {organ.replace('_', ' ')} {o.name!r}: after "
                f"pre-alignment it reaches {beyond:.0f} mm beyond the CT's {side} end; the "
                "daily scan must cover the planning organs",
                roi=o.name,
                value=round(beyond, 1),
            )
        )
    return sorted(out, key=lambda f: f.severity != "refuse")


def enforce(findings: list[Finding], method: str) -> list[Finding]:
    """Refuse the case, or return the findings as warnings to report.

    Args:
        findings: from `check_planning` / `check_coverage`.
        method: ``network`` refuses on any ``refuse`` finding; ``iterative`` (which propagates
            any ROI of any site) turns every finding into a warning.

    Returns:
        The findings to report (all warnings), each also logged.

    Raises:
        InvalidInput: for the network method when a finding refuses the case; the message
            lists every refusal, says what the product re-contours and how to propagate the
            ROIs anyway.
    """
    refusals = [f for f in findings if f.severity == "refuse"]
    if refusals and method == "network":
        reasons = "; ".join(f.message for f in refusals)
        if all(f.check == "coverage" for f in refusals):
            raise InvalidInput(
                f"refused: {reasons}. Check that the daily CT covers the pelvis of the same patient"
            )
        raise InvalidInput(
            "refused: this case does not look like a male pelvis the network can re-contour: "
            f"{reasons}. {SCOPE}; {ITERATIVE_HINT}."
        )
    out = []
    for f in findings:
        if f.severity == "refuse":
            f = Finding(
                f.check, "warn", f"{f.message} (not blocking: --method {method})", f.roi, f.value
            )
        log.warning("plausibility (%s): %s", f.check, f.message)
        out.append(f)
    return out
