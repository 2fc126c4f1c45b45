"""The label table of METHOD.md and the ROI-name synonym table.

Label ids: 0 background, 1 bladder, 2 rectum, 3 seminal vesicles, 4 prostate. Clinical ROI names
are mapped to them by a configurable synonym table built on the AAPM TG-263 standard names
(``Bladder``, ``Rectum``, ``Prostate``, ``SeminalVes``, ``Femur_Head_L`` ...) and the clinical
names in use in English, Dutch, German, French, Italian and Spanish (``Vescica``, ``Retto``,
``Harnblase``, ``Samenblasen``, ``vésicules séminales`` ...). Names are compared case-, accent-
and separator-insensitively (``"Vésicules séminales"`` == ``"vesicules_seminales"``).

Rules (`SynonymTable.resolve`), in this order:

1. a name the caller's table maps (a ``--synonyms`` file included) maps to its organ: rule
   ``user`` for names the built-in tables do not hold, else ``tg263`` or ``synonym``;
2. an ambiguous abbreviation (a target volume: ``CTVp``, ``CTV1``, ``GTVp``, ``PTV`` ...) is
   never mapped silently: rule ``ambiguous``, reported, propagated as an ordinary ROI; map it
   explicitly with a synonyms file (``prostate: [CTVp]``) when it is the prostate;
3. an automatic contour (a name with a suffix or prefix such as ``_DL``, ``_MBS``, ``_AI``,
   ``_auto``) of an organ is passed over when a manual contour of that organ exists (rule
   ``skipped_automatic``; it is propagated as an ordinary ROI), unless automatic contours are
   preferred (``prefer_automatic``); it is taken when it is the only one;
4. when several manual ROIs name one organ, the best rule wins (user, then TG-263, then a
   language synonym), then file order; the others are rule ``duplicate`` (propagated);
5. anything else is ``unmapped`` (propagated).

The femoral heads are recognised too (landmarks of the plausibility checks), but are not labels.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from jrs.core.errors import InvalidInput

log = logging.getLogger(__name__)

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
#: canonical organ key -> label id.
LABEL_IDS: dict[str, int] = {organ: lab for lab, organ in LABELS.items()}

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

#: ROI names of the patient's outline (compared after `normalise_roi_name`).
EXTERNAL_NAMES: frozenset[str] = frozenset(
    {"body", "external", "outline", "skin", "patient", "body_contour", "bodycontour"}
)


def is_external_roi(name: str, interpreted_type: str = "") -> bool:
    """Whether a ROI is the patient's outline (RTROIInterpretedType EXTERNAL, or its name)."""
    return interpreted_type.strip().upper() == "EXTERNAL" or normalise_roi_name(name) in (
        EXTERNAL_NAMES
    )


#: landmark keys: structures the plausibility checks use, never labels of the network.
LANDMARKS: tuple[str, ...] = ("femoral_head_left", "femoral_head_right")

#: AAPM TG-263 standard names (organ or landmark key -> names).
TG263_NAMES: dict[str, list[str]] = {
    "bladder": ["Bladder"],
    "rectum": ["Rectum"],
    "seminal_vesicles": ["SeminalVes"],
    "prostate": ["Prostate"],
    "femoral_head_left": ["Femur_Head_L"],
    "femoral_head_right": ["Femur_Head_R"],
}

#: clinical names by language (language -> organ key -> names).
LANGUAGE_SYNONYMS: dict[str, dict[str, list[str]]] = {
    "English": {
        "bladder": ["urinary bladder", "bladder_o"],
        "rectum": ["rect", "rectum_o", "anorectum"],
        "seminal_vesicles": [
            "seminal vesicles",
            "seminal vesicle",
            "seminal_ves",
            "sem ves",
            "semves",
            "sv",
            "svs",
            "vesicles",
            "ctv_sv",
            "ctv_seminalves",
            "ctv_seminal_vesicles",
        ],
        "prostate": [
            "prostate gland",
            "prost",
            "ctv_prostate",
            "prostate_ctv",
            "gtv_prostate",
            "prostate_gtv",
        ],
    },
    "Dutch": {
        "bladder": ["blaas", "urineblaas"],
        "rectum": ["endeldarm"],
        "seminal_vesicles": ["zaadblaasjes", "zaadblaasje", "zaadblazen", "zaadblaas"],
        "prostate": ["prostaat"],
    },
    "German": {
        "bladder": ["harnblase", "blase"],
        "rectum": ["rektum", "enddarm", "mastdarm"],
        "seminal_vesicles": [
            "samenblasen",
            "samenblase",
            "samenbläschen",
            "bläschendrüsen",
            "bläschendrüse",
            "vesikeldrüsen",
        ],
        "prostate": ["prostata", "vorsteherdrüse"],
    },
    "French": {
        "bladder": ["vessie"],
        "rectum": [],
        "seminal_vesicles": [
            "vésicules séminales",
            "vésicule séminale",
        ],
        "prostate": [],
    },
    "Italian": {
        "bladder": ["vescica", "vescica urinaria"],
        "rectum": ["retto"],
        "seminal_vesicles": ["vescicole seminali", "vescicola seminale", "vescichette seminali"],
        "prostate": ["prostata"],
    },
    "Spanish": {
        "bladder": ["vejiga", "vejiga urinaria"],
        "rectum": ["recto"],
        "seminal_vesicles": ["vesículas seminales", "vesícula seminal"],
        "prostate": ["próstata"],
    },
    "Latin": {
        "bladder": ["vesica urinaria"],
        "rectum": [],
        "seminal_vesicles": ["vesiculae seminales", "vesicula seminalis"],
        "prostate": [],
    },
}

