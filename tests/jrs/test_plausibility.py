"""Plausibility checks before the network runs (issue 13): one test per rule.

The cases are built from spheres and cylinders in LPS (mm): +x the patient's left, +y posterior,
+z superior. The reference pelvis puts the prostate at the origin, the bladder superior and
anterior of it, the rectum posterior, the seminal vesicles superior-posterior and the femoral
heads left and right at about the prostate's level.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk

from jrs.core.errors import InvalidInput
from jrs.core.geometry import Geometry, Volume
from jrs.core.labels import SynonymTable
from jrs.qa.plausibility import (
    PlausibilityLimits,
    air_fraction,
    check_anatomy,
    check_coverage,
    check_names,
    check_planning,
    check_positions,
    check_volumes,
    enforce,
)

G = Geometry((60, 80, 110), origin=[-165, -110, -90], spacing=[3.0, 3.0, 3.0])
C = G.voxel_centres()


def _sphere(centre: tuple[float, float, float], radius: float) -> np.ndarray:
    return np.linalg.norm(C - np.asarray(centre), axis=-1) < radius


def _rod(x: float, y: float, z0: float, z1: float, radius: float) -> np.ndarray:
    inside = np.hypot(C[..., 0] - x, C[..., 1] - y) < radius
    return inside & (C[..., 2] >= z0) & (C[..., 2] <= z1)


@dataclass
class Case:
    """A synthetic structure set (ROI name -> mask) and its CT."""

    masks: dict[str, np.ndarray] = field(default_factory=dict)
    ct: Volume | None = None

    def mapping(self, table: SynonymTable | None = None) -> Any:
        return (table or SynonymTable()).resolve(self.masks)

    def check(self, table: SynonymTable | None = None, **limits: Any) -> list[Any]:
        return check_planning(
            self.masks, self.mapping(table), G, self.ct, PlausibilityLimits(**limits)
        )


def _pelvis(**moves: tuple[tuple[float, float, float], float]) -> Case:
    """The reference pelvis; ``moves`` replaces an organ's (centre, radius)."""
    spec = {
        "Prostate": ((0.0, 0.0, 0.0), 20.0),  # 33 cc
        "Bladder": ((0.0, -15.0, 45.0), 35.0),  # 180 cc
        "SeminalVes": ((0.0, 15.0, 25.0), 10.0),  # 4 cc
        "Femur_Head_L": ((90.0, 0.0, 10.0), 22.0),
        "Femur_Head_R": ((-90.0, 0.0, 10.0), 22.0),
    }
    spec.update(moves)
    masks = {name: _sphere(*cr) for name, cr in spec.items()}
    masks["Rectum"] = _rod(0.0, 32.0, -40.0, 40.0, 14.0)  # 49 cc, posterior of the prostate
    body = (C[..., 0] / 160) ** 2 + (C[..., 1] / 105) ** 2 < 1
    hu = np.where(body, 40.0, -1000.0).astype(np.float32)
    hu[_rod(0.0, 32.0, -20.0, 20.0, 6.0)] = -950.0  # rectal gas, inside the rectum
    return Case(masks, Volume(hu, G))


def _codes(findings: list[Any]) -> list[tuple[str, str, str | None]]:
    return [(f.check, f.severity, f.roi) for f in findings]


def test_reference_pelvis_passes_every_check() -> None:
    case = _pelvis()
    assert case.check() == []


# ------------------------------------------------------------------------------ volumes
def test_volume_outside_clinical_range_is_a_warning_naming_roi_and_value() -> None:
    case = _pelvis(Prostate=((0.0, 0.0, 0.0), 38.0))  # 230 cc: large, possible
    findings = check_volumes(case.masks, case.mapping(), G)
    assert _codes(findings) == [("volume", "warn", "Prostate")]
    assert "'Prostate'" in findings[0].message and "cc" in findings[0].message
    assert findings[0].value == pytest.approx(230, rel=0.05)


def test_volume_outside_hard_range_is_refused() -> None:
    case = _pelvis(Prostate=((0.0, 0.0, 0.0), 6.0))  # 0.9 cc
    assert ("volume", "refuse", "Prostate") in _codes(check_volumes(case.masks, case.mapping(), G))


# ------------------------------------------------------------------------------ positions
def test_bladder_inferior_of_prostate_is_refused() -> None:
    case = _pelvis(Bladder=((0.0, -15.0, -50.0), 30.0))
    findings = check_positions(case.masks, case.mapping(), G)
    assert ("position", "refuse", "Bladder") in _codes(findings)
    assert "inferior" in findings[0].message


