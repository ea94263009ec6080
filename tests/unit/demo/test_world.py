"""The synthetic world: determinism, images, captions, instances and look-alikes."""

from __future__ import annotations

import json
import re
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.demo.world import (
    CATEGORIES,
    COLORS,
    IMAGE_SIZE,
    PATTERNS,
    SCENES,
    SHAPES,
    VARIANT_NAMES,
    Instance,
    World,
    caption_vocabulary,
    render_examples,
)

HIDDEN = ("aspect", "period", "orientation", "phase")  # the shape variant is named (world v2)


def _words(caption: str) -> list[str]:
    return caption.split()


def test_examples_are_deterministic_by_seed_and_index() -> None:
    a, b = World(3).example(5), World(3).example(5)
    assert np.array_equal(a.image, b.image) and a.captions == b.captions
    assert not np.array_equal(a.image, World(3).example(6).image)
    assert not np.array_equal(a.image, World(4).example(5).image)
    assert not np.array_equal(a.image, World(3).example(5, "eval").image)


def test_random_scene_image_is_deterministic_by_rng() -> None:
    world = World(0)
    img1, caps1 = world.random_scene_image(np.random.default_rng(7))
    img2, caps2 = world.random_scene_image(np.random.default_rng(7))
    assert isinstance(img1, Image.Image) and img1.mode == "RGB"
    assert img1.size == (IMAGE_SIZE, IMAGE_SIZE)
    assert img1.tobytes() == img2.tobytes() and caps1 == caps2
    assert len(caps1) == 4


def test_image_shape_dtype_and_content() -> None:
    world = World(0)
    for i in range(20):
        ex = world.example(i)
        assert ex.image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and ex.image.dtype == np.uint8
        assert ex.image.std() > 10  # textured scene, not a flat fill
    scenes = {world.example(i).scene for i in range(200)}
    assert scenes == set(SCENES)


def test_objects_change_the_image() -> None:
    world = World(0)
    inst = world.instance(0)
    empty = world.render("beach", [], np.random.default_rng(1))
    with_obj = world.render("beach", [inst], np.random.default_rng(1))
    diff = np.abs(np.asarray(empty, np.int16) - np.asarray(with_obj, np.int16)).max(axis=2)
    assert (diff > 40).sum() > 100  # at least a 10×10 object's worth of pixels


def test_captions_name_categories_and_scene_with_known_words_only() -> None:
    """All captions name every category; all but the last (object-only) name the scene."""
    world, vocab = World(1), caption_vocabulary()
    for i in range(300):
        ex = world.example(i)
        for k, caption in enumerate(ex.captions):
            words = _words(caption)
            assert (ex.scene in words) == (k < 3), caption
            for p in ex.objects:
                assert p.instance.category in words, caption
            assert set(words) <= vocab, caption
            assert not re.search(r"\d", caption)


def test_full_caption_names_every_visible_attribute() -> None:
    world = World(2)
    for i in range(100):
        ex = world.example(i)
        words = set(_words(ex.captions[0]))
        for p in ex.objects:
            inst = p.instance
            assert {inst.color, inst.pattern if inst.pattern != "dotted" else "dots"} <= words
            assert p.size in words and p.position in words


def test_captions_never_depend_on_hidden_attributes() -> None:
    world = World(0)
    rng = np.random.default_rng(0)
    for _ in range(50):
        inst = world.sample_instance(rng)
        twin = replace(
            inst,
            aspect=round(inst.aspect * 0.9, 2),
            period=round(inst.period + 0.05, 2),
            orientation=(inst.orientation + 45) % 180,
            phase=round((inst.phase + 0.5) % 1.0, 2),
        )
        place = world.place(inst, rng)
        for detail in ("full", "random", "minimal"):
            seed = int(rng.integers(1 << 30))
            a = world.caption("snow", [place], np.random.default_rng(seed), detail)
            twin_place = replace(place, instance=twin)
            b = world.caption("snow", [twin_place], np.random.default_rng(seed), detail)
            assert a == b
        assert inst.key != twin.key


def test_instance_key_is_stable() -> None:
    inst = Instance("ball", 1, 1.05, "red", "blue", "striped", 0.3, 45, 0.25)
    assert inst.key == "ball.v1.a1.05.red-blue.striped.p0.30.o45.f0.25"
    assert World(0).instance(3) == World(0).instance(3)
    assert World(0).instance(3).key != World(0).instance(4).key


def test_sample_instance_respects_arguments() -> None:
    world, rng = World(0), np.random.default_rng(0)
    for cat in CATEGORIES:
        inst = world.sample_instance(rng, category=cat, pattern="dotted")
        assert inst.category == cat and inst.pattern == "dotted"
        assert inst.color != inst.color2 and {inst.color, inst.color2} <= set(COLORS)
    assert world.instance(0).pattern != "plain"
    with pytest.raises(ValueError):
        world.sample_instance(rng, category="dog")


