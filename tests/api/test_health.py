from app import __version__


def test_healthz_answers_ok(client):
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "version": __version__}


def test_openapi_lists_healthz(client):
    r = client.get("/openapi.json")
    assert r.status_code == 200
    assert "/healthz" in r.json()["paths"]
