"""Running the QA calibration's cases: one re-contouring per case and population.

Each run is scored against the truth; records are kept per case so that a run resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jrs.core.errors import InvalidInput, JrsError
from jrs.qa.figures import (
    StructureQa,
)
from research.qa_cases import (
    POPULATIONS,
    RECORD_VERSION,
    CaseInputs,
    CaseSpec,
    ReplayBackend,
    _dvf_noise,
    _suffix,
    _write_cut_daily,
    _write_phantom,
    _write_real,
    score_against_truth,
    shift_organs,
)

log = logging.getLogger(__name__)


# ============================================================================ running
@dataclass
class RunSettings:
    """How `run_qa_calibration` re-contours.

    Attributes:
        model_dir: model version folder (None: the newest bundled one).
        device: ``auto``, ``cpu`` or ``cuda``.
        engine: inference engine (`jrs.pipeline.options.RecontourOptions.engine`).
        precision: inference precision.
        matrix: phantom in-plane matrix.
        slice_mm: phantom slice thickness (None: each seed's draw).
        keep_work: keep the DICOM inputs and outputs of each case (else removed once its
            populations are done).
    """

    model_dir: Path | None = None
    device: str = "auto"
    engine: str = "auto"
    precision: str = "auto"
    matrix: int = 512
    slice_mm: float | None = None
    keep_work: bool = False


def record_path(report_dir: Path, case_id: str, population: str) -> Path:
    """Where the record of one case and population is kept."""
    return Path(report_dir) / "cases" / case_id / f"{population}.json"


def _load_record(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if data.get("record_version") == RECORD_VERSION else None


def _seed_parts(spec: CaseSpec) -> list[int]:
    return [spec.seed, spec.fraction, int(hashlib.sha1(spec.case_id.encode()).hexdigest()[:8], 16)]


def other_path(metadata: Mapping[str, Any]) -> dict[str, str]:
    """Per organ, the output path a model does not choose (the ``other_path`` population).

    ``segmentation`` <-> ``registration``; for an organ the model fuses, the path its fusion
    weights trust less (the registration path on a tie), i.e. the worse of the two alone.

    Args:
        metadata: The model's ``metadata.json`` content (``path_choice``, ``fusion``).

    Returns:
        Organ key -> ``segmentation`` or ``registration``.
    """
    from jrs.core.labels import LABELS
    from jrs.inference.fusion import FusionSpec

    choice = metadata.get("path_choice") or {}
    spec = FusionSpec.from_metadata(metadata)
    out = {}
    for organ in (v for k, v in LABELS.items() if k > 0):
        own = choice.get(organ, "segmentation")
        if own == "fusion":
            w_seg, w_reg = spec.weights_for(organ)
            out[organ] = "segmentation" if w_seg < w_reg else "registration"
        else:
            out[organ] = "registration" if own == "segmentation" else "segmentation"
    return out


def run_population(
    spec: CaseSpec,
    inputs: CaseInputs,
    population: str,
    settings: RunSettings,
    backend: ReplayBackend | None,
    truth: tuple[Any, Mapping[str, Any], set[str]],
) -> dict[str, Any]:
    """Re-contour one case in one population and score it (the record kept on disk).

    Args:
        spec: the case.
        inputs: its files.
        population: a key of `POPULATIONS`.
        settings: run settings.
        backend: the loaded network (None for the iterative population).
        truth: `_truth_masks` of the case.

    Returns:
        The record: case and population, the run's model and DVF figures, and per structure the
        raw QA figures (`jrs.qa.figures.StructureQa` fields), DSC, MSD, HD95 and label; a refused
        run (a `jrs.core.errors.JrsError` such as a failed plausibility check) has ``status:
        refused``.
    """
    from jrs.pipeline.options import RecontourOptions
    from jrs.pipeline.run import recontour

    if population not in POPULATIONS:
        raise InvalidInput(f"population {population!r} unknown; use one of {sorted(POPULATIONS)}")
    method = "iterative" if population == "iterative" else "network"
    opts = RecontourOptions(
        method=method,  # type: ignore[arg-type]
        model_dir=settings.model_dir,
        device=settings.device,
        engine=settings.engine,
        precision=settings.precision,
    )
    planning_rs, daily_ct = inputs.planning_rtstruct, inputs.daily_ct
    perturbation: dict[str, Any] = {}
    perturb = None
    if population == "other_path" and backend is not None:
        opts.path_choice = other_path(backend.metadata)  # type: ignore[assignment]
        perturbation["path_choice"] = dict(opts.path_choice)
    elif population == "dvf_noise":
        perturb, perturbation = _dvf_noise(_seed_parts(spec))
    elif population == "shifted_planning":
        rng = np.random.default_rng([*_seed_parts(spec), 55])
        direction = rng.normal(size=3)
        length = float(rng.uniform(5.0, 8.0))
        planning_rs = inputs.work / "shifted_rtstruct.dcm"
        shift = direction / np.linalg.norm(direction) * length
        perturbation = shift_organs(
            inputs.planning_ct, inputs.planning_rtstruct, planning_rs, shift
        )
    elif population == "cutoff_fov":
        daily_ct = inputs.work / "daily_cut_fov"
        perturbation = _write_cut_daily(inputs.daily_ct, daily_ct)
    out = inputs.work / f"out_{population}"
    record: dict[str, Any] = {
        "record_version": RECORD_VERSION,
        "case_id": spec.case_id,
        "kind": spec.kind,
        "population": population,
        "method": method,
        "perturbation": perturbation,
    }
    if backend is not None:
        backend.perturb = perturb
    t0 = time.perf_counter()
    try:
        result = recontour(
            inputs.planning_ct,
            planning_rs,
            daily_ct,
            out,
            opts,
            backend=backend if method == "network" else None,
        )
    except JrsError as exc:  # a refusal: caught before any contour is made
        record.update(status="refused", message=str(exc), seconds=round(time.perf_counter() - t0))
        return record
    finally:
        if backend is not None:
            backend.perturb = None
    qa = result.qa_data
    scores = score_against_truth(inputs.daily_ct, result.rtstruct, truth)
    structures = []
    for s in qa["structures"]:
        if s["name"] not in scores:
            continue
        figures = {k: s.get(k) for k in _QA_FIELDS if k in s}
        structures.append({**figures, **scores[s["name"]]})
    record.update(
        status="done",
        model={k: qa["model"].get(k) for k in ("name", "version", "sha256", "engine", "precision")},
        dvf={k: qa["dvf"].get(k) for k in ("min", "folding_fraction", "log_std")},
        dvf_flags=list(qa["dvf"].get("flags", [])),
        plausibility=list(qa.get("plausibility", [])),
        structures=structures,
        seconds=round(time.perf_counter() - t0, 1),
    )
    return record


_QA_FIELDS = tuple(f.name for f in dataclasses.fields(StructureQa))


def _all_done(specs: Sequence[CaseSpec], populations: Sequence[str], root: Path) -> bool:
    """Whether every case has a record for every population."""
    return all(record_path(root, s.case_id, p).is_file() for s in specs for p in populations)


def _case_inputs(
    spec: CaseSpec, root: Path, settings: RunSettings, fractions: int, real_seed: int
) -> CaseInputs:
    work = root / "work" / spec.case_id
    work.mkdir(parents=True, exist_ok=True)
    if spec.kind == "phantom":
        marker = work / "inputs.json"
        if not marker.is_file():
            inputs = _write_phantom(spec, work, settings.matrix, settings.slice_mm)
            marker.write_text("{}")
            return inputs
        folder = work / f"fraction_{spec.fraction}"
        return CaseInputs(
            work / "planning" / "ct",
            work / "planning" / "rtstruct.dcm",
            folder / "ct",
            folder / "rtstruct.dcm",
            work,
        )
    if spec.source is None:  # pragma: no cover - real_specs always sets it
        raise InvalidInput(f"case {spec.case_id} has no planning scan")
    planning = _write_real(
        spec.source,
        fractions,
        real_seed,
        root / "work" / f"{spec.source.key}-s{real_seed}{_suffix('analytic', spec.profile)}",
        spec.profile,
    )
    folder = planning / f"fraction_{spec.fraction}"
    return CaseInputs(
        planning / "planning" / "ct",
        planning / "planning" / "rtstruct.dcm",
        folder / "ct",
        folder / "rtstruct.dcm",
        work,
    )


def load_records(
    report_dir: Path,
    case_ids: Iterable[str] | None = None,
    populations: Iterable[str] | None = None,
) -> list[dict[str, Any]]:
    """The records under ``REPORT/cases`` (all of them, or those of some cases / populations)."""
    root = Path(report_dir) / "cases"
    wanted = None if case_ids is None else set(case_ids)
    pops = None if populations is None else set(populations)
    out = []
    for path in sorted(root.glob("*/*.json")):
        if wanted is not None and path.parent.name not in wanted:
            continue
        if pops is not None and path.stem not in pops:
            continue
        rec = _load_record(path)
        if rec is not None:
            out.append(rec)
    return out
