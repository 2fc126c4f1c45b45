from pathlib import Path

import pytest

from jrs.errors import InvalidInput
from jrs.labels import BLADDER, PROSTATE, RECTUM, SEMINAL_VESICLES, SynonymTable, normalise_roi_name


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

    from jrs.labels import label_map_from_masks

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
