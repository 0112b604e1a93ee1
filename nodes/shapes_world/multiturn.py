"""Multi-turn scenes of the shapes world (an i-CLEVR-like set), GeNeVA-format HDF5 files, and the
GeNeVA metrics (issue 10; CDD-ICM, arXiv 2304.02192, Sec. 4; data and metrics as Maluuba/GeNeVA).

* Episodes: a background, then `turns` turns each adding one new object (a distinct shape-colour
  pair of the world's 3 x 8 = 24, i-CLEVR's entity count) with an instruction relative to what is
  there: "add a red square to the left of the blue circle". The first turn names a region of the
  canvas ("add a red square at the top left"). The target image of each turn is the world's own
  rendering of the objects so far over the same background.
* GeNeVA-format files (`clevr_*.h5` / `codraw_*.h5` layouts of Maluuba/GeNeVA_datasets):
  write_iclevr_h5 / read_iclevr_h5 / read_codraw_h5 (h5py, a training-side dependency).
* Metrics as GeNeVA computes them (`geneva/metrics/inception_localizer.py`), with the shapes-world
  detector in place of its Inception localizer, run on generated and ground-truth images alike:
  precision / recall / F1 averaged over images (sklearn's average='samples', zero when undefined),
  and RSIM = recall x the share of equal entries of the left/right and above/below sign matrices
  over the objects found in both.

Only numpy (and h5py for the files); nothing here knows about torch or ComfyUI.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from . import world

ENTITIES = [f"{colour} {shape}" for shape in world.SHAPES for colour in world.COLOURS]  # 24, i-CLEVR-sized
DEFAULT_TURNS = 5
REGIONS = {("left", "top"): "at the top left", ("middle", "top"): "at the top", ("right", "top"): "at the top right",
           ("left", "middle"): "on the left", ("middle", "middle"): "in the middle", ("right", "middle"): "on the right",
           ("left", "bottom"): "at the bottom left", ("middle", "bottom"): "at the bottom",
           ("right", "bottom"): "at the bottom right"}
# The first turn's object is placed in the region its instruction names (thirds of the canvas).
_THIRD = world.SIZE / 3.0


def entity_index(shape: str, colour: str) -> int:
    return ENTITIES.index(f"{colour} {shape}")


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def region_of(center: tuple[float, float]) -> str:
    x, y = center
    col = "left" if x < _THIRD else "right" if x >= 2 * _THIRD else "middle"
    row = "top" if y < _THIRD else "bottom" if y >= 2 * _THIRD else "middle"
    return REGIONS[(col, row)]


def instruction(new: world.ShapeObject, anchor: world.ShapeObject | None) -> str:
    """i-CLEVR-style: 'add a red square to the left of the blue circle' (relation on the axis where the
    centres differ most, as the world's captions), or a canvas region for the first object."""
    what = _article(f"{new.colour} {new.shape}")
    if anchor is None:
        return f"add {what} {region_of(new.center)}"
    return f"add {what} {world.relation(new, anchor)} the {anchor.colour} {anchor.shape}"


@dataclass
class Episode:
    """One multi-turn scene. images[k] is the target after turn k (uint8 [T, H, W, 3], RGB);
    objects[k] the cumulative multi-hot over ENTITIES; coords[k] per entity (x, y, 0) in pixels of a
    128 canvas (GeNeVA's i-CLEVR layout), zero for absent entities."""
    seed: int
    background: np.ndarray                    # uint8 [H, W, 3], the canvas before turn 1
    images: np.ndarray
    instructions: list[str]
    objects: np.ndarray                       # [T, 24] float
    coords: np.ndarray                        # [T, 24, 3] float
    shapes: list[world.ShapeObject] = field(default_factory=list, repr=False)

    @property
    def turns(self) -> int:
        return len(self.instructions)

    def reference(self, turn: int) -> np.ndarray:
        """The image a turn starts from (teacher forcing): the background, then the previous target."""
        return self.background if turn == 0 else self.images[turn - 1]


_ATTEMPTS = 32  # draws per seed before giving up (a crowded seed needs a second draw a few times in 10k)


def generate_episode(seed: int, turns: int = DEFAULT_TURNS, background_style: str | None = None) -> Episode:
    """The episode for a seed: same background every turn, one new object per turn, placed where it
    does not touch the others, its instruction relative to the nearest object already there.

    A few seeds in ten thousand leave no room for the last objects; they draw again from a derived
    stream (attempt 1, 2, ...), so every seed has an episode and the seeds that fit keep theirs."""
    for attempt in range(_ATTEMPTS):
        key = [0x1C1E, int(seed)] + ([attempt] if attempt else [])
        episode = _draw_episode(int(seed), turns, background_style, np.random.default_rng(key))
        if episode is not None:
            return episode
    raise RuntimeError(f"seed {seed}: no room for {turns} objects in {_ATTEMPTS} draws (too many turns for the canvas)")


def _draw_episode(seed: int, turns: int, background_style: str | None, rng: np.random.Generator) -> Episode | None:
    style = background_style or world.BACKGROUNDS[int(rng.integers(len(world.BACKGROUNDS)))]
    background_seed = int(rng.integers(2 ** 31))
    pairs = [(s, c) for s in world.SHAPES for c in world.COLOURS]
    order = rng.permutation(len(pairs))
    placed: list[world.ShapeObject] = []
    taken: list[tuple[int, int, int, int]] = []
    texts, images = [], []
    objects = np.zeros((turns, len(ENTITIES)), np.float32)
    coords = np.zeros((turns, len(ENTITIES), 3), np.float32)
    bg = world.render([], style, np.random.default_rng(background_seed))
    for k, pair_index in enumerate(order[:turns]):
        shape, colour = pairs[int(pair_index)]
        size = "small" if rng.random() < 0.4 else "big"
        box = None
        for side_range in (world.SIZES[size], world.SIZES["small"]):
            box = world._place(rng, int(rng.integers(side_range[0], side_range[1] + 1)), taken)
            if box is not None:
                break
        if box is None:
            return None
        new = world.ShapeObject(shape, colour, size, box)
        anchor = None
        if placed:
            anchor = min(placed, key=lambda o: (o.center[0] - new.center[0]) ** 2 + (o.center[1] - new.center[1]) ** 2)
        texts.append(instruction(new, anchor))
        placed.append(new)
        taken.append(box)
        images.append(world.render(placed, style, np.random.default_rng(background_seed)))
        if k > 0:
            objects[k] = objects[k - 1]
            coords[k] = coords[k - 1]
        e = entity_index(shape, colour)
        objects[k, e] = 1.0
        coords[k, e] = (new.center[0], new.center[1], 0.0)
    return Episode(seed, bg, np.stack(images), texts, objects, coords, placed)


# ---------------------------------------------------------------------------------------------
# GeNeVA-format HDF5 (h5py)

def _h5py():
    try:
        import h5py
    except ImportError as e:  # training-side dependency (requirements-dev.txt)
        raise ImportError("reading/writing GeNeVA HDF5 files needs h5py: pip install h5py") from e
    return h5py


def write_iclevr_h5(path, episodes: list[Episode]) -> None:
    """Episodes in the layout of Maluuba/GeNeVA_datasets' `clevr_{split}.h5`: one group per scene id
    with `images` (T, 128, 128, 3) **BGR** uint8 (written by OpenCV there), `text` (a JSON list),
    `objects` (T, 24), `coords` (T, 24, 3), `scene_id`; file-level `background` (BGR) and `entities`
    (a JSON list of the 24 names). GeNeVA files have one background (i-CLEVR's empty table); shapes-world
    episodes each have their own, so each group also holds its `background` (BGR), which GeNeVA's
    readers ignore and ours prefers."""
    h5py = _h5py()
    with h5py.File(str(path), "w") as f:
        f.create_dataset("background", data=episodes[0].background[..., ::-1])
        f.create_dataset("entities", data=json.dumps(ENTITIES))
        for ep in episodes:
            g = f.create_group(f"{ep.seed:06d}")
            g.create_dataset("scene_id", data=f"{ep.seed:06d}")
            g.create_dataset("images", data=ep.images[..., ::-1])
            g.create_dataset("text", data=json.dumps(ep.instructions))
            g.create_dataset("objects", data=ep.objects.astype(np.float64))
            g.create_dataset("coords", data=ep.coords.astype(np.float64))
            g.create_dataset("background", data=ep.background[..., ::-1])


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _text(value.item())
    return str(value)


@dataclass
class GenevaScene:
    """One scene read from a GeNeVA file: RGB uint8 images [T, H, W, 3], one instruction per turn,
    multi-hot objects [T, N] and coords [T, N, 3] (i-CLEVR: x, y, depth; CoDraw: x, y, z-order)."""
    key: str
    images: np.ndarray
    instructions: list[str]
    objects: np.ndarray
    coords: np.ndarray
    background: np.ndarray


def read_iclevr_h5(path) -> tuple[list[str], list[GenevaScene]]:
    """(entities, scenes) of an i-CLEVR file; images converted from BGR to RGB. Groups are every
    non-dataset key (the files' scene ids), in sorted order. A group's own `background` (files this
    module writes) wins over the file's."""
    h5py = _h5py()
    with h5py.File(str(path), "r") as f:
        background = np.asarray(f["background"][()])[..., ::-1].copy()
        entities = json.loads(_text(f["entities"][()]))
        scenes = []
        for key in sorted(k for k in f.keys() if isinstance(f[k], h5py.Group)):
            g = f[key]
            own = np.asarray(g["background"][()])[..., ::-1].copy() if "background" in g else background
            scenes.append(GenevaScene(key, np.asarray(g["images"][()])[..., ::-1].copy(), json.loads(_text(g["text"][()])),
                                      np.asarray(g["objects"][()], np.float32), np.asarray(g["coords"][()], np.float32),
                                      own))
    return entities, scenes


def read_codraw_h5(path) -> list[GenevaScene]:
    """Scenes of a CoDraw file (`codraw_{split}.h5`: groups "0".."N" with `images` BGR, `utterences`
    (the GeNeVA spelling: variable-length strings, one per turn, '<teller> ... <drawer> ...'),
    `objects` (T, 58), `coords` (T, 58, 3), and a file-level `background`), in numeric order."""
    h5py = _h5py()
    with h5py.File(str(path), "r") as f:
        background = np.asarray(f["background"][()])[..., ::-1].copy()
        keys = sorted((k for k in f.keys() if k.isdigit()), key=int)
        scenes = []
        for key in keys:
            g = f[key]
            texts = [_text(t) for t in np.asarray(g["utterences"][()]).reshape(-1)]
            scenes.append(GenevaScene(key, np.asarray(g["images"][()])[..., ::-1].copy(), texts,
                                      np.asarray(g["objects"][()], np.float32), np.asarray(g["coords"][()], np.float32),
                                      background))
    return scenes


# ---------------------------------------------------------------------------------------------
# Metrics (GeNeVA's, with the shapes-world detector)

def detect_entities(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The detector's multi-hot over ENTITIES and per-entity location (x, y) in [0, 1] (the centre of
    the largest detection of that shape and colour), as GeNeVA's localizer outputs them."""
    from . import detector

    found = detector.detect(image)
    hot = np.zeros(len(ENTITIES), np.int64)
    loc = np.zeros((len(ENTITIES), 2), np.float32)
    h, w = image.shape[:2]
    for d in found:  # largest first
        e = entity_index(d.shape, d.colour)
        if not hot[e]:
            hot[e] = 1
            loc[e] = (d.center[0] / w, d.center[1] / h)
    return hot, loc


def prf_samples(truth: np.ndarray, pred: np.ndarray) -> tuple[float, float, float]:
    """Precision, recall, F1 averaged over samples (rows of {0,1} [N, C]), as sklearn's
    average='samples' with zero for an undefined ratio (no predictions / no true labels)."""
    truth, pred = np.asarray(truth).astype(bool), np.asarray(pred).astype(bool)
    tp = (truth & pred).sum(1).astype(np.float64)
    n_pred, n_true = pred.sum(1), truth.sum(1)
    precision = np.divide(tp, n_pred, out=np.zeros_like(tp), where=n_pred > 0)
    recall = np.divide(tp, n_true, out=np.zeros_like(tp), where=n_true > 0)
    denominator = n_pred + n_true
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return float(precision.mean()), float(recall.mean()), float(f1.mean())


def relation_graph(coords: np.ndarray) -> np.ndarray:
    """GeNeVA's construct_graph: [2, n, n] signs of x_i - x_j and y_i - y_j (+1, -1, 0), with the
    diagonal comparing each object against the canvas centre (0.5, 0.5)."""
    coords = np.asarray(coords, np.float64)
    n = len(coords)
    query = np.broadcast_to(coords[None, :, :2], (n, n, 2)).copy()
    query[np.arange(n), np.arange(n)] = 0.5
    return np.sign(coords[:, None, :2] - query).transpose(2, 0, 1)


def rsim(pred: np.ndarray, pred_loc: np.ndarray, truth: np.ndarray, truth_loc: np.ndarray) -> float:
    """GeNeVA's graph similarity of one image: recall(truth, pred) x the share of equal entries of the
    relation graphs of the objects found in both; 0 when none is."""
    pred, truth = np.asarray(pred).astype(bool), np.asarray(truth).astype(bool)
    both = pred & truth
    if not both.any():
        return 0.0
    matches = relation_graph(pred_loc[both]) == relation_graph(truth_loc[both])
    recall = both.sum() / truth.sum()
    return float(recall * matches.mean())


def evaluate_turns(generated: list[np.ndarray], ground_truth: list[np.ndarray]) -> dict:
    """Metrics of generated episodes against ground truth, the detector on both (as GeNeVA):
    generated / ground_truth are lists of uint8 [T, H, W, 3] arrays, one per episode, same T.
    Returns per-turn precision/recall/F1 (lists, turn 1 first), overall P/R/F1 over all images,
    RSIM on the last turn and RSIM over all images (what GeNeVA's code averages)."""
    turns = generated[0].shape[0]
    per_turn = {"precision": [], "recall": [], "f1": [], "rsim": []}
    all_truth, all_pred, all_rsim = [], [], []
    for k in range(turns):
        truth_rows, pred_rows, sims = [], [], []
        for gen, gt in zip(generated, ground_truth):
            p, pl = detect_entities(gen[k])
            t, tl = detect_entities(gt[k])
            truth_rows.append(t)
            pred_rows.append(p)
            sims.append(rsim(p, pl, t, tl))
        precision, recall, f1 = prf_samples(np.stack(truth_rows), np.stack(pred_rows))
        per_turn["precision"].append(precision)
        per_turn["recall"].append(recall)
        per_turn["f1"].append(f1)
        per_turn["rsim"].append(float(np.mean(sims)))
        all_truth += truth_rows
        all_pred += pred_rows
        all_rsim += sims
    precision, recall, f1 = prf_samples(np.stack(all_truth), np.stack(all_pred))
    return {"per_turn": per_turn, "precision": precision, "recall": recall, "f1": f1,
            "rsim_last_turn": per_turn["rsim"][-1], "rsim_all": float(np.mean(all_rsim)), "episodes": len(generated),
            "turns": turns}
