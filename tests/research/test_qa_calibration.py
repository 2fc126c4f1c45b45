"""The QA-flag calibration harness (`research.qa_calibration`, ``jrs benchmark qa``).

Most tests run on hand-made records (the rate computation and the threshold choice need no
re-contouring); the harness itself runs on a 128 x 128 phantom with a fake network, and once
with the bundled model (slow).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from jrs.core.errors import InvalidInput
from jrs.qa.figures import QaThresholds
from research.qa_calibration import run_qa_calibration
from research.qa_cases import (
    FLAGS,
    MIN_RESIDUAL_LIMIT_MM,
    RECORD_VERSION,
    STRUCTURE_FLAGS,
    ReplayBackend,
    _shifted,
    cut_field_of_view,
    label_contour,
    smooth_random_field,
)
from research.qa_choice import (
    choose_thresholds,
    fired_matrix,
    flags_of,
    rates,
    samples_from_records,
    search_parameters,
    thresholds_with,
)
from research.qa_report import (
    calibrate,
    report_markdown,
    thresholds_from_dict,
    thresholds_to_dict,
    write_report,
)
from research.qa_runs import RunSettings, load_records, other_path, record_path


# ------------------------------------------------------------------ hand-made records
def _structure(
    name: str,
    organ: str | None,
    planning_cc: float,
    daily_cc: float,
    dsc: float,
    msd: float | None = 1.0,
    *,
    path_dice: float | None = None,
    validated: bool = True,
    touches: bool = False,
    outliers: float | None = 0.0,
    **figures: Any,
) -> dict[str, Any]:
    jac = (
        None
        if outliers is None
        else {
            "min": 0.9,
            "max": 1.1,
            "outlier_fraction": outliers,
            "folding_fraction": 0.0,
            "low": 0.7,
            "high": 1.4,
        }
    )
    return {
        "name": name,
        "organ": organ,
        "source": "registration",
        "planning_cc": planning_cc,
        "daily_cc": daily_cc,
        "path_dice": path_dice,
        "touches_crop_border": touches,
        "flags": [],
        "paths_validated": validated,
        "jacobian": jac,
        "volume_change": None,
        "flag_codes": [],
        "dsc": dsc,
        "msd_mm": msd,
        "label": label_contour(dsc, msd),
        **figures,
    }


def _record(
    case_id: str, population: str, structures: list[dict[str, Any]], fold: float = 0.0
) -> dict[str, Any]:
    return {
        "record_version": RECORD_VERSION,
        "case_id": case_id,
        "kind": "phantom",
        "population": population,
        "method": "network",
        "status": "done",
        "model": {"name": "fake", "version": 0},
        "dvf": {"min": 0.5, "folding_fraction": fold, "log_std": 0.1},
        "structures": structures,
    }


def _separable_records() -> list[dict[str, Any]]:
    """Good prostates change volume by <= 4 %, bad ones by 20-40 %; bladders are all good."""
    recs = []
    rng = np.random.default_rng(0)
    for i in range(12):
        good = [
            _structure("Prostate", "prostate", 40.0, 40.0 * (1 + rng.uniform(-0.04, 0.04)), 0.93),
            _structure("Bladder", "bladder", 200.0, 200.0 * (1 + rng.uniform(-0.5, 1.0)), 0.95),
        ]
        recs.append(_record(f"c{i}", "network", good))
        change = rng.uniform(0.2, 0.4) * (1 if i % 2 else -1)
        bad = [_structure("Prostate", "prostate", 40.0, 40.0 * (1 + change), 0.6, 3.0)]
        recs.append(_record(f"c{i}", "dvf_noise", bad))
    return recs


def _keep_records(root: Path, records: list[dict[str, Any]], case_id: str) -> None:
    """Write records as one case's kept records under ``root`` (as the harness does)."""
    for rec in records:
        path = record_path(root, case_id, rec["population"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec | {"case_id": case_id}))


def _with_prostate_range(low: float, high: float) -> QaThresholds:
    ranges = dict(QaThresholds().volume_change_range)
    ranges["prostate"] = (low, high)
    return QaThresholds(volume_change_range=ranges)


# ------------------------------------------------------------------ labels and rates
def test_contours_are_labelled_good_bad_or_borderline() -> None:
    assert label_contour(0.95, 0.8) == "good"
    assert label_contour(0.9, 2.0) == "good"
    assert label_contour(0.79, 0.5) == "bad"
    assert label_contour(0.95, 2.5) == "bad"  # a big organ can keep DSC 0.95 and be 2.5 mm off
    assert label_contour(0.85, 1.0) == "borderline"
    assert label_contour(0.0, None) == "bad"


