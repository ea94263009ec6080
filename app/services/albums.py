"""Concept albums and feedback: every photo of Fido, and "this is / not Fido" marks that teach.

A concept's album is the user's library photos the service believes show it: those whose
confidence (`app.services.calibration`: the best match of the concept's photos with the photo
or one of its stored regions, on the concept's own scale) reaches the concept's cut-off. Each
version of a concept keeps the score of every library vector in the process
(`_LibraryScores`, about 150 bytes a photo with its region layout key) and scores only what
changed since the last request (photos added, regions stored: one read of the (vec id, region
layout) pairs, then the new rows), so photos indexed after the concept was trained appear
without anyone asking. The photos it was taught from (the same content in the library) and the
photos a person confirmed are always in it; the photos a person rejected never are.

Marks are kept as history (`ConceptVerdict` rows; a new mark or an undo ends the previous one)
and every change starts a new version of the concept through the usual training job: confirmed
photos are more examples, rejected ones negatives (app.ml.train.away_from). docs/ALBUMS.md.
"""

from __future__ import annotations

import base64
import binascii
import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from sqlalchemy.orm import Session

from app import repositories
from app.errors import InvalidCursor, NotFound, ValidationFailed
from app.ml.adapter import ConceptAdapter
from app.ml.model import AdapterMismatchError
from app.ml.regions import split_regions, unpack_regions
from app.models import Adapter, Concept, ConceptVerdict, Image, Job, Verdict, new_id, utcnow
from app.services import calibration, recipe, training
from app.services.concepts import ConceptView, get_concept, start_new_version
from app.services.images import PhotoEnv
from app.services.jobs import JobQueue, enqueue_committed
from app.services.model import ServingModel
from app.services.search import AdapterCache, SearchEnv

AlbumOrder = Literal["newest", "confidence"]
Reason = Literal["confirmed", "taught", "matched"]
_MALFORMED = "malformed cursor: pass back next_cursor unchanged"


@dataclass(frozen=True)
class AlbumPhoto:
    """A photo in an album, with why it is there."""

    image: Image
    score: float | None  # calibration.album_scores; None: not embedded by this model
    confidence: float | None  # on the concept's scale (calibration.Calibration.confidence)
    reason: Reason  # confirmed by a person, taught from, or matched at the cut-off
    verdict: str | None  # the photo's current mark for the concept


@dataclass
class Album:
    """One page of a concept's album."""

    concept: Concept
    version: int | None  # the adapter version that scored it; None: none trained yet
    cutoff: float
    calibration: calibration.Calibration | None
    items: list[AlbumPhoto]
    total: int  # photos in the whole album
    next_cursor: str | None
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ImageConcept:
    """A concept a photo shows."""

    concept: Concept
    score: float | None
    confidence: float | None
    reason: Reason
    verdict: str | None


@dataclass(frozen=True)
class VerdictChange:
    """A concept after a mark (or its undo), and the job training its next version."""

    view: ConceptView
    mark: ConceptVerdict | None  # the active mark now (None after an undo)
    job: Job | None  # None when nothing retrains


@dataclass(frozen=True)
class _Scorer:
    """A concept's album scores over the library as stored now, and its scale."""

    scale: calibration.Calibration
    own: np.ndarray  # (n,) leave-one-out scores of the concept's own photos
    vec_ids: np.ndarray  # (N,) int64: every vector of the library
    scores: np.ndarray  # (N,) its album score (calibration.album_scores)
    others: np.ndarray  # the scores of the library photos not known to show the concept

    def cutoff(self, base: float) -> float:
        """The concept's cut-off before any mark (calibration.concept_cutoff)."""
        return calibration.concept_cutoff(self.scale, self.others, base)

    def score_of(self, vec_id: int) -> float | None:
        """The album score of one library vector; None when it is not in the library."""
        at = int(np.searchsorted(self.vec_ids, vec_id))
        if at < len(self.vec_ids) and int(self.vec_ids[at]) == vec_id:
            return float(self.scores[at])
        return None


