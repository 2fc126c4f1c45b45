import numpy as np
import pytest

from jrs.core.geometry import Geometry, Volume
from jrs.qa.figures import QaThresholds, StructureQa, flag_dvf, flag_structure, jacobian_stats

G = Geometry((20, 22, 24), origin=[0, 0, 0], spacing=[1.0, 1.0, 2.0])


def test_jacobian_stats_uniform_scaling_and_folding() -> None:
    pts = G.voxel_centres()
    centre = pts.reshape(-1, 3).mean(axis=0)
    scaled = Volume(((1.1 - 1) * (pts - centre)).astype(np.float32), G)  # x -> 1.1 x
    interior = np.zeros(G.shape, bool)
    interior[1:-1, 1:-1, 1:-1] = True  # ITK's boundary derivatives are one-sided
    s = jacobian_stats(scaled, interior)
    assert s["min"] == pytest.approx(1.331, abs=1e-3)
    assert s["std"] == pytest.approx(0.0, abs=1e-4)
    assert s["folding_fraction"] == 0.0
    folded = Volume(((-2.0 - 1) * (pts - centre)).astype(np.float32), G)  # x -> -2 x
    assert jacobian_stats(folded)["folding_fraction"] == 1.0
    assert flag_dvf(jacobian_stats(folded))
    assert not flag_dvf(s)
    mask = np.zeros(G.shape, bool)
    assert np.isnan(jacobian_stats(scaled, mask)["std"])


def test_structure_flags_name_their_reason() -> None:
    ok = flag_structure(StructureQa("Prostate", "prostate", "segmentation", 40.0, 42.0, 0.9))
    assert ok.flags == []
    shrunk = flag_structure(StructureQa("Prostate", "prostate", "segmentation", 40.0, 20.0, 0.6))
    assert any("volume changed by -50 %" in f for f in shrunk.flags)
    assert any("paths disagree (Dice 0.60" in f for f in shrunk.flags)
    bladder = flag_structure(StructureQa("Bladder", "bladder", "segmentation", 200.0, 380.0))
    assert bladder.flags == []  # bladder filling may double
    lost = flag_structure(StructureQa("SV", "seminal_vesicles", "registration", 8.0, 0.1))
    assert any("nearly empty" in f for f in lost.flags)
    edge = flag_structure(
        StructureQa("PTV", None, "registration", 100.0, 101.0, touches_crop_border=True),
        QaThresholds(),
    )
    assert any("border" in f for f in edge.flags)


# ------------------------------------------------------------------ issue 13: flag mechanisms
def test_prostate_volume_change_of_15_percent_is_flagged() -> None:
    """The same pelvis twice grew the prostate by 14.5 %: the prostate hardly changes."""
    grown = flag_structure(StructureQa("Prostata", "prostate", "registration", 40.0, 45.8))
    assert grown.flag_codes == ["volume_change"]
    assert grown.volume_change == pytest.approx(0.145)
    assert "+14 %" in grown.flags[0] or "+15 %" in grown.flags[0]
    bladder = flag_structure(StructureQa("Bladder", "bladder", "registration", 200.0, 290.0))
    assert bladder.flags == []  # +45 %: a bladder fills
    halved = flag_structure(StructureQa("Bladder", "bladder", "registration", 200.0, 60.0))
    assert halved.flag_codes == ["volume_change"]  # -70 %


def test_thresholds_live_in_one_place() -> None:
    t = QaThresholds(volume_change_range={"prostate": (-0.2, 0.2)})
    assert flag_structure(StructureQa("P", "prostate", "registration", 40.0, 45.8), t).flags == []


def test_path_disagreement_limits_are_per_organ() -> None:
    t = QaThresholds(min_path_dice=0.5, min_path_dice_organ={"bladder": 0.93, "prostate": 0.87})
    bladder = StructureQa("Bladder", "bladder", "registration", 200.0, 200.0, path_dice=0.9)
    prostate = StructureQa("Prostate", "prostate", "registration", 40.0, 40.0, path_dice=0.9)
    rectum = StructureQa("Rectum", "rectum", "registration", 60.0, 60.0, path_dice=0.6)
    assert flag_structure(bladder, t).flag_codes == ["path_disagreement"]
    assert "< 0.93" in bladder.flags[0]
    assert flag_structure(prostate, t).flag_codes == []
    # an organ without its own limit takes the plain one
    assert flag_structure(rectum, t).flag_codes == []
    rectum.flags, rectum.flag_codes = [], []
    assert flag_structure(
        rectum, QaThresholds(min_path_dice=0.7, min_path_dice_organ={})
    ).flag_codes == ["path_disagreement"]


