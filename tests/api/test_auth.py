"""API keys through HTTP and the admin CLI; the error shape of auth and routing failures."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app import errors
from app.cli import main as cli
from app.db import get_engine, head_revision
from app.main import create_app
from app.models import ApiKey

KEY_RE = re.compile(r"^api_key: (polar_[0-9a-f]{8}_\S{43})$", re.M)


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert set(body["error"]) <= {"code", "message", "detail"}
    return body["error"]


@pytest.mark.parametrize("path", ["/healthz", "/openapi.json", "/docs"])
def test_public_paths_need_no_key(api_client, path):
    assert api_client.get(path).status_code == 200


@pytest.mark.parametrize(
    ("headers", "words"),
    [
        ({}, "missing API key"),
        ({"Authorization": "Basic dXNlcjpwdw=="}, "missing API key"),
        ({"Authorization": "Bearer "}, "missing API key"),
        ({"Authorization": "Bearer not-a-key"}, "invalid API key"),
        ({"Authorization": "Bearer polar_00000000_" + "A" * 43}, "invalid API key"),
    ],
    ids=["none", "basic", "empty-bearer", "malformed", "unknown"],
)
def test_missing_or_invalid_key_is_401(api_client, make_user, headers, words):
    make_user(api_client)
    r = api_client.get("/images", headers=headers)
    err = assert_error(r, 401, "unauthorized")
    assert words in err["message"]
    assert r.headers["WWW-Authenticate"] == "Bearer"


def test_valid_key_works_and_is_stored_only_as_a_hash(api_client, make_user):
    user = make_user(api_client)
    assert api_client.get("/images", headers=user.headers).status_code == 200
    with api_client.app.state.container.session_factory() as s:
        key = s.scalars(select(ApiKey).where(ApiKey.id == user.key_id)).one()
        stored = [str(v) for v in vars(key).values()]
    assert all(user.key not in v for v in stored)
    assert key.prefix in user.key
    assert key.last_used_at is not None


def test_revoked_key_is_401_and_other_keys_still_work(api_client, make_user):
    from app.services import users

    user = make_user(api_client)
    with api_client.app.state.container.session_factory() as s:
        _, second = users.create_api_key(user.id, db_session=s)
        users.revoke_api_key(user.key_id, db_session=s)
    err = assert_error(api_client.get("/images", headers=user.headers), 401, "unauthorized")
    assert "revoked" in err["message"]
    ok = api_client.get("/images", headers={"Authorization": f"Bearer {second}"})
    assert ok.status_code == 200


def test_routes_added_later_are_protected_too(db_settings):
    app = create_app(db_settings)

    @app.get("/added-later")
    def added_later() -> dict[str, bool]:
        return {"ok": True}

    with TestClient(app) as client:
        assert_error(client.get("/added-later"), 401, "unauthorized")


def test_unknown_route_and_wrong_method_have_the_error_shape(api_client, make_user):
    user = make_user(api_client)
    assert_error(api_client.get("/no/such/route", headers=user.headers), 404, "not_found")
    r = api_client.put("/images", headers=user.headers)
    assert_error(r, 405, "method_not_allowed")
    assert r.headers["Allow"]


def test_request_validation_has_the_error_shape(api_client, make_user):
    user = make_user(api_client)
    err = assert_error(
        api_client.get("/images", params={"limit": "many"}, headers=user.headers),
        422,
        "validation_failed",
    )
    assert err["detail"][0]["loc"] == ["query", "limit"]


@pytest.fixture
def cli_settings(db_settings, monkeypatch):
    """Point the CLI at the test database; drop its cached engine afterwards."""
    monkeypatch.setattr(cli, "get_settings", lambda: db_settings)
    yield db_settings
    get_engine(db_settings.database_url).dispose()


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_admin_commands(cli_settings, capsys):
    rc, out, _ = run_cli(capsys, "migrate")
    assert rc == 0 and f"revision {head_revision()}" in out

    rc, out, err = run_cli(capsys, "create-user", "Ada")
    assert rc == 0 and "shown only this once" in err
    user_id = re.search(r"^user_id: (\S+)$", out, re.M).group(1)
    first_key = KEY_RE.search(out).group(1)
    first_key_id = re.search(r"^key_id: (\S+)$", out, re.M).group(1)

    rc, out, _ = run_cli(capsys, "create-key", user_id, "--name", "laptop")
    assert rc == 0
    second_key = KEY_RE.search(out).group(1)
    assert second_key != first_key

    rc, out, _ = run_cli(capsys, "revoke-key", first_key_id)
    assert rc == 0 and "revoked" in out

    with TestClient(create_app(cli_settings)) as client:
        bearer = {"Authorization": f"Bearer {first_key}"}
        assert_error(client.get("/images", headers=bearer), 401, "unauthorized")
        ok = client.get("/images", headers={"Authorization": f"Bearer {second_key}"})
        assert ok.status_code == 200


@pytest.mark.parametrize(
    "argv", [("create-key", "no-such-user"), ("revoke-key", "no-such-key")], ids=["key", "revoke"]
)
@pytest.mark.usefixtures("cli_settings")
def test_cli_unknown_ids_fail_cleanly(capsys, argv):
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 1
    assert "not found" in err


# -- the error shape for every kind of failure ------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (errors.NotFound.of("thing"), 404),
        (errors.ValidationFailed("bad", code="too_few_photos"), 422),
        (errors.QueryTooLong("77 tokens at most", detail={"max_tokens": 77}), 422),
        (errors.Conflict("name taken"), 409),
        (errors.ConceptNotReady("still training"), 409),
        (errors.Unauthorized("nope"), 401),
        (errors.PayloadTooLarge("big"), 413),
        (errors.UnsupportedMedia("ico"), 415),
        (errors.ModelUnavailable("set POLAR_MODEL__NAME"), 503),
    ],
    ids=lambda v: v.code if isinstance(v, errors.DomainError) else str(v),
)
def test_domain_errors_map_to_one_status_and_the_shape(db_settings, make_user, error, status):
    app = create_app(db_settings)

    @app.get("/raise")
    def raise_it() -> None:
        raise error

    with TestClient(app) as client:
        user = make_user(client)
        body = assert_error(client.get("/raise", headers=user.headers), status, error.code)
    assert body["message"] == error.message
    assert body.get("detail") == error.detail
    assert ("detail" in body) == (error.detail is not None)


def test_unexpected_exceptions_are_500_with_the_shape_and_no_internals(db_settings, make_user):
    app = create_app(db_settings)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internals")

    with TestClient(app, raise_server_exceptions=False) as client:
        user = make_user(client)
        r = client.get("/boom", headers=user.headers)
    body = assert_error(r, 500, "internal_error")
    assert "secret" not in r.text and body["message"] == "internal server error"
