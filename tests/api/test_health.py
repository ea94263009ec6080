from app import __version__


def test_healthz_answers_ok(client):
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "version": __version__}


def test_openapi_lists_healthz(client):
    r = client.get("/openapi.json")
    assert r.status_code == 200
    assert "/healthz" in r.json()["paths"]


# -- the demo model standing in: said once, in words, and never with a file-system path --------

PATH_LIKE = __import__("re").compile(r"(?<![\w:/.])(?:~|/(?:[\w.-]+/)+)[\w.-]*")


def _unreachable_model_app(tmp_path, fallback: bool):
    from fastapi.testclient import TestClient

    from app.config import ModelSettings, Settings
    from app.main import create_app

    settings = Settings(data_dir=tmp_path / "data", broker_url="")
    settings.model = ModelSettings(
        name="ViT-B-32",
        pretrained="openai",
        device="cpu",
        fallback_to_demo=fallback,
        preload=False,
        cache_dir=tmp_path / "no-weights-here",
    )
    return TestClient(create_app(settings))


def test_the_demo_fallback_logs_one_warning_no_error_and_readyz_shows_no_path(tmp_path, caplog):
    import logging

    from app.ml.model import demo_checkpoint_path

    with _unreachable_model_app(tmp_path, fallback=True) as client:
        caplog.clear()
        with caplog.at_level(logging.DEBUG):
            serving = client.app.state.container.model.get()
        assert serving.is_demo
        records = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert [r.levelname for r in records] == ["WARNING"], [r.getMessage() for r in records]
        line = records[0].getMessage()
        assert "\n" not in line and "demo model" in line and "POLAR_MODEL__PRETRAINED" in line
        # It does not recommend what the server is already doing.
        assert str(demo_checkpoint_path()) not in line and "use the bundled demo model" not in line
        body = client.get("/readyz")
        assert body.status_code == 200 and body.json()["demo_model"] is True
        warning = body.json()["warning"]
        assert warning and "demo model" in warning and "\n" not in warning
        assert not PATH_LIKE.search(body.text), PATH_LIKE.findall(body.text)
        assert str(tmp_path) not in body.text


def test_readyz_shows_no_path_when_the_model_cannot_be_had(tmp_path):
    with _unreachable_model_app(tmp_path, fallback=False) as client:
        loader = client.app.state.container.model
        loader._load()  # what the startup load does on failure: remember why
        body = client.get("/readyz")
        assert body.status_code == 503
        detail = body.json()["checks"]["model"]["detail"]
        assert "could not" in detail or "weights" in detail, detail
        assert not PATH_LIKE.search(body.text), PATH_LIKE.findall(body.text)