def test_lookalikes_differ_in_exactly_the_intended_attribute() -> None:
    world, rng = World(0), np.random.default_rng(0)
    expected = {"colors": {"color", "color2"}, "pattern": {"pattern"}, "shape": {"variant"}}
    for i in range(40):
        inst = world.instance(i)
        looks = world.lookalikes(inst, rng)
        assert set(looks) == set(expected)
        for kind, other in looks.items():
            changed = {
                f.name for f in fields(Instance) if getattr(inst, f.name) != getattr(other, f.name)
            }
            assert changed == expected[kind], (kind, inst, other)
        assert {looks["colors"].color, looks["colors"].color2}.isdisjoint({inst.color, inst.color2})
        assert looks["pattern"].pattern in PATTERNS


def test_lookalikes_look_different_in_the_same_spot() -> None:
    world, rng = World(0), np.random.default_rng(5)
    inst = world.instance(1)
    place = world.place(inst, rng, "middle", "large")
    base = world.render_array("grass", [place], np.random.default_rng(9))
    for kind, other in world.lookalikes(inst, rng).items():
        img = world.render_array(
            "grass", [replace(place, instance=other)], np.random.default_rng(9)
        )
        changed = (np.abs(img.astype(np.int16) - base).max(axis=2) > 40).sum()
        assert changed > 30, kind


def test_two_objects_are_side_by_side() -> None:
    world, rng = World(0), np.random.default_rng(3)
    a, b = world.sample_instance(rng), world.sample_instance(rng)
    left, right = world.layout([a, b], rng)
    assert (left.position, right.position) == ("left", "right")
    assert left.x + left.width / 2 <= right.x - right.width / 2 + 2
    caption = world.caption("kitchen", [left, right], rng, "full")
    assert caption.index(a.category) < caption.index(" and a")


def _demo_context() -> int:
    config = Path(__file__).resolve().parents[3] / "app/ml/model_configs/polar-demo.json"
    return int(json.loads(config.read_text())["text_cfg"]["context_length"])


def test_captions_fit_the_demo_context() -> None:
    import open_clip

    tokenizer = open_clip.SimpleTokenizer(context_length=77)
    world, context = World(0), _demo_context()
    longest = max(
        len(tokenizer.encode(c)) + 2 for i in range(400) for c in world.example(i).captions
    )
    assert longest <= context
    # the longest caption the grammar allows: two objects, every attribute named, a checkered
    # pattern (two tokens), the longest template and scene phrase
    rng = np.random.default_rng(0)
    objs = [
        replace(world.sample_instance(rng, "hat", "checkered"), variant=1),
        replace(world.sample_instance(rng, "ball", "checkered"), variant=2),
    ]
    placed = world.layout(objs, rng)
    worst = "an image of {} on a kitchen counter".format(
        " and ".join(
            f"a large {o.color} and {o.color2} checkered {o.variant_name} {o.category} "
            "in the center"
            for o in objs
        )
    )
    assert placed and len(tokenizer.encode(worst)) + 2 <= context


def test_every_shape_variant_has_its_own_one_word_name() -> None:
    """The names are part of the trained model: changing one means pretraining again."""
    assert VARIANT_NAMES == {
        "ball": ("round", "tennis", "rugby"),
        "box": ("square", "gift", "cube"),
        "cup": ("tea", "coffee", "trophy"),
        "star": ("five", "six", "four"),
        "bottle": ("milk", "potion", "wine"),
        "hat": ("top", "baseball", "witch"),
    }
    names = [n for cat in CATEGORIES for n in VARIANT_NAMES[cat]]
    assert all(len(VARIANT_NAMES[c]) == len(SHAPES[c]) for c in CATEGORIES)
    assert len(set(names)) == len(names)  # no word names two variants
    other_words = set(COLORS) | set(PATTERNS) | set(CATEGORIES) | set(SCENES)
    assert not set(names) & other_words
    assert all(re.fullmatch(r"[a-z]+", n) for n in names)
    inst = World(0).instance(0, "hat")
    assert inst.variant_name == VARIANT_NAMES["hat"][inst.variant]


def test_captions_name_the_shape_variant_full_always_random_sometimes() -> None:
    world = World(3)
    named = {"full": 0, "random": 0}
    total = 0
    for i in range(300):
        ex = world.example(i)
        for p in ex.objects:
            inst = p.instance
            phrase = f"{inst.variant_name} {inst.category}"
            assert phrase in ex.captions[0], ex.captions[0]
            named["full"] += 1
            total += 1
            named["random"] += sum(phrase in c for c in ex.captions[1:3])
            others = set(VARIANT_NAMES[inst.category]) - {inst.variant_name}
            if len(ex.objects) == 1:  # another variant's name never describes it
                assert not others & {w for c in ex.captions for w in _words(c)}
    share = named["random"] / (2 * total)
    assert 0.3 < share < 0.7, share  # VARIANT_COIN = 0.5 of the random captions


