"""The web UI in a real browser against a real server (the bundled demo model, SQLite).

Debian's chromium, driven by PyPI's playwright; no browser is ever downloaded. The story: sign
in with a key from the admin CLI, upload a generated library by file picker, see it embedded,
teach "Fido" from five photos, search "Fido on the beach" and see it personalized, see the index
status and rebuild it, get clear errors for a bad upload and a wrong key, delete a photo, work at
400 px, sign out. `POLAR_UI_SCREENSHOT=docs/ui.png` saves the search view for the README.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.demo.run_demo import FIDO_CATEGORY, FIDO_INDEX, concept_photos, free_port, local_server
from app.demo.world import CATEGORIES, SCENES, World
from app.ml.model import DEMO_MODEL_NAME, demo_checkpoint_path

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
# docs/ui.png is the search view as this test sees it; a run writes it there only when asked
# (POLAR_UI_SCREENSHOT=docs/ui.png), so that testing leaves the working tree alone.
SCREENSHOT_ENV = "POLAR_UI_SCREENSHOT"
TIMEOUT_MS = 60_000  # generous: the CI machines have two cores shared with other work

# What the browser may log as an error: the failed requests the tests provoke on purpose (4xx
# answers, and loading a blob: URL after the UI revoked it).
EXPECTED_CONSOLE = re.compile(
    r"Failed to load resource: (the server responded with a status of 4|net::ERR_FILE_NOT_FOUND)"
)


@dataclass(frozen=True)
class Server:
    base: str
    key: str
    library: list[Path]  # PNG files of the library, in upload order
    photos: list[Path]  # Fido's five concept photos
    folders: Path  # the allowed root of folder libraries (POLAR_LIBRARY__ROOTS)


def _png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _write_images(folder: Path) -> tuple[list[Path], list[Path]]:
    """A small library: Fido (one specific hat) and another hat in every scene, two other
    objects per scene; and five photos of Fido to teach it from."""
    world = World(seed=0)
    fido = world.instance(FIDO_INDEX, FIDO_CATEGORY)
    rng = world.rng("bench", 30_000)
    others = [c for c in CATEGORIES if c != FIDO_CATEGORY]
    folder.mkdir()
    library: list[Path] = []

    def add(name: str, png: bytes) -> None:
        path = folder / name
        path.write_bytes(png)
        library.append(path)

    for n, scene in enumerate(SCENES):
        add(f"fido-{scene}.png", _png(world.render(scene, [fido], rng)))
        hat = world.sample_instance(rng, FIDO_CATEGORY)
        add(f"hat-{scene}.png", _png(world.render(scene, [hat], rng)))
        for m in range(2):
            category = others[(2 * n + m) % len(others)]
            thing = world.sample_instance(rng, category)
            add(f"{category}-{scene}.png", _png(world.render(scene, [thing], rng)))
    photos = []
    for i, png in enumerate(concept_photos(world, fido)):
        path = folder / f"fido-photo-{i}.png"
        path.write_bytes(png)
        photos.append(path)
    return library, photos


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("ui")
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLAR_")} | {
        "POLAR_DATA_DIR": str(tmp / "data"),
        "POLAR_DATABASE_URL": "",
        "POLAR_BROKER_URL": "",
        "POLAR_MODEL__NAME": DEMO_MODEL_NAME,
        "POLAR_MODEL__PRETRAINED": str(demo_checkpoint_path()),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        # Two cores shared with the browser (and whatever else runs): one torch thread trains a
        # concept in about a second where two threads can stall for many.
        "POLAR_MODEL__THREADS": "1",
        # Folders indexed in place; scans only when asked here (watching: test_library_monitor).
        "POLAR_LIBRARY__ROOTS": json.dumps([str(tmp / "folders")]),
        "POLAR_LIBRARY__WATCH": "false",
    }
    (tmp / "folders").mkdir()
    library, photos = _write_images(tmp / "images")
    with local_server(env, free_port(), tmp / "server.log") as base:
        out = subprocess.run(
            [sys.executable, "-m", "app.cli", "create-user", "ui-tester"],
            env=env,
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        key = re.search(r"api_key: (\S+)", out)
        assert key is not None, out
        yield Server(base, key[1], library, photos, tmp / "folders")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: run scripts/ensure-system-deps.sh (as root)")
    from playwright.sync_api import expect as pw_expect
    from playwright.sync_api import sync_playwright

    pw_expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any, server: Server) -> Iterator[Any]:
    """A fresh browser profile (empty localStorage); fails the test on script errors, CSP
    violations or requests to anywhere but the server."""
    context = browser.new_context(
        base_url=server.base, viewport={"width": 1280, "height": 900}, device_scale_factor=1
    )
    context.set_default_timeout(TIMEOUT_MS)
    problems: list[str] = []
    page = context.new_page()
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on(
        "console",
        lambda m: (
            problems.append(f"console {m.type}: {m.text}")
            if m.type == "error" and not EXPECTED_CONSOLE.search(m.text)
            else None
        ),
    )
    page.on(
        "request",
        lambda r: (
            None
            if r.url.startswith((server.base, "blob:", "data:"))
            else problems.append(f"request to another origin: {r.url}")
        ),
    )
    yield page
    context.close()
    assert not problems, problems


def expect(locator: Any) -> Any:
    from playwright.sync_api import expect as pw_expect

    return pw_expect(locator)


def sign_in(page: Any, key: str) -> None:
    page.goto("/")
    assert page.url.endswith("/ui/")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.get_by_label("API key").fill(key)
    page.get_by_label("API key").press("Enter")
    expect(page.locator("#nav")).to_be_visible()


def nav(page: Any, view: str) -> None:
    page.locator("#nav").get_by_role("link", name=view, exact=True).click()


def api(server: Server) -> httpx.Client:
    return httpx.Client(
        base_url=server.base, headers={"Authorization": f"Bearer {server.key}"}, timeout=30
    )


def drop_files(page: Any, selector: str, files: list[tuple[str, bytes, str]]) -> None:
    """Drag and drop files onto an element, as a user's desktop would."""
    payload = [
        {"name": name, "type": mime, "b64": base64.b64encode(data).decode()}
        for name, data, mime in files
    ]
    page.evaluate(
        """([selector, files]) => {
            const dt = new DataTransfer();
            for (const f of files) {
                const bytes = Uint8Array.from(atob(f.b64), (c) => c.charCodeAt(0));
                dt.items.add(new File([bytes], f.name, { type: f.type }));
            }
            const zone = document.querySelector(selector);
            for (const type of ["dragenter", "dragover", "drop"]) {
                zone.dispatchEvent(
                    new DragEvent(type, { bubbles: true, cancelable: true, dataTransfer: dt }));
            }
        }""",
        [selector, payload],
    )


def loaded_blob_images(page: Any, selector: str) -> list[str]:
    """src of the images under `selector` in view (thumbnails load as they scroll into view),
    once all of them are loaded from blob: URLs."""
    script = """(sel) => {
        const imgs = [...document.querySelectorAll(sel)].filter(
            (i) => i.getBoundingClientRect().top < window.innerHeight);
        const ok = imgs.length > 0 && imgs.every(
            (i) => i.src.startsWith("blob:") && i.complete && i.naturalWidth > 0);
        return ok ? imgs.map((i) => i.src) : null;
    }"""
    srcs: list[str] = page.wait_for_function(script, arg=selector).json_value()
    return srcs


