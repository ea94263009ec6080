"""`polar create-user` says which database it wrote to and never starts one silently."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.cli import main as cli
from app.config import Settings
from app.db import get_engine


@pytest.fixture
def use_settings(monkeypatch):
    made: list[Settings] = []

    def install(settings: Settings) -> Settings:
        monkeypatch.setattr(cli, "get_settings", lambda: settings)
        made.append(settings)
        return settings

    yield install
    for s in made:
        get_engine(s.database_url).dispose()


def test_refuses_to_create_a_database_where_none_is_configured(tmp_path, use_settings, capsys):
    settings = use_settings(Settings(data_dir=tmp_path / "elsewhere" / "data"))
    assert not settings.database_url_configured
    assert cli.main(["create-user", "bob"]) == 2
    out, err = capsys.readouterr()
    assert "no database at" in err and "--create-database" in err
    assert "api_key" not in out
    assert not (tmp_path / "elsewhere" / "data" / "polar.db").exists()


def test_create_database_flag_allows_it_and_names_the_file(tmp_path, use_settings, capsys):
    use_settings(Settings(data_dir=tmp_path / "data"))
    assert cli.main(["create-user", "bob", "--create-database"]) == 0
    out, err = capsys.readouterr()
    db = (tmp_path / "data" / "polar.db").resolve()
    assert db.exists() and f"database: sqlite:///{db}" in err
    assert "creating a new database" in err and "api_key: polar_" in out
    # The database exists now: no flag needed, and it still says which one.
    assert cli.main(["create-user", "carol"]) == 0
    out, err = capsys.readouterr()
    assert f"database: sqlite:///{db}" in err and "creating" not in err


def test_a_configured_database_is_used_and_named(tmp_path: Path, use_settings, capsys):
    url = f"sqlite:///{(tmp_path / 'configured.db').as_posix()}"
    settings = use_settings(Settings(data_dir=tmp_path / "data", database_url=url))
    assert settings.database_url_configured
    assert cli.main(["create-user", "bob"]) == 0
    _, err = capsys.readouterr()
    assert "configured.db" in err
