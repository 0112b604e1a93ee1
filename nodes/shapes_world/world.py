"""Shapes world: a deterministic, seeded procedural image world with captions and metadata.

Each scene is a 128x128 RGB image holding 1 to 4 non-overlapping objects (circle, square,
triangle) in one of 8 saturated colours and two sizes, on one of several low-saturation
background styles (plain, gradient, stripes, checker, dots, noise texture). It comes with a
plain-English caption ("a red circle to the left of a small blue square on a striped
background") and metadata per object: shape, colour, size, box and mask.

Only numpy and pillow: nothing here knows about torch or ComfyUI. The same seed gives the
same scene on every machine (numpy's PCG64 generator, integer geometry).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SIZE = 128
SUPERSAMPLE = 2  # objects are drawn at 2x and box-filtered down: smooth edges, cheap

SHAPES = ("circle", "square", "triangle")
# Saturated, well separated colours (the detector tells them apart by nearest palette entry).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "orange": (245, 140, 20),
    "yellow": (240, 215, 25),
    "green": (35, 165, 55),
    "cyan": (25, 200, 215),
    "blue": (35, 65, 215),
    "purple": (135, 45, 185),
    "pink": (245, 105, 185),
}
SIZES = {"small": (16, 24), "big": (30, 44)}  # box side range in pixels
BACKGROUNDS = ("plain", "gradient", "stripes", "checker", "dots", "noise")
BACKGROUND_PHRASES = {
    "plain": "on a plain background",
    "gradient": "on a gradient background",
    "stripes": "on a striped background",
    "checker": "on a checkered background",
    "dots": "on a dotted background",
    "noise": "on a grainy background",
}
RELATIONS = ("to the left of", "to the right of", "above", "below")


@dataclass
class ShapeObject:
    shape: str
    colour: str
    size: str                      # "small" | "big"
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), pixels
    mask: np.ndarray | None = field(default=None, repr=False)  # bool HxW

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return ((x0 + x1) / 2.0, (y0 + y1) / 2.0)

    def phrase(self, with_size: bool) -> str:
        words = (["small" if self.size == "small" else "big"] if with_size else []) + [self.colour, self.shape]
        return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)

    def to_dict(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "box": list(self.box),
                "center": list(self.center)}


@dataclass
class Scene:
    image: np.ndarray               # uint8 HxWx3
    objects: list[ShapeObject]
    background: str
    caption: str
    seed: int

    def metadata(self) -> dict:
        return {"seed": self.seed, "background": self.background, "caption": self.caption,
                "objects": [o.to_dict() for o in self.objects]}


# ---------------------------------------------------------------------------------------------
# Backgrounds: low saturation, so the saturated objects stand out to the detector.

def _pale(rng: np.random.Generator, dark: bool = False) -> np.ndarray:
    """A low-saturation colour (saturation <= 0.18)."""
    v = rng.uniform(0.18, 0.32) if dark else rng.uniform(0.62, 0.96)
    s = rng.uniform(0.0, 0.18)
    hue_rgb = np.array(COLOURS[list(COLOURS)[rng.integers(len(COLOURS))]], dtype=np.float64) / 255.0
    grey = np.full(3, 1.0)
    c = grey * (1 - s) + hue_rgb / hue_rgb.max() * s
    return c / c.max() * v


def background(style: str, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """A float HxWx3 image in [0, 1] of the given style."""
    dark = style == "plain" and rng.random() < 0.25
    a, b = _pale(rng, dark), _pale(rng)
    if np.abs(a - b).mean() < 0.12:  # textures need visible contrast: darken or lighten b
        b = np.clip(b * (0.72 if b.max() > 0.8 else 1.3), 0.0, 1.0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    if style == "plain":
        t = np.zeros((size, size))
    elif style == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        p = np.cos(angle) * xx + np.sin(angle) * yy
        t = (p - p.min()) / max(p.max() - p.min(), 1e-6)
    elif style == "stripes":
        period = int(rng.integers(8, 20))
        vertical = rng.random() < 0.5
        coord = xx if vertical else yy
        t = ((coord // (period // 2)) % 2).astype(np.float64)
    elif style == "checker":
        cell = int(rng.integers(8, 20))
        t = (((xx // cell) + (yy // cell)) % 2).astype(np.float64)
    elif style == "dots":
        spacing = int(rng.integers(10, 18))
        radius = rng.uniform(1.5, 3.0)
        dx = (xx % spacing) - spacing / 2
        dy = (yy % spacing) - spacing / 2
        t = (np.sqrt(dx * dx + dy * dy) < radius).astype(np.float64)
    elif style == "noise":
        # smooth value noise: a coarse random grid upsampled bilinearly, plus fine grain
        cells = int(rng.integers(6, 14))
        coarse = rng.random((cells + 1, cells + 1))
        img = Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
        t = np.asarray(img, dtype=np.float64) / 255.0
        t = np.clip(t + rng.normal(0, 0.08, (size, size)), 0, 1)
    else:
        raise ValueError(f"unknown background style {style!r}; known: {BACKGROUNDS}")
    return a[None, None, :] * (1 - t[..., None]) + b[None, None, :] * t[..., None]


# ---------------------------------------------------------------------------------------------
# Objects

def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill):
    s = SUPERSAMPLE
    x0, y0, x1, y1 = (v * s for v in box)
    if shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _place(rng: np.random.Generator, side: int, taken: list[tuple[int, int, int, int]], margin: int = 4):
    """A box of the given side that does not come within `margin` px of the taken boxes."""
    for _ in range(200):
        x0 = int(rng.integers(2, SIZE - side - 2))
        y0 = int(rng.integers(2, SIZE - side - 2))
        box = (x0, y0, x0 + side, y0 + side)
        if all(box[0] >= t[2] + margin or box[2] + margin <= t[0] or box[1] >= t[3] + margin or box[3] + margin <= t[1]
               for t in taken):
            return box
    return None


def render(objects: list[ShapeObject], background_style: str, rng: np.random.Generator) -> np.ndarray:
    """Draw objects (with their boxes set) over a background; fills each object's mask."""
    base = background(background_style, rng)
    big = SIZE * SUPERSAMPLE
    canvas = Image.fromarray((base * 255).round().astype(np.uint8)).resize((big, big), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        m = Image.new("L", (big, big), 0)
        _draw_shape(ImageDraw.Draw(m), obj.shape, obj.box, 255)
        _draw_shape(draw, obj.shape, obj.box, COLOURS[obj.colour])
        obj.mask = np.asarray(m.resize((SIZE, SIZE), Image.BOX)) >= 128
    return np.asarray(canvas.resize((SIZE, SIZE), Image.BOX), dtype=np.uint8).copy()


# ---------------------------------------------------------------------------------------------
# Captions

def relation(a: ShapeObject, b: ShapeObject) -> str:
    """Where a is relative to b, along the axis where they differ most."""
    (ax, ay), (bx, by) = a.center, b.center
    if abs(ax - bx) >= abs(ay - by):
        return "to the left of" if ax < bx else "to the right of"
    return "above" if ay < by else "below"


def caption(objects: list[ShapeObject], background_style: str | None, with_size: list[bool] | None = None) -> str:
    with_size = with_size or [False] * len(objects)
    phrases = [o.phrase(s) for o, s in zip(objects, with_size)]
    if len(objects) == 1:
        text = phrases[0]
    elif len(objects) == 2:
        text = f"{phrases[0]} {relation(objects[0], objects[1])} {phrases[1]}"
    else:
        order = sorted(range(len(objects)), key=lambda i: objects[i].center[0])
        ordered = [phrases[i] for i in order]
        text = ", ".join(ordered[:-1]) + " and " + ordered[-1]
    if background_style is not None:
        text += " " + BACKGROUND_PHRASES[background_style]
    return text


_PHRASE = re.compile(r"\b(?:(small|big)\s+)?(" + "|".join(COLOURS) + r")\s+(" + "|".join(SHAPES) + r")s?\b")


def parse_caption(text: str) -> list[dict]:
    """The objects a caption (or any prompt in the world's words) asks for, in order:
    [{"shape", "colour", "size" (None if unsaid)}]."""
    return [{"size": m.group(1), "colour": m.group(2), "shape": m.group(3)}
            for m in _PHRASE.finditer(text.lower())]


_RELATION = re.compile(r"\b(" + "|".join(RELATIONS) + r")\b")


def parse_relation(text: str) -> str | None:
    """The first relation a prompt states ("to the left of", "above"...), or None."""
    found = _RELATION.search(text.lower())
    return found.group(1) if found else None


def relation_holds(stated: str, a_center: tuple[float, float], b_center: tuple[float, float]) -> bool:
    """Whether "a <stated> b" is true of two centres (x, y; y down). Only the stated axis counts:
    a reader of "to the left of" asks that a be left of b, not that the horizontal gap be the
    larger one (which is how `relation` words the generator's own captions)."""
    (ax, ay), (bx, by) = a_center, b_center
    return {"to the left of": ax < bx, "to the right of": ax > bx, "above": ay < by, "below": ay > by}[stated]


# ---------------------------------------------------------------------------------------------
# Scenes

def generate(seed: int, n_objects: int | None = None, background_style: str | None = None,
             objects: list[dict] | None = None) -> Scene:
    """The scene for a seed. `n_objects`, `background_style` or explicit `objects`
    ([{"shape", "colour", "size"?}]) pin parts of it; the rest comes from the seed."""
    rng = np.random.default_rng([0x5A4E, int(seed)])
    style = background_style or BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    if objects is None:
        n = n_objects or int(rng.choice([1, 2, 3, 4], p=[0.3, 0.35, 0.2, 0.15]))
        pairs = [(s, c) for s in SHAPES for c in COLOURS]
        chosen = rng.choice(len(pairs), size=n, replace=False)
        specs = [{"shape": pairs[i][0], "colour": pairs[i][1]} for i in chosen]
    else:
        specs = objects
    placed: list[ShapeObject] = []
    taken: list[tuple[int, int, int, int]] = []
    for spec in specs:
        size = spec.get("size") or ("small" if rng.random() < 0.4 else "big")
        lo, hi = SIZES[size]
        box = None
        for _ in range(3):  # shrink toward "small" if the image is crowded
            box = _place(rng, int(rng.integers(lo, hi + 1)), taken)
            if box is not None:
                break
            size, (lo, hi) = "small", SIZES["small"]
        if box is None:
            continue
        taken.append(box)
        placed.append(ShapeObject(spec["shape"], spec["colour"], size, box))
    image = render(placed, style, rng)
    with_size = [bool(rng.random() < 0.5) for _ in placed]
    mention_bg = bool(rng.random() < 0.5)
    text = caption(placed, style if mention_bg else None, with_size)
    return Scene(image=image, objects=placed, background=style, caption=text, seed=int(seed))


def batch(seeds, n_objects: int | None = None) -> tuple[np.ndarray, list[str]]:
    """Images (uint8 NxHxWx3) and captions for a list of seeds."""
    scenes = [generate(int(s), n_objects=n_objects) for s in seeds]
    return np.stack([s.image for s in scenes]), [s.caption for s in scenes]


# Seeds at or above this are held out of training (detector evaluation, benchmarks).
HELD_OUT_SEED_START = 10_000_000