def test_rates_are_recall_on_bad_and_false_flags_on_good() -> None:
    recs = [
        _record(
            "a",
            "network",
            [
                _structure("Prostate", "prostate", 40, 40, 0.95),  # good, quiet
                _structure("Rectum", "rectum", 60, 62, 0.92, touches=True),  # good, flagged
                _structure("SV", "seminal_vesicles", 10, 4, 0.4),  # bad, -60 %: flagged
                _structure("Bladder", "bladder", 200, 210, 0.7),  # bad, quiet
                _structure("PTV", None, 100, 101, 0.85),  # borderline: not counted
            ],
        ),
        _record("b", "network", [], fold=0.0) | {"status": "refused", "message": "not a pelvis"},
    ]
    samples = samples_from_records(recs)
    assert len(samples) == 5 and int(samples.good.sum()) == 2 and int(samples.bad.sum()) == 2
    fired = fired_matrix(samples, QaThresholds())
    assert fired["touches_box"].tolist() == [False, True, False, False, False]
    assert fired["volume_change"].tolist() == [False, False, True, False, False]
    anyf = np.zeros(len(samples), bool)
    for f in fired.values():
        anyf |= f
    r = rates(anyf, samples)
    assert r == {
        "recall": 0.5,
        "bad_flagged": 1,
        "bad": 2,
        "false_flag_rate": 0.5,
        "good_flagged": 1,
        "good": 2,
    }
    assert rates(anyf, samples, samples.organ == "prostate")["recall"] is None  # no bad prostate


def test_good_contours_in_a_dvf_wrong_on_purpose_are_counted_apart() -> None:
    """A good rectum inside the noisy DVF of ``dvf_noise``: a flag of the mapping on it is right
    about the DVF; it is neither good nor bad for the rates, and the strict rates count it."""
    from research.qa_cases import GOOD_WRONG_DVF
    from research.qa_report import calibrate, wrong_dvf_rates

    good = _structure("Rectum", "rectum", 60.0, 60.0, 0.93, residual_shift_mm=5.0)
    quiet = _structure("Prostate", "prostate", 40.0, 40.0, 0.95, residual_shift_mm=0.5)
    bad = _structure("Bladder", "bladder", 200.0, 200.0, 0.7, 3.0, residual_shift_mm=4.0)
    recs = [
        _record("c0", "network", [quiet]),
        _record("c0", "dvf_noise", [good, quiet, bad]),
    ]
    samples = samples_from_records(recs)
    assert samples.label.tolist() == ["good", GOOD_WRONG_DVF, GOOD_WRONG_DVF, "bad"]
    assert samples.good.sum() == 1 and samples.bad.sum() == 1
    t = QaThresholds(max_residual_shift_mm=dict.fromkeys(["rectum", "prostate", "bladder"], 3.0))
    fired = fired_matrix(samples, t)["misregistration"]
    assert fired.tolist() == [False, True, False, True]
    assert rates(fired, samples)["false_flag_rate"] == 0.0
    w = wrong_dvf_rates(fired, samples)
    assert w["flagged"] == 1 and w["count"] == 2
    assert w["strict"]["good"] == 3 and w["strict"]["good_flagged"] == 1
    report = calibrate(recs, t)
    assert report["counts"][GOOD_WRONG_DVF] == 2 and report["counts"]["good"] == 1
    assert report["counts"]["by_population"]["dvf_noise"][GOOD_WRONG_DVF] == 2
    assert report["current"]["wrong_dvf"]["strict"]["false_flag_rate"] == 0.3333
    assert "wrong on purpose: 1 of 2 flagged" in report_markdown(report)


def test_dvf_folding_counts_on_every_structure_of_its_case() -> None:
    rec = _record(
        "a",
        "dvf_noise",
        [_structure("Prostate", "prostate", 40, 40, 0.5), _structure("B", "bladder", 9, 9, 0.95)],
        fold=0.02,
    )
    items = samples_from_records([rec]).items
    assert flags_of(items[0], QaThresholds()) == ["dvf_folding"]
    assert flags_of(items[1], QaThresholds()) == ["dvf_folding"]
    assert flags_of(items[0], QaThresholds(max_folding_fraction=0.05)) == []


