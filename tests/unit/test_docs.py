"""The README's configuration table and .env.example are generated; they must not drift."""

from pathlib import Path

from app.settings_doc import render_env_example, render_markdown, settings_env_vars

ROOT = Path(__file__).resolve().parents[2]


def test_readme_settings_table_is_current():
    text = (ROOT / "README.md").read_text()
    start = text.index("<!-- settings-table:start -->\n") + len("<!-- settings-table:start -->\n")
    end = text.index("<!-- settings-table:end -->")
    assert text[start:end] == render_markdown(), (
        "regenerate the table: python -m app.settings_doc markdown"
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
