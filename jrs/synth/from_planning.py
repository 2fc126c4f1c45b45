"""Synthetic daily fractions of a real planning scan, written in the ``jrs phantom`` layout.

::

    OUT/planning_<h>/planning/ct/*.dcm, rtstruct.dcm        (copies of the input files)
    OUT/planning_<h>/fraction_<k>/ct/*.dcm, rtstruct.dcm, true_dvf.mha, params.json

``<h>`` is the first 10 hex digits of the SHA-1 of the planning SeriesInstanceUID, so folder names
hold no patient data. Each fraction is made by the deformation engine of the chosen family:
``family="organ"`` (default) `jrs.synth.engine.synthesize_fraction`, the family the model is
trained and calibrated on, or ``family="dome"``
`jrs.synth.dome_engine.synthesize_dome_fraction`, a held-out test family with a random stream
and UIDs of its own (``"family"`` is recorded in ``params.json``). It works from the planning CT,
its organ label map (ROI names mapped by the synonym table) and every ROI of the planning
RTSTRUCT; it is a new study with its own StudyInstanceUID, SeriesInstanceUID and
FrameOfReferenceUID (deterministic: derived from the seed and the planning series), the planning
patient's identity attributes, and the planning ROI names, colours and interpreted types. The
fraction's RTSTRUCT and ``true_dvf.mha`` (pull DVF in mm, LPS, on the daily grid) are the ground
truth. Patient names and IDs are never logged.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.uid import generate_uid
from tqdm import tqdm

from jrs.core.errors import InvalidInput
from jrs.core.geometry import Volume
from jrs.core.labels import LABELS, SynonymTable, label_map_from_masks
from jrs.io.ct_writer import write_ct_series
from jrs.io.rtstruct import masks_from_files
from jrs.io.rtstruct_writer import interpreted_type_for, write_rtstruct
from jrs.io.series import CTSeries
from jrs.synth.dome_engine import SEED_STREAM, synthesize_dome_fraction
from jrs.synth.engine import PROFILES, synthesize_fraction

log = logging.getLogger(__name__)

#: deformation families of synthetic fractions: "organ" (training) and "dome" (held out).
FAMILIES: tuple[str, ...] = ("organ", "dome")
#: module that makes each family's fractions (the RTSTRUCT's algorithm name).
ENGINE_MODULES: dict[str, str] = {"organ": "jrs.synth.engine", "dome": "jrs.synth.dome_engine"}


def planning_name(series_instance_uid: str) -> str:
    """Folder name of a planning scan: ``planning_<first 10 hex of sha1(SeriesInstanceUID)>``."""
    return "planning_" + hashlib.sha1(series_instance_uid.encode()).hexdigest()[:10]


def _uid(*parts: object) -> str:
    return str(generate_uid(entropy_srcs=["jrs-from-planning", *(str(p) for p in parts)]))


def _next_day(date: str, days: int) -> str:
    try:
        day = _dt.datetime.strptime(date, "%Y%m%d").date()
    except ValueError:
        return date
    return (day + _dt.timedelta(days=days)).strftime("%Y%m%d")


def _synonym_table(synonyms: SynonymTable | str | Path | None) -> SynonymTable | None:
    if synonyms is None or isinstance(synonyms, SynonymTable):
        return synonyms
    return SynonymTable.from_yaml(synonyms)


def _copy_planning(series: CTSeries, rtstruct: Path, folder: Path) -> None:
    """Copy the planning CT slices and RTSTRUCT unchanged into ``folder/planning``."""
    ct_out = folder / "planning" / "ct"
    ct_out.mkdir(parents=True, exist_ok=True)
    names: set[str] = set()
    for k, src in enumerate(series.files):
        name = Path(src).name
        if name in names or not name:
            name = f"{k:04d}_{name or 'slice.dcm'}"
        names.add(name)
        shutil.copyfile(src, ct_out / name)
    shutil.copyfile(rtstruct, folder / "planning" / "rtstruct.dcm")


def _check_profile(family: str, profile: str) -> None:
    """Refuse an unknown draw profile, and any but ``v3`` for the dome family."""
    if profile not in PROFILES:
        raise InvalidInput(f"draw profile {profile!r} unknown; use one of {', '.join(PROFILES)}")
    if family == "dome" and profile != "v3":
        raise InvalidInput(
            f"the dome family has no draw profiles (got {profile!r}); profiles belong to the "
            "organ family"
        )


def write_from_planning(
    ct_dir: str | Path,
    rtstruct: str | Path,
    out: str | Path,
    fractions: int = 3,
    seed: int = 0,
    synonyms: SynonymTable | str | Path | None = None,
    progress: bool = False,
    family: str = "organ",
    profile: str = "v3",
) -> Path:
    """Write synthetic daily fractions of a planning CT + RTSTRUCT in the phantom layout.

    Args:
        ct_dir: folder of the planning CT series (or its files).
        rtstruct: the planning RTSTRUCT file.
        out: output folder (created).
        fractions: number of fractions (fraction_1 .. fraction_K).
        seed: seed of the fractions (same seed and planning scan -> identical files).
        synonyms: ROI-name synonym table (a `SynonymTable` or a YAML file; defaults to the
            built-in table) mapping ROI names to bladder, rectum, seminal vesicles, prostate.
        progress: show a tqdm progress bar (one step per fraction).
        profile: draw profile of the organ family (`jrs.synth.engine.PROFILES`: ``v3``, the
            released model's ranges, or ``broad``); the dome family has one profile only.
        family: deformation family: "organ" (`jrs.synth.engine`, the training family) or
            "dome" (`jrs.synth.dome_engine`, held out of training and calibration: a
            cross-generator test). The family is recorded in each ``params.json``; dome
            fractions use another random stream and other UIDs than organ ones of the same seed.

    Returns:
        The planning folder ``OUT/planning_<h>``.

    Raises:
        InvalidInput: unreadable inputs, no ROI mapping to an organ, a negative `fractions`, an
            unknown `family`.
        GeometryMismatch: the RTSTRUCT does not belong to the CT.
    """
    if family not in FAMILIES:
        raise InvalidInput(
            f"deformation family {family!r} unknown; use one of {', '.join(FAMILIES)}"
        )
    if fractions < 0:
        raise InvalidInput(f"fractions must be >= 0, got {fractions}")
    _check_profile(family, profile)
    table = _synonym_table(synonyms)
    rtstruct = Path(rtstruct)
    ss, series, masks = masks_from_files(ct_dir, rtstruct)
    colors, types = _roi_styles(ss)
    structures = {name: vol.array.view(np.bool_) for name, vol in masks.items()}
    labels, found = label_map_from_masks(structures, table)
    del masks
    key = series.series_instance_uid or series.frame_of_reference_uid or series.sop_instance_uids[0]
    name = planning_name(key)
    folder = Path(out) / name
    folder.mkdir(parents=True, exist_ok=True)
    _copy_planning(series, rtstruct, folder)
    log.info(
        "%s: %d slices, organs %s, %d ROIs",
        name,
        series.volume.geometry.shape[0],
        sorted(LABELS[k] for k in found),
        len(structures),
    )
    label_volume = Volume(labels, series.volume.geometry)
    bar = tqdm(total=fractions, desc=name, unit="fraction", disable=not progress)
    try:
        for k in range(1, fractions + 1):
            entropy = [seed, k, int(hashlib.sha1(key.encode()).hexdigest(), 16)]
            if family == "organ":
                # the v3 profile keeps its UIDs (fractions written before profiles existed)
                ids: tuple[object, ...] = (key, seed, k)
                if profile != "v3":
                    ids = (*ids, profile)
                made = synthesize_fraction(
                    series.volume,
                    label_volume,
                    structures,
                    np.random.default_rng(entropy),
                    frame_of_reference_uid=_uid(*ids, "frame"),
                    profile=profile,
                )
            else:  # its own random stream and UIDs: never the organ family's draws or scans
                ids = (key, seed, k, family)
                made = synthesize_dome_fraction(
                    series.volume,
                    label_volume,
                    structures,
                    np.random.default_rng([*entropy, SEED_STREAM]),
                    frame_of_reference_uid=_uid(*ids, "frame"),
                )
            daily = _daily_series(series, made.ct, k, ids)
            fdir = folder / f"fraction_{k}"
            write_ct_series(daily, fdir / "ct")
            write_rtstruct(
                made.structures,
                daily,
                fdir / "rtstruct.dcm",
                colors=colors,
                interpreted_types=types,
                structure_set_label="JRS_TRUTH",
                series_description="Synthetic daily ground-truth structures",
                algorithm_name=ENGINE_MODULES[family],
                series_instance_uid=_uid(*ids, "rtstruct"),
            )
            # uncompressed, as the phantom writer does (zlib gains little on a smooth field)
            made.true_dvf.write(str(fdir / "true_dvf.mha"), compress=False)
            record: dict[str, Any] = {
                "planning": name,
                "fraction": k,
                "seed": seed,
                "labels": {str(lab): roi for lab, roi in sorted(found.items())},
                **made.params,
                "family": family,
            }
            (fdir / "params.json").write_text(json.dumps(record, indent=2))
            log.info(
                "%s/fraction_%d: bladder volume x %s, prostate volume %s, min det J %.3f",
                name,
                k,
                _fmt(made.params.get("bladder_volume_ratio")),
                _fmt(made.params.get("prostate_volume_change"), signed=True),
                made.params["min_det_jacobian"],
            )
            del made
            bar.update(1)
    finally:
        bar.close()
    return folder


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:+.1f} %" if signed else f"{value:.2f}"


def _roi_styles(ss: Any) -> tuple[dict[str, tuple[int, int, int]], dict[str, str]]:
    """Colours and interpreted types per ROI name, as `rtstruct_to_masks` names the ROIs.

    Duplicate names get `` #<number>``; a ROI without an interpreted type gets one from its name.
    """
    colors: dict[str, tuple[int, int, int]] = {}
    types: dict[str, str] = {}
    seen: set[str] = set()
    for roi in ss.rois:
        name = roi.name if roi.name not in seen else f"{roi.name} #{roi.number}"
        seen.add(roi.name)
        if roi.color is not None:
            colors[name] = roi.color
        types[name] = roi.interpreted_type or interpreted_type_for(name)
    return colors, types


def _daily_series(series: CTSeries, ct: Volume, k: int, ids: tuple[object, ...]) -> CTSeries:
    """Fraction ``k``'s daily CT series: the planning patient, one new study per fraction."""
    patient = replace(
        series.patient,
        study_date=_next_day(series.patient.study_date, k),
        study_id=f"FX{k}",
        accession_number="",
        study_description=f"Synthetic daily CT {k}",
    )
    return CTSeries(
        volume=ct,
        study_instance_uid=_uid(*ids, "study"),
        series_instance_uid=_uid(*ids, "series"),
        sop_instance_uids=[_uid(*ids, "slice", j) for j in range(ct.geometry.shape[0])],
        patient=patient,
        patient_position=series.patient_position,
        series_description=f"Synthetic daily CT {k}",
    )
