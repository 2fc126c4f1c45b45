"""The organ-aware deformation engine (`jrs.synth.engine`) and ``jrs phantom --from-planning``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from jrs.cli import app
from jrs.core.errors import InvalidInput
from jrs.core.fields import jacobian_determinant, warp
from jrs.core.geometry import Geometry, Volume
from jrs.core.labels import (
    BLADDER,
    DEFAULT_SYNONYMS,
    PROSTATE,
    RECTUM,
    SEMINAL_VESICLES,
    SynonymTable,
    label_map_from_masks,
)
from jrs.io.ct import read_ct_series
from jrs.io.rtstruct import read_rtstruct, rtstruct_to_masks
from jrs.synth import generate_fraction, generate_patient, write_patient
from jrs.synth.engine import EngineFraction, _draw, synthesize_fraction
from jrs.synth.generator import PhantomPatient

Toy = tuple[Volume, Volume, dict[str, np.ndarray]]
PELVIC_REF = Path(__file__).resolve().parents[3] / "shared" / "data" / "pelvic-ref"


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def patient() -> PhantomPatient:
    return generate_patient(5, matrix=128)


@pytest.fixture(scope="module")
def fractions(patient: PhantomPatient) -> list[EngineFraction]:
    return [
        synthesize_fraction(
            patient.ct, patient.labels, patient.structures, np.random.default_rng(s)
        )
        for s in range(3)
    ]


def _toy() -> Toy:
    """A hand-made pelvis: soft tissue, bladder, prostate, rectum with gas, a bone block.

    Grid (48, 96, 96) voxels of 2.5 x 2.5 x 3 mm; the bone block (1000 HU, 30 mm cube) sits
    70 mm left of the prostate.
    """
    g = Geometry(
        (48, 96, 96), origin=np.array([-118.75, -118.75, -70.5]), spacing=np.array([2.5, 2.5, 3.0])
    )
    p = g.voxel_centres()
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    body = (x / 110) ** 2 + (y / 85) ** 2 < 1
    ct = np.where(body, 40.0, -1000.0).astype(np.float32)
    fat = body & ((x / 100) ** 2 + (y / 75) ** 2 > 0.8)
    ct[fat] = -90.0
    prostate = np.linalg.norm((p - [0, 5, 0]) / [20, 17, 18], axis=-1) < 1
    bladder = np.linalg.norm((p - [0, -8, 45]) / [32, 26, 24], axis=-1) < 1
    rect_r = np.hypot(x, y - 38)
    rectum = (rect_r < 14) & (np.abs(z) < 45)
    block = (np.abs(x - 70) < 15) & (np.abs(y - 20) < 15) & (np.abs(z) < 15)
    ct[bladder] = 10.0
    ct[prostate] = 45.0
    ct[rectum] = 20.0
    gas = rectum & (np.linalg.norm((p - [0, 36, 5]) / [8, 7, 12], axis=-1) < 1)
    ct[gas] = -1000.0
    ct[block] = 1000.0
    masks = {"Bladder": bladder, "Rectum": rectum, "Prostate": prostate}
    labels, _ = label_map_from_masks(masks)
    structures = {"Body": body, "Bone": block, **masks}
    return Volume(ct, g.with_frame("1.2.3.4")), Volume(labels, g.with_frame("1.2.3.4")), structures


@pytest.fixture(scope="module")
def toy() -> Toy:
    return _toy()


def _rigid(params: dict[str, Any], points: np.ndarray) -> np.ndarray:
    s = params["setup"]
    rot = np.asarray(s["rotation_matrix"])
    c = np.asarray(s["centre_mm"])
    return (points - c) @ (rot - np.eye(3)).T + np.asarray(s["translation_mm"])


# ------------------------------------------------------------------------------ engine
def test_strength_zero_is_identity(toy: Toy) -> None:
    ct, labels, structures = toy
    f = synthesize_fraction(
        ct, labels, structures, np.random.default_rng(3), strength=0.0, noise_hu=0.0
    )
    assert f.true_dvf.array.shape == (*ct.geometry.shape, 3)
    assert f.true_dvf.array.dtype == np.float32
    assert not np.any(f.true_dvf.array)
    np.testing.assert_array_equal(f.labels.array, labels.array)
    np.testing.assert_array_equal(f.ct.array, ct.array)
    for name, m in structures.items():
        np.testing.assert_array_equal(f.structures[name], m)
    assert f.ct.geometry.same_grid(ct.geometry)
    assert f.ct.geometry.frame_of_reference_uid not in (None, "1.2.3.4")
    # with noise: the planning CT plus noise, nothing else
    g = synthesize_fraction(ct, labels, structures, np.random.default_rng(3), strength=0.0)
    diff = (g.ct.array - ct.array)[ct.array > -500]  # air is clipped at -1024 HU
    assert 4.0 < float(diff.std()) < 16.0 and abs(float(diff.mean())) < 1.0
    assert g.params["noise_hu"] == pytest.approx(float(diff.std()), rel=0.1)


def test_det_j_positive(patient: PhantomPatient, fractions: list[EngineFraction]) -> None:
    for f in fractions:
        det = jacobian_determinant(f.true_dvf)
        assert float(det.min()) > 0.0
        assert f.params["min_det_jacobian"] > 0.2
        assert f.true_dvf.geometry.same_grid(patient.ct.geometry)
        json.dumps(f.params)  # JSON-friendly
        # the field is not trivial: a setup error plus a few mm of organ motion
        assert float(np.abs(f.true_dvf.array).max()) > 2.0


def test_bladder_ratio_and_prostate_rigid(fractions: list[EngineFraction]) -> None:
    for f in fractions:
        p = f.params
        target = p["bladder_volume_ratio_target"]
        if p["nonrigid_scale"] == 1.0:
            assert target == pytest.approx(p["bladder"]["factor_drawn"])
        assert 0.5 <= p["bladder_volume_ratio"] <= 1.8
        assert abs(p["bladder_volume_ratio"] / target - 1.0) < 0.15
        assert abs(p["prostate_volume_change"]) < 0.03


def test_labels_are_the_exact_truth(
    patient: PhantomPatient, fractions: list[EngineFraction]
) -> None:
    rng = np.random.default_rng(0)
    pg = patient.ct.geometry
    for f in fractions:
        warped = warp(patient.labels, f.true_dvf, "label", 0).array
        assert int(np.count_nonzero(warped != f.labels.array)) <= 5
        for lab in (BLADDER, RECTUM, SEMINAL_VESICLES, PROSTATE):
            assert np.any(f.labels.array == lab)
        # random daily voxels well inside the prostate map into the planning prostate
        inner = ndimage.binary_erosion(f.labels.array == PROSTATE)
        idx = np.argwhere(inner)
        pick = idx[rng.choice(len(idx), size=min(200, len(idx)), replace=False)]
        pts = pg.index_to_physical(pick[:, ::-1].astype(float))
        moved = pts + f.true_dvf.array[pick[:, 0], pick[:, 1], pick[:, 2]]
        ijk = np.rint(pg.physical_to_index(moved)).astype(int)
        assert np.all(patient.labels.array[ijk[:, 2], ijk[:, 1], ijk[:, 0]] == PROSTATE)
        # structures are warped too
        assert set(f.structures) == set(patient.structures)
        assert f.gas is not None and f.gas.shape == pg.shape


def test_bone_moves_rigidly_and_prostate_keeps_its_volume(toy: Toy) -> None:
    ct, labels, structures = toy
    g = ct.geometry
    for seed in (0, 1):
        f = synthesize_fraction(ct, labels, structures, np.random.default_rng(seed))
        p = f.params
        assert abs(p["prostate_volume_change"]) < 0.03
        assert float(jacobian_determinant(f.true_dvf).min()) > 0.0
        # the daily block = the planning block moved by the setup alone
        inside = f.structures["Bone"]
        assert inside.sum() > 0.8 * structures["Bone"].sum()
        idx = np.argwhere(inside)
        pts = g.index_to_physical(idx[:, ::-1].astype(float))
        u = f.true_dvf.array[inside]
        assert float(np.abs(u - _rigid(p, pts)).max()) < 0.2
        # elsewhere the field is not rigid (soft tissue, bladder, rectum)
        every = g.voxel_centres()
        body = f.structures["Body"] & ~inside
        nonrigid = np.abs(f.true_dvf.array[body] - _rigid(p, every[body])).max()
        assert float(nonrigid) > 1.0


def test_same_seed_same_fraction(toy: Toy) -> None:
    ct, labels, structures = toy
    a = synthesize_fraction(ct, labels, structures, np.random.default_rng(11))
    b = synthesize_fraction(ct, labels, structures, np.random.default_rng(11))
    np.testing.assert_array_equal(a.ct.array, b.ct.array)
    np.testing.assert_array_equal(a.labels.array, b.labels.array)
    np.testing.assert_array_equal(a.true_dvf.array, b.true_dvf.array)
    for name in structures:
        np.testing.assert_array_equal(a.structures[name], b.structures[name])
    assert a.params == b.params
    assert a.ct.geometry.frame_of_reference_uid == b.ct.geometry.frame_of_reference_uid
    c = synthesize_fraction(ct, labels, structures, np.random.default_rng(12))
    assert not np.array_equal(a.true_dvf.array, c.true_dvf.array)


def test_rectal_gas_vanishes_or_stays(toy: Toy) -> None:
    ct, labels, structures = toy
    planning_gas = int(((labels.array == RECTUM) & (ct.array < -300)).sum())
    assert planning_gas > 0
    # a seed whose draws make the planning gas vanish and add no new pocket
    seed = next(
        s
        for s in range(100)
        if (d := _draw(np.random.default_rng(s), None)).gas_vanishes and not d.gas_new
    )
    f = synthesize_fraction(ct, labels, structures, np.random.default_rng(seed), noise_hu=0.0)
    assert f.params["gas"]["planning_gas_vanishes"]
    assert f.gas is not None and int(f.gas.sum()) == 0
    rect = f.ct.array[f.labels.array == RECTUM]
    assert float(rect.min()) > -300.0
    kept = synthesize_fraction(
        ct, labels, structures, np.random.default_rng(seed), noise_hu=0.0, gas=False
    )
    assert kept.gas is not None and int(kept.gas.sum()) > 0.5 * planning_gas


def test_bad_inputs(toy: Toy) -> None:
    ct, labels, structures = toy
    with pytest.raises(InvalidInput, match="strength"):
        synthesize_fraction(ct, labels, structures, np.random.default_rng(0), strength=-1.0)
    with pytest.raises(InvalidInput, match="shape"):
        synthesize_fraction(ct, labels, {"x": np.zeros((2, 2, 2), bool)}, np.random.default_rng(0))


def test_analytic_phantom_through_the_engine(patient: PhantomPatient) -> None:
    f = generate_fraction(patient, 1, engine="organ")
    assert f.engine == "organ" and f.params["engine"] == "organ"
    assert f.ct.geometry.same_grid(patient.ct.geometry)
    assert f.gas.shape == patient.ct.geometry.shape and f.gas.dtype == bool
    assert set(f.structures) == set(patient.structures)
    again = generate_fraction(patient, 1, engine="organ")
    np.testing.assert_array_equal(f.true_dvf.array, again.true_dvf.array)
    analytic = generate_fraction(patient, 1)
    assert analytic.engine == "analytic"
    assert f.ct_series().series_instance_uid != analytic.ct_series().series_instance_uid
    assert f.ct.geometry.frame_of_reference_uid != analytic.ct.geometry.frame_of_reference_uid
    with pytest.raises(InvalidInput, match="engine"):
        generate_fraction(patient, 1, engine="nope")


# ------------------------------------------------------------------------------ CLI
def test_cli_from_planning(tmp_path: Path) -> None:
    pat = generate_patient(9, matrix=128)
    write_patient(pat, tmp_path / "in")
    ct_dir, rt = tmp_path / "in" / "planning" / "ct", tmp_path / "in" / "planning" / "rtstruct.dcm"
    out = tmp_path / "out"
    runner = CliRunner()
    args = ["phantom", "--from-planning", str(ct_dir), "--rtstruct", str(rt), "--out", str(out)]
    result = runner.invoke(app, [*args, "--fractions", "1", "--seed", "4"])
    assert result.exit_code == 0, result.output
    folders = [p for p in out.iterdir() if p.is_dir()]
    assert len(folders) == 1 and folders[0].name.startswith("planning_")
    assert len(folders[0].name) == len("planning_") + 10
    root = folders[0]
    assert (root / "planning" / "rtstruct.dcm").is_file()
    assert len(list((root / "planning" / "ct").glob("*.dcm"))) == pat.ct.geometry.shape[0]
    frac = root / "fraction_1"
    for name in ("ct", "rtstruct.dcm", "true_dvf.mha", "params.json"):
        assert (frac / name).exists(), name
    planning = read_ct_series(root / "planning" / "ct")
    daily = read_ct_series(frac / "ct")
    assert daily.frame_of_reference_uid != planning.frame_of_reference_uid
    assert daily.study_instance_uid != planning.study_instance_uid
    assert daily.series_instance_uid != planning.series_instance_uid
    assert daily.patient.patient_id == planning.patient.patient_id
    ss = read_rtstruct(frac / "rtstruct.dcm")
    assert ss.frame_of_reference_uids == [daily.frame_of_reference_uid]
    assert set(ss.roi_names) == set(read_rtstruct(rt).roi_names)
    masks = rtstruct_to_masks(ss, daily)  # references the daily CT's images
    assert masks["Prostate"].array.sum() > 0
    dvf = Volume.read(str(frac / "true_dvf.mha"))
    assert dvf.array.shape == (*daily.volume.geometry.shape, 3)
    assert dvf.geometry.same_grid(daily.volume.geometry)
    params = json.loads((frac / "params.json").read_text())
    assert params["fraction"] == 1 and params["engine"] == "organ"
    assert params["labels"]["4"] == "Prostate"
    # the ground truth contours follow the DVF: the daily prostate is the planning one, warped
    warped = warp(pat.labels, Volume(dvf.array, daily.volume.geometry), "label", 0).array
    inter = np.logical_and(warped == PROSTATE, masks["Prostate"].array > 0).sum()
    dice = 2 * inter / ((warped == PROSTATE).sum() + masks["Prostate"].array.sum())
    assert dice > 0.9
    # --rtstruct is required with --from-planning
    bad = runner.invoke(app, ["phantom", "--from-planning", str(ct_dir), "--out", str(out)])
    assert bad.exit_code == 2 and "--rtstruct" in bad.output


# ------------------------------------------------------------------------------ real data
@pytest.mark.slow
def test_real_planning_scan() -> None:
    case = PELVIC_REF / "Pelvic-Ref-002"
    if not case.is_dir():
        pytest.skip(f"real planning scan not present at {case}")
    from jrs.io.rtstruct import masks_from_files

    _, series, masks = masks_from_files(case / "ct", case / "rtstruct.dcm")
    syn = {k: list(v) for k, v in DEFAULT_SYNONYMS.items()}
    syn["prostate"].append("Prostata")
    syn["bladder"].append("Vescica")
    syn["rectum"].append("Retto")
    structures = {k: v.array.view(bool) for k, v in masks.items()}
    labels, found = label_map_from_masks(structures, SynonymTable(syn))
    assert found == {PROSTATE: "Prostata", BLADDER: "Vescica", RECTUM: "Retto"}
    f = synthesize_fraction(
        series.volume,
        Volume(labels, series.volume.geometry),
        {"External": structures["External"], "Prostata": structures["Prostata"]},
        np.random.default_rng(0),
    )
    assert abs(f.params["prostate_volume_change"]) < 0.03
    assert 0.5 <= f.params["bladder_volume_ratio"] <= 1.8
    assert f.params["min_det_jacobian"] > 0.2
    assert float(jacobian_determinant(f.true_dvf).min()) > 0.0
    assert f.structures["External"].sum() > 0.9 * structures["External"].sum()


def test_broad_profile_draws_wider_ranges_about_an_offset_centre(toy: Toy) -> None:
    """Issue 30: the broad profile's draws cover bladder -50 .. +80 % and rotations to 3 deg."""
    from jrs.synth.engine import _draw

    v3 = [_draw(np.random.default_rng(s), None, "v3") for s in range(200)]
    broad = [_draw(np.random.default_rng(s), None, "broad") for s in range(200)]
    assert max(d.bladder_factor for d in v3) <= 1.6 and min(d.bladder_factor for d in v3) >= 0.6
    assert max(d.bladder_factor for d in broad) > 1.65
    assert min(d.bladder_factor for d in broad) < 0.55
    assert max(float(np.abs(d.rotation_deg).max()) for d in broad) > 2.5
    assert max(float(np.abs(d.rotation_deg).max()) for d in broad) <= 3.0
    ct, labels, structures = toy
    frac = synthesize_fraction(ct, labels, structures, np.random.default_rng(3), profile="broad")
    assert frac.params["profile"] == "broad"
    prostate = np.argwhere(labels.array == 4).mean(axis=0)[::-1]
    centre = np.asarray(frac.params["setup"]["centre_mm"])
    assert 0.0 < float(np.linalg.norm(centre - ct.geometry.index_to_physical(prostate))) <= 60.0
    # the default profile is unchanged: the setup turns about the prostate
    same = synthesize_fraction(ct, labels, structures, np.random.default_rng(3))
    assert same.params["profile"] == "v3"
    with pytest.raises(InvalidInput, match="broad"):
        synthesize_fraction(ct, labels, structures, np.random.default_rng(3), profile="wide")