def test_search_parameters_fire_exactly_as_jrs_qa_decides() -> None:
    """The search's vectorised thresholds agree with `flag_structure` / `flag_dvf`."""
    rng = np.random.default_rng(3)
    organs = ["prostate", "bladder", "rectum", "seminal_vesicles", None]
    structures = []
    for i in range(200):
        organ = organs[i % len(organs)]
        planning = float(rng.uniform(0.2, 300))
        ncc = float(rng.uniform(0.3, 1.0))
        figures = {
            # the paths' distance, the fit to the edges and the scans' agreement, for organs
            # and propagated ROIs alike (a target volume's fit is never judged)
            "path_msd_mm": None if i % 6 == 0 else float(rng.uniform(0, 6)),
            "image_fit_gain": None if i % 8 == 0 else float(rng.uniform(0, 2)),
            "image_ncc": None if i % 9 == 0 else ncc,
            "image_ncc_prealigned": ncc + float(rng.uniform(-0.3, 0.3)),
            "residual_shift_mm": None if i % 10 == 0 else float(rng.uniform(0, 6)),
            # the two methods' agreement (iterative runs, organs only)
            "method_dice": None if organ is None or i % 4 == 0 else float(rng.uniform(0.5, 1)),
            "method_msd_mm": None if organ is None or i % 12 == 0 else float(rng.uniform(0, 5)),
        }
        structures.append(
            _structure(
                ("PTV" if i % 2 else "FemoralHead_L") if organ is None else f"s{i}",
                organ,
                planning,
                planning * float(rng.uniform(0.0, 2.5)),
                float(rng.uniform(0.5, 1.0)),
                path_dice=None if i % 7 == 0 else float(rng.uniform(0, 1)),
                validated=bool(i % 3),
                touches=bool(i % 5 == 0),
                outliers=None if i % 11 == 0 else float(rng.uniform(0, 0.2)),
                **figures,
            )
        )
    recs = [
        _record(f"c{k}", "network", structures[k * 20 : (k + 1) * 20], float(rng.uniform(0, 0.01)))
        for k in range(10)
    ]
    samples = samples_from_records(recs)
    params = search_parameters(samples, QaThresholds(), min_class_good=0)
    # every flag has a threshold but the one that spreads the others (`jrs.qa.family`)
    assert {p.flag for p in params} == set(FLAGS) - {"same_organ_flagged"}
    keys = {p.key for p in params}
    assert {"min_method_dice.bladder", "max_method_msd_mm.prostate"} <= keys
    assert {"max_path_msd_mm.prostate", "max_image_fit_gain.rectum"} <= keys
    assert {"max_image_fit_gain.*", "min_image_ncc.*", "min_image_ncc.targets"} <= keys
    assert {"max_residual_shift_mm.*", "max_residual_shift_mm.targets"} <= keys
    assert "max_residual_shift_mm.bladder" in keys
    # a residual limit is never within the figure's own noise, though figures lie there
    assert np.nanmin(samples.residual_shift_mm) < MIN_RESIDUAL_LIMIT_MM == 1.5
    for p in params:
        if p.key.startswith("max_residual_shift_mm."):
            assert min(p.candidates) >= MIN_RESIDUAL_LIMIT_MM
    for trial in range(20):
        values = {p.key: p.candidates[rng.integers(len(p.candidates))] for p in params}
        if trial == 0:
            values = {p.key: p.candidates[0] for p in params}  # everything off
        t = thresholds_with(QaThresholds(), values)
        vector = np.zeros(len(samples), bool)
        for p in params:
            vector |= p.fires(values[p.key])
        exact = np.array([bool(flags_of(it, t)) for it in samples.items])
        np.testing.assert_array_equal(vector, exact)
        if trial == 0:  # only the prostate's clinical volume envelope still fires
            assert not exact[samples.organ != "prostate"].any()
            assert exact.any()


# ------------------------------------------------------------------ threshold choice
def test_choice_tightens_a_flag_until_the_bad_contours_are_caught() -> None:
    samples = samples_from_records(_separable_records())
    loose = _with_prostate_range(-0.5, 0.5)
    before = rates(fired_matrix(samples, loose)["volume_change"], samples)
    assert before["recall"] == 0.0
    choice = choose_thresholds(samples, loose)
    assert choice.met and choice.recall == 1.0 and choice.false_flag_rate == 0.0
    low, high = choice.thresholds.volume_change_range["prostate"]
    assert -0.2 <= low < -0.04 and 0.04 < high <= 0.2
    assert choice.steps and all("prostate" in s for s in choice.steps)
    # the bladder's range is left alone: nothing in the data asks to move it
    assert choice.thresholds.volume_change_range["bladder"] == loose.volume_change_range["bladder"]
    # rounded to the fewest digits that flag the same structures
    assert len(repr(low)) <= 6 and len(repr(high)) <= 6


def _path_dice_records(bad_bladder_cases: int = 12) -> list[dict[str, Any]]:
    """Good bladders' paths agree at 0.95, bad ones' at 0.90; good prostates' at 0.85, bad
    ones' at 0.70: no single limit separates them, one per organ does."""
    recs = []
    for i in range(12):
        good = [
            _structure("Bladder", "bladder", 200.0, 200.0, 0.95, path_dice=0.95 + 0.001 * i),
            _structure("Prostate", "prostate", 40.0, 40.0, 0.93, path_dice=0.85 + 0.001 * i),
        ]
        recs.append(_record(f"c{i}", "network", good))
        bad = [_structure("Prostate", "prostate", 40.0, 40.0, 0.6, 3.0, path_dice=0.70)]
        if i < bad_bladder_cases:
            bad.append(_structure("Bladder", "bladder", 200.0, 200.0, 0.7, 3.0, path_dice=0.90))
        recs.append(_record(f"c{i}", "shifted_planning", bad))
    return recs


def test_choice_sets_a_path_dice_limit_per_organ() -> None:
    samples = samples_from_records(_path_dice_records())
    one = QaThresholds(min_path_dice=0.8, min_path_dice_organ={})
    fired = fired_matrix(samples, one)["path_disagreement"]
    assert rates(fired, samples)["recall"] < 1.0 or rates(fired, samples)["false_flag_rate"] > 0
    choice = choose_thresholds(samples, QaThresholds())
    assert choice.met and choice.recall == 1.0 and choice.false_flag_rate == 0.0
    limits = choice.thresholds.min_path_dice_organ
    assert 0.90 < limits["bladder"] <= 0.95
    assert 0.70 < limits["prostate"] <= 0.85
    assert thresholds_from_dict(thresholds_to_dict(choice.thresholds)) == choice.thresholds


