"""Writing phantom patients in the ``jrs phantom`` layout of DESIGN.md.

::

    OUT/phantom_<seed>/planning/ct/*.dcm, rtstruct.dcm
    OUT/phantom_<seed>/fraction_<k>/ct/*.dcm, rtstruct.dcm, true_dvf.mha   (k = 1..K)

The fraction's RTSTRUCT and DVF are ground truth. DICOM is written by `jrs.io.ct` and
`jrs.io.rtstruct`; the DVF is a 3-component float32 MetaImage on the daily CT grid (mm, LPS).
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from jrs.core.labels import DEFAULT_COLORS, DEFAULT_ROI_NAMES
from jrs.io.ct_writer import write_ct_series
from jrs.io.rtstruct_writer import write_rtstruct
from jrs.synth.generator import (
    PhantomFraction,
    PhantomPatient,
    _uid,
    generate_fraction,
    generate_patient,
)

#: display colours of the structures beyond the four organs.
EXTRA_COLORS: dict[str, tuple[int, int, int]] = {
    "Body": (0, 255, 0),
    "FemoralHead_L": (200, 200, 200),
    "FemoralHead_R": (200, 200, 200),
    "PTV": (255, 0, 255),
}


def roi_colors() -> dict[str, tuple[int, int, int]]:
    """ROI name -> (R, G, B) for every phantom structure."""
    colors = {DEFAULT_ROI_NAMES[k]: c for k, c in DEFAULT_COLORS.items()}
    colors.update(EXTRA_COLORS)
    return colors


def write_patient(patient: PhantomPatient, folder: Path) -> list[Path]:
    """Write the planning CT series and RTSTRUCT under ``folder/planning``.

    Args:
        patient: the phantom patient.
        folder: the patient's folder (``OUT/phantom_<seed>``).

    Returns:
        The RTSTRUCT path and the CT folder.
    """
    out = Path(folder) / "planning"
    series = patient.ct_series()
    write_ct_series(series, out / "ct")
    write_rtstruct(
        patient.structures,
        series,
        out / "rtstruct.dcm",
        colors=roi_colors(),
        structure_set_label="PHANTOM",
        series_description="Phantom planning structures",
        algorithm_name="jrs.synth",
        series_instance_uid=_uid(patient.seed, "planning", "rtstruct"),
    )
    return [out / "ct", out / "rtstruct.dcm"]


def write_fraction(fraction: PhantomFraction, folder: Path) -> list[Path]:
    """Write a fraction's CT series, ground-truth RTSTRUCT and true DVF under ``folder``.

    Args:
        fraction: the phantom fraction.
        folder: ``OUT/phantom_<seed>/fraction_<k>``.

    Returns:
        The CT folder, RTSTRUCT and DVF paths.
    """
    out = Path(folder)
    series = fraction.ct_series()
    write_ct_series(series, out / "ct")
    write_rtstruct(
        fraction.structures,
        series,
        out / "rtstruct.dcm",
        colors=roi_colors(),
        structure_set_label="PHANTOM_TRUTH",
        series_description="Phantom ground-truth structures",
        algorithm_name="jrs.synth",
        series_instance_uid=_uid(fraction.seed, "fraction", fraction.index, "rtstruct"),
    )
    # uncompressed: zlib gains ~10 % on a smooth float field and costs ~5 s a fraction
    fraction.true_dvf.write(str(out / "true_dvf.mha"), compress=False)
    return [out / "ct", out / "rtstruct.dcm", out / "true_dvf.mha"]


def write_dataset(
    out: str | Path,
    *,
    patients: int = 1,
    fractions: int = 3,
    seed: int = 0,
    patient_position: str = "HFS",
    progress: bool = False,
) -> list[Path]:
    """Generate and write phantom patients (patient i uses seed + i).

    Args:
        out: output folder (created).
        patients: number of patients.
        fractions: daily fractions per patient (fraction_1 .. fraction_K).
        seed: seed of the first patient.
        patient_position: HFS, HFP, FFS or FFP.
        progress: show a tqdm progress bar (one step per scan).

    Returns:
        The patient folders written.
    """
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    bar = tqdm(total=patients * (1 + fractions), desc="phantom", unit="scan", disable=not progress)
    try:
        for i in range(patients):
            patient = generate_patient(seed + i, patient_position)
            folder = root / patient.name
            write_patient(patient, folder)
            bar.update(1)
            for k in range(1, fractions + 1):
                write_fraction(generate_fraction(patient, k), folder / f"fraction_{k}")
                bar.update(1)
            written.append(folder)
    finally:
        bar.close()
    return written
