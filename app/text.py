"""Text from outside, made safe once: one Unicode normal form, one caseless key.

Every string a request brings in goes through `clean_text` at the API boundary (app/api/schemas.py
`CleanStr`): a lone surrogate (what invalid UTF-8 decodes to with `surrogateescape`, and what a
JSON `"\\ud800"` escape decodes to) or a NUL cannot be stored by PostgreSQL nor sent back as
UTF-8, so it is refused there with a 422 instead of failing later with a 500. What passes is
put in NFKC, so "ﬁdo" (a ligature) and "ｆｉｄｏ" (full width) are the same text as "fido".

`fold` is the one caseless comparison rule: concept names are matched in queries with it
(app/services/query.py) and their uniqueness key (`Concept.name_key`) is made with it, so a
query can never find a name that the lookup does not know. Python's `re.IGNORECASE` and
`str.casefold` disagree on the Turkish i's (`re` equates "ı" with "i", `casefold` does not), so
the rule folds all four (i, I, ı, İ) to "i" and no regex case-insensitivity is used anywhere.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Final

NORMAL_FORM: Final = "NFKC"

# Lone surrogates and NUL: not encodable as UTF-8 / not storable in PostgreSQL text.
_UNSAFE = re.compile("[\ud800-\udfff\x00]")


class UnsafeText(ValueError):
    """A string that cannot be stored or sent as UTF-8."""


def check_text(value: str) -> str:
    """`value` unchanged if it is valid UTF-8 text without NUL; UnsafeText otherwise."""
    bad = _UNSAFE.search(value)
    if bad is not None:
        what = "a NUL character" if bad.group() == "\x00" else "a lone surrogate (invalid UTF-8)"
        raise UnsafeText(f"the text contains {what} at position {bad.start()}")
    return value


# C0 and C1 control characters (and DEL): never part of a name a person typed or reads.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def check_path_text(value: str) -> str:
    """A file-system path, checked like any text (see `check_text`) and refused if it holds a
    control character, but never normalised: a file's name is its bytes, so "Café" in NFD (as
    macOS writes it) or "ｂｏｂ" (full width) names another file than its NFKC form."""
    check_text(value)
    bad = _CONTROL.search(value)
    if bad is not None:
        raise UnsafeText(
            f"the path contains a control character (U+{ord(bad.group()):04X}) "
            f"at position {bad.start()}"
        )
    return value


def clean_text(value: str) -> str:
    """Checked (see `check_text`) and in the service's one normal form, NFKC."""
    return unicodedata.normalize(NORMAL_FORM, check_text(value))


_DOT_ABOVE = "\u0307"


def _fold_char(ch: str) -> str:
    folded = unicodedata.normalize(NORMAL_FORM, ch).casefold()
    # İ casefolds to "i" + combining dot above; ı stays ı. Both fold to plain "i" here.
    return folded.replace("i" + _DOT_ABOVE, "i").replace("ı", "i")


def fold_with_spans(text: str) -> tuple[str, list[int], list[int]]:
    """The folded text (before whitespace collapsing) and, for each of its characters, the
    span [start, end) of `text` it came from (one character can fold to several)."""
    parts: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    for i, ch in enumerate(text):
        piece = _fold_char(ch)
        if piece == _DOT_ABOVE and parts and parts[-1].endswith("i"):
            # "i" + a separate combining dot (what "İ".lower() gives) is "i", as "İ" is.
            ends[-len(parts[-1]) :] = [i + 1] * len(parts[-1])
            continue
        parts.append(piece)
        starts.extend([i] * len(piece))
        ends.extend([i + 1] * len(piece))
    return "".join(parts), starts, ends


def fold(text: str) -> str:
    """The caseless key two texts compare equal on: folded per character, whitespace collapsed."""
    return " ".join(fold_with_spans(text)[0].split())


# An absolute or home-relative file-system path ("/srv/polar/data/x.db", "~/.cache/x"): not a
# URL's path (after "host:port" or "//"), not a model id's "name/tag" (after a word character).
_PATH = re.compile(r"(?<![\w:/.~-])(?:~/|/)(?:[\w.@+-]+/)*[\w.@+-]+")


def without_paths(text: str) -> str:
    """`text` with every file-system path replaced by "<path>": for answers anyone can read
    (the public /readyz), which must not tell where the server is installed."""
    return _PATH.sub("<path>", text)
