"""The documentation: the configuration table and .env.example are generated and must not drift;
the README stays a front door of a few screens that links every page of docs/, and no relative
link in it or in docs/ points at a file or heading that is not there."""

import re
from pathlib import Path

from app.settings_doc import (
    TABLE_DOC,
    render_env_example,
    render_markdown,
    settings_env_vars,
    table_in,
)

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
README_MAX_LINES = 300
PAGES = sorted((ROOT / "docs").glob("*.md"))
# [text](target) and ![alt](target); the target ends at the first space or closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


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
    text = README.read_text()
    assert "make test" in text and "make run" in text


def test_readme_fits_on_a_few_screens():
    lines = README.read_text().count("\n")
    assert lines < README_MAX_LINES, (
        f"README.md has {lines} lines; move reference material to docs/ and link it"
    )


def test_readme_links_every_docs_page():
    targets = {t.split("#")[0] for t in LINK.findall(README.read_text())}
    assert PAGES
    missing = [p.relative_to(ROOT).as_posix() for p in PAGES]
    missing = [rel for rel in missing if rel not in targets]
    assert not missing, f"README.md links no {missing}: every page of docs/ must be reachable"


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out: set[str] = set()
    seen: dict[str, int] = {}
    in_code = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not re.match(r"#{1,6} ", line):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_relative_links_resolve():
    broken = []
    for doc in [README, *PAGES]:
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not checked here
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            where = f"{doc.relative_to(ROOT)}: {target}"
            if not dest.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text()):
                broken.append(f"{where} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)
