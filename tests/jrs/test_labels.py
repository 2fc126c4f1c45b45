from pathlib import Path

import pytest

from jrs.core.errors import InvalidInput
from jrs.core.labels import (
    BLADDER,
    PROSTATE,
    RECTUM,
    SEMINAL_VESICLES,
    SynonymTable,
    normalise_roi_name,
)


def test_default_synonyms_map_clinical_names() -> None:
    table = SynonymTable()
    assert table.label_of("Prostate") == PROSTATE
    assert table.label_of("CTV_prostate") == PROSTATE
    assert table.label_of(" SeminalVes ") == SEMINAL_VESICLES
    assert table.label_of("SV") == SEMINAL_VESICLES
    assert table.label_of("BLADDER") == BLADDER
    assert table.label_of("PTV_7800") is None
    assert table.match(["Body", "Rectum", "rectum_o", "Bladder"]) == {
        RECTUM: "Rectum",
        BLADDER: "Bladder",
    }


def test_normalise() -> None:
    assert normalise_roi_name("  Seminal - Vesicles_ ") == "seminal_vesicles"


def test_yaml_extends_defaults(tmp_path: Path) -> None:
    f = tmp_path / "syn.yaml"
    f.write_text("prostate: [Prostaat_CTV]\nrectum: [Endeldarm]\n")
    table = SynonymTable.from_yaml(f)
    assert table.label_of("prostaat ctv") == PROSTATE
    assert table.label_of("Endeldarm") == RECTUM
    assert table.label_of("Prostate") == PROSTATE


def test_bad_synonym_tables(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="unknown organs.*kidney"):
        SynonymTable({"kidney": ["nier"]})
    f = tmp_path / "bad.yaml"
    f.write_text("- just a list\n")
    with pytest.raises(InvalidInput, match="bad.yaml"):
        SynonymTable.from_yaml(f)
    f.write_text("prostate: Prostaat\n")
    with pytest.raises(InvalidInput, match="'prostate' must be a list"):
        SynonymTable.from_yaml(f)


def test_label_map_priority_and_errors() -> None:
    import numpy as np

    from jrs.core.labels import label_map_from_masks

    bladder = np.zeros((4, 4, 4), bool)
    bladder[:2] = True
    prostate = np.zeros((4, 4, 4), bool)
    prostate[1:3] = True
    lab, used = label_map_from_masks({"Blaas": bladder, "CTV_prostate": prostate, "PTV": prostate})
    assert used == {BLADDER: "Blaas", PROSTATE: "CTV_prostate"}
    assert (lab[0] == BLADDER).all() and (lab[1] == PROSTATE).all() and (lab[3] == 0).all()
    with pytest.raises(InvalidInput, match="none of the ROI names"):
        label_map_from_masks({"PTV": prostate})
    with pytest.raises(InvalidInput, match="different grids"):
        label_map_from_masks({"Bladder": bladder, "Rectum": bladder[:2]})


# ------------------------------------------------------------------ clinical names (issue 13)
@pytest.mark.parametrize(
    ("name", "organ"),
    [
        # TG-263 standard names
        ("Bladder", "bladder"),
        ("Rectum", "rectum"),
        ("SeminalVes", "seminal_vesicles"),
        ("Prostate", "prostate"),
        # English, Dutch, German, French, Italian, Spanish
        ("Urinary Bladder", "bladder"),
        ("Blaas", "bladder"),
        ("Zaadblaasjes", "seminal_vesicles"),
        ("Prostaat", "prostate"),
        ("Endeldarm", "rectum"),
        ("Harnblase", "bladder"),
        ("Rektum", "rectum"),
        ("Samenblasen", "seminal_vesicles"),
        ("Prostata", "prostate"),
        ("vessie", "bladder"),
        ("Vésicules séminales", "seminal_vesicles"),
        ("Vescica", "bladder"),
        ("Retto", "rectum"),
        ("Vescicole seminali", "seminal_vesicles"),
        ("vejiga", "bladder"),
        ("recto", "rectum"),
        ("vesículas seminales", "seminal_vesicles"),
        ("Próstata", "prostate"),
        # case, accents and separators do not matter
        ("VESICULAS_SEMINALES", "seminal_vesicles"),
        ("vesicules-seminales", "seminal_vesicles"),
        ("PROSTATA", "prostate"),
    ],
)
def test_tg263_and_language_names(name: str, organ: str) -> None:
    from jrs.core.labels import LABEL_IDS

    decision = SynonymTable().resolve([name]).decisions[0]
    assert decision.used_as == organ, decision
    assert decision.rule in ("tg263", "synonym")
    assert SynonymTable().label_of(name) == LABEL_IDS[organ]


def test_rule_names_tg263_and_language() -> None:
    d = SynonymTable().resolve(["SeminalVes", "Retto"]).decisions
    assert d[0].rule == "tg263" and "TG-263" in d[0].reason
    assert d[1].rule == "synonym" and "Italian" in d[1].reason


def test_normalise_folds_accents_and_brackets() -> None:
    assert normalise_roi_name("Vésicules Séminales") == "vesicules_seminales"
    assert normalise_roi_name("FemoralHead (Left)_MBS") == "femoralhead_left_mbs"


@pytest.mark.parametrize("name", ["CTVp", "CTV1", "GTVp", "PTV", "CTV_p", "ctvp", "PTV_7800"])
def test_ambiguous_abbreviations_are_never_mapped_silently(name: str) -> None:
    table = SynonymTable()
    assert table.label_of(name) is None
    d = table.resolve(["Bladder", name]).decisions[1]
    assert d.rule == "ambiguous" and d.used_as is None
    assert "--synonyms" in d.reason


