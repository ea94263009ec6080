"""`make demo`: the whole product, offline, through the HTTP API of a locally started server.

1. starts `polar serve` on the bundled demo model (SQLite, a fresh data folder in demo-out/);
2. creates a user and an API key with the admin CLI;
3. uploads a generated library: "Fido" (one specific hat) in every scene, its look-alikes
   (other colours, other pattern, other shape) in the same scenes, other hats, other objects;
   and in three scenes Fido side by side with "Rex" (one specific ball), next to the decoys
   Fido + a Rex look-alike, a Fido look-alike + Rex and both look-alikes;
4. registers Fido and Rex from five photos each and waits for training, printing progress;
5. searches "Fido on the beach" and, for comparison, plain CLIP's "a hat on the beach"; then the
   two-concept "Fido and Rex on the beach" (re-ranked by regions) against "a hat and a ball on
   the beach";
6. prints the rankings and writes an HTML contact sheet (and a PNG of it) to demo-out/.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

import httpx
from PIL import Image, ImageDraw, ImageFont

from app.cli.http import Job
from app.cli.progress import JobProgress
from app.demo.world import CATEGORIES, SCENES, Instance, World
from app.ml.model import DEMO_MODEL_NAME, demo_checkpoint_path

FIDO_CATEGORY = "hat"
FIDO_INDEX = 4  # which reserved instance of the world plays Fido (a pink and blue striped hat)
REX_CATEGORY = "ball"
REX_INDEX = 5  # which reserved instance plays Rex; fixed up front, not picked for the result
PAIR_SCENES: tuple[str, ...] = ("beach", "snow", "kitchen")  # where Fido and Rex meet


@dataclass(frozen=True)
class LibraryImage:
    filename: str
    kind: str  # "fido", "look-alike: other colors", "other hat"; two objects: "fido+rex", ...
    scene: str
    png: bytes
    shows: tuple[str, ...] = ()  # the registered concepts really in it: ("Fido",), ("Fido", "Rex")


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def build_library(
    world: World,
    fido: Instance,
    per_scene: int,
    others: int,
    rex: Instance | None = None,
) -> list[LibraryImage]:
    """Fido and its near misses in every scene, among other hats and other objects.

    With `rex`, also Fido and Rex side by side in `PAIR_SCENES` (`per_scene` shots each) and,
    once per scene and look-alike kind, the pairs where one or both are look-alikes. They are
    drawn from their own random stream, after the rest, so the single-object images stay the same.
    """
    rng = world.rng("bench", 10_000)
    items: list[LibraryImage] = []
    lookalikes = world.lookalikes(fido, rng)
    for scene in SCENES:
        for n in range(per_scene):
            items.append(
                LibraryImage(
                    f"fido-{scene}-{n}.png",
                    "fido",
                    scene,
                    _png(world.render(scene, [fido], rng)),
                    ("Fido",),
                )
            )
            for what, inst in lookalikes.items() if n == 0 else ():
                items.append(
                    LibraryImage(
                        f"lookalike-{what}-{scene}-{n}.png",
                        f"look-alike: other {what}",
                        scene,
                        _png(world.render(scene, [inst], rng)),
                    )
                )
            hat = world.sample_instance(rng, FIDO_CATEGORY)
            items.append(
                LibraryImage(
                    f"hat-{scene}-{n}.png",
                    "other hat",
                    scene,
                    _png(world.render(scene, [hat], rng)),
                )
            )
    for n in range(others):
        scene = SCENES[n % len(SCENES)]
        category = [c for c in CATEGORIES if c != FIDO_CATEGORY][n % (len(CATEGORIES) - 1)]
        inst = world.sample_instance(rng, category)
        items.append(
            LibraryImage(
                f"{category}-{scene}-{n}.png",
                "other object",
                scene,
                _png(world.render(scene, [inst], rng)),
            )
        )
    if rex is not None:
        items += pair_images(world, fido, lookalikes, rex, per_scene)
    return items


def pair_images(
    world: World,
    fido: Instance,
    fido_lookalikes: dict[str, Instance],
    rex: Instance,
    per_scene: int,
) -> list[LibraryImage]:
    """Fido (left) and Rex (right) in each of `PAIR_SCENES`, and the same scenes with decoys."""
    rng = world.rng("bench", 10_001)
    rex_lookalikes = world.lookalikes(rex, rng)
    items: list[LibraryImage] = []

    def add(name: str, kind: str, scene: str, pair: list[Instance], shows: tuple[str, ...]) -> None:
        png = _png(world.render(scene, pair, rng))
        items.append(LibraryImage(name, kind, scene, png, shows))

    for scene in PAIR_SCENES:
        for n in range(per_scene):
            add(f"fido-rex-{scene}-{n}.png", "fido+rex", scene, [fido, rex], ("Fido", "Rex"))
        for what, rex_like in rex_lookalikes.items():
            add(
                f"fido-rexlike-{what}-{scene}.png",
                f"fido+rex look-alike: other {what}",
                scene,
                [fido, rex_like],
                ("Fido",),
            )
        for what, fido_like in fido_lookalikes.items():
            add(
                f"fidolike-{what}-rex-{scene}.png",
                f"fido look-alike: other {what}+rex",
                scene,
                [fido_like, rex],
                ("Rex",),
            )
        for what in rex_lookalikes:
            add(
                f"fidolike-rexlike-{what}-{scene}.png",
                f"fido look-alike+rex look-alike: other {what}",
                scene,
                [fido_lookalikes[what], rex_lookalikes[what]],
                (),
            )
    return items


def concept_photos(
    world: World, inst: Instance, n: int = 5, stream_index: int = 20_000
) -> list[bytes]:
    """Five photos of a concept, as a user would take them: other scenes than the library's shots.

    Fido's come from the default stream; another concept takes another `stream_index`.
    """
    rng = world.rng("bench", stream_index)
    scenes = ["kitchen", "grass", "snow", "forest", "night", "beach"]
    return [_png(world.render(scenes[i % len(scenes)], [inst], rng)) for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _polar(*args: str, env: dict[str, str]) -> str:
    exe = shutil.which("polar", path=os.path.dirname(sys.executable)) or "polar"
    out = subprocess.run([exe, *args], env=env, check=True, capture_output=True, text=True)
    return out.stdout


def _wait_job(client: httpx.Client, job_id: str, label: str) -> dict[str, Any]:
    """Poll a job to its end; a bar on a terminal, one finished line in a log (app.cli.progress)."""
    sys.stdout.flush()  # the bar writes through its own handle: keep the lines in order
    with JobProgress(f"  {label}", file=sys.stdout) as progress:
        while True:
            job = client.get(f"/jobs/{job_id}").raise_for_status().json()
            progress(Job.from_json(job))
            if job["state"] in ("succeeded", "failed"):
                break
            time.sleep(0.1)
    if job["state"] == "failed":
        raise SystemExit(f"{label} failed: {job['error']}")
    return dict(job)


Row = tuple[str, str, float]  # image id, filename, score
Cell = tuple[Image.Image, str, bool]  # thumbnail, caption, framed in green


def shows_all(item: LibraryImage | None, want: tuple[str, ...]) -> bool:
    """Whether a library image really shows every concept in `want`."""
    return item is not None and set(want) <= set(item.shows)


def ranks_of(rows: list[Row], prefix: str) -> list[int]:
    """1-based ranks of the hits whose filename starts with `prefix`."""
    return [i + 1 for i, (_, name, _) in enumerate(rows) if name.startswith(prefix)]


def _table(
    title: str,
    body: dict[str, Any],
    library: dict[str, LibraryImage],
    want: tuple[str, ...],
    show: int,
) -> list[Row]:
    """Prints the first `show` hits, marking those that show every concept in `want`."""
    how = ", re-ranked by regions" if body.get("reranked") else ""
    print(f"\n{title}\n  encoded as: {body['rewritten']!r}   (model {body['model']}{how})")
    rows = []
    for hit in body["hits"]:
        name = hit["image"]["filename"]
        item = library.get(name)
        kind = item.kind if item else "?"
        mark = f"  <-- {' and '.join(want)}" if shows_all(item, want) else ""
        if hit["rank"] <= show:
            print(f"  {hit['rank']:>2}. {hit['score']:.3f}  {name:<38} {kind}{mark}")
        rows.append((hit["image"]["id"], name, hit["score"]))
    return rows


def first_hit_shows(
    rows: list[Row], library: dict[str, LibraryImage], want: tuple[str, ...], scene: str
) -> bool:
    """Whether the first hit shows every concept in `want`, in `scene` (the demo's gate)."""
    if not rows:
        return False
    item = library.get(rows[0][1])
    return shows_all(item, want) and item is not None and item.scene == scene


def beats_plain(got: list[int], base: list[int], n: int, k: int) -> bool:
    """All `n` target photos in the personalized top `k`, with a lower rank sum than plain's."""
    found = [r for r in got if r <= k]
    return len(found) == n and (len(base) < n or sum(found) < sum(sorted(base)[:n]))


def _thumb(client: httpx.Client, image_id: str) -> Image.Image:
    data = client.get(f"/images/{image_id}/thumbnail").raise_for_status().content
    return Image.open(io.BytesIO(data)).convert("RGB")


def _photo_cells(photos: list[bytes]) -> list[Cell]:
    return [(Image.open(io.BytesIO(p)).convert("RGB"), "", True) for p in photos]


def _hit_cells(
    client: httpx.Client,
    rows: list[Row],
    library: dict[str, LibraryImage],
    want: tuple[str, ...],
) -> list[Cell]:
    """Thumbnails (through the API) of the hits; those showing every concept in `want` framed."""
    cells = []
    for image_id, name, score in rows:
        hit = shows_all(library.get(name), want)
        caption = f"{score:.3f}" + (f" {'+'.join(want)}" if hit else "")
        cells.append((_thumb(client, image_id), caption, hit))
    return cells


def draw_label(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str) -> None:
    """`text` in Pillow's default font, one word at a time: its space is 2 px wide at this size,
    narrower than some gaps inside words, so "Fido on the beach" read "Fidoon the beach"."""
    font = ImageFont.load_default()
    size = getattr(font, "size", 10)
    space = max(draw.textlength(" ", font=font), 0.5 * size)
    x, y = float(xy[0]), xy[1]
    for word in text.split(" "):
        if word:
            draw.text((x, y), word, fill="black", font=font)
            x += draw.textlength(word, font=font)
        x += space


def write_contact_sheet(out: Path, sections: list[tuple[str, list[Cell]]]) -> None:
    """demo-out/contact_sheet.html and a PNG of it: one row of thumbnails per section."""
    cell, pad, label_h = 96, 6, 28
    cols = max(len(cells) for _, cells in sections)
    sheet = Image.new(
        "RGB", (pad + cols * (cell + pad), len(sections) * (cell + label_h + 22)), "white"
    )
    draw = ImageDraw.Draw(sheet)
    html = [
        "<!doctype html><meta charset=utf-8><title>POLAR demo</title>",
        "<style>body{font-family:sans-serif}figure{display:inline-block;margin:4px;"
        "text-align:center;font-size:11px}img{width:96px;image-rendering:pixelated}"
        ".hit img{outline:4px solid #1a7f37}</style>",
        "<h1>POLAR demo: personalized vs plain CLIP search</h1>",
    ]
    y = 0
    for title, cells in sections:
        html.append(f"<h2>{escape(title)}</h2><div>")
        draw_label(draw, (pad, y + 4), title)
        y += 18
        for col, (im, caption, hit) in enumerate(cells):
            buf = io.BytesIO()
            im.save(buf, "PNG")
            b64 = base64.b64encode(buf.getvalue()).decode()
            cls = " class=hit" if hit else ""
            html.append(
                f"<figure{cls}><img src='data:image/png;base64,{b64}'>"
                f"<figcaption>{escape(caption)}</figcaption></figure>"
            )
            x = pad + col * (cell + pad)
            if hit:
                draw.rectangle([x - 3, y - 3, x + cell + 2, y + cell + 2], fill=(26, 127, 55))
            sheet.paste(im.resize((cell, cell), Image.Resampling.NEAREST), (x, y))
            draw_label(draw, (x, y + cell + 4), caption)
        html.append("</div>")
        y += cell + label_h
    (out / "contact_sheet.html").write_text("\n".join(html))
    sheet.crop((0, 0, sheet.width, y)).save(out / "contact_sheet.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("demo-out"))
    p.add_argument(
        "--per-scene",
        type=int,
        default=2,
        help="Fido shots per scene, Fido+Rex shots per pair scene",
    )
    p.add_argument("--others", type=int, default=200, help="other objects in the library")
    p.add_argument("--k", type=int, default=10)
    a = p.parse_args(argv)

    checkpoint = demo_checkpoint_path()
    if not checkpoint.is_file():
        raise SystemExit(f"the demo model is missing: {checkpoint}")
    out = a.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    port = free_port()
    env = os.environ | {
        "POLAR_DATA_DIR": str(out / "data"),
        "POLAR_DATABASE_URL": "",
        "POLAR_BROKER_URL": "",
        "POLAR_MODEL__NAME": DEMO_MODEL_NAME,
        "POLAR_MODEL__PRETRAINED": str(checkpoint),
        "HF_HUB_OFFLINE": "1",
    }
    print(f"1. starting the server on http://127.0.0.1:{port} (data in {out / 'data'})")
    _polar("migrate", env=env)
    with local_server(env, port, out / "server.log") as base:
        print("2. creating a user and an API key (polar create-user)")
        key = re.search(r"api_key: (\S+)", _polar("create-user", "demo", env=env))
        assert key is not None
        client = httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {key.group(1)}"}, timeout=120
        )
        return _run(client, a, out)


@contextmanager
def local_server(
    env: dict[str, str], port: int, log_path: Path, timeout: float = 180
) -> Iterator[str]:
    """`polar serve` in a child process until /readyz answers 200; yields its base URL."""
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + timeout
            while True:
                try:
                    if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the server did not become ready:\n{log_path.read_text()[-3000:]}"
                    )
                time.sleep(0.3)
            yield base
        finally:
            server.terminate()
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(5)