# Phone, laptop and desktop widths: every control a test uses must work at each.
WIDTHS = (390, 1280, 1600)

_REACH = """(e, within) => {
    const r = e.getBoundingClientRect();
    const out = { rect: [r.left, r.top, r.width, r.height], problems: [] };
    const say = (what) => out.problems.push(what);
    const name = (n) => n ? `${n.tagName.toLowerCase()}${n.id ? "#" + n.id : ""}${
        n.className && typeof n.className === "string" ? "." + n.className.split(" ").join(".") : ""
    }` : "nothing";
    if (r.width < 1 || r.height < 1) say("has no size");
    if (r.left < 0 || r.top < 0 || r.right > window.innerWidth || r.bottom > window.innerHeight) {
        say(`is not inside the viewport (${window.innerWidth}x${window.innerHeight})`);
    }
    const box = within ? e.closest(within) : null;
    if (within && !box) say(`is not inside ${within}`);
    if (box) {
        const b = box.getBoundingClientRect();
        if (r.left < b.left - 0.5 || r.right > b.right + 0.5 || r.top < b.top - 0.5 ||
            r.bottom > b.bottom + 0.5) say(`sticks out of its ${within}`);
    }
    // Clipped, or reachable only by scrolling a container a person cannot scroll.
    for (let a = e.parentElement; a && a !== document.body; a = a.parentElement) {
        const s = getComputedStyle(a);
        if (s.overflowX === "visible" && s.overflowY === "visible") continue;
        if (a.scrollLeft || a.scrollTop) say(`${name(a)} is scrolled to reach it`);
        const b = a.getBoundingClientRect();
        if (r.left < b.left - 0.5 || r.right > b.right + 0.5 || r.top < b.top - 0.5 ||
            r.bottom > b.bottom + 0.5) say(`is clipped by ${name(a)}`);
    }
    const cx = r.left + r.width / 2, cy = r.top + r.height / 2;
    const hit = document.elementFromPoint(cx, cy);
    const label = e.labels && e.labels[0];
    if (!hit || !(hit === e || e.contains(hit) || (label && label.contains(hit)))) {
        say(`is covered at its centre by ${name(hit)}`);
    }
    // Its own text (and its label's) is not cut off.
    for (const t of [e, label].filter(Boolean)) {
        if (t.clientWidth > 0 && t.scrollWidth > t.clientWidth + 1) {
            say(`${name(t)} text overflows`);
        }
    }
    out.center = [cx, cy];
    return out;
}"""


