"""Behaviour of the synthetic pelvis: anatomy, HU, reproducibility, exact fraction truth, output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from jrs.core.errors import InvalidInput
from jrs.core.fields import affine_to_dvf, jacobian_determinant, warp, warp_mask
from jrs.core.geometry import Volume, reorient
from jrs.core.labels import BLADDER, PROSTATE, RECTUM, SEMINAL_VESICLES
from jrs.core.metrics import centroid_mm, dice, volume_cc
from jrs.synth import (
    ROI_NAMES,
    PhantomFraction,
    PhantomPatient,
    generate_fraction,
    generate_patient,
)
from jrs.synth.deformation import rotation_matrix

SMALL = {"matrix": 160, "slice_thickness": 3.0}
ORGANS = {
    BLADDER: "Bladder",
    RECTUM: "Rectum",
    SEMINAL_VESICLES: "SeminalVesicles",
    PROSTATE: "Prostate",
}


@pytest.fixture(scope="module")
def patient() -> PhantomPatient:
    return generate_patient(7, **SMALL)


@pytest.fixture(scope="module")
def fractions(patient: PhantomPatient) -> list[PhantomFraction]:
    return [generate_fraction(patient, k) for k in (1, 2)]


def test_reproducible_by_seed(patient: PhantomPatient) -> None:
    again = generate_patient(7, **SMALL)
    np.testing.assert_array_equal(again.ct.array, patient.ct.array)
    np.testing.assert_array_equal(again.labels.array, patient.labels.array)
    assert again.ct.geometry.frame_of_reference_uid == patient.ct.geometry.frame_of_reference_uid
    other = generate_patient(8, **SMALL)
    assert other.params["anatomy"] != patient.params["anatomy"]
    a = volume_cc(patient.structures["Bladder"], patient.ct.geometry)
    b = volume_cc(other.structures["Bladder"], other.ct.geometry)
    assert a != b
    f1 = generate_fraction(patient, 1)
    f1b = generate_fraction(patient, 1)
    np.testing.assert_array_equal(f1.true_dvf.array, f1b.true_dvf.array)
    np.testing.assert_array_equal(f1.ct.array, f1b.ct.array)


def test_structures_labels_and_identity(patient: PhantomPatient) -> None:
    assert set(patient.structures) == set(ROI_NAMES)
    assert patient.labels.array.dtype == np.uint8
    assert set(np.unique(patient.labels.array)) == {0, 1, 2, 3, 4}
    assert patient.patient.patient_id == "JRS-PH-007"
    assert patient.name == "phantom_007"
    series = patient.ct_series()
    assert series.frame_of_reference_uid == patient.ct.geometry.frame_of_reference_uid
    assert len(set(series.sop_instance_uids)) == patient.ct.geometry.shape[0]


def test_hu_per_tissue(patient: PhantomPatient) -> None:
    ct = patient.ct.array
    core = {k: _erode(v) for k, v in patient.structures.items()}
    assert 0 <= np.median(ct[core["Bladder"]]) <= 20  # urine (the thin wall is eroded away)
    assert 25 <= np.median(ct[core["Prostate"]]) <= 55
    assert np.mean(ct[patient.tissues["bone"]]) > 300
    assert np.median(ct[patient.tissues["fat"]]) < -50
    gas = patient.tissues["gas"]
    if gas.any():  # small pockets: their cores reach air, their rims are partial volume
        assert ct[gas].min() < -900 and np.median(ct[gas]) < -500
    assert ct.min() >= -1024 and ct.max() <= 3071
    # noise: independent, correlated, ~15-30 HU in a uniform region (muscle core)
    muscle = ct[patient.tissues["muscle"] & ~patient.tissues["bone"]]
    assert 10 < np.std(muscle) < 40


def test_organ_volumes_and_adjacency(patient: PhantomPatient) -> None:
    g = patient.ct.geometry
    vol = {k: volume_cc(patient.structures[k], g) for k in ORGANS.values()}
    assert 20 <= vol["Prostate"] <= 70
    assert 60 <= vol["Bladder"] <= 450
    assert 3 <= vol["SeminalVesicles"] <= 30
    c = {k: centroid_mm(patient.structures[k], g) for k in ("Prostate", "Bladder")}
    assert c["Bladder"][2] > c["Prostate"][2] + 15  # bladder superior (LPS z up)
    pro = patient.structures["Prostate"]
    rect = patient.structures["Rectum"]
    zs = np.nonzero(pro.any(axis=(1, 2)))[0]
    k = int(zs[len(zs) // 2])  # a mid-prostate slice: rectum posterior (LPS y larger)
    y_p = np.nonzero(pro[k].any(axis=1))[0].max()
    y_r = np.nonzero(rect[k].any(axis=1))[0]
    assert y_r.min() >= y_p - 1
    # organs do not sit inside bone
    for name in ORGANS.values():
        assert (patient.structures[name] & patient.tissues["bone"]).sum() == 0


def test_fraction_truth_is_exact(patient: PhantomPatient, fractions: list[PhantomFraction]) -> None:
    for f in fractions:
        dvf = f.true_dvf
        assert dvf.array.shape == (*f.ct.geometry.shape, 3) and dvf.array.dtype == np.float32
        assert dvf.geometry.same_grid(f.ct.geometry)
        assert f.ct.geometry.frame_of_reference_uid != patient.ct.geometry.frame_of_reference_uid
        warped = warp(patient.labels, dvf, "label", 0).array
        for lab in ORGANS:
            assert dice(warped == lab, f.labels.array == lab) >= 0.99
        # the Body runs through the top/bottom slices: compare where p + u(p) is inside the
        # planning scan (the generator warps from a model grid 30 mm longer than the scan)
        pg = patient.ct.geometry
        k = pg.physical_to_index(dvf.geometry.voxel_centres() + dvf.array)[..., 2]
        inside = (k >= 0) & (k <= pg.shape[0] - 1)
        for name in ("Prostate", "PTV", "FemoralHead_L", "Body"):
            moved = warp_mask(Volume(patient.structures[name], pg), dvf).array
            assert dice(moved & inside, f.structures[name] & inside) >= 0.99, name
        det = jacobian_determinant(dvf)
        assert det.min() > 0.2, det.min()
        assert 0.02 < float(det.std()) < 0.3
        assert det.max() < 2.5


def test_fraction_parameters_are_realised(
    patient: PhantomPatient, fractions: list[PhantomFraction]
) -> None:
    g = patient.ct.geometry
    for f in fractions:
        p = f.params
        t = np.asarray(p["setup_translation_mm"])
        assert np.all(np.abs(t) <= 10) and np.all(np.abs(p["setup_rotation_deg"]) <= 3)
        assert 0.5 <= p["bladder_factor"] <= 2.0
        ratio = volume_cc(f.structures["Bladder"], g) / volume_cc(patient.structures["Bladder"], g)
        assert abs(ratio / p["bladder_factor"] - 1) < 0.1
        # the rigid part: the setup transform as a DVF, compared inside the body
        anchor = np.asarray(patient.params["anchor_lps_mm"])
        rigid = sitk.AffineTransform(3)
        rigid.SetMatrix(tuple(rotation_matrix(p["setup_rotation_deg"]).reshape(-1)))
        rigid.SetCenter(tuple(anchor))
        rigid.SetTranslation(tuple(t))
        ref = affine_to_dvf(rigid, f.true_dvf.geometry).array
        body = f.structures["Body"]
        diff = f.true_dvf.array[body].mean(axis=0) - ref[body].mean(axis=0)
        assert np.linalg.norm(diff) < 2.0
        # prostate: daily centroid = planning centroid moved by the setup and <= 5 mm more
        c_plan = centroid_mm(patient.structures["Prostate"], g)
        c_day = centroid_mm(f.structures["Prostate"], g)
        rot = rotation_matrix(p["setup_rotation_deg"])
        setup_only = (c_plan - anchor - t) @ rot + anchor  # R^T (c - t) about the anchor
        assert np.linalg.norm(c_day - setup_only) <= 5.5
        # gas comes and goes, inside the rectum
        assert not np.any(f.gas & ~f.structures["Rectum"] & ~_dilate(f.structures["Rectum"]))


@pytest.mark.parametrize("position", ["HFP", "FFS", "FFP"])
def test_patient_positions_same_lps_anatomy(patient: PhantomPatient, position: str) -> None:
    other = generate_patient(7, position, **SMALL)
    assert other.patient_position == position
    back = reorient(other.ct, patient.ct.geometry.direction)
    assert back.geometry.same_grid(patient.ct.geometry)
    for name in ORGANS.values():
        a = centroid_mm(patient.structures[name], patient.ct.geometry)
        b = centroid_mm(other.structures[name], other.ct.geometry)
        assert np.linalg.norm(a - b) < 1.0
    f = generate_fraction(other, 1)
    assert f.true_dvf.geometry.same_grid(f.ct.geometry)
    assert jacobian_determinant(f.true_dvf).min() > 0.2


def test_unknown_position_is_rejected() -> None:
    with pytest.raises(InvalidInput, match="HFS"):
        generate_patient(0, "XYZ")


@pytest.mark.slow
def test_default_size_patient_and_fraction() -> None:
    p = generate_patient(0)
    grid = p.params["grid"]
    assert grid["matrix"] == 512 and 0.8 <= grid["pixel_mm"] <= 1.2
    assert 1.5 <= grid["slice_mm"] <= 3.0
    extent = (p.ct.geometry.shape[0] - 1) * grid["slice_mm"]
    assert 120 <= extent <= 200
    f = generate_fraction(p, 1)
    warped = warp(p.labels, f.true_dvf, "label", 0).array
    for lab in ORGANS:
        assert dice(warped == lab, f.labels.array == lab) >= 0.99


def test_write_dataset_layout_and_round_trip(tmp_path: Path) -> None:
    pytest.importorskip("jrs.io.rtstruct")
    from jrs.io.ct import read_ct_series
    from jrs.io.rtstruct import read_rtstruct, rtstruct_to_masks
    from jrs.synth import dataset

    patient = generate_patient(11, **SMALL)
    folder = tmp_path / patient.name
    dataset.write_patient(patient, folder)
    frac = generate_fraction(patient, 1)
    dataset.write_fraction(frac, folder / "fraction_1")
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert "phantom_011/planning/rtstruct.dcm" in files
    assert "phantom_011/fraction_1/rtstruct.dcm" in files
    assert "phantom_011/fraction_1/true_dvf.mha" in files
    n_ct = patient.ct.geometry.shape[0]
    assert sum(f.startswith("phantom_011/planning/ct/") for f in files) == n_ct
    assert sum(f.startswith("phantom_011/fraction_1/ct/") for f in files) == n_ct
    assert len(files) == 2 * n_ct + 3
    for obj, sub in ((patient, "planning"), (frac, "fraction_1")):
        series = read_ct_series(folder / sub / "ct")
        assert series.volume.geometry.same_grid(obj.ct.geometry, tol_mm=0.01)
        assert series.frame_of_reference_uid == obj.ct.geometry.frame_of_reference_uid
        assert np.abs(series.volume.array - obj.ct.array).max() <= 1.0
        masks = rtstruct_to_masks(read_rtstruct(folder / sub / "rtstruct.dcm"), series)
        for name in ROI_NAMES:
            assert dice(masks[name].array, obj.structures[name]) >= 0.98, (sub, name)
    dvf = sitk.ReadImage(str(folder / "fraction_1" / "true_dvf.mha"))
    assert dvf.GetNumberOfComponentsPerPixel() == 3
    assert dvf.GetPixelID() == sitk.sitkVectorFloat32
    back = Volume.from_sitk(dvf)
    assert back.geometry.same_grid(frac.ct.geometry)
    np.testing.assert_array_equal(back.array, frac.true_dvf.array)


def test_write_dataset_names_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("jrs.io.rtstruct")
    from jrs.synth import dataset

    monkeypatch.setattr(
        dataset, "generate_patient", lambda s, pos: generate_patient(s, pos, **SMALL)
    )
    out = dataset.write_dataset(tmp_path, patients=2, fractions=0, seed=4)
    assert [p.name for p in out] == ["phantom_004", "phantom_005"]
    assert sorted(p.name for p in out[0].iterdir()) == ["planning"]


def _erode(mask: np.ndarray) -> np.ndarray:
    img = sitk.BinaryErode(sitk.GetImageFromArray(mask.astype(np.uint8)), [2, 2, 1])
    return sitk.GetArrayFromImage(img).astype(bool)


def _dilate(mask: np.ndarray) -> np.ndarray:
    img = sitk.BinaryDilate(sitk.GetImageFromArray(mask.astype(np.uint8)), [2, 2, 1])
    return sitk.GetArrayFromImage(img).astype(bool)