# ------------------------------------------------------------------------------ shared helpers
def test_grid_boxes_index_and_lps_boxes() -> None:
    from jrs.synth.grid_boxes import (
        crop_geometry,
        index_box,
        index_box_of_lps,
        intersect_boxes,
        lps_bounds,
    )

    mask = np.zeros((10, 12, 14), bool)
    assert index_box(mask, 2) is None
    mask[3:5, 4:7, 5:6] = True
    box = index_box(mask, 1)
    assert box == (slice(2, 6), slice(3, 8), slice(4, 7))
    assert index_box(mask, 50) == (slice(0, 10), slice(0, 12), slice(0, 14))
    assert intersect_boxes(box, (slice(5, 9), slice(0, 4), slice(0, 14))) == (
        slice(5, 6),
        slice(3, 4),
        slice(4, 7),
    )
    assert intersect_boxes(box, (slice(7, 9), slice(0, 4), slice(0, 14))) is None
    assert intersect_boxes(box, None) is None
    # an oblique grid: the LPS bounds of a box map back onto (at least) that box
    rot = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    g = Geometry((10, 12, 14), origin=np.array([5.0, -3.0, 2.0]), spacing=[1.0, 2.0, 3.0])
    g = Geometry(g.shape, origin=g.origin, spacing=g.spacing, direction=rot)
    sub = crop_geometry(g, box)
    assert sub.shape == (4, 5, 3)
    assert np.allclose(sub.origin, g.index_to_physical([4, 3, 2]))
    assert index_box_of_lps(*lps_bounds(g, box), g) == box
    assert index_box_of_lps(np.full(3, 1e4), np.full(3, 2e4), g) is None