def reachable(locator: Any, within: str | None = None) -> tuple[float, float]:
    """Where a person clicks `locator`: asserts it is inside `within` (its card) and the
    viewport, unclipped, not reached by scrolling a clipped container, and is the element hit
    at its centre. The driver never scrolls a container or the page sideways to reach it; it
    scrolls the page up or down to it, as a person's wheel does, and looks once the page has
    settled: a view still redrawing (thumbnails arriving, a list reloaded) gets up to 3 s to stop
    moving, the page scrolled to the element again each time; what is still out of reach then
    fails."""
    expect(locator).to_be_visible()
    deadline = time.monotonic() + 3.0
    while True:
        bring_into_view(locator)
        info = locator.evaluate(_REACH, within)
        if not info["problems"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not info["problems"], f"{locator}: " + "; ".join(info["problems"])
    x, y = info["center"]
    return float(x), float(y)


def click(page: Any, locator: Any, within: str | None = None) -> None:
    """Click as a person does: at the centre of what they see, after checking it is there."""
    x, y = reachable(locator, within)
    page.mouse.click(x, y)


def bring_into_view(locator: Any) -> None:
    """Scroll the page (as a person's wheel does) so that the element's box is in the middle
    of the viewport; containers inside the page are left as they are."""
    locator.evaluate(
        """(e) => {
            const r = e.getBoundingClientRect();
            window.scrollBy(0, r.top + r.height / 2 - window.innerHeight / 2);
        }"""
    )


def images_loaded(page: Any, selector: str) -> int:
    """Wait until every image under `selector` shows a picture (non-zero natural size); how
    many there are. An image that failed fails the test with its src."""
    script = """(sel) => {
        const imgs = [...document.querySelectorAll(sel)];
        if (!imgs.length) return null;
        return imgs.every((i) => i.complete && i.naturalWidth > 0) ? imgs.length : null;
    }"""
    try:
        return int(page.wait_for_function(script, arg=selector, timeout=20_000).json_value())
    except Exception as e:
        state = page.evaluate(
            """(sel) => [...document.querySelectorAll(sel)].map(
                (i) => `${i.alt}: src=${i.getAttribute("src")} complete=${i.complete} ` +
                       `natural=${i.naturalWidth}`)""",
            selector,
        )
        raise AssertionError(f"images under {selector} did not load: {state}") from e


def text_fits(page: Any, selector: str) -> None:
    """No element under `selector` cuts its text off (scrollWidth > clientWidth)."""
    over = page.evaluate(
        """(sel) => [...document.querySelectorAll(sel)].filter(
            (e) => e.clientWidth > 1 && e.scrollWidth > e.clientWidth + 1 &&
                   getComputedStyle(e).textOverflow !== "ellipsis" &&
                   !e.classList.contains("visually-hidden")
        ).map((e) => `${e.tagName} ${e.className} "${e.textContent.trim().slice(0, 40)}"`)""",
        selector,
    )
    assert not over, f"text overflows its box: {over}"


def ensure_library(server: Server) -> None:
    client = api(server)
    if not client.get("/images", params={"limit": 1}).json()["items"]:
        files = [("files", (p.name, p.read_bytes(), "image/png")) for p in server.library]
        assert client.post("/images", files=files).status_code == 202
    for _ in range(600):
        items = client.get("/images", params={"limit": 200}).json()["items"]
        if all(i["embedded"] for i in items):
            return
        time.sleep(0.2)
    raise AssertionError("the library was not embedded")


def no_horizontal_scroll(page: Any) -> bool:
    return bool(page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"))


def test_a_wrong_key_shows_the_api_message_and_is_not_kept(page, server):
    page.goto("/ui/")
    key_box = page.get_by_label("API key")
    # Well formed, unknown: the API's 401 message, verbatim.
    wrong = server.key[:-4] + ("AAAA" if not server.key.endswith("AAAA") else "BBBB")
    key_box.fill(wrong)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#signin-error")).to_have_text("invalid API key")
    # Malformed: the API says what a key looks like.
    key_box.fill("hunter2")
    key_box.press("Enter")
    expect(page.locator("#signin-error")).to_have_text(
        "invalid API key (expected polar_<prefix>_<secret>)"
    )
    assert page.evaluate("localStorage.getItem('polar.apiKey')") is None
    expect(page.locator("#nav")).to_be_hidden()
    # A key that stops working later sends the user back to sign in, with the reason.
    page.evaluate("k => localStorage.setItem('polar.apiKey', k)", wrong)
    page.goto("/ui/#library")
    expect(page.locator("#signin-error")).to_have_text("Signed out: invalid API key")
    assert page.evaluate("localStorage.getItem('polar.apiKey')") is None


def test_the_whole_story_in_the_browser(page, server, tmp_path):
    client = api(server)
    n = len(server.library)

    # Sign in; the key is kept for the next visit.
    sign_in(page, server.key)
    expect(page.locator("#view-search")).to_be_visible()
    assert page.evaluate("localStorage.getItem('polar.apiKey')") == server.key
    page.reload()
    expect(page.locator("#nav")).to_be_visible()

    # Library: upload by file picker, watch the embedding job, see the grid.
    nav(page, "Library")
    expect(page.locator("#library-count")).to_have_text("0 photos")
    page.get_by_label("Photos to upload").set_input_files([str(p) for p in server.library])
    expect(page.locator("#library-upload")).to_contain_text(
        f"Done: {n} new photos searchable.", timeout=120_000
    )
    cards = page.locator("#library-grid > li")
    expect(cards).to_have_count(n)
    expect(page.locator("#library-grid .badge.good")).to_have_count(n)  # "searchable"
    expect(page.locator("#library-count")).to_have_text(f"{n} photos")
    loaded_blob_images(page, "#library-grid .thumb img")

    # The same photo again (drag and drop): a duplicate, nothing new.
    dup = server.library[0]
    drop_files(page, "#library-drop", [(dup.name, dup.read_bytes(), "image/png")])
    expect(page.locator("#library-upload")).to_contain_text("Uploaded 0 new photos, 1 duplicate.")
    expect(page.locator("#library-upload .duplicates")).to_have_text(
        f"Already in your library: {dup.name}"
    )

    # A bad file in a drop: text renamed .png between two photos the library already has. It is
    # skipped with its reason (listed once, numbered from 1 in the drop) and the rest goes up,
    # as the CLI does; bytes going up are shown while they go.
    page.evaluate(
        """() => {
            window.sawBytes = false;
            new MutationObserver(() => {
                if (/ of .* sent/.test(document.getElementById("library-upload").textContent)) {
                    window.sawBytes = true;
                }
            }).observe(document.getElementById("library-upload"),
                       { childList: true, subtree: true, characterData: true });
        }"""
    )
    notes = b"these are my notes, not a picture\n"
    drop_files(
        page,
        "#library-drop",
        [
            (server.library[1].name, server.library[1].read_bytes(), "image/png"),
            ("notes.png", notes, "image/png"),
            (server.library[2].name, server.library[2].read_bytes(), "image/png"),
        ],
    )
    alone = client.post("/images", files=[("files", ("notes.png", notes, "image/png"))])
    assert alone.status_code in (415, 422), alone.text
    reason = alone.json()["error"]["detail"]["files"][0]["message"]
    expect(page.locator("#library-upload")).to_contain_text(
        "Uploaded 0 new photos, 2 duplicates, 1 skipped."
    )
    expect(page.locator("#library-upload .skipped")).to_contain_text("1 file skipped")
    rejection = page.locator("#library-rejections li")
    expect(rejection).to_have_count(1)
    expect(rejection).to_have_text(f"notes.png (file 2) — {reason}")
    expect(page.locator("#library-error")).to_be_hidden()
    assert page.evaluate("window.sawBytes") is True
    assert len(client.get("/images", params={"limit": 200}).json()["items"]) == n

    # Concepts: Fido from five photos; training progress, then ready with its quality.
    nav(page, "Concepts")
    expect(page.locator("#concepts-list")).to_contain_text("No concepts yet")
    teach = page.get_by_role("button", name="Teach concept")
    # Too few photos: the API's message (nothing is created).
    too_few = client.post(
        "/concepts",
        data={"name": "Fido"},
        files=[("files", (p.name, p.read_bytes(), "image/png")) for p in server.photos[:2]],
    )
    assert too_few.status_code == 422, too_few.text
    page.get_by_label("Name").fill("Fido")
    page.get_by_label("Photos (3–13)").set_input_files([str(p) for p in server.photos[:2]])
    teach.click()
    expect(page.locator("#concept-error")).to_have_text(too_few.json()["error"]["message"])
    # Five photos: the button is disabled while the request runs, the training job's progress
    # shows, then the concept is ready with its quality.
    page.evaluate(
        """() => {
            const button = document.getElementById("concept-submit");
            window.submitWasDisabled = false;
            new MutationObserver(() => {
                if (button.disabled) window.submitWasDisabled = true;
            }).observe(button, { attributes: true });
        }"""
    )
    page.get_by_label("Category").fill(FIDO_CATEGORY)
    page.get_by_label("Photos (3–13)").set_input_files([str(p) for p in server.photos])
    expect(page.locator("#concept-previews img")).to_have_count(5)
    teach.click()
    fido = page.locator('#concepts-list li[data-state="ready"]', has_text="Fido")
    expect(fido).to_be_visible(timeout=120_000)
    expect(page.locator("#concept-progress")).to_contain_text("Fido is ready")
    expect(page.locator("#concept-error")).to_be_hidden()
    expect(teach).to_be_enabled()
    assert page.evaluate("window.submitWasDisabled") is True
    concept = client.get("/concepts").json()["items"][0]
    # In words: ready, learned from five photos; no placeholder token, no raw numbers.
    expect(fido.locator(".state")).to_have_text("Ready")
    expect(fido).to_contain_text("Learned in")
    expect(fido).to_contain_text("from 5 photos. Use its name in a search.")
    expect(fido).to_contain_text(f"A {FIDO_CATEGORY} of yours · version 1")
    assert concept["placeholder"] not in fido.inner_text()
    assert "Retention" not in fido.inner_text() and "loss" not in fido.inner_text()
    expect(fido.locator(".flagged")).to_have_count(1 if concept["retention_flagged"] else 0)
    # The photos it learned from, as thumbnails.
    # How well it stands out from the library, in words (measured when it was trained).
    expect(fido).to_contain_text("library photos checked")
    expect(fido.locator(".concept-photos img")).to_have_count(5)
    fido.locator(".concept-photos").scroll_into_view_if_needed()
    loaded_blob_images(page, "#concepts-list .concept-photos img")

    # Search by its name, from the keyboard: personalized, the concept applied.
    nav(page, "Search")
    expect(page.get_by_label("Search your photos")).to_be_focused()
    page.keyboard.type("Fido on the beach")
    page.keyboard.press("Enter")
    summary = page.locator("#search-summary")
    expect(summary.locator(".badge.good")).to_have_text("Personalized")
    chip = summary.locator('.chip[data-concept="Fido"]')
    expect(chip).to_have_class(re.compile(r"\bapplied\b"))
    expect(chip).to_have_text("Fido v1 · applied")
    expect(summary.locator(".rewritten")).to_have_text(f"{concept['placeholder']} on the beach")
    expect(summary.locator(".model")).to_contain_text(DEMO_MODEL_NAME)
    hits = page.locator("#search-results > li")
    expect(hits).to_have_count(min(24, n))
    expect(hits.first.locator(".rank")).to_have_text("#1")
    names = hits.locator(".name").all_text_contents()
    assert "fido-beach.png" in names[:2], names[:5]
    first_srcs = loaded_blob_images(page, "#search-results .thumb img")

    # docs/ui.png: the search view down to the second row of results.
    second_row = hits.nth(13).bounding_box()
    assert second_row is not None
    bottom = second_row["y"] + second_row["height"] + 10  # half the grid gap
    shot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "ui.png")
    page.screenshot(path=str(shot), clip={"x": 0, "y": 0, "width": 1280, "height": bottom})
    assert shot.stat().st_size > 10_000

    # Plain CLIP for comparison; the old thumbnails' blob: URLs are revoked.
    page.get_by_label("Personalize with my concepts").uncheck()
    expect(summary.locator(".badge").first).to_have_text("Plain CLIP")
    expect(summary.locator(".chip.applied")).to_have_count(0)
    loaded_blob_images(page, "#search-results .thumb img")
    revoked = page.evaluate(
        """(url) => new Promise((resolve) => {
            const probe = new Image();
            probe.onload = () => resolve(false);
            probe.onerror = () => resolve(true);
            probe.src = url;
        })""",
        first_srcs[0],
    )
    assert revoked, "a replaced thumbnail's blob: URL must be revoked"

    # Two searches in quick succession whose answers arrive out of order: the newer one's
    # answer stays (here the first, 24 per page, is held back 1.5 s).
    page.evaluate(
        """() => {
            window.realFetch = window.fetch;
            window.fetch = async (url, init) => {
                const answer = await window.realFetch(url, init);
                if (/[/]search[?].*k=24/.test(String(url))) {
                    await new Promise((resolve) => setTimeout(resolve, 1500));
                }
                return answer;
            };
        }"""
    )
    page.get_by_label("Personalize with my concepts").check()
    page.get_by_label("Per page").select_option("12")
    page.wait_for_timeout(2000)
    page.evaluate("window.fetch = window.realFetch")

    # Paging with offset.
    expect(page.locator("#search-range")).to_have_text(f"Page 1 of {-(-n // 12)}")
    expect(hits).to_have_count(12)
    expect(summary.locator(".badge").first).to_have_text("Personalized")
    expect(page.get_by_role("button", name="← Previous")).to_be_disabled()
    page.get_by_role("button", name="Next →").click()
    expect(hits.first.locator(".rank")).to_have_text("#13")
    expect(summary.locator(".headline")).to_contain_text(f"Results 13–{min(24, n)} for")
    page.get_by_role("button", name="← Previous").click()
    expect(hits.first.locator(".rank")).to_have_text("#1")

    # What the API says about pending images, warnings and re-ranking is shown as it says it.
    def doctored(route: Any) -> None:
        body = route.fetch().json()
        body |= {"pending": 3, "reranked": True, "warnings": ["<b>not markup</b>"]}
        route.fulfill(json=body)

    page.route(re.compile(r".*/search\?.*"), doctored)
    page.get_by_role("button", name="Search", exact=True).click()
    expect(summary.locator(".pending")).to_have_text(
        "3 images are still being embedded and not searchable yet."
    )
    expect(summary.locator(".warnings li")).to_have_text("<b>not markup</b>")
    expect(summary.locator("b")).to_have_count(0)
    expect(summary.locator(".badge.info")).to_have_text("Re-ranked by regions")
    page.unroute(re.compile(r".*/search\?.*"))

    # Index status and a rebuild.
    nav(page, "Index")
    stats = page.locator("#index-stats")
    expect(stats.locator('[data-stat="images"] dd')).to_have_text(str(n))
    expect(stats.locator('[data-stat="embedded"] dd')).to_have_text(str(n))
    expect(stats.locator('[data-stat="pending"] dd')).to_have_text("0")
    expect(stats.locator('[data-stat="with_regions"] dd')).to_have_text(str(n))
    expect(stats.locator('[data-stat="model"] dd')).to_contain_text(DEMO_MODEL_NAME)
    page.get_by_role("button", name="Rebuild").click()
    expect(page.locator("#index-progress")).to_contain_text("Rebuild finished.")
    expect(page.get_by_role("button", name="Rebuild")).to_be_enabled()

    # Delete a photo (after confirming).
    nav(page, "Library")
    expect(cards).to_have_count(n)
    victim = server.library[-1].name
    page.once("dialog", lambda d: d.accept())
    victim_card = cards.filter(has=page.get_by_text(victim, exact=True))
    bring_into_view(victim_card)
    click(page, victim_card.get_by_role("button", name=f"Delete {victim}", exact=True), ".card")
    expect(cards).to_have_count(n - 1)
    expect(page.locator("#library-count")).to_have_text(f"{n - 1} photos")
    items = client.get("/images", params={"limit": 200}).json()["items"]
    remaining = [i["filename"] for i in items]
    assert victim not in remaining and len(remaining) == n - 1
    # Declining the confirmation keeps it.
    page.once("dialog", lambda d: d.dismiss())
    page.get_by_role("button", name=f"Delete {server.library[0].name}", exact=True).click()
    expect(cards).to_have_count(n - 1)

    # Phone, laptop and desktop widths: everything still fits, no text is cut off.
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 844 if width < 600 else 900})
        for view in ("Search", "Library", "Concepts", "Index"):
            nav(page, view)
            page.wait_for_timeout(200)
            assert no_horizontal_scroll(page), (view, width)
            text_fits(page, "main *:not(input):not(select):not(textarea)")

    # Sign out: the key is gone from the browser.
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    assert page.evaluate("localStorage.getItem('polar.apiKey')") is None
    page.reload()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()


