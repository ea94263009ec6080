"""The album's cut-off learned from a concept's rejected photos (app.services.calibration)."""

from __future__ import annotations

import numpy as np
import pytest

from app.services import calibration
from app.services.calibration import Calibration, learned_cutoff

SCALE = Calibration(own=0.8, library=0.2)  # confidence = (score - 0.2) / 0.6


def test_midway_between_the_least_typical_own_photo_and_the_best_rejected_one():
    own = [0.8, 0.74, 0.86]  # confidences 1.0, 0.9, 1.1
    rejected = [0.5, 0.77]  # confidences 0.5, 0.95
    assert learned_cutoff(SCALE, own, rejected, 1.0, 0.25) == pytest.approx((0.9 + 0.95) / 2)


@pytest.mark.parametrize("shift", [0.0, 0.25, None])
def test_within_the_allowed_shift_of_the_default(shift):
    bound = calibration.MAX_LEARNED_SHIFT if shift is None else shift
    own = [0.8]  # confidence 1
    far_above = [2.0]  # confidence 3: midway is 2
    assert learned_cutoff(SCALE, own, far_above, 0.95, shift) == pytest.approx(0.95 + bound)
    far_below = [-2.0]  # confidence about -3.7
    assert learned_cutoff(SCALE, own, far_below, 0.95, shift) == pytest.approx(0.95 - bound)


@pytest.mark.parametrize(("own", "rejected"), [([0.8], []), ([], [0.5]), ([], [])])
def test_nothing_to_learn_from_keeps_the_default(own, rejected):
    assert learned_cutoff(SCALE, own, np.array(rejected), 0.95) == 0.95


def test_the_threshold_in_score_units_is_where_the_confidence_reaches_it():
    cut = learned_cutoff(SCALE, [0.74], [0.77], 1.0, 0.25)
    assert SCALE.confidence(np.array([SCALE.threshold(cut)]))[0] == pytest.approx(cut)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_album_score_is_the_best_match_of_the_whole_photo_or_a_region():
    mean = np.array([1.0, 0.0, 0.0], np.float32)
    whole = _unit(np.array([[0.6, 0.8, 0.0], [0.0, 1.0, 0.0]], np.float32))
    # photo 0: the concept fills one region; photo 1: nowhere
    regions = _unit(np.array([[[0.9, 0.1, 0.0], [0.0, 0.0, 1.0]], [[0.0, 0.6, 0.8]] * 2]))
    scores = calibration.album_scores(mean, whole, regions.astype(np.float32))
    assert scores[0] == pytest.approx(float(regions[0, 0] @ mean), abs=1e-6)
    assert scores[1] == pytest.approx(0.0, abs=1e-6)
    # an image stored without regions is matched on its whole embedding
    ragged = [regions[0].astype(np.float32), np.zeros((0, 3), np.float32)]
    again = calibration.album_scores(mean, whole, ragged)
    assert again[0] == pytest.approx(scores[0], abs=1e-6)
    assert again[1] == pytest.approx(float(whole[1] @ mean), abs=1e-6)


def test_leave_one_out_scores_each_photo_by_the_mean_of_the_others():
    rng = np.random.default_rng(0)
    photos = _unit(rng.normal(size=(4, 8))).astype(np.float32)
    extra = _unit(rng.normal(size=(2, 8))).astype(np.float32)
    own = calibration.leave_one_out(photos, extra)
    for i in range(4):
        rest = np.concatenate([np.delete(photos, i, axis=0), extra])
        assert own[i] == pytest.approx(float(photos[i] @ _unit(rest.mean(axis=0))), abs=1e-5)
    assert calibration.leave_one_out(photos[:1])[0] == pytest.approx(1.0, abs=1e-6)


def test_the_library_side_of_the_scale_is_its_quantile():
    library = np.linspace(0.0, 1.0, 101)
    scale = calibration.calibrate([1.2, 1.4], library, 0.9)
    assert scale.library == pytest.approx(0.9)
    assert scale.own == pytest.approx(1.3)
    assert scale.confidence(np.array([0.9, 1.3])) == pytest.approx([0.0, 1.0])
    default = calibration.calibrate([1.2, 1.4], library)
    assert default.library == pytest.approx(calibration.LIBRARY_QUANTILE)
    assert calibration.calibrate([0.5], np.zeros(0)).library == 0.0


def test_a_library_quantile_the_own_photos_do_not_outscore_falls_back_to_the_median():
    library = np.linspace(0.0, 1.0, 101)
    assert not calibration.has_scale([0.8], library, 0.9)
    scale = calibration.calibrate([0.8], library, 0.9)
    assert scale.library == pytest.approx(0.5)
    assert calibration.has_scale([0.95], library, 0.9)


def test_the_cutoff_rises_with_the_top_of_the_library():
    library = np.linspace(0.0, 1.0, 101)
    scale = calibration.calibrate([0.9], library, 0.5)  # confidence = (s - 0.5) / 0.4
    assert calibration.concept_cutoff(scale, library, 0.3, 0.0, 0.99) == 0.3
    raised = calibration.concept_cutoff(scale, library, 0.3, 0.5, 0.99)
    assert raised == pytest.approx(0.3 + 0.5 * (0.99 - 0.5) / 0.4)
    # two libraries, the same median: look-alikes crowding the top raise the bar
    calm = np.concatenate([np.full(95, 0.5), np.linspace(0.5, 0.6, 5)])
    crowded = np.concatenate([np.full(95, 0.5), np.full(5, 0.88)])
    calm_cut = calibration.concept_cutoff(scale, calm, 0.3, 0.5, 0.97)
    assert calibration.concept_cutoff(scale, crowded, 0.3, 0.5, 0.97) > calm_cut
    assert calibration.concept_cutoff(scale, np.zeros(0), 0.3, 0.5, 0.99) == 0.3
