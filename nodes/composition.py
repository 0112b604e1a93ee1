"""Iterative composition nodes (issue 10; CDD-ICM, arXiv 2304.02192, and turn-by-turn editing).

  MC_IterativeEdit   the turn loop for the models users already run (any ComfyUI MODEL/CLIP/VAE):
                     each instruction line edits the previous turn's image, with an optional mask per
                     turn (a blended latent edit) or without one (an image-to-image pass); outside
                     each turn's mask the previous image is pasted back exactly, so no pixel outside
                     all masks ever drifts from the source.

The loop and the paste-back are plain torch in `algorithms/composition.py`; encoding, sampling and
decoding one turn are in `glue/composition.py`.
"""
from __future__ import annotations

import torch

from comfy_api.v0_0_2 import io

from .algorithms import composition as algo
from . import glue
from .glue import NodeInputError

CATEGORY = "More Control/composition"


class IterativeEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MC_IterativeEdit",
            display_name="Iterative Edit (turn by turn, no drift)",
            category=CATEGORY,
            description="Edits an image turn by turn, one instruction per line, each turn starting from the previous "
                        "turn's image. With masks (one per line, or one for all turns) each turn is a blended latent edit "
                        "and everything outside that turn's mask is pasted back from the previous turn exactly: after any "
                        "number of turns, every pixel outside all masks equals the source bit for bit. Without masks each "
                        "turn is an image-to-image pass (which drifts, as any chain of such passes).",
            inputs=[
                io.Model.Input("model", tooltip="Your diffusion model (SD1.x, SDXL, SD3, Flux... anything KSampler runs)."),
                io.Clip.Input("clip", tooltip="The text encoder for the instructions."),
                io.Vae.Input("vae", tooltip="The VAE: each turn encodes the previous turn's image and decodes the edit."),
                io.Image.Input("image", tooltip="The source image (one image): the reference of the first turn."),
                io.String.Input("instructions", multiline=True, default="a red ball\na blue cube",
                                tooltip="One instruction (a prompt for the edited region) per line, one line per turn. "
                                        "No blank lines between instructions."),
                io.String.Input("negative", multiline=True, default="",
                                tooltip="The negative prompt of every turn."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Seed of the first turn; turn k uses seed + k - 1."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Sampling steps per turn."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale."),
                io.Combo.Input("sampler_name", options=glue.sampler_names(), default="euler",
                               tooltip="The sampler of every turn (with masks it runs one step at a time inside the "
                                       "blended sampler; multistep samplers then act as first-order)."),
                io.Combo.Input("scheduler", options=glue.scheduler_names(), default="normal", tooltip="Noise schedule."),
                io.Float.Input("denoise", default=0.8, min=0.0, max=1.0, step=0.01,
                               tooltip="How much of each turn's reference is re-generated: 1.0 starts from pure noise "
                                       "(inside the mask with masks), lower values keep more of the previous turn."),
                io.Float.Input("threshold", default=0.5, min=0.001, max=1.0, step=0.01,
                               tooltip="Soft masks are made binary: values >= threshold are edited."),
                io.Int.Input("max_turns", default=algo.DEFAULT_MAX_TURNS, min=1, max=256,
                             tooltip="Refuse instruction lists longer than this (a guard against pasting a long text "
                                     "by mistake: every line is a full sampling run)."),
                io.Mask.Input("masks", optional=True,
                              tooltip="Where each turn may change the image: a MASK batch with one mask per instruction "
                                      "line, or one mask for all turns, any size. Without masks each turn edits the whole "
                                      "image (image-to-image)."),
            ],
            outputs=[
                io.Image.Output(display_name="turns", tooltip="The image after every turn (a batch, first turn first)."),
                io.Image.Output(display_name="final", tooltip="The image after the last turn."),
                io.Mask.Output(display_name="edited_region",
                               tooltip="The union of all turns' masks (all ones without masks): outside it the final "
                                       "image is the source."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, image, instructions, negative, seed, steps, cfg, sampler_name, scheduler, denoise,
                threshold, max_turns, masks=None) -> io.NodeOutput:
        node = "MC_IterativeEdit"
        try:
            lines = algo.parse_instructions(instructions, max_turns)
        except ValueError as e:
            raise NodeInputError(node, "instructions", str(e)) from None
        if image.ndim != 4 or image.shape[0] != 1:
            raise NodeInputError(node, "image", f"expects one image [1, H, W, C], got shape {tuple(image.shape)}: "
                                 "edit one image at a time")
        if not hasattr(vae, "first_stage_model") or not hasattr(vae, "spacial_compression_encode"):
            raise NodeInputError(node, "vae", "needs an image VAE")
        height, width = image.shape[1:3]
        ratio = glue.vae_ratio(vae)
        if height < ratio or width < ratio:
            raise NodeInputError(node, "image", f"is {width}x{height} pixels, smaller than the VAE's {ratio}-pixel cell")
        turn_masks = None
        if masks is not None:
            try:
                turn_masks = algo.turn_masks(masks, len(lines), height, width, threshold)
            except ValueError as e:
                raise NodeInputError(node, "masks", str(e)) from None

        positives = [glue.encode_text(clip, line) for line in lines]
        negative_cond = glue.encode_text(clip, negative)
        editor = glue.TurnEditor(model, vae, positives, negative_cond, seed, steps, cfg, sampler_name, scheduler, denoise)
        unique_id = getattr(getattr(cls, "hidden", None), "unique_id", None)
        images = algo.iterate_edits(image, len(lines), editor, turn_masks, on_turn=glue.turn_reporter(unique_id, len(lines)))
        if turn_masks is None:
            region = torch.ones(1, height, width)
        else:
            region = algo.union_masks(turn_masks)[-1:].float()
        return io.NodeOutput(torch.cat(images), images[-1], region)


NODES = [IterativeEdit]
