"""Scribble-guided local editing (Blended Latent Diffusion, Sec. 5.3 use case) with the shipped shapes-world
models: a rough coloured scribble on the image, a mask covering it, a blended edit at partial denoise.

The geometry, prompt and sampler settings are read from the shipped workflow's API source
(workflows/src/blended_scribble.api.json), so the test measures what the workflow does:
  * the edit stays inside the mask: the latent outside the mask is the source latent bit for bit,
    and no new object pixel the detector sees lies beyond the decoder's reach of the mask (8 px);
  * the edit comes out in the scribble's colour, with the workflow's kind of prompt ("a green
    circle" on a green scribble): the dominant palette colour of the edited region is the
    scribble's (nearest palette colour of the detector's foreground pixels), for several scribble
    colours and seeds.
With a prompt that names no colour ("a circle", or the empty prompt) the v1 demo UNet kept the
scribble's colour in at least 3 of 4 runs; the v2 UNet's part 2, whose jointly trained text tower
had never seen a shape without its colour, in 1 of 6 (it repainted green as red, red as orange).
Part 3 trained on 10% colourless captions and keeps it in 4 of 6 with "a circle" (blue turns
purple), still 1 of 6 with the empty prompt: a weakness of the demo model, not of the blend.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

import comfy_harness

SOURCE = comfy_harness.PACK_DIR / "workflows" / "src" / "blended_scribble.api.json"
COLOURS = ("green", "blue", "red")
SEEDS = (0, 1)
# The colour must be the scribble's in at least this share of the (colour, seed) runs (the v2 demo
# UNet: 6 of 6); the measured share is printed.
MIN_COLOUR_SHARE = 0.75
PROMPT = "a {colour} circle"


def api():
    return json.loads(SOURCE.read_text())


def node(graph: dict, class_type: str, title: str | None = None) -> dict:
    found = [n for n in graph.values() if n["class_type"] == class_type and (title is None or n["_meta"]["title"] == title)]
    assert len(found) == 1, f"{class_type} {title!r}: {len(found)} nodes in {SOURCE.name}"
    return found[0]


def scribble_and_mask(graph: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The workflow's stand-ins for Load Image + mask editor, rebuilt in numpy: (background uint8
    HxWx3, scribble stroke bool HxW, edit mask bool HxW)."""
    background = node(graph, "EmptyImage", "Background (stands in for Load Image)")["inputs"]
    colour = background["color"]
    image = np.empty((background["height"], background["width"], 3), np.uint8)
    image[:] = ((colour >> 16) & 255, (colour >> 8) & 255, colour & 255)
    stroke = np.zeros(image.shape[:2], bool)
    for n in graph.values():
        if n["class_type"] == "MaskComposite" and n["_meta"]["title"].startswith("Stroke"):
            piece = graph[n["inputs"]["source"][0]]["inputs"]
            x, y = n["inputs"]["x"], n["inputs"]["y"]
            stroke[y:y + piece["height"], x:x + piece["width"]] = True
    assert stroke.any()
    cross = ndimage.generate_binary_structure(2, 1)  # GrowMask with tapered corners grows by a 4-connected cross
    grow_stroke = node(graph, "GrowMask", "Scribble stroke")["inputs"]["expand"]
    stroke = ndimage.binary_dilation(stroke, cross, iterations=grow_stroke)
    grow_mask = node(graph, "GrowMask", "Edit mask (stands in for the mask editor)")["inputs"]["expand"]
    mask = ndimage.binary_dilation(stroke, cross, iterations=grow_mask)
    return image, stroke, mask


@pytest.fixture(scope="module")
def bundle(pack_module):
    models = pack_module("nodes.shapes_world.models")
    status = models.weights_status()
    assert all(status.values()), f"shapes-world weights are part of the pack: {status}"
    return models.load_bundle("trained")