def _upload(client: httpx.Client, library: list[LibraryImage]) -> None:
    for start in range(0, len(library), 50):
        batch = library[start : start + 50]
        files = [("files", (i.filename, i.png, "image/png")) for i in batch]
        r = client.post("/images", files=files).raise_for_status().json()
        if r["job"]:
            _wait_job(client, r["job"]["id"], f"embedding {start + len(batch):>3}/{len(library)}")


def _register(client: httpx.Client, name: str, category: str, photos: list[bytes]) -> None:
    files = [
        ("files", (f"{name.lower()}-photo-{i}.png", p, "image/png")) for i, p in enumerate(photos)
    ]
    r = client.post("/concepts", data={"name": name, "category": category}, files=files)
    created = r.raise_for_status().json()
    _wait_job(client, created["job"]["id"], f"training {name}")
    concept = client.get(f"/concepts/{created['concept']['id']}").raise_for_status().json()
    m = concept["metrics"] or {}
    retention = concept["retention_score"]
    kept = ""
    if retention is not None:  # 1.0 = all of plain CLIP's general retrieval kept
        kept = f", searches naming it keep {min(100, round(100 * retention))}% of general quality"
    print(
        f"  ready: version {concept['version']}, placeholder {concept['placeholder']!r}, "
        f"learned in {m.get('train_seconds', 0):.1f} s{kept}"
    )