def test_ui_responses_carry_the_security_headers(browser, server):
    context = browser.new_context(base_url=server.base)
    try:
        page = context.new_page()
        response = page.goto("/ui/")
        assert response is not None
        csp = response.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "img-src 'self' blob: data:" in csp
        # The policy holds in the browser: an injected inline script does not run.
        outcome = page.evaluate(
            """() => new Promise((resolve) => {
                document.addEventListener("securitypolicyviolation", (e) =>
                    resolve(`blocked ${e.violatedDirective}`));
                const s = document.createElement("script");
                s.textContent = "window.inlineRan = true";
                document.body.append(s);
                setTimeout(() => resolve(window.inlineRan ? "ran" : "silent"), 1000);
            })"""
        )
        assert outcome.startswith("blocked script-src"), outcome
    finally:
        context.close()


# -- concepts a person can manage (these run after the story above, on its library) ----------


def ready_concept(client: httpx.Client, name: str, category: str, photos: list[Path]) -> dict:
    """A concept taught through the API and trained to `ready`."""
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in photos]
    r = client.post("/concepts", data={"name": name, "category": category}, files=files)
    assert r.status_code == 202, r.text
    wait_ready(client, r.json()["concept"]["id"])
    return dict(r.json()["concept"])


def wait_ready(client: httpx.Client, concept_id: str) -> dict:
    import time

    for _ in range(600):
        concept = client.get(f"/concepts/{concept_id}").json()
        if concept["state"] != "training":
            assert concept["state"] == "ready", concept
            return dict(concept)
        time.sleep(0.2)
    raise AssertionError("training did not finish")


