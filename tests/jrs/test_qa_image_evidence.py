"""Image evidence of the QA (issue 13): do the daily CT and the mapped planning CT agree?

`jrs.qa.image_evidence.image_evidence` measures, per organ, the NCC of the daily CT with the planning CT pulled
by the final mapping in a band around the daily contour (beside the same NCC after the
pre-alignment alone), and the centroid's shift from the pre-aligned planning organ. These tests
build scans whose answer is known: the same scan twice, a contour moved by 10 mm that keeps its
volume, an organ that really moved and was followed, a bladder that filled while the contour
stayed where it was. The pipeline tests run `jrs.pipeline.run.recontour` on a phantom with a fake
network (a constant DVF), so that the contour is misplaced on purpose.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from scipy import ndimage

from jrs.core.geometry import Geometry
from jrs.qa.figures import FLAG_CODES, QaThresholds, StructureQa, flag_structure, organ_jacobian
from jrs.qa.image_evidence import image_evidence, structure_evidence
from research.qa_cases import FLAGS, RECORD_VERSION, STRUCTURE_FLAGS, label_contour
from research.qa_choice import (
    choose_thresholds,
    fired_matrix,
    flags_of,
    rates,
    samples_from_records,
    search_parameters,
    thresholds_with,
)
from research.qa_report import calibrate, report_markdown, thresholds_from_dict, thresholds_to_dict

N = 64
G = Geometry((N, N, N), origin=np.full(3, -32.0), spacing=np.ones(3))
PROSTATE = 4


def _ball(centre_zyx: tuple[float, float, float], radius: float) -> np.ndarray:
    zz, yy, xx = np.mgrid[0:N, 0:N, 0:N]
    cz, cy, cx = centre_zyx
    return ((zz - cz) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2) <= radius**2


def _anatomy(seed: int, organ: np.ndarray) -> np.ndarray:
    """HU: fat, a muscle slab, a bone bar, soft texture, and the organ (40 HU)."""
    rng = np.random.default_rng(seed)
    hu = np.full((N, N, N), -90.0, np.float32)
    hu[:, 44:52, :] = 50.0  # muscle slab behind the organ
    hu[20:44, 8:14, 20:44] = 700.0  # bone bar (clipped by the window)
    hu += ndimage.gaussian_filter(rng.normal(0, 1, hu.shape), 3.0).astype(np.float32) * 150.0
    hu[organ] = 40.0
    return hu


def _scan(anatomy: np.ndarray, seed: int, noise_hu: float = 15.0) -> np.ndarray:
    """A scan of the anatomy: independent noise, the network's normalised units (HU / 1000)."""
    rng = np.random.default_rng(seed)
    return (anatomy + rng.normal(0, noise_hu, anatomy.shape).astype(np.float32)) / 1000.0


def _labels(mask: np.ndarray) -> np.ndarray:
    return np.where(mask, PROSTATE, 0).astype(np.uint8)


def _shift_field(dy_mm: float) -> np.ndarray:
    u = np.zeros((N, N, N, 3), np.float32)
    u[..., 1] = dy_mm  # LPS y (array axis 1 on this identity-direction grid)
    return u


def _figures(
    daily: np.ndarray,
    prealigned: np.ndarray,
    u: np.ndarray | None,
    daily_labels: np.ndarray,
    planning_labels: np.ndarray,
) -> dict[str, Any]:
    ev = image_evidence(
        daily, prealigned, u, G, daily_labels, planning_labels, [PROSTATE], hu_per_unit=1000.0
    )
    return ev[PROSTATE]


def _flagged(fig: dict[str, Any], planning_cc: float, daily_cc: float) -> StructureQa:
    qa = StructureQa(
        "Prostate", "prostate", "registration", planning_cc, daily_cc, **structure_evidence(fig)
    )
    return flag_structure(qa)


ORGAN = _ball((32, 32, 32), 10)
ANATOMY = _anatomy(1, ORGAN)
CC = float(ORGAN.sum()) / 1000.0


