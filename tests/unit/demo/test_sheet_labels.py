"""The demo sheet's labels keep their spaces ("Fido on the beach", not "Fidoon the beach")."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from app.demo.run_demo import draw_label


def _blank_runs(text: str) -> list[int]:
    """Widths of the ink-free column runs between the first and the last inked column."""
    im = Image.new("L", (400, 24), 255)
    draw_label(ImageDraw.Draw(im), (2, 4), text)
    cols = (np.asarray(im) < 128).any(axis=0)
    inked = np.flatnonzero(cols)
    runs, run = [], 0
    for c in cols[inked[0] : inked[-1] + 1]:
        if c:
            if run:
                runs.append(run)
            run = 0
        else:
            run += 1
    return runs


def test_every_space_is_wider_than_any_gap_inside_a_word():
    text = 'Personalized: "Fido on the beach"'
    inside = max(max(_blank_runs(word)) for word in text.split() if len(_blank_runs(word)))
    between = sorted(_blank_runs(text), reverse=True)[: text.count(" ")]
    # The spaces are the widest gaps, each clearly wider than any gap between two letters.
    assert min(between) >= inside + 2, (between, inside)
    assert len([r for r in _blank_runs(text) if r > inside]) == text.count(" ")
