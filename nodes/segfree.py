"""Segmentation-free guidance nodes (paper 001; the algorithm is nodes/algorithms/segfree.py)."""
from __future__ import annotations

import torch

from comfy_api.v0_0_2 import io, ui

from . import glue
from .algorithms import segfree as segfree_algo

HEAD_MODES = ["mean over heads", "per head"]
CANDIDATE_MODES = ["prompt words", "prompt words + end/padding", "content words"]
MAP_CANDIDATE_MODES = ["content words", "prompt words"]
JOINT_BLOCK_MODES = ["double-stream blocks", "double- and single-stream blocks"]
MODEL_TOOLTIP = ("An SD1.x, SD2.x or SDXL UNet, or an SD3/SD3.5 or Flux-family model (joint attention: the image-to-text "
                 "weights are edited). It is cloned; yours is not changed.")


def segfree_inputs() -> list:
    """The options shared by the MODEL patch and the GUIDER."""
    return [
        io.Float.Input("segfree_scale", default=10.0, min=0.0, max=100.0, step=0.5,
                       tooltip="The paper's a: in the modified pass each patch's most-attended word has its attention "
                               "weight multiplied by -a. 0 ignores that word; the paper's default and preferred value is 10; "
                               "very large values give artifacts."),
        io.Float.Input("segfree_cfg", default=2.0, min=0.0, max=30.0, step=0.1,
                       tooltip="The paper's w̄, the guidance weight after the switch: ε + w̄(ε − ε̄). It is the same as a "
                               "ComfyUI cfg of 1 + segfree_cfg. Keep it below your cfg (the paper: w̄ < w). Flux-dev at cfg 1: the "
                               "sampler's cfg does nothing after the switch either; segfree_cfg is then the only guidance on top "
                               "of the distilled FluxGuidance, and the ε̄ pass still runs (two model calls per step from the switch on)."),
        io.Float.Input("start_percent", default=0.4, min=0.0, max=1.0, step=0.01,
                       tooltip="When plain CFG hands over to segmentation-free guidance (0 = from the first step, 1 = never). "
                               "Switching too early breaks the composition; use a smaller value with a larger cfg."),
        io.Combo.Input("attention_heads", options=HEAD_MODES, default=HEAD_MODES[0],
                       tooltip="Pick each patch's most-attended word from the attention averaged over heads (one word per "
                               "patch, every head edited) or separately in each head."),
        io.Combo.Input("candidates", options=CANDIDATE_MODES, default=CANDIDATE_MODES[0],
                       tooltip="Which tokens may be a patch's most-attended one. The start token never is. End and padding "
                               "tokens only if asked (SD1.x pads with end tokens, which often win without meaning a word). "
                               "'content words' leaves out articles, prepositions, pronouns and the like ('a', 'the', 'of', "
                               "'to', 'left'), which take much attention without naming what a patch shows. "
                               "Needs the CLIP from this node wired into the text encoders; otherwise all tokens but the "
                               "start token are candidates. T5 (SD3, Flux) has no start token: there the end token and "
                               "padding are what is left out."),
        io.Combo.Input("joint_blocks", options=JOINT_BLOCK_MODES, default=JOINT_BLOCK_MODES[0], optional=True,
                       tooltip="Flux only: which blocks are edited. Double-stream blocks (the default) keep text and image "
                               "tokens apart, as the paper's cross-attention does; single-stream blocks mix them (their "
                               "'text' tokens already carry image content) and cost more. SD3 has double-stream blocks only."),
    ]


def settings_from(segfree_scale, segfree_cfg, start_percent, attention_heads, candidates,
                  joint_blocks=JOINT_BLOCK_MODES[0]) -> glue.SegfreeSettings:
    return glue.SegfreeSettings(segfree_scale=segfree_scale, segfree_cfg=segfree_cfg, start_percent=start_percent,
                                per_head=attention_heads == HEAD_MODES[1], include_specials=candidates == CANDIDATE_MODES[1],
                                content_words=candidates == CANDIDATE_MODES[2], single_blocks=joint_blocks == JOINT_BLOCK_MODES[1])


class SegmentationFreeGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MC_SegmentationFreeGuidance",
            display_name="Segmentation-Free Guidance",
            category="More Control/guidance",
            description="Classifier-free guidance where, after start_percent, every image patch takes the prompt minus "
                        "its own most-attended word as its negative (read from the model's cross-attention). Sharpens each "
                        "concept of a multi-concept prompt at the cost of CFG. Works with every KSampler.",
            inputs=[
                io.Model.Input("model", tooltip=MODEL_TOOLTIP),
                io.Clip.Input("clip", optional=True,
                              tooltip="Optional: wire the CLIP output of this node into your text encoders so the guidance "
                                      "knows which tokens are words (see 'candidates')."),
                *segfree_inputs(),
            ],
            outputs=[
                io.Model.Output(tooltip="The model with segmentation-free guidance; plug it into any KSampler."),
                io.Clip.Output(tooltip="A clone of the CLIP whose conditioning tells the guidance which tokens are words."),
            ],
        )

    @classmethod
    def execute(cls, model, segfree_scale, segfree_cfg, start_percent, attention_heads, candidates, clip=None,
                joint_blocks=JOINT_BLOCK_MODES[0]) -> io.NodeOutput:
        settings = settings_from(segfree_scale, segfree_cfg, start_percent, attention_heads, candidates, joint_blocks)
        patched = glue.apply_segfree_guidance(model, settings, "MC_SegmentationFreeGuidance")
        return io.NodeOutput(patched, glue.clip_with_token_maps(clip) if clip is not None else None)


class SegmentationFreeGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MC_SegmentationFreeGuider",
            display_name="Segmentation-Free Guider",
            category="More Control/guidance",
            description="A GUIDER for SamplerCustomAdvanced: plain CFG with your negative until start_percent, then "
                        "segmentation-free guidance.",
            inputs=[
                io.Model.Input("model", tooltip=MODEL_TOOLTIP),
                io.Conditioning.Input("positive", tooltip="The prompt. Encode it with the CLIP from "
                                      "'Segmentation-Free CLIP' (or the guidance node) so word tokens are known."),
                io.Conditioning.Input("negative", tooltip="The negative prompt used by plain CFG before the switch."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="The classifier-free guidance scale used before the switch (ComfyUI's cfg = 1 + w)."),
                *segfree_inputs(),
            ],
            outputs=[io.Guider.Output(tooltip="Plug into SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, cfg, segfree_scale, segfree_cfg, start_percent, attention_heads,
                candidates, joint_blocks=JOINT_BLOCK_MODES[0]) -> io.NodeOutput:
        settings = settings_from(segfree_scale, segfree_cfg, start_percent, attention_heads, candidates, joint_blocks)
        return io.NodeOutput(glue.segfree_guider(model, positive, negative, cfg, settings, "MC_SegmentationFreeGuider"))


class SegmentationFreeCLIP(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MC_SegmentationFreeCLIP",
            display_name="Segmentation-Free CLIP",
            category="More Control/guidance",
            description="Returns a clone of the CLIP whose text encodings remember which tokens are words, for the "
                        "segmentation-free guider (the guidance MODEL node has the same output built in).",
            inputs=[io.Clip.Input("clip", tooltip="Your CLIP; it is cloned, not changed.")],
            outputs=[io.Clip.Output(tooltip="Wire into CLIPTextEncode.")],
        )

    @classmethod
    def execute(cls, clip) -> io.NodeOutput:
        return io.NodeOutput(glue.clip_with_token_maps(clip))


class SegmentationMap(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MC_SegmentationMap",
            display_name="Segmentation Map (cross-attention)",
            category="More Control/guidance",
            is_output_node=True,
            description="Shows the segmentation the model implies: every patch coloured by the prompt word it attends "
                        "to most (eq. 9 of the segmentation-free guidance paper), summed over every cross-attention "
                        "layer (SD3/Flux: the image-to-text weights of every double-stream block) and over noise levels "
                        "between start and end percent; plus one mask per word.",
            inputs=[
                io.Model.Input("model", tooltip="The model whose attention is read (not changed)."),
                io.Clip.Input("clip", tooltip="The CLIP used to encode the prompt."),
                io.String.Input("text", multiline=True, default="",
                                tooltip="The prompt whose words are mapped."),
                io.Latent.Input("samples", tooltip="The image to analyse as a latent (e.g. the KSampler's output)."),
                io.Float.Input("start_percent", default=0.3, min=0.0, max=1.0, step=0.01,
                               tooltip="First noise level probed (0 = pure noise, 1 = clean)."),
                io.Float.Input("end_percent", default=0.8, min=0.0, max=1.0, step=0.01,
                               tooltip="Last noise level probed."),
                io.Int.Input("probes", default=4, min=1, max=50,
                             tooltip="How many noise levels between start and end are probed (one model call each)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the noise added to the latent for probing."),
                io.Combo.Input("candidates", options=MAP_CANDIDATE_MODES, default=MAP_CANDIDATE_MODES[0], optional=True,
                               tooltip="Which words a patch may be given. 'content words' leaves out articles, prepositions "
                                       "and pronouns ('a', 'the', 'of', 'to'), which often take the most attention without "
                                       "naming anything (on the shapes world 'a' took most patches); 'prompt words' shows "
                                       "every word, as segmentation-free guidance's default sees them."),
            ],
            outputs=[
                io.Image.Output("map", tooltip="Patches coloured by their most-attended word, with a legend."),
                io.Mask.Output("word_masks", tooltip="One mask per word (for each image, in prompt order)."),
                io.String.Output("words", tooltip="The words in mask order, one per line."),
            ],
        )

    @classmethod
    def validate_inputs(cls, start_percent, end_percent, **kwargs):
        if start_percent > end_percent:
            return "MC_SegmentationMap: input 'start_percent' must not be after 'end_percent'"
        return True

    @classmethod
    def execute(cls, model, clip, text, samples, start_percent, end_percent, probes, seed,
                candidates=MAP_CANDIDATE_MODES[0]) -> io.NodeOutput:
        node = "MC_SegmentationMap"
        tokens = clip.tokenize(text)
        words = glue.prompt_words(clip.tokenizer, tokens)
        if not words:
            raise glue.NodeInputError(node, "text", "the prompt has no words to map")
        positive = glue.clip_with_token_maps(clip).encode_from_tokens_scheduled(tokens)
        latent = samples["samples"]
        scores = glue.record_segmentation(model, positive, latent, start_percent, end_percent, probes, seed, node,
                                          content_words=candidates == MAP_CANDIDATE_MODES[0])
        labels = segfree_algo.segmentation_from_scores(scores)
        height, width = latent.shape[-2] * 8, latent.shape[-1] * 8
        maps = torch.stack([segfree_algo.render_segmentation(l, words, (height, width)) for l in labels])
        masks = torch.cat([
            torch.nn.functional.interpolate((l[None, None] == torch.arange(1, len(words) + 1).view(1, -1, 1, 1)).float(),
                                            size=(height, width), mode="nearest")[0]
            for l in labels])
        # Shown on the node itself too: users would rather look at a map than wire a preview.
        return io.NodeOutput(maps, masks, "\n".join(words), ui=ui.PreviewImage(maps, cls=cls))


NODES = [SegmentationFreeGuidance, SegmentationFreeGuider, SegmentationFreeCLIP, SegmentationMap]
