"""API keys: every route but health needs one (routes enumerated from the OpenAPI document)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi import routing as fastapi_routing
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from jrs.service.app import create_app
from jrs.service.auth import KeyChecker
from jrs.service.errors import ConfigurationError
from jrs.service.settings import load_settings
from tests.service.conftest import API_KEY, AUTH, FakeRunner, make_settings

PUBLIC_PREFIX = "/health/"
#: Routes outside the OpenAPI document that may answer without a key (docs only).
PUBLIC_DOC_ROUTES = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


def _fill(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "0123456789abcdef0123456789abcdef", path)


def test_every_route_but_health_requires_a_key(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    checked = 0
    for path, operations in document["paths"].items():
        for method in operations:
            if path.startswith(PUBLIC_PREFIX):
                continue
            for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": API_KEY}):
                r = client.request(method.upper(), _fill(path), headers=headers)
                assert r.status_code == 401, (method, path, headers, r.status_code)
                assert r.headers["www-authenticate"] == "Bearer"
                body = r.json()
                assert body["error"] == "unauthorized" and body["request_id"]
                assert API_KEY not in r.text
            checked += 1
    assert checked >= 7  # metrics, recontour, job, rtstruct, dvf, qa, review
    # security scheme is declared for the protected operations
    assert "ApiKey" in document["components"]["securitySchemes"]
    for path in ("/health/live", "/health/ready", "/docs"):
        assert client.get(path).status_code == 200


def _all_routes(app) -> list[tuple[str, bool]]:
    """(path, include_in_schema) of every route, included routers flattened."""
    iterate = getattr(fastapi_routing, "iter_route_contexts", None)
    if iterate is None:  # older FastAPI: app.routes is already flat
        return [(r.path, isinstance(r, APIRoute) and r.include_in_schema) for r in app.routes]
    return [(c.path, bool(getattr(c, "include_in_schema", False))) for c in iterate(app.routes)]


def test_no_route_escapes_the_openapi_enumeration(app) -> None:
    """Every route of the app is in the OpenAPI document or is one of the public doc pages."""
    documented = set(app.openapi()["paths"])
    routes = _all_routes(app)
    assert len(routes) >= 10
    for path, in_schema in routes:
        assert path, routes
        if in_schema:
            assert path in documented, path
        else:
            assert path in PUBLIC_DOC_ROUTES, f"route {path} is neither documented nor a doc page"


def test_private_docs_need_a_key(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path, public_docs=False), FakeRunner())
    with TestClient(app) as c:
        assert c.get("/openapi.json").status_code == 401
        assert c.get("/docs").status_code == 404
        assert c.get("/openapi.json", headers=AUTH).status_code == 200


def test_valid_key_is_accepted(client: TestClient) -> None:
    assert client.get("/metrics", headers=AUTH).status_code == 200
    assert client.get("/v1/jobs/0123456789abcdef0123456789abcdef", headers=AUTH).status_code == 404


def test_key_checker_compares_digests() -> None:
    checker = KeyChecker(["alpha", "beta"])
    assert checker.check("beta") and checker.check("alpha")
    assert not checker.check("gamma") and not checker.check("") and not checker.check(None)
    assert KeyChecker([]).check(None)  # insecure dev mode


def test_settings_refuse_to_start_without_keys(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for var in ("JRS_API_KEYS", "JRS_API_KEYS_FILE", "JRS_INSECURE_DEV"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)  # no .env here
    with pytest.raises(ConfigurationError, match="no API key configured.*JRS_INSECURE_DEV=1"):
        load_settings()
    with pytest.raises(ConfigurationError):
        create_app()
    monkeypatch.setenv("JRS_INSECURE_DEV", "1")
    assert load_settings().api_keys == []


def test_keys_from_env_file_and_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("JRS_API_KEYS", " key-one, key-two ,,")
    keys_file = tmp_path / "keys"
    keys_file.write_text("# comment\nkey-three\n\nkey-two\n")
    monkeypatch.setenv("JRS_API_KEYS_FILE", str(keys_file))
    settings = load_settings()
    assert settings.api_keys == ["key-one", "key-two", "key-three"]
    assert "key-one" not in repr(settings)  # keys never appear in a repr (or a log of it)
    monkeypatch.setenv("JRS_API_KEYS_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigurationError, match="JRS_API_KEYS_FILE .* cannot be read"):
        load_settings()
    monkeypatch.delenv("JRS_API_KEYS_FILE")
    monkeypatch.delenv("JRS_API_KEYS")
    (tmp_path / ".env").write_text("JRS_API_KEYS=from-dotenv\nJRS_QUEUE_SIZE=3\n")
    settings = load_settings()
    assert settings.api_keys == ["from-dotenv"] and settings.queue_size == 3
    monkeypatch.setenv("JRS_DEVICE", "gpu7")
    with pytest.raises(ConfigurationError, match="JRS_DEVICE"):
        load_settings()
