"""Patient-specific adaptation: keep-or-base decision, base weights, metadata, resume."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from jrs.core.errors import InvalidInput
from jrs.training.adapt import adapt, read_progress
from jrs.training.adapt_base import resolve_base
from jrs.training.adapt_options import AdaptationInterrupted, AdaptOptions
from jrs.training.adapt_score import Figures, decide, inference_of, score_model
from jrs.training.weights import WEIGHTS_FILE, load_weights
from tests.adapt_fixtures import PATH_CHOICE, TINY, phantom_planning, tiny_base


def figs(**dsc: float) -> Figures:
    return Figures(dsc=dict(dsc), msd={k: 1.0 for k in dsc})


# ---------------------------------------------------------------- the decision
def test_the_adapted_model_is_kept_only_when_no_organ_is_worse_and_the_mean_rises() -> None:
    base = figs(prostate=0.85, rectum=0.80, bladder=0.90)
    keep, why = decide(base, figs(prostate=0.88, rectum=0.80, bladder=0.91))
    assert keep and "no organ worse" in why and "prostate 0.850 -> 0.880" in why

    keep, why = decide(base, figs(prostate=0.95, rectum=0.79, bladder=0.95))
    assert not keep and "worse than the base on rectum" in why and "base model stays" in why

    keep, why = decide(base, figs(prostate=0.85, rectum=0.80, bladder=0.90))
    assert not keep and "no gain" in why  # equal: the base stays

    keep, _ = decide(base, figs(prostate=0.95, rectum=0.795, bladder=0.95), tolerance=0.01)
    assert keep  # within the tolerance


def test_missing_or_empty_figures_count_against_the_adapted_model() -> None:
    base = figs(prostate=0.85, seminal_vesicles=math.nan, rectum=0.8)
    keep, why = decide(base, figs(prostate=0.9, rectum=math.nan))
    assert not keep and "rectum" in why  # NaN (empty prediction) counts as DSC 0
    keep, _ = decide(base, figs(prostate=0.9, rectum=0.8))  # organs the base lacks: ignored
    assert keep
    assert decide(figs(), figs(prostate=0.9)) == (
        False,
        "no organ could be scored on the held-back fractions",
    )


def test_figures_round_trip_through_json() -> None:
    f = Figures(dsc={"prostate": 0.9}, msd={"prostate": math.nan}, paths={"registration": {}})
    data = json.loads(json.dumps(f.as_dict()))
    assert data["msd"]["prostate"] is None and data["mean_dsc"] == 0.9
    back = Figures.from_dict(data)
    assert back.dsc == f.dsc and math.isnan(back.msd["prostate"])


def test_options_are_checked() -> None:
    for bad in (
        AdaptOptions(minutes=0),
        AdaptOptions(fractions=0),
        AdaptOptions(device="tpu"),
        AdaptOptions(min_steps=5, max_steps=2),
        AdaptOptions(patch_size=50),
    ):
        with pytest.raises(InvalidInput):
            bad.check()


# ---------------------------------------------------------------- the base weights
@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_base(tmp_path_factory.mktemp("models"))


def test_export_writes_the_weights_adaptation_needs(base_dir: Path) -> None:
    meta = json.loads((base_dir / "metadata.json").read_text())
    entry = meta["weights"]
    assert entry["file"] == WEIGHTS_FILE and entry["format"] == "jrs-weights"
    path = base_dir / WEIGHTS_FILE
    assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert entry["bytes"] == path.stat().st_size < 1_000_000
    payload = load_weights(path, entry["sha256"])  # weights_only: no code unpickled
    assert payload["network"] == {"name": "cross-stitch", "overrides": TINY}
    assert payload["patch_size"] == 48 and payload["step"] == 7
    assert all(v.dtype != torch.float64 for v in payload["model"].values())
    assert "Torch weights" in (base_dir / "MODEL_CARD.md").read_text()
    base = resolve_base(base_dir)
    assert base.weights_source == WEIGHTS_FILE and base.path_choice == PATH_CHOICE


def test_scoring_fuses_the_organs_whose_choice_is_fusion(base_dir: Path) -> None:
    from jrs.training.synthetic import synthetic_pair

    pairs = [synthetic_pair(3, 48)]
    organs = [1, 2, 3, 4]
    choice = {**PATH_CHOICE, "prostate": "fusion"}
    reg_only = {"method": "weighted", "weights": {"prostate": [0.0, 1.0]}}
    got = score_model(base_dir, pairs, choice, organs, device="cpu", fusion=reg_only)
    assert set(got.paths["fusion"]) == {"prostate"}  # only the fused organ has a fused figure
    assert got.dsc["prostate"] == got.paths["fusion"]["prostate"]  # the chosen path is fusion
    # all weight on the registration path: the fused organ is the warped planning organ
    assert got.paths["fusion"]["prostate"] == pytest.approx(
        got.paths["registration"]["prostate"], abs=0.02
    )
    plain = score_model(base_dir, pairs, PATH_CHOICE, organs, device="cpu")
    assert "fusion" not in plain.paths


def test_a_model_without_weights_finds_its_training_checkpoint(
    base_dir: Path, tmp_path: Path
) -> None:
    from jrs.training.networks import build

    repo = tmp_path / "models"
    model = repo / "crossstitch" / "1"
    shutil.copytree(base_dir, model)
    (model / WEIGHTS_FILE).unlink()
    meta = json.loads((model / "metadata.json").read_text())
    del meta["weights"]
    (model / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(InvalidInput, match="no torch weights"):
        resolve_base(model)
    payload = load_weights(base_dir / WEIGHTS_FILE)
    (repo / "checkpoints").mkdir()
    other = build("cross-stitch", **TINY).state_dict()  # another network: not the model's
    for name, state in (("a_other.pt", other), ("b_last.pt", payload["model"])):
        torch.save(
            {"network": payload["network"], "model": state, "step": 7, "git_sha": "test"},
            repo / "checkpoints" / name,
        )
    base = resolve_base(model)
    assert base.weights_source == "b_last.pt"  # the one that reproduces model.onnx
    with pytest.raises(InvalidInput, match="does not reproduce"):
        resolve_base(model, repo / "checkpoints" / "a_other.pt")


# ---------------------------------------------------------------- a whole adaptation
class StopAfter:
    """``should_stop`` that says yes once ``calls`` polls have been made."""

    def __init__(self, calls: int) -> None:
        self.calls = calls
        self.seen = 0

    def __call__(self) -> bool:
        self.seen += 1
        return self.seen > self.calls


class Writer:
    """The real artefact writer (model_export), legacy exporter."""

    def __init__(self) -> None:
        from jrs.model_export.export import ArtefactWriter

        self.inner = ArtefactWriter()
        self.calls = 0

    def write(self, net, dest, **kw):  # type: ignore[no-untyped-def]
        self.calls += 1
        return self.inner.write(net, dest, **kw)

    def card(self, meta):  # type: ignore[no-untyped-def]
        return self.inner.card(meta)


@pytest.mark.slow
def test_adaptation_writes_a_model_folder_resumes_and_records_no_patient_data(
    base_dir: Path, tmp_path: Path
) -> None:
    folder = phantom_planning(tmp_path, seed=7)
    ct, rt = folder / "planning" / "ct", folder / "planning" / "rtstruct.dcm"
    out, work = tmp_path / "patient_model", tmp_path / "work"
    options = AdaptOptions(
        minutes=10, fractions=2, val_fractions=1, min_steps=3, max_steps=3, threads=2, seed=3
    )
    writer = Writer()
    # stop once fine-tuning has begun: pairs made, base scored, a step or two done
    with pytest.raises(AdaptationInterrupted):
        adapt(
            ct, rt, out, writer, base=base_dir, options=options, work=work, should_stop=StopAfter(5)
        )
    state = json.loads((work / "state.json").read_text())
    assert state["phase"] == "training" and 1 <= state["step"] < 3 and state["base"]
    assert (work / "train" / "checkpoints" / "last.pt").is_file()
    assert read_progress(work)["phase"] == "training"
    assert not out.exists() and writer.calls == 0

    result = adapt(ct, rt, out, writer, base=base_dir, options=options, work=work)
    assert result.resumed and result.steps == 3 and writer.calls == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "MODEL_CARD.md",
        "metadata.json",
        "model.onnx",
        "weights.pt",
    ]
    meta = json.loads((out / "metadata.json").read_text())
    ada = meta["adaptation"]
    base_meta = json.loads((base_dir / "metadata.json").read_text())
    assert ada["base"]["sha256"] == base_meta["sha256"]
    assert ada["base"]["name"] == "crossstitch" and ada["base"]["weights_source"] == WEIGHTS_FILE
    uid = pydicom.dcmread(next(iter(sorted(ct.iterdir())))).SeriesInstanceUID
    assert ada["planning_series_sha256"] == hashlib.sha256(str(uid).encode()).hexdigest()
    assert ada["steps"] == 3 and ada["attempts"] == 2 and ada["seconds"] > 0
    assert set(ada["timings_s"]) >= {"pairs", "base_validation", "training", "export", "validation"}
    assert ada["train_fractions"] == 2 and ada["validation_fractions"] == 1
    assert ada["organs"] == ["bladder", "rectum", "seminal_vesicles", "prostate"]
    val = ada["validation"]
    assert val["path_choice"] == PATH_CHOICE
    for fig in (val["base"], val["adapted"]):
        assert set(fig["dsc"]) == set(ada["organs"]) and len(fig["per_fraction"]) == 4
    kept, reason = decide(Figures.from_dict(val["base"]), Figures.from_dict(val["adapted"]))
    assert (ada["kept"], ada["reason"]) == (kept, reason) == (result.kept, result.reason)
    if kept:
        assert meta["name"] == "crossstitch-patient" and meta["sha256"] != base_meta["sha256"]
    else:
        assert meta["name"] == "crossstitch" and meta["sha256"] == base_meta["sha256"]
    assert meta["path_choice"] == PATH_CHOICE
    # the patient model runs as its base does (null correction, smoothing, network passes)
    for key in ("null_correction", "dvf_smoothing_mm", "network_passes"):
        assert meta[key] == base_meta[key]
    assert (
        meta["weights"]["sha256"] == hashlib.sha256((out / WEIGHTS_FILE).read_bytes()).hexdigest()
    )
    card = (out / "MODEL_CARD.md").read_text()
    assert "Patient-specific adaptation" in card and ada["planning_series_sha256"] in card
    # nothing of the patient: no name, id or UID in what is written
    ds = pydicom.dcmread(next(iter(sorted(ct.iterdir()))), stop_before_pixels=True)
    text = (out / "metadata.json").read_text() + card + (work / "state.json").read_text()
    for secret in (str(ds.PatientName), str(ds.PatientID), str(uid), str(tmp_path)):
        assert secret and secret not in text
    assert sorted(p.name for p in work.iterdir()) == [".lock", "progress.json", "state.json"]

    # the same command again: nothing to do
    again = adapt(ct, rt, out, writer, base=base_dir, options=options, work=work)
    assert again.resumed and again.kept == result.kept and writer.calls == 1

    # the folder is a model the pipeline runs (jrs recontour --model OUT)
    from jrs.inference import load_model

    model = load_model(out, device="cpu", engine="onnxruntime")
    rng = np.random.default_rng(0)
    vol = rng.uniform(-1, 1, (48, 48, 48)).astype(np.float32)
    assert model.predict(vol, vol, np.zeros_like(vol)).dvf.shape == (3, 48, 48, 48)


@pytest.mark.slow
def test_a_budget_too_small_for_any_step_keeps_the_base(base_dir: Path, tmp_path: Path) -> None:
    folder = phantom_planning(tmp_path, seed=8)
    out = tmp_path / "m"
    options = AdaptOptions(minutes=0.01, fractions=1, val_fractions=1, threads=2)
    result = adapt(
        folder / "planning" / "ct",
        folder / "planning" / "rtstruct.dcm",
        out,
        Writer(),
        base=base_dir,
        options=options,
    )
    assert not result.kept and result.steps == 0 and "no fine-tuning step fitted" in result.reason
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["sha256"] == json.loads((base_dir / "metadata.json").read_text())["sha256"]
    assert meta["adaptation"]["validation"]["adapted"] is None
    with pytest.raises(InvalidInput, match="already holds something"):
        adapt(
            folder / "planning" / "ct",
            folder / "planning" / "rtstruct.dcm",
            out,
            Writer(),
            base=base_dir,
            options=AdaptOptions(minutes=0.01, fractions=1, val_fractions=1, seed=9),
        )


@pytest.mark.slow
def test_benchmark_adaptation_dry_run_writes_tables_and_checks(
    base_dir: Path, tmp_path: Path
) -> None:
    """``python -m research adaptation --dry-run``: the lead's one command, on a tiny configuration."""
    from typer.testing import CliRunner

    from research.__main__ import app

    report = tmp_path / "report"
    args = ["adaptation", "--dry-run", "--no-iterative", "--model", str(base_dir)]
    args += ["--seed", "3", "--device", "cpu", "--report", str(report)]
    args += ["--out", str(tmp_path / "bench.json")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["benchmark"] == "adaptation" and len(data["adaptations"]) == 1
    assert {r["method"] for r in data["rows"]} == {"generic", "adapted"}
    assert {r["organ"] for r in data["rows"]} == {
        "prostate",
        "seminal_vesicles",
        "rectum",
        "bladder",
    }
    assert set(data["checks"]) == {"adapted_vs_generic_phantoms", "time"}
    assert data["checks"]["time"]["passed"]
    md = (report / "report.md").read_text()
    assert "| adapted |" in md and "## Acceptance" in md
    assert (report / "rows.csv").is_file() and (report / "summary.json").is_file()


def test_acceptance_checks_of_the_benchmark() -> None:
    from research.adapt_benchmark import acceptance

    def row(group: str, method: str, organ: str, dsc: float) -> dict[str, object]:
        return {
            "group": group,
            "case": "c",
            "fraction": 1,
            "method": method,
            "organ": organ,
            "dsc": dsc,
            "msd": 1.0,
        }

    rows = [
        row("real", "generic", "prostate", 0.85),
        row("real", "adapted", "prostate", 0.88),
        row("real", "iterative", "prostate", 0.885),
        row("real", "generic", "rectum", 0.80),
        row("real", "adapted", "rectum", 0.79),
        row("real", "iterative", "rectum", 0.81),
    ]
    checks = acceptance(rows, [{"seconds": 1300.0}])
    assert not checks["adapted_vs_generic_real"]["passed"]  # rectum 0.80 -> 0.79
    assert not checks["real_vs_iterative"]["passed"]  # rectum 0.79 is 0.02 below 0.81
    rows[4]["dsc"] = 0.801  # within 0.01 of the iterative baseline, above the generic model
    checks = acceptance(rows, [{"seconds": 600.0}])
    assert all(c["passed"] for c in checks.values()), checks
    assert not acceptance(rows, [{"seconds": 1300.0}])["time"]["passed"]


def test_jrs_adapt_refuses_bad_input_with_a_clear_message(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from jrs.cli.main import app

    args = ["adapt", "--planning-ct", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*args, "--planning-rtstruct", str(tmp_path / "rs.dcm")])
    assert result.exit_code == 2, result.output
    assert "error (invalid_input)" in result.output
    result = CliRunner().invoke(app, [*args, "--planning-rtstruct", "x", "--minutes", "0"])
    assert result.exit_code == 2  # typer: --minutes below its minimum


@pytest.mark.slow
def test_jrs_batch_adapt_adapts_each_patient_once(base_dir: Path, tmp_path: Path) -> None:
    """``jrs batch --adapt``: the command wires `jrs.training.adapt` into `jrs.pipeline.batch` per patient."""
    import csv

    from typer.testing import CliRunner

    from jrs.cli.main import app

    folder = phantom_planning(tmp_path, seed=5, fractions=2)
    manifest = tmp_path / "m.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "planning_ct", "planning_rtstruct", "daily_ct"])
        for k in (1, 2):
            w.writerow(
                [
                    f"fx{k}",
                    folder / "planning" / "ct",
                    folder / "planning" / "rtstruct.dcm",
                    folder / f"fraction_{k}" / "ct",
                ]
            )
    out = tmp_path / "out"
    args = ["batch", "--manifest", str(manifest), "--out", str(out), "--model", str(base_dir)]
    result = CliRunner().invoke(
        app, [*args, "--adapt", "--adapt-minutes", "0.05", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    adapted = list(csv.DictReader((out / "adapt_status.csv").open()))
    assert len(adapted) == 1 and adapted[0]["status"] == "done" and adapted[0]["rows"] == "2"
    group = adapted[0]["group"]
    meta = json.loads((out / "patient_models" / group / "metadata.json").read_text())
    assert meta["adaptation"]["kept"] is (adapted[0]["kept"] == "yes")
    rows = {r["id"]: r for r in csv.DictReader((out / "batch_status.csv").open())}
    assert {r["status"] for r in rows.values()} == {"done"}
    assert {r["model"] for r in rows.values()} == {
        "patient" if meta["adaptation"]["kept"] else "generic"
    }
    for k in (1, 2):
        assert (out / f"fx{k}" / "rtstruct.dcm").is_file()


def test_a_patient_model_keeps_the_base_models_pipeline_settings() -> None:
    from jrs.model_export.settings import inference_settings

    # a model exported before these settings existed: no smoothing, one pass, correction on
    old = inference_of({"name": "crossstitch", "version": 2})
    assert old == {"null_correction": True, "dvf_smoothing_mm": 0.0, "network_passes": 1}
    assert inference_settings({"inference": old}) == old
    new = inference_of({"null_correction": False, "dvf_smoothing_mm": 1.5, "network_passes": 3})
    assert inference_settings({"inference": new}) == new