def test_bladder_far_posterior_of_prostate_is_a_warning() -> None:
    case = _pelvis(Bladder=((0.0, 40.0, 45.0), 30.0))
    assert _codes(check_positions(case.masks, case.mapping(), G)) == [
        ("position", "warn", "Bladder")
    ]


def test_rectum_anterior_of_prostate_is_refused() -> None:
    case = _pelvis()
    case.masks["Rectum"] = _rod(0.0, -35.0, -40.0, 40.0, 12.0)
    findings = check_positions(case.masks, case.mapping(), G)
    assert _codes(findings) == [("position", "refuse", "Rectum")]
    assert "anterior" in findings[0].message


def test_seminal_vesicles_inferior_of_prostate_are_a_warning() -> None:
    case = _pelvis(SeminalVes=((0.0, 15.0, -25.0), 10.0))
    assert _codes(check_positions(case.masks, case.mapping(), G)) == [
        ("position", "warn", "SeminalVes")
    ]


def test_prostate_not_between_the_femoral_heads_is_refused() -> None:
    case = _pelvis(Femur_Head_L=((140.0, 0.0, 10.0), 20.0), Femur_Head_R=((40.0, 0.0, 10.0), 20.0))
    findings = check_positions(case.masks, case.mapping(), G)
    assert ("position", "refuse", "Prostate") in _codes(findings)
    assert "between the femoral heads" in findings[0].message


def test_prostate_above_the_femoral_heads() -> None:
    warn = _pelvis(
        Femur_Head_L=((90.0, 0.0, -25.0), 22.0), Femur_Head_R=((-90.0, 0.0, -25.0), 22.0)
    )
    assert _codes(check_positions(warn.masks, warn.mapping(), G)) == [
        ("position", "warn", "Prostate")
    ]
    refuse = _pelvis(
        Femur_Head_L=((90.0, 0.0, -75.0), 12.0), Femur_Head_R=((-90.0, 0.0, -75.0), 12.0)
    )
    findings = check_positions(refuse.masks, refuse.mapping(), G)
    assert _codes(findings) == [("position", "refuse", "Prostate")]
    assert "superior of the femoral heads" in findings[0].message


def test_swapped_femoral_head_names_are_a_warning() -> None:
    case = _pelvis(Femur_Head_L=((-90.0, 0.0, 10.0), 22.0), Femur_Head_R=((90.0, 0.0, 10.0), 22.0))
    findings = check_positions(case.masks, case.mapping(), G)
    assert _codes(findings) == [("position", "warn", "Femur_Head_L")]
    assert "swapped" in findings[0].message


def test_positions_hold_in_any_patient_position() -> None:
    """The checks are in LPS: storing the arrays feet-first prone changes nothing."""
    from jrs.core.geometry import PATIENT_POSITION_DIRECTIONS, reorient

    case = _pelvis()
    ffp = {
        n: reorient(Volume(m.astype(np.uint8), G), PATIENT_POSITION_DIRECTIONS["FFP"])
        for n, m in case.masks.items()
    }
    grid = next(iter(ffp.values())).geometry
    assert check_planning(ffp, case.mapping(), grid) == []


# ------------------------------------------------------------------------------ anatomy
def _thorax() -> Case:
    """A thorax: a mediastinal 'CTVp' of ~470 cc between two lungs, no pelvic organ."""
    body = (C[..., 0] / 160) ** 2 + (C[..., 1] / 105) ** 2 < 1
    hu = np.where(body, 40.0, -1000.0).astype(np.float32)
    lungs = ((np.abs(C[..., 0]) - 85) / 60) ** 2 + (C[..., 1] / 80) ** 2 < 1
    hu[lungs & body] = -850.0
    ctv = _sphere((0.0, 0.0, 0.0), 48.2)
    lung_l = lungs & (C[..., 0] > 0)
    lung_r = lungs & (C[..., 0] < 0)
    return Case({"CTVp": ctv, "Lung_L": lung_l, "Lung_R": lung_r, "PTV": ctv}, Volume(hu, G))


def test_lungs_around_the_organs_are_refused() -> None:
    thorax = _thorax()
    table = SynonymTable({"prostate": ["CTVp"]})  # a user maps the CTVp explicitly
    assert thorax.ct is not None
    findings = check_anatomy(thorax.ct, thorax.masks, thorax.mapping(table))
    assert _codes(findings) == [("anatomy", "refuse", None)]
    assert "air" in findings[0].message and "not a pelvis" in findings[0].message
    pelvis = _pelvis()
    assert pelvis.ct is not None
    organs = np.any([pelvis.masks[n] for n in ("Prostate", "Bladder", "Rectum")], axis=0)
    assert air_fraction(pelvis.ct, organs) < 0.01  # the rectal gas lies inside the rectum


