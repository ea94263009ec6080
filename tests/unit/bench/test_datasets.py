"""Real-data loaders on hand-written fixtures in the published formats, and query rendering."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from app.bench.datasets import (
    DatasetFormatError,
    Query,
    load_conconchi,
    load_deepfashion2,
    render,
    wear_query,
)

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "pervl"


def test_render_fills_placeholders_in_order() -> None:
    assert (
        render("a * and a * on the grass", ["sks ball", "cup"])
        == "a sks ball and a cup on the grass"
    )
    with pytest.raises(AssertionError):
        render("a * here", ["one", "two"])


def test_query_needs_one_placeholder_per_concept_and_ground_truth() -> None:
    with pytest.raises(ValueError, match="one"):
        Query("a * and a *", ("c1",), (0,), "multi")
    with pytest.raises(ValueError, match="ground truth"):
        Query("a *", ("c1",), (), "context")


@pytest.mark.parametrize(
    ("caption", "query"),
    [
        (
            "a person poses on a plush white couch.",
            "a person wearing * poses on a plush white couch",
        ),
        ("the person stands by a wall", "the person wearing * stands by a wall"),
        (
            "a red chair with a teddy bear.",
            "a red chair with a teddy bear, with a person wearing *",
        ),
    ],
)
def test_wear_query_puts_the_concept_on_the_person(caption: str, query: str) -> None:
    assert wear_query(caption) == query


def test_deepfashion2_pervl_format() -> None:
    ann = FIXTURES / "deepfashion2"
    ds = load_deepfashion2(ann, Path("/df2"), "test", shots=2)
    assert list(ds.concepts) == ["11", "22", "33"]
    assert ds.concepts["22"].category == "long sleeve top"
    assert ds.concepts["11"].train == (
        Path("/df2/train/image/000103.jpg"),
        Path("/df2/train/image/000104.jpg"),
    )  # only the first `shots` of the listed training images
    assert ds.pool[2] == Path("/df2/train/image/000201.jpg")
    context = ds.queries_of("context")
    assert [q.gt for q in context] == [(0,), (1,), (2,), (3,), (4,)]
    assert context[0].text == "a person wearing * poses on a plush white couch"
    assert context[2].concepts == ("22",)
    concept = {q.concepts[0]: q for q in ds.queries_of("concept")}
    assert concept["11"].gt == (0, 1) and concept["33"].gt == (4,)
    assert concept["11"].text == "An image of *"
    assert ds.captions is not None and ds.captions[3].startswith("a cabinet with shelves")
    assert not ds.queries_of("multi")


def test_deepfashion2_missing_column_is_reported(tmp_path: Path) -> None:
    shutil.copytree(FIXTURES / "deepfashion2", tmp_path, dirs_exist_ok=True)
    (tmp_path / "test_captions.csv").write_text("image_name,caption\nx.jpg,a person\n")
    with pytest.raises(DatasetFormatError, match="pair_id"):
        load_deepfashion2(tmp_path, Path("/df2"), "test")


def test_deepfashion2_concept_without_training_images(tmp_path: Path) -> None:
    shutil.copytree(FIXTURES / "deepfashion2", tmp_path, dirs_exist_ok=True)
    (tmp_path / "test_fsl_train.txt").write_text("codes_infer/11:\n000103.jpg\n")
    with pytest.raises(DatasetFormatError, match="22"):
        load_deepfashion2(tmp_path, Path("/df2"), "test")


def test_conconchi_format() -> None:
    root = FIXTURES / "conconchi"
    ds = load_conconchi(root, root / "captions.json")
    images = root / "data" / "images"
    assert ds.pool == [images / f"test/{n}.jpg" for n in "abcde"]  # negatives' GTS stay in the pool
    assert ds.concepts["0"].category == "toy"
    assert ds.concepts["0"].train[0] == images / "train/toy_1.jpg"
    assert len(ds.concepts["1"].train) == 2
    assert [q.kind for q in ds.queries] == ["concept", "context", "multi"]  # negative dropped
    concept, context, multi = ds.queries
    assert concept.gt == (0, 1, 4)  # GTS + ADDITIONAL GTS
    assert context.gt == (2,)  # an additional GT outside the pool is ignored
    assert multi.concepts == ("0", "2") and multi.text == "* next to * on the floor"
    assert ds.captions is not None and ds.captions[2] == "a white mug on a wooden table"


def test_conconchi_captions_must_cover_the_pool(tmp_path: Path) -> None:
    captions = tmp_path / "captions.csv"
    captions.write_text("image,caption\ntest/a.jpg,a toy\n")
    with pytest.raises(DatasetFormatError, match="no caption for 4"):
        load_conconchi(FIXTURES / "conconchi", captions)


def test_conconchi_rows_must_have_labels(tmp_path: Path) -> None:
    shutil.copytree(FIXTURES / "conconchi", tmp_path, dirs_exist_ok=True)
    test = tmp_path / "data" / "annotations" / "test.json"
    doc = json.loads(test.read_text())
    del doc["data"][1]["LABEL"]
    test.write_text(json.dumps(doc))
    with pytest.raises(DatasetFormatError, match="LABEL"):
        load_conconchi(tmp_path)