def test_manage_a_concept_in_the_browser(page, server, tmp_path):
    client = api(server)
    if not client.get("/images", params={"limit": 1}).json()["items"]:
        files = [("files", (p.name, p.read_bytes(), "image/png")) for p in server.library]
        assert client.post("/images", files=files).status_code == 202
    concept = ready_concept(client, "Biscuit", FIDO_CATEGORY, server.photos[:3])
    cid = concept["id"]
    sign_in(page, server.key)
    nav(page, "Concepts")
    card = page.locator(f'#concepts-list li[data-concept-id="{cid}"]')
    expect(card.locator(".state")).to_have_text("Ready")
    expect(card.locator(".concept-photos img")).to_have_count(3)

    # Rename onto a taken name: the API's message on the card, nothing changes.
    others = [c["name"] for c in client.get("/concepts").json()["items"] if c["id"] != cid]
    taken = (
        others[0] if others else ready_concept(client, "Pebble", "ball", server.photos[2:])["name"]
    )
    page.get_by_role("button", name="Edit Biscuit").click()
    card.get_by_label("Name").fill(taken.upper())
    card.get_by_role("button", name="Save").click()
    expect(card.locator("p.alert")).to_contain_text("you already have a concept named")
    assert client.get(f"/concepts/{cid}").json()["name"] == "Biscuit"
    # A free name: renamed, nothing retrains.
    card.get_by_label("Name").fill("Cookie")
    card.get_by_role("button", name="Save").click()
    expect(card.locator("h3")).to_have_text("Cookie")
    assert client.get(f"/concepts/{cid}").json()["version"] == 1

    # A new category retrains: learning, then ready as version 2.
    page.get_by_role("button", name="Edit Cookie").click()
    card.get_by_label("Category (changing it retrains)").fill("ball")
    card.get_by_role("button", name="Save").click()
    expect(card).to_contain_text("A ball of yours · version 2")
    expect(card.locator(".state")).to_have_text("Ready", timeout=120_000)

    # More photos from disk: a bad file adds nothing and says why; a good one is a new version.
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"not a picture")
    card.get_by_label("Add photos of Cookie").set_input_files([str(bad)])
    expect(card.locator("p.alert")).to_contain_text("Nothing was added (notes.png:")
    assert client.get(f"/concepts/{cid}").json()["version"] == 2
    card.get_by_label("Add photos of Cookie").set_input_files([str(server.photos[3])])
    expect(card).to_contain_text("version 3")
    expect(card.locator(".state")).to_have_text("Ready", timeout=120_000)
    expect(card.locator(".concept-photos img")).to_have_count(4)

    # "This is Cookie" from library photos ("Pick from library" preselects it).
    page.get_by_role("button", name="Pick photos of Cookie from the library").click()
    expect(page.locator("#view-library")).to_be_visible()
    first, second = server.library[4].name, server.library[5].name
    page.get_by_label(f"Select {first}", exact=True).check()
    page.get_by_label(f"Select {second}", exact=True).check()
    bar = page.locator("#selection")
    expect(bar.locator("#selection-count")).to_have_text("2 photos selected")
    expect(bar.get_by_role("button", name="This is Cookie")).to_be_visible()
    bar.get_by_role("button", name="This is Cookie").click()
    expect(page.locator("#view-concepts")).to_be_visible()
    expect(bar).to_be_hidden()
    fresh = client.get(f"/concepts/{cid}").json()
    assert (fresh["version"], fresh["example_count"]) == (4, 6)
    expect(card.locator(".state")).to_have_text("Ready", timeout=120_000)
    # The same photos again: nothing new, the API says so in the bar; nothing changes.
    nav(page, "Library")
    page.get_by_label(f"Select {first}", exact=True).check()
    expect(page.locator("#selection-concept option", has_text="Cookie")).to_have_count(1)
    page.locator("#selection-concept").select_option(label="Cookie")
    bar.get_by_role("button", name="This is Cookie").click()
    expect(page.locator("#selection-error")).to_contain_text("already a photo of this concept")
    assert client.get(f"/concepts/{cid}").json()["version"] == 4
    bar.get_by_role("button", name="Clear").click()
    expect(bar).to_be_hidden()

    # Delete, after confirming; declining keeps it. The question says the library's photos stay.
    nav(page, "Concepts")
    asked: list[str] = []
    page.once("dialog", lambda d: (asked.append(d.message), d.dismiss()))
    delete = page.get_by_role("button", name="Delete concept Cookie")
    bring_into_view(delete)  # the card, with its album button and photos, can be a screen tall
    click(page, delete, ".concept")
    expect(card).to_be_visible()
    assert "with its photos" not in asked[0], asked
    assert "Your library keeps every photo" in asked[0], asked
    page.once("dialog", lambda d: d.accept())
    page.get_by_role("button", name="Delete concept Cookie").click()
    expect(card).to_have_count(0)
    assert client.get(f"/concepts/{cid}").status_code == 404


def test_teach_a_new_concept_from_search_hits(page, server):
    client = api(server)
    if not client.get("/images", params={"limit": 1}).json()["items"]:
        files = [("files", (p.name, p.read_bytes(), "image/png")) for p in server.library]
        assert client.post("/images", files=files).status_code == 202
    sign_in(page, server.key)
    page.get_by_label("Search your photos").fill("a hat in the snow")
    page.get_by_label("Search your photos").press("Enter")
    hits = page.locator("#search-results > li")
    expect(hits.first).to_be_visible()
    names = hits.locator(".name").all_text_contents()[:3]
    for i, name in enumerate(names):
        bring_into_view(hits.nth(i))
        click(page, hits.nth(i).get_by_label(f"Select {name}", exact=True), ".card")
    click(page, page.get_by_role("button", name="Teach a new concept"), "#selection")
    expect(page.locator("#view-concepts")).to_be_visible()
    expect(page.locator("#concept-previews .library-pick img")).to_have_count(3)
    assert images_loaded(page, "#concept-previews img") == 3
    expect(page.locator("#concept-previews")).to_contain_text("3 photos (3 from your library)")
    # No name: said in words, nothing sent.
    page.get_by_role("button", name="Teach concept").click()
    expect(page.locator("#concept-error")).to_contain_text("Give the concept a name")
    page.locator("#concept-form").get_by_label("Name", exact=True).fill("Trio")
    page.get_by_role("button", name="Teach concept").click()
    trio = page.locator('#concepts-list li[data-state="ready"]', has_text="Trio")
    expect(trio).to_be_visible(timeout=120_000)
    expect(trio.locator(".concept-photos img")).to_have_count(3)
    created = next(c for c in client.get("/concepts").json()["items"] if c["name"] == "Trio")
    photos = client.get(f"/concepts/{created['id']}/examples").json()["items"]
    library = {
        i["sha256"]: i["filename"]
        for i in client.get("/images", params={"limit": 200}).json()["items"]
    }
    assert sorted(library[p["sha256"]] for p in photos) == sorted(names)
    assert client.delete(f"/concepts/{created['id']}").status_code == 204


