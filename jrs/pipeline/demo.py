"""The ``make demo`` job: a synthetic patient re-contoured by the bundled model.

It generates one synthetic pelvic patient with one daily fraction (``jrs phantom``), re-contours
the fraction from the planning CT and RTSTRUCT with the bundled model (``jrs recontour``), and
prints the QA summary, the agreement of the new contours with the fraction's ground truth (Dice,
mean surface distance) and the output paths. When no model is bundled yet, it falls back to a
round trip of the planning RTSTRUCT through the product's DICOM reader and writer.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

from jrs.core.errors import ModelNotReady
from jrs.core.metrics import centroid_mm, dice, surface_distances, volume_cc
from jrs.inference.registry import default_model_dir
from jrs.io.rtstruct import masks_from_files
from jrs.pipeline.options import RecontourOptions
from jrs.pipeline.run import recontour
from jrs.synth import generate_patient, write_dataset

log = logging.getLogger("jrs.pipeline.demo")


def round_trip(out: Path, seed: int = 0) -> dict[str, dict[str, float]]:
    """Generate a phantom patient under `out` and round-trip its planning RTSTRUCT.

    Args:
        out: output folder (created).
        seed: phantom seed.

    Returns:
        ROI name -> {"dice", "centroid_mm", "volume_cc"} of the re-read masks against the truth.
    """
    write_dataset(out, patients=1, fractions=1, seed=seed, progress=True)
    patient_dir = out / f"phantom_{seed:03d}"
    _, series, masks = masks_from_files(
        patient_dir / "planning" / "ct", patient_dir / "planning" / "rtstruct.dcm"
    )
    truth = generate_patient(seed).structures
    g = series.volume.geometry
    report: dict[str, dict[str, float]] = {}
    for name, mask in masks.items():
        ref = truth[name]
        report[name] = {
            "dice": dice(mask.array, ref),
            "centroid_mm": float(np.linalg.norm(centroid_mm(mask.array, g) - centroid_mm(ref, g))),
            "volume_cc": volume_cc(mask.array, g),
        }
    return report


def recontour_demo(out: Path, seed: int = 0, model: Path | None = None) -> list[str]:
    """Generate a phantom and re-contour its fraction with the bundled model.

    Args:
        out: output folder (phantom under ``out/phantom_<seed>``, results under
            ``out/recontoured``).
        seed: phantom seed.
        model: model folder (default: the bundled model).

    Returns:
        The lines of the report.
    """
    write_dataset(out, patients=1, fractions=1, seed=seed, progress=True)
    pdir = out / f"phantom_{seed:03d}"
    result = recontour(
        pdir / "planning" / "ct",
        pdir / "planning" / "rtstruct.dcm",
        pdir / "fraction_1" / "ct",
        out / "recontoured",
        RecontourOptions(model_dir=model),
    )
    _, series, truth = masks_from_files(
        pdir / "fraction_1" / "ct", pdir / "fraction_1" / "rtstruct.dcm"
    )
    _, _, new = masks_from_files(pdir / "fraction_1" / "ct", result.rtstruct)
    qa = result.qa_data
    lines = [
        f"model {qa['model']['name']} v{qa['model']['version']} on "
        f"{qa['model']['execution_provider']}",
        f"{'structure':<18}{'source':<14}{'Dice':>7}{'MSD mm':>8}  QA flags",
    ]
    g = series.volume.geometry
    for s in qa["structures"]:
        name = s["name"]
        d = dice(new[name].array, truth[name].array)
        msd = surface_distances(new[name].array, truth[name].array, g).msd
        flags = "; ".join(s["flags"]) or "-"
        lines.append(f"{name:<18}{s['source']:<14}{d:>7.3f}{msd:>8.2f}  {flags}")
    dvf = qa["dvf"]
    lines.append(
        f"DVF: min det J {dvf['min']:.3f}, folding {100 * dvf['folding_fraction']:.3f} % of body"
    )
    lines.append("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in qa["timings_s"].items()))
    lines += [
        str(p) for p in (result.rtstruct, result.dvf, result.registration, result.qa, result.review)
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    """Command-line entry of the demo (``python -m jrs.pipeline.demo --out DIR``)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    parser.add_argument(
        "--seed", type=int, default=500, help="phantom seed (500: never used in training)"
    )
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()

    try:
        model = args.model or default_model_dir()
    except ModelNotReady as exc:
        log.warning("%s: showing the DICOM round trip instead", exc)
        model = None
    if model is not None:
        lines = recontour_demo(args.out, args.seed, model)
    else:
        report = round_trip(args.out, args.seed)
        lines = [f"{'ROI':<18}{'Dice':>8}{'centroid err (mm)':>20}{'volume (cc)':>14}"]
        for name, m in report.items():
            lines.append(
                f"{name:<18}{m['dice']:>8.4f}{m['centroid_mm']:>20.3f}{m['volume_cc']:>14.1f}"
            )
    lines.append(f"total {time.perf_counter() - t0:.1f} s; outputs under {args.out.resolve()}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