def test_leave_one_case_out_scores_thresholds_on_cases_they_never_saw() -> None:
    from research.qa_report import cross_validate

    # every case has a bad bladder: each fold learns the bladder limit from the others
    samples = samples_from_records(_path_dice_records())
    cv = cross_validate(samples, QaThresholds())
    assert cv is not None and cv["folds"] == 12
    assert cv["any"]["recall"] == 1.0 and cv["any"]["false_flag_rate"] == 0.0
    # one bad bladder in one case: caught in sample, but the fold without it never learns it
    few = samples_from_records(_path_dice_records(bad_bladder_cases=1))
    # from a prior that lets the bad bladder (paths' Dice 0.90) through
    prior = QaThresholds(
        min_path_dice_organ=dict.fromkeys(
            ("bladder", "rectum", "seminal_vesicles", "prostate"), 0.8
        )
    )
    assert fired_matrix(few, prior)["path_disagreement"][few.bad].sum() < few.bad.sum()
    assert choose_thresholds(few, prior, target_recall=1.0).recall == 1.0
    cv = cross_validate(few, prior, target_recall=1.0)
    assert cv is not None and cv["by_organ"]["bladder"]["recall"] == 0.0
    assert cv["by_organ"]["prostate"]["recall"] == 1.0
    one_case = samples_from_records([r for r in _path_dice_records() if r["case_id"] == "c0"])
    assert cross_validate(one_case, QaThresholds()) is None


def test_choice_silences_a_flag_that_fires_on_good_contours() -> None:
    recs = _separable_records()
    for rec in recs:  # every good contour touches the box: noise
        for s in rec["structures"]:
            s["touches_crop_border"] = s["label"] == "good"
    samples = samples_from_records(recs)
    noisy = rates(fired_matrix(samples, QaThresholds())["touches_box"], samples)
    assert noisy["false_flag_rate"] == 1.0
    choice = choose_thresholds(samples)
    assert choice.thresholds.flag_touching_box is False
    assert choice.met and choice.false_flag_rate == 0.0


def test_choice_says_when_no_thresholds_reach_both_targets() -> None:
    recs = _separable_records()
    # bad contours that look exactly like good ones (a shifted planning contour): no flag sees them
    recs += [
        _record(f"s{i}", "shifted_planning", [_structure("Prostate", "prostate", 40, 40, 0.5, 4.0)])
        for i in range(12)
    ]
    report = calibrate(recs)
    assert report["chosen"]["met"] is False
    assert "no thresholds reach recall >= 0.9" in report["chosen"]["note"]
    assert len(report["missed"]) == 12
    assert {m["population"] for m in report["missed"]} == {"shifted_planning"}
    assert report["chosen"]["by_population"]["dvf_noise"]["recall"] == 1.0
    assert report["chosen"]["by_population"]["shifted_planning"]["recall"] == 0.0
    assert report["chosen"]["any"]["false_flag_rate"] <= 0.1


def test_the_search_never_loosens_a_volume_range_beyond_the_organs_clinical_envelope() -> None:
    """Good phantom prostates that shrank by 25 % cannot switch the prostate's check off."""
    from research.qa_cases import CLINICAL_VOLUME_ENVELOPE

    recs = []
    for i in range(10):
        change = -0.25 if i < 3 else 0.01 * (i - 5)
        good = [_structure("Prostate", "prostate", 40.0, 40.0 * (1 + change), 0.95)]
        recs.append(_record(f"c{i}", "network", good))
    samples = samples_from_records(recs)
    prior = _with_prostate_range(-0.12, 0.1)
    low = next(
        p for p in search_parameters(samples, prior) if p.key == "volume_change_range.prostate.low"
    )
    assert min(low.candidates) == CLINICAL_VOLUME_ENVELOPE["prostate"][0] == -0.2
    choice = choose_thresholds(samples, prior)
    # silencing 3 of 10 good prostates would need < -0.25: beyond the envelope, so they stay
    # flagged, and the choice says the targets are not met
    assert choice.values["volume_change_range.prostate.low"] >= -0.2
    assert choice.false_flag_rate == 0.3 and not choice.met
    # a current range already looser than the envelope stays where the search starts
    loose = _with_prostate_range(-0.3, 0.1)
    assert choose_thresholds(samples, loose).values["volume_change_range.prostate.low"] == -0.3


def test_thresholds_of_a_class_with_few_good_contours_are_held() -> None:
    """No good seminal vesicles measured: "flag them all" would cost nothing, so it stays."""
    recs = _separable_records()
    recs += [
        _record(f"v{i}", "network", [_structure("SV", "seminal_vesicles", 10, 10.2 + i, 0.6)])
        for i in range(4)
    ]
    recs += [_record("v9", "network", [_structure("SV", "seminal_vesicles", 10, 5.0, 0.95)])]
    samples = samples_from_records(recs)
    choice = choose_thresholds(samples)
    assert "volume_change_range.seminal_vesicles.high" in choice.held
    assert choice.thresholds.volume_change_range["seminal_vesicles"] == (-0.35, 0.35)
    # a held threshold still fires: SV -50 % is flagged, and counted in the choice's recall
    exact = np.zeros(len(samples), bool)
    for f in fired_matrix(samples, choice.thresholds).values():
        exact |= f
    assert exact[-1]
    assert choice.recall == rates(exact, samples)["recall"]
    assert choice.false_flag_rate == rates(exact, samples)["false_flag_rate"]