def test_search_speaks_plainly_guides_filters_and_clears_on_error(page, server, tmp_path):
    client = api(server)
    if not client.get("/images", params={"limit": 1}).json()["items"]:
        files = [("files", (p.name, p.read_bytes(), "image/png")) for p in server.library]
        assert client.post("/images", files=files).status_code == 202
    sign_in(page, server.key)
    # The demo model serves: a banner says real photos will not work, on every view.
    banner = page.locator("#demo-banner")
    expect(banner).to_contain_text("Demo model: searches know only the demo's generated pictures")
    nav(page, "Library")
    expect(banner).to_be_visible()
    nav(page, "Search")
    # Nothing searched yet: the getting-started guide, with where the user stands.
    guide = page.locator("#search-guide")
    expect(guide).to_be_visible()
    expect(guide).to_contain_text("Upload your photos")
    expect(page.locator("#guide-status")).to_contain_text("You have ")

    # A name the user never taught: a hint, the search ran plain.
    page.get_by_label("Search your photos").fill("Zorro on the beach")
    page.get_by_label("Search your photos").press("Enter")
    hits = page.locator("#search-results > li")
    expect(hits.first).to_be_visible()
    expect(guide).to_be_hidden()
    expect(page.locator("#search-hint")).to_contain_text("“Zorro” is not one of your concepts")
    # A lower-case query names nothing that looks like a name: no hint.
    page.get_by_label("Search your photos").fill("a hat on the beach")
    page.get_by_label("Search your photos").press("Enter")
    expect(page.locator("#search-hint")).to_be_hidden()
    expect(hits.first).to_be_visible()

    # Type and date filters (the photos are PNGs, taken when their files were written). A
    # filter that leaves nothing is named, with what to change.
    empty = page.locator("#search-empty")
    page.get_by_label("Type").select_option("image/jpeg")
    expect(page.locator("#search-summary .headline")).to_contain_text("No results for")
    expect(hits).to_have_count(0)
    expect(empty).to_contain_text("No photo is a JPEG (the “Type” filter)")
    expect(empty).to_contain_text("choose another type")
    expect(empty).not_to_contain_text("dates")
    page.get_by_label("Type").select_option("image/png")
    expect(hits.first).to_be_visible()
    expect(empty).to_be_hidden()
    page.get_by_label("Taken from").fill("2001-01-01")
    page.get_by_label("to", exact=True).fill("2001-12-31")
    page.get_by_label("to", exact=True).dispatch_event("change")
    expect(hits).to_have_count(0)
    expect(empty).to_contain_text("No photo was taken from")
    expect(empty).to_contain_text("2001")
    expect(empty).to_contain_text("widen or clear the dates")
    expect(empty).not_to_contain_text("Type")
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 844 if width < 600 else 900})
        bring_into_view(empty)
        text_fits(page, "#search-empty, #search-empty *")
        shot(page, tmp_path, f"search-no-results-{width}")
        reachable(empty.get_by_role("button", name="Clear the filters"), "#search-empty")
    click(page, empty.get_by_role("button", name="Clear the filters"), "#search-empty")
    expect(hits.first).to_be_visible()
    expect(empty).to_be_hidden()
    expect(page.get_by_label("Taken from")).to_have_value("")
    expect(page.get_by_label("Type")).to_have_value("")

    # An error clears the old results: they answered another query.
    expect(page.get_by_role("button", name="Search", exact=True)).to_be_enabled()
    too_long = " ".join(["hat"] * 300)
    page.get_by_label("Search your photos").fill(too_long)
    page.get_by_label("Search your photos").press("Enter")
    expect(page.locator("#search-error")).to_contain_text("token")
    expect(hits).to_have_count(0)
    expect(page.locator("#search-summary")).to_be_empty()


def _noise_png(seed: int) -> bytes:
    from PIL import Image

    rng = __import__("random").Random(seed)
    return _png(Image.frombytes("RGB", (48, 40), bytes(rng.randrange(256) for _ in range(5760))))


def test_folders_on_the_server_in_the_browser(page, server, tmp_path):
    """A folder indexed in place: refused paths say why, the report in words, scan, remove."""
    client = api(server)
    trip = server.folders / "trip"
    trip.mkdir()
    for i in range(3):
        (trip / f"trip-{i}.png").write_bytes(_noise_png(100 + i))
    (trip / "notes.png").write_bytes(b"not a picture")
    sign_in(page, server.key)
    nav(page, "Library")
    expect(page.locator("#folders-hint")).to_contain_text(f"Folders under {server.folders}")
    path = page.get_by_label("Folder path on the server")
    add = page.get_by_role("button", name="Add folder")

    # Refused: outside the allowed root, relative, missing. Nothing is added.
    for bad, says in (
        ("/etc", "outside the allowed library roots"),
        ("trip", "give an absolute path"),
        (str(server.folders / "nowhere"), "is not an existing folder"),
    ):
        path.fill(bad)
        add.click()
        expect(page.locator("#folder-error")).to_contain_text(says)
    assert client.get("/libraries").json()["items"] == []

    # Added: scanned with its progress, the report in words, the skipped file and why.
    path.fill(str(trip))
    add.click()
    item = page.locator("#folder-list li.folder")
    expect(item).to_have_count(1)
    expect(item.locator(".folder-path")).to_have_text(str(trip))
    expect(item.locator(".folder-report")).to_contain_text("3 photos added", timeout=120_000)
    expect(item.locator(".folder-report")).to_contain_text("1 file skipped")
    expect(page.locator("#folder-error")).to_be_hidden()
    item.locator("summary").click()
    expect(item.locator(".folder-skipped li")).to_contain_text(f"{trip / 'notes.png'}: ")
    grid = page.locator("#library-grid")
    for i in range(3):
        expect(grid.get_by_text(f"trip-{i}.png", exact=True)).to_be_visible()
    # Newest first, and a folder's photos are marked as such (uploads are not).
    cards = grid.locator("> li")
    expect(cards.locator(".badge.source")).to_have_count(3)
    assert sorted(cards.locator(".name").all_text_contents()[:3]) == [
        f"trip-{i}.png" for i in range(3)
    ]
    for i in range(3):
        expect(cards.nth(i).locator(".badge.source")).to_have_text("folder")

    # A new photo in the folder, "Scan now": one added, the rest unchanged.
    (trip / "trip-3.png").write_bytes(_noise_png(103))
    page.get_by_role("button", name=f"Scan {trip} now").click()
    expect(item.locator(".folder-report")).to_contain_text("1 photo added", timeout=120_000)
    expect(item.locator(".folder-report")).to_contain_text("3 photos unchanged")
    expect(grid.get_by_text("trip-3.png", exact=True)).to_be_visible()

    # A library the watcher cannot watch says why, in full, under its report (the watcher
    # writes watch_error; it is off in this server, so the row is set as the watcher would).
    why = "its folder is a link now (never followed) or not a folder; periodic rescans still run"
    with sqlite3.connect(server.folders.parent / "data" / "polar.db") as db:
        db.execute("UPDATE libraries SET watch_error = ?", (why,))
    page.get_by_role("button", name=f"Scan {trip} now").click()
    note = item.locator(".folder-watch")
    expect(note).to_have_text(f"Not watched: {why}", timeout=120_000)
    box, width = note.bounding_box(), page.viewport_size["width"]
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width, box
    assert note.evaluate("e => e.scrollWidth <= e.clientWidth"), "the note is cut off"
    page.screenshot(path=str(tmp_path / "folders.png"), full_page=True)

    # Remove, after confirming (declining keeps it); the files stay, the photos leave.
    page.once("dialog", lambda d: d.dismiss())
    page.get_by_role("button", name=f"Remove {trip}").click()
    expect(item).to_have_count(1)
    page.once("dialog", lambda d: d.accept())
    page.get_by_role("button", name=f"Remove {trip}").click()
    expect(item).to_have_count(0)
    expect(grid.get_by_text("trip-0.png", exact=True)).to_have_count(0)
    assert client.get("/libraries").json()["items"] == []
    assert sorted(p.name for p in trip.iterdir()) == [
        "notes.png", "trip-0.png", "trip-1.png", "trip-2.png", "trip-3.png"
    ]  # fmt: skip


# -- as a person sees it: at phone, laptop and desktop widths ---------------------------------

SHOTS_ENV = "POLAR_UI_SHOTS"  # a folder: the screenshots below are also written there


def shot(page: Any, tmp_path: Path, name: str, **kwargs: Any) -> Path:
    folder = Path(os.environ.get(SHOTS_ENV) or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), **kwargs)
    return path


