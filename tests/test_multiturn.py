"""The multi-turn shapes-world set, GeNeVA-format HDF5 readers, and GeNeVA's metrics against hand
computations.

Run: python -m pytest tests/test_multiturn.py -q
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest


@pytest.fixture(scope="module")
def mt(pack_module):
    return pack_module("nodes.shapes_world.multiturn")


@pytest.fixture(scope="module")
def episodes(mt):
    return [mt.generate_episode(10_000_000 + s) for s in range(6)]


def test_each_turn_adds_one_object_with_a_true_relative_instruction(mt, episodes):
    pattern = re.compile(r"^add an? (\w+) (\w+) (to the left of|to the right of|above|below) the (\w+) (\w+)$")
    for ep in episodes:
        assert ep.turns == 5 and ep.images.shape == (5, 128, 128, 3) and ep.objects.shape == (5, 24)
        assert ep.instructions[0].startswith("add ") and any(r in ep.instructions[0] for r in mt.REGIONS.values())
        assert np.array_equal(ep.objects.sum(1), np.arange(1, 6))  # cumulative, one new entity per turn
        for k in range(1, 5):
            assert np.all(ep.objects[k] >= ep.objects[k - 1])
            m = pattern.match(ep.instructions[k])
            assert m, ep.instructions[k]
            colour, shape, rel, anchor_colour, anchor_shape = m.groups()
            new = ep.shapes[k]
            assert (new.colour, new.shape) == (colour, shape)
            anchor = next(o for o in ep.shapes[:k] if (o.colour, o.shape) == (anchor_colour, anchor_shape))
            (nx, ny), (ax, ay) = new.center, anchor.center
            expected = {"to the left of": nx < ax, "to the right of": nx > ax, "above": ny < ay, "below": ny > ay}[rel]
            assert expected, ep.instructions[k]
            changed = np.abs(ep.images[k].astype(int) - ep.reference(k).astype(int)).sum(-1) > 0
            x0, y0, x1, y1 = new.box
            inside = np.zeros_like(changed)
            inside[y0:y1, x0:x1] = True
            assert changed[inside].any() and not changed[~inside].any()  # the turn drew its object and nothing else
        # the background is the same canvas every turn: pixels no object covers never change
        covered = np.zeros((128, 128), bool)
        for o in ep.shapes:
            x0, y0, x1, y1 = o.box
            covered[max(y0 - 1, 0):y1 + 1, max(x0 - 1, 0):x1 + 1] = True
        assert np.array_equal(ep.images[-1][~covered], ep.background[~covered])


def test_same_seed_same_episode(mt):
    a, b = mt.generate_episode(3), mt.generate_episode(3)
    assert a.instructions == b.instructions and np.array_equal(a.images, b.images)


def test_a_crowded_seed_draws_again_and_keeps_every_turn(mt, pack_module):
    """Seed 5582789's first draw leaves no room for its fifth object (training stopped on it once): it
    draws again and still gives five objects, each drawn where no other is."""
    box_iou = pack_module("nodes.shapes_world.detector").box_iou
    ep = mt.generate_episode(5582789)
    assert ep.turns == 5 and np.array_equal(ep.objects.sum(1), np.arange(1, 6))
    for i, a in enumerate(ep.shapes):
        for b in ep.shapes[i + 1:]:
            assert box_iou(a.box, b.box) == 0.0  # boxes do not overlap
    assert mt.generate_episode(5582789).instructions == ep.instructions


def test_ground_truth_scores_perfectly_against_itself(mt, episodes):
    """GeNeVA runs the detector on generated and ground-truth images alike: ground truth against itself
    must score 1 (and the detector must find what the episode holds)."""
    gt = [ep.images for ep in episodes]
    result = mt.evaluate_turns(gt, gt)
    assert result["f1"] == 1.0 and result["rsim_last_turn"] == 1.0
    found = [mt.detect_entities(ep.images[-1])[0] for ep in episodes]
    precision, recall, f1 = mt.prf_samples(np.stack([ep.objects[-1] for ep in episodes]), np.stack(found))
    assert recall >= 0.9 and precision >= 0.9, (precision, recall)
    # an empty generation: nothing found, zero everywhere (no division warnings)
    blank = [np.repeat(ep.background[None], 5, 0) for ep in episodes]
    zero = mt.evaluate_turns(blank, gt)
    assert zero["f1"] == 0.0 and zero["rsim_last_turn"] == 0.0


# ---------------------------------------------------------------------------------------------
# Metrics by hand

def test_prf_samples_by_hand(mt):
    truth = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    pred = np.array([[1, 0, 1, 0], [1, 0, 0, 0], [0, 0, 1, 0]])
    precision, recall, f1 = mt.prf_samples(truth, pred)
    # row 1: tp 1, |pred| 2, |true| 2 -> p .5 r .5 f1 .5; row 2: 1, 1, 1; row 3: p 0 (tp 0 of 1), r undefined -> 0, f1 0
    assert precision == pytest.approx((0.5 + 1 + 0) / 3)
    assert recall == pytest.approx((0.5 + 1 + 0) / 3)
    assert f1 == pytest.approx((0.5 + 1 + 0) / 3)
    p, r, f = mt.prf_samples(np.array([[1, 1, 1, 0]]), np.array([[1, 0, 0, 0]]))
    assert (p, r, f) == (1.0, pytest.approx(1 / 3), pytest.approx(2 * 1 / (1 + 3)))


def test_relation_graph_and_rsim_by_hand(mt):
    coords = np.array([[0.2, 0.7], [0.6, 0.3]])
    graph = mt.relation_graph(coords)
    # x: diag sign(0.2-0.5)=-1, sign(0.6-0.5)=+1; off-diagonal sign(0.2-0.6)=-1 and +1
    assert graph[0].tolist() == [[-1, -1], [1, 1]]
    assert graph[1].tolist() == [[1, 1], [-1, -1]]
    truth = np.zeros(24, int)
    truth[[0, 1, 2]] = 1
    pred = np.zeros(24, int)
    pred[[0, 1, 5]] = 1
    truth_loc = np.zeros((24, 2))
    truth_loc[0], truth_loc[1] = (0.2, 0.7), (0.6, 0.3)
    pred_loc = truth_loc.copy()
    pred_loc[1] = (0.1, 0.3)  # object 1 moved left of object 0 and of the centre: x entries (0,1), (1,0), (1,1) flip
    # intersection {0, 1}: 8 entries, 3 differ -> 5/8 equal; recall 2/3
    assert mt.rsim(pred, pred_loc, truth, truth_loc) == pytest.approx(2 / 3 * 5 / 8)
    assert mt.rsim(pred, truth_loc, truth, truth_loc) == pytest.approx(2 / 3)
    assert mt.rsim(np.zeros(24, int), pred_loc, truth, truth_loc) == 0.0


# ---------------------------------------------------------------------------------------------
# GeNeVA-format files

def test_iclevr_file_round_trip_in_genevas_layout(mt, episodes, tmp_path):
    import h5py

    path = tmp_path / "clevr_test.h5"
    mt.write_iclevr_h5(path, episodes[:3])
    with h5py.File(path, "r") as f:  # the layout GeNeVA's readers index
        assert json.loads(f["entities"][()]) == mt.ENTITIES and len(mt.ENTITIES) == 24
        group = f[f"{episodes[0].seed:06d}"]
        assert group["images"].shape == (5, 128, 128, 3) and group["images"].dtype == np.uint8
        assert np.array_equal(group["images"][0][..., 0], episodes[0].images[0][..., 2])  # BGR on disk
        assert json.loads(group["text"][()]) == episodes[0].instructions
        assert group["objects"].shape == (5, 24) and group["coords"].shape == (5, 24, 3)
        assert f["background"].shape == (128, 128, 3)
    entities, scenes = mt.read_iclevr_h5(path)
    assert entities == mt.ENTITIES and len(scenes) == 3
    for scene, ep in zip(scenes, episodes):
        assert np.array_equal(scene.images, ep.images)  # back to RGB
        assert scene.instructions == ep.instructions
        assert np.array_equal(scene.objects, ep.objects) and np.allclose(scene.coords, ep.coords)
        assert np.array_equal(scene.background, ep.background)


def test_codraw_reader_on_a_file_written_as_genevas_script_writes_it(mt, tmp_path):
    import h5py

    rng = np.random.default_rng(0)
    path = tmp_path / "codraw_val.h5"
    turns = [3, 1, 2]
    written = []
    with h5py.File(path, "w") as f:
        background = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
        f.create_dataset("background", data=background)
        for i, n in enumerate(turns):
            g = f.create_group(str(i))
            images = rng.integers(0, 256, (n, 128, 128, 3), dtype=np.uint8)
            texts = [f"<teller> put a big tree on the left {i} {k} <drawer> ok" for k in range(n)]
            g.create_dataset("images", data=images)
            g.create_dataset("utterences", data=np.array([t.encode() for t in texts]), dtype=h5py.special_dtype(vlen=str))
            objects = (rng.random((n, 58)) > 0.8).astype(np.int64)
            coords = rng.integers(0, 128, (n, 58, 3))
            g.create_dataset("objects", data=objects)
            g.create_dataset("coords", data=coords)
            g.create_dataset("scene_id", data=1000 + i)
            written.append((images, texts, objects, coords))
        for i in range(10, 12):  # groups "10", "11": numeric order, not string order
            g = f.create_group(str(i))
            g.create_dataset("images", data=np.zeros((1, 128, 128, 3), np.uint8))
            g.create_dataset("utterences", data=np.array([b"<teller> x"]), dtype=h5py.special_dtype(vlen=str))
            g.create_dataset("objects", data=np.zeros((1, 58)))
            g.create_dataset("coords", data=np.zeros((1, 58, 3)))
    scenes = mt.read_codraw_h5(path)
    assert [s.key for s in scenes] == ["0", "1", "2", "10", "11"]
    for scene, (images, texts, objects, coords) in zip(scenes, written):
        assert np.array_equal(scene.images, images[..., ::-1]) and scene.instructions == texts
        assert np.array_equal(scene.objects, objects) and np.array_equal(scene.coords, coords)
        assert np.array_equal(scene.background, background[..., ::-1])