def test_the_stand_ins_match_the_workflow():
    graph = api()
    _, stroke, mask = scribble_and_mask(graph)
    assert (stroke <= mask).all() and mask.sum() > 1.5 * stroke.sum(), "the mask covers the scribble with a margin"
    sampler = node(graph, "MC_BlendedLatentSampler")["inputs"]
    assert 0.3 <= sampler["denoise"] < 1.0, "a scribble is kept as the start of the edit only at partial denoise"


def test_scribble_edit_stays_in_the_mask_and_follows_the_scribble_colour(pack_module, bundle):
    blended = pack_module("nodes.blended")
    world = pack_module("nodes.shapes_world.world")
    detector = pack_module("nodes.shapes_world.detector")
    graph = api()
    settings = node(graph, "MC_BlendedLatentSampler")["inputs"]
    background, stroke, mask = scribble_and_mask(graph)
    images = []
    for colour in COLOURS:
        scribbled = background.copy()
        scribbled[stroke] = world.COLOURS[colour]
        images.append(scribbled)
    runs = [(c, s) for c in range(len(COLOURS)) for s in SEEDS]
    pixels = torch.from_numpy(np.stack([images[c] for c, _ in runs])).float() / 255.0
    clip, vae = bundle["clip"], bundle["vae"]

    def encode(text):
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))

    mask_t = torch.from_numpy(mask).float()[None]
    with torch.inference_mode():
        # one conditioning per run, as ComfyUI batches a list of prompts: "a <scribble colour> circle"
        per_run = [encode(PROMPT.format(colour=COLOURS[c])) for c, _ in runs]
        prompts = [[torch.cat([p[0][0] for p in per_run]), dict(per_run[0][0][1])]]
        source = vae.encode(pixels)
        # one batch: ComfyUI draws each sample its own noise, so batch positions play the seeds
        (out,) = blended.BlendedLatentSampler.execute(
            model=bundle["model"], positive=prompts, negative=encode(""),
            latent_image={"samples": source, "batch_index": [s for _, s in runs]}, seed=settings["seed"],
            steps=settings["steps"], cfg=settings["cfg"], sampler_name=settings["sampler_name"],
            scheduler=settings["scheduler"], denoise=settings["denoise"], fresh_noise=True, threshold=0.5,
            mask=mask_t).result
        edited = (vae.decode(out["samples"]).clamp(0, 1).numpy() * 255).round().astype(np.uint8)

    latent_mask = torch.nn.functional.interpolate(mask_t[None], size=source.shape[-2:], mode="bilinear")[0, 0] >= 0.5
    assert torch.equal(out["samples"][:, :, ~latent_mask], source[:, :, ~latent_mask]), "latent outside the mask changed"

    # The latent outside the mask is the source's (asserted above); the decoder still reads edited latent
    # cells for pixels up to one cell (8 px) beyond the mask, where the workflow's MC_PixelBlend pastes the
    # source back. Object pixels beyond that reach would be the blend's fault.
    beyond_decoder = ~ndimage.binary_dilation(mask, iterations=8)
    follows, outside_pixels, report = [], 0, []
    for (c, seed), image in zip(runs, edited):
        labels = detector.foreground_labels(image)
        outside_pixels += int((labels[beyond_decoder] >= 0).sum())
        inside = labels[mask & (labels >= 0)]
        counts = np.bincount(inside, minlength=len(detector.PALETTE_NAMES))
        dominant = detector.PALETTE_NAMES[int(counts.argmax())] if inside.size else "none"
        follows.append(dominant == COLOURS[c])
        report.append(f"{COLOURS[c]}/seed {seed}: {dominant} ({inside.size} px)")
    share = float(np.mean(follows))
    print(f"\nscribble edits, prompt {PROMPT!r}, denoise {settings['denoise']}, {settings['steps']} steps, cfg {settings['cfg']}: "
          f"dominant colour in the mask = scribble colour in {sum(follows)}/{len(follows)} runs ({share:.0%}); "
          f"object pixels beyond the mask's 8-px decoder reach: {outside_pixels}\n  " + "; ".join(report))
    assert outside_pixels == 0, "the edit put object pixels outside the mask"
    assert share >= MIN_COLOUR_SHARE