# ------------------------------------------------------------------ figures on known scans
def test_the_same_scan_twice_agrees_fully_and_raises_no_flag() -> None:
    scan = _scan(ANATOMY, 10)
    fig = _figures(scan, scan, np.zeros((N, N, N, 3), np.float32), _labels(ORGAN), _labels(ORGAN))
    assert fig["image_ncc"] == pytest.approx(1.0)
    assert fig["image_ncc_prealigned"] == pytest.approx(1.0)
    assert fig["centroid_shift_mm"] == pytest.approx(0.0)
    assert fig["band_samples"] > 100
    qa = _flagged(fig, CC, CC)
    assert qa.flags == [] and qa.flag_codes == []


def test_a_contour_moved_10_mm_keeps_its_volume_but_is_flagged() -> None:
    """The mapping pulls the planning CT from 10 mm away: its contour moves, the organ did not."""
    daily, planning = _scan(ANATOMY, 10), _scan(ANATOMY, 11)  # two scans, the organ unmoved
    good = _figures(daily, planning, None, _labels(ORGAN), _labels(ORGAN))
    moved_contour = _labels(np.roll(ORGAN, -10, axis=1))  # what warping by u_y = +10 mm gives
    bad = _figures(daily, planning, _shift_field(10.0), moved_contour, _labels(ORGAN))

    assert good["image_ncc"] > 0.85  # noise apart, the two scans agree around the organ
    assert bad["image_ncc"] < 0.6
    assert bad["image_ncc_prealigned"] > 0.85  # the pre-alignment alone was right
    assert bad["centroid_shift_mm"] == pytest.approx(10.0, abs=0.01)
    assert bad["centroid_shift_xyz_mm"] == pytest.approx([0.0, -10.0, 0.0], abs=0.01)

    qa_good = _flagged(good, CC, CC)
    qa_bad = _flagged(bad, CC, float(moved_contour.astype(bool).sum()) / 1000.0)
    assert qa_good.flag_codes == []
    assert qa_bad.volume_change == pytest.approx(0.0)  # the volume says nothing
    assert "image_disagreement" in qa_bad.flag_codes
    assert "centroid_shift" in qa_bad.flag_codes  # 10 mm > 8 mm for a prostate
    assert "volume_change" not in qa_bad.flag_codes
    text = qa_bad.flags[qa_bad.flag_codes.index("image_disagreement")]
    assert "NCC" in text and "prostate" in text


def test_an_organ_that_moved_and_was_followed_is_not_flagged() -> None:
    """The organ moved by up to 6 mm (a local field); a mapping that follows it is not flagged.

    The daily anatomy is the planning anatomy pulled by a smooth bump field around the organ;
    the mapping is that field. Agreement after the mapping beats the pre-alignment's.
    """
    zz, yy, xx = np.mgrid[0:N, 0:N, 0:N].astype(np.float32)
    bump = np.exp(-((zz - 32) ** 2 + (yy - 32) ** 2 + (xx - 32) ** 2) / (2 * 15.0**2))
    u = np.zeros((N, N, N, 3), np.float32)
    u[..., 1] = -6.0 * bump  # daily p shows the planning anatomy at p - 6 mm (near the organ)
    where = np.stack([zz, yy + u[..., 1], xx])
    daily_anatomy = ndimage.map_coordinates(ANATOMY, where, order=1, mode="nearest")
    daily_organ = ndimage.map_coordinates(ORGAN.astype(np.float32), where, order=1) > 0.5
    daily = _scan(daily_anatomy.astype(np.float32), 10)
    planning = _scan(ANATOMY, 11)
    fig = _figures(daily, planning, u, _labels(daily_organ), _labels(ORGAN))
    assert fig["image_ncc"] > 0.85
    assert fig["image_ncc"] > fig["image_ncc_prealigned"] + 0.05
    assert 4.0 < fig["centroid_shift_mm"] < 6.5
    assert fig["centroid_shift_xyz_mm"][1] > 4.0  # moved posterior (+y), as the field says
    assert _flagged(fig, CC, float(daily_organ.sum()) / 1000.0).flag_codes == []