def test_library_cards_can_be_used_at_every_width(page, server, tmp_path):
    """Each card's open, select and delete controls lie inside the card and the viewport and
    take the click at their centre; nothing in a card is cut off; the thumbnails load."""
    ensure_library(server)
    client = api(server)
    n = len(client.get("/images", params={"limit": 200}).json()["items"])
    sign_in(page, server.key)
    nav(page, "Library")
    cards = page.locator("#library-grid > li")
    expect(cards).to_have_count(n)
    # Newest first, as the API lists them when asked.
    newest = client.get("/images", params={"limit": 200, "order": "newest"}).json()["items"]
    assert cards.locator(".name").all_text_contents() == [i["filename"] for i in newest]
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 844 if width < 600 else 900})
        for i in (0, 1, n - 1):
            card = cards.nth(i)
            bring_into_view(card)
            name = card.locator(".name").inner_text()
            reachable(card.get_by_role("button", name=f"Open {name}"), ".card")
            reachable(card.get_by_label(f"Select {name}", exact=True), ".card")
            reachable(card.locator("label.pick"), ".card")
            reachable(card.get_by_role("button", name=f"Delete {name}", exact=True), ".card")
            images_loaded(page, f"#library-grid > li:nth-child({i + 1}) img")
        text_fits(page, "#library-grid .card, #library-grid .card *")
        assert no_horizontal_scroll(page), width
        bring_into_view(cards.first)
        shot(page, tmp_path, f"library-{width}")
        # The clicks land: select, unselect, and delete (declined at the prompt).
        first = cards.first.locator(".name").inner_text()
        box = cards.first.get_by_label(f"Select {first}", exact=True)
        click(page, box, ".card")
        expect(page.locator("#selection-count")).to_have_text("1 photo selected")
        click(page, box, ".card")
        expect(page.locator("#selection")).to_be_hidden()
        page.once("dialog", lambda d: d.dismiss())
        click(page, cards.first.get_by_role("button", name=f"Delete {first}", exact=True), ".card")
        expect(cards).to_have_count(n)

        # The photo viewer: previous and next through the grid, by button and arrow key.
        names = cards.locator(".name").all_text_contents()
        click(page, cards.first.get_by_role("button", name=f"Open {first}"), ".card")
        viewer = page.locator("#viewer")
        expect(viewer.locator("#viewer-title")).to_have_text(names[0])
        expect(viewer.locator("#viewer-position")).to_have_text(f"1 of {n}")
        expect(viewer.get_by_role("button", name="Previous photo")).to_be_disabled()
        images_loaded(page, "#viewer-img")
        click(page, viewer.get_by_role("button", name="Next photo"), "#viewer")
        expect(viewer.locator("#viewer-title")).to_have_text(names[1])
        expect(viewer.locator("#viewer-position")).to_have_text(f"2 of {n}")
        images_loaded(page, "#viewer-img")
        text_fits(page, "#viewer, #viewer *")
        shot(page, tmp_path, f"viewer-{width}")
        page.keyboard.press("ArrowLeft")
        expect(viewer.locator("#viewer-title")).to_have_text(names[0])
        click(page, viewer.get_by_role("button", name="Close"), "#viewer")
        expect(viewer).to_be_hidden()


def test_a_drop_right_after_an_upload_is_taken_while_the_grid_reloads(page, server):
    """Once an upload's summary shows, the next drop is taken, even while the grid behind it is
    still reloading (a slow listing used to hold the upload open, and the second drop was turned
    away with "An upload is still running")."""
    ensure_library(server)
    client = api(server)
    n = len(client.get("/images", params={"limit": 200}).json()["items"])
    sign_in(page, server.key)
    nav(page, "Library")
    cards = page.locator("#library-grid > li")
    expect(cards).to_have_count(n)
    held: list[Any] = []

    def hold_listings(route: Any) -> None:
        if route.request.method == "GET":
            held.append(route)
        else:
            route.continue_()

    page.route(re.compile(r"/images\?"), hold_listings)
    first, second = server.library[0], server.library[1]
    drop_files(page, "#library-drop", [(first.name, first.read_bytes(), "image/png")])
    status = page.locator("#library-upload")
    expect(status).to_contain_text("Uploaded 0 new photos, 1 duplicate.")
    expect(status.locator(".duplicates")).to_have_text(f"Already in your library: {first.name}")
    drop_files(page, "#library-drop", [(second.name, second.read_bytes(), "image/png")])
    expect(status.locator(".duplicates")).to_have_text(f"Already in your library: {second.name}")
    expect(page.locator("#toast")).not_to_contain_text("still running")
    assert held, "the grid's reload was not held: the test did not test the race"
    for route in held:
        route.continue_()
    page.unroute(re.compile(r"/images\?"))
    expect(cards).to_have_count(n)


def test_library_photos_picked_for_a_new_concept_show_in_the_teach_form(page, server, tmp_path):
    ensure_library(server)
    sign_in(page, server.key)
    page.set_viewport_size({"width": 390, "height": 844})
    nav(page, "Library")
    cards = page.locator("#library-grid > li")
    expect(cards.first).to_be_visible()
    names = []
    for i in range(3):
        bring_into_view(cards.nth(i))
        name = cards.nth(i).locator(".name").inner_text()
        click(page, cards.nth(i).get_by_label(f"Select {name}", exact=True), ".card")
        names.append(name)
    bar = page.locator("#selection")
    expect(bar.locator("#selection-count")).to_have_text("3 photos selected")
    click(page, bar.get_by_role("button", name="Teach a new concept"), "#selection")
    expect(page.locator("#view-concepts")).to_be_visible()
    previews = page.locator("#concept-previews .library-pick img")
    expect(previews).to_have_count(3)
    assert images_loaded(page, "#concept-previews img") == 3
    assert sorted(previews.evaluate_all("(imgs) => imgs.map((i) => i.alt)")) == sorted(names)
    bring_into_view(page.locator("#concept-previews"))
    shot(page, tmp_path, "teach-from-library-390")


def test_the_demo_model_note_is_one_line_and_stays_dismissed_until_the_next_sign_in(
    page, server, tmp_path
):
    ready = httpx.get(f"{server.base}/readyz").json()
    assert ready["demo_model"] is True
    page.set_viewport_size({"width": 390, "height": 844})
    sign_in(page, server.key)
    banner = page.locator("#demo-banner")
    expect(banner).to_be_visible()
    words = banner.locator("p").inner_text()
    # One sentence or two, in words: what it means and the one setting that changes it.
    assert "\n" not in words.strip() and len(words) < 200, words
    assert "POLAR_MODEL__PRETRAINED" in words and "demo" in words.lower()
    assert not re.search(r"(^|[\s(=])(/|~/)\w", words), f"a path in the note: {words}"
    height = banner.bounding_box()["height"]
    assert height <= 0.2 * 844, f"the note fills {height} px of a phone's first screen"
    text_fits(page, "#demo-banner, #demo-banner *")
    shot(page, tmp_path, "demo-note-390")
    for view in ("Library", "Concepts", "Index", "Search"):
        nav(page, view)
        expect(banner).to_be_visible()
    click(page, banner.get_by_role("button", name="Dismiss the demo-model note"), "#demo-banner")
    expect(banner).to_be_hidden()
    for view in ("Library", "Search"):
        nav(page, view)
        expect(banner).to_be_hidden()
    page.reload()
    expect(page.locator("#nav")).to_be_visible()
    expect(banner).to_be_hidden()
    # Signed out and in again: the note is back.
    page.get_by_role("button", name="Sign out").click()
    expect(banner).to_be_hidden()
    sign_in(page, server.key)
    expect(banner).to_be_visible()


