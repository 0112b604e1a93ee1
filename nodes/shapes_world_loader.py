"""MC_ShapesWorldLoader: the shapes-world demo models (MODEL, CLIP, VAE, MC_CLIP) that ship with
the pack. Build/load code is nodes/shapes_world/models.py; this node only picks and returns."""
from __future__ import annotations

import logging

from comfy_api.v0_0_2 import io

from .shapes_world import models

WEIGHT_OPTIONS = ["trained", "random (untrained)"]
_CACHE: dict = {}


def load(weights: str, seed: int) -> dict:
    """The bundle, cached per (weights, seed, files on disk) so several loaders share one copy."""
    files = [models.WEIGHTS_DIR / f for f in (models.VAE_FILE, models.CLIP_FILE, models.UNET_FILE)]
    key = (weights, seed, tuple(f.stat().st_mtime if f.exists() else None for f in files))
    if key not in _CACHE:
        _CACHE.clear()
        mode = "trained" if weights == WEIGHT_OPTIONS[0] else "random"
        _CACHE[key] = models.load_bundle(mode, seed=seed)
    return _CACHE[key]


def describe(bundle: dict) -> str:
    parts = [f"{name}: {'trained' if ok else 'UNTRAINED random weights'}" for name, ok in bundle["trained"].items()]
    return f"shapes world ({', '.join(parts)}; latent scale {bundle['scale_factor']:.4f})"


class ShapesWorldLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MC_ShapesWorldLoader",
            display_name="Shapes World Models",
            category="More Control/loaders",
            description="The pack's small demo models trained on the procedural shapes world (128x128 images of "
                        "coloured circles, squares and triangles): a text-to-image UNet, its text encoder, an "
                        "SD-layout VAE (128x128 -> 16x16x4 latents) and the CLIP-style dual encoder. Runs on a CPU "
                        "with nothing to download. Use EmptyLatentImage 128x128 and prompts like "
                        "'a red circle to the left of a small blue square'.",
            inputs=[
                io.Combo.Input("weights", options=WEIGHT_OPTIONS, default=WEIGHT_OPTIONS[0],
                               tooltip="'trained' loads the weights shipped in models/shapes_world (any model whose "
                                       "file is missing falls back to random weights, and the log says so). "
                                       "'random (untrained)' gives seeded random weights of the same architectures: "
                                       "the code runs, the pictures mean nothing."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seed of the random weights (only used for models without trained weights)."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="SD1-style UNet (eps, SD1 schedule) for KSampler; 128x128 images."),
                io.Clip.Output(display_name="CLIP", tooltip="The text encoder for CLIPTextEncode (SD1 tokenizer, 128-wide)."),
                io.Vae.Output(display_name="VAE", tooltip="SD-layout VAE: 8x down, 4 latent channels."),
                io.Custom("MC_CLIP").Output(display_name="MC_CLIP",
                                            tooltip="The CLIP-style dual encoder (image and text features) for ranking "
                                                    "and semantic guidance nodes."),
                io.String.Output(display_name="info", tooltip="Which models are trained and which are random."),
            ],
        )

    @classmethod
    def execute(cls, weights, seed) -> io.NodeOutput:
        bundle = load(weights, seed)
        info = describe(bundle)
        logging.info("[More Control] %s", info)
        return io.NodeOutput(bundle["model"], bundle["clip"], bundle["vae"], bundle["mc_clip"], info)


NODES = [ShapesWorldLoader]
