"""A folder photo swapped for a FIFO after its scan: teaching a concept from it is refused at
once (404 file_missing), never a request that waits forever for the FIFO's writer."""

from __future__ import annotations

import os
import threading

from tests.api.test_libraries import db_settings, scanned_photos  # noqa: F401 (libraries allowed)
from tests.model_fixtures import tiny_serving  # noqa: F401


def test_a_concept_from_a_folder_photo_swapped_for_a_fifo_is_refused_not_hung(
    api_client, folder_user
):
    user, lib = folder_user
    ids = scanned_photos(api_client, user, lib, seeds=range(70, 73))
    (lib / "fido0.jpg").unlink()
    os.mkfifo(lib / "fido0.jpg")
    answer: list[object] = []

    def teach() -> None:
        answer.append(
            api_client.post(
                "/concepts", data={"name": "Fido", "image_ids": ids}, headers=user.headers
            )
        )

    worker = threading.Thread(target=teach, daemon=True)
    worker.start()
    worker.join(timeout=30)
    if not answer:  # unblock the hung request so the test run can end
        with open(lib / "fido0.jpg", "wb") as f:
            f.write(b"x")
        worker.join(timeout=10)
    assert answer, "the request waited on the FIFO"
    r = answer[0]
    assert r.status_code == 404, r.text
    assert r.json()["error"]["code"] == "file_missing"
    assert api_client.get("/concepts", headers=user.headers).json()["items"] == []