# femoral heads: every "<head> <side>" and "<side> <head>" of these words, per language
_HEAD_WORDS: dict[str, list[str]] = {
    "English": ["femoral head", "femur head", "head of femur", "femoral_head", "femur", "hip"],
    "Dutch": ["heupkop", "femurkop", "dijbeenkop", "heup"],
    "German": ["hüftkopf", "femurkopf", "oberschenkelkopf", "hüfte"],
    "French": ["tête fémorale", "tête du fémur", "tête de fémur", "tête femur", "fémur"],
    "Italian": ["testa femorale", "testa del femore", "testa femore", "femore"],
    "Spanish": ["cabeza femoral", "cabeza del fémur", "cabeza de fémur", "cabeza femur"],
}
_SIDES: dict[str, str] = {
    "femoral_head_left": "l left lt links li gauche g sinistro sinistra sin sx izquierda izquierdo "
    "izq izda",
    "femoral_head_right": "r right rt rechts re droite d destro destra dx dex derecha derecho der "
    "dcha",
}
_SIDE_WORDS: dict[str, list[str]] = {k: v.split() for k, v in _SIDES.items()}

#: name tokens (first or last) that mark an automatic contour: ``Bladder_DL``, ``AI_Rectum``.
AUTOMATIC_TOKENS: frozenset[str] = frozenset(
    {
        "dl",
        "mbs",
        "ai",
        "auto",
        "automatic",
        "autoseg",
        "autocontour",
        "atlas",
        "abas",
        "dlc",
        "limbus",
        "mvision",
        "mirada",
    }
)

#: target-volume abbreviations that are never mapped silently (``CTVp``, ``CTV1``, ``PTV_7800``).
AMBIGUOUS_PATTERN = re.compile(r"^(ctv|gtv|ptv|itv)[a-z0-9]*$")

#: RTSTRUCT RT ROI Interpreted Types of target volumes.
TARGET_TYPES = frozenset({"PTV", "CTV", "GTV", "ITV"})


def is_target_volume(name: str, interpreted_type: str = "") -> bool:
    """Whether an ROI is a target volume (``PTV``, ``CTV1``, ``GTVp``, ``PTV_7800`` ...).

    A target volume is a margin drawn in tissue, not on an organ's boundary: checks that look for
    an organ's edges in the image (`jrs.qa.contour_fit`) do not apply to it.

    Args:
        name: ROI name.
        interpreted_type: its RT ROI Interpreted Type (3006,00A4), when known.
    """
    if interpreted_type.strip().upper() in TARGET_TYPES:
        return True
    return AMBIGUOUS_PATTERN.match(_compact(name)) is not None


Rule = Literal[
    "tg263", "synonym", "user", "skipped_automatic", "duplicate", "ambiguous", "unmapped"
]
_RANK = {"user": 0, "tg263": 1, "synonym": 2}


def normalise_roi_name(name: str) -> str:
    """Fold accents and case, collapse spaces/underscores/dashes/dots/brackets to one underscore.

    ``"  Vésicules - Séminales_ "`` -> ``"vesicules_seminales"``.
    """
    decomposed = unicodedata.normalize("NFKD", name)
    ascii_only = "".join(c for c in decomposed if not unicodedata.combining(c))
    folded = ascii_only.replace("ß", "ss").casefold()
    return re.sub(r"[\s_\-.,;:()\[\]{}/\\+]+", "_", folded.strip()).strip("_")


def _compact(name: str) -> str:
    """The comparison key: `normalise_roi_name` without separators (``seminalves``)."""
    return normalise_roi_name(name).replace("_", "")