@dataclass
class _LibraryScores:
    """One concept version's album score of each library vector, kept between requests and
    brought up to date by difference (vectors added or gone, regions stored since)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    keys: dict[int, str | None] = field(default_factory=dict)  # vec id -> its region layout
    vec_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))


# --- scoring ------------------------------------------------------------------------------------


def _adapter(
    adapter_cache: AdapterCache, row: Adapter | None, serving: ServingModel
) -> ConceptAdapter | None:
    if row is None:
        return None
    adapter = adapter_cache.get(row)
    try:
        adapter.check_compatible(serving.bundle.fingerprint)
    except AdapterMismatchError:
        return None
    return adapter


def _stack(blobs: list[bytes], dim: int) -> np.ndarray:
    if not blobs:
        return np.zeros((0, dim), np.float32)
    return np.stack([np.frombuffer(b, np.float32) for b in blobs])


def _score_vectors(
    db_session: Session, user_id: str, vec_ids: list[int], mean: np.ndarray, dim: int
) -> tuple[list[int], np.ndarray]:
    """Album scores of those library vectors (whole embedding and every stored region row:
    calibration.album_scores); vectors deleted meanwhile are left out."""
    rows = repositories.image_vectors(db_session=db_session, user_id=user_id, vec_ids=vec_ids)
    found = [v for v in vec_ids if v in rows and rows[v].embedding is not None]
    if not found:
        return [], np.zeros(0, np.float32)
    whole = np.stack([np.frombuffer(rows[v].embedding, np.float32) for v in found])  # type: ignore[arg-type]
    regions = [_region_rows(rows[v], dim) for v in found]
    return found, calibration.album_scores(mean, whole, regions)


def _library_scores(
    db_session: Session,
    user_id: str,
    serving: ServingModel,
    mean: np.ndarray,
    held: _LibraryScores,
) -> tuple[np.ndarray, np.ndarray]:
    """(vec ids sorted, album scores) of every vector of the user's library: the ones scored
    before are kept, new vectors (and vectors whose regions were stored since) are scored."""
    dim = serving.bundle.embed_dim
    now = dict(
        repositories.embedded_region_layouts(
            db_session=db_session, user_id=user_id, model_id=serving.model_id
        )
    )
    with held.lock:
        if now == held.keys:
            return held.vec_ids, held.scores
        known = dict(zip(held.vec_ids.tolist(), held.scores.tolist(), strict=True))
        fresh = [v for v, key in now.items() if v not in known or held.keys.get(v) != key]
        scored = {v: s for v, s in known.items() if v in now and held.keys.get(v) == now[v]}
        for start in range(0, len(fresh), 900):
            ids, new = _score_vectors(db_session, user_id, fresh[start : start + 900], mean, dim)
            scored.update(zip(ids, new.tolist(), strict=True))
        vec_ids = np.array(sorted(scored), dtype=np.int64)
        held.vec_ids = vec_ids
        held.scores = np.array([scored[v] for v in vec_ids.tolist()], dtype=np.float32)
        held.keys = {v: now[v] for v in scored}
        return held.vec_ids, held.scores


def _region_rows(stored: repositories.ImageVectors | None, dim: int) -> np.ndarray:
    """Every stored region row of an image, (R, D); (0, D) when none are stored."""
    if stored is None:
        return np.zeros((0, dim), np.float32)
    by_kind = split_regions(unpack_regions(stored.regions, dim), stored.region_layout)
    return np.concatenate(list(by_kind.values())) if by_kind else np.zeros((0, dim), np.float32)


def _mean_and_own(
    db_session: Session, user_id: str, row: Adapter, serving: ServingModel
) -> tuple[np.ndarray | None, np.ndarray]:
    """The version's photo mean (its photos and the confirmed ones it trained on) and the
    leave-one-out scores of its photos, each matched on its regions too when the same photo is
    in the library (calibration.leave_one_out); a few rows, read at each request, so regions
    stored since count at once."""
    dim = serving.bundle.embed_dim
    examples = repositories.adapter_examples(
        db_session=db_session, adapter=row, model_id=serving.model_id
    )
    _, confirmed = repositories.adapter_photo_embeddings_by_kind(
        db_session=db_session, adapter=row, model_id=serving.model_id
    )
    own, extra = _stack([e for _, e in examples], dim), _stack(confirmed, dim)
    mean = recipe.photo_mean(np.concatenate([own, extra]))
    if not len(own):
        return mean, np.zeros(0, np.float32)
    library = repositories.library_regions_by_hash(
        db_session=db_session,
        user_id=user_id,
        model_id=serving.model_id,
        hashes=[h for h, _ in examples],
    )
    regions = [_region_rows(library.get(h), dim) for h, _ in examples]
    return mean, calibration.leave_one_out(own, extra, regions)


def _scorer(
    db_session: Session,
    user_id: str,
    row: Adapter,
    serving: ServingModel,
    adapter_cache: AdapterCache,
    own_photos: Iterable[int],
) -> _Scorer | None:
    """The version's album scores and calibration over the library as stored now; None when
    none of its photos is embedded by the serving model. `own_photos`: the vec ids of the
    library photos known to show the concept (taught, confirmed), left out of the library's
    side of the scale (in a small library they would be its top)."""

    mean, own = _mean_and_own(db_session, user_id, row, serving)
    if mean is None:
        return None
    held = adapter_cache.memo(f"album-library:{row.id}:{serving.model_id}", _LibraryScores)
    vec_ids, scores = _library_scores(db_session, user_id, serving, mean, held)
    known = np.array(list(own_photos), dtype=np.int64)
    others = scores[~np.isin(vec_ids, known)]
    return _Scorer(calibration.calibrate(own, others), own, vec_ids, scores, others)


def _own_photos(db_session: Session, user_id: str, concept_id: str) -> list[int]:
    """The vec ids of the library photos known to show the concept: taught from, confirmed."""
    taught = repositories.taught_library_images(
        db_session=db_session, user_id=user_id, concept_id=concept_id
    )
    marks = repositories.active_verdicts(db_session=db_session, concept_id=concept_id)
    confirmed = [i for i, v in marks.items() if v.verdict == Verdict.CONFIRMED]
    images = repositories.get_images(db_session=db_session, user_id=user_id, image_ids=confirmed)
    return [i.vec_id for i in taught] + [i.vec_id for i in images.values()]


def _cutoff(
    db_session: Session,
    user_id: str,
    scorer: _Scorer,
    rejected: list[str],
    default: float,
) -> float:
    """The concept's cut-off: learned from its rejected photos when it has some
    (calibration.learned_cutoff), `default` otherwise."""
    if not rejected:
        return default
    images = repositories.get_images(db_session=db_session, user_id=user_id, image_ids=rejected)
    scores = [scorer.score_of(i.vec_id) for i in images.values()]
    found = [s for s in scores if s is not None]
    return calibration.learned_cutoff(scorer.scale, scorer.own, found, default)


# --- the album ----------------------------------------------------------------------------------


def _sort_key(photo: AlbumPhoto, order: AlbumOrder) -> tuple[float, str]:
    """Ascending sort key: newest (by when added) or most confident first; ties by id."""
    if order == "newest":
        return (-photo.image.created_at.timestamp(), photo.image.id)
    conf = photo.confidence
    return (math.inf if conf is None else -conf, photo.image.id)


def _encode_cursor(order: AlbumOrder, key: tuple[float, str]) -> str:
    raw = f"{order}|{key[0]!r}|{key[1]}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str, order: AlbumOrder) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        kind, value, image_id = raw.split("|")
        key = (float(value), image_id)
    except (binascii.Error, UnicodeError, ValueError) as e:
        raise InvalidCursor(_MALFORMED) from e
    if kind != order or math.isnan(key[0]):
        raise InvalidCursor(f"{_MALFORMED} (and keep the same order)")
    return key


@dataclass(frozen=True, kw_only=True)
class AlbumRequest:
    """Which page of an album: its order, size and cursor; `cutoff` replaces the concept's
    (benchmarks and tests)."""

    order: AlbumOrder = "newest"
    limit: int = 50
    cursor: str | None = None
    cutoff: float | None = None


def concept_album(user_id: str, concept_id: str, request: AlbumRequest, env: SearchEnv) -> Album:
    """A page of the concept's album (NotFound for a missing or foreign concept); `cutoff`:
    unless given, the concept's (calibration.concept_cutoff), learned once it has rejected
    photos (calibration.learned_cutoff)."""
    db_session, serving, adapter_cache = env.db_session, env.serving, env.adapter_cache
    order, limit, cursor = request.order, request.limit, request.cursor
    fixed = request.cutoff
    cutoff = calibration.ALBUM_CUTOFF if fixed is None else fixed
    concept = get_concept(user_id, concept_id, db_session=db_session).concept
    after = _decode_cursor(cursor, order) if cursor else None
    verdicts = repositories.active_verdicts(db_session=db_session, concept_id=concept.id)
    rejected = [i for i, v in verdicts.items() if v.verdict == Verdict.REJECTED]
    never = set(rejected)
    confirmed = [i for i, v in verdicts.items() if v.verdict == Verdict.CONFIRMED]
    row = repositories.latest_adapters(db_session=db_session, concept_ids=[concept.id]).get(
        concept.id
    )
    adapter = _adapter(adapter_cache, row, serving)
    warnings: list[str] = []
    members: dict[str, tuple[Image, Reason]] = {}
    for image in repositories.taught_library_images(
        db_session=db_session, user_id=user_id, concept_id=concept.id
    ):
        members[image.id] = (image, "taught")
    for image in repositories.get_images(
        db_session=db_session, user_id=user_id, image_ids=confirmed
    ).values():
        members[image.id] = (image, "confirmed")
    scores: dict[str, float] = {}
    scale = None
    scorer = None
    if adapter is not None and row is not None:
        own_photos = [image.vec_id for image, _ in members.values()]
        scorer = _scorer(db_session, user_id, row, serving, adapter_cache, own_photos)
    if scorer is None:
        warnings.append(
            f"'{concept.name}' has no trained version for the serving model yet: the album holds "
            "only the photos it was taught from and the ones confirmed"
        )
    else:
        scale = scorer.scale
        if fixed is None:
            cutoff = _cutoff(db_session, user_id, scorer, rejected, scorer.cutoff(cutoff))
        keep = scale.confidence(scorer.scores) >= cutoff
        found, vec_ids = scorer.scores[keep], scorer.vec_ids[keep]
        images = repositories.images_by_vec_id(
            db_session=db_session, user_id=user_id, vec_ids=vec_ids.tolist()
        )
        for sc, v in zip(found.tolist(), vec_ids.tolist(), strict=True):
            hit = images.get(v)
            if hit is not None:  # deleted since the scores were read: absent
                scores[hit.id] = sc
                members.setdefault(hit.id, (hit, "matched"))
        for image_id, (image, _) in members.items():
            if image_id not in scores and (known := scorer.score_of(image.vec_id)) is not None:
                scores[image_id] = known
    photos = []
    for image_id, (image, reason) in members.items():
        if image_id in never:
            continue  # never shown again
        s = scores.get(image_id)
        conf = None if s is None or scale is None else float(scale.confidence(np.array([s]))[0])
        mark = verdicts.get(image_id)
        photos.append(AlbumPhoto(image, s, conf, reason, mark.verdict if mark else None))
    photos.sort(key=lambda p: _sort_key(p, order))
    if after is not None:
        photos_after = [p for p in photos if _sort_key(p, order) > after]
    else:
        photos_after = photos
    page = photos_after[:limit]
    more = len(photos_after) > limit
    return Album(
        concept=concept,
        version=row.version if adapter is not None and row is not None else None,
        cutoff=cutoff,
        calibration=scale,
        items=page,
        total=len(photos),
        next_cursor=_encode_cursor(order, _sort_key(page[-1], order)) if more else None,
        warnings=warnings,
    )


def image_concepts(
    user_id: str, image_id: str, env: SearchEnv, *, cutoff: float | None = None
) -> list[ImageConcept]:
    """The user's concepts whose album holds the image, most confident first (NotFound for a
    missing or foreign image); each concept's cut-off as in its album (`concept_album`)."""
    db_session, serving, adapter_cache = env.db_session, env.serving, env.adapter_cache
    default = calibration.ALBUM_CUTOFF if cutoff is None else cutoff
    image = repositories.get_image(db_session=db_session, user_id=user_id, image_id=image_id)
    if image is None:
        raise NotFound.of("image")
    concepts = repositories.user_concepts(db_session=db_session, user_id=user_id)
    if not concepts:
        return []
    verdicts = repositories.image_verdicts(
        db_session=db_session, user_id=user_id, image_id=image.id
    )
    taught = repositories.concepts_taught_with(
        db_session=db_session, user_id=user_id, sha256=image.sha256
    )
    rows = repositories.latest_adapters(db_session=db_session, concept_ids=[c.id for c in concepts])
    out = []
    for concept in concepts:
        verdict = verdicts.get(concept.id)
        if verdict == Verdict.REJECTED:
            continue
        score = conf = None
        at = default
        row = rows.get(concept.id)
        adapter = _adapter(adapter_cache, row, serving)
        scorer = None
        if adapter is not None and row is not None:
            scorer = _scorer(
                db_session,
                user_id,
                row,
                serving,
                adapter_cache,
                _own_photos(db_session, user_id, concept.id),
            )
        if scorer is not None and (score := scorer.score_of(image.vec_id)) is not None:
            conf = float(scorer.scale.confidence(np.array([score]))[0])
            if cutoff is None and verdict is None and concept.id not in taught:
                # Only a photo that could be "matched" needs its concept's own cut-off.
                marks = repositories.active_verdicts(db_session=db_session, concept_id=concept.id)
                rejected = [i for i, v in marks.items() if v.verdict == Verdict.REJECTED]
                at = _cutoff(db_session, user_id, scorer, rejected, scorer.cutoff(default))
        reason: Reason
        if verdict == Verdict.CONFIRMED:
            reason = "confirmed"
        elif concept.id in taught:
            reason = "taught"
        elif conf is not None and conf >= at:
            reason = "matched"
        else:
            continue
        out.append(ImageConcept(concept, score, conf, reason, verdict))
    out.sort(key=lambda c: (math.inf if c.confidence is None else -c.confidence, c.concept.id))
    return out