def test_report_json_and_markdown(tmp_path: Path) -> None:
    loose = _with_prostate_range(-0.5, 0.5)
    report = calibrate(_separable_records(), loose)
    js, md = write_report(report, tmp_path)
    data = json.loads(js.read_text())
    assert data["counts"]["good"] == 24 and data["counts"]["bad"] == 12
    assert set(data["current"]["flags"]) == set(FLAGS)
    chosen = thresholds_from_dict(data["chosen"]["thresholds"])
    assert chosen.volume_change_range["prostate"] != (-0.5, 0.5)
    assert data["current"]["any"]["recall"] == 0.0 and data["chosen"]["any"]["recall"] == 1.0
    text = md.read_text()
    assert text == report_markdown(report)
    assert "| `volume_change` |" in text and "**any flag**" in text
    assert "| dvf_noise | 0 / 12 / 0 | 0 |" in text
    assert "volume_change_range.prostate.low" in text


def test_thresholds_round_trip_through_json() -> None:
    t = QaThresholds(min_path_dice=0.7, volume_change_range={"prostate": (-0.08, 0.12)})
    back = thresholds_from_dict(json.loads(json.dumps(thresholds_to_dict(t))))
    assert back == t


# ------------------------------------------------------------------ perturbations
def test_smooth_random_field_has_the_asked_size_and_is_reproducible() -> None:
    a = smooth_random_field((40, 48, 56), 4.0, 16.0, np.random.default_rng(1))
    b = smooth_random_field((40, 48, 56), 4.0, 16.0, np.random.default_rng(1))
    assert a.shape == (3, 40, 48, 56) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert np.sqrt((a.astype(np.float64) ** 2).sum(axis=0).mean()) == pytest.approx(4.0, rel=1e-4)
    rough = smooth_random_field((40, 48, 56), 4.0, 4.0, np.random.default_rng(1))
    assert np.abs(np.diff(rough, axis=3)).mean() > 2 * np.abs(np.diff(a, axis=3)).mean()


def test_cut_field_of_view_puts_air_outside_a_circle() -> None:
    hu = np.full((2, 64, 64), -1000.0, np.float32)
    hu[:, 8:56, 4:60] = 40.0  # body 56 px wide
    cut, radius = cut_field_of_view(hu, (1.0, 1.0), 0.8)
    assert radius == pytest.approx(0.8 * 0.5 * 55)
    assert cut[0, 32, 4] == -1024.0 and cut[0, 32, 32] == 40.0
    assert (cut[:, 32, 10:54] == 40.0).all()


def test_shifted_mask_moves_by_whole_voxels() -> None:
    m = np.zeros((4, 6, 8), bool)
    m[1, 2, 3] = True
    out = _shifted(m, np.array([1, -2, 3]))
    assert np.argwhere(out).tolist() == [[2, 0, 6]]
    assert not _shifted(m, np.array([0, 0, 9])).any()


@dataclass
class _Pred:
    seg_probs: np.ndarray | None
    dvf: np.ndarray


class ZeroBackend:
    """Fake network: segmentation = the pre-aligned planning labels; DVF = 0."""

    def __init__(self) -> None:
        self.metadata: dict[str, Any] = {"name": "fake", "version": "0", "path_choice": {}}
        self.calls = 0

    def predict(self, fixed: np.ndarray, moving: np.ndarray, moving_labels: np.ndarray) -> _Pred:
        self.calls += 1
        lab = moving_labels.astype(int)
        probs = np.stack([(lab == c).astype(np.float32) for c in range(5)])
        return _Pred(probs, np.zeros((3, *fixed.shape), np.float32))


def test_replay_backend_runs_the_network_once_per_input() -> None:
    inner = ZeroBackend()
    replay = ReplayBackend(inner)
    x = np.zeros((8, 8, 8), np.float32)
    y = x + 1
    first = replay.predict(y, x, x)
    assert replay.predict(y, x, x) is first and inner.calls == 1
    replay.perturb = lambda p: _Pred(p.seg_probs, p.dvf + 1.0)
    assert float(replay.predict(y, x, x).dvf.mean()) == 1.0 and inner.calls == 1
    # the null-field correction's pass (the same image twice) is kept beside the pair's, and
    # never perturbed: the perturbation would be subtracted again
    null = replay.predict(x, x, x)
    assert float(null.dvf.mean()) == 0.0 and inner.calls == 2
    assert float(replay.predict(y, x, x).dvf.mean()) == 1.0 and inner.calls == 2
    replay.perturb = None
    replay.predict(x + 2, x, x)  # a third input: the least recently used one (null) goes
    assert inner.calls == 3
    replay.predict(y, x, x)
    assert inner.calls == 3
    replay.predict(x, x, x)
    assert inner.calls == 4
    assert replay.metadata["name"] == "fake"


