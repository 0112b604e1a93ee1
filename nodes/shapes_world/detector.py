"""A classical object detector for shapes-world images (generated or model-made).

It plays the part of the papers' object detectors and classifiers in the benchmarks:
  1. foreground = saturated, not-dark pixels (the world's backgrounds have saturation <= 0.18);
  2. each foreground pixel takes the nearest palette colour (RGB distance); per colour, a
     morphological opening removes anti-aliased rims and connected components are objects;
  3. shape = the template (circle, square, triangle drawn in the component's box) with the
     highest IoU with the component's mask; size from the box side; position from the box.

`evaluate(seeds)` measures it against the generator's metadata on (held-out) scenes.
numpy + scipy only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from . import world

PALETTE_NAMES = list(world.COLOURS)
PALETTE = np.array([world.COLOURS[c] for c in PALETTE_NAMES], dtype=np.float32) / 255.0
MIN_AREA = 60          # px; the smallest object (a 16 px triangle) covers about 128
SAT_THRESHOLD = 0.35
VALUE_THRESHOLD = 0.30
SMALL_MAX_SIDE = 27    # generator: small boxes 16..24 px, big 30..44 px

_T = 32  # template resolution


def _templates() -> dict[str, np.ndarray]:
    yy, xx = (np.mgrid[0:_T, 0:_T] + 0.5) / _T
    circle = (xx - 0.5) ** 2 + (yy - 0.5) ** 2 <= 0.25
    square = np.ones((_T, _T), bool)
    triangle = np.abs(xx - 0.5) <= yy / 2  # apex at the top centre, base at the bottom
    return {"circle": circle, "square": square, "triangle": triangle}


TEMPLATES = _templates()


@dataclass
class Detection:
    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    area: int
    score: float  # template IoU of the chosen shape

    @property
    def center(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2.0, (self.box[1] + self.box[3]) / 2.0)

    def to_dict(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "box": list(self.box),
                "center": list(self.center), "area": self.area, "score": self.score}


def _resize_mask(mask: np.ndarray) -> np.ndarray:
    """Nearest-neighbour resample of a cropped mask to the template grid."""
    h, w = mask.shape
    ys = ((np.arange(_T) + 0.5) * h / _T).astype(int).clip(0, h - 1)
    xs = ((np.arange(_T) + 0.5) * w / _T).astype(int).clip(0, w - 1)
    return mask[ys][:, xs]


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """The template shape with the best IoU with a mask cropped to its box."""
    m = _resize_mask(mask)
    best, best_iou = "square", -1.0
    for name, t in TEMPLATES.items():
        iou = float((m & t).sum()) / float((m | t).sum() or 1)
        if iou > best_iou:
            best, best_iou = name, iou
    return best, best_iou


def foreground_labels(image: np.ndarray) -> np.ndarray:
    """Per-pixel palette index (0..7) for object pixels, -1 for background."""
    x = image[..., :3].astype(np.float32) / 255.0
    v = x.max(-1)
    s = (v - x.min(-1)) / np.maximum(v, 1e-6)
    fg = (s > SAT_THRESHOLD) & (v > VALUE_THRESHOLD)
    d = ((x[:, :, None, :] - PALETTE[None, None]) ** 2).sum(-1)
    labels = d.argmin(-1)
    return np.where(fg, labels, -1)


def detect(image: np.ndarray, min_area: int = MIN_AREA) -> list[Detection]:
    """Objects in an HxWx3 uint8 image (any size; boxes in its pixels), largest first."""
    labels = foreground_labels(image)
    found: list[Detection] = []
    for ci, colour in enumerate(PALETTE_NAMES):
        m = labels == ci
        if m.sum() < min_area:
            continue
        m = ndimage.binary_opening(m, structure=np.ones((3, 3), bool))
        comps, n = ndimage.label(m)
        for k, sl in enumerate(ndimage.find_objects(comps), start=1):
            if sl is None:
                continue
            comp = comps[sl] == k
            area = int(comp.sum())
            if area < min_area:
                continue
            comp = ndimage.binary_fill_holes(comp)
            shape, score = classify_shape(comp)
            y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
            side = max(x1 - x0, y1 - y0) * 128.0 / max(image.shape[0], image.shape[1])
            found.append(Detection(shape, colour, "small" if side <= SMALL_MAX_SIDE else "big",
                                   (x0, y0, x1, y1), area, score))
    found.sort(key=lambda d: -d.area)
    return found


# ---------------------------------------------------------------------------------------------
# Matching and evaluation

def box_iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def assign(wanted: list[dict], found: list[Detection], check_size: bool = False) -> list[int] | None:
    """For each wanted object (shape, colour, optionally size) in order, the index of a different
    detection showing it (greedy, first fit); None when one is missing."""
    used: list[int] = []
    for w in wanted:
        for i, d in enumerate(found):
            if i in used or d.shape != w["shape"] or d.colour != w["colour"]:
                continue
            if check_size and w.get("size") and d.size != w["size"]:
                continue
            used.append(i)
            break
        else:
            return None
    return used


def prompt_satisfied(wanted: list[dict], found: list[Detection], check_size: bool = False) -> bool:
    """Every wanted object (shape, colour, optionally size) is found, each by a different detection."""
    return assign(wanted, found, check_size) is not None


def match(truth: list, found: list[Detection], min_iou: float = 0.5) -> list[tuple[int, int]]:
    """Greedy one-to-one matching of true objects to detections by box IoU."""
    pairs = sorted(((box_iou(t.box, d.box), ti, di) for ti, t in enumerate(truth) for di, d in enumerate(found)),
                   reverse=True)
    used_t, used_d, out = set(), set(), []
    for iou, ti, di in pairs:
        if iou < min_iou or ti in used_t or di in used_d:
            continue
        used_t.add(ti)
        used_d.add(di)
        out.append((ti, di))
    return out


def evaluate(seeds) -> dict:
    """Accuracy against the generator's metadata: object recall (found at the right place with the
    right shape and colour), precision (detections that are a true object with its shape and
    colour), shape/colour/size accuracy of located objects, scenes recovered exactly."""
    n_true = n_found = n_correct = n_located = shape_ok = colour_ok = size_ok = exact = 0
    for s in seeds:
        sc = world.generate(int(s))
        found = detect(sc.image)
        pairs = match(sc.objects, found)
        n_true += len(sc.objects)
        n_found += len(found)
        n_located += len(pairs)
        correct = 0
        for ti, di in pairs:
            t, d = sc.objects[ti], found[di]
            shape_ok += t.shape == d.shape
            colour_ok += t.colour == d.colour
            size_ok += t.size == d.size
            correct += t.shape == d.shape and t.colour == d.colour
        n_correct += correct
        exact += correct == len(sc.objects) == len(found)
    return {
        "scenes": len(seeds), "objects": n_true,
        "recall": n_correct / max(n_true, 1),
        "precision": n_correct / max(n_found, 1),
        "located": n_located / max(n_true, 1),
        "shape_accuracy": shape_ok / max(n_located, 1),
        "colour_accuracy": colour_ok / max(n_located, 1),
        "size_accuracy": size_ok / max(n_located, 1),
        "scene_exact": exact / max(len(seeds), 1),
    }