# --- feedback -----------------------------------------------------------------------------------


def _check_verdict(verdict: str) -> Verdict:
    try:
        return Verdict(verdict)
    except ValueError as e:
        raise ValidationFailed(
            f"verdict must be one of {', '.join(v.value for v in Verdict)}, not {verdict!r}",
            code="invalid_verdict",
        ) from e


def _teaches(verdict: str | None) -> bool:
    """Whether a photo's mark changes what the concept's next version learns."""
    if verdict == Verdict.REJECTED:
        return True
    return verdict == Verdict.CONFIRMED and training.TRAIN_ON_CONFIRMED


def _marked(
    db_session: Session, user_id: str, concept_id: str, image_id: str
) -> tuple[Concept, Image]:
    """The concept (locked) and the image, both the user's; NotFound for either."""
    concept = repositories.get_concept(
        db_session=db_session, user_id=user_id, concept_id=concept_id, lock=True
    )
    if concept is None:
        raise NotFound.of("concept")
    image = repositories.get_image(db_session=db_session, user_id=user_id, image_id=image_id)
    if image is None:
        raise NotFound.of("image")
    return concept, image


def set_verdict(
    user_id: str, concept_id: str, image_id: str, verdict: str, env: PhotoEnv
) -> VerdictChange:
    """Mark a library photo "this is <concept>" (confirmed) or "not <concept>" (rejected); a
    change that alters what the concept learns (a rejection, or its end; a confirmation when
    training.TRAIN_ON_CONFIRMED) starts its next version. The same mark again changes nothing."""
    db_session, queue = env.db_session, env.queue
    wanted = _check_verdict(verdict)
    try:
        concept, image = _marked(db_session, user_id, concept_id, image_id)
        active = repositories.active_verdict(
            db_session=db_session, concept_id=concept.id, image_id=image.id, lock=True
        )
        if active is not None and active.verdict == wanted:
            db_session.rollback()
            return VerdictChange(
                get_concept(user_id, concept.id, db_session=db_session), active, None
            )
        now = utcnow()
        if active is not None:
            active.ended_at = now
            db_session.flush()  # the unique active mark is free before the new one
        mark = ConceptVerdict(
            id=new_id(),
            user_id=user_id,
            concept_id=concept.id,
            image_id=image.id,
            verdict=wanted.value,
            concept_version=concept.version,
            created_at=now,
        )
        db_session.add(mark)
        teaches = _teaches(wanted) or _teaches(active.verdict if active else None)
        job = start_new_version(db_session, concept) if teaches else None
        db_session.commit()
    except BaseException:
        db_session.rollback()
        raise
    enqueue_committed(queue, job)
    return VerdictChange(get_concept(user_id, concept.id, db_session=db_session), mark, job)


