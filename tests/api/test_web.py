"""The web UI's static files: where they are served, with which headers, and nothing else.

The browser tests (tests/browser) drive the UI itself; these check the serving side and that
the UI's JavaScript calls only what the API has.
"""

from __future__ import annotations

import asyncio
import re
import tomllib
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from app.web import CONTENT_SECURITY_POLICY, STATIC_DIR, StaticUI, collect_files

ROOT = Path(__file__).resolve().parents[2]
JS_DIR = STATIC_DIR / "js"

# What the UI must be able to do, as (method, OpenAPI path).
REQUIRED_CALLS = {
    ("GET", "/search"),
    ("GET", "/images"),
    ("POST", "/images"),
    ("DELETE", "/images/{image_id}"),
    ("GET", "/concepts"),
    ("POST", "/concepts"),
    ("GET", "/concepts/{concept_id}"),
    ("DELETE", "/concepts/{concept_id}"),
    ("PATCH", "/concepts/{concept_id}"),
    ("GET", "/concepts/{concept_id}/examples"),
    ("POST", "/concepts/{concept_id}/examples"),
    ("POST", "/search"),
    ("GET", "/jobs/{job_id}"),
    ("GET", "/index"),
    ("POST", "/index/rebuild"),
    ("GET", "/concepts/{concept_id}/photos"),
    ("PUT", "/concepts/{concept_id}/photos/{image_id}/verdict"),
    ("DELETE", "/concepts/{concept_id}/photos/{image_id}/verdict"),
}


def _csp(headers: Any) -> dict[str, str]:
    policy = headers["content-security-policy"]
    return {d.split()[0]: " ".join(d.split()[1:]) for d in policy.split(";") if d.strip()}


def test_ui_index_is_served_with_a_strict_policy(client):
    r = client.get("/ui/")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert r.text == (STATIC_DIR / "index.html").read_text()
    csp = _csp(r.headers)
    assert csp["default-src"] == "'self'"
    assert csp["img-src"] == "'self' blob: data:"
    assert csp["script-src"] == "'self'"  # no 'unsafe-inline', no 'unsafe-eval'
    assert csp["object-src"] == "'none'"
    assert csp["frame-ancestors"] == "'none'"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["referrer-policy"] == "no-referrer"


def test_the_ui_needs_no_key_and_is_not_part_of_the_api_schema(client):
    assert "authorization" not in {k.lower() for k in client.headers}
    assert client.get("/ui/js/main.js").status_code == 200
    paths = client.app.openapi()["paths"]
    assert not any(p == "/" or p.startswith("/ui") for p in paths)
    # The API itself still needs one.
    assert client.get("/images").status_code == 401


def test_root_and_bare_prefix_redirect_to_the_ui(client):
    for path in ("/", "/ui"):
        r = client.get(path, follow_redirects=False)
        assert r.status_code == 307, path
        assert r.headers["location"] == "/ui/"
        assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert client.get("/").url.path == "/ui/"
    assert client.head("/", follow_redirects=False).status_code == 307


@pytest.mark.parametrize(
    ("path", "media_type"),
    [
        ("/ui/index.html", "text/html; charset=utf-8"),
        ("/ui/app.css", "text/css; charset=utf-8"),
        ("/ui/js/main.js", "text/javascript; charset=utf-8"),
        ("/ui/js/api.js", "text/javascript; charset=utf-8"),
        ("/ui/icon.svg", "image/svg+xml"),
    ],
)
def test_static_files_have_exact_content_types(client, path, media_type):
    r = client.get(path)
    assert r.status_code == 200
    assert r.headers["content-type"] == media_type
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert r.content == (STATIC_DIR / path.removeprefix("/ui/")).read_bytes()


def test_every_shipped_file_is_served_and_revalidated(client):
    files = collect_files()
    assert {"index.html", "app.css", "js/main.js"} <= set(files)
    for name in files:
        r = client.get(f"/ui/{name}")
        assert r.status_code == 200, name
        assert r.headers["cache-control"] == "no-cache"
        again = client.get(f"/ui/{name}", headers={"If-None-Match": r.headers["etag"]})
        assert again.status_code == 304, name
        assert again.content == b""
    assert client.head("/ui/app.css").status_code == 200


def test_only_get_and_head(client):
    r = client.post("/ui/index.html")
    assert r.status_code == 405
    assert r.headers["allow"] == "GET, HEAD"
    assert r.json()["error"]["code"] == "method_not_allowed"


