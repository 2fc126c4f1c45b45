"""Commands on data: ``phantom``, ``rtstruct-to-masks``, ``masks-to-rtstruct``, ``rois``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from jrs.cli.app import app, handle_errors


def _safe_file_name(name: str) -> str:
    """A file-system-safe version of a ROI name (characters outside [A-Za-z0-9 ._+-] -> '_')."""
    cleaned = re.sub(r"[^A-Za-z0-9 ._+\-]", "_", name).strip()
    return cleaned or "unnamed"


@app.command()
@handle_errors
def phantom(
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    patients: Annotated[int, typer.Option("--patients", min=1, help="Number of patients.")] = 1,
    fractions: Annotated[
        int, typer.Option("--fractions", min=0, help="Daily fractions per patient.")
    ] = 3,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the first patient.")] = 0,
    patient_position: Annotated[
        str, typer.Option("--patient-position", help="HFS, HFP, FFS or FFP.")
    ] = "HFS",
    from_planning: Annotated[
        Path | None,
        typer.Option(
            "--from-planning",
            help="Planning CT folder: write synthetic fractions of this real scan instead "
            "(needs --rtstruct; --patients and --patient-position do not apply).",
        ),
    ] = None,
    rtstruct: Annotated[
        Path | None,
        typer.Option("--rtstruct", help="With --from-planning: the planning RTSTRUCT file."),
    ] = None,
    synonyms: Annotated[
        Path | None,
        typer.Option("--synonyms", help="With --from-planning: YAML ROI-name synonym table."),
    ] = None,
    family: Annotated[
        str | None,
        typer.Option(
            "--family",
            help="Deformation family of the daily fractions: 'organ' (the organ-aware engine the "
            "model is trained on; the default with --from-planning) or 'dome' (a held-out test "
            "family, never used for training). Without --from-planning the default stays the "
            "analytic phantom motion.",
        ),
    ] = None,
    profile: Annotated[
        str,
        typer.Option(
            "--profile",
            help="Draw profile of the organ family: 'v3' (the ranges the released model was "
            "trained on) or 'broad' (bladder 0.5x-1.8x, rectum 0.7x-1.5x, rotations to 3 deg "
            "about a point up to 60 mm from the prostate).",
        ),
    ] = "v3",
) -> None:
    """Write synthetic pelvic patients with planning and daily CTs, RTSTRUCTs and true DVFs.

    Layout: OUT/<patient>/planning/{ct/,rtstruct.dcm} and
    OUT/<patient>/fraction_<k>/{ct/,rtstruct.dcm,true_dvf.mha}. With --from-planning, the
    fractions are synthetic daily scans of that planning CT + RTSTRUCT (organ-aware deformation
    engine, or the held-out dome engine with --family dome), written as OUT/planning_<hash>/...
    with fraction_<k>/params.json. --family organ|dome makes the phantoms' fractions with that
    engine too (default: the analytic phantom motion).
    """
    from jrs.core.errors import InvalidInput

    if family is not None and family not in ("organ", "dome"):
        raise InvalidInput(f"--family {family!r} unknown; use organ or dome")
    organ_family = family == "organ" or (family is None and from_planning is not None)
    if profile != "v3" and not organ_family:
        raise InvalidInput(
            f"--profile {profile!r} applies to the organ family only (--family organ, the "
            "default with --from-planning)"
        )
    if from_planning is not None:
        if rtstruct is None:
            raise InvalidInput(
                "--from-planning needs --rtstruct FILE (the planning RTSTRUCT of that CT)"
            )
        if patients != 1 or patient_position.upper() != "HFS":
            raise InvalidInput(
                "--patients and --patient-position do not apply with --from-planning (one "
                "planning scan, stored as it was acquired)"
            )
        from jrs.core.labels import SynonymTable
        from jrs.synth.from_planning import write_from_planning

        folder = write_from_planning(
            from_planning,
            rtstruct,
            out,
            fractions=fractions,
            seed=seed,
            synonyms=SynonymTable.from_yaml(synonyms) if synonyms is not None else None,
            progress=True,
            family=family or "organ",
            profile=profile,
        )
        typer.echo(str(folder))
        return
    if rtstruct is not None or synonyms is not None:
        raise InvalidInput("--rtstruct and --synonyms apply only with --from-planning CT_DIR")
    if family is not None:  # phantoms whose fractions come from a deformation engine
        made = _engine_phantoms(out, patients, fractions, seed, patient_position, family, profile)
        for path in made:
            typer.echo(str(path))
        return
    from jrs.synth import write_dataset

    written = write_dataset(
        out,
        patients=patients,
        fractions=fractions,
        seed=seed,
        patient_position=patient_position.upper(),
        progress=True,
    )
    for path in written:
        typer.echo(str(path))


def _engine_phantoms(
    out: Path,
    patients: int,
    fractions: int,
    seed: int,
    position: str,
    engine: str,
    profile: str = "v3",
) -> list[Path]:
    """Write phantom patients (seeds SEED..) whose fractions are made by `engine` (organ, dome).

    The layout of ``write_dataset``, plus ``fraction_<k>/params.json`` (the engine's parameters
    and ``"family"``).
    """
    import json

    from tqdm import tqdm

    from jrs.synth import generate_fraction, generate_patient, write_fraction, write_patient

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tqdm(total=patients * (1 + fractions), desc="phantom", unit="scan") as bar:
        for i in range(patients):
            patient = generate_patient(seed + i, position.upper())
            folder = out / patient.name
            write_patient(patient, folder)
            bar.update(1)
            for k in range(1, fractions + 1):
                frac = generate_fraction(patient, k, engine=engine, profile=profile)
                write_fraction(frac, folder / f"fraction_{k}")
                record = {"fraction": k, "seed": seed + i, **frac.params, "family": engine}
                (folder / f"fraction_{k}" / "params.json").write_text(json.dumps(record, indent=2))
                bar.update(1)
            written.append(folder)
    return written


@app.command("rtstruct-to-masks")
@handle_errors
def rtstruct_to_masks(
    ct: Annotated[Path, typer.Option("--ct", help="Folder of the CT series.")],
    rtstruct: Annotated[Path, typer.Option("--rtstruct", help="RTSTRUCT file.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder for <ROI name>.nii.gz.")],
    allow_partial: Annotated[
        bool,
        typer.Option(
            "--allow-partial",
            help="Rasterise contours on the images present even when the RTSTRUCT references "
            "images missing from the CT folder.",
        ),
    ] = False,
) -> None:
    """Rasterise every ROI of an RTSTRUCT onto its CT grid, one mask file per ROI."""
    from tqdm import tqdm

    from jrs.io.rtstruct import masks_from_files

    # the RTSTRUCT is checked against the CT headers before pixels are read, so a wrong or
    # incomplete CT folder is reported as such ("references 98 images, 97 missing")
    _, _, masks = masks_from_files(ct, rtstruct, allow_partial=allow_partial)
    out.mkdir(parents=True, exist_ok=True)
    for name, mask in tqdm(masks.items(), desc="writing masks", unit="roi"):
        path = out / f"{_safe_file_name(name)}.nii.gz"
        mask.write(str(path))
        typer.echo(f"{path}\t{int(mask.array.sum())} voxels")


@app.command("masks-to-rtstruct")
@handle_errors
def masks_to_rtstruct(
    ct: Annotated[Path, typer.Option("--ct", help="Folder of the CT series.")],
    masks: Annotated[
        Path, typer.Option("--masks", help="Folder of <ROI name>.nii.gz/.nii/.mha/.nrrd masks.")
    ],
    out: Annotated[Path, typer.Option("--out", help="RTSTRUCT file to write.")],
) -> None:
    """Write an RTSTRUCT for a CT from one binary mask file per ROI (ROI name = file name)."""
    from jrs.core.errors import InvalidInput
    from jrs.core.geometry import Volume
    from jrs.io.ct import read_ct_series
    from jrs.io.rtstruct_writer import write_rtstruct

    series = read_ct_series(ct)
    files = (
        sorted(
            p
            for p in masks.iterdir()
            if p.is_file() and p.name.endswith((".nii.gz", ".nii", ".mha", ".mhd", ".nrrd"))
        )
        if masks.is_dir()
        else []
    )
    if not files:
        raise InvalidInput(
            f"{masks}: no mask files found; expected <ROI name>.nii.gz (or .nii, .mha, .nrrd)"
        )
    arrays = {}
    for path in files:
        name = re.sub(r"\.(nii\.gz|nii|mha|mhd|nrrd)$", "", path.name)
        vol = Volume.read(str(path))
        if not vol.geometry.same_grid(series.volume.geometry, tol_mm=0.01):
            vol = vol.resample(series.volume.geometry, "nearest")
        arrays[name] = vol.array > 0
    write_rtstruct(arrays, series, out)
    typer.echo(str(out))


@app.command("rois")
@handle_errors
def rois(
    rtstruct: Annotated[Path, typer.Option("--rtstruct", help="RTSTRUCT file.")],
    synonyms: Annotated[
        Path | None, typer.Option("--synonyms", help="YAML ROI-name synonym table.")
    ] = None,
    prefer_automatic: Annotated[
        bool,
        typer.Option(
            "--prefer-automatic",
            help="Use automatic contours (_DL, _MBS, _AI ...) rather than the manual ones.",
        ),
    ] = False,
    ct: Annotated[
        Path | None,
        typer.Option("--ct", help="The RTSTRUCT's CT folder: also run the plausibility checks."),
    ] = None,
) -> None:
    """Show which ROI maps to which organ, and why (and, with --ct, the plausibility checks)."""
    from jrs.core.labels import SynonymTable
    from jrs.io.rtstruct import masks_from_files, read_rtstruct

    table = SynonymTable.from_yaml(synonyms) if synonyms is not None else SynonymTable()
    if prefer_automatic:
        table.prefer_automatic = True
    names = read_rtstruct(rtstruct).roi_names
    mapping = table.resolve(names)
    width = max([len(n) for n in names] + [8]) + 2
    typer.echo(f"{'ROI':<{width}}{'used as':<20}{'rule':<19}why")
    for d in mapping.decisions:
        typer.echo(f"{d.roi:<{width}}{d.used_as or '-':<20}{d.rule:<19}{d.reason}")
    if not mapping.used:
        typer.echo(
            "no ROI maps to an organ the network re-contours: `jrs recontour` refuses this "
            "structure set with --method network (--method iterative propagates its ROIs)"
        )
    if ct is not None:
        from jrs.qa.plausibility import check_planning

        _, series, masks = masks_from_files(ct, rtstruct)
        findings = check_planning(masks, mapping, series.volume.geometry, series.volume)
        for f in findings:
            typer.echo(f"{f.severity}: {f.check}: {f.message}")
        if not findings:
            typer.echo("plausibility: every check passed")