def test_ambiguous_name_can_be_mapped_explicitly(tmp_path: Path) -> None:
    f = tmp_path / "syn.yaml"
    f.write_text("prostate: [CTVp]\n")
    table = SynonymTable.from_yaml(f)
    d = table.resolve(["CTVp", "Rectum"]).decisions[0]
    assert d.used_as == "prostate" and d.rule == "user"


def test_no_organ_message_names_the_ambiguous_rois() -> None:
    import numpy as np

    from jrs.core.labels import label_map_from_masks

    m = np.ones((2, 2, 2), bool)
    with pytest.raises(InvalidInput, match=r"none of the ROI names.*ambiguous.*'CTVp'"):
        label_map_from_masks({"CTVp": m, "Lung_L": m, "Heart": m})


def test_manual_contour_wins_over_automatic_ones() -> None:
    names = [
        "Bladder_MBS",
        "Prostate_DL",
        "Prostata",
        "Retto",
        "Bladder_DL",
        "Vescica",
        "AI_Rectum",
    ]
    mapping = SynonymTable().resolve(names)
    assert mapping.used == {PROSTATE: "Prostata", RECTUM: "Retto", BLADDER: "Vescica"}
    rules = {d.roi: d.rule for d in mapping.decisions}
    for auto in ("Bladder_MBS", "Prostate_DL", "Bladder_DL", "AI_Rectum"):
        assert rules[auto] == "skipped_automatic", auto
    skipped = next(d for d in mapping.decisions if d.roi == "Prostate_DL")
    assert skipped.automatic and skipped.organ == "prostate" and "'Prostata'" in skipped.reason


def test_automatic_contour_is_used_when_alone_or_preferred(tmp_path: Path) -> None:
    alone = SynonymTable().resolve(["Prostate_DL", "Rectum"])
    assert alone.used == {PROSTATE: "Prostate_DL", RECTUM: "Rectum"}
    assert alone.decisions[0].automatic and "no manual" in alone.decisions[0].reason

    both = ["Prostate", "Prostate_AI", "Rectum_auto", "Rectum"]
    assert SynonymTable(prefer_automatic=True).resolve(both).used == {
        PROSTATE: "Prostate_AI",
        RECTUM: "Rectum_auto",
    }
    f = tmp_path / "syn.yaml"
    f.write_text("prefer_automatic: true\n")
    assert SynonymTable.from_yaml(f).resolve(both).used[PROSTATE] == "Prostate_AI"
    f.write_text("prefer_automatic: maybe\n")
    with pytest.raises(InvalidInput, match="prefer_automatic"):
        SynonymTable.from_yaml(f)


def test_duplicates_rank_by_rule_then_file_order() -> None:
    mapping = SynonymTable().resolve(["Vescica", "Bladder", "Blaas"])
    assert mapping.used == {BLADDER: "Bladder"}  # TG-263 beats a language synonym
    assert [d.rule for d in mapping.decisions] == ["duplicate", "tg263", "duplicate"]


def test_femoral_heads_are_landmarks_not_labels() -> None:
    names = ["FemoreSinistro", "FemoreDestro", "Femur_Head_L_DL", "FemoralHead (Right)_MBS"]
    mapping = SynonymTable().resolve(names)
    assert mapping.used == {}
    assert mapping.landmarks == {
        "femoral_head_left": "FemoreSinistro",
        "femoral_head_right": "FemoreDestro",
    }
    phantom = SynonymTable().resolve(["FemoralHead_L", "Femur_Head_R", "Hüftkopf links"])
    assert phantom.landmarks == {
        "femoral_head_left": "FemoralHead_L",
        "femoral_head_right": "Femur_Head_R",
    }


def test_mapping_to_json_and_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    import json
    import logging

    mapping = SynonymTable().resolve(["Prostata", "Prostate_DL", "CTVp", "PTV_70"])
    data = json.loads(json.dumps(mapping.to_json()))
    assert data[0] == {
        "roi": "Prostata",
        "organ": "prostate",
        "rule": "synonym",
        "used_as": "prostate",
        "automatic": False,
        "reason": "clinical name (German/Italian/Spanish)",
    }
    with caplog.at_level(logging.INFO, logger="jrs.core.labels"):
        mapping.log()
    assert "'Prostata' -> prostate" in caplog.text
    assert "'Prostate_DL' -> (propagated): skipped_automatic" in caplog.text


@pytest.mark.parametrize("patient", ["Pelvic-Ref-002", "Pelvic-Ref-005"])
def test_real_pelvic_ref_rtstructs_map_without_a_synonym_file(
    shared_data: Path, patient: str
) -> None:
    from jrs.io.rtstruct import read_rtstruct

    names = read_rtstruct(shared_data / "pelvic-ref" / patient / "rtstruct.dcm").roi_names
    mapping = SynonymTable().resolve(names)
    bladder = "Vescica" if "Vescica" in names else "Bladder"
    assert mapping.used == {PROSTATE: "Prostata", RECTUM: "Retto", BLADDER: bladder}
    assert mapping.landmarks == {
        "femoral_head_left": "FemoreSinistro",
        "femoral_head_right": "FemoreDestro",
    }
    for d in mapping.decisions:
        if d.roi.endswith(("_DL", "_MBS")):
            assert d.used_as is None and d.rule == "skipped_automatic", d


def test_builtin_tables_are_consistent() -> None:
    from jrs.core.labels import _BUILTIN, DEFAULT_SYNONYMS, LABELS, LANDMARKS

    assert set(DEFAULT_SYNONYMS) == set(LABELS.values())
    keys = {k for k, _, _ in _BUILTIN.values()}
    assert keys == set(LABELS.values()) | set(LANDMARKS)