def test_a_filled_bladder_under_registered_is_flagged_though_nothing_got_worse() -> None:
    """The bladder doubled (radius 15 -> 19 mm); the contour stayed at the planning size.

    NCC after the mapping equals the pre-alignment's (the mapping did nothing: no loss), and the
    volume did not change: only the absolute minimum sees that the contour's edge is not where
    the daily CT's edge is.
    """
    planned, filled = _ball((32, 32, 32), 15), _ball((32, 32, 32), 19)
    daily = _scan(_anatomy(1, filled), 10)
    planning = _scan(_anatomy(1, planned), 11)
    fig = _figures(daily, planning, None, _labels(planned), _labels(planned))
    assert fig["image_ncc"] == pytest.approx(fig["image_ncc_prealigned"])
    cc = float(planned.sum()) / 1000.0
    qa = flag_structure(
        StructureQa("Bladder", "bladder", "registration", cc, cc, **structure_evidence(fig))
    )
    assert qa.flag_codes == ["image_disagreement"], (fig, qa.flags)


def test_figures_are_none_where_nothing_can_be_measured() -> None:
    scan = _scan(ANATOMY, 10)
    empty = np.zeros((N, N, N), np.uint8)
    fig = _figures(scan, scan, None, empty, _labels(ORGAN))
    assert fig["image_ncc"] is None and fig["centroid_shift_mm"] is None
    flat = np.zeros((N, N, N), np.float32)  # no structure at all: NCC undefined
    fig = _figures(flat, flat, None, _labels(ORGAN), _labels(ORGAN))
    assert fig["image_ncc"] is None and fig["centroid_shift_mm"] == 0.0
    assert _flagged(fig, CC, CC).flag_codes == []
    assert image_evidence(scan, scan, None, G, empty, empty, []) == {}


# ------------------------------------------------------------------ flags from figures
def test_image_flags_follow_their_thresholds() -> None:
    def qa(organ: str | None, ncc: float | None, pre: float | None, shift: float | None) -> Any:
        return StructureQa(
            "X",
            organ,
            "registration",
            40.0,
            40.0,
            image_ncc=ncc,
            image_ncc_prealigned=pre,
            centroid_shift_mm=shift,
        )

    assert flag_structure(qa("prostate", 0.95, 0.9, 3.0)).flag_codes == []
    assert flag_structure(qa("prostate", 0.7, 0.6, 3.0)).flag_codes == ["image_disagreement"]
    # agreement made worse than the affine's by more than the limit (absolute minimum met)
    worse = flag_structure(qa("prostate", 0.85, 0.97, 3.0))
    assert worse.flag_codes == ["image_disagreement"]
    assert "pre-alignment" in worse.flags[0]
    assert flag_structure(qa("prostate", 0.9, 0.97, 3.0)).flag_codes == []  # 0.07 < 0.1
    assert flag_structure(qa("bladder", 0.9, 0.9, 18.0)).flag_codes == []  # a bladder fills
    assert flag_structure(qa("prostate", 0.9, 0.9, 18.0)).flag_codes == ["centroid_shift"]
    # propagated ROIs have no figures; an organ missing from a table is not flagged on it
    assert flag_structure(qa(None, None, None, None)).flag_codes == []
    t = QaThresholds(min_image_ncc={}, max_centroid_shift_mm={})
    assert flag_structure(qa("prostate", 0.1, 0.1, 30.0), t).flag_codes == []
    strict = QaThresholds(min_image_ncc={"prostate": 0.96}, max_image_ncc_loss=0.5)
    assert flag_structure(qa("prostate", 0.95, 0.9, 3.0), strict).flag_codes == [
        "image_disagreement"
    ]
    assert {"image_disagreement", "centroid_shift"} <= set(FLAG_CODES)


