"""The held-out "dome" deformation engine (`jrs.synth.dome_engine`) and its wiring."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from jrs.cli import app
from jrs.core.errors import InvalidInput
from jrs.core.fields import jacobian_determinant, sample_dvf, warp
from jrs.core.geometry import Geometry, Volume
from jrs.core.labels import BLADDER, PROSTATE, RECTUM, SEMINAL_VESICLES, label_map_from_masks
from jrs.io.ct import read_ct_series
from jrs.io.rtstruct import read_rtstruct
from jrs.synth import generate_fraction, generate_patient, write_patient
from jrs.synth.dome_engine import synthesize_dome_fraction
from jrs.synth.dome_push import invert_push
from jrs.synth.engine import EngineFraction
from jrs.synth.from_planning import write_from_planning
from jrs.synth.generator import PhantomPatient

Toy = tuple[Volume, Volume, dict[str, np.ndarray]]


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def patient() -> PhantomPatient:
    return generate_patient(5, matrix=128)


@pytest.fixture(scope="module")
def fraction(patient: PhantomPatient) -> EngineFraction:
    return synthesize_dome_fraction(
        patient.ct, patient.labels, patient.structures, np.random.default_rng(4)
    )


def _make(patient: PhantomPatient, seed: int, **kw: float) -> EngineFraction:
    return synthesize_dome_fraction(
        patient.ct, patient.labels, patient.structures, np.random.default_rng(seed), **kw
    )


def _toy(prostate: bool = True) -> Toy:
    """A small hand-made pelvis (40, 64, 64) of 3 mm: bladder, rectum, prostate, a bone block."""
    g = Geometry((40, 64, 64), origin=np.array([-94.5, -94.5, -58.5]), spacing=np.full(3, 3.0))
    p = g.voxel_centres()
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    body = (x / 90) ** 2 + (y / 70) ** 2 < 1
    ct = np.where(body, 40.0, -1000.0).astype(np.float32)
    masks = {
        "Bladder": np.linalg.norm((p - [0, -10, 30]) / [30, 24, 20], axis=-1) < 1,
        "Rectum": (np.hypot(x, y - 35) < 12) & (np.abs(z) < 45),
    }
    if prostate:
        masks["Prostate"] = np.linalg.norm((p - [0, 8, 2]) / [18, 15, 16], axis=-1) < 1
    ct[masks["Bladder"]] = 10.0
    ct[masks["Rectum"]] = 20.0
    ct[(np.abs(x - 65) < 12) & (np.abs(y) < 15) & (np.abs(z) < 20)] = 900.0
    labels, _ = label_map_from_masks(masks)
    masks["Body"] = body
    return Volume(ct, g), Volume(labels, g), masks


def _setup(f: EngineFraction, pts: np.ndarray) -> np.ndarray:
    """The rigid setup displacement ``S(p) - p`` at LPS points, from the params."""
    s = f.params["setup"]
    rot, centre = np.asarray(s["rotation_matrix"]), np.asarray(s["centre_mm"])
    return (pts - centre) @ (rot - np.eye(3)).T + np.asarray(s["translation_mm"])


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1))


# ------------------------------------------------------------------------------ ground truth
def test_true_dvf_maps_planning_onto_daily(
    patient: PhantomPatient, fraction: EngineFraction
) -> None:
    g = patient.ct.geometry
    assert fraction.true_dvf.array.shape == (*g.shape, 3)
    assert fraction.true_dvf.array.dtype == np.float32
    assert fraction.ct.geometry.same_grid(g)
    assert fraction.ct.geometry.frame_of_reference_uid != g.frame_of_reference_uid
    warped = warp(patient.labels, fraction.true_dvf, "label").array
    for lab in (BLADDER, RECTUM, SEMINAL_VESICLES, PROSTATE):
        assert _dice(warped == lab, fraction.labels.array == lab) >= 0.98, lab
    for name, mask in patient.structures.items():
        moved = warp(Volume(mask.astype(np.uint8), g), fraction.true_dvf, "linear").array >= 0.5
        assert _dice(moved, fraction.structures[name]) >= 0.98, name
    assert float(jacobian_determinant(fraction.true_dvf).min()) > 0.0
    params = json.loads(json.dumps(fraction.params))  # JSON-friendly
    assert params["engine"] == "dome"
    assert params["min_det_jacobian_push"] > 0.25
    assert params["min_det_jacobian"] > 0.0
    assert 0.0 <= params["inversion_residual_mm"] < 0.2
    assert abs(params["prostate_volume_change"]) < 0.05
    # the daily CT is the planning CT warped by the same field, plus noise (and new gas)
    moved_ct = warp(patient.ct, fraction.true_dvf, "linear", -1000.0).array
    diff = fraction.ct.array - moved_ct
    body = (moved_ct > -500) & (moved_ct < 1500) & ~fraction.gas
    assert abs(float(diff[body].std()) - params["noise_hu"]) < 0.15 * params["noise_hu"]


@pytest.mark.parametrize("ratio", [0.6, 1.7])
def test_requested_bladder_ratio(patient: PhantomPatient, ratio: float) -> None:
    f = _make(patient, 0, bladder_ratio=ratio)
    assert f.params["bladder_scale"] == 1.0  # no softening of the bladder for this draw
    assert f.params["bladder"]["ratio_requested"] == ratio
    assert f.params["bladder_volume_ratio"] == pytest.approx(ratio, rel=0.05)
    assert f.params["bladder_volume_ratio"] == pytest.approx(
        f.params["bladder_volume_ratio_target"], rel=0.03
    )
    assert float(jacobian_determinant(f.true_dvf).min()) > 0.0


def test_dome_moves_more_than_the_base(patient: PhantomPatient) -> None:
    f = _make(patient, 1, bladder_ratio=1.6)
    g = patient.ct.geometry
    b0 = np.asarray(f.params["bladder"]["base_point_mm"])
    kk, jj, ii = np.nonzero(f.labels.array == BLADDER)
    pts = g.index_to_physical(np.stack([ii, jj, kk], axis=1))
    far = pts[int(np.argmax(np.linalg.norm(pts - b0, axis=1)))]
    probe = np.stack([b0, far])
    nonrigid = sample_dvf(f.true_dvf, probe) - _setup(f, probe)
    base, dome = np.linalg.norm(nonrigid, axis=1)
    assert dome > 3.0 * base
    assert dome > 5.0


def test_far_field_is_the_rigid_setup(patient: PhantomPatient, fraction: EngineFraction) -> None:
    g = patient.ct.geometry
    kk, jj, ii = np.nonzero(patient.labels.array == PROSTATE)
    centre = g.index_to_physical([ii.mean(), jj.mean(), kk.mean()])
    lo, hi = (np.asarray(v) for v in fraction.params["nonrigid_box_mm"])
    far = g.index_to_physical(np.argwhere(np.ones(g.shape, bool))[::97, ::-1])
    keep = (np.linalg.norm(far - centre, axis=1) >= 150.0) & ~np.all(
        (far >= lo) & (far <= hi), axis=1
    )
    assert keep.sum() > 100
    idx = np.rint(g.physical_to_index(far[keep])).astype(int)
    u = fraction.true_dvf.array[idx[:, 2], idx[:, 1], idx[:, 0]]
    assert np.abs(u - _setup(fraction, far[keep])).max() < 1e-3
    assert np.abs(u).max() > 0.1  # the setup is not the identity


def test_prostate_moves_rigidly(patient: PhantomPatient, fraction: EngineFraction) -> None:
    g = patient.ct.geometry
    mask = fraction.labels.array == PROSTATE
    kk, jj, ii = np.nonzero(mask)
    p = g.index_to_physical(np.stack([ii, jj, kk], axis=1))
    q = p + fraction.true_dvf.array[mask]
    pc, qc = p.mean(axis=0), q.mean(axis=0)
    u, _, vt = np.linalg.svd((p - pc).T @ (q - qc))
    d = np.diag([1.0, 1.0, np.sign(np.linalg.det(vt.T @ u.T))])
    rot = vt.T @ d @ u.T
    residual = np.linalg.norm((p - pc) @ rot.T + qc - q, axis=1)
    assert float(np.sqrt((residual**2).mean())) < 0.5
    assert float(residual.max()) < 1.0


def test_inversion_of_a_push() -> None:
    g = Geometry((30, 30, 30), origin=np.zeros(3), spacing=np.full(3, 3.0))
    q = g.voxel_centres()
    c = np.array([45.0, 45.0, 45.0])
    rel = q - c
    bump = np.exp(-(rel**2).sum(axis=-1) / (2 * 12.0**2))[..., None]
    d = (6.0 * rel / 20.0 * bump + np.array([2.0, -1.0, 0.5]) * bump).astype(np.float32)
    v, residual, _ = invert_push(d, 3.0)
    assert residual < 0.2
    # independent check: p + v(p) pushed forward lands on p
    pts = q.reshape(-1, 3)
    pulled = pts + v.reshape(-1, 3)
    pushed = pulled + sample_dvf(Volume(d, g), pulled)
    inner = np.all((pts > 20) & (pts < 70), axis=1)
    assert np.abs(pushed - pts)[inner].max() < 0.2


# ------------------------------------------------------------------------------ identity, seeds
def test_strength_zero_is_the_identity() -> None:
    ct, labels, structures = _toy()
    f = synthesize_dome_fraction(ct, labels, structures, np.random.default_rng(1), strength=0.0)
    assert not np.any(f.true_dvf.array)
    assert np.array_equal(f.labels.array, labels.array)
    for name, mask in structures.items():
        assert np.array_equal(f.structures[name], mask), name
    assert f.params["bladder_volume_ratio"] == 1.0


def test_same_seed_same_fraction_other_seed_differs() -> None:
    ct, labels, structures = _toy()
    a, b, c = (
        synthesize_dome_fraction(ct, labels, structures, np.random.default_rng(s))
        for s in (7, 7, 8)
    )
    assert np.array_equal(a.ct.array, b.ct.array)
    assert np.array_equal(a.true_dvf.array, b.true_dvf.array)
    assert np.array_equal(a.labels.array, b.labels.array)
    for name in structures:
        assert np.array_equal(a.structures[name], b.structures[name])
    assert a.params == b.params
    assert a.ct.geometry.frame_of_reference_uid == b.ct.geometry.frame_of_reference_uid
    assert not np.array_equal(a.true_dvf.array, c.true_dvf.array)
    assert not np.array_equal(a.ct.array, c.ct.array)


def test_without_prostate_and_bad_inputs() -> None:
    ct, labels, structures = _toy(prostate=False)
    f = synthesize_dome_fraction(ct, labels, structures, np.random.default_rng(3))
    assert f.params["prostate_volume_change"] is None
    assert f.params["bladder_volume_ratio"] == pytest.approx(
        f.params["bladder_volume_ratio_target"], rel=0.03
    )
    assert float(jacobian_determinant(f.true_dvf).min()) > 0.0
    rng = np.random.default_rng(0)
    with pytest.raises(InvalidInput, match="bladder_ratio"):
        synthesize_dome_fraction(ct, labels, structures, rng, bladder_ratio=0.0)
    with pytest.raises(InvalidInput, match="strength"):
        synthesize_dome_fraction(ct, labels, structures, rng, strength=-1.0)
    with pytest.raises(InvalidInput, match="structure"):
        synthesize_dome_fraction(ct, labels, {"x": np.zeros((2, 2, 2), bool)}, rng)


# ------------------------------------------------------------------------------ wiring
def test_generate_fraction_dome(patient: PhantomPatient) -> None:
    frac = generate_fraction(patient, 1, engine="dome")
    assert frac.engine == "dome"
    assert frac.params["engine"] == "dome"
    assert frac.ct.geometry.frame_of_reference_uid != patient.ct.geometry.frame_of_reference_uid
    assert not np.array_equal(frac.labels.array, patient.labels.array)
    with pytest.raises(InvalidInput, match="dome"):
        generate_fraction(patient, 1, engine="bogus")


def test_cli_from_planning_dome(tmp_path: Path) -> None:
    pat = generate_patient(9, matrix=128)
    write_patient(pat, tmp_path / "in")
    ct_dir, rt = tmp_path / "in" / "planning" / "ct", tmp_path / "in" / "planning" / "rtstruct.dcm"
    out = tmp_path / "out"
    args = ["phantom", "--from-planning", str(ct_dir), "--rtstruct", str(rt), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--family", "dome", "--fractions", "1"])
    assert result.exit_code == 0, result.output
    (root,) = [p for p in out.iterdir() if p.is_dir()]
    frac = root / "fraction_1"
    params = json.loads((frac / "params.json").read_text())
    assert params["family"] == "dome" and params["engine"] == "dome"
    assert params["inversion_residual_mm"] < 0.2
    daily = read_ct_series(frac / "ct")
    planning = read_ct_series(root / "planning" / "ct")
    assert daily.frame_of_reference_uid != planning.frame_of_reference_uid
    assert daily.patient.patient_id == planning.patient.patient_id
    ss = read_rtstruct(frac / "rtstruct.dcm")
    assert ss.frame_of_reference_uids == [daily.frame_of_reference_uid]
    dvf = Volume.read(str(frac / "true_dvf.mha"))
    assert dvf.array.shape == (*daily.volume.geometry.shape, 3)


def test_unknown_family(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="organ, dome"):
        write_from_planning(tmp_path / "ct", tmp_path / "rt.dcm", tmp_path / "out", family="svf")
    result = CliRunner().invoke(
        app, ["phantom", "--out", str(tmp_path / "x"), "--family", "svf", "--fractions", "0"]
    )
    assert result.exit_code == 2
    assert "organ or dome" in result.output