def _raw_get(app: Any, path: str) -> tuple[int, dict[str, str], bytes]:
    """GET `path` exactly as given: HTTP clients normalise `..` away before sending, an
    attacker's raw socket does not."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("latin-1", "backslashreplace"),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
    }
    sent: list[dict[str, Any]] = []
    received = False

    async def receive() -> dict[str, Any]:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.sleep(5)  # no disconnect while the response is sent
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, body


# The UI's files are app/web/static/*: app/config.py is ../../config.py from there.
TRAVERSALS = [
    "/ui/../app/config.py",
    "/ui/../config.py",
    "/ui/../../config.py",
    "/ui/../../../pyproject.toml",
    "/ui/js/../../../config.py",
    "/ui/js/../../../../pyproject.toml",
    "/ui/..\\config.py",
    "/ui//etc/passwd",
    "/ui/__init__.py",  # app/web/__init__.py: in the package, not in static/
    "/ui/../__init__.py",
    "/ui/./index.html/../../__init__.py",
    "/ui/js/",
    "/ui/.",
    "/ui/..",
    "/ui/nope.html",
    "/ui/index.html\x00.png",
]

ENCODED_TRAVERSALS = [
    "/ui/%2e%2e/app/config.py",
    "/ui/%2e%2e/%2e%2e/config.py",
    "/ui/..%2f..%2fconfig.py",
    "/ui/%2e%2e%2f%2e%2e%2f%2e%2e%2fpyproject.toml",
    "/ui/js/%2e%2e/%2e%2e/__init__.py",
    "/ui/%252e%252e/config.py",
    "/ui/..%5cconfig.py",
    "/ui/%2fetc%2fpasswd",
    "/ui/index.html%00",
    "/ui/%2E%2E/__init__.py",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_raw_paths_outside_the_ui_are_404(client, path):
    status, headers, body = _raw_get(client.app, path)
    assert status == 404, path
    assert headers["content-type"] == "application/json"
    assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY  # the UI's answer
    assert b"import" not in body and b"[project]" not in body and b"root:" not in body


@pytest.mark.parametrize("path", ENCODED_TRAVERSALS)
def test_encoded_paths_outside_the_ui_are_404(client, path):
    r = client.get(path)
    assert r.status_code == 404, path
    assert r.json()["error"]["code"] == "not_found"
    assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY  # the UI's answer
    assert "import" not in r.text


def test_normalised_traversal_never_reaches_a_file(client):
    for path in ("/ui/../app/config.py", "/ui/../../config.py", "/ui/js/../../__init__.py"):
        r = client.get(path)
        assert r.status_code == 404, path
        assert "import" not in r.text


def test_the_file_table_skips_hidden_files_symlinks_and_other_types(tmp_path):
    (tmp_path / "index.html").write_text("<!doctype html>")
    (tmp_path / ".env").write_text("SECRET=1")
    (tmp_path / "notes.py").write_text("print(1)")
    (tmp_path / "_private").mkdir()
    (tmp_path / "_private" / "x.js").write_text("1")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.js"
    outside.write_text("secret()")
    (tmp_path / "link.js").symlink_to(outside)
    (tmp_path / "js").mkdir()
    (tmp_path / "js" / "ok.js").write_text("ok()")
    assert set(collect_files(tmp_path)) == {"index.html", "js/ok.js"}
    with pytest.raises(RuntimeError, match=r"no index\.html"):
        StaticUI(tmp_path / "js")


def test_ui_errors_have_the_api_error_shape(client):
    r = client.get("/ui/missing.js")
    assert r.status_code == 404
    assert r.json() == {"error": {"code": "not_found", "message": "Not Found"}}
    assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY


def test_cors_stays_off(client):
    """No CORS middleware: a page on another origin cannot call the API with a user's key."""
    assert not any("CORS" in m.cls.__name__ for m in client.app.user_middleware)
    origin = {"Origin": "https://evil.example"}
    for r in (
        client.get("/healthz", headers=origin),
        client.get("/ui/", headers=origin),
        client.options(
            "/search",
            headers=origin | {"Access-Control-Request-Method": "GET"},
        ),
    ):
        assert "access-control-allow-origin" not in r.headers


# -- the static files themselves -------------------------------------------------------------


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.script_text: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.script_text.append(data)


def test_index_html_has_no_inline_code_and_loads_only_local_files():
    parser = _Tags()
    parser.feed((STATIC_DIR / "index.html").read_text())
    assert not parser.script_text, "inline scripts are refused by the CSP"
    tags = parser.tags
    assert [a.get("type") for t, a in tags if t == "script"] == ["module"]
    files = collect_files()
    for tag, attrs in tags:
        assert "style" not in attrs, f"inline style on <{tag}>"
        assert not any(name.startswith("on") for name in attrs), f"inline handler on <{tag}>"
        for name in ("src", "href"):
            value = attrs.get(name)
            if value is None or value.startswith("#"):
                continue
            assert "//" not in value and not value.startswith("/"), f"{tag} {name}={value}"
            assert value in files, f"<{tag} {name}={value}> is not a shipped file"
    assert not any(t == "style" for t, _ in tags)


