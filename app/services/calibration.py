"""A concept's album score and cut-off, calibrated per concept: pure math, no database.

The album scores each library photo by how well the concept's look matches it *anywhere in the
frame*: the best match between the concept's photo mean (its photos, plus the ones a person
confirmed when those train it) and the photo's whole embedding or any of its stored region rows
(`album_scores`; app.ml.regions: crops and/or pooled boxes). A whole-image vector misses a
concept that is one of two objects in a busy photo; its region does not (synthetic PerVL
validation: oracle album F1 0.50 -> 0.68, recall at the cut-off 0.35 -> 0.64). Raw cosines
mean different things for different concepts, so each score is put on the concept's own scale:

    confidence = (score - library) / (own - library)

`own` is the mean leave-one-out score of the concept's own photos (each photo scored by the
photo mean of the *other* photos: what a new photo of the concept scores; photos a person
confirmed help build the mean but are not scored: they were picked for ranking low), `library`
the user's library's LIBRARY_QUANTILE score (the median: most photos are not of the concept).
So 0 is a typical library photo, 1 a typical photo of the concept. A photo is in the album from
the concept's cut-off up (`concept_cutoff`): ALBUM_CUTOFF, raised by CUTOFF_SLOPE times the
confidence that the top of the library (its CUTOFF_QUANTILE) reaches, so a concept whose
look-alikes crowd the top of the library gets a higher bar (synthetic PerVL validation: F1 at
the cut-off 0.837 -> 0.94 of the oracle's); once a person has rejected photos of the concept,
`learned_cutoff` may move it (by at most MAX_LEARNED_SHIFT, 0 as chosen on validation). The
service (app.services.albums) and the benchmark (bench/albums.py) both call these functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from app.ml.regions import part_matches
from app.services import recipe

# Where the album starts, in confidence units: ALBUM_CUTOFF + CUTOFF_SLOPE x the confidence that
# the library's CUTOFF_QUANTILE reaches (`concept_cutoff`: a concept whose look-alikes crowd
# the top of the library gets a higher cut-off), and which quantile of the library's scores is
# confidence 0 (0.5: the median): the values of best mean album F1 on the synthetic PerVL
# validation split (bench/albums.py sweeps them; docs/ALBUMS.md). In a library of 640 photos,
# 0.985 is about the 10th best score.
ALBUM_CUTOFF = 0.275
CUTOFF_SLOPE = 0.75
CUTOFF_QUANTILE = 0.985
LIBRARY_QUANTILE = 0.5
# How far a cut-off learned from a concept's rejected photos may move from its cut-off before
# marks, in confidence units: chosen on the validation split among 0, 0.1, 0.25, 0.5 and 1 by
# bench/albums.py. 0: with the per-concept cut-off above, the album F1 on the photos nobody
# marked is 1.000 before feedback on validation, and every learned shift lowered it (to 0.907),
# so the marks leave the cut-off where it is (they still take the rejected photos out).
MAX_LEARNED_SHIFT = 0.0
# The smallest own-to-library span: a concept whose photos do not stand out from the library
# still gets finite confidences.
MIN_SPAN = 1e-3


@dataclass(frozen=True)
class Calibration:
    """One concept's score scale: its own photos' typical score and the library's."""

    own: float  # mean leave-one-out score of the concept's photos
    library: float  # the library's LIBRARY_QUANTILE score

    @property
    def span(self) -> float:
        return max(self.own - self.library, MIN_SPAN)

    def confidence(self, scores: np.ndarray) -> np.ndarray:
        """Scores on the concept's scale: 0 = the library's LIBRARY_QUANTILE, 1 = a typical
        photo of the concept."""
        return (np.asarray(scores, dtype=np.float64) - self.library) / self.span

    def threshold(self, cutoff: float) -> float:
        """The raw score at confidence `cutoff`."""
        return self.library + cutoff * self.span


def learned_cutoff(
    scale: Calibration,
    own_scores: Sequence[float] | np.ndarray,
    rejected_scores: Sequence[float] | np.ndarray,
    default: float,
    max_shift: float | None = None,
) -> float:
    """The concept's own cut-off once a person rejected some of its photos: midway (in
    confidence units) between the lowest leave-one-out score of its own photos (the least
    typical photo of it that should still be in) and the highest score of a rejected photo
    (the most convincing look-alike that should be out), within `max_shift`
    (MAX_LEARNED_SHIFT) of `default`; `default` when there is nothing to learn from (no
    rejected or no own photo).

    Synthetic PerVL, one feedback round: album F1 on the photos nobody marked, against the
    global cut-off: docs/ALBUMS.md (bench/albums.py)."""
    if not len(own_scores) or not len(rejected_scores):
        return default
    low = float(scale.confidence(np.array([np.min(own_scores)]))[0])
    high = float(scale.confidence(np.array([np.max(rejected_scores)]))[0])
    mid = (low + high) / 2
    shift = MAX_LEARNED_SHIFT if max_shift is None else max_shift
    return float(np.clip(mid, default - shift, default + shift))


