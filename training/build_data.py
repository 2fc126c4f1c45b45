"""Build the memory-mapped training set once: broad phantoms, real planning scans, validation.

Run as ``python -m jrs.training.build_data --spec training/data_specs/data_v3.yaml --out STORE``.

Every pair is made by the ONE deformation engine of `jrs.synth.engine` (synthetic daily
fractions with known fields of a planning scan), pre-aligned and resampled by
`jrs.inference.preprocess.prepare_pair` (the function the re-contouring pipeline uses), cropped to
the organs plus a margin, and written with `jrs.training.store.save_pair`. Sources:

* ``phantoms``: analytic pelvises of the "broad" variety (prostate 20-100 cc, bladder 80-600 mL,
  body habitus, noise 8-45 HU), slice thickness 1-3 mm, gold fiducials in some prostates, and
  per-scan appearance variations (`jrs.synth.appearance`: intensity jitter, streaks near bone,
  cut-off fields of view);
* ``real``: synthetic fractions of real planning CTs with their clinical contours (e.g. the
  TCIA Pelvic-Reference-Data patients, doi 10.7937/TCIA.2019.woskq5oo); organs a scan does not
  delineate (no seminal vesicles) are recorded as unknown and masked out of the Dice losses;
* ``validation``: held-out phantoms and fractions of a held-out real patient.

The build is deterministic (seeds per patient and fraction) and resumable: a pair already in the
store is not made again. Jobs run in ``--workers`` processes (one ITK thread each).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field

from jrs.core.errors import InvalidInput
from jrs.core.labels import DEFAULT_SYNONYMS, SynonymTable
from jrs.inference.preprocess import mask_box, prepare_pair
from jrs.synth import generate_fraction, generate_patient
from jrs.synth.appearance import add_fiducials, record, vary_appearance
from jrs.synth.engine import synthesize_fraction
from jrs.training.data import TrainingPair, read_labelled_ct
from jrs.training.store import save_pair, write_index

log = logging.getLogger(__name__)

CROP_MARGIN_MM = 44.0
SLICE_CHOICES_MM = (1.0, 1.5, 2.0, 2.5, 3.0)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PhantomSpec(_Strict):
    """Analytic phantoms of one source.

    Attributes:
        count: Patients (patient ``i`` uses seed ``seed + i``).
        seed: First seed.
        fractions: Daily fractions per patient.
        variety: ``broad`` or ``standard`` anatomy.
        matrix: In-plane matrix of the generated scans.
        fiducial_share: Share of patients with gold markers in the prostate.
        engine: ``organ`` (the deformation engine of any planning scan) or ``analytic`` (the
            phantoms' own analytic fractions: larger setup errors, analytic organ motion).
        source: Source label in the store (``phantom`` or ``validation``).
        profile: draw profile of the ``organ`` engine (`jrs.synth.engine.PROFILES`).
    """

    count: int = Field(ge=1)
    seed: int = 0
    fractions: int = Field(default=3, ge=1)
    variety: str = "broad"
    matrix: int = 384
    fiducial_share: float = Field(default=0.5, ge=0, le=1)
    engine: str = "organ"
    source: str = "phantom"
    profile: str = "v3"


class RealSpec(_Strict):
    """Synthetic fractions of one real planning scan.

    Attributes:
        ct: Planning CT series folder.
        rtstruct: Planning RTSTRUCT.
        group: Patient group name (used to hold the patient out).
        fractions: Synthetic fractions.
        seed: Seed of the fractions.
        source: ``real`` or ``validation``.
        profile: draw profile of the deformation engine (`jrs.synth.engine.PROFILES`).
    """

    ct: Path
    rtstruct: Path
    group: str
    fractions: int = Field(default=20, ge=1)
    seed: int = 0
    source: str = "real"
    profile: str = "v3"


class DataSpec(_Strict):
    """A whole training set.

    Attributes:
        phantoms: Phantom sources.
        real: Real planning scans.
        synonyms: ROI name -> organ synonyms for the real scans (``{prostate: [Prostata]}``).
    """

    phantoms: list[PhantomSpec] = Field(default_factory=list)
    real: list[RealSpec] = Field(default_factory=list)
    synonyms: dict[str, list[str]] = Field(default_factory=dict)


def _init_worker() -> None:
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def _crop_box(labels: Any) -> tuple[np.ndarray, np.ndarray]:

    return mask_box(labels.array > 0, labels.geometry, CROP_MARGIN_MM)


def _pair_from_fraction(
    key: str,
    planning_ct: Any,
    planning_labels: Any,
    daily_ct: Any,
    daily_labels: Any,
    known: Sequence[int],
    group: str,
) -> Any:

    prepared = prepare_pair(
        daily_ct,
        planning_ct,
        planning_labels,
        daily_labels=daily_labels,
        box=_crop_box(daily_labels),
    )
    pair = TrainingPair.from_prepared(key, prepared)
    pair.known = tuple(int(k) for k in known)
    pair.group = group
    return pair


def build_phantom_patient(spec: dict[str, Any], index: int, store: str) -> list[dict[str, Any]]:
    """Make (or skip, when present) the pairs of phantom patient ``index`` of a spec."""
    ps = PhantomSpec(**spec)
    seed = ps.seed + index
    group = f"{ps.source}_{ps.variety}{seed}"
    keys = [f"{group}_f{k}" for k in range(1, ps.fractions + 1)]
    if all((Path(store) / k / "meta.json").is_file() for k in keys):
        return [json.loads((Path(store) / k / "meta.json").read_text()) for k in keys]
    t0 = time.monotonic()
    rng = np.random.default_rng([seed, 4242])
    thickness = float(rng.choice(SLICE_CHOICES_MM))
    patient = generate_patient(
        seed, matrix=ps.matrix, slice_thickness=thickness, variety=ps.variety
    )
    fiducials: list[list[float]] = []
    if rng.random() < ps.fiducial_share:
        fiducials = add_fiducials(
            patient.ct, patient.labels.array == 4, rng, int(rng.integers(2, 5))
        )
    planning_ct, plan_app = vary_appearance(patient.ct, rng)
    records = []
    for k, key in zip(range(1, ps.fractions + 1), keys, strict=True):
        if ps.engine == "analytic":
            frac: Any = generate_fraction(patient, k)
            params = frac.params
        else:
            frac = synthesize_fraction(
                patient.ct,
                patient.labels,
                {},
                np.random.default_rng([seed, k]),
                profile=ps.profile,
            )
            params = frac.params
        daily_ct, day_app = vary_appearance(frac.ct, rng)
        pair = _pair_from_fraction(
            key, planning_ct, patient.labels, daily_ct, frac.labels, (1, 2, 3, 4), group
        )
        meta = {
            "source": ps.source,
            "group": group,
            "kind": "phantom",
            "seed": seed,
            "fraction": k,
            "variety": ps.variety,
            "slice_mm": thickness,
            "planning_appearance": dict(record(plan_app, fiducials)),
            "daily_appearance": dict(record(day_app)),
            "engine": ps.engine,
            "engine_params": {
                kk: v for kk, v in params.items() if isinstance(v, (int, float, str))
            },
            "build_s": round(time.monotonic() - t0, 1),
        }
        records.append(save_pair(pair, Path(store), meta))
    return records


def _synonym_table(synonyms: dict[str, list[str]]) -> Any:

    merged = {k: list(v) for k, v in DEFAULT_SYNONYMS.items()}
    for organ, names in synonyms.items():
        merged.setdefault(organ, []).extend(names)
    return SynonymTable(merged)


def build_real_fraction(
    spec: dict[str, Any], k: int, store: str, synonyms: dict[str, list[str]]
) -> dict[str, Any]:
    """Make (or skip) synthetic fraction ``k`` of a real planning scan."""
    rs = RealSpec(**spec)
    key = f"{rs.source}_{rs.group}_f{k}"
    meta_path = Path(store) / key / "meta.json"
    if meta_path.is_file():
        return dict(json.loads(meta_path.read_text()))
    t0 = time.monotonic()
    ct, labels = read_labelled_ct(rs.ct, rs.rtstruct, _synonym_table(synonyms))
    known = tuple(int(v) for v in np.unique(labels.array) if v > 0)
    if 4 not in known:
        raise InvalidInput(f"{rs.rtstruct}: no prostate found with the given synonyms")
    rng = np.random.default_rng([rs.seed, k, 7])
    frac = synthesize_fraction(
        ct, labels, {}, np.random.default_rng([rs.seed, k]), profile=rs.profile
    )
    daily_ct, day_app = vary_appearance(frac.ct, rng)
    pair = _pair_from_fraction(key, ct, labels, daily_ct, frac.labels, known, rs.group)
    meta = {
        "source": rs.source,
        "group": rs.group,
        "kind": "real",
        "fraction": k,
        "known": list(known),
        "planning_series_sha1": hashlib.sha1(str(rs.ct.resolve()).encode()).hexdigest()[:10],
        "daily_appearance": dict(record(day_app)),
        "engine": {kk: v for kk, v in frac.params.items() if isinstance(v, (int, float, str))},
        "build_s": round(time.monotonic() - t0, 1),
    }
    return save_pair(pair, Path(store), meta)


def load_spec(path: Path) -> DataSpec:
    """Read a data spec YAML; relative paths are relative to the working directory."""
    if not path.is_file():
        raise InvalidInput(f"{path}: data spec not found")
    return DataSpec(**(yaml.safe_load(path.read_text()) or {}))


def build(spec: DataSpec, store: Path, workers: int = 2) -> list[dict[str, Any]]:
    """Build every pair of ``spec`` into ``store`` (resumable) and write its index.

    Args:
        spec: What to build.
        store: Output folder.
        workers: Parallel processes.

    Returns:
        The records of all pairs.
    """
    from tqdm import tqdm

    store.mkdir(parents=True, exist_ok=True)
    jobs: list[tuple[Any, tuple[Any, ...]]] = []
    for r in spec.real:  # slowest first
        if not r.ct.is_dir():
            log.warning("%s: planning CT folder absent; real source %s skipped", r.ct, r.group)
            continue
        for k in range(1, r.fractions + 1):
            jobs.append((build_real_fraction, (r.model_dump(), k, str(store), spec.synonyms)))
    for p in spec.phantoms:
        for i in range(p.count):
            jobs.append((build_phantom_patient, (p.model_dump(), i, str(store))))
    records: list[dict[str, Any]] = []
    failures: list[str] = []
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker) as pool:
        futures = {pool.submit(fn, *args): (fn.__name__, args[1]) for fn, args in jobs}
        for fut in tqdm(as_completed(futures), total=len(futures), desc="pairs", unit="job"):
            try:
                out = fut.result()
            except Exception as exc:  # one bad job never stops the others
                name = futures[fut]
                failures.append(f"{name}: {exc}")
                log.error("job %s failed: %s", name, exc)
                continue
            records.extend(out if isinstance(out, list) else [out])
    write_index(store, records)
    if failures:
        log.error("%d job(s) failed: %s", len(failures), "; ".join(failures[:5]))
    return records


def main(argv: list[str] | None = None) -> int:
    """Command-line entry."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    t0 = time.monotonic()
    records = build(load_spec(args.spec), args.out, args.workers)
    by_source: dict[str, int] = {}
    for r in records:
        by_source[str(r.get("source"))] = by_source.get(str(r.get("source")), 0) + 1
    log.info("store %s: %s pairs in %.0f s", args.out, by_source, time.monotonic() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
