"""The synthetic PerVL dataset, built from the demo world (app/demo/world.py).

Concepts are reserved instances the demo model never saw as such, one category after another.
The pool puts each concept in a few scenes next to its look-alikes in the same scenes (other
colours, other pattern, other shape variant: each looks the same to a caption), holds pairs of
concepts side by side (with look-alike decoys) for two-concept queries, and fills up with random
captioned scenes. Every pool image gets the world's full caption for the retention metric.
Validation and test use disjoint instances and their own random streams.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from app.bench.datasets import Concept, ImageSource, PerVLDataset, Query
from app.demo.world import CATEGORIES, SCENE_PHRASES, SCENES, Instance, World

SPLITS: dict[str, int] = {"val": 1, "test": 2}  # split -> random-stream id
_INSTANCE_BASE = 100_000  # reserved instance indices: split s uses s * base + concept index
_PURPOSE = {"train": 1, "context": 2, "pair": 3, "background": 4}
# Captions name a random subset of the visible attributes, as a captioning model would; full
# captions make caption->image R@10 saturate at 1.0 on the demo model and hide any retention loss.
CAPTION_DETAIL: Literal["random"] = "random"


@dataclass(frozen=True)
class SyntheticConfig:
    """Size of the synthetic benchmark; the defaults give a pool of about 650 images."""

    concepts: int = 20  # personal concepts, categories assigned round-robin
    shots: int = 5  # training photos per concept
    context_scenes: int = 3  # scenes per concept; each holds the concept and its 3 look-alikes
    pair_scenes: int = 2  # scenes per concept pair (concepts 2k and 2k+1)
    background: int = 320  # random captioned scenes from the world's bench split
    world_seed: int = 0  # the demo world's seed (the one the demo model was pretrained on)
    seed: int = 0  # benchmark seed: instances and every random draw below


@dataclass
class _Builder:
    """Accumulates pool images with the concepts they show and their scene."""

    world: World
    pool: list[ImageSource]
    captions: list[str]
    present: list[frozenset[str]]  # concept ids visible in each pool image
    scenes: list[str]

    def add(
        self, scene: str, objects: list[tuple[Instance, str | None]], rng: np.random.Generator
    ) -> None:
        """Render one scene with one or two (instance, concept id or None) objects."""
        placed = self.world.layout([inst for inst, _ in objects], rng)
        self.pool.append(self.world.render_array(scene, placed, rng))
        self.captions.append(self.world.caption(scene, placed, rng, CAPTION_DETAIL))
        self.present.append(frozenset(cid for _, cid in objects if cid is not None))
        self.scenes.append(scene)

    def where(self, concepts: tuple[str, ...], scene: str | None = None) -> tuple[int, ...]:
        """Pool indices showing all the given concepts (in the given scene)."""
        return tuple(
            i
            for i, (p, s) in enumerate(zip(self.present, self.scenes, strict=True))
            if set(concepts) <= p and (scene is None or s == scene)
        )


def scene_phrase(scene: str) -> str:
    """How queries name a scene ("on the beach")."""
    return SCENE_PHRASES[scene][0]


def build_synthetic(split: str = "test", cfg: SyntheticConfig | None = None) -> PerVLDataset:
    """The synthetic PerVL dataset of one split ("val" or "test")."""
    cfg = cfg or SyntheticConfig()
    if split not in SPLITS:
        raise ValueError(f"synthetic split must be one of {sorted(SPLITS)}, not {split!r}")
    sid = SPLITS[split]
    world = World(cfg.world_seed)

    def rng(purpose: str, *index: int) -> np.random.Generator:
        return np.random.default_rng([cfg.seed, sid, _PURPOSE[purpose], *index])

    instances = [
        world.instance(sid * _INSTANCE_BASE + cfg.seed * 1000 + i, CATEGORIES[i % len(CATEGORIES)])
        for i in range(cfg.concepts)
    ]
    ids = [f"c{i:02d}" for i in range(cfg.concepts)]
    concepts: dict[str, Concept] = {}
    for i, inst in enumerate(instances):
        r = rng("train", i)
        photos = []
        for _ in range(cfg.shots):
            scene = SCENES[int(r.integers(len(SCENES)))]
            photos.append(world.render_array(scene, world.layout([inst], r), r))
        concepts[ids[i]] = Concept(ids[i], inst.category, tuple(photos))

    b = _Builder(world, [], [], [], [])
    context: list[tuple[str, str]] = []  # (concept id, scene) pairs with a context query
    for i, inst in enumerate(instances):
        r = rng("context", i)
        looks = list(world.lookalikes(inst, r).values())
        for k in r.choice(len(SCENES), cfg.context_scenes, replace=False):
            scene = SCENES[int(k)]
            context.append((ids[i], scene))
            for obj, cid in [(inst, ids[i]), *((look, None) for look in looks)]:
                b.add(scene, [(obj, cid)], r)

    pairs: list[tuple[str, str, str]] = []  # (first id, second id, scene)
    for p in range(cfg.concepts // 2):
        i, j = 2 * p, 2 * p + 1
        r = rng("pair", p)
        look_i = list(world.lookalikes(instances[i], r).values())
        look_j = list(world.lookalikes(instances[j], r).values())
        for k in r.choice(len(SCENES), cfg.pair_scenes, replace=False):
            scene = SCENES[int(k)]
            pairs.append((ids[i], ids[j], scene))
            decoy_i, decoy_j = (x[int(r.integers(3))] for x in (look_i, look_j))
            scenes_objs: list[list[tuple[Instance, str | None]]] = [
                [(instances[i], ids[i]), (instances[j], ids[j])],
                [(instances[i], ids[i]), (decoy_j, None)],
                [(decoy_i, None), (instances[j], ids[j])],
                [(decoy_i, None), (decoy_j, None)],
            ]
            for objs in scenes_objs:
                if r.random() < 0.5:  # either concept may stand on the left
                    objs.reverse()
                b.add(scene, objs, r)

    for n in range(cfg.background):
        ex = world.example(sid * _INSTANCE_BASE + cfg.seed * 1000 + n, "bench")
        b.pool.append(ex.image)
        b.captions.append(ex.captions[1])  # a "random"-detail caption, like CAPTION_DETAIL
        b.present.append(frozenset())
        b.scenes.append(ex.scene)

    queries = [
        Query(f"a * {scene_phrase(s)}", (c,), b.where((c,), s), "context") for c, s in context
    ]
    queries += [Query("An image of *", (c,), b.where((c,)), "concept") for c in ids]
    queries += [
        Query(f"a * and a * {scene_phrase(s)}", (c1, c2), b.where((c1, c2), s), "multi")
        for c1, c2, s in pairs
    ]
    ds = PerVLDataset(
        name="synthetic",
        split=split,
        concepts=concepts,
        pool=b.pool,
        queries=queries,
        captions=b.captions,
        info={
            "config": asdict(cfg),
            "instances": {c: inst.key for c, inst in zip(ids, instances, strict=True)},
        },
    )
    ds.validate()
    return ds
