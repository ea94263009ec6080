"""Synthetic world for the demo model: 64×64 scenes with shape objects, instances and captions.

Everything is numpy and deterministic given a `numpy.random.Generator`, so the pretraining
script, the quality script, the benchmark, the demo and the tests all see the same world.

An `Instance` is one specific object ("Fido"): category, shape variant, aspect, two colours
and a pattern with a fixed period, orientation and phase. Captions name the category, the scene
and sometimes colours, pattern, shape variant (a word per category and variant: "top hat",
"baseball hat", "witch hat"; world v2), size and position, but never the hidden attributes
(aspect, pattern period, orientation, phase) that tell one instance from its look-alikes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from PIL import Image

IMAGE_SIZE = 64
SUPERSAMPLE = 3  # sub-pixels per pixel side when drawing objects (anti-aliased edges)

SCENES: tuple[str, ...] = ("beach", "snow", "grass", "night", "kitchen", "forest")
CATEGORIES: tuple[str, ...] = ("ball", "box", "cup", "star", "bottle", "hat")
PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")
TWIN_KINDS: tuple[str, ...] = ("shape", "pattern", "both")  # hard negatives (World.twin)
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.10, 0.10),
    "orange": (1.00, 0.55, 0.05),
    "yellow": (0.98, 0.88, 0.10),
    "green": (0.10, 0.66, 0.20),
    "blue": (0.12, 0.30, 0.92),
    "purple": (0.55, 0.20, 0.76),
    "pink": (1.00, 0.52, 0.76),
    "white": (0.97, 0.97, 0.97),
    "black": (0.07, 0.07, 0.07),
    "brown": (0.50, 0.30, 0.12),
}
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "middle", "right")
N_VARIANTS = 3  # shape variants per category, named by VARIANT_NAMES
# World v2: the word captions use for each category's shape variants, in SHAPES order; each is
# one BPE token (the longest full caption has to fit the demo model's 32-token context) and no
# word names two things.
VARIANT_NAMES: dict[str, tuple[str, ...]] = {
    "ball": ("round", "tennis", "rugby"),  # plain disc, disc with seams, pointed lens
    "box": ("square", "gift", "cube"),  # flat square, lidded box, cube in perspective
    "cup": ("tea", "coffee", "trophy"),  # teacup on a saucer, mug, goblet on a stem
    "star": ("five", "six", "four"),  # points
    "bottle": ("milk", "potion", "wine"),  # square with a cap, round flask, wine bottle
    "hat": ("top", "baseball", "witch"),  # top hat, cap with a visor, cone with a brim
}
VARIANT_COIN = 0.5  # chance that a "random"-detail caption names the shape variant

SCENE_PHRASES: dict[str, tuple[str, ...]] = {
    "beach": ("on the beach", "at the beach"),
    "snow": ("in the snow", "on the snow"),
    "grass": ("on the grass", "in the grass"),
    "night": ("at night", "in the night"),
    "kitchen": ("in the kitchen", "on a kitchen counter"),
    "forest": ("in the forest", "in a forest"),
}
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left",),
    "middle": ("in the middle", "in the center"),
    "right": ("on the right",),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small",), "large": ("large", "big")}
TEMPLATES: tuple[str, ...] = (
    "a photo of {objects} {scene}",
    "{objects} {scene}",
    "an image of {objects} {scene}",
    "there is {objects} {scene}",
    "a picture of {objects} {scene}",
)

Split = Literal["train", "eval", "bench"]
_SPLIT_IDS: dict[str, int] = {"train": 1, "eval": 2, "bench": 3, "instances": 4}


@dataclass(frozen=True)
class Instance:
    """One specific object: a fixed combination that captions never spell out in full."""

    category: str
    variant: int  # shape variant, 0..N_VARIANTS-1 (named in captions: VARIANT_NAMES)
    aspect: float  # width multiplier on the variant's base aspect (hidden)
    color: str  # main colour (named in captions)
    color2: str  # pattern colour (named in captions; invisible when plain)
    pattern: str  # one of PATTERNS (named in captions)
    period: float  # pattern period as a fraction of the object height (hidden)
    orientation: int  # pattern angle in degrees, 0..179 (hidden)
    phase: float  # pattern offset in periods, 0..1 (hidden)

    @property
    def variant_name(self) -> str:
        """The word captions use for this shape variant ("top" for a top hat)."""
        return VARIANT_NAMES[self.category][self.variant]

    @property
    def key(self) -> str:
        """Stable identifier, e.g. 'ball.v1.a1.05.red-blue.striped.p0.30.o45.f0.25'."""
        return (
            f"{self.category}.v{self.variant}.a{self.aspect:.2f}.{self.color}-{self.color2}."
            f"{self.pattern}.p{self.period:.2f}.o{self.orientation}.f{self.phase:.2f}"
        )


@dataclass(frozen=True)
class Placement:
    """An instance drawn at a given place and size in a 64×64 image."""

    instance: Instance
    x: float  # centre, pixels from the left
    y: float  # centre, pixels from the top
    height: float  # pixels
    width: float  # pixels (height × aspects, capped to fit)
    size: str  # "small" | "large" (named in captions)
    position: str  # "left" | "middle" | "right", from x (named in captions)


@dataclass(frozen=True)
class Example:
    """One captioned scene image."""

    image: np.ndarray  # (64, 64, 3) uint8
    scene: str
    objects: tuple[Placement, ...]
    # [0] names every visible attribute and the scene; [1], [2] a random subset and the scene;
    # [3] a random subset without the scene, so that prompts like "a photo of a ball" are
    # in distribution (zero-shot classification, POLAR's concept templates)
    captions: tuple[str, ...]


# ---------------------------------------------- shapes (u right, v down, both in [-1, 1])

Mask = np.ndarray  # bool, same shape as u and v
ShapeFn = Callable[
    [np.ndarray, np.ndarray], tuple[Mask, Mask]
]  # -> (silhouette, dark detail lines)


def _box(u: np.ndarray, v: np.ndarray, u0: float, u1: float, v0: float, v1: float) -> Mask:
    return (u >= u0) & (u <= u1) & (v >= v0) & (v <= v1)


def _ellipse(u: np.ndarray, v: np.ndarray, cu: float, cv: float, ru: float, rv: float) -> Mask:
    return ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 <= 1.0


def _none(u: np.ndarray) -> Mask:
    return np.zeros(u.shape, dtype=bool)


def _star(u: np.ndarray, v: np.ndarray, points: int, inner: float) -> Mask:
    rho = np.hypot(u, v)
    sector = math.pi / points
    # fold the angle into [0, sector]: the edge there runs from the tip (1, 0) to the notch
    phi = np.abs(np.mod(np.arctan2(u, -v), 2 * sector) - sector)
    phi = sector - phi
    x, y = rho * np.cos(phi), rho * np.sin(phi)
    ex, ey = inner * math.cos(sector) - 1.0, inner * math.sin(sector)
    return np.asarray(ex * y - ey * (x - 1.0) >= 0.0, dtype=bool)  # the origin side of the edge


def _ball_round(u: np.ndarray, v: np.ndarray) -> tuple[Mask, Mask]:
    return _ellipse(u, v, 0, 0, 1, 1), _none(u)


def _ball_seamed(u: np.ndarray, v: np.ndarray) -> tuple[Mask, Mask]:
    m = _ellipse(u, v, 0, 0, 1, 1)
    return m, m & ((np.abs(u) < 0.08) | (np.abs(v - 0.25 * u**2 + 0.1) < 0.08))


def _ball_lens(u: np.ndarray, v: np.ndarray) -> tuple[Mask, Mask]:
    return np.abs(v) <= 1.0 - u**2, _none(u)


def _box_plain(u: np.ndarray, v: np.ndarray) -> tuple[Mask, Mask]:
    return _box(u, v, -1, 1, -1, 1), _none(u)


def _box_lidded(u: np.ndarray, v: np.ndarray) -> tuple[Mask, Mask]:
    m = _box(u, v, -0.86, 0.86, -0.55, 1) | _box(u, v, -1, 1, -1, -0.55)
    return m, m & (np.abs(v + 0.55) < 0.07)


def _box_cube(u: np.ndarray, v: np.ndarray) -> tuple[Mask, Mask]:
    m = _box(u, v, -1, 1, -1, 1) & (v >= -u - 1.4) & (v <= -u + 1.4)
    edges = ((np.abs(u - 0.4) < 0.06) & (v > -0.4)) | ((np.abs(v + 0.4) < 0.06) & (u < 0.4))
    edges |= (np.abs(v + u + 0.0) < 0.08) & (u > 0.4) & (v < -0.4)
    return m, m & edges


def _cup_teacup(u: np.ndarray, v: np.ndarray) -> tuple[Mask, Mask]:
    bowl = _ellipse(u, v, -0.15, -0.6, 0.7, 1.3) & (v >= -0.6) & (v <= 0.7)
    saucer = _box(u, v, -1, 0.7, 0.7, 1)
    handle = _ellipse(u, v, 0.55, -0.2, 0.38, 0.35) & ~_ellipse(u, v, 0.55, -0.2, 0.2, 0.18)
    return bowl | saucer | (handle & (u > 0.4)), _none(u)


def _cup_mug(u: np.ndarray, v: np.ndarray) -> tuple[Mask, Mask]:
    body = _box(u, v, -1, 0.3, -1, 1)
    handle = _ellipse(u, v, 0.3, 0, 0.7, 0.6) & ~_ellipse(u, v, 0.3, 0, 0.42, 0.32)
    return body | (handle & (u > 0.3)), _none(u)


def _cup_goblet(u: np.ndarray, v: np.ndarray) -> tuple[Mask, Mask]:
    bowl = _ellipse(u, v, 0, -1, 1, 1) & (v >= -1) & (v <= 0)
    stem = _box(u, v, -0.12, 0.12, 0, 0.82)
    base = _box(u, v, -0.7, 0.7, 0.82, 1)
    return bowl | stem | base, _none(u)


def _star5(u: np.ndarray, v: np.ndarray) -> tuple[Mask, Mask]:
    return _star(u, v, 5, 0.45), _none(u)


def _star6(u: np.ndarray, v: np.ndarray) -> tuple[Mask, Mask]:
    return _star(u, v, 6, 0.58), _none(u)


def _star4(u: np.ndarray, v: np.ndarray) -> tuple[Mask, Mask]:
    return _star(u, v, 4, 0.33), _none(u)


def _bottle_square(u: np.ndarray, v: np.ndarray) -> tuple[Mask, Mask]:
    cap = _box(u, v, -0.5, 0.5, -1, -0.82)
    m = _box(u, v, -1, 1, -0.25, 1) | _box(u, v, -0.38, 0.38, -0.82, -0.25) | cap
    return m, m & (np.abs(v + 0.82) < 0.05)


def _bottle_flask(u: np.ndarray, v: np.ndarray) -> tuple[Mask, Mask]:
    m = _ellipse(u, v, 0, 0.45, 1, 0.55) | _box(u, v, -0.25, 0.25, -1, 0.2)
    return m, _none(u)


def _bottle_wine(u: np.ndarray, v: np.ndarray) -> tuple[Mask, Mask]:
    shoulder = (v >= -0.4) & (v <= 0) & (np.abs(u) <= 0.3 + 0.7 * (v + 0.4) / 0.4)
    m = _box(u, v, -1, 1, 0, 1) | shoulder | _box(u, v, -0.3, 0.3, -1, -0.4)
    return m, m & (np.abs(v - 0.3) < 0.06)


def _hat_top(u: np.ndarray, v: np.ndarray) -> tuple[Mask, Mask]:
    m = _box(u, v, -1, 1, 0.72, 1) | _box(u, v, -0.6, 0.6, -1, 0.72)
    return m, m & (np.abs(v - 0.45) < 0.09) & (np.abs(u) <= 0.6)


def _hat_cap(u: np.ndarray, v: np.ndarray) -> tuple[Mask, Mask]:
    dome = _ellipse(u, v, -0.25, 1, 0.75, 2.0) & (v <= 1)
    visor = _box(u, v, -0.1, 1, 0.72, 1)
    return dome | visor, (dome | visor) & (np.abs(v - 0.72) < 0.06)


def _hat_cone(u: np.ndarray, v: np.ndarray) -> tuple[Mask, Mask]:
    cone = (v >= -1) & (v <= 0.85) & (np.abs(u) <= 0.45 * (v + 1) / 1.85)
    brim = _ellipse(u, v, 0, 0.85, 1, 0.15)
    return cone | brim, _none(u)


# (shape function, base width/height ratio) per category and variant
SHAPES: dict[str, tuple[tuple[ShapeFn, float], ...]] = {
    "ball": ((_ball_round, 1.0), (_ball_seamed, 1.0), (_ball_lens, 1.45)),
    "box": ((_box_plain, 1.0), (_box_lidded, 0.95), (_box_cube, 1.05)),
    "cup": ((_cup_teacup, 1.3), (_cup_mug, 1.05), (_cup_goblet, 0.7)),
    "star": ((_star5, 1.0), (_star6, 1.0), (_star4, 0.9)),
    "bottle": ((_bottle_square, 0.5), (_bottle_flask, 0.6), (_bottle_wine, 0.42)),
    "hat": ((_hat_top, 1.05), (_hat_cap, 1.35), (_hat_cone, 1.1)),
}
assert set(SHAPES) == set(CATEGORIES) and all(len(v) == N_VARIANTS for v in SHAPES.values())
assert set(VARIANT_NAMES) == set(CATEGORIES)
assert all(len(v) == N_VARIANTS for v in VARIANT_NAMES.values())


def _pattern_mask(inst: Instance, s: np.ndarray, t: np.ndarray) -> Mask:
    """Where the second colour shows; s, t are rotated coordinates in object heights."""
    a = s / inst.period + inst.phase
    b = t / inst.period + inst.phase
    if inst.pattern == "striped":
        return np.asarray(np.floor(a).astype(np.int64) % 2 == 1, dtype=bool)
    if inst.pattern == "checkered":
        return np.asarray((np.floor(a) + np.floor(b)).astype(np.int64) % 2 == 1, dtype=bool)
    if inst.pattern == "dotted":
        dots = (a - np.floor(a) - 0.5) ** 2 + (b - np.floor(b) - 0.5) ** 2 < 0.3**2
        return np.asarray(dots, dtype=bool)
    return np.zeros(s.shape, dtype=bool)


# ---------------------------------------------------------------- scenes


def _vgrad(
    top: Sequence[float] | np.ndarray, bottom: Sequence[float] | np.ndarray, n: int
) -> np.ndarray:
    w = np.linspace(0.0, 1.0, n, dtype=np.float32)[:, None, None]  # (n, 1, 1)
    return (1 - w) * np.asarray(top, np.float32) + w * np.asarray(bottom, np.float32)


def _smooth_noise(rng: np.random.Generator, cells: int, scale: float) -> np.ndarray:
    """Low-frequency noise (64, 64, 1): a coarse random grid upsampled by repetition and blur."""
    coarse = rng.normal(0.0, scale, (cells, cells)).astype(np.float32)
    rep = IMAGE_SIZE // cells
    fine = np.repeat(np.repeat(coarse, rep, 0), rep, 1)
    fine = (fine + np.roll(fine, rep // 2, 0) + np.roll(fine, rep // 2, 1)) / 3.0
    return fine[:, :, None]


def _sky(
    rng: np.random.Generator,
    img: np.ndarray,
    horizon: int,
    top: Sequence[float],
    bottom: Sequence[float],
) -> None:
    jitter = rng.uniform(-0.05, 0.05, 3)
    img[:horizon] = _vgrad(np.add(top, jitter), np.add(bottom, jitter), horizon)


def _beach(rng: np.random.Generator, img: np.ndarray) -> int:
    horizon = int(rng.integers(16, 25))
    sea_end = horizon + int(rng.integers(5, 10))
    _sky(rng, img, horizon, (0.40, 0.66, 0.95), (0.75, 0.88, 1.0))
    x = np.arange(IMAGE_SIZE, dtype=np.float32)
    rows = np.arange(horizon, sea_end, dtype=np.float32)[:, None]
    waves = 0.07 * np.sin(0.7 * x[None, :] + 2.1 * rows + rng.uniform(0, 6.3))
    img[horizon:sea_end] = np.array([0.08, 0.42, 0.68], np.float32) + waves[:, :, None]
    img[sea_end - 1 : sea_end] = (0.92, 0.94, 0.95)
    sand = np.array([0.90, 0.80, 0.56], np.float32) + rng.uniform(-0.05, 0.05, 3)
    img[sea_end:] = sand + _smooth_noise(rng, 8, 0.04)[sea_end:]
    return sea_end


def _snow(rng: np.random.Generator, img: np.ndarray) -> int:
    horizon = int(rng.integers(18, 28))
    _sky(rng, img, horizon, (0.70, 0.76, 0.86), (0.86, 0.89, 0.94))
    x = np.arange(IMAGE_SIZE)
    peaks = horizon - 6 + 5 * np.abs(np.sin(x * rng.uniform(0.08, 0.15) + rng.uniform(0, 6)))
    rows = np.arange(IMAGE_SIZE)[:, None]
    img[(rows >= peaks[None, :]) & (rows < horizon)] = (0.62, 0.66, 0.74)
    ground = np.array([0.95, 0.96, 1.0], np.float32) + _smooth_noise(rng, 8, 0.03)
    ground[..., :2] -= 0.05 * np.linspace(0, 1, IMAGE_SIZE, dtype=np.float32)[:, None, None]
    img[horizon:] = ground[horizon:]
    flakes = rng.integers(0, IMAGE_SIZE, (int(rng.integers(15, 40)), 2))
    img[flakes[:, 0], flakes[:, 1]] = 1.0
    return horizon


def _grass(rng: np.random.Generator, img: np.ndarray) -> int:
    horizon = int(rng.integers(14, 26))
    _sky(rng, img, horizon, (0.35, 0.62, 0.95), (0.70, 0.85, 0.98))
    blades = rng.normal(0.0, 0.07, (IMAGE_SIZE // 4, IMAGE_SIZE)).astype(np.float32)
    blades = np.repeat(blades, 4, 0)[:, :, None]  # vertical streaks
    green = np.array([0.22, 0.58, 0.18], np.float32) + rng.uniform(-0.05, 0.05, 3)
    depth = np.linspace(-0.08, 0.06, IMAGE_SIZE, dtype=np.float32)[:, None, None]
    img[horizon:] = (green + blades + depth)[horizon:]
    return horizon


def _night(rng: np.random.Generator, img: np.ndarray) -> int:
    horizon = int(rng.integers(38, 48))
    img[:] = _vgrad((0.02, 0.03, 0.10), (0.08, 0.10, 0.26), IMAGE_SIZE)
    stars = rng.integers(0, horizon, (int(rng.integers(15, 35)), 2))
    img[stars[:, 0], stars[:, 1]] = rng.uniform(0.6, 1.0, (len(stars), 1))
    gx, gy = np.meshgrid(np.arange(64.0), np.arange(64.0))
    moon = _ellipse(gx, gy, rng.uniform(8, 56), rng.uniform(6, 16), 5, 5)
    img[moon] = (0.95, 0.95, 0.80)
    img[horizon:] = np.array([0.05, 0.07, 0.10], np.float32) + _smooth_noise(rng, 8, 0.02)[horizon:]
    return horizon


def _kitchen(rng: np.random.Generator, img: np.ndarray) -> int:
    counter = int(rng.integers(30, 40))
    walls = ((0.93, 0.90, 0.80), (0.80, 0.88, 0.93), (0.88, 0.88, 0.88))
    wall = np.array(walls[int(rng.integers(0, 3))], np.float32)
    img[:counter] = wall + rng.uniform(-0.04, 0.04, 3)
    tile = int(rng.integers(6, 10))
    img[:counter:tile] *= 0.8
    img[:counter, ::tile] *= 0.8
    tops = ((0.55, 0.36, 0.20), (0.45, 0.45, 0.48), (0.75, 0.72, 0.68))
    top = np.array(tops[int(rng.integers(0, 3))], np.float32)
    img[counter:] = top + _smooth_noise(rng, 16, 0.03)[counter:]
    img[counter : counter + 2] = top * 0.7
    return counter


def _forest(rng: np.random.Generator, img: np.ndarray) -> int:
    ground = int(rng.integers(36, 46))
    leaves = np.array([0.10, 0.32, 0.12], np.float32) + rng.uniform(-0.04, 0.04, 3)
    img[:] = leaves + _smooth_noise(rng, 16, 0.06)
    for _ in range(int(rng.integers(3, 6))):
        x0 = int(rng.integers(0, IMAGE_SIZE - 4))
        img[:ground, x0 : x0 + int(rng.integers(3, 7))] = (0.33, 0.21, 0.10)
    litter = np.array([0.32, 0.25, 0.12], np.float32)
    img[ground:] = litter + _smooth_noise(rng, 16, 0.05)[ground:]
    return ground


_BACKGROUNDS: dict[str, Callable[[np.random.Generator, np.ndarray], int]] = {
    "beach": _beach,
    "snow": _snow,
    "grass": _grass,
    "night": _night,
    "kitchen": _kitchen,
    "forest": _forest,
}
_LIGHT: dict[str, float] = {"night": 0.72, "forest": 0.9}  # scene light on objects


# ---------------------------------------------------------------- drawing


def _draw(img: np.ndarray, p: Placement, light: float) -> None:
    """Composite one object (with its shadow) into img (64, 64, 3) float32, in place."""
    inst = p.instance
    x0, x1 = max(0, int(p.x - p.width / 2) - 1), min(IMAGE_SIZE, int(p.x + p.width / 2) + 2)
    y0, y1 = max(0, int(p.y - p.height / 2) - 1), min(IMAGE_SIZE, int(p.y + p.height / 2) + 3)
    ss = SUPERSAMPLE
    xs = (np.arange(x0 * ss, x1 * ss, dtype=np.float32) + 0.5) / ss
    ys = (np.arange(y0 * ss, y1 * ss, dtype=np.float32) + 0.5) / ss
    gx, gy = np.meshgrid(xs, ys)  # (h*ss, w*ss)
    u, v = (gx - p.x) / (p.width / 2), (gy - p.y) / (p.height / 2)

    shadow = _ellipse(u, v, 0.0, 1.0, 0.9, 0.12)
    shape_fn, _ = SHAPES[inst.category][inst.variant]
    mask, detail = shape_fn(u, v)

    theta = math.radians(inst.orientation)
    s = ((gx - p.x) * math.cos(theta) + (gy - p.y) * math.sin(theta)) / p.height
    t = (-(gx - p.x) * math.sin(theta) + (gy - p.y) * math.cos(theta)) / p.height
    second = _pattern_mask(inst, s, t)
    rgb = np.where(second[..., None], COLORS[inst.color2], COLORS[inst.color]).astype(np.float32)
    rgb *= (light * (1.0 - 0.12 * u - 0.16 * v))[..., None]  # light from the top left
    # a thin dark outline keeps a white ball visible in the snow
    inner = mask.copy()
    for axis in (0, 1):
        for shift in (-2, 2):
            inner &= np.roll(mask, shift, axis)
    rgb[(mask & ~inner) | detail] *= 0.35

    h, w = y1 - y0, x1 - x0

    def pool(a: np.ndarray) -> np.ndarray:
        pooled: np.ndarray = a.reshape(h, ss, w, ss, *a.shape[2:]).mean(axis=(1, 3))
        return pooled

    patch = img[y0:y1, x0:x1]
    patch *= 1.0 - 0.35 * pool(shadow.astype(np.float32) * ~mask)[..., None]
    alpha = pool(mask.astype(np.float32))[..., None]  # (h, w, 1)
    color = pool(rgb * mask[..., None])
    patch *= 1.0 - alpha
    patch += color


class World:
    """A deterministic synthetic world; `seed` fixes its example and instance streams."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def rng(self, stream: str, index: int) -> np.random.Generator:
        """Independent generator for item `index` of a named stream ('train', 'eval', ...)."""
        return np.random.default_rng([self.seed, _SPLIT_IDS[stream], index])

    # ---- instances

    def sample_instance(
        self,
        rng: np.random.Generator,
        category: str | None = None,
        pattern: str | None = None,
    ) -> Instance:
        """A random instance; hidden attributes are rounded so the key is exact."""
        cat = category or CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        if cat not in CATEGORIES:
            raise ValueError(f"unknown category {cat!r}")
        names = list(COLORS)
        c1, c2 = rng.choice(len(names), size=2, replace=False)
        return Instance(
            category=cat,
            variant=int(rng.integers(N_VARIANTS)),
            aspect=round(float(rng.uniform(0.8, 1.25)), 2),
            color=names[int(c1)],
            color2=names[int(c2)],
            pattern=pattern or PATTERNS[int(rng.integers(len(PATTERNS)))],
            period=round(float(rng.uniform(0.2, 0.34)), 2),
            orientation=int(rng.integers(180)),
            phase=round(float(rng.uniform(0.0, 1.0)), 2) % 1.0,
        )

    def instance(self, index: int, category: str | None = None) -> Instance:
        """The index-th reserved patterned instance (a distinctive 'Fido' for benchmarks)."""
        rng = self.rng("instances", index)
        return self.sample_instance(rng, category, PATTERNS[1 + int(rng.integers(3))])

    def lookalikes(self, inst: Instance, rng: np.random.Generator) -> dict[str, Instance]:
        """Near misses: other colours, other pattern, other shape variant (one change each)."""
        names = [c for c in COLORS if c not in (inst.color, inst.color2)]
        c1, c2 = rng.choice(len(names), size=2, replace=False)
        patterns = [p for p in PATTERNS if p != inst.pattern]
        variants = [v for v in range(N_VARIANTS) if v != inst.variant]
        return {
            "colors": replace(inst, color=names[int(c1)], color2=names[int(c2)]),
            "pattern": replace(inst, pattern=patterns[int(rng.integers(len(patterns)))]),
            "shape": replace(inst, variant=variants[int(rng.integers(len(variants)))]),
        }

    # ---- layout and rendering

    def place(
        self,
        inst: Instance,
        rng: np.random.Generator,
        position: str | None = None,
        size: str | None = None,
        crowded: bool = False,
    ) -> Placement:
        """Random size and position; `crowded` keeps it small enough to share the frame."""
        size = size or SIZES[int(rng.integers(len(SIZES)))]
        position = position or POSITIONS[int(rng.integers(len(POSITIONS)))]
        lo, hi = {"small": (14, 20), "large": (22, 27) if crowded else (27, 36)}[size]
        height = float(rng.uniform(lo, hi))
        ratio = SHAPES[inst.category][inst.variant][1] * inst.aspect
        max_width = 28.0 if crowded else 46.0
        if height * ratio > max_width:
            height = max_width / ratio
        width = height * ratio
        centre = {"left": 0.25, "middle": 0.5, "right": 0.75}[position] * IMAGE_SIZE
        x = float(np.clip(centre + rng.uniform(-4, 4), width / 2 + 1, IMAGE_SIZE - width / 2 - 1))
        y_lo, y_hi = max(height / 2 + 2, 30.0), IMAGE_SIZE - height / 2 - 2
        y = float(rng.uniform(min(y_lo, y_hi), y_hi))
        return Placement(inst, x, y, height, width, size, position)

    def layout(self, objects: Sequence[Instance], rng: np.random.Generator) -> list[Placement]:
        """Place one object anywhere, or two side by side (the first on the left)."""
        if len(objects) == 1:
            return [self.place(objects[0], rng)]
        if len(objects) == 2:
            return [
                self.place(objects[0], rng, "left", crowded=True),
                self.place(objects[1], rng, "right", crowded=True),
            ]
        raise ValueError("a scene holds one or two objects")

    def render_array(
        self, scene: str, objects: Sequence[Placement], rng: np.random.Generator
    ) -> np.ndarray:
        """(64, 64, 3) uint8 image of the scene with the placed objects."""
        img = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
        _BACKGROUNDS[scene](rng, img)
        light = _LIGHT.get(scene, 1.0) * float(rng.uniform(0.9, 1.08))
        for p in sorted(objects, key=lambda p: p.y):  # nearer (lower) objects drawn last
            _draw(img, p, light)
        img += rng.normal(0.0, rng.uniform(0.01, 0.035), img.shape).astype(np.float32)
        return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    def render(
        self,
        scene: str,
        objects: Sequence[Instance | Placement],
        rng: np.random.Generator,
    ) -> Image.Image:
        """PIL image of the scene; bare instances are placed at random."""
        if scene not in SCENES:
            raise ValueError(f"unknown scene {scene!r}")
        bare = [o for o in objects if isinstance(o, Instance)]
        placed = [o for o in objects if isinstance(o, Placement)]
        if bare:
            placed += self.layout(bare, rng) if not placed else [self.place(o, rng) for o in bare]
        return Image.fromarray(self.render_array(scene, placed, rng))

    # ---- captions and examples

    def caption(
        self,
        scene: str,
        objects: Sequence[Placement],
        rng: np.random.Generator,
        detail: Literal["full", "random", "minimal"] = "random",
        with_scene: bool = True,
    ) -> str:
        """A caption naming every object's category (and the scene), never hidden attributes.

        Shape variants are named in "full" captions and in half the "random" ones.
        """
        phrases = [_object_phrase(p, rng, detail) for p in objects]
        if detail == "full":
            template, scene_phrase = TEMPLATES[0], SCENE_PHRASES[scene][0]
        else:
            template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
            scene_phrase = _pick(rng, SCENE_PHRASES[scene])
        if not with_scene:
            scene_phrase = ""
        return template.format(objects=" and ".join(phrases), scene=scene_phrase).strip()

    def example(self, index: int, split: Split = "train") -> Example:
        """The index-th captioned random scene of a split (train, eval and bench never overlap)."""
        return self._example(self.rng(split, index))

    def shape_twin(self, index: int, split: Split = "train") -> Example:
        """`example(index, split)` with its first object in another shape variant.

        Same scene, background, colours, pattern, place and caption wording: the image and the
        captions differ only in that object's shape and variant word (a hard negative that
        teaches pretraining what the variant words mean).
        """
        return self._example(self.rng(split, index), variant_shift=1 + index % (N_VARIANTS - 1))

    def random_scene_image(self, rng: np.random.Generator) -> tuple[Image.Image, list[str]]:
        """A random captioned scene: (image, its 4 captions; see `Example.captions`)."""
        ex = self._example(rng)
        return Image.fromarray(ex.image), list(ex.captions)

    def pattern_twin(self, index: int, split: Split = "train") -> Example:
        """`example(index, split)` with its first object in another pattern (a named one:
        plain, striped, dotted, checkered).

        Same scene, background, colours, shape, place and caption wording: the image and the
        captions differ only in that object's pattern and the words that name it (a hard
        negative, as `shape_twin` is for shapes).
        """
        shift = 1 + index % (len(PATTERNS) - 1)
        return self._example(self.rng(split, index), pattern_shift=shift)

    def twin(self, index: int, split: Split, kind: str) -> Example:
        """The hard negative of `example(index, split)` of a twin kind: "shape", "pattern", or
        "both" (shape twins for even indices, pattern twins for odd ones)."""
        if kind not in TWIN_KINDS:
            raise ValueError(f"unknown twin kind {kind!r}; known: {list(TWIN_KINDS)}")
        if kind == "shape" or (kind == "both" and index % 2 == 0):
            return self.shape_twin(index, split)
        return self.pattern_twin(index, split)

    def _example(
        self, rng: np.random.Generator, variant_shift: int = 0, pattern_shift: int = 0
    ) -> Example:
        scene = SCENES[int(rng.integers(len(SCENES)))]
        n = 2 if rng.random() < 0.3 else 1
        objects = [self.sample_instance(rng) for _ in range(n)]
        if variant_shift:  # after sampling: the same draws as the untouched example
            first = objects[0]
            objects[0] = replace(first, variant=(first.variant + variant_shift) % N_VARIANTS)
        if pattern_shift:  # the pattern draws no numbers when drawn or captioned
            first = objects[0]
            k = (PATTERNS.index(first.pattern) + pattern_shift) % len(PATTERNS)
            objects[0] = replace(first, pattern=PATTERNS[k])
        placed = self.layout(objects, rng)
        image = self.render_array(scene, placed, rng)
        captions = (
            self.caption(scene, placed, rng, "full"),
            self.caption(scene, placed, rng, "random"),
            self.caption(scene, placed, rng, "random"),
            self.caption(scene, placed, rng, "random", with_scene=False),
        )
        return Example(image, scene, tuple(placed), captions)


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def article(phrase: str) -> str:
    """'a ball' / 'an orange ball'."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _object_phrase(p: Placement, rng: np.random.Generator, detail: str) -> str:
    """'a small red and blue striped tennis ball on the left' with a random subset of the
    attributes."""
    inst = p.instance
    full = detail == "full"
    some = detail == "random"
    # draw every coin even when unused so one rng yields the same words for twins
    coins = rng.random(5)
    name_colour = full or (some and coins[0] < 0.6)
    name_pattern = full or (some and coins[1] < 0.5)
    name_size = full or (some and coins[2] < 0.3)
    name_pos = full or (some and coins[3] < 0.3)
    dots_form = coins[4] < 0.5 and not full
    # World v2 names the shape variant; its coin is derived from coins[0] (the fractional part
    # of 64 × a uniform is uniform and all but independent of it), so captions draw exactly as
    # many numbers as in v1 and every image rendered after a caption stays the same.
    name_variant = full or (some and (coins[0] * 64.0) % 1.0 < VARIANT_COIN)
    noun = f"{inst.variant_name} {inst.category}" if name_variant else inst.category
    words: list[str] = []
    if name_size:
        words.append(SIZE_WORDS[p.size][0] if full else _pick(rng, SIZE_WORDS[p.size]))
    patterned = inst.pattern != "plain"
    if name_pattern and patterned and inst.pattern == "dotted" and (full or dots_form):
        colour = [inst.color] if name_colour else []
        tail = f" with {inst.color2} dots" if name_colour else " with dots"
        phrase = " ".join([*words, *colour, noun]) + tail
    else:
        if name_colour:
            words += [inst.color, "and", inst.color2] if patterned else [inst.color]
        if name_pattern:
            words.append(inst.pattern)
        phrase = " ".join([*words, noun])
    if name_pos:
        phrase += " " + (
            POSITION_PHRASES[p.position][0] if full else _pick(rng, POSITION_PHRASES[p.position])
        )
    return article(phrase)


def caption_vocabulary() -> set[str]:
    """Every word a caption can contain."""
    words = set(CATEGORIES) | set(COLORS) | set(PATTERNS) | {"and", "with", "dots", "a", "an"}
    words |= {name for names in VARIANT_NAMES.values() for name in names}
    for group in (*SCENE_PHRASES.values(), *POSITION_PHRASES.values(), *SIZE_WORDS.values()):
        for phrase in group:
            words |= set(phrase.split())
    for template in TEMPLATES:
        words |= {w for w in template.split() if not w.startswith("{")}
    return words


def render_examples(
    seed: int, split: Split, start: int, stop: int, twins: str | None = None
) -> tuple[np.ndarray, list[tuple[str, ...]]]:
    """Examples start..stop-1 as one (n, 64, 64, 3) uint8 array and their captions (pool worker).

    With `twins` (a kind of `World.twin`), each example is followed by its twin (2n rows).
    """
    world = World(seed)
    per = 2 if twins else 1
    images = np.empty(((stop - start) * per, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    captions: list[tuple[str, ...]] = []
    for i in range(start, stop):
        exs = [world.example(i, split)]
        if twins:
            exs.append(world.twin(i, split, twins))
        for k, ex in enumerate(exs):
            images[(i - start) * per + k] = ex.image
            captions.append(ex.captions)
    return images, captions