def concept_cutoff(
    scale: Calibration,
    library_scores: np.ndarray,
    base: float | None = None,
    slope: float | None = None,
    quantile: float | None = None,
) -> float:
    """The concept's cut-off before any mark: `base` (ALBUM_CUTOFF) plus `slope`
    (CUTOFF_SLOPE) times the confidence of the library's `quantile` (CUTOFF_QUANTILE) of its
    scores: the more library photos score close to the concept's own, the higher the bar (on
    validation: F1 0.910 -> 0.94 of the oracle's). `base` for an empty library or slope 0."""
    b = ALBUM_CUTOFF if base is None else base
    k = CUTOFF_SLOPE if slope is None else slope
    if not len(library_scores) or k == 0:
        return b
    q = CUTOFF_QUANTILE if quantile is None else quantile
    top = float(np.quantile(np.asarray(library_scores, dtype=np.float64), q))
    return b + k * float(scale.confidence(np.array([top]))[0])


def album_scores(
    mean: np.ndarray, whole: np.ndarray, regions: np.ndarray | Sequence[np.ndarray]
) -> np.ndarray:
    """Each photo's album score, (N,): the best cosine between the concept's photo mean (D,)
    and the photo's whole embedding or one of its region rows. whole (N, D); regions (N, R, D),
    or one (R_n, D) array per photo (R_n = 0: the whole embedding only)."""
    if not len(whole):
        return np.zeros(0, dtype=np.float32)
    out: np.ndarray = part_matches(np.asarray(mean, dtype=np.float32)[None], whole, regions)[0]
    return out


def leave_one_out(
    photos: np.ndarray,
    confirmed: np.ndarray | None = None,
    regions: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """Each of the concept's own photos scored by the photo mean of the others (and of the
    `confirmed` library photos, which are not scored: a person picked them because they ranked
    low, so they would not say what a typical photo scores), (n,), as `album_scores` scores a
    library photo: its best match among the whole photo and its `regions` (one (R_i, D) array
    per photo, R_i = 0 where none are known, e.g. a photo that is not in the library). A
    concept with one photo scores it against itself (1)."""
    photos = recipe.unit(np.asarray(photos, dtype=np.float32))
    dim = photos.shape[1]
    extra = np.zeros((0, dim), np.float32) if confirmed is None else confirmed
    rows = regions if regions is not None else [np.zeros((0, dim), np.float32)] * len(photos)
    out = np.zeros(len(photos), dtype=np.float32)
    for i in range(len(photos)):
        rest = np.concatenate([np.delete(photos, i, axis=0), extra])
        mean = recipe.photo_mean(rest if len(rest) else photos[i : i + 1])
        assert mean is not None
        out[i] = album_scores(mean, photos[i : i + 1], [rows[i]])[0]
    return out


def calibrate(
    own_scores: Sequence[float] | np.ndarray,
    library_scores: np.ndarray,
    quantile: float | None = None,
) -> Calibration:
    """The concept's scale from its own photos' leave-one-out scores and the library's scores
    (leave the concept's own library photos out): `library` is their `quantile`
    (LIBRARY_QUANTILE); their median when that quantile reaches `own` (look-alikes that
    outscore the concept's own photos, or a concept in more of the library's photos than the
    quantile leaves out: no validation concept at the chosen quantile); an empty library: 0,
    the cosine of unrelated vectors."""
    q = LIBRARY_QUANTILE if quantile is None else quantile
    own = float(np.mean(own_scores)) if len(own_scores) else 1.0
    if not len(library_scores):
        return Calibration(own=own, library=0.0)
    scores = np.asarray(library_scores, dtype=np.float64)
    library = float(np.quantile(scores, q))
    if library >= own:
        library = float(np.median(scores))
    return Calibration(own=own, library=library)


def has_scale(
    own_scores: Sequence[float] | np.ndarray, library_scores: np.ndarray, quantile: float
) -> bool:
    """Whether the concept's own photos outscore the library's `quantile` (else `calibrate`
    falls back to the median)."""
    own = float(np.mean(own_scores)) if len(own_scores) else 1.0
    return not len(library_scores) or float(np.quantile(library_scores, quantile)) < own