def _builtin_rules() -> dict[str, tuple[str, Rule, str]]:
    """Compact name -> (organ or landmark key, rule, reason) of the built-in tables."""
    langs: dict[str, tuple[str, list[str]]] = {}

    def add(name: str, key: str, lang: str) -> None:
        known = langs.setdefault(_compact(name), (key, []))
        if known[0] != key:  # pragma: no cover - guarded by a test of the tables
            raise ValueError(f"built-in name {name!r} maps to {known[0]} and {key}")
        if lang not in known[1]:
            known[1].append(lang)

    for organ in LABELS.values():
        add(organ, organ, "English")
    for lang, table in LANGUAGE_SYNONYMS.items():
        for key, names in table.items():
            for n in names:
                add(n, key, lang)
    for lang, heads in _HEAD_WORDS.items():
        for side, sides in _SIDE_WORDS.items():
            for head in heads:
                for s in sides:
                    add(f"{head} {s}", side, lang)
                    add(f"{s} {head}", side, lang)
    out: dict[str, tuple[str, Rule, str]] = {
        name: (key, "synonym", f"clinical name ({'/'.join(ls)})")
        for name, (key, ls) in langs.items()
    }
    for key, names in TG263_NAMES.items():
        for n in names:
            out[_compact(n)] = (key, "tg263", f"TG-263 standard name {n!r}")
    return out


_BUILTIN = _builtin_rules()

#: canonical organ key -> default synonyms (TG-263 names and every language's names).
DEFAULT_SYNONYMS: dict[str, list[str]] = {
    organ: [
        *TG263_NAMES[organ],
        *(n for lang in LANGUAGE_SYNONYMS.values() for n in lang.get(organ, [])),
    ]
    for organ in LABELS.values()
}
#: landmark key -> default names (TG-263 and the languages' "<head> <side>" combinations).
DEFAULT_LANDMARK_SYNONYMS: dict[str, list[str]] = {
    key: sorted({n for n, (k, _, _) in _BUILTIN.items() if k == key}) for key in LANDMARKS
}


