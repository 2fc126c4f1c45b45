"""The last stages of a run: write every output, then ``qa.json``.

Every output is written into a hidden folder of the output folder and moved into place once all
of them exist (the folder is removed on a failure: no partial output is left behind). The DVF and
the DICOM REG are written in the background from the moment the field exists, beside
propagation, QA and the RTSTRUCT; the review figure is drawn beside the RTSTRUCT's writing (both
spend much of their time outside the GIL).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import tempfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from jrs.core.geometry import Volume
from jrs.inference.backend import NetworkBackend
from jrs.inference.preprocess import mask_box
from jrs.io import rtstruct_writer
from jrs.io.reg import write_deformable_registration
from jrs.pipeline.assess import Assessment
from jrs.pipeline.front import Alignment, Inputs, Organs, Prepared
from jrs.pipeline.mapping import MappingField
from jrs.pipeline.methods import NetworkPaths
from jrs.pipeline.options import RecontourOptions
from jrs.qa.plausibility import Finding
from jrs.qa.review import render_review
from jrs.registration.boxes import crop, index_box
from jrs.registration.instance_optimisation import RefineReport
from jrs.registration.propagation import planned_on_daily

#: the output files, in the order they are moved into place
OUTPUT_FILES = ("rtstruct.dcm", "dvf.mha", "registration.dcm", "review.png")


@dataclass
class Written:
    """Where the outputs are (``qa.json`` comes last)."""

    rtstruct: Path
    dvf: Path
    registration: Path
    review: Path


class StagedOutputs:
    """A hidden staging folder in ``out_dir``; the DVF and REG are written there at once.

    Use as a context manager: leaving it by an exception waits for the field writer and removes
    the staging folder, so no half-written output is left behind.
    """

    def __init__(self, out_dir: Path, dvf: Volume, inputs: Inputs) -> None:
        """Create the staging folder and start writing ``dvf.mha`` and ``registration.dcm``."""
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self._staging = tempfile.TemporaryDirectory(dir=out_dir, prefix=".jrs-fields-")
        self.folder = Path(self._staging.name)

        def write_fields() -> tuple[Path, Path]:
            dvf.write(str(self.folder / "dvf.mha"), compress=False)
            write_deformable_registration(
                dvf, inputs.daily, inputs.planning, self.folder / "registration.dcm"
            )
            return self.folder / "dvf.mha", self.folder / "registration.dcm"

        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jrs-fields")
        self._fields = writer.submit(write_fields)
        writer.shutdown(wait=False)

    def __enter__(self) -> StagedOutputs:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:  # wait for the field writer, then drop its folder
            concurrent.futures.wait([self._fields])
            self._staging.cleanup()

    def finish(
        self,
        inputs: Inputs,
        organs: Organs,
        alignment: Alignment,
        daily_masks: Mapping[str, npt.NDArray[np.bool_]],
        assessment: Assessment,
        opts: RecontourOptions,
    ) -> Written:
        """Draw the review, write the RTSTRUCT, and move every output into place."""
        structure_set, daily = inputs.structure_set, inputs.daily
        colors = {r.name: r.color for r in structure_set.rois if r.color is not None}
        used, outline = organs.used, assessment.outline
        flagged = assessment.flagged

        def review() -> Path:
            planned = planned_on_daily(
                inputs.planning_masks, used, alignment.prealign.transform, daily.volume.geometry
            )
            # the review shows the organs and every flagged ROI (the patient's outline aside)
            shown = list(dict.fromkeys([*used.values(), *(n for n in flagged if n not in outline)]))
            shown = shown or [n for n in daily_masks if n not in outline and daily_masks[n].any()]
            organ_masks = {name: daily_masks[name] for name in shown}
            review_ct, organ_masks, planned = review_crop(daily.volume, organ_masks, planned)
            return render_review(
                review_ct,
                organ_masks,
                self.folder / "review.png",
                planned=planned,
                colors=colors,
                focus=used.get(4),
                flagged={s.name: s.flags for s in assessment.structures if s.flags},
                title=(
                    f"jrs {opts.method}: solid = new contours, "
                    "dashed = planning after pre-alignment"
                ),
            )

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="jrs-review") as pool:
            review_job = pool.submit(review)
            staged_rt = self.folder / "rtstruct.dcm"
            rtstruct_writer.write_rtstruct(
                dict(daily_masks),
                daily,
                staged_rt,
                colors=colors,
                interpreted_types=assessment.types,
                structure_set_label="JRS",
                series_description=f"jrs re-contoured ({opts.method})",
            )
            staged_dvf, staged_reg = self._fields.result()
            staged_review = review_job.result()
        written = Written(*(self.out_dir / name for name in OUTPUT_FILES))
        for staged, final in (
            (staged_rt, written.rtstruct),
            (staged_dvf, written.dvf),
            (staged_reg, written.registration),
            (staged_review, written.review),
        ):
            os.replace(staged, final)
        self._staging.cleanup()
        return written


def qa_record(
    inputs: Inputs,
    organs: Organs,
    alignment: Alignment,
    prepared: Prepared,
    paths: NetworkPaths,
    field: MappingField,
    assessment: Assessment,
    refine_report: RefineReport,
    backend: NetworkBackend | None,
    opts: RecontourOptions,
    times: Mapping[str, float],
) -> dict[str, Any]:
    """The content of ``qa.json``: the model, every structure's QA, the field, the mapping."""
    meta = backend.metadata if backend is not None else {}
    engine = getattr(backend, "engine", None)
    prealign, focus, far = alignment.prealign, alignment.focus, prepared.far
    findings: list[Finding] = organs.findings
    box = prepared.box
    dvf_flags = assessment.dvf_flags
    return {
        "method": opts.method,
        "model": {
            "name": meta.get("name"),
            "version": meta.get("version"),
            "git_sha": meta.get("git_sha"),
            "sha256": meta.get("sha256"),
            "execution_provider": getattr(backend, "execution_provider", None),
            "engine": getattr(engine, "name", None),
            "device": getattr(engine, "device", None),
            "precision": getattr(engine, "precision", None),
        },
        "structures": [s.__dict__ for s in assessment.structures],
        "dvf": {
            **{k: round(v, 6) for k, v in field.jacobian.items()},
            "flags": dvf_flags,
            "grid": {
                "shape_zyx": list(field.out_grid.shape),
                "spacing_mm": [float(s) for s in field.out_grid.spacing],
                "daily_ct_grid": field.out_grid is inputs.daily.volume.geometry,
            },
        },
        "prealign": {
            "mode": opts.prealign,
            "focus": focus.as_dict() if focus is not None else None,
            "metric": prealign.metric,
            "matrix": list(prealign.transform.GetMatrix()),
            "translation_mm": list(prealign.transform.GetTranslation()),
            "center_mm": list(prealign.transform.GetCenter()),
            "far_field": {
                "mode": opts.far_field,
                **prepared.far_record,
                "blend_mm": far.blend_mm if far is not None else None,
                "min_det_jacobian": round(far.min_det_jacobian(), 4) if far is not None else None,
                "largest_correction_mm": round(prepared.far_reach_mm, 3),
            },
        },
        "network_box_mm": {"lower": box[0].tolist(), "upper": box[1].tolist()},
        "network": paths.network,
        "refine": refine_report.as_dict(),
        "flagged": assessment.flagged + (["DVF"] if dvf_flags else []),
        "roi_mapping": organs.mapping.to_json(),
        "plausibility": [f.to_dict() for f in findings],
        "warnings": list(
            dict.fromkeys(
                [
                    *inputs.daily.warnings,
                    *inputs.planning.warnings,
                    *inputs.structure_set.warnings,
                    *(f.message for f in findings),
                ]
            )
        ),
        "timings_s": dict(times),
    }


