"""The configuration table of docs/CONFIGURATION.md and .env.example are generated; they must
not drift."""

from pathlib import Path

from app.settings_doc import (
    TABLE_DOC,
    render_env_example,
    render_markdown,
    settings_env_vars,
    table_in,
)

ROOT = Path(__file__).resolve().parents[2]


def test_settings_table_is_current():
    assert TABLE_DOC == ROOT / "docs" / "CONFIGURATION.md"
    assert table_in(TABLE_DOC.read_text()) == render_markdown(), (
        "regenerate the table: python -m app.settings_doc docs"
    )


def test_env_example_is_current():
    assert (ROOT / ".env.example").read_text() == render_env_example()


def test_every_setting_is_in_the_table():
    table = render_markdown()
    for name in settings_env_vars():
        assert f"`{name}`" in table


def test_readme_names_the_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    assert "make test" in text and "make run" in text
