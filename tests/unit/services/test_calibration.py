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
    assert learned_cutoff(SCALE, own, rejected, 1.0) == pytest.approx((0.9 + 0.95) / 2)


def test_within_the_allowed_shift_of_the_default():
    own = [0.8]  # confidence 1
    far_above = [2.0]  # confidence 3: midway is 2
    assert learned_cutoff(SCALE, own, far_above, 0.95) == pytest.approx(
        0.95 + calibration.MAX_LEARNED_SHIFT
    )
    far_below = [-2.0]  # confidence about -3.7
    assert learned_cutoff(SCALE, own, far_below, 0.95) == pytest.approx(
        0.95 - calibration.MAX_LEARNED_SHIFT
    )


@pytest.mark.parametrize(("own", "rejected"), [([0.8], []), ([], [0.5]), ([], [])])
def test_nothing_to_learn_from_keeps_the_default(own, rejected):
    assert learned_cutoff(SCALE, own, np.array(rejected), 0.95) == 0.95


def test_the_threshold_in_score_units_is_where_the_confidence_reaches_it():
    cut = learned_cutoff(SCALE, [0.74], [0.77], 1.0)
    assert SCALE.confidence(np.array([SCALE.threshold(cut)]))[0] == pytest.approx(cut)