def _js_sources() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(JS_DIR.glob("*.js"))}


def test_the_js_never_parses_data_as_html():
    for name, source in _js_sources().items():
        for banned in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert banned not in source, f"{name} uses {banned}"
        assert "new Function" not in source, name


def test_every_js_import_is_a_shipped_module():
    files = collect_files()
    for name, source in _js_sources().items():
        for target in re.findall(r"""from\s+["']([^"']+)["']""", source):
            assert target.startswith("./"), f"{name} imports {target} (only local modules)"
            assert f"js/{target[2:]}" in files, f"{name} imports a missing {target}"


def _strip_comments(source: str) -> str:
    source = re.sub(r"/\*.*?\*/", "", source, flags=re.S)
    return "\n".join(line for line in source.splitlines() if not line.lstrip().startswith("//"))


_LITERAL = re.compile(r"""(["'`])(/[A-Za-z][^"'`\s]*)\1""")
_CALL = re.compile(
    r"""(?:api\.(get|post|patch|put|del|blob|upload)|request)\("""
    r"""\s*(?:"(GET|POST|PATCH|DELETE)",\s*)?"""
    r"""(["'`])(/[^"'`\s]*)\3"""
)
_METHODS = {
    "get": "GET",
    "post": "POST",
    "patch": "PATCH",
    "put": "PUT",
    "del": "DELETE",
    "blob": "GET",
    "upload": "POST",  # with upload progress (XMLHttpRequest)
}


def _as_pattern(js_path: str) -> str:
    """`/images/${encodeURIComponent(id)}` -> /images/{}: placeholders stand for one segment."""
    return re.sub(r"\$\{[^}]*\}", "{}", js_path.split("?")[0])


def _matches(js_pattern: str, api_path: str) -> bool:
    js_parts, api_parts = js_pattern.split("/"), api_path.split("/")
    if len(js_parts) != len(api_parts):
        return False
    for js_part, api_part in zip(js_parts, api_parts, strict=True):
        if js_part == "{}":
            if not (api_part.startswith("{") and api_part.endswith("}")):
                return False
        elif js_part != api_part:
            return False
    return True


def test_the_js_calls_only_endpoints_of_the_api(client):
    schema = client.app.openapi()["paths"]
    calls: set[tuple[str, str]] = set()
    literals: set[tuple[str, str]] = set()
    for name, source in _js_sources().items():
        code = _strip_comments(source)
        literals |= {(name, m[2]) for m in _LITERAL.finditer(code)}
        for m in _CALL.finditer(code):
            method = _METHODS[m[1]] if m[1] else m[2]
            assert method, f"{name}: {m[0]}"
            pattern = _as_pattern(m[4])
            found = [p for p in schema if _matches(pattern, p)]
            assert found, f"{name} calls {m[4]}, which the API does not have"
            assert any(method.lower() in schema[p] for p in found), f"{name}: {method} {m[4]}"
            calls |= {(method, p) for p in found}
    # Every path-like string in the JS is an API path (nothing calls around the client).
    for name, literal in sorted(literals):
        pattern = _as_pattern(literal)
        assert any(_matches(pattern, p) for p in schema), f"{name}: {literal} is not an API path"
    missing = REQUIRED_CALLS - calls
    assert not missing, f"the UI does not call {sorted(missing)}"


def test_image_urls_the_js_follows_are_api_paths(client):
    """Thumbnails and originals are fetched from the URLs the API returns; those exist."""
    sources = "\n".join(_js_sources().values())
    assert "api.blob(img.dataset.path)" in sources and "image.thumbnail_url" in sources
    assert "api.blob(image.file_url)" in sources
    schema = client.app.openapi()["paths"]
    assert "get" in schema["/images/{image_id}/thumbnail"]
    assert "get" in schema["/images/{image_id}/file"]
    image_schema = client.app.openapi()["components"]["schemas"]["ImageOut"]["properties"]
    assert {"thumbnail_url", "file_url"} <= set(image_schema)


def test_the_wheel_ships_every_ui_file():
    """pyproject's package-data globs cover app/web/static, so a wheel install serves the UI."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["app"]
    app_dir = ROOT / "app"
    covered = {
        p.relative_to(STATIC_DIR).as_posix()
        for pattern in patterns
        for p in app_dir.glob(pattern)
        if p.is_file() and STATIC_DIR in p.parents
    }
    assert set(collect_files()) <= covered