def test_path_disagreement_is_silenced_for_a_path_not_validated() -> None:
    from jrs.qa.figures import validated_paths

    noisy = StructureQa("Prostate", "prostate", "registration", 40.0, 40.0, path_dice=0.05)
    assert flag_structure(noisy).flag_codes == ["path_disagreement"]
    noisy.paths_validated = False
    assert flag_structure(noisy).flags == []
    assert noisy.path_dice == 0.05  # the figure stays, for calibration

    # the bundled models' metadata: path_choice only -> the path not chosen is not vouched for
    v2 = {"path_choice": {"prostate": "registration"}}
    assert validated_paths(v2, "prostate") == {"registration"}
    assert validated_paths(v2, "bladder") == {"segmentation", "registration"}
    explicit = {
        "path_choice": {"prostate": "registration"},
        "validated_paths": {"prostate": ["segmentation", "registration"], "*": ["registration"]},
    }
    assert validated_paths(explicit, "prostate") == {"segmentation", "registration"}
    assert validated_paths(explicit, "rectum") == {"registration"}
    assert validated_paths(None, "prostate") == {"segmentation", "registration"}


def test_contour_touching_the_network_box_is_flagged() -> None:
    edge = flag_structure(
        StructureQa("Bladder", "bladder", "registration", 100.0, 101.0, touches_crop_border=True)
    )
    assert edge.flag_codes == ["touches_box"]
    quiet = flag_structure(
        StructureQa("Bladder", "bladder", "registration", 100.0, 101.0, touches_crop_border=True),
        QaThresholds(flag_touching_box=False),
    )
    assert quiet.flags == []


def test_jacobian_outliers_inside_an_organ_are_flagged() -> None:
    from jrs.qa.figures import jacobian_report

    pts = G.voxel_centres()
    centre = pts.reshape(-1, 3).mean(axis=0)
    inside = np.linalg.norm(pts - centre, axis=-1) < 6
    # a local squeeze: x -> x + a * exp(-r^2/s^2) (x - c) shrinks det J well below 1 at the centre
    r2 = ((pts - centre) ** 2).sum(axis=-1)
    squeeze = (-0.6 * np.exp(-r2 / 4.0**2))[..., None] * (pts - centre)
    body = np.ones(G.shape, bool)
    stats, organs = jacobian_report(
        Volume(squeeze.astype(np.float32), G),
        body,
        {"Prostate": ("prostate", inside), "Empty": (None, np.zeros(G.shape, bool))},
    )
    assert stats["min"] < 0.5
    jac = organs["Prostate"]
    assert jac is not None and jac["min"] < 0.7 and jac["outlier_fraction"] > 0.05
    assert organs["Empty"] is None
    qa = flag_structure(
        StructureQa("Prostate", "prostate", "registration", 40.0, 40.0, jacobian=jac)
    )
    assert qa.flag_codes == ["jacobian_outliers"]
    assert "det J outside 0.7 .. 1.4" in qa.flags[0]
    # a translation is not an outlier anywhere
    shift = np.broadcast_to(np.float32([3.0, -2.0, 1.0]), (*G.shape, 3)).copy()
    _, calm = jacobian_report(Volume(shift, G), None, {"Prostate": ("prostate", inside)})
    assert calm["Prostate"] is not None and calm["Prostate"]["outlier_fraction"] == 0.0


def test_good_structures_raise_no_flag_at_all() -> None:
    """Flags that always fire are noise: a quiet case is quiet."""
    from jrs.qa.figures import FLAG_CODES

    jac = {"min": 0.95, "max": 1.05, "outlier_fraction": 0.0, "folding_fraction": 0.0}
    jac |= {"low": 0.7, "high": 1.4}
    for organ, before, after in [
        ("prostate", 40.0, 41.0),
        ("bladder", 200.0, 260.0),
        ("rectum", 60.0, 75.0),
        ("seminal_vesicles", 8.0, 7.0),
    ]:
        qa = flag_structure(
            StructureQa(organ, organ, "registration", before, after, 0.95, jacobian=jac)
        )
        assert qa.flags == [] and qa.flag_codes == [], organ
    assert set(FLAG_CODES) >= {"volume_change", "jacobian_outliers", "touches_box"}


