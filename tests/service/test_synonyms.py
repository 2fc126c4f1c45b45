"""The site's ROI-name synonym file of the service (``JRS_SYNONYMS``).

The command line takes ``--synonyms FILE``; the service takes the same file from its settings,
loads it once at start-up (a file it cannot use stops the start-up with an error naming it), and
every job, every patient's planning check and every adaptation uses it.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from jrs.service.app import create_app
from jrs.service.errors import ConfigurationError
from jrs.service.settings import load_settings
from tests.service.conftest import AUTH, Case, FakeRunner, make_settings, multipart

SITE_NAME = "Pr_site_local"  # no built-in table maps this name


def _site_file(tmp_path: Path) -> Path:
    path = tmp_path / "site-synonyms.yaml"
    path.write_text(f"prostate: [{SITE_NAME}]\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (None, "cannot read"),  # no such file
        ("prostate: [unclosed\n", "cannot read"),  # not YAML
        ("- Prostate\n- Bladder\n", "must map organ keys"),
        ("prostate: CTVp\n", "must be a list"),
        ("kidney: [Niere]\n", "unknown organs"),
    ],
)
def test_an_unusable_synonym_file_stops_the_start_up_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str | None, words: str
) -> None:
    path = tmp_path / "conf" / "synonyms.yaml"
    if content is not None:
        path.parent.mkdir()
        path.write_text(content, encoding="utf-8")
    monkeypatch.setenv("JRS_API_KEYS", "k")
    monkeypatch.setenv("JRS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("JRS_SYNONYMS", str(path))
    with pytest.raises(ConfigurationError) as err:
        load_settings()
    message = str(err.value)
    assert "JRS_SYNONYMS" in message and str(path) in message and words in message
    with pytest.raises(ConfigurationError, match="JRS_SYNONYMS"):
        create_app()  # the app's start: settings from the environment
    monkeypatch.chdir(tmp_path)
    from jrs.cli import app as cli

    result = CliRunner().invoke(cli, ["serve", "--port", "0"])
    assert result.exit_code == 1 and str(path) in result.output


def test_a_valid_file_is_loaded_once_as_a_synonym_table(tmp_path: Path) -> None:
    from jrs.core.labels import SynonymTable

    settings = make_settings(tmp_path, synonyms=_site_file(tmp_path))
    table = settings.synonym_table
    assert isinstance(table, SynonymTable)
    assert table.resolve([SITE_NAME, "Bladder"]).used == {4: SITE_NAME, 1: "Bladder"}
    assert make_settings(tmp_path).synonym_table is None  # none: the built-in table


def test_recontour_jobs_use_the_site_table(
    tmp_path: Path, case: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default runner (`PipelineRunner`) hands the table to `jrs.pipeline.run.recontour`."""
    import jrs.pipeline.run

    seen: list[Any] = []

    def recontour(
        planning_ct: Path,
        planning_rtstruct: Path,
        daily_ct: Path,
        out: Path,
        options: Any,
        **_: Any,
    ) -> Any:
        seen.append(options.synonyms)
        return SimpleNamespace(qa_data=FakeRunner()(Path(out), Path(planning_ct), Path(daily_ct)))

    monkeypatch.setattr(
        jrs.pipeline.run, "load_backend", lambda _opts: SimpleNamespace(metadata={})
    )
    monkeypatch.setattr(jrs.pipeline.run, "recontour", recontour)
    settings = make_settings(tmp_path, synonyms=_site_file(tmp_path), adaptation="off")
    with TestClient(create_app(settings)) as client:
        assert client.get("/health/ready").status_code == 200
        r = client.post(
            "/v1/recontour", headers=AUTH, files=multipart([case.planning_zip], [case.daily_zip])
        )
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "succeeded"
    assert len(seen) == 1 and seen[0] is settings.synonym_table


def test_patient_planning_check_and_adaptation_use_the_site_table(
    tmp_path: Path, case: Case
) -> None:
    """A planning whose prostate has a site-only name is refused without the file, kept with it."""
    from jrs.io.ct import read_ct_series
    from jrs.io.rtstruct_writer import write_rtstruct
    from jrs.service.patients import adapt_command
    from tests.service.conftest import prostate_mask, zip_folder

    folder = tmp_path / "site"
    (folder / "ct").mkdir(parents=True)
    for p in (case.planning / "ct").iterdir():
        (folder / "ct" / p.name).write_bytes(p.read_bytes())
    write_rtstruct(
        {SITE_NAME: prostate_mask()}, read_ct_series(folder / "ct"), folder / "rtstruct.dcm"
    )
    archive = zip_folder(folder, tmp_path / "site.zip")
    files = [("planning", (archive.name, archive.read_bytes(), "application/zip"))]

    plain = make_settings(tmp_path / "a", adaptation="off")
    with TestClient(create_app(plain, FakeRunner())) as client:
        r = client.post("/v1/patients", headers=AUTH, files=files)
        assert r.status_code == 422 and "maps to an organ" in r.json()["detail"]

    site = make_settings(tmp_path / "b", adaptation="off", synonyms=_site_file(tmp_path))
    with TestClient(create_app(site, FakeRunner())) as client:
        r = client.post("/v1/patients", headers=AUTH, files=files)
        assert r.status_code == 201, r.text
        assert r.json()["planning"]["organs"] == ["prostate"]

    argv = adapt_command(site, tmp_path / "patient")
    assert argv[argv.index("--synonyms") + 1] == str(site.synonyms)
    assert "--synonyms" not in adapt_command(plain, tmp_path / "patient")