def test_thorax_ctvp_is_not_taken_for_a_prostate() -> None:
    """Issue 13's lung case: without a synonym file, nothing maps and the network refuses."""
    thorax = _thorax()
    findings = thorax.check()
    assert _codes(findings)[0] == ("names", "refuse", None)
    with pytest.raises(InvalidInput) as err:
        enforce(findings, "network")
    message = str(err.value)
    assert "does not look like a male pelvis" in message
    assert "'CTVp'" in message and "ambiguous" in message
    assert "re-contours the prostate, seminal vesicles, bladder and rectum" in message
    assert "--method iterative" in message


def test_thorax_ctvp_mapped_by_the_user_is_refused() -> None:
    thorax = _thorax()
    findings = thorax.check(SynonymTable({"prostate": ["CTVp"]}))
    codes = _codes(findings)
    assert ("volume", "refuse", "CTVp") in codes  # 469 cc
    assert ("anatomy", "refuse", None) in codes
    volume = next(f for f in findings if f.check == "volume")
    assert volume.value == pytest.approx(469, rel=0.03)
    with pytest.raises(InvalidInput, match=r"'CTVp' taken for the prostate has 4\d\d\.\d cc"):
        enforce(findings, "network")


def test_iterative_method_turns_refusals_into_warnings(caplog: pytest.LogCaptureFixture) -> None:
    findings = _thorax().check()
    with caplog.at_level("WARNING", logger="jrs.qa.plausibility"):
        reported = enforce(findings, "iterative")
    assert reported and all(f.severity == "warn" for f in reported)
    assert "not blocking: --method iterative" in reported[0].message
    assert "none of the ROI names" in caplog.text


# ------------------------------------------------------------------------------ names
def test_names_findings() -> None:
    mapping = SynonymTable().resolve(["Prostate_DL", "Rectum", "CTVp"])
    # an automatic contour used for lack of a manual one is reported; a CTVp beside a prostate
    # contour is ordinary (no noise)
    assert _codes(check_names(mapping)) == [("names", "warn", "Prostate_DL")]
    # without a prostate, an ambiguous abbreviation may be it: reported
    mapping = SynonymTable().resolve(["Bladder", "Rectum", "CTVp", "PTV"])
    assert _codes(check_names(mapping)) == [("names", "warn", "CTVp"), ("names", "warn", "PTV")]
    assert _codes(check_names(SynonymTable().resolve(["Lung_L", "GTVp"]))) == [
        ("names", "refuse", None)
    ]


# ------------------------------------------------------------------------------ coverage
def test_daily_scan_must_cover_the_organs() -> None:
    case = _pelvis()
    mapping = case.mapping()
    identity = sitk.AffineTransform(3)
    assert check_coverage(case.masks, mapping, G, identity, G) == []
    # a daily CT whose superior end is at z = +12 mm: it cuts the bladder and the prostate
    short = Geometry((34, 80, 110), origin=[-165, -110, -87], spacing=[3.0, 3.0, 3.0])
    findings = check_coverage(case.masks, mapping, G, identity, short)
    codes = _codes(findings)
    assert codes[0] == ("coverage", "refuse", "Prostate")
    assert ("coverage", "warn", "Bladder") in codes
    assert "superior end" in findings[0].message
    with pytest.raises(InvalidInput, match="daily CT does not cover the prostate 'Prostate'"):
        enforce(findings, "network")
    # a setup shift that the pre-alignment knows of is taken into account
    shifted = sitk.AffineTransform(3)
    shifted.SetTranslation((0.0, 0.0, 60.0))  # daily p -> planning p + 60 mm
    assert ("coverage", "refuse", "Prostate") not in _codes(
        check_coverage(case.masks, mapping, G, shifted, short)
    )


def test_real_pelvic_ref_cases_pass(shared_data: Path) -> None:
    from jrs.io.rtstruct import masks_from_files

    for patient in ("Pelvic-Ref-002", "Pelvic-Ref-005"):
        folder = shared_data / "pelvic-ref" / patient
        _, ct, masks = masks_from_files(folder / "ct", folder / "rtstruct.dcm")
        mapping = SynonymTable().resolve(masks)
        assert check_planning(masks, mapping, ct.volume.geometry, ct.volume) == [], patient
