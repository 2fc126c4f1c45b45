"""``jrs batch --adapt``: rows grouped per patient, one adaptation each, resumable, sharded."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import jrs.pipeline.batch as batch
from jrs.core.errors import InvalidInput, JrsError
from jrs.core.geometry import Geometry, Volume
from jrs.io.ct_writer import write_ct_series
from jrs.io.series import CTSeries
from jrs.pipeline.batch import group_rows, planning_series_key, read_manifest, run_batch
from jrs.pipeline.options import RecontourOptions


def _series(folder: Path, seed: int) -> str:
    rng = np.random.default_rng(seed)
    vol = Volume(
        rng.normal(0, 10, (3, 8, 8)).astype(np.float32),
        Geometry((3, 8, 8), origin=(0.0, 0.0, 0.0), spacing=(2.0, 2.0, 3.0)),
    )
    series = CTSeries.from_volume(vol)
    write_ct_series(series, folder)
    return series.series_instance_uid


@pytest.fixture
def plannings(tmp_path: Path) -> dict[str, Path]:
    """Two planning CT folders (A, B) and a copy of A in another folder (same series)."""
    out = {}
    for name, seed in (("A", 1), ("B", 2)):
        out[name] = tmp_path / name / "ct"
        _series(out[name], seed)
    out["A2"] = tmp_path / "A2" / "ct"
    out["A2"].mkdir(parents=True)
    for p in out["A"].iterdir():
        (out["A2"] / p.name).write_bytes(p.read_bytes())
    for folder in out.values():
        (folder.parent / "rs.dcm").write_bytes(b"")
    return out


def _manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    columns = list(rows[0])
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _row(rid: str, planning: Path, patient: str | None = None) -> dict[str, str]:
    row = {
        "id": rid,
        "planning_ct": str(planning),
        "planning_rtstruct": str(planning.parent / "rs.dcm"),
        "daily_ct": str(planning.parent / f"daily_{rid}"),
    }
    if patient is not None:
        row["patient"] = patient
    return row


def test_rows_are_grouped_by_planning_series_or_by_the_patient_column(
    plannings: dict[str, Path], tmp_path: Path
) -> None:
    rows = read_manifest(
        _manifest(
            tmp_path / "m.csv",
            [_row("a1", plannings["A"]), _row("b1", plannings["B"]), _row("a2", plannings["A2"])],
        )
    )
    groups = group_rows(rows)
    # A and its copy are one planning series
    key_a = planning_series_key(plannings["A"])
    assert key_a == planning_series_key(plannings["A2"]) and key_a.startswith("planning_")
    assert {k: [r.id for r in v] for k, v in groups.items()} == {
        key_a: ["a1", "a2"],
        planning_series_key(plannings["B"]): ["b1"],
    }

    by_patient = read_manifest(
        _manifest(
            tmp_path / "p.csv",
            [
                _row("x1", plannings["A"], "secret-id-1"),
                _row("x2", plannings["A"], "secret-id-1"),
                _row("y1", plannings["A"], "secret-id-2"),
            ],
        )
    )
    assert by_patient[0].patient == "secret-id-1"
    groups = group_rows(by_patient)
    assert [[r.id for r in v] for v in groups.values()] == [["x1", "x2"], ["y1"]]
    assert all(k.startswith("patient_") and "secret" not in k for k in groups)  # hashed

    conflict = read_manifest(
        _manifest(
            tmp_path / "c.csv",
            [_row("x1", plannings["A"], "p"), _row("x2", plannings["B"], "p")],
        )
    )
    with pytest.raises(InvalidInput, match="rows x1, x2 share a patient value but name 2"):
        group_rows(conflict)


class Recorder:
    """Stand-in for the pipeline and the adaptation: records which model each row used."""

    def __init__(self, fail_groups: tuple[str, ...] = (), kept: bool = True) -> None:
        self.adapted: list[Path] = []
        self.rows: dict[str, Path | None] = {}
        self.fail_groups = fail_groups
        self.kept = kept

    def adapter(self, planning_ct: Path, planning_rtstruct: Path, out: Path) -> dict[str, Any]:
        self.adapted.append(planning_ct)
        if out.name in self.fail_groups:
            raise JrsError("no organ in the planning RTSTRUCT")
        out.mkdir(parents=True)
        (out / "metadata.json").write_text("{}")
        return {"kept": self.kept, "reason": "test"}

    def recontour(
        self, planning_ct: Path, rt: Path, daily: Path, out: Path, options: Any, **_: Any
    ) -> None:
        self.rows[out.name] = options.model_dir
        out.mkdir(parents=True, exist_ok=True)
        (out / "qa.json").write_text("{}")


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()
    monkeypatch.setattr(batch, "recontour", rec.recontour)
    monkeypatch.setattr(batch, "load_backend", lambda options: object())
    return rec


def _status(path: Path, key: str = "id") -> dict[str, dict[str, str]]:
    with path.open(newline="") as fh:
        return {r[key]: r for r in csv.DictReader(fh)}


def test_each_patient_is_adapted_once_and_its_rows_use_its_model(
    plannings: dict[str, Path], tmp_path: Path, recorder: Recorder
) -> None:
    manifest = _manifest(
        tmp_path / "m.csv",
        [_row("a1", plannings["A"]), _row("b1", plannings["B"]), _row("a2", plannings["A2"])],
    )
    out = tmp_path / "out"
    key_a, key_b = planning_series_key(plannings["A"]), planning_series_key(plannings["B"])
    summary = run_batch(manifest, out, RecontourOptions(), adapter=recorder.adapter)
    assert summary.adapted == {key_a: "kept", key_b: "kept"}
    assert recorder.adapted == [plannings["A"], plannings["B"]]  # once per patient
    models = out / "patient_models"
    assert recorder.rows == {"a1": models / key_a, "a2": models / key_a, "b1": models / key_b}
    assert sorted(summary.done) == ["a1", "a2", "b1"]
    rows = _status(out / "batch_status.csv")
    assert {r["model"] for r in rows.values()} == {"patient"}
    adapted = _status(out / "adapt_status.csv", "group")
    assert adapted[key_a]["status"] == "done" and adapted[key_a]["kept"] == "yes"
    assert adapted[key_a]["rows"] == "2"

    # resumed: no adaptation and no row again
    again = run_batch(manifest, out, RecontourOptions(), adapter=recorder.adapter)
    assert again.done == [] and len(again.skipped) == 3 and len(recorder.adapted) == 2


def test_a_failed_or_unhelpful_adaptation_falls_back_to_the_generic_model(
    plannings: dict[str, Path], tmp_path: Path, recorder: Recorder
) -> None:
    key_a, key_b = planning_series_key(plannings["A"]), planning_series_key(plannings["B"])
    recorder.fail_groups = (key_b,)
    recorder.kept = False
    manifest = _manifest(
        tmp_path / "m.csv", [_row("a1", plannings["A"]), _row("b1", plannings["B"])]
    )
    generic = tmp_path / "models" / "crossstitch" / "2"
    summary = run_batch(
        manifest, tmp_path / "out", RecontourOptions(model_dir=generic), adapter=recorder.adapter
    )
    assert summary.adapted == {key_a: "base", key_b: "failed"}
    assert recorder.rows == {"a1": generic, "b1": generic}
    rows = _status(tmp_path / "out" / "batch_status.csv")
    assert rows["a1"]["model"] == rows["b1"]["model"] == "generic"
    adapted = _status(tmp_path / "out" / "adapt_status.csv", "group")
    assert adapted[key_b]["status"] == "failed" and "no organ" in adapted[key_b]["error"]
    assert adapted[key_a]["kept"] == "no"
    # a new fraction of B: its failed adaptation is not tried again unless asked
    _manifest(
        manifest,
        [_row("a1", plannings["A"]), _row("b1", plannings["B"]), _row("b2", plannings["B"])],
    )
    run_batch(manifest, tmp_path / "out", RecontourOptions(), adapter=recorder.adapter)
    assert recorder.adapted.count(plannings["B"]) == 1 and recorder.rows["b2"] is None
    _manifest(
        manifest,
        [_row("a1", plannings["A"]), _row("b1", plannings["B"]), _row("b3", plannings["B"])],
    )
    run_batch(
        manifest, tmp_path / "out", RecontourOptions(), adapter=recorder.adapter, retry_failed=True
    )
    assert recorder.adapted.count(plannings["B"]) == 2


def test_shards_take_whole_patients(
    plannings: dict[str, Path], tmp_path: Path, recorder: Recorder
) -> None:
    manifest = _manifest(
        tmp_path / "m.csv",
        [_row("a1", plannings["A"]), _row("b1", plannings["B"]), _row("a2", plannings["A2"])],
    )
    out = tmp_path / "out"
    first = run_batch(
        manifest, out, RecontourOptions(), adapter=recorder.adapter, shard_index=0, shard_count=2
    )
    second = run_batch(
        manifest, out, RecontourOptions(), adapter=recorder.adapter, shard_index=1, shard_count=2
    )
    assert sorted(first.done) == ["a1", "a2"] and second.done == ["b1"]
    assert (out / "adapt_status.shard-00000-of-00002.csv").is_file()
    assert len(recorder.adapted) == 2


def test_adaptation_is_not_combined_with_a_service_row_runner(
    tmp_path: Path, plannings: dict[str, Path]
) -> None:
    manifest = _manifest(tmp_path / "m.csv", [_row("a1", plannings["A"])])
    with pytest.raises(InvalidInput, match="POST /v1/patients"):
        run_batch(
            manifest,
            tmp_path / "o",
            adapter=lambda *a: {},
            row_runner=lambda r, o: ("done", 0, "", ""),
        )
