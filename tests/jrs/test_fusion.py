"""Per-organ fusion of the segmentation and registration paths: analytic cases."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jrs.core.errors import InvalidInput
from jrs.core.geometry import Geometry
from jrs.core.labels import BLADDER, PROSTATE, RECTUM, SEMINAL_VESICLES
from jrs.inference.fusion import (
    DEFAULT_WEIGHTS,
    EVIDENCE_HIGH_HU,
    EVIDENCE_LOW_HU,
    FusionSpec,
    evidence_probability,
    fuse,
    fuse_probabilities,
    misalignment_evidence,
    organ_box,
    probability_source,
    softmax_source,
    staple_probability,
    warped_probability,
    weighted_probability,
    weights_from_dice,
)
from jrs.registration.propagation import warp_labels

SHAPE = (40, 44, 48)


def _distance(centre: tuple[float, float, float]) -> np.ndarray:
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in SHAPE), indexing="ij")
    return np.sqrt((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2)


def _sphere(centre: tuple[float, float, float], radius: float) -> np.ndarray:
    return _distance(centre) <= radius


def _soft_sphere(centre: tuple[float, float, float], radius: float) -> np.ndarray:
    """A probability map: 1 inside, 0 outside, a smooth 2-voxel ramp across the surface."""
    return (1.0 / (1.0 + np.exp((_distance(centre) - radius) / 0.7))).astype(np.float32)


def _scene() -> np.ndarray:
    """Four organs, side by side, not touching."""
    labels = np.zeros(SHAPE, np.uint8)
    labels[_sphere((12, 14, 14), 7)] = BLADDER
    labels[_sphere((28, 14, 14), 6)] = RECTUM
    labels[_sphere((12, 30, 33), 5)] = SEMINAL_VESICLES
    labels[_sphere((28, 30, 33), 6)] = PROSTATE
    return labels


ORGANS = (BLADDER, RECTUM, SEMINAL_VESICLES, PROSTATE)


def _one_hot(labels: np.ndarray) -> np.ndarray:
    return np.stack([(labels == c).astype(np.float32) for c in range(5)])


@pytest.mark.parametrize("method", ["weighted", "staple"])
def test_identical_paths_fuse_to_themselves(method: str) -> None:
    labels = _scene()
    spec = FusionSpec(method=method, weights={"prostate": (0.2, 0.8)})  # type: ignore[arg-type]
    np.testing.assert_array_equal(fuse(labels, labels, ORGANS, spec), labels)
    # soft probabilities that agree with the hard maps give the same
    probs = probability_source(_one_hot(labels))
    fused = fuse(labels, labels, ORGANS, spec, seg_probability=probs, reg_probability=probs)
    np.testing.assert_array_equal(fused, labels)


def test_staple_of_identical_inputs_is_identity() -> None:
    mask = _sphere((20, 22, 24), 8)
    np.testing.assert_array_equal(staple_probability(mask, mask), mask.astype(np.float32))
    labels = _scene()
    np.testing.assert_array_equal(fuse(labels, labels, ORGANS, FusionSpec("staple")), labels)


def test_only_the_organs_asked_for_are_fused() -> None:
    labels = _scene()
    fused = fuse(labels, labels, [PROSTATE])
    np.testing.assert_array_equal(fused, np.where(labels == PROSTATE, labels, 0))


def test_a_background_path_with_weight_zero_is_ignored() -> None:
    reg = _scene()
    seg = np.where(reg == PROSTATE, 0, reg).astype(np.uint8)  # no prostate at all
    spec = FusionSpec(weights={"prostate": (0.0, 1.0)})
    fused = fuse(seg, reg, [PROSTATE], spec)
    np.testing.assert_array_equal(fused == PROSTATE, reg == PROSTATE)
    # ... with soft registration probabilities too: the fused organ is where P_reg >= 0.5
    soft = _soft_sphere((28, 30, 33), 6.0)
    reg_probs = np.zeros((5, *SHAPE), np.float32)
    reg_probs[PROSTATE] = soft
    fused = fuse(
        seg,
        reg,
        [PROSTATE],
        spec,
        seg_probability=probability_source(_one_hot(seg)),
        reg_probability=probability_source(reg_probs),
    )
    np.testing.assert_array_equal(fused == PROSTATE, soft >= 0.5)
    # with equal weights the empty path halves the probability: nothing reaches 0.5 but the
    # hard voxels of the registration path (exactly 0.5)
    half = fuse(seg, reg, [PROSTATE], FusionSpec())
    np.testing.assert_array_equal(half == PROSTATE, reg == PROSTATE)


def test_equal_weights_put_the_fused_volume_between_two_offset_spheres() -> None:
    a = _soft_sphere((20, 22, 20), 8.0)
    b = _soft_sphere((20, 22, 26), 8.0)  # 6 voxels apart along x
    seg_probs = np.zeros((5, *SHAPE), np.float32)
    reg_probs = np.zeros((5, *SHAPE), np.float32)
    seg_probs[PROSTATE], reg_probs[PROSTATE] = a, b
    seg = np.where(a >= 0.5, PROSTATE, 0).astype(np.uint8)
    reg = np.where(b >= 0.5, PROSTATE, 0).astype(np.uint8)
    fused = fuse(
        seg,
        reg,
        [PROSTATE],
        FusionSpec(weights={"prostate": (0.5, 0.5)}),
        seg_probability=probability_source(seg_probs),
        reg_probability=probability_source(reg_probs),
    )
    mask = fused == PROSTATE
    inter = (seg > 0) & (reg > 0)
    union = (seg > 0) | (reg > 0)
    assert inter.sum() < mask.sum() < union.sum()
    assert not (inter & ~mask).any() and not (mask & ~union).any()
    # the fused organ is centred half way (x = 23), symmetric in x about it
    x = np.nonzero(mask)[2]
    assert x.mean() == pytest.approx(23.0, abs=0.05)
    np.testing.assert_array_equal(mask[:, :, 23 - 10 : 23], mask[:, :, 23 + 10 : 23 : -1])
    # hard inputs: every voxel of either path has probability >= 0.5: the union
    hard = fuse(seg, reg, [PROSTATE])
    np.testing.assert_array_equal(hard == PROSTATE, union)
    # weights that favour a path move the fused organ towards it
    towards_a = fuse(
        seg,
        reg,
        [PROSTATE],
        FusionSpec(weights={"prostate": (0.8, 0.2)}),
        seg_probability=probability_source(seg_probs),
        reg_probability=probability_source(reg_probs),
    )
    assert np.nonzero(towards_a == PROSTATE)[2].mean() < 22.0


def test_organs_are_mutually_exclusive() -> None:
    # two organs whose paths overlap: the voxel goes to the larger fused probability
    seg = np.zeros(SHAPE, np.uint8)
    reg = np.zeros(SHAPE, np.uint8)
    seg[_sphere((20, 22, 18), 8)] = BLADDER
    reg[_sphere((20, 22, 20), 8)] = BLADDER
    seg[_sphere((20, 22, 30), 8)] = PROSTATE  # the prostate path overlaps the bladder's
    reg[_sphere((20, 22, 25), 8)] = PROSTATE
    for spec in (
        FusionSpec(),
        FusionSpec(weights={"bladder": (0.9, 0.1), "prostate": (0.1, 0.9)}),
        FusionSpec("staple"),
    ):
        fused = fuse(seg, reg, [BLADDER, PROSTATE], spec)
        assert set(np.unique(fused)) == {0, BLADDER, PROSTATE}
        # each voxel one label by construction; a voxel both paths give the bladder, only the
        # registration path the prostate, stays bladder
        both_bladder = (seg == BLADDER) & (reg == BLADDER)
        assert (fused[both_bladder] == BLADDER).all()
    # the rule itself: argmax among organs >= 0.5, ties to the lower label
    p1 = np.array([0.6, 0.6, 0.4, 0.9], np.float32).reshape(1, 1, 4)
    p4 = np.array([0.7, 0.6, 0.45, 0.2], np.float32).reshape(1, 1, 4)
    out = fuse_probabilities({PROSTATE: p4, BLADDER: p1})
    np.testing.assert_array_equal(out.ravel(), [PROSTATE, BLADDER, 0, BLADDER])


def test_weighted_probability_and_weights_rule() -> None:
    p = weighted_probability(np.array([1.0, 0.0]), np.array([0.0, 1.0]), (3.0, 1.0))
    np.testing.assert_allclose(p, [0.75, 0.25])
    assert weights_from_dice(0.9, 0.3) == pytest.approx((0.75, 0.25))
    assert weights_from_dice(0.0, 0.8) == (0.0, 1.0)
    assert weights_from_dice(0.0, 0.0) == DEFAULT_WEIGHTS
    assert weights_from_dice(float("nan"), 0.5) == (0.0, 1.0)
    with pytest.raises(InvalidInput, match="both be 0"):
        weighted_probability(np.ones(1), np.ones(1), (0.0, 0.0))


def test_spec_from_metadata() -> None:
    assert FusionSpec.from_metadata({}) == FusionSpec()
    assert FusionSpec.from_metadata(None).weights_for("prostate") == DEFAULT_WEIGHTS
    spec = FusionSpec.from_metadata(
        {"fusion": {"method": "staple", "weights": {"prostate": [1, 3]}, "rule": "for people"}}
    )
    assert spec.method == "staple"
    assert spec.weights_for("prostate") == pytest.approx((0.25, 0.75))
    assert spec.weights_for("rectum") == DEFAULT_WEIGHTS
    assert FusionSpec.from_json(spec.to_json()) == spec
    with pytest.raises(InvalidInput, match="method 'vote' unknown"):
        FusionSpec.from_json({"method": "vote"})
    with pytest.raises(InvalidInput, match="organ 'liver'"):
        FusionSpec.from_json({"weights": {"liver": [1, 1]}})
    with pytest.raises(InvalidInput, match=">= 0"):
        FusionSpec.from_json({"weights": {"prostate": [-1, 1]}})
    with pytest.raises(InvalidInput, match=r"\[w_seg, w_reg\]"):
        FusionSpec.from_json({"weights": {"prostate": 0.5}})
    with pytest.raises(InvalidInput, match="must be an object"):
        FusionSpec.from_json("weighted")


def test_softmax_inside_the_box_of_a_non_contiguous_view() -> None:
    rng = np.random.default_rng(0)
    stored = rng.normal(size=(*SHAPE, 5)).astype(np.float32) * 3
    logits = np.moveaxis(stored, -1, 0)  # (5, D, H, W), not contiguous
    assert not logits.flags.c_contiguous
    box = (slice(3, 20), slice(5, 9), slice(10, 41))
    e = np.exp(logits - logits.max(axis=0))
    full = e / e.sum(axis=0)
    got = softmax_source(logits)(PROSTATE, box)
    np.testing.assert_allclose(got, full[(PROSTATE, *box)], rtol=1e-5, atol=1e-6)


def test_box_restriction_equals_the_whole_grid() -> None:
    a = _soft_sphere((20, 22, 20), 8.0)
    b = _soft_sphere((21, 20, 25), 7.0)
    seg_probs = np.zeros((5, *SHAPE), np.float32)
    reg_probs = np.zeros((5, *SHAPE), np.float32)
    seg_probs[PROSTATE], reg_probs[PROSTATE] = a, b
    seg = np.where(a >= 0.5, PROSTATE, 0).astype(np.uint8)
    reg = np.where(b >= 0.5, PROSTATE, 0).astype(np.uint8)
    kwargs = {
        "seg_probability": probability_source(seg_probs),
        "reg_probability": probability_source(reg_probs),
    }
    boxed = fuse(seg, reg, [PROSTATE], **kwargs)  # type: ignore[arg-type]
    whole = fuse(seg, reg, [PROSTATE], margin=100, **kwargs)  # type: ignore[arg-type]
    np.testing.assert_array_equal(boxed, whole)
    np.testing.assert_array_equal(whole == PROSTATE, 0.5 * a + 0.5 * b >= 0.5)
    assert organ_box(PROSTATE, [seg, reg], 0) is not None
    assert organ_box(BLADDER, [seg, reg]) is None


def test_warped_probability_is_the_linearly_warped_one_hot_map() -> None:

    grid = Geometry(SHAPE, origin=[-10.0, 5.0, 3.0], spacing=[1.0, 1.0, 1.0])
    labels = _scene()
    # an integer shift of 3 voxels along x (pull: daily p <- planning p + u): the organ moves -x
    dvf = np.zeros((*SHAPE, 3), np.float32)
    dvf[..., 0] = 3.0
    box = organ_box(PROSTATE, [labels], 5)
    assert box is not None
    p = warped_probability(labels, dvf, grid)(PROSTATE, box)
    expected = np.zeros(SHAPE, np.float32)
    expected[:, :, :-3] = labels[:, :, 3:] == PROSTATE
    np.testing.assert_allclose(p, expected[box], atol=1e-6)
    # a smooth sub-voxel field: P >= 0.5 matches sitkLabelLinear's arg-max (the hard path)
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in SHAPE), indexing="ij")
    dvf = np.stack(
        [1.7 * np.sin(z / 9.0), -1.3 * np.cos(x / 11.0), 0.8 * np.sin(y / 7.0)], axis=-1
    ).astype(np.float32)
    hard = warp_labels(labels, dvf, grid, 3.0)
    box = organ_box(PROSTATE, [labels, hard], 3)
    assert box is not None
    p = warped_probability(labels, dvf, grid)(PROSTATE, box)
    assert p.min() >= 0.0 and p.max() <= 1.0 + 1e-6
    clear = np.abs(p - 0.5) > 1e-3  # away from exact ties
    np.testing.assert_array_equal((p >= 0.5)[clear], (hard[box] == PROSTATE)[clear])
    assert (p > 0.0).sum() > (p >= 0.5).sum()  # a soft map, not a hard one


def test_misalignment_evidence_from_the_image_difference() -> None:
    grid = Geometry(SHAPE, origin=[0.0, 0.0, 0.0], spacing=[1.0, 1.0, 1.0])
    rng = np.random.default_rng(0)
    planning = rng.normal(0.0, 0.02, SHAPE).astype(np.float32)  # 20 HU noise, normalised
    zero = np.zeros((*SHAPE, 3), np.float32)
    box = (slice(5, 30), slice(6, 38), slice(4, 40))
    # the same scan: no evidence at all
    same = misalignment_evidence(planning, planning, zero, grid)(box)
    assert same.shape == (25, 32, 36) and float(same.max()) == 0.0
    # a uniform offset between the scans: a = (|offset| - low) / (high - low) everywhere
    offset_hu = 0.5 * (EVIDENCE_LOW_HU + EVIDENCE_HIGH_HU)
    shifted = planning + np.float32(offset_hu / 1000.0)
    a = misalignment_evidence(shifted, planning, zero, grid)(box)
    np.testing.assert_allclose(a, 0.5, atol=1e-3)
    # an edge misplaced by 4 voxels: evidence at the edge, none far from it
    fixed = np.zeros(SHAPE, np.float32)
    moving = np.zeros(SHAPE, np.float32)
    fixed[:, :, 24:] = 0.1  # +100 HU
    moving[:, :, 28:] = 0.1
    a = misalignment_evidence(fixed, moving, zero, grid)(box)
    assert float(a[:, :, 24 - 4 : 28 - 4].min()) == 1.0  # box x starts at 4
    assert float(a[:, :, :10].max()) == 0.0 and float(a[:, :, -5:].max()) == 0.0
    # the field that undoes the misplacement removes the evidence (pull: fixed x <- x + 4 mm)
    undo = zero.copy()
    undo[..., 0] = 4.0
    inner = (slice(5, 30), slice(6, 38), slice(10, 36))
    assert float(misalignment_evidence(fixed, moving, undo, grid)(inner).max()) == 0.0
    np.testing.assert_allclose(
        evidence_probability([1.0, 0.0], [0.0, 1.0], [0.25, 0.25]), [0.25, 0.75]
    )
    with pytest.raises(InvalidInput, match="network grid"):
        misalignment_evidence(fixed[:-1], moving, zero, grid)
    with pytest.raises(InvalidInput, match="evidence fusion needs"):
        fuse(_scene(), _scene(), ORGANS, FusionSpec("evidence"))


def test_bad_inputs_are_refused() -> None:
    labels = _scene()
    with pytest.raises(InvalidInput, match="one 3-D shape"):
        fuse(labels, labels[:-1], ORGANS)
    with pytest.raises(InvalidInput, match="organ label 7"):
        fuse(labels, labels, [7])
    with pytest.raises(InvalidInput, match="no organ probabilities"):
        fuse_probabilities({})


# ------------------------------------------------------------------ through the pipeline
class FusionBackend:
    """Fake network with a real `jrs.inference.model.Prediction`.

    Segmentation logits: the pre-aligned planning labels moved by ``seg_shift`` voxels along x
    (a soft one-hot map), held as a non-contiguous view as the tiled inference gives them;
    DVF: zero, so the registration path is the pre-aligned planning labels themselves.
    """

    def __init__(self, metadata: dict | None = None, seg_shift: int = 3) -> None:
        self.metadata: dict = {"name": "fake", "version": "0", **(metadata or {})}
        self.seg_shift = seg_shift

    def predict(self, fixed: np.ndarray, moving: np.ndarray, moving_labels: np.ndarray) -> object:
        from jrs.inference.model import InferenceTimings, Prediction

        lab = np.roll(moving_labels.astype(np.int64), self.seg_shift, axis=2)
        stored = np.stack([(lab == c).astype(np.float32) * 6.0 for c in range(5)], axis=-1)
        logits = np.moveaxis(stored, -1, 0)  # (5, D, H, W) view, not contiguous
        dvf = np.zeros((3, *fixed.shape), np.float32)
        return Prediction(seg_logits=logits, dvf=dvf, timings=InferenceTimings())


@pytest.fixture(scope="module")
def phantom_case(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    from jrs.synth import generate_fraction, generate_patient, write_fraction, write_patient

    root = tmp_path_factory.mktemp("fusion_case")
    patient = generate_patient(11, matrix=128, slice_thickness=3.0)
    write_patient(patient, root)
    write_fraction(generate_fraction(patient, 1), root / "fraction_1")
    return (
        root / "planning" / "ct",
        root / "planning" / "rtstruct.dcm",
        root / "fraction_1" / "ct",
    )


@pytest.fixture(scope="module")
def fusion_runs(phantom_case: tuple, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from jrs.pipeline.options import RecontourOptions
    from jrs.pipeline.run import recontour

    out = tmp_path_factory.mktemp("fusion_runs")
    runs = {
        # the model's choice: segmentation (no metadata); fusion kept aside for validation
        "plain": recontour(
            *phantom_case,
            out / "plain",
            RecontourOptions(keep_fusion=True),
            backend=FusionBackend(),
        ),
        # the user asks for the prostate fused (default weights 0.5 / 0.5)
        "prostate": recontour(
            *phantom_case,
            out / "prostate",
            RecontourOptions(path_choice={"prostate": "fusion"}),
            backend=FusionBackend(),
        ),
        # the model's metadata chooses fusion everywhere, weights from validation
        "metadata": recontour(
            *phantom_case,
            out / "metadata",
            backend=FusionBackend(
                {
                    "path_choice": dict.fromkeys(
                        ("bladder", "rectum", "seminal_vesicles", "prostate"), "fusion"
                    ),
                    "fusion": {"method": "weighted", "weights": {"prostate": [0.0, 1.0]}},
                }
            ),
        ),
        "staple": recontour(
            *phantom_case,
            out / "staple",
            RecontourOptions(path_choice={"prostate": "fusion"}, fusion_method="staple"),
            backend=FusionBackend(),
        ),
    }
    return runs


def _sources(result: object) -> dict[str, str]:
    qa = result.qa_data  # type: ignore[attr-defined]
    return {s["organ"]: s["source"] for s in qa["structures"] if s["organ"]}


@pytest.mark.integration
def test_pipeline_fuses_the_organs_asked_for(fusion_runs: dict) -> None:
    plain, prostate = fusion_runs["plain"], fusion_runs["prostate"]
    seg = plain.path_labels["segmentation"].array
    reg = plain.path_labels["registration"].array
    assert (seg == PROSTATE).sum() > 100 and not np.array_equal(seg == PROSTATE, reg == PROSTATE)
    # the existing choice is untouched by keep_fusion: chosen = segmentation path
    np.testing.assert_array_equal(plain.path_labels["chosen"].array, seg)
    assert set(_sources(plain).values()) == {"segmentation"}
    assert set(np.unique(plain.path_labels["fusion"].array)) == {0, 1, 2, 3, 4}

    # fused prostate: between the two paths' intersection and union, in chosen and qa.json
    assert _sources(prostate) == {
        "bladder": "segmentation",
        "rectum": "segmentation",
        "seminal_vesicles": "segmentation",
        "prostate": "fusion",
    }
    fused = prostate.path_labels["fusion"].array
    assert set(np.unique(fused)) == {0, PROSTATE}
    mask = fused == PROSTATE
    inter = (seg == PROSTATE) & (reg == PROSTATE)
    union = (seg == PROSTATE) | (reg == PROSTATE)
    assert inter.sum() < mask.sum() < union.sum()
    assert not (inter & ~mask).any() and not (mask & ~union).any()
    chosen = prostate.path_labels["chosen"].array
    np.testing.assert_array_equal(chosen == PROSTATE, mask)
    for organ in (BLADDER, RECTUM, SEMINAL_VESICLES):  # the others: the segmentation path
        np.testing.assert_array_equal(chosen == organ, (seg == organ) & ~mask)
    # the same fusion in the "keep" run (same method, weights and inputs)
    np.testing.assert_array_equal(plain.path_labels["fusion"].array == PROSTATE, mask)
    qa = json.loads(prostate.qa.read_text())
    item = next(s for s in qa["structures"] if s["organ"] == "prostate")
    assert item["source"] == "fusion" and item["paths_validated"] is True
    assert "choose" in qa["timings_s"]


@pytest.mark.integration
def test_pipeline_takes_fusion_and_weights_from_the_model_metadata(fusion_runs: dict) -> None:
    result = fusion_runs["metadata"]
    assert set(_sources(result).values()) == {"fusion"}
    reg = result.path_labels["registration"].array
    fused = result.path_labels["fusion"].array
    # prostate weights (0, 1): the segmentation path is ignored, the fusion is the
    # registration path (zero DVF: its warped one-hot map is exactly 0/1)
    np.testing.assert_array_equal(fused == PROSTATE, reg == PROSTATE)
    assert set(np.unique(result.path_labels["chosen"].array)) == {0, 1, 2, 3, 4}


@pytest.mark.integration
def test_pipeline_staple_fusion(fusion_runs: dict) -> None:
    plain, result = fusion_runs["plain"], fusion_runs["staple"]
    seg = plain.path_labels["segmentation"].array == PROSTATE
    reg = plain.path_labels["registration"].array == PROSTATE
    mask = result.path_labels["fusion"].array == PROSTATE
    assert _sources(result)["prostate"] == "fusion"
    assert (seg & reg).sum() <= mask.sum() <= (seg | reg).sum()
    assert not (seg & reg & ~mask).any() and not (mask & ~(seg | reg)).any()


@pytest.mark.integration
def test_evidence_fusion_keeps_the_same_scan_twice_unchanged(
    phantom_case: tuple, tmp_path: Path
) -> None:
    """Planning CT given again as the daily CT: the fusion is the registration path exactly,
    although the segmentation path disagrees (shifted by 3 voxels) and the model's weights trust
    it more (0.7 / 0.3); the weighted fusion with those weights follows the segmentation."""
    from jrs.pipeline.options import RecontourOptions
    from jrs.pipeline.run import recontour

    planning_ct, planning_rs, _ = phantom_case
    organs = ("bladder", "rectum", "seminal_vesicles", "prostate")
    choice = dict.fromkeys(organs, "fusion")
    trust_seg = {"fusion": {"method": "weighted", "weights": {k: (0.7, 0.3) for k in organs}}}
    runs = {
        method: recontour(
            planning_ct,
            planning_rs,
            planning_ct,
            tmp_path / method,
            RecontourOptions(path_choice=choice, fusion_method=method),  # type: ignore[arg-type]
            backend=FusionBackend(trust_seg),
        )
        for method in ("evidence", "weighted")
    }
    reg = runs["evidence"].path_labels["registration"].array
    seg = runs["evidence"].path_labels["segmentation"].array
    assert (seg != reg).sum() > 1000
    np.testing.assert_array_equal(runs["evidence"].path_labels["chosen"].array, reg)
    assert (runs["weighted"].path_labels["chosen"].array != reg).any()


def test_pipeline_refuses_an_unknown_path_choice(phantom_case: tuple, tmp_path: Path) -> None:
    from jrs.pipeline.options import RecontourOptions
    from jrs.pipeline.run import recontour

    with pytest.raises(InvalidInput, match="'segmentation', 'registration' or 'fusion'"):
        recontour(
            *phantom_case,
            tmp_path / "out",
            RecontourOptions(path_choice={"prostate": "both"}),  # type: ignore[dict-item]
            backend=FusionBackend(),
        )


def test_cli_path_choice_is_parsed_and_checked_before_any_work(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from jrs.cli import app
    from jrs.cli.options import recontour_options as _recontour_options
    from jrs.pipeline.options import parse_path_choice as _parse_path_choice

    assert _parse_path_choice(None) == {}
    assert _parse_path_choice(["prostate=fusion, rectum=registration", "bladder=segmentation"]) == {
        "prostate": "fusion",
        "rectum": "registration",
        "bladder": "segmentation",
    }
    everything = _parse_path_choice(["all=fusion,prostate=registration"])
    assert everything == {
        "bladder": "fusion",
        "rectum": "fusion",
        "seminal_vesicles": "fusion",
        "prostate": "registration",
    }
    opts = _recontour_options(None, "cpu", "network", None, None, path_choice=["prostate=fusion"])
    assert opts.path_choice == {"prostate": "fusion"}
    args = ["--planning-ct", str(tmp_path), "--planning-rtstruct", str(tmp_path / "rs.dcm")]
    args += ["--daily-ct", str(tmp_path), "--out", str(tmp_path / "out")]
    for bad in ("prostate:fusion", "prostate=both", "liver=fusion"):
        result = CliRunner().invoke(app, ["recontour", *args, "--path-choice", bad])
        assert result.exit_code == 2, bad
        assert "expected ORGAN=PATH" in result.stderr
    result = CliRunner().invoke(app, ["recontour", *args, "--fusion-method", "average"])
    assert result.exit_code == 2
    assert "use weighted, staple, evidence" in result.stderr


def test_batch_path_choice_reaches_every_row_and_is_refused_with_a_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from typer.testing import CliRunner

    import jrs.pipeline.batch
    from jrs.cli import app

    manifest = tmp_path / "manifest.csv"
    manifest.write_text("planning_ct,planning_rtstruct,daily_ct,id\np,p/rs.dcm,d,case1\n")
    seen: list[dict[str, str]] = []

    def run_batch(manifest: Path, out: Path, opts: Any, **_: Any) -> Any:
        seen.append(dict(opts.path_choice))
        return SimpleNamespace(done=["case1"], skipped=[], failed={}, seconds=0.1)

    monkeypatch.setattr(jrs.pipeline.batch, "run_batch", run_batch)
    args = ["batch", "--manifest", str(manifest), "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*args, "--path-choice", "prostate=fusion"])
    assert result.exit_code == 0, result.output
    assert seen == [{"prostate": "fusion"}]
    result = CliRunner().invoke(
        app, [*args, "--path-choice", "prostate=fusion", "--server", "http://127.0.0.1:9"]
    )
    assert result.exit_code == 2
    assert "JRS_PATH_CHOICE" in result.stderr
