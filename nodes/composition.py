"""Iterative composition nodes (issue 10; CDD-ICM, arXiv 2304.02192, and turn-by-turn editing).

  MC_IterativeEdit   the turn loop for the models users already run (any ComfyUI MODEL/CLIP/VAE):
                     each instruction line edits the previous turn's image, with an optional mask per
                     turn (a blended latent edit) or without one (an image-to-image pass); outside
                     each turn's mask the previous image is pasted back exactly, so no pixel outside
                     all masks ever drifts from the source.

  MC_CompositionModelLoader  the shapes-world CDD-ICM composer (MC_COMPOSER)
  MC_ComposeTurn             one turn: reference IMAGE + instruction -> target IMAGE (deterministic DDIM,
                             classifier-free guidance and ICM guidance, paper eqs. 14-15)
  MC_IterativeComposition    every turn of an instruction list, each turn's output the next reference

The loop and the paste-back are plain torch in `algorithms/composition.py`, CDD-ICM in
`algorithms/cdd_icm.py`; encoding, sampling and decoding are in `glue/composition.py`.
"""
from __future__ import annotations

import torch

from comfy_api.v0_0_2 import io

from .algorithms import composition as algo
from . import glue
from .glue import NodeInputError

CATEGORY = "More Control/composition"


def instruction_lines(node: str, instructions: str, max_turns: int) -> list[str]:
    try:
        return algo.parse_instructions(instructions, max_turns)
    except ValueError as e:
        raise NodeInputError(node, "instructions", str(e)) from None


def check_one_image(node: str, name: str, image: torch.Tensor, advice: str = ""):
    """The turn loop feeds each turn's output to the next: it takes one image, not a batch."""
    if image.ndim != 4 or image.shape[0] != 1:
        raise NodeInputError(node, name, f"expects one image [1, H, W, C], got shape {tuple(image.shape)}{advice}")


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
        lines = instruction_lines(node, instructions, max_turns)
        check_one_image(node, "image", image, ": edit one image at a time")
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


COMPOSER = io.Custom("MC_COMPOSER")
COMPOSER_WEIGHTS = ["trained", "untrained"]


class CompositionModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MC_CompositionModelLoader",
            display_name="Composition Model (CDD-ICM, shapes world)",
            category=CATEGORY,
            description="Loads the shapes-world CDD-ICM composer: it adds objects to a 128x128 shapes-world canvas from "
                        "instructions such as 'add a red square to the left of the blue circle'. Without the shipped "
                        "composer weights it is the UNTRAINED composer (the log and the info output say so).",
            inputs=[
                io.Combo.Input("weights", options=COMPOSER_WEIGHTS, default=COMPOSER_WEIGHTS[0],
                               tooltip="'trained' loads models/shapes_world/composer.safetensors when it exists (else the "
                                       "untrained composer, loudly); 'untrained' always builds the untrained one."),
            ],
            outputs=[COMPOSER.Output(display_name="composer", tooltip="For Compose Turn / Iterative Composition."),
                     io.String.Output(display_name="info", tooltip="Which weights were loaded.")],
        )

    @classmethod
    def execute(cls, weights) -> io.NodeOutput:
        bundle = glue.load_composer(weights)
        return io.NodeOutput(bundle, ("trained composer: " if bundle.trained else "") + bundle.source)


def _compose_inputs() -> list:
    return [
        io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                     tooltip="Seed of the initial noise (turn k of a list uses seed + k - 1)."),
        io.Int.Input("steps", default=25, min=1, max=1000,
                     tooltip="Deterministic DDIM steps, uniformly spaced (the paper: 250)."),
        io.Float.Input("cfg", default=3.0, min=0.0, max=30.0, step=0.1,
                       tooltip="Classifier-free guidance scale phi (eq. 15; the paper: 3). 1 = one pass per step."),
        io.Float.Input("icm_scale", default=2.0, min=0.0, max=50.0, step=0.1,
                       tooltip="ICM guidance scale psi (eq. 14; the paper: 2): pushes x_t toward the fused condition "
                               "through the noisy-image encoder. 0 turns it off (and saves its backward pass)."),
    ]


class ComposeTurn(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MC_ComposeTurn",
            display_name="Compose Turn (CDD-ICM)",
            category=CATEGORY,
            description="One turn of multi-turn composition (CDD-ICM): changes the reference image as the instruction says.",
            inputs=[
                COMPOSER.Input("composer", tooltip="From Composition Model."),
                io.Image.Input("reference", tooltip="The image this turn starts from (the canvas, or the previous turn)."),
                io.String.Input("instruction", default="add a red square in the middle",
                                tooltip="What to change, e.g. 'add a blue circle to the left of the red square'."),
                *_compose_inputs(),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The target image of this turn.")],
        )

    @classmethod
    def execute(cls, composer, reference, instruction, seed, steps, cfg, icm_scale) -> io.NodeOutput:
        if not str(instruction).strip():
            raise NodeInputError("MC_ComposeTurn", "instruction", "is blank: say what to change")
        return io.NodeOutput(glue.compose_turn(composer, reference, instruction.strip(), seed, steps, cfg, icm_scale))


class IterativeComposition(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MC_IterativeComposition",
            display_name="Iterative Composition (CDD-ICM)",
            category=CATEGORY,
            description="Builds an image turn by turn from instructions, one per line: each turn's output is the next "
                        "turn's reference (multi-turn compositional generation, CDD-ICM).",
            inputs=[
                COMPOSER.Input("composer", tooltip="From Composition Model."),
                io.Image.Input("canvas", tooltip="The starting canvas (one image)."),
                io.String.Input("instructions", multiline=True,
                                default="add a red square in the middle\nadd a blue circle to the left of the red square",
                                tooltip="One instruction per line, one line per turn; no blank lines between them."),
                *_compose_inputs(),
                io.Int.Input("max_turns", default=algo.DEFAULT_MAX_TURNS, min=1, max=256,
                             tooltip="Refuse longer instruction lists."),
            ],
            outputs=[io.Image.Output(display_name="turns", tooltip="The image after every turn, first turn first.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, composer, canvas, instructions, seed, steps, cfg, icm_scale, max_turns) -> io.NodeOutput:
        node = "MC_IterativeComposition"
        lines = instruction_lines(node, instructions, max_turns)
        check_one_image(node, "canvas", canvas)

        def turn(k, reference, mask):
            return glue.compose_turn(composer, reference, lines[k], seed + k, steps, cfg, icm_scale).to(reference.device)

        unique_id = getattr(getattr(cls, "hidden", None), "unique_id", None)
        images = algo.iterate_edits(canvas[..., :3], len(lines), turn, on_turn=glue.turn_reporter(unique_id, len(lines)))
        return io.NodeOutput(torch.cat(images))


NODES = [IterativeEdit, CompositionModelLoader, ComposeTurn, IterativeComposition]