# ------------------------------------------------------------------ the harness end to end
@pytest.mark.slow
@pytest.mark.integration
def test_harness_records_resumes_and_reports(tmp_path: Path) -> None:
    """One 128 x 128 phantom fraction, a fake network, four populations; then a resumed run."""
    backend = ZeroBackend()
    settings = RunSettings(device="cpu", matrix=128, slice_mm=3.0)
    pops = ("network", "dvf_noise", "shifted_planning", "cutoff_fov")
    lines: list[str] = []
    report = run_qa_calibration(
        tmp_path,
        cases=1,
        seed=3000,
        populations=pops,
        settings=settings,
        backend=backend,
        progress=lines.append,
    )
    assert report["errors"] == []
    # three inputs (network and dvf_noise share one), each with its null-field pass
    assert backend.calls == 6
    assert len(lines) == 4 and all("phantom3000-f1" in line for line in lines)
    recs = load_records(tmp_path)
    assert [r["population"] for r in recs] == sorted(pops)
    for rec in recs:
        assert rec["status"] == "done", rec
        names = {s["name"] for s in rec["structures"]}
        assert {"Prostate", "Bladder", "Rectum", "SeminalVesicles"} <= names
        assert "Body" not in names  # the outline is not scored
        for s in rec["structures"]:
            assert 0.0 <= s["dsc"] <= 1.0 and s["label"] in ("good", "bad", "borderline")
            assert "planning_cc" in s and "jacobian" in s and "path_dice" in s
    by_pop = {r["population"]: r for r in recs}
    assert by_pop["dvf_noise"]["perturbation"]["rms_mm"] >= 2.0
    assert np.linalg.norm(by_pop["shifted_planning"]["perturbation"]["shift_mm"]) >= 4.0
    prostate = {
        r["population"]: next(s for s in r["structures"] if s["name"] == "Prostate") for r in recs
    }
    assert prostate["shifted_planning"]["dsc"] < prostate["network"]["dsc"]
    assert (tmp_path / "qa_calibration.md").is_file() and not (tmp_path / "work").exists()
    assert report["counts"]["runs"] == 4 and report["counts"]["structures"] > 0

    # resumed: nothing re-runs, the report is the same
    again = run_qa_calibration(
        tmp_path, cases=1, seed=3000, populations=pops, settings=settings, backend=backend
    )
    assert backend.calls == 6
    assert again["counts"] == report["counts"]


def test_cli_benchmark_qa_needs_a_report_folder() -> None:
    from research.__main__ import app

    result = CliRunner().invoke(app, ["qa", "--cases", "1"])
    assert result.exit_code == 2
    assert "--report" in result.stderr


