"""The data folder's disk fills up for real (issue 13): 507 storage_full, nothing half-stored,
reads and searches keep working, and uploads work again once space is freed.

The server runs in a private mount namespace (`unshare -rm`, which needs no privileges where
user namespaces are enabled) with its data folder on a 4 MB tmpfs; the database file lives
outside it, as it would on a separate volume.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app.demo.run_demo import free_port
from app.ml.model import DEMO_MODEL_NAME, demo_checkpoint_path
from tests.faults.conftest import ROOT, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(300)]


def noise_png(seed: int, side: int = 300) -> bytes:
    """About 270 KB that no compressor can shrink."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", compress_level=0)
    return buf.getvalue()


@pytest.mark.parametrize("database", ["outside", "inside"])
def test_a_full_disk_refuses_uploads_cleanly_and_recovers(tmp_path: Path, database: str) -> None:
    """The database file on another volume, or in the data folder (on the full disk itself)."""
    if shutil.which("unshare") is None:
        pytest.fail("util-linux's unshare is needed to give the server a small private disk")
    data = tmp_path / "data"
    data.mkdir()
    db_file = data / "polar.db" if database == "inside" else tmp_path / "polar.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLAR_")}
    env |= {
        "POLAR_DATA_DIR": str(data),
        "POLAR_DATABASE_URL": f"sqlite:///{db_file.as_posix()}",
        "POLAR_BROKER_URL": "",
        "POLAR_MODEL__NAME": DEMO_MODEL_NAME,
        "POLAR_MODEL__PRETRAINED": str(demo_checkpoint_path()),
        "POLAR_MODEL__THREADS": "1",
        "POLAR_SEARCH__REGIONS": "none",
        "HF_HUB_OFFLINE": "1",
    }
    cli = [sys.executable, "-m", "app.cli"]
    subprocess.run([*cli, "migrate"], env=env, cwd=ROOT, check=True, capture_output=True)
    out = subprocess.run([*cli, "create-user", "alice"], env=env, cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    key = next(line.split()[-1] for line in out.splitlines() if "api_key" in line)
    port = free_port()
    serve = " ".join([*cli, "serve", "--port", str(port)])
    # The tmpfs hides what the data folder held: the migrated database moves onto it.
    keep = f"cp {db_file} {tmp_path}/db.keep && " if database == "inside" else ""
    back = f" && cp {tmp_path}/db.keep {db_file}" if database == "inside" else ""
    # A ballast file the "admin" deletes to free space: with the database on the full disk, even
    # a delete needs room for SQLite's journal first.
    ballast = f" && head -c 400000 /dev/zero > {data}/ballast"
    script = f"{keep}mount -t tmpfs -o size=4m tmpfs {data}{back}{ballast} && exec {serve}"
    with (tmp_path / "api.log").open("wb") as log:
        server = subprocess.Popen(["unshare", "-rm", "--", "sh", "-c", script], env=env,
                                  cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert server.poll() is None, (tmp_path / "api.log").read_text()[-3000:]
            try:
                return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, 120, "the server did not become ready", every=0.3)
        api = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        accepted: list[str] = []
        refused = None
        for seed in range(40):  # 40 x 270 KB: far more than 4 MB
            files = [("files", (f"n{seed}.png", noise_png(seed), "image/png"))]
            r = api.post("/images", files=files)
            if r.status_code == 202:
                accepted.append(r.json()["images"][0]["id"])
                continue
            refused = r
            break
        assert refused is not None, "the disk never filled up"
        assert refused.status_code == 507, refused.text
        assert refused.json()["error"]["code"] == "storage_full"
        assert accepted, "nothing fitted at all"
        # No original is left without its row: as many as were accepted (all different).
        seen = Path(f"/proc/{server.pid}/root") / data.relative_to("/") / "originals"
        stored = [p for p in seen.rglob("*") if p.is_file()]
        assert len(stored) == len(accepted), sorted(p.name for p in stored)

        # Nothing half-stored: exactly the accepted images, each readable in full.
        listed = api.get("/images", params={"limit": 200}).raise_for_status().json()["items"]
        assert [i["id"] for i in listed] == accepted
        for image_id in accepted:
            assert api.get(f"/images/{image_id}/file").status_code == 200
        # Reads and searches keep working.
        wait_until(lambda: api.get("/index").json()["embedded"] == len(accepted), 120,
                   "the accepted images were never embedded")  # fmt: skip
        found = api.get("/search", params={"q": "a photo", "k": 5})
        assert found.status_code == 200 and found.json()["hits"]

        # Space freed (the admin removes a file, then the user deletes photos): uploads work
        # again, by themselves.
        (Path(f"/proc/{server.pid}/root") / data.relative_to("/") / "ballast").unlink()
        for image_id in accepted[:3]:
            assert api.delete(f"/images/{image_id}").status_code == 204
        time.sleep(0.2)
        again = api.post("/images", files=[("files", ("again.png", noise_png(99), "image/png"))])
        assert again.status_code == 202, again.text
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