def test_organ_jacobian_reports_the_1st_and_99th_percentiles() -> None:
    det = np.arange(1, 1001, dtype=np.float32).reshape(10, 10, 10) / 100.0  # 0.01 .. 10
    mask = np.ones(det.shape, bool)
    fig = organ_jacobian(det, mask, "prostate")
    assert fig is not None
    assert fig["p01"] == pytest.approx(np.quantile(det, 0.01), abs=1e-4)
    assert fig["p99"] == pytest.approx(np.quantile(det, 0.99), abs=1e-4)
    assert fig["min"] < fig["p01"] < fig["p99"] < fig["max"]


# ------------------------------------------------------------------ calibration of the new flags
def _structure(
    organ: str, dsc: float, ncc: float | None, pre: float | None, shift: float | None
) -> dict[str, Any]:
    msd = 1.0 if dsc >= 0.9 else 3.0
    return {
        "name": organ.title(),
        "organ": organ,
        "source": "registration",
        "planning_cc": 40.0,
        "daily_cc": 40.0,  # the volume never tells: only the image figures do
        "path_dice": None,
        "touches_crop_border": False,
        "flags": [],
        "paths_validated": True,
        "jacobian": None,
        "volume_change": None,
        "flag_codes": [],
        "image_ncc": ncc,
        "image_ncc_prealigned": pre,
        "centroid_shift_mm": shift,
        "centroid_shift_xyz_mm": None if shift is None else [0.0, shift, 0.0],
        "dsc": dsc,
        "msd_mm": msd,
        "label": label_contour(dsc, msd),
    }


def _record(case_id: str, population: str, structures: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "record_version": RECORD_VERSION,
        "case_id": case_id,
        "kind": "phantom",
        "population": population,
        "method": "network",
        "status": "done",
        "model": {"name": "fake", "version": 0},
        "dvf": {"min": 0.5, "folding_fraction": 0.0, "log_std": 0.1},
        "structures": structures,
    }


def _misplaced_records() -> list[dict[str, Any]]:
    """Good prostates agree (NCC 0.9-0.98); misplaced ones keep their volume, NCC 0.4-0.7."""
    rng = np.random.default_rng(3)
    recs = []
    for i in range(12):
        ncc = float(rng.uniform(0.9, 0.98))
        recs.append(_record(f"c{i}", "network", [_structure("prostate", 0.93, ncc, 0.85, 2.0)]))
        bad = float(rng.uniform(0.4, 0.7))
        recs.append(
            _record(f"c{i}", "shifted_planning", [_structure("prostate", 0.6, bad, bad, 1.0)])
        )
    return recs


def test_calibration_measures_and_chooses_the_image_flag() -> None:
    assert RECORD_VERSION >= 2  # records without the image figures are re-computed
    assert {"image_disagreement", "centroid_shift"} <= set(STRUCTURE_FLAGS)
    samples = samples_from_records(_misplaced_records())
    off = QaThresholds(min_image_ncc={"prostate": 0.0})
    assert rates(fired_matrix(samples, off)["image_disagreement"], samples)["recall"] == 0.0
    now = rates(fired_matrix(samples, QaThresholds())["image_disagreement"], samples)
    assert now["recall"] == 1.0 and now["false_flag_rate"] == 0.0
    choice = choose_thresholds(samples, off)
    assert choice.met and choice.recall == 1.0 and choice.false_flag_rate == 0.0
    assert 0.7 < choice.thresholds.min_image_ncc["prostate"] < 0.9
    assert any("min_image_ncc.prostate" in s for s in choice.steps)

    report = calibrate(_misplaced_records(), off)
    assert set(report["current"]["flags"]) == set(FLAGS)
    assert report["standalone"]["image_disagreement"]["met"] is True
    fig = report["figures"]["image_ncc"]["prostate"]
    assert fig["good"]["n"] == 12 and fig["bad"]["n"] == 12
    assert fig["bad"]["p95"] < fig["good"]["p05"]
    text = report_markdown(report)
    assert "| `image_disagreement` |" in text and "| `centroid_shift` |" in text
    assert "| `image_ncc` | prostate |" in text
    back = thresholds_from_dict(json.loads(json.dumps(report["chosen"]["thresholds"])))
    assert back == choice.thresholds
    assert thresholds_from_dict(thresholds_to_dict(QaThresholds())) == QaThresholds()