def _search(client: httpx.Client, q: str, k: int, personalize: bool = True) -> dict[str, Any]:
    params: dict[str, str | int] = {"q": q, "k": k}
    if not personalize:
        params["personalize"] = "false"
    return dict(client.get("/search", params=params).raise_for_status().json())


def _run(client: httpx.Client, a: argparse.Namespace, out: Path) -> int:
    world = World(seed=0)
    fido = world.instance(FIDO_INDEX, FIDO_CATEGORY)
    rex = world.instance(REX_INDEX, REX_CATEGORY)
    library = build_library(world, fido, a.per_scene, a.others, rex)
    by_name = {item.filename: item for item in library}
    pairs = sum("+" in item.kind for item in library)
    print(
        f"3. uploading a library of {len(library)} images "
        f"({pairs} of them two objects side by side)"
    )
    _upload(client, library)
    photos = concept_photos(world, fido)
    rex_photos = concept_photos(world, rex, stream_index=20_001)
    print("4. registering 'Fido' (category hat) and 'Rex' (category ball), five photos each")
    _register(client, "Fido", FIDO_CATEGORY, photos)
    _register(client, "Rex", REX_CATEGORY, rex_photos)

    print("5. searching")
    fido_q, fido_plain_q = "Fido on the beach", "a hat on the beach"
    rows_mine = _table(
        f"Personalized: {fido_q!r}", _search(client, fido_q, a.k), by_name, ("Fido",), a.k
    )
    rows_plain = _table(
        f"Plain CLIP: {fido_plain_q!r}",
        _search(client, fido_plain_q, a.k, personalize=False),
        by_name,
        ("Fido",),
        a.k,
    )
    # The two-concept searches fetch deeper than they print, to report a rank past the top k.
    deep = max(a.k, 50)
    both = ("Fido", "Rex")
    pair_q, pair_plain_q = "Fido and Rex on the beach", "a hat and a ball on the beach"
    pair_body = _search(client, pair_q, deep)
    rows_pair = _table(f"Personalized: {pair_q!r}", pair_body, by_name, both, a.k)
    rows_pair_plain = _table(
        f"Plain CLIP: {pair_plain_q!r}",
        _search(client, pair_plain_q, deep, personalize=False),
        by_name,
        both,
        a.k,
    )
    write_contact_sheet(
        out,
        [
            ("Fido's five training photos", _photo_cells(photos)),
            (
                f"Personalized: {fido_q!r}",
                _hit_cells(client, rows_mine, by_name, ("Fido",)),
            ),
            (
                f"Plain CLIP: {fido_plain_q!r}",
                _hit_cells(client, rows_plain, by_name, ("Fido",)),
            ),
            ("Rex's five training photos", _photo_cells(rex_photos)),
            (
                f"Personalized, re-ranked by regions: {pair_q!r}",
                _hit_cells(client, rows_pair[: a.k], by_name, both),
            ),
            (
                f"Plain CLIP: {pair_plain_q!r}",
                _hit_cells(client, rows_pair_plain[: a.k], by_name, both),
            ),
        ],
    )

    got, base = ranks_of(rows_mine, "fido-beach"), ranks_of(rows_plain, "fido-beach")
    print(f"\nFido-on-the-beach photos at ranks {got} personalized vs {base} plain (top {a.k}).")
    pair_got, pair_base = (
        ranks_of(rows_pair, "fido-rex-beach"),
        ranks_of(rows_pair_plain, "fido-rex-beach"),
    )
    print(
        f"Fido-and-Rex-on-the-beach photos at ranks {pair_got} personalized "
        f"({'re-ranked by regions' if pair_body.get('reranked') else 'not re-ranked'}) "
        f"vs {pair_base} plain (top {deep})."
    )
    print(f"Contact sheet: {out / 'contact_sheet.html'} (and contact_sheet.png)")
    # The exit code gates on both: a Fido-on-the-beach photo first and every one of them ahead
    # of plain CLIP's ranks; the same for the pair.
    checks = {
        "personalized search did not put a photo of Fido on the beach first": first_hit_shows(
            rows_mine, by_name, ("Fido",), "beach"
        ),
        "personalized search did not rank Fido on the beach above plain CLIP": beats_plain(
            got, base, a.per_scene, a.k
        ),
        "'Fido and Rex on the beach' did not put a photo of the pair on the beach first": (
            first_hit_shows(rows_pair, by_name, both, "beach")
        ),
        "'Fido and Rex on the beach' did not rank them above plain CLIP": beats_plain(
            pair_got, pair_base, a.per_scene, a.k
        ),
    }
    for message, ok in checks.items():
        if not ok:
            print(f"FAILED: {message}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