def test_a_concepts_album_and_its_marks_in_the_browser(page, server, tmp_path):
    """A concept card opens its album in a panel across the whole Concepts view (thumbnails in
    a grid, confidence in words; ✕ or Escape closes it); one click says "not it" or "it is",
    Undo takes it back; search hits carry the same actions; a mark that cannot be made (the
    concept is gone) says why."""
    client = api(server)
    ensure_library(server)
    cid = ready_concept(client, "Sunny", FIDO_CATEGORY, server.photos[:4])["id"]
    total = client.get(f"/concepts/{cid}/photos", params={"limit": 200}).json()["total"]
    assert total > 0
    sign_in(page, server.key)
    nav(page, "Concepts")
    card = page.locator(f'#concepts-list li[data-concept-id="{cid}"]')
    expect(card.locator(".state")).to_have_text("Ready")
    bring_into_view(card)
    opener = card.get_by_role("button", name="Every photo of Sunny")
    click(page, opener, ".concept")
    expect(opener).to_have_attribute("aria-expanded", "true")
    panel = page.locator("#concept-album")
    album = panel.get_by_role("region", name="Album of Sunny")
    expect(panel.get_by_role("heading", name="Every photo of Sunny")).to_be_visible()
    expect(album.locator(".album-summary")).not_to_have_text("Looking…")
    expect(album.locator(":scope > p.alert")).to_be_hidden()
    photos = album.locator(".album-photo")
    expect(photos).to_have_count(min(total, 24))
    expect(album.locator(".album-summary")).to_contain_text(f"{total} photo")
    sel = "#concept-album .album-photo img"
    words = album.locator(".confidence").all_text_contents()
    assert all(
        re.match(r"(As sure as its own photos|Likely|Possibly|Unlikely by its look)", w)
        for w in words
    ), words
    close = panel.get_by_role("button", name="Close the album of Sunny")
    for width, height in ((1280, 900), (390, 844)):
        page.set_viewport_size({"width": width, "height": height})
        # The panel spans the view's content width (as wide as the list of cards), and the
        # photos lie in rows of several, each thumbnail a real, readable size.
        panel_box, list_box = panel.bounding_box(), page.locator("#concepts-list").bounding_box()
        assert panel_box and list_box
        assert abs(panel_box["width"] - list_box["width"]) <= 1, (panel_box, list_box)
        boxes = [photos.nth(i).locator("img").bounding_box() for i in range(photos.count())]
        assert all(b and b["width"] >= 120 for b in boxes), boxes
        per_row = sum(1 for b in boxes if b and abs(b["y"] - boxes[0]["y"]) < 1)  # type: ignore[index]
        assert per_row >= min(5 if width >= 1200 else 2, len(boxes)), (
            width,
            per_row,
            panel_box,
            album.locator(".album-photos").evaluate(
                "(e) => getComputedStyle(e).gridTemplateColumns"
            ),
        )
        assert no_horizontal_scroll(page)
        text_fits(page, "#concept-album")
        reachable(close, ".album-panel")
        for i in (0, photos.count() - 1):
            bring_into_view(photos.nth(i))  # thumbnails load as they scroll into view
            name = photos.nth(i).locator("img").get_attribute("alt")
            reachable(
                photos.nth(i).get_by_role("button", name=f"{name} is not Sunny", exact=True),
                ".album-photo",
            )
            reachable(
                photos.nth(i).get_by_role("button", name=f"{name} is Sunny", exact=True),
                ".album-photo",
            )
        assert images_loaded(page, sel) == min(total, 24)
        # Opened again at this width: the page shows the panel from its heading, below the
        # sticky top bar, thumbnails loaded; that view is the screenshot.
        click(page, close, ".album-panel")
        expect(panel).to_be_hidden()
        click(page, opener, ".concept")
        heading = panel.get_by_role("heading", name="Every photo of Sunny")
        uncovered = heading.evaluate(
            """(h) => { const r = h.getBoundingClientRect();
                        const at = document.elementFromPoint(r.left + 5, r.top + r.height / 2);
                        return r.top >= 0 && !!at && h.contains(at); }"""
        )
        assert uncovered, f"the album's heading is hidden at {width} px when it opens"
        images_loaded(page, "#concept-album .album-photo:nth-child(-n+2) img")
        shot(page, tmp_path, f"album-{width}")
    page.set_viewport_size({"width": 1280, "height": 900})
    # Escape closes it (focus back on the card's button), and the button opens it again.
    page.keyboard.press("Escape")
    expect(panel).to_be_hidden()
    expect(opener).to_have_attribute("aria-expanded", "false")
    expect(opener).to_be_focused()
    click(page, opener, ".concept")
    expect(photos).to_have_count(min(total, 24))
    # ✕ closes it as well; open again for the marks below.
    click(page, close, ".album-panel")
    expect(panel).to_be_hidden()
    click(page, opener, ".concept")
    expect(photos).to_have_count(min(total, 24))

    # "Not Sunny": marked, kept by the server (history too), gone from the album it serves.
    first = photos.first
    name = first.locator("img").get_attribute("alt")
    image_id = first.get_attribute("data-image-id")
    bring_into_view(first)
    click(
        page, first.get_by_role("button", name=f"{name} is not Sunny", exact=True), ".album-photo"
    )
    expect(first.locator(".mark-status")).to_have_text("Marked: not Sunny")
    listed = client.get(f"/concepts/{cid}/photos", params={"limit": 200}).json()
    assert image_id not in [p["image"]["id"] for p in listed["items"]]
    # Undo: the mark ends (kept as history) and the photo is back.
    click(
        page, first.get_by_role("button", name=f"Undo the mark of {name} for Sunny"), ".album-photo"
    )
    expect(first.locator(".mark-status")).to_have_text("")
    history = client.get(f"/concepts/{cid}/verdicts").json()["items"]
    assert [(v["verdict"], v["ended_at"] is not None) for v in history] == [("rejected", True)]
    listed = client.get(f"/concepts/{cid}/photos", params={"limit": 200}).json()
    assert image_id in [p["image"]["id"] for p in listed["items"]]
    wait_ready(client, cid)

    # Search hits that name the concept carry the same two actions.
    nav(page, "Search")
    page.get_by_label("Search your photos").fill("Sunny in the snow")
    page.get_by_label("Search your photos").press("Enter")
    hit = page.locator("#search-results > li").first
    expect(hit).to_be_visible()
    hit_name = hit.locator(".name").text_content()
    hit_id = hit.get_attribute("data-image-id")
    bring_into_view(hit)
    click(page, hit.get_by_role("button", name=f"{hit_name} is Sunny", exact=True), ".card")
    expect(hit.locator(".mark-status")).to_have_text("Marked: Sunny")
    shot(page, tmp_path, "search-marks-1280")
    marks = client.get(f"/concepts/{cid}/verdicts").json()["items"]
    assert (marks[0]["image_id"], marks[0]["verdict"], marks[0]["ended_at"]) == (
        hit_id,
        "confirmed",
        None,
    )
    # A mark that cannot be made says why, and changes nothing.
    wait_ready(client, cid)
    assert client.delete(f"/concepts/{cid}").status_code == 204
    click(page, hit.get_by_role("button", name=f"{hit_name} is not Sunny", exact=True), ".card")
    expect(hit.locator(".marks .alert")).to_contain_text("concept not found")
    expect(hit.locator(".mark-status")).to_have_text("Marked: Sunny")
    shot(page, tmp_path, "search-mark-refused-1280")
