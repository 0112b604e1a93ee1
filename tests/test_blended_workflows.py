"""The blended-editing workflow graphs (workflows/src/blended_*.api.json) run in ComfyUI's own executor
(validation, inference mode, caching) on the shapes-world models, with fewer steps to stay fast."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from PIL import Image

import comfy_harness
from conftest import run_coroutine

SRC = comfy_harness.PACK_DIR / "workflows" / "src"


def load(name: str, **overrides) -> dict:
    graph = json.loads((SRC / name).read_text())
    for node in graph.values():
        for key, value in overrides.get(node["class_type"], {}).items():
            node["inputs"][key] = value
    return graph


def saved_image(outputs: dict, node_id: str) -> np.ndarray:
    import folder_paths

    entry = outputs[node_id]["images"][0]
    path = pathlib.Path(folder_paths.get_output_directory()) / entry["subfolder"] / entry["filename"]
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def source_and_mask(graph: dict):
    """The graph's source image and mask, rebuilt from its own core-node parameters."""
    background = graph["2"]["inputs"]["color"]
    square = graph["3"]["inputs"]
    src = np.zeros((128, 128, 3), np.int16)
    src[:] = [(background >> 16) & 255, (background >> 8) & 255, background & 255]
    x, y = graph["4"]["inputs"]["x"], graph["4"]["inputs"]["y"]
    c = square["color"]
    src[y:y + square["height"], x:x + square["width"]] = [(c >> 16) & 255, (c >> 8) & 255, c & 255]
    mask = np.zeros((128, 128), bool)
    box = graph["6"]["inputs"]
    mx, my = graph["7"]["inputs"]["x"], graph["7"]["inputs"]["y"]
    mask[my:my + box["height"], mx:mx + box["width"]] = True
    if "8" in graph and graph["8"]["class_type"] == "InvertMask":
        mask = ~mask
    return src, mask


FAST = {"MC_BlendedLatentSampler": {"steps": 3}, "MC_DecoderFineTune": {"steps": 3}, "MC_LatentOptimization": {"steps": 3},
        "RepeatLatentBatch": {"amount": 2}}


def test_thin_mask_edit_keeps_every_background_pixel(run_prompt):
    graph = load("blended_thin_mask.api.json", **FAST)
    outputs = run_prompt(graph)
    edited = saved_image(outputs, "17")
    src, mask = source_and_mask(graph)
    assert edited.shape == (128, 128, 3)
    assert np.array_equal(edited[~mask], src[~mask])  # Poisson blend: the source outside the mask, bit for bit
    assert np.abs(edited[mask] - src[mask]).mean() > 1  # and something changed inside


@pytest.mark.parametrize("name,save_node,edit_node", [("blended_full_edit.api.json", "21", "17"),
                                                      ("blended_background.api.json", "16", "14")])
def test_edit_workflows_run(run_prompt, name, save_node, edit_node):
    """The saved result's background (outside the mask) is no further from the source than a plain VAE
    decode of the same edited latent (decoded by two extra nodes added to the graph): what the decoder
    fine-tune and the latent optimisation are for. And the masked region holds an edit, not the source."""
    graph = load(name, **FAST)
    graph["90"] = {"class_type": "VAEDecode", "inputs": {"samples": [edit_node, 0], "vae": ["1", 2]}}
    graph["91"] = {"class_type": "SaveImage", "inputs": {"images": ["90", 0], "filename_prefix": "mc_test_plain_decode"}}
    outputs = run_prompt(graph)
    result, plain = saved_image(outputs, save_node), saved_image(outputs, "91")
    src, mask = source_and_mask(graph)
    assert result.shape == plain.shape == (128, 128, 3)

    def background_mse(image):
        return float(((image[~mask] - src[~mask]) ** 2).mean())

    inside = np.abs(result[mask] - src[mask]).mean()
    print(f"\n{name}: background MSE plain decode {background_mse(plain):.1f} -> saved result {background_mse(result):.1f}; "
          f"mean |result - source| inside the mask {inside:.1f} (of 255)")
    assert background_mse(result) < background_mse(plain)
    assert inside > 1  # with 3 sampling steps the edit is faint, but it is there


def test_bad_shrink_schedule_is_rejected_before_running(comfy_nodes):
    """ComfyUI's own validation reports the node's message (and skips the outputs that depend on it)."""
    import uuid

    import execution

    graph = load("blended_thin_mask.api.json", MC_ProgressiveMaskShrink={"kernels": "7,6,3,1"})
    valid = run_coroutine(execution.validate_prompt(str(uuid.uuid4()), graph, None))
    errors = json.dumps(valid[3])
    assert "MC_ProgressiveMaskShrink: kernels/parts: kernels must be odd" in errors
    assert "17" not in valid[2]  # the edit's SaveImage does not run