@dataclass(frozen=True)
class RoiDecision:
    """What one ROI of a structure set maps to, and why.

    Attributes:
        roi: the ROI name as in the RTSTRUCT.
        organ: the organ or landmark key the name denotes (also when not used), else None.
        rule: ``tg263``, ``synonym``, ``user`` (a used or usable name, by where it came from),
            ``skipped_automatic``, ``duplicate``, ``ambiguous`` or ``unmapped``.
        used_as: the organ or landmark key this ROI is used as, or None (propagated as an
            ordinary ROI).
        automatic: the name marks an automatic contour (``_DL``, ``_MBS``, ``_AI`` ...).
        reason: one line for people.
    """

    roi: str
    organ: str | None
    rule: Rule
    used_as: str | None
    automatic: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for qa.json."""
        return asdict(self)


@dataclass
class RoiMapping:
    """The decisions for every ROI of a structure set (`SynonymTable.resolve`).

    Attributes:
        decisions: one per ROI, in file order.
    """

    decisions: list[RoiDecision]

    @property
    def used(self) -> dict[int, str]:
        """Label id -> ROI name used as that organ."""
        return {
            LABEL_IDS[d.used_as]: d.roi
            for d in self.decisions
            if d.used_as is not None and d.used_as in LABEL_IDS
        }

    @property
    def landmarks(self) -> dict[str, str]:
        """Landmark key (``femoral_head_left`` ...) -> ROI name."""
        return {
            d.used_as: d.roi
            for d in self.decisions
            if d.used_as is not None and d.used_as in LANDMARKS
        }

    @property
    def ambiguous(self) -> list[str]:
        """ROI names not mapped because they are ambiguous abbreviations."""
        return [d.roi for d in self.decisions if d.rule == "ambiguous"]

    def to_json(self) -> list[dict[str, Any]]:
        """Plain dicts for qa.json."""
        return [d.to_dict() for d in self.decisions]

    def lines(self) -> list[str]:
        """One line per ROI: ``'Prostata' -> prostate (Italian synonym)``."""
        out = []
        for d in self.decisions:
            target = d.used_as if d.used_as is not None else "(propagated)"
            out.append(f"{d.roi!r} -> {target}: {d.rule}: {d.reason}")
        return out

    def log(self, logger: logging.Logger | None = None) -> None:
        """Log the mapping at INFO level (ROI names only; never patient data)."""
        lg = logger or log
        for line in self.lines():
            lg.info("ROI mapping: %s", line)


def _combine(masks: Mapping[str, np.ndarray], used: Mapping[int, str]) -> np.ndarray:
    shapes = {np.asarray(m).shape for m in masks.values()}
    if len(shapes) != 1:
        raise InvalidInput(f"masks are on different grids: shapes {sorted(shapes)}")
    out = np.zeros(next(iter(shapes)), dtype=np.uint8)
    for lab in (BLADDER, RECTUM, SEMINAL_VESICLES, PROSTATE):  # ascending priority
        if lab in used:
            out[np.asarray(masks[used[lab]]) > 0] = lab
    return out


@dataclass
class SynonymTable:
    """Maps clinical ROI names to organ keys of the label table (see the module's rules).

    Attributes:
        synonyms: organ key -> list of accepted names (compared after `normalise_roi_name`,
            without separators). Defaults: TG-263 names plus every language's names.
        prefer_automatic: use an automatic contour (``_DL``, ``_MBS`` ...) of an organ rather
            than the manual one when both exist.
        landmarks: landmark key -> accepted names (femoral heads), used by the plausibility
            checks.
    """

    synonyms: dict[str, list[str]] = field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_SYNONYMS.items()}
    )
    prefer_automatic: bool = False
    landmarks: dict[str, list[str]] = field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_LANDMARK_SYNONYMS.items()}
    )

    def __post_init__(self) -> None:
        unknown = set(self.synonyms) - set(LABELS.values())
        unknown |= set(self.landmarks) - set(LANDMARKS)
        if unknown:
            raise InvalidInput(
                f"synonym table names unknown organs {sorted(unknown)}; accepted keys are "
                f"{sorted(LABELS.values())} and the landmarks {sorted(LANDMARKS)}"
            )
        self._lookup: dict[str, str] = {}
        for table in (self.landmarks, self.synonyms):  # organs win a name both hold
            for key, names in table.items():
                for n in [key, *names]:
                    self._lookup[_compact(n)] = key

    @classmethod
    def from_yaml(cls, path: str | Path) -> SynonymTable:
        """Load a synonym file, extending the defaults.

        Format: ``{organ_key: [names...]}`` (organ keys ``bladder``, ``rectum``,
        ``seminal_vesicles``, ``prostate``; landmark keys ``femoral_head_left``,
        ``femoral_head_right``), plus an optional ``prefer_automatic: true``. Listing an
        ambiguous name (``prostate: [CTVp]``) maps it explicitly.
        """
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise InvalidInput(f"{path}: cannot read the synonym table ({exc})") from exc
        if not isinstance(data, Mapping):
            raise InvalidInput(f"{path}: synonym table must map organ keys to lists of names")
        merged = {k: list(v) for k, v in DEFAULT_SYNONYMS.items()}
        landmarks = {k: list(v) for k, v in DEFAULT_LANDMARK_SYNONYMS.items()}
        prefer_automatic = False
        for key, names in data.items():
            if key == "prefer_automatic":
                if not isinstance(names, bool):
                    raise InvalidInput(f"{path}: 'prefer_automatic' must be true or false")
                prefer_automatic = names
                continue
            if not isinstance(names, list):
                raise InvalidInput(f"{path}: entry {key!r} must be a list of ROI names")
            target = landmarks if key in LANDMARKS else merged
            target.setdefault(str(key), []).extend(str(n) for n in names)
        return cls(merged, prefer_automatic=prefer_automatic, landmarks=landmarks)

    def organ_of(self, roi_name: str) -> str | None:
        """The organ key for a ROI name, or None when it is not one of the four organs.

        Only the name itself is looked up: ``Bladder_DL`` is None here (see `resolve`).
        """
        key = self._lookup.get(_compact(roi_name))
        return key if key in LABEL_IDS else None

    def label_of(self, roi_name: str) -> int | None:
        """The label id (1..4) for a ROI name, or None."""
        organ = self.organ_of(roi_name)
        return None if organ is None else LABEL_IDS[organ]

    def _classify(self, name: str) -> tuple[str | None, Rule, str, bool]:
        """(key, rule, reason, automatic) of one name, before choosing among candidates."""
        compact = _compact(name)
        key = self._lookup.get(compact)
        if key is not None:
            builtin = _BUILTIN.get(compact)
            if builtin is not None and builtin[0] == key:
                return key, builtin[1], builtin[2], False
            return key, "user", "name in the user's synonym table", False
        tokens = normalise_roi_name(name).split("_")
        base: list[str] | None = None
        if len(tokens) > 1 and tokens[-1] in AUTOMATIC_TOKENS:
            base = tokens[:-1]
        elif len(tokens) > 1 and tokens[0] in AUTOMATIC_TOKENS:
            base = tokens[1:]
        if base is not None:
            key = self._lookup.get("".join(base))
            if key is not None:
                return key, "synonym", f"automatic contour of the {key.replace('_', ' ')}", True
        if AMBIGUOUS_PATTERN.match(compact):
            return (
                None,
                "ambiguous",
                "target-volume abbreviation: could be the prostate or a target of any site; not "
                "mapped (map it explicitly in a --synonyms file, e.g. 'prostate: [" + name + "]')",
                False,
            )
        return (
            None,
            "unmapped",
            "not an organ the network re-contours: propagated as an ordinary ROI",
            False,
        )

    def resolve(self, roi_names: Iterable[str]) -> RoiMapping:
        """Decide, for every ROI, what it is used as (see the module's rules).

        Args:
            roi_names: the ROI names of a structure set, in file order.

        Returns:
            The decisions, in file order.
        """
        names = list(roi_names)
        classified = [self._classify(n) for n in names]
        chosen: dict[str, int] = {}
        keys = {c[0] for c in classified if c[0] is not None}
        for k in keys:
            cands = [i for i, c in enumerate(classified) if c[0] == k]
            manual = [i for i in cands if not classified[i][3]]
            auto = [i for i in cands if classified[i][3]]
            manual.sort(key=lambda i: (_RANK.get(classified[i][1], 9), i))
            order = auto + manual if self.prefer_automatic else manual + auto
            chosen[k] = order[0]
        decisions: list[RoiDecision] = []
        for i, (name, (key, rule, reason, automatic)) in enumerate(
            zip(names, classified, strict=True)
        ):
            if key is None:
                decisions.append(RoiDecision(name, None, rule, None, False, reason))
                continue
            winner = names[chosen[key]]
            what = key.replace("_", " ")
            if chosen[key] == i:
                if automatic:
                    reason += (
                        " (automatic contours preferred)"
                        if self.prefer_automatic
                        else " (no manual contour of it)"
                    )
                decisions.append(RoiDecision(name, key, rule, key, automatic, reason))
            elif automatic and not self.prefer_automatic:
                decisions.append(
                    RoiDecision(
                        name,
                        key,
                        "skipped_automatic",
                        None,
                        True,
                        f"automatic contour of the {what}: the manual {winner!r} is used; "
                        "propagated as an ordinary ROI",
                    )
                )
            else:
                decisions.append(
                    RoiDecision(
                        name,
                        key,
                        "duplicate",
                        None,
                        automatic,
                        f"{reason}; {winner!r} is used as the {what}; propagated as an "
                        "ordinary ROI",
                    )
                )
        return RoiMapping(decisions)

    def match(self, roi_names: Iterable[str]) -> dict[int, str]:
        """Pick, for each label id, the ROI name used for it (`resolve`'s choice).

        Args:
            roi_names: the ROI names of a structure set, in file order.

        Returns:
            label id -> ROI name, for the labels found.
        """
        return self.resolve(roi_names).used


def no_organ_message(mapping: RoiMapping, names: Iterable[str]) -> str:
    """The message for a structure set none of whose ROIs is an organ of the label table."""
    msg = (
        f"none of the ROI names {sorted(names)} maps to bladder, rectum, seminal vesicles or "
        "prostate"
    )
    if mapping.ambiguous:
        msg += (
            f"; ambiguous abbreviations are never mapped silently: {mapping.ambiguous} (if one "
            "is the prostate, say so in a synonyms file, e.g. 'prostate: [CTVp]')"
        )
    return msg + "; extend the synonym table (--synonyms FILE, SynonymTable.from_yaml)"


def label_map_from_mapping(
    masks: Mapping[str, np.ndarray], mapping: RoiMapping
) -> tuple[np.ndarray, dict[int, str]]:
    """Combine the masks of the ROIs a `RoiMapping` uses into one label map (0..4).

    Overlaps are resolved by a fixed priority: prostate over seminal vesicles over rectum over
    bladder.

    Args:
        masks: ROI name -> (nz, ny, nx) mask (non-zero inside), all on one grid.
        mapping: the decisions (`SynonymTable.resolve`).

    Returns:
        (label map uint8 (nz, ny, nx), label id -> ROI name used).

    Raises:
        InvalidInput: when no ROI maps to any organ, or masks differ in shape.
    """
    used = mapping.used
    if not used:
        raise InvalidInput(no_organ_message(mapping, masks))
    return _combine(masks, used), used


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
    return label_map_from_mapping(masks, table.resolve(masks.keys()))