def write_qa(out_dir: Path, qa_data: Mapping[str, Any]) -> Path:
    """Write ``qa.json`` (numpy values as Python values)."""
    path = out_dir / "qa.json"
    path.write_text(json.dumps(qa_data, indent=2, default=json_default))
    return path


def review_crop(
    ct: Volume,
    contours: dict[str, npt.NDArray[np.bool_]],
    planned: dict[str, npt.NDArray[np.bool_]],
    margin_mm: float = 40.0,
) -> tuple[Volume, dict[str, npt.NDArray[np.bool_]], dict[str, npt.NDArray[np.bool_]]]:
    """The daily CT and masks cut to what `render_review` shows (its figure is unchanged).

    The review shows the box of the contours grown by ``margin_mm`` (its default); resampling
    only that part of the full-size masks saves most of its time.
    """
    union = np.zeros(ct.geometry.shape, dtype=bool)
    for mask in contours.values():
        union |= mask
    if not union.any():
        return ct, contours, planned
    lower, upper = mask_box(union, ct.geometry, margin_mm)
    corners = np.array(
        [
            [x, y, z]
            for x in (lower[0], upper[0])
            for y in (lower[1], upper[1])
            for z in (lower[2], upper[2])
        ]
    )
    box = index_box(ct.geometry, corners, 2.0 * float(ct.geometry.spacing.max()) + 1.0)
    if box is None:
        return ct, contours, planned
    return (
        crop(ct, box),
        {n: m[box] for n, m in contours.items()},
        {n: m[box] for n, m in planned.items()},
    )


def json_default(value: object) -> object:
    """``json.dumps`` default: numpy scalars and arrays as Python values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
