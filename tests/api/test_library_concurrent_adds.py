"""Two adds of overlapping folders at the same moment (two users, or one user twice): exactly
one wins, the other gets the documented 409; on SQLite and on the real PostgreSQL, from two
threads whose overlap checks are made to run side by side."""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from app import repositories
from tests.api.test_libraries import db_settings, libraries  # noqa: F401 (fixture)

BOTH_CHECKED_WITHIN_S = 2.0


@pytest.fixture(autouse=True)
def checks_side_by_side(monkeypatch) -> None:
    """Each overlap check waits (a while) for the other request's before answering: without a
    lock around check and insert, both see no library and both insert. With the lock, the
    second check cannot start while the first holds it: the wait times out, and the first
    goes on alone."""
    barrier = threading.Barrier(2)
    overlapping = repositories.libraries_overlapping

    def side_by_side(**kwargs):
        found = overlapping(**kwargs)
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=BOTH_CHECKED_WITHIN_S)
        return found

    monkeypatch.setattr(repositories, "libraries_overlapping", side_by_side)


def add_at_once(client, adds):
    """POST /libraries for each (user, path), all at the same moment: their answers."""
    with ThreadPoolExecutor(len(adds)) as pool:
        futures = [
            pool.submit(client.post, "/libraries", json={"path": str(p)}, headers=u.headers)
            for u, p in adds
        ]
        return [f.result() for f in futures]


def test_two_users_adding_overlapping_folders_at_once_one_wins(api_client, folder_user, make_user):
    alice, lib = folder_user
    bob = make_user(api_client, "bob")
    (lib / "sub").mkdir()
    answers = add_at_once(api_client, [(alice, lib), (bob, lib / "sub")])
    assert sorted(r.status_code for r in answers) == [202, 409], [r.text for r in answers]
    (lost,) = [r for r in answers if r.status_code == 409]
    assert lost.json()["error"]["code"] == "library_taken"
    owned = libraries(api_client, alice) + libraries(api_client, bob)
    assert len(owned) == 1


def test_one_user_adding_the_same_folder_twice_at_once_gets_one_library(api_client, folder_user):
    user, lib = folder_user
    answers = add_at_once(api_client, [(user, lib), (user, lib)])
    assert sorted(r.status_code for r in answers) == [202, 409], [r.text for r in answers]
    (lost,) = [r for r in answers if r.status_code == 409]
    assert lost.json()["error"]["code"] == "library_overlaps"
    assert [x["path"] for x in libraries(api_client, user)] == [str(lib)]
