"""Which folders a library may be: path confinement under the allowed roots, and ownership.

Nothing outside the allowed roots (settings.library.roots) is read: a path with `..` is refused,
paths are resolved (symlinks followed) and must stay under a root and inside their library;
another library's folder (or one inside or around it) is refused, by name and by identity (a
bind mount, another case on a case-insensitive share), and so is the service's data folder.

Every path that reaches the database or a report is valid UTF-8 text (`is_utf8`); `shown`
writes a name that is not with its bad bytes escaped ("caf\\xe9.jpg").
"""

from __future__ import annotations

import contextlib
import os
import unicodedata
from pathlib import Path

from sqlalchemy.orm import Session

from app import repositories
from app.config import Settings
from app.errors import Conflict, Misconfigured, ValidationFailed
from app.models import Library
from app.services.folders import ancestry_keys, folder_key
from app.text import UnsafeText, check_text


def allowed_roots(settings: Settings) -> list[Path]:
    return [r.resolve() for r in settings.library.roots]


def is_utf8(text: str) -> bool:
    """Whether `text` is valid UTF-8 text (a name from the file system is not when its bytes
    were not: Python keeps them as lone surrogates, which no database or JSON can carry)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown(path: str | Path) -> str:
    """`path` as safe text for a report or a log: bytes that are not UTF-8 escaped (\\xe9)."""
    try:
        return os.fsencode(path).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate no file name decodes to ("\\ud800")
        return str(path).encode("utf-8", "backslashreplace").decode("utf-8")


def library_taken() -> Conflict:
    # One answer whatever the path (never the other user, nor whether the folder exists).
    return Conflict(
        "this folder, or one inside or around it, is another user's library",
        code="library_taken",
    )


def _data_folder(raw: str | Path) -> ValidationFailed:
    return ValidationFailed(
        f"{shown(raw)} is the service's data folder, inside it or around it (its uploads, "
        "thumbnails and indexes); it can never be a library",
        code="path_not_allowed",
    )


# Why a scan does not enter a folder inside a library (named by the folder's own path only).
TAKEN_FOLDER = "another user's library (the same folder under another name); not read"
DATA_FOLDER = "the service's own data folder; never indexed"


def _folded(path: str | Path) -> str:
    """`path` as a case-insensitive file system compares names: case folded, Unicode composed."""
    return unicodedata.normalize("NFC", str(path)).casefold().rstrip("/") or "/"


def _overlap(a: str, b: str) -> bool:
    """Whether two folders (as text) are one, or one holds the other."""
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def refuse_other_users(
    db_session: Session, user_id: str, path: Path, roots: list[Path] | None = None
) -> None:
    """Conflict if `path` is another user's library folder, or inside or above one, by name,
    exactly or as a case-insensitive file system compares names (`Alice` is `ALICE` on an SMB
    share: refused before the file system is asked whether it exists, so that an answer never
    tells which folders someone's library holds); with `roots`, only if it is under one of them
    (above them it is refused as outside)."""
    if roots is not None and not any(path.is_relative_to(r) for r in roots):
        return
    for other in repositories.libraries_overlapping(db_session=db_session, path=str(path)):
        if other.user_id != user_id:
            raise library_taken()
    mine = _folded(path)
    for other in repositories.other_users_libraries(db_session=db_session, user_id=user_id):
        if _overlap(mine, _folded(other.path)) and _ignores_case(Path(other.path)):
            raise library_taken()


def _ignores_case(folder: Path) -> bool:
    """Whether the file system holding `folder` (a library's folder, known to exist) finds it
    under its name with the case of its letters changed: then names that differ only in case
    are one folder there. Asks only about that library's own folder."""
    for name, parent in zip((folder, *folder.parents), folder.parents, strict=False):
        flipped = name.name.swapcase()
        if flipped == name.name:
            continue  # no letters in this name: try the folder above
        try:
            found = os.stat(parent / flipped)
            if flipped not in os.listdir(parent):  # found, though no entry has that name
                return True
            return os.path.samestat(os.stat(name), found)  # an entry: itself, or another?
        except OSError:
            return False
    return False


def foreign_folders(db_session: Session, user_id: str, settings: Settings) -> dict[str, str]:
    """The folders (identity -> why) that no library of `user_id` may hold, under any name:
    every other user's library folder as it is now and the folders its last scan walked inside
    it, and the service's data folder with the folders in it."""
    refuse: dict[str, str] = {}
    others = repositories.other_users_libraries(db_session=db_session, user_id=user_id)
    walked = repositories.library_folder_keys(
        db_session=db_session, library_ids=[o.id for o in others]
    )
    for other in others:
        refuse.update(dict.fromkeys(walked.get(other.id, {}), TAKEN_FOLDER))
        with contextlib.suppress(OSError):
            refuse[folder_key(os.stat(other.path))] = TAKEN_FOLDER
    refuse.update(dict.fromkeys(_data_folder_keys(settings), DATA_FOLDER))
    return refuse


def _data_folder_keys(settings: Settings) -> list[str]:
    """The identities of the data folder and of the folders in it (what a bind mount of one
    of them elsewhere would show)."""
    keys: list[str] = []
    with contextlib.suppress(OSError):
        data = settings.data_dir.resolve()
        keys.append(folder_key(os.stat(data)))
        with os.scandir(data) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    keys.append(folder_key(entry.stat(follow_symlinks=False)))
    return keys


def check_ownership(db_session: Session, user_id: str, folder: Path, settings: Settings) -> None:
    """Refuse `folder` (resolved) as a library of `user_id` if it is, by identity, another
    user's library folder or inside one (under any name: a bind mount, another case on a
    case-insensitive share) or above one (Conflict `library_taken`), or the data folder, inside
    it or above it (ValidationFailed). OSError if the file system cannot tell."""
    mine = ancestry_keys(folder)
    data_keys = set(_data_folder_keys(settings))
    if data_keys & set(mine):
        raise _data_folder(folder)
    with contextlib.suppress(OSError):
        if mine[0] in ancestry_keys(settings.data_dir.resolve()):
            raise _data_folder(folder)
    others = repositories.other_users_libraries(db_session=db_session, user_id=user_id)
    if _same_folder_as(db_session, mine, others) is not None:
        raise library_taken()


def _same_folder_as(
    db_session: Session, mine: list[str], libraries: list[Library]
) -> Library | None:
    """The first of `libraries` that the folder whose ancestry is `mine` (its identity first,
    then its parents') is, lies inside (as the library's last scan walked it, or its folder as
    it is now) or lies above; None."""
    walked = repositories.library_folder_keys(
        db_session=db_session, library_ids=[lib.id for lib in libraries]
    )
    ancestry = set(mine)
    for lib in libraries:
        keys = set(walked.get(lib.id, {}))
        with contextlib.suppress(OSError):
            keys.add(folder_key(os.stat(lib.path)))
        if keys & ancestry:
            return lib
        with contextlib.suppress(OSError):
            if mine[0] in ancestry_keys(Path(lib.path)):
                return lib
    return None


def refuse_data_folder_in_roots(settings: Settings) -> None:
    """Misconfigured (the service must not start) when the data folder lies under an allowed
    library root, by name or by identity (a root that is a bind mount of a folder above it):
    any user could add it as a library and read every user's uploads."""
    try:
        data = settings.data_dir.resolve()
        above = set(ancestry_keys(data)) if data.exists() else set()
    except OSError:
        return  # nothing there yet to hold: the check by name below still holds
    for root in allowed_roots(settings):
        by_key = False
        with contextlib.suppress(OSError):
            by_key = folder_key(os.stat(root)) in above
        if data.is_relative_to(root) or root.is_relative_to(data) or by_key:
            raise Misconfigured(
                f"the data folder {shown(data)} lies under the library root {shown(root)} (or "
                "holds it): every user could add it as a library and read everyone's uploads. "
                "Set POLAR_DATA_DIR outside POLAR_LIBRARY__ROOTS (or the roots around your "
                "photos only)",
                code="data_dir_in_library_roots",
            )


def confine_folder(
    raw: str, settings: Settings, *, db_session: Session | None = None, user_id: str = ""
) -> Path:
    """The resolved folder `raw` names, if it is an existing folder under an allowed root.

    With a `db_session`, a path inside or above another user's library is refused (409) before
    the file system is asked whether it exists, both as typed and resolved: the answer must
    not tell another user which folders exist in someone's library. Whatever the file system
    says of the path (no permission to follow a /proc link, a loop, a name too long) is a 422
    `invalid_path`, never a 500.
    """
    roots = allowed_roots(settings)
    if not roots:
        raise ValidationFailed(
            "this server allows no library folders (the admin sets POLAR_LIBRARY__ROOTS)",
            code="libraries_disabled",
        )
    p = _typed_path(raw)
    if db_session is not None:
        _refuse_other_users_as_typed_and_followed(db_session, user_id, p, roots)
    real, is_dir = _resolved(p)
    if not any(real.is_relative_to(r) for r in roots):
        via = " (through a symlink)" if real != Path(os.path.normpath(p)) else ""
        raise ValidationFailed(
            f"{raw} is outside the allowed library roots{via}",
            code="path_not_allowed",
            detail={"roots": [str(r) for r in roots]},
        )
    if not is_dir:
        raise ValidationFailed(f"{raw} is not an existing folder", code="not_a_folder")
    if db_session is not None:
        try:
            check_ownership(db_session, user_id, real, settings)
        except OSError as e:
            raise unusable_path(e) from None
    return real


def _typed_path(raw: str) -> Path:
    """`raw` as a path, if it is absolute, has no `..` and is text a folder name can be."""
    p = Path(raw)
    if not p.is_absolute():
        raise ValidationFailed(f"give an absolute path, not {raw!r}", code="path_not_absolute")
    if ".." in p.parts:
        raise ValidationFailed("a library path may not contain '..'", code="path_traversal")
    try:  # the API refuses these first (app/api/schemas.py LibraryIn); the database would fail
        check_text(raw)
    except UnsafeText as e:
        raise ValidationFailed(
            f"this path cannot be used as a folder: {e}", code="invalid_path"
        ) from None
    return p


def _refuse_other_users_as_typed_and_followed(
    db_session: Session, user_id: str, p: Path, roots: list[Path]
) -> None:
    """Conflict if `p` is in or around another user's library as typed, then with its symlinks
    followed as far as they go (realpath keeps a missing part, a loop or a name too long as it
    is), before any error the file system could give but one: no permission to read a link on
    the way (a /proc link), a 422."""
    refuse_other_users(db_session, user_id, p, roots)
    try:
        followed = os.path.realpath(p)
    except OSError as e:
        raise unusable_path(e) from None
    refuse_other_users(db_session, user_id, Path(shown(followed)), roots)


def _resolved(p: Path) -> tuple[Path, bool]:
    """`p` resolved, and whether it is a folder; whatever the file system says of a path a user
    typed (too long, a NUL byte, a loop, no permission, a link to a name that is not UTF-8) is a
    clear 422."""
    try:
        real = p.resolve()
        if not is_utf8(str(real)):  # a symlink on the way leads to a name that is not UTF-8
            raise ValueError(f"it leads to {shown(real)}, a name that is not valid UTF-8")
        return real, real.is_dir()
    except (OSError, ValueError, RuntimeError) as e:  # too long, NUL byte, a loop, EACCES
        raise unusable_path(e) from None


def own_overlap(db_session: Session, user_id: str, folder: Path) -> Library | None:
    """The user's own library that `folder` is under another name, lies in or around."""
    own = repositories.list_libraries(db_session=db_session, user_id=user_id)
    folded = _folded(folder)
    for lib in own:
        if _overlap(folded, _folded(lib.path)) and _ignores_case(Path(lib.path)):
            return lib
    return _same_folder_as(db_session, ancestry_keys(folder), own)


def unusable_path(e: BaseException) -> ValidationFailed:
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return ValidationFailed(f"this path cannot be used as a folder: {reason}", code="invalid_path")
