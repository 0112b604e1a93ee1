"""MC_IterativeEdit on the tiny models: turn-by-turn edits of a user's model whose untouched pixels are the
source's, bit for bit, through ComfyUI's own executor; clear errors for bad instruction lists and masks.

Run: python -m pytest tests/test_iterative_edit.py -q
"""
from __future__ import annotations

import pytest
import torch

import composition_fixtures as fixtures
import tiny_models


@pytest.fixture(scope="module")
def algo(pack_module):
    return pack_module("nodes.algorithms.composition")


@pytest.fixture(scope="module")
def composition(pack_module):
    return pack_module("nodes.composition")


@pytest.fixture(scope="module")
def registered(comfy_nodes):
    fixtures.register(comfy_nodes)
    return fixtures.tiny_bundle()


def source_image(h=64, w=64, seed=1):
    """A quantised picture (what Load Image gives): a two-tone background and a square."""
    g = torch.Generator().manual_seed(seed)
    img = torch.empty(1, h, w, 3)
    img[:] = torch.tensor([0.8, 0.75, 0.6])
    img[:, h // 2:] = torch.tensor([0.3, 0.5, 0.7])
    img[:, 8:24, 36:52] = torch.tensor([0.9, 0.1, 0.1])
    img += torch.randint(0, 3, img.shape, generator=g) / 255.0
    return (img * 255).round() / 255


def box(h, w, top, left, bottom, right):
    m = torch.zeros(h, w)
    m[top:bottom, left:right] = 1.0
    return m


def per_turn_masks(h=64, w=64):
    return torch.stack([box(h, w, 4, 4, 20, 28), box(h, w, 30, 20, 50, 44), box(h, w, 10, 16, 36, 40)])


def edit_graph(instructions: str, with_masks: bool, steps: int = 2, denoise: float = 1.0) -> dict:
    graph = {
        "1": {"class_type": "MCTest_TinyModels", "inputs": {}},
        "2": {"class_type": "MCTest_GivenImage", "inputs": {"name": "source"}},
        "4": {"class_type": "MC_IterativeEdit", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "image": ["2", 0], "instructions": instructions,
            "negative": "", "seed": 7, "steps": steps, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": denoise, "threshold": 0.5, "max_turns": 16}},
        "5": {"class_type": "MCTest_Capture", "inputs": {"name": "turns", "image": ["4", 0]}},
        "6": {"class_type": "MCTest_Capture", "inputs": {"name": "final", "image": ["4", 1]}},
        "7": {"class_type": "MCTest_Capture", "inputs": {"name": "region", "mask": ["4", 2]}},
    }
    if with_masks:
        graph["3"] = {"class_type": "MCTest_GivenMask", "inputs": {"name": "masks"}}
        graph["4"]["inputs"]["masks"] = ["3", 0]
    return graph


def fingerprint(model, clip, vae) -> str:
    return tiny_models.fingerprint(model.model, clip.cond_stage_model, vae.first_stage_model, patcher=model)


# ---------------------------------------------------------------------------------------------
# Through ComfyUI's executor

def test_untouched_pixels_are_the_source_bit_for_bit(registered, run_prompt):
    """Three turns with one mask each: after every turn, outside that turn's mask the image is the previous
    turn's exactly, outside all masks so far it is the source exactly, and inside each mask it changed."""
    source, masks = source_image(), per_turn_masks()
    fixtures.TENSORS.update(source=source, masks=masks)
    before = fingerprint(registered["model"], registered["clip"], registered["vae"])
    run_prompt(edit_graph("a red ball\na green tree\na blue cube", with_masks=True))
    turns, final, region = fixtures.CAPTURED["turns"], fixtures.CAPTURED["final"], fixtures.CAPTURED["region"]
    assert turns.shape == (3, 64, 64, 3) and torch.equal(final, turns[-1:])
    union = masks.bool().any(0)
    assert torch.equal(region[0].bool(), union)
    previous = source
    for k in range(3):
        inside = masks[k].bool()
        assert torch.equal(turns[k][~inside], previous[0][~inside]), f"turn {k + 1} changed pixels outside its mask"
        assert (turns[k][inside] - previous[0][inside]).abs().mean() > 0.02, f"turn {k + 1} did not edit its mask"
        previous = turns[k:k + 1]
    assert torch.equal(final[0][~union], source[0][~union])
    assert fingerprint(registered["model"], registered["clip"], registered["vae"]) == before  # the user's models


def test_one_mask_for_all_turns_and_odd_image_sizes(registered, run_prompt):
    """One mask serves every turn; a 70x60 image (not a multiple of the VAE's 8) is edited in VAE Encode's
    centred crop, and the border the crop leaves out is the source's."""
    source = source_image(70, 60)
    mask = box(70, 60, 10, 10, 40, 50)
    fixtures.TENSORS.update(source=source, masks=mask[None])
    run_prompt(edit_graph("a cat\na dog", with_masks=True))
    turns = fixtures.CAPTURED["turns"]
    assert turns.shape == (2, 70, 60, 3)
    outside = ~mask.bool()
    for k in range(2):
        assert torch.equal(turns[k][outside], source[0][outside])
    assert (turns[1][mask.bool()] - source[0][mask.bool()]).abs().mean() > 0.02


def test_without_masks_each_turn_is_an_image_to_image_pass(registered, run_prompt):
    source = source_image()
    fixtures.TENSORS.update(source=source)
    run_prompt(edit_graph("a red ball\na blue cube", with_masks=False, denoise=0.6))
    turns, region = fixtures.CAPTURED["turns"], fixtures.CAPTURED["region"]
    assert turns.shape == (2, 64, 64, 3) and bool((region == 1).all())
    assert (turns[0] - source[0]).abs().mean() > 0.02 and (turns[1] - turns[0]).abs().mean() > 0.02


def test_bad_instructions_are_refused_by_name_in_the_executor(registered, run_prompt):
    fixtures.TENSORS.update(source=source_image())
    with pytest.raises(RuntimeError, match="MC_IterativeEdit: input 'instructions'.*blank"):
        run_prompt(edit_graph("   \n\n", with_masks=False))


# ---------------------------------------------------------------------------------------------
# Inputs, called directly

def execute(composition, bundle, instructions, masks=None, image=None, max_turns=16):
    return composition.IterativeEdit.execute(bundle["model"], bundle["clip"], bundle["vae"],
                                             source_image() if image is None else image, instructions, "", 0, 1, 3.0,
                                             "euler", "normal", 1.0, 0.5, max_turns, masks).result


@pytest.mark.parametrize("text,message", [
    ("", "is blank"),
    ("\n  \n", "is blank"),
    ("a cat\n\na dog", "line 2 is blank between two instructions"),
    ("\n".join(f"turn {i}" for i in range(5)), "5 instructions, more than the limit of 4"),
])
def test_instruction_list_errors_name_the_input(composition, glue, registered, text, message):
    with pytest.raises(glue.NodeInputError, match=f"MC_IterativeEdit: input 'instructions': .*{message}"):
        execute(composition, registered, text, max_turns=4)


def test_trailing_blank_lines_are_not_turns(algo):
    assert algo.parse_instructions("\n a cat \r\na dog\n\n  \n", 4) == ["a cat", "a dog"]


def test_mask_count_and_image_batch_errors(composition, glue, registered):
    with pytest.raises(glue.NodeInputError, match="MC_IterativeEdit: input 'masks': has 2 masks for 3 instructions"):
        execute(composition, registered, "a\nb\nc", masks=torch.zeros(2, 64, 64))
    with pytest.raises(glue.NodeInputError, match="MC_IterativeEdit: input 'image'"):
        execute(composition, registered, "a", image=torch.zeros(2, 64, 64, 3))


# ---------------------------------------------------------------------------------------------
# The algorithm against hand computations

def test_latent_mask_covers_every_edited_pixel(algo):
    mask = torch.zeros(1, 16, 16, dtype=torch.bool)
    mask[0, 7, 9] = True  # one pixel in latent cell (0, 1)
    mask[0, 8:16, 0:2] = True
    cells = algo.latent_mask(mask, 8)
    assert cells.tolist() == [[[0.0, 1.0], [1.0, 0.0]]]


def test_loop_pastes_the_previous_turn_outside_each_mask(algo):
    """A fake editor that adds k+1 everywhere: with masks, each pixel holds the sum over the turns whose
    mask covered it; without, every pixel holds the sum over all turns."""
    source = torch.zeros(1, 4, 4, 3)
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[0, :2] = True
    masks[1, :, :2] = True
    masks[2, 3, 3] = True
    edit = lambda k, ref, m: ref + (k + 1)  # noqa: E731
    out = algo.iterate_edits(source, 3, edit, masks)
    expected = (masks.float() * torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1)).cumsum(0)
    for k in range(3):
        assert torch.equal(out[k][0, ..., 0], expected[k])
    assert torch.equal(algo.iterate_edits(source, 3, edit)[-1], torch.full((1, 4, 4, 3), 6.0))


def test_drift_curves_by_hand(algo):
    source = torch.zeros(1, 2, 2, 3)
    masks = torch.tensor([[[1, 0], [0, 0]], [[0, 1], [0, 0]]], dtype=torch.bool)
    turn1 = torch.zeros(1, 2, 2, 3)
    turn1[0, 0, 0] = 0.5
    turn1[0, 1, 1] = 0.1  # drift outside all masks after turn 1
    turn2 = turn1.clone()
    turn2[0, 0, 0] = 0.3  # the turn-1 edit drifted by 0.2 in turn 2
    turn2[0, 0, 1] = 0.9
    curves = algo.drift_curves([turn1, turn2], source, masks)
    assert curves["untouched"][0] == pytest.approx(0.1 / 3 * 255)  # 3 untouched pixels after turn 1
    assert curves["untouched"][1] == pytest.approx(0.1 / 2 * 255)
    assert curves["kept_edits"] == [0.0, pytest.approx(0.2 * 255)]
    assert curves["edited_psnr"][1] == pytest.approx(10 * torch.log10(torch.tensor(1 / 0.04)).item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# The shipped workflow (workflows/src/iterative_edit.api.json) on the shapes-world models

def test_workflow_keeps_every_pixel_outside_the_masks(run_prompt):
    import json
    import pathlib

    import numpy as np
    from PIL import Image

    import comfy_harness
    import folder_paths

    graph = json.loads((comfy_harness.PACK_DIR / "workflows" / "src" / "iterative_edit.api.json").read_text())
    graph["20"]["inputs"]["steps"] = 3
    outputs = run_prompt(graph)
    images = outputs["21"]["images"]
    assert len(images) == 3
    saved = [np.asarray(Image.open(pathlib.Path(folder_paths.get_output_directory()) / e["subfolder"] / e["filename"])
                        .convert("RGB")).astype(np.int16) for e in images]
    color = lambda c: [(c >> 16) & 255, (c >> 8) & 255, c & 255]  # noqa: E731
    source = np.zeros((128, 128, 3), np.int16)
    source[:] = color(graph["2"]["inputs"]["color"])
    x, y = graph["4"]["inputs"]["x"], graph["4"]["inputs"]["y"]
    side = graph["3"]["inputs"]["width"]
    source[y:y + side, x:x + side] = color(graph["3"]["inputs"]["color"])
    union = np.zeros((128, 128), bool)
    box = graph["6"]["inputs"]["width"]
    for k in range(3):
        mx, my = graph[str(10 + k)]["inputs"]["x"], graph[str(10 + k)]["inputs"]["y"]
        union[my:my + box, mx:mx + box] = True
        assert np.array_equal(saved[k][~union], source[~union]), f"turn {k + 1}"
    assert np.abs(saved[-1][union] - source[union]).mean() > 1
