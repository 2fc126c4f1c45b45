"""The ``jrs serve`` command."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner


def test_cli_serve(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from jrs.cli import app as cli

    runner = CliRunner()
    result = runner.invoke(cli, ["serve", "--help"])
    assert result.exit_code == 0 and "--host" in result.output and "--port" in result.output
    for var in ("JRS_API_KEYS", "JRS_API_KEYS_FILE", "JRS_INSECURE_DEV"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(cli, ["serve", "--port", "0"])
    assert result.exit_code == 1
    assert "no API key configured" in result.output
    # with a key, uvicorn.run is called with the app and the options
    calls = {}
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.update(kw, app=app))
    monkeypatch.setenv("JRS_API_KEYS", "k")
    monkeypatch.setenv("JRS_DATA_DIR", str(tmp_path / "d"))
    result = runner.invoke(cli, ["serve", "--host", "0.0.0.0", "--port", "8123"])
    assert result.exit_code == 0, result.output
    assert calls["host"] == "0.0.0.0" and calls["port"] == 8123
    assert calls["app"].title == "jrs re-contouring service"


@pytest.mark.integration
def test_jrs_serve_runs_a_real_uvicorn_process(tmp_path: Path) -> None:
    """``jrs serve`` in its own process: probes answer, keys are enforced, SIGTERM stops it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import httpx

    from tests.service.conftest import free_port

    port = free_port()
    env = {
        **os.environ,
        "JRS_API_KEYS": "proc-key",
        "JRS_DATA_DIR": str(tmp_path / "data"),
        "JRS_MODEL_DIR": str(tmp_path / "no-models"),  # no model: ready must say 503
    }
    env.pop("JRS_API_KEYS_FILE", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "jrs.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(f"{url}/health/live", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "jrs serve did not start"
            time.sleep(0.1)
        assert httpx.get(f"{url}/health/ready").status_code == 503  # no pipeline yet
        assert httpx.get(f"{url}/metrics").status_code == 401
        r = httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer proc-key"})
        assert r.status_code == 200 and "jrs_model_ready 0.0" in r.text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    # uvicorn shuts down gracefully, then re-raises SIGTERM (newer versions) or exits 0
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "proc-key" not in out
    lines = out.strip().splitlines()
    assert all(line.startswith("{") for line in lines), lines[:3]
    assert '"msg": "service stopped"' in out