def test_paths_surface_distance_flags_a_disagreement_that_dice_misses() -> None:
    """A rectum moved 5 mm along its length keeps a Dice near 0.9 but not a small MSD."""
    t = QaThresholds(min_path_dice_organ={"rectum": 0.8}, max_path_msd_mm={"rectum": 2.0})
    moved = StructureQa(
        "Rectum", "rectum", "registration", 60.0, 60.0, path_dice=0.88, path_msd_mm=3.4
    )
    assert flag_structure(moved, t).flag_codes == ["path_disagreement"]
    assert "3.4 mm > 2 mm" in moved.flags[0]
    close = StructureQa(
        "Rectum", "rectum", "registration", 60.0, 60.0, path_dice=0.88, path_msd_mm=1.2
    )
    assert flag_structure(close, t).flag_codes == []
    # a path that is no QA reference is never compared, by Dice or by distance
    moved.paths_validated = False
    assert flag_structure(moved, t).flag_codes == []
    # an organ without a distance limit is judged by Dice alone
    other = QaThresholds(min_path_dice_organ={"rectum": 0.8}, max_path_msd_mm={})
    moved.paths_validated = True
    assert flag_structure(moved, other).flag_codes == []


def test_a_path_good_enough_to_check_against_is_a_qa_reference() -> None:
    """Shipping a path and checking the other path against it are two questions."""
    from jrs.qa.figures import QA_REFERENCE_MIN_DSC, qa_reference_paths, validated_paths

    meta = {
        "validated_paths": {"prostate": ["registration"], "bladder": ["registration"]},
        "metrics": {
            "path_dsc": {
                "segmentation": {"prostate": 0.869, "bladder": 0.05},
                "registration": {"prostate": 0.950, "bladder": 0.96},
                "fusion": {"prostate": 0.99},
            }
        },
    }
    assert validated_paths(meta, "prostate") == {"registration"}
    # v3's prostate: the segmentation path is not shipped (0.869 vs 0.950), but it is a reference
    assert QA_REFERENCE_MIN_DSC <= 0.869
    assert qa_reference_paths(meta, "prostate") == {"segmentation", "registration"}
    # a dead path (the v2 segmentation path) never is: its disagreement is noise
    assert qa_reference_paths(meta, "bladder") == {"registration"}
    # an explicit table in the metadata wins
    assert qa_reference_paths(
        {**meta, "qa_reference_paths": {"*": ["registration"]}}, "prostate"
    ) == {"registration"}
    assert qa_reference_paths(None, "rectum") == {"segmentation", "registration"}


def test_a_contour_beside_the_image_edges_is_flagged_as_misfit() -> None:
    t = QaThresholds(max_image_fit_gain={"prostate": 0.3})
    off = StructureQa(
        "Prostate",
        "prostate",
        "registration",
        40.0,
        40.0,
        image_fit_gain=1.1,
        image_fit_shift_mm=6.0,
    )
    assert flag_structure(off, t).flag_codes == ["image_misfit"]
    assert "moved by 6 mm" in off.flags[0] and "110 %" in off.flags[0]
    on = StructureQa(
        "Prostate",
        "prostate",
        "registration",
        40.0,
        40.0,
        image_fit_gain=0.1,
        image_fit_shift_mm=2.0,
    )
    assert flag_structure(on, t).flag_codes == []
    # a propagated ROI (no organ) and an organ without a limit are not judged on it
    ptv = StructureQa("PTV", None, "registration", 90.0, 90.0, image_fit_gain=5.0)
    assert flag_structure(ptv, t).flag_codes == []
    # with a limit for the propagated ROIs ("*"): a femoral head is judged, a target volume
    # (a margin in tissue, no edge of its own) never is
    both = QaThresholds(max_image_fit_gain={"*": 0.3})
    head = StructureQa("FemoralHead_L", None, "registration", 90.0, 90.0, image_fit_gain=0.5)
    assert flag_structure(head, both).flag_codes == ["image_misfit"]
    assert head.flags[0].startswith(
        "the FemoralHead_L contour sits beside"
    )  # named, not "structure"
    for name in ("PTV", "CTVp", "PTV_7800", "GTV1"):
        target = StructureQa(name, None, "registration", 90.0, 90.0, image_fit_gain=5.0)
        assert flag_structure(target, both).flag_codes == [], name


def test_target_volumes_are_told_from_other_rois() -> None:
    from jrs.core.labels import is_target_volume

    for name in ("PTV", "ptv_7800", "CTVp", "CTV1", "GTVp", "ITV"):
        assert is_target_volume(name), name
    for name in ("FemoralHead_L", "Bladder", "Rectum", "Body", "Prostata", "Ptosis_zone"):
        assert not is_target_volume(name), name
    assert is_target_volume("Boost", "PTV")
    assert not is_target_volume("Boost", "ORGAN")