def undo_verdict(
    user_id: str, concept_id: str, image_id: str, *, db_session: Session, queue: JobQueue
) -> VerdictChange:
    """Take back the photo's mark (kept in the history as ended); the concept retrains without
    it when the mark taught it. NotFound (`no_verdict`) when the photo has no mark for it."""
    try:
        concept, image = _marked(db_session, user_id, concept_id, image_id)
        active = repositories.active_verdict(
            db_session=db_session, concept_id=concept.id, image_id=image.id, lock=True
        )
        if active is None:
            raise NotFound("this photo has no mark for this concept", code="no_verdict")
        active.ended_at = utcnow()
        job = start_new_version(db_session, concept) if _teaches(active.verdict) else None
        db_session.commit()
    except BaseException:
        db_session.rollback()
        raise
    enqueue_committed(queue, job)
    return VerdictChange(get_concept(user_id, concept.id, db_session=db_session), None, job)


def verdict_history(
    user_id: str, concept_id: str, *, limit: int, cursor: str | None, db_session: Session
) -> repositories.Page[ConceptVerdict]:
    """Every mark of the concept, undone and replaced ones too, newest first."""
    concept = get_concept(user_id, concept_id, db_session=db_session).concept
    return repositories.verdict_history_page(
        db_session=db_session, concept_id=concept.id, limit=limit, cursor=cursor
    )


__all__ = [
    "Album",
    "AlbumPhoto",
    "ImageConcept",
    "VerdictChange",
    "concept_album",
    "image_concepts",
    "set_verdict",
    "undo_verdict",
    "verdict_history",
]