def test_cli_benchmark_qa_reports_from_kept_records(tmp_path: Path) -> None:
    from research.__main__ import app

    _keep_records(tmp_path, _separable_records()[:2], "phantom3000-f1")
    result = CliRunner().invoke(
        app,
        [
            "qa",
            "--cases",
            "1",
            "--seed",
            "3000",
            "--runs",
            "network,dvf_noise",
            "--report",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "# QA flag calibration" in result.stdout
    data = json.loads((tmp_path / "qa_calibration.json").read_text())
    assert data["counts"]["runs"] == 2 and data["command"]["seed"] == 3000


def test_thresholds_chosen_on_some_cases_are_tested_on_held_out_ones() -> None:
    """The held-out rates are the chosen thresholds applied to cases the choice never saw."""
    recs = _separable_records()
    calib = [r for r in recs if int(r["case_id"][1:]) < 8]
    held = [r | {"case_id": f"h{r['case_id']}"} for r in recs if int(r["case_id"][1:]) >= 8]
    prior = _with_prostate_range(-0.5, 0.5)  # lets every bad prostate through
    report = calibrate(calib, prior, held_out=held)
    out = report["held_out"]
    assert out["cases"] == ["hc10", "hc11", "hc8", "hc9"]
    assert out["counts"]["bad"] == 4 and out["counts"]["good"] == 8
    assert out["current"]["any"]["recall"] == 0.0  # the prior misses them
    chosen = thresholds_from_dict(report["chosen"]["thresholds"])
    samples = samples_from_records(held)
    fired = np.zeros(len(samples), bool)
    for code in STRUCTURE_FLAGS:
        fired |= fired_matrix(samples, chosen)[code]
    expected = rates(fired, samples)
    assert out["chosen"]["any"] == expected
    assert expected["recall"] == 1.0 and expected["false_flag_rate"] == 0.0
    assert set(out["chosen"]["by_population"]) == {"network", "dvf_noise"}
    assert out["missed"] == [] and out["false_flags"] == []
    assert "held out** (4 cases never used in the choice)" in report_markdown(report)
    assert calibrate(calib, prior)["held_out"] is None
    with pytest.raises(InvalidInput, match=r"c0.*also among the calibration records"):
        calibrate(calib, prior, held_out=[recs[0]])


def test_cli_benchmark_qa_tests_the_choice_on_a_held_out_folder(tmp_path: Path) -> None:
    from research.__main__ import app

    recs = _separable_records()
    for i in range(8):
        _keep_records(tmp_path / "cal", [r for r in recs if r["case_id"] == f"c{i}"], f"c{i}")
    for i in range(8, 12):
        _keep_records(tmp_path / "test", [r for r in recs if r["case_id"] == f"c{i}"], f"t{i}")
    args = ["qa", "--cases", "0", "--report", str(tmp_path / "cal")]
    result = CliRunner().invoke(app, [*args, "--held-out", str(tmp_path / "test")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "cal" / "qa_calibration.json").read_text())
    assert data["held_out"]["cases"] == ["t10", "t11", "t8", "t9"]
    assert data["held_out"]["counts"]["runs"] == 8
    assert data["command"]["held_out"] == str(tmp_path / "test")
    empty = CliRunner().invoke(app, [*args, "--held-out", str(tmp_path / "none")])
    assert empty.exit_code == 2
    assert "no records under cases/" in empty.stderr


def test_a_finished_run_leaves_another_runs_work_alone(tmp_path: Path) -> None:
    """Two runs may share a report folder: one that ends removes only its own work folders."""
    _keep_records(tmp_path, _separable_records()[:2], "phantom3000-f1")
    mine = tmp_path / "work" / "phantom3000-f1"
    other = tmp_path / "work" / "real-0123abcd-s5005"  # another run's real scan, in progress
    for folder in (mine, other):
        (folder / "fraction_1").mkdir(parents=True)
        (folder / "fraction_1" / "ct.dcm").write_bytes(b"x")
    run_qa_calibration(tmp_path, cases=1, seed=3000, populations=("network", "dvf_noise"))
    assert not mine.exists()
    assert (other / "fraction_1" / "ct.dcm").is_file()
    # another run's records (here a second case), and a report over every record of the folder
    _keep_records(tmp_path, _separable_records()[2:4], "real-0123abcd-s5005-f1")
    one = run_qa_calibration(tmp_path, cases=1, seed=3000, populations=("network", "dvf_noise"))
    every = run_qa_calibration(tmp_path, cases=0, populations=("network", "dvf_noise"))
    assert one["counts"]["cases"] == 1 and every["counts"]["cases"] == 2


@pytest.mark.slow
@pytest.mark.integration
def test_harness_with_the_bundled_model(tmp_path: Path) -> None:
    """One held-out phantom fraction with the bundled model and the iterative baseline."""
    report = run_qa_calibration(
        tmp_path,
        cases=1,
        seed=3001,
        populations=("network", "iterative"),
        settings=RunSettings(device="cpu", matrix=128, slice_mm=3.0),
    )
    assert report["errors"] == [] and report["counts"]["runs_done"] == 2
    assert report["model"]["name"] == "crossstitch"
    iterative = report["counts"]["by_population"]["iterative"]
    assert iterative["good"] + iterative["bad"] + iterative["borderline"] >= 4


def test_other_path_swaps_single_paths_and_takes_the_less_trusted_one_of_a_fusion() -> None:
    meta = {
        "path_choice": {
            "prostate": "fusion",
            "seminal_vesicles": "fusion",
            "rectum": "registration",
        },
        "fusion": {"method": "weighted", "weights": {"prostate": [0.7, 0.3]}},
    }
    got = other_path(meta)
    assert got == {
        "prostate": "registration",  # w_reg 0.3 < w_seg 0.7
        "seminal_vesicles": "registration",  # no weights: 0.5 / 0.5, a tie
        "rectum": "segmentation",
        "bladder": "registration",  # not named: the pipeline's default, segmentation
    }


# ------------------------------------------------------------------ contours of one organ
def _family_records(with_field: bool) -> list[dict[str, Any]]:
    """Per case: the manual bladder and its automatic contours, mapped alike.

    Good runs: the mapping is right (residual 0.5 mm), all contours good. Bad runs: it is 4 mm off
    around the bladder; the manual contour shows it, ``Bladder_DL`` (no figure of its own) and
    ``Bladder_MBS`` are bad too.
    """
    recs = []
    for i in range(8):
        for population, residual, dsc, msd in (
            ("network", 0.5, 0.95, 0.8),
            ("dvf_noise", 4.0, 0.7, 3.5),
        ):
            items = [
                _structure(
                    "Vescica", "bladder", 200.0, 200.0, dsc, msd, residual_shift_mm=residual
                ),
                _structure("Bladder_DL", None, 190.0, 190.0, dsc, msd),
                _structure("Bladder_MBS", None, 210.0, 210.0, dsc, msd, residual_shift_mm=0.5),
                _structure("Retto", "rectum", 60.0, 60.0, 0.95, 0.8, residual_shift_mm=0.5),
            ]
            if with_field:
                for s, fam in zip(items, ("bladder", "bladder", "bladder", "rectum"), strict=True):
                    s["organ_family"] = fam
            recs.append(_record(f"c{i}", population, items))
    return recs


@pytest.mark.parametrize("with_field", [True, False])
def test_the_same_organ_flag_is_measured_as_jrs_qa_family_raises_it(with_field: bool) -> None:
    """Records with ``organ_family`` and older ones (the names resolved) spread alike."""
    from jrs.qa.family import flag_same_organ
    from jrs.qa.figures import StructureQa, flag_structure

    samples = samples_from_records(_family_records(with_field))
    t = QaThresholds(max_residual_shift_mm={"bladder": 3.0})
    fired = fired_matrix(samples, t)
    runs: dict[tuple[str, str], list[int]] = {}
    for i, it in enumerate(samples.items):
        runs.setdefault((it["case_id"], it["population"]), []).append(i)
    fields = set(StructureQa.__dataclass_fields__)
    for (_, population), idx in runs.items():
        qas = []
        for i in idx:
            item = dict(samples.items[i])
            item.setdefault(
                "organ_family",
                {"Vescica": "bladder", "Retto": "rectum"}.get(item["name"], "bladder"),
            )
            qa = StructureQa(**{k: v for k, v in item.items() if k in fields})
            qa.flags, qa.flag_codes = [], []
            qas.append(flag_structure(qa, t))
        flag_same_organ(qas)
        for i, qa in zip(idx, qas, strict=True):
            assert fired["same_organ_flagged"][i] == ("same_organ_flagged" in qa.flag_codes)
        names = {samples.items[i]["name"]: fired["same_organ_flagged"][i] for i in idx}
        bad = population == "dvf_noise"
        assert names == {"Vescica": False, "Bladder_DL": bad, "Bladder_MBS": bad, "Retto": False}


def test_choice_catches_automatic_contours_through_the_manual_ones_figure() -> None:
    samples = samples_from_records(_family_records(True))
    loose = QaThresholds(max_residual_shift_mm={"bladder": 10.0, "*": 10.0})
    assert rates(fired_matrix(samples, loose)["same_organ_flagged"], samples)["recall"] == 0.0
    choice = choose_thresholds(samples, loose)
    # the bladder's residual limit comes down between 0.5 and 4 mm: the manual contours are
    # caught by their figure, the automatic ones by the spread, no good contour is flagged
    assert choice.met and choice.recall == 1.0 and choice.false_flag_rate == 0.0
    assert 1.5 <= choice.thresholds.max_residual_shift_mm["bladder"] < 4.0
    fired = fired_matrix(samples, choice.thresholds)
    dl = np.array([it["name"] == "Bladder_DL" for it in samples.items])
    assert fired["same_organ_flagged"][dl & samples.bad].all()
    assert not fired["same_organ_flagged"][samples.good].any()


def test_issue30_labels_are_stricter_and_relabel_stored_records() -> None:
    from research.qa_cases import LABEL_CRITERIA

    c = LABEL_CRITERIA["issue30"]
    assert label_contour(0.89, 0.5, c) == "bad"  # good by the v3 criteria
    assert label_contour(0.89, 0.5) == "borderline"
    assert label_contour(0.92, 0.5, c) == "borderline"
    assert label_contour(0.96, 0.5, c) == "good"
    assert label_contour(0.96, 2.2, c) == "bad"
    recs = [
        _record("c0", "network", [_structure("Prostate", "prostate", 50.0, 50.0, 0.89, 0.6)]),
        _record("c1", "network", [_structure("Prostate", "prostate", 50.0, 50.0, 0.93, 0.4)]),
    ]
    as_written = samples_from_records(recs)
    relabelled = samples_from_records(recs, c)
    assert as_written.label.tolist() == ["borderline", "good"]
    assert relabelled.label.tolist() == ["bad", "borderline"]


def test_calibration_cases_never_use_the_held_out_family() -> None:
    from research.qa_cases import RealSource, check_case_family, phantom_specs, real_specs

    with pytest.raises(InvalidInput, match="held out of calibration"):
        phantom_specs(3000, 2, engine="dome")
    with pytest.raises(InvalidInput, match="organ"):
        check_case_family("analytic", "broad")
    with pytest.raises(InvalidInput, match="unknown"):
        check_case_family("spline", "v3")
    # the default keeps the ids of the records written before families and profiles
    assert [s.case_id for s in phantom_specs(3000, 2)] == ["phantom3000-f1", "phantom3001-f1"]
    organ = phantom_specs(3000, 1, engine="organ", profile="broad")[0]
    assert (organ.case_id, organ.engine, organ.profile) == (
        "phantom3000-f1-organ-broad",
        "organ",
        "broad",
    )
    src = RealSource(Path("/nowhere/ct"), Path("/nowhere/rs.dcm"))
    real = real_specs(src, 2, 5005, "broad")
    assert [s.case_id for s in real] == [f"{src.key}-s5005-f1-broad", f"{src.key}-s5005-f2-broad"]
    assert {s.engine for s in real} == {"organ"}
    assert [s.case_id for s in real_specs(src, 1)] == [f"{src.key}-s5005-f1"]


def test_profiles_belong_to_the_organ_engine() -> None:
    from jrs.synth import generate_fraction, generate_patient
    from jrs.synth.from_planning import write_from_planning

    patient = generate_patient(11, matrix=96, slice_thickness=3.0)
    with pytest.raises(InvalidInput, match="organ"):
        generate_fraction(patient, 1, engine="analytic", profile="broad")
    with pytest.raises(InvalidInput, match="organ"):
        generate_fraction(patient, 1, engine="dome", profile="broad")
    with pytest.raises(InvalidInput, match="dome family has no draw profiles"):
        write_from_planning(
            "/nowhere/ct", "/nowhere/rs.dcm", "/nowhere/out", family="dome", profile="broad"
        )
    broad = generate_fraction(patient, 1, engine="organ", profile="broad")
    v3 = generate_fraction(patient, 1, engine="organ")
    assert broad.params["profile"] == "broad" and v3.params["profile"] == "v3"
    assert broad.study_instance_uid != v3.study_instance_uid