def test_search_parameters_of_the_image_flags_fire_exactly_as_jrs_qa_decides() -> None:
    rng = np.random.default_rng(5)
    organs = ["prostate", "bladder", "rectum", "seminal_vesicles"]
    structures = []
    for i in range(80):
        organ = organs[i % 4]
        ncc = None if i % 9 == 0 else float(rng.uniform(0.2, 1.0))
        pre = None if i % 7 == 0 else float(rng.uniform(0.2, 1.0))
        shift = None if i % 11 == 0 else float(rng.uniform(0.0, 25.0))
        structures.append(_structure(organ, float(rng.uniform(0.5, 1.0)), ncc, pre, shift))
    recs = [_record(f"c{k}", "network", structures[k * 8 : (k + 1) * 8]) for k in range(10)]
    samples = samples_from_records(recs)
    flags = ["image_disagreement", "centroid_shift"]
    params = search_parameters(samples, QaThresholds(), flags, min_class_good=0)
    keys = {p.key for p in params}
    assert {"max_image_ncc_loss", "min_image_ncc.prostate", "max_centroid_shift_mm.bladder"} <= keys
    # every other flag off: what the parameters fire on is what jrs.qa.figures flags
    base = thresholds_with(
        QaThresholds(),
        {
            p.key: p.candidates[0]
            for p in search_parameters(
                samples, QaThresholds(), [f for f in STRUCTURE_FLAGS if f not in flags], 0
            )
        },
    )
    for trial in range(20):
        values = {p.key: p.candidates[rng.integers(len(p.candidates))] for p in params}
        if trial == 0:
            values = {p.key: p.candidates[0] for p in params}  # everything off
        t = thresholds_with(base, values)
        vector = np.zeros(len(samples), bool)
        for p in params:
            vector |= p.fires(values[p.key])
        exact = np.array([bool(flags_of(it, t)) for it in samples.items])
        np.testing.assert_array_equal(vector, exact)
        if trial == 0:
            assert not exact.any()


# ------------------------------------------------------------------ the pipeline
@dataclass
class _Pred:
    seg_probs: np.ndarray | None
    dvf: np.ndarray