def test_propagated_rois_are_judged_by_their_class() -> None:
    """A femoral head and a PTV have their own image-NCC limits ("*" and "targets")."""
    from jrs.qa.figures import PROPAGATED, TARGETS, roi_class

    t = QaThresholds(min_image_ncc={PROPAGATED: 0.5, TARGETS: 0.9})
    head = StructureQa("FemoralHead_L", None, "registration", 90.0, 90.0, image_ncc=0.8)
    ptv = StructureQa("PTV", None, "registration", 90.0, 90.0, image_ncc=0.8)
    boost = StructureQa("Boost", None, "registration", 9.0, 9.0, image_ncc=0.8, target_volume=True)
    assert flag_structure(head, t).flag_codes == []
    assert flag_structure(ptv, t).flag_codes == ["image_disagreement"]
    assert flag_structure(boost, t).flag_codes == ["image_disagreement"]  # typed PTV in the file
    assert roi_class("prostate", "Prostata") == "prostate"
    assert roi_class(None, "CTVp") == TARGETS and roi_class(None, "Femur_Head_R_DL") == PROPAGATED


def test_a_mapping_off_around_a_structure_is_flagged_per_class() -> None:
    """`misregistration`: the residual shift against the limit of the structure's class."""
    from jrs.qa.figures import PROPAGATED, TARGETS

    t = QaThresholds(max_residual_shift_mm={PROPAGATED: 3.0, TARGETS: 2.0, "prostate": 2.5})
    off = StructureQa("FemoralHead_R", None, "registration", 90.0, 90.0, residual_shift_mm=4.06)
    assert flag_structure(off, t).flag_codes == ["misregistration"]
    assert off.flags[0].startswith("the mapping is about 4.1 mm off around the FemoralHead_R")
    assert "limit 3 mm" in off.flags[0]
    near = StructureQa("FemoralHead_L", None, "registration", 90.0, 90.0, residual_shift_mm=2.74)
    assert flag_structure(near, t).flag_codes == []
    ptv = StructureQa("PTV", None, "registration", 90.0, 90.0, residual_shift_mm=2.74)
    assert flag_structure(ptv, t).flag_codes == ["misregistration"]  # the targets' own limit
    prostate = StructureQa(
        "Prostata", "prostate", "registration", 40.0, 40.0, residual_shift_mm=3.0
    )
    assert flag_structure(prostate, t).flag_codes == ["misregistration"]
    # no figure (a band without structure), or a class without a limit: never flagged
    unmeasured = StructureQa("FemoralHead_R", None, "registration", 90.0, 90.0)
    assert flag_structure(unmeasured, t).flag_codes == []
    rectum = StructureQa("Rectum", "rectum", "registration", 60.0, 60.0, residual_shift_mm=9.0)
    assert flag_structure(rectum, t).flag_codes == []


def test_the_iterative_method_and_the_network_disagreeing_is_flagged() -> None:
    """`method_disagreement`: Dice first, then the mean surface distance, per organ."""
    t = QaThresholds(
        min_method_dice={"bladder": 0.9, "prostate": 0.8}, max_method_msd_mm={"bladder": 2.0}
    )

    def bladder(**kw: float) -> StructureQa:
        return StructureQa("Vescica", "bladder", "iterative", 200.0, 240.0, **kw)

    low = flag_structure(bladder(method_dice=0.86, method_msd_mm=1.2), t)
    assert low.flag_codes == ["method_disagreement"]
    assert "Dice 0.86 < 0.90" in low.flags[0] and "bladder" in low.flags[0]
    far = flag_structure(bladder(method_dice=0.93, method_msd_mm=2.4), t)
    assert far.flag_codes == ["method_disagreement"]
    assert "2.4 mm > 2 mm" in far.flags[0]
    assert flag_structure(bladder(method_dice=0.93, method_msd_mm=1.9), t).flag_codes == []
    # no second method (network method, or no model), or an organ without a limit: no flag
    assert flag_structure(bladder(), t).flag_codes == []
    rectum = StructureQa("Retto", "rectum", "iterative", 60.0, 60.0, method_dice=0.1)
    assert flag_structure(rectum, t).flag_codes == []
    # a propagated ROI has no organ: never judged on it
    head = StructureQa("FemoralHead_L", None, "iterative", 90.0, 90.0, method_dice=0.1)
    assert flag_structure(head, t).flag_codes == []
