"""The label table of METHOD.md and the ROI-name synonym table.

Label ids: 0 background, 1 bladder, 2 rectum, 3 seminal vesicles, 4 prostate. Clinical ROI names
are mapped to them by a configurable synonym table (case-, space- and underscore-insensitive).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from jrs.errors import InvalidInput

BACKGROUND = 0
BLADDER = 1
RECTUM = 2
SEMINAL_VESICLES = 3
PROSTATE = 4

#: label id -> canonical organ key.
LABELS: dict[int, str] = {
    BLADDER: "bladder",
    RECTUM: "rectum",
    SEMINAL_VESICLES: "seminal_vesicles",
    PROSTATE: "prostate",
}

#: canonical organ key -> ROI name written in RTSTRUCTs the product creates from scratch.
DEFAULT_ROI_NAMES: dict[str, str] = {
    "bladder": "Bladder",
    "rectum": "Rectum",
    "seminal_vesicles": "SeminalVesicles",
    "prostate": "Prostate",
}

#: canonical organ key -> display colour (R, G, B), 0..255.
DEFAULT_COLORS: dict[str, tuple[int, int, int]] = {
    "bladder": (255, 255, 0),
    "rectum": (139, 69, 19),
    "seminal_vesicles": (0, 200, 255),
    "prostate": (255, 0, 0),
}

#: canonical organ key -> default synonyms (normalised on comparison).
DEFAULT_SYNONYMS: dict[str, list[str]] = {
    "bladder": ["bladder", "blaas", "urinary bladder", "bladder_o", "vessie"],
    "rectum": ["rectum", "rect", "rectum_o", "anorectum"],
    "seminal_vesicles": [
        "seminal vesicles",
        "seminalves",
        "seminal_vesicles",
        "seminalvesicles",
        "sv",
        "svs",
        "vesicles",
        "vesicula",
        "ctv_sv",
        "ctv_seminalves",
        "zaadblaasjes",
    ],
    "prostate": [
        "prostate",
        "prostaat",
        "ctv_prostate",
        "prostate_ctv",
        "ctvp",
        "ctv_p",
        "gtv_prostate",
    ],
}


def normalise_roi_name(name: str) -> str:
    """Lower-case, collapse spaces/underscores/dashes to one underscore, strip the ends."""
    return re.sub(r"[\s_\-]+", "_", name.strip().lower()).strip("_")


@dataclass
class SynonymTable:
    """Maps clinical ROI names to organ keys of the label table.

    Attributes:
        synonyms: organ key -> list of accepted names (compared after `normalise_roi_name`).
    """

    synonyms: dict[str, list[str]] = field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_SYNONYMS.items()}
    )

    def __post_init__(self) -> None:
        unknown = set(self.synonyms) - set(LABELS.values())
        if unknown:
            raise InvalidInput(
                f"synonym table names unknown organs {sorted(unknown)}; accepted keys are "
                f"{sorted(LABELS.values())}"
            )
        self._lookup: dict[str, str] = {}
        for organ, names in self.synonyms.items():
            for n in [organ, *names]:
                self._lookup[normalise_roi_name(n)] = organ

    @classmethod
    def from_yaml(cls, path: str | Path) -> SynonymTable:
        """Load ``{organ_key: [names...]}`` from YAML, extending the defaults."""
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise InvalidInput(f"{path}: cannot read the synonym table ({exc})") from exc
        if not isinstance(data, Mapping):
            raise InvalidInput(f"{path}: synonym table must map organ keys to lists of names")
        merged = {k: list(v) for k, v in DEFAULT_SYNONYMS.items()}
        for key, names in data.items():
            if not isinstance(names, list):
                raise InvalidInput(f"{path}: entry {key!r} must be a list of ROI names")
            merged.setdefault(str(key), []).extend(str(n) for n in names)
        return cls(merged)

    def organ_of(self, roi_name: str) -> str | None:
        """The organ key for a ROI name, or None when it is not one of the four organs."""
        return self._lookup.get(normalise_roi_name(roi_name))

    def label_of(self, roi_name: str) -> int | None:
        """The label id (1..4) for a ROI name, or None."""
        organ = self.organ_of(roi_name)
        if organ is None:
            return None
        return next(k for k, v in LABELS.items() if v == organ)

    def match(self, roi_names: Iterable[str]) -> dict[int, str]:
        """Pick, for each label id, the ROI name that maps to it (first match wins).

        Args:
            roi_names: the ROI names of a structure set, in file order.

        Returns:
            label id -> ROI name, for the labels found.
        """
        found: dict[int, str] = {}
        for name in roi_names:
            lab = self.label_of(name)
            if lab is not None and lab not in found:
                found[lab] = name
        return found


def label_map_from_masks(
    masks: Mapping[str, np.ndarray], synonyms: SynonymTable | None = None
) -> tuple[np.ndarray, dict[int, str]]:
    """Combine per-ROI masks into one label map (0..4) using the synonym table.

    Overlaps are resolved by a fixed priority: prostate over seminal vesicles over rectum over
    bladder (a voxel of the prostate that a bladder contour also covers is prostate).

    Args:
        masks: ROI name -> (nz, ny, nx) mask (non-zero inside), all on one grid.
        synonyms: ROI-name synonym table (defaults to `SynonymTable()`).

    Returns:
        (label map uint8 (nz, ny, nx), label id -> ROI name used).

    Raises:
        InvalidInput: when no ROI maps to any organ of the label table, or masks differ in shape.
    """
    table = synonyms or SynonymTable()
    found = table.match(masks.keys())
    if not found:
        raise InvalidInput(
            f"none of the ROI names {sorted(masks)} maps to bladder, rectum, seminal vesicles or "
            "prostate; extend the synonym table (SynonymTable.from_yaml) with your names"
        )
    shapes = {np.asarray(m).shape for m in masks.values()}
    if len(shapes) != 1:
        raise InvalidInput(f"masks are on different grids: shapes {sorted(shapes)}")
    out = np.zeros(next(iter(shapes)), dtype=np.uint8)
    for lab in (BLADDER, RECTUM, SEMINAL_VESICLES, PROSTATE):  # ascending priority
        if lab in found:
            out[np.asarray(masks[found[lab]]) > 0] = lab
    return out, found
