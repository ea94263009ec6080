"""Which queries ask for a concept alone (app.services.recipe.is_concept_only)."""

from __future__ import annotations

import pytest
import torch

from app.ml.adapter import ConceptAdapter
from app.ml.model import ModelFingerprint
from app.services.recipe import is_concept_only


def _adapter(token: str, category: str | None) -> ConceptAdapter:
    return ConceptAdapter(
        b=torch.zeros(4), a=torch.ones(4), fingerprint=ModelFingerprint("m", "p", "0" * 64),
        token=token, category=category, lam=0.0, steps=1, lr=1e-3, final_loss=0.0,
    )  # fmt: skip


FIDO = _adapter("httr", "hat")


@pytest.mark.parametrize(
    "text",
    ["httr hat", "An image of httr hat", "photos of my httr hat",
     "Show me all pictures of httr hat", "  a   photo of  HTTR HAT "],
)  # fmt: skip
def test_the_concept_alone(text: str) -> None:
    assert is_concept_only(text, [FIDO])


@pytest.mark.parametrize(
    "text",
    ["httr hat on the beach", "a photo of httr hat at night", "red httr hat", "httr hats",
     "httr", "a photo of a hat", "", "photos of my httr hat with rcn"],
)  # fmt: skip
def test_anything_else_to_look_for(text: str) -> None:
    assert not is_concept_only(text, [FIDO])


def test_never_with_several_concepts_or_none() -> None:
    rex = _adapter("rcn", "ball")
    assert not is_concept_only("httr hat and rcn ball", [FIDO, rex])
    assert not is_concept_only("httr hat", [])


def test_a_concept_without_category_is_its_token() -> None:
    assert is_concept_only("a photo of sks", [_adapter("sks", None)])
    assert not is_concept_only("a photo of sks dog", [_adapter("sks", None)])
