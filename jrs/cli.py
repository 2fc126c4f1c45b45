"""The ``jrs`` command line.

Every sub-command imports the units it needs lazily, so ``jrs --help`` stays fast and the
service/inference paths never pull in torch. Errors of the `JrsError` hierarchy are printed as one
clear line on stderr with a non-zero exit code (2 for bad input, 1 otherwise).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

app = typer.Typer(
    name="jrs",
    help="Joint registration and segmentation for online adaptive radiotherapy of the prostate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("jrs")


class _StderrHandler(logging.StreamHandler):
    """A stream handler that always writes to the current ``sys.stderr``.

    Test runners swap ``sys.stderr`` between invocations; a handler bound to the first one
    would write to a closed stream afterwards.
    """

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def _setup_logging(verbose: bool = False) -> None:
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)


def _handle_errors(func: F) -> F:
    """Turn `JrsError`s into a one-line message and exit code (2 input, 1 other)."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from jrs.errors import InvalidInput, JrsError, UnsupportedData

        _setup_logging()
        try:
            return func(*args, **kwargs)
        except JrsError as exc:
            typer.secho(f"error ({exc.code}): {exc.message}", err=True, fg=typer.colors.RED)
            code = 2 if isinstance(exc, InvalidInput | UnsupportedData) else 1
            raise typer.Exit(code=code) from exc

    return wrapper  # type: ignore[return-value]


def _safe_file_name(name: str) -> str:
    """A file-system-safe version of a ROI name (characters outside [A-Za-z0-9 ._+-] -> '_')."""
    cleaned = re.sub(r"[^A-Za-z0-9 ._+\-]", "_", name).strip()
    return cleaned or "unnamed"


@app.command()
@_handle_errors
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
) -> None:
    """Write synthetic pelvic patients with planning and daily CTs, RTSTRUCTs and true DVFs.

    Layout: OUT/<patient>/planning/{ct/,rtstruct.dcm} and
    OUT/<patient>/fraction_<k>/{ct/,rtstruct.dcm,true_dvf.mha}.
    """
    from jrs.phantom import write_dataset

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


@app.command("rtstruct-to-masks")
@_handle_errors
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

    from jrs.dicom.rtstruct import masks_from_files

    # the RTSTRUCT is checked against the CT headers before pixels are read, so a wrong or
    # incomplete CT folder is reported as such ("references 98 images, 97 missing")
    _, _, masks = masks_from_files(ct, rtstruct, allow_partial=allow_partial)
    out.mkdir(parents=True, exist_ok=True)
    for name, mask in tqdm(masks.items(), desc="writing masks", unit="roi"):
        path = out / f"{_safe_file_name(name)}.nii.gz"
        mask.write(str(path))
        typer.echo(f"{path}\t{int(mask.array.sum())} voxels")


@app.command("masks-to-rtstruct")
@_handle_errors
def masks_to_rtstruct(
    ct: Annotated[Path, typer.Option("--ct", help="Folder of the CT series.")],
    masks: Annotated[
        Path, typer.Option("--masks", help="Folder of <ROI name>.nii.gz/.nii/.mha/.nrrd masks.")
    ],
    out: Annotated[Path, typer.Option("--out", help="RTSTRUCT file to write.")],
) -> None:
    """Write an RTSTRUCT for a CT from one binary mask file per ROI (ROI name = file name)."""
    from jrs.dicom.ct import read_ct_series
    from jrs.dicom.rtstruct import write_rtstruct
    from jrs.errors import InvalidInput
    from jrs.geometry import Volume

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


def main() -> None:  # pragma: no cover - console entry
    """Console entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