class ShiftBackend:
    """Fake network: segmentation = pre-aligned planning labels; DVF = a constant shift (mm)."""

    def __init__(self, shift_xyz: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> None:
        self.shift = np.asarray(shift_xyz, np.float32)
        organs = ("prostate", "seminal_vesicles", "rectum", "bladder")
        self.metadata: dict[str, Any] = {
            "name": "fake",
            "version": "0",
            "path_choice": dict.fromkeys(organs, "registration"),
            "null_correction": False,  # (a constant shift: the correction would remove it)
        }

    def predict(self, fixed: np.ndarray, moving: np.ndarray, moving_labels: np.ndarray) -> _Pred:
        lab = moving_labels.astype(int)
        probs = np.stack([(lab == c).astype(np.float32) for c in range(5)])
        dvf = np.broadcast_to(self.shift[:, None, None, None], (3, *fixed.shape)).copy()
        return _Pred(probs, dvf)


@pytest.fixture(scope="module")
def same_scan_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """The planning scan re-contoured onto itself: as it is, and with every contour moved 10 mm."""
    from jrs.pipeline.run import recontour
    from jrs.synth import generate_patient, write_patient

    root = tmp_path_factory.mktemp("evidence")
    write_patient(generate_patient(7, matrix=256, slice_thickness=3.0), root)
    ct, rs = root / "planning" / "ct", root / "planning" / "rtstruct.dcm"
    out = {}
    for name, shift in (("same", (0.0, 0.0, 0.0)), ("moved", (0.0, 10.0, 0.0))):
        result = recontour(ct, rs, ct, root / name, backend=ShiftBackend(shift))
        out[name] = json.loads(result.qa.read_text())
    return out


@pytest.mark.integration
def test_pipeline_same_scan_twice_fires_no_flag(same_scan_runs: dict[str, Any]) -> None:
    qa = same_scan_runs["same"]
    assert qa["flagged"] == []
    organs = [s for s in qa["structures"] if s["organ"]]
    assert len(organs) == 4
    for s in organs:
        assert s["flags"] == [], s
        assert s["image_ncc"] == pytest.approx(1.0, abs=1e-3), s["name"]
        assert s["image_ncc_prealigned"] == pytest.approx(1.0, abs=1e-3)
        assert s["centroid_shift_mm"] == pytest.approx(0.0, abs=0.5)
        assert {"p01", "p99"} <= set(s["jacobian"])
    for s in organs:  # the contour sits on its organ's edges
        assert s["image_fit_gain"] is not None and s["image_fit_gain"] < 0.2, s["name"]
    others = [s for s in qa["structures"] if not s["organ"]]
    assert others
    for s in others:
        # propagated ROIs: the scans' agreement around them, no centroid figure (no organ to
        # follow); the patient's outline has no image figures at all
        assert s["centroid_shift_mm"] is None
        if s["name"].lower() in ("body", "external"):
            assert s["image_ncc"] is None and s["image_fit_gain"] is None
        elif s["image_ncc"] is not None:
            assert s["image_ncc"] == pytest.approx(1.0, abs=1e-3), s["name"]
    assert any(s["image_ncc"] is not None for s in others)
    # a femoral head (bone: strong edges) is fitted; a target volume is a margin, never fitted
    assert all(s["image_fit_gain"] is None for s in others if s["name"].upper().startswith("PTV"))
    heads = [s for s in others if "femoral" in s["name"].lower()]
    assert heads and all(
        s["image_fit_gain"] is not None and s["image_fit_gain"] < 0.2 for s in heads
    )
    # the mapping is nowhere off: no residual shift around any structure but the outline
    for s in qa["structures"]:
        if s["name"].lower() in ("body", "external"):
            assert s["residual_shift_mm"] is None
        else:
            assert s["residual_shift_mm"] == 0.0, s["name"]
            assert s["residual_ncc"] == pytest.approx(1.0, abs=1e-3), s["name"]


@pytest.mark.integration
def test_pipeline_flags_contours_moved_10_mm_that_keep_their_volume(
    same_scan_runs: dict[str, Any],
) -> None:
    qa = same_scan_runs["moved"]
    organs = {s["organ"]: s for s in qa["structures"] if s["organ"]}
    for organ in ("prostate", "bladder", "rectum"):
        s = organs[organ]
        assert abs(s["volume_change"]) < 0.1, s  # the volume cannot tell
        assert s["centroid_shift_mm"] == pytest.approx(10.0, abs=1.0)
        assert s["image_ncc_prealigned"] == pytest.approx(1.0, abs=1e-3)
        assert s["image_ncc"] < 0.7
        assert "image_disagreement" in s["flag_codes"], s
    assert "centroid_shift" in organs["prostate"]["flag_codes"]
    # the mapping is 10 mm off inside the network box: the residual search (up to 6 mm) finds
    # it off by at least 5 mm around every organ, along y, and flags it
    for s in organs.values():
        assert s["residual_shift_mm"] >= 5.0, s["name"]
        x, y, z = s["residual_shift_xyz_mm"]
        assert abs(y) >= 4.0 and abs(y) > abs(x) and abs(y) > abs(z), s["name"]
        assert "misregistration" in s["flag_codes"], s["name"]
    # the PTV is carried by the same shift; the femoral heads lie outside the network box,
    # where the mapping is the pre-alignment alone (right): not off, not flagged
    others = {s["name"]: s for s in qa["structures"] if not s["organ"]}
    assert others["PTV"]["residual_shift_mm"] >= 5.0
    for name in ("FemoralHead_L", "FemoralHead_R"):
        assert others[name]["residual_shift_mm"] == 0.0
        assert "misregistration" not in others[name]["flag_codes"]
    assert qa["timings_s"]["qa"] < 5.0