def test_a_shape_twin_differs_in_the_caption_by_the_variant_word_only() -> None:
    world, rng = World(0), np.random.default_rng(4)
    for _ in range(30):
        inst = world.sample_instance(rng)
        twin = replace(inst, variant=(inst.variant + 1) % 3)
        place = world.place(inst, rng)
        seed = int(rng.integers(1 << 30))
        for detail in ("full", "random"):
            a = world.caption("beach", [place], np.random.default_rng(seed), detail)
            b = world.caption(
                "beach", [replace(place, instance=twin)], np.random.default_rng(seed), detail
            )
            diff = [(x, y) for x, y in zip(_words(a), _words(b), strict=True) if x != y]
            assert diff in ([], [(inst.variant_name, twin.variant_name)]), (a, b)
            if detail == "full":
                assert len(diff) == 1


def test_naming_the_variant_draws_no_extra_random_number(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A rng shared with rendering (the benchmark's pool) renders the same images whether or not
    a caption names the variant, so world v2's images are world v1's."""
    import app.demo.world as world_module

    world, rng = World(0), np.random.default_rng(8)
    for _ in range(30):
        place = world.place(world.sample_instance(rng), rng)
        states, captions = [], []
        for coin in (0.0, 1.0):  # never / always named in "random" captions
            monkeypatch.setattr(world_module, "VARIANT_COIN", coin)
            r = np.random.default_rng(1)
            captions.append(world.caption("snow", [place], r, "random"))
            states.append(r.random())
        assert states[0] == states[1]
        assert captions[1].replace(f"{place.instance.variant_name} ", "", 1) == captions[0]


def test_shape_twin_changes_only_the_first_objects_shape() -> None:
    world = World(0)
    for i in range(12):
        ex, twin = world.example(i), world.shape_twin(i)
        assert ex.scene == twin.scene and len(ex.objects) == len(twin.objects)
        a, b = ex.objects[0].instance, twin.objects[0].instance
        assert a.variant != b.variant and replace(b, variant=a.variant) == a
        assert [p.instance for p in ex.objects[1:]] == [p.instance for p in twin.objects[1:]]
        pa, pb = ex.objects[0], twin.objects[0]
        assert (pa.position, pa.size) == (pb.position, pb.size)  # x, y may move to fit the width
        assert not np.array_equal(ex.image, twin.image)
        pairs = zip(_words(ex.captions[0]), _words(twin.captions[0]), strict=True)
        full = [(x, y) for x, y in pairs if x != y]
        assert full == [(a.variant_name, b.variant_name)]
    images, captions = render_examples(0, "train", 3, 5, twins="shape")
    assert len(images) == len(captions) == 4
    assert np.array_equal(images[1], world.shape_twin(3).image)
    assert captions[2] == world.example(4).captions


def test_pattern_twin_changes_only_the_first_objects_pattern() -> None:
    world = World(0)
    pattern_words = set(PATTERNS) | set(COLORS) | {"and", "with", "dots"}

    def rest(caption: str) -> list[str]:
        return [w for w in _words(caption) if w not in pattern_words]

    seen = set()
    for i in range(12):
        ex, twin = world.example(i), world.pattern_twin(i)
        assert ex.scene == twin.scene and len(ex.objects) == len(twin.objects)
        a, b = ex.objects[0].instance, twin.objects[0].instance
        assert a.pattern != b.pattern and replace(b, pattern=a.pattern) == a
        seen.add((a.pattern, b.pattern))
        # the same place, the other objects untouched: only the first object's pattern moved
        assert replace(twin.objects[0], instance=a) == ex.objects[0]
        assert ex.objects[1:] == twin.objects[1:]
        assert not np.array_equal(ex.image, twin.image)
        # captioned in full, they differ in the words naming the pattern (and its colour) only
        assert ex.captions[0] != twin.captions[0]
        assert rest(ex.captions[0]) == rest(twin.captions[0])
        for k in (1, 2, 3):  # the other captions draw the same words
            assert rest(ex.captions[k]) == rest(twin.captions[k])
    assert len({b for _, b in seen}) == len(PATTERNS)  # every pattern is some twin's


def test_twin_kinds_dispatch_and_both_alternates() -> None:
    world = World(0)
    for i in range(4):
        assert np.array_equal(world.twin(i, "train", "shape").image, world.shape_twin(i).image)
        assert np.array_equal(world.twin(i, "train", "pattern").image, world.pattern_twin(i).image)
        expected = world.shape_twin(i) if i % 2 == 0 else world.pattern_twin(i)
        assert np.array_equal(world.twin(i, "train", "both").image, expected.image)
    with pytest.raises(ValueError, match="unknown twin kind"):
        world.twin(0, "train", "colour")
    images, captions = render_examples(0, "train", 6, 8, twins="both")
    assert np.array_equal(images[1], world.shape_twin(6).image)
    assert np.array_equal(images[3], world.pattern_twin(7).image)
    assert captions[3] == world.pattern_twin(7).captions