def test_grid_boxes_cover_grid_and_centroids() -> None:
    from jrs.synth.grid_boxes import cover_grid, lattice_grid, weighted_centroid

    g = Geometry((20, 30, 40), origin=np.array([-10.0, 5.0, 1.0]), spacing=[0.8, 0.8, 2.5])
    first, cover = cover_grid(g, 3.0)
    assert first.tolist() == [0, 0, 0]
    lo, hi = cover.corners().min(axis=0), cover.corners().max(axis=0)
    assert np.all(lo <= g.corners().min(axis=0) - 6.0) and np.all(hi >= g.corners().max(axis=0))
    # a sub-grid on the same lattice is offset by whole nodes
    sub_first, sub = lattice_grid(np.array([0.5, 9.0, 10.0]), np.array([8.0, 20.0, 30.0]), lo, 3.0)
    assert np.allclose(sub.origin, lo + 3.0 * sub_first)
    w = np.zeros(cover.shape, np.float32)
    w[2, 3, 4] = 1.0
    w[2, 3, 6] = 3.0
    expected = cover.index_to_physical([5.5, 3.0, 2.0])
    assert np.allclose(weighted_centroid(w, grid=cover), expected)
    pts = cover.voxel_centres().astype(np.float32)
    assert np.allclose(weighted_centroid(w, points=pts), expected, atol=1e-4)
    with pytest.raises(ValueError):
        weighted_centroid(w)
