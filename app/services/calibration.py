"""A concept's album cut-off, calibrated per concept: pure math on the model, no database.

The album ranks library photos by the concept's *album vector*: the search vector of the query
that names the concept and nothing else ("Fido": the placeholder phrase under the concept's
update, fused with its photos' mean, `app.services.recipe`). Raw cosines mean different things
for different concepts, so each score is put on the concept's own scale:

    confidence = (score - library) / (own - library)

`own` is the mean leave-one-out score of the concept's own photos (each photo scored by the
vector built from the *other* photos: what a new photo of the concept scores; photos a person
confirmed help build the vector but are not scored: they were picked for ranking low), `library` the
median score of the user's library (most photos are not of the concept). So 0 is a typical
library photo, 1 a typical photo of the concept; a photo is in the album from the cut-off up:
`ALBUM_CUTOFF` (chosen on the benchmark's validation split: docs/ALBUMS.md) until a person
has rejected photos of the concept, then one learned per concept from its labelled photos
(`learned_cutoff`: midway between its least typical own photo and its most convincing
rejected one). The service and the benchmark (bench/albums.py) both call these functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from app.config import SearchSettings
from app.ml.adapter import ConceptAdapter
from app.ml.model import ClipBundle
from app.ml.train import placeholder_phrase
from app.services import recipe

# Where the album starts, in confidence units (chosen on the synthetic PerVL validation split by
# bench/albums.py; docs/ALBUMS.md has the sweep).
ALBUM_CUTOFF = 0.95
# How far a cut-off learned from a concept's marks may move from ALBUM_CUTOFF, in confidence units
# (the learned cut-offs of the validation split lie within 0.1 of it; bounded so that one odd
# mark cannot empty or flood an album).
MAX_LEARNED_SHIFT = 0.25
# The smallest own-to-library span: a concept whose photos do not stand out from the library
# still gets finite confidences.
MIN_SPAN = 1e-3


@dataclass(frozen=True)
class Calibration:
    """One concept's score scale: its own photos' typical score and the library's."""

    own: float  # mean leave-one-out score of the concept's photos
    library: float  # median score of the library

    @property
    def span(self) -> float:
        return max(self.own - self.library, MIN_SPAN)

    def confidence(self, scores: np.ndarray) -> np.ndarray:
        """Scores on the concept's scale: 0 = a typical library photo, 1 = a typical photo of
        the concept."""
        return (np.asarray(scores, dtype=np.float64) - self.library) / self.span

    def threshold(self, cutoff: float) -> float:
        """The raw score at confidence `cutoff`."""
        return self.library + cutoff * self.span


def learned_cutoff(
    scale: Calibration,
    own_scores: Sequence[float] | np.ndarray,
    rejected_scores: Sequence[float] | np.ndarray,
    default: float,
) -> float:
    """The concept's own cut-off once a person rejected some of its photos: midway (in
    confidence units) between the lowest leave-one-out score of its own photos (the least
    typical photo of it that should still be in) and the highest score of a rejected photo
    (the most convincing look-alike that should be out), within MAX_LEARNED_SHIFT of
    `default`; `default` when there is nothing to learn from (no rejected or no own photo).

    Synthetic PerVL, one feedback round: album F1 on the photos nobody marked 0.839 -> 0.883 on
    validation, 0.877 -> 0.932 on test; at the global cut-off 0.826 and 0.877 (bench/albums.py)."""
    if not len(own_scores) or not len(rejected_scores):
        return default
    low = float(scale.confidence(np.array([np.min(own_scores)]))[0])
    high = float(scale.confidence(np.array([np.max(rejected_scores)]))[0])
    mid = (low + high) / 2
    return float(np.clip(mid, default - MAX_LEARNED_SHIFT, default + MAX_LEARNED_SHIFT))


def album_text(adapter: ConceptAdapter) -> str:
    """What the album searches for: the concept's placeholder phrase alone."""
    return placeholder_phrase(adapter.token, adapter.category)


def album_vector(
    bundle: ClipBundle,
    adapter: ConceptAdapter,
    photos: np.ndarray,
    settings: SearchSettings,
) -> np.ndarray:
    """The concept's album vector, (D,) unit: the search vector of its name alone."""
    mean = recipe.photo_mean(photos)
    encoding = recipe.encode_query(bundle, album_text(adapter), [adapter], [mean], settings)
    vector: np.ndarray = encoding.vector[0]
    return vector


def leave_one_out(
    bundle: ClipBundle,
    adapter: ConceptAdapter,
    photos: np.ndarray,
    settings: SearchSettings,
    confirmed: np.ndarray | None = None,
) -> np.ndarray:
    """Each of the concept's own photos scored by the album vector built from the others (and
    the `confirmed` library photos, which are not scored: a person picked them because they
    ranked low, so they would not say what a typical photo scores), (n,)."""
    photos = recipe.unit(np.asarray(photos, dtype=np.float32))
    extra = np.zeros((0, photos.shape[1]), np.float32) if confirmed is None else confirmed
    out = np.zeros(len(photos), dtype=np.float32)
    for i in range(len(photos)):  # n <= a few dozen: one short text pass each
        rest = np.concatenate([np.delete(photos, i, axis=0), extra])
        q = album_vector(bundle, adapter, rest, settings)
        out[i] = float(photos[i] @ q)
    return out


def calibrate(own_scores: Sequence[float] | np.ndarray, library_scores: np.ndarray) -> Calibration:
    """The concept's scale from its own photos' leave-one-out scores and the library's scores
    (an empty library: 0, the cosine of unrelated vectors)."""
    own = float(np.mean(own_scores)) if len(own_scores) else 1.0
    library = float(np.median(library_scores)) if len(library_scores) else 0.0
    return Calibration(own=own, library=library)
