"""Opening a library file with no symlink followed in any component (app.storage.open_beneath,
open_library_file), and an opened file held as a path (HeldFile): a folder swapped for a link
between a check of the resolved path and the open is refused, never followed."""

from __future__ import annotations

import errno
import gc
import os
from pathlib import Path

import pytest

from app.errors import InvalidImage
from app.storage import HeldFile, inspect_file, open_beneath, open_library_file
from tests.db_fixtures import noisy_jpeg
from tests.unit.test_untrusted_images import refuses_a_fifo_at_once

MB = 1024 * 1024


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(root, root/lib, outside): lib/sub/deep/a.jpg inside; outside/ beside the root holds
    sub/deep/a.jpg and a.jpg of other bytes (what a link would lead to)."""
    root = tmp_path / "photos"
    lib = root / "lib"
    (lib / "sub" / "deep").mkdir(parents=True)
    (lib / "sub" / "deep" / "a.jpg").write_bytes(b"inside")
    outside = tmp_path / "outside"
    (outside / "sub" / "deep").mkdir(parents=True)
    (outside / "sub" / "deep" / "a.jpg").write_bytes(b"SECRET")
    (outside / "deep").mkdir()
    (outside / "deep" / "a.jpg").write_bytes(b"SECRET")
    return root, lib, outside


def test_a_file_under_the_base_is_opened(tree):
    root, lib, _ = tree
    with open_beneath(lib / "sub" / "deep" / "a.jpg", root) as f:
        assert f.read() == b"inside"


@pytest.mark.parametrize("swapped", ["lib", "lib/sub", "lib/sub/deep"])
def test_a_folder_swapped_for_a_link_at_any_depth_is_refused(tree, swapped):
    """The old open (O_NOFOLLOW on the last component only) followed these and read SECRET."""
    root, lib, outside = tree
    folder = root / swapped
    os.rename(folder, folder.with_name(folder.name + ".old"))
    target = {"lib": outside, "lib/sub": outside / "sub", "lib/sub/deep": outside / "deep"}
    os.symlink(target[swapped], folder)
    path = lib / "sub" / "deep" / "a.jpg"
    assert path.read_bytes() == b"SECRET"  # by name, the link is followed
    with pytest.raises(OSError) as caught:
        open_beneath(path, root)
    assert caught.value.errno in (errno.ELOOP, errno.ENOTDIR)
    assert "link" in str(caught.value)


def test_a_folder_swapped_for_a_link_inside_the_library_is_refused_too(tree):
    """Even a link that stays inside the library: nothing is followed at open time."""
    root, lib, _ = tree
    (lib / "other" / "deep").mkdir(parents=True)
    (lib / "other" / "deep" / "a.jpg").write_bytes(b"elsewhere")
    os.rename(lib / "sub", lib / "sub.old")
    os.symlink(lib / "other", lib / "sub")
    with pytest.raises(OSError):
        open_beneath(lib / "sub" / "deep" / "a.jpg", root)


def test_a_link_at_the_last_component_a_folder_and_a_fifo_are_refused(tree):
    root, lib, outside = tree
    os.symlink(outside / "deep" / "a.jpg", lib / "link.jpg")
    with pytest.raises(OSError) as caught:
        open_beneath(lib / "link.jpg", root)
    assert caught.value.errno == errno.ELOOP
    with pytest.raises(InvalidImage, match="folder"):
        open_beneath(lib / "sub", root)
    refuses_a_fifo_at_once(lib / "fifo.jpg", lambda: open_beneath(lib / "fifo.jpg", root))


def test_a_path_not_under_the_base_is_refused(tree):
    root, _, outside = tree
    for bad in (outside / "deep" / "a.jpg", root):
        with pytest.raises(ValueError):
            open_beneath(bad, root)


def test_a_link_to_a_file_of_the_library_is_read_as_its_target(tree):
    """open_library_file keeps what a scan promises: a link inside the library is read as the
    file it leads to, at that file's own path; a link out of it is refused by name."""
    root, lib, outside = tree
    os.symlink(lib / "sub" / "deep" / "a.jpg", lib / "alias.jpg")
    real, f = open_library_file(str(lib / "alias.jpg"), str(lib), [root])
    with f:
        assert real == lib / "sub" / "deep" / "a.jpg" and f.read() == b"inside"
    os.symlink(outside / "deep" / "a.jpg", lib / "out.jpg")
    with pytest.raises(ValueError, match="outside"):
        open_library_file(str(lib / "out.jpg"), str(lib), [root])
    with pytest.raises(ValueError, match="outside"):  # a library no longer under a root
        open_library_file(str(lib / "alias.jpg"), str(lib), [outside])


def test_inspect_file_within_a_root_refuses_a_swapped_folder(tree):
    root, lib, outside = tree
    (lib / "sub" / "deep" / "p.jpg").write_bytes(noisy_jpeg(seed=1))
    (outside / "deep" / "p.jpg").write_bytes(noisy_jpeg(seed=2))
    path = lib / "sub" / "deep" / "p.jpg"
    assert inspect_file(path, max_bytes=MB, max_pixels=10**7, within=root).size_bytes > 0
    os.rename(lib / "sub", lib / "sub.old")
    (lib / "sub").mkdir()
    os.symlink(outside / "deep", lib / "sub" / "deep")
    with pytest.raises(OSError):
        inspect_file(path, max_bytes=MB, max_pixels=10**7, within=root)


def test_a_held_file_is_read_through_its_descriptor_whatever_its_name_becomes(tree):
    root, lib, outside = tree
    path = lib / "sub" / "deep" / "a.jpg"
    held = HeldFile.hold(open_beneath(path, root), path)
    assert str(held) == str(path) and held.name == "a.jpg"
    # The folder is swapped for a link out of the library after the open: what is read by the
    # held path (os.stat, open, Path.stat) is still the file that was opened.
    os.rename(lib / "sub", lib / "sub.old")
    os.symlink(outside / "sub", lib / "sub")
    assert Path(str(held)).read_bytes() == b"SECRET"
    with open(held, "rb") as f:
        assert f.read() == b"inside"
    assert held.stat().st_size == len(b"inside") and held.is_file()
    fd = int(os.fspath(held).rsplit("/", 1)[1])
    del held, f
    gc.collect()
    with pytest.raises(OSError):  # closed with the object
        os.fstat(fd)


def test_a_held_file_closes_on_request(tree):
    root, lib, _ = tree
    path = lib / "sub" / "deep" / "a.jpg"
    held = HeldFile.hold(open_beneath(path, root), path)
    fd = int(os.fspath(held).rsplit("/", 1)[1])
    held.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    held.close()  # twice is fine
