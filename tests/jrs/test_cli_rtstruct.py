"""``jrs rtstruct-to-masks`` and ``jrs masks-to-rtstruct`` on files written to disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from jrs.cli import app
from jrs.core.geometry import Geometry, Volume
from jrs.io.ct_writer import write_ct_series
from jrs.io.rtstruct import read_rtstruct, rtstruct_to_masks
from jrs.io.rtstruct_writer import write_rtstruct
from jrs.io.series import CTSeries, PatientInfo


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> tuple[Path, CTSeries, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("cli")
    g = Geometry((10, 40, 44), origin=[-21.5, -19.5, -11.25], spacing=[1.0, 1.0, 2.5])
    hu = np.full(g.shape, -1000.0, np.float32)
    ct = CTSeries.from_volume(Volume(hu, g), patient=PatientInfo(patient_name="Cli^Test"))
    write_ct_series(ct, root / "ct")
    p = g.voxel_centres()
    masks = {
        "Bladder": np.linalg.norm((p - [0, -4, 4]) / [12, 9, 8], axis=-1) < 1,
        "Prostate": np.linalg.norm((p - [2, 6, -4]) / [7, 6, 6], axis=-1) < 1,
        "Rectum": (np.hypot(p[..., 0], p[..., 1] - 12) < 6)
        & (np.hypot(p[..., 0], p[..., 1] - 12) > 2.5),
    }
    write_rtstruct(masks, ct, root / "rtstruct.dcm")
    return root, ct, masks


def test_rtstruct_to_masks_and_back(case) -> None:
    root, ct, masks = case
    runner = CliRunner()
    out = root / "masks"
    result = runner.invoke(
        app,
        [
            "rtstruct-to-masks",
            "--ct",
            str(root / "ct"),
            "--rtstruct",
            str(root / "rtstruct.dcm"),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "Bladder.nii.gz",
        "Prostate.nii.gz",
        "Rectum.nii.gz",
    ]
    for name, mask in masks.items():
        vol = Volume.read(str(out / f"{name}.nii.gz"))
        assert vol.geometry.same_grid(ct.volume.geometry, tol_mm=1e-3)
        np.testing.assert_array_equal(vol.array.astype(bool), mask)

    back = root / "back.dcm"
    result = runner.invoke(
        app,
        ["masks-to-rtstruct", "--ct", str(root / "ct"), "--masks", str(out), "--out", str(back)],
    )
    assert result.exit_code == 0, result.output
    ss = read_rtstruct(back)
    assert sorted(ss.roi_names) == sorted(masks)
    again = rtstruct_to_masks(ss, ct)
    for name, mask in masks.items():
        np.testing.assert_array_equal(again[name].array.astype(bool), mask)


def test_rtstruct_of_another_ct_exits_non_zero(case, tmp_path: Path) -> None:
    root, ct, _ = case
    other = CTSeries.from_volume(
        Volume(ct.volume.array, ct.volume.geometry.with_frame(None)), patient=ct.patient
    )
    write_ct_series(other, tmp_path / "other_ct")
    result = CliRunner().invoke(
        app,
        [
            "rtstruct-to-masks",
            "--ct",
            str(tmp_path / "other_ct"),
            "--rtstruct",
            str(root / "rtstruct.dcm"),
            "--out",
            str(tmp_path / "m"),
        ],
    )
    assert result.exit_code != 0
    assert ct.frame_of_reference_uid in result.stderr
    assert other.frame_of_reference_uid in result.stderr
    assert "frame of reference" in result.stderr
    assert not (tmp_path / "m").exists()


def test_single_slice_folder_reports_missing_images(shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / "rt-edge-cases" / "dicompyler-breast"
    ct_dir = tmp_path / "ct"
    ct_dir.mkdir()
    (ct_dir / "ct.0.dcm").symlink_to(folder / "ct.0.dcm")
    args = ["rtstruct-to-masks", "--ct", str(ct_dir), "--rtstruct", str(folder / "rtss.dcm")]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "m")])
    assert result.exit_code != 0
    assert "references 98 CT images, 97 of them are not in the CT series" in result.stderr
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "m"), "--allow-partial"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "BODY.nii.gz").is_file()
    assert (tmp_path / "m" / "Areola.nii.gz").is_file()
